//! Admission of connections before anybody has proven anything: per-source handshake rate and
//! unauthenticated-connection caps for QUIC, and global and per-source connection caps for the
//! HTTP listeners. Everything here is keyed by [`SourceKey`], so one host cannot spread itself
//! over the many addresses of an IPv6 subnet.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Where a connection comes from, for per-source limits: an IPv4 address, or the /64 of an
/// IPv6 address (one subscriber line usually owns a whole /64). IPv4-mapped IPv6 addresses
/// count as their IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceKey(IpAddr);

impl SourceKey {
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(v4) => SourceKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    SourceKey(IpAddr::V6(bits.into()))
                }
            },
        }
    }
}

/// Entries kept per source before idle ones are swept (amortised over admissions).
const SWEEP_ABOVE: usize = 4096;

/// Why a QUIC connection attempt was turned away; the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuicRefusal {
    /// The source started connections faster than its token bucket allows.
    Rate,
    /// The source already holds its cap of handshaking or unauthenticated connections.
    Unauthenticated,
}

impl QuicRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            QuicRefusal::Rate => "rate",
            QuicRefusal::Unauthenticated => "unauthenticated",
        }
    }
}

/// The `[quic]` limits the gate enforces.
#[derive(Debug, Clone, Copy)]
pub struct QuicGateLimits {
    pub max_unauthenticated_per_source: u32,
    pub rate_per_s: f64,
    pub burst: f64,
}

impl From<&nearpath_config::QuicConfig> for QuicGateLimits {
    fn from(q: &nearpath_config::QuicConfig) -> Self {
        QuicGateLimits {
            max_unauthenticated_per_source: q.max_unauthenticated_per_ip,
            rate_per_s: f64::from(q.handshake_rate_per_ip_per_s),
            burst: f64::from(q.handshake_burst_per_ip),
        }
    }
}

#[derive(Debug)]
struct SourceState {
    tokens: f64,
    refilled: Instant,
    unauthenticated: u32,
}

#[derive(Debug, Default)]
struct GateState {
    sources: HashMap<SourceKey, SourceState>,
    /// Connections that have not authenticated yet, by `quinn::Connection::stable_id`.
    pending: HashMap<usize, SourceKey>,
}

/// Per-source admission of QUIC connections. A connection holds an unauthenticated slot of its
/// source from the moment its handshake is accepted until a request on it authenticates
/// (client) or it is registered (node), or until it ends.
#[derive(Debug)]
pub struct QuicGate {
    limits: QuicGateLimits,
    state: Mutex<GateState>,
    handshaking: AtomicU32,
}

