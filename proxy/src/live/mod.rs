//! The live policy.

pub mod files;
