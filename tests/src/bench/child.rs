//! Starting the system under test in child processes of this same binary and reading back the
//! one JSON line each prints when it is ready.

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running child. Dropping it closes its stdin (the child's signal to stop), waits a little,
/// then kills it, so no child outlives the harness.
pub struct Child {
    pub name: String,
    pub pid: u32,
    pub info: Value,
    proc: std::process::Child,
}

impl Child {
    /// Runs `bench <args>` and waits (bounded) for its ready line.
    pub fn spawn(name: &str, args: &[String], ready_within: Duration) -> anyhow::Result<Child> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let mut proc = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {name} process"))?;
        let pid = proc.id();
        let stdout = proc.stdout.take().ok_or_else(|| anyhow!("{name}: no stdout pipe"))?;
        let (tx, rx) = mpsc::channel::<String>();
        // Reads the ready line, then keeps draining so later output never blocks the child.
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            for line in lines.map_while(Result::ok) {
                eprintln!("[child] {line}");
            }
        });
        let mut child = Child {
            name: name.to_string(),
            pid,
            info: Value::Null,
            proc,
        };
        let line = match rx.recv_timeout(ready_within) {
            Ok(l) => l,
            Err(_) => {
                let status = child.proc.try_wait().ok().flatten();
                bail!("{name} (pid {pid}) was not ready within {ready_within:?} (exit status: {status:?})");
            }
        };
        child.info = serde_json::from_str(&line).with_context(|| format!("{name} printed {line:?}, not its JSON ready line"))?;
        Ok(child)
    }

    pub fn str(&self, key: &str) -> anyhow::Result<String> {
        self.info[key]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{}: ready line lacks {key:?}: {}", self.name, self.info))
    }

    pub fn addr(&self, key: &str) -> anyhow::Result<SocketAddr> {
        let s = self.str(key)?;
        s.parse().with_context(|| format!("{}: {key} {s:?} is not an address", self.name))
    }

    /// Closes stdin and waits up to `grace` for a clean exit, then kills.
    pub fn stop(mut self, grace: Duration) {
        self.stop_inner(grace);
    }

    fn stop_inner(&mut self, grace: Duration) {
        drop(self.proc.stdin.take());
        let until = Instant::now() + grace;
        while Instant::now() < until {
            match self.proc.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("{} (pid {}) did not stop within {grace:?}; killing it", self.name, self.pid);
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if matches!(self.proc.try_wait(), Ok(None)) {
            self.stop_inner(Duration::from_secs(5));
        }
    }
}
