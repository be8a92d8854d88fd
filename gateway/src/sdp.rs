//! What the gateway reads from browser SDP before webrtc-rs sees it: the WHEP offer check and
//! trickle ICE fragments (`application/trickle-ice-sdpfrag` PATCH bodies).
//!
//! Both take text straight from an unauthenticated-length HTTP body, so they must never panic.
//! This module depends on nothing but `rtc-sdp` (the SDP parser webrtc-rs itself uses) and std,
//! and names nothing else in the crate: the fuzz targets in `fuzz/` include this file as is, so
//! they exercise exactly the gateway's code without compiling webrtc-rs and the rest.

use std::io::Cursor;

/// What the gateway needs from an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferSummary {
    pub ice_ufrag: String,
    pub ice_pwd: String,
    /// The offer has a data channel section (input is possible).
    pub has_data_channel: bool,
    /// The video codecs the gateway can send that the browser's receiving video sections list,
    /// by their configuration names (`h264`, `av1`, `hevc`), in the offer's order, each once.
    pub video_codecs: Vec<&'static str>,
}

/// The configuration name of a video codec an offer lists, when the gateway can send it in the
/// form offered: H.264 Constrained Baseline in packetization mode 1, AV1 Main profile (what
/// libaom, SVT-AV1 and NVENC write for 8-bit 4:2:0), H.265 Main profile.
pub fn sendable_video_codec(name: &str, clock_rate: u32, fmtp: &str) -> Option<&'static str> {
    if clock_rate != 90_000 {
        return None;
    }
    if name.eq_ignore_ascii_case("H264") {
        return is_constrained_baseline_mode1(fmtp).then_some("h264");
    }
    let param = |key: &str| {
        fmtp.split(';').find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            k.trim().eq_ignore_ascii_case(key).then(|| v.trim())
        })
    };
    if name.eq_ignore_ascii_case("AV1") {
        // RFC-to-be (AV1 RTP spec, section 7.2): an absent profile means 0, Main.
        return matches!(param("profile"), None | Some("0")).then_some("av1");
    }
    if name.eq_ignore_ascii_case("H265") {
        // RFC 7798 section 7.1: an absent profile-id means 1, Main.
        return matches!(param("profile-id"), None | Some("1")).then_some("hevc");
    }
    None
}

/// Checks that an offer can be answered: it parses, has a video section the browser receives,
/// offers a video codec the gateway can send ([`sendable_video_codec`]), and carries ICE
/// credentials.
///
/// It parses with the same parser `RTCSessionDescription::offer` uses, so an offer that passes
/// here also parses when it is handed to the peer connection.
pub fn check_offer(sdp: &str) -> Result<OfferSummary, String> {
    let parsed = rtc_sdp::SessionDescription::unmarshal(&mut Cursor::new(sdp.as_bytes()))
        .map_err(|e| format!("not an SDP offer: {e}"))?;
    let mut video = false;
    let mut video_codecs: Vec<&'static str> = Vec::new();
    let mut has_data_channel = false;
    let mut ufrag = parsed.attribute("ice-ufrag").cloned();
    let mut pwd = parsed.attribute("ice-pwd").cloned();
    for m in &parsed.media_descriptions {
        match m.media_name.media.as_str() {
            "video" => {
                if m.attribute("sendonly").is_some() || m.attribute("inactive").is_some() {
                    continue;
                }
                video = true;
                // The m= line's format order is the browser's preference (JSEP); `codecs()`
                // is keyed by payload type, so the order comes from the m= line.
                let codecs = m.codecs();
                for pt in &m.media_name.formats {
                    let Some(c) = pt.parse::<u8>().ok().and_then(|pt| codecs.get(&pt)) else {
                        continue;
                    };
                    if let Some(name) = sendable_video_codec(&c.name, c.clock_rate, &c.fmtp) {
                        if !video_codecs.contains(&name) {
                            video_codecs.push(name);
                        }
                    }
                }
            }
            "application" => has_data_channel = true,
            _ => {}
        }
        if ufrag.is_none() {
            ufrag = m.attribute("ice-ufrag").flatten().map(str::to_string);
        }
        if pwd.is_none() {
            pwd = m.attribute("ice-pwd").flatten().map(str::to_string);
        }
    }
    if !video {
        return Err("the offer has no video section the browser receives (add a recvonly video transceiver)".into());
    }
    if video_codecs.is_empty() {
        return Err("the offer has no video codec the gateway sends: H.264 Constrained Baseline (profile-level-id 42e0xx, packetization-mode=1), AV1 (profile 0) or H.265 (profile-id 1)".into());
    }
    let (Some(ice_ufrag), Some(ice_pwd)) = (ufrag, pwd) else {
        return Err("the offer has no ICE credentials (ice-ufrag/ice-pwd)".into());
    };
    // The credentials end up in STUN USERNAME attributes and are compared with every trickled
    // fragment; RFC 8839 bounds them, and every browser's fit, so anything else is refused here
    // rather than carried (a megabyte-long ufrag) into each connectivity check.
    check_ice_credential("ice-ufrag", &ice_ufrag, 4)?;
    check_ice_credential("ice-pwd", &ice_pwd, 22)?;
    Ok(OfferSummary {
        ice_ufrag,
        ice_pwd,
        has_data_channel,
        video_codecs,
    })
}

