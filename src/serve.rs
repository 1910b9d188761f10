//! Running the sidecar: bind the gRPC and admin listeners, start the key manager,
//! serve `envoy.service.auth.v3.Authorization` and `grpc.health.v1.Health` on the gRPC
//! port and the admin endpoints ([`crate::admin`]) on the admin port, reload the
//! configuration when asked ([`crate::reload`]), and drain on the way out.
//!
//! With `listen.tls` (`listen.admin_tls`) a listener serves TLS ([`crate::tls`]): its
//! certificate files are read again on a reload and when they change
//! ([`Running::watch_tls`]). Without it, it is plain TCP as it always was.
//!
//! Shutting down ([`Running::shutdown_within`]) goes in this order: readiness turns to
//! 503 and gRPC health to `NOT_SERVING` ([`Running::stop_being_ready`], which the command
//! line calls first and then keeps answering Checks for `serve --shutdown-delay`, so that
//! load balancers and proxies stop sending before the listener goes away); the gRPC
//! listener stops accepting and every
//! Check in flight finishes (within the drain time, after which the rest are dropped);
//! then the admin listener closes and the key refresh stops. Keys are stopped last so
//! that a Check waiting for an unknown-kid refresh still gets its answer. Spans still
//! queued for export ([`crate::traces`]) are flushed at the very end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::admin::AdminState;
use crate::config::{Config, ConfigError};
use crate::decide::Snapshot;
use crate::grpc::AuthzService;
use crate::keys::{KeyManager, KeyRefresher};
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::tls::{Listener, ServerTls, TlsIncoming};
use crate::traces::{CheckTracer, TraceExport};
use crate::transport::CoalescingIncoming;

/// The gRPC service name that health checks ask about, besides the server as a whole ("").
const AUTHZ_SERVICE_NAME: &str = "envoy.service.auth.v3.Authorization";

/// How long Checks in flight may take to finish once shutdown starts.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the configuration file is looked at for changes.
pub(crate) const CONFIG_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// A running sidecar: its bound addresses and the handle to reload and stop it.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Keeps the issuers' keys fresh; its fetch counters and readiness.
    pub keys: Arc<KeyManager>,
    pub metrics: Arc<Metrics>,
    reloader: Arc<Reloader>,
    /// The listeners that serve TLS: their certificate files are watched.
    tls: Vec<Arc<ServerTls>>,
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
    traces: Option<TraceExport>,
}

impl Running {
    /// Loads the configuration file again and, if it is valid, swaps it in whole (see
    /// [`crate::reload`]). An invalid file is logged with its file and line,
    /// counted, and returned; the configuration in use stays.
    pub async fn reload(&self) -> Result<(), ConfigError> {
        self.reloader.reload().await
    }

    /// Changes every reloaded configuration before it is checked and swapped in, as the
    /// first one was changed before [`start`] (command-line overrides of `listen`). Set it
    /// before [`Running::watch_config`]; a second call is ignored.
    pub(crate) fn adjust_reloads(&mut self, adjust: impl Fn(&mut Config) + Send + Sync + 'static) {
        let _ = self.reloader.adjust.set(Box::new(adjust));
    }

    /// Reloads whenever the configuration file's contents change, looking every `every`.
    /// Reading the contents (rather than a modification time) also sees a Kubernetes
    /// ConfigMap update, which swaps a symlink under the file's path.
    pub fn watch_config(&mut self, every: Duration) {
        let task = self.reloader.watch(every, self.stop_rest.subscribe());
        self.tasks.push(task);
    }

    /// Reloads a TLS listener's certificate files whenever their contents change, looking
    /// every `every` (see [`crate::tls`]). Does nothing when no listener serves TLS.
    pub fn watch_tls(&mut self, every: Duration) {
        if !self.tls.is_empty() {
            let task = crate::tls::watch(self.tls.clone(), every, self.stop_rest.subscribe());
            self.tasks.push(task);
        }
    }

    /// [`Running::shutdown_within`] the [`DEFAULT_DRAIN_TIMEOUT`].
    pub async fn shutdown(self) {
        self.shutdown_within(DEFAULT_DRAIN_TIMEOUT).await;
    }

    /// Turns readiness off for good (`/readyz` 503 with `"draining": true`, gRPC health
    /// `NOT_SERVING`) while every listener keeps serving: Checks are still answered, on
    /// open connections and new ones. The first step of shutting down; calling it again
    /// does nothing.
    pub(crate) async fn stop_being_ready(&mut self) {
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
        if let Some(traces) = self.traces {
            traces.shutdown().await;
        }
    }
}

/// Binds both listeners, loads keys, and starts serving in background tasks.
/// Binding errors (a port in use) surface here, before anything is served.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    start_traced(config, None).await
}

