//! The node session as a sans-IO state machine: what happens between `Registered` and the node
//! leaving. Events go in through `handle_*(now, ...)`; what to do comes out of
//! [`NodeSession::poll_action`] and when to call again out of [`NodeSession::poll_timeout`].
//! The async driver in `control` only moves messages and timers and executes the actions, so
//! every rule here (heartbeat lease, slow versus gone, drain, who is to blame for leaving, which
//! close code ends the connection, when leaving is penalised) runs under a virtual clock in the
//! tests below.

use crate::liveness::{Liveness, LivenessTracker};
use crate::registry::{NodeState, Revocation};
use nearpath_protocol::app_code;
use nearpath_protocol::message::{Drain, Heartbeat, HeartbeatAck, Message};
use quinn::VarInt;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub use crate::registry::REVOKE_GRACE;
/// How long the `Shutdown` before a refused migration may take: the new path may not deliver
/// it, and the sessions relayed over that path must stop now.
pub const PATH_REFUSED_GRACE: Duration = Duration::from_millis(100);

/// The timing rules of node sessions, from `[nodes]` and `[game]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRules {
    /// How often the node heartbeats (`nodes.heartbeat_ms`).
    pub heartbeat: Duration,
    /// Missed intervals that make the lease (`nodes.missed_heartbeats_before_gone`).
    pub missed_before_gone: u32,
    /// Longest a node may stay slow (`nodes.slow_max_ms`).
    pub slow_max: Duration,
    /// How often the peer address is checked for migration (`nodes.path_check_interval_ms`).
    pub path_check: Duration,
    /// How long a node gone silent may take to come back before its penalty counts
    /// (`game.pause_window_ms`).
    pub pause_window: Duration,
}

impl SessionRules {
    pub fn from_config(
        nodes: &nearpath_config::NodesConfig,
        game: &nearpath_config::GameConfig,
    ) -> Self {
        SessionRules {
            heartbeat: Duration::from_millis(nodes.heartbeat_ms),
            missed_before_gone: nodes.missed_heartbeats_before_gone,
            slow_max: Duration::from_millis(nodes.slow_max_ms),
            path_check: Duration::from_millis(nodes.path_check_interval_ms.max(1)),
            pause_window: Duration::from_millis(game.pause_window_ms),
        }
    }

    /// The lease `Registered` announces: silence this long makes the node slow or gone.
    pub fn lease(&self) -> Duration {
        self.heartbeat * self.missed_before_gone
    }
}

/// Why a node's session ended; decides the close code and whether leaving is the node's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveCause {
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
    /// The metric label and close reason (a bounded set).
    pub fn as_str(self) -> &'static str {
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
    pub fn node_at_fault(self) -> bool {
        matches!(
            self,
            LeaveCause::ConnectionLost
                | LeaveCause::HeartbeatTimeout
                | LeaveCause::ProtocolError
                | LeaveCause::PathRefused
        )
    }

    /// The QUIC close code (PROTOCOL.md, "Application error codes") for a session that ended
    /// this way.
    pub fn close_code(self) -> VarInt {
        match self {
            // The node closed or finished its control stream, or the path died: nothing is
            // wrong on the gateway's side.
            LeaveCause::ConnectionLost => app_code::CLOSE_NORMAL,
            LeaveCause::HeartbeatTimeout => app_code::CLOSE_LEASE_EXPIRED,
            LeaveCause::Kicked | LeaveCause::GatewayShutdown => app_code::CLOSE_SHUTDOWN,
            LeaveCause::Revoked => app_code::CLOSE_REVOKED,
            LeaveCause::ProtocolError => app_code::CLOSE_PROTOCOL,
            LeaveCause::PathRefused => app_code::CLOSE_PATH_REFUSED,
        }
    }
}

/// What a heartbeat reported, cleaned of values the router cannot use.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// 0..=1; a non-finite load counts as full.
    pub load: f32,
    pub sessions: u32,
    pub queue_depth: u32,
    pub gpu_util: Option<f32>,
    pub encoder_ms_p50: Option<f32>,
}

