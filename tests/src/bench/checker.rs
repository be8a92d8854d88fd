//! `bench checker`: what the checker costs and how fast it acts (issue 14).
//!
//! 1. **Probe overhead at full load.** One gateway and one simulator node (the built-in
//!    inference simulator, at a fixed token rate) in this process; `--concurrency` clients keep
//!    every slot of the node busy for `--seconds`, and the tokens delivered per second are
//!    counted. Rounds alternate the checker off and on (on: standby probes at a mean interval of
//!    `--probe-interval-ms`, far more often than the default 10 minutes), each round a fresh
//!    gateway and node; the registration check is waited out before the load starts.
//! 2. **Impossible claim to reclassification.** A node claiming one RTX 3080 from CN serves a
//!    model declared at 40 GB at 50 tokens/s (what no RTX 3080 can do); the time from its
//!    registration to the gateway disconnecting it (reclassified to a controlled class, which the
//!    export-control rule refuses from CN), with the default `registration_probe_delay_max_ms`
//!    and with 0.

use super::client::{chat_body, chat_request, stream_once, Conn};
use super::stats::{num, Repeated};
use nearpath_config::{
    BackendConfig, CapacityConfig, GatewayConfig, GeoOverride, GpuSpec, ModelConfig, NodeConfig,
    NodeGatewayConfig, NodeIdentity,
};
use nearpath_gateway::store::{KycStatus, SqliteStore, Store};
use nearpath_gateway::{Gateway, Listeners};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct CheckerArgs {
    /// Rounds per setting of the overhead part (checker off, on), alternating.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Seconds of full load per round.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// The node's inference slots, all kept busy.
    #[arg(long, default_value_t = 8)]
    pub concurrency: u32,
    /// Simulator token rate per stream.
    #[arg(long, default_value_t = 200.0)]
    pub tokens_per_s: f64,
    /// max_tokens of each load request.
    #[arg(long, default_value_t = 64)]
    pub tokens: u32,
    /// Mean interval of standby probes with the checker on, in ms.
    #[arg(long, default_value_t = 100)]
    pub probe_interval_ms: u64,
    /// Rounds of the reclassification part, per registration delay.
    #[arg(long, default_value_t = 5)]
    pub reclass_rounds: u32,
    /// Accepted like the other commands' (this one runs in one process, unpinned).
    #[arg(long, hide = true)]
    pub no_pin: bool,
}

const KEY: &str = "bench-checker-key";
use super::serve::MODEL;
/// Where the bench's gateway places 127.0.0.1 (the node connects from there): Beijing.
const CN: (&str, f64, f64) = ("CN", 39.9, 116.4);

