//! Operating the sidecar: `/metrics` (and `promtool check metrics` on it), configuration
//! reloads under load, draining on SIGTERM, JSON logs that never hold a token, and
//! deprecated unit primitives logged once. In-process (`serve::start`) where that is
//! enough; the real binary where signals and log output are the point.

mod support;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use connector_authz::config::Config;
use connector_authz::dev::DevKey;
use connector_authz::proto::envoy::service::auth::v3::{
    CheckRequest, authorization_client::AuthorizationClient, check_response,
};
use connector_authz::serve::{self, Running};
use serde_json::{Value, json};
use support::{FakeIssuer, INSTANCE_HEADERS, check_request, claims, now, test_key, within};
use tonic::transport::Channel;

const AUTHZ_BIN: &str = env!("CARGO_BIN_EXE_connector-authz");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const WAIT: Duration = Duration::from_secs(20);
/// A deprecated unit primitive of `config/cloud_connector`.
const DEPRECATED: &str = "analyze_ci_job_failure";

// ---------------------------------------------------------------------------------------
// Helpers

/// A Check's answer: `Ok(())` allowed, `Err(reason)` denied.
type Answer = Result<(), String>;

/// One Check with the instance headers `support::claims` expects, plus `extra`.
async fn check(
    client: &AuthorizationClient<Channel>,
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> Answer {
    try_check(client, path, token, extra)
        .await
        .expect("Check is a successful RPC")
}

/// [`check`], with a gRPC error returned rather than a panic.
async fn try_check(
    client: &AuthorizationClient<Channel>,
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> Result<Answer, tonic::Status> {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = INSTANCE_HEADERS.to_vec();
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer));
    }
    headers.extend_from_slice(extra);
    let response = client
        .clone()
        .check(check_request("POST", path, headers))
        .await?
        .into_inner();
    Ok(match response.http_response {
        Some(check_response::HttpResponse::OkResponse(_)) => Ok(()),
        Some(check_response::HttpResponse::DeniedResponse(denied)) => {
            let body: Value = serde_json::from_str(&denied.body).expect("JSON body");
            Err(body["error"].as_str().unwrap_or_default().to_owned())
        }
        None => panic!("a CheckResponse without an HTTP response"),
    })
}

async fn connect(running: &Running) -> AuthorizationClient<Channel> {
    AuthorizationClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .expect("client connects")
}

async fn scrape(admin: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("admin answers")
        .text()
        .await
        .expect("metrics body")
}

/// The value of the sample `name{labels}` (exactly as written), if present.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

fn token_for(key: &DevKey, iss: &str, aud: &str, scopes: &[&str]) -> String {
    key.sign(&claims(iss, aud, scopes, now() + 600))
}

/// Writes `text` to `path` the way Kubernetes updates a mounted ConfigMap: a new file
/// renamed over the old, so a reader never sees half of it.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write temp config");
    std::fs::rename(&tmp, path).expect("rename config");
}

fn jwks_file(dir: &Path, name: &str, keys: &[&DevKey]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, DevKey::key_set_json(keys).to_string()).expect("write jwks");
    path
}

// ---------------------------------------------------------------------------------------
// Metrics

#[tokio::test]
async fn metrics_move_with_checks_and_key_refreshes() {
    metrics_after_traffic().await;
}

#[tokio::test]
#[ignore = "needs promtool: run scripts/install-test-deps.sh as root (scripts/test.sh runs it)"]
async fn promtool_accepts_the_metrics() {
    promtool_accepts(&metrics_after_traffic().await);
}

