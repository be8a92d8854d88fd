//! The node control plane: admission (node id, token, KYC, GPU classes derived from model names,
//! onboarding geofence, node id ownership, duplicates), then the node session (heartbeats,
//! liveness, drain, kick, connection migration), then the accounting when a node leaves (uptime,
//! heartbeat misses, and a penalty whenever sessions end because the node left).
//!
//! The rules are sans-IO: [`admission`] decides over facts, [`session::NodeSession`] is the
//! session's state machine. This module is the QUIC-node front end and the async driver: it
//! gathers the facts (store, GeoIP), moves messages and timers, and executes the actions.

pub mod admission;
pub mod inventory;
pub mod session;

use crate::clock::SharedClock;
use crate::components::{Directory, Placement};
use crate::conn_guard::QuicGate;
use crate::gpu_class::{self, Classified};
use crate::metrics::{labels, Metrics};
use crate::registry::{ControlCmd, NodeDynamic, NodeEntry, NodePath, NodeState, Revocation};
use crate::store::{SlaDelta, Store};
use admission::Rejection;
use nearpath_config::{GatewayConfig, NodesConfig};
use nearpath_protocol::app_code;
use nearpath_protocol::message::{Inventory, Message, Register, Registered, Rejected};
use nearpath_protocol::stream::{send as send_msg, FramedRecv, StreamError};
use nearpath_protocol::DecodeError;
use nearpath_protocol::MAX_CONTROL_FRAME;
use session::{Action, LeaveCause, LeaveFacts, Linger, NodeSession, SessionRules};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

pub use admission::{check_node_id, id_takeover_after_ms, MAX_NODE_ID_BYTES};
/// QUIC close code for a node whose connection moved to an address the geofence refuses.
pub use nearpath_protocol::app_code::CLOSE_PATH_REFUSED;

/// A node must send `Register` this soon after connecting.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Penalties within this window count against a node's routing score.
const PENALTY_WINDOW_MS: u64 = 24 * 3600 * 1000;
/// Concurrent video frame streams a registered node may have in flight (frames are
/// short-lived streams).
const NODE_UNI_STREAMS: u32 = 256;

/// What runs a registered node's video frame streams (the game relay's), injected at assembly
/// so that the node front end does not depend on the game front end.
pub type FramesLoop =
    Arc<dyn Fn(quinn::Connection) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Called once per node connection when its `Inventory` has been stored on its entry
/// (`NodeEntry::inventory`), on the node's control task: it must not block (hand work to a
/// task or a channel). Injected with [`NodeFrontEnd::with_inventory_hook`] so that the node
/// front end does not depend on the checker.
pub type InventoryHook = Arc<dyn Fn(&Arc<NodeEntry>) + Send + Sync>;

/// The QUIC-node front end: everything a node connection uses, and nothing else.
pub struct NodeFrontEnd {
    directory: Arc<Directory>,
    placement: Arc<Placement>,
    /// Enrolment tokens, operators, GPU model classes, node id claims, SLA and penalties.
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    clock: SharedClock,
    shutdown: CancellationToken,
    quic_gate: Arc<QuicGate>,
    nodes: NodesConfig,
    rules: SessionRules,
    /// The classes an unclassified GPU is checked as (computed once from `[geofence]`).
    restricted: Vec<nearpath_geo::ClassId>,
    node_receive_window_bytes: u64,
    frames: FramesLoop,
    inventory_hook: Option<InventoryHook>,
}

impl NodeFrontEnd {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &GatewayConfig,
        directory: Arc<Directory>,
        placement: Arc<Placement>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        clock: SharedClock,
        shutdown: CancellationToken,
        quic_gate: Arc<QuicGate>,
        frames: FramesLoop,
    ) -> NodeFrontEnd {
        let restricted = admission::restricted_class_ids(&config.geofence, &placement.policy);
        NodeFrontEnd {
            directory,
            placement,
            store,
            metrics,
            clock,
            shutdown,
            quic_gate,
            nodes: config.nodes.clone(),
            rules: SessionRules::from_config(&config.nodes, &config.game),
            restricted,
            node_receive_window_bytes: config.quic.node_receive_window_bytes,
            frames,
            inventory_hook: None,
        }
    }

    /// Calls `hook` whenever a node's `Inventory` has been stored (see [`InventoryHook`]).
    pub fn with_inventory_hook(mut self, hook: InventoryHook) -> Self {
        self.inventory_hook = Some(hook);
        self
    }

    /// How long a silent node holds its id against a new registration.
    pub fn id_takeover_after_ms(&self) -> u64 {
        id_takeover_after_ms(self.nodes.heartbeat_ms)
    }
}

