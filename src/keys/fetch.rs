//! Getting an issuer's key set: OIDC discovery, the JWKS fetch, and key files.
//!
//! The network sits behind the small [`Fetcher`] seam so that refresh logic can be tested
//! with a fake, and [`HttpFetcher`] is the one real implementation. This module decides
//! which URLs may be fetched ([`check_url`]) and turns every failure into a sentence an
//! operator can act on; it does not schedule, retry or cache: that is the refresher's job.

use std::fmt;
use std::future::Future;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use super::jwks::{JwksError, KeyLimits, ParsedKeySet, parse_key_set};
use super::{KeySource, canonical_issuer};
pub use connector_authz_core::fetch_url::check_url;

/// The future a [`Fetcher`] returns.
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<Bytes, FetchError>> + Send + 'a>>;

/// One HTTP GET, as small as the refresher needs. Implementations enforce their own
/// timeout and size cap and report non-2xx answers as errors.
pub trait Fetcher: Send + Sync {
    fn get(&self, url: &str) -> FetchFuture<'_>;
}

/// Where an issuer's keys come from on the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IssuerSource {
    /// `{issuer_url}/.well-known/openid-configuration` names the `jwks_uri`.
    Discovery { issuer_url: String },
    /// The configuration names the `jwks_uri`; discovery is skipped.
    JwksUri {
        issuer_url: String,
        jwks_uri: String,
    },
}

/// Why an issuer's keys could not be obtained. Each message names the URL or file.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("refusing to fetch {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(
        "GET {url} timed out after {}; check that the issuer is reachable from here, \
         or raise keys.fetch_timeout",
        humantime::format_duration(*.timeout)
    )]
    Timeout { url: String, timeout: Duration },
    #[error("GET {url} failed to connect: {detail}; check DNS, firewall and proxy settings")]
    Connect { url: String, detail: String },
    #[error("GET {url} failed: {detail}")]
    Transport { url: String, detail: String },
    #[error("GET {url} answered HTTP {status}; expected 200")]
    Status { url: String, status: u16 },
    #[error(
        "GET {url} returned more than {limit} bytes; that is not a key set or discovery document"
    )]
    TooLarge { url: String, limit: usize },
    #[error("the discovery document at {url} is unusable: {detail}")]
    Discovery { url: String, detail: String },
    #[error(
        "the discovery document at {url} says issuer {discovered:?}, config says {configured:?}; \
         set the issuer's url to the one its tokens carry"
    )]
    IssuerMismatch {
        url: String,
        discovered: String,
        configured: String,
    },
    #[error("{location}: {source}")]
    KeySet {
        location: String,
        #[source]
        source: JwksError,
    },
    #[error("could not set up the HTTP client for key fetches: {0}")]
    ClientSetup(String),
    #[error("could not read key file {}: {source}", .path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The discovery URL for an issuer; an issuer URL with a trailing slash does not get two.
pub(crate) fn discovery_url(issuer_url: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        canonical_issuer(issuer_url)
    )
}

/// Fetches and parses one issuer's key set: discovery first when configured, then the
/// JWKS. Every URL is checked with [`check_url`] before it is fetched.
pub async fn fetch_key_set(
    fetcher: &dyn Fetcher,
    issuer: &IssuerSource,
    limits: &KeyLimits,
) -> Result<ParsedKeySet, FetchError> {
    let jwks_uri = match issuer {
        IssuerSource::JwksUri { jwks_uri, .. } => jwks_uri.clone(),
        IssuerSource::Discovery { issuer_url } => discover_jwks_uri(fetcher, issuer_url).await?,
    };
    checked(&jwks_uri)?;
    let body = fetcher.get(&jwks_uri).await?;
    parse_key_set(&body, KeySource::Network, SystemTime::now(), limits).map_err(|source| {
        FetchError::KeySet {
            location: jwks_uri,
            source,
        }
    })
}

fn checked(url: &str) -> Result<(), FetchError> {
    check_url(url).map_err(|reason| FetchError::BadUrl {
        url: url.to_owned(),
        reason,
    })
}

async fn discover_jwks_uri(fetcher: &dyn Fetcher, issuer_url: &str) -> Result<String, FetchError> {
    let url = discovery_url(issuer_url);
    checked(&url)?;
    let body = fetcher.get(&url).await?;
    let unusable = |detail: String| FetchError::Discovery {
        url: url.clone(),
        detail,
    };

    let document: Value = serde_json::from_slice(&body)
        .map_err(|e| unusable(format!("it is not valid JSON ({e})")))?;
    let discovered = document
        .get("issuer")
        .and_then(Value::as_str)
        .ok_or_else(|| unusable("it has no \"issuer\" string".into()))?;
    // OIDC Discovery 1.0 §4.3 wants an exact match; we allow one trailing slash because
    // CustomersDot publishes `https://customers.gitlab.com/` but signs without the slash.
    if canonical_issuer(discovered) != canonical_issuer(issuer_url) {
        return Err(FetchError::IssuerMismatch {
            url: url.clone(),
            discovered: discovered.to_owned(),
            configured: issuer_url.to_owned(),
        });
    }
    let jwks_uri = document
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or_else(|| unusable("it has no \"jwks_uri\" string".into()))?;
    check_url(jwks_uri).map_err(|reason| unusable(format!("its jwks_uri {jwks_uri}: {reason}")))?;
    Ok(jwks_uri.to_owned())
}

