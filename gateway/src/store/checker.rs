//! The checker's durable records (issue 14, items 4 and 5): check records with each gateway's
//! latest vote, the GPUs each node reports (hardware identity) and each node's verification
//! snapshot. The types and the checks both stores apply live here; the SQL lives in
//! `sqlite/checker.rs` and `pg/checker.rs`.
//!
//! Everything a node can cause to be written is bounded: a node's check history is capped at
//! [`MAX_CHECKS_PER_NODE`] records on every insert (a node that triggers checks on purpose
//! cannot grow the table), its GPU set at [`MAX_GPUS`], and each text field has a size limit.
//! Values over a limit are refused with [`StoreError::Invalid`] naming the field (the caller is
//! to blame), before anything reaches SQL.
//!
//! GPU identities are what the node says (NVML's UUIDs, PCI device ids and driver version):
//! they are cross-checked between nodes, not a root of trust.

use serde::{Deserialize, Serialize};

use super::directory::check_gateway_id;
use super::{check_id, to_i64, StoreError};

/// Most check records kept per node: inserting one more deletes the oldest.
pub const MAX_CHECKS_PER_NODE: usize = 1000;
/// Most check records [`super::Store::checks_of`] returns at once.
pub const MAX_CHECKS_LIST: usize = 1000;
/// Longest `detail_json` of a check record or `reasons_json` of a verification snapshot.
pub const MAX_CHECK_DETAIL_BYTES: usize = 16 * 1024;
/// Longest check kind or state (`registration`, `impossible_claim`, ...), in bytes.
pub const MAX_CHECK_TOKEN_BYTES: usize = 64;
/// Most GPUs one node may report.
pub const MAX_GPUS: usize = 64;
/// Longest GPU UUID (NVML's are 40 bytes, MIG instances' about 50), in bytes.
pub const MAX_GPU_UUID_BYTES: usize = 96;
/// Longest driver version, in bytes.
pub const MAX_DRIVER_VERSION_BYTES: usize = 64;
/// Longest GPU model name, in bytes.
pub const MAX_GPU_MODEL_BYTES: usize = 256;
/// Most rows [`super::Store::gpu_uuid_holders`] returns: enough for every UUID of a full node
/// held by 64 nodes each, and a bound on what a fleet of nodes reporting one UUID can cost.
pub const MAX_GPU_HOLDERS: usize = 4096;

/// One check the gateway ran on a node, and what it concluded (table `check_records`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRecordRow {
    pub node_id: String,
    /// The gateway that ran the check (`federation.gateway_id`); empty for a standalone gateway.
    pub gateway_id: String,
    /// What was checked (`registration`, `idle_probe`, `session`, `capacity`, ...): 1 to 64
    /// bytes of `[A-Za-z0-9._:-]`.
    pub kind: String,
    /// The verification state the check concluded (`verified`, `mislocated`, ...): same shape
    /// as `kind`.
    pub state: String,
    /// Findings, as a JSON document of at most [`MAX_CHECK_DETAIL_BYTES`].
    pub detail_json: String,
    pub at_ms: u64,
}

/// A gateway's newest check of a node (table `check_votes`): what the majority rule counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckVote {
    /// Empty for a standalone gateway.
    pub gateway_id: String,
    pub kind: String,
    pub state: String,
    pub at_ms: u64,
}

/// One GPU as the node reported it (NVML, else its configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuIdentityRow {
    /// NVML's UUID (`GPU-8f6c…`): 1 to 96 printable ASCII characters without spaces. Stored and
    /// compared in ASCII lowercase, so that a node cannot dodge duplicate detection by changing
    /// the case of a UUID it copied.
    pub uuid: String,
    /// PCI device id (`0x233010de`: device id in the high 16 bits, vendor in the low).
    pub pci_device_id: u32,
    /// Empty when unknown.
    pub driver_version: String,
    /// The model name as reported (`NVIDIA H100 80GB HBM3`); empty when unknown.
    pub model: String,
}

/// What [`super::Store::record_node_gpus`] found compared with the node's previous record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSetChange {
    /// The set of UUIDs differs from the previous record's (false on a first record: there
    /// was nothing to change from).
    pub changed: bool,
    /// The previous record's UUIDs, sorted (empty on a first record).
    pub previous: Vec<String>,
    /// The node had no GPU record before this one.
    pub first_seen: bool,
}

