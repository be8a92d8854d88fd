//! Loading: file -> TOML -> relative paths resolved -> environment overrides -> typed
//! configuration -> validation (plus the caller's checks of the files it names).
//!
//! Every problem is reported at once: keys that do not fit the schema (unknown keys, wrong
//! types) are set aside one by one so that the rest of the file is still read and validated.
//! Each error carries the key path, and the line and column where the key is written.
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
use std::io::Read as _;
use std::path::Path;
use toml::de::{DeTable, DeValue};
use toml::{Table, Value};

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "NEARPATH_";

/// Largest configuration file read, in bytes. Real files are a few tens of KiB (the example
/// with every key is about 25 KiB); anything near this is the wrong file, or a hostile one.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Most errors one load reports about keys that do not fit the schema (unknown keys, wrong
/// types): each costs another deserialisation pass, and a file with more is the wrong file.
const MAX_SCHEMA_ERRORS: usize = 50;

/// Keys of the gateway configuration that name files. A relative path written in a file is
/// relative to the folder of that file (set through the environment, or left at its default,
/// it stays relative to the working directory).
pub const GATEWAY_FILE_KEYS: &[&str] = &[
    "http.tls_cert_file",
    "http.tls_key_file",
    "quic.cert_file",
    "quic.key_file",
    "store.path",
    "store.ca_file",
    "geo.database",
    "geo.anonymous_ip_database",
    "log.otlp_ca_file",
];

/// Keys of the node configuration that name files; see [`GATEWAY_FILE_KEYS`].
pub const NODE_FILE_KEYS: &[&str] = &["gateway.ca_file", "log.otlp_ca_file"];

/// Checks of what a configuration refers to (certificate files, databases), made by the binary
/// that uses them. Each error names the key path it concerns; the loader adds the file, line and
/// column, and reports them with the file's own errors.
pub type ExtraChecks<'a, T> = &'a dyn Fn(&T) -> Vec<ConfigError>;

/// Loads, overrides from the process environment, and validates a gateway configuration file
/// (without the checks only `gateway run` needs; see [`load_gateway_for_run`]). Relative file
/// paths in it are resolved against the file's folder ([`GATEWAY_FILE_KEYS`]).
pub fn load_gateway(path: &Path) -> Result<GatewayConfig, ConfigErrors> {
    load_with(path, GATEWAY_FILE_KEYS, |c: &GatewayConfig, p| {
        c.check(p, false)
    })
}

/// [`load_gateway`] plus [`GatewayConfig::validate_for_run`]'s checks.
pub fn load_gateway_for_run(path: &Path) -> Result<GatewayConfig, ConfigErrors> {
    load_with(path, GATEWAY_FILE_KEYS, |c: &GatewayConfig, p| {
        c.check(p, true)
    })
}

/// What `gateway run` and `gateway check-config` both call: [`load_gateway_for_run`] plus
/// `extra`, the checks of the files and databases the configuration names, every error of
/// both kinds reported at once.
pub fn load_gateway_checked(
    path: &Path,
    extra: ExtraChecks<'_, GatewayConfig>,
) -> Result<GatewayConfig, ConfigErrors> {
    load_with(path, GATEWAY_FILE_KEYS, |c: &GatewayConfig, p| {
        c.check(p, true);
        p.extend(extra(c));
    })
}

/// Loads, overrides from the process environment, and validates an edge node configuration
/// file (without the checks only running the node needs; see [`load_node_for_run`]). Relative
/// file paths in it are resolved against the file's folder ([`NODE_FILE_KEYS`]).
pub fn load_node(path: &Path) -> Result<NodeConfig, ConfigErrors> {
    load_with(path, NODE_FILE_KEYS, |c: &NodeConfig, p| c.check(p, false))
}

