//! What the sidecar sends the proxy-wasm filter, and how the filter reads it back: the
//! wire format of `GET /v1/snapshot` ([`FeedSnapshot`]) and `POST /v1/verify`
//! ([`VerifyAnswer`]). Both sides use these types, so they cannot drift apart.
//!
//! The snapshot carries the configuration as its **source text plus the loaded registry**,
//! not the compiled model: the filter compiles the text with [`Config::from_yaml_with_registry`],
//! the same compiler the sidecar ran, so its routes, backends and token settings are the
//! sidecar's by construction, and nothing about the compiled model (route tables, indexes)
//! becomes a wire format. The registry goes as its facts (serde), because the filter has
//! no files to read it from. Keys go as fingerprints only: the filter never verifies a
//! signature; it uses them to drop a verified token whose key the issuer no longer has.
//!
//! Nothing here does I/O.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::algorithm::parse_algorithm;
use crate::config::Config;
use crate::decide::Snapshot;
use crate::decision::{Denied, DenyReason};
use crate::error::ConfigError;
use crate::registry::Registry;
use crate::token::Claims;
use crate::token_cache::VerifiedToken;

/// The body of `GET /v1/snapshot`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedSnapshot {
    /// The configuration file's path, as the sidecar loaded it (names it in errors).
    pub config_source: String,
    /// The configuration file's text.
    pub config: Arc<str>,
    /// The unit primitive registry the sidecar loaded (`unit_primitives:`), if any.
    pub registry: Option<Arc<Registry>>,
    /// Issuer (canonical name) → fingerprints of the keys it has now (16 hex digits each).
    /// An issuer without keys is absent.
    pub keys: BTreeMap<String, Vec<String>>,
}

impl FeedSnapshot {
    /// What the filter needs of the sidecar's snapshot.
    pub fn of(snapshot: &Snapshot) -> FeedSnapshot {
        let config = &snapshot.config;
        let keys = snapshot
            .keys
            .issuers()
            .map(|(issuer, set)| {
                let fingerprints = set
                    .keys
                    .iter()
                    .map(|k| fingerprint_hex(k.fingerprint))
                    .collect();
                (issuer.to_string(), fingerprints)
            })
            .collect();
        FeedSnapshot {
            config_source: config.source.display().to_string(),
            config: Arc::clone(&config.text),
            registry: config.registry.clone(),
            keys,
        }
    }

    /// Compiles the configuration as the sidecar did.
    pub fn compile(&self) -> Result<CompiledFeed, ConfigError> {
        let config = Config::from_yaml_with_registry(
            &self.config,
            Path::new(&self.config_source),
            self.registry.clone(),
        )?;
        let mut keys = BTreeMap::new();
        for (issuer, fingerprints) in &self.keys {
            let parsed: Option<Vec<u64>> =
                fingerprints.iter().map(|f| parse_fingerprint(f)).collect();
            let Some(parsed) = parsed else {
                return Err(ConfigError::new(
                    Path::new(&self.config_source),
                    0,
                    format!(
                        "the snapshot's key fingerprints of {issuer} are not 16 hex digits each"
                    ),
                ));
            };
            keys.insert(issuer.clone(), parsed);
        }
        Ok(CompiledFeed {
            snapshot: Snapshot::new(Arc::new(config), Arc::default()),
            keys,
        })
    }
}

/// A [`FeedSnapshot`] compiled: the configuration (in a [`Snapshot`] without keys, as
/// [`crate::decide::decide_verified`] takes it) and each issuer's key fingerprints.
#[derive(Clone, Debug)]
pub struct CompiledFeed {
    pub snapshot: Snapshot,
    pub keys: BTreeMap<String, Vec<u64>>,
}

impl CompiledFeed {
    /// Does the issuer still have the key that verified `token`? A token whose key has left
    /// is verified again.
    pub fn still_current(&self, token: &VerifiedToken) -> bool {
        self.keys
            .get(&*token.issuer)
            .is_some_and(|keys| keys.contains(&token.key_fingerprint()))
    }
}

/// The body of a `POST /v1/verify` answer (HTTP 200 either way).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum VerifyAnswer {
    /// The signature is valid: what the token claims (its time window and audience are
    /// not checked yet; the filter checks them per request).
    Verified {
        issuer: String,
        alg: String,
        kid: Option<String>,
        key_fingerprint: String,
        claims: Box<Claims>,
    },
    /// The signature stage denied the token: the status and reason `decide` gives.
    Denied {
        status: u16,
        reason: String,
        message: String,
    },
}

