//! The adversarial corpus: hostile tokens and requests, each with the decision it must get,
//! as one table of [`Case`]s. Nothing is allowed except the cases named `control_*`, which
//! are valid on purpose (and show that the denials around them are not a broken setup).
//!
//! One list, run several ways: tests/adversarial.rs through `decide`, the real gRPC server
//! and the filter's pipeline (and as the fuzz seed corpus), tests/e2e_wasm.rs through a real
//! Envoy with ext_authz and with the proxy-wasm filter. Both include this module with
//! `mod corpus;` beside `#[path = "../fuzz/targets/mod.rs"] mod targets;`, whose fixed world
//! (keys, issuers, configuration) the cases are minted in.
// Each test binary uses only part of it.
#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

use crate::targets::env::{
    AUDIENCE, CODE_PATH, INSTANCE, ISSUER_A, ISSUER_B, ISSUER_DOWN, Keys, MAX_TOKEN_BYTES,
    PROXY_PATH, Signer, USER_ISSUER,
};
use crate::targets::input::DecideInput;

/// One hostile (or, for `control_*`, valid) request and the decision it must get:
/// `allow` or a deny reason word.
pub struct Case {
    pub name: String,
    pub input: DecideInput,
    pub want: &'static str,
}

/// Builds the table at clock `now` (seconds): the real time for the tests, [`NOW`] for
/// the seed corpus.
pub struct Table<'k> {
    pub keys: &'k Keys,
    pub now: u64,
    pub cases: Vec<Case>,
}

pub const STD_HEADERS: [(&str, &str); 4] = [
    ("x-gitlab-realm", "self-managed"),
    ("x-gitlab-instance-id", INSTANCE),
    ("x-gitlab-authentication-type", "oidc"),
    ("x-gitlab-version", "17.5.0-ee"),
];

