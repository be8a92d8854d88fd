//! Reading, TOML errors, unknown keys, environment overrides, and the set helpers.

use nearpath_config::*;
use std::collections::BTreeSet;
use std::io::Write as _;

fn gw_err(text: &str, env: &[(&str, &str)]) -> String {
    match parse_gateway(text, "gw.toml", env) {
        Ok(_) => panic!("expected an error for {text:?} with {env:?}"),
        Err(e) => e.to_string(),
    }
}

const NODE: &str = "[node]\nid = \"n1\"\n[gateway]\naddress = \"gw.example.com:4433\"\n\
                    pinned_cert_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n";

fn node_err(extra: &str) -> String {
    match parse_node(&format!("{NODE}{extra}"), "n.toml", &[]) {
        Ok(_) => panic!("expected an error for {extra:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_file_error_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let err = load_gateway(&path).unwrap_err();
    assert_eq!(err.origin, path.display().to_string());
    assert_eq!(err.errors.len(), 1);
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!(
            "{}: cannot read the configuration file: ",
            path.display()
        )),
        "{shown}"
    );
    let err = load_node(&path).unwrap_err();
    assert!(err.to_string().contains("nope.toml"), "{err}");
}

#[test]
fn files_on_disk_are_named_in_errors() {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    writeln!(file, "[http]\nmax_body_bytes = 0").unwrap();
    let err = load_gateway(file.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:2:1: http.max_body_bytes: must be greater than 0 (got 0)",
            file.path().display()
        )
    );
}

#[test]
fn syntax_errors_give_the_line() {
    assert_eq!(
        gw_err(
            "[http]\nlisten = \"127.0.0.1:1\"\nmax_body_bytes = = 3\n",
            &[]
        ),
        "gw.toml:3:18: not valid TOML: extra `=`, expected nothing"
    );
}

#[test]
fn type_errors_name_the_path_and_line() {
    assert_eq!(
        gw_err("\n[http]\nlisten = \"localhost\"\n", &[]),
        "gw.toml:3:1: http.listen: invalid socket address syntax"
    );
    assert_eq!(
        gw_err("[nodes]\nheartbeat_ms = -5\n", &[]),
        "gw.toml:2:1: nodes.heartbeat_ms: invalid value: integer `-5`, expected u64"
    );
    assert_eq!(
        gw_err(
            "[[geo.overrides]]\ncidr = \"10.0.0.0/33\"\ncountry = \"US\"\n",
            &[]
        ),
        "gw.toml:2:1: geo.overrides[0].cidr: invalid IP address syntax"
    );
    assert_eq!(
        gw_err("[geofence]\nunknown_location_controlled = \"maybe\"\n", &[]),
        "gw.toml:2:1: geofence.unknown_location_controlled: unknown variant `maybe`, expected \
         `allow` or `deny`"
    );
}

