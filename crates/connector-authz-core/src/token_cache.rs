//! The verified-token cache: a token whose signature has been verified once is not
//! verified again while it lives. Self-managed instances reuse one token for up to three
//! days, so nearly every Check after the first would otherwise spend its time on the same
//! RSA verification.
//!
//! What the cache holds, and what it skips: an entry is the decoded claims of a token
//! whose signature one of its issuer's keys verified, keyed by the **whole token** (a fast
//! seeded hash picks the slot, then the full token is compared byte for byte; nothing is
//! ever matched on a prefix or a digest). A hit skips only the parsing and the signature.
//! Everything after the signature (time window, audience, instance headers, scopes, the
//! route) is still checked on every request by the same code as a miss.
//!
//! A hit is only used while it would have verified again against the snapshot at hand:
//! the algorithm is still allowed, the issuer is still configured, and the key the
//! verification would pick (by `kid`, or among the first keys for a `kid`-less token) is
//! still the one that verified it, by fingerprint. Otherwise the entry is dropped and the
//! token goes through the full check. An entry also goes once its `exp` (plus the leeway)
//! has passed.
//!
//! Only verified tokens are inserted, so a flood of forged or garbled tokens costs
//! verifications but cannot push good entries out. The cache is bounded both in entries
//! and in bytes, and is concurrent without a global lock: `quick_cache` shards it, and a
//! hit takes one shard's read lock.
//!
//! This module does no I/O and knows nothing of tonic; `decide` receives the cache as an
//! argument, so a decision stays a function of its inputs.

use std::mem::size_of;
use std::sync::Arc;

use jsonwebtoken::Algorithm;
use prometheus_client::metrics::counter::Counter;
use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::{DefaultHashBuilder, Weighter};

use crate::config::{Config, TokenSettings};
use crate::keys::KeySnapshot;
use crate::token::{Audience, Claims};
use crate::verify;

/// A token that passed its signature check, and what is needed to tell whether that
/// check still holds.
#[derive(Debug)]
pub struct VerifiedToken {
    pub claims: Claims,
    /// The configured issuer's canonical name (shared with the configuration).
    pub issuer: Arc<str>,
    alg: Algorithm,
    kid: Option<Box<str>>,
    /// The fingerprint of the key that verified the signature.
    key_fingerprint: u64,
    /// Computed once: the weighter runs during eviction and must be cheap.
    footprint: usize,
}

impl VerifiedToken {
    pub fn new(
        claims: Claims,
        issuer: Arc<str>,
        alg: Algorithm,
        kid: Option<&str>,
        key_fingerprint: u64,
    ) -> Self {
        let mut verified = Self {
            claims,
            issuer,
            alg,
            kid: kid.map(Box::from),
            key_fingerprint,
            footprint: 0,
        };
        verified.footprint = verified.measure();
        verified
    }

    /// The algorithm the signature was verified with.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The `kid` of the token's header, if it had one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The fingerprint of the issuer's key that verified the signature.
    pub fn key_fingerprint(&self) -> u64 {
        self.key_fingerprint
    }

    /// Would the uncached check verify this token's signature again with the same key?
    fn still_verifies(&self, config: &Config, keys: &KeySnapshot) -> bool {
        if !config.tokens.algorithms.contains(&self.alg) {
            return false;
        }
        let Some(issuer) = self
            .claims
            .iss
            .as_deref()
            .and_then(|iss| config.issuer(iss))
        else {
            return false;
        };
        if issuer.name != self.issuer {
            return false;
        }
        keys.get(&issuer.name).is_some_and(|set| {
            verify::would_use_key(set, self.kid.as_deref(), self.alg, self.key_fingerprint)
        })
    }

    /// Past `exp` + leeway: no request can be allowed with it any more.
    fn expired(&self, now: i64, leeway: i64) -> bool {
        self.claims
            .exp
            .is_none_or(|exp| now >= exp.saturating_add(leeway))
    }

