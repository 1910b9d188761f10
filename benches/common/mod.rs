//! What the benches and the load-test examples share: one issuer with the fixed test key,
//! the AI gateway routes, a token shaped like a CustomersDot service token, and the
//! headers Envoy's ext_authz filter sends with it.
// Each bench and example compiles this on its own and uses only part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use connector_authz::config::Config;
use connector_authz::decide::Snapshot;
use connector_authz::dev::DevKey;
use connector_authz::keys::jwks::{KeyLimits, parse_key_set};
use connector_authz::keys::{KeySnapshot, KeySource};
use serde_json::{Value, json};

pub const ISSUER: &str = "https://customers.gitlab.com";
pub const AUDIENCE: &str = "gitlab-ai-gateway";
pub const INSTANCE: &str = "0f1b7a53-6e34-4c1e-9a0c-2a7d6b1d9e42";
pub const PATH: &str = "/ai/v2/code/completions";
pub const KID: &str = "test-key-1";

/// The unit primitives a Duo Enterprise instance's token grants (a dozen, as real ones do).
pub const SCOPES: [&str; 12] = [
    "code_suggestions",
    "complete_code",
    "generate_code",
    "duo_chat",
    "documentation_search",
    "explain_vulnerability",
    "resolve_vulnerability",
    "summarize_comments",
    "troubleshoot_job",
    "explain_code",
    "fix_code",
    "refactor_code",
];

pub fn key() -> DevKey {
    DevKey::from_pkcs8_pem(
        include_str!("../../tests/fixtures/keys/test-rsa-2048-1.pem"),
        KID,
    )
    .expect("fixture key")
}

/// Another key under the same kid: its signatures do not verify.
pub fn wrong_key() -> DevKey {
    DevKey::from_pkcs8_pem(
        include_str!("../../tests/fixtures/keys/test-rsa-2048-2.pem"),
        KID,
    )
    .expect("fixture key")
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Claims shaped like a CustomersDot token for a self-managed instance, valid for `ttl` s.
pub fn claims(jti: &str, scopes: &[&str], ttl: u64) -> Value {
    let now = now_secs();
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": INSTANCE,
        "jti": jti,
        "iat": now - 5,
        "nbf": now - 5,
        "exp": now + ttl,
        "scopes": scopes,
        "gitlab_realm": "self-managed",
        "gitlab_instance_id": INSTANCE,
    })
}

pub fn token(jti: &str) -> String {
    key().sign(&claims(jti, &SCOPES, 3 * 24 * 3600))
}

pub fn registry_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cloud_connector")
}

/// The connector-authz configuration of the benches, with the extra YAML lines `tokens`
/// (indented by two spaces) and the listeners.
pub fn config_yaml(jwks_file: &Path, grpc: &str, admin: &str, tokens: &str) -> String {
    format!(
        "listen:
  grpc: {grpc}
  admin: {admin}
issuers:
  - url: {ISSUER}
    jwks_file: {jwks}
tokens:
  algorithms: [RS256]
  leeway: 30s
{tokens}
unit_primitives: {registry}
backends:
  - name: ai_gateway
    backend_service: ai_gateway
    routes:
      - path: /ai/v2/code/completions
        methods: [POST]
        require: [complete_code]
      - path: /ai/v2/code/generations
        methods: [POST]
        require: [generate_code]
      - path: /ai/v1/chat/agent
        methods: [POST]
        require: [duo_chat]
      - prefix: /ai/v1/proxy/
        unit_primitive_header: x-gitlab-unit-primitive
      - prefix: /ai/monitoring/
        public: true
",
        jwks = jwks_file.display(),
        registry = registry_dir().display(),
    )
}

pub fn jwks_json() -> String {
    DevKey::key_set_json(&[&key()]).to_string()
}

/// The bench configuration with its keys loaded, as a running sidecar holds it.
pub fn snapshot() -> Snapshot {
    let config = Config::from_yaml(
        &config_yaml(
            Path::new("/unused/jwks.json"),
            "127.0.0.1:0",
            "127.0.0.1:0",
            "",
        ),
        Path::new("/bench/connector-authz.yaml"),
    )
    .expect("bench config");
    let jwks = jwks_json();
    let set = parse_key_set(
        jwks.as_bytes(),
        KeySource::File,
        SystemTime::now(),
        &KeyLimits::default(),
    )
    .expect("bench key set")
    .key_set;
    let keys = KeySnapshot::default().with_issuer(ISSUER.into(), Arc::new(set));
    Snapshot::new(Arc::new(config), Arc::new(keys))
}

/// The request headers as Envoy's ext_authz filter passes them (`headers` map, lower case,
/// pseudo-headers included), with `authorization` when a token is given.
pub fn envoy_headers(token: Option<&str>) -> HashMap<String, String> {
    let mut headers: HashMap<String, String> = [
        (":authority", "cloud.gitlab.com"),
        (":method", "POST"),
        (":path", PATH),
        (":scheme", "https"),
        ("content-type", "application/json"),
        ("content-length", "1024"),
        ("user-agent", "gitlab-workhorse/17.5.0"),
        ("accept", "*/*"),
        ("x-forwarded-proto", "https"),
        ("x-request-id", "3b3c5d0e-8f2a-4c6b-9d1e-7a6f5e4d3c2b"),
        ("x-gitlab-realm", "self-managed"),
        ("x-gitlab-instance-id", INSTANCE),
        ("x-gitlab-authentication-type", "oidc"),
        ("x-gitlab-global-user-id", "Rf8kBn7pS0x2dYq1"),
        ("x-gitlab-host-name", "gitlab.example.com"),
        ("x-gitlab-version", "17.5.0"),
        ("x-gitlab-feature-enabled-by-namespace-ids", "42"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if let Some(token) = token {
        headers.insert("authorization".into(), format!("Bearer {token}"));
    }
    headers
}
