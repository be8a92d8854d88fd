//! The shipped example files load, validate, and say exactly what the code defaults to.

use nearpath_config::*;
use std::path::PathBuf;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

fn read(name: &str) -> String {
    std::fs::read_to_string(example(name)).expect("example file exists")
}

#[test]
fn gateway_example_validates_and_matches_the_defaults() {
    let cfg =
        parse_gateway(&read("gateway.toml"), "gateway.toml", &[]).unwrap_or_else(|e| panic!("{e}"));
    // The file writes out the default geofence so operators can read it; this keeps the two
    // from drifting apart.
    assert_eq!(cfg.geofence, GeofenceConfig::default());
    // Every other value in the file is a default as well (optional keys are commented out).
    assert_eq!(cfg, GatewayConfig::default());
}

#[test]
fn gateway_example_runs_once_secrets_come_from_the_environment() {
    let env = [
        ("NEARPATH_ADMIN__TOKEN", "0123456789abcdef0123"),
        ("NEARPATH_QUIC__CERT_FILE", "/etc/nearpath/quic-cert.pem"),
        ("NEARPATH_QUIC__KEY_FILE", "/etc/nearpath/quic-key.pem"),
    ];
    let text = read("gateway.toml");
    let errs = parse_gateway_for_run(&text, "gateway.toml", &[]).unwrap_err();
    // Only the admin token is missing: without certificate files `gateway run` creates a
    // self-signed pair.
    assert_eq!(errs.errors.len(), 1, "{errs}");
    parse_gateway_for_run(&text, "gateway.toml", &env[..1]).unwrap_or_else(|e| panic!("{e}"));
    let cfg = parse_gateway_for_run(&text, "gateway.toml", &env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.admin.token.as_deref(), Some("0123456789abcdef0123"));
}

#[test]
fn node_example_validates_with_the_default_gpu_table() {
    let cfg = parse_node(&read("edge-node.toml"), "edge-node.toml", &[])
        .unwrap_or_else(|e| panic!("{e}"));
    // Running needs the placeholders replaced (see `node_example_runs_once_its_placeholders_are_
    // filled`); everything else in the file is ready.
    let errs = cfg.validate_for_run().unwrap_err();
    let paths: Vec<_> = errs.errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "node.enrolment_token",
            "gateway.pinned_cert_sha256",
            "gateway.address"
        ],
        "{errs}"
    );
    assert_eq!(cfg.gpu_classes, default_gpu_class_table());
    assert_eq!(cfg.node.id, "edge-1");
    assert_eq!(cfg.gateway.pinned_cert_sha256_bytes(), Some([0; 32]));
    assert_eq!(cfg.gateway.server_name(), "gateway.example.com");
    assert_eq!(cfg.models.len(), 1);
    assert_eq!(cfg.models[0].backend, BackendConfig::sim());
    assert_eq!(cfg.games[0].source, GameSource::Builtin {});
    // Everything but the required sections and the listed workloads is a default.
    let mut expected = NodeConfig::new(cfg.node.clone(), cfg.gateway.clone());
    expected.models = cfg.models.clone();
    expected.games = cfg.games.clone();
    assert_eq!(cfg, expected);
    assert_eq!(
        cfg.gateway,
        NodeGatewayConfig::pinned("gateway.example.com:4433", "0".repeat(64))
    );
}

#[test]
fn examples_load_from_disk() {
    // Through the file loaders, with whatever NEARPATH_* the test environment has (normally
    // none); the error, if any, must name the file.
    let gw = example("gateway.toml");
    match load_gateway(&gw) {
        Ok(cfg) => assert!(cfg.summary().contains("2 of 3 geofence rules enabled")),
        Err(e) => assert!(e.origin.ends_with("gateway.toml"), "{e}"),
    }
    let node = example("edge-node.toml");
    match load_node(&node) {
        Ok(cfg) => assert!(cfg.summary().starts_with("node edge-1 -> gateway")),
        Err(e) => assert!(e.origin.ends_with("edge-node.toml"), "{e}"),
    }
}

