//! The cargo-fuzz crates (`protocol/fuzz/`, `fuzz/`) live outside the workspace because running
//! them needs nightly and sanitizers, so no other build compiles them: they rotted once (a new
//! `Endpoint` made a `match` in `openai_request` non-exhaustive) and nobody noticed. This test
//! type-checks every fuzz target on the toolchain the workspace uses, against each crate's own
//! lock file, so that a change to a parser's API breaks `cargo test` instead of the next
//! fuzzing campaign.
//!
//! `cargo check` only: no sanitizer build, no run. libfuzzer-sys's build script would compile
//! libFuzzer's C++ even for a check; `CUSTOM_LIBFUZZER_PATH` tells it the library is elsewhere
//! (nothing is linked by a check, so the path need not exist). About 80 CPU seconds on a cold
//! target dir (two crates' dependencies, checked), a few seconds after that.

use std::path::Path;
use std::process::Command;

/// Type-checks the binaries (the fuzz targets) of the fuzz crate at `manifest` (relative to the
/// repository root), failing the test with cargo's output if they do not build.
fn check(manifest: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the repository root");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // One target dir for both crates: they share most dependencies, and it outlives the run
    // (`CARGO_TARGET_TMPDIR` is kept by cargo), so later runs only check what changed.
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-check");
    let out = Command::new(cargo)
        .args(["check", "--locked", "--bins", "--manifest-path"])
        .arg(root.join(manifest))
        .arg("--target-dir")
        .arg(&target_dir)
        .env(
            "CUSTOM_LIBFUZZER_PATH",
            target_dir.join("libfuzzer-not-linked.a"),
        )
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "the fuzz targets of {manifest} do not build ({}). Fix them, and if a dependency of the \
         crates they fuzz changed, update their lock file with `cargo update --workspace \
         --manifest-path {manifest}`:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Both crates in one test: run in parallel, the two checks would wait on the same target dir's
/// lock anyway.
#[test]
fn every_fuzz_target_type_checks() {
    check("protocol/fuzz/Cargo.toml");
    check("fuzz/Cargo.toml");
}
