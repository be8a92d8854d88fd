//! Hostile tests: location (see hostile.rs).

#[allow(unused_imports)]
use crate::common::*;
