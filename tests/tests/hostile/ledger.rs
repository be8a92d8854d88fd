//! Hostile tests: ledger (see hostile.rs).

#[allow(unused_imports)]
use crate::common::*;
