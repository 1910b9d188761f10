//! Every bound on hostile or broken input, at its number: each is a clear deny or a clear
//! load error. SECURITY.md lists them; this file is the proof. No test here times anything:
//! how fast a lookup or a decision is, is measured by the benchmarks (`benches/`).
//! (The Authorization header and header floods are in `tests/adversarial.rs`, an
//! issuer's endless or oversized HTTP body in `tests/keys_fetch.rs`.)

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use connector_authz::config::{Config, MAX_CONFIG_BYTES, MAX_ROUTES};
use connector_authz::decide::{Snapshot, decide};
use connector_authz::decision::{Decision, Request};
use connector_authz::keys::jwks::{JwksError, KeyLimits, MAX_RSA_BITS, parse_key_set};
use connector_authz::keys::{KeySnapshot, KeySource};
use connector_authz::registry::Registry;
use serde_json::json;

fn load(text: &str) -> Result<Config, String> {
    Config::from_yaml(text, Path::new("/limits/connector-authz.yaml")).map_err(|e| e.to_string())
}

const HEAD: &str = "issuers: [{url: https://gitlab.com}]\n";

fn backend(routes: &str) -> String {
    format!("{HEAD}backends:\n  - name: a\n    audience: aud\n    routes:\n{routes}")
}

#[test]
fn config_text_over_one_mib_is_refused() {
    let mut text = backend("      - {prefix: /, public: true}\n");
    text.push('#');
    text.push_str(&"x".repeat(MAX_CONFIG_BYTES - text.len()));
    assert_eq!(text.len(), MAX_CONFIG_BYTES);
    load(&text).expect("exactly 1 MiB loads");
    text.push('x');
    let err = load(&text).unwrap_err();
    assert!(err.contains("larger than 1048576 bytes"), "{err}");
}

#[test]
fn ten_thousand_routes_load_and_one_more_is_refused() {
    let mut routes = String::new();
    for i in 0..MAX_ROUTES {
        writeln!(routes, "      - {{path: /r/{i}, require: [x]}}").unwrap();
    }
    let config = load(&backend(&routes)).expect("10,000 routes load");
    assert_eq!(config.routes.routes().len(), MAX_ROUTES);
    for i in 0..1000 {
        assert!(
            config
                .routes
                .find(&format!("/r/{}", i * 7), "GET")
                .is_some()
        );
    }
    routes.push_str("      - {path: /r/one-more, require: [x]}\n");
    let err = load(&backend(&routes)).unwrap_err();
    assert!(err.contains("more than 10000 routes"), "{err}");
}

/// The worst route table a 1 MiB config can hold for lookups: as many distinct prefix
/// lengths as fit, so a long path costs one hash lookup per length. (What that costs is
/// `benches/route.rs`'s catch-all case.)
#[test]
fn the_worst_prefix_table_loads_and_still_decides() {
    let mut routes = String::new();
    let mut len = 3;
    while routes.len() + len + 40 < MAX_CONFIG_BYTES - 200 {
        writeln!(
            routes,
            "      - {{prefix: /{}/, require: [x]}}",
            "p".repeat(len - 2)
        )
        .unwrap();
        len += 1;
    }
    let config = load(&backend(&routes)).expect("loads");
    let lengths = config.routes.routes().len();
    assert!(lengths > 1000, "{lengths} prefixes");
    let snapshot = Snapshot::new(Arc::new(config), Arc::new(KeySnapshot::default()));
    let headers: Vec<(String, String)> = Vec::new();
    let reason = |path: &str| {
        let request = Request {
            method: "GET",
            path,
            headers: &headers,
        };
        decide(&snapshot, &request, SystemTime::now())
            .reason()
            .map_or("allow", |r| r.as_str())
    };
    assert_eq!(reason(&format!("/{}x", "p".repeat(len + 10))), "no_route");
    // A path under the longest prefix is routed (to a route that wants a token).
    assert_eq!(
        reason(&format!("/{}/x", "p".repeat(len - 3))),
        "missing_token"
    );
}

#[test]
fn yaml_alias_bombs_deep_nesting_and_many_documents_are_refused() {
    // A billion-laughs bomb inside a key the loader must read.
    let mut bomb = String::from(HEAD);
    bomb.push_str("backends:\n  - name: a\n    audience: aud\n    routes:\n      - prefix: /\n        require: &l0 [x, x, x, x, x, x, x, x, x, x]\n");
    for level in 1..10 {
        let refs = vec![format!("*l{}", level - 1); 10].join(", ");
        writeln!(
            bomb,
            "      - prefix: /{level}/\n        require: &l{level} [{refs}]"
        )
        .unwrap();
    }
    let err = load(&bomb).unwrap_err();
    assert!(err.contains("connector-authz.yaml"), "{err}");
    // More than 1,000 aliases.
    let aliases = vec!["*x"; 1001].join(", ");
    let many = backend(&format!(
        "      - prefix: /\n        require: [&x a, {aliases}]\n"
    ));
    assert!(load(&many).is_err());
    // Nesting deeper than 32, in flow and in block style.
    let deep = format!(
        "{HEAD}backends: {}{}\n",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert!(load(&deep).is_err());
    let mut block = String::from(HEAD);
    block.push_str("backends:\n");
    for depth in 0..100 {
        writeln!(block, "{}- ", "  ".repeat(depth)).unwrap();
    }
    assert!(load(&block).is_err());
    // A second document.
    let two = format!(
        "{}---\n{}",
        backend("      - {prefix: /, public: true}\n"),
        HEAD
    );
    assert!(load(&two).is_err());
}

#[test]
fn token_max_bytes_is_configurable_only_within_bounds() {
    let with = |n: usize| {
        load(&format!(
            "{HEAD}tokens: {{max_bytes: {n}}}\nbackends: [{{name: a, audience: b, routes: [{{prefix: /, public: true}}]}}]\n"
        ))
    };
    assert_eq!(with(512).unwrap().tokens.max_bytes, 512);
    assert_eq!(with(65536).unwrap().tokens.max_bytes, 65536);
    for bad in [0, 511, 65537, 1 << 40] {
        let err = with(bad).unwrap_err();
        assert!(err.contains("choose between 512 and 65536"), "{err}");
    }
}

fn rsa_jwk(kid: &str, modulus_bytes: usize) -> serde_json::Value {
    let mut n = vec![0xc5u8; modulus_bytes];
    n[modulus_bytes - 1] |= 1;
    json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
           "n": URL_SAFE_NO_PAD.encode(&n), "e": "AQAB"})
}

