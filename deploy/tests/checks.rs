//! Checks shared by the packaging tests of the gateway (`gateway/cli/tests/packaging.rs`) and of
//! the edge node (`edge-node/tests/packaging.rs`), included in each with `#[path]`: each crate
//! checks its own package, because only there does cargo build (and name) its binaries.
//!
//! The tools (dpkg-deb, systemd-analyze) are Debian's; without them a test is skipped with the
//! reason printed, unless CI is set, where it fails: CI must run every check.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root, from a crate's manifest folder.
pub fn repo(manifest_dir: &str) -> PathBuf {
    let mut dir = PathBuf::from(manifest_dir);
    while !dir.join("deploy/build-deb.sh").exists() {
        assert!(dir.pop(), "no deploy/build-deb.sh above {manifest_dir}");
    }
    dir
}

/// Whether `tool` runs here. A missing tool skips the test (printing why) unless CI is set.
pub fn have_tool(tool: &str, args: &[&str], needed_for: &str) -> bool {
    let ok = Command::new(tool)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{tool} is missing and CI is set: {needed_for} must be checked in CI");
    }
    eprintln!("skipped: {tool} is not installed here, so {needed_for} is not checked");
    false
}

/// Runs a command; panics with its output unless it succeeds; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The `[package.metadata.deb]` table of a crate.
pub fn deb_metadata(crate_dir: &Path) -> toml::Table {
    let text = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    let manifest: toml::Table = toml::from_str(&text).unwrap();
    manifest["package"]["metadata"]["deb"]
        .as_table()
        .expect("[package.metadata.deb]")
        .clone()
}

/// `deploy/build-deb.sh PACKAGE BIN_DIR OUT_DIR`: the .deb's path.
pub fn build_deb(repo: &Path, package: &str, bin_dir: &Path, out_dir: &Path) -> PathBuf {
    let stdout = run(Command::new(repo.join("deploy/build-deb.sh"))
        .args([package])
        .arg(bin_dir)
        .arg(out_dir));
    PathBuf::from(stdout.trim())
}

/// One line of `dpkg-deb --contents`: mode string, owner, path (without the leading `./`).
pub struct Entry {
    pub mode: String,
    pub owner: String,
    pub path: String,
}

pub fn contents(deb: &Path) -> Vec<Entry> {
    run(Command::new("dpkg-deb").arg("--contents").arg(deb))
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Entry {
                mode: f[0].to_string(),
                owner: f[1].to_string(),
                path: f[5].trim_start_matches("./").to_string(),
            }
        })
        .collect()
}

/// `rwxr-xr-x` as 0o755.
pub fn mode_bits(mode: &str) -> u32 {
    mode.chars()
        .skip(1)
        .fold(0, |acc, c| (acc << 1) | u32::from(c != '-'))
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            let Some(rest) = name.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .filter(|&i| rest.is_char_boundary(i))
                .any(|i| glob_match(tail, &rest[i..]))
        }
    }
}

/// The package holds every asset of the metadata (a folder destination: at least one file
/// matching the source's name), each with the metadata's mode, owned by root; its control fields
/// are the metadata's; its conffiles are its files under /etc.
pub fn check_deb(deb: &Path, metadata: &toml::Table, version: &str) {
    let entries = contents(deb);
    for asset in metadata["assets"].as_array().unwrap() {
        let asset: Vec<&str> = asset
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let (src, dest, mode) = (asset[0], asset[1], asset[2]);
        let want_mode = u32::from_str_radix(mode, 8).unwrap();
        let src_name = src.rsplit('/').next().unwrap();
        let matching: Vec<&Entry> = entries
            .iter()
            .filter(|e| match dest.strip_suffix('/') {
                Some(dir) => e
                    .path
                    .strip_prefix(dir)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .is_some_and(|name| !name.contains('/') && glob_match(src_name, name)),
                None => e.path == dest,
            })
            .filter(|e| !e.mode.starts_with('d'))
            .collect();
        assert!(
            !matching.is_empty(),
            "{}: asset {src} -> {dest} is missing",
            deb.display()
        );
        for e in matching {
            assert_eq!(
                mode_bits(&e.mode),
                want_mode,
                "{}: mode of {}",
                deb.display(),
                e.path
            );
            assert_eq!(
                e.owner,
                "root/root",
                "{}: owner of {}",
                deb.display(),
                e.path
            );
        }
    }

    let field = |name: &str| -> String {
        run(Command::new("dpkg-deb").arg("--field").arg(deb).arg(name))
            .trim()
            .to_string()
    };
    let meta = |key: &str| metadata[key].as_str().unwrap().to_string();
    assert_eq!(field("Package"), meta("name"));
    assert_eq!(field("Version"), format!("{version}-{}", meta("revision")));
    let arch = run(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(field("Architecture"), arch.trim());
    assert_eq!(field("Depends"), meta("depends"));
    assert_eq!(field("Maintainer"), meta("maintainer"));
    assert_eq!(field("Section"), meta("section"));
    let description = field("Description");
    let synopsis = description.lines().next().unwrap();
    assert!(
        !synopsis.is_empty() && synopsis.len() <= 80,
        "synopsis: {synopsis:?}"
    );
    assert!(description.lines().count() > 1, "no extended description");
    assert!(field("Installed-Size").parse::<u64>().unwrap() > 0);

    let conffiles = run(Command::new("dpkg-deb")
        .arg("--info")
        .arg(deb)
        .arg("conffiles"));
    let mut declared: Vec<String> = metadata["conf-files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    declared.sort();
    let mut got: Vec<String> = conffiles.lines().map(str::to_string).collect();
    got.sort();
    assert_eq!(got, declared, "conffiles");
    let under_etc: Vec<String> = entries
        .iter()
        .filter(|e| e.path.starts_with("etc/") && !e.mode.starts_with('d'))
        .map(|e| format!("/{}", e.path))
        .collect();
    assert_eq!(
        under_etc.len(),
        got.len(),
        "every file under /etc is a conffile"
    );
}

/// Extracts the package into `dir`.
pub fn extract(deb: &Path, dir: &Path) {
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir));
}

