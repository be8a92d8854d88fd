//! The gateway's own QUIC certificate: the configured `quic.cert_file`/`quic.key_file`, or a
//! self-signed pair that `gateway run` creates once in `quic.generated_cert_dir` (by default the
//! folder of the SQLite file) and reuses on every later start.
//!
//! Nodes pin the certificate's SHA-256, so a certificate that changed behind an operator's back
//! disconnects every node. Hence the rules: an existing file is never overwritten or regenerated,
//! whatever state it is in; a corrupt or unreadable file, a key without its certificate (or the
//! reverse) and a key that does not match its certificate are errors naming the file and what to
//! do, never a reason to create a new pair.

use crate::tls::{load_pem, CertPair};
use nearpath_config::GatewayConfig;
use nearpath_protocol::tls::{cert_sha256, load_certs, sha256_hex, TlsError};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The file name of a generated certificate (PEM).
pub const GENERATED_CERT_FILE: &str = "quic-cert.pem";
/// The file name of a generated private key (PEM, PKCS#8).
pub const GENERATED_KEY_FILE: &str = "quic-key.pem";

/// Why the gateway's certificate could not be loaded or created. Each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "{key} exists without its certificate {cert}: restore the certificate, or remove the key \
         to have a new pair created (a new certificate has a new pin: update every node)"
    )]
    KeyWithoutCert { key: PathBuf, cert: PathBuf },
    #[error(
        "{cert} exists without its private key {key}: restore the key, or remove the \
         certificate to have a new pair created (a new certificate has a new pin: update every \
         node)"
    )]
    CertWithoutKey { cert: PathBuf, key: PathBuf },
    #[error("the private key {key} does not belong to the certificate {cert}: {detail}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
    #[error("cannot inspect {path}: {source}")]
    Inspect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; it is never overwritten (remove it first to replace it)")]
    Exists { path: PathBuf },
}

/// Where the certificate in use came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertOrigin {
    /// `quic.cert_file` and `quic.key_file`.
    Configured,
    /// A self-signed pair an earlier start created.
    Reused,
    /// A self-signed pair created by this call.
    Created,
}

impl CertOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            CertOrigin::Configured => "configured",
            CertOrigin::Reused => "reused",
            CertOrigin::Created => "created",
        }
    }
}

/// The certificate files the gateway serves with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub origin: CertOrigin,
}

/// A loaded certificate and where its files are.
pub struct QuicCert {
    pub pair: CertPair,
    pub files: CertFiles,
}

/// The folder generated certificates live in: `quic.generated_cert_dir`, else the folder of
/// `store.path` (the working directory for a bare file name).
pub fn generated_dir(config: &GatewayConfig) -> PathBuf {
    if let Some(dir) = &config.quic.generated_cert_dir {
        return dir.clone();
    }
    match config.store.path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The names a generated certificate carries: `localhost` and the host of
/// `federation.public_quic_address`. Nodes that pin the certificate ignore them; they matter only
/// to a client that verifies names against a CA-less self-signed certificate.
pub fn generated_names(config: &GatewayConfig) -> Vec<String> {
    let mut names = vec!["localhost".to_string()];
    if let Some(addr) = &config.federation.public_quic_address {
        let host = match addr.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
            None => addr.as_str(),
        };
        if !host.is_empty() && !names.iter().any(|n| n == host) {
            names.push(host.to_string());
        }
    }
    names
}

/// The gateway's QUIC certificate as `gateway run` finds it: the configured files, or the
/// generated pair in [`generated_dir`], created when neither of its files exists.
pub fn quic_cert(config: &GatewayConfig) -> Result<QuicCert, CertError> {
    match (&config.quic.cert_file, &config.quic.key_file) {
        (Some(cert), Some(key)) => Ok(QuicCert {
            pair: load_checked(cert, key)?,
            files: CertFiles {
                cert_file: cert.clone(),
                key_file: key.clone(),
                origin: CertOrigin::Configured,
            },
        }),
        // Configuration validation refuses one file without the other; a pair in the state
        // directory is what the operator gets for setting neither.
        _ => load_or_create(&generated_dir(config), &generated_names(config)),
    }
}

/// What [`quic_cert`] would find, without creating anything (`gateway check-config`): the
/// configured or already generated certificate, `None` when the generated pair does not exist
/// yet (the first `gateway run` creates it), or the error `gateway run` would stop with.
pub fn inspect(config: &GatewayConfig) -> Result<Option<QuicCert>, CertError> {
    if config.quic.cert_file.is_some() && config.quic.key_file.is_some() {
        return quic_cert(config).map(Some);
    }
    let dir = generated_dir(config);
    let cert_file = dir.join(GENERATED_CERT_FILE);
    let key_file = dir.join(GENERATED_KEY_FILE);
    if !exists(&cert_file)? && !exists(&key_file)? {
        return Ok(None);
    }
    load_or_create(&dir, &generated_names(config)).map(Some)
}

