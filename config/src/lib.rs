//! Nearpath configuration: one TOML file per binary (`gateway`, `edge-node`), overridable from
//! `NEARPATH_*` environment variables, checked once at load so the rest of the code base may
//! assume well-formed values.
//!
//! Every error names the key path and the offending value, and a load reports every problem in
//! the file at once ([`ConfigErrors`]). See `config/examples/` for fully commented files.

mod common;
mod error;
mod gateway;
pub mod geo;
mod iso;
mod load;
mod node;

pub use common::{parse_version, LogColor, LogConfig, LogFormat, OtlpProtocol};
pub use error::{ConfigError, ConfigErrors};
pub use gateway::{
    AdminConfig, GameConfig, GatewayConfig, HttpConfig, InferenceConfig, ModelPrice, NodesConfig,
    OutlierConfig, QuicConfig, RoutingConfig, StoreConfig, WebTransportConfig, IN_MEMORY_ORIGIN,
    MAX_FALLBACKS_PER_MODEL, MAX_WEBTRANSPORT_CERT_DAYS, MIN_ADMIN_TOKEN_CHARS,
};
pub use gateway::{
    CheckerConfig, CrossRoute, FederationConfig, KnownModel, MAX_MODEL_WEIGHTS_BYTES,
};
pub use geo::*;
pub use iso::{is_iso_country, ISO_3166_1_ALPHA2, KOSOVO};
pub use load::{
    load_gateway, load_gateway_checked, load_gateway_for_run, load_node, load_node_checked,
    load_node_for_run, parse_gateway, parse_gateway_checked, parse_gateway_for_run, parse_node,
    parse_node_checked, parse_node_for_run, ExtraChecks, ENV_PREFIX, GATEWAY_FILE_KEYS,
    MAX_CONFIG_BYTES, NODE_FILE_KEYS,
};
pub use node::{
    default_gpu_class_table, gpu_class_for_model, BackendConfig, CapacityConfig, DrainConfig,
    Dtype, EncoderConfig, EncoderKind, GameEntry, GameSource, GpuClassPattern, GpuSpec,
    ModelConfig, NodeConfig, NodeGatewayConfig, NodeIdentity, ResponsesMode, CPU_GPU_CLASS,
    UNKNOWN_GPU_CLASS,
};
pub use node::{AudioConfig, CongestionController, MediaConfig, NodeQuicConfig};
pub use node::{WeightsOrigin, MAX_GPU_UUID_BYTES, MAX_WEIGHTS_BYTES};
pub use node::{CAPABILITY_NAMES, SIM_CAPABILITY_NAMES};
