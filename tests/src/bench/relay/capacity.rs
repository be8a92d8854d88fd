//! `bench relay-capacity`: the session-count ramp, through the gateway and directly.

use super::*;

/// Whether the sessions went through the gateway or straight to the fake nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Gateway,
    Direct,
}

impl Mode {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Mode::Gateway => "gateway",
            Mode::Direct => "direct",
        }
    }
}

/// One capacity run: `n` sessions for warm-up plus the measured seconds.
#[derive(Debug, Clone)]
pub(super) struct CapRun {
    pub(super) n: u32,
    pub(super) mode: Mode,
    pub(super) window: Window,
    pub(super) frame_errors: u64,
    pub(super) send_errors: u64,
    /// Measured frames the generator skipped because it had fallen behind.
    pub(super) skipped: u64,
    pub(super) first_error: Option<String>,
    /// `nearpath_game_frames_dropped_total` over the whole run (gateway mode).
    pub(super) gw_dropped: f64,
    pub(super) gw_relayed: f64,
    /// Percent of one core over the measured interval.
    pub(super) gw_cpu: f64,
    pub(super) gen_cpu: f64,
    pub(super) wake: Summary,
    pub(super) rss_idle_kib: u64,
    pub(super) rss_peak_kib: u64,
    pub(super) gw_socket_drops: Option<u64>,
    pub(super) rcvbuf_errors: Option<u64>,
    pub(super) load: f64,
    /// Frames each player never received (dropped anywhere on the way), one entry per session.
    pub(super) missing_per_session: Vec<u64>,
    /// `nearpath_game_frames_dropped_total` by reason (gateway mode).
    pub(super) gw_dropped_by: Vec<(&'static str, f64)>,
    /// Each measured frame's interarrival time minus its capture interval, microseconds.
    pub(super) jitter_us: Vec<f64>,
}

impl CapRun {
    pub(super) fn clean(&self) -> bool {
        self.window.late == 0
            && self.window.missing() == 0
            && self.frame_errors == 0
            && self.send_errors == 0
            && self.skipped == 0
            && self.gw_dropped == 0.0
    }

    /// The generator could not keep up: nearly all of its core, or senders waking half a frame
    /// late (the timer's 1 ms granularity and other processes on a shared machine account for
    /// a few milliseconds of lag without that meaning much).
    pub(super) fn generator_bound(&self) -> bool {
        self.skipped > 0 || self.gen_cpu >= 90.0 || self.wake.p99 > 8_000.0
    }

    pub(super) fn missing_summary(&self) -> Summary {
        Summary::of(&mut self.missing_per_session.iter().map(|&m| m as f64).collect())
    }

