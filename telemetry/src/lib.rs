//! Logging and trace export shared by the gateway and the edge node: the `tracing` subscriber
//! both binaries install from their `[log]` section (level, format, colour), the caps that keep
//! chatty libraries quiet, and the optional OpenTelemetry (OTLP) export of spans, with the W3C
//! trace context joined across the gateway and its nodes ([`join`]).
//!
//! With no `otlp_endpoint` nothing of OpenTelemetry is built: no exporter, no layer, and
//! [`join`] returns at its first check.

use nearpath_config::{LogColor, LogConfig, LogFormat, OtlpProtocol};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use rustls::pki_types::CertificateDer;
use std::ffi::OsStr;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Libraries whose warnings describe normal operation of a healthy session, capped at `error`
/// ahead of the operator's directive: webrtc-rs (`webrtc`, a thin async driver, and the sans-IO
/// `rtc` family under it: `rtc_ice`, `rtc_dtls`, `rtc_sctp`, `rtc_srtp`, ... — ICE candidate
/// pairs, DTLS and SCTP teardown, handler errors at close are logged at WARN) and OpenH264
/// (parameter adjustments while initialising). A directive that names one of these targets
/// replaces its cap (`rtc_ice=warn`), because a later directive for the same target wins;
/// targets match by prefix, so `rtc` covers every `rtc_*` crate.
pub const LIBRARY_CAPS: &[&str] = &["webrtc=error", "rtc=error", "openh264=error"];

/// How long a batch of spans may take to reach the collector before it is dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the subscriber or the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("log level {directive:?}: {message}")]
    Filter { directive: String, message: String },
    #[error("OTLP exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
    /// `log.otlp_ca_file` cannot be used.
    #[error("OTLP CA file {path}: {message}")]
    CaFile { path: String, message: String },
    /// The TLS client for an `https://` collector could not be built.
    #[error("OTLP TLS: {0}")]
    Tls(String),
    /// A `log.otlp_headers` entry cannot be sent (its value is not shown: usually a secret).
    #[error("OTLP header {0}: not a valid header")]
    Header(String),
}

/// The filter of printed lines: the library caps, then the operator's directive (`RUST_LOG`
/// when set and not empty, else `[log] level`), so that the operator's directive wins wherever
/// it names a library.
pub fn env_filter(level: &str, rust_log: Option<&str>) -> Result<EnvFilter, TelemetryError> {
    let user = rust_log.filter(|v| !v.trim().is_empty()).unwrap_or(level);
    let directives = format!("{},{user}", LIBRARY_CAPS.join(","));
    EnvFilter::builder()
        .parse(&directives)
        .map_err(|e| TelemetryError::Filter {
            directive: user.to_string(),
            message: e.to_string(),
        })
}

/// Whether text lines carry ANSI colour: `always` and `never` say so; `auto` colours only a
/// terminal, and never when `NO_COLOR` is set to a non-empty value (<https://no-color.org>).
pub fn use_color(mode: LogColor, is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    match mode {
        LogColor::Always => true,
        LogColor::Never => false,
        LogColor::Auto => is_terminal && no_color.is_none_or(OsStr::is_empty),
    }
}

/// The collector URL spans are posted to: a bare `http/protobuf` base URL gets OTLP's
/// `/v1/traces` path; any other URL is used as written.
pub fn traces_url(endpoint: &str, protocol: OtlpProtocol) -> String {
    let after_scheme = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    match protocol {
        OtlpProtocol::HttpProtobuf if !after_scheme.trim_end_matches('/').contains('/') => {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        }
        _ => endpoint.to_string(),
    }
}

/// Set once spans are exported: [`join`] costs one load when they are not.
static EXPORTING: AtomicBool = AtomicBool::new(false);
/// The tracer provider while spans are exported, for [`flush`] and [`shutdown`].
static PROVIDER: OnceLock<Mutex<Option<SdkTracerProvider>>> = OnceLock::new();

/// Installs the process's subscriber from `[log]` (once; later calls change nothing):
/// text or JSON lines on standard output, coloured as [`use_color`] decides, filtered by
/// [`env_filter`] with `RUST_LOG`; and, when `otlp_endpoint` is set, an OpenTelemetry layer
/// exporting this process's spans (targets `nearpath*`) under `service_name` (default
/// `default_service`).
///
/// A broken exporter does not stop the process: the lines are installed anyway, and the error
/// is returned for the caller to log.
pub fn init(cfg: &LogConfig, default_service: &str) -> Result<(), TelemetryError> {
    init_with_writer(
        cfg,
        default_service,
        std::io::stdout,
        std::io::stdout().is_terminal(),
    )
}

