//! Hostile tests: resources (see hostile.rs). Strangers that hold gateway memory or sockets
//! without ever authenticating (issue 9 items 11 to 13).

#[allow(unused_imports)]
use crate::common::*;

use nearpath_protocol::codec::put_varint;
use nearpath_protocol::message::{ListGames, Message};
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::tls::{client_config, ServerVerify};
use nearpath_protocol::{
    ALPN_CLIENT, ALPN_NODE, MAX_CONTROL_FRAME, MAX_REQUEST_FRAME, PROTOCOL_VERSION,
};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long a test waits for something that must not happen (a stream beyond the grant): long
/// enough for the gateway's MAX_STREAMS to have arrived had it been sent, on a loaded machine.
const NEVER: Duration = Duration::from_millis(750);
/// The most a test waits for something that must happen.
const DEADLINE: Duration = Duration::from_secs(10);

/// A QUIC connection to `quic` offering `alpn`, from `from`.
async fn quic_connect(
    quic: SocketAddr,
    sha: [u8; 32],
    alpn: &[u8],
    from: IpAddr,
) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
    let cfg = client_config(ServerVerify::PinnedSha256(sha), &[alpn]).unwrap();
    let (endpoint, _) =
        nearpath_protocol::net::client_endpoint(SocketAddr::new(from, 0), cfg, 1 << 20).unwrap();
    let conn = endpoint.connect(quic, "localhost").unwrap().await?;
    Ok((endpoint, conn))
}

/// Announces a maximal request frame on a new stream and sends all of it but the last byte, so
/// the gateway must hold it while waiting for the rest. `None` if no stream was granted.
async fn stalled_request(
    conn: &quinn::Connection,
) -> Option<(quinn::SendStream, quinn::RecvStream)> {
    let (mut tx, rx) = tokio::time::timeout(NEVER, conn.open_bi())
        .await
        .ok()?
        .ok()?;
    let mut prefix = bytes::BytesMut::new();
    put_varint(&mut prefix, MAX_REQUEST_FRAME as u64);
    tx.write_all(&prefix).await.unwrap();
    let body = bytes::Bytes::from(vec![0x20u8; MAX_REQUEST_FRAME - 1]);
    tokio::time::timeout(DEADLINE, tx.write_chunk(body))
        .await
        .expect("the gateway grants a stream window for one whole request")
        .unwrap();
    Some((tx, rx))
}

/// A gateway in a child process (`bench serve-gateway`), so its memory can be read without
/// this test binary's other tests in the figure.
struct ChildGateway {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    quic: SocketAddr,
    sha: [u8; 32],
}

impl ChildGateway {
    fn spawn() -> ChildGateway {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bench"))
            .arg("serve-gateway")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting bench serve-gateway");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let ready = read_json(&mut stdout);
        ChildGateway {
            quic: ready["quic"].as_str().unwrap().parse().unwrap(),
            sha: nearpath_protocol::tls::parse_sha256_hex(ready["sha256"].as_str().unwrap())
                .unwrap(),
            child,
            stdin,
            stdout,
        }
    }

