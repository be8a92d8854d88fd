//! Hostile tests: revocation (see hostile.rs).

#[allow(unused_imports)]
use crate::common::*;
