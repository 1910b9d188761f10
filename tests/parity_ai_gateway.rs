//! Parity with GitLab's AI gateway: the cases of its own authentication and authorization
//! tests, run through the sidecar with the routes of the shipped `config/connector-authz.yaml`.
//!
//! Sources (gitlab-org/modelops/applied-ml/code-suggestions/ai-assist; the mirrors read were
//! khulnasoft-lab/ai-assist and movax01h/ai-gateway):
//! - `tests/cloud_connector/test_cloud_connector.py::test_cloud_connector_authenticate`, the
//!   header/claim matrix of `ai_gateway.cloud_connector.authenticate`;
//! - `tests/api/v1/test_v1_proxy_request.py::test_authorize_with_unit_primitive_header_*`
//!   and `tests/api/v1/proxy/test_anthropic.py` (`TestUnauthorizedScopes`,
//!   `TestDataMismatch`), the X-Gitlab-Unit-Primitive cases of the model proxies;
//! - `tests/api/v1/test_v1_code.py` (`TestUnauthorizedIssuer`, `TestCompleteCodePermission`,
//!   `TestDuoAgentPlatformPermission`, `TestNoPermissions`), `/v1/code/user_access_token`
//!   with its `disallowed_issuers` and two accepted unit primitives.
//!
//! The AI gateway's tests stub the token verification (`StubAuthProvider`) and use scopes
//! such as `feature1`; here real RS256 tokens are signed by a fake OIDC issuer, and the
//! scopes are the unit primitives the shipped routes ask for. Statuses are the AI gateway's;
//! the `reason` is ours. Where the sidecar is deliberately stricter the case says so.

mod support;

use std::path::Path;

use connector_authz::config::Config;
use connector_authz::dev::DevKey;
use connector_authz::proto::envoy::service::auth::v3::{
    CheckResponse, authorization_client::AuthorizationClient, check_response,
};
use connector_authz::serve::{self, Running};
use serde_json::{Value, json};
use support::{FakeIssuer, now, test_key};
use tonic::transport::Channel;

/// The AI gateway's own name: the audience of its tokens and the issuer of the user tokens
/// it mints (`CloudConnectorConfig().service_name`).
const AI_GATEWAY: &str = "gitlab-ai-gateway";
const CHAT: &str = "/ai/v1/chat/agent";
const PROXY: &str = "/ai/v1/proxy/anthropic/v1/messages";
const USER_ACCESS_TOKEN: &str = "/ai/v1/code/user_access_token";

struct Sidecar {
    running: Running,
    client: AuthorizationClient<Channel>,
    /// Plays CustomersDot: signs instance tokens with key 1.
    issuer: FakeIssuer,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// The shipped configuration, with its issuers replaced by the fake one (and the AI
    /// gateway's own, for user tokens) and the listeners on ephemeral loopback ports.
    async fn start() -> Sidecar {
        let issuer = FakeIssuer::start(&[&test_key(1)]).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let user_jwks = dir.path().join("ai-gateway-jwks.json");
        std::fs::write(
            &user_jwks,
            DevKey::key_set_json(&[&test_key(3)]).to_string(),
        )
        .expect("write the AI gateway's key set");
        let shipped_path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/connector-authz.yaml");
        let shipped = std::fs::read_to_string(&shipped_path).expect("read the shipped config");
        let (head, rest) = shipped
            .split_once("\nissuers:\n")
            .expect("the shipped config has an issuers section");
        let (_, rest) = rest
            .split_once("\nkeys:\n")
            .expect("the shipped config has a keys section after its issuers");
        let yaml = format!(
            "{head}\nlisten: {{grpc: 127.0.0.1:0, admin: 127.0.0.1:0}}\nissuers:\n  - url: {}\n  - url: {AI_GATEWAY}\n    jwks_file: {}\n\nkeys:\n{rest}",
            issuer.url(),
            user_jwks.display(),
        );
        // Relative paths (the registry) resolve against the shipped file's directory.
        let config = Config::from_yaml(&yaml, &shipped_path).expect("the shipped routes load");
        let running = serve::start(config).await.expect("server starts");
        let client = AuthorizationClient::connect(format!("http://{}", running.grpc_addr))
            .await
            .expect("client connects");
        Sidecar {
            running,
            client,
            issuer,
            _dir: dir,
        }
    }

