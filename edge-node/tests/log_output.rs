//! `edge-node` log lines written to a file carry no ANSI colour codes (issue 16): colour is for
//! terminals only (`[log] color = "auto"`), unless the operator asks for it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A node whose only gateway source is a bootstrap URL nobody answers, so it logs a warning at
/// once ("cannot fetch the gateway list") and keeps retrying.
const CONFIG: &str = r#"
[node]
id = "log-test-1"
enrolment_token = "log-test-enrolment-token-0123"

[gateway]
bootstrap_url = "http://127.0.0.1:9/v1/gateways"
pinned_cert_sha256 = "abababababababababababababababababababababababababababababababab"

[[models]]
name = "m"
[models.backend]
type = "sim"
"#;

/// Kills the node when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the node with standard output and error into a file until a line mentioning the
/// gateway list is there (bounded), and returns the file's bytes.
fn logged_to_file(tag: &str, env: &[(&str, &str)]) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("nearpath-log-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("node.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let out_path = dir.join("node.log");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edge-node"));
    cmd.arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let _node = Running(cmd.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let bytes = std::fs::read(&out_path).unwrap();
        if String::from_utf8_lossy(&bytes).contains("gateway list") {
            drop(_node);
            let _ = std::fs::remove_dir_all(&dir);
            return bytes;
        }
        assert!(
            Instant::now() < deadline,
            "no line about the gateway list: {}",
            String::from_utf8_lossy(&bytes)
        );
        // Polls the child's output file: there is no event to wait on for a file.
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn log_lines_written_to_a_file_carry_no_colour_codes() {
    let bytes = logged_to_file("auto", &[]);
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("WARN"), "{text}");
    assert!(!bytes.contains(&0x1b), "ESC in a file: {text:?}");
}

#[test]
fn colour_always_colours_even_a_file() {
    // The control: the check above would see colour codes if there were any.
    let bytes = logged_to_file("always", &[("NEARPATH_LOG__COLOR", "always")]);
    assert!(bytes.contains(&0x1b), "{}", String::from_utf8_lossy(&bytes));
}
