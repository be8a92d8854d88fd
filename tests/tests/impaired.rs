//! The impaired suite: game and inference sessions over a node path with loss, jitter,
//! reordering, rate limits and blackouts (issue 10), through the seeded UDP relay in
//! `nearpath_tests::impair`. Each test is named after the measured row it guards.

#[path = "common/mod.rs"]
mod common;

#[path = "impaired/media.rs"]
mod media;
