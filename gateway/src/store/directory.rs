//! Checks shared by both stores for the federation's gateway and node directories (issue 13):
//! what a gateway may write about itself and its nodes. Every field comes from a peer gateway
//! that shares the database, so both stores refuse oversize or malformed values with
//! [`StoreError::Invalid`] before anything reaches SQL.

use super::{check_id, to_i64, DirEncoder, GatewayRecord, NodeDirEntry, Store, StoreError};
use nearpath_geo::{Coords, Country, Location, Subdivision};
use nearpath_protocol::message::{MAX_CODEC_NAME_BYTES, MAX_ENCODERS, MAX_ENCODER_NAME_BYTES};
use std::sync::Arc;

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

/// A codec name as the wire carries it: 1 to [`MAX_CODEC_NAME_BYTES`] of `[a-z0-9_]`.
fn codec_name_ok(name: &str) -> bool {
    (1..=MAX_CODEC_NAME_BYTES).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// An implementation name: at most [`MAX_ENCODER_NAME_BYTES`] bytes without control
/// characters (empty allowed: the wire allows it, and it is only shown).
fn implementation_ok(name: &str) -> bool {
    name.len() <= MAX_ENCODER_NAME_BYTES && !name.chars().any(char::is_control)
}

/// Whether one encoder entry passes [`check_encoders`] on its own: the publisher drops any
/// that does not (a node's odd implementation name must not stop its gateway publishing).
pub fn encoder_ok(e: &DirEncoder) -> bool {
    codec_name_ok(&e.codec) && implementation_ok(&e.implementation)
}

/// Checks a node's encoders: what registration admits (at most [`MAX_ENCODERS`], names within
/// the wire's bounds), one entry per codec. The registry already keeps one per codec; this
/// is the store's own guard against a gateway that does not.
pub fn check_encoders(list: &[DirEncoder]) -> Result<(), StoreError> {
    if list.len() > MAX_ENCODERS {
        return Err(invalid(
            "encoders",
            format!("{} entries, at most {MAX_ENCODERS} allowed", list.len()),
        ));
    }
    for (i, e) in list.iter().enumerate() {
        if !codec_name_ok(&e.codec) {
            return Err(invalid(
                "encoders",
                format!(
                    "entry {i}: the codec must be 1 to {MAX_CODEC_NAME_BYTES} characters of a-z, 0-9 and '_'"
                ),
            ));
        }
        if !implementation_ok(&e.implementation) {
            return Err(invalid(
                "encoders",
                format!(
                    "entry {i}: the implementation must be at most {MAX_ENCODER_NAME_BYTES} bytes without control characters"
                ),
            ));
        }
        if list[..i].iter().any(|k| k.codec == e.codec) {
            return Err(invalid(
                "encoders",
                format!("entry {i}: codec {} is listed twice", e.codec),
            ));
        }
    }
    Ok(())
}

/// The longest subdivision a node directory row holds, in bytes (`CC-XXX`).
pub const MAX_SUBDIVISION_BYTES: usize = 6;

/// Checks a node's subdivision against its country: an ISO 3166-2 code in canonical form
/// (`UA-43`, upper case, as [`Subdivision::parse`] writes it) whose prefix is the row's
/// country. A subdivision without a country, or of another country, is refused: a gateway
/// that published one would have a rule on that subdivision judge a node elsewhere.
pub fn check_subdivision(
    country: Option<&str>,
    subdivision: Option<&str>,
) -> Result<(), StoreError> {
    let Some(s) = subdivision else {
        return Ok(());
    };
    if s.len() > MAX_SUBDIVISION_BYTES {
        return Err(invalid(
            "subdivision",
            format!("{} bytes, at most {MAX_SUBDIVISION_BYTES} allowed", s.len()),
        ));
    }
    let parsed = Subdivision::parse(s).ok_or_else(|| {
        invalid(
            "subdivision",
            "must be an ISO 3166-2 code with its country prefix, like UA-43",
        )
    })?;
    if parsed.as_str() != s {
        return Err(invalid(
            "subdivision",
            format!("must be written in upper case, as {}", parsed.as_str()),
        ));
    }
    match country {
        Some(c) if parsed.country().as_str() == c => Ok(()),
        Some(c) => Err(invalid(
            "subdivision",
            format!("{s} is not a subdivision of the node's country {c}"),
        )),
        None => Err(invalid(
            "subdivision",
            "a subdivision needs the node's country",
        )),
    }
}

/// A stored subdivision as a reader keeps it: what [`check_subdivision`] accepts for the row's
/// country, or absent (rows from before the column existed hold NULL; a value no gateway
/// writes, of another country or malformed, is dropped rather than failing the listing, so
/// the node is judged by its country and coordinates only).
pub(crate) fn subdivision_from_db(country: Option<&str>, stored: Option<String>) -> Option<String> {
    stored.filter(|s| check_subdivision(country, Some(s)).is_ok())
}

/// The subdivision a gateway publishes for a node GeoIP placed at `loc`: the location's own
/// when it belongs to the location's country (an override could pair them otherwise, and the
/// directory refuses such a pair, which would stop the whole publication).
pub fn publishable_subdivision(loc: &Location) -> Option<String> {
    let sub = loc.subdivision?;
    (Some(sub.country()) == loc.country).then(|| sub.as_str().to_string())
}

/// Where a node another gateway holds is, for geofence checks, from what that gateway
/// published: its country (continent and centroid from the country table), its subdivision
/// and its coordinates. The trunk and game redirects both judge remote nodes with this, so a
/// rule naming a subdivision applies to a remote node exactly as to a local one. Values that
/// fail the directory's checks are left out.
pub fn remote_location(n: &NodeDirEntry) -> Location {
    let mut loc = n
        .country
        .as_deref()
        .and_then(Country::parse)
        .map_or(Location::UNKNOWN, Location::from_country);
    if check_subdivision(n.country.as_deref(), n.subdivision.as_deref()).is_ok() {
        loc.subdivision = n.subdivision.as_deref().and_then(Subdivision::parse);
    }
    if let (Some(lat), Some(lon)) = (n.lat, n.lon) {
        if check_lat_lon(lat, lon).is_ok() {
            loc.coords = Some(Coords { lat, lon });
        }
    }
    loc
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
    check_subdivision(n.country.as_deref(), n.subdivision.as_deref())?;
    match (n.lat, n.lon) {
        (Some(lat), Some(lon)) => check_lat_lon(lat, lon)?,
        (None, None) => {}
        _ => return Err(invalid("lat", "lat and lon must be given together")),
    }
    check_list("gpu_classes", &n.gpu_classes)?;
    check_list("models", &n.models)?;
    check_list("games", &n.games)?;
    check_encoders(&n.encoders)?;
    if n.model_caps.len() > n.models.len() {
        return Err(invalid(
            "model_caps",
            format!(
                "{} capability sets for {} models",
                n.model_caps.len(),
                n.models.len()
            ),
        ));
    }
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

// ---------------------------------------------------------------------------------------------
// Reading the directories: one source and one reading, shared by every reader (the fleet view,
// the trunk, game redirects).

/// Where the federation's gateway and node directories are read from: the store (only the
/// gateway's directory task reads it, [`StoreDirectory`]), the directory task's cached copy
/// (`federation::directory::FleetView`, what the trunk and game redirects read), or a test's
/// stand-in. Blocking: call it off the async threads when it may be the store.
pub trait DirectorySource: Send + Sync + 'static {
    /// Every gateway of the directory, expired ones included.
    fn gateways(&self) -> Result<Vec<GatewayRecord>, StoreError>;
    /// Every published node, of any gateway.
    fn node_directory(&self) -> Result<Vec<NodeDirEntry>, StoreError>;
}

/// The store's directories, read afresh at every call.
pub struct StoreDirectory(pub Arc<dyn Store>);

impl DirectorySource for StoreDirectory {
    fn gateways(&self) -> Result<Vec<GatewayRecord>, StoreError> {
        self.0.list_gateways()
    }

    fn node_directory(&self) -> Result<Vec<NodeDirEntry>, StoreError> {
        self.0.list_node_directory()
    }
}

/// The one reading of a directory read that routing relies on: each node a gateway other than
/// `self_id` published, with that gateway's entry, when the gateway's lease holds at `now_ms`.
/// Rows are checked again as they are read, with the checks a publication passes: an entry
/// written straight into the database (oversize lists, more free slots than slots, a node
/// naming another gateway, a gateway entry with a malformed address or pin) is skipped, never
/// routed to. In the order of `nodes`.
pub fn live_remote_nodes<'a>(
    gateways: &'a [GatewayRecord],
    nodes: &'a [NodeDirEntry],
    self_id: &str,
    now_ms: u64,
) -> impl Iterator<Item = (&'a NodeDirEntry, &'a GatewayRecord)> + use<'a> {
    let self_id = self_id.to_owned();
    nodes.iter().filter_map(move |n| {
        if n.gateway_id == self_id {
            return None;
        }
        let g = gateways
            .iter()
            .find(|g| g.id == n.gateway_id && g.is_live(now_ms))?;
        if check_gateway_record(g).is_err() || check_node_entry(&g.id, n).is_err() {
            return None;
        }
        Some((n, g))
    })
}

