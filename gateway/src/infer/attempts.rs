//! Inference attempts and failover, as a sans-IO state machine.
//!
//! [`InferAttempts`] decides, for one request, which node to try next, when to give up on a
//! node, when to wait for a node to (re)register, and how the request ends. It does no I/O and
//! reads no clock: the driver (`super::InferService::start`) feeds it route results, node events
//! and timeouts with the time they happened (`handle_*(now, ..)`) and executes what
//! [`InferAttempts::poll`] asks for. The rules:
//!
//! - Candidates are tried best first, at most `max_attempts` of them; a node without a free slot
//!   is skipped without counting as an attempt.
//! - Until the first token, any node failure moves to the next candidate (the client has seen
//!   nothing yet); a node that failed is never tried again for the same request.
//! - An error the client caused (a node's `Refused{BadRequest}`, a node error blamed on the
//!   request) is answered at once: another node would fail the same way.
//! - A node that accepted but produces no first token within `first_token_timeout` of the
//!   request's start ends the request (504): its backend is busy with it, so trying another
//!   would double the wait.
//! - A model that no node serves now but one served recently, or whose nodes do not answer, is a
//!   blip: the request waits for a registration until `unavailable_wait` after its start, then
//!   ends with 503 `model_unavailable` (retryable). A model never served is 404.
//! - A request that finds no free slot (every node serving the model at capacity, every
//!   candidate without a slot, or refusing `Busy`) is queued: it waits for a slot
//!   ([`Action::WaitForSlot`]) until `queue_max_wait` after its start, routing again each time
//!   a slot frees for it, and then ends with 429 and `Retry-After`. A full queue is 429 at once.
//!   A `Busy` refusal is an attempt but does not use up `max_attempts` (the node is full, not
//!   failing) and does not exclude the node from later rounds.

