//! `connector-authz explain` agrees with the server: every row of the decision table is
//! sent to a running sidecar over gRPC and given to the `explain` binary, with keys from
//! the cache directory and `jwks_file`s and with `--fetch`, and both must reach the same
//! decision and reason. The rows between them reach every deny reason.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use connector_authz::config::Config;
use connector_authz::decision::DenyReason;
use connector_authz::dev::DevKey;
use connector_authz::proto::envoy::service::auth::v3::{
    authorization_client::AuthorizationClient, check_response,
};
use connector_authz::serve;
use serde_json::{Value, json};
use support::{
    FakeIssuer, Mode, check_request, claims, finished_key_sets, now, test_key, test_key_with_kid,
};

const AUTHZ_BIN: &str = env!("CARGO_BIN_EXE_connector-authz");
const AUDIENCE: &str = "gitlab-ai-gateway";
const INSTANCE: &str = "test-instance-id";
const CODE: &str = "/ai/v2/code/completions";
const PROXY: &str = "/ai/v1/proxy/vertex-ai";
const GENERATIONS: &str = "/ai/v2/code/generations";
/// A path of the backend in `mode: dry_run`.
const DRY: &str = "/dry/x";

/// One request: method, path, headers, and the token (sent as `Authorization: Bearer`).
struct Row {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    token: Option<String>,
}

fn row(name: &'static str, path: &'static str, token: Option<String>) -> Row {
    Row {
        name,
        method: "POST",
        path,
        headers: vec![
            ("x-gitlab-realm", "self-managed".into()),
            ("x-gitlab-instance-id", INSTANCE.into()),
            ("x-gitlab-authentication-type", "oidc".into()),
            ("x-gitlab-version", "17.5.0-ee".into()),
        ],
        token,
    }
}

impl Row {
    fn with(mut self, name: &'static str, value: &str) -> Row {
        self.headers.retain(|(k, _)| *k != name);
        if !value.is_empty() {
            self.headers.push((name, value.to_owned()));
        }
        self
    }

    fn all_headers(&self) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        if let Some(token) = &self.token {
            all.push(("authorization".into(), format!("Bearer {token}")));
        }
        all
    }
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
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

