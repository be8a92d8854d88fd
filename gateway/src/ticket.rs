//! Redirect tickets: what one gateway of a federation hands a client it sends to a peer, so
//! that the peer places the session on the node the first gateway chose without routing (and
//! evaluating the geofence) again.
//!
//! A ticket names the gateway that must accept it, the API key it was issued to, the node, the
//! client's address, the game and its parameters, an expiry at most [`MAX_TICKET_TTL_MS`] away
//! and a random nonce; it is MACed (HMAC-SHA256) with the federation's secret, which every
//! gateway of the federation reads from the shared store. Sans-IO: the caller passes the time,
//! the secret and the facts to check against; [`ReplayGuard`] makes each ticket single-use.
//!
//! Wire form: hex of `version(1) | claims | tag(32)`, claims being length-prefixed strings and
//! fixed-width big-endian integers. Version 2 adds the session's video codec (its wire name)
//! after the bit rate; a version 1 ticket (from a gateway of the previous release) is an
//! H.264 session. Nothing of it is secret (the client may read it); only the
//! tag must not be forgeable.

use nearpath_protocol::message::VideoCodec;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;

/// How long a ticket lives: a client follows a redirect at once (one more handshake), so a few
/// seconds are plenty; the rest is clock skew between gateways.
pub const TICKET_TTL_MS: u64 = 15_000;
/// The longest life a ticket may claim; a ticket expiring later than this from now is refused
/// whatever its MAC says (an issuer with a clock far ahead must not mint long-lived tickets).
pub const MAX_TICKET_TTL_MS: u64 = 30_000;
/// The longest ticket (hex characters) a gateway reads; longer input is refused unread.
pub const MAX_TICKET_LEN: usize = 2_048;
/// Tickets remembered as used at once; past this, new tickets are refused until some expire
/// (memory stays bounded whatever a client sends).
pub const MAX_LIVE_TICKETS: usize = 65_536;

const VERSION: u8 = 2;
/// The previous version, without a codec: still read during a rolling upgrade.
const VERSION_H264: u8 = 1;
const TAG_LEN: usize = 32;
/// Domain separation: the federation secret also keys other MACs.
const CONTEXT: &[u8] = b"nearpath redirect ticket v1\0";

/// What a ticket says. Every field is covered by the MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketClaims {
    /// The gateway that issued it (for logs).
    pub issuer: String,
    /// The gateway that must accept it.
    pub target: String,
    /// The API key it was issued to (`ApiKey::id`, never the secret).
    pub key_id: String,
    /// The node to place the session on.
    pub node_id: String,
    /// The client's address as the issuer saw it.
    pub client_ip: IpAddr,
    pub game: String,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub bitrate_kbps: u32,
    /// The video codec the session is encoded in: one the issuer found the node encodes and
    /// the client decodes.
    pub codec: VideoCodec,
    /// Unix milliseconds.
    pub expires_at_ms: u64,
    pub nonce: [u8; 16],
}

/// Why a ticket was refused. None of them is worth retrying with the same ticket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("the ticket is malformed: {0}")]
    Malformed(&'static str),
    #[error("the ticket's signature does not verify")]
    BadMac,
    #[error("the ticket has expired")]
    Expired,
    #[error("the ticket claims a life longer than {MAX_TICKET_TTL_MS} ms")]
    TooLong,
    #[error("the ticket is for gateway {0}, not this one")]
    WrongGateway(String),
    #[error("the ticket was issued to another client address")]
    WrongClient,
    #[error("the ticket was issued to another API key")]
    WrongKey,
    #[error("the ticket has been used already")]
    Replayed,
    #[error("too many tickets in flight; try again")]
    Busy,
}

/// HMAC-SHA256 (RFC 2104) over the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for i in 0..64 {
        ipad[i] ^= k[i];
        opad[i] ^= k[i];
    }
    let mut inner = Sha256::new();
    inner.update(ipad);
    for p in parts {
        inner.update(p);
    }
    let inner = inner.finalize();
    let mut outer = Sha256::new();
    outer.update(opad);
    outer.update(inner);
    outer.finalize().into()
}

