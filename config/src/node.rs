//! The edge node's configuration root and its sections.

use crate::common::{check_name, check_secret, is_example_host, is_placeholder_secret, LogConfig};
use crate::error::{ConfigErrors, Problems};
use crate::gateway::IN_MEMORY_ORIGIN;
use crate::geo::{gpu_class_name_problem, is_gpu_class_name, is_label};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// The GPU class of a node without GPUs. Reserved: no GPU and no pattern may claim it.
pub const CPU_GPU_CLASS: &str = "cpu";

/// The GPU class of a GPU that no pattern matches. Not in the default controlled list, so such
/// a GPU is treated as uncontrolled; operators who want unknown hardware to fail closed add
/// `"unknown"` to `geofence.controlled_gpu_classes`.
pub const UNKNOWN_GPU_CLASS: &str = "unknown";

/// The `edge-node` binary's configuration file. `[node]` and `[gateway]` are required; the other
/// sections default as their fields document; unknown keys are errors at every level.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// `[node]`: who this node is. Required.
    pub node: NodeIdentity,
    /// `[gateway]`: where to connect and how to trust it. Required.
    pub gateway: NodeGatewayConfig,
    /// `[drain]`: graceful shutdown.
    #[serde(default)]
    pub drain: DrainConfig,
    /// `[[gpus]]`: GPUs to declare when NVML finds no driver (ignored when it finds GPUs).
    /// Default: [] (then a node without a driver has class `cpu`).
    #[serde(default)]
    pub gpus: Vec<GpuSpec>,
    /// `[[gpu_classes]]`: how GPU model names map to classes. First match wins. Default:
    /// [`default_gpu_class_table`]; giving the key replaces the whole table.
    #[serde(default = "default_gpu_class_table")]
    pub gpu_classes: Vec<GpuClassPattern>,
    /// `[capacity]`: how much work this node accepts at once.
    #[serde(default)]
    pub capacity: CapacityConfig,
    /// `[[models]]`: inference models served. Default: [].
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// `[[games]]`: game titles served. Default: [].
    #[serde(default)]
    pub games: Vec<GameEntry>,
    /// `[encoder]`: the video encoder.
    #[serde(default)]
    pub encoder: EncoderConfig,
    /// `[media]`: how game frames are sent to the gateway (congestion control).
    #[serde(default)]
    pub media: MediaConfig,
    /// `[audio]`: game sound (Opus).
    #[serde(default)]
    pub audio: AudioConfig,
    /// `[quic]`: the node's QUIC connection to the gateway.
    #[serde(default)]
    pub quic: NodeQuicConfig,
    /// `[log]`: logging.
    #[serde(default)]
    pub log: LogConfig,
}

/// `[node]`.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeIdentity {
    /// This node's name, unique per gateway: 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
    /// Required.
    pub id: String,
    /// Enrolment token issued to the node's (KYC-verified) operator. `edge-node --config` requires
    /// it; prefer the environment (`NEARPATH_NODE__ENROLMENT_TOKEN`) to the file. Default: none.
    #[serde(default)]
    pub enrolment_token: Option<String>,
}

impl fmt::Debug for NodeIdentity {
    /// Shows whether a token is set, never the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("id", &self.id)
            .field(
                "enrolment_token",
                &self.enrolment_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// `[gateway]` in the node configuration.
///
/// Where to connect is exactly one of `address` (one gateway), `addresses` (a federation: the
/// node probes them all and connects to the lowest round trip) and `bootstrap_url` (a URL
/// serving the `/v1/gateways` list). How to trust them is exactly one of `ca_file`,
/// `pinned_cert_sha256` and `pinned_cert_sha256s`.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeGatewayConfig {
    /// The gateway's QUIC address, `host:port` (`[::1]:4433` for IPv6). Default: empty (not
    /// set); exactly one of `address`, `addresses` and `bootstrap_url` is required.
    #[serde(default)]
    pub address: String,
    /// Several gateways' QUIC addresses (a federation). The node measures the handshake round
    /// trip to each, connects to the fastest and, on losing it, to the next one at once.
    /// Default: empty.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// An `http://` URL answering with the `GET /v1/gateways` JSON (`{"data":[{"quic_address",
    /// "cert_sha256", ...}]}`), fetched at start and whenever every known gateway failed. The
    /// list only says where to connect: a gateway is trusted through `ca_file` or the pins, and
    /// with pins an entry whose `cert_sha256` is not pinned is ignored, so whoever controls the
    /// URL can at worst make the node fail to connect, never make it trust a gateway.
    /// Default: none.
    #[serde(default)]
    pub bootstrap_url: Option<String>,
    /// Bearer token sent with the `bootstrap_url` request (the `/v1/gateways` API needs an API
    /// key). Default: none.
    #[serde(default)]
    pub bootstrap_api_key: Option<String>,
    /// TLS server name to verify. Default: the host part of each gateway's address.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM CA certificate(s) the gateway's certificate must chain to. Exactly one of `ca_file`,
    /// `pinned_cert_sha256` and `pinned_cert_sha256s` is required: there is no way to accept
    /// any certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the gateway's DER certificate, 64 hex digits: only that certificate is
    /// accepted. Default: none.
    #[serde(default)]
    pub pinned_cert_sha256: Option<String>,
    /// SHA-256 digests of several gateways' DER certificates (a federation, each gateway with
    /// its own certificate): a gateway presenting any of them is accepted. Default: empty.
    #[serde(default)]
    pub pinned_cert_sha256s: Vec<String>,
    /// Bound on one round-trip probe or connection attempt when several gateways are known, in
    /// milliseconds: a dead gateway costs at most this before the next is tried. Default: 1000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// First reconnect delay after losing the gateway, in milliseconds; doubles per failure
    /// (with jitter). Default: 250.
    #[serde(default = "default_reconnect_initial_ms")]
    pub reconnect_initial_ms: u64,
    /// Longest reconnect delay, in milliseconds. Default: 30000.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

fn default_reconnect_initial_ms() -> u64 {
    250
}

fn default_connect_timeout_ms() -> u64 {
    1_000
}

impl fmt::Debug for NodeGatewayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeGatewayConfig")
            .field("address", &self.address)
            .field("addresses", &self.addresses)
            .field("bootstrap_url", &self.bootstrap_url)
            .field(
                "bootstrap_api_key",
                &self.bootstrap_api_key.as_ref().map(|_| "<redacted>"),
            )
            .field("server_name", &self.server_name)
            .field("ca_file", &self.ca_file)
            .field("pinned_cert_sha256", &self.pinned_cert_sha256)
            .field("pinned_cert_sha256s", &self.pinned_cert_sha256s)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("reconnect_initial_ms", &self.reconnect_initial_ms)
            .field("reconnect_max_ms", &self.reconnect_max_ms)
            .finish()
    }
}

fn default_reconnect_max_ms() -> u64 {
    30_000
}

