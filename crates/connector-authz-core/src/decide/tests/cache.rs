//! `decide_cached` with a [`TokenCache`]: what a hit skips, what it never skips, and when
//! an entry stops being used. (Every case of the decision table also runs through a cold
//! and a warm cache in `decide_with`.)

use std::time::SystemTime;

use jsonwebtoken::Algorithm;

use super::*;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn mk_cache() -> TokenCache {
    TokenCache::new(16, 1 << 20)
}

/// (hits, misses, entries)
fn counts(cache: &TokenCache) -> (u64, u64, usize) {
    (cache.hits(), cache.misses(), cache.len())
}

fn uncached(snapshot: &Snapshot, token: &str) -> Decision {
    decide_in(
        snapshot,
        TokenCache::disabled(),
        at(NOW),
        CODE,
        Some(token),
        &[],
    )
}

fn with_keys(snapshot: &Snapshot, keys: &[&DevKey]) -> Snapshot {
    let set = DevKey::key_set(keys, KeySource::Network, UNIX_EPOCH);
    let keys = snapshot.keys.with_issuer(ISS.into(), Arc::new(set));
    Snapshot::new(Arc::clone(&snapshot.config), Arc::new(keys))
}

#[test]
fn a_verified_token_is_cached_then_hit() {
    let snap = snapshot();
    let cache = mk_cache();
    let token = key(1).sign(&claims());
    let first = decide_in(&snap, &cache, at(NOW), CODE, Some(&token), &[]);
    assert!(first.is_allow(), "{first:?}");
    assert_eq!(counts(&cache), (0, 1, 1));
    let second = decide_in(&snap, &cache, at(NOW + 1), CODE, Some(&token), &[]);
    assert_eq!(second, first);
    assert_eq!(counts(&cache), (1, 1, 1));
}

#[test]
fn every_check_after_the_signature_still_runs_on_a_hit() {
    let snap = snapshot();
    let cache = mk_cache();
    let token = key(1).sign(&claims());
    assert!(decide_in(&snap, &cache, at(NOW), CODE, Some(&token), &[]).is_allow());
    let on_hit = |snapshot: &Snapshot, path: &str, extra: &[(&str, &str)]| {
        let hits = cache.hits();
        let d = decide_in(snapshot, &cache, at(NOW), path, Some(&token), extra);
        assert_eq!(
            cache.hits(),
            hits + 1,
            "expected a hit for {path} {extra:?}"
        );
        reason(&d)
    };
    assert_eq!(
        on_hit(&snap, CODE, &[("x-gitlab-realm", "saas")]),
        "header_mismatch"
    );
    assert_eq!(
        on_hit(&snap, CODE, &[("x-gitlab-instance-id", "other")]),
        "header_mismatch"
    );
    assert_eq!(
        on_hit(
            &snap,
            "/ai/v1/proxy/x",
            &[("x-gitlab-unit-primitive", "duo_chat")]
        ),
        "insufficient_scope"
    );
    assert_eq!(
        on_hit(&snap, CODE, &[("x-gitlab-version", "16.0.0")]),
        "version_too_old"
    );
    let mut other_audience = snap.clone();
    Arc::make_mut(&mut other_audience.config).backends[0].audience = "another-backend".into();
    assert_eq!(on_hit(&other_audience, CODE, &[]), "wrong_audience");
    // And the token still allows where it should.
    assert_eq!(on_hit(&snap, CODE, &[]), "allow");
}

#[test]
fn an_entry_expires_with_its_token_and_the_leeway() {
    let snap = snapshot();
    let cache = mk_cache();
    let token = key(1).sign(&change(claims(), json!({"exp": NOW + 60})));
    assert!(decide_in(&snap, &cache, at(NOW), CODE, Some(&token), &[]).is_allow());
    // 30 s of leeway: still good 89 s later, from the cache.
    assert!(decide_in(&snap, &cache, at(NOW + 89), CODE, Some(&token), &[]).is_allow());
    assert_eq!(counts(&cache), (1, 1, 1));
    let late = decide_in(&snap, &cache, at(NOW + 90), CODE, Some(&token), &[]);
    assert_eq!(reason(&late), "expired");
    assert_eq!(
        cache.len(),
        0,
        "the expired entry is dropped, and not put back"
    );
    assert_eq!(cache.hits(), 1);
}

#[test]
fn an_entry_goes_when_the_key_that_verified_it_leaves_the_key_set() {
    let snap = snapshot();
    let cache = mk_cache();
    let token = key(1).sign(&claims());
    assert!(decide_in(&snap, &cache, at(NOW), CODE, Some(&token), &[]).is_allow());

    // Another key published beside it: the entry stays good.
    let both = with_keys(&snap, &[&key(1), &key(2)]);
    assert!(decide_in(&both, &cache, at(NOW), CODE, Some(&token), &[]).is_allow());
    assert_eq!(counts(&cache), (1, 1, 1));

    // Rotated out: decided as without a cache (unknown key, a refresh asked for).
    let rotated = with_keys(&snap, &[&key(2)]);
    let d = decide_in(&rotated, &cache, at(NOW), CODE, Some(&token), &[]);
    assert_eq!(d, uncached(&rotated, &token));
    assert_eq!(reason(&d), "unknown_key");
    assert_eq!(cache.len(), 0);

    // Back again: verified and cached anew.
    assert!(decide_in(&snap, &cache, at(NOW), CODE, Some(&token), &[]).is_allow());
    assert_eq!(cache.len(), 1);
}

