//! Running the sidecar: bind the gRPC and admin listeners, start the key manager,
//! serve `envoy.service.auth.v3.Authorization` and `grpc.health.v1.Health` on the gRPC
//! port and `/healthz`, `/readyz` and `/metrics` on the admin port, reload the
//! configuration when asked, and drain on the way out.
//!
//! Shutting down ([`Running::shutdown_within`]) goes in this order: readiness turns to
//! 503 and gRPC health to `NOT_SERVING` ([`Running::stop_being_ready`], which the command
//! line calls first and then keeps answering Checks for `serve --shutdown-delay`, so that
//! load balancers and proxies stop sending before the listener goes away); the gRPC
//! listener stops accepting and every
//! Check in flight finishes (within the drain time, after which the rest are dropped);
//! then the admin listener closes and the key refresh stops. Keys are stopped last so
//! that a Check waiting for an unknown-kid refresh still gets its answer.

use std::hash::{Hash as _, Hasher as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::config::{Config, ConfigError, Listen};
use crate::decide::Snapshot;
use crate::grpc::AuthzService;
use crate::keys::{KeyManager, KeyRefresher};
use crate::metrics::{Format, Metrics};
use crate::transport::CoalescingIncoming;

/// The gRPC service name that health checks ask about, besides the server as a whole ("").
const AUTHZ_SERVICE_NAME: &str = "envoy.service.auth.v3.Authorization";

/// How long the sidecar keeps answering Checks after SIGTERM with readiness already off,
/// before it drains: long enough for Kubernetes to take the pod out of its endpoints and
/// for the proxies that call it to notice.
pub const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);

/// How long Checks in flight may take to finish once shutdown starts.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the configuration file is looked at for changes.
pub const CONFIG_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// A running sidecar: its bound addresses and the handle to reload and stop it.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Keeps the issuers' keys fresh; its fetch counters and readiness.
    pub keys: Arc<KeyManager>,
    pub metrics: Arc<Metrics>,
    reloader: Arc<Reloader>,
    health: tonic_health::server::HealthReporter,
    /// `true` once shutdown began: readiness answers 503 from then on.
    draining: watch::Sender<bool>,
    stop_grpc: watch::Sender<bool>,
    /// Stops the admin listener and the configuration watcher.
    stop_rest: watch::Sender<bool>,
    grpc_task: JoinHandle<()>,
    /// Follows readiness into gRPC health until draining starts; `None` once it ended.
    health_task: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Loads the configuration file again and, if it is valid, swaps it in whole (see
    /// [`KeyManager::reconfigure`]). An invalid file is logged with its file and line,
    /// counted, and returned; the configuration in use stays.
    pub async fn reload(&self) -> Result<(), ConfigError> {
        self.reloader.reload().await
    }

    /// Changes every reloaded configuration before it is checked and swapped in, as the
    /// first one was changed before [`start`] (command-line overrides of `listen`). Set it
    /// before [`Running::watch_config`]; a second call is ignored.
    pub fn adjust_reloads(&mut self, adjust: impl Fn(&mut Config) + Send + Sync + 'static) {
        let _ = self.reloader.adjust.set(Box::new(adjust));
    }

    /// Reloads whenever the configuration file's contents change, looking every `every`.
    /// Reading the contents (rather than a modification time) also sees a Kubernetes
    /// ConfigMap update, which swaps a symlink under the file's path.
    pub fn watch_config(&mut self, every: Duration) {
        let reloader = Arc::clone(&self.reloader);
        let mut stopped = self.stop_rest.subscribe();
        reloader.remember(file_fingerprint(&reloader.path));
        self.tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => return,
                    _ = ticks.tick() => {}
                }
                let path = reloader.path.clone();
                let now = tokio::task::spawn_blocking(move || file_fingerprint(&path))
                    .await
                    .ok()
                    .flatten();
                // A file that is briefly missing (mid-swap) is not a change.
                if now.is_some() && now != reloader.seen() {
                    tracing::info!(path = %reloader.path.display(), "the configuration file changed; reloading");
                    let _ = reloader.reload().await;
                }
            }
        }));
    }

    /// [`Running::shutdown_within`] the [`DEFAULT_DRAIN_TIMEOUT`].
    pub async fn shutdown(self) {
        self.shutdown_within(DEFAULT_DRAIN_TIMEOUT).await;
    }

    /// Turns readiness off for good (`/readyz` 503 with `"draining": true`, gRPC health
    /// `NOT_SERVING`) while every listener keeps serving: Checks are still answered, on
    /// open connections and new ones. The first step of shutting down; calling it again
    /// does nothing.
    pub async fn stop_being_ready(&mut self) {
        self.draining.send_replace(true);
        // The health task stops following readiness when draining starts; then we have
        // the last word.
        if let Some(task) = self.health_task.take() {
            let _ = task.await;
            report_health(&self.health, false).await;
        }
    }

    /// Drains and stops: see the module docs for the order. Checks still running after
    /// `drain` are dropped (their callers see the connection close).
    pub async fn shutdown_within(mut self, drain: Duration) {
        self.stop_being_ready().await;
        let _ = self.stop_grpc.send(true);
        if tokio::time::timeout(drain, &mut self.grpc_task)
            .await
            .is_err()
        {
            tracing::warn!(
                drain = %humantime::format_duration(drain),
                "Checks still running after the drain time; closing their connections"
            );
            self.grpc_task.abort();
        }
        let _ = self.stop_rest.send(true);
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
    let listen = config.listen;
    let config_path = config.source.clone();

    // Keys start empty: the key manager fills them in (files and cache at once, the
    // network in the background) and keeps them fresh until shutdown.
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::new(
        Arc::new(config),
        Arc::default(),
    )));
    let keys = KeyManager::start_http(snapshot.clone())?;
    keys.initial_load().await;
    let metrics = Arc::new(Metrics::with_keys(snapshot.clone(), keys.clone()));
    metrics.registry_loaded(snapshot.load().config.registry.as_deref());
    let (stop_grpc, grpc_stopped) = watch::channel(false);
    let (stop_rest, rest_stopped) = watch::channel(false);
    let (draining, draining_rx) = watch::channel(false);

    let (health, health_service) = tonic_health::server::health_reporter();
    // The reporter starts out SERVING; say the truth before anyone can ask.
    let mut ready = keys.ready();
    report_health(&health, *ready.borrow_and_update()).await;
    let health_task = tokio::spawn(follow_readiness(ready, health.clone(), draining_rx.clone()));

    let refresher: Arc<dyn KeyRefresher> = keys.clone();
    let authz = AuthzService::new(snapshot.clone(), Some(refresher))
        .with_metrics(metrics.clone())
        .into_server();
    let grpc_task = {
        let mut stopped = grpc_stopped;
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
        let mut stopped = rest_stopped;
        let app = admin_router(AdminState {
            keys: keys.clone(),
            metrics: metrics.clone(),
            draining: draining_rx,
        })
        .merge(crate::filter_feed::Feed::new(snapshot.clone(), Some(keys.clone())).routes());
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
    let reloader = Arc::new(Reloader {
        path: config_path,
        listen,
        keys: keys.clone(),
        metrics: metrics.clone(),
        one_at_a_time: tokio::sync::Mutex::new(()),
        adjust: std::sync::OnceLock::new(),
        seen: std::sync::Mutex::new(None),
    });
    Ok(Running {
        grpc_addr,
        admin_addr,
        snapshot,
        keys,
        metrics,
        reloader,
        health,
        draining,
        stop_grpc,
        stop_rest,
        grpc_task,
        health_task: Some(health_task),
        tasks: vec![admin_task],
    })
}

