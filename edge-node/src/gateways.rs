//! Which gateway the node dials, as a sans-IO machine: `handle_*(now, ..)` in, `poll(now)` out.
//!
//! A node may know several gateways (a federation). At the start of a round it measures the
//! round trip to each (a QUIC handshake, done by the caller after [`Action::Probe`]) and dials
//! them in order of that round trip. Losing the gateway it was registered with moves it to the
//! next best at once, with no backoff: backing off only makes sense once every gateway failed,
//! which ends the round. Then it waits the jittered exponential backoff, fetches the list again
//! (with a bootstrap URL) and probes again.
//!
//! With one gateway this is the node's classic behaviour: no probe, backoff after every failure,
//! and a fast-redial window after a silent path.

use crate::backoff::Backoff;
use std::time::{Duration, Instant};

/// After the gateway went silent, connection attempts are retried at once, each bounded by a
/// short timeout, for this long; then the usual backoff applies.
pub const FAST_REDIAL_WINDOW: Duration = Duration::from_secs(15);
/// Bounds on one fast connection attempt (six round trips of the last connection, within these).
pub const FAST_ATTEMPT_MIN: Duration = Duration::from_millis(250);
pub const FAST_ATTEMPT_MAX: Duration = Duration::from_secs(3);

/// What the driver should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fetch the gateway list from the bootstrap URL, then call [`Selector::handle_fetched`].
    Fetch,
    /// Measure the round trip to every candidate, then call [`Selector::handle_probed`].
    Probe,
    /// Dial candidate `index` (bounded by [`Selector::attempt_timeout`]), then call
    /// [`Selector::handle_registered`] or [`Selector::handle_connect_failed`].
    Connect(usize),
    /// Nothing to do before this instant; call `poll` again then.
    WaitUntil(Instant),
    /// Every gateway the node knows presented a certificate it does not trust (a pin
    /// mismatch): nothing is left to dial, and retrying would fail the same way.
    GiveUp,
}

#[derive(Debug, Clone)]
struct Candidate {
    address: String,
    /// The last measured round trip; `None` before a probe or when the probe failed.
    rtt: Option<Duration>,
    /// Failed (or lost) in this round: not dialled again until the next round.
    tried: bool,
}

/// The selection and backoff state of one node.
#[derive(Debug, Clone)]
pub struct Selector {
    candidates: Vec<Candidate>,
    backoff: Backoff,
    /// The list comes from a bootstrap URL and is fetched at each round's start.
    bootstrap: bool,
    /// The list must be fetched before the next round.
    stale: bool,
    /// The candidates' round trips were measured for this round.
    probed: bool,
    wait_until: Option<Instant>,
    connect_timeout: Duration,
    /// After a silent path: until when attempts are fast, and their bound.
    fast: Option<(Instant, Duration)>,
    current: Option<usize>,
    /// Addresses that presented an untrusted certificate: never dialled again, whatever list
    /// a later fetch brings.
    untrusted: Vec<String>,
}

impl Selector {
    /// A selector over fixed `addresses` (`bootstrap` false) or over a list fetched at run
    /// time (`bootstrap` true; `addresses` is then empty until [`Selector::handle_fetched`]).
    pub fn new(
        addresses: Vec<String>,
        bootstrap: bool,
        backoff: Backoff,
        connect_timeout: Duration,
    ) -> Selector {
        Selector {
            candidates: addresses.into_iter().map(candidate).collect(),
            backoff,
            bootstrap,
            stale: bootstrap,
            probed: false,
            wait_until: None,
            connect_timeout,
            fast: None,
            current: None,
            untrusted: Vec::new(),
        }
    }

    /// The candidate's address.
    pub fn address(&self, index: usize) -> &str {
        self.candidates
            .get(index)
            .map(|c| c.address.as_str())
            .unwrap_or("")
    }

    /// Every candidate's address, in list order (the indices of `Connect` and `handle_probed`).
    pub fn addresses(&self) -> Vec<String> {
        self.candidates.iter().map(|c| c.address.clone()).collect()
    }

    /// The candidate the node is registered with, if any.
    pub fn current(&self) -> Option<usize> {
        self.current
    }

