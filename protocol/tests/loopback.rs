//! Real quinn endpoints on loopback: certificate verification, framed messages, video frames,
//! relaying, datagrams and the client library against a scripted gateway.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use nearpath_protocol::net::{client_endpoint, server_endpoint, unspecified_for};
use nearpath_protocol::tls::{self, ServerVerify, TransportOptions};
use nearpath_protocol::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Upper bound for each test, so a protocol bug fails the test instead of hanging CI.
const GUARD: Duration = Duration::from_secs(20);

async fn guarded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .expect("test did not finish within its guard time")
}

struct Server {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
}

fn server_with(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Server {
    let config = tls::server_config(
        chain,
        key,
        &[ALPN_NODE, ALPN_CLIENT],
        &TransportOptions::default(),
    )
    .unwrap();
    let (endpoint, _) = server_endpoint("127.0.0.1:0".parse().unwrap(), config, 1 << 20).unwrap();
    let addr = endpoint.local_addr().unwrap();
    Server { endpoint, addr }
}

/// A server with a fresh self-signed certificate for "localhost"; returns the certificate hash.
fn self_signed_server() -> (Server, [u8; 32]) {
    let ss = tls::self_signed(&["localhost".to_string()]).unwrap();
    (server_with(vec![ss.cert], ss.key), ss.sha256)
}

async fn dial(
    addr: SocketAddr,
    name: &str,
    verify: ServerVerify,
    alpn: &[u8],
) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
    let config = tls::client_config(verify, &[alpn]).unwrap();
    let (endpoint, _) = client_endpoint(unspecified_for(addr), config, 1 << 20).unwrap();
    let conn = endpoint.connect(addr, name).unwrap().await?;
    Ok((endpoint, conn))
}

/// Accepts one connection; `None` if its handshake fails.
async fn accept(server: &Server) -> Option<quinn::Connection> {
    server.endpoint.accept().await?.await.ok()
}

#[tokio::test]
async fn pinned_verifier_accepts_the_right_hash_and_rejects_a_wrong_one() {
    guarded(async {
        let (server, sha) = self_signed_server();

        let accepting = accept(&server);
        let dialing = dial(
            server.addr,
            "localhost",
            ServerVerify::PinnedSha256(sha),
            ALPN_NODE,
        );
        let (server_conn, client) = tokio::join!(accepting, dialing);
        let (_ep, client_conn) = client.expect("right pin must connect");
        let server_conn = server_conn.expect("server side of the right pin");
        assert_eq!(
            tls::negotiated_alpn(&client_conn).as_deref(),
            Some(ALPN_NODE)
        );
        assert_eq!(
            tls::negotiated_alpn(&server_conn).as_deref(),
            Some(ALPN_NODE)
        );

        // The pin ignores the name: it is the whole trust decision.
        let accepting = accept(&server);
        let dialing = dial(
            server.addr,
            "any.name",
            ServerVerify::PinnedSha256(sha),
            ALPN_CLIENT,
        );
        let (server_conn, client) = tokio::join!(accepting, dialing);
        assert!(client.is_ok() && server_conn.is_some());

        let mut wrong = sha;
        wrong[31] ^= 1;
        let accepting = accept(&server);
        let dialing = dial(
            server.addr,
            "localhost",
            ServerVerify::PinnedSha256(wrong),
            ALPN_NODE,
        );
        let (server_conn, client) = tokio::join!(accepting, dialing);
        match client {
            Err(e @ quinn::ConnectionError::TransportError(_)) => {
                assert!(e.to_string().contains("certificate"), "{e}");
                // Both pins are recovered from this end's own error.
                let m = nearpath_protocol::tls::PinMismatch::from_connection_error(&e);
                assert_eq!(
                    m,
                    Some(nearpath_protocol::tls::PinMismatch {
                        expected: vec![wrong],
                        presented: sha
                    })
                );
            }
            Err(other) => panic!("wrong pin failed for another reason: {other}"),
            Ok(_) => panic!("wrong pin connected"),
        }
        assert!(server_conn.is_none());
    })
    .await;
}

#[tokio::test]
async fn insecure_mode_connects_and_alpn_mismatch_does_not() {
    guarded(async {
        let (server, _) = self_signed_server();
        let (server_conn, client) = tokio::join!(
            accept(&server),
            dial(
                server.addr,
                "localhost",
                ServerVerify::InsecureDangerous,
                ALPN_CLIENT
            )
        );
        assert!(client.is_ok() && server_conn.is_some());

        let (server_conn, client) = tokio::join!(
            accept(&server),
            dial(
                server.addr,
                "localhost",
                ServerVerify::InsecureDangerous,
                b"h3"
            )
        );
        assert!(client.is_err(), "a foreign ALPN must not connect");
        assert!(server_conn.is_none());
    })
    .await;
}

