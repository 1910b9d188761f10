//! fetch_key_set against a real HTTP server on loopback: discovery, the issuer check,
//! and every way an issuer can fail us.

mod support;

use std::time::Duration;

use connector_authz::keys::KeySource;
use connector_authz::keys::fetch::{
    FetchError, HttpFetcher, IssuerSource, check_url, fetch_key_set,
};
use connector_authz::keys::jwks::{JwksError, KeyLimits, ParsedKeySet};
use serde_json::json;
use support::{FakeIssuer, Mode, small_rsa_jwk, test_key};

fn fetcher(timeout: Duration) -> HttpFetcher {
    HttpFetcher::new(timeout, KeyLimits::default().max_document_bytes).expect("client builds")
}

fn discovery(issuer: &FakeIssuer) -> IssuerSource {
    IssuerSource::Discovery {
        issuer_url: issuer.url(),
    }
}

async fn fetch(issuer: &FakeIssuer) -> Result<ParsedKeySet, FetchError> {
    fetch_key_set(
        &fetcher(Duration::from_secs(5)),
        &discovery(issuer),
        &KeyLimits::default(),
    )
    .await
}

#[tokio::test]
async fn discovery_then_jwks() {
    let (k1, k2) = (test_key(1), test_key(2));
    let issuer = FakeIssuer::start(&[&k1, &k2]).await;
    let parsed = fetch(&issuer).await.expect("keys");
    assert_eq!(parsed.key_set.keys.len(), 2);
    assert_eq!(parsed.key_set.source, KeySource::Network);
    assert!(parsed.key_set.by_kid("test-key-2").is_some());
    assert!(parsed.warnings.is_empty());
    assert_eq!(
        (issuer.discovery_fetch_count(), issuer.jwks_fetch_count()),
        (1, 1)
    );

    // Rotation: the next fetch sees the new set.
    let k3 = test_key(3);
    issuer.set_keys(&[&k3]);
    let parsed = fetch(&issuer).await.expect("keys");
    assert!(parsed.key_set.by_kid("test-key-1").is_none());
    assert!(parsed.key_set.by_kid("test-key-3").is_some());
}

#[tokio::test]
async fn jwks_uri_skips_discovery() {
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    let source = IssuerSource::JwksUri {
        issuer_url: issuer.url(),
        jwks_uri: issuer.jwks_url(),
    };
    fetch_key_set(
        &fetcher(Duration::from_secs(5)),
        &source,
        &KeyLimits::default(),
    )
    .await
    .expect("keys");
    assert_eq!(
        (issuer.discovery_fetch_count(), issuer.jwks_fetch_count()),
        (0, 1)
    );
}

#[tokio::test]
async fn trailing_slash_on_either_side_is_the_same_issuer() {
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    // CustomersDot style: the discovery document says `…/`, the config does not.
    issuer.set_discovery_issuer(Some(format!("{}/", issuer.url())));
    fetch(&issuer).await.expect("document with trailing slash");
    // And the other way round, which must not ask for `//.well-known/…`.
    issuer.set_discovery_issuer(None);
    let source = IssuerSource::Discovery {
        issuer_url: format!("{}/", issuer.url()),
    };
    fetch_key_set(
        &fetcher(Duration::from_secs(5)),
        &source,
        &KeyLimits::default(),
    )
    .await
    .expect("config with trailing slash");
    assert_eq!(issuer.discovery_fetch_count(), 2);
}