    async fn check(&self, path: &str, headers: &[(&str, &str)]) -> (u32, String) {
        let headers = headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v));
        let response = self
            .client
            .clone()
            .check(support::check_request("POST", path, headers))
            .await
            .expect("Check is a successful RPC")
            .into_inner();
        outcome(response)
    }

    /// An instance token as CustomersDot signs one, with `claims` merged in.
    fn instance_token(&self, claims: Value) -> String {
        let mut base = json!({
            "iss": self.issuer.url(), "aud": AI_GATEWAY, "iat": now(), "nbf": now(),
            "exp": now() + 600, "jti": "parity",
        });
        for (k, v) in claims.as_object().expect("claims are an object") {
            base[k] = v.clone();
        }
        test_key(1).sign(&base)
    }
}

/// A user token as the AI gateway mints one (`TokenAuthority.encode`): issued by and for
/// the AI gateway, its subject the user's global id.
fn user_token(claims: Value) -> String {
    let mut base = json!({
        "iss": AI_GATEWAY, "aud": AI_GATEWAY, "iat": now(), "nbf": now(),
        "exp": now() + 600, "jti": "parity-user",
    });
    for (k, v) in claims.as_object().expect("claims are an object") {
        base[k] = v.clone();
    }
    test_key(3).sign(&base)
}

/// (HTTP status, reason): 200 and "" for an allow.
fn outcome(r: CheckResponse) -> (u32, String) {
    match r.http_response {
        Some(check_response::HttpResponse::OkResponse(_)) => (200, String::new()),
        Some(check_response::HttpResponse::DeniedResponse(denied)) => {
            let body: Value = serde_json::from_str(&denied.body).expect("the body is JSON");
            (
                denied
                    .status
                    .map_or(0, |s| u32::try_from(s.code).unwrap_or(0)),
                body["error"].as_str().unwrap_or_default().to_owned(),
            )
        }
        None => panic!("a CheckResponse without an http_response"),
    }
}

/// The headers of the source's matrix: a GitLab instance's request for `user_id`.
fn matrix_headers<'a>(bearer: &'a str, user_id: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("Authorization", bearer),
        ("X-Gitlab-Authentication-Type", "oidc"),
        ("X-Gitlab-Global-User-Id", user_id),
        ("X-Gitlab-Instance-Id", "3333"),
        ("X-GitLab-Realm", "self-managed"),
    ]
}

#[track_caller]
fn expect(case: &str, got: (u32, String), status: u32, reason: &str) {
    assert_eq!(got, (status, reason.to_owned()), "{case}");
}

