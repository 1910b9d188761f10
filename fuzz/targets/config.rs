//! Target `config`: bytes → `Config::from_yaml`. Oracles: no panic, no stall (libFuzzer's
//! `-timeout`), an error names the file, and a loaded configuration keeps the promises the
//! request path relies on (routes in normal form, at most `MAX_ROUTES`, no symmetric or
//! `none` algorithm, `max_bytes` in range).
//!
//! Inputs that could name `unit_primitives` are skipped: that key makes the loader read a
//! directory tree from disk, and a fuzzer must not walk the machine's file system (the
//! registry's own parser is bounded by its budget and tested in `src/registry`).

use std::path::Path;

use connector_authz::config::{Config, MAX_ROUTES};
use connector_authz::route::normalize_path;
use jsonwebtoken::Algorithm;

pub const CONFIG_PATH: &str = "/nonexistent/connector-authz-fuzz/config.yaml";

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // YAML escapes (`\x75`, `\u0075`, a `\` line continuation) could spell the key.
    if text.contains("unit_primitives") || text.contains("\\") {
        return;
    }
    let path = Path::new(CONFIG_PATH);
    match Config::from_yaml(text, path) {
        Err(e) => {
            assert_eq!(e.file, path);
            assert!(!e.message.is_empty());
        }
        Ok(config) => {
            assert!(!config.issuers.is_empty() && !config.backends.is_empty());
            assert!(config.routes.routes().len() <= MAX_ROUTES);
            for route in config.routes.routes() {
                let pattern = route.pattern.as_str();
                assert_eq!(normalize_path(pattern).as_deref(), Ok(pattern));
                assert!(route.backend < config.backends.len());
            }
            assert!((512..=65536).contains(&config.tokens.max_bytes));
            assert!(!config.tokens.algorithms.is_empty());
            for alg in &config.tokens.algorithms {
                assert!(
                    !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512),
                    "a symmetric algorithm was accepted"
                );
            }
        }
    }
}
