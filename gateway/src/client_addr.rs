//! The client's address for an HTTP request: the TCP peer, or what a trusted proxy says.
//!
//! The geofence is only as good as this answer, and every part of a forwarding header except
//! what the gateway's own proxies wrote is the client's to choose. So the rules are those of
//! nginx's `real_ip` module with `real_ip_recursive on`:
//!
//! - The header is read only when the TCP peer is in `http.trusted_proxies`; otherwise the peer
//!   is the client and every forwarding header is ignored.
//! - Exactly one header is believed, `http.client_address_header` (`x-forwarded-for`,
//!   `forwarded` or e.g. `x-real-ip`). Any other forwarding header is ignored even when present,
//!   so a client cannot send a `Forwarded` header that outranks the proxy's `X-Forwarded-For`.
//! - All lines of that header are concatenated in order and split into entries; the entries are
//!   walked from the right (the most recent hop first). An entry that is itself a trusted proxy
//!   was added by the proxy before it and is skipped; the first other entry is the client.
//!   Counting hops instead would believe a client-written entry whenever a request reaches the
//!   gateway through fewer proxies than configured; checking addresses never does.
//! - Ports and brackets are stripped (`1.2.3.4:80`, `[2001:db8::1]:443`, RFC 7239
//!   `for="[2001:db8::1]:4711"`). An entry that still does not parse (`unknown`, an obfuscated
//!   identifier such as `_hidden`, an empty entry, a `Forwarded` element without `for=`, or
//!   garbage, a byte outside visible ASCII) makes the client's address **unknown**: it is never
//!   skipped, since skipping it would hand the decision to the client-written entry on its left.
//!   Such an entry counts only where it stands: one left of the client's entry changes nothing.
//! - With `http.trusted_hops = n` > 0 (for proxy layers whose addresses cannot be listed, such
//!   as a CDN), the client is the `n`-th entry from the right instead; fewer entries, or an
//!   unparseable entry among the last `n`, make it unknown.
//! - No header from a trusted peer means the peer itself is the client (a health check, say);
//!   a header whose entries are all trusted proxies gives the left-most of them.

use hyper::HeaderMap;
use ipnet::IpNet;
use nearpath_geo::{GeoDb, Location};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// Where an HTTP request comes from, as far as the gateway can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddr {
    /// A known address: the TCP peer, or the entry a trusted proxy wrote.
    Ip(IpAddr),
    /// A trusted proxy wrote something that is not an address (`unknown`, an obfuscated
    /// identifier, garbage): the location is unknown.
    Unknown,
}

impl ClientAddr {
    /// The address, if known.
    pub fn ip(self) -> Option<IpAddr> {
        match self {
            ClientAddr::Ip(ip) => Some(ip),
            ClientAddr::Unknown => None,
        }
    }

    /// The location of the address; [`Location::UNKNOWN`] for an unknown address.
    pub fn locate(self, geo: &GeoDb) -> Location {
        match self {
            ClientAddr::Ip(ip) => geo.lookup(ip),
            ClientAddr::Unknown => Location::UNKNOWN,
        }
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientAddr::Ip(ip) => ip.fmt(f),
            ClientAddr::Unknown => f.write_str("unknown"),
        }
    }
}

/// The client's address for a request from `peer`: the TCP peer, or, only when the peer is a
/// trusted proxy, what the configured header says. The one function every HTTP entry point
/// (the OpenAI API, WHEP, `/play`) locates clients with.
pub fn client_ip(
    http: &nearpath_config::HttpConfig,
    peer: IpAddr,
    headers: &HeaderMap,
) -> ClientAddr {
    client_addr(
        peer,
        headers,
        &http.trusted_proxies,
        &http.client_address_header,
        http.trusted_hops,
    )
}

