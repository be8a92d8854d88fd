//! UDP port leases for WebRTC sessions, from `game.webrtc_udp_port_min..=max`. The leases belong
//! to one gateway (its `components::Sessions`), not to the process: two gateways in one process
//! (tests, the demo) each keep their own, and the operating system's bind decides between them.

use super::WhepError;
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

/// The ports of the configured range that this gateway's live sessions hold.
#[derive(Debug, Default)]
pub struct PortLeases {
    used: Mutex<HashSet<u16>>,
}

/// A UDP port reserved for one session; released on drop. Port 0 is an ephemeral port, which
/// needs no lease.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    leases: Option<Arc<PortLeases>>,
}

impl PortLease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        if let Some(l) = &self.leases {
            l.used
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.port);
        }
    }
}

impl PortLeases {
    /// Picks a port of `min..=max` that no session of ours holds and that binds now (another
    /// process may hold it), starting at a random offset so that a just-released port is not
    /// reused at once. `(0, 0)` means an ephemeral port.
    pub fn lease(
        self: &Arc<Self>,
        min: u16,
        max: u16,
        skip: &HashSet<u16>,
    ) -> Result<PortLease, WhepError> {
        if min == 0 && max == 0 {
            return Ok(PortLease {
                port: 0,
                leases: None,
            });
        }
        let span = u32::from(max.saturating_sub(min)) + 1;
        let start = rand::random::<u32>() % span;
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        for i in 0..span {
            let port = min + ((start + i) % span) as u16;
            if used.contains(&port) || skip.contains(&port) {
                continue;
            }
            if std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
                used.insert(port);
                return Ok(PortLease {
                    port,
                    leases: Some(self.clone()),
                });
            }
        }
        Err(WhepError::NoUdpPort { min, max })
    }

    /// Ports held now.
    pub fn in_use(&self) -> usize {
        self.used.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_leased_from_the_range_and_released() {
        // A range of its own so that parallel tests do not share ports.
        let (min, max) = (47_310, 47_311);
        let leases = Arc::new(PortLeases::default());
        let none = HashSet::new();
        let a = leases.lease(min, max, &none).unwrap();
        let b = leases.lease(min, max, &none).unwrap();
        assert_ne!(a.port(), b.port());
        assert!((min..=max).contains(&a.port()) && (min..=max).contains(&b.port()));
        assert!(matches!(
            leases.lease(min, max, &none),
            Err(WhepError::NoUdpPort { .. })
        ));
        assert_eq!(leases.in_use(), 2);
        drop(a);
        assert_eq!(leases.in_use(), 1);
        assert!(leases.lease(min, max, &none).is_ok());
        assert_eq!(leases.lease(0, 0, &none).unwrap().port(), 0);
    }
}
