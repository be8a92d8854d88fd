//! proptest strategies for every wire type (enabled in this crate's tests and, for other
//! crates, with the `proptest` feature).

use proptest::collection::vec;
use proptest::prelude::*;

use crate::frame::FrameHeader;
use crate::input::{InputDatagram, InputEvent};
use crate::message::*;
use crate::PROTOCOL_VERSION;

/// Short strings over all of Unicode, including the empty string.
pub fn text() -> impl Strategy<Value = String> {
    ".{0,24}"
}

/// Finite `f32`s, the only floats the decoder accepts.
pub fn finite_f32() -> impl Strategy<Value = f32> {
    any::<f32>().prop_filter("finite", |f| f.is_finite())
}

fn names() -> impl Strategy<Value = Vec<String>> {
    vec(text(), 0..6)
}

fn reject_code() -> impl Strategy<Value = RejectCode> {
    prop_oneof![
        Just(RejectCode::BadToken),
        Just(RejectCode::OperatorNotVerified),
        Just(RejectCode::OperatorSuspended),
        Just(RejectCode::Geofence),
        Just(RejectCode::Version),
        Just(RejectCode::Duplicate),
        Just(RejectCode::Other),
    ]
}

fn refuse_code() -> impl Strategy<Value = RefuseCode> {
    prop_oneof![
        Just(RefuseCode::Busy),
        Just(RefuseCode::UnknownWorkload),
        Just(RefuseCode::BadRequest),
        Just(RefuseCode::Internal),
    ]
}

fn register() -> impl Strategy<Value = Message> {
    let gpu = (text(), text(), any::<u64>()).prop_map(|(model, class, vram_mib)| Gpu {
        model,
        class,
        vram_mib,
    });
    (
        text(),
        text(),
        text(),
        vec(gpu, 0..4),
        names(),
        names(),
        any::<u32>(),
        any::<u32>(),
        vec(node_encoder(), 0..4),
    )
        .prop_map(
            |(
                node_id,
                enrolment_token,
                software_version,
                gpus,
                games,
                models,
                gs,
                ic,
                encoders,
            )| {
                Message::Register(Register {
                    protocol_version: PROTOCOL_VERSION,
                    node_id,
                    enrolment_token,
                    software_version,
                    gpus,
                    workloads: Workloads {
                        model_caps: models
                            .iter()
                            .enumerate()
                            .map(|(i, _)| crate::ModelCaps::from_bits(i as u64))
                            .collect(),
                        games,
                        models,
                    },
                    capacity: Capacity {
                        game_sessions: gs,
                        inference_concurrency: ic,
                    },
                    encoders,
                })
            },
        )
}

/// Any known codec.
/// Valid W3C traceparents (version 00, ids not all zero): an invalid one decodes as `None`,
/// so only valid ones round-trip.
pub fn traceparent() -> impl Strategy<Value = String> {
    (
        "[0-9a-f]{31}[1-9a-f]",
        "[1-9a-f][0-9a-f]{15}",
        "[0-9a-f]{2}",
    )
        .prop_map(|(t, s, f)| format!("00-{t}-{s}-{f}"))
}

pub fn video_codec() -> impl Strategy<Value = VideoCodec> {
    proptest::sample::select(VideoCodec::ALL.to_vec())
}

/// Encoders within the decoder's bounds (8 characters of at most 4 bytes: 32 bytes).
fn node_encoder() -> impl Strategy<Value = NodeEncoder> {
    (video_codec(), ".{0,8}").prop_map(|(codec, implementation)| NodeEncoder {
        codec,
        implementation,
    })
}

/// Inventories within the decoder's bounds: strings of at most 4-byte characters stay under
/// their byte caps (24 chars for the 96-byte UUID, 16 for the 64-byte driver, 8 for the 32-byte
/// encoder).
pub fn inventory() -> impl Strategy<Value = Inventory> {
    let gpu = (any::<u32>(), text(), any::<u32>(), ".{0,16}").prop_map(
        |(index, uuid, pci_device_id, driver_version)| GpuIdentity {
            index,
            uuid,
            pci_device_id,
            driver_version,
        },
    );
    let source = prop_oneof![
        Just(WeightsSource::Declared),
        Just(WeightsSource::Computed),
        Just(WeightsSource::Detected),
    ];
    let model =
        (text(), any::<u64>(), source).prop_map(|(name, weights_bytes, source)| ModelWeights {
            name,
            weights_bytes,
            source,
        });
    (vec(gpu, 0..4), vec(model, 0..4), ".{0,8}").prop_map(|(gpus, models, encoder)| Inventory {
        gpus,
        models,
        encoder,
    })
}

