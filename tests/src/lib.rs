//! End-to-end tests live in tests/tests/; this library holds what they share with the
//! benchmark harness.

pub mod fake_node;
pub mod game_impaired;
pub mod impair;
pub mod pg;
pub mod wt_client;
