//! The rules of one game session as a sans-IO state machine: the driver (`super::drive`) feeds
//! what happened with the time it happened (`handle_*(now, ..)`) and executes what the machine
//! asks for (`poll_action`), sleeping until `poll_timeout`. Nothing here does I/O or reads a
//! clock, so tests drive it with a virtual clock.
//!
//! The rules:
//! * A session serves from one node at a time. When that node's connection or session stream
//!   dies the session pauses (the player is told, and keeps its connection), the lost node's
//!   share of the bill is closed, and a node is looked for at once and again on every registry
//!   change, for at most the pause window.
//! * The search excludes the *registrations* that failed the session, never node ids: the same
//!   node reconnecting registers anew and may take the session back.
//! * A node found resumes the session: it is asked for a keyframe and given the bitrate the
//!   player asked for last; the player is told. No node by the end of the window ends the
//!   session (`node_lost`) with a reason that says how long it waited.
//! * Each node's share is its own usage segment, GPU-seconds measured from when it took the
//!   session to when it was lost or the session ended, counted once; paused time is billed to
//!   nobody. The open segment is checkpointed every checkpoint interval.
//! * The player ends the session at any time (closed `ok`, left `client_left`, gone
//!   `client_gone`); a revoked key ends it (`key_revoked`); a game that ends on the node ends it
//!   (`ended_by_node`), which is not a failover.

use crate::router::NodeId;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The node serving a session, as the rules see it: its registration and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRef {
    /// The registration (one per connection): what a failover excludes.
    pub key: NodeId,
    /// The node's id, the same across its registrations.
    pub id: String,
    pub operator_id: String,
}

/// Frames and bytes the relay has forwarded for the session so far (counters that only grow).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub frames: u64,
    pub bytes: u64,
}

/// What the player side did.
pub use super::ClientEvent;
/// What the player side is told.
pub use super::Notice;

/// What the driver must send the serving node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeCommand {
    ForceKeyframe,
    SetBitrate(u32),
    /// Ends the node's session and finishes the stream. `bounded`: a node that does not read
    /// its session stream must not hold the session open, so past a short bound the stream is
    /// reset instead.
    Close {
        reason: String,
        bounded: bool,
    },
}

/// One node's share of a session, as a usage row: `index` 1 for the first node, n for the n-th.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageSegment {
    pub index: u32,
    pub node: NodeRef,
    /// The gateway's own clock: from when this node took the session to now.
    pub gpu_seconds: f64,
    pub frames: u64,
    pub bytes: u64,
    /// `in_progress` for a checkpoint, else the segment's final outcome.
    pub outcome: &'static str,
}

impl UsageSegment {
    /// Whether this is the segment's last write.
    pub fn is_final(&self) -> bool {
        self.outcome != "in_progress"
    }
}

/// What the machine asks the driver to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Look for a node (route, open, wait for its answer) and report with
    /// [`GameSession::handle_attached`] or [`GameSession::handle_attach_failed`].
    Attach {
        exclude: Vec<NodeId>,
    },
    /// Send to the node serving the session.
    ToNode(NodeCommand),
    /// The node whose frames the relay accepts now (`None` during a pause).
    Serve(Option<NodeRef>),
    Notify(Notice),
    /// Write (or rewrite in place) a segment's usage row.
    Usage(UsageSegment),
    /// A pause ended: `same_node`, `other_node`, `expired` or `ended` (a metric label).
    PauseEnded(&'static str),
    /// The session moved to a node after a pause.
    Failover {
        node: NodeRef,
        same_node: bool,
        paused: Duration,
    },
    /// The session is over; nothing else follows.
    Ended {
        outcome: &'static str,
        gpu_seconds: f64,
        segments: u32,
    },
}

/// The rules' settings, from `[game]`.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub pause_window: Duration,
    pub checkpoint_every: Duration,
    pub max_bitrate_kbps: u32,
}

impl Rules {
    pub fn from_config(g: &nearpath_config::GameConfig) -> Rules {
        Rules {
            pause_window: Duration::from_millis(g.pause_window_ms),
            checkpoint_every: Duration::from_millis(g.usage_checkpoint_ms.max(1)),
            max_bitrate_kbps: g.max_bitrate_kbps,
        }
    }
}

/// The lowest bitrate a player may ask for, kbit/s.
pub const MIN_PLAYER_BITRATE_KBPS: u32 = 100;

struct Segment {
    node: NodeRef,
    index: u32,
    since: Instant,
    at_start: Totals,
}

