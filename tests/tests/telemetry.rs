//! What an operator sees of a gateway and its nodes (issue 16): one access-log line per game
//! session (native and WebRTC) and per admin request, each with its fields; and the OTLP export
//! of spans, where a request's gateway span and its node's span join the client's trace.
//!
//! The whole binary runs under the subscriber the binaries install (`nearpath_telemetry`), with
//! its lines captured and its spans exported to a fake OTLP/HTTP collector on port 0.

mod common;

use common::*;
use http_body_util::BodyExt;
use nearpath_config::LogConfig;
use nearpath_protocol::PlayParams;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::json;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const CHROMIUM_OFFER: &str = include_str!("../browser/chromium-156-offer.sdp");
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// What the process logged and what the collector received, for the whole test binary.
struct Observed {
    lines: Arc<Mutex<Vec<u8>>>,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

fn observed() -> &'static Observed {
    static OBSERVED: OnceLock<Observed> = OnceLock::new();
    OBSERVED.get_or_init(|| {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let collector = fake_collector(spans.clone());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let writer = lines.clone();
        let cfg = LogConfig {
            level: "info".into(),
            otlp_endpoint: Some(format!("http://{collector}")),
            service_name: Some("nearpath-test".into()),
            ..LogConfig::default()
        };
        nearpath_telemetry::init_with_writer(
            &cfg,
            "unused",
            move || SharedWriter(writer.clone()),
            false,
        )
        .unwrap();
        Observed { lines, spans }
    })
}

/// A fake OTLP/HTTP collector: a hyper server on port 0, on its own thread and runtime so that
/// it outlives each test's runtime, decoding every `POST /v1/traces` body into `(service, span)`.
fn fake_collector(spans: Arc<Mutex<Vec<(String, Span)>>>) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let spans = spans.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let spans = spans.clone();
                            async move {
                                assert_eq!(req.uri().path(), "/v1/traces");
                                assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let export = ExportTraceServiceRequest::decode(body).unwrap();
                                let mut got = spans.lock().unwrap();
                                for rs in export.resource_spans {
                                    let service = rs
                                        .resource
                                        .iter()
                                        .flat_map(|r| &r.attributes)
                                        .find(|a| a.key == "service.name")
                                        .and_then(|a| a.value.as_ref())
                                        .map(|v| format!("{:?}", v.value))
                                        .unwrap_or_default();
                                    for ss in rs.scope_spans {
                                        got.extend(
                                            ss.spans.into_iter().map(|s| (service.clone(), s)),
                                        );
                                    }
                                }
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::new()),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap()
}

struct SharedWriter(Arc<Mutex<Vec<u8>>>);

impl Write for SharedWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The first captured line containing every one of `needles` (bounded wait).
async fn line_with(needles: &[&str]) -> String {
    let lines = observed().lines.clone();
    eventually(
        &format!("a log line with {needles:?}"),
        Duration::from_secs(15),
        || {
            let text = String::from_utf8_lossy(&lines.lock().unwrap()).into_owned();
            let found = text
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_string);
            async move { found }
        },
    )
    .await
}