/// A node holding a GPU UUID, as [`super::Store::gpu_uuid_holders`] returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuHolder {
    /// Lowercase.
    pub uuid: String,
    pub node_id: String,
    /// The gateway that recorded the node's GPU set (empty: a standalone gateway).
    pub gateway_id: String,
    /// When the node was last seen with this set (record or touch).
    pub seen_at_ms: u64,
}

/// A node's verification state as last saved (table `node_verification`), so that a restart
/// does not forget a quarantine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationSnapshot {
    pub node_id: String,
    /// Same shape as a check's state.
    pub state: String,
    /// The reasons, as a JSON document of at most [`MAX_CHECK_DETAIL_BYTES`].
    pub reasons_json: String,
    pub at_ms: u64,
}

fn invalid(field: &'static str, message: impl Into<String>) -> StoreError {
    StoreError::Invalid {
        field,
        message: message.into(),
    }
}

/// A node id: what [`check_id`] allows, without NUL (which PostgreSQL text cannot hold; SQLite
/// refuses it too so that both stores agree).
pub fn check_node_id(node_id: &str) -> Result<(), StoreError> {
    check_id("node_id", node_id, false)?;
    if node_id.contains('\0') {
        return Err(invalid("node_id", "must not contain NUL characters"));
    }
    Ok(())
}

/// A checking gateway's id: empty (a standalone gateway) or a federation gateway id.
pub fn check_checker_gateway_id(gateway_id: &str) -> Result<(), StoreError> {
    if gateway_id.is_empty() {
        return Ok(());
    }
    check_gateway_id("gateway_id", gateway_id)
}

/// A kind or state: 1 to [`MAX_CHECK_TOKEN_BYTES`] bytes of `[A-Za-z0-9._:-]`.
fn check_token(field: &'static str, v: &str) -> Result<(), StoreError> {
    let ok = (1..=MAX_CHECK_TOKEN_BYTES).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "must be 1 to {MAX_CHECK_TOKEN_BYTES} characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'"
            ),
        ))
    }
}

/// A JSON document of at most [`MAX_CHECK_DETAIL_BYTES`] (valid JSON never holds a raw NUL).
fn check_json(field: &'static str, v: &str) -> Result<(), StoreError> {
    if v.len() > MAX_CHECK_DETAIL_BYTES {
        return Err(invalid(
            field,
            format!(
                "{} bytes, at most {MAX_CHECK_DETAIL_BYTES} allowed",
                v.len()
            ),
        ));
    }
    serde_json::from_str::<serde::de::IgnoredAny>(v)
        .map_err(|e| invalid(field, format!("is not a JSON document: {e}")))?;
    Ok(())
}

