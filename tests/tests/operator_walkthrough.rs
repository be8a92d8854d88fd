//! The README's "Run a gateway and a separate node" walkthrough, step by step, with the real
//! `gateway` and `edge-node` binaries as separate processes: the example gateway config (only
//! the listeners moved to port 0 and the state into a temporary folder, through the
//! environment), the certificate created and its pin printed, an operator, enrolment token and
//! API key made with the admin API, the example node config pointed at the gateway with that
//! pin, the node registered, `/metrics` scraped, one inference request answered and its
//! access-log line in the gateway's output; then a second start that reuses the certificate, and
//! the files an operator may have broken, which are errors and are never replaced.

mod common;

use common::{metric, Http};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

/// The admin token the walkthrough exports (at least 16 characters).
const ADMIN_TOKEN: &str = "walkthrough-admin-token-0123456789";
/// How long a process may take to print what a step waits for, on a loaded machine.
const STEP: Duration = Duration::from_secs(60);

/// The `gateway` and `edge-node` binaries of this build. Cargo builds only a package's own
/// binaries for its tests, and a nested `cargo build` from inside `cargo test` waits forever
/// for the build directory's lock, which the running `cargo test` holds. The README's test
/// command (`cargo test --workspace --all-targets`) builds every binary before any test runs,
/// so they are taken from this test's target folder; run alone, the test says how to build them.
fn binaries() -> (PathBuf, PathBuf) {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<this test> → target/<profile>
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let (gateway, node) = (profile_dir.join("gateway"), profile_dir.join("edge-node"));
    for bin in [&gateway, &node] {
        assert!(
            bin.is_file(),
            "{} is missing: build the binaries first (`cargo build --bins`, or run the README's \
             `cargo test --workspace --all-targets`, which builds them)",
            bin.display()
        );
    }
    (gateway, node)
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("config/examples")
        .join(name)
}

/// A child process whose stdout and stderr lines are collected as they come.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    more: Arc<Notify>,
    /// The tasks reading stdout and stderr; they end at end of file.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .env_remove("RUST_LOG")
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("starting a process");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let more = Arc::new(Notify::new());
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let readers = vec![
            Self::collect(out, lines.clone(), more.clone()),
            Self::collect(err, lines.clone(), more.clone()),
        ];
        Proc {
            child,
            lines,
            more,
            readers,
        }
    }

    fn collect(
        r: impl tokio::io::AsyncRead + Unpin + Send + 'static,
        lines: Arc<Mutex<Vec<String>>>,
        more: Arc<Notify>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut r = BufReader::new(r).lines();
            while let Ok(Some(line)) = r.next_line().await {
                lines.lock().unwrap().push(line);
                more.notify_waiters();
            }
        })
    }

    /// The first line (so far or to come) for which `f` says something.
    async fn wait_for<T>(&self, what: &str, f: impl Fn(&str) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let notified = self.more.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = self.lines.lock().unwrap().iter().find_map(|l| f(l)) {
                return v;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("timed out waiting for {what}; output:\n{}", self.output());
            }
        }
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// SIGTERM, then the exit status.
    async fn stop(mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        tokio::time::timeout(STEP, self.child.wait())
            .await
            .expect("the process exits after SIGTERM")
            .unwrap()
    }

    /// The exit status of a process expected to end by itself, and its output.
    async fn exit(mut self) -> (std::process::ExitStatus, String) {
        let status = tokio::time::timeout(STEP, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the process did not exit; output:\n{}", self.output()))
            .unwrap();
        // The readers reach the end of both pipes once the process is gone.
        for r in std::mem::take(&mut self.readers) {
            let _ = tokio::time::timeout(STEP, r).await;
        }
        (status, self.output())
    }
}

/// `gateway run` with the example config: everything from the file but the listeners (port 0 on
/// loopback), the state folder, the admin token and the log format, set through the
/// environment as the README's walkthrough sets them.
fn gateway_run(state: &Path) -> Command {
    gateway_with(state, &["run", "--config"])
}

/// `gateway <args> <the example config>` with the walkthrough's environment.
fn gateway_with(state: &Path, args: &[&str]) -> Command {
    let (gateway, _) = binaries();
    let mut cmd = Command::new(gateway);
    cmd.args(args)
        .arg(example("gateway.toml"))
        .env("NEARPATH_ADMIN__TOKEN", ADMIN_TOKEN)
        .env("NEARPATH_HTTP__LISTEN", "127.0.0.1:0")
        .env("NEARPATH_ADMIN__LISTEN", "127.0.0.1:0")
        .env("NEARPATH_QUIC__LISTEN", "127.0.0.1:0")
        .env("NEARPATH_STORE__PATH", state.join("gateway.db"))
        // JSON lines: the test reads fields, not columns.
        .env("NEARPATH_LOG__FORMAT", "json");
    cmd
}

/// A log line as JSON, when it is one.
fn json_line(line: &str) -> Option<Value> {
    let start = line.find('{')?;
    serde_json::from_str(&line[start..]).ok()
}

