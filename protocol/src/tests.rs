//! Codec tests without sockets: round trips, arbitrary chunking, hostile input.

use bytes::BytesMut;
use proptest::prelude::*;

use crate::codec::put_varint;
use crate::message::ty;
use crate::*;

/// One instance of every message, with values that exercise multi-byte varints, non-ASCII text,
/// present and absent options.
fn samples() -> Vec<Message> {
    vec![
        Message::Register(Register {
            protocol_version: PROTOCOL_VERSION,
            node_id: "node-fra-1".into(),
            enrolment_token: "tok_§ecret".into(),
            software_version: "0.1.0".into(),
            gpus: vec![
                Gpu {
                    model: "RTX 4090".into(),
                    class: "consumer".into(),
                    vram_mib: 24_564,
                },
                Gpu {
                    model: "H100".into(),
                    class: "datacenter".into(),
                    vram_mib: u64::MAX,
                },
            ],
            workloads: Workloads {
                games: vec!["doom".into(), "".into()],
                models: vec!["llama-3-8b".into(), "embed".into()],
                model_caps: vec![ModelCaps::TOOLS.with(ModelCaps::LOGPROBS)],
            },
            capacity: Capacity {
                game_sessions: 4,
                inference_concurrency: 300,
            },
            encoders: vec![
                NodeEncoder {
                    codec: VideoCodec::H264,
                    implementation: "h264_nvenc".into(),
                },
                NodeEncoder {
                    codec: VideoCodec::Av1,
                    implementation: "av1_nvenc".into(),
                },
            ],
        }),
        Message::Registered(Registered {
            lease_ms: 15_000,
            heartbeat_ms: 5_000,
            node_country: Some("DE".into()),
        }),
        Message::Registered(Registered {
            lease_ms: 0,
            heartbeat_ms: 1,
            node_country: None,
        }),
        Message::Rejected(Rejected {
            code: RejectCode::OperatorNotVerified,
            reason: "KYC pending".into(),
        }),
        Message::Heartbeat(Heartbeat {
            seq: 1 << 40,
            active_sessions: 3,
            queue_depth: 0,
            load: 0.75,
            gpu_util: Some(0.5),
            encoder_ms_p50: None,
        }),
        Message::HeartbeatAck(HeartbeatAck { seq: 128 }),
        Message::Drain(Drain {
            deadline_ms: 30_000,
        }),
        Message::Drained,
        Message::Shutdown(Shutdown {
            reason: "gateway restarting".into(),
        }),
        Message::Inventory(Inventory {
            gpus: vec![GpuIdentity {
                index: 300,
                uuid: "GPU-5d1a8a2e-0c1f-4b1e-9f0e-2a3b4c5d6e7f".into(),
                pci_device_id: 0x2330_10de,
                driver_version: "550.54.15".into(),
            }],
            models: vec![ModelWeights {
                name: "llama-3-70b-ü".into(),
                weights_bytes: 141_000_000_000,
                source: WeightsSource::Computed,
            }],
            encoder: "openh264".into(),
        }),
        Message::Open(Open {
            session_id: u64::MAX,
            kind: SessionKind::Game(GameParams {
                title: "doom".into(),
                width: 1920,
                height: 1080,
                fps: 60,
                bitrate_kbps: 20_000,
                codec: VideoCodec::Hevc,
                traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            }),
        }),
        Message::Open(Open {
            session_id: 7,
            kind: SessionKind::Inference {
                model: "llama".into(),
                endpoint: crate::openai::Endpoint::Responses,
                request_json: r#"{"model":"llama","messages":[{"role":"user","content":"héllo"}]}"#
                    .into(),
                request_id: "req_1".into(),
                traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            },
        }),
        Message::Accepted(Accepted { session_id: 7 }),
        Message::Refused(Refused {
            code: RefuseCode::Busy,
            reason: "full".into(),
        }),
        Message::ForceKeyframe,
        Message::SetBitrate(SetBitrate { kbps: 8_000 }),
        Message::SetVideo(SetVideo {
            width: 1920,
            height: 1080,
            fps: 144,
        }),
        Message::Rumble(Rumble {
            pad: 3,
            strong_magnitude: 65_535,
            weak_magnitude: 300,
            duration_ms: MAX_RUMBLE_MS,
        }),
        Message::Close(Close {
            reason: "client left".into(),
        }),
        Message::Token(Token {
            index: 0,
            text: "日本".into(),
            node_elapsed_us: 12_345,
        }),
        Message::Done(Done {
            finish_reason: "stop".into(),
            prompt_tokens: 12,
            completion_tokens: 34,
        }),
        Message::Error(ErrorInfo {
            code: "no_capacity".into(),
            message: "all nodes busy".into(),
            retryable: true,
        }),
        Message::Ended(Ended {
            reason: "geofence: node left allowed region".into(),
        }),
        Message::InputApplied(InputApplied { seq: 99 }),
        Message::Chunk(Chunk {
            index: 3,
            json: r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]}}]}"#.into(),
            node_elapsed_us: 1234,
        }),
        Message::InferRequest(InferRequest {
            protocol_version: PROTOCOL_VERSION,
            api_key: "sk-test".into(),
            endpoint: crate::openai::Endpoint::Embeddings,
            request_json: "{}".into(),
        }),
        Message::InferStarted(InferStarted {
            request_id: "req-1".into(),
            model: "llama".into(),
        }),
        Message::PlayRequest(PlayRequest {
            protocol_version: PROTOCOL_VERSION,
            api_key: "sk-test".into(),
            game: "doom".into(),
            width: 1280,
            height: 720,
            fps: 60,
            bitrate_kbps: 10_000,
            codecs: vec![VideoCodec::Av1, VideoCodec::H264],
            traceparent: None,
        }),
        Message::PlayStarted(PlayStarted {
            session_id: 42,
            width: 1280,
            height: 720,
            fps: 60,
            bitrate_kbps: 10_000,
            codec: VideoCodec::Av1,
        }),
        Message::Paused(Paused {
            reason: "failover".into(),
        }),
        Message::Resumed,
        Message::ListGames(ListGames {
            protocol_version: PROTOCOL_VERSION,
            api_key: "sk".into(),
        }),
        Message::GameList(GameList {
            titles: vec!["doom".into(), "quake".into()],
        }),
        Message::Redirect(Redirect {
            gateway_id: "us-1".into(),
            quic_address: "gw-us.example.com:4433".into(),
            cert_sha256: "ab".repeat(32),
            http_url: "https://gw-us.example.com".into(),
            ticket: "0102".into(),
        }),
        Message::PlayTicket(PlayTicket {
            protocol_version: PROTOCOL_VERSION,
            api_key: "np_live_x".into(),
            ticket: "0102".into(),
        }),
        Message::InferTicket(InferTicket {
            protocol_version: PROTOCOL_VERSION,
            api_key: "np_live_x".into(),
            ticket: "0304".into(),
            endpoint: crate::openai::Endpoint::Completion,
            request_json: r#"{"model":"m","prompt":"hi"}"#.into(),
        }),
        Message::PeerOpen(PeerOpen {
            protocol_version: PROTOCOL_VERSION,
            node_id: "node-b1".into(),
        }),
        Message::ResumeToken(ResumeToken {
            token: "ab".repeat(32),
        }),
        Message::PlayResume(PlayResume {
            protocol_version: PROTOCOL_VERSION,
            api_key: "np_live_x".into(),
            session_id: u64::MAX,
            token: "cd".repeat(32),
        }),
    ]
}

