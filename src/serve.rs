//! Running the sidecar: bind the gRPC and admin listeners, start the key manager,
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

use crate::config::Config;
use crate::decide::Snapshot;
use crate::grpc::AuthzService;
use crate::keys::{KeyManager, KeyRefresher};
use crate::transport::CoalescingIncoming;

/// The gRPC service name that health checks ask about, besides the server as a whole ("").
const AUTHZ_SERVICE_NAME: &str = "envoy.service.auth.v3.Authorization";

/// A running sidecar: its bound addresses and the handle to stop it.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Keeps the issuers' keys fresh; its fetch counters and readiness.
    pub keys: Arc<KeyManager>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops the listeners and the key refresh, and waits for them to finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        self.keys.shutdown().await;
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

    // Keys start empty: the key manager fills them in (files and cache at once, the
    // network in the background) and keeps them fresh until shutdown.
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::new(
        Arc::new(config),
        Arc::default(),
    )));
    let keys = KeyManager::start_http(snapshot.clone())?;
    keys.initial_load().await;
    let (stop, stopped) = watch::channel(false);

    let (health, health_service) = tonic_health::server::health_reporter();
    // The reporter starts out SERVING; say the truth before anyone can ask.
    let mut ready = keys.ready();
    report_health(&health, *ready.borrow_and_update()).await;
    let health_task = tokio::spawn(follow_readiness(ready, health, stopped.clone()));

    let refresher: Arc<dyn KeyRefresher> = keys.clone();
    let authz = AuthzService::new(snapshot.clone(), Some(refresher)).into_server();
    let grpc_task = {
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(authz)
                .serve_with_incoming_shutdown(
                    CoalescingIncoming::new(
                        TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                    ),
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
        let app = admin_router(keys.clone());
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
        keys,
        stop,
        tasks: vec![grpc_task, admin_task, health_task],
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

/// Keeps `grpc.health.v1.Health` at `SERVING` exactly while every issuer has keys.
async fn follow_readiness(
    mut ready: watch::Receiver<bool>,
    health: tonic_health::server::HealthReporter,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            changed = ready.changed() => if changed.is_err() { return },
            _ = stopped.wait_for(|s| *s) => return,
        }
        let now_ready = *ready.borrow_and_update();
        report_health(&health, now_ready).await;
    }
}

async fn report_health(health: &tonic_health::server::HealthReporter, ready: bool) {
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    health.set_service_status(AUTHZ_SERVICE_NAME, status).await;
}

fn admin_router(keys: Arc<KeyManager>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route("/readyz", get(readyz))
        .with_state(keys)
}

async fn readyz(State(keys): State<Arc<KeyManager>>) -> impl IntoResponse {
    let missing = keys.missing_issuers();
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