/// The pin `gateway run` prints: `pinned_cert_sha256 = "<64 hex>"`.
fn printed_pin(line: &str) -> Option<String> {
    let rest = line.strip_prefix("pinned_cert_sha256 = \"")?;
    let pin = rest.strip_suffix('"')?;
    (pin.len() == 64 && pin.bytes().all(|b| b.is_ascii_hexdigit())).then(|| pin.to_string())
}

/// The listeners' addresses from the `gateway listening` line: (http, admin, quic).
fn listening(line: &str) -> Option<(SocketAddr, SocketAddr, SocketAddr)> {
    let v = json_line(line)?;
    let f = &v["fields"];
    if f["message"] != "gateway listening" {
        return None;
    }
    let addr = |k: &str| f[k].as_str()?.parse::<SocketAddr>().ok();
    Some((addr("http")?, addr("admin")?, addr("quic")?))
}

async fn admin_post(http: &Http, admin: SocketAddr, path: &str, body: Value) -> Value {
    let (status, text) = http
        .post(
            &format!("http://{admin}{path}"),
            Some(ADMIN_TOKEN),
            &body.to_string(),
            &[],
        )
        .await;
    assert!((200..300).contains(&status), "POST {path}: {status} {text}");
    serde_json::from_str(&text).unwrap()
}