/// Serves one node connection from handshake to goodbye.
pub async fn handle_node(fe: Arc<NodeFrontEnd>, conn: quinn::Connection) {
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
                conn.close(app_code::CLOSE_PROTOCOL, b"register timeout");
                return;
            }
        };
        let mut framed = FramedRecv::new(recv, MAX_CONTROL_FRAME);
        let first = tokio::time::timeout(REGISTER_TIMEOUT, framed.next()).await;
        let reg = match first {
            Ok(Ok(Some(Message::Register(r)))) => r,
            Ok(Ok(Some(other))) => {
                fe.reject(&conn, &mut send, Rejection::NotRegister(other.name())).await;
                return;
            }
            Ok(Err(e)) => {
                fe.reject(&conn, &mut send, Rejection::from_stream(&e)).await;
                return;
            }
            Ok(Ok(None)) => return,
            Err(_) => {
                fe.reject(&conn, &mut send, Rejection::RegisterTimeout).await;
                return;
            }
        };
        tracing::Span::current().record("node_id", reg.node_id.as_str());
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let entry = match fe.admit(&conn, &reg, cmd_tx).await {
            Ok(e) => e,
            Err(rejection) => {
                fe.reject(&conn, &mut send, rejection).await;
                return;
            }
        };
        // A revocation that landed between the token check and the insert swept a registry
        // without this node in it: ask the store once more, now that the node is visible.
        if let Some(r) = fe.withdrawn(&reg.enrolment_token).await {
            entry.revoke(r);
        }
        let registered = Message::Registered(Registered {
            lease_ms: fe.rules.lease().as_millis() as u64,
            heartbeat_ms: fe.nodes.heartbeat_ms,
            node_country: entry.location().country.map(|c| c.as_str().to_string()),
        });
        if let Err(e) = send_msg(&mut send, &registered).await {
            warn!(error = %e, "could not confirm registration");
            fe.directory.registry.remove(&entry);
            return;
        }
        // Only now may the node open its video frame streams (and fill a larger window).
        fe.node_registered(&conn);
        fe.metrics.registrations.inc();
        info!(
            operator = %entry.operator_id,
            country = entry.location().country.map(|c| c.as_str().to_string()).unwrap_or_else(|| "unknown".into()),
            classes = ?entry.classes.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
            "node registered"
        );
        // Engineer "game" turns this into a method of the game service; it is injected here.
        let frames = tokio::spawn((fe.frames)(conn.clone()));
        fe.control_loop(entry, send, framed, cmd_rx).await;
        frames.abort();
    }
    .instrument(span)
    .await
}

impl NodeFrontEnd {
    /// Grants a node connection its video frame streams and window, after `Registered` was sent.
    fn node_registered(&self, conn: &quinn::Connection) {
        self.quic_gate.authenticated(conn.stable_id());
        conn.set_receive_window(
            quinn::VarInt::from_u64(self.node_receive_window_bytes).unwrap_or(quinn::VarInt::MAX),
        );
        conn.set_max_concurrent_uni_streams(NODE_UNI_STREAMS.into());
    }

    async fn reject(
        &self,
        conn: &quinn::Connection,
        send: &mut quinn::SendStream,
        rejection: Rejection,
    ) {
        let code = rejection.code();
        self.metrics
            .rejections
            .get_or_create(&labels([("code", code.as_str())]))
            .inc();
        let reason = rejection.to_string();
        warn!(code = code.as_str(), %reason, "node rejected");
        let _ = send_msg(send, &Message::Rejected(Rejected { code, reason })).await;
        let _ = send.finish();
        // Give the node a moment to read the verdict before the connection goes away.
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
        conn.close(app_code::CLOSE_REJECTED, code.as_str().as_bytes());
    }

