//! What an edge node (run by a stranger) can send the gateway: the control stream and session
//! streams, both read with the control frame limit (`gateway/src/control.rs`, `infer.rs`,
//! `game.rs`). Seeds are `Register`, `Heartbeat`, `Accepted`, `Token`, `Done`, `Error`,
//! `Ended`, `Drained` frames. See `common::check_stream` for the properties asserted.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use nearpath_protocol::MAX_CONTROL_FRAME;

#[global_allocator]
static ALLOC: common::alloc::Counting = common::alloc::Counting;

fuzz_target!(|data: &[u8]| {
    common::check_stream(data, MAX_CONTROL_FRAME);
});