impl NodeGatewayConfig {
    /// A gateway section for `address` pinned to `pinned_cert_sha256`, other fields defaulted.
    pub fn pinned(address: impl Into<String>, pinned_cert_sha256: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            addresses: Vec::new(),
            bootstrap_url: None,
            bootstrap_api_key: None,
            server_name: None,
            ca_file: None,
            pinned_cert_sha256: Some(pinned_cert_sha256.into()),
            pinned_cert_sha256s: Vec::new(),
            connect_timeout_ms: default_connect_timeout_ms(),
            reconnect_initial_ms: default_reconnect_initial_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
        }
    }

    /// `address` split into host (without IPv6 brackets) and port.
    pub fn host_port(&self) -> Result<(&str, u16), String> {
        split_host_port(&self.address)
    }

    /// The TLS server name to verify: `server_name`, else the host part of `address` (or the
    /// whole address when it does not parse; validation rejects that case).
    pub fn server_name(&self) -> &str {
        match &self.server_name {
            Some(name) => name,
            None => self
                .host_port()
                .map(|(host, _)| host)
                .unwrap_or(&self.address),
        }
    }

    /// The pinned certificate digest as bytes, when one is set and well-formed.
    pub fn pinned_cert_sha256_bytes(&self) -> Option<[u8; 32]> {
        parse_sha256_hex(self.pinned_cert_sha256.as_deref()?)
    }

    /// Every pinned digest (`pinned_cert_sha256` and `pinned_cert_sha256s`) that is well-formed.
    pub fn pins(&self) -> Vec<[u8; 32]> {
        self.pinned_cert_sha256
            .iter()
            .chain(&self.pinned_cert_sha256s)
            .filter_map(|pin| parse_sha256_hex(pin))
            .collect()
    }

    /// The configured gateway addresses: `address`, or `addresses` (empty with
    /// `bootstrap_url`, whose list is fetched at run time).
    pub fn gateway_addresses(&self) -> Vec<String> {
        if self.address.is_empty() {
            self.addresses.clone()
        } else {
            vec![self.address.clone()]
        }
    }

    /// How the gateways are named in logs and errors: the address, the list, or the URL.
    pub fn describe(&self) -> String {
        match (&self.bootstrap_url, self.gateway_addresses().as_slice()) {
            (Some(url), _) => format!("gateways listed at {url}"),
            (None, [one]) => one.clone(),
            (None, many) => many.join(", "),
        }
    }
}

/// Splits `host:port`; IPv6 hosts must be bracketed (`[::1]:4433`).
fn split_host_port(address: &str) -> Result<(&str, u16), String> {
    let bad = || format!("{address:?} is not host:port (IPv6 as [addr]:port)");
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner.strip_suffix(']').ok_or_else(bad)?,
        None if host.contains(':') => return Err(bad()),
        None => host,
    };
    if host.is_empty() || host.contains(char::is_whitespace) || host.contains(['[', ']', '/']) {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(0) => Err(format!("{address:?}: port 0 cannot be dialled")),
        Ok(port) => Ok((host, port)),
        Err(_) => Err(bad()),
    }
}

fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// `[drain]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// On shutdown, active sessions get this long to finish before they are closed, in
    /// milliseconds. Default: 30000.
    pub deadline_ms: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            deadline_ms: 30_000,
        }
    }
}

/// One `[[gpus]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// Model name as NVML would report it, e.g. `NVIDIA H100 80GB HBM3`. Required.
    pub model: String,
    /// Memory in MiB. Required.
    pub vram_mib: u64,
    /// Class, overriding the `gpu_classes` table; not `cpu`. Default: from the table.
    #[serde(default)]
    pub class: Option<String>,
    /// NVML's UUID of the GPU (`nvidia-smi -L` prints it), e.g.
    /// `GPU-5d1a8a2e-0c1f-4b1e-9f0e-2a3b4c5d6e7f`, reported in `Inventory` for the gateway's
    /// checker; at most 96 bytes, unique among `[[gpus]]`. Default: none (reported as unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// NVML's combined PCI id `(device << 16) | vendor`, e.g. `0x233010de` for an H100 SXM
    /// (TOML takes hex integers); reported in `Inventory`. Default: none (reported as 0, unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u32>,
}

/// Longest `[[gpus]] uuid` (the protocol's `MAX_GPU_UUID_BYTES`).
pub const MAX_GPU_UUID_BYTES: usize = 96;

/// `[[models]] weights_bytes`, `params_b` and `dtype`: one way to give the size, and a sane one.
fn check_weights(p: &mut Problems, at: &str, m: &ModelConfig) {
    const TB: &str = "10 TB (10000000000000)";
    match (m.weights_bytes, m.params_b, m.dtype) {
        (Some(_), Some(_), _) => p.push(
            format!("{at}.weights_bytes"),
            "and params_b are both set: give the size one way",
        ),
        (Some(b), None, dtype) => {
            if b == 0 || b > MAX_WEIGHTS_BYTES {
                p.push(
                    format!("{at}.weights_bytes"),
                    format!("must be 1 byte to {TB} (got {b})"),
                );
            }
            if dtype.is_some() {
                p.push(
                    format!("{at}.dtype"),
                    "only applies with params_b (weights_bytes is the size already)",
                );
            }
        }
        (None, Some(params_b), dtype) => {
            if !(params_b.is_finite() && params_b > 0.0) {
                p.push(
                    format!("{at}.params_b"),
                    format!("must be a finite number of billions greater than 0 (got {params_b})"),
                );
            } else if let Some(d) = dtype {
                let bytes = computed_weights_bytes(params_b, d);
                if bytes > MAX_WEIGHTS_BYTES as f64 {
                    p.push(
                        format!("{at}.params_b"),
                        format!(
                            "{params_b} billion parameters of {} is {bytes} bytes, more than {TB}",
                            d.as_str()
                        ),
                    );
                }
            }
            if dtype.is_none() {
                p.push(
                    format!("{at}.dtype"),
                    "required with params_b (fp32, bf16, fp16, fp8, int8, int4, q8_0, q6_k, q5_k_m, q4_k_m, q4_0)",
                );
            }
        }
        (None, None, Some(_)) => p.push(
            format!("{at}.dtype"),
            "only applies with params_b (set params_b, or weights_bytes instead)",
        ),
        (None, None, None) => {}
    }
}

/// One `[[gpu_classes]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GpuClassPattern {
    /// Matched case-insensitively as a substring of the model name. Required.
    pub contains: String,
    /// The class given to matching GPUs: lower-case letters, digits and `_`; not `cpu`.
    /// Required.
    pub class: String,
}

/// The default GPU class table. Order matters: more specific patterns come first (`GB200`
/// before `B200`, `H200` before `H20`, `L40S` before `L40`, `RTX 4090 D` before `RTX 4090`), and
/// `RTX A1000` (a small workstation card) is listed so that `A100` does not claim it.
pub fn default_gpu_class_table() -> Vec<GpuClassPattern> {
    [
        ("GB200", "gb200"),
        ("B200", "b200"),
        ("B100", "b100"),
        ("H200", "h200"),
        ("H800", "h800"),
        ("H100", "h100"),
        ("H20", "h20"),
        ("A800", "a800"),
        ("RTX A1000", "rtxa1000"),
        ("A100", "a100"),
        ("L40S", "l40s"),
        ("L40", "l40"),
        ("RTX 4090 D", "rtx4090d"),
        ("RTX 4090", "rtx4090"),
        ("RTX 4080", "rtx4080"),
        ("RTX 3080", "rtx3080"),
        ("MI300", "mi300"),
        ("MI250", "mi250"),
    ]
    .into_iter()
    .map(|(contains, class)| GpuClassPattern {
        contains: contains.into(),
        class: class.into(),
    })
    .collect()
}