/// A CA and a leaf for "localhost" signed by it.
struct Pki {
    ca_pem: String,
    leaf: CertificateDer<'static>,
    leaf_key: PrivateKeyDer<'static>,
}

fn pki() -> Pki {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "nearpath test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        leaf: leaf.der().clone(),
        leaf_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    }
}

#[tokio::test]
async fn ca_verification_checks_chain_and_name() {
    guarded(async {
        let pki = pki();
        let server = server_with(vec![pki.leaf.clone()], pki.leaf_key.clone_key());

        let ca_file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("nearpath-ca-{}.pem", std::process::id()));
        std::fs::write(&ca_file, &pki.ca_pem).unwrap();

        let (server_conn, client) = tokio::join!(
            accept(&server),
            dial(
                server.addr,
                "localhost",
                ServerVerify::CaFile(ca_file.clone()),
                ALPN_NODE
            )
        );
        assert!(client.is_ok(), "CA file: {:?}", client.err());
        assert!(server_conn.is_some());

        let (server_conn, client) = tokio::join!(
            accept(&server),
            dial(
                server.addr,
                "localhost",
                ServerVerify::CaPem(pki.ca_pem.clone().into_bytes()),
                ALPN_NODE
            )
        );
        assert!(client.is_ok(), "CA PEM: {:?}", client.err());
        assert!(server_conn.is_some());

        let (_, client) = tokio::join!(
            accept(&server),
            dial(
                server.addr,
                "gateway.example",
                ServerVerify::CaPem(pki.ca_pem.clone().into_bytes()),
                ALPN_NODE
            )
        );
        assert!(
            client.is_err(),
            "a name the certificate does not carry must fail"
        );

        // A different CA must not vouch for this leaf.
        let other = pki_ca_only();
        let (_, client) = tokio::join!(
            accept(&server),
            dial(
                server.addr,
                "localhost",
                ServerVerify::CaPem(other.into_bytes()),
                ALPN_NODE
            )
        );
        assert!(client.is_err(), "an unrelated CA must fail");
        let _ = std::fs::remove_file(ca_file);
    })
    .await;
}

fn pki_ca_only() -> String {
    pki().ca_pem
}

