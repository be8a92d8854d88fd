//! The built-in inference **simulator**. It is not a model: like llm-d's inference-sim it
//! produces plausible-looking placeholder text with configurable timing, so the gateway, the demo,
//! tests and benchmarks can run without a GPU.
//!
//! Behaviour:
//! - Text is deterministic: words from a small built-in vocabulary, each with a leading space
//!   (and now and then a comma or full stop), drawn by a PRNG seeded from the configured `seed`,
//!   the request's `seed` and a hash of the endpoint and the input (roles and texts). The same
//!   prompt and seeds always give the same tokens; `temperature` is ignored.
//! - It emits `max_tokens` tokens (default [`DEFAULT_SIM_MAX_TOKENS`] when the request has none)
//!   and finishes with `length`, unless the text reaches one of the request's `stop` sequences:
//!   then the text before it is emitted and it finishes with `stop` (text that could be the
//!   start of a stop sequence is held back until it is known not to be).
//! - Prompt tokens are counted with [`approx_token_count`](super::approx_token_count) (words plus punctuation): an
//!   approximation of a real tokenizer. Completion tokens are the generation steps taken.
//! - Timing: the first token comes `ttft_ms` after `start`, token `k` at
//!   `ttft + k / tokens_per_s`, on Tokio's clock (so tests can pause it). `ttft_ms = 0` and
//!   `tokens_per_s = 0` mean "no wait": such generations never sleep (throughput benchmarks).

use std::sync::Arc;
use std::time::Duration;

use nearpath_protocol::openai::{Endpoint, InferenceRequest};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::sim_features::{self, RichScript};
use super::{approx_prompt_tokens, Backend, BackendError, BackendEvent, EventResult, Generation};
use nearpath_protocol::ModelCaps;

/// Tokens generated when a request sets no `max_tokens`.
pub const DEFAULT_SIM_MAX_TOKENS: u32 = 64;

/// Simulator timing and seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimConfig {
    /// Time to first token, in milliseconds; 0 for none.
    pub ttft_ms: u64,
    /// Token rate after the first; 0 (or anything not positive and finite) for unlimited.
    pub tokens_per_s: f64,
    /// Mixed into every generation's PRNG seed.
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            ttft_ms: 50,
            tokens_per_s: 50.0,
            seed: 0,
        }
    }
}

impl SimConfig {
    /// The gap between tokens, or zero for unlimited speed. Integer nanoseconds, so the schedule
    /// is exact on a paused clock.
    pub fn token_interval(&self) -> Duration {
        if self.tokens_per_s.is_finite() && self.tokens_per_s > 0.0 {
            Duration::from_nanos((1e9 / self.tokens_per_s).round() as u64)
        } else {
            Duration::ZERO
        }
    }
}

/// The simulator backend. Cheap to share; each generation runs on its own task.
#[derive(Debug)]
pub struct SimBackend {
    config: SimConfig,
    active: Arc<watch::Sender<usize>>,
}

impl SimBackend {
    pub fn new(config: SimConfig) -> Self {
        Self {
            config,
            active: Arc::new(watch::channel(0).0),
        }
    }

    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Generation tasks running now (they end when finished or when their consumer is gone).
    pub fn active(&self) -> usize {
        *self.active.borrow()
    }

    /// Watches [`SimBackend::active`], e.g. to wait until a cancelled generation has stopped.
    pub fn watch_active(&self) -> watch::Receiver<usize> {
        self.active.subscribe()
    }
}

/// Counts a generation task as active until it is dropped (finished, cancelled or aborted).
struct ActiveGuard(Arc<watch::Sender<usize>>);