/// [`load_node`] plus [`NodeConfig::validate_for_run`]'s checks.
pub fn load_node_for_run(path: &Path) -> Result<NodeConfig, ConfigErrors> {
    load_with(path, NODE_FILE_KEYS, |c: &NodeConfig, p| c.check(p, true))
}

/// What `edge-node --config` and `edge-node check-config` both call; see
/// [`load_gateway_checked`].
pub fn load_node_checked(
    path: &Path,
    extra: ExtraChecks<'_, NodeConfig>,
) -> Result<NodeConfig, ConfigErrors> {
    load_with(path, NODE_FILE_KEYS, |c: &NodeConfig, p| {
        c.check(p, true);
        p.extend(extra(c));
    })
}

/// Parses and validates gateway configuration `text`. `origin` names it in errors (a file name);
/// `env` is the set of environment variables to apply as overrides, as (name, value) pairs
/// (those not starting with [`ENV_PREFIX`] are ignored), so tests need no process environment.
/// Paths are taken as written (see [`parse_gateway_checked`] to resolve them).
pub fn parse_gateway(
    text: &str,
    origin: &str,
    env: &[(&str, &str)],
) -> Result<GatewayConfig, ConfigErrors> {
    parse_with(&Source::text(text, origin), env, |c: &GatewayConfig, p| {
        c.check(p, false)
    })
}

/// [`parse_gateway`] plus [`GatewayConfig::validate_for_run`]'s checks.
pub fn parse_gateway_for_run(
    text: &str,
    origin: &str,
    env: &[(&str, &str)],
) -> Result<GatewayConfig, ConfigErrors> {
    parse_with(&Source::text(text, origin), env, |c: &GatewayConfig, p| {
        c.check(p, true)
    })
}

/// [`load_gateway_checked`] on text: relative paths in `text` resolve against `base_dir` when
/// given.
pub fn parse_gateway_checked(
    text: &str,
    origin: &str,
    base_dir: Option<&Path>,
    env: &[(&str, &str)],
    extra: ExtraChecks<'_, GatewayConfig>,
) -> Result<GatewayConfig, ConfigErrors> {
    let src = Source {
        text,
        origin,
        base_dir,
        file_keys: GATEWAY_FILE_KEYS,
    };
    parse_with(&src, env, |c: &GatewayConfig, p| {
        c.check(p, true);
        p.extend(extra(c));
    })
}

/// Parses and validates edge node configuration `text`; see [`parse_gateway`] for the arguments.
pub fn parse_node(
    text: &str,
    origin: &str,
    env: &[(&str, &str)],
) -> Result<NodeConfig, ConfigErrors> {
    parse_with(&Source::text(text, origin), env, |c: &NodeConfig, p| {
        c.check(p, false)
    })
}

/// [`parse_node`] plus [`NodeConfig::validate_for_run`]'s checks.
pub fn parse_node_for_run(
    text: &str,
    origin: &str,
    env: &[(&str, &str)],
) -> Result<NodeConfig, ConfigErrors> {
    parse_with(&Source::text(text, origin), env, |c: &NodeConfig, p| {
        c.check(p, true)
    })
}

/// [`load_node_checked`] on text; see [`parse_gateway_checked`].
pub fn parse_node_checked(
    text: &str,
    origin: &str,
    base_dir: Option<&Path>,
    env: &[(&str, &str)],
    extra: ExtraChecks<'_, NodeConfig>,
) -> Result<NodeConfig, ConfigErrors> {
    let src = Source {
        text,
        origin,
        base_dir,
        file_keys: NODE_FILE_KEYS,
    };
    parse_with(&src, env, |c: &NodeConfig, p| {
        c.check(p, true);
        p.extend(extra(c));
    })
}

/// Configuration text and what the loader needs to know about where it came from.
struct Source<'a> {
    text: &'a str,
    /// Names the text in errors: the file path as given.
    origin: &'a str,
    /// The folder relative paths in the text are relative to (`None`: leave them as written).
    base_dir: Option<&'a Path>,
    /// Keys whose values are file paths.
    file_keys: &'a [&'a str],
}