#[test]
fn every_example_key_is_documented_with_its_default() {
    // A key line in an example must follow a comment block that states a default (or that the
    // key is required), so a new field cannot be added to the files undocumented.
    for name in ["gateway.toml", "edge-node.toml"] {
        let text = read(name);
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            let is_key = !t.starts_with('#')
                && !t.starts_with('[')
                && t.contains(" = ")
                && !line.starts_with(' ');
            if !is_key {
                continue;
            }
            let key = t.split(" = ").next().unwrap_or("");
            // Keys in repeated tables ([[gpu_classes]], [[geofence.rules]]) are documented once
            // for the whole table.
            let in_repeated = lines[..i]
                .iter()
                .rev()
                .find(|l| l.starts_with('['))
                .is_some_and(|l| l.starts_with("[["));
            if in_repeated {
                continue;
            }
            let comment: Vec<&str> = lines[..i]
                .iter()
                .rev()
                .skip_while(|l| !l.trim_start().starts_with('#'))
                .take_while(|l| l.trim_start().starts_with('#'))
                .copied()
                .collect();
            let documented = comment
                .iter()
                .any(|c| c.to_lowercase().contains("default") || c.contains("Required"));
            assert!(
                documented,
                "{name}:{}: {key} has no documented default",
                i + 1
            );
        }
    }
}

#[test]
fn federation_gateway_template_runs_for_each_of_three_gateways() {
    let template = read("federation-gateway.toml.in");
    for (i, lat, lon) in [
        (1, "50.1", "8.7"),
        (2, "40.7", "-74.0"),
        (3, "35.7", "139.7"),
    ] {
        let text = template
            .replace("@I@", &i.to_string())
            .replace("@LAT@", lat)
            .replace("@LON@", lon);
        // The admin token comes from the environment (README exports a random one).
        let errs = parse_gateway_for_run(&text, "gw.toml", &[]).unwrap_err();
        assert_eq!(
            errs.errors
                .iter()
                .map(|e| e.path.as_str())
                .collect::<Vec<_>>(),
            ["admin.token"],
            "{errs}"
        );
        let env = [("NEARPATH_ADMIN__TOKEN", "0123456789abcdef0123")];
        let cfg = parse_gateway_for_run(&text, "gw.toml", &env).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            cfg.federation.gateway_id.as_deref(),
            Some(&*format!("gw-{i}"))
        );
        assert_eq!(cfg.quic.listen.to_string(), format!("127.0.0.{i}:4433"));
        assert!(cfg.store.url.is_some());
    }
}

/// The rule: the untouched examples are refused by the run checks with a message saying what to
/// put in place of each placeholder, and pass once those are filled (from the environment, the
/// way the examples recommend for secrets).
#[test]
fn node_example_runs_once_its_placeholders_are_filled() {
    let text = read("edge-node.toml");
    let errs = parse_node_for_run(&text, "edge-node.toml", &[]).unwrap_err();
    let shown = errs.to_string();
    for want in [
        "edge-node.toml:23:1: node.enrolment_token: is the placeholder from the example \
         configuration: put the enrolment token",
        "gateway.pinned_cert_sha256: is the all-zero placeholder from the example configuration: \
         put the SHA-256 of the gateway's QUIC certificate here",
        "gateway.address: is an example address (a domain reserved for documentation)",
    ] {
        assert!(shown.contains(want), "missing {want:?} in\n{shown}");
    }
    // Issue 16: the pin comes from the project's own commands, without an openssl detour.
    assert!(shown.contains("`gateway cert pin CERT.pem`"), "{shown}");
    assert!(!shown.contains("openssl"), "{shown}");
    let env = [
        ("NEARPATH_NODE__ENROLMENT_TOKEN", "np_enrol_5e2b7c"),
        ("NEARPATH_GATEWAY__ADDRESS", "gw.nearpath.test:4433"),
        (
            "NEARPATH_GATEWAY__PINNED_CERT_SHA256",
            "ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01",
        ),
    ];
    let cfg = parse_node_for_run(&text, "edge-node.toml", &env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.node.enrolment_token.as_deref(), Some("np_enrol_5e2b7c"));
}

#[test]
fn gateway_example_admin_token_placeholder_is_refused_with_what_to_put_there() {
    let text = read("gateway.toml").replace(
        "# token = \"change-me-to-a-long-random-string\"",
        "token = \"change-me-to-a-long-random-string\"",
    );
    let env = [
        ("NEARPATH_QUIC__CERT_FILE", "/etc/nearpath/quic-cert.pem"),
        ("NEARPATH_QUIC__KEY_FILE", "/etc/nearpath/quic-key.pem"),
    ];
    let errs = parse_gateway_for_run(&text, "gateway.toml", &env).unwrap_err();
    assert_eq!(errs.errors.len(), 1, "{errs}");
    // The error names the token's own line, wherever the example's comments put it.
    let line = 1 + text
        .lines()
        .position(|l| l.starts_with("token = \"change-me"))
        .unwrap();
    assert!(
        errs.to_string().starts_with(&format!(
            "gateway.toml:{line}:1: admin.token: is the placeholder from the example configuration: \
             put a random secret of at least 16 characters here"
        )),
        "{errs}"
    );
}
