//! The `input` data channel: the page's messages in, frame and notice messages out.

use super::Counters;
use crate::clock::SharedClock;
use crate::game::{ClientEvent, Relay};
use nearpath_protocol::input::{MAX_PADS, STANDARD_BUTTONS};
use nearpath_protocol::message::SetVideo;
use nearpath_protocol::{FrameHeader, InputEvent};
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::debug;
use webrtc::data_channel::{DataChannel, DataChannelEvent};

/// Largest data channel message accepted from the page.
const MAX_INPUT_MESSAGE: usize = 4096;

/// A message from the page on the `input` channel.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum PageMessage {
    Key {
        seq: u64,
        ts: Option<f64>,
        code: u16,
        down: bool,
    },
    Mouse {
        seq: u64,
        ts: Option<f64>,
        dx: i32,
        dy: i32,
    },
    Button {
        seq: u64,
        ts: Option<f64>,
        button: u8,
        down: bool,
    },
    Wheel {
        seq: u64,
        ts: Option<f64>,
        dx: i16,
        dy: i16,
    },
    /// One gamepad's whole state: `pad` 0..=3 (0 when absent), up to four stick axes in
    /// -1..=1, up to two triggers (left, right) in 0..=1, and the standard layout's 17 buttons
    /// as bits.
    Pad {
        seq: u64,
        ts: Option<f64>,
        #[serde(default)]
        pad: u8,
        axes: Vec<f64>,
        #[serde(default)]
        triggers: Vec<f64>,
        buttons: u32,
    },
    Keyframe,
    /// Change the picture size and frame rate (the page's video element was resized). The
    /// session's rules check it against the limits and the rate limit.
    Video {
        width: u32,
        height: u32,
        fps: u32,
    },
    Ping {
        id: u64,
        ts: Option<f64>,
    },
}

impl PageMessage {
    /// Parses one data channel message; `None` for anything malformed (the page's fault, ignored).
    pub fn parse(data: &[u8]) -> Option<PageMessage> {
        if data.len() > MAX_INPUT_MESSAGE {
            return None;
        }
        let m: PageMessage = serde_json::from_slice(data).ok()?;
        // A pad past the fourth, more axes or triggers than a pad has, or buttons beyond the
        // standard layout's are malformed, not clamped: the page is at fault.
        if let PageMessage::Pad {
            pad,
            axes,
            triggers,
            buttons,
            ..
        } = &m
        {
            if usize::from(*pad) >= MAX_PADS
                || axes.len() > 4
                || triggers.len() > 2
                || buttons & !STANDARD_BUTTONS != 0
            {
                return None;
            }
        }
        Some(m)
    }

    /// The input event, its seq and its send time (Unix µs), for the messages that are input.
    pub fn input(&self) -> Option<(u64, Option<f64>, InputEvent)> {
        let axis =
            |v: Option<&f64>| (v.copied().unwrap_or(0.0).clamp(-1.0, 1.0) * 32767.0).round() as i16;
        let trigger =
            |v: Option<&f64>| (v.copied().unwrap_or(0.0).clamp(0.0, 1.0) * 65535.0).round() as u16;
        Some(match self {
            PageMessage::Key {
                seq,
                ts,
                code,
                down,
            } => (
                *seq,
                *ts,
                InputEvent::Key {
                    code: *code,
                    down: *down,
                },
            ),
            PageMessage::Mouse { seq, ts, dx, dy } => {
                (*seq, *ts, InputEvent::MouseMove { dx: *dx, dy: *dy })
            }
            PageMessage::Button {
                seq,
                ts,
                button,
                down,
            } => (
                *seq,
                *ts,
                InputEvent::MouseButton {
                    button: *button,
                    down: *down,
                },
            ),
            PageMessage::Wheel { seq, ts, dx, dy } => {
                (*seq, *ts, InputEvent::Wheel { dx: *dx, dy: *dy })
            }
            PageMessage::Pad {
                seq,
                ts,
                pad,
                axes,
                triggers,
                buttons,
            } => (
                *seq,
                *ts,
                InputEvent::Gamepad {
                    pad: *pad,
                    triggers: [trigger(triggers.first()), trigger(triggers.get(1))],
                    axes: [
                        axis(axes.first()),
                        axis(axes.get(1)),
                        axis(axes.get(2)),
                        axis(axes.get(3)),
                    ],
                    buttons: *buttons,
                },
            ),
            PageMessage::Keyframe | PageMessage::Video { .. } | PageMessage::Ping { .. } => {
                return None
            }
        })
    }
}

