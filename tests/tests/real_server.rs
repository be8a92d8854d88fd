//! The gateway against a real inference server this project did not write: llama-cpp-python's
//! OpenAI server running a tiny random model the test generates (`tests/python/
//! make_tiny_model.py`), reached by an edge node's upstream backend. Each test asks the same
//! thing through the gateway and straight to the server with the official `openai` client
//! (`tests/python/real_server_check.py`) and compares the answers field by field.
//!
//! Needs `python3` with `llama-cpp-python[server]`, `gguf` and `openai` (`.ci/run` installs
//! them). Without them the tests print why and pass, except under `CI=true`, where they fail.
//! One server serves the whole test binary; it exits when this process does (its stdin closes).

mod common;

use common::*;
use nearpath_config::ModelConfig;
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const PYTHON_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python");
/// The model name on both paths (`--model_alias` on the server, the node's model name).
const MODEL: &str = "tiny";
/// What the tests import, as one Python statement.
const NEEDS: &str = "import llama_cpp.server, gguf, openai, uvicorn";
const INSTALL: &str = "CMAKE_ARGS=-DGGML_NATIVE=OFF python3 -m pip install \
                       'llama-cpp-python[server]' gguf openai (or run .ci/run)";

/// The running llama-cpp-python server.
struct Llama {
    port: u16,
    /// Held, never waited on: its stdin pipe closing at exit is the server's signal to stop.
    _child: Mutex<Child>,
}

impl Llama {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
}

enum Server {
    Ready(Llama),
    /// The Python packages are missing (outside CI: skip; in CI: fail).
    Missing(String),
    /// They are there but the server did not come up: every test fails with this.
    Broken(String),
}

/// The shared server, started by the first test that asks; `None` means skip this test.
fn llama() -> Option<&'static Llama> {
    static SERVER: OnceLock<Server> = OnceLock::new();
    let server = SERVER.get_or_init(|| match python_lacks(NEEDS) {
        Some(why) => Server::Missing(why),
        None => match launch() {
            Ok(l) => Server::Ready(l),
            Err(e) => Server::Broken(e),
        },
    });
    match server {
        Server::Ready(l) => Some(l),
        Server::Missing(why) => {
            skip_unless_ci(why, INSTALL);
            None
        }
        Server::Broken(why) => panic!("{why}"),
    }
}

