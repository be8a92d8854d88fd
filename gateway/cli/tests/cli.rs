//! The `gateway` binary's offline commands: `check-config` and `geo lookup`.

use std::process::Command;

fn gateway() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gateway"))
}

fn example(name: &str) -> String {
    format!(
        "{}/../../config/examples/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn check_config_accepts_the_example_with_a_one_line_summary() {
    // What `run` needs beyond the example (a token and the certificate), from the environment
    // as the example recommends.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_cert(dir.path());
    let out = gateway()
        .args(["check-config", &example("gateway.toml")])
        .env("NEARPATH_ADMIN__TOKEN", "0123456789abcdef0123")
        .env("NEARPATH_QUIC__CERT_FILE", &cert)
        .env("NEARPATH_QUIC__KEY_FILE", &key)
        .env("NEARPATH_STORE__PATH", dir.path().join("gw.db"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("ok"), "{stdout}");
}

#[test]
fn check_config_reports_every_error_with_its_path_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        r#"
[geo]
overrides = [
  { cidr = "10.0.0.0/8", country = "XX" },
  { cidr = "10.1.0.0/16", country = "DE" },
]
[[geofence.rules]]
name = "r"
deny_client_countries = ["CN", "@nope"]
"#,
    )
    .unwrap();
    let out = gateway()
        .args(["check-config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("geo.overrides[0].country"), "{err}");
    assert!(err.contains("overlaps"), "{err}");
    assert!(
        err.contains("geofence.rules[0].deny_client_countries[1]"),
        "{err}"
    );
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[http]\nlisten_port = 1\n").unwrap();
    let out = gateway()
        .args(["check-config", unknown.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_port"));
}

#[test]
fn geo_lookup_prints_one_json_object_per_ip_with_decisions() {
    let out = gateway()
        .args([
            "geo",
            "lookup",
            "8.8.8.8",
            "175.45.176.1",
            "2001:4860:4860::8888",
            "114.114.114.114",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["country"], "US");
    assert_eq!(lines[1]["country"], "KP");
    assert_eq!(lines[2]["country"], "US");
    assert_eq!(lines[3]["country"], "CN");
    // KP: sanctions deny every class, both ways.
    assert_eq!(lines[1]["decisions"]["cpu"]["serve"]["allowed"], false);
    assert_eq!(lines[1]["decisions"]["cpu"]["serve"]["rule"], "sanctions");
    // CN: H100 denied by export control, RTX 3080 allowed.
    assert_eq!(lines[3]["decisions"]["h100"]["serve"]["allowed"], false);
    assert_eq!(
        lines[3]["decisions"]["h100"]["onboard"]["rule"],
        "export-control"
    );
    assert_eq!(lines[3]["decisions"]["rtx3080"]["serve"]["allowed"], true);
    // US: everything allowed.
    assert_eq!(lines[0]["decisions"]["h100"]["serve"]["allowed"], true);
}

#[test]
fn geo_lookup_reports_bad_addresses_and_exits_non_zero() {
    let out = gateway()
        .args(["geo", "lookup", "8.8.8.8", "not-an-ip"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("not-an-ip") && stdout.contains("error"),
        "{stdout}"
    );
}

#[test]
fn geo_lookup_with_a_corrupt_database_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("corrupt.mmdb");
    std::fs::write(&bad, b"this is not a maxmind database").unwrap();
    let out = gateway()
        .args(["geo", "lookup", "--db", bad.to_str().unwrap(), "8.8.8.8"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corrupt.mmdb"), "{err}");
}

#[test]
fn geo_lookup_locates_ipv6_spellings_of_a_sanctioned_ipv4_by_the_ipv4() {
    // 6to4, Teredo and NAT64 spellings of 175.45.176.1 (KP) used to be unknown.
    let out = gateway()
        .args([
            "geo",
            "lookup",
            "2002:af2d:b001::1",
            "2001:0:4136:e378:8000:0:50d2:4ffe",
            "64:ff9b::af2d:b001",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (line, kind) in lines.iter().zip(["6to4", "teredo", "nat64"]) {
        assert_eq!(line["country"], "KP", "{line}");
        assert_eq!(line["embedded"]["kind"], kind, "{line}");
        assert_eq!(line["embedded"]["ipv4"], "175.45.176.1", "{line}");
        assert_eq!(
            line["decisions"]["cpu"]["serve"]["rule"], "sanctions",
            "{line}"
        );
    }
}

/// A self-signed certificate and key in `dir`: (cert path, key path).
fn write_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let names = ["localhost".to_string()];
    let s = nearpath_protocol::tls::self_signed(&names).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, &s.cert_pem).unwrap();
    std::fs::write(&key, &s.key_pem).unwrap();
    (cert, key)
}

/// Runs `gateway run --config file`, which must refuse the file and exit: (code, stderr). A
/// gateway that starts instead is killed after a minute and fails the test.
fn run_refused(file: &std::path::Path) -> (Option<i32>, String) {
    let child = gateway()
        .args(["run", "--config", file.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(out) => {
            let out = out.unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("gateway run started with {}", file.display());
        }
    }
}

fn check(file: &std::path::Path) -> (Option<i32>, String, String) {
    let out = gateway()
        .args(["check-config", file.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The rule: a file `run` refuses, check-config refuses, with the same message naming the file,
/// line, column and key; and relative paths are relative to the config file's folder.
#[test]
fn check_config_refuses_every_file_run_refuses() {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path());
    std::fs::write(dir.path().join("garbage.pem"), "hello").unwrap();
    // Relative to the file's folder; every listener on port 0 so that a wrongly accepted file
    // cannot collide with anything.
    let good = "[http]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                token = \"0123456789abcdef0123\"\n[quic]\nlisten = \"127.0.0.1:0\"\n\
                cert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n[store]\npath = \"gw.db\"\n";
    let file = dir.path().join("gw.toml");
    std::fs::write(&file, good).unwrap();
    let (code, stdout, stderr) = check(&file);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    // From elsewhere: the paths still resolve against the file's folder.
    let out = gateway()
        .args(["check-config", "--quiet", file.to_str().unwrap()])
        .current_dir("/")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());

    let token = "token = \"0123456789abcdef0123\"\n";
    let cases: &[(&str, String, &str)] = &[
        (
            "no-token",
            good.replace(token, ""),
            ":3:2: admin.token: required",
        ),
        (
            "short-token",
            good.replace(token, "token = \"short\"\n"),
            ":5:1: admin.token: must be at least 16 characters",
        ),
        (
            "example-token",
            good.replace(token, "token = \"change-me-to-a-long-random-string\"\n"),
            ":5:1: admin.token: is the placeholder from the example configuration",
        ),
        (
            "missing-cert",
            good.replace("cert_file = \"cert.pem\"", "cert_file = \"nope.pem\""),
            ":8:1: quic.cert_file: cannot read ",
        ),
        (
            "no-cert",
            good.replace("cert_file = \"cert.pem\"\n", ""),
            ":6:2: quic.cert_file: required",
        ),
        (
            "garbage-key",
            good.replace("key_file = \"key.pem\"", "key_file = \"garbage.pem\""),
            ":9:1: quic.key_file: ",
        ),
        (
            "geo-db",
            format!("{good}[geo]\ndatabase = \"nope.mmdb\"\n"),
            ":13:1: geo.database: GeoIP database ",
        ),
        (
            "store-folder",
            good.replace("path = \"gw.db\"", "path = \"no-such-dir/gw.db\""),
            ":11:1: store.path: the folder ",
        ),
    ];
    for (name, text, want) in cases {
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, text).unwrap();
        let want = format!("{}{want}", file.display());
        let (code, _, stderr) = check(&file);
        assert_eq!(code, Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains(&want),
            "{name}: check-config: {want:?} not in\n{stderr}"
        );
        let (code, stderr) = run_refused(&file);
        assert_ne!(code, Some(0), "{name}");
        assert!(
            stderr.contains(&want),
            "{name}: run: {want:?} not in\n{stderr}"
        );
        assert!(!stderr.contains("<config>"), "{name}: {stderr}");
    }
}

#[test]
fn check_config_reports_all_problems_at_once_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("many.toml");
    std::fs::write(
        &file,
        "[http]\nlisten_port = 1\nmax_body_bytes = \"1 MiB\"\n[admin]\ntoken = \"short\"\n\
         [quic]\ncert_file = \"nope.pem\"\nkey_file = \"nope-key.pem\"\n",
    )
    .unwrap();
    let (code, _, stderr) = check(&file);
    assert_eq!(code, Some(2));
    let f = file.display();
    for want in [
        format!("{f}:2:1: http.listen_port: unknown key"),
        format!("{f}:3:1: http.max_body_bytes: invalid type: string \"1 MiB\""),
        format!("{f}:5:1: admin.token: must be at least 16 characters (got 5)"),
        format!("{f}:7:1: quic.cert_file: cannot read "),
        format!("{f}:8:1: quic.key_file: cannot read "),
    ] {
        assert!(stderr.contains(&want), "{want:?} not in\n{stderr}");
    }
    assert_eq!(stderr.lines().count(), 5, "{stderr}");
}

#[test]
fn check_config_refuses_hostile_files_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let huge = d.join("huge.toml");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    std::fs::write(d.join("binary.toml"), b"[admin]\ntoken = \"\xc3\x28\"\n").unwrap();
    std::fs::write(d.join("types.toml"), "http = 5\n[quic]\nlisten = [1, 2]\n").unwrap();
    std::os::unix::fs::symlink(d.join("loop-b.toml"), d.join("loop-a.toml")).unwrap();
    std::os::unix::fs::symlink(d.join("loop-a.toml"), d.join("loop-b.toml")).unwrap();
    for (name, want) in [
        (
            "huge.toml",
            "is larger than 4 MiB: not a configuration file".to_string(),
        ),
        ("binary.toml", ":2:10: is not UTF-8 text".to_string()),
        (
            "types.toml",
            ":1:1: http: invalid type: integer `5`".to_string(),
        ),
        (
            "loop-a.toml",
            ": cannot read the configuration file: ".to_string(),
        ),
        (
            "missing.toml",
            ": cannot read the configuration file: ".to_string(),
        ),
    ] {
        let (code, _, stderr) = check(&d.join(name));
        assert_eq!(code, Some(2), "{name}: {stderr}");
        assert!(stderr.contains(&want), "{name}: {want:?} not in\n{stderr}");
    }
    let (code, _, stderr) = check(d);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("is a directory, not a configuration file"),
        "{stderr}"
    );
}

#[test]
fn gateway_example_placeholder_token_is_refused_with_what_to_put_there() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_cert(dir.path());
    let text = std::fs::read_to_string(example("gateway.toml"))
        .unwrap()
        .replace("# token = \"change-me", "token = \"change-me");
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, &text).unwrap();
    let out = gateway()
        .args(["check-config", file.to_str().unwrap()])
        .env("NEARPATH_QUIC__CERT_FILE", &cert)
        .env("NEARPATH_QUIC__KEY_FILE", &key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The error names the token's own line, wherever the example's comments put it.
    let line = 1 + text
        .lines()
        .position(|l| l.starts_with("token = \"change-me"))
        .unwrap();
    assert!(
        stderr.contains(&format!(
            "{}:{line}:1: admin.token: is the placeholder from the example configuration: put a \
             random secret",
            file.display()
        )),
        "{stderr}"
    );
}
