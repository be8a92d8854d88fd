//! Every validation rule, with its exact message, path and (where written in the file) line.

use nearpath_config::*;

/// The errors of a gateway file, as `line: path: message` (`-` when there is no line).
fn gw(text: &str) -> Vec<String> {
    lines(parse_gateway(text, "gw.toml", &[]).err())
}

fn gw_run(text: &str, env: &[(&str, &str)]) -> Vec<String> {
    lines(parse_gateway_for_run(text, "gw.toml", env).err())
}

fn lines(errs: Option<ConfigErrors>) -> Vec<String> {
    let Some(errs) = errs else {
        return Vec::new();
    };
    assert_eq!(errs.origin, "gw.toml");
    errs.errors
        .iter()
        .map(|e| match e.line {
            Some(line) => format!("{line}: {e}"),
            None => format!("-: {e}"),
        })
        .collect()
}

const PIN: &str = "ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01";

/// A valid node file (4 lines) followed by `extra`.
fn node_text(extra: &str) -> String {
    format!(
        "[node]\nid = \"n1\"\n[gateway]\naddress = \"gw.example.com:4433\"\n\
         pinned_cert_sha256 = \"{PIN}\"\n{extra}"
    )
}

fn node(extra: &str) -> Vec<String> {
    node_raw(&node_text(extra))
}

fn node_raw(text: &str) -> Vec<String> {
    match parse_node(text, "gw.toml", &[]) {
        Ok(_) => Vec::new(),
        Err(e) => lines(Some(e)),
    }
}

#[test]
fn empty_file_is_the_default_configuration() {
    assert_eq!(gw(""), Vec::<String>::new());
    assert_eq!(
        parse_gateway("", "gw.toml", &[]).unwrap(),
        GatewayConfig::default()
    );
}

#[test]
fn country_codes_must_be_iso_alpha2() {
    let text = r#"
[[geofence.rules]]
name = "a"
deny_client_countries = ["CN"]
[[geofence.rules]]
name = "b"
deny_client_countries = ["RU"]
[[geofence.rules]]
name = "c"
deny_client_countries = ["CN", "XX", "cn", "XK"]
"#;
    assert_eq!(
        gw(text),
        [
            "10: geofence.rules[2].deny_client_countries[1]: \"XX\" is not an ISO 3166-1 alpha-2 \
             country code",
            "10: geofence.rules[2].deny_client_countries[2]: \"cn\" is not an ISO 3166-1 alpha-2 \
             country code (codes are upper case: \"CN\")",
        ]
    );
}

#[test]
fn subdivisions_need_a_real_country_and_a_short_code() {
    let text = r#"
[geofence.country_sets]
regions = ["UA-43", "XX-43", "UA-4321", "UA-"]
"#;
    assert_eq!(
        gw(text),
        [
            "3: geofence.country_sets.regions[1]: \"XX-43\": \"XX\" is not an ISO 3166-1 alpha-2 \
             country code",
            "3: geofence.country_sets.regions[2]: \"UA-4321\" is not an ISO 3166-2 subdivision \
             code (expected CC-XXX: a country code, a hyphen and 1 to 3 upper-case letters or \
             digits)",
            "3: geofence.country_sets.regions[3]: \"UA-\" is not an ISO 3166-2 subdivision code \
             (expected CC-XXX: a country code, a hyphen and 1 to 3 upper-case letters or digits)",
        ]
    );
}

#[test]
fn set_references_must_exist_and_controlled_is_for_gpu_classes() {
    let text = r#"
[[geofence.rules]]
name = "r"
gpu_classes = ["@controlled", "@gpus", "h100"]
deny_client_countries = ["@ofac", "@nope", "@controlled"]
"#;
    assert_eq!(
        gw(text),
        [
            "4: geofence.rules[0].gpu_classes[1]: unknown GPU class set \"@gpus\" (the only one \
             is @controlled)",
            "5: geofence.rules[0].deny_client_countries[1]: unknown country set \"@nope\"",
            "5: geofence.rules[0].deny_client_countries[2]: \"@controlled\" is the set of \
             controlled GPU classes; it belongs in gpu_classes, not in a country list",
        ]
    );
}

#[test]
fn cyclic_set_references_are_reported_once_each() {
    let text = r#"
[geofence.country_sets]
a = ["@b", "FR"]
b = ["@c"]
c = ["@a"]
selfish = ["@selfish"]
fine = ["@eu", "@a"]
"#;
    assert_eq!(
        gw(text),
        [
            "5: geofence.country_sets.c: country sets refer to each other in a cycle: @a -> @b \
             -> @c -> @a",
            "6: geofence.country_sets.selfish: country sets refer to each other in a cycle: \
             @selfish -> @selfish",
        ]
    );
}

#[test]
fn set_names_are_checked_and_controlled_is_reserved() {
    let text = r#"
[geofence.country_sets]
controlled = ["CN"]
"Bad Name" = ["CN"]
"#;
    assert_eq!(
        gw(text),
        [
            "4: geofence.country_sets.Bad Name: \"Bad Name\" is not a country set name \
             (lower-case letters, digits, _ and -)",
            "3: geofence.country_sets.controlled: \"controlled\" is reserved: @controlled names \
             the controlled GPU classes",
        ]
    );
}

