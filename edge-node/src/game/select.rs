//! Which encoders a node offers, decided once at start from `[encoder]`: `auto` probes NVENC,
//! VAAPI, x264 and OpenH264 in that order by opening a small encoder and encoding a frame, and
//! logs why the better ones were passed over; an explicit choice that does not open here is an
//! error naming the reason. Probe results are cached for the process, so the start-up checks
//! (`preflight`) and the node itself probe once between them.

use super::encoder::{openh264_factory, EncoderFactory, OpenH264Encoder};
use nearpath_config::{EncoderConfig, EncoderKind};
use nearpath_protocol::VideoCodec;

/// One encoder the node offers: its codec, implementation name and how to make one.
#[derive(Clone)]
pub struct OfferedEncoder {
    /// What it produces.
    pub codec: VideoCodec,
    /// Implementation name (`x264`, `h264_nvenc`, `openh264`), as `Register` reports it.
    pub implementation: &'static str,
    /// Makes one per session.
    pub factory: EncoderFactory,
}

impl std::fmt::Debug for OfferedEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.codec, self.implementation)
    }
}

/// The node's encoders: exactly one per codec, H.264 always first.
#[derive(Clone, Debug)]
pub struct NodeEncoders {
    /// What `[encoder] encoder` resolved to (never `Auto`).
    pub kind: EncoderKind,
    offered: Vec<OfferedEncoder>,
    /// Encoders `auto` (or an optional codec) passed over, with why, in probe order.
    pub passed_over: Vec<(String, String)>,
}

/// Why the preferred encoder could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("encoder \"{kind}\" is unavailable: {reason}")]
pub struct Unavailable {
    /// The configured choice.
    pub kind: &'static str,
    /// Why, in words an operator can act on.
    pub reason: String,
}

impl NodeEncoders {
    /// OpenH264 only (the node's fallback, and what a build without `libav` has).
    pub fn openh264() -> NodeEncoders {
        NodeEncoders {
            kind: EncoderKind::Openh264,
            offered: vec![OfferedEncoder {
                codec: VideoCodec::H264,
                implementation: OpenH264Encoder::NAME,
                factory: openh264_factory(),
            }],
            passed_over: Vec::new(),
        }
    }

    /// Resolves `[encoder]` on this machine (probing; see the module documentation).
    pub fn resolve(cfg: &EncoderConfig) -> Result<NodeEncoders, Unavailable> {
        imp::resolve(cfg)
    }

    /// The encoder of `codec`, if the node has one.
    pub fn get(&self, codec: VideoCodec) -> Option<&OfferedEncoder> {
        self.offered.iter().find(|e| e.codec == codec)
    }

    /// Every encoder offered, H.264 first.
    pub fn offered(&self) -> &[OfferedEncoder] {
        &self.offered
    }

    /// The factory of the H.264 encoder (every node has one).
    pub fn h264_factory(&self) -> EncoderFactory {
        self.get(VideoCodec::H264)
            .map(|e| e.factory.clone())
            .unwrap_or_else(openh264_factory)
    }

    /// The implementation name of the H.264 encoder.
    pub fn h264_name(&self) -> &'static str {
        self.get(VideoCodec::H264)
            .map(|e| e.implementation)
            .unwrap_or(OpenH264Encoder::NAME)
    }

    /// One line for the start-up log: what was picked and why the better ones were not.
    pub fn describe(&self) -> String {
        let offered: Vec<String> = self
            .offered
            .iter()
            .map(|e| format!("{} ({})", e.implementation, e.codec))
            .collect();
        let mut line = format!("encoders: {}", offered.join(", "));
        for (name, why) in &self.passed_over {
            line.push_str(&format!("; {name}: {why}"));
        }
        line
    }
}

#[cfg(not(feature = "libav"))]
mod imp {
    use super::*;

    pub(super) fn resolve(cfg: &EncoderConfig) -> Result<NodeEncoders, Unavailable> {
        const WHY: &str = "this edge-node was built without libavcodec (cargo feature `libav`)";
        match cfg.encoder {
            EncoderKind::Openh264 => Ok(NodeEncoders::openh264()),
            EncoderKind::Auto => {
                let mut n = NodeEncoders::openh264();
                n.passed_over
                    .push(("nvenc, vaapi, x264".into(), WHY.into()));
                Ok(n)
            }
            kind => Err(Unavailable {
                kind: kind.as_str(),
                reason: WHY.into(),
            }),
        }
    }
}

#[cfg(feature = "libav")]
mod imp {
    use super::*;
    use crate::game::encoder::{Encoder, EncoderParams};
    use crate::game::libav::{self, LibavCodec, LibavEncoder, LibavOptions};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    type ProbeKey = (LibavCodec, u16, LibavOptions);

    /// Probes once per process per (encoder, threads, options).
    fn probe(codec: LibavCodec, threads: u16, options: &LibavOptions) -> Result<(), String> {
        static CACHE: OnceLock<Mutex<HashMap<ProbeKey, Result<(), String>>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let key = (codec, threads, options.clone());
        if let Some(r) = cache.lock().expect("probe cache").get(&key) {
            return r.clone();
        }
        let r = libav::probe(codec, threads, options);
        cache.lock().expect("probe cache").insert(key, r.clone());
        r
    }

