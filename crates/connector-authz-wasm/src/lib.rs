//! connector-authz as a proxy-wasm HTTP filter: the same decision core as the ext_authz
//! sidecar, run inside Envoy, with the same statuses, bodies, headers and reasons.
//!
//! The filter does not verify signatures (RSA in wasm costs milliseconds a token): on a
//! token it has not seen, it pauses the request and asks the sidecar (`POST /v1/verify`
//! on its admin listener), keeps the answer per VM until the token expires, and decides
//! with `connector_authz_core::decide::decide_verified`. Routes, backends, registry facts
//! and key fingerprints come from the sidecar's `GET /v1/snapshot`, polled.
//!
//! - [`plugin_config`]: the plugin configuration;
//! - [`token_cache`]: the verified tokens of this VM;
//! - [`pipeline`]: one request, decided, as a [`pipeline::Step`] (pure, tested natively);
//! - `filter` (wasm only): the proxy-wasm contexts that carry the steps out.
#![forbid(unsafe_code)]

pub mod pipeline;
pub mod plugin_config;
pub mod token_cache;

#[cfg(target_family = "wasm")]
mod filter;

#[cfg(test)]
mod tests;
