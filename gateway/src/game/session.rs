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
//! * The player may change the picture size and frame rate mid-session (`SetVideo`): a change
//!   within the `[game]` limits and the rate limit ([`MAX_VIDEO_CHANGES_PER_S`]) goes to the
//!   node, which checks it again and confirms or refuses it; only a confirmed change is in
//!   force (the node that resumes a paused session starts at it), and the player hears either
//!   way. A change asked for during a pause is in force at once: the next node starts at it.
//! * Rumble from the serving node reaches the player at most [`MAX_RUMBLES_PER_S`] a second;
//!   the excess is dropped (a vibration a few milliseconds late is worth nothing).
//! * The player ends the session at any time (closed `ok`, left `client_left`, gone
//!   `client_gone`); a revoked key ends it (`key_revoked`); a game that ends on the node ends it
//!   (`ended_by_node`), which is not a failover.

use crate::router::NodeId;
use nearpath_protocol::message::{Rumble, SetVideo, VideoCodec};
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
    SetVideo(SetVideo),
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
    /// The session's size and frame rate are now these: a node that takes the session from
    /// here on opens it with them.
    VideoInForce(SetVideo),
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
    pub video: VideoLimits,
}

impl Rules {
    pub fn from_config(g: &nearpath_config::GameConfig) -> Rules {
        Rules {
            pause_window: Duration::from_millis(g.pause_window_ms),
            checkpoint_every: Duration::from_millis(g.usage_checkpoint_ms.max(1)),
            max_bitrate_kbps: g.max_bitrate_kbps,
            video: VideoLimits::from_config(g),
        }
    }
}

/// The largest picture and frame rate a session may have: the limits a `PlayRequest` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoLimits {
    pub max_width: u32,
    pub max_height: u32,
    pub max_fps: u32,
}

impl VideoLimits {
    pub fn from_config(g: &nearpath_config::GameConfig) -> VideoLimits {
        VideoLimits {
            max_width: g.max_width,
            max_height: g.max_height,
            max_fps: g.max_fps,
        }
    }

    /// Whether a session may run at `width`x`height` and `fps`; the reason it may not.
    pub fn check(&self, width: u32, height: u32, fps: u32) -> Result<(), String> {
        if !width.is_multiple_of(2) || !height.is_multiple_of(2) || width < 16 || height < 16 {
            return Err(format!("{width}x{height} must be even and at least 16x16"));
        }
        if width > self.max_width || height > self.max_height {
            return Err(format!(
                "{width}x{height} exceeds the limit {}x{}",
                self.max_width, self.max_height
            ));
        }
        if fps == 0 || fps > self.max_fps {
            return Err(format!("{fps} fps is outside 1..={}", self.max_fps));
        }
        Ok(())
    }
}

/// Video changes a player may ask for in any one second; the excess is refused (the player is
/// told, and the session goes on unchanged). A page following its window size sends at most a
/// few (it debounces), and each change costs the node a new encoder.
pub const MAX_VIDEO_CHANGES_PER_S: usize = 4;

/// Rumble messages relayed to a player in any one second; the excess is dropped.
pub const MAX_RUMBLES_PER_S: usize = 30;

/// A sliding one-second window of events, admitting at most `max` in it.
#[derive(Debug, Default)]
struct PerSecond {
    times: VecDeque<Instant>,
}

