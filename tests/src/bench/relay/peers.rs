//! The other ends of the relay: fake nodes registered with the gateway (the shared
//! [`nearpath_tests::fake_node`]), a server in this process that plays a node serving players
//! directly, and the bare quinn relay the gateway is compared with.

use super::*;

/// A game session the gateway opened on a fake node.
pub(super) type OpenedSession = OpenedGame;

/// The fake nodes' shared endpoint (one UDP socket, one connection per node).
pub(super) fn node_endpoint() -> anyhow::Result<quinn::Endpoint> {
    Ok(fake_node::node_endpoint(
        "127.0.0.1:0".parse()?,
        ServerVerify::InsecureDangerous,
        GATEWAY_RECV_BUFFER,
    )?)
}

/// Registers one fake node serving [`GAME`] with room for `game_sessions`, then heartbeats and
/// accepts sessions in background tasks until `stop`. Every opened session is sent to `opened`.
pub(super) async fn connect_node(
    endpoint: &quinn::Endpoint,
    gw: &Gw,
    id: &str,
    game_sessions: u32,
    opened: mpsc::UnboundedSender<OpenedSession>,
    stop: CancellationToken,
) -> anyhow::Result<quinn::Connection> {
    let reg = Registration::new(id, &gw.token).games(&[GAME], game_sessions);
    let node = FakeNode::try_register(
        endpoint,
        gw.quic,
        gw.sha,
        reg.message(),
        Duration::from_secs(10),
    )
    .await
    .with_context(|| format!("node {id}: registering with {}", gw.quic))?;
    let heartbeat_ms = node.registered().with_context(|| format!("node {id}"))?;
    let (conn, tx, rx) = node.into_parts();
    // Heartbeats go ahead of queued frame data: a node whose uplink is backed up must not be
    // declared gone for it (and lose every session) while the benchmark probes the relay.
    let _ = tx.set_priority(1);
    let every = Duration::from_millis(heartbeat_ms.max(10));
    let count = Arc::new(HeartbeatCount::default());
    tokio::spawn(heartbeat_loop(tx, rx, every, stop.clone(), count));
    tokio::spawn(serve_sessions(
        conn.clone(),
        Serving::games_only(),
        opened,
        stop,
    ));
    Ok(conn)
}

/// A QUIC server in this process that plays the role of a node serving players directly.
pub(super) struct DirectServer {
    pub(super) endpoint: quinn::Endpoint,
    pub(super) addr: SocketAddr,
    pub(super) sha: [u8; 32],
}

impl DirectServer {
    pub(super) fn start(alpn: &[&[u8]]) -> anyhow::Result<DirectServer> {
        let cert = self_signed(&["localhost".to_string()])?;
        let cfg = server_config(
            vec![cert.cert.clone()],
            cert.key.clone_key(),
            alpn,
            &TransportOptions::default(),
        )?;
        let (endpoint, _) = net::server_endpoint("127.0.0.1:0".parse()?, cfg, GATEWAY_RECV_BUFFER)?;
        Ok(DirectServer {
            addr: endpoint.local_addr()?,
            endpoint,
            sha: cert.sha256,
        })
    }
}

/// A player connected straight to a fake node.
pub(super) struct DirectPlayer {
    pub(super) session_id: u64,
    pub(super) conn: quinn::Connection,
    pub(super) _ctl: (quinn::SendStream, FramedRecv),
}

/// Completes the handshake of one incoming player and answers its `PlayRequest`.
pub(super) async fn serve_player(
    incoming: quinn::Incoming,
    session_id: u64,
) -> anyhow::Result<DirectPlayer> {
    let conn = incoming.await.context("player handshake")?;
    let (mut tx, rx) = conn
        .accept_bi()
        .await
        .context("waiting for the player's request stream")?;
    let mut rx = FramedRecv::new(rx, MAX_CONTROL_FRAME);
    let req: PlayRequest = match rx.next().await? {
        Some(Message::PlayRequest(r)) => r,
        other => bail!("expected PlayRequest, got {other:?}"),
    };
    let started = PlayStarted {
        session_id,
        width: req.width,
        height: req.height,
        fps: req.fps,
        bitrate_kbps: req.bitrate_kbps,
        codec: VideoCodec::H264,
    };
    send(&mut tx, &Message::PlayStarted(started)).await?;
    Ok(DirectPlayer {
        session_id,
        conn,
        _ctl: (tx, rx),
    })
}

/// Accepts `n` players on `endpoint`, numbering their sessions from `base`.
pub(super) fn accept_players(
    endpoint: quinn::Endpoint,
    n: u32,
    base: u64,
) -> mpsc::UnboundedReceiver<anyhow::Result<DirectPlayer>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for i in 0..n as u64 {
            let Some(incoming) = endpoint.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(serve_player(incoming, base + i).await);
            });
        }
    });
    rx
}

/// The gateway's relay step alone: a bare quinn relay (accept a frame stream, read its header,
/// `relay_frame` it to the player) on its own thread and runtime, pinned like the gateway. The
/// difference between it and the gateway is what the gateway adds around the relay code.
pub(super) struct BareRelay {
    pub(super) addr: SocketAddr,
    pub(super) sha: [u8; 32],
    pub(super) stop: CancellationToken,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
}

impl BareRelay {
    pub(super) fn start(cpus: Vec<usize>) -> anyhow::Result<BareRelay> {
        let stop = CancellationToken::new();
        let (ready_tx, ready_rx) =
            std::sync::mpsc::channel::<anyhow::Result<(SocketAddr, [u8; 32])>>();
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bare-relay".into())
            .spawn(move || {
                let run = || -> anyhow::Result<()> {
                    if !cpus.is_empty() {
                        pin_current_thread(&cpus)
                            .with_context(|| format!("pinning the bare relay to CPUs {cpus:?}"))?;
                    }
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async {
                        let server = DirectServer::start(&[ALPN_CLIENT, ALPN_NODE])?;
                        let _ = ready_tx.send(Ok((server.addr, server.sha)));
                        tokio::select! {
                            _ = thread_stop.cancelled() => Ok(()),
                            r = serve_bare(server.endpoint) => r,
                        }
                    })
                };
                if let Err(e) = run() {
                    eprintln!("bare relay: {e:#}");
                    let _ = ready_tx.send(Err(e));
                }
            })?;
        let (addr, sha) = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("the bare relay thread did not start"))??;
        Ok(BareRelay {
            addr,
            sha,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for BareRelay {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One player (ALPN `nearpath/1`), then one node (`nearpath-node/1`, no registration) whose frame
/// streams are relayed to the player.
pub(super) async fn serve_bare(endpoint: quinn::Endpoint) -> anyhow::Result<()> {
    let incoming = endpoint
        .accept()
        .await
        .ok_or_else(|| anyhow!("bare relay endpoint closed"))?;
    let player = serve_player(incoming, BARE_SESSION).await?;
    let node = endpoint
        .accept()
        .await
        .ok_or_else(|| anyhow!("bare relay endpoint closed"))?
        .await
        .context("node handshake")?;
    if negotiated_alpn(&node).as_deref() != Some(ALPN_NODE) {
        bail!("the second connection to the bare relay is not a node");
    }
    while let Ok(mut recv) = node.accept_uni().await {
        let out = player.conn.clone();
        tokio::spawn(async move {
            if let Ok(header) = recv_frame_header(&mut recv).await {
                let _ = relay_frame(recv, &header, &out, MAX_VIDEO_FRAME).await;
            }
        });
    }
    Ok(())
}
