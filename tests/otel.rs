//! OpenTelemetry traces: the real binary, configured only by the standard `OTEL_*`
//! variables, exports one span per Check to an in-process OTLP/HTTP receiver on loopback
//! (protobuf bodies decoded with `opentelemetry-proto`), as a child of the `traceparent`
//! Envoy forwards; an unknown-kid refresh adds a child span; without the variables (or
//! with the SDK disabled) nothing is sent. Spans leave on the SIGTERM flush: the batch
//! delay is set far beyond the test, so every span the receiver sees proves the flush.

mod support;

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use connector_authz::proto::envoy::service::auth::v3::{
    authorization_client::AuthorizationClient, check_response,
};
use connector_authz::traces::{CHECK_SPAN_NAME, REFRESH_SPAN_NAME};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use support::{FakeIssuer, check_request, claims, instance_headers, now, test_key, within};

const AUTHZ_BIN: &str = env!("CARGO_BIN_EXE_connector-authz");
const WAIT: Duration = Duration::from_secs(20);
const AUDIENCE: &str = "gitlab-ai-gateway";
const ROUTE: &str = "/ai/v2/code/";

/// Every `OTEL_*` variable the sidecar reads; removed from the child's environment first,
/// so that one set where the tests run cannot change what they see.
const OTEL_VARS: [&str; 9] = [
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
];

// ---------------------------------------------------------------------------------------
// The OTLP receiver

#[derive(Default)]
struct Received {
    /// POST /v1/traces requests, decodable or not.
    requests: usize,
    /// (service.name, span) of every span received.
    spans: Vec<(String, Span)>,
}