    fn offer(codec: LibavCodec, options: &LibavOptions) -> OfferedEncoder {
        let options = options.clone();
        OfferedEncoder {
            codec: codec.codec(),
            implementation: codec.name(),
            factory: Arc::new(move |p: EncoderParams| {
                Ok(Box::new(LibavEncoder::open(codec, p, options.clone())?) as Box<dyn Encoder>)
            }),
        }
    }

    pub(super) fn resolve(cfg: &EncoderConfig) -> Result<NodeEncoders, Unavailable> {
        let options = LibavOptions {
            intra_refresh: cfg.intra_refresh,
            vaapi_device: cfg.vaapi_device.clone(),
        };
        let threads = cfg.threads.max(1);
        // The H.264 encoder of each family, and the other codecs it may add.
        let family = |kind: EncoderKind| -> (LibavCodec, Vec<LibavCodec>) {
            match kind {
                EncoderKind::Nvenc => (
                    LibavCodec::H264Nvenc,
                    vec![LibavCodec::HevcNvenc, LibavCodec::Av1Nvenc],
                ),
                EncoderKind::Vaapi => (LibavCodec::H264Vaapi, Vec::new()),
                _ => (
                    LibavCodec::X264,
                    if cfg.software_hevc_av1 {
                        vec![LibavCodec::X265, LibavCodec::Aom]
                    } else {
                        Vec::new()
                    },
                ),
            }
        };
        let mut passed_over = Vec::new();
        let order: Vec<EncoderKind> = match cfg.encoder {
            EncoderKind::Openh264 => return Ok(NodeEncoders::openh264()),
            EncoderKind::Auto => vec![EncoderKind::Nvenc, EncoderKind::Vaapi, EncoderKind::X264],
            explicit => vec![explicit],
        };
        for kind in order {
            let (h264, extra) = family(kind);
            if let Err(reason) = probe(h264, threads, &options) {
                if cfg.encoder != EncoderKind::Auto {
                    return Err(Unavailable {
                        kind: kind.as_str(),
                        reason: format!("{}: {reason}", h264.name()),
                    });
                }
                passed_over.push((h264.name().to_string(), reason));
                continue;
            }
            let mut offered = vec![offer(h264, &options)];
            for codec in extra {
                match probe(codec, threads, &options) {
                    Ok(()) => offered.push(offer(codec, &options)),
                    Err(reason) => passed_over.push((codec.name().to_string(), reason)),
                }
            }
            return Ok(NodeEncoders {
                kind,
                offered,
                passed_over,
            });
        }
        let mut n = NodeEncoders::openh264();
        n.passed_over = passed_over;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openh264_is_always_there() {
        let cfg = EncoderConfig {
            encoder: EncoderKind::Openh264,
            ..EncoderConfig::default()
        };
        let n = NodeEncoders::resolve(&cfg).unwrap();
        assert_eq!(n.kind, EncoderKind::Openh264);
        assert_eq!(n.h264_name(), "openh264");
        assert!(n.get(VideoCodec::Hevc).is_none());
    }

    #[cfg(feature = "libav")]
    #[test]
    fn auto_passes_over_what_this_machine_lacks_and_says_why() {
        let n = NodeEncoders::resolve(&EncoderConfig::default()).unwrap();
        let line = n.describe();
        if std::path::Path::new("/dev/nvidia0").exists() {
            eprintln!("NVIDIA GPU present: {line}");
            return;
        }
        // No GPU here: auto lands on x264 and names why NVENC and VAAPI were passed over.
        assert_eq!(n.kind, EncoderKind::X264, "{line}");
        assert_eq!(n.h264_name(), "x264");
        let names: Vec<&str> = n.passed_over.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["h264_nvenc", "h264_vaapi"], "{line}");
        assert!(
            n.passed_over[0].1.contains("NVIDIA"),
            "the reason names the missing driver or GPU: {line}"
        );
    }

    #[cfg(feature = "libav")]
    #[test]
    fn an_explicit_encoder_that_does_not_open_is_an_error_naming_why() {
        if std::path::Path::new("/dev/nvidia0").exists() {
            eprintln!("skipped: an NVIDIA GPU is present");
            return;
        }
        let cfg = EncoderConfig {
            encoder: EncoderKind::Nvenc,
            ..EncoderConfig::default()
        };
        let err = NodeEncoders::resolve(&cfg).unwrap_err();
        assert_eq!(err.kind, "nvenc");
        assert!(err.reason.starts_with("h264_nvenc: "), "{err}");
        let cfg = EncoderConfig {
            encoder: EncoderKind::Vaapi,
            vaapi_device: "/nonexistent/renderD999".into(),
            ..EncoderConfig::default()
        };
        let err = NodeEncoders::resolve(&cfg).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/renderD999"), "{err}");
    }

    #[cfg(not(feature = "libav"))]
    #[test]
    fn without_libav_auto_is_openh264_and_x264_is_an_error() {
        let n = NodeEncoders::resolve(&EncoderConfig::default()).unwrap();
        assert_eq!(n.h264_name(), "openh264");
        let cfg = EncoderConfig {
            encoder: EncoderKind::X264,
            ..EncoderConfig::default()
        };
        assert!(NodeEncoders::resolve(&cfg)
            .unwrap_err()
            .reason
            .contains("libav"));
    }
}
