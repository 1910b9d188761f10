//! The ext_authz v3 `Authorization` service: turns a `CheckRequest` into a
//! [`decision::Request`](crate::decision::Request), asks [`decide`] and turns the
//! [`Decision`] into a `CheckResponse`.
//!
//! This module owns the protocol and the one wait in the request path (a bounded refresh
//! of an issuer's keys after an unknown `kid`). It makes no decisions of its own: what is
//! allowed is `decide`'s business, and the conversions here are pure functions
//! ([`to_request`], [`to_response`]) so they are tested without a network.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use prost_types::{Struct, Value, value::Kind};
use tonic::Status;

use crate::decide::{Snapshot, decide_cached};
use crate::decision::{Allowed, Decision, Denied, DenyReason, Headers, Request};
use crate::keys::KeyRefresher;
use crate::metrics::Metrics;
use crate::proto::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
};
use crate::proto::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
    authorization_server::{Authorization, AuthorizationServer},
    check_response::HttpResponse,
};
use crate::proto::envoy::r#type::v3::HttpStatus;
use crate::proto::google::rpc;
use crate::token_cache::TokenCache;

/// Upstream headers that carry the verified identity. The backend trusts them, so a
/// client's own copies must never get through: we overwrite or remove every one of them.
pub const SUBJECT_HEADER: &str = "x-gitlab-authz-subject";
pub const ISSUER_HEADER: &str = "x-gitlab-authz-issuer";
pub const SCOPES_HEADER: &str = "x-gitlab-authz-scopes";
pub const UNIT_PRIMITIVE_HEADER: &str = "x-gitlab-authz-unit-primitive";
/// Set on an allow that a backend in `mode: dry_run` would otherwise have denied: the reason.
pub const DRY_RUN_HEADER: &str = "x-gitlab-authz-dry-run";
const IDENTITY_HEADERS: [&str; 5] = [
    SUBJECT_HEADER,
    ISSUER_HEADER,
    SCOPES_HEADER,
    UNIT_PRIMITIVE_HEADER,
    DRY_RUN_HEADER,
];

// google.rpc.Code values. Envoy only tells 0 (allow) from the rest (deny), but the code
// also lands in its logs and stats, so a deny says what kind it is.
const CODE_OK: i32 = 0;
const CODE_INVALID_ARGUMENT: i32 = 3;
const CODE_PERMISSION_DENIED: i32 = 7;
const CODE_UNAVAILABLE: i32 = 14;
const CODE_UNAUTHENTICATED: i32 = 16;

type DecideFn = fn(&Snapshot, &Request<'_>, SystemTime, &TokenCache) -> Decision;

/// The tonic service; one instance serves every connection.
pub struct AuthzService {
    snapshot: Arc<ArcSwap<Snapshot>>,
    refresher: Option<Arc<dyn KeyRefresher>>,
    /// Overrides `keys.unknown_kid_wait` (tests).
    refresh_wait: Option<Duration>,
    /// Verified tokens, sized by `tokens.cache_entries` / `tokens.cache_bytes`.
    cache: Arc<TokenCache>,
    /// Always [`decide_cached`] outside tests; a seam so the unknown-kid retry is tested on its own.
    decide_fn: DecideFn,
    metrics: Arc<Metrics>,
    deprecations: DeprecationLog,
}

impl AuthzService {
    /// `refresher`: `None` turns the unknown-kid refresh off (static keys, `explain`).
    /// The token cache is sized by the configuration in `snapshot` at this moment.
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>, refresher: Option<Arc<dyn KeyRefresher>>) -> Self {
        let cache = Arc::new(TokenCache::from_settings(&snapshot.load().config.tokens));
        Self {
            snapshot,
            refresher,
            refresh_wait: None,
            cache,
            decide_fn: decide_cached,
            metrics: Arc::default(),
            deprecations: DeprecationLog::default(),
        }
    }

    /// Counts Checks in `metrics` (by default, in metrics of its own that no one reads),
    /// the token cache's hits and misses included.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        let (hits, misses) = metrics.token_cache_counters();
        let settings = &self.snapshot.load().config.tokens;
        self.cache = Arc::new(TokenCache::from_settings(settings).counting_into(hits, misses));
        self.metrics = metrics;
        self
    }

    /// The cache of verified tokens (its size and hit counts).
    pub fn token_cache(&self) -> &Arc<TokenCache> {
        &self.cache
    }

    /// Waits this long for an unknown-kid refresh instead of the configuration's
    /// `keys.unknown_kid_wait`.
    pub fn with_refresh_wait(mut self, wait: Duration) -> Self {
        self.refresh_wait = Some(wait);
        self
    }

    pub fn into_server(self) -> AuthorizationServer<Self> {
        AuthorizationServer::new(self)
    }

    /// Decides on one request: once, and once more after a refresh of the token's issuer
    /// if `decide` found a `kid` it does not know. Never more than one refresh per request,
    /// so a stream of tokens with made-up `kid`s costs at most one rate-limited fetch each.
    pub async fn decide_with_refresh(&self, input: &CheckInput<'_>) -> Decision {
        // The guard and the borrowed `Request` are dropped before the await: a guard held
        // across it would pin the old snapshot, and the `Request` is not `Send`.
        let (first, wait) = {
            let snapshot = self.snapshot.load();
            let wait = self
                .refresh_wait
                .unwrap_or(snapshot.config.keys.unknown_kid_wait);
            let first =
                (self.decide_fn)(&snapshot, &input.request(), SystemTime::now(), &self.cache);
            (first, wait)
        };
        // A dry-run allow that would have been an unknown kid refreshes too: the decision
        // it reports must be the one enforcing would make.
        let would_deny = match &first {
            Decision::Deny(denied) => Some(denied),
            Decision::Allow(allowed) => allowed.dry_run.as_deref(),
        };
        let (issuer, refresher) = match (would_deny, &self.refresher) {
            (
                Some(Denied {
                    refresh_issuer: Some(issuer),
                    ..
                }),
                Some(refresher),
            ) => (issuer, refresher),
            _ => return first,
        };
        let refresh = refresher.refresh_unknown_kid(issuer);
        if tokio::time::timeout(wait, refresh).await.is_err() {
            tracing::debug!(
                %issuer,
                ?wait,
                "unknown kid: refresh still running, deciding with the keys at hand"
            );
        }
        let snapshot = self.snapshot.load();
        (self.decide_fn)(&snapshot, &input.request(), SystemTime::now(), &self.cache)
    }
}

