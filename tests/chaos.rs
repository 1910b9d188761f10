//! Chaos under load: concurrent Checks for several seconds while the issuer goes down,
//! hangs, answers garbage, comes back and rotates its keys twice. Every decision is held
//! against what it must be: no forged token is ever allowed, no token of a key the sidecar
//! holds is ever denied, no Check fails as an RPC, and memory stays bounded.
//! Loopback only; bounded in time (about 6 s) and so in requests.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use connector_authz::config::Config;
use connector_authz::proto::envoy::service::auth::v3::{
    CheckRequest, authorization_client::AuthorizationClient, check_response,
};
use connector_authz::serve;
use support::{
    FakeIssuer, Mode, check_request, claims, instance_headers, now, test_key, test_key_with_kid,
};
use tokio::sync::Mutex;

const AUDIENCE: &str = "gitlab-ai-gateway";
const PHASE: Duration = Duration::from_millis(1000);
/// After a phase change, decisions that depend on a refresh are not judged for this long.
const GRACE: Duration = Duration::from_millis(600);
const WORKERS: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    /// Signed by key 1, published from the start until the second rotation.
    Key1,
    /// Signed by key 2, published from the first rotation (phase 4).
    Key2,
    /// Signed by key 3, published at the second rotation (phase 5).
    Key3,
    /// Signed by an attacker's key under key 1's kid.
    Forged,
    /// Signed by key 1 with more scopes pasted into the payload.
    Tampered,
}

/// What a decision must be in `phase` (0..=5) at `since` into the phase; `None`: either.
fn expected(kind: Kind, phase: usize, since: Duration) -> Option<bool> {
    let settled = since >= GRACE;
    match kind {
        Kind::Forged | Kind::Tampered => Some(false),
        // Held from the start; outages keep it; dropped by the fetch of phase 5.
        Kind::Key1 if phase <= 4 => Some(true),
        Kind::Key1 => settled.then_some(false),
        Kind::Key2 if phase <= 3 => Some(false),
        Kind::Key2 if phase == 4 => settled.then_some(true),
        Kind::Key2 => Some(true),
        Kind::Key3 if phase <= 4 => Some(false),
        Kind::Key3 => settled.then_some(true),
    }
}

fn request(token: &str) -> CheckRequest {
    check_request("POST", "/ai/v2/code/completions", instance_headers(token))
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Default)]
struct Tally {
    checks: AtomicU64,
    judged: AtomicU64,
    false_allows: AtomicU64,
    false_denies: AtomicU64,
    rpc_errors: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_stay_right_while_the_issuer_flaps_and_rotates() {
    let (k1, k2, k3) = (test_key(1), test_key(2), test_key(3));
    let issuer = FakeIssuer::start(&[&k1]).await;
    let iss = issuer.url();
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: {{grpc: 127.0.0.1:0, admin: 127.0.0.1:0}}
issuers:
  - url: {iss}
keys:
  refresh_interval: 1s
  min_refresh_interval: 1s
  fetch_timeout: 300ms
backends:
  - name: ai_gateway
    audience: {AUDIENCE}
    routes:
      - prefix: /ai/v2/code/
        require: [complete_code]
"
    );
    let config = Config::from_yaml(&yaml, &dir.path().join("config.yaml")).unwrap();
    let running = serve::start(config).await.expect("server starts");
    let client = AuthorizationClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap();

    let good = claims(&iss, AUDIENCE, &["complete_code"], now() + 3600);
    let forged = test_key_with_kid(3, "test-key-1").sign(&good);
    let tampered = {
        let signed = k1.sign(&good);
        let mut parts: Vec<String> = signed.split('.').map(str::to_string).collect();
        let mut more = good.clone();
        more["scopes"] = serde_json::json!(["complete_code", "duo_chat", "x"]);
        use base64::Engine;
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(more.to_string());
        parts.join(".")
    };
    let tokens: Arc<Vec<(Kind, String)>> = Arc::new(vec![
        (Kind::Key1, k1.sign(&good)),
        (Kind::Key2, k2.sign(&good)),
        (Kind::Key3, k3.sign(&good)),
        (Kind::Forged, forged),
        (Kind::Tampered, tampered),
    ]);

