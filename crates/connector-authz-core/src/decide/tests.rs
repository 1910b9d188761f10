//! `decide` against a fixed snapshot: one case per row of the decision table, no network.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Value, json};

use super::*;
use crate::dev::DevKey;
use crate::keys::KeySource;

const NOW: u64 = 1_800_000_000;
const ISS: &str = "https://customers.gitlab.com";
const AUD: &str = "gitlab-ai-gateway";
const INSTANCE: &str = "instance-1";

fn key(n: usize) -> DevKey {
    let pem = [
        include_str!("../../../../tests/fixtures/keys/test-rsa-2048-1.pem"),
        include_str!("../../../../tests/fixtures/keys/test-rsa-2048-2.pem"),
    ][n - 1];
    DevKey::from_pkcs8_pem(pem, format!("k{n}")).unwrap()
}

fn snapshot() -> Snapshot {
    let registry = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/cloud_connector");
    let yaml = format!(
        "issuers:
  - url: {ISS}/
  - url: https://gitlab.com
  - url: {AUD}
    jwks_file: unused.json
unit_primitives: {}
enforce_min_version: true
backends:
  - name: ai_gateway
    backend_service: ai_gateway
    routes:
      - prefix: /ai/v2/code/
        require: [complete_code]
      - prefix: /ai/v1/proxy/
        unit_primitive_header: x-gitlab-unit-primitive
      - prefix: /ai/monitoring/
        public: true
",
        registry.display()
    );
    let config = Config::from_yaml(&yaml, Path::new("/test/config.yaml")).unwrap();
    let keys_of = |k: &DevKey| Arc::new(DevKey::key_set(&[k], KeySource::File, UNIX_EPOCH));
    // gitlab.com has no keys: its tokens meet keys_unavailable.
    let keys = KeySnapshot::default()
        .with_issuer(ISS.into(), keys_of(&key(1)))
        .with_issuer(AUD.into(), keys_of(&key(2)));
    Snapshot::new(Arc::new(config), Arc::new(keys))
}

fn claims() -> Value {
    json!({
        "iss": ISS, "aud": AUD, "sub": INSTANCE, "exp": NOW + 600, "iat": NOW - 5, "nbf": NOW - 5,
        "scopes": ["complete_code", "explain_vulnerability"],
        "gitlab_realm": "self-managed", "gitlab_instance_id": INSTANCE,
    })
}

fn change(mut v: Value, changes: Value) -> Value {
    for (k, x) in changes.as_object().unwrap() {
        if x.is_null() {
            v.as_object_mut().unwrap().remove(k);
        } else {
            v[k] = x.clone();
        }
    }
    v
}

/// Decides a POST to `path` with the headers a GitLab instance sends, overridden by `extra`
/// (an empty value removes the header).
///
/// Every case is decided four times, without a token cache, with a cold one, with the
/// same one warm, and traced (as `explain` does), and the decisions must be equal: a cache
/// hit or a trace never changes a decision.
fn decide_with(path: &str, token: Option<&str>, extra: &[(&str, &str)]) -> Decision {
    let snapshot = snapshot();
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    let uncached = decide_in(&snapshot, TokenCache::disabled(), now, path, token, extra);
    let cache = TokenCache::new(16, 1 << 20);
    let cold = decide_in(&snapshot, &cache, now, path, token, extra);
    let warm = decide_in(&snapshot, &cache, now, path, token, extra);
    assert_eq!(cold, uncached, "a cold cache changed the decision");
    assert_eq!(warm, uncached, "a warm cache changed the decision");
    let (traced, _) = trace_in(&snapshot, now, path, token, extra);
    assert_eq!(traced, uncached, "tracing changed the decision");
    let seam = decide_through_seam(&snapshot, now, path, token, extra);
    assert_eq!(
        seam, uncached,
        "deciding with a token verified elsewhere changed the decision"
    );
    uncached
}

/// The outcome of [`verify_token`] for one token, as the filter holds it after asking the sidecar.
struct VerifiedElsewhere {
    raw: String,
    outcome: Result<Arc<VerifiedToken>, Denied>,
}

impl VerifiedTokens for VerifiedElsewhere {
    fn lookup(&self, raw: &str) -> Option<Result<Arc<VerifiedToken>, Denied>> {
        (raw == self.raw).then(|| self.outcome.clone())
    }
}