/// Loads the self-signed pair in `dir`, or creates it when neither file exists.
pub fn load_or_create(dir: &Path, names: &[String]) -> Result<QuicCert, CertError> {
    let cert_file = dir.join(GENERATED_CERT_FILE);
    let key_file = dir.join(GENERATED_KEY_FILE);
    match (exists(&cert_file)?, exists(&key_file)?) {
        (true, true) => Ok(QuicCert {
            pair: load_checked(&cert_file, &key_file)?,
            files: CertFiles {
                cert_file,
                key_file,
                origin: CertOrigin::Reused,
            },
        }),
        (false, false) => create(dir, names),
        (false, true) => Err(CertError::KeyWithoutCert {
            key: key_file,
            cert: cert_file,
        }),
        (true, false) => Err(CertError::CertWithoutKey {
            cert: cert_file,
            key: key_file,
        }),
    }
}

/// Creates a self-signed pair for `names` in `dir` (created if missing): `quic-key.pem` and
/// `quic-cert.pem`, both mode 0600. Refuses if either file exists.
pub fn create(dir: &Path, names: &[String]) -> Result<QuicCert, CertError> {
    let cert_file = dir.join(GENERATED_CERT_FILE);
    let key_file = dir.join(GENERATED_KEY_FILE);
    for path in [&cert_file, &key_file] {
        if exists(path)? {
            return Err(CertError::Exists { path: path.clone() });
        }
    }
    create_dir(dir)?;
    let s = nearpath_protocol::tls::self_signed(names)?;
    write_new(&key_file, s.key_pem.as_bytes())?;
    if let Err(e) = write_new(&cert_file, s.cert_pem.as_bytes()) {
        // The key was written by this call a moment ago: without its certificate it would only
        // block the next start.
        let _ = std::fs::remove_file(&key_file);
        return Err(e);
    }
    Ok(QuicCert {
        pair: CertPair {
            chain: vec![s.cert],
            key: s.key,
            sha256: s.sha256,
            cert_pem: Some(s.cert_pem),
        },
        files: CertFiles {
            cert_file,
            key_file,
            origin: CertOrigin::Created,
        },
    })
}

/// The pin of the first (end-entity) certificate in a PEM file: SHA-256 of its DER, lowercase
/// hex, the form nodes' `pinned_cert_sha256` takes.
pub fn pin_of_file(path: &Path) -> Result<String, TlsError> {
    let chain = load_certs(path)?;
    Ok(sha256_hex(&cert_sha256(chain[0].as_ref())))
}

/// Loads a certificate and key and checks that the key is the certificate's: a mismatch would
/// otherwise only show as failed handshakes.
fn load_checked(cert_file: &Path, key_file: &Path) -> Result<CertPair, CertError> {
    let pair = load_pem(cert_file, key_file)?;
    let provider = nearpath_protocol::tls::provider();
    rustls::sign::CertifiedKey::from_der(pair.chain.clone(), pair.key.clone_key(), &provider)
        .map_err(|e| CertError::Mismatch {
            cert: cert_file.to_path_buf(),
            key: key_file.to_path_buf(),
            detail: e.to_string(),
        })?;
    warn_if_readable_by_others(key_file);
    Ok(pair)
}

#[cfg(unix)]
fn warn_if_readable_by_others(key_file: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(key_file) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %key_file.display(),
                mode = format!("{mode:o}"),
                "the QUIC private key is readable by other users (chmod 600 it)"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_key_file: &Path) {}

