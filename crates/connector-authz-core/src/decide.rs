//! `decide(&Snapshot, &Request, now) -> Decision`: the pure core. No I/O, no locks,
//! no tonic types. The gRPC layer loads the current [`Snapshot`] once per request and
//! converts the [`Decision`].
//!
//! The checks run in the order of DESIGN.md's decision table and the first failure
//! decides: route → token present → algorithm → issuer → issuer's keys loaded → key id →
//! signature → time → audience → instance headers → scopes → header-named unit primitive
//! → minimum GitLab version.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::algorithm::parse_algorithm;
use crate::config::{Backend, Config};
use crate::decision::{Allowed, Decision, Denied, DenyReason, HeaderValue, Identity, Request};
use crate::keys::{KeySnapshot, canonical_issuer};
use crate::registry::{GitlabVersion, UnitPrimitive};
use crate::route::{Access, normalize_path};
use crate::token::{self, Claims};
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

/// Decides, reusing the verification of a token that `cache` holds (and adding a newly
/// verified one to it). The decision is the same as [`decide`]'s: a hit only skips parsing
/// and the signature, and only while the key that verified it is still the issuer's.
pub fn decide_cached(
    snapshot: &Snapshot,
    req: &Request<'_>,
    now: SystemTime,
    cache: &TokenCache,
) -> Decision {
    let config = &*snapshot.config;
    let path = match normalize_path(req.path) {
        Ok(path) => path,
        Err(e) => return Decision::deny(DenyReason::BadPath, e.message()),
    };
    let Some(route) = config.routes.find(&path, req.method) else {
        return Decision::deny(
            DenyReason::NoRoute,
            "no route of this service matches the request's path and method",
        );
    };
    let backend = &config.backends[route.backend];
    let (require, unit_primitive_header) = match &route.access {
        Access::Public => {
            return Decision::Allow(Allowed {
                backend: backend.name.clone(),
                identity: None,
            });
        }
        Access::Token {
            require,
            unit_primitive_header,
        } => (require, unit_primitive_header.as_deref()),
    };
    let check = TokenCheck {
        snapshot,
        config,
        req,
        backend,
        now: unix_seconds(now),
        cache,
    };
    match check.run(require, unit_primitive_header) {
        Ok(mut identity) => {
            identity.deprecated.extend(route.deprecated.iter().cloned());
            Decision::Allow(Allowed {
                backend: backend.name.clone(),
                identity: Some(identity),
            })
        }
        Err(mut denied) => {
            denied.backend = Some(backend.name.clone());
            Decision::Deny(denied)
        }
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn denied(reason: DenyReason, message: impl Into<Cow<'static, str>>) -> Denied {
    Denied {
        reason,
        message: message.into(),
        backend: None,
        refresh_issuer: None,
    }
}

struct TokenCheck<'a> {
    snapshot: &'a Snapshot,
    config: &'a Config,
    req: &'a Request<'a>,
    backend: &'a Backend,
    now: i64,
    cache: &'a TokenCache,
}

impl TokenCheck<'_> {
    fn run(
        &self,
        require: &[Arc<str>],
        unit_primitive_header: Option<&str>,
    ) -> Result<Identity, Denied> {
        let settings = &self.config.tokens;
        let raw = token::bearer(self.req.headers, settings.max_bytes)
            .map_err(|e| denied(e.reason, e.message))?;
        let leeway = i64::try_from(settings.leeway.as_secs()).unwrap_or(i64::MAX);
        let verified = match self
            .cache
            .get(raw, self.config, &self.snapshot.keys, self.now)
        {
            Some(verified) => verified,
            None => self.verify_signature(raw, leeway)?,
        };
        // From here on, a cached token and a freshly verified one take the same path.
        let claims = &verified.claims;
        verify::time_window(claims, self.now, leeway).map_err(|e| denied(e.reason, e.message))?;
        verify::audience(claims, &self.backend.audience)
            .map_err(|e| denied(e.reason, e.message))?;
        let iss = claims.iss.as_deref().unwrap_or_default();
        self.instance_headers(claims, canonical_issuer(iss))?;
        let scopes = claims.scopes.as_deref().unwrap_or_default();
        if let Some(missing) = require
            .iter()
            .find(|up| !scopes.iter().any(|s| s == &***up))
        {
            return Err(denied(
                DenyReason::InsufficientScope,
                format!("the token does not grant the unit primitive {missing}"),
            ));
        }
        let named_up = match unit_primitive_header {
            Some(header) => Some(self.named_unit_primitive(header, scopes)?),
            None => None,
        };
        let named = named_up.map(|up| up.name.as_str());
        if self.config.enforce_min_version {
            self.min_version(require.iter().map(|up| &**up).chain(named))?;
        }
        let named_deprecated = named_up
            .filter(|up| up.deprecation.is_some())
            .map(|up| up.name.as_str());
        Ok(Identity {
            subject: claims.sub.clone().unwrap_or_default(),
            issuer: verified.issuer.clone(),
            scopes: scopes.to_vec(),
            jti: claims.jti.clone(),
            unit_primitive: named.map(str::to_string),
            deprecated: named_deprecated.map(Arc::from).into_iter().collect(),
        })
    }

    /// The checks a cache hit skips, in the table's order: the token's structure, its
    /// algorithm, its issuer, that issuer's keys and the signature. A token that passes
    /// them, and is not expired, goes into the cache.
    fn verify_signature(&self, raw: &str, leeway: i64) -> Result<Arc<VerifiedToken>, Denied> {
        let settings = &self.config.tokens;
        let token = token::split(raw).map_err(|e| denied(e.reason, e.message))?;
        let alg = parse_algorithm(&token.header.alg)
            .ok()
            .filter(|alg| settings.algorithms.contains(alg))
            .ok_or_else(|| {
                denied(
                    DenyReason::UnsupportedAlgorithm,
                    "the token's signing algorithm is not accepted",
                )
            })?;
        let claims = token.claims().map_err(|e| denied(e.reason, e.message))?;
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
        let keys = self.snapshot.keys.get(&issuer.name).ok_or_else(|| {
            denied(
                DenyReason::KeysUnavailable,
                "the keys of the token's issuer are not loaded yet; retry shortly",
            )
        })?;
        let key = verify::signature(&token, alg, keys).map_err(|e| {
            let mut d = denied(e.reason, e.message);
            if e.reason == DenyReason::UnknownKey {
                d.refresh_issuer = Some(issuer.name.clone());
            }
            d
        })?;
        let verified = Arc::new(VerifiedToken::new(
            claims,
            issuer.name.clone(),
            alg,
            token.header.kid.as_deref(),
            key.fingerprint,
        ));
        // A token already outside its time window would only be dropped on its next hit.
        if verify::time_window(&verified.claims, self.now, leeway).is_ok() {
            self.cache.insert(raw, Arc::clone(&verified));
        }
        Ok(verified)
    }

    /// The instance headers must agree with the claims that are set (as the AI gateway
    /// checks them); a missing header then counts as a mismatch.
    fn instance_headers(&self, claims: &Claims, iss: &str) -> Result<(), Denied> {
        let headers = self.req.headers;
        let must_equal =
            |name: &'static str, expected: &str, message: &'static str| match headers.get(name) {
                HeaderValue::One(v) if v == expected => Ok(()),
                _ => Err(denied(DenyReason::HeaderMismatch, message)),
            };
        if let Some(realm) = &claims.gitlab_realm {
            must_equal(
                "x-gitlab-realm",
                realm,
                "the X-Gitlab-Realm header does not match the token",
            )?;
        }
        if let Some(instance) = &claims.gitlab_instance_id {
            must_equal(
                "x-gitlab-instance-id",
                instance,
                "the X-Gitlab-Instance-Id header does not match the token",
            )?;
        }
        // A user token is one the backend minted itself: its issuer is the backend's audience.
        let user_token = iss == &*self.backend.audience;
        match (&claims.sub, user_token) {
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
            HeaderValue::Absent => Ok(()),
            HeaderValue::One("oidc") => Ok(()),
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
        scopes: &[String],
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
        if !scopes.iter().any(|s| s == &up.name) {
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