impl Report {
    fn from_heartbeat(h: &Heartbeat) -> Report {
        Report {
            load: if h.load.is_finite() {
                h.load.clamp(0.0, 1.0)
            } else {
                1.0
            },
            sessions: h.active_sessions,
            queue_depth: h.queue_depth,
            gpu_util: h.gpu_util.filter(|v| v.is_finite()),
            encoder_ms_p50: h.encoder_ms_p50.filter(|v| v.is_finite()),
        }
    }
}

/// How long the driver may spend telling the node `Shutdown` before it goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linger {
    /// Send it; the node is not waited for.
    Send,
    /// Give up sending after this long.
    Within(Duration),
    /// Send it, finish the stream and wait until the node has read it, within this long: the
    /// close that follows would discard a `Shutdown` still in flight.
    UntilRead(Duration),
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this message on the control stream; failing to is a lost connection.
    Send(Message),
    /// Tell the node why it is being disconnected (best effort, see [`Linger`]).
    Shutdown { reason: String, linger: Linger },
    /// Store the node's report in the directory and refresh its routing.
    Report(Report),
    /// The node's lifecycle state changed (it drains: no new sessions).
    State(NodeState),
    /// Heartbeats are late but the connection is alive: keep the node, route nothing new to it.
    Slow,
    /// A slow node heartbeats again: back in routing; sessions waiting for a node may take it.
    Recovered,
    /// Heartbeat intervals newly missed, to count.
    Missed(u32),
    /// Check whether the connection moved and the new place is allowed; answer with
    /// [`NodeSession::handle_path_refused`] if not.
    CheckPath,
    /// Close the connection now, before the accounting (a refused path: every session relayed
    /// over it stops at once).
    Close { code: VarInt, reason: &'static str },
}

/// The gateway's own facts when the session ended, which the machine cannot know.
#[derive(Debug, Clone, Default)]
pub struct LeaveFacts {
    /// Sessions the gateway still has open on the node.
    pub sessions_in_use: u32,
    /// Sessions whose slots were released after the node's connection had closed.
    pub sessions_cut: u32,
    /// Why the node's admission was withdrawn, if it was (whatever else ended the session).
    pub revocation: Option<Revocation>,
}

/// A penalty for leaving with sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Penalty {
    /// `disconnect_while_draining` or `disconnect_without_drain` (a metric label).
    pub kind: &'static str,
    pub active: u32,
    pub detail: String,
    /// A node gone silent may come back within the pause window and resume its sessions: the
    /// penalty waits this long and is dropped if the same id registered again meanwhile
    /// ([`Penalty::applies`]).
    pub defer: Option<Duration>,
}

impl Penalty {
    /// Whether a deferred penalty still applies at the end of its window.
    pub fn applies(&self, registered_again: bool) -> bool {
        self.defer.is_none() || !registered_again
    }
}

/// How a node session ended and what it costs the node.
#[derive(Debug, Clone, PartialEq)]
pub struct Departure {
    pub cause: LeaveCause,
    /// Sessions that ended because the node left.
    pub active: u32,
    /// The node had said `Drain`/`Drained` or was asked to drain.
    pub draining: bool,
    /// Code and reason of the connection's close.
    pub close: (VarInt, &'static str),
    /// How long the node was registered.
    pub registered_for: Duration,
    pub heartbeat_misses: u64,
    pub penalty: Option<Penalty>,
}

/// One registered node's session.
#[derive(Debug)]
pub struct NodeSession {
    rules: SessionRules,
    registered_at: Instant,
    live: LivenessTracker,
    next_path_check: Instant,
    slow: bool,
    draining: bool,
    reported_sessions: u32,
    ended: Option<LeaveCause>,
    actions: VecDeque<Action>,
}

impl NodeSession {
    /// A session that starts now, when `Registered` was sent.
    pub fn new(now: Instant, rules: SessionRules) -> Self {
        NodeSession {
            rules,
            registered_at: now,
            live: LivenessTracker::new(
                now,
                rules.heartbeat,
                rules.missed_before_gone,
                rules.slow_max,
            ),
            next_path_check: now + rules.path_check,
            slow: false,
            draining: false,
            reported_sessions: 0,
            ended: None,
            actions: VecDeque::new(),
        }
    }

