//! The impaired suite: sessions on paths that lose, delay, reorder and black out packets (issue
//! 10, "Degrade, don't collapse"), through the seeded UDP relay in `nearpath_tests::impair`. Each
//! test is named after the behaviour it guards and failed before the change it names.

#[path = "common/mod.rs"]
mod common;

#[path = "impaired/player.rs"]
mod player;
