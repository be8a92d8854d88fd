//! A node's `Inventory` checked against its registration (sans-IO): what the gateway keeps of it
//! on the node's registry entry, and what it dropped and why.
//!
//! Entries that decode but do not match the registration are dropped with a reason, never fatal
//! (PROTOCOL.md, "Inventory"): a GPU index not below `Register.gpus`' length, a second identity
//! for one index, a model the node does not serve, a second size for one model. Duplicate UUIDs
//! within one message are kept and flagged: whether they are a lie or a reporting bug is the
//! checker's question, not the receipt's.

use crate::registry::NodeInventory;
// Names from the node are cut with the control front end's `truncate` (logged, not echoed whole).
use super::truncate;
use nearpath_protocol::message::{Inventory, Workloads};
use std::collections::{BTreeSet, HashSet};

/// Most drop reasons kept per inventory (a hostile node could send thousands of bad entries; the
/// count of drops is kept whole).
pub const MAX_DROP_REASONS: usize = 16;

/// Checks `inv` against a registration of `gpu_count` GPUs serving `workloads`, received at
/// `now_ms`.
pub fn sanitise(
    inv: Inventory,
    gpu_count: usize,
    workloads: &Workloads,
    now_ms: u64,
) -> NodeInventory {
    let mut dropped = Vec::new();
    let mut drop_count = 0u32;
    let mut drop = |reason: String| {
        drop_count += 1;
        if dropped.len() < MAX_DROP_REASONS {
            dropped.push(reason);
        }
    };
    let mut seen_index = HashSet::new();
    let mut gpus = Vec::with_capacity(inv.gpus.len());
    for g in inv.gpus {
        if g.index as usize >= gpu_count {
            drop(format!(
                "gpu index {} is not below the {gpu_count} registered GPUs",
                g.index
            ));
        } else if !seen_index.insert(g.index) {
            drop(format!("gpu index {} is listed twice", g.index));
        } else {
            gpus.push(g);
        }
    }
    let mut seen_uuid = HashSet::new();
    let duplicate_uuids: BTreeSet<String> = gpus
        .iter()
        .filter(|g| !g.uuid.is_empty() && !seen_uuid.insert(g.uuid.as_str()))
        .map(|g| g.uuid.clone())
        .collect();
    let served: HashSet<&str> = workloads.models.iter().map(String::as_str).collect();
    let mut seen_model = HashSet::new();
    let mut models = Vec::with_capacity(inv.models.len());
    for m in inv.models {
        if !served.contains(m.name.as_str()) {
            drop(format!(
                "model {:?} is not among the registered models",
                truncate(&m.name, 64)
            ));
        } else if !seen_model.insert(m.name.clone()) {
            drop(format!("model {:?} is listed twice", truncate(&m.name, 64)));
        } else {
            models.push(m);
        }
    }
    NodeInventory {
        inventory: Inventory {
            gpus,
            models,
            encoder: inv.encoder,
        },
        received_at_ms: now_ms,
        duplicate_uuids: duplicate_uuids.into_iter().collect(),
        dropped,
        dropped_count: drop_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearpath_protocol::message::{GpuIdentity, ModelWeights, WeightsSource};

    fn gpu(index: u32, uuid: &str) -> GpuIdentity {
        GpuIdentity {
            index,
            uuid: uuid.into(),
            pci_device_id: 0x2330_10de,
            driver_version: "550.54.15".into(),
        }
    }

    fn model(name: &str, weights_bytes: u64) -> ModelWeights {
        ModelWeights {
            name: name.into(),
            weights_bytes,
            source: WeightsSource::Declared,
        }
    }

    fn workloads(models: &[&str]) -> Workloads {
        Workloads {
            models: models.iter().map(|m| m.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_gpu_index_beyond_the_registered_gpus_is_dropped_and_the_rest_kept() {
        let inv = Inventory {
            gpus: vec![gpu(0, "GPU-a"), gpu(2, "GPU-b"), gpu(u32::MAX, "GPU-c")],
            models: vec![],
            encoder: "openh264".into(),
        };
        let n = sanitise(inv, 2, &workloads(&[]), 7);
        assert_eq!(n.inventory.gpus, [gpu(0, "GPU-a")]);
        assert_eq!(n.dropped_count, 2);
        assert!(n.dropped[0].contains("gpu index 2"), "{:?}", n.dropped);
        assert_eq!(n.inventory.encoder, "openh264");
        assert_eq!(n.received_at_ms, 7);
    }

    #[test]
    fn a_second_identity_for_one_gpu_index_is_dropped() {
        let inv = Inventory {
            gpus: vec![gpu(0, "GPU-a"), gpu(0, "GPU-forged")],
            ..Default::default()
        };
        let n = sanitise(inv, 1, &workloads(&[]), 0);
        assert_eq!(n.inventory.gpus, [gpu(0, "GPU-a")]);
        assert!(n.dropped[0].contains("listed twice"));
    }

    #[test]
    fn duplicate_uuids_within_one_inventory_are_kept_and_flagged() {
        let inv = Inventory {
            gpus: vec![gpu(0, "GPU-a"), gpu(1, "GPU-a"), gpu(2, ""), gpu(3, "")],
            ..Default::default()
        };
        let n = sanitise(inv, 4, &workloads(&[]), 0);
        assert_eq!(n.inventory.gpus.len(), 4);
        // Unknown (empty) UUIDs are not duplicates of each other.
        assert_eq!(n.duplicate_uuids, ["GPU-a"]);
        assert_eq!(n.dropped_count, 0);
    }

    #[test]
    fn models_the_node_does_not_serve_are_dropped_not_fatal() {
        let inv = Inventory {
            models: vec![
                model("served", 1),
                model("forged", 2),
                model("served", 3),
                model(&"x".repeat(10_000), 4),
            ],
            ..Default::default()
        };
        let n = sanitise(inv, 0, &workloads(&["served", "other"]), 0);
        assert_eq!(n.inventory.models, [model("served", 1)]);
        assert_eq!(n.dropped_count, 3);
        // A hostile name is cut in the reason.
        assert!(n.dropped.iter().all(|r| r.len() < 200), "{:?}", n.dropped);
    }

    #[test]
    fn drop_reasons_are_bounded_but_counted_whole() {
        let inv = Inventory {
            gpus: (0..64).map(|i| gpu(100 + i, "")).collect(),
            models: (0..1000).map(|i| model(&format!("m{i}"), 1)).collect(),
            encoder: String::new(),
        };
        let n = sanitise(inv, 1, &workloads(&[]), 0);
        assert_eq!(n.dropped.len(), MAX_DROP_REASONS);
        assert_eq!(n.dropped_count, 1064);
        assert!(n.inventory.gpus.is_empty() && n.inventory.models.is_empty());
    }
}