fn parse(bytes: &[u8]) -> Result<usize, JwksError> {
    parse_key_set(
        bytes,
        KeySource::Network,
        SystemTime::now(),
        &KeyLimits::default(),
    )
    .map(|parsed| parsed.key_set.keys.len())
}

#[test]
fn key_sets_are_bounded_in_bytes_keys_and_key_size() {
    let limits = KeyLimits::default();
    assert_eq!(
        (limits.max_document_bytes, limits.max_keys),
        (64 * 1024, 100)
    );
    // 100 small keys fit in 64 KiB and are all read; 101 are refused.
    let keys = |count: usize| -> Vec<u8> {
        let keys: Vec<_> = (0..count).map(|i| rsa_jwk(&format!("k{i}"), 256)).collect();
        json!({"keys": keys}).to_string().into_bytes()
    };
    let hundred = keys(100);
    assert!(
        hundred.len() <= limits.max_document_bytes,
        "{}",
        hundred.len()
    );
    assert_eq!(parse(&hundred).unwrap(), 100);
    let err = parse(&keys(101)).unwrap_err();
    assert!(
        matches!(
            err,
            JwksError::TooManyKeys {
                count: 101,
                limit: 100
            }
        ) || matches!(err, JwksError::TooLarge { .. }),
        "{err}"
    );
    // One byte over the document limit, whatever it holds.
    let mut big = b"{\"keys\":[]}".to_vec();
    big.resize(limits.max_document_bytes + 1, b' ');
    assert!(matches!(
        parse(&big),
        Err(JwksError::TooLarge { limit: 65536 })
    ));
    // JSON nested past serde_json's recursion limit is an error, not a stack overflow.
    let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
    assert!(matches!(parse(deep.as_bytes()), Err(JwksError::NotJson(_))));
    // RSA moduli outside 2048..=8192 bits are skipped; a set of only those is an error.
    let sizes = json!({"keys": [rsa_jwk("small", 128), rsa_jwk("huge", MAX_RSA_BITS / 8 + 1)]});
    let err = parse(sizes.to_string().as_bytes()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("no usable signing key") && text.contains("2 skipped"),
        "{text}"
    );
    let symmetric = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]});
    assert!(parse(symmetric.to_string().as_bytes()).is_err());
}

#[test]
fn registry_files_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    // A legacy registry file over 1 MiB.
    let big = dir.path().join("big.yml");
    std::fs::write(&big, format!("# {}\n", "x".repeat(1024 * 1024))).unwrap();
    let err = Registry::load(&big).unwrap_err();
    assert!(err.to_string().contains("larger than 1024 KiB"), "{err}");
    // An alias bomb hidden in a section the loader otherwise skips.
    let mut bomb = String::from("development:\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    let mut prev = 'a';
    for level in 'b'..='k' {
        writeln!(
            bomb,
            "  {level}: &{level} [{}]",
            vec![format!("*{prev}"); 10].join(", ")
        )
        .unwrap();
        prev = level;
    }
    let path = dir.path().join("bomb.yml");
    std::fs::write(&path, bomb).unwrap();
    let err = Registry::load(&path).unwrap_err();
    assert!(err.to_string().contains("budget"), "{err}");
}

#[test]
fn a_huge_or_pathological_path_is_decided() {
    let text = backend(
        "      - {prefix: /ai/monitoring/, public: true}\n      - {prefix: /ai/, require: [x]}\n",
    );
    let snapshot = Snapshot::new(
        Arc::new(load(&text).unwrap()),
        Arc::new(KeySnapshot::default()),
    );
    let headers: Vec<(String, String)> = Vec::new();
    let decide_path = |path: &str| -> Decision {
        let request = Request {
            method: "GET",
            path,
            headers: &headers,
        };
        decide(&snapshot, &request, UNIX_EPOCH + Duration::from_secs(1))
    };
    let climbing = format!("/ai/monitoring/{}x", "a/../".repeat(200_000));
    assert!(decide_path(&climbing).is_allow());
    let escapes = format!("/ai/{}", "%2e%2E/".repeat(150_000));
    assert_eq!(decide_path(&escapes).reason().unwrap().as_str(), "bad_path");
    let slashes = format!("/ai/{}v2", "/".repeat(1 << 20));
    assert_eq!(
        decide_path(&slashes).reason().unwrap().as_str(),
        "missing_token"
    );
}
