//! The sidecar as Envoy sees it: the real server on ephemeral loopback ports, keys
//! fetched from fake OIDC issuers over HTTP, and Check called with a tonic client.
//! Every row of DESIGN.md's decision table is reached here with its status and reason.

mod support;

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use connector_authz::config::Config;
use connector_authz::dev::DevKey;
use connector_authz::proto::envoy::config::core::v3::HeaderValueOption;
use connector_authz::proto::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, authorization_client::AuthorizationClient, check_response,
};
use connector_authz::serve::{self, Running};
use serde_json::{Value, json};
use support::{FakeIssuer, Mode, claims, now, test_key, test_key_with_kid};
use tonic::transport::Channel;

const AUDIENCE: &str = "gitlab-ai-gateway";
const INSTANCE: &str = "test-instance-id";
const CODE: &str = "/ai/v2/code/completions";
const GENERATIONS: &str = "/ai/v2/code/generations";
/// The audience of the backend in `mode: dry_run`.
const DRY_AUDIENCE: &str = "dry-run-backend";

struct Harness {
    running: Running,
    client: AuthorizationClient<Channel>,
    /// Discovery issuer; keys 1 (`test-key-1`) and 1 again as `shared`.
    a: FakeIssuer,
    /// `jwks_uri` issuer; keys 2 (`test-key-2`) and 2 again as `shared`.
    b: FakeIssuer,
    /// Down when the sidecar starts: no keys.
    down: FakeIssuer,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Harness {
        let a = FakeIssuer::start(&[&test_key(1), &test_key_with_kid(1, "shared")]).await;
        let b = FakeIssuer::start(&[&test_key(2), &test_key_with_kid(2, "shared")]).await;
        let down = FakeIssuer::start(&[&test_key(3)]).await;
        down.set_mode(Mode::Down(503));
        let dir = tempfile::tempdir().expect("temp dir");
        // User tokens are minted by the backend itself: iss = the backend's audience.
        let user_jwks = dir.path().join("user-jwks.json");
        std::fs::write(
            &user_jwks,
            DevKey::key_set_json(&[&test_key(3)]).to_string(),
        )
        .unwrap();
        let registry = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cloud_connector");
        let yaml = format!(
            "listen: {{grpc: 127.0.0.1:0, admin: 127.0.0.1:0}}
issuers:
  - url: {a}
  - url: {b}
    jwks_uri: {b_jwks}
  - url: {down}
  - url: {AUDIENCE}
    jwks_file: {user_jwks}
keys:
  fetch_timeout: 2s
unit_primitives: {registry}
enforce_min_version: true
backends:
  - name: ai_gateway
    backend_service: ai_gateway
    routes:
      - prefix: /ai/v2/code/
        require: [complete_code]
      - path: /ai/v1/chat/agent
        methods: [POST]
        require: [duo_chat]
      - prefix: /ai/v1/proxy/
        unit_primitive_header: x-gitlab-unit-primitive
      - prefix: /ai/monitoring/
        public: true
      - path: /ai/v2/code/generations
        methods: [POST]
        require_any: [generate_code, code_suggestions]
        user_tokens: false
    forward_claims:
      gitlab_instance_id: x-gitlab-authz-instance-id
      gitlab_realm: x-gitlab-authz-realm
      gitlab_root_namespace_id: x-gitlab-authz-root-namespace-id
  - name: dry
    audience: {DRY_AUDIENCE}
    mode: dry_run
    forward_claims:
      gitlab_instance_id: x-gitlab-authz-instance-id
    routes:
      - prefix: /dry/
        require: [duo_chat]
      - path: /dry/open
        public: true
",
            a = a.url(),
            b = b.url(),
            b_jwks = b.jwks_url(),
            down = down.url(),
            user_jwks = user_jwks.display(),
            registry = registry.display(),
        );
        let config = Config::from_yaml(&yaml, &dir.path().join("config.yaml"))
            .expect("test config is valid");
        let running = serve::start(config).await.expect("server starts");
        let client = AuthorizationClient::connect(format!("http://{}", running.grpc_addr))
            .await
            .expect("client connects");
        Harness {
            running,
            client,
            a,
            b,
            down,
            _dir: dir,
        }
    }

