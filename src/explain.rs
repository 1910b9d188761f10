//! `connector-authz explain`: the decision the sidecar would make on one request, and
//! every step that led to it.
//!
//! The decision comes from the same [`decide`] the server calls, on a snapshot built the
//! way the server builds it at start: `jwks_file` keys, the cache directory for network
//! issuers, or (with `--fetch`) a live fetch of the token's issuer. The rest of the
//! output only describes what `decide` looked at; it never changes the decision.
//!
//! Nothing here prints the raw token or its signature: only its decoded header and claims.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{Config, KeysFrom};
use crate::decide::{Snapshot, decide};
use crate::decision::{Decision, Headers, Request};
use crate::keys::cache::KeyCache;
use crate::keys::fetch::{HttpFetcher, fetch_key_set, load_key_file};
use crate::keys::jwks::KeyLimits;
use crate::keys::{KeySet, KeySnapshot, refresh::network_source};
use crate::route::{Access, normalize_path};
use crate::token::{self, Audience, Claims};

/// What `explain` found: the decision and the report to print.
#[derive(Debug)]
pub struct Explanation {
    pub decision: Decision,
    pub report: String,
}

/// Loads the keys the way the server would at start: every `jwks_file`, and for network
/// issuers the cache directory, or with `fetch` a fetch of `fetch_issuer` (the token's
/// issuer: the only one a decision can need). Returns the keys and one note per issuer
/// on where its keys came from or why there are none.
pub async fn load_keys(
    config: &Config,
    fetch: bool,
    fetch_issuer: Option<&str>,
) -> (KeySnapshot, Vec<String>) {
    let limits = KeyLimits::default();
    let cache = config.keys.cache_dir.as_ref().map(KeyCache::new);
    let mut keys = KeySnapshot::default();
    let mut notes = Vec::new();
    let wanted = fetch_issuer
        .and_then(|iss| config.issuer(iss))
        .map(|i| &i.name);
    for issuer in &config.issuers {
        let name = &issuer.name;
        let loaded: Result<KeySet, String> = match (&issuer.keys_from, network_source(issuer)) {
            (KeysFrom::JwksFile(path), _) => load_key_file(path, &limits)
                .map(|p| p.key_set)
                .map_err(|e| format!("jwks_file {}: {e}", path.display())),
            (_, Some(source)) if fetch && wanted == Some(name) => {
                let fetched =
                    match HttpFetcher::new(config.keys.fetch_timeout, limits.max_document_bytes) {
                        Ok(fetcher) => fetch_key_set(&fetcher, &source, &limits)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                fetched
                    .map(|p| p.key_set)
                    .map_err(|e| format!("fetch failed: {e}"))
            }
            (_, Some(_)) if fetch => Err("not fetched (not the token's issuer)".into()),
            (_, Some(_)) => match &cache {
                Some(cache) => cache.load(name, &limits).map(|p| p.key_set).ok_or_else(|| {
                    format!(
                        "nothing cached in {} (use --fetch to fetch them)",
                        cache.dir().display()
                    )
                }),
                None => Err("no keys.cache_dir to read them from (use --fetch)".into()),
            },
            (_, None) => Err("no key source".into()),
        };
        match loaded {
            Ok(set) => {
                notes.push(format!(
                    "{name}: {} key(s) from {}",
                    set.keys.len(),
                    source_word(&set)
                ));
                keys = keys.with_issuer(Arc::clone(name), Arc::new(set));
            }
            Err(why) => notes.push(format!("{name}: no keys: {why}")),
        }
    }
    (keys, notes)
}

fn source_word(set: &KeySet) -> &'static str {
    match set.source {
        crate::keys::KeySource::Network => "the network",
        crate::keys::KeySource::File => "its jwks_file",
        crate::keys::KeySource::Cache => "the cache directory",
        crate::keys::KeySource::Dev => "the dev issuer",
    }
}

