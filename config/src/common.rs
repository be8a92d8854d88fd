//! Sections and checks shared by the gateway and node configurations.

use crate::error::Problems;
use serde::{Deserialize, Serialize};

/// `[log]`: what the binary logs and how, and where its trace spans go.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing_subscriber::EnvFilter` directive such as `info` or
    /// `info,nearpath_gateway=debug`; `RUST_LOG`, when set, is for the binaries to honour instead.
    /// Either way the chatty libraries (WebRTC, OpenH264) are capped at `error` unless the
    /// directive names them (`rtc_ice=warn`). Default: `info`.
    pub level: String,
    /// Output format. Default: `text`.
    pub format: LogFormat,
    /// ANSI colour in text lines: `auto` (only when standard error is a terminal and `NO_COLOR`
    /// is unset or empty), `always`, `never`. JSON lines never carry colour. Default: `auto`.
    pub color: LogColor,
    /// The OpenTelemetry collector receiving this binary's spans (OTLP), as an `http://` or
    /// `https://` URL: the base URL (`http://127.0.0.1:4318`, to which `/v1/traces` is added) or
    /// the full traces URL for `http/protobuf`, `http://127.0.0.1:4317` for `grpc`. An `https://`
    /// collector's certificate is checked against `otlp_ca_file`, or the system's roots.
    /// Default: none (no export, and no exporter built).
    pub otlp_endpoint: Option<String>,
    /// PEM file of the certificate authorities an `https://` collector's certificate must chain
    /// to (a private CA, or the collector's self-signed certificate); only with an `https://`
    /// `otlp_endpoint`. A relative path is relative to the configuration file. Default: none
    /// (the system's trust store: `/etc/ssl/certs` on Debian).
    pub otlp_ca_file: Option<std::path::PathBuf>,
    /// Headers sent with every export, such as a hosted collector's API key
    /// (`{ "x-api-key" = "..." }`); names are HTTP header names, values visible ASCII. Values
    /// are never logged. Default: none.
    pub otlp_headers: std::collections::BTreeMap<String, String>,
    /// The OTLP transport: `http/protobuf` or `grpc`. Default: `http/protobuf`.
    pub otlp_protocol: OtlpProtocol,
    /// The `service.name` resource of the exported spans. Default: `nearpath-gateway` for the
    /// gateway, `nearpath-edge-node` for the node.
    pub service_name: Option<String>,
    /// The share of traces started here that are exported, 0.0 to 1.0; a request that arrives
    /// with a W3C `traceparent` follows its caller's sampling decision. Default: `1.0`.
    pub otlp_sample_ratio: f64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
            color: LogColor::Auto,
            otlp_endpoint: None,
            otlp_ca_file: None,
            otlp_headers: std::collections::BTreeMap::new(),
            otlp_protocol: OtlpProtocol::HttpProtobuf,
            service_name: None,
            otlp_sample_ratio: 1.0,
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

/// When text log lines carry ANSI colour codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogColor {
    /// Colour only on a terminal, and not when `NO_COLOR` is set to a non-empty value.
    Auto,
    /// Always colour, even into a file or a pipe.
    Always,
    /// Never colour.
    Never,
}

/// The OTLP transport of exported spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum OtlpProtocol {
    /// Protobuf over HTTP POST (`/v1/traces`), OTLP's default on port 4318.
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// gRPC, port 4317.
    #[serde(rename = "grpc")]
    Grpc,
}

/// The longest `[log] service_name` accepted.
const SERVICE_NAME_MAX: usize = 128;

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
        if let Some(url) = &self.otlp_endpoint {
            check_otlp_endpoint(p, url);
        }
        if let Some(ca) = &self.otlp_ca_file {
            let https = self
                .otlp_endpoint
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"));
            if ca.as_os_str().is_empty() {
                p.push(
                    "log.otlp_ca_file",
                    "must not be empty (leave it out instead)",
                );
            } else if !https {
                p.push(
                    "log.otlp_ca_file",
                    "applies only to an https:// otlp_endpoint (a plain http:// export has no certificate to check)",
                );
            }
        }
        if self.otlp_headers.len() > OTLP_HEADERS_MAX {
            p.push(
                "log.otlp_headers",
                format!(
                    "at most {OTLP_HEADERS_MAX} headers (got {})",
                    self.otlp_headers.len()
                ),
            );
        }
        for (name, value) in &self.otlp_headers {
            let path = format!("log.otlp_headers.{name}");
            // RFC 9110 token characters: what an HTTP/1.1 or HTTP/2 header name may be.
            let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            if name.is_empty() || !name.chars().all(token) {
                p.push(
                    &path,
                    "is not an HTTP header name (letters, digits and - only, in practice)",
                );
            } else if name.starts_with("grpc-")
                || RESERVED_OTLP_HEADERS.contains(&name.to_ascii_lowercase().as_str())
            {
                p.push(
                    &path,
                    "is set by the exporter itself and cannot be configured",
                );
            }
            // Visible ASCII and spaces inside: what both transports can carry. Never echoed,
            // since a header value is usually a secret.
            if value.is_empty()
                || value.starts_with(' ')
                || value.ends_with(' ')
                || !value.chars().all(|c| c == ' ' || c.is_ascii_graphic())
            {
                p.push(
                    &path,
                    "value must be non-empty visible ASCII, without leading or trailing spaces",
                );
            }
        }
        if let Some(name) = &self.service_name {
            check_name(p, "log.service_name", name, SERVICE_NAME_MAX, false);
        }
        if !(0.0..=1.0).contains(&self.otlp_sample_ratio) {
            p.push(
                "log.otlp_sample_ratio",
                format!(
                    "must be between 0.0 and 1.0 (got {})",
                    self.otlp_sample_ratio
                ),
            );
        }
    }
}