    /// An estimate of the heap and inline bytes this entry holds, token excluded.
    fn measure(&self) -> usize {
        // Each heap block costs its length plus the allocator's header and rounding.
        const BLOCK: usize = 16;
        let text = |s: &Option<String>| s.as_ref().map_or(0, |s| s.len() + BLOCK);
        let c = &self.claims;
        let aud = match &c.aud {
            None => 0,
            Some(Audience::One(a)) => a.len() + BLOCK,
            Some(Audience::Many(all)) => {
                all.iter().map(|a| a.len() + BLOCK).sum::<usize>()
                    + all.len() * size_of::<String>()
                    + BLOCK
            }
        };
        let scopes = c.scopes.as_ref().map_or(0, |all| {
            all.iter().map(|s| s.len() + BLOCK).sum::<usize>()
                + all.len() * size_of::<String>()
                + BLOCK
        });
        size_of::<Self>()
            + 2 * size_of::<usize>()
            + BLOCK
            + text(&c.iss)
            + text(&c.sub)
            + text(&c.jti)
            + text(&c.gitlab_realm)
            + text(&c.gitlab_instance_id)
            + aud
            + scopes
            + self.kid.as_ref().map_or(0, |k| k.len() + BLOCK)
    }
}

/// Weighs an entry by its bytes, but never less than `floor` = byte bound / entry bound,
/// so that one weight capacity enforces both bounds: at most `cache_bytes` bytes, and at
/// most `cache_entries` entries.
#[derive(Clone)]
struct EntryWeight {
    floor: u64,
}

/// Per entry: the table slot (key and value pointers, hash, links) that `quick_cache`
/// keeps besides the blocks it points to.
const ENTRY_OVERHEAD: usize = 64;

impl Weighter<Box<str>, Arc<VerifiedToken>> for EntryWeight {
    fn weight(&self, key: &Box<str>, value: &Arc<VerifiedToken>) -> u64 {
        let bytes = key.len() + 16 + value.footprint + ENTRY_OVERHEAD;
        (bytes as u64).max(self.floor)
    }
}

type Inner = Cache<
    Box<str>,
    Arc<VerifiedToken>,
    EntryWeight,
    DefaultHashBuilder,
    DefaultLifecycle<Box<str>, Arc<VerifiedToken>>,
>;

/// The cache of verified tokens; see the module docs. [`TokenCache::disabled`] caches
/// nothing (what plain `decide` uses).
pub struct TokenCache {
    inner: Option<Inner>,
    /// Lookups answered from the cache, and lookups that had to verify: lock-free
    /// counters, shared with the metrics registry when [`Self::counting_into`] is used.
    hits: Counter,
    misses: Counter,
}

impl TokenCache {
    /// A cache of at most `entries` tokens and `bytes` bytes; `entries == 0` disables it.
    pub fn new(entries: usize, bytes: u64) -> Self {
        let inner = (entries > 0 && bytes > 0).then(|| {
            let floor = (bytes / entries as u64).max(1);
            Cache::with(
                entries,
                bytes,
                EntryWeight { floor },
                DefaultHashBuilder::default(),
                DefaultLifecycle::default(),
            )
        });
        Self {
            inner,
            hits: Counter::default(),
            misses: Counter::default(),
        }
    }

    /// Counts hits and misses in these counters (the `/metrics` ones) instead of its own.
    pub fn counting_into(mut self, hits: Counter, misses: Counter) -> Self {
        self.hits = hits;
        self.misses = misses;
        self
    }

    /// Sized by `tokens.cache_entries` and `tokens.cache_bytes`.
    pub fn from_settings(settings: &TokenSettings) -> Self {
        Self::new(settings.cache_entries, settings.cache_bytes)
    }

    /// The shared cache that holds nothing (and counts nothing).
    pub fn disabled() -> &'static TokenCache {
        static DISABLED: std::sync::OnceLock<TokenCache> = std::sync::OnceLock::new();
        DISABLED.get_or_init(|| TokenCache::new(0, 0))
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The verified token for `token` if it is cached, not expired, and would still verify
    /// against `keys` under `config`. A stale entry is removed on the way.
    pub fn get(
        &self,
        token: &str,
        config: &Config,
        keys: &KeySnapshot,
        now: i64,
    ) -> Option<Arc<VerifiedToken>> {
        let inner = self.inner.as_ref()?;
        let Some(entry) = inner.get(token) else {
            self.misses.inc();
            return None;
        };
        let leeway = i64::try_from(config.tokens.leeway.as_secs()).unwrap_or(i64::MAX);
        if entry.expired(now, leeway) || !entry.still_verifies(config, keys) {
            // Only this entry: another request may have put a fresh one in meanwhile.
            inner.remove_if(token, |current| Arc::ptr_eq(current, &entry));
            self.misses.inc();
            return None;
        }
        self.hits.inc();
        Some(entry)
    }

