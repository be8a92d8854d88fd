//! Certificates for the gateway's QUIC endpoint and HTTPS listener, on top of the protocol
//! crate's TLS helpers.

use nearpath_config::{ConfigError, GatewayConfig};
use nearpath_protocol::tls::{cert_sha256, load_certs, load_private_key, sha256_hex, TlsError};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;

/// A certificate chain with its private key, and the SHA-256 of the end-entity certificate
/// (what nodes pin with `gateway.pinned_cert_sha256`).
pub struct CertPair {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub sha256: [u8; 32],
    /// The end-entity certificate as PEM (clients may trust it as a CA file).
    pub cert_pem: Option<String>,
}

impl Clone for CertPair {
    fn clone(&self) -> Self {
        CertPair {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            sha256: self.sha256,
            cert_pem: self.cert_pem.clone(),
        }
    }
}

impl CertPair {
    pub fn sha256_hex(&self) -> String {
        sha256_hex(&self.sha256)
    }
}

/// Loads a PEM certificate chain and private key; errors name the file.
pub fn load_pem(cert_file: &Path, key_file: &Path) -> Result<CertPair, TlsError> {
    let chain = load_certs(cert_file)?;
    let key = load_private_key(key_file)?;
    let sha256 = cert_sha256(chain[0].as_ref());
    let cert_pem = std::fs::read_to_string(cert_file).ok();
    Ok(CertPair {
        chain,
        key,
        sha256,
        cert_pem,
    })
}

/// The QUIC certificate `gateway run` serves with, from `quic.cert_file` and `quic.key_file`.
/// The one place that decides about it: [`crate::Gateway::load`] and
/// [`crate::preflight::preflight`] (so `gateway check-config`) both call it, and a change to what
/// happens without a configured certificate belongs here. Errors name the key they concern.
pub fn quic_certificate(config: &GatewayConfig) -> Result<CertPair, Vec<ConfigError>> {
    match (&config.quic.cert_file, &config.quic.key_file) {
        (Some(cert), Some(key)) => load_pair(("quic.cert_file", cert), ("quic.key_file", key)),
        (cert, key) => Err([
            ("quic.cert_file", cert.is_none()),
            ("quic.key_file", key.is_none()),
        ]
        .into_iter()
        .filter(|(_, missing)| *missing)
        .map(|(path, _)| {
            ConfigError::new(
                path,
                "required (nodes verify the gateway by this certificate)",
            )
        })
        .collect()),
    }
}

/// The HTTPS listener's certificate, when `http.tls_cert_file` and `http.tls_key_file` are set.
pub fn http_certificate(config: &GatewayConfig) -> Result<Option<CertPair>, Vec<ConfigError>> {
    match (&config.http.tls_cert_file, &config.http.tls_key_file) {
        (Some(cert), Some(key)) => {
            load_pair(("http.tls_cert_file", cert), ("http.tls_key_file", key)).map(Some)
        }
        // Validation refuses one without the other.
        _ => Ok(None),
    }
}

/// Loads a certificate chain and its key, each problem at the key naming the file.
fn load_pair(
    (cert_key, cert_file): (&str, &Path),
    (key_key, key_file): (&str, &Path),
) -> Result<CertPair, Vec<ConfigError>> {
    let chain = load_certs(cert_file).map_err(|e| ConfigError::new(cert_key, e.to_string()));
    let key = load_private_key(key_file).map_err(|e| ConfigError::new(key_key, e.to_string()));
    match (chain, key) {
        (Ok(chain), Ok(key)) => {
            let sha256 = cert_sha256(chain[0].as_ref());
            let cert_pem = std::fs::read_to_string(cert_file).ok();
            Ok(CertPair {
                chain,
                key,
                sha256,
                cert_pem,
            })
        }
        (chain, key) => Err([chain.err(), key.err()].into_iter().flatten().collect()),
    }
}

/// A fresh self-signed certificate for the given DNS names / IP literals (demo and tests).
pub fn self_signed(names: &[&str]) -> Result<CertPair, TlsError> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let s = nearpath_protocol::tls::self_signed(&names)?;
    Ok(CertPair {
        chain: vec![s.cert],
        key: s.key,
        sha256: s.sha256,
        cert_pem: Some(s.cert_pem),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_round_trips_through_pem_files() {
        let names = vec!["localhost".to_string()];
        let s = nearpath_protocol::tls::self_signed(&names).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, &s.cert_pem).unwrap();
        std::fs::write(&key, &s.key_pem).unwrap();
        let loaded = load_pem(&cert, &key).unwrap();
        assert_eq!(loaded.sha256, s.sha256);
        assert_eq!(loaded.chain, vec![s.cert]);
    }

    #[test]
    fn missing_and_garbage_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "hello").unwrap();
        let err = load_pem(&garbage, &garbage).err().unwrap().to_string();
        assert!(err.contains("garbage.pem"), "{err}");
        let err = load_pem(&dir.path().join("nope.pem"), &garbage)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("nope.pem"), "{err}");
    }
}