/// `test_cloud_connector_authenticate`: each parametrized case in the source's order. The
/// source's claims (sub 3333, instance 3333, realm self-managed) are kept; its scopes
/// `feature1`/`feature3` become `duo_chat` so that `/v1/chat/agent` authorizes.
#[tokio::test]
async fn the_authenticate_header_and_claim_matrix() {
    let s = Sidecar::start().await;
    let instance = s.instance_token(json!({
        "sub": "3333", "gitlab_realm": "self-managed", "gitlab_instance_id": "3333",
        "scopes": ["duo_chat"],
    }));
    let seats = s.instance_token(json!({
        "sub": "3333", "gitlab_realm": "self-managed", "gitlab_instance_id": "3333",
        "duo_seat_count": "777", "scopes": ["duo_chat"],
    }));
    let bearer = format!("Bearer {instance}");
    let bearer_seats = format!("Bearer {seats}");
    let ok_headers = |bearer| matrix_headers(bearer, "1111");

    // "Missing Authorization header" → "No authorization header presented".
    expect(
        "no Authorization",
        s.check(CHAT, &[]).await,
        401,
        "missing_token",
    );
    // "Missing Authorization header, X-Gitlab-Global-User-Id header is not read".
    expect(
        "no Authorization, a global user id",
        s.check(CHAT, &[("X-Gitlab-Global-User-Id", "1111")]).await,
        401,
        "missing_token",
    );
    // "Invalid Authorization header value" → "Invalid authorization header".
    let got = s
        .check(
            CHAT,
            &[
                ("Authorization", "invalid"),
                ("X-Gitlab-Global-User-Id", "1111"),
            ],
        )
        .await;
    assert_eq!(got.0, 401, "invalid Authorization: {got:?}");
    assert!(
        ["missing_token", "malformed_token"].contains(&got.1.as_str()),
        "invalid Authorization: {got:?}"
    );
    // "Invalid X-Gitlab-Authentication-Type header value" → "only OIDC is supported".
    let mut headers = ok_headers(&bearer);
    headers[1].1 = "INVALID";
    expect(
        "authentication type INVALID",
        s.check(CHAT, &headers).await,
        401,
        "header_mismatch",
    );
    // Not in the source's matrix, but the same rule (DESIGN.md): the header is required.
    let mut headers = ok_headers(&bearer);
    headers.remove(1);
    expect(
        "authentication type missing",
        s.check(CHAT, &headers).await,
        401,
        "header_mismatch",
    );
    // "AuthProvider returned authenticated=False (invalid token)" → "Forbidden by auth
    // provider": here a token whose signature does not verify.
    let forged = format!(
        "Bearer {}",
        test_key(2).sign(&json!({
            "iss": s.issuer.url(), "aud": AI_GATEWAY, "sub": "3333", "exp": now() + 600,
            "scopes": ["duo_chat"],
        }))
    );
    let got = s
        .check(
            CHAT,
            &[
                ("Authorization", &forged),
                ("X-Gitlab-Authentication-Type", "oidc"),
                ("X-Gitlab-Global-User-Id", "1111"),
            ],
        )
        .await;
    assert_eq!(got.0, 401, "forged token: {got:?}");
    // "Missing X-Gitlab-Duo-Seat-Count, but we have a duo_seat_count claim": the AI gateway
    // logs and lets it pass; the sidecar does not compare the seat count at all.
    expect(
        "seat count claim, no header",
        s.check(CHAT, &ok_headers(&bearer_seats)).await,
        200,
        "",
    );
    // "Auth OK: Missing X-Gitlab-Duo-Seat-Count, and we DO NOT have a duo_seat_count claim".
    expect(
        "no seat count at all",
        s.check(CHAT, &ok_headers(&bearer)).await,
        200,
        "",
    );
    // "Header mismatch: X-Gitlab-Duo-Seat-Count": logged there, passes.
    let mut headers = ok_headers(&bearer_seats);
    headers.push(("X-Gitlab-Duo-Seat-Count", "1000"));
    expect(
        "seat count mismatch",
        s.check(CHAT, &headers).await,
        200,
        "",
    );
    // "Header mismatch: X-Gitlab-Instance-Id".
    let mut headers = ok_headers(&bearer_seats);
    headers[3].1 = "mismatch";
    headers.push(("X-Gitlab-Duo-Seat-Count", "777"));
    expect(
        "instance id mismatch",
        s.check(CHAT, &headers).await,
        401,
        "header_mismatch",
    );
    // "Header mismatch: X-Gitlab-Realm".
    let mut headers = ok_headers(&bearer_seats);
    headers[4].1 = "mismatch";
    expect(
        "realm mismatch",
        s.check(CHAT, &headers).await,
        401,
        "header_mismatch",
    );
    // "Header mismatch: X-Gitlab-Global-User-Id": a user token (issuer gitlab-ai-gateway,
    // subject 1111) sent with another user's id.
    let user = format!(
        "Bearer {}",
        user_token(json!({
            "sub": "1111", "gitlab_realm": "self-managed", "gitlab_instance_id": "3333",
            "duo_seat_count": "777", "scopes": ["duo_chat"],
        }))
    );
    let user_headers = |user_id| {
        let mut h = matrix_headers(&user, user_id);
        h.push(("X-Gitlab-Duo-Seat-Count", "777"));
        h
    };
    expect(
        "global user id mismatch",
        s.check(CHAT, &user_headers("mismatch")).await,
        401,
        "header_mismatch",
    );
    expect(
        "the user's own id",
        s.check(CHAT, &user_headers("1111")).await,
        200,
        "",
    );
    // "Auth OK".
    let mut headers = ok_headers(&bearer_seats);
    headers.push(("X-Gitlab-Duo-Seat-Count", "777"));
    expect("auth OK", s.check(CHAT, &headers).await, 200, "");
    s.running.shutdown().await;
}

/// The empty-claim rule the AI gateway applies (`UserClaims` fields that are empty are not
/// compared): an empty `gitlab_instance_id` or `gitlab_realm` claim is not checked against
/// the header.
#[tokio::test]
async fn an_empty_claim_is_not_compared_with_its_header() {
    let s = Sidecar::start().await;
    let t = format!(
        "Bearer {}",
        s.instance_token(json!({
            "sub": "3333", "gitlab_realm": "", "gitlab_instance_id": "", "scopes": ["duo_chat"],
        }))
    );
    let got = s
        .check(
            CHAT,
            &[
                ("Authorization", &t),
                ("X-Gitlab-Authentication-Type", "oidc"),
                ("X-Gitlab-Instance-Id", "3333"),
                ("X-GitLab-Realm", "saas"),
            ],
        )
        .await;
    expect("empty realm and instance claims", got, 200, "");
    s.running.shutdown().await;
}

