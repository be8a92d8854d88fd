//! `bench relay-overload`: the relay past saturation.

use super::*;

/// `bench relay-overload`: the relay past saturation. Runs `factor` times the relay's capacity
/// through the gateway and reports what the players got: delivered-frame latency and the frames
/// each session lost (the gateway drops frames rather than queue them; its drop counters by
/// reason are read from `/metrics`).
pub async fn run_overload(a: RelayOverloadArgs) -> anyhow::Result<()> {
    if !(a.factor.is_finite() && a.factor > 0.0) {
        bail!("--factor must be positive, got {}", a.factor);
    }
    let capacity = if a.measure {
        let found = capacity_report(&a.run).await?;
        if found == 0 {
            bail!("relay-capacity found no clean session count to overload");
        }
        found
    } else {
        a.run.sessions.max(1)
    };
    let n = (f64::from(capacity) * a.factor).ceil() as u32;
    let plan = Arc::new(FramePlan::new(&a.run.shape, 1)?);
    let priority = Priority::apply(a.run.nice)?;
    println!(
        "relay-overload: {n} sessions = {} x capacity {capacity} ({}); {}; {} run(s) of {} s measured after {} s warm-up; {}",
        a.factor,
        if a.measure { "measured above" } else { "from --sessions" },
        describe_plan(&plan),
        a.run.repeats.max(1),
        a.run.seconds,
        a.run.warmup_seconds,
        describe_placement(&a.run.placement, &priority)
    );
    println!(
        "  delivered = frames the players received whole; missing = dropped anywhere (the gateway drops late or over-budget frames, never queues them)"
    );
    let mut runs = Vec::new();
    for _ in 0..a.run.repeats.max(1) {
        let r = capacity_run(&a.run, &plan, n, Mode::Gateway)
            .await
            .with_context(|| format!("{n} sessions through the gateway"))?;
        print_run(&r);
        let m = r.missing_summary();
        println!(
            "    delivered {}/{} frames: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; missing per session: min {:.0} p50 {:.0} max {:.0} (of {} each); gateway drops by reason: {}",
            r.window.received,
            r.window.expected,
            r.window.lat.p50 / 1e3,
            r.window.lat.p99 / 1e3,
            r.window.lat.max / 1e3,
            m.min,
            m.p50,
            m.max,
            r.window.expected / u64::from(n.max(1)),
            r.gw_dropped_by
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        runs.push(r);
    }
    let p99_ms = Repeated::new(runs.iter().map(|r| r.window.lat.p99 / 1e3).collect());
    let met = runs
        .iter()
        .all(|r| r.window.lat.p99 / 1e3 <= a.target_p99_ms);
    println!(
        "  delivered-frame p99 {} ms at {n} sessions ({}x capacity {capacity}) (target <= {} ms: {})",
        p99_ms.show(1),
        a.factor,
        a.target_p99_ms,
        verdict(met)
    );
    let summary = json!({
        "bench": "relay-overload",
        "params": {"factor": a.factor, "capacity": capacity, "capacity_measured": a.measure, "sessions": n,
                   "seconds": a.run.seconds, "warmup_seconds": a.run.warmup_seconds, "repeats": a.run.repeats.max(1),
                   "sessions_per_node": a.run.sessions_per_node, "fps": plan.fps(), "kbps": num(plan.kbps()),
                   "placement": describe_placement(&a.run.placement, &priority)},
        "target_p99_ms": a.target_p99_ms,
        "target_met": met,
        "runs": runs.iter().map(CapRun::to_json).collect::<Vec<_>>(),
    });
    println!("{summary}");
    Ok(())
}
