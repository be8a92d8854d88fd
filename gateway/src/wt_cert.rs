//! The certificate WebTransport connections get, and the TLS certificate choice by ALPN.
//!
//! Browsers connect to the gateway's QUIC port with `serverCertificateHashes`, which Chrome
//! only honours for an ECDSA P-256 certificate valid for at most 14 days. The gateway's main
//! QUIC certificate is pinned by nodes and must never change, so a ClientHello offering `h3`
//! gets a second, self-signed certificate made here ([`WtCerts`]), and everything else the main
//! one ([`AlpnCertResolver`]). The WebTransport certificate is replaced when less than half of
//! its validity remains: new connections get the new one at once, and `GET /v1/webtransport`
//! lists the previous one's hash too while it is still valid (a page that fetched the list just
//! before the swap still connects).

use crate::clock::SharedClock;
use arc_swap::ArcSwap;
use nearpath_protocol::tls::{cert_sha256, sha256_hex};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::sync::Arc;
use std::time::Duration;

/// The ALPN of HTTP/3, which WebTransport runs on.
pub const ALPN_H3: &[u8] = b"h3";

/// How far before "now" a new certificate's validity starts: a browser whose clock is a little
/// behind the gateway's must not see a certificate from the future.
const NOT_BEFORE_SLACK: Duration = Duration::from_secs(3600);

const DAY_MS: u64 = 24 * 3600 * 1000;

/// Why a WebTransport certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum WtCertError {
    #[error("generating the WebTransport certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the WebTransport certificate's key: {0}")]
    Key(#[from] rustls::Error),
    #[error("the WebTransport certificate's validity: {0}")]
    Time(String),
}

/// One WebTransport certificate with its key, as TLS serves it.
pub struct WtCert {
    pub certified: Arc<CertifiedKey>,
    /// SHA-256 of the DER certificate: what a page passes as `serverCertificateHashes`.
    pub sha256: [u8; 32],
    /// Validity, in Unix milliseconds (`not_before` is already `NOT_BEFORE_SLACK` in the past
    /// when it is made).
    pub not_before_unix_ms: u64,
    pub not_after_unix_ms: u64,
    /// The DER certificate (tests parse it).
    pub der: CertificateDer<'static>,
}

impl WtCert {
    /// A new self-signed ECDSA P-256 certificate for `localhost`, valid from an hour before
    /// `now_unix_ms` for `validity_days` days in all (browsers measure the whole span from
    /// not-before to not-after against their 14-day limit).
    pub fn generate(now_unix_ms: u64, validity_days: u32) -> Result<WtCert, WtCertError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
        let not_before_ms = now_unix_ms.saturating_sub(NOT_BEFORE_SLACK.as_millis() as u64);
        let not_after_ms = not_before_ms + u64::from(validity_days) * DAY_MS;
        params.not_before = offset_date_time(not_before_ms)?;
        params.not_after = offset_date_time(not_after_ms)?;
        let cert = params.self_signed(&key)?;
        let der = cert.der().clone();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)?;
        Ok(WtCert {
            certified: Arc::new(CertifiedKey::new(vec![der.clone()], signing)),
            sha256: cert_sha256(der.as_ref()),
            // Whole seconds: that is what the certificate says.
            not_before_unix_ms: not_before_ms / 1000 * 1000,
            not_after_unix_ms: not_after_ms / 1000 * 1000,
            der,
        })
    }

    pub fn sha256_hex(&self) -> String {
        sha256_hex(&self.sha256)
    }
}

fn offset_date_time(unix_ms: u64) -> Result<time::OffsetDateTime, WtCertError> {
    let secs = i64::try_from(unix_ms / 1000).map_err(|e| WtCertError::Time(e.to_string()))?;
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(|e| WtCertError::Time(e.to_string()))
}

/// The current WebTransport certificate and the one it replaced.
struct Pair {
    current: Arc<WtCert>,
    previous: Option<Arc<WtCert>>,
}

/// The gateway's rotating WebTransport certificate.
pub struct WtCerts {
    pair: ArcSwap<Pair>,
    validity_days: u32,
    clock: SharedClock,
}

/// What `GET /v1/webtransport` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WtCertInfo {
    /// SHA-256 hex of the valid certificates, the current one first.
    pub hashes: Vec<String>,
    /// When the current certificate expires, in Unix milliseconds.
    pub expires_unix_ms: u64,
}

impl WtCerts {
    /// Makes the first certificate.
    pub fn new(validity_days: u32, clock: SharedClock) -> Result<WtCerts, WtCertError> {
        let current = Arc::new(WtCert::generate(clock.unix_ms(), validity_days)?);
        Ok(WtCerts {
            pair: ArcSwap::from_pointee(Pair {
                current,
                previous: None,
            }),
            validity_days,
            clock,
        })
    }

    /// The certificate new connections get.
    pub fn current(&self) -> Arc<WtCert> {
        self.pair.load().current.clone()
    }

    /// The hashes a page may pin (the current certificate first, then the previous one while
    /// it is still valid) and the current one's expiry.
    pub fn info(&self) -> WtCertInfo {
        let now = self.clock.unix_ms();
        let pair = self.pair.load();
        let mut hashes = vec![pair.current.sha256_hex()];
        if let Some(p) = pair.previous.as_ref().filter(|p| p.not_after_unix_ms > now) {
            hashes.push(p.sha256_hex());
        }
        WtCertInfo {
            hashes,
            expires_unix_ms: pair.current.not_after_unix_ms,
        }
    }

