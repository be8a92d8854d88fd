//! `/metrics` as operators, dashboards and alerts see it: every family listed from the start,
//! the Grafana dashboard's names among them, latencies in seconds.

mod common;

use common::*;
use nearpath_config::BackendConfig;
use nearpath_gateway::metrics::{dashboard, exported_families, sample_names, FAMILIES};
use std::collections::BTreeSet;

fn chat(model: &str, stream: bool, max_tokens: u32) -> String {
    serde_json::json!({"model": model, "stream": stream, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "Say something"}]})
    .to_string()
}

/// The families of an exposition, from its `# TYPE` lines.
fn families(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_gateway_lists_every_family_and_the_dashboard_uses_only_those() {
    let gw = TestGateway::start(|_| {}).await;
    let page = gw.admin_get_text("/metrics").await;

    // Every family, before any node, client or request.
    let want: BTreeSet<String> = exported_families().map(|(n, _)| n.to_string()).collect();
    assert_eq!(families(&page), want, "{page}");
    assert!(
        want.len() >= 45,
        "the list the dashboard check uses is the full one"
    );

    // Bounded label sets are there at 0, so that rates and alerts work from the start.
    for series in [
        r#"nearpath_game_sessions_total{transport="quic",outcome="no_capacity"} 0"#,
        r#"nearpath_game_sessions_total{transport="webrtc",outcome="ok"} 0"#,
        r#"nearpath_game_frames_dropped_total{reason="late"} 0"#,
        r#"nearpath_inference_requests_total{api="http",outcome="ok"} 0"#,
        r#"nearpath_inference_requests_total{api="quic",outcome="timeout"} 0"#,
        r#"nearpath_geofence_decisions_total{side="node",outcome="allow",rule="-"} 0"#,
        r#"nearpath_geofence_decisions_total{side="client",outcome="deny",rule="unknown-location"} 0"#,
        r#"nearpath_node_rejections_total{code="bad_token"} 0"#,
        r#"nearpath_node_disconnects_total{cause="connection_lost"} 0"#,
        r#"nearpath_ledger_refusals_total{entry="webrtc"} 0"#,
        "nearpath_node_registrations_total 0",
        "nearpath_game_frame_latency_seconds_count 0",
        "nearpath_ledger_healthy 1",
    ] {
        assert!(
            page.lines().any(|l| l == series),
            "missing `{series}`:\n{page}"
        );
    }
    let build = page
        .lines()
        .find(|l| l.starts_with("nearpath_build_info{"))
        .expect("build info");
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && build.contains("git_sha=\"")
            && build.contains("rustc=\"")
            && build.ends_with("} 1"),
        "{build}"
    );
    #[cfg(target_os = "linux")]
    {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = metric(&page, "process_start_time_seconds ").expect("start time");
        // This test process started the gateway: within the last hour, not in the future.
        assert!(
            started > now - 3600.0 && started <= now + 1.0,
            "{started} vs {now}"
        );
        assert!(metric(&page, "process_resident_memory_bytes ").unwrap() > 1e6);
        assert!(metric(&page, "process_open_fds ").unwrap() >= 3.0);
    }

    // The dashboard names only what this gateway exports.
    let exported: BTreeSet<String> = FAMILIES
        .iter()
        .filter(|(name, _)| families(&page).contains(*name))
        .flat_map(|(name, kind)| sample_names(name, *kind))
        .collect();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/nearpath-gateway.json"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    let used = dashboard::used_metrics(&json);
    assert!(!used.is_empty());
    let unknown: Vec<_> = used.iter().filter(|(_, m)| !exported.contains(m)).collect();
    assert!(unknown.is_empty(), "not exported: {unknown:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latencies_are_exported_in_seconds() {
    let gw = TestGateway::start(|_| {}).await;
    let mut cfg = gw.node_config("de-1", &gw.token);
    // A first token no sooner than 20 ms after the request: in milliseconds the sum would be
    // at least 20, in seconds it is a fraction of one.
    cfg.models[0].backend = BackendConfig::Sim {
        ttft_ms: 20,
        tokens_per_s: 200.0,
        seed: 1,
    };
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let (status, _, body) = Http::new()
        .request(
            "POST",
            &gw.api_url("/v1/chat/completions"),
            Some(API_KEY),
            Some(&chat("m", true, 3)),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The request is metered when its stream ends, just after the client saw `[DONE]`.
    let page = eventually(
        "the request's metrics",
        std::time::Duration::from_secs(5),
        || async {
            let page = gw.admin_get_text("/metrics").await;
            (metric(&page, "nearpath_inference_ttft_seconds_count{") == Some(1.0)).then_some(page)
        },
    )
    .await;
    let ttft = metric(&page, "nearpath_inference_ttft_seconds_sum{").unwrap();
    assert!(
        (0.015..10.0).contains(&ttft),
        "TTFT {ttft} is not in seconds"
    );
    let gaps = metric(&page, "nearpath_inference_inter_token_seconds_count ").unwrap();
    let gap_sum = metric(&page, "nearpath_inference_inter_token_seconds_sum ").unwrap();
    assert!(gaps >= 1.0 && gap_sum < 10.0, "{gaps} gaps, {gap_sum} s");
    assert_eq!(
        metric(
            &page,
            r#"nearpath_inference_requests_total{api="http",outcome="ok"} "#
        ),
        Some(1.0)
    );
    node.stop().await.unwrap();
    gw.stop().await;
}

/// `a` and `b` hold the same values, in any order.
fn same(what: &str, a: impl IntoIterator<Item = &'static str>, b: &[&str]) {
    let a: BTreeSet<&str> = a.into_iter().collect();
    let b: BTreeSet<&str> = b.iter().copied().collect();
    assert_eq!(
        a, b,
        "{what}: the code's values and metrics::label_values differ"
    );
}

/// The label values a fresh gateway shows at 0 are the ones the code records: each enum behind
/// a label is listed whole here (the matches stop compiling when a variant is added, so the
/// lists follow), and must equal its list in `metrics::label_values`.
#[test]
fn label_values_listed_from_start_are_the_values_the_code_records() {
    use nearpath_gateway::metrics::label_values as lv;

    use nearpath_gateway::relay::DropReason as D;
    let all = [D::Late, D::Overload, D::Foreign, D::Relay, D::Shed];
    for r in all {
        match r {
            D::Late | D::Overload | D::Foreign | D::Relay | D::Shed => {}
        }
    }
    same(
        "frame drop reasons",
        all.map(D::as_str),
        lv::FRAME_DROP_REASONS,
    );

    use nearpath_gateway::control::session::LeaveCause as L;
    let all = [
        L::ConnectionLost,
        L::HeartbeatTimeout,
        L::Kicked,
        L::Revoked,
        L::GatewayShutdown,
        L::ProtocolError,
        L::PathRefused,
    ];
    for c in all {
        match c {
            L::ConnectionLost
            | L::HeartbeatTimeout
            | L::Kicked
            | L::Revoked
            | L::GatewayShutdown
            | L::ProtocolError
            | L::PathRefused => {}
        }
    }
    same(
        "disconnect causes",
        all.map(L::as_str),
        lv::NODE_DISCONNECT_CAUSES,
    );

    use nearpath_protocol::message::RejectCode;
    same(
        "reject codes",
        // Every code the wire can carry.
        (0..=u8::MAX)
            .filter_map(RejectCode::from_byte)
            .map(RejectCode::as_str),
        lv::NODE_REJECT_CODES,
    );

    use nearpath_gateway::conn_guard::{HttpRefusal as H, QuicRefusal as Q};
    for q in [Q::Rate, Q::Unauthenticated] {
        match q {
            Q::Rate | Q::Unauthenticated => {}
        }
    }
    same(
        "QUIC refusals",
        [Q::Rate, Q::Unauthenticated].map(Q::as_str),
        lv::QUIC_REFUSALS,
    );
    for h in [H::MaxConnections, H::MaxConnectionsPerIp] {
        match h {
            H::MaxConnections | H::MaxConnectionsPerIp => {}
        }
    }
    same(
        "HTTP refusals",
        [H::MaxConnections, H::MaxConnectionsPerIp].map(H::as_str),
        lv::HTTP_REFUSALS,
    );

    use nearpath_gateway::error::Kind as K;
    let kinds = [
        K::InvalidRequest,
        K::Unauthenticated,
        K::KeyRevoked,
        K::Geofence,
        K::Forbidden,
        K::NotFound,
        K::MethodNotAllowed,
        K::TooLarge,
        K::UnsupportedMediaType,
        K::Unprocessable,
        K::RateLimited,
        K::Unavailable,
        K::NodeFailed,
        K::Timeout,
        K::Internal,
    ];
    for k in kinds {
        match k {
            K::InvalidRequest
            | K::Unauthenticated
            | K::KeyRevoked
            | K::Geofence
            | K::Forbidden
            | K::NotFound
            | K::MethodNotAllowed
            | K::TooLarge
            | K::UnsupportedMediaType
            | K::Unprocessable
            | K::RateLimited
            | K::Unavailable
            | K::NodeFailed
            | K::Timeout
            | K::Internal => {}
        }
    }
    same(
        "inference outcomes",
        kinds
            .map(K::as_str)
            .into_iter()
            .chain(["ok", "cancelled", "redirected"]),
        lv::INFERENCE_OUTCOMES,
    );

    use nearpath_gateway::budget::Budget;
    same("budgets", Budget::ALL.map(Budget::as_str), lv::BUDGETS);

    use nearpath_gateway::fleet_limits::book::{CapPool as C, RatePool as R};
    let rate = [R::Requests, R::Tokens, R::SessionStarts];
    for p in rate {
        match p {
            R::Requests | R::Tokens | R::SessionStarts => {}
        }
    }
    same("rate pools", rate.map(R::as_str), lv::RATE_POOLS);
    for p in [C::Streams, C::Sessions] {
        match p {
            C::Streams | C::Sessions => {}
        }
    }
    same(
        "cap pools",
        [C::Streams, C::Sessions].map(C::as_str),
        lv::CAP_POOLS,
    );

    // Codes that refuse a game start, named by constants.
    use nearpath_gateway::error::{CONCURRENCY_LIMIT_EXCEEDED, LEDGER_UNAVAILABLE};
    use nearpath_gateway::game::service::{BAD_TICKET, TICKET_NODE_UNAVAILABLE};
    for code in [
        BAD_TICKET,
        TICKET_NODE_UNAVAILABLE,
        CONCURRENCY_LIMIT_EXCEEDED,
        LEDGER_UNAVAILABLE,
        nearpath_gateway::meter::USAGE_MISMATCH,
    ] {
        assert!(
            lv::GAME_SESSION_OUTCOMES.contains(&code) || lv::NODE_PENALTY_KINDS.contains(&code),
            "{code} is not listed"
        );
    }
}
