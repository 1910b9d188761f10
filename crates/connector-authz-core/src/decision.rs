//! The vocabulary of a check: what comes in ([`Request`]), what goes out ([`Decision`]),
//! and the one enum of deny reasons ([`DenyReason`]) used for the response body, the
//! log line and the metric label. No tonic types here: the gRPC layer converts.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

/// The value of a request header, as far as a decision cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderValue<'a> {
    Absent,
    One(&'a str),
    /// Sent more than once. Envoy's `headers` map joins repeats with a comma, so a
    /// header source cannot always tell; token extraction also treats a comma as a repeat.
    Repeated,
}

impl<'a> HeaderValue<'a> {
    pub fn one(self) -> Option<&'a str> {
        match self {
            HeaderValue::One(v) => Some(v),
            _ => None,
        }
    }
}

/// Request headers, looked up by lower-case name (HTTP/2 and Envoy lower-case them).
pub trait Headers {
    fn get(&self, name: &str) -> HeaderValue<'_>;
}

impl Headers for HashMap<String, String> {
    fn get(&self, name: &str) -> HeaderValue<'_> {
        match HashMap::get(self, name) {
            Some(v) => HeaderValue::One(v),
            None => HeaderValue::Absent,
        }
    }
}

/// Headers as an ordered list of pairs (Envoy's raw `header_map`, tests, `explain`).
/// Names are compared ASCII case-insensitively; a name present twice is `Repeated`.
impl<K: AsRef<str>, V: AsRef<str>> Headers for [(K, V)] {
    fn get(&self, name: &str) -> HeaderValue<'_> {
        let mut found = HeaderValue::Absent;
        for (k, v) in self {
            if k.as_ref().eq_ignore_ascii_case(name) {
                if found != HeaderValue::Absent {
                    return HeaderValue::Repeated;
                }
                found = HeaderValue::One(v.as_ref());
            }
        }
        found
    }
}

impl<K: AsRef<str>, V: AsRef<str>> Headers for Vec<(K, V)> {
    fn get(&self, name: &str) -> HeaderValue<'_> {
        Headers::get(self.as_slice(), name)
    }
}

/// One HTTP request to decide on, borrowed from whatever carried it.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// HTTP method, upper case as sent (`GET`, `POST`).
    pub method: &'a str,
    /// The request target as Envoy saw it: path, possibly with a query string.
    pub path: &'a str,
    pub headers: &'a dyn Headers,
}

/// Why a request was denied: one stable snake_case word each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// The path is not well formed (encoded slash, NUL, not absolute, `..` above the root).
    BadPath,
    NoRoute,
    MissingToken,
    MalformedToken,
    UnsupportedAlgorithm,
    UnknownIssuer,
    KeysUnavailable,
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    WrongAudience,
    HeaderMismatch,
    /// A user token (minted by the backend itself) on a route with `user_tokens: false`.
    UserTokenRefused,
    InsufficientScope,
    BadUnitPrimitive,
    VersionTooOld,
}

impl DenyReason {
    pub const ALL: [DenyReason; 17] = [
        DenyReason::BadPath,
        DenyReason::NoRoute,
        DenyReason::MissingToken,
        DenyReason::MalformedToken,
        DenyReason::UnsupportedAlgorithm,
        DenyReason::UnknownIssuer,
        DenyReason::KeysUnavailable,
        DenyReason::UnknownKey,
        DenyReason::BadSignature,
        DenyReason::Expired,
        DenyReason::NotYetValid,
        DenyReason::WrongAudience,
        DenyReason::HeaderMismatch,
        DenyReason::UserTokenRefused,
        DenyReason::InsufficientScope,
        DenyReason::BadUnitPrimitive,
        DenyReason::VersionTooOld,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::BadPath => "bad_path",
            DenyReason::NoRoute => "no_route",
            DenyReason::MissingToken => "missing_token",
            DenyReason::MalformedToken => "malformed_token",
            DenyReason::UnsupportedAlgorithm => "unsupported_algorithm",
            DenyReason::UnknownIssuer => "unknown_issuer",
            DenyReason::KeysUnavailable => "keys_unavailable",
            DenyReason::UnknownKey => "unknown_key",
            DenyReason::BadSignature => "bad_signature",
            DenyReason::Expired => "expired",
            DenyReason::NotYetValid => "not_yet_valid",
            DenyReason::WrongAudience => "wrong_audience",
            DenyReason::HeaderMismatch => "header_mismatch",
            DenyReason::UserTokenRefused => "user_token_refused",
            DenyReason::InsufficientScope => "insufficient_scope",
            DenyReason::BadUnitPrimitive => "bad_unit_primitive",
            DenyReason::VersionTooOld => "version_too_old",
        }
    }

    /// The reason whose [`DenyReason::as_str`] is `name`.
    pub fn from_name(name: &str) -> Option<DenyReason> {
        DenyReason::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// The HTTP status Envoy sends to the client.
    pub fn http_status(self) -> u16 {
        match self {
            DenyReason::BadPath | DenyReason::BadUnitPrimitive => 400,
            DenyReason::NoRoute
            | DenyReason::UserTokenRefused
            | DenyReason::InsufficientScope
            | DenyReason::VersionTooOld => 403,
            DenyReason::KeysUnavailable => 503,
            _ => 401,
        }
    }

    /// The `WWW-Authenticate` value (RFC 6750) for 401 and 403, `None` otherwise.
    /// A request with no token at all gets a challenge without an error code (RFC 6750 §3.1).
    pub fn www_authenticate(self) -> Option<&'static str> {
        const PLAIN: &str = r#"Bearer realm="connector-authz""#;
        const INVALID: &str = r#"Bearer realm="connector-authz", error="invalid_token""#;
        const SCOPE: &str = r#"Bearer realm="connector-authz", error="insufficient_scope""#;
        match (self, self.http_status()) {
            (DenyReason::MissingToken, _) | (DenyReason::NoRoute, _) => Some(PLAIN),
            (_, 401) => Some(INVALID),
            (_, 403) => Some(SCOPE),
            _ => None,
        }
    }
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a token says the caller is, once the token has passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub subject: String,
    /// The configured issuer's canonical name.
    pub issuer: Arc<str>,
    pub scopes: Vec<String>,
    pub jti: Option<String>,
    /// The unit primitive named by the request's header, on header-routed paths.
    pub unit_primitive: Option<String>,
    /// The unit primitives this allow relied on (the route's and the header-named one)
    /// that the registry marks deprecated; empty, and allocation-free, almost always.
    pub deprecated: Vec<Arc<str>>,
    /// The backend's `forward_claims`: each header with the claim's value, or `None` when
    /// the claim is absent, null, empty or not a string or number (the header is removed).
    pub forwarded: Vec<ForwardedHeader>,
}

