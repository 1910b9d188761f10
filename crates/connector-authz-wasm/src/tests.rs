//! The filter's pipeline against a sidecar's snapshot: it decides as the sidecar does.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use connector_authz_core::config::Config;
use connector_authz_core::decide::{Snapshot, decide, verify_token};
use connector_authz_core::decision::{Decision, Request};
use connector_authz_core::dev::DevKey;
use connector_authz_core::feed::{CompiledFeed, FeedSnapshot};
use connector_authz_core::keys::{KeySnapshot, KeySource};
use serde_json::json;

use crate::pipeline::{Step, request_headers, step};
use crate::token_cache::{VerifiedCache, digest};

const ISS: &str = "https://customers.gitlab.com";
const NOW: u64 = 1_800_000_000;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

fn sidecar(key: &DevKey) -> Snapshot {
    let yaml = format!(
        "issuers:
  - url: {ISS}
backends:
  - name: ai_gateway
    audience: gitlab-ai-gateway
    forward_claims:
      gitlab_instance_id: x-instance
    routes:
      - prefix: /ai/v2/code/
        require: [complete_code]
      - prefix: /ai/monitoring/
        public: true
  - name: dry
    audience: dry
    mode: dry_run
    routes:
      - prefix: /dry/
        require: [duo_chat]
"
    );
    let config = Config::from_yaml(&yaml, Path::new("/etc/authz.yaml")).unwrap();
    let set = DevKey::key_set(&[key], KeySource::File, UNIX_EPOCH);
    let keys = KeySnapshot::default().with_issuer(ISS.into(), Arc::new(set));
    Snapshot::new(Arc::new(config), Arc::new(keys))
}

/// The sidecar's snapshot as the filter gets it, through JSON.
fn feed_of(sidecar: &Snapshot) -> CompiledFeed {
    let wire = serde_json::to_vec(&FeedSnapshot::of(sidecar)).unwrap();
    serde_json::from_slice::<FeedSnapshot>(&wire)
        .unwrap()
        .compile()
        .unwrap()
}

fn token(key: &DevKey, aud: &str, scopes: &[&str]) -> String {
    key.sign(&json!({
        "iss": ISS, "aud": aud, "sub": "i-1", "gitlab_instance_id": "i-1",
        "gitlab_realm": "self-managed", "scopes": scopes, "exp": NOW + 60, "iat": NOW,
    }))
}

fn headers(path: &str, token: Option<&str>) -> Vec<(String, String)> {
    let mut headers = vec![
        (":method".to_string(), "POST".to_string()),
        (":path".to_string(), path.to_string()),
        ("x-gitlab-realm".to_string(), "self-managed".to_string()),
        ("x-gitlab-instance-id".to_string(), "i-1".to_string()),
        (
            "x-gitlab-authentication-type".to_string(),
            "oidc".to_string(),
        ),
        ("x-gitlab-authz-subject".to_string(), "smuggled".to_string()),
    ];
    if let Some(t) = token {
        headers.push(("authorization".to_string(), format!("Bearer {t}")));
    }
    headers
}

/// Runs one request as the filter does, answering a verify step as the sidecar would.
/// Returns the final step and whether the sidecar was asked.
fn run(
    sidecar: &Snapshot,
    feed: &CompiledFeed,
    cache: &mut VerifiedCache,
    headers: &Vec<(String, String)>,
) -> (Step, bool) {
    match step(Some(feed), cache, headers, now(), None) {
        Step::Verify { digest: key, raw } => {
            let answer = verify_token(sidecar, &raw, now());
            let again = step(Some(feed), cache, headers, now(), Some((key, answer)));
            assert!(!matches!(again, Step::Verify { .. }), "asked twice");
            (again, true)
        }
        other => (other, false),
    }
}