/// The class of a GPU called `model`: the `class` of the first pattern in `table` whose
/// `contains` occurs in `model`, ignoring ASCII case; [`UNKNOWN_GPU_CLASS`] when none does.
///
/// Unmatched models are not turned into a class of their own (a sanitised model name) because
/// classes are policy vocabulary: an invented class would silently fall outside every rule,
/// while `unknown` is one name an operator can put under control. [`CPU_GPU_CLASS`] is never
/// returned: it is for nodes with no GPU at all.
pub fn gpu_class_for_model(table: &[GpuClassPattern], model: &str) -> String {
    let model = model.to_ascii_lowercase();
    table
        .iter()
        .find(|p| !p.contains.is_empty() && model.contains(&p.contains.to_ascii_lowercase()))
        .map(|p| p.class.clone())
        .unwrap_or_else(|| UNKNOWN_GPU_CLASS.to_string())
}

/// `[capacity]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapacityConfig {
    /// Game sessions at once. Default: 1.
    pub game_sessions: u32,
    /// Inference requests at once, over all models. Default: 16.
    pub inference_concurrency: u32,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        Self {
            game_sessions: 1,
            inference_concurrency: 16,
        }
    }
}

/// One `[[models]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The model name clients ask for (`model` in the OpenAI API), unique on this node; no
    /// spaces. Required.
    pub name: String,
    /// Requests to this model at once (also bounded by `capacity.inference_concurrency`).
    /// Default: 8.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u32,
    /// What produces the tokens. Required.
    pub backend: BackendConfig,
    /// The optional OpenAI features the backend honours for this model, from
    /// [`CAPABILITY_NAMES`] (`tools`, `json_mode`, `json_schema`, `logprobs`, `embeddings`, `n`,
    /// `vision`). The gateway refuses a request needing one that no node serving the model
    /// declares (400 naming the parameter) and routes such requests only to nodes declaring it.
    /// Default: for the simulator, what it fakes (all but `vision`); for an upstream, none, since
    /// only the operator knows what the server honours (declare them: llama.cpp's server honours
    /// `tools` with a named `tool_choice`, `json_mode`, `json_schema`, `logprobs`, and
    /// `embeddings` when started with `--embedding`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    /// How `POST /v1/responses` (the OpenAI Responses API) is served for this model:
    /// `"translate"` turns each request into a chat completions request for the backend and the
    /// chat stream back into Responses events (any backend); `"native"` relays it to the
    /// upstream's own `{base_url}/responses` (vLLM serves one; needs an `upstream` backend).
    /// Default: "translate".
    #[serde(default)]
    pub responses: ResponsesMode,
    /// Bytes of weights the model needs in GPU memory, reported to the gateway's checker (which
    /// refuses claims whose weights cannot fit the node's claimed VRAM). 1 to 10 TB; not with
    /// `params_b`. Default: none (then `params_b` x `dtype`, else the size an upstream llama.cpp
    /// server lists in `/v1/models` `meta.size`, else unknown: the node reports 0). For the
    /// simulator this is the knob that makes a node report one model size whatever it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_bytes: Option<u64>,
    /// The model's parameters in billions (e.g. 70.6), with `dtype`: the weight size reported is
    /// `params_b` x 10^9 x the dtype's bits per weight / 8. Not with `weights_bytes`. Default:
    /// none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params_b: Option<f64>,
    /// The weights' data type, required with `params_b` (see [`Dtype::bits_per_weight`]).
    /// Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,
}

/// Largest weight size a model may declare or compute: 10 TB (10^13 bytes). No model served on
/// one node comes near it; a larger figure is a typo (or a lie the checker would refuse anyway).
pub const MAX_WEIGHTS_BYTES: u64 = 10_000_000_000_000;

/// The data type of a model's weights (`[[models]] dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Dtype {
    #[serde(rename = "fp32")]
    Fp32,
    #[serde(rename = "bf16")]
    Bf16,
    #[serde(rename = "fp16")]
    Fp16,
    #[serde(rename = "fp8")]
    Fp8,
    #[serde(rename = "int8")]
    Int8,
    #[serde(rename = "int4")]
    Int4,
    /// llama.cpp's GGUF `Q8_0`.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// llama.cpp's GGUF `Q6_K`.
    #[serde(rename = "q6_k")]
    Q6K,
    /// llama.cpp's GGUF `Q5_K_M`.
    #[serde(rename = "q5_k_m")]
    Q5KM,
    /// llama.cpp's GGUF `Q4_K_M`.
    #[serde(rename = "q4_k_m")]
    Q4KM,
    /// llama.cpp's GGUF `Q4_0`.
    #[serde(rename = "q4_0")]
    Q4_0,
}

impl Dtype {
    /// Bits each weight takes on average. Plain types are their width; int4 and fp8 ignore
    /// their per-group scales (small against the weights). The GGUF quantisations count their
    /// block scales: `Q8_0` and `Q4_0` by their block layout (34 and 18 bytes per 32 weights:
    /// 8.5 and 4.5), the k-quant mixes by the averages llama.cpp reports for Llama models
    /// (`Q6_K` 6.56, `Q5_K_M` 5.69, `Q4_K_M` 4.85).
    pub fn bits_per_weight(self) -> f64 {
        match self {
            Dtype::Fp32 => 32.0,
            Dtype::Bf16 | Dtype::Fp16 => 16.0,
            Dtype::Fp8 | Dtype::Int8 => 8.0,
            Dtype::Int4 => 4.0,
            Dtype::Q8_0 => 8.5,
            Dtype::Q6K => 6.56,
            Dtype::Q5KM => 5.69,
            Dtype::Q4KM => 4.85,
            Dtype::Q4_0 => 4.5,
        }
    }

    /// The config name, e.g. `q4_k_m`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Bf16 => "bf16",
            Dtype::Fp16 => "fp16",
            Dtype::Fp8 => "fp8",
            Dtype::Int8 => "int8",
            Dtype::Int4 => "int4",
            Dtype::Q8_0 => "q8_0",
            Dtype::Q6K => "q6_k",
            Dtype::Q5KM => "q5_k_m",
            Dtype::Q4KM => "q4_k_m",
            Dtype::Q4_0 => "q4_0",
        }
    }
}

/// Where a model's configured weight size comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsOrigin {
    /// `weights_bytes`.
    Declared,
    /// `params_b` x `dtype`.
    Computed,
}

/// `params_b` billions of parameters of `dtype`, in bytes (rounded up).
fn computed_weights_bytes(params_b: f64, dtype: Dtype) -> f64 {
    (params_b * 1e9 * dtype.bits_per_weight() / 8.0).ceil()
}

/// How a model serves the Responses API (`[[models]] responses`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponsesMode {
    /// Translated on the node to and from chat completions.
    #[default]
    Translate,
    /// Relayed to the upstream server's own `/v1/responses`.
    Native,
}

/// The capability names `[[models]] capabilities` accepts (the protocol's `ModelCaps` names).
pub const CAPABILITY_NAMES: [&str; 7] = [
    "tools",
    "json_mode",
    "json_schema",
    "logprobs",
    "embeddings",
    "n",
    "vision",
];

