//! The node control plane: admission (node id, token, KYC, GPU classes derived from model names,
//! onboarding geofence, node id ownership, duplicates), then the control loop (heartbeats,
//! liveness, drain, kick, connection migration), then the accounting when a node leaves (uptime,
//! heartbeat misses, and a penalty whenever sessions end because the node left).

use crate::gpu_class::{self, Classified};
use crate::liveness::{Liveness, LivenessTracker};
use crate::metrics::labels;
use crate::registry::{
    ControlCmd, InsertError, NodeDynamic, NodeEntry, NodePath, NodeState, Revocation,
};
use crate::server::Shared;
use crate::store::{KycStatus, SlaDelta};
use nearpath_protocol::message::{
    Drain, HeartbeatAck, Message, Register, Registered, RejectCode, Rejected, Shutdown,
};
use nearpath_protocol::stream::{send as send_msg, FramedRecv};
use nearpath_protocol::{app_code, MAX_CONTROL_FRAME, PROTOCOL_VERSION};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, info_span, warn, Instrument};

/// A node must send `Register` this soon after connecting.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long telling a revoked node why may take before its connection is closed regardless: a
/// node that stops reading its control stream must not keep its admission.
const REVOKE_GRACE: Duration = Duration::from_millis(300);
/// Penalties within this window count against a node's routing score.
const PENALTY_WINDOW_MS: u64 = 24 * 3600 * 1000;
/// Longest node id, in bytes.
pub const MAX_NODE_ID_BYTES: usize = 64;
/// QUIC close code for a node whose connection moved to an address the geofence refuses.
pub use nearpath_protocol::app_code::CLOSE_PATH_REFUSED;

/// Checks a node id: 1..=64 bytes of `A-Z a-z 0-9 . _ -`. Ids appear in logs, admin URLs and
/// the store, and one id must not pass for another (no spaces, no look-alike Unicode).
pub fn check_node_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_NODE_ID_BYTES {
        return Err(format!(
            "node id must be 1 to {MAX_NODE_ID_BYTES} bytes (got {})",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "node id {:?} contains {c:?}; only A-Z a-z 0-9 . _ - are allowed",
            id.escape_debug().to_string()
        ));
    }
    Ok(())
}

/// Why a node's control loop ended; decides whether leaving is the node's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaveCause {
    ConnectionLost,
    HeartbeatTimeout,
    Kicked,
    /// Its enrolment token was revoked or its operator suspended.
    Revoked,
    GatewayShutdown,
    ProtocolError,
    /// The connection migrated to an address the onboarding geofence refuses.
    PathRefused,
}

impl LeaveCause {
    fn as_str(self) -> &'static str {
        match self {
            LeaveCause::ConnectionLost => "connection_lost",
            LeaveCause::HeartbeatTimeout => "heartbeat_timeout",
            LeaveCause::Kicked => "kicked",
            LeaveCause::Revoked => "revoked",
            LeaveCause::GatewayShutdown => "gateway_shutdown",
            LeaveCause::ProtocolError => "protocol_error",
            LeaveCause::PathRefused => "path_refused",
        }
    }
    /// Leaving with sessions is penalised only when the node caused it. What the node said
    /// before (`Drain`, `Drained`) does not matter: draining only stops new routing.
    fn node_at_fault(self) -> bool {
        matches!(
            self,
            LeaveCause::ConnectionLost
                | LeaveCause::HeartbeatTimeout
                | LeaveCause::ProtocolError
                | LeaveCause::PathRefused
        )
    }
}