struct Setup {
    http: SocketAddr,
    shared: Arc<nearpath_gateway::Shared>,
    node_task: tokio::task::JoinHandle<Result<(), nearpath_edge_node::NodeError>>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

async fn setup(
    edit: impl FnOnce(&mut GatewayConfig),
    node: impl FnOnce(&mut NodeConfig),
) -> anyhow::Result<(Setup, Instant)> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("gw.db"))?);
    let operator = store.create_operator("bench-operator", KycStatus::Verified)?;
    let (_, token) = store.create_enrolment_token(&operator.id)?;
    store.insert_api_key_secret(KEY, "bench", 1_000_000, 1_000_000_000)?;
    let mut config = GatewayConfig::default();
    config.admin.token = Some("bench-admin-token-0123456789".into());
    config.geo.reload_check_interval_s = 0;
    config.geo.overrides = vec![GeoOverride {
        cidr: "127.0.0.1/32".parse()?,
        country: CN.0.into(),
        subdivision: None,
        lat: Some(CN.1),
        lon: Some(CN.2),
    }];
    // One source stands for many clients.
    config.http.max_connections_per_ip = 100_000;
    edit(&mut config);
    let cert = nearpath_gateway::tls::self_signed(&["localhost", "127.0.0.1"])?;
    let sha = cert.sha256;
    let shutdown = CancellationToken::new();
    let gw = Gateway::with_parts(config, cert, store)?;
    let shared = gw.shared().clone();
    let (addrs, _task) = gw.start(Listeners::ephemeral().await?, shutdown.clone())?;
    let mut cfg = NodeConfig {
        node: NodeIdentity {
            id: "bench-node".into(),
            enrolment_token: Some(token),
        },
        gateway: NodeGatewayConfig::pinned(
            addrs.quic.to_string(),
            nearpath_protocol::tls::sha256_hex(&sha),
        ),
        drain: Default::default(),
        gpus: vec![],
        gpu_classes: nearpath_config::default_gpu_class_table(),
        capacity: CapacityConfig {
            game_sessions: 0,
            inference_concurrency: 8,
        },
        models: vec![ModelConfig {
            name: MODEL.into(),
            max_concurrency: 8,
            backend: BackendConfig::sim(),
            capabilities: None,
            responses: Default::default(),
            weights_bytes: None,
            params_b: None,
            dtype: None,
        }],
        games: vec![],
        encoder: Default::default(),
        media: Default::default(),
        audio: Default::default(),
        quic: Default::default(),
        log: Default::default(),
    };
    node(&mut cfg);
    let node = nearpath_edge_node::EdgeNode::new(
        cfg,
        nearpath_edge_node::NodeOptions {
            use_nvml: false,
            verify: None,
            bind: None,
        },
    )?;
    let mut status = node.status();
    let node_task = tokio::spawn(node.run(shutdown.clone()));
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(
            *status.borrow_and_update(),
            nearpath_edge_node::NodeStatus::Registered { .. }
        ) {
            if status.changed().await.is_err() {
                break;
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("the node did not register within 10 s"))?;
    let registered = Instant::now();
    Ok((
        Setup {
            http: addrs.http,
            shared,
            node_task,
            shutdown,
            _dir: dir,
        },
        registered,
    ))
}

impl Setup {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.node_task.await;
    }

    fn node_state(&self) -> Option<&'static str> {
        self.shared
            .directory
            .registry
            .get("bench-node")
            .map(|n| n.check().state)
    }
}

fn gpu(model: &str, vram_mib: u64) -> GpuSpec {
    GpuSpec {
        model: model.into(),
        vram_mib,
        class: None,
        uuid: None,
        pci_device_id: None,
    }
}

