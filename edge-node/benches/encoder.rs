//! Per-frame cost of the game pipeline: rendering the built-in game, and encoding its frames
//! with OpenH264 at the bitrates players expect (720p60 at 10 Mbit/s, 1080p60 at 20 Mbit/s).
//! The encode benchmarks render each next frame outside the clock, so they report encoder
//! time alone; each keeps one encoder running across all its samples, so rate control is in
//! its steady state, and prints the bitrate it actually produced.
//!
//! `encode/<size>/default` is what sessions use (one thread, low complexity, camera tuning);
//! the other variants show what the alternatives cost. Run with
//! `cargo bench -p nearpath-edge-node --bench encoder` (add a filter such as `default` to run
//! fewer). To see what a machine without nasm gets, build with `OPENH264_NO_ASM=1` in a
//! separate target directory (the variable is not tracked by OpenH264's build script, so an
//! existing build would not be redone).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use nearpath_edge_node::game::encoder::{
    ContentHint, Encoder, EncoderParams, H264Complexity, OpenH264Encoder, OpenH264Options,
};
use nearpath_edge_node::game::BuiltinGame;
use nearpath_protocol::input::InputEvent;
use std::hint::black_box;
use std::time::{Duration, Instant};

const SIZES: [(u32, u32, u32); 2] = [(1280, 720, 10_000), (1920, 1080, 20_000)];

/// Steps the game one frame with some steering, so the ship moves as well as the scenery.
fn play(game: &mut BuiltinGame) {
    let phase = game.frame_number() % 240;
    let code = [68, 83, 65, 87][(phase / 60) as usize];
    if phase.is_multiple_of(60) {
        for c in [68, 83, 65, 87] {
            game.apply_input(&InputEvent::Key {
                code: c,
                down: c == code,
            });
        }
    }
    game.step();
}

fn render(c: &mut Criterion) {
    let mut group = c.benchmark_group("render");
    for (w, h, _) in SIZES {
        let mut game = BuiltinGame::new("arena", w, h).expect("valid size");
        group.bench_function(BenchmarkId::from_parameter(format!("{w}x{h}")), |b| {
            b.iter(|| {
                play(&mut game);
                black_box(game.render());
            });
        });
    }
    group.finish();
}

/// Encoder variants: name, threads, options.
fn variants() -> Vec<(&'static str, u16, OpenH264Options)> {
    let default = OpenH264Options::default();
    vec![
        ("default", 1, default),
        (
            "medium_complexity",
            1,
            OpenH264Options {
                complexity: H264Complexity::Medium,
                ..default
            },
        ),
        (
            "screen_content",
            1,
            OpenH264Options {
                content: ContentHint::Screen,
                ..default
            },
        ),
        ("threads2", 2, default),
        ("threads4", 4, default),
    ]
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(8));
    for (w, h, kbps) in SIZES {
        for (name, threads, options) in variants() {
            let id = format!("{w}x{h}@60_{}mbps/{name}", kbps / 1000);
            let mut game = BuiltinGame::new("arena", w, h).expect("valid size");
            let params = EncoderParams {
                width: w,
                height: h,
                fps: 60,
                bitrate_kbps: kbps,
                threads,
            };
            let mut enc = OpenH264Encoder::with_options(params, options).expect("encoder");
            // The IDR that starts every stream is not what a session spends its time on.
            enc.encode(game.render(), true).expect("first frame");
            let mut bytes = 0u64;
            let mut frames = 0u64;
            group.bench_function(BenchmarkId::from_parameter(&id), |b| {
                b.iter_custom(|iters| {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        play(&mut game);
                        let frame = game.render();
                        let t0 = Instant::now();
                        let au = enc.encode(frame, false).expect("encode");
                        spent += t0.elapsed();
                        if let Some(au) = au {
                            bytes += au.data.len() as u64;
                        }
                        frames += 1;
                        black_box(&bytes);
                    }
                    spent
                });
            });
            if frames > 0 {
                let mbps = bytes as f64 * 8.0 * 60.0 / frames as f64 / 1e6;
                eprintln!("{id}: {frames} frames, {mbps:.2} Mbit/s at 60 fps");
            }
        }
    }
    group.finish();
}

criterion_group!(benches, render, encode);
criterion_main!(benches);
