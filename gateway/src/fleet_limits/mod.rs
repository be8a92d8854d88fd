//! Fleet-wide per-key limits (issue 13, item 4): see [`book`] for the rules; this is the driver
//! that carries the book's store work out (in `spawn_blocking`) and makes admissions wait for
//! it, a bounded time.

pub mod book;

use crate::clock::SharedClock;
use crate::metrics::{labels, Metrics};
use crate::store::{FleetHold, Store};
use book::{BookConfig, CapPool, Command, Decision, Demand, LimitBook, RatePool};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The longest an admission waits for the store when its local slice is empty. Past it the
/// admission fails open (see [`Outcome::FailOpen`]).
pub const MAX_STORE_WAIT: Duration = Duration::from_secs(2);

/// The answer to an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted against the fleet's budget.
    Admit,
    /// The fleet's budget is spent: retry after this many seconds (at least 1).
    Refuse { retry_after_s: u64 },
    /// The store failed or did not answer within [`MAX_STORE_WAIT`]: the caller applies its
    /// local per-gateway limit instead (the fleet may then admit up to the limit per gateway).
    /// For concurrency pools the book already did, and this means "admitted, fail-open".
    FailOpen,
}

/// One gateway's share of every key's fleet-wide limits: the [`LimitBook`] and the store work it
/// asks for. Every store call runs in `spawn_blocking`, off the request path unless a request
/// waits for it.
pub struct FleetLimits {
    gateway_id: String,
    store: Arc<dyn Store>,
    book: Mutex<LimitBook>,
    /// Signalled after every store answer, so that waiting admissions ask the book again.
    changed: Notify,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    tick: Duration,
    max_wait: Duration,
    round_trips: AtomicU64,
    /// Held across every write of this gateway's holds (and a reservation's read and answer),
    /// so that they reach the store in order and each writes the book's reservation as it is
    /// then: a renewal computed before a reservation but written after it would otherwise put
    /// a smaller figure in the store than this gateway admits against.
    hold_writes: Mutex<()>,
}

impl FleetLimits {
    /// The limits of gateway `gateway_id` (`federation.gateway_id`), from `[federation]`.
    pub fn new(
        gateway_id: &str,
        store: Arc<dyn Store>,
        clock: SharedClock,
        metrics: Arc<Metrics>,
        config: &nearpath_config::GatewayConfig,
    ) -> Arc<FleetLimits> {
        let config = &config.federation;
        Arc::new(FleetLimits {
            gateway_id: gateway_id.to_string(),
            store,
            book: Mutex::new(LimitBook::new(BookConfig {
                slice_percent: config.limit_slice_percent,
                lease_ms: config.lease_ms,
                // The cached view of other gateways' holds refuses without a store round trip
                // for a quarter of a heartbeat: a bounded rate of store reads per key however
                // hard a full cap is hammered.
                refresh_ms: (config.heartbeat_ms / 4).max(1),
                retry_ms: 1_000,
            })),
            changed: Notify::new(),
            clock,
            metrics,
            tick: Duration::from_millis(config.heartbeat_ms.max(1)),
            max_wait: MAX_STORE_WAIT,
            round_trips: AtomicU64::new(0),
            hold_writes: Mutex::new(()),
        })
    }