    async fn check(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Outcome {
        let response = self
            .client
            .clone()
            .check(support::check_request(
                method,
                path,
                headers.iter().copied(),
            ))
            .await
            .expect("Check is a successful RPC")
            .into_inner();
        Outcome::from(response)
    }

    /// A Check with the headers a GitLab instance sends, plus `extra`, and `token`.
    async fn check_token(&self, path: &str, token: &str, extra: &[(&str, &str)]) -> Outcome {
        let bearer = format!("Bearer {token}");
        let mut headers = vec![
            ("authorization", bearer.as_str()),
            ("x-gitlab-realm", "self-managed"),
            ("x-gitlab-instance-id", INSTANCE),
            ("x-gitlab-authentication-type", "oidc"),
            ("x-gitlab-version", "17.5.0-ee"),
        ];
        for (k, v) in extra {
            headers.retain(|(name, _)| name != k);
            if !v.is_empty() {
                headers.push((k, v));
            }
        }
        self.check("POST", path, &headers).await
    }
}

/// A CheckResponse read back as what Envoy would do with it.
#[derive(Debug)]
struct Outcome {
    allowed: bool,
    status: i32,
    reason: String,
    headers: HashMap<String, String>,
    removed: Vec<String>,
    body: Value,
}

impl From<CheckResponse> for Outcome {
    fn from(r: CheckResponse) -> Self {
        let grpc_code = r.status.as_ref().map_or(0, |s| s.code);
        let pairs = |hs: &[HeaderValueOption]| -> HashMap<String, String> {
            hs.iter()
                .filter_map(|h| h.header.as_ref())
                .map(|h| (h.key.clone(), h.value.clone()))
                .collect()
        };
        match r.http_response {
            Some(check_response::HttpResponse::OkResponse(ok)) => {
                assert_eq!(grpc_code, 0, "an OK response must carry status 0");
                Outcome {
                    allowed: true,
                    status: 200,
                    reason: String::new(),
                    headers: pairs(&ok.headers),
                    removed: ok.headers_to_remove,
                    body: Value::Null,
                }
            }
            Some(check_response::HttpResponse::DeniedResponse(denied)) => {
                assert_ne!(grpc_code, 0, "a denied response must carry a non-OK status");
                let body: Value =
                    serde_json::from_str(&denied.body).expect("the denied body is JSON");
                Outcome {
                    allowed: false,
                    status: denied.status.map_or(0, |s| s.code),
                    reason: body["error"].as_str().unwrap_or_default().to_string(),
                    headers: pairs(&denied.headers),
                    removed: Vec::new(),
                    body,
                }
            }
            None => panic!("a CheckResponse without an http_response: {r:?}"),
        }
    }
}

impl Outcome {
    #[track_caller]
    fn assert_denied(&self, status: i32, reason: &str) {
        assert!(
            !self.allowed,
            "expected {status} {reason}, got an allow: {self:?}"
        );
        assert_eq!(
            (self.status, self.reason.as_str()),
            (status, reason),
            "{self:?}"
        );
        assert_eq!(
            self.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert!(
            self.body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{self:?}"
        );
        if status == 401 || status == 403 {
            let challenge = self
                .headers
                .get("www-authenticate")
                .expect("401 and 403 carry WWW-Authenticate");
            assert!(
                challenge.starts_with("Bearer realm=\"connector-authz\""),
                "{challenge}"
            );
        }
    }

    #[track_caller]
    fn assert_allowed(&self) {
        assert!(self.allowed, "expected an allow, got {self:?}");
    }
}

fn token(key: &DevKey, iss: &str, scopes: &[&str]) -> String {
    key.sign(&claims(iss, AUDIENCE, scopes, now() + 600))
}

fn with(mut claims: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            claims.as_object_mut().unwrap().remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn a_valid_token_is_allowed_with_the_upstream_headers() {
    let h = Harness::start().await;
    let out = h
        .check_token(
            CODE,
            &token(&test_key(1), &h.a.url(), &["complete_code", "duo_chat"]),
            &[],
        )
        .await;
    out.assert_allowed();
    assert_eq!(out.headers["x-gitlab-authz-subject"], INSTANCE);
    assert_eq!(
        out.headers["x-gitlab-authz-issuer"],
        h.a.url().trim_end_matches('/')
    );
    assert_eq!(
        out.headers["x-gitlab-authz-scopes"],
        "complete_code duo_chat"
    );
    // The issuer reached by jwks_uri (no discovery) works the same way.
    h.check_token(
        CODE,
        &token(&test_key(2), &h.b.url(), &["complete_code"]),
        &[],
    )
    .await
    .assert_allowed();
    // A trailing slash on iss names the same issuer.
    let slash = format!("{}/", h.a.url().trim_end_matches('/'));
    h.check_token(CODE, &token(&test_key(1), &slash, &["complete_code"]), &[])
        .await
        .assert_allowed();
    h.running.shutdown().await;
}

#[tokio::test]
async fn routing_denies_with_no_route_and_bad_path() {
    let h = Harness::start().await;
    let t = token(&test_key(1), &h.a.url(), &["complete_code", "duo_chat"]);
    h.check_token("/ai/v3/unknown", &t, &[])
        .await
        .assert_denied(403, "no_route");
    // POST only: a GET on the chat path matches no route.
    let bearer = format!("Bearer {t}");
    h.check(
        "GET",
        "/ai/v1/chat/agent",
        &[
            ("authorization", &bearer),
            ("x-gitlab-instance-id", INSTANCE),
            ("x-gitlab-authentication-type", "oidc"),
            ("x-gitlab-realm", "self-managed"),
        ],
    )
    .await
    .assert_denied(403, "no_route");
    h.check_token("/ai/v2/code%2fcompletions", &t, &[])
        .await
        .assert_denied(400, "bad_path");
    h.check_token("/ai/v2/code/\0", &t, &[])
        .await
        .assert_denied(400, "bad_path");
    // The query string is not part of the path.
    h.check_token("/ai/v2/code/completions?next=/ai/monitoring/", &t, &[])
        .await
        .assert_allowed();
    h.running.shutdown().await;
}

#[tokio::test]
async fn a_dot_segment_path_cannot_reach_a_public_route() {
    let h = Harness::start().await;
    h.check("GET", "/ai/monitoring/health", &[])
        .await
        .assert_allowed();
    for sneaky in [
        "/ai/monitoring/../v2/code/completions",
        "/ai/monitoring/%2e%2e/v2/code/completions",
        "/ai/monitoring/%2E%2e/v2/code/completions",
        "/ai/monitoring/./../v2/code/completions",
    ] {
        let out = h.check("POST", sneaky, &[]).await;
        assert!(!out.allowed, "{sneaky} reached a public route: {out:?}");
        out.assert_denied(401, "missing_token");
    }
    // `..` right after an empty segment reads two ways (merge first or not): refused.
    h.check("POST", "/ai/monitoring//../v2/code/completions", &[])
        .await
        .assert_denied(400, "bad_path");
    h.running.shutdown().await;
}

#[tokio::test]
async fn public_routes_need_no_token_and_strip_smuggled_identity_headers() {
    let h = Harness::start().await;
    let out = h
        .check(
            "GET",
            "/ai/monitoring/health",
            &[("x-gitlab-authz-subject", "admin")],
        )
        .await;
    out.assert_allowed();
    assert!(
        out.removed.iter().any(|r| r == "x-gitlab-authz-subject"),
        "{out:?}"
    );
    assert!(!out.headers.contains_key("x-gitlab-authz-subject"));
    h.running.shutdown().await;
}

#[tokio::test]
async fn token_presence_and_shape() {
    let h = Harness::start().await;
    let out = h.check("POST", CODE, &[]).await;
    out.assert_denied(401, "missing_token");
    assert_eq!(
        out.headers["www-authenticate"],
        "Bearer realm=\"connector-authz\""
    );
    h.check("POST", CODE, &[("authorization", "Basic dXNlcjpwYXNz")])
        .await
        .assert_denied(401, "missing_token");
    let out = h
        .check("POST", CODE, &[("authorization", "Bearer not-a-jwt")])
        .await;
    out.assert_denied(401, "malformed_token");
    assert_eq!(
        out.headers["www-authenticate"],
        "Bearer realm=\"connector-authz\", error=\"invalid_token\""
    );
    let t = token(&test_key(1), &h.a.url(), &["complete_code"]);
    h.check(
        "POST",
        CODE,
        &[("authorization", &format!("Bearer {t},Bearer {t}"))],
    )
    .await
    .assert_denied(401, "malformed_token");
    let huge = format!("Bearer {}", "a".repeat(9000));
    let out = h.check("POST", CODE, &[("authorization", &huge)]).await;
    out.assert_denied(401, "malformed_token");
    assert!(
        !out.body.to_string().contains("aaaa"),
        "the body must not echo the token"
    );
    h.running.shutdown().await;
}

#[tokio::test]
async fn forged_tokens_are_rejected() {
    let h = Harness::start().await;
    let key = test_key(1);
    let iss = h.a.url();
    let good = claims(&iss, AUDIENCE, &["complete_code"], now() + 600);
    // alg none, with and without a signature segment.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&good)
    );
    h.check_token(CODE, &none, &[])
        .await
        .assert_denied(401, "malformed_token");
    let none_sig = format!("{}.{}.c2ln", b64(&json!({"alg": "none"})), b64(&good));
    h.check_token(CODE, &none_sig, &[])
        .await
        .assert_denied(401, "unsupported_algorithm");
    let none_caps = format!("{}.{}.c2ln", b64(&json!({"alg": "NoNe"})), b64(&good));
    h.check_token(CODE, &none_caps, &[])
        .await
        .assert_denied(401, "unsupported_algorithm");
    // HS256 "signed" with the issuer's public key, as PEM text and as the JWK's modulus.
    let header = json!({"alg": "HS256", "kid": "test-key-1"});
    let signing_input = format!("{}.{}", b64(&header), b64(&good));
    for secret in [
        key.public_jwk().to_string(),
        key.public_jwk()["n"].as_str().unwrap().to_string(),
    ] {
        let mac = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret.as_bytes()),
            signing_input.as_bytes(),
        );
        let forged = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()));
        h.check_token(CODE, &forged, &[])
            .await
            .assert_denied(401, "unsupported_algorithm");
    }
    // A tampered payload: more scopes than were signed.
    let signed = key.sign(&good);
    let mut parts: Vec<&str> = signed.split('.').collect();
    let more = b64(&with(
        good.clone(),
        json!({"scopes": ["complete_code", "duo_chat"]}),
    ));
    parts[1] = &more;
    h.check_token(CODE, &parts.join("."), &[])
        .await
        .assert_denied(401, "bad_signature");
    // Signed by a key the issuer never published, under one of its kids.
    let imposter = test_key_with_kid(3, "test-key-1");
    h.check_token(CODE, &imposter.sign(&good), &[])
        .await
        .assert_denied(401, "bad_signature");
    h.running.shutdown().await;
}