impl VerifyAnswer {
    pub fn of(result: &Result<Arc<VerifiedToken>, Denied>) -> VerifyAnswer {
        match result {
            Ok(token) => VerifyAnswer::Verified {
                issuer: token.issuer.to_string(),
                alg: format!("{:?}", token.algorithm()),
                kid: token.kid().map(str::to_string),
                key_fingerprint: fingerprint_hex(token.key_fingerprint()),
                claims: Box::new(token.claims()),
            },
            Err(denied) => VerifyAnswer::Denied {
                status: denied.reason.http_status(),
                reason: denied.reason.as_str().to_string(),
                message: denied.message.to_string(),
            },
        }
    }

    /// The answer as the outcome of the signature stage, with the issuer named as `config`
    /// names it. `Err(what)` when the answer makes no sense (an issuer or reason this
    /// configuration does not know): the filter then cannot decide.
    pub fn into_outcome(
        self,
        config: &Config,
    ) -> Result<Result<Arc<VerifiedToken>, Denied>, String> {
        match self {
            VerifyAnswer::Verified {
                issuer,
                alg,
                kid,
                key_fingerprint,
                claims,
            } => {
                let issuer = config
                    .issuer(&issuer)
                    .ok_or_else(|| format!("the sidecar verified a token of {issuer:?}, an issuer this configuration does not have"))?;
                let alg =
                    parse_algorithm(&alg).map_err(|_| format!("unknown algorithm {alg:?}"))?;
                let fingerprint = parse_fingerprint(&key_fingerprint).ok_or_else(|| {
                    format!("key fingerprint {key_fingerprint:?} is not 16 hex digits")
                })?;
                Ok(Ok(Arc::new(VerifiedToken::new(
                    *claims,
                    Arc::clone(&issuer.name),
                    alg,
                    kid.as_deref(),
                    fingerprint,
                ))))
            }
            VerifyAnswer::Denied {
                reason, message, ..
            } => {
                let reason = DenyReason::from_name(&reason)
                    .ok_or_else(|| format!("unknown deny reason {reason:?}"))?;
                Ok(Err(Denied::new(reason, message)))
            }
        }
    }
}

/// A key fingerprint on the wire: 16 lower-case hex digits (a JSON number would lose bits).
pub fn fingerprint_hex(fingerprint: u64) -> String {
    format!("{fingerprint:016x}")
}

