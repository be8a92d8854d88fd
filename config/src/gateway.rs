//! The gateway's configuration root and its sections.

use crate::common::{check_secret, is_placeholder_secret, parse_version, LogConfig};
use crate::error::{ConfigErrors, Problems};
use crate::geo::{GeoConfig, GeoOverride, GeofenceConfig};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

/// The origin named by errors from validating a configuration held in memory.
pub const IN_MEMORY_ORIGIN: &str = "<config>";

/// Whether `name` is an HTTP field name (RFC 9110 token: letters, digits and
/// ``!#$%&'*+-.^_`|~``), as `http.client_address_header` must be.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Shortest admin token `gateway run` accepts.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// Longest `http.header_read_timeout_ms` accepted: a slow client must not hold a connection
/// for longer than this without sending a request.
pub const MAX_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Smallest `http.max_header_list_bytes` accepted (browsers send a few KiB of headers).
pub const MIN_HEADER_LIST_BYTES: u32 = 8192;
/// Smallest QUIC receive window accepted, in bytes (a control frame is up to 64 KiB).
pub const MIN_QUIC_WINDOW_BYTES: u64 = 65_536;
/// Largest QUIC receive window accepted, in bytes: a window is memory a peer may make the
/// gateway hold.
pub const MAX_QUIC_WINDOW_BYTES: u64 = 1 << 30;

/// The largest model weights either side accepts, in bytes (10 TB: twice the largest open model
/// at fp32 is under a tenth of this).
pub const MAX_MODEL_WEIGHTS_BYTES: u64 = 10_000_000_000_000;

/// The `gateway` binary's configuration file. Every section is optional and defaults as its
/// fields document; unknown keys are errors at every level.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// `[http]`: the public HTTP listener (OpenAI-compatible API, WHEP, `/play`).
    pub http: HttpConfig,
    /// `[admin]`: the admin API and metrics listener.
    pub admin: AdminConfig,
    /// `[quic]`: the QUIC listener for nodes and native clients.
    pub quic: QuicConfig,
    /// `[store]`: the durable database (operators, SLA records, usage ledger).
    pub store: StoreConfig,
    /// `[federation]`: this gateway as one of several regional gateways sharing the store.
    pub federation: FederationConfig,
    /// `[nodes]`: liveness and admission of edge nodes.
    pub nodes: NodesConfig,
    /// `[routing]`: how candidate nodes are scored.
    pub routing: RoutingConfig,
    /// `[inference]`: timeouts, retries and default rate limits for inference.
    pub inference: InferenceConfig,
    /// `[game]`: stream parameters and WebRTC transport.
    pub game: GameConfig,
    /// `[webtransport]`: game sessions for browsers over WebTransport on the QUIC port.
    pub webtransport: WebTransportConfig,
    /// `[geo]`: where location answers come from.
    pub geo: GeoConfig,
    /// `[geofence]`: who may be served by whom.
    pub geofence: GeofenceConfig,
    /// `[checker]`: what the gateway verifies of nodes' claims (GPU, capacity, location).
    pub checker: CheckerConfig,
    /// `[log]`: logging.
    pub log: LogConfig,
}

/// `[http]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on (HTTP/1.1 and HTTP/2). Port 0 picks a free port. Default:
    /// `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// PEM certificate chain; with `tls_key_file`, the listener speaks HTTPS. Set both or neither.
    /// Default: none (plain HTTP).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for `tls_cert_file`. Default: none.
    pub tls_key_file: Option<PathBuf>,
    /// Largest request body accepted, in bytes; larger bodies get 413. Default: 1048576 (1 MiB).
    pub max_body_bytes: u64,
    /// Peers (CIDRs) whose `client_address_header` is believed when locating the client (your
    /// load balancers). The header is read only when the TCP peer is in this list; its entries
    /// are then walked from the right, skipping those that are themselves in this list, and the
    /// first other entry is the client (see README, "Client location"). Default: [] (the TCP
    /// peer address is the client and no header is read).
    pub trusted_proxies: Vec<IpNet>,
    /// The one header that carries the client address from a trusted proxy:
    /// `x-forwarded-for` (comma-separated addresses, the proxy appends its peer),
    /// `forwarded` (RFC 7239 `for=` parameters), or the name of a header your proxy sets to the
    /// client address, such as `x-real-ip`. Every other forwarding header is ignored, so a
    /// client cannot add a second one that wins. Default: `x-forwarded-for`.
    pub client_address_header: String,
    /// How many proxies append to `client_address_header`, counted from the gateway, for
    /// proxy layers whose addresses cannot be listed in `trusted_proxies` (a CDN whose egress
    /// addresses change). With `n` > 0 the client is the `n`-th entry from the right (1: the
    /// one entry your load balancer appended); a header with fewer entries, or an unparseable
    /// entry among the last `n`, makes the location unknown. The TCP peer must still be in
    /// `trusted_proxies`. Only set it when nothing can reach the trusted peer except through
    /// all `n` proxies: a request that skips one would have a client-written entry counted.
    /// Default: 0 (no counting: entries are walked from the right, skipping trusted proxies).
    pub trusted_hops: u32,
    /// Origins allowed by CORS, as `scheme://host[:port]`, or `"*"` for any. Default: [] (no
    /// CORS headers).
    pub cors_allowed_origins: Vec<String>,
    /// A connection must deliver a complete request head within this long (of connecting, or
    /// of the previous response on a keep-alive connection), in milliseconds; otherwise it is
    /// closed (slowloris). At most 10000. The admin listener uses the same value. Default: 10000.
    pub header_read_timeout_ms: u64,
    /// A TLS handshake must complete within this long, in milliseconds. Default: 10000.
    pub tls_handshake_timeout_ms: u64,
    /// A request body must arrive completely within this long of the handler asking for it, in
    /// milliseconds; a slower body is a 400. Default: 30000.
    pub body_read_timeout_ms: u64,
    /// A connection with no request in flight for this long is closed, in milliseconds
    /// (keep-alive idle timeout). It governs HTTP/2; an idle HTTP/1.1 keep-alive connection is
    /// waiting for its next request head, so `header_read_timeout_ms` (at most 10 s) closes it
    /// first. Default: 60000.
    pub idle_timeout_ms: u64,
    /// Connections open at once on one listener; more are closed at once and counted in
    /// `nearpath_http_connections_refused`. Applies to the admin listener separately. Default:
    /// 10000.
    pub max_connections: u32,
    /// Connections open at once from one address (IPv6: one /64); more are closed at once.
    /// Peers in `trusted_proxies` are exempt (they carry many clients). Default: 256.
    pub max_connections_per_ip: u32,
    /// HTTP/2 streams (requests) one connection may have open at once. Default: 200.
    pub http2_max_concurrent_streams: u32,
    /// Largest HTTP/2 header list (SETTINGS_MAX_HEADER_LIST_SIZE), in bytes. Default: 65536.
    pub max_header_list_bytes: u32,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            tls_cert_file: None,
            tls_key_file: None,
            max_body_bytes: 1_048_576,
            trusted_proxies: Vec::new(),
            client_address_header: "x-forwarded-for".to_string(),
            trusted_hops: 0,
            cors_allowed_origins: Vec::new(),
            header_read_timeout_ms: 10_000,
            tls_handshake_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            http2_max_concurrent_streams: 200,
            max_header_list_bytes: 65_536,
        }
    }
}

/// `[admin]`.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin API and `/metrics`. Default: `127.0.0.1:8081`.
    pub listen: SocketAddr,
    /// Bearer token for the admin API. `gateway run` requires one of at least 16 characters;
    /// prefer the environment (`NEARPATH_ADMIN__TOKEN`) to the file. Default: none.
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8081)),
            token: None,
        }
    }
}

