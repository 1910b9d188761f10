//! The proxy-wasm filter's feed on the admin listener, on its own: `GET /v1/snapshot`
//! (what the filter decides with, with an ETag) and `POST /v1/verify` (the signature stage
//! for one token, unknown-kid refresh included), against the real server and fake issuers.

mod support;

use std::path::Path;
use std::time::Duration;

use connector_authz::config::Config;
use connector_authz::feed::FeedSnapshot;
use connector_authz::serve::{self, Running};
use serde_json::Value;
use support::{FakeIssuer, claims, now, test_key, within};

const AUDIENCE: &str = "gitlab-ai-gateway";

async fn start(issuer: &FakeIssuer) -> (Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cloud_connector");
    let yaml = format!(
        "listen: {{grpc: 127.0.0.1:0, admin: 127.0.0.1:0}}
issuers:
  - url: {iss}
keys:
  fetch_timeout: 2s
  min_refresh_interval: 1s
unit_primitives: {registry}
backends:
  - name: ai_gateway
    backend_service: ai_gateway
    routes:
      - prefix: /ai/v2/code/
        require: [complete_code]
",
        iss = issuer.url(),
        registry = registry.display(),
    );
    let config =
        Config::from_yaml(&yaml, &dir.path().join("config.yaml")).expect("test config is valid");
    let running = serve::start(config).await.expect("server starts");
    (running, dir)
}

async fn verify(running: &Running, token: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/verify", running.admin_addr))
        .body(token.to_string())
        .send()
        .await
        .expect("verify answers");
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_slice(&response.bytes().await.expect("verify answers"))
            .expect("verify answers JSON"),
    )
}

async fn snapshot(running: &Running, if_none_match: Option<&str>) -> reqwest::Response {
    let mut request =
        reqwest::Client::new().get(format!("http://{}/v1/snapshot", running.admin_addr));
    if let Some(tag) = if_none_match {
        request = request.header("if-none-match", tag);
    }
    request.send().await.expect("snapshot answers")
}

#[tokio::test]
async fn verify_answers_the_claims_issuer_and_key_of_a_good_token() {
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    let (running, _dir) = start(&issuer).await;
    let token = test_key(1).sign(&claims(
        &issuer.url(),
        AUDIENCE,
        &["complete_code"],
        now() + 600,
    ));
    let (status, answer) = verify(&running, &token).await;
    assert_eq!(status, 200);
    assert_eq!(answer["result"], "verified", "{answer}");
    assert_eq!(answer["issuer"], issuer.url().trim_end_matches('/'));
    assert_eq!(answer["alg"], "RS256");
    assert_eq!(answer["kid"], "test-key-1");
    assert_eq!(answer["claims"]["scopes"][0], "complete_code");
    assert_eq!(answer["key_fingerprint"].as_str().map(str::len), Some(16));
    // The fingerprint is one the snapshot lists for the issuer.
    let feed: FeedSnapshot =
        serde_json::from_slice(&snapshot(&running, None).await.bytes().await.unwrap()).unwrap();
    let listed = &feed.keys[issuer.url().trim_end_matches('/')];
    assert!(
        listed
            .iter()
            .any(|f| answer["key_fingerprint"] == f.as_str()),
        "{listed:?}"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn verify_denies_with_the_status_and_reason_of_a_check() {
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    let (running, _dir) = start(&issuer).await;
    let forged = test_key(1).sign(&claims(
        "https://elsewhere.test",
        AUDIENCE,
        &[],
        now() + 600,
    ));
    let wrong_key = test_key_with_kid_1_but_key_2(&issuer);
    let cases = [
        ("not-a-jwt", 401, "malformed_token"),
        (forged.as_str(), 401, "unknown_issuer"),
        (wrong_key.as_str(), 401, "bad_signature"),
    ];
    for (token, status, reason) in cases {
        let (http, answer) = verify(&running, token).await;
        assert_eq!(http, 200);
        assert_eq!(answer["result"], "denied", "{reason}: {answer}");
        assert_eq!(answer["status"], status, "{reason}");
        assert_eq!(answer["reason"], reason);
        assert!(
            !answer["message"]
                .as_str()
                .unwrap_or_default()
                .contains(token)
        );
    }
    // Larger than tokens.max_bytes: refused before any parsing.
    let (_, answer) = verify(&running, &"a".repeat(9000)).await;
    assert_eq!(answer["reason"], "malformed_token");
    running.shutdown().await;
}

/// A token signed by key 2 under key 1's kid.
fn test_key_with_kid_1_but_key_2(issuer: &FakeIssuer) -> String {
    support::test_key_with_kid(2, "test-key-1").sign(&claims(
        &issuer.url(),
        AUDIENCE,
        &["complete_code"],
        now() + 600,
    ))
}

#[tokio::test]
async fn verify_refreshes_the_issuer_on_an_unknown_kid() {
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    let (running, _dir) = start(&issuer).await;
    let before = snapshot(&running, None).await;
    let etag = before.headers()["etag"].to_str().unwrap().to_string();
    // The issuer rotates to key 2; the sidecar has not seen it yet.
    issuer.set_keys(&[&test_key(1), &test_key(2)]);
    let token = test_key(2).sign(&claims(
        &issuer.url(),
        AUDIENCE,
        &["complete_code"],
        now() + 600,
    ));
    let (_, answer) = verify(&running, &token).await;
    assert_eq!(answer["result"], "verified", "{answer}");
    assert_eq!(answer["kid"], "test-key-2");
    // The snapshot now lists the new key: its ETag changed.
    let after = snapshot(&running, Some(&etag)).await;
    assert_eq!(after.status(), 200);
    assert_ne!(after.headers()["etag"].to_str().unwrap(), etag);
    let feed: FeedSnapshot = serde_json::from_slice(&after.bytes().await.unwrap()).unwrap();
    assert_eq!(feed.keys[issuer.url().trim_end_matches('/')].len(), 2);
    running.shutdown().await;
}

#[tokio::test]
async fn the_snapshot_compiles_to_the_sidecars_configuration_and_answers_304_when_unchanged() {
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    let (running, _dir) = start(&issuer).await;
    assert!(
        within(Duration::from_secs(10), async || running
            .keys
            .missing_issuers()
            .is_empty())
        .await,
        "the issuer's keys load"
    );
    let first = snapshot(&running, None).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["content-type"], "application/json");
    let etag = first.headers()["etag"].to_str().unwrap().to_string();
    let feed: FeedSnapshot = serde_json::from_slice(&first.bytes().await.unwrap()).unwrap();
    let compiled = feed.compile().expect("the snapshot compiles");
    let sidecar = running.snapshot.load();
    assert_eq!(
        compiled.snapshot.config.routes.routes().len(),
        sidecar.config.routes.routes().len()
    );
    assert_eq!(compiled.snapshot.config.backends, sidecar.config.backends);
    assert_eq!(compiled.snapshot.config.tokens, sidecar.config.tokens);
    assert!(
        compiled
            .snapshot
            .config
            .registry
            .as_deref()
            .and_then(|r| r.unit_primitive("complete_code"))
            .is_some()
    );
    assert_eq!(compiled.keys.len(), 1);

    let again = snapshot(&running, Some(&etag)).await;
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()["etag"].to_str().unwrap(), etag);
    assert!(again.bytes().await.unwrap().is_empty());
    let stale = snapshot(&running, Some("\"0000\"")).await;
    assert_eq!(stale.status(), 200);
    running.shutdown().await;
}