/// Serves one node connection from handshake to goodbye.
pub async fn handle_node(shared: Arc<Shared>, conn: quinn::Connection) {
    let peer = conn.remote_address();
    let span = info_span!("node", %peer, node_id = tracing::field::Empty);
    async move {
        let (mut send, recv) = match tokio::time::timeout(REGISTER_TIMEOUT, conn.accept_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                info!(error = %e, "node connection closed before opening its control stream");
                return;
            }
            Err(_) => {
                warn!("no control stream within {REGISTER_TIMEOUT:?}; closing");
                conn.close(1u32.into(), b"register timeout");
                return;
            }
        };
        let mut framed = FramedRecv::new(recv, MAX_CONTROL_FRAME);
        let first = tokio::time::timeout(REGISTER_TIMEOUT, framed.next()).await;
        let reg = match first {
            Ok(Ok(Some(Message::Register(r)))) => r,
            Ok(Ok(Some(other))) => {
                reject(&shared, &conn, &mut send, RejectCode::Other, format!("expected Register, got {}", other.name())).await;
                return;
            }
            Ok(Err(e)) => {
                let code = if e.to_string().contains("version") { RejectCode::Version } else { RejectCode::Other };
                reject(&shared, &conn, &mut send, code, format!("bad Register: {e}")).await;
                return;
            }
            Ok(Ok(None)) => return,
            Err(_) => {
                reject(&shared, &conn, &mut send, RejectCode::Other, "no Register within 5 s".into()).await;
                return;
            }
        };
        tracing::Span::current().record("node_id", reg.node_id.as_str());
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let entry = match admit(&shared, &conn, &reg, cmd_tx).await {
            Ok(e) => e,
            Err((code, reason)) => {
                reject(&shared, &conn, &mut send, code, reason).await;
                return;
            }
        };
        // A revocation that landed between the token check and the insert swept a registry
        // without this node in it: ask the store once more, now that the node is visible.
        if let Some(r) = withdrawn(&shared, &reg.enrolment_token).await {
            entry.revoke(r);
        }
        let registered = Message::Registered(Registered {
            lease_ms: shared.config.nodes.heartbeat_ms * shared.config.nodes.missed_heartbeats_before_gone as u64,
            heartbeat_ms: shared.config.nodes.heartbeat_ms,
            node_country: entry.location().country.map(|c| c.as_str().to_string()),
        });
        if let Err(e) = send_msg(&mut send, &registered).await {
            warn!(error = %e, "could not confirm registration");
            shared.directory.registry.remove(&entry);
            return;
        }
        // Only now may the node open its video frame streams (and fill a larger window).
        crate::server::node_registered(&shared, &conn);
        shared.metrics.registrations.inc();
        info!(
            operator = %entry.operator_id,
            country = entry.location().country.map(|c| c.as_str().to_string()).unwrap_or_else(|| "unknown".into()),
            classes = ?entry.classes.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
            "node registered"
        );
        let frames = tokio::spawn(crate::game::node_frames_loop(shared.clone(), conn.clone()));
        control_loop(shared, entry, send, framed, cmd_rx).await;
        frames.abort();
    }
    .instrument(span)
    .await
}

async fn reject(
    shared: &Shared,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: RejectCode,
    reason: String,
) {
    shared
        .metrics
        .rejections
        .get_or_create(&labels([("code", code.as_str())]))
        .inc();
    warn!(code = code.as_str(), %reason, "node rejected");
    let _ = send_msg(send, &Message::Rejected(Rejected { code, reason })).await;
    let _ = send.finish();
    // Give the node a moment to read the verdict before the connection goes away.
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
    conn.close(2u32.into(), code.as_str().as_bytes());
}

