//! Records what `nearpath_build_info` reports: the git commit the gateway is built from and
//! the compiler's version. Outside a git checkout (a source tarball, a container build without
//! `.git`) the commit is `unknown`, unless `NEARPATH_GIT_SHA` is set by the packager.

use std::process::Command;

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=NEARPATH_GIT_SHA");
    println!("cargo:rerun-if-changed=build.rs");
    let sha = std::env::var("NEARPATH_GIT_SHA")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| output("git", &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // Rebuild when the checked-out commit moves: HEAD itself (a checkout) and the ref it
    // points at (a commit). `--git-path` finds both in worktrees too.
    // A path that does not exist would make cargo rerun this script on every build.
    let watch = |path: &str| {
        if let Some(p) = output("git", &["rev-parse", "--git-path", path]) {
            if std::path::Path::new(&p).exists() {
                println!("cargo:rerun-if-changed={p}");
            }
        }
    };
    watch("HEAD");
    watch("packed-refs");
    if let Some(r) = output("git", &["symbolic-ref", "-q", "HEAD"]) {
        watch(&r);
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = output(&rustc, &["--version"])
        // `rustc 1.xx.y (hash date)`: the version number is what dashboards group by.
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=NEARPATH_GIT_SHA={sha}");
    println!("cargo:rustc-env=NEARPATH_RUSTC_VERSION={version}");
}
