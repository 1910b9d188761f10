//! The key lifecycle with a scripted fetcher and paused Tokio time: every wait below is
//! virtual, so hours of refreshes and backoff run in milliseconds and exactly.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep};

use super::*;
use crate::config::Config;
use crate::decide::Snapshot;
use crate::decision::DenyReason;
use crate::dev::DevKey;
use crate::grpc::{AuthzService, http_check_request, to_request};
use crate::keys::jwks::parse_key_set;
use crate::proto::envoy::service::auth::v3::CheckRequest;
use crate::reload::swap_config;

/// A discovery issuer and a `jwks_uri` issuer; the fake serves keys at `{url}/keys`.
const A: &str = "https://a.test";
const B: &str = "https://b.test";
const A_YAML: &str = "  - url: https://a.test\n";
const B_YAML: &str = "  - url: https://b.test\n    jwks_uri: https://b.test/keys\n";
const REFRESH: Duration = Duration::from_secs(600);
const MIN_REFRESH: Duration = Duration::from_secs(30);

fn key(n: usize) -> DevKey {
    let pem = [
        include_str!("../../../tests/fixtures/keys/test-rsa-2048-1.pem"),
        include_str!("../../../tests/fixtures/keys/test-rsa-2048-2.pem"),
        include_str!("../../../tests/fixtures/keys/test-rsa-2048-3.pem"),
    ][n - 1];
    DevKey::from_pkcs8_pem(pem, format!("test-key-{n}")).expect("fixture key")
}

fn config(issuers_yaml: &str, cache_dir: Option<&Path>) -> Config {
    let cache = cache_dir
        .map(|dir| format!("  cache_dir: {}\n", dir.display()))
        .unwrap_or_default();
    let yaml = format!(
        "issuers:\n{issuers_yaml}\
         keys:\n  refresh_interval: 10m\n  min_refresh_interval: 30s\n  fetch_timeout: 2s\n{cache}\
         backends:\n  - name: svc\n    audience: svc\n    routes: [{{prefix: /, require: []}}]\n"
    );
    Config::from_yaml(&yaml, Path::new("test.yaml")).expect("test config")
}

fn claims(iss: &str) -> Value {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    json!({"iss": iss, "aud": "svc", "iat": now, "exp": now + 3600, "scopes": []})
}

fn token(iss: &str, key: &DevKey) -> String {
    key.sign(&claims(iss))
}

/// A token naming `kid` with a signature that is never checked: an unknown `kid` is
/// refused before the signature is looked at, and forging is cheaper than signing.
fn forged(iss: &str, kid: &str) -> String {
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid});
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims(iss).to_string()),
        URL_SAFE_NO_PAD.encode([7u8; 256])
    )
}

fn mk_check(token: &str) -> CheckRequest {
    let headers = HashMap::from([
        ("authorization".to_owned(), format!("Bearer {token}")),
        ("x-gitlab-authentication-type".to_owned(), "oidc".to_owned()),
    ]);
    http_check_request("GET", "/x", headers)
}

/// How the fake answers an issuer's URLs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Up,
    Down,
    /// Never answers (the fetch timeout ends the wait).
    Hang,
    /// 200 with HTML.
    Garbage,
    /// 200 with more than the document size limit.
    Oversized,
    /// A valid JWKS with no key we accept.
    NoUsableKeys,
    /// Discovery names another issuer.
    WrongIssuer,
}

struct FakeIssuer {
    jwks: Value,
    answer: Answer,
    delay: Duration,
}

/// Serves `{base}/.well-known/openid-configuration` and `{base}/keys` for each issuer
/// from memory, and records when each URL was asked for.
#[derive(Default)]
struct FakeFetcher {
    issuers: Mutex<HashMap<String, FakeIssuer>>,
    calls: Mutex<Vec<(String, Instant)>>,
}

impl FakeFetcher {
    fn publish(&self, base: &str, keys: &[&DevKey]) {
        let mut issuers = lock(&self.issuers);
        let issuer = issuers.entry(base.to_owned()).or_insert(FakeIssuer {
            jwks: Value::Null,
            answer: Answer::Up,
            delay: Duration::ZERO,
        });
        issuer.jwks = DevKey::key_set_json(keys);
    }

    fn answer(&self, base: &str, answer: Answer) {
        lock(&self.issuers)
            .get_mut(base)
            .expect("published first")
            .answer = answer;
    }