/// Checks an ICE credential against RFC 8839: `min..=256` characters from `ALPHA / DIGIT / "+" /
/// "/"`.
fn check_ice_credential(name: &str, value: &str, min: usize) -> Result<(), String> {
    let ice_char = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
    if !(min..=256).contains(&value.len()) || !value.bytes().all(ice_char) {
        return Err(format!(
            "the offer's {name} must be {min} to 256 characters of A-Z, a-z, 0-9, + and / \
             (RFC 8839)"
        ));
    }
    Ok(())
}

/// `packetization-mode=1` and a profile-level-id whose profile and constraint bytes are
/// Constrained Baseline (`42e0`, or `42c0`, which RFC 6184 decoders treat the same).
pub fn is_constrained_baseline_mode1(fmtp: &str) -> bool {
    let mut mode1 = false;
    let mut cb = false;
    for kv in fmtp.split(';') {
        let Some((k, v)) = kv.trim().split_once('=') else {
            continue;
        };
        match k.trim().to_ascii_lowercase().as_str() {
            "packetization-mode" => mode1 = v.trim() == "1",
            "profile-level-id" => {
                let v = v.trim().to_ascii_lowercase();
                cb = v.len() == 6 && (v.starts_with("42e0") || v.starts_with("42c0"));
            }
            _ => {}
        }
    }
    mode1 && cb
}

/// A trickle ICE fragment (RFC 8840): candidates, and the credentials they belong to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SdpFrag {
    pub ice_ufrag: Option<String>,
    pub ice_pwd: Option<String>,
    pub mid: Option<String>,
    /// `candidate:…` strings (without `a=`).
    pub candidates: Vec<String>,
    pub end_of_candidates: bool,
}

/// Most candidates one trickle fragment may carry. Each remote candidate makes the gateway send
/// connectivity checks to the address it names, so an unbounded list would let one PATCH aim
/// tens of thousands of STUN requests at third parties. A browser trickles one candidate per
/// fragment, or its few local ones at once.
pub const MAX_FRAGMENT_CANDIDATES: usize = 32;

/// Parses an `application/trickle-ice-sdpfrag` body.
pub fn parse_sdpfrag(body: &str) -> Result<SdpFrag, String> {
    let mut frag = SdpFrag::default();
    for line in body.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some(attr) = line.strip_prefix("a=") else {
            // m= lines group candidates per media section; with BUNDLE there is one.
            if line.starts_with("m=") {
                continue;
            }
            return Err(format!(
                "unexpected line {line:?} (only a= and m= lines belong in a fragment)"
            ));
        };
        if let Some(v) = attr.strip_prefix("ice-ufrag:") {
            frag.ice_ufrag = Some(v.to_string());
        } else if let Some(v) = attr.strip_prefix("ice-pwd:") {
            frag.ice_pwd = Some(v.to_string());
        } else if let Some(v) = attr.strip_prefix("mid:") {
            frag.mid.get_or_insert_with(|| v.to_string());
        } else if attr.starts_with("candidate:") {
            if frag.candidates.len() == MAX_FRAGMENT_CANDIDATES {
                return Err(format!(
                    "more than {MAX_FRAGMENT_CANDIDATES} candidates in one fragment"
                ));
            }
            frag.candidates.push(attr.to_string());
        } else if attr == "end-of-candidates" {
            frag.end_of_candidates = true;
        }
    }
    Ok(frag)
}