/// One `forward_claims` header of an allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardedHeader {
    pub header: Box<str>,
    /// The claim's value; `None` removes the header (the claim is absent, null, empty or
    /// neither a string nor a number).
    pub value: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    pub backend: Arc<str>,
    /// The route that matched: an index into the deciding configuration's
    /// `routes.routes()` (read with the same snapshot, for the log line).
    pub route: Option<usize>,
    /// `None` on a public route (no token was needed or checked) and on a dry-run allow.
    pub identity: Option<Identity>,
    /// Set when the backend is in `mode: dry_run` and the request would have been denied:
    /// the denial it would have been. The request is allowed without an identity.
    pub dry_run: Option<Box<Denied>>,
    /// Without an identity: the backend's `forward_claims` headers, which the allow
    /// removes so that no client-sent copy reaches the backend.
    pub removed_headers: Vec<Box<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    pub reason: DenyReason,
    /// One sentence for the client; never contains the token.
    pub message: Cow<'static, str>,
    /// The backend whose route matched, if one did.
    pub backend: Option<Arc<str>>,
    /// The route that matched, if one did: an index into the deciding configuration's
    /// `routes.routes()`.
    pub route: Option<usize>,
    /// What the token claimed, when the decision got as far as reading its claims. Unless
    /// the deny came after the signature check, these are unverified: they say what the
    /// token claims, for tracing a request in the log, and are never acted on.
    pub claimed: Option<Box<Claimed>>,
    /// Set with [`DenyReason::UnknownKey`]: the issuer whose keys should be refreshed
    /// before deciding once more.
    pub refresh_issuer: Option<Arc<str>>,
}

/// The claims a deny's log line names (never the token itself).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claimed {
    pub issuer: Option<String>,
    pub subject: Option<String>,
    pub jti: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow(Allowed),
    Deny(Denied),
}

impl Denied {
    /// A denial with only its reason and message; the stage that denies fills in what it
    /// knows (backend, route, the claims it read).
    pub fn new(reason: DenyReason, message: impl Into<Cow<'static, str>>) -> Self {
        Denied {
            reason,
            message: message.into(),
            backend: None,
            route: None,
            claimed: None,
            refresh_issuer: None,
        }
    }
}

impl Decision {
    pub fn deny(reason: DenyReason, message: impl Into<Cow<'static, str>>) -> Self {
        Decision::Deny(Denied::new(reason, message))
    }

    pub fn reason(&self) -> Option<DenyReason> {
        match self {
            Decision::Allow(_) => None,
            Decision::Deny(d) => Some(d.reason),
        }
    }

    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }

    /// The index of the route that decided, in the configuration's route table; `None`
    /// when the decision came before routing (a bad path, no route).
    pub fn route(&self) -> Option<usize> {
        match self {
            Decision::Allow(a) => a.route,
            Decision::Deny(d) => d.route,
        }
    }
}

/// Whether a claim's value may be copied into an upstream header as it is. A control
/// character is refused: Envoy rejects a header holding one (the request would fail
/// upstream of the decision), and CR or LF could split it for a lenient backend.
pub fn claim_fits_header(value: &str) -> bool {
    !value.chars().any(char::is_control)
}

/// Whether a scope may be joined with the others into `x-gitlab-authz-scopes`, which
/// separates them with spaces: a scope with whitespace in it would read as two.
pub fn scope_fits_header(scope: &str) -> bool {
    claim_fits_header(scope) && !scope.chars().any(char::is_whitespace)
}