#[tokio::test]
async fn keys_belong_to_their_issuer() {
    let h = Harness::start().await;
    let (a, b) = (h.a.url(), h.b.url());
    // Both issuers publish a key with kid "shared"; each verifies only its own tokens.
    h.check_token(
        CODE,
        &token(&test_key_with_kid(1, "shared"), &a, &["complete_code"]),
        &[],
    )
    .await
    .assert_allowed();
    h.check_token(
        CODE,
        &token(&test_key_with_kid(2, "shared"), &b, &["complete_code"]),
        &[],
    )
    .await
    .assert_allowed();
    h.check_token(
        CODE,
        &token(&test_key_with_kid(2, "shared"), &a, &["complete_code"]),
        &[],
    )
    .await
    .assert_denied(401, "bad_signature");
    h.check_token(
        CODE,
        &token(&test_key_with_kid(1, "shared"), &b, &["complete_code"]),
        &[],
    )
    .await
    .assert_denied(401, "bad_signature");
    // A token of issuer A signed with issuer B's key (B's kid): A has no such key.
    h.check_token(CODE, &token(&test_key(2), &a, &["complete_code"]), &[])
        .await
        .assert_denied(401, "unknown_key");
    h.running.shutdown().await;
}

#[tokio::test]
async fn issuer_and_key_availability() {
    let h = Harness::start().await;
    h.check_token(
        CODE,
        &token(&test_key(1), "https://evil.example", &["complete_code"]),
        &[],
    )
    .await
    .assert_denied(401, "unknown_issuer");
    let no_iss = test_key(1).sign(&with(
        claims("x", AUDIENCE, &["complete_code"], now() + 600),
        json!({"iss": null}),
    ));
    h.check_token(CODE, &no_iss, &[])
        .await
        .assert_denied(401, "unknown_issuer");
    let out = h
        .check_token(
            CODE,
            &token(&test_key(3), &h.down.url(), &["complete_code"]),
            &[],
        )
        .await;
    out.assert_denied(503, "keys_unavailable");
    assert!(!out.headers.contains_key("www-authenticate"));
    h.check_token(
        CODE,
        &token(
            &test_key_with_kid(1, "rotated-away"),
            &h.a.url(),
            &["complete_code"],
        ),
        &[],
    )
    .await
    .assert_denied(401, "unknown_key");
    h.running.shutdown().await;
}