#[tokio::test]
async fn framed_messages_frames_relays_and_datagrams_arrive_intact() {
    guarded(async {
        let (server, sha) = self_signed_server();
        let pin = ServerVerify::PinnedSha256(sha);

        // The "node" connection.
        let (server_node, node) = tokio::join!(
            accept(&server),
            dial(server.addr, "localhost", pin.clone(), ALPN_NODE)
        );
        let (_node_ep, node) = node.unwrap();
        let server_node = server_node.unwrap();

        // Control stream: messages in both directions, including a request-sized one.
        let big_json = format!("{{\"prompt\":\"{}\"}}", "x".repeat(1024 * 1024 - 16));
        let sent = vec![
            Message::Register(Register {
                protocol_version: PROTOCOL_VERSION,
                node_id: "n1".into(),
                enrolment_token: "t".into(),
                software_version: "1".into(),
                gpus: vec![Gpu {
                    model: "L4".into(),
                    class: "datacenter".into(),
                    vram_mib: 23_034,
                }],
                workloads: Workloads {
                    games: vec!["doom".into()],
                    models: vec![],
                    model_caps: vec![],
                },
                capacity: Capacity {
                    game_sessions: 2,
                    inference_concurrency: 0,
                },
                encoders: vec![NodeEncoder {
                    codec: VideoCodec::H264,
                    implementation: "openh264".into(),
                }],
            }),
            Message::Open(Open {
                session_id: 5,
                kind: SessionKind::Inference {
                    model: "m".into(),
                    endpoint: Default::default(),
                    request_json: big_json,
                    request_id: "req_1".into(),
                    traceparent: None,
                },
            }),
            Message::Drained,
        ];
        let (mut node_send, node_recv) = node.open_bi().await.unwrap();
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            for m in &to_send {
                send(&mut node_send, m).await.unwrap();
            }
            node_send.finish().unwrap();
            node_send
        });
        let (mut gw_send, gw_recv) = server_node.accept_bi().await.unwrap();
        let mut gw_framed = FramedRecv::new(gw_recv, MAX_REQUEST_FRAME);
        let mut got = Vec::new();
        while let Some(m) = gw_framed.next().await.unwrap() {
            got.push(m);
        }
        assert_eq!(got, sent);
        let _ = writer.await.unwrap();

        let reply = Message::Registered(Registered {
            lease_ms: 9000,
            heartbeat_ms: 3000,
            node_country: Some("FR".into()),
        });
        send(&mut gw_send, &reply).await.unwrap();
        gw_send.finish().unwrap();
        let mut node_framed = FramedRecv::new(node_recv, MAX_CONTROL_FRAME);
        assert_eq!(node_framed.next().await.unwrap(), Some(reply));
        assert_eq!(node_framed.next().await.unwrap(), None);

        // The "player" connection.
        let (server_player, player) = tokio::join!(
            accept(&server),
            dial(server.addr, "localhost", pin.clone(), ALPN_CLIENT)
        );
        let (_player_ep, player) = player.unwrap();
        let server_player = server_player.unwrap();

        // node -> gateway (store and forward), then gateway -> player (cut-through relay).
        let payload: Bytes = (0..300_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>()
            .into();
        let header = FrameHeader {
            session_id: 5,
            seq: 1,
            capture_ts_us: unix_micros(),
            encode_us: 4_000,
            keyframe: true,
            input_seq: 17,
            width: 1280,
            height: 720,
            payload_len: 0, // filled in by send_frame
        };
        send_frame(&node, header, payload.clone()).await.unwrap();
        let (got_header, got_payload) =
            recv_frame(server_node.accept_uni().await.unwrap(), MAX_VIDEO_FRAME)
                .await
                .unwrap();
        assert_eq!(
            got_header,
            FrameHeader {
                payload_len: 300_000,
                ..header
            }
        );
        assert_eq!(got_payload, payload);

        send_frame(&node, FrameHeader { seq: 2, ..header }, payload.clone())
            .await
            .unwrap();
        let mut inbound = server_node.accept_uni().await.unwrap();
        let relay_header = recv_frame_header(&mut inbound).await.unwrap();
        let relay = relay_frame(inbound, &relay_header, &server_player, MAX_VIDEO_FRAME);
        let receive =
            async { recv_frame(player.accept_uni().await.unwrap(), MAX_VIDEO_FRAME).await };
        let (relayed, received) = tokio::join!(relay, receive);
        assert_eq!(relayed.unwrap(), 300_000);
        let (h, p) = received.unwrap();
        assert_eq!(
            h,
            FrameHeader {
                seq: 2,
                payload_len: 300_000,
                ..header
            }
        );
        assert_eq!(p, payload);

        // Input datagram player -> gateway.
        let datagram = InputDatagram {
            session_id: 5,
            seq: 1,
            sent_ts_us: unix_micros(),
            event: InputEvent::MouseMove { dx: -3, dy: 4 },
        };
        player
            .send_datagram(Bytes::from(datagram.encode()))
            .unwrap();
        let raw = server_player.read_datagram().await.unwrap();
        assert_eq!(InputDatagram::decode(&raw), Ok(datagram));
    })
    .await;
}

