//! What the harness reads from and asks of the operating system: a process's CPU time, resident
//! memory and thread count from `/proc`, the load average, CPU pinning and the open-file limit.

use std::io;
use std::path::PathBuf;
use std::time::Instant;

/// Why a `/proc` figure could not be read. The path names the process; a read error usually
/// means it has exited (retrying does not help), a parse error a kernel format we do not know.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: no parsable {what}", path.display())]
    Parse { path: PathBuf, what: &'static str },
}

fn read(path: PathBuf) -> Result<(String, PathBuf), ProcError> {
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok((s, path)),
        Err(source) => Err(ProcError::Read { path, source }),
    }
}

/// Memory and thread figures from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemStatus {
    /// Resident set size now.
    pub rss_kib: u64,
    /// Peak resident set size since the process started.
    pub hwm_kib: u64,
    pub threads: u64,
}

/// Parses the fields of `/proc/<pid>/status` the harness uses.
pub fn parse_status(text: &str) -> Option<MemStatus> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    };
    Some(MemStatus {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
        threads: field("Threads:")?,
    })
}

pub fn mem_status(pid: u32) -> Result<MemStatus, ProcError> {
    let (text, path) = read(PathBuf::from(format!("/proc/{pid}/status")))?;
    parse_status(&text).ok_or(ProcError::Parse {
        path,
        what: "VmRSS/VmHWM/Threads",
    })
}

/// User plus system CPU time in clock ticks, from the text of `/proc/<pid>/stat`. The command
/// name (field 2) may hold spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_stat_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    // After the name: state is field 3, utime field 14, stime field 15.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time (user + system) a process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64, ProcError> {
    let (text, path) = read(PathBuf::from(format!("/proc/{pid}/stat")))?;
    let ticks = parse_stat_ticks(&text).ok_or(ProcError::Parse {
        path,
        what: "utime/stime",
    })?;
    Ok(ticks as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The 1-minute load average (the machine is shared; noisy runs show up here).
pub fn loadavg_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// CPU use of one process over an interval: start a meter, read `percent` at the end.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    pid: u32,
    cpu0: f64,
    t0: Instant,
}

impl CpuMeter {
    pub fn start(pid: u32) -> Result<CpuMeter, ProcError> {
        Ok(CpuMeter {
            pid,
            cpu0: cpu_seconds(pid)?,
            t0: Instant::now(),
        })
    }

    /// Percent of one core used since `start` (100 = one core fully busy).
    pub fn percent(&self) -> Result<f64, ProcError> {
        let cpu = cpu_seconds(self.pid)? - self.cpu0;
        let wall = self.t0.elapsed().as_secs_f64();
        Ok(if wall > 0.0 { 100.0 * cpu / wall } else { 0.0 })
    }
}

/// Pins the calling thread (and every thread it starts afterwards) to `cpus`. Call it before
/// building a runtime so that all of the runtime's threads inherit it.
pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set, CPU_SET writes inside it for
    // indexes below CPU_SETSIZE (checked), and sched_setaffinity reads it for pid 0 (this thread).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            if c >= libc::CPU_SETSIZE as usize {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("CPU {c} is out of range"),
                ));
            }
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: as above; sched_getaffinity fills the set for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Raises the soft open-file limit towards `want` (capped at the hard limit); returns the
/// resulting (soft, hard) pair.
pub fn raise_nofile(want: u64) -> io::Result<(u64, u64)> {
    // SAFETY: getrlimit/setrlimit read and write the rlimit struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        let target = want.min(lim.rlim_max as u64);
        if (lim.rlim_cur as u64) < target {
            lim.rlim_cur = target as libc::rlim_t;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok((lim.rlim_cur as u64, lim.rlim_max as u64))
    }
}

/// The C heap as glibc's allocator sees it, in bytes: what the program holds, and what the
/// allocator keeps as free but does not return to the system (fragmentation, arena caches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeapStats {
    pub in_use: u64,
    pub free_held: u64,
    pub mmapped: u64,
}

