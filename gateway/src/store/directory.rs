//! Checks shared by both stores for the federation's gateway and node directories (issue 13):
//! what a gateway may write about itself and its nodes. Every field comes from a peer gateway
//! that shares the database, so both stores refuse oversize or malformed values with
//! [`StoreError::Invalid`] before anything reaches SQL.

use super::{check_id, to_i64, GatewayRecord, NodeDirEntry, StoreError};

/// Longest gateway id: what `federation.gateway_id` allows.
pub const MAX_GATEWAY_ID_BYTES: usize = 64;
/// Longest region name, in characters.
pub const MAX_REGION_CHARS: usize = 128;
/// Longest QUIC address (`host:port`) or HTTP base URL, in bytes.
pub const MAX_ADDRESS_BYTES: usize = 1024;
/// Longest software version or verification state, in bytes.
pub const MAX_VERSION_BYTES: usize = 64;
/// Most nodes one gateway may publish at once.
pub const MAX_PUBLISHED_NODES: usize = 65_536;
/// Most names (models, games, GPU classes) in one node directory list.
pub const MAX_DIR_LIST: usize = 256;
/// Longest name in a node directory list, in bytes.
pub const MAX_DIR_NAME_BYTES: usize = 256;

fn invalid(field: &'static str, message: impl Into<String>) -> StoreError {
    StoreError::Invalid {
        field,
        message: message.into(),
    }
}

/// A gateway id: 1 to 64 of `[A-Za-z0-9._-]`, as `federation.gateway_id` is validated.
pub fn check_gateway_id(field: &'static str, id: &str) -> Result<(), StoreError> {
    let ok = (1..=MAX_GATEWAY_ID_BYTES).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "must be 1 to {MAX_GATEWAY_ID_BYTES} characters of A-Z, a-z, 0-9, '.', '_' and '-'"
            ),
        ))
    }
}

/// Printable text without control characters, at most `max` bytes (empty allowed).
fn check_short(field: &'static str, v: &str, max: usize) -> Result<(), StoreError> {
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

fn check_lat_lon(lat: f64, lon: f64) -> Result<(), StoreError> {
    if !(lat.is_finite() && (-90.0..=90.0).contains(&lat)) {
        return Err(invalid("lat", format!("{lat} is not between -90 and 90")));
    }
    if !(lon.is_finite() && (-180.0..=180.0).contains(&lon)) {
        return Err(invalid("lon", format!("{lon} is not between -180 and 180")));
    }
    Ok(())
}

/// Checks a gateway directory entry before it is written.
pub fn check_gateway_record(r: &GatewayRecord) -> Result<(), StoreError> {
    check_gateway_id("gateway_id", &r.id)?;
    if r.region.chars().count() > MAX_REGION_CHARS {
        return Err(invalid(
            "region",
            format!("at most {MAX_REGION_CHARS} characters allowed"),
        ));
    }
    check_short("region", &r.region, MAX_REGION_CHARS * 4)?;
    check_lat_lon(r.lat, r.lon)?;
    if r.quic_address.is_empty() || r.quic_address.chars().any(char::is_whitespace) {
        return Err(invalid(
            "quic_address",
            "must be a non-empty host:port without whitespace",
        ));
    }
    check_short("quic_address", &r.quic_address, MAX_ADDRESS_BYTES)?;
    if !(r.http_url.starts_with("http://") || r.http_url.starts_with("https://"))
        || r.http_url.chars().any(char::is_whitespace)
    {
        return Err(invalid(
            "http_url",
            "must start with http:// or https:// and contain no whitespace",
        ));
    }
    check_short("http_url", &r.http_url, MAX_ADDRESS_BYTES)?;
    if r.cert_sha256.len() != 64
        || !r
            .cert_sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(invalid(
            "cert_sha256",
            "must be 64 lowercase hexadecimal digits",
        ));
    }
    check_short("version", &r.version, MAX_VERSION_BYTES)?;
    to_i64("started_at_ms", r.started_at_ms)?;
    to_i64("heartbeat_at_ms", r.heartbeat_at_ms)?;
    to_i64("expires_at_ms", r.expires_at_ms)?;
    Ok(())
}

fn check_list(field: &'static str, list: &[String]) -> Result<(), StoreError> {
    if list.len() > MAX_DIR_LIST {
        return Err(invalid(
            field,
            format!("{} entries, at most {MAX_DIR_LIST} allowed", list.len()),
        ));
    }
    for (i, name) in list.iter().enumerate() {
        if name.is_empty() || name.len() > MAX_DIR_NAME_BYTES || name.chars().any(char::is_control)
        {
            return Err(invalid(
                field,
                format!(
                    "entry {i} must be 1 to {MAX_DIR_NAME_BYTES} bytes without control characters"
                ),
            ));
        }
    }
    Ok(())
}

/// Checks one node directory entry published by `gateway_id`.
pub fn check_node_entry(gateway_id: &str, n: &NodeDirEntry) -> Result<(), StoreError> {
    check_id("node_id", &n.node_id, false)?;
    check_id("operator_id", &n.operator_id, true)?;
    if n.gateway_id != gateway_id {
        return Err(invalid(
            "gateway_id",
            format!(
                "node {} names gateway {:?}, not the publishing gateway {gateway_id:?}",
                n.node_id, n.gateway_id
            ),
        ));
    }
    if let Some(c) = &n.country {
        if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(invalid("country", "must be an ISO 3166-1 alpha-2 code"));
        }
    }
    match (n.lat, n.lon) {
        (Some(lat), Some(lon)) => check_lat_lon(lat, lon)?,
        (None, None) => {}
        _ => return Err(invalid("lat", "lat and lon must be given together")),
    }
    check_list("gpu_classes", &n.gpu_classes)?;
    check_list("models", &n.models)?;
    check_list("games", &n.games)?;
    if n.inference_free > n.inference_slots {
        return Err(invalid(
            "inference_free",
            format!(
                "{} free of {} slots: more free slots than slots",
                n.inference_free, n.inference_slots
            ),
        ));
    }
    if n.game_free > n.game_slots {
        return Err(invalid(
            "game_free",
            format!(
                "{} free of {} slots: more free slots than slots",
                n.game_free, n.game_slots
            ),
        ));
    }
    check_short("verification", &n.verification, MAX_VERSION_BYTES)?;
    to_i64("updated_at_ms", n.updated_at_ms)?;
    Ok(())
}

/// Checks a whole publication: the gateway id, the size, each entry, and that no node id
/// appears twice (one gateway holds a node once).
pub fn check_publication(gateway_id: &str, nodes: &[NodeDirEntry]) -> Result<(), StoreError> {
    check_gateway_id("gateway_id", gateway_id)?;
    if nodes.len() > MAX_PUBLISHED_NODES {
        return Err(invalid(
            "nodes",
            format!(
                "{} nodes, at most {MAX_PUBLISHED_NODES} allowed",
                nodes.len()
            ),
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(nodes.len());
    for n in nodes {
        check_node_entry(gateway_id, n)?;
        if !seen.insert(n.node_id.as_str()) {
            return Err(invalid(
                "node_id",
                format!("{} is published twice", n.node_id),
            ));
        }
    }
    Ok(())
}

/// Encodes a name list for a TEXT column (a JSON array: portable across SQLite, PostgreSQL
/// and CockroachDB, and read back only by the gateway).
pub(crate) fn list_to_json(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

/// Decodes a name list written by [`list_to_json`]; a damaged value reads as empty rather
/// than failing the whole listing.
pub(crate) fn list_from_json(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_default()
}
