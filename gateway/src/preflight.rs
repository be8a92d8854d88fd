//! What `gateway run` checks before it serves, beyond the configuration file itself: the
//! files and databases the configuration names. `gateway run` and `gateway check-config` both
//! load the file through [`nearpath_config::load_gateway_checked`] with [`preflight`], so a file
//! one accepts the other accepts too, and every problem of both kinds is reported at once, each
//! at the key (file, line and column) it concerns.

use crate::registry::Registry;
use crate::router::RouteParams;
use nearpath_config::{ConfigError, GatewayConfig};
use nearpath_geo::{GeoDb, Policy};
use nearpath_protocol::{ALPN_CLIENT, ALPN_NODE};
use std::io::Read as _;
use std::path::Path;

/// The first bytes of every SQLite 3 database file.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Everything `gateway run` would refuse before serving, beyond the file's own validation: the
/// QUIC and HTTPS certificates and keys load and fit together, the GeoIP databases open, the
/// geofence compiles, the routing parameters build, the SQLite store can be opened or created,
/// the federation's directory entry is one the store accepts. Creates, binds and dials nothing:
/// a PostgreSQL store is not connected to (a database being down is not a configuration error;
/// `run` reports it), and listeners are not bound (a port in use is found by `run`).
pub fn preflight(config: &GatewayConfig) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    // Without configured files, `run` uses (or creates) the self-signed pair of the state
    // directory: a missing pair is fine, a broken one is an error, and nothing is created here.
    let configured = config.quic.cert_file.is_some() || config.quic.key_file.is_some();
    let quic_sha256 = if !configured {
        match crate::cert::inspect(config) {
            Ok(Some(found)) => found.pair.sha256_hex(),
            Ok(None) => "0".repeat(64),
            Err(e) => {
                errors.push(ConfigError::new("quic.generated_cert_dir", e.to_string()));
                "0".repeat(64)
            }
        }
    } else {
        match crate::tls::quic_certificate(config) {
            Ok(pair) => {
                let transport = nearpath_protocol::tls::TransportOptions::default();
                let sha256 = pair.sha256_hex();
                if let Err(e) = nearpath_protocol::tls::server_config(
                    pair.chain,
                    pair.key,
                    &[ALPN_NODE, ALPN_CLIENT],
                    &transport,
                ) {
                    errors.push(ConfigError::new(
                        "quic.key_file",
                        format!("cannot serve QUIC with this certificate and key: {e}"),
                    ));
                }
                sha256
            }
            Err(found) => {
                errors.extend(found);
                "0".repeat(64)
            }
        }
    };
    match crate::tls::http_certificate(config) {
        Ok(Some(pair)) => {
            if let Err(e) = crate::api::tls_acceptor(pair) {
                errors.push(ConfigError::new(
                    "http.tls_key_file",
                    format!("cannot serve HTTPS with this certificate and key: {e}"),
                ));
            }
        }
        Ok(None) => {}
        Err(found) => errors.extend(found),
    }
    if let Err(e) = GeoDb::open(&config.geo) {
        let shown = e.to_string();
        let anonymous = config
            .geo
            .anonymous_ip_database
            .as_ref()
            .is_some_and(|p| shown.contains(&p.display().to_string()));
        let path = if anonymous {
            "geo.anonymous_ip_database"
        } else {
            "geo.database"
        };
        errors.push(ConfigError::new(path, shown));
    }
    if let Err(e) = nearpath_telemetry::check_export(&config.log) {
        errors.push(ConfigError::new("log.otlp_ca_file", e.to_string()));
    }
    if let Err(e) = Policy::compile(&config.geofence) {
        errors.push(ConfigError::new("geofence", e.to_string()));
    }
    if let Err(e) = Registry::new(RouteParams::from(&config.routing)) {
        errors.push(ConfigError::new("routing", e.to_string()));
    }
    if config.store.url.is_none() {
        if let Err(message) = check_sqlite_path(&config.store.path) {
            errors.push(ConfigError::new("store.path", message));
        }
    }
    if let (Some(_), Some(ca)) = (&config.store.url, &config.store.ca_file) {
        if let Err(message) = crate::store::pg::tls::PgTls::new(Some(ca)) {
            errors.push(ConfigError::new("store.ca_file", message));
        }
    }
    // The entry `run` writes to the gateway directory, with the configured listeners standing
    // in for the bound ones (the same unless a port is 0).
    let me = crate::federation::directory::SelfInfo::new(
        config,
        config.quic.listen,
        config.http.listen,
        quic_sha256,
        0,
    );
    if let Err(e) = crate::store::directory::check_gateway_record(&me.record(0, 1)) {
        errors.push(ConfigError::new("federation", e.to_string()));
    }
    errors
}

