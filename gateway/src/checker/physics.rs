//! GPU classes against physics: what a class of GPU *cannot* do, whatever its operator says.
//!
//! Three bounds, each from a vendor data sheet (the sources are in `GPU_TABLE.md`):
//!
//! - **Memory.** A model's weights must fit in the memory of the GPUs that serve it, summed
//!   over the node's GPUs (tensor parallelism splits them).
//! - **Bandwidth.** Decoding one token of one stream reads every weight once, so a single
//!   stream decodes at most `memory bandwidth / weight bytes` tokens per second. Batching does
//!   not help one stream (it shares each read among streams, it does not shorten it), which is
//!   why the evidence is the best *single-stream* rate.
//! - **Encoders.** A hardware encoder session is bounded by the NVENC engines of the chip times
//!   the fastest rate one engine reaches (NVIDIA's NVENC application note, fastest preset).
//!
//! # Honest limits
//!
//! - Speculative decoding, quantisation below the declared dtype, and prefix caching can beat
//!   the naive bandwidth bound; [`Tolerance::decode_over`] (default +50 %) leaves room for them,
//!   so only a rate well beyond the bound is *impossible*.
//! - A node can under-report a model's weight size to make its speed look plausible; the
//!   driver keeps a floor per model name ([`weights_floor`]) from what it has seen elsewhere.
//! - A software encoder runs on CPUs and proves nothing about the GPU, so encode throughput is
//!   only checked when the node says it uses a hardware encoder.
//! - Host-memory offload (weights in system RAM streamed over PCIe) can serve a model that does
//!   not fit; such a node still reports a GPU that cannot hold the model, and the finding says
//!   so with the numbers, but the operator of an honest offloading node sees it as a false
//!   "impossible". Declaring the node's real GPU is the remedy.
//! - A class the table does not know (`unclassified`, or one an admin added) has no physics:
//!   [`physics_of`] returns `None` and nothing about such a GPU can be checked.
//!
//! For a class that merges SKUs (the A100 40 GB and 80 GB, the H100 PCIe, SXM and NVL) the row
//! holds the largest memory and the highest bandwidth of its SKUs, so a claim is impossible
//! only when no SKU of the class could do it. Memory sizes the vendors give in GB are read as
//! GiB (the larger unit), for the same reason.

use serde::{Deserialize, Serialize};

/// One GPU class's physical limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassPhysics {
    /// The class name, as in [`crate::gpu_class::GPU_MODEL_TABLE`].
    pub class: &'static str,
    /// Memory on the device, MiB (the largest SKU of the class). 0 for `cpu`.
    pub vram_mib: u64,
    /// Peak memory bandwidth, GB/s (10^9 bytes per second; the fastest SKU of the class).
    pub mem_bw_gb_s: f64,
    /// NVENC engines per chip; 0 when the chip has no hardware video encoder to claim.
    pub nvenc_engines: u32,
    /// An upper bound of H.264 1080p frames per second one engine encodes (fastest preset).
    pub nvenc_h264_1080p_fps_per_engine: f64,
    /// Order from least (1) to most powerful: by bandwidth, then memory, then class name;
    /// `cpu` is 0. Unique per row (a unit test pins the rule).
    pub power_rank: u32,
    /// Where the numbers come from (details and URLs in `GPU_TABLE.md`).
    pub source: &'static str,
}

const fn row(
    class: &'static str,
    vram_gib: u64,
    mem_bw_gb_s: f64,
    nvenc_engines: u32,
    nvenc_fps: f64,
    power_rank: u32,
    source: &'static str,
) -> ClassPhysics {
    ClassPhysics {
        class,
        vram_mib: vram_gib * 1024,
        mem_bw_gb_s,
        nvenc_engines,
        nvenc_h264_1080p_fps_per_engine: nvenc_fps,
        power_rank,
        source,
    }
}

