//! `decide(&Snapshot, &Request, now) -> Decision`: the pure core. No I/O, no locks,
//! no tonic types. The gRPC layer loads the current [`Snapshot`] once per request and
//! converts the [`Decision`].
//!
//! The checks run in the order of DESIGN.md's decision table and the first failure
//! decides: route → token present → algorithm → issuer → issuer's keys loaded → key id →
//! signature → time → audience → instance headers → user tokens → scopes → header-named
//! unit primitive → minimum GitLab version. A backend in `mode: dry_run` turns a denial
//! (after routing) into an allow that carries it.

use std::borrow::Cow;
use std::cell::RefCell;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::Algorithm;

use crate::algorithm::parse_algorithm;
use crate::config::{Backend, Config, Mode};
use crate::decision::{
    Allowed, Claimed, Decision, Denied, DenyReason, ForwardedHeader, HeaderValue, Identity,
    Request, claim_fits_header, scope_fits_header,
};
use crate::keys::{KeySnapshot, canonical_issuer};
use crate::registry::{GitlabVersion, UnitPrimitive};
use crate::route::{Access, normalize_path};
use crate::token::{self, Claims, JoseHeader};
use crate::token_cache::{TokenCache, VerifiedToken};
use crate::verify;

/// Everything a decision reads, swapped in whole: keys by the refresh tasks, the
/// configuration by reloads. Readers load it once per request.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub keys: Arc<KeySnapshot>,
}

impl Snapshot {
    pub fn new(config: Arc<Config>, keys: Arc<KeySnapshot>) -> Self {
        Self { config, keys }
    }
}

/// Decides without a token cache: every token's signature is verified.
pub fn decide(snapshot: &Snapshot, req: &Request<'_>, now: SystemTime) -> Decision {
    decide_cached(snapshot, req, now, TokenCache::disabled())
}

/// What [`decide`] looked at on its way to a decision, filled by [`decide_traced`] as
/// the checks run: `explain` prints this, so it describes the decision that was made and
/// never a second walk of the pipeline. A field is `None` when the decision was made
/// before that step (or the step did not apply).
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// The path once decoded and normalized.
    pub path: Option<String>,
    /// The token's decoded JOSE header.
    pub header: Option<JoseHeader>,
    /// The token's claims as read (before the signature is checked, so that a denial
    /// can show what the token said).
    pub claims: Option<Claims>,
    /// The configured issuer the token named.
    pub issuer: Option<Arc<str>>,
    /// The key lookup and signature check against that issuer's current keys: the
    /// fingerprint of the key that verified it, or why none did.
    pub key: Option<Result<u64, DenyReason>>,
    /// The unit primitive check, when the decision reached it.
    pub scopes: Option<ScopeTrace>,
}

/// The unit primitives a route needed and the token held, as [`decide`] compared them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScopeTrace {
    /// Every one of these must be held: the route's `require`, and the unit primitive
    /// named by the request's header on routes that read one.
    pub needed: Vec<String>,
    /// At least one of these must be held (the route's `require_any`; empty if none).
    pub any_of: Vec<String>,
    /// The token's `scopes`.
    pub held: Vec<String>,
    /// What the token lacks: the needed ones it does not hold, and all of `any_of` when
    /// it holds none of them.
    pub missing: Vec<String>,
}

/// [`decide`], recording each step it took in a [`Trace`]. The decision is [`decide`]'s.
pub fn decide_traced(snapshot: &Snapshot, req: &Request<'_>, now: SystemTime) -> (Decision, Trace) {
    let trace = RefCell::new(Trace::default());
    let decision = match run(
        snapshot,
        req,
        now,
        TokenCache::disabled(),
        Some(&trace),
        verify_here,
    ) {
        Ok(decision) => decision,
        Err(never) => match never {},
    };
    (decision, trace.into_inner())
}

