//! connector-authz: an Envoy external authorization (ext_authz v3) sidecar that lets a
//! backend accept only requests carrying a valid GitLab Cloud Connector service token
//! with the unit primitives the requested path needs.
#![forbid(unsafe_code)]

pub mod config;
pub mod decide;
pub mod decision;
pub mod grpc;
pub mod keys;
pub mod proto;