    /// Store round trips made so far (leases, reservations, renewals, prunes).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    fn book(&self) -> std::sync::MutexGuard<'_, LimitBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one piece of work of `key_id` needing `demands`, waiting for the store at most
    /// [`MAX_STORE_WAIT`] when the local slices are empty.
    pub async fn admit(self: &Arc<Self>, key_id: &str, demands: &[Demand]) -> Outcome {
        let pool = demands.first().map_or("requests", |d| d.pool.as_str());
        let deadline = tokio::time::Instant::now() + self.max_wait;
        let mut waited = false;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let decision = self
                .book()
                .handle_admit(self.clock.unix_ms(), key_id, demands);
            self.pump();
            let outcome = match decision {
                Decision::Admit { .. } => Outcome::Admit,
                Decision::Refuse { retry_after_ms } => Outcome::Refuse {
                    retry_after_s: retry_after_ms.div_ceil(1_000).max(1),
                },
                Decision::FailOpen => Outcome::FailOpen,
                Decision::Wait => {
                    waited = true;
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        let now = self.clock.unix_ms();
                        let mut book = self.book();
                        for d in demands {
                            book.handle_lease_timeout(now, key_id, d.pool);
                        }
                        drop(book);
                        self.count_wait(pool, "timeout");
                        self.count_fail_open(pool);
                        return Outcome::FailOpen;
                    }
                    continue;
                }
            };
            if waited {
                let result = match outcome {
                    Outcome::Admit => "admitted",
                    Outcome::Refuse { .. } => "refused",
                    Outcome::FailOpen => "failed",
                };
                self.count_wait(pool, result);
            }
            if outcome == Outcome::FailOpen {
                self.count_fail_open(pool);
            }
            return outcome;
        }
    }

    /// Takes one slot of `key_id`'s concurrency `pool` (at most `limit` fleet-wide); on
    /// [`Outcome::Admit`] or [`Outcome::FailOpen`] the caller gives it back with
    /// [`FleetLimits::release`].
    pub async fn acquire(self: &Arc<Self>, key_id: &str, pool: CapPool, limit: u64) -> Outcome {
        let deadline = tokio::time::Instant::now() + self.max_wait;
        let mut waited = false;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let decision = self
                .book()
                .handle_acquire(self.clock.unix_ms(), key_id, pool, limit);
            self.pump();
            let outcome = match decision {
                Decision::Admit { fail_open: false } => Outcome::Admit,
                Decision::Admit { fail_open: true } | Decision::FailOpen => Outcome::FailOpen,
                Decision::Refuse { retry_after_ms } => Outcome::Refuse {
                    retry_after_s: retry_after_ms.div_ceil(1_000).max(1),
                },
                Decision::Wait => {
                    waited = true;
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        // The reservation is late: treat it as failed, so that this and the
                        // next acquisitions fall back to the local cap for a while.
                        let now = self.clock.unix_ms();
                        self.book().handle_reserve_failed(now, key_id, pool);
                        self.count_wait(pool.as_str(), "timeout");
                        continue;
                    }
                    continue;
                }
            };
            if waited {
                let result = match outcome {
                    Outcome::Admit => "admitted",
                    Outcome::Refuse { .. } => "refused",
                    Outcome::FailOpen => "failed",
                };
                self.count_wait(pool.as_str(), result);
            }
            if outcome == Outcome::FailOpen {
                self.count_fail_open(pool.as_str());
            }
            return outcome;
        }
    }

    /// Gives back one slot taken with [`FleetLimits::acquire`].
    pub fn release(&self, key_id: &str, pool: CapPool) {
        self.book().handle_release(key_id, pool);
    }

    /// Charges `units` of `pool` (tokens, after the request ended) to `key_id`.
    pub fn charge(self: &Arc<Self>, key_id: &str, pool: RatePool, limit: u64, units: u64) {
        self.book()
            .handle_charge(self.clock.unix_ms(), key_id, pool, limit, units);
        self.pump();
    }

    /// One tick: renew reservations, give idle slots back, prune the store.
    pub fn tick(self: &Arc<Self>) {
        self.book().handle_tick(self.clock.unix_ms());
        self.pump();
    }

    /// Ticks every `federation.heartbeat_ms` until `shutdown`, then gives every reservation
    /// back (so that peers need not wait for the lease to end).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(self.tick);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => self.tick(),
                _ = shutdown.cancelled() => break,
            }
        }
        self.book().handle_leave(self.clock.unix_ms());
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.pump_after_answer()).await;
    }

    /// Starts the book's queued store work, each piece on the blocking pool.
    fn pump(self: &Arc<Self>) {
        loop {
            let Some(cmd) = self.book().poll() else {
                return;
            };
            let me = self.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn_blocking(move || me.execute(cmd));
                }
                Err(_) => me.execute(cmd),
            }
        }
    }

    /// Carries out one command and feeds its answer back.
    fn execute(&self, cmd: Command) {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        match cmd {
            Command::Lease {
                key,
                pool,
                window_start_ms,
                want,
                limit,
            } => {
                let r = self
                    .store
                    .lease_units(&key, pool.as_str(), window_start_ms, want, limit);
                let now = self.clock.unix_ms();
                let result = match r {
                    Ok(granted) => {
                        self.book()
                            .handle_granted(now, &key, pool, window_start_ms, want, granted);
                        if granted == want {
                            "granted"
                        } else if granted > 0 {
                            "partial"
                        } else {
                            "spent"
                        }
                    }
                    Err(e) => {
                        tracing::warn!(pool = pool.as_str(), error = %e, "limit lease failed; admitting by the local limit for a while");
                        self.book().handle_lease_failed(now, &key, pool);
                        "failed"
                    }
                };
                self.count_lease(pool.as_str(), result);
            }
            Command::Reserve {
                key,
                pool,
                reserved,
                expires_at_ms,
            } => {
                let _writes = self.hold_writes.lock().unwrap_or_else(|p| p.into_inner());
                let hold = FleetHold {
                    gateway_id: self.gateway_id.clone(),
                    key_id: key.clone(),
                    pool: pool.as_str().to_string(),
                    held: reserved,
                    expires_at_ms,
                };
                // Publish, then read: two commits, in this order (see `book`).
                let r = self
                    .store
                    .publish_holds(&self.gateway_id, &[hold])
                    .and_then(|()| self.store.fleet_holds(Some(&key), self.clock.unix_ms()));
                let now = self.clock.unix_ms();
                let result = match r {
                    Ok(holds) => {
                        let others: u64 = holds
                            .iter()
                            .filter(|h| h.pool == pool.as_str() && h.gateway_id != self.gateway_id)
                            .fold(0u64, |a, h| a.saturating_add(h.held));
                        let mut book = self.book();
                        let limit = book.cap_limit(&key, pool);
                        book.handle_reserved(now, &key, pool, reserved, others, limit);
                        "reserved"
                    }
                    Err(e) => {
                        tracing::warn!(pool = pool.as_str(), error = %e, "concurrency reservation failed; admitting by the local cap for a while");
                        self.book().handle_reserve_failed(now, &key, pool);
                        "failed"
                    }
                };
                self.count_lease(pool.as_str(), result);
            }
            Command::Publish {
                holds,
                expires_at_ms,
            } => {
                let _writes = self.hold_writes.lock().unwrap_or_else(|p| p.into_inner());
                // What the book reserves now, not when the renewal was queued.
                let book = self.book();
                let holds: Vec<FleetHold> = holds
                    .into_iter()
                    .map(|(key_id, pool, _)| FleetHold {
                        held: book.held(&key_id, pool).1,
                        gateway_id: self.gateway_id.clone(),
                        key_id,
                        pool: pool.as_str().to_string(),
                        expires_at_ms,
                    })
                    .collect();
                drop(book);
                if let Err(e) = self.store.publish_holds(&self.gateway_id, &holds) {
                    tracing::warn!(error = %e, "renewing concurrency holds failed");
                }
            }
            Command::Prune {
                before_window_ms,
                now_ms,
            } => {
                if let Err(e) = self.store.prune_limits(before_window_ms, now_ms) {
                    tracing::debug!(error = %e, "pruning old limit windows failed");
                }
            }
        }
        self.pump_after_answer();
    }

    /// Wakes waiting admissions and starts what the answer queued (a give-back, say).
    fn pump_after_answer(&self) {
        self.changed.notify_waiters();
        // An answer may queue work (a give-back of slots that did not fit).
        let cmds: Vec<Command> = std::iter::from_fn(|| self.book().poll()).collect();
        for cmd in cmds {
            // Already on a blocking thread (or without a runtime): run it here.
            self.execute(cmd);
        }
    }

    fn count_lease(&self, pool: &'static str, result: &'static str) {
        self.metrics
            .limit_leases
            .get_or_create(&labels([("pool", pool), ("result", result)]))
            .inc();
    }

    fn count_wait(&self, pool: &'static str, result: &'static str) {
        self.metrics
            .limit_store_waits
            .get_or_create(&labels([("pool", pool), ("result", result)]))
            .inc();
    }

    fn count_fail_open(&self, pool: &'static str) {
        self.metrics
            .limit_fail_open
            .get_or_create(&labels([("pool", pool)]))
            .inc();
    }
}