    /// Remembers a token whose signature has just been verified. Callers insert nothing
    /// else: a failed verification is never cached.
    pub fn insert(&self, token: &str, verified: Arc<VerifiedToken>) {
        if let Some(inner) = &self.inner {
            inner.insert(Box::from(token), verified);
        }
    }

    /// Tokens held now.
    pub fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, Inner::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The weight held now: the estimated bytes, each entry counted at least at
    /// `cache_bytes / cache_entries`.
    pub fn weight(&self) -> u64 {
        self.inner.as_ref().map_or(0, Inner::weight)
    }

    /// Lookups answered from the cache since start.
    pub fn hits(&self) -> u64 {
        self.hits.get()
    }

    /// Lookups that had to verify (absent, expired or no longer verifiable) since start.
    pub fn misses(&self) -> u64 {
        self.misses.get()
    }
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("enabled", &self.is_enabled())
            .field("len", &self.len())
            .field("hits", &self.hits())
            .field("misses", &self.misses())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    //! The cache on its own: what an entry weighs, what the two bounds hold, and when a
    //! held entry is handed out. (`decide`'s tests run it end to end with real signatures.)

    use std::path::Path;

    use jsonwebtoken::DecodingKey;

    use super::*;
    use crate::keys::{KeySet, KeySource, VerifyingKey};

    const ISS: &str = "https://issuer.test";
    const NOW: i64 = 1_800_000_000;
    /// The heap block overhead the estimate charges per allocation.
    const BLOCK: usize = 16;

    fn config() -> Config {
        let yaml = format!(
            "issuers:
  - url: {ISS}
    jwks_file: unused.json
backends:
  - name: backend
    audience: backend
    routes:
      - prefix: /
        public: true
"
        );
        Config::from_yaml(&yaml, Path::new("/test/config.yaml")).unwrap()
    }

    /// The issuer's keys: one per (kid, fingerprint), no `alg` pinned. The key material is
    /// never used here: the cache compares fingerprints, it does not verify.
    fn keys(published: &[(Option<&str>, u64)]) -> KeySnapshot {
        let keys = published
            .iter()
            .map(|&(kid, fingerprint)| VerifyingKey {
                kid: kid.map(str::to_string),
                alg: None,
                key: DecodingKey::from_secret(b"unused"),
                fingerprint,
            })
            .collect();
        KeySnapshot::default().with_issuer(
            ISS.into(),
            Arc::new(KeySet::new(keys, KeySource::File, std::time::UNIX_EPOCH)),
        )
    }

    fn claims() -> Claims {
        Claims {
            iss: Some(ISS.into()),
            exp: Some(NOW + 600),
            ..Claims::default()
        }
    }

    fn verified(claims: Claims, kid: Option<&str>, fingerprint: u64) -> Arc<VerifiedToken> {
        Arc::new(VerifiedToken::new(
            claims,
            ISS.into(),
            Algorithm::RS256,
            kid,
            fingerprint,
        ))
    }

    fn footprint(claims: Claims, kid: Option<&str>) -> usize {
        VerifiedToken::new(claims, ISS.into(), Algorithm::RS256, kid, 0).footprint
    }

    #[test]
    fn an_empty_entry_weighs_its_shared_block() {
        // The Arc's allocation: the two reference counts, the value, one heap block.
        assert_eq!(
            footprint(Claims::default(), None),
            size_of::<VerifiedToken>() + 2 * size_of::<usize>() + BLOCK
        );
    }