    /// Failed attempts since the last registration (for the status).
    pub fn attempts(&self) -> u32 {
        self.backoff.attempts()
    }

    fn several(&self) -> bool {
        self.bootstrap || self.candidates.len() > 1
    }

    /// The bound on the next probe or connection attempt: short after a silent path (a new
    /// attempt speaks at once, while QUIC backs off an old one's retransmissions), and the
    /// configured connect timeout when another gateway could be tried instead; `None` (QUIC's
    /// own idle timeout) for a lone gateway otherwise.
    pub fn attempt_timeout(&self, now: Instant) -> Option<Duration> {
        let fast = self
            .fast
            .filter(|(until, _)| now < *until)
            .map(|(_, limit)| limit);
        let several = self.several().then_some(self.connect_timeout);
        match (fast, several) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether candidate `index` presented an untrusted certificate (it is never dialled).
    pub fn is_untrusted(&self, index: usize) -> bool {
        self.candidates
            .get(index)
            .is_some_and(|c| self.untrusted.contains(&c.address))
    }

    fn all_untrusted(&self) -> bool {
        !self.candidates.is_empty()
            && self
                .candidates
                .iter()
                .all(|c| self.untrusted.contains(&c.address))
    }

    /// Candidates that presented an untrusted certificate count as tried in every round.
    fn skip_untrusted(&mut self) {
        for c in &mut self.candidates {
            if self.untrusted.contains(&c.address) {
                c.tried = true;
            }
        }
    }

    /// What to do now.
    pub fn poll(&mut self, now: Instant) -> Action {
        if self.all_untrusted() && !self.stale {
            return Action::GiveUp;
        }
        if let Some(until) = self.wait_until {
            if now < until {
                return Action::WaitUntil(until);
            }
            self.wait_until = None;
        }
        if self.stale {
            return Action::Fetch;
        }
        if self.several() && !self.probed && self.candidates.iter().any(|c| !c.tried) {
            return Action::Probe;
        }
        match self.best_untried() {
            Some(i) => Action::Connect(i),
            None => {
                self.end_round(now, 0.5);
                self.poll(now)
            }
        }
    }

    /// The lowest measured round trip among the untried candidates; unmeasured ones after the
    /// measured, in list order.
    fn best_untried(&self) -> Option<usize> {
        self.candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.tried)
            .min_by_key(|(i, c)| (c.rtt.is_none(), c.rtt, *i))
            .map(|(i, _)| i)
    }

    /// Every candidate failed: wait the backoff, then start a new round (fetching the list again
    /// with a bootstrap URL, and probing again).
    fn end_round(&mut self, now: Instant, unit_random: f64) {
        let wait = self.backoff.next_delay(unit_random);
        self.wait_until = Some(now + wait);
        self.new_round();
    }

    fn new_round(&mut self) {
        for c in &mut self.candidates {
            c.tried = false;
        }
        self.skip_untrusted();
        self.probed = false;
        self.stale = self.bootstrap;
    }

    fn round_exhausted(&self) -> bool {
        self.candidates.iter().all(|c| c.tried)
    }

    /// The bootstrap list arrived (`Ok`) or could not be had (`Err`: the previous list, if
    /// any, is kept). The list is deduplicated and bounded by the caller's parser.
    pub fn handle_fetched(
        &mut self,
        now: Instant,
        list: Result<Vec<String>, String>,
        unit_random: f64,
    ) {
        self.stale = false;
        if let Ok(addresses) = list {
            // Keep what was measured for gateways that stay on the list.
            let old = std::mem::take(&mut self.candidates);
            self.candidates = addresses
                .into_iter()
                .map(|a| match old.iter().find(|c| c.address == a) {
                    Some(c) => Candidate {
                        tried: false,
                        ..c.clone()
                    },
                    None => candidate(a),
                })
                .collect();
            self.current = None;
            self.skip_untrusted();
        }
        if self.all_untrusted() {
            // Checked by `poll` first: the node stops.
            return;
        }
        if self.candidates.is_empty() {
            // Nothing to dial: back off and fetch again.
            self.end_round(now, unit_random);
        }
    }

