//! Hostile tests: nodes (see hostile.rs).

#[allow(unused_imports)]
use crate::common::*;
