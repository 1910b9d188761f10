//! Running the sidecar: bind the gRPC and admin listeners, load the issuers' keys,
//! serve `envoy.service.auth.v3.Authorization` and `grpc.health.v1.Health` on the gRPC
//! port and `/healthz` + `/readyz` on the admin port, until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::config::{Config, KeysFrom};
use crate::decide::Snapshot;
use crate::grpc::AuthzService;
use crate::keys::KeySnapshot;
use crate::keys::fetch::{FetchError, HttpFetcher, IssuerSource, fetch_key_set, load_key_file};
use crate::keys::jwks::{KeyLimits, ParsedKeySet};

/// The gRPC service name that health checks ask about, besides the server as a whole ("").
const AUTHZ_SERVICE_NAME: &str = "envoy.service.auth.v3.Authorization";

/// A running sidecar: its bound addresses and the handle to stop it.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops the listeners and waits for the servers to finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Binds both listeners, loads keys, and starts serving in background tasks.
/// Binding errors (a port in use) surface here, before anything is served.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let grpc_listener = TcpListener::bind(config.listen.grpc)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for gRPC on {}: {e}", config.listen.grpc))?;
    let admin_listener = TcpListener::bind(config.listen.admin)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for admin on {}: {e}", config.listen.admin))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let keys = load_keys_once(&config).await;
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::new(
        Arc::new(config),
        Arc::new(keys),
    )));
    let (stop, stopped) = watch::channel(false);

    let (health, health_service) = tonic_health::server::health_reporter();
    let status = if missing_issuers(&snapshot.load()).is_empty() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    health.set_service_status(AUTHZ_SERVICE_NAME, status).await;

    let authz = AuthzService::new(snapshot.clone(), None).into_server();
    let grpc_task = {
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(authz)
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                    async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    },
                )
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "the gRPC server stopped with an error");
            }
        })
    };
    let admin_task = {
        let mut stopped = stopped.clone();
        let app = admin_router(snapshot.clone());
        tokio::spawn(async move {
            let result = axum::serve(admin_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "the admin server stopped with an error");
            }
        })
    };
    tracing::info!(%grpc_addr, %admin_addr, "connector-authz is serving");
    Ok(Running {
        grpc_addr,
        admin_addr,
        snapshot,
        stop,
        tasks: vec![grpc_task, admin_task],
    })
}

/// Serves until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let running = start(config).await?;
    shutdown.await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

/// Loads every issuer's keys once, all issuers at the same time, so one slow issuer
/// costs at most `fetch_timeout` at start, not that times the number of issuers.
/// An issuer that fails is logged and left without keys: its tokens get
/// `keys_unavailable` and the sidecar is not ready.
async fn load_keys_once(config: &Config) -> KeySnapshot {
    let limits = KeyLimits::default();
    let fetcher = match HttpFetcher::new(config.keys.fetch_timeout, limits.max_document_bytes) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the HTTP client for key fetching");
            None
        }
    };
    let loads = config.issuers.iter().map(|issuer| {
        let fetcher = fetcher.as_ref();
        let limits = &limits;
        async move {
            let result: Result<ParsedKeySet, FetchError> = match &issuer.keys_from {
                KeysFrom::JwksFile(path) => load_key_file(path, limits),
                KeysFrom::Discovery | KeysFrom::JwksUri(_) => {
                    let source = match &issuer.keys_from {
                        KeysFrom::JwksUri(uri) => IssuerSource::JwksUri { issuer_url: issuer.url.clone(), jwks_uri: uri.clone() },
                        _ => IssuerSource::Discovery { issuer_url: issuer.url.clone() },
                    };
                    match fetcher {
                        Some(f) => fetch_key_set(f, &source, limits).await,
                        None => return (issuer.name.clone(), None),
                    }
                }
            };
            match result {
                Ok(parsed) => {
                    for warning in &parsed.warnings {
                        tracing::warn!(issuer = %issuer.name, "{warning}");
                    }
                    tracing::info!(issuer = %issuer.name, keys = parsed.key_set.keys.len(), source = ?parsed.key_set.source, "loaded keys");
                    (issuer.name.clone(), Some(parsed.key_set))
                }
                Err(e) => {
                    tracing::warn!(issuer = %issuer.name, error = %e, "cannot load keys; this issuer's tokens get keys_unavailable");
                    (issuer.name.clone(), None)
                }
            }
        }
    });
    let mut snapshot = KeySnapshot::default();
    for (name, keys) in futures_util::future::join_all(loads).await {
        if let Some(keys) = keys {
            snapshot = snapshot.with_issuer(name, Arc::new(keys));
        }
    }
    snapshot
}

/// Configured issuers that have no keys in the snapshot.
pub fn missing_issuers(snapshot: &Snapshot) -> Vec<Arc<str>> {
    snapshot
        .config
        .issuers
        .iter()
        .filter(|i| snapshot.keys.get(&i.name).is_none())
        .map(|i| i.name.clone())
        .collect()
}

fn admin_router(snapshot: Arc<ArcSwap<Snapshot>>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route("/readyz", get(readyz))
        .with_state(snapshot)
}

async fn readyz(State(snapshot): State<Arc<ArcSwap<Snapshot>>>) -> impl IntoResponse {
    let missing = missing_issuers(&snapshot.load());
    let status = if missing.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let missing: Vec<&str> = missing.iter().map(|m| &**m).collect();
    (
        status,
        Json(serde_json::json!({ "ready": missing.is_empty(), "issuers_without_keys": missing })),
    )
}