/// Reads a `jwks_file` issuer's key set (source [`KeySource::File`]).
pub(crate) fn load_key_file(path: &Path, limits: &KeyLimits) -> Result<ParsedKeySet, FetchError> {
    read_key_file(path, KeySource::File, limits)
}

/// Reads a JWKS document from disk with the given source; the cache directory loader
/// uses it with [`KeySource::Cache`].
pub(crate) fn read_key_file(
    path: &Path,
    source: KeySource,
    limits: &KeyLimits,
) -> Result<ParsedKeySet, FetchError> {
    let read_error = |source| FetchError::ReadFile {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    // Read one byte past the limit so that an oversized file is reported as such
    // without reading all of it.
    let mut bytes = Vec::new();
    file.take(limits.max_document_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    let loaded_at = SystemTime::now();
    parse_key_set(&bytes, source, loaded_at, limits).map_err(|source| FetchError::KeySet {
        location: path.display().to_string(),
        source,
    })
}

/// The real [`Fetcher`]: reqwest over rustls, with a timeout for the whole exchange, a
/// size cap enforced while the body streams in, and redirects only to allowed URLs.
#[derive(Clone)]
pub struct HttpFetcher {
    client: reqwest::Client,
    timeout: Duration,
    max_body_bytes: usize,
}

impl fmt::Debug for HttpFetcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpFetcher")
            .field("timeout", &self.timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

/// Redirects an issuer may send us through before we give up.
const MAX_REDIRECTS: usize = 5;

impl HttpFetcher {
    /// `timeout` bounds each GET from connect to the last body byte (`keys.fetch_timeout`);
    /// `max_body_bytes` bounds each response body.
    pub fn new(timeout: Duration, max_body_bytes: usize) -> Result<Self, FetchError> {
        let redirects = reqwest::redirect::Policy::custom(|attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
            } else if let Err(reason) = check_url(attempt.url().as_str()) {
                // A redirect must not downgrade us to plain http or leave for a scheme we
                // would never have fetched directly.
                let target = attempt.url().to_string();
                attempt.error(format!("redirect to {target} refused: {reason}"))
            } else {
                attempt.follow()
            }
        });
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(redirects)
            .user_agent(concat!("connector-authz/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FetchError::ClientSetup(error_chain(&e)))?;
        Ok(Self {
            client,
            timeout,
            max_body_bytes,
        })
    }

    async fn get_checked(&self, url: &str) -> Result<Bytes, FetchError> {
        checked(url)?;
        let classify = |e: reqwest::Error| self.classify(url, e);
        let mut response = self.client.get(url).send().await.map_err(classify)?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status {
                url: url.to_owned(),
                status: status.as_u16(),
            });
        }
        let too_large = || FetchError::TooLarge {
            url: url.to_owned(),
            limit: self.max_body_bytes,
        };
        if response
            .content_length()
            .is_some_and(|len| len > self.max_body_bytes as u64)
        {
            return Err(too_large());
        }
        // Content-Length may be absent (chunked) or wrong, so count while reading and stop
        // at the cap instead of buffering whatever the server sends.
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > self.max_body_bytes {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    fn classify(&self, url: &str, error: reqwest::Error) -> FetchError {
        let url = url.to_owned();
        if error.is_timeout() {
            return FetchError::Timeout {
                url,
                timeout: self.timeout,
            };
        }
        let is_connect = error.is_connect();
        // After a redirect the failing URL is not the one we asked for; say which it was.
        let redirected = error
            .url()
            .map(|u| u.as_str().to_owned())
            .filter(|u| u.as_str() != url);
        // reqwest repeats the URL in its own message; we already name it.
        let mut detail = error_chain(&error.without_url());
        if let Some(target) = redirected {
            detail = format!("after a redirect to {target}: {detail}");
        }
        if is_connect {
            FetchError::Connect { url, detail }
        } else {
            FetchError::Transport { url, detail }
        }
    }
}

impl Fetcher for HttpFetcher {
    fn get(&self, url: &str) -> FetchFuture<'_> {
        let url = url.to_owned();
        Box::pin(async move { self.get_checked(&url).await })
    }
}

/// An error and its sources in one line, since the top-level message of a transport error
/// ("error sending request") rarely says what went wrong.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    #[test]
    fn url_policy() {
        for ok in [
            "https://gitlab.com/oauth/discovery/keys",
            "https://customers.gitlab.com/",
            "http://127.0.0.1:8080/keys",
            "http://127.1.2.3/keys",
            "http://[::1]:9000/keys",
            "http://localhost/keys",
            "http://LOCALHOST:1/",
        ] {
            assert_eq!(check_url(ok), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("http://gitlab.com/keys", "only for loopback hosts"),
            ("http://10.0.0.1/keys", "use https:// for 10.0.0.1"),
            ("http://localhost.evil.test/", "only for loopback"),
            ("http://[::ffff:8.8.8.8]/", "only for loopback"),
            ("ftp://gitlab.com/keys", "scheme \"ftp\""),
            ("file:///etc/passwd", "scheme \"file\""),
            ("gitlab.com/keys", "not a valid URL"),
            ("https://user:pw@gitlab.com/", "credentials"),
        ] {
            let err = check_url(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn discovery_url_ignores_one_trailing_slash() {
        assert_eq!(
            discovery_url("https://customers.gitlab.com/"),
            "https://customers.gitlab.com/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_url("https://gitlab.com"),
            "https://gitlab.com/.well-known/openid-configuration"
        );
    }

    /// Answers from a fixed table; records what was asked.
    #[derive(Default)]
    struct TableFetcher {
        answers: HashMap<String, Vec<u8>>,
        asked: Mutex<Vec<String>>,
    }

    impl Fetcher for TableFetcher {
        fn get(&self, url: &str) -> FetchFuture<'_> {
            self.asked
                .lock()
                .expect("not poisoned")
                .push(url.to_owned());
            let answer =
                self.answers
                    .get(url)
                    .cloned()
                    .map(Bytes::from)
                    .ok_or(FetchError::Status {
                        url: url.to_owned(),
                        status: 404,
                    });
            Box::pin(async move { answer })
        }
    }

    fn jwks() -> Vec<u8> {
        let key = crate::dev::DevKey::from_pkcs8_pem(
            include_str!("../../tests/fixtures/keys/test-rsa-2048-1.pem"),
            "k1",
        )
        .expect("fixture");
        serde_json::to_vec(&crate::dev::DevKey::key_set_json(&[&key])).expect("json")
    }

    #[tokio::test]
    async fn jwks_uri_source_skips_discovery() {
        let fetcher = TableFetcher {
            answers: HashMap::from([("https://issuer.test/keys".to_owned(), jwks())]),
            ..Default::default()
        };
        let source = IssuerSource::JwksUri {
            issuer_url: "https://issuer.test".into(),
            jwks_uri: "https://issuer.test/keys".into(),
        };
        let parsed = fetch_key_set(&fetcher, &source, &KeyLimits::default())
            .await
            .expect("keys");
        assert_eq!(parsed.key_set.source, KeySource::Network);
        assert_eq!(
            *fetcher.asked.lock().expect("lock"),
            ["https://issuer.test/keys"]
        );
    }

    #[tokio::test]
    async fn discovery_refuses_a_plain_http_jwks_uri() {
        let discovery = serde_json::json!({
            "issuer": "https://issuer.test",
            "jwks_uri": "http://issuer.test/keys",
        });
        let fetcher = TableFetcher {
            answers: HashMap::from([(
                "https://issuer.test/.well-known/openid-configuration".to_owned(),
                discovery.to_string().into_bytes(),
            )]),
            ..Default::default()
        };
        let source = IssuerSource::Discovery {
            issuer_url: "https://issuer.test".into(),
        };
        let err = fetch_key_set(&fetcher, &source, &KeyLimits::default())
            .await
            .expect_err("http");
        assert!(
            err.to_string()
                .contains("its jwks_uri http://issuer.test/keys: plain http://"),
            "{err}"
        );
        assert_eq!(fetcher.asked.lock().expect("lock").len(), 1);
    }

    #[tokio::test]
    async fn configured_plain_http_issuer_is_not_fetched() {
        let fetcher = TableFetcher::default();
        let source = IssuerSource::Discovery {
            issuer_url: "http://issuer.test".into(),
        };
        let err = fetch_key_set(&fetcher, &source, &KeyLimits::default())
            .await
            .expect_err("http");
        assert!(matches!(err, FetchError::BadUrl { .. }), "{err}");
        assert!(fetcher.asked.lock().expect("lock").is_empty());
    }

    #[test]
    fn key_file_errors_name_the_file() {
        let missing = Path::new("/nonexistent/connector-authz/jwks.json");
        let err = load_key_file(missing, &KeyLimits::default()).expect_err("missing");
        assert!(
            err.to_string()
                .starts_with("could not read key file /nonexistent/connector-authz/jwks.json: "),
            "{err}"
        );

        let dir = std::env::temp_dir().join(format!("connector-authz-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let good = dir.join("good.json");
        std::fs::write(&good, jwks()).expect("write");
        let parsed = load_key_file(&good, &KeyLimits::default()).expect("loads");
        assert_eq!(parsed.key_set.source, KeySource::File);
        let cached = read_key_file(&good, KeySource::Cache, &KeyLimits::default()).expect("loads");
        assert_eq!(cached.key_set.source, KeySource::Cache);

        let big = dir.join("big.json");
        std::fs::write(&big, vec![b' '; 1000]).expect("write");
        let tight = KeyLimits {
            max_document_bytes: 100,
            ..KeyLimits::default()
        };
        let err = load_key_file(&big, &tight).expect_err("too big");
        assert!(err.to_string().ends_with("big.json: key set is larger than the limit of 100 bytes; real key sets are a few KiB"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