/// OTLP/HTTP with protobuf bodies on a loopback port: POST /v1/traces.
struct Receiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        Self::start_on("127.0.0.1:0").await
    }

    async fn start_on(addr: &str) -> Receiver {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind the OTLP receiver on {addr}: {e}"));
        let addr = listener.local_addr().expect("receiver address");
        let received = Arc::new(Mutex::new(Received::default()));
        let app = Router::new()
            .route("/v1/traces", post(export))
            .with_state(received.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("receiver serves");
        });
        Receiver {
            addr,
            received,
            server,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> usize {
        self.received.lock().expect("receiver lock").requests
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.received.lock().expect("receiver lock").spans.clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn export(State(received): State<Arc<Mutex<Received>>>, body: Bytes) -> impl IntoResponse {
    let mut received = received.lock().expect("receiver lock");
    received.requests += 1;
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "service.name")
            .and_then(|a| string_value(a.value.as_ref()?.value.as_ref()?))
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.spans.push((service.clone(), span));
            }
        }
    }
    (
        StatusCode::OK,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

fn string_value(value: &AnyValue) -> Option<String> {
    match value {
        AnyValue::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// A span's attribute as text (strings as they are, integers and booleans in decimal or
/// `true`/`false`).
fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .as_ref()?;
    match value.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        AnyValue::BoolValue(b) => Some(b.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------
// The sidecar

/// `connector-authz serve` with JSON logs into a file and `env` set (after every OTEL_*
/// variable was removed); killed when dropped.
struct Sidecar {
    child: Child,
    log: PathBuf,
    grpc: String,
    admin: String,
}

impl Sidecar {
    async fn start(dir: &Path, issuer: &FakeIssuer, env: &[(&str, String)]) -> Sidecar {
        let config = dir.join("connector-authz.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: {{grpc: 127.0.0.1:0, admin: 127.0.0.1:0}}\n\
                 issuers: [{{url: {}}}]\n\
                 backends:\n\
                 - name: ai_gateway\n  audience: {AUDIENCE}\n  routes:\n\
                 \x20 - prefix: {ROUTE}\n    require: [code_suggestions]\n",
                issuer.url()
            ),
        )
        .expect("write config");
        let log = dir.join("sidecar.log");
        let mut command = Command::new(AUTHZ_BIN);
        command
            .args(["--log-format", "json", "serve", "--config"])
            .arg(&config)
            .args(["--shutdown-delay", "0s", "--drain-timeout", "5s"])
            .env("CONNECTOR_AUTHZ_LOG", "info")
            // Spans leave only when the sidecar stops (or the queue fills), never on the
            // timer: what the receiver sees was flushed at shutdown.
            .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create log file"));
        for var in OTEL_VARS {
            command.env_remove(var);
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().expect("start connector-authz");
        let mut sidecar = Sidecar {
            child,
            log,
            grpc: String::new(),
            admin: String::new(),
        };
        let start = Instant::now();
        while sidecar.grpc.is_empty() {
            if let Some((grpc, admin)) = sidecar.log_lines().into_iter().find_map(|line| {
                let fields = &line["fields"];
                (fields["message"] == "connector-authz is serving").then(|| {
                    (
                        fields["grpc_addr"].as_str().unwrap_or_default().to_owned(),
                        fields["admin_addr"].as_str().unwrap_or_default().to_owned(),
                    )
                })
            }) {
                sidecar.grpc = grpc;
                sidecar.admin = admin;
                break;
            }
            if let Ok(Some(status)) = sidecar.child.try_wait() {
                panic!("connector-authz exited with {status}:\n{}", sidecar.text());
            }
            assert!(start.elapsed() < WAIT, "not serving:\n{}", sidecar.text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let readyz = format!("http://{}/readyz", sidecar.admin);
        let ready = within(WAIT, async || {
            reqwest::get(&readyz)
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        assert!(ready, "never ready:\n{}", sidecar.text());
        sidecar
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_lines(&self) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The message of the start-up line that says what was configured for traces.
    fn traces_line(&self) -> String {
        self.log_lines()
            .into_iter()
            .filter_map(|line| line["fields"]["message"].as_str().map(str::to_owned))
            .find(|message| message.starts_with("traces: "))
            .unwrap_or_else(|| panic!("no `traces:` line in the log:\n{}", self.text()))
    }

    /// One Check of `path` with the instance headers, `authorization: Bearer token` and
    /// `extra`; the HTTP status Envoy would answer with (200 for an allow).
    async fn check(&self, path: &str, token: &str, extra: &[(&str, &str)]) -> u32 {
        let mut client = AuthorizationClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("client connects");
        let mut headers = instance_headers(token);
        headers.extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_string())));
        let response = client
            .check(check_request("POST", path, headers))
            .await
            .expect("Check is a successful RPC")
            .into_inner();
        match response.http_response {
            Some(check_response::HttpResponse::OkResponse(_)) => 200,
            Some(check_response::HttpResponse::DeniedResponse(denied)) => {
                denied.status.map_or(0, |s| s.code as u32)
            }
            None => panic!("a CheckResponse without an HTTP response"),
        }
    }

    /// SIGTERM, then waits for a clean exit (the span flush happens on the way out).
    async fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "exit {status}:\n{}", self.text());
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "still running after SIGTERM:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token(key_number: usize, issuer: &FakeIssuer, scopes: &[&str]) -> String {
    test_key(key_number).sign(&claims(&issuer.url(), AUDIENCE, scopes, now() + 600))
}

/// A W3C traceparent with these ids, sampled.
fn traceparent(trace_id: &str, span_id: &str) -> String {
    format!("00-{trace_id}-{span_id}-01")
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn checks_are_spans_under_the_callers_traceparent_with_the_decision() {
    let dir = tempfile::tempdir().expect("tempdir");
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    let receiver = Receiver::start().await;
    let sidecar = Sidecar::start(
        dir.path(),
        &issuer,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
            ("OTEL_SERVICE_NAME", "authz-under-test".into()),
        ],
    )
    .await;
    assert!(
        sidecar.traces_line().contains(&receiver.endpoint()),
        "{}",
        sidecar.traces_line()
    );

    let allow_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let allow_parent = "00f067aa0ba902b7";
    let deny_trace = "0af7651916cd43dd8448eb211c80319c";
    let deny_parent = "b7ad6b7169203331";
    let good = token(1, &issuer, &["code_suggestions"]);
    let short = token(1, &issuer, &["duo_chat"]);
    let allow_header = traceparent(allow_trace, allow_parent);
    let deny_header = traceparent(deny_trace, deny_parent);
    let path = format!("{ROUTE}completions");
    assert_eq!(
        sidecar
            .check(
                &path,
                &good,
                &[("traceparent", &allow_header), ("tracestate", "vendor=1")]
            )
            .await,
        200
    );
    assert_eq!(
        sidecar
            .check(&path, &short, &[("traceparent", &deny_header)])
            .await,
        403
    );
    assert_eq!(sidecar.check(&path, &good, &[]).await, 200);
    assert_eq!(sidecar.check("/nowhere", &good, &[]).await, 403);
    assert_eq!(receiver.requests(), 0, "exported before the shutdown flush");
    sidecar.stop().await;

    let spans = receiver.spans();
    let checks: Vec<&Span> = spans
        .iter()
        .filter(|(_, s)| s.name == CHECK_SPAN_NAME)
        .map(|(_, s)| s)
        .collect();
    assert_eq!(checks.len(), 4, "one span per Check: {spans:#?}");
    assert!(
        spans
            .iter()
            .all(|(service, _)| service == "authz-under-test")
    );
    for (_, span) in &spans {
        for a in &span.attributes {
            let text = format!("{:?}", a.value);
            for t in [&good, &short] {
                let signature = t.rsplit('.').next().expect("a JWT has parts");
                assert!(
                    !text.contains(t.as_str()) && !text.contains(signature),
                    "attribute {} holds the token",
                    a.key
                );
            }
        }
    }

    let allow = checks
        .iter()
        .find(|s| hex(&s.trace_id) == allow_trace)
        .expect("the allow's span is in the caller's trace");
    assert_eq!(hex(&allow.parent_span_id), allow_parent);
    assert_eq!(allow.trace_state, "vendor=1");
    assert_eq!(attribute(allow, "authz.decision").as_deref(), Some("allow"));
    assert_eq!(
        attribute(allow, "authz.reason").as_deref(),
        Some("valid_token")
    );
    assert_eq!(
        attribute(allow, "authz.backend").as_deref(),
        Some("ai_gateway")
    );
    assert_eq!(attribute(allow, "authz.issuer"), Some(issuer.url()));
    assert_eq!(
        attribute(allow, "authz.route"),
        Some(format!("prefix {ROUTE}"))
    );
    assert_eq!(attribute(allow, "http.response.status_code"), None);

    let deny = checks
        .iter()
        .find(|s| hex(&s.trace_id) == deny_trace)
        .expect("the deny's span is in the caller's trace");
    assert_eq!(hex(&deny.parent_span_id), deny_parent);
    assert_eq!(attribute(deny, "authz.decision").as_deref(), Some("deny"));
    assert_eq!(
        attribute(deny, "authz.reason").as_deref(),
        Some("insufficient_scope")
    );
    assert_eq!(
        attribute(deny, "authz.backend").as_deref(),
        Some("ai_gateway")
    );
    assert_eq!(attribute(deny, "authz.issuer"), Some(issuer.url()));
    assert_eq!(
        attribute(deny, "authz.route"),
        Some(format!("prefix {ROUTE}"))
    );
    assert_eq!(
        attribute(deny, "http.response.status_code").as_deref(),
        Some("403")
    );

    let roots: Vec<&&Span> = checks
        .iter()
        .filter(|s| hex(&s.trace_id) != allow_trace && hex(&s.trace_id) != deny_trace)
        .collect();
    assert_eq!(roots.len(), 2, "{roots:#?}");
    assert!(roots.iter().all(|s| s.parent_span_id.is_empty()));
    assert_ne!(
        roots[0].trace_id, roots[1].trace_id,
        "each root starts a trace"
    );
    let no_route = roots
        .iter()
        .find(|s| attribute(s, "authz.reason").as_deref() == Some("no_route"))
        .expect("the no_route deny has its span");
    assert_eq!(attribute(no_route, "authz.route"), None);
    assert_eq!(
        attribute(no_route, "http.response.status_code").as_deref(),
        Some("403")
    );
}

#[tokio::test]
async fn an_unknown_kid_refresh_is_a_child_span_of_the_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    let receiver = Receiver::start().await;
    let sidecar = Sidecar::start(
        dir.path(),
        &issuer,
        &[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            format!("{}/v1/traces", receiver.endpoint()),
        )],
    )
    .await;
    // Key 2 is published after the sidecar fetched the key set: its first use refreshes.
    issuer.set_keys(&[&test_key(1), &test_key(2)]);
    let rotated = token(2, &issuer, &["code_suggestions"]);
    let trace = "11112222333344445555666677778888";
    let header = traceparent(trace, "1234567890abcdef");
    assert_eq!(
        sidecar
            .check(&format!("{ROUTE}x"), &rotated, &[("traceparent", &header)])
            .await,
        200
    );
    sidecar.stop().await;

    let spans: Vec<Span> = receiver.spans().into_iter().map(|(_, s)| s).collect();
    let check = spans
        .iter()
        .find(|s| s.name == CHECK_SPAN_NAME)
        .unwrap_or_else(|| panic!("no Check span: {spans:#?}"));
    let wait = spans
        .iter()
        .find(|s| s.name == REFRESH_SPAN_NAME)
        .unwrap_or_else(|| panic!("no refresh span: {spans:#?}"));
    assert_eq!(hex(&check.trace_id), trace);
    assert_eq!(wait.trace_id, check.trace_id);
    assert_eq!(wait.parent_span_id, check.span_id);
    assert_eq!(attribute(wait, "authz.issuer"), Some(issuer.url()));
    assert_eq!(
        attribute(wait, "authz.refresh.finished").as_deref(),
        Some("true")
    );
    assert_eq!(attribute(check, "authz.decision").as_deref(), Some("allow"));
    assert!(wait.start_time_unix_nano >= check.start_time_unix_nano);
    assert!(wait.end_time_unix_nano <= check.end_time_unix_nano);
}

/// With the variables unset the exporter must not start at all: the receiver listens on
/// OTLP/HTTP's default port (4318 on loopback), where an exporter started with defaults
/// would send. With an endpoint set but `OTEL_SDK_DISABLED=true` or
/// `OTEL_TRACES_EXPORTER=none`, nothing reaches the receiver it names.
#[tokio::test]
async fn without_the_variables_nothing_is_exported() {
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    let default_port = Receiver::start_on("127.0.0.1:4318").await;
    let named = Receiver::start().await;
    let good = token(1, &issuer, &["code_suggestions"]);
    let header = traceparent("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let cases: [(&[(&str, String)], &str); 3] = [
        (&[], "traces: off (neither OTEL_EXPORTER_OTLP_ENDPOINT"),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", named.endpoint()),
                ("OTEL_SDK_DISABLED", "true".into()),
            ],
            "traces: off (OTEL_SDK_DISABLED=true)",
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", named.endpoint()),
                ("OTEL_TRACES_EXPORTER", "none".into()),
            ],
            "traces: off (OTEL_TRACES_EXPORTER=none)",
        ),
    ];
    for (env, expected) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let sidecar = Sidecar::start(dir.path(), &issuer, env).await;
        assert!(
            sidecar.traces_line().starts_with(expected),
            "{env:?}: {}",
            sidecar.traces_line()
        );
        for _ in 0..3 {
            assert_eq!(
                sidecar
                    .check(&format!("{ROUTE}x"), &good, &[("traceparent", &header)])
                    .await,
                200
            );
        }
        sidecar.stop().await;
    }
    assert_eq!(default_port.requests(), 0);
    assert_eq!(named.requests(), 0);
}

/// A collector that refuses connections costs the Checks nothing: every one is answered,
/// and SIGTERM still stops the sidecar (the flush gives up).
#[tokio::test]
async fn an_unreachable_collector_fails_no_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address")
    };
    let sidecar = Sidecar::start(
        dir.path(),
        &issuer,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{closed}")),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "4".into()),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2".into()),
        ],
    )
    .await;
    let good = token(1, &issuer, &["code_suggestions"]);
    for _ in 0..20 {
        assert_eq!(sidecar.check(&format!("{ROUTE}x"), &good, &[]).await, 200);
    }
    sidecar.stop().await;
}
