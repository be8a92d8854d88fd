//! TLS and QUIC configuration for gateway, node and clients.
//!
//! Every rustls config here is built with the ring provider named explicitly: if another crate in
//! the build enables aws-lc-rs as well, rustls' `builder()` cannot pick a default and panics.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// How a client decides to trust the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerVerify {
    /// Verify the chain and the server name against the CA certificates in this PEM file.
    CaFile(PathBuf),
    /// Verify the chain and the server name against these PEM-encoded CA certificates.
    CaPem(Vec<u8>),
    /// Trust exactly the end-entity certificate whose DER has this SHA-256 (see
    /// [`cert_sha256`]). Name and validity dates are not checked (the pin is the trust
    /// decision), but the handshake signature is, so the server must hold the key.
    PinnedSha256([u8; 32]),
    /// Trust an end-entity certificate whose SHA-256 is any of these (a node that knows the
    /// pins of every gateway in a federation). Checked like [`ServerVerify::PinnedSha256`]; an
    /// empty list trusts nothing.
    PinnedAnySha256(Vec<[u8; 32]>),
    /// Trust any certificate; the handshake signature is still checked. For local development
    /// only: anyone on the path can impersonate the server.
    InsecureDangerous,
}

/// Errors building TLS or QUIC configuration. All are local configuration problems: fix the
/// named file or value; retrying does not help.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// PEM input could not be parsed.
    #[error("invalid PEM in {origin}: {detail}")]
    Pem {
        /// File path or "inline PEM".
        origin: String,
        /// The parser's message.
        detail: String,
    },
    /// PEM input holds no certificate.
    #[error("no certificate found in {origin}")]
    NoCertificates {
        /// File path or "inline PEM".
        origin: String,
    },
    /// A CA certificate was rejected as a trust anchor.
    #[error("CA certificate in {origin} rejected: {source}")]
    BadCa {
        /// File path or "inline PEM".
        origin: String,
        /// Why.
        source: rustls::Error,
    },
    /// rustls rejected the configuration (for example a key that does not match the
    /// certificate).
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// The rustls configuration lacks what QUIC needs (TLS 1.3 with an initial cipher suite).
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(String),
    /// A transport parameter is out of range.
    #[error("QUIC idle timeout {0:?} is out of range")]
    IdleTimeout(Duration),
    /// A flow-control window does not fit a QUIC variable-length integer.
    #[error("QUIC receive window {0} bytes is out of range")]
    Window(u64),
    /// A SHA-256 pin string is malformed.
    #[error("invalid SHA-256 pin {input:?}: {detail}")]
    BadPin {
        /// The input.
        input: String,
        /// What is wrong.
        detail: &'static str,
    },
    /// Generating a self-signed certificate failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A server presented a certificate whose SHA-256 is not the pinned one: the message an
/// operator acts on (fix the pin, or find out why the gateway's certificate changed). Retrying
/// cannot help, so nodes and clients stop dialling that server.
#[derive(Clone, PartialEq, Eq, Error)]
#[error("certificate pin mismatch: expected {}, gateway presented {}", expected_list(.expected), sha256_hex(.presented))]
pub struct PinMismatch {
    /// The pins that would have been trusted (one, or a federation's set).
    pub expected: Vec<[u8; 32]>,
    /// SHA-256 of the end-entity certificate the server presented.
    pub presented: [u8; 32],
}

/// Words that start [`PinMismatch`]'s message, found again in the handshake error's text.
const PIN_MISMATCH_MARK: &str = "certificate pin mismatch: expected ";
const PIN_MISMATCH_PRESENTED: &str = ", gateway presented ";

// rustls shows a verifier's own error only through `Debug` (inside "invalid peer certificate:
// Other(OtherError(..))"), so `Debug` is the message too: it is what reaches the QUIC error.
impl std::fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn expected_list(pins: &[[u8; 32]]) -> String {
    if pins.is_empty() {
        return "no pin".to_string();
    }
    pins.iter().map(sha256_hex).collect::<Vec<_>>().join(" or ")
}

