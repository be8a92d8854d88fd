//! The sans-IO core of fleet-wide limits: what one gateway knows of each key's shared budgets,
//! fed with the time and the store's answers (`handle_*`), asking for store work through
//! [`LimitBook::poll`]. No clocks, no sockets, no store: the driver in `mod.rs` does the I/O.
//!
//! Per-minute pools (requests, tokens, game session starts) count in windows aligned to the wall
//! clock's minutes. A gateway leases a *slice* of a window's limit from the store's shared
//! counter and admits locally from it; it asks for the next slice before the current one runs
//! out (prefetch), so a request waits for the store only when the slice is empty. The store
//! never grants beyond the limit, so the fleet admits at most the limit per window; what is
//! leased and unused when the window ends expires (at most one slice per gateway).
//!
//! Concurrency pools (inference streams, live game sessions) are counted by reservations: each
//! gateway publishes how many slots of a key it reserves (work in flight plus up to one slice
//! ahead), with an expiry it renews every tick, and reads the other gateways' live
//! reservations right after publishing. Publish-then-read, each its own commit, means that of
//! two gateways reserving at once at least one sees the other, so their sum never passes the
//! limit; a gateway that sees too much gives back what does not fit. A dead gateway stops
//! renewing and its reservations expire after the lease.

use std::collections::{HashMap, VecDeque};

/// The window length, in milliseconds (see `store::LIMIT_WINDOW_MS`).
pub const WINDOW_MS: u64 = 60_000;

/// A per-minute pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RatePool {
    Requests,
    Tokens,
    SessionStarts,
}

impl RatePool {
    /// The pool's name in the store and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RatePool::Requests => "requests",
            RatePool::Tokens => "tokens",
            RatePool::SessionStarts => "session_starts",
        }
    }
}

/// A concurrency pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CapPool {
    Streams,
    Sessions,
}

impl CapPool {
    /// The pool's name in the store and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            CapPool::Streams => "streams",
            CapPool::Sessions => "sessions",
        }
    }
}

/// What one admission needs of one per-minute pool: at least one unit left, and whether it
/// takes that unit (a request takes one of `requests` but only needs `tokens` left: its tokens
/// are charged when it ends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    pub pool: RatePool,
    pub limit: u64,
    pub take: bool,
}

/// The answer to an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Admitted; `fail_open` when admitted by the local per-gateway rule because the store
    /// failed (concurrency pools only; see [`Decision::FailOpen`] for the rates).
    Admit { fail_open: bool },
    /// The fleet's budget is spent: retry after this many milliseconds.
    Refuse { retry_after_ms: u64 },
    /// The local slice is empty and a lease is on its way: wait for the next `handle_*`.
    Wait,
    /// The store failed recently: admit by the local per-gateway limit instead.
    FailOpen,
}

/// Store work the driver carries out, feeding each result back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `Store::lease_units`; answer with [`LimitBook::handle_granted`] or
    /// [`LimitBook::handle_lease_failed`].
    Lease {
        key: String,
        pool: RatePool,
        window_start_ms: u64,
        want: u64,
        limit: u64,
    },
    /// Publish this reservation, then read the other gateways' live ones for the key; answer
    /// with [`LimitBook::handle_reserved`] or [`LimitBook::handle_reserve_failed`].
    Reserve {
        key: String,
        pool: CapPool,
        reserved: u64,
        expires_at_ms: u64,
    },
    /// Publish these reservations (renewals and give-backs; 0 removes). Fire and forget: a
    /// failed renewal is retried by the next tick.
    Publish {
        holds: Vec<(String, CapPool, u64)>,
        expires_at_ms: u64,
    },
    /// `Store::prune_limits`.
    Prune { before_window_ms: u64, now_ms: u64 },
}

/// The book's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BookConfig {
    /// `federation.limit_slice_percent`.
    pub slice_percent: u32,
    /// How long a published reservation lives without renewal (`federation.lease_ms`).
    pub lease_ms: u64,
    /// How long the cached view of other gateways' reservations may refuse without asking the
    /// store again.
    pub refresh_ms: u64,
    /// How long after a store failure the book admits by the local limit without trying the
    /// store again.
    pub retry_ms: u64,
}

impl Default for BookConfig {
    fn default() -> Self {
        BookConfig {
            slice_percent: 10,
            lease_ms: 3_000,
            refresh_ms: 250,
            retry_ms: 1_000,
        }
    }
}

/// The slice of `limit` leased at a time: `percent` of it, at least 1.
pub fn slice_of(limit: u64, percent: u32) -> u64 {
    (limit.saturating_mul(u64::from(percent)) / 100).max(1)
}

