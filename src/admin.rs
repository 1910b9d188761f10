//! The admin endpoints on the admin port: `/healthz` (the process answers), `/readyz`
//! (every issuer has keys and shutdown has not begun; the JSON body names the issuers
//! without keys) and `/metrics` (Prometheus text or OpenMetrics, by `Accept`). It only
//! reads: binding the listener and draining are `crate::serve`'s.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use tokio::sync::watch;

use crate::keys::KeyManager;
use crate::metrics::{Format, Metrics};

/// What the admin endpoints read.
#[derive(Clone)]
pub(crate) struct AdminState {
    pub(crate) keys: Arc<KeyManager>,
    pub(crate) metrics: Arc<Metrics>,
    /// `true` once shutdown began: readiness answers 503 from then on.
    pub(crate) draining: watch::Receiver<bool>,
}

/// `/healthz`, `/readyz` and `/metrics`.
pub(crate) fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let draining = *state.draining.borrow();
    let missing = state.keys.missing_issuers();
    let ready = missing.is_empty() && !draining;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let missing: Vec<&str> = missing.iter().map(|m| &**m).collect();
    let mut body = serde_json::json!({ "ready": ready, "issuers_without_keys": missing });
    if draining {
        body["draining"] = serde_json::Value::Bool(true);
    }
    (status, Json(body))
}

async fn metrics(State(state): State<AdminState>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok());
    let format = Format::from_accept(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        state.metrics.encode(format),
    )
}