#[test]
fn the_same_key_material_under_another_kid_is_not_a_hit() {
    let snap = snapshot();
    let cache = mk_cache();
    let token = key(1).sign(&claims());
    assert!(decide_in(&snap, &cache, at(NOW), CODE, Some(&token), &[]).is_allow());
    let renamed = DevKey::from_pkcs8_pem(
        include_str!("../../../../../tests/fixtures/keys/test-rsa-2048-1.pem"),
        "renamed",
    )
    .unwrap();
    let renamed = with_keys(&snap, &[&renamed]);
    let d = decide_in(&renamed, &cache, at(NOW), CODE, Some(&token), &[]);
    assert_eq!(reason(&d), "unknown_key");
    assert_eq!(cache.hits(), 0);
}

#[test]
fn a_kid_less_token_hits_only_while_its_key_is_among_those_tried() {
    let snap = snapshot();
    let cache = mk_cache();
    let header = json!({"alg": "RS256", "typ": "JWT"});
    let token = key(1).sign_with_header(&header, &claims());
    assert!(decide_in(&snap, &cache, at(NOW), CODE, Some(&token), &[]).is_allow());
    assert!(decide_in(&snap, &cache, at(NOW), CODE, Some(&token), &[]).is_allow());
    assert_eq!(counts(&cache), (1, 1, 1));
    let rotated = with_keys(&snap, &[&key(2)]);
    let d = decide_in(&rotated, &cache, at(NOW), CODE, Some(&token), &[]);
    assert_eq!(reason(&d), "bad_signature");
    assert_eq!(cache.len(), 0);
}

#[test]
fn a_tampered_token_sharing_a_prefix_never_hits() {
    let snap = snapshot();
    let cache = mk_cache();
    let good = key(1).sign(&claims());
    assert!(decide_in(&snap, &cache, at(NOW), CODE, Some(&good), &[]).is_allow());
    let last = good.chars().last().unwrap();
    let flipped = format!(
        "{}{}",
        &good[..good.len() - 1],
        if last == 'A' { 'B' } else { 'A' }
    );
    let signing_input = &good[..good.rfind('.').unwrap()];
    let other_signature = format!(
        "{signing_input}.{}",
        key(2).sign(&claims()).rsplit('.').next().unwrap()
    );
    for forged in [
        flipped,
        good[..good.len() - 1].to_string(),
        format!("{good}A"),
        signing_input.to_string(),
        format!("{signing_input}."),
        other_signature,
    ] {
        let d = decide_in(&snap, &cache, at(NOW), CODE, Some(&forged), &[]);
        assert!(!d.is_allow(), "{forged}: {d:?}");
        assert_eq!(d, uncached(&snap, &forged), "{forged}");
    }
    assert_eq!(cache.hits(), 0);
    assert_eq!(cache.len(), 1, "only the good token is held");
}

#[test]
fn a_token_that_differs_from_a_cached_one_in_any_one_byte_is_decided_afresh() {
    let snap = snapshot();
    let cache = mk_cache();
    let good = key(1).sign(&claims());
    assert!(decide_in(&snap, &cache, at(NOW), CODE, Some(&good), &[]).is_allow());
    let mut bytes = good.clone().into_bytes();
    for i in 0..bytes.len() {
        let was = bytes[i];
        // Another base64url character, or a dot moved.
        bytes[i] = match was {
            b'A' => b'B',
            b'.' => b'x',
            _ => b'A',
        };
        let changed = String::from_utf8(bytes.clone()).unwrap();
        let d = decide_in(&snap, &cache, at(NOW), CODE, Some(&changed), &[]);
        assert_eq!(d, uncached(&snap, &changed), "byte {i}");
        bytes[i] = was;
    }
    assert_eq!(
        cache.hits(),
        0,
        "no changed token was taken for the cached one"
    );
    assert!(decide_in(&snap, &cache, at(NOW), CODE, Some(&good), &[]).is_allow());
    assert_eq!(cache.hits(), 1);
}