async fn admit(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    reg: &Register,
    commands: mpsc::Sender<ControlCmd>,
) -> Result<Arc<NodeEntry>, (RejectCode, String)> {
    if reg.protocol_version != PROTOCOL_VERSION {
        return Err((
            RejectCode::Version,
            format!(
                "protocol version {} is not supported (this gateway speaks {PROTOCOL_VERSION})",
                reg.protocol_version
            ),
        ));
    }
    if let Some(min) = &shared.config.nodes.min_software_version {
        if version_less(&reg.software_version, min) {
            return Err((
                RejectCode::Version,
                format!(
                    "software version {} is older than the minimum {min}",
                    reg.software_version
                ),
            ));
        }
    }
    check_node_id(&reg.node_id).map_err(|reason| (RejectCode::Other, reason))?;
    let store = shared.store.clone();
    let token = reg.enrolment_token.clone();
    let auth = tokio::task::spawn_blocking(move || store.authenticate_enrolment_token(&token))
        .await
        .map_err(|e| (RejectCode::Other, format!("internal error: {e}")))?
        .map_err(|e| (RejectCode::Other, format!("store unavailable: {e}")))?;
    let (operator, token) = auth.ok_or((
        RejectCode::BadToken,
        "unknown or revoked enrolment token".to_string(),
    ))?;
    match operator.kyc_status {
        KycStatus::Verified => {}
        KycStatus::Pending => {
            return Err((
                RejectCode::OperatorNotVerified,
                format!("operator {} has not passed KYC", operator.id),
            ))
        }
        KycStatus::Suspended => {
            return Err((
                RejectCode::OperatorSuspended,
                format!("operator {} is suspended", operator.id),
            ))
        }
    }
    // The node's location is what GeoIP says of the address it connects from, never a claim.
    let addr = conn.remote_address();
    let location = shared.placement.geo.lookup(addr.ip());
    // The GPU classes are the gateway's reading of the model names; the class strings the node
    // sends are hints only.
    let models: Vec<String> = reg.gpus.iter().map(|g| g.model.clone()).collect();
    let store = shared.store.clone();
    let seen_at = crate::clock::system_unix_ms();
    let derived: Vec<Classified> = tokio::task::spawn_blocking(move || {
        let mut out = Vec::with_capacity(models.len());
        for model in &models {
            let mut lookup_err = None;
            let c = gpu_class::classify(model, |key| {
                store.gpu_model_class(key).unwrap_or_else(|e| {
                    lookup_err = Some(e);
                    None
                })
            });
            if let Some(e) = lookup_err {
                return Err(e);
            }
            if c.class == gpu_class::UNCLASSIFIED && !c.key.is_empty() {
                store.note_unclassified_gpu_model(&c.key, truncate(model, 256), seen_at)?;
            }
            out.push(c);
        }
        Ok(out)
    })
    .await
    .map_err(|e| (RejectCode::Other, format!("internal error: {e}")))?
    .map_err(|e: crate::store::StoreError| {
        (RejectCode::Other, format!("store unavailable: {e}"))
    })?;
    for (c, g) in derived.iter().zip(&reg.gpus) {
        if c.class == gpu_class::UNCLASSIFIED {
            warn!(model = %c.model, hint = %g.class, "unclassified GPU model: treated as the most restricted class until an admin classifies it");
        } else if shared.placement.policy.class_id(&g.class)
            != shared.placement.policy.class_id(&c.class)
        {
            info!(model = %c.model, hint = %g.class, class = %c.class, "the node's GPU class hint disagrees with the model; using the model's class");
        }
    }
    let class_names: Vec<String> = if derived.is_empty() {
        vec![gpu_class::CPU.to_string()]
    } else {
        derived.iter().map(|c| c.class.clone()).collect()
    };
    let mut classes: Vec<(String, nearpath_geo::ClassId)> = Vec::new();
    for name in class_names {
        if classes.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let ids = if name == gpu_class::UNCLASSIFIED {
            restricted_class_ids(shared)
        } else {
            vec![shared.placement.policy.class_id(&name)]
        };
        for id in ids {
            let decision = shared.placement.policy.check_onboard(&location, id);
            shared.placement.count_decision("node", &decision);
            if let nearpath_geo::Decision::Deny { rule, reason, .. } = decision {
                return Err((
                    RejectCode::Geofence,
                    format!(
                        "rule {rule}: {reason} (GPU class {name}, node located in {})",
                        location
                            .country
                            .map(|c| c.as_str().to_string())
                            .unwrap_or_else(|| "an unknown location".into())
                    ),
                ));
            }
            classes.push((name.clone(), id));
        }
    }
    // Only a node that passed every other check claims its id: a rejected registration must not
    // take an id away from anyone.
    let store = shared.store.clone();
    let node_id = reg.node_id.clone();
    let operator_id = operator.id.clone();
    let since = crate::clock::system_unix_ms().saturating_sub(PENALTY_WINDOW_MS);
    let (owner, recent) = tokio::task::spawn_blocking(move || {
        let owner = store.claim_node_id(&node_id, &operator_id, crate::clock::system_unix_ms())?;
        let recent = if owner == operator_id {
            store.penalties_since(&operator_id, &node_id, since)?
        } else {
            0
        };
        Ok::<_, crate::store::StoreError>((owner, recent))
    })
    .await
    .map_err(|e| (RejectCode::Other, format!("internal error: {e}")))?
    .map_err(|e| (RejectCode::Other, format!("store unavailable: {e}")))?;
    if owner != operator.id {
        return Err((
            RejectCode::Duplicate,
            format!(
                "node id {} belongs to another operator; node ids are never reused across \
                 operators, choose another id",
                reg.node_id
            ),
        ));
    }
    let gpus: Vec<_> = reg
        .gpus
        .iter()
        .zip(&derived)
        .map(|(g, c)| nearpath_protocol::message::Gpu {
            class: c.class.clone(),
            ..g.clone()
        })
        .collect();
    let hints: Vec<String> = reg.gpus.iter().map(|g| g.class.clone()).collect();
    let now = crate::clock::system_unix_ms();
    let mut entry = NodeEntry::new(
        reg.node_id.clone(),
        operator.id.clone(),
        addr,
        location,
        gpus,
        classes,
        reg.workloads.clone(),
        reg.capacity,
        reg.software_version.clone(),
        now,
        conn.clone(),
        commands,
        NodeDynamic {
            state: NodeState::Active,
            load: 0.0,
            reported_sessions: 0,
            queue_depth: 0,
            gpu_util: None,
            encoder_ms_p50: None,
            last_heartbeat_ms: now,
            rtt_ms: conn.rtt().as_secs_f64() * 1000.0,
            heartbeat_misses: 0,
            slow: false,
            recent_penalties: recent.min(u32::MAX as u64) as u32,
            operator_flagged: false,
        },
    );
    entry.gpu_class_hints = hints;
    entry.enrolment_token_id = token.id.clone();
    let stale_after_ms = id_takeover_after_ms(shared);
    match shared.directory.registry.insert(entry, stale_after_ms) {
        Ok((entry, replaced)) => {
            if let Some(old) = replaced {
                // The old connection went quiet (a restarted node whose previous connection the
                // gateway has not declared gone yet): this registration takes the id over, once.
                info!(
                    old_peer = %old.addr(),
                    silent_ms = now.saturating_sub(old.dynamic().last_heartbeat_ms),
                    "taking over the id from this node's silent previous connection"
                );
                shared.metrics.node_id_takeovers.inc();
                old.kick.cancel();
            }
            // Counting the registration must not hold the node's answer behind an fsync (a burst
            // of registrations would queue on the disk); it is written in the background.
            let store = shared.store.clone();
            let (id, op) = (entry.id.clone(), entry.operator_id.clone());
            tokio::task::spawn_blocking(move || {
                if let Err(e) = store.sla_apply(
                    &id,
                    &op,
                    SlaDelta {
                        registrations: 1,
                        seen_at_ms: now,
                        ..Default::default()
                    },
                ) {
                    warn!(node = %id, error = %e, "could not count the registration");
                }
            });
            Ok(entry)
        }
        Err(InsertError::Duplicate { existing_operator }) => Err((
            RejectCode::Duplicate,
            format!(
                "node id {} is already registered by operator {existing_operator}",
                reg.node_id
            ),
        )),
        Err(InsertError::Live { last_heard_ms_ago }) => Err((
            RejectCode::Duplicate,
            format!(
                "node id {} is already connected and live (heard from {last_heard_ms_ago} ms ago); \
                 is a second instance running with the same id? A restarted node takes over once \
                 the old connection has been silent for {stale_after_ms} ms",
                reg.node_id
            ),
        )),
    }
}

