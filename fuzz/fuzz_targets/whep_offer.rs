//! WHEP offers (`POST /v1/whep/{title}` bodies) as the gateway checks them before webrtc-rs sees
//! them: `gateway/src/sdp.rs::check_offer`, included here as is.
//!
//! Asserts, beyond "no panic" in our code and in the SDP parser it calls:
//! - allocation stays linear in the offer;
//! - an accepted offer really has what the check promises: a video section, an H.264 codec,
//!   ICE credentials that are RFC 8839 ice-chars of legal length and appear in the text, and a
//!   data channel only when an application section is there.

#![no_main]

#[path = "../../protocol/fuzz/fuzz_targets/common/alloc.rs"]
mod alloc;
#[allow(dead_code)]
#[path = "../../gateway/src/sdp.rs"]
mod sdp;

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

fn ice_chars(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

fuzz_target!(|data: &[u8]| {
    // The gateway reads the body as UTF-8 text and refuses anything else before this point.
    let Ok(offer) = std::str::from_utf8(data) else {
        return;
    };
    let (checked, peak) = alloc::peak_during(|| sdp::check_offer(offer));
    assert!(
        peak <= 256 * data.len() + 1024 * 1024,
        "checking a {}-byte offer allocated {peak} bytes",
        data.len()
    );
    match checked {
        Ok(summary) => {
            assert!(offer.contains("m=video"));
            // Every codec the gateway may send is one the offer names, listed once.
            assert!(!summary.video_codecs.is_empty());
            let lower = offer.to_ascii_lowercase();
            for (i, codec) in summary.video_codecs.iter().enumerate() {
                let rtpmap = match *codec {
                    "h264" => "h264/",
                    "av1" => "av1/",
                    "hevc" => "h265/",
                    other => panic!("unknown codec name {other}"),
                };
                assert!(lower.contains(rtpmap), "{codec}");
                assert!(!summary.video_codecs[..i].contains(codec));
            }
            assert!(offer.contains(&format!("a=ice-ufrag:{}", summary.ice_ufrag)));
            assert!(offer.contains(&format!("a=ice-pwd:{}", summary.ice_pwd)));
            assert!((4..=256).contains(&summary.ice_ufrag.len()));
            assert!((22..=256).contains(&summary.ice_pwd.len()));
            assert!(ice_chars(&summary.ice_ufrag) && ice_chars(&summary.ice_pwd));
            assert!(!summary.has_data_channel || offer.contains("m=application"));
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
});
