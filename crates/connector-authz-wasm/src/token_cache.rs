//! The filter's verified tokens, per VM: what the sidecar's `/v1/verify` answered for a
//! token, kept until the token's `exp` + leeway, keyed by a BLAKE3 digest of the token
//! under a key random per VM (the cache holds no tokens, and no one can construct two
//! tokens with one digest without knowing the key). Bounded in entries; an entry whose key the issuer no longer has (by
//! the snapshot's fingerprints) is not used and is dropped, so the token is verified again.
//! Only verified tokens are kept: a flood of forged tokens cannot push good ones out.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use connector_authz_core::feed::CompiledFeed;
use connector_authz_core::token_cache::VerifiedToken;
/// A token's cache key.
pub type TokenDigest = [u8; 32];

/// The token's keyed digest. The key is drawn once per VM; should the host give no
/// randomness, the digest is plain BLAKE3, which is still collision resistant: the key
/// only adds that no one outside the VM can even compute a digest.
pub fn digest(raw: &str) -> TokenDigest {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    let key = KEY.get_or_init(|| {
        let mut key = [0u8; 32];
        if getrandom::fill(&mut key).is_err() {
            key = [0u8; 32];
        }
        key
    });
    blake3::keyed_hash(key, raw.as_bytes()).into()
}

/// A full cache evicts this fraction of its entries at once (the eighth closest to expiry).
const EVICT_FRACTION: usize = 8;

pub struct VerifiedCache {
    entries: HashMap<TokenDigest, Entry>,
    capacity: usize,
}

struct Entry {
    token: Arc<VerifiedToken>,
    /// Unix seconds after which no request can be allowed with it.
    expires_at: i64,
}