/// Upper bound of H.264 1080p fps per NVENC engine for Turing, Ampere and Ada parts (rounded up
/// from the NVENC application note's fastest preset).
const NVENC_FPS: f64 = 1000.0;
/// The same for Volta (first-generation Volta NVENC is slower; rounded up all the same).
const NVENC_FPS_VOLTA: f64 = 800.0;
/// The same for Blackwell consumer parts (ninth-generation NVENC).
const NVENC_FPS_BLACKWELL: f64 = 1200.0;

/// The physics of every class of [`crate::gpu_class::GPU_MODEL_TABLE`], one row per line.
#[rustfmt::skip]
pub const CLASS_TABLE: &[ClassPhysics] = &[
    // Host memory bandwidth of the fastest two-socket server (2 x 12 channels of MRDIMM-8800);
    // no device memory: weights live in host RAM, so the fit check does not apply.
    ClassPhysics {
        class: "cpu",
        vram_mib: 0,
        mem_bw_gb_s: 1700.0,
        nvenc_engines: 0,
        nvenc_h264_1080p_fps_per_engine: 0.0,
        power_rank: 0,
        source: "Intel Xeon 6900P product brief (12 ch MRDIMM-8800), two sockets",
    },
    row("rtxa1000", 8, 192.0, 1, NVENC_FPS, 1, "NVIDIA RTX A1000 data sheet"),
    row("l2", 24, 300.0, 3, NVENC_FPS, 2, "NVIDIA L2 product brief"),
    row("l4", 24, 300.0, 2, NVENC_FPS, 3, "NVIDIA L4 data sheet"),
    row("t4", 16, 320.0, 1, NVENC_FPS, 4, "NVIDIA T4 data sheet"),
    row("a10", 24, 600.0, 1, NVENC_FPS, 5, "NVIDIA A10 data sheet"),
    row("a40", 48, 696.0, 1, NVENC_FPS, 6, "NVIDIA A40 data sheet"),
    row("rtx4080", 16, 736.0, 2, NVENC_FPS, 7, "NVIDIA GeForce RTX 4080 / 4080 SUPER specifications"),
    row("l20", 48, 864.0, 3, NVENC_FPS, 8, "NVIDIA L20 product brief"),
    row("l40", 48, 864.0, 3, NVENC_FPS, 9, "NVIDIA L40 data sheet"),
    row("l40s", 48, 864.0, 3, NVENC_FPS, 10, "NVIDIA L40S data sheet"),
    row("v100", 32, 900.0, 3, NVENC_FPS_VOLTA, 11, "NVIDIA V100 data sheet"),
    row("rtx3080", 12, 912.0, 1, NVENC_FPS, 12, "NVIDIA GeForce RTX 3080 / 3080 Ti specifications"),
    row("rtx6000ada", 48, 960.0, 3, NVENC_FPS, 13, "NVIDIA RTX 6000 Ada data sheet"),
    row("rtx3090", 24, 1008.0, 1, NVENC_FPS, 14, "NVIDIA GeForce RTX 3090 / 3090 Ti specifications"),
    row("rtx4090", 24, 1008.0, 2, NVENC_FPS, 15, "NVIDIA GeForce RTX 4090 specifications"),
    row("rtx4090d", 24, 1008.0, 2, NVENC_FPS, 16, "NVIDIA GeForce RTX 4090 D specifications"),
    row("rtx5090", 32, 1792.0, 3, NVENC_FPS_BLACKWELL, 17, "NVIDIA GeForce RTX 5090 specifications"),
    row("a100", 80, 2039.0, 0, 0.0, 18, "NVIDIA A100 data sheet"),
    row("a800", 80, 2039.0, 0, 0.0, 19, "NVIDIA A800 data sheet"),
    row("gaudi2", 96, 2450.0, 0, 0.0, 20, "Intel Gaudi 2 white paper"),
    row("mi250", 128, 3277.0, 0, 0.0, 21, "AMD Instinct MI250X / MI250 data sheets"),
    row("h800", 80, 3350.0, 0, 0.0, 22, "NVIDIA H800 product brief"),
    row("gaudi3", 128, 3700.0, 0, 0.0, 23, "Intel Gaudi 3 white paper"),
    row("h100", 94, 3900.0, 0, 0.0, 24, "NVIDIA H100 data sheet (SXM, PCIe, NVL)"),
    row("h20", 96, 4000.0, 0, 0.0, 25, "NVIDIA H20 product brief"),
    row("h200", 141, 4800.0, 0, 0.0, 26, "NVIDIA H200 data sheet"),
    // GPU HBM3e plus the Grace CPU's coherent LPDDR5X (NVIDIA: "up to 624GB of fast memory").
    // Bandwidth: the HBM3e variant as announced (5 TB/s), above the data sheet's 4.9 TB/s.
    row("gh200", 624, 5000.0, 0, 0.0, 27, "NVIDIA GH200 Grace Hopper Superchip data sheet; HBM3e announcement (5 TB/s)"),
    row("mi300", 192, 5300.0, 0, 0.0, 28, "AMD Instinct MI300X / MI300A data sheets"),
    row("mi325x", 256, 6000.0, 0, 0.0, 29, "AMD Instinct MI325X data sheet"),
    row("b100", 192, 8000.0, 0, 0.0, 30, "NVIDIA Blackwell architecture technical brief"),
    row("b200", 192, 8000.0, 0, 0.0, 31, "NVIDIA DGX B200 / HGX B200 data sheets"),
    row("gb200", 192, 8000.0, 0, 0.0, 32, "NVIDIA GB200 NVL72 data sheet"),
    row("b300", 288, 8000.0, 0, 0.0, 33, "NVIDIA HGX B300 data sheet"),
    row("gb300", 288, 8000.0, 0, 0.0, 34, "NVIDIA GB300 NVL72 data sheet"),
    row("mi355x", 288, 8000.0, 0, 0.0, 35, "AMD Instinct MI355X data sheet"),
];

