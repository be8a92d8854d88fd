//! The node's `Inventory`: what the gateway's checker tests the node's claims against (GPU
//! identities, the size of each model's weights, the video encoder).
//!
//! Everything here is self-reported: the GPU identities come from NVML when a driver is present
//! (else from `[[gpus]]` in the config), the model sizes from `[[models]] weights_bytes` or
//! `params_b` x `dtype`, else from the upstream server when it says ([`WeightsDetector`]:
//! llama.cpp's server lists `meta.size` in `/v1/models`), else 0 (unknown). For the simulator,
//! the configured size is what it reports, whatever it delivers: that is the knob tests use to
//! make a node lie about a model.

use crate::gpu::GpuInfo;
use crate::inference::{BackendSpec, ModelSpec, UpstreamBackend};
use nearpath_config::{NodeConfig, WeightsOrigin};
use nearpath_protocol::message::{GpuIdentity, Inventory, ModelWeights, WeightsSource};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::Mutex;
use tracing::{info, warn};

/// How long the node waits for an upstream server to list its models' sizes. The upstream
/// runs on the node, so it answers at once or is not up (the inventory then says "unknown"
/// and the next connection asks again).
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Finds the weight sizes of the models served by an upstream server that the configuration
/// gives no size for, once per model: a size found, or a server that answered without one, is
/// remembered; a server that did not answer is asked again at the next registration.
pub struct WeightsDetector {
    /// (model name, name upstream, its backend), for the models without a configured size.
    upstreams: Vec<(String, String, UpstreamBackend)>,
    /// What each model's server answered: its size, or `None` when it lists none.
    found: Mutex<HashMap<String, Option<u64>>>,
}

impl WeightsDetector {
    pub fn new(config: &NodeConfig) -> WeightsDetector {
        let upstreams = config
            .models
            .iter()
            .filter(|m| m.configured_weights_bytes().is_none())
            .filter_map(|m| match ModelSpec::from(m).backend {
                BackendSpec::Upstream(u) => {
                    let backend = UpstreamBackend::new(u).ok()?;
                    Some((m.name.clone(), m.upstream_model_name().to_string(), backend))
                }
                BackendSpec::Sim(_) => None,
            })
            .collect();
        WeightsDetector {
            upstreams,
            found: Mutex::new(HashMap::new()),
        }
    }

    /// The sizes known now, by model name, after asking (at once, each within `timeout`) the
    /// servers not asked successfully yet.
    pub async fn detect(&self, timeout: Duration) -> HashMap<String, u64> {
        let mut found = self.found.lock().await;
        let mut asks = tokio::task::JoinSet::new();
        for (name, upstream_name, backend) in &self.upstreams {
            if found.contains_key(name) {
                continue;
            }
            let (name, upstream_name, backend) =
                (name.clone(), upstream_name.clone(), backend.clone());
            asks.spawn(async move {
                let r = backend.detect_weights_bytes(&upstream_name, timeout).await;
                (name, r)
            });
        }
        while let Some(done) = asks.join_next().await {
            let Ok((name, result)) = done else {
                continue;
            };
            match result {
                Ok(Some(bytes)) => {
                    info!(model = %name, weights_bytes = bytes, "model size detected from the upstream server");
                    found.insert(name, Some(bytes));
                }
                Ok(None) => {
                    info!(model = %name, "the upstream server lists no model size (llama.cpp's server does, in /v1/models meta.size): declare [[models]] weights_bytes for the gateway's checks");
                    found.insert(name, None);
                }
                Err(e) => {
                    warn!(model = %name, error = %e, "could not read the model size from the upstream server; reporting it as unknown")
                }
            }
        }
        found
            .iter()
            .filter_map(|(n, b)| Some((n.clone(), (*b)?)))
            .collect()
    }
}

