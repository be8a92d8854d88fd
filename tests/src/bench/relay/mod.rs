//! `bench relay-latency`, `bench relay-capacity` and `bench relay-overload`: the game relay (frames node -> gateway ->
//! native player, one QUIC uni stream per frame) driven with pre-encoded frames.
//!
//! No encoder runs. A [`FramePlan`] holds a realistic size sequence (an IDR every few seconds,
//! P frames sized so that the stream averages the target bitrate) over arbitrary payload bytes,
//! since nobody decodes them. Fake nodes speak `nearpath-node/1` by hand: they register serving
//! the game [`GAME`], answer the gateway's `Open{Game}` with `Accepted`, and send each frame on
//! its own uni stream with `capture_ts_us` set to the send time. The same process also serves
//! players directly (ALPN `nearpath/1`: `PlayRequest` -> `PlayStarted` -> frames), so the path
//! without the gateway carries the same frames at the same time. Players are the native client
//! library (`Client::play`); a frame's latency is the time its whole payload has been read,
//! minus `capture_ts_us`, on one host clock.

//!
//! The module is split along its seams: `args` (command lines), `plan` (frame sizes), `peers`
//! (fake nodes, direct server, bare relay), `load` (players, pacer), `measure` (received frames,
//! metrics, kernel counters), `report`, and one file per command (`latency`, `capacity`,
//! `overload`).

mod args;
mod capacity;
mod latency;
mod load;
mod measure;
mod overload;
mod peers;
mod plan;
mod priority;
mod report;

use super::client::Conn;
use super::os::{loadavg_1m, mem_status, pin_current_thread, CpuMeter};
use super::stats::{num, Repeated, Summary};
use super::system::{
    parse_cpus, start_gateway, stop_all, verdict, GatewayProc, Liveness, Placement, Table,
};
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use nearpath_protocol::message::{Message, PlayRequest, PlayStarted, VideoCodec};
use nearpath_protocol::stream::{recv_frame_header, relay_frame, send, send_frame, FramedRecv};
use nearpath_protocol::tls::{
    client_config, negotiated_alpn, parse_sha256_hex, self_signed, server_config, ServerVerify,
    TransportOptions,
};
use nearpath_protocol::{
    net, unix_micros, Client, FrameHeader, FrameStream, PlayControl, PlayParams, ALPN_CLIENT,
    ALPN_NODE, MAX_CONTROL_FRAME, MAX_VIDEO_FRAME,
};
use nearpath_tests::fake_node::{
    self, heartbeat_loop, serve_sessions, FakeNode, HeartbeatCount, OpenedGame, Registration,
    Serving,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use args::*;
pub use capacity::*;
pub use latency::*;
use load::*;
pub use measure::*;
pub use overload::*;
use peers::*;
pub use plan::*;
pub use priority::*;
use report::*;

/// The title every fake node serves.
pub const GAME: &str = "bench";
/// What the gateway asks of its QUIC socket by default (`quic.recv_buffer_bytes`).
const GATEWAY_RECV_BUFFER: usize = 4 * 1024 * 1024;
/// Session ids of the paths without the gateway, fixed and distinct from each other so that a
/// frame on the wrong connection is caught by the client's session check (the gateway's own
/// ids are random).
const DIRECT_SESSION_BASE: u64 = 1 << 40;
const BARE_SESSION: u64 = 1 << 41;
/// A player that has seen no frame for this long after the last one was due has all it will get.
const QUIET: Duration = Duration::from_secs(3);

/// What the harness needs of the gateway child.
struct Gw {
    quic: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    sha: [u8; 32],
    token: String,
    api_key: String,
    pid: u32,
}

impl Gw {
    fn of(p: &GatewayProc) -> anyhow::Result<Gw> {
        Ok(Gw {
            quic: p.quic,
            http: p.http,
            admin: p.admin,
            sha: parse_sha256_hex(&p.sha256)?,
            token: p.token.clone(),
            api_key: p.api_key.clone(),
            pid: p.child.pid,
        })
    }
}

/// The stream shape of the unit tests.
#[cfg(test)]
fn shape() -> StreamShape {
    StreamShape {
        fps: 60,
        kbps: 10_000,
        idr_bytes: 60_000,
        idr_every_s: 2.0,
    }
}