impl PinMismatch {
    /// The rustls error a verifier returns: a certificate error, so the server is sent the
    /// `certificate_unknown` alert.
    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(self),
        )))
    }

    /// The pin mismatch behind a failed connection attempt, if that is why it failed. Only an
    /// error this end raised itself counts (a locally detected transport error carrying the
    /// `certificate_unknown` alert): a peer cannot forge one by closing with a chosen reason.
    pub fn from_connection_error(e: &quinn::ConnectionError) -> Option<PinMismatch> {
        let quinn::ConnectionError::TransportError(t) = e else {
            return None;
        };
        Self::from_transport_error(u64::from(t.code), &t.reason)
    }

    /// [`PinMismatch::from_connection_error`] on a transport error's code and reason.
    fn from_transport_error(code: u64, reason: &str) -> Option<PinMismatch> {
        // TLS alert 46 (certificate_unknown) as a QUIC CRYPTO_ERROR (0x100 + alert).
        if code != 0x100 + 46 {
            return None;
        }
        Self::parse(reason)
    }

    /// Reads the mismatch back from text holding its message.
    fn parse(text: &str) -> Option<PinMismatch> {
        let rest = &text[text.find(PIN_MISMATCH_MARK)? + PIN_MISMATCH_MARK.len()..];
        let (expected, rest) = rest.split_once(PIN_MISMATCH_PRESENTED)?;
        let expected = if expected == "no pin" {
            Vec::new()
        } else {
            expected
                .split(" or ")
                .map(|p| parse_sha256_hex(p).ok())
                .collect::<Option<Vec<_>>>()?
        };
        let presented = parse_sha256_hex(rest.get(..64)?).ok()?;
        Some(PinMismatch {
            expected,
            presented,
        })
    }
}

/// Transport settings shared by both ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportOptions {
    /// Send a PING after this much silence so NAT bindings and idle timers stay alive.
    pub keep_alive: Option<Duration>,
    /// Close the connection after this much silence from the peer (the smaller of both ends'
    /// values applies). This is how a silently dead node is noticed between heartbeats.
    pub idle_timeout: Duration,
    /// Unidirectional streams the peer may have open at once (one per video frame in flight).
    pub max_concurrent_uni_streams: u32,
    /// Bidirectional streams the peer may have open at once (one per session or request).
    pub max_concurrent_bidi_streams: u32,
    /// Flow-control window of each stream the peer sends on, in bytes: what this end buffers
    /// per stream before the peer waits. `None`: quinn's default (1.25 MB).
    pub stream_receive_window: Option<u64>,
    /// Flow-control window of the whole connection, in bytes: what this end buffers across all
    /// streams. `None`: quinn's default, which is unbounded (only the per-stream windows
    /// apply), so a server facing strangers should set it.
    pub receive_window: Option<u64>,
    /// Bytes of received datagrams buffered until the application reads them (older ones are
    /// dropped beyond it). `None`: quinn's default (1.25 MB).
    pub datagram_receive_buffer: Option<usize>,
    /// The congestion controller of what this end sends. Default: quinn's (Cubic).
    pub congestion: Congestion,
    /// Packets a later one must be acknowledged ahead of a packet before it is declared lost
    /// (reordering tolerance). `None`: quinn's default (3).
    pub packet_threshold: Option<u32>,
}

/// A QUIC congestion controller (what paces this end's sending).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default: loss-based; random loss shrinks its window.
    #[default]
    Cubic,
    /// BBR (quinn's experimental BBRv1): model-based, paces at the measured bottleneck rate and
    /// mostly ignores random loss.
    Bbr,
    /// NewReno (RFC 9002): loss-based, the most conservative.
    NewReno,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            keep_alive: Some(Duration::from_secs(2)),
            idle_timeout: Duration::from_secs(10),
            max_concurrent_uni_streams: 1024,
            max_concurrent_bidi_streams: 1024,
            stream_receive_window: None,
            receive_window: None,
            datagram_receive_buffer: None,
            congestion: Congestion::Cubic,
            packet_threshold: None,
        }
    }
}