/// The physics of a class; `None` for a class the table does not know (`unclassified`, or a
/// class an admin invented): nothing about such a GPU can be checked.
pub fn physics_of(class: &str) -> Option<&'static ClassPhysics> {
    CLASS_TABLE.iter().find(|p| p.class == class)
}

/// One model a node serves, with what was measured of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEvidence {
    pub model: String,
    /// The weights' size in bytes (with the driver's floor per model name applied).
    pub weights_bytes: u64,
    /// The best sustained decode rate seen for ONE stream, tokens per second.
    pub decode_tokens_per_s: Option<f64>,
}

/// What was measured of a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub models: Vec<ModelEvidence>,
    /// The node's aggregate encoded pixels per second (all its sessions), best seen.
    pub encode_pixels_per_s: Option<f64>,
    /// Whether the node says it encodes in hardware (a software encoder proves nothing).
    pub hardware_encoder: bool,
}

/// How far a measurement may exceed a bound before the claim is impossible.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    /// Decode may exceed bandwidth / weights by this fraction (default 0.5: speculative decoding
    /// and quantisation beat the naive bound).
    pub decode_over: f64,
    /// Encode may exceed the engines' bound by this fraction (default 0.25).
    pub encode_over: f64,
    /// Below this fraction of the bound a measurement is "far below the claim" (default 0.1).
    pub far_below_ratio: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Self {
            decode_over: 0.5,
            encode_over: 0.25,
            far_below_ratio: 0.1,
        }
    }
}

impl Tolerance {
    /// The tolerance with every non-finite or negative field replaced by its default, so that a
    /// bad configuration cannot disable a check by making its bound NaN.
    pub fn sanitized(&self) -> Self {
        let d = Self::default();
        let ok = |v: f64, dflt: f64| if v.is_finite() && v >= 0.0 { v } else { dflt };
        Self {
            decode_over: ok(self.decode_over, d.decode_over),
            encode_over: ok(self.encode_over, d.encode_over),
            far_below_ratio: ok(self.far_below_ratio, d.far_below_ratio),
        }
    }
}