async fn admin_get(http: &Http, admin: SocketAddr, path: &str) -> Value {
    let (status, text) = http
        .get(&format!("http://{admin}{path}"), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 200, "GET {path}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// `gateway cert pin FILE`'s output.
async fn cert_pin(file: &Path) -> String {
    let (gateway, _) = binaries();
    let out = Command::new(gateway)
        .args(["cert", "pin"])
        .arg(file)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_runs_a_gateway_and_a_separate_node() {
    let (_, edge_node) = binaries();
    let dir = tempfile::tempdir().unwrap();
    // The state folder exists (the README's `mkdir -p ~/nearpath`): the gateway creates its
    // database and certificate files, never the folder.
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let http = Http::new();

    // 1. `gateway run`: the certificate is created in the state folder and its pin printed.
    let gw = Proc::spawn(gateway_run(&state));
    let pin = gw.wait_for("the printed pin", printed_pin).await;
    let (api, admin, quic) = gw.wait_for("the listening line", listening).await;
    let cert_file = state.join("quic-cert.pem");
    let key_file = state.join("quic-key.pem");
    assert!(cert_file.is_file() && key_file.is_file(), "{}", gw.output());
    #[cfg(unix)]
    {
        assert_eq!(mode(&cert_file), 0o600);
        assert_eq!(mode(&key_file), 0o600);
    }
    assert_eq!(cert_pin(&cert_file).await, pin, "the file's pin");
    let info = admin_get(&http, admin, "/admin/gateway").await;
    assert_eq!(info["cert_sha256"], pin.as_str(), "{info}");
    assert_eq!(info["listen"]["quic"], quic.to_string(), "{info}");
    // The pin is logged at info too.
    gw.wait_for("the certificate log line", |l| {
        let v = json_line(l)?;
        (v["fields"]["cert_sha256"] == pin.as_str() && v["fields"]["origin"] == "created")
            .then_some(())
    })
    .await;

    // 2. An operator, verified, with an enrolment token; an API key for an app.
    let op = admin_post(&http, admin, "/admin/operators", json!({"name": "acme"})).await;
    let op_id = op["id"].as_str().unwrap().to_string();
    admin_post(
        &http,
        admin,
        &format!("/admin/operators/{op_id}/verify"),
        json!({}),
    )
    .await;
    let token = admin_post(
        &http,
        admin,
        &format!("/admin/operators/{op_id}/tokens"),
        json!({}),
    )
    .await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let key = admin_post(
        &http,
        admin,
        "/admin/api-keys",
        json!({"tenant": "acme-apps"}),
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_string();

    // 3. `edge-node` from the example config, pointed at the gateway with the printed pin.
    let mut node_cmd = Command::new(&edge_node);
    node_cmd
        .arg("--config")
        .arg(example("edge-node.toml"))
        .env("NEARPATH_NODE__ENROLMENT_TOKEN", &token)
        .env("NEARPATH_GATEWAY__ADDRESS", quic.to_string())
        .env("NEARPATH_GATEWAY__PINNED_CERT_SHA256", &pin);
    let node = Proc::spawn(node_cmd);
    common::eventually("the node in the admin listing", STEP, || async {
        let nodes = admin_get(&http, admin, "/admin/nodes").await;
        nodes["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == "edge-1")
            .then_some(())
    })
    .await;

    // 4. Metrics, without a token.
    let (status, page) = http.get(&format!("http://{admin}/metrics"), None).await;
    assert_eq!(status, 200);
    assert!(page.contains("# TYPE nearpath_"), "{page}");
    assert!(
        page.lines()
            .filter(|l| l.starts_with("nearpath_nodes{"))
            .any(|l| metric(l, "nearpath_nodes{").is_some_and(|v| v >= 1.0)),
        "no live node in the metrics:\n{page}"
    );

    // 5. One inference request, and its access-log line.
    let body = json!({
        "model": "nearpath-sim",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
    });
    let (status, text) = http
        .post(
            &format!("http://{api}/v1/chat/completions"),
            Some(&key),
            &body.to_string(),
            &[("x-request-id", "walkthrough-1")],
        )
        .await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert!(
        !answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "{answer}"
    );
    let access = gw
        .wait_for("the access-log line", |l| {
            let v = json_line(l)?;
            (v["target"] == "nearpath::access" && v["fields"]["request_id"] == "walkthrough-1")
                .then_some(v)
        })
        .await;
    assert_eq!(access["fields"]["path"], "/v1/chat/completions", "{access}");
    assert_eq!(access["fields"]["node"], "edge-1", "{access}");

    // 6. Stop both; a second start reuses the certificate: same pin, same file.
    let cert_bytes = std::fs::read(&cert_file).unwrap();
    assert!(node.stop().await.success());
    gw.stop().await;
    let gw = Proc::spawn(gateway_run(&state));
    assert_eq!(gw.wait_for("the printed pin", printed_pin).await, pin);
    gw.wait_for("the reuse log line", |l| {
        let v = json_line(l)?;
        (v["fields"]["origin"] == "reused").then_some(())
    })
    .await;
    let (_, admin, _) = gw.wait_for("the listening line", listening).await;
    let info = admin_get(&http, admin, "/admin/gateway").await;
    assert_eq!(info["cert_sha256"], pin.as_str(), "{info}");
    assert_eq!(std::fs::read(&cert_file).unwrap(), cert_bytes);
    gw.stop().await;
}

/// `gateway run` (and `gateway check-config`) on a state folder prepared by `prepare` must exit
/// with an error naming `named`, and leave the folder's files as they were.
async fn run_refuses(prepare: impl FnOnce(&Path), named: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    prepare(&state);
    let before = snapshot(&state);
    let (status, output) = Proc::spawn(gateway_run(&state)).exit().await;
    assert!(!status.success(), "{output}");
    assert!(output.contains(named), "{output}");
    assert!(!output.contains("pinned_cert_sha256 ="), "{output}");
    // Nothing was created or replaced (the database is opened after the certificate).
    assert_eq!(snapshot(&state), before, "{output}");
    // `check-config` makes the same check, creating nothing.
    let (status, checked) = Proc::spawn(gateway_with(&state, &["check-config"]))
        .exit()
        .await;
    assert!(!status.success(), "{checked}");
    assert!(checked.contains(named), "{checked}");
    assert_eq!(snapshot(&state), before, "{checked}");
    output
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap_or_default();
            (e.file_name().into_string().unwrap(), bytes)
        })
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn a_corrupt_certificate_is_an_error_never_regenerated() {
    run_refuses(
        |state| {
            std::fs::write(state.join("quic-cert.pem"), "not a certificate\n").unwrap();
            std::fs::write(state.join("quic-key.pem"), "not a key either\n").unwrap();
        },
        "quic-cert.pem",
    )
    .await;
}

#[tokio::test]
async fn an_unreadable_certificate_is_an_error_never_regenerated() {
    // A folder in the certificate's place cannot be read, even by root.
    run_refuses(
        |state| {
            std::fs::create_dir(state.join("quic-cert.pem")).unwrap();
            std::fs::write(state.join("quic-key.pem"), "key\n").unwrap();
        },
        "quic-cert.pem",
    )
    .await;
}

#[tokio::test]
async fn a_key_without_its_certificate_is_an_error_never_regenerated() {
    let out = run_refuses(
        |state| {
            let pair = nearpath_protocol::tls::self_signed(&["localhost".into()]).unwrap();
            std::fs::write(state.join("quic-key.pem"), pair.key_pem).unwrap();
        },
        "quic-key.pem",
    )
    .await;
    assert!(out.contains("without its certificate"), "{out}");
}

#[tokio::test]
async fn cert_generate_never_overwrites_and_cert_pin_names_a_bad_file() {
    let (gateway, _) = binaries();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("certs");
    let generate = || {
        let mut c = Command::new(&gateway);
        c.args(["cert", "generate", "--out"]).arg(&out_dir).args([
            "--name",
            "gw.example.com",
            "--name",
            "192.0.2.7",
        ]);
        c
    };
    let out = generate().output().await.unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let pin = stdout.lines().find_map(printed_pin).expect("a printed pin");
    assert_eq!(cert_pin(&out_dir.join("quic-cert.pem")).await, pin);
    let before = snapshot(&out_dir);
    // A second generate refuses and changes nothing.
    let again = generate().output().await.unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{again:?}"
    );
    assert_eq!(snapshot(&out_dir), before);
    // `cert pin` on something that is no certificate names the file.
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let out = Command::new(&gateway)
        .args(["cert", "pin"])
        .arg(&garbage)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("garbage.pem"),
        "{out:?}"
    );
}
