//! The impaired suite (issue 10, "Degrade, don't collapse"): nodes and clients behind the seeded
//! UDP impairment relay (`nearpath_tests::impair`), one test per measured failure, each named
//! after what it guards.

#[path = "common/mod.rs"]
mod common;

#[path = "impaired/infer.rs"]
mod infer;
#[path = "impaired/media.rs"]
mod media;
#[path = "impaired/player.rs"]
mod player;
#[path = "impaired/session.rs"]
mod session;
