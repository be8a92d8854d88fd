//! The directory's handle on a registered node's connection.
//!
//! The directory keeps node ids, facts and handles, not transport objects: a [`NodeLink`] is
//! what sessions use to reach a node (open a session stream, send a datagram, notice it left)
//! and what the registry's rules ask (is it closed?). A link is either a QUIC connection or, in
//! tests, a detached stand-in that can be closed and counts as a connection with no peer, so
//! that the registry's rules are tested without sockets, or a node another gateway of the
//! federation holds, reached through the trunk to that gateway ([`RemoteLink`]).

use bytes::Bytes;
use quinn::{ConnectionError, RecvStream, SendDatagramError, SendStream, VarInt};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A handle on one node connection; cloning it is cheap and refers to the same connection.
#[derive(Clone, Debug)]
pub struct NodeLink(Inner);

#[derive(Clone, Debug)]
enum Inner {
    Quic(quinn::Connection),
    Detached(Arc<Detached>),
    Remote(Arc<dyn RemoteLink>),
}

/// A session stream opened through a peer gateway.
pub type RemoteOpen<'a> =
    Pin<Box<dyn Future<Output = Result<(SendStream, RecvStream), ConnectionError>> + Send + 'a>>;

/// A node held by another gateway, reached through the trunk to it: opening a session stream
/// opens a trunk stream already addressed to the node, so sessions run on it exactly as on a
/// local node's stream; a game session's input datagrams travel on the same trunk connection.
pub trait RemoteLink: Send + Sync + std::fmt::Debug {
    /// Opens a stream to the node through the peer (dialling the trunk if needed).
    fn open_bi(&self) -> RemoteOpen<'_>;
    /// Why the trunk connection in use closed, once it has.
    fn close_reason(&self) -> Option<ConnectionError>;
    /// The trunk's round-trip estimate (zero before it is dialled).
    fn rtt(&self) -> Duration;
    /// The peer gateway's address.
    fn remote_address(&self) -> SocketAddr;
    /// An id unique among the links of this process.
    fn stable_id(&self) -> usize;
    /// Sends a datagram (a player's input for a game session over the trunk) on the trunk
    /// connection in use.
    fn send_datagram(&self, data: Bytes) -> Result<(), SendDatagramError>;
    /// Whether `conn` is the trunk connection in use: what the peer relays on it (frames and
    /// audio of game sessions) comes from this link's nodes.
    fn carries(&self, conn: &quinn::Connection) -> bool;
}

#[derive(Debug)]
struct Detached {
    id: usize,
    addr: SocketAddr,
    closed: watch::Sender<bool>,
}

/// Ids of detached links, far above the ids quinn hands out in one process.
static NEXT_DETACHED: AtomicUsize = AtomicUsize::new(usize::MAX / 2);

impl From<quinn::Connection> for NodeLink {
    fn from(conn: quinn::Connection) -> Self {
        NodeLink(Inner::Quic(conn))
    }
}

impl NodeLink {
    /// A link to a node another gateway holds.
    pub fn remote(link: Arc<dyn RemoteLink>) -> NodeLink {
        NodeLink(Inner::Remote(link))
    }

    /// Whether the node is held by another gateway (reached through the trunk).
    pub fn is_remote(&self) -> bool {
        matches!(self.0, Inner::Remote(_))
    }

    /// A link with no connection behind it (tests): open until [`NodeLink::close`]; streams and
    /// datagrams fail as on a locally closed connection.
    pub fn detached(addr: SocketAddr) -> NodeLink {
        NodeLink(Inner::Detached(Arc::new(Detached {
            id: NEXT_DETACHED.fetch_add(1, Ordering::Relaxed),
            addr,
            closed: watch::channel(false).0,
        })))
    }

    /// The QUIC connection, if this link is one.
    pub fn quic(&self) -> Option<&quinn::Connection> {
        match &self.0 {
            Inner::Quic(c) => Some(c),
            Inner::Detached(_) | Inner::Remote(_) => None,
        }
    }

