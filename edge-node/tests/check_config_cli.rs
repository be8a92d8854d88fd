//! `edge-node check-config` on real files: the same checks as running the node, placeholders
//! from the example refused with what to put there, hostile files refused with a reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PIN: &str = "ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01";

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples/edge-node.toml")
}

fn node(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edge-node"));
    cmd.args(args);
    // Only what the test sets: a developer's NEARPATH_* must not change the outcome.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("NEARPATH_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The rule: the untouched example fails with the placeholder messages; filled in (from the
/// environment, as the example recommends for secrets) it passes.
#[test]
fn example_placeholders_are_refused_until_filled() {
    let file = example();
    let out = node(&["check-config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    for want in [
        ":23:1: node.enrolment_token: is the placeholder from the example configuration",
        ": gateway.pinned_cert_sha256: is the all-zero placeholder",
        ": gateway.address: is an example address",
    ] {
        assert!(err.contains(want), "{want:?} not in\n{err}");
    }
    assert_eq!(err.lines().count(), 3, "{err}");

    let filled = [
        ("NEARPATH_NODE__ENROLMENT_TOKEN", "np_enrol_5e2b7c"),
        ("NEARPATH_GATEWAY__ADDRESS", "127.0.0.1:4433"),
        ("NEARPATH_GATEWAY__PINNED_CERT_SHA256", PIN),
    ];
    let out = node(&["check-config", file.to_str().unwrap()], &filled);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let out = node(
        &["check-config", "--quiet", file.to_str().unwrap()],
        &filled,
    );
    assert!(out.status.success() && out.stdout.is_empty());
}

/// The rule: a file the node refuses to run with, check-config refuses, with the same line.
#[test]
fn check_config_refuses_what_the_node_refuses_to_run_with() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    // A relative ca_file: relative to the file's folder, wherever the node is started.
    std::fs::write(
        &file,
        "[node]\nid = \"n1\"\nenrolment_token = \"tok\"\n[gateway]\naddress = \"127.0.0.1:9\"\n\
         ca_file = \"ca.pem\"\n",
    )
    .unwrap();
    let want = format!("{}:6:1: gateway.ca_file: cannot read ", file.display());
    let out = node(&["check-config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&want),
        "{want:?} not in\n{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains(&dir.path().join("ca.pem").display().to_string()));
    let out = node(&["--config", file.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&want),
        "{want:?} not in\n{}",
        stderr(&out)
    );

    let s = nearpath_protocol::tls::self_signed(&["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("ca.pem"), &s.cert_pem).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edge-node"));
    let out = cmd
        .args(["check-config", file.to_str().unwrap()])
        .current_dir("/")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // Without a token the node cannot run: check-config says so too.
    std::fs::write(
        &file,
        format!("[node]\nid = \"n1\"\n[gateway]\naddress = \"127.0.0.1:9\"\npinned_cert_sha256 = \"{PIN}\"\n"),
    )
    .unwrap();
    let out = node(&["check-config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(":1:2: node.enrolment_token: required"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn hostile_files_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("binary.toml"), b"[node]\nid = \"\xff\"\n").unwrap();
    std::fs::write(
        d.join("keys.toml"),
        "[node]\nid = \"n\"\nenrolment_token = \"t\"\nenrolment = 1\n[gateway]\naddress = 5\n\
         pinned_cert_sha256 = \"0\"\nbogus = true\n",
    )
    .unwrap();
    std::fs::File::create(d.join("huge.toml"))
        .unwrap()
        .set_len(5 << 20)
        .unwrap();
    std::os::unix::fs::symlink(d.join("b.toml"), d.join("a.toml")).unwrap();
    std::os::unix::fs::symlink(d.join("a.toml"), d.join("b.toml")).unwrap();
    let cases: [(&str, &[&str]); 5] = [
        ("binary.toml", &[":2:7: is not UTF-8 text"]),
        (
            "keys.toml",
            &[
                ":4:1: node.enrolment: unknown key",
                ":6:1: gateway.address: invalid type: integer `5`",
                ":8:1: gateway.bogus: unknown key",
                ":7:1: gateway.pinned_cert_sha256: \"0\" is not a SHA-256 digest",
            ],
        ),
        ("huge.toml", &["is larger than 4 MiB"]),
        ("a.toml", &["cannot read the configuration file"]),
        ("", &["is a directory, not a configuration file"]),
    ];
    for (name, wants) in cases {
        let path = d.join(name);
        let out = node(&["check-config", path.to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(2), "{name}");
        for want in wants {
            assert!(
                stderr(&out).contains(want),
                "{name}: {want:?} not in\n{}",
                stderr(&out)
            );
        }
    }
}