fn launch() -> Result<Llama, String> {
    let started = Instant::now();
    // Kept past this function: the server deletes it when it stops (--remove-on-exit), since a
    // static is never dropped.
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?.keep();
    let log_path = dir.join("server.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let mut child = Command::new("python3")
        .arg(format!("{PYTHON_DIR}/llama_server.py"))
        .arg(&dir)
        .arg("--remove-on-exit")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting llama_server.py: {e}"))?;
    let log_of = |child: &mut Child| {
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        log
    };
    // The launcher prints one JSON line once its socket is bound; the thread keeps draining
    // stdout so that the server never blocks on a full pipe.
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(l) => l,
        Err(_) => {
            let log = log_of(&mut child);
            return Err(format!(
                "llama_server.py printed no port within 60 s:\n{log}"
            ));
        }
    };
    let port = serde_json::from_str::<serde_json::Value>(&line)
        .ok()
        .and_then(|v| v["port"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| format!("llama_server.py printed {line:?}, not {{\"port\": N}}"))?;
    // Bound is not serving: poll the model list (bounded) until the app answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if http_status(port, "/v1/models") == Some(200) {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = log_of(&mut child);
            return Err(format!("the llama server exited ({status}):\n{log}"));
        }
        if Instant::now() > deadline {
            let log = log_of(&mut child);
            return Err(format!(
                "the llama server did not answer /v1/models within 60 s:\n{log}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "llama-cpp-python serving {MODEL} on port {port}, ready after {:?}",
        started.elapsed()
    );
    Ok(Llama {
        port,
        _child: Mutex::new(child),
    })
}

/// The status of `GET path` on 127.0.0.1:`port`, if anything answered in time.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The node's model `tiny`: the llama server, declaring what llama-cpp-python honours (see
/// DESIGN.md §7: no `tool_choice: "required"`, no `n > 1`). The declaration is parsed as
/// configuration text, as an operator writes it; a build without per-model capabilities
/// (`unknown field`) gets the same model without them.
fn upstream_model(l: &Llama) -> ModelConfig {
    let mut model = json!({
        "name": MODEL, "max_concurrency": 8,
        "backend": {"type": "upstream", "base_url": l.url(), "upstream_model": MODEL,
                    "timeout_ms": 30_000},
        "capabilities": ["tools", "json_mode", "json_schema", "logprobs", "embeddings"],
    });
    match serde_json::from_value(model.clone()) {
        Ok(m) => m,
        Err(e) if e.to_string().contains("unknown field `capabilities`") => {
            model.as_object_mut().unwrap().remove("capabilities");
            serde_json::from_value(model).unwrap()
        }
        Err(e) => panic!("the upstream model's configuration: {e}"),
    }
}

/// A gateway and a node in DE whose model `tiny` is the llama server, registered.
async fn gateway_in_front_of(l: &Llama) -> (TestGateway, TestNode) {
    let gw = TestGateway::start(|_| {}).await;
    let mut cfg = gw.node_config("de-llama", &gw.token);
    cfg.models = vec![upstream_model(l)];
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    (gw, node)
}

/// Runs one section of real_server_check.py against the gateway and the server directly.
async fn compare(section: &'static str) {
    let Some(l) = llama() else { return };
    let (gw, node) = gateway_in_front_of(l).await;
    let base = gw.api_url("/v1");
    let direct = l.url();
    run_python_checks(
        &format!("real_server_check.py {section}"),
        format!("{PYTHON_DIR}/real_server_check.py"),
        vec![section.to_owned()],
        vec![
            ("NEARPATH_BASE_URL".into(), base),
            ("NEARPATH_DIRECT_URL".into(), direct),
            ("NEARPATH_API_KEY".into(), API_KEY.into()),
            ("NEARPATH_MODEL".into(), MODEL.into()),
        ],
    )
    .await;
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_through_the_gateway_has_the_real_servers_shape_streaming_and_not() {
    compare("chat").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_tool_choice_streams_the_real_servers_tool_call_deltas() {
    compare("tools").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_object_response_format_reaches_the_real_server() {
    compare("json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_and_top_logprobs_pass_through_from_the_real_server() {
    compare("logprobs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_relay_the_real_servers_vectors_unchanged() {
    compare("embeddings").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_retrieve_answers_for_a_model_the_real_server_serves() {
    compare("models").await;
}

#[test]
fn the_tiny_model_is_deterministic_and_under_a_megabyte() {
    if !python_can("import gguf", "python3 -m pip install gguf") {
        return;
    }
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut files = Vec::new();
    for d in &dirs {
        let out = Command::new("python3")
            .arg(format!("{PYTHON_DIR}/make_tiny_model.py"))
            .arg(d.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "make_tiny_model.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        files.push(std::fs::read(d.path().join("tiny.gguf")).unwrap());
    }
    assert!(files[0].starts_with(b"GGUF"), "not a GGUF file");
    assert!(files[0].len() < 1_000_000, "{} bytes", files[0].len());
    assert!(files[0] == files[1], "two runs wrote different bytes");
}

/// Regression (`bench real-ttft` measured +41 ms "added" TTFT): the launcher made its listening
/// socket with protocol 0, so asyncio never set TCP_NODELAY on the server's connections, and
/// each streamed chunk after the first waited for the client's delayed ACK: a keep-alive client
/// (the node's upstream connection) got a whole reply in one read, 40 ms late. The connections
/// the launcher's socket accepts under asyncio must have TCP_NODELAY, as `python -m
/// llama_cpp.server`'s own do.
#[test]
fn the_launchers_server_connections_have_tcp_nodelay() {
    if !python_can("import gguf", "python3 -m pip install gguf") {
        return;
    }
    let script = format!(
        r#"
import asyncio, socket, sys
sys.dont_write_bytecode = True
sys.path.insert(0, {dir:?})
import llama_server

async def main():
    sock = llama_server.listening_socket()
    got = asyncio.get_running_loop().create_future()

    async def accepted(reader, writer):
        s = writer.get_extra_info("socket")
        got.set_result(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(accepted, sock=sock)
    _, writer = await asyncio.open_connection(*sock.getsockname())
    print(await asyncio.wait_for(got, 30))
    writer.close()
    server.close()

asyncio.run(main())
"#,
        dir = PYTHON_DIR
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nodelay = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_ne!(nodelay, "0", "the server's connection has Nagle on");
    assert!(!nodelay.is_empty(), "the check printed nothing");
}

/// Issue 14: llama-cpp-python's server lists no model size in `/v1/models` (llama.cpp's own
/// server does, in `meta.size`), so a node in front of it that declares none reports the size
/// as unknown (0), and says so in its log, rather than inventing one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_server_lists_no_model_size_so_the_node_reports_it_unknown() {
    let Some(l) = llama() else { return };
    let (gw, node) = gateway_in_front_of(l).await;
    let h = eventually("the node's inventory", Duration::from_secs(10), || async {
        let v = gw.admin_get("/admin/nodes/de-llama").await;
        let h = v["live"]["hardware"].clone();
        (!h.is_null()).then_some(h)
    })
    .await;
    assert_eq!(
        h["models"],
        json!([{"name": MODEL, "weights_bytes": 0, "source": "declared"}]),
        "{h}"
    );
    node.stop().await.unwrap();
    gw.stop().await;
}