/// The longest `model_caps` value a reader parses, in bytes: [`MAX_DIR_LIST`] numbers of at
/// most 10 digits and their commas.
pub const MAX_CAPS_JSON_BYTES: usize = 4_096;

/// Encodes a node's model capabilities for a TEXT column (a JSON array of bit sets).
pub(crate) fn caps_to_json(list: &[u32]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

/// Decodes what [`caps_to_json`] wrote, keeping only the capability bits this build knows;
/// rows from before the column existed hold `[]`, and a value no gateway writes (too long, not
/// a list of numbers, more entries than the node has models) reads as `[]` too: no model of
/// the node declares anything, which only keeps requests needing a capability off it.
pub(crate) fn caps_from_json(s: &str, models: usize) -> Vec<u32> {
    if s.len() > MAX_CAPS_JSON_BYTES {
        return Vec::new();
    }
    match serde_json::from_str::<Vec<u64>>(s) {
        Ok(list) if list.len() <= models => list
            .into_iter()
            .map(|b| nearpath_protocol::ModelCaps::from_bits(b).bits())
            .collect(),
        _ => Vec::new(),
    }
}

/// The longest `encoders` value a reader parses, in bytes: [`MAX_ENCODERS`] entries at their
/// longest take about 1.2 KiB. A longer value (written into the database by something other
/// than a gateway) is not parsed at all.
pub const MAX_ENCODERS_JSON_BYTES: usize = 4_096;

/// Encodes a node's encoders for a TEXT column (a JSON array of `{codec, implementation}`).
pub(crate) fn encoders_to_json(list: &[DirEncoder]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

/// Decodes what [`encoders_to_json`] wrote. Rows from before the column existed hold `[]` (its
/// default): H.264 only. A value no gateway writes (too long, not JSON, too many entries,
/// malformed names, a codec twice) also reads as `[]`, H.264 only, which every node encodes,
/// rather than failing the listing; entries naming codecs this build does not know are kept
/// (they match nothing here).
pub(crate) fn encoders_from_json(s: &str) -> Vec<DirEncoder> {
    if s.len() > MAX_ENCODERS_JSON_BYTES {
        return Vec::new();
    }
    match serde_json::from_str::<Vec<DirEncoder>>(s) {
        Ok(list) if check_encoders(&list).is_ok() => list,
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod reader_tests {
    use super::*;

    fn gw(id: &str, expires_at_ms: u64) -> GatewayRecord {
        GatewayRecord {
            id: id.into(),
            region: "r".into(),
            lat: 0.0,
            lon: 0.0,
            quic_address: "127.0.0.1:4433".into(),
            http_url: "http://127.0.0.1:8080".into(),
            cert_sha256: "a".repeat(64),
            version: "0.1.0".into(),
            started_at_ms: 0,
            heartbeat_at_ms: 0,
            expires_at_ms,
        }
    }

    fn node(id: &str, gateway: &str) -> NodeDirEntry {
        NodeDirEntry {
            node_id: id.into(),
            operator_id: "op".into(),
            gateway_id: gateway.into(),
            country: Some("DE".into()),
            lat: Some(50.0),
            lon: Some(8.0),
            gpu_classes: vec![],
            models: vec!["m".into()],
            games: vec![],
            inference_slots: 2,
            inference_free: 1,
            game_slots: 0,
            game_free: 0,
            accepting: true,
            verification: "unverified".into(),
            updated_at_ms: 0,
            encoders: vec![],
            model_caps: vec![],
            subdivision: None,
        }
    }

    fn read(gateways: &[GatewayRecord], nodes: &[NodeDirEntry], now_ms: u64) -> Vec<String> {
        live_remote_nodes(gateways, nodes, "me", now_ms)
            .map(|(n, g)| format!("{}@{}", n.node_id, g.id))
            .collect()
    }

    #[test]
    fn only_nodes_of_other_live_gateways_are_read() {
        let gateways = [gw("me", 10), gw("b", 10), gw("old", 5)];
        let nodes = [
            node("ours", "me"),
            node("b1", "b"),
            node("o1", "old"),
            node("x1", "unknown"),
            node("b2", "b"),
        ];
        assert_eq!(read(&gateways, &nodes, 4), ["b1@b", "o1@old", "b2@b"]);
        assert_eq!(
            read(&gateways, &nodes, 5),
            ["b1@b", "b2@b"],
            "old's lease ended at 5"
        );
        assert!(read(&gateways, &nodes, 10).is_empty());
    }

    #[test]
    fn rows_written_straight_into_the_database_are_checked_again_and_skipped() {
        let gateways = [gw("b", 10)];
        let mut more_free = node("more-free", "b");
        more_free.inference_free = 3;
        let mut huge = node("huge", "b");
        huge.models = vec!["m".into(); MAX_DIR_LIST + 1];
        let mut control = node("ctl", "b");
        control.games = vec!["arena\n".into()];
        let mut bad_id = node("long", "b");
        bad_id.node_id = "n".repeat(10_000);
        let mut encoders = node("enc", "b");
        encoders.encoders = vec![
            DirEncoder {
                codec: "h264".into(),
                implementation: "x".into(),
            };
            2
        ];
        let nodes = [
            node("fine", "b"),
            more_free,
            huge,
            control,
            bad_id,
            encoders,
        ];
        assert_eq!(read(&gateways, &nodes, 1), ["fine@b"]);
        // A gateway entry no gateway would write (a malformed pin) hides its nodes.
        let mut forged = gw("b", 10);
        forged.cert_sha256 = "not a pin".into();
        assert!(read(&[forged], &[node("fine", "b")], 1).is_empty());
    }
}

#[cfg(test)]
mod subdivision_tests {
    use super::*;

    #[test]
    fn a_subdivision_must_belong_to_the_rows_country() {
        assert!(check_subdivision(Some("UA"), Some("UA-43")).is_ok());
        assert!(check_subdivision(Some("UA"), None).is_ok());
        assert!(check_subdivision(None, None).is_ok());
        for (country, sub) in [
            (Some("PL"), "UA-43"),
            (None, "UA-43"),
            (Some("UA"), "ua-43"),
            (Some("UA"), "UA-"),
            (Some("UA"), "UA-1234"),
            (Some("UA"), "43"),
            (Some("UA"), "UA-4 "),
        ] {
            assert!(
                check_subdivision(country, Some(sub)).is_err(),
                "{country:?} {sub:?}"
            );
        }
        assert_eq!(
            subdivision_from_db(Some("UA"), Some("UA-43".into())).as_deref(),
            Some("UA-43")
        );
        assert_eq!(subdivision_from_db(Some("PL"), Some("UA-43".into())), None);
        assert_eq!(subdivision_from_db(Some("UA"), None), None);
    }

    #[test]
    fn a_remote_location_carries_only_a_subdivision_of_its_country() {
        let mut n = NodeDirEntry {
            country: Some("UA".into()),
            subdivision: Some("UA-43".into()),
            lat: Some(45.0),
            lon: Some(34.0),
            ..encoder_tests::test_entry()
        };
        let loc = remote_location(&n);
        assert_eq!(
            loc.subdivision.map(|s| s.to_string()).as_deref(),
            Some("UA-43")
        );
        assert_eq!(loc.country.map(|c| c.to_string()).as_deref(), Some("UA"));
        assert_eq!(loc.coords.map(|c| (c.lat, c.lon)), Some((45.0, 34.0)));
        // Published again with a subdivision of another country: ignored.
        n.country = Some("PL".into());
        assert_eq!(remote_location(&n).subdivision, None);
        // What a gateway publishes for a local node: its subdivision when it matches the
        // country, nothing when an override paired them otherwise.
        let s = Subdivision::parse("UA-43").unwrap();
        let mut local = Location {
            subdivision: Some(s),
            ..Location::from_country(s.country())
        };
        assert_eq!(publishable_subdivision(&local).as_deref(), Some("UA-43"));
        local.country = Country::parse("PL");
        assert_eq!(publishable_subdivision(&local), None);
    }
}

#[cfg(test)]
mod encoder_tests {
    use super::*;
    use nearpath_protocol::message::VideoCodec;

    fn enc(codec: &str, implementation: &str) -> DirEncoder {
        DirEncoder {
            codec: codec.into(),
            implementation: implementation.into(),
        }
    }

    #[test]
    fn encoders_round_trip_and_decide_what_a_node_encodes() {
        let list = vec![enc("hevc", "x265"), enc("h264", "x264")];
        let back = encoders_from_json(&encoders_to_json(&list));
        assert_eq!(back, list);
        let mut n = crate::store::NodeDirEntry {
            encoders: back,
            ..test_entry()
        };
        assert!(n.encodes(VideoCodec::Hevc));
        assert!(n.encodes(VideoCodec::H264));
        assert!(!n.encodes(VideoCodec::Av1));
        // A node that lists none encodes H.264 only (old rows, old nodes).
        n.encoders.clear();
        assert!(n.encodes(VideoCodec::H264));
        assert!(!n.encodes(VideoCodec::Hevc));
        // A node listing only a codec this build does not know encodes nothing known here.
        n.encoders = vec![enc("vp9", "libvpx")];
        assert!(!n.encodes(VideoCodec::H264));
        assert!(!n.encodes(VideoCodec::Av1));
    }

    #[test]
    fn the_encoder_check_refuses_oversize_bogus_and_repeated_entries() {
        let many = vec![enc("h264", "x264"); MAX_ENCODERS + 1];
        assert!(check_encoders(&many).is_err(), "too many");
        assert!(check_encoders(&[enc("h264", "x264"), enc("h264", "openh264")]).is_err());
        for bad in [
            "",
            "H264",
            "h 264",
            "h264\n",
            &"a".repeat(MAX_CODEC_NAME_BYTES + 1),
        ] {
            assert!(check_encoders(&[enc(bad, "x")]).is_err(), "codec {bad:?}");
        }
        for bad in ["x\u{0}", &"x".repeat(MAX_ENCODER_NAME_BYTES + 1)] {
            assert!(
                check_encoders(&[enc("h264", bad)]).is_err(),
                "implementation {bad:?}"
            );
        }
        let distinct: Vec<DirEncoder> = (0..MAX_ENCODERS)
            .map(|i| enc(&format!("c{i}"), "impl"))
            .collect();
        assert!(check_encoders(&distinct).is_ok(), "at the cap");
        // An entry that fails the check fails the whole publication.
        let mut n = test_entry();
        n.encoders = many;
        assert!(check_node_entry("gw-1", &n).is_err());
    }

    #[test]
    fn a_damaged_or_hostile_stored_value_reads_as_h264_only() {
        let longest: Vec<DirEncoder> = (0..MAX_ENCODERS)
            .map(|i| {
                enc(
                    &format!("{i:0>width$}", width = MAX_CODEC_NAME_BYTES),
                    &"x".repeat(MAX_ENCODER_NAME_BYTES),
                )
            })
            .collect();
        let json = encoders_to_json(&longest);
        assert!(json.len() < MAX_ENCODERS_JSON_BYTES, "{} bytes", json.len());
        assert_eq!(encoders_from_json(&json), longest);
        let thousands = encoders_to_json(&vec![enc("hevc", "hevc_nvenc"); 5_000]);
        for v in [
            "",
            "null",
            "{}",
            "[1,2]",
            "[{\"codec\":\"HEVC!\",\"implementation\":\"x\"}]",
            &thousands,
            &format!("[{}]", " ".repeat(MAX_ENCODERS_JSON_BYTES)),
        ] {
            assert!(encoders_from_json(v).is_empty(), "{:.80}", v);
        }
    }

    #[test]
    fn model_caps_round_trip_and_damaged_values_read_as_none() {
        let caps = vec![1 | 8, 0];
        assert_eq!(caps_from_json(&caps_to_json(&caps), 2), caps);
        // Unknown bits (a newer gateway's) are dropped; more sets than models, junk or an
        // oversize value reads as none.
        assert_eq!(caps_from_json("[4294967295]", 1), [127]);
        for v in [
            "[1,2,3]",
            "nope",
            "[-1]",
            "{}",
            &format!("[{}]", "1,".repeat(3_000)),
        ] {
            assert!(caps_from_json(v, 2).is_empty(), "{v:.40}");
        }
        let mut n = test_entry();
        n.model_caps = vec![1; n.models.len() + 1];
        assert!(
            check_node_entry("gw-1", &n).is_err(),
            "more sets than models"
        );
    }

    pub(super) fn test_entry() -> crate::store::NodeDirEntry {
        crate::store::NodeDirEntry {
            node_id: "n-1".into(),
            operator_id: "op".into(),
            gateway_id: "gw-1".into(),
            country: None,
            lat: None,
            lon: None,
            gpu_classes: vec![],
            models: vec![],
            games: vec!["arena".into()],
            inference_slots: 0,
            inference_free: 0,
            game_slots: 1,
            game_free: 1,
            accepting: true,
            verification: "unverified".into(),
            updated_at_ms: 0,
            encoders: vec![],
            model_caps: vec![],
            subdivision: None,
        }
    }
}
