//! `decide` on the paths that matter, and the bare RS256 verification as the reference
//! measured in the same run.
//!
//!   cargo bench --bench decide -- --warm-up-time 1 --measurement-time 3
//!
//! See BENCHMARKS.md for the figures and what limits them.

mod common;

use std::hint::black_box;
use std::time::SystemTime;

use connector_authz::decide::{decide, decide_cached};
use connector_authz::decision::Request;
use connector_authz::token_cache::TokenCache;
use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, DecodingKey};

fn bench_decide(c: &mut Criterion) {
    let snapshot = common::snapshot();
    let good = common::token("bench-1");
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    let forged = common::wrong_key().sign(&common::claims("bench-1", &common::SCOPES, 3600));
    parts[2] = forged.rsplit('.').next().expect("signature").to_string();
    let bad_signature = parts.join(".");
    let no_scope = common::key().sign(&common::claims("bench-2", &["duo_chat"], 3600));

    let with_good = common::envoy_headers(Some(&good));
    let without_token = common::envoy_headers(None);
    let with_bad_signature = common::envoy_headers(Some(&bad_signature));
    let with_no_scope = common::envoy_headers(Some(&no_scope));
    let request = |headers| Request {
        method: "POST",
        path: common::PATH,
        headers,
    };
    let cache = TokenCache::new(10_000, 32 << 20);
    let now = SystemTime::now();
    assert!(decide_cached(&snapshot, &request(&with_good), now, &cache).is_allow());
    assert!(decide(&snapshot, &request(&with_good), now).is_allow());
    assert_eq!(
        decide(&snapshot, &request(&with_bad_signature), now)
            .reason()
            .map(|r| r.as_str()),
        Some("bad_signature")
    );

    let mut group = c.benchmark_group("decide");
    group.bench_function("allow_cached", |b| {
        let req = request(&with_good);
        b.iter(|| decide_cached(&snapshot, black_box(&req), now, &cache))
    });
    group.bench_function("allow_uncached", |b| {
        let req = request(&with_good);
        b.iter(|| decide(&snapshot, black_box(&req), now))
    });
    group.bench_function("deny_missing_token", |b| {
        let req = request(&without_token);
        b.iter(|| decide_cached(&snapshot, black_box(&req), now, &cache))
    });
    group.bench_function("deny_bad_signature", |b| {
        let req = request(&with_bad_signature);
        b.iter(|| decide_cached(&snapshot, black_box(&req), now, &cache))
    });
    group.bench_function("deny_insufficient_scope_cached", |b| {
        let req = request(&with_no_scope);
        b.iter(|| decide_cached(&snapshot, black_box(&req), now, &cache))
    });
    group.bench_function("deny_insufficient_scope_uncached", |b| {
        let req = request(&with_no_scope);
        b.iter(|| decide(&snapshot, black_box(&req), now))
    });

    // The reference: the one RSA-2048 verification an uncached allow cannot avoid, with
    // the same backend (jsonwebtoken on aws-lc-rs) and the same token.
    let jwk: jsonwebtoken::jwk::Jwk =
        serde_json::from_value(common::key().public_jwk()).expect("jwk");
    let decoding = DecodingKey::from_jwk(&jwk).expect("decoding key");
    let (signing_input, signature) = good.rsplit_once('.').expect("three segments");
    assert!(
        jsonwebtoken::crypto::verify(
            signature,
            signing_input.as_bytes(),
            &decoding,
            Algorithm::RS256
        )
        .expect("verify")
    );
    group.bench_function("rs256_verify_bare", |b| {
        b.iter(|| {
            jsonwebtoken::crypto::verify(
                black_box(signature),
                black_box(signing_input.as_bytes()),
                &decoding,
                Algorithm::RS256,
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench_decide);
criterion_main!(benches);