impl TransportOptions {
    /// The quinn transport configuration these options describe.
    pub fn to_transport_config(&self) -> Result<quinn::TransportConfig, TlsError> {
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(self.keep_alive);
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| TlsError::IdleTimeout(self.idle_timeout))?;
        t.max_idle_timeout(Some(idle));
        t.max_concurrent_uni_streams(self.max_concurrent_uni_streams.into());
        t.max_concurrent_bidi_streams(self.max_concurrent_bidi_streams.into());
        if let Some(w) = self.stream_receive_window {
            t.stream_receive_window(window(w)?);
        }
        if let Some(w) = self.receive_window {
            t.receive_window(window(w)?);
        }
        if let Some(b) = self.datagram_receive_buffer {
            t.datagram_receive_buffer_size(Some(b));
        }
        match self.congestion {
            Congestion::Cubic => {}
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
            }
            Congestion::NewReno => {
                t.congestion_controller_factory(Arc::new(
                    quinn::congestion::NewRenoConfig::default(),
                ));
            }
        }
        if let Some(n) = self.packet_threshold {
            // quinn asserts RFC 9002's minimum of 3.
            t.packet_threshold(n.max(3));
        }
        Ok(t)
    }
}

/// A flow-control window as the QUIC variable-length integer it is sent as.
fn window(bytes: u64) -> Result<quinn::VarInt, TlsError> {
    quinn::VarInt::from_u64(bytes).map_err(|_| TlsError::Window(bytes))
}

/// The ring crypto provider every config here uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a certificate's DER encoding (the value [`ServerVerify::PinnedSha256`] pins).
pub fn cert_sha256(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// Parses a SHA-256 pin written as 64 hex digits, optionally separated by `:` (the form
/// `openssl x509 -fingerprint -sha256` prints).
pub fn parse_sha256_hex(input: &str) -> Result<[u8; 32], TlsError> {
    let bad = |detail| TlsError::BadPin {
        input: input.to_string(),
        detail,
    };
    let digits: Vec<u8> = input.bytes().filter(|b| *b != b':').collect();
    if digits.len() != 64 {
        return Err(bad("expected 64 hex digits"));
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        let hi = hex_value(pair[0]).ok_or_else(|| bad("not a hex digit"))?;
        let lo = hex_value(pair[1]).ok_or_else(|| bad("not a hex digit"))?;
        out[i] = hi << 4 | lo;
    }
    Ok(out)
}

/// Formats a digest as lowercase hex, the inverse of [`parse_sha256_hex`].
pub fn sha256_hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Parses every certificate in PEM text; `origin` names the source in errors.
pub fn parse_certs_pem(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            origin: origin.to_string(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            origin: origin.to_string(),
        });
    }
    Ok(certs)
}

/// Reads every certificate from a PEM file (a chain, leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    parse_certs_pem(&pem, &path.display().to_string())
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        origin: path.display().to_string(),
        detail: e.to_string(),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A freshly generated self-signed certificate and its key.
#[derive(Debug)]
pub struct SelfSigned {
    /// The certificate (DER).
    pub cert: CertificateDer<'static>,
    /// Its private key (PKCS#8 DER).
    pub key: PrivateKeyDer<'static>,
    /// The certificate as PEM, for writing to disk.
    pub cert_pem: String,
    /// The key as PEM, for writing to disk.
    pub key_pem: String,
    /// SHA-256 of `cert`, for [`ServerVerify::PinnedSha256`].
    pub sha256: [u8; 32],
}

/// Generates a self-signed ECDSA P-256 certificate for `names` (DNS names or IP addresses), for
/// development and tests where clients pin the certificate's hash.
pub fn self_signed(names: &[String]) -> Result<SelfSigned, TlsError> {
    let certified = rcgen::generate_simple_self_signed(names.to_vec())?;
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    Ok(SelfSigned {
        sha256: cert_sha256(&cert),
        cert_pem: certified.cert.pem(),
        key_pem: certified.signing_key.serialize_pem(),
        cert,
        key,
    })
}