#[tokio::test]
async fn time_and_audience() {
    let h = Harness::start().await;
    let (key, iss) = (test_key(1), h.a.url());
    let base = claims(&iss, AUDIENCE, &["complete_code"], now() + 600);
    let sign = |changes: Value| key.sign(&with(base.clone(), changes));
    h.check_token(CODE, &sign(json!({"exp": now() - 120})), &[])
        .await
        .assert_denied(401, "expired");
    h.check_token(CODE, &sign(json!({"exp": null})), &[])
        .await
        .assert_denied(401, "expired");
    h.check_token(CODE, &sign(json!({"exp": now() - 10})), &[])
        .await
        .assert_allowed(); // within the 30 s leeway
    h.check_token(CODE, &sign(json!({"nbf": now() + 3600})), &[])
        .await
        .assert_denied(401, "not_yet_valid");
    h.check_token(CODE, &sign(json!({"iat": now() + 3600})), &[])
        .await
        .assert_denied(401, "not_yet_valid");
    h.check_token(CODE, &sign(json!({"aud": "gitlab-other-service"})), &[])
        .await
        .assert_denied(401, "wrong_audience");
    h.check_token(CODE, &sign(json!({"aud": ["x", AUDIENCE]})), &[])
        .await
        .assert_allowed();
    h.check_token(CODE, &sign(json!({"aud": null})), &[])
        .await
        .assert_denied(401, "wrong_audience");
    h.running.shutdown().await;
}