#[tonic::async_trait]
impl Authorization for AuthzService {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, Status> {
        let started = Instant::now();
        let check = request.into_inner();
        let input = match to_request(&check) {
            Ok(input) => input,
            Err(status) => {
                self.metrics.check_failed(started.elapsed());
                tracing::debug!(reason = "invalid_argument", "check: {}", status.message());
                return Err(status);
            }
        };
        let decision = self.decide_with_refresh(&input).await;
        let elapsed = started.elapsed();
        self.metrics.check_decided(&decision, elapsed);
        if let Decision::Allow(Allowed {
            identity: Some(identity),
            ..
        }) = &decision
            && !identity.deprecated.is_empty()
        {
            self.note_deprecated(&identity.deprecated);
        }
        let dry_run = matches!(&decision, Decision::Allow(a) if a.dry_run.is_some());
        if dry_run || tracing::enabled!(tracing::Level::DEBUG) {
            log_decision(&self.snapshot.load(), &input, &decision, elapsed);
        }
        Ok(tonic::Response::new(to_response(&decision)))
    }
}

impl AuthzService {
    /// Counts every allowed use of a deprecated unit primitive (as `decide` reported it),
    /// and logs the first one of each (per loaded configuration) with its deprecation notice.
    fn note_deprecated(&self, used: &[Arc<str>]) {
        // Rare (only allows that relied on a deprecated unit primitive), so a second
        // snapshot load here costs nothing on the common path.
        let snapshot = self.snapshot.load();
        let config = &snapshot.config;
        let Some(registry) = config.registry.as_deref() else {
            return;
        };
        for name in used.iter().map(|n| &**n) {
            self.metrics.deprecated_unit_primitive_used(name);
            let Some(deprecation) = registry
                .unit_primitive(name)
                .and_then(|up| up.deprecation.as_ref())
            else {
                continue;
            };
            if self.deprecations.first_use(config, name) {
                tracing::warn!(
                    unit_primitive = name,
                    deprecation = deprecation.message.as_deref().unwrap_or(""),
                    url = deprecation.by_url.as_deref().unwrap_or(""),
                    "a request was allowed through a deprecated unit primitive (logged once per unit primitive until the configuration is reloaded)"
                );
            }
        }
    }
}

/// Which deprecated unit primitives were logged already, for the configuration loaded now.
#[derive(Default)]
struct DeprecationLog {
    /// The configuration the names belong to (compared by address), and the names.
    seen: Mutex<(usize, HashSet<String>)>,
}

impl DeprecationLog {
    /// `true` the first time `name` is seen with this `config`.
    fn first_use(&self, config: &Arc<crate::config::Config>, name: &str) -> bool {
        let id = Arc::as_ptr(config) as usize;
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.0 != id {
            *seen = (id, HashSet::new());
        }
        seen.1.insert(name.to_owned())
    }
}