use crate::error::{Blame, CoreError};
use crate::router::NodeId;
use nearpath_protocol::message::RefuseCode;
use nearpath_protocol::openai::ApiError;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The limits of the attempts, from `[inference]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub max_attempts: u32,
    /// A node must accept (stream opened, `Accepted` received) within this of being tried.
    pub connect_timeout: Duration,
    /// The first token must arrive within this of the request's start.
    pub first_token_timeout: Duration,
    /// How long, from the request's start, a blip is waited out.
    pub unavailable_wait: Duration,
    /// How long, from the request's start, a request waits in its model's queue for a slot
    /// (zero: saturation is answered at once).
    pub queue_max_wait: Duration,
}

impl Rules {
    pub fn from_config(c: &nearpath_config::InferenceConfig) -> Rules {
        Rules {
            max_attempts: c.max_attempts.max(1),
            connect_timeout: Duration::from_millis(c.connect_timeout_ms),
            first_token_timeout: Duration::from_millis(c.first_token_timeout_ms),
            unavailable_wait: Duration::from_millis(c.unavailable_wait_ms),
            queue_max_wait: Duration::from_millis(c.queue_max_wait_ms),
        }
    }

    /// Opening a stream and the node's `Accepted` (sent before any backend work) share one
    /// deadline: a node that is registered but unreachable (a blip the heartbeats have not shown
    /// yet) costs a request at most this long before the next candidate is tried.
    fn accept_window(&self) -> Duration {
        self.connect_timeout.min(self.first_token_timeout)
    }
}

/// A node routing offered, with its name for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub key: NodeId,
    pub name: String,
}

/// What routing found for the request's model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Eligible nodes, best first.
    Candidates(Vec<Candidate>),
    /// No node serves the model; `recently_served` when one did within the grace window (or
    /// one registered since routing looked).
    NotServed { recently_served: bool },
    /// The geofence denied every node with capacity.
    Denied { rule: String, reason: String },
    /// Every node serving the model is at capacity.
    Saturated,
    /// Every node serving the model is draining.
    Draining,
}

/// What happened on the node being tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// The node had no free slot when the driver asked: skipped, not an attempt.
    NoSlot,
    /// No stream could be opened, or the node's connection ended before it answered: it may be
    /// in a blip.
    Unreachable(CoreError),
    Accepted,
    Refused {
        code: RefuseCode,
        reason: String,
    },
    /// The first token (or an immediate `Done`) arrived: the request is served by this node.
    FirstToken,
    /// The node answered with an error, or broke the protocol, before the first token.
    Failed(CoreError),
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Route the model and call [`InferAttempts::handle_route`].
    Route,
    /// Reserve a slot on `node`, open a stream and send `Open`; report [`NodeEvent`]s.
    /// `failover` is true for every attempt after the first (a metric).
    TryNode { node: NodeId, failover: bool },
    /// Wait for the current node's next event, or call [`InferAttempts::handle_timeout`] at
    /// the deadline.
    WaitForNode(Instant),
    /// Wait for a node to register ([`InferAttempts::handle_join`]), or call
    /// [`InferAttempts::handle_timeout`] at the deadline.
    WaitForJoin(Instant),
    /// Every node is at capacity: queue the request (or keep it queued) and wait for a slot to
    /// free for it ([`InferAttempts::handle_slot`]; [`InferAttempts::handle_queue_full`] if the
    /// queue has no room), or call [`InferAttempts::handle_timeout`] at the deadline.
    WaitForSlot(Instant),
    /// The current node produced its first token: stream the rest from it.
    Serve { node: NodeId, attempts: u32 },
    /// The request ends with this error; nothing was sent to the client yet.
    Fail(CoreError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Routing,
    /// `TryNode` is pending (`announced` false) or was handed out; waiting for `Accepted`.
    Opening {
        node: Candidate,
        accept_by: Instant,
        announced: bool,
    },
    /// `Accepted` came; waiting for the first token.
    Accepted {
        node: Candidate,
        first_by: Instant,
    },
    Joining {
        until: Instant,
    },
    Queued {
        until: Instant,
    },
    Done(Action),
}

/// The attempts of one inference request. See the module docs for the rules.
#[derive(Debug)]
pub struct InferAttempts {
    rules: Rules,
    model: String,
    started: Instant,
    state: State,
    /// Candidates of the current route not tried yet.
    queue: VecDeque<Candidate>,
    /// Nodes that failed this request: never tried again for it.
    excluded: Vec<NodeId>,
    attempts: u32,
    /// The last node failure, answered if nothing better is known.
    last: Option<CoreError>,
    /// The current route found no node for a recently served model.
    route_blip: bool,
    /// Some node did not answer (its stream or `Accepted` never came).
    unreachable: bool,
    /// The request met a blip at some point (metrics: how blip waits end).
    blip_seen: bool,
    /// A node of the current round had no free slot or refused `Busy`.
    round_saturated: bool,
    /// `Busy` refusals so far: attempts that do not count against `max_attempts`.
    busy: u32,
    /// When the request first queued.
    queued_since: Option<Instant>,
}

impl InferAttempts {
    pub fn new(rules: Rules, model: &str, now: Instant) -> InferAttempts {
        InferAttempts {
            rules,
            model: model.to_string(),
            started: now,
            state: State::Routing,
            queue: VecDeque::new(),
            excluded: Vec::new(),
            attempts: 0,
            last: None,
            route_blip: false,
            unreachable: false,
            blip_seen: false,
            round_saturated: false,
            busy: 0,
            queued_since: None,
        }
    }

    /// What the driver does next. Repeats the same answer until an event moves the machine.
    pub fn poll(&mut self) -> Action {
        match &mut self.state {
            State::Routing => Action::Route,
            State::Opening {
                node,
                accept_by,
                announced,
            } => {
                if *announced {
                    Action::WaitForNode(*accept_by)
                } else {
                    *announced = true;
                    Action::TryNode {
                        node: node.key,
                        failover: self.attempts > 1,
                    }
                }
            }
            State::Accepted { first_by, .. } => Action::WaitForNode(*first_by),
            State::Joining { until } => Action::WaitForJoin(*until),
            State::Queued { until } => Action::WaitForSlot(*until),
            State::Done(a) => a.clone(),
        }
    }

    /// Whether the request met a blip (no node, or no node answering) at some point.
    pub fn blip_seen(&self) -> bool {
        self.blip_seen
    }

    /// When the request first waited for a slot, if it did.
    pub fn queued_since(&self) -> Option<Instant> {
        self.queued_since
    }

    /// Attempts made so far (nodes that had a slot for it).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The node being tried or serving the request, if one is: the driver keeps that node's
    /// stream and drops any other.
    pub fn current(&self) -> Option<NodeId> {
        match &self.state {
            State::Opening { node, .. } | State::Accepted { node, .. } => Some(node.key),
            State::Done(Action::Serve { node, .. }) => Some(*node),
            _ => None,
        }
    }

    pub fn handle_route(&mut self, now: Instant, route: Route) {
        if self.state != State::Routing {
            return;
        }
        self.route_blip = false;
        self.round_saturated = false;
        self.queue.clear();
        match route {
            Route::Candidates(c) => self.queue.extend(c),
            Route::NotServed { recently_served } => {
                if !recently_served && self.last.is_none() {
                    return self.fail(CoreError::model_not_found(&self.model));
                }
                self.route_blip = true;
            }
            // A queued request woken for a slot on a node it may not use waits on (the driver
            // passes the slot to the next waiter).
            Route::Denied { .. } if self.queued_since.is_some() => {
                return self.queue_or_fail(now);
            }
            Route::Denied { rule, reason } => {
                return self.fail(CoreError::geofence_denied(&rule, &reason))
            }
            Route::Saturated => return self.queue_or_fail(now),
            Route::Draining => return self.fail(CoreError::no_eligible_node(&self.model)),
        }
        self.next_candidate(now);
    }

    pub fn handle_node(&mut self, now: Instant, node: NodeId, event: NodeEvent) {
        if self.current() != Some(node) || matches!(self.state, State::Done(_)) {
            // A late event of a node already given up on, or of the request already decided.
            return;
        }
        let accepted = matches!(self.state, State::Accepted { .. });
        match event {
            NodeEvent::NoSlot if !accepted => {
                // Not an attempt: the node was full when the driver asked.
                self.attempts = self.attempts.saturating_sub(1);
                self.round_saturated = true;
                self.next_candidate(now);
            }
            NodeEvent::NoSlot => {}
            NodeEvent::Unreachable(e) => {
                self.unreachable = true;
                self.give_up_on(node, e, now);
            }
            NodeEvent::Accepted if !accepted => {
                let State::Opening { node, .. } =
                    std::mem::replace(&mut self.state, State::Routing)
                else {
                    return;
                };
                self.state = State::Accepted {
                    node,
                    first_by: self.started + self.rules.first_token_timeout,
                };
            }
            NodeEvent::Accepted => {}
            NodeEvent::Refused { code, reason } => {
                let name = self.current_name();
                match code {
                    RefuseCode::BadRequest => {
                        self.fail(CoreError::from_api(&ApiError::bad_request(reason, None)))
                    }
                    RefuseCode::Busy => {
                        // Full, not failing: the node may take the request from the queue.
                        self.busy += 1;
                        self.round_saturated = true;
                        self.last = Some(
                            CoreError::unavailable(format!("node {name} refused: {reason}"))
                                .with_blame(Blame::Node)
                                .with_peer(name),
                        );
                        self.next_candidate(now);
                    }
                    RefuseCode::UnknownWorkload | RefuseCode::Internal => {
                        let e = CoreError::unavailable(format!("node {name} refused: {reason}"))
                            .with_blame(Blame::Node)
                            .with_peer(name);
                        self.give_up_on(node, e, now)
                    }
                }
            }
            NodeEvent::FirstToken if accepted => {
                self.state = State::Done(Action::Serve {
                    node,
                    attempts: self.attempts,
                });
            }
            NodeEvent::FirstToken => {
                let name = self.current_name();
                let e = CoreError::node_failed(
                    &name,
                    format!("node {name} sent a token before Accepted"),
                );
                self.give_up_on(node, e, now);
            }
            NodeEvent::Failed(e) if e.blame == Blame::Client => self.fail(e),
            NodeEvent::Failed(e) => self.give_up_on(node, e, now),
        }
    }

    /// A slot freed for the queued request: route again.
    pub fn handle_slot(&mut self, _now: Instant) {
        if matches!(self.state, State::Queued { .. }) {
            self.state = State::Routing;
        }
    }

    /// The model's queue had no room for the request: 429 at once.
    pub fn handle_queue_full(&mut self, _now: Instant, depth: usize) {
        if matches!(self.state, State::Queued { .. }) {
            self.fail(
                CoreError::from_api(&ApiError::rate_limited(format!(
                    "every node serving {} is at capacity and {depth} requests are queued for it; retry shortly",
                    self.model
                )))
                .with_retry_after_s(1),
            );
        }
    }

    /// A registration happened: route again.
    pub fn handle_join(&mut self, _now: Instant) {
        if matches!(self.state, State::Joining { .. }) {
            self.state = State::Routing;
        }
    }

    /// A deadline the machine asked for may have passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.state {
            State::Opening {
                node, accept_by, ..
            } if now >= *accept_by => {
                let key = node.key;
                let e = CoreError::timeout(format!(
                    "node {} did not accept the request within {} ms",
                    node.name,
                    self.rules.accept_window().as_millis()
                ))
                .with_peer(node.name.clone());
                self.unreachable = true;
                self.give_up_on(key, e, now);
            }
            State::Accepted { first_by, .. } if now >= *first_by => {
                self.fail(CoreError::timeout(format!(
                    "no first token within {} ms",
                    self.rules.first_token_timeout.as_millis()
                )));
            }
            State::Joining { until } if now >= *until => {
                self.fail(CoreError::model_unavailable(&self.model));
            }
            State::Queued { until } if now >= *until => {
                let e = self.saturated_after_wait(now);
                self.fail(e);
            }
            _ => {}
        }
    }

    fn current_name(&self) -> String {
        match &self.state {
            State::Opening { node, .. } | State::Accepted { node, .. } => node.name.clone(),
            _ => String::new(),
        }
    }

    fn saturated(&self) -> CoreError {
        CoreError::from_api(&ApiError::rate_limited(format!(
            "every node serving {} is at capacity; retry shortly",
            self.model
        )))
    }

    /// Saturation after waiting in the queue: 429, saying how long it waited.
    fn saturated_after_wait(&self, now: Instant) -> CoreError {
        let waited = self
            .queued_since
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        CoreError::from_api(&ApiError::rate_limited(format!(
            "every node serving {} is at capacity; retry shortly (queued for {} ms)",
            self.model,
            waited.as_millis()
        )))
        .with_retry_after_s(1)
    }

    /// No free slot: wait in the queue until `queue_max_wait` after the start, or answer 429.
    fn queue_or_fail(&mut self, now: Instant) {
        let until = self.started + self.rules.queue_max_wait;
        if now >= until {
            return match self.queued_since {
                Some(_) => {
                    let e = self.saturated_after_wait(now);
                    self.fail(e)
                }
                None => self.fail(self.saturated().with_retry_after_s(1)),
            };
        }
        self.queued_since.get_or_insert(now);
        self.state = State::Queued { until };
    }

    fn fail(&mut self, e: CoreError) {
        self.state = State::Done(Action::Fail(e));
    }

    /// `node` failed this request: it is excluded and the next candidate is tried.
    fn give_up_on(&mut self, node: NodeId, e: CoreError, now: Instant) {
        self.excluded.push(node);
        self.last = Some(e);
        self.next_candidate(now);
    }

    /// Tries the next candidate of the current route, or decides how the round ends.
    fn next_candidate(&mut self, now: Instant) {
        while self.attempts.saturating_sub(self.busy) < self.rules.max_attempts {
            let Some(c) = self.queue.pop_front() else {
                break;
            };
            if self.excluded.contains(&c.key) {
                continue;
            }
            self.attempts += 1;
            self.state = State::Opening {
                node: c,
                accept_by: now + self.rules.accept_window(),
                announced: false,
            };
            return;
        }
        // Only a blip is worth waiting for: no node serves a recently served model, or the
        // nodes that serve it do not answer. A node that answered with an error is answered
        // as is.
        // Some node is only full: wait for a slot (while failures left attempts).
        if self.round_saturated && self.attempts.saturating_sub(self.busy) < self.rules.max_attempts
        {
            return self.queue_or_fail(now);
        }
        if !(self.route_blip || self.unreachable) {
            let e = self.last.take().unwrap_or_else(|| self.saturated());
            return self.fail(e);
        }
        self.blip_seen = true;
        let until = self.started + self.rules.unavailable_wait;
        if self.attempts >= self.rules.max_attempts || now >= until {
            return self.fail(CoreError::model_unavailable(&self.model));
        }
        self.state = State::Joining { until };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    const MS: Duration = Duration::from_millis(1);

    fn rules() -> Rules {
        Rules {
            max_attempts: 3,
            connect_timeout: 500 * MS,
            first_token_timeout: 2_000 * MS,
            unavailable_wait: 3_000 * MS,
            // The rules of old: saturation is answered at once (queueing has its own tests).
            queue_max_wait: Duration::ZERO,
        }
    }

    fn queueing() -> Rules {
        Rules {
            queue_max_wait: 10_000 * MS,
            ..rules()
        }
    }

    fn c(n: u64) -> Candidate {
        Candidate {
            key: NodeId(n),
            name: format!("node-{n}"),
        }
    }

    fn route(ns: &[u64]) -> Route {
        Route::Candidates(ns.iter().map(|n| c(*n)).collect())
    }

    /// A machine for model `m` at `t0`, routed to `nodes`.
    fn routed(t0: Instant, nodes: &[u64]) -> InferAttempts {
        let mut m = InferAttempts::new(rules(), "m", t0);
        assert_eq!(m.poll(), Action::Route);
        m.handle_route(t0, route(nodes));
        m
    }

    fn tries(m: &mut InferAttempts) -> NodeId {
        match m.poll() {
            Action::TryNode { node, .. } => node,
            other => panic!("expected TryNode, got {other:?}"),
        }
    }

    fn failed(m: &mut InferAttempts) -> CoreError {
        match m.poll() {
            Action::Fail(e) => e,
            other => panic!("expected Fail, got {other:?}"),
        }
    }

    fn node_error(kind: Kind) -> CoreError {
        CoreError::new(kind, "x", "boom")
    }

    #[test]
    fn a_node_that_refuses_is_skipped_and_the_next_tried() {
        let t0 = Instant::now();
        let mut m = routed(t0, &[1, 2]);
        assert_eq!(
            m.poll(),
            Action::TryNode {
                node: NodeId(1),
                failover: false
            }
        );
        m.handle_node(
            t0,
            NodeId(1),
            NodeEvent::Refused {
                code: RefuseCode::Busy,
                reason: "full".into(),
            },
        );
        assert_eq!(
            m.poll(),
            Action::TryNode {
                node: NodeId(2),
                failover: true
            }
        );
        m.handle_node(t0, NodeId(2), NodeEvent::Accepted);
        m.handle_node(t0 + 5 * MS, NodeId(2), NodeEvent::FirstToken);
        assert_eq!(
            m.poll(),
            Action::Serve {
                node: NodeId(2),
                attempts: 2
            }
        );
    }

    #[test]
    fn a_client_fault_error_is_not_failed_over() {
        let t0 = Instant::now();
        // A node error blamed on the request.
        let mut m = routed(t0, &[1, 2]);
        tries(&mut m);
        m.handle_node(t0, NodeId(1), NodeEvent::Accepted);
        let bad = CoreError::bad_request("no such parameter", Some("foo"));
        m.handle_node(t0, NodeId(1), NodeEvent::Failed(bad.clone()));
        assert_eq!(failed(&mut m), bad);
        // A node's Refused{BadRequest}.
        let mut m = routed(t0, &[1, 2]);
        tries(&mut m);
        m.handle_node(
            t0,
            NodeId(1),
            NodeEvent::Refused {
                code: RefuseCode::BadRequest,
                reason: "malformed".into(),
            },
        );
        let e = failed(&mut m);
        assert_eq!(
            (e.kind, e.blame, e.retryable),
            (Kind::InvalidRequest, Blame::Client, false)
        );
        assert_eq!(m.attempts(), 1);
    }

    #[test]
    fn a_node_error_before_the_first_token_fails_over() {
        let t0 = Instant::now();
        let mut m = routed(t0, &[1, 2]);
        tries(&mut m);
        m.handle_node(t0, NodeId(1), NodeEvent::Accepted);
        m.handle_node(
            t0,
            NodeId(1),
            NodeEvent::Failed(node_error(Kind::NodeFailed)),
        );
        assert_eq!(tries(&mut m), NodeId(2));
    }

    #[test]
    fn failover_happens_only_before_the_first_token() {
        let t0 = Instant::now();
        let mut m = routed(t0, &[1, 2]);
        tries(&mut m);
        m.handle_node(t0, NodeId(1), NodeEvent::Accepted);
        m.handle_node(t0, NodeId(1), NodeEvent::FirstToken);
        let served = m.poll();
        // Once served, later failures of the node change nothing here: the pump reports them
        // in band, and no other node is tried.
        m.handle_node(
            t0,
            NodeId(1),
            NodeEvent::Failed(node_error(Kind::NodeFailed)),
        );
        m.handle_timeout(t0 + 60_000 * MS);
        assert_eq!(m.poll(), served);
        assert_eq!(
            served,
            Action::Serve {
                node: NodeId(1),
                attempts: 1
            }
        );
    }

    #[test]
    fn a_node_that_accepts_but_stalls_ends_the_request_at_the_first_token_deadline() {
        let t0 = Instant::now();
        let mut m = routed(t0, &[1, 2]);
        tries(&mut m);
        m.handle_node(t0 + 10 * MS, NodeId(1), NodeEvent::Accepted);
        // The deadline runs from the request's start.
        assert_eq!(m.poll(), Action::WaitForNode(t0 + 2_000 * MS));
        m.handle_timeout(t0 + 1_999 * MS);
        assert!(matches!(m.poll(), Action::WaitForNode(_)));
        m.handle_timeout(t0 + 2_000 * MS);
        let e = failed(&mut m);
        assert_eq!((e.kind, e.blame), (Kind::Timeout, Blame::Node));
    }

    #[test]
    fn a_node_that_does_not_accept_in_time_is_left_for_the_next() {
        let t0 = Instant::now();
        let mut m = routed(t0, &[1, 2]);
        tries(&mut m);
        assert_eq!(m.poll(), Action::WaitForNode(t0 + 500 * MS));
        m.handle_timeout(t0 + 500 * MS);
        assert_eq!(tries(&mut m), NodeId(2));
        // Its deadline starts when it is tried.
        assert_eq!(m.poll(), Action::WaitForNode(t0 + 1_000 * MS));
    }

    #[test]
    fn the_blip_wait_ends_at_its_deadline_with_model_unavailable() {
        let t0 = Instant::now();
        let mut m = InferAttempts::new(rules(), "m", t0);
        m.handle_route(
            t0,
            Route::NotServed {
                recently_served: true,
            },
        );
        assert_eq!(m.poll(), Action::WaitForJoin(t0 + 3_000 * MS));
        m.handle_timeout(t0 + 2_999 * MS);
        assert_eq!(m.poll(), Action::WaitForJoin(t0 + 3_000 * MS));
        m.handle_timeout(t0 + 3_000 * MS);
        let e = failed(&mut m);
        assert_eq!(e.kind.http_status(), 503);
        assert!(e.retryable);
        assert_eq!(e.code, nearpath_protocol::openai::MODEL_UNAVAILABLE);
        assert_eq!(e.retry_after_s, Some(1));
        assert!(m.blip_seen());
    }

    #[test]
    fn a_node_registering_during_the_blip_wait_is_routed_to() {
        let t0 = Instant::now();
        let mut m = InferAttempts::new(rules(), "m", t0);
        m.handle_route(
            t0,
            Route::NotServed {
                recently_served: true,
            },
        );
        m.handle_join(t0 + 700 * MS);
        assert_eq!(m.poll(), Action::Route);
        m.handle_route(t0 + 700 * MS, route(&[4]));
        assert_eq!(tries(&mut m), NodeId(4));
        m.handle_node(t0 + 710 * MS, NodeId(4), NodeEvent::Accepted);
        m.handle_node(t0 + 720 * MS, NodeId(4), NodeEvent::FirstToken);
        assert!(matches!(m.poll(), Action::Serve { .. }));
        assert!(m.blip_seen());
    }

    #[test]
    fn unreachable_nodes_are_waited_out_as_a_blip() {
        let t0 = Instant::now();
        let mut m = routed(t0, &[1]);
        tries(&mut m);
        m.handle_node(
            t0 + 10 * MS,
            NodeId(1),
            NodeEvent::Unreachable(node_error(Kind::NodeFailed)),
        );
        assert_eq!(m.poll(), Action::WaitForJoin(t0 + 3_000 * MS));
    }

    #[test]
    fn a_model_never_served_is_not_found_not_waited_for() {
        let t0 = Instant::now();
        let mut m = InferAttempts::new(rules(), "nope", t0);
        m.handle_route(
            t0,
            Route::NotServed {
                recently_served: false,
            },
        );
        let e = failed(&mut m);
        assert_eq!((e.kind, e.retryable), (Kind::NotFound, false));
        assert_eq!(e.code, "model_not_found");
    }

    #[test]
    fn excluded_nodes_are_not_retried_after_a_new_route() {
        let t0 = Instant::now();
        let mut m = routed(t0, &[1]);
        tries(&mut m);
        m.handle_timeout(t0 + 500 * MS);
        // Node 1 did not answer; node 3 registers and routing offers both.
        m.handle_join(t0 + 600 * MS);
        assert_eq!(m.poll(), Action::Route);
        m.handle_route(t0 + 600 * MS, route(&[1, 3]));
        assert_eq!(tries(&mut m), NodeId(3));
    }

    #[test]
    fn at_most_max_attempts_nodes_are_tried() {
        let t0 = Instant::now();
        let mut m = routed(t0, &[1, 2, 3, 4]);
        for n in 1..=3 {
            assert_eq!(tries(&mut m), NodeId(n));
            m.handle_node(t0, NodeId(n), NodeEvent::Accepted);
            m.handle_node(
                t0,
                NodeId(n),
                NodeEvent::Failed(node_error(Kind::NodeFailed)),
            );
        }
        // The last node error is the answer (not a blip: every node answered).
        let e = failed(&mut m);
        assert_eq!(e.kind, Kind::NodeFailed);
        assert_eq!(m.attempts(), 3);
    }

    #[test]
    fn a_node_without_a_free_slot_is_not_an_attempt() {
        let t0 = Instant::now();
        let mut m = routed(t0, &[1, 2]);
        tries(&mut m);
        m.handle_node(t0, NodeId(1), NodeEvent::NoSlot);
        assert_eq!(
            m.poll(),
            Action::TryNode {
                node: NodeId(2),
                failover: false
            }
        );
        assert_eq!(m.attempts(), 1);
    }

    #[test]
    fn no_free_slot_anywhere_is_saturation_429() {
        let t0 = Instant::now();
        let mut m = routed(t0, &[1]);
        tries(&mut m);
        m.handle_node(t0, NodeId(1), NodeEvent::NoSlot);
        let e = failed(&mut m);
        assert_eq!((e.kind, e.retryable), (Kind::RateLimited, true));
    }

    #[test]
    fn route_refusals_end_the_request_with_their_own_errors() {
        let t0 = Instant::now();
        let mut m = InferAttempts::new(rules(), "m", t0);
        m.handle_route(
            t0,
            Route::Denied {
                rule: "r1".into(),
                reason: "no".into(),
            },
        );
        let e = failed(&mut m);
        assert_eq!(
            (e.kind, e.blame, e.retryable),
            (Kind::Geofence, Blame::Client, false)
        );
        let mut m = InferAttempts::new(rules(), "m", t0);
        m.handle_route(t0, Route::Saturated);
        assert_eq!(failed(&mut m).kind, Kind::RateLimited);
        let mut m = InferAttempts::new(rules(), "m", t0);
        m.handle_route(t0, Route::Draining);
        assert_eq!(failed(&mut m).code, "no_eligible_node");
    }

    #[test]
    fn late_events_of_a_node_given_up_on_are_ignored() {
        let t0 = Instant::now();
        let mut m = routed(t0, &[1, 2]);
        tries(&mut m);
        m.handle_timeout(t0 + 500 * MS);
        assert_eq!(tries(&mut m), NodeId(2));
        m.handle_node(t0 + 501 * MS, NodeId(1), NodeEvent::Accepted);
        m.handle_node(t0 + 502 * MS, NodeId(1), NodeEvent::FirstToken);
        assert_eq!(m.poll(), Action::WaitForNode(t0 + 1_000 * MS));
    }

    #[test]
    fn the_node_being_tried_stays_current_until_it_is_given_up_on_or_serves() {
        let t0 = Instant::now();
        let mut m = routed(t0, &[1, 2]);
        assert_eq!(m.current(), Some(NodeId(1)));
        tries(&mut m);
        m.handle_node(
            t0,
            NodeId(1),
            NodeEvent::Failed(node_error(Kind::NodeFailed)),
        );
        // Asking who is current does not consume the next TryNode.
        assert_eq!(m.current(), Some(NodeId(2)));
        assert_eq!(tries(&mut m), NodeId(2));
        m.handle_node(t0, NodeId(2), NodeEvent::Accepted);
        m.handle_node(t0, NodeId(2), NodeEvent::FirstToken);
        assert_eq!(m.current(), Some(NodeId(2)));
    }

    #[test]
    fn a_saturated_model_waits_for_a_slot_and_is_served_when_one_frees() {
        let t0 = Instant::now();
        let mut m = InferAttempts::new(queueing(), "m", t0);
        m.handle_route(t0, Route::Saturated);
        assert_eq!(m.poll(), Action::WaitForSlot(t0 + 10_000 * MS));
        assert_eq!(m.queued_since(), Some(t0));
        // A slot frees: route again, and the node is tried.
        m.handle_slot(t0 + 700 * MS);
        assert_eq!(m.poll(), Action::Route);
        m.handle_route(t0 + 700 * MS, route(&[1]));
        assert_eq!(tries(&mut m), NodeId(1));
        m.handle_node(t0 + 710 * MS, NodeId(1), NodeEvent::Accepted);
        m.handle_node(t0 + 720 * MS, NodeId(1), NodeEvent::FirstToken);
        assert_eq!(
            m.poll(),
            Action::Serve {
                node: NodeId(1),
                attempts: 1
            }
        );
    }

    #[test]
    fn a_woken_request_that_loses_the_race_waits_again_until_its_deadline() {
        let t0 = Instant::now();
        let mut m = routed_with(queueing(), t0, &[1, 2]);
        tries(&mut m);
        m.handle_node(t0, NodeId(1), NodeEvent::NoSlot);
        tries(&mut m);
        m.handle_node(t0, NodeId(2), NodeEvent::NoSlot);
        assert_eq!(m.poll(), Action::WaitForSlot(t0 + 10_000 * MS));
        m.handle_slot(t0 + 100 * MS);
        m.handle_route(t0 + 100 * MS, Route::Saturated);
        // The same deadline: it runs from the request's start, not from each wake.
        assert_eq!(m.poll(), Action::WaitForSlot(t0 + 10_000 * MS));
        assert_eq!(m.queued_since(), Some(t0));
        m.handle_timeout(t0 + 9_999 * MS);
        assert!(matches!(m.poll(), Action::WaitForSlot(_)));
        m.handle_timeout(t0 + 10_000 * MS);
        let e = failed(&mut m);
        assert_eq!((e.kind, e.retryable), (Kind::RateLimited, true));
        assert_eq!(e.retry_after_s, Some(1));
        assert!(e.message.contains("queued for 10000 ms"), "{}", e.message);
    }

    #[test]
    fn a_full_queue_is_429_at_once() {
        let t0 = Instant::now();
        let mut m = InferAttempts::new(queueing(), "m", t0);
        m.handle_route(t0, Route::Saturated);
        m.handle_queue_full(t0, 2_000);
        let e = failed(&mut m);
        assert_eq!(e.kind, Kind::RateLimited);
        assert_eq!(e.retry_after_s, Some(1));
        assert!(
            e.message.contains("2000 requests are queued"),
            "{}",
            e.message
        );
    }

    #[test]
    fn busy_refusals_queue_the_request_and_do_not_use_up_attempts() {
        let t0 = Instant::now();
        let mut m = routed_with(queueing(), t0, &[1]);
        for round in 0..5u32 {
            assert_eq!(tries(&mut m), NodeId(1), "round {round}");
            m.handle_node(
                t0,
                NodeId(1),
                NodeEvent::Refused {
                    code: RefuseCode::Busy,
                    reason: "full".into(),
                },
            );
            assert!(matches!(m.poll(), Action::WaitForSlot(_)));
            m.handle_slot(t0);
            m.handle_route(t0, route(&[1]));
        }
        // More rounds than max_attempts, and the busy node is still tried: it was full, not
        // failing.
        assert_eq!(tries(&mut m), NodeId(1));
        m.handle_node(t0, NodeId(1), NodeEvent::Accepted);
        m.handle_node(t0, NodeId(1), NodeEvent::FirstToken);
        assert!(matches!(m.poll(), Action::Serve { .. }));
    }

    #[test]
    fn a_queued_request_woken_for_a_node_it_may_not_use_waits_on() {
        let t0 = Instant::now();
        let mut m = InferAttempts::new(queueing(), "m", t0);
        m.handle_route(t0, Route::Saturated);
        m.handle_slot(t0 + 5 * MS);
        m.handle_route(
            t0 + 5 * MS,
            Route::Denied {
                rule: "r".into(),
                reason: "no".into(),
            },
        );
        assert_eq!(m.poll(), Action::WaitForSlot(t0 + 10_000 * MS));
    }

    #[test]
    fn a_failed_node_beside_a_full_one_queues_for_the_full_one() {
        let t0 = Instant::now();
        let mut m = routed_with(queueing(), t0, &[1, 2]);
        tries(&mut m);
        m.handle_node(
            t0,
            NodeId(1),
            NodeEvent::Failed(node_error(Kind::NodeFailed)),
        );
        tries(&mut m);
        m.handle_node(t0, NodeId(2), NodeEvent::NoSlot);
        assert!(matches!(m.poll(), Action::WaitForSlot(_)));
        // Woken: the failed node is not tried again.
        m.handle_slot(t0 + MS);
        m.handle_route(t0 + MS, route(&[1, 2]));
        assert_eq!(tries(&mut m), NodeId(2));
    }

    #[test]
    fn without_queueing_saturation_is_answered_at_once() {
        let t0 = Instant::now();
        let mut m = InferAttempts::new(rules(), "m", t0);
        m.handle_route(t0, Route::Saturated);
        let e = failed(&mut m);
        assert_eq!(e.kind, Kind::RateLimited);
        assert_eq!(m.queued_since(), None);
    }

    fn routed_with(r: Rules, t0: Instant, nodes: &[u64]) -> InferAttempts {
        let mut m = InferAttempts::new(r, "m", t0);
        m.handle_route(t0, route(nodes));
        m
    }
}
