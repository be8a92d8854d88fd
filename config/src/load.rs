//! Loading: file -> TOML -> environment overrides -> typed configuration -> validation.
//!
//! Environment overrides are variables `NEARPATH_<SECTION>__<KEY>[__<KEY>...]`: the part after
//! `NEARPATH_` is split on double underscores into a key path and lower-cased
//! (`NEARPATH_ADMIN__TOKEN` sets `admin.token`, `NEARPATH_GEO__RELOAD_CHECK_INTERVAL_S` sets
//! `geo.reload_check_interval_s`). A numeric segment indexes an array that the file already has
//! (`NEARPATH_MODELS__0__BACKEND__API_KEY`). The value is read as a TOML value when it is one
//! (`30`, `true`, `["a", "b"]`, `"quoted"`) and as a plain string otherwise; when the typed field
//! wants a string, a value that happened to read as a number or boolean is taken as written.
//! Variables without a double underscore (`NEARPATH_CONFIG`, `NEARPATH_LOG`) are not overrides:
//! every configuration key lives inside a section, so they cannot name one, and other tools may
//! use such names. An override naming an unknown key is refused like an unknown key in the file.

use crate::error::{ConfigError, ConfigErrors, Problems};
use crate::gateway::GatewayConfig;
use crate::node::NodeConfig;
use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;
use std::fmt::Write as _;
use std::path::Path;
use toml::de::{DeTable, DeValue};
use toml::{Table, Value};

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "NEARPATH_";

/// Loads, overrides from the process environment, and validates a gateway configuration file
/// (without the checks only `gateway run` needs; see [`load_gateway_for_run`]).
pub fn load_gateway(path: &Path) -> Result<GatewayConfig, ConfigErrors> {
    let text = read(path)?;
    with_process_env(|env| parse_gateway(&text, &path.display().to_string(), env))
}

/// [`load_gateway`] plus [`GatewayConfig::validate_for_run`]'s checks.
pub fn load_gateway_for_run(path: &Path) -> Result<GatewayConfig, ConfigErrors> {
    let text = read(path)?;
    with_process_env(|env| parse_gateway_for_run(&text, &path.display().to_string(), env))
}

/// Loads, overrides from the process environment, and validates an edge node configuration
/// file (without the checks only `edge-node run` needs; see [`load_node_for_run`]).
pub fn load_node(path: &Path) -> Result<NodeConfig, ConfigErrors> {
    let text = read(path)?;
    with_process_env(|env| parse_node(&text, &path.display().to_string(), env))
}

/// [`load_node`] plus [`NodeConfig::validate_for_run`]'s checks.
pub fn load_node_for_run(path: &Path) -> Result<NodeConfig, ConfigErrors> {
    let text = read(path)?;
    with_process_env(|env| parse_node_for_run(&text, &path.display().to_string(), env))
}

/// Parses and validates gateway configuration `text`. `origin` names it in errors (a file name);
/// `env` is the set of environment variables to apply as overrides, as (name, value) pairs
/// (those not starting with [`ENV_PREFIX`] are ignored), so tests need no process environment.
pub fn parse_gateway(
    text: &str,
    origin: &str,
    env: &[(&str, &str)],
) -> Result<GatewayConfig, ConfigErrors> {
    parse_with(text, origin, env, |c: &GatewayConfig, p| c.check(p, false))
}

/// [`parse_gateway`] plus [`GatewayConfig::validate_for_run`]'s checks.
pub fn parse_gateway_for_run(
    text: &str,
    origin: &str,
    env: &[(&str, &str)],
) -> Result<GatewayConfig, ConfigErrors> {
    parse_with(text, origin, env, |c: &GatewayConfig, p| c.check(p, true))
}

/// Parses and validates edge node configuration `text`; see [`parse_gateway`] for the arguments.
pub fn parse_node(
    text: &str,
    origin: &str,
    env: &[(&str, &str)],
) -> Result<NodeConfig, ConfigErrors> {
    parse_with(text, origin, env, |c: &NodeConfig, p| c.check(p, false))
}

/// [`parse_node`] plus [`NodeConfig::validate_for_run`]'s checks.
pub fn parse_node_for_run(
    text: &str,
    origin: &str,
    env: &[(&str, &str)],
) -> Result<NodeConfig, ConfigErrors> {
    parse_with(text, origin, env, |c: &NodeConfig, p| c.check(p, true))
}

fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors::new(
            path.display().to_string(),
            vec![ConfigError::new(
                "",
                format!("cannot read the configuration file: {e}"),
            )],
        )
    })
}

/// Calls `f` with the process's `NEARPATH_*` variables. A value that is not UTF-8 is passed on
/// lossily converted, so that using it fails validation under its name rather than vanishing
/// (`std::env::vars` would panic on it).
fn with_process_env<T>(f: impl FnOnce(&[(&str, &str)]) -> T) -> T {
    let owned: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            k.starts_with(ENV_PREFIX)
                .then(|| (k, v.to_string_lossy().into_owned()))
        })
        .collect();
    let pairs: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    f(&pairs)
}

/// Where an override came from, so errors about it name the variable instead of a line.
#[derive(Debug)]
struct Provenance {
    /// Key path the variable set, in error-path syntax.
    path: String,
    /// The outermost key the variable created (a table, or `path` itself when its parents were
    /// in the file): errors at or under it are the variable's doing.
    blame: String,
    var: String,
    /// The value as written, when it was read as a non-string TOML value.
    raw_if_coerced: Option<String>,
    /// The key path as segments, to put the raw string back.
    segments: Vec<String>,
}

fn parse_with<T: DeserializeOwned>(
    text: &str,
    origin: &str,
    env: &[(&str, &str)],
    check: impl Fn(&T, &mut Problems),
) -> Result<T, ConfigErrors> {
    let fail = |errors: Vec<ConfigError>| ConfigErrors::new(origin, errors);
    let mut table: Table = match text.parse() {
        Ok(table) => table,
        Err(e) => return Err(fail(vec![syntax_error(text, &e)])),
    };
    let spans = DeTable::parse(text).ok();

    let mut provenance = Vec::new();
    let mut env_errors = Vec::new();
    let mut vars: Vec<&(&str, &str)> = env
        .iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    // Apply in name order so the outcome does not depend on the environment's order.
    vars.sort();
    for (name, value) in vars {
        if let Err(message) = apply_override(&mut table, name, value, &mut provenance) {
            env_errors.push(ConfigError::new(
                "",
                format!("environment variable {name}: {message}"),
            ));
        }
    }
    if !env_errors.is_empty() {
        return Err(fail(env_errors));
    }

    // A field that wants a string gets the variable as written even when it reads as TOML (a
    // numeric token, say): retry with the raw string at the path serde complained about.
    let config = loop {
        let error = match serde_path_to_error::deserialize::<_, T>(Value::Table(table.clone())) {
            Ok(config) => break config,
            Err(error) => error,
        };
        let path = error_path(error.path());
        let message = error.inner().message();
        // Inside an internally tagged enum the path stops at the enum, so a variable below it
        // qualifies when serde's message quotes its value (``integer `12345` ``).
        let retry = provenance.iter_mut().find(|p| {
            p.raw_if_coerced.as_deref().is_some_and(|raw| {
                p.path == path
                    || (is_under(&p.path, &path) && message.contains(&format!("`{raw}`")))
            })
        });
        if let Some(p) = retry {
            let raw = p.raw_if_coerced.take().unwrap_or_default();
            set_path(&mut table, &p.segments, Value::String(raw));
            continue;
        }
        let mut e = serde_error(&path, message);
        locate(&mut e, spans.as_ref(), text, &provenance);
        return Err(fail(vec![e]));
    };

    let mut problems = Problems::default();
    check(&config, &mut problems);
    problems.into_result(origin).map_err(|mut errs| {
        for e in &mut errs.errors {
            locate(e, spans.as_ref(), text, &provenance);
        }
        errs
    })?;
    Ok(config)
}

fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let mut err = ConfigError::new("", format!("not valid TOML: {}", e.message().trim_end()));
    err.line = e.span().map(|span| line_of(text, span.start));
    err
}