/// The client's address for a request from `peer` with `headers`, under the rules in the module
/// docs. `header` is `http.client_address_header`; `trusted` is `http.trusted_proxies`;
/// `hops` is `http.trusted_hops` (0: no counting).
pub fn client_addr(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    header: &str,
    hops: u32,
) -> ClientAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(&ip));
    if !is_trusted(peer) {
        return ClientAddr::Ip(peer);
    }
    let mut lines = headers.get_all(header).iter().peekable();
    if lines.peek().is_none() {
        return ClientAddr::Ip(peer);
    }
    let rfc7239 = header.eq_ignore_ascii_case("forwarded");
    // Entries in order, across every line of the header; `None` for one that does not parse.
    let mut entries: Vec<Option<IpAddr>> = Vec::new();
    for line in lines {
        // Split the raw bytes: a byte outside visible ASCII makes only its own entry
        // unparseable. Refusing the whole line for it would let the client, who writes the left
        // of the first line, make its address unknown (which the geofence lets through by
        // default) with one such byte left of the entry its proxy appended.
        for entry in line.as_bytes().split(|&b| b == b',') {
            let entry = std::str::from_utf8(entry)
                .ok()
                .filter(|e| e.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)));
            entries.push(entry.and_then(|entry| {
                if rfc7239 {
                    forwarded_element_for(entry).and_then(parse_node)
                } else {
                    parse_node(entry)
                }
            }));
        }
    }
    if hops > 0 {
        // Counting: the last `hops` entries were written by the proxies, the left-most of them
        // being the client as the outermost proxy saw it. Too few entries means a layer was
        // skipped or the header was cut: nothing in it can be believed.
        let hops = hops as usize;
        if entries.len() < hops {
            return ClientAddr::Unknown;
        }
        let tail = &entries[entries.len() - hops..];
        if tail.iter().any(|e| e.is_none()) {
            return ClientAddr::Unknown;
        }
        return tail[0].map_or(ClientAddr::Unknown, |ip| ClientAddr::Ip(ip.to_canonical()));
    }
    let mut leftmost = None;
    for entry in entries.iter().rev() {
        match entry.map(|ip| ip.to_canonical()) {
            None => return ClientAddr::Unknown,
            Some(ip) if is_trusted(ip) => leftmost = Some(ip),
            Some(ip) => return ClientAddr::Ip(ip),
        }
    }
    leftmost.map_or(ClientAddr::Unknown, ClientAddr::Ip)
}

/// The value of the one `for=` parameter of an RFC 7239 element (`for=1.2.3.4;proto=https`);
/// `None` when the element has none, has two, or is not a list of `key=value` pairs.
///
/// Elements and pairs are split on every `,` and `;`, even inside quotes: no node identifier
/// contains either, and a client's unbalanced quote must not swallow the entries the proxies
/// appended after it.
fn forwarded_element_for(element: &str) -> Option<&str> {
    let mut found = None;
    for pair in element.split(';') {
        let pair = pair.trim();
        if pair.is_empty() {
            continue;
        }
        let (key, value) = pair.split_once('=')?;
        if key.trim().eq_ignore_ascii_case("for") {
            if found.is_some() {
                return None;
            }
            found = Some(value.trim());
        }
    }
    found
}

/// One entry: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:443`,
/// optionally in double quotes (RFC 7239 quotes anything with a `:` or `[`). The port may be an
/// RFC 7239 obfuscated port (`_abc`). Anything else is `None`.
fn parse_node(entry: &str) -> Option<IpAddr> {
    let mut s = entry.trim();
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        s = &s[1..s.len() - 1];
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let ip: Ipv6Addr = inside.parse().ok()?;
        if !after.is_empty() && !is_port(after.strip_prefix(':')?) {
            return None;
        }
        return Some(IpAddr::V6(ip));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    // An IPv4 address with a port; an unbracketed IPv6 address has no room for one.
    let (host, port) = s.rsplit_once(':')?;
    let ip: std::net::Ipv4Addr = host.parse().ok()?;
    is_port(port).then_some(IpAddr::V4(ip))
}