/// The debug line of one decision. For a deny, issuer, subject and jti are read from the
/// token's claims without verifying them (they say what the token claims, for tracing a
/// request). The token itself is never logged.
fn log_decision(
    snapshot: &Snapshot,
    input: &CheckInput<'_>,
    decision: &Decision,
    elapsed: Duration,
) {
    let route = snapshot
        .config
        .routes
        .route_for(input.path, input.method)
        .map(|r| r.pattern.to_string());
    let route = route.as_deref().unwrap_or("");
    let latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    let would_deny = match decision {
        Decision::Allow(allowed) if allowed.dry_run.is_none() => {
            let identity = allowed.identity.as_ref();
            tracing::debug!(
                decision = "allow",
                reason = if identity.is_some() { "valid_token" } else { "public" },
                route,
                backend = %allowed.backend,
                issuer = identity.map_or("", |i| &*i.issuer),
                subject = identity.map_or("", |i| i.subject.as_str()),
                jti = identity.and_then(|i| i.jti.as_deref()).unwrap_or(""),
                latency_us,
                "check"
            );
            return;
        }
        Decision::Allow(allowed) => allowed.dry_run.as_deref(),
        Decision::Deny(denied) => Some(denied),
    };
    let Some(denied) = would_deny else { return };
    let request = input.request();
    let claims = crate::token::bearer(request.headers, snapshot.config.tokens.max_bytes)
        .ok()
        .and_then(|raw| crate::token::split(raw).ok())
        .and_then(|token| token.claims().ok());
    let claim = |f: fn(&crate::token::Claims) -> Option<&String>| {
        claims.as_ref().and_then(f).map_or("", String::as_str)
    };
    if decision.is_allow() {
        // Dry run: the point is to see what enforcing would deny, so it is logged at info.
        tracing::info!(
            decision = "dry_run",
            reason = denied.reason.as_str(),
            route,
            backend = denied.backend.as_deref().unwrap_or(""),
            issuer = claim(|c| c.iss.as_ref()),
            subject = claim(|c| c.sub.as_ref()),
            jti = claim(|c| c.jti.as_ref()),
            latency_us,
            "check: allowed in dry run, enforcing would deny"
        );
    } else {
        tracing::debug!(
            decision = "deny",
            reason = denied.reason.as_str(),
            route,
            backend = denied.backend.as_deref().unwrap_or(""),
            issuer = claim(|c| c.iss.as_ref()),
            subject = claim(|c| c.sub.as_ref()),
            jti = claim(|c| c.jti.as_ref()),
            latency_us,
            "check"
        );
    }
}

/// The parts of a `CheckRequest` a decision reads, borrowed from it where possible.
pub struct CheckInput<'a> {
    method: &'a str,
    path: &'a str,
    headers: HeaderSource<'a>,
}

enum HeaderSource<'a> {
    /// Envoy's default `headers` map, used as it is.
    Map(&'a HashMap<String, String>),
    /// Envoy's `header_map` (with `encode_raw_headers`), values decoded to text (borrowed
    /// unless a value is not UTF-8).
    List(Vec<(&'a str, Cow<'a, str>)>),
}

impl CheckInput<'_> {
    pub fn request(&self) -> Request<'_> {
        let headers: &dyn Headers = match &self.headers {
            HeaderSource::Map(map) => *map,
            HeaderSource::List(list) => list,
        };
        Request {
            method: self.method,
            path: self.path,
            headers,
        }
    }
}

/// Reads what a decision needs from a `CheckRequest`. A request without HTTP attributes is
/// not something we can decide on (it comes from a network-level ext_authz filter, or a
/// client that is not Envoy), so it is the one malformed input: `invalid_argument`.
pub fn to_request(check: &CheckRequest) -> Result<CheckInput<'_>, Status> {
    let http = check
        .attributes
        .as_ref()
        .and_then(|attributes| attributes.request.as_ref())
        .and_then(|request| request.http.as_ref())
        .ok_or_else(|| Status::invalid_argument("CheckRequest has no attributes.request.http"))?;
    let headers = if !http.headers.is_empty() {
        HeaderSource::Map(&http.headers)
    } else {
        let list = http
            .header_map
            .as_ref()
            .map(|map| map.headers.as_slice())
            .unwrap_or_default();
        HeaderSource::List(list.iter().map(header_pair).collect())
    };
    Ok(CheckInput {
        method: &http.method,
        path: &http.path,
        headers,
    })
}

/// `raw_value` is what Envoy fills in a `header_map`; `value` is the older text form.
/// Bytes that are not UTF-8 become U+FFFD rather than dropping the header, so a header
/// that was sent still counts as sent (a missing header can pass a check a wrong one fails).
fn header_pair(header: &HeaderValue) -> (&str, Cow<'_, str>) {
    let value = if header.raw_value.is_empty() {
        Cow::Borrowed(header.value.as_str())
    } else {
        String::from_utf8_lossy(&header.raw_value)
    };
    (header.key.as_str(), value)
}