/// This process's heap figures (glibc only; zeros elsewhere).
pub fn heap_stats() -> HeapStats {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters (it takes the arena locks).
        let m = unsafe { libc::mallinfo2() };
        HeapStats {
            in_use: (m.uordblks + m.hblkhd) as u64,
            free_held: m.fordblks as u64,
            mmapped: m.hblkhd as u64,
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    HeapStats::default()
}

/// Asks the allocator to give free memory back to the system (glibc only), so that a later
/// RSS reading shows what is really held.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// This process under a CPU quota of `percent` of one core, in 10 ms periods (a cgroup of its
/// own, v2 or v1's `cpu` controller); the cgroup is removed on drop, once the process has left
/// it. Needs root and a writable cgroup file system.
pub struct CpuQuota {
    dir: std::path::PathBuf,
    parent: std::path::PathBuf,
}

impl CpuQuota {
    pub fn enter(percent: u32) -> anyhow::Result<CpuQuota> {
        use anyhow::Context as _;
        if !(1..=100).contains(&percent) {
            anyhow::bail!("the CPU quota must be 1 to 100 percent of a core, got {percent}");
        }
        const PERIOD_US: u32 = 10_000;
        let quota_us = PERIOD_US * percent / 100;
        let name = format!("nearpath-bench-{}", std::process::id());
        let v1 = std::path::Path::new("/sys/fs/cgroup/cpu");
        let v2 = std::path::Path::new("/sys/fs/cgroup");
        let (parent, writes): (&std::path::Path, Vec<(&str, String)>) =
            if v1.join("cpu.cfs_quota_us").exists() {
                (
                    v1,
                    vec![
                        ("cpu.cfs_period_us", PERIOD_US.to_string()),
                        ("cpu.cfs_quota_us", quota_us.to_string()),
                    ],
                )
            } else {
                (v2, vec![("cpu.max", format!("{quota_us} {PERIOD_US}"))])
            };
        let dir = parent.join(&name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the cgroup {}", dir.display()))?;
        for (file, value) in writes {
            std::fs::write(dir.join(file), &value)
                .with_context(|| format!("writing {value} to {}/{file}", dir.display()))?;
        }
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("entering the cgroup {}", dir.display()))?;
        Ok(CpuQuota {
            dir,
            parent: parent.to_path_buf(),
        })
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // A cgroup with a process in it cannot be removed: leave it for the parent first.
        let _ = std::fs::write(
            self.parent.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_skip_a_command_name_with_spaces_and_parentheses() {
        // Fields after the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime ...
        let line = "4242 (a (weird) name) S 1 2 3 4 5 6 7 8 9 10 123 45 0 0 20 0 1 0";
        assert_eq!(parse_stat_ticks(line), Some(168));
        assert_eq!(parse_stat_ticks("4242 (x) S 1 2"), None);
    }

    #[test]
    fn status_fields_are_read_in_kib() {
        let text = "Name:\tbench\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nThreads:\t3\n";
        assert_eq!(
            parse_status(text),
            Some(MemStatus {
                rss_kib: 1024,
                hwm_kib: 2048,
                threads: 3
            })
        );
        assert_eq!(parse_status("Name:\tbench\n"), None);
    }

    #[test]
    fn this_process_has_memory_and_cpu_figures() {
        let pid = std::process::id();
        let m = mem_status(pid).unwrap();
        assert!(m.rss_kib > 0 && m.hwm_kib >= m.rss_kib, "{m:?}");
        // Burn a little CPU so the counter cannot stay at its start value by accident.
        let before = cpu_seconds(pid).unwrap();
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 50 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(cpu_seconds(pid).unwrap() > before);
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn heap_stats_see_a_live_allocation() {
        let before = heap_stats().in_use;
        let block = vec![1u8; 4 << 20];
        let during = heap_stats().in_use;
        std::hint::black_box(&block);
        assert!(during >= before + (4 << 20) - 4096, "{before} -> {during}");
        drop(block);
    }
}