#[test]
fn rule_names_are_unique_and_well_formed() {
    let text = r#"
[[geofence.rules]]
name = "same"
deny_client_countries = ["CN"]
[[geofence.rules]]
name = "other"
deny_client_countries = ["CN"]
[[geofence.rules]]
name = "same"
deny_node_countries = ["CN"]
[[geofence.rules]]
name = "has space"
deny_node_countries = ["CN"]
"#;
    assert_eq!(
        gw(text),
        [
            "9: geofence.rules[2].name: \"same\" is already the name of geofence.rules[0]",
            "12: geofence.rules[3].name: \"has space\" is not a rule name (1 to 64 characters of \
             A-Z a-z 0-9 . _ -)",
        ]
    );
}

#[test]
fn a_rule_must_be_able_to_deny() {
    let text = r#"
[[geofence.rules]]
name = "toothless"
gpu_classes = ["h100"]
reason = "   "
"#;
    assert_eq!(
        gw(text),
        [
            "5: geofence.rules[0].reason: must not be blank (leave it out instead)",
            "2: geofence.rules[0]: rule \"toothless\" can never deny: it has no \
             deny_client_countries, deny_node_countries or residency lists",
        ]
    );
}

#[test]
fn residency_lists_come_in_pairs() {
    let text = r#"
[[geofence.rules]]
name = "half-a"
residency_client_countries = ["@eu"]
[[geofence.rules]]
name = "half-b"
residency_node_countries = ["@eu"]
"#;
    assert_eq!(
        gw(text),
        [
            "2: geofence.rules[0].residency_node_countries: required when \
             residency_client_countries is set",
            "5: geofence.rules[1].residency_client_countries: required when \
             residency_node_countries is set",
        ]
    );
}

#[test]
fn gpu_classes_are_lower_case_identifiers() {
    let text = r#"
[geofence]
controlled_gpu_classes = ["h100", "H100", "rtx-4090"]
[[geofence.rules]]
name = "r"
gpu_classes = ["RTX4090"]
deny_client_countries = ["CN"]
"#;
    assert_eq!(
        gw(text),
        [
            "3: geofence.controlled_gpu_classes[1]: \"H100\" is not a GPU class name (lower-case \
             letters, digits and _)",
            "3: geofence.controlled_gpu_classes[2]: \"rtx-4090\" is not a GPU class name \
             (lower-case letters, digits and _)",
            "6: geofence.rules[0].gpu_classes[0]: \"RTX4090\" is not a GPU class name \
             (lower-case letters, digits and _)",
        ]
    );
}

#[test]
fn overlapping_override_cidrs_name_both_entries() {
    let text = r#"
[[geo.overrides]]
cidr = "10.0.0.0/8"
country = "US"
[[geo.overrides]]
cidr = "192.168.0.0/16"
country = "DE"
[[geo.overrides]]
cidr = "::/0"
country = "DE"
[[geo.overrides]]
cidr = "10.1.0.0/16"
country = "CN"
[[geo.overrides]]
cidr = "192.0.0.0/2"
country = "CN"
"#;
    assert_eq!(
        gw(text),
        [
            "12: geo.overrides[3].cidr: 10.1.0.0/16 overlaps geo.overrides[0].cidr 10.0.0.0/8",
            "15: geo.overrides[4].cidr: 192.0.0.0/2 overlaps geo.overrides[1].cidr \
             192.168.0.0/16",
        ]
    );
}

#[test]
fn override_fields_are_checked() {
    let text = r#"
[[geo.overrides]]
cidr = "10.0.0.1/8"
country = "ZZ"
[[geo.overrides]]
cidr = "127.0.0.2/32"
country = "UA"
subdivision = "RU-MOW"
lat = 91.0
[[geo.overrides]]
cidr = "127.0.0.3/32"
country = "UA"
subdivision = "UA-43"
lon = -180.5
[[geo.overrides]]
cidr = "127.0.0.4/32"
country = "CN"
lat = 39.9
lon = 116.4
"#;
    assert_eq!(
        gw(text),
        [
            "3: geo.overrides[0].cidr: 10.0.0.1/8 has host bits set (did you mean 10.0.0.0/8?)",
            "4: geo.overrides[0].country: \"ZZ\" is not an ISO 3166-1 alpha-2 country code",
            "8: geo.overrides[1].subdivision: \"RU-MOW\" is not a subdivision of \"UA\"",
            // The missing key is located at its entry's header.
            "5: geo.overrides[1].lon: required when lat is set",
            "9: geo.overrides[1].lat: 91 is outside [-90, 90]",
            "10: geo.overrides[2].lat: required when lon is set",
            "14: geo.overrides[2].lon: -180.5 is outside [-180, 180]",
        ]
    );
}

#[test]
fn tls_files_come_in_pairs() {
    assert_eq!(
        gw("[http]\ntls_cert_file = \"c.pem\"\n[quic]\nkey_file = \"k.pem\"\n"),
        [
            "1: http.tls_key_file: required when http.tls_cert_file is set",
            "3: quic.cert_file: required when quic.key_file is set",
        ]
    );
}

