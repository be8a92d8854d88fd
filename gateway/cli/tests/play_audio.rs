//! `nearpath play --audio-out` against the demo (gateway and in-process node): the binary as a
//! player runs it writes an Ogg Opus file that ffprobe reads as Opus, 48 kHz, stereo, as long as
//! the session.

use nearpath_gateway::Listeners;
use nearpath_gateway_cli::demo::{Demo, DEMO_API_KEY, DEMO_GAME};
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nearpath_play_audio_out_writes_ogg_opus_that_ffprobe_reads() {
    let mut demo = Demo::start(Listeners::ephemeral().await.unwrap(), None)
        .await
        .unwrap();
    demo.node_registered().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("arena.opus");
    let (quic, pin, path) = (demo.addrs.quic, demo.cert_sha256.clone(), file.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_nearpath"))
            .args(["play", "--gateway", &quic.to_string(), "--pin", &pin])
            .args(["--key", DEMO_API_KEY, "--game", DEMO_GAME])
            .args([
                "--width",
                "320",
                "--height",
                "180",
                "--fps",
                "30",
                "--bitrate",
                "1000",
            ])
            .args(["--seconds", "3", "--audio-out"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "nearpath play failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("audio packets"), "{stdout}");
    assert!(stdout.contains("(Ogg Opus;"), "{stdout}");
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_streams",
            "-show_format",
            "-of",
            "json",
        ])
        .arg(&file)
        .output()
        .expect("ffprobe runs (apt-get install ffmpeg; .ci/deps installs it)");
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&probe.stdout).unwrap();
    let s = &v["streams"][0];
    assert_eq!(s["codec_name"], "opus", "{v}");
    assert_eq!(s["sample_rate"], "48000", "{v}");
    assert_eq!(s["channels"], 2, "{v}");
    let duration: f64 = v["format"]["duration"].as_str().unwrap().parse().unwrap();
    // Three seconds of play, less the session's start-up and the closing round trips.
    assert!(
        (2.5..=3.2).contains(&duration),
        "the file lasts {duration} s for a 3 s session: {stdout}"
    );
    demo.stop().await;
}
