//! `bench encoders`: milliseconds per frame of each video encoder the node can use, on the
//! built-in game's frames, at each size, in one run (same machine, same frames, same
//! settings as a session: the session's bitrate, IDR on the first frame only, the configured
//! threads). Rendering is not timed; each encoder gets `--frames` frames after `--warmup`.
//!
//! Encoders: `openh264` always; `x264` (and `h264_nvenc` where an NVIDIA GPU and driver are
//! present) with the `libav` feature of the edge node.

use anyhow::{bail, Context};
use nearpath_edge_node::game::{BuiltinGame, Encoder, EncoderParams, OpenH264Encoder};
use serde_json::json;
use std::time::Instant;

#[derive(Debug, Clone, clap::Args)]
pub struct EncodersArgs {
    /// Frames timed per encoder and size (at least 300 for the README's figures).
    #[arg(long, default_value_t = 300)]
    pub frames: usize,
    /// Frames encoded first and not timed.
    #[arg(long, default_value_t = 30)]
    pub warmup: usize,
    /// Sizes, comma-separated WIDTHxHEIGHT.
    #[arg(long, default_value = "1280x720,1920x1080")]
    pub sizes: String,
    /// Encoders, comma-separated: openh264, x264, h264_nvenc ("auto": every one that opens
    /// here).
    #[arg(long, default_value = "x264,openh264")]
    pub encoders: String,
    /// Encoder threads (`[encoder] threads`).
    #[arg(long, default_value_t = 1)]
    pub threads: u16,
    /// Frames per second the rate control budgets for.
    #[arg(long, default_value_t = 60)]
    pub fps: u32,
    /// Do not pin the encoding thread to the last CPU.
    #[arg(long)]
    pub no_pin: bool,
}

fn parse_size(s: &str) -> anyhow::Result<(u32, u32)> {
    let (w, h) = s
        .split_once('x')
        .with_context(|| format!("size {s:?} is not WIDTHxHEIGHT"))?;
    Ok((w.trim().parse()?, h.trim().parse()?))
}

/// The bitrate a session of this size gets by default (10 Mbit/s at 720p, scaled by pixels).
fn bitrate_kbps(w: u32, h: u32) -> u32 {
    let pixels = u64::from(w) * u64::from(h);
    (10_000 * pixels / (1280 * 720)).clamp(1_000, 50_000) as u32
}

fn open(name: &str, p: EncoderParams) -> anyhow::Result<Box<dyn Encoder>> {
    match name {
        "openh264" => Ok(Box::new(OpenH264Encoder::new(p)?)),
        #[cfg(feature = "libav")]
        other => {
            use nearpath_edge_node::game::libav::{LibavCodec, LibavEncoder, LibavOptions};
            let codec = LibavCodec::ALL
                .into_iter()
                .find(|c| c.name() == other)
                .with_context(|| format!("unknown encoder {other:?}"))?;
            Ok(Box::new(LibavEncoder::open(
                codec,
                p,
                LibavOptions::default(),
            )?))
        }
        #[cfg(not(feature = "libav"))]
        other => bail!("{other}: this build has no libavcodec encoders"),
    }
}

/// Nearest-rank percentile of sorted samples.
fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

pub fn run(a: EncodersArgs) -> anyhow::Result<()> {
    if a.frames == 0 {
        bail!("--frames must be at least 1");
    }
    if !a.no_pin {
        let last = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
        super::os::pin_current_thread(&[last])
            .map_err(|e| anyhow::anyhow!("pinning to CPU {last}: {e}"))?;
    }
    let sizes: Vec<(u32, u32)> = a
        .sizes
        .split(',')
        .map(parse_size)
        .collect::<anyhow::Result<_>>()?;
    let mut names: Vec<String> = a
        .encoders
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    if names == ["auto"] {
        names = vec!["h264_nvenc".into(), "x264".into(), "openh264".into()];
    }
    let mut results = Vec::new();
    for &(w, h) in &sizes {
        for name in &names {
            let params = EncoderParams {
                width: w,
                height: h,
                fps: a.fps,
                bitrate_kbps: bitrate_kbps(w, h),
                threads: a.threads,
            };
            let mut enc = match open(name, params) {
                Ok(e) => e,
                Err(e) if a.encoders == "auto" => {
                    eprintln!("{name}: skipped: {e}");
                    continue;
                }
                Err(e) => return Err(e.context(format!("{name} at {w}x{h}"))),
            };
            let mut game = BuiltinGame::new("arena", w, h)?;
            let mut ms = Vec::with_capacity(a.frames);
            let mut bytes = 0u64;
            let mut empty = 0u64;
            for i in 0..a.warmup + a.frames {
                game.step();
                let frame = game.render();
                let t = Instant::now();
                let au = enc.encode(frame, i == 0)?;
                let took = t.elapsed().as_secs_f64() * 1000.0;
                if i >= a.warmup {
                    ms.push(took);
                    match au {
                        Some(au) => bytes += au.data.len() as u64,
                        None => empty += 1,
                    }
                }
            }
            ms.sort_by(f64::total_cmp);
            let kbps = bytes as f64 * 8.0 * f64::from(a.fps) / a.frames as f64 / 1000.0;
            println!(
                "{name:>10} {w}x{h}: median {:.2} ms, p90 {:.2} ms, min {:.2}, max {:.2} ({} frames, {kbps:.0} kbit/s at {} fps{})",
                pct(&ms, 50.0),
                pct(&ms, 90.0),
                ms[0],
                ms[ms.len() - 1],
                a.frames,
                a.fps,
                if empty > 0 {
                    format!(", {empty} frames without output")
                } else {
                    String::new()
                }
            );
            results.push(json!({
                "encoder": enc.name(),
                "width": w,
                "height": h,
                "frames": a.frames,
                "threads": a.threads,
                "ms": {
                    "median": pct(&ms, 50.0),
                    "p90": pct(&ms, 90.0),
                    "min": ms[0],
                    "max": ms[ms.len() - 1],
                },
                "kbps": kbps,
                "frames_without_output": empty,
            }));
        }
    }
    println!("{}", json!({ "bench": "encoders", "results": results }));
    Ok(())
}
