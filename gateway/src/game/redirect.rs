//! Game sessions across the federation by redirect (`federation.game_route = "redirect"`).
//!
//! When no node of this gateway can take a game session, the node directory (published by
//! every gateway into the shared store) may name a node attached to a peer. This gateway then
//! evaluates the geofence once, with the client's address, against that node's published
//! location and GPU classes, and answers with a redirect carrying a ticket
//! ([`crate::ticket`]): the peer accepts the ticket instead of routing again and places the
//! session on exactly that node. Tickets are MACed with the federation's secret, which every
//! gateway reads from the store ([`crate::store::Store::federation_secret`]).
//!
//! The directory is read through [`FederationView`]: in a gateway, the directory task's cached
//! copy (`federation::directory::FleetView`), so that a game start costs no store read; in
//! tests, a stand-in.

use crate::components::Placement;
use crate::router::Deny;
use crate::store::directory::live_remote_nodes;
use crate::store::secret::FederationSecret;
use crate::store::{GatewayRecord, NodeDirEntry, SessionDirEntry, Store, StoreError};
use crate::ticket::{Expect, ReplayGuard, TicketClaims, TicketError, TICKET_TTL_MS};
use nearpath_config::CrossRoute;
use nearpath_config::WorkloadKind;
use nearpath_geo::{distance_km, Coords, Decision, Location};
use nearpath_protocol::message::{GameParams, VideoCodec};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

/// What the federation looks like from here: the gateway directory and the node directory.
/// Blocking (it may read the store): called from `spawn_blocking`.
pub use crate::store::directory::DirectorySource as FederationView;

/// The view over the shared store, read afresh (the directories other gateways publish into).
pub use crate::store::directory::StoreDirectory as StoreView;

/// Where a redirected client goes.
#[derive(Debug, Clone)]
pub struct RedirectTo {
    /// The peer gateway.
    pub gateway: GatewayRecord,
    /// The node the ticket names.
    pub node_id: String,
    /// The sealed ticket.
    pub ticket: String,
}

/// Why a ticket was not honoured.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error(transparent)]
    Ticket(#[from] TicketError),
    #[error("the federation secret cannot be read: {0}")]
    Store(String),
}

/// This gateway as a member of a federation, for game sessions.
pub struct GameFederation {
    gateway_id: String,
    route: CrossRoute,
    store: Arc<dyn Store>,
    view: RwLock<Arc<dyn FederationView>>,
    secret: FederationSecret,
    replay: Mutex<ReplayGuard>,
}

impl GameFederation {
    /// A member of the federation reading the directories from `view` (the gateway's cached
    /// fleet view).
    pub fn new(
        gateway_id: String,
        route: CrossRoute,
        store: Arc<dyn Store>,
        view: Arc<dyn FederationView>,
    ) -> GameFederation {
        GameFederation {
            gateway_id,
            route,
            view: RwLock::new(view),
            secret: FederationSecret::new(store.clone()),
            store,
            replay: Mutex::new(ReplayGuard::default()),
        }
    }

    /// Replaces where the directories are read from (tests).
    pub fn set_view(&self, view: Arc<dyn FederationView>) {
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = view;
    }

    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    /// Whether game sessions for other gateways' nodes are redirected (else they are not
    /// placed there at all: the game trunk is not built).
    pub fn redirects_games(&self) -> bool {
        self.route == CrossRoute::Redirect
    }

