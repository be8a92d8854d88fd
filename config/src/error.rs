//! Configuration errors: every problem names the key path, and the loaders add the file and line.

use std::fmt;

/// One problem with a configuration: the key path it concerns and what is wrong.
///
/// The blame is always the configuration's author, and retrying does not help: the file (or the
/// `NEARPATH_*` environment variable the message names) has to be changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Key path in TOML terms, e.g. `geofence.rules[2].deny_client_countries[1]`. Empty when the
    /// problem concerns the whole file (it cannot be read, or is not TOML).
    pub path: String,
    /// What is wrong, naming the offending value.
    pub message: String,
    /// 1-based line in the file where `path` is written, when the loader could find it (values
    /// that come from defaults or from the environment have none).
    pub line: Option<usize>,
    /// 1-based column (in characters) of the same place, set together with `line`.
    pub column: Option<usize>,
}

impl ConfigError {
    /// A problem at `path`, with no line number (the loaders fill it in).
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            line: None,
            column: None,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one configuration, never just the first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// Where the configuration came from: the file path for the loaders, a caller-chosen name for
    /// the `parse_*` functions, `<built-in>` for [`crate::GatewayConfig::validate`] and friends.
    pub origin: String,
    /// The problems, in the order they were found (at least one).
    pub errors: Vec<ConfigError>,
}

impl ConfigErrors {
    /// Errors found in `origin`.
    pub fn new(origin: impl Into<String>, errors: Vec<ConfigError>) -> Self {
        Self {
            origin: origin.into(),
            errors,
        }
    }

    /// Whether any error concerns exactly `path`.
    pub fn has_path(&self, path: &str) -> bool {
        self.errors.iter().any(|e| e.path == path)
    }
}

impl fmt::Display for ConfigErrors {
    /// One line per error: `origin:line:column: path: message`, the way compilers write it so
    /// that editors jump there (`origin:line: ...` without a column, `origin: ...` without a
    /// line).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            match (e.line, e.column) {
                (Some(line), Some(column)) => {
                    write!(f, "{}:{}:{}: {}", self.origin, line, column, e)?
                }
                (Some(line), None) => write!(f, "{}:{}: {}", self.origin, line, e)?,
                (None, _) => write!(f, "{}: {}", self.origin, e)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects problems during validation so that one run reports all of them.
#[derive(Debug, Default)]
pub(crate) struct Problems {
    errors: Vec<ConfigError>,
}

impl Problems {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::new(path, message));
    }

    /// Adds problems found outside this crate (files the configuration names, say).
    pub(crate) fn extend(&mut self, errors: impl IntoIterator<Item = ConfigError>) {
        self.errors.extend(errors);
    }

    /// Records `message` at `path` unless `value > 0`.
    pub(crate) fn positive<T: PartialOrd + Default + fmt::Display>(
        &mut self,
        path: &str,
        value: T,
    ) {
        if value <= T::default() {
            self.push(path, format!("must be greater than 0 (got {value})"));
        }
    }

    /// Records a problem unless `value` is finite and greater than 0.
    pub(crate) fn positive_finite(&mut self, path: &str, value: f64) {
        if !(value.is_finite() && value > 0.0) {
            self.push(
                path,
                format!("must be a finite number greater than 0 (got {value})"),
            );
        }
    }

    /// Records a problem unless `value` is finite and at least 0.
    pub(crate) fn non_negative_finite(&mut self, path: &str, value: f64) {
        if !(value.is_finite() && value >= 0.0) {
            self.push(
                path,
                format!("must be a finite number, 0 or more (got {value})"),
            );
        }
    }

    pub(crate) fn into_result(self, origin: &str) -> Result<(), ConfigErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors::new(origin, self.errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_prefixes_every_line_with_origin_and_line() {
        let mut a = ConfigError::new("http.listen", "bad");
        a.line = Some(3);
        let errs = ConfigErrors::new(
            "gw.toml",
            vec![
                a,
                ConfigError::new("admin.token", "required"),
                ConfigError::new("", "io"),
            ],
        );
        assert_eq!(
            errs.to_string(),
            "gw.toml:3: http.listen: bad\ngw.toml: admin.token: required\ngw.toml: io"
        );
        assert!(errs.has_path("admin.token"));
        assert!(!errs.has_path("admin"));
    }

    #[test]
    fn display_adds_the_column_when_known() {
        let mut a = ConfigError::new("quic.cert_file", "missing");
        a.line = Some(7);
        a.column = Some(3);
        let errs = ConfigErrors::new("/etc/nearpath/gateway.toml", vec![a]);
        assert_eq!(
            errs.to_string(),
            "/etc/nearpath/gateway.toml:7:3: quic.cert_file: missing"
        );
    }

    #[test]
    fn numeric_checks() {
        let mut p = Problems::default();
        p.positive("a", 0u64);
        p.positive("b", 1u64);
        p.positive_finite("c", f64::NAN);
        p.positive_finite("d", 0.5);
        p.non_negative_finite("e", -1.0);
        p.non_negative_finite("f", 0.0);
        let errs = p.into_result("x").unwrap_err();
        let paths: Vec<_> = errs.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a", "c", "e"]);
        assert_eq!(errs.errors[0].message, "must be greater than 0 (got 0)");
    }
}
