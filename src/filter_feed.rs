//! The feed of the proxy-wasm filter, on the admin listener (see README, "In-proxy filter"):
//! `GET /v1/snapshot`, what the filter decides with (configuration text, registry facts,
//! key fingerprints; with an `ETag`), and `POST /v1/verify`, the signature stage for one
//! token, with the unknown-kid refresh and bounded wait that a Check has. The wire format
//! is `connector_authz_core::feed`; this module only serves it.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use aws_lc_rs::digest;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::decide::{Snapshot, verify_token};
use crate::decision::Denied;
use crate::feed::{FeedSnapshot, VerifyAnswer};
use crate::keys::KeyRefresher;

/// What the feed's handlers read.
#[derive(Clone)]
pub struct Feed {
    snapshot: Arc<ArcSwap<Snapshot>>,
    refresher: Option<Arc<dyn KeyRefresher>>,
}

impl Feed {
    /// `refresher`: `None` turns the unknown-kid refresh off.
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>, refresher: Option<Arc<dyn KeyRefresher>>) -> Self {
        Self {
            snapshot,
            refresher,
        }
    }

    /// The routes to mount on the admin listener.
    pub fn routes(self) -> Router {
        Router::new()
            .route("/v1/snapshot", get(snapshot))
            .route("/v1/verify", post(verify))
            .with_state(self)
    }

    /// The signature stage for `raw`, once more after a refresh of its issuer if its `kid`
    /// was unknown (waiting at most `keys.unknown_kid_wait`, as a Check does).
    pub async fn verify(
        &self,
        raw: &str,
    ) -> Result<Arc<crate::token_cache::VerifiedToken>, Denied> {
        let first = verify_token(&self.snapshot.load(), raw, SystemTime::now());
        let (issuer, refresher) = match (&first, &self.refresher) {
            (
                Err(Denied {
                    refresh_issuer: Some(issuer),
                    ..
                }),
                Some(refresher),
            ) => (Arc::clone(issuer), refresher),
            _ => return first,
        };
        let wait = self.snapshot.load().config.keys.unknown_kid_wait;
        if tokio::time::timeout(wait, refresher.refresh_unknown_kid(&issuer))
            .await
            .is_err()
        {
            tracing::debug!(%issuer, ?wait, "verify: unknown kid, refresh still running; answering with the keys at hand");
        }
        verify_token(&self.snapshot.load(), raw, SystemTime::now())
    }
}

async fn snapshot(State(feed): State<Feed>, headers: HeaderMap) -> Response {
    let body = match serde_json::to_vec(&FeedSnapshot::of(&feed.snapshot.load())) {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize the filter snapshot");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let etag = etag_of(&body);
    let unchanged = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == etag || tag.trim() == "*");
    let etag = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\""));
    if unchanged {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    (
        [
            (header::ETAG, etag),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
        ],
        body,
    )
        .into_response()
}

/// A strong ETag: the first 128 bits of the body's SHA-256, so that two sidecars with the
/// same configuration and keys give the same tag.
fn etag_of(body: &[u8]) -> String {
    let hash = digest::digest(&digest::SHA256, body);
    let hex: String = hash.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("\"{hex}\"")
}

/// The body is the token itself (no `Bearer`). The answer is 200 with a [`VerifyAnswer`]
/// whether the token verified or not; 400 only when the body is not text.
async fn verify(State(feed): State<Feed>, body: Bytes) -> Response {
    let Ok(raw) = std::str::from_utf8(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            "the body must be the token, as text\n",
        )
            .into_response();
    };
    let answer = VerifyAnswer::of(&feed.verify(raw).await);
    axum::Json(answer).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_etag_is_quoted_hex_and_follows_the_body() {
        let a = etag_of(b"{}");
        assert_eq!(a.len(), 34);
        assert!(a.starts_with('"') && a.ends_with('"'));
        assert_ne!(a, etag_of(b"{ }"));
        assert_eq!(a, etag_of(b"{}"));
    }
}
