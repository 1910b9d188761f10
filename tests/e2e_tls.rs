//! TLS and mTLS on the listeners (`listen.tls`, `listen.admin_tls`): Checks over TLS, a
//! client without a certificate refused under mTLS, certificates rotated in place and
//! served to new connections without a restart, a bad rotation that keeps the old
//! certificate, and unusable files refused at start and by `check-config`. Then a real
//! Envoy whose ext_authz cluster is `envoy/front-proxy-tls.yaml`'s TLS cluster, with and
//! without a client certificate being asked for.
//!
//! Every certificate and key is generated here (rcgen); nothing is committed. Everything
//! listens on 127.0.0.1. The Envoy tests are `#[ignore]`d like those of tests/e2e_envoy.rs
//! (a missing Envoy fails them when they are asked for with `--ignored`).

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use axum::http::Uri;
use connector_authz::config::Config;
use connector_authz::dev::DevKey;
use connector_authz::proto::envoy::service::auth::v3::{
    authorization_client::AuthorizationClient, check_response,
};
use connector_authz::serve::{self, Running};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use support::procs::{Proc, echo, envoy, free_port, render};
use support::{INSTANCE_HEADERS, check_request, claims, now, test_key, within};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::transport::{Channel, Endpoint};

const WAIT: Duration = Duration::from_secs(20);
const AUTHZ_BIN: &str = env!("CARGO_BIN_EXE_connector-authz");
const AUDIENCE: &str = "gitlab-ai-gateway";
/// The issuer whose keys come from a file (no network needed).
const ISSUER: &str = "https://issuer.test";
/// The name in the server certificates, and what clients (and Envoy) check.
const SERVER_NAME: &str = "localhost";

// ---------------------------------------------------------------------------------------
// Certificates

/// A certificate authority made for one test.
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, in PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A server certificate for [`SERVER_NAME`] and 127.0.0.1.
    fn server(&self, common_name: &str) -> Leaf {
        self.leaf(
            common_name,
            vec![SERVER_NAME.into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client(&self, common_name: &str) -> Leaf {
        self.leaf(common_name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, common_name: &str, names: Vec<String>, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &*self.issuer)
            .expect("leaf certificate");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The sidecar

/// Where a test's files are: its configuration and the TLS files it names.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join("jwks.json"),
            DevKey::key_set_json(&[&test_key(1)]).to_string(),
        )
        .expect("write the key set");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path(name), text).expect("write a test file");
    }

    /// Writes the server certificate and key in place (the files keep their inodes), the
    /// certificate first, as a tool that rewrites them one after the other would.
    fn write_server(&self, leaf: &Leaf) {
        self.write("tls.crt", &leaf.cert);
        self.write("tls.key", &leaf.key);
    }

    /// A configuration with TLS on the gRPC listener (`extra_tls` added to `listen.tls`)
    /// and `admin_tls` (a whole `listen.admin_tls:` block, or nothing).
    fn config(&self, extra_tls: &str, admin_tls: &str) -> PathBuf {
        let text = format!(
            "\
listen:
  grpc: 127.0.0.1:0
  admin: 127.0.0.1:0
  tls:
    cert_file: tls.crt
    key_file: tls.key
{extra_tls}{admin_tls}issuers:
  - url: {ISSUER}
    jwks_file: jwks.json
backends:
  - name: ai_gateway
    audience: {AUDIENCE}
    routes:
      - prefix: /ai/v2/code/
        require: [code_suggestions]
      - prefix: /ai/monitoring/
        public: true
"
        );
        let path = self.path("connector-authz.yaml");
        std::fs::write(&path, text).expect("write the configuration");
        path
    }
}

async fn start(config: &Path) -> Running {
    let config = Config::load(config).expect("the test configuration loads");
    serve::start(config).await.expect("the server starts")
}

fn token(scopes: &[&str]) -> String {
    test_key(1).sign(&claims(ISSUER, AUDIENCE, scopes, now() + 600))
}

// ---------------------------------------------------------------------------------------
// Clients

