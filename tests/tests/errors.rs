//! Errors a person can act on, over real sockets on loopback: a pinned certificate that the
//! gateway does not present is named with both pins and never retried, an address where nothing
//! answers is called so, and what the binaries print says each cause once.

mod common;

use common::*;
use nearpath_edge_node::{EdgeNode, NodeError, NodeOptions, NodeStatus};
use nearpath_protocol::report::{chain, repeats_a_cause};
use nearpath_protocol::tls::{self, sha256_hex, PinMismatch, ServerVerify};
use nearpath_protocol::{Client, ClientError};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The pin of a certificate the gateway does not have.
fn another_pin() -> [u8; 32] {
    tls::self_signed(&["localhost".to_string()]).unwrap().sha256
}

fn node_options() -> NodeOptions {
    NodeOptions {
        use_nvml: false,
        verify: None,
        bind: Some(SocketAddr::new(ip(DE), 0)),
    }
}

/// Asserts the binaries' line for `e` holds every cause of its chain exactly once.
fn assert_each_cause_once(e: &anyhow::Error) -> String {
    let line = chain(e.as_ref());
    assert!(!repeats_a_cause(&line), "a cause repeats: {line}");
    for cause in e.chain() {
        let text = cause.to_string();
        assert_eq!(line.matches(&text).count(), 1, "{text:?} in {line:?}");
    }
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_pinning_another_certificate_stops_naming_both_pins() {
    let gw = TestGateway::start(|_| {}).await;
    let wrong = another_pin();
    let mut cfg = gw.node_config("pinned-wrong", &gw.token);
    cfg.gateway.pinned_cert_sha256 = Some(sha256_hex(&wrong));
    // A fast backoff: a node that retried would keep dialling inside the bound below.
    cfg.gateway.reconnect_initial_ms = 10;
    cfg.gateway.reconnect_max_ms = 20;
    let node = EdgeNode::new(cfg, node_options()).unwrap();
    let status = node.status();
    let result = tokio::time::timeout(Duration::from_secs(20), node.run(CancellationToken::new()))
        .await
        .expect("the node must stop on a pin mismatch, not retry it");
    let err = result.unwrap_err();
    let expected = format!(
        "gateway {}: certificate pin mismatch: expected {}, gateway presented {}",
        gw.addrs.quic,
        sha256_hex(&wrong),
        sha256_hex(&gw.sha)
    );
    assert_eq!(err.to_string(), expected);
    match &err {
        NodeError::Untrusted(gateways) => assert_eq!(
            gateways,
            &[(
                gw.addrs.quic.to_string(),
                PinMismatch {
                    expected: vec![wrong],
                    presented: gw.sha
                }
            )]
        ),
        other => panic!("expected Untrusted, got {other:?}"),
    }
    assert_eq!(*status.borrow(), NodeStatus::Stopped);
    // What `edge-node` prints: the message once.
    assert_eq!(assert_each_cause_once(&anyhow::Error::new(err)), expected);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_skips_a_gateway_with_another_certificate_and_registers_with_the_pinned_one() {
    let impostor = TestGateway::start(|_| {}).await;
    let gw = TestGateway::start(|_| {}).await;
    let mut cfg = gw.node_config("skips-impostor", &gw.token);
    cfg.gateway.address = String::new();
    cfg.gateway.addresses = vec![impostor.addrs.quic.to_string(), gw.addrs.quic.to_string()];
    let mut node = TestNode::start(cfg, ip(DE));
    match node
        .wait_status(|s| matches!(s, NodeStatus::Registered { .. } | NodeStatus::Stopped))
        .await
    {
        NodeStatus::Registered { gateway, .. } => assert_eq!(gateway, gw.addrs.quic.to_string()),
        other => panic!("expected to register with the pinned gateway, got {other:?}"),
    }
    assert!(impostor.node_ids().await.is_empty());
    node.stop().await.unwrap();
    gw.stop().await;
    impostor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pinning_another_certificate_is_told_both_pins() {
    let gw = TestGateway::start(|_| {}).await;
    let wrong = another_pin();
    let err = Client::connect(
        gw.addrs.quic,
        "localhost",
        ServerVerify::PinnedSha256(wrong),
    )
    .await
    .unwrap_err();
    let mismatch = format!(
        "certificate pin mismatch: expected {}, gateway presented {}",
        sha256_hex(&wrong),
        sha256_hex(&gw.sha)
    );
    assert!(matches!(err, ClientError::PinMismatch(_)), "{err:?}");
    assert_eq!(err.to_string(), mismatch);
    assert!(!err.is_retryable());
    // A federation's set of pins is named in full.
    let other = another_pin();
    let err = Client::connect(
        gw.addrs.quic,
        "localhost",
        ServerVerify::PinnedAnySha256(vec![wrong, other]),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "certificate pin mismatch: expected {} or {}, gateway presented {}",
            sha256_hex(&wrong),
            sha256_hex(&other),
            sha256_hex(&gw.sha)
        )
    );
    // What `nearpath` prints.
    let address = gw.addrs.quic.to_string();
    let text = nearpath_gateway_cli::pick::connect(
        &address,
        Some("localhost"),
        ServerVerify::PinnedSha256(wrong),
    )
    .await
    .unwrap_err();
    assert_eq!(text, format!("gateway {address}: {mismatch}"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_where_nothing_answers_is_no_gateway_answering_at_addr_udp() {
    // A UDP port that is bound (so no ICMP comes back) and never read.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let transport = tls::TransportOptions {
        idle_timeout: Duration::from_secs(1),
        ..nearpath_protocol::client::client_transport()
    };
    let started = Instant::now();
    let err = Client::connect_with(
        "127.0.0.1:0".parse().unwrap(),
        addr,
        "localhost",
        ServerVerify::PinnedSha256(another_pin()),
        &transport,
    )
    .await
    .unwrap_err();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "gave up before the timeout"
    );
    assert!(
        matches!(err, ClientError::NoAnswer { addr: a } if a == addr),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("no gateway answering at {addr} (UDP)")
    );
    assert!(err.is_retryable());
    let line = assert_each_cause_once(&anyhow::Error::new(err));
    assert!(!line.contains("timed out"), "{line}");
    // Among several gateways, `nearpath` says the same of the silent one.
    let text = nearpath_gateway_cli::pick::nearest(
        &[addr.to_string()],
        Some("localhost"),
        ServerVerify::PinnedSha256(another_pin()),
    )
    .await
    .expect_err("nothing answers");
    assert_eq!(
        text,
        format!("no gateway to use: no gateway answering at {addr} (UDP)")
    );
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_main_error_kinds_print_each_cause_once() {
    // A listener address already in use: the example from the issue.
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let err = nearpath_gateway::Listeners::bind(taken_addr, any, any)
        .await
        .err()
        .expect("the port is taken");
    let line = assert_each_cause_once(&anyhow::Error::new(err));
    assert_eq!(line.matches("Address already in use").count(), 1, "{line}");

    // Missing certificate files, a missing GeoIP database, a store that cannot open, a bad
    // pin: each as `gateway run`, `edge-node` and `nearpath` print them, with their context.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let tls_err = nearpath_gateway::GatewayError::from(tls::load_certs(&missing).unwrap_err());
    assert_each_cause_once(&anyhow::Error::new(tls_err).context("starting the gateway"));
    let geo = nearpath_config::GeoConfig {
        database: Some(missing.clone()),
        ..Default::default()
    };
    let geo_err =
        nearpath_gateway::GatewayError::from(nearpath_geo::GeoDb::open(&geo).unwrap_err());
    assert_each_cause_once(&anyhow::Error::new(geo_err));
    let store_err = nearpath_gateway::store::SqliteStore::open(dir.path())
        .expect_err("a directory is not a database");
    let store_err = nearpath_gateway::GatewayError::from(store_err);
    assert_each_cause_once(&anyhow::Error::new(store_err));
    let pin_err = NodeError::from(tls::parse_sha256_hex("not-a-pin").unwrap_err());
    assert_each_cause_once(&anyhow::Error::new(pin_err));
    let io = std::fs::read(&missing).unwrap_err();
    assert_each_cause_once(
        &anyhow::Error::new(io).context(format!("reading {}", missing.display())),
    );
    drop(taken);
}
