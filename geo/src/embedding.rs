//! IPv6 addresses that carry an IPv4 address: the address a lookup must locate is the IPv4 one.
//!
//! A client or node can reach the gateway from an IPv6 address that merely wraps an IPv4 host:
//! a 6to4 address (`2002:AABB:CCDD::/48`), a Teredo address (`2001:0::/32`, the client's
//! public IPv4 address inverted in the last 32 bits), a NAT64 address (`64:ff9b::/96` or a
//! network-specific prefix from RFC 6052), or the IPv4-mapped, IPv4-compatible and
//! IPv4-translated forms. Location databases have no useful record for these ranges (they
//! answer "unknown", or the relay's or Teredo server's country), so an address in a sanctioned
//! country would pass the geofence as unknown merely by being written in IPv6. [`GeoDb::lookup`]
//! therefore locates every such address by the IPv4 address it embeds, and says so in
//! [`Location::embedded`].
//!
//! [`GeoDb::lookup`]: crate::GeoDb::lookup
//! [`Location::embedded`]: crate::Location::embedded

use ipnet::{IpNet, Ipv6Net};
use serde::Serialize;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// How an IPv4 address was embedded in the IPv6 address that was looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum EmbeddingKind {
    /// `::ffff:a.b.c.d` (RFC 4291 IPv4-mapped): a dual-stack socket's view of an IPv4 peer.
    #[serde(rename = "ipv4_mapped")]
    Ipv4Mapped,
    /// `::a.b.c.d` (RFC 4291 IPv4-compatible, deprecated); `::` and `::1` are not this.
    #[serde(rename = "ipv4_compatible")]
    Ipv4Compatible,
    /// `::ffff:0:a.b.c.d` (RFC 2765 IPv4-translated, SIIT).
    #[serde(rename = "ipv4_translated")]
    Ipv4Translated,
    /// `2002:AABB:CCDD::/48` (RFC 3056): the IPv4 address is bits 16..48.
    #[serde(rename = "6to4")]
    SixToFour,
    /// `2001:0::/32` (RFC 4380): the client's public IPv4 address is the last 32 bits, each
    /// inverted.
    #[serde(rename = "teredo")]
    Teredo,
    /// The NAT64 well-known prefix `64:ff9b::/96` or a configured network-specific prefix
    /// (RFC 6052).
    #[serde(rename = "nat64")]
    Nat64,
}

impl EmbeddingKind {
    /// The name used in reports and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EmbeddingKind::Ipv4Mapped => "ipv4_mapped",
            EmbeddingKind::Ipv4Compatible => "ipv4_compatible",
            EmbeddingKind::Ipv4Translated => "ipv4_translated",
            EmbeddingKind::SixToFour => "6to4",
            EmbeddingKind::Teredo => "teredo",
            EmbeddingKind::Nat64 => "nat64",
        }
    }
}

impl fmt::Display for EmbeddingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The IPv4 address a lookup located instead of the IPv6 address it was given, and how it was
/// embedded there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Embedded {
    pub kind: EmbeddingKind,
    pub ipv4: Ipv4Addr,
}

/// The NAT64 well-known prefix (RFC 6052), always recognised.
const NAT64_WKP: u128 = 0x0064_ff9b_0000_0000_0000_0000_0000_0000;

/// NAT64 prefixes (RFC 6052), the well-known one included, ready for matching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nat64Prefixes {
    /// (network, mask, prefix length in bytes), the well-known prefix first.
    prefixes: Vec<(u128, u128, u8)>,
}

impl Default for Nat64Prefixes {
    fn default() -> Self {
        Self {
            prefixes: vec![(NAT64_WKP, mask(96), 12)],
        }
    }
}

fn mask(len: u8) -> u128 {
    match len {
        0 => 0,
        n => u128::MAX << (128 - u32::from(n)),
    }
}

/// Why a configured NAT64 prefix is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NAT64 prefix {prefix}: {problem}")]
pub struct Nat64PrefixError {
    pub prefix: IpNet,
    pub problem: &'static str,
}