fn frame(msg: &Message) -> Vec<u8> {
    encode_to_vec(msg)
}

/// Wraps a raw type byte and body in a length prefix.
fn raw_frame(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_varint(&mut out, body.len() as u64 + 1);
    out.push(ty);
    out.extend_from_slice(body);
    out
}

fn decode_all(dec: &mut Decoder) -> Vec<Message> {
    let mut out = Vec::new();
    while let Some(m) = dec.poll().expect("valid stream") {
        out.push(m);
    }
    out
}

fn decode_one(bytes: &[u8]) -> Result<Option<Message>, DecodeError> {
    let mut dec = Decoder::new(MAX_REQUEST_FRAME);
    dec.push(bytes);
    dec.poll()
}

#[test]
fn samples_cover_every_type_byte() {
    let mut seen: Vec<u8> = samples().iter().map(Message::type_byte).collect();
    seen.sort_unstable();
    seen.dedup();
    let known: Vec<u8> = (0..=255u8).filter(|t| type_name(*t).is_some()).collect();
    assert_eq!(seen, known);
    for msg in samples() {
        assert_eq!(type_name(msg.type_byte()), Some(msg.name()));
    }
}

#[test]
fn every_message_round_trips() {
    for msg in samples() {
        let bytes = frame(&msg);
        let mut dec = Decoder::new(MAX_REQUEST_FRAME);
        dec.push(&bytes);
        assert_eq!(dec.poll(), Ok(Some(msg.clone())), "{}", msg.name());
        assert_eq!(dec.poll(), Ok(None));
        assert_eq!(dec.buffered(), 0);
        // The standalone decoder sees the same message in the frame contents.
        let prefix = crate::codec::varint_len((bytes.len() - 1) as u64);
        assert_eq!(decode_message(&bytes[prefix..]), Ok(msg));
    }
}

