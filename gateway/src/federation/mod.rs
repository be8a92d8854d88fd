//! The federation of regional gateways sharing one store (issue 13).
//!
//! - `directory`: this gateway's entry in the gateway directory (join, lease renewal, leave),
//!   the publication of its live nodes to the node directory, and [`directory::FleetView`],
//!   the cached picture of the other gateways and their nodes that routing and the APIs read.

pub mod directory;
