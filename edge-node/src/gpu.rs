//! What GPUs this node has: NVML when an NVIDIA driver is present, else the config, else `cpu`.
//!
//! NVML is loaded at run time (`libnvidia-ml.so.1` through `nvml-wrapper`), so the same binary
//! runs on machines without a driver.

use nearpath_config::{gpu_class_for_model, GpuClassPattern, GpuSpec};
use serde::Serialize;

/// One GPU as the node reports it at registration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuInfo {
    pub model: String,
    pub class: String,
    pub vram_mib: u64,
}

/// Where the GPU description came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuSource {
    Nvml,
    Config,
    /// Neither a driver nor configured GPUs: the node serves as class `cpu`.
    None,
}

/// GPU discovery and (when NVML is present) live utilisation for heartbeats.
pub struct GpuMonitor {
    nvml: Option<nvml_wrapper::Nvml>,
    gpus: Vec<GpuInfo>,
    source: GpuSource,
}

impl GpuMonitor {
    /// Probes NVML unless `use_nvml` is false (tests), then falls back to `configured`.
    pub fn detect(configured: &[GpuSpec], table: &[GpuClassPattern], use_nvml: bool) -> Self {
        let nvml = if use_nvml {
            match nvml_wrapper::Nvml::init() {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::debug!(error = %e, "NVML not available; using configured GPUs");
                    None
                }
            }
        } else {
            None
        };
        if let Some(n) = &nvml {
            let found = nvml_gpus(n, table);
            if !found.is_empty() {
                return GpuMonitor {
                    gpus: found,
                    nvml,
                    source: GpuSource::Nvml,
                };
            }
        }
        let (gpus, source) = from_config(configured, table);
        GpuMonitor { nvml, gpus, source }
    }

    pub fn gpus(&self) -> &[GpuInfo] {
        &self.gpus
    }

    pub fn source(&self) -> GpuSource {
        self.source
    }

    /// Mean GPU utilisation in 0..1 across devices, when NVML can tell.
    pub fn utilisation(&self) -> Option<f32> {
        let n = self.nvml.as_ref()?;
        let count = n.device_count().ok()?;
        if count == 0 {
            return None;
        }
        let mut sum = 0.0f32;
        for i in 0..count {
            sum += n.device_by_index(i).ok()?.utilization_rates().ok()?.gpu as f32;
        }
        Some(sum / count as f32 / 100.0)
    }
}

fn nvml_gpus(n: &nvml_wrapper::Nvml, table: &[GpuClassPattern]) -> Vec<GpuInfo> {
    let count = n.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|i| {
            let d = n.device_by_index(i).ok()?;
            let model = d.name().ok()?;
            let vram_mib = d
                .memory_info()
                .map(|m| m.total / (1024 * 1024))
                .unwrap_or(0);
            Some(GpuInfo {
                class: gpu_class_for_model(table, &model),
                model,
                vram_mib,
            })
        })
        .collect()
}

/// GPUs from config (an explicit `class` wins over the model-name table); none means `cpu`.
pub fn from_config(configured: &[GpuSpec], table: &[GpuClassPattern]) -> (Vec<GpuInfo>, GpuSource) {
    if configured.is_empty() {
        return (
            vec![GpuInfo {
                model: "cpu".into(),
                class: "cpu".into(),
                vram_mib: 0,
            }],
            GpuSource::None,
        );
    }
    let gpus = configured
        .iter()
        .map(|g| GpuInfo {
            model: g.model.clone(),
            class: g
                .class
                .clone()
                .unwrap_or_else(|| gpu_class_for_model(table, &g.model)),
            vram_mib: g.vram_mib,
        })
        .collect();
    (gpus, GpuSource::Config)
}