impl ActiveGuard {
    fn new(active: &Arc<watch::Sender<usize>>) -> Self {
        active.send_modify(|n| *n += 1);
        Self(Arc::clone(active))
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Backend for SimBackend {
    fn start(&self, request: &InferenceRequest) -> Result<Generation, BackendError> {
        if request.endpoint == Endpoint::Embeddings {
            return self.start_embeddings(request);
        }
        if !sim_features::is_plain(request) {
            return Ok(self.start_rich(request));
        }
        let script = SimScript::new(&self.config, request);
        let (tx, generation) = Generation::channel();
        let guard = ActiveGuard::new(&self.active);
        let ttft = Duration::from_millis(self.config.ttft_ms);
        let interval = self.config.token_interval();
        // The clock starts now, not when the task is first polled, so TTFT is measured from the
        // caller's point of view.
        let start = Instant::now();
        tokio::spawn(async move {
            let _guard = guard;
            run(script, tx, start, ttft, interval).await;
        });
        Ok(generation)
    }

    fn kind(&self) -> &'static str {
        "sim"
    }

    fn default_caps(&self) -> ModelCaps {
        sim_features::sim_caps()
    }
}

impl SimBackend {
    /// Several choices, logprobs, JSON or a tool call: chunks, paced like tokens (one step of
    /// every choice per token interval).
    fn start_rich(&self, request: &InferenceRequest) -> Generation {
        let script = RichScript::new(&self.config, request);
        let (tx, generation) = Generation::channel();
        let guard = ActiveGuard::new(&self.active);
        let ttft = Duration::from_millis(self.config.ttft_ms);
        let interval = self.config.token_interval();
        let start = Instant::now();
        tokio::spawn(async move {
            let _guard = guard;
            run_rich(script, tx, start, ttft, interval).await;
        });
        generation
    }

    /// One `data[]` element per input after the TTFT, then `Done`.
    fn start_embeddings(&self, request: &InferenceRequest) -> Result<Generation, BackendError> {
        let (data, prompt_tokens) = sim_features::embeddings(&self.config, request)?;
        let (tx, generation) = Generation::channel();
        let guard = ActiveGuard::new(&self.active);
        let due = Instant::now().checked_add(Duration::from_millis(self.config.ttft_ms));
        tokio::spawn(async move {
            let _guard = guard;
            tokio::select! {
                biased;
                _ = tx.closed() => return,
                _ = sleep_until_opt(due) => {}
            }
            for json in data {
                if tx.send(Ok(BackendEvent::Chunk { json })).await.is_err() {
                    return;
                }
            }
            let done = BackendEvent::Done {
                finish_reason: "stop".to_owned(),
                prompt_tokens,
                completion_tokens: 0,
            };
            let _ = tx.send(Ok(done)).await;
        });
        Ok(generation)
    }
}

async fn run_rich(
    mut script: RichScript,
    tx: mpsc::Sender<EventResult>,
    start: Instant,
    ttft: Duration,
    interval: Duration,
) {
    let mut k: u32 = 0;
    while let Some(chunks) = script.next_step() {
        // Generating step k (0-based) is due at ttft + k * interval, as on the plain path; a
        // step that only finishes choices goes out at once.
        let due_now = if !script.step_is_paced() {
            true
        } else if k == 0 {
            ttft.is_zero()
        } else {
            interval.is_zero()
        };
        if due_now {
            tokio::task::consume_budget().await;
        } else {
            let wait = interval
                .checked_mul(k)
                .and_then(|gap| gap.checked_add(ttft))
                .and_then(|wait| start.checked_add(wait));
            tokio::select! {
                biased;
                _ = tx.closed() => return,
                _ = sleep_until_opt(wait) => {}
            }
        }
        if script.step_is_paced() {
            k = k.saturating_add(1);
        }
        for json in chunks {
            if tx.send(Ok(BackendEvent::Chunk { json })).await.is_err() {
                return;
            }
        }
    }
    let done = BackendEvent::Done {
        finish_reason: script.finish_reason().to_owned(),
        prompt_tokens: script.prompt_tokens(),
        completion_tokens: script.completion_tokens(),
    };
    let _ = tx.send(Ok(done)).await;
}

async fn run(
    mut script: SimScript,
    tx: mpsc::Sender<EventResult>,
    start: Instant,
    ttft: Duration,
    interval: Duration,
) {
    while let Some(piece) = script.next_piece() {
        // Step k (0-based) is due at ttft + k * interval; text flushed at the end belongs to the
        // last step and is not delayed further.
        let k = script.steps.saturating_sub(1);
        // With no rate limit, only the first token waits (for the TTFT).
        let due_now = if k == 0 {
            ttft.is_zero()
        } else {
            interval.is_zero()
        };
        if due_now {
            // Nothing to wait for; still let other tasks run now and then.
            tokio::task::consume_budget().await;
        } else {
            let wait = interval
                .checked_mul(k)
                .and_then(|gap| gap.checked_add(ttft))
                .and_then(|wait| start.checked_add(wait));
            tokio::select! {
                biased;
                // The consumer is gone: stop now rather than at the next token.
                _ = tx.closed() => return,
                _ = sleep_until_opt(wait) => {}
            }
        }
        if let Some(text) = piece {
            if tx.send(Ok(BackendEvent::Token { text })).await.is_err() {
                return;
            }
        }
    }
    let done = BackendEvent::Done {
        finish_reason: script.finish_reason().to_owned(),
        prompt_tokens: script.prompt_tokens,
        completion_tokens: script.steps,
    };
    let _ = tx.send(Ok(done)).await;
}

/// Sleeps until `deadline`, or forever when it is too far away to represent.
async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// A generation's text, step by step, without timing. Pure and deterministic.
#[derive(Debug)]
pub(crate) struct SimScript {
    rng: SplitMix64,
    max_tokens: u32,
    steps: u32,
    prompt_tokens: u32,
    stops: Vec<String>,
    /// Generated text not yet emitted: it might be the start of a stop sequence.
    pending: String,
    stopped: bool,
    flushed: bool,
}

impl SimScript {
    pub(crate) fn new(config: &SimConfig, request: &InferenceRequest) -> Self {
        Self::for_choice(config, request, 0)
    }