    /// An id unique among the live connections of this process.
    pub fn stable_id(&self) -> usize {
        match &self.0 {
            Inner::Quic(c) => c.stable_id(),
            Inner::Detached(d) => d.id,
            Inner::Remote(r) => r.stable_id(),
        }
    }

    /// The address the connection comes from now (it changes when the node migrates).
    pub fn remote_address(&self) -> SocketAddr {
        match &self.0 {
            Inner::Quic(c) => c.remote_address(),
            Inner::Detached(d) => d.addr,
            Inner::Remote(r) => r.remote_address(),
        }
    }

    /// The transport's round-trip estimate.
    pub fn rtt(&self) -> Duration {
        match &self.0 {
            Inner::Quic(c) => c.rtt(),
            Inner::Detached(_) => Duration::ZERO,
            Inner::Remote(r) => r.rtt(),
        }
    }

    /// UDP datagrams received on the connection so far (a sign of life besides heartbeats).
    pub fn received_datagrams(&self) -> u64 {
        match &self.0 {
            Inner::Quic(c) => c.stats().udp_rx.datagrams,
            Inner::Detached(_) | Inner::Remote(_) => 0,
        }
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        match &self.0 {
            Inner::Quic(c) => c.close_reason(),
            Inner::Detached(d) => (*d.closed.borrow()).then_some(ConnectionError::LocallyClosed),
            Inner::Remote(r) => r.close_reason(),
        }
    }

    /// Closes the connection with an application code (PROTOCOL.md) and reason.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        match &self.0 {
            Inner::Quic(c) => c.close(code, reason),
            Inner::Detached(d) => {
                d.closed.send_replace(true);
            }
            // The trunk is shared by every node of the peer: one node's session never closes it.
            Inner::Remote(_) => {}
        }
    }

    /// Completes when the connection has closed, with why.
    pub async fn closed(&self) -> ConnectionError {
        match &self.0 {
            Inner::Quic(c) => c.closed().await,
            Inner::Detached(d) => {
                let mut rx = d.closed.subscribe();
                let _ = rx.wait_for(|closed| *closed).await;
                ConnectionError::LocallyClosed
            }
            // A remote node is never registered here, so nothing waits for its link to close.
            Inner::Remote(_) => std::future::pending().await,
        }
    }

    /// Opens a bidirectional session stream to the node.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        match &self.0 {
            Inner::Quic(c) => c.open_bi().await,
            Inner::Detached(_) => Err(ConnectionError::LocallyClosed),
            Inner::Remote(r) => r.open_bi().await,
        }
    }

    /// Sends an unreliable datagram (player input) to the node.
    pub fn send_datagram(&self, data: Bytes) -> Result<(), SendDatagramError> {
        match &self.0 {
            Inner::Quic(c) => c.send_datagram(data),
            Inner::Remote(r) => r.send_datagram(data),
            Inner::Detached(_) => Err(SendDatagramError::ConnectionLost(
                ConnectionError::LocallyClosed,
            )),
        }
    }

    /// Whether what arrives on `conn` comes from this link: its own connection, or, for a
    /// remote node, the trunk connection to its gateway in use.
    pub fn is_carried_by(&self, conn: &quinn::Connection) -> bool {
        match &self.0 {
            Inner::Quic(c) => c.stable_id() == conn.stable_id(),
            Inner::Detached(_) => false,
            Inner::Remote(r) => r.carries(conn),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_detached_link_is_open_until_closed_and_then_says_so() {
        let link = NodeLink::detached("127.0.0.1:1".parse().unwrap());
        let other = NodeLink::detached("127.0.0.1:1".parse().unwrap());
        assert_ne!(link.stable_id(), other.stable_id());
        assert!(link.close_reason().is_none());
        assert!(link.open_bi().await.is_err());
        let waiter = {
            let link = link.clone();
            tokio::spawn(async move { link.closed().await })
        };
        link.close(nearpath_protocol::app_code::CLOSE_NORMAL, b"bye");
        assert_eq!(waiter.await.unwrap(), ConnectionError::LocallyClosed);
        assert!(link.close_reason().is_some());
        assert!(other.close_reason().is_none());
    }
}