/// A rustls client configuration trusting `roots`, presenting `client` if given.
fn client_tls(roots: &[&TestCa], client: Option<&Leaf>, alpn: &[u8]) -> rustls::ClientConfig {
    let mut store = rustls::RootCertStore::empty();
    for ca in roots {
        store.add(ca.der()).expect("add a root");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(store);
    let mut config = match client {
        Some(leaf) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("client cert PEM"),
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("client key PEM"),
            )
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

async fn tls_connect(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(SERVER_NAME).expect("server name");
    connector.connect(name, tcp).await
}

/// A gRPC client that connects (once, and again after a failure) over TLS.
fn grpc_client(addr: SocketAddr, config: rustls::ClientConfig) -> AuthorizationClient<Channel> {
    let config = Arc::new(config);
    let connector = tower::service_fn(move |_: Uri| {
        let config = Arc::clone(&config);
        async move {
            let tls = tls_connect(addr, (*config).clone()).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let channel = Endpoint::from_shared(format!("https://{SERVER_NAME}:{}", addr.port()))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(connector);
    AuthorizationClient::new(channel)
}

/// A Check's answer: `Ok(())` allowed, `Err(reason)` denied.
type Answer = Result<(), String>;

async fn try_check(
    client: &AuthorizationClient<Channel>,
    path: &str,
    token: Option<&str>,
) -> Result<Answer, tonic::Status> {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = INSTANCE_HEADERS.to_vec();
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer));
    }
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

async fn check(client: &AuthorizationClient<Channel>, path: &str, token: Option<&str>) -> Answer {
    try_check(client, path, token)
        .await
        .expect("Check is a successful RPC")
}

/// The certificate a new connection is served, as the client sees it (the connection
/// must also be usable: the client reads the server's first frames, which is where TLS
/// 1.3 reports a refused client certificate).
async fn served_certificate(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> std::io::Result<CertificateDer<'static>> {
    let mut tls = tls_connect(addr, config).await?;
    let served = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.clone().into_owned())
        .ok_or_else(|| std::io::Error::other("no certificate served"))?;
    // The HTTP/2 preface: the server answers with its SETTINGS frame.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await?;
    let mut frame = [0u8; 9];
    tls.read_exact(&mut frame).await?;
    Ok(served)
}

/// The leaf certificate of `leaf` in DER.
fn der(leaf: &Leaf) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(leaf.cert.as_bytes()).expect("certificate PEM")
}

/// `GET path` over HTTP/1.1 on the admin listener, over TLS: the status and body.
async fn admin_get(
    addr: SocketAddr,
    config: rustls::ClientConfig,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let mut tls = tls_connect(addr, config).await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {SERVER_NAME}\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut reply = Vec::new();
    tls.read_to_end(&mut reply).await?;
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP reply: {reply:?}")))?;
    let body = reply
        .split_once("\r\n\r\n")
        .map_or_else(String::new, |(_, b)| b.to_owned());
    Ok((status, body))
}

/// The value of one sample of the admin listener's `/metrics` (0 when absent).
async fn metric(addr: SocketAddr, config: Option<rustls::ClientConfig>, sample: &str) -> f64 {
    let text = match config {
        Some(config) => {
            admin_get(addr, config, "/metrics")
                .await
                .expect("GET /metrics over TLS")
                .1
        }
        None => reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body"),
    };
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------
// In process

#[tokio::test]
async fn checks_are_answered_over_tls_and_plain_text_is_refused() {
    let files = Files::new();
    let ca = TestCa::new("test CA");
    files.write_server(&ca.server("connector-authz"));
    let running = start(&files.config("", "")).await;

    let client = grpc_client(running.grpc_addr, client_tls(&[&ca], None, b"h2"));
    assert_eq!(
        check(
            &client,
            "/ai/v2/code/completions",
            Some(&token(&["code_suggestions"]))
        )
        .await,
        Ok(())
    );
    assert_eq!(
        check(
            &client,
            "/ai/v2/code/completions",
            Some(&token(&["duo_chat"]))
        )
        .await,
        Err("insufficient_scope".into())
    );
    assert_eq!(
        check(&client, "/ai/v2/code/completions", None).await,
        Err("missing_token".into())
    );

    // A client speaking plain HTTP/2 (h2c) gets no answer, only a failed handshake.
    let plain = AuthorizationClient::new(
        Endpoint::from_shared(format!("http://{}", running.grpc_addr))
            .expect("endpoint")
            .timeout(Duration::from_secs(5))
            .connect_lazy(),
    );
    assert!(try_check(&plain, "/ai/monitoring/x", None).await.is_err());
    // A client that trusts another CA refuses the server's certificate.
    let other = TestCa::new("another CA");
    assert!(
        served_certificate(running.grpc_addr, client_tls(&[&other], None, b"h2"))
            .await
            .is_err()
    );
    // Neither disturbed the connection already open.
    assert_eq!(check(&client, "/ai/monitoring/x", None).await, Ok(()));
    let failures = r#"connector_authz_tls_handshake_failures_total{listener="grpc"}"#;
    let admin = running.admin_addr;
    assert!(
        within(WAIT, async || metric(admin, None, failures).await >= 2.0).await,
        "failed handshakes counted: {}",
        metric(admin, None, failures).await
    );
    running.shutdown().await;
}

#[tokio::test]
async fn with_a_client_ca_clients_must_present_a_certificate_from_it() {
    let files = Files::new();
    let server_ca = TestCa::new("server CA");
    let client_ca = TestCa::new("client CA");
    files.write_server(&server_ca.server("connector-authz"));
    files.write("clients.crt", &client_ca.pem());
    let running = start(&files.config("    client_ca_file: clients.crt\n", "")).await;
    let addr = running.grpc_addr;

    let envoy = client_ca.client("envoy");
    let good = grpc_client(addr, client_tls(&[&server_ca], Some(&envoy), b"h2"));
    assert_eq!(
        check(&good, "/ai/v2/code/x", Some(&token(&["code_suggestions"]))).await,
        Ok(())
    );
    assert_eq!(
        check(&good, "/ai/v2/code/x", Some(&token(&[]))).await,
        Err("insufficient_scope".into())
    );

    // No certificate: the handshake is refused and the RPC fails.
    let anonymous = grpc_client(addr, client_tls(&[&server_ca], None, b"h2"));
    let refused = try_check(&anonymous, "/ai/monitoring/x", None).await;
    assert!(
        refused.is_err(),
        "a client without a certificate was answered: {refused:?}"
    );
    assert!(
        served_certificate(addr, client_tls(&[&server_ca], None, b"h2"))
            .await
            .is_err()
    );
    // A certificate from a CA that client_ca_file does not hold: refused too.
    let stranger = TestCa::new("stranger CA").client("stranger");
    assert!(
        served_certificate(addr, client_tls(&[&server_ca], Some(&stranger), b"h2"))
            .await
            .is_err()
    );
    // The good client's connection carried on through all of it.
    assert_eq!(check(&good, "/ai/monitoring/x", None).await, Ok(()));
    let failures = r#"connector_authz_tls_handshake_failures_total{listener="grpc"}"#;
    let admin = running.admin_addr;
    assert!(
        within(WAIT, async || metric(admin, None, failures).await >= 3.0).await,
        "refused handshakes counted: {}",
        metric(admin, None, failures).await
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_certificate_rewritten_in_place_is_served_to_new_connections_without_a_restart() {
    let files = Files::new();
    let ca = TestCa::new("test CA");
    let first = ca.server("first");
    files.write_server(&first);
    let mut running = start(&files.config("", "")).await;
    running.watch_tls(Duration::from_millis(50));
    let addr = running.grpc_addr;
    let trust = || client_tls(&[&ca], None, b"h2");

    assert_eq!(
        served_certificate(addr, trust()).await.ok(),
        Some(der(&first))
    );
    let open = grpc_client(addr, trust());
    assert_eq!(check(&open, "/ai/monitoring/x", None).await, Ok(()));

    let second = ca.server("second");
    files.write_server(&second);
    assert!(
        within(WAIT, async || served_certificate(addr, trust()).await.ok()
            == Some(der(&second)))
        .await,
        "new connections were not served the rewritten certificate"
    );
    // The connection opened before the rotation still answers.
    assert_eq!(check(&open, "/ai/monitoring/x", None).await, Ok(()));
    let reloads = metric(
        running.admin_addr,
        None,
        r#"connector_authz_tls_reloads_total{listener="grpc",result="success"}"#,
    )
    .await;
    assert!(reloads >= 1.0, "reloads counted: {reloads}");
    running.shutdown().await;
}

#[tokio::test]
async fn a_bad_rotation_keeps_the_previous_certificate_until_the_files_are_fixed() {
    let files = Files::new();
    let ca = TestCa::new("test CA");
    let first = ca.server("first");
    files.write_server(&first);
    let mut running = start(&files.config("", "")).await;
    running.watch_tls(Duration::from_millis(50));
    let (addr, admin) = (running.grpc_addr, running.admin_addr);
    let trust = || client_tls(&[&ca], None, b"h2");
    let errors = r#"connector_authz_tls_reloads_total{listener="grpc",result="error"}"#;

    // A new certificate with a key that is not its own.
    let second = ca.server("second");
    files.write("tls.crt", &second.cert);
    assert!(
        within(WAIT, async || metric(admin, None, errors).await >= 1.0).await,
        "the mismatched key was not reported"
    );
    assert_eq!(
        served_certificate(addr, trust()).await.ok(),
        Some(der(&first))
    );

    // A key file that is not PEM; and a configuration reload while it is so.
    files.write("tls.key", "not a key\n");
    assert!(within(WAIT, async || metric(admin, None, errors).await >= 2.0).await);
    running
        .reload()
        .await
        .expect("the configuration itself is fine");
    assert!(metric(admin, None, errors).await >= 3.0);
    assert_eq!(
        served_certificate(addr, trust()).await.ok(),
        Some(der(&first))
    );

    // Fixed: the new certificate is served.
    files.write("tls.key", &second.key);
    assert!(
        within(WAIT, async || served_certificate(addr, trust()).await.ok()
            == Some(der(&second)))
        .await,
        "the fixed files were not picked up"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_configuration_reload_rereads_the_certificate_files() {
    let files = Files::new();
    let ca = TestCa::new("test CA");
    let first = ca.server("first");
    files.write_server(&first);
    // No watcher: only the reload reads the files again.
    let running = start(&files.config("", "")).await;
    let addr = running.grpc_addr;
    let trust = || client_tls(&[&ca], None, b"h2");
    let second = ca.server("second");
    files.write("second.crt", &second.cert);
    files.write("second.key", &second.key);
    let config = files.config("", "");
    let text = std::fs::read_to_string(&config)
        .expect("read config")
        .replace("tls.crt", "second.crt")
        .replace("tls.key", "second.key");
    std::fs::write(&config, text).expect("write config");
    assert_eq!(
        served_certificate(addr, trust()).await.ok(),
        Some(der(&first))
    );
    running.reload().await.expect("reload");
    assert_eq!(
        served_certificate(addr, trust()).await.ok(),
        Some(der(&second))
    );
    running.shutdown().await;
}

#[tokio::test]
async fn the_admin_listener_serves_https_with_admin_tls() {
    let files = Files::new();
    let ca = TestCa::new("test CA");
    files.write_server(&ca.server("connector-authz"));
    let admin = ca.server("admin");
    files.write("admin.crt", &admin.cert);
    files.write("admin.key", &admin.key);
    let running = start(&files.config(
        "",
        "  admin_tls:\n    cert_file: admin.crt\n    key_file: admin.key\n",
    ))
    .await;
    let trust = || client_tls(&[&ca], None, b"http/1.1");
    let (status, body) = admin_get(running.admin_addr, trust(), "/readyz")
        .await
        .expect("GET /readyz over TLS");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        served_certificate_http1(running.admin_addr, trust()).await,
        der(&admin)
    );
    // Plain HTTP is not answered.
    let plain = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
        .get(format!("http://{}/readyz", running.admin_addr))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    let failures = r#"connector_authz_tls_handshake_failures_total{listener="admin"}"#;
    let admin = running.admin_addr;
    assert!(
        within(WAIT, async || metric(admin, Some(trust()), failures).await
            >= 1.0)
        .await,
        "the plain HTTP request was not counted as a failed handshake"
    );
    running.shutdown().await;
}

async fn served_certificate_http1(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> CertificateDer<'static> {
    let tls = tls_connect(addr, config)
        .await
        .expect("TLS to the admin listener");
    tls.get_ref().1.peer_certificates().expect("a certificate")[0]
        .clone()
        .into_owned()
}

/// `serve` does not start with an unusable certificate, and `check-config` says why with
/// the line of the key that names the file.
#[tokio::test]
async fn unusable_tls_files_are_refused_at_start_and_by_check_config() {
    let files = Files::new();
    let ca = TestCa::new("test CA");
    let server = ca.server("connector-authz");
    let other = ca.server("other");
    let config = files.config("    client_ca_file: clients.crt\n", "");
    files.write("clients.crt", &ca.pem());

    let cases: [(&str, &dyn Fn(), &str, u32); 6] = [
        ("missing", &|| {}, "listen.tls.cert_file tls.crt", 5),
        (
            "not PEM",
            &|| {
                files.write("tls.crt", "hello\n");
                files.write("tls.key", &server.key);
            },
            "holds no certificate",
            5,
        ),
        (
            "key of another certificate",
            &|| {
                files.write("tls.crt", &server.cert);
                files.write("tls.key", &other.key);
            },
            "is not the private key of the certificate",
            6,
        ),
        (
            "no key",
            &|| files.write("tls.key", &server.cert),
            "holds no private key",
            6,
        ),
        (
            "CA file without certificates",
            &|| {
                files.write("tls.key", &server.key);
                files.write("clients.crt", &server.key);
            },
            "listen.tls.client_ca_file",
            7,
        ),
        ("good", &|| files.write("clients.crt", &ca.pem()), "", 0),
    ];
    let _ = std::fs::remove_file(files.path("tls.crt"));
    let _ = std::fs::remove_file(files.path("tls.key"));
    for (case, prepare, expected, line) in cases {
        prepare();
        let out = Command::new(AUTHZ_BIN)
            .arg("check-config")
            .arg("--config")
            .arg(&config)
            .output()
            .expect("run check-config");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let started = serve::start(Config::load(&config).expect("config loads")).await;
        if expected.is_empty() {
            assert!(out.status.success(), "{case}: {stderr}");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                stdout.contains("listen.tls: certificate tls.crt"),
                "{case}: {stdout}"
            );
            started.expect("starts with good files").shutdown().await;
            continue;
        }
        assert_eq!(out.status.code(), Some(2), "{case}: {stderr}");
        assert!(stderr.contains(expected), "{case}: {stderr}");
        assert!(
            stderr.contains(&format!("connector-authz.yaml:{line})")),
            "{case}: wrong line: {stderr}"
        );
        let error = started.err().expect("serve refuses to start").to_string();
        assert!(error.contains(expected), "{case}: {error}");
    }
}

// ---------------------------------------------------------------------------------------
// A real Envoy with envoy/front-proxy-tls.yaml

/// connector-authz (the binary, TLS on gRPC, mTLS when `mtls`) behind Envoy with
/// envoy/front-proxy-tls.yaml; checks an allow and two denies through it.
async fn envoy_calls_connector_authz_over_tls(mtls: bool) {
    let envoy_bin = envoy();
    let files = Files::new();
    let server_ca = TestCa::new("server CA");
    let client_ca = TestCa::new("client CA");
    files.write_server(&server_ca.server("connector-authz"));
    files.write("server-ca.crt", &server_ca.pem());
    files.write("clients.crt", &client_ca.pem());
    let envoy_cert = client_ca.client("envoy");
    files.write("envoy.crt", &envoy_cert.cert);
    files.write("envoy.key", &envoy_cert.key);
    let (grpc, admin) = (free_port(), free_port());
    let extra = if mtls {
        "    client_ca_file: clients.crt\n"
    } else {
        ""
    };
    let config = files.config(extra, "");
    let text = std::fs::read_to_string(&config)
        .expect("read config")
        .replace("grpc: 127.0.0.1:0", &format!("grpc: 127.0.0.1:{grpc}"))
        .replace("admin: 127.0.0.1:0", &format!("admin: 127.0.0.1:{admin}"));
    std::fs::write(&config, text).expect("write config");

    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let mut authz = Proc::spawn(
        "connector-authz",
        Command::new(AUTHZ_BIN)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("CONNECTOR_AUTHZ_LOG", "info,connector_authz=debug"),
        files.path("connector-authz.log"),
    );
    authz
        .wait_ready(&client, &format!("http://127.0.0.1:{admin}/readyz"), WAIT)
        .await;

    let (backend, _echo) = echo().await;
    let (listen, envoy_admin) = (free_port(), free_port());
    let path = |name: &str| files.path(name).display().to_string();
    let rendered = render(
        "envoy/front-proxy-tls.yaml",
        &[
            ("LISTEN_PORT", listen.to_string()),
            ("ADMIN_PORT", envoy_admin.to_string()),
            ("AUTHZ_PORT", grpc.to_string()),
            ("BACKEND_PORT", backend.to_string()),
            ("AUTHZ_TLS_NAME", SERVER_NAME.to_owned()),
            ("CA_FILE", path("server-ca.crt")),
            ("CLIENT_CERT_FILE", path("envoy.crt")),
            ("CLIENT_KEY_FILE", path("envoy.key")),
        ],
    );
    let envoy_config = files.path("envoy.yaml");
    std::fs::write(&envoy_config, rendered).expect("write envoy config");

    let validated = Command::new(&envoy_bin)
        .args(["--mode", "validate", "-c"])
        .arg(&envoy_config)
        .output()
        .expect("run envoy --mode validate");
    assert!(
        validated.status.success(),
        "envoy --mode validate envoy/front-proxy-tls.yaml:\n{}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );

    let mut envoy = Proc::spawn(
        "envoy",
        Command::new(&envoy_bin)
            .arg("-c")
            .arg(&envoy_config)
            .args(["--concurrency", "1", "--disable-hot-restart"])
            .args(["--log-level", "warn"]),
        files.path("envoy.log"),
    );
    envoy
        .wait_ready(
            &client,
            &format!("http://127.0.0.1:{envoy_admin}/ready"),
            WAIT,
        )
        .await;

    let logs = || {
        format!(
            "--- envoy:\n{}\n--- connector-authz:\n{}",
            envoy.tail(),
            authz.tail()
        )
    };
    let get = async |path: &str, token: Option<&str>| {
        let mut request = client.get(format!("http://127.0.0.1:{listen}{path}"));
        for (name, value) in INSTANCE_HEADERS {
            request = request.header(name, value);
        }
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let reply = request.send().await.expect("request through Envoy");
        let status = reply.status().as_u16();
        (status, reply.text().await.unwrap_or_default())
    };

    let (status, body) = get(
        "/ai/v2/code/completions",
        Some(&token(&["code_suggestions"])),
    )
    .await;
    assert_eq!(status, 200, "allow through Envoy: {body}\n{}", logs());
    let echoed: Value = serde_json::from_str(&body).expect("the echo's JSON");
    assert_eq!(
        echoed["headers"]["x-gitlab-authz-subject"], "test-instance-id",
        "{body}"
    );
    let (status, body) = get("/ai/v2/code/completions", Some(&token(&["duo_chat"]))).await;
    assert_eq!(status, 403, "{body}\n{}", logs());
    assert!(body.contains("insufficient_scope"), "{body}");
    let (status, body) = get("/ai/v2/code/completions", None).await;
    assert_eq!(status, 401, "{body}\n{}", logs());
    assert!(body.contains("missing_token"), "{body}");
    // Envoy's connections to connector-authz were TLS (and, with mTLS, carried its
    // certificate): its cluster counts the handshakes.
    let stats = client
        .get(format!(
            "http://127.0.0.1:{envoy_admin}/stats?filter=connector_authz.ssl"
        ))
        .send()
        .await
        .expect("Envoy stats")
        .text()
        .await
        .expect("stats body");
    let handshakes = stats
        .lines()
        .find_map(|l| l.strip_prefix("cluster.connector_authz.ssl.handshake: "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        handshakes >= 1,
        "no TLS handshake to connector-authz:\n{stats}"
    );
}

#[tokio::test]
#[ignore = "needs Envoy: run scripts/install-test-deps.sh (scripts/test.sh runs it)"]
async fn envoy_ext_authz_cluster_over_tls() {
    envoy_calls_connector_authz_over_tls(false).await;
}

#[tokio::test]
#[ignore = "needs Envoy: run scripts/install-test-deps.sh (scripts/test.sh runs it)"]
async fn envoy_ext_authz_cluster_over_mtls_with_a_client_certificate() {
    envoy_calls_connector_authz_over_tls(true).await;
}