/// `authorize_with_unit_primitive_header` (ai_gateway/api/v1/proxy/request.py) and its tests:
/// `test_authorize_with_unit_primitive_header_unknown`, `_unauthorized`, `_authorized` and
/// the missing-header case; `TestUnauthorizedScopes::test_failed_authorization_scope` and the
/// X-Gitlab-Instance-Id row of `TestDataMismatch::test_header_mismatch` in
/// tests/api/v1/proxy/test_anthropic.py.
#[tokio::test]
async fn the_proxy_unit_primitive_header() {
    let s = Sidecar::start().await;
    let token = |scopes: Value| {
        format!(
            "Bearer {}",
            s.instance_token(json!({
                "sub": "1", "gitlab_realm": "self-managed", "gitlab_instance_id": "1",
                "scopes": scopes,
            }))
        )
    };
    let duo_chat = token(json!(["duo_chat"]));
    let unauthorized = token(json!(["unauthorized_scope"]));
    let headers = |bearer: &str, unit_primitive: Option<&str>| {
        let mut h = vec![
            ("Authorization".to_owned(), bearer.to_owned()),
            ("X-Gitlab-Authentication-Type".to_owned(), "oidc".to_owned()),
            ("X-Gitlab-Instance-Id".to_owned(), "1".to_owned()),
            ("X-Gitlab-Realm".to_owned(), "self-managed".to_owned()),
        ];
        if let Some(up) = unit_primitive {
            h.push(("X-Gitlab-Unit-Primitive".to_owned(), up.to_owned()));
        }
        h
    };
    let check = |h: Vec<(String, String)>| {
        let s = &s;
        async move {
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            s.check(PROXY, &h).await
        }
    };
    // "Missing x-gitlab-unit-primitive header" → 400.
    expect(
        "missing",
        check(headers(&duo_chat, None)).await,
        400,
        "bad_unit_primitive",
    );
    // "Unknown unit primitive header odd_feature" → 400.
    expect(
        "unknown",
        check(headers(&duo_chat, Some("odd_feature"))).await,
        400,
        "bad_unit_primitive",
    );
    // `_unauthorized`: duo_chat named, the user cannot → 403.
    expect(
        "not granted",
        check(headers(&unauthorized, Some("duo_chat"))).await,
        403,
        "insufficient_scope",
    );
    // `_authorized` with scopes [duo_chat].
    expect(
        "granted",
        check(headers(&duo_chat, Some("duo_chat"))).await,
        200,
        "",
    );
    // test_failed_authorization_scope: scopes [unauthorized_scope], explain_vulnerability
    // named → 403 "Unauthorized to access explain_vulnerability".
    expect(
        "explain_vulnerability not granted",
        check(headers(&unauthorized, Some("explain_vulnerability"))).await,
        403,
        "insufficient_scope",
    );
    // test_header_mismatch, X-Gitlab-Instance-Id 999 → 401 "Header mismatch". (Its project
    // and namespace rows are the AI gateway's own 403s on SaaS extra claims; the sidecar
    // does not check those headers and leaves them to it.)
    let mut h = headers(&duo_chat, Some("duo_chat"));
    h[2].1 = "999".to_owned();
    expect("instance id 999", check(h).await, 401, "header_mismatch");
    // Stricter here: the AI gateway accepts any member of GitLabUnitPrimitive; the sidecar
    // also asks that the registry lists the AI gateway among its backend services.
    let workflow = token(json!(["duo_workflow_execute_workflow"]));
    expect(
        "a Duo Workflow service unit primitive",
        check(headers(&workflow, Some("duo_workflow_execute_workflow"))).await,
        400,
        "bad_unit_primitive",
    );
    s.running.shutdown().await;
}