#[tokio::test]
async fn wrong_issuer_is_rejected_before_fetching_keys() {
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    issuer.set_discovery_issuer(Some("https://evil.test".into()));
    let err = fetch(&issuer).await.expect_err("mismatch");
    assert!(matches!(err, FetchError::IssuerMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("says issuer \"https://evil.test\", config says \"http://127.0.0.1:"),
        "{text}"
    );
    assert_eq!(issuer.jwks_fetch_count(), 0);
}

#[tokio::test]
async fn http_status_is_an_error_naming_the_url() {
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    issuer.set_mode(Mode::Down(503));
    let err = fetch(&issuer).await.expect_err("503");
    assert!(
        matches!(err, FetchError::Status { status: 503, .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("/.well-known/openid-configuration answered HTTP 503"),
        "{err}"
    );
}

#[tokio::test]
async fn hanging_issuer_times_out() {
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    issuer.set_mode(Mode::Hang);
    let source = discovery(&issuer);
    let (client, limits) = (fetcher(Duration::from_millis(300)), KeyLimits::default());
    let fetch = fetch_key_set(&client, &source, &limits);
    // The outer bound only keeps a broken client from hanging the test: the fetch must
    // end by its own timeout, and say so.
    let err = tokio::time::timeout(Duration::from_secs(60), fetch)
        .await
        .expect("the fetch hung: the client's timeout did not end it")
        .expect_err("timeout");
    assert!(matches!(err, FetchError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("timed out after 300ms"), "{err}");
}

#[tokio::test]
async fn garbage_is_an_error() {
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    issuer.set_mode(Mode::Garbage);
    let err = fetch(&issuer).await.expect_err("garbage discovery");
    assert!(
        err.to_string()
            .contains("is unusable: it is not valid JSON"),
        "{err}"
    );

    let source = IssuerSource::JwksUri {
        issuer_url: issuer.url(),
        jwks_uri: issuer.jwks_url(),
    };
    let err = fetch_key_set(
        &fetcher(Duration::from_secs(5)),
        &source,
        &KeyLimits::default(),
    )
    .await
    .expect_err("garbage key set");
    assert!(
        matches!(
            err,
            FetchError::KeySet {
                source: JwksError::NotJson(_),
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn oversized_body_is_cut_off_while_streaming() {
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    issuer.set_mode(Mode::Oversized);
    // The body never ends: only a cap enforced while reading returns before the timeout.
    let err = fetch(&issuer).await.expect_err("oversized");
    assert!(
        matches!(err, FetchError::TooLarge { limit: 65536, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn empty_key_set_is_an_error() {
    let issuer = FakeIssuer::start_with_jwks(json!({"keys": []})).await;
    let err = fetch(&issuer).await.expect_err("empty");
    assert!(
        matches!(
            err,
            FetchError::KeySet {
                source: JwksError::NoUsableKeys { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("/oauth/discovery/keys: key set has no usable signing key"),
        "{err}"
    );
}

#[tokio::test]
async fn small_and_encryption_keys_are_skipped_with_warnings() {
    let mut encryption = test_key(2).public_jwk();
    encryption["use"] = json!("enc");
    let jwks = json!({"keys": [small_rsa_jwk(), encryption, test_key(1).public_jwk()]});
    let issuer = FakeIssuer::start_with_jwks(jwks).await;
    let parsed = fetch(&issuer).await.expect("one good key");
    assert_eq!(parsed.key_set.keys.len(), 1);
    assert_eq!(parsed.key_set.keys[0].kid.as_deref(), Some("test-key-1"));
    assert_eq!(parsed.warnings.len(), 2, "{:?}", parsed.warnings);
    assert!(
        parsed.warnings[0].contains("RSA modulus has 1024 bits"),
        "{:?}",
        parsed.warnings
    );
    assert!(
        parsed.warnings[1].contains("\"use\" is \"enc\""),
        "{:?}",
        parsed.warnings
    );
    assert_eq!(
        parsed.accepted_jwks["keys"].as_array().map(Vec::len),
        Some(1)
    );
}

#[tokio::test]
async fn plain_http_outside_loopback_is_refused() {
    let err = check_url("http://gitlab.com/oauth/discovery/keys").expect_err("not loopback");
    assert!(err.contains("only for loopback hosts"), "{err}");
    assert_eq!(check_url("https://gitlab.com/oauth/discovery/keys"), Ok(()));

    // A discovery document may not send us there either.
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    issuer.set_jwks_uri(Some("http://gitlab.com/oauth/discovery/keys".into()));
    let err = fetch(&issuer).await.expect_err("http jwks_uri");
    assert!(
        err.to_string()
            .contains("plain http:// is allowed only for loopback hosts"),
        "{err}"
    );
    assert_eq!(issuer.jwks_fetch_count(), 0);
}

#[tokio::test]
async fn redirects_must_keep_to_allowed_urls() {
    let issuer = FakeIssuer::start(&[&test_key(1)]).await;
    issuer.set_mode(Mode::Redirect("http://gitlab.com/oauth/discovery/keys"));
    let err = fetch(&issuer).await.expect_err("downgrade");
    assert!(
        err.to_string()
            .contains("redirect to http://gitlab.com/oauth/discovery/keys refused"),
        "{err}"
    );
}

#[tokio::test]
async fn unreachable_issuer_says_so() {
    // Bind and drop to get a loopback port that nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let source = IssuerSource::Discovery {
        issuer_url: format!("http://127.0.0.1:{port}"),
    };
    let err = fetch_key_set(
        &fetcher(Duration::from_secs(5)),
        &source,
        &KeyLimits::default(),
    )
    .await
    .expect_err("refused");
    assert!(matches!(err, FetchError::Connect { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!(
            "GET http://127.0.0.1:{port}/.well-known/openid-configuration failed to connect"
        )),
        "{err}"
    );
}