/// Turns a serde message into the shape of a validation error: an unknown or missing key is
/// reported at its own path.
fn serde_error(path: &str, message: &str) -> ConfigError {
    // serde_path_to_error includes an unknown key in the path but not a missing one, and
    // inside an internally tagged enum it stops at the enum: append the key when absent.
    let join = |key: &str| {
        if path.is_empty() || path == key {
            key.to_string()
        } else if path.ends_with(&format!(".{key}")) {
            path.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((key, tail)) = rest.split_once('`') {
            let expected = tail.trim_start_matches(", ");
            let message = if expected.is_empty() || expected == "there are no fields" {
                "unknown key".to_string()
            } else {
                format!("unknown key ({expected})")
            };
            return ConfigError::new(join(key), message);
        }
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        if let Some((key, _)) = rest.split_once('`') {
            return ConfigError::new(join(key), "required key is missing");
        }
    }
    ConfigError::new(path, message)
}

/// Adds the line an error's path is written on, or the environment variable that set it.
fn locate(
    e: &mut ConfigError,
    spans: Option<&toml::Spanned<DeTable<'_>>>,
    text: &str,
    provenance: &[Provenance],
) {
    if e.path.is_empty() {
        return;
    }
    if let Some(p) = provenance.iter().find(|p| is_under(&e.path, &p.blame)) {
        let _ = write!(e.message, " (from environment variable {})", p.var);
        return;
    }
    if let Some(spans) = spans {
        e.line = span_of(spans.get_ref(), &e.path).map(|start| line_of(text, start));
    }
}

/// Whether `path` is `base` or inside it.
fn is_under(path: &str, base: &str) -> bool {
    path.strip_prefix(base)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The path in error syntax: `a.b[2].c`; empty for the root.
fn error_path(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            // Variants and untracked positions add nothing a reader could look up.
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    out
}

enum PathPart<'a> {
    Key(&'a str),
    Index(usize),
}

/// Splits `a.b[2].c` into parts. Keys containing `.` or `[` are not representable, which is
/// fine: validation refuses such names, and their errors just get no line.
fn path_parts(path: &str) -> Option<Vec<PathPart<'_>>> {
    let mut parts = Vec::new();
    for piece in path.split('.') {
        let (key, mut rest) = match piece.find('[') {
            Some(i) => (&piece[..i], &piece[i..]),
            None => (piece, ""),
        };
        if !key.is_empty() {
            parts.push(PathPart::Key(key));
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let end = inner.find(']')?;
            parts.push(PathPart::Index(inner[..end].parse().ok()?));
            rest = &inner[end + 1..];
        }
    }
    Some(parts)
}

/// Byte offset where `path` is written in the document: the key for a table entry, the value
/// for an array element. Falls back to the nearest written ancestor.
fn span_of(doc: &DeTable<'_>, path: &str) -> Option<usize> {
    let parts = path_parts(path)?;
    let mut best = None;
    let mut current: Option<&DeValue<'_>> = None;
    for part in parts {
        let next = match (part, current) {
            (PathPart::Key(k), None) => doc.get_key_value(k).map(|(key, v)| (key.span().start, v)),
            (PathPart::Key(k), Some(DeValue::Table(t))) => {
                t.get_key_value(k).map(|(key, v)| (key.span().start, v))
            }
            (PathPart::Index(i), Some(DeValue::Array(a))) => a.get(i).map(|v| (v.span().start, v)),
            _ => None,
        };
        match next {
            Some((start, value)) => {
                best = Some(start);
                current = Some(value.get_ref());
            }
            None => break,
        }
    }
    best
}

/// Applies one override to the raw table.
fn apply_override(
    table: &mut Table,
    name: &str,
    value: &str,
    provenance: &mut Vec<Provenance>,
) -> Result<(), String> {
    let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
        return Ok(());
    };
    if !rest.contains("__") {
        return Ok(());
    }
    let segments: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    if segments.iter().any(String::is_empty) {
        return Err("empty key between double underscores".into());
    }
    let parsed = parse_env_value(value);
    let raw_if_coerced = (!matches!(parsed, Value::String(_))).then(|| value.to_string());

    // Walk down, creating missing tables; record the first created one, since an error about
    // it (an unknown section, say) is the variable's doing.
    let mut path = String::new();
    let mut created_at: Option<String> = None;
    let mut current = Step::Table(table);
    let (last, parents) = segments.split_last().ok_or("no key")?;
    for seg in parents {
        current = match current {
            Step::Table(t) => {
                push_key(&mut path, seg);
                if !t.contains_key(seg) {
                    created_at.get_or_insert_with(|| path.clone());
                    t.insert(seg.clone(), Value::Table(Table::new()));
                }
                match t.get_mut(seg) {
                    Some(Value::Table(inner)) => Step::Table(inner),
                    Some(Value::Array(items)) => Step::Array(items),
                    _ => return Err(format!("{path} is not a table")),
                }
            }
            Step::Array(items) => {
                let index = array_index(seg, items.len(), &path)?;
                let _ = write!(path, "[{index}]");
                match items.get_mut(index) {
                    Some(Value::Table(inner)) => Step::Table(inner),
                    Some(Value::Array(inner)) => Step::Array(inner),
                    _ => return Err(format!("{path} is not a table")),
                }
            }
        };
    }
    match current {
        Step::Table(t) => {
            push_key(&mut path, last);
            t.insert(last.clone(), parsed);
        }
        Step::Array(items) => {
            let index = array_index(last, items.len(), &path)?;
            let _ = write!(path, "[{index}]");
            items[index] = parsed;
        }
    }
    provenance.push(Provenance {
        blame: created_at.unwrap_or_else(|| path.clone()),
        path,
        var: name.to_string(),
        raw_if_coerced,
        segments,
    });
    Ok(())
}