/// What the physics check found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    /// The model's weights exceed the claimed GPUs' memory, summed.
    WeightsDoNotFit {
        model: String,
        weights_bytes: u64,
        vram_bytes: u64,
    },
    /// Single-stream decode beats bandwidth / weights by more than the tolerance.
    DecodeTooFast {
        model: String,
        measured_tps: f64,
        bound_tps: f64,
    },
    /// Encode throughput beats the claimed encoders by more than the tolerance.
    EncodeTooFast {
        measured_pixels_per_s: f64,
        bound_pixels_per_s: f64,
    },
    /// The node delivers far below what its class would (a demotion signal, not impossible).
    FarBelowClaim {
        model: String,
        measured_tps: f64,
        expected_tps: f64,
    },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const GB: f64 = 1e9;
        match self {
            Finding::WeightsDoNotFit {
                model,
                weights_bytes,
                vram_bytes,
            } => write!(
                f,
                "model {model}: weights of {:.1} GB do not fit in {:.1} GB of GPU memory",
                *weights_bytes as f64 / GB,
                *vram_bytes as f64 / GB
            ),
            Finding::DecodeTooFast {
                model,
                measured_tps,
                bound_tps,
            } => write!(
                f,
                "model {model}: single-stream decode of {measured_tps:.1} tokens/s exceeds the \
                 memory-bandwidth bound of {bound_tps:.1} tokens/s"
            ),
            Finding::EncodeTooFast {
                measured_pixels_per_s,
                bound_pixels_per_s,
            } => write!(
                f,
                "encoding {:.1} Mpixel/s exceeds the hardware encoders' bound of {:.1} Mpixel/s",
                measured_pixels_per_s / 1e6,
                bound_pixels_per_s / 1e6
            ),
            Finding::FarBelowClaim {
                model,
                measured_tps,
                expected_tps,
            } => write!(
                f,
                "model {model}: {measured_tps:.1} tokens/s is far below the {expected_tps:.1} \
                 tokens/s the claimed GPUs would deliver"
            ),
        }
    }
}

/// Whether a finding proves the claim false (every finding but [`Finding::FarBelowClaim`]).
pub fn is_impossible(f: &Finding) -> bool {
    !matches!(f, Finding::FarBelowClaim { .. })
}

/// The weight size to check: the larger of what the node declares and what the gateway knows of
/// that model name, so that under-reporting a size cannot make a speed look plausible.
pub fn weights_floor(declared: u64, known: Option<u64>) -> u64 {
    declared.max(known.unwrap_or(0))
}

/// At most this many findings are returned by one check (impossible ones first), so a node
/// declaring thousands of models costs bounded memory.
pub const MAX_FINDINGS: usize = 32;

/// A measurement the checks can use: finite and not negative.
fn measured(v: Option<f64>) -> Option<f64> {
    v.filter(|x| x.is_finite() && *x >= 0.0)
}

/// The summed physics of a set of GPUs; `None` when no entry has a physics row.
struct Sum {
    vram_bytes: u64,
    bw_bytes_s: f64,
    encode_pixels_s: f64,
    /// Whether the fit check applies (not when the node claims only `cpu`).
    fit_applies: bool,
}

fn sum_physics<'a>(classes: impl Iterator<Item = &'a str> + Clone) -> Option<Sum> {
    let rows: Vec<&ClassPhysics> = classes.filter_map(physics_of).collect();
    if rows.is_empty() {
        return None;
    }
    // A `cpu` entry beside GPUs adds nothing: the weights the GPUs serve are read at the GPUs'
    // bandwidth. Only a node that claims no GPU at all is checked against host memory.
    let gpus: Vec<&ClassPhysics> = rows
        .iter()
        .copied()
        .filter(|r| r.class != crate::gpu_class::CPU)
        .collect();
    let (used, fit_applies) = if gpus.is_empty() {
        (rows, false)
    } else {
        (gpus, true)
    };
    Some(Sum {
        vram_bytes: used
            .iter()
            .map(|r| r.vram_mib.saturating_mul(1 << 20))
            .fold(0u64, u64::saturating_add),
        bw_bytes_s: used.iter().map(|r| r.mem_bw_gb_s * 1e9).sum(),
        encode_pixels_s: used
            .iter()
            .map(|r| r.nvenc_engines as f64 * r.nvenc_h264_1080p_fps_per_engine * 1920.0 * 1080.0)
            .sum(),
        fit_applies,
    })
}