/// How long a registered node must have been silent before another registration of its id
/// takes it over: two heartbeat intervals. Shorter would let a slow but live node be displaced;
/// longer keeps a restarted node out for longer (it is refused with `Duplicate` until then and
/// retries with backoff).
pub fn id_takeover_after_ms(shared: &Shared) -> u64 {
    shared.config.nodes.heartbeat_ms.saturating_mul(2)
}

async fn control_loop(
    shared: Arc<Shared>,
    entry: Arc<NodeEntry>,
    mut send: quinn::SendStream,
    mut framed: FramedRecv,
    mut cmd_rx: mpsc::Receiver<ControlCmd>,
) {
    let hb = Duration::from_millis(shared.config.nodes.heartbeat_ms);
    let mut live = LivenessTracker::new(
        Instant::now(),
        hb,
        shared.config.nodes.missed_heartbeats_before_gone,
        Duration::from_millis(shared.config.nodes.slow_max_ms),
    );
    let registered_at = Instant::now();
    let mut drained = false;
    // Connection migration: the peer address is checked on every heartbeat and on this timer.
    let mut path_check = tokio::time::interval(Duration::from_millis(
        shared.config.nodes.path_check_interval_ms.max(1),
    ));
    path_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let cause = loop {
        let deadline = tokio::time::Instant::from_std(live.next_deadline());
        tokio::select! {
            // Kicks first (rare, must not be starved), then messages before the liveness timer:
            // on a busy machine the loop can wake after the deadline with a heartbeat already
            // waiting, and that node is alive, not gone.
            biased;
            _ = entry.kick.cancelled() => {
                let (reason, cause) = match entry.revocation() {
                    Some(r) => (format!("{}: {}", r.code, r.detail), LeaveCause::Revoked),
                    None => ("disconnected by the gateway".to_string(), LeaveCause::Kicked),
                };
                // The close that follows would discard a `Shutdown` still in flight: wait until
                // the node has acknowledged it, within a bound.
                let shutdown = Message::Shutdown(Shutdown { reason });
                let _ = tokio::time::timeout(REVOKE_GRACE, async {
                    send_msg(&mut send, &shutdown).await.ok()?;
                    send.finish().ok()?;
                    send.stopped().await.ok()
                })
                .await;
                break cause;
            }
            _ = shared.shutdown.cancelled() => {
                let _ = send_msg(&mut send, &Message::Shutdown(Shutdown { reason: "gateway shutting down".into() })).await;
                break LeaveCause::GatewayShutdown;
            }
            msg = framed.next() => match msg {
                Ok(Some(Message::Heartbeat(h))) => {
                    if let Err(reason) = check_path(&shared, &entry) {
                        refuse_path(&mut send, &entry, reason).await;
                        break LeaveCause::PathRefused;
                    }
                    live.handle_heartbeat(Instant::now());
                    let recovered = {
                        let mut d = entry.dynamic();
                        let recovered = std::mem::replace(&mut d.slow, false);
                        if recovered {
                            info!("heartbeat arrived: node no longer slow");
                        }
                        d.load = if h.load.is_finite() { h.load.clamp(0.0, 1.0) } else { 1.0 };
                        d.reported_sessions = h.active_sessions;
                        d.queue_depth = h.queue_depth;
                        d.gpu_util = h.gpu_util.filter(|v| v.is_finite());
                        d.encoder_ms_p50 = h.encoder_ms_p50.filter(|v| v.is_finite());
                        d.last_heartbeat_ms = crate::clock::system_unix_ms();
                        d.rtt_ms = entry.conn.rtt().as_secs_f64() * 1000.0;
                        recovered
                    };
                    shared.directory.registry.refresh(&entry);
                    if recovered {
                        // Back in routing: sessions waiting for a node may take it.
                        shared.directory.registry.notify_changed();
                    }
                    if send_msg(&mut send, &Message::HeartbeatAck(HeartbeatAck { seq: h.seq })).await.is_err() {
                        break LeaveCause::ConnectionLost;
                    }
                }
                Ok(Some(Message::Drain(d))) => {
                    info!(deadline_ms = d.deadline_ms, "node is draining");
                    entry.dynamic().state = NodeState::Draining;
                    shared.directory.registry.refresh(&entry);
                }
                Ok(Some(Message::Drained)) => {
                    info!("node drained");
                    drained = true;
                    entry.dynamic().state = NodeState::Draining;
                    shared.directory.registry.refresh(&entry);
                }
                Ok(Some(other)) => {
                    warn!(message = other.name(), "unexpected message on the control stream; ignoring");
                }
                Ok(None) => break LeaveCause::ConnectionLost,
                Err(e) => {
                    if entry.conn.close_reason().is_some() {
                        break LeaveCause::ConnectionLost;
                    }
                    warn!(error = %e, "control stream protocol error");
                    break LeaveCause::ProtocolError;
                }
            },
            _ = path_check.tick() => {
                if let Err(reason) = check_path(&shared, &entry) {
                    refuse_path(&mut send, &entry, reason).await;
                    break LeaveCause::PathRefused;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                // Anything the connection received counts as a sign of life: heartbeats stuck
                // behind congested video make a node slow, not gone.
                let now = Instant::now();
                live.handle_rx(now, entry.conn.stats().udp_rx.datagrams);
                let (new, verdict) = live.poll(now);
                if new > 0 {
                    shared.metrics.heartbeat_misses.inc_by(new as u64);
                    entry.dynamic().heartbeat_misses += new as u64;
                }
                match verdict {
                    Liveness::Gone => {
                        warn!(
                            late_ms = now.saturating_duration_since(live.last_heartbeat()).as_millis() as u64,
                            "no heartbeat for {} intervals and nothing received lately (or slow for over nodes.slow_max_ms): node is gone",
                            shared.config.nodes.missed_heartbeats_before_gone
                        );
                        break LeaveCause::HeartbeatTimeout;
                    }
                    Liveness::Slow => {
                        let was_slow = std::mem::replace(&mut entry.dynamic().slow, true);
                        if !was_slow {
                            warn!("heartbeats late but the connection is alive: node is slow (kept, no new sessions)");
                            shared.metrics.nodes_slowed.inc();
                            shared.directory.registry.refresh(&entry);
                        }
                    }
                    Liveness::Alive => {}
                }
            }
            cmd = cmd_rx.recv() => match cmd {
                Some(ControlCmd::Drain { deadline_ms }) => {
                    entry.dynamic().state = NodeState::Draining;
                    shared.directory.registry.refresh(&entry);
                    if send_msg(&mut send, &Message::Drain(Drain { deadline_ms })).await.is_err() {
                        break LeaveCause::ConnectionLost;
                    }
                }
                Some(ControlCmd::Shutdown { reason }) => {
                    let _ = send_msg(&mut send, &Message::Shutdown(Shutdown { reason })).await;
                    break LeaveCause::Kicked;
                }
                None => {}
            },
        }
    };
    // A revoked node whose connection was closed under it (it did not read its `Shutdown`)
    // left because of the revocation, not by its own failure.
    let cause = if entry.revocation().is_some() {
        LeaveCause::Revoked
    } else {
        cause
    };
    let was_draining = drained || entry.dynamic().state == NodeState::Draining;
    entry.dynamic().state = NodeState::Gone;
    shared.directory.registry.remove(&entry);
    // Sessions that ended because the node left: those the gateway still has open on it, those
    // whose slots were released after the connection died (their tasks may notice first), and
    // those the node itself last reported. Draining does not excuse any of them.
    let active = entry
        .sessions_in_use()
        .max(entry.sessions_cut())
        .max(entry.dynamic().reported_sessions);
    shared
        .metrics
        .node_disconnects
        .get_or_create(&labels([("cause", cause.as_str())]))
        .inc();
    info!(
        cause = cause.as_str(),
        active_sessions = active,
        drained = was_draining,
        "node left"
    );
    match (cause, entry.revocation()) {
        (LeaveCause::Revoked, Some(r)) => {
            entry.conn.close(app_code::CLOSE_REVOKED, r.code.as_bytes())
        }
        (LeaveCause::Kicked | LeaveCause::GatewayShutdown, _) => {
            entry.conn.close(0u32.into(), cause.as_str().as_bytes())
        }
        (LeaveCause::PathRefused, _) => entry
            .conn
            .close(CLOSE_PATH_REFUSED, cause.as_str().as_bytes()),
        _ => entry.conn.close(3u32.into(), cause.as_str().as_bytes()),
    }
    let registered_ms = registered_at.elapsed().as_millis() as u64;
    let misses = live.total_misses();
    let rtt = entry.dynamic().rtt_ms;
    // A clean leave is one with no sessions in use at the moment the node left, whatever it
    // said before: `Drain`/`Drained` only stop new routing.
    let penalise = cause.node_at_fault() && active > 0;
    let kind = if was_draining {
        "disconnect_while_draining"
    } else {
        "disconnect_without_drain"
    };
    let detail = format!(
        "left by {} with {active} active session(s){}",
        cause.as_str(),
        if was_draining {
            " while draining"
        } else {
            " without draining"
        }
    );
    // A node that went silent (a blackout) may come back within the pause window, register
    // again and resume its sessions: its penalty waits for the window and is dropped if the
    // same id registered again meanwhile. A node that closed or broke its connection is
    // penalised at once.
    let defer = penalise && cause == LeaveCause::HeartbeatTimeout;
    if penalise && !defer {
        count_penalty(&shared, kind, active, was_draining);
    }
    let store = shared.store.clone();
    let (id, op) = (entry.id.clone(), entry.operator_id.clone());
    let now_penalty = (penalise && !defer).then(|| detail.clone());
    let res = tokio::task::spawn_blocking(move || {
        store.sla_apply(
            &id,
            &op,
            SlaDelta {
                registered_ms,
                heartbeat_misses: misses,
                last_rtt_ms: Some(rtt),
                seen_at_ms: crate::clock::system_unix_ms(),
                ..Default::default()
            },
        )?;
        if let Some(detail) = now_penalty {
            store.record_penalty(
                &id,
                &op,
                crate::clock::system_unix_ms(),
                kind,
                active,
                &detail,
            )?;
        }
        Ok::<_, crate::store::StoreError>(())
    })
    .await;
    if defer {
        let left_ms = crate::clock::system_unix_ms();
        let window = Duration::from_millis(shared.config.game.pause_window_ms);
        let shared = shared.clone();
        let (id, op) = (entry.id.clone(), entry.operator_id.clone());
        tokio::spawn(
            async move {
                tokio::time::sleep(window).await;
                let returned = shared
                    .directory
                    .registry
                    .get(&id)
                    .is_some_and(|e| e.operator_id == op && e.registered_at_ms >= left_ms);
                if returned {
                    info!(
                        active_sessions = active,
                        "node came back within the pause window: no penalty"
                    );
                    return;
                }
                count_penalty(&shared, kind, active, was_draining);
                let store = shared.store.clone();
                let res = tokio::task::spawn_blocking(move || {
                    store.record_penalty(
                        &id,
                        &op,
                        crate::clock::system_unix_ms(),
                        kind,
                        active,
                        &detail,
                    )
                })
                .await;
                if let Ok(Err(e)) = res {
                    warn!(error = %e, "could not record the node's penalty");
                }
            }
            .in_current_span(),
        );
    }
    if let Ok(Err(e)) = res {
        warn!(error = %e, "could not record the node's SLA accounting");
    }
}

/// Counts a penalty for leaving with sessions in the metric and the log.
fn count_penalty(shared: &Shared, kind: &'static str, active: u32, was_draining: bool) {
    shared
        .metrics
        .penalties
        .get_or_create(&labels([("kind", kind)]))
        .inc();
    warn!(
        active_sessions = active,
        drained = was_draining,
        "node left with active sessions: penalty"
    );
}

/// Every class the geofence names (`controlled_gpu_classes` and the rules' `gpu_classes`): an
/// unclassified GPU is checked as all of them, so it is as restricted as the most restricted.
fn restricted_class_ids(shared: &Shared) -> Vec<nearpath_geo::ClassId> {
    let g = &shared.config.geofence;
    let mut ids: Vec<nearpath_geo::ClassId> = Vec::new();
    let named = g.controlled_gpu_classes.iter().chain(
        g.rules
            .iter()
            .filter(|r| r.enabled)
            .flat_map(|r| r.gpu_classes.iter())
            .filter(|c| !c.starts_with('@')),
    );
    for name in named {
        let id = shared.placement.policy.class_id(name);
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    if ids.is_empty() {
        ids.push(shared.placement.policy.class_id(gpu_class::UNCLASSIFIED));
    }
    ids
}

/// Checks whether the node's connection moved to another address (QUIC connection migration).
/// A new address is located and must pass the onboarding geofence for every class of the node,
/// as at registration; when it does, the node's address and location are updated.
fn check_path(shared: &Shared, entry: &NodeEntry) -> Result<(), String> {
    let now = entry.conn.remote_address();
    let before = entry.path();
    if now == before.addr {
        return Ok(());
    }
    let location = shared.placement.geo.lookup(now.ip());
    let country = |l: &nearpath_geo::Location| {
        l.country
            .map(|c| c.as_str().to_string())
            .unwrap_or_else(|| "an unknown location".into())
    };
    for (name, id) in &entry.classes {
        let decision = shared.placement.policy.check_onboard(&location, *id);
        shared.placement.count_decision("node", &decision);
        if let nearpath_geo::Decision::Deny { rule, reason, .. } = decision {
            warn!(from = %before.addr, to = %now, %rule, "node connection migrated to a refused location; disconnecting");
            return Err(format!(
                "connection moved to a refused location: rule {rule}: {reason} (GPU class {name}, \
                 node now located in {})",
                country(&location)
            ));
        }
    }
    info!(from = %before.addr, to = %now, country = %country(&location), "node connection migrated; location updated");
    shared.directory.registry.relocate(
        entry,
        NodePath {
            addr: now,
            location,
        },
    );
    Ok(())
}

/// Tells a node why it is being disconnected after a refused migration (best effort: the new
/// path may not deliver it) and closes the connection at once.
async fn refuse_path(send: &mut quinn::SendStream, entry: &NodeEntry, reason: String) {
    let _ = tokio::time::timeout(
        Duration::from_millis(100),
        send_msg(send, &Message::Shutdown(Shutdown { reason })),
    )
    .await;
    // Closing here, before the accounting, stops every session relayed over the new path now.
    entry.conn.close(
        CLOSE_PATH_REFUSED,
        LeaveCause::PathRefused.as_str().as_bytes(),
    );
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Why credentials that admitted a node no longer hold, if they do not (the store is asked
/// again). A store failure is not a revocation: the admin sweep stays the primary path.
async fn withdrawn(shared: &Shared, token: &str) -> Option<Revocation> {
    let store = shared.store.clone();
    let token = token.to_string();
    let auth = tokio::task::spawn_blocking(move || store.authenticate_enrolment_token(&token))
        .await
        .ok()?
        .ok()?;
    match auth {
        None => Some(Revocation {
            code: "token_revoked",
            detail: "the enrolment token was revoked".into(),
        }),
        Some((op, _)) => match op.kyc_status {
            KycStatus::Verified => None,
            KycStatus::Suspended => Some(Revocation {
                code: "operator_suspended",
                detail: format!("operator {} is suspended", op.id),
            }),
            KycStatus::Pending => Some(Revocation {
                code: "operator_unverified",
                detail: format!("operator {} is pending", op.id),
            }),
        },
    }
}

/// Withdraws the admission of `nodes` (token revoked, operator suspended): each is sent
/// `Shutdown{reason}` and its connection closed with `CLOSE_REVOKED`, which ends its sessions.
/// A node that does not take the `Shutdown` within [`REVOKE_GRACE`] is closed all the same.
pub fn revoke_nodes(nodes: Vec<Arc<NodeEntry>>, revocation: Revocation) {
    for node in nodes {
        warn!(node = %node.id, operator = %node.operator_id, code = revocation.code, "disconnecting node: {}", revocation.detail);
        node.revoke(revocation.clone());
        let node = node.clone();
        tokio::spawn(async move {
            if tokio::time::timeout(REVOKE_GRACE * 2, node.conn.closed())
                .await
                .is_err()
            {
                if let Some(r) = node.revocation() {
                    node.conn.close(app_code::CLOSE_REVOKED, r.code.as_bytes());
                }
            }
        });
    }
}

/// Whether version `a` is older than `b` (`x.y.z`, suffixes ignored, as the config validates
/// them). A version that does not parse counts as older than any: it cannot prove it is new enough.
fn version_less(a: &str, b: &str) -> bool {
    let parse = |s| nearpath_config::parse_version(s).unwrap_or((0, 0, 0));
    parse(a) < parse(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_validated() {
        for ok in ["acme-gpu-1", "a", "node_7.eu-west", &"x".repeat(64)] {
            assert!(check_node_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            &"x".repeat(65),
            "acme gpu",
            "acme/gpu",
            "ａcme",
            "acme\u{200b}-gpu-1",
            "node\n",
            "../etc",
        ] {
            assert!(check_node_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_less("0.1.9", "0.1.10"));
        assert!(!version_less("1.0.0", "0.9.9"));
        assert!(!version_less("1.2.3", "1.2.3"));
        assert!(version_less("garbage", "0.0.1"));
    }
}