/// [`start`], with a span of every Check exported by `traces` (flushed at shutdown).
pub async fn start_traced(
    config: Config,
    traces: Option<(TraceExport, CheckTracer)>,
) -> anyhow::Result<Running> {
    let grpc_listener = TcpListener::bind(config.listen.grpc)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for gRPC on {}: {e}", config.listen.grpc))?;
    let admin_listener = TcpListener::bind(config.listen.admin)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for admin on {}: {e}", config.listen.admin))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let listen = config.listen.clone();
    let config_path = config.source.clone();

    // Keys start empty: the key manager fills them in (files and cache at once, the
    // network in the background) and keeps them fresh until shutdown.
    let config = Arc::new(config);
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::new(
        Arc::clone(&config),
        Arc::default(),
    )));
    let keys = KeyManager::start_http(&config, snapshot.clone())?;
    keys.initial_load().await;
    let metrics = Arc::new(Metrics::with_keys(snapshot.clone(), keys.clone()));
    metrics.registry_loaded(snapshot.load().config.registry.as_deref());
    let load_tls = |listener: Listener, files: &Option<crate::config::TlsFiles>| {
        files
            .as_ref()
            .map(|files| ServerTls::load(listener, files, metrics.clone()).map(Arc::new))
            .transpose()
            .map_err(|e| e.in_config(&config_path))
    };
    let tls = load_tls(Listener::Grpc, &listen.tls)
        .and_then(|grpc| Ok((grpc, load_tls(Listener::Admin, &listen.admin_tls)?)));
    let (grpc_tls, admin_tls) = match tls {
        Ok(tls) => tls,
        Err(e) => {
            keys.shutdown().await;
            return Err(e.into());
        }
    };
    let grpc_incoming = Incoming::new(grpc_listener, grpc_tls.as_ref())?;
    let admin_incoming = Incoming::new(admin_listener, admin_tls.as_ref())?;
    let (stop_grpc, grpc_stopped) = watch::channel(false);
    let (stop_rest, rest_stopped) = watch::channel(false);
    let (draining, draining_rx) = watch::channel(false);

    let (health, health_service) = tonic_health::server::health_reporter();
    // The reporter starts out SERVING; say the truth before anyone can ask.
    let mut ready = keys.ready();
    report_health(&health, *ready.borrow_and_update()).await;
    let health_task = tokio::spawn(follow_readiness(ready, health.clone(), draining_rx.clone()));

    let refresher: Arc<dyn KeyRefresher> = keys.clone();
    let mut authz =
        AuthzService::new(snapshot.clone(), Some(refresher)).with_metrics(metrics.clone());
    let (traces, tracer) = traces.unzip();
    if let Some(tracer) = tracer {
        authz = authz.with_tracer(tracer);
    }
    let authz = authz.into_server();
    let grpc_task = {
        let mut stopped = grpc_stopped;
        tokio::spawn(async move {
            let server = tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(authz);
            let stopped = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            let result = match grpc_incoming {
                Incoming::Plain(listener) => {
                    server
                        .serve_with_incoming_shutdown(
                            CoalescingIncoming::new(
                                TcpIncoming::from(listener).with_nodelay(Some(true)),
                            ),
                            stopped,
                        )
                        .await
                }
                Incoming::Tls(incoming) => {
                    server.serve_with_incoming_shutdown(incoming, stopped).await
                }
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "the gRPC server stopped with an error");
            }
        })
    };
    let admin_task = {
        let mut stopped = rest_stopped;
        let app = crate::admin::router(AdminState {
            keys: keys.clone(),
            metrics: metrics.clone(),
            draining: draining_rx,
        })
        .merge(crate::filter_feed::Feed::new(snapshot.clone(), Some(keys.clone())).routes());
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            let result = match admin_incoming {
                Incoming::Plain(listener) => {
                    // No delay, as on the gRPC listener (and on TLS connections): an HTTP/2
                    // answer is a HEADERS and a DATA frame written apart, and without it
                    // the second can wait for the peer's delayed ACK (tens of ms), which
                    // the filter's /v1/verify calls showed as p99 spikes of 20-30 ms.
                    let listener = listener.tap_io(|tcp| {
                        if let Err(e) = tcp.set_nodelay(true) {
                            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an admin connection");
                        }
                    });
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stopped)
                        .await
                }
                Incoming::Tls(incoming) => {
                    axum::serve(incoming, app)
                        .with_graceful_shutdown(stopped)
                        .await
                }
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "the admin server stopped with an error");
            }
        })
    };
    tracing::info!(
        %grpc_addr,
        %admin_addr,
        grpc_tls = grpc_tls.is_some(),
        admin_tls = admin_tls.is_some(),
        "connector-authz is serving"
    );
    let reloader = Arc::new(Reloader::new(
        config_path,
        listen,
        [grpc_tls.clone(), admin_tls.clone()],
        snapshot.clone(),
        keys.clone(),
        metrics.clone(),
    ));
    Ok(Running {
        grpc_addr,
        admin_addr,
        snapshot,
        keys,
        metrics,
        reloader,
        tls: grpc_tls.into_iter().chain(admin_tls).collect(),
        health,
        draining,
        stop_grpc,
        stop_rest,
        grpc_task,
        health_task: Some(health_task),
        tasks: vec![admin_task],
        traces,
    })
}

/// A listener: plain TCP, served as before (for gRPC, the hot path of
/// [`crate::transport`]), or TLS.
enum Incoming {
    Plain(TcpListener),
    Tls(TlsIncoming),
}

impl Incoming {
    fn new(listener: TcpListener, tls: Option<&Arc<ServerTls>>) -> std::io::Result<Self> {
        Ok(match tls {
            Some(tls) => Incoming::Tls(TlsIncoming::new(listener, Arc::clone(tls))?),
            None => Incoming::Plain(listener),
        })
    }
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
