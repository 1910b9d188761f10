//! The issuer of `benches/soak.sh`: OIDC discovery and a JWKS on 127.0.0.1, whose keys the
//! soak rotates and takes down on purpose through a control API. Not a test fixture: a
//! long-running process for a load script.
//!
//!   cargo run --release --example soak_issuer -- PORT
//!
//! - `GET /.well-known/openid-configuration`, `GET /jwks`: the issuer (`http://127.0.0.1:PORT`).
//!   The JWKS holds the signing key of the current generation and of the one before, as an
//!   issuer that rotates publishes the next key next to the current one.
//! - `POST /control/rotate`: the next generation signs (a new `kid`, `soak-N`); the key two
//!   generations back leaves the JWKS. The sidecar meets the new `kid` on the first token
//!   signed with it, before its scheduled refresh: the unknown-`kid` path.
//! - `POST /control/outage/SECONDS`: discovery and the JWKS answer 503 for that long.
//! - `GET /control/token/KIND`: a token of the current generation, valid for an hour. KIND is
//!   `valid` (grants `complete_code`), `no_scope` (grants only `duo_chat`) or `forged` (the
//!   current `kid`, signed with another key).
//!
//! The keys are the three fixed RSA test keys of `tests/fixtures/keys`, reused in turn under
//! a new `kid` per generation.

#[path = "../benches/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use connector_authz::dev::DevKey;
use serde_json::json;

const PEMS: [&str; 3] = [
    include_str!("../tests/fixtures/keys/test-rsa-2048-1.pem"),
    include_str!("../tests/fixtures/keys/test-rsa-2048-2.pem"),
    include_str!("../tests/fixtures/keys/test-rsa-2048-3.pem"),
];

struct Issuer {
    url: String,
    generation: usize,
    down_until: Option<Instant>,
    jti: u64,
}

impl Issuer {
    fn key(generation: usize) -> DevKey {
        DevKey::from_pkcs8_pem(PEMS[generation % PEMS.len()], format!("soak-{generation}"))
            .expect("fixture key")
    }

    fn published(&self) -> Vec<DevKey> {
        let mut keys = vec![Self::key(self.generation)];
        if self.generation > 0 {
            keys.push(Self::key(self.generation - 1));
        }
        keys
    }

    fn down(&self) -> bool {
        self.down_until.is_some_and(|until| Instant::now() < until)
    }
}

type Shared = Arc<Mutex<Issuer>>;

fn lock(issuer: &Shared) -> std::sync::MutexGuard<'_, Issuer> {
    issuer.lock().unwrap_or_else(|p| p.into_inner())
}

async fn discovery(State(issuer): State<Shared>) -> Response {
    let issuer = lock(&issuer);
    if issuer.down() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    Json(json!({"issuer": issuer.url, "jwks_uri": format!("{}/jwks", issuer.url)})).into_response()
}

async fn jwks(State(issuer): State<Shared>) -> Response {
    let issuer = lock(&issuer);
    if issuer.down() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let keys = issuer.published();
    Json(DevKey::key_set_json(&keys.iter().collect::<Vec<_>>())).into_response()
}

async fn rotate(State(issuer): State<Shared>) -> String {
    let mut issuer = lock(&issuer);
    issuer.generation += 1;
    format!("soak-{}\n", issuer.generation)
}

async fn outage(State(issuer): State<Shared>, Path(seconds): Path<u64>) -> String {
    lock(&issuer).down_until = Some(Instant::now() + Duration::from_secs(seconds));
    format!("down for {seconds}s\n")
}

async fn token(State(issuer): State<Shared>, Path(kind): Path<String>) -> Response {
    let mut issuer = lock(&issuer);
    issuer.jti += 1;
    let jti = format!("soak-{}-{}", issuer.generation, issuer.jti);
    let (scopes, signer): (&[&str], DevKey) = match kind.as_str() {
        "valid" => (&["complete_code"], Issuer::key(issuer.generation)),
        "no_scope" => (&["duo_chat"], Issuer::key(issuer.generation)),
        "forged" => (
            &["complete_code"],
            // Another fixture key under the current kid: the signature does not verify.
            DevKey::from_pkcs8_pem(
                PEMS[(issuer.generation + 1) % PEMS.len()],
                format!("soak-{}", issuer.generation),
            )
            .expect("fixture key"),
        ),
        other => {
            return (
                StatusCode::NOT_FOUND,
                format!("no token kind {other:?}: valid, no_scope or forged\n"),
            )
                .into_response();
        }
    };
    let mut claims = common::claims(&jti, scopes, 3600);
    claims["iss"] = json!(issuer.url);
    signer.sign(&claims).into_response()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let port: u16 = match std::env::args().nth(1).map(|p| p.parse()) {
        Some(Ok(port)) => port,
        _ => anyhow::bail!("usage: soak_issuer PORT"),
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let issuer = Arc::new(Mutex::new(Issuer {
        url: format!("http://{addr}"),
        generation: 0,
        down_until: None,
        jti: 0,
    }));
    let app = Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/jwks", get(jwks))
        .route("/control/rotate", post(rotate))
        .route("/control/outage/{seconds}", post(outage))
        .route("/control/token/{kind}", get(token))
        .with_state(issuer);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("http://{addr}");
    axum::serve(listener, app).await?;
    Ok(())
}