/// The start of the window holding `now_ms`.
pub fn window_of(now_ms: u64) -> u64 {
    now_ms - now_ms % WINDOW_MS
}

#[derive(Debug, Default)]
struct RateState {
    window: u64,
    /// Leased units not yet used; negative: tokens charged beyond what was leased (a debt the
    /// next lease covers first).
    balance: i64,
    /// The store granted less than asked: nothing is left in this window.
    spent: bool,
    in_flight: bool,
    failed_until: u64,
}

#[derive(Debug, Default)]
struct CapState {
    /// Work in flight here.
    held: u64,
    /// Slots this gateway has reserved in the store (held ≤ reserved, unless admitted while
    /// the store failed).
    reserved: u64,
    /// The other gateways' live reservations when last read, and when.
    others: u64,
    others_at: Option<u64>,
    in_flight: bool,
    failed_until: u64,
    /// The limit of the last acquisition.
    limit: u64,
}

/// One gateway's view of every key's shared limits.
#[derive(Debug, Default)]
pub struct LimitBook {
    config: BookConfig,
    rates: HashMap<(String, RatePool), RateState>,
    caps: HashMap<(String, CapPool), CapState>,
    out: VecDeque<Command>,
    last_prune_window: Option<u64>,
}

impl LimitBook {
    pub fn new(config: BookConfig) -> LimitBook {
        LimitBook {
            config,
            ..Default::default()
        }
    }