    #[test]
    fn every_string_an_entry_holds_is_counted_with_its_block() {
        let empty = footprint(Claims::default(), None);
        let grown = |claims: Claims, kid: Option<&str>| footprint(claims, kid) - empty;
        let text = |n: usize| Some("x".repeat(n));
        // Distinct lengths, so that a field counted twice or as another's shows.
        let cases: [(&str, Claims, usize); 5] = [
            (
                "iss",
                Claims {
                    iss: text(101),
                    ..Claims::default()
                },
                101,
            ),
            (
                "sub",
                Claims {
                    sub: text(202),
                    ..Claims::default()
                },
                202,
            ),
            (
                "jti",
                Claims {
                    jti: text(303),
                    ..Claims::default()
                },
                303,
            ),
            (
                "gitlab_realm",
                Claims {
                    gitlab_realm: text(404),
                    ..Claims::default()
                },
                404,
            ),
            (
                "gitlab_instance_id",
                Claims {
                    gitlab_instance_id: text(505),
                    ..Claims::default()
                },
                505,
            ),
        ];
        for (field, claims, len) in cases {
            assert_eq!(grown(claims, None), len + BLOCK, "{field}");
        }
        assert_eq!(grown(Claims::default(), Some("kid-1")), 5 + BLOCK, "kid");
        let one = Claims {
            aud: Some(Audience::One("a".repeat(606))),
            ..Claims::default()
        };
        assert_eq!(grown(one, None), 606 + BLOCK, "aud as a string");
    }

    #[test]
    fn a_list_is_counted_with_its_elements_and_its_buffer() {
        let empty = footprint(Claims::default(), None);
        // A Vec of n strings: its buffer (n String headers, one block) and each string's block.
        let list = |lens: &[usize]| {
            lens.iter().map(|n| n + BLOCK).sum::<usize>() + lens.len() * size_of::<String>() + BLOCK
        };
        for lens in [&[][..], &[7], &[7, 70, 700]] {
            let strings: Vec<String> = lens.iter().map(|&n| "s".repeat(n)).collect();
            let aud = Claims {
                aud: Some(Audience::Many(strings.clone())),
                ..Claims::default()
            };
            assert_eq!(footprint(aud, None) - empty, list(lens), "aud {lens:?}");
            let scopes = Claims {
                scopes: Some(strings),
                ..Claims::default()
            };
            assert_eq!(
                footprint(scopes, None) - empty,
                list(lens),
                "scopes {lens:?}"
            );
        }
    }

    #[test]
    fn an_entry_weighs_its_token_its_claims_and_its_slot_but_at_least_the_floor() {
        // 1 MiB over 1,000 entries: no entry weighs less than 1,048 bytes.
        let cache = TokenCache::new(1_000, 1 << 20);
        let big = verified(
            Claims {
                sub: Some("s".repeat(3_000)),
                ..claims()
            },
            Some("k1"),
            1,
        );
        let token = "t".repeat(2_000);
        cache.insert(&token, Arc::clone(&big));
        assert_eq!(
            cache.weight(),
            (2_000 + BLOCK + big.footprint + ENTRY_OVERHEAD) as u64
        );

        let floor = TokenCache::new(1_000, 1 << 20);
        let small = verified(claims(), Some("k1"), 1);
        assert!(10 + BLOCK + small.footprint + ENTRY_OVERHEAD < 1_048);
        floor.insert("small.token", small);
        assert_eq!(floor.weight(), 1_048);
    }

    #[test]
    fn cache_bytes_bounds_the_tokens_held() {
        let bytes = 64 * 1024;
        let token_len = 4 * 1024;
        let cache = TokenCache::new(10_000, bytes);
        for i in 0..200 {
            let token = format!("{i:04}{}", "t".repeat(token_len - 4));
            cache.insert(&token, verified(claims(), Some("k1"), 1));
            assert!(cache.weight() <= bytes, "{} bytes held", cache.weight());
            // The tokens alone already fill the bound: the weight counts every byte of them.
            assert!(
                cache.len() * token_len <= bytes as usize,
                "{} tokens of {token_len} bytes held in {bytes} bytes",
                cache.len()
            );
        }
        assert!(!cache.is_empty());
    }