fn node_control() -> impl Strategy<Value = Message> {
    prop_oneof![
        register(),
        inventory().prop_map(Message::Inventory),
        (any::<u64>(), any::<u64>(), proptest::option::of(text())).prop_map(
            |(lease_ms, heartbeat_ms, node_country)| Message::Registered(Registered {
                lease_ms,
                heartbeat_ms,
                node_country,
            })
        ),
        (reject_code(), text())
            .prop_map(|(code, reason)| Message::Rejected(Rejected { code, reason })),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            finite_f32(),
            proptest::option::of(finite_f32()),
            proptest::option::of(finite_f32()),
        )
            .prop_map(|(seq, active_sessions, queue_depth, load, gpu_util, enc)| {
                Message::Heartbeat(Heartbeat {
                    seq,
                    active_sessions,
                    queue_depth,
                    load,
                    gpu_util,
                    encoder_ms_p50: enc,
                })
            }),
        any::<u64>().prop_map(|seq| Message::HeartbeatAck(HeartbeatAck { seq })),
        any::<u64>().prop_map(|deadline_ms| Message::Drain(Drain { deadline_ms })),
        Just(Message::Drained),
        text().prop_map(|reason| Message::Shutdown(Shutdown { reason })),
    ]
}

fn session() -> impl Strategy<Value = Message> {
    let game = (
        text(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        video_codec(),
        proptest::option::of(traceparent()),
    )
        .prop_map(
            |(title, width, height, fps, bitrate_kbps, codec, traceparent)| {
                SessionKind::Game(GameParams {
                    title,
                    width,
                    height,
                    fps,
                    bitrate_kbps,
                    codec,
                    traceparent,
                })
            },
        );
    let inference = (text(), 0u8..4, text(), text(), proptest::option::of(text())).prop_map(
        |(model, endpoint, request_json, request_id, traceparent)| SessionKind::Inference {
            model,
            endpoint: crate::openai::Endpoint::from_byte(endpoint).unwrap_or_default(),
            request_json,
            request_id,
            traceparent,
        },
    );
    prop_oneof![
        (any::<u64>(), prop_oneof![game, inference])
            .prop_map(|(session_id, kind)| Message::Open(Open { session_id, kind })),
        any::<u64>().prop_map(|session_id| Message::Accepted(Accepted { session_id })),
        (refuse_code(), text())
            .prop_map(|(code, reason)| Message::Refused(Refused { code, reason })),
        Just(Message::ForceKeyframe),
        any::<u32>().prop_map(|kbps| Message::SetBitrate(SetBitrate { kbps })),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(width, height, fps)| {
            Message::SetVideo(SetVideo { width, height, fps })
        }),
        (
            0..crate::input::MAX_PADS as u8,
            any::<u16>(),
            any::<u16>(),
            0..=MAX_RUMBLE_MS
        )
            .prop_map(|(pad, strong_magnitude, weak_magnitude, duration_ms)| {
                Message::Rumble(Rumble {
                    pad,
                    strong_magnitude,
                    weak_magnitude,
                    duration_ms,
                })
            }),
        text().prop_map(|reason| Message::Close(Close { reason })),
        (any::<u32>(), text(), any::<u64>()).prop_map(|(index, text, node_elapsed_us)| {
            Message::Token(Token {
                index,
                text,
                node_elapsed_us,
            })
        }),
        (text(), any::<u32>(), any::<u32>()).prop_map(|(finish_reason, p, c)| {
            Message::Done(Done {
                finish_reason,
                prompt_tokens: p,
                completion_tokens: c,
            })
        }),
        (text(), text(), any::<bool>()).prop_map(|(code, message, retryable)| {
            Message::Error(ErrorInfo {
                code,
                message,
                retryable,
            })
        }),
        (any::<u32>(), text(), any::<u64>()).prop_map(|(index, json, node_elapsed_us)| {
            Message::Chunk(Chunk {
                index,
                json,
                node_elapsed_us,
            })
        }),
        text().prop_map(|reason| Message::Ended(Ended { reason })),
        any::<u64>().prop_map(|seq| Message::InputApplied(InputApplied { seq })),
    ]
}

