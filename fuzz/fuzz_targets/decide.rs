#![no_main]

#[path = "../targets/mod.rs"]
mod targets;

use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use targets::env::Env;

static ENV: LazyLock<Env> =
    LazyLock::new(|| Env::new(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))));

fuzz_target!(|data: &[u8]| {
    targets::decide::run(&ENV, data);
});