    /// Round trips measured at the start of a round, by candidate index (`None`: the probe
    /// failed or timed out). A candidate whose probe failed is not dialled in this round.
    pub fn handle_probed(&mut self, now: Instant, rtts: &[Option<Duration>], unit_random: f64) {
        self.probed = true;
        for (c, rtt) in self.candidates.iter_mut().zip(rtts) {
            c.rtt = *rtt;
            if rtt.is_none() {
                c.tried = true;
            }
        }
        if self.round_exhausted() {
            self.end_round(now, unit_random);
        }
    }

    /// Registered with candidate `index`: the backoff starts over.
    pub fn handle_registered(&mut self, _now: Instant, index: usize) {
        self.backoff.reset();
        self.current = Some(index);
        self.fast = None;
    }

    /// Dialling or registering with `index` failed. `timed_out` says the attempt hit
    /// [`Selector::attempt_timeout`] inside a fast-redial window: then a lone gateway is
    /// dialled again at once instead of backing off (the path is likely back any moment).
    pub fn handle_connect_failed(
        &mut self,
        now: Instant,
        index: usize,
        timed_out: bool,
        unit_random: f64,
    ) {
        if let Some(c) = self.candidates.get_mut(index) {
            c.tried = true;
        }
        if self.round_exhausted() {
            let in_fast_window = self.fast.is_some_and(|(until, _)| now < until);
            if timed_out && in_fast_window {
                self.new_round();
            } else {
                self.end_round(now, unit_random);
            }
        }
    }

    /// Candidate `index` presented a certificate that is not pinned: it is never dialled
    /// again (a wrong pin or a replaced certificate is not fixed by waiting). The others are
    /// tried as after any failure; once none is left, `poll` answers [`Action::GiveUp`].
    pub fn handle_untrusted(&mut self, now: Instant, index: usize, unit_random: f64) {
        let Some(c) = self.candidates.get_mut(index) else {
            return;
        };
        c.tried = true;
        if !self.untrusted.contains(&c.address) {
            self.untrusted.push(c.address.clone());
        }
        if self.current == Some(index) {
            self.current = None;
        }
        if self.all_untrusted() {
            return;
        }
        if self.round_exhausted() {
            self.end_round(now, unit_random);
        }
    }

    /// The connection with `index` ended after registering. `silent_rtt` is set when nothing
    /// arrived from the gateway for its lease (the path is down): that opens a fast-redial
    /// window with attempts bounded by six of its round trips. Any other gateway is dialled at
    /// once, best first; the lost one only in the next round, after the backoff.
    pub fn handle_lost(
        &mut self,
        now: Instant,
        index: usize,
        silent_rtt: Option<Duration>,
        unit_random: f64,
    ) {
        self.current = None;
        if let Some(rtt) = silent_rtt {
            let limit = (rtt * 6).clamp(FAST_ATTEMPT_MIN, FAST_ATTEMPT_MAX);
            self.fast = Some((now + FAST_REDIAL_WINDOW, limit));
        }
        for c in &mut self.candidates {
            c.tried = false;
        }
        self.skip_untrusted();
        if let Some(c) = self.candidates.get_mut(index) {
            c.tried = true;
        }
        // The round trips measured at the round's start still order the others: probing again
        // now would cost a probe timeout on the lost gateway before failing over.
        self.probed = true;
        if self.round_exhausted() {
            if silent_rtt.is_some() {
                // A lone gateway whose path went silent: redial at once (fast window).
                self.new_round();
            } else {
                self.end_round(now, unit_random);
            }
        }
    }
}

/// At most this many gateways are taken from a bootstrap list (a federation is a handful of
/// regions; a longer list is truncated, not probed).
pub const MAX_BOOTSTRAP_GATEWAYS: usize = 64;
/// A bootstrap answer longer than this is refused.
pub const MAX_BOOTSTRAP_BYTES: usize = 256 * 1024;

