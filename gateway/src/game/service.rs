//! The game service: starts sessions (admission, route, attach), runs each one's driver around
//! its [`GameSession`] rules, relays frames and input, and serves native players' play streams.
//! Built with exactly the components it uses; front ends (QUIC clients, WHEP) and the node
//! session (frame streams) call it instead of reaching into the gateway's shared state.

use super::session::{Action, GameSession, NodeCommand, NodeRef, Rules, Totals, UsageSegment};
use super::{
    recv_frame_rest, AgeFloor, AudioDrop, ClientEvent, DropReason, FlightSlot, ForeignLog,
    FrameBudget, FrameSink, Notice, Relay, RelayOrigin, Started, Verdict, WtSink,
    ACK_DELAY_ALLOWANCE, REVOKE_SEND_BOUND,
};
use crate::auth::{CapGuard, CapKind, CapRefusal};
use crate::clock::SharedClock;
use crate::components::{Auth, Directory, Meter, Placement, Sessions};
use crate::error::{CoreError, Kind};
use crate::metrics::{bounded, label_values, labels, Metrics};
use crate::player::{ConnSample, PlayerSilence};
use crate::registry::{NodeEntry, SlotGuard, SlotKind};
use crate::router::LatLon;
use crate::router::{NoRoute, Workload};
use crate::store::{ApiKey, SessionDirEntry, UsageKind, UsageRecord};
use bytes::Bytes;
use nearpath_config::{GameConfig, WorkloadKind};
use nearpath_geo::Location;
use nearpath_protocol::message::{
    Ended, ErrorInfo, GameParams, Message, Open, Paused, PlayRequest, PlayResume, PlayStarted,
    PlayTicket, Redirect, ResumeToken, SessionKind, VideoCodec, VIDEO_REFUSED,
};
use nearpath_protocol::stream::{
    recv_frame_header, relay_frame_by, relay_frame_framed, send, FramedRecv, Relayed,
};
use nearpath_protocol::{
    AudioPacket, InputDatagram, InputEvent, MAX_CONTROL_FRAME, MAX_VIDEO_FRAME,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, info_span, warn, Instrument};

/// How long a node has to open a game session (stream open, `Open`, `Accepted`) before the
/// next candidate is tried. A node that takes longer is not one to put a player on.
pub const NODE_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Game sessions of one gateway. See the module docs.
pub struct GameService {
    auth: Arc<Auth>,
    directory: Arc<Directory>,
    placement: Arc<Placement>,
    sessions: Arc<Sessions>,
    meter: Arc<Meter>,
    metrics: Arc<Metrics>,
    clock: SharedClock,
    config: GameConfig,
    /// This gateway's federation, when it is in one (`federation.gateway_id`): sessions for
    /// peers' nodes are redirected there, and tickets from peers are honoured here.
    federation: Option<Arc<super::redirect::GameFederation>>,
    /// Whether the gateway's runtime is saturated (the relay then sheds queued frames); kept
    /// current by [`GameService::saturation_loop`].
    saturation: Arc<crate::saturation::Saturation>,
    /// The federation's trunk, when game sessions travel over it (`game_route = "trunk"`):
    /// a session no node here can take is placed on a peer's node and relayed through it, and
    /// peers' sessions on our nodes have their frames and audio sent back over it.
    trunk: std::sync::OnceLock<Arc<crate::trunk::Trunk>>,
}

/// Where a session was placed: here, or on a peer's node (the client must go there).
pub enum Placed {
    Here(Started),
    Redirect(super::redirect::RedirectTo),
}

/// The error of a ticket this gateway does not honour (forged, expired, for another client,
/// key or gateway, used already): the client's fault, never retried with the same ticket.
pub fn bad_ticket(message: impl Into<String>) -> CoreError {
    CoreError::new(Kind::Forbidden, BAD_TICKET, message).with_retryable(false)
}

/// The code of [`bad_ticket`] errors.
pub const BAD_TICKET: &str = "bad_ticket";

/// The code of the error for a valid ticket whose node is not attached to the gateway it names.
pub const TICKET_NODE_UNAVAILABLE: &str = "ticket_node_unavailable";
/// The error code of a refused `PlayResume`: no such session, another key's, or a wrong token
/// (one answer for all three, so that nobody can probe which sessions exist).
pub const BAD_RESUME: &str = "bad_resume";
/// The error code of a `PlayResume` for a session still running on this gateway (the player's
/// old connection has not been given up yet): retryable after a few seconds.
pub const RESUME_CONFLICT: &str = "resume_conflict";
/// The longest resume token read (64 hex digits are expected).
const RESUME_TOKEN_LEN: usize = 64;

/// A session attached to one node.
struct Attached {
    node: Arc<NodeEntry>,
    tx: quinn::SendStream,
    rx: FramedRecv,
    _slot: SlotGuard,
}

/// Why no node could take the session.
enum NoNode {
    Denied(String),
    Unknown,
    Full,
    Failed(String),
    /// The node a ticket names is not attached here (it moved or left since the peer looked).
    TicketNode,
    /// Nodes serve the game, but none of those the session may use encodes its codec.
    Codec(VideoCodec),
}

/// The routing refusal of a node that does not encode `codec`.
fn codec_check(n: &NodeEntry, codec: VideoCodec) -> Result<(), crate::router::Deny> {
    if n.encodes(codec) {
        Ok(())
    } else {
        Err(crate::router::Deny {
            rule: "codec".into(),
            reason: format!("the node does not encode {codec}"),
        })
    }
}

fn node_ref(n: &NodeEntry) -> NodeRef {
    NodeRef {
        key: n.key,
        id: n.id.clone(),
        operator_id: n.operator_id.clone(),
    }
}

fn client_latlon(loc: &Location) -> Option<LatLon> {
    loc.coords.and_then(|c| LatLon::new(c.lat, c.lon).ok())
}

fn err(code: &str, message: impl Into<String>) -> Message {
    Message::Error(ErrorInfo {
        code: code.into(),
        message: message.into(),
        retryable: false,
    })
}

/// What a closed client connection means for its session: a close the client sent (or one
/// this end made) is the player leaving; anything else (idle timeout, reset, transport error)
/// is the player lost.
fn closed_event(e: &quinn::ConnectionError) -> ClientEvent {
    match e {
        quinn::ConnectionError::ApplicationClosed(_)
        | quinn::ConnectionError::ConnectionClosed(_)
        | quinn::ConnectionError::LocallyClosed => ClientEvent::Gone,
        _ => ClientEvent::Lost,
    }
}

/// The next thing the serving node's session says: `None` when its stream or connection died.
/// Never ready while no node serves.
async fn node_event(a: &mut Option<Attached>) -> Option<Message> {
    let Some(a) = a.as_mut() else {
        return std::future::pending().await;
    };
    tokio::select! {
        m = a.rx.next() => m.ok().flatten(),
        _ = a.node.conn.closed() => None,
    }
}

