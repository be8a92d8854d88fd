//! Hostile tests: relay (see hostile.rs).

#[allow(unused_imports)]
use crate::common::*;