impl QuicGate {
    pub fn new(limits: QuicGateLimits) -> QuicGate {
        QuicGate {
            limits,
            state: Mutex::new(GateState::default()),
            handshaking: AtomicU32::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handshakes accepted and not yet finished, gateway-wide.
    pub fn handshaking(&self) -> u32 {
        self.handshaking.load(Ordering::Relaxed)
    }

    /// Takes a handshake token and an unauthenticated slot for a connection from `ip`, or says
    /// why not. The returned guard gives the slot back when dropped, unless the connection
    /// authenticated first.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<PreAuth, QuicRefusal> {
        let key = SourceKey::of(ip);
        let l = self.limits;
        let mut st = self.lock();
        if st.sources.len() > SWEEP_ABOVE {
            // A source with no open slot whose bucket has refilled carries no information.
            st.sources.retain(|_, s| {
                s.unauthenticated > 0
                    || s.tokens + now.duration_since(s.refilled).as_secs_f64() * l.rate_per_s
                        < l.burst
            });
        }
        let s = st.sources.entry(key).or_insert(SourceState {
            tokens: l.burst,
            refilled: now,
            unauthenticated: 0,
        });
        let elapsed = now.saturating_duration_since(s.refilled).as_secs_f64();
        s.tokens = (s.tokens + elapsed * l.rate_per_s).min(l.burst);
        s.refilled = now;
        if s.unauthenticated >= l.max_unauthenticated_per_source {
            return Err(QuicRefusal::Unauthenticated);
        }
        if s.tokens < 1.0 {
            return Err(QuicRefusal::Rate);
        }
        s.tokens -= 1.0;
        s.unauthenticated += 1;
        drop(st);
        self.handshaking.fetch_add(1, Ordering::Relaxed);
        Ok(PreAuth {
            gate: self.clone(),
            key,
            conn: None,
            handshaking: true,
        })
    }

    /// Marks connection `stable_id` authenticated (or registered) and frees its source's slot.
    /// True the first time only, so the caller raises the connection's limits once.
    pub fn authenticated(&self, stable_id: usize) -> bool {
        let mut st = self.lock();
        match st.pending.remove(&stable_id) {
            Some(key) => {
                release(&mut st, key);
                true
            }
            None => false,
        }
    }

    /// Whether connection `stable_id` is still waiting to authenticate.
    pub fn is_pending(&self, stable_id: usize) -> bool {
        self.lock().pending.contains_key(&stable_id)
    }

    /// Unauthenticated connections (handshaking included) from the source of `ip`.
    pub fn unauthenticated_from(&self, ip: IpAddr) -> u32 {
        self.lock()
            .sources
            .get(&SourceKey::of(ip))
            .map_or(0, |s| s.unauthenticated)
    }
}

fn release(st: &mut GateState, key: SourceKey) {
    if let Some(s) = st.sources.get_mut(&key) {
        s.unauthenticated = s.unauthenticated.saturating_sub(1);
    }
}

/// An unauthenticated slot held by one QUIC connection (see [`QuicGate::admit`]).
#[derive(Debug)]
pub struct PreAuth {
    gate: Arc<QuicGate>,
    key: SourceKey,
    conn: Option<usize>,
    handshaking: bool,
}

impl PreAuth {
    /// The handshake finished (either way): it no longer counts as in progress.
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            self.gate.handshaking.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Ties the slot to an established connection so that [`QuicGate::authenticated`] can free
    /// it.
    pub fn bind(&mut self, stable_id: usize) {
        self.handshake_done();
        self.gate.lock().pending.insert(stable_id, self.key);
        self.conn = Some(stable_id);
    }
}

impl Drop for PreAuth {
    fn drop(&mut self) {
        self.handshake_done();
        let mut st = self.gate.lock();
        match self.conn {
            // Still pending: the connection ended without authenticating.
            Some(id) => {
                if st.pending.remove(&id).is_some() {
                    release(&mut st, self.key);
                }
            }
            None => release(&mut st, self.key),
        }
    }
}

/// Why an HTTP connection was closed at once; the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpRefusal {
    MaxConnections,
    MaxConnectionsPerIp,
}

impl HttpRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpRefusal::MaxConnections => "max_connections",
            HttpRefusal::MaxConnectionsPerIp => "max_connections_per_ip",
        }
    }
}

#[derive(Debug, Default)]
struct HttpCounts {
    total: u32,
    per_source: HashMap<SourceKey, u32>,
}

/// Counts the open connections of one HTTP listener, globally and per source.
#[derive(Debug)]
pub struct HttpConnLimits {
    max_total: u32,
    max_per_source: u32,
    counts: Mutex<HttpCounts>,
}