/// A change made to every reloaded configuration (see [`Running::adjust_reloads`]).
type AdjustConfig = Box<dyn Fn(&mut Config) + Send + Sync>;

/// Reloads the configuration file on request (SIGHUP, a change of the file).
struct Reloader {
    path: PathBuf,
    /// The listen addresses at start; a reload cannot move them.
    listen: Listen,
    keys: Arc<KeyManager>,
    metrics: Arc<Metrics>,
    one_at_a_time: tokio::sync::Mutex<()>,
    adjust: std::sync::OnceLock<AdjustConfig>,
    /// The fingerprint of the file contents last loaded (or rejected).
    seen: std::sync::Mutex<Option<u64>>,
}

impl Reloader {
    async fn reload(&self) -> Result<(), ConfigError> {
        let _one_at_a_time = self.one_at_a_time.lock().await;
        let path = self.path.clone();
        // The fingerprint first: should the file change while it is loaded, the next
        // look sees a difference and loads it again.
        let (fingerprint, loaded) =
            tokio::task::spawn_blocking(move || (file_fingerprint(&path), Config::load(&path)))
                .await
                .map_err(|e| {
                    ConfigError::new(&self.path, 0, format!("reload did not finish: {e}"))
                })?;
        self.remember(fingerprint);
        let mut config = match loaded {
            Ok(config) => config,
            Err(error) => {
                self.metrics.config_reloaded(false);
                tracing::error!(%error, "configuration reload rejected; still serving the previous configuration");
                return Err(error);
            }
        };
        if let Some(adjust) = self.adjust.get() {
            adjust(&mut config);
        }
        if config.listen != self.listen {
            tracing::warn!(
                grpc = %config.listen.grpc,
                admin = %config.listen.admin,
                "listen addresses cannot change on reload; restart connector-authz to move them (still listening on the old ones)"
            );
        }
        let (issuers, routes) = (config.issuers.len(), config.routes.routes().len());
        self.metrics.registry_loaded(config.registry.as_deref());
        self.keys.reconfigure(Arc::new(config)).await;
        self.metrics.config_reloaded(true);
        tracing::info!(issuers, routes, path = %self.path.display(), "configuration reloaded");
        Ok(())
    }

    fn seen(&self) -> Option<u64> {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, fingerprint: Option<u64>) {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = fingerprint;
    }
}

/// A hash of the file's contents (following symlinks); `None` when it cannot be read.
fn file_fingerprint(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    Some(hasher.finish())
}

/// Keeps `grpc.health.v1.Health` at `SERVING` exactly while every issuer has keys, until
/// draining starts (then shutdown reports `NOT_SERVING` itself).
async fn follow_readiness(
    mut ready: watch::Receiver<bool>,
    health: tonic_health::server::HealthReporter,
    mut draining: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            changed = ready.changed() => if changed.is_err() { return },
            _ = draining.wait_for(|d| *d) => return,
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

#[derive(Clone)]
struct AdminState {
    keys: Arc<KeyManager>,
    metrics: Arc<Metrics>,
    draining: watch::Receiver<bool>,
}

fn admin_router(state: AdminState) -> Router {
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
