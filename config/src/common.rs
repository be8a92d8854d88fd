//! Sections and checks shared by the gateway and node configurations.

use crate::error::Problems;
use serde::{Deserialize, Serialize};

/// `[log]`: what the binary logs and how.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing_subscriber::EnvFilter` directive such as `info` or
    /// `info,nearpath_gateway=debug`; `RUST_LOG`, when set, is for the binaries to honour instead.
    /// Default: `info`.
    pub level: String,
    /// Output format. Default: `text`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl LogFormat {
    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl LogConfig {
    pub(crate) fn check(&self, p: &mut Problems) {
        if self.level.trim().is_empty() {
            p.push("log.level", "must not be empty (e.g. \"info\")");
        } else if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.level) {
            p.push(
                "log.level",
                format!("{:?} is not a log filter directive: {e}", self.level),
            );
        }
    }
}

/// A secret (token, key) must be usable in an HTTP header or a TOML string as written: no
/// whitespace or control characters, which in practice come from a pasted trailing newline.
pub(crate) fn check_secret(p: &mut Problems, path: &str, value: &str) {
    if value.is_empty() {
        p.push(path, "must not be empty (leave it out instead)");
    } else if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        // Never echo a secret, not even a malformed one.
        p.push(path, "must not contain whitespace or control characters");
    }
}

/// Whether a secret is a placeholder of the kind the example files ship with
/// (`REPLACE-WITH-YOUR-ENROLMENT-TOKEN`, `change-me-to-a-long-random-string`, `...`): copied
/// unchanged, it would be refused by the other side (or, for an admin token, guessed by anyone
/// who read the examples).
pub(crate) fn is_placeholder_secret(value: &str) -> bool {
    let lower = value.to_ascii_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let change_me = words.contains(&"changeme") || words.windows(2).any(|w| w == ["change", "me"]);
    !value.is_empty()
        && (lower.starts_with("replace-with")
            || change_me
            || value.chars().all(|c| c == '.' || c == 'x' || c == 'X')
            || (value.starts_with('<') && value.ends_with('>')))
}

/// Whether `host` is a domain reserved for documentation (RFC 2606: `example.com`, `.org`,
/// `.net` and the `.example` top-level domain), as in the example files' addresses.
pub(crate) fn is_example_host(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    ["example.com", "example.net", "example.org", "example"]
        .iter()
        .any(|d| host == *d || host.ends_with(&format!(".{d}")))
}

/// A free-form name (game title, model name): 1 to `max` characters, no control characters,
/// not blank.
pub(crate) fn check_name(p: &mut Problems, path: &str, value: &str, max: usize, spaces: bool) {
    if value.trim().is_empty() {
        p.push(path, "must not be empty");
    } else if value.chars().count() > max {
        p.push(path, format!("must be at most {max} characters"));
    } else if value.chars().any(char::is_control) || (!spaces && value.contains(' ')) {
        let what = if spaces {
            "control characters"
        } else {
            "spaces or control characters"
        };
        p.push(path, format!("{value:?} must not contain {what}"));
    }
}

/// Parses a version `x.y.z`, ignoring a `-pre-release` or `+build` suffix (`0.1.0-dev` is
/// `(0, 1, 0)`). Numbers are decimal without a sign. `None` when it is not of that shape.
pub fn parse_version(s: &str) -> Option<(u64, u64, u64)> {
    let core = s.split(['-', '+']).next().unwrap_or(s);
    let mut parts = core.split('.').map(|part| {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            part.parse::<u64>().ok()
        }
    });
    let v = (parts.next()??, parts.next()??, parts.next()??);
    if parts.next().is_some() {
        return None;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("1.2.3"), Some((1, 2, 3)));
        assert_eq!(parse_version("0.1.0-dev"), Some((0, 1, 0)));
        assert_eq!(parse_version("10.20.30+abc"), Some((10, 20, 30)));
        for bad in [
            "1.2", "1.2.3.4", "a.b.c", "1..3", "", "v1.2.3", "1.2.+3", "1.2.-3",
        ] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
    }

    #[test]
    fn log_level_checked_with_env_filter() {
        let mut p = Problems::default();
        LogConfig::default().check(&mut p);
        LogConfig {
            level: "info,nearpath_gateway=debug".into(),
            format: LogFormat::Json,
        }
        .check(&mut p);
        assert!(p.into_result("x").is_ok());

        let mut p = Problems::default();
        LogConfig {
            level: "nearpath=loud".into(),
            format: LogFormat::Text,
        }
        .check(&mut p);
        let errs = p.into_result("x").unwrap_err();
        assert_eq!(errs.errors[0].path, "log.level");
        assert!(
            errs.errors[0]
                .message
                .starts_with("\"nearpath=loud\" is not a log filter directive"),
            "{}",
            errs.errors[0].message
        );
    }

    #[test]
    fn placeholders_from_the_examples_are_recognised() {
        for placeholder in [
            "REPLACE-WITH-YOUR-ENROLMENT-TOKEN",
            "REPLACE-WITH-AN-API-KEY",
            "change-me-to-a-long-random-string",
            "federation-admin-token-change-me",
            "...",
            "<an API key>",
        ] {
            assert!(is_placeholder_secret(placeholder), "{placeholder}");
        }
        for real in ["0123456789abcdef0123", "np_live_9f8e7d", "exchange-meter"] {
            assert!(!is_placeholder_secret(real), "{real}");
        }
        for host in [
            "gateway.example.com",
            "EXAMPLE.ORG",
            "gw.example",
            "example.net.",
        ] {
            assert!(is_example_host(host), "{host}");
        }
        for host in [
            "127.0.0.1",
            "gw.examples.com",
            "myexample.com",
            "example.company",
        ] {
            assert!(!is_example_host(host), "{host}");
        }
    }

    #[test]
    fn secrets_are_never_echoed() {
        let mut p = Problems::default();
        check_secret(&mut p, "admin.token", "hunter2 \n");
        let errs = p.into_result("x").unwrap_err();
        assert!(!errs.to_string().contains("hunter2"));
    }
}