#[test]
fn split_at_every_byte_boundary_decodes_the_same() {
    let msgs = samples();
    let stream: Vec<u8> = msgs.iter().flat_map(frame).collect();
    for cut in 0..=stream.len() {
        let mut dec = Decoder::new(MAX_REQUEST_FRAME);
        dec.push(&stream[..cut]);
        let mut got = decode_all(&mut dec);
        dec.push(&stream[cut..]);
        got.extend(decode_all(&mut dec));
        assert_eq!(got, msgs, "split at {cut}");
    }
    // And one byte at a time.
    let mut dec = Decoder::new(MAX_REQUEST_FRAME);
    let mut got = Vec::new();
    for b in &stream {
        dec.push(std::slice::from_ref(b));
        got.extend(decode_all(&mut dec));
    }
    assert_eq!(got, msgs);
}

#[test]
fn every_strict_prefix_of_a_body_is_rejected() {
    for msg in samples() {
        let bytes = frame(&msg);
        let prefix = crate::codec::varint_len((bytes.len() - 1) as u64);
        let contents = &bytes[prefix..];
        for cut in 1..contents.len() {
            let result = decode_message(&contents[..cut]);
            assert!(
                matches!(result, Err(DecodeError::Truncated { .. })),
                "{} cut at {cut}: {result:?}",
                msg.name()
            );
        }
    }
}

#[test]
fn huge_length_prefix_is_rejected_before_buffering() {
    let mut bytes = Vec::new();
    put_varint(&mut bytes, 1 << 62);
    let mut dec = Decoder::new(MAX_CONTROL_FRAME);
    dec.push(&bytes);
    let err = dec.poll().unwrap_err();
    assert_eq!(
        err,
        DecodeError::FrameTooLarge {
            len: 1 << 62,
            max: MAX_CONTROL_FRAME
        }
    );
    assert!(err.is_fatal());
    // The decoder stays poisoned: later bytes cannot resynchronise a stream with a bad prefix.
    dec.push(&frame(&Message::Drained));
    assert_eq!(dec.poll(), Err(err));
}

#[test]
fn length_one_past_the_limit_is_rejected_and_the_limit_itself_accepted() {
    let max = 32;
    let body = vec![b'a'; max - 2]; // type byte + 1-byte string length + text = max
    let mut at_limit = Vec::new();
    put_varint(&mut at_limit, body.len() as u64);
    at_limit.extend_from_slice(&body);
    let ok = raw_frame(ty::CLOSE, &at_limit);
    let mut dec = Decoder::new(max);
    dec.push(&ok);
    assert!(matches!(dec.poll(), Ok(Some(Message::Close(_)))));

    let mut over = Vec::new();
    put_varint(&mut over, max as u64 + 1);
    let mut dec = Decoder::new(max);
    dec.push(&over);
    assert_eq!(
        dec.poll(),
        Err(DecodeError::FrameTooLarge {
            len: max as u64 + 1,
            max
        })
    );
}

#[test]
fn malformed_length_prefixes_are_fatal() {
    for prefix in [&[0x80u8, 0x00][..], &[0xff; 10][..]] {
        let mut dec = Decoder::new(MAX_CONTROL_FRAME);
        dec.push(prefix);
        let err = dec.poll().unwrap_err();
        assert!(matches!(err, DecodeError::BadLength { .. }), "{err:?}");
        assert!(err.is_fatal());
    }
}

#[test]
fn list_count_larger_than_the_frame_is_rejected() {
    // GameList announcing 1000 titles in a 3-byte body.
    let mut body = Vec::new();
    put_varint(&mut body, 1000);
    body.push(0);
    assert_eq!(
        decode_one(&raw_frame(ty::GAME_LIST, &body)),
        Err(DecodeError::Truncated {
            field: "GameList.titles"
        })
    );
    // A count near 2^62 neither overflows the size check nor allocates.
    let mut body = Vec::new();
    put_varint(&mut body, (1 << 62) - 1);
    assert!(matches!(
        decode_one(&raw_frame(ty::GAME_LIST, &body)),
        Err(DecodeError::InvalidValue {
            field: "GameList.titles",
            ..
        })
    ));
    // Above the fixed cap even when the frame could hold that many empty strings.
    let mut body = Vec::new();
    put_varint(&mut body, (MAX_NAMES + 1) as u64);
    body.resize(body.len() + MAX_NAMES + 1, 0);
    assert!(matches!(
        decode_one(&raw_frame(ty::GAME_LIST, &body)),
        Err(DecodeError::InvalidValue {
            field: "GameList.titles",
            ..
        })
    ));
}

#[test]
fn string_length_past_the_body_is_truncated_not_allocated() {
    let mut body = Vec::new();
    put_varint(&mut body, 1 << 62);
    body.extend_from_slice(b"abc");
    assert_eq!(
        decode_one(&raw_frame(ty::SHUTDOWN, &body)),
        Err(DecodeError::Truncated {
            field: "Shutdown.reason"
        })
    );
}