/// Checks the evidence against the claimed GPUs (`gpu_classes` has one entry per GPU). Classes
/// without a physics row are skipped; when none has one, nothing is found. Models with zero
/// weight bytes have no bandwidth bound (and are reported by nothing: there is nothing to
/// check). At most [`MAX_FINDINGS`] findings, impossible ones first.
pub fn check_claim(gpu_classes: &[&str], ev: &Evidence, tol: &Tolerance) -> Vec<Finding> {
    let tol = tol.sanitized();
    let Some(sum) = sum_physics(gpu_classes.iter().copied()) else {
        return Vec::new();
    };
    let mut impossible = Vec::new();
    let mut below = Vec::new();
    for m in &ev.models {
        if sum.fit_applies && m.weights_bytes > sum.vram_bytes {
            impossible.push(Finding::WeightsDoNotFit {
                model: m.model.clone(),
                weights_bytes: m.weights_bytes,
                vram_bytes: sum.vram_bytes,
            });
        }
        let Some(tps) = measured(m.decode_tokens_per_s) else {
            continue;
        };
        if m.weights_bytes == 0 {
            continue;
        }
        let expected = sum.bw_bytes_s / m.weights_bytes as f64;
        let bound = expected * (1.0 + tol.decode_over);
        if tps > bound {
            impossible.push(Finding::DecodeTooFast {
                model: m.model.clone(),
                measured_tps: tps,
                bound_tps: bound,
            });
        } else if tps < expected * tol.far_below_ratio {
            below.push(Finding::FarBelowClaim {
                model: m.model.clone(),
                measured_tps: tps,
                expected_tps: expected,
            });
        }
    }
    if ev.hardware_encoder {
        if let Some(px) = measured(ev.encode_pixels_per_s) {
            let bound = sum.encode_pixels_s * (1.0 + tol.encode_over);
            if px > bound {
                impossible.push(Finding::EncodeTooFast {
                    measured_pixels_per_s: px,
                    bound_pixels_per_s: bound,
                });
            }
        }
    }
    impossible.extend(below);
    impossible.truncate(MAX_FINDINGS);
    impossible
}

