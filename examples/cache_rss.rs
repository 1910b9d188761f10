//! How much memory the token cache takes: fills a `TokenCache` with N distinct tokens
//! shaped like `benches/common` makes them (a dozen scopes, RS256, about 1 KB each) and
//! prints the process's peak resident set (`VmHWM`) before and after.
//!
//!   cargo run --release --example cache_rss -- 100000
//!
//! The tokens are not signed one by one (100,000 RSA signatures would take minutes): each
//! is the fixture token with its own `jti` and the fixture's signature. The cache does not
//! verify on insert, so what it holds is the same size as real verified tokens.

#[path = "../benches/common/mod.rs"]
mod common;

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use connector_authz::token;
use connector_authz::token_cache::{TokenCache, VerifiedToken};
use jsonwebtoken::Algorithm;

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(100_000);
    let before = status_kib("VmHWM")?;
    // Room for n entries: the entry bound is spread over shards, so leave slack.
    let cache = TokenCache::new(2 * n, 2 * n as u64 * 4096);
    let signed = common::token("rss-0");
    let mut parts = signed.split('.');
    let (header, signature) = (
        parts.next().unwrap_or_default(),
        parts.nth(1).unwrap_or_default(),
    );
    let issuer: Arc<str> = Arc::from(common::ISSUER);
    let mut bytes = 0;
    for i in 0..n {
        let claims = common::claims(&format!("rss-{i:08}"), &common::SCOPES, 3 * 24 * 3600);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let raw = format!("{header}.{payload}.{signature}");
        bytes += raw.len();
        let parsed = token::split(&raw).map_err(|e| anyhow::anyhow!(e.message))?;
        let claims = parsed.claims().map_err(|e| anyhow::anyhow!(e.message))?;
        let verified = VerifiedToken::new(
            claims,
            Arc::clone(&issuer),
            Algorithm::RS256,
            parsed.header.kid.as_deref(),
            0,
        );
        cache.insert(&raw, verified);
    }
    let after = status_kib("VmHWM")?;
    println!(
        "tokens={n} cached={} avg_token_bytes={} cache_weight_mib={:.1} vm_hwm_before_mib={:.1} vm_hwm_after_mib={:.1} delta_mib={:.1} per_entry_bytes={}",
        cache.len(),
        bytes / n.max(1),
        cache.weight() as f64 / 1048576.0,
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after - before) as f64 / 1024.0,
        (after - before) * 1024 / cache.len().max(1) as u64,
    );
    Ok(())
}

/// A `/proc/self/status` field in KiB (`VmHWM`: the peak resident set).
fn status_kib(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/self/status"))
}