    // The phase and when it began, as the workers judge decisions against it.
    let phase = Arc::new(Mutex::new((0usize, Instant::now())));
    let tally = Arc::new(Tally::default());
    let rss_before = rss_kib();
    let deadline = Instant::now() + PHASE * 6;
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (client, tokens, phase, tally) =
            (client.clone(), tokens.clone(), phase.clone(), tally.clone());
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while Instant::now() < deadline {
                let (kind, token) = &tokens[i % tokens.len()];
                i += 1;
                let (p, began) = *phase.lock().await;
                let sent = Instant::now();
                let answer = client.clone().check(request(token)).await;
                tally.checks.fetch_add(1, Ordering::Relaxed);
                let allowed = match answer {
                    Ok(r) => matches!(
                        r.into_inner().http_response,
                        Some(check_response::HttpResponse::OkResponse(_))
                    ),
                    Err(_) => {
                        tally.rpc_errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                // Judge only when the phase did not change while the Check was in flight.
                let (p_after, _) = *phase.lock().await;
                if p_after != p {
                    continue;
                }
                if let Some(want) = expected(*kind, p, sent.duration_since(began)) {
                    tally.judged.fetch_add(1, Ordering::Relaxed);
                    match (want, allowed) {
                        (false, true) => {
                            tally.false_allows.fetch_add(1, Ordering::Relaxed);
                            eprintln!("false allow: {kind:?} in phase {p}");
                        }
                        (true, false) => {
                            tally.false_denies.fetch_add(1, Ordering::Relaxed);
                            eprintln!(
                                "false deny: {kind:?} in phase {p} at {:?}",
                                sent.duration_since(began)
                            );
                        }
                        _ => {}
                    }
                }
            }
        }));
    }

    // 0: up with key 1 · 1: down · 2: hangs · 3: garbage · 4: up, key 2 added · 5: key 1 dropped, key 3 added
    let script: [&dyn Fn(); 5] = [
        &|| issuer.set_mode(Mode::Down(503)),
        &|| issuer.set_mode(Mode::Hang),
        &|| issuer.set_mode(Mode::Garbage),
        &|| {
            issuer.set_keys(&[&k1, &k2]);
            issuer.set_mode(Mode::Up);
        },
        &|| issuer.set_keys(&[&k2, &k3]),
    ];
    for (n, step) in script.iter().enumerate() {
        tokio::time::sleep(PHASE).await;
        let mut p = phase.lock().await;
        step();
        *p = (n + 1, Instant::now());
    }
    for w in workers {
        w.await.expect("a worker panicked");
    }
    let rss_after = rss_kib();

    let t = &tally;
    let (checks, judged) = (
        t.checks.load(Ordering::Relaxed),
        t.judged.load(Ordering::Relaxed),
    );
    eprintln!(
        "chaos: {checks} checks, {judged} judged, {} false allows, {} false denies, {} rpc errors, rss {rss_before} -> {rss_after} KiB, {} jwks fetches",
        t.false_allows.load(Ordering::Relaxed),
        t.false_denies.load(Ordering::Relaxed),
        t.rpc_errors.load(Ordering::Relaxed),
        issuer.jwks_fetch_count()
    );
    assert_eq!(
        t.false_allows.load(Ordering::Relaxed),
        0,
        "a forged or unpublished token was allowed"
    );
    assert_eq!(
        t.false_denies.load(Ordering::Relaxed),
        0,
        "a token of a held key was denied"
    );
    assert_eq!(
        t.rpc_errors.load(Ordering::Relaxed),
        0,
        "a Check failed as an RPC"
    );
    assert!(
        judged > 500,
        "too few decisions judged to mean anything: {judged}"
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "memory grew from {rss_before} to {rss_after} KiB"
    );
    running.shutdown().await;
}
