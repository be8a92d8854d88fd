//! Hostile tests: location (see hostile.rs). The geofence must not have side doors: an IPv6
//! spelling of a sanctioned IPv4 address, a client-written forwarding header, or an entry a
//! proxy wrote in a form the gateway did not expect.
//!
//! The gateway under test trusts 127.0.0.1 as its proxy (`test_config`), and the test overrides
//! place 127.0.0.14 in North Korea and 127.0.0.10 in France; requests come from 127.0.0.1 with
//! the header the "proxy" would have written.

#[allow(unused_imports)]
use crate::common::*;
use nearpath_config::{GatewayConfig, UnknownPolicy};
use serde_json::Value;

fn chat() -> String {
    serde_json::json!({"model": "m", "stream": false, "max_tokens": 1,
        "messages": [{"role": "user", "content": "hello"}]})
    .to_string()
}

/// A gateway (edited by `edit`) with one uncontrolled (`cpu`) node in Germany, registered.
async fn gateway_with_node(edit: impl FnOnce(&mut GatewayConfig)) -> (TestGateway, TestNode) {
    let gw = TestGateway::start(edit).await;
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;
    (gw, node)
}

/// A chat completion through the trusted proxy (127.0.0.1) carrying `headers`: (status, the
/// error message or the body).
async fn ask(gw: &TestGateway, headers: &[(&str, &str)]) -> (u16, String) {
    let (status, _, body) = gw
        .http
        .request(
            "POST",
            &gw.api_url("/v1/chat/completions"),
            Some(API_KEY),
            Some(&chat()),
            headers,
        )
        .await;
    let message = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or(body);
    (status, message)
}