/// Decides `req` with [`decide`] and describes each step.
pub fn explain(snapshot: &Snapshot, req: &Request<'_>, now: SystemTime) -> Explanation {
    let decision = decide(snapshot, req, now);
    let config = &*snapshot.config;
    let mut out = String::new();
    let now_secs = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));

    match &decision {
        Decision::Allow(allowed) => match &allowed.dry_run {
            None => {
                let _ = writeln!(out, "decision: allow (backend {})", allowed.backend);
            }
            Some(denied) => {
                let _ = writeln!(
                    out,
                    "decision: dry_run: allowed because backend {} is in mode: dry_run; enforcing would deny {} {}\n  {}\n  upstream header: x-gitlab-authz-dry-run: {}",
                    allowed.backend,
                    denied.reason.http_status(),
                    denied.reason,
                    denied.message,
                    denied.reason
                );
            }
        },
        Decision::Deny(denied) => {
            let _ = writeln!(
                out,
                "decision: deny {} {}\n  {}",
                denied.reason.http_status(),
                denied.reason,
                denied.message
            );
        }
    }

    // 1. The path and the route.
    let _ = writeln!(out, "\nrequest: {} {}", req.method, req.path);
    let path = match normalize_path(req.path) {
        Ok(path) => {
            let _ = writeln!(out, "  normalized path: {path}");
            path
        }
        Err(e) => {
            let _ = writeln!(out, "  path refused: {}", e.message());
            return Explanation {
                decision,
                report: out,
            };
        }
    };
    let Some(route) = config.routes.find(&path, req.method) else {
        let _ = writeln!(out, "  route: none matches {} {path}", req.method);
        return Explanation {
            decision,
            report: out,
        };
    };
    let backend = &config.backends[route.backend];
    let methods = if route.methods == crate::route::Methods::ANY {
        "any method".to_string()
    } else {
        route.methods.names().join(",")
    };
    let _ = writeln!(
        out,
        "  route: {} ({methods}) at {}:{}",
        route.pattern,
        config.source.display(),
        route.line
    );
    let _ = writeln!(
        out,
        "  backend: {} (audience {}){}",
        backend.name,
        backend.audience,
        if backend.mode == crate::config::Mode::DryRun {
            ", mode: dry_run"
        } else {
            ""
        }
    );
    for f in &backend.forward_claims {
        let _ = writeln!(out, "  forwards claim {} as header {}", f.claim, f.header);
    }
    let (require, require_any, user_tokens, named_header) = match &route.access {
        Access::Public => {
            let _ = writeln!(out, "  requires: nothing (public route, no token needed)");
            return Explanation {
                decision,
                report: out,
            };
        }
        Access::Token {
            require,
            require_any,
            user_tokens,
            unit_primitive_header,
        } => (
            require,
            require_any,
            *user_tokens,
            unit_primitive_header.as_deref(),
        ),
    };
    let mut needs: Vec<String> = require.iter().map(|r| r.to_string()).collect();
    if !require_any.is_empty() {
        needs.push(format!("one of [{}]", require_any.join(", ")));
    }
    if !user_tokens {
        needs.push("an instance token (user_tokens: false)".into());
    }
    if let Some(header) = named_header {
        let named = req.headers.get(header).one().unwrap_or("(header absent)");
        needs.push(format!("the unit primitive named by {header}: {named}"));
    }
    if needs.is_empty() {
        needs.push("any valid token".into());
    }
    let _ = writeln!(out, "  requires: {}", needs.join(", "));
    for name in &route.deprecated {
        let _ = writeln!(out, "  note: {name} is deprecated");
    }

    // 2. The token (decoded; never the raw token or its signature).
    let raw = match token::bearer(req.headers, config.tokens.max_bytes) {
        Ok(raw) => raw,
        Err(e) => {
            let _ = writeln!(out, "\ntoken: {}", e.message);
            return Explanation {
                decision,
                report: out,
            };
        }
    };
    let unverified = match token::split(raw) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(out, "\ntoken: {}", e.message);
            return Explanation {
                decision,
                report: out,
            };
        }
    };
    let header = &unverified.header;
    let _ = writeln!(
        out,
        "\ntoken header: alg {}, kid {}, typ {}",
        header.alg,
        header.kid.as_deref().unwrap_or("(none)"),
        header.typ.as_deref().unwrap_or("(none)")
    );
    let claims = match unverified.claims() {
        Ok(claims) => claims,
        Err(e) => {
            let _ = writeln!(out, "token claims: {}", e.message);
            return Explanation {
                decision,
                report: out,
            };
        }
    };
    write_claims(&mut out, &claims, now_secs);

    // 3. The issuer and its keys.
    match claims.iss.as_deref().and_then(|iss| config.issuer(iss)) {
        None => {
            let _ = writeln!(out, "\nissuer: not one of the configured issuers");
        }
        Some(issuer) => {
            let from = match &issuer.keys_from {
                KeysFrom::Discovery => "discovery".to_string(),
                KeysFrom::JwksUri(uri) => format!("jwks_uri {uri}"),
                KeysFrom::JwksFile(path) => format!("jwks_file {}", path.display()),
            };
            let _ = writeln!(out, "\nissuer: {} (keys from {from})", issuer.name);
            match snapshot.keys.get(&issuer.name) {
                None => {
                    let _ = writeln!(out, "  keys: none loaded");
                }
                Some(set) => {
                    let kids: Vec<&str> = set
                        .keys
                        .iter()
                        .map(|k| k.kid.as_deref().unwrap_or("(no kid)"))
                        .collect();
                    let age = now
                        .duration_since(set.loaded_at)
                        .map(|d| Duration::from_secs(d.as_secs()))
                        .unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "  keys: {} from {}, loaded {} ago: {}",
                        set.keys.len(),
                        source_word(set),
                        humantime::format_duration(age),
                        kids.join(", ")
                    );
                    match header.kid.as_deref() {
                        Some(kid) if set.by_kid(kid).is_some() => {
                            let _ = writeln!(out, "  key {kid}: found");
                        }
                        Some(kid) => {
                            let _ = writeln!(out, "  key {kid}: not found");
                        }
                        None => {
                            let _ = writeln!(
                                out,
                                "  key: the token names no kid; tried against the issuer's keys"
                            );
                        }
                    }
                }
            }
        }
    }

    // 4. Scopes.
    let held = claims.scopes.as_deref().unwrap_or_default();
    let mut needed: Vec<&str> = require.iter().map(|r| &**r).collect();
    if let Some(header) = named_header
        && let Some(named) = req.headers.get(header).one()
    {
        needed.push(named.trim());
    }
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|n| !held.iter().any(|h| h == n))
        .collect();
    let list = |v: &[&str]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(" ")
        }
    };
    let held: Vec<&str> = held.iter().map(String::as_str).collect();
    let _ = writeln!(
        out,
        "\nscopes: needed {}; held {}; missing {}",
        list(&needed),
        list(&held),
        list(&missing)
    );
    Explanation {
        decision,
        report: out,
    }
}

