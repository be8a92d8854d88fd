//! Per-frame cost of the game pipeline on one core: rendering the built-in game, and encoding
//! its frames with OpenH264 at the bitrates players expect (720p60 at 10 Mbit/s, 1080p60 at
//! 20 Mbit/s). Only the timed part runs inside the measurement: the encode benchmark renders
//! each next frame outside the clock, so it reports encoder time alone.
//!
//! Run with `cargo bench -p nearpath-edge-node --bench encoder`; build OpenH264 without its
//! assembly (`OPENH264_NO_ASM=1`, in a separate target directory so the normal build is kept)
//! to see what a machine without nasm gets.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use nearpath_edge_node::game::encoder::{Encoder, EncoderParams, OpenH264Encoder};
use nearpath_edge_node::game::BuiltinGame;
use nearpath_protocol::input::InputEvent;
use std::hint::black_box;
use std::time::{Duration, Instant};

const SIZES: [(u32, u32, u32); 2] = [(1280, 720, 10_000), (1920, 1080, 20_000)];

/// Steps the game one frame with some steering, so the ship moves as well as the scenery.
fn play(game: &mut BuiltinGame) {
    let phase = game.frame_number() % 240;
    let code = [68, 83, 65, 87][(phase / 60) as usize];
    if phase % 60 == 0 {
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
        group.bench_function(BenchmarkId::from_parameter(format!("{w}x{h}")), |b| {
            let mut game = BuiltinGame::new("arena", w, h).expect("valid size");
            b.iter(|| {
                play(&mut game);
                black_box(game.render());
            });
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(8));
    for (w, h, kbps) in SIZES {
        let id = format!("{w}x{h}@60_{}mbps", kbps / 1000);
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            let mut game = BuiltinGame::new("arena", w, h).expect("valid size");
            let mut enc = OpenH264Encoder::new(EncoderParams {
                width: w,
                height: h,
                fps: 60,
                bitrate_kbps: kbps,
                threads: 1,
            })
            .expect("encoder");
            // The IDR that starts every stream is not what a session spends its time on.
            enc.encode(game.render(), true).expect("first frame");
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    play(&mut game);
                    let frame = game.render();
                    let t0 = Instant::now();
                    let au = enc.encode(frame, false).expect("encode");
                    spent += t0.elapsed();
                    black_box(au);
                }
                spent
            });
        });
    }
    group.finish();
}

criterion_group!(benches, render, encode);
criterion_main!(benches);
