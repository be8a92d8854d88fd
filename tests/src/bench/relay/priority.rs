//! Scheduling priority of a run: renicing the gateway child and this process (autogroup
//! included), put back when the run ends.

use super::*;

/// Sets the nice value of every thread of process `pid` (Linux keeps one per thread; threads
/// started later inherit their creator's). Returns how many threads were changed.
pub fn renice(pid: u32, nice: i32) -> anyhow::Result<usize> {
    let dir = format!("/proc/{pid}/task");
    let mut changed = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let Some(tid) = entry?
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<libc::id_t>().ok())
        else {
            continue;
        };
        // SAFETY: setpriority takes plain integers; a thread that exited meanwhile fails with
        // ESRCH, which is ignored.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
        if rc == 0 {
            changed += 1;
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                bail!("setting nice {nice} on thread {tid} of process {pid}: {e}");
            }
        }
    }
    Ok(changed)
}

/// The nice value in the text of `/proc/<pid>/autogroup` (`/autogroup-36 nice 0`).
pub fn parse_autogroup_nice(text: &str) -> Option<i32> {
    let mut words = text.split_whitespace().skip_while(|w| *w != "nice");
    words.next()?;
    words.next()?.parse().ok()
}

/// This process's scheduling priority for a run, put back when dropped. Linux gives every
/// session (autogroup) a fair share of a CPU whatever its threads' nice values, so with
/// `kernel.sched_autogroup_enabled` a compile job in another session still takes half of the
/// gateway's core at any thread nice; the autogroup's own nice is set as well.
pub struct Priority {
    pub(super) nice: i32,
    pub(super) autogroup_before: Option<i32>,
}

pub(super) const AUTOGROUP: &str = "/proc/self/autogroup";

impl Priority {
    /// Sets `nice` on every thread of this process (the gateway started later inherits it)
    /// and on its autogroup when there is one; 0 changes nothing.
    pub fn apply(nice: i32) -> anyhow::Result<Priority> {
        let mut p = Priority {
            nice,
            autogroup_before: None,
        };
        if nice == 0 {
            return Ok(p);
        }
        renice(std::process::id(), nice)?;
        if let Some(before) = std::fs::read_to_string(AUTOGROUP)
            .ok()
            .as_deref()
            .and_then(parse_autogroup_nice)
        {
            std::fs::write(AUTOGROUP, nice.to_string())
                .with_context(|| format!("writing nice {nice} to {AUTOGROUP}"))?;
            p.autogroup_before = Some(before);
        }
        Ok(p)
    }

    pub fn describe(&self) -> String {
        match (self.nice, self.autogroup_before) {
            (0, _) => String::new(),
            (n, Some(_)) => {
                format!("; gateway and generator threads and their session's autogroup at nice {n}")
            }
            (n, None) => format!("; gateway and generator threads at nice {n}"),
        }
    }
}

impl Drop for Priority {
    fn drop(&mut self) {
        if let Some(before) = self.autogroup_before {
            let _ = std::fs::write(AUTOGROUP, before.to_string());
        }
    }
}

/// Renices the gateway child explicitly too, whichever thread spawned it.
pub(super) fn renice_gateway(gw: &GatewayProc, nice: i32) -> anyhow::Result<()> {
    if nice != 0 {
        renice(gw.child.pid, nice)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renice_reaches_every_thread_and_names_a_missing_process() {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            let _ = wait.recv();
        });
        // SAFETY: getpriority takes plain integers. Re-applying the value the threads already
        // have (inherited from this one) needs no privilege.
        let current = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let changed = renice(std::process::id(), current).unwrap();
        assert!(changed >= 2, "{changed} threads");
        release.send(()).unwrap();
        other.join().unwrap();
        assert!(renice(u32::MAX - 1, 0).is_err());
    }

    /// The machinery both benchmarks rest on: a paced stream sent by a fake node reaches
    /// `Client::play` through the bare relay and directly, every frame once, in order.

    #[test]
    fn autogroup_nice_is_read_from_its_proc_line() {
        assert_eq!(parse_autogroup_nice("/autogroup-36 nice 0\n"), Some(0));
        assert_eq!(parse_autogroup_nice("/autogroup-7 nice -20"), Some(-20));
        assert_eq!(parse_autogroup_nice("/autogroup-7"), None);
    }
}
