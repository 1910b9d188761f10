//! An in-process OIDC issuer on 127.0.0.1 for integration tests: a discovery document
//! and a JWKS endpoint whose keys and behaviour the test controls.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use connector_authz::dev::DevKey;
use serde_json::{Value, json};

/// How both endpoints answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Normal answers.
    Up,
    /// This HTTP status with a short body.
    Down(u16),
    /// Accept the request and never answer.
    Hang,
    /// 200 with a body that is not JSON.
    Garbage,
    /// 302 to this location.
    Redirect(&'static str),
    /// 200 with an endless chunked body (no Content-Length), so only a cap enforced
    /// while streaming stops the client.
    Oversized,
}

pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
pub const JWKS_PATH: &str = "/oauth/discovery/keys";

struct Shared {
    base_url: String,
    jwks: Mutex<Value>,
    mode: Mutex<Mode>,
    /// `None`: the discovery document names this server as issuer.
    discovery_issuer: Mutex<Option<String>>,
    /// `None`: the discovery document points at this server's JWKS.
    jwks_uri: Mutex<Option<String>>,
    discovery_fetches: AtomicUsize,
    jwks_fetches: AtomicUsize,
}

/// A running fake issuer; stops when dropped.
pub struct FakeIssuer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl FakeIssuer {
    /// Serves a JWKS of `keys` on a fresh loopback port.
    pub async fn start(keys: &[&DevKey]) -> Self {
        Self::start_with_jwks(DevKey::key_set_json(keys)).await
    }

    /// Serves this JWKS document as is (for malformed or mixed key sets).
    pub async fn start_with_jwks(jwks: Value) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            base_url: format!("http://{addr}"),
            jwks: Mutex::new(jwks),
            mode: Mutex::new(Mode::Up),
            discovery_issuer: Mutex::new(None),
            jwks_uri: Mutex::new(None),
            discovery_fetches: AtomicUsize::new(0),
            jwks_fetches: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route(DISCOVERY_PATH, get(discovery))
            .route(JWKS_PATH, get(jwks_handler))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            // Ends only when the task is aborted on drop.
            axum::serve(listener, app).await.ok();
        });
        Self {
            shared,
            addr,
            server,
        }
    }

    /// The issuer URL, `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        self.shared.base_url.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn jwks_url(&self) -> String {
        format!("{}{JWKS_PATH}", self.shared.base_url)
    }

    /// Publishes these keys from now on (key rotation).
    pub fn set_keys(&self, keys: &[&DevKey]) {
        self.set_jwks(DevKey::key_set_json(keys));
    }

    pub fn set_jwks(&self, jwks: Value) {
        *lock(&self.shared.jwks) = jwks;
    }

    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.shared.mode) = mode;
    }

    /// The `issuer` the discovery document claims; `None` restores this server's URL.
    pub fn set_discovery_issuer(&self, issuer: Option<String>) {
        *lock(&self.shared.discovery_issuer) = issuer;
    }

    /// The `jwks_uri` the discovery document names; `None` restores this server's.
    pub fn set_jwks_uri(&self, jwks_uri: Option<String>) {
        *lock(&self.shared.jwks_uri) = jwks_uri;
    }

    pub fn discovery_fetch_count(&self) -> usize {
        self.shared.discovery_fetches.load(Ordering::SeqCst)
    }

    pub fn jwks_fetch_count(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }
}

impl Drop for FakeIssuer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A test that panicked while holding the lock has failed already; keep serving.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn discovery(State(shared): State<Arc<Shared>>) -> Response {
    shared.discovery_fetches.fetch_add(1, Ordering::SeqCst);
    let issuer = lock(&shared.discovery_issuer)
        .clone()
        .unwrap_or_else(|| shared.base_url.clone());
    let jwks_uri = lock(&shared.jwks_uri)
        .clone()
        .unwrap_or_else(|| format!("{}{JWKS_PATH}", shared.base_url));
    let document = json!({
        "issuer": issuer,
        "jwks_uri": jwks_uri,
        "id_token_signing_alg_values_supported": ["RS256"],
    });
    answer(&shared, document).await
}

async fn jwks_handler(State(shared): State<Arc<Shared>>) -> Response {
    shared.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let jwks = lock(&shared.jwks).clone();
    answer(&shared, jwks).await
}

async fn answer(shared: &Shared, document: Value) -> Response {
    let mode = *lock(&shared.mode);
    match mode {
        Mode::Up => (
            [(header::CONTENT_TYPE, "application/json")],
            document.to_string(),
        )
            .into_response(),
        Mode::Down(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            (status, "unavailable").into_response()
        }
        Mode::Hang => std::future::pending().await,
        Mode::Redirect(location) => {
            (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
        }
        Mode::Garbage => "<html><body>502 Bad Gateway</body></html>".into_response(),
        Mode::Oversized => {
            static CHUNK: [u8; 8192] = [b' '; 8192];
            let endless = futures_util::stream::repeat_with(|| {
                Ok::<_, Infallible>(Bytes::from_static(&CHUNK))
            });
            (
                [(header::CONTENT_TYPE, "application/json")],
                Body::from_stream(endless),
            )
                .into_response()
        }
    }
}