impl VerifiedCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The verified token, while it lives and its key is current in `feed`.
    pub fn get(
        &mut self,
        key: &TokenDigest,
        feed: &CompiledFeed,
        now: i64,
    ) -> Option<Arc<VerifiedToken>> {
        let entry = self.entries.get(key)?;
        if now >= entry.expires_at || !feed.still_current(&entry.token) {
            self.entries.remove(key);
            return None;
        }
        Some(Arc::clone(&entry.token))
    }

    /// Keeps `token` until its `exp` + `leeway`; one already past it, or without `exp`
    /// (which the decision denies anyway), is not kept. When full, expired entries go
    /// first, then the eighth of the entries closest to expiry: a pass over the entries
    /// pays for many inserts, so a stream of new tokens into a full cache (many instances,
    /// or a restart of the fleet) costs a few entries' work per token, not the cache's size.
    pub fn insert(&mut self, key: TokenDigest, token: Arc<VerifiedToken>, now: i64, leeway: i64) {
        let Some(exp) = token.validity().exp else {
            return;
        };
        let expires_at = exp.saturating_add(leeway);
        if now >= expires_at || self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.retain(|_, e| now < e.expires_at);
            if self.entries.len() >= self.capacity {
                self.evict_soonest((self.capacity / EVICT_FRACTION).max(1));
            }
        }
        self.entries.insert(key, Entry { token, expires_at });
    }

    /// Drops the `count` entries closest to expiry (ties broken arbitrarily).
    fn evict_soonest(&mut self, count: usize) {
        let mut expiries: Vec<i64> = self.entries.values().map(|e| e.expires_at).collect();
        let count = count.min(expiries.len());
        if count == 0 {
            return;
        }
        let (_, &mut cutoff, _) = expiries.select_nth_unstable(count - 1);
        // Everything before the cutoff goes, then entries at the cutoff until `count` went.
        let mut at_cutoff = count - expiries[..count].iter().filter(|&&e| e < cutoff).count();
        self.entries.retain(|_, e| {
            if e.expires_at < cutoff {
                false
            } else if e.expires_at == cutoff && at_cutoff > 0 {
                at_cutoff -= 1;
                false
            } else {
                true
            }
        });
    }

    /// Drops the entries whose key `feed` no longer lists (a new snapshot arrived).
    pub fn retain_current(&mut self, feed: &CompiledFeed) {
        self.entries.retain(|_, e| feed.still_current(&e.token));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use connector_authz_core::algorithm::parse_algorithm;
    use connector_authz_core::config::Config;
    use connector_authz_core::decide::Snapshot;
    use connector_authz_core::token::Claims;

    use super::*;

    const ISS: &str = "https://issuer.test";

    fn feed(fingerprints: &[u64]) -> CompiledFeed {
        let config = Config::from_yaml(
            &format!("issuers:\n  - url: {ISS}\nbackends:\n  - name: b\n    audience: a\n    routes:\n      - prefix: /\n        public: true\n"),
            Path::new("c.yaml"),
        )
        .unwrap();
        CompiledFeed {
            snapshot: Snapshot::new(Arc::new(config), Arc::default()),
            keys: BTreeMap::from([(ISS.to_string(), fingerprints.to_vec())]),
        }
    }

    fn token(exp: i64, fingerprint: u64) -> Arc<VerifiedToken> {
        let claims = Claims {
            iss: Some(ISS.into()),
            exp: Some(exp),
            ..Claims::default()
        };
        let alg = parse_algorithm("RS256").unwrap();
        Arc::new(VerifiedToken::new(
            claims,
            ISS.into(),
            alg,
            Some("k"),
            fingerprint,
        ))
    }

    #[test]
    fn a_token_lives_until_exp_plus_leeway() {
        let feed = feed(&[7]);
        let mut cache = VerifiedCache::new(4);
        let key = digest("t1");
        cache.insert(key, token(100, 7), 50, 30);
        assert!(cache.get(&key, &feed, 129).is_some());
        assert!(cache.get(&key, &feed, 130).is_none());
        assert!(cache.is_empty(), "an expired entry is dropped");
        cache.insert(key, token(100, 7), 130, 30);
        assert!(cache.is_empty(), "an already expired token is not kept");
    }

    #[test]
    fn a_token_whose_key_left_the_snapshot_is_dropped() {
        let mut cache = VerifiedCache::new(4);
        let (a, b) = (digest("a"), digest("b"));
        cache.insert(a, token(1000, 7), 0, 0);
        cache.insert(b, token(1000, 8), 0, 0);
        assert!(cache.get(&a, &feed(&[8]), 1).is_none());
        assert!(cache.get(&b, &feed(&[8]), 1).is_some());
        cache.retain_current(&feed(&[9]));
        assert!(cache.is_empty());
    }

    #[test]
    fn a_full_cache_evicts_an_eighth_of_its_entries_closest_to_expiry() {
        let feed = feed(&[7]);
        let mut cache = VerifiedCache::new(16);
        for i in 0..16 {
            cache.insert(digest(&format!("t{i}")), token(1000 + i, 7), 0, 0);
        }
        assert_eq!(cache.len(), 16);
        cache.insert(digest("new"), token(5000, 7), 0, 0);
        // 16 / 8 = 2 went: the two closest to expiry (t0, t1); the new one is in.
        assert_eq!(cache.len(), 15);
        assert!(cache.get(&digest("t0"), &feed, 1).is_none());
        assert!(cache.get(&digest("t1"), &feed, 1).is_none());
        for i in 2..16 {
            assert!(
                cache.get(&digest(&format!("t{i}")), &feed, 1).is_some(),
                "t{i}"
            );
        }
        assert!(cache.get(&digest("new"), &feed, 1).is_some());
    }

    #[test]
    fn eviction_at_equal_expiries_drops_exactly_the_batch() {
        let mut cache = VerifiedCache::new(16);
        for i in 0..16 {
            cache.insert(digest(&format!("t{i}")), token(1000, 7), 0, 0);
        }
        cache.insert(digest("new"), token(1000, 7), 0, 0);
        assert_eq!(cache.len(), 15);
        assert!(cache.get(&digest("new"), &feed(&[7]), 1).is_some());
    }

    #[test]
    fn the_cache_is_bounded_and_evicts_the_soonest_to_expire() {
        let feed = feed(&[7]);
        let mut cache = VerifiedCache::new(2);
        cache.insert(digest("late"), token(1000, 7), 0, 0);
        cache.insert(digest("soon"), token(10, 7), 0, 0);
        cache.insert(digest("new"), token(500, 7), 0, 0);
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&digest("soon"), &feed, 1).is_none());
        assert!(cache.get(&digest("late"), &feed, 1).is_some());
        assert!(cache.get(&digest("new"), &feed, 1).is_some());
        assert_ne!(digest("a"), digest("b"));
    }
}