/// `/v1/code/user_access_token` (ai_gateway/api/v1/code/user_access_token.py) and its tests in
/// tests/api/v1/test_v1_code.py.
#[tokio::test]
async fn user_access_token_needs_an_instance_token_with_one_of_two_unit_primitives() {
    let s = Sidecar::start().await;
    let headers = |bearer: &str| {
        vec![
            (
                "X-Gitlab-Global-User-Id".to_owned(),
                "global-user".to_owned(),
            ),
            ("Authorization".to_owned(), bearer.to_owned()),
            ("X-Gitlab-Authentication-Type".to_owned(), "oidc".to_owned()),
            ("X-Gitlab-Instance-Id".to_owned(), "1234".to_owned()),
            ("X-Gitlab-Realm".to_owned(), "self-managed".to_owned()),
        ]
    };
    let check = |h: Vec<(String, String)>| {
        let s = &s;
        async move {
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            s.check(USER_ACCESS_TOKEN, &h).await
        }
    };
    let instance = |scopes: Value| {
        format!(
            "Bearer {}",
            s.instance_token(json!({
                "sub": "1234", "gitlab_realm": "self-managed", "gitlab_instance_id": "1234",
                "scopes": scopes,
            }))
        )
    };
    // TestCompleteCodePermission::test_user_access_token_with_complete_code → 200.
    expect(
        "complete_code",
        check(headers(&instance(json!(["complete_code"])))).await,
        200,
        "",
    );
    // TestDuoAgentPlatformPermission::test_user_access_token_with_model_provider_proxy → 200.
    expect(
        "ai_gateway_model_provider_proxy",
        check(headers(&instance(json!([
            "ai_gateway_model_provider_proxy"
        ]))))
        .await,
        200,
        "",
    );
    // TestBothPermissions → 200.
    expect(
        "both",
        check(headers(&instance(json!([
            "complete_code",
            "ai_gateway_model_provider_proxy"
        ]))))
        .await,
        200,
        "",
    );
    // TestNoPermissions::test_user_access_token_with_no_permissions: scopes [random] → 403.
    expect(
        "no permissions",
        check(headers(&instance(json!(["random"])))).await,
        403,
        "insufficient_scope",
    );
    // TestUnauthorizedIssuer::test_failed_authorization_issuer: issuer gitlab-ai-gateway
    // (a user token, refused by disallowed_issuers) → 403.
    let user = format!(
        "Bearer {}",
        user_token(json!({
            "sub": "global-user", "gitlab_realm": "self-managed", "gitlab_instance_id": "1234",
            "scopes": ["complete_code", "ai_gateway_model_provider_proxy"],
        }))
    );
    expect(
        "a user token",
        check(headers(&user)).await,
        403,
        "user_token_refused",
    );
    s.running.shutdown().await;
}

/// Where the sidecar is deliberately stricter than the AI gateway.
#[tokio::test]
async fn deliberately_stricter_than_the_ai_gateway() {
    let s = Sidecar::start().await;
    let headers = |bearer: &str| {
        vec![
            ("Authorization".to_owned(), bearer.to_owned()),
            ("X-Gitlab-Authentication-Type".to_owned(), "oidc".to_owned()),
            ("X-Gitlab-Instance-Id".to_owned(), "3333".to_owned()),
            ("X-Gitlab-Realm".to_owned(), "self-managed".to_owned()),
        ]
    };
    let check = |h: Vec<(String, String)>| {
        let s = &s;
        async move {
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            s.check(CHAT, &h).await
        }
    };
    // `exp` is required here. The AI gateway's providers decode with PyJWT, which checks
    // `exp` only when the token has one.
    let no_exp =
        format!("Bearer {}", test_key(1).sign(&json!({
        "iss": s.issuer.url(), "aud": AI_GATEWAY, "sub": "3333", "iat": now(),
        "gitlab_realm": "self-managed", "gitlab_instance_id": "3333", "scopes": ["duo_chat"],
    })));
    expect("no exp", check(headers(&no_exp)).await, 401, "expired");
    // Keys are bound to their issuer: a token that names CustomersDot but is signed with
    // the AI gateway's own key fails, where a provider that tries every key it holds would
    // accept it.
    let cross = format!(
        "Bearer {}",
        test_key(3).sign(&json!({
            "iss": s.issuer.url(), "aud": AI_GATEWAY, "sub": "3333", "iat": now(),
            "exp": now() + 600, "gitlab_realm": "self-managed", "gitlab_instance_id": "3333",
            "scopes": ["duo_chat"],
        }))
    );
    let got = check(headers(&cross)).await;
    assert_eq!(got.0, 401, "a key of another issuer: {got:?}");
    assert!(
        ["unknown_key", "bad_signature"].contains(&got.1.as_str()),
        "a key of another issuer: {got:?}"
    );
    s.running.shutdown().await;
}
