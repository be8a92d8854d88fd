//! The Nearpath gateway's command line and demo assembly, kept out of the gateway library so that
//! the library does not depend on the edge node (OpenH264, NVML): `cli` is the `gateway` command
//! line, `demo` runs a gateway with one in-process edge node.

pub mod cli;
pub mod demo;
pub mod pick;