impl GameService {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        auth: Arc<Auth>,
        directory: Arc<Directory>,
        placement: Arc<Placement>,
        sessions: Arc<Sessions>,
        meter: Arc<Meter>,
        metrics: Arc<Metrics>,
        clock: SharedClock,
        config: GameConfig,
    ) -> GameService {
        GameService {
            auth,
            directory,
            placement,
            sessions,
            meter,
            metrics,
            clock,
            config,
            federation: None,
            saturation: crate::saturation::Saturation::new(),
            trunk: std::sync::OnceLock::new(),
        }
    }

    /// Samples the runtime's saturation until `shutdown`, for the relay's shedding
    /// ([`FrameBudget::admit`]), the `nearpath_game_relay_overloaded` gauge and the log.
    pub async fn saturation_loop(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let metrics = self.metrics.clone();
        let shed = self.config.overload_queue_budget_ms > 0;
        self.saturation
            .clone()
            .run(shutdown, move |saturated| {
                metrics.game_relay_overloaded.set(i64::from(saturated));
                if saturated && shed {
                    warn!("gateway saturated: the game relay sheds frames queued on their way in");
                } else if saturated {
                    warn!("gateway saturated (game.overload_queue_budget_ms = 0: no shedding)");
                } else {
                    info!("gateway no longer saturated");
                }
            })
            .await
    }

    /// Whether the runtime is saturated now (see [`crate::saturation`]).
    pub fn is_saturated(&self) -> bool {
        self.saturation.is_saturated()
    }

    /// Makes the service a member of a federation (see [`super::redirect`]).
    pub fn with_federation(mut self, f: Arc<super::redirect::GameFederation>) -> GameService {
        self.federation = Some(f);
        self
    }

    /// Lets game sessions travel over the federation's trunk (`game_route = "trunk"`): set
    /// once at assembly, with the trunk given the relay's hooks ([`crate::trunk::GameLink`]).
    pub fn set_trunk(self: &Arc<Self>, trunk: Arc<crate::trunk::Trunk>) {
        let games = Arc::downgrade(self);
        trunk.set_games(crate::trunk::GameLink {
            ids: self.sessions.ids.clone(),
            on_dial: Box::new(move |conn| {
                // The peer relays our sessions' frames (uni streams) and audio (datagrams)
                // from its nodes on the connection we dialled, read as a node's.
                if let Some(g) = games.upgrade() {
                    tokio::spawn(g.node_frames_loop(conn));
                }
            }),
        });
        let _ = self.trunk.set(trunk);
    }

    /// The federation it is a member of, if any.
    pub fn federation(&self) -> Option<&Arc<super::redirect::GameFederation>> {
        self.federation.as_ref()
    }

    /// The `[game]` section it runs with.
    pub fn config(&self) -> &GameConfig {
        &self.config
    }

    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Where `ip` is (GeoIP), for routing its session.
    pub fn locate(&self, ip: std::net::IpAddr) -> Location {
        self.placement.geo.lookup(ip)
    }

    /// The GeoIP database, for front ends that locate clients behind proxies.
    pub fn geo(&self) -> &nearpath_geo::GeoDb {
        &self.placement.geo
    }

    /// The live sessions' relays.
    pub fn relays(&self) -> &super::GameRelays {
        &self.sessions.games
    }

    /// Checks a Bearer secret (see `Auth::authenticate`).
    pub async fn authenticate(&self, secret: Option<&str>) -> Result<ApiKey, CoreError> {
        self.auth.authenticate(secret).await
    }

    /// Counts a dropped frame against its session and in the metric, by reason.
    pub fn count_drop(&self, relay: &Relay, reason: DropReason) {
        relay.dropped(reason).fetch_add(1, Ordering::Relaxed);
        self.metrics
            .game_frames_dropped
            .get_or_create(&labels([("reason", reason.as_str())]))
            .inc();
    }

    /// Clamps a play request to the configured limits (0 means the default).
    pub fn session_params(&self, r: &PlayRequest) -> Result<GameParams, String> {
        session_params(&self.config, r)
    }

    /// Checks what a key may start before anything is routed: the ledger can bill the session,
    /// the key is under its cap on live sessions and its session starts per minute. The guard
    /// holds the key's session slot until the session ends.
    /// A resumed session (`charge_start` false) holds a session slot here but is not a new
    /// start: the key's starts per minute are not charged again.
    async fn admit_start(
        &self,
        key: &ApiKey,
        transport: &'static str,
        charge_start: bool,
    ) -> Result<CapGuard, CoreError> {
        self.auth.ledger_gate(transport)?;
        let caps = self.auth.effective_caps(key);
        let guard = self
            .auth
            .acquire_cap(
                key,
                CapKind::Session,
                caps.max_concurrent_sessions,
                transport,
            )
            .await
            .map_err(|r| r.core_error())?;
        if !charge_start {
            return Ok(guard);
        }
        self.auth
            .admit_session_start(key, caps.session_starts_per_minute)
            .await
            .map_err(|r: CapRefusal| {
                self.auth.count_cap_refusal(transport, &r);
                r.core_error()
            })?;
        Ok(guard)
    }

    /// Routes the session and opens it on the first candidate that accepts, each given
    /// [`NODE_ANSWER_TIMEOUT`]. `exclude` holds the registrations that failed the session.
    /// `only` pins it to one node id (a peer's ticket: the peer evaluated the geofence with
    /// the client's address, so it is not evaluated again).
    async fn attach(
        &self,
        client: &Location,
        params: &GameParams,
        session_id: u64,
        exclude: &[crate::router::NodeId],
        pin: Pin<'_>,
    ) -> Result<Attached, NoNode> {
        // Whether some node was refused for the codec: when the others are the nodes that
        // failed this session, the codec is what keeps it from resuming.
        let codec_denied = std::cell::Cell::new(false);
        let (outcome, nodes) = self.directory.registry.route(
            client_latlon(client),
            Workload::Game(&params.title),
            |n| {
                codec_check(n, params.codec).inspect_err(|_| codec_denied.set(true))?;
                if exclude.contains(&n.key) {
                    return Err(crate::router::Deny {
                        rule: "failover".into(),
                        reason: "node failed this session".into(),
                    });
                }
                match pin {
                    Pin::Ticket(id) | Pin::Resume(id) if n.id != id => Err(crate::router::Deny {
                        rule: "pinned".into(),
                        reason: "the session is pinned to another node".into(),
                    }),
                    Pin::Ticket(_) => Ok(()),
                    Pin::Resume(_) | Pin::Any => {
                        self.placement.serve_check(client, n, WorkloadKind::Game)
                    }
                }
            },
        );
        // Over the trunk (`game_route = "trunk"`), peers' nodes come after every node of ours
        // (a trunk hop only adds latency), checked as ours are: the geofence evaluated here,
        // once, with the client's location against the remote node's published location and
        // classes. A ticketed or resumed session is pinned to a node of ours.
        let (remote_outcome, remote) = match (self.trunk.get(), pin) {
            (Some(trunk), Pin::Any) => {
                let (remote, nodes) =
                    trunk.route(client_latlon(client), Workload::Game(&params.title), |n| {
                        codec_check(n, params.codec)?;
                        if exclude.contains(&n.key) {
                            return Err(crate::router::Deny {
                                rule: "failover".into(),
                                reason: "node failed this session".into(),
                            });
                        }
                        self.placement.serve_check(client, n, WorkloadKind::Game)
                    });
                let nodes = if remote.failure().is_none() {
                    nodes
                } else {
                    Vec::new()
                };
                (Some(remote), nodes)
            }
            _ => (None, Vec::new()),
        };
        let nodes = match outcome.failure() {
            Some(_) if !remote.is_empty() => remote,
            _ => nodes.into_iter().chain(remote).collect(),
        };
        // When no node here serves the game, why peers' nodes could not take it says more
        // (their codec, the geofence, full).
        let failure = match (
            outcome.failure(),
            remote_outcome.as_ref().and_then(|o| o.failure()),
        ) {
            (Some(NoRoute::NotServed), Some(r)) => Some(r),
            (local, _) => local,
        };
        if let (Some(f), true) = (failure, nodes.is_empty()) {
            return Err(match f {
                NoRoute::NotServed => NoNode::Unknown,
                NoRoute::Denied(d) if d.rule == "pinned" => NoNode::TicketNode,
                NoRoute::Denied(d) if d.rule == "codec" => NoNode::Codec(params.codec),
                NoRoute::Denied(d) if d.rule == "failover" && codec_denied.get() => {
                    NoNode::Codec(params.codec)
                }
                NoRoute::Denied(d) if d.rule != "failover" => {
                    NoNode::Denied(format!("rule {}: {}", d.rule, d.reason))
                }
                NoRoute::Denied(_) => NoNode::Failed("no other node serves this game".into()),
                NoRoute::Saturated | NoRoute::Draining => NoNode::Full,
            });
        }
        let mut last = NoNode::Full;
        for node in nodes {
            let Some(slot) = self.directory.registry.acquire(&node, SlotKind::Game) else {
                continue;
            };
            let opened = async {
                let (mut tx, rx) = node.conn.open_bi().await.map_err(|e| e.to_string())?;
                send(
                    &mut tx,
                    &Message::Open(Open {
                        session_id,
                        kind: SessionKind::Game(params.clone()),
                    }),
                )
                .await
                .map_err(|e| e.to_string())?;
                let mut rx = FramedRecv::new(rx, MAX_CONTROL_FRAME);
                match rx.next().await {
                    Ok(Some(Message::Accepted(a))) if a.session_id == session_id => Ok((tx, rx)),
                    Ok(Some(Message::Accepted(a))) => Err(format!(
                        "accepted session {} instead of {session_id}",
                        a.session_id
                    )),
                    Ok(Some(Message::Refused(r))) => Err(format!("refused: {}", r.reason)),
                    Ok(other) => Err(format!("unexpected answer {other:?}")),
                    Err(e) => Err(e.to_string()),
                }
            };
            match tokio::time::timeout(NODE_ANSWER_TIMEOUT, opened).await {
                Ok(Ok((tx, rx))) => {
                    return Ok(Attached {
                        node,
                        tx,
                        rx,
                        _slot: slot,
                    })
                }
                Ok(Err(e)) => {
                    warn!(node = %node.id, error = %e, "node did not take the game session");
                    last = NoNode::Failed(e);
                }
                Err(_) => {
                    last = NoNode::Failed(format!(
                        "node {} did not answer within {}",
                        node.id,
                        super::session::seconds(NODE_ANSWER_TIMEOUT)
                    ))
                }
            }
        }
        Err(last)
    }

    fn count_start(&self, transport: &'static str, outcome: &str) {
        self.metrics
            .game_sessions
            .get_or_create(&labels([
                ("transport", transport),
                // Start refusals carry an error code: bounded by convention only.
                (
                    "outcome",
                    bounded(outcome, label_values::GAME_SESSION_OUTCOMES),
                ),
            ]))
            .inc();
    }

    /// Routes and starts a game session for `client`, then runs it in a task until it ends.
    ///
    /// Errors carry the codes native players see (`geofence`, `unknown_game`, `no_capacity`,
    /// `concurrency_limit_exceeded`, `rate_limit_exceeded`, `ledger_unavailable`); their kind
    /// says what a front end speaking HTTP answers.
    pub async fn start_session(
        self: &Arc<Self>,
        key: &ApiKey,
        client: Location,
        client_addr: String,
        transport: &'static str,
        params: GameParams,
        sink: FrameSink,
    ) -> Result<Started, CoreError> {
        self.start_on(key, client, client_addr, transport, params, sink, None)
            .await
    }

    /// Places a game session in the federation: on a node of this gateway when one is eligible
    /// (no redirect costs less than a redirect), else, in a federation that redirects games, on
    /// the nearest eligible node of a live peer, to which the client is sent with a ticket
    /// (`client_ip` is what the ticket binds it to; without it nothing is redirected). The
    /// geofence is evaluated here, once, with the client's location, for either.
    #[allow(clippy::too_many_arguments)]
    pub async fn place_session(
        self: &Arc<Self>,
        key: &ApiKey,
        client: Location,
        client_ip: Option<std::net::IpAddr>,
        client_addr: String,
        transport: &'static str,
        params: GameParams,
        sink: FrameSink,
    ) -> Result<Placed, CoreError> {
        if self.federation.is_some() && !self.has_local_candidate(&client, &params) {
            if let Some(to) = self.find_remote(key, &client, client_ip, &params).await {
                self.count_start(transport, "redirected");
                info!(gateway = %to.gateway.id, node = %to.node_id, game = %params.title, "game session redirected to a peer");
                return Ok(Placed::Redirect(to));
            }
        }
        match self
            .start_on(
                key,
                client,
                client_addr,
                transport,
                params.clone(),
                sink,
                None,
            )
            .await
        {
            Ok(s) => Ok(Placed::Here(s)),
            // Every local candidate refused or failed to answer: a peer may still have room.
            Err(e) if e.kind == Kind::Unavailable && e.code == "no_capacity" => {
                match self.find_remote(key, &client, client_ip, &params).await {
                    Some(to) => {
                        self.count_start(transport, "redirected");
                        Ok(Placed::Redirect(to))
                    }
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Starts a session a peer's ticket names, after the ticket is checked and consumed
    /// ([`super::redirect::GameFederation::accept`]): on exactly the node it names, with its
    /// parameters, without evaluating the geofence again. Admission (ledger, key caps) is
    /// checked here as for any session.
    #[allow(clippy::too_many_arguments)]
    pub async fn start_ticketed(
        self: &Arc<Self>,
        key: &ApiKey,
        claims: &crate::ticket::TicketClaims,
        client: Location,
        client_addr: String,
        transport: &'static str,
        sink: FrameSink,
    ) -> Result<Started, CoreError> {
        let params = super::redirect::ticket_params(claims);
        // The ticket's parameters came from a peer's checks under its own `[game]` limits:
        // they must pass this gateway's too.
        let clamp = PlayRequest {
            protocol_version: nearpath_protocol::PROTOCOL_VERSION,
            api_key: String::new(),
            game: params.title.clone(),
            width: params.width,
            height: params.height,
            fps: params.fps,
            bitrate_kbps: params.bitrate_kbps,
            codecs: vec![params.codec],
            traceparent: None,
        };
        let params = self
            .session_params(&clamp)
            .map_err(|e| CoreError::bad_request(e, None))?;
        self.start_on(
            key,
            client,
            client_addr,
            transport,
            params,
            sink,
            Some(claims.node_id.as_str()),
        )
        .await
    }

    /// A peer's node for the session and its ticket, if this gateway redirects games.
    /// Admission (ledger, key caps) is the peer's to judge when it starts the session.
    async fn find_remote(
        &self,
        key: &ApiKey,
        client: &Location,
        client_ip: Option<std::net::IpAddr>,
        params: &GameParams,
    ) -> Option<super::redirect::RedirectTo> {
        let (f, ip) = (self.federation.as_ref()?, client_ip?);
        f.find(
            &self.placement,
            client,
            ip,
            &key.id,
            params,
            self.clock.unix_ms(),
        )
        .await
    }

    /// Whether a node of this gateway could take the session now (routing only; nothing is
    /// reserved).
    fn has_local_candidate(&self, client: &Location, params: &GameParams) -> bool {
        let (outcome, _) = self.directory.registry.route(
            client_latlon(client),
            Workload::Game(&params.title),
            |n| {
                codec_check(n, params.codec)?;
                self.placement.serve_check(client, n, WorkloadKind::Game)
            },
        );
        outcome.failure().is_none()
    }

    /// The codec of a session whose client decodes `accepted` (most preferred first; empty:
    /// H.264): the first one a node of this gateway that may serve the session encodes (no
    /// redirect costs less than a redirect); else, in a federation that relays games over the
    /// trunk or redirects them, the first one a live peer's eligible node encodes (per the node
    /// directory); when none does,
    /// the most preferred, so that the refusal names it ("no node encodes hevc").
    pub fn pick_codec(
        &self,
        client: &Location,
        params: &GameParams,
        accepted: &[VideoCodec],
    ) -> VideoCodec {
        let Some(&first) = accepted.first() else {
            return VideoCodec::H264;
        };
        if accepted.len() == 1 {
            return first;
        }
        accepted
            .iter()
            .copied()
            .find(|&codec| {
                let p = GameParams {
                    codec,
                    ..params.clone()
                };
                self.has_local_candidate(client, &p)
            })
            // Over the trunk: the first one a live peer's eligible node encodes, per the
            // trunk's last directory read.
            .or_else(|| {
                let trunk = self.trunk.get()?;
                accepted.iter().copied().find(|&codec| {
                    let (outcome, _) =
                        trunk.route(client_latlon(client), Workload::Game(&params.title), |n| {
                            codec_check(n, codec)?;
                            self.placement.serve_check(client, n, WorkloadKind::Game)
                        });
                    outcome.failure().is_none()
                })
            })
            .or_else(|| {
                self.federation.as_ref()?.remote_codec(
                    &self.placement,
                    client,
                    &params.title,
                    accepted,
                    self.clock.unix_ms(),
                )
            })
            .unwrap_or(first)
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_on(
        self: &Arc<Self>,
        key: &ApiKey,
        client: Location,
        client_addr: String,
        transport: &'static str,
        params: GameParams,
        sink: FrameSink,
        only: Option<&str>,
    ) -> Result<Started, CoreError> {
        let cap = match self.admit_start(key, transport, true).await {
            Ok(g) => g,
            Err(e) => {
                self.count_start(transport, &e.code);
                return Err(e);
            }
        };
        let session = self.sessions.ids.mint();
        let session_id = session.get();
        let mut params = params;
        let span = session_span(session_id, &mut params, transport);
        let pin = only.map_or(Pin::Any, Pin::Ticket);
        let attached = match self.attach(&client, &params, session_id, &[], pin).await {
            Ok(a) => a,
            Err(no) => {
                let e = no_node_error(no, &params);
                self.count_start(transport, &e.code);
                return Err(e);
            }
        };
        Ok(self
            .launch(
                key,
                client,
                client_addr,
                transport,
                params,
                sink,
                cap,
                session,
                attached,
                None,
                span,
            )
            .await)
    }

    /// Resumes, through this gateway, a session whose gateway was lost: `entry` is its
    /// sessions-directory entry, already matched against the player's key and resume token.
    /// The session keeps its id. Its own node (which keeps the game running while it
    /// reconnects) is waited for, up to `game.resume_node_wait_ms`, so the game goes on where
    /// it was; after that any eligible node here takes it with a fresh game. The geofence is
    /// evaluated here, with the client's address, as for any start; the key's session starts
    /// per minute are not charged (it is the same session).
    pub async fn start_resumed(
        self: &Arc<Self>,
        key: &ApiKey,
        entry: &SessionDirEntry,
        client: Location,
        client_addr: String,
        transport: &'static str,
        sink: FrameSink,
    ) -> Result<Started, CoreError> {
        let clamp = PlayRequest {
            protocol_version: nearpath_protocol::PROTOCOL_VERSION,
            api_key: String::new(),
            game: entry.game.clone(),
            width: entry.width,
            height: entry.height,
            fps: entry.fps,
            bitrate_kbps: entry.bitrate_kbps,
            // The codec the session was started in: its client decodes that one.
            codecs: vec![entry.codec],
            traceparent: None,
        };
        let params = self
            .session_params(&clamp)
            .map_err(|e| CoreError::bad_request(e, None))?;
        let cap = self.admit_start(key, transport, false).await?;
        let Some(session) = self.sessions.ids.claim(entry.session_id) else {
            return Err(CoreError::new(
                Kind::Unavailable,
                RESUME_CONFLICT,
                "the session is still running on this gateway; try again in a few seconds",
            )
            .with_retry_after_s(3));
        };
        let session_id = session.get();
        let mut params = params;
        let span = session_span(session_id, &mut params, transport);
        let wait = Duration::from_millis(self.config.resume_node_wait_ms);
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.directory.registry.subscribe();
        let own = loop {
            changes.borrow_and_update();
            match self
                .attach(
                    &client,
                    &params,
                    session_id,
                    &[],
                    Pin::Resume(&entry.node_id),
                )
                .await
            {
                Ok(a) => break Some(a),
                // Not attached here (yet): the node is still reconnecting.
                Err(NoNode::TicketNode) => {}
                Err(no @ NoNode::Denied(_)) => {
                    let e = no_node_error(no, &params);
                    self.count_start(transport, &e.code);
                    return Err(e);
                }
                // Here, but it cannot take the session: another node will.
                Err(_) => break None,
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { break None },
                _ = tokio::time::sleep_until(deadline) => break None,
            }
        };
        let attached = match own {
            Some(a) => a,
            None => {
                info!(session = session_id, node = %entry.node_id, "the session's node did not come back here; resuming on another node");
                match self
                    .attach(&client, &params, session_id, &[], Pin::Any)
                    .await
                {
                    Ok(a) => a,
                    Err(no) => {
                        let e = no_node_error(no, &params);
                        self.count_start(transport, &e.code);
                        return Err(e);
                    }
                }
            }
        };
        info!(session = session_id, node = %attached.node.id, from = %entry.gateway_id, "game session resumed from another gateway");
        Ok(self
            .launch(
                key,
                client,
                client_addr,
                transport,
                params,
                sink,
                cap,
                session,
                attached,
                Some(entry.gateway_id.clone()),
                span,
            )
            .await)
    }

    /// Runs an attached session: registers its relay, publishes it in the federation's
    /// sessions directory (with a fresh resume token) and starts its driver.
    /// `resumed_from` names the gateway a resumed session came from; `span` is the session's
    /// ([`session_span`]), whose context its `Open`s carry.
    #[allow(clippy::too_many_arguments)]
    async fn launch(
        self: &Arc<Self>,
        key: &ApiKey,
        client: Location,
        client_addr: String,
        transport: &'static str,
        params: GameParams,
        sink: FrameSink,
        cap: CapGuard,
        session: crate::session_id::SessionId,
        attached: Attached,
        resumed_from: Option<String>,
        span: tracing::Span,
    ) -> Started {
        let session_id = session.get();
        let (events_tx, events_rx) = mpsc::channel(16);
        let relay = Arc::new(Relay::new(
            session,
            sink,
            attached.node.clone(),
            &params,
            events_tx.downgrade(),
            RelayOrigin {
                client_addr,
                transport,
                tenant: key.tenant.clone(),
                started: self.clock.now(),
            },
        ));
        self.sessions.games.insert(relay.clone());
        self.metrics.active_game_sessions.inc();
        if resumed_from.is_some() {
            self.count_start(transport, "resumed");
        }
        // In a federation the player gets a resume token, and the session a directory entry
        // naming its node and this gateway, so that the player can resume it elsewhere.
        let (resume_token, dir) = match &self.federation {
            Some(f) => {
                let token = hex::encode(rand::random::<[u8; 32]>());
                let entry = SessionDirEntry {
                    session_id,
                    key_id: key.id.clone(),
                    node_id: attached.node.id.clone(),
                    gateway_id: f.gateway_id().to_string(),
                    game: params.title.clone(),
                    width: params.width,
                    height: params.height,
                    fps: params.fps,
                    bitrate_kbps: params.bitrate_kbps,
                    codec: params.codec,
                    resume_token_sha256: crate::store::hash_secret(&token),
                    updated_at_ms: self.clock.unix_ms(),
                };
                f.publish_session(entry.clone()).await;
                (Some(token), Some(entry))
            }
            None => (None, None),
        };
        // A resumed session's usage rows get their own request ids: the gateway it came from
        // wrote rows under the plain ones.
        let usage_tag = resumed_from.map(|_| {
            let me = self
                .federation
                .as_ref()
                .map_or("here", |f| f.gateway_id())
                .to_string();
            format!("via_{me}_{}", self.clock.unix_ms())
        });
        let (notices_tx, notices_rx) = mpsc::channel(16);
        tokio::spawn(
            self.clone()
                .drive(
                    key.clone(),
                    client,
                    params.clone(),
                    relay.clone(),
                    attached,
                    events_rx,
                    notices_tx,
                    cap,
                    Ledgering { usage_tag, dir },
                )
                .instrument(span),
        );
        Started {
            session_id,
            params,
            events: events_tx,
            notices: notices_rx,
            relay,
            resume_token,
        }
    }

    /// One node's share of a game session as a usage row: what the gateway counted (its own
    /// clock for GPU-seconds, the frames and bytes it relayed while that node served), never
    /// what a node says.
    fn usage_record(
        &self,
        key: &ApiKey,
        relay: &Relay,
        params: &GameParams,
        seg: &UsageSegment,
        tag: Option<&str>,
    ) -> UsageRecord {
        UsageRecord {
            id: None,
            at_ms: self.clock.unix_ms(),
            kind: UsageKind::Game,
            request_id: match (tag, seg.index) {
                (None, 0 | 1) => format!("game_{}", relay.session_id),
                (None, i) => format!("game_{}_{i}", relay.session_id),
                (Some(t), i) => format!("game_{}_{t}_{i}", relay.session_id),
            },
            tenant: key.tenant.clone(),
            api_key_id: key.id.clone(),
            node_id: seg.node.id.clone(),
            operator_id: seg.node.operator_id.clone(),
            workload: params.title.clone(),
            outcome: seg.outcome.to_string(),
            prompt_tokens: 0,
            completion_tokens: 0,
            node_prompt_tokens: None,
            node_completion_tokens: None,
            ttft_ms: None,
            duration_ms: seg.gpu_seconds * 1000.0,
            gpu_seconds: seg.gpu_seconds,
            frames: seg.frames,
            bytes: seg.bytes,
        }
    }

    /// Runs a started session: moves client events, node messages, registry changes and timers
    /// into its [`GameSession`], and executes what the rules ask for.
    #[allow(clippy::too_many_arguments)]
    async fn drive(
        self: Arc<Self>,
        key: ApiKey,
        client: Location,
        mut params: GameParams,
        relay: Arc<Relay>,
        attached: Attached,
        mut events: mpsc::Receiver<ClientEvent>,
        notices: mpsc::Sender<Notice>,
        _cap: CapGuard,
        mut ledgering: Ledgering,
    ) {
        info!(node = %attached.node.id, "game session started");
        let session_id = relay.session_id;
        // The node that served last, for the session's access-log line.
        let mut last_node = attached.node.id.clone();
        let mut rules = GameSession::new(
            self.clock.now(),
            Rules::from_config(&self.config),
            node_ref(&attached.node),
        );
        let mut attached = Some(attached);
        // Revoking the key ends the session at once, whichever transport the player uses.
        let revoked = self.auth.keys.revocation(&key.id);
        let mut changes = self.directory.registry.subscribe();
        let mut registry_open = true;
        // The open segment's usage row: written every checkpoint as `in_progress` and rewritten
        // in place with the final totals, so a killed gateway loses at most one interval of
        // metering and nothing is counted twice.
        let mut ledger: Option<(u32, watch::Sender<Option<UsageRecord>>)> = None;
        let totals = || Totals {
            frames: relay.frames.load(Ordering::Relaxed),
            bytes: relay.bytes.load(Ordering::Relaxed),
        };
        loop {
            while let Some(action) = rules.poll_action() {
                match action {
                    Action::Attach { exclude } => {
                        // A change that lands while this attempt runs makes a failed one try
                        // again.
                        changes.borrow_and_update();
                        let found = self
                            .attach(&client, &params, session_id, &exclude, Pin::Any)
                            .await;
                        rules.observe(totals());
                        match found {
                            Ok(a) => {
                                let node = node_ref(&a.node);
                                last_node.clone_from(&a.node.id);
                                attached = Some(a);
                                rules.handle_attached(self.clock.now(), node);
                            }
                            Err(NoNode::Codec(codec)) => {
                                rules.handle_attach_failed_for_codec(self.clock.now(), codec)
                            }
                            Err(_) => rules.handle_attach_failed(self.clock.now()),
                        }
                    }
                    Action::ToNode(cmd) => {
                        if let Some(a) = attached.as_mut() {
                            to_node(a, cmd).await;
                        }
                    }
                    Action::Serve(Some(_)) => {
                        relay.set_node(attached.as_ref().map(|a| a.node.clone()))
                    }
                    Action::Serve(None) => {
                        relay.set_node(None);
                        if let Some(a) = attached.take() {
                            warn!(node = %a.node.id, window_ms = self.config.pause_window_ms, "serving node lost; pausing the session");
                        }
                    }
                    Action::Notify(n) => {
                        let _ = notices.send(n).await;
                    }
                    Action::Usage(seg) => {
                        let row = self.usage_record(
                            &key,
                            &relay,
                            &params,
                            &seg,
                            ledgering.usage_tag.as_deref(),
                        );
                        if ledger.as_ref().is_none_or(|(i, _)| *i != seg.index) {
                            let (tx, rx) = watch::channel(None);
                            tokio::spawn(
                                usage_row_writer(self.meter.store.clone(), rx).in_current_span(),
                            );
                            ledger = Some((seg.index, tx));
                        }
                        if let Some((_, tx)) = &ledger {
                            tx.send_replace(Some(row));
                        }
                        if seg.is_final() {
                            // The writer writes the final row and ends when its sender drops.
                            ledger = None;
                        }
                    }
                    Action::PauseEnded(how) => {
                        self.metrics
                            .game_pauses
                            .get_or_create(&labels([("outcome", how)]))
                            .inc();
                        if how == "expired" {
                            warn!("no node took the session within the pause window; ending it");
                        }
                    }
                    Action::VideoInForce(v) => {
                        // A node that takes the session from here on (failover, or a resume
                        // through another gateway) opens it at the size in force.
                        params.width = v.width;
                        params.height = v.height;
                        params.fps = v.fps;
                        relay
                            .video_pixels
                            .store(u64::from(v.width) * u64::from(v.height), Ordering::Relaxed);
                        if let (Some(f), Some(entry)) = (&self.federation, ledgering.dir.as_mut()) {
                            entry.width = v.width;
                            entry.height = v.height;
                            entry.fps = v.fps;
                            entry.updated_at_ms = self.clock.unix_ms();
                            f.publish_session(entry.clone()).await;
                        }
                        info!(
                            width = v.width,
                            height = v.height,
                            fps = v.fps,
                            "video changed"
                        );
                    }
                    Action::Failover {
                        node,
                        same_node,
                        paused,
                    } => {
                        self.metrics.game_failovers.inc();
                        // The directory names the new node, so a resume elsewhere finds it.
                        if let (Some(f), Some(entry)) = (&self.federation, ledgering.dir.as_mut()) {
                            entry.node_id = node.id.clone();
                            entry.updated_at_ms = self.clock.unix_ms();
                            f.publish_session(entry.clone()).await;
                        }
                        info!(node = %node.id, same_node, paused_ms = paused.as_millis() as u64, "session resumed");
                    }
                    Action::Ended {
                        outcome,
                        gpu_seconds,
                        segments,
                    } => {
                        if outcome == "key_revoked" {
                            warn!(key = %key.id, "API key revoked: ending the game session");
                        }
                        self.finish(&relay, outcome, gpu_seconds, segments);
                        if let (Some(f), Some(_)) = (&self.federation, &ledgering.dir) {
                            f.forget_session(relay.session_id);
                        }
                        crate::access::SessionLine {
                            transport: relay.transport,
                            session_id: Some(session_id),
                            key_id: Some(&key.id),
                            game: &params.title,
                            node: Some(&last_node),
                            country: client.country.as_ref().map(|c| c.as_str()),
                            duration_ms: u64::try_from(
                                self.clock
                                    .now()
                                    .saturating_duration_since(relay.started)
                                    .as_millis(),
                            )
                            .unwrap_or(u64::MAX),
                            frames: relay.frames.load(Ordering::Relaxed),
                            bytes: relay.bytes.load(Ordering::Relaxed),
                            nodes: segments,
                            outcome,
                        }
                        .emit();
                    }
                }
            }
            if rules.is_ended() {
                return;
            }
            let timeout = rules.poll_timeout();
            let paused = rules.is_paused();
            enum Ev {
                Revoked,
                Timeout,
                Client(Option<ClientEvent>),
                Node(Option<Message>),
                Changed(bool),
            }
            let ev = tokio::select! {
                biased;
                _ = revoked.cancelled() => Ev::Revoked,
                _ = async { tokio::time::sleep_until(tokio::time::Instant::from_std(timeout.unwrap_or_else(Instant::now))).await }, if timeout.is_some() => Ev::Timeout,
                e = events.recv() => Ev::Client(e),
                m = node_event(&mut attached) => Ev::Node(m),
                r = changes.changed(), if paused && registry_open => Ev::Changed(r.is_ok()),
            };
            rules.observe(totals());
            let now = self.clock.now();
            match ev {
                Ev::Revoked => rules.handle_revoked(now),
                Ev::Timeout => rules.handle_timeout(now),
                Ev::Client(e) => rules.handle_client(now, e),
                Ev::Node(Some(Message::Ended(e))) => rules.handle_node_ended(now, e.reason),
                // Only the serving node's session stream is read here, so nothing another node
                // sends can reach this session.
                Ev::Node(Some(Message::SetVideo(v))) => rules.handle_node_video(v),
                Ev::Node(Some(Message::Error(e))) if e.code == VIDEO_REFUSED => {
                    rules.handle_node_video_refused(e.message)
                }
                Ev::Node(Some(Message::Rumble(r))) => rules.handle_node_rumble(now, r),
                Ev::Node(Some(_)) => {}
                Ev::Node(None) => rules.handle_node_lost(now),
                Ev::Changed(true) => rules.handle_registry_changed(now),
                // No more registry changes: the window's end decides.
                Ev::Changed(false) => registry_open = false,
            }
        }
    }

    fn finish(&self, relay: &Relay, outcome: &'static str, gpu_seconds: f64, segments: u32) {
        self.sessions.games.remove(relay.session_id);
        self.metrics.active_game_sessions.dec();
        self.count_start(relay.transport, outcome);
        info!(
            outcome,
            frames = relay.frames.load(Ordering::Relaxed),
            bytes = relay.bytes.load(Ordering::Relaxed),
            gpu_seconds,
            nodes = segments,
            dropped_late = relay.dropped_late.load(Ordering::Relaxed),
            dropped_overload = relay.dropped_overload.load(Ordering::Relaxed),
            dropped_shed = relay.dropped_shed.load(Ordering::Relaxed),
            dropped_foreign = relay.dropped_foreign.load(Ordering::Relaxed),
            dropped_relay = relay.dropped_relay.load(Ordering::Relaxed),
            audio_packets = relay.audio_packets.load(Ordering::Relaxed),
            audio_foreign = relay.audio_foreign.load(Ordering::Relaxed),
            audio_dropped = relay.audio_dropped.load(Ordering::Relaxed),
            "game session ended"
        );
    }

    /// Forwards every frame stream a node opens to the session's client. Runs once per node
    /// connection, for as long as it lives.
    ///
    /// A frame is accepted only from the connection of the node serving its session (the id in
    /// the header is the sender's claim, and nodes are run by strangers), then only if it is
    /// within its age and in-flight budgets ([`FrameBudget::admit`]); otherwise it is refused
    /// before a byte of its payload is read. A frame for an unknown session and a foreign frame
    /// get the same answer, so a node cannot probe which ids are live.
    pub async fn node_frames_loop(self: Arc<Self>, conn: quinn::Connection) {
        let budget = FrameBudget::from_config(&self.config);
        let foreign_log = Arc::new(ForeignLog::new());
        // How old this node's frames usually are (its path and clock), for shedding under
        // overload; shared by all its sessions.
        let floor = Arc::new(std::sync::Mutex::new(AgeFloor::default()));
        // For the log only: the loop starts once the node is registered.
        let node_id: Arc<str> = self
            .directory
            .registry
            .list()
            .into_iter()
            .find(|n| n.conn.stable_id() == conn.stable_id())
            .map_or_else(|| "unregistered".into(), |n| n.id.as_str().into());
        // Audio comes as datagrams on the same connection, for as long as it lives.
        // It ends by itself when the connection closes.
        tokio::spawn(self.clone().node_audio_loop(conn.clone(), node_id.clone()));
        while let Ok(recv) = conn.accept_uni().await {
            let this = self.clone();
            let conn = conn.clone();
            let foreign_log = foreign_log.clone();
            let node_id = node_id.clone();
            let floor = floor.clone();
            tokio::spawn(async move {
                this.relay_frame(recv, &conn, budget, &floor, &foreign_log, &node_id)
                    .await
            });
        }
    }

    async fn relay_frame(
        &self,
        mut recv: quinn::RecvStream,
        conn: &quinn::Connection,
        budget: FrameBudget,
        floor: &std::sync::Mutex<AgeFloor>,
        foreign_log: &ForeignLog,
        node_id: &str,
    ) {
        let header = match recv_frame_header(&mut recv).await {
            Ok(h) => h,
            Err(e) => {
                debug!(error = %e, "bad frame stream from node");
                return;
            }
        };
        let Some(relay) = self.sessions.games.get(header.session_id) else {
            // A peer's session on this node (`game_route = "trunk"`): to the peer, as it came.
            if let Some(peer) = self.trunk_peer_for(header.session_id, conn) {
                let within = Duration::from_millis(self.config.frame_budget_ms.max(1));
                if !crate::trunk::forward_frame(recv, &header, &peer, within).await {
                    debug!(
                        session = header.session_id,
                        "frame not forwarded over the trunk"
                    );
                }
                return;
            }
            let _ = recv.stop(nearpath_protocol::app_code::STREAM_REFUSED);
            return;
        };
        if !relay.is_served_by(conn) {
            let _ = recv.stop(nearpath_protocol::app_code::STREAM_REFUSED);
            self.count_drop(&relay, DropReason::Foreign);
            foreign_log.note(node_id, header.session_id);
            return;
        }
        // The node encoded this frame whether or not it reaches the player in time.
        relay.count_encoded();
        let bytes = FrameBudget::frame_bytes(&header);
        let verdict = {
            let mut floor = floor.lock().unwrap_or_else(|p| p.into_inner());
            let mut f = relay.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            budget.admit(
                &mut f,
                &mut floor,
                self.saturation.is_saturated(),
                self.clock.unix_us(),
                header.capture_ts_us,
                bytes,
            )
        };
        let remaining_us = match verdict {
            Verdict::Forward { remaining_us } => remaining_us,
            Verdict::Drop(reason) => {
                let _ = recv.stop(nearpath_protocol::app_code::STREAM_REFUSED);
                self.count_drop(&relay, reason);
                relay.request_keyframe();
                return;
            }
        };
        let _slot = FlightSlot {
            relay: relay.clone(),
            bytes,
        };
        let write_by = tokio::time::Instant::now() + Duration::from_micros(remaining_us);
        let result = match &relay.sink {
            FrameSink::Quic(client) => {
                // The deadline is for the frame's bytes leaving; its acknowledgement comes a
                // round trip (and a delayed-ack allowance) later.
                let acked_by = write_by + client.rtt() + ACK_DELAY_ALLOWANCE;
                relay_frame_by(recv, &header, client, MAX_VIDEO_FRAME, write_by, acked_by)
                    .await
                    .map_err(|e| e.to_string())
            }
            FrameSink::WebTransport(wt) => {
                let acked_by = write_by + wt.conn.rtt() + ACK_DELAY_ALLOWANCE;
                relay_frame_framed(
                    recv,
                    &header,
                    &wt.conn,
                    MAX_VIDEO_FRAME,
                    write_by,
                    acked_by,
                    &wt.uni,
                )
                .await
                .map_err(|e| e.to_string())
            }
            FrameSink::Channel { frames: tx, .. } => {
                match tokio::time::timeout_at(write_by, recv_frame_rest(recv, &header)).await {
                    Ok(Ok(payload)) => {
                        let n = payload.len() as u64;
                        match tx.try_send((header, payload)) {
                            Ok(()) => Ok(Relayed::Delivered(n)),
                            // The session task is behind: drop, never queue.
                            Err(mpsc::error::TrySendError::Full(_)) => Ok(Relayed::Abandoned),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                    Ok(Err(e)) => Err(e),
                    // Dropping the stream stops it.
                    Err(_) => Ok(Relayed::Abandoned),
                }
            }
        };
        match result {
            Ok(Relayed::Delivered(n)) => {
                relay.frames.fetch_add(1, Ordering::Relaxed);
                relay.bytes.fetch_add(n, Ordering::Relaxed);
                self.metrics.game_frames_relayed.inc();
                self.metrics.game_relayed_bytes.inc_by(n);
                // A node clock ahead of ours reads as age 0, as in the frame budget.
                let age_us = self.clock.unix_us().saturating_sub(header.capture_ts_us);
                self.metrics
                    .game_frame_latency_seconds
                    .observe(age_us as f64 / 1e6);
            }
            Ok(Relayed::Abandoned) => {
                self.count_drop(&relay, DropReason::Overload);
                relay.request_keyframe();
            }
            Err(e) => {
                debug!(error = %e, "frame not relayed");
                self.count_drop(&relay, DropReason::Relay);
                // A frame the peer abandoned on its way over the trunk (its node's frame was
                // late there) is lost to the player like an overloaded one: the picture needs
                // a keyframe to recover.
                if relay.node().is_some_and(|n| n.conn.is_remote()) {
                    relay.request_keyframe();
                }
            }
        }
    }

    /// Forwards a node's audio datagrams to the sessions' players. Runs once per node
    /// connection, beside [`GameService::node_frames_loop`].
    ///
    /// Like a frame, an audio datagram is accepted only from the connection of the node serving
    /// its session now (during failover: only the new node); a datagram for an unknown session
    /// and a foreign one get the same treatment (dropped and counted, `foreign`), so a node
    /// cannot probe which ids are live. A malformed one is dropped and counted (`malformed`).
    /// A native player gets the datagram unchanged; a browser session gets the decoded packet
    /// on its channel. Nothing here waits: a packet the player cannot take now is dropped.
    pub async fn node_audio_loop(self: Arc<Self>, conn: quinn::Connection, node_id: Arc<str>) {
        let foreign_log = ForeignLog::new();
        while let Ok(dgram) = conn.read_datagram().await {
            self.relay_audio(&conn, dgram, &foreign_log, &node_id);
        }
    }

    /// One audio datagram from a node (see [`GameService::node_audio_loop`]).
    pub(crate) fn relay_audio(
        &self,
        conn: &quinn::Connection,
        dgram: Bytes,
        foreign_log: &ForeignLog,
        node_id: &str,
    ) {
        let packet = match AudioPacket::decode(&dgram) {
            Ok(p) => p,
            Err(e) => {
                debug!(error = %e, node = node_id, "malformed audio datagram from node");
                self.count_audio_drop(AudioDrop::Malformed);
                return;
            }
        };
        let relay = match self.sessions.games.get(packet.session_id) {
            Some(relay) if relay.is_served_by(conn) => relay,
            // A peer's session on this node (`game_route = "trunk"`): to the peer, unchanged.
            None if self.trunk_peer_for(packet.session_id, conn).is_some() => {
                if let Some(peer) = self.trunk_peer_for(packet.session_id, conn) {
                    let _ = peer.send_datagram(dgram);
                }
                return;
            }
            other => {
                if let Some(relay) = other {
                    relay.audio_foreign.fetch_add(1, Ordering::Relaxed);
                }
                self.count_audio_drop(AudioDrop::Foreign);
                foreign_log.note_audio(node_id, packet.session_id);
                return;
            }
        };
        let sent = match &relay.sink {
            FrameSink::Quic(client) => client.send_datagram(dgram).is_ok(),
            FrameSink::WebTransport(wt) => wt.conn.send_datagram(wt.datagram(&dgram)).is_ok(),
            FrameSink::Channel { audio, .. } => audio.try_send(packet).is_ok(),
        };
        if sent {
            relay.audio_packets.fetch_add(1, Ordering::Relaxed);
            self.metrics.game_audio_relayed.inc();
        } else {
            relay.audio_dropped.fetch_add(1, Ordering::Relaxed);
            self.count_audio_drop(AudioDrop::Relay);
        }
    }

    /// The peer connection a frame or audio datagram of session `session_id` from node
    /// connection `conn` goes to, when a peer runs that session on that node over the trunk.
    fn trunk_peer_for(
        &self,
        session_id: u64,
        conn: &quinn::Connection,
    ) -> Option<quinn::Connection> {
        self.trunk
            .get()?
            .games()
            .peer_for(session_id, conn.stable_id())
    }

    fn count_audio_drop(&self, reason: AudioDrop) {
        self.metrics
            .game_audio_dropped
            .get_or_create(&labels([("reason", reason.as_str())]))
            .inc();
    }

    /// Forwards a client's input datagrams to the node serving the session. Runs once per
    /// client connection.
    pub async fn client_input_loop(self: Arc<Self>, conn: quinn::Connection) {
        while let Ok(dgram) = conn.read_datagram().await {
            let Ok(input) = InputDatagram::decode(&dgram) else {
                continue;
            };
            let Some(relay) = self.sessions.games.get(input.session_id) else {
                continue;
            };
            // Only the session's own client may steer it.
            match &relay.sink {
                FrameSink::Quic(c) if c.stable_id() == conn.stable_id() => {}
                _ => continue,
            }
            relay.inputs.fetch_add(1, Ordering::Relaxed);
            if let Some(node) = relay.node() {
                let _ = node.conn.send_datagram(Bytes::copy_from_slice(&dgram));
            }
        }
    }

    /// Forwards a WebTransport player's input datagrams to the node serving its session. Runs
    /// once per WebTransport connection. A datagram without this connection's session prefix,
    /// one that is not an input datagram, and one naming a session this connection does not
    /// play are ignored and counted (`nearpath_webtransport_datagrams_dropped_total`).
    pub async fn webtransport_input_loop(self: Arc<Self>, sink: WtSink) {
        let conn = sink.conn.clone();
        let dropped = |reason: &str| {
            self.metrics
                .webtransport_datagrams_dropped
                .get_or_create(&labels([("reason", reason)]))
                .inc();
        };
        let mut echoes = EchoBudget::default();
        while let Ok(dgram) = conn.read_datagram().await {
            let Some(payload) = sink.strip_datagram(&dgram) else {
                dropped("prefix");
                continue;
            };
            let Ok(input) = InputDatagram::decode(payload) else {
                dropped("malformed");
                continue;
            };
            let relay = self.sessions.games.get(input.session_id);
            // Only the session's own client may steer it; an unknown id is answered the same.
            let Some(relay) = relay.filter(|r| {
                matches!(&r.sink, FrameSink::WebTransport(w) if w.conn.stable_id() == conn.stable_id())
            }) else {
                dropped("foreign");
                continue;
            };
            relay.inputs.fetch_add(1, Ordering::Relaxed);
            if let Some(node) = relay.node() {
                let _ = node.conn.send_datagram(Bytes::copy_from_slice(payload));
            }
            // A page has no RTT of its own over WebTransport where the browser lacks
            // `WebTransport.getStats()` (headless Chromium), so the gateway echoes its pings,
            // unchanged, within a budget: an echo is no larger than the ping, and a flood
            // gets a few answers a second, not one each.
            if matches!(input.event, InputEvent::Ping { .. }) {
                let answered = if echoes.allow(self.clock.now()) {
                    let _ = conn.send_datagram(sink.datagram(payload));
                    "yes"
                } else {
                    "rate_limited"
                };
                self.metrics
                    .webtransport_pings
                    .get_or_create(&labels([("answered", answered)]))
                    .inc();
            }
        }
    }

    /// Serves a `PlayRequest` on a native client's bidi stream until the session ends.
    pub async fn serve_play(
        self: Arc<Self>,
        conn: quinn::Connection,
        ctl_tx: quinn::SendStream,
        ctl_rx: FramedRecv,
        req: PlayRequest,
    ) {
        let sink = FrameSink::Quic(conn.clone());
        self.serve_play_via(conn, sink, "quic", ctl_tx, ctl_rx, req)
            .await
    }

    /// [`Self::serve_play`] for a player whose frames go to `sink` over `transport`
    /// (`"quic"`, or `"webtransport"`: the same protocol on a WebTransport bidi stream).
    pub async fn serve_play_via(
        self: Arc<Self>,
        conn: quinn::Connection,
        sink: FrameSink,
        transport: &'static str,
        mut ctl_tx: quinn::SendStream,
        ctl_rx: FramedRecv,
        req: PlayRequest,
    ) {
        let client = self.locate(conn.remote_address().ip());
        let country = client.country;
        // A play refused or sent elsewhere gets its access line here; a session that starts
        // gets one when it ends.
        let refused = |key_id: Option<&str>, outcome: &str| {
            crate::access::SessionLine {
                transport,
                key_id,
                game: &req.game,
                country: country.as_ref().map(|c| c.as_str()),
                outcome,
                ..Default::default()
            }
            .emit()
        };
        let key: ApiKey = match self.authenticate(Some(&req.api_key)).await {
            Ok(k) => k,
            Err(e) => {
                refused(None, e.kind.as_str());
                let _ = send(&mut ctl_tx, &err("unauthorized", e.message)).await;
                let _ = ctl_tx.finish();
                return;
            }
        };
        let params = match self.session_params(&req) {
            Ok(p) => GameParams {
                codec: self.pick_codec(&client, &p, &req.codecs),
                ..p
            },
            Err(e) => {
                refused(Some(&key.id), "bad_request");
                let _ = send(&mut ctl_tx, &err("bad_request", e)).await;
                let _ = ctl_tx.finish();
                return;
            }
        };
        let placed = self
            .place_session(
                &key,
                client,
                Some(conn.remote_address().ip()),
                conn.remote_address().to_string(),
                transport,
                params,
                sink,
            )
            .await;
        let started = match placed {
            Ok(Placed::Here(s)) => s,
            Ok(Placed::Redirect(to)) => {
                refused(Some(&key.id), "redirected");
                let msg = Message::Redirect(Redirect {
                    gateway_id: to.gateway.id,
                    quic_address: to.gateway.quic_address,
                    cert_sha256: to.gateway.cert_sha256,
                    http_url: to.gateway.http_url,
                    ticket: to.ticket,
                });
                let _ = send(&mut ctl_tx, &msg).await;
                let _ = ctl_tx.finish();
                return;
            }
            Err(e) => {
                refused(Some(&key.id), &e.code);
                // Native players see the core's code as is (`unknown_game`, `no_capacity`, ...).
                let msg = Message::Error(ErrorInfo {
                    code: e.code.to_string(),
                    message: e.message,
                    retryable: e.retryable,
                });
                let _ = send(&mut ctl_tx, &msg).await;
                let _ = ctl_tx.finish();
                return;
            }
        };
        self.run_play(conn, ctl_tx, ctl_rx, started).await
    }

    /// Serves a `PlayTicket` (a client a peer redirected here) on a native client's bidi
    /// stream until the session ends. The API key is authenticated as for any session and must
    /// be the one the ticket was issued to; the ticket must verify, be meant for this gateway
    /// and this client address, be unexpired and unused.
    pub async fn serve_ticket(
        self: Arc<Self>,
        conn: quinn::Connection,
        ctl_tx: quinn::SendStream,
        ctl_rx: FramedRecv,
        req: PlayTicket,
    ) {
        let sink = FrameSink::Quic(conn.clone());
        self.serve_ticket_via(conn, sink, "quic", ctl_tx, ctl_rx, req)
            .await
    }

    /// [`Self::serve_ticket`] for a player whose frames go to `sink` over `transport` (a
    /// WebTransport player a peer redirected here): the same checks and the same errors.
    pub async fn serve_ticket_via(
        self: Arc<Self>,
        conn: quinn::Connection,
        sink: FrameSink,
        transport: &'static str,
        mut ctl_tx: quinn::SendStream,
        ctl_rx: FramedRecv,
        req: PlayTicket,
    ) {
        let key: ApiKey = match self.authenticate(Some(&req.api_key)).await {
            Ok(k) => k,
            Err(e) => {
                let _ = send(&mut ctl_tx, &err("unauthorized", e.message)).await;
                let _ = ctl_tx.finish();
                return;
            }
        };
        let Some(federation) = self.federation.clone() else {
            let e = bad_ticket("this gateway is not in a federation");
            return refuse_play(&mut ctl_tx, e).await;
        };
        let ip = conn.remote_address().ip();
        let claims = match federation
            .accept(&req.ticket, ip, &key.id, self.clock.unix_ms())
            .await
        {
            Ok(c) => c,
            Err(e) => {
                warn!(client = %conn.remote_address(), error = %e, "redirect ticket refused");
                self.count_start(transport, BAD_TICKET);
                return refuse_play(&mut ctl_tx, bad_ticket(e.to_string())).await;
            }
        };
        info!(issuer = %claims.issuer, node = %claims.node_id, "redirect ticket accepted");
        let client = self.locate(ip);
        let started = match self
            .start_ticketed(
                &key,
                &claims,
                client,
                conn.remote_address().to_string(),
                transport,
                sink,
            )
            .await
        {
            Ok(s) => s,
            Err(e) => return refuse_play(&mut ctl_tx, e).await,
        };
        self.run_play(conn, ctl_tx, ctl_rx, started).await
    }

    /// The sessions-directory entry a resume names, if `key` may resume it with `token`: the
    /// checks every transport's resume makes (native `PlayResume`, WebTransport, and a WHEP
    /// offer with `Nearpath-Resume`), with the same errors. A forged or spent token, another
    /// key's session, an unknown id and a token of the wrong shape all get the same
    /// `bad_resume`, so nothing can be probed; each is counted under `transport`.
    pub async fn resume_entry(
        &self,
        key: &ApiKey,
        session_id: u64,
        token: &str,
        transport: &'static str,
    ) -> Result<SessionDirEntry, CoreError> {
        let bad = || {
            CoreError::new(
                Kind::Forbidden,
                BAD_RESUME,
                "no session to resume with this id, key and token",
            )
            .with_retryable(false)
        };
        let Some(federation) = self.federation.clone() else {
            return Err(CoreError::new(
                Kind::Forbidden,
                BAD_RESUME,
                "this gateway is not in a federation: sessions cannot move to it",
            )
            .with_retryable(false));
        };
        let token_ok = token.len() == RESUME_TOKEN_LEN
            && token
                .bytes()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        if !token_ok || session_id == 0 {
            self.count_start(transport, BAD_RESUME);
            return Err(bad());
        }
        let entry = match federation.lookup_session(session_id).await {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "sessions directory unreadable");
                return Err(CoreError::new(
                    Kind::Unavailable,
                    "store_unavailable",
                    "the sessions directory cannot be read; try again",
                )
                .with_retry_after_s(1));
            }
        };
        let hash = crate::store::hash_secret(token);
        let Some(entry) = entry.filter(|e| {
            crate::ticket::ct_eq(e.resume_token_sha256.as_bytes(), hash.as_bytes())
                && e.key_id == key.id
        }) else {
            self.count_start(transport, BAD_RESUME);
            return Err(bad());
        };
        Ok(entry)
    }

    /// Serves a `PlayResume` (a player whose gateway died resumes its session here) on a
    /// native client's bidi stream until the session ends. The key must be the session's and
    /// the token its latest; then the session continues under its id ([`Self::start_resumed`]).
    pub async fn serve_resume(
        self: Arc<Self>,
        conn: quinn::Connection,
        ctl_tx: quinn::SendStream,
        ctl_rx: FramedRecv,
        req: PlayResume,
    ) {
        let sink = FrameSink::Quic(conn.clone());
        self.serve_resume_via(conn, sink, "quic", ctl_tx, ctl_rx, req)
            .await
    }

    /// [`Self::serve_resume`] for a player whose frames go to `sink` over `transport` (a
    /// WebTransport player resuming here): the same checks and the same errors; the resumed
    /// session's frames go to `sink`.
    pub async fn serve_resume_via(
        self: Arc<Self>,
        conn: quinn::Connection,
        sink: FrameSink,
        transport: &'static str,
        mut ctl_tx: quinn::SendStream,
        ctl_rx: FramedRecv,
        req: PlayResume,
    ) {
        let key: ApiKey = match self.authenticate(Some(&req.api_key)).await {
            Ok(k) => k,
            Err(e) => {
                let _ = send(&mut ctl_tx, &err("unauthorized", e.message)).await;
                let _ = ctl_tx.finish();
                return;
            }
        };
        let entry = match self
            .resume_entry(&key, req.session_id, &req.token, transport)
            .await
        {
            Ok(e) => e,
            Err(e) => {
                if e.code == BAD_RESUME {
                    warn!(client = %conn.remote_address(), session = req.session_id, "resume refused");
                }
                return refuse_play(&mut ctl_tx, e).await;
            }
        };
        let ip = conn.remote_address().ip();
        let started = match self
            .start_resumed(
                &key,
                &entry,
                self.locate(ip),
                conn.remote_address().to_string(),
                transport,
                sink,
            )
            .await
        {
            Ok(s) => s,
            Err(e) => return refuse_play(&mut ctl_tx, e).await,
        };
        self.run_play(conn, ctl_tx, ctl_rx, started).await
    }

    /// Answers `PlayStarted` and runs a native player's session until it ends.
    async fn run_play(
        self: Arc<Self>,
        conn: quinn::Connection,
        mut ctl_tx: quinn::SendStream,
        mut ctl_rx: FramedRecv,
        started: Started,
    ) {
        let Started {
            session_id,
            params,
            events,
            mut notices,
            resume_token,
            ..
        } = started;
        // The token goes first, so that a client has it as soon as the session starts.
        if let Some(token) = resume_token {
            if send(&mut ctl_tx, &Message::ResumeToken(ResumeToken { token }))
                .await
                .is_err()
            {
                let _ = events.send(ClientEvent::Gone).await;
                return;
            }
        }
        let msg = Message::PlayStarted(PlayStarted {
            session_id,
            width: params.width,
            height: params.height,
            fps: params.fps,
            bitrate_kbps: params.bitrate_kbps,
            codec: params.codec,
        });
        if send(&mut ctl_tx, &msg).await.is_err() {
            let _ = events.send(ClientEvent::Gone).await;
            return;
        }
        let mut client_open = true;
        // A player's `Close` is answered with `Ended` once the session has let its node go and
        // freed its slot here (the driver drops its notices last), so a player who waits for it
        // may start again at once.
        let mut closing = false;
        // The gateway's own judgement of whether the player is still there, whatever idle
        // timeout its client asked for (see `crate::player`).
        let mut silence =
            PlayerSilence::new(Duration::from_millis(self.config.player_idle_timeout_ms));
        let mut liveness = tokio::time::interval(silence.sample_interval());
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = liveness.tick() => {
                    let now = self.clock.now();
                    silence.handle_sample(now, ConnSample::of(&conn.stats()));
                    if silence.poll_gone(now) {
                        info!(
                            session = session_id,
                            idle_ms = self.config.player_idle_timeout_ms,
                            "the player stopped answering; ending the session"
                        );
                        let _ = events.send(ClientEvent::Lost).await;
                        break;
                    }
                }
                m = ctl_rx.next(), if client_open => {
                    let ev = match m {
                        Ok(Some(Message::ForceKeyframe)) => Some(ClientEvent::ForceKeyframe),
                        Ok(Some(Message::SetBitrate(b))) => Some(ClientEvent::SetBitrate(b.kbps)),
                        Ok(Some(Message::SetVideo(v))) => Some(ClientEvent::SetVideo(v)),
                        Ok(Some(Message::Close(c))) => Some(ClientEvent::Close(c.reason)),
                        Ok(Some(_)) => None,
                        Ok(None) => { client_open = false; None }
                        // A stream that fails with its connection says what the connection says.
                        Err(_) => Some(conn.close_reason().map_or(ClientEvent::Gone, |e| closed_event(&e))),
                    };
                    if let Some(ev) = ev {
                        let close = matches!(ev, ClientEvent::Close(_));
                        let last = matches!(ev, ClientEvent::Gone | ClientEvent::Lost);
                        let _ = events.send(ev).await;
                        if close {
                            closing = true;
                            client_open = false;
                        }
                        if last {
                            break;
                        }
                    }
                }
                n = notices.recv() => match n {
                    Some(Notice::Paused(reason)) => { let _ = send(&mut ctl_tx, &Message::Paused(Paused { reason })).await; }
                    Some(Notice::Resumed) => { let _ = send(&mut ctl_tx, &Message::Resumed).await; }
                    Some(Notice::VideoChanged(v)) => { let _ = send(&mut ctl_tx, &Message::SetVideo(v)).await; }
                    Some(Notice::VideoRefused(message)) => {
                        let refused = Message::Error(ErrorInfo { code: VIDEO_REFUSED.into(), message, retryable: false });
                        let _ = send(&mut ctl_tx, &refused).await;
                    }
                    Some(Notice::Rumble(r)) => { let _ = send(&mut ctl_tx, &Message::Rumble(r)).await; }
                    Some(Notice::Ended(reason)) => {
                        let _ = send(&mut ctl_tx, &Message::Ended(Ended { reason })).await;
                        break;
                    }
                    None => {
                        if closing {
                            let ended = Message::Ended(Ended { reason: "closed by the player".into() });
                            let _ = send(&mut ctl_tx, &ended).await;
                        }
                        break;
                    }
                },
                e = conn.closed() => {
                    let _ = events.send(closed_event(&e)).await;
                    break;
                }
            }
        }
        let _ = ctl_tx.finish();
    }
}

/// How many pings a WebTransport connection gets echoed: [`EchoBudget::BURST`] at once, then
/// one per [`EchoBudget::INTERVAL`] (a page pings once a second).
#[derive(Debug, Default)]
struct EchoBudget {
    /// Echoes still allowed, and when the budget last grew.
    tokens: Option<(u32, Instant)>,
}

impl EchoBudget {
    const BURST: u32 = 4;
    const INTERVAL: Duration = Duration::from_millis(250);

    fn allow(&mut self, now: Instant) -> bool {
        let (mut tokens, mut at) = self.tokens.unwrap_or((Self::BURST, now));
        while tokens < Self::BURST && now.duration_since(at) >= Self::INTERVAL {
            tokens += 1;
            at += Self::INTERVAL;
        }
        if tokens == Self::BURST {
            at = now;
        }
        let allowed = tokens > 0;
        self.tokens = Some((tokens - u32::from(allowed), at));
        allowed
    }
}

/// Refuses a play stream: the core error as the native `Error`, then the stream finishes.
async fn refuse_play(tx: &mut quinn::SendStream, e: CoreError) {
    let msg = Message::Error(ErrorInfo {
        code: e.code.to_string(),
        message: e.message,
        retryable: e.retryable,
    });
    let _ = send(tx, &msg).await;
    let _ = tx.finish();
}

/// Which nodes a session may be attached to.
#[derive(Debug, Clone, Copy)]
enum Pin<'a> {
    /// Any eligible node (the geofence and placement rules decide).
    Any,
    /// Exactly this node, without evaluating the geofence again (a peer's ticket: the peer
    /// evaluated it with the client's address).
    Ticket(&'a str),
    /// Exactly this node, if the geofence allows it (a resumed session's own node).
    Resume(&'a str),
}

/// What a session's driver writes besides the relay: its usage rows' request-id tag (a resumed
/// session's) and its sessions-directory entry (in a federation).
struct Ledgering {
    usage_tag: Option<String>,
    dir: Option<SessionDirEntry>,
}

/// The error a player sees when no node takes its session.
fn no_node_error(no: NoNode, params: &GameParams) -> CoreError {
    match no {
        NoNode::Denied(r) => CoreError::new(Kind::Geofence, "geofence", format!("geofence: {r}")),
        NoNode::Unknown => CoreError::new(
            Kind::NotFound,
            "unknown_game",
            format!("no node serves {}", params.title),
        ),
        NoNode::Full => {
            CoreError::no_capacity("every node serving this game is busy").with_retry_after_s(2)
        }
        NoNode::Failed(e) => CoreError::no_capacity(e).with_retry_after_s(2),
        // Retryable at the gateway that issued the ticket, which routes afresh.
        NoNode::TicketNode => CoreError::new(
            Kind::Unavailable,
            TICKET_NODE_UNAVAILABLE,
            "the node the ticket names is not attached to this gateway",
        ),
        NoNode::Codec(codec) => CoreError::new(
            Kind::Unprocessable,
            "unsupported_codec",
            format!("no node encodes {codec}"),
        ),
    }
}

/// Sends a command to the serving node's session stream.
async fn to_node(a: &mut Attached, cmd: NodeCommand) {
    use nearpath_protocol::message::{Close, SetBitrate};
    match cmd {
        NodeCommand::ForceKeyframe => {
            let _ = send(&mut a.tx, &Message::ForceKeyframe).await;
        }
        NodeCommand::SetBitrate(kbps) => {
            let _ = send(&mut a.tx, &Message::SetBitrate(SetBitrate { kbps })).await;
        }
        NodeCommand::SetVideo(v) => {
            let _ = send(&mut a.tx, &Message::SetVideo(v)).await;
        }
        NodeCommand::Close {
            reason,
            bounded: false,
        } => {
            let _ = send(&mut a.tx, &Message::Close(Close { reason })).await;
            let _ = a.tx.finish();
        }
        NodeCommand::Close {
            reason,
            bounded: true,
        } => {
            // Past the bound the stream is reset: the node's session ends either way.
            let close = Message::Close(Close { reason });
            match tokio::time::timeout(REVOKE_SEND_BOUND, send(&mut a.tx, &close)).await {
                Ok(Ok(())) => {
                    let _ = a.tx.finish();
                }
                _ => {
                    let _ = a.tx.reset(nearpath_protocol::app_code::STREAM_CANCELLED);
                }
            }
        }
    }
}

/// The span of a game session. It joins the client's trace when `params.traceparent` holds
/// the client's context (from its `PlayRequest` or the offer's `traceparent` header; only a
/// valid one is kept), else it starts a trace. `params.traceparent` becomes the span's own
/// context: every `Open` of the session carries it to the node (a failover's node too), whose
/// session span then names this one as its parent. Called before the span is first entered.
fn session_span(
    session_id: u64,
    params: &mut GameParams,
    transport: &'static str,
) -> tracing::Span {
    let span = info_span!(
        "game_session",
        id = session_id,
        game = %params.title,
        transport,
        trace_id = tracing::field::Empty
    );
    let trace = crate::access::TraceParent::for_span(&span, params.traceparent.as_deref());
    span.record("trace_id", trace.trace_id_hex());
    params.traceparent = Some(trace.header());
    span
}

/// Clamps a play request to the configured limits (0 means the default).
pub fn session_params(g: &GameConfig, r: &PlayRequest) -> Result<GameParams, String> {
    let pick = |v: u32, d: u32| if v == 0 { d } else { v };
    let p = GameParams {
        title: r.game.clone(),
        width: pick(r.width, g.default_width),
        height: pick(r.height, g.default_height),
        fps: pick(r.fps, g.default_fps),
        bitrate_kbps: pick(r.bitrate_kbps, g.default_bitrate_kbps),
        // The client's first choice; `GameService::pick_codec` settles it against the nodes.
        codec: r.codecs.first().copied().unwrap_or_default(),
        // The client's trace context until the session's span replaces it with its own
        // (`GameService::session_span`); the decoder kept only a valid one.
        traceparent: r.traceparent.clone(),
    };
    if !p.width.is_multiple_of(2) || !p.height.is_multiple_of(2) || p.width < 16 || p.height < 16 {
        return Err(format!(
            "{}x{} must be even and at least 16x16",
            p.width, p.height
        ));
    }
    if p.width > g.max_width || p.height > g.max_height {
        return Err(format!(
            "{}x{} exceeds the limit {}x{}",
            p.width, p.height, g.max_width, g.max_height
        ));
    }
    if p.fps > g.max_fps {
        return Err(format!("{} fps exceeds the limit {}", p.fps, g.max_fps));
    }
    if p.bitrate_kbps > g.max_bitrate_kbps {
        return Err(format!(
            "{} kbps exceeds the limit {}",
            p.bitrate_kbps, g.max_bitrate_kbps
        ));
    }
    Ok(p)
}

/// Writes a session's usage row as its driver updates it: appended the first time, rewritten
/// in place after (the id is kept), always the latest value (a checkpoint not yet written when
/// a newer one arrives is skipped). Ends after writing the final value, once the driver drops
/// its sender. A failed write is retried with the next value.
async fn usage_row_writer(
    store: Arc<dyn crate::store::Store>,
    mut rows: watch::Receiver<Option<UsageRecord>>,
) {
    let mut id: Option<i64> = None;
    while rows.changed().await.is_ok() {
        let Some(row) = rows.borrow_and_update().clone() else {
            continue;
        };
        let final_row = row.outcome != "in_progress";
        let store = store.clone();
        let result = tokio::task::spawn_blocking(move || match id {
            Some(id) => store.update_usage(id, row),
            None => store.append_usage(row),
        })
        .await;
        match result {
            Ok(Ok(written)) => id = Some(written),
            Ok(Err(e)) if final_row => warn!(error = %e, "game usage record not written"),
            Ok(Err(e)) => warn!(error = %e, "game usage checkpoint not written"),
            Err(e) => warn!(error = %e, "game usage writer failed"),
        }
    }
}

#[cfg(test)]
mod echo_budget_tests {
    use super::EchoBudget;
    use std::time::{Duration, Instant};

    /// A flood of pings gets the burst and then one echo per interval, never one each: the
    /// echo must not make the gateway a reflector for a hostile page.
    #[test]
    fn a_ping_flood_gets_the_burst_then_one_echo_per_interval() {
        let t0 = Instant::now();
        let mut b = EchoBudget::default();
        let burst = (0..100).filter(|_| b.allow(t0)).count();
        assert_eq!(burst, EchoBudget::BURST as usize);
        // A millisecond at a time for a second: four more intervals, four more echoes.
        let later = (1..=1000)
            .filter(|ms| b.allow(t0 + Duration::from_millis(*ms)))
            .count();
        assert_eq!(later, 4);
        // A page pinging once a second is always answered.
        let mut page = EchoBudget::default();
        assert!((0..60).all(|s| page.allow(t0 + Duration::from_secs(s))));
    }
}
