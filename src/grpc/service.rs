//! The tonic service: one Check is extract → decide (with at most one refresh of an
//! issuer's keys after an unknown `kid`) → respond, with metrics and the log line on
//! every exit. The snapshot is loaded once per decision and carried through response,
//! metrics and log, so all of them describe the configuration that decided.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, Guard};
use tonic::Status;

use super::extract::{CheckInput, to_request};
use super::respond::to_response;
use crate::decide::{Snapshot, decide_cached};
use crate::decision::{Allowed, Decision, Denied, Request};
use crate::deprecation::DeprecationNotices;
use crate::keys::KeyRefresher;
use crate::metrics::Metrics;
use crate::proto::envoy::service::auth::v3::{
    CheckRequest, CheckResponse,
    authorization_server::{Authorization, AuthorizationServer},
};
use crate::token_cache::TokenCache;
use crate::traces::{CheckSpan, CheckTracer};

type DecideFn = fn(&Snapshot, &Request<'_>, SystemTime, &TokenCache) -> Decision;

/// A decision and the snapshot that made it (loaded once for it).
pub struct Decided {
    pub snapshot: Guard<Arc<Snapshot>>,
    pub decision: Decision,
}

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
    deprecations: DeprecationNotices,
    /// `None` unless traces are exported: then a Check makes no span and reads no
    /// trace header.
    tracer: Option<CheckTracer>,
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
            deprecations: DeprecationNotices::default(),
            tracer: None,
        }
    }

    /// Makes a span of every Check (see [`crate::traces`]).
    pub fn with_tracer(mut self, tracer: CheckTracer) -> Self {
        self.tracer = Some(tracer);
        self
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

    /// Waits this long for an unknown-kid refresh instead of the configuration's
    /// `keys.unknown_kid_wait`.
    pub fn with_refresh_wait(mut self, wait: Duration) -> Self {
        self.refresh_wait = Some(wait);
        self
    }

    pub fn into_server(self) -> AuthorizationServer<Self> {
        AuthorizationServer::new(self)
    }

    fn decide_once(&self, input: &CheckInput<'_>) -> Decided {
        let snapshot = self.snapshot.load();
        let decision =
            (self.decide_fn)(&snapshot, &input.request(), SystemTime::now(), &self.cache);
        Decided { snapshot, decision }
    }

    /// Decides on one request: once, and once more after a refresh of the token's issuer
    /// if `decide` found a `kid` it does not know. Never more than one refresh per request,
    /// so a stream of tokens with made-up `kid`s costs at most one rate-limited fetch each.
    pub async fn decide_with_refresh(&self, input: &CheckInput<'_>) -> Decided {
        self.decide_traced(input, None).await
    }

    /// [`AuthzService::decide_with_refresh`], with a child of `span` for the wait for a
    /// refresh.
    async fn decide_traced(&self, input: &CheckInput<'_>, span: Option<&CheckSpan<'_>>) -> Decided {
        let first = self.decide_once(input);
        // A dry-run allow that would have been an unknown kid refreshes too: the decision
        // it reports must be the one enforcing would make.
        let would_deny = match &first.decision {
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
            ) => (Arc::clone(issuer), refresher),
            _ => return first,
        };
        let wait = self
            .refresh_wait
            .unwrap_or(first.snapshot.config.keys.unknown_kid_wait);
        // The guard goes before the await: held across it, it would pin the old snapshot.
        drop(first);
        let refresh = refresher.refresh_unknown_kid(&issuer);
        let wait_span = span.map(|span| span.refresh_wait(&issuer));
        let finished = tokio::time::timeout(wait, refresh).await.is_ok();
        if let Some(wait_span) = wait_span {
            wait_span.end(finished);
        }
        if !finished {
            tracing::debug!(
                %issuer,
                ?wait,
                "unknown kid: refresh still running, deciding with the keys at hand"
            );
        }
        self.decide_once(input)
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
                if let Some(tracer) = &self.tracer {
                    tracer.start_check(None).end_invalid(status.message());
                }
                return Err(status);
            }
        };
        let span = self
            .tracer
            .as_ref()
            .map(|tracer| tracer.start_check(Some(input.request().headers)));
        let Decided { snapshot, decision } = self.decide_traced(&input, span.as_ref()).await;
        if let Some(span) = span {
            span.end_decided(&snapshot, &decision);
        }
        let elapsed = started.elapsed();
        self.metrics.check_decided(&decision, elapsed);
        if let Decision::Allow(Allowed {
            identity: Some(identity),
            ..
        }) = &decision
            && !identity.deprecated.is_empty()
        {
            self.deprecations
                .note(&snapshot.config, &identity.deprecated, &self.metrics);
        }
        let dry_run = matches!(&decision, Decision::Allow(a) if a.dry_run.is_some());
        if dry_run || tracing::enabled!(tracing::Level::DEBUG) {
            log_decision(&snapshot, &decision, elapsed);
        }
        Ok(tonic::Response::new(to_response(&decision)))
    }
}

