//! `connector-authz explain`: the decision the sidecar would make on one request, and
//! every step that led to it.
//!
//! The decision comes from the same `decide` the server calls (as [`decide_traced`], which
//! records each step it takes), on a snapshot built the way the server builds it at start:
//! `jwks_file` keys, the cache directory for network issuers, or (with `--fetch`) a live
//! fetch of the token's issuer. The rest of the output prints that trace: what `decide`
//! looked at, never a second walk of the pipeline.
//!
//! Nothing here prints the raw token or its signature: only its decoded header and claims.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{Config, KeysFrom, Mode};
use crate::decide::{Snapshot, Trace, decide_traced};
use crate::decision::{Decision, DenyReason, Headers, Request};
use crate::keys::cache::KeyCache;
use crate::keys::fetch::{HttpFetcher, fetch_key_set, load_key_file};
use crate::keys::jwks::KeyLimits;
use crate::keys::{KeySet, KeySnapshot, refresh::network_source};
use crate::route::{Access, Methods, Route};
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

/// Decides `req` with [`decide_traced`] and describes each step the decision took.
pub fn explain(snapshot: &Snapshot, req: &Request<'_>, now: SystemTime) -> Explanation {
    let (decision, trace) = decide_traced(snapshot, req, now);
    let mut out = String::new();
    write_decision(&mut out, &decision);
    write_steps(&mut out, snapshot, req, now, &decision, &trace);
    Explanation {
        decision,
        report: out,
    }
}

fn write_decision(out: &mut String, decision: &Decision) {
    match decision {
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
}

/// The steps in the order `decide` took them, each from what the trace recorded; the
/// report stops where the decision was made.
fn write_steps(
    out: &mut String,
    snapshot: &Snapshot,
    req: &Request<'_>,
    now: SystemTime,
    decision: &Decision,
    trace: &Trace,
) {
    let config = &*snapshot.config;

    // 1. The path and the route.
    let _ = writeln!(out, "\nrequest: {} {}", req.method, req.path);
    let Some(path) = &trace.path else {
        let _ = writeln!(out, "  path refused (see the decision above)");
        return;
    };
    let _ = writeln!(out, "  normalized path: {path}");
    let Some(route) = decision.route().map(|i| &config.routes.routes()[i]) else {
        write_no_route(out, config, req.method, path);
        return;
    };
    write_route(out, config, route, req);
    let Access::Token { .. } = route.access else {
        return;
    };

    // 2. The token (decoded; never the raw token or its signature).
    let Some(header) = &trace.header else {
        let _ = writeln!(out, "\ntoken: not read (see the decision above)");
        return;
    };
    let _ = writeln!(
        out,
        "\ntoken header: alg {}, kid {}, typ {}",
        header.alg,
        header.kid.as_deref().unwrap_or("(none)"),
        header.typ.as_deref().unwrap_or("(none)")
    );
    let Some(claims) = &trace.claims else {
        let _ = writeln!(out, "token claims: not readable (see the decision above)");
        return;
    };
    let now_secs = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    write_claims(out, claims, now_secs);

    // 3. The issuer and its keys.
    match trace.issuer.as_ref().and_then(|name| config.issuer(name)) {
        None if claims.iss.is_some() => {
            let _ = writeln!(out, "\nissuer: not one of the configured issuers");
        }
        None => {
            let _ = writeln!(out, "\nissuer: not checked (see the decision above)");
        }
        Some(issuer) => {
            let from = match &issuer.keys_from {
                KeysFrom::Discovery => "discovery".to_string(),
                KeysFrom::JwksUri(uri) => format!("jwks_uri {uri}"),
                KeysFrom::JwksFile(path) => format!("jwks_file {}", path.display()),
            };
            let _ = writeln!(out, "\nissuer: {} (keys from {from})", issuer.name);
            write_keys(
                out,
                snapshot,
                &issuer.name,
                header.kid.as_deref(),
                trace.key,
                now,
            );
        }
    }

    // 4. Unit primitives, when the decision got that far.
    let Some(scopes) = &trace.scopes else {
        let _ = writeln!(out, "\nscopes: not compared (the decision was made before)");
        return;
    };
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(" ")
        }
    };
    let mut needed = list(&scopes.needed);
    if !scopes.any_of.is_empty() {
        needed = format!("{needed}; one of {}", scopes.any_of.join(" "));
    }
    let _ = writeln!(
        out,
        "\nscopes: needed {needed}; held {}; missing {}",
        list(&scopes.held),
        list(&scopes.missing)
    );
}

/// Why no route took the request: no pattern matches, or the most specific pattern that
/// matches takes other methods.
fn write_no_route(out: &mut String, config: &Config, method: &str, path: &str) {
    let others: Vec<_> = config.routes.routes_of_pattern(path).collect();
    match others.first() {
        None => {
            let _ = writeln!(out, "  route: no pattern matches {path}");
        }
        Some(first) => {
            let methods: Vec<&str> = others.iter().flat_map(|r| r.methods.names()).collect();
            let _ = writeln!(
                out,
                "  route: {} at {}:{} matches the path but takes only {}, not {method}",
                first.pattern,
                config.source.display(),
                first.line,
                methods.join(",")
            );
        }
    }
}

fn write_route(out: &mut String, config: &Config, route: &Route, req: &Request<'_>) {
    let backend = &config.backends[route.backend];
    let methods = if route.methods == Methods::ANY {
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
        if backend.mode == Mode::DryRun {
            ", mode: dry_run"
        } else {
            ""
        }
    );
    for f in &backend.forward_claims {
        let _ = writeln!(out, "  forwards claim {} as header {}", f.claim, f.header);
    }
    let Access::Token {
        require,
        require_any,
        user_tokens,
        unit_primitive_header,
    } = &route.access
    else {
        let _ = writeln!(out, "  requires: nothing (public route, no token needed)");
        return;
    };
    let mut needs: Vec<String> = require.iter().map(|r| r.to_string()).collect();
    if !require_any.is_empty() {
        needs.push(format!("one of [{}]", require_any.join(", ")));
    }
    if !user_tokens {
        needs.push("an instance token (user_tokens: false)".into());
    }
    if let Some(header) = unit_primitive_header {
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
}

/// The issuer's loaded keys and what the key lookup found.
fn write_keys(
    out: &mut String,
    snapshot: &Snapshot,
    issuer: &str,
    kid: Option<&str>,
    found: Option<Result<u64, DenyReason>>,
    now: SystemTime,
) {
    let Some(set) = snapshot.keys.get(issuer) else {
        let _ = writeln!(out, "  keys: none loaded");
        return;
    };
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
    let key = kid.map_or_else(
        || "key (the token names no kid)".to_string(),
        |k| format!("key {k}"),
    );
    let _ = match found {
        None => writeln!(out, "  {key}: not looked up (see the decision above)"),
        Some(Ok(_)) => writeln!(out, "  {key}: found; the signature verifies"),
        Some(Err(DenyReason::UnknownKey)) => writeln!(out, "  {key}: not found"),
        Some(Err(reason)) => writeln!(out, "  {key}: {reason}"),
    };
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