    fn delay(&self, base: &str, delay: Duration) {
        lock(&self.issuers)
            .get_mut(base)
            .expect("published first")
            .delay = delay;
    }

    /// When fetches of `base` started: the discovery GET of a discovery issuer, the
    /// JWKS GET of a `jwks_uri` issuer.
    fn fetches(&self, base: &str) -> Vec<Instant> {
        let calls = lock(&self.calls);
        let of = |url: String| -> Vec<Instant> {
            calls
                .iter()
                .filter(|(u, _)| *u == url)
                .map(|(_, t)| *t)
                .collect()
        };
        let discovery = of(format!("{base}/.well-known/openid-configuration"));
        if discovery.is_empty() {
            of(format!("{base}/keys"))
        } else {
            discovery
        }
    }
}

impl Fetcher for FakeFetcher {
    fn get(&self, url: &str) -> FetchFuture<'_> {
        lock(&self.calls).push((url.to_owned(), Instant::now()));
        let (base, is_discovery) = match url.strip_suffix("/.well-known/openid-configuration") {
            Some(base) => (base, true),
            None => (url.strip_suffix("/keys").unwrap_or(url), false),
        };
        let (answer, jwks, delay) = match lock(&self.issuers).get(base) {
            Some(issuer) => (issuer.answer, issuer.jwks.clone(), issuer.delay),
            None => (Answer::Down, Value::Null, Duration::ZERO),
        };
        let url = url.to_owned();
        let base = base.to_owned();
        Box::pin(async move {
            sleep(delay).await;
            let body = match answer {
                Answer::Down => return Err(FetchError::Status { url, status: 503 }),
                Answer::Hang => std::future::pending().await,
                Answer::Garbage => "<html>502 Bad Gateway</html>".to_owned(),
                Answer::Oversized => " ".repeat(KeyLimits::default().max_document_bytes + 1),
                Answer::WrongIssuer if is_discovery => {
                    json!({"issuer": "https://evil.test", "jwks_uri": format!("{base}/keys")})
                        .to_string()
                }
                Answer::NoUsableKeys if !is_discovery => {
                    json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).to_string()
                }
                _ if is_discovery => {
                    json!({"issuer": base, "jwks_uri": format!("{base}/keys")}).to_string()
                }
                _ => jwks.to_string(),
            };
            Ok(Bytes::from(body))
        })
    }
}

struct Harness {
    fetcher: Arc<FakeFetcher>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    manager: Arc<KeyManager>,
    service: Arc<AuthzService>,
}

impl Harness {
    /// Starts a manager on `config`; the fake must already publish what it should serve.
    fn start(config: Config, fetcher: Arc<FakeFetcher>) -> Self {
        let config = Arc::new(config);
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::new(
            Arc::clone(&config),
            Arc::default(),
        )));
        let manager = KeyManager::start(
            &config,
            Arc::clone(&snapshot) as Arc<dyn KeyPublisher>,
            Arc::clone(&fetcher) as Arc<dyn Fetcher>,
            KeyLimits::default(),
        );
        let refresher = Arc::clone(&manager) as Arc<dyn KeyRefresher>;
        let service = Arc::new(AuthzService::new(Arc::clone(&snapshot), Some(refresher)));
        Self {
            fetcher,
            snapshot,
            manager,
            service,
        }
    }

    /// Swaps `config` in as a reload does.
    async fn reconfigure(&self, config: Config) {
        swap_config(&self.snapshot, &self.manager, Arc::new(config)).await;
    }

    /// What the sidecar answers a request with this token, unknown-kid refresh included.
    async fn ask(&self, token: &str) -> Option<DenyReason> {
        ask(&self.service, token).await
    }

    fn keys(&self, issuer: &str) -> Option<Arc<KeySet>> {
        self.snapshot.load().keys.get(issuer).cloned()
    }

    fn stats(&self, issuer: &str) -> FetchStats {
        self.manager.fetch_stats(issuer).expect("network issuer")
    }

    fn ready(&self) -> bool {
        *self.manager.ready().borrow()
    }
}

async fn ask(service: &AuthzService, token: &str) -> Option<DenyReason> {
    let check = mk_check(token);
    service
        .decide_with_refresh(&to_request(&check).expect("valid check"))
        .await
        .decision
        .reason()
}