impl fmt::Debug for AdminConfig {
    /// Shows whether a token is set, never the token: configurations end up in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `[quic]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicConfig {
    /// UDP address for nodes (ALPN `nearpath-node/1`) and native clients (`nearpath/1`).
    /// Default: `0.0.0.0:4433`.
    pub listen: SocketAddr,
    /// PEM certificate chain (leaf first) that nodes and clients verify, by its SHA-256 pin or
    /// by a CA. Set both `cert_file` and `key_file`, or neither: then `gateway run` uses the
    /// self-signed pair in `generated_cert_dir`, creating it on first start. Default: none.
    pub cert_file: Option<PathBuf>,
    /// PEM private key for `cert_file`. Default: none.
    pub key_file: Option<PathBuf>,
    /// Where `gateway run` keeps the self-signed certificate (`quic-cert.pem`) and key
    /// (`quic-key.pem`) it creates, mode 0600, when `cert_file` and `key_file` are unset; they
    /// are reused on every later start and never overwritten. A relative path is relative to
    /// the working directory. Default: none (the folder of `store.path`, next to the database).
    pub generated_cert_dir: Option<PathBuf>,
    /// UDP socket receive buffer to ask the kernel for, in bytes (capped by
    /// `net.core.rmem_max`); the kernel default drops bursts from many sessions. Default: 4194304.
    pub recv_buffer_bytes: usize,
    /// A connection with no traffic for this long is closed, in milliseconds. Default: 10000.
    pub idle_timeout_ms: u64,
    /// Flow-control window of each stream a peer opens, in bytes: how much the gateway buffers
    /// per stream before the peer must wait for it to read. Sized to the largest request
    /// (`InferRequest`: 1 MiB of JSON plus its fields). Default: 1114112 (1 MiB + 64 KiB).
    pub stream_receive_window_bytes: u64,
    /// Flow-control window of a native client's whole connection once a request on it has
    /// authenticated, in bytes. Until then the connection gets one stream and
    /// `stream_receive_window_bytes`. Default: 16777216 (16 MiB).
    pub client_receive_window_bytes: u64,
    /// Flow-control window of a node's whole connection once it is registered, in bytes (video
    /// frames of all its sessions). Until then it gets its control stream only, with a 128 KiB
    /// window. Default: 33554432 (32 MiB).
    pub node_receive_window_bytes: u64,
    /// A native client connection whose requests have not authenticated within this long of
    /// the handshake is closed, in milliseconds. Default: 10000.
    pub client_auth_timeout_ms: u64,
    /// Connections from one address (IPv6: one /64) that are handshaking or not yet
    /// authenticated (clients) or registered (nodes); more are refused. Default: 32.
    pub max_unauthenticated_per_ip: u32,
    /// New connections one address (IPv6: one /64) may start per second, on average; more are
    /// refused. Default: 20.
    pub handshake_rate_per_ip_per_s: u32,
    /// How many new connections one address may start in a burst above that rate. Default: 40.
    pub handshake_burst_per_ip: u32,
    /// With more handshakes than this in progress, a peer whose address is not yet validated
    /// must first echo a retry token (one extra round trip; spoofed sources cannot).
    /// 0 validates every address. Default: 64.
    pub retry_above_handshakes: u32,
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 4433)),
            cert_file: None,
            key_file: None,
            generated_cert_dir: None,
            recv_buffer_bytes: 4 * 1024 * 1024,
            idle_timeout_ms: 10_000,
            stream_receive_window_bytes: 1_114_112,
            client_receive_window_bytes: 16 * 1024 * 1024,
            node_receive_window_bytes: 32 * 1024 * 1024,
            client_auth_timeout_ms: 10_000,
            max_unauthenticated_per_ip: 32,
            handshake_rate_per_ip_per_s: 20,
            handshake_burst_per_ip: 40,
            retry_above_handshakes: 64,
        }
    }
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// SQLite database file, created if missing; relative paths are relative to the working
    /// directory. Used when `url` is not set. Default: `nearpath-gateway.db`.
    pub path: PathBuf,
    /// PostgreSQL connection URL (`postgres://user:password@host:port/db`); when set, it selects
    /// the PostgreSQL store (several gateways share it: a federation) and `path` is ignored.
    /// Also `NEARPATH_STORE__URL`. Default: none (SQLite at `path`).
    pub url: Option<String>,
    /// Connections in the PostgreSQL pool. Default: 8.
    pub pool_size: u32,
    /// How long to wait for a PostgreSQL connection (connecting, or a free one from the pool),
    /// in milliseconds. Default: 5000.
    pub connect_timeout_ms: u64,
    /// PEM file of the certificate authorities the PostgreSQL server's certificate must chain
    /// to when `url` asks for TLS (`sslmode=require`, which is always checked: libpq's
    /// `verify-full`); only with `url`. A relative path is relative to the configuration file.
    /// Default: none (the system's trust store).
    pub ca_file: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("nearpath-gateway.db"),
            url: None,
            pool_size: 8,
            connect_timeout_ms: 5_000,
            ca_file: None,
        }
    }
}

/// `[federation]`: this gateway as one of several regional gateways sharing a store. Without
/// `gateway_id` the gateway stands alone (the default, and the demo).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// This gateway's id in the federation: 1 to 64 of `[A-Za-z0-9._-]`. Setting it joins the
    /// federation. Default: none (a standalone gateway).
    pub gateway_id: Option<String>,
    /// The region this gateway serves (free text shown to clients, e.g. `eu-central`).
    /// Default: empty.
    pub region: String,
    /// Where the gateway is, in degrees; clients and nodes without RTT figures pick the nearest.
    /// Default: 0.0, 0.0.
    pub lat: f64,
    pub lon: f64,
    /// The QUIC address nodes, clients and peer gateways reach this gateway at (`host:port`).
    /// Default: none (the QUIC listen address).
    pub public_quic_address: Option<String>,
    /// The base URL of this gateway's client HTTP API (`https://gw-eu.example.com`), used in
    /// redirects and `/v1/gateways`. Default: none (`http://` + the HTTP listen address).
    pub public_http_url: Option<String>,
    /// How often the gateway renews its entry in the gateway directory, in milliseconds.
    /// Default: 1000.
    pub heartbeat_ms: u64,
    /// How long an entry lives without renewal; a gateway silent for longer is dead to its
    /// peers, in milliseconds. Must exceed `heartbeat_ms`. Default: 3000.
    pub lease_ms: u64,
    /// How often the gateway publishes its live nodes to the node directory, in milliseconds
    /// (a bounded rate, not per heartbeat). Default: 1000.
    pub node_directory_interval_ms: u64,
    /// How a session reaches a node attached to another gateway, per workload: `trunk` relays
    /// through the gateway-to-gateway QUIC trunk (ALPN `nearpath-peer/1`), `redirect` sends the
    /// client to the peer. Defaults: inference `trunk`, game `redirect`. A game over the trunk
    /// is run by the gateway the client reached (caps, billing, pause and failover) on the
    /// peer's node, which the peer splices onto the trunk.
    pub inference_route: CrossRoute,
    pub game_route: CrossRoute,
    /// The share of a key's per-minute limit a gateway leases from the store at a time, in
    /// percent (1 to 100): smaller slices hold the fleet-wide limit tighter, larger ones cost
    /// fewer store round trips. Default: 10.
    pub limit_slice_percent: u32,
}

/// How a session reaches a node attached to another gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CrossRoute {
    Trunk,
    Redirect,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            gateway_id: None,
            region: String::new(),
            lat: 0.0,
            lon: 0.0,
            public_quic_address: None,
            public_http_url: None,
            heartbeat_ms: 1_000,
            lease_ms: 3_000,
            node_directory_interval_ms: 1_000,
            inference_route: CrossRoute::Trunk,
            game_route: CrossRoute::Redirect,
            limit_slice_percent: 10,
        }
    }
}

/// `[checker]`: the gateway checks what nodes claim against physics (README, "Checkers"):
/// probe sessions at registration and at random times while a node is idle, samples from real
/// sessions, GPU identities across nodes, and each node's RTT against the speed of light.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckerConfig {
    /// Run the checks. Off, every node stays `unverified` and nothing is demoted or
    /// reclassified. Default: true.
    pub enabled: bool,
    /// Where this gateway is, in degrees, for the location checks (RTT against the speed of
    /// light). Default: `federation.lat`/`federation.lon` when `federation.gateway_id` is set,
    /// else none: a standalone gateway without a position checks no location, and then cannot
    /// require controlled-class nodes to prove proximity.
    pub lat_deg: Option<f64>,
    pub lon_deg: Option<f64>,
    /// How far a node may be from where GeoIP puts it beyond what its RTT allows, in km. Covers
    /// GeoIP databases that only know a country (its centroid) and paths longer than great
    /// circles. Default: 1000.0.
    pub location_slack_km: f64,
    /// Controlled-class nodes must prove proximity: their RTT to the gateway nearest their
    /// claimed location must fit that location within `location_slack_km`. Needs a gateway
    /// position. Default: true.
    pub controlled_requires_proximity: bool,
    /// The registration check starts at a random time within this long of registering, in
    /// milliseconds (so probes do not look scheduled). Default: 2000.
    pub registration_probe_delay_max_ms: u64,
    /// Mean time between probes of an idle node (random, exponentially spaced), in
    /// milliseconds. Default: 600000 (10 minutes).
    pub standby_probe_interval_mean_ms: u64,
    /// A probe that has not finished within this long failed, in milliseconds. Default: 30000.
    pub probe_timeout_ms: u64,
    /// Tokens a probe asks for (`max_tokens`; the exact number varies randomly by up to a
    /// quarter so probes do not look alike). Default: 64.
    pub probe_max_tokens: u32,
    /// Probes in a row that find a node far below its claimed class before its routing rank
    /// is demoted. Default: 3.
    pub demote_after_probes: u32,
    /// How much faster than memory bandwidth / weight bytes a node may decode one stream
    /// before the claim is impossible, as a fraction (speculative decoding beats the naive
    /// bound). Default: 0.5.
    pub decode_tolerance: f64,
    /// The same for hardware encoder throughput. Default: 0.25.
    pub encode_tolerance: f64,
    /// A probe delivering less than this fraction of the claimed class's bound is far below
    /// the claim. Default: 0.1.
    pub far_below_ratio: f64,
    /// Routing penalty for a node no check has verified yet, in milliseconds (routing prefers
    /// verified nodes). Default: 10.0.
    pub unverified_penalty_ms: f64,
    /// Routing penalty for a demoted node, in milliseconds. Default: 500.0.
    pub demoted_penalty_ms: f64,
    /// How old another gateway's verdict on a node may be and still count in the majority,
    /// in milliseconds. Default: 86400000 (a day).
    pub vote_max_age_ms: u64,
    /// Weight sizes the gateway knows, by model name: a node declaring less for one of these
    /// is taken at this size (a node cannot shrink a model to pass the physics checks).
    /// Default: none.
    pub known_models: Vec<KnownModel>,
    /// Seed for the probe schedule; none draws one at start. Default: none.
    pub seed: Option<u64>,
    /// How often the gateway renews its nodes' GPU identities in the store and looks for their
    /// UUIDs on nodes of other gateways (the older node of a cross-gateway duplicate is found
    /// this way), in milliseconds. An identity counts as live for three intervals after its last
    /// renewal. Default: 30000.
    pub identity_sweep_interval_ms: u64,
    /// How long the checker waits for a node's inventory after it registers before it checks
    /// the node without one, in milliseconds. Default: 1500.
    pub inventory_wait_ms: u64,
    /// The window a node's hardware encode throughput is measured over, in milliseconds
    /// (several seconds, so a burst of frames queued behind a stall is not read as a rate the
    /// node sustains). Default: 3000.
    pub encode_window_ms: u64,
    /// A game probe lasts a random time between this and `game_probe_duration_max_ms`, in
    /// milliseconds (so probes do not look alike). Default: 2000.
    pub game_probe_duration_min_ms: u64,
    /// The longest game probe, in milliseconds. Default: 4000.
    pub game_probe_duration_max_ms: u64,
    /// A game probe passes when the node delivered at least this share of the asked frame
    /// rate, in percent (a node that renders a game cannot be held to every frame). Default:
    /// 50.
    pub game_probe_min_fps_percent: u32,
    /// A game probe sends input like a player's (mouse motion, key and button presses) at
    /// random, exponentially spaced times with this mean gap, in milliseconds, so that a node
    /// watching for input cannot tell a probe from a player. 0 sends none. Default: 40.
    pub game_probe_input_interval_mean_ms: u64,
}

