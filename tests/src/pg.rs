//! A throwaway PostgreSQL server for tests: [`PgServer`].
//!
//! Each server is a fresh cluster (`initdb`) in a temporary directory, listening on a free
//! 127.0.0.1 port with its unix socket inside that directory, tuned for speed over durability
//! (`fsync=off`, small `shared_buffers`). Tests isolate themselves with
//! [`PgServer::new_database`]; one server per test binary ([`PgServer::shared`]) keeps them fast.
//!
//! `initdb` and `postgres` refuse to run as root, so when the tests run as root the server runs
//! as `nobody` (the directory is chowned to it). The server is started by a small `sh` watchdog
//! that holds a pipe from this process: when the pipe closes (on [`Drop`], or when the test
//! process exits, which is the only end a `static` shared server gets) the watchdog stops
//! PostgreSQL with an immediate shutdown and removes the directory, so no server outlives its
//! tests.
//!
//! When PostgreSQL is not installed, [`PgServer::available`] prints why and returns false, so
//! tests skip; with `CI` set it panics instead, because CI installs PostgreSQL (`.ci/run`).

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a fresh server may take to accept connections (initdb excluded). Generous: the CI
/// machine has two cores shared with compilers.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the readiness probe retries a connect.
const READY_POLL: Duration = Duration::from_millis(25);

/// The superuser `initdb` creates; connections use trust authentication on loopback.
const SUPERUSER: &str = "postgres";

/// A running throwaway PostgreSQL server, stopped and deleted on drop.
pub struct PgServer {
    port: u16,
    dir: PathBuf,
    /// The watchdog; its stdin is the pipe whose closing stops the server.
    watchdog: Option<Child>,
}

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PgServerError {
    #[error("PostgreSQL is not installed: {0}")]
    NotInstalled(String),
    #[error("starting PostgreSQL failed: {0}")]
    Start(String),
}

impl PgServer {
    /// Starts a fresh server. Panics with the reason when it cannot (PostgreSQL missing
    /// included): call [`PgServer::available`] first in tests that should skip instead.
    pub fn start() -> PgServer {
        match PgServer::try_start() {
            Ok(server) => server,
            Err(e) => panic!("{e}"),
        }
    }