/// [`init`] with the lines written to `writer` (`is_terminal`: whether it is a terminal, for
/// `color = "auto"`). For tests that read what was logged.
pub fn init_with_writer<W>(
    cfg: &LogConfig,
    default_service: &str,
    writer: W,
    is_terminal: bool,
) -> Result<(), TelemetryError>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, bad_filter) = match env_filter(&cfg.level, rust_log.as_deref()) {
        Ok(f) => (f, None),
        // An unparsable RUST_LOG falls back to the validated `[log] level`.
        Err(e) => (
            env_filter(&cfg.level, None).unwrap_or_else(|_| EnvFilter::new("info")),
            Some(e),
        ),
    };
    let ansi = use_color(
        cfg.color,
        is_terminal,
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let (provider, export_error) = match cfg.otlp_endpoint.as_deref() {
        Some(endpoint) => match provider(cfg, endpoint, default_service) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        },
        None => (None, None),
    };
    let installed = match &provider {
        // Without export the filter is global, as before OTLP existed: a disabled callsite
        // costs one cached interest check, with no per-layer filter state.
        None => tracing_subscriber::registry()
            .with(filter)
            .with(lines(cfg.format, ansi, writer))
            .try_init()
            .is_ok(),
        // With export each layer has its own filter: the operator's level decides what is
        // printed, and this project's spans are exported whatever that level.
        Some(p) => tracing_subscriber::registry()
            .with(lines(cfg.format, ansi, writer).with_filter(filter))
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(p.tracer("nearpath"))
                    .with_filter(tracing_subscriber::filter::filter_fn(exported)),
            )
            .try_init()
            .is_ok(),
    };
    if installed {
        if let Some(p) = provider {
            let _ = PROVIDER.set(Mutex::new(Some(p)));
            EXPORTING.store(true, Ordering::Release);
        }
    }
    match (bad_filter, export_error) {
        (_, Some(e)) | (Some(e), None) => Err(e),
        (None, None) => Ok(()),
    }
}

/// The printed lines: text (coloured when `ansi`) or JSON, written to `writer`.
fn lines<S, W>(format: LogFormat, ansi: bool, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_ansi(false)
            .with_writer(writer)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .boxed(),
    }
}

/// What the OpenTelemetry layer sees: this project's spans down to info (the per-request and
/// per-session spans), and its warnings and errors as span events. Libraries' spans (quinn's
/// per-connection ones, for instance) are not exported.
fn exported(meta: &tracing::Metadata<'_>) -> bool {
    let ours = meta.target().starts_with("nearpath");
    if meta.is_span() {
        ours && *meta.level() <= Level::INFO
    } else {
        ours && *meta.level() <= Level::WARN
    }
}

fn provider(
    cfg: &LogConfig,
    endpoint: &str,
    default_service: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let url = traces_url(endpoint, cfg.otlp_protocol);
    let fail = |e: &dyn std::fmt::Display| TelemetryError::Exporter {
        endpoint: url.clone(),
        message: e.to_string(),
    };
    let https = url.starts_with("https://");
    let exporter = match cfg.otlp_protocol {
        OtlpProtocol::HttpProtobuf => {
            let b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(url.clone())
                .with_timeout(EXPORT_TIMEOUT)
                .with_headers(cfg.otlp_headers.clone().into_iter().collect())
                // Always our client: reqwest is built without a default crypto provider (see
                // Cargo.toml), so the exporter's own default client could not be built.
                .with_http_client(http_client(cfg, https)?);
            b.build()
        }
        // tonic's channel runs on the Tokio runtime it is built in: the binaries call `init`
        // from inside theirs.
        OtlpProtocol::Grpc => {
            if tokio_runtime_missing() {
                return Err(fail(&"grpc export needs a Tokio runtime at start-up"));
            }
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(url.clone())
                .with_timeout(EXPORT_TIMEOUT)
                .with_metadata(grpc_metadata(cfg)?);
            if https {
                b = b.with_tls_config(grpc_tls(cfg)?);
            }
            b.build()
        }
    }
    .map_err(|e| fail(&e))?;
    let service = cfg
        .service_name
        .clone()
        .unwrap_or_else(|| default_service.to_string());
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.otlp_sample_ratio,
        ))))
        .with_resource(Resource::builder().with_service_name(service).build())
        .build())
}

