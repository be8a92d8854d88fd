//! Pins the module layering that ARCHITECTURE.md describes ("Components and layers"): every
//! gateway module has a rank and may use only modules of a lower rank, so there are no import
//! circles and no front end uses another. A new module, or a new use across the layers, fails
//! here until the table (and ARCHITECTURE.md) says where it belongs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Rank of each top-level module of `gateway/src` (a file or a folder with `mod.rs`).
const RANKS: &[(&str, u8)] = &[
    // Leaves: no gateway module below them but these.
    ("access", 0),
    ("clock", 0),
    ("error", 0),
    ("metrics", 0),
    ("session_id", 0),
    ("gpu_class", 0),
    ("liveness", 0),
    ("client_addr", 0),
    ("conn_guard", 0),
    ("tls", 0),
    ("sdp", 0),
    ("recent_models", 0),
    ("router", 0),
    ("player", 0),
    ("node_link", 0),
    ("slot_queue", 0),
    ("outliers", 0),
    ("budget", 0),
    ("ticket", 0),
    ("saturation", 0),
    ("http_util", 1),
    // The gateway's own certificate files, on top of `tls`.
    ("cert", 1),
    ("wt_cert", 1),
    ("store", 1),
    // State the components are made of.
    ("registry", 2),
    ("fleet_limits", 2),
    ("auth", 3),
    ("relay", 3),
    ("meter", 3),
    ("trunk", 3),
    // The federation's directories: store, registry and clock below it; read by front ends.
    ("federation", 3),
    ("components", 4),
    // Session rules (sans-IO machines and their drivers) and the services built on them.
    ("infer", 5),
    ("game", 5),
    ("control", 5),
    // The checker: its sans-IO core (physics, RTT geolocation, verdicts, scheduler) and the
    // driver that runs probes and applies verdicts to the registry and the store.
    ("checker", 5),
    // Front ends: built with the components and services they use, never with each other.
    ("api", 6),
    ("client", 6),
    ("admin", 6),
    ("webrtc", 6),
    ("webtransport", 6),
    // Assembly.
    ("server", 7),
    // What `gateway run` checks before serving, for `run` and `check-config` alike.
    ("preflight", 7),
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read gateway/src").flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a source file belongs to (`None` for lib.rs and this file).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .to_string();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "layering" && name != "bin").then_some(name)
}

/// The modules a file's non-test code names as `crate::<module>`.
fn uses(text: &str) -> Vec<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = Vec::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        for (at, _) in line.match_indices("crate::") {
            let rest = &line[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                out.push(name);
            }
        }
    }
    out
}

#[test]
fn every_module_uses_only_modules_of_a_lower_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let ranks: BTreeMap<&str, u8> = RANKS.iter().copied().collect();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut problems = Vec::new();
    for f in &files {
        let Some(m) = module_of(&src, f) else {
            continue;
        };
        let Some(&rank) = ranks.get(m.as_str()) else {
            problems.push(format!("{m}: not in the layer table"));
            continue;
        };
        let text = std::fs::read_to_string(f).expect("read source");
        for used in uses(&text) {
            if used == m {
                continue;
            }
            match ranks.get(used.as_str()) {
                Some(&r) if r < rank => {}
                Some(&r) => problems.push(format!(
                    "{}: {m} (layer {rank}) uses {used} (layer {r})",
                    f.display()
                )),
                None => problems.push(format!("{}: uses unknown module {used}", f.display())),
            }
        }
    }
    assert!(problems.is_empty(), "layering:\n{}", problems.join("\n"));
}

#[test]
fn the_layer_table_names_every_module_once() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut modules: Vec<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    modules.sort();
    modules.dedup();
    let mut table: Vec<String> = RANKS.iter().map(|(m, _)| m.to_string()).collect();
    table.sort();
    let before = table.len();
    table.dedup();
    assert_eq!(before, table.len(), "a module is listed twice");
    assert_eq!(modules, table);
}