    /// Runs a store call off the async threads; a store failure refuses the registration.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, Rejection> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| Rejection::Internal(e.to_string()))?
            .map_err(|e| Rejection::Store(e.to_string()))
    }

    /// Gathers the facts for admission, asks [`admission`] at each stage, and inserts the node.
    async fn admit(
        &self,
        conn: &quinn::Connection,
        reg: &Register,
        commands: mpsc::Sender<ControlCmd>,
    ) -> Result<Arc<NodeEntry>, Rejection> {
        admission::check_register(reg, self.nodes.min_software_version.as_deref())?;
        let token = reg.enrolment_token.clone();
        let auth = self
            .blocking(move |st| st.authenticate_enrolment_token(&token))
            .await?;
        admission::check_operator(auth.as_ref().map(|(op, _)| (op.id.as_str(), op.kyc_status)))?;
        let Some((operator, token)) = auth else {
            return Err(Rejection::BadToken);
        };
        // The node's location is what GeoIP says of the address it connects from, never a claim.
        let addr = conn.remote_address();
        let location = self.placement.geo.lookup(addr.ip());
        // The GPU classes are the gateway's reading of the model names; the class strings the
        // node sends are hints only.
        let models: Vec<String> = reg.gpus.iter().map(|g| g.model.clone()).collect();
        let seen_at = self.clock.unix_ms();
        let derived: Vec<Classified> = self
            .blocking(move |store| {
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
            .await?;
        let policy = &self.placement.policy;
        for (c, g) in derived.iter().zip(&reg.gpus) {
            if c.class == gpu_class::UNCLASSIFIED {
                warn!(model = %c.model, hint = %g.class, "unclassified GPU model: treated as the most restricted class until an admin classifies it");
            } else if policy.class_id(&g.class) != policy.class_id(&c.class) {
                info!(model = %c.model, hint = %g.class, class = %c.class, "the node's GPU class hint disagrees with the model; using the model's class");
            }
        }
        let class_names: Vec<String> = derived.iter().map(|c| c.class.clone()).collect();
        let classes =
            admission::check_onboarding(policy, &self.restricted, &location, &class_names, |d| {
                self.placement.count_decision("node", d)
            })?;
        // Only a node that passed every other check claims its id: a rejected registration must
        // not take an id away from anyone.
        let node_id = reg.node_id.clone();
        let operator_id = operator.id.clone();
        let now = self.clock.unix_ms();
        let since = now.saturating_sub(PENALTY_WINDOW_MS);
        let (owner, recent) = self
            .blocking(move |store| {
                let owner = store.claim_node_id(&node_id, &operator_id, now)?;
                let recent = if owner == operator_id {
                    store.penalties_since(&operator_id, &node_id, since)?
                } else {
                    0
                };
                Ok((owner, recent))
            })
            .await?;
        admission::check_claim(&reg.node_id, &owner, &operator.id)?;
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
        let now = self.clock.unix_ms();
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
            conn.clone().into(),
            commands,
            NodeDynamic::admitted(
                now,
                conn.rtt().as_secs_f64() * 1000.0,
                recent.min(u32::MAX as u64) as u32,
            ),
        );
        entry.gpu_class_hints = hints;
        entry.set_encoders(&reg.encoders);
        entry.enrolment_token_id = token.id.clone();
        let stale_after_ms = self.id_takeover_after_ms();
        let (entry, replaced) = self
            .directory
            .registry
            .insert(entry, stale_after_ms)
            .map_err(|e| Rejection::from_insert(e, &reg.node_id, stale_after_ms))?;
        if let Some(old) = replaced {
            // The old connection went quiet (a restarted node whose previous connection the
            // gateway has not declared gone yet): this registration takes the id over, once.
            info!(
                old_peer = %old.addr(),
                silent_ms = now.saturating_sub(old.dynamic().last_heartbeat_ms),
                "taking over the id from this node's silent previous connection"
            );
            self.metrics.node_id_takeovers.inc();
            old.kick.cancel();
        }
        // Counting the registration must not hold the node's answer behind an fsync (a burst
        // of registrations would queue on the disk); it is written in the background.
        let store = self.store.clone();
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

    /// Drives one node's [`NodeSession`]: feeds it messages, commands and timers, executes its
    /// actions, then does the accounting of its departure.
    async fn control_loop(
        self: &Arc<Self>,
        entry: Arc<NodeEntry>,
        mut send: quinn::SendStream,
        mut framed: FramedRecv,
        mut cmd_rx: mpsc::Receiver<ControlCmd>,
    ) {
        let mut s = NodeSession::new(self.clock.now(), self.rules);
        while s.ended().is_none() {
            let deadline = tokio::time::Instant::from_std(s.poll_timeout());
            tokio::select! {
                // Kicks first (rare, must not be starved), then messages before the liveness
                // timer: on a busy machine the loop can wake after the deadline with a heartbeat
                // already waiting, and that node is alive, not gone.
                biased;
                _ = entry.kick.cancelled() => s.handle_kick(self.clock.now(), entry.revocation()),
                _ = self.shutdown.cancelled() => s.handle_shutdown(self.clock.now()),
                msg = framed.next() => {
                    let now = self.clock.now();
                    match msg {
                        Ok(Some(Message::Heartbeat(h))) => s.handle_heartbeat(now, &h),
                        Ok(Some(Message::Drain(d))) => {
                            info!(deadline_ms = d.deadline_ms, "node is draining");
                            s.handle_drain(now);
                        }
                        Ok(Some(Message::Drained)) => {
                            info!("node drained");
                            s.handle_drained(now);
                        }
                        Ok(Some(Message::Inventory(inv))) => self.receive_inventory(&entry, inv),
                        Ok(Some(other)) => {
                            warn!(message = other.name(), "unexpected message on the control stream; ignoring");
                        }
                        Err(StreamError::Decode(DecodeError::UnknownType(ty))) => {
                            // PROTOCOL.md section 3: a newer node may send advisory messages
                            // this gateway does not know; the decoder consumed the frame.
                            info!(message_type = ty, "unknown message type on the control stream; skipped");
                        }
                        Ok(None) => s.handle_connection_lost(now),
                        Err(e) => {
                            if entry.conn.close_reason().is_some() {
                                s.handle_connection_lost(now);
                            } else {
                                warn!(error = %e, "control stream protocol error");
                                s.handle_protocol_error(now);
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    // Anything the connection received counts as a sign of life.
                    let now = self.clock.now();
                    s.handle_rx(now, entry.conn.received_datagrams());
                    s.handle_timeout(now);
                }
                cmd = cmd_rx.recv() => match cmd {
                    Some(ControlCmd::Drain { deadline_ms }) => s.handle_drain_request(self.clock.now(), deadline_ms),
                    Some(ControlCmd::Shutdown { reason }) => s.handle_evict(self.clock.now(), reason),
                    None => {}
                },
            }
            while let Some(action) = s.poll_action() {
                self.execute(&mut s, &entry, &mut send, action).await;
            }
        }
        if s.ended() == Some(LeaveCause::HeartbeatTimeout) {
            warn!(
                late_ms = self.clock.now().saturating_duration_since(s.last_heartbeat()).as_millis() as u64,
                "no heartbeat for {} intervals and nothing received lately (or slow for over nodes.slow_max_ms): node is gone",
                self.nodes.missed_heartbeats_before_gone
            );
        }
        self.depart(&s, &entry).await;
    }

    /// Stores a node's first `Inventory`, checked against its registration, and calls the hook;
    /// a later one is ignored (PROTOCOL.md: the first is what the checker tested).
    fn receive_inventory(&self, entry: &Arc<NodeEntry>, inv: Inventory) {
        if entry.inventory.get().is_some() {
            warn!("a second Inventory on this connection; ignored (the first stands)");
            return;
        }
        let n = inventory::sanitise(
            inv,
            entry.gpus.len(),
            &entry.workloads,
            self.clock.unix_ms(),
        );
        if n.dropped_count > 0 {
            warn!(
                dropped = n.dropped_count,
                reasons = ?n.dropped,
                "inventory entries that do not match the registration were dropped"
            );
        }
        if !n.duplicate_uuids.is_empty() {
            warn!(uuids = ?n.duplicate_uuids, "the inventory reports one GPU UUID for several GPUs");
        }
        info!(
            gpus = n.inventory.gpus.len(),
            models = n.inventory.models.len(),
            encoder = %n.inventory.encoder,
            "inventory received"
        );
        if entry.inventory.set(n).is_ok() {
            self.directory
                .registry
                .check_event(crate::registry::CheckEvent::Inventory(entry.clone()));
            if let Some(hook) = &self.inventory_hook {
                hook(entry);
            }
        }
    }

    /// Executes one action of the node's session.
    async fn execute(
        &self,
        s: &mut NodeSession,
        entry: &NodeEntry,
        send: &mut quinn::SendStream,
        action: Action,
    ) {
        let registry = &self.directory.registry;
        match action {
            Action::Send(msg) => {
                if send_msg(send, &msg).await.is_err() {
                    s.handle_connection_lost(self.clock.now());
                }
            }
            Action::Shutdown { reason, linger } => {
                let msg = Message::Shutdown(nearpath_protocol::message::Shutdown { reason });
                match linger {
                    Linger::Send => {
                        let _ = send_msg(send, &msg).await;
                    }
                    Linger::Within(d) => {
                        let _ = tokio::time::timeout(d, send_msg(send, &msg)).await;
                    }
                    Linger::UntilRead(d) => {
                        let _ = tokio::time::timeout(d, async {
                            send_msg(send, &msg).await.ok()?;
                            send.finish().ok()?;
                            send.stopped().await.ok()
                        })
                        .await;
                    }
                }
            }
            Action::Report(r) => {
                {
                    let mut d = entry.dynamic();
                    d.load = r.load;
                    d.reported_sessions = r.sessions;
                    d.queue_depth = r.queue_depth;
                    d.gpu_util = r.gpu_util;
                    d.encoder_ms_p50 = r.encoder_ms_p50;
                    d.last_heartbeat_ms = self.clock.unix_ms();
                    d.rtt_ms = entry.conn.rtt().as_secs_f64() * 1000.0;
                }
                registry.refresh(entry);
            }
            Action::State(state) => {
                entry.dynamic().state = state;
                registry.refresh(entry);
                if state == NodeState::Active {
                    // Taking sessions again: queued requests may take its free slots.
                    registry.wake_queued(entry);
                }
            }
            Action::Slow => {
                entry.dynamic().slow = true;
                warn!("heartbeats late but the connection is alive: node is slow (kept, no new sessions)");
                self.metrics.nodes_slowed.inc();
                registry.refresh(entry);
            }
            Action::Recovered => {
                entry.dynamic().slow = false;
                info!("heartbeat arrived: node no longer slow");
                registry.refresh(entry);
                // Back in routing: sessions waiting for a node may take it.
                registry.wake_queued(entry);
                registry.notify_changed();
            }
            Action::Missed(n) => {
                self.metrics.heartbeat_misses.inc_by(n as u64);
                entry.dynamic().heartbeat_misses += n as u64;
            }
            Action::CheckPath => {
                if let Err(reason) = self.check_path(entry) {
                    s.handle_path_refused(self.clock.now(), reason);
                }
            }
            Action::Close { code, reason } => entry.conn.close(code, reason.as_bytes()),
        }
    }

    /// The accounting when a node leaves: out of the directory, the close, the SLA record and
    /// the penalty if the session says so.
    async fn depart(self: &Arc<Self>, s: &NodeSession, entry: &Arc<NodeEntry>) {
        entry.dynamic().state = NodeState::Gone;
        self.directory.registry.remove(entry);
        let facts = LeaveFacts {
            sessions_in_use: entry.sessions_in_use(),
            sessions_cut: entry.sessions_cut(),
            revocation: entry.revocation().cloned(),
        };
        let d = s.leave(self.clock.now(), &facts);
        self.metrics
            .node_disconnects
            .get_or_create(&labels([("cause", d.cause.as_str())]))
            .inc();
        info!(
            cause = d.cause.as_str(),
            active_sessions = d.active,
            drained = d.draining,
            "node left"
        );
        entry.conn.close(d.close.0, d.close.1.as_bytes());
        let rtt = entry.dynamic().rtt_ms;
        let penalty_now = d.penalty.clone().filter(|p| p.defer.is_none());
        if let Some(p) = &penalty_now {
            self.count_penalty(p.kind, p.active, d.draining);
        }
        let store = self.store.clone();
        let (id, op) = (entry.id.clone(), entry.operator_id.clone());
        let now_ms = self.clock.unix_ms();
        let (registered_ms, misses) = (d.registered_for.as_millis() as u64, d.heartbeat_misses);
        let res = tokio::task::spawn_blocking(move || {
            store.sla_apply(
                &id,
                &op,
                SlaDelta {
                    registered_ms,
                    heartbeat_misses: misses,
                    last_rtt_ms: Some(rtt),
                    seen_at_ms: now_ms,
                    ..Default::default()
                },
            )?;
            if let Some(p) = penalty_now {
                store.record_penalty(&id, &op, now_ms, p.kind, p.active, &p.detail)?;
            }
            Ok::<_, crate::store::StoreError>(())
        })
        .await;
        if let Ok(Err(e)) = res {
            warn!(error = %e, "could not record the node's SLA accounting");
        }
        if let Some(p) = d.penalty.filter(|p| p.defer.is_some()) {
            let window = p.defer.unwrap_or_default();
            let left_ms = now_ms;
            let fe = self.clone();
            let (id, op) = (entry.id.clone(), entry.operator_id.clone());
            let draining = d.draining;
            tokio::spawn(
                async move {
                    tokio::time::sleep(window).await;
                    let returned = fe
                        .directory
                        .registry
                        .get(&id)
                        .is_some_and(|e| e.operator_id == op && e.registered_at_ms >= left_ms);
                    if !p.applies(returned) {
                        info!(
                            active_sessions = p.active,
                            "node came back within the pause window: no penalty"
                        );
                        return;
                    }
                    fe.count_penalty(p.kind, p.active, draining);
                    let store = fe.store.clone();
                    let at = fe.clock.unix_ms();
                    let res = tokio::task::spawn_blocking(move || {
                        store.record_penalty(&id, &op, at, p.kind, p.active, &p.detail)
                    })
                    .await;
                    if let Ok(Err(e)) = res {
                        warn!(error = %e, "could not record the node's penalty");
                    }
                }
                .in_current_span(),
            );
        }
    }

    /// Counts a penalty for leaving with sessions in the metric and the log.
    fn count_penalty(&self, kind: &'static str, active: u32, was_draining: bool) {
        self.metrics
            .penalties
            .get_or_create(&labels([("kind", kind)]))
            .inc();
        warn!(
            active_sessions = active,
            drained = was_draining,
            "node left with active sessions: penalty"
        );
    }

    /// Checks whether the node's connection moved to another address (QUIC connection
    /// migration). A new address is located and must pass the onboarding geofence for every
    /// class of the node, as at registration; when it does, the node's address and location are
    /// updated.
    fn check_path(&self, entry: &NodeEntry) -> Result<(), String> {
        let now = entry.conn.remote_address();
        let before = entry.path();
        if now == before.addr {
            return Ok(());
        }
        let location = self.placement.geo.lookup(now.ip());
        for (name, id) in &entry.classes_now() {
            let decision = self.placement.policy.check_onboard(&location, *id);
            self.placement.count_decision("node", &decision);
            if let nearpath_geo::Decision::Deny { rule, reason, .. } = decision {
                warn!(from = %before.addr, to = %now, %rule, "node connection migrated to a refused location; disconnecting");
                return Err(format!(
                    "connection moved to a refused location: rule {rule}: {reason} (GPU class \
                     {name}, node now located in {})",
                    admission::place(&location)
                ));
            }
        }
        info!(from = %before.addr, to = %now, country = %admission::place(&location), "node connection migrated; location updated");
        self.directory.registry.relocate(
            entry,
            NodePath {
                addr: now,
                location,
            },
        );
        Ok(())
    }

    /// Why credentials that admitted a node no longer hold, if they do not (the store is asked
    /// again). A store failure is not a revocation: the admin sweep stays the primary path.
    async fn withdrawn(&self, token: &str) -> Option<Revocation> {
        let token = token.to_string();
        let auth = self
            .blocking(move |st| st.authenticate_enrolment_token(&token))
            .await
            .ok()?;
        match auth {
            None => Some(Revocation::token_revoked(
                "the enrolment token was revoked".into(),
            )),
            Some((op, _)) => Revocation::of_operator(&op.id, op.kyc_status),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}

/// Every connection close, stream reset and stream stop in the gateway names its code from
/// `nearpath_protocol::app_code` (PROTOCOL.md's table, pinned by the protocol crate's tests):
/// a bare number here is how the close codes drifted from the document before.
#[cfg(test)]
mod close_code_tests {
    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn no_close_or_reset_in_the_gateway_or_the_node_uses_a_bare_number() {
        let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        sources(&manifest.join("src"), &mut files);
        // The edge node speaks the same table from the other side.
        sources(&manifest.join("../edge-node/src"), &mut files);
        assert!(files.len() > 20);
        let mut bad = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for (i, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                let literal = ["close(", "reset(", "stop("].iter().any(|call| {
                    code.match_indices(call).any(|(at, _)| {
                        let arg = code[at + call.len()..].trim_start();
                        arg.starts_with(|c: char| c.is_ascii_digit())
                            || arg.starts_with("VarInt::from")
                            || arg.starts_with("quinn::VarInt::from")
                    })
                });
                if literal {
                    bad.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
                }
            }
        }
        assert!(
            bad.is_empty(),
            "use app_code constants:\n{}",
            bad.join("\n")
        );
    }
}