/// Compares two byte strings in time independent of where they differ (MAC checks).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Every string is a short id or title; longer ones are cut at the issuer, never here.
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TicketError> {
        if self.0.len() < n {
            return Err(TicketError::Malformed("truncated"));
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    fn u32(&mut self) -> Result<u32, TicketError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, TicketError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn string(&mut self) -> Result<String, TicketError> {
        let l = self.take(2)?;
        let n = u16::from_be_bytes([l[0], l[1]]) as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| TicketError::Malformed("invalid UTF-8"))
    }
}

impl TicketClaims {
    fn encode_claims(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        put_str(&mut out, &self.issuer);
        put_str(&mut out, &self.target);
        put_str(&mut out, &self.key_id);
        put_str(&mut out, &self.node_id);
        put_str(&mut out, &self.client_ip.to_string());
        put_str(&mut out, &self.game);
        for v in [self.width, self.height, self.fps, self.bitrate_kbps] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        put_str(&mut out, self.codec.as_str());
        out.extend_from_slice(&self.expires_at_ms.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        out
    }

    fn decode_claims(b: &[u8]) -> Result<TicketClaims, TicketError> {
        let mut c = Cursor(b);
        let version = c.take(1)?[0];
        if version != VERSION && version != VERSION_H264 {
            return Err(TicketError::Malformed("unknown version"));
        }
        let issuer = c.string()?;
        let target = c.string()?;
        let key_id = c.string()?;
        let node_id = c.string()?;
        let client_ip = c
            .string()?
            .parse()
            .map_err(|_| TicketError::Malformed("bad client address"))?;
        let game = c.string()?;
        let (width, height, fps, bitrate_kbps) = (c.u32()?, c.u32()?, c.u32()?, c.u32()?);
        let codec = if version == VERSION_H264 {
            VideoCodec::H264
        } else {
            VideoCodec::from_name(&c.string()?).ok_or(TicketError::Malformed("unknown codec"))?
        };
        let expires_at_ms = c.u64()?;
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(c.take(16)?);
        if !c.0.is_empty() {
            return Err(TicketError::Malformed("trailing bytes"));
        }
        Ok(TicketClaims {
            issuer,
            target,
            key_id,
            node_id,
            client_ip,
            game,
            width,
            height,
            fps,
            bitrate_kbps,
            codec,
            expires_at_ms,
            nonce,
        })
    }

    /// The ticket's wire form, MACed with `secret`.
    pub fn seal(&self, secret: &[u8]) -> String {
        seal_body(self.encode_claims(), secret)
    }

    /// Reads a ticket and checks its MAC, nothing else (see [`Expect::check`]).
    pub fn open(ticket: &str, secret: &[u8]) -> Result<TicketClaims, TicketError> {
        Self::decode_claims(&open_body(ticket, secret)?)
    }
}

/// `body` followed by its MAC under `secret`, in hex: the wire form of both kinds of ticket.
fn seal_body(mut body: Vec<u8>, secret: &[u8]) -> String {
    let tag = hmac_sha256(secret, &[CONTEXT, &body]);
    body.extend_from_slice(&tag);
    hex::encode(body)
}

/// The claims bytes of a ticket whose MAC under `secret` holds; nothing of them is read yet.
fn open_body(ticket: &str, secret: &[u8]) -> Result<Vec<u8>, TicketError> {
    if ticket.len() > MAX_TICKET_LEN {
        return Err(TicketError::Malformed("too long"));
    }
    let mut raw = hex::decode(ticket).map_err(|_| TicketError::Malformed("not hex"))?;
    if raw.len() < 1 + TAG_LEN {
        return Err(TicketError::Malformed("truncated"));
    }
    let tag = raw.split_off(raw.len() - TAG_LEN);
    // The MAC is checked before a byte of the claims is interpreted.
    if !ct_eq(&hmac_sha256(secret, &[CONTEXT, &raw]), &tag) {
        return Err(TicketError::BadMac);
    }
    Ok(raw)
}

/// What the accepting gateway knows and the ticket must agree with.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    /// This gateway's id.
    pub gateway_id: &'a str,
    /// The address the client connects from.
    pub client_ip: IpAddr,
    /// The id of the API key the client authenticated with.
    pub key_id: &'a str,
    pub now_ms: u64,
}