/// The rows of DESIGN.md's decision table (as in tests/authz.rs), for issuers `a`
/// (discovery), `b` (jwks_uri), `down` (no keys) and the user-token `jwks_file` issuer.
fn rows(a: &str, b: &str, down: &str) -> Vec<Row> {
    let k1 = test_key(1);
    let base = claims(a, AUDIENCE, &["complete_code"], now() + 600);
    let sign = |changes: Value| k1.sign(&with(base.clone(), changes));
    let good = sign(json!({}));
    let mut tampered: Vec<String> = good.split('.').map(str::to_owned).collect();
    tampered[1] = b64(&with(
        base.clone(),
        json!({"scopes": ["complete_code", "duo_chat"]}),
    ));
    let user = test_key(3).sign(&json!({
        "iss": AUDIENCE, "aud": AUDIENCE, "sub": "user-42", "exp": now() + 600, "iat": now(),
        "scopes": ["complete_code"],
    }));
    let user_generate = test_key(3).sign(&json!({
        "iss": AUDIENCE, "aud": AUDIENCE, "sub": "user-42", "exp": now() + 600, "iat": now(),
        "scopes": ["generate_code"],
    }));
    let explain = k1.sign(&claims(
        a,
        AUDIENCE,
        &["explain_vulnerability"],
        now() + 600,
    ));
    vec![
        row("allowed", CODE, Some(good.clone())),
        row(
            "allowed via jwks_uri",
            CODE,
            Some(test_key(2).sign(&claims(b, AUDIENCE, &["complete_code"], now() + 600))),
        ),
        row("bad path", "/ai/v2/code%2fcompletions", Some(good.clone())),
        row("no route", "/ai/v3/unknown", Some(good.clone())),
        Row {
            name: "public",
            method: "GET",
            path: "/ai/monitoring/health",
            headers: vec![],
            token: None,
        },
        row("no token", CODE, None),
        row("basic auth", CODE, None).with("authorization", "Basic dXNlcjpwYXNz"),
        row("not a jwt", CODE, Some("not-a-jwt".into())),
        row(
            "alg none",
            CODE,
            Some(format!(
                "{}.{}.c2ln",
                b64(&json!({"alg": "none"})),
                b64(&base)
            )),
        ),
        row(
            "unknown issuer",
            CODE,
            Some(sign(json!({"iss": "https://evil.example"}))),
        ),
        row(
            "issuer without keys",
            CODE,
            Some(test_key(3).sign(&claims(down, AUDIENCE, &["complete_code"], now() + 600))),
        ),
        row(
            "unknown kid",
            CODE,
            Some(test_key_with_kid(1, "rotated-away").sign(&base)),
        ),
        row("tampered", CODE, Some(tampered.join("."))),
        row("expired", CODE, Some(sign(json!({"exp": now() - 120})))),
        row(
            "within leeway",
            CODE,
            Some(sign(json!({"exp": now() - 10}))),
        ),
        row(
            "not yet valid",
            CODE,
            Some(sign(json!({"nbf": now() + 3600}))),
        ),
        row("wrong audience", CODE, Some(sign(json!({"aud": "other"})))),
        row("realm mismatch", CODE, Some(good.clone())).with("x-gitlab-realm", "saas"),
        row("instance mismatch", CODE, Some(good.clone())).with("x-gitlab-instance-id", "x"),
        row("bad auth type", CODE, Some(good.clone()))
            .with("x-gitlab-authentication-type", "basic"),
        row("user token", CODE, Some(user.clone())).with("x-gitlab-global-user-id", "user-42"),
        row("user token, other user", CODE, Some(user)).with("x-gitlab-global-user-id", "user-43"),
        row(
            "missing scope",
            CODE,
            Some(sign(json!({"scopes": ["duo_chat"]}))),
        ),
        row("no unit primitive header", PROXY, Some(explain.clone())),
        row("unknown unit primitive", PROXY, Some(explain.clone()))
            .with("x-gitlab-unit-primitive", "make_coffee"),
        row("unit primitive not granted", PROXY, Some(explain.clone()))
            .with("x-gitlab-unit-primitive", "duo_chat"),
        row("unit primitive granted", PROXY, Some(explain))
            .with("x-gitlab-unit-primitive", "explain_vulnerability"),
        row(
            "user token where user tokens are refused",
            GENERATIONS,
            Some(user_generate),
        )
        .with("x-gitlab-global-user-id", "user-42"),
        row(
            "one of require_any",
            GENERATIONS,
            Some(sign(json!({"scopes": ["code_suggestions"]}))),
        ),
        row(
            "none of require_any",
            GENERATIONS,
            Some(sign(json!({"scopes": ["complete_code"]}))),
        ),
        row("dry run, no token", DRY, None),
        row(
            "dry run, wrong audience",
            DRY,
            Some(sign(json!({"scopes": ["duo_chat"]}))),
        ),
        row(
            "dry run, what enforcing allows",
            DRY,
            Some(sign(
                json!({"scopes": ["duo_chat"], "aud": "dry-run-backend"}),
            )),
        ),
        row("dry run, bad path", "/dry/a%2fb", None),
        row("old gitlab", CODE, Some(good.clone())).with("x-gitlab-version", "16.10.1-ee"),
        row("no gitlab version", CODE, Some(good)).with("x-gitlab-version", ""),
    ]
}

