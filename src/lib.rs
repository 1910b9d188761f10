//! connector-authz: an Envoy external authorization (ext_authz v3) sidecar that lets a
//! backend accept only requests carrying a valid GitLab Cloud Connector service token
//! with the unit primitives the requested path needs.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod decide;
pub mod decision;
pub mod dev;
pub mod devmode;
pub mod explain;
pub mod grpc;
pub mod keys;
pub mod metrics;
pub mod proto;
pub mod registry;
pub mod route;
pub mod serve;
pub mod token;
pub mod token_cache;
pub mod transport;
pub mod verify;
