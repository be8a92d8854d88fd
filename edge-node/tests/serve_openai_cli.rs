//! `edge-node serve-openai` from the command line: keyless only on loopback (issue 9, item 17).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn example_config() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/examples/edge-node.toml"
    )
    .to_string()
}

fn serve(listen: &str, key: Option<&str>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edge-node"));
    cmd.args([
        "serve-openai",
        "--config",
        &example_config(),
        "--listen",
        listen,
    ])
    .env_remove("NEARPATH_OPENAI_API_KEY")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if let Some(k) = key {
        cmd.env("NEARPATH_OPENAI_API_KEY", k);
    }
    cmd
}

/// Kills the child when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the server and returns it with the address it printed (bounded wait).
fn start(listen: &str, key: Option<&str>) -> (Running, String) {
    let mut child = Running(serve(listen, key).spawn().unwrap());
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("serving OpenAI API on http://") {
                let _ = tx.send(rest.trim_end_matches("/v1").to_string());
                return;
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the server did not say where it listens");
    (child, addr)
}

/// `GET /v1/models` over a plain socket; returns the status line.
fn get_models(addr: &str, key: Option<&str>) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /v1/models HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or("").to_string()
}

#[test]
fn serve_openai_without_a_key_refuses_a_non_loopback_address() {
    let out = serve("0.0.0.0:0", None).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started keyless on 0.0.0.0: {stderr}"
    );
    assert!(stderr.contains("--api-key-file"), "{stderr}");
    assert!(stderr.contains("NEARPATH_OPENAI_API_KEY"), "{stderr}");
    assert!(stderr.contains("0.0.0.0"), "{stderr}");
}

#[test]
fn serve_openai_stays_keyless_on_loopback_and_takes_a_key_elsewhere() {
    let (_loopback, addr) = start("127.0.0.1:0", None);
    assert!(
        get_models(&addr, None).contains(" 200 "),
        "keyless loopback"
    );

    // Any address but loopback with a key from the environment: the key is required.
    let (_open, addr) = start("0.0.0.0:0", Some("sk-node-test"));
    let port = addr.rsplit(':').next().unwrap();
    let local = format!("127.0.0.1:{port}");
    assert!(get_models(&local, None).contains(" 401 "));
    assert!(get_models(&local, Some("sk-node-test")).contains(" 200 "));
}
