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