/// One `[[checker.known_models]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KnownModel {
    /// The model name nodes register. Required.
    pub name: String,
    /// Its weights, in bytes. Required.
    pub weights_bytes: u64,
}

impl Default for CheckerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lat_deg: None,
            lon_deg: None,
            location_slack_km: 1000.0,
            controlled_requires_proximity: true,
            registration_probe_delay_max_ms: 2_000,
            standby_probe_interval_mean_ms: 600_000,
            probe_timeout_ms: 30_000,
            probe_max_tokens: 64,
            demote_after_probes: 3,
            decode_tolerance: 0.5,
            encode_tolerance: 0.25,
            far_below_ratio: 0.1,
            unverified_penalty_ms: 10.0,
            demoted_penalty_ms: 500.0,
            vote_max_age_ms: 86_400_000,
            known_models: Vec::new(),
            seed: None,
            identity_sweep_interval_ms: 30_000,
            inventory_wait_ms: 1_500,
            encode_window_ms: 3_000,
            game_probe_duration_min_ms: 2_000,
            game_probe_duration_max_ms: 4_000,
            game_probe_min_fps_percent: 50,
            game_probe_input_interval_mean_ms: 40,
        }
    }
}

impl GatewayConfig {
    /// Where the checker places this gateway: `checker.lat_deg`/`lon_deg`, else the
    /// federation's position when the gateway is in a federation, else none.
    pub fn checker_position(&self) -> Option<(f64, f64)> {
        match (self.checker.lat_deg, self.checker.lon_deg) {
            (Some(lat), Some(lon)) => Some((lat, lon)),
            _ if self.federation.gateway_id.is_some() => {
                Some((self.federation.lat, self.federation.lon))
            }
            _ => None,
        }
    }
}

/// Longest validity of a certificate a browser accepts through `serverCertificateHashes`
/// (Chrome refuses longer ones), in days.
pub const MAX_WEBTRANSPORT_CERT_DAYS: u32 = 14;

/// `[webtransport]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebTransportConfig {
    /// Serve WebTransport (HTTP/3, ALPN `h3`) on the QUIC listener, and `GET /v1/webtransport`
    /// on the HTTP listener. Default: true.
    pub enabled: bool,
    /// Validity of the self-signed ECDSA P-256 certificate WebTransport connections get, in days
    /// (1 to 14: browsers pin it by hash only if it is valid for at most 14 days). A new one is
    /// made when less than half of this remains. Default: 13.
    pub cert_validity_days: u32,
}

impl Default for WebTransportConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            cert_validity_days: 13,
        }
    }
}

/// `[nodes]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodesConfig {
    /// Heartbeat interval nodes are told to keep, in milliseconds. Default: 500.
    pub heartbeat_ms: u64,
    /// A node that misses this many heartbeats in a row is gone: no new sessions, and active
    /// ones fail over. Default: 3.
    pub missed_heartbeats_before_gone: u32,
    /// How long a draining node may keep its sessions, in milliseconds. Default: 30000.
    pub drain_deadline_ms: u64,
    /// Nodes reporting an older software version (`x.y.z`) are rejected with code `version`.
    /// Default: none (any version).
    pub min_software_version: Option<String>,
    /// How often the gateway checks whether a node's QUIC connection has moved to another
    /// address (connection migration), in milliseconds; it also checks on every heartbeat. A
    /// new address is located and the onboarding geofence is run again: a node that moved
    /// somewhere it could not have registered from is disconnected, otherwise its location is
    /// updated. Default: 250.
    pub path_check_interval_ms: u64,
    /// A node whose heartbeats are late while its connection still delivers packets is *slow*,
    /// not gone: it keeps its sessions but gets no new ones. A node slow for longer than this
    /// is gone all the same, in milliseconds. Default: 15000.
    pub slow_max_ms: u64,
}

impl Default for NodesConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 500,
            missed_heartbeats_before_gone: 3,
            drain_deadline_ms: 30_000,
            min_software_version: None,
            path_check_interval_ms: 250,
            slow_max_ms: 15_000,
        }
    }
}

/// `[routing]`: score = estimated client->node RTT + gateway->node RTT + penalties, in
/// milliseconds; lower is better.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Great-circle kilometres light in fibre covers per millisecond of RTT. Default: 100.0.
    pub km_per_ms: f64,
    /// Real paths are longer than great circles by this factor. Default: 1.5.
    pub path_stretch: f64,
    /// Penalty for a node at 100% load, in milliseconds, linear in load. Default: 20.0.
    pub load_penalty_ms: f64,
    /// Penalty per recent SLA penalty event of the node, in milliseconds. Default: 25.0.
    pub reliability_penalty_ms: f64,
    /// Penalty for a node whose operator is suspended but whose sessions are finishing, in
    /// milliseconds. Default: 1000.0.
    pub suspended_penalty_ms: f64,
    /// Length of the ranked list: the first node serves, the rest are the failover order.
    /// Default: 3.
    pub max_candidates: usize,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            km_per_ms: 100.0,
            path_stretch: 1.5,
            load_penalty_ms: 20.0,
            reliability_penalty_ms: 25.0,
            suspended_penalty_ms: 1000.0,
            max_candidates: 3,
        }
    }
}

/// `[inference]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Time to open a session stream on the chosen node and have it `Accepted`, in
    /// milliseconds; a node that does not answer in time (unreachable during a blip) is left for
    /// the next candidate. Default: 2000.
    pub connect_timeout_ms: u64,
    /// Time from request to the first token, in milliseconds. Default: 30000.
    pub first_token_timeout_ms: u64,
    /// Longest gap between two tokens, in milliseconds. Default: 30000.
    pub idle_timeout_ms: u64,
    /// Nodes tried per request before giving up (only before the first token is sent).
    /// Default: 3.
    pub max_attempts: u32,
    /// Requests per minute for an API key without its own limit. Default: 600.
    pub default_requests_per_minute: u32,
    /// Tokens (in + out) per minute for an API key without its own limit. Default: 200000.
    pub default_tokens_per_minute: u32,
    /// Inference requests one API key may have in flight at once (HTTP and QUIC together), for
    /// a key without its own cap; beyond it a request gets 429 `concurrency_limit_exceeded`.
    /// Default: 64.
    pub default_max_concurrent_streams: u32,
    /// How far a node's `Done` counts may stray from what the gateway counted (tokens relayed;
    /// prompt size / 4) before it is a `usage_mismatch` SLA event for the node, in percent of
    /// the gateway's count. The tenant is billed the gateway's count either way. Default: 50.
    pub usage_tolerance_percent: u32,
    /// The same tolerance as an absolute floor, in tokens (small requests are tokenised
    /// differently by every backend). Default: 16.
    pub usage_tolerance_tokens: u32,
    /// How long a model stays known after its last node left, in seconds: a request for it
    /// within this window is 503 `model_unavailable` (with `Retry-After`), not 404, and
    /// `/v1/models` keeps listing it with `"available": false`. 0 forgets a model at once.
    /// Default: 600.
    pub model_grace_s: u64,
    /// How long a request for a recently served model with no node (or only failing ones) waits
    /// for a node to (re)register before it is answered 503 `model_unavailable`, in
    /// milliseconds; so blips shorter than this are invisible. 0 answers at once. Default: 2000.
    pub unavailable_wait_ms: u64,
    /// How long a request that finds every node serving its model at capacity waits in the
    /// model's queue for a slot before it is answered 429 with `Retry-After`, in milliseconds.
    /// 0 answers at once (no queueing). Default: 10000.
    pub queue_max_wait_ms: u64,
    /// Requests one model's queue holds at most; a request finding it full is answered 429 at
    /// once (or goes to a fallback model). Default: 2000.
    pub queue_max_depth: u32,
    /// `[inference.outlier]`: ejection of failing nodes.
    pub outlier: OutlierConfig,
    /// `[inference.fallbacks]`: model name -> models tried in order when it has no capacity or
    /// every attempt failed before the first token, e.g. `"big" = ["small"]`. At most 4 per
    /// model, no self-reference, no cycles. Default: none.
    pub fallbacks: std::collections::BTreeMap<String, Vec<String>>,
    /// `[inference.prices."model-name"]`: what a model's tokens cost, for API keys' USD
    /// budgets and the spend the admin API reports. The entry `"*"` prices every model without
    /// its own entry; a model priced by neither is free (cost 0). Default: empty (all free).
    pub prices: std::collections::BTreeMap<String, ModelPrice>,
}