    /// Why the session ended, once it has.
    pub fn ended(&self) -> Option<LeaveCause> {
        self.ended
    }

    /// The next action, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`NodeSession::handle_timeout`] is due (after a fresh sample of the connection's
    /// received-datagram count, [`NodeSession::handle_rx`]).
    pub fn poll_timeout(&self) -> Instant {
        self.live.next_deadline().min(self.next_path_check)
    }

    fn end(&mut self, cause: LeaveCause) {
        if self.ended.is_none() {
            self.ended = Some(cause);
        }
    }

    fn push(&mut self, a: Action) {
        if self.ended.is_none() {
            self.actions.push_back(a);
        }
    }

    /// A heartbeat: the lease starts again, a slow node recovers, the report is stored and
    /// acknowledged. The path is checked first: a node that moved somewhere refused is not
    /// served on.
    pub fn handle_heartbeat(&mut self, now: Instant, h: &Heartbeat) {
        if self.ended.is_some() {
            return;
        }
        self.push(Action::CheckPath);
        self.live.handle_heartbeat(now);
        let report = Report::from_heartbeat(h);
        self.reported_sessions = report.sessions;
        self.push(Action::Report(report));
        if std::mem::replace(&mut self.slow, false) {
            self.push(Action::Recovered);
        }
        self.push(Action::Send(Message::HeartbeatAck(HeartbeatAck {
            seq: h.seq,
        })));
    }

    /// A sample of how many datagrams the connection has received so far: anything received is
    /// a sign of life (heartbeats stuck behind congested video make a node slow, not gone).
    pub fn handle_rx(&mut self, now: Instant, datagrams: u64) {
        self.live.handle_rx(now, datagrams);
    }

