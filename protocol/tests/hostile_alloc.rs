//! Hostile inputs must not make the decoder allocate more than its frame limit.
//!
//! A counting global allocator records the largest single allocation made while decoding. Only
//! the measuring thread is tracked (the test harness allocates on its own threads meanwhile), and
//! this is its own test binary so that no other test's allocations interfere.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use nearpath_protocol::codec::put_varint;
use nearpath_protocol::{ty, Decoder, FrameHeader, InputDatagram, MAX_CONTROL_FRAME};

struct Counting;

thread_local! {
    // Const-initialised and without a destructor, so reading it never allocates.
    static TRACKING: Cell<bool> = const { Cell::new(false) };
}
static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// Serialises the tests in this binary, since the counters are global.
static LOCK: Mutex<()> = Mutex::new(());

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if TRACKING.with(Cell::get) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if TRACKING.with(Cell::get) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns the largest single allocation it made.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.store(0, Ordering::SeqCst);
    TRACKING.with(|t| t.set(true));
    f();
    TRACKING.with(|t| t.set(false));
    LARGEST.load(Ordering::SeqCst)
}

fn raw_frame(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_varint(&mut out, body.len() as u64 + 1);
    out.push(ty);
    out.extend_from_slice(body);
    out
}

fn hostile_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let mut cases = Vec::new();
    let mut huge_len = Vec::new();
    put_varint(&mut huge_len, 1 << 62);
    cases.push(("2^62 frame length", huge_len));
    let mut just_over = Vec::new();
    put_varint(&mut just_over, MAX_CONTROL_FRAME as u64 + 1);
    cases.push(("frame one byte over the limit", just_over));
    let mut count = Vec::new();
    put_varint(&mut count, (1 << 62) - 1);
    cases.push(("2^62 list count", raw_frame(ty::GAME_LIST, &count)));
    let mut gpus = vec![0, 1];
    gpus.extend_from_slice(&[0, 0, 0]); // node_id, token, version: empty
    put_varint(&mut gpus, 1 << 40);
    cases.push(("2^40 GPUs", raw_frame(ty::REGISTER, &gpus)));
    let mut string = Vec::new();
    put_varint(&mut string, 1 << 62);
    cases.push(("2^62 string length", raw_frame(ty::CLOSE, &string)));
    cases
}

#[test]
fn hostile_lengths_and_counts_allocate_almost_nothing() {
    let _serial = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for (name, bytes) in hostile_inputs() {
        let mut dec = Decoder::new(MAX_CONTROL_FRAME);
        let largest = largest_allocation(|| {
            dec.push(&bytes);
            assert!(dec.poll().is_err(), "{name} was accepted");
        });
        // The input itself is tiny; the only allocations are the buffered bytes and the error.
        assert!(largest < 1024, "{name}: largest allocation {largest} bytes");
    }
}

#[test]
fn a_frame_announced_at_the_limit_reserves_at_most_the_limit() {
    let _serial = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut prefix = Vec::new();
    put_varint(&mut prefix, MAX_CONTROL_FRAME as u64);
    let mut dec = Decoder::new(MAX_CONTROL_FRAME);
    let largest = largest_allocation(|| {
        dec.push(&prefix);
        assert_eq!(dec.poll(), Ok(None));
    });
    assert!(
        largest <= MAX_CONTROL_FRAME + 16,
        "reserved {largest} bytes"
    );
}

#[test]
fn fixed_layout_decoders_do_not_allocate() {
    let _serial = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let junk = vec![0xffu8; 4096];
    let largest = largest_allocation(|| {
        for len in 0..64 {
            let _ = FrameHeader::decode(&junk[..len]);
            let _ = InputDatagram::decode(&junk[..len]);
        }
    });
    assert_eq!(largest, 0);
}