    /// The server shared by every test of this binary, started on first use; `None` (after
    /// printing why) when PostgreSQL is not installed and `CI` is not set.
    pub fn shared() -> Option<&'static PgServer> {
        static SHARED: OnceLock<PgServer> = OnceLock::new();
        if !PgServer::available() {
            return None;
        }
        Some(SHARED.get_or_init(PgServer::start))
    }

    /// True when PostgreSQL's binaries are installed. When they are not: panics if `CI` is set
    /// (CI must run these tests), else prints the reason for skipping and returns false.
    pub fn available() -> bool {
        match bindir() {
            Ok(_) => true,
            Err(reason) => {
                if std::env::var_os("CI").is_some() {
                    panic!(
                        "PostgreSQL is required when CI is set: {reason} (install the \
                         `postgresql` package; .ci/run does)"
                    );
                }
                eprintln!("skipping: PostgreSQL is not installed ({reason})");
                false
            }
        }
    }

    /// Starts a fresh server, or says why it could not.
    pub fn try_start() -> Result<PgServer, PgServerError> {
        PgServer::try_start_with(None)
    }

    /// A fresh server that also accepts TLS (`ssl = on`) with the certificate chain and key in
    /// the PEM texts `tls` (plain connections are still accepted, so the harness's own
    /// connections work unchanged).
    pub fn try_start_tls(cert_pem: &str, key_pem: &str) -> Result<PgServer, PgServerError> {
        PgServer::try_start_with(Some((cert_pem, key_pem)))
    }

    fn try_start_with(tls: Option<(&str, &str)>) -> Result<PgServer, PgServerError> {
        let bin = bindir().map_err(PgServerError::NotInstalled)?;
        let dir = tempfile::Builder::new()
            .prefix("nearpath-pg-")
            .tempdir()
            .map_err(|e| PgServerError::Start(format!("temp dir: {e}")))?
            // The watchdog deletes it once the server has stopped.
            .keep();
        let as_user = unprivileged_user();
        if let Some((uid, gid)) = as_user {
            chown(&dir, uid, gid).map_err(|e| PgServerError::Start(format!("chown: {e}")))?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| PgServerError::Start(format!("chmod: {e}")))?;
        let data = dir.join("data");

        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"])
            .stdin(Stdio::null());
        if let Some((uid, gid)) = as_user {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb
            .output()
            .map_err(|e| PgServerError::Start(format!("initdb: {e}")))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(PgServerError::Start(format!(
                "initdb failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }

        if let Some((cert, key)) = tls {
            // The server refuses a key file others may read, or one it does not own.
            let write = |name: &str, text: &str| -> std::io::Result<()> {
                let path = data.join(name);
                std::fs::write(&path, text)?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                if let Some((uid, gid)) = as_user {
                    chown(&path, uid, gid)?;
                }
                Ok(())
            };
            let conf = "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n";
            write("server.crt", cert)
                .and_then(|()| write("server.key", key))
                .and_then(|()| {
                    use std::io::Write as _;
                    std::fs::OpenOptions::new()
                        .append(true)
                        .open(data.join("postgresql.conf"))?
                        .write_all(conf.as_bytes())
                })
                .map_err(|e| PgServerError::Start(format!("TLS files: {e}")))?;
        }

        // The port is found by binding port 0 and releasing it; another process may take it in
        // between, so a failed start retries with a new port.
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port().map_err(|e| PgServerError::Start(format!("port: {e}")))?;
            let mut watchdog = spawn_watchdog(&bin, &dir, port, as_user)
                .map_err(|e| PgServerError::Start(format!("spawn: {e}")))?;
            match wait_ready(port, &mut watchdog) {
                Ok(()) => {
                    return Ok(PgServer {
                        port,
                        dir,
                        watchdog: Some(watchdog),
                    })
                }
                Err(e) => {
                    last_error = format!("{e}; log: {}", read_log(&dir));
                    drop(watchdog.stdin.take());
                    let _ = watchdog.wait();
                    if !dir.exists() {
                        break;
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Err(PgServerError::Start(last_error))
    }

    /// The URL of the server's `postgres` database (superuser, trust authentication).
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates a new empty database and returns its URL. The name is sanitised to
    /// `[a-z0-9_]` and suffixed with a per-process counter, so tests may reuse names and run in
    /// parallel against one server.
    pub fn new_database(&self, name: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut db: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        if db.is_empty() || db.starts_with(|c: char| c.is_ascii_digit()) {
            db.insert(0, 't');
        }
        let db = format!("{db}_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let admin = self.url();
        let statement = format!("CREATE DATABASE \"{db}\"");
        // The synchronous driver runs its own runtime, which may not be entered from inside a
        // tokio runtime: run it on a thread of its own so async tests can call this too.
        std::thread::spawn(move || -> Result<(), postgres::Error> {
            let mut client = postgres::Client::connect(&admin, postgres::NoTls)?;
            client.batch_execute(&statement)
        })
        .join()
        .expect("create database thread panicked")
        .unwrap_or_else(|e| panic!("CREATE DATABASE {db}: {e}"));
        self.url_for(&db)
    }

    fn url_for(&self, db: &str) -> String {
        format!("postgresql://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        read_log(&self.dir)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            // Closing the pipe tells the watchdog to stop the server and delete the directory.
            drop(watchdog.stdin.take());
            let _ = watchdog.wait();
        }
    }
}

/// The directory holding `initdb`, `postgres` and `pg_ctl`: `NEARPATH_PG_BINDIR`, else the newest
/// `/usr/lib/postgresql/<version>/bin`, else `pg_config --bindir`.
fn bindir() -> Result<PathBuf, String> {
    let has_server = |dir: &Path| dir.join("postgres").is_file() && dir.join("initdb").is_file();
    if let Some(dir) = std::env::var_os("NEARPATH_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "NEARPATH_PG_BINDIR={} has no postgres and initdb",
                dir.display()
            ))
        };
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    Err("no postgres/initdb in /usr/lib/postgresql/*/bin or `pg_config --bindir`".into())
}

/// `nobody`'s uid and gid when running as root (PostgreSQL refuses root), else `None`.
/// Read from `/proc/self` and `/etc/passwd` rather than libc, so that the gateway's tests,
/// which include this file, need no extra dependency.
fn unprivileged_user() -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    // `/proc/self` belongs to the process's effective user.
    let euid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok()?;
    if euid != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let nobody = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.as_slice() {
            ["nobody", _, uid, gid, ..] => Some((uid.parse().ok()?, gid.parse().ok()?)),
            _ => None,
        }
    });
    Some(nobody.unwrap_or((65534, 65534)))
}

fn chown(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `postgres` under an `sh` watchdog that stops it (immediate shutdown, which still
/// releases its shared memory) and removes `dir` when its stdin reaches end of file, and that
/// exits at once, keeping `dir`, when the server dies on its own.
fn spawn_watchdog(
    bin: &Path,
    dir: &Path,
    port: u16,
    as_user: Option<(u32, u32)>,
) -> std::io::Result<Child> {
    const SCRIPT: &str = r#"
dir="$1"; bin="$2"; port="$3"
"$bin/postgres" -D "$dir/data" -k "$dir" -p "$port" \
  -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
  -c full_page_writes=off -c shared_buffers=16MB -c max_connections=200 \
  -c max_wal_size=1GB -c log_min_messages=warning >>"$dir/postgres.log" 2>&1 &
pid=$!
# Waits until the test process closes the pipe or exits, then asks for the stop. The pipe is
# reached through fd 3 because sh gives every background list /dev/null as its stdin.
exec 3<&0
{ cat <&3 >/dev/null; touch "$dir/stop"; kill -QUIT "$pid" 2>/dev/null; } &
exec 3<&-
stopper=$!
wait "$pid"
status=$?
if [ -e "$dir/stop" ]; then
  rm -rf "$dir"
else
  # The server died on its own (a port taken meanwhile): keep the cluster for a retry.
  kill "$stopper" 2>/dev/null
fi
exit "$status"
"#;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(SCRIPT)
        .arg("nearpath-pg-watchdog")
        .arg(dir)
        .arg(bin)
        .arg(port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some((uid, gid)) = as_user {
        cmd.uid(uid).gid(gid);
    }
    // Its own process group, so a test runner's Ctrl-C on the foreground group does not race the
    // orderly stop (the closed pipe still stops it when the tests die).
    cmd.process_group(0);
    cmd.spawn()
}

/// Polls a connect until the server accepts one, the watchdog dies, or the timeout passes.
fn wait_ready(port: u16, watchdog: &mut Child) -> Result<(), String> {
    let url = format!("postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres?connect_timeout=2");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let probe = url.clone();
        let result = std::thread::spawn(move || {
            postgres::Client::connect(&probe, postgres::NoTls)
                .and_then(|mut c| c.simple_query("SELECT 1").map(|_| ()))
        })
        .join()
        .map_err(|_| "readiness probe panicked".to_string())?;
        match result {
            Ok(()) => return Ok(()),
            Err(e) => {
                if let Ok(Some(status)) = watchdog.try_wait() {
                    return Err(format!(
                        "postgres exited before accepting connections ({status})"
                    ));
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "not accepting connections after {READY_TIMEOUT:?}: {e}"
                    ));
                }
            }
        }
        std::thread::sleep(READY_POLL);
    }
}

fn read_log(dir: &Path) -> String {
    let mut log = String::new();
    if let Ok(mut f) = std::fs::File::open(dir.join("postgres.log")) {
        let _ = f.read_to_string(&mut log);
    }
    log
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query_one(url: &str, sql: &'static str) -> i32 {
        let url = url.to_string();
        std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            client.query_one(sql, &[]).unwrap().get::<_, i32>(0)
        })
        .join()
        .unwrap()
    }

    #[test]
    fn harness_databases_are_isolated_and_drop_removes_the_server() {
        if !PgServer::available() {
            return;
        }
        let server = PgServer::start();
        let a = server.new_database("Same Name!");
        let b = server.new_database("Same Name!");
        assert_ne!(a, b, "each call gets its own database");
        let url = a.clone();
        std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            client
                .batch_execute("CREATE TABLE only_in_a (x INT)")
                .unwrap();
        })
        .join()
        .unwrap();
        assert_eq!(
            query_one(
                &b,
                "SELECT count(*)::int FROM pg_tables WHERE tablename = 'only_in_a'"
            ),
            0
        );
        assert_eq!(query_one(&a, "SELECT 1"), 1);
        let dir = server.dir.clone();
        let port = server.port();
        drop(server);
        assert!(!dir.exists(), "drop removes the cluster directory");
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "drop stops the server"
        );
    }
}