/// Printable text without control characters, at most `max` bytes (empty allowed).
fn check_text(field: &'static str, v: &str, max: usize) -> Result<(), StoreError> {
    if v.len() > max {
        return Err(invalid(
            field,
            format!("{} bytes, at most {max} allowed", v.len()),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// Checks a check record before it is written; returns `at_ms` as stored.
pub fn check_record(r: &CheckRecordRow) -> Result<i64, StoreError> {
    check_node_id(&r.node_id)?;
    check_checker_gateway_id(&r.gateway_id)?;
    check_token("kind", &r.kind)?;
    check_token("state", &r.state)?;
    check_json("detail_json", &r.detail_json)?;
    to_i64("at_ms", r.at_ms)
}

/// The number of records [`super::Store::checks_of`] may return for `limit`.
pub fn checks_limit(limit: usize) -> i64 {
    limit.min(MAX_CHECKS_LIST) as i64
}

/// Checks a GPU UUID and returns its stored (lowercase) form.
pub fn canonical_uuid(uuid: &str) -> Result<String, StoreError> {
    if uuid.is_empty() || uuid.len() > MAX_GPU_UUID_BYTES {
        return Err(invalid(
            "gpus.uuid",
            format!("{} bytes, must be 1 to {MAX_GPU_UUID_BYTES}", uuid.len()),
        ));
    }
    if !uuid.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "gpus.uuid",
            "must be printable ASCII without spaces",
        ));
    }
    Ok(uuid.to_ascii_lowercase())
}

/// A node's GPU report checked and normalised: UUIDs lowercase, sorted, each once.
#[derive(Debug, Clone)]
pub struct GpuReport {
    pub gpus: Vec<GpuIdentityRow>,
    pub seen_at_ms: i64,
}

impl GpuReport {
    /// The UUIDs, sorted.
    pub fn uuids(&self) -> Vec<String> {
        self.gpus.iter().map(|g| g.uuid.clone()).collect()
    }
}

/// Checks [`super::Store::record_node_gpus`]' arguments: at most [`MAX_GPUS`] GPUs, each UUID
/// once (in any case), every field within its limit.
pub fn check_gpu_report(
    node_id: &str,
    gateway_id: &str,
    gpus: &[GpuIdentityRow],
    seen_at_ms: u64,
) -> Result<GpuReport, StoreError> {
    check_node_id(node_id)?;
    check_checker_gateway_id(gateway_id)?;
    if gpus.len() > MAX_GPUS {
        return Err(invalid(
            "gpus",
            format!("{} GPUs, at most {MAX_GPUS} allowed", gpus.len()),
        ));
    }
    let mut out = Vec::with_capacity(gpus.len());
    for g in gpus {
        let uuid = canonical_uuid(&g.uuid)?;
        check_text(
            "gpus.driver_version",
            &g.driver_version,
            MAX_DRIVER_VERSION_BYTES,
        )?;
        check_text("gpus.model", &g.model, MAX_GPU_MODEL_BYTES)?;
        out.push(GpuIdentityRow {
            uuid,
            pci_device_id: g.pci_device_id,
            driver_version: g.driver_version.clone(),
            model: g.model.clone(),
        });
    }
    out.sort_by(|a, b| a.uuid.cmp(&b.uuid));
    if let Some(w) = out.windows(2).find(|w| w[0].uuid == w[1].uuid) {
        // One GPU listed twice would count its VRAM twice.
        return Err(invalid(
            "gpus.uuid",
            format!("{} is listed twice", w[0].uuid),
        ));
    }
    Ok(GpuReport {
        gpus: out,
        seen_at_ms: to_i64("seen_at_ms", seen_at_ms)?,
    })
}

/// Checks [`super::Store::gpu_uuid_holders`]' UUIDs (at most [`MAX_GPUS`]) and returns them
/// lowercase, sorted, each once.
pub fn check_uuid_query(uuids: &[String]) -> Result<Vec<String>, StoreError> {
    if uuids.len() > MAX_GPUS {
        return Err(invalid(
            "uuids",
            format!("{} UUIDs, at most {MAX_GPUS} per query", uuids.len()),
        ));
    }
    let mut out = uuids
        .iter()
        .map(|u| canonical_uuid(u))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// Checks a verification snapshot before it is written; returns `at_ms` as stored.
pub fn check_verification(
    node_id: &str,
    state: &str,
    reasons_json: &str,
    at_ms: u64,
) -> Result<i64, StoreError> {
    check_node_id(node_id)?;
    check_token("state", state)?;
    check_json("reasons_json", reasons_json)?;
    to_i64("at_ms", at_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(uuid: &str) -> GpuIdentityRow {
        GpuIdentityRow {
            uuid: uuid.into(),
            pci_device_id: 0x2330_10de,
            driver_version: "550.54.15".into(),
            model: "NVIDIA H100 80GB HBM3".into(),
        }
    }

    #[test]
    fn a_uuid_listed_twice_in_any_case_is_refused() {
        let err = check_gpu_report("n1", "", &[gpu("GPU-AB"), gpu("gpu-ab")], 1).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Invalid {
                    field: "gpus.uuid",
                    ..
                }
            ),
            "{err:?}"
        );
        let ok = check_gpu_report("n1", "", &[gpu("GPU-B"), gpu("GPU-A")], 1).expect("valid");
        assert_eq!(ok.uuids(), ["gpu-a", "gpu-b"]);
    }

    #[test]
    fn detail_must_be_a_bounded_json_document() {
        assert!(check_json("d", "{}").is_ok());
        assert!(check_json("d", "").is_err());
        assert!(check_json("d", "{\"a\":").is_err());
        let big = format!("\"{}\"", "x".repeat(MAX_CHECK_DETAIL_BYTES));
        assert!(check_json("d", &big).is_err());
    }

    #[test]
    fn kinds_and_states_are_short_tokens() {
        assert!(check_token("kind", "idle_probe").is_ok());
        assert!(check_token("kind", "").is_err());
        assert!(check_token("kind", "a b").is_err());
        assert!(check_token("kind", &"k".repeat(MAX_CHECK_TOKEN_BYTES + 1)).is_err());
    }
}