    pub(super) fn rss_per_session_kib(&self) -> f64 {
        (self.rss_peak_kib as f64 - self.rss_idle_kib as f64) / self.n.max(1) as f64
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "sessions": self.n, "mode": self.mode.as_str(), "clean": self.clean(), "stats": self.window.to_json(),
            "frame_errors": self.frame_errors, "send_errors": self.send_errors, "generator_skipped": self.skipped, "first_error": self.first_error,
            "gateway_frames_dropped": num(self.gw_dropped), "gateway_frames_relayed": num(self.gw_relayed),
            "gateway_cpu_percent": num(self.gw_cpu), "gateway_cpu_percent_per_session": num(self.gw_cpu / self.n.max(1) as f64),
            "generator_cpu_percent": num(self.gen_cpu), "generator_bound": self.generator_bound(),
            "sender_wake_lag_us": self.wake.to_json(),
            "gateway_rss_idle_kib": self.rss_idle_kib, "gateway_rss_peak_kib": self.rss_peak_kib,
            "gateway_rss_per_session_kib": num(self.rss_per_session_kib()),
            "gateway_socket_drops": self.gw_socket_drops, "udp_rcvbuf_errors": self.rcvbuf_errors,
            "loadavg_1m": num(self.load),
            "missing_per_session": self.missing_summary().to_json(),
            "gateway_frames_dropped_by_reason": self.gw_dropped_by.iter().map(|(r, v)| (r.to_string(), num(*v))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

pub(super) type Keep = Vec<Box<dyn std::any::Any + Send>>;

/// Everything a run keeps alive until it is measured.
pub(super) struct Fleet {
    pub(super) stop: CancellationToken,
    pub(super) legs: Vec<Leg>,
    pub(super) players: Vec<PlayerFrames>,
    /// Player-side handles (client connection, control stream).
    pub(super) player_side: Keep,
    /// Node-side handles (node connections and endpoint, session streams).
    pub(super) node_side: Keep,
}

impl Fleet {
    /// Players leave first, so the gateway ends each session as a departed client instead of
    /// seeing its node vanish (which it would count against the node and fail over).
    pub(super) async fn end(self, gw: Option<&Gw>) {
        drop(self.player_side);
        if let Some(gw) = gw {
            sessions_ended(gw.admin).await;
        }
        self.stop.cancel();
        drop(self.node_side);
    }
}

/// Waits (bounded) until the gateway reports no game session in progress.
pub(super) async fn sessions_ended(admin: SocketAddr) {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        match gateway_metrics(admin).await {
            Ok(page) if metric_sum(&page, "nearpath_game_active_sessions") == 0.0 => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => return,
        }
    }
}

pub(super) async fn gateway_fleet(a: &RelayCapacityArgs, gw: &Gw, n: u32) -> anyhow::Result<Fleet> {
    let stop = CancellationToken::new();
    let endpoint = node_endpoint()?;
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel();
    let per_node = a.sessions_per_node.max(1);
    let nodes = n.div_ceil(per_node);
    let mut node_side: Keep = Vec::new();
    let mut player_side: Keep = Vec::new();
    for i in 0..nodes {
        // A little headroom per node so that routing by load never finds every node full.
        let conn = connect_node(
            &endpoint,
            gw,
            &format!("bench-node-{i}"),
            per_node + 2,
            opened_tx.clone(),
            stop.clone(),
        )
        .await?;
        node_side.push(Box::new(conn));
    }
    node_side.push(Box::new(endpoint));
    let params = play_params(&a.shape);
    let mut pending = HashMap::new();
    let (mut legs, mut players) = (Vec::new(), Vec::new());
    let wt_info = match a.transport {
        PlayerTransport::Webtransport => Some(
            nearpath_tests::wt_client::fetch_info(gw.http)
                .await
                .context("GET /v1/webtransport")?,
        ),
        PlayerTransport::Quic => None,
    };
    for _ in 0..n {
        let (session_id, frames): (u64, PlayerFrames) = match &wt_info {
            None => {
                let p = play(gw.quic, gw.sha, &gw.api_key, params.clone()).await?;
                player_side.push(Box::new((p._control, p._client)));
                (p.session_id, PlayerFrames::Native(p.frames))
            }
            Some(info) => {
                let mut p = wt_play(gw, info, &params).await?;
                let frames = p.take_frames().expect("frames not taken yet");
                let id = p.started.session_id;
                player_side.push(Box::new(p));
                (id, PlayerFrames::WebTransport(frames))
            }
        };
        let node = opened_session(&mut opened_rx, &mut pending, session_id).await?;
        legs.push(Leg {
            conn: node.conn.clone(),
            session_id,
        });
        players.push(frames);
        node_side.push(Box::new(node));
    }
    Ok(Fleet {
        stop,
        legs,
        players,
        player_side,
        node_side,
    })
}

/// A WebTransport player (as a browser page plays) through the gateway.
async fn wt_play(
    gw: &Gw,
    info: &nearpath_tests::wt_client::WtInfo,
    params: &PlayParams,
) -> anyhow::Result<nearpath_tests::wt_client::WtPlayer> {
    use nearpath_tests::wt_client;
    let (session, _) = wt_client::connect(
        gw.quic.ip(),
        SocketAddr::new(gw.quic.ip(), info.port),
        &info.path,
        &info.cert_hashes,
    )
    .await
    .context("WebTransport player connecting")?;
    let mut req = wt_client::play_request(
        &gw.api_key,
        &params.game,
        params.width,
        params.height,
        params.fps,
    );
    req.bitrate_kbps = params.bitrate_kbps;
    wt_client::WtPlayer::play(session, req)
        .await
        .context("WebTransport player: play")
}

pub(super) async fn direct_fleet(a: &RelayCapacityArgs, n: u32) -> anyhow::Result<Fleet> {
    let server = DirectServer::start(&[ALPN_CLIENT])?;
    let mut accepted = accept_players(server.endpoint.clone(), n, DIRECT_SESSION_BASE);
    let params = play_params(&a.shape);
    let mut pending: HashMap<u64, DirectPlayer> = HashMap::new();
    let (mut legs, mut players) = (Vec::new(), Vec::new());
    let mut node_side: Keep = Vec::new();
    let mut player_side: Keep = Vec::new();
    for _ in 0..n {
        let p = play(server.addr, server.sha, "unused", params.clone()).await?;
        let node = loop {
            if let Some(d) = pending.remove(&p.session_id) {
                break d;
            }
            let d = tokio::time::timeout(Duration::from_secs(10), accepted.recv())
                .await
                .map_err(|_| anyhow!("the direct server did not answer a player within 10 s"))?
                .ok_or_else(|| anyhow!("the direct server stopped accepting"))??;
            pending.insert(d.session_id, d);
        };
        legs.push(Leg {
            conn: node.conn.clone(),
            session_id: node.session_id,
        });
        players.push(PlayerFrames::Native(p.frames));
        node_side.push(Box::new(node));
        player_side.push(Box::new((p._control, p._client)));
    }
    node_side.push(Box::new(server.endpoint));
    Ok(Fleet {
        stop: CancellationToken::new(),
        legs,
        players,
        player_side,
        node_side,
    })
}

pub(super) async fn capacity_run(
    a: &RelayCapacityArgs,
    plan: &Arc<FramePlan>,
    n: u32,
    mode: Mode,
) -> anyhow::Result<CapRun> {
    let gw_proc = match mode {
        Mode::Gateway => {
            let g = start_gateway(&a.placement, Liveness::default(), 65_536)?;
            renice_gateway(&g, a.nice)?;
            Some(g)
        }
        Mode::Direct => None,
    };
    let r = capacity_inner(a, plan, n, mode, gw_proc.as_ref()).await;
    if let Some(g) = gw_proc {
        stop_all(vec![g.child]).await;
    }
    r
}

pub(super) async fn capacity_inner(
    a: &RelayCapacityArgs,
    plan: &Arc<FramePlan>,
    n: u32,
    mode: Mode,
    gw_proc: Option<&GatewayProc>,
) -> anyhow::Result<CapRun> {
    let gw = gw_proc.map(Gw::of).transpose()?;
    let mut fleet = match &gw {
        Some(gw) => gateway_fleet(a, gw, n).await?,
        None => direct_fleet(a, n).await?,
    };
    let gw_pid = gw.as_ref().map(|g| g.pid);
    let rss_idle_kib = match gw_pid {
        Some(pid) => mem_status(pid)?.rss_kib,
        None => 0,
    };
    let fps = plan.fps() as f64;
    let measured = ((a.seconds * fps).round() as u64).max(1);
    let start = Instant::now() + Duration::from_millis(200);
    // The measured window, from `start`: every session sends `measured` frames inside it.
    let warm_at = Duration::from_secs_f64(a.warmup_seconds.max(0.0));
    let measured_for = plan.due(measured);
    let interval = plan.interval();
    let ramp = Duration::from_secs_f64(a.ramp_seconds.clamp(0.0, a.warmup_seconds.max(0.0)));
    let gop = plan.gop() as u64;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    // (first measured seq, seqs sent) per session.
    let mut ranges = Vec::new();
    let end = start + warm_at + measured_for + interval;
    // Players join one after another over the ramp (over one frame interval without one), as
    // arriving players would: a few hundred sessions whose congestion windows all open in the
    // same 16 ms are a start-up storm, not the steady state this measures. Their frames stay
    // spread over the frame interval and their IDRs over the group of pictures.
    for (i, (leg, player)) in fleet
        .legs
        .iter()
        .cloned()
        .zip(std::mem::take(&mut fleet.players))
        .enumerate()
    {
        let share = i as f64 / n as f64;
        // Whole frame intervals into the ramp, then a slot of its own inside the interval:
        // deriving both from one fraction of the ramp would bunch the sessions on a few slots
        // (a 2 s ramp over 150 sessions is 13.3 ms apart, which is only 5 slots mod 16.7 ms).
        let join_frames = (ramp.as_secs_f64() * fps * share).floor() as u64;
        let join = plan.due(join_frames) + interval.mul_f64(share);
        let first = (warm_at.saturating_sub(join).as_secs_f64() * fps).ceil() as u64;
        let count = first + measured;
        let phase = idr_phase(i as u64, n as u64, gop, join_frames);
        senders.push(tokio::spawn(pace(
            plan.clone(),
            vec![leg],
            start + join,
            count,
            phase,
            (1280, 720),
        )));
        receivers.push(tokio::spawn(collect_from(player, count - 1, end)));
        ranges.push((first, count));
    }
    let udp_before = udp_picture();
    let drops_before = gw
        .as_ref()
        .and_then(|g| gateway_socket_drops(g.quic.port()));
    tokio::time::sleep_until(start + warm_at).await;
    let gw_cpu = gw_pid.map(CpuMeter::start).transpose()?;
    let gen_cpu = CpuMeter::start(std::process::id())?;
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = gw_pid.map(|pid| {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                if let Ok(m) = mem_status(pid) {
                    peak = peak.max(m.rss_kib);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            peak
        })
    });
    tokio::time::sleep_until(start + warm_at + measured_for).await;
    let gw_cpu = gw_cpu.map(|m| m.percent()).transpose()?.unwrap_or(0.0);
    let gen_cpu = gen_cpu.percent()?;
    let load = loadavg_1m();
    sampling.store(false, Ordering::Relaxed);
    let rss_peak_kib = match sampler {
        Some(s) => s.await?,
        None => 0,
    };
    let mut wake = Vec::new();
    let (mut send_errors, mut first_error) = (0, None);
    let mut skipped_by = Vec::new();
    for s in senders {
        let l = s.await?;
        send_errors += l.errors;
        if first_error.is_none() {
            first_error = l.first_error;
        }
        wake.extend(l.wake_late_us);
        skipped_by.push(l.skipped);
    }
    // Sender i feeds player i.
    let mut logs = Vec::new();
    for (r, skipped) in receivers.into_iter().zip(skipped_by) {
        let mut log = r.await?;
        log.not_sent = skipped.into_iter().collect();
        logs.push(log);
    }
    let skipped = logs
        .iter()
        .zip(&ranges)
        .map(|(l, &(first, _))| l.not_sent.iter().filter(|&&k| k >= first).count() as u64)
        .sum();
    let frame_errors = logs.iter().map(|l| l.errors).sum();
    if first_error.is_none() {
        first_error = logs.iter().find_map(|l| l.first_error.clone());
    }
    let (gw_dropped, gw_relayed, gw_dropped_by) = match &gw {
        Some(g) => {
            let page = gateway_metrics(g.admin).await?;
            (
                metric_sum(&page, "nearpath_game_frames_dropped_total"),
                metric_sum(&page, "nearpath_game_frames_relayed_total"),
                DROP_REASONS
                    .iter()
                    .map(|&r| {
                        let series =
                            format!("nearpath_game_frames_dropped_total{{reason=\"{r}\"}}");
                        (r, metric_value(&page, &series))
                    })
                    .collect(),
            )
        }
        None => (0.0, 0.0, Vec::new()),
    };
    let missing_per_session = logs
        .iter()
        .zip(&ranges)
        .map(|(l, &(first, count))| Window::of_one(l, first, count, 1e6 / fps).missing())
        .collect();
    let jitter_us = logs
        .iter()
        .zip(&ranges)
        .flat_map(|(l, &(first, count))| interarrival_jitter(l, first, count))
        .collect();
    let udp_after = udp_picture();
    let drops_after = gw
        .as_ref()
        .and_then(|g| gateway_socket_drops(g.quic.port()));
    fleet.end(gw.as_ref()).await;
    if let Some(dir) = &a.dump {
        dump_frames(dir, &format!("{}-{n}", mode.as_str()), &logs)?;
    }
    Ok(CapRun {
        n,
        mode,
        window: Window::of(
            logs.iter()
                .zip(&ranges)
                .map(|(l, &(first, count))| (l, first, count)),
            1e6 / fps,
        ),
        frame_errors,
        send_errors,
        skipped,
        first_error,
        gw_dropped,
        gw_relayed,
        gw_cpu,
        gen_cpu,
        wake: Summary::of(&mut wake),
        rss_idle_kib,
        rss_peak_kib,
        gw_socket_drops: drops_after
            .zip(drops_before)
            .map(|(a, b)| a.saturating_sub(b)),
        rcvbuf_errors: udp_after
            .rcvbuf_errors
            .zip(udp_before.rcvbuf_errors)
            .map(|(a, b)| a.saturating_sub(b)),
        load,
        missing_per_session,
        gw_dropped_by,
        jitter_us,
    })
}

/// Where in its group of pictures session `i` of `n` starts, given that it joins `join_frames`
/// frame intervals after the first, so that the sessions' IDRs fall on evenly spread frame
/// slots of the group in wall-clock time. Spreading by `i` alone is not enough: with a join
/// ramp as long as the group, the two offsets cancel and every IDR lands on the same slot (150
/// IDRs of 60 KB at once are a 9 MB burst).
pub fn idr_phase(i: u64, n: u64, gop: u64, join_frames: u64) -> u64 {
    let slot = i * gop / n.max(1);
    (join_frames % gop + gop - slot % gop) % gop
}

/// Session counts of the ramp: every step up to `max`, then `max`, ascending.
pub fn ramp(steps: &str, max: u32, only: bool) -> anyhow::Result<Vec<u32>> {
    if only {
        return Ok(vec![max]);
    }
    let mut v = Vec::new();
    for s in steps.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let n: u32 = s
            .parse()
            .map_err(|e| anyhow!("--steps {steps:?}: {s:?}: {e}"))?;
        if n > 0 && n <= max {
            v.push(n);
        }
    }
    v.push(max);
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// Most runs clean (a shared machine sometimes stalls one run; say so rather than hide it).
pub(super) fn passes(runs: &[CapRun]) -> bool {
    let clean = runs.iter().filter(|r| r.clean()).count();
    !runs.is_empty() && clean * 2 > runs.len()
}

pub(super) fn print_run(r: &CapRun) {
    let gateway = match r.mode {
        Mode::Gateway => format!(
            "gw dropped {}; gateway CPU {:.1}% ({:.2}%/session), RSS {:.1} -> {:.1} MiB, socket drops {}; ",
            r.gw_dropped,
            r.gw_cpu,
            r.gw_cpu / r.n.max(1) as f64,
            r.rss_idle_kib as f64 / 1024.0,
            r.rss_peak_kib as f64 / 1024.0,
            opt(r.gw_socket_drops),
        ),
        Mode::Direct => String::new(),
    };
    println!(
        "  {:>4} {:<7} {}: frames {}/{}, late {}, missing {}, errors {}, p50 {:.0} us p99 {:.0} us max {:.0} us; \
         {gateway}generator CPU {:.1}%, wake-up lag p99 {:.0} us, skipped {}{}; RcvbufErrors {}; load {:.2}{}",
        r.n,
        r.mode.as_str(),
        if r.clean() { "clean" } else { "NOT CLEAN" },
        r.window.received,
        r.window.expected,
        r.window.late,
        r.window.missing(),
        r.frame_errors + r.send_errors,
        r.window.lat.p50,
        r.window.lat.p99,
        r.window.lat.max,
        r.gen_cpu,
        r.wake.p99,
        r.skipped,
        if r.generator_bound() { " (generator saturated)" } else { "" },
        opt(r.rcvbuf_errors),
        r.load,
        r.first_error.as_deref().map(|e| format!("; first error: {e}")).unwrap_or_default()
    );
}

/// Every run at `n` sessions: through the gateway, and direct unless turned off.
pub(super) async fn runs_at(
    a: &RelayCapacityArgs,
    plan: &Arc<FramePlan>,
    n: u32,
) -> anyhow::Result<(Vec<CapRun>, Vec<CapRun>)> {
    let mut through = Vec::new();
    let mut direct = Vec::new();
    for _ in 0..a.repeats.max(1) {
        if a.direct_only {
            let r = capacity_run(a, plan, n, Mode::Direct)
                .await
                .with_context(|| format!("{n} sessions direct"))?;
            print_run(&r);
            through.push(r);
            continue;
        }
        let r = capacity_run(a, plan, n, Mode::Gateway)
            .await
            .with_context(|| format!("{n} sessions through the gateway"))?;
        print_run(&r);
        through.push(r);
        if !a.no_direct {
            let r = capacity_run(a, plan, n, Mode::Direct)
                .await
                .with_context(|| format!("{n} sessions direct"))?;
            print_run(&r);
            direct.push(r);
        }
    }
    Ok((through, direct))
}

pub async fn run_capacity(a: RelayCapacityArgs) -> anyhow::Result<()> {
    capacity_report(&a).await.map(|_| ())
}

/// The relay-capacity ramp with its report; returns the largest clean session count.
pub(super) async fn capacity_report(a: &RelayCapacityArgs) -> anyhow::Result<u32> {
    let a = a.clone();
    let plan = Arc::new(FramePlan::new(&a.shape, 1)?);
    let load_start = loadavg_1m();
    let priority = Priority::apply(a.nice)?;
    let udp = udp_picture();
    let steps = ramp(&a.steps, a.sessions, a.only)?;
    println!(
        "relay-capacity: {}; session counts {:?}, {} run(s) each, {} s measured after {} s warm-up (players join over the first {} s), \
         {} sessions per fake node; {}",
        describe_plan(&plan),
        steps,
        a.repeats.max(1),
        a.seconds,
        a.warmup_seconds,
        a.ramp_seconds.clamp(0.0, a.warmup_seconds.max(0.0)),
        a.sessions_per_node,
        describe_placement(&a.placement, &priority)
    );
    println!(
        "  late = latency above one frame interval ({:.1} ms); missing = frames never received (gaps in seq); a count is clean with 0 late, 0 missing, \
         0 errors and 0 frames dropped by the gateway (nearpath_game_frames_dropped_total)",
        1e3 / plan.fps() as f64
    );
    println!(
        "  UDP: net.core.rmem_max {} B; the gateway's {} B receive-buffer request is granted {} B (Linux reports double)",
        opt(udp.rmem_max),
        GATEWAY_RECV_BUFFER,
        opt(udp.granted)
    );
    let mut results: Vec<(u32, Vec<CapRun>, Vec<CapRun>)> = Vec::new();
    let mut last_pass = 0u32;
    let mut first_fail: Option<u32> = None;
    for &n in &steps {
        let (through, direct) = runs_at(&a, &plan, n).await?;
        let ok = passes(&through);
        results.push((n, through, direct));
        if ok {
            if first_fail.is_none() {
                last_pass = n;
            }
        } else {
            first_fail.get_or_insert(n);
            if !a.keep_going {
                break;
            }
        }
    }
    if let (Some(mut hi), false) = (first_fail, a.only) {
        let mut lo = last_pass;
        for _ in 0..a.bisect {
            // Multiples of 5 keep the figure readable; stop when the interval is that narrow.
            let mid = ((lo + hi) / 2 / 5) * 5;
            if mid <= lo || mid >= hi {
                break;
            }
            let (through, direct) = runs_at(&a, &plan, mid).await?;
            let ok = passes(&through);
            results.push((mid, through, direct));
            if ok {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        last_pass = lo;
        first_fail = Some(hi);
    }
    results.sort_by_key(|(n, ..)| *n);
    let load_end = loadavg_1m();
    println!();
    let mut t = Table::new(&[
        "sessions (median of runs)",
        "clean runs",
        "late",
        "missing",
        "gw dropped",
        "p50 us",
        "p99 us",
        "max us",
        "gw CPU %",
        "gw CPU %/session",
        "gw RSS MiB",
        "gw KiB/session",
        "gen CPU %",
        "direct clean",
        "direct p99 us",
    ]);
    let med =
        |runs: &[CapRun], f: &dyn Fn(&CapRun) -> f64| Repeated::new(runs.iter().map(f).collect());
    for (n, through, direct) in &results {
        t.row(vec![
            n.to_string(),
            format!(
                "{}/{}",
                through.iter().filter(|r| r.clean()).count(),
                through.len()
            ),
            med(through, &|r| r.window.late as f64).show(0),
            med(through, &|r| r.window.missing() as f64).show(0),
            med(through, &|r| r.gw_dropped).show(0),
            med(through, &|r| r.window.lat.p50).show(0),
            med(through, &|r| r.window.lat.p99).show(0),
            med(through, &|r| r.window.lat.max).show(0),
            med(through, &|r| r.gw_cpu).show(1),
            med(through, &|r| r.gw_cpu / r.n.max(1) as f64).show(2),
            med(through, &|r| r.rss_peak_kib as f64 / 1024.0).show(1),
            med(through, &|r| r.rss_per_session_kib()).show(0),
            med(through, &|r| r.gen_cpu).show(0),
            if direct.is_empty() {
                "-".into()
            } else {
                format!(
                    "{}/{}",
                    direct.iter().filter(|r| r.clean()).count(),
                    direct.len()
                )
            },
            if direct.is_empty() {
                "-".into()
            } else {
                med(direct, &|r| r.window.lat.p99).show(0)
            },
        ]);
    }
    t.print();
    let best = results.iter().find(|(n, ..)| *n == last_pass);
    let generator_bound = first_fail
        .and_then(|f| results.iter().find(|(n, ..)| *n == f))
        .is_some_and(|(_, through, direct)| {
            through.iter().any(CapRun::generator_bound) || (!direct.is_empty() && !passes(direct))
        });
    println!(
        "  largest clean session count: {}{} (target >= 150: {}){}; load average (1 min) {:.2} -> {:.2}",
        last_pass,
        first_fail.map(|f| format!(", first failing {f}")).unwrap_or_else(|| ", none failed".into()),
        verdict(last_pass >= 150),
        if generator_bound {
            "; the load generator was saturated (or failed direct) at the failing count, so this is a lower bound for the gateway"
        } else {
            ""
        },
        load_start,
        load_end
    );
    if let Some((n, through, _)) = best {
        println!(
            "  at {n} sessions the gateway used {}% of a core ({}% per session) and {} KiB RSS per session",
            med(through, &|r| r.gw_cpu).show(1),
            med(through, &|r| r.gw_cpu / r.n.max(1) as f64).show(2),
            med(through, &|r| r.rss_per_session_kib()).show(0)
        );
    }
    let summary = json!({
        "bench": "relay-capacity",
        "params": {"transport": a.transport.as_str(), "ramp": steps, "seconds": a.seconds, "warmup_seconds": a.warmup_seconds, "repeats": a.repeats.max(1),
                   "sessions_per_node": a.sessions_per_node, "ramp_seconds": a.ramp_seconds, "fps": plan.fps(), "kbps": num(plan.kbps()),
                   "idr_bytes": plan.sizes[0], "gop_frames": plan.gop(), "placement": describe_placement(&a.placement, &priority)},
        "largest_clean_sessions": last_pass,
        "first_failing_sessions": first_fail,
        "generator_bound_at_failure": generator_bound,
        "target_met": last_pass >= 150,
        "runs": results.iter().map(|(n, t, d)| json!({"sessions": n, "gateway": t.iter().map(CapRun::to_json).collect::<Vec<_>>(),
                  "direct": d.iter().map(CapRun::to_json).collect::<Vec<_>>()})).collect::<Vec<_>>(),
        "udp": {"rmem_max": udp.rmem_max, "granted_for_4mib_request": udp.granted},
        "loadavg_1m": [num(load_start), num(load_end)],
    });
    println!("{summary}");
    Ok(last_pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idrs_are_spread_over_the_group_in_wall_clock_time() {
        let (n, gop) = (150u64, 120u64);
        // Session i joins 2 s * i / n after the first (a ramp as long as the group).
        let slots: std::collections::HashSet<u64> = (0..n)
            .map(|i| {
                let join = (2.0 * 60.0 * i as f64 / n as f64).round() as u64;
                let phase = idr_phase(i, n, gop, join);
                // Frame k is an IDR when (k + phase) % gop == 0; its wall-clock slot is join + k.
                let k = (gop - phase) % gop;
                (join + k) % gop
            })
            .collect();
        // 150 sessions over 120 slots: every slot is used.
        assert_eq!(slots.len(), 120);
        // Without a ramp the phase alone spreads them.
        assert_eq!(idr_phase(0, n, gop, 0), 0);
        assert_eq!(idr_phase(75, n, gop, 0), 60);
    }

    #[test]
    fn ramp_runs_steps_up_to_the_maximum() {
        assert_eq!(
            ramp("25,50,100,150,200", 150, false).unwrap(),
            vec![25, 50, 100, 150]
        );
        assert_eq!(ramp("25,50", 120, false).unwrap(), vec![25, 50, 120]);
        assert_eq!(ramp("25,50", 120, true).unwrap(), vec![120]);
        assert!(ramp("25,x", 120, false).is_err());
    }
}