/// What the simulator fakes, hence its capabilities when none are configured.
pub const SIM_CAPABILITY_NAMES: [&str; 6] = [
    "tools",
    "json_mode",
    "json_schema",
    "logprobs",
    "embeddings",
    "n",
];

fn default_max_concurrency() -> u32 {
    8
}

impl ModelConfig {
    /// The capability names in effect: `capabilities` as configured, else the backend's default
    /// (see [`ModelConfig::capabilities`]).
    pub fn capability_names(&self) -> Vec<&str> {
        match (&self.capabilities, &self.backend) {
            (Some(names), _) => names.iter().map(String::as_str).collect(),
            (None, BackendConfig::Sim { .. }) => SIM_CAPABILITY_NAMES.to_vec(),
            (None, BackendConfig::Upstream { .. }) => Vec::new(),
        }
    }

    /// The model's weight size as configured: `weights_bytes`, else `params_b` x `dtype`, else
    /// `None` (unknown). Only meaningful for a validated config.
    pub fn configured_weights_bytes(&self) -> Option<(u64, WeightsOrigin)> {
        if let Some(b) = self.weights_bytes {
            return Some((b, WeightsOrigin::Declared));
        }
        let bytes = computed_weights_bytes(self.params_b?, self.dtype?);
        (bytes.is_finite() && bytes >= 1.0 && bytes <= MAX_WEIGHTS_BYTES as f64)
            .then_some((bytes as u64, WeightsOrigin::Computed))
    }

    /// The model name to send upstream: `upstream_model`, else `name` (also for the simulator).
    pub fn upstream_model_name(&self) -> &str {
        match &self.backend {
            BackendConfig::Upstream {
                upstream_model: Some(m),
                ..
            } => m,
            _ => &self.name,
        }
    }
}

/// A model's backend, chosen by `type`.
///
/// `deny_unknown_fields` works for these struct variants: serde removes the `type` tag before
/// the variant sees the remaining keys, so a misspelt key is refused (the error names the
/// `backend` table; serde cannot track the path inside an internally tagged enum).
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackendConfig {
    /// A built-in simulator, not a model: it waits `ttft_ms`, then emits deterministic
    /// placeholder tokens at `tokens_per_s`. For demos, tests and load generation.
    Sim {
        /// Time to first token, in milliseconds. Default: 50.
        #[serde(default = "default_sim_ttft_ms")]
        ttft_ms: u64,
        /// Token rate after the first. Default: 50.0.
        #[serde(default = "default_sim_tokens_per_s")]
        tokens_per_s: f64,
        /// Seed for the token generator, so runs repeat. Default: 0.
        #[serde(default)]
        seed: u64,
    },
    /// An OpenAI-compatible server the node forwards to (vLLM, llama.cpp server, TGI, ...).
    Upstream {
        /// Base URL ending in `/v1`, e.g. `http://127.0.0.1:8000/v1`. Required.
        base_url: String,
        /// Bearer key for the upstream; prefer the environment
        /// (`NEARPATH_MODELS__<index>__BACKEND__API_KEY`). Default: none.
        #[serde(default)]
        api_key: Option<String>,
        /// Model name upstream. Default: the entry's `name`.
        #[serde(default)]
        upstream_model: Option<String>,
        /// Whole-request timeout, in milliseconds. Default: 600000.
        #[serde(default = "default_upstream_timeout_ms")]
        timeout_ms: u64,
    },
}

fn default_sim_ttft_ms() -> u64 {
    50
}

fn default_sim_tokens_per_s() -> f64 {
    50.0
}

fn default_upstream_timeout_ms() -> u64 {
    600_000
}

impl BackendConfig {
    /// A simulator with the default timing.
    pub fn sim() -> Self {
        BackendConfig::Sim {
            ttft_ms: default_sim_ttft_ms(),
            tokens_per_s: default_sim_tokens_per_s(),
            seed: 0,
        }
    }
}

impl fmt::Debug for BackendConfig {
    /// Like the derived form, but the upstream key is never shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendConfig::Sim {
                ttft_ms,
                tokens_per_s,
                seed,
            } => f
                .debug_struct("Sim")
                .field("ttft_ms", ttft_ms)
                .field("tokens_per_s", tokens_per_s)
                .field("seed", seed)
                .finish(),
            BackendConfig::Upstream {
                base_url,
                api_key,
                upstream_model,
                timeout_ms,
            } => f
                .debug_struct("Upstream")
                .field("base_url", base_url)
                .field("api_key", &api_key.as_ref().map(|_| "<redacted>"))
                .field("upstream_model", upstream_model)
                .field("timeout_ms", timeout_ms)
                .finish(),
        }
    }
}

/// One `[[games]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GameEntry {
    /// The title clients ask for, unique on this node. Required.
    pub title: String,
    /// How the game is started. Required.
    pub source: GameSource,
}

/// How a game is started, chosen by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GameSource {
    /// A game built into the edge node, looked up by the entry's `title`. An empty struct
    /// variant rather than a unit one, because serde lets a unit variant of an internally tagged
    /// enum ignore unknown keys (`{ type = "builtin", command = [...] }` would pass silently).
    Builtin {},
    /// An external program started per session; argv, not a shell line.
    Command {
        /// Program and arguments, non-empty. Required.
        command: Vec<String>,
    },
}

/// Which video encoder a node uses (`[encoder] encoder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    /// The best one that opens on this machine, probed once at start in the order NVENC,
    /// VAAPI, x264, OpenH264. The default.
    #[default]
    Auto,
    /// NVIDIA NVENC through libavcodec (`h264_nvenc`, plus `hevc_nvenc` and `av1_nvenc` where
    /// the GPU has them).
    Nvenc,
    /// VAAPI through libavcodec (`h264_vaapi`) on [`EncoderConfig::vaapi_device`].
    Vaapi,
    /// libx264 on the CPU through libavcodec.
    X264,
    /// Cisco OpenH264 on the CPU, built into the node (no FFmpeg libraries needed).
    Openh264,
}

impl EncoderKind {
    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            EncoderKind::Auto => "auto",
            EncoderKind::Nvenc => "nvenc",
            EncoderKind::Vaapi => "vaapi",
            EncoderKind::X264 => "x264",
            EncoderKind::Openh264 => "openh264",
        }
    }
}

/// `[encoder]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncoderConfig {
    /// A keyframe (IDR) at least this often, in seconds. Default: 10.
    pub idr_interval_s: u64,
    /// Encoder threads per session. Default: 1.
    pub threads: u16,
    /// Which encoder: "auto" (the best that opens here: nvenc, then vaapi, then x264, then
    /// openh264), "nvenc", "vaapi", "x264" or "openh264". An explicit choice this machine
    /// cannot open is a start-up error that says why. Default: "auto".
    pub encoder: EncoderKind,
    /// x264 only: refresh the picture with a moving column of intra blocks (one sweep a
    /// second) instead of relying on IDRs alone, which evens out frame sizes; IDRs still come
    /// on request. Default: false.
    pub intra_refresh: bool,
    /// Where x264 encodes H.264, also offer HEVC (libx265) and AV1 (libaom-av1, real-time
    /// mode) encoded on the CPU. They are slow (meant for tests and small sizes); NVENC offers HEVC and AV1 without
    /// this. Default: false.
    pub software_hevc_av1: bool,
    /// The DRM render node VAAPI opens. Default: "/dev/dri/renderD128".
    pub vaapi_device: String,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            idr_interval_s: 10,
            threads: 1,
            encoder: EncoderKind::Auto,
            intra_refresh: false,
            software_hevc_av1: false,
            vaapi_device: "/dev/dri/renderD128".into(),
        }
    }
}