#[test]
fn zero_durations_and_sizes_are_refused() {
    let text = r#"
[http]
max_body_bytes = 0
[quic]
idle_timeout_ms = 0
recv_buffer_bytes = 0
[nodes]
heartbeat_ms = 0
missed_heartbeats_before_gone = 0
drain_deadline_ms = 0
[routing]
max_candidates = 0
[inference]
connect_timeout_ms = 0
max_attempts = 0
default_tokens_per_minute = 0
[game]
frame_budget_ms = 0
idr_interval_s = 0
"#;
    assert_eq!(
        gw(text),
        [
            "3: http.max_body_bytes: must be greater than 0 (got 0)",
            "6: quic.recv_buffer_bytes: must be greater than 0 (got 0)",
            "5: quic.idle_timeout_ms: must be greater than 0 (got 0)",
            "8: nodes.heartbeat_ms: must be greater than 0 (got 0)",
            "9: nodes.missed_heartbeats_before_gone: must be greater than 0 (got 0)",
            "10: nodes.drain_deadline_ms: must be greater than 0 (got 0)",
            "12: routing.max_candidates: must be greater than 0 (got 0)",
            "14: inference.connect_timeout_ms: must be greater than 0 (got 0)",
            "15: inference.max_attempts: must be greater than 0 (got 0)",
            "16: inference.default_tokens_per_minute: must be greater than 0 (got 0)",
            "18: game.frame_budget_ms: must be greater than 0 (got 0)",
            "19: game.idr_interval_s: must be greater than 0 (got 0)",
        ]
    );
}

#[test]
fn routing_numbers_are_finite_and_in_range() {
    let text = r#"
[routing]
km_per_ms = nan
path_stretch = 0.0
load_penalty_ms = -1.0
reliability_penalty_ms = inf
suspended_penalty_ms = 0
"#;
    assert_eq!(
        gw(text),
        [
            "3: routing.km_per_ms: must be a finite number greater than 0 (got NaN)",
            "4: routing.path_stretch: must be a finite number greater than 0 (got 0)",
            "5: routing.load_penalty_ms: must be a finite number, 0 or more (got -1)",
            "6: routing.reliability_penalty_ms: must be a finite number, 0 or more (got inf)",
        ]
    );
}

#[test]
fn webrtc_port_range() {
    assert_eq!(
        gw("[game]\nwebrtc_udp_port_min = 50000\nwebrtc_udp_port_max = 40000\n"),
        ["2: game.webrtc_udp_port_min: 50000 is greater than game.webrtc_udp_port_max 40000"]
    );
    assert_eq!(
        gw("[game]\nwebrtc_udp_port_min = 50000\n"),
        [
            "1: game.webrtc_udp_port_max: set webrtc_udp_port_min and webrtc_udp_port_max \
             together (both 0 means any port)"
        ]
    );
    assert_eq!(
        gw("[game]\nwebrtc_udp_port_min = 40000\nwebrtc_udp_port_max = 40000\n"),
        Vec::<String>::new()
    );
}

#[test]
fn game_stream_limits() {
    let text = r#"
[game]
default_width = 1921
max_width = 1920
default_fps = 0
webrtc_public_ip = "0.0.0.0"
ice_servers = ["stun:stun.example.com:3478", "https://turn.example.com", "turn:"]
"#;
    assert_eq!(
        gw(text),
        [
            "3: game.default_width: 1921 is greater than game.max_width 1920",
            "5: game.default_fps: must be greater than 0 (got 0)",
            "3: game.default_width: 1921 must be even (H.264 4:2:0)",
            "6: game.webrtc_public_ip: 0.0.0.0 is not an address a browser can reach",
            "7: game.ice_servers[1]: \"https://turn.example.com\" is not a stun:, stuns:, turn: \
             or turns: URI",
            "7: game.ice_servers[2]: \"turn:\" is not a stun:, stuns:, turn: or turns: URI",
        ]
    );
}

/// Guards `game.browser_codecs`: unknown names, duplicates and an empty list are refused at
/// load, naming the entry.
#[test]
fn browser_codecs_are_known_names_listed_once() {
    assert_eq!(
        gw("[game]\nbrowser_codecs = [\"av1\", \"vp8\", \"av1\", \"H264\"]\n"),
        [
            "2: game.browser_codecs[1]: \"vp8\" is not a codec browsers can be sent (h264, av1, hevc)",
            "2: game.browser_codecs[2]: \"av1\" is listed twice",
            "2: game.browser_codecs[3]: \"H264\" is not a codec browsers can be sent (h264, av1, hevc)",
        ]
    );
    assert_eq!(
        gw("[game]\nbrowser_codecs = []\n"),
        ["2: game.browser_codecs: list at least one codec (\"h264\" is what every browser decodes)"]
    );
    assert_eq!(
        gw("[game]\nbrowser_codecs = [\"av1\", \"h264\"]\n"),
        Vec::<String>::new()
    );
}

#[test]
fn http_and_admin_checks() {
    let text = r#"
[http]
listen = "127.0.0.1:9000"
trusted_proxies = ["10.0.0.0/8", "192.168.1.1/24"]
cors_allowed_origins = ["*", "https://app.example.com", "app.example.com", "https://a.com/path"]
[admin]
listen = "127.0.0.1:9000"
token = "has space"
[nodes]
min_software_version = "1.2"
[log]
level = "nearpath=loud"
"#;
    let errs = gw(text);
    assert_eq!(
        errs[..6],
        [
            "4: http.trusted_proxies[1]: 192.168.1.1/24 has host bits set (did you mean \
             192.168.1.0/24?)",
            "5: http.cors_allowed_origins[2]: \"app.example.com\" is not an origin \
             (scheme://host[:port], no path) or \"*\"",
            "5: http.cors_allowed_origins[3]: \"https://a.com/path\" is not an origin \
             (scheme://host[:port], no path) or \"*\"",
            "7: admin.listen: 127.0.0.1:9000 is also http.listen",
            "8: admin.token: must not contain whitespace or control characters",
            "10: nodes.min_software_version: \"1.2\" is not a version x.y.z (e.g. \"0.1.0\")",
        ]
    );
    assert_eq!(errs.len(), 7);
    assert!(
        errs[6].starts_with("12: log.level: \"nearpath=loud\" is not a log filter directive: "),
        "{}",
        errs[6]
    );
    // Both listeners on port 0 get different ephemeral ports: not a clash.
    assert_eq!(
        gw("[http]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n"),
        Vec::<String>::new()
    );
}