    /// The timer fired: count misses, decide slow or gone, check the path when due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ended.is_some() {
            return;
        }
        if now >= self.next_path_check {
            self.next_path_check = now + self.rules.path_check;
            self.push(Action::CheckPath);
        }
        let (new, verdict) = self.live.poll(now);
        if new > 0 {
            self.push(Action::Missed(new));
        }
        match verdict {
            Liveness::Gone => {
                self.actions.clear();
                self.end(LeaveCause::HeartbeatTimeout);
            }
            Liveness::Slow => {
                if !std::mem::replace(&mut self.slow, true) {
                    self.push(Action::Slow);
                }
            }
            Liveness::Alive => {}
        }
    }

    /// The node says it is draining: no new sessions.
    pub fn handle_drain(&mut self, _now: Instant) {
        self.draining = true;
        self.push(Action::State(NodeState::Draining));
    }

    /// The node says it has drained. It stays connected; leaving with sessions is still its fault.
    pub fn handle_drained(&mut self, now: Instant) {
        self.handle_drain(now);
    }

    /// The gateway (an admin) asks the node to drain within `deadline_ms`.
    pub fn handle_drain_request(&mut self, _now: Instant, deadline_ms: u64) {
        self.draining = true;
        self.push(Action::State(NodeState::Draining));
        self.push(Action::Send(Message::Drain(Drain { deadline_ms })));
    }

    /// The gateway disconnects the node: its credentials were withdrawn (`revocation`), or a
    /// newer connection took its id over.
    pub fn handle_kick(&mut self, _now: Instant, revocation: Option<&Revocation>) {
        let (reason, cause) = match revocation {
            Some(r) => (format!("{}: {}", r.code, r.detail), LeaveCause::Revoked),
            None => (
                "disconnected by the gateway".to_string(),
                LeaveCause::Kicked,
            ),
        };
        self.push(Action::Shutdown {
            reason,
            linger: Linger::UntilRead(REVOKE_GRACE),
        });
        self.end(cause);
    }

    /// An admin's `Shutdown{reason}` for the node.
    pub fn handle_evict(&mut self, _now: Instant, reason: String) {
        self.push(Action::Shutdown {
            reason,
            linger: Linger::Send,
        });
        self.end(LeaveCause::Kicked);
    }

    /// The gateway shuts down.
    pub fn handle_shutdown(&mut self, _now: Instant) {
        self.push(Action::Shutdown {
            reason: "gateway shutting down".into(),
            linger: Linger::Send,
        });
        self.end(LeaveCause::GatewayShutdown);
    }

    /// The connection or the control stream ended (or a send failed).
    pub fn handle_connection_lost(&mut self, _now: Instant) {
        self.actions.clear();
        self.end(LeaveCause::ConnectionLost);
    }

    /// The node sent something undecodable on the control stream.
    pub fn handle_protocol_error(&mut self, _now: Instant) {
        self.actions.clear();
        self.end(LeaveCause::ProtocolError);
    }

    /// The connection moved to a place the onboarding geofence refuses: tell the node and
    /// close at once.
    pub fn handle_path_refused(&mut self, _now: Instant, reason: String) {
        if self.ended.is_some() {
            return;
        }
        self.actions.clear();
        self.push(Action::Shutdown {
            reason,
            linger: Linger::Within(PATH_REFUSED_GRACE),
        });
        self.push(Action::Close {
            code: LeaveCause::PathRefused.close_code(),
            reason: LeaveCause::PathRefused.as_str(),
        });
        self.end(LeaveCause::PathRefused);
    }

    /// The accounting of a session that ended: the close, the sessions that ended with it and
    /// the penalty, if any.
    pub fn leave(&self, now: Instant, facts: &LeaveFacts) -> Departure {
        let cause = self.ended.unwrap_or(LeaveCause::ConnectionLost);
        // A revoked node whose connection was closed under it (it did not read its
        // `Shutdown`) left because of the revocation, not by its own failure.
        let cause = if facts.revocation.is_some() {
            LeaveCause::Revoked
        } else {
            cause
        };
        let close = match (&facts.revocation, cause) {
            (Some(r), LeaveCause::Revoked) => (app_code::CLOSE_REVOKED, r.code),
            (None, LeaveCause::Revoked) => (app_code::CLOSE_SHUTDOWN, cause.as_str()),
            _ => (cause.close_code(), cause.as_str()),
        };
        // Sessions that ended because the node left: those the gateway still has open on it,
        // those whose slots were released after the connection died, and those the node
        // itself last reported. Draining does not excuse any of them.
        let active = facts
            .sessions_in_use
            .max(facts.sessions_cut)
            .max(self.reported_sessions);
        let penalty = (cause.node_at_fault() && active > 0).then(|| {
            let (kind, how) = if self.draining {
                ("disconnect_while_draining", " while draining")
            } else {
                ("disconnect_without_drain", " without draining")
            };
            Penalty {
                kind,
                active,
                detail: format!(
                    "left by {} with {active} active session(s){how}",
                    cause.as_str()
                ),
                defer: (cause == LeaveCause::HeartbeatTimeout).then_some(self.rules.pause_window),
            }
        });
        Departure {
            cause,
            active,
            draining: self.draining,
            close,
            registered_for: now.saturating_duration_since(self.registered_at),
            heartbeat_misses: self.live.total_misses(),
            penalty,
        }
    }

    /// When the last heartbeat arrived (for logs).
    pub fn last_heartbeat(&self) -> Instant {
        self.live.last_heartbeat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    const HB: Duration = Duration::from_millis(500);

    fn rules() -> SessionRules {
        SessionRules {
            heartbeat: HB,
            missed_before_gone: 3,
            slow_max: Duration::from_secs(15),
            path_check: Duration::from_secs(1),
            pause_window: Duration::from_secs(5),
        }
    }

    fn hb(seq: u64, sessions: u32) -> Heartbeat {
        Heartbeat {
            seq,
            active_sessions: sessions,
            queue_depth: 0,
            load: 0.5,
            gpu_util: None,
            encoder_ms_p50: None,
        }
    }

    fn drain(s: &mut NodeSession) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    /// Runs the driver's timer loop until `until`: at each due timeout, samples the datagram
    /// count (`rx` of it) and fires the timer. Returns every action.
    fn run_until(
        s: &mut NodeSession,
        clock: &ManualClock,
        until: Instant,
        mut rx: impl FnMut(Instant) -> u64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        while s.ended().is_none() {
            let next = s.poll_timeout();
            if next > until {
                break;
            }
            let now = clock.now();
            if next > now {
                clock.advance(next - now);
            }
            let now = clock.now();
            s.handle_rx(now, rx(now));
            s.handle_timeout(now);
            out.extend(drain(s));
        }
        out
    }

    fn session() -> (Arc<ManualClock>, NodeSession) {
        let clock = ManualClock::new(1_000_000);
        let s = NodeSession::new(clock.now(), rules());
        (clock, s)
    }

    use std::sync::Arc;

    #[test]
    fn lease_expiry_evicts_with_close_code_lease_expired() {
        let (clock, mut s) = session();
        let t0 = clock.now();
        run_until(&mut s, &clock, t0 + Duration::from_secs(10), |_| 0);
        assert_eq!(s.ended(), Some(LeaveCause::HeartbeatTimeout));
        // Gone exactly at the end of the lease (3 intervals), not before.
        assert_eq!(clock.now() - t0, rules().lease());
        let d = s.leave(clock.now(), &LeaveFacts::default());
        assert_eq!(
            d.close,
            (app_code::CLOSE_LEASE_EXPIRED, "heartbeat_timeout")
        );
        assert_eq!(d.close.0.into_inner(), 4);
    }

    #[test]
    fn heartbeats_keep_the_lease_and_are_acknowledged() {
        let (clock, mut s) = session();
        for seq in 1..=20 {
            let until = clock.now() + HB;
            run_until(&mut s, &clock, until, |_| 0);
            clock.advance(until - clock.now());
            s.handle_heartbeat(clock.now(), &hb(seq, 0));
            let acts = drain(&mut s);
            assert!(acts.contains(&Action::Send(Message::HeartbeatAck(HeartbeatAck { seq }))));
        }
        assert_eq!(s.ended(), None);
    }

    #[test]
    fn a_slow_node_is_not_evicted_while_its_connection_delivers() {
        let (clock, mut s) = session();
        let t0 = clock.now();
        // No heartbeat for 10 s, but datagrams keep arriving: slow, kept.
        let acts = run_until(&mut s, &clock, t0 + Duration::from_secs(10), |now| {
            (now - t0).as_millis() as u64
        });
        assert_eq!(s.ended(), None);
        assert_eq!(acts.iter().filter(|a| **a == Action::Slow).count(), 1);
        // A heartbeat brings it back into routing.
        s.handle_heartbeat(clock.now(), &hb(1, 0));
        assert!(drain(&mut s).contains(&Action::Recovered));
    }

    #[test]
    fn a_node_slow_for_longer_than_slow_max_is_evicted_with_lease_expired() {
        let (clock, mut s) = session();
        let t0 = clock.now();
        run_until(&mut s, &clock, t0 + Duration::from_secs(60), |now| {
            (now - t0).as_millis() as u64
        });
        assert_eq!(s.ended(), Some(LeaveCause::HeartbeatTimeout));
        assert!(clock.now() - t0 >= rules().lease() + rules().slow_max);
        assert_eq!(
            s.leave(clock.now(), &LeaveFacts::default()).close.0,
            app_code::CLOSE_LEASE_EXPIRED
        );
    }

    #[test]
    fn missed_heartbeats_are_counted_once_each() {
        let (clock, mut s) = session();
        let t0 = clock.now();
        let acts = run_until(&mut s, &clock, t0 + Duration::from_secs(10), |_| 0);
        let missed: u32 = acts
            .iter()
            .map(|a| if let Action::Missed(n) = a { *n } else { 0 })
            .sum();
        assert_eq!(
            u64::from(missed),
            s.leave(clock.now(), &LeaveFacts::default())
                .heartbeat_misses
        );
        assert!(missed >= 2, "{missed}");
    }

    #[test]
    fn drained_then_dropping_with_active_sessions_is_still_penalised() {
        let (clock, mut s) = session();
        s.handle_heartbeat(clock.now(), &hb(1, 0));
        s.handle_drained(clock.now());
        assert!(drain(&mut s).contains(&Action::State(NodeState::Draining)));
        s.handle_connection_lost(clock.now());
        let d = s.leave(
            clock.now(),
            &LeaveFacts {
                sessions_in_use: 2,
                ..Default::default()
            },
        );
        let p = d.penalty.expect("penalised");
        assert_eq!(
            (p.kind, p.active, p.defer),
            ("disconnect_while_draining", 2, None)
        );
    }

    #[test]
    fn a_clean_drain_is_not_penalised() {
        let (clock, mut s) = session();
        s.handle_drain(clock.now());
        s.handle_heartbeat(clock.now(), &hb(1, 0));
        s.handle_drained(clock.now());
        s.handle_connection_lost(clock.now());
        let d = s.leave(clock.now(), &LeaveFacts::default());
        assert_eq!(d.penalty, None);
        assert!(d.draining);
        assert_eq!(d.close.0, app_code::CLOSE_NORMAL);
    }

    #[test]
    fn the_sessions_the_node_last_reported_count_when_it_leaves() {
        let (clock, mut s) = session();
        s.handle_heartbeat(clock.now(), &hb(1, 3));
        s.handle_connection_lost(clock.now());
        let d = s.leave(
            clock.now(),
            &LeaveFacts {
                sessions_in_use: 1,
                sessions_cut: 2,
                revocation: None,
            },
        );
        assert_eq!(d.active, 3);
        assert_eq!(d.penalty.unwrap().kind, "disconnect_without_drain");
    }

    #[test]
    fn a_silent_node_is_penalised_only_after_the_pause_window_if_it_did_not_return() {
        let (clock, mut s) = session();
        s.handle_heartbeat(clock.now(), &hb(1, 1));
        let t = clock.now();
        run_until(&mut s, &clock, t + Duration::from_secs(10), |_| 0);
        let p = s
            .leave(clock.now(), &LeaveFacts::default())
            .penalty
            .expect("penalty");
        assert_eq!(p.defer, Some(rules().pause_window));
        assert!(p.applies(false));
        assert!(!p.applies(true));
    }

    #[test]
    fn leaving_by_the_gateways_hand_is_never_penalised() {
        for kick in [0, 1, 2] {
            let (clock, mut s) = session();
            s.handle_heartbeat(clock.now(), &hb(1, 4));
            match kick {
                0 => s.handle_kick(clock.now(), None),
                1 => s.handle_shutdown(clock.now()),
                _ => s.handle_evict(clock.now(), "bye".into()),
            }
            let d = s.leave(clock.now(), &LeaveFacts::default());
            assert_eq!(d.penalty, None, "{:?}", d.cause);
            assert_eq!(d.close.0, app_code::CLOSE_SHUTDOWN, "{:?}", d.cause);
        }
    }

    #[test]
    fn a_revoked_node_is_told_why_and_closed_with_revoked() {
        let (clock, mut s) = session();
        let r = Revocation {
            code: "token_revoked",
            detail: "the enrolment token was revoked".into(),
        };
        s.handle_kick(clock.now(), Some(&r));
        assert_eq!(
            drain(&mut s),
            [Action::Shutdown {
                reason: "token_revoked: the enrolment token was revoked".into(),
                linger: Linger::UntilRead(REVOKE_GRACE)
            }]
        );
        let facts = LeaveFacts {
            revocation: Some(r),
            sessions_in_use: 2,
            ..Default::default()
        };
        let d = s.leave(clock.now(), &facts);
        assert_eq!(d.close, (app_code::CLOSE_REVOKED, "token_revoked"));
        assert_eq!(d.penalty, None);
    }

    #[test]
    fn a_revoked_node_whose_connection_dropped_first_left_by_revocation() {
        let (clock, mut s) = session();
        s.handle_connection_lost(clock.now());
        let facts = LeaveFacts {
            revocation: Some(Revocation {
                code: "operator_suspended",
                detail: String::new(),
            }),
            sessions_in_use: 1,
            ..Default::default()
        };
        let d = s.leave(clock.now(), &facts);
        assert_eq!(d.cause, LeaveCause::Revoked);
        assert_eq!(d.penalty, None);
    }

    #[test]
    fn a_refused_path_is_told_then_closed_at_once_and_penalised() {
        let (clock, mut s) = session();
        s.handle_heartbeat(clock.now(), &hb(1, 1));
        assert_eq!(s.poll_action(), Some(Action::CheckPath));
        s.handle_path_refused(clock.now(), "moved".into());
        assert_eq!(
            drain(&mut s),
            [
                Action::Shutdown {
                    reason: "moved".into(),
                    linger: Linger::Within(PATH_REFUSED_GRACE)
                },
                Action::Close {
                    code: app_code::CLOSE_PATH_REFUSED,
                    reason: "path_refused"
                }
            ]
        );
        let d = s.leave(clock.now(), &LeaveFacts::default());
        assert_eq!(d.close.0, app_code::CLOSE_PATH_REFUSED);
        assert_eq!(d.penalty.unwrap().defer, None);
    }

    #[test]
    fn the_path_is_checked_on_every_heartbeat_and_every_interval() {
        let (clock, mut s) = session();
        let t0 = clock.now();
        s.handle_heartbeat(t0, &hb(1, 0));
        assert_eq!(s.poll_action(), Some(Action::CheckPath));
        drain(&mut s);
        assert_eq!(
            s.poll_timeout().min(t0 + rules().path_check),
            s.poll_timeout()
        );
        clock.advance(rules().path_check);
        s.handle_timeout(clock.now());
        assert!(drain(&mut s).contains(&Action::CheckPath));
    }

    #[test]
    fn a_protocol_error_closes_with_close_protocol_and_is_the_nodes_fault() {
        let (clock, mut s) = session();
        s.handle_heartbeat(clock.now(), &hb(1, 1));
        s.handle_protocol_error(clock.now());
        let d = s.leave(clock.now(), &LeaveFacts::default());
        assert_eq!(d.close.0, app_code::CLOSE_PROTOCOL);
        assert!(d.penalty.is_some());
    }

    #[test]
    fn an_admin_drain_request_is_sent_and_stops_new_routing() {
        let (clock, mut s) = session();
        s.handle_drain_request(clock.now(), 30_000);
        assert_eq!(
            drain(&mut s),
            [
                Action::State(NodeState::Draining),
                Action::Send(Message::Drain(Drain {
                    deadline_ms: 30_000
                }))
            ]
        );
    }

    #[test]
    fn a_non_finite_load_counts_as_full_and_loads_are_clamped() {
        let (clock, mut s) = session();
        let mut h = hb(1, 0);
        h.load = f32::NAN;
        h.gpu_util = Some(f32::INFINITY);
        s.handle_heartbeat(clock.now(), &h);
        let report = drain(&mut s).into_iter().find_map(|a| match a {
            Action::Report(r) => Some(r),
            _ => None,
        });
        let r = report.unwrap();
        assert_eq!((r.load, r.gpu_util), (1.0, None));
        h.load = 7.0;
        s.handle_heartbeat(clock.now(), &h);
        assert!(drain(&mut s).contains(&Action::Report(Report {
            load: 1.0,
            sessions: 0,
            queue_depth: 0,
            gpu_util: None,
            encoder_ms_p50: None
        })));
    }

    #[test]
    fn nothing_happens_after_the_session_ended() {
        let (clock, mut s) = session();
        s.handle_connection_lost(clock.now());
        s.handle_heartbeat(clock.now(), &hb(1, 0));
        s.handle_drain_request(clock.now(), 1);
        s.handle_timeout(clock.now() + Duration::from_secs(100));
        assert_eq!(s.poll_action(), None);
        assert_eq!(s.ended(), Some(LeaveCause::ConnectionLost));
    }
}