/// `[media]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// The lowest bitrate a game session's encoder is lowered to when the path to the gateway
    /// is congested, in kbit/s; below it the frame rate falls instead (down to a quarter). A
    /// session asking for less gets its own bitrate. Default: 300.
    pub min_bitrate_kbps: u32,
    /// A video frame not acknowledged by the gateway this long after the path's base round trip
    /// is reset (its unsent bytes dropped) and the next frame is a keyframe, in milliseconds.
    /// Default: 200.
    pub max_frame_delay_ms: u64,
    /// Queueing delay on the path (the recent minimum of frame acknowledgement times above the
    /// base round trip) above which the encoder's bitrate backs off, in milliseconds.
    /// Default: 40.
    pub queue_delay_threshold_ms: u64,
    /// A game session whose gateway connection is lost (the gateway went silent or its
    /// connection was reset, not closed on purpose) keeps running, unseen, this long, so that
    /// the player can resume it through another gateway of the federation (the new gateway opens
    /// it again with the same session id); after it the game stops, in milliseconds.
    /// Default: 10000.
    pub resume_grace_ms: u64,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            min_bitrate_kbps: 300,
            max_frame_delay_ms: 200,
            queue_delay_threshold_ms: 40,
            resume_grace_ms: 10_000,
        }
    }
}

/// `[audio]`: game sound, encoded as Opus (48 kHz stereo, 10 ms packets, the restricted
/// low-delay application) and sent to the gateway as audio datagrams.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AudioConfig {
    /// Whether game sessions send sound. With `false` no audio is encoded or sent, and an
    /// external program's audio pipe is read and discarded. Default: true.
    pub enabled: bool,
    /// Opus bitrate per session (stereo), in kbit/s, 6 to 510. Default: 96.
    pub bitrate_kbps: u32,
    /// Opus in-band forward error correction: each packet carries a coarse copy of the previous
    /// one, so a single lost datagram is repaired by the next. Default: true.
    pub fec: bool,
    /// Opus discontinuous transmission: near-silent stretches are sent as rare comfort-noise
    /// packets instead of every 10 ms. Default: false (a player cannot tell a silent game from a
    /// lost path).
    pub dtx: bool,
    /// The packet loss the encoder plans its FEC for, in percent, 0 to 100. Default: 5.
    pub expected_loss_percent: u32,
}

impl Default for AudioConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bitrate_kbps: 96,
            fec: true,
            dtx: false,
            expected_loss_percent: 5,
        }
    }
}

/// A QUIC congestion controller, as `[quic] congestion` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CongestionController {
    /// BBR: paces at the measured bottleneck rate; random loss does not shrink its window.
    Bbr,
    /// CUBIC: loss-based; every loss shrinks its window.
    Cubic,
    /// NewReno: loss-based, the most conservative.
    NewReno,
}

/// `[quic]` (node).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeQuicConfig {
    /// Congestion controller of what the node sends (video frames, tokens, heartbeats):
    /// "bbr", "cubic" or "new_reno". Default: "bbr" (README, "Congestion control").
    pub congestion: CongestionController,
    /// Packets acknowledged after a missing one before it counts as lost (reordering
    /// tolerance), at least 3; quinn also declares a packet lost 9/8 of a round trip after a
    /// later one was acknowledged, whatever this says. Default: 3.
    pub reorder_packet_threshold: u32,
}

impl Default for NodeQuicConfig {
    fn default() -> Self {
        Self {
            congestion: CongestionController::Bbr,
            reorder_packet_threshold: 3,
        }
    }
}

impl NodeConfig {
    /// A configuration with the given identity and gateway and every other section defaulted:
    /// no GPUs declared, no models, no games.
    pub fn new(node: NodeIdentity, gateway: NodeGatewayConfig) -> Self {
        Self {
            node,
            gateway,
            drain: DrainConfig::default(),
            gpus: Vec::new(),
            gpu_classes: default_gpu_class_table(),
            capacity: CapacityConfig::default(),
            models: Vec::new(),
            games: Vec::new(),
            encoder: EncoderConfig::default(),
            media: MediaConfig::default(),
            audio: AudioConfig::default(),
            quic: NodeQuicConfig::default(),
            log: LogConfig::default(),
        }
    }

    /// The class of a declared GPU: its own `class`, else by the `gpu_classes` table.
    pub fn gpu_class(&self, gpu: &GpuSpec) -> String {
        match &gpu.class {
            Some(class) => class.clone(),
            None => gpu_class_for_model(&self.gpu_classes, &gpu.model),
        }
    }