impl Expect<'_> {
    /// Checks a ticket whose MAC verified: meant for this gateway, this client and this key,
    /// not expired, not claiming too long a life. Does not consume it ([`ReplayGuard::consume`]).
    pub fn check(&self, c: &TicketClaims) -> Result<(), TicketError> {
        self.check_fields(&c.target, c.expires_at_ms, c.client_ip, &c.key_id)
    }

    /// The checks every kind of ticket gets (see [`Expect::check`]).
    fn check_fields(
        &self,
        target: &str,
        expires_at_ms: u64,
        client_ip: IpAddr,
        key_id: &str,
    ) -> Result<(), TicketError> {
        if target != self.gateway_id {
            return Err(TicketError::WrongGateway(target.to_string()));
        }
        if self.now_ms >= expires_at_ms {
            return Err(TicketError::Expired);
        }
        if expires_at_ms - self.now_ms > MAX_TICKET_TTL_MS {
            return Err(TicketError::TooLong);
        }
        if canonical(client_ip) != canonical(self.client_ip) {
            return Err(TicketError::WrongClient);
        }
        if key_id != self.key_id {
            return Err(TicketError::WrongKey);
        }
        Ok(())
    }
}

/// An IPv4-mapped IPv6 address and its IPv4 address are one client (dual-stack sockets).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The tickets a gateway has accepted and that have not expired yet: a ticket is good once.
/// Bounded by [`MAX_LIVE_TICKETS`]; entries leave when their ticket expires.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    used: HashMap<[u8; 16], u64>,
}

impl ReplayGuard {
    /// Marks the ticket used; refuses one already used.
    pub fn consume(&mut self, now_ms: u64, c: &TicketClaims) -> Result<(), TicketError> {
        self.consume_nonce(now_ms, c.nonce, c.expires_at_ms)
    }

    /// Marks the ticket with `nonce`, living until `expires_at_ms`, used; refuses one already
    /// used (any kind of ticket: nonces are random, so kinds never collide).
    pub fn consume_nonce(
        &mut self,
        now_ms: u64,
        nonce: [u8; 16],
        expires_at_ms: u64,
    ) -> Result<(), TicketError> {
        if self.used.len() >= MAX_LIVE_TICKETS {
            self.used.retain(|_, exp| *exp > now_ms);
        }
        if self.used.contains_key(&nonce) {
            return Err(TicketError::Replayed);
        }
        if self.used.len() >= MAX_LIVE_TICKETS {
            return Err(TicketError::Busy);
        }
        self.used.insert(nonce, expires_at_ms);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

// Inference tickets.

/// The version byte of an inference ticket: the high bit marks the kind, so that a game ticket
/// never reads as an inference ticket nor the other way round (both are MACed the same way, and
/// each reader refuses the other's version byte before reading a claim).
const VERSION_INFER: u8 = 0x81;

/// What an inference redirect's ticket says (`federation.inference_route = "redirect"`): the
/// peer serves exactly this request of this key, for this client, on this node. Every field is
/// covered by the MAC. Wire form as [`TicketClaims`], with version [`VERSION_INFER`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferClaims {
    /// The gateway that issued it (for logs).
    pub issuer: String,
    /// The gateway that must accept it.
    pub target: String,
    /// The API key it was issued to (`ApiKey::id`): the peer serves and bills this key.
    pub key_id: String,
    /// The node to serve the request on.
    pub node_id: String,
    /// The client's address as the issuer saw it.
    pub client_ip: IpAddr,
    /// The model the request names.
    pub model: String,
    /// The endpoint's path (`/v1/chat/completions`, ...).
    pub endpoint: String,
    /// Unix milliseconds.
    pub expires_at_ms: u64,
    pub nonce: [u8; 16],
}

impl InferClaims {
    fn encode_claims(&self) -> Vec<u8> {
        let mut out = vec![VERSION_INFER];
        put_str(&mut out, &self.issuer);
        put_str(&mut out, &self.target);
        put_str(&mut out, &self.key_id);
        put_str(&mut out, &self.node_id);
        put_str(&mut out, &self.client_ip.to_string());
        put_str(&mut out, &self.model);
        put_str(&mut out, &self.endpoint);
        out.extend_from_slice(&self.expires_at_ms.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        out
    }

    fn decode_claims(b: &[u8]) -> Result<InferClaims, TicketError> {
        let mut c = Cursor(b);
        if c.take(1)?[0] != VERSION_INFER {
            return Err(TicketError::Malformed("not an inference ticket"));
        }
        let issuer = c.string()?;
        let target = c.string()?;
        let key_id = c.string()?;
        let node_id = c.string()?;
        let client_ip = c
            .string()?
            .parse()
            .map_err(|_| TicketError::Malformed("bad client address"))?;
        let model = c.string()?;
        let endpoint = c.string()?;
        let expires_at_ms = c.u64()?;
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(c.take(16)?);
        if !c.0.is_empty() {
            return Err(TicketError::Malformed("trailing bytes"));
        }
        Ok(InferClaims {
            issuer,
            target,
            key_id,
            node_id,
            client_ip,
            model,
            endpoint,
            expires_at_ms,
            nonce,
        })
    }

    /// The ticket's wire form, MACed with `secret`.
    pub fn seal(&self, secret: &[u8]) -> String {
        seal_body(self.encode_claims(), secret)
    }

    /// Reads an inference ticket and checks its MAC, nothing else (see
    /// [`Expect::check_infer`]).
    pub fn open(ticket: &str, secret: &[u8]) -> Result<InferClaims, TicketError> {
        Self::decode_claims(&open_body(ticket, secret)?)
    }
}

impl Expect<'_> {
    /// [`Expect::check`] for an inference ticket.
    pub fn check_infer(&self, c: &InferClaims) -> Result<(), TicketError> {
        self.check_fields(&c.target, c.expires_at_ms, c.client_ip, &c.key_id)
    }
}

#[cfg(test)]
mod infer_tests {
    use super::tests::{expect, NOW, SECRET};
    use super::*;