    /// The text of choice `index` (choice 0 is the plain path's text, so asking for logprobs
    /// or more choices does not change the first).
    pub(crate) fn for_choice(config: &SimConfig, request: &InferenceRequest, index: u32) -> Self {
        let seed =
            Self::seed_of(config, request) ^ u64::from(index).wrapping_mul(0xa076_1d64_78bd_642f);
        Self {
            rng: SplitMix64(seed),
            max_tokens: request.max_tokens.unwrap_or(DEFAULT_SIM_MAX_TOKENS),
            steps: 0,
            prompt_tokens: approx_prompt_tokens(request),
            stops: request
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
            pending: String::new(),
            stopped: false,
            flushed: false,
        }
    }

    /// The PRNG seed of a request: the configured seed, the request's `seed` and a hash of the
    /// endpoint and input.
    pub(crate) fn seed_of(config: &SimConfig, request: &InferenceRequest) -> u64 {
        let mut h = Fnv64::new();
        h.write(match request.endpoint {
            Endpoint::Chat => b"chat",
            Endpoint::Completion => b"completion",
            Endpoint::Embeddings => b"embeddings",
            Endpoint::Responses => b"responses",
        });
        for m in request.messages() {
            h.write(m.role.as_str().as_bytes());
            h.write(&[0]);
            h.write(m.content.as_bytes());
            h.write(&[0x1e]);
        }
        if let Some(p) = request.prompt() {
            h.write(p.as_bytes());
        }
        h.finish() ^ config.seed.rotate_left(17) ^ request.seed.unwrap_or(0) as u64
    }