#[tokio::test]
async fn recv_frame_enforces_the_announced_length_and_the_limit() {
    guarded(async {
        let (server, sha) = self_signed_server();
        let (server_conn, client) = tokio::join!(
            accept(&server),
            dial(
                server.addr,
                "localhost",
                ServerVerify::PinnedSha256(sha),
                ALPN_NODE
            )
        );
        let (_ep, client) = client.unwrap();
        let server_conn = server_conn.unwrap();

        async fn raw_uni(conn: &quinn::Connection, payload_len: u32, body: &[u8]) {
            let mut s = conn.open_uni().await.unwrap();
            let header = FrameHeader {
                payload_len,
                ..FrameHeader::default()
            };
            s.write_all(&header.encode()).await.unwrap();
            s.write_all(body).await.unwrap();
            s.finish().unwrap();
        }

        raw_uni(&client, 1000, &[1; 10]).await;
        match recv_frame(server_conn.accept_uni().await.unwrap(), MAX_VIDEO_FRAME).await {
            Err(StreamError::PayloadTruncated {
                expected: 1000,
                got: 10,
            }) => {}
            other => panic!("expected PayloadTruncated, got {other:?}"),
        }

        raw_uni(&client, 10, &[1; 11]).await;
        match recv_frame(server_conn.accept_uni().await.unwrap(), MAX_VIDEO_FRAME).await {
            Err(e @ StreamError::PayloadOverrun { expected: 10 }) => {
                assert_eq!(e.blame(), Blame::Peer);
            }
            other => panic!("expected PayloadOverrun, got {other:?}"),
        }

        raw_uni(&client, 5000, &[1; 10]).await;
        match recv_frame(server_conn.accept_uni().await.unwrap(), 4096).await {
            Err(StreamError::PayloadTooLarge {
                len: 5000,
                max: 4096,
            }) => {}
            other => panic!("expected PayloadTooLarge, got {other:?}"),
        }

        let mut s = client.open_uni().await.unwrap();
        s.write_all(&[FRAME_MAGIC_FOR_TEST, 1, 0]).await.unwrap();
        s.finish().unwrap();
        match recv_frame(server_conn.accept_uni().await.unwrap(), MAX_VIDEO_FRAME).await {
            Err(StreamError::HeaderTruncated { got: 3 }) => {}
            other => panic!("expected HeaderTruncated, got {other:?}"),
        }

        // A framed stream that stops inside a frame is reported as truncated.
        let (mut send_half, _) = client.open_bi().await.unwrap();
        let frame = encode_to_vec(&Message::Shutdown(Shutdown {
            reason: "bye".into(),
        }));
        send_half
            .write_all(&frame[..frame.len() - 1])
            .await
            .unwrap();
        send_half.finish().unwrap();
        let (_, recv_half) = server_conn.accept_bi().await.unwrap();
        let mut framed = FramedRecv::new(recv_half, MAX_CONTROL_FRAME);
        match framed.next().await {
            Err(StreamError::Truncated { buffered }) => assert_eq!(buffered, frame.len() - 1),
            other => panic!("expected Truncated, got {other:?}"),
        }
    })
    .await;
}

const FRAME_MAGIC_FOR_TEST: u8 = nearpath_protocol::frame::FRAME_MAGIC;

/// A scripted gateway for the client library: answers inference, list and play requests.
async fn scripted_gateway(conn: quinn::Connection) {
    while let Ok((mut send_half, recv_half)) = conn.accept_bi().await {
        let conn = conn.clone();
        tokio::spawn(async move {
            let mut framed = FramedRecv::new(recv_half, MAX_REQUEST_FRAME);
            let first = framed.next().await.unwrap().unwrap();
            match first {
                Message::InferRequest(req) if req.api_key == "bad" => {
                    let err = Message::Error(ErrorInfo {
                        code: "unauthorized".into(),
                        message: "unknown key".into(),
                        retryable: false,
                    });
                    send(&mut send_half, &err).await.unwrap();
                    send_half.finish().unwrap();
                }
                Message::InferRequest(req) => {
                    assert_eq!(req.protocol_version, PROTOCOL_VERSION);
                    send(
                        &mut send_half,
                        &Message::InferStarted(InferStarted {
                            request_id: "req-9".into(),
                            model: "echo".into(),
                        }),
                    )
                    .await
                    .unwrap();
                    // Echo the request body back one character per token.
                    let n = req.request_json.chars().count() as u32;
                    for (i, c) in req.request_json.chars().enumerate() {
                        let token = Message::Token(Token {
                            index: i as u32,
                            text: c.to_string(),
                            node_elapsed_us: i as u64 * 10,
                        });
                        send(&mut send_half, &token).await.unwrap();
                    }
                    let done = Message::Done(Done {
                        finish_reason: "stop".into(),
                        prompt_tokens: n,
                        completion_tokens: n,
                    });
                    send(&mut send_half, &done).await.unwrap();
                    send_half.finish().unwrap();
                    // The client finished its side after the request.
                    assert_eq!(framed.next().await.unwrap(), None);
                }
                Message::ListGames(_) => {
                    let list = Message::GameList(GameList {
                        titles: vec!["doom".into(), "quake".into()],
                    });
                    send(&mut send_half, &list).await.unwrap();
                    send_half.finish().unwrap();
                }
                Message::PlayRequest(req) if req.game == "missing" => {
                    let err = Message::Error(ErrorInfo {
                        code: "no_capacity".into(),
                        message: "no node serves missing".into(),
                        retryable: true,
                    });
                    send(&mut send_half, &err).await.unwrap();
                    send_half.finish().unwrap();
                }
                Message::PlayRequest(req) => {
                    let session_id = 0xdead_beef_u64;
                    let started = Message::PlayStarted(PlayStarted {
                        session_id,
                        width: req.width,
                        height: req.height,
                        fps: req.fps,
                        bitrate_kbps: req.bitrate_kbps,
                        codec: VideoCodec::H264,
                    });
                    send(&mut send_half, &started).await.unwrap();
                    for seq in 0..3u64 {
                        let header = FrameHeader {
                            session_id,
                            seq,
                            keyframe: seq == 0,
                            width: 1280,
                            height: 720,
                            ..FrameHeader::default()
                        };
                        let payload = Bytes::from(vec![seq as u8; 1000 * (seq as usize + 1)]);
                        send_frame(&conn, header, payload).await.unwrap();
                    }
                    send(
                        &mut send_half,
                        &Message::Paused(Paused {
                            reason: "failover".into(),
                        }),
                    )
                    .await
                    .unwrap();
                    send(&mut send_half, &Message::Resumed).await.unwrap();
                    // The client sends one input datagram, then ForceKeyframe, then Close.
                    let raw = conn.read_datagram().await.unwrap();
                    let input = InputDatagram::decode(&raw).unwrap();
                    assert_eq!(input.session_id, session_id);
                    assert_eq!(input.seq, 1);
                    assert_eq!(
                        input.event,
                        InputEvent::Key {
                            code: 4,
                            down: true
                        }
                    );
                    assert_eq!(framed.next().await.unwrap(), Some(Message::ForceKeyframe));
                    match framed.next().await.unwrap() {
                        Some(Message::Close(c)) => assert_eq!(c.reason, "bye"),
                        other => panic!("expected Close, got {other:?}"),
                    }
                    let ended = Message::Ended(Ended {
                        reason: "closed".into(),
                    });
                    send(&mut send_half, &ended).await.unwrap();
                    send_half.finish().unwrap();
                }
                other => panic!("scripted gateway got {other:?}"),
            }
        });
    }
}