/// Decides, reusing the verification of a token that `cache` holds (and adding a newly
/// verified one to it). The decision is the same as [`decide`]'s: a hit only skips parsing
/// and the signature, and only while the key that verified it is still the issuer's.
pub fn decide_cached(
    snapshot: &Snapshot,
    req: &Request<'_>,
    now: SystemTime,
    cache: &TokenCache,
) -> Decision {
    match run(snapshot, req, now, cache, None, verify_here) {
        Ok(decision) => decision,
        Err(never) => match never {},
    }
}

/// The signature stage as [`decide`] runs it: a token `check`'s cache holds, else its
/// signature verified with the snapshot's keys.
fn verify_here(
    check: &TokenCheck<'_>,
    raw: &str,
    leeway: i64,
) -> Result<Result<Arc<VerifiedToken>, Denied>, Infallible> {
    Ok(
        match check
            .cache
            .get(raw, check.config, &check.snapshot.keys, check.now)
        {
            Some(verified) => Ok(verified),
            None => check.verify_signature(raw, leeway),
        },
    )
}

/// Where [`decide_verified`] gets the verification of a bearer token from, when the
/// signature is checked somewhere else (the proxy-wasm filter asks the sidecar).
pub trait VerifiedTokens {
    /// The outcome of verifying `raw` (the bearer token, as the request carries it):
    /// `None` when it has not been verified yet, else the verified token or the denial
    /// that verifying it gave (see [`verify_token`]).
    fn lookup(&self, raw: &str) -> Option<Result<Arc<VerifiedToken>, Denied>>;
}

/// What [`decide_verified`] comes to.
// Returned and matched at once, like `Decision` itself; a box would cost an allocation a request.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Decided(Decision),
    /// The request needs its bearer token verified, which `tokens` does not know yet:
    /// verify it (with [`verify_token`], where the keys are) and decide again.
    NeedsVerification,
}

/// Decides as [`decide`] does, except that the signature stage (token structure,
/// algorithm, issuer, the issuer's keys, the signature) is not run here: its outcome comes
/// from `tokens`. Every other check (path, route, time window, audience, instance headers,
/// user tokens, scopes, the header-named unit primitive, the minimum version,
/// `forward_claims`, dry run) is the same code as [`decide`]'s, so for the outcome of
/// [`verify_token`] on the same snapshot the decision is the same. `snapshot.keys` is not
/// read (the filter holds no keys).
pub fn decide_verified(
    snapshot: &Snapshot,
    req: &Request<'_>,
    now: SystemTime,
    tokens: &dyn VerifiedTokens,
) -> Outcome {
    let obtain = |_: &TokenCheck<'_>, raw: &str, _: i64| tokens.lookup(raw).ok_or(());
    match run(snapshot, req, now, TokenCache::disabled(), None, obtain) {
        Ok(decision) => Outcome::Decided(decision),
        Err(()) => Outcome::NeedsVerification,
    }
}

/// The signature stage alone, for a token without a request: the token's size (`max_bytes`)
/// and structure, its algorithm, its issuer, that issuer's keys and the key that verifies
/// it. Denials are those [`decide`] gives at these steps (an unknown `kid` sets
/// `refresh_issuer`). The time window is not checked here: [`decide_verified`] checks it.
pub fn verify_token(
    snapshot: &Snapshot,
    raw: &str,
    now: SystemTime,
) -> Result<Arc<VerifiedToken>, Denied> {
    let settings = &snapshot.config.tokens;
    // The same size and shape rules as a bearer header.
    let header = vec![("authorization", format!("Bearer {raw}"))];
    let raw =
        token::bearer(&header, settings.max_bytes).map_err(|e| denied(e.reason, e.message))?;
    let leeway = i64::try_from(settings.leeway.as_secs()).unwrap_or(i64::MAX);
    SignatureCheck {
        snapshot,
        config: &snapshot.config,
        now: unix_seconds(now),
        cache: TokenCache::disabled(),
        trace: None,
    }
    .verify_signature(raw, leeway)
}