    /// Writes (or rewrites) a session's entry in the sessions directory, which lets the player
    /// resume it through another gateway if this one dies. A failed write is logged: the
    /// session runs on, only without that escape.
    pub async fn publish_session(&self, entry: SessionDirEntry) {
        let store = self.store.clone();
        let id = entry.session_id;
        match tokio::task::spawn_blocking(move || store.put_session_dir(&entry)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(session = id, error = %e, "session directory entry not written")
            }
            Err(e) => tracing::warn!(session = id, error = %e, "session directory writer failed"),
        }
    }

    /// A session's directory entry.
    pub async fn lookup_session(&self, id: u64) -> Result<Option<SessionDirEntry>, String> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.get_session_dir(id))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Removes a session's entry if this gateway still holds it (in the background).
    pub fn forget_session(&self, id: u64) {
        let (store, me) = (self.store.clone(), self.gateway_id.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.remove_session_dir(id, &me) {
                tracing::warn!(session = id, error = %e, "session directory entry not removed");
            }
        });
    }

    /// The federation's secret (see [`FederationSecret`]).
    async fn secret(&self) -> Result<Arc<[u8]>, String> {
        self.secret.get().await
    }

    /// Finds a peer's node for the session and mints its ticket; `None` when no peer has an
    /// eligible node (or the directory cannot be read: the session then fails as it would
    /// have without a federation).
    #[allow(clippy::too_many_arguments)]
    pub async fn find(
        &self,
        placement: &Placement,
        client: &Location,
        client_ip: IpAddr,
        key_id: &str,
        params: &GameParams,
        now_ms: u64,
    ) -> Option<RedirectTo> {
        if !self.redirects_games() {
            return None;
        }
        let view = self.view.read().unwrap_or_else(|p| p.into_inner()).clone();
        let read = tokio::task::spawn_blocking(move || {
            Ok::<_, StoreError>((view.gateways()?, view.node_directory()?))
        })
        .await;
        let (gateways, nodes) = match read {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the federation's directories");
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "federation directory read failed");
                return None;
            }
        };
        let (node, gateway) = pick_remote(
            &self.gateway_id,
            &params.title,
            params.codec,
            client.coords,
            &gateways,
            &nodes,
            now_ms,
            |n| remote_serve_check(placement, client, n),
        )?;
        let secret = match self.secret().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "no federation secret: cannot redirect");
                return None;
            }
        };
        let claims = TicketClaims {
            issuer: self.gateway_id.clone(),
            target: gateway.id.clone(),
            key_id: key_id.to_string(),
            node_id: node.node_id.clone(),
            client_ip,
            game: params.title.clone(),
            width: params.width,
            height: params.height,
            fps: params.fps,
            bitrate_kbps: params.bitrate_kbps,
            codec: params.codec,
            expires_at_ms: now_ms + TICKET_TTL_MS,
            nonce: rand::random(),
        };
        Some(RedirectTo {
            ticket: claims.seal(&secret),
            node_id: node.node_id.clone(),
            gateway: gateway.clone(),
        })
    }

    /// The first codec of `accepted` (most preferred first) in which a live peer's node could
    /// take `title` for `client` (the same checks as [`GameFederation::find`]), read from the
    /// cached directory without waiting; `None` when no peer's node could, or when this
    /// gateway does not redirect games.
    pub fn remote_codec(
        &self,
        placement: &Placement,
        client: &Location,
        title: &str,
        accepted: &[VideoCodec],
        now_ms: u64,
    ) -> Option<VideoCodec> {
        if !self.redirects_games() {
            return None;
        }
        let view = self.view.read().unwrap_or_else(|p| p.into_inner()).clone();
        let (gateways, nodes) = match (view.gateways(), view.node_directory()) {
            (Ok(g), Ok(n)) => (g, n),
            _ => return None,
        };
        first_remote_codec(
            &self.gateway_id,
            title,
            accepted,
            client.coords,
            &gateways,
            &nodes,
            now_ms,
            |n| remote_serve_check(placement, client, n),
        )
    }

    /// Checks and consumes a ticket presented here; on success the session must be placed on
    /// the node it names, with its parameters.
    pub async fn accept(
        &self,
        ticket: &str,
        client_ip: IpAddr,
        key_id: &str,
        now_ms: u64,
    ) -> Result<TicketClaims, AcceptError> {
        let secret = self.secret().await.map_err(AcceptError::Store)?;
        let claims = TicketClaims::open(ticket, &secret)?;
        Expect {
            gateway_id: &self.gateway_id,
            client_ip,
            key_id,
            now_ms,
        }
        .check(&claims)?;
        self.replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .consume(now_ms, &claims)?;
        Ok(claims)
    }
}

/// The game parameters a ticket carries.
pub fn ticket_params(c: &TicketClaims) -> GameParams {
    GameParams {
        title: c.game.clone(),
        width: c.width,
        height: c.height,
        fps: c.fps,
        bitrate_kbps: c.bitrate_kbps,
        // The codec the issuer found the node encodes (published in the node directory).
        codec: c.codec,
        // A ticketed start begins a trace of its own at this gateway.
        traceparent: None,
    }
}