fn client() -> impl Strategy<Value = Message> {
    prop_oneof![
        (text(), 0u8..4, text()).prop_map(|(api_key, endpoint, request_json)| {
            Message::InferRequest(InferRequest {
                protocol_version: PROTOCOL_VERSION,
                api_key,
                endpoint: crate::openai::Endpoint::from_byte(endpoint).unwrap_or_default(),
                request_json,
            })
        }),
        (text(), text()).prop_map(|(request_id, model)| Message::InferStarted(InferStarted {
            request_id,
            model
        })),
        (
            text(),
            text(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            vec(video_codec(), 0..4),
            proptest::option::of(traceparent()),
        )
            .prop_map(
                |(api_key, game, width, height, fps, bitrate_kbps, codecs, traceparent)| {
                    Message::PlayRequest(PlayRequest {
                        protocol_version: PROTOCOL_VERSION,
                        api_key,
                        game,
                        width,
                        height,
                        fps,
                        bitrate_kbps,
                        codecs,
                        traceparent,
                    })
                }
            ),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            video_codec()
        )
            .prop_map(|(session_id, width, height, fps, bitrate_kbps, codec)| {
                Message::PlayStarted(PlayStarted {
                    session_id,
                    width,
                    height,
                    fps,
                    bitrate_kbps,
                    codec,
                })
            }),
        text().prop_map(|reason| Message::Paused(Paused { reason })),
        Just(Message::Resumed),
        text().prop_map(|api_key| Message::ListGames(ListGames {
            protocol_version: PROTOCOL_VERSION,
            api_key,
        })),
        names().prop_map(|titles| Message::GameList(GameList { titles })),
        (text(), text(), text(), text(), text()).prop_map(
            |(gateway_id, quic_address, cert_sha256, http_url, ticket)| {
                Message::Redirect(Redirect {
                    gateway_id,
                    quic_address,
                    cert_sha256,
                    http_url,
                    ticket,
                })
            }
        ),
        (text(), text()).prop_map(|(api_key, ticket)| Message::PlayTicket(PlayTicket {
            protocol_version: PROTOCOL_VERSION,
            api_key,
            ticket,
        })),
        (text(), text(), 0u8..4, text()).prop_map(|(api_key, ticket, endpoint, request_json)| {
            Message::InferTicket(InferTicket {
                protocol_version: PROTOCOL_VERSION,
                api_key,
                ticket,
                endpoint: crate::openai::Endpoint::from_byte(endpoint).unwrap_or_default(),
                request_json,
            })
        }),
        text().prop_map(|token| Message::ResumeToken(ResumeToken { token })),
        (text(), any::<u64>(), text()).prop_map(|(api_key, session_id, token)| {
            Message::PlayResume(PlayResume {
                protocol_version: PROTOCOL_VERSION,
                api_key,
                session_id,
                token,
            })
        }),
        text().prop_map(|node_id| Message::PeerOpen(PeerOpen {
            protocol_version: PROTOCOL_VERSION,
            node_id,
        })),
    ]
}

/// Any message that the decoder accepts.
pub fn message() -> impl Strategy<Value = Message> {
    prop_oneof![node_control(), session(), client()]
}

/// Any frame header.
pub fn frame_header() -> impl Strategy<Value = FrameHeader> {
    (
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>()),
        (
            any::<bool>(),
            any::<u64>(),
            any::<u16>(),
            any::<u16>(),
            any::<u32>(),
        ),
    )
        .prop_map(
            |(
                (session_id, seq, capture_ts_us, encode_us),
                (keyframe, input_seq, width, height, payload_len),
            )| {
                FrameHeader {
                    session_id,
                    seq,
                    capture_ts_us,
                    encode_us,
                    keyframe,
                    input_seq,
                    width,
                    height,
                    payload_len,
                }
            },
        )
}

/// Any input event.
pub fn input_event() -> impl Strategy<Value = InputEvent> {
    prop_oneof![
        (any::<u16>(), any::<bool>()).prop_map(|(code, down)| InputEvent::Key { code, down }),
        (any::<i32>(), any::<i32>()).prop_map(|(dx, dy)| InputEvent::MouseMove { dx, dy }),
        (any::<u8>(), any::<bool>())
            .prop_map(|(button, down)| InputEvent::MouseButton { button, down }),
        (any::<i16>(), any::<i16>()).prop_map(|(dx, dy)| InputEvent::Wheel { dx, dy }),
        (
            0..crate::input::MAX_PADS as u8,
            any::<[i16; 4]>(),
            any::<[u16; 2]>(),
            0..=crate::input::STANDARD_BUTTONS
        )
            .prop_map(|(pad, axes, triggers, buttons)| InputEvent::Gamepad {
                pad,
                axes,
                triggers,
                buttons
            }),
        Just(InputEvent::KeyframeRequest),
        any::<u32>().prop_map(|id| InputEvent::Ping { id }),
    ]
}

/// Any input datagram.
pub fn input_datagram() -> impl Strategy<Value = InputDatagram> {
    (any::<u64>(), any::<u64>(), any::<u64>(), input_event()).prop_map(
        |(session_id, seq, sent_ts_us, event)| InputDatagram {
            session_id,
            seq,
            sent_ts_us,
            event,
        },
    )
}