/// The decision, with the signature stage supplied by `obtain`, which may give up
/// (`Err(P)`: the decision cannot be made yet).
fn run<P>(
    snapshot: &Snapshot,
    req: &Request<'_>,
    now: SystemTime,
    cache: &TokenCache,
    trace: Option<&RefCell<Trace>>,
    obtain: impl FnOnce(&TokenCheck<'_>, &str, i64) -> Result<Result<Arc<VerifiedToken>, Denied>, P>,
) -> Result<Decision, P> {
    let config = &*snapshot.config;
    let path = match normalize_path(req.path) {
        Ok(path) => path,
        Err(e) => return Ok(Decision::deny(DenyReason::BadPath, e.message())),
    };
    if let Some(trace) = trace {
        trace.borrow_mut().path = Some(path.to_string());
    }
    let Some(route_index) = config.routes.find_index(&path, req.method) else {
        return Ok(Decision::deny(
            DenyReason::NoRoute,
            "no route of this service matches the request's path and method",
        ));
    };
    let route = &config.routes.routes()[route_index];
    let backend = &config.backends[route.backend];
    let access = match &route.access {
        Access::Public => {
            return Ok(Decision::Allow(Allowed {
                backend: backend.name.clone(),
                route: Some(route_index),
                identity: None,
                dry_run: None,
                removed_headers: forward_headers(backend),
            }));
        }
        Access::Token {
            require,
            require_any,
            user_tokens,
            unit_primitive_header,
        } => RouteNeeds {
            require,
            require_any,
            user_tokens: *user_tokens,
            unit_primitive_header: unit_primitive_header.as_deref(),
        },
    };
    let check = TokenCheck {
        snapshot,
        config,
        req,
        backend,
        now: unix_seconds(now),
        cache,
        trace,
    };
    Ok(match check.run(&access, obtain)? {
        Ok(mut identity) => {
            // The deprecated unit primitives of the route that this token relied on: all
            // of `require`, and those of `require_any` that it holds.
            let held = |name: &&Arc<str>| identity.scopes.iter().any(|s| *s == ***name);
            let relied: Vec<Arc<str>> = route.deprecated.iter().filter(held).cloned().collect();
            identity.deprecated.extend(relied);
            Decision::Allow(Allowed {
                backend: backend.name.clone(),
                route: Some(route_index),
                identity: Some(identity),
                dry_run: None,
                removed_headers: Vec::new(),
            })
        }
        Err(mut denied) => {
            denied.backend = Some(backend.name.clone());
            denied.route = Some(route_index);
            if backend.mode == Mode::DryRun {
                return Ok(Decision::Allow(Allowed {
                    backend: backend.name.clone(),
                    route: Some(route_index),
                    identity: None,
                    dry_run: Some(Box::new(denied)),
                    removed_headers: forward_headers(backend),
                }));
            }
            Decision::Deny(denied)
        }
    })
}

fn forward_headers(backend: &Backend) -> Vec<Box<str>> {
    backend
        .forward_claims
        .iter()
        .map(|f| f.header.clone())
        .collect()
}

/// What a token route asks of a request (the fields of [`Access::Token`]).
struct RouteNeeds<'r> {
    require: &'r [Arc<str>],
    require_any: &'r [Arc<str>],
    user_tokens: bool,
    unit_primitive_header: Option<&'r str>,
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn denied(reason: DenyReason, message: impl Into<Cow<'static, str>>) -> Denied {
    Denied::new(reason, message)
}

/// What a deny's log line names from the claims of a verified token (copied: the
/// cached verification is shared).
fn claimed(verified: &VerifiedToken) -> Option<Box<Claimed>> {
    Some(Box::new(Claimed {
        issuer: verified.iss().map(str::to_string),
        subject: verified.sub().map(str::to_string),
        jti: verified.jti().map(str::to_string),
    }))
}

/// [`claimed`], taking claims the decision owns and drops anyway.
fn claimed_owned(claims: Claims) -> Option<Box<Claimed>> {
    Some(Box::new(Claimed {
        issuer: claims.iss,
        subject: claims.sub,
        jti: claims.jti,
    }))
}

struct TokenCheck<'a> {
    snapshot: &'a Snapshot,
    config: &'a Config,
    req: &'a Request<'a>,
    backend: &'a Backend,
    now: i64,
    cache: &'a TokenCache,
    /// Where `decide_traced` records the steps; `None` on the request path.
    trace: Option<&'a RefCell<Trace>>,
}