#[tokio::test]
async fn client_library_runs_inference_and_play_sessions() {
    guarded(async {
        let (server, sha) = self_signed_server();
        let endpoint = server.endpoint.clone();
        let gateway = tokio::spawn(async move {
            if let Some(incoming) = endpoint.accept().await {
                let conn = incoming.await.unwrap();
                assert_eq!(tls::negotiated_alpn(&conn).as_deref(), Some(ALPN_CLIENT));
                scripted_gateway(conn).await;
            }
        });

        let client = Client::connect(server.addr, "localhost", ServerVerify::PinnedSha256(sha))
            .await
            .unwrap();

        // Inference: Started, one token per character, Done, then None.
        let mut stream = client.infer("sk-1", "héllo").await.unwrap();
        let mut text = String::new();
        let mut events = Vec::new();
        while let Some(ev) = stream.next().await.unwrap() {
            if let InferEvent::Token(t) = &ev {
                assert_eq!(t.index as usize, text.chars().count());
                text.push_str(&t.text);
            }
            events.push(ev);
        }
        assert_eq!(text, "héllo");
        assert_eq!(
            events.first(),
            Some(&InferEvent::Started(InferStarted {
                request_id: "req-9".into(),
                model: "echo".into()
            }))
        );
        assert_eq!(
            events.last(),
            Some(&InferEvent::Done(Done {
                finish_reason: "stop".into(),
                prompt_tokens: 5,
                completion_tokens: 5
            }))
        );
        assert_eq!(stream.next().await.unwrap(), None);

        // A refused request surfaces as an Error event, then the stream is over.
        let mut refused = client.infer("bad", "{}").await.unwrap();
        match refused.next().await.unwrap() {
            Some(InferEvent::Error(e)) => assert_eq!(e.code, "unauthorized"),
            other => panic!("expected Error, got {other:?}"),
        }
        assert_eq!(refused.next().await.unwrap(), None);

        assert_eq!(
            client.list_games("sk-1").await.unwrap(),
            vec!["doom", "quake"]
        );

        match client.play("sk-1", PlayParams::hd("missing")).await {
            Err(e @ ClientError::Refused { .. }) => {
                assert!(e.is_retryable());
                assert!(e.to_string().contains("no_capacity"), "{e}");
            }
            other => panic!("expected Refused, got {other:?}"),
        }

        let mut session = client.play("sk-1", PlayParams::hd("doom")).await.unwrap();
        assert_eq!(session.started().session_id, 0xdead_beef);
        assert_eq!(session.started().bitrate_kbps, 10_000);
        assert!(matches!(
            client.play("sk-1", PlayParams::hd("doom")).await,
            Err(ClientError::PlayActive)
        ));

        // Three frames (in order) and Paused then Resumed, interleaved however they arrive.
        let mut frames = Vec::new();
        let mut controls = Vec::new();
        while frames.len() < 3 || controls.len() < 2 {
            match session.next_event().await.unwrap().unwrap() {
                PlayEvent::Frame(f) => frames.push(f),
                PlayEvent::Control(c) => controls.push(c),
            }
        }
        let seqs: Vec<u64> = frames.iter().map(|f| f.header.seq).collect();
        assert_eq!(seqs, vec![0, 1, 2]);
        for f in &frames {
            assert_eq!(f.payload.len(), 1000 * (f.header.seq as usize + 1));
            assert_eq!(f.header.payload_len as usize, f.payload.len());
            assert!(f.payload.iter().all(|b| *b == f.header.seq as u8));
        }
        assert_eq!(
            controls,
            vec![
                ControlEvent::Paused(Paused {
                    reason: "failover".into()
                }),
                ControlEvent::Resumed
            ]
        );

        assert_eq!(
            session
                .send_input(InputEvent::Key {
                    code: 4,
                    down: true
                })
                .unwrap(),
            1
        );
        session.request_keyframe().await.unwrap();
        session.close("bye").await.unwrap();
        assert_eq!(
            session.next_control().await.unwrap(),
            Some(ControlEvent::Ended(Ended {
                reason: "closed".into()
            }))
        );
        assert_eq!(session.next_control().await.unwrap(), None);
        drop(session);

        client.close().await;
        gateway.await.unwrap();
    })
    .await;
}