#[tokio::test]
async fn instance_headers_must_match_the_claims() {
    let h = Harness::start().await;
    let t = token(&test_key(1), &h.a.url(), &["complete_code"]);
    h.check_token(CODE, &t, &[("x-gitlab-realm", "saas")])
        .await
        .assert_denied(401, "header_mismatch");
    h.check_token(CODE, &t, &[("x-gitlab-realm", "")])
        .await
        .assert_denied(401, "header_mismatch");
    h.check_token(CODE, &t, &[("x-gitlab-instance-id", "someone-else")])
        .await
        .assert_denied(401, "header_mismatch");
    h.check_token(CODE, &t, &[("x-gitlab-instance-id", "")])
        .await
        .assert_denied(401, "header_mismatch");
    h.check_token(CODE, &t, &[("x-gitlab-authentication-type", "basic")])
        .await
        .assert_denied(401, "header_mismatch");
    h.check_token(CODE, &t, &[("x-gitlab-authentication-type", "oidc")])
        .await
        .assert_allowed();
    // Required: GitLab instances always send it, and the AI gateway refuses a request
    // without it.
    h.check_token(CODE, &t, &[("x-gitlab-authentication-type", "")])
        .await
        .assert_denied(401, "header_mismatch");
    // Without the optional claims, only sub (the instance id) has to match.
    let plain = test_key(1).sign(&with(
        claims(&h.a.url(), AUDIENCE, &["complete_code"], now() + 600),
        json!({"gitlab_realm": null, "gitlab_instance_id": null}),
    ));
    h.check_token(CODE, &plain, &[("x-gitlab-realm", "")])
        .await
        .assert_allowed();
    h.check_token(CODE, &plain, &[("x-gitlab-instance-id", "other")])
        .await
        .assert_denied(401, "header_mismatch");
    // A claim that is the empty string counts as absent, as it does for null: no header
    // is compared with it.
    let empty = test_key(1).sign(&with(
        claims(&h.a.url(), AUDIENCE, &["complete_code"], now() + 600),
        json!({"gitlab_realm": "", "gitlab_instance_id": ""}),
    ));
    h.check_token(CODE, &empty, &[("x-gitlab-realm", "")])
        .await
        .assert_allowed();
    h.check_token(CODE, &empty, &[("x-gitlab-realm", "saas")])
        .await
        .assert_allowed();
    // sub still names the instance.
    h.check_token(CODE, &empty, &[("x-gitlab-instance-id", "other")])
        .await
        .assert_denied(401, "header_mismatch");
    h.running.shutdown().await;
}

#[tokio::test]
async fn a_user_token_must_match_the_global_user_id() {
    let h = Harness::start().await;
    // Minted by the AI gateway itself: iss and aud are its own name, sub is the user.
    let user = test_key(3).sign(&json!({
        "iss": AUDIENCE, "aud": AUDIENCE, "sub": "user-42", "exp": now() + 600, "iat": now(),
        "scopes": ["complete_code"],
    }));
    let bearer = format!("Bearer {user}");
    let auth = ("authorization", bearer.as_str());
    let version = ("x-gitlab-version", "17.5.0");
    let oidc = ("x-gitlab-authentication-type", "oidc");
    h.check(
        "POST",
        CODE,
        &[auth, version, oidc, ("x-gitlab-global-user-id", "user-42")],
    )
    .await
    .assert_allowed();
    h.check(
        "POST",
        CODE,
        &[auth, version, oidc, ("x-gitlab-global-user-id", "user-43")],
    )
    .await
    .assert_denied(401, "header_mismatch");
    h.check("POST", CODE, &[auth, version, oidc])
        .await
        .assert_denied(401, "header_mismatch");
    h.running.shutdown().await;
}