#[test]
fn unknown_keys_are_rejected_at_every_depth() {
    assert_eq!(
        gw_err("htp = 1\n", &[]),
        "gw.toml:1:1: htp: unknown key (expected one of `http`, `admin`, `quic`, `store`, \
         `federation`, `nodes`, `routing`, `inference`, `game`, `webtransport`, `geo`, `geofence`, `checker`, `log`)"
    );
    assert_eq!(
        gw_err("[admin]\nlisten = \"127.0.0.1:1\"\ntokn = \"x\"\n", &[]),
        "gw.toml:3:1: admin.tokn: unknown key (expected `listen` or `token`)"
    );
    assert_eq!(
        gw_err(
            "[[geo.overrides]]\ncidr = \"10.0.0.0/8\"\ncountry = \"US\"\nlatitude = 1.0\n",
            &[]
        ),
        "gw.toml:4:1: geo.overrides[0].latitude: unknown key (expected one of `cidr`, `country`, \
         `subdivision`, `lat`, `lon`)"
    );
    let shown = gw_err(
        "[[geofence.rules]]\nname = \"r\"\ndeny_client_countries = [\"CN\"]\nallow = []\n",
        &[],
    );
    assert!(
        shown.starts_with("gw.toml:4:1: geofence.rules[0].allow: unknown key (expected one of "),
        "{shown}"
    );
    // Inside the internally tagged backend enum, and in an inline table.
    assert_eq!(
        node_err("[[models]]\nname = \"m\"\n[models.backend]\ntype = \"sim\"\nttft = 5\n"),
        "n.toml:10:1: models[0].backend.ttft: unknown key (expected one of `ttft_ms`, \
         `tokens_per_s`, `seed`)"
    );
    assert_eq!(
        node_err("[[games]]\ntitle = \"t\"\nsource = { type = \"builtin\", command = [\"x\"] }\n"),
        "n.toml:8:30: games[0].source.command: unknown key"
    );
    assert_eq!(
        node_err("[encoder]\nthreads = 2\nbitrate = 1\n"),
        "n.toml:8:1: encoder.bitrate: unknown key (expected one of `idr_interval_s`, `threads`, \
         `encoder`, `intra_refresh`, `software_hevc_av1`, `vaapi_device`)"
    );
    // An encoder nobody implements is refused at its key, naming the choices.
    let shown = node_err("[encoder]\nencoder = \"quicksync\"\n");
    assert!(
        shown.contains("encoder.encoder") && shown.contains("quicksync") && shown.contains("x264"),
        "{shown}"
    );
    let shown = node_err("[encoder]\nvaapi_device = \" \"\n");
    assert!(
        shown.contains("encoder.vaapi_device: must not be empty"),
        "{shown}"
    );
}

#[test]
fn missing_required_keys_are_named() {
    let err = parse_node("[node]\n", "n.toml", &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "n.toml:1:2: node.id: required key is missing"
    );
    let err = parse_node("[node]\nid = \"n\"\n", "n.toml", &[]).unwrap_err();
    assert_eq!(err.to_string(), "n.toml: gateway: required key is missing");
    assert_eq!(
        node_err("[[models]]\nname = \"m\"\n"),
        "n.toml:6:1: models[0].backend: required key is missing"
    );
    assert_eq!(
        node_err("[[models]]\nname = \"m\"\nbackend = { type = \"upstream\" }\n"),
        "n.toml:8:1: models[0].backend.base_url: required key is missing"
    );
    assert_eq!(
        node_err("[[models]]\nname = \"m\"\nbackend = { type = \"llm\" }\n"),
        "n.toml:8:13: models[0].backend.type: unknown variant `llm`, expected `sim` or `upstream`"
    );
}

