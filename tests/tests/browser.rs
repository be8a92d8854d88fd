//! Browser players end to end: headless Chromium opens the gateway's `/play` page, which signals
//! with WHEP, decodes the H.264 track, sends input over the data channel and reports its
//! `getStats()` to the gateway. Plus the WHEP error cases over plain HTTP (no browser needed).
//!
//! The browser tests need `/usr/bin/chromium` (`.ci/run` installs it) and fail with that
//! message when it is missing. They run one at a time (a 2-core machine encodes and decodes
//! 720p60 in software for each).

mod cdp;
mod common;

use cdp::{Browser, Page};
use common::*;
use nearpath_config::{GameEntry, GameSource, NodeConfig};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Browser tests take the whole machine; they do not run concurrently.
static ONE_BROWSER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn with_arena(mut cfg: NodeConfig) -> NodeConfig {
    cfg.games = vec![GameEntry { title: "arena".into(), source: GameSource::Builtin {} }];
    cfg.capacity.game_sessions = 1;
    cfg
}

fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

/// Polls the page's stats until `pred` holds (bounded), returning them.
async fn wait_stats(page: &Page, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        if let Some(s) = page.stats().await {
            if pred(&s) {
                return s;
            }
            assert!(start.elapsed() < timeout, "timed out waiting for {what}; page stats: {s}");
        } else {
            let err = page.eval("window.nearpath && window.nearpath.lastError").await.unwrap_or(Value::Null);
            assert!(start.elapsed() < timeout, "timed out waiting for {what}; no stats yet (page error: {err})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the admin session list until `pred` holds (bounded).
async fn wait_sessions(gw: &TestGateway, what: &str, timeout: Duration, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let v = gw.admin_get("/admin/sessions").await;
        let list = v["data"].as_array().cloned().unwrap_or_default();
        if pred(&list) {
            return list;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}; sessions: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn play_url(gw: &TestGateway, w: u32, h: u32, fps: u32) -> String {
    gw.api_url(&format!("/play?key={API_KEY}&game=arena&width={w}&height={h}&fps={fps}&autostart=1"))
}

fn print_latency(stats: &Value) {
    let l = &stats["inputToPhoton"];
    println!(
        "input-to-photon through Chromium: p50 {:.1} ms, p95 {:.1} ms, min {:.1}, max {:.1} (n={})",
        num(l, "p50"),
        num(l, "p95"),
        num(l, "min"),
        num(l, "max"),
        num(l, "n")
    );
    if let Some(b) = stats["breakdown"].as_object() {
        for (k, v) in b {
            println!("  {k:<18} p50 {:>6.2} ms  p95 {:>6.2} ms", num(v, "p50"), num(v, "p95"));
        }
    }
    println!(
        "  getStats: jitter buffer {:.2} ms/frame (avg {:.2}), decode {:.2} ms/frame (avg {:.2}), rtt {:?} ms, data channel rtt {:?} ms",
        num(stats, "jitterBufferMs"),
        num(stats, "jitterBufferAvgMs"),
        num(stats, "decodeMs"),
        num(stats, "decodeAvgMs"),
        stats.get("rttMs"),
        stats.get("dcRttMs")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_plays_720p60_for_10_seconds_and_keys_move_the_ship() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    let page = browser.open(&play_url(&gw, 1280, 720, 60)).await;

    let first = wait_stats(&page, "the first decoded frame", Duration::from_secs(30), |s| num(s, "framesDecoded") > 0.0).await;
    let sessions = wait_sessions(&gw, "the WebRTC session", Duration::from_secs(5), |l| l.len() == 1).await;
    assert_eq!(sessions[0]["transport"], "webrtc");
    assert_eq!(sessions[0]["node"], "de-1");

    // Ten seconds of play, holding and releasing D (move right) every 200 ms.
    let t0 = Instant::now();
    let decoded0 = num(&first, "framesDecoded");
    let mut down = false;
    let mut presses = 0;
    while t0.elapsed() < Duration::from_secs(10) {
        down = !down;
        page.key(68, "d", "KeyD", down).await.unwrap();
        presses += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if down {
        page.key(68, "d", "KeyD", false).await.unwrap();
        presses += 1;
    }
    let played = t0.elapsed();
    // The page posts stats once a second: wait for a sample taken after the last key.
    let sent_at_end = page.eval("window.nearpath.stats.inputsSent").await.unwrap();
    let stats = wait_stats(&page, "the last inputs applied", Duration::from_secs(5), |s| {
        num(s, "inputsSent") >= f64::from(presses) && num(s, "inputSeqApplied") >= num(s, "inputsSent")
    })
    .await;
    let decoded = num(&stats, "framesDecoded") - decoded0;
    let expected = 60.0 * played.as_secs_f64();
    println!(
        "decoded {decoded} frames in {:.2} s ({:.1} fps), {}x{}, {} kbit/s, lost {}, dropped {}, freezes {} (inputs sent {}, {sent_at_end} before the final sample)",
        played.as_secs_f64(),
        decoded / played.as_secs_f64(),
        stats["width"],
        stats["height"],
        stats["bitrateKbps"],
        stats["packetsLost"],
        stats["framesDropped"],
        stats["freezeCount"],
        stats["inputsSent"],
    );
    print_latency(&stats);
    assert!(decoded >= 0.9 * expected, "decoded only {decoded} frames of {expected:.0}: {stats}");
    assert_eq!(num(&stats, "width"), 1280.0, "{stats}");
    assert_eq!(num(&stats, "height"), 720.0, "{stats}");
    // Every key the page sent was applied by the node (frames carry the last applied seq).
    assert!(num(&stats, "inputsSent") >= f64::from(presses), "{stats}");
    assert!(num(&stats, "inputSeqApplied") >= num(&stats, "inputsSent"), "{stats}");
    // Input-to-photon was measured for most presses.
    let l = &stats["inputToPhoton"];
    assert!(num(l, "n") >= f64::from(presses) * 0.5, "too few latency samples: {stats}");
    assert!(num(l, "p50") > 0.0 && num(l, "p95") >= num(l, "p50"), "{stats}");

    // The gateway shows what the page reported, and what it relayed itself.
    let sessions = wait_sessions(&gw, "the page's stats in the admin view", Duration::from_secs(5), |l| {
        l.len() == 1 && l[0]["client_stats"]["framesDecoded"].as_f64().unwrap_or(0.0) > 0.0
    })
    .await;
    let s = &sessions[0];
    assert!(s["inputs"].as_u64().unwrap() >= u64::from(presses), "{s}");
    assert!(s["client_stats"]["gateway"]["frames_sent"].as_u64().unwrap() as f64 >= 0.9 * expected, "{s}");
    assert_eq!(s["client_stats"]["width"], 1280, "{s}");

    // Stop: the page DELETEs its session resource and the node's session ends.
    page.eval("window.nearpath.stop()").await.unwrap();
    wait_sessions(&gw, "the session to end", Duration::from_secs(5), |l| l.is_empty()).await;
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}
