//! The nearpath-gateway Debian package, its systemd unit and the container image definition, as
//! CI checks them (README "Install from the Debian package"): the package is built from the
//! debug binaries by `deploy/build-deb.sh`, with the asset list cargo-deb uses for releases.

#[path = "../../../deploy/tests/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    checks::repo(env!("CARGO_MANIFEST_DIR"))
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_gateway"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn deb_of_the_gateway_ships_every_asset_and_control_field_of_its_cargo_deb_metadata() {
    if !checks::have_tool("dpkg-deb", &["--version"], "the Debian package")
        || !checks::have_tool("python3", &["-c", "import tomllib"], "the Debian package")
    {
        return;
    }
    let repo = repo();
    let out = tempfile::tempdir().unwrap();
    let deb = checks::build_deb(&repo, "gateway", &bin_dir(), out.path());
    let metadata = checks::deb_metadata(Path::new(env!("CARGO_MANIFEST_DIR")));
    checks::check_deb(&deb, &metadata, env!("CARGO_PKG_VERSION"));

    let entries = checks::contents(&deb);
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    for expected in [
        "usr/bin/gateway",
        "usr/bin/nearpath",
        "etc/nearpath/gateway.toml",
        "lib/systemd/system/nearpath-gateway.service",
        "usr/share/man/man1/gateway.1.gz",
        "usr/share/man/man1/gateway-run.1.gz",
        "usr/share/man/man1/gateway-geo-lookup.1.gz",
        "usr/share/man/man1/nearpath.1.gz",
        "usr/share/man/man1/nearpath-play.1.gz",
        "usr/share/bash-completion/completions/gateway",
        "usr/share/bash-completion/completions/nearpath",
        "usr/share/zsh/vendor-completions/_gateway",
        "usr/share/fish/vendor_completions.d/gateway.fish",
        "usr/share/doc/nearpath-gateway/copyright",
        "usr/share/doc/nearpath-gateway/NOTICE",
        "usr/share/doc/nearpath-gateway/NRO_LICENSE",
    ] {
        assert!(paths.contains(&expected), "{expected} missing: {paths:#?}");
    }

    let root = tempfile::tempdir().unwrap();
    checks::extract(&deb, root.path());
    let read = |p: &str| std::fs::read(root.path().join(p)).unwrap();
    assert_eq!(
        read("lib/systemd/system/nearpath-gateway.service"),
        std::fs::read(repo.join("deploy/systemd/nearpath-gateway.service")).unwrap()
    );
    assert_eq!(
        read("etc/nearpath/gateway.toml"),
        std::fs::read(repo.join("config/examples/gateway.toml")).unwrap()
    );
    let unit = String::from_utf8(read("lib/systemd/system/nearpath-gateway.service")).unwrap();
    checks::documented_pages_are_shipped(&unit, &entries);
    // The pages are the binary's own, gzipped.
    let page = checks::run(
        std::process::Command::new("gzip")
            .arg("-dc")
            .arg(root.path().join("usr/share/man/man1/gateway-run.1.gz")),
    );
    assert!(page.contains(".TH gateway-run 1"), "{page}");
    assert!(page.contains("Gateway config file"), "{page}");
    let bash = String::from_utf8(read("usr/share/bash-completion/completions/gateway")).unwrap();
    assert!(
        bash.contains("check-config") && bash.contains("_gateway"),
        "{bash}"
    );
    let copyright = String::from_utf8(read("usr/share/doc/nearpath-gateway/copyright")).unwrap();
    assert!(copyright.contains("Apache License"), "{copyright}");
    let notice = String::from_utf8(read("usr/share/doc/nearpath-gateway/NOTICE")).unwrap();
    assert!(notice.contains("nro.net"), "{notice}");
    // The packaged binary is the stripped build of this one and runs.
    let version = checks::run(
        std::process::Command::new(root.path().join("usr/bin/gateway")).arg("--version"),
    );
    assert_eq!(
        version.trim(),
        format!("gateway {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn gateway_unit_passes_systemd_analyze_verify_and_stays_hardened() {
    if !checks::have_tool("systemd-analyze", &["--version"], "the systemd units") {
        return;
    }
    let repo = repo();
    // The unit as installed, with its ExecStart binary, which verify requires to exist.
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let units = root.path().join("lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
    let bin = root.path().join("usr/bin/gateway");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_gateway"), &bin).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_gateway"), &bin).unwrap();
    }
    std::fs::copy(
        repo.join("deploy/systemd/nearpath-gateway.service"),
        units.join("nearpath-gateway.service"),
    )
    .unwrap();
    // 1.3 of 10 when written; 2.5 is the top of systemd's "OK" band.
    checks::verify_unit(root.path(), "nearpath-gateway.service", 25);

    let unit = std::fs::read_to_string(units.join("nearpath-gateway.service")).unwrap();
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

