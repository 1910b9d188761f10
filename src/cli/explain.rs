//! `explain`: decide on one request offline and say why (the engine is `crate::explain`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Args;

use super::{RequestArgs, print_out};
use crate::config::Config;

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// The configuration file.
    #[arg(long)]
    pub config: PathBuf,
    #[command(flatten)]
    pub request: RequestArgs,
    /// Fetch the token issuer's keys now, instead of the jwks_files and keys.cache_dir.
    #[arg(long)]
    pub fetch: bool,
}

pub(super) async fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let headers = args.request.header_list();
    let iss = crate::explain::token_issuer(&headers, config.tokens.max_bytes);
    let (keys, notes) = crate::explain::load_keys(&config, args.fetch, iss.as_deref()).await;
    let snapshot =
        crate::decide::Snapshot::new(std::sync::Arc::new(config), std::sync::Arc::new(keys));
    let method = args.request.method.to_ascii_uppercase();
    let request = crate::decision::Request {
        method: &method,
        path: &args.request.path,
        headers: &headers,
    };
    let explanation = crate::explain::explain(&snapshot, &request, SystemTime::now());
    let mut out = explanation.report;
    out.push_str("\nkeys loaded for this explanation:\n");
    for note in notes {
        out.push_str(&format!("  {note}\n"));
    }
    print_out(&out)?;
    Ok(if explanation.decision.is_allow() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