#[test]
fn run_mode_needs_an_admin_token_and_quic_files_in_pairs() {
    // No certificate files is runnable: `gateway run` creates a self-signed pair.
    assert_eq!(
        gw_run("", &[]),
        [
            "-: admin.token: required: set it in the file or in the environment variable \
          NEARPATH_ADMIN__TOKEN"
        ]
    );
    assert_eq!(
        gw_run(
            "[quic]\ncert_file = \"c\"\n",
            &[("NEARPATH_ADMIN__TOKEN", "0123456789abcdef")]
        ),
        ["1: quic.key_file: required when quic.cert_file is set"]
    );
    let text = "[admin]\ntoken = \"short\"\n[quic]\ncert_file = \"c\"\nkey_file = \"k\"\n";
    assert_eq!(
        gw_run(text, &[]),
        ["2: admin.token: must be at least 16 characters (got 5)"]
    );
    // The same file passes the check-only validation.
    assert_eq!(gw(text), Vec::<String>::new());
    let long =
        "[admin]\ntoken = \"0123456789abcdef\"\n[quic]\ncert_file = \"c\"\nkey_file = \"k\"\n";
    assert_eq!(gw_run(long, &[]), Vec::<String>::new());
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = r#"
[http]
max_body_bytes = 0
[[geo.overrides]]
cidr = "10.0.0.0/8"
country = "XX"
[[geofence.rules]]
name = "r"
deny_client_countries = ["@missing"]
"#;
    let errs = parse_gateway(text, "three.toml", &[]).unwrap_err();
    assert_eq!(errs.errors.len(), 3, "{errs}");
    assert_eq!(
        errs.to_string(),
        "three.toml:3:1: http.max_body_bytes: must be greater than 0 (got 0)\n\
         three.toml:6:1: geo.overrides[0].country: \"XX\" is not an ISO 3166-1 alpha-2 country code\n\
         three.toml:9:26: geofence.rules[0].deny_client_countries[0]: unknown country set \
         \"@missing\""
    );
}

#[test]
fn validate_in_memory_names_the_in_memory_origin() {
    let mut cfg = GatewayConfig::default();
    cfg.routing.km_per_ms = -1.0;
    cfg.game.max_fps = 0;
    let errs = cfg.validate().unwrap_err();
    assert_eq!(errs.origin, IN_MEMORY_ORIGIN);
    assert_eq!(
        errs.to_string(),
        "<config>: routing.km_per_ms: must be a finite number greater than 0 (got -1)\n\
         <config>: game.max_fps: must be greater than 0 (got 0)\n\
         <config>: game.default_fps: 60 is greater than game.max_fps 0"
    );
}

// ----- node -----

#[test]
fn node_minimal_file_is_valid() {
    assert_eq!(node(""), Vec::<String>::new());
}

#[test]
fn node_identity_and_gateway_checks() {
    let text = r#"
[node]
id = "bad id!"
enrolment_token = ""
[gateway]
address = "gateway.example.com"
server_name = ""
reconnect_initial_ms = 1000
reconnect_max_ms = 500
"#;
    assert_eq!(
        node_raw(text),
        [
            "3: node.id: \"bad id!\" must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
            "4: node.enrolment_token: must not be empty (leave it out instead)",
            "6: gateway.address: \"gateway.example.com\" is not host:port (IPv6 as [addr]:port)",
            "7: gateway.server_name: \"\" is not a server name",
            "5: gateway: set one of ca_file or pinned_cert_sha256 (there is no option to accept \
             any certificate)",
            "9: gateway.reconnect_max_ms: 500 is less than gateway.reconnect_initial_ms 1000",
        ]
    );
}

#[test]
fn node_gateway_trust_is_exactly_one_of_ca_and_pin() {
    let both = format!(
        "[node]\nid = \"n\"\n[gateway]\naddress = \"[::1]:4433\"\nca_file = \"ca.pem\"\n\
         pinned_cert_sha256 = \"{PIN}\"\n"
    );
    assert_eq!(
        node_raw(&both),
        [
            "6: gateway.pinned_cert_sha256: set either gateway.ca_file or \
          gateway.pinned_cert_sha256, not both"
        ]
    );
    let bad_pin =
        "[node]\nid = \"n\"\n[gateway]\naddress = \"h:1\"\npinned_cert_sha256 = \"abc\"\n";
    assert_eq!(
        node_raw(bad_pin),
        ["5: gateway.pinned_cert_sha256: \"abc\" is not a SHA-256 digest (64 hex digits)"]
    );
    let ca = "[node]\nid = \"n\"\n[gateway]\naddress = \"h:1\"\nca_file = \"ca.pem\"\n";
    assert_eq!(node_raw(ca), Vec::<String>::new());
}