enum State {
    Serving(Segment),
    Paused {
        lost: NodeRef,
        since: Instant,
        deadline: Instant,
        /// An attach is in flight: the window does not cut it off (it has its own bound);
        /// expiry is judged when it fails.
        attaching: bool,
        /// The registry changed while an attach was in flight: try again when it fails.
        changed: bool,
    },
    Ended,
}

/// One game session's rules.
pub struct GameSession {
    rules: Rules,
    state: State,
    /// Registrations (not node ids) that failed this session.
    failed: Vec<NodeId>,
    /// The bitrate the player asked for last, re-applied on the node that resumes the session.
    bitrate: Option<u32>,
    totals: Totals,
    segments: u32,
    gpu_seconds: f64,
    next_checkpoint: Instant,
    actions: VecDeque<Action>,
}

/// "5 s", "2.5 s": a window for people.
pub fn seconds(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

impl GameSession {
    /// A session that `node` has just taken (the first attach is the start's business).
    pub fn new(now: Instant, rules: Rules, node: NodeRef) -> GameSession {
        GameSession {
            rules,
            state: State::Serving(Segment {
                node,
                index: 1,
                since: now,
                at_start: Totals::default(),
            }),
            failed: Vec::new(),
            bitrate: None,
            totals: Totals::default(),
            segments: 1,
            gpu_seconds: 0.0,
            next_checkpoint: now + rules.checkpoint_every,
            actions: VecDeque::new(),
        }
    }

    /// The relay's counters as of now; read into the segment that is open.
    pub fn observe(&mut self, totals: Totals) {
        self.totals = totals;
    }

    /// The next thing to do, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Self::handle_timeout`] is due: the next checkpoint while serving, the end of the
    /// window while paused and not attaching.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Serving(_) => Some(self.next_checkpoint),
            State::Paused {
                deadline,
                attaching: false,
                ..
            } => Some(*deadline),
            _ => None,
        }
    }

    pub fn is_ended(&self) -> bool {
        matches!(self.state, State::Ended)
    }

    pub fn is_paused(&self) -> bool {
        matches!(self.state, State::Paused { .. })
    }

    /// The node serving now, if any.
    pub fn serving(&self) -> Option<&NodeRef> {
        match &self.state {
            State::Serving(s) => Some(&s.node),
            _ => None,
        }
    }

    fn segment_row(&self, seg: &Segment, now: Instant, outcome: &'static str) -> UsageSegment {
        UsageSegment {
            index: seg.index,
            node: seg.node.clone(),
            gpu_seconds: now.saturating_duration_since(seg.since).as_secs_f64(),
            frames: self.totals.frames.saturating_sub(seg.at_start.frames),
            bytes: self.totals.bytes.saturating_sub(seg.at_start.bytes),
            outcome,
        }
    }

    /// Ends the session: the open segment gets its final row (GPU-seconds counted once, here).
    fn end(&mut self, now: Instant, outcome: &'static str) {
        if let State::Serving(seg) = &self.state {
            let row = self.segment_row(seg, now, outcome);
            self.gpu_seconds += row.gpu_seconds;
            self.actions.push_back(Action::Usage(row));
        }
        self.state = State::Ended;
        self.actions.push_back(Action::Ended {
            outcome,
            gpu_seconds: self.gpu_seconds,
            segments: self.segments,
        });
    }

    /// Timers: a checkpoint of the open segment, or the end of the pause window.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.state {
            State::Serving(seg) if now >= self.next_checkpoint => {
                let row = self.segment_row(seg, now, "in_progress");
                self.actions.push_back(Action::Usage(row));
                self.next_checkpoint = now + self.rules.checkpoint_every;
            }
            State::Paused {
                deadline,
                attaching: false,
                ..
            } if now >= *deadline => self.expire(now),
            _ => {}
        }
    }

    fn expire(&mut self, now: Instant) {
        self.actions.push_back(Action::PauseEnded("expired"));
        self.actions.push_back(Action::Notify(Notice::Ended(format!(
            "no node available within {}",
            seconds(self.rules.pause_window)
        ))));
        self.end(now, "node_lost");
    }

    /// Something the player side did.
    pub fn handle_client(&mut self, now: Instant, ev: Option<ClientEvent>) {
        match &self.state {
            State::Ended => {}
            State::Serving(_) => match ev {
                Some(ClientEvent::ForceKeyframe) => self
                    .actions
                    .push_back(Action::ToNode(NodeCommand::ForceKeyframe)),
                Some(ClientEvent::SetBitrate(kbps)) => {
                    let kbps = self.clamp_bitrate(kbps);
                    self.bitrate = Some(kbps);
                    self.actions
                        .push_back(Action::ToNode(NodeCommand::SetBitrate(kbps)));
                }
                Some(ClientEvent::Close(reason)) => self.close_node(now, reason, "ok"),
                Some(ClientEvent::Lost) => {
                    self.close_node(now, "client gone".into(), "client_gone")
                }
                Some(ClientEvent::Gone) | None => {
                    self.close_node(now, "client left".into(), "client_left")
                }
            },
            State::Paused { .. } => {
                let outcome = match ev {
                    // The next node starts with a keyframe anyway.
                    Some(ClientEvent::ForceKeyframe) => return,
                    Some(ClientEvent::SetBitrate(kbps)) => {
                        self.bitrate = Some(self.clamp_bitrate(kbps));
                        return;
                    }
                    Some(ClientEvent::Close(_)) => "ok",
                    Some(ClientEvent::Gone) | None => "client_left",
                    Some(ClientEvent::Lost) => "client_gone",
                };
                self.actions.push_back(Action::PauseEnded("ended"));
                self.end(now, outcome);
            }
        }
    }

    fn clamp_bitrate(&self, kbps: u32) -> u32 {
        kbps.clamp(
            MIN_PLAYER_BITRATE_KBPS,
            self.rules.max_bitrate_kbps.max(MIN_PLAYER_BITRATE_KBPS),
        )
    }

    fn close_node(&mut self, now: Instant, reason: String, outcome: &'static str) {
        self.actions.push_back(Action::ToNode(NodeCommand::Close {
            reason,
            bounded: false,
        }));
        self.end(now, outcome);
    }

    /// The key the session is billed to was revoked.
    pub fn handle_revoked(&mut self, now: Instant) {
        match &self.state {
            State::Ended => return,
            State::Serving(_) => self.actions.push_back(Action::ToNode(NodeCommand::Close {
                reason: "key_revoked".into(),
                bounded: true,
            })),
            State::Paused { .. } => self.actions.push_back(Action::PauseEnded("ended")),
        }
        self.actions
            .push_back(Action::Notify(Notice::Ended("key_revoked".into())));
        self.end(now, "key_revoked");
    }

    /// The game ended on the node (an external source exited): not a node failure.
    pub fn handle_node_ended(&mut self, now: Instant, reason: String) {
        if let State::Serving(_) = self.state {
            self.actions
                .push_back(Action::Notify(Notice::Ended(reason)));
            self.end(now, "ended_by_node");
        }
    }

    /// The serving node's connection or session stream died.
    pub fn handle_node_lost(&mut self, now: Instant) {
        let State::Serving(seg) = &self.state else {
            return;
        };
        let row = self.segment_row(seg, now, "node_lost");
        let lost = seg.node.clone();
        self.gpu_seconds += row.gpu_seconds;
        self.failed.push(lost.key);
        self.actions.push_back(Action::Serve(None));
        self.actions.push_back(Action::Usage(row));
        self.actions
            .push_back(Action::Notify(Notice::Paused(format!(
                "node {} was lost; waiting up to {} for a node",
                lost.id,
                seconds(self.rules.pause_window)
            ))));
        self.state = State::Paused {
            lost,
            since: now,
            deadline: now + self.rules.pause_window,
            attaching: true,
            changed: false,
        };
        self.actions.push_back(Action::Attach {
            exclude: self.failed.clone(),
        });
    }

    /// The registry changed (a registration, a freed slot, a slow node recovering): a paused
    /// session looks for a node again.
    pub fn handle_registry_changed(&mut self, now: Instant) {
        let failed = self.failed.clone();
        if let State::Paused {
            deadline,
            attaching,
            changed,
            ..
        } = &mut self.state
        {
            if *attaching {
                *changed = true;
            } else if now < *deadline {
                *attaching = true;
                self.actions.push_back(Action::Attach { exclude: failed });
            }
        }
    }

    /// The attach asked for found no node.
    pub fn handle_attach_failed(&mut self, now: Instant) {
        let failed = self.failed.clone();
        let State::Paused {
            deadline,
            attaching,
            changed,
            ..
        } = &mut self.state
        else {
            return;
        };
        *attaching = false;
        if now >= *deadline {
            self.expire(now);
        } else if std::mem::take(changed) {
            *attaching = true;
            self.actions.push_back(Action::Attach { exclude: failed });
        }
    }

    /// The attach asked for found `node`, which has taken the session.
    pub fn handle_attached(&mut self, now: Instant, node: NodeRef) {
        let State::Paused { lost, since, .. } = &self.state else {
            return;
        };
        let same_node = node.id == lost.id;
        let paused = now.saturating_duration_since(*since);
        self.segments += 1;
        self.actions.push_back(Action::PauseEnded(if same_node {
            "same_node"
        } else {
            "other_node"
        }));
        self.actions.push_back(Action::Serve(Some(node.clone())));
        self.actions
            .push_back(Action::ToNode(NodeCommand::ForceKeyframe));
        if let Some(kbps) = self.bitrate {
            self.actions
                .push_back(Action::ToNode(NodeCommand::SetBitrate(kbps)));
        }
        self.actions.push_back(Action::Failover {
            node: node.clone(),
            same_node,
            paused,
        });
        self.actions.push_back(Action::Notify(Notice::Resumed));
        self.state = State::Serving(Segment {
            node,
            index: self.segments,
            since: now,
            at_start: self.totals,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(5);
    const CHECKPOINT: Duration = Duration::from_secs(10);

    fn rules() -> Rules {
        Rules {
            pause_window: WINDOW,
            checkpoint_every: CHECKPOINT,
            max_bitrate_kbps: 20_000,
        }
    }

    fn node(key: u64, id: &str) -> NodeRef {
        NodeRef {
            key: NodeId(key),
            id: id.into(),
            operator_id: "op".into(),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn drain(s: &mut GameSession) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn usage(actions: &[Action]) -> Vec<UsageSegment> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Usage(u) => Some(u.clone()),
                _ => None,
            })
            .collect()
    }

    fn ended(actions: &[Action]) -> Option<&'static str> {
        actions.iter().find_map(|a| match a {
            Action::Ended { outcome, .. } => Some(*outcome),
            _ => None,
        })
    }

    #[test]
    fn a_lost_node_pauses_the_session_and_the_same_node_registering_again_resumes_it() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        s.handle_node_lost(t0 + ms(1_000));
        let a = drain(&mut s);
        assert!(a.contains(&Action::Serve(None)));
        assert!(a.iter().any(|a| matches!(a, Action::Notify(Notice::Paused(r)) if r.contains("de-1") && r.contains("5 s"))));
        assert_eq!(
            a.last(),
            Some(&Action::Attach {
                exclude: vec![NodeId(1)]
            })
        );
        assert!(s.is_paused());
        s.handle_attach_failed(t0 + ms(1_010));
        assert!(drain(&mut s).is_empty(), "no polling: wait for a change");
        // The node reconnects: a new registration of the same id.
        s.handle_registry_changed(t0 + ms(2_000));
        assert_eq!(
            drain(&mut s),
            vec![Action::Attach {
                exclude: vec![NodeId(1)]
            }]
        );
        s.handle_attached(t0 + ms(2_050), node(2, "de-1"));
        let a = drain(&mut s);
        assert_eq!(a[0], Action::PauseEnded("same_node"));
        assert!(a.contains(&Action::Serve(Some(node(2, "de-1")))));
        assert!(a.contains(&Action::ToNode(NodeCommand::ForceKeyframe)));
        assert!(a.iter().any(|a| matches!(a, Action::Failover { same_node: true, paused, .. } if *paused == ms(1_050))));
        assert_eq!(a.last(), Some(&Action::Notify(Notice::Resumed)));
        assert_eq!(s.serving(), Some(&node(2, "de-1")));
    }

    #[test]
    fn no_node_within_the_pause_window_ends_the_session_saying_how_long_it_waited() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        s.handle_node_lost(t0);
        s.handle_attach_failed(t0 + ms(5));
        drain(&mut s);
        assert_eq!(s.poll_timeout(), Some(t0 + WINDOW));
        s.handle_timeout(t0 + WINDOW - ms(1));
        assert!(drain(&mut s).is_empty());
        s.handle_timeout(t0 + WINDOW);
        let a = drain(&mut s);
        assert_eq!(a[0], Action::PauseEnded("expired"));
        assert!(a.contains(&Action::Notify(Notice::Ended(
            "no node available within 5 s".into()
        ))));
        assert_eq!(ended(&a), Some("node_lost"));
        assert!(s.is_ended());
        // A change after the end starts nothing.
        s.handle_registry_changed(t0 + WINDOW + ms(1));
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn an_attach_in_flight_at_the_end_of_the_window_may_still_resume_the_session() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        s.handle_node_lost(t0);
        drain(&mut s);
        assert_eq!(s.poll_timeout(), None, "the attach has its own bound");
        s.handle_attached(t0 + WINDOW + ms(100), node(3, "fr-1"));
        let a = drain(&mut s);
        assert_eq!(a[0], Action::PauseEnded("other_node"));
        assert!(!s.is_ended());
    }

    #[test]
    fn a_registry_change_during_an_attach_makes_a_failed_attach_try_again() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        s.handle_node_lost(t0);
        drain(&mut s);
        s.handle_registry_changed(t0 + ms(10));
        assert!(drain(&mut s).is_empty(), "one attach at a time");
        s.handle_attach_failed(t0 + ms(20));
        assert_eq!(
            drain(&mut s),
            vec![Action::Attach {
                exclude: vec![NodeId(1)]
            }]
        );
    }

    #[test]
    fn failover_excludes_every_failed_registration_but_not_the_node_id() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        s.handle_node_lost(t0 + ms(100));
        drain(&mut s);
        s.handle_attached(t0 + ms(200), node(2, "fr-1"));
        drain(&mut s);
        s.handle_node_lost(t0 + ms(300));
        let a = drain(&mut s);
        // Both registrations that failed are excluded; de-1 registering again is key 3, not 1.
        assert_eq!(
            a.last(),
            Some(&Action::Attach {
                exclude: vec![NodeId(1), NodeId(2)]
            })
        );
        s.handle_attached(t0 + ms(400), node(3, "de-1"));
        assert_eq!(drain(&mut s)[0], Action::PauseEnded("other_node"));
    }

    #[test]
    fn a_node_that_refused_during_a_pause_is_not_excluded_from_the_next_attempt() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        s.handle_node_lost(t0);
        drain(&mut s);
        // Every candidate refused or was full: only a node that failed the session is excluded.
        s.handle_attach_failed(t0 + ms(100));
        s.handle_registry_changed(t0 + ms(200));
        assert_eq!(
            drain(&mut s),
            vec![Action::Attach {
                exclude: vec![NodeId(1)]
            }]
        );
        // The window keeps running through failed attempts.
        s.handle_attach_failed(t0 + WINDOW);
        assert_eq!(ended(&drain(&mut s)), Some("node_lost"));
    }

    #[test]
    fn each_node_gets_one_usage_record_for_the_time_it_served_and_paused_time_is_billed_to_nobody()
    {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        s.observe(Totals {
            frames: 60,
            bytes: 6_000,
        });
        s.handle_node_lost(t0 + ms(2_000));
        let first = usage(&drain(&mut s));
        s.handle_attach_failed(t0 + ms(2_001));
        s.handle_registry_changed(t0 + ms(3_000));
        drain(&mut s);
        s.handle_attached(t0 + ms(3_000), node(2, "fr-1"));
        drain(&mut s);
        s.observe(Totals {
            frames: 90,
            bytes: 9_500,
        });
        s.handle_client(t0 + ms(7_000), Some(ClientEvent::Close("bye".into())));
        let a = drain(&mut s);
        let second = usage(&a);
        assert_eq!(first.len(), 1);
        assert_eq!(second.len(), 1);
        let (f, g) = (&first[0], &second[0]);
        assert_eq!(
            (f.index, f.node.id.as_str(), f.outcome),
            (1, "de-1", "node_lost")
        );
        assert_eq!((f.gpu_seconds, f.frames, f.bytes), (2.0, 60, 6_000));
        assert_eq!((g.index, g.node.id.as_str(), g.outcome), (2, "fr-1", "ok"));
        assert_eq!((g.gpu_seconds, g.frames, g.bytes), (4.0, 30, 3_500));
        assert!(a.contains(&Action::Ended {
            outcome: "ok",
            gpu_seconds: 6.0,
            segments: 2
        }));
    }

    #[test]
    fn the_open_segment_is_checkpointed_in_progress_every_interval() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        assert_eq!(s.poll_timeout(), Some(t0 + CHECKPOINT));
        s.handle_timeout(t0 + CHECKPOINT - ms(1));
        assert!(drain(&mut s).is_empty());
        s.observe(Totals {
            frames: 600,
            bytes: 1,
        });
        s.handle_timeout(t0 + CHECKPOINT);
        let u = usage(&drain(&mut s));
        assert_eq!(u.len(), 1);
        assert_eq!(
            (u[0].index, u[0].outcome, u[0].frames),
            (1, "in_progress", 600)
        );
        assert!(!u[0].is_final());
        assert_eq!(s.poll_timeout(), Some(t0 + CHECKPOINT * 2));
        // A checkpoint does not count GPU-seconds: the final row does, once.
        s.handle_client(t0 + CHECKPOINT * 2, None);
        assert!(drain(&mut s).contains(&Action::Ended {
            outcome: "client_left",
            gpu_seconds: 20.0,
            segments: 1
        }));
    }

    #[test]
    fn the_bitrate_the_player_asked_for_is_clamped_and_reapplied_on_the_node_that_resumes() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        s.handle_client(t0, Some(ClientEvent::SetBitrate(50_000)));
        assert_eq!(
            drain(&mut s),
            vec![Action::ToNode(NodeCommand::SetBitrate(20_000))]
        );
        s.handle_node_lost(t0 + ms(1));
        drain(&mut s);
        // Asked for during the pause: kept for the next node, sent to nobody now.
        s.handle_client(t0 + ms(2), Some(ClientEvent::SetBitrate(5)));
        s.handle_client(t0 + ms(2), Some(ClientEvent::ForceKeyframe));
        assert!(drain(&mut s).is_empty());
        s.handle_attached(t0 + ms(3), node(2, "fr-1"));
        let a = drain(&mut s);
        let to_node: Vec<_> = a
            .iter()
            .filter_map(|a| match a {
                Action::ToNode(c) => Some(c.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            to_node,
            vec![
                NodeCommand::ForceKeyframe,
                NodeCommand::SetBitrate(MIN_PLAYER_BITRATE_KBPS)
            ]
        );
    }

    #[test]
    fn the_player_ends_the_session_with_its_outcome_serving_or_paused() {
        let t0 = Instant::now();
        for (ev, reason, outcome) in [
            (Some(ClientEvent::Close("x".into())), "x", "ok"),
            (Some(ClientEvent::Gone), "client left", "client_left"),
            (None, "client left", "client_left"),
            (Some(ClientEvent::Lost), "client gone", "client_gone"),
        ] {
            let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
            s.handle_client(t0 + ms(1), ev.clone());
            let a = drain(&mut s);
            assert_eq!(
                a[0],
                Action::ToNode(NodeCommand::Close {
                    reason: reason.into(),
                    bounded: false
                })
            );
            assert_eq!(ended(&a), Some(outcome));

            let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
            s.handle_node_lost(t0 + ms(1));
            drain(&mut s);
            s.handle_client(t0 + ms(2), ev);
            let a = drain(&mut s);
            assert_eq!(a[0], Action::PauseEnded("ended"));
            assert!(usage(&a).is_empty(), "the lost node's row is already final");
            assert_eq!(ended(&a), Some(outcome));
        }
    }

    #[test]
    fn a_revoked_key_ends_the_session_at_once_with_a_bounded_close() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        s.handle_revoked(t0 + ms(10));
        let a = drain(&mut s);
        assert_eq!(
            a[0],
            Action::ToNode(NodeCommand::Close {
                reason: "key_revoked".into(),
                bounded: true
            })
        );
        assert!(a.contains(&Action::Notify(Notice::Ended("key_revoked".into()))));
        assert_eq!(ended(&a), Some("key_revoked"));

        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        s.handle_node_lost(t0);
        drain(&mut s);
        s.handle_revoked(t0 + ms(10));
        let a = drain(&mut s);
        assert_eq!(a[0], Action::PauseEnded("ended"));
        assert_eq!(ended(&a), Some("key_revoked"));
    }

    #[test]
    fn a_game_that_ends_on_the_node_ends_the_session_without_a_failover() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        s.handle_node_ended(t0 + ms(500), "the game exited".into());
        let a = drain(&mut s);
        assert!(!a
            .iter()
            .any(|a| matches!(a, Action::Attach { .. } | Action::ToNode(_))));
        assert_eq!(
            a[0],
            Action::Notify(Notice::Ended("the game exited".into()))
        );
        assert_eq!(usage(&a)[0].outcome, "ended_by_node");
        assert_eq!(ended(&a), Some("ended_by_node"));
    }

    #[test]
    fn a_window_for_people_reads_in_seconds() {
        assert_eq!(seconds(ms(5_000)), "5 s");
        assert_eq!(seconds(ms(2_500)), "2.5 s");
    }
}
