//! Trickle ICE fragments (`PATCH /v1/sessions/{id}` with `application/trickle-ice-sdpfrag`) as
//! the gateway parses them: `gateway/src/sdp.rs::parse_sdpfrag`, included here as is.
//!
//! Asserts:
//! - allocation stays linear in the body, and one fragment yields at most
//!   `MAX_FRAGMENT_CANDIDATES` candidates (each becomes connectivity checks the gateway sends);
//! - every candidate is one `candidate:` attribute on one line;
//! - writing the parsed fragment back out and parsing it again gives the same fragment;
//! - a rejection names a line of the body that is neither `a=` nor `m=`.

#![no_main]

#[path = "../../protocol/fuzz/fuzz_targets/common/alloc.rs"]
mod alloc;
#[allow(dead_code)]
#[path = "../../gateway/src/sdp.rs"]
mod sdp;

use libfuzzer_sys::fuzz_target;
use sdp::{parse_sdpfrag, SdpFrag, MAX_FRAGMENT_CANDIDATES};

fn write(frag: &SdpFrag) -> String {
    let mut out = String::new();
    if let Some(u) = &frag.ice_ufrag {
        out.push_str(&format!("a=ice-ufrag:{u}\r\n"));
    }
    if let Some(p) = &frag.ice_pwd {
        out.push_str(&format!("a=ice-pwd:{p}\r\n"));
    }
    out.push_str("m=video 9 UDP/TLS/RTP/SAVPF 0\r\n");
    if let Some(m) = &frag.mid {
        out.push_str(&format!("a=mid:{m}\r\n"));
    }
    for c in &frag.candidates {
        out.push_str(&format!("a={c}\r\n"));
    }
    if frag.end_of_candidates {
        out.push_str("a=end-of-candidates\r\n");
    }
    out
}

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let (parsed, peak) = alloc::peak_during(|| parse_sdpfrag(body));
    assert!(
        peak <= 64 * data.len() + 64 * 1024,
        "parsing a {}-byte fragment allocated {peak} bytes",
        data.len()
    );
    match parsed {
        Ok(frag) => {
            assert!(frag.candidates.len() <= MAX_FRAGMENT_CANDIDATES);
            for c in &frag.candidates {
                assert!(c.starts_with("candidate:"));
                assert!(!c.contains('\n'));
                assert_eq!(c.trim(), c);
            }
            let again = parse_sdpfrag(&write(&frag)).expect("a written fragment parses");
            assert_eq!(again, frag);
        }
        Err(reason) => {
            assert!(
                body.lines()
                    .map(str::trim)
                    .any(|l| !l.is_empty() && !l.starts_with("a=") && !l.starts_with("m="))
                    || body
                        .lines()
                        .filter(|l| l.trim().starts_with("a=candidate:"))
                        .count()
                        > MAX_FRAGMENT_CANDIDATES,
                "rejected a fragment of only a= and m= lines: {reason}"
            );
        }
    }
});