#[test]
fn node_run_mode_needs_the_enrolment_token() {
    let text = node_text("");
    let errs = parse_node_for_run(&text, "n.toml", &[]).unwrap_err();
    assert_eq!(
        errs.to_string(),
        "n.toml:1:2: node.enrolment_token: required: set it in the file or in the environment \
         variable NEARPATH_NODE__ENROLMENT_TOKEN\n\
         n.toml:4:1: gateway.address: is an example address (a domain reserved for \
         documentation): put your gateway's QUIC address here, host:port"
    );
    let cfg = parse_node_for_run(
        &text,
        "n.toml",
        &[
            ("NEARPATH_NODE__ENROLMENT_TOKEN", "tok"),
            ("NEARPATH_GATEWAY__ADDRESS", "gw.nearpath.test:4433"),
        ],
    )
    .unwrap();
    assert_eq!(cfg.node.enrolment_token.as_deref(), Some("tok"));
}

#[test]
fn node_gpu_checks() {
    let extra = r#"
[[gpus]]
model = " "
vram_mib = 0
class = "cpu"
[[gpus]]
model = "NVIDIA H100"
vram_mib = 81559
class = "H100"
[[gpu_classes]]
contains = ""
class = "x"
[[gpu_classes]]
contains = "T4"
class = "cpu"
"#;
    assert_eq!(
        node(extra),
        [
            "8: gpus[0].model: must not be empty",
            "9: gpus[0].vram_mib: must be greater than 0 (got 0)",
            "10: gpus[0].class: \"cpu\" is reserved for nodes without a GPU",
            "14: gpus[1].class: \"H100\" is not a GPU class name (lower-case letters, digits \
             and _)",
            "16: gpu_classes[0].contains: must not be empty",
            "20: gpu_classes[1].class: \"cpu\" is reserved for nodes without a GPU",
        ]
    );
}

#[test]
fn node_workload_checks() {
    let extra = r#"
[capacity]
game_sessions = 0
inference_concurrency = 0
[encoder]
threads = 0
[[models]]
name = "m"
max_concurrency = 0
backend = { type = "upstream", base_url = "http://127.0.0.1:8000", timeout_ms = 0 }
[[models]]
name = "m"
backend = { type = "sim", tokens_per_s = -1.0 }
[[models]]
name = "has space"
backend = { type = "upstream", base_url = "https://h/v1", api_key = "", upstream_model = "" }
[[games]]
title = "g"
source = { type = "command", command = [] }
[[games]]
title = "g"
source = { type = "command", command = ["", "--x"] }
"#;
    assert_eq!(
        node(extra),
        [
            "8: capacity.game_sessions: is 0, but games are configured (remove them or allow \
             sessions)",
            "9: capacity.inference_concurrency: is 0, but models are configured (remove them or \
             allow requests)",
            "14: models[0].max_concurrency: must be greater than 0 (got 0)",
            "15: models[0].backend.base_url: \"http://127.0.0.1:8000\" is not an http:// URL \
             ending in /v1",
            "15: models[0].backend.timeout_ms: must be greater than 0 (got 0)",
            "17: models[1].name: \"m\" is already the name of models[0]",
            "18: models[1].backend.tokens_per_s: must be a finite number, 0 or more (got -1)",
            "20: models[2].name: \"has space\" must not contain spaces or control characters",
            "21: models[2].backend.base_url: \"https://h/v1\": https upstreams are not supported; \
             the upstream runs on the node, use http://127.0.0.1:PORT/v1",
            "21: models[2].backend.api_key: must not be empty (leave it out instead)",
            "21: models[2].backend.upstream_model: must not be empty",
            "24: games[0].source.command: must name a program (argv, non-empty)",
            "26: games[1].title: \"g\" is already the title of games[0]",
            "27: games[1].source.command[0]: must name a program, not be empty",
            "11: encoder.threads: must be greater than 0 (got 0)",
        ]
    );
}

#[test]
fn nat64_prefixes_follow_rfc_6052_and_do_not_overlap() {
    let text = r#"
[geo]
nat64_prefixes = [
  "64:ff9b:1::/96",
  "64:ff9b:1::/48",
  "2001:db8::/33",
  "10.0.0.0/8",
  "2001:db8:1::1/96",
  "2002:a00::/32",
  "64:ff9b::/96",
  "3fff:2::/64",
]
"#;
    assert_eq!(
        gw(text),
        [
            "5: geo.nat64_prefixes[1]: 64:ff9b:1::/48 overlaps geo.nat64_prefixes[0] \
             64:ff9b:1::/96",
            "6: geo.nat64_prefixes[2]: 2001:db8::/33: RFC 6052 allows prefix lengths 32, 40, 48, \
             56, 64 and 96 only",
            "7: geo.nat64_prefixes[3]: 10.0.0.0/8 is not an IPv6 prefix",
            "8: geo.nat64_prefixes[4]: 2001:db8:1::1/96 has host bits set (did you mean \
             2001:db8:1::/96?)",
            "9: geo.nat64_prefixes[5]: 2002:a00::/32 overlaps 2002::/16, whose addresses are \
             already located by the IPv4 address they embed",
            "10: geo.nat64_prefixes[6]: 64:ff9b::/96 overlaps 64:ff9b::/96, whose addresses are \
             already located by the IPv4 address they embed",
        ]
    );
    assert_eq!(
        gw("[geo]\nnat64_prefixes = [\"64:ff9b:1::/96\", \"2001:db8:122::/48\"]\n"),
        Vec::<String>::new()
    );
}