    /// When the current certificate is due for replacement: once less than half its validity
    /// remains.
    pub fn renew_at_unix_ms(&self) -> u64 {
        let c = self.current();
        c.not_after_unix_ms
            .saturating_sub(u64::from(self.validity_days) * DAY_MS / 2)
    }

    /// Replaces the certificate if it is due ([`Self::renew_at_unix_ms`]); true if it did.
    pub fn rotate_if_due(&self) -> Result<bool, WtCertError> {
        if self.clock.unix_ms() < self.renew_at_unix_ms() {
            return Ok(false);
        }
        self.rotate()?;
        Ok(true)
    }

    /// Replaces the certificate now: new connections get the new one at once, and the current
    /// one becomes the previous (still listed while valid).
    pub fn rotate(&self) -> Result<(), WtCertError> {
        let next = Arc::new(WtCert::generate(self.clock.unix_ms(), self.validity_days)?);
        let old = self.current();
        self.pair.store(Arc::new(Pair {
            current: next,
            previous: Some(old),
        }));
        Ok(())
    }

    /// Renews the certificate when due, until `shutdown`. It checks at least hourly, so a
    /// suspended machine or a clock step is caught up with soon after.
    pub async fn rotation_loop(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            match self.rotate_if_due() {
                Ok(true) => tracing::info!(
                    cert_sha256 = %self.current().sha256_hex(),
                    "new WebTransport certificate"
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "WebTransport certificate not renewed"),
            }
            let wait_ms = self
                .renew_at_unix_ms()
                .saturating_sub(self.clock.unix_ms())
                .clamp(1000, 3600 * 1000);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// Picks the certificate by the ClientHello's ALPN: a client offering `h3` (a browser's
/// WebTransport) gets the WebTransport certificate, every other the gateway's main one.
pub struct AlpnCertResolver {
    main: Arc<CertifiedKey>,
    webtransport: Option<Arc<WtCerts>>,
}

impl std::fmt::Debug for AlpnCertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlpnCertResolver")
            .field("webtransport", &self.webtransport.is_some())
            .finish()
    }
}

impl AlpnCertResolver {
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: &PrivateKeyDer<'static>,
        webtransport: Option<Arc<WtCerts>>,
    ) -> Result<AlpnCertResolver, WtCertError> {
        let signing = rustls::crypto::ring::sign::any_supported_type(key)?;
        Ok(AlpnCertResolver {
            main: Arc::new(CertifiedKey::new(chain, signing)),
            webtransport,
        })
    }
}

impl ResolvesServerCert for AlpnCertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offers_h3 = hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == ALPN_H3));
        match &self.webtransport {
            Some(wt) if offers_h3 => Some(wt.current().certified.clone()),
            _ => Some(self.main.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    fn certs(days: u32) -> (Arc<ManualClock>, WtCerts) {
        let clock = ManualClock::new(1_800_000_000_000);
        let certs = WtCerts::new(days, clock.clone()).unwrap();
        (clock, certs)
    }

    /// Chrome's `serverCertificateHashes` rules: ECDSA P-256 and at most 14 days.
    #[test]
    fn the_certificate_is_ecdsa_p256_and_valid_for_at_most_14_days() {
        let (clock, certs) = certs(14);
        let c = certs.current();
        let (_, x509) = x509_parser::parse_x509_certificate(c.der.as_ref()).unwrap();
        let spki = &x509.tbs_certificate.subject_pki;
        assert_eq!(
            spki.algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .unwrap();
        assert_eq!(curve, x509_parser::oid_registry::OID_EC_P256);
        let v = &x509.tbs_certificate.validity;
        let nb = v.not_before.timestamp() as u64 * 1000;
        let na = v.not_after.timestamp() as u64 * 1000;
        assert!(
            na - nb <= 14 * DAY_MS,
            "{} days",
            (na - nb) as f64 / DAY_MS as f64
        );
        assert_eq!(nb, clock.unix_ms() - 3600 * 1000);
        assert_eq!(na, c.not_after_unix_ms);
        assert_eq!(c.sha256, cert_sha256(c.der.as_ref()));
    }

    #[test]
    fn rotation_swaps_the_certificate_and_keeps_the_previous_hash_listed_while_valid() {
        let (clock, certs) = certs(13);
        let first = certs.current().sha256_hex();
        assert_eq!(certs.info().hashes, vec![first.clone()]);
        // Not due before half the validity is gone.
        clock.advance(Duration::from_millis(6 * DAY_MS));
        assert!(!certs.rotate_if_due().unwrap());
        assert_eq!(certs.current().sha256_hex(), first);
        clock.advance(Duration::from_millis(DAY_MS));
        assert!(certs.rotate_if_due().unwrap());
        let second = certs.current().sha256_hex();
        assert_ne!(second, first);
        let info = certs.info();
        assert_eq!(info.hashes, vec![second.clone(), first.clone()]);
        assert_eq!(info.expires_unix_ms, certs.current().not_after_unix_ms);
        // Once the first one has expired it is no longer listed.
        clock.advance(Duration::from_millis(6 * DAY_MS + 1000));
        assert_eq!(certs.info().hashes, vec![second]);
    }

    #[test]
    fn a_client_offering_h3_gets_the_webtransport_certificate_and_others_the_main_one() {
        // Exercised end to end by tests/tests/webtransport.rs (the hash a browser pins must be
        // the one served); here only that the resolver is built from a real key.
        let main = nearpath_protocol::tls::self_signed(&["localhost".into()]).unwrap();
        let (_, certs) = certs(13);
        let r = AlpnCertResolver::new(vec![main.cert.clone()], &main.key, Some(Arc::new(certs)))
            .unwrap();
        assert_eq!(r.main.cert[0], main.cert);
    }
}