/// Sends Checks of every outcome and a key rotation through a sidecar, asserts how each
/// metric moved, and returns the last `/metrics` scrape.
async fn metrics_after_traffic() -> String {
    let (k1, k2) = (test_key(1), test_key(2));
    let issuer = FakeIssuer::start(&[&k1]).await;
    let registry = Path::new(REPO).join("config/cloud_connector");
    let yaml = format!(
        "listen: {{grpc: 127.0.0.1:0, admin: 127.0.0.1:0}}
issuers: [{{url: {iss}}}]
keys: {{min_refresh_interval: 1s, fetch_timeout: 2s}}
unit_primitives: {registry}
backends:
  - name: svc
    audience: svc
    routes:
      - {{prefix: /open/, require: []}}
      - {{prefix: /old/, require: [{DEPRECATED}]}}
      - {{prefix: /proxy/, unit_primitive_header: x-gitlab-unit-primitive}}
      - {{prefix: /public/, public: true}}
",
        iss = issuer.url(),
        registry = registry.display(),
    );
    let config = Config::from_yaml(&yaml, Path::new("metrics.yaml")).expect("config");
    let running = serve::start(config).await.expect("server starts");
    let client = connect(&running).await;
    let iss = issuer.url();
    let issuer_label = format!("issuer=\"{iss}\"");

    let before = scrape(running.admin_addr).await;
    assert_eq!(
        sample(&before, &format!("connector_authz_keys{{{issuer_label}}}")),
        Some(1.0),
        "{before}"
    );
    assert_eq!(
        sample(
            &before,
            &format!("connector_authz_keys_refresh_total{{{issuer_label},result=\"success\"}}")
        ),
        Some(1.0),
        "{before}"
    );
    assert!(
        sample(
            &before,
            &format!("connector_authz_keys_age_seconds{{{issuer_label}}}")
        )
        .is_some_and(|age| (0.0..60.0).contains(&age)),
        "{before}"
    );
    assert!(before.contains("connector_authz_build_info{version=\""));
    assert_eq!(
        sample(&before, "connector_authz_token_cache_hits_total"),
        Some(0.0)
    );

    let t1 = token_for(&k1, &iss, "svc", &[DEPRECATED]);
    assert_eq!(check(&client, "/open/x", Some(&t1), &[]).await, Ok(()));
    assert_eq!(check(&client, "/open/y", Some(&t1), &[]).await, Ok(()));
    assert_eq!(check(&client, "/public/x", None, &[]).await, Ok(()));
    assert_eq!(
        check(&client, "/open/x", None, &[]).await,
        Err("missing_token".into())
    );
    assert_eq!(
        check(&client, "/nowhere", None, &[]).await,
        Err("no_route".into())
    );
    let invalid = client
        .clone()
        .check(CheckRequest { attributes: None })
        .await;
    assert_eq!(
        invalid.map(|_| ()).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    // Deprecated unit primitives, required by the route or named in the header.
    assert_eq!(check(&client, "/old/x", Some(&t1), &[]).await, Ok(()));
    assert_eq!(
        check(
            &client,
            "/proxy/x",
            Some(&t1),
            &[("x-gitlab-unit-primitive", DEPRECATED)]
        )
        .await,
        Ok(())
    );
    // A new key: the unknown kid triggers one refresh, which succeeds (no wait needed:
    // the start-up fetch does not count against min_refresh_interval).
    issuer.set_keys(&[&k1, &k2]);
    let t2 = token_for(&k2, &iss, "svc", &[]);
    assert_eq!(check(&client, "/open/z", Some(&t2), &[]).await, Ok(()));

    let after = scrape(running.admin_addr).await;
    for (series, value) in [
        (
            r#"connector_authz_checks_total{decision="allow",reason="valid_token",backend="svc"}"#,
            5.0,
        ),
        (
            r#"connector_authz_checks_total{decision="allow",reason="public",backend="svc"}"#,
            1.0,
        ),
        (
            r#"connector_authz_checks_total{decision="deny",reason="missing_token",backend="svc"}"#,
            1.0,
        ),
        (
            r#"connector_authz_checks_total{decision="deny",reason="no_route",backend=""}"#,
            1.0,
        ),
        (
            r#"connector_authz_checks_total{decision="error",reason="invalid_argument",backend=""}"#,
            1.0,
        ),
        ("connector_authz_check_duration_seconds_count", 9.0),
        (
            &format!(
                "connector_authz_deprecated_unit_primitive_requests_total{{unit_primitive=\"{DEPRECATED}\"}}"
            ),
            2.0,
        ),
        (
            &format!("connector_authz_keys_refresh_total{{{issuer_label},result=\"success\"}}"),
            2.0,
        ),
        (
            &format!("connector_authz_keys_refresh_total{{{issuer_label},result=\"failure\"}}"),
            0.0,
        ),
        (&format!("connector_authz_keys{{{issuer_label}}}"), 2.0),
        (
            r#"connector_authz_config_reloads_total{result="success"}"#,
            0.0,
        ),
    ] {
        assert_eq!(sample(&after, series), Some(value), "{series}\n{after}");
    }

    // A scraper that asks for OpenMetrics gets it.
    let open = reqwest::Client::new()
        .get(format!("http://{}/metrics", running.admin_addr))
        .header("accept", "application/openmetrics-text;version=1.0.0")
        .send()
        .await
        .expect("admin answers");
    assert!(
        open.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(open.text().await.unwrap().ends_with("# EOF\n"));

    running.shutdown().await;
    after
}

/// Pipes `metrics` into `promtool check metrics`, which must find nothing to say.
fn promtool_accepts(metrics: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool is not installed ({e}): run scripts/install-test-deps.sh \
                 (as root: it apt-installs Debian's prometheus)"
            )
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{metrics}"
    );
}

// ---------------------------------------------------------------------------------------
// Reload

const ISS: &str = "https://issuer.test";
const OTHER: &str = "https://other.test";

/// A config with a `jwks_file` issuer and routes under `prefix`, and `OTHER` too if `other`.
fn reload_yaml(dir: &Path, prefix: &str, other: bool) -> String {
    let k1 = jwks_file(dir, "k1.json", &[&test_key(1)]);
    let k2 = jwks_file(dir, "k2.json", &[&test_key(2)]);
    let mut issuers = format!("  - {{url: {ISS}, jwks_file: {}}}\n", k1.display());
    if other {
        issuers.push_str(&format!(
            "  - {{url: {OTHER}, jwks_file: {}}}\n",
            k2.display()
        ));
    }
    format!(
        "listen: {{grpc: 127.0.0.1:0, admin: 127.0.0.1:0}}
issuers:
{issuers}backends:
  - name: svc
    audience: svc
    routes: [{{prefix: {prefix}, require: []}}]
"
    )
}

async fn start_from_file(dir: &Path, yaml: &str) -> (Running, PathBuf) {
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let config = Config::load(&path).expect("config loads");
    (serve::start(config).await.expect("server starts"), path)
}

fn reloads(running: &Running, result: &str) -> f64 {
    let text = running
        .metrics
        .encode(connector_authz::metrics::Format::Prometheus);
    sample(
        &text,
        &format!("connector_authz_config_reloads_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn a_reload_under_concurrent_checks_loses_none() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config_a = reload_yaml(dir.path(), "/a/", false);
    let config_b = reload_yaml(dir.path(), "/b/", true);
    let (mut running, path) = start_from_file(dir.path(), &config_a).await;
    running.watch_config(Duration::from_millis(20));
    let client = connect(&running).await;
    let token = token_for(&test_key(1), ISS, "svc", &[]);
    let other = token_for(&test_key(2), OTHER, "svc", &[]);

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|n| {
            let (client, token, other, stop) =
                (client.clone(), token.clone(), other.clone(), stop.clone());
            tokio::spawn(async move {
                let mut answers: HashMap<String, usize> = HashMap::new();
                while !stop.load(Ordering::Relaxed) {
                    let path = path_of(n);
                    let token = if path == "/a/x" { &token } else { &other };
                    // Either configuration's answer is right; anything else is a lost Check.
                    let answer = match try_check(&client, path, Some(token), &[]).await {
                        Ok(Ok(())) => "allow".to_owned(),
                        Ok(Err(reason)) => reason,
                        Err(status) => format!("gRPC error {status}"),
                    };
                    *answers.entry(answer).or_default() += 1;
                }
                (path_of(n), answers)
            })
        })
        .collect();
    fn path_of(n: usize) -> &'static str {
        if n.is_multiple_of(2) { "/a/x" } else { "/b/x" }
    }

    for round in 1..=6 {
        let text = if round % 2 == 1 { &config_b } else { &config_a };
        replace_file(&path, text);
        let applied = within(Duration::from_secs(5), async || {
            reloads(&running, "success") >= f64::from(round)
        })
        .await;
        assert!(applied, "reload {round} was not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let (path, answers) = worker.await.expect("worker");
        let total: usize = answers.values().sum();
        assert!(total > 10, "{path}: only {total} Checks");
        for (answer, count) in &answers {
            // Config A: /a/ allowed, /b/ no route, OTHER unknown. Config B: the reverse.
            let fine = matches!(
                (path, answer.as_str()),
                ("/a/x", "allow" | "no_route") | ("/b/x", "allow" | "no_route" | "unknown_issuer")
            );
            assert!(
                fine,
                "{path}: {count} Checks answered {answer}: {answers:?}"
            );
        }
        assert!(answers.contains_key("allow"), "{path}: {answers:?}");
        assert!(answers.contains_key("no_route"), "{path}: {answers:?}");
    }
    assert_eq!(reloads(&running, "error"), 0.0);
    running.shutdown().await;
}

#[tokio::test]
async fn an_invalid_reload_keeps_the_old_routes_and_is_counted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (running, path) = start_from_file(dir.path(), &reload_yaml(dir.path(), "/a/", false)).await;
    let client = connect(&running).await;
    let token = token_for(&test_key(1), ISS, "svc", &[]);

    let broken = reload_yaml(dir.path(), "/b/", false).replace("require: []", "requre: []");
    replace_file(&path, &broken);
    let error = running
        .reload()
        .await
        .expect_err("an invalid file is refused");
    let message = error.to_string();
    assert!(
        message.contains(&format!("{}:", path.display())),
        "the error names file:line: {message}"
    );
    assert_eq!(reloads(&running, "error"), 1.0);
    assert_eq!(reloads(&running, "success"), 0.0);
    assert_eq!(check(&client, "/a/x", Some(&token), &[]).await, Ok(()));
    assert_eq!(
        check(&client, "/b/x", Some(&token), &[]).await,
        Err("no_route".into())
    );

    // A valid file whose listen addresses differ still reloads its routes; the listeners
    // stay where they are (a warning says to restart).
    let moved =
        reload_yaml(dir.path(), "/b/", false).replace("grpc: 127.0.0.1:0", "grpc: 127.0.0.1:1");
    replace_file(&path, &moved);
    running.reload().await.expect("valid config reloads");
    assert_eq!(check(&client, "/b/x", Some(&token), &[]).await, Ok(()));
    assert_eq!(reloads(&running, "success"), 1.0);
    running.shutdown().await;
}

#[tokio::test]
async fn a_reload_adds_and_removes_issuers_and_keeps_the_keys_of_those_that_remain() {
    let (k1, k2) = (test_key(1), test_key(2));
    let staying = FakeIssuer::start(&[&k1]).await;
    let leaving = FakeIssuer::start(&[&k2]).await;
    let arriving = FakeIssuer::start(&[&k2]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let yaml = |issuers: &[&FakeIssuer]| {
        let list: String = issuers
            .iter()
            .map(|i| format!("  - url: {}\n", i.url()))
            .collect();
        format!(
            "listen: {{grpc: 127.0.0.1:0, admin: 127.0.0.1:0}}
issuers:
{list}keys: {{fetch_timeout: 2s}}
backends: [{{name: svc, audience: svc, routes: [{{prefix: /, require: []}}]}}]
"
        )
    };
    let (running, path) = start_from_file(dir.path(), &yaml(&[&staying, &leaving])).await;
    let client = connect(&running).await;
    let ask = async |issuer: &FakeIssuer, key: &DevKey| {
        check(
            &client,
            "/x",
            Some(&token_for(key, &issuer.url(), "svc", &[])),
            &[],
        )
        .await
    };
    assert_eq!(ask(&staying, &k1).await, Ok(()));
    assert_eq!(ask(&leaving, &k2).await, Ok(()));
    let staying_fetches = staying.jwks_fetch_count();
    let staying_keys = running.snapshot.load().keys.get(&staying.url()).cloned();

    replace_file(&path, &yaml(&[&staying, &arriving]));
    running.reload().await.expect("reload");
    // The issuer that stays keeps its key set (the same one, not refetched) ...
    let kept = running.snapshot.load().keys.get(&staying.url()).cloned();
    assert!(
        matches!((&staying_keys, &kept), (Some(a), Some(b)) if Arc::ptr_eq(a, b)),
        "the keys of a remaining issuer were replaced"
    );
    assert_eq!(staying.jwks_fetch_count(), staying_fetches);
    assert_eq!(ask(&staying, &k1).await, Ok(()));
    // ... the one removed is gone with its keys and its refresh ...
    assert!(running.snapshot.load().keys.get(&leaving.url()).is_none());
    assert!(running.keys.fetch_stats(&leaving.url()).is_none());
    assert_eq!(ask(&leaving, &k2).await, Err("unknown_issuer".into()));
    // ... and the new one fetches its keys in the background.
    let fetched = within(Duration::from_secs(5), async || {
        running.snapshot.load().keys.get(&arriving.url()).is_some()
    })
    .await;
    assert!(fetched, "the new issuer's keys never arrived");
    assert_eq!(ask(&arriving, &k2).await, Ok(()));
    let ready = within(Duration::from_secs(5), async || {
        running.keys.missing_issuers().is_empty()
    })
    .await;
    assert!(ready);
    running.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// The binary: SIGTERM drain, JSON logs, SIGHUP

/// `connector-authz serve` with JSON logs at debug level into a file; killed when dropped.
struct Sidecar {
    child: Child,
    log: PathBuf,
    grpc: String,
    admin: String,
}

impl Sidecar {
    /// Drains at once on SIGTERM (no shutdown delay).
    fn start(config: &Path, log: PathBuf) -> Sidecar {
        Self::start_with(config, log, &["--shutdown-delay", "0s"])
    }

    fn start_with(config: &Path, log: PathBuf, extra: &[&str]) -> Sidecar {
        let out = File::create(&log).expect("create log file");
        let child = Command::new(AUTHZ_BIN)
            .args(["--log-format", "json", "serve", "--config"])
            .arg(config)
            .args(["--drain-timeout", "5s"])
            .args(extra)
            .env("CONNECTOR_AUTHZ_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start connector-authz");
        let mut sidecar = Sidecar {
            child,
            log,
            grpc: String::new(),
            admin: String::new(),
        };
        let start = Instant::now();
        loop {
            let serving = sidecar.lines().into_iter().find_map(|line| {
                let fields = &line["fields"];
                (fields["message"] == "connector-authz is serving").then(|| {
                    (
                        fields["grpc_addr"].as_str().unwrap_or_default().to_owned(),
                        fields["admin_addr"].as_str().unwrap_or_default().to_owned(),
                    )
                })
            });
            if let Some((grpc, admin)) = serving {
                sidecar.grpc = grpc;
                sidecar.admin = admin;
                return sidecar;
            }
            if let Ok(Some(status)) = sidecar.child.try_wait() {
                panic!("connector-authz exited with {status}:\n{}", sidecar.text());
            }
            assert!(start.elapsed() < WAIT, "not serving:\n{}", sidecar.text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every log line, each of which must be a JSON object.
    fn lines(&self) -> Vec<Value> {
        self.text()
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
            })
            .collect()
    }

    async fn client(&self) -> AuthorizationClient<Channel> {
        AuthorizationClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("client connects")
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit; its status code.
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "connector-authz still running after {limit:?}:\n{}",
            self.text()
        );
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An OIDC issuer whose answers the test can hold back: while it is closed, every request
/// waits (counted in `held`) until it opens again.
struct GatedIssuer {
    url: String,
    jwks: Arc<std::sync::Mutex<Value>>,
    open: tokio::sync::watch::Sender<bool>,
    held: Arc<AtomicU64>,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct GatedState {
    url: String,
    jwks: Arc<std::sync::Mutex<Value>>,
    open: tokio::sync::watch::Receiver<bool>,
    held: Arc<AtomicU64>,
}

impl GatedIssuer {
    async fn start(keys: &[&DevKey]) -> GatedIssuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (open, open_rx) = tokio::sync::watch::channel(true);
        let state = GatedState {
            url: url.clone(),
            jwks: Arc::new(std::sync::Mutex::new(DevKey::key_set_json(keys))),
            open: open_rx,
            held: Arc::new(AtomicU64::new(0)),
        };
        async fn gate(state: &GatedState) {
            let mut open = state.open.clone();
            if !*open.borrow_and_update() {
                state.held.fetch_add(1, Ordering::SeqCst);
                let _ = open.wait_for(|open| *open).await;
            }
        }
        let app = Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(|State(s): State<GatedState>| async move {
                    gate(&s).await;
                    axum::Json(json!({"issuer": s.url, "jwks_uri": format!("{}/jwks", s.url)}))
                }),
            )
            .route(
                "/jwks",
                get(|State(s): State<GatedState>| async move {
                    gate(&s).await;
                    let jwks = s.jwks.lock().unwrap().clone();
                    axum::Json(jwks)
                }),
            )
            .with_state(state.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        GatedIssuer {
            url,
            jwks: state.jwks,
            open,
            held: state.held,
            server,
        }
    }
}

impl Drop for GatedIssuer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readiness_off_and_lets_a_check_in_flight_finish() {
    let (k1, k2) = (test_key(1), test_key(2));
    let issuer = GatedIssuer::start(&[&k1]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: {{grpc: 127.0.0.1:0, admin: 127.0.0.1:0}}
issuers: [{{url: {}}}]
keys: {{min_refresh_interval: 1s, unknown_kid_wait: 60s, fetch_timeout: 60s}}
backends: [{{name: svc, audience: svc, routes: [{{prefix: /, require: []}}]}}]
",
            issuer.url
        ),
    )
    .expect("write config");
    let log = dir.path().join("sidecar.log");
    let mut sidecar = tokio::task::block_in_place(|| Sidecar::start(&config, log));
    let admin = sidecar.admin.clone();
    let ready = within(WAIT, async || {
        reqwest::get(format!("http://{admin}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "never ready:\n{}", sidecar.text());

    // A token under a new kid parks its Check on a refresh that the issuer holds back
    // until the test opens it (well within the 60 s `unknown_kid_wait` set above).
    *issuer.jwks.lock().unwrap() = DevKey::key_set_json(&[&k1, &k2]);
    issuer.open.send_replace(false);
    let client = sidecar.client().await;
    let token = token_for(&k2, &issuer.url, "svc", &[]);
    let in_flight = tokio::spawn(async move { try_check(&client, "/x", Some(&token), &[]).await });
    let refreshing = within(WAIT, async || issuer.held.load(Ordering::SeqCst) > 0).await;
    assert!(
        refreshing,
        "the unknown kid started no refresh:\n{}",
        sidecar.text()
    );
    assert!(
        !in_flight.is_finished(),
        "the Check did not wait for the refresh"
    );

    sidecar.signal("TERM");
    let draining = within(WAIT, async || {
        reqwest::get(format!("http://{admin}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 503)
    })
    .await;
    assert!(draining, "readiness stayed on:\n{}", sidecar.text());
    assert!(
        !in_flight.is_finished(),
        "the Check ended before the issuer answered"
    );
    // The Check is still in flight after SIGTERM; now the refresh may finish.
    issuer.open.send_replace(true);
    let answer = in_flight.await.expect("task");
    assert_eq!(answer.map_err(|s| s.to_string()), Ok(Ok(())));
    // `wait` gives up (None) after its deadline: the exit is awaited, not timed.
    let code = tokio::task::block_in_place(|| sidecar.wait(Duration::from_secs(10)));
    assert_eq!(code, Some(0), "{}", sidecar.text());
    let text = sidecar.text();
    assert!(text.contains("shutting down: draining"), "{text}");
}

/// `serve --shutdown-delay`: after SIGTERM readiness is off at once, yet Checks keep being
/// answered (on a connection opened before the signal and on a new one) until the delay
/// ends; a second SIGTERM cuts the delay short and the process drains and exits 0. The
/// delay is long (10 min) so that only the second signal can end it in this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_answering_checks_with_readiness_off_for_the_shutdown_delay() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let dir = tempfile::tempdir().expect("temp dir");
    let key = test_key(1);
    let jwks = jwks_file(dir.path(), "jwks.json", &[&key]);
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: {{grpc: 127.0.0.1:0, admin: 127.0.0.1:0}}
issuers: [{{url: {ISS}, jwks_file: {}}}]
backends: [{{name: svc, audience: svc, routes: [{{prefix: /, require: []}}]}}]
",
            jwks.display()
        ),
    )
    .expect("write config");
    let log = dir.path().join("sidecar.log");
    let mut sidecar = tokio::task::block_in_place(|| {
        Sidecar::start_with(&config, log, &["--shutdown-delay", "10m"])
    });
    let admin = sidecar.admin.clone();
    let readyz = async || {
        reqwest::get(format!("http://{admin}/readyz"))
            .await
            .map(|r| r.status().as_u16())
            .ok()
    };
    assert!(
        within(WAIT, async || readyz().await == Some(200)).await,
        "{}",
        sidecar.text()
    );
    let before = sidecar.client().await;
    let token = token_for(&key, ISS, "svc", &[]);
    assert_eq!(check(&before, "/x", Some(&token), &[]).await, Ok(()));

    sidecar.signal("TERM");
    let not_ready = within(WAIT, async || readyz().await == Some(503)).await;
    assert!(not_ready, "readiness stayed on:\n{}", sidecar.text());
    let channel = Channel::from_shared(format!("http://{}", sidecar.grpc))
        .expect("uri")
        .connect()
        .await
        .expect("a new connection is still accepted during the delay");
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "envoy.service.auth.v3.Authorization".into(),
        })
        .await
        .expect("health answers")
        .into_inner();
    assert_eq!(health.status, ServingStatus::NotServing as i32);
    let after = AuthorizationClient::new(channel);
    assert_eq!(check(&after, "/x", Some(&token), &[]).await, Ok(()));
    assert_eq!(check(&before, "/x", Some(&token), &[]).await, Ok(()));
    assert_eq!(
        check(&after, "/x", None, &[]).await,
        Err("missing_token".into()),
        "denials are still decided, not failed"
    );
    assert_eq!(
        sidecar.child.try_wait().expect("try_wait"),
        None,
        "exited during the delay"
    );
    let text = sidecar.text();
    assert!(
        text.contains("still answering Checks for the shutdown delay"),
        "{text}"
    );
    assert!(
        !text.contains("shutting down: draining"),
        "drained before the delay ended: {text}"
    );

    drop((before, after));
    sidecar.signal("TERM");
    let code = tokio::task::block_in_place(|| sidecar.wait(WAIT));
    assert_eq!(code, Some(0), "{}", sidecar.text());
    let text = sidecar.text();
    assert!(text.contains("shutdown delay cut short"), "{text}");
    assert!(text.contains("shutting down: draining"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_and_never_contain_the_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = test_key(1);
    let jwks = jwks_file(dir.path(), "jwks.json", &[&key]);
    let registry = Path::new(REPO).join("config/cloud_connector");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: {{grpc: 127.0.0.1:0, admin: 127.0.0.1:0}}
issuers: [{{url: {ISS}, jwks_file: {}}}]
unit_primitives: {}
backends:
  - name: svc
    audience: svc
    routes:
      - {{prefix: /open/, require: []}}
      - {{prefix: /old/, require: [{DEPRECATED}]}}
",
            jwks.display(),
            registry.display()
        ),
    )
    .expect("write config");
    let log = dir.path().join("sidecar.log");
    let mut sidecar = tokio::task::block_in_place(|| Sidecar::start(&config, log));
    let client = sidecar.client().await;

    let mut token_claims = claims(ISS, "svc", &[DEPRECATED], now() + 600);
    token_claims["jti"] = json!("jti-operability-1");
    let token = key.sign(&token_claims);
    let segments: Vec<String> = token.split('.').map(str::to_owned).collect();
    assert_eq!(segments.len(), 3);
    // The same signature on other claims: a bad_signature deny also holds token parts.
    let tampered = format!(
        "{}.{}.{}",
        segments[0],
        token_for(&key, ISS, "other", &[])
            .split('.')
            .nth(1)
            .unwrap(),
        segments[2]
    );
    let expired = key.sign(&claims(ISS, "svc", &[], now() - 3600));
    assert_eq!(check(&client, "/open/x", Some(&token), &[]).await, Ok(()));
    assert_eq!(
        check(&client, "/open/x", Some(&tampered), &[]).await,
        Err("bad_signature".into())
    );
    assert_eq!(
        check(&client, "/open/x", Some(&expired), &[]).await,
        Err("expired".into())
    );
    assert_eq!(
        check(&client, "/nowhere", Some(&token), &[]).await,
        Err("no_route".into())
    );
    for _ in 0..3 {
        assert_eq!(check(&client, "/old/x", Some(&token), &[]).await, Ok(()));
    }
    // A reload is a new configuration: the deprecation is logged once more.
    sidecar.signal("HUP");
    let sidecar_ref = &sidecar;
    let reloaded = within(Duration::from_secs(5), async || {
        sidecar_ref.text().contains("configuration reloaded")
    })
    .await;
    assert!(reloaded, "{}", sidecar.text());
    assert_eq!(check(&client, "/old/x", Some(&token), &[]).await, Ok(()));
    assert_eq!(check(&client, "/old/x", Some(&token), &[]).await, Ok(()));

    sidecar.signal("TERM");
    let code = tokio::task::block_in_place(|| sidecar.wait(Duration::from_secs(10)));
    assert_eq!(code, Some(0));

    let lines = sidecar.lines();
    for line in &lines {
        let text = line.to_string();
        for (n, segment) in segments.iter().enumerate() {
            assert!(
                !text.contains(segment.as_str()),
                "segment {n} of the token is in a log line: {text}"
            );
        }
        assert!(!text.contains(tampered.split('.').nth(1).unwrap()));
    }
    let decisions: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "check")
        .collect();
    assert_eq!(decisions.len(), 9, "one debug line per decision: {lines:?}");
    let first = &decisions[0];
    assert_eq!(first["level"], "DEBUG");
    let jti = "jti-operability-1";
    for (field, value) in [
        ("decision", json!("allow")),
        ("reason", json!("valid_token")),
        ("route", json!("prefix /open/")),
        ("backend", json!("svc")),
        ("issuer", json!(ISS)),
        ("subject", json!("test-instance-id")),
        ("jti", json!(jti)),
    ] {
        assert_eq!(first["fields"][field], value, "{field}: {first}");
    }
    assert!(first["fields"]["latency_us"].is_u64(), "{first}");
    assert_eq!(decisions[1]["fields"]["reason"], "bad_signature");
    assert_eq!(decisions[1]["fields"]["issuer"], ISS);

    let deprecations: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["unit_primitive"] == DEPRECATED)
        .collect();
    assert_eq!(
        deprecations.len(),
        2,
        "once per loaded configuration: {deprecations:?}"
    );
    for warning in deprecations {
        assert_eq!(warning["level"], "WARN");
        assert!(
            warning["fields"]["deprecation"]
                .as_str()
                .is_some_and(|m| m.contains("troubleshoot_job")),
            "{warning}"
        );
        // The registry's deprecated_by_url, or empty where GitLab's data gives none.
        let registry = connector_authz::registry::Registry::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cloud_connector"),
        )
        .expect("the shipped registry loads");
        let by_url = registry
            .unit_primitive(DEPRECATED)
            .and_then(|up| up.deprecation.as_ref())
            .and_then(|d| d.by_url.clone())
            .unwrap_or_default();
        assert_eq!(warning["fields"]["url"], by_url.as_str(), "{warning}");
    }
}

#[tokio::test]
async fn draining_says_not_serving_before_the_listener_closes() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let dir = tempfile::tempdir().expect("temp dir");
    let (running, _) = start_from_file(dir.path(), &reload_yaml(dir.path(), "/a/", false)).await;
    let channel = Channel::from_shared(format!("http://{}", running.grpc_addr))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: "envoy.service.auth.v3.Authorization".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let status = |m: Option<tonic_health::pb::HealthCheckResponse>| {
        ServingStatus::try_from(m.expect("a status").status).expect("known status")
    };
    assert_eq!(
        status(watch.message().await.expect("message")),
        ServingStatus::Serving
    );
    let admin = running.admin_addr;
    let shutdown = tokio::spawn(running.shutdown_within(Duration::from_secs(5)));
    assert_eq!(
        status(watch.message().await.expect("message")),
        ServingStatus::NotServing
    );
    let readyz = reqwest::get(format!("http://{admin}/readyz"))
        .await
        .expect("admin still answers while draining");
    assert_eq!(readyz.status(), 503);
    let body: Value = serde_json::from_slice(&readyz.bytes().await.expect("body")).expect("JSON");
    assert_eq!(body["draining"], true);
    // An open Watch is a stream in flight: closing it lets the drain finish.
    drop(watch);
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("drained within the bound")
        .expect("shutdown task");
}
