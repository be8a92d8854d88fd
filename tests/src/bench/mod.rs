//! The benchmark harness behind the `bench` binary. See DESIGN.md section 8: every benchmark
//! runs the path through the gateway and the same path without it in one run, and reports the
//! ratio and the added time.

pub mod audio;
pub mod checker;
pub mod child;
pub mod client;
pub mod encoders;
pub mod federation;
pub mod fleet;
pub mod gamehop;
pub mod impaired;
pub mod latency;
pub mod limits;
pub mod os;
pub mod queue;
pub mod quicmem;
pub mod real;
pub mod register;
pub mod relay;
pub mod rps;
pub mod serve;
pub mod sse;
pub mod stats;
pub mod streams;
pub mod system;
pub mod trunk;