    /// The next step: `Some(Some(text))` emits text, `Some(None)` is a step whose text is held
    /// back (it may begin a stop sequence), `None` means finished.
    pub(crate) fn next_piece(&mut self) -> Option<Option<String>> {
        if self.stopped || self.flushed {
            return None;
        }
        if self.steps >= self.max_tokens {
            // Length reached: whatever was held back is not a stop sequence after all.
            self.flushed = true;
            return if self.pending.is_empty() {
                None
            } else {
                Some(Some(std::mem::take(&mut self.pending)))
            };
        }
        self.steps += 1;
        self.push_word();
        if self.stops.is_empty() {
            return Some(Some(std::mem::take(&mut self.pending)));
        }
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            self.stopped = true;
            self.pending.truncate(at);
            let text = std::mem::take(&mut self.pending);
            return Some((!text.is_empty()).then_some(text));
        }
        let hold = self.held_back_len();
        let emit_len = self.pending.len() - hold;
        if emit_len == 0 {
            return Some(None);
        }
        let rest = self.pending.split_off(emit_len);
        Some(Some(std::mem::replace(&mut self.pending, rest)))
    }

    /// The longest suffix of `pending` that is a proper prefix of some stop sequence.
    fn held_back_len(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            for k in (best + 1..stop.len().min(self.pending.len() + 1)).rev() {
                if stop.is_char_boundary(k) && self.pending.ends_with(&stop[..k]) {
                    best = k;
                    break;
                }
            }
        }
        best
    }

    fn push_word(&mut self) {
        let r = self.rng.next_u64();
        let word = VOCABULARY[(r % VOCABULARY.len() as u64) as usize];
        self.pending.push(' ');
        self.pending.push_str(word);
        match (r >> 32) % 16 {
            0 => self.pending.push(','),
            1 => self.pending.push('.'),
            _ => {}
        }
    }

    pub(crate) fn finish_reason(&self) -> &'static str {
        if self.stopped {
            "stop"
        } else {
            "length"
        }
    }
}

/// Small, varied and recognisably fake.
pub(crate) const VOCABULARY: &[&str] = &[
    "the", "edge", "node", "streams", "tokens", "quickly", "across", "a", "quiet", "network",
    "gateway", "routes", "every", "request", "to", "nearest", "GPU", "model", "answers", "with",
    "latency", "low", "and", "steady", "frames", "arrive", "on", "time", "while", "players",
    "never", "notice", "relay", "in", "between", "packets", "flow", "through", "fiber", "light",
    "moves", "fast", "but", "distance", "still", "matters", "so", "we", "place", "compute",
    "close", "users", "each", "region", "keeps", "its", "own", "data", "safe", "inside", "border",
    "policy", "allows", "it",
];

/// SplitMix64: tiny, fast, and good enough for placeholder text.
#[derive(Debug)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// FNV-1a: stable across Rust releases, unlike `DefaultHasher`, so outputs repeat everywhere.
pub(crate) struct Fnv64(u64);

