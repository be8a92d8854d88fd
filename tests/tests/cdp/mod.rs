//! A small Chrome DevTools Protocol client for the browser tests: launches headless Chromium
//! with a fresh profile, opens pages, evaluates JavaScript and types keys. The browser process
//! is killed when [`Browser`] is dropped, on every path (`kill_on_drop`).

#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// Where Debian's `chromium` package installs the browser (`.ci/run` installs it).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// A CDP command that takes longer than this has hung.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;

/// A running headless Chromium and its DevTools connection.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    cdp: Arc<Cdp>,
}

struct Cdp {
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
    next: AtomicU64,
}

impl Cdp {
    async fn call(
        &self,
        method: &str,
        params: Value,
        session: Option<&str>,
    ) -> Result<Value, String> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.out
            .send(Message::text(msg.to_string()))
            .map_err(|_| "the DevTools connection is closed".to_string())?;
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(format!("{method}: the DevTools connection closed")),
            Err(_) => Err(format!("{method}: no answer within {CALL_TIMEOUT:?}")),
        }
    }
}

impl Browser {
    /// Starts Chromium (panics with an explanation when it is not installed: the tests must not
    /// pass silently without a browser).
    pub async fn launch() -> Browser {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: the browser tests need Chromium (`apt-get install -y chromium`; .ci/run installs it)"
        );
        let profile = tempfile::tempdir().expect("a temporary profile directory");
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                // The player's sound plays (and feeds its beep detector) without a click.
                "--autoplay-policy=no-user-gesture-required",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            // Extra switches for diagnosing a failed test (e.g. a net log:
            // `NEARPATH_CHROMIUM_ARGS="--log-net-log=/tmp/net.json --net-log-capture-mode=Everything"`).
            .args(
                std::env::var("NEARPATH_CHROMIUM_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting chromium");
        let stderr = child.stderr.take().expect("chromium's stderr");
        let mut lines = BufReader::new(stderr).lines();
        let ws_url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.trim().strip_prefix("DevTools listening on ") {
                    return Some(url.to_string());
                }
            }
            None
        })
        .await
        .expect("chromium did not start its DevTools server within 30 s")
        .expect("chromium exited before its DevTools server started");
        // Keep draining stderr so that the browser never blocks on a full pipe.
        let verbose = std::env::var_os("NEARPATH_CHROMIUM_LOG").is_some();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if verbose {
                    eprintln!("[chromium] {line}");
                }
            }
        });
        let (ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .expect("connecting to DevTools");
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let pending: Pending = Arc::default();
        let p = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                    continue;
                };
                if let Some(id) = v.get("id").and_then(Value::as_u64) {
                    let r = match v.get("error") {
                        Some(e) => Err(e.to_string()),
                        None => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
                    };
                    if let Some(tx) = p.lock().unwrap().remove(&id) {
                        let _ = tx.send(r);
                    }
                    continue;
                }
                // Page console output and uncaught exceptions, for diagnosing a failed test.
                match v.get("method").and_then(Value::as_str) {
                    Some("Runtime.consoleAPICalled") => {
                        let args: Vec<String> = v["params"]["args"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .map(|x| {
                                        x.get("value").map(|v| v.to_string()).unwrap_or_default()
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        println!(
                            "[page console.{}] {}",
                            v["params"]["type"].as_str().unwrap_or("log"),
                            args.join(" ")
                        );
                    }
                    Some("Runtime.exceptionThrown") => {
                        println!("[page exception] {}", v["params"]["exceptionDetails"]);
                    }
                    _ => {}
                }
            }
            // The connection is gone: fail every call still waiting.
            p.lock().unwrap().clear();
        });
        Browser {
            child,
            _profile: profile,
            cdp: Arc::new(Cdp {
                out,
                pending,
                next: AtomicU64::new(1),
            }),
        }
    }

    /// Opens `url` in a new tab and attaches to it.
    pub async fn open(&self, url: &str) -> Page {
        self.open_with(url, None).await
    }

    /// Opens `url` in a new tab after arranging for `init_script` to run in every document of
    /// the tab before the page's own scripts (`Page.addScriptToEvaluateOnNewDocument`): how a
    /// test takes a browser feature away, e.g. `delete window.WebTransport`.
    pub async fn open_with(&self, url: &str, init_script: Option<&str>) -> Page {
        let t = self
            .cdp
            .call("Target.createTarget", json!({"url": "about:blank"}), None)
            .await
            .expect("Target.createTarget");
        let target = t["targetId"].as_str().expect("a target id").to_string();
        let a = self
            .cdp
            .call(
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
                None,
            )
            .await
            .expect("Target.attachToTarget");
        let session = a["sessionId"].as_str().expect("a session id").to_string();
        let page = Page {
            cdp: self.cdp.clone(),
            session,
            target,
        };
        page.call("Runtime.enable", json!({}))
            .await
            .expect("Runtime.enable");
        page.call("Page.enable", json!({}))
            .await
            .expect("Page.enable");
        page.call("Page.bringToFront", json!({}))
            .await
            .expect("Page.bringToFront");
        if let Some(source) = init_script {
            page.call(
                "Page.addScriptToEvaluateOnNewDocument",
                json!({ "source": source }),
            )
            .await
            .expect("Page.addScriptToEvaluateOnNewDocument");
        }
        page.call("Page.navigate", json!({"url": url}))
            .await
            .expect("Page.navigate");
        page
    }

    /// The browser's process id (for reading its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// One tab.
pub struct Page {
    cdp: Arc<Cdp>,
    session: String,
    target: String,
}

impl Page {
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, String> {
        self.cdp.call(method, params, Some(&self.session)).await
    }

    /// Evaluates `expr` (awaiting a promise) and returns its JSON value.
    pub async fn eval(&self, expr: &str) -> Result<Value, String> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            return Err(format!("{expr}: {e}"));
        }
        Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// The player page's latest stats (`window.nearpath.stats`), if any yet.
    pub async fn stats(&self) -> Option<Value> {
        match self
            .eval("window.nearpath ? window.nearpath.stats : null")
            .await
        {
            Ok(Value::Null) | Err(_) => None,
            Ok(v) => Some(v),
        }
    }

    /// Presses or releases a key, as a user would (it reaches the page's keydown/keyup handlers).
    pub async fn key(
        &self,
        key_code: u32,
        key: &str,
        code: &str,
        down: bool,
    ) -> Result<(), String> {
        let kind = if down { "keyDown" } else { "keyUp" };
        self.call(
            "Input.dispatchKeyEvent",
            json!({"type": kind, "windowsVirtualKeyCode": key_code, "nativeVirtualKeyCode": key_code, "key": key, "code": code}),
        )
        .await
        .map(|_| ())
    }
}