/// One round of full load: tokens delivered per second over `seconds`.
async fn load_round(a: &CheckerArgs, checker_on: bool) -> anyhow::Result<(f64, u64)> {
    let interval = a.probe_interval_ms;
    let (s, _) = setup(
        |c| {
            c.checker.enabled = checker_on;
            c.checker.registration_probe_delay_max_ms = 0;
            c.checker.standby_probe_interval_mean_ms = interval;
            c.checker.seed = Some(1);
        },
        |n| {
            // An honest claim the CN clients may use: an A40 (not export-controlled) decoding a
            // 2 GB model at the simulator's rate (its bound: 348 tokens/s per stream).
            n.gpus = vec![gpu("NVIDIA A40", 46_068)];
            n.capacity.inference_concurrency = a.concurrency;
            n.models[0].max_concurrency = a.concurrency;
            n.models[0].backend = BackendConfig::Sim {
                ttft_ms: 5,
                tokens_per_s: a.tokens_per_s,
                seed: 1,
            };
            n.models[0].weights_bytes = Some(2_000_000_000);
        },
    )
    .await?;
    if checker_on {
        // The registration check runs before the load (its probe is not the overhead measured).
        let deadline = Instant::now() + Duration::from_secs(20);
        while s.node_state() == Some("unverified") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let tokens = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(a.seconds);
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency {
        let tokens = tokens.clone();
        let (http, max) = (s.http, a.tokens);
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::h1(http).await?;
            while Instant::now() < end {
                let out = stream_once(
                    &mut conn,
                    chat_request(http, Some(KEY), chat_body(true, max)),
                    false,
                    || {},
                )
                .await?;
                tokens.fetch_add(u64::from(out.tokens), Ordering::Relaxed);
                if out.status != 200 {
                    conn = Conn::h1(http).await?;
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let t0 = Instant::now();
    for t in tasks {
        t.await??;
    }
    let wall = t0.elapsed().as_secs_f64();
    let probes = probes_run(&s).await;
    s.stop().await;
    Ok((tokens.load(Ordering::Relaxed) as f64 / wall, probes))
}

/// Probes the gateway ran (all outcomes), from its metrics.
async fn probes_run(s: &Setup) -> u64 {
    nearpath_gateway::metrics::label_values::CHECKER_PROBE_OUTCOMES
        .iter()
        .map(|o| {
            s.shared
                .metrics
                .checker_probes
                .get_or_create(&nearpath_gateway::metrics::labels([("outcome", o)]))
                .get()
        })
        .sum()
}

/// One reclassification round: seconds from registration to the disconnect.
async fn reclass_round(delay_max_ms: u64, seed: u64) -> anyhow::Result<f64> {
    let (s, registered) = setup(
        |c| {
            c.checker.registration_probe_delay_max_ms = delay_max_ms;
            c.checker.seed = Some(seed);
        },
        |n| {
            n.gpus = vec![gpu("NVIDIA GeForce RTX 3080", 10_240)];
            n.models[0].backend = BackendConfig::Sim {
                ttft_ms: 0,
                tokens_per_s: 50.0,
                seed: 1,
            };
            n.models[0].weights_bytes = Some(40_000_000_000);
        },
    )
    .await?;
    let deadline = registered + Duration::from_secs(60);
    while s.node_state().is_some() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the lying node was not disconnected within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = registered.elapsed().as_secs_f64();
    s.stop().await;
    Ok(t)
}

pub async fn run(a: CheckerArgs) -> anyhow::Result<()> {
    let mut off = Vec::new();
    let mut on = Vec::new();
    let mut probes = Vec::new();
    for _ in 0..a.rounds {
        off.push(load_round(&a, false).await?.0);
        let (tps, n) = load_round(&a, true).await?;
        on.push(tps);
        probes.push(n as f64);
    }
    let ratios: Vec<f64> = on.iter().zip(&off).map(|(a, b)| a / b).collect();
    let (off, on, ratios, probes) = (
        Repeated::new(off),
        Repeated::new(on),
        Repeated::new(ratios),
        Repeated::new(probes),
    );
    println!(
        "full load ({} slots, {} s per round, {} rounds each, sim {} tokens/s per stream):",
        a.concurrency, a.seconds, a.rounds, a.tokens_per_s
    );
    println!("  checker off: {} tokens/s", off.show(0));
    println!(
        "  checker on:  {} tokens/s (probes run per round: {})",
        on.show(0),
        probes.show(0)
    );
    println!("  on/off ratio: {}", ratios.show(3));
    let mut reclass = Vec::new();
    for (delay, label) in [
        (2_000u64, "default delay (random within 2 s)"),
        (0, "no delay"),
    ] {
        let mut t = Vec::new();
        for r in 0..a.reclass_rounds {
            t.push(reclass_round(delay, u64::from(r) + 1).await?);
        }
        let t = Repeated::new(t);
        println!("impossible claim -> disconnected, {label}: {} s", t.show(3));
        reclass.push(json!({"registration_probe_delay_max_ms": delay, "seconds": t.to_json()}));
    }
    println!(
        "{}",
        json!({
            "bench": "checker",
            "tokens_per_s_off": off.to_json(),
            "tokens_per_s_on": on.to_json(),
            "on_off_ratio": ratios.to_json(),
            "probes_per_round": probes.to_json(),
            "reclassification": reclass,
            "median_ratio": num(ratios.median()),
        })
    );
    Ok(())
}
