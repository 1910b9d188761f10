//! Target `decide`: bytes → a request ([`DecideInput`]) → `decide` against the fixed
//! world, once with the headers as a list (Envoy's `header_map`) and once as Envoy's
//! joined `headers` map.
//!
//! Oracles: no panic; both header forms decide the same; and an allow is checked by code
//! that shares nothing with the crate's verification: a token allow needs one
//! Authorization header whose bearer token carries an RS256 signature that verifies
//! under a key of the issuer the decision names, over a payload that is not expired and
//! is meant for the audience; a public allow needs a path under the public prefix.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use connector_authz::decide::decide;
use connector_authz::decision::{Decision, Headers, Identity, Request};
use serde_json::Value;

use super::env::{AUDIENCE, Env, LEEWAY, NOW};
use super::input::{DecideInput, lossy};

/// Runs one input; returns the decision (of the list form) as its reason word, or `allow`.
pub fn run(env: &Env, data: &[u8]) -> String {
    let input = DecideInput::parse(data);
    let method = lossy(&input.method);
    let path = lossy(&input.path);
    let list = input.text_headers();
    let map = input.joined_headers();
    let decide_with = |headers: &dyn Headers| {
        let request = Request {
            method: &method,
            path: &path,
            headers,
        };
        decide(&env.snapshot, &request, Env::now())
    };
    let from_list = decide_with(&list);
    let from_map = decide_with(&map);
    if map.len() == list.len() {
        assert_eq!(
            from_list.reason(),
            from_map.reason(),
            "the two header forms decide differently: {from_list:?} / {from_map:?}"
        );
    } else {
        // A repeated header is `Repeated` in the list but comma-joined in the map, which
        // can change the reason (two Authorization headers, the first not Bearer:
        // malformed_token / missing_token); it must not change the outcome.
        assert_eq!(
            from_list.is_allow(),
            from_map.is_allow(),
            "the two header forms decide differently: {from_list:?} / {from_map:?}"
        );
    }
    for decision in [&from_list, &from_map] {
        if let Decision::Allow(allowed) = decision {
            match &allowed.identity {
                Some(identity) => check_token_allow(env, &input, identity),
                None => check_public_allow(&path),
            }
        }
    }
    match from_list.reason() {
        Some(reason) => reason.as_str().to_string(),
        None => "allow".to_string(),
    }
}

fn check_token_allow(env: &Env, input: &DecideInput, identity: &Identity) {
    let authorization: Vec<String> = input
        .text_headers()
        .into_iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        authorization.len(),
        1,
        "allowed without exactly one Authorization header"
    );
    let value = authorization[0].trim_matches([' ', '\t']);
    let after_scheme = value
        .get(..6)
        .filter(|scheme| scheme.eq_ignore_ascii_case("bearer"))
        .map(|_| &value[6..])
        .expect("allowed without a Bearer scheme");
    assert!(
        after_scheme.starts_with([' ', '\t']),
        "allowed without a space after the scheme: {value:?}"
    );
    let token = after_scheme.trim_matches([' ', '\t']);
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "allowed a token that is not three segments");
    let signing_input = &token[..parts[0].len() + 1 + parts[1].len()];
    let signature = URL_SAFE_NO_PAD
        .decode(parts[2])
        .expect("allowed a token whose signature is not base64url");
    let issuer = env
        .keys
        .issuer_that_verifies(signing_input.as_bytes(), &signature)
        .expect("allowed a token that no key of the fixed world signed");
    assert_eq!(
        &*identity.issuer, issuer,
        "allowed as one issuer with a signature by another's key"
    );

    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(parts[0])
            .expect("allowed a token whose header is not base64url"),
    )
    .expect("allowed a token whose header is not JSON");
    assert_eq!(
        header["alg"], "RS256",
        "allowed an algorithm other than RS256"
    );
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(parts[1])
            .expect("allowed a token whose payload is not base64url"),
    )
    .expect("allowed a token whose payload is not JSON");
    let iss = claims["iss"].as_str().expect("allowed a token without iss");
    assert_eq!(
        iss.strip_suffix('/').unwrap_or(iss),
        issuer,
        "iss is not the signer's issuer"
    );
    let exp = claims["exp"]
        .as_f64()
        .expect("allowed a token without a numeric exp");
    assert!(
        exp + LEEWAY as f64 > NOW as f64,
        "allowed an expired token (exp {exp})"
    );
    let audience_ok = match &claims["aud"] {
        Value::String(aud) => aud == AUDIENCE,
        Value::Array(all) => all.iter().any(|a| a == AUDIENCE),
        _ => false,
    };
    assert!(
        audience_ok,
        "allowed a token for another audience: {}",
        claims["aud"]
    );
    let scopes: Vec<&str> = claims["scopes"]
        .as_array()
        .map(|all| all.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        identity.scopes.iter().all(|s| scopes.contains(&s.as_str())),
        "the allow reports scopes the token does not hold"
    );
    if let Some(named) = &identity.unit_primitive {
        assert!(
            scopes.contains(&named.as_str()),
            "allowed a unit primitive not in scopes"
        );
    }
}

/// A public allow: the path, decoded and resolved naively, lies under the public prefix.
fn check_public_allow(path: &str) {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let mut segments: Vec<Vec<u8>> = Vec::new();
    for raw in percent_decode(path.as_bytes()).split(|&b| b == b'/') {
        match raw {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            s => segments.push(s.to_vec()),
        }
    }
    assert!(
        segments.len() >= 2 && segments[0] == b"ai" && segments[1] == b"monitoring",
        "a public allow for a path outside the public prefix: {path:?}"
    );
}

fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
        match (bytes[i], hex) {
            (b'%', Some(h)) => {
                out.push(u8::from_str_radix(h, 16).unwrap_or_default());
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}