/// A decimal port, or an RFC 7239 obfuscated port (`_` then letters, digits, `.`, `_`, `-`).
fn is_port(p: &str) -> bool {
    if let Some(obf) = p.strip_prefix('_') {
        return !obf.is_empty()
            && obf
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    }
    (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::{HeaderName, HeaderValue};

    const XFF: &str = "x-forwarded-for";
    const FWD: &str = "forwarded";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> ClientAddr {
        ClientAddr::Ip(s.parse().unwrap())
    }

    fn lan() -> Vec<IpNet> {
        vec!["10.0.0.0/8".parse().unwrap()]
    }

    /// The client address of a request from the trusted proxy 10.0.0.1.
    fn via_proxy(header: &str, pairs: &[(&str, &str)]) -> ClientAddr {
        client_addr(
            "10.0.0.1".parse().unwrap(),
            &headers(pairs),
            &lan(),
            header,
            0,
        )
    }

    #[test]
    fn forwarded_headers_are_ignored_from_untrusted_peers() {
        // A client must not choose its own country with a header.
        let h = headers(&[(XFF, "1.2.3.4"), (FWD, "for=1.2.3.4")]);
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(client_addr(peer, &h, &lan(), XFF, 0), ClientAddr::Ip(peer));
        assert_eq!(client_addr(peer, &h, &lan(), FWD, 0), ClientAddr::Ip(peer));
        assert_eq!(client_addr(peer, &h, &[], XFF, 0), ClientAddr::Ip(peer));
    }

    #[test]
    fn trusted_proxy_chain_takes_the_rightmost_untrusted_address() {
        assert_eq!(
            via_proxy(XFF, &[(XFF, "9.9.9.9, 1.2.3.4, 10.1.1.1")]),
            ip("1.2.3.4")
        );
        assert_eq!(
            via_proxy(
                FWD,
                &[(FWD, "for=192.0.2.60;proto=http, for=\"[2001:db8::1]:4711\"")]
            ),
            ip("2001:db8::1")
        );
        // No header: the proxy itself.
        assert_eq!(via_proxy(XFF, &[]), ip("10.0.0.1"));
        // Every entry a trusted proxy: the left-most of them.
        assert_eq!(
            via_proxy(XFF, &[(XFF, "10.2.2.2, 10.1.1.1")]),
            ip("10.2.2.2")
        );
    }

    /// Found by the `client_addr` fuzz target: a byte outside visible ASCII anywhere in the
    /// header (obs-text, which hyper accepts) made the whole header unknown, so a client could
    /// write `\xff` left of the entry its proxy appended and pass the geofence as an unknown
    /// location. It makes only its own entry unparseable.
    #[test]
    fn a_client_written_non_ascii_byte_does_not_make_the_proxied_address_unknown() {
        let mut h = HeaderMap::new();
        let forged = HeaderValue::from_bytes(b"evi\xffl, 5.160.0.1, 10.1.1.1").unwrap();
        h.append(XFF, forged);
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(client_addr(proxy, &h, &lan(), XFF, 0), ip("5.160.0.1"));
        assert_eq!(client_addr(proxy, &h, &lan(), XFF, 2), ip("5.160.0.1"));
        // On a line of its own, left of the proxy's line, too.
        let mut h = HeaderMap::new();
        h.append(XFF, HeaderValue::from_bytes(b"\x80\x81").unwrap());
        h.append(XFF, HeaderValue::from_static("5.160.0.1"));
        assert_eq!(client_addr(proxy, &h, &lan(), XFF, 0), ip("5.160.0.1"));
        let mut h = HeaderMap::new();
        let forged = HeaderValue::from_bytes(b"for=\"\xff\", for=5.160.0.1").unwrap();
        h.append(FWD, forged);
        assert_eq!(client_addr(proxy, &h, &lan(), FWD, 0), ip("5.160.0.1"));
        // Where the client's entry itself is the one with the byte, its address is unknown.
        let mut h = HeaderMap::new();
        h.append(
            XFF,
            HeaderValue::from_bytes(b"5.160.0.1, 1.2.3.4\xff").unwrap(),
        );
        assert_eq!(client_addr(proxy, &h, &lan(), XFF, 0), ClientAddr::Unknown);
        let mut h = HeaderMap::new();
        h.append(
            XFF,
            HeaderValue::from_bytes(b"1.2.3.4\xff, 5.160.0.1").unwrap(),
        );
        assert_eq!(client_addr(proxy, &h, &lan(), XFF, 2), ClientAddr::Unknown);
    }

    #[test]
    fn a_client_forwarded_header_does_not_outrank_the_proxy_x_forwarded_for() {
        // Item 9a: the client wrote Forwarded; the proxy appended the real peer to XFF.
        let pairs = [(FWD, "for=8.8.8.8"), (XFF, "5.160.0.1")];
        assert_eq!(via_proxy(XFF, &pairs), ip("5.160.0.1"));
        // And the reverse, when the proxy speaks RFC 7239.
        let pairs = [(XFF, "8.8.8.8"), (FWD, "for=5.160.0.1")];
        assert_eq!(via_proxy(FWD, &pairs), ip("5.160.0.1"));
    }

    #[test]
    fn ports_and_brackets_are_stripped() {
        for (entry, want) in [
            ("5.160.0.1:4711", "5.160.0.1"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
            ("\"[2001:db8::1]:4711\"", "2001:db8::1"),
            ("  5.160.0.1  ", "5.160.0.1"),
            ("::ffff:5.160.0.1", "5.160.0.1"),
        ] {
            assert_eq!(
                via_proxy(XFF, &[(XFF, &format!("8.8.8.8, {entry}"))]),
                ip(want),
                "{entry}"
            );
        }
        for (element, want) in [
            ("for=5.160.0.1", "5.160.0.1"),
            ("for=\"5.160.0.1:4711\"", "5.160.0.1"),
            ("For=\"[2001:db8::1]:4711\"", "2001:db8::1"),
            (
                "for=\"[2001:db8::1]\";proto=https;by=10.0.0.1",
                "2001:db8::1",
            ),
            ("proto=https; for=5.160.0.1:_abc", "5.160.0.1"),
        ] {
            assert_eq!(
                via_proxy(FWD, &[(FWD, &format!("for=8.8.8.8, {element}"))]),
                ip(want),
                "{element}"
            );
        }
    }

    #[test]
    fn unparseable_entries_are_unknown_never_skipped() {
        // Item 9b: each of these, appended by the proxy after a client-written 8.8.8.8, must not
        // hand the decision to 8.8.8.8.
        for bad in [
            "unknown",
            "_hidden",
            "",
            "5.160.0.1:99999",
            "5.160.0.1:",
            "5.160.0.1:http",
            "[2001:db8::1",
            "[2001:db8::1]x",
            "[5.160.0.1]",
            "2001:db8::1:80:1:2:3:4:5",
            "fe80::1%eth0",
            "\"5.160.0.1",
            "example.com",
            "5.160.0.1 5.160.0.2",
        ] {
            assert_eq!(
                via_proxy(XFF, &[(XFF, &format!("8.8.8.8, {bad}"))]),
                ClientAddr::Unknown,
                "XFF entry {bad:?}"
            );
        }
        for bad in [
            "for=unknown",
            "for=_hidden",
            "for=\"_hidden:4711\"",
            "proto=https",
            "for=5.160.0.1;for=5.160.0.2",
            "for",
            "for=\"[2001:db8::1]:99999\"",
            "",
        ] {
            assert_eq!(
                via_proxy(FWD, &[(FWD, &format!("for=8.8.8.8, {bad}"))]),
                ClientAddr::Unknown,
                "Forwarded element {bad:?}"
            );
        }
        // Unknown to the right of a trusted hop is still unknown.
        assert_eq!(
            via_proxy(XFF, &[(XFF, "8.8.8.8, unknown, 10.9.9.9")]),
            ClientAddr::Unknown
        );
        // A header present but empty is unknown too (not "no header").
        assert_eq!(via_proxy(XFF, &[(XFF, "")]), ClientAddr::Unknown);
        // Garbage to the left of the client's entry does not matter.
        assert_eq!(
            via_proxy(XFF, &[(XFF, "garbage, 5.160.0.1")]),
            ip("5.160.0.1")
        );
    }

    #[test]
    fn header_lines_are_concatenated_in_order() {
        // The client's line comes first; the proxy appended its own line.
        assert_eq!(
            via_proxy(XFF, &[(XFF, "8.8.8.8"), (XFF, "5.160.0.1")]),
            ip("5.160.0.1")
        );
        assert_eq!(
            via_proxy(XFF, &[(XFF, "8.8.8.8, 10.3.3.3"), (XFF, "10.4.4.4")]),
            ip("8.8.8.8")
        );
        assert_eq!(
            via_proxy(XFF, &[(XFF, "8.8.8.8"), (XFF, "unknown")]),
            ClientAddr::Unknown
        );
        // A client's unbalanced quote does not swallow the proxy's element.
        assert_eq!(
            via_proxy(FWD, &[(FWD, "for=\"8.8.8.8, for=5.160.0.1")]),
            ip("5.160.0.1")
        );
    }

    #[test]
    fn a_single_address_header_such_as_x_real_ip() {
        let pairs = [(XFF, "8.8.8.8"), ("x-real-ip", "5.160.0.1")];
        assert_eq!(via_proxy("x-real-ip", &pairs), ip("5.160.0.1"));
        assert_eq!(via_proxy("X-Real-IP", &pairs), ip("5.160.0.1"));
        // Only the configured header counts: without it, the proxy itself.
        assert_eq!(via_proxy("x-real-ip", &[(XFF, "8.8.8.8")]), ip("10.0.0.1"));
        assert_eq!(
            via_proxy("x-real-ip", &[("x-real-ip", "unknown")]),
            ClientAddr::Unknown
        );
    }

    #[test]
    fn non_ascii_header_bytes_are_unknown() {
        let mut h = HeaderMap::new();
        h.append(
            XFF,
            HeaderValue::from_bytes(b"8.8.8.8, 5.160.0.1\xff").unwrap(),
        );
        assert_eq!(
            client_addr("10.0.0.1".parse().unwrap(), &h, &lan(), XFF, 0),
            ClientAddr::Unknown
        );
    }

    #[test]
    fn ipv4_mapped_peers_and_entries_are_treated_as_ipv4() {
        let trusted: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        let h = headers(&[(XFF, "175.45.176.1")]);
        assert_eq!(
            client_addr("::ffff:127.0.0.1".parse().unwrap(), &h, &trusted, XFF, 0),
            ip("175.45.176.1")
        );
        let h = headers(&[(XFF, "8.8.8.8, ::ffff:127.0.0.9")]);
        assert_eq!(
            client_addr("127.0.0.1".parse().unwrap(), &h, &trusted, XFF, 0),
            ip("8.8.8.8")
        );
    }
}

#[cfg(test)]
mod hop_tests {
    use super::*;

    fn xff(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", v.parse().unwrap());
        h
    }
    fn lb() -> Vec<IpNet> {
        vec!["10.0.0.1/32".parse().unwrap()]
    }
    fn at(v: &str, hops: u32) -> ClientAddr {
        client_addr(
            "10.0.0.1".parse().unwrap(),
            &xff(v),
            &lb(),
            "x-forwarded-for",
            hops,
        )
    }

    #[test]
    fn trusted_hops_take_the_nth_entry_from_the_right() {
        // CDN (unlisted, changing egress) -> load balancer 10.0.0.1 -> gateway: two hops append.
        // The client wrote 8.8.8.8; the CDN appended the real client 5.160.0.1; the LB appended
        // the CDN's egress 198.51.100.7.
        let v = "8.8.8.8, 5.160.0.1, 198.51.100.7";
        assert_eq!(at(v, 2), ClientAddr::Ip("5.160.0.1".parse().unwrap()));
        assert_eq!(at(v, 1), ClientAddr::Ip("198.51.100.7".parse().unwrap()));
        assert_eq!(
            at("5.160.0.1:4711", 1),
            ClientAddr::Ip("5.160.0.1".parse().unwrap())
        );
    }

    #[test]
    fn trusted_hops_fail_closed_on_short_or_unparseable_headers() {
        // Fewer entries than hops: a layer was skipped; nothing is believed.
        assert_eq!(at("5.160.0.1", 2), ClientAddr::Unknown);
        // An unparseable entry among the counted ones is unknown, never skipped.
        assert_eq!(at("8.8.8.8, unknown, 198.51.100.7", 2), ClientAddr::Unknown);
        assert_eq!(at("8.8.8.8, 5.160.0.1, _hidden", 2), ClientAddr::Unknown);
        // An unparseable entry left of the counted ones is the client's own text: irrelevant.
        assert_eq!(
            at("garbage, 5.160.0.1, 198.51.100.7", 2),
            ClientAddr::Ip("5.160.0.1".parse().unwrap())
        );
    }

    #[test]
    fn trusted_hops_apply_only_to_a_trusted_peer() {
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        let h = xff("8.8.8.8, 5.160.0.1");
        assert_eq!(
            client_addr(peer, &h, &lb(), "x-forwarded-for", 2),
            ClientAddr::Ip(peer)
        );
    }
}