/// The least powerful class (by [`ClassPhysics::power_rank`]) that, with `n_gpus` of it (at
/// least one), makes every impossible finding disappear; `None` when no class does (the node is
/// beyond any known class, and the driver quarantines it). A node is never reclassified to
/// `cpu`: having reported GPUs, it is not taken to have none.
pub fn least_consistent_class(
    n_gpus: usize,
    ev: &Evidence,
    tol: &Tolerance,
) -> Option<&'static str> {
    // More GPUs than any machine holds would make every claim consistent; cap the count.
    let n = n_gpus.clamp(1, 64);
    let mut rows: Vec<&ClassPhysics> = CLASS_TABLE
        .iter()
        .filter(|r| r.class != crate::gpu_class::CPU)
        .collect();
    rows.sort_by_key(|r| r.power_rank);
    rows.into_iter()
        .find(|r| {
            let classes = vec![r.class; n];
            !check_claim(&classes, ev, tol).iter().any(is_impossible)
        })
        .map(|r| r.class)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu_class::GPU_MODEL_TABLE;

    const GB: u64 = 1_000_000_000;

    fn ev(model: &str, weights: u64, tps: Option<f64>) -> Evidence {
        Evidence {
            models: vec![ModelEvidence {
                model: model.into(),
                weights_bytes: weights,
                decode_tokens_per_s: tps,
            }],
            ..Evidence::default()
        }
    }

    #[test]
    fn every_class_of_the_model_table_has_exactly_one_physics_row() {
        for (_, class) in GPU_MODEL_TABLE {
            assert!(physics_of(class).is_some(), "{class} has no physics row");
        }
        for r in CLASS_TABLE {
            assert!(
                GPU_MODEL_TABLE.iter().any(|(_, c)| *c == r.class),
                "{} is not a class of the model table",
                r.class
            );
            assert_eq!(
                CLASS_TABLE.iter().filter(|o| o.class == r.class).count(),
                1,
                "{}",
                r.class
            );
            assert!(r.mem_bw_gb_s > 0.0 && !r.source.is_empty(), "{}", r.class);
        }
        assert_eq!(physics_of("cpu").map(|r| r.vram_mib), Some(0));
        assert!(physics_of("unclassified").is_none());
        assert!(physics_of("").is_none());
    }

    #[test]
    fn power_rank_orders_by_bandwidth_then_memory_then_name_with_cpu_first() {
        let mut sorted: Vec<&ClassPhysics> = CLASS_TABLE.iter().collect();
        sorted.sort_by(|a, b| {
            let cpu = |r: &ClassPhysics| r.class != "cpu";
            cpu(a)
                .cmp(&cpu(b))
                .then(a.mem_bw_gb_s.total_cmp(&b.mem_bw_gb_s))
                .then(a.vram_mib.cmp(&b.vram_mib))
                .then(a.class.cmp(b.class))
        });
        for (i, r) in sorted.iter().enumerate() {
            assert_eq!(r.power_rank as usize, i, "{}", r.class);
        }
    }

    #[test]
    fn hopper_ampere_datacentre_and_non_nvidia_accelerators_claim_no_nvenc() {
        for c in [
            "a100", "a800", "h100", "h800", "h200", "h20", "gh200", "b200", "mi300", "gaudi2",
            "cpu",
        ] {
            assert_eq!(physics_of(c).unwrap().nvenc_engines, 0, "{c}");
        }
        for c in ["l4", "l40s", "rtx4090", "rtx3080", "t4"] {
            assert!(physics_of(c).unwrap().nvenc_engines > 0, "{c}");
        }
    }

    #[test]
    fn weights_that_do_not_fit_the_summed_vram_are_impossible() {
        let e = ev("big", 40 * GB, None);
        let f = check_claim(&["rtx3080"], &e, &Tolerance::default());
        assert!(
            matches!(&f[..], [Finding::WeightsDoNotFit { vram_bytes, .. }] if *vram_bytes == 12 << 30),
            "{f:?}"
        );
        assert!(is_impossible(&f[0]));
        assert!(f[0].to_string().contains("40.0 GB"), "{}", f[0]);
        // Four of them hold 48 GiB: it fits.
        let f = check_claim(&["rtx3080"; 4], &e, &Tolerance::default());
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn decode_beyond_bandwidth_over_weights_is_impossible_within_tolerance_it_is_not() {
        // rtx4090: 1008 GB/s over 14 GB = 72 tok/s; +50 % = 108.
        let t = Tolerance::default();
        assert!(check_claim(&["rtx4090"], &ev("m", 14 * GB, Some(100.0)), &t).is_empty());
        let f = check_claim(&["rtx4090"], &ev("m", 14 * GB, Some(120.0)), &t);
        match &f[..] {
            [Finding::DecodeTooFast { bound_tps, .. }] => {
                assert!((bound_tps - 108.0).abs() < 0.01, "{bound_tps}")
            }
            other => panic!("{other:?}"),
        }
        // Two GPUs double the bound.
        assert!(
            check_claim(&["rtx4090", "rtx4090"], &ev("m", 14 * GB, Some(120.0)), &t).is_empty()
        );
    }

    #[test]
    fn encode_is_checked_only_for_a_hardware_encoder() {
        // rtx3080: one engine, 1000 fps of 1080p, +25 %.
        let bound = 1000.0 * 1920.0 * 1080.0 * 1.25;
        let mut e = Evidence {
            encode_pixels_per_s: Some(bound * 1.1),
            hardware_encoder: false,
            ..Evidence::default()
        };
        assert!(check_claim(&["rtx3080"], &e, &Tolerance::default()).is_empty());
        e.hardware_encoder = true;
        let f = check_claim(&["rtx3080"], &e, &Tolerance::default());
        assert!(matches!(&f[..], [Finding::EncodeTooFast { .. }]), "{f:?}");
        // A chip without NVENC cannot claim hardware encoding at all.
        e.encode_pixels_per_s = Some(1.0);
        let f = check_claim(&["h100"], &e, &Tolerance::default());
        assert!(matches!(&f[..], [Finding::EncodeTooFast { .. }]), "{f:?}");
    }

    #[test]
    fn far_below_the_claim_is_a_demotion_signal_not_an_impossibility() {
        // h100: 3900 GB/s over 14 GB = 278 tok/s expected; 1 tok/s is far below.
        let f = check_claim(
            &["h100"],
            &ev("m", 14 * GB, Some(1.0)),
            &Tolerance::default(),
        );
        assert!(matches!(&f[..], [Finding::FarBelowClaim { .. }]), "{f:?}");
        assert!(!is_impossible(&f[0]));
    }

    #[test]
    fn unknown_classes_nan_and_zero_weights_find_nothing() {
        let t = Tolerance::default();
        assert!(check_claim(&["unclassified"], &ev("m", 900 * GB, Some(1e9)), &t).is_empty());
        assert!(check_claim(&[], &ev("m", 900 * GB, Some(1e9)), &t).is_empty());
        for tps in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -5.0] {
            assert!(
                check_claim(&["l4"], &ev("m", GB, Some(tps)), &t).is_empty(),
                "{tps}"
            );
        }
        assert!(check_claim(&["l4"], &ev("m", 0, Some(1e12)), &t).is_empty());
        // A NaN tolerance falls back to the default instead of disabling the bound.
        let nan = Tolerance {
            decode_over: f64::NAN,
            encode_over: f64::NAN,
            far_below_ratio: f64::NAN,
        };
        assert!(!check_claim(&["l4"], &ev("m", 14 * GB, Some(1e6)), &nan).is_empty());
    }

    #[test]
    fn a_cpu_only_node_is_checked_against_host_memory_without_a_fit_check() {
        let t = Tolerance::default();
        assert!(check_claim(&["cpu"], &ev("m", 400 * GB, Some(1.0)), &t).is_empty());
        let f = check_claim(&["cpu"], &ev("m", 14 * GB, Some(1000.0)), &t);
        assert!(matches!(&f[..], [Finding::DecodeTooFast { .. }]), "{f:?}");
        // Beside a GPU, a cpu entry adds no memory.
        let f = check_claim(&["rtx3080", "cpu"], &ev("m", 40 * GB, None), &t);
        assert!(matches!(&f[..], [Finding::WeightsDoNotFit { .. }]), "{f:?}");
    }

    #[test]
    fn findings_are_capped_with_impossible_ones_first() {
        let mut e = Evidence::default();
        for i in 0..10_000 {
            e.models.push(ModelEvidence {
                model: format!("m{i}"),
                weights_bytes: if i % 2 == 0 { 14 * GB } else { 900 * GB },
                decode_tokens_per_s: Some(0.001),
            });
        }
        let f = check_claim(&["h100"], &e, &Tolerance::default());
        assert_eq!(f.len(), MAX_FINDINGS);
        assert!(f.iter().all(is_impossible));
    }

    #[test]
    fn least_consistent_class_is_the_weakest_that_explains_the_evidence() {
        let t = Tolerance::default();
        // 40 GB at 50 tok/s needs >= 40 GB and >= 1333 GB/s: the A100 is the weakest such.
        let e = ev("big", 40 * GB, Some(50.0));
        assert_eq!(least_consistent_class(1, &e, &t), Some("a100"));
        // Two GPUs: half the memory and bandwidth each (2 x 696 GB/s is enough).
        assert_eq!(least_consistent_class(2, &e, &t), Some("a40"));
        // Beyond any class: 10 TB of weights.
        assert_eq!(
            least_consistent_class(1, &ev("x", 10_000 * GB, None), &t),
            None
        );
        // A million GPUs are capped, so an absurd count does not explain everything.
        assert_eq!(
            least_consistent_class(1_000_000, &ev("x", 1_000_000 * GB, None), &t),
            None
        );
        assert_eq!(weights_floor(1, Some(40 * GB)), 40 * GB);
        assert_eq!(weights_floor(5, None), 5);
    }
}
