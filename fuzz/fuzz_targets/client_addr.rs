//! The client's address behind trusted proxies (`gateway/src/client_addr.rs`, included here as
//! is): every HTTP entry point (the OpenAI API, WHEP, `/play`) locates clients with it, and the
//! geofence is only as good as its answer. The header it reads passes through the operator's
//! proxies, but everything left of what they appended is the client's to write.
//!
//! The first byte picks the configured header (`x-forwarded-for`, `forwarded`, `x-real-ip`),
//! `http.trusted_hops` (0..=3) and the TCP peer (trusted or not, IPv4, IPv6 or IPv4-mapped);
//! the rest, split on NUL, is the header's lines (split on `\n`), a client-written prefix, and
//! the value of a forwarding header the gateway is not configured to read.
//!
//! Asserts, beyond "no panic":
//! - an untrusted peer is the client, whatever the headers say;
//! - a header other than the configured one changes nothing;
//! - what a client writes left of the proxies' entries never changes a believed answer: if the
//!   answer is an address (an untrusted one, or any when counting hops), prepending any bytes
//!   and a `,` to the first line gives the same answer;
//! - an address answer is canonical (an IPv4-mapped IPv6 address is reported as IPv4), and is the
//!   peer only when the peer could be it;
//! - allocation stays linear in the headers.

#![no_main]

#[path = "../../protocol/fuzz/fuzz_targets/common/alloc.rs"]
mod alloc;
#[allow(dead_code)]
#[path = "../../gateway/src/client_addr.rs"]
mod client_addr;

use std::net::IpAddr;

use client_addr::{client_addr, ClientAddr};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

const HEADERS: [&str; 3] = ["x-forwarded-for", "forwarded", "x-real-ip"];
const TRUSTED: [&str; 3] = ["10.0.0.0/8", "2001:db8::/32", "127.0.0.1/32"];
const TRUSTED_PEERS: [&str; 3] = ["10.0.0.1", "2001:db8::1", "::ffff:10.0.0.2"];
const UNTRUSTED_PEERS: [&str; 3] = ["203.0.113.5", "2001:4860::1", "::ffff:198.51.100.7"];

fn headers(
    name: &'static str,
    lines: &[&[u8]],
    other: Option<(&'static str, &[u8])>,
) -> Option<HeaderMap> {
    let mut map = HeaderMap::new();
    let name = HeaderName::from_static(name);
    for line in lines {
        // What cannot be a header value never reaches the gateway (hyper refuses the request).
        map.append(name.clone(), HeaderValue::from_bytes(line).ok()?);
    }
    if let Some((other, value)) = other {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            map.append(HeaderName::from_static(other), value);
        }
    }
    Some(map)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let header = HEADERS[usize::from(selector & 3) % 3];
    let hops = u32::from((selector >> 2) & 3);
    let peer_trusted = selector & 0x10 != 0;
    let peer_index = usize::from(selector >> 5) % 3;
    let peer: IpAddr = if peer_trusted {
        TRUSTED_PEERS[peer_index]
    } else {
        UNTRUSTED_PEERS[peer_index]
    }
    .parse()
    .unwrap();
    let trusted: Vec<IpNet> = TRUSTED.iter().map(|n| n.parse().unwrap()).collect();

    let mut parts = rest.splitn(3, |&b| b == 0);
    let text = parts.next().unwrap_or_default();
    let prefix = parts.next().unwrap_or_default();
    let other_value = parts.next();
    let lines: Vec<&[u8]> = if text.is_empty() {
        Vec::new()
    } else {
        text.split(|&b| b == b'\n').collect()
    };
    let Some(map) = headers(header, &lines, None) else {
        return;
    };

    let (answer, peak) = alloc::peak_during(|| client_addr(peer, &map, &trusted, header, hops));
    assert!(
        peak <= 64 * text.len() + 4096,
        "locating a client from {} header bytes allocated {peak} bytes",
        text.len()
    );
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(&ip));
    if !peer_trusted {
        assert_eq!(answer, ClientAddr::Ip(peer.to_canonical()));
        return;
    }
    if let ClientAddr::Ip(ip) = answer {
        assert_eq!(ip, ip.to_canonical(), "a non-canonical answer");
        if lines.is_empty() {
            assert_eq!(ip, peer.to_canonical());
        }
    }

    // Another forwarding header than the configured one is ignored.
    let other = HEADERS[(usize::from(selector & 3) + 1) % 3];
    if let Some(value) = other_value {
        if let Some(with_other) = headers(header, &lines, Some((other, value))) {
            assert_eq!(
                client_addr(peer, &with_other, &trusted, header, hops),
                answer,
                "the {other} header changed the answer from {header}"
            );
        }
    }

    // The client writes left of the proxies: prepending to the first line changes no believed
    // answer.
    let believed = match answer {
        ClientAddr::Ip(ip) => hops > 0 || !is_trusted(ip),
        ClientAddr::Unknown => false,
    };
    if believed && !lines.is_empty() {
        let mut first = prefix.to_vec();
        first.push(b',');
        first.extend_from_slice(lines[0]);
        let mut forged = lines.clone();
        forged[0] = &first;
        if let Some(map) = headers(header, &forged, None) {
            assert_eq!(
                client_addr(peer, &map, &trusted, header, hops),
                answer,
                "a client-written prefix {:?} changed the answer",
                String::from_utf8_lossy(prefix)
            );
        }
    }
});