    /// The next store work to do.
    pub fn poll(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    fn rate(&mut self, now_ms: u64, key: &str, pool: RatePool, limit: u64) -> &mut RateState {
        let window = window_of(now_ms);
        let s = self.rates.entry((key.to_string(), pool)).or_default();
        if s.window != window {
            // Unused units of the old window expire with it; a token debt carries over, at
            // most one window's limit (so one huge charge cannot lock a key out for longer).
            s.window = window;
            s.balance = s.balance.min(0).max(-(limit.min(i64::MAX as u64) as i64));
            s.spent = false;
        }
        s
    }

    /// Queues a lease for `pool` unless one is on its way, the window is spent or the store
    /// failed recently; `want` covers any debt plus one slice.
    fn lease(&mut self, now_ms: u64, key: &str, pool: RatePool, limit: u64) {
        let slice = slice_of(limit, self.config.slice_percent);
        let s = self.rate(now_ms, key, pool, limit);
        if s.in_flight || s.spent || s.failed_until > now_ms {
            return;
        }
        s.in_flight = true;
        let want = slice.saturating_add(s.balance.min(0).unsigned_abs());
        let window_start_ms = s.window;
        self.out.push_back(Command::Lease {
            key: key.to_string(),
            pool,
            window_start_ms,
            want,
            limit,
        });
    }

    /// Admits one piece of work needing `demands` at `now_ms`: taken from the local slices when
    /// they have room (queuing a prefetch when one runs low), else waiting for a lease, refused
    /// when the window is spent, or [`Decision::FailOpen`] while the store fails.
    pub fn handle_admit(&mut self, now_ms: u64, key: &str, demands: &[Demand]) -> Decision {
        let (mut wait, mut refuse, mut fail_open) = (false, None::<u64>, false);
        for d in demands {
            let s = self.rate(now_ms, key, d.pool, d.limit);
            if s.balance >= 1 {
                continue;
            }
            if s.spent {
                let retry = s.window + WINDOW_MS - now_ms;
                refuse = Some(refuse.map_or(retry, |r| r.max(retry)));
            } else if s.failed_until > now_ms {
                fail_open = true;
            } else {
                wait = true;
                self.lease(now_ms, key, d.pool, d.limit);
            }
        }
        if fail_open {
            return Decision::FailOpen;
        }
        if let Some(retry_after_ms) = refuse {
            return Decision::Refuse { retry_after_ms };
        }
        if wait {
            return Decision::Wait;
        }
        let percent = self.config.slice_percent;
        for d in demands {
            let s = self.rate(now_ms, key, d.pool, d.limit);
            if d.take {
                s.balance -= 1;
            }
            // Prefetch once half a slice is left, so that the next requests find units here.
            let low = (slice_of(d.limit, percent) as i64 + 1) / 2;
            if s.balance < low {
                self.lease(now_ms, key, d.pool, d.limit);
            }
        }
        Decision::Admit { fail_open: false }
    }

    /// Charges `units` (tokens) used by work that has ended, at `now_ms`. The balance may go
    /// negative; the next lease covers the debt first.
    pub fn handle_charge(
        &mut self,
        now_ms: u64,
        key: &str,
        pool: RatePool,
        limit: u64,
        units: u64,
    ) {
        let cap = limit.min(i64::MAX as u64) as i64;
        let low = (slice_of(limit, self.config.slice_percent) as i64 + 1) / 2;
        let s = self.rate(now_ms, key, pool, limit);
        s.balance = s
            .balance
            .saturating_sub(units.min(i64::MAX as u64) as i64)
            .max(-cap);
        if s.balance < low {
            self.lease(now_ms, key, pool, limit);
        }
    }

    /// The store granted `granted` of the `want` units asked for `window_start_ms`.
    pub fn handle_granted(
        &mut self,
        now_ms: u64,
        key: &str,
        pool: RatePool,
        window_start_ms: u64,
        want: u64,
        granted: u64,
    ) {
        let Some(s) = self.rates.get_mut(&(key.to_string(), pool)) else {
            return;
        };
        s.in_flight = false;
        s.failed_until = 0;
        // Units of a window that has ended are of no use: they were counted in that window.
        if s.window != window_start_ms || window_of(now_ms) != window_start_ms {
            return;
        }
        s.balance = s
            .balance
            .saturating_add(granted.min(want).min(i64::MAX as u64) as i64);
        if granted < want {
            s.spent = true;
        }
    }

    /// A lease failed (store error, or the wait for it ran out): admit by the local limit for
    /// `retry_ms` before trying the store again.
    pub fn handle_lease_failed(&mut self, now_ms: u64, key: &str, pool: RatePool) {
        if let Some(s) = self.rates.get_mut(&(key.to_string(), pool)) {
            s.in_flight = false;
            s.failed_until = now_ms + self.config.retry_ms;
        }
    }

    /// A wait for a lease ran out while the lease is still on its way: like a failure, but the
    /// late answer is still credited.
    pub fn handle_lease_timeout(&mut self, now_ms: u64, key: &str, pool: RatePool) {
        if let Some(s) = self.rates.get_mut(&(key.to_string(), pool)) {
            s.failed_until = now_ms + self.config.retry_ms;
        }
    }

    /// Takes one slot of `key`'s concurrency `pool` (at most `limit` fleet-wide).
    pub fn handle_acquire(
        &mut self,
        now_ms: u64,
        key: &str,
        pool: CapPool,
        limit: u64,
    ) -> Decision {
        let c = self.config;
        let s = self.caps.entry((key.to_string(), pool)).or_default();
        s.limit = limit;
        if s.held >= limit {
            return Decision::Refuse {
                retry_after_ms: 1_000,
            };
        }
        if s.held < s.reserved.min(limit) {
            s.held += 1;
            return Decision::Admit { fail_open: false };
        }
        if s.failed_until > now_ms {
            // The store fails: the key's limit holds at this gateway alone (checked above).
            s.held += 1;
            s.reserved = s.reserved.max(s.held);
            return Decision::Admit { fail_open: true };
        }
        let fresh = s
            .others_at
            .is_some_and(|at| now_ms.saturating_sub(at) < c.refresh_ms);
        if fresh && s.others.saturating_add(s.held) >= limit {
            return Decision::Refuse {
                retry_after_ms: 1_000,
            };
        }
        if !s.in_flight {
            s.in_flight = true;
            let reserved = s
                .held
                .saturating_add(slice_of(limit, c.slice_percent))
                .min(limit);
            self.out.push_back(Command::Reserve {
                key: key.to_string(),
                pool,
                reserved,
                expires_at_ms: now_ms + c.lease_ms,
            });
        }
        Decision::Wait
    }

    /// Gives back one slot of `key`'s `pool` (the work ended). The reservation stays until the
    /// next tick, so that the next piece of work takes it without a store round trip.
    pub fn handle_release(&mut self, key: &str, pool: CapPool) {
        if let Some(s) = self.caps.get_mut(&(key.to_string(), pool)) {
            s.held = s.held.saturating_sub(1);
        }
    }

    /// The store took this gateway's reservation `asked` and then showed `others` reserved by
    /// the other gateways. What does not fit under `limit` is given back at once.
    pub fn handle_reserved(
        &mut self,
        now_ms: u64,
        key: &str,
        pool: CapPool,
        asked: u64,
        others: u64,
        limit: u64,
    ) {
        let lease_ms = self.config.lease_ms;
        let Some(s) = self.caps.get_mut(&(key.to_string(), pool)) else {
            return;
        };
        s.in_flight = false;
        s.failed_until = 0;
        s.others = others;
        s.others_at = Some(now_ms);
        let fits = limit.saturating_sub(others).min(asked).max(s.held);
        s.reserved = fits;
        if fits != asked {
            self.out.push_back(Command::Publish {
                holds: vec![(key.to_string(), pool, fits)],
                expires_at_ms: now_ms + lease_ms,
            });
        }
    }

    /// A reservation failed: admit by the local limit for `retry_ms`.
    pub fn handle_reserve_failed(&mut self, now_ms: u64, key: &str, pool: CapPool) {
        let retry = self.config.retry_ms;
        if let Some(s) = self.caps.get_mut(&(key.to_string(), pool)) {
            s.in_flight = false;
            s.failed_until = now_ms + retry;
        }
    }

    /// The periodic tick (every `federation.heartbeat_ms`): renews every reservation, shrinks
    /// each to the work in flight (idle slots go back to the fleet), forgets idle keys, and
    /// prunes the store's old windows and expired holds once per window.
    pub fn handle_tick(&mut self, now_ms: u64) {
        let mut holds = Vec::new();
        self.caps.retain(|(key, pool), s| {
            if !s.in_flight {
                if s.reserved == 0 && s.held == 0 {
                    return false;
                }
                s.reserved = s.held;
            }
            holds.push((key.clone(), *pool, s.reserved));
            true
        });
        // A reservation shrunk to 0 is published once more (as a removal), then forgotten.
        if !holds.is_empty() {
            self.out.push_back(Command::Publish {
                holds,
                expires_at_ms: now_ms + self.config.lease_ms,
            });
        }
        let window = window_of(now_ms);
        self.rates
            .retain(|_, s| s.window == window || s.balance < 0 || s.in_flight);
        if self.last_prune_window != Some(window) {
            self.last_prune_window = Some(window);
            self.out.push_back(Command::Prune {
                before_window_ms: window.saturating_sub(2 * WINDOW_MS),
                now_ms,
            });
        }
    }

    /// The gateway is leaving: every reservation goes back to the fleet at once.
    pub fn handle_leave(&mut self, now_ms: u64) {
        let holds: Vec<_> = self
            .caps
            .drain()
            .map(|((key, pool), _)| (key, pool, 0))
            .collect();
        if !holds.is_empty() {
            self.out.push_back(Command::Publish {
                holds,
                expires_at_ms: now_ms,
            });
        }
    }

    /// The limit `key`'s `pool` was last acquired under.
    pub fn cap_limit(&self, key: &str, pool: CapPool) -> u64 {
        self.caps
            .get(&(key.to_string(), pool))
            .map_or(0, |s| s.limit)
    }

    /// Work in flight here for `key`'s `pool`, and what this gateway reserves of it.
    pub fn held(&self, key: &str, pool: CapPool) -> (u64, u64) {
        self.caps
            .get(&(key.to_string(), pool))
            .map_or((0, 0), |s| (s.held, s.reserved))
    }

    /// Leased units left here in `key`'s current window of `pool`.
    pub fn balance(&self, key: &str, pool: RatePool) -> i64 {
        self.rates
            .get(&(key.to_string(), pool))
            .map_or(0, |s| s.balance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000_000; // a minute boundary
    const K: &str = "key_1";

    fn req(limit: u64) -> [Demand; 1] {
        [Demand {
            pool: RatePool::Requests,
            limit,
            take: true,
        }]
    }

    /// The shared store, as the SQL does it: counters never granting past the limit, and holds
    /// per gateway with an expiry.
    #[derive(Default)]
    struct FakeStore {
        used: HashMap<(String, &'static str, u64), u64>,
        holds: HashMap<(String, &'static str, usize), (u64, u64)>,
        trips: u64,
    }

    impl FakeStore {
        fn others(&self, key: &str, pool: CapPool, me: usize, now_ms: u64) -> u64 {
            self.holds
                .iter()
                .filter(|((k, p, g), (_, exp))| {
                    k == key && *p == pool.as_str() && *g != me && *exp > now_ms
                })
                .map(|(_, (h, _))| *h)
                .sum()
        }

        fn publish(&mut self, me: usize, key: &str, pool: CapPool, held: u64, exp: u64) {
            self.holds
                .insert((key.to_string(), pool.as_str(), me), (held, exp));
        }

        /// Carries out every command `book` (gateway `me`) has queued, answering at once.
        fn serve(&mut self, me: usize, book: &mut LimitBook, now_ms: u64, cap_limit: u64) {
            while let Some(c) = book.poll() {
                self.trips += 1;
                match c {
                    Command::Lease {
                        key,
                        pool,
                        window_start_ms,
                        want,
                        limit,
                    } => {
                        let used = self
                            .used
                            .entry((key.clone(), pool.as_str(), window_start_ms))
                            .or_default();
                        let granted = want.min(limit.saturating_sub(*used));
                        *used += granted;
                        book.handle_granted(now_ms, &key, pool, window_start_ms, want, granted);
                    }
                    Command::Reserve {
                        key,
                        pool,
                        reserved,
                        expires_at_ms,
                    } => {
                        self.publish(me, &key, pool, reserved, expires_at_ms);
                        let others = self.others(&key, pool, me, now_ms);
                        book.handle_reserved(now_ms, &key, pool, reserved, others, cap_limit);
                    }
                    Command::Publish {
                        holds,
                        expires_at_ms,
                    } => {
                        for (key, pool, held) in holds {
                            self.publish(me, &key, pool, held, expires_at_ms);
                        }
                    }
                    Command::Prune { .. } => {}
                }
            }
        }
    }

    /// Admits through `book`, serving its store work and asking again while it waits.
    fn admit(
        store: &mut FakeStore,
        me: usize,
        book: &mut LimitBook,
        now: u64,
        d: &[Demand],
    ) -> Decision {
        loop {
            let r = book.handle_admit(now, K, d);
            store.serve(me, book, now, 0);
            if r != Decision::Wait {
                return r;
            }
        }
    }

    #[test]
    fn a_slice_is_leased_then_used_locally_with_a_prefetch_at_half() {
        let mut book = LimitBook::new(BookConfig::default());
        // 100/min, 10 % slices: the first request waits for a lease of 10.
        assert_eq!(book.handle_admit(T0, K, &req(100)), Decision::Wait);
        let lease = book.poll().expect("lease");
        assert_eq!(
            lease,
            Command::Lease {
                key: K.into(),
                pool: RatePool::Requests,
                window_start_ms: T0,
                want: 10,
                limit: 100
            }
        );
        // Asking again while it is on its way queues no second lease.
        assert_eq!(book.handle_admit(T0, K, &req(100)), Decision::Wait);
        assert_eq!(book.poll(), None);
        book.handle_granted(T0, K, RatePool::Requests, T0, 10, 10);
        // Five admissions from the slice without the store; the sixth leaves 4 < 5: prefetch.
        for _ in 0..5 {
            assert_eq!(
                book.handle_admit(T0, K, &req(100)),
                Decision::Admit { fail_open: false }
            );
            assert_eq!(book.poll(), None);
        }
        assert_eq!(
            book.handle_admit(T0, K, &req(100)),
            Decision::Admit { fail_open: false }
        );
        assert!(matches!(book.poll(), Some(Command::Lease { want: 10, .. })));
        // The rest of the slice still admits while the prefetch is on its way.
        for _ in 0..4 {
            assert_eq!(
                book.handle_admit(T0, K, &req(100)),
                Decision::Admit { fail_open: false }
            );
        }
        assert_eq!(book.poll(), None);
        assert_eq!(book.balance(K, RatePool::Requests), 0);
    }

    #[test]
    fn three_gateways_admit_the_limit_per_window_and_not_one_more() {
        for (limit, percent) in [(10u64, 10u32), (100, 10), (1_000, 10), (7, 50), (50, 100)] {
            let mut store = FakeStore::default();
            let config = BookConfig {
                slice_percent: percent,
                ..Default::default()
            };
            let mut books: Vec<_> = (0..3).map(|_| LimitBook::new(config)).collect();
            let mut admitted = 0;
            // Round-robin hammering within one window, 10 times the limit.
            for i in 0..(limit * 10) as usize {
                let g = i % 3;
                let now = T0 + i as u64;
                if let Decision::Admit { .. } =
                    admit(&mut store, g, &mut books[g], now, &req(limit))
                {
                    admitted += 1;
                }
            }
            assert!(admitted <= limit, "{admitted} > {limit}");
            // Units leased but unused at the end: at most one slice per gateway.
            let slice = slice_of(limit, percent);
            assert!(admitted + 3 * slice >= limit, "{admitted} of {limit}");
            // A hammered window ends with nothing left anywhere: every leased unit was used.
            assert_eq!(admitted, limit, "limit {limit}, {percent} %");
            // Store round trips per request: about one per slice.
            assert!(store.trips <= limit / slice + 6, "{} trips", store.trips);
        }
    }

    #[test]
    fn a_spent_window_refuses_until_it_ends_and_the_next_one_starts_fresh() {
        let mut store = FakeStore::default();
        let mut book = LimitBook::new(BookConfig::default());
        for _ in 0..10 {
            assert!(matches!(
                admit(&mut store, 0, &mut book, T0 + 1_000, &req(10)),
                Decision::Admit { .. }
            ));
        }
        assert_eq!(
            admit(&mut store, 0, &mut book, T0 + 1_000, &req(10)),
            Decision::Refuse {
                retry_after_ms: 59_000
            }
        );
        // Refusals in a spent window cost no store round trip.
        let trips = store.trips;
        assert!(matches!(
            admit(&mut store, 0, &mut book, T0 + 59_999, &req(10)),
            Decision::Refuse { retry_after_ms: 1 }
        ));
        assert_eq!(store.trips, trips);
        assert!(matches!(
            admit(&mut store, 0, &mut book, T0 + WINDOW_MS, &req(10)),
            Decision::Admit { .. }
        ));
    }

    #[test]
    fn unused_units_expire_at_the_window_end_and_a_late_grant_for_an_old_window_is_dropped() {
        let mut book = LimitBook::new(BookConfig::default());
        assert_eq!(book.handle_admit(T0, K, &req(100)), Decision::Wait);
        let _ = book.poll();
        book.handle_granted(T0, K, RatePool::Requests, T0, 10, 10);
        assert_eq!(book.balance(K, RatePool::Requests), 10);
        // Next window: the 10 units are gone; the first request waits for a new lease.
        assert_eq!(
            book.handle_admit(T0 + WINDOW_MS, K, &req(100)),
            Decision::Wait
        );
        assert_eq!(book.balance(K, RatePool::Requests), 0);
        let Some(Command::Lease {
            window_start_ms, ..
        }) = book.poll()
        else {
            panic!("lease")
        };
        assert_eq!(window_start_ms, T0 + WINDOW_MS);
        // A grant answering a lease of the old window is not credited to the new one.
        book.handle_granted(T0 + WINDOW_MS, K, RatePool::Requests, T0, 10, 10);
        assert_eq!(book.balance(K, RatePool::Requests), 0);
        // A grant that arrives after its window ended is not credited either.
        book.handle_granted(
            T0 + 2 * WINDOW_MS,
            K,
            RatePool::Requests,
            T0 + WINDOW_MS,
            10,
            10,
        );
        assert_eq!(book.balance(K, RatePool::Requests), 0);
    }

    #[test]
    fn tokens_are_charged_after_the_fact_and_a_debt_is_leased_first_and_capped_at_the_limit() {
        let mut store = FakeStore::default();
        let mut book = LimitBook::new(BookConfig::default());
        let tokens = [Demand {
            pool: RatePool::Tokens,
            limit: 1_000,
            take: false,
        }];
        assert!(matches!(
            admit(&mut store, 0, &mut book, T0, &tokens),
            Decision::Admit { .. }
        ));
        assert_eq!(book.balance(K, RatePool::Tokens), 100);
        // A request used 350 tokens: 250 of debt, leased with the next slice (350 asked).
        book.handle_charge(T0, K, RatePool::Tokens, 1_000, 350);
        assert!(matches!(
            book.poll(),
            Some(Command::Lease { want: 350, .. })
        ));
        book.handle_granted(T0, K, RatePool::Tokens, T0, 350, 350);
        assert_eq!(book.balance(K, RatePool::Tokens), 100);
        // A huge charge is capped at one window's limit of debt, and carried into the next
        // window (the window it was charged in is spent by then).
        book.handle_charge(T0, K, RatePool::Tokens, 1_000, u64::MAX);
        assert_eq!(book.balance(K, RatePool::Tokens), -1_000);
        // The store had granted 100 of this window (the 350 above were answered by hand): the
        // lease of 1,100 gets the 900 left, and the window is spent.
        store.serve(0, &mut book, T0, 0);
        assert_eq!(book.balance(K, RatePool::Tokens), -100);
        assert!(matches!(
            admit(&mut store, 0, &mut book, T0 + 1, &tokens),
            Decision::Refuse { .. }
        ));
        assert_eq!(
            book.handle_admit(T0 + WINDOW_MS, K, &tokens),
            Decision::Wait
        );
        assert_eq!(book.balance(K, RatePool::Tokens), -100);
        assert!(matches!(
            book.poll(),
            Some(Command::Lease { want: 200, .. })
        ));
    }

    #[test]
    fn a_failed_lease_fails_open_for_a_while_then_tries_the_store_again() {
        let mut book = LimitBook::new(BookConfig::default());
        assert_eq!(book.handle_admit(T0, K, &req(10)), Decision::Wait);
        let _ = book.poll();
        book.handle_lease_failed(T0 + 5, K, RatePool::Requests);
        assert_eq!(book.handle_admit(T0 + 5, K, &req(10)), Decision::FailOpen);
        assert_eq!(book.poll(), None);
        assert_eq!(
            book.handle_admit(T0 + 1_004, K, &req(10)),
            Decision::FailOpen
        );
        assert_eq!(book.handle_admit(T0 + 1_005, K, &req(10)), Decision::Wait);
        assert!(matches!(book.poll(), Some(Command::Lease { .. })));
        // A wait that ran out fails open too, and the late answer is still credited.
        book.handle_lease_timeout(T0 + 1_006, K, RatePool::Requests);
        assert_eq!(
            book.handle_admit(T0 + 1_006, K, &req(10)),
            Decision::FailOpen
        );
        book.handle_granted(T0 + 1_007, K, RatePool::Requests, T0, 1, 1);
        assert_eq!(
            book.handle_admit(T0 + 1_008, K, &req(10)),
            Decision::Admit { fail_open: false }
        );
    }

    fn acquire(
        store: &mut FakeStore,
        me: usize,
        book: &mut LimitBook,
        now: u64,
        limit: u64,
    ) -> Decision {
        loop {
            let r = book.handle_acquire(now, K, CapPool::Streams, limit);
            store.serve(me, book, now, limit);
            if r != Decision::Wait {
                return r;
            }
        }
    }

    #[test]
    fn a_concurrency_cap_holds_across_three_gateways_and_freed_slots_move() {
        let mut store = FakeStore::default();
        let mut books: Vec<_> = (0..3)
            .map(|_| LimitBook::new(BookConfig::default()))
            .collect();
        let mut admitted = 0;
        for i in 0..12 {
            let g = i % 3;
            if let Decision::Admit { .. } = acquire(&mut store, g, &mut books[g], T0, 4) {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 4);
        let held: u64 = (0..3).map(|g| books[g].held(K, CapPool::Streams).0).sum();
        assert_eq!(held, 4);
        // Gateway 0 ends its work; after its tick gives the slots back, gateway 2 may take them.
        let (h0, _) = books[0].held(K, CapPool::Streams);
        for _ in 0..h0 {
            books[0].handle_release(K, CapPool::Streams);
        }
        books[0].handle_tick(T0 + 300);
        store.serve(0, &mut books[0], T0 + 300, 4);
        for _ in 0..h0 {
            assert!(matches!(
                acquire(&mut store, 2, &mut books[2], T0 + 300, 4),
                Decision::Admit { .. }
            ));
        }
        assert!(matches!(
            acquire(&mut store, 2, &mut books[2], T0 + 300, 4),
            Decision::Refuse { .. }
        ));
    }

    #[test]
    fn two_gateways_reserving_at_once_never_pass_the_cap_together() {
        // Both publish before either reads: each sees the other and gives back what does not
        // fit; neither may end above limit minus what the other published.
        let mut store = FakeStore::default();
        let (mut a, mut b) = (
            LimitBook::new(BookConfig {
                slice_percent: 100,
                ..Default::default()
            }),
            LimitBook::new(BookConfig {
                slice_percent: 100,
                ..Default::default()
            }),
        );
        assert_eq!(a.handle_acquire(T0, K, CapPool::Streams, 4), Decision::Wait);
        assert_eq!(b.handle_acquire(T0, K, CapPool::Streams, 4), Decision::Wait);
        let (
            Some(Command::Reserve { reserved: ra, .. }),
            Some(Command::Reserve { reserved: rb, .. }),
        ) = (a.poll(), b.poll())
        else {
            panic!("reserves")
        };
        assert_eq!((ra, rb), (4, 4));
        store.publish(0, K, CapPool::Streams, ra, T0 + 3_000);
        store.publish(1, K, CapPool::Streams, rb, T0 + 3_000);
        let (oa, ob) = (
            store.others(K, CapPool::Streams, 0, T0),
            store.others(K, CapPool::Streams, 1, T0),
        );
        a.handle_reserved(T0, K, CapPool::Streams, ra, oa, 4);
        b.handle_reserved(T0, K, CapPool::Streams, rb, ob, 4);
        store.serve(0, &mut a, T0, 4);
        store.serve(1, &mut b, T0, 4);
        let (_, fa) = a.held(K, CapPool::Streams);
        let (_, fb) = b.held(K, CapPool::Streams);
        assert!(fa + fb <= 4, "{fa} + {fb}");
        // Both refuse now from the cached view (no store trip) until it is stale.
        let trips = store.trips;
        assert!(matches!(
            a.handle_acquire(T0 + 1, K, CapPool::Streams, 4),
            Decision::Refuse { .. }
        ));
        assert_eq!(store.trips, trips);
        assert_eq!(a.poll(), None);
    }

    #[test]
    fn a_dead_gateways_holds_expire_after_its_lease() {
        let mut store = FakeStore::default();
        let mut dead = LimitBook::new(BookConfig::default());
        let mut live = LimitBook::new(BookConfig::default());
        for _ in 0..4 {
            assert!(matches!(
                acquire(&mut store, 0, &mut dead, T0, 4),
                Decision::Admit { .. }
            ));
        }
        // Gateway 0 dies: no more ticks. Within its lease its holds still count.
        assert!(matches!(
            acquire(&mut store, 1, &mut live, T0 + 2_999, 4),
            Decision::Refuse { .. }
        ));
        // The cached view refuses without the store until it is stale, then the store is asked
        // again; past the lease the dead gateway's holds are gone.
        assert!(matches!(
            acquire(&mut store, 1, &mut live, T0 + 3_000, 4),
            Decision::Refuse { .. }
        ));
        assert!(matches!(
            acquire(&mut store, 1, &mut live, T0 + 3_250, 4),
            Decision::Admit { .. }
        ));
        // A live gateway's ticks keep its holds: they renew before the lease ends.
        live.handle_tick(T0 + 4_000);
        store.serve(1, &mut live, T0 + 4_000, 4);
        let mut third = LimitBook::new(BookConfig::default());
        let mut got = 0;
        for _ in 0..4 {
            if let Decision::Admit { .. } = acquire(&mut store, 2, &mut third, T0 + 6_500, 4) {
                got += 1;
            }
        }
        assert_eq!(got, 3);
    }

    #[test]
    fn a_failed_reservation_admits_by_the_local_cap_only() {
        let mut book = LimitBook::new(BookConfig::default());
        assert_eq!(
            book.handle_acquire(T0, K, CapPool::Sessions, 2),
            Decision::Wait
        );
        let _ = book.poll();
        book.handle_reserve_failed(T0, K, CapPool::Sessions);
        assert_eq!(
            book.handle_acquire(T0, K, CapPool::Sessions, 2),
            Decision::Admit { fail_open: true }
        );
        assert_eq!(
            book.handle_acquire(T0, K, CapPool::Sessions, 2),
            Decision::Admit { fail_open: true }
        );
        assert!(matches!(
            book.handle_acquire(T0, K, CapPool::Sessions, 2),
            Decision::Refuse { .. }
        ));
        // The next tick publishes what it holds, so the fleet counts it.
        book.handle_tick(T0 + 1_000);
        let Some(Command::Publish { holds, .. }) = book.poll() else {
            panic!("publish")
        };
        assert_eq!(holds, vec![(K.to_string(), CapPool::Sessions, 2)]);
    }

    #[test]
    fn ticks_give_idle_slots_back_and_forget_idle_keys() {
        let mut store = FakeStore::default();
        let mut book = LimitBook::new(BookConfig {
            slice_percent: 50,
            ..Default::default()
        });
        assert!(matches!(
            acquire(&mut store, 0, &mut book, T0, 4),
            Decision::Admit { .. }
        ));
        assert_eq!(book.held(K, CapPool::Streams), (1, 2));
        // The prune of the first tick aside, each tick publishes the reservation shrunk to
        // the work in flight.
        let publishes = |book: &mut LimitBook| {
            std::iter::from_fn(|| book.poll())
                .filter(|c| !matches!(c, Command::Prune { .. }))
                .collect::<Vec<_>>()
        };
        book.handle_tick(T0 + 1_000);
        assert!(
            matches!(&publishes(&mut book)[..], [Command::Publish { holds, .. }] if holds == &vec![(K.to_string(), CapPool::Streams, 1)])
        );
        book.handle_release(K, CapPool::Streams);
        book.handle_tick(T0 + 2_000);
        assert!(
            matches!(&publishes(&mut book)[..], [Command::Publish { holds, .. }] if holds == &vec![(K.to_string(), CapPool::Streams, 0)])
        );
        book.handle_tick(T0 + 3_000);
        assert!(publishes(&mut book).is_empty());
        assert_eq!(book.held(K, CapPool::Streams), (0, 0));
    }

    #[test]
    fn prune_is_asked_once_per_window() {
        let mut book = LimitBook::new(BookConfig::default());
        book.handle_tick(T0 + 10);
        assert_eq!(
            book.poll(),
            Some(Command::Prune {
                before_window_ms: T0 - 2 * WINDOW_MS,
                now_ms: T0 + 10
            })
        );
        book.handle_tick(T0 + 20);
        assert_eq!(book.poll(), None);
        book.handle_tick(T0 + WINDOW_MS);
        assert!(matches!(book.poll(), Some(Command::Prune { .. })));
    }
}