    /// Checks everything that does not depend on how the node is started; every problem is
    /// reported.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut p = Problems::default();
        self.check(&mut p, false);
        p.into_result(IN_MEMORY_ORIGIN)
    }

    /// [`Self::validate`] plus what `edge-node --config` (running the node) needs: the enrolment
    /// token, and no placeholder copied from the example file.
    pub fn validate_for_run(&self) -> Result<(), ConfigErrors> {
        let mut p = Problems::default();
        self.check(&mut p, true);
        p.into_result(IN_MEMORY_ORIGIN)
    }

    pub(crate) fn check(&self, p: &mut Problems, run: bool) {
        if !is_label(&self.node.id) {
            p.push(
                "node.id",
                format!(
                    "{:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
                    self.node.id
                ),
            );
        }
        match &self.node.enrolment_token {
            Some(token) => check_secret(p, "node.enrolment_token", token),
            None if run => p.push(
                "node.enrolment_token",
                "required: set it in the file or in the environment variable \
                 NEARPATH_NODE__ENROLMENT_TOKEN",
            ),
            None => {}
        }
        self.check_gateway(p);
        p.positive("drain.deadline_ms", self.drain.deadline_ms);
        self.check_gpus(p);
        self.check_workloads(p);
        p.positive("encoder.idr_interval_s", self.encoder.idr_interval_s);
        p.positive("encoder.threads", self.encoder.threads);
        if self.encoder.vaapi_device.trim().is_empty() {
            p.push("encoder.vaapi_device", "must not be empty");
        }
        p.positive("media.min_bitrate_kbps", self.media.min_bitrate_kbps);
        p.positive("media.max_frame_delay_ms", self.media.max_frame_delay_ms);
        p.positive("media.resume_grace_ms", self.media.resume_grace_ms);
        p.positive(
            "media.queue_delay_threshold_ms",
            self.media.queue_delay_threshold_ms,
        );
        if !(6..=510).contains(&self.audio.bitrate_kbps) {
            p.push(
                "audio.bitrate_kbps",
                format!(
                    "{} is outside 6..=510, the bitrates Opus encodes",
                    self.audio.bitrate_kbps
                ),
            );
        }
        if self.audio.expected_loss_percent > 100 {
            p.push(
                "audio.expected_loss_percent",
                format!(
                    "{} is not a percentage (0..=100)",
                    self.audio.expected_loss_percent
                ),
            );
        }
        if self.quic.reorder_packet_threshold < 3 {
            p.push(
                "quic.reorder_packet_threshold",
                format!(
                    "{} is below 3, the least QUIC allows (RFC 9002)",
                    self.quic.reorder_packet_threshold
                ),
            );
        }
        self.log.check(p);
        if run {
            self.check_placeholders(p);
        }
    }

    /// Values copied unchanged from the example file, which `edge-node --config` must not
    /// start with: the gateway would refuse the token, and no gateway presents an all-zero pin.
    fn check_placeholders(&self, p: &mut Problems) {
        if let Some(token) = &self.node.enrolment_token {
            if is_placeholder_secret(token) {
                p.push(
                    "node.enrolment_token",
                    "is the placeholder from the example configuration: put the enrolment token \
                     the gateway operator issued to your operator account here (POST \
                     /admin/operators/{id}/tokens shows it once), preferably in the environment \
                     variable NEARPATH_NODE__ENROLMENT_TOKEN",
                );
            }
        }
        let g = &self.gateway;
        if let Some(key) = &g.bootstrap_api_key {
            if is_placeholder_secret(key) {
                p.push(
                    "gateway.bootstrap_api_key",
                    "is the placeholder from the example configuration: put an API key of the \
                     gateway here (POST /admin/api-keys), preferably in the environment \
                     variable NEARPATH_GATEWAY__BOOTSTRAP_API_KEY",
                );
            }
        }
        const PIN_HELP: &str = "is the all-zero placeholder from the example configuration: put \
             the SHA-256 of the gateway's QUIC certificate here (64 hex digits: `gateway run` prints \
             the line to paste at start, `GET /admin/gateway` answers it, and `gateway cert pin \
             CERT.pem` computes it from the certificate file)";
        if g.pinned_cert_sha256_bytes() == Some([0; 32]) {
            p.push("gateway.pinned_cert_sha256", PIN_HELP);
        }
        for (i, pin) in g.pinned_cert_sha256s.iter().enumerate() {
            if parse_sha256_hex(pin) == Some([0; 32]) {
                p.push(format!("gateway.pinned_cert_sha256s[{i}]"), PIN_HELP);
            }
        }
        const HOST_HELP: &str = "is an example address (a domain reserved for documentation): \
             put your gateway's QUIC address here, host:port";
        if let Ok((host, _)) = g.host_port() {
            if is_example_host(host) {
                p.push("gateway.address", HOST_HELP);
            }
        }
        for (i, address) in g.addresses.iter().enumerate() {
            if let Ok((host, _)) = split_host_port(address) {
                if is_example_host(host) {
                    p.push(format!("gateway.addresses[{i}]"), HOST_HELP);
                }
            }
        }
        if let Some(url) = &g.bootstrap_url {
            let host = url
                .strip_prefix("http://")
                .and_then(|rest| rest.split(['/', ':']).next());
            if host.is_some_and(is_example_host) {
                p.push(
                    "gateway.bootstrap_url",
                    "is an example URL (a domain reserved for documentation): put the URL of \
                     your gateway's GET /v1/gateways here",
                );
            }
        }
        for (i, model) in self.models.iter().enumerate() {
            if let BackendConfig::Upstream {
                api_key: Some(key), ..
            } = &model.backend
            {
                if is_placeholder_secret(key) {
                    p.push(
                        format!("models[{i}].backend.api_key"),
                        format!(
                            "is a placeholder: put the upstream server's API key here, \
                             preferably in the environment variable \
                             NEARPATH_MODELS__{i}__BACKEND__API_KEY, or leave the key out"
                        ),
                    );
                }
            }
        }
    }

    fn check_gateway(&self, p: &mut Problems) {
        let g = &self.gateway;
        let sources = [
            !g.address.is_empty(),
            !g.addresses.is_empty(),
            g.bootstrap_url.is_some(),
        ];
        match sources.iter().filter(|set| **set).count() {
            0 => p.push(
                "gateway.address",
                "required: set one of gateway.address, gateway.addresses or \
                 gateway.bootstrap_url",
            ),
            1 => {}
            _ => p.push(
                "gateway.addresses",
                "set exactly one of gateway.address, gateway.addresses and gateway.bootstrap_url",
            ),
        }
        if !g.address.is_empty() {
            if let Err(problem) = g.host_port() {
                p.push("gateway.address", problem);
            }
        }
        // A federation is a handful of regional gateways; a list of thousands is a mistake (and
        // each entry costs a probe per failover round).
        const MAX_GATEWAYS: usize = 64;
        if g.addresses.len() > MAX_GATEWAYS {
            p.push(
                "gateway.addresses",
                format!("{} entries; at most {MAX_GATEWAYS}", g.addresses.len()),
            );
        }
        for (i, address) in g.addresses.iter().enumerate() {
            if let Err(problem) = split_host_port(address) {
                p.push(format!("gateway.addresses[{i}]"), problem);
            } else if g.addresses[..i].contains(address) {
                p.push(
                    format!("gateway.addresses[{i}]"),
                    format!("{address:?} is listed twice"),
                );
            }
        }
        if let Some(url) = &g.bootstrap_url {
            if let Err(problem) = check_bootstrap_url(url) {
                p.push("gateway.bootstrap_url", problem);
            }
        }
        if let Some(key) = &g.bootstrap_api_key {
            check_secret(p, "gateway.bootstrap_api_key", key);
            if g.bootstrap_url.is_none() {
                p.push(
                    "gateway.bootstrap_api_key",
                    "is only used with gateway.bootstrap_url, which is not set",
                );
            }
        }
        if let Some(name) = &g.server_name {
            if name.is_empty() || name.contains(char::is_whitespace) {
                p.push(
                    "gateway.server_name",
                    format!("{name:?} is not a server name"),
                );
            }
        }
        let pins_set = !g.pinned_cert_sha256s.is_empty();
        match (&g.ca_file, &g.pinned_cert_sha256) {
            (None, None) if !pins_set => p.push(
                "gateway",
                "set one of ca_file or pinned_cert_sha256 (there is no option to accept any \
                 certificate)",
            ),
            (Some(_), Some(_)) => p.push(
                "gateway.pinned_cert_sha256",
                "set either gateway.ca_file or gateway.pinned_cert_sha256, not both",
            ),
            (Some(_), None) | (None, Some(_)) if pins_set => p.push(
                "gateway.pinned_cert_sha256s",
                "set only one of gateway.ca_file, gateway.pinned_cert_sha256 and \
                 gateway.pinned_cert_sha256s",
            ),
            (Some(ca), None) if ca.as_os_str().is_empty() => {
                p.push("gateway.ca_file", "must not be empty")
            }
            (None, Some(pin)) if parse_sha256_hex(pin).is_none() => p.push(
                "gateway.pinned_cert_sha256",
                format!("{pin:?} is not a SHA-256 digest (64 hex digits)"),
            ),
            _ => {}
        }
        if g.pinned_cert_sha256s.len() > MAX_GATEWAYS {
            p.push(
                "gateway.pinned_cert_sha256s",
                format!(
                    "{} entries; at most {MAX_GATEWAYS}",
                    g.pinned_cert_sha256s.len()
                ),
            );
        }
        for (i, pin) in g.pinned_cert_sha256s.iter().enumerate() {
            if parse_sha256_hex(pin).is_none() {
                p.push(
                    format!("gateway.pinned_cert_sha256s[{i}]"),
                    format!("{pin:?} is not a SHA-256 digest (64 hex digits)"),
                );
            }
        }
        p.positive("gateway.connect_timeout_ms", g.connect_timeout_ms);
        p.positive("gateway.reconnect_initial_ms", g.reconnect_initial_ms);
        if g.reconnect_max_ms < g.reconnect_initial_ms {
            p.push(
                "gateway.reconnect_max_ms",
                format!(
                    "{} is less than gateway.reconnect_initial_ms {}",
                    g.reconnect_max_ms, g.reconnect_initial_ms
                ),
            );
        }
    }

    fn check_gpus(&self, p: &mut Problems) {
        let class_problem = |class: &str| {
            if class == CPU_GPU_CLASS {
                Some(format!(
                    "\"{CPU_GPU_CLASS}\" is reserved for nodes without a GPU"
                ))
            } else if !is_gpu_class_name(class) {
                Some(gpu_class_name_problem(class))
            } else {
                None
            }
        };
        for (i, gpu) in self.gpus.iter().enumerate() {
            if gpu.model.trim().is_empty() {
                p.push(format!("gpus[{i}].model"), "must not be empty");
            }
            p.positive(&format!("gpus[{i}].vram_mib"), gpu.vram_mib);
            if let Some(problem) = gpu.class.as_deref().and_then(class_problem) {
                p.push(format!("gpus[{i}].class"), problem);
            }
            if let Some(uuid) = &gpu.uuid {
                let path = format!("gpus[{i}].uuid");
                if uuid.is_empty() || uuid.len() > MAX_GPU_UUID_BYTES {
                    p.push(
                        path,
                        format!(
                            "must be 1 to {MAX_GPU_UUID_BYTES} bytes (got {})",
                            uuid.len()
                        ),
                    );
                } else if !uuid.bytes().all(|b| b.is_ascii_graphic()) {
                    p.push(
                        path,
                        format!("{uuid:?} must be printable ASCII without spaces (as nvidia-smi -L prints it)"),
                    );
                } else if let Some(j) = self.gpus[..i]
                    .iter()
                    .position(|g| g.uuid.as_deref() == Some(uuid.as_str()))
                {
                    p.push(path, format!("{uuid:?} is already the uuid of gpus[{j}]"));
                }
            }
            if let Some(id) = gpu.pci_device_id {
                // NVML puts the vendor in the low half: a value without one is a bare device id.
                if id >> 16 == 0 || id & 0xffff == 0 {
                    p.push(
                        format!("gpus[{i}].pci_device_id"),
                        format!("0x{id:x} must be NVML's combined (device << 16) | vendor, e.g. 0x233010de for an H100 SXM (device 0x2330, vendor 0x10de)"),
                    );
                }
            }
        }
        for (i, pattern) in self.gpu_classes.iter().enumerate() {
            if pattern.contains.trim().is_empty() {
                p.push(format!("gpu_classes[{i}].contains"), "must not be empty");
            }
            if let Some(problem) = class_problem(&pattern.class) {
                p.push(format!("gpu_classes[{i}].class"), problem);
            }
        }
    }

    fn check_workloads(&self, p: &mut Problems) {
        let c = &self.capacity;
        if !self.games.is_empty() && c.game_sessions == 0 {
            p.push(
                "capacity.game_sessions",
                "is 0, but games are configured (remove them or allow sessions)",
            );
        }
        if !self.models.is_empty() && c.inference_concurrency == 0 {
            p.push(
                "capacity.inference_concurrency",
                "is 0, but models are configured (remove them or allow requests)",
            );
        }
        let mut seen = BTreeMap::new();
        for (i, m) in self.models.iter().enumerate() {
            let at = format!("models[{i}]");
            check_name(p, &format!("{at}.name"), &m.name, 256, false);
            if let Some(first) = seen.insert(m.name.as_str(), i) {
                p.push(
                    format!("{at}.name"),
                    format!("{:?} is already the name of models[{first}]", m.name),
                );
                seen.insert(m.name.as_str(), first);
            }
            p.positive(&format!("{at}.max_concurrency"), m.max_concurrency);
            if m.responses == ResponsesMode::Native
                && !matches!(m.backend, BackendConfig::Upstream { .. })
            {
                p.push(
                    format!("{at}.responses"),
                    "is \"native\", which relays to an upstream server's /v1/responses, but the backend is not `upstream` (use \"translate\")",
                );
            }
            for (j, c) in m.capabilities.iter().flatten().enumerate() {
                let path = format!("{at}.capabilities[{j}]");
                if !CAPABILITY_NAMES.contains(&c.as_str()) {
                    p.push(
                        path,
                        format!(
                            "{c:?} is not a capability (expected one of {})",
                            CAPABILITY_NAMES.join(", ")
                        ),
                    );
                } else if m.capabilities.iter().flatten().take(j).any(|d| d == c) {
                    p.push(path, format!("{c:?} is listed twice"));
                }
            }
            check_weights(p, &at, m);
            match &m.backend {
                BackendConfig::Sim { tokens_per_s, .. } => {
                    // 0 means "as fast as possible" (benchmarks of the relay itself).
                    p.non_negative_finite(&format!("{at}.backend.tokens_per_s"), *tokens_per_s);
                }
                BackendConfig::Upstream {
                    base_url,
                    api_key,
                    upstream_model,
                    timeout_ms,
                } => {
                    if base_url.starts_with("https://") {
                        // The backend runs on the node itself; the node speaks plain HTTP to it.
                        p.push(
                            format!("{at}.backend.base_url"),
                            format!("{base_url:?}: https upstreams are not supported; the upstream runs on the node, use http://127.0.0.1:PORT/v1"),
                        );
                    } else if !is_v1_base_url(base_url) {
                        p.push(
                            format!("{at}.backend.base_url"),
                            format!("{base_url:?} is not an http:// URL ending in /v1"),
                        );
                    }
                    if let Some(key) = api_key {
                        check_secret(p, &format!("{at}.backend.api_key"), key);
                    }
                    if let Some(name) = upstream_model {
                        check_name(p, &format!("{at}.backend.upstream_model"), name, 256, false);
                    }
                    p.positive(&format!("{at}.backend.timeout_ms"), *timeout_ms);
                }
            }
        }
        let mut seen = BTreeMap::new();
        for (i, g) in self.games.iter().enumerate() {
            let at = format!("games[{i}]");
            check_name(p, &format!("{at}.title"), &g.title, 128, true);
            if let Some(first) = seen.insert(g.title.as_str(), i) {
                p.push(
                    format!("{at}.title"),
                    format!("{:?} is already the title of games[{first}]", g.title),
                );
                seen.insert(g.title.as_str(), first);
            }
            if let GameSource::Command { command } = &g.source {
                match command.first() {
                    None => p.push(
                        format!("{at}.source.command"),
                        "must name a program (argv, non-empty)",
                    ),
                    Some(program) if program.trim().is_empty() => p.push(
                        format!("{at}.source.command[0]"),
                        "must name a program, not be empty",
                    ),
                    Some(_) => {}
                }
            }
        }
    }

    /// One line for `edge-node check-config`.
    pub fn summary(&self) -> String {
        let trust = if !self.gateway.pinned_cert_sha256s.is_empty() {
            "pinned certificates"
        } else if self.gateway.pinned_cert_sha256.is_some() {
            "pinned certificate"
        } else {
            "CA file"
        };
        let gpus = if self.gpus.is_empty() {
            "GPUs from NVML".to_string()
        } else {
            let classes: Vec<String> = self.gpus.iter().map(|g| self.gpu_class(g)).collect();
            format!("{} declared GPUs ({})", self.gpus.len(), classes.join(", "))
        };
        format!(
            "node {} -> gateway {} ({trust}, server name {}), enrolment token {}, {gpus}, \
             {} models, {} games, capacity {} game sessions / {} inference, log {} ({})",
            self.node.id,
            self.gateway.describe(),
            self.gateway.server_name(),
            if self.node.enrolment_token.is_some() {
                "set"
            } else {
                "not set"
            },
            self.models.len(),
            self.games.len(),
            self.capacity.game_sessions,
            self.capacity.inference_concurrency,
            self.log.level,
            self.log.format.as_str(),
        )
    }
}