impl TokenCheck<'_> {
    /// Records a step when tracing (`explain`); nothing otherwise.
    fn note(&self, step: impl FnOnce(&mut Trace)) {
        if let Some(trace) = self.trace {
            step(&mut trace.borrow_mut());
        }
    }

    /// The token checks; `obtain` gives the verified token (or the signature stage's
    /// denial), or gives up with `Err(P)`.
    fn run<P>(
        &self,
        needs: &RouteNeeds<'_>,
        obtain: impl FnOnce(&Self, &str, i64) -> Result<Result<Arc<VerifiedToken>, Denied>, P>,
    ) -> Result<Result<Identity, Denied>, P> {
        let settings = &self.config.tokens;
        let raw = match token::bearer(self.req.headers, settings.max_bytes) {
            Ok(raw) => raw,
            Err(e) => return Ok(Err(denied(e.reason, e.message))),
        };
        let leeway = i64::try_from(settings.leeway.as_secs()).unwrap_or(i64::MAX);
        let verified = match obtain(self, raw, leeway)? {
            Ok(verified) => verified,
            Err(d) => return Ok(Err(d)),
        };
        self.note(|t| {
            if t.claims.is_none() {
                t.claims = Some(verified.claims());
            }
        });
        Ok(self
            .check_verified(raw, &verified, needs, leeway)
            .map_err(|mut d| {
                d.claimed = claimed(&verified);
                d
            }))
    }

    fn verify_signature(&self, raw: &str, leeway: i64) -> Result<Arc<VerifiedToken>, Denied> {
        SignatureCheck {
            snapshot: self.snapshot,
            config: self.config,
            now: self.now,
            cache: self.cache,
            trace: self.trace,
        }
        .verify_signature(raw, leeway)
    }

    /// The checks after the signature, which a cached token and a freshly verified one
    /// take alike.
    fn check_verified(
        &self,
        raw: &str,
        verified: &VerifiedToken,
        needs: &RouteNeeds<'_>,
        leeway: i64,
    ) -> Result<Identity, Denied> {
        verify::time_window(verified.validity(), self.now, leeway)
            .map_err(|e| denied(e.reason, e.message))?;
        verify::audience(verified.audience(), &self.backend.audience)
            .map_err(|e| denied(e.reason, e.message))?;
        let scopes = verified.scopes().unwrap_or_default();
        if !verified.sub().is_none_or(claim_fits_header)
            || !scopes.iter().all(|s| scope_fits_header(s))
        {
            return Err(denied(
                DenyReason::MalformedToken,
                "the token's sub or a scope has a control character or a scope has a space, so it cannot be passed on in a header",
            ));
        }
        let iss = verified.iss().unwrap_or_default();
        // A user token is one the backend minted itself: its issuer is the backend's audience.
        let user_token = canonical_issuer(iss) == &*self.backend.audience;
        self.instance_headers(verified, user_token)?;
        if user_token && !needs.user_tokens {
            return Err(denied(
                DenyReason::UserTokenRefused,
                "this path accepts only tokens issued to a GitLab instance, not user tokens",
            ));
        }
        let holds = |up: &str| scopes.iter().any(|s| **s == *up);
        self.note(|t| t.scopes = Some(self.scope_trace(needs, scopes)));
        if let Some(missing) = needs.require.iter().find(|up| !holds(up)) {
            return Err(denied(
                DenyReason::InsufficientScope,
                format!("the token does not grant the unit primitive {missing}"),
            ));
        }
        let any_held = needs.require_any.iter().find(|up| holds(up));
        if !needs.require_any.is_empty() && any_held.is_none() {
            return Err(denied(
                DenyReason::InsufficientScope,
                format!(
                    "the token grants none of the unit primitives {}",
                    needs.require_any.join(", ")
                ),
            ));
        }
        let named_up = match needs.unit_primitive_header {
            Some(header) => Some(self.named_unit_primitive(header, scopes)?),
            None => None,
        };
        let named = named_up.map(|up| up.name.as_str());
        if self.config.enforce_min_version {
            self.min_version(
                needs
                    .require
                    .iter()
                    .chain(any_held)
                    .map(|up| &**up)
                    .chain(named),
            )?;
        }
        let forwarded = self.forwarded_claims(raw)?;
        let named_deprecated = named_up
            .filter(|up| up.deprecation.is_some())
            .map(|up| up.name.as_str());
        Ok(Identity {
            subject: verified.sub().unwrap_or_default().to_string(),
            issuer: verified.issuer.clone(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            jti: verified.jti().map(str::to_string),
            unit_primitive: named.map(str::to_string),
            deprecated: named_deprecated.map(Arc::from).into_iter().collect(),
            forwarded,
        })
    }

    /// The backend's `forward_claims`, read from the verified token's payload (only
    /// when the backend forwards any: most do not, and pay nothing).
    fn forwarded_claims(&self, raw: &str) -> Result<Vec<ForwardedHeader>, Denied> {
        let forward = &self.backend.forward_claims;
        if forward.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<&str> = forward.iter().map(|f| &*f.claim).collect();
        let values = token::claim_values(raw, &names).map_err(|e| denied(e.reason, e.message))?;
        Ok(forward
            .iter()
            .zip(values)
            .map(|(f, value)| ForwardedHeader {
                header: f.header.clone(),
                value,
            })
            .collect())
    }
}