#[tokio::test]
async fn scopes_must_hold_every_required_unit_primitive() {
    let h = Harness::start().await;
    let out = h
        .check_token(CODE, &token(&test_key(1), &h.a.url(), &["duo_chat"]), &[])
        .await;
    out.assert_denied(403, "insufficient_scope");
    assert_eq!(
        out.headers["www-authenticate"],
        "Bearer realm=\"connector-authz\", error=\"insufficient_scope\""
    );
    assert!(
        out.body["message"]
            .as_str()
            .unwrap()
            .contains("complete_code")
    );
    h.check_token(CODE, &token(&test_key(1), &h.a.url(), &[]), &[])
        .await
        .assert_denied(403, "insufficient_scope");
    let no_scopes = test_key(1).sign(&with(
        claims(&h.a.url(), AUDIENCE, &[], now() + 600),
        json!({"scopes": null}),
    ));
    h.check_token(CODE, &no_scopes, &[])
        .await
        .assert_denied(403, "insufficient_scope");
    h.running.shutdown().await;
}

#[tokio::test]
async fn a_header_named_unit_primitive_must_be_known_and_granted() {
    let h = Harness::start().await;
    let t = token(&test_key(1), &h.a.url(), &["explain_vulnerability"]);
    let proxy = "/ai/v1/proxy/vertex-ai";
    h.check_token(proxy, &t, &[])
        .await
        .assert_denied(400, "bad_unit_primitive");
    h.check_token(proxy, &t, &[("x-gitlab-unit-primitive", "make_coffee")])
        .await
        .assert_denied(400, "bad_unit_primitive");
    h.check_token(proxy, &t, &[("x-gitlab-unit-primitive", "duo_chat")])
        .await
        .assert_denied(403, "insufficient_scope");
    let out = h
        .check_token(
            proxy,
            &t,
            &[("x-gitlab-unit-primitive", "explain_vulnerability")],
        )
        .await;
    out.assert_allowed();
    assert_eq!(
        out.headers["x-gitlab-authz-unit-primitive"],
        "explain_vulnerability"
    );
    h.running.shutdown().await;
}

#[tokio::test]
async fn the_minimum_gitlab_version_is_enforced() {
    let h = Harness::start().await;
    let t = token(&test_key(1), &h.a.url(), &["complete_code"]);
    let out = h
        .check_token(CODE, &t, &[("x-gitlab-version", "16.10.1-ee")])
        .await;
    out.assert_denied(403, "version_too_old");
    assert!(
        out.body["message"].as_str().unwrap().contains("17.3.0"),
        "{out:?}"
    );
    h.check_token(CODE, &t, &[("x-gitlab-version", "")])
        .await
        .assert_denied(403, "version_too_old");
    h.check_token(CODE, &t, &[("x-gitlab-version", "banana")])
        .await
        .assert_denied(403, "version_too_old");
    h.check_token(CODE, &t, &[("x-gitlab-version", "17.3.0-pre")])
        .await
        .assert_denied(403, "version_too_old");
    h.check_token(CODE, &t, &[("x-gitlab-version", "17.3.0-ee")])
        .await
        .assert_allowed();
    h.running.shutdown().await;
}