impl Nat64Prefixes {
    /// The well-known prefix plus `configured` (`geo.nat64_prefixes`, already validated by the
    /// config crate; checked again here so that the geo crate stands on its own).
    pub fn new(configured: &[IpNet]) -> Result<Self, Nat64PrefixError> {
        let mut out = Self::default();
        for net in configured {
            let bad = |problem| Nat64PrefixError {
                prefix: *net,
                problem,
            };
            let IpNet::V6(n) = net else {
                return Err(bad("not an IPv6 prefix"));
            };
            let len = n.prefix_len();
            if !nearpath_config::NAT64_PREFIX_LENGTHS.contains(&len) {
                return Err(bad(
                    "RFC 6052 allows prefix lengths 32, 40, 48, 56, 64 and 96 only",
                ));
            }
            let n: Ipv6Net = n.trunc();
            let net_bits = u128::from(n.network());
            if out.prefixes.iter().any(|(p, m, _)| net_bits & m == *p) {
                // The same prefix twice, or one inside the well-known prefix: the first wins
                // and decodes the same way, so there is nothing to add.
                continue;
            }
            out.prefixes.push((net_bits, mask(len), len / 8));
        }
        Ok(out)
    }

    /// The IPv4 address embedded in `ip` under one of these prefixes.
    #[inline]
    fn decode(&self, ip: u128, bytes: &[u8; 16]) -> Option<Ipv4Addr> {
        let &(_, _, start) = self.prefixes.iter().find(|(net, m, _)| ip & m == *net)?;
        // RFC 6052 section 2.2: the IPv4 address follows the prefix, skipping bits 64..71
        // (byte 8, the "u" octet), which must be zero and are not part of the address.
        let mut v4 = [0u8; 4];
        let mut i = start as usize;
        for b in &mut v4 {
            if i == 8 {
                i += 1;
            }
            *b = bytes[i];
            i += 1;
        }
        Some(Ipv4Addr::from(v4))
    }
}

/// The IPv4 address embedded in `ip`, if it is one of the forms above. Never fails; addresses
/// that embed nothing answer `None`.
#[inline]
pub fn embedded_ipv4(ip: Ipv6Addr, nat64: &Nat64Prefixes) -> Option<Embedded> {
    let bits = u128::from(ip);
    let bytes = ip.octets();
    let low32 = Ipv4Addr::from(bits as u32);
    let found = |kind, ipv4| Some(Embedded { kind, ipv4 });
    match bits >> 96 {
        0 => {
            let upper = bits >> 32;
            if upper == 0xffff {
                return found(EmbeddingKind::Ipv4Mapped, low32);
            }
            if upper == 0xffff_0000 {
                return found(EmbeddingKind::Ipv4Translated, low32);
            }
            // `::` (unspecified) and `::1` (loopback) are IPv6 addresses of their own.
            if upper == 0 && bits > 1 {
                return found(EmbeddingKind::Ipv4Compatible, low32);
            }
            None
        }
        0x2001_0000 => found(EmbeddingKind::Teredo, Ipv4Addr::from(!(bits as u32))),
        hi if hi >> 16 == 0x2002 => found(
            EmbeddingKind::SixToFour,
            Ipv4Addr::new(bytes[2], bytes[3], bytes[4], bytes[5]),
        ),
        _ => nat64
            .decode(bits, &bytes)
            .and_then(|v4| found(EmbeddingKind::Nat64, v4)),
    }
}