/// A QUIC client configuration offering `alpn`, with [`TransportOptions::default`].
pub fn client_config(
    verify: ServerVerify,
    alpn: &[&[u8]],
) -> Result<quinn::ClientConfig, TlsError> {
    client_config_with(verify, alpn, &TransportOptions::default())
}

/// A QUIC client configuration offering `alpn` with explicit transport options.
pub fn client_config_with(
    verify: ServerVerify,
    alpn: &[&[u8]],
    transport: &TransportOptions,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut tls = match verify {
        ServerVerify::CaFile(path) => {
            let roots = root_store(&load_certs(&path)?, &path.display().to_string())?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        ServerVerify::CaPem(pem) => {
            let origin = "inline CA PEM";
            let roots = root_store(&parse_certs_pem(&pem, origin)?, origin)?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        ServerVerify::PinnedSha256(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pins: Some(vec![pin]),
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        ServerVerify::PinnedAnySha256(pins) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pins: Some(pins),
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        ServerVerify::InsecureDangerous => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pins: None,
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
    };
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport.to_transport_config()?));
    Ok(config)
}

fn root_store(
    certs: &[CertificateDer<'static>],
    origin: &str,
) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert.clone()).map_err(|source| TlsError::BadCa {
            origin: origin.to_string(),
            source,
        })?;
    }
    Ok(roots)
}

/// A QUIC server configuration presenting `cert_chain` (leaf first) and accepting any of
/// `alpn`; read the negotiated one with [`negotiated_alpn`].
pub fn server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
    transport: &TransportOptions,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(cert_chain, key)?;
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport.to_transport_config()?));
    Ok(config)
}

/// [`server_config`] that also asks connecting peers for a client certificate, optionally: a
/// peer that presents one must prove it holds the key (the handshake signature is checked), but
/// no chain or name is checked. Nodes and clients present none and are unaffected; a gateway
/// dialing the trunk (`nearpath-peer/1`) presents its own, and the application checks its pin
/// ([`peer_cert_sha256`]) against the gateway directory.
pub fn server_config_with_client_auth(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
    transport: &TransportOptions,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(AnyClientCert {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)?;
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport.to_transport_config()?));
    Ok(config)
}

/// [`server_config`] (or, with `client_auth`, [`server_config_with_client_auth`]) whose
/// certificate is chosen per handshake by `resolver` (the gateway serves browsers' WebTransport
/// a certificate of its own, chosen by the ClientHello's ALPN).
pub fn server_config_with_resolver(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    alpn: &[&[u8]],
    transport: &TransportOptions,
    client_auth: bool,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut tls = if client_auth {
        builder
            .with_client_cert_verifier(Arc::new(AnyClientCert {
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_cert_resolver(resolver)
    } else {
        builder.with_no_client_auth().with_cert_resolver(resolver)
    };
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport.to_transport_config()?));
    Ok(config)
}

/// A QUIC client configuration that trusts exactly the server certificate pinned by `pin`
/// and presents `cert_chain` as its client certificate (the gateway-to-gateway trunk).
pub fn client_config_with_identity(
    pin: [u8; 32],
    alpn: &[&[u8]],
    transport: &TransportOptions,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
            pins: Some(vec![pin]),
            algorithms: provider.signature_verification_algorithms,
        }))
        .with_client_auth_cert(cert_chain, key)?;
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport.to_transport_config()?));
    Ok(config)
}

/// SHA-256 of the end-entity certificate the other end of `conn` presented (a server's, or a
/// client certificate), or `None` when it presented none.
pub fn peer_cert_sha256(conn: &quinn::Connection) -> Option<[u8; 32]> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| cert_sha256(c.as_ref()))
}