fn fake_with(issuers: &[(&str, &[&DevKey])]) -> Arc<FakeFetcher> {
    let fake = FakeFetcher::default();
    for (base, keys) in issuers {
        fake.publish(base, keys);
    }
    Arc::new(fake)
}

/// Lets the spawned tasks run to their next wait.
async fn settle() {
    sleep(Duration::from_millis(1)).await;
}

/// Sleeps (virtually) until `done` holds, checking every `step`; panics after an hour.
async fn until(step: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(3600),
            "never happened"
        );
        sleep(step).await;
    }
}

fn cached_jwks(keys: &[&DevKey]) -> Vec<u8> {
    let json = serde_json::to_vec(&DevKey::key_set_json(keys)).expect("json");
    parse_key_set(
        &json,
        KeySource::Network,
        SystemTime::now(),
        &KeyLimits::default(),
    )
    .expect("valid")
    .accepted_jwks_bytes()
}

#[test]
fn retry_steps_double_from_one_second_to_the_cap() {
    let steps: Vec<u64> = (1..=11)
        .map(|n| retry_step(n, Duration::from_secs(86_400)).as_secs())
        .collect();
    assert_eq!(steps, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
    assert_eq!(retry_step(u32::MAX, Duration::from_secs(86_400)), MAX_RETRY);
    // Never longer than the refresh interval itself.
    assert_eq!(
        retry_step(20, Duration::from_secs(60)),
        Duration::from_secs(60)
    );
    for n in 1..20 {
        let step = retry_step(n, REFRESH);
        let delay = retry_delay(n, REFRESH);
        assert!(
            delay <= step && delay >= step.mul_f64(0.8),
            "{n}: {delay:?}"
        );
        let scheduled = scheduled_delay(REFRESH);
        assert!(scheduled >= REFRESH.mul_f64(0.9) && scheduled <= REFRESH.mul_f64(1.1));
    }
}

#[tokio::test(start_paused = true)]
async fn rotation_new_key_allowed_on_first_use_dropped_key_rejected_after_refresh() {
    let (old, new) = (key(1), key(2));
    let h = Harness::start(config(A_YAML, None), fake_with(&[(A, &[&old])]));
    settle().await;
    assert!(h.ready());
    assert_eq!(h.ask(&token(A, &old)).await, None);

    // The issuer publishes B next to A; the first token signed with B is allowed: its
    // unknown kid triggers one refresh, and the request is decided again after it.
    sleep(Duration::from_secs(60)).await;
    h.fetcher.publish(A, &[&old, &new]);
    let fetches = h.fetcher.fetches(A).len();
    assert_eq!(h.ask(&token(A, &new)).await, None);
    assert_eq!(h.fetcher.fetches(A).len(), fetches + 1);
    assert_eq!(h.ask(&token(A, &old)).await, None);

    // The issuer drops A: its tokens work until the next scheduled refresh notices.
    h.fetcher.publish(A, &[&new]);
    assert_eq!(h.ask(&token(A, &old)).await, None);
    sleep(REFRESH.mul_f64(1.1)).await;
    assert!(h.keys(A).expect("keys").by_kid("test-key-1").is_none());
    assert_eq!(h.ask(&token(A, &old)).await, Some(DenyReason::UnknownKey));
    assert_eq!(h.ask(&token(A, &new)).await, None);
    assert_eq!(h.stats(A).failures, 0);
}

#[tokio::test(start_paused = true)]
async fn down_at_start_with_a_cache_file_is_ready_and_allows() {
    let k = key(1);
    let dir = tempfile::tempdir().expect("temp dir");
    KeyCache::new(dir.path())
        .store(A, &cached_jwks(&[&k]))
        .expect("cache written");
    let fake = fake_with(&[(A, &[&k])]);
    fake.answer(A, Answer::Down);

    let h = Harness::start(config(A_YAML, Some(dir.path())), fake);
    // Ready before the first fetch has even run.
    assert!(h.ready());
    assert!(h.manager.missing_issuers().is_empty());
    assert_eq!(h.keys(A).expect("cached").source, KeySource::Cache);
    assert_eq!(h.ask(&token(A, &k)).await, None);

    sleep(Duration::from_secs(60)).await;
    assert!(h.stats(A).failures >= 3, "{:?}", h.stats(A));
    assert_eq!(h.ask(&token(A, &k)).await, None);
    assert_eq!(h.keys(A).expect("cached").source, KeySource::Cache);
}

#[tokio::test(start_paused = true)]
async fn down_at_start_without_cache_is_unavailable_until_one_backoff_step_after_recovery() {
    let k = key(1);
    let fake = fake_with(&[(A, &[&k])]);
    fake.answer(A, Answer::Down);
    let h = Harness::start(config(A_YAML, None), fake);
    settle().await;

    assert!(!h.ready());
    assert_eq!(h.manager.missing_issuers(), [Arc::<str>::from(A)]);
    let denied = h.ask(&token(A, &k)).await.expect("denied");
    assert_eq!(denied, DenyReason::KeysUnavailable);
    assert_eq!(denied.http_status(), 503);

    until(Duration::from_millis(100), || h.stats(A).failures >= 4).await;
    let step = retry_step(h.stats(A).consecutive_failures, REFRESH);
    assert_eq!(step, Duration::from_secs(8));
    h.fetcher.answer(A, Answer::Up);
    let recovered = Instant::now();
    let mut ready = h.manager.ready();
    ready.wait_for(|ready| *ready).await.expect("manager alive");
    assert!(recovered.elapsed() <= step, "{:?}", recovered.elapsed());
    assert!(h.manager.missing_issuers().is_empty());
    assert_eq!(h.ask(&token(A, &k)).await, None);
    assert_eq!(h.stats(A).consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn down_after_start_keeps_keys_and_backs_off_up_to_the_cap() {
    let k = key(1);
    let h = Harness::start(config(B_YAML, None), fake_with(&[(B, &[&k])]));
    settle().await;
    let held = h.keys(B).expect("fetched");

    h.fetcher.answer(B, Answer::Down);
    let down = Instant::now();
    sleep(Duration::from_secs(40 * 60)).await;
    assert_eq!(h.ask(&token(B, &k)).await, None);
    assert!(Arc::ptr_eq(&held, &h.keys(B).expect("kept")));
    assert!(h.ready());

    let failed: Vec<Instant> = h
        .fetcher
        .fetches(B)
        .into_iter()
        .filter(|t| *t >= down)
        .collect();
    let stats = h.stats(B);
    assert_eq!(stats.failures, failed.len() as u64);
    assert_eq!(stats.consecutive_failures as usize, failed.len());
    assert_eq!(stats.attempts, failed.len() as u64 + 1);
    let gaps: Vec<Duration> = failed.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 12, "{gaps:?}");
    for (n, gap) in gaps.iter().enumerate() {
        let step = retry_step(n as u32 + 1, REFRESH);
        // Timers tick in whole milliseconds.
        let slack = Duration::from_millis(2);
        assert!(
            *gap + slack >= step.mul_f64(0.8) && *gap <= step + slack,
            "gap {n} is {gap:?}, step {step:?}"
        );
    }
    assert!(gaps[gaps.len() - 1] >= MAX_RETRY.mul_f64(0.8));

    // Back up: one more retry and the issuer is healthy again.
    h.fetcher.answer(B, Answer::Up);
    until(Duration::from_secs(1), || {
        h.stats(B).consecutive_failures == 0
    })
    .await;
    assert!(!Arc::ptr_eq(&held, &h.keys(B).expect("refreshed")));
}

#[tokio::test(start_paused = true)]
async fn an_answer_that_is_not_a_key_set_never_replaces_good_keys() {
    let k = key(1);
    let h = Harness::start(config(A_YAML, None), fake_with(&[(A, &[&k])]));
    settle().await;
    for bad in [
        Answer::Garbage,
        Answer::Oversized,
        Answer::NoUsableKeys,
        Answer::WrongIssuer,
        Answer::Hang,
        Answer::Down,
    ] {
        let held = h.keys(A).expect("keys");
        let failures = h.stats(A).failures;
        h.fetcher.answer(A, bad);
        until(Duration::from_secs(1), || h.stats(A).failures > failures).await;
        assert!(Arc::ptr_eq(&held, &h.keys(A).expect("kept")), "{bad:?}");
        assert_eq!(h.ask(&token(A, &k)).await, None, "{bad:?}");
        h.fetcher.answer(A, Answer::Up);
        until(Duration::from_secs(1), || {
            h.stats(A).consecutive_failures == 0
        })
        .await;
    }

    // Slower than keys.fetch_timeout is a failure too.
    let failures = h.stats(A).failures;
    h.fetcher.delay(A, Duration::from_secs(3));
    until(Duration::from_secs(1), || h.stats(A).failures > failures).await;
    assert_eq!(h.ask(&token(A, &k)).await, None);
}

#[tokio::test(start_paused = true)]
async fn a_hanging_issuer_holds_up_no_other_issuer() {
    let (ka, kb, kb2) = (key(1), key(2), key(3));
    let fake = fake_with(&[(A, &[&ka]), (B, &[&kb])]);
    fake.answer(A, Answer::Hang);
    let h = Harness::start(config(&format!("{A_YAML}{B_YAML}"), None), fake);

    let start = Instant::now();
    settle().await;
    assert_eq!(h.ask(&token(B, &kb)).await, None);
    assert_eq!(
        h.ask(&token(A, &ka)).await,
        Some(DenyReason::KeysUnavailable)
    );
    assert!(start.elapsed() < Duration::from_millis(10));
    assert!(!h.ready());
    assert_eq!(h.manager.missing_issuers(), [Arc::<str>::from(A)]);

    sleep(Duration::from_secs(35 * 60)).await;
    assert!(h.fetcher.fetches(B).len() >= 4, "{:?}", h.stats(B));
    assert_eq!(h.stats(B).failures, 0);
    assert!(h.stats(A).failures >= 10, "{:?}", h.stats(A));

    // B rotates while A still hangs: the new key works on first use, at once.
    h.fetcher.publish(B, &[&kb, &kb2]);
    let asked = Instant::now();
    assert_eq!(h.ask(&token(B, &kb2)).await, None);
    assert!(asked.elapsed() < Duration::from_millis(10));
}

#[tokio::test(start_paused = true)]
async fn a_thousand_requests_with_unknown_kids_cause_one_fetch() {
    let (k1, k2) = (key(1), key(2));
    let h = Harness::start(config(B_YAML, None), fake_with(&[(B, &[&k1])]));
    h.fetcher.delay(B, Duration::from_millis(200));
    sleep(Duration::from_secs(60)).await;
    assert_eq!(h.fetcher.fetches(B).len(), 1);

    async fn flood(h: &Harness, tokens: Vec<String>) -> Vec<Option<DenyReason>> {
        let tasks: Vec<_> = tokens
            .into_iter()
            .map(|token| {
                let service = Arc::clone(&h.service);
                tokio::spawn(async move { ask(&service, &token).await })
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.expect("no panic"));
        }
        answers
    }

    // A new key: all 1,000 wait for the same fetch and are allowed.
    h.fetcher.publish(B, &[&k1, &k2]);
    let answers = flood(&h, vec![token(B, &k2); 1000]).await;
    assert!(answers.iter().all(Option::is_none), "{answers:?}");
    assert_eq!(h.fetcher.fetches(B).len(), 2);

    // Made-up kids: within min_refresh_interval of that fetch, no fetch at all …
    let made_up = |round: usize| -> Vec<String> {
        (0..1000)
            .map(|i| forged(B, &format!("made-up-{round}-{i}")))
            .collect()
    };
    let answers = flood(&h, made_up(1)).await;
    assert!(answers.iter().all(|a| *a == Some(DenyReason::UnknownKey)));
    assert_eq!(h.fetcher.fetches(B).len(), 2);

    // … and after it, one fetch for the whole flood.
    sleep(MIN_REFRESH).await;
    let answers = flood(&h, made_up(2)).await;
    assert!(answers.iter().all(|a| *a == Some(DenyReason::UnknownKey)));
    assert_eq!(h.fetcher.fetches(B).len(), 3);
    assert_eq!(h.stats(B).attempts, 3);
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_gives_up_does_not_cancel_the_fetch() {
    let (k1, k2) = (key(1), key(2));
    let h = Harness::start(config(B_YAML, None), fake_with(&[(B, &[&k1])]));
    sleep(Duration::from_secs(60)).await;
    h.fetcher.publish(B, &[&k1, &k2]);
    h.fetcher.delay(B, Duration::from_secs(1));

    let impatient = AuthzService::new(
        Arc::clone(&h.snapshot),
        Some(Arc::clone(&h.manager) as Arc<dyn KeyRefresher>),
    )
    .with_refresh_wait(Duration::from_millis(100));
    assert_eq!(
        ask(&impatient, &token(B, &k2)).await,
        Some(DenyReason::UnknownKey)
    );
    // Dropping the refresh future outright does not cancel it either.
    drop(h.manager.refresh_unknown_kid(B));

    sleep(Duration::from_secs(1)).await;
    assert_eq!(ask(&impatient, &token(B, &k2)).await, None);
    assert_eq!(h.fetcher.fetches(B).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn good_keys_are_cached_and_cached_keys_never_replace_fetched_ones() {
    let (k1, k2) = (key(1), key(2));
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = KeyCache::new(dir.path());
    cache.store(B, &cached_jwks(&[&k1])).expect("written");

    let h = Harness::start(config(B_YAML, Some(dir.path())), fake_with(&[(B, &[&k2])]));
    assert_eq!(h.keys(B).expect("cached").source, KeySource::Cache);
    settle().await;
    let fetched = h.keys(B).expect("fetched");
    assert_eq!(fetched.source, KeySource::Network);
    assert!(fetched.by_kid("test-key-2").is_some());

    // The fetched set replaces the file (written off the runtime, so wait for it).
    let expected = cached_jwks(&[&k2]);
    until(Duration::from_millis(1), || {
        std::fs::read(cache.path_for(B)).is_ok_and(|bytes| bytes == expected)
    })
    .await;

    // Loading the cache again (as a restart would) does not displace network keys.
    cache.store(B, &cached_jwks(&[&k1])).expect("written");
    h.manager.shared.load_cached(&Arc::from(B));
    assert!(Arc::ptr_eq(&fetched, &h.keys(B).expect("kept")));
}

#[tokio::test(start_paused = true)]
async fn a_corrupt_cache_file_is_ignored_at_start() {
    let k = key(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = KeyCache::new(dir.path());
    std::fs::write(cache.path_for(B), b"{\"keys\": [").expect("written");
    let fake = fake_with(&[(B, &[&k])]);
    fake.answer(B, Answer::Down);

    let h = Harness::start(config(B_YAML, Some(dir.path())), fake);
    assert!(!h.ready());
    assert_eq!(
        h.ask(&token(B, &k)).await,
        Some(DenyReason::KeysUnavailable)
    );

    h.fetcher.answer(B, Answer::Up);
    let mut ready = h.manager.ready();
    ready.wait_for(|ready| *ready).await.expect("manager alive");
    assert_eq!(h.ask(&token(B, &k)).await, None);
}

#[tokio::test(start_paused = true)]
async fn a_jwks_file_issuer_is_read_at_start_and_never_fetched() {
    let k = key(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, DevKey::key_set_json(&[&k]).to_string()).expect("written");
    let yaml = format!(
        "  - url: https://file.test\n    jwks_file: {}\n",
        file.display()
    );
    let h = Harness::start(config(&yaml, None), Arc::default());

    assert!(h.ready());
    assert_eq!(
        h.keys("https://file.test").expect("read").source,
        KeySource::File
    );
    assert_eq!(h.manager.fetch_stats("https://file.test"), None);
    sleep(Duration::from_secs(3600)).await;
    assert!(lock(&h.fetcher.calls).is_empty());
    assert_eq!(h.ask(&token("https://file.test", &k)).await, None);
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_every_task() {
    let k = key(1);
    let h = Harness::start(config(B_YAML, None), fake_with(&[(B, &[&k])]));
    settle().await;
    h.manager.shutdown().await;
    sleep(Duration::from_secs(3600)).await;
    assert_eq!(h.fetcher.fetches(B).len(), 1);
    // An unknown kid after shutdown is answered with the keys at hand, without waiting.
    let asked = Instant::now();
    assert_eq!(
        h.ask(&forged(B, "made-up")).await,
        Some(DenyReason::UnknownKey)
    );
    assert!(asked.elapsed() < Duration::from_millis(10));
}

#[tokio::test(start_paused = true)]
async fn initial_load_waits_for_first_fetches_but_not_when_keys_are_at_hand() {
    let k = key(1);
    let fetch_timeout = Duration::from_secs(2);

    // Up: ready when it resolves.
    let h = Harness::start(config(B_YAML, None), fake_with(&[(B, &[&k])]));
    h.manager.initial_load().await;
    assert!(h.ready());

    // One issuer hangs, the other is up: resolves after the fetch timeout, not ready.
    let fake = fake_with(&[(A, &[&k]), (B, &[&k])]);
    fake.answer(A, Answer::Hang);
    let h = Harness::start(config(&format!("{A_YAML}{B_YAML}"), None), fake);
    let started = Instant::now();
    h.manager.initial_load().await;
    assert_eq!(started.elapsed(), fetch_timeout);
    assert_eq!(h.manager.missing_issuers(), [Arc::<str>::from(A)]);

    // Cached keys: resolves at once, while the hanging fetch goes on.
    let dir = tempfile::tempdir().expect("temp dir");
    KeyCache::new(dir.path())
        .store(A, &cached_jwks(&[&k]))
        .expect("written");
    let fake = fake_with(&[(A, &[&k])]);
    fake.answer(A, Answer::Hang);
    let h = Harness::start(config(A_YAML, Some(dir.path())), fake);
    let started = Instant::now();
    h.manager.initial_load().await;
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert!(h.ready());
}

#[tokio::test(start_paused = true)]
async fn reconfigure_starts_new_issuers_stops_removed_ones_and_keeps_the_keys_of_the_rest() {
    let (ka, kb) = (key(1), key(2));
    let h = Harness::start(config(A_YAML, None), fake_with(&[(A, &[&ka]), (B, &[&kb])]));
    settle().await;
    let a_keys = h.keys(A).expect("A has keys");
    assert!(h.fetcher.fetches(B).is_empty());

    // B joins: its first fetch starts at once; A keeps the very same key set.
    let both = format!("{A_YAML}{B_YAML}");
    h.reconfigure(config(&both, None)).await;
    settle().await;
    assert!(Arc::ptr_eq(&h.keys(A).expect("A kept"), &a_keys));
    assert_eq!(h.fetcher.fetches(A).len(), 1, "A was not fetched again");
    assert_eq!(h.fetcher.fetches(B).len(), 1);
    assert_eq!(h.ask(&token(B, &kb)).await, None);
    assert!(h.ready());

    // A leaves: its keys leave the snapshot and its schedule stops; B's goes on.
    h.reconfigure(config(B_YAML, None)).await;
    assert!(h.keys(A).is_none());
    assert!(h.manager.fetch_stats(A).is_none());
    assert_eq!(h.ask(&token(A, &ka)).await, Some(DenyReason::UnknownIssuer));
    sleep(REFRESH * 3).await;
    assert_eq!(
        h.fetcher.fetches(A).len(),
        1,
        "a removed issuer is still refreshed"
    );
    assert!(h.fetcher.fetches(B).len() >= 3, "B's schedule stopped");
    assert_eq!(h.stats(B).successes, h.stats(B).attempts);
    assert!(h.ready());
}

/// A key published just after a scheduled refresh works at its first use: the scheduled
/// fetch does not use up the unknown-kid refresh (its limit counts unknown-kid refreshes).
#[tokio::test(start_paused = true)]
async fn a_key_published_just_after_a_scheduled_refresh_works_at_first_use() {
    let (k1, k2) = (key(1), key(2));
    let h = Harness::start(config(B_YAML, None), fake_with(&[(B, &[&k1])]));
    settle().await;
    while h.fetcher.fetches(B).len() < 2 {
        sleep(Duration::from_secs(1)).await;
    }
    h.fetcher.publish(B, &[&k1, &k2]);
    assert_eq!(h.ask(&token(B, &k2)).await, None);
    assert_eq!(h.fetcher.fetches(B).len(), 3);
}

/// A pod that starts during a rotation: the fetch at start does not use up the
/// unknown-kid refresh either.
#[tokio::test(start_paused = true)]
async fn a_key_published_just_after_start_works_at_first_use() {
    let (k1, k2) = (key(1), key(2));
    let h = Harness::start(config(B_YAML, None), fake_with(&[(B, &[&k1])]));
    settle().await;
    assert_eq!(h.fetcher.fetches(B).len(), 1);
    h.fetcher.publish(B, &[&k1, &k2]);
    sleep(Duration::from_secs(1)).await;
    assert_eq!(h.ask(&token(B, &k2)).await, None);
    // The limit still holds between unknown-kid refreshes.
    assert_eq!(
        h.ask(&forged(B, "made-up")).await,
        Some(DenyReason::UnknownKey)
    );
    assert_eq!(h.fetcher.fetches(B).len(), 2);
}