/// The `CheckRequest` Envoy's ext_authz filter sends for one HTTP request, with its
/// headers in the `headers` map (lower-case names). For clients: the `check` command,
/// tests and benches.
pub fn http_check_request(
    method: &str,
    path: &str,
    headers: std::collections::HashMap<String, String>,
) -> CheckRequest {
    use crate::proto::envoy::service::auth::v3::{AttributeContext, attribute_context};
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: method.to_owned(),
                    path: path.to_owned(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The `CheckResponse` for a decision. The gRPC call itself succeeds for every decision;
/// allow or deny is carried in `status` and the HTTP response.
pub fn to_response(decision: &Decision) -> CheckResponse {
    match decision {
        Decision::Allow(allowed) => allow_response(allowed),
        Decision::Deny(denied) => deny_response(denied),
    }
}

fn allow_response(allowed: &Allowed) -> CheckResponse {
    let mut metadata = Metadata::new(if allowed.dry_run.is_some() {
        "dry_run"
    } else {
        "allow"
    });
    metadata.put("backend", &allowed.backend);
    let mut ok = OkHttpResponse::default();
    match &allowed.identity {
        // A public route or a dry-run allow: nobody was identified, so no identity header
        // (and no forwarded claim) may reach the backend.
        None => {
            ok.headers_to_remove = IDENTITY_HEADERS
                .iter()
                .map(|&name| name.to_owned())
                .chain(allowed.removed_headers.iter().map(|h| h.to_string()))
                .collect();
            if let Some(denied) = &allowed.dry_run {
                ok.headers_to_remove.retain(|h| h != DRY_RUN_HEADER);
                ok.headers
                    .push(overwrite(DRY_RUN_HEADER, denied.reason.as_str()));
                metadata.put("reason", denied.reason.as_str());
            }
        }
        Some(identity) => {
            let scopes = identity.scopes.join(" ");
            ok.headers = vec![
                overwrite(SUBJECT_HEADER, &identity.subject),
                overwrite(ISSUER_HEADER, &identity.issuer),
                overwrite(SCOPES_HEADER, &scopes),
            ];
            match &identity.unit_primitive {
                Some(unit_primitive) => {
                    ok.headers
                        .push(overwrite(UNIT_PRIMITIVE_HEADER, unit_primitive));
                    metadata.put("unit_primitive", unit_primitive);
                }
                None => ok.headers_to_remove.push(UNIT_PRIMITIVE_HEADER.to_owned()),
            }
            ok.headers_to_remove.push(DRY_RUN_HEADER.to_owned());
            for forwarded in &identity.forwarded {
                match &forwarded.value {
                    Some(value) => ok.headers.push(overwrite(&forwarded.header, value)),
                    None => ok.headers_to_remove.push(forwarded.header.to_string()),
                }
            }
            metadata.put("subject", &identity.subject);
            metadata.put("issuer", &identity.issuer);
            metadata.put("scopes", &scopes);
            if let Some(jti) = &identity.jti {
                metadata.put("jti", jti);
            }
        }
    }
    CheckResponse {
        status: Some(rpc::Status {
            code: CODE_OK,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(ok)),
        dynamic_metadata: Some(metadata.0),
    }
}

fn deny_response(denied: &Denied) -> CheckResponse {
    let reason = denied.reason;
    let template = DenyTemplate::of(reason);
    let denied_response = DeniedHttpResponse {
        status: Some(HttpStatus {
            code: template.http_status,
        }),
        headers: template.headers.clone(),
        body: error_body(reason.as_str(), &denied.message),
    };
    let mut metadata = Metadata::new("deny");
    metadata.put("reason", reason.as_str());
    if let Some(backend) = &denied.backend {
        metadata.put("backend", backend);
    }
    CheckResponse {
        status: Some(rpc::Status {
            code: template.rpc_code,
            message: reason.as_str().to_owned(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(denied_response)),
        dynamic_metadata: Some(metadata.0),
    }
}

/// What every deny of one reason shares, built once: its statuses and its headers.
struct DenyTemplate {
    http_status: i32,
    rpc_code: i32,
    headers: Vec<HeaderValueOption>,
}

impl DenyTemplate {
    fn of(reason: DenyReason) -> &'static DenyTemplate {
        static TEMPLATES: OnceLock<Vec<DenyTemplate>> = OnceLock::new();
        let templates = TEMPLATES.get_or_init(|| {
            DenyReason::ALL
                .iter()
                .map(|&reason| {
                    let mut headers = vec![overwrite("content-type", "application/json")];
                    if let Some(challenge) = reason.www_authenticate() {
                        headers.push(overwrite("www-authenticate", challenge));
                    }
                    DenyTemplate {
                        http_status: i32::from(reason.http_status()),
                        rpc_code: rpc_code(reason.http_status()),
                        headers,
                    }
                })
                .collect()
        });
        let index = DenyReason::ALL
            .iter()
            .position(|&r| r == reason)
            .unwrap_or_default();
        &templates[index]
    }
}

fn rpc_code(http_status: u16) -> i32 {
    match http_status {
        400 => CODE_INVALID_ARGUMENT,
        401 => CODE_UNAUTHENTICATED,
        503 => CODE_UNAVAILABLE,
        _ => CODE_PERMISSION_DENIED,
    }
}

/// `{"error":"<reason>","message":"<message>"}`, written directly into one buffer.
fn error_body(error: &str, message: &str) -> String {
    let mut body = String::with_capacity(32 + error.len() + message.len());
    body.push_str(r#"{"error":"#);
    push_json_string(&mut body, error);
    body.push_str(r#","message":"#);
    push_json_string(&mut body, message);
    body.push('}');
    body
}

/// A JSON string literal (RFC 8259 §7): quotes, backslashes and control characters escaped.
fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                use std::fmt::Write as _;
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `OVERWRITE_IF_EXISTS_OR_ADD`: a value the client sent under the same name is replaced,
/// not joined with ours. Empty values are kept (a token may carry no scopes) so that an
/// empty header still replaces a smuggled one.
fn overwrite(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        keep_empty_value: true,
        ..Default::default()
    }
}

/// The dynamic metadata Envoy hands to its access log, as string fields.
struct Metadata(Struct);

impl Metadata {
    fn new(decision: &str) -> Self {
        let mut metadata = Metadata(Struct::default());
        metadata.put("decision", decision);
        metadata
    }

    fn put(&mut self, key: &str, value: &str) {
        let value = Value {
            kind: Some(Kind::StringValue(value.to_owned())),
        };
        self.0.fields.insert(key.to_owned(), value);
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::decision::{DenyReason, HeaderValue as Header, Identity};
    use crate::keys::{KeySet, KeySource};
    use crate::proto::envoy::config::core::v3::HeaderMap;
    use crate::proto::envoy::service::auth::v3::{AttributeContext, attribute_context};

    const ISSUER: &str = "https://issuer.test";

    fn mk_check(headers: &[(&str, &str)], header_map: Option<Vec<HeaderValue>>) -> CheckRequest {
        let http = attribute_context::HttpRequest {
            method: "POST".into(),
            path: "/ai/v2/code/completions?x=1".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            header_map: header_map.map(|headers| HeaderMap { headers }),
            ..Default::default()
        };
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(http),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    fn raw(key: &str, value: &[u8]) -> HeaderValue {
        HeaderValue {
            key: key.into(),
            raw_value: value.to_vec(),
            ..Default::default()
        }
    }

    fn mk_identity(unit_primitive: Option<&str>) -> Identity {
        Identity {
            forwarded: Vec::new(),
            subject: "instance-1".into(),
            issuer: Arc::from(ISSUER),
            scopes: vec!["code_suggestions".into(), "duo_chat".into()],
            jti: Some("jti-1".into()),
            unit_primitive: unit_primitive.map(String::from),
            deprecated: Vec::new(),
        }
    }

    fn ok_response(response: &CheckResponse) -> &OkHttpResponse {
        match &response.http_response {
            Some(HttpResponse::OkResponse(ok)) => ok,
            other => panic!("expected an ok_response, got {other:?}"),
        }
    }

    fn denied_response(response: &CheckResponse) -> &DeniedHttpResponse {
        match &response.http_response {
            Some(HttpResponse::DeniedResponse(denied)) => denied,
            other => panic!("expected a denied_response, got {other:?}"),
        }
    }

    fn header<'a>(options: &'a [HeaderValueOption], key: &str) -> Option<&'a HeaderValueOption> {
        options
            .iter()
            .find(|o| o.header.as_ref().is_some_and(|h| h.key == key))
    }

    fn header_value<'a>(options: &'a [HeaderValueOption], key: &str) -> Option<&'a str> {
        header(options, key)
            .and_then(|o| o.header.as_ref())
            .map(|h| h.value.as_str())
    }

    fn metadata(response: &CheckResponse, key: &str) -> Option<String> {
        let field = response.dynamic_metadata.as_ref()?.fields.get(key)?;
        match &field.kind {
            Some(Kind::StringValue(s)) => Some(s.clone()),
            other => panic!("metadata {key} is not a string: {other:?}"),
        }
    }

    #[test]
    fn headers_map_is_used_as_sent() {
        let check = mk_check(
            &[("authorization", "Bearer abc"), ("x-gitlab-realm", "saas")],
            None,
        );
        let input = to_request(&check).expect("http attributes are present");
        let req = input.request();
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/ai/v2/code/completions?x=1");
        assert_eq!(req.headers.get("authorization"), Header::One("Bearer abc"));
        assert_eq!(req.headers.get("x-gitlab-realm"), Header::One("saas"));
        assert_eq!(req.headers.get("x-gitlab-instance-id"), Header::Absent);
    }

    #[test]
    fn header_map_is_used_when_the_map_is_empty() {
        let list = vec![
            raw("authorization", b"Bearer abc"),
            HeaderValue {
                key: "x-gitlab-realm".into(),
                value: "saas".into(),
                ..Default::default()
            },
            raw("x-gitlab-global-user-id", b"1"),
            raw("x-gitlab-global-user-id", b"2"),
            raw("x-gitlab-authentication-type", b"oid\xffc"),
        ];
        let check = mk_check(&[], Some(list));
        let input = to_request(&check).expect("http attributes are present");
        let req = input.request();
        assert_eq!(req.headers.get("authorization"), Header::One("Bearer abc"));
        assert_eq!(
            req.headers.get("x-gitlab-realm"),
            Header::One("saas"),
            "value, not raw_value"
        );
        assert_eq!(req.headers.get("x-gitlab-global-user-id"), Header::Repeated);
        // Not UTF-8: still present (so it fails an equality check) rather than dropped.
        assert_eq!(
            req.headers.get("x-gitlab-authentication-type"),
            Header::One("oid\u{fffd}c")
        );
    }

    #[test]
    fn headers_map_wins_over_header_map() {
        let check = mk_check(
            &[("authorization", "Bearer map")],
            Some(vec![raw("authorization", b"Bearer list")]),
        );
        let input = to_request(&check).expect("http attributes are present");
        assert_eq!(
            input.request().headers.get("authorization"),
            Header::One("Bearer map")
        );
    }

    #[test]
    fn no_headers_at_all_is_an_empty_request_not_an_error() {
        let check = mk_check(&[], None);
        let input = to_request(&check).expect("http attributes are present");
        assert_eq!(input.request().headers.get("authorization"), Header::Absent);
    }

    #[test]
    fn missing_http_attributes_are_invalid_argument() {
        let no_attributes = CheckRequest { attributes: None };
        let no_request = CheckRequest {
            attributes: Some(AttributeContext::default()),
        };
        let no_http = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request::default()),
                ..Default::default()
            }),
        };
        for check in [no_attributes, no_request, no_http] {
            let status = to_request(&check).err().expect("must be rejected");
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn every_deny_reason_has_its_status_body_and_challenge() {
        for reason in DenyReason::ALL {
            let decision = Decision::deny(reason, "a sentence for the client");
            let response = to_response(&decision);

            let status = response.status.as_ref().expect("status is always set");
            assert_ne!(
                status.code, CODE_OK,
                "{reason}: a deny must not carry code 0"
            );
            let expected_code = match reason.http_status() {
                400 => CODE_INVALID_ARGUMENT,
                401 => CODE_UNAUTHENTICATED,
                403 => CODE_PERMISSION_DENIED,
                503 => CODE_UNAVAILABLE,
                other => panic!("{reason}: unexpected HTTP status {other}"),
            };
            assert_eq!(status.code, expected_code, "{reason}");

            let denied = denied_response(&response);
            let http = denied.status.as_ref().expect("HTTP status is always set");
            assert_eq!(http.code, i32::from(reason.http_status()), "{reason}");
            assert_eq!(
                header_value(&denied.headers, "content-type"),
                Some("application/json")
            );
            assert_eq!(
                header_value(&denied.headers, "www-authenticate"),
                reason.www_authenticate(),
                "{reason}"
            );

            let body: serde_json::Value = serde_json::from_str(&denied.body).expect("body is JSON");
            assert_eq!(
                body,
                serde_json::json!({"error": reason.as_str(), "message": "a sentence for the client"})
            );
            assert_eq!(metadata(&response, "decision").as_deref(), Some("deny"));
            assert_eq!(
                metadata(&response, "reason").as_deref(),
                Some(reason.as_str())
            );
        }
    }

    #[test]
    fn deny_body_escapes_the_message() {
        let decision = Decision::deny(
            DenyReason::HeaderMismatch,
            r#"header "x-gitlab-realm" \ differs"#,
        );
        let body: serde_json::Value =
            serde_json::from_str(&denied_response(&to_response(&decision)).body)
                .expect("body is JSON");
        assert_eq!(body["message"], r#"header "x-gitlab-realm" \ differs"#);
    }

    #[test]
    fn deny_body_is_json_for_any_message() {
        for message in ["tab\tnew\nline\r\u{1}\u{1f}", "é ✓ \u{7f} \"q\" \\", ""] {
            let body: serde_json::Value =
                serde_json::from_str(&error_body("bad_path", message)).expect("body is JSON");
            assert_eq!(
                body,
                serde_json::json!({"error": "bad_path", "message": message})
            );
        }
    }

    #[test]
    fn deny_metadata_names_the_backend_when_a_route_matched() {
        let decision = Decision::Deny(Denied {
            reason: DenyReason::InsufficientScope,
            message: "scope missing".into(),
            backend: Some(Arc::from("ai_gateway")),
            route: None,
            claimed: None,
            refresh_issuer: None,
        });
        let response = to_response(&decision);
        assert_eq!(
            metadata(&response, "backend").as_deref(),
            Some("ai_gateway")
        );
    }

    #[test]
    fn allow_overwrites_identity_headers_and_records_metadata() {
        let decision = Decision::Allow(Allowed {
            backend: Arc::from("ai_gateway"),
            route: None,
            identity: Some(mk_identity(None)),
            dry_run: None,
            removed_headers: Vec::new(),
        });
        let response = to_response(&decision);
        assert_eq!(response.status.as_ref().map(|s| s.code), Some(CODE_OK));

        let ok = ok_response(&response);
        for (key, value) in [
            (SUBJECT_HEADER, "instance-1"),
            (ISSUER_HEADER, ISSUER),
            (SCOPES_HEADER, "code_suggestions duo_chat"),
        ] {
            let option = header(&ok.headers, key).unwrap_or_else(|| panic!("{key} is set"));
            assert_eq!(
                option.header.as_ref().map(|h| h.value.as_str()),
                Some(value)
            );
            assert_eq!(
                option.append_action,
                HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                "{key}"
            );
            // The deprecated field, when set, would override append_action.
            #[allow(deprecated)]
            let append = option.append;
            assert_eq!(append, None, "{key}");
        }
        // No unit primitive on this route: a client's own header must not pass either.
        assert!(header(&ok.headers, UNIT_PRIMITIVE_HEADER).is_none());
        // Nor a dry-run verdict: this is no dry-run allow.
        assert_eq!(
            ok.headers_to_remove,
            vec![UNIT_PRIMITIVE_HEADER.to_owned(), DRY_RUN_HEADER.to_owned()]
        );

        for (key, value) in [
            ("decision", "allow"),
            ("backend", "ai_gateway"),
            ("subject", "instance-1"),
            ("issuer", ISSUER),
            ("scopes", "code_suggestions duo_chat"),
            ("jti", "jti-1"),
        ] {
            assert_eq!(metadata(&response, key).as_deref(), Some(value), "{key}");
        }
        assert_eq!(metadata(&response, "reason"), None);
    }

    #[test]
    fn allow_with_a_unit_primitive_sets_its_header() {
        let decision = Decision::Allow(Allowed {
            backend: Arc::from("ai_gateway"),
            route: None,
            identity: Some(mk_identity(Some("duo_chat"))),
            dry_run: None,
            removed_headers: Vec::new(),
        });
        let response = to_response(&decision);
        let ok = ok_response(&response);
        let option =
            header(&ok.headers, UNIT_PRIMITIVE_HEADER).expect("unit primitive header is set");
        assert_eq!(
            option.header.as_ref().map(|h| h.value.as_str()),
            Some("duo_chat")
        );
        assert_eq!(
            option.append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
        assert_eq!(ok.headers_to_remove, vec![DRY_RUN_HEADER.to_owned()]);
        assert_eq!(
            metadata(&response, "unit_primitive").as_deref(),
            Some("duo_chat")
        );
    }

    #[test]
    fn allow_with_no_scopes_still_replaces_a_smuggled_scopes_header() {
        let mut identity = mk_identity(None);
        identity.scopes.clear();
        let response = to_response(&Decision::Allow(Allowed {
            backend: Arc::from("b"),
            route: None,
            identity: Some(identity),
            dry_run: None,
            removed_headers: Vec::new(),
        }));
        let option =
            header(&ok_response(&response).headers, SCOPES_HEADER).expect("scopes header is set");
        assert_eq!(option.header.as_ref().map(|h| h.value.as_str()), Some(""));
        assert!(option.keep_empty_value);
    }

    #[test]
    fn public_allow_removes_smuggled_identity_headers() {
        let response = to_response(&Decision::Allow(Allowed {
            backend: Arc::from("ai_gateway"),
            route: None,
            identity: None,
            dry_run: None,
            removed_headers: Vec::new(),
        }));
        assert_eq!(response.status.as_ref().map(|s| s.code), Some(CODE_OK));
        let ok = ok_response(&response);
        assert!(ok.headers.is_empty());
        let mut removed = ok.headers_to_remove.clone();
        removed.sort();
        let mut expected: Vec<String> = IDENTITY_HEADERS.iter().map(|&h| h.to_owned()).collect();
        expected.sort();
        assert_eq!(removed, expected);
        assert_eq!(metadata(&response, "decision").as_deref(), Some("allow"));
        assert_eq!(
            metadata(&response, "backend").as_deref(),
            Some("ai_gateway")
        );
        assert_eq!(metadata(&response, "subject"), None);
    }

    // --- the unknown-kid retry, with a stand-in for `decide` -----------------------------

    /// Allows once the snapshot holds keys for [`ISSUER`]; until then reports an unknown kid.
    fn decide_by_issuer_keys(
        snapshot: &Snapshot,
        _req: &Request<'_>,
        _now: SystemTime,
        _cache: &TokenCache,
    ) -> Decision {
        if snapshot.keys.get(ISSUER).is_some() {
            Decision::Allow(Allowed {
                backend: Arc::from("ai_gateway"),
                route: None,
                identity: Some(mk_identity(None)),
                dry_run: None,
                removed_headers: Vec::new(),
            })
        } else {
            Decision::Deny(Denied {
                reason: DenyReason::UnknownKey,
                message: "the token's key is not known".into(),
                backend: Some(Arc::from("ai_gateway")),
                route: None,
                claimed: None,
                refresh_issuer: Some(Arc::from(ISSUER)),
            })
        }
    }

    enum Refresh {
        /// Swaps in a snapshot that holds the issuer's keys.
        Finds,
        /// Finishes without new keys (rate-limited, or the issuer has no such key).
        FindsNothing,
        /// Never finishes (the issuer hangs).
        Hangs,
        /// Finds the keys after this long (a slow issuer).
        FindsAfter(Duration),
    }

    struct FakeRefresher {
        snapshot: Arc<ArcSwap<Snapshot>>,
        refresh: Refresh,
        calls: AtomicUsize,
    }

    impl KeyRefresher for FakeRefresher {
        fn refresh_unknown_kid(
            &self,
            issuer: &str,
        ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
            assert_eq!(issuer, ISSUER);
            self.calls.fetch_add(1, Ordering::SeqCst);
            let snapshot = Arc::clone(&self.snapshot);
            let delay = match self.refresh {
                Refresh::FindsAfter(delay) => delay,
                _ => Duration::ZERO,
            };
            match self.refresh {
                Refresh::Finds | Refresh::FindsAfter(_) => Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    let mut next = Snapshot::clone(&snapshot.load());
                    let keys = Arc::new(KeySet::new(
                        Vec::new(),
                        KeySource::Network,
                        SystemTime::now(),
                    ));
                    next.keys = Arc::new(next.keys.with_issuer(Arc::from(ISSUER), keys));
                    snapshot.store(Arc::new(next));
                }),
                Refresh::FindsNothing => Box::pin(async {}),
                Refresh::Hangs => Box::pin(std::future::pending()),
            }
        }
    }

    fn mk_service(refresh: Option<Refresh>) -> (AuthzService, Option<Arc<FakeRefresher>>) {
        mk_service_with("", refresh)
    }

    fn mk_service_with(
        yaml: &str,
        refresh: Option<Refresh>,
    ) -> (AuthzService, Option<Arc<FakeRefresher>>) {
        let config = crate::config::Config::from_yaml(
            &format!("issuers: [{{url: https://issuer.test}}]\nbackends: [{{name: b, audience: a, routes: [{{prefix: /, require: []}}]}}]\n{yaml}"),
            std::path::Path::new("test.yaml"),
        )
        .expect("test config");
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::new(
            Arc::new(config),
            Arc::default(),
        )));
        let fake = refresh.map(|refresh| {
            Arc::new(FakeRefresher {
                snapshot: Arc::clone(&snapshot),
                refresh,
                calls: AtomicUsize::new(0),
            })
        });
        let refresher = fake.clone().map(|fake| fake as Arc<dyn KeyRefresher>);
        let mut service = AuthzService::new(snapshot, refresher);
        service.decide_fn = decide_by_issuer_keys;
        (service, fake)
    }

    fn calls(fake: &Option<Arc<FakeRefresher>>) -> usize {
        fake.as_ref()
            .map_or(0, |fake| fake.calls.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn unknown_kid_refreshes_once_and_decides_again() {
        let (service, fake) = mk_service(Some(Refresh::Finds));
        let check = mk_check(&[], None);
        let decision = service
            .decide_with_refresh(&to_request(&check).expect("valid"))
            .await;
        assert!(decision.is_allow(), "{decision:?}");
        assert_eq!(calls(&fake), 1);
    }

    #[tokio::test]
    async fn unknown_kid_after_a_fruitless_refresh_is_denied_without_a_second_refresh() {
        let (service, fake) = mk_service(Some(Refresh::FindsNothing));
        let check = mk_check(&[], None);
        let decision = service
            .decide_with_refresh(&to_request(&check).expect("valid"))
            .await;
        assert_eq!(decision.reason(), Some(DenyReason::UnknownKey));
        assert_eq!(calls(&fake), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_kid_waits_no_longer_than_the_bound() {
        let (service, fake) = mk_service(Some(Refresh::Hangs));
        let service = service.with_refresh_wait(Duration::from_millis(500));
        let check = mk_check(&[], None);
        let started = tokio::time::Instant::now();
        let decision = service
            .decide_with_refresh(&to_request(&check).expect("valid"))
            .await;
        assert_eq!(decision.reason(), Some(DenyReason::UnknownKey));
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        assert_eq!(calls(&fake), 1);
    }

    /// The wait is `keys.unknown_kid_wait`, 800 ms unless set: an issuer that answers in
    /// 900 ms is too slow by default, and in time with `unknown_kid_wait: 1s`.
    #[tokio::test(start_paused = true)]
    async fn unknown_kid_waits_for_keys_unknown_kid_wait() {
        let slow = || Some(Refresh::FindsAfter(Duration::from_millis(900)));
        let check = mk_check(&[], None);
        let (service, _) = mk_service_with("", slow());
        let decision = service
            .decide_with_refresh(&to_request(&check).expect("valid"))
            .await;
        assert_eq!(decision.reason(), Some(DenyReason::UnknownKey));
        let (service, _) = mk_service_with("keys: {unknown_kid_wait: 1s}\n", slow());
        let decision = service
            .decide_with_refresh(&to_request(&check).expect("valid"))
            .await;
        assert!(decision.is_allow(), "{decision:?}");
    }

    #[tokio::test]
    async fn unknown_kid_without_a_refresher_is_denied_at_once() {
        let (service, fake) = mk_service(None);
        let check = mk_check(&[], None);
        let decision = service
            .decide_with_refresh(&to_request(&check).expect("valid"))
            .await;
        assert_eq!(decision.reason(), Some(DenyReason::UnknownKey));
        assert_eq!(calls(&fake), 0);
    }

    #[tokio::test]
    async fn check_answers_a_deny_as_a_successful_call() {
        let (service, _) = mk_service(None);
        let response = service
            .check(tonic::Request::new(mk_check(&[], None)))
            .await
            .expect("a deny is not a gRPC error")
            .into_inner();
        assert_eq!(
            denied_response(&response).status.as_ref().map(|s| s.code),
            Some(401)
        );
    }

    #[tokio::test]
    async fn check_rejects_a_request_without_http_attributes() {
        let (service, _) = mk_service(None);
        let status = service
            .check(tonic::Request::new(CheckRequest { attributes: None }))
            .await
            .expect_err("must be rejected");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
    #[tokio::test]
    async fn serves_check_over_loopback() {
        use crate::proto::envoy::service::auth::v3::authorization_client::AuthorizationClient;
        use tonic::transport::server::TcpIncoming;

        let (service, fake) = mk_service(Some(Refresh::Finds));
        let incoming = TcpIncoming::bind("127.0.0.1:0".parse().expect("literal address"))
            .expect("bind loopback");
        let addr = incoming.local_addr().expect("bound address");
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service.into_server())
                .serve_with_incoming(incoming),
        );
        let mut client = AuthorizationClient::connect(format!("http://{addr}"))
            .await
            .expect("connect to loopback");
        let check = mk_check(&[], Some(vec![raw("authorization", b"Bearer abc")]));
        let response = client
            .check(check)
            .await
            .expect("a Check succeeds")
            .into_inner();
        let ok = ok_response(&response);
        assert_eq!(
            header_value(&ok.headers, SUBJECT_HEADER),
            Some("instance-1")
        );
        assert_eq!(calls(&fake), 1);
        server.abort();
    }
}
