//! What a native client can send the gateway: the first frame of a request stream is read with
//! the request frame limit (`gateway/src/client.rs`), since `InferRequest` carries up to 1 MiB of
//! JSON. Seeds are `InferRequest`, `PlayRequest`, `ListGames`, `ForceKeyframe`, `SetBitrate`,
//! `Close` frames. See `common::check_stream` for the properties asserted.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use nearpath_protocol::MAX_REQUEST_FRAME;

#[global_allocator]
static ALLOC: common::alloc::Counting = common::alloc::Counting;

fuzz_target!(|data: &[u8]| {
    common::check_stream(data, MAX_REQUEST_FRAME);
});