impl Table<'_> {
    /// Claims of a valid service token of issuer A for the code route.
    fn claims(&self) -> Value {
        json!({
            "iss": ISSUER_A,
            "aud": AUDIENCE,
            "sub": INSTANCE,
            "scopes": ["complete_code", "duo_chat"],
            "iat": self.now,
            "nbf": self.now,
            "exp": self.now + 600,
            "jti": "adversarial-1",
            "gitlab_realm": "self-managed",
            "gitlab_instance_id": INSTANCE,
        })
    }

    /// The valid claims with `changes` applied; a `null` change removes the claim.
    fn claims_with(&self, changes: Value) -> Value {
        let mut claims = self.claims();
        for (k, v) in changes.as_object().expect("changes are an object") {
            if v.is_null() {
                claims.as_object_mut().expect("object").remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        claims
    }

    pub fn valid(&self) -> String {
        self.keys.a.sign(&self.claims())
    }

    fn add(
        &mut self,
        name: &str,
        method: &str,
        path: &str,
        headers: Vec<(&str, Vec<u8>)>,
        want: &'static str,
    ) {
        self.cases.push(Case {
            name: name.to_string(),
            input: DecideInput {
                want: Some(want.to_string()),
                method: method.as_bytes().to_vec(),
                path: path.as_bytes().to_vec(),
                headers: headers
                    .into_iter()
                    .map(|(k, v)| (k.as_bytes().to_vec(), v))
                    .collect(),
            },
            want,
        });
    }

    /// POST to the code route with the instance headers, `extra` replacing or adding
    /// (an empty value removes), and this Authorization value.
    fn auth_with(
        &mut self,
        name: &str,
        authorization: impl AsRef<[u8]>,
        extra: &[(&str, &[u8])],
        want: &'static str,
    ) {
        self.request_with(name, CODE_PATH, Some(authorization.as_ref()), extra, want);
    }

    fn request_with(
        &mut self,
        name: &str,
        path: &str,
        authorization: Option<&[u8]>,
        extra: &[(&str, &[u8])],
        want: &'static str,
    ) {
        self.method_request_with(name, "POST", path, authorization, extra, want);
    }

    fn method_request_with(
        &mut self,
        name: &str,
        method: &str,
        path: &str,
        authorization: Option<&[u8]>,
        extra: &[(&str, &[u8])],
        want: &'static str,
    ) {
        let mut headers: Vec<(&str, Vec<u8>)> = Vec::new();
        if let Some(value) = authorization {
            headers.push(("authorization", value.to_vec()));
        }
        for (k, v) in STD_HEADERS {
            if !extra.iter().any(|(name, _)| *name == k) {
                headers.push((k, v.as_bytes().to_vec()));
            }
        }
        for (k, v) in extra {
            if !v.is_empty() {
                headers.push((k, v.to_vec()));
            }
        }
        self.add(name, method, path, headers, want);
    }

    fn auth(&mut self, name: &str, authorization: impl AsRef<[u8]>, want: &'static str) {
        self.auth_with(name, authorization, &[], want);
    }

    fn token(&mut self, name: &str, token: &str, want: &'static str) {
        self.auth(name, format!("Bearer {token}"), want);
    }

    fn claims_case(&mut self, name: &str, changes: Value, want: &'static str) {
        let token = self.keys.a.sign(&self.claims_with(changes));
        self.token(name, &token, want);
    }

    fn header_case(&mut self, name: &str, header: Value, signer: &Signer, want: &'static str) {
        let token = signer.sign_with_header(&header, &self.claims());
        self.token(name, &token, want);
    }

    /// A token of issuer A whose serialized payload is edited as text (for JSON that a
    /// `Value` cannot hold: duplicate members, numbers out of range).
    fn raw_payload_case(
        &mut self,
        name: &str,
        edit: impl Fn(String) -> String,
        want: &'static str,
    ) {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": "test-key-1"}).to_string();
        let payload = edit(self.claims().to_string());
        let token = self.keys.a.sign_raw(&header, &payload);
        self.token(name, &token, want);
    }

    fn raw_header_case(&mut self, name: &str, header: &str, want: &'static str) {
        let token = self.keys.a.sign_raw(header, &self.claims().to_string());
        self.token(name, &token, want);
    }

    fn hmac_case(&mut self, name: &str, alg: &str, hmac_alg: hmac::Algorithm, secret: &[u8]) {
        let input = format!(
            "{}.{}",
            b64(&json!({"alg": alg, "typ": "JWT", "kid": "test-key-1"}).to_string()),
            b64(&self.claims().to_string())
        );
        let tag = hmac::sign(&hmac::Key::new(hmac_alg, secret), input.as_bytes());
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
        self.token(name, &token, "unsupported_algorithm");
    }

    fn segments(&self) -> [String; 3] {
        let token = self.valid();
        let parts: Vec<&str> = token.split('.').collect();
        [parts[0].into(), parts[1].into(), parts[2].into()]
    }
}

fn b64(text: &str) -> String {
    URL_SAFE_NO_PAD.encode(text)
}

pub fn bytes(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Inserts `member` (`"name":value`) as the first member of a serialized JSON object.
fn with_leading_member(json: String, member: &str) -> String {
    format!("{{{member},{}", &json[1..])
}

pub fn cases(keys: &Keys, now: u64) -> Vec<Case> {
    let mut t = Table {
        keys,
        now,
        cases: Vec::new(),
    };
    let valid = t.valid();
    let a = &keys.a;

    // Valid on purpose.
    t.token("control_valid", &valid, "allow");
    let b_token = keys.b.sign(&t.claims_with(json!({"iss": ISSUER_B})));
    t.token("control_issuer_b", &b_token, "allow");
    let shared = keys.a_shared.sign(&t.claims());
    t.token("control_shared_kid_of_the_right_issuer", &shared, "allow");
    let user = keys
        .user
        .sign(&t.claims_with(json!({"iss": USER_ISSUER, "sub": "user-42"})));
    t.auth_with(
        "control_user_token",
        format!("Bearer {user}"),
        &[("x-gitlab-global-user-id", b"user-42")],
        "allow",
    );
    let no_kid = a.sign_with_header(&json!({"alg": "RS256", "typ": "JWT"}), &t.claims());
    t.token("control_no_kid", &no_kid, "allow");
    let slash = a.sign(&t.claims_with(json!({"iss": format!("{ISSUER_A}/")})));
    t.token("control_iss_with_one_trailing_slash", &slash, "allow");
    t.add(
        "control_public_route_without_token",
        "GET",
        "/ai/monitoring/health",
        vec![],
        "allow",
    );
    t.add(
        // An escaped '%': a backend that decodes twice would climb out of the public prefix.
        "path_double_encoded_dots",
        "GET",
        "/ai/monitoring/%252e%252e/v2/code/completions",
        vec![],
        "bad_path",
    );
    t.auth(
        "control_bearer_lowercase",
        format!("bearer {valid}"),
        "allow",
    );
    t.auth(
        "control_bearer_uppercase",
        format!("BEARER {valid}"),
        "allow",
    );
    t.auth("control_bearer_tab", format!("Bearer\t{valid}"), "allow");
    t.auth(
        "control_bearer_double_space",
        format!("Bearer  {valid}"),
        "allow",
    );
    t.auth(
        "control_trailing_space",
        format!("Bearer {valid} "),
        "allow",
    );
    t.claims_case(
        "control_fractional_exp",
        json!({"exp": now as f64 + 600.5}),
        "allow",
    );
    t.claims_case(
        "control_exp_within_leeway",
        json!({"exp": now - 10}),
        "allow",
    );
    t.claims_case(
        "control_exp_1e300_is_far_future",
        json!({"exp": 1e300}),
        "allow",
    );
    t.claims_case("control_nbf_negative", json!({"nbf": -1}), "allow");
    t.claims_case(
        "control_aud_array",
        json!({"aud": ["other", AUDIENCE]}),
        "allow",
    );
    let proxy = keys.a.sign(&t.claims());
    t.request_with(
        "control_header_named_unit_primitive",
        PROXY_PATH,
        Some(format!("Bearer {proxy}").as_bytes()),
        &[("x-gitlab-unit-primitive", b"duo_chat")],
        "allow",
    );
    t.header_case(
        "control_jku_is_ignored_not_obeyed",
        json!({"alg": "RS256", "kid": "test-key-1", "jku": "https://evil.test/jwks.json"}),
        a,
        "allow",
    );

    // alg: none and other algorithms.
    let none_token = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&t.claims().to_string())
    );
    t.token("alg_none_empty_signature", &none_token, "malformed_token");
    for spelling in ["none", "None", "NONE", "nOnE"] {
        t.header_case(
            &format!("alg_{}_signed", spelling_tag(spelling)),
            json!({"alg": spelling, "typ": "JWT", "kid": "test-key-1"}),
            a,
            "unsupported_algorithm",
        );
    }
    for (name, alg) in [
        ("alg_rs256_lowercase", json!("rs256")),
        ("alg_rs256_with_space", json!("RS256 ")),
        ("alg_ps256_not_allowed", json!("PS256")),
        ("alg_es256_not_allowed", json!("ES256")),
        ("alg_unknown", json!("XS256")),
    ] {
        t.header_case(
            name,
            json!({"alg": alg, "kid": "test-key-1"}),
            a,
            "unsupported_algorithm",
        );
    }
    for (name, alg) in [
        ("alg_number", json!(256)),
        ("alg_null", Value::Null),
        ("alg_array", json!(["RS256"])),
    ] {
        t.header_case(
            name,
            json!({"alg": alg, "kid": "test-key-1"}),
            a,
            "malformed_token",
        );
    }
    t.header_case(
        "alg_missing",
        json!({"typ": "JWT", "kid": "test-key-1"}),
        a,
        "malformed_token",
    );

    // HMAC keyed with the issuer's public key, in every form an attacker finds it.
    let pem = a.public_pem();
    let der = a.public_spki_der();
    let n = a.jwk_n();
    let jwk = a.public_jwk().to_string();
    t.hmac_case(
        "hs256_keyed_with_public_pem",
        "HS256",
        hmac::HMAC_SHA256,
        pem.as_bytes(),
    );
    t.hmac_case(
        "hs384_keyed_with_public_pem",
        "HS384",
        hmac::HMAC_SHA384,
        pem.as_bytes(),
    );
    t.hmac_case(
        "hs512_keyed_with_public_pem",
        "HS512",
        hmac::HMAC_SHA512,
        pem.as_bytes(),
    );
    t.hmac_case(
        "hs256_keyed_with_public_der",
        "HS256",
        hmac::HMAC_SHA256,
        &der,
    );
    t.hmac_case(
        "hs512_keyed_with_public_der",
        "HS512",
        hmac::HMAC_SHA512,
        &der,
    );
    t.hmac_case(
        "hs256_keyed_with_jwk_n",
        "HS256",
        hmac::HMAC_SHA256,
        n.as_bytes(),
    );
    t.hmac_case(
        "hs256_keyed_with_jwk_json",
        "HS256",
        hmac::HMAC_SHA256,
        jwk.as_bytes(),
    );

    // Keys that belong to another issuer, or to nobody we trust.
    t.token(
        "shared_kid_signed_by_issuer_b_key",
        &keys.b_shared.sign(&t.claims()),
        "bad_signature",
    );
    t.token(
        "issuer_b_kid_for_issuer_a",
        &keys.b.sign(&t.claims()),
        "unknown_key",
    );
    t.token(
        "user_issuer_key_for_issuer_a",
        &keys.user.sign(&t.claims()),
        "unknown_key",
    );
    let a_for_b = a.sign(&t.claims_with(json!({"iss": ISSUER_B})));
    t.token("issuer_a_key_claiming_issuer_b", &a_for_b, "unknown_key");
    t.header_case(
        "attacker_key_with_a_real_kid",
        json!({"alg": "RS256", "kid": "test-key-1"}),
        &keys.user,
        "bad_signature",
    );
    t.header_case(
        "no_kid_signed_by_another_issuer",
        json!({"alg": "RS256"}),
        &keys.b,
        "bad_signature",
    );

    // kid: never a path, a URL or anything but a name to look up.
    for (name, kid, want) in [
        (
            "kid_path_traversal",
            json!("../../etc/passwd"),
            "unknown_key",
        ),
        (
            "kid_url",
            json!("https://evil.test/keys.json"),
            "unknown_key",
        ),
        ("kid_file_url", json!("file:///etc/passwd"), "unknown_key"),
        ("kid_sql", json!("' OR '1'='1"), "unknown_key"),
        ("kid_empty", json!(""), "unknown_key"),
        ("kid_other_case", json!("TEST-KEY-1"), "unknown_key"),
        ("kid_with_nul", json!("test-key-1\u{0}"), "unknown_key"),
        ("kid_4kb", json!("k".repeat(4096)), "unknown_key"),
        (
            "kid_10kb_exceeds_max_bytes",
            json!("k".repeat(10 * 1024)),
            "malformed_token",
        ),
        ("kid_number", json!(1), "malformed_token"),
        ("kid_array", json!(["test-key-1"]), "malformed_token"),
        (
            "kid_object",
            json!({"kid": "test-key-1"}),
            "malformed_token",
        ),
        ("kid_bool", json!(true), "malformed_token"),
        ("kid_null", Value::Null, "malformed_token"),
    ] {
        t.header_case(name, json!({"alg": "RS256", "kid": kid}), a, want);
    }

    // Keys offered by the token itself are never used.
    let attacker_jwk = keys.user.public_jwk();
    let x5c = STANDARD.encode(keys.user.public_spki_der());
    for (name, header, want) in [
        (
            "jwk_header_with_attacker_kid",
            json!({"alg": "RS256", "kid": "attacker", "jwk": attacker_jwk}),
            "unknown_key",
        ),
        (
            "jwk_header_with_a_real_kid",
            json!({"alg": "RS256", "kid": "test-key-1", "jwk": attacker_jwk}),
            "bad_signature",
        ),
        (
            "jwk_header_without_kid",
            json!({"alg": "RS256", "jwk": attacker_jwk}),
            "bad_signature",
        ),
        (
            "jku_attacker_set",
            json!({"alg": "RS256", "kid": "attacker", "jku": "https://evil.test/jwks.json"}),
            "unknown_key",
        ),
        (
            "jku_attacker_set_real_kid",
            json!({"alg": "RS256", "kid": "test-key-1", "jku": "http://127.0.0.1:1/jwks.json"}),
            "bad_signature",
        ),
        (
            "x5u_attacker_cert",
            json!({"alg": "RS256", "kid": "test-key-1", "x5u": "https://evil.test/cert.pem"}),
            "bad_signature",
        ),
        (
            "x5c_attacker_cert",
            json!({"alg": "RS256", "kid": "test-key-1", "x5c": [x5c]}),
            "bad_signature",
        ),
    ] {
        t.header_case(name, header, &keys.user, want);
    }

    // crit: no extension is understood, so any crit is refused.
    for (name, header) in [
        (
            "crit_unknown_extension",
            json!({"alg": "RS256", "kid": "test-key-1", "crit": ["x-custom"], "x-custom": 1}),
        ),
        (
            "crit_empty",
            json!({"alg": "RS256", "kid": "test-key-1", "crit": []}),
        ),
        (
            "crit_b64_false",
            json!({"alg": "RS256", "kid": "test-key-1", "b64": false, "crit": ["b64"]}),
        ),
        (
            "crit_registered_name",
            json!({"alg": "RS256", "kid": "test-key-1", "crit": ["exp"]}),
        ),
        (
            "crit_not_an_array",
            json!({"alg": "RS256", "kid": "test-key-1", "crit": "x-custom"}),
        ),
    ] {
        t.header_case(name, header, a, "malformed_token");
    }

    // Duplicate members: which one wins differs between parsers, so neither does.
    t.raw_header_case(
        "duplicate_header_alg",
        r#"{"alg":"RS256","kid":"test-key-1","alg":"none"}"#,
        "malformed_token",
    );
    t.raw_header_case(
        "duplicate_header_kid",
        r#"{"alg":"RS256","kid":"attacker","kid":"test-key-1"}"#,
        "malformed_token",
    );
    for (name, member) in [
        (
            "duplicate_claim_iss",
            r#""iss":"https://evil.test""#.to_string(),
        ),
        ("duplicate_claim_aud", r#""aud":"other""#.to_string()),
        ("duplicate_claim_exp", format!(r#""exp":{}"#, now + 600)),
        (
            "duplicate_claim_scopes",
            r#""scopes":["everything"]"#.to_string(),
        ),
        (
            "duplicate_claim_sub",
            r#""sub":"other-instance""#.to_string(),
        ),
    ] {
        t.raw_payload_case(
            name,
            |json| with_leading_member(json, &member),
            "malformed_token",
        );
    }

    // Times of the wrong type or out of range.
    for (name, changes, want) in [
        (
            "exp_string",
            json!({"exp": (now + 600).to_string()}),
            "malformed_token",
        ),
        ("exp_bool", json!({"exp": true}), "malformed_token"),
        ("exp_array", json!({"exp": [now + 600]}), "malformed_token"),
        ("exp_negative", json!({"exp": -1}), "expired"),
        ("exp_zero", json!({"exp": 0}), "expired"),
        (
            "exp_float_past",
            json!({"exp": now as f64 - 100.5}),
            "expired",
        ),
        (
            "exp_past_beyond_leeway",
            json!({"exp": now - 31}),
            "expired",
        ),
        ("exp_minus_1e300", json!({"exp": -1e300}), "expired"),
        ("exp_missing", json!({"exp": null}), "expired"),
        ("nbf_future", json!({"nbf": now + 3600}), "not_yet_valid"),
        ("nbf_1e300", json!({"nbf": 1e300}), "not_yet_valid"),
        (
            "nbf_string",
            json!({"nbf": now.to_string()}),
            "malformed_token",
        ),
        ("iat_future", json!({"iat": now + 3600}), "not_yet_valid"),
        ("iat_u64_max", json!({"iat": u64::MAX}), "not_yet_valid"),
    ] {
        t.claims_case(name, changes, want);
    }
    let exp_now = format!("\"exp\":{}", now + 600);
    for (name, replacement) in [
        ("exp_null", "\"exp\":null"),
        ("exp_1e400_out_of_range", "\"exp\":1e400"),
        ("exp_nan_text", "\"exp\":NaN"),
        ("exp_hex", "\"exp\":0x7fffffff"),
    ] {
        let exp_now = exp_now.clone();
        t.raw_payload_case(
            name,
            move |json| json.replace(&exp_now, replacement),
            "malformed_token",
        );
    }

    // aud.
    for (name, aud, want) in [
        ("aud_object", json!({"aud": AUDIENCE}), "malformed_token"),
        ("aud_nested_array", json!([[AUDIENCE]]), "malformed_token"),
        ("aud_number", json!(1), "malformed_token"),
        (
            "aud_array_with_non_string",
            json!([AUDIENCE, 1]),
            "malformed_token",
        ),
        ("aud_empty_array", json!([]), "wrong_audience"),
        (
            "aud_another_service",
            json!("gitlab-other-service"),
            "wrong_audience",
        ),
        (
            "aud_other_case",
            json!("GITLAB-AI-GATEWAY"),
            "wrong_audience",
        ),
        (
            "aud_trailing_space",
            json!(format!("{AUDIENCE} ")),
            "wrong_audience",
        ),
        ("aud_prefix", json!("gitlab-ai"), "wrong_audience"),
    ] {
        t.claims_case(name, json!({"aud": aud}), want);
    }
    t.claims_case("aud_missing", json!({"aud": null}), "wrong_audience");

    // scopes: exact strings, nothing close enough.
    for (name, scopes, want) in [
        ("scopes_string", json!("complete_code"), "malformed_token"),
        (
            "scopes_with_number",
            json!(["complete_code", 1]),
            "malformed_token",
        ),
        (
            "scopes_with_null",
            json!(["complete_code", null]),
            "malformed_token",
        ),
        (
            "scopes_object",
            json!({"complete_code": true}),
            "malformed_token",
        ),
        (
            "scopes_nested",
            json!([["complete_code"]]),
            "malformed_token",
        ),
        (
            "scopes_other_case",
            json!(["Complete_code"]),
            "insufficient_scope",
        ),
        (
            "scopes_trailing_space",
            json!(["complete_code "]),
            "malformed_token",
        ),
        (
            "scopes_leading_tab",
            json!(["\tcomplete_code"]),
            "malformed_token",
        ),
        (
            "scopes_zero_width_space",
            json!(["complete\u{200b}_code"]),
            "insufficient_scope",
        ),
        (
            "scopes_cyrillic_e",
            json!(["compl\u{0435}te_code"]),
            "insufficient_scope",
        ),
        (
            "scopes_fullwidth_underscore",
            json!(["complete\u{ff3f}code"]),
            "insufficient_scope",
        ),
        (
            "scopes_with_nul",
            json!(["complete_code\u{0}"]),
            "malformed_token",
        ),
        (
            "scopes_space_joined",
            json!(["complete_code duo_chat"]),
            "malformed_token",
        ),
        ("scopes_empty", json!([]), "insufficient_scope"),
    ] {
        t.claims_case(name, json!({"scopes": scopes}), want);
    }
    t.claims_case(
        "scopes_missing",
        json!({"scopes": null}),
        "insufficient_scope",
    );

    // Issuers.
    for (name, iss, want) in [
        ("iss_unknown", json!("https://evil.test"), "unknown_issuer"),
        (
            "iss_two_trailing_slashes",
            json!(format!("{ISSUER_A}//")),
            "unknown_issuer",
        ),
        (
            "iss_other_case",
            json!(ISSUER_A.to_uppercase()),
            "unknown_issuer",
        ),
        (
            "iss_with_path",
            json!(format!("{ISSUER_A}/evil")),
            "unknown_issuer",
        ),
        ("iss_number", json!(1), "malformed_token"),
        ("iss_array", json!([ISSUER_A]), "malformed_token"),
        ("iss_without_keys", json!(ISSUER_DOWN), "keys_unavailable"),
    ] {
        t.claims_case(name, json!({"iss": iss}), want);
    }
    t.claims_case("iss_missing", json!({"iss": null}), "unknown_issuer");

    // Segments and their encoding.
    let [h, p, s] = t.segments();
    assert!(
        s.contains(['-', '_']),
        "the signature exercises the URL-safe alphabet"
    );
    let standard_signature = s.replace('-', "+").replace('_', "/");
    let mut non_canonical = s.clone();
    non_canonical.pop();
    non_canonical.push('B'); // 342 characters carry 4 spare bits, which must be zero
    for (name, token) in [
        ("jwe_five_segments", format!("{h}.{p}.{s}.{s}.{s}")),
        ("four_segments", format!("{h}.{p}.{s}.{s}")),
        ("two_segments", format!("{h}.{p}")),
        ("one_segment", h.clone()),
        ("empty_header_segment", format!(".{p}.{s}")),
        ("empty_payload_segment", format!("{h}..{s}")),
        ("empty_signature_segment", format!("{h}.{p}.")),
        ("only_dots", "..".to_string()),
        ("header_padding", format!("{h}=.{p}.{s}")),
        ("payload_padding", format!("{h}.{p}==.{s}")),
        ("signature_padding", format!("{h}.{p}.{s}==")),
        ("plus_in_header", format!("{}+{}.{p}.{s}", &h[..4], &h[4..])),
        (
            "slash_in_payload",
            format!("{h}.{}/{}.{s}", &p[..8], &p[8..]),
        ),
        (
            "signature_standard_alphabet",
            format!("{h}.{p}.{standard_signature}"),
        ),
        (
            "signature_non_canonical_last_char",
            format!("{h}.{p}.{non_canonical}"),
        ),
        (
            "newline_inside_payload",
            format!("{h}.{}\n{}.{s}", &p[..8], &p[8..]),
        ),
        (
            "newline_inside_signature",
            format!("{h}.{p}.{}\n{}", &s[..8], &s[8..]),
        ),
        (
            "carriage_return_inside_header",
            format!("{}\r{}.{p}.{s}", &h[..4], &h[4..]),
        ),
        (
            "space_inside_payload",
            format!("{h}.{} {}.{s}", &p[..8], &p[8..]),
        ),
        (
            "tab_inside_signature",
            format!("{h}.{p}.{}\t{}", &s[..8], &s[8..]),
        ),
        ("trailing_newline", format!("{valid}\n")),
        ("trailing_crlf", format!("{valid}\r\n")),
        ("trailing_dot", format!("{valid}.")),
        ("header_not_json", format!("{}.{p}.{s}", b64("alg=RS256"))),
        (
            "header_json_array",
            format!("{}.{p}.{s}", b64("[\"RS256\"]")),
        ),
        ("payload_json_null", format!("{h}.{}.{s}", b64("null"))),
        ("payload_json_array", format!("{h}.{}.{s}", b64("[]"))),
        (
            "payload_not_utf8",
            format!(
                "{h}.{}.{s}",
                URL_SAFE_NO_PAD.encode([0xff, 0xfe, b'{', b'}'])
            ),
        ),
    ] {
        t.token(name, &token, "malformed_token");
    }
    // The signature is right for some other input: a different payload or token.
    let other = keys
        .a
        .sign(&t.claims_with(json!({"scopes": ["complete_code", "everything"]})));
    let [oh, op, os] = {
        let parts: Vec<&str> = other.split('.').collect();
        [
            parts[0].to_string(),
            parts[1].to_string(),
            parts[2].to_string(),
        ]
    };
    assert_eq!(oh, h);
    for (name, token) in [
        ("swapped_payload", format!("{h}.{op}.{s}")),
        ("swapped_signature", format!("{h}.{p}.{os}")),
        (
            "signature_all_zero_bits",
            format!("{h}.{p}.{}", "A".repeat(s.len())),
        ),
        (
            "signature_one_byte_short",
            format!("{h}.{p}.{}", "A".repeat(340)),
        ),
        (
            "signature_over_header_only",
            format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(a.signature(&h))),
        ),
        (
            "signature_over_payload_only",
            format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(a.signature(&p))),
        ),
        ("signature_doubled", format!("{h}.{p}.{s}{s}")),
    ] {
        t.token(name, &token, "bad_signature");
    }

    // Token size: up to tokens.max_bytes, not one byte more.
    let (at_limit, over_limit) = tokens_around_the_limit(&t);
    t.token("control_token_at_max_bytes", &at_limit, "allow");
    t.token("token_over_max_bytes", &over_limit, "malformed_token");

    // The Authorization header: one, Bearer, one token.
    for (name, value, want) in [
        (
            "authorization_comma_joined",
            format!("Bearer {valid},Bearer {valid}"),
            "malformed_token",
        ),
        (
            "authorization_comma_space_joined",
            format!("Bearer {valid}, Bearer {valid}"),
            "malformed_token",
        ),
        (
            "authorization_two_tokens",
            format!("Bearer {valid} {valid}"),
            "malformed_token",
        ),
        (
            "bearer_without_token",
            "Bearer".to_string(),
            "malformed_token",
        ),
        (
            "bearer_only_blanks",
            "Bearer \t ".to_string(),
            "malformed_token",
        ),
        (
            "bearer_without_separator",
            format!("Bearer{valid}"),
            "missing_token",
        ),
        (
            "bearer_with_colon",
            format!("Bearer: {valid}"),
            "missing_token",
        ),
        (
            "bearer_nbsp_separator",
            format!("Bearer\u{a0}{valid}"),
            "missing_token",
        ),
        ("basic_scheme", format!("Basic {valid}"), "missing_token"),
        ("token_scheme", format!("Token {valid}"), "missing_token"),
        ("dpop_scheme", format!("DPoP {valid}"), "missing_token"),
        ("token_without_scheme", valid.clone(), "missing_token"),
        ("authorization_empty", String::new(), "missing_token"),
        (
            "leading_newline_before_token",
            format!("Bearer \n{valid}"),
            "malformed_token",
        ),
    ] {
        t.auth(name, value, want);
    }
    let bearer = format!("Bearer {valid}");
    t.add(
        "authorization_repeated",
        "POST",
        CODE_PATH,
        std_headers_plus(&[
            ("authorization", bearer.as_bytes()),
            ("authorization", bearer.as_bytes()),
        ]),
        "malformed_token",
    );
    t.add(
        "authorization_repeated_other_case",
        "POST",
        CODE_PATH,
        std_headers_plus(&[
            ("Authorization", bearer.as_bytes()),
            ("authorization", bearer.as_bytes()),
        ]),
        "malformed_token",
    );
    t.add(
        "authorization_missing",
        "POST",
        CODE_PATH,
        std_headers_plus(&[]),
        "missing_token",
    );

    // Bytes that are not UTF-8 (Envoy's raw_value).
    t.auth(
        "non_utf8_after_token",
        bytes(&[bearer.as_bytes(), b"\xff"]),
        "malformed_token",
    );
    t.auth(
        "non_utf8_inside_token",
        bytes(&[
            b"Bearer ",
            h.as_bytes(),
            b"\xc3.",
            p.as_bytes(),
            b".",
            s.as_bytes(),
        ]),
        "malformed_token",
    );
    t.auth("non_utf8_authorization", b"\xff\xfe\xfd", "missing_token");
    t.auth(
        "latin1_scheme",
        bytes(&[b"B\xe9arer ", valid.as_bytes()]),
        "missing_token",
    );
    t.auth_with(
        "non_utf8_instance_id",
        &bearer,
        &[(
            "x-gitlab-instance-id",
            &bytes(&[INSTANCE.as_bytes(), b"\xff"]),
        )],
        "header_mismatch",
    );
    t.auth_with(
        "non_utf8_realm",
        &bearer,
        &[("x-gitlab-realm", b"self-managed\xc3")],
        "header_mismatch",
    );

    // The headers a token is bound to.
    t.auth_with(
        "instance_id_missing",
        &bearer,
        &[("x-gitlab-instance-id", b"")],
        "header_mismatch",
    );
    t.auth_with(
        "instance_id_other_case",
        &bearer,
        &[("x-gitlab-instance-id", b"TEST-INSTANCE-ID")],
        "header_mismatch",
    );
    t.auth_with(
        "instance_id_trailing_space",
        &bearer,
        &[("x-gitlab-instance-id", b"test-instance-id ")],
        "header_mismatch",
    );
    t.add(
        "instance_id_repeated",
        "POST",
        CODE_PATH,
        vec![
            ("authorization", bearer.as_bytes().to_vec()),
            ("x-gitlab-realm", b"self-managed".to_vec()),
            ("x-gitlab-instance-id", INSTANCE.as_bytes().to_vec()),
            ("x-gitlab-instance-id", INSTANCE.as_bytes().to_vec()),
            ("x-gitlab-version", b"17.5.0-ee".to_vec()),
        ],
        "header_mismatch",
    );
    t.auth_with(
        "realm_other",
        &bearer,
        &[("x-gitlab-realm", b"saas")],
        "header_mismatch",
    );
    t.auth_with(
        "authentication_type_upper_case",
        &bearer,
        &[("x-gitlab-authentication-type", b"OIDC")],
        "header_mismatch",
    );
    t.auth_with(
        "user_token_other_user",
        format!("Bearer {user}"),
        &[("x-gitlab-global-user-id", b"user-43")],
        "header_mismatch",
    );
    t.auth(
        "user_token_without_user_header",
        format!("Bearer {user}"),
        "header_mismatch",
    );

    // Unit primitives named by the request.
    let proxy_bearer = format!("Bearer {proxy}");
    for (name, header, want) in [
        (
            "unit_primitive_other_case",
            &b"DUO_CHAT"[..],
            "bad_unit_primitive",
        ),
        (
            "unit_primitive_unknown",
            b"everything",
            "bad_unit_primitive",
        ),
        (
            "unit_primitive_comma_list",
            b"duo_chat,complete_code",
            "bad_unit_primitive",
        ),
        (
            "unit_primitive_not_granted",
            b"explain_vulnerability",
            "insufficient_scope",
        ),
        ("unit_primitive_missing", b"", "bad_unit_primitive"),
        (
            "unit_primitive_not_utf8",
            b"duo_chat\xff",
            "bad_unit_primitive",
        ),
    ] {
        t.request_with(
            name,
            PROXY_PATH,
            Some(proxy_bearer.as_bytes()),
            &[("x-gitlab-unit-primitive", header)],
            want,
        );
    }
    for (name, version) in [
        ("version_too_old", &b"17.2.0-ee"[..]),
        ("version_garbage", b"latest"),
        ("version_overflow", b"99999999999999999999.0.0"),
        ("version_missing", b""),
    ] {
        t.auth_with(
            name,
            &bearer,
            &[("x-gitlab-version", version)],
            "version_too_old",
        );
    }

    // Paths that try to reach a public route or dodge a protected one.
    for (name, path, want) in [
        (
            "path_dot_segments_from_public",
            "/ai/monitoring/../v2/code/completions",
            "missing_token",
        ),
        (
            "path_encoded_dots_from_public",
            "/ai/monitoring/%2e%2e/v2/code/completions",
            "missing_token",
        ),
        (
            "path_query_names_public",
            "/ai/v2/code/completions?/ai/monitoring/",
            "missing_token",
        ),
        (
            "path_fragment_names_public",
            "/ai/v2/code/completions#/ai/monitoring/",
            "missing_token",
        ),
        (
            "path_encoded_slash",
            "/ai/monitoring%2f..%2fv2/code/completions",
            "bad_path",
        ),
        (
            "path_backslash",
            "/ai/monitoring\\..\\v2/code/completions",
            "bad_path",
        ),
        ("path_above_root", "/../ai/monitoring/x", "bad_path"),
        (
            "path_absolute_url",
            "http://evil.test/ai/monitoring/x",
            "bad_path",
        ),
        ("path_unknown", "/ai/v3/anything", "no_route"),
    ] {
        t.add(name, "POST", path, std_headers_plus(&[]), want);
    }

    // One canonical path: with `path: /ai/v1/models/m:generate` (duo_chat) under
    // `prefix: /ai/v1/` (complete_code), no spelling of the protected path reaches the
    // broader route with a complete_code token, and HEAD does not dodge a GET-only route.
    let code_only = format!(
        "Bearer {}",
        t.keys
            .a
            .sign(&t.claims_with(json!({"scopes": ["complete_code"]})))
    );
    let code_only = code_only.as_bytes();
    for (name, method, path, want) in [
        (
            "control_path_broader_route",
            "POST",
            "/ai/v1/models/other",
            "allow",
        ),
        (
            "path_protected_plain",
            "POST",
            "/ai/v1/models/m:generate",
            "insufficient_scope",
        ),
        (
            "path_protected_escaped_colon",
            "POST",
            "/ai/v1/models/m%3Agenerate",
            "insufficient_scope",
        ),
        (
            "path_protected_escaped_colon_lower",
            "POST",
            "/ai/v1/models/m%3agenerate",
            "insufficient_scope",
        ),
        (
            "path_protected_escaped_letter",
            "POST",
            "/ai/v1/models/%6d:generate",
            "insufficient_scope",
        ),
        (
            "path_protected_trailing_slash",
            "POST",
            "/ai/v1/models/m:generate/",
            "insufficient_scope",
        ),
        (
            "path_protected_trailing_dot",
            "POST",
            "/ai/v1/models/m:generate/.",
            "insufficient_scope",
        ),
        (
            "path_protected_dot_dot",
            "POST",
            "/ai/v1/models/x/../m:generate",
            "insufficient_scope",
        ),
        (
            "path_protected_parameter",
            "POST",
            "/ai/v1/models/m:generate;x=1",
            "bad_path",
        ),
        (
            "path_protected_parameter_escaped",
            "POST",
            "/ai/v1/models/m:generate%3Bx=1",
            "bad_path",
        ),
        (
            "path_protected_double_escape",
            "POST",
            "/ai/v1/models/m%253Agenerate",
            "bad_path",
        ),
        (
            "path_protected_overlong_dot",
            "POST",
            "/ai/v1/models/x/%c0%ae%c0%ae/m:generate",
            "bad_path",
        ),
        (
            "path_protected_head_for_get",
            "HEAD",
            "/ai/v2/settings",
            "insufficient_scope",
        ),
        (
            "path_protected_other_method",
            "POST",
            "/ai/v2/settings",
            "no_route",
        ),
        (
            "path_dots_after_empty_segment",
            "GET",
            "/ai/v2/x//../../monitoring/y",
            "bad_path",
        ),
        (
            "path_servlet_parameter_dots",
            "GET",
            "/ai/monitoring/..;/v2/settings",
            "bad_path",
        ),
    ] {
        t.method_request_with(name, method, path, Some(code_only), &[], want);
    }

    t.cases
}

/// `none` → `none`, `None` → `none_capitalized`, ...: file names that differ by more
/// than case (seed files live on case-insensitive file systems too).
fn spelling_tag(spelling: &str) -> String {
    match spelling {
        "none" => "none".into(),
        "None" => "none_capitalized".into(),
        "NONE" => "none_upper".into(),
        _ => "none_mixed".into(),
    }
}

pub fn std_headers_plus<'a>(extra: &[(&'a str, &[u8])]) -> Vec<(&'a str, Vec<u8>)> {
    let mut headers: Vec<(&str, Vec<u8>)> = STD_HEADERS
        .iter()
        .map(|(k, v)| (*k, v.as_bytes().to_vec()))
        .collect();
    headers.extend(extra.iter().map(|(k, v)| (*k, v.to_vec())));
    headers
}

/// The longest valid token that fits `tokens.max_bytes` and the shortest that does not.
fn tokens_around_the_limit(t: &Table<'_>) -> (String, String) {
    let mut fits = None;
    for pad in (5_000..8_000).rev() {
        let token = t
            .keys
            .a
            .sign(&t.claims_with(json!({"pad": "x".repeat(pad)})));
        if token.len() <= MAX_TOKEN_BYTES {
            assert!(token.len() >= MAX_TOKEN_BYTES - 2, "{}", token.len());
            let over = t
                .keys
                .a
                .sign(&t.claims_with(json!({"pad": "x".repeat(pad + 3)})));
            assert!(over.len() > MAX_TOKEN_BYTES && over.len() <= MAX_TOKEN_BYTES + 6);
            fits = Some((token, over));
            break;
        }
    }
    fits.expect("a pad length reaches the limit")
}

pub fn real_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