/// Whether something is at `path` (a dangling link counts: it is the operator's, not ours to
/// replace). Errors other than "not found" (a folder that cannot be searched) are errors.
fn exists(path: &Path) -> Result<bool, CertError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CertError::Inspect {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| CertError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes `contents` to a new file at `path`, mode 0600, never replacing an existing one: the
/// bytes go to a temporary file in the same folder (created 0600), are synced, and are then
/// linked to `path`, which fails if `path` exists. A crash leaves no half-written `path`.
fn write_new(path: &Path, contents: &[u8]) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".nearpath-cert-")
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.write_all(contents).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist_noclobber(path).map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            err(e.error)
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["localhost".to_string()]
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_generated_pair_is_created_once_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = load_or_create(&state, &names()).unwrap();
        assert_eq!(first.files.origin, CertOrigin::Created);
        assert_eq!(first.files.cert_file, state.join(GENERATED_CERT_FILE));
        #[cfg(unix)]
        {
            assert_eq!(mode(&first.files.cert_file), 0o600);
            assert_eq!(mode(&first.files.key_file), 0o600);
        }
        let cert_bytes = std::fs::read(&first.files.cert_file).unwrap();
        let second = load_or_create(&state, &names()).unwrap();
        assert_eq!(second.files.origin, CertOrigin::Reused);
        assert_eq!(second.pair.sha256, first.pair.sha256);
        assert_eq!(std::fs::read(&second.files.cert_file).unwrap(), cert_bytes);
        assert_eq!(
            pin_of_file(&first.files.cert_file).unwrap(),
            first.pair.sha256_hex()
        );
        // No temporary file is left behind.
        let mut entries: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        entries.sort();
        assert_eq!(entries, [GENERATED_CERT_FILE, GENERATED_KEY_FILE]);
    }

    #[test]
    fn a_corrupt_certificate_is_an_error_and_is_never_regenerated() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path(), &names()).unwrap();
        std::fs::write(&first.files.cert_file, "not a certificate").unwrap();
        let err = load_or_create(dir.path(), &names())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(GENERATED_CERT_FILE), "{err}");
        assert_eq!(
            std::fs::read_to_string(&first.files.cert_file).unwrap(),
            "not a certificate"
        );
    }

    #[test]
    fn an_unreadable_certificate_is_an_error_and_is_never_regenerated() {
        let dir = tempfile::tempdir().unwrap();
        // A folder where the certificate should be cannot be read by anyone, root included.
        std::fs::create_dir(dir.path().join(GENERATED_CERT_FILE)).unwrap();
        std::fs::write(dir.path().join(GENERATED_KEY_FILE), "key").unwrap();
        let err = load_or_create(dir.path(), &names())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(GENERATED_CERT_FILE), "{err}");
        assert!(dir.path().join(GENERATED_CERT_FILE).is_dir());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(GENERATED_KEY_FILE)).unwrap(),
            "key"
        );
    }

    #[test]
    fn a_key_without_its_certificate_is_an_error_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path(), &names()).unwrap();
        std::fs::remove_file(&first.files.cert_file).unwrap();
        let key = std::fs::read(&first.files.key_file).unwrap();
        let err = load_or_create(dir.path(), &names()).err().unwrap();
        assert!(matches!(err, CertError::KeyWithoutCert { .. }), "{err}");
        assert!(err.to_string().contains(GENERATED_KEY_FILE), "{err}");
        assert_eq!(std::fs::read(&first.files.key_file).unwrap(), key);
        assert!(!first.files.cert_file.exists());
    }

    #[test]
    fn a_certificate_without_its_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path(), &names()).unwrap();
        std::fs::remove_file(&first.files.key_file).unwrap();
        let err = load_or_create(dir.path(), &names()).err().unwrap();
        assert!(matches!(err, CertError::CertWithoutKey { .. }), "{err}");
        assert!(!first.files.key_file.exists());
    }

    #[test]
    fn a_key_of_another_certificate_is_a_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(&dir.path().join("a"), &names()).unwrap();
        let b = load_or_create(&dir.path().join("b"), &names()).unwrap();
        std::fs::copy(&b.files.key_file, &a.files.key_file).unwrap();
        let err = load_or_create(&dir.path().join("a"), &names())
            .err()
            .unwrap();
        assert!(matches!(err, CertError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn create_never_overwrites_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(GENERATED_CERT_FILE), "mine").unwrap();
        let err = create(dir.path(), &names()).err().unwrap();
        assert!(matches!(err, CertError::Exists { .. }), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join(GENERATED_CERT_FILE)).unwrap(),
            "mine"
        );
        assert!(!dir.path().join(GENERATED_KEY_FILE).exists());
    }

    #[test]
    fn configured_files_are_used_and_the_state_dir_defaults_to_the_store_folder() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = GatewayConfig::default();
        assert_eq!(generated_dir(&cfg), PathBuf::from("."));
        cfg.store.path = dir.path().join("gateway.db");
        assert_eq!(generated_dir(&cfg), dir.path());
        let made = quic_cert(&cfg).unwrap();
        assert_eq!(made.files.origin, CertOrigin::Created);
        cfg.quic.cert_file = Some(made.files.cert_file.clone());
        cfg.quic.key_file = Some(made.files.key_file.clone());
        let configured = quic_cert(&cfg).unwrap();
        assert_eq!(configured.files.origin, CertOrigin::Configured);
        assert_eq!(configured.pair.sha256, made.pair.sha256);
        cfg.federation.public_quic_address = Some("[2001:db8::1]:4433".into());
        assert_eq!(generated_names(&cfg), ["localhost", "2001:db8::1"]);
    }

    #[test]
    fn inspect_creates_nothing_and_reports_what_run_would() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = GatewayConfig::default();
        cfg.quic.generated_cert_dir = Some(dir.path().join("state"));
        assert!(inspect(&cfg).unwrap().is_none());
        assert!(!dir.path().join("state").exists());
        let made = quic_cert(&cfg).unwrap();
        let seen = inspect(&cfg).unwrap().unwrap();
        assert_eq!(seen.pair.sha256, made.pair.sha256);
        assert_eq!(seen.files.origin, CertOrigin::Reused);
        std::fs::remove_file(&made.files.cert_file).unwrap();
        let err = inspect(&cfg).err().unwrap();
        assert!(matches!(err, CertError::KeyWithoutCert { .. }), "{err}");
        assert!(!made.files.cert_file.exists());
    }

    #[test]
    fn pin_of_a_file_without_a_certificate_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key-only.pem");
        std::fs::write(
            &f,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = pin_of_file(&f).unwrap_err().to_string();
        assert!(err.contains("key-only.pem"), "{err}");
    }
}