    fn claims() -> InferClaims {
        InferClaims {
            issuer: "eu-1".into(),
            target: "us-1".into(),
            key_id: "key_1".into(),
            node_id: "node-b".into(),
            client_ip: "203.0.113.7".parse().unwrap(),
            model: "llama".into(),
            endpoint: "/v1/chat/completions".into(),
            expires_at_ms: NOW + TICKET_TTL_MS,
            nonce: [9; 16],
        }
    }

    #[test]
    fn an_inference_ticket_opens_with_its_claims_and_passes_the_common_checks() {
        let c = InferClaims::open(&claims().seal(SECRET), SECRET).unwrap();
        assert_eq!(c, claims());
        expect().check_infer(&c).unwrap();
        let other_ip = Expect {
            client_ip: "203.0.113.8".parse().unwrap(),
            ..expect()
        };
        assert_eq!(other_ip.check_infer(&c), Err(TicketError::WrongClient));
        let late = Expect {
            now_ms: c.expires_at_ms,
            ..expect()
        };
        assert_eq!(late.check_infer(&c), Err(TicketError::Expired));
        let other_key = Expect {
            key_id: "key_2",
            ..expect()
        };
        assert_eq!(other_key.check_infer(&c), Err(TicketError::WrongKey));
    }

    /// Guards the kinds apart: a game ticket presented for inference (or the reverse) is
    /// refused although its MAC verifies, so one kind can never stand in for the other.
    #[test]
    fn game_and_inference_tickets_never_read_as_each_other() {
        let infer = claims().seal(SECRET);
        assert_eq!(
            TicketClaims::open(&infer, SECRET),
            Err(TicketError::Malformed("unknown version"))
        );
        let game = TicketClaims {
            issuer: "eu-1".into(),
            target: "us-1".into(),
            key_id: "key_1".into(),
            node_id: "node-b".into(),
            client_ip: "203.0.113.7".parse().unwrap(),
            game: "arena".into(),
            width: 1280,
            height: 720,
            fps: 60,
            bitrate_kbps: 8000,
            codec: VideoCodec::H264,
            expires_at_ms: NOW + TICKET_TTL_MS,
            nonce: [7; 16],
        }
        .seal(SECRET);
        assert_eq!(
            InferClaims::open(&game, SECRET),
            Err(TicketError::Malformed("not an inference ticket"))
        );
        // Game tickets still read as before.
        assert!(TicketClaims::open(&game, SECRET).is_ok());
    }