#[test]
fn env_sets_a_value_and_wins_over_the_file() {
    let text = "[http]\nlisten = \"127.0.0.1:1\"\nmax_body_bytes = 10\n";
    let cfg = parse_gateway(
        text,
        "gw.toml",
        &[
            ("NEARPATH_HTTP__LISTEN", "0.0.0.0:9999"),
            ("NEARPATH_ADMIN__TOKEN", "from-env"),
            (
                "NEARPATH_HTTP__CORS_ALLOWED_ORIGINS",
                "[\"*\", \"https://a.example\"]",
            ),
            ("NEARPATH_ROUTING__PATH_STRETCH", "2"),
            ("NEARPATH_LOG__FORMAT", "json"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.http.listen, "0.0.0.0:9999".parse().unwrap());
    assert_eq!(cfg.http.max_body_bytes, 10, "file value kept");
    assert_eq!(cfg.admin.token.as_deref(), Some("from-env"));
    assert_eq!(cfg.http.cors_allowed_origins, ["*", "https://a.example"]);
    assert_eq!(cfg.routing.path_stretch, 2.0);
    assert_eq!(cfg.log.format, LogFormat::Json);
}

#[test]
fn env_overrides_nested_values() {
    let text =
        "[[models]]\nname = \"m\"\nbackend = { type = \"upstream\", base_url = \"http://h/v1\" }\n";
    let cfg = parse_node(
        &format!("{NODE}{text}"),
        "n.toml",
        &[
            // Reads as an integer, but the key is a string: taken as written.
            ("NEARPATH_MODELS__0__BACKEND__API_KEY", "123"),
            ("NEARPATH_MODELS__0__BACKEND__TIMEOUT_MS", "5000"),
            ("NEARPATH_GATEWAY__RECONNECT_MAX_MS", "1000"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    match &cfg.models[0].backend {
        BackendConfig::Upstream {
            api_key,
            timeout_ms,
            ..
        } => {
            assert_eq!(api_key.as_deref(), Some("123"));
            assert_eq!(*timeout_ms, 5000);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(cfg.gateway.reconnect_max_ms, 1000);

    let cfg = parse_gateway(
        "",
        "gw.toml",
        &[("NEARPATH_GEOFENCE__COUNTRY_SETS__MINE", "[\"FR\", \"@eu\"]")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.geofence.country_sets["mine"], ["FR", "@eu"]);
    assert!(
        cfg.geofence.country_sets.contains_key("ofac"),
        "defaults kept"
    );
}

#[test]
fn env_strings_that_look_like_numbers_stay_strings() {
    let cfg = parse_gateway(
        "",
        "gw.toml",
        &[("NEARPATH_ADMIN__TOKEN", "1234567890123456")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.admin.token.as_deref(), Some("1234567890123456"));
    let cfg = parse_gateway("", "gw.toml", &[("NEARPATH_LOG__LEVEL", "true")])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.log.level, "true");
}

#[test]
fn env_unknown_keys_and_bad_values_name_the_variable() {
    assert_eq!(
        gw_err("", &[("NEARPATH_ADMIN__TOKN", "x")]),
        "gw.toml: admin.tokn: unknown key (expected `listen` or `token`) (from environment \
         variable NEARPATH_ADMIN__TOKN)"
    );
    assert_eq!(
        gw_err("", &[("NEARPATH_NODE__ENROLMENT_TOKEN", "x")]),
        "gw.toml: node: unknown key (expected one of `http`, `admin`, `quic`, `store`, \
         `federation`, `nodes`, `routing`, `inference`, `game`, `webtransport`, `geo`, `geofence`, `checker`, `log`) (from environment variable \
         NEARPATH_NODE__ENROLMENT_TOKEN)"
    );
    assert_eq!(
        gw_err(
            "[http]\nmax_body_bytes = 5\n",
            &[("NEARPATH_HTTP__MAX_BODY_BYTES", "lots")]
        ),
        "gw.toml: http.max_body_bytes: invalid type: string \"lots\", expected u64 (from \
         environment variable NEARPATH_HTTP__MAX_BODY_BYTES)"
    );
    assert_eq!(
        gw_err("", &[("NEARPATH_HTTP__MAX_BODY_BYTES", "0")]),
        "gw.toml: http.max_body_bytes: must be greater than 0 (got 0) (from environment variable \
         NEARPATH_HTTP__MAX_BODY_BYTES)"
    );
    assert_eq!(
        gw_err("", &[("NEARPATH_HTTP____LISTEN", "x")]),
        "gw.toml: environment variable NEARPATH_HTTP____LISTEN: empty key between double \
         underscores"
    );
    assert_eq!(
        gw_err(
            "[log]\nlevel = \"info\"\n",
            &[("NEARPATH_LOG__LEVEL__X", "x")]
        ),
        "gw.toml: environment variable NEARPATH_LOG__LEVEL__X: log.level is not a table"
    );
    // Without the key in the file, the variable creates a table where a string belongs.
    assert_eq!(
        gw_err("", &[("NEARPATH_LOG__LEVEL__X", "x")]),
        "gw.toml: log.level: invalid type: map, expected a string (from environment variable \
         NEARPATH_LOG__LEVEL__X)"
    );
    assert_eq!(
        node_err_env("", &[("NEARPATH_MODELS__0__NAME", "x")]),
        "n.toml: models: invalid type: map, expected a sequence (from environment variable \
         NEARPATH_MODELS__0__NAME)"
    );
    assert_eq!(
        node_err_env(
            "[[games]]\ntitle = \"t\"\nsource = { type = \"builtin\" }\n",
            &[("NEARPATH_GAMES__3__TITLE", "x")]
        ),
        "n.toml: environment variable NEARPATH_GAMES__3__TITLE: games has 1 entries, so there is \
         no [3]"
    );
}

fn node_err_env(extra: &str, env: &[(&str, &str)]) -> String {
    match parse_node(&format!("{NODE}{extra}"), "n.toml", env) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn env_vars_that_are_not_overrides_are_ignored() {
    let cfg = parse_gateway(
        "",
        "gw.toml",
        &[
            ("NEARPATH_CONFIG", "/etc/nearpath/gateway.toml"),
            ("NEARPATH_LOG", "debug"),
            ("RUST_LOG", "trace"),
            ("HTTP__LISTEN", "nonsense"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg, GatewayConfig::default());
}

#[test]
fn file_country_sets_add_to_the_defaults() {
    let text = "[geofence.country_sets]\nmine = [\"FR\"]\neu = [\"DE\"]\n";
    let cfg = parse_gateway(text, "gw.toml", &[]).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = cfg
        .geofence
        .country_sets
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(names, ["eu", "export_controlled", "mine", "ofac"]);
    assert_eq!(cfg.geofence.country_sets["eu"], ["DE"], "replaced");
    assert_eq!(cfg.geofence.rules, default_rules(), "rules untouched");
}

#[test]
fn expanding_country_lists() {
    let mut fence = GeofenceConfig::default();
    fence.country_sets.insert(
        "nested".into(),
        vec!["@ofac".into(), "FR".into(), "DE-BE".into()],
    );
    let list = vec!["@nested".to_string(), "CN".to_string(), "UA-43".to_string()];
    let got = fence.expand_countries(&list).unwrap();
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(got.countries, set(&["CN", "CU", "FR", "IR", "KP"]));
    assert_eq!(
        got.subdivisions,
        set(&["DE-BE", "UA-09", "UA-14", "UA-40", "UA-43"])
    );
    assert!(got.contains("UA", Some("UA-43")));
    assert!(got.contains("FR", None));
    assert!(!got.contains("UA", Some("UA-30")));
    assert!(!got.contains("UA", None));

    fence
        .country_sets
        .insert("loop".into(), vec!["@loop2".into()]);
    fence
        .country_sets
        .insert("loop2".into(), vec!["@loop".into()]);
    assert_eq!(
        fence.expand_countries(&["@loop".into()]),
        Err("country sets refer to each other in a cycle: @loop -> @loop2 -> @loop".into())
    );
    assert_eq!(
        fence.expand_countries(&["@nope".into()]),
        Err("unknown country set \"@nope\"".into())
    );
    assert!(fence.expand_countries(&["@controlled".into()]).is_err());
    assert_eq!(
        fence.expand_countries(&["XX".into()]),
        Err("\"XX\" is not an ISO 3166-1 alpha-2 country code".into())
    );
    // A set used twice, not in a cycle, is fine.
    fence
        .country_sets
        .insert("twice".into(), vec!["@eu".into(), "@eu".into()]);
    assert_eq!(
        fence
            .expand_countries(&["@twice".into()])
            .unwrap()
            .countries
            .len(),
        27
    );
}

#[test]
fn expanding_gpu_classes() {
    let fence = GeofenceConfig::default();
    let got = fence.expand_gpu_classes(&["@controlled".into(), "rtx3080".into()]);
    // Every default controlled class, plus rtx3080 (not controlled).
    assert_eq!(got.len(), fence.controlled_gpu_classes.len() + 1);
    assert!(fence.controlled_gpu_classes.len() >= 24);
    assert!(got.contains("h100") && got.contains("rtx3080") && !got.contains("@controlled"));
    assert!(fence.expand_gpu_classes(&[]).is_empty());
    assert!(fence.is_controlled("h20"));
    assert!(!fence.is_controlled("rtx4090d"));
    assert!(!fence.is_controlled(CPU_GPU_CLASS));
}

#[test]
fn configurations_round_trip_through_toml() {
    let cfg = GatewayConfig::demo();
    let text = toml::to_string(&cfg).unwrap();
    assert_eq!(parse_gateway(&text, "rt.toml", &[]).unwrap(), cfg);

    let mut node = parse_node(NODE, "n.toml", &[]).unwrap();
    node.models.push(ModelConfig {
        name: "m".into(),
        max_concurrency: 2,
        backend: BackendConfig::Upstream {
            base_url: "http://h/v1".into(),
            api_key: None,
            upstream_model: Some("up".into()),
            timeout_ms: 9,
        },
        responses: Default::default(),
        capabilities: Some(vec!["tools".into(), "logprobs".into()]),
        weights_bytes: None,
        params_b: None,
        dtype: None,
    });
    node.games.push(GameEntry {
        title: "g".into(),
        source: GameSource::Command {
            command: vec!["/bin/game".into()],
        },
    });
    let text = toml::to_string(&node).unwrap();
    assert_eq!(parse_node(&text, "rt.toml", &[]).unwrap(), node);
}

#[test]
fn responses_native_needs_an_upstream_backend() {
    let shown = node_err(
        "[[models]]\nname = \"m\"\nresponses = \"native\"\nbackend = { type = \"sim\" }\n",
    );
    assert!(shown.contains("models[0].responses"), "{shown}");
    let shown =
        node_err("[[models]]\nname = \"m\"\nresponses = \"relay\"\nbackend = { type = \"sim\" }\n");
    assert!(shown.contains("models[0].responses"), "{shown}");
    let upstream = "[[models]]\nname = \"m\"\nresponses = \"native\"\n\
                    backend = { type = \"upstream\", base_url = \"http://h/v1\" }\n\
                    [[models]]\nname = \"s\"\nbackend = { type = \"sim\" }\n";
    let cfg =
        parse_node(&format!("{NODE}{upstream}"), "n.toml", &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.models[0].responses, ResponsesMode::Native);
    assert_eq!(
        cfg.models[1].responses,
        ResponsesMode::Translate,
        "the default"
    );
}

#[test]
fn model_capabilities_are_validated_naming_the_path() {
    let models = "[[models]]\nname = \"a\"\nbackend = { type = \"sim\" }\n\
                  [[models]]\nname = \"b\"\nbackend = { type = \"upstream\", base_url = \"http://127.0.0.1:1/v1\" }\n\
                  [[models]]\nname = \"c\"\nbackend = { type = \"sim\" }\n";
    let shown = node_err(&format!(
        "{models}capabilities = [\"tools\", \"telepathy\"]\n"
    ));
    assert!(
        shown.contains("models[2].capabilities[1]") && shown.contains("telepathy"),
        "{shown}"
    );
    let shown = node_err(&format!("{models}capabilities = [\"n\", \"n\"]\n"));
    assert!(shown.contains("models[2].capabilities[1]"), "{shown}");
    let shown = node_err(&format!("{models}capabilities = \"tools\"\n"));
    assert!(shown.contains("models[2].capabilities"), "{shown}");
    // Defaults: the simulator declares what it fakes, an upstream nothing until declared.
    let cfg = match parse_node(
        &format!("{NODE}{models}capabilities = [\"vision\"]\n"),
        "n.toml",
        &[],
    ) {
        Ok(cfg) => cfg,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        cfg.models[0].capability_names(),
        nearpath_config::SIM_CAPABILITY_NAMES.to_vec()
    );
    assert!(cfg.models[1].capability_names().is_empty());
    assert_eq!(cfg.models[2].capability_names(), ["vision"]);
}

/// The rule: every schema error is reported at once (not only the first of a kind), each with
/// its line and column, and the semantic checks still run on the rest of the file.
#[test]
fn schema_errors_are_all_reported_with_line_and_column_and_validation_still_runs() {
    let text = "[http]\nlisten_port = 1\nmax_body_bytes = \"big\"\n\n[admin]\n  tokn = \"x\"\n\
                [nodes]\nheartbeat_ms = -5\n[[geofence.rules]]\nname = \"r\"\n\
                deny_client_countries = [\"@nope\"]\ngpu_classes = [\"h100\", 7]\n";
    let errs = parse_gateway(text, "gw.toml", &[]).unwrap_err();
    let shown: Vec<String> = errs.to_string().lines().map(str::to_string).collect();
    let want = [
        "gw.toml:2:1: http.listen_port: unknown key",
        "gw.toml:3:1: http.max_body_bytes: invalid type: string \"big\", expected u64",
        "gw.toml:6:3: admin.tokn: unknown key",
        "gw.toml:8:1: nodes.heartbeat_ms: invalid value: integer `-5`, expected u64",
        "gw.toml:12:24: geofence.rules[0].gpu_classes[1]: invalid type: integer `7`",
        "gw.toml:11:26: geofence.rules[0].deny_client_countries[0]: unknown country set \"@nope\"",
    ];
    assert_eq!(shown.len(), want.len(), "{shown:#?}");
    for (got, want) in shown.iter().zip(want) {
        assert!(
            got.starts_with(want),
            "{got:?} does not start with {want:?}"
        );
    }
    // A required key of the wrong type is reported once, not again as missing.
    let errs = parse_node("[node]\nid = 5\n[gateway]\naddress = 1\n", "n.toml", &[]).unwrap_err();
    let paths: Vec<_> = errs.errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["node.id", "gateway.address"], "{errs}");
}

#[test]
fn a_flood_of_bad_keys_is_cut_off_not_looped_over() {
    let text: String = (0..5000).map(|i| format!("k{i} = {i}\n")).collect();
    let errs = parse_gateway(&text, "gw.toml", &[]).unwrap_err();
    assert_eq!(errs.errors.len(), 50);
    // Shown in file order, each with its own line.
    let lines: Vec<_> = errs.errors.iter().map(|e| e.line.unwrap()).collect();
    assert!(lines.windows(2).all(|w| w[0] < w[1]), "{lines:?}");
}

#[test]
fn columns_count_characters_not_bytes() {
    let text = "[[geofence.rules]]\nname = \"r\"\ndeny_client_countries = [\"ÄÖ\", \"@x\"]\n";
    let errs = parse_gateway(text, "gw.toml", &[]).unwrap_err();
    let e = errs
        .errors
        .iter()
        .find(|e| e.path == "geofence.rules[0].deny_client_countries[1]")
        .unwrap_or_else(|| panic!("{errs}"));
    assert_eq!((e.line, e.column), (Some(3), Some(32)));
}

/// The rule: a relative path in a config file is relative to the file's folder; absolute paths
/// and paths from the environment are taken as written.
#[test]
fn relative_paths_resolve_against_the_config_files_folder() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        "[quic]\ncert_file = \"certs/quic.pem\"\nkey_file = \"/abs/key.pem\"\n\
         [store]\npath = \"state/gw.db\"\n[geo]\ndatabase = \"../geo/City.mmdb\"\n",
    )
    .unwrap();
    let cfg = load_gateway(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.quic.cert_file, Some(dir.path().join("certs/quic.pem")));
    assert_eq!(
        cfg.quic.key_file.as_deref(),
        Some(std::path::Path::new("/abs/key.pem"))
    );
    assert_eq!(cfg.store.path, dir.path().join("state/gw.db"));
    assert_eq!(cfg.geo.database, Some(dir.path().join("../geo/City.mmdb")));

    let env = [("NEARPATH_QUIC__CERT_FILE", "from-env.pem")];
    let text = std::fs::read_to_string(&file).unwrap();
    let cfg = parse_gateway_checked(&text, "gateway.toml", Some(dir.path()), &env, &|_| vec![])
        .map(Some)
        .unwrap_or_else(|e| {
            // Only the run checks may complain (no admin token), never about the paths.
            assert!(e.errors.iter().all(|e| e.path == "admin.token"), "{e}");
            None
        });
    assert!(cfg.is_none());
    let env = [
        ("NEARPATH_QUIC__CERT_FILE", "from-env.pem"),
        ("NEARPATH_ADMIN__TOKEN", "0123456789abcdef0123"),
    ];
    let cfg = parse_gateway_checked(&text, "gateway.toml", Some(dir.path()), &env, &|_| vec![])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.quic.cert_file.as_deref(),
        Some(std::path::Path::new("from-env.pem"))
    );
    // The default store path is not in the file, so it stays relative to the working directory.
    let env = [
        ("NEARPATH_ADMIN__TOKEN", "0123456789abcdef0123"),
        ("NEARPATH_QUIC__CERT_FILE", "c.pem"),
        ("NEARPATH_QUIC__KEY_FILE", "k.pem"),
    ];
    let cfg = parse_gateway_checked("", "g.toml", Some(dir.path()), &env, &|_| vec![])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.store.path, std::path::Path::new("nearpath-gateway.db"));

    let node = dir.path().join("node.toml");
    std::fs::write(
        &node,
        "[node]\nid = \"n\"\n[gateway]\naddress = \"h:1\"\nca_file = \"ca.pem\"\n",
    )
    .unwrap();
    let cfg = load_node(&node).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.gateway.ca_file, Some(dir.path().join("ca.pem")));
}

#[test]
fn extra_checks_are_reported_with_the_files_errors_and_located() {
    let text = "[admin]\ntoken = \"0123456789abcdef0123\"\n[quic]\nlisten = \"0.0.0.0:4433\"\n\
                cert_file = \"c.pem\"\nkey_file = \"k.pem\"\n[http]\nmax_body_bytes = 0\n";
    let extra = |_: &GatewayConfig| {
        vec![ConfigError::new(
            "quic.cert_file",
            "cannot read c.pem: No such file or directory",
        )]
    };
    let errs = parse_gateway_checked(text, "gw.toml", None, &[], &extra).unwrap_err();
    assert_eq!(
        errs.to_string(),
        "gw.toml:8:1: http.max_body_bytes: must be greater than 0 (got 0)\n\
         gw.toml:5:1: quic.cert_file: cannot read c.pem: No such file or directory"
    );
}

#[test]
fn files_that_are_not_configurations_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let shown = |path: &std::path::Path| load_gateway(path).unwrap_err().to_string();

    let err = shown(dir.path());
    assert!(
        err.ends_with("is a directory, not a configuration file"),
        "{err}"
    );

    let binary = dir.path().join("bin.toml");
    std::fs::write(&binary, b"[http]\nlisten = \"\xff\xfe\"\n").unwrap();
    let err = shown(&binary);
    assert!(
        err.starts_with(&format!("{}:2:11: is not UTF-8 text", binary.display())),
        "{err}"
    );

    let huge = dir.path().join("huge.toml");
    let f = std::fs::File::create(&huge).unwrap();
    f.set_len(MAX_CONFIG_BYTES + 1).unwrap();
    let err = shown(&huge);
    assert!(
        err.ends_with("is larger than 4 MiB: not a configuration file"),
        "{err}"
    );

    #[cfg(unix)]
    {
        let a = dir.path().join("a.toml");
        let b = dir.path().join("b.toml");
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        let err = shown(&a);
        assert!(err.contains("cannot read the configuration file"), "{err}");
    }
}
