//! The nearpath-edge-node Debian package and its systemd unit, as CI checks them (README "Install
//! from the Debian package"): the package is built from the debug binary by
//! `deploy/build-deb.sh`, with the asset list cargo-deb uses for releases.

#[path = "../../deploy/tests/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    checks::repo(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn deb_of_the_edge_node_ships_every_asset_and_control_field_of_its_cargo_deb_metadata() {
    if !checks::have_tool("dpkg-deb", &["--version"], "the Debian package")
        || !checks::have_tool("python3", &["-c", "import tomllib"], "the Debian package")
    {
        return;
    }
    let repo = repo();
    let out = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_edge-node")).parent().unwrap();
    let deb = checks::build_deb(&repo, "edge-node", bin_dir, out.path());
    let metadata = checks::deb_metadata(Path::new(env!("CARGO_MANIFEST_DIR")));
    checks::check_deb(&deb, &metadata, env!("CARGO_PKG_VERSION"));

    let entries = checks::contents(&deb);
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    for expected in [
        "usr/bin/edge-node",
        "etc/nearpath/edge-node.toml",
        "lib/systemd/system/nearpath-edge-node.service",
        "usr/share/man/man1/edge-node.1.gz",
        "usr/share/man/man1/edge-node-check-config.1.gz",
        "usr/share/man/man1/edge-node-serve-openai.1.gz",
        "usr/share/bash-completion/completions/edge-node",
        "usr/share/zsh/vendor-completions/_edge-node",
        "usr/share/fish/vendor_completions.d/edge-node.fish",
        "usr/share/doc/nearpath-edge-node/copyright",
        "usr/share/doc/nearpath-edge-node/NOTICE",
    ] {
        assert!(paths.contains(&expected), "{expected} missing: {paths:#?}");
    }
    let bins: Vec<&str> = entries
        .iter()
        .filter(|e| e.path.starts_with("usr/bin/") && !e.mode.starts_with('d'))
        .map(|e| e.path.as_str())
        .collect();
    assert_eq!(bins, ["usr/bin/edge-node"], "only the edge node's binary");
    assert!(
        !paths
            .iter()
            .any(|p| p.starts_with("usr/share/man/man1/gateway")),
        "only the edge node's pages: {paths:#?}"
    );

    let root = tempfile::tempdir().unwrap();
    checks::extract(&deb, root.path());
    let read = |p: &str| std::fs::read(root.path().join(p)).unwrap();
    assert_eq!(
        read("lib/systemd/system/nearpath-edge-node.service"),
        std::fs::read(repo.join("deploy/systemd/nearpath-edge-node.service")).unwrap()
    );
    assert_eq!(
        read("etc/nearpath/edge-node.toml"),
        std::fs::read(repo.join("config/examples/edge-node.toml")).unwrap()
    );
    let unit = String::from_utf8(read("lib/systemd/system/nearpath-edge-node.service")).unwrap();
    checks::documented_pages_are_shipped(&unit, &entries);
    let version = checks::run(
        std::process::Command::new(root.path().join("usr/bin/edge-node")).arg("--version"),
    );
    assert_eq!(
        version.trim(),
        format!("edge-node {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn edge_node_unit_passes_systemd_analyze_verify_and_stays_hardened() {
    if !checks::have_tool("systemd-analyze", &["--version"], "the systemd units") {
        return;
    }
    let repo = repo();
    // The unit as installed, with its ExecStart binary, which verify requires to exist.
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let units = root.path().join("lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
    let bin = root.path().join("usr/bin/edge-node");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_edge-node"), &bin).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_edge-node"), &bin).unwrap();
    }
    std::fs::copy(
        repo.join("deploy/systemd/nearpath-edge-node.service"),
        units.join("nearpath-edge-node.service"),
    )
    .unwrap();
    // 2.1 of 10 when written (GPU devices stay visible, games may JIT); 2.5 is the top of
    // systemd's "OK" band.
    checks::verify_unit(root.path(), "nearpath-edge-node.service", 25);

    let unit = std::fs::read_to_string(units.join("nearpath-edge-node.service")).unwrap();
    for required in [
        "DynamicUser=yes",
        "StateDirectory=nearpath",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=",
        "SystemCallFilter=@system-service",
        "Restart=on-failure",
    ] {
        assert!(
            unit.contains(required),
            "{required:?} missing from the unit"
        );
    }
}
