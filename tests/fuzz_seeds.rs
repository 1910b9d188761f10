//! Replays every committed fuzz seed (`fuzz/seeds/<target>/*`) through the same target
//! bodies `cargo fuzz` runs (`fuzz/targets/`), so the oracles run on every machine, also
//! one with only stable Rust. A `decide` seed that says `# want: <reason>` must get it.

#[path = "../fuzz/targets/mod.rs"]
mod targets;

use std::path::{Path, PathBuf};

use targets::env::Env;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = root().join("fuzz/seeds").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("readable seed directory").path())
        .collect();
    files.sort();
    let seeds: Vec<_> = files
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).expect("readable seed");
            (path, bytes)
        })
        .collect();
    assert!(!seeds.is_empty(), "{} has no seeds", dir.display());
    seeds
}

#[test]
fn decide_seeds_hold_the_oracles_and_their_expected_decisions() {
    let env = Env::new(root());
    let mut with_expectation = 0;
    for (path, data) in seeds("decide") {
        let got = targets::decide::run(&env, &data);
        if let Some(want) = targets::input::DecideInput::parse(&data).want {
            assert_eq!(got, want, "{}", path.display());
            with_expectation += 1;
        }
    }
    assert!(with_expectation > 0);
}

#[test]
fn token_seeds_hold_the_oracles() {
    for (_, data) in seeds("token") {
        targets::token::run(&data);
    }
}

#[test]
fn config_seeds_hold_the_oracles() {
    for (_, data) in seeds("config") {
        targets::config::run(&data);
    }
}

#[test]
fn path_seeds_hold_the_oracles() {
    for (_, data) in seeds("path") {
        targets::path::run(&data);
    }
}

#[test]
fn every_target_has_a_seed_directory() {
    for target in targets::TARGETS {
        assert!(root().join("fuzz/seeds").join(target).is_dir(), "{target}");
    }
}