/// Checks what exporting needs from outside the configuration file, as `run` will find it:
/// the CA file of an `https://` collector must hold at least one PEM certificate. Dials
/// nothing (a collector being down is not a configuration error).
pub fn check_export(cfg: &LogConfig) -> Result<(), TelemetryError> {
    match (&cfg.otlp_endpoint, &cfg.otlp_ca_file) {
        (Some(_), Some(path)) => ca_certificates(path).map(|_| ()),
        _ => Ok(()),
    }
}

/// The DER certificates of the PEM file `path` (at least one).
fn ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TelemetryError> {
    let fail = |message: String| TelemetryError::CaFile {
        path: path.display().to_string(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(fail("holds no PEM certificate (BEGIN CERTIFICATE)".into()));
    }
    Ok(certs)
}

/// The roots an `https://` collector's certificate is checked against: `otlp_ca_file`'s, or the
/// system's trust store.
fn export_roots(cfg: &LogConfig) -> Result<rustls::RootCertStore, TelemetryError> {
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.otlp_ca_file {
        Some(path) => {
            for cert in ca_certificates(path)? {
                roots.add(cert).map_err(|e| TelemetryError::CaFile {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
            }
        }
        None => {
            // Unreadable entries of the system store are skipped, as every TLS client does;
            // an empty store fails each export with an unknown-issuer error, which is logged.
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    Ok(roots)
}

/// The HTTP exporter's client: rustls with ring (the provider the rest of the project uses)
/// and, for an `https://` collector, [`export_roots`] (a plain `http://` one never uses TLS, so
/// no trust store is read for it). Built on its own thread, because a blocking client owns a
/// runtime that may not be created or dropped inside the caller's.
fn http_client(cfg: &LogConfig, https: bool) -> Result<reqwest::blocking::Client, TelemetryError> {
    let roots = if https {
        export_roots(cfg)?
    } else {
        rustls::RootCertStore::empty()
    };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TelemetryError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    std::thread::spawn(move || {
        reqwest::blocking::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(EXPORT_TIMEOUT)
            .build()
    })
    .join()
    .map_err(|_| TelemetryError::Tls("the HTTP client's thread panicked".into()))?
    .map_err(|e| TelemetryError::Tls(e.to_string()))
}

/// The gRPC exporter's TLS: [`export_roots`]' source, given to tonic.
fn grpc_tls(
    cfg: &LogConfig,
) -> Result<opentelemetry_otlp::tonic_types::transport::ClientTlsConfig, TelemetryError> {
    use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
    Ok(match &cfg.otlp_ca_file {
        Some(path) => {
            // Read and checked here so that a bad file is reported once, at start.
            ca_certificates(path)?;
            let pem = std::fs::read(path).map_err(|e| TelemetryError::CaFile {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
        }
        None => ClientTlsConfig::new().with_native_roots(),
    })
}

/// `otlp_headers` as gRPC metadata (names lower-cased, as HTTP/2 requires).
fn grpc_metadata(
    cfg: &LogConfig,
) -> Result<opentelemetry_otlp::tonic_types::metadata::MetadataMap, TelemetryError> {
    use opentelemetry_otlp::tonic_types::metadata::MetadataMap;
    let mut headers = http::HeaderMap::new();
    for (name, value) in &cfg.otlp_headers {
        let bad = || TelemetryError::Header(name.clone());
        let key = http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| bad())?;
        let value = http::HeaderValue::from_str(value).map_err(|_| bad())?;
        headers.insert(key, value);
    }
    Ok(MetadataMap::from_headers(headers))
}

fn tokio_runtime_missing() -> bool {
    tokio::runtime::Handle::try_current().is_err()
}

/// Whether spans are being exported.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Acquire)
}

/// Sends the spans ended so far to the collector now (tests, and before a planned exit).
pub fn flush() {
    if let Some(p) = PROVIDER.get().and_then(|m| m.lock().ok()?.clone()) {
        let _ = p.force_flush();
    }
}

/// Flushes and stops the exporter; spans ended later are dropped. For the end of `main`.
pub fn shutdown() {
    EXPORTING.store(false, Ordering::Release);
    if let Some(p) = PROVIDER.get().and_then(|m| m.lock().ok()?.take()) {
        let _ = p.shutdown();
    }
}

/// A W3C trace context: the trace, a span, its flags (bit 0: sampled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceIds {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceIds {
    /// Parses a `traceparent` header of version `00` (lowercase hex, ids not all zero);
    /// anything else is `None`, and is never propagated.
    pub fn parse(header: &str) -> Option<TraceIds> {
        let b = header.as_bytes();
        if b.len() != 55 || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let lower_hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        if !lower_hex(&b[3..35]) || !lower_hex(&b[36..52]) || !lower_hex(&b[53..55]) {
            return None;
        }
        let trace_id = u128::from_str_radix(&header[3..35], 16).ok()?.to_be_bytes();
        let span_id = u64::from_str_radix(&header[36..52], 16).ok()?.to_be_bytes();
        let flags = u8::from_str_radix(&header[53..55], 16).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceIds {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The `traceparent` header value.
    pub fn header(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            u128::from_be_bytes(self.trace_id),
            u64::from_be_bytes(self.span_id),
            self.flags
        )
    }
}

/// Joins `span` to a caller's trace and returns the span's own context, the one to pass on.
///
/// While spans are exported, `span` becomes the child of `parent` (a remote context: the
/// client's `traceparent` at the gateway, the gateway's at the node), or a root when there is
/// none, and its ids are those of
/// the exported span, so that what is passed on names a span the collector receives. When
/// spans are not exported, or `span` is disabled, `None`: the caller makes its own ids.
/// Call it before the span is first entered: a started span's parent cannot change.
pub fn join(span: &tracing::Span, parent: Option<TraceIds>) -> Option<TraceIds> {
    if !exporting() || span.is_disabled() {
        return None;
    }
    // Without a caller's context the span is a root: a request starts its own trace, not one
    // per connection (its `tracing` parent, the connection's span, would otherwise be its
    // OpenTelemetry parent too).
    let parent_cx = match parent {
        Some(p) => opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(p.trace_id),
            SpanId::from_bytes(p.span_id),
            TraceFlags::new(p.flags),
            true,
            TraceState::default(),
        )),
        None => opentelemetry::Context::new(),
    };
    let _ = span.set_parent(parent_cx);
    let cx = span.context();
    let own = cx.span().span_context().clone();
    own.is_valid().then(|| TraceIds {
        trace_id: own.trace_id().to_bytes(),
        span_id: own.span_id().to_bytes(),
        flags: own.trace_flags().to_u8(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `filter` lets an event of `level` on `target` through.
    fn passes(filter: &str, target: &'static str, level: Level) -> bool {
        // EnvFilter is asked through a one-off callsite with the given target and level.
        struct Cs;
        impl tracing::callsite::Callsite for Cs {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &tracing::Metadata<'_> {
                unreachable!()
            }
        }
        static CS: Cs = Cs;
        let meta = Box::leak(Box::new(tracing::Metadata::new(
            "event",
            target,
            level,
            None,
            None,
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CS)),
            tracing::metadata::Kind::EVENT,
        )));
        let subscriber = tracing_subscriber::registry().with(EnvFilter::new(filter));
        tracing::Subscriber::enabled(&subscriber, meta)
    }

    #[test]
    fn library_warnings_are_capped_below_the_operators_level() {
        let f = env_filter("info", None).unwrap().to_string();
        for target in [
            "webrtc::peer_connection::driver",
            "rtc::peer_connection::handler::sctp",
            "rtc_ice::agent",
            "rtc_dtls::conn",
            "rtc_sctp::association",
            "rtc_srtp::session",
            "openh264",
        ] {
            assert!(!passes(&f, target, Level::WARN), "{target} WARN shown");
            assert!(passes(&f, target, Level::ERROR), "{target} ERROR hidden");
        }
        assert!(passes(&f, "nearpath_gateway::webrtc::whep", Level::INFO));
        assert!(passes(&f, "nearpath_gateway::sdp", Level::INFO));
        assert!(passes(&f, "nearpath::access", Level::INFO));
        assert!(passes(&f, "quinn", Level::WARN));
    }

    #[test]
    fn an_operator_directive_naming_a_library_overrides_its_cap() {
        let f = env_filter("info,rtc_ice=warn", None).unwrap().to_string();
        assert!(passes(&f, "rtc_ice::agent", Level::WARN));
        assert!(!passes(&f, "rtc_dtls::conn", Level::WARN));
        // RUST_LOG replaces `[log] level`, and may lift a cap as well.
        let f = env_filter("warn", Some("debug,rtc=debug"))
            .unwrap()
            .to_string();
        assert!(passes(&f, "rtc_sctp::association", Level::DEBUG));
        assert!(passes(&f, "nearpath_edge_node", Level::DEBUG));
        // A bare level does not lift a cap: libraries must be named.
        let f = env_filter("info", Some("trace")).unwrap().to_string();
        assert!(!passes(&f, "rtc_ice::agent", Level::WARN));
        // An empty RUST_LOG is no directive at all.
        let f = env_filter("warn", Some(" ")).unwrap().to_string();
        assert!(!passes(&f, "nearpath_gateway", Level::INFO));
        assert!(env_filter("info", Some("nearpath=loud")).is_err());
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        let set = Some(OsStr::new("1"));
        let empty = Some(OsStr::new(""));
        assert!(use_color(LogColor::Auto, true, None));
        assert!(use_color(LogColor::Auto, true, empty));
        assert!(!use_color(LogColor::Auto, true, set));
        assert!(!use_color(LogColor::Auto, false, None));
        assert!(use_color(LogColor::Always, false, set));
        assert!(!use_color(LogColor::Never, true, None));
    }

    #[test]
    fn a_bare_http_endpoint_gets_the_traces_path() {
        use OtlpProtocol::*;
        for (given, expected) in [
            ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
            ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/traces"),
            ("http://c:4318/v1/traces", "http://c:4318/v1/traces"),
            (
                "http://c:4318/otlp/v1/traces",
                "http://c:4318/otlp/v1/traces",
            ),
        ] {
            assert_eq!(traces_url(given, HttpProtobuf), expected);
        }
        assert_eq!(traces_url("http://c:4317", Grpc), "http://c:4317");
    }

    #[test]
    fn traceparent_round_trips_and_hostile_ones_are_refused() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceIds::parse(h).unwrap();
        assert_eq!(t.header(), h);
        assert_eq!(t.flags, 1);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-00",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceIds::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_grpc_exporter_needs_the_runtime_it_will_run_on() {
        let cfg = LogConfig {
            otlp_endpoint: Some("http://127.0.0.1:4317".into()),
            otlp_protocol: OtlpProtocol::Grpc,
            ..LogConfig::default()
        };
        let outside = provider(&cfg, "http://127.0.0.1:4317", "svc").unwrap_err();
        assert!(outside.to_string().contains("Tokio runtime"), "{outside}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let p = rt.block_on(async { provider(&cfg, "http://127.0.0.1:4317", "svc") });
        // Nothing listens there: shutting down drops the spans without hanging.
        p.unwrap().shutdown().ok();
        let http = LogConfig {
            otlp_endpoint: Some("http://127.0.0.1:4318".into()),
            ..LogConfig::default()
        };
        provider(&http, "http://127.0.0.1:4318", "svc")
            .unwrap()
            .shutdown()
            .ok();
    }

    #[test]
    fn without_export_join_makes_no_ids() {
        let span = tracing::info_span!("http_request");
        assert_eq!(
            join(
                &span,
                TraceIds::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            ),
            None
        );
    }

    /// What a fake TLS collector received: one entry per `POST`, with its path, its
    /// `x-api-key` header and the names of the spans in it.
    type Posts = std::sync::Arc<Mutex<Vec<(String, Option<String>, Vec<String>)>>>;

    /// A fake OTLP/HTTP collector behind TLS on 127.0.0.1, port 0, with a self-signed
    /// certificate for `localhost`; returns its port and the certificate's PEM.
    fn tls_collector(posts: Posts) -> (u16, String) {
        use http_body_util::BodyExt;
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message as _;
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let pem = certified.cert.pem();
        let chain = vec![certified.cert.der().clone()];
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()),
        );
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap().port()).unwrap();
                loop {
                    let (tcp, _) = listener.accept().await.unwrap();
                    let acceptor = acceptor.clone();
                    let posts = posts.clone();
                    tokio::spawn(async move {
                        // A client that refuses the certificate ends the handshake here.
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service = hyper::service::service_fn(
                            move |req: hyper::Request<hyper::body::Incoming>| {
                                let posts = posts.clone();
                                async move {
                                    let path = req.uri().path().to_string();
                                    let key = req
                                        .headers()
                                        .get("x-api-key")
                                        .and_then(|v| v.to_str().ok())
                                        .map(str::to_string);
                                    let body = req.into_body().collect().await.unwrap().to_bytes();
                                    let names = ExportTraceServiceRequest::decode(body)
                                        .map(|e| {
                                            e.resource_spans
                                                .into_iter()
                                                .flat_map(|r| r.scope_spans)
                                                .flat_map(|s| s.spans)
                                                .map(|s| s.name)
                                                .collect()
                                        })
                                        .unwrap_or_default();
                                    posts.lock().unwrap().push((path, key, names));
                                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                        http_body_util::Full::new(bytes::Bytes::new()),
                                    ))
                                }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                            .await;
                    });
                }
            });
        });
        (rx.recv_timeout(Duration::from_secs(10)).unwrap(), pem)
    }

    /// Ends one span named `name` through `p` and flushes; whether the export succeeded.
    fn export_one(p: &SdkTracerProvider, name: &'static str) -> bool {
        use opentelemetry::trace::{Tracer as _, TracerProvider as _};
        p.tracer("test").in_span(name, |_| {});
        p.force_flush().is_ok()
    }

    #[test]
    fn spans_reach_an_https_collector_that_the_configured_ca_vouches_for_with_the_headers() {
        let posts: Posts = Default::default();
        let (port, pem) = tls_collector(posts.clone());
        let dir = std::env::temp_dir().join(format!("nearpath-otlp-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("collector.pem");
        std::fs::write(&ca, &pem).unwrap();
        let endpoint = format!("https://localhost:{port}");
        let cfg = LogConfig {
            otlp_endpoint: Some(endpoint.clone()),
            otlp_ca_file: Some(ca.clone()),
            otlp_headers: [("x-api-key".to_string(), "k-123".to_string())].into(),
            ..LogConfig::default()
        };
        check_export(&cfg).unwrap();
        let p = provider(&cfg, &endpoint, "svc").unwrap();
        assert!(export_one(&p, "over-tls"), "the export failed");
        p.shutdown().ok();
        let got = posts.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, "/v1/traces");
        assert_eq!(got[0].1.as_deref(), Some("k-123"));
        assert_eq!(got[0].2, vec!["over-tls".to_string()]);

        // Regression guard for the check itself: with the system's roots (which do not hold
        // this self-signed certificate) the export fails and the collector gets nothing.
        let untrusted = LogConfig {
            otlp_ca_file: None,
            ..cfg.clone()
        };
        let p = provider(&untrusted, &endpoint, "svc").unwrap();
        assert!(
            !export_one(&p, "unverified"),
            "exported to an unverified collector"
        );
        p.shutdown().ok();
        assert_eq!(posts.lock().unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_ca_file_that_is_missing_or_holds_no_certificate_is_an_error_naming_it() {
        let dir = std::env::temp_dir().join(format!("nearpath-otlp-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        for (path, says) in [
            (dir.join("missing.pem"), "No such file"),
            (empty, "no PEM certificate"),
        ] {
            let cfg = LogConfig {
                otlp_endpoint: Some("https://localhost:4318".into()),
                otlp_ca_file: Some(path.clone()),
                ..LogConfig::default()
            };
            let e = check_export(&cfg).unwrap_err().to_string();
            assert!(
                e.contains(&path.display().to_string()) && e.contains(says),
                "{e}"
            );
            let Err(e) = provider(&cfg, "https://localhost:4318", "svc") else {
                panic!("a provider with a bad CA file");
            };
            let e = e.to_string();
            assert!(e.contains(says), "{e}");
            // gRPC reads the same file.
            let grpc = LogConfig {
                otlp_protocol: OtlpProtocol::Grpc,
                ..cfg
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let Err(e) = rt.block_on(async { provider(&grpc, "https://localhost:4317", "svc") })
            else {
                panic!("a gRPC provider with a bad CA file");
            };
            let e = e.to_string();
            assert!(e.contains(says), "{e}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