fn captured() -> String {
    String::from_utf8_lossy(&observed().lines.lock().unwrap()).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_game_session_ends_with_one_access_line_naming_its_key_game_node_and_country() {
    observed();
    let gw = TestGateway::start(|_| {}).await;
    let node = raw_game_node(&gw, "game-de-1", ip(DE), &gw.token, &["arena"], 2).await;
    let c = native_client(&gw, FR_CLIENT).await;
    let (session, g) = tokio::join!(c.play(API_KEY, PlayParams::hd("arena")), node.accept_game());
    let mut session = session.unwrap();
    for seq in 0..3 {
        node.send_video_frame(g.session_id, seq, &[0, 0, 0, 1, 0x65, seq as u8])
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), session.next_frame())
            .await
            .expect("frame in time")
            .unwrap()
            .expect("a frame");
    }
    // The gateway counts a frame once the player has acknowledged it, which can come after the
    // player has read it: close only when the gateway has counted all three (regression: the
    // line said frames=2 when the close overtook the last acknowledgement on a loaded machine).
    let counted = Instant::now();
    while admin_game_session(&gw, g.session_id).await.expect("live")["frames"] != 3 {
        assert!(
            counted.elapsed() < Duration::from_secs(5),
            "the gateway never counted 3 frames: {:?}",
            admin_game_session(&gw, g.session_id).await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    session.close("done").await.unwrap();
    // One play at a time per connection: the next one below needs this one gone.
    drop(session);
    let id = format!("session_id={} ", g.session_id);
    let line = line_with(&["nearpath::access", "quic GAME", &id]).await;
    for part in [
        "key=",
        "game=\"arena\"",
        "node=game-de-1",
        "country=FR",
        "frames=3",
        "nodes=1",
        "duration_ms=",
    ] {
        assert!(line.contains(part), "{part} not in {line}");
    }
    assert!(!line.contains("key=-"), "{line}");
    // One line per session, however many frames it relayed.
    let text = captured();
    let lines = text
        .lines()
        .filter(|l| l.contains(&format!("quic GAME {id}")))
        .count();
    assert_eq!(lines, 1, "{text}");

    // A refused play gets its line too: no session, no key, and the client's title escaped
    // and cut (a hostile client writes what it likes there).
    let forged_title = format!("arena\nFAKE-LINE{}", "x".repeat(500));
    let refused = c
        .play("not-a-key", PlayParams::hd(forged_title.as_str()))
        .await;
    assert!(refused.is_err(), "a wrong key plays");
    let line = line_with(&["quic GAME session_id=- key=- ", "FAKE-LINE"]).await;
    assert!(line.contains("game=\"arena\\nFAKE-LINE"), "{line}");
    assert!(line.contains("country=FR"), "{line}");
    assert!(!line.contains(&"x".repeat(100)), "the title is cut: {line}");
    assert!(
        !captured().lines().any(|l| l.starts_with("FAKE-LINE")),
        "a forged title started a log line"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webrtc_game_session_ends_with_one_access_line_and_its_requests_have_ids() {
    observed();
    const PORTS: (u16, u16) = (47_420, 47_421);
    let gw = TestGateway::start(|c| {
        (c.game.webrtc_udp_port_min, c.game.webrtc_udp_port_max) = PORTS;
    })
    .await;
    let node = raw_game_node(&gw, "web-de-1", ip(DE), &gw.token, &["arena"], 2).await;
    let whep = gw.api_url("/v1/games/arena/whep?width=320&height=180&fps=30");
    let auth = format!("Bearer {API_KEY}");
    // The browser is in Korea, behind the trusted local proxy.
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/sdp"),
        ("x-forwarded-for", KR_CLIENT.0),
        ("x-request-id", "req-whep-offer-1"),
    ];
    let ((status, h, body), g) = tokio::join!(
        raw_request("POST", &whep, &headers, CHROMIUM_OFFER),
        node.accept_game()
    );
    assert_eq!(status, 201, "{body}");
    let resource = h["location"].to_str().unwrap().to_string();
    let line = line_with(&["request_id=req-whep-offer-1 "]).await;
    assert!(
        line.contains("http POST /v1/games/arena/whep status=201"),
        "{line}"
    );

    // Hanging up ends the session: its line says how, and where the player was.
    let (status, h, _) = raw_request(
        "DELETE",
        &gw.api_url(&resource),
        &[("authorization", auth.as_str())],
        "",
    )
    .await;
    assert_eq!(status, 200, "DELETE {resource}");
    let delete_id = h["x-request-id"].to_str().unwrap().to_string();
    line_with(&[
        &format!("request_id={delete_id} "),
        "http DELETE /v1/sessions/",
    ])
    .await;
    let id = format!("session_id={} ", g.session_id);
    let line = line_with(&["webrtc GAME", &id]).await;
    for part in [
        "game=\"arena\"",
        "node=web-de-1",
        "country=KR",
        "nodes=1",
        "frames=0",
        "outcome=",
    ] {
        assert!(line.contains(part), "{part} not in {line}");
    }
    // The WebRTC library's warnings about a session like this one (never connected, hung up)
    // stay below the default level: no WARN line from a target outside this project.
    let text = captured();
    let library_warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" WARN ") && (l.contains(" rtc") || l.contains(" webrtc")))
        .collect();
    assert!(library_warnings.is_empty(), "{library_warnings:#?}");
    drop(node);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requests_get_a_line_with_a_request_id_and_scrapes_stay_below_info() {
    observed();
    let gw = TestGateway::start(|_| {}).await;
    let (status, h, _) = gw
        .http
        .request(
            "GET",
            &gw.admin_url("/admin/nodes"),
            Some(ADMIN),
            None,
            &[("x-request-id", "req-admin-nodes-1")],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(h["x-request-id"], "req-admin-nodes-1");
    let line = line_with(&["request_id=req-admin-nodes-1"]).await;
    assert!(line.contains("admin GET /admin/nodes status=200"), "{line}");

    // A forged request id (too long, control characters) is replaced, never logged as sent.
    let forged = "x".repeat(200);
    let (status, h, _) = gw
        .http
        .request(
            "GET",
            &gw.admin_url("/admin/nodes"),
            Some("wrong-token"),
            None,
            &[("x-request-id", forged.as_str())],
        )
        .await;
    assert_eq!(status, 401);
    let id = h["x-request-id"].to_str().unwrap().to_string();
    assert!(id.starts_with("req_"), "{id}");
    let line = line_with(&[&format!("request_id={id}")]).await;
    assert!(
        line.contains("status=401") && line.contains("outcome=error"),
        "{line}"
    );
    assert!(!captured().contains(&forged));

    // Scrapes are logged at debug: not at the configured info.
    let (status, h, _) = gw
        .http
        .request(
            "GET",
            &gw.admin_url("/metrics"),
            None,
            None,
            &[("x-request-id", "req-scrape-1")],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(h["x-request-id"], "req-scrape-1");
    // The admin request after it is logged, so the scrape's line would be there by now.
    gw.http
        .request(
            "GET",
            &gw.admin_url("/admin/nodes"),
            Some(ADMIN),
            None,
            &[("x-request-id", "req-admin-nodes-2")],
        )
        .await;
    line_with(&["request_id=req-admin-nodes-2"]).await;
    assert!(!captured().contains("req-scrape-1"), "{}", captured());
    gw.stop().await;
}

/// One HTTP request with exactly these headers (the common client adds a JSON content type).
async fn raw_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, hyper::HeaderMap, String) {
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let mut b = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("request timed out")
        .unwrap();
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, h, String::from_utf8_lossy(&body).into_owned())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_export_joins_the_gateway_and_node_spans_to_the_clients_trace() {
    let spans = observed().spans.clone();
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(gw.node_config("otel-de-1", &gw.token), ip(DE));
    node.registered().await;
    let traceparent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let (status, _, text) = gw
        .http
        .request(
            "POST",
            &gw.api_url("/v1/chat/completions"),
            Some(API_KEY),
            Some(&body),
            &[
                ("traceparent", &traceparent),
                ("x-request-id", "req-otel-1"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{text}");

    // Both spans end around the response; flushing sends what has ended.
    let (gateway_span, node_span) = eventually(
        "the gateway's and the node's spans at the collector",
        Duration::from_secs(20),
        || {
            let spans = spans.clone();
            async move {
                tokio::task::spawn_blocking(nearpath_telemetry::flush)
                    .await
                    .unwrap();
                let got = spans.lock().unwrap();
                let in_trace = |name: &str| {
                    got.iter()
                        .find(|(_, s)| s.name == name && hex(&s.trace_id) == TRACE_ID)
                        .cloned()
                };
                Some((in_trace("http_request")?, in_trace("inference")?))
            }
        },
    )
    .await;
    let (service, gateway_span) = gateway_span;
    assert!(service.contains("nearpath-test"), "{service}");
    // The gateway's span is the child of the client's, and the node's the child of the
    // gateway's: the traceparent the node got named the exported span.
    assert_eq!(hex(&gateway_span.parent_span_id), CLIENT_SPAN);
    let (_, node_span) = node_span;
    assert_eq!(
        hex(&node_span.parent_span_id),
        hex(&gateway_span.span_id),
        "{node_span:?}"
    );
    // The request's attributes travel with the span.
    assert!(
        gateway_span
            .attributes
            .iter()
            .any(|a| a.key == "id" && format!("{:?}", a.value).contains("req-otel-1")),
        "{:?}",
        gateway_span.attributes
    );
    // The access line names the same trace.
    let line = line_with(&["request_id=req-otel-1 "]).await;
    assert!(line.contains(&format!("trace_id={TRACE_ID}")), "{line}");
    node.stop().await.unwrap();
    gw.stop().await;
}

/// The value of a span's attribute `key`, as text (ints and strings alike).
fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::IntValue(i) => i.to_string(),
            Value::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
}

/// The gateway's `game_session` span of session `id` and the node's `game` span under it,
/// once both have ended and been exported (bounded wait).
async fn game_spans(id: u64) -> (Span, Span) {
    let spans = observed().spans.clone();
    eventually(
        &format!("the gateway's and the node's spans of game session {id}"),
        Duration::from_secs(30),
        || {
            let spans = spans.clone();
            async move {
                tokio::task::spawn_blocking(nearpath_telemetry::flush)
                    .await
                    .unwrap();
                let got = spans.lock().unwrap();
                let gateway = got
                    .iter()
                    .map(|(_, s)| s)
                    .find(|s| {
                        s.name == "game_session"
                            && attribute(s, "id").as_deref() == Some(&id.to_string())
                    })?
                    .clone();
                let node = got
                    .iter()
                    .map(|(_, s)| s)
                    .find(|s| s.name == "game" && s.parent_span_id == gateway.span_id)?
                    .clone();
                Some((gateway, node))
            }
        },
    )
    .await
}

/// Regression (issue 16, protocol version 4): a game session's spans join the player's W3C
/// trace, native (`PlayRequest.traceparent`) and WHEP (the offer's `traceparent` header), and
/// the node's session span is the child of the gateway's; a forged context starts a fresh
/// trace and the session still plays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_export_joins_a_game_sessions_gateway_and_node_spans_to_the_players_trace() {
    observed();
    const NATIVE_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    const WHEP_TRACE: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
    let gw = TestGateway::start(|_| {}).await;
    let mut cfg = gw.node_config("otel-game-1", &gw.token);
    cfg.games = vec![nearpath_config::GameEntry {
        title: "arena".into(),
        source: nearpath_config::GameSource::Builtin {},
    }];
    cfg.capacity.game_sessions = 3;
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let c = native_client(&gw, FR_CLIENT).await;
    let small = || PlayParams {
        game: "arena".into(),
        width: 160,
        height: 96,
        fps: 30,
        bitrate_kbps: 300,
    };
    // Plays one frame with `traceparent`, ends, and returns the session id.
    let play = |traceparent: &'static str| {
        let c = &c;
        async move {
            let mut s = c
                .play_traced(API_KEY, small(), &[], Some(traceparent))
                .await
                .unwrap_or_else(|e| panic!("{traceparent:?} refused: {e}"));
            let id = s.started().session_id;
            tokio::time::timeout(Duration::from_secs(10), s.next_frame())
                .await
                .expect("a frame in time")
                .unwrap()
                .expect("a frame");
            s.close("done").await.unwrap();
            drop(s);
            id
        }
    };

    // Native, in the player's trace.
    let id = play(Box::leak(
        format!("00-{NATIVE_TRACE}-{CLIENT_SPAN}-01").into_boxed_str(),
    ))
    .await;
    let (gateway, node_span) = game_spans(id).await;
    assert_eq!(hex(&gateway.trace_id), NATIVE_TRACE);
    assert_eq!(hex(&gateway.parent_span_id), CLIENT_SPAN);
    assert_eq!(hex(&node_span.trace_id), NATIVE_TRACE);
    assert_eq!(
        attribute(&gateway, "trace_id").as_deref(),
        Some(NATIVE_TRACE)
    );

    // Forged contexts (all-zero trace id, version ff, upper case) are ignored: the session
    // plays, in a trace the gateway starts, which the node's span still joins.
    for forged in [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "ff-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01",
        "00-0AF7651916CD43DD8448EB211C80319C-00f067aa0ba902b7-01",
    ] {
        let id = play(forged).await;
        let (gateway, node_span) = game_spans(id).await;
        assert!(gateway.parent_span_id.is_empty(), "{forged}: {gateway:?}");
        assert_ne!(hex(&gateway.trace_id), NATIVE_TRACE, "{forged}");
        assert_ne!(gateway.trace_id, vec![0u8; 16], "{forged}");
        assert_eq!(node_span.trace_id, gateway.trace_id, "{forged}");
    }

    // WHEP: the offer's `traceparent` header.
    let traceparent = format!("00-{WHEP_TRACE}-{CLIENT_SPAN}-01");
    let id = whep_session(&gw, &traceparent).await;
    let (gateway, node_span) = game_spans(id).await;
    assert_eq!(hex(&gateway.trace_id), WHEP_TRACE);
    assert_eq!(hex(&gateway.parent_span_id), CLIENT_SPAN);
    assert_eq!(hex(&node_span.trace_id), WHEP_TRACE);

    // A forged header (too long) is ignored the same way: the offer is answered.
    let forged = format!("00-{WHEP_TRACE}-{CLIENT_SPAN}-01{}", "0".repeat(4096));
    let id = whep_session(&gw, &forged).await;
    let (gateway, node_span) = game_spans(id).await;
    assert!(gateway.parent_span_id.is_empty(), "{gateway:?}");
    assert_ne!(hex(&gateway.trace_id), WHEP_TRACE);
    assert_eq!(node_span.trace_id, gateway.trace_id);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// One WHEP session of `arena` with `traceparent` on its offer, answered and then ended; its id.
async fn whep_session(gw: &TestGateway, traceparent: &str) -> u64 {
    let whep = gw.api_url("/v1/games/arena/whep?width=160&height=96&fps=30");
    let auth = format!("Bearer {API_KEY}");
    let (status, h, body) = raw_request(
        "POST",
        &whep,
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/sdp"),
            ("traceparent", traceparent),
        ],
        CHROMIUM_OFFER,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let resource = h["location"].to_str().unwrap().to_string();
    // The resource is `/v1/sessions/{id}`, the session's id.
    let id: u64 = resource
        .strip_prefix("/v1/sessions/")
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("resource {resource}"));
    let (status, _, _) = raw_request(
        "DELETE",
        &gw.api_url(&resource),
        &[("authorization", auth.as_str())],
        "",
    )
    .await;
    assert_eq!(status, 200, "DELETE {resource}");
    id
}