/// The log line of one decision, from what the decision carries and the snapshot that
/// made it (no second routing, no second parse of the token). For a deny, issuer, subject
/// and jti are what the token claims, verified or not (for tracing a request). The token
/// itself is never logged.
fn log_decision(snapshot: &Snapshot, decision: &Decision, elapsed: Duration) {
    let pattern = |route: Option<usize>| {
        route
            .and_then(|i| snapshot.config.routes.routes().get(i))
            .map(|r| r.pattern.to_string())
    };
    let latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    let would_deny = match decision {
        Decision::Allow(allowed) if allowed.dry_run.is_none() => {
            let identity = allowed.identity.as_ref();
            tracing::debug!(
                decision = "allow",
                reason = if identity.is_some() { "valid_token" } else { "public" },
                route = pattern(allowed.route).as_deref().unwrap_or(""),
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
    let route = pattern(denied.route);
    let route = route.as_deref().unwrap_or("");
    let claimed = denied.claimed.as_deref();
    let claim = |f: fn(&crate::decision::Claimed) -> &Option<String>| {
        claimed.and_then(|c| f(c).as_deref()).unwrap_or("")
    };
    if decision.is_allow() {
        // Dry run: the point is to see what enforcing would deny, so it is logged at info.
        tracing::info!(
            decision = "dry_run",
            reason = denied.reason.as_str(),
            route,
            backend = denied.backend.as_deref().unwrap_or(""),
            issuer = claim(|c| &c.issuer),
            subject = claim(|c| &c.subject),
            jti = claim(|c| &c.jti),
            latency_us,
            "check: allowed in dry run, enforcing would deny"
        );
    } else {
        tracing::debug!(
            decision = "deny",
            reason = denied.reason.as_str(),
            route,
            backend = denied.backend.as_deref().unwrap_or(""),
            issuer = claim(|c| &c.issuer),
            subject = claim(|c| &c.subject),
            jti = claim(|c| &c.jti),
            latency_us,
            "check"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::decision::DenyReason;
    use crate::grpc::respond::SUBJECT_HEADER;
    use crate::grpc::test_support::{
        ISSUER, denied_response, header_value, mk_check, mk_identity, ok_response, raw,
    };
    use crate::keys::{KeySet, KeySource};

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
            .await
            .decision;
        assert!(decision.is_allow(), "{decision:?}");
        assert_eq!(calls(&fake), 1);
    }

    #[tokio::test]
    async fn unknown_kid_after_a_fruitless_refresh_is_denied_without_a_second_refresh() {
        let (service, fake) = mk_service(Some(Refresh::FindsNothing));
        let check = mk_check(&[], None);
        let decision = service
            .decide_with_refresh(&to_request(&check).expect("valid"))
            .await
            .decision;
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
            .await
            .decision;
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
            .await
            .decision;
        assert_eq!(decision.reason(), Some(DenyReason::UnknownKey));
        let (service, _) = mk_service_with("keys: {unknown_kid_wait: 1s}\n", slow());
        let decision = service
            .decide_with_refresh(&to_request(&check).expect("valid"))
            .await
            .decision;
        assert!(decision.is_allow(), "{decision:?}");
    }

    #[tokio::test]
    async fn unknown_kid_without_a_refresher_is_denied_at_once() {
        let (service, fake) = mk_service(None);
        let check = mk_check(&[], None);
        let decision = service
            .decide_with_refresh(&to_request(&check).expect("valid"))
            .await
            .decision;
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
