//! One request through the filter, without the proxy: the decision (the core's
//! `decide_verified`, with the per-VM cache of tokens the sidecar verified) and what it
//! does to the exchange. The proxy-wasm glue (`filter`) only reads the request, carries
//! out a [`Step`] and makes the verify call.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use connector_authz_core::decide::{Outcome, VerifiedTokens, decide_verified};
use connector_authz_core::decision::{Decision, Denied, DenyReason, Request};
use connector_authz_core::feed::CompiledFeed;
use connector_authz_core::respond::{DenyResponse, UpstreamHeaders};
use connector_authz_core::token_cache::VerifiedToken;

use crate::token_cache::{TokenDigest, VerifiedCache, digest};

/// What to do with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Answer in the proxy: a local reply.
    Deny {
        response: DenyResponse,
        facts: Facts,
    },
    /// Let it through with these upstream headers.
    Allow {
        headers: UpstreamHeaders,
        facts: Facts,
    },
    /// Ask the sidecar to verify this token, then decide again with its answer.
    Verify { digest: TokenDigest, raw: String },
}

/// The decision's facts for the access log (filter state), as the ext_authz service puts
/// them in dynamic metadata.
pub type Facts = Vec<(&'static str, String)>;

/// What the sidecar answered for a token this request waited for.
pub type Verified = (TokenDigest, Result<Arc<VerifiedToken>, Denied>);

/// The denial when the sidecar could not verify a token (unreachable, timed out, an
/// answer that makes no sense): as the sidecar itself answers without keys.
pub fn sidecar_unavailable() -> Denied {
    Denied::new(
        DenyReason::KeysUnavailable,
        "the token could not be verified now (the authorization sidecar did not answer); retry shortly",
    )
}

/// The request's headers as the core reads them. A value that is not UTF-8 (Envoy lets
/// bytes 0x80-0xff through) is read with U+FFFD in place of the bad bytes, as the sidecar
/// reads Envoy's `raw_value`, so it is judged (no token, a malformed one, a header
/// mismatch) rather than refused apart.
pub fn request_headers(raw: Vec<(String, Vec<u8>)>) -> Vec<(String, String)> {
    raw.into_iter()
        .map(|(name, value)| {
            let value = match String::from_utf8(value) {
                Ok(text) => text,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            };
            (name, value)
        })
        .collect()
}

/// Decides one request. `feed` is `None` before the first snapshot. `verified` is the
/// sidecar's answer for this request's token, when it waited for one; a success goes
/// into `cache`.
// A Vec, not a slice: the core reads headers through `&dyn Headers`, which a slice (unsized)
// cannot be cast to.
#[allow(clippy::ptr_arg)]
pub fn step(
    feed: Option<&CompiledFeed>,
    cache: &mut VerifiedCache,
    headers: &Vec<(String, String)>,
    now: SystemTime,
    verified: Option<Verified>,
) -> Step {
    let Some(feed) = feed else {
        let denied = Denied::new(
            DenyReason::KeysUnavailable,
            "the authorization filter has no configuration from its sidecar yet; retry shortly",
        );
        return answer(Decision::Deny(denied));
    };
    let unix = unix_seconds(now);
    let leeway = i64::try_from(feed.snapshot.config.tokens.leeway.as_secs()).unwrap_or(i64::MAX);
    if let Some((key, Ok(token))) = &verified {
        cache.insert(*key, Arc::clone(token), unix, leeway);
    }
    let pseudo = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    };
    let req = Request {
        method: pseudo(":method"),
        path: pseudo(":path"),
        headers,
    };
    let lookup = Lookup {
        feed,
        cache: RefCell::new(cache),
        now: unix,
        verified: &verified,
        asked: RefCell::new(None),
    };
    match decide_verified(&feed.snapshot, &req, now, &lookup) {
        Outcome::Decided(decision) => answer(decision),
        Outcome::NeedsVerification => match lookup.asked.into_inner() {
            Some(raw) => Step::Verify {
                digest: digest(&raw),
                raw,
            },
            // decide_verified asks only through lookup; should it not have, deny rather than pass.
            None => answer(Decision::Deny(sidecar_unavailable())),
        },
    }
}

struct Lookup<'a> {
    feed: &'a CompiledFeed,
    cache: RefCell<&'a mut VerifiedCache>,
    now: i64,
    verified: &'a Option<Verified>,
    /// The token asked for and not known.
    asked: RefCell<Option<String>>,
}

impl VerifiedTokens for Lookup<'_> {
    fn lookup(&self, raw: &str) -> Option<Result<Arc<VerifiedToken>, Denied>> {
        let key = digest(raw);
        if let Some(token) = self.cache.borrow_mut().get(&key, self.feed, self.now) {
            return Some(Ok(token));
        }
        if let Some((answered, outcome)) = self.verified
            && *answered == key
        {
            return Some(outcome.clone());
        }
        *self.asked.borrow_mut() = Some(raw.to_string());
        None
    }
}

fn answer(decision: Decision) -> Step {
    match &decision {
        Decision::Deny(denied) => {
            let mut facts = vec![("decision", "deny".to_string())];
            facts.push(("reason", denied.reason.as_str().to_string()));
            if let Some(backend) = &denied.backend {
                facts.push(("backend", backend.to_string()));
            }
            Step::Deny {
                response: DenyResponse::of(denied),
                facts,
            }
        }
        Decision::Allow(allowed) => {
            let kind = if allowed.dry_run.is_some() {
                "dry_run"
            } else {
                "allow"
            };
            let mut facts = vec![
                ("decision", kind.to_string()),
                ("backend", allowed.backend.to_string()),
            ];
            if let Some(denied) = &allowed.dry_run {
                facts.push(("reason", denied.reason.as_str().to_string()));
            }
            if let Some(identity) = &allowed.identity {
                facts.push(("subject", identity.subject.clone()));
                facts.push(("issuer", identity.issuer.to_string()));
                facts.push(("scopes", identity.scopes.join(" ")));
                if let Some(up) = &identity.unit_primitive {
                    facts.push(("unit_primitive", up.clone()));
                }
                if let Some(jti) = &identity.jti {
                    facts.push(("jti", jti.clone()));
                }
            }
            Step::Allow {
                headers: UpstreamHeaders::of(allowed),
                facts,
            }
        }
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