/// Whether a candidate names an mDNS host (`….local`), which the gateway does not resolve.
pub fn is_mdns_candidate(candidate: &str) -> bool {
    candidate
        .split_whitespace()
        .nth(4)
        .is_some_and(|a| a.ends_with(".local"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constrained_baseline_mode_1_is_recognised() {
        assert!(is_constrained_baseline_mode1(
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"
        ));
        assert!(!is_constrained_baseline_mode1(
            "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42e01f"
        ));
        assert!(!is_constrained_baseline_mode1(
            "packetization-mode=1;profile-level-id=640c1f"
        ));
        assert!(!is_constrained_baseline_mode1(
            "packetization-mode=1;profile-level-id=42001f"
        ));
        assert!(!is_constrained_baseline_mode1(""));
    }

    const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96 108\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\na=rtcp-mux\r\n\
a=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdef0123456789\r\n\
a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\n\
a=setup:actpass\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:108 H264/90000\r\n\
a=fmtp:108 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n\
m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\n\
a=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdef0123456789\r\na=setup:actpass\r\na=sctp-port:5000\r\n";

    #[test]
    fn offers_are_checked_for_video_h264_and_ice() {
        let s = check_offer(OFFER).unwrap();
        assert_eq!(s.ice_ufrag, "abcd");
        assert!(s.has_data_channel);
        let no_h264 = OFFER.replace("a=rtpmap:108 H264/90000\r\n", "a=rtpmap:108 VP9/90000\r\n");
        assert!(check_offer(&no_h264).unwrap_err().contains("H.264"));
        let sendonly = OFFER.replace("a=recvonly", "a=sendonly");
        assert!(check_offer(&sendonly).unwrap_err().contains("video"));
        let no_ice = OFFER.replace("a=ice-ufrag:abcd\r\n", "");
        assert!(check_offer(&no_ice).unwrap_err().contains("ICE"));
        assert!(check_offer("hello").is_err());
    }

    /// Guards codec negotiation: the offer's sendable video codecs are read in the m= line's
    /// order, in the forms the nodes encode, and garbage rtpmap/fmtp lines neither panic nor
    /// count as a codec.
    #[test]
    fn offers_list_their_sendable_video_codecs_in_order() {
        assert_eq!(check_offer(OFFER).unwrap().video_codecs, ["h264"]);
        let av1_first = OFFER.replace("SAVPF 96 108", "SAVPF 45 96 108 49").replace(
            "a=rtpmap:96 VP8/90000\r\n",
            "a=rtpmap:96 VP8/90000\r\na=rtpmap:45 AV1/90000\r\n\
a=fmtp:45 level-idx=5;profile=0;tier=0\r\na=rtpmap:49 H265/90000\r\n\
a=fmtp:49 level-id=93;profile-id=1;tier-flag=0;tx-mode=SRST\r\n",
        );
        assert_eq!(
            check_offer(&av1_first).unwrap().video_codecs,
            ["av1", "h264", "hevc"]
        );
        // AV1 only: fine for the offer check (the gateway then decides whether it can serve it).
        let av1_only = av1_first.replace("SAVPF 45 96 108 49", "SAVPF 45");
        assert_eq!(check_offer(&av1_only).unwrap().video_codecs, ["av1"]);
        // Profiles no node encodes (AV1 High, HEVC Main 10) and clock rates that are not 90 kHz
        // do not count.
        let wrong = av1_only
            .replace("profile=0", "profile=1")
            .replace("SAVPF 45", "SAVPF 45 49")
            .replace("profile-id=1", "profile-id=2");
        let err = check_offer(&wrong).unwrap_err();
        assert!(
            err.contains("no video codec") && err.contains("AV1"),
            "{err}"
        );
        assert!(check_offer(&av1_only.replace("AV1/90000", "AV1/48000")).is_err());
        // Garbage in the codec lines: refused or ignored, never a panic.
        for garbage in [
            "a=rtpmap:45 AV1\r\n",
            "a=rtpmap:999 AV1/90000\r\n",
            "a=rtpmap:45 AV1/99999999999999999999\r\n",
            "a=rtpmap:x AV1/90000\r\n",
            "a=fmtp:45 profile\r\n",
            "a=fmtp:45 ;;;=;profile==0;\r\n",
            "a=fmtp:\r\n",
            "a=rtpmap:\u{1F600} H265/90000/2/\r\n",
        ] {
            // Each replaces the only sendable codec's rtpmap: nothing is left to send.
            let bad = av1_only.replace("a=rtpmap:45 AV1/90000\r\n", garbage);
            assert!(check_offer(&bad).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn sdpfrags_parse_and_mdns_candidates_are_recognised() {
        let body = "a=ice-ufrag:abcd\r\na=ice-pwd:secret\r\nm=video 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n\
a=candidate:1 1 udp 2122260223 192.0.2.1 54321 typ host\r\n\
a=candidate:2 1 udp 2122260223 1f5a0c4e-0000-4000-8000-000000000000.local 54322 typ host\r\na=end-of-candidates\r\n";
        let f = parse_sdpfrag(body).unwrap();
        assert_eq!(f.ice_ufrag.as_deref(), Some("abcd"));
        assert_eq!(f.mid.as_deref(), Some("0"));
        assert_eq!(f.candidates.len(), 2);
        assert!(f.end_of_candidates);
        assert!(!is_mdns_candidate(&f.candidates[0]));
        assert!(is_mdns_candidate(&f.candidates[1]));
        assert!(parse_sdpfrag("v=0\r\n").is_err());
    }

    #[test]
    fn chromium_offer_passes() {
        let offer = include_str!("../../tests/browser/chromium-156-offer.sdp");
        let s = check_offer(offer).unwrap();
        assert_eq!(
            (s.ice_ufrag.as_str(), s.ice_pwd.as_str()),
            ("vOIz", "ApXIpW/yr68GumvvDGpz458/")
        );
        // Chromium's default order lists H.264 before AV1 and, headless, no H.265.
        assert_eq!(s.video_codecs, ["h264", "av1"]);
    }

    /// Credentials used to be taken as written, so an offer with a one-byte or megabyte ufrag,
    /// or one with spaces and quotes, reached webrtc-rs. The `whep_offer` fuzz target asserts
    /// the rule for every offer it gets accepted.
    #[test]
    fn offer_with_out_of_spec_ice_credentials_is_refused() {
        for (from, to) in [
            ("a=ice-ufrag:abcd\r\n", "a=ice-ufrag:abc\r\n"),
            ("a=ice-ufrag:abcd\r\n", "a=ice-ufrag:ab d\r\n"),
            ("a=ice-ufrag:abcd\r\n", "a=ice-ufrag:\r\n"),
            (
                "a=ice-pwd:0123456789abcdef0123456789\r\n",
                "a=ice-pwd:0123456789abcdef01234\r\n",
            ),
            (
                "a=ice-pwd:0123456789abcdef0123456789\r\n",
                "a=ice-pwd:0123456789abcdef012345678\"\r\n",
            ),
        ] {
            let offer = OFFER.replacen(from, to, 1);
            let err = check_offer(&offer).unwrap_err();
            assert!(err.contains("RFC 8839"), "{to:?}: {err}");
        }
        let long = OFFER.replacen(
            "a=ice-ufrag:abcd",
            &format!("a=ice-ufrag:{}", "u".repeat(257)),
            1,
        );
        assert!(check_offer(&long).is_err());
        let longest = OFFER.replacen(
            "a=ice-ufrag:abcd",
            &format!("a=ice-ufrag:{}", "u".repeat(256)),
            1,
        );
        assert!(check_offer(&longest).is_ok());
    }

    /// One PATCH used to carry any number of candidates, each a target for the gateway's
    /// connectivity checks. The `trickle_sdpfrag` fuzz target asserts the bound.
    #[test]
    fn trickle_fragment_with_too_many_candidates_is_refused() {
        let line = "a=candidate:1 1 udp 2122260223 192.0.2.1 54321 typ host\r\n";
        let ok = format!("a=mid:0\r\n{}", line.repeat(MAX_FRAGMENT_CANDIDATES));
        assert_eq!(
            parse_sdpfrag(&ok).unwrap().candidates.len(),
            MAX_FRAGMENT_CANDIDATES
        );
        let over = format!("a=mid:0\r\n{}", line.repeat(MAX_FRAGMENT_CANDIDATES + 1));
        assert!(parse_sdpfrag(&over).unwrap_err().contains("candidates"));
    }
}