fn assert_sanctioned(got: (u16, String), what: &str) {
    assert_eq!(got.0, 403, "{what}: {}", got.1);
    assert!(got.1.contains("sanctions"), "{what}: {}", got.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_address_embedding_a_sanctioned_ipv4_is_refused() {
    // Item 8: a 6to4 (or Teredo, NAT64, IPv4-compatible) address of a North Korean IPv4 used
    // to be "unknown", and unknown is served every uncontrolled class, sanctions included.
    let (gw, node) = gateway_with_node(|_| {}).await;
    // The France client is served: the setup works.
    let (s, b) = ask(&gw, &[("x-forwarded-for", FR_CLIENT.0)]).await;
    assert_eq!(s, 200, "{b}");
    for addr in [
        // 175.45.176.1, North Korea in the embedded database.
        "2002:af2d:b001::1",
        "2001:0:4136:e378:8000:0:50d2:4ffe",
        "64:ff9b::af2d:b001",
        "::175.45.176.1",
        // 127.0.0.14, North Korea by the test overrides (which are matched by the IPv4 too).
        "2002:7f00:e::1",
        "[2002:7f00:e::1]:4711",
        "64:ff9b::127.0.0.14",
    ] {
        assert_sanctioned(ask(&gw, &[("x-forwarded-for", addr)]).await, addr);
    }
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_forwarded_header_does_not_outrank_the_proxy_x_forwarded_for() {
    // Item 9a: the client wrote `Forwarded: for=<France>`; the proxy appended the client's
    // real (North Korean) address to X-Forwarded-For. Any Forwarded header used to win.
    let (gw, node) = gateway_with_node(|_| {}).await;
    let spoof = format!("for={}", FR_CLIENT.0);
    let got = ask(
        &gw,
        &[("forwarded", &spoof), ("x-forwarded-for", KP_CLIENT.0)],
    )
    .await;
    assert_sanctioned(got, "Forwarded from the client beside the proxy's XFF");
    // A client header of another name (X-Real-IP) is ignored just the same.
    let got = ask(
        &gw,
        &[("x-real-ip", FR_CLIENT.0), ("x-forwarded-for", KP_CLIENT.0)],
    )
    .await;
    assert_sanctioned(got, "X-Real-IP from the client");
    node.stop().await.unwrap();
    gw.stop().await;

    // With `client_address_header = "forwarded"` only Forwarded counts, and a client-written
    // X-Forwarded-For is ignored.
    let (gw, node) = gateway_with_node(|c| c.http.client_address_header = "forwarded".into()).await;
    let real = format!("for=\"{}:4711\"", KP_CLIENT.0);
    let got = ask(
        &gw,
        &[("x-forwarded-for", FR_CLIENT.0), ("forwarded", &real)],
    )
    .await;
    assert_sanctioned(got, "XFF from the client beside the proxy's Forwarded");
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparseable_proxy_entry_does_not_hand_the_decision_to_the_client_entry() {
    // Item 9b: `X-Forwarded-For: <France>, <North Korea>:4711` — the proxy appended the real
    // address with a port; the entry did not parse and was skipped, so the client-written France
    // entry decided and the request was served.
    let (gw, node) = gateway_with_node(|c| {
        // Unknown locations are refused here, so that "unknown" shows as a 403 of its own.
        c.geofence.unknown_location_uncontrolled = UnknownPolicy::Deny;
    })
    .await;
    let with_port = format!("{}, {}:4711", FR_CLIENT.0, KP_CLIENT.0);
    assert_sanctioned(
        ask(&gw, &[("x-forwarded-for", &with_port)]).await,
        &with_port,
    );
    // `[v6]:port` of the 6to4 spelling of the same address.
    let bracketed = format!("{}, [2002:7f00:e::1]:443", FR_CLIENT.0);
    assert_sanctioned(
        ask(&gw, &[("x-forwarded-for", &bracketed)]).await,
        &bracketed,
    );
    // Entries that are no address at all make the location unknown, never the entry to their
    // left.
    for bad in ["unknown", "_hidden", "", "not-an-address"] {
        let chain = format!("{}, {bad}", FR_CLIENT.0);
        let (s, b) = ask(&gw, &[("x-forwarded-for", &chain)]).await;
        assert_eq!(s, 403, "{chain}: {b}");
        assert!(b.contains("could not be determined"), "{chain}: {b}");
    }
    // Two header lines are one list, in order: the proxy's line is the last.
    let (s, b) = ask(
        &gw,
        &[
            ("x-forwarded-for", FR_CLIENT.0),
            ("x-forwarded-for", &format!("{}:80", KP_CLIENT.0)),
        ],
    )
    .await;
    assert_sanctioned((s, b), "two XFF lines");
    // The France client through the proxy is still served.
    let (s, b) = ask(&gw, &[("x-forwarded-for", FR_CLIENT.0)]).await;
    assert_eq!(s, 200, "{b}");
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sanctions_rule_can_refuse_unknown_locations() {
    // Item 10: `unknown_location = "deny"` on the sanctions rule refuses a client whose
    // location is unknown (here an address no database or override knows), under the
    // sanctions rule's name; the default (`allow`) serves it an uncontrolled class.
    let (gw, node) = gateway_with_node(|_| {}).await;
    let (s, b) = ask(&gw, &[("x-forwarded-for", "10.20.30.40")]).await;
    assert_eq!(s, 200, "the default serves unknown locations: {b}");
    node.stop().await.unwrap();
    gw.stop().await;

    let (gw, node) = gateway_with_node(|c| {
        let sanctions = c
            .geofence
            .rules
            .iter_mut()
            .find(|r| r.name == "sanctions")
            .unwrap();
        sanctions.unknown_location = UnknownPolicy::Deny;
    })
    .await;
    for unknown in ["10.20.30.40", "unknown"] {
        let (s, b) = ask(&gw, &[("x-forwarded-for", unknown)]).await;
        assert_eq!(s, 403, "{unknown}: {b}");
        assert!(
            b.contains("could not be determined") && b.contains("sanctions"),
            "{b}"
        );
    }
    let (s, b) = ask(&gw, &[("x-forwarded-for", FR_CLIENT.0)]).await;
    assert_eq!(s, 200, "{b}");
    node.stop().await.unwrap();
    gw.stop().await;
}
