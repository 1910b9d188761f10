//! The decision core of connector-authz: everything that turns a configuration file and a
//! request into an allow or a deny, with no async runtime and no network. The sidecar crate
//! (gRPC, admin, key fetching and refresh, reload, metrics, CLI) sits on top of it, and the
//! core builds for `wasm32-wasip1` with the `rust-crypto` feature.
//!
//! Layers, lowest first; a module imports only modules above it in this list:
//! - [`error`] (the file:line configuration error), [`algorithm`] (which JWS algorithms a
//!   token or key may use), [`fetch_url`] (which URLs keys may come from), [`decision`]
//!   (requests, decisions, deny reasons);
//! - [`token`] (JWT parsing and claims), [`keys`] (the key snapshot and JWKS parsing),
//!   [`verify`] (signature and claim checks), [`route`] (paths and route tables),
//!   [`registry`] (unit primitives and backends from GitLab's files);
//! - [`config`] (YAML → validated configuration), [`token_cache`] (verified tokens);
//! - [`decide`] (one request against one snapshot).
#![forbid(unsafe_code)]

#[cfg(all(feature = "aws-lc", feature = "rust-crypto"))]
compile_error!(
    "connector-authz-core: enable exactly one of the features `aws-lc` and `rust-crypto` \
     (for rust-crypto, turn the default features off)"
);
#[cfg(not(any(feature = "aws-lc", feature = "rust-crypto")))]
compile_error!(
    "connector-authz-core: enable one of the features `aws-lc` (default) and `rust-crypto`"
);

pub mod algorithm;
pub mod config;
pub mod decide;
pub mod decision;
#[cfg(any(test, feature = "dev-key"))]
pub mod dev;
pub mod error;
pub mod fetch_url;
pub mod keys;
pub mod registry;
pub mod route;
pub mod token;
pub mod token_cache;
pub mod verify;
