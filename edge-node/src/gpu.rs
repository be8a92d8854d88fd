//! What GPUs this node has: NVML when an NVIDIA driver is present, else the config, else `cpu`.
//!
//! NVML is loaded at run time (`libnvidia-ml.so.1` through `nvml-wrapper`), so the same binary
//! runs on machines without a driver.

use nearpath_config::{gpu_class_for_model, GpuClassPattern, GpuSpec};
use serde::Serialize;

/// One GPU as the node reports it at registration (`Register`) and in its `Inventory`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuInfo {
    pub model: String,
    pub class: String,
    pub vram_mib: u64,
    /// NVML's UUID (`GPU-...`), or `[[gpus]] uuid`; empty when unknown.
    pub uuid: String,
    /// NVML's combined PCI id `(device << 16) | vendor`, or `[[gpus]] pci_device_id`; 0 when
    /// unknown.
    pub pci_device_id: u32,
    /// The NVIDIA driver's version from NVML; empty without NVML.
    pub driver_version: String,
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
    // One driver serves every device; a failure to read it (or an identity below) leaves the
    // field unknown rather than hiding the GPU, whose model and memory still count.
    let driver_version = n.sys_driver_version().unwrap_or_default();
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
                uuid: d.uuid().unwrap_or_default(),
                pci_device_id: d.pci_info().map(|p| p.pci_device_id).unwrap_or(0),
                driver_version: driver_version.clone(),
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
                uuid: String::new(),
                pci_device_id: 0,
                driver_version: String::new(),
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
            uuid: g.uuid.clone().unwrap_or_default(),
            pci_device_id: g.pci_device_id.unwrap_or(0),
            driver_version: String::new(),
        })
        .collect();
    (gpus, GpuSource::Config)
}