#[test]
fn dockerfile_copies_only_files_that_exist_and_runs_as_a_non_root_user() {
    let repo = repo();
    let dockerfile = std::fs::read_to_string(repo.join("Dockerfile")).unwrap();
    // Continuation lines joined, comments dropped: one instruction per line.
    let joined = dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let instructions: Vec<Vec<&str>> = joined
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| !w.is_empty())
        .collect();
    let froms: Vec<&str> = instructions
        .iter()
        .filter(|w| w[0] == "FROM")
        .map(|w| w[1])
        .collect();
    assert_eq!(
        froms.len(),
        2,
        "a build stage and a runtime stage: {froms:?}"
    );
    assert!(
        froms[0].starts_with("rust:") && froms[0].ends_with("bookworm"),
        "{froms:?}"
    );
    assert_eq!(froms[1], "debian:bookworm-slim");
    let mut copied = 0;
    for words in instructions.iter().filter(|w| w[0] == "COPY") {
        if words.iter().any(|w| w.starts_with("--from=")) {
            continue;
        }
        let args: Vec<&str> = words[1..]
            .iter()
            .filter(|w| !w.starts_with("--"))
            .copied()
            .collect();
        for src in &args[..args.len() - 1] {
            assert!(
                repo.join(src).exists(),
                "Dockerfile copies {src}, which does not exist"
            );
            copied += 1;
        }
    }
    assert!(copied >= 5, "{copied} sources");
    // Every crate it builds is a workspace member.
    let workspace = std::fs::read_to_string(repo.join("Cargo.toml")).unwrap();
    let mut built = 0;
    for words in instructions.iter().filter(|w| w[0] == "RUN") {
        // The cargo command only: from `cargo` to the next `&&`.
        let Some(start) = words.iter().position(|w| *w == "cargo") else {
            continue;
        };
        let cargo: Vec<&str> = words[start..]
            .iter()
            .take_while(|w| **w != "&&")
            .copied()
            .collect();
        for pair in cargo.windows(2).filter(|p| p[0] == "-p") {
            built += 1;
            let member = match pair[1] {
                "nearpath-gateway-cli" => "gateway/cli",
                "nearpath-edge-node" => "edge-node",
                other => panic!("Dockerfile builds unknown package {other}"),
            };
            assert!(workspace.contains(&format!("\"{member}\"")), "{member}");
        }
    }
    assert_eq!(built, 2, "the gateway's and the edge node's packages");
    let user = instructions
        .iter()
        .rfind(|w| w[0] == "USER")
        .expect("a USER instruction");
    assert!(user[1] != "root" && user[1] != "0", "runs as {}", user[1]);
    let ignore = std::fs::read_to_string(repo.join(".dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l.trim() == "target"),
        "target/ in the build context"
    );
}

/// The container image cannot be built here (no Docker daemon): its definition is linted
/// instead, with hadolint and the repository's `.hadolint.yaml` (README "Container image").
#[test]
fn hadolint_finds_nothing_in_the_dockerfile() {
    if !checks::have_tool("hadolint", &["--version"], "the Dockerfile") {
        return;
    }
    let repo = repo();
    checks::run(
        std::process::Command::new("hadolint")
            .arg("--no-color")
            .arg("--config")
            .arg(repo.join(".hadolint.yaml"))
            .arg(repo.join("Dockerfile")),
    );
}