#[test]
fn client_address_header_must_be_a_header_name() {
    assert_eq!(
        gw("[http]\nclient_address_header = \"x forwarded for\"\n"),
        [
            "2: http.client_address_header: \"x forwarded for\" is not an HTTP header name (e.g. \
          \"x-forwarded-for\", \"forwarded\", \"x-real-ip\")"
        ]
    );
    assert_eq!(gw("[http]\nclient_address_header = \"\"\n").len(), 1);
    for ok in ["forwarded", "x-real-ip", "CF-Connecting-IP"] {
        assert_eq!(
            gw(&format!("[http]\nclient_address_header = \"{ok}\"\n")),
            Vec::<String>::new()
        );
    }
}

#[test]
fn a_rule_unknown_location_is_allow_or_deny() {
    let text = r#"
[[geofence.rules]]
name = "sanctions"
deny_client_countries = ["@ofac"]
unknown_location = "deny"
"#;
    assert_eq!(gw(text), Vec::<String>::new());
    let cfg = parse_gateway(text, "t.toml", &[]).unwrap();
    assert_eq!(cfg.geofence.rules[0].unknown_location, UnknownPolicy::Deny);
    let errs = gw(&text.replace("\"deny\"", "\"maybe\""));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("unknown_location"), "{errs:?}");
}

#[test]
fn node_media_and_quic_checks() {
    let errs = node(
        "[media]\nmin_bitrate_kbps = 0\nmax_frame_delay_ms = 0\nqueue_delay_threshold_ms = 0\n\
         [quic]\ncongestion = \"bbr\"\nreorder_packet_threshold = 2\n",
    );
    for path in [
        "media.min_bitrate_kbps",
        "media.max_frame_delay_ms",
        "media.queue_delay_threshold_ms",
        "quic.reorder_packet_threshold",
    ] {
        assert!(errs.iter().any(|e| e.contains(path)), "{path}: {errs:?}");
    }
    let errs = node("[quic]\ncongestion = \"vegas\"\n");
    assert!(
        errs.iter().any(|e| e.contains("quic.congestion")),
        "{errs:?}"
    );
    assert!(node("[quic]\ncongestion = \"new_reno\"\n").is_empty());
}

#[test]
fn node_audio_checks_name_the_field() {
    let errs = node("[audio]\nbitrate_kbps = 5\nexpected_loss_percent = 101\n");
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs.iter().any(|e| e.contains("audio.bitrate_kbps")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("audio.expected_loss_percent")),
        "{errs:?}"
    );
    assert!(node("[audio]\nbitrate_kbps = 511\n")
        .iter()
        .any(|e| e.contains("audio.bitrate_kbps")));
    assert!(node("[audio]\nvolume = 3\n")
        .iter()
        .any(|e| e.contains("volume")));
    assert!(node(
        "[audio]\nenabled = false\nbitrate_kbps = 6\nfec = false\ndtx = true\nexpected_loss_percent = 100\n"
    )
    .is_empty());
}

#[test]
fn blip_windows_are_bounded() {
    let text = r#"
[inference]
model_grace_s = 86401
unavailable_wait_ms = 60001
"#;
    assert_eq!(
        gw(text),
        [
            "3: inference.model_grace_s: must be at most 86400 (one day) (got 86401)",
            "4: inference.unavailable_wait_ms: must be at most 60000 (a held request costs a connection) (got 60001)",
        ]
    );
    // Zero turns either off.
    assert!(gw("[inference]\nmodel_grace_s = 0\nunavailable_wait_ms = 0\n").is_empty());
}

#[test]
fn node_gateway_source_is_exactly_one_of_address_addresses_and_bootstrap_url() {
    let pin = "0".repeat(64);
    let none = format!("[node]\nid = \"n\"\n[gateway]\npinned_cert_sha256 = \"{pin}\"\n");
    assert_eq!(
        node_raw(&none),
        [
            "3: gateway.address: required: set one of gateway.address, gateway.addresses or \
          gateway.bootstrap_url"
        ]
    );
    let two = format!(
        "[node]\nid = \"n\"\n[gateway]\naddress = \"a:1\"\naddresses = [\"b:2\"]\n\
         pinned_cert_sha256 = \"{pin}\"\n"
    );
    assert_eq!(
        node_raw(&two),
        [
            "5: gateway.addresses: set exactly one of gateway.address, gateway.addresses and \
          gateway.bootstrap_url"
        ]
    );
    let ok = format!(
        "[node]\nid = \"n\"\n[gateway]\naddresses = [\"a:1\", \"[::1]:2\"]\n\
         pinned_cert_sha256s = [\"{pin}\", \"{}\"]\n",
        "f".repeat(64)
    );
    let cfg = parse_node(&ok, "n.toml", &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.gateway.gateway_addresses(), ["a:1", "[::1]:2"]);
    assert_eq!(cfg.gateway.pins(), [[0u8; 32], [0xff; 32]]);
}

#[test]
fn node_gateway_addresses_and_pins_are_each_checked_by_index() {
    let text = format!(
        "[node]\nid = \"n\"\n[gateway]\naddresses = [\"a:1\", \"no-port\", \"a:1\"]\n\
         pinned_cert_sha256s = [\"{}\", \"xyz\"]\nconnect_timeout_ms = 0\n",
        "0".repeat(64)
    );
    let errs = node_raw(&text).join("\n");
    for want in [
        "gateway.addresses[1]: \"no-port\" is not host:port",
        "gateway.addresses[2]: \"a:1\" is listed twice",
        "gateway.pinned_cert_sha256s[1]: \"xyz\" is not a SHA-256 digest (64 hex digits)",
        "gateway.connect_timeout_ms: must be greater than 0",
    ] {
        assert!(errs.contains(want), "missing {want:?} in\n{errs}");
    }
    // An inflated list is refused, not probed.
    let many: Vec<String> = (0..65).map(|i| format!("\"h{i}:1\"")).collect();
    let text = format!(
        "[node]\nid = \"n\"\n[gateway]\naddresses = [{}]\npinned_cert_sha256 = \"{}\"\n",
        many.join(", "),
        "0".repeat(64)
    );
    assert!(
        node_raw(&text)
            .join("\n")
            .contains("gateway.addresses: 65 entries; at most 64"),
        "{:?}",
        node_raw(&text)
    );
}