/// The geofence verdict for serving `client` from a node another gateway holds, from what that
/// gateway published: its country, subdivision and coordinates (GeoIP of the node's address
/// there) and its GPU classes (every one must be allowed; a node without GPUs is `cpu`).
pub fn remote_serve_check(
    placement: &Placement,
    client: &Location,
    node: &NodeDirEntry,
) -> Result<(), Deny> {
    let loc = crate::store::directory::remote_location(node);
    let cpu = ["cpu".to_string()];
    let classes: &[String] = if node.gpu_classes.is_empty() {
        &cpu
    } else {
        &node.gpu_classes
    };
    for class in classes {
        let id = placement.policy.class_id(class);
        if let Decision::Deny { rule, reason, .. } =
            placement
                .policy
                .check_serve(client, &loc, id, WorkloadKind::Game)
        {
            return Err(Deny {
                rule: rule.to_string(),
                reason: reason.to_string(),
            });
        }
    }
    Ok(())
}

/// The first codec of `accepted` for which [`pick_remote`] finds a node.
#[allow(clippy::too_many_arguments)]
pub fn first_remote_codec(
    self_id: &str,
    title: &str,
    accepted: &[VideoCodec],
    client: Option<Coords>,
    gateways: &[GatewayRecord],
    nodes: &[NodeDirEntry],
    now_ms: u64,
    mut allow: impl FnMut(&NodeDirEntry) -> Result<(), Deny>,
) -> Option<VideoCodec> {
    accepted.iter().copied().find(|&codec| {
        pick_remote(
            self_id, title, codec, client, gateways, nodes, now_ms, &mut allow,
        )
        .is_some()
    })
}

