//! The Nearpath edge node: dials out to its gateway over QUIC, proves it belongs to a
//! KYC-approved operator, registers its GPUs and workloads, and serves the sessions the gateway
//! opens (inference now; game streaming in `game`).

pub mod backoff;
pub mod bootstrap;
pub mod clidoc;
pub mod game;
pub mod gateways;
pub mod gpu;
pub mod inference;
pub mod inventory;
pub mod node;
pub mod preflight;
pub mod sessions;

pub use node::{EdgeNode, NodeError, NodeOptions, NodeStatus};
pub use preflight::preflight;
