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
//!
//! # The model
//!
//! A [`decide::Snapshot`] is everything a decision reads: the validated [`config::Config`]
//! (issuers, backends and their routes, token settings, the unit primitive registry) and
//! the [`keys::KeySnapshot`] (each issuer's public keys). Both are immutable; a reload or a
//! key refresh builds a new snapshot and swaps it in whole, and a caller loads one per
//! request.
//!
//! [`decide::decide`] is a pure function of a snapshot, a [`decision::Request`] (method,
//! path, headers) and the time: no I/O, no locks, no runtime. It runs the stages in the
//! order of the decision table, and the first that fails decides:
//!
//! 1. **route** ([`route`]): normalize the path and find the route; a public route allows;
//! 2. **token** ([`token`]): the bearer token, its header and claims, not yet trusted;
//! 3. **signature** ([`verify`]): the algorithm is accepted, the issuer configured, its
//!    keys loaded, the key named by `kid` verifies (a [`token_cache::TokenCache`] may
//!    skip this step for a token it verified before, with `decide_cached`);
//! 4. **claims** ([`verify`]): time window, audience, the instance headers;
//! 5. **require**: the unit primitives the route requires are among the token's scopes,
//!    and the GitLab version is recent enough for them ([`registry`]).
//!
//! The result is a [`decision::Decision`]: `Allow` (with the token's identity) or `Deny`
//! with one [`decision::DenyReason`], the word used in the response, the log and the
//! metrics. The sidecar turns it into an Envoy `CheckResponse`.
//!
//! ```
//! use std::path::Path;
//! use std::sync::Arc;
//! use std::time::{Duration, UNIX_EPOCH};
//!
//! use connector_authz_core::config::Config;
//! use connector_authz_core::decide::{Snapshot, decide};
//! use connector_authz_core::decision::{DenyReason, Request};
//! use connector_authz_core::dev::DevKey;
//! use connector_authz_core::keys::jwks::{KeyLimits, parse_key_set};
//! use connector_authz_core::keys::{KeySnapshot, KeySource};
//! use serde_json::json;
//!
//! // The configuration: one trusted issuer, and a backend whose code completion
//! // route needs the unit primitive `complete_code`.
//! let config = Config::from_yaml(
//!     "
//! issuers:
//!   - url: https://customers.gitlab.com
//! backends:
//!   - name: ai_gateway
//!     audience: gitlab-ai-gateway
//!     routes:
//!       - prefix: /ai/v2/code/
//!         require: [complete_code]
//! ",
//!     Path::new("connector-authz.yaml"),
//! )?;
//!
//! // The issuer's keys, as its JWKS publishes them (the sidecar fetches it).
//! let issuer_key = DevKey::generate("key-1")?;
//! let jwks = DevKey::key_set_json(&[&issuer_key]).to_string();
//! let key_set = parse_key_set(jwks.as_bytes(), KeySource::Network, UNIX_EPOCH, &KeyLimits::default())?;
//! let keys = KeySnapshot::default()
//!     .with_issuer("https://customers.gitlab.com".into(), Arc::new(key_set.key_set));
//! let snapshot = Snapshot::new(Arc::new(config), Arc::new(keys));
//!
//! // A token that the issuer signed for a self-managed instance.
//! let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
//! let token = |scopes: &[&str]| {
//!     issuer_key.sign(&json!({
//!         "iss": "https://customers.gitlab.com", "aud": "gitlab-ai-gateway",
//!         "sub": "instance-1", "gitlab_instance_id": "instance-1",
//!         "gitlab_realm": "self-managed", "scopes": scopes,
//!         "iat": 1_800_000_000 - 60, "exp": 1_800_000_000 + 3_600,
//!     }))
//! };
//! let headers_with = |token: String| {
//!     vec![
//!         ("authorization".to_string(), format!("Bearer {token}")),
//!         ("x-gitlab-realm".to_string(), "self-managed".to_string()),
//!         ("x-gitlab-instance-id".to_string(), "instance-1".to_string()),
//!         ("x-gitlab-authentication-type".to_string(), "oidc".to_string()),
//!     ]
//! };
//!
//! let granted = headers_with(token(&["complete_code"]));
//! let request = Request { method: "POST", path: "/ai/v2/code/completions", headers: &granted };
//! assert!(decide(&snapshot, &request, now).is_allow());
//!
//! // The same instance without the unit primitive: denied, with the reason.
//! let not_granted = headers_with(token(&["duo_chat"]));
//! let request = Request { headers: &not_granted, ..request };
//! assert_eq!(decide(&snapshot, &request, now).reason(), Some(DenyReason::InsufficientScope));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
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
pub mod feed;
pub mod fetch_url;
pub mod keys;
pub mod registry;
pub mod respond;
pub mod route;
pub mod token;
pub mod token_cache;
pub mod verify;