enum Step<'a> {
    Table(&'a mut Table),
    Array(&'a mut Vec<Value>),
}

fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

fn array_index(seg: &str, len: usize, path: &str) -> Result<usize, String> {
    match seg.parse::<usize>() {
        Ok(i) if i < len => Ok(i),
        Ok(i) => Err(format!("{path} has {len} entries, so there is no [{i}]")),
        Err(_) => Err(format!(
            "{path} is an array: the next key must be an index, not {seg:?}"
        )),
    }
}

/// Sets the value at a path that exists (used to put back a raw string).
fn set_path(table: &mut Table, segments: &[String], value: Value) {
    fn set_in(current: &mut Value, segments: &[String], value: Value) {
        let Some((first, rest)) = segments.split_first() else {
            *current = value;
            return;
        };
        let next = match current {
            Value::Table(t) => t.get_mut(first),
            Value::Array(items) => first.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        };
        if let Some(next) = next {
            set_in(next, rest, value);
        }
    }
    if let Some((first, rest)) = segments.split_first() {
        if let Some(v) = table.get_mut(first) {
            set_in(v, rest, value);
        }
    }
}

/// An override's value: a TOML value when the whole text is one, else the text itself.
fn parse_env_value(raw: &str) -> Value {
    match raw.parse::<Value>() {
        Ok(v) => v,
        Err(_) => Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values() {
        assert_eq!(parse_env_value("30"), Value::Integer(30));
        assert_eq!(parse_env_value("true"), Value::Boolean(true));
        assert_eq!(parse_env_value("1.5"), Value::Float(1.5));
        assert_eq!(
            parse_env_value("[\"a\", \"b\"]"),
            Value::Array(vec!["a".into(), "b".into()])
        );
        assert_eq!(parse_env_value("\"30\""), Value::String("30".into()));
        assert_eq!(
            parse_env_value("hello world"),
            Value::String("hello world".into())
        );
        assert_eq!(
            parse_env_value("127.0.0.1:8080"),
            Value::String("127.0.0.1:8080".into())
        );
        // A value with a newline must not smuggle in a second key.
        assert_eq!(
            parse_env_value("1\nx = 2"),
            Value::String("1\nx = 2".into())
        );
    }

    #[test]
    fn paths() {
        let doc = "[a]\nb = 1\n\n[[c]]\nd = [\n  \"x\",\n  \"y\",\n]\n";
        let spans = DeTable::parse(doc).unwrap();
        let line = |p: &str| span_of(spans.get_ref(), p).map(|s| line_of(doc, s));
        assert_eq!(line("a.b"), Some(2));
        assert_eq!(line("c[0].d"), Some(5));
        assert_eq!(line("c[0].d[1]"), Some(7));
        // Unknown tails fall back to the nearest written ancestor.
        assert_eq!(line("a.zzz"), Some(1));
        assert_eq!(line("zzz"), None);
        assert!(is_under("a.b[1]", "a.b"));
        assert!(is_under("a.b", "a.b"));
        assert!(!is_under("a.bc", "a.b"));
    }
}