    #[test]
    fn forged_or_hostile_inference_tickets_are_refused_without_panicking() {
        let mut forged = claims();
        forged.model = "bigger-model".into();
        assert_eq!(
            InferClaims::open(&forged.seal(b"a guess at the secret"), SECRET),
            Err(TicketError::BadMac)
        );
        for t in ["", "zz", "00", &"a".repeat(MAX_TICKET_LEN + 2)] {
            assert!(InferClaims::open(t, SECRET).is_err(), "{t:.20}");
        }
        let mut guard = ReplayGuard::default();
        let c = claims();
        guard.consume_nonce(NOW, c.nonce, c.expires_at_ms).unwrap();
        assert_eq!(
            guard.consume_nonce(NOW, c.nonce, c.expires_at_ms),
            Err(TicketError::Replayed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const SECRET: &[u8] = b"federation secret of 32 bytes!!!";
    pub(super) const NOW: u64 = 1_800_000_000_000;

    fn claims() -> TicketClaims {
        TicketClaims {
            issuer: "eu-1".into(),
            target: "us-1".into(),
            key_id: "key_1".into(),
            node_id: "node-b".into(),
            client_ip: "203.0.113.7".parse().unwrap(),
            game: "arena".into(),
            width: 1280,
            height: 720,
            fps: 60,
            bitrate_kbps: 8000,
            codec: VideoCodec::Hevc,
            expires_at_ms: NOW + TICKET_TTL_MS,
            nonce: [7; 16],
        }
    }

    /// What the accepting gateway `us-1` knows, for the claims both kinds of test mint.
    pub(super) fn expect() -> Expect<'static> {
        Expect {
            gateway_id: "us-1",
            client_ip: "203.0.113.7".parse().unwrap(),
            key_id: "key_1",
            now_ms: NOW,
        }
    }

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        let tag = hmac_sha256(b"Jefe", &[b"what do ya ", b"want for nothing?"]);
        assert_eq!(
            hex::encode(tag),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_sealed_ticket_opens_with_the_same_claims_and_passes_its_checks() {
        let t = claims().seal(SECRET);
        let c = TicketClaims::open(&t, SECRET).unwrap();
        assert_eq!(c, claims());
        expect().check(&c).unwrap();
        ReplayGuard::default().consume(NOW, &c).unwrap();
    }

    /// Seals raw claims bytes as a gateway would (a valid MAC over whatever they are).
    fn seal_raw(body: &[u8]) -> String {
        let tag = hmac_sha256(SECRET, &[CONTEXT, body]);
        hex::encode([body, &tag].concat())
    }

    /// The claims of `c` in version 1's layout (no codec), as the previous release sealed them.
    fn version_1_body(c: &TicketClaims) -> Vec<u8> {
        let mut out = vec![VERSION_H264];
        for s in [&c.issuer, &c.target, &c.key_id, &c.node_id] {
            put_str(&mut out, s);
        }
        put_str(&mut out, &c.client_ip.to_string());
        put_str(&mut out, &c.game);
        for v in [c.width, c.height, c.fps, c.bitrate_kbps] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&c.expires_at_ms.to_be_bytes());
        out.extend_from_slice(&c.nonce);
        out
    }

    #[test]
    fn a_ticket_carries_its_codec_and_a_version_1_ticket_is_an_h264_session() {
        for codec in VideoCodec::ALL {
            let c = TicketClaims { codec, ..claims() };
            assert_eq!(
                TicketClaims::open(&c.seal(SECRET), SECRET).unwrap().codec,
                codec
            );
        }
        let old = TicketClaims::open(&seal_raw(&version_1_body(&claims())), SECRET).unwrap();
        assert_eq!(
            old,
            TicketClaims {
                codec: VideoCodec::H264,
                ..claims()
            }
        );
    }

    #[test]
    fn a_ticket_naming_an_unknown_codec_or_version_is_malformed() {
        // A version 2 body whose codec is a name this build does not know (validly MACed: a
        // newer issuer, or a bug), and one from a version that does not exist yet.
        let body = claims().encode_claims();
        let at = body.windows(6).position(|w| w == b"\0\x04hevc").unwrap();
        let mut vp9 = body.clone();
        vp9[at + 2..at + 6].copy_from_slice(b"vp09");
        assert_eq!(
            TicketClaims::open(&seal_raw(&vp9), SECRET),
            Err(TicketError::Malformed("unknown codec"))
        );
        let mut v3 = body;
        v3[0] = 3;
        assert_eq!(
            TicketClaims::open(&seal_raw(&v3), SECRET),
            Err(TicketError::Malformed("unknown version"))
        );
    }

    #[test]
    fn a_ticket_with_a_forged_mac_is_refused() {
        let mut t = claims().seal(SECRET).into_bytes();
        let last = t.len() - 1;
        t[last] = if t[last] == b'0' { b'1' } else { b'0' };
        let t = String::from_utf8(t).unwrap();
        assert_eq!(TicketClaims::open(&t, SECRET), Err(TicketError::BadMac));
        // Claims edited without the secret (another node, a longer life) do not verify either.
        let mut forged = claims();
        forged.node_id = "node-c".into();
        let t = forged.seal(b"a guess at the secret");
        assert_eq!(TicketClaims::open(&t, SECRET), Err(TicketError::BadMac));
    }

    #[test]
    fn an_expired_ticket_is_refused() {
        let c = claims();
        let late = Expect {
            now_ms: c.expires_at_ms,
            ..expect()
        };
        assert_eq!(late.check(&c), Err(TicketError::Expired));
    }

    #[test]
    fn a_ticket_claiming_a_long_life_is_refused() {
        let mut c = claims();
        c.expires_at_ms = NOW + MAX_TICKET_TTL_MS + 1;
        assert_eq!(expect().check(&c), Err(TicketError::TooLong));
    }

    #[test]
    fn a_ticket_for_another_client_address_is_refused() {
        let other = Expect {
            client_ip: "203.0.113.8".parse().unwrap(),
            ..expect()
        };
        assert_eq!(other.check(&claims()), Err(TicketError::WrongClient));
        // The same client over a dual-stack socket is the same client.
        let mapped = Expect {
            client_ip: "::ffff:203.0.113.7".parse().unwrap(),
            ..expect()
        };
        assert_eq!(mapped.check(&claims()), Ok(()));
    }

    #[test]
    fn a_ticket_for_another_gateway_or_key_is_refused() {
        let other_gw = Expect {
            gateway_id: "ap-1",
            ..expect()
        };
        assert_eq!(
            other_gw.check(&claims()),
            Err(TicketError::WrongGateway("us-1".into()))
        );
        let other_key = Expect {
            key_id: "key_2",
            ..expect()
        };
        assert_eq!(other_key.check(&claims()), Err(TicketError::WrongKey));
    }

    #[test]
    fn a_replayed_ticket_is_refused() {
        let mut guard = ReplayGuard::default();
        let c = claims();
        guard.consume(NOW, &c).unwrap();
        assert_eq!(guard.consume(NOW + 1, &c), Err(TicketError::Replayed));
    }

    #[test]
    fn the_replay_guard_stays_bounded_and_forgets_expired_tickets() {
        let mut guard = ReplayGuard::default();
        let mut c = claims();
        for i in 0..MAX_LIVE_TICKETS as u64 {
            c.nonce[..8].copy_from_slice(&i.to_be_bytes());
            guard.consume(NOW, &c).unwrap();
        }
        c.nonce = [0xff; 16];
        assert_eq!(guard.consume(NOW, &c), Err(TicketError::Busy));
        // Once they expire, their room is free again.
        guard.consume(c.expires_at_ms, &c).unwrap();
        assert_eq!(guard.len(), 1);
    }

    #[test]
    fn hostile_ticket_text_is_refused_without_panicking() {
        for t in [
            "",
            "zz",
            "00",
            &"a".repeat(MAX_TICKET_LEN + 2),
            &"00".repeat(40),
        ] {
            assert!(TicketClaims::open(t, SECRET).is_err(), "{t:.20}");
        }
        // A validly MACed body that does not parse is malformed, not a panic.
        let body = vec![VERSION, 0xff, 0xff];
        let tag = hmac_sha256(SECRET, &[CONTEXT, &body]);
        let t = hex::encode([body.as_slice(), &tag].concat());
        assert_eq!(
            TicketClaims::open(&t, SECRET),
            Err(TicketError::Malformed("truncated"))
        );
    }
}