fn write_claims(out: &mut String, claims: &Claims, now: i64) {
    let text = |v: &Option<String>| v.clone().unwrap_or_else(|| "(absent)".into());
    let aud = match &claims.aud {
        None => "(absent)".to_string(),
        Some(Audience::One(a)) => a.clone(),
        Some(Audience::Many(all)) => all.join(", "),
    };
    let _ = writeln!(out, "token claims:");
    let _ = writeln!(out, "  iss: {}", text(&claims.iss));
    let _ = writeln!(out, "  sub: {}", text(&claims.sub));
    let _ = writeln!(out, "  aud: {aud}");
    for (name, value) in [
        ("exp", claims.exp),
        ("nbf", claims.nbf),
        ("iat", claims.iat),
    ] {
        let _ = writeln!(out, "  {name}: {}", when(value, now));
    }
    let _ = writeln!(out, "  jti: {}", text(&claims.jti));
    let scopes = claims
        .scopes
        .as_ref()
        .map_or("(absent)".to_string(), |s| s.join(" "));
    let _ = writeln!(out, "  scopes: {scopes}");
    let _ = writeln!(out, "  gitlab_realm: {}", text(&claims.gitlab_realm));
    let _ = writeln!(
        out,
        "  gitlab_instance_id: {}",
        text(&claims.gitlab_instance_id)
    );
}

/// A NumericDate as a date and relative to now: `2026-01-02T03:04:05Z (in 9m 58s)`.
fn when(value: Option<i64>, now: i64) -> String {
    let Some(at) = value else {
        return "(absent)".into();
    };
    let date = u64::try_from(at)
        .ok()
        .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
        .map_or_else(
            || at.to_string(),
            |t| humantime::format_rfc3339_seconds(t).to_string(),
        );
    let delta = Duration::from_secs(at.abs_diff(now));
    let relative = match at.cmp(&now) {
        std::cmp::Ordering::Greater => format!("in {}", humantime::format_duration(delta)),
        std::cmp::Ordering::Less => format!("{} ago", humantime::format_duration(delta)),
        std::cmp::Ordering::Equal => "now".to_string(),
    };
    format!("{date} ({relative})")
}

/// The headers `explain` was given, as the server would see them.
pub fn request_headers(token: Option<&str>, headers: &[(String, String)]) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    if let Some(token) = token {
        all.retain(|(k, _)| k != "authorization");
        all.push(("authorization".into(), format!("Bearer {token}")));
    }
    all
}

/// The token's `iss`, read without verifying anything (to know which issuer to fetch).
pub fn token_issuer(headers: &dyn Headers, max_bytes: usize) -> Option<String> {
    let raw = token::bearer(headers, max_bytes).ok()?;
    token::split(raw).ok()?.claims().ok()?.iss
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times_read_both_ways() {
        assert_eq!(when(None, 100), "(absent)");
        assert_eq!(when(Some(160), 100), "1970-01-01T00:02:40Z (in 1m)");
        assert_eq!(when(Some(40), 100), "1970-01-01T00:00:40Z (1m ago)");
        assert_eq!(when(Some(100), 100), "1970-01-01T00:01:40Z (now)");
    }
}