#[test]
fn node_gateway_trust_is_one_of_ca_pin_and_pin_list() {
    let pin = "0".repeat(64);
    let text = format!(
        "[node]\nid = \"n\"\n[gateway]\naddress = \"a:1\"\npinned_cert_sha256 = \"{pin}\"\n\
         pinned_cert_sha256s = [\"{pin}\"]\n"
    );
    assert_eq!(
        node_raw(&text),
        [
            "6: gateway.pinned_cert_sha256s: set only one of gateway.ca_file, \
          gateway.pinned_cert_sha256 and gateway.pinned_cert_sha256s"
        ]
    );
}

#[test]
fn node_bootstrap_url_must_be_http_and_its_key_needs_it() {
    let pin = "0".repeat(64);
    for (url, want) in [
        ("https://gw/v1/gateways", "must be an http:// URL"),
        ("ftp://gw/v1/gateways", "must be an http:// URL"),
        (
            "http:///v1/gateways",
            "is not an http://host[:port]/path URL",
        ),
        (
            "http://gw/v1 gateways",
            "is not an http://host[:port]/path URL",
        ),
    ] {
        let text = format!(
            "[node]\nid = \"n\"\n[gateway]\nbootstrap_url = \"{url}\"\n\
             pinned_cert_sha256 = \"{pin}\"\n"
        );
        let errs = node_raw(&text).join("\n");
        assert!(
            errs.contains("gateway.bootstrap_url") && errs.contains(want),
            "{url}: {errs}"
        );
    }
    let text = format!(
        "[node]\nid = \"n\"\n[gateway]\naddress = \"a:1\"\nbootstrap_api_key = \"k\"\n\
         pinned_cert_sha256 = \"{pin}\"\n"
    );
    assert_eq!(
        node_raw(&text),
        [
            "5: gateway.bootstrap_api_key: is only used with gateway.bootstrap_url, which is not \
          set"
        ]
    );
    let text = format!(
        "[node]\nid = \"n\"\n[gateway]\nbootstrap_url = \"http://127.0.0.1:8080/v1/gateways\"\n\
         bootstrap_api_key = \"secret-key\"\npinned_cert_sha256 = \"{pin}\"\n"
    );
    let cfg = parse_node(&text, "n.toml", &[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(!format!("{cfg:?}").contains("secret-key"));
}

/// The node's model sizes for the gateway's checker: one way to give the size, a sane one.
#[test]
fn model_weights_are_given_one_way_and_within_ten_terabytes() {
    let sim = "backend = { type = \"sim\" }";
    let cases = [
        // Both set.
        (
            "weights_bytes = 1000\nparams_b = 7.0\ndtype = \"bf16\"",
            "models[0].weights_bytes: and params_b are both set: give the size one way",
        ),
        // params_b without dtype.
        ("params_b = 7.0", "models[0].dtype: required with params_b"),
        // dtype alone.
        (
            "dtype = \"fp16\"",
            "models[0].dtype: only applies with params_b",
        ),
        // dtype with weights_bytes.
        (
            "weights_bytes = 1000\ndtype = \"fp16\"",
            "models[0].dtype: only applies with params_b",
        ),
        // Zero and absurd sizes.
        (
            "weights_bytes = 0",
            "models[0].weights_bytes: must be 1 byte to 10 TB (10000000000000) (got 0)",
        ),
        (
            "weights_bytes = 10000000000001",
            "models[0].weights_bytes: must be 1 byte to 10 TB",
        ),
        (
            "params_b = 0.0\ndtype = \"bf16\"",
            "models[0].params_b: must be a finite number of billions greater than 0",
        ),
        (
            "params_b = nan\ndtype = \"bf16\"",
            "models[0].params_b: must be a finite number of billions greater than 0",
        ),
        (
            "params_b = 5000.1\ndtype = \"fp32\"",
            "models[0].params_b: 5000.1 billion parameters of fp32",
        ),
    ];
    for (keys, want) in cases {
        let errs = node(&format!("[[models]]\nname = \"m\"\n{keys}\n{sim}\n"));
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "{keys:?}: want {want:?}, got {errs:?}"
        );
    }
    // An unknown dtype is refused by name, at its path.
    let errs = node(&format!(
        "[[models]]\nname = \"m\"\nparams_b = 7.0\ndtype = \"fp7\"\n{sim}\n"
    ));
    assert!(
        errs.iter()
            .any(|e| e.contains("models[0].dtype") || e.contains("fp7")),
        "{errs:?}"
    );
    // The good ones.
    for keys in [
        "weights_bytes = 10000000000000",
        "params_b = 70.6\ndtype = \"q4_k_m\"",
        "",
    ] {
        assert_eq!(
            node(&format!("[[models]]\nname = \"m\"\n{keys}\n{sim}\n")),
            Vec::<String>::new(),
            "{keys:?}"
        );
    }
}

#[test]
fn configured_weights_are_declared_or_computed_from_params_and_dtype() {
    let sim = "backend = { type = \"sim\" }";
    let cfg = parse_node(
        &node_text(&format!(
            "[[models]]\nname = \"a\"\nweights_bytes = 42\n{sim}\n\
             [[models]]\nname = \"b\"\nparams_b = 70.0\ndtype = \"bf16\"\n{sim}\n\
             [[models]]\nname = \"c\"\nparams_b = 8.0\ndtype = \"q4_0\"\n{sim}\n\
             [[models]]\nname = \"d\"\n{sim}\n"
        )),
        "gw.toml",
        &[],
    )
    .unwrap();
    let w: Vec<_> = cfg
        .models
        .iter()
        .map(|m| m.configured_weights_bytes())
        .collect();
    assert_eq!(
        w,
        [
            Some((42, WeightsOrigin::Declared)),
            Some((140_000_000_000, WeightsOrigin::Computed)),
            // 4.5 bits per weight.
            Some((4_500_000_000, WeightsOrigin::Computed)),
            None,
        ]
    );
    assert_eq!(Dtype::Q4KM.bits_per_weight(), 4.85);
}

#[test]
fn gpu_uuids_are_bounded_printable_and_unique_and_pci_ids_carry_a_vendor() {
    let gpu = |extra: &str| {
        format!("[[gpus]]\nmodel = \"NVIDIA H100 80GB HBM3\"\nvram_mib = 81559\n{extra}\n")
    };
    let cases = [
        (
            gpu("uuid = \"\""),
            "gpus[0].uuid: must be 1 to 96 bytes (got 0)",
        ),
        (
            gpu(&format!("uuid = \"{}\"", "U".repeat(97))),
            "gpus[0].uuid: must be 1 to 96 bytes (got 97)",
        ),
        (
            gpu("uuid = \"GPU 1\""),
            "gpus[0].uuid: \"GPU 1\" must be printable ASCII",
        ),
        (
            format!("{}{}", gpu("uuid = \"GPU-a\""), gpu("uuid = \"GPU-a\"")),
            "gpus[1].uuid: \"GPU-a\" is already the uuid of gpus[0]",
        ),
        (
            gpu("pci_device_id = 0x2330"),
            "gpus[0].pci_device_id: 0x2330 must be NVML's combined (device << 16) | vendor",
        ),
        (
            gpu("pci_device_id = 0x23300000"),
            "gpus[0].pci_device_id: 0x23300000 must be NVML's combined",
        ),
    ];
    for (extra, want) in cases {
        let errs = node(&extra);
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "want {want:?}, got {errs:?}"
        );
    }
    // A negative or oversized id is a type error at its path, not a wrap-around.
    let errs = node(&gpu("pci_device_id = -1"));
    assert!(errs.iter().any(|e| e.contains("pci_device_id")), "{errs:?}");
    assert_eq!(
        node(&gpu(
            "uuid = \"GPU-5d1a8a2e-0c1f-4b1e-9f0e-2a3b4c5d6e7f\"\npci_device_id = 0x233010de"
        )),
        Vec::<String>::new()
    );
}