/// What a CheckResponse decided: "allow" or the deny reason.
async fn server_answer(client: &AuthorizationClient<tonic::transport::Channel>, r: &Row) -> String {
    let request = check_request(r.method, r.path, r.all_headers());
    let response = client
        .clone()
        .check(request)
        .await
        .expect("Check succeeds")
        .into_inner();
    match response.http_response {
        Some(check_response::HttpResponse::OkResponse(ok)) => {
            // A dry-run allow names the denial it stands for.
            let dry_run = ok
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key == "x-gitlab-authz-dry-run");
            match dry_run {
                Some(h) => format!("dry_run {}", h.value),
                None => "allow".into(),
            }
        }
        Some(check_response::HttpResponse::DeniedResponse(denied)) => {
            let body: Value = serde_json::from_str(&denied.body).expect("JSON body");
            body["error"].as_str().unwrap_or_default().to_owned()
        }
        None => panic!("no HTTP response"),
    }
}

/// Runs `explain` on the row: ("allow" or the reason, exit code, stdout).
fn explain_answer(config: &Path, r: &Row, fetch: bool) -> (String, i32, String) {
    let mut command = Command::new(AUTHZ_BIN);
    command
        .arg("explain")
        .arg("--config")
        .arg(config)
        .args(["--path", r.path, "--method", r.method]);
    if let Some(token) = &r.token {
        command.args(["--token", token]);
    }
    for (k, v) in &r.headers {
        command.arg("--header").arg(format!("{k}:{v}"));
    }
    if fetch {
        command.arg("--fetch");
    }
    let out = command.output().expect("run explain");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let first = stdout.lines().next().unwrap_or_default();
    let answer = if first.starts_with("decision: allow") {
        "allow".to_owned()
    } else if let Some(rest) = first.strip_prefix("decision: dry_run:") {
        // decision: dry_run: ... enforcing would deny <status> <reason>
        let reason = rest
            .split_once("enforcing would deny ")
            .and_then(|(_, tail)| tail.split_whitespace().nth(1))
            .unwrap_or("?");
        format!("dry_run {reason}")
    } else {
        // decision: deny <status> <reason>
        first.split_whitespace().nth(3).unwrap_or("?").to_owned()
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    (
        answer,
        out.status.code().unwrap_or(-1),
        format!("{stdout}{stderr}"),
    )
}

fn write_config(dir: &Path, a: &FakeIssuer, b: &FakeIssuer, down: &FakeIssuer) -> PathBuf {
    let user_jwks = dir.join("user-jwks.json");
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
  cache_dir: {cache}
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
        require_any: [generate_code, code_suggestions]
        user_tokens: false
  - name: dry
    audience: dry-run-backend
    mode: dry_run
    routes:
      - prefix: /dry/
        require: [duo_chat]
",
        a = a.url(),
        b = b.url(),
        b_jwks = b.jwks_url(),
        down = down.url(),
        user_jwks = user_jwks.display(),
        cache = dir.join("cache").display(),
        registry = registry.display(),
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_agrees_with_the_server_on_every_decision_table_row() {
    let a = FakeIssuer::start(&[&test_key(1)]).await;
    let b = FakeIssuer::start(&[&test_key(2)]).await;
    let down = FakeIssuer::start(&[&test_key(3)]).await;
    down.set_mode(Mode::Down(503));
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &a, &b, &down);
    let running = serve::start(Config::load(&config).expect("config"))
        .await
        .expect("server starts");
    let client = AuthorizationClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .expect("client connects");
    // Without --fetch, explain reads the network issuers' keys from the cache directory
    // that the server writes.
    let cache = dir.path().join("cache");
    let started = Instant::now();
    while finished_key_sets(&cache) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no cache files"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut reached = BTreeSet::new();
    for r in rows(&a.url(), &b.url(), &down.url()) {
        let server = server_answer(&client, &r).await;
        for fetch in [false, true] {
            let (answer, code, output) =
                tokio::task::block_in_place(|| explain_answer(&config, &r, fetch));
            assert_eq!(
                answer, server,
                "{} (fetch: {fetch}): explain says {answer}, the server {server}:\n{output}",
                r.name
            );
            let denied = server != "allow" && !server.starts_with("dry_run ");
            assert_eq!(code, i32::from(denied), "{}: {output}", r.name);
            if let Some(token) = &r.token {
                let signature = token.rsplit('.').next().unwrap_or_default();
                assert!(
                    signature.len() < 4 || !output.contains(signature),
                    "{}: explain printed the signature:\n{output}",
                    r.name
                );
                assert!(!output.contains(token.as_str()));
            }
        }
        reached.insert(server);
    }
    for dry_run in [
        "dry_run missing_token",
        "dry_run wrong_audience",
        "bad_path",
    ] {
        assert!(reached.contains(dry_run), "{dry_run}: {reached:?}");
    }
    for reason in DenyReason::ALL {
        assert!(
            reached.contains(reason.as_str()),
            "no row reaches {reason}: {reached:?}"
        );
    }
    assert!(reached.contains("allow"));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_each_step() {
    let a = FakeIssuer::start(&[&test_key(1)]).await;
    let b = FakeIssuer::start(&[&test_key(2)]).await;
    let down = FakeIssuer::start(&[&test_key(3)]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &a, &b, &down);
    let token = test_key(1).sign(&with(
        claims(&a.url(), AUDIENCE, &["duo_chat"], now() + 600),
        json!({"jti": "jti-explain"}),
    ));
    let r = row("missing scope", CODE, Some(token));
    let (answer, code, output) = tokio::task::block_in_place(|| explain_answer(&config, &r, true));
    assert_eq!(
        (answer.as_str(), code),
        ("insufficient_scope", 1),
        "{output}"
    );
    for expected in [
        "decision: deny 403 insufficient_scope",
        "normalized path: /ai/v2/code/completions",
        &format!(
            "route: prefix /ai/v2/code/ (any method) at {}:",
            config.display()
        ),
        "backend: ai_gateway (audience gitlab-ai-gateway)",
        "requires: complete_code",
        "token header: alg RS256, kid test-key-1",
        &format!("iss: {}", a.url()),
        "sub: test-instance-id",
        "jti: jti-explain",
        "scopes: duo_chat",
        "gitlab_realm: self-managed",
        &format!("issuer: {} (keys from discovery)", a.url()),
        "key test-key-1: found",
        "scopes: needed complete_code; held duo_chat; missing complete_code",
    ] {
        assert!(
            output.contains(expected),
            "missing {expected:?} in:\n{output}"
        );
    }

    let exp = output
        .lines()
        .find(|l| l.trim_start().starts_with("exp: "))
        .expect("an exp line");
    assert!(exp.ends_with("(in 10m)") || exp.contains("(in 9m"), "{exp}");

    // A configuration that does not load is an error: exit 2.
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, "issuers: []\n").unwrap();
    let out = Command::new(AUTHZ_BIN)
        .args(["explain", "--path", "/", "--config"])
        .arg(&broken)
        .output()
        .expect("run explain");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.yaml"));
}

#[test]
fn explain_says_when_the_path_matched_but_the_method_did_not() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/connector-authz.yaml");
    let explain = |method: &str| {
        let out = Command::new(AUTHZ_BIN)
            .args([
                "explain", "--config", config, "--path", CODE, "--method", method,
            ])
            .output()
            .expect("run explain");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, output) = explain("GET");
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("decision: deny 403 no_route"), "{output}");
    assert!(
        output.contains("matches the path but takes only POST, not GET"),
        "{output}"
    );
    // With the method it takes, the route is found and the token is what is missing.
    let (_, output) = explain("POST");
    assert!(
        output.contains("decision: deny 401 missing_token"),
        "{output}"
    );
    assert!(
        output.contains(&format!("route: path {CODE} (POST)")),
        "{output}"
    );
    assert!(output.contains("token: not read"), "{output}");
}