/// The QUIC addresses in a `GET /v1/gateways` answer (`{"data":[{"quic_address": "host:port",
/// "cert_sha256": "<hex>", "live": true}, ...]}`), in list order, without duplicates. Entries
/// that are not live, have no usable address, or (when `pins` is given) whose `cert_sha256` is
/// not one of the pins are skipped: the list says where to connect, never whom to trust.
pub fn parse_gateway_list(body: &[u8], pins: Option<&[[u8; 32]]>) -> Result<Vec<String>, String> {
    if body.len() > MAX_BOOTSTRAP_BYTES {
        return Err(format!(
            "the gateway list is {} bytes; at most {MAX_BOOTSTRAP_BYTES}",
            body.len()
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the gateway list is not JSON: {e}"))?;
    let data = v
        .get("data")
        .and_then(|d| d.as_array())
        .ok_or("the gateway list has no \"data\" array")?;
    let mut out: Vec<String> = Vec::new();
    for entry in data {
        if out.len() == MAX_BOOTSTRAP_GATEWAYS {
            break;
        }
        if entry.get("live").and_then(|l| l.as_bool()) == Some(false) {
            continue;
        }
        let Some(address) = entry.get("quic_address").and_then(|a| a.as_str()) else {
            continue;
        };
        if !is_host_port(address) || out.iter().any(|a| a == address) {
            continue;
        }
        if let Some(pins) = pins {
            let pinned = entry
                .get("cert_sha256")
                .and_then(|c| c.as_str())
                .and_then(|c| nearpath_protocol::tls::parse_sha256_hex(c).ok())
                .is_some_and(|sha| pins.contains(&sha));
            if !pinned {
                continue;
            }
        }
        out.push(address.to_string());
    }
    Ok(out)
}

/// `host:port` with a non-empty host of at most 255 characters and a non-zero port.
fn is_host_port(address: &str) -> bool {
    let Some((host, port)) = address.rsplit_once(':') else {
        return false;
    };
    let host_ok = !host.is_empty()
        && host.len() <= 255
        && !host.contains(|c: char| c.is_whitespace() || c.is_control() || c == '/');
    host_ok && port.parse::<u16>().is_ok_and(|p| p != 0)
}

fn candidate(address: String) -> Candidate {
    Candidate {
        address,
        rtt: None,
        tried: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn three() -> Selector {
        Selector::new(
            vec!["a:1".into(), "b:1".into(), "c:1".into()],
            false,
            Backoff::new(250 * MS, 30_000 * MS),
            1000 * MS,
        )
    }

    fn one() -> Selector {
        Selector::new(
            vec!["a:1".into()],
            false,
            Backoff::new(250 * MS, 30_000 * MS),
            1000 * MS,
        )
    }

    #[test]
    fn probes_first_then_connects_to_the_lowest_rtt() {
        let t0 = Instant::now();
        let mut s = three();
        assert_eq!(s.poll(t0), Action::Probe);
        s.handle_probed(t0, &[Some(30 * MS), Some(5 * MS), Some(12 * MS)], 0.5);
        assert_eq!(s.poll(t0), Action::Connect(1));
        assert_eq!(s.address(1), "b:1");
        assert_eq!(s.attempt_timeout(t0), Some(1000 * MS));
    }

    #[test]
    fn losing_the_gateway_fails_over_to_the_next_best_at_once_without_backoff() {
        let t0 = Instant::now();
        let mut s = three();
        s.poll(t0);
        s.handle_probed(t0, &[Some(30 * MS), Some(5 * MS), Some(12 * MS)], 0.5);
        assert_eq!(s.poll(t0), Action::Connect(1));
        // Several failed attempts before registering grow the backoff...
        s.handle_registered(t0, 1);
        assert_eq!(s.current(), Some(1));
        let t1 = t0 + Duration::from_secs(60);
        s.handle_lost(t1, 1, None, 0.99);
        // ...but losing the gateway goes straight to the next best, at the same instant.
        assert_eq!(s.poll(t1), Action::Connect(2));
        s.handle_connect_failed(t1, 2, false, 0.99);
        assert_eq!(s.poll(t1), Action::Connect(0));
        s.handle_registered(t1, 0);
        assert_eq!(s.current(), Some(0));
    }

    #[test]
    fn backoff_applies_only_once_every_gateway_failed() {
        let t0 = Instant::now();
        let mut s = three();
        s.poll(t0);
        s.handle_probed(t0, &[Some(30 * MS), None, Some(12 * MS)], 0.0);
        // The gateway whose probe failed is not dialled in this round.
        assert_eq!(s.poll(t0), Action::Connect(2));
        s.handle_connect_failed(t0, 2, false, 0.0);
        assert_eq!(s.poll(t0), Action::Connect(0));
        s.handle_connect_failed(t0, 0, false, 0.0);
        // Round over: the floor of the backoff (half the initial 250 ms with random 0).
        let until = t0 + 125 * MS;
        assert_eq!(s.poll(t0), Action::WaitUntil(until));
        assert_eq!(s.poll(until - MS), Action::WaitUntil(until));
        // Then a new round measures again, so a gateway that came back is found.
        assert_eq!(s.poll(until), Action::Probe);
        s.handle_probed(until, &[None, Some(4 * MS), None], 0.0);
        assert_eq!(s.poll(until), Action::Connect(1));
    }

    #[test]
    fn every_probe_failing_backs_off_growing_until_a_registration_resets_it() {
        let t0 = Instant::now();
        let mut s = three();
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..4 {
            assert_eq!(s.poll(now), Action::Probe);
            s.handle_probed(now, &[None, None, None], 0.999_999);
            match s.poll(now) {
                Action::WaitUntil(t) => {
                    waits.push((t - now).as_millis() as u64);
                    now = t;
                }
                other => panic!("expected a wait, got {other:?}"),
            }
        }
        assert_eq!(s.attempts(), 4);
        // Ceilings 250, 500, 1000, 2000 with near-1 jitter.
        assert!(
            waits[0] >= 240 && waits[1] >= 490 && waits[2] >= 990 && waits[3] >= 1990,
            "{waits:?}"
        );
        assert_eq!(s.poll(now), Action::Probe);
        s.handle_probed(now, &[None, Some(MS), None], 0.5);
        assert_eq!(s.poll(now), Action::Connect(1));
        s.handle_registered(now, 1);
        assert_eq!(s.attempts(), 0);
    }

    #[test]
    fn lone_gateway_is_never_probed_and_backs_off_after_each_loss() {
        let t0 = Instant::now();
        let mut s = one();
        assert_eq!(s.poll(t0), Action::Connect(0));
        assert_eq!(s.attempt_timeout(t0), None);
        s.handle_registered(t0, 0);
        s.handle_lost(t0, 0, None, 0.0);
        assert_eq!(s.poll(t0), Action::WaitUntil(t0 + 125 * MS));
        assert_eq!(s.poll(t0 + 125 * MS), Action::Connect(0));
    }

    #[test]
    fn lone_gateway_gone_silent_is_redialled_at_once_with_short_attempts_for_the_window() {
        let t0 = Instant::now();
        let mut s = one();
        s.poll(t0);
        s.handle_registered(t0, 0);
        s.handle_lost(t0, 0, Some(20 * MS), 0.0);
        assert_eq!(s.poll(t0), Action::Connect(0));
        // Six round trips, raised to the floor.
        assert_eq!(s.attempt_timeout(t0), Some(FAST_ATTEMPT_MIN));
        let t1 = t0 + FAST_ATTEMPT_MIN;
        s.handle_connect_failed(t1, 0, true, 0.0);
        assert_eq!(s.poll(t1), Action::Connect(0));
        // After the window, a timed-out attempt backs off as usual and attempts are unbounded.
        let late = t0 + FAST_REDIAL_WINDOW;
        assert_eq!(s.attempt_timeout(late), None);
        s.handle_connect_failed(late, 0, true, 0.0);
        assert!(matches!(s.poll(late), Action::WaitUntil(_)));
    }

    #[test]
    fn silent_path_in_a_federation_bounds_attempts_by_the_shorter_of_both_limits() {
        let t0 = Instant::now();
        let mut s = three();
        s.poll(t0);
        s.handle_probed(t0, &[Some(MS), Some(2 * MS), Some(3 * MS)], 0.5);
        s.handle_registered(t0, 0);
        s.handle_lost(t0, 0, Some(Duration::from_secs(1)), 0.5);
        assert_eq!(s.attempt_timeout(t0), Some(1000 * MS));
        assert_eq!(s.poll(t0), Action::Connect(1));
    }

    #[test]
    fn bootstrap_list_is_fetched_each_round_and_an_empty_or_failed_one_backs_off() {
        let t0 = Instant::now();
        let mut s = Selector::new(
            Vec::new(),
            true,
            Backoff::new(250 * MS, 30_000 * MS),
            1000 * MS,
        );
        assert_eq!(s.poll(t0), Action::Fetch);
        s.handle_fetched(t0, Err("connection refused".into()), 0.0);
        let until = t0 + 125 * MS;
        assert_eq!(s.poll(t0), Action::WaitUntil(until));
        assert_eq!(s.poll(until), Action::Fetch);
        s.handle_fetched(until, Ok(Vec::new()), 0.0);
        assert!(matches!(s.poll(until), Action::WaitUntil(_)));
        let mut now = until + Duration::from_secs(1);
        assert_eq!(s.poll(now), Action::Fetch);
        s.handle_fetched(now, Ok(vec!["x:1".into(), "y:1".into()]), 0.0);
        // Even a list of one is probed: the next fetch may bring more.
        assert_eq!(s.poll(now), Action::Probe);
        s.handle_probed(now, &[Some(9 * MS), Some(3 * MS)], 0.0);
        assert_eq!(s.poll(now), Action::Connect(1));
        s.handle_connect_failed(now, 1, false, 0.0);
        assert_eq!(s.poll(now), Action::Connect(0));
        s.handle_connect_failed(now, 0, false, 0.0);
        match s.poll(now) {
            Action::WaitUntil(t) => now = t,
            other => panic!("{other:?}"),
        }
        // A failed fetch keeps the last list.
        assert_eq!(s.poll(now), Action::Fetch);
        s.handle_fetched(now, Err("timeout".into()), 0.0);
        assert_eq!(s.poll(now), Action::Probe);
        assert_eq!(s.addresses(), ["x:1", "y:1"]);
    }

    #[test]
    fn a_pin_mismatch_is_never_retried_and_a_lone_gateway_gives_up() {
        let t0 = Instant::now();
        let mut s = one();
        assert_eq!(s.poll(t0), Action::Connect(0));
        s.handle_untrusted(t0, 0, 0.5);
        assert!(s.is_untrusted(0));
        // No backoff and no new round: retrying fails the same way.
        assert_eq!(s.poll(t0), Action::GiveUp);
        assert_eq!(s.poll(t0 + Duration::from_secs(3600)), Action::GiveUp);
    }

    #[test]
    fn a_gateway_with_a_pin_mismatch_is_skipped_in_every_later_round() {
        let t0 = Instant::now();
        let mut s = three();
        assert_eq!(s.poll(t0), Action::Probe);
        s.handle_untrusted(t0, 1, 0.0);
        s.handle_probed(t0, &[Some(30 * MS), None, Some(12 * MS)], 0.0);
        assert_eq!(s.poll(t0), Action::Connect(2));
        s.handle_registered(t0, 2);
        s.handle_lost(t0, 2, None, 0.0);
        // Failover goes to the trusted one, never to the untrusted one.
        assert_eq!(s.poll(t0), Action::Connect(0));
        s.handle_connect_failed(t0, 0, false, 0.0);
        let mut now = match s.poll(t0) {
            Action::WaitUntil(t) => t,
            other => panic!("expected the backoff, got {other:?}"),
        };
        assert_eq!(s.poll(now), Action::Probe);
        s.handle_probed(now, &[None, Some(MS), Some(2 * MS)], 0.0);
        // Even with the best round trip, the untrusted one is not dialled.
        assert_eq!(s.poll(now), Action::Connect(2));
        s.handle_untrusted(now, 2, 0.0);
        assert!(matches!(s.poll(now), Action::WaitUntil(_)));
        now += Duration::from_secs(60);
        assert_eq!(s.poll(now), Action::Probe);
        s.handle_untrusted(now, 0, 0.0);
        assert_eq!(s.poll(now), Action::GiveUp);
    }

    #[test]
    fn an_untrusted_gateway_stays_untrusted_when_a_bootstrap_list_names_it_again() {
        let t0 = Instant::now();
        let mut s = Selector::new(
            Vec::new(),
            true,
            Backoff::new(250 * MS, 30_000 * MS),
            1000 * MS,
        );
        assert_eq!(s.poll(t0), Action::Fetch);
        s.handle_fetched(t0, Ok(vec!["x:1".into(), "y:1".into()]), 0.0);
        assert_eq!(s.poll(t0), Action::Probe);
        s.handle_untrusted(t0, 0, 0.0);
        s.handle_probed(t0, &[None, Some(MS)], 0.0);
        assert_eq!(s.poll(t0), Action::Connect(1));
        s.handle_connect_failed(t0, 1, false, 0.0);
        let now = match s.poll(t0) {
            Action::WaitUntil(t) => t,
            other => panic!("{other:?}"),
        };
        assert_eq!(s.poll(now), Action::Fetch);
        // The list now holds only the untrusted gateway.
        s.handle_fetched(now, Ok(vec!["x:1".into()]), 0.0);
        assert_eq!(s.poll(now), Action::GiveUp);
        // Forged indices are ignored.
        s.handle_untrusted(now, 99, 0.0);
        assert!(!s.is_untrusted(99));
    }

    #[test]
    fn probe_results_beyond_the_candidates_are_ignored() {
        let t0 = Instant::now();
        let mut s = three();
        s.poll(t0);
        s.handle_probed(t0, &[None, None, Some(MS), Some(MS), Some(MS)], 0.0);
        assert_eq!(s.poll(t0), Action::Connect(2));
        // Indices out of range are ignored, not a panic.
        s.handle_connect_failed(t0, 99, false, 0.0);
        s.handle_lost(t0, 99, None, 0.0);
        assert_eq!(s.address(99), "");
    }

    #[test]
    fn bootstrap_list_keeps_live_well_formed_pinned_entries_once() {
        let pin = [7u8; 32];
        let body = serde_json::json!({"object": "list", "data": [
            {"id": "a", "quic_address": "127.0.0.1:4433", "cert_sha256": hex::encode(pin), "live": true},
            {"id": "dup", "quic_address": "127.0.0.1:4433", "cert_sha256": hex::encode(pin), "live": true},
            {"id": "dead", "quic_address": "127.0.0.2:4433", "cert_sha256": hex::encode(pin), "live": false},
            {"id": "forged", "quic_address": "127.0.0.3:4433", "cert_sha256": hex::encode([8u8; 32]), "live": true},
            {"id": "nopin", "quic_address": "127.0.0.4:4433", "live": true},
            {"id": "badtype", "quic_address": 4433, "cert_sha256": hex::encode(pin)},
            {"id": "noport", "quic_address": "gw.example", "cert_sha256": hex::encode(pin)},
            {"id": "port0", "quic_address": "gw.example:0", "cert_sha256": hex::encode(pin)},
            "not an object",
            {"id": "b", "quic_address": "[::1]:4433", "cert_sha256": hex::encode(pin)}
        ]});
        let bytes = body.to_string().into_bytes();
        assert_eq!(
            parse_gateway_list(&bytes, Some(&[pin])).unwrap(),
            ["127.0.0.1:4433", "[::1]:4433"]
        );
        // Trust through a CA: every live, well-formed entry is a candidate.
        assert_eq!(
            parse_gateway_list(&bytes, None).unwrap(),
            [
                "127.0.0.1:4433",
                "127.0.0.3:4433",
                "127.0.0.4:4433",
                "[::1]:4433"
            ]
        );
    }

    #[test]
    fn bootstrap_list_refuses_huge_or_malformed_answers_and_truncates_long_lists() {
        assert!(
            parse_gateway_list(&vec![b' '; MAX_BOOTSTRAP_BYTES + 1], None)
                .unwrap_err()
                .contains("at most")
        );
        assert!(parse_gateway_list(b"<html>", None).is_err());
        assert!(parse_gateway_list(b"{\"data\": 5}", None).is_err());
        assert!(parse_gateway_list(b"[]", None).is_err());
        let long: Vec<serde_json::Value> = (0..1000)
            .map(|i| serde_json::json!({"quic_address": format!("h{i}:1")}))
            .collect();
        let body = serde_json::json!({ "data": long }).to_string();
        assert_eq!(
            parse_gateway_list(body.as_bytes(), None).unwrap().len(),
            MAX_BOOTSTRAP_GATEWAYS
        );
    }
}
