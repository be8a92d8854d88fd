//! The impaired suite: game and inference sessions behind a seeded UDP impairment relay
//! (`nearpath_tests::impair`), a test per row of issue 10's measurements. Every test here
//! failed on the gateway before the fix it names.

mod common;

#[path = "impaired/session.rs"]
mod session;