/// The `Inventory` this node sends after `Registered`, for the GPUs it registered with.
///
/// A GPU is listed by its position in `Register.gpus` only when something of its identity is
/// known (a node without NVML or configured identities lists none). Every configured model is
/// listed, with 0 bytes when its size is unknown. `detected` holds the sizes read from upstream
/// servers ([`WeightsDetector`]), used for the models the configuration gives no size for.
pub fn inventory(
    config: &NodeConfig,
    gpus: &[GpuInfo],
    h264_encoder: &str,
    detected: &HashMap<String, u64>,
) -> Inventory {
    let gpus = gpus
        .iter()
        .enumerate()
        .filter(|(_, g)| !g.uuid.is_empty() || g.pci_device_id != 0 || !g.driver_version.is_empty())
        .map(|(i, g)| GpuIdentity {
            index: i as u32,
            uuid: g.uuid.clone(),
            pci_device_id: g.pci_device_id,
            driver_version: g.driver_version.clone(),
        })
        .collect();
    let models = config
        .models
        .iter()
        .map(|m| {
            let (weights_bytes, source) = match m.configured_weights_bytes() {
                Some((b, WeightsOrigin::Declared)) => (b, WeightsSource::Declared),
                Some((b, WeightsOrigin::Computed)) => (b, WeightsSource::Computed),
                None => match detected.get(&m.name) {
                    Some(b) => (*b, WeightsSource::Detected),
                    None => (0, WeightsSource::Declared),
                },
            };
            ModelWeights {
                name: m.name.clone(),
                weights_bytes,
                source,
            }
        })
        .collect();
    // The H.264 encoder `[encoder]` resolved to (every codec's encoder is in `Register`); a
    // node without games encodes nothing.
    let encoder = if config.games.is_empty() {
        String::new()
    } else {
        h264_encoder.to_string()
    };
    Inventory {
        gpus,
        models,
        encoder,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::from_config;
    use nearpath_config::parse_node;

    const NODE: &str = r#"
[node]
id = "n1"
[gateway]
address = "gw.example.com:4433"
pinned_cert_sha256 = "ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01"
[[gpus]]
model = "NVIDIA H100 80GB HBM3"
vram_mib = 81559
uuid = "GPU-5d1a8a2e-0c1f-4b1e-9f0e-2a3b4c5d6e7f"
pci_device_id = 0x233010de
[[gpus]]
model = "NVIDIA H100 80GB HBM3"
vram_mib = 81559
[[models]]
name = "declared"
weights_bytes = 16000000000
backend = { type = "sim" }
[[models]]
name = "computed"
params_b = 70.0
dtype = "fp8"
backend = { type = "sim" }
[[models]]
name = "unknown"
backend = { type = "sim" }
[[games]]
title = "testpattern"
source = { type = "builtin" }
"#;

    #[test]
    fn the_node_reports_configured_identities_and_sizes_in_its_inventory() {
        let cfg = parse_node(NODE, "node.toml", &[]).unwrap();
        let (gpus, _) = from_config(&cfg.gpus, &cfg.gpu_classes);
        let inv = inventory(&cfg, &gpus, "openh264", &HashMap::new());
        // The second GPU has no known identity: it is not listed.
        assert_eq!(
            inv.gpus,
            [GpuIdentity {
                index: 0,
                uuid: "GPU-5d1a8a2e-0c1f-4b1e-9f0e-2a3b4c5d6e7f".into(),
                pci_device_id: 0x2330_10de,
                driver_version: String::new(),
            }]
        );
        assert_eq!(
            inv.models,
            [
                ModelWeights {
                    name: "declared".into(),
                    weights_bytes: 16_000_000_000,
                    source: WeightsSource::Declared,
                },
                ModelWeights {
                    name: "computed".into(),
                    weights_bytes: 70_000_000_000,
                    source: WeightsSource::Computed,
                },
                ModelWeights {
                    name: "unknown".into(),
                    weights_bytes: 0,
                    source: WeightsSource::Declared,
                },
            ]
        );
        assert_eq!(inv.encoder, "openh264");
    }

    #[test]
    fn a_node_without_gpus_or_games_reports_an_empty_inventory() {
        let text = NODE.split("[[gpus]]").next().unwrap();
        let cfg = parse_node(text, "node.toml", &[]).unwrap();
        let (gpus, _) = from_config(&cfg.gpus, &cfg.gpu_classes);
        assert_eq!(
            inventory(&cfg, &gpus, "x264", &HashMap::new()),
            Inventory::default()
        );
    }
}
