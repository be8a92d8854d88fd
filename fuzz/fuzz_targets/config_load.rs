//! The configuration loader: TOML text plus `NEARPATH_*` environment overrides, through serde and
//! validation, for both roots (`GatewayConfig`, `NodeConfig`).
//!
//! Input: the TOML text, optionally followed by a NUL byte and override lines `NAME=value`
//! (`NEARPATH_` is prepended to each name, so the fuzzer need not find the prefix).
//!
//! Asserts, beyond "no panic" (a configuration is operator input, but a panic at load is still a
//! worse message than an error):
//! - a refusal lists at least one error, each with a line inside the text (or none);
//! - the `_for_run` loaders accept only what the plain ones accept, with the same result;
//! - an accepted configuration validates again as a value, prints a summary, and round-trips:
//!   serialised to TOML (overrides baked in) it loads, without the environment, to the same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nearpath_config::{
    parse_gateway, parse_gateway_for_run, parse_node, parse_node_for_run, ConfigErrors,
    GatewayConfig, NodeConfig,
};

fn check_refusal(text: &str, errs: &ConfigErrors) {
    assert!(!errs.errors.is_empty(), "a refusal without errors");
    assert_eq!(errs.origin, "fuzz.toml");
    let lines = text.lines().count().max(1);
    for e in &errs.errors {
        assert!(!e.message.is_empty());
        if let Some(line) = e.line {
            assert!(
                (1..=lines + 1).contains(&line),
                "line {line} of {lines}: {e}"
            );
        }
    }
    assert!(!errs.to_string().is_empty());
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let (text, env_text) = input.split_once('\0').unwrap_or((input, ""));
    let env_owned: Vec<(String, String)> = env_text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("NEARPATH_{k}"), v.to_string()))
        .collect();
    let env: Vec<(&str, &str)> = env_owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();

    match parse_gateway(text, "fuzz.toml", &env) {
        Err(errs) => {
            check_refusal(text, &errs);
            assert!(parse_gateway_for_run(text, "fuzz.toml", &env).is_err());
        }
        Ok(cfg) => {
            if let Ok(run) = parse_gateway_for_run(text, "fuzz.toml", &env) {
                assert_eq!(run, cfg);
            }
            cfg.validate()
                .expect("a loaded gateway configuration validates");
            let _ = cfg.summary();
            let printed = toml::to_string(&cfg).expect("a gateway configuration serialises");
            let again: GatewayConfig = parse_gateway(&printed, "printed.toml", &[])
                .unwrap_or_else(|e| panic!("printed configuration does not load: {e}\n{printed}"));
            assert_eq!(
                again, cfg,
                "round trip changed the configuration:\n{printed}"
            );
        }
    }

    match parse_node(text, "fuzz.toml", &env) {
        Err(errs) => {
            check_refusal(text, &errs);
            assert!(parse_node_for_run(text, "fuzz.toml", &env).is_err());
        }
        Ok(cfg) => {
            if let Ok(run) = parse_node_for_run(text, "fuzz.toml", &env) {
                assert_eq!(run, cfg);
            }
            cfg.validate()
                .expect("a loaded node configuration validates");
            let _ = cfg.summary();
            let printed = toml::to_string(&cfg).expect("a node configuration serialises");
            let again: NodeConfig = parse_node(&printed, "printed.toml", &[])
                .unwrap_or_else(|e| panic!("printed configuration does not load: {e}\n{printed}"));
            assert_eq!(
                again, cfg,
                "round trip changed the configuration:\n{printed}"
            );
        }
    }
});