/// The signature stage (what a cache hit skips), apart from any request.
struct SignatureCheck<'a> {
    snapshot: &'a Snapshot,
    config: &'a Config,
    now: i64,
    cache: &'a TokenCache,
    trace: Option<&'a RefCell<Trace>>,
}

impl SignatureCheck<'_> {
    /// Records a step when tracing (`explain`); nothing otherwise.
    fn note(&self, step: impl FnOnce(&mut Trace)) {
        if let Some(trace) = self.trace {
            step(&mut trace.borrow_mut());
        }
    }

    /// The checks a cache hit skips, in the table's order: the token's structure, its
    /// algorithm, its issuer, that issuer's keys and the signature. A token that passes
    /// them, and is not expired, goes into the cache.
    fn verify_signature(&self, raw: &str, leeway: i64) -> Result<Arc<VerifiedToken>, Denied> {
        let settings = &self.config.tokens;
        let token = token::split(raw).map_err(|e| denied(e.reason, e.message))?;
        self.note(|t| {
            t.header = Some(token.header.clone());
            t.claims = token.claims().ok();
        });
        let alg = parse_algorithm(&token.header.alg)
            .ok()
            .filter(|alg| settings.algorithms.contains(alg))
            .ok_or_else(|| {
                let mut d = denied(
                    DenyReason::UnsupportedAlgorithm,
                    "the token's signing algorithm is not accepted",
                );
                // Read for the log line only: the algorithm decided before the claims.
                d.claimed = token.claims().ok().and_then(claimed_owned);
                d
            })?;
        let claims = token.claims().map_err(|e| denied(e.reason, e.message))?;
        match self.issuer_key(&token, alg, &claims) {
            Ok((issuer, fingerprint)) => {
                let verified = VerifiedToken::new(
                    claims,
                    issuer,
                    alg,
                    token.header.kid.as_deref(),
                    fingerprint,
                );
                // A token already outside its time window would only be dropped on its next hit.
                if verify::time_window(verified.validity(), self.now, leeway).is_ok() {
                    Ok(self.cache.insert(raw, verified))
                } else {
                    Ok(Arc::new(verified))
                }
            }
            Err(mut d) => {
                d.claimed = claimed_owned(claims);
                Err(d)
            }
        }
    }

    /// The token's configured issuer and the fingerprint of the issuer's key that verifies
    /// its signature.
    fn issuer_key(
        &self,
        token: &token::UnverifiedToken<'_>,
        alg: Algorithm,
        claims: &Claims,
    ) -> Result<(Arc<str>, u64), Denied> {
        let iss = claims
            .iss
            .as_deref()
            .ok_or_else(|| denied(DenyReason::UnknownIssuer, "the token has no issuer (iss)"))?;
        let issuer = self.config.issuer(iss).ok_or_else(|| {
            denied(
                DenyReason::UnknownIssuer,
                "the token's issuer is not trusted by this service",
            )
        })?;
        self.note(|t| t.issuer = Some(issuer.name.clone()));
        let keys = self.snapshot.keys.get(&issuer.name).ok_or_else(|| {
            denied(
                DenyReason::KeysUnavailable,
                "the keys of the token's issuer are not loaded yet; retry shortly",
            )
        })?;
        let key = verify::signature(token, alg, keys);
        self.note(|t| t.key = Some(key.as_ref().map(|k| k.fingerprint).map_err(|e| e.reason)));
        let key = key.map_err(|e| {
            let mut d = denied(e.reason, e.message);
            if e.reason == DenyReason::UnknownKey {
                d.refresh_issuer = Some(issuer.name.clone());
            }
            d
        })?;
        Ok((issuer.name.clone(), key.fingerprint))
    }
}

