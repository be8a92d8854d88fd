//! Starting the system under test in child processes of this same binary and reading back the
//! one JSON line each prints when it is ready.

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
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
    lines: mpsc::Receiver<String>,
}

impl Child {
    /// Runs `bench <args>` and waits (bounded) for its ready line.
    pub fn spawn(name: &str, args: &[String], ready_within: Duration) -> anyhow::Result<Child> {
        let exe = std::env::current_exe().context("locating this executable")?;
        Self::spawn_program(name, exe.as_os_str(), args, ready_within)
    }

    /// Runs another program that keeps the same rules (one JSON ready line on stdout, stops
    /// when stdin closes), e.g. `tests/python/llama_server.py`.
    pub fn spawn_program(
        name: &str,
        program: &std::ffi::OsStr,
        args: &[String],
        ready_within: Duration,
    ) -> anyhow::Result<Child> {
        let mut proc = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {name} process"))?;
        let pid = proc.id();
        let stdout = proc
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{name}: no stdout pipe"))?;
        let (tx, rx) = mpsc::channel::<String>();
        // Forwards every line (the ready line, then answers to commands); reading continuously
        // means the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut child = Child {
            name: name.to_string(),
            pid,
            info: Value::Null,
            proc,
            lines: rx,
        };
        let line = match child.lines.recv_timeout(ready_within) {
            Ok(l) => l,
            Err(_) => {
                let status = child.proc.try_wait().ok().flatten();
                bail!("{name} (pid {pid}) was not ready within {ready_within:?} (exit status: {status:?})");
            }
        };
        child.info = serde_json::from_str(&line)
            .with_context(|| format!("{name} printed {line:?}, not its JSON ready line"))?;
        Ok(child)
    }

    /// Sends a command line (see `serve`) and returns its JSON answer.
    pub fn ask(&mut self, command: &str) -> anyhow::Result<Value> {
        let stdin = self
            .proc
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("{}: stdin already closed", self.name))?;
        writeln!(stdin, "{command}")
            .with_context(|| format!("{}: sending {command:?}", self.name))?;
        stdin.flush()?;
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| {
                anyhow!(
                    "{} (pid {}) did not answer {command:?}",
                    self.name,
                    self.pid
                )
            })?;
        serde_json::from_str(&line)
            .with_context(|| format!("{}: answer {line:?} is not JSON", self.name))
    }

    pub fn str(&self, key: &str) -> anyhow::Result<String> {
        self.info[key]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{}: ready line lacks {key:?}: {}", self.name, self.info))
    }

    pub fn addr(&self, key: &str) -> anyhow::Result<SocketAddr> {
        let s = self.str(key)?;
        s.parse()
            .with_context(|| format!("{}: {key} {s:?} is not an address", self.name))
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
        eprintln!(
            "{} (pid {}) did not stop within {grace:?}; killing it",
            self.name, self.pid
        );
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