/// One model's price, in US dollars per million tokens billed (the gateway's count).
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Per million prompt tokens. Default: 0.
    #[serde(default)]
    pub prompt_usd_per_mtok: f64,
    /// Per million completion tokens. Default: 0.
    #[serde(default)]
    pub completion_usd_per_mtok: f64,
}

/// Longest model name a price entry may have, in bytes (a request's model name is bounded the
/// same way).
pub const MAX_PRICE_MODEL_BYTES: usize = 256;

/// `[inference.outlier]`: a node failing requests is ejected from routing for a while.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Consecutive failures (node errors after it was tried: failed, unreachable, no first
    /// token in time; not client faults nor `Busy` refusals) that eject a node. 0 disables this
    /// rule. Default: 5.
    pub consecutive_failures: u32,
    /// Error rate over the window that ejects a node, in percent; 0 disables this rule.
    /// Default: 50.
    pub error_rate_percent: u32,
    /// The sliding window the error rate is measured over, in seconds. Default: 30.
    pub window_s: u64,
    /// Requests a node must have had in the window before its error rate counts. Default: 20.
    pub min_requests: u32,
    /// The first ejection's length, in seconds; the n-th ejection lasts n times this.
    /// Default: 30.
    pub base_ejection_s: u64,
    /// The longest ejection, in seconds. Default: 300.
    pub max_ejection_s: u64,
    /// At most this share of the nodes serving a model are ejected at once, in percent; the
    /// last node of a model is never ejected. Default: 50.
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            error_rate_percent: 50,
            window_s: 30,
            min_requests: 20,
            base_ejection_s: 30,
            max_ejection_s: 300,
            max_ejected_percent: 50,
        }
    }
}

/// Fallback models one model may name at most.
pub const MAX_FALLBACKS_PER_MODEL: usize = 4;

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 2_000,
            first_token_timeout_ms: 30_000,
            idle_timeout_ms: 30_000,
            max_attempts: 3,
            default_requests_per_minute: 600,
            default_tokens_per_minute: 200_000,
            default_max_concurrent_streams: 64,
            usage_tolerance_percent: 50,
            usage_tolerance_tokens: 16,
            model_grace_s: 600,
            unavailable_wait_ms: 2_000,
            queue_max_wait_ms: 10_000,
            queue_max_depth: 2_000,
            outlier: OutlierConfig::default(),
            fallbacks: Default::default(),
            prices: Default::default(),
        }
    }
}

/// `[game]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GameConfig {
    /// Frames older than this when they reach the gateway are dropped rather than sent late, in
    /// milliseconds; a frame still on its way to the client this long after capture is abandoned
    /// (its stream reset) once the client's round trip has also passed. Default: 100.
    pub frame_budget_ms: u64,
    /// While the gateway itself is overloaded (its runtime's workers busy at least 90% of the
    /// time for 200 ms), a frame that has waited this much longer on its way in than its
    /// node's frames usually take (their least age over the last 2 to 4 s) is dropped at
    /// once, counted as `shed`, in milliseconds. What a saturated relay cannot forward waits in
    /// its receive queue, where every frame would otherwise grow nearly a whole
    /// `frame_budget_ms` old and be dropped late after costing its full price; shedding keeps
    /// the queue short and what is delivered fresh. Each node's frames are measured against that
    /// node's usual age, so a far node (or one whose clock is behind) loses no more than a near
    /// one.
    /// 0: never shed (only `frame_budget_ms` applies). Must be less than `frame_budget_ms`.
    /// Default: 25.
    pub overload_queue_budget_ms: u64,
    /// Bytes of video one session may have on their way to its client (forwarded, not yet
    /// acknowledged). A frame that would go over is dropped, never queued, and a keyframe is
    /// requested; a frame is always admitted when nothing is in flight. Default: 1048576.
    pub max_in_flight_bytes: u64,
    /// Frames one session may have on their way to its client (each is a QUIC stream until
    /// acknowledged); over it, new frames are dropped like over `max_in_flight_bytes`.
    /// Default: 16.
    pub max_in_flight_frames: u32,
    /// A keyframe (IDR) at least this often, in seconds. Default: 10.
    pub idr_interval_s: u64,
    /// Stream width when the client asks for none, in pixels. Default: 1280.
    pub default_width: u32,
    /// Stream height when the client asks for none, in pixels. Default: 720.
    pub default_height: u32,
    /// Frame rate when the client asks for none. Default: 60.
    pub default_fps: u32,
    /// Bitrate when the client asks for none, in kbit/s. Default: 10000.
    pub default_bitrate_kbps: u32,
    /// Largest width a client may ask for, in pixels. Default: 3840.
    pub max_width: u32,
    /// Largest height a client may ask for, in pixels. Default: 2160.
    pub max_height: u32,
    /// Highest frame rate a client may ask for. Default: 240.
    pub max_fps: u32,
    /// Highest bitrate a client may ask for, in kbit/s. Default: 100000.
    pub max_bitrate_kbps: u32,
    /// Lowest UDP port for WebRTC; 0 with `webrtc_udp_port_max` 0 means any port. Default: 0.
    pub webrtc_udp_port_min: u16,
    /// Highest UDP port for WebRTC (inclusive). Default: 0.
    pub webrtc_udp_port_max: u16,
    /// Address advertised in ICE candidates when the gateway is behind 1:1 NAT. Default: none.
    pub webrtc_public_ip: Option<IpAddr>,
    /// STUN/TURN URIs advertised to browsers (`stun:host:port`, `turn:host:port`).
    /// Default: [].
    pub ice_servers: Vec<String>,
    /// The video codecs browsers may get, most preferred first: `h264`, `av1`, `hevc`. A WHEP
    /// session gets the first of these that the browser's offer lists and that a node which
    /// may serve it encodes (the offer's own order does not count, so a page that wants AV1
    /// offers only AV1). Removing a name keeps browsers off that codec. Default:
    /// ["h264", "av1", "hevc"] (H.264 whenever the browser offers it).
    pub browser_codecs: Vec<String>,
    /// A WHEP session whose browser has not connected (ICE and DTLS done) this long after the
    /// answer is ended, releasing its node slot, in milliseconds. Default: 10000.
    pub webrtc_connect_timeout_ms: u64,
    /// A game session whose player has gone silent this long is ended (outcome `client_gone`)
    /// and its node slot released, in milliseconds. Native players: nothing at all received on
    /// the connection (not even an acknowledgement of the frames the gateway sent) since the
    /// gateway last sent something. Browsers: nothing on the `input` data channel (the page
    /// pings every second) once the page has pinged, or the peer connection disconnected this
    /// long. Default: 2500, so that an abandoned session's slot is free within 3 s.
    pub player_idle_timeout_ms: u64,
    /// Game sessions one API key may hold at once (native and browser together), for a key
    /// without its own cap; beyond it a start gets 429 `concurrency_limit_exceeded`. Default: 4.
    pub default_max_concurrent_sessions: u32,
    /// Game session starts per minute for one API key without its own cap (a token bucket);
    /// beyond it a start gets 429 `rate_limit_exceeded` with `Retry-After`. Default: 30.
    pub default_session_starts_per_minute: u32,
    /// A live game session's usage row is rewritten this often, so that a gateway killed
    /// mid-session loses at most this much metering, in milliseconds. Default: 10000.
    pub usage_checkpoint_ms: u64,
    /// When the node serving a session is lost, the session is paused (the player keeps its
    /// connection) and resumed on the first eligible node within this long, the same node
    /// included if it comes back; after it the session ends, in milliseconds. Default: 5000.
    pub pause_window_ms: u64,
    /// A federation only: a player resuming a session whose gateway died (`PlayResume`) waits
    /// this long for the session's own node (which keeps the game running while it reconnects)
    /// to register with this gateway; then any eligible node here takes the session, with a
    /// fresh game, in milliseconds. Default: 3000.
    pub resume_node_wait_ms: u64,
}

/// The video codecs a browser can be sent, by their configuration (and wire) names.
pub const BROWSER_CODECS: [&str; 3] = ["h264", "av1", "hevc"];

impl Default for GameConfig {
    fn default() -> Self {
        Self {
            frame_budget_ms: 100,
            overload_queue_budget_ms: 25,
            max_in_flight_bytes: 1024 * 1024,
            max_in_flight_frames: 16,
            idr_interval_s: 10,
            default_width: 1280,
            default_height: 720,
            default_fps: 60,
            default_bitrate_kbps: 10_000,
            max_width: 3840,
            max_height: 2160,
            max_fps: 240,
            max_bitrate_kbps: 100_000,
            webrtc_udp_port_min: 0,
            webrtc_udp_port_max: 0,
            webrtc_public_ip: None,
            ice_servers: Vec::new(),
            browser_codecs: BROWSER_CODECS.iter().map(|c| c.to_string()).collect(),
            webrtc_connect_timeout_ms: 10_000,
            player_idle_timeout_ms: 2_500,
            default_max_concurrent_sessions: 4,
            default_session_starts_per_minute: 30,
            usage_checkpoint_ms: 10_000,
            pause_window_ms: 5_000,
            resume_node_wait_ms: 3_000,
        }
    }
}

