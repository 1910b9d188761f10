//! The ext_authz v3 `Authorization` service, one stage per file: `extract` turns a
//! `CheckRequest` into a [`decision::Request`](crate::decision::Request), `decide` (the
//! core) decides, `respond` turns the [`Decision`](crate::decision::Decision) into a
//! `CheckResponse`, and `service` is the tonic glue around them (the one snapshot load
//! per decision, the unknown-kid refresh, metrics and the log line).
//!
//! This module makes no decisions of its own: what is allowed is `decide`'s business.

mod extract;
mod respond;
mod service;
#[cfg(test)]
mod test_support;

pub use extract::{CheckInput, http_check_request, to_request};
pub use respond::{
    DRY_RUN_HEADER, ISSUER_HEADER, SCOPES_HEADER, SUBJECT_HEADER, UNIT_PRIMITIVE_HEADER,
    to_response,
};
pub use service::{AuthzService, Decided};
