//! Hostile tests: resources (see hostile.rs).

#[allow(unused_imports)]
use crate::common::*;