#[test]
fn invalid_utf8_names_the_field() {
    let body = [2, 0xc3, 0x28]; // a two-byte sequence with a bad continuation byte
    assert_eq!(
        decode_one(&raw_frame(ty::ENDED, &body)),
        Err(DecodeError::InvalidUtf8 {
            field: "Ended.reason"
        })
    );
}

#[test]
fn unknown_type_is_named_and_skippable() {
    let mut stream = raw_frame(0xee, b"future stuff");
    stream.extend(frame(&Message::Resumed));
    let mut dec = Decoder::new(MAX_CONTROL_FRAME);
    dec.push(&stream);
    let err = dec.poll().unwrap_err();
    assert_eq!(err, DecodeError::UnknownType(0xee));
    assert!(err.to_string().contains("0xee"), "{err}");
    assert!(!err.is_fatal());
    assert_eq!(dec.poll(), Ok(Some(Message::Resumed)));
}

#[test]
fn version_mismatch_is_reported_and_skippable() {
    let mut reg = match &samples()[0] {
        Message::Register(r) => r.clone(),
        _ => unreachable!("samples start with Register"),
    };
    let next = PROTOCOL_VERSION + 1;
    reg.protocol_version = next;
    let mut stream = frame(&Message::Register(reg));
    // A newer body may be laid out differently; the decoder must not look past the version.
    let mut v2_infer = next.to_be_bytes().to_vec();
    v2_infer.extend_from_slice(&[0xff; 5]);
    stream.extend(raw_frame(ty::INFER_REQUEST, &v2_infer));
    stream.extend(frame(&Message::Drained));
    let mut dec = Decoder::new(MAX_CONTROL_FRAME);
    dec.push(&stream);
    assert_eq!(
        dec.poll(),
        Err(DecodeError::UnsupportedVersion {
            message: "Register",
            got: next,
            supported: PROTOCOL_VERSION
        })
    );
    assert_eq!(
        dec.poll(),
        Err(DecodeError::UnsupportedVersion {
            message: "InferRequest",
            got: next,
            supported: PROTOCOL_VERSION
        })
    );
    assert_eq!(dec.poll(), Ok(Some(Message::Drained)));
}

#[test]
fn a_register_declaring_more_capability_masks_than_models_is_rejected() {
    // A hostile node must not be able to attach capabilities to models it does not list.
    let mut reg = match &samples()[0] {
        Message::Register(r) => r.clone(),
        _ => unreachable!("samples start with Register"),
    };
    reg.workloads.model_caps = vec![ModelCaps::TOOLS; reg.workloads.models.len() + 1];
    let bytes = encode_to_vec(&Message::Register(reg));
    let mut dec = Decoder::new(MAX_CONTROL_FRAME);
    dec.push(&bytes);
    assert!(dec.poll().is_err());
}

