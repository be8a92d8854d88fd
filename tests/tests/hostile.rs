//! The hostile suite: what a stranger's node, a lying client or a careless proxy tried against
//! the gateway, each test named after the hole it guards (issue 9). Every test here failed on the
//! gateway before the fix it names.

mod common;

#[path = "hostile/ledger.rs"]
mod ledger;
#[path = "hostile/location.rs"]
mod location;
#[path = "hostile/nodes.rs"]
mod nodes;
#[path = "hostile/relay.rs"]
mod relay;
#[path = "hostile/resources.rs"]
mod resources;
#[path = "hostile/revocation.rs"]
mod revocation;