/// The best node of another live gateway for `title` in `codec`: published by a gateway other
/// than `self_id` whose lease holds at `now_ms`, accepting, with a free game slot, serving the
/// title, encoding the codec (a node that published no encoders encodes H.264 only) and
/// allowed by `allow` (the geofence); nearest to the client first (nodes without coordinates
/// last), then by id, so the choice is deterministic.
#[allow(clippy::too_many_arguments)]
pub fn pick_remote<'a>(
    self_id: &str,
    title: &str,
    codec: VideoCodec,
    client: Option<Coords>,
    gateways: &'a [GatewayRecord],
    nodes: &'a [NodeDirEntry],
    now_ms: u64,
    mut allow: impl FnMut(&NodeDirEntry) -> Result<(), Deny>,
) -> Option<(&'a NodeDirEntry, &'a GatewayRecord)> {
    let mut best: Option<(f64, &NodeDirEntry, &GatewayRecord)> = None;
    // The shared reading of the directory: live peers' nodes, rows checked again.
    for (n, gw) in live_remote_nodes(gateways, nodes, self_id, now_ms) {
        if !n.accepting
            || n.game_free == 0
            || !n.games.iter().any(|g| g == title)
            || !n.encodes(codec)
        {
            continue;
        }
        if allow(n).is_err() {
            continue;
        }
        let d = match (client, n.lat, n.lon) {
            (Some(c), Some(lat), Some(lon)) => distance_km(c, Coords { lat, lon }),
            _ => f64::INFINITY,
        };
        let better = match &best {
            None => true,
            Some((bd, bn, _)) => d < *bd || (d == *bd && n.node_id < bn.node_id),
        };
        if better {
            best = Some((d, n, gw));
        }
    }
    best.map(|(_, n, g)| (n, g))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn gw(id: &str, expires_at_ms: u64) -> GatewayRecord {
        GatewayRecord {
            id: id.into(),
            region: "r".into(),
            lat: 0.0,
            lon: 0.0,
            quic_address: "127.0.0.1:1".into(),
            http_url: "http://127.0.0.1:2".into(),
            cert_sha256: "00".repeat(32),
            version: "0.1.0".into(),
            started_at_ms: 0,
            heartbeat_at_ms: 0,
            expires_at_ms,
        }
    }

    fn node(id: &str, gateway: &str, lat: f64) -> NodeDirEntry {
        NodeDirEntry {
            node_id: id.into(),
            operator_id: "op".into(),
            gateway_id: gateway.into(),
            country: Some("DE".into()),
            lat: Some(lat),
            lon: Some(10.0),
            gpu_classes: vec!["consumer".into()],
            models: vec![],
            games: vec!["arena".into()],
            inference_slots: 0,
            inference_free: 0,
            game_slots: 2,
            game_free: 1,
            accepting: true,
            verification: "unverified".into(),
            updated_at_ms: NOW,
            encoders: Vec::new(),
            model_caps: Vec::new(),
            subdivision: None,
        }
    }

    fn allow_all(_: &NodeDirEntry) -> Result<(), Deny> {
        Ok(())
    }

    fn pick<'a>(gws: &'a [GatewayRecord], nodes: &'a [NodeDirEntry]) -> Option<&'a str> {
        let client = Some(Coords {
            lat: 50.0,
            lon: 10.0,
        });
        pick_remote(
            "a",
            "arena",
            VideoCodec::H264,
            client,
            gws,
            nodes,
            NOW,
            allow_all,
        )
        .map(|(n, _)| n.node_id.as_str())
    }

    #[test]
    fn the_nearest_eligible_node_of_a_live_peer_is_picked() {
        let gws = [gw("a", NOW + 1), gw("b", NOW + 1), gw("c", NOW + 1)];
        let nodes = [
            node("far", "b", 10.0),
            node("near", "c", 49.0),
            node("mine", "a", 50.0),
        ];
        assert_eq!(pick(&gws, &nodes), Some("near"));
    }

    #[test]
    fn a_node_of_a_gateway_whose_lease_expired_is_not_picked() {
        let gws = [gw("b", NOW)];
        assert_eq!(pick(&gws, &[node("n", "b", 50.0)]), None);
        // Nor one of a gateway that is not in the directory at all.
        assert_eq!(pick(&[gw("c", NOW + 1)], &[node("n", "b", 50.0)]), None);
    }

    #[test]
    fn full_draining_or_other_game_nodes_are_not_picked() {
        let gws = [gw("b", NOW + 1)];
        let mut full = node("full", "b", 50.0);
        full.game_free = 0;
        let mut draining = node("draining", "b", 50.0);
        draining.accepting = false;
        let mut other = node("other", "b", 50.0);
        other.games = vec!["chess".into()];
        assert_eq!(pick(&gws, &[full, draining, other]), None);
    }

    #[test]
    fn a_node_the_geofence_denies_is_not_picked() {
        let gws = [gw("b", NOW + 1)];
        let nodes = [node("denied", "b", 50.0), node("allowed", "b", 10.0)];
        let got = pick_remote(
            "a",
            "arena",
            VideoCodec::H264,
            None,
            &gws,
            &nodes,
            NOW,
            |n| {
                if n.node_id == "denied" {
                    Err(Deny {
                        rule: "r".into(),
                        reason: "no".into(),
                    })
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!(got.map(|(n, _)| n.node_id.as_str()), Some("allowed"));
    }

    fn encoding(mut n: NodeDirEntry, codecs: &[&str]) -> NodeDirEntry {
        n.encoders = codecs
            .iter()
            .map(|c| crate::store::DirEncoder {
                codec: c.to_string(),
                implementation: format!("{c}_enc"),
            })
            .collect();
        n
    }

    #[test]
    fn the_first_accepted_codec_a_peers_node_encodes_is_chosen() {
        let gws = [gw("b", NOW + 1)];
        let nodes = [
            encoding(node("av1", "b", 50.0), &["av1"]),
            encoding(node("hevc-denied", "b", 50.0), &["hevc"]),
        ];
        let first = |accepted: &[VideoCodec]| {
            first_remote_codec("a", "arena", accepted, None, &gws, &nodes, NOW, |n| {
                if n.node_id == "hevc-denied" {
                    Err(Deny {
                        rule: "r".into(),
                        reason: "no".into(),
                    })
                } else {
                    Ok(())
                }
            })
        };
        // HEVC is preferred, but the only node encoding it is denied: AV1.
        assert_eq!(
            first(&[VideoCodec::Hevc, VideoCodec::Av1]),
            Some(VideoCodec::Av1)
        );
        assert_eq!(
            first(&[VideoCodec::Av1, VideoCodec::Hevc]),
            Some(VideoCodec::Av1)
        );
        assert_eq!(first(&[VideoCodec::Hevc, VideoCodec::H264]), None);
        assert_eq!(first(&[]), None);
    }

    #[test]
    fn only_a_node_that_publishes_the_codec_is_picked_for_it() {
        let gws = [gw("b", NOW + 1), gw("c", NOW + 1)];
        // The nearest node encodes H.264 only (it published no encoders: an old row or an
        // old node); the farther one encodes HEVC and H.264, the farthest AV1 only.
        let nodes = [
            node("h264-only", "b", 50.0),
            encoding(node("hevc", "c", 40.0), &["hevc", "h264"]),
            encoding(node("av1", "c", 0.0), &["av1"]),
        ];
        let client = Some(Coords {
            lat: 50.0,
            lon: 10.0,
        });
        let pick_in = |codec| {
            pick_remote("a", "arena", codec, client, &gws, &nodes, NOW, allow_all)
                .map(|(n, _)| n.node_id.as_str())
        };
        assert_eq!(pick_in(VideoCodec::H264), Some("h264-only"));
        assert_eq!(pick_in(VideoCodec::Hevc), Some("hevc"));
        assert_eq!(pick_in(VideoCodec::Av1), Some("av1"));
        // A node listing only a codec this build does not know is never picked, not even for
        // H.264.
        let unknown = [encoding(node("vp9", "b", 50.0), &["vp9"])];
        for codec in VideoCodec::ALL {
            assert_eq!(
                pick_remote("a", "arena", codec, client, &gws, &unknown, NOW, allow_all)
                    .map(|(n, _)| n.node_id.clone()),
                None
            );
        }
    }
}

#[cfg(test)]
mod subdivision_tests {
    use super::*;
    use crate::metrics::Metrics;
    use nearpath_config::{GeofenceConfig, GeofenceRule, UnknownPolicy};
    use nearpath_geo::{GeoDb, Subdivision};
    use std::sync::Arc;

    fn placement(rule: GeofenceRule) -> Placement {
        let config = GeofenceConfig {
            rules: vec![rule],
            ..GeofenceConfig::default()
        };
        Placement::new(
            Arc::new(GeoDb::embedded().unwrap()),
            nearpath_geo::Policy::compile(&config).unwrap(),
            Arc::new(Metrics::new()),
        )
    }

    fn rule(name: &str) -> GeofenceRule {
        GeofenceRule {
            name: name.into(),
            enabled: true,
            reason: None,
            gpu_classes: vec![],
            workloads: vec![],
            deny_client_countries: vec![],
            deny_node_countries: vec![],
            residency_client_countries: vec![],
            residency_node_countries: vec![],
            unknown_location: UnknownPolicy::Allow,
        }
    }

    fn remote(country: &str, subdivision: Option<&str>) -> NodeDirEntry {
        NodeDirEntry {
            node_id: "n".into(),
            operator_id: "op".into(),
            gateway_id: "b".into(),
            country: Some(country.into()),
            lat: None,
            lon: None,
            gpu_classes: vec!["consumer".into()],
            models: vec![],
            games: vec!["arena".into()],
            inference_slots: 0,
            inference_free: 0,
            game_slots: 1,
            game_free: 1,
            accepting: true,
            verification: "unverified".into(),
            updated_at_ms: 0,
            encoders: Vec::new(),
            model_caps: Vec::new(),
            subdivision: subdivision.map(str::to_string),
        }
    }

    fn client_in(subdivision: &str) -> Location {
        let s = Subdivision::parse(subdivision).unwrap();
        Location {
            subdivision: Some(s),
            ..Location::from_country(s.country())
        }
    }

    /// Regression (issue 13): a remote node was judged by its country only, so a rule naming a
    /// subdivision never saw it.
    #[test]
    fn a_deny_rule_on_a_subdivision_refuses_a_remote_node_there_and_only_there() {
        let p = placement(GeofenceRule {
            deny_node_countries: vec!["UA-43".into()],
            ..rule("no-crimea")
        });
        let client = client_in("UA-30");
        let denied = remote_serve_check(&p, &client, &remote("UA", Some("UA-43"))).unwrap_err();
        assert_eq!(denied.rule, "no-crimea");
        assert!(remote_serve_check(&p, &client, &remote("UA", Some("UA-30"))).is_ok());
        assert!(remote_serve_check(&p, &client, &remote("UA", None)).is_ok());
        // A subdivision of another country than the row's is not believed (the store refuses
        // it on write and drops it on read); the node is judged by its country.
        assert!(remote_serve_check(&p, &client, &remote("PL", Some("UA-43"))).is_ok());
    }

    #[test]
    fn a_residency_rule_on_a_subdivision_keeps_its_clients_on_remote_nodes_there() {
        let p = placement(GeofenceRule {
            residency_client_countries: vec!["DE".into()],
            residency_node_countries: vec!["DE-BY".into()],
            ..rule("bavaria")
        });
        let client = client_in("DE-BE");
        assert!(remote_serve_check(&p, &client, &remote("DE", Some("DE-BY"))).is_ok());
        let refused = remote_serve_check(&p, &client, &remote("DE", Some("DE-BE"))).unwrap_err();
        assert_eq!(refused.rule, "bavaria");
        assert!(remote_serve_check(&p, &client, &remote("DE", None)).is_err());
        // Clients outside the rule are served anywhere.
        assert!(remote_serve_check(&p, &client_in("FR-IDF"), &remote("DE", None)).is_ok());
    }
}
