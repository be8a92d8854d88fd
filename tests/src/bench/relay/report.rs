//! Report helpers: descriptions of the run's plan and placement, per-frame CSV dumps.

use super::*;

pub(super) fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "?".into())
}

pub(super) fn describe_plan(plan: &FramePlan) -> String {
    format!(
        "720p{} at {:.0} kbit/s pre-encoded (IDR {} B every {} frames, P frames {:.0} B on average, {:.0} B per frame overall)",
        plan.fps(),
        plan.kbps(),
        plan.sizes[0],
        plan.gop(),
        plan.mean_p_bytes(),
        plan.mean_bytes()
    )
}

pub(super) fn describe_placement(p: &Placement, priority: &Priority) -> String {
    let mut nice = priority.describe();
    if let Some(q) = p.gateway_cpu_quota_percent {
        nice.push_str(&format!("; gateway under a CPU quota of {q}% of a core"));
    }
    if let Some(ms) = p.gateway_frame_budget_ms {
        nice.push_str(&format!("; game.frame_budget_ms {ms}"));
    }
    if let Some(b) = p.gateway_recv_buffer_bytes {
        nice.push_str(&format!("; quic.recv_buffer_bytes {b}"));
    }
    if p.no_pin {
        format!("unpinned{nice}")
    } else {
        format!(
            "gateway process on CPU {} ({} runtime thread(s)); fake nodes, direct server and players (the load generator) in this process on CPU {}{nice}",
            p.gateway_cpus, p.gateway_threads, p.worker_cpus
        )
    }
}

/// Writes `<dir>/relay-<name>-<unix time>.csv`: one line per received frame.
pub(super) fn dump_frames(
    dir: &std::path::Path,
    name: &str,
    logs: &[RecvLog],
) -> anyhow::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("relay-{name}-{}.csv", unix_micros() / 1_000_000));
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    writeln!(w, "player,seq,recv_at_us,latency_us,keyframe")?;
    for (i, log) in logs.iter().enumerate() {
        for g in &log.frames {
            writeln!(
                w,
                "{i},{},{},{},{}",
                g.seq,
                g.at_us,
                g.latency_us,
                u8::from(g.keyframe)
            )?;
        }
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    println!("  wrote {}", path.display());
    Ok(())
}
