//! The bodies of the fuzz targets, shared by the `cargo fuzz` crate (`fuzz/fuzz_targets/`)
//! and the stable test that replays the committed seeds (`tests/fuzz_seeds.rs`), which
//! include this directory with `#[path]`. Each target panics when an oracle fails.
#![allow(dead_code)]

pub mod config;
pub mod decide;
pub mod env;
pub mod input;
pub mod path;
pub mod token;

/// The targets, by the name of their fuzz binary and seed directory.
pub const TARGETS: [&str; 4] = ["decide", "token", "config", "path"];