struct NothingVerified;

impl VerifiedTokens for NothingVerified {
    fn lookup(&self, _: &str) -> Option<Result<Arc<VerifiedToken>, Denied>> {
        None
    }
}

/// Decides as the filter does: with nothing verified first; on `NeedsVerification`, the
/// token is verified with [`verify_token`] (where the keys are) and the request decided
/// again, without keys, with that outcome.
fn decide_through_seam(
    snapshot: &Snapshot,
    now: SystemTime,
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> Decision {
    // The filter holds no keys: the seam must not need them.
    let keyless = Snapshot::new(Arc::clone(&snapshot.config), Arc::default());
    with_request(path, token, extra, |req| {
        match decide_verified(&keyless, req, now, &NothingVerified) {
            Outcome::Decided(decision) => decision,
            Outcome::NeedsVerification => {
                let raw = crate::token::bearer(req.headers, snapshot.config.tokens.max_bytes)
                    .expect("the seam asks only for a token that is present and within max_bytes");
                let verified = VerifiedElsewhere {
                    raw: raw.to_string(),
                    outcome: verify_token(snapshot, raw, now),
                };
                match decide_verified(&keyless, req, now, &verified) {
                    Outcome::Decided(decision) => decision,
                    Outcome::NeedsVerification => panic!("asked twice to verify the same token"),
                }
            }
        }
    })
}

fn decide_in(
    snapshot: &Snapshot,
    cache: &TokenCache,
    now: SystemTime,
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> Decision {
    with_request(path, token, extra, |req| {
        decide_cached(snapshot, req, now, cache)
    })
}

fn trace_in(
    snapshot: &Snapshot,
    now: SystemTime,
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> (Decision, Trace) {
    with_request(path, token, extra, |req| decide_traced(snapshot, req, now))
}

fn with_request<R>(
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
    decide: impl FnOnce(&Request<'_>) -> R,
) -> R {
    let mut headers: Vec<(String, String)> = vec![
        ("x-gitlab-realm".into(), "self-managed".into()),
        ("x-gitlab-instance-id".into(), INSTANCE.into()),
        ("x-gitlab-version".into(), "17.5.0".into()),
        ("x-gitlab-authentication-type".into(), "oidc".into()),
    ];
    if let Some(t) = token {
        headers.push(("authorization".into(), format!("Bearer {t}")));
    }
    for (k, v) in extra {
        headers.retain(|(name, _)| name != k);
        if !v.is_empty() {
            headers.push((k.to_string(), v.to_string()));
        }
    }
    let req = Request {
        method: "POST",
        path,
        headers: &headers,
    };
    decide(&req)
}

fn reason(d: &Decision) -> &'static str {
    d.reason().map_or("allow", DenyReason::as_str)
}

fn b64url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

const CODE: &str = "/ai/v2/code/completions";

#[test]
fn each_row_of_the_decision_table() {
    let good = key(1).sign(&claims());
    let signed = |c: Value| key(1).sign(&c);
    let mut tampered: Vec<String> = good.split('.').map(str::to_string).collect();
    tampered[1] =
        b64url(&change(claims(), json!({"scopes": ["complete_code", "duo_chat"]})).to_string());
    let tampered = tampered.join(".");
    let none = format!(
        "{}.{}.c2ln",
        b64url(r#"{"alg":"none"}"#),
        b64url(&claims().to_string())
    );
    let unknown_kid = DevKey::from_pkcs8_pem(
        include_str!("../../../../tests/fixtures/keys/test-rsa-2048-1.pem"),
        "other",
    )
    .unwrap()
    .sign(&claims());
    let user = key(2).sign(&json!({"iss": AUD, "aud": AUD, "sub": "user-7", "exp": NOW + 60, "scopes": ["complete_code"]}));
    let proxy = "/ai/v1/proxy/x";
    let cases: Vec<(&str, Decision, &str)> = vec![
        ("valid", decide_with(CODE, Some(&good), &[]), "allow"),
        (
            "bad path",
            decide_with("/ai/v2/code%2Fx", Some(&good), &[]),
            "bad_path",
        ),
        (
            "no route",
            decide_with("/elsewhere", Some(&good), &[]),
            "no_route",
        ),
        (
            "public",
            decide_with("/ai/monitoring/ping", None, &[]),
            "allow",
        ),
        (
            "dot segments reach no public route",
            decide_with("/ai/monitoring/../v2/code/x", None, &[]),
            "missing_token",
        ),
        (
            "missing token",
            decide_with(CODE, None, &[]),
            "missing_token",
        ),
        (
            "malformed token",
            decide_with(CODE, Some("abc"), &[]),
            "malformed_token",
        ),
        (
            "alg none",
            decide_with(CODE, Some(&none), &[]),
            "unsupported_algorithm",
        ),
        (
            "unknown issuer",
            decide_with(
                CODE,
                Some(&signed(change(
                    claims(),
                    json!({"iss": "https://evil.test"}),
                ))),
                &[],
            ),
            "unknown_issuer",
        ),
        (
            "keys unavailable",
            decide_with(
                CODE,
                Some(&signed(change(
                    claims(),
                    json!({"iss": "https://gitlab.com"}),
                ))),
                &[],
            ),
            "keys_unavailable",
        ),
        (
            "unknown key",
            decide_with(CODE, Some(&unknown_kid), &[]),
            "unknown_key",
        ),
        (
            "bad signature",
            decide_with(CODE, Some(&tampered), &[]),
            "bad_signature",
        ),
        (
            "expired",
            decide_with(
                CODE,
                Some(&signed(change(claims(), json!({"exp": NOW - 31})))),
                &[],
            ),
            "expired",
        ),
        (
            "within leeway",
            decide_with(
                CODE,
                Some(&signed(change(claims(), json!({"exp": NOW - 29})))),
                &[],
            ),
            "allow",
        ),
        (
            "not yet valid",
            decide_with(
                CODE,
                Some(&signed(change(claims(), json!({"nbf": NOW + 31})))),
                &[],
            ),
            "not_yet_valid",
        ),
        (
            "wrong audience",
            decide_with(
                CODE,
                Some(&signed(change(claims(), json!({"aud": ["other"]})))),
                &[],
            ),
            "wrong_audience",
        ),
        (
            "realm header",
            decide_with(CODE, Some(&good), &[("x-gitlab-realm", "saas")]),
            "header_mismatch",
        ),
        (
            "instance header",
            decide_with(CODE, Some(&good), &[("x-gitlab-instance-id", "")]),
            "header_mismatch",
        ),
        (
            "authentication type",
            decide_with(
                CODE,
                Some(&good),
                &[("x-gitlab-authentication-type", "pat")],
            ),
            "header_mismatch",
        ),
        (
            "user token, matching user",
            decide_with(CODE, Some(&user), &[("x-gitlab-global-user-id", "user-7")]),
            "allow",
        ),
        (
            "user token, other user",
            decide_with(CODE, Some(&user), &[("x-gitlab-global-user-id", "user-8")]),
            "header_mismatch",
        ),
        (
            "insufficient scope",
            decide_with(
                CODE,
                Some(&signed(change(claims(), json!({"scopes": ["duo_chat"]})))),
                &[],
            ),
            "insufficient_scope",
        ),
        (
            "unit primitive header missing",
            decide_with(proxy, Some(&good), &[]),
            "bad_unit_primitive",
        ),
        (
            "unit primitive header unknown",
            decide_with(proxy, Some(&good), &[("x-gitlab-unit-primitive", "nope")]),
            "bad_unit_primitive",
        ),
        (
            "unit primitive not in scopes",
            decide_with(
                proxy,
                Some(&good),
                &[("x-gitlab-unit-primitive", "duo_chat")],
            ),
            "insufficient_scope",
        ),
        (
            "unit primitive in scopes",
            decide_with(
                proxy,
                Some(&good),
                &[("x-gitlab-unit-primitive", "explain_vulnerability")],
            ),
            "allow",
        ),
        (
            "version too old",
            decide_with(CODE, Some(&good), &[("x-gitlab-version", "16.10.1-ee")]),
            "version_too_old",
        ),
        (
            "no version",
            decide_with(CODE, Some(&good), &[("x-gitlab-version", "")]),
            "version_too_old",
        ),
    ];
    for (name, decision, want) in &cases {
        assert_eq!(reason(decision), *want, "{name}: {decision:?}");
    }
}

#[test]
fn an_allow_carries_the_identity_and_a_deny_its_backend() {
    let good = key(1).sign(&claims());
    let Decision::Allow(allowed) = decide_with(CODE, Some(&good), &[]) else {
        panic!("should allow")
    };
    let identity = allowed.identity.unwrap();
    assert_eq!(
        (identity.subject.as_str(), &*identity.issuer),
        (INSTANCE, ISS)
    );
    assert_eq!(
        identity.scopes,
        vec!["complete_code", "explain_vulnerability"]
    );
    let Decision::Deny(denied) = decide_with(CODE, None, &[]) else {
        panic!("should deny")
    };
    assert_eq!(denied.backend.as_deref(), Some("ai_gateway"));
}

/// The decision names what its log line needs, so nothing re-routes or re-parses the
/// token to describe it: the route that matched, and on a deny the claims it read.
#[test]
fn a_decision_names_its_route_and_the_claims_it_read() {
    let snapshot = snapshot();
    let pattern = |route: Option<usize>| {
        route.map(|i| snapshot.config.routes.routes()[i].pattern.to_string())
    };
    let good = key(1).sign(&change(claims(), json!({"jti": "j-1"})));
    let Decision::Allow(allowed) = decide_with(CODE, Some(&good), &[]) else {
        panic!("should allow")
    };
    assert_eq!(
        pattern(allowed.route).as_deref(),
        Some("prefix /ai/v2/code/")
    );
    let Decision::Allow(public) = decide_with("/ai/monitoring/x", None, &[]) else {
        panic!("should allow")
    };
    assert_eq!(
        pattern(public.route).as_deref(),
        Some("prefix /ai/monitoring/")
    );

    let read = |issuer: &str, subject: &str| Claimed {
        issuer: Some(issuer.into()),
        subject: Some(subject.into()),
        jti: Some("j-1".into()),
    };
    // After the signature (verified claims), before it (unverified), and before the
    // claims decided anything (an algorithm refused).
    let expired = key(1).sign(&change(claims(), json!({"jti": "j-1", "exp": NOW - 600})));
    let unknown_issuer = key(1).sign(&change(
        claims(),
        json!({"jti": "j-1", "iss": "https://evil.test"}),
    ));
    let hs256 = format!(
        "{}.{}.c2ln",
        b64url(r#"{"alg":"HS256","typ":"JWT"}"#),
        b64url(&change(claims(), json!({"jti": "j-1"})).to_string())
    );
    for (token, want, claimed) in [
        (expired, "expired", read(ISS, INSTANCE)),
        (
            unknown_issuer,
            "unknown_issuer",
            read("https://evil.test", INSTANCE),
        ),
        (hs256, "unsupported_algorithm", read(ISS, INSTANCE)),
    ] {
        let Decision::Deny(denied) = decide_with(CODE, Some(&token), &[]) else {
            panic!("{want}: should deny")
        };
        assert_eq!(denied.reason.as_str(), want);
        assert_eq!(
            pattern(denied.route).as_deref(),
            Some("prefix /ai/v2/code/")
        );
        assert_eq!(denied.claimed.as_deref(), Some(&claimed), "{want}");
    }
    let Decision::Deny(denied) = decide_with(CODE, Some("not.a.token"), &[]) else {
        panic!("should deny")
    };
    assert_eq!(denied.claimed, None);
    let Decision::Deny(denied) = decide_with("/nowhere", Some(&good), &[]) else {
        panic!("should deny")
    };
    assert_eq!((denied.route, denied.claimed), (None, None));
}

/// Claims copied into upstream headers must be header-safe: a control character in
/// `sub` or a scope, or a space in a scope (scopes are joined with spaces), is a
/// malformed token, not an allow with a header Envoy rejects or that reads two ways.
#[test]
fn sub_and_scopes_that_cannot_be_headers_are_malformed() {
    for changes in [
        json!({"sub": "inst\nance"}),
        json!({"sub": "instance\u{7f}"}),
        json!({"scopes": ["complete_code", "duo_chat\r"]}),
        json!({"scopes": ["complete_code", "duo_chat complete_code"]}),
        json!({"scopes": ["complete_code", "x\u{85}"]}),
    ] {
        let token = key(1).sign(&change(claims(), changes.clone()));
        assert_eq!(
            reason(&decide_with(CODE, Some(&token), &[])),
            "malformed_token",
            "{changes}"
        );
    }
    let fine = key(1).sign(&change(
        claims(),
        json!({"scopes": ["complete_code", "é-ü"]}),
    ));
    assert!(decide_with(CODE, Some(&fine), &[]).is_allow());
}

#[test]
fn an_unknown_kid_asks_for_a_refresh_of_that_issuer_only() {
    let other = DevKey::from_pkcs8_pem(
        include_str!("../../../../tests/fixtures/keys/test-rsa-2048-1.pem"),
        "rotated",
    )
    .unwrap();
    let Decision::Deny(denied) = decide_with(CODE, Some(&other.sign(&claims())), &[]) else {
        panic!("should deny")
    };
    assert_eq!(denied.reason, DenyReason::UnknownKey);
    assert_eq!(denied.refresh_issuer.as_deref(), Some(ISS));
    let Decision::Deny(denied) = decide_with(CODE, Some("abc"), &[]) else {
        panic!("should deny")
    };
    assert_eq!(denied.refresh_issuer, None);
}

#[test]
fn messages_never_contain_the_token() {
    let good = key(1).sign(&change(claims(), json!({"scopes": []})));
    for d in [
        decide_with(CODE, Some(&good), &[]),
        decide_with(CODE, Some(&format!("{good}x")), &[]),
    ] {
        let Decision::Deny(denied) = d else {
            panic!("should deny")
        };
        for part in good.split('.') {
            assert!(!denied.message.contains(part), "{}", denied.message);
        }
    }
}

mod cache;

/// A snapshot for the route options of issue 11: `require_any`, `user_tokens: false`,
/// `forward_claims` and `mode: dry_run`.
fn options_snapshot(mode: &str) -> Snapshot {
    let registry = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/cloud_connector");
    let yaml = format!(
        "issuers:
  - url: {ISS}
  - url: {AUD}
    jwks_file: unused.json
unit_primitives: {}
backends:
  - name: ai_gateway
    backend_service: ai_gateway
    mode: {mode}
    forward_claims:
      gitlab_instance_id: x-gitlab-authz-instance-id
      gitlab_realm: X-Gitlab-Authz-Realm
      gitlab_root_namespace_id: x-gitlab-authz-root-namespace-id
    routes:
      - path: /any
        require_any: [generate_code, code_suggestions]
      - path: /instance-only
        require: [complete_code]
        user_tokens: false
      - prefix: /proxy/
        unit_primitive_header: x-gitlab-unit-primitive
",
        registry.display()
    );
    let config = Config::from_yaml(&yaml, Path::new("/test/config.yaml")).unwrap();
    let base = snapshot();
    Snapshot::new(Arc::new(config), Arc::clone(&base.keys))
}

fn decide_options(mode: &str, path: &str, token: &str, extra: &[(&str, &str)]) -> Decision {
    let snapshot = options_snapshot(mode);
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    let uncached = decide_in(
        &snapshot,
        TokenCache::disabled(),
        now,
        path,
        Some(token),
        extra,
    );
    let seam = decide_through_seam(&snapshot, now, path, Some(token), extra);
    assert_eq!(
        seam, uncached,
        "deciding with a token verified elsewhere changed the decision"
    );
    uncached
}

#[test]
fn require_any_user_tokens_and_header_rules() {
    let with_scopes = |scopes: Value| key(1).sign(&change(claims(), json!({ "scopes": scopes })));
    let user = key(2).sign(&json!({"iss": AUD, "aud": AUD, "sub": "user-7", "exp": NOW + 60, "scopes": ["complete_code"]}));
    let cases = [
        (
            "one of require_any",
            decide_options(
                "enforce",
                "/any",
                &with_scopes(json!(["code_suggestions"])),
                &[],
            ),
            "allow",
        ),
        (
            "none of require_any",
            decide_options(
                "enforce",
                "/any",
                &with_scopes(json!(["complete_code"])),
                &[],
            ),
            "insufficient_scope",
        ),
        (
            "instance token where user tokens are refused",
            decide_options(
                "enforce",
                "/instance-only",
                &with_scopes(json!(["complete_code"])),
                &[],
            ),
            "allow",
        ),
        (
            "user token refused",
            decide_options(
                "enforce",
                "/instance-only",
                &user,
                &[("x-gitlab-global-user-id", "user-7")],
            ),
            "user_token_refused",
        ),
        // The headers are checked first: a user token with a wrong user id is a mismatch.
        (
            "user token, header mismatch first",
            decide_options(
                "enforce",
                "/instance-only",
                &user,
                &[("x-gitlab-global-user-id", "user-8")],
            ),
            "header_mismatch",
        ),
        (
            "authentication type missing",
            decide_options(
                "enforce",
                "/any",
                &with_scopes(json!(["generate_code"])),
                &[("x-gitlab-authentication-type", "")],
            ),
            "header_mismatch",
        ),
        (
            "authentication type not oidc",
            decide_options(
                "enforce",
                "/any",
                &with_scopes(json!(["generate_code"])),
                &[("x-gitlab-authentication-type", "OIDC")],
            ),
            "header_mismatch",
        ),
        (
            "empty instance claim is absent",
            decide_options(
                "enforce",
                "/any",
                &key(1).sign(&change(
                    claims(),
                    json!({"scopes": ["generate_code"], "gitlab_instance_id": "", "sub": ""}),
                )),
                &[("x-gitlab-instance-id", "other")],
            ),
            "allow",
        ),
        (
            "empty realm claim is absent",
            decide_options(
                "enforce",
                "/any",
                &key(1).sign(&change(
                    claims(),
                    json!({"scopes": ["generate_code"], "gitlab_realm": ""}),
                )),
                &[("x-gitlab-realm", "")],
            ),
            "allow",
        ),
        (
            "a unit primitive of another backend",
            decide_options(
                "enforce",
                "/proxy/x",
                &with_scopes(json!(["duo_workflow_execute_workflow"])),
                &[("x-gitlab-unit-primitive", "duo_workflow_execute_workflow")],
            ),
            "bad_unit_primitive",
        ),
        (
            "a unit primitive of this backend",
            decide_options(
                "enforce",
                "/proxy/x",
                &with_scopes(json!(["duo_chat"])),
                &[("x-gitlab-unit-primitive", "duo_chat")],
            ),
            "allow",
        ),
    ];
    for (name, decision, want) in &cases {
        assert_eq!(reason(decision), *want, "{name}: {decision:?}");
    }
    assert_eq!(DenyReason::UserTokenRefused.http_status(), 403);
}

#[test]
fn forward_claims_copy_strings_and_numbers_and_refuse_control_characters() {
    let token = key(1).sign(&change(
        claims(),
        json!({"scopes": ["generate_code"], "gitlab_instance_id": INSTANCE}),
    ));
    let Decision::Allow(allowed) = decide_options("enforce", "/any", &token, &[]) else {
        panic!("allowed")
    };
    let identity = allowed.identity.expect("an identity");
    let pairs = |forwarded: &[ForwardedHeader]| -> Vec<(String, Option<String>)> {
        forwarded
            .iter()
            .map(|f| (f.header.to_string(), f.value.clone()))
            .collect()
    };
    assert_eq!(
        pairs(&identity.forwarded),
        vec![
            (
                "x-gitlab-authz-instance-id".to_string(),
                Some(INSTANCE.to_string())
            ),
            (
                "x-gitlab-authz-realm".to_string(),
                Some("self-managed".to_string())
            ),
            ("x-gitlab-authz-root-namespace-id".to_string(), None),
        ]
    );
    // A number is forwarded as its JSON text; an absent claim removes the header.
    let numeric = key(1).sign(&change(
        claims(),
        json!({"scopes": ["generate_code"], "gitlab_realm": null, "gitlab_root_namespace_id": 12345}),
    ));
    let Decision::Allow(allowed) = decide_options("enforce", "/any", &numeric, &[]) else {
        panic!("allowed")
    };
    assert_eq!(
        pairs(&allowed.identity.unwrap().forwarded),
        vec![
            (
                "x-gitlab-authz-instance-id".to_string(),
                Some(INSTANCE.to_string())
            ),
            ("x-gitlab-authz-realm".to_string(), None),
            (
                "x-gitlab-authz-root-namespace-id".to_string(),
                Some("12345".to_string())
            ),
        ]
    );
    let bad = key(1).sign(&change(
        claims(),
        json!({"scopes": ["generate_code"], "gitlab_realm": "self\nmanaged"}),
    ));
    let d = decide_options(
        "enforce",
        "/any",
        &bad,
        &[("x-gitlab-realm", "self\nmanaged")],
    );
    assert_eq!(reason(&d), "malformed_token");
}

#[test]
fn dry_run_allows_every_denial_but_bad_path_and_says_why() {
    let scopes = |s: Value| key(1).sign(&change(claims(), json!({ "scopes": s })));
    let d = decide_options("dry_run", "/any", &scopes(json!(["complete_code"])), &[]);
    let Decision::Allow(allowed) = &d else {
        panic!("{d:?}")
    };
    let would = allowed.dry_run.as_ref().expect("a dry-run allow");
    assert_eq!(would.reason, DenyReason::InsufficientScope);
    assert!(allowed.identity.is_none());
    assert_eq!(allowed.removed_headers.len(), 3, "every forwarded header");
    let d = decide_options("dry_run", "/any", "not-a-token", &[]);
    assert!(
        matches!(&d, Decision::Allow(a) if a.dry_run.as_ref().is_some_and(|w| w.reason == DenyReason::MalformedToken)),
        "{d:?}"
    );
    let d = decide_options("dry_run", "/any%2F", &scopes(json!(["generate_code"])), &[]);
    assert_eq!(reason(&d), "bad_path");
    let d = decide_options("dry_run", "/any", &scopes(json!(["generate_code"])), &[]);
    assert!(
        matches!(&d, Decision::Allow(a) if a.dry_run.is_none() && a.identity.is_some()),
        "{d:?}"
    );
}

/// Decides on GitLab's own legacy registry (`tests/fixtures/gitlab/access_data.yml`): a
/// backend that is not the AI gateway, reached through its audience and a unit primitive
/// bundled with the `_irrelevant_` pseudo add-on.
#[test]
fn decides_on_gitlabs_access_data_yml() {
    let registry =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gitlab/access_data.yml");
    let yaml = format!(
        "issuers:
  - url: {ISS}
unit_primitives: {}
backends:
  - name: security
    backend_service: security_gateway
    routes:
      - prefix: /scan/
        require: [security_scans]
  - name: ai_gateway
    backend_service: ai_gateway
    routes:
      - prefix: /ai/v1/proxy/
        unit_primitive_header: x-gitlab-unit-primitive
",
        registry.display()
    );
    let config = Config::from_yaml(&yaml, Path::new("/test/config.yaml")).unwrap();
    let keys = DevKey::key_set(&[&key(1)], KeySource::File, UNIX_EPOCH);
    let snapshot = Snapshot::new(
        Arc::new(config),
        Arc::new(KeySnapshot::default().with_issuer(ISS.into(), Arc::new(keys))),
    );
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    let run = |path: &str, claims: Value, extra: &[(&str, &str)]| {
        let token = key(1).sign(&claims);
        reason(&decide_in(
            &snapshot,
            TokenCache::disabled(),
            now,
            path,
            Some(&token),
            extra,
        ))
    };
    let scan = change(
        claims(),
        json!({"aud": "gitlab-security-gateway", "scopes": ["security_scans"]}),
    );
    assert_eq!(run("/scan/x", scan.clone(), &[]), "allow");
    assert_eq!(
        run(
            "/scan/x",
            change(scan, json!({"scopes": ["duo_chat"]})),
            &[]
        ),
        "insufficient_scope"
    );
    // A unit primitive that only the anthropic_proxy service bundles, named by header.
    let proxy = change(claims(), json!({"scopes": ["summarize_review"]}));
    let header = [("x-gitlab-unit-primitive", "summarize_review")];
    assert_eq!(run("/ai/v1/proxy/x", proxy.clone(), &header), "allow");
    let unknown = [("x-gitlab-unit-primitive", "summarize_reviews")];
    assert_eq!(run("/ai/v1/proxy/x", proxy, &unknown), "bad_unit_primitive");
}

#[test]
fn a_clock_before_1970_is_negative_unix_seconds() {
    assert_eq!(unix_seconds(UNIX_EPOCH), 0);
    assert_eq!(
        unix_seconds(UNIX_EPOCH + Duration::from_secs(NOW)),
        NOW as i64
    );
    assert_eq!(
        unix_seconds(UNIX_EPOCH - Duration::from_secs(86_400)),
        -86_400
    );
    // A token valid only before 1970 is good at a clock set before 1970, not after it.
    let old = change(claims(), json!({"iat": -200, "nbf": -200, "exp": -100}));
    let token = key(1).sign(&old);
    let decide_at = |now: SystemTime| {
        let snapshot = snapshot();
        reason(&decide_in(
            &snapshot,
            TokenCache::disabled(),
            now,
            "/ai/v2/code/x",
            Some(&token),
            &[],
        ))
    };
    assert_eq!(decide_at(UNIX_EPOCH - Duration::from_secs(150)), "allow");
    assert_eq!(decide_at(UNIX_EPOCH + Duration::from_secs(150)), "expired");
}

#[test]
fn a_trace_records_each_step_up_to_the_one_that_decided() {
    let snapshot = snapshot();
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    let trace = |path: &str, token: Option<&str>, extra: &[(&str, &str)]| {
        trace_in(&snapshot, now, path, token, extra)
    };

    // A refused path: nothing after it.
    let (d, t) = trace("/ai/v2/code/%2e%2e%2f", None, &[]);
    assert_eq!(reason(&d), "bad_path");
    assert!(t.path.is_none() && t.header.is_none());

    // No token: the path, then nothing.
    let (d, t) = trace("/ai/v2//code/./completions", None, &[]);
    assert_eq!(reason(&d), "missing_token");
    assert_eq!(t.path.as_deref(), Some("/ai/v2/code/completions"));
    assert!(t.header.is_none() && t.claims.is_none() && t.scopes.is_none());

    // A token without the route's unit primitive: every step, and the comparison.
    let lacking = key(1).sign(&change(claims(), json!({"scopes": ["duo_chat"]})));
    let (d, t) = trace("/ai/v2/code/completions", Some(&lacking), &[]);
    assert_eq!(reason(&d), "insufficient_scope");
    assert_eq!(
        t.header.as_ref().map(|h| h.kid.as_deref()),
        Some(Some("k1"))
    );
    assert_eq!(t.claims.as_ref().and_then(|c| c.iss.as_deref()), Some(ISS));
    assert_eq!(t.issuer.as_deref(), Some(ISS));
    assert!(matches!(t.key, Some(Ok(_))), "{:?}", t.key);
    assert_eq!(
        t.scopes,
        Some(ScopeTrace {
            needed: vec!["complete_code".into()],
            any_of: vec![],
            held: vec!["duo_chat".into()],
            missing: vec!["complete_code".into()],
        })
    );

    // Signed by another key under the same kid: the key lookup says why, no scopes.
    let forged = DevKey::from_pkcs8_pem(
        include_str!("../../../../tests/fixtures/keys/test-rsa-2048-2.pem"),
        "k1",
    )
    .unwrap()
    .sign(&claims());
    let (d, t) = trace("/ai/v2/code/completions", Some(&forged), &[]);
    assert_eq!(reason(&d), "bad_signature");
    assert_eq!(t.key, Some(Err(DenyReason::BadSignature)));
    assert!(t.scopes.is_none());

    // An unknown kid, and an issuer without keys.
    let unknown = DevKey::from_pkcs8_pem(
        include_str!("../../../../tests/fixtures/keys/test-rsa-2048-2.pem"),
        "k9",
    )
    .unwrap()
    .sign(&claims());
    let (_, t) = trace("/ai/v2/code/completions", Some(&unknown), &[]);
    assert_eq!(t.key, Some(Err(DenyReason::UnknownKey)));
    let saas = key(1).sign(&change(claims(), json!({"iss": "https://gitlab.com"})));
    let (d, t) = trace("/ai/v2/code/completions", Some(&saas), &[]);
    assert_eq!(reason(&d), "keys_unavailable");
    assert_eq!(t.issuer.as_deref(), Some("https://gitlab.com"));
    assert!(t.key.is_none());

    // The unit primitive a header names is part of what was needed.
    let (d, t) = trace(
        "/ai/v1/proxy/x",
        Some(&key(1).sign(&claims())),
        &[("x-gitlab-unit-primitive", "explain_vulnerability")],
    );
    assert_eq!(reason(&d), "allow");
    let scopes = t.scopes.expect("compared");
    assert_eq!(scopes.needed, ["explain_vulnerability"]);
    assert!(scopes.missing.is_empty());
}