#[test]
fn failed_verifications_are_never_cached() {
    let snap = snapshot();
    let cache = mk_cache();
    let good = key(1).sign(&claims());
    let mut bad_signature: Vec<&str> = good.split('.').collect();
    let other = key(2).sign(&claims());
    bad_signature[2] = other.rsplit('.').next().unwrap();
    let bad_signature = bad_signature.join(".");
    let tokens = [
        bad_signature,
        key(2).sign(&claims()), // kid k2 is not the issuer's
        key(1).sign(&change(claims(), json!({"iss": "https://evil.test"}))),
        key(1).sign(&change(claims(), json!({"exp": NOW - 31}))),
        format!(
            "{}.{}.c2ln",
            b64url(r#"{"alg":"none"}"#),
            b64url(&claims().to_string())
        ),
        "abc.def.ghi".to_string(),
    ];
    for token in &tokens {
        for _ in 0..2 {
            let d = decide_in(&snap, &cache, at(NOW), CODE, Some(token), &[]);
            assert!(!d.is_allow(), "{token}: {d:?}");
        }
    }
    assert_eq!(cache.len(), 0);
    assert_eq!(cache.hits(), 0);
}

#[test]
fn the_cache_is_bounded_in_entries_and_in_bytes() {
    let snap = snapshot();
    let token = |i: usize| key(1).sign(&change(claims(), json!({"jti": format!("jti-{i}")})));
    let tokens: Vec<String> = (0..40).map(token).collect();

    let by_entries = TokenCache::new(4, 1 << 20);
    for t in &tokens {
        assert!(decide_in(&snap, &by_entries, at(NOW), CODE, Some(t), &[]).is_allow());
        assert!(by_entries.len() <= 4, "{} entries", by_entries.len());
    }
    assert!(by_entries.len() >= 2, "{} entries", by_entries.len());

    // An entry is a few hundred bytes (the token is not held): 8 KiB holds a few dozen.
    let bytes = 8 * 1024;
    let by_bytes = TokenCache::new(1_000, bytes);
    for t in &tokens {
        assert!(decide_in(&snap, &by_bytes, at(NOW), CODE, Some(t), &[]).is_allow());
        assert!(by_bytes.weight() <= bytes, "{} bytes", by_bytes.weight());
    }
    assert!(by_bytes.len() >= 8, "{} entries", by_bytes.len());
    assert!(by_bytes.len() < tokens.len(), "{} entries", by_bytes.len());
}

#[test]
fn configuration_changes_apply_to_cached_tokens() {
    let snap = snapshot();
    let cache = mk_cache();
    let token = key(1).sign(&claims());
    assert!(decide_in(&snap, &cache, at(NOW), CODE, Some(&token), &[]).is_allow());
    let mut es256_only = snap.clone();
    Arc::make_mut(&mut es256_only.config).tokens.algorithms = vec![Algorithm::ES256];
    let d = decide_in(&es256_only, &cache, at(NOW), CODE, Some(&token), &[]);
    assert_eq!(reason(&d), "unsupported_algorithm");
    assert_eq!(cache.hits(), 0);
}

#[test]
fn a_disabled_cache_holds_and_counts_nothing() {
    let snap = snapshot();
    let cache = TokenCache::new(0, 1 << 20);
    let token = key(1).sign(&claims());
    for _ in 0..2 {
        assert!(decide_in(&snap, &cache, at(NOW), CODE, Some(&token), &[]).is_allow());
    }
    assert!(!cache.is_enabled());
    assert_eq!(counts(&cache), (0, 0, 0));
}

#[test]
fn concurrent_hits_agree() {
    let snap = snapshot();
    let cache = mk_cache();
    let token = key(1).sign(&claims());
    let expected = decide_in(&snap, &cache, at(NOW), CODE, Some(&token), &[]);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..100 {
                    let d = decide_in(&snap, &cache, at(NOW), CODE, Some(&token), &[]);
                    assert_eq!(d, expected);
                }
            });
        }
    });
    assert_eq!(counts(&cache), (400, 1, 1));
}

#[test]
fn hits_and_misses_reach_the_counters_given() {
    // The sidecar passes its metrics' counters here; its metrics tests check their names.
    use prometheus_client::metrics::counter::Counter;
    let (hits, misses) = (Counter::<u64>::default(), Counter::<u64>::default());
    let cache = TokenCache::new(16, 1 << 20).counting_into(hits.clone(), misses.clone());
    let snap = snapshot();
    let token = key(1).sign(&claims());
    for _ in 0..3 {
        assert!(decide_in(&snap, &cache, at(NOW), CODE, Some(&token), &[]).is_allow());
    }
    assert_eq!((hits.get(), misses.get()), (2, 1));
}

#[test]
fn another_key_under_the_same_kid_is_not_a_hit() {
    let snap = snapshot();
    let cache = mk_cache();
    let token = key(1).sign(&claims());
    assert!(decide_in(&snap, &cache, at(NOW), CODE, Some(&token), &[]).is_allow());
    // The issuer now publishes other key material as k1: the token must verify again.
    let impostor = DevKey::from_pkcs8_pem(
        include_str!("../../../../../tests/fixtures/keys/test-rsa-2048-2.pem"),
        "k1",
    )
    .unwrap();
    let replaced = with_keys(&snap, &[&impostor]);
    let d = decide_in(&replaced, &cache, at(NOW), CODE, Some(&token), &[]);
    assert_eq!(d, uncached(&replaced, &token));
    assert_eq!(reason(&d), "bad_signature");
    assert_eq!(cache.hits(), 0);
    assert_eq!(cache.len(), 0);
}