/// A bootstrap URL: `http://host[:port]/path`. Plain HTTP is enough because the list it returns
/// is never a trust decision (see [`NodeGatewayConfig::bootstrap_url`]).
fn check_bootstrap_url(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!(
            "{url:?} must be an http:// URL (trust comes from the pins or ca_file, not from \
             the transport of the list)"
        ));
    };
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty()
        || url.len() > 2048
        || rest.contains(|c: char| c.is_whitespace() || c.is_control())
        || rest.contains('#')
    {
        return Err(format!("{url:?} is not an http://host[:port]/path URL"));
    }
    Ok(())
}

fn is_v1_base_url(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return false;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let host = rest.split('/').next().unwrap_or("");
    !host.is_empty()
        && !rest.contains(char::is_whitespace)
        && !rest.contains(['?', '#'])
        && rest.ends_with("/v1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(model: &str) -> String {
        gpu_class_for_model(&default_gpu_class_table(), model)
    }

    #[test]
    fn default_table_prefers_specific_patterns() {
        let cases = [
            ("NVIDIA GB200", "gb200"),
            ("NVIDIA B200", "b200"),
            ("NVIDIA H200 NVL", "h200"),
            ("NVIDIA H20", "h20"),
            ("NVIDIA H100 80GB HBM3", "h100"),
            ("NVIDIA H800", "h800"),
            ("NVIDIA A100-SXM4-80GB", "a100"),
            ("NVIDIA RTX A1000", "rtxa1000"),
            ("NVIDIA L40S", "l40s"),
            ("NVIDIA L40", "l40"),
            ("NVIDIA GeForce RTX 4090 D", "rtx4090d"),
            ("NVIDIA GeForce RTX 4090", "rtx4090"),
            ("nvidia geforce rtx 4080 super", "rtx4080"),
            ("NVIDIA GeForce RTX 3080 Ti", "rtx3080"),
            ("AMD Instinct MI300X", "mi300"),
            ("AMD Instinct MI250X", "mi250"),
            ("NVIDIA Tesla T4", UNKNOWN_GPU_CLASS),
            ("", UNKNOWN_GPU_CLASS),
        ];
        for (model, want) in cases {
            assert_eq!(class(model), want, "{model}");
        }
    }

    #[test]
    fn custom_table_first_match_wins_and_empty_patterns_never_match() {
        let table = vec![
            GpuClassPattern {
                contains: String::new(),
                class: "everything".into(),
            },
            GpuClassPattern {
                contains: "t4".into(),
                class: "t4".into(),
            },
            GpuClassPattern {
                contains: "Tesla".into(),
                class: "tesla".into(),
            },
        ];
        assert_eq!(gpu_class_for_model(&table, "NVIDIA Tesla T4"), "t4");
        assert_eq!(gpu_class_for_model(&table, "NVIDIA Tesla V100"), "tesla");
        assert_eq!(gpu_class_for_model(&table, "AMD"), UNKNOWN_GPU_CLASS);
    }

    #[test]
    fn host_port() {
        let g = |a: &str| NodeGatewayConfig::pinned(a, "00".repeat(32));
        assert_eq!(
            g("gw.example.com:4433").host_port(),
            Ok(("gw.example.com", 4433))
        );
        assert_eq!(g("[::1]:4433").host_port(), Ok(("::1", 4433)));
        assert_eq!(g("[::1]:4433").server_name(), "::1");
        for bad in [
            "gw.example.com",
            "::1:4433",
            ":4433",
            "h:0",
            "h:99999",
            "[::1:4433",
            "h:x",
        ] {
            assert!(g(bad).host_port().is_err(), "{bad}");
        }
        let mut named = g("10.0.0.1:4433");
        named.server_name = Some("gw.internal".into());
        assert_eq!(named.server_name(), "gw.internal");
    }

    #[test]
    fn sha256_pin() {
        let hex = "0123456789abcdefABCDEF".repeat(3);
        let mut pin = NodeGatewayConfig::pinned("h:1", &hex[..64]);
        let bytes = pin.pinned_cert_sha256_bytes().unwrap();
        assert_eq!(&bytes[..4], &[0x01, 0x23, 0x45, 0x67]);
        assert_eq!(bytes[8], 0xAB);
        assert_eq!(bytes[11], 0x01);
        pin.pinned_cert_sha256 = Some("g".repeat(64));
        assert_eq!(pin.pinned_cert_sha256_bytes(), None);
        pin.pinned_cert_sha256 = Some("a".repeat(63));
        assert_eq!(pin.pinned_cert_sha256_bytes(), None);
        // Multi-byte characters must not be sliced into a panic.
        pin.pinned_cert_sha256 = Some("é".repeat(32));
        assert_eq!(pin.pinned_cert_sha256_bytes(), None);
    }

    #[test]
    fn base_urls() {
        for ok in [
            "http://127.0.0.1:8000/v1",
            "https://api.example.com/openai/v1/",
        ] {
            assert!(is_v1_base_url(ok), "{ok}");
        }
        for bad in [
            "127.0.0.1:8000/v1",
            "http://h:8000",
            "http:///v1",
            "http://h/v1?x=1",
        ] {
            assert!(!is_v1_base_url(bad), "{bad}");
        }
    }

    #[test]
    fn debug_redacts_secrets() {
        let mut cfg = NodeConfig::new(
            NodeIdentity {
                id: "n1".into(),
                enrolment_token: Some("enrol-secret".into()),
            },
            NodeGatewayConfig::pinned("h:1", "0".repeat(64)),
        );
        cfg.models.push(ModelConfig {
            name: "m".into(),
            max_concurrency: 1,
            backend: BackendConfig::Upstream {
                base_url: "http://h/v1".into(),
                api_key: Some("sk-upstream".into()),
                upstream_model: None,
                timeout_ms: 1,
            },
            responses: Default::default(),
            capabilities: None,
            weights_bytes: None,
            params_b: None,
            dtype: None,
        });
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("enrol-secret") && !shown.contains("sk-upstream"),
            "{shown}"
        );
        assert_eq!(cfg.models[0].upstream_model_name(), "m");
    }
}