fn parse_fingerprint(text: &str) -> Option<u64> {
    (text.len() == 16)
        .then(|| u64::from_str_radix(text, 16).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::json;

    use super::*;
    use crate::decide::{Outcome, VerifiedTokens, decide, decide_verified, verify_token};
    use crate::decision::{Decision, Request};
    use crate::dev::DevKey;
    use crate::keys::{KeySnapshot, KeySource};

    const ISS: &str = "https://customers.gitlab.com";
    const NOW: u64 = 1_800_000_000;

    fn sidecar_snapshot(key: &DevKey) -> Snapshot {
        let registry = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/cloud_connector");
        let yaml = format!(
            "issuers:
  - url: {ISS}
unit_primitives: {}
enforce_min_version: true
backends:
  - name: ai_gateway
    backend_service: ai_gateway
    forward_claims:
      gitlab_instance_id: x-instance
    routes:
      - prefix: /ai/v2/code/
        require: [complete_code]
      - prefix: /ai/v1/proxy/
        unit_primitive_header: x-gitlab-unit-primitive
",
            registry.display()
        );
        let config = Config::from_yaml(&yaml, Path::new("/etc/authz.yaml")).unwrap();
        let set = DevKey::key_set(&[key], KeySource::File, UNIX_EPOCH);
        let keys = KeySnapshot::default().with_issuer(ISS.into(), Arc::new(set));
        Snapshot::new(Arc::new(config), Arc::new(keys))
    }

    struct Answered(String, Result<Arc<VerifiedToken>, Denied>);

    impl VerifiedTokens for Answered {
        fn lookup(&self, raw: &str) -> Option<Result<Arc<VerifiedToken>, Denied>> {
            (raw == self.0).then(|| self.1.clone())
        }
    }

    /// The sidecar's snapshot and verify answer go through JSON, and the filter's decision
    /// on them is the sidecar's (but for the unverified claims a deny's log line names).
    #[test]
    fn a_decision_on_the_feed_is_the_sidecars() {
        let key = DevKey::generate("k1").unwrap();
        let other = DevKey::generate("k1").unwrap();
        let sidecar = sidecar_snapshot(&key);
        let wire = serde_json::to_string(&FeedSnapshot::of(&sidecar)).unwrap();
        let feed: FeedSnapshot = serde_json::from_str(&wire).unwrap();
        let compiled = feed.compile().unwrap();
        assert_eq!(compiled.snapshot.config.text, sidecar.config.text);
        let now = UNIX_EPOCH + Duration::from_secs(NOW);
        let claims = |scopes: &[&str]| {
            json!({"iss": ISS, "aud": "gitlab-ai-gateway", "sub": "i-1", "gitlab_instance_id": "i-1",
                   "gitlab_realm": "self-managed", "scopes": scopes, "exp": NOW + 60, "iat": NOW})
        };
        let cases = [
            (
                "/ai/v2/code/x",
                key.sign(&claims(&["complete_code"])),
                "duo_chat",
            ),
            (
                "/ai/v2/code/x",
                key.sign(&claims(&["duo_chat"])),
                "duo_chat",
            ),
            (
                "/ai/v1/proxy/x",
                key.sign(&claims(&["duo_chat"])),
                "duo_chat",
            ),
            (
                "/ai/v1/proxy/x",
                key.sign(&claims(&["duo_chat"])),
                "no_such_thing",
            ),
            (
                "/ai/v2/code/x",
                other.sign(&claims(&["complete_code"])),
                "duo_chat",
            ),
            ("/ai/v2/code/x", "a.b".to_string(), "duo_chat"),
        ];
        let mut allowed = 0;
        for (path, token, named) in cases {
            let headers = vec![
                ("authorization".to_string(), format!("Bearer {token}")),
                ("x-gitlab-realm".to_string(), "self-managed".to_string()),
                ("x-gitlab-instance-id".to_string(), "i-1".to_string()),
                (
                    "x-gitlab-authentication-type".to_string(),
                    "oidc".to_string(),
                ),
                ("x-gitlab-version".to_string(), "18.0.0".to_string()),
                ("x-gitlab-unit-primitive".to_string(), named.to_string()),
            ];
            let req = Request {
                method: "POST",
                path,
                headers: &headers,
            };
            let expected = without_log_facts(decide(&sidecar, &req, now));
            let answer = VerifyAnswer::of(&verify_token(&sidecar, &token, now));
            let answer: VerifyAnswer =
                serde_json::from_str(&serde_json::to_string(&answer).unwrap()).unwrap();
            let outcome = answer.into_outcome(&compiled.snapshot.config).unwrap();
            if let Ok(verified) = &outcome {
                assert!(compiled.still_current(verified));
            }
            let Outcome::Decided(got) =
                decide_verified(&compiled.snapshot, &req, now, &Answered(token, outcome))
            else {
                panic!("{path}: asked to verify twice")
            };
            let got = without_log_facts(got);
            allowed += usize::from(got.is_allow());
            assert_eq!(got, expected, "{path} {named}");
        }
        assert_eq!(allowed, 2, "the cases include allows");
    }

    /// A deny's claims (named in the sidecar's log line) and its refresh request do not
    /// travel in a verify answer.
    fn without_log_facts(mut decision: Decision) -> Decision {
        if let Decision::Deny(d) = &mut decision {
            d.claimed = None;
            d.refresh_issuer = None;
        }
        decision
    }

    #[test]
    fn a_snapshot_that_names_a_registry_needs_one() {
        let key = DevKey::generate("k1").unwrap();
        let mut feed = FeedSnapshot::of(&sidecar_snapshot(&key));
        feed.registry = None;
        let err = feed.compile().unwrap_err();
        assert!(err.message.contains("unit_primitives"), "{err}");
        let mut feed = FeedSnapshot::of(&sidecar_snapshot(&key));
        feed.keys.insert(ISS.into(), vec!["xyz".into()]);
        assert!(feed.compile().is_err());
    }
}