/// Presents a fixed certificate with a signing key that does not belong to it: an impostor that
/// copied the pinned (public) certificate but does not hold its private key.
#[derive(Debug)]
struct Impostor(std::sync::Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Impostor {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[tokio::test]
async fn pinned_verifier_still_checks_the_handshake_signature() {
    guarded(async {
        let genuine = tls::self_signed(&["localhost".to_string()]).unwrap();
        let other = tls::self_signed(&["localhost".to_string()]).unwrap();
        let signer = rustls::crypto::ring::sign::any_supported_type(&other.key).unwrap();
        let stolen = rustls::sign::CertifiedKey::new(vec![genuine.cert.clone()], signer);
        let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(std::sync::Arc::new(Impostor(std::sync::Arc::new(stolen))));
        config.alpn_protocols = vec![ALPN_NODE.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(config).unwrap();
        let server_config = quinn::ServerConfig::with_crypto(std::sync::Arc::new(quic));
        let (endpoint, _) =
            server_endpoint("127.0.0.1:0".parse().unwrap(), server_config, 1 << 20).unwrap();
        let server = Server {
            addr: endpoint.local_addr().unwrap(),
            endpoint,
        };

        let (_, client) = tokio::join!(
            accept(&server),
            dial(
                server.addr,
                "localhost",
                ServerVerify::PinnedSha256(genuine.sha256),
                ALPN_NODE
            )
        );
        assert!(
            client.is_err(),
            "an impostor without the pinned key connected"
        );
        // The insecure mode checks the signature too.
        let (_, client) = tokio::join!(
            accept(&server),
            dial(
                server.addr,
                "localhost",
                ServerVerify::InsecureDangerous,
                ALPN_NODE
            )
        );
        assert!(client.is_err(), "insecure mode accepted a bad signature");
    })
    .await;
}

#[tokio::test]
async fn pin_set_accepts_any_listed_certificate_and_nothing_else() {
    guarded(async {
        let (server, sha) = self_signed_server();
        let mut other = sha;
        other[0] ^= 0xff;
        let accepting = accept(&server);
        let dialing = dial(
            server.addr,
            "localhost",
            ServerVerify::PinnedAnySha256(vec![other, sha]),
            ALPN_NODE,
        );
        let (server_conn, client) = tokio::join!(accepting, dialing);
        assert!(
            client.is_ok() && server_conn.is_some(),
            "a listed pin must connect"
        );

        // Neither a list without the server's pin nor an empty list trusts it.
        for pins in [vec![other], Vec::new()] {
            let accepting = accept(&server);
            let dialing = dial(
                server.addr,
                "localhost",
                ServerVerify::PinnedAnySha256(pins.clone()),
                ALPN_NODE,
            );
            let (server_conn, client) = tokio::join!(accepting, dialing);
            assert!(client.is_err(), "{} pins: connected", pins.len());
            assert!(server_conn.is_none());
        }
    })
    .await;
}