impl GatewayConfig {
    /// Checks everything that does not depend on how the gateway is started. Every problem is
    /// reported, not just the first; errors name [`IN_MEMORY_ORIGIN`] (the loaders name the file).
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut p = Problems::default();
        self.check(&mut p, false);
        p.into_result(IN_MEMORY_ORIGIN)
    }

    /// [`Self::validate`] plus what `gateway run` needs: an admin token of at least
    /// [`MIN_ADMIN_TOKEN_CHARS`] characters and the QUIC certificate and key.
    pub fn validate_for_run(&self) -> Result<(), ConfigErrors> {
        let mut p = Problems::default();
        self.check(&mut p, true);
        p.into_result(IN_MEMORY_ORIGIN)
    }

    pub(crate) fn check(&self, p: &mut Problems, run: bool) {
        self.check_http(p);
        self.check_admin(p, run);
        self.check_quic(p);
        self.check_store(p);
        self.check_federation(p);
        self.check_nodes(p);
        self.check_routing(p);
        self.check_inference(p);
        self.check_game(p);
        self.check_webtransport(p);
        self.check_checker(p);
        self.geo.check(p);
        self.geofence.check(p);
        self.log.check(p);
        if run {
            self.check_placeholders(p);
        }
    }

    /// Values copied unchanged from the example files, which `gateway run` must not start with.
    fn check_placeholders(&self, p: &mut Problems) {
        if let Some(token) = &self.admin.token {
            if is_placeholder_secret(token) {
                p.push(
                    "admin.token",
                    format!(
                        "is the placeholder from the example configuration: put a random secret \
                         of at least {MIN_ADMIN_TOKEN_CHARS} characters here (e.g. the output of \
                         `openssl rand -hex 32`), preferably in the environment variable \
                         NEARPATH_ADMIN__TOKEN"
                    ),
                );
            }
        }
        if let Some(url) = &self.store.url {
            if url.contains(":PASSWORD@") {
                p.push(
                    "store.url",
                    "holds the placeholder PASSWORD from the example configuration: put the \
                     database role's password there, preferably in the environment variable \
                     NEARPATH_STORE__URL",
                );
            }
        }
    }

    fn check_store(&self, p: &mut Problems) {
        let s = &self.store;
        match &s.url {
            None if s.path.as_os_str().is_empty() => p.push("store.path", "must not be empty"),
            None => {}
            Some(url) => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    p.push(
                        "store.url",
                        "must be a PostgreSQL URL (postgres://user:password@host:port/db)",
                    );
                }
                p.positive("store.pool_size", s.pool_size);
                p.positive("store.connect_timeout_ms", s.connect_timeout_ms);
                let tls = url.contains("sslmode=require") || url.contains("sslmode=verify-");
                if s.ca_file.is_some() && !tls {
                    p.push(
                        "store.ca_file",
                        "applies only when store.url asks for TLS (sslmode=require or verify-full)",
                    );
                }
            }
        }
        if s.url.is_none() && s.ca_file.is_some() {
            p.push(
                "store.ca_file",
                "applies only to a PostgreSQL store (store.url)",
            );
        }
    }

    fn check_federation(&self, p: &mut Problems) {
        let f = &self.federation;
        if let Some(id) = &f.gateway_id {
            let ok = (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !ok {
                p.push(
                    "federation.gateway_id",
                    "must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'",
                );
            }
        }
        if !(-90.0..=90.0).contains(&f.lat) {
            p.push("federation.lat", "must be between -90 and 90");
        }
        if !(-180.0..=180.0).contains(&f.lon) {
            p.push("federation.lon", "must be between -180 and 180");
        }
        p.positive("federation.heartbeat_ms", f.heartbeat_ms);
        p.positive(
            "federation.node_directory_interval_ms",
            f.node_directory_interval_ms,
        );
        if f.lease_ms <= f.heartbeat_ms {
            p.push(
                "federation.lease_ms",
                format!(
                    "must exceed federation.heartbeat_ms ({}): an entry would expire between renewals",
                    f.heartbeat_ms
                ),
            );
        }
        if !(1..=100).contains(&f.limit_slice_percent) {
            p.push(
                "federation.limit_slice_percent",
                "must be between 1 and 100",
            );
        }
        if let Some(u) = &f.public_http_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                p.push(
                    "federation.public_http_url",
                    "must start with http:// or https://",
                );
            }
        }
    }

    fn check_http(&self, p: &mut Problems) {
        let h = &self.http;
        both_or_neither(
            p,
            ("http.tls_cert_file", h.tls_cert_file.is_some()),
            ("http.tls_key_file", h.tls_key_file.is_some()),
        );
        p.positive("http.max_body_bytes", h.max_body_bytes);
        for (i, net) in h.trusted_proxies.iter().enumerate() {
            if *net != net.trunc() {
                p.push(
                    format!("http.trusted_proxies[{i}]"),
                    format!("{net} has host bits set (did you mean {}?)", net.trunc()),
                );
            }
        }
        p.positive("http.header_read_timeout_ms", h.header_read_timeout_ms);
        if h.header_read_timeout_ms > MAX_HEADER_READ_TIMEOUT_MS {
            p.push(
                "http.header_read_timeout_ms",
                format!(
                    "must be at most {MAX_HEADER_READ_TIMEOUT_MS} (got {}): slow clients must not hold connections",
                    h.header_read_timeout_ms
                ),
            );
        }
        p.positive("http.tls_handshake_timeout_ms", h.tls_handshake_timeout_ms);
        p.positive("http.body_read_timeout_ms", h.body_read_timeout_ms);
        p.positive("http.idle_timeout_ms", h.idle_timeout_ms);
        p.positive("http.max_connections", h.max_connections);
        p.positive("http.max_connections_per_ip", h.max_connections_per_ip);
        if h.max_connections_per_ip > h.max_connections {
            p.push(
                "http.max_connections_per_ip",
                format!(
                    "must not exceed http.max_connections ({} > {})",
                    h.max_connections_per_ip, h.max_connections
                ),
            );
        }
        p.positive(
            "http.http2_max_concurrent_streams",
            h.http2_max_concurrent_streams,
        );
        if h.max_header_list_bytes < MIN_HEADER_LIST_BYTES {
            p.push(
                "http.max_header_list_bytes",
                format!(
                    "must be at least {MIN_HEADER_LIST_BYTES} (got {})",
                    h.max_header_list_bytes
                ),
            );
        }
        if h.trusted_hops > 0 && h.trusted_proxies.is_empty() {
            p.push(
                "http.trusted_hops",
                format!(
                    "{} hop(s) configured but http.trusted_proxies is empty: the header is read \
                     only from a trusted peer, so list your load balancers there",
                    h.trusted_hops
                ),
            );
        }
        if h.trusted_hops > 64 {
            p.push(
                "http.trusted_hops",
                format!("must be at most 64 (got {})", h.trusted_hops),
            );
        }
        if !is_header_name(&h.client_address_header) {
            p.push(
                "http.client_address_header",
                format!(
                    "{:?} is not an HTTP header name (e.g. \"x-forwarded-for\", \"forwarded\", \
                     \"x-real-ip\")",
                    h.client_address_header
                ),
            );
        }
        for (i, origin) in h.cors_allowed_origins.iter().enumerate() {
            if origin != "*" && !is_web_origin(origin) {
                p.push(
                    format!("http.cors_allowed_origins[{i}]"),
                    format!("{origin:?} is not an origin (scheme://host[:port], no path) or \"*\""),
                );
            }
        }
    }

    fn check_admin(&self, p: &mut Problems, run: bool) {
        if self.admin.listen == self.http.listen && self.admin.listen.port() != 0 {
            p.push(
                "admin.listen",
                format!("{} is also http.listen", self.admin.listen),
            );
        }
        match &self.admin.token {
            Some(token) => {
                check_secret(p, "admin.token", token);
                let chars = token.chars().count();
                if run && !token.is_empty() && chars < MIN_ADMIN_TOKEN_CHARS {
                    p.push(
                        "admin.token",
                        format!(
                            "must be at least {MIN_ADMIN_TOKEN_CHARS} characters (got {chars})"
                        ),
                    );
                }
            }
            None if run => p.push(
                "admin.token",
                "required: set it in the file or in the environment variable \
                 NEARPATH_ADMIN__TOKEN",
            ),
            None => {}
        }
    }

    fn check_quic(&self, p: &mut Problems) {
        let q = &self.quic;
        // Neither file set is runnable too: `gateway run` then creates (once) and reuses a
        // self-signed pair in `generated_cert_dir`.
        both_or_neither(
            p,
            ("quic.cert_file", q.cert_file.is_some()),
            ("quic.key_file", q.key_file.is_some()),
        );
        if q.cert_file.is_some() && q.generated_cert_dir.is_some() {
            p.push(
                "quic.generated_cert_dir",
                "set either quic.cert_file and quic.key_file or quic.generated_cert_dir, not both",
            );
        }
        p.positive("quic.recv_buffer_bytes", q.recv_buffer_bytes);
        p.positive("quic.idle_timeout_ms", q.idle_timeout_ms);
        for (path, value) in [
            (
                "quic.stream_receive_window_bytes",
                q.stream_receive_window_bytes,
            ),
            (
                "quic.client_receive_window_bytes",
                q.client_receive_window_bytes,
            ),
            (
                "quic.node_receive_window_bytes",
                q.node_receive_window_bytes,
            ),
        ] {
            if !(MIN_QUIC_WINDOW_BYTES..=MAX_QUIC_WINDOW_BYTES).contains(&value) {
                p.push(
                    path,
                    format!(
                        "must be between {MIN_QUIC_WINDOW_BYTES} and {MAX_QUIC_WINDOW_BYTES} (got {value})"
                    ),
                );
            }
        }
        p.positive("quic.client_auth_timeout_ms", q.client_auth_timeout_ms);
        p.positive(
            "quic.max_unauthenticated_per_ip",
            q.max_unauthenticated_per_ip,
        );
        p.positive(
            "quic.handshake_rate_per_ip_per_s",
            q.handshake_rate_per_ip_per_s,
        );
        p.positive("quic.handshake_burst_per_ip", q.handshake_burst_per_ip);
    }

    fn check_webtransport(&self, p: &mut Problems) {
        let days = self.webtransport.cert_validity_days;
        if !(1..=MAX_WEBTRANSPORT_CERT_DAYS).contains(&days) {
            p.push(
                "webtransport.cert_validity_days",
                format!(
                    "{days} is outside 1..={MAX_WEBTRANSPORT_CERT_DAYS} (browsers refuse pinned certificates valid for longer than 14 days)"
                ),
            );
        }
    }

    fn check_nodes(&self, p: &mut Problems) {
        let n = &self.nodes;
        p.positive("nodes.heartbeat_ms", n.heartbeat_ms);
        p.positive(
            "nodes.missed_heartbeats_before_gone",
            n.missed_heartbeats_before_gone,
        );
        p.positive("nodes.drain_deadline_ms", n.drain_deadline_ms);
        p.positive("nodes.path_check_interval_ms", n.path_check_interval_ms);
        p.positive("nodes.slow_max_ms", n.slow_max_ms);
        if let Some(v) = &n.min_software_version {
            if parse_version(v).is_none() || v.contains(['-', '+']) {
                p.push(
                    "nodes.min_software_version",
                    format!("{v:?} is not a version x.y.z (e.g. \"0.1.0\")"),
                );
            }
        }
    }

    fn check_checker(&self, p: &mut Problems) {
        let c = &self.checker;
        match (c.lat_deg, c.lon_deg) {
            (Some(lat), Some(lon)) => {
                if !(-90.0..=90.0).contains(&lat) {
                    p.push("checker.lat_deg", "must be between -90 and 90");
                }
                if !(-180.0..=180.0).contains(&lon) {
                    p.push("checker.lon_deg", "must be between -180 and 180");
                }
            }
            (None, None) => {}
            (Some(_), None) => p.push("checker.lon_deg", "must be set with checker.lat_deg"),
            (None, Some(_)) => p.push("checker.lat_deg", "must be set with checker.lon_deg"),
        }
        p.non_negative_finite("checker.location_slack_km", c.location_slack_km);
        p.positive(
            "checker.standby_probe_interval_mean_ms",
            c.standby_probe_interval_mean_ms,
        );
        p.positive("checker.probe_timeout_ms", c.probe_timeout_ms);
        if !(1..=4096).contains(&c.probe_max_tokens) {
            p.push("checker.probe_max_tokens", "must be between 1 and 4096");
        }
        p.positive("checker.demote_after_probes", c.demote_after_probes);
        p.non_negative_finite("checker.decode_tolerance", c.decode_tolerance);
        p.non_negative_finite("checker.encode_tolerance", c.encode_tolerance);
        if !(c.far_below_ratio.is_finite() && (0.0..1.0).contains(&c.far_below_ratio)) {
            p.push("checker.far_below_ratio", "must be at least 0 and below 1");
        }
        p.non_negative_finite("checker.unverified_penalty_ms", c.unverified_penalty_ms);
        p.non_negative_finite("checker.demoted_penalty_ms", c.demoted_penalty_ms);
        p.positive("checker.vote_max_age_ms", c.vote_max_age_ms);
        // At least a second: every renewal is a store write per node.
        if c.identity_sweep_interval_ms < 1_000 {
            p.push(
                "checker.identity_sweep_interval_ms",
                "must be at least 1000",
            );
        }
        p.positive("checker.encode_window_ms", c.encode_window_ms);
        p.positive(
            "checker.game_probe_duration_min_ms",
            c.game_probe_duration_min_ms,
        );
        if c.game_probe_duration_max_ms < c.game_probe_duration_min_ms {
            p.push(
                "checker.game_probe_duration_max_ms",
                "must be at least checker.game_probe_duration_min_ms",
            );
        }
        if c.game_probe_input_interval_mean_ms > 10_000 {
            p.push(
                "checker.game_probe_input_interval_mean_ms",
                "must be at most 10000 (0 sends no input)",
            );
        }
        if !(1..=100).contains(&c.game_probe_min_fps_percent) {
            p.push(
                "checker.game_probe_min_fps_percent",
                "must be between 1 and 100",
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, m) in c.known_models.iter().enumerate() {
            if m.name.is_empty() || m.name.len() > 256 {
                p.push(
                    format!("checker.known_models[{i}].name"),
                    "must be 1 to 256 bytes",
                );
            } else if !seen.insert(m.name.as_str()) {
                p.push(
                    format!("checker.known_models[{i}].name"),
                    format!("{:?} is listed twice", m.name),
                );
            }
            if m.weights_bytes == 0 || m.weights_bytes > MAX_MODEL_WEIGHTS_BYTES {
                p.push(
                    format!("checker.known_models[{i}].weights_bytes"),
                    format!("must be between 1 and {MAX_MODEL_WEIGHTS_BYTES} (10 TB)"),
                );
            }
        }
    }

    fn check_routing(&self, p: &mut Problems) {
        let r = &self.routing;
        p.positive_finite("routing.km_per_ms", r.km_per_ms);
        p.positive_finite("routing.path_stretch", r.path_stretch);
        p.non_negative_finite("routing.load_penalty_ms", r.load_penalty_ms);
        p.non_negative_finite("routing.reliability_penalty_ms", r.reliability_penalty_ms);
        p.non_negative_finite("routing.suspended_penalty_ms", r.suspended_penalty_ms);
        p.positive("routing.max_candidates", r.max_candidates);
    }

    fn check_inference(&self, p: &mut Problems) {
        let i = &self.inference;
        p.positive("inference.connect_timeout_ms", i.connect_timeout_ms);
        p.positive("inference.first_token_timeout_ms", i.first_token_timeout_ms);
        p.positive("inference.idle_timeout_ms", i.idle_timeout_ms);
        p.positive("inference.max_attempts", i.max_attempts);
        p.positive(
            "inference.default_requests_per_minute",
            i.default_requests_per_minute,
        );
        p.positive(
            "inference.default_tokens_per_minute",
            i.default_tokens_per_minute,
        );
        p.positive(
            "inference.default_max_concurrent_streams",
            i.default_max_concurrent_streams,
        );
        if i.model_grace_s > 86_400 {
            p.push(
                "inference.model_grace_s",
                format!("must be at most 86400 (one day) (got {})", i.model_grace_s),
            );
        }
        if i.unavailable_wait_ms > 60_000 {
            p.push(
                "inference.unavailable_wait_ms",
                format!(
                    "must be at most 60000 (a held request costs a connection) (got {})",
                    i.unavailable_wait_ms
                ),
            );
        }
        if i.queue_max_wait_ms > 600_000 {
            p.push(
                "inference.queue_max_wait_ms",
                format!(
                    "must be at most 600000 (a queued request costs a connection) (got {})",
                    i.queue_max_wait_ms
                ),
            );
        }
        if i.queue_max_depth > 1_000_000 {
            p.push(
                "inference.queue_max_depth",
                format!("must be at most 1000000 (got {})", i.queue_max_depth),
            );
        }
        let o = &i.outlier;
        if o.error_rate_percent > 100 {
            p.push(
                "inference.outlier.error_rate_percent",
                format!("must be at most 100 (got {})", o.error_rate_percent),
            );
        }
        if o.max_ejected_percent > 100 {
            p.push(
                "inference.outlier.max_ejected_percent",
                format!("must be at most 100 (got {})", o.max_ejected_percent),
            );
        }
        p.positive("inference.outlier.window_s", o.window_s);
        p.positive("inference.outlier.base_ejection_s", o.base_ejection_s);
        if o.max_ejection_s < o.base_ejection_s {
            p.push(
                "inference.outlier.max_ejection_s",
                format!(
                    "must be at least base_ejection_s ({}) (got {})",
                    o.base_ejection_s, o.max_ejection_s
                ),
            );
        }
        check_fallbacks(&i.fallbacks, p);
        for (model, price) in &i.prices {
            let path = format!("inference.prices.{model:?}");
            if model.trim().is_empty() || model.len() > MAX_PRICE_MODEL_BYTES {
                p.push(
                    &path,
                    format!("a model name of 1..={MAX_PRICE_MODEL_BYTES} bytes (or \"*\")"),
                );
            }
            for (field, v) in [
                ("prompt_usd_per_mtok", price.prompt_usd_per_mtok),
                ("completion_usd_per_mtok", price.completion_usd_per_mtok),
            ] {
                // A million tokens for more than a million dollars is a typo, not a price.
                if !(v.is_finite() && (0.0..=1_000_000.0).contains(&v)) {
                    p.push(
                        format!("{path}.{field}"),
                        format!("must be a number from 0 to 1000000 (got {v})"),
                    );
                }
            }
        }
    }

    fn check_game(&self, p: &mut Problems) {
        let g = &self.game;
        p.positive("game.frame_budget_ms", g.frame_budget_ms);
        // (A zero frame budget is reported above, alone.)
        if g.frame_budget_ms > 0
            && g.overload_queue_budget_ms > 0
            && g.overload_queue_budget_ms >= g.frame_budget_ms
        {
            p.push(
                "game.overload_queue_budget_ms",
                format!(
                    "must be less than game.frame_budget_ms ({}), or 0 to never shed (got {})",
                    g.frame_budget_ms, g.overload_queue_budget_ms
                ),
            );
        }
        p.positive("game.max_in_flight_bytes", g.max_in_flight_bytes);
        p.positive("game.max_in_flight_frames", g.max_in_flight_frames);
        p.positive("game.idr_interval_s", g.idr_interval_s);
        p.positive(
            "game.webrtc_connect_timeout_ms",
            g.webrtc_connect_timeout_ms,
        );
        p.positive("game.player_idle_timeout_ms", g.player_idle_timeout_ms);
        p.positive(
            "game.default_max_concurrent_sessions",
            g.default_max_concurrent_sessions,
        );
        p.positive(
            "game.default_session_starts_per_minute",
            g.default_session_starts_per_minute,
        );
        p.positive("game.usage_checkpoint_ms", g.usage_checkpoint_ms);
        p.positive("game.pause_window_ms", g.pause_window_ms);
        p.positive("game.resume_node_wait_ms", g.resume_node_wait_ms);
        for (name, default, max) in [
            ("width", g.default_width, g.max_width),
            ("height", g.default_height, g.max_height),
            ("fps", g.default_fps, g.max_fps),
            ("bitrate_kbps", g.default_bitrate_kbps, g.max_bitrate_kbps),
        ] {
            p.positive(&format!("game.default_{name}"), default);
            p.positive(&format!("game.max_{name}"), max);
            if default > max {
                p.push(
                    format!("game.default_{name}"),
                    format!("{default} is greater than game.max_{name} {max}"),
                );
            }
        }
        // H.264 with 4:2:0 chroma subsampling needs even dimensions.
        for (path, v) in [
            ("game.default_width", g.default_width),
            ("game.default_height", g.default_height),
            ("game.max_width", g.max_width),
            ("game.max_height", g.max_height),
        ] {
            if v % 2 == 1 {
                p.push(path, format!("{v} must be even (H.264 4:2:0)"));
            }
        }
        let (min, max) = (g.webrtc_udp_port_min, g.webrtc_udp_port_max);
        if (min == 0) != (max == 0) {
            let path = if min == 0 {
                "game.webrtc_udp_port_min"
            } else {
                "game.webrtc_udp_port_max"
            };
            p.push(
                path,
                "set webrtc_udp_port_min and webrtc_udp_port_max together (both 0 means any port)",
            );
        } else if min > max {
            p.push(
                "game.webrtc_udp_port_min",
                format!("{min} is greater than game.webrtc_udp_port_max {max}"),
            );
        }
        if let Some(ip) = g.webrtc_public_ip {
            if ip.is_unspecified() {
                p.push(
                    "game.webrtc_public_ip",
                    format!("{ip} is not an address a browser can reach"),
                );
            }
        }
        if g.browser_codecs.is_empty() {
            p.push(
                "game.browser_codecs",
                "list at least one codec (\"h264\" is what every browser decodes)",
            );
        }
        for (i, name) in g.browser_codecs.iter().enumerate() {
            if !BROWSER_CODECS.contains(&name.as_str()) {
                p.push(
                    format!("game.browser_codecs[{i}]"),
                    format!("{name:?} is not a codec browsers can be sent (h264, av1, hevc)"),
                );
            } else if g.browser_codecs[..i].contains(name) {
                p.push(
                    format!("game.browser_codecs[{i}]"),
                    format!("{name:?} is listed twice"),
                );
            }
        }
        for (i, uri) in g.ice_servers.iter().enumerate() {
            let ok = ["stun:", "stuns:", "turn:", "turns:"].iter().any(|scheme| {
                uri.strip_prefix(scheme)
                    .is_some_and(|rest| !rest.is_empty())
            }) && !uri.contains(char::is_whitespace);
            if !ok {
                p.push(
                    format!("game.ice_servers[{i}]"),
                    format!("{uri:?} is not a stun:, stuns:, turn: or turns: URI"),
                );
            }
        }
    }

    /// One line for `gateway check-config`: listeners, database, geo source, rules, overrides.
    pub fn summary(&self) -> String {
        let scheme = if self.http.tls_cert_file.is_some() {
            "https"
        } else {
            "http"
        };
        let geo = match &self.geo.database {
            Some(path) => format!("geo database {}", path.display()),
            None => "embedded geo database".to_string(),
        };
        let anonymous = if self.geo.anonymous_ip_database.is_some() {
            " + anonymous-IP database"
        } else {
            ""
        };
        let enabled = self.geofence.enabled_rules().count();
        format!(
            "{scheme} {}, admin {} ({}), quic {}, database {}, {geo}{anonymous}, \
             {enabled} of {} geofence rules enabled, {} geo overrides, {} country sets, log {} ({})",
            self.http.listen,
            self.admin.listen,
            if self.admin.token.is_some() {
                "token set"
            } else {
                "no token"
            },
            self.quic.listen,
            self.store.path.display(),
            self.geofence.rules.len(),
            self.geo.overrides.len(),
            self.geofence.country_sets.len(),
            self.log.level,
            self.log.format.as_str(),
        )
    }

    /// A configuration to try the gateway on one machine: the defaults, plus admin token
    /// `demo-admin` (too short for [`Self::validate_for_run`], on purpose: a demo is not a
    /// deployment), CORS open to any origin, and geo overrides placing the loopback addresses
    /// `127.0.0.1` and `::1` in `US` so that local clients and nodes have a location (other
    /// loopback addresses stay free for tests to place elsewhere). The store path is left at its
    /// default for the caller to replace; there is no QUIC certificate (the caller generates one).
    pub fn demo() -> GatewayConfig {
        let mut cfg = GatewayConfig::default();
        cfg.admin.token = Some("demo-admin".into());
        cfg.http.cors_allowed_origins = vec!["*".into()];
        cfg.geo.overrides = [
            IpNet::from(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ]
        .into_iter()
        .map(|cidr| GeoOverride {
            cidr,
            country: "US".into(),
            subdivision: None,
            lat: None,
            lon: None,
        })
        .collect();
        cfg
    }
}

/// Reports the missing one of two settings that only make sense together.
pub(crate) fn both_or_neither(p: &mut Problems, a: (&str, bool), b: (&str, bool)) {
    match (a.1, b.1) {
        (true, false) => p.push(b.0, format!("required when {} is set", a.0)),
        (false, true) => p.push(a.0, format!("required when {} is set", b.0)),
        _ => {}
    }
}

/// `scheme://host[:port]` with an http(s) scheme and no path, as browsers send in `Origin`.
fn is_web_origin(s: &str) -> bool {
    let Some(rest) = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
    else {
        return false;
    };
    !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@'])
        && !rest.contains(char::is_whitespace)
        && !rest.starts_with(':')
}

/// `inference.fallbacks`: names non-empty, no self-reference, at most
/// [`MAX_FALLBACKS_PER_MODEL`] per model, no duplicates, and no cycles (a fallback's own
/// fallbacks are followed, so a cycle would only loop).
fn check_fallbacks(fallbacks: &std::collections::BTreeMap<String, Vec<String>>, p: &mut Problems) {
    for (model, to) in fallbacks {
        let path = format!("inference.fallbacks.{model}");
        if model.trim().is_empty() {
            p.push(&path, "the model name must not be empty");
        }
        if to.len() > MAX_FALLBACKS_PER_MODEL {
            p.push(
                &path,
                format!(
                    "at most {MAX_FALLBACKS_PER_MODEL} fallbacks per model (got {})",
                    to.len()
                ),
            );
        }
        for (i, b) in to.iter().enumerate() {
            let at = format!("{path}[{i}]");
            if b.trim().is_empty() {
                p.push(&at, "the model name must not be empty");
            } else if b == model {
                p.push(&at, format!("{model} cannot fall back to itself"));
            } else if to[..i].contains(b) {
                p.push(&at, format!("{b} is named twice"));
            }
        }
    }
    // A cycle: following fallbacks from a model leads back to it.
    for model in fallbacks.keys() {
        let mut seen = std::collections::BTreeSet::new();
        let mut stack: Vec<&String> = fallbacks[model].iter().collect();
        while let Some(m) = stack.pop() {
            if m == model {
                p.push(
                    format!("inference.fallbacks.{model}"),
                    format!("the fallbacks of {model} lead back to it (a cycle)"),
                );
                break;
            }
            if seen.insert(m.clone()) {
                if let Some(next) = fallbacks.get(m) {
                    stack.extend(next.iter());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_but_are_not_runnable() {
        let cfg = GatewayConfig::default();
        assert_eq!(cfg.validate(), Ok(()));
        let errs = cfg.validate_for_run().unwrap_err();
        let paths: Vec<_> = errs.errors.iter().map(|e| e.path.as_str()).collect();
        // No certificate is runnable: `gateway run` creates a self-signed one.
        assert_eq!(paths, ["admin.token"]);
    }

    #[test]
    fn webtransport_cert_validity_is_1_to_14_days_and_named() {
        let mut cfg = GatewayConfig::default();
        assert_eq!(cfg.webtransport.cert_validity_days, 13);
        for days in [1, 14] {
            cfg.webtransport.cert_validity_days = days;
            assert_eq!(cfg.validate(), Ok(()), "{days}");
        }
        for days in [0, 15, 365] {
            cfg.webtransport.cert_validity_days = days;
            let errs = cfg.validate().unwrap_err();
            let paths: Vec<_> = errs.errors.iter().map(|e| e.path.as_str()).collect();
            assert_eq!(paths, ["webtransport.cert_validity_days"], "{days}");
        }
    }

    #[test]
    fn checker_values_are_checked_and_name_their_path() {
        let mut cfg = GatewayConfig::default();
        cfg.checker.lat_deg = Some(91.0);
        cfg.checker.location_slack_km = f64::NAN;
        cfg.checker.far_below_ratio = 1.0;
        cfg.checker.probe_max_tokens = 0;
        cfg.checker.known_models = vec![
            KnownModel {
                name: "m".into(),
                weights_bytes: 0,
            },
            KnownModel {
                name: "m".into(),
                weights_bytes: MAX_MODEL_WEIGHTS_BYTES + 1,
            },
        ];
        let errs = cfg.validate().unwrap_err();
        let paths: Vec<_> = errs.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "checker.lon_deg",
                "checker.location_slack_km",
                "checker.probe_max_tokens",
                "checker.far_below_ratio",
                "checker.known_models[0].weights_bytes",
                "checker.known_models[1].name",
                "checker.known_models[1].weights_bytes",
            ]
        );
    }

    #[test]
    fn checker_probe_thresholds_are_checked_and_name_their_path() {
        let mut cfg = GatewayConfig::default();
        cfg.checker.identity_sweep_interval_ms = 999;
        cfg.checker.encode_window_ms = 0;
        cfg.checker.game_probe_duration_min_ms = 0;
        cfg.checker.game_probe_duration_max_ms = 0;
        cfg.checker.game_probe_min_fps_percent = 0;
        let errs = cfg.validate().unwrap_err();
        let paths: Vec<_> = errs.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "checker.identity_sweep_interval_ms",
                "checker.encode_window_ms",
                "checker.game_probe_duration_min_ms",
                "checker.game_probe_min_fps_percent",
            ]
        );
        let mut cfg = GatewayConfig::default();
        cfg.checker.game_probe_duration_min_ms = 5_000;
        cfg.checker.game_probe_min_fps_percent = 101;
        cfg.checker.game_probe_input_interval_mean_ms = 10_001;
        let errs = cfg.validate().unwrap_err();
        let paths: Vec<_> = errs.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "checker.game_probe_duration_max_ms",
                "checker.game_probe_input_interval_mean_ms",
                "checker.game_probe_min_fps_percent",
            ]
        );
        let mut cfg = GatewayConfig::default();
        cfg.checker.identity_sweep_interval_ms = 1_000;
        cfg.checker.game_probe_duration_min_ms = 3_000;
        cfg.checker.game_probe_duration_max_ms = 3_000;
        cfg.checker.game_probe_min_fps_percent = 100;
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn the_checker_places_the_gateway_where_it_is_told_else_where_the_federation_is() {
        let mut cfg = GatewayConfig::default();
        assert_eq!(cfg.checker_position(), None, "standalone, no position");
        cfg.federation.gateway_id = Some("eu".into());
        cfg.federation.lat = 50.1;
        cfg.federation.lon = 8.7;
        assert_eq!(cfg.checker_position(), Some((50.1, 8.7)));
        cfg.checker.lat_deg = Some(52.5);
        cfg.checker.lon_deg = Some(13.4);
        assert_eq!(cfg.checker_position(), Some((52.5, 13.4)));
    }

    #[test]
    fn demo_validates_and_places_loopback() {
        let cfg = GatewayConfig::demo();
        assert_eq!(cfg.validate(), Ok(()));
        assert_eq!(cfg.admin.token.as_deref(), Some("demo-admin"));
        assert_eq!(cfg.http.cors_allowed_origins, ["*"]);
        let cidrs: Vec<String> = cfg
            .geo
            .overrides
            .iter()
            .map(|o| o.cidr.to_string())
            .collect();
        assert_eq!(cidrs, ["127.0.0.1/32", "::1/128"]);
        // A test may still place another loopback address elsewhere.
        let mut cfg = cfg;
        cfg.geo.overrides.push(GeoOverride {
            cidr: "127.0.0.2/32".parse().unwrap(),
            country: "CN".into(),
            subdivision: None,
            lat: None,
            lon: None,
        });
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn admin_debug_redacts_token() {
        let cfg = GatewayConfig::demo();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("demo-admin"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn origins() {
        for ok in [
            "https://example.com",
            "http://localhost:3000",
            "https://[::1]:8443",
        ] {
            assert!(is_web_origin(ok), "{ok}");
        }
        for bad in [
            "example.com",
            "https://",
            "https://a.com/",
            "ftp://a.com",
            "https://a b",
        ] {
            assert!(!is_web_origin(bad), "{bad}");
        }
    }

    #[test]
    fn summary_mentions_the_essentials() {
        let s = GatewayConfig::default().summary();
        assert_eq!(
            s,
            "http 127.0.0.1:8080, admin 127.0.0.1:8081 (no token), quic 0.0.0.0:4433, database \
             nearpath-gateway.db, embedded geo database, 2 of 3 geofence rules enabled, 0 geo \
             overrides, 3 country sets, log info (text)"
        );
        assert!(!s.contains('\n'));
    }
    #[test]
    fn model_prices_parse_and_bad_ones_are_named_by_path() {
        let text = r#"
[inference.prices."org/m"]
prompt_usd_per_mtok = 0.5
completion_usd_per_mtok = 1.5
[inference.prices."*"]
completion_usd_per_mtok = 2
"#;
        let cfg = crate::parse_gateway(text, "t.toml", &[]).expect("valid prices");
        let m = cfg.inference.prices["org/m"];
        assert_eq!(
            (m.prompt_usd_per_mtok, m.completion_usd_per_mtok),
            (0.5, 1.5)
        );
        assert_eq!(cfg.inference.prices["*"].prompt_usd_per_mtok, 0.0);
        let bad = r#"
[inference.prices."m"]
prompt_usd_per_mtok = -1
completion_usd_per_mtok = inf
"#;
        let errs = crate::parse_gateway(bad, "t.toml", &[]).unwrap_err();
        let paths: Vec<_> = errs.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "inference.prices.\"m\".prompt_usd_per_mtok",
                "inference.prices.\"m\".completion_usd_per_mtok"
            ]
        );
        let unknown = "[inference.prices.\"m\"]\nprompt_usd = 1\n";
        assert!(crate::parse_gateway(unknown, "t.toml", &[]).is_err());
    }

    fn fallback_problems(pairs: &[(&str, &[&str])]) -> Vec<(String, String)> {
        let mut cfg = GatewayConfig::default();
        for (m, to) in pairs {
            cfg.inference
                .fallbacks
                .insert(m.to_string(), to.iter().map(|s| s.to_string()).collect());
        }
        match cfg.validate() {
            Ok(()) => Vec::new(),
            Err(e) => e
                .errors
                .iter()
                .map(|e| (e.path.clone(), e.message.clone()))
                .collect(),
        }
    }

    #[test]
    fn fallbacks_are_validated_with_their_paths() {
        assert!(fallback_problems(&[("big", &["small", "tiny"]), ("small", &["tiny"])]).is_empty());
        let p = fallback_problems(&[("big", &["small", "big"])]);
        assert_eq!(p[0].0, "inference.fallbacks.big[1]");
        assert!(p[0].1.contains("itself"), "{p:?}");
        let p = fallback_problems(&[("big", &[""])]);
        assert_eq!(p[0].0, "inference.fallbacks.big[0]");
        let p = fallback_problems(&[("big", &["a", "b", "c", "d", "e"])]);
        assert_eq!(p[0].0, "inference.fallbacks.big");
        assert!(p[0].1.contains("at most 4"), "{p:?}");
        let p = fallback_problems(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]);
        let paths: Vec<_> = p.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            paths,
            [
                "inference.fallbacks.a",
                "inference.fallbacks.b",
                "inference.fallbacks.c"
            ]
        );
        assert!(p[0].1.contains("cycle"), "{p:?}");
    }

    #[test]
    fn outlier_settings_are_validated_with_their_paths() {
        let mut cfg = GatewayConfig::default();
        cfg.inference.outlier.error_rate_percent = 101;
        cfg.inference.outlier.max_ejected_percent = 200;
        cfg.inference.outlier.window_s = 0;
        cfg.inference.outlier.max_ejection_s = 1;
        let errs = cfg.validate().unwrap_err();
        let paths: Vec<_> = errs.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "inference.outlier.error_rate_percent",
                "inference.outlier.max_ejected_percent",
                "inference.outlier.window_s",
                "inference.outlier.max_ejection_s"
            ]
        );
    }

    #[test]
    fn quic_certificate_files_come_in_pairs_or_not_at_all() {
        let mut cfg = GatewayConfig::default();
        cfg.admin.token = Some("0123456789abcdef".into());
        cfg.validate_for_run().unwrap();
        cfg.quic.key_file = Some("key.pem".into());
        let errs = cfg.validate_for_run().unwrap_err();
        let paths: Vec<_> = errs.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["quic.cert_file"]);
        cfg.quic.cert_file = Some("cert.pem".into());
        cfg.validate_for_run().unwrap();
        // A directory for generated files beside configured files is a contradiction.
        cfg.quic.generated_cert_dir = Some("/var/lib/nearpath".into());
        let errs = cfg.validate_for_run().unwrap_err();
        let paths: Vec<_> = errs.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["quic.generated_cert_dir"]);
    }
}
