//! The key lifecycle end to end: the real sidecar (`serve::start`) against a fake OIDC
//! issuer on loopback, asked over gRPC and the admin port. Paused-time tests of the
//! schedule, backoff and single flight live next to the code in `src/keys/refresh`;
//! these use real time, each wait bounded to a few seconds.

mod support;

use std::path::Path;
use std::time::Duration;

use connector_authz::config::Config;
use connector_authz::dev::DevKey;
use connector_authz::proto::envoy::service::auth::v3::{
    authorization_client::AuthorizationClient, check_response,
};
use connector_authz::serve::{self, Running};
use serde_json::{Value, json};
use support::{
    FakeIssuer, Mode, check_request, claims, finished_key_sets, instance_headers, now, test_key,
    within,
};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

struct Sidecar {
    running: Running,
    client: AuthorizationClient<Channel>,
}

impl Sidecar {
    async fn start(issuer: &FakeIssuer, cache_dir: &Path) -> Sidecar {
        Self::start_with_fetch_timeout(issuer, cache_dir, "1s").await
    }

    async fn start_with_fetch_timeout(
        issuer: &FakeIssuer,
        cache_dir: &Path,
        fetch_timeout: &str,
    ) -> Sidecar {
        let yaml = format!(
            "listen: {{grpc: 127.0.0.1:0, admin: 127.0.0.1:0}}
issuers:
  - url: {issuer}
keys:
  refresh_interval: 1h
  min_refresh_interval: 1s
  fetch_timeout: {fetch_timeout}
  cache_dir: {cache}
backends:
  - name: svc
    audience: svc
    routes: [{{prefix: /, require: []}}]
",
            issuer = issuer.url(),
            cache = cache_dir.display(),
        );
        let config = Config::from_yaml(&yaml, Path::new("key_lifecycle.yaml")).expect("config");
        let running = serve::start(config).await.expect("server starts");
        let client = AuthorizationClient::connect(format!("http://{}", running.grpc_addr))
            .await
            .expect("client connects");
        Sidecar { running, client }
    }

    /// `Ok` when allowed, else the deny reason from the response body.
    async fn check(&self, token: &str) -> Result<(), String> {
        let request = check_request("GET", "/anything", instance_headers(token));
        let response = self
            .client
            .clone()
            .check(request)
            .await
            .expect("Check is a successful RPC")
            .into_inner();
        match response.http_response {
            Some(check_response::HttpResponse::OkResponse(_)) => Ok(()),
            Some(check_response::HttpResponse::DeniedResponse(denied)) => {
                let body: Value = serde_json::from_str(&denied.body).expect("JSON body");
                Err(body["error"].as_str().unwrap_or_default().to_owned())
            }
            None => panic!("a Check response without an HTTP response"),
        }
    }

    /// `/readyz`: the status and the issuers without keys.
    async fn readyz(&self) -> (u16, Value) {
        let url = format!("http://{}/readyz", self.running.admin_addr);
        let response = reqwest::get(url).await.expect("admin answers");
        let status = response.status().as_u16();
        let body: Value =
            serde_json::from_slice(&response.bytes().await.expect("body")).expect("JSON body");
        (status, body["issuers_without_keys"].clone())
    }

    async fn health(&self) -> ServingStatus {
        let channel = Channel::from_shared(format!("http://{}", self.running.grpc_addr))
            .expect("uri")
            .connect()
            .await
            .expect("connects");
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: "envoy.service.auth.v3.Authorization".into(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status;
        ServingStatus::try_from(status).expect("known status")
    }
}

fn token(issuer: &FakeIssuer, key: &DevKey) -> String {
    key.sign(&claims(&issuer.url(), "svc", &[], now() + 3600))
}

#[tokio::test]
async fn a_rotated_key_works_on_first_use_with_one_fetch_for_many_requests() {
    let (k1, k2) = (test_key(1), test_key(2));
    let issuer = FakeIssuer::start(&[&k1]).await;
    let cache = tempfile::tempdir().expect("temp dir");
    let sidecar = Sidecar::start(&issuer, cache.path()).await;
    assert_eq!(sidecar.check(&token(&issuer, &k1)).await, Ok(()));

    issuer.set_keys(&[&k1, &k2]);
    // No wait: only unknown-kid refreshes count against min_refresh_interval, so the
    // start-up fetch (finished before `serve::start` returned) leaves the refresh free.
    let before = issuer.jwks_fetch_count();
    let new_token = token(&issuer, &k2);
    let answers = futures_util::future::join_all((0..50).map(|_| sidecar.check(&new_token))).await;
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    assert_eq!(issuer.jwks_fetch_count(), before + 1);
    sidecar.running.shutdown().await;
}

#[tokio::test]
async fn a_restart_while_the_issuer_hangs_is_ready_at_once_from_the_cache() {
    let k = test_key(1);
    let issuer = FakeIssuer::start(&[&k]).await;
    let cache = tempfile::tempdir().expect("temp dir");
    let first = Sidecar::start(&issuer, cache.path()).await;
    let cached = within(Duration::from_secs(5), async || {
        finished_key_sets(cache.path()) > 0
    })
    .await;
    assert!(cached, "the first sidecar wrote no cache file");
    first.running.shutdown().await;

    issuer.set_mode(Mode::Hang);
    // With the longest fetch timeout, a start that waited for the issuer would take a
    // minute; one that reads the cache is ready while the issuer still has not answered.
    let second = tokio::time::timeout(
        Duration::from_secs(30),
        Sidecar::start_with_fetch_timeout(&issuer, cache.path(), "60s"),
    )
    .await
    .expect("the restart waited for the hanging issuer instead of reading the cache");
    assert_eq!(second.readyz().await, (200, json!([])));
    assert_eq!(second.health().await, ServingStatus::Serving);
    assert_eq!(second.check(&token(&issuer, &k)).await, Ok(()));
    let metrics = reqwest::get(format!("http://{}/metrics", second.running.admin_addr))
        .await
        .expect("admin answers")
        .text()
        .await
        .expect("metrics body");
    let succeeded = format!(
        "connector_authz_keys_refresh_total{{issuer=\"{}\",result=\"success\"}} 0",
        issuer.url()
    );
    assert!(
        metrics.lines().any(|line| line == succeeded),
        "the keys came from a fetch, not the cache:\n{metrics}"
    );
    second.running.shutdown().await;
}

#[tokio::test]
async fn with_the_issuer_down_and_no_cache_it_is_not_ready_until_the_issuer_is_back() {
    let k = test_key(1);
    let issuer = FakeIssuer::start(&[&k]).await;
    issuer.set_mode(Mode::Down(503));
    let cache = tempfile::tempdir().expect("temp dir");
    let sidecar = Sidecar::start(&issuer, cache.path()).await;

    assert_eq!(sidecar.readyz().await, (503, json!([issuer.url()])));
    assert_eq!(sidecar.health().await, ServingStatus::NotServing);
    assert_eq!(
        sidecar.check(&token(&issuer, &k)).await,
        Err("keys_unavailable".to_owned())
    );

    issuer.set_mode(Mode::Up);
    // The first retries come after about 1 s and 2 s.
    let ready = within(Duration::from_secs(5), async || {
        sidecar.readyz().await.0 == 200
    })
    .await;
    assert!(ready, "not ready after the issuer came back");
    assert_eq!(sidecar.health().await, ServingStatus::Serving);
    assert_eq!(sidecar.check(&token(&issuer, &k)).await, Ok(()));
    sidecar.running.shutdown().await;
}
