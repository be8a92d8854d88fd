//! Codec costs on the gateway's hot paths: relaying tokens, reading frame headers and input
//! datagrams, and decoding a request-sized frame.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nearpath_protocol::{
    encode, Decoder, FrameHeader, InferRequest, InputDatagram, InputEvent, Message, Token,
    MAX_REQUEST_FRAME, PROTOCOL_VERSION,
};

fn token() -> Message {
    Message::Token(Token {
        index: 1234,
        text: " hello".into(),
        node_elapsed_us: 48_213,
    })
}

fn bench(c: &mut Criterion) {
    let msg = token();
    c.bench_function("token_encode", |b| {
        let mut buf = BytesMut::with_capacity(64);
        b.iter(|| {
            buf.clear();
            encode(black_box(&msg), &mut buf)
        })
    });

    let mut frame = BytesMut::new();
    encode(&msg, &mut frame);
    c.bench_function("token_decode", |b| {
        let mut dec = Decoder::new(MAX_REQUEST_FRAME);
        b.iter(|| {
            dec.push(black_box(&frame));
            dec.poll()
        })
    });

    let header = FrameHeader {
        session_id: 77,
        seq: 1_000,
        capture_ts_us: 1_700_000_000_000_000,
        encode_us: 5_000,
        keyframe: false,
        input_seq: 99,
        width: 1280,
        height: 720,
        payload_len: 20_000,
    }
    .encode();
    c.bench_function("frame_header_decode", |b| {
        b.iter(|| FrameHeader::decode(black_box(&header)))
    });

    let datagram = InputDatagram {
        session_id: 77,
        seq: 5,
        sent_ts_us: 1_700_000_000_000_000,
        event: InputEvent::MouseMove { dx: 3, dy: -2 },
    }
    .encode();
    c.bench_function("input_datagram_decode", |b| {
        b.iter(|| InputDatagram::decode(black_box(&datagram)))
    });

    let big = Message::InferRequest(InferRequest {
        protocol_version: PROTOCOL_VERSION,
        api_key: "sk-0123456789".into(),
        endpoint: Default::default(),
        request_json: "x".repeat(1024 * 1024),
    });
    let mut big_frame = BytesMut::new();
    encode(&big, &mut big_frame);
    let mut group = c.benchmark_group("infer_request_1mib");
    group.throughput(Throughput::Bytes(big_frame.len() as u64));
    group.bench_function("decode_in_64k_chunks", |b| {
        b.iter(|| {
            let mut dec = Decoder::new(MAX_REQUEST_FRAME);
            let mut got = None;
            for chunk in big_frame.chunks(64 * 1024) {
                dec.push(chunk);
                if let Ok(Some(m)) = dec.poll() {
                    got = Some(m);
                }
            }
            got
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