    #[test]
    fn enabled_only_with_room_in_both_bounds() {
        let cache = TokenCache::new(16, 1 << 20);
        assert!(cache.is_enabled());
        assert!(cache.is_empty());
        cache.insert("a.b.c", verified(claims(), Some("k1"), 1));
        assert!(!cache.is_empty());
        assert_eq!(cache.len(), 1);

        for off in [TokenCache::new(0, 1 << 20), TokenCache::new(16, 0)] {
            assert!(!off.is_enabled(), "{off:?}");
            off.insert("a.b.c", verified(claims(), Some("k1"), 1));
            assert!(off.is_empty(), "{off:?}");
            assert_eq!(off.weight(), 0);
            assert!(
                off.get("a.b.c", &config(), &keys(&[(Some("k1"), 1)]), NOW)
                    .is_none()
            );
            assert_eq!((off.hits(), off.misses()), (0, 0));
        }
        assert!(!TokenCache::disabled().is_enabled());
    }

    #[test]
    fn a_key_replaced_under_the_same_kid_ends_the_entry() {
        let cache = TokenCache::new(16, 1 << 20);
        let config = config();
        cache.insert("a.b.c", verified(claims(), Some("k1"), 1));
        assert!(
            cache
                .get("a.b.c", &config, &keys(&[(Some("k1"), 1)]), NOW)
                .is_some()
        );
        assert_eq!((cache.hits(), cache.misses()), (1, 0));
        // Same kid, other key material: the cached verification says nothing about it.
        let replaced = keys(&[(Some("k1"), 2)]);
        assert!(cache.get("a.b.c", &config, &replaced, NOW).is_none());
        assert_eq!((cache.hits(), cache.misses(), cache.len()), (1, 1, 0));
    }

    #[test]
    fn an_entry_is_used_only_while_its_issuer_and_algorithm_still_are() {
        let config = config();
        let published = keys(&[(Some("k1"), 1)]);
        let held = |entry: Arc<VerifiedToken>, config: &Config| {
            let cache = TokenCache::new(16, 1 << 20);
            cache.insert("a.b.c", entry);
            let hit = cache.get("a.b.c", config, &published, NOW).is_some();
            assert_eq!(cache.len(), usize::from(hit), "a stale entry is removed");
            hit
        };
        assert!(held(verified(claims(), Some("k1"), 1), &config));

        let mut es256_only = config.clone();
        es256_only.tokens.algorithms = vec![Algorithm::ES256];
        assert!(!held(verified(claims(), Some("k1"), 1), &es256_only));

        let unknown_issuer = Claims {
            iss: Some("https://elsewhere.test".into()),
            ..claims()
        };
        assert!(!held(verified(unknown_issuer, Some("k1"), 1), &config));

        // Verified as another configured issuer than the one its `iss` names now.
        let other_issuer = VerifiedToken::new(
            claims(),
            "https://other.test".into(),
            Algorithm::RS256,
            Some("k1"),
            1,
        );
        assert!(!held(Arc::new(other_issuer), &config));

        let no_keys = TokenCache::new(16, 1 << 20);
        no_keys.insert("a.b.c", verified(claims(), Some("k1"), 1));
        assert!(
            no_keys
                .get("a.b.c", &config, &KeySnapshot::default(), NOW)
                .is_none()
        );
    }

    #[test]
    fn an_entry_expires_at_exp_plus_leeway() {
        let entry = verified(claims(), None, 0);
        let exp = NOW + 600;
        assert!(!entry.expired(exp + 29, 30));
        assert!(entry.expired(exp + 30, 30));
        assert!(!entry.expired(exp - 1, 0));
        assert!(entry.expired(exp, 0));
        let no_exp = verified(
            Claims {
                exp: None,
                ..claims()
            },
            None,
            0,
        );
        assert!(no_exp.expired(NOW, 30));
        // Through the cache, with the configuration's 30 s of leeway.
        let cache = TokenCache::new(16, 1 << 20);
        let (config, published) = (config(), keys(&[(None, 7)]));
        cache.insert("a.b.c", verified(claims(), None, 7));
        assert!(cache.get("a.b.c", &config, &published, exp + 29).is_some());
        assert!(cache.get("a.b.c", &config, &published, exp + 30).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn debug_shows_the_state() {
        let cache = TokenCache::new(16, 1 << 20);
        cache.insert("a.b.c", verified(claims(), Some("k1"), 1));
        let shown = format!("{cache:?}");
        assert!(shown.contains("enabled: true"), "{shown}");
        assert!(shown.contains("len: 1"), "{shown}");
    }
}
