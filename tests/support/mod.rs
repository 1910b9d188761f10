//! Helpers shared by the integration tests: fixed signing keys, claims, a fake issuer.
// Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code, unused_imports)]

pub mod issuer;
pub mod procs;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use connector_authz::dev::DevKey;
use connector_authz::proto::envoy::service::auth::v3::CheckRequest;
use serde_json::{Value, json};

pub use issuer::{FakeIssuer, Mode};

const FIXTURES: [&str; 3] = [
    include_str!("../fixtures/keys/test-rsa-2048-1.pem"),
    include_str!("../fixtures/keys/test-rsa-2048-2.pem"),
    include_str!("../fixtures/keys/test-rsa-2048-3.pem"),
];

/// Fixed RSA-2048 test key `n` (1, 2 or 3) with kid `test-key-{n}`. Loading is fast;
/// generating a fresh key in a debug build is not.
pub fn test_key(n: usize) -> DevKey {
    let pem = FIXTURES
        .get(n.wrapping_sub(1))
        .unwrap_or_else(|| panic!("test keys are 1..=3, not {n}"));
    DevKey::from_pkcs8_pem(pem, format!("test-key-{n}")).expect("fixture key loads")
}

/// Fixed test key `n` published under another kid (two issuers may reuse a kid).
pub fn test_key_with_kid(n: usize, kid: &str) -> DevKey {
    let pem = FIXTURES
        .get(n.wrapping_sub(1))
        .unwrap_or_else(|| panic!("test keys are 1..=3, not {n}"));
    DevKey::from_pkcs8_pem(pem, kid).expect("fixture key loads")
}

/// The public JWK of a 1024-bit RSA key: too small to be accepted.
pub fn small_rsa_jwk() -> Value {
    serde_json::from_str(include_str!(
        "../fixtures/keys/test-rsa-1024.public.jwk.json"
    ))
    .expect("fixture JWK parses")
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Claims shaped like a Cloud Connector service token, issued now.
pub fn claims(iss: &str, aud: &str, scopes: &[&str], exp: u64) -> Value {
    let now = now();
    json!({
        "iss": iss,
        "aud": aud,
        "sub": "test-instance-id",
        "scopes": scopes,
        "iat": now,
        "nbf": now,
        "exp": exp,
        "jti": format!("test-{now}"),
        "gitlab_realm": "self-managed",
        "gitlab_instance_id": "test-instance-id",
    })
}

/// Polls `done` every 20 ms until it holds (`true`) or `limit` has passed (`false`): a
/// wait for a condition with a generous deadline, never a measure of how long it took.
pub async fn within(limit: Duration, mut done: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// How many finished key sets (`*.jwks.json`) the key cache directory holds. A key set is
/// written to a temporary file and renamed, so counting any entry would race the rename.
pub fn finished_key_sets(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".jwks.json"))
            .count()
    })
}

/// The headers a GitLab instance sends with its token (they match what [`claims`] puts in
/// the token), without the `authorization` header.
pub const INSTANCE_HEADERS: [(&str, &str); 3] = [
    ("x-gitlab-realm", "self-managed"),
    ("x-gitlab-instance-id", "test-instance-id"),
    ("x-gitlab-authentication-type", "oidc"),
];

/// [`INSTANCE_HEADERS`] with `authorization: Bearer <token>`.
pub fn instance_headers(token: &str) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = INSTANCE_HEADERS
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    headers.push(("authorization".into(), format!("Bearer {token}")));
    headers
}

/// The CheckRequest Envoy sends for one HTTP request, with `headers` in the `headers` map
/// as given (Envoy sends their names in lower case).
pub fn check_request<K: AsRef<str>, V: AsRef<str>>(
    method: &str,
    path: &str,
    headers: impl IntoIterator<Item = (K, V)>,
) -> CheckRequest {
    let headers = headers
        .into_iter()
        .map(|(name, value)| (name.as_ref().to_owned(), value.as_ref().to_owned()))
        .collect();
    connector_authz::grpc::http_check_request(method, path, headers)
}