impl<'a> Source<'a> {
    fn text(text: &'a str, origin: &'a str) -> Self {
        Self {
            text,
            origin,
            base_dir: None,
            file_keys: &[],
        }
    }
}

fn load_with<T: DeserializeOwned>(
    path: &Path,
    file_keys: &[&str],
    check: impl Fn(&T, &mut Problems),
) -> Result<T, ConfigErrors> {
    let text = read(path)?;
    let origin = path.display().to_string();
    let src = Source {
        text: &text,
        origin: &origin,
        base_dir: path.parent(),
        file_keys,
    };
    with_process_env(|env| parse_with(&src, env, check))
}

/// Reads a configuration file, refusing what cannot be one (a directory, a huge or endless
/// file, bytes that are not UTF-8) with a message that says so rather than a bare OS error.
fn read(path: &Path) -> Result<String, ConfigErrors> {
    let fail = |e: ConfigError| ConfigErrors::new(path.display().to_string(), vec![e]);
    let cannot = |e: std::io::Error| {
        fail(ConfigError::new(
            "",
            format!("cannot read the configuration file: {e}"),
        ))
    };
    let file = std::fs::File::open(path).map_err(cannot)?;
    if file.metadata().map_err(cannot)?.is_dir() {
        return Err(fail(ConfigError::new(
            "",
            "is a directory, not a configuration file",
        )));
    }
    // Bounded read: `metadata().len()` says nothing about a FIFO or a device like /dev/zero.
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(fail(ConfigError::new(
            "",
            format!(
                "is larger than {} MiB: not a configuration file",
                MAX_CONFIG_BYTES >> 20
            ),
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let before = std::str::from_utf8(&e.as_bytes()[..valid]).unwrap_or_default();
        let mut err = ConfigError::new(
            "",
            "is not UTF-8 text (TOML files are UTF-8); the first bad byte is here",
        );
        let (line, column) = line_col(before, before.len());
        err.line = Some(line);
        err.column = Some(column);
        fail(err)
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
    src: &Source<'_>,
    env: &[(&str, &str)],
    check: impl Fn(&T, &mut Problems),
) -> Result<T, ConfigErrors> {
    let (text, origin) = (src.text, src.origin);
    let fail = |errors: Vec<ConfigError>| ConfigErrors::new(origin, errors);
    let mut table: Table = match text.parse() {
        Ok(table) => table,
        Err(e) => return Err(fail(vec![syntax_error(text, &e)])),
    };
    let spans = DeTable::parse(text).ok();
    // Before the overrides: only what the file says is relative to the file.
    if let Some(base) = src.base_dir {
        resolve_file_keys(&mut table, src.file_keys, base);
    }

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

    // Schema errors: serde stops at the first, so each offending key is reported, removed, and
    // the rest deserialised again, until it fits or a key cannot be removed (a missing one).
    let mut errors: Vec<ConfigError> = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    let config = loop {
        let error = match serde_path_to_error::deserialize::<_, T>(Value::Table(table.clone())) {
            Ok(config) => break Some(config),
            Err(error) => error,
        };
        let path = error_path(error.path());
        let message = error.inner().message();
        // A field that wants a string gets the variable as written even when it reads as TOML
        // (a numeric token, say): retry with the raw string at the path serde complained about.
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
        // A key of the wrong type, once removed, may come back as a missing required key: the
        // first message said it already.
        if errors.iter().any(|old| old.path == e.path) {
            break None;
        }
        locate(&mut e, spans.as_ref(), text, &provenance);
        let target = removal_target(&e.path);
        errors.push(e);
        if errors.len() >= MAX_SCHEMA_ERRORS
            || removed.contains(&target)
            || !remove_path(&mut table, &target)
        {
            break None;
        }
        removed.push(target);
    };

    // The table is sorted by key, so serde meets the keys out of file order: show them in it.
    errors.sort_by_key(|e| (e.line.unwrap_or(usize::MAX), e.column));
    if let Some(config) = &config {
        let mut problems = Problems::default();
        check(config, &mut problems);
        if let Err(found) = problems.into_result(origin) {
            // What was removed took its default, which says nothing about the file.
            for mut e in found.errors {
                if removed.iter().any(|r| is_under(&e.path, r)) {
                    continue;
                }
                // The file's checks and the caller's may find the same thing (a certificate
                // that is not configured): say it once.
                if errors
                    .iter()
                    .any(|o| o.path == e.path && o.message == e.message)
                {
                    continue;
                }
                locate(&mut e, spans.as_ref(), text, &provenance);
                errors.push(e);
            }
        }
    }
    match config {
        Some(config) if errors.is_empty() => Ok(config),
        _ => Err(fail(errors)),
    }
}

/// Makes the relative paths written at `keys` relative to `base` (the config file's folder).
/// Absolute paths, empty values (refused by validation) and non-strings (refused by the
/// schema) are left alone.
fn resolve_file_keys(table: &mut Table, keys: &[&str], base: &Path) {
    if base.as_os_str().is_empty() {
        return;
    }
    for key in keys {
        let mut segments = key.split('.');
        let Some(first) = segments.next() else {
            continue;
        };
        let mut current = table.get_mut(first);
        for seg in segments {
            current = match current {
                Some(Value::Table(t)) => t.get_mut(seg),
                _ => None,
            };
        }
        if let Some(Value::String(value)) = current {
            let path = Path::new(value.as_str());
            if !value.is_empty() && path.is_relative() {
                if let Some(joined) = base.join(path).to_str() {
                    *value = joined.to_string();
                }
            }
        }
    }
}

/// The key to remove so that deserialisation can go past an error at `path`: the path without
/// trailing array indexes (removing one element would shift the indexes of the next errors).
fn removal_target(path: &str) -> String {
    let mut target = path;
    while let Some(stripped) = target.strip_suffix(']') {
        match stripped.rfind('[') {
            Some(i) => target = &stripped[..i],
            None => break,
        }
    }
    target.to_string()
}

/// Removes the key at `path` (`a.b[2].c`); false when there is none.
fn remove_path(table: &mut Table, path: &str) -> bool {
    let Some(parts) = path_parts(path) else {
        return false;
    };
    let Some((PathPart::Key(last), parents)) = parts.split_last() else {
        return false;
    };
    let mut current = Step::Table(table);
    for part in parents {
        current = match (current, part) {
            (Step::Table(t), PathPart::Key(k)) => match t.get_mut(*k) {
                Some(Value::Table(inner)) => Step::Table(inner),
                Some(Value::Array(items)) => Step::Array(items),
                _ => return false,
            },
            (Step::Array(items), PathPart::Index(i)) => match items.get_mut(*i) {
                Some(Value::Table(inner)) => Step::Table(inner),
                Some(Value::Array(inner)) => Step::Array(inner),
                _ => return false,
            },
            _ => return false,
        };
    }
    match current {
        Step::Table(t) => t.remove(*last).is_some(),
        Step::Array(_) => false,
    }
}

fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let mut err = ConfigError::new("", format!("not valid TOML: {}", e.message().trim_end()));
    if let Some(span) = e.span() {
        let (line, column) = line_col(text, span.start);
        err.line = Some(line);
        err.column = Some(column);
    }
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
    if let Some(start) = spans.and_then(|spans| span_of(spans.get_ref(), &e.path)) {
        let (line, column) = line_col(text, start);
        e.line = Some(line);
        e.column = Some(column);
    }
}

/// Whether `path` is `base` or inside it.
fn is_under(path: &str, base: &str) -> bool {
    path.strip_prefix(base)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
fn line_of(text: &str, offset: usize) -> usize {
    line_col(text, offset).0
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