#[tokio::test]
async fn a_malformed_check_request_is_a_grpc_error() {
    let h = Harness::start().await;
    let err = h
        .client
        .clone()
        .check(CheckRequest { attributes: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    h.running.shutdown().await;
}

#[tokio::test]
async fn readiness_lists_the_issuers_without_keys() {
    let h = Harness::start().await;
    let admin = format!("http://{}", h.running.admin_addr);
    let client = reqwest::Client::new();
    let live = client.get(format!("{admin}/healthz")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    let ready = client.get(format!("{admin}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = serde_json::from_slice(&ready.bytes().await.unwrap()).unwrap();
    assert_eq!(
        body["issuers_without_keys"],
        json!([h.down.url().trim_end_matches('/')])
    );
    let channel = Channel::from_shared(format!("http://{}", h.running.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    h.running.shutdown().await;
}

/// A user token: minted by the AI gateway itself (iss and aud are its own name), for `user`.
fn user_token(user: &str, scopes: &[&str]) -> String {
    test_key(3).sign(&json!({
        "iss": AUDIENCE, "aud": AUDIENCE, "sub": user, "exp": now() + 600, "iat": now(),
        "scopes": scopes,
    }))
}

#[tokio::test]
async fn require_any_needs_one_of_its_unit_primitives() {
    let h = Harness::start().await;
    for scopes in [
        &["generate_code"][..],
        &["code_suggestions"],
        &["duo_chat", "generate_code"],
    ] {
        h.check_token(GENERATIONS, &token(&test_key(1), &h.a.url(), scopes), &[])
            .await
            .assert_allowed();
    }
    let out = h
        .check_token(
            GENERATIONS,
            &token(&test_key(1), &h.a.url(), &["complete_code"]),
            &[],
        )
        .await;
    out.assert_denied(403, "insufficient_scope");
    let message = out.body["message"].as_str().unwrap();
    assert!(
        message.contains("generate_code") && message.contains("code_suggestions"),
        "{message}"
    );
    h.check_token(GENERATIONS, &token(&test_key(1), &h.a.url(), &[]), &[])
        .await
        .assert_denied(403, "insufficient_scope");
    h.running.shutdown().await;
}

#[tokio::test]
async fn user_tokens_false_refuses_user_tokens_after_the_header_checks() {
    let h = Harness::start().await;
    let user = user_token("user-42", &["generate_code", "complete_code"]);
    let bearer = format!("Bearer {user}");
    let headers = |user_id: &'static str| {
        vec![
            ("authorization", bearer.clone()),
            ("x-gitlab-authentication-type", "oidc".to_owned()),
            ("x-gitlab-global-user-id", user_id.to_owned()),
            ("x-gitlab-version", "17.5.0".to_owned()),
        ]
    };
    let check = |path: &'static str, headers: Vec<(&'static str, String)>| {
        let h = &h;
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            h.check("POST", path, &headers).await
        }
    };
    // Refused where GitLab refuses user tokens (disallowed_issuers), even with the scope.
    let out = check(GENERATIONS, headers("user-42")).await;
    out.assert_denied(403, "user_token_refused");
    assert_eq!(
        out.headers["www-authenticate"],
        "Bearer realm=\"connector-authz\", error=\"insufficient_scope\""
    );
    // The header checks come first: a user token for someone else is a 401.
    check(GENERATIONS, headers("user-43"))
        .await
        .assert_denied(401, "header_mismatch");
    // The same token where user tokens are accepted.
    check(CODE, headers("user-42")).await.assert_allowed();
    // An instance token on the refusing route.
    h.check_token(
        GENERATIONS,
        &token(&test_key(1), &h.a.url(), &["generate_code"]),
        &[],
    )
    .await
    .assert_allowed();
    h.running.shutdown().await;
}

#[tokio::test]
async fn a_header_named_unit_primitive_must_be_delivered_by_the_backend_service() {
    let h = Harness::start().await;
    // duo_workflow_execute_workflow is a known unit primitive that the registry lists for
    // the Duo Workflow service only; the token grants it, the AI gateway does not serve it.
    let t = token(
        &test_key(1),
        &h.a.url(),
        &["duo_workflow_execute_workflow", "duo_chat"],
    );
    let proxy = "/ai/v1/proxy/anthropic/v1/messages";
    let out = h
        .check_token(
            proxy,
            &t,
            &[("x-gitlab-unit-primitive", "duo_workflow_execute_workflow")],
        )
        .await;
    out.assert_denied(400, "bad_unit_primitive");
    assert!(
        out.body["message"]
            .as_str()
            .unwrap()
            .contains("does not deliver"),
        "{out:?}"
    );
    h.check_token(proxy, &t, &[("x-gitlab-unit-primitive", "duo_chat")])
        .await
        .assert_allowed();
    h.running.shutdown().await;
}

#[tokio::test]
async fn forward_claims_copy_claims_to_upstream_headers() {
    let h = Harness::start().await;
    let out = h
        .check_token(
            CODE,
            &token(&test_key(1), &h.a.url(), &["complete_code"]),
            &[("x-gitlab-authz-instance-id", "smuggled")],
        )
        .await;
    out.assert_allowed();
    assert_eq!(out.headers["x-gitlab-authz-instance-id"], INSTANCE);
    assert_eq!(out.headers["x-gitlab-authz-realm"], "self-managed");
    // A number is forwarded as its JSON text; an absent claim removes the header, so a
    // client-sent copy never reaches the backend.
    let numeric = test_key(1).sign(&with(
        claims(&h.a.url(), AUDIENCE, &["complete_code"], now() + 600),
        json!({"gitlab_root_namespace_id": 12345, "gitlab_realm": null}),
    ));
    let out = h
        .check_token(CODE, &numeric, &[("x-gitlab-authz-realm", "smuggled")])
        .await;
    out.assert_allowed();
    assert_eq!(out.headers["x-gitlab-authz-root-namespace-id"], "12345");
    assert!(!out.headers.contains_key("x-gitlab-authz-realm"), "{out:?}");
    assert!(
        out.removed.iter().any(|r| r == "x-gitlab-authz-realm"),
        "{out:?}"
    );
    // A control character in a forwarded claim could split or forge a header.
    for value in ["42\r\nx-gitlab-authz-subject: admin", "42\u{0}", "\u{7f}"] {
        let control = test_key(1).sign(&with(
            claims(&h.a.url(), AUDIENCE, &["complete_code"], now() + 600),
            json!({ "gitlab_root_namespace_id": value }),
        ));
        h.check_token(CODE, &control, &[])
            .await
            .assert_denied(401, "malformed_token");
    }
    // A public route of the backend removes the forwarded headers.
    let out = h
        .check(
            "GET",
            "/ai/monitoring/health",
            &[("x-gitlab-authz-instance-id", "smuggled")],
        )
        .await;
    out.assert_allowed();
    assert!(
        out.removed
            .iter()
            .any(|r| r == "x-gitlab-authz-instance-id"),
        "{out:?}"
    );
    h.running.shutdown().await;
}

/// `connector_authz_checks_total` for these labels, from the admin listener.
async fn checks_total(h: &Harness, decision: &str, reason: &str, backend: &str) -> f64 {
    let body = reqwest::Client::new()
        .get(format!("http://{}/metrics", h.running.admin_addr))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    let series = format!(
        r#"connector_authz_checks_total{{decision="{decision}",reason="{reason}",backend="{backend}"}} "#
    );
    body.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

#[tokio::test]
async fn a_dry_run_backend_allows_what_it_would_deny_and_says_why() {
    let h = Harness::start().await;
    let dry =
        |scopes: &[&str]| test_key(1).sign(&claims(&h.a.url(), DRY_AUDIENCE, scopes, now() + 600));
    // No token: allowed, carrying the reason; no identity reaches the backend.
    let out = h
        .check(
            "POST",
            "/dry/x",
            &[
                ("x-gitlab-authz-subject", "admin"),
                ("x-gitlab-authz-instance-id", "smuggled"),
                ("x-gitlab-authz-dry-run", "forged"),
            ],
        )
        .await;
    out.assert_allowed();
    assert_eq!(out.headers["x-gitlab-authz-dry-run"], "missing_token");
    assert!(
        !out.headers.contains_key("x-gitlab-authz-subject"),
        "{out:?}"
    );
    for header in ["x-gitlab-authz-subject", "x-gitlab-authz-instance-id"] {
        assert!(out.removed.iter().any(|r| r == header), "{header}: {out:?}");
    }
    // A valid token without the unit primitive: allowed, insufficient_scope reported.
    let out = h.check_token("/dry/x", &dry(&["complete_code"]), &[]).await;
    out.assert_allowed();
    assert_eq!(out.headers["x-gitlab-authz-dry-run"], "insufficient_scope");
    // Header and audience checks too.
    let out = h
        .check_token("/dry/x", &dry(&["duo_chat"]), &[("x-gitlab-realm", "saas")])
        .await;
    assert_eq!(out.headers["x-gitlab-authz-dry-run"], "header_mismatch");
    let out = h
        .check_token(
            "/dry/x",
            &token(&test_key(1), &h.a.url(), &["duo_chat"]),
            &[],
        )
        .await;
    assert_eq!(out.headers["x-gitlab-authz-dry-run"], "wrong_audience");
    // What enforcing would allow is a plain allow: identity set, a client's dry-run header
    // removed.
    let out = h
        .check_token(
            "/dry/x",
            &dry(&["duo_chat"]),
            &[("x-gitlab-authz-dry-run", "forged")],
        )
        .await;
    out.assert_allowed();
    assert_eq!(out.headers["x-gitlab-authz-subject"], INSTANCE);
    assert_eq!(out.headers["x-gitlab-authz-instance-id"], INSTANCE);
    assert!(
        !out.headers.contains_key("x-gitlab-authz-dry-run"),
        "{out:?}"
    );
    assert!(
        out.removed.iter().any(|r| r == "x-gitlab-authz-dry-run"),
        "{out:?}"
    );
    // A path that is not canonical is refused even in dry run.
    h.check_token("/dry/a%2fb", &dry(&[]), &[])
        .await
        .assert_denied(400, "bad_path");
    // An enforcing backend still denies.
    h.check("POST", CODE, &[])
        .await
        .assert_denied(401, "missing_token");
    // Counted apart from allows and denies.
    assert_eq!(
        checks_total(&h, "dry_run", "missing_token", "dry").await,
        1.0
    );
    assert_eq!(
        checks_total(&h, "dry_run", "insufficient_scope", "dry").await,
        1.0
    );
    assert_eq!(
        checks_total(&h, "dry_run", "wrong_audience", "dry").await,
        1.0
    );
    assert_eq!(checks_total(&h, "allow", "valid_token", "dry").await, 1.0);
    h.running.shutdown().await;
}
