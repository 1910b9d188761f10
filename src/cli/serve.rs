//! `serve`: run the sidecar until SIGTERM or SIGINT, reload on SIGHUP, and stop in order
//! (readiness off for the shutdown delay, then drain).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::check_config::unchecked_unit_primitives_warning;
use super::print_out;
use crate::config::Config;
use crate::traces::{TraceExport, TraceSettings, TracesFromEnv};

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct ServeArgs {
    /// The configuration file. Reloaded on SIGHUP and when its contents change.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run with an embedded development issuer and the demo routes: no files, no network.
    #[arg(long)]
    pub dev: bool,
}

#[derive(Args, Debug)]
pub struct ListenArgs {
    /// Listen for gRPC here instead of the configuration's `listen.grpc`.
    #[arg(long)]
    pub grpc: Option<SocketAddr>,
    /// Serve /healthz, /readyz and /metrics here instead of the configuration's `listen.admin`.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
}

impl ListenArgs {
    fn apply(&self, config: &mut Config) {
        if let Some(grpc) = self.grpc {
            config.listen.grpc = grpc;
        }
        if let Some(admin) = self.admin {
            config.listen.admin = admin;
        }
    }
}

/// How `serve` stops: answer with readiness off for `delay` (after SIGTERM), then drain
/// for at most `drain`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Stopping {
    pub(super) delay: Duration,
    pub(super) drain: Duration,
}

pub(super) async fn serve(
    args: ServeArgs,
    listen: ListenArgs,
    stop: Stopping,
) -> anyhow::Result<ExitCode> {
    // Signal handlers go in before anything listens, so that a SIGTERM or SIGHUP sent as
    // soon as the sidecar answers is never met by the default action (exit at once).
    let mut signals = Signals::new()?;
    let traces = TraceSettings::from_env()?;
    tracing::info!("traces: {traces}");
    if args.dev {
        let mut setup = crate::dev_server::prepare()?;
        listen.apply(&mut setup.config);
        print_out(&setup.banner())?;
        let result = serve_until_stopped(setup.config, None, traces, stop, &mut signals).await;
        // The directory holds the dev private key: it lives only as long as the server.
        if let Err(e) = std::fs::remove_dir_all(&setup.dir) {
            tracing::warn!(dir = %setup.dir.display(), error = %e, "cannot remove the dev directory");
        }
        result?;
    } else {
        let path = args.config.expect("clap requires --config or --dev");
        let mut config = Config::load(&path)?;
        if let Some(warning) = unchecked_unit_primitives_warning(&config) {
            tracing::warn!("{warning}");
        }
        listen.apply(&mut config);
        serve_until_stopped(config, Some(listen), traces, stop, &mut signals).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Serves until SIGTERM or SIGINT; after SIGTERM keeps answering with readiness off for
/// `stop.delay`; then drains for at most `stop.drain`. With `reload` (the command line's
/// listen overrides, which apply to reloaded configurations too), reloads on SIGHUP and
/// when the configuration file changes. Checks are traced when `traces` says so.
async fn serve_until_stopped(
    config: Config,
    reload: Option<ListenArgs>,
    traces: TracesFromEnv,
    stop: Stopping,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    let traces = match traces {
        TracesFromEnv::On(settings) => Some(TraceExport::start(&settings)?),
        TracesFromEnv::Off(_) => None,
    };
    let mut running = crate::serve::start_traced(config, traces).await?;
    let reload = match reload {
        Some(listen) => {
            running.adjust_reloads(move |config| listen.apply(config));
            running.watch_config(crate::serve::CONFIG_POLL_INTERVAL);
            running.watch_tls(crate::tls::TLS_POLL_INTERVAL);
            true
        }
        None => false,
    };
    let first = loop {
        match signals.next().await {
            Signal::Stop(name) => break name,
            Signal::Reload if reload => {
                tracing::info!("SIGHUP: reloading the configuration");
                // A rejected configuration is logged and counted; the old one keeps serving.
                let _ = running.reload().await;
            }
            Signal::Reload => {
                tracing::warn!("SIGHUP: serve --dev has no configuration file to reload")
            }
        }
    };
    running.stop_being_ready().await;
    // Kubernetes sends SIGTERM and removes the pod from its endpoints at the same time;
    // the proxies learn of it a little later and keep sending until then. A person at a
    // terminal (SIGINT) does not need the wait.
    if first == "SIGTERM" && !stop.delay.is_zero() {
        tracing::info!(
            signal = first,
            delay = %humantime::format_duration(stop.delay),
            "shutting down: not ready, still answering Checks for the shutdown delay"
        );
        let cut_short = async {
            loop {
                if let Signal::Stop(name) = signals.next().await {
                    return name;
                }
                tracing::info!("SIGHUP ignored: shutting down");
            }
        };
        tokio::select! {
            () = tokio::time::sleep(stop.delay) => {}
            name = cut_short => tracing::info!(signal = name, "shutdown delay cut short"),
        }
    }
    tracing::info!(signal = first, drain = %humantime::format_duration(stop.drain), "shutting down: draining");
    running.shutdown_within(stop.drain).await;
    tracing::info!("stopped");
    Ok(())
}

enum Signal {
    Stop(&'static str),
    Reload,
}

/// SIGTERM, SIGINT and SIGHUP, registered when created.
#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let register = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| anyhow::anyhow!("cannot listen for {name}: {e}"))
        };
        Ok(Self {
            term: register(SignalKind::terminate(), "SIGTERM")?,
            int: register(SignalKind::interrupt(), "SIGINT")?,
            hup: register(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop("SIGTERM"),
            _ = self.int.recv() => Signal::Stop("SIGINT"),
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> anyhow::Result<Self> {
        Ok(Self)
    }

    async fn next(&mut self) -> Signal {
        let _ = tokio::signal::ctrl_c().await;
        Signal::Stop("Ctrl-C")
    }
}