impl Fnv64 {
    pub(crate) fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }

    #[cfg(test)]
    pub(crate) fn hash(bytes: &[u8]) -> u64 {
        let mut h = Self::new();
        h.write(bytes);
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearpath_protocol::openai::Endpoint;
    use serde_json::json;

    fn req(v: serde_json::Value) -> InferenceRequest {
        let endpoint = if v.get("prompt").is_some() {
            Endpoint::Completion
        } else {
            Endpoint::Chat
        };
        match InferenceRequest::parse(endpoint, v.to_string().as_bytes()) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    fn chat(content: &str, extra: serde_json::Value) -> InferenceRequest {
        let mut v = json!({"model": "sim", "messages": [{"role": "user", "content": content}]});
        if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
            obj.extend(extra);
        }
        req(v)
    }

    fn fast(seed: u64) -> SimConfig {
        SimConfig {
            ttft_ms: 0,
            tokens_per_s: 0.0,
            seed,
        }
    }

    /// Runs a generation to the end: (tokens, finish_reason, prompt_tokens, completion_tokens).
    async fn run_all(sim: &SimBackend, r: &InferenceRequest) -> (Vec<String>, String, u32, u32) {
        let mut g = match sim.start(r) {
            Ok(g) => g,
            Err(e) => panic!("{e}"),
        };
        let mut tokens = Vec::new();
        loop {
            match g.next().await {
                Some(Ok(BackendEvent::Token { text })) => tokens.push(text),
                Some(Ok(BackendEvent::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                })) => {
                    assert!(g.next().await.is_none(), "events after Done");
                    return (tokens, finish_reason, prompt_tokens, completion_tokens);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn deterministic_per_prompt_and_seed() {
        let sim = SimBackend::new(fast(7));
        let r = chat("Tell me about edges.", json!({"max_tokens": 20}));
        let a = run_all(&sim, &r).await;
        let b = run_all(&sim, &r).await;
        assert_eq!(a, b);
        assert_eq!(a.0.len(), 20);
        assert!(
            a.0.iter().all(|t| t.starts_with(' ') && t.len() > 1),
            "{:?}",
            a.0
        );
        let other_prompt = run_all(
            &sim,
            &chat("Tell me about cores.", json!({"max_tokens": 20})),
        )
        .await;
        assert_ne!(a.0, other_prompt.0);
        let other_seed = run_all(&SimBackend::new(fast(8)), &r).await;
        assert_ne!(a.0, other_seed.0);
        let request_seed = run_all(
            &sim,
            &chat("Tell me about edges.", json!({"max_tokens": 20, "seed": 3})),
        )
        .await;
        assert_ne!(a.0, request_seed.0);
    }

    #[tokio::test]
    async fn honours_max_tokens_and_counts_usage() {
        let sim = SimBackend::new(fast(1));
        let (tokens, finish, prompt, completion) =
            run_all(&sim, &chat("One, two three.", json!({"max_tokens": 5}))).await;
        assert_eq!(tokens.len(), 5);
        assert_eq!(finish, "length");
        assert_eq!(prompt, 5, "3 words + 2 punctuation marks");
        assert_eq!(completion, 5);
        let (tokens, _, _, completion) = run_all(&sim, &chat("x", json!({}))).await;
        assert_eq!(tokens.len() as u32, DEFAULT_SIM_MAX_TOKENS);
        assert_eq!(completion, DEFAULT_SIM_MAX_TOKENS);
        let (tokens, finish, prompt, completion) = run_all(
            &sim,
            &req(json!({"model": "sim", "prompt": "Once upon a time", "max_tokens": 0})),
        )
        .await;
        assert!(tokens.is_empty());
        assert_eq!((finish.as_str(), prompt, completion), ("length", 4, 0));
    }

    #[tokio::test]
    async fn stop_sequences_cut_the_text() {
        let sim = SimBackend::new(fast(3));
        let r = chat("stop test", json!({"max_tokens": 40}));
        let (full, ..) = run_all(&sim, &r).await;
        let full_text: String = full.concat();
        // Stop at the 6th word, written with its neighbours so the stop spans tokens.
        let words: Vec<&str> = full_text.split(' ').collect();
        let stop = format!("{} {}", words[5], words[6]);
        let at = match full_text.find(&stop) {
            Some(at) => at,
            None => panic!("stop {stop:?} not in {full_text:?}"),
        };
        let r = chat(
            "stop test",
            json!({"max_tokens": 40, "stop": ["never-appears", stop]}),
        );
        let (tokens, finish, _, completion) = run_all(&sim, &r).await;
        assert_eq!(finish, "stop");
        assert_eq!(tokens.concat(), full_text[..at]);
        assert!(tokens.iter().all(|t| !t.is_empty()));
        assert!(
            completion <= 7,
            "stopped by the 7th token, took {completion}"
        );
        // A stop that never matches: same text as without it, finish "length".
        let r = chat("stop test", json!({"max_tokens": 40, "stop": "zzz"}));
        let (tokens, finish, ..) = run_all(&sim, &r).await;
        assert_eq!(
            (tokens.concat(), finish.as_str()),
            (full_text.clone(), "length")
        );
    }

    /// Runs a script to the end: (pieces, finish_reason, steps).
    fn script_pieces(r: &InferenceRequest) -> (Vec<Option<String>>, &'static str, u32) {
        let mut script = SimScript::new(&fast(0), r);
        let pieces: Vec<Option<String>> = std::iter::from_fn(|| script.next_piece()).collect();
        (pieces, script.finish_reason(), script.steps)
    }

    #[test]
    fn held_back_text_is_flushed_at_length() {
        // Find a length whose text ends in "e"; with the stop "e\u{1F600}" (never generated) the
        // final "e" might begin the stop, so it is held back and must be flushed at the end.
        let Some((n, plain)) = (1..200).find_map(|n| {
            let r = chat("hold", json!({"max_tokens": n}));
            let text: String = script_pieces(&r).0.into_iter().flatten().collect();
            text.ends_with('e').then_some((n, text))
        }) else {
            panic!("no generated text ends in 'e'")
        };
        let r = chat("hold", json!({"max_tokens": n, "stop": ["e\u{1F600}"]}));
        let (pieces, finish, steps) = script_pieces(&r);
        assert_eq!(pieces.iter().flatten().cloned().collect::<String>(), plain);
        assert_eq!((finish, steps), ("length", n));
        assert_eq!(pieces.len() as u32, n + 1, "n steps plus the flush");
        // The last step emitted its word without the final "e", which the flush then released.
        assert_eq!(pieces[n as usize].as_deref(), Some("e"));
        assert!(pieces[n as usize - 1]
            .as_deref()
            .is_some_and(|t| !t.ends_with('e')));
    }

    #[tokio::test(start_paused = true)]
    async fn paces_on_the_virtual_clock() {
        let config = SimConfig {
            ttft_ms: 250,
            tokens_per_s: 40.0,
            seed: 0,
        };
        let sim = SimBackend::new(config);
        let start = Instant::now();
        let mut g = match sim.start(&chat("pace", json!({"max_tokens": 6}))) {
            Ok(g) => g,
            Err(e) => panic!("{e}"),
        };
        let mut arrivals = Vec::new();
        while let Some(Ok(ev)) = g.next().await {
            arrivals.push(Instant::now() - start);
            if matches!(ev, BackendEvent::Done { .. }) {
                break;
            }
        }
        let expected: Vec<Duration> = (0..6)
            .map(|k| Duration::from_millis(250 + 25 * k))
            .chain([Duration::from_millis(375)])
            .collect();
        assert_eq!(
            arrivals, expected,
            "TTFT 250 ms, then one token per 25 ms, Done with the last"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn zero_delay_mode_never_sleeps() {
        let sim = SimBackend::new(fast(0));
        let start = Instant::now();
        let (tokens, ..) = run_all(&sim, &chat("fast", json!({"max_tokens": 500}))).await;
        assert_eq!(tokens.len(), 500);
        // With a paused clock any sleep would advance virtual time.
        assert_eq!(Instant::now(), start);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_generation_stops_the_task_promptly() {
        let sim = SimBackend::new(SimConfig {
            ttft_ms: 0,
            tokens_per_s: 0.01,
            seed: 0,
        });
        let mut active = sim.watch_active();
        let start = Instant::now();
        let mut g = match sim.start(&chat("cancel", json!({"max_tokens": 1000}))) {
            Ok(g) => g,
            Err(e) => panic!("{e}"),
        };
        assert!(matches!(
            g.next().await,
            Some(Ok(BackendEvent::Token { .. }))
        ));
        assert_eq!(sim.active(), 1);
        drop(g);
        let waited = active.wait_for(|n| *n == 0).await.map(|n| *n);
        assert_eq!(waited.ok(), Some(0));
        // The next token was due 100 s later; the task ended without waiting for it.
        assert!(Instant::now() - start < Duration::from_secs(1));
    }
}