#[test]
fn store_ca_file_needs_a_postgresql_url_that_asks_for_tls() {
    assert_eq!(
        gw("[store]\nca_file = \"ca.pem\"\n"),
        ["2: store.ca_file: applies only to a PostgreSQL store (store.url)"]
    );
    assert_eq!(
        gw("[store]\nurl = \"postgres://u@db/n\"\nca_file = \"ca.pem\"\n"),
        ["3: store.ca_file: applies only when store.url asks for TLS (sslmode=require or verify-full)"]
    );
    for mode in ["require", "verify-full", "verify-ca"] {
        assert_eq!(
            gw(&format!(
                "[store]\nurl = \"postgres://u@db/n?sslmode={mode}\"\nca_file = \"ca.pem\"\n"
            )),
            Vec::<String>::new(),
            "{mode}"
        );
    }
}

#[test]
fn otlp_ca_file_needs_an_https_endpoint() {
    assert_eq!(
        gw("[log]\notlp_endpoint = \"http://127.0.0.1:4318\"\notlp_ca_file = \"ca.pem\"\n"),
        ["3: log.otlp_ca_file: applies only to an https:// otlp_endpoint (a plain http:// export has no certificate to check)"]
    );
    assert_eq!(
        gw("[log]\notlp_endpoint = \"https://otel.example.com\"\notlp_ca_file = \"ca.pem\"\notlp_headers = { \"x-api-key\" = \"k\" }\n"),
        Vec::<String>::new()
    );
}

/// `game.overload_queue_budget_ms` sheds frames younger than the frame budget; at or above it,
/// it would never shed anything and reads as a mistake. 0 turns shedding off.
#[test]
fn an_overload_queue_budget_not_below_the_frame_budget_is_refused() {
    assert_eq!(
        gw("[game]\nframe_budget_ms = 40\noverload_queue_budget_ms = 40\n"),
        ["3: game.overload_queue_budget_ms: must be less than game.frame_budget_ms (40), or 0 to never shed (got 40)"]
    );
    assert!(gw("[game]\nframe_budget_ms = 40\noverload_queue_budget_ms = 39\n").is_empty());
    assert!(gw("[game]\nframe_budget_ms = 40\noverload_queue_budget_ms = 0\n").is_empty());
}
