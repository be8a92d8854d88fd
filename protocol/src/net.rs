//! UDP socket and endpoint helpers.
//!
//! quinn leaves the kernel's default socket receive buffer (208 KiB on Linux), which drops
//! bursts once a few dozen video sessions share a socket; these helpers raise it and report what
//! the kernel actually granted.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use thiserror::Error;

/// Receive buffer the gateway asks for by default.
pub const DEFAULT_RECV_BUFFER: usize = 8 * 1024 * 1024;

/// Errors setting up sockets and endpoints. Local problems (address in use, no permission, no
/// runtime); they name the address involved.
#[derive(Debug, Error)]
pub enum NetError {
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The receive buffer could not be set or read back.
    #[error("cannot size the receive buffer of UDP {addr}: {source}")]
    Buffer {
        /// The socket's address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// quinn could not take the socket (for example outside a tokio runtime).
    #[error("cannot start a QUIC endpoint on {addr}: {source}")]
    Endpoint {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// What the kernel granted for a socket's receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvBuffer {
    /// Bytes asked for.
    pub requested: usize,
    /// Bytes the kernel reports after the request. Linux reports twice the usable size (it
    /// counts bookkeeping) and caps requests at `net.core.rmem_max`.
    pub effective: usize,
}

impl RecvBuffer {
    /// Whether the kernel granted less than asked (raise `net.core.rmem_max` to fix).
    pub fn is_capped(&self) -> bool {
        self.effective < self.requested
    }
}

/// Asks for a `bytes`-sized receive buffer on `socket` and reports the effective size.
pub fn set_recv_buffer(socket: &UdpSocket, bytes: usize) -> Result<RecvBuffer, NetError> {
    let addr = socket
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let buffer_err = |source| NetError::Buffer { addr, source };
    let state = quinn::udp::UdpSocketState::new(socket.into()).map_err(buffer_err)?;
    state
        .set_recv_buffer_size(socket.into(), bytes)
        .map_err(buffer_err)?;
    let effective = state.recv_buffer_size(socket.into()).map_err(buffer_err)?;
    Ok(RecvBuffer {
        requested: bytes,
        effective,
    })
}

/// Binds a UDP socket on `addr` with a `recv_buffer`-byte receive buffer request.
pub fn bind_udp(addr: SocketAddr, recv_buffer: usize) -> Result<(UdpSocket, RecvBuffer), NetError> {
    let socket = UdpSocket::bind(addr).map_err(|source| NetError::Bind { addr, source })?;
    let buffer = set_recv_buffer(&socket, recv_buffer)?;
    if buffer.is_capped() {
        tracing::warn!(
            %addr,
            requested = buffer.requested,
            effective = buffer.effective,
            "UDP receive buffer capped by the kernel; raise net.core.rmem_max to avoid drops"
        );
    }
    Ok((socket, buffer))
}

/// A QUIC server endpoint on `addr` with a raised receive buffer. Must run inside a tokio
/// runtime. The endpoint can also dial out with [`quinn::Endpoint::connect_with`].
pub fn server_endpoint(
    addr: SocketAddr,
    config: quinn::ServerConfig,
    recv_buffer: usize,
) -> Result<(quinn::Endpoint, RecvBuffer), NetError> {
    let (socket, buffer) = bind_udp(addr, recv_buffer)?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| NetError::Endpoint { addr, source })?;
    Ok((endpoint, buffer))
}

/// A client-only QUIC endpoint on `bind` (use port 0) with a raised receive buffer and
/// `config` as its default client configuration. Must run inside a tokio runtime.
pub fn client_endpoint(
    bind: SocketAddr,
    config: quinn::ClientConfig,
    recv_buffer: usize,
) -> Result<(quinn::Endpoint, RecvBuffer), NetError> {
    let (socket, buffer) = bind_udp(bind, recv_buffer)?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| NetError::Endpoint { addr: bind, source })?;
    endpoint.set_default_client_config(config);
    Ok((endpoint, buffer))
}

/// The unspecified address of `peer`'s family, port 0: where a client endpoint binds to reach
/// `peer`.
pub fn unspecified_for(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recv_buffer_request_is_applied_and_reported() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let small = set_recv_buffer(&socket, 64 * 1024).unwrap();
        let large = set_recv_buffer(&socket, 4 * 1024 * 1024).unwrap();
        // The kernel may cap the larger request, but it never shrinks below the smaller one and
        // always grants at least what a 64 KiB request asked for.
        assert!(small.effective >= 64 * 1024, "{small:?}");
        assert!(large.effective >= small.effective, "{small:?} {large:?}");
        assert_eq!(large.requested, 4 * 1024 * 1024);
    }
}
