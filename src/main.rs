//! `connector-authz`: parse the command line, set up logging, run the command.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser;
use connector_authz::cli::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;

// A Check allocates and frees a few dozen small buffers (h2 frames, the decoded request,
// the answer): glibc's malloc was ~15 % of the server's CPU under load (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        EnvFilter::try_from_env("CONNECTOR_AUTHZ_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: `kubectl logs`, journald and files get
    // plain text. NO_COLOR (https://no-color.org) turns them off on a terminal too.
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let runtime = match cli.workers.threads() {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    }
    .enable_all()
    .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(connector_authz::cli::run(cli)),
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("connector-authz: {e:#}");
            ExitCode::from(2)
        }
    }
}