/// The message that follows a frame's RTP packets (see the module docs of `webrtc`).
pub(super) fn frame_message(h: &FrameHeader, gw_us: u64, rtp_ts: u32) -> String {
    format!(
        r#"{{"t":"frame","seq":{},"input_seq":{},"capture_ts_us":{},"encode_us":{},"gw_us":{},"rtp_ts":{},"key":{}}}"#,
        h.seq, h.input_seq, h.capture_ts_us, h.encode_us, gw_us, rtp_ts, h.keyframe
    )
}

/// Sends a text message if the channel exists; a page without it simply misses it.
pub(super) async fn tell(dc: &Option<Arc<dyn DataChannel>>, msg: &str) {
    if let Some(dc) = dc {
        if let Err(e) = dc.try_send_text(msg).await {
            debug!(error = %e, "data channel message not sent");
        }
    }
}

/// Reads the page's messages: input goes straight to the node, the rest to the session task.
/// Every well-formed message is reported on `heard` (`true` for a ping) for the session's
/// liveness rule (see `super::policy`); a full queue drops the report, which only delays the
/// verdict, as the queued reports say the page is there.
pub(super) async fn read_input(
    dc: Arc<dyn DataChannel>,
    relay: Arc<Relay>,
    events: mpsc::Sender<ClientEvent>,
    heard: mpsc::Sender<bool>,
    counters: Arc<Counters>,
    clock: SharedClock,
) {
    loop {
        let ev = dc.poll().await;
        let Some(ev) = ev else { break };
        let DataChannelEvent::OnMessage(msg) = ev else {
            if matches!(ev, DataChannelEvent::OnClose) {
                break;
            }
            continue;
        };
        let Some(m) = PageMessage::parse(&msg.data) else {
            counters.bad_messages.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let _ = heard.try_send(matches!(m, PageMessage::Ping { .. }));
        if let Some((seq, ts, event)) = m.input() {
            let sent_us = ts
                .filter(|t| t.is_finite() && *t > 0.0)
                .map(|t| (t * 1000.0) as u64)
                .unwrap_or_else(|| clock.unix_us());
            counters.inputs.fetch_add(1, Ordering::Relaxed);
            relay.send_input(seq, sent_us, event);
            continue;
        }
        match m {
            PageMessage::Keyframe => {
                let _ = events.try_send(ClientEvent::ForceKeyframe);
            }
            PageMessage::Video { width, height, fps } => {
                // A full queue drops it; the page asks again on its next resize.
                let _ = events.try_send(ClientEvent::SetVideo(SetVideo { width, height, fps }));
            }
            PageMessage::Ping { id, ts } => {
                let ts = ts.filter(|t| t.is_finite()).unwrap_or(0.0);
                let pong = format!(
                    r#"{{"t":"pong","id":{id},"ts":{ts},"gw_us":{}}}"#,
                    clock.unix_us()
                );
                let _ = dc.try_send_text(&pong).await;
            }
            _ => {}
        }
    }
}

/// Waits until the SCTP send buffer drains (bounded), so a last message is not cut off by the
/// close that follows.
pub(super) async fn flush(dc: &Option<Arc<dyn DataChannel>>) {
    let Some(dc) = dc else { return };
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        if dc.outstanding_bytes().await.unwrap_or(0) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_pings_count_as_a_live_page() {
        // A ping is validated like input: what does not parse is a bad message, not a sign of
        // life, so garbage cannot stand in for the page's pings.
        assert_eq!(
            PageMessage::parse(br#"{"t":"ping","id":7}"#),
            Some(PageMessage::Ping { id: 7, ts: None })
        );
        assert!(matches!(
            PageMessage::parse(br#"{"t":"ping","id":7,"ts":1718000000000.5}"#),
            Some(PageMessage::Ping { id: 7, ts: Some(_) })
        ));
        for bad in [
            &br#"{"t":"ping"}"#[..],
            br#"{"t":"ping","id":-1}"#,
            br#"{"t":"ping","id":"7"}"#,
            br#"{"t":"ping","id":7,"ts":"now"}"#,
            br#"{"t":"ping","id":1e30}"#,
            br#"{"t":"pong","id":7}"#,
        ] {
            assert_eq!(
                PageMessage::parse(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut huge = br#"{"t":"ping","id":7,"pad":""#.to_vec();
        huge.extend(std::iter::repeat_n(b'x', MAX_INPUT_MESSAGE));
        huge.extend(br#""}"#);
        assert_eq!(PageMessage::parse(&huge), None);
    }

    #[test]
    fn page_messages_map_to_input_events() {
        let m = PageMessage::parse(
            br#"{"t":"key","seq":3,"ts":1700000000000.5,"code":87,"down":true}"#,
        )
        .unwrap();
        assert_eq!(
            m.input(),
            Some((
                3,
                Some(1_700_000_000_000.5),
                InputEvent::Key {
                    code: 87,
                    down: true
                }
            ))
        );
        let m = PageMessage::parse(br#"{"t":"pad","seq":4,"axes":[1.0,-1.0,2.5],"buttons":5}"#)
            .unwrap();
        assert_eq!(
            m.input(),
            Some((
                4,
                None,
                InputEvent::Gamepad {
                    pad: 0,
                    axes: [32767, -32767, 32767, 0],
                    triggers: [0, 0],
                    buttons: 5
                }
            ))
        );
        let m = PageMessage::parse(br#"{"t":"mouse","seq":5,"dx":-3,"dy":4}"#).unwrap();
        assert_eq!(
            m.input(),
            Some((5, None, InputEvent::MouseMove { dx: -3, dy: 4 }))
        );
        assert_eq!(
            PageMessage::parse(br#"{"t":"ping","id":1,"ts":2.0}"#)
                .unwrap()
                .input(),
            None
        );
        assert!(PageMessage::parse(br#"{"t":"key","seq":-1,"code":87,"down":true}"#).is_none());
        assert!(PageMessage::parse(br#"{"t":"nope"}"#).is_none());
        let m = PageMessage::parse(
            br#"{"t":"pad","seq":6,"pad":2,"axes":[0,0.5],"triggers":[0.25,1.7],"buttons":65665}"#,
        )
        .unwrap();
        assert_eq!(
            m.input(),
            Some((
                6,
                None,
                InputEvent::Gamepad {
                    pad: 2,
                    axes: [0, 16384, 0, 0],
                    triggers: [16384, 65535],
                    buttons: 65665
                }
            ))
        );
        // Hostile pads: pad 7, NaN or huge axes, huge arrays, buttons past the 17 standard ones.
        let mut huge = br#"{"t":"pad","seq":7,"axes":["#.to_vec();
        huge.extend(std::iter::repeat_n(&b"0,"[..], 1500).flatten());
        huge.extend(br#"0],"buttons":0}"#);
        for bad in [
            &br#"{"t":"pad","seq":7,"pad":7,"axes":[0,0,0,0],"buttons":0}"#[..],
            br#"{"t":"pad","seq":7,"pad":4,"axes":[],"buttons":0}"#,
            br#"{"t":"pad","seq":7,"pad":-1,"axes":[],"buttons":0}"#,
            br#"{"t":"pad","seq":7,"axes":[NaN,0],"buttons":0}"#,
            br#"{"t":"pad","seq":7,"axes":[1e400],"buttons":0}"#,
            br#"{"t":"pad","seq":7,"axes":[0,0,0,0,0],"buttons":0}"#,
            br#"{"t":"pad","seq":7,"axes":[],"triggers":[0,0,0],"buttons":0}"#,
            br#"{"t":"pad","seq":7,"axes":[],"triggers":["x"],"buttons":0}"#,
            br#"{"t":"pad","seq":7,"axes":[],"buttons":131072}"#,
            br#"{"t":"pad","seq":7,"axes":[],"buttons":4294967296}"#,
            &huge,
        ] {
            assert_eq!(
                PageMessage::parse(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            PageMessage::parse(br#"{"t":"video","width":1920,"height":1080,"fps":60}"#),
            Some(PageMessage::Video {
                width: 1920,
                height: 1080,
                fps: 60
            })
        );
        // Out-of-type values never become a change; in-type nonsense (0x0) is refused by the
        // session's rules with a reason.
        for bad in [
            &br#"{"t":"video","width":-2,"height":1080,"fps":60}"#[..],
            br#"{"t":"video","width":1e12,"height":1080,"fps":60}"#,
            br#"{"t":"video","width":1920.5,"height":1080,"fps":60}"#,
            br#"{"t":"video","width":"1920","height":1080,"fps":60}"#,
            br#"{"t":"video","width":1920,"height":1080}"#,
            br#"{"t":"video","width":NaN,"height":1080,"fps":60}"#,
        ] {
            assert_eq!(
                PageMessage::parse(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(PageMessage::parse(b"not json").is_none());
        assert!(PageMessage::parse(&vec![b' '; MAX_INPUT_MESSAGE + 1]).is_none());
    }
}
