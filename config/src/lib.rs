//! Nearpath configuration. See the crate README section in ARCHITECTURE.md.
pub mod geo;
pub use geo::*;