/// Whether the SQLite store at `path` can be opened, or created, by `run`: an existing file
/// must be an SQLite database we may write; a missing one needs an existing folder. Either way
/// SQLite writes its journal next to the database, so the folder must take new files. Nothing
/// is left behind.
fn check_sqlite_path(path: &Path) -> Result<(), String> {
    let shown = path.display();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            return Err(format!(
                "{shown} is a directory; the store is a database file"
            ))
        }
        Ok(_) => {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| format!("cannot open {shown} for writing: {e}"))?;
            let mut head = Vec::with_capacity(SQLITE_MAGIC.len());
            (&mut file)
                .take(SQLITE_MAGIC.len() as u64)
                .read_to_end(&mut head)
                .map_err(|e| format!("cannot read {shown}: {e}"))?;
            // An empty file is what SQLite itself makes of a new database.
            if !head.is_empty() && head != SQLITE_MAGIC {
                return Err(format!("{shown} is not an SQLite database"));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !dir.is_dir() {
                return Err(format!(
                    "the folder {} does not exist (the gateway creates the database file, not \
                     its folder)",
                    dir.display()
                ));
            }
        }
        Err(e) => return Err(format!("cannot read {shown}: {e}")),
    }
    // Probe with a file of our own rather than trusting permission bits (ACLs, read-only
    // mounts, running as another user).
    let probe = dir.join(format!(".nearpath-check-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!(
            "cannot create files in {} (the database and its journal live there): {e}",
            dir.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configured(dir: &Path) -> GatewayConfig {
        let s = nearpath_protocol::tls::self_signed(&["localhost".to_string()]).unwrap();
        std::fs::write(dir.join("cert.pem"), &s.cert_pem).unwrap();
        std::fs::write(dir.join("key.pem"), &s.key_pem).unwrap();
        let mut cfg = GatewayConfig::default();
        cfg.admin.token = Some("0123456789abcdef0123".into());
        cfg.quic.cert_file = Some(dir.join("cert.pem"));
        cfg.quic.key_file = Some(dir.join("key.pem"));
        cfg.store.path = dir.join("gw.db");
        cfg
    }

    fn paths(errors: &[ConfigError]) -> Vec<&str> {
        errors.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn a_runnable_configuration_passes_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = configured(dir.path());
        assert_eq!(preflight(&cfg), Vec::new());
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["cert.pem", "key.pem"]);
    }

    #[test]
    fn every_unusable_file_is_reported_at_once_at_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = configured(dir.path());
        cfg.quic.cert_file = Some(dir.path().join("missing.pem"));
        std::fs::write(dir.path().join("garbage.pem"), "hello").unwrap();
        cfg.quic.key_file = Some(dir.path().join("garbage.pem"));
        cfg.http.tls_cert_file = Some(dir.path().to_path_buf());
        cfg.http.tls_key_file = Some(dir.path().join("key.pem"));
        cfg.geo.database = Some(dir.path().join("nope.mmdb"));
        cfg.store.path = dir.path().join("no-such-folder/gw.db");
        let errors = preflight(&cfg);
        assert_eq!(
            paths(&errors),
            [
                "quic.cert_file",
                "quic.key_file",
                "http.tls_cert_file",
                "geo.database",
                "store.path"
            ],
            "{errors:#?}"
        );
        assert!(errors[0].message.contains("missing.pem"), "{errors:#?}");
        assert!(errors[4].message.contains("no-such-folder"), "{errors:#?}");
    }

    #[test]
    fn an_otlp_ca_file_run_could_not_read_is_refused_at_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = configured(dir.path());
        cfg.log.otlp_endpoint = Some("https://collector.internal:4318".into());
        cfg.log.otlp_ca_file = Some(dir.path().join("collector-ca.pem"));
        let errors = preflight(&cfg);
        assert_eq!(paths(&errors), ["log.otlp_ca_file"]);
        assert!(errors[0].message.contains("collector-ca.pem"), "{errors:?}");
        // The QUIC certificate is a PEM certificate: as a CA file it is accepted.
        cfg.log.otlp_ca_file = cfg.quic.cert_file.clone();
        assert_eq!(preflight(&cfg), Vec::new());
    }

    #[test]
    fn a_key_that_does_not_fit_the_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = configured(dir.path());
        let other = nearpath_protocol::tls::self_signed(&["localhost".to_string()]).unwrap();
        std::fs::write(dir.path().join("other-key.pem"), &other.key_pem).unwrap();
        cfg.quic.key_file = Some(dir.path().join("other-key.pem"));
        assert_eq!(paths(&preflight(&cfg)), ["quic.key_file"]);
    }

    #[test]
    fn the_store_path_must_be_a_writable_sqlite_file_or_creatable() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = configured(dir.path());
        cfg.store.path = dir.path().to_path_buf();
        assert!(preflight(&cfg)[0].message.contains("is a directory"));
        std::fs::write(dir.path().join("text.db"), "not a database at all").unwrap();
        cfg.store.path = dir.path().join("text.db");
        assert!(preflight(&cfg)[0]
            .message
            .ends_with("is not an SQLite database"));
        // A database the store made is fine.
        let db = dir.path().join("real.db");
        drop(crate::store::SqliteStore::open(&db).unwrap());
        cfg.store.path = db;
        assert_eq!(preflight(&cfg), Vec::new());
        // PostgreSQL is not dialled.
        cfg.store.path = dir.path().join("no-such-folder/gw.db");
        cfg.store.url = Some("postgres://u@127.0.0.1:1/db".into());
        assert_eq!(preflight(&cfg), Vec::new());
    }
}