impl TokenCheck<'_> {
    /// The unit primitives `needs` asks of a token that holds `scopes`, for the trace.
    fn scope_trace(&self, needs: &RouteNeeds<'_>, scopes: &[Box<str>]) -> ScopeTrace {
        let holds = |up: &str| scopes.iter().any(|s| **s == *up);
        let mut needed: Vec<String> = needs.require.iter().map(|up| up.to_string()).collect();
        if let Some(header) = needs.unit_primitive_header
            && let Some(named) = self.req.headers.get(header).one().map(str::trim)
            && !named.is_empty()
        {
            needed.push(named.to_string());
        }
        let any_of: Vec<String> = needs.require_any.iter().map(|up| up.to_string()).collect();
        let mut missing: Vec<String> = needed.iter().filter(|up| !holds(up)).cloned().collect();
        if !any_of.iter().any(|up| holds(up)) {
            missing.extend(any_of.iter().cloned());
        }
        ScopeTrace {
            needed,
            any_of,
            held: scopes.iter().map(|s| s.to_string()).collect(),
            missing,
        }
    }

    /// The instance headers must agree with the claims that are set (as the AI gateway
    /// checks them: a null or empty claim is not set); a missing header then counts as a
    /// mismatch. `x-gitlab-authentication-type: oidc` is always required.
    fn instance_headers(&self, verified: &VerifiedToken, user_token: bool) -> Result<(), Denied> {
        fn set(claim: Option<&str>) -> Option<&str> {
            claim.filter(|v| !v.is_empty())
        }
        let headers = self.req.headers;
        let must_equal =
            |name: &'static str, expected: &str, message: &'static str| match headers.get(name) {
                HeaderValue::One(v) if v == expected => Ok(()),
                _ => Err(denied(DenyReason::HeaderMismatch, message)),
            };
        if let Some(realm) = set(verified.gitlab_realm()) {
            must_equal(
                "x-gitlab-realm",
                realm,
                "the X-Gitlab-Realm header does not match the token",
            )?;
        }
        if let Some(instance) = set(verified.gitlab_instance_id()) {
            must_equal(
                "x-gitlab-instance-id",
                instance,
                "the X-Gitlab-Instance-Id header does not match the token",
            )?;
        }
        match (set(verified.sub()), user_token) {
            (Some(sub), true) => must_equal(
                "x-gitlab-global-user-id",
                sub,
                "the X-Gitlab-Global-User-Id header does not match the token's subject",
            )?,
            (None, true) => {
                return Err(denied(
                    DenyReason::HeaderMismatch,
                    "the user token has no subject to match X-Gitlab-Global-User-Id",
                ));
            }
            (Some(sub), false) => must_equal(
                "x-gitlab-instance-id",
                sub,
                "the X-Gitlab-Instance-Id header does not match the token's subject",
            )?,
            (None, false) => {}
        }
        match headers.get("x-gitlab-authentication-type") {
            HeaderValue::One("oidc") => Ok(()),
            HeaderValue::Absent => Err(denied(
                DenyReason::HeaderMismatch,
                "the request has no X-Gitlab-Authentication-Type header; GitLab instances send oidc",
            )),
            _ => Err(denied(
                DenyReason::HeaderMismatch,
                "the X-Gitlab-Authentication-Type header must be oidc",
            )),
        }
    }

    /// On routes where the request names its unit primitive in a header, that name must
    /// be a known unit primitive and be granted by the token.
    fn named_unit_primitive<'s>(
        &'s self,
        header: &str,
        scopes: &[Box<str>],
    ) -> Result<&'s UnitPrimitive, Denied> {
        let name = self
            .req
            .headers
            .get(header)
            .one()
            .map(str::trim)
            .unwrap_or("");
        if name.is_empty() {
            return Err(denied(
                DenyReason::BadUnitPrimitive,
                format!("the request must name its unit primitive in the {header} header"),
            ));
        }
        let known = self
            .config
            .registry
            .as_deref()
            .and_then(|r| r.unit_primitive(name));
        let Some(up) = known else {
            return Err(denied(
                DenyReason::BadUnitPrimitive,
                format!("the {header} header does not name a known unit primitive"),
            ));
        };
        // When the registry says which backend services deliver it, this one must be one.
        if let Some(service) = self.backend.backend_service.as_deref()
            && !up.backend_services.is_empty()
            && !up.backend_services.iter().any(|b| b == service)
        {
            return Err(denied(
                DenyReason::BadUnitPrimitive,
                format!(
                    "the {header} header names a unit primitive that this backend does not deliver"
                ),
            ));
        }
        if !scopes.iter().any(|s| **s == *up.name) {
            return Err(denied(
                DenyReason::InsufficientScope,
                format!("the token does not grant the unit primitive {}", up.name),
            ));
        }
        Ok(up)
    }

    fn min_version<'u>(
        &self,
        unit_primitives: impl Iterator<Item = &'u str>,
    ) -> Result<(), Denied> {
        let Some(registry) = self.config.registry.as_deref() else {
            return Ok(());
        };
        let sent = self
            .req
            .headers
            .get("x-gitlab-version")
            .one()
            .map(str::trim);
        for name in unit_primitives {
            let Some(min) = registry
                .unit_primitive(name)
                .and_then(|up| up.min_gitlab_version.as_ref())
            else {
                continue;
            };
            let version = sent.and_then(|v| v.parse::<GitlabVersion>().ok());
            match version {
                Some(v) if v >= *min => {}
                Some(_) => {
                    return Err(denied(
                        DenyReason::VersionTooOld,
                        format!("{name} needs GitLab {min} or later"),
                    ));
                }
                None => {
                    return Err(denied(
                        DenyReason::VersionTooOld,
                        format!(
                            "{name} needs GitLab {min} or later, and the request has no valid X-Gitlab-Version header"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
