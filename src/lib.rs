//! connector-authz: an Envoy external authorization (ext_authz v3) sidecar that lets a
//! backend accept only requests carrying a valid GitLab Cloud Connector service token
//! with the unit primitives the requested path needs.
//!
//! The decision itself (config, registry, routes, tokens, keys, `decide`) is the
//! `connector_authz_core` crate (crates/connector-authz-core); this crate re-exports its
//! modules under their old names and adds what needs a runtime or the network: gRPC,
//! admin endpoints, key fetching and refresh, reload, metrics and the CLI.
#![forbid(unsafe_code)]

pub use connector_authz_core::{
    algorithm, config, decide, decision, dev, error, feed, fetch_url, registry, respond, route,
    token, token_cache, verify,
};

/// Issuers' public keys: the snapshot and JWKS parsing come from the core; fetching, the
/// on-disk key cache and the refresh tasks live here.
pub mod keys {
    pub use connector_authz_core::keys::*;

    pub(crate) mod cache;
    pub mod fetch;
    pub(crate) mod refresh;

    pub use refresh::{FetchStats, KeyManager};
}

pub(crate) mod admin;
pub mod cli;
pub(crate) mod deprecation;
pub(crate) mod dev_server;
pub(crate) mod explain;
/// The proxy-wasm filter's feed (`/v1/snapshot`, `/v1/verify`) on the admin listener.
pub mod filter_feed;
pub mod grpc;
pub mod metrics;
pub mod proto;
pub(crate) mod reload;
pub mod serve;
pub mod tls;
pub mod traces;
pub mod transport;