/// The address a lookup should locate: the embedded IPv4 address where there is one.
#[inline]
pub fn locatable(ip: IpAddr, nat64: &Nat64Prefixes) -> (IpAddr, Option<Embedded>) {
    match ip {
        IpAddr::V4(_) => (ip, None),
        IpAddr::V6(v6) => match embedded_ipv4(v6, nat64) {
            Some(e) => (IpAddr::V4(e.ipv4), Some(e)),
            None => (ip, None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn emb(s: &str, nat64: &Nat64Prefixes) -> Option<(EmbeddingKind, Ipv4Addr)> {
        embedded_ipv4(v6(s), nat64).map(|e| (e.kind, e.ipv4))
    }

    #[test]
    fn six_to_four_takes_bits_16_to_48() {
        let n = Nat64Prefixes::default();
        // 175.45.176.1 (North Korea) = af2d:b001.
        assert_eq!(
            emb("2002:af2d:b001::1", &n),
            Some((EmbeddingKind::SixToFour, v4("175.45.176.1")))
        );
        assert_eq!(
            emb("2002:af2d:b001:1234:5678:9abc:def0:1", &n),
            Some((EmbeddingKind::SixToFour, v4("175.45.176.1")))
        );
        // Just outside 2002::/16.
        assert_eq!(emb("2003:af2d:b001::1", &n), None);
        assert_eq!(emb("2001:1:af2d:b001::", &n), None);
    }

    #[test]
    fn teredo_client_address_is_the_inverted_last_32_bits() {
        let n = Nat64Prefixes::default();
        // RFC 4380 example layout: server 65.54.227.120, client 192.0.2.45 (obfuscated
        // 3fff:fdd2).
        assert_eq!(
            emb("2001:0:4136:e378:8000:63bf:3fff:fdd2", &n),
            Some((EmbeddingKind::Teredo, v4("192.0.2.45")))
        );
        // 175.45.176.1 inverted is 50d2:4ffe.
        assert_eq!(
            emb("2001:0:4136:e378:8000:0:50d2:4ffe", &n),
            Some((EmbeddingKind::Teredo, v4("175.45.176.1")))
        );
        // 2001:db8::/32 and other 2001:: space is not Teredo.
        assert_eq!(emb("2001:db8::50d2:4ffe", &n), None);
        assert_eq!(emb("2001:4860:4860::8888", &n), None);
    }

    #[test]
    fn nat64_well_known_prefix_is_always_recognised() {
        let n = Nat64Prefixes::default();
        assert_eq!(
            emb("64:ff9b::af2d:b001", &n),
            Some((EmbeddingKind::Nat64, v4("175.45.176.1")))
        );
        assert_eq!(
            emb("64:ff9b::175.45.176.1", &n),
            Some((EmbeddingKind::Nat64, v4("175.45.176.1")))
        );
        // 64:ff9b:1::/48 (RFC 8215 local use) needs configuring: its layout is the operator's.
        assert_eq!(emb("64:ff9b:1::af2d:b001", &n), None);
    }

    #[test]
    fn nat64_network_specific_prefixes_follow_rfc_6052_layouts() {
        // The examples of RFC 6052 section 2.4: 192.0.2.33 under a prefix of every length.
        let cases = [
            ("2001:db8::/32", "2001:db8:c000:221::"),
            ("2001:db8:100::/40", "2001:db8:1c0:2:21::"),
            ("2001:db8:122::/48", "2001:db8:122:c000:2:2100::"),
            ("2001:db8:122:300::/56", "2001:db8:122:3c0:0:221::"),
            ("2001:db8:122:344::/64", "2001:db8:122:344:c0:2:2100:0"),
            ("2001:db8:122:344::/96", "2001:db8:122:344::192.0.2.33"),
        ];
        for (prefix, addr) in cases {
            let n = Nat64Prefixes::new(&[prefix.parse().unwrap()]).unwrap();
            assert_eq!(
                emb(addr, &n),
                Some((EmbeddingKind::Nat64, v4("192.0.2.33"))),
                "{addr} under {prefix}"
            );
            // Without the prefix configured, the address is just IPv6.
            assert_eq!(emb(addr, &Nat64Prefixes::default()), None, "{addr}");
        }
        assert!(Nat64Prefixes::new(&["2001:db8::/33".parse().unwrap()]).is_err());
        assert!(Nat64Prefixes::new(&["10.0.0.0/8".parse().unwrap()]).is_err());
    }

    #[test]
    fn mapped_compatible_and_translated_forms() {
        let n = Nat64Prefixes::default();
        assert_eq!(
            emb("::ffff:175.45.176.1", &n),
            Some((EmbeddingKind::Ipv4Mapped, v4("175.45.176.1")))
        );
        assert_eq!(
            emb("::175.45.176.1", &n),
            Some((EmbeddingKind::Ipv4Compatible, v4("175.45.176.1")))
        );
        assert_eq!(
            emb("::ffff:0:175.45.176.1", &n),
            Some((EmbeddingKind::Ipv4Translated, v4("175.45.176.1")))
        );
        assert_eq!(emb("::", &n), None);
        assert_eq!(emb("::1", &n), None);
        assert_eq!(emb("2a00:1450::1", &n), None);
        assert_eq!(emb("fe80::1", &n), None);
        // IPv4 addresses pass through untouched.
        let ip: IpAddr = "175.45.176.1".parse().unwrap();
        assert_eq!(locatable(ip, &n), (ip, None));
    }
}