#[test]
fn out_of_domain_values_are_rejected() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // A boolean must be 0 or 1.
        (raw_frame(ty::ERROR, &[0, 0, 2]), "Error.retryable"),
        // Presence byte must be 0 or 1.
        (
            raw_frame(ty::REGISTERED, &[1, 1, 7]),
            "Registered.node_country",
        ),
        // Unknown reject and refuse codes.
        (raw_frame(ty::REJECTED, &[99, 0]), "Rejected.code"),
        (raw_frame(ty::REFUSED, &[0, 0]), "Refused.code"),
        // Unknown session kind.
        (raw_frame(ty::OPEN, &[1, 9]), "Open.kind"),
        // A u32 field holding 2^32.
        (
            {
                let mut b = Vec::new();
                put_varint(&mut b, 1 << 32);
                raw_frame(ty::SET_BITRATE, &b)
            },
            "SetBitrate.kbps",
        ),
        // A SetVideo size beyond u32.
        (
            {
                let mut b = Vec::new();
                put_varint(&mut b, 1 << 40);
                b.extend_from_slice(&[1, 1]);
                raw_frame(ty::SET_VIDEO, &b)
            },
            "SetVideo.width",
        ),
        // Pad 4 of a four-pad session.
        (raw_frame(ty::RUMBLE, &[4, 0, 1, 0, 1, 10]), "Rumble.pad"),
        // A rumble longer than MAX_RUMBLE_MS.
        (
            {
                let mut b = vec![0, 0xff, 0xff, 0, 0];
                put_varint(&mut b, u64::from(MAX_RUMBLE_MS) + 1);
                raw_frame(ty::RUMBLE, &b)
            },
            "Rumble.duration_ms",
        ),
        // NaN load.
        (
            {
                let mut b = vec![1, 0, 0];
                b.extend_from_slice(&f32::NAN.to_le_bytes());
                b.extend_from_slice(&[0, 0]);
                raw_frame(ty::HEARTBEAT, &b)
            },
            "Heartbeat.load",
        ),
        // Infinite encoder time.
        (
            {
                let mut b = vec![1, 0, 0];
                b.extend_from_slice(&0.5f32.to_le_bytes());
                b.push(0);
                b.push(1);
                b.extend_from_slice(&f32::INFINITY.to_le_bytes());
                raw_frame(ty::HEARTBEAT, &b)
            },
            "Heartbeat.encoder_ms_p50",
        ),
        // Non-canonical varint inside a body.
        (
            raw_frame(ty::HEARTBEAT_ACK, &[0x81, 0x00]),
            "HeartbeatAck.seq",
        ),
    ];
    for (bytes, field) in cases {
        match decode_one(&bytes) {
            Err(DecodeError::InvalidValue { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected InvalidValue, got {other:?}"),
        }
    }
}

#[test]
fn trailing_bytes_and_empty_frames_are_rejected() {
    assert_eq!(
        decode_one(&raw_frame(ty::DRAINED, &[0])),
        Err(DecodeError::TrailingBytes {
            message: "Drained",
            count: 1
        })
    );
    let mut dec = Decoder::new(MAX_CONTROL_FRAME);
    dec.push(&[0]);
    dec.push(&frame(&Message::Resumed));
    assert_eq!(dec.poll(), Err(DecodeError::EmptyFrame));
    assert_eq!(dec.poll(), Ok(Some(Message::Resumed)));
}

#[test]
fn every_type_byte_with_short_bodies_never_panics() {
    for t in 0..=255u8 {
        for body in [&[][..], &[0][..], &[0xff][..], &[1, 0][..], &[0xff; 9][..]] {
            let _ = decode_one(&raw_frame(t, body));
        }
        if type_name(t).is_none() {
            assert_eq!(
                decode_one(&raw_frame(t, &[])),
                Err(DecodeError::UnknownType(t))
            );
        }
    }
}

#[test]
fn send_limit_follows_the_message_kind() {
    let big = "x".repeat(MAX_CONTROL_FRAME);
    let infer = Message::InferRequest(InferRequest {
        protocol_version: PROTOCOL_VERSION,
        api_key: "k".into(),
        endpoint: Default::default(),
        request_json: big.clone(),
    });
    assert!(encode_checked(&infer).is_ok());
    let token = Message::Token(Token {
        index: 0,
        text: big,
        node_elapsed_us: 0,
    });
    match encode_checked(&token) {
        Err(StreamError::TooLarge { what, max, .. }) => {
            assert_eq!((what, max), ("Token", MAX_CONTROL_FRAME));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let huge = Message::InferRequest(InferRequest {
        protocol_version: PROTOCOL_VERSION,
        api_key: "k".into(),
        endpoint: Default::default(),
        request_json: "x".repeat(MAX_REQUEST_FRAME),
    });
    assert!(matches!(
        encode_checked(&huge),
        Err(StreamError::TooLarge { .. })
    ));
}

#[test]
fn encode_appends_after_existing_bytes() {
    let mut buf = BytesMut::from(&b"xyz"[..]);
    let msg = Message::Close(Close {
        reason: "r".repeat(300), // two-byte length prefix
    });
    let frame_len = encode(&msg, &mut buf);
    assert_eq!(&buf[..3], b"xyz");
    assert_eq!(frame_len, 1 + 2 + 300);
    assert_eq!(buf.len(), 3 + 2 + frame_len);
    let mut dec = Decoder::new(MAX_CONTROL_FRAME);
    dec.push(&buf[3..]);
    assert_eq!(dec.poll(), Ok(Some(msg)));
}

proptest! {
    #[test]
    fn prop_message_round_trips_canonically(msg in strategies::message()) {
        let bytes = frame(&msg);
        let mut dec = Decoder::new(MAX_REQUEST_FRAME);
        dec.push(&bytes);
        let decoded = dec.poll().unwrap().unwrap();
        prop_assert_eq!(frame(&decoded), bytes);
        prop_assert_eq!(decoded, msg);
    }

    #[test]
    fn prop_chunked_stream_decodes_the_same(
        msgs in proptest::collection::vec(strategies::message(), 1..8),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let stream: Vec<u8> = msgs.iter().flat_map(frame).collect();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.push(0);
        points.push(stream.len());
        points.sort_unstable();
        let mut dec = Decoder::new(MAX_REQUEST_FRAME);
        let mut got = Vec::new();
        for w in points.windows(2) {
            dec.push(&stream[w[0]..w[1]]);
            got.extend(decode_all(&mut dec));
        }
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn prop_frame_header_round_trips(h in strategies::frame_header()) {
        prop_assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn prop_input_datagram_round_trips(d in strategies::input_datagram()) {
        let bytes = d.encode();
        prop_assert!(bytes.len() < 64);
        prop_assert_eq!(InputDatagram::decode(&bytes), Ok(d));
    }

    #[test]
    fn prop_audio_packet_round_trips(
        session_id in any::<u64>(),
        seq in any::<u32>(),
        capture_ts_us in any::<u64>(),
        samples in prop::sample::select(vec![120u16, 240, 480, 960, 1920, 2880]),
        fec in any::<bool>(),
        opus in proptest::collection::vec(any::<u8>(), 1..=crate::audio::MAX_OPUS_PACKET),
    ) {
        let p = crate::audio::AudioPacket {
            session_id,
            seq,
            capture_ts_us,
            samples,
            flags: u8::from(fec),
            opus: bytes::Bytes::from(opus),
        };
        let encoded = bytes::Bytes::from(p.encode().unwrap());
        prop_assert!(encoded.len() <= crate::audio::AudioPacket::MAX_LEN);
        prop_assert_eq!(crate::audio::AudioPacket::decode(&encoded), Ok(p));
    }

    #[test]
    fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut dec = Decoder::new(MAX_CONTROL_FRAME);
        dec.push(&bytes);
        while let Ok(Some(msg)) = dec.poll() {
            // Whatever decodes must re-encode to a frame that decodes to the same message.
            let again = decode_one(&frame(&msg)).unwrap();
            prop_assert_eq!(again, Some(msg));
        }
        let _ = FrameHeader::decode(&bytes);
        let _ = InputDatagram::decode(&bytes);
        let _ = crate::audio::AudioPacket::decode(&bytes::Bytes::from(bytes.clone()));
    }

    #[test]
    fn prop_mutated_frames_never_panic(
        msg in strategies::message(),
        pos in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = frame(&msg);
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        let _ = decode_one(&bytes);
    }
}

/// A body of an Inventory with one GPU whose strings are given raw.
fn inventory_body(uuid: &[u8], driver: &[u8], encoder: &[u8]) -> Vec<u8> {
    let mut body = vec![1, 0];
    put_varint(&mut body, uuid.len() as u64);
    body.extend_from_slice(uuid);
    put_varint(&mut body, 0x2330_10de);
    put_varint(&mut body, driver.len() as u64);
    body.extend_from_slice(driver);
    body.push(0); // no models
    put_varint(&mut body, encoder.len() as u64);
    body.extend_from_slice(encoder);
    body
}

#[test]
fn inventory_strings_at_their_caps_decode_and_one_byte_more_is_refused() {
    let ok = inventory_body(
        &[b'u'; MAX_GPU_UUID_BYTES],
        &[b'd'; MAX_DRIVER_VERSION_BYTES],
        &[b'e'; MAX_ENCODER_NAME_BYTES],
    );
    assert!(matches!(
        decode_one(&raw_frame(ty::INVENTORY, &ok)),
        Ok(Some(Message::Inventory(_)))
    ));
    for (body, field) in [
        (
            inventory_body(&[b'u'; MAX_GPU_UUID_BYTES + 1], b"", b""),
            "GpuIdentity.uuid",
        ),
        (
            inventory_body(b"", &[b'd'; MAX_DRIVER_VERSION_BYTES + 1], b""),
            "GpuIdentity.driver_version",
        ),
        (
            inventory_body(b"", b"", &[b'e'; MAX_ENCODER_NAME_BYTES + 1]),
            "Inventory.encoder",
        ),
    ] {
        let err = decode_one(&raw_frame(ty::INVENTORY, &body)).unwrap_err();
        assert!(
            matches!(&err, DecodeError::InvalidValue { field: f, .. } if *f == field),
            "{field}: {err:?}"
        );
        // An oversized field is confined to its frame: the stream can go on.
        assert!(!err.is_fatal());
    }
}

#[test]
fn inventory_lists_above_their_caps_are_refused_before_allocation() {
    // More GPUs than MAX_GPUS, even though the body could hold that many minimal entries.
    let mut body = Vec::new();
    put_varint(&mut body, (MAX_GPUS + 1) as u64);
    body.resize(body.len() + 4 * (MAX_GPUS + 1), 0);
    body.extend_from_slice(&[0, 0]);
    assert!(matches!(
        decode_one(&raw_frame(ty::INVENTORY, &body)),
        Err(DecodeError::InvalidValue {
            field: "Inventory.gpus",
            ..
        })
    ));
    let mut body = vec![0];
    put_varint(&mut body, (MAX_NAMES + 1) as u64);
    body.resize(body.len() + 3 * (MAX_NAMES + 1), 0);
    body.push(0);
    assert!(matches!(
        decode_one(&raw_frame(ty::INVENTORY, &body)),
        Err(DecodeError::InvalidValue {
            field: "Inventory.models",
            ..
        })
    ));
    // A count the rest of the body cannot hold is truncated, whatever the cap.
    let mut body = vec![0];
    put_varint(&mut body, 1 << 40);
    assert!(matches!(
        decode_one(&raw_frame(ty::INVENTORY, &body)),
        Err(DecodeError::InvalidValue { .. } | DecodeError::Truncated { .. })
    ));
}

#[test]
fn inventory_weights_source_is_a_closed_set() {
    // No GPUs, one model "m" of 1 byte with source 3, empty encoder.
    let body = [0, 1, 1, b'm', 1, 3, 0];
    assert!(matches!(
        decode_one(&raw_frame(ty::INVENTORY, &body)),
        Err(DecodeError::InvalidValue {
            field: "ModelWeights.source",
            ..
        })
    ));
    for b in 0..=2u8 {
        assert_eq!(
            WeightsSource::from_byte(b).map(WeightsSource::to_byte),
            Some(b)
        );
    }
}

#[test]
fn inventory_duplicate_uuids_and_any_index_decode_the_receiver_judges_them() {
    // The wire carries what the node said; checking indexes against `Register.gpus` and
    // flagging repeated UUIDs is the gateway's job, since only it knows the registration.
    let gpu = |index| GpuIdentity {
        index,
        uuid: "GPU-same".into(),
        pci_device_id: 0,
        driver_version: String::new(),
    };
    let msg = Message::Inventory(Inventory {
        gpus: vec![gpu(0), gpu(u32::MAX)],
        models: vec![],
        encoder: String::new(),
    });
    assert_eq!(decode_one(&frame(&msg)), Ok(Some(msg)));
}

/// The `Register` of `samples()` with raw `encoders` entries (names the types cannot hold),
/// as a frame.
fn register_with_encoders(encoders: Vec<(String, String)>) -> Vec<u8> {
    let reg = match &samples()[0] {
        Message::Register(r) => r.clone(),
        _ => unreachable!("samples start with Register"),
    };
    let mut body = Vec::new();
    Message::Register(Register {
        encoders: Vec::new(),
        ..reg
    })
    .encode_body(&mut body);
    body.pop(); // the empty encoder list's count, the body's last byte
    put_varint(&mut body, encoders.len() as u64);
    for (codec, implementation) in &encoders {
        put_varint(&mut body, codec.len() as u64);
        body.extend_from_slice(codec.as_bytes());
        put_varint(&mut body, implementation.len() as u64);
        body.extend_from_slice(implementation.as_bytes());
    }
    raw_frame(ty::REGISTER, &body)
}

#[test]
fn register_drops_encoders_of_unknown_codecs_and_keeps_the_rest() {
    let frame = register_with_encoders(vec![
        ("vvc".into(), "vvenc".into()),
        ("h264".into(), "x264".into()),
        ("H264".into(), "shouting".into()),
    ]);
    match decode_one(&frame).unwrap() {
        Some(Message::Register(r)) => assert_eq!(
            r.encoders,
            vec![NodeEncoder {
                codec: VideoCodec::H264,
                implementation: "x264".into()
            }]
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn register_with_too_many_encoders_or_long_names_is_refused() {
    // 10,000 encoders: refused at the count, before anything is allocated for them.
    let many = vec![("h264".to_string(), "x".to_string()); 10_000];
    assert!(matches!(
        decode_one(&register_with_encoders(many)),
        Err(DecodeError::InvalidValue {
            field: "Register.encoders",
            ..
        })
    ));
    let at_cap = vec![("h264".to_string(), "x".to_string()); MAX_ENCODERS];
    assert!(decode_one(&register_with_encoders(at_cap))
        .unwrap()
        .is_some());
    let long = vec![("h264".to_string(), "x".repeat(MAX_ENCODER_NAME_BYTES + 1))];
    assert!(matches!(
        decode_one(&register_with_encoders(long)),
        Err(DecodeError::InvalidValue {
            field: "NodeEncoder.implementation",
            ..
        })
    ));
    let long = vec![("h".repeat(MAX_CODEC_NAME_BYTES + 1), "x".into())];
    assert!(matches!(
        decode_one(&register_with_encoders(long)),
        Err(DecodeError::InvalidValue {
            field: "NodeEncoder.codec",
            ..
        })
    ));
}

#[test]
fn a_session_codec_must_be_known_and_a_client_list_is_filtered() {
    // PlayStarted: session 1, 64x48, 30 fps, 100 kbit/s, codec "vp9".
    let mut body = vec![1, 64, 48, 30, 100, 3];
    body.extend_from_slice(b"vp9");
    assert!(matches!(
        decode_one(&raw_frame(ty::PLAY_STARTED, &body)),
        Err(DecodeError::InvalidValue {
            field: "PlayStarted.codec",
            ..
        })
    ));
    // A PlayRequest's list drops names it does not know, keeps the order of the rest, and
    // refuses more than MAX_CODECS entries.
    let request = |codecs: &[&str]| {
        let mut body = PROTOCOL_VERSION.to_be_bytes().to_vec();
        body.extend_from_slice(&[1, b'k', 1, b'g', 64, 48, 30, 100]);
        put_varint(&mut body, codecs.len() as u64);
        for c in codecs {
            body.push(c.len() as u8);
            body.extend_from_slice(c.as_bytes());
        }
        // No traceparent (protocol version 4).
        body.push(0);
        decode_one(&raw_frame(ty::PLAY_REQUEST, &body))
    };
    match request(&["vp9", "av1", "h264"]).unwrap() {
        Some(Message::PlayRequest(r)) => {
            assert_eq!(r.codecs, vec![VideoCodec::Av1, VideoCodec::H264])
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        request(&["h264"; MAX_CODECS + 1]),
        Err(DecodeError::InvalidValue {
            field: "PlayRequest.codecs",
            ..
        })
    ));
    for c in VideoCodec::ALL {
        assert_eq!(VideoCodec::from_name(c.as_str()), Some(c));
    }
    assert_eq!(VideoCodec::from_name("HEVC"), None);
}

/// A `PlayRequest` body with `traceparent` written raw: presence byte 1, then `raw` as a
/// string (protocol version 4).
fn play_request_with_raw_traceparent(raw: &[u8]) -> Vec<u8> {
    let mut body = frame(&Message::PlayRequest(PlayRequest {
        protocol_version: PROTOCOL_VERSION,
        api_key: "sk".into(),
        game: "doom".into(),
        width: 0,
        height: 0,
        fps: 0,
        bitrate_kbps: 0,
        codecs: vec![],
        traceparent: None,
    }));
    let prefix = crate::codec::varint_len((body.len() - 1) as u64);
    let mut contents = body.split_off(prefix);
    // Replace the trailing "absent" byte by a present, raw value.
    assert_eq!(contents.pop(), Some(0));
    contents.push(1);
    put_varint(&mut contents, raw.len() as u64);
    contents.extend_from_slice(raw);
    contents
}

#[test]
fn an_invalid_traceparent_in_a_play_request_or_open_is_ignored_not_an_error() {
    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let decoded = |raw: &[u8]| match decode_message(&play_request_with_raw_traceparent(raw)) {
        Ok(Message::PlayRequest(p)) => p.traceparent,
        other => panic!("{raw:?}: {other:?}"),
    };
    assert_eq!(decoded(VALID.as_bytes()), Some(VALID.to_string()));
    let long = "0".repeat(60_000);
    let hostile: &[&[u8]] = &[
        b"",
        b"00",
        // Version ff is invalid by the recommendation; other versions are not interpreted.
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        b"00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\xff",
        b"\xff\xfe\xfd",
        long.as_bytes(),
    ];
    for raw in hostile {
        assert_eq!(decoded(raw), None, "{:?}", String::from_utf8_lossy(raw));
    }
    // The same for the gateway's `Open` to the node.
    let open = |traceparent: Option<String>| {
        Message::Open(Open {
            session_id: 9,
            kind: SessionKind::Game(GameParams {
                title: "doom".into(),
                width: 64,
                height: 64,
                fps: 30,
                bitrate_kbps: 500,
                codec: VideoCodec::H264,
                traceparent,
            }),
        })
    };
    for raw in hostile {
        let sent = open(Some(String::from_utf8_lossy(raw).into_owned()));
        let bytes = frame(&sent);
        let prefix = crate::codec::varint_len((bytes.len() - 1) as u64);
        assert_eq!(decode_message(&bytes[prefix..]), Ok(open(None)));
    }
    // The framing around it stays strict: a presence byte other than 0 or 1, a length past the
    // end, or bytes after the field are errors, as for any field.
    let mut bad_presence = play_request_with_raw_traceparent(VALID.as_bytes());
    let at = bad_presence.len() - VALID.len() - 2;
    bad_presence[at] = 2;
    assert!(matches!(
        decode_message(&bad_presence),
        Err(DecodeError::InvalidValue { .. })
    ));
    let mut huge = play_request_with_raw_traceparent(b"");
    huge.pop();
    put_varint(&mut huge, 1 << 61);
    assert!(matches!(
        decode_message(&huge),
        Err(DecodeError::Truncated { .. })
    ));
    let mut trailing = play_request_with_raw_traceparent(VALID.as_bytes());
    trailing.push(0);
    assert!(matches!(
        decode_message(&trailing),
        Err(DecodeError::TrailingBytes { .. })
    ));
}

#[test]
fn a_version_3_play_request_is_refused_with_the_version() {
    let mut body = play_request_with_raw_traceparent(b"");
    body[1..3].copy_from_slice(&3u16.to_be_bytes());
    assert!(matches!(
        decode_message(&body),
        Err(DecodeError::UnsupportedVersion {
            got: 3,
            supported: 4,
            ..
        })
    ));
}
