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
    let out = gateway()
        .args(["check-config", &example("gateway.toml")])
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
