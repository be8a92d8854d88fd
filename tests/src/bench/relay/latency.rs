//! `bench relay-latency`: one session's frames through the gateway, directly and through the
//! bare relay, at the same time.

use super::*;

pub(super) const PATHS: [&str; 3] = ["gateway", "direct", "bare relay"];

pub async fn run_latency(a: RelayLatencyArgs) -> anyhow::Result<()> {
    let plan = Arc::new(FramePlan::new(&a.shape, 1)?);
    let load_start = loadavg_1m();
    let priority = Priority::apply(a.nice)?;
    let gw_proc = start_gateway(&a.placement, Liveness::default(), 4096)?;
    renice_gateway(&gw_proc, a.nice)?;
    let stop = CancellationToken::new();
    let result = latency_inner(&a, plan, &gw_proc, load_start, &priority, stop.clone()).await;
    stop.cancel();
    stop_all(vec![gw_proc.child]).await;
    result
}

pub(super) async fn latency_inner(
    a: &RelayLatencyArgs,
    plan: Arc<FramePlan>,
    gw_proc: &GatewayProc,
    load_start: f64,
    priority: &Priority,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let gw = Gw::of(gw_proc)?;
    let p = &a.placement;
    let udp = udp_picture();
    let endpoint = node_endpoint()?;
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel();
    let node_conn =
        connect_node(&endpoint, &gw, "bench-node-0", 4, opened_tx, stop.clone()).await?;
    let params = play_params(&a.shape);

    // Path A: through the gateway.
    let a_player = play(gw.quic, gw.sha, &gw.api_key, params.clone()).await?;
    let mut pending = HashMap::new();
    let a_node = opened_session(&mut opened_rx, &mut pending, a_player.session_id).await?;

    // Path B: the same process serving the player directly.
    let direct = DirectServer::start(&[ALPN_CLIENT])?;
    let mut direct_rx = accept_players(direct.endpoint.clone(), 1, DIRECT_SESSION_BASE);
    let b_player = play(direct.addr, direct.sha, "unused", params.clone()).await?;
    let b_node = direct_rx
        .recv()
        .await
        .ok_or_else(|| anyhow!("the direct server stopped"))??;

    // Path C: the relay code alone.
    let bare = if a.no_bare {
        None
    } else {
        let relay = BareRelay::start(parse_cpus(&p.gateway_cpus())?)?;
        let c_player = play(relay.addr, relay.sha, "unused", params.clone()).await?;
        let cfg = client_config(ServerVerify::PinnedSha256(relay.sha), &[ALPN_NODE])?;
        let conn = endpoint
            .connect_with(cfg, relay.addr, "localhost")?
            .await
            .context("node connecting to the bare relay")?;
        Some((relay, c_player, conn))
    };

    let fps = plan.fps() as f64;
    let warm = (a.warmup_seconds * fps).round() as u64;
    let window_frames = ((a.seconds * fps).round() as u64).max(1);
    let windows = a.repeats.max(1) as u64;
    let frames = warm + window_frames * windows;
    let size = (params.width as u16, params.height as u16);
    println!(
        "relay-latency: {}; {} window(s) of {} s after {} s warm-up; {}",
        describe_plan(&plan),
        windows,
        a.seconds,
        a.warmup_seconds,
        describe_placement(p, priority)
    );
    println!(
        "  paths: gateway = fake node -> gateway child -> Client::play; direct = the same fake node's own QUIC server -> Client::play, \
         same frames at the same time (send order alternates per frame){}",
        if bare.is_some() {
            "; bare relay = the fake node -> relay_frame in a bare quinn relay thread on the gateway's CPU -> Client::play, \
             half a frame interval later so it never contends with the gateway"
        } else {
            ""
        }
    );
    println!(
        "  UDP: net.core.rmem_max {} B; a {} B receive-buffer request (the gateway's quic.recv_buffer_bytes) is granted {} B (Linux reports double)",
        opt(udp.rmem_max),
        GATEWAY_RECV_BUFFER,
        opt(udp.granted)
    );

    let start = Instant::now() + Duration::from_millis(200);
    let legs = vec![
        Leg {
            conn: a_node.conn.clone(),
            session_id: a_player.session_id,
        },
        Leg {
            conn: b_node.conn.clone(),
            session_id: b_node.session_id,
        },
    ];
    let mut senders = vec![tokio::spawn(pace(
        plan.clone(),
        legs,
        start,
        frames,
        0,
        size,
    ))];
    let end = start + plan.due(frames);
    let mut receivers = vec![
        tokio::spawn(collect(a_player.frames, frames - 1, end)),
        tokio::spawn(collect(b_player.frames, frames - 1, end)),
    ];
    let mut keep = Vec::new();
    if let Some((relay, c_player, conn)) = bare {
        let legs = vec![Leg {
            conn: conn.clone(),
            session_id: BARE_SESSION,
        }];
        senders.push(tokio::spawn(pace(
            plan.clone(),
            legs,
            start + plan.interval() / 2,
            frames,
            0,
            size,
        )));
        receivers.push(tokio::spawn(collect(c_player.frames, frames - 1, end)));
        keep.push((relay, conn, c_player._control, c_player._client));
    }
    // CPU of the gateway and of this process over the measured windows only.
    tokio::time::sleep_until(start + plan.due(warm)).await;
    let gw_cpu = CpuMeter::start(gw.pid)?;
    let gen_cpu = CpuMeter::start(std::process::id())?;
    let mut window_load = Vec::new();
    for w in 1..=windows {
        tokio::time::sleep_until(start + plan.due(warm + window_frames * w)).await;
        window_load.push(loadavg_1m());
    }
    let (gw_cpu, gen_cpu) = (gw_cpu.percent()?, gen_cpu.percent()?);
    let mut sent = Vec::new();
    for s in senders {
        sent.push(s.await?);
    }
    let mut logs = Vec::new();
    for (i, r) in receivers.into_iter().enumerate() {
        let mut log = r.await?;
        // The gateway and direct players share the first sender; the bare relay's has its own.
        log.not_sent = sent[usize::from(i >= 2)].skipped.iter().copied().collect();
        logs.push(log);
    }
    let metrics = gateway_metrics(gw.admin).await.unwrap_or_default();
    let gw_dropped = metric_sum(&metrics, "nearpath_game_frames_dropped_total");
    let load_end = loadavg_1m();

    let late_us = 1e6 / fps;
    let n_paths = logs.len();
    // [path][figure] over windows: p50, p99, max.
    let mut fig: Vec<[Vec<f64>; 3]> = vec![Default::default(); n_paths];
    let mut added = [Vec::new(), Vec::new(), Vec::new()];
    let mut ratio = Vec::new();
    let mut per_window = Vec::new();
    for w in 0..windows {
        let (from, to) = (warm + w * window_frames, warm + (w + 1) * window_frames);
        let ws: Vec<Window> = logs
            .iter()
            .map(|l| Window::of_one(l, from, to, late_us))
            .collect();
        for (i, s) in ws.iter().enumerate() {
            fig[i][0].push(s.lat.p50);
            fig[i][1].push(s.lat.p99);
            fig[i][2].push(s.lat.max);
        }
        added[0].push(ws[0].lat.p50 - ws[1].lat.p50);
        added[1].push(ws[0].lat.p99 - ws[1].lat.p99);
        added[2].push(ws[0].lat.max - ws[1].lat.max);
        ratio.push(ws[0].lat.p50 / ws[1].lat.p50);
        println!(
            "  window {}: p50/p99 us gateway {:.0}/{:.0}, direct {:.0}/{:.0}{}; added p50 {:.0} us; missing {}/{}; load {:.2}",
            w + 1,
            ws[0].lat.p50,
            ws[0].lat.p99,
            ws[1].lat.p50,
            ws[1].lat.p99,
            ws.get(2).map(|c| format!(", bare relay {:.0}/{:.0}", c.lat.p50, c.lat.p99)).unwrap_or_default(),
            ws[0].lat.p50 - ws[1].lat.p50,
            ws[0].missing(),
            ws[1].missing(),
            window_load[w as usize]
        );
        per_window.push(json!({
            "window": w + 1,
            "paths": ws.iter().enumerate().map(|(i, s)| json!({"path": PATHS[i], "stats": s.to_json()})).collect::<Vec<_>>(),
            "loadavg_1m": num(window_load[w as usize]),
        }));
    }
    let rep = |v: &Vec<f64>| Repeated::new(v.clone());
    let mut header = vec!["median over windows [min .. max], us"];
    header.extend(PATHS.iter().copied().take(n_paths));
    header.extend(["added (gateway - direct)", "target", ""]);
    let mut t = Table::new(&header);
    let targets = [Some(150.0), Some(1000.0), None];
    for (k, name) in ["p50", "p99", "max"].iter().enumerate() {
        let mut row = vec![(*name).to_string()];
        row.extend(fig.iter().map(|f| rep(&f[k]).show(0)));
        row.push(rep(&added[k]).show(0));
        row.push(targets[k].map(|x| format!("<= {x}")).unwrap_or_default());
        row.push(
            targets[k]
                .map(|x| verdict(rep(&added[k]).median() <= x).to_string())
                .unwrap_or_default(),
        );
        t.row(row);
    }
    let mut row = vec!["ratio p50 (gateway / direct)".to_string()];
    row.extend(std::iter::repeat_n(String::new(), n_paths));
    row.push(rep(&ratio).show(2));
    t.row(row);
    println!();
    t.print();
    let total_from = warm;
    let total_to = warm + windows * window_frames;
    let mut pooled = Vec::new();
    for (i, l) in logs.iter().enumerate() {
        let s = Window::of_one(l, total_from, total_to, late_us);
        let sl = &sent[if i < 2 { 0 } else { 1 }];
        println!(
            "  {:<10} all windows: p5 {:.0} p50 {:.0} p95 {:.0} p99 {:.0} max {:.0} us (n {}); IDR p50 {:.0} us, P p50 {:.0} us; late (> {:.1} ms) {}, missing {}, frame errors {}{}",
            PATHS[i],
            s.lat.p5,
            s.lat.p50,
            s.lat.p95,
            s.lat.p99,
            s.lat.max,
            s.lat.n,
            s.idr_p50,
            s.p_p50,
            late_us / 1e3,
            s.late,
            s.missing(),
            l.errors,
            l.first_error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
        );
        if sl.errors > 0 || !sl.skipped.is_empty() {
            println!(
                "  {:<10} send errors {} {}; frames the generator skipped (it had fallen a frame behind) {}",
                PATHS[i],
                sl.errors,
                sl.first_error.as_deref().unwrap_or(""),
                sl.skipped.len()
            );
        }
        pooled.push(
            json!({"path": PATHS[i], "stats": s.to_json(), "frame_errors": l.errors,
                           "generator_skipped": sl.skipped.len()}),
        );
    }
    let mut wake = sent
        .iter()
        .flat_map(|s| s.wake_late_us.iter().copied())
        .collect::<Vec<_>>();
    let wake = Summary::of(&mut wake);
    println!(
        "  gateway CPU {:.1}% of a core, this process {:.1}%; gateway dropped {} frames (metric); sender wake-up lag p50 {:.0} us p99 {:.0} us; load average (1 min) {:.2} -> {:.2}",
        gw_cpu, gen_cpu, gw_dropped, wake.p50, wake.p99, load_start, load_end
    );
    let added_r: Vec<Repeated> = added.iter().map(rep).collect();
    let summary = json!({
        "bench": "relay-latency",
        "params": {"seconds": a.seconds, "windows": windows, "warmup_seconds": a.warmup_seconds, "fps": plan.fps(),
                   "kbps": num(plan.kbps()), "idr_bytes": plan.sizes[0], "gop_frames": plan.gop(),
                   "p_frame_mean_bytes": num(plan.mean_p_bytes()), "placement": describe_placement(p, priority)},
        "added_us": {"p50": added_r[0].to_json(), "p99": added_r[1].to_json(), "max": added_r[2].to_json()},
        "ratio_p50": rep(&ratio).to_json(),
        "paths": fig.iter().enumerate().map(|(i, f)| json!({"path": PATHS[i], "p50_us": rep(&f[0]).to_json(),
                  "p99_us": rep(&f[1]).to_json(), "max_us": rep(&f[2]).to_json()})).collect::<Vec<_>>(),
        "pooled": pooled,
        "per_window": per_window,
        "targets_met": {"added_p50_le_150us": added_r[0].median() <= 150.0, "added_p99_le_1ms": added_r[1].median() <= 1000.0},
        "gateway_cpu_percent": num(gw_cpu),
        "generator_cpu_percent": num(gen_cpu),
        "gateway_frames_dropped": num(gw_dropped),
        "udp": {"rmem_max": udp.rmem_max, "granted_for_4mib_request": udp.granted},
        "loadavg_1m": [num(load_start), num(load_end)],
    });
    println!("{summary}");
    drop(a_player._control);
    drop(a_player._client);
    sessions_ended(gw.admin).await;
    drop(a_node);
    drop(keep);
    drop(node_conn);
    Ok(())
}