impl HttpConnLimits {
    pub fn new(max_total: u32, max_per_source: u32) -> Arc<HttpConnLimits> {
        Arc::new(HttpConnLimits {
            max_total,
            max_per_source,
            counts: Mutex::new(HttpCounts::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HttpCounts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new connection from `ip`, or refuses it. `per_source_exempt` is for trusted
    /// proxies, which carry many clients on their own address.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        per_source_exempt: bool,
    ) -> Result<HttpConnSlot, HttpRefusal> {
        let key = SourceKey::of(ip);
        let mut c = self.lock();
        if c.total >= self.max_total {
            return Err(HttpRefusal::MaxConnections);
        }
        let mine = c.per_source.get(&key).copied().unwrap_or(0);
        if !per_source_exempt && mine >= self.max_per_source {
            return Err(HttpRefusal::MaxConnectionsPerIp);
        }
        c.total += 1;
        *c.per_source.entry(key).or_insert(0) += 1;
        Ok(HttpConnSlot {
            limits: self.clone(),
            key,
        })
    }

    /// Open connections on the listener.
    pub fn open(&self) -> u32 {
        self.lock().total
    }
}

/// One counted HTTP connection; uncounted when dropped.
#[derive(Debug)]
pub struct HttpConnSlot {
    limits: Arc<HttpConnLimits>,
    key: SourceKey,
}

impl Drop for HttpConnSlot {
    fn drop(&mut self) {
        let mut c = self.limits.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_source.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_source.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn gate(max: u32, rate: f64, burst: f64) -> Arc<QuicGate> {
        Arc::new(QuicGate::new(QuicGateLimits {
            max_unauthenticated_per_source: max,
            rate_per_s: rate,
            burst,
        }))
    }

    #[test]
    fn ipv6_sources_are_their_64_and_mapped_ipv4_is_ipv4() {
        let a = SourceKey::of("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = SourceKey::of("2001:db8:1:2:bbbb::2".parse().unwrap());
        let c = SourceKey::of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            SourceKey::of("::ffff:192.0.2.1".parse().unwrap()),
            SourceKey::of("192.0.2.1".parse().unwrap())
        );
    }

    #[test]
    fn unauthenticated_connections_per_source_are_capped_until_they_authenticate() {
        let g = gate(2, 1000.0, 1000.0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        let mut a = g.admit(ip, now).unwrap();
        let _b = g.admit(ip, now).unwrap();
        assert_eq!(g.admit(ip, now).unwrap_err(), QuicRefusal::Unauthenticated);
        // Another source is unaffected.
        assert!(g.admit("192.0.2.2".parse().unwrap(), now).is_ok());
        a.bind(7);
        assert_eq!(g.handshaking(), 1);
        assert!(g.is_pending(7));
        assert!(g.authenticated(7));
        assert!(!g.authenticated(7), "only the first authentication counts");
        let c = g.admit(ip, now).unwrap();
        // Dropping an authenticated connection frees nothing twice.
        drop(a);
        assert_eq!(g.unauthenticated_from(ip), 2);
        drop(c);
        assert_eq!(g.unauthenticated_from(ip), 1);
    }

    #[test]
    fn handshake_rate_per_source_is_a_token_bucket() {
        let g = gate(1000, 10.0, 3.0);
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let t0 = Instant::now();
        let held: Vec<_> = (0..3).map(|_| g.admit(ip, t0).unwrap()).collect();
        assert_eq!(g.admit(ip, t0).unwrap_err(), QuicRefusal::Rate);
        // 100 ms refills one token at 10/s.
        assert!(g.admit(ip, t0 + Duration::from_millis(100)).is_ok());
        assert_eq!(
            g.admit(ip, t0 + Duration::from_millis(100)).unwrap_err(),
            QuicRefusal::Rate
        );
        drop(held);
    }

    #[test]
    fn http_connections_are_capped_globally_and_per_source() {
        let l = HttpConnLimits::new(3, 2);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let s1 = l.admit(a, false).unwrap();
        let _s2 = l.admit(a, false).unwrap();
        assert_eq!(
            l.admit(a, false).unwrap_err(),
            HttpRefusal::MaxConnectionsPerIp
        );
        let _s3 = l.admit(b, false).unwrap();
        assert_eq!(l.admit(b, true).unwrap_err(), HttpRefusal::MaxConnections);
        drop(s1);
        // A trusted proxy is exempt from the per-source cap, not from the global one.
        let _s4 = l.admit(a, true).unwrap();
        assert_eq!(l.open(), 3);
    }
}