/// Client certificate verifier that accepts any certificate (or none) and checks the handshake
/// signature: the trust decision is the application's, by pin.
#[derive(Debug)]
struct AnyClientCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl rustls::server::danger::ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The ALPN protocol negotiated on an established connection.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// Certificate verifier that trusts pinned end-entity hashes, or anything when `pins` is
/// `None`, and always checks the handshake signature with the certificate's key.
#[derive(Debug)]
struct PinnedVerifier {
    pins: Option<Vec<[u8; 32]>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.pins {
            None => Ok(ServerCertVerified::assertion()),
            Some(pins) if pins.contains(&cert_sha256(end_entity)) => {
                Ok(ServerCertVerified::assertion())
            }
            Some(pins) => Err(PinMismatch {
                expected: pins.clone(),
                presented: cert_sha256(end_entity),
            }
            .into_rustls()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_hex_round_trips_and_accepts_colons() {
        let digest = cert_sha256(b"not really a certificate");
        let hex = sha256_hex(&digest);
        assert_eq!(parse_sha256_hex(&hex).ok(), Some(digest));
        let colons: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(parse_sha256_hex(&colons.join(":")).ok(), Some(digest));
        assert!(parse_sha256_hex(&hex[..62]).is_err());
        let mut bad = hex.clone();
        bad.replace_range(0..1, "g");
        assert!(parse_sha256_hex(&bad).is_err());
    }

    #[test]
    fn pem_helpers_name_the_source() {
        let err = parse_certs_pem(b"nothing here", "inline PEM").unwrap_err();
        assert!(err.to_string().contains("inline PEM"), "{err}");
        let missing = Path::new("/nonexistent/nearpath/cert.pem");
        let err = load_certs(missing).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/nearpath/cert.pem"),
            "{err}"
        );
    }

    #[test]
    fn pin_mismatch_names_both_pins_and_reads_back_from_the_handshake_error() {
        let m = PinMismatch {
            expected: vec![[1u8; 32]],
            presented: [2u8; 32],
        };
        assert_eq!(
            m.to_string(),
            format!(
                "certificate pin mismatch: expected {}, gateway presented {}",
                "01".repeat(32),
                "02".repeat(32)
            )
        );
        // What quinn makes of the verifier's error on this end.
        let reason = m.clone().into_rustls().to_string();
        let crypto_46 = u64::from(quinn::TransportErrorCode::crypto(46));
        assert_eq!(
            PinMismatch::from_transport_error(crypto_46, &reason),
            Some(m.clone())
        );
        let several = PinMismatch {
            expected: vec![[1u8; 32], [3u8; 32]],
            presented: [2u8; 32],
        };
        assert_eq!(
            PinMismatch::parse(&several.clone().into_rustls().to_string()),
            Some(several)
        );
    }

    #[test]
    fn pin_mismatch_is_never_read_from_what_the_peer_sent_or_other_alerts() {
        let text = PinMismatch {
            expected: vec![[1u8; 32]],
            presented: [2u8; 32],
        }
        .to_string();
        // Another alert with the same words (only the verifier raises certificate_unknown).
        let crypto_40 = u64::from(quinn::TransportErrorCode::crypto(40));
        assert_eq!(PinMismatch::from_transport_error(crypto_40, &text), None);
        // What a peer sends arrives as `ConnectionClosed`, never as this end's own error.
        let closed = quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(46),
            frame_type: None,
            reason: text.clone().into_bytes().into(),
        });
        assert_eq!(PinMismatch::from_connection_error(&closed), None);
        // Truncated or forged texts.
        assert_eq!(PinMismatch::parse(&text[..text.len() - 1]), None);
        assert_eq!(
            PinMismatch::parse("certificate pin mismatch: expected zz, gateway presented 00"),
            None
        );
        assert_eq!(PinMismatch::parse(""), None);
    }

    #[test]
    fn self_signed_pem_parses_back() {
        let s = self_signed(&["localhost".to_string()]).unwrap();
        let certs = parse_certs_pem(s.cert_pem.as_bytes(), "generated").unwrap();
        assert_eq!(certs, vec![s.cert.clone()]);
        assert_eq!(cert_sha256(&certs[0]), s.sha256);
        assert!(PrivateKeyDer::from_pem_slice(s.key_pem.as_bytes()).is_ok());
    }
}