impl PerSecond {
    fn admit(&mut self, now: Instant, max: usize) -> bool {
        while self
            .times
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= Duration::from_secs(1))
        {
            self.times.pop_front();
        }
        if self.times.len() >= max {
            return false;
        }
        self.times.push_back(now);
        true
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
    /// Video changes sent to the serving node and not yet answered, oldest first.
    video_pending: VecDeque<SetVideo>,
    video_changes: PerSecond,
    rumbles: PerSecond,
    totals: Totals,
    segments: u32,
    gpu_seconds: f64,
    next_checkpoint: Instant,
    actions: VecDeque<Action>,
    /// The last attach failed because no node left encodes the session's codec (the client
    /// negotiated it once; there is no renegotiation), so the end says so.
    codec_missing: Option<VideoCodec>,
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
            video_pending: VecDeque::new(),
            video_changes: PerSecond::default(),
            rumbles: PerSecond::default(),
            totals: Totals::default(),
            segments: 1,
            gpu_seconds: 0.0,
            next_checkpoint: now + rules.checkpoint_every,
            actions: VecDeque::new(),
            codec_missing: None,
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
        let what = match self.codec_missing {
            Some(codec) => format!("no node that encodes {codec} (the session's codec)"),
            None => "no node".to_string(),
        };
        self.actions.push_back(Action::Notify(Notice::Ended(format!(
            "{what} available within {}",
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
                Some(ClientEvent::SetVideo(v)) => {
                    if self.admit_video(now, v) {
                        self.video_pending.push_back(v);
                        self.actions
                            .push_back(Action::ToNode(NodeCommand::SetVideo(v)));
                    }
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
                    // No node to ask: the next one opens the session at the new size.
                    Some(ClientEvent::SetVideo(v)) => {
                        if self.admit_video(now, v) {
                            self.actions.push_back(Action::VideoInForce(v));
                            self.actions
                                .push_back(Action::Notify(Notice::VideoChanged(v)));
                        }
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

    /// Checks a player's video change against the limits and the rate limit; a refused one is
    /// answered here.
    fn admit_video(&mut self, now: Instant, v: SetVideo) -> bool {
        let verdict = self
            .rules
            .video
            .check(v.width, v.height, v.fps)
            .and_then(|()| {
                if self.video_changes.admit(now, MAX_VIDEO_CHANGES_PER_S) {
                    Ok(())
                } else {
                    Err(format!(
                        "too many video changes: at most {MAX_VIDEO_CHANGES_PER_S} a second"
                    ))
                }
            });
        match verdict {
            Ok(()) => true,
            Err(reason) => {
                self.actions
                    .push_back(Action::Notify(Notice::VideoRefused(reason)));
                false
            }
        }
    }

    /// The serving node confirmed a video change. Only a change this session asked for and
    /// within the limits counts: a node cannot resize a session on its own.
    pub fn handle_node_video(&mut self, v: SetVideo) {
        if !matches!(self.state, State::Serving(_)) {
            return;
        }
        let Some(i) = self.video_pending.iter().position(|p| *p == v) else {
            return;
        };
        // Answers come in order: the ones before it were overtaken.
        self.video_pending.drain(..=i);
        if self.rules.video.check(v.width, v.height, v.fps).is_ok() {
            self.actions.push_back(Action::VideoInForce(v));
            self.actions
                .push_back(Action::Notify(Notice::VideoChanged(v)));
        }
    }

    /// The serving node refused the oldest video change not yet answered.
    pub fn handle_node_video_refused(&mut self, reason: String) {
        if !matches!(self.state, State::Serving(_)) {
            return;
        }
        if self.video_pending.pop_front().is_some() {
            self.actions
                .push_back(Action::Notify(Notice::VideoRefused(reason)));
        }
    }

    /// The serving node asks for a vibration: passed on within the rate limit.
    pub fn handle_node_rumble(&mut self, now: Instant, r: Rumble) {
        if matches!(self.state, State::Serving(_)) && self.rumbles.admit(now, MAX_RUMBLES_PER_S) {
            self.actions.push_back(Action::Notify(Notice::Rumble(r)));
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
        for _ in self.video_pending.drain(..) {
            self.actions.push_back(Action::Notify(Notice::VideoRefused(
                "the node was lost before the change took effect; ask again".into(),
            )));
        }
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
        self.codec_missing = None;
        self.handle_attach_failed_inner(now);
    }

    /// The attach found nodes for the game, but none of those left encodes `codec`, the codec
    /// the client negotiated: frames in another codec would not decode, so the session waits
    /// for one that does and otherwise ends saying why.
    pub fn handle_attach_failed_for_codec(&mut self, now: Instant, codec: VideoCodec) {
        self.codec_missing = Some(codec);
        self.handle_attach_failed_inner(now);
    }

    fn handle_attach_failed_inner(&mut self, now: Instant) {
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
            video: VideoLimits {
                max_width: 1920,
                max_height: 1080,
                max_fps: 120,
            },
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

    /// Guards failover of an AV1 or HEVC session: when only nodes without its codec are left,
    /// it ends naming the codec rather than resuming in another one.
    #[test]
    fn no_node_with_the_sessions_codec_ends_it_naming_the_codec() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        s.handle_node_lost(t0);
        s.handle_attach_failed_for_codec(t0 + ms(5), VideoCodec::Av1);
        drain(&mut s);
        s.handle_timeout(t0 + WINDOW);
        let a = drain(&mut s);
        assert!(a.contains(&Action::Notify(Notice::Ended(
            "no node that encodes av1 (the session's codec) available within 5 s".into()
        ))));
        assert_eq!(ended(&a), Some("node_lost"));
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

    fn video(width: u32, height: u32, fps: u32) -> SetVideo {
        SetVideo { width, height, fps }
    }

    fn refused(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Notify(Notice::VideoRefused(r)) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_video_change_goes_to_the_node_and_is_in_force_only_once_the_node_confirms_it() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        let v = video(1920, 1080, 60);
        s.handle_client(t0, Some(ClientEvent::SetVideo(v)));
        assert_eq!(
            drain(&mut s),
            vec![Action::ToNode(NodeCommand::SetVideo(v))]
        );
        // A confirmation of something never asked for is ignored: a node cannot resize a
        // session on its own.
        s.handle_node_video(video(640, 360, 30));
        assert!(drain(&mut s).is_empty());
        s.handle_node_video(v);
        assert_eq!(
            drain(&mut s),
            vec![
                Action::VideoInForce(v),
                Action::Notify(Notice::VideoChanged(v))
            ]
        );
        // Answered once: a second confirmation changes nothing.
        s.handle_node_video(v);
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn a_video_change_the_node_refuses_is_reported_and_changes_nothing() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        s.handle_client(t0, Some(ClientEvent::SetVideo(video(1280, 720, 30))));
        drain(&mut s);
        s.handle_node_video_refused("fixed-size source".into());
        assert_eq!(
            drain(&mut s),
            vec![Action::Notify(Notice::VideoRefused(
                "fixed-size source".into()
            ))]
        );
        // A refusal with nothing pending is not passed on.
        s.handle_node_video_refused("again".into());
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn hostile_video_changes_are_refused_with_a_reason_and_the_session_goes_on() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        for (v, why) in [
            (video(0, 0, 60), "at least 16x16"),
            (video(99_999, 99_999, 60), "even"),
            (video(99_998, 99_998, 60), "exceeds the limit 1920x1080"),
            (video(1281, 720, 60), "even"),
            (video(1280, 721, 60), "even"),
            (video(1280, 720, 0), "outside 1..=120"),
            (video(1280, 720, 1000), "outside 1..=120"),
            (video(u32::MAX - 1, u32::MAX - 1, u32::MAX), "exceeds"),
        ] {
            s.handle_client(t0, Some(ClientEvent::SetVideo(v)));
            let a = drain(&mut s);
            let r = refused(&a);
            assert_eq!(r.len(), 1, "{v:?}: {a:?}");
            assert!(r[0].contains(why), "{v:?}: {}", r[0]);
            assert!(!a.iter().any(|a| matches!(a, Action::ToNode(_))), "{v:?}");
        }
        assert!(!s.is_ended());
    }

    #[test]
    fn a_flood_of_video_changes_is_cut_to_the_rate_limit_and_the_excess_refused() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        let mut sent = 0;
        let mut refusals = 0;
        for i in 0..100u32 {
            s.handle_client(
                t0 + ms(u64::from(i)),
                Some(ClientEvent::SetVideo(video(640 + 2 * (i % 8), 360, 30))),
            );
            let a = drain(&mut s);
            sent += a
                .iter()
                .filter(|a| matches!(a, Action::ToNode(NodeCommand::SetVideo(_))))
                .count();
            let r = refused(&a);
            if let Some(r) = r.first() {
                assert!(r.contains("too many video changes"), "{r}");
            }
            refusals += r.len();
        }
        assert_eq!(
            (sent, refusals),
            (MAX_VIDEO_CHANGES_PER_S, 100 - MAX_VIDEO_CHANGES_PER_S)
        );
        // A second later the player may change it again.
        s.handle_client(
            t0 + ms(1_000),
            Some(ClientEvent::SetVideo(video(1280, 720, 60))),
        );
        assert_eq!(
            drain(&mut s),
            vec![Action::ToNode(NodeCommand::SetVideo(video(1280, 720, 60)))]
        );
    }

    #[test]
    fn a_video_change_during_a_pause_is_in_force_for_the_node_that_resumes() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        // One pending at the loss: the player hears it did not take effect.
        s.handle_client(t0, Some(ClientEvent::SetVideo(video(1280, 720, 60))));
        drain(&mut s);
        s.handle_node_lost(t0 + ms(1));
        let a = drain(&mut s);
        assert_eq!(refused(&a).len(), 1, "{a:?}");
        let v = video(1920, 1080, 60);
        s.handle_client(t0 + ms(2), Some(ClientEvent::SetVideo(v)));
        assert_eq!(
            drain(&mut s),
            vec![
                Action::VideoInForce(v),
                Action::Notify(Notice::VideoChanged(v))
            ]
        );
        // A stale confirmation from the lost node's stream does nothing.
        s.handle_node_video(video(1280, 720, 60));
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn rumble_reaches_the_player_at_most_thirty_times_a_second() {
        let t0 = Instant::now();
        let mut s = GameSession::new(t0, rules(), node(1, "de-1"));
        let r = Rumble {
            pad: 0,
            strong_magnitude: 1,
            weak_magnitude: 2,
            duration_ms: 100,
        };
        for i in 0..100 {
            s.handle_node_rumble(t0 + ms(i), r);
        }
        let a = drain(&mut s);
        assert_eq!(a.len(), MAX_RUMBLES_PER_S);
        assert!(a.iter().all(|a| *a == Action::Notify(Notice::Rumble(r))));
        s.handle_node_rumble(t0 + ms(1_000), r);
        assert_eq!(drain(&mut s).len(), 1);
        // Nothing while paused: no node serves the session.
        s.handle_node_lost(t0 + ms(1_001));
        drain(&mut s);
        s.handle_node_rumble(t0 + ms(3_000), r);
        assert!(drain(&mut s).is_empty());
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
