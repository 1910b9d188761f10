//! `mint`: sign a development token with a PKCS#8 PEM private key.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use serde_json::json;

use super::{parse_key_value, print_out};
use crate::dev::DevKey;

#[derive(Args, Debug)]
pub struct MintArgs {
    /// PKCS#8 PEM private key (`serve --dev` prints the path of its key).
    #[arg(long)]
    pub key: PathBuf,
    #[arg(long)]
    pub kid: String,
    #[arg(long)]
    pub iss: String,
    #[arg(long)]
    pub aud: String,
    #[arg(long)]
    pub sub: Option<String>,
    /// Unit primitives, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub scopes: Vec<String>,
    /// Lifetime, like 1h or 3d.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Extra claims as key=JSON value (a value that is not JSON is taken as a string).
    #[arg(long = "claim", value_parser = parse_key_value::<'='>)]
    pub claims: Vec<(String, String)>,
}

pub(super) fn mint(args: MintArgs) -> anyhow::Result<ExitCode> {
    let pem = std::fs::read_to_string(&args.key)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.key.display()))?;
    let key = DevKey::from_pkcs8_pem(&pem, args.kid.clone())?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut claims = json!({
        "iss": args.iss,
        "aud": args.aud,
        "iat": now,
        "nbf": now,
        "exp": now + args.ttl.as_secs(),
        "jti": format!("mint-{now}-{}", std::process::id()),
        "scopes": args.scopes,
    });
    if let Some(sub) = args.sub {
        claims["sub"] = json!(sub);
    }
    for (name, value) in args.claims {
        claims[name] = serde_json::from_str(&value).unwrap_or(json!(value));
    }
    print_out(&format!("{}\n", key.sign(&claims)))?;
    Ok(ExitCode::SUCCESS)
}