/// `systemd-analyze verify` of `unit` as installed under `root` (the unit in lib/systemd/system,
/// its ExecStart binary in usr/bin): no error and no warning about the unit (the tool exits 0 on
/// unknown keys and unparsable values, printing a warning, so the output is checked too), and
/// `systemd-analyze security` rates its exposure at most `max_exposure` (0-100, shown as 0.0-10.0).
///
/// The host's own units are copied into `root` so that the default dependencies
/// (sysinit.target, ...) resolve there.
pub fn verify_unit(root: &Path, unit: &str, max_exposure: u32) {
    let units = root.join("lib/systemd/system");
    for host_units in ["/lib/systemd/system", "/usr/lib/systemd/system"] {
        let Ok(dir) = std::fs::read_dir(host_units) else {
            continue;
        };
        for entry in dir.flatten() {
            let to = units.join(entry.file_name());
            if !to.exists() && entry.file_type().is_ok_and(|t| t.is_file()) {
                let _ = std::fs::copy(entry.path(), to);
            }
        }
        break;
    }
    assert!(units.join(unit).is_file(), "{unit} is not installed");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .arg(unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stem = unit.trim_end_matches(".service");
    let about_unit: Vec<&str> = stderr.lines().filter(|l| l.contains(stem)).collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify {unit} ({}):\n{stderr}",
        out.status
    );
    if !stderr.trim().is_empty() {
        eprintln!("systemd-analyze verify, about other units:\n{stderr}");
    }
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--threshold={max_exposure}"))
        .arg(format!("--root={}", root.display()))
        .arg(unit)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let level = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("no exposure level")
        .to_string();
    eprintln!("{level}");
    assert!(
        out.status.success(),
        "{unit}: exposure above {max_exposure}/100: {level}\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The unit's `Documentation=man:PAGE(1)` pages are in the package.
pub fn documented_pages_are_shipped(unit_text: &str, entries: &[Entry]) {
    for doc in unit_text
        .lines()
        .filter_map(|l| l.strip_prefix("Documentation="))
        .flat_map(str::split_whitespace)
    {
        let Some(page) = doc.strip_prefix("man:") else {
            continue;
        };
        let (name, section) = page.trim_end_matches(')').split_once('(').unwrap();
        let path = format!("usr/share/man/man{section}/{name}.{section}.gz");
        assert!(
            entries.iter().any(|e| e.path == path),
            "Documentation={doc}: {path} is not in the package"
        );
    }
}

#[test]
fn glob_match_stands_star_for_any_run() {
    assert!(glob_match("*.1.gz", "gateway-run.1.gz"));
    assert!(glob_match("*", "gateway"));
    assert!(!glob_match("*.1.gz", "gateway.1"));
    assert!(glob_match("a*b*c", "axxbyyc"));
    assert!(!glob_match("a*b*c", "axxbyy"));
    assert_eq!(mode_bits("-rwxr-xr-x"), 0o755);
    assert_eq!(mode_bits("-rw-r--r--"), 0o644);
}