    /// Heap bytes the gateway process has in use (glibc's count).
    fn heap_in_use(&mut self) -> i64 {
        writeln!(self.stdin, "heap").unwrap();
        self.stdin.flush().unwrap();
        read_json(&mut self.stdout)["heap_in_use"].as_i64().unwrap()
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        // Closing stdin stops it; kill in case it is stuck.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_json(r: &mut impl BufRead) -> Value {
    loop {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "the gateway child exited"
        );
        if line.starts_with('{') {
            return serde_json::from_str(&line).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_quic_streams_cannot_pin_gateway_memory() {
    let mut gw = tokio::task::block_in_place(ChildGateway::spawn);
    let loopback: IpAddr = "127.0.0.1".parse().unwrap();
    // Warm the gateway (allocator, first connection) before the reading.
    let (_e, warm) = quic_connect(gw.quic, gw.sha, ALPN_CLIENT, loopback)
        .await
        .unwrap();
    warm.close(0u32.into(), b"");
    let before = tokio::task::block_in_place(|| gw.heap_in_use());

    // Four unauthenticated client connections, each trying 64 streams that announce a 1 MiB
    // request and stall one byte short. Before the fix the gateway granted them all (and an
    // unbounded connection window): 256 MiB held for strangers.
    let mut held = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..4 {
        let (endpoint, conn) = quic_connect(gw.quic, gw.sha, ALPN_CLIENT, loopback)
            .await
            .unwrap();
        let mut granted = 0;
        for _ in 0..64 {
            match stalled_request(&conn).await {
                Some(s) => {
                    granted += 1;
                    held.push(s);
                }
                None => break,
            }
        }
        assert_eq!(granted, 1, "an unauthenticated client gets one stream");
        conns.push((endpoint, conn));
    }

    // A node-ALPN connection that has not registered: its control stream, no frame streams.
    let (_ne, node) = quic_connect(gw.quic, gw.sha, ALPN_NODE, loopback)
        .await
        .unwrap();
    let _control = node.open_bi().await.unwrap();
    // The handshake grants every ALPN HTTP/3's three unidirectional streams (WebTransport
    // shares the port, and the limit is sent before the ALPN is known); no more, and what they
    // carry counts against the one connection window.
    let mut frame_streams = Vec::new();
    while let Ok(Ok(mut s)) = tokio::time::timeout(NEVER, node.open_uni()).await {
        let _ = tokio::time::timeout(NEVER, s.write_all(&[0u8; 1 << 20])).await;
        frame_streams.push(s);
        assert!(frame_streams.len() <= 16, "unbounded frame streams");
    }
    assert!(
        frame_streams.len() <= nearpath_gateway::webtransport::H3_UNI_STREAMS as usize,
        "an unregistered node opened {} frame streams",
        frame_streams.len()
    );
    assert!(
        tokio::time::timeout(NEVER, node.open_bi()).await.is_err(),
        "a node gets one control stream"
    );

    // Whatever arrived is held now; take the largest reading over a short window, as the
    // data is still on its way when the writes return.
    let mut grown = 0;
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        grown = grown.max(tokio::task::block_in_place(|| gw.heap_in_use()) - before);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "gateway heap grew by {} KiB for 4 hostile client connections and 1 node connection",
        grown / 1024
    );
    assert!(grown < 64 << 20, "gateway heap grew by {grown} bytes");
    drop(held);
    drop(conns);
}

/// A raw client connection's first stream: `ListGames` with `key`; returns the reply.
async fn list_games(conn: &quinn::Connection, key: &str) -> Message {
    let (mut tx, rx) = tokio::time::timeout(DEADLINE, conn.open_bi())
        .await
        .expect("a stream")
        .unwrap();
    let msg = Message::ListGames(ListGames {
        protocol_version: PROTOCOL_VERSION,
        api_key: key.into(),
    });
    send(&mut tx, &msg).await.unwrap();
    tx.finish().unwrap();
    let mut rx = FramedRecv::new(rx, MAX_CONTROL_FRAME);
    tokio::time::timeout(DEADLINE, rx.next())
        .await
        .expect("a reply")
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_stream_grant_is_raised_only_by_an_authenticated_request() {
    let gw = TestGateway::start(|_| {}).await;
    let (_e, conn) = quic_connect(gw.addrs.quic, gw.sha, ALPN_CLIENT, ip(DE))
        .await
        .unwrap();
    // A wrong key leaves the connection at one stream (the finished one frees it again).
    assert!(matches!(
        list_games(&conn, "wrong").await,
        Message::Error(_)
    ));
    let (_a, _b) = tokio::time::timeout(DEADLINE, conn.open_bi())
        .await
        .expect("the finished stream's place comes back")
        .unwrap();
    assert!(
        tokio::time::timeout(NEVER, conn.open_bi()).await.is_err(),
        "a second stream before any request authenticated"
    );
    drop((_a, _b));
    // The right key: a legitimate client gets many concurrent requests.
    assert!(matches!(
        list_games(&conn, API_KEY).await,
        Message::GameList(_)
    ));
    let mut open = Vec::new();
    for _ in 0..128 {
        open.push(
            tokio::time::timeout(DEADLINE, conn.open_bi())
                .await
                .expect("streams after authenticating")
                .unwrap(),
        );
    }
    // And requests on them work concurrently.
    let client = nearpath_protocol::Client::connect(
        gw.addrs.quic,
        "localhost",
        ServerVerify::PinnedSha256(gw.sha),
    )
    .await
    .unwrap();
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;
    let request = json!({"model": "m", "max_tokens": 3, "stream": true,
                         "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let mut streams = Vec::new();
    for _ in 0..8 {
        streams.push(client.infer(API_KEY, &request).await.unwrap());
    }
    for mut s in streams {
        let mut done = false;
        while let Some(ev) = tokio::time::timeout(DEADLINE, s.next())
            .await
            .unwrap()
            .unwrap()
        {
            if let nearpath_protocol::InferEvent::Done(_) = ev {
                done = true;
                break;
            }
        }
        assert!(done);
    }
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_client_that_never_authenticates_is_closed() {
    let gw = TestGateway::start(|c| c.quic.client_auth_timeout_ms = 300).await;
    let (_e, conn) = quic_connect(gw.addrs.quic, gw.sha, ALPN_CLIENT, ip(DE))
        .await
        .unwrap();
    let err = tokio::time::timeout(DEADLINE, conn.closed())
        .await
        .expect("the gateway closes a connection that never authenticates");
    assert!(format!("{err}").contains("authentication timeout"), "{err}");
    // An authenticated one stays.
    let (_e2, ok) = quic_connect(gw.addrs.quic, gw.sha, ALPN_CLIENT, ip(DE))
        .await
        .unwrap();
    assert!(matches!(
        list_games(&ok, API_KEY).await,
        Message::GameList(_)
    ));
    assert!(tokio::time::timeout(NEVER, ok.closed()).await.is_err());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_handshakes_per_source_are_capped() {
    // The handshake rate is a token bucket over time: the unit tests in conn_guard.rs check it
    // with explicit instants; here it is out of the way.
    let gw = TestGateway::start(|c| c.quic.max_unauthenticated_per_ip = 2).await;
    let from: IpAddr = "127.0.0.31".parse().unwrap();
    let (_e1, a) = quic_connect(gw.addrs.quic, gw.sha, ALPN_CLIENT, from)
        .await
        .unwrap();
    let (_e2, _b) = quic_connect(gw.addrs.quic, gw.sha, ALPN_CLIENT, from)
        .await
        .unwrap();
    // Two unauthenticated connections are this source's cap.
    assert!(quic_connect(gw.addrs.quic, gw.sha, ALPN_CLIENT, from)
        .await
        .is_err());
    // Another source is unaffected.
    let other: IpAddr = "127.0.0.32".parse().unwrap();
    assert!(quic_connect(gw.addrs.quic, gw.sha, ALPN_CLIENT, other)
        .await
        .is_ok());
    // Authenticating frees a slot; closing an unauthenticated connection frees one too.
    assert!(matches!(
        list_games(&a, API_KEY).await,
        Message::GameList(_)
    ));
    let (_e3, c) = quic_connect(gw.addrs.quic, gw.sha, ALPN_CLIENT, from)
        .await
        .unwrap();
    assert!(quic_connect(gw.addrs.quic, gw.sha, ALPN_CLIENT, from)
        .await
        .is_err());
    c.close(0u32.into(), b"bye");
    let deadline = Instant::now() + DEADLINE;
    while gw.shared.quic_gate.unauthenticated_from(from) > 1 {
        assert!(
            Instant::now() < deadline,
            "a closed connection keeps its slot"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(quic_connect(gw.addrs.quic, gw.sha, ALPN_CLIENT, from)
        .await
        .is_ok());
    let page = gw.admin_get_text("/metrics").await;
    assert_eq!(
        metric(
            &page,
            "nearpath_quic_handshakes_refused_total{reason=\"unauthenticated\"}"
        ),
        Some(2.0),
        "{page}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_addresses_are_validated_with_retry_under_load() {
    // Threshold 0: every unvalidated address must echo a retry token first.
    let gw = TestGateway::start(|c| c.quic.retry_above_handshakes = 0).await;
    let (_e, conn) = quic_connect(gw.addrs.quic, gw.sha, ALPN_CLIENT, ip(DE))
        .await
        .unwrap();
    assert!(matches!(
        list_games(&conn, API_KEY).await,
        Message::GameList(_)
    ));
    let page = gw.admin_get_text("/metrics").await;
    assert!(
        metric(&page, "nearpath_quic_retries_total").unwrap_or(0.0) >= 1.0,
        "{page}"
    );
    gw.stop().await;
}

/// A TCP connection to `addr` from `from` (not 127.0.0.1, which the tests trust as a proxy).
async fn tcp_from(from: &str, addr: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
    s.connect(addr).await.unwrap()
}

/// Waits until the peer closes `s` (EOF or reset), discarding what it sends; false if it stays
/// open past `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

/// Sends a whole GET and reads the status line of the answer.
async fn get_status(s: &mut TcpStream, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_on_both_listeners() {
    let gw = TestGateway::start(|c| {
        c.http.header_read_timeout_ms = 500;
        c.http.idle_timeout_ms = 1000;
    })
    .await;
    for addr in [gw.addrs.http, gw.addrs.admin] {
        // Half a request head, never finished.
        let mut partial = tcp_from("127.0.0.41", addr).await;
        partial
            .write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        // Nothing at all.
        let mut silent = tcp_from("127.0.0.41", addr).await;
        // Part of the HTTP/2 preface (hyper waits for all 24 bytes to pick the version).
        let mut h2 = tcp_from("127.0.0.41", addr).await;
        h2.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        for s in [&mut partial, &mut silent, &mut h2] {
            assert!(
                closed_within(s, Duration::from_secs(5)).await,
                "a connection without a request head stays open on {addr}"
            );
        }
        // A keep-alive connection that goes idle after a request is closed too, and a normal
        // request still works.
        let mut keep = tcp_from("127.0.0.41", addr).await;
        let status = get_status(&mut keep, "/nope").await;
        assert!(status.starts_with("HTTP/1.1 "), "{status}");
        assert!(closed_within(&mut keep, Duration::from_secs(5)).await);
    }
    let page = gw.admin_get_text("/metrics").await;
    assert!(
        metric(
            &page,
            "nearpath_http_connections_timed_out_total{listener=\"http\",phase=\"header\"}"
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{page}"
    );
    // Normal requests still work.
    let (status, _) = gw.http.get(&gw.api_url("/v1/models"), Some(API_KEY)).await;
    assert_eq!(status, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connections_per_ip_are_capped() {
    let gw = TestGateway::start(|c| c.http.max_connections_per_ip = 3).await;
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(tcp_from("127.0.0.42", gw.addrs.http).await);
    }
    let mut extra = tcp_from("127.0.0.42", gw.addrs.http).await;
    assert!(
        closed_within(&mut extra, DEADLINE).await,
        "the fourth connection from one address is closed at once"
    );
    // The first three are served, and another address is unaffected.
    for s in &mut first {
        let status = get_status(s, "/nope").await;
        assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    }
    let mut other = tcp_from("127.0.0.43", gw.addrs.http).await;
    assert!(get_status(&mut other, "/nope")
        .await
        .starts_with("HTTP/1.1 404"));
    // Closing one frees its place (poll: the gateway notices the close asynchronously).
    drop(first.pop());
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut again = tcp_from("127.0.0.42", gw.addrs.http).await;
        let _ = again
            .write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let mut buf = [0u8; 64];
        if let Ok(Ok(n)) = tokio::time::timeout(DEADLINE, again.read(&mut buf)).await {
            if n > 0 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "a closed connection's place is never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let page = gw.admin_get_text("/metrics").await;
    assert!(
        metric(
            &page,
            "nearpath_http_connections_refused_total{listener=\"http\",reason=\"max_connections_per_ip\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{page}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshakes_and_request_bodies_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let cert = nearpath_protocol::tls::self_signed(&["localhost".to_string()]).unwrap();
    let (cert_file, key_file) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert_file, &cert.cert_pem).unwrap();
    std::fs::write(&key_file, &cert.key_pem).unwrap();
    let tls_gw = TestGateway::start(|c| {
        c.http.tls_cert_file = Some(cert_file.clone());
        c.http.tls_key_file = Some(key_file.clone());
        c.http.tls_handshake_timeout_ms = 300;
    })
    .await;
    // A TLS record header promising a ClientHello that never comes.
    let mut s = tcp_from("127.0.0.44", tls_gw.addrs.http).await;
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(5)).await,
        "a stalled TLS handshake stays open"
    );
    let page = tls_gw.admin_get_text("/metrics").await;
    assert!(
        metric(
            &page,
            "nearpath_http_connections_timed_out_total{listener=\"http\",phase=\"tls\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{page}"
    );
    tls_gw.stop().await;

    // A request body that stops arriving: a 400 within the body timeout, not a stuck handler.
    let gw = TestGateway::start(|c| c.http.body_read_timeout_ms = 300).await;
    let mut s = tcp_from("127.0.0.44", gw.addrs.http).await;
    s.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\":"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer to a stalled body")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("did not arrive"), "{answer}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_chosen_model_names_do_not_grow_metrics() {
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;
    let chat = |model: &str| {
        json!({"model": model, "max_tokens": 2,
               "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
    };
    let url = gw.api_url("/v1/chat/completions");
    // A served model is labelled by name.
    let (status, _) = gw.http.post(&url, Some(API_KEY), &chat("m"), &[]).await;
    assert_eq!(status, 200);
    let before = gw.admin_get_text("/metrics").await;
    assert!(before.contains("model=\"m\""), "{before}");

    // 50 unique 2 KB names: each a 400 naming `model`.
    for i in 0..50 {
        let name = format!("{i:04}{}", "x".repeat(2044));
        let (status, body) = gw.http.post(&url, Some(API_KEY), &chat(&name), &[]).await;
        assert_eq!(status, 400, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["param"], "model", "{body}");
    }
    // 50 unique names of a legal length that nobody serves: labelled `other`.
    for i in 0..50 {
        let name = format!("{i:04}{}", "y".repeat(200));
        let (status, body) = gw.http.post(&url, Some(API_KEY), &chat(&name), &[]).await;
        assert_eq!(status, 404, "{body}");
    }
    let after = gw.admin_get_text("/metrics").await;
    assert!(
        after.len() < before.len() + 2048,
        "/metrics grew by {} bytes",
        after.len() - before.len()
    );
    assert!(!after.contains("xxxx") && !after.contains("yyyy"));
    node.stop().await.unwrap();
    gw.stop().await;
}