/// Most headers `log.otlp_headers` may set: a collector needs one or two (an API key, a tenant).
const OTLP_HEADERS_MAX: usize = 16;

/// Headers the exporters set themselves (a configured one would clash or break the request).
const RESERVED_OTLP_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "content-encoding",
    "host",
    "te",
    "connection",
    "transfer-encoding",
    "user-agent",
];

/// An OTLP endpoint is `http://host[:port][/path]` or `https://...`: anything else would fail
/// at every export instead of once, here.
fn check_otlp_endpoint(p: &mut Problems, url: &str) {
    const PATH: &str = "log.otlp_endpoint";
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        p.push(
            PATH,
            "must be an http:// or https:// URL such as \"http://127.0.0.1:4318\"",
        );
        return;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        p.push(
            PATH,
            format!("{url:?} is not a URL with a host (e.g. \"http://127.0.0.1:4318\")"),
        );
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
            ..LogConfig::default()
        }
        .check(&mut p);
        assert!(p.into_result("x").is_ok());

        let mut p = Problems::default();
        LogConfig {
            level: "nearpath=loud".into(),
            format: LogFormat::Text,
            ..LogConfig::default()
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
    fn otlp_settings_are_checked_with_the_path_named() {
        let mut p = Problems::default();
        LogConfig {
            otlp_endpoint: Some("http://127.0.0.1:4318".into()),
            otlp_protocol: OtlpProtocol::Grpc,
            service_name: Some("edge-eu-1".into()),
            otlp_sample_ratio: 0.25,
            ..LogConfig::default()
        }
        .check(&mut p);
        assert!(p.into_result("x").is_ok());
        for (cfg, path, says) in [
            (
                LogConfig {
                    otlp_endpoint: Some("ftp://collector:4318".into()),
                    ..LogConfig::default()
                },
                "log.otlp_endpoint",
                "https:// URL",
            ),
            (
                LogConfig {
                    otlp_endpoint: Some("http://collector:4318".into()),
                    otlp_ca_file: Some("ca.pem".into()),
                    ..LogConfig::default()
                },
                "log.otlp_ca_file",
                "only to an https://",
            ),
            (
                LogConfig {
                    otlp_endpoint: Some("https://collector:4318".into()),
                    otlp_headers: [("bad name".to_string(), "v".to_string())].into(),
                    ..LogConfig::default()
                },
                "log.otlp_headers.bad name",
                "not an HTTP header name",
            ),
            (
                LogConfig {
                    otlp_endpoint: Some("https://collector:4318".into()),
                    otlp_headers: [("x-api-key".to_string(), "secret\n".to_string())].into(),
                    ..LogConfig::default()
                },
                "log.otlp_headers.x-api-key",
                "visible ASCII",
            ),
            (
                LogConfig {
                    otlp_endpoint: Some("https://collector:4318".into()),
                    otlp_headers: [("Content-Type".to_string(), "text/plain".to_string())].into(),
                    ..LogConfig::default()
                },
                "log.otlp_headers.Content-Type",
                "set by the exporter",
            ),
            (
                LogConfig {
                    otlp_endpoint: Some("collector:4318".into()),
                    ..LogConfig::default()
                },
                "log.otlp_endpoint",
                "or https:// URL",
            ),
            (
                LogConfig {
                    otlp_endpoint: Some("http:///v1/traces".into()),
                    ..LogConfig::default()
                },
                "log.otlp_endpoint",
                "with a host",
            ),
            (
                LogConfig {
                    otlp_sample_ratio: 1.5,
                    ..LogConfig::default()
                },
                "log.otlp_sample_ratio",
                "between 0.0 and 1.0",
            ),
            (
                LogConfig {
                    otlp_sample_ratio: f64::NAN,
                    ..LogConfig::default()
                },
                "log.otlp_sample_ratio",
                "between 0.0 and 1.0",
            ),
            (
                LogConfig {
                    service_name: Some(" ".into()),
                    ..LogConfig::default()
                },
                "log.service_name",
                "must not be empty",
            ),
        ] {
            let mut p = Problems::default();
            cfg.check(&mut p);
            let errs = p.into_result("x").unwrap_err();
            assert_eq!(errs.errors[0].path, path);
            assert!(
                errs.errors[0].message.contains(says),
                "{}",
                errs.errors[0].message
            );
        }
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
    fn log_colour_and_protocol_names_are_the_documented_ones() {
        let cfg: LogConfig = toml::from_str(
            "color = \"never\"\notlp_protocol = \"grpc\"\notlp_endpoint = \"http://c:4317\"",
        )
        .unwrap();
        assert_eq!(cfg.color, LogColor::Never);
        assert_eq!(cfg.otlp_protocol, OtlpProtocol::Grpc);
        let cfg: LogConfig = toml::from_str("otlp_protocol = \"http/protobuf\"").unwrap();
        assert_eq!(cfg.otlp_protocol, OtlpProtocol::HttpProtobuf);
        assert!(toml::from_str::<LogConfig>("color = \"sometimes\"").is_err());
        assert!(toml::from_str::<LogConfig>("otlp_protocol = \"http/json\"").is_err());
    }

    #[test]
    fn secrets_are_never_echoed() {
        let mut p = Problems::default();
        check_secret(&mut p, "admin.token", "hunter2 \n");
        let errs = p.into_result("x").unwrap_err();
        assert!(!errs.to_string().contains("hunter2"));
    }
}