/// What the sidecar's decision comes to, as a step.
fn expected(sidecar: &Snapshot, headers: &Vec<(String, String)>) -> (u16, String) {
    let path = &headers[1].1;
    let req = Request {
        method: "POST",
        path,
        headers,
    };
    match decide(sidecar, &req, now()) {
        Decision::Allow(_) => (200, "allow".into()),
        Decision::Deny(d) => (d.reason.http_status(), d.reason.as_str().into()),
    }
}

fn outcome(step: &Step) -> (u16, String) {
    match step {
        Step::Allow { .. } => (200, "allow".into()),
        Step::Deny { response, facts } => (response.status, facts[1].1.clone()),
        Step::Verify { .. } => (0, "verify".into()),
    }
}

#[test]
fn before_the_first_snapshot_every_request_is_503_keys_unavailable() {
    let mut cache = VerifiedCache::new(8);
    let step = step(
        None,
        &mut cache,
        &headers("/ai/monitoring/x", None),
        now(),
        None,
    );
    let Step::Deny { response, .. } = step else {
        panic!("{step:?}")
    };
    assert_eq!(response.status, 503);
    assert!(
        response.body.contains(r#""error":"keys_unavailable""#),
        "{}",
        response.body
    );
    assert_eq!(response.headers, vec![("content-type", "application/json")]);
}

#[test]
fn the_filter_decides_as_the_sidecar_and_asks_once_per_token() {
    let key = DevKey::generate("k1").unwrap();
    let forger = DevKey::generate("k1").unwrap();
    let sidecar = sidecar(&key);
    let feed = feed_of(&sidecar);
    let mut cache = VerifiedCache::new(8);
    let good = token(&key, "gitlab-ai-gateway", &["complete_code"]);
    let cases = [
        headers("/ai/v2/code/x", Some(&good)),
        headers(
            "/ai/v2/code/x",
            Some(&token(&key, "gitlab-ai-gateway", &["duo_chat"])),
        ),
        headers(
            "/ai/v2/code/x",
            Some(&token(&key, "elsewhere", &["complete_code"])),
        ),
        headers(
            "/ai/v2/code/x",
            Some(&token(&forger, "gitlab-ai-gateway", &["complete_code"])),
        ),
        headers("/ai/v2/code/x", Some("not.a.jwt")),
        headers("/ai/v2/code/x", None),
        headers("/ai/v2/code/%2e%2e/x", Some(&good)),
        headers("/nowhere", Some(&good)),
        headers("/ai/monitoring/x", None),
        headers("/dry/x", Some(&good)),
    ];
    for headers in &cases {
        let (got, _) = run(&sidecar, &feed, &mut cache, headers);
        assert_eq!(outcome(&got), expected(&sidecar, headers), "{headers:?}");
    }
    // The good token was kept: a second request does not ask the sidecar.
    let (again, asked) = run(&sidecar, &feed, &mut cache, &cases[0]);
    assert!(!asked, "a verified token is asked for once");
    let Step::Allow { headers, facts } = again else {
        panic!("{again:?}")
    };
    assert!(
        headers
            .set
            .contains(&("x-gitlab-authz-subject".into(), "i-1".into()))
    );
    assert!(
        headers
            .set
            .contains(&("x-gitlab-authz-scopes".into(), "complete_code".into()))
    );
    assert!(headers.set.contains(&("x-instance".into(), "i-1".into())));
    assert!(
        headers
            .remove
            .contains(&"x-gitlab-authz-dry-run".to_string())
    );
    assert!(facts.contains(&("decision", "allow".into())));
    // The three tokens with a valid signature are kept (the decision after it may still
    // deny them); the forged and the malformed one are not.
    assert_eq!(cache.len(), 3);
    assert!(digest(&good) != digest("other"));
}

#[test]
fn a_deny_is_the_sidecars_response_and_a_dry_run_allow_says_why() {
    let key = DevKey::generate("k1").unwrap();
    let sidecar = sidecar(&key);
    let feed = feed_of(&sidecar);
    let mut cache = VerifiedCache::new(8);
    let scoped = token(&key, "gitlab-ai-gateway", &["duo_chat"]);
    let (step, _) = run(
        &sidecar,
        &feed,
        &mut cache,
        &headers("/ai/v2/code/x", Some(&scoped)),
    );
    let Step::Deny { response, .. } = step else {
        panic!("{step:?}")
    };
    assert_eq!(response.status, 403);
    assert!(response.headers.contains(&(
        "www-authenticate",
        r#"Bearer realm="connector-authz", error="insufficient_scope""#
    )));
    assert!(
        response
            .body
            .starts_with(r#"{"error":"insufficient_scope","message":"#)
    );
    let (step, _) = run(
        &sidecar,
        &feed,
        &mut cache,
        &headers("/dry/x", Some("garbage")),
    );
    let Step::Allow { headers, facts } = step else {
        panic!("{step:?}")
    };
    assert!(
        headers
            .set
            .contains(&("x-gitlab-authz-dry-run".into(), "malformed_token".into()))
    );
    assert!(
        headers
            .remove
            .contains(&"x-gitlab-authz-subject".to_string())
    );
    assert!(facts.contains(&("decision", "dry_run".into())));
}

#[test]
fn a_token_whose_key_left_the_snapshot_is_verified_again() {
    let key = DevKey::generate("k1").unwrap();
    let sidecar_before = sidecar(&key);
    let mut cache = VerifiedCache::new(8);
    let good = token(&key, "gitlab-ai-gateway", &["complete_code"]);
    let request = headers("/ai/v2/code/x", Some(&good));
    let (first, asked) = run(
        &sidecar_before,
        &feed_of(&sidecar_before),
        &mut cache,
        &request,
    );
    assert!(asked && matches!(first, Step::Allow { .. }));
    // The issuer rotated its key out: the snapshot lists another fingerprint.
    let mut rotated = feed_of(&sidecar_before);
    rotated.keys = BTreeMap::from([(ISS.to_string(), vec![1])]);
    let again = step(Some(&rotated), &mut cache, &request, now(), None);
    assert!(matches!(again, Step::Verify { .. }), "{again:?}");
}

/// Envoy hands the filter header values with bytes 0x80-0xff as they came: they are read
/// lossily and judged, as the sidecar judges them, not a panic of the VM.
#[test]
fn header_values_that_are_not_utf8_are_judged_like_any_other() {
    let key = DevKey::generate("k1").unwrap();
    let sidecar = sidecar(&key);
    let feed = feed_of(&sidecar);
    let good = token(&key, "gitlab-ai-gateway", &["complete_code"]);
    let as_bytes = |headers: Vec<(String, String)>| -> Vec<(String, Vec<u8>)> {
        headers
            .into_iter()
            .map(|(name, value)| (name, value.into_bytes()))
            .collect()
    };
    let mut bad_token = as_bytes(headers("/ai/v2/code/x", Some(&good)));
    bad_token.last_mut().unwrap().1.push(0xff);
    let mut bad_instance = as_bytes(headers("/ai/v2/code/x", Some(&good)));
    bad_instance[3].1.extend_from_slice(b"\xc3");
    let mut bad_other = as_bytes(headers("/ai/v2/code/x", Some(&good)));
    bad_other.push(("x-other".into(), b"\xff\xfe".to_vec()));
    for (raw, want) in [
        (bad_token, (401, "malformed_token".to_string())),
        (bad_instance, (401, "header_mismatch".to_string())),
        (bad_other, (200, "allow".to_string())),
    ] {
        let read = request_headers(raw);
        assert!(read.iter().any(|(_, v)| v.contains('\u{fffd}')), "{read:?}");
        let mut cache = VerifiedCache::new(8);
        let (step, _) = run(&sidecar, &feed, &mut cache, &read);
        assert_eq!(outcome(&step), want);
        assert_eq!(expected(&sidecar, &read), want);
    }
}
