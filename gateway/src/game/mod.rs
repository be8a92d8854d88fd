//! Game sessions: route, relay frames node → client (one QUIC uni stream per frame, forwarded
//! without decoding), relay input datagrams client → node, fail over to another node when the
//! serving one dies, meter usage per node.
//!
//! * [`session`]: the session's rules as a sans-IO state machine on a virtual clock.
//! * [`service`]: [`GameService`], built with the components it uses: starts sessions, runs each
//!   one's driver (which only moves messages and timers), relays frames and input, serves
//!   native players' play streams.
//! * [`redirect`]: sessions for nodes attached to other gateways of the federation (redirect
//!   with a signed ticket) and the tickets peers send here.
//! * [`crate::relay`]: the relay's per-session state and its per-frame rule, shared with the
//!   WebRTC front end and the `Sessions` component.

pub mod redirect;
pub mod service;
pub mod session;

pub use crate::relay::*;
pub use service::{
    bad_ticket, session_params, GameService, Placed, BAD_RESUME, BAD_TICKET, NODE_ANSWER_TIMEOUT,
    RESUME_CONFLICT,
};
