//! The command line: `serve`, `check-config`, `explain`, `mint` and `check`, one file
//! each; this module parses the arguments and dispatches.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod check;
mod check_config;
mod explain;
mod mint;
mod serve;

pub use check::CheckArgs;
pub use explain::ExplainArgs;
pub use mint::MintArgs;
use serve::Stopping;
pub use serve::{ListenArgs, ServeArgs};

#[derive(Parser, Debug)]
#[command(
    name = "connector-authz",
    version,
    about = "Envoy ext_authz sidecar for GitLab Cloud Connector service tokens"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Runtime threads that answer Checks: `auto` (1 when the container's CPU limit, or the
    /// machine, has 2 CPUs or fewer, else 2) or a number. 1 runs everything on one thread
    /// (Tokio's current-thread scheduler: no wake-ups across threads).
    #[arg(long, default_value = "auto", global = true)]
    pub workers: Workers,
    #[command(subcommand)]
    pub command: Command,
}

/// `--workers`: how many runtime threads answer Checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workers {
    /// From the CPU limit (cgroup quota) or the machine's CPUs: see [`Workers::auto_for`].
    Auto,
    Exactly(std::num::NonZeroUsize),
}

impl Workers {
    /// `auto` never runs more threads than this: a sidecar shares its pod's CPU with the
    /// proxy and the backend, and a Check takes microseconds.
    pub const AUTO_MAX: usize = 2;

    /// The number of threads to run.
    pub fn threads(self) -> usize {
        match self {
            Workers::Auto => Self::auto_for(
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            ),
            Workers::Exactly(n) => n.get(),
        }
    }

    /// `auto` with `cpus` CPUs to share: one thread up to 2 CPUs, else [`Self::AUTO_MAX`].
    /// Measured beside Envoy on 2 CPUs (BENCHMARKS.md, benches/load.sh A against A2): the
    /// current-thread runtime spent 30-45 % less CPU per Check (two threads: 1.42-1.74 x),
    /// since a Check never wakes a second thread, for 10-19 % less throughput on a quiet
    /// machine and the same within the noise on a loaded one.
    pub fn auto_for(cpus: usize) -> usize {
        if cpus <= 2 { 1 } else { Self::AUTO_MAX }
    }
}

impl std::str::FromStr for Workers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Workers::Auto);
        }
        s.parse::<std::num::NonZeroUsize>()
            .ok()
            .filter(|n| n.get() <= 256)
            .map(Workers::Exactly)
            .ok_or_else(|| format!("'{s}' is not auto or a number of threads from 1 to 256"))
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the sidecar.
    Serve {
        #[command(flatten)]
        source: ServeArgs,
        #[command(flatten)]
        listen: ListenArgs,
        /// On SIGTERM, how long to keep answering Checks with readiness already off
        /// (`/readyz` 503, gRPC health NOT_SERVING) before draining, so that Kubernetes and
        /// the proxies stop sending first. 0s drains at once. SIGINT, or a second SIGTERM,
        /// skips the rest of it.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        shutdown_delay: Duration,
        /// Then, how long Checks in flight may take to finish.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
    },
    /// Validate a configuration and show what it enforces.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show the decision on one request, and why (exit 0 allow, 1 deny, 2 error).
    Explain(ExplainArgs),
    /// Sign a development token with a PKCS#8 PEM private key (dev and test keys only).
    Mint(MintArgs),
    /// Send one Check to a running sidecar and print the decision.
    Check(CheckArgs),
}

/// The HTTP request that `check` sends and `explain` decides on.
#[derive(Args, Debug)]
pub struct RequestArgs {
    /// The request path (with its query string, if any), as Envoy would send it.
    #[arg(long)]
    pub path: String,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// Sent as `Authorization: Bearer <token>`.
    #[arg(long)]
    pub token: Option<String>,
    /// A request header, as name:value (repeatable).
    #[arg(long = "header", value_parser = parse_key_value::<':'>)]
    pub headers: Vec<(String, String)>,
}

impl RequestArgs {
    /// The headers with lower-case names, and the token as the Authorization header.
    fn header_list(&self) -> Vec<(String, String)> {
        crate::explain::request_headers(self.token.as_deref(), &self.headers)
    }
}

pub(super) fn parse_key_value<const SEP: char>(s: &str) -> Result<(String, String), String> {
    s.split_once(SEP)
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected name{SEP}value, got {s:?}"))
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve {
            source,
            listen,
            shutdown_delay,
            drain_timeout,
        } => {
            let stop = Stopping {
                delay: shutdown_delay,
                drain: drain_timeout,
            };
            serve::serve(source, listen, stop).await
        }
        Command::CheckConfig { config } => check_config::check_config(&config),
        Command::Explain(args) => explain::explain(args).await,
        Command::Mint(args) => mint::mint(args),
        Command::Check(args) => check::check(args).await,
    }
}

/// Writes to stdout; a reader that went away (`| head`) ends the output, not the program.
fn print_out(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_auto_or_a_bounded_count() {
        let parse = |s: &str| s.parse::<Workers>();
        assert_eq!(parse("auto"), Ok(Workers::Auto));
        assert_eq!(parse("1").map(Workers::threads), Ok(1));
        assert_eq!(parse("3").map(Workers::threads), Ok(3));
        let auto = Workers::Auto.threads();
        assert!((1..=Workers::AUTO_MAX).contains(&auto), "{auto}");
        let auto: Vec<usize> = [1, 2, 3, 4, 64].map(Workers::auto_for).into();
        assert_eq!(auto, [1, 1, 2, 2, 2]);
        for bad in ["0", "-1", "257", "two", ""] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains("auto or a number"), "{bad}: {err}");
        }
        let cli = Cli::try_parse_from(["connector-authz", "serve", "--dev", "--workers", "1"])
            .expect("--workers after the command");
        assert_eq!(cli.workers.threads(), 1);
        assert!(
            Cli::try_parse_from(["connector-authz", "--workers", "0", "serve", "--dev"]).is_err()
        );
    }
}
