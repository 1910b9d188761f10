//! The verified-token cache: a token whose signature has been verified once is not
//! verified again while it lives. Self-managed instances reuse one token for up to three
//! days, so nearly every Check after the first would otherwise spend its time on the same
//! RSA verification.
//!
//! What the cache holds, and what it skips: an entry is what the checks after the signature
//! read from a token whose signature one of its issuer's keys verified, keyed by the
//! token's HMAC-SHA-256 under a key drawn at random when the cache is made. The token
//! itself is not kept. Without the key no one can make two tokens with the same digest (not
//! even by brute force: the digest is 256 bits and never leaves the process), so a token
//! that differs from a cached one in any byte is a miss. A hit skips only the parsing and
//! the signature. Everything after the signature (time window, audience, instance headers,
//! scopes, the route) is still checked on every request by the same code as a miss.
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
//! An entry is small: the short claims (`iss`, `sub`, `jti`, the instance claims, `kid`)
//! share one allocation, and a scope or audience list is held once for every entry with
//! the same list (the tokens of one kind of instance all carry the same unit primitives).
//! Those shared lists take at most an eighth of the byte bound, counted apart from the
//! entries; a list that does not fit there is held by its entry and counted with it.
//!
//! This module does no I/O and knows nothing of tonic; `decide` receives the cache as an
//! argument, so a decision stays a function of its inputs.

use std::collections::HashSet;
use std::mem::size_of;
use std::sync::{Arc, Mutex, PoisonError};

use hmac::{Hmac, Mac};
use jsonwebtoken::Algorithm;
use prometheus_client::metrics::counter::Counter;
use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::{DefaultHashBuilder, Weighter};
use sha2::Sha256;

use crate::config::{Config, TokenSettings};
use crate::keys::KeySnapshot;
use crate::token::{Audience, Claims, Validity};
use crate::verify;

/// A list of claim strings (`scopes`, or `aud`), shared by the entries that hold the same.
type List = Arc<[Box<str>]>;

/// The short claims an entry keeps in its one text buffer, by position.
const ISS: usize = 0;
const SUB: usize = 1;
const JTI: usize = 2;
const REALM: usize = 3;
const INSTANCE: usize = 4;
const KID: usize = 5;
const TEXT_FIELDS: usize = 6;

/// Each heap block costs its length plus the allocator's header and rounding.
const BLOCK: usize = 16;

/// Optional strings back to back in one allocation.
#[derive(Debug)]
struct Text {
    buffer: Box<str>,
    /// Where each field ends in `buffer` (it starts where the one before ends).
    ends: [usize; TEXT_FIELDS],
    /// Bit `i` is set when field `i` is present (an empty string is present).
    present: u8,
}

impl Text {
    fn new(fields: [Option<&str>; TEXT_FIELDS]) -> Self {
        let mut buffer = String::with_capacity(fields.iter().flatten().map(|f| f.len()).sum());
        let mut ends = [0; TEXT_FIELDS];
        let mut present = 0;
        for (i, field) in fields.iter().enumerate() {
            if let Some(field) = field {
                buffer.push_str(field);
                present |= 1 << i;
            }
            ends[i] = buffer.len();
        }
        Self {
            buffer: buffer.into_boxed_str(),
            ends,
            present,
        }
    }

    fn get(&self, field: usize) -> Option<&str> {
        if self.present & (1 << field) == 0 {
            return None;
        }
        let start = field.checked_sub(1).map_or(0, |before| self.ends[before]);
        self.buffer.get(start..self.ends[field])
    }
}

fn list(strings: Vec<String>) -> List {
    strings.into_iter().map(String::into_boxed_str).collect()
}

/// The bytes a list takes: the `Arc`'s block (counts and one `Box<str>` per string) and
/// each string's block.
fn list_bytes(list: &[Box<str>]) -> usize {
    2 * size_of::<usize>()
        + size_of_val(list)
        + BLOCK
        + list.iter().map(|s| s.len() + BLOCK).sum::<usize>()
}

/// A token that passed its signature check: what the checks after the signature read,
/// and what is needed to tell whether that check still holds.
#[derive(Debug)]
pub struct VerifiedToken {
    /// The configured issuer's canonical name (shared with the configuration).
    pub issuer: Arc<str>,
    /// `iss`, `sub`, `jti`, `gitlab_realm`, `gitlab_instance_id` and the header's `kid`.
    text: Text,
    validity: Validity,
    aud: Option<List>,
    /// `aud` was a JSON array (rather than one string).
    aud_is_array: bool,
    scopes: Option<List>,
    alg: Algorithm,
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
        let text = Text::new([
            claims.iss.as_deref(),
            claims.sub.as_deref(),
            claims.jti.as_deref(),
            claims.gitlab_realm.as_deref(),
            claims.gitlab_instance_id.as_deref(),
            kid,
        ]);
        let (aud, aud_is_array) = match claims.aud {
            None => (None, false),
            Some(Audience::One(one)) => (Some(list(vec![one])), false),
            Some(Audience::Many(all)) => (Some(list(all)), true),
        };
        let mut verified = Self {
            issuer,
            text,
            validity: Validity {
                exp: claims.exp,
                nbf: claims.nbf,
                iat: claims.iat,
            },
            aud,
            aud_is_array,
            scopes: claims.scopes.map(list),
            alg,
            key_fingerprint,
            footprint: 0,
        };
        verified.footprint = verified.measure(false, false);
        verified
    }

    /// The claims as the token carried them (those a decision reads).
    pub fn claims(&self) -> Claims {
        let owned = |field| self.text.get(field).map(str::to_string);
        let strings = |list: &List| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Claims {
            iss: owned(ISS),
            sub: owned(SUB),
            aud: self
                .aud
                .as_ref()
                .map(|aud| match (self.aud_is_array, &aud[..]) {
                    (false, [one]) => Audience::One(one.to_string()),
                    _ => Audience::Many(strings(aud)),
                }),
            exp: self.validity.exp,
            nbf: self.validity.nbf,
            iat: self.validity.iat,
            jti: owned(JTI),
            scopes: self.scopes.as_ref().map(strings),
            gitlab_realm: owned(REALM),
            gitlab_instance_id: owned(INSTANCE),
        }
    }

    pub fn iss(&self) -> Option<&str> {
        self.text.get(ISS)
    }

    pub fn sub(&self) -> Option<&str> {
        self.text.get(SUB)
    }

    pub fn jti(&self) -> Option<&str> {
        self.text.get(JTI)
    }

    pub fn gitlab_realm(&self) -> Option<&str> {
        self.text.get(REALM)
    }

    pub fn gitlab_instance_id(&self) -> Option<&str> {
        self.text.get(INSTANCE)
    }

    /// `exp`, `nbf` and `iat`.
    pub fn validity(&self) -> Validity {
        self.validity
    }

    /// `aud`, one string or each of an array's.
    pub fn audience(&self) -> Option<&[Box<str>]> {
        self.aud.as_deref()
    }

    pub fn scopes(&self) -> Option<&[Box<str>]> {
        self.scopes.as_deref()
    }

    /// The algorithm the signature was verified with.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The `kid` of the token's header, if it had one.
    pub fn kid(&self) -> Option<&str> {
        self.text.get(KID)
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
        let Some(issuer) = self.iss().and_then(|iss| config.issuer(iss)) else {
            return false;
        };
        if issuer.name != self.issuer {
            return false;
        }
        keys.get(&issuer.name).is_some_and(|set| {
            verify::would_use_key(set, self.kid(), self.alg, self.key_fingerprint)
        })
    }

    /// Past `exp` + leeway: no request can be allowed with it any more.
    fn expired(&self, now: i64, leeway: i64) -> bool {
        self.validity
            .exp
            .is_none_or(|exp| now >= exp.saturating_add(leeway))
    }

    /// An estimate of the heap and inline bytes this entry holds, lists shared with other
    /// entries excluded.
    fn measure(&self, shared_aud: bool, shared_scopes: bool) -> usize {
        let own = |list: &Option<List>, shared: bool| match list {
            Some(list) if !shared => list_bytes(list),
            _ => 0,
        };
        let text = match self.text.buffer.len() {
            0 => 0,
            len => len + BLOCK,
        };
        size_of::<Self>()
            + 2 * size_of::<usize>()
            + BLOCK
            + text
            + own(&self.aud, shared_aud)
            + own(&self.scopes, shared_scopes)
    }
}

/// A token's cache key: its HMAC-SHA-256 under the cache's key.
pub type TokenDigest = [u8; 32];

/// Digests tokens under a key of its own, drawn from the operating system's generator.
#[derive(Clone)]
struct Digester {
    keyed: Hmac<Sha256>,
}

impl Digester {
    /// `None` when the operating system gives no random bytes.
    fn random() -> Option<Self> {
        // A full block: HMAC-SHA-256's own key size.
        let mut key = [0u8; 64];
        getrandom::getrandom(&mut key).ok()?;
        let keyed = Hmac::new_from_slice(&key).ok()?;
        Some(Self { keyed })
    }

    fn digest(&self, token: &str) -> TokenDigest {
        let mut mac = self.keyed.clone();
        mac.update(token.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// The scope and audience lists the entries hold, each distinct list once, within a byte
/// budget of their own.
struct SharedLists {
    held: HashSet<List>,
    bytes: usize,
    budget: usize,
    /// Lists that did not fit since the last sweep: sweeping costs one pass over `held`,
    /// so it waits until that many lists have been turned away.
    refused: usize,
}

impl SharedLists {
    fn new(budget: usize) -> Self {
        Self {
            held: HashSet::new(),
            bytes: 0,
            budget,
            refused: 0,
        }
    }

    /// The shared list equal to `list`, and `true`; or `list` itself and `false` when it
    /// does not fit.
    fn share(&mut self, list: List) -> (List, bool) {
        if let Some(held) = self.held.get(&*list) {
            return (Arc::clone(held), true);
        }
        // The `HashSet` slot, too.
        let cost = list_bytes(&list) + size_of::<List>();
        if self.bytes + cost > self.budget {
            self.refused += 1;
            if self.refused > self.held.len() {
                self.sweep();
            }
            if self.bytes + cost > self.budget {
                return (list, false);
            }
        }
        self.bytes += cost;
        self.held.insert(Arc::clone(&list));
        (list, true)
    }

    /// Drops the lists no entry holds any more. (Only entries clone a list, under the same
    /// lock, so a count of one cannot rise again.)
    fn sweep(&mut self) {
        self.held.retain(|list| Arc::strong_count(list) > 1);
        self.bytes = self
            .held
            .iter()
            .map(|list| list_bytes(list) + size_of::<List>())
            .sum();
        self.refused = 0;
    }
}

/// Weighs an entry by its bytes, but never less than `floor` = entries' byte bound / entry
/// bound, so that one weight capacity enforces both bounds.
#[derive(Clone)]
struct EntryWeight {
    floor: u64,
}

/// Per entry: the table slot (the 32-byte digest, the value pointer, hash, links) that
/// `quick_cache` keeps besides the block it points to.
const ENTRY_OVERHEAD: usize = 80;

impl Weighter<TokenDigest, Arc<VerifiedToken>> for EntryWeight {
    fn weight(&self, _: &TokenDigest, value: &Arc<VerifiedToken>) -> u64 {
        ((value.footprint + ENTRY_OVERHEAD) as u64).max(self.floor)
    }
}

type Inner = Cache<
    TokenDigest,
    Arc<VerifiedToken>,
    EntryWeight,
    DefaultHashBuilder,
    DefaultLifecycle<TokenDigest, Arc<VerifiedToken>>,
>;

/// What an enabled cache holds.
struct Held {
    entries: Inner,
    digester: Digester,
    lists: Mutex<SharedLists>,
}

/// The cache of verified tokens; see the module docs. [`TokenCache::disabled`] caches
/// nothing (what plain `decide` uses).
pub struct TokenCache {
    held: Option<Held>,
    /// Lookups answered from the cache, and lookups that had to verify: lock-free
    /// counters, shared with the metrics registry when [`Self::counting_into`] is used.
    hits: Counter,
    misses: Counter,
}

impl TokenCache {
    /// A cache of at most `entries` tokens and `bytes` bytes; `entries == 0` disables it.
    /// So does an operating system that gives no random bytes for the digest key (logged).
    pub fn new(entries: usize, bytes: u64) -> Self {
        let held = (entries > 0 && bytes > 0)
            .then(|| {
                let Some(digester) = Digester::random() else {
                    tracing::warn!(
                        "the verified-token cache is off: the operating system gave no random bytes for its key"
                    );
                    return None;
                };
                let lists = bytes / 8;
                let entry_bytes = bytes - lists;
                let floor = (entry_bytes / entries as u64).max(1);
                let entries = Cache::with(
                    entries,
                    entry_bytes,
                    EntryWeight { floor },
                    DefaultHashBuilder::default(),
                    DefaultLifecycle::default(),
                );
                let budget = usize::try_from(lists).unwrap_or(usize::MAX);
                Some(Held {
                    entries,
                    digester,
                    lists: Mutex::new(SharedLists::new(budget)),
                })
            })
            .flatten();
        Self {
            held,
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
        self.held.is_some()
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
        let held = self.held.as_ref()?;
        let digest = held.digester.digest(token);
        let Some(entry) = held.entries.get(&digest) else {
            self.misses.inc();
            return None;
        };
        let leeway = i64::try_from(config.tokens.leeway.as_secs()).unwrap_or(i64::MAX);
        if entry.expired(now, leeway) || !entry.still_verifies(config, keys) {
            // Only this entry: another request may have put a fresh one in meanwhile.
            held.entries
                .remove_if(&digest, |current| Arc::ptr_eq(current, &entry));
            self.misses.inc();
            return None;
        }
        self.hits.inc();
        Some(entry)
    }

    /// Remembers a token whose signature has just been verified, and hands it back shared.
    /// Callers insert nothing else: a failed verification is never cached.
    pub fn insert(&self, token: &str, mut verified: VerifiedToken) -> Arc<VerifiedToken> {
        let Some(held) = &self.held else {
            return Arc::new(verified);
        };
        let (mut shared_aud, mut shared_scopes) = (false, false);
        {
            let mut lists = held.lists.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(aud) = verified.aud.take() {
                let (aud, shared) = lists.share(aud);
                verified.aud = Some(aud);
                shared_aud = shared;
            }
            if let Some(scopes) = verified.scopes.take() {
                let (scopes, shared) = lists.share(scopes);
                verified.scopes = Some(scopes);
                shared_scopes = shared;
            }
        }
        verified.footprint = verified.measure(shared_aud, shared_scopes);
        let verified = Arc::new(verified);
        held.entries
            .insert(held.digester.digest(token), Arc::clone(&verified));
        verified
    }

    /// Tokens held now.
    pub fn len(&self) -> usize {
        self.held.as_ref().map_or(0, |held| held.entries.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The weight held now: the entries' estimated bytes (each counted at least at the
    /// floor), and the bytes of the lists they share.
    pub fn weight(&self) -> u64 {
        self.held.as_ref().map_or(0, |held| {
            let lists = held.lists.lock().unwrap_or_else(PoisonError::into_inner);
            held.entries.weight() + lists.bytes as u64
        })
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
    //! The cache on its own: what an entry weighs, what the two bounds hold, which lists
    //! are shared, how tokens are told apart, and when a held entry is handed out.
    //! (`decide`'s tests run it end to end with real signatures.)

    use std::path::Path;

    use jsonwebtoken::DecodingKey;

    use super::*;
    use crate::keys::{KeySet, KeySource, VerifyingKey};

    const ISS: &str = "https://issuer.test";
    const NOW: i64 = 1_800_000_000;

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

    fn scoped(scopes: &[&str]) -> Claims {
        Claims {
            scopes: Some(scopes.iter().map(|s| s.to_string()).collect()),
            ..claims()
        }
    }

    fn verified(claims: Claims, kid: Option<&str>, fingerprint: u64) -> VerifiedToken {
        VerifiedToken::new(claims, ISS.into(), Algorithm::RS256, kid, fingerprint)
    }

    fn footprint(claims: Claims, kid: Option<&str>) -> usize {
        verified(claims, kid, 0).footprint
    }

    /// A list's bytes as the estimate should count them: the `Arc`'s block with its
    /// counts and one `Box<str>` per string, and each string's block.
    fn expected_list(lens: &[usize]) -> usize {
        2 * size_of::<usize>()
            + lens.len() * size_of::<Box<str>>()
            + BLOCK
            + lens.iter().map(|n| n + BLOCK).sum::<usize>()
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
    fn the_short_claims_share_one_counted_block() {
        let empty = footprint(Claims::default(), None);
        let text = |n: usize| Some("x".repeat(n));
        let all = Claims {
            iss: text(101),
            sub: text(202),
            jti: text(303),
            gitlab_realm: text(404),
            gitlab_instance_id: text(505),
            ..Claims::default()
        };
        // Distinct lengths, so that a field counted twice or left out shows.
        assert_eq!(
            footprint(all.clone(), Some("kid-1")) - empty,
            101 + 202 + 303 + 404 + 505 + 5 + BLOCK
        );
        let sub_only = Claims {
            sub: text(202),
            ..Claims::default()
        };
        assert_eq!(footprint(sub_only, None) - empty, 202 + BLOCK);
        assert_eq!(footprint(Claims::default(), Some("k")) - empty, 1 + BLOCK);

        // And each reads back as itself.
        let entry = verified(all, Some("kid-1"), 0);
        let lens = [
            entry.iss().map(str::len),
            entry.sub().map(str::len),
            entry.jti().map(str::len),
            entry.gitlab_realm().map(str::len),
            entry.gitlab_instance_id().map(str::len),
            entry.kid().map(str::len),
        ];
        assert_eq!(
            lens,
            [101, 202, 303, 404, 505, 5].map(Some),
            "{:?}",
            entry.text
        );
    }

    #[test]
    fn a_list_is_counted_with_its_elements_and_its_block() {
        let empty = footprint(Claims::default(), None);
        for lens in [&[][..], &[7], &[7, 70, 700]] {
            let strings: Vec<String> = lens.iter().map(|&n| "s".repeat(n)).collect();
            let aud = Claims {
                aud: Some(Audience::Many(strings.clone())),
                ..Claims::default()
            };
            assert_eq!(
                footprint(aud, None) - empty,
                expected_list(lens),
                "aud {lens:?}"
            );
            let scopes = Claims {
                scopes: Some(strings),
                ..Claims::default()
            };
            assert_eq!(
                footprint(scopes, None) - empty,
                expected_list(lens),
                "scopes {lens:?}"
            );
        }
        let one = Claims {
            aud: Some(Audience::One("a".repeat(606))),
            ..Claims::default()
        };
        assert_eq!(footprint(one, None) - empty, expected_list(&[606]), "aud");
    }

    #[test]
    fn the_claims_read_back_as_the_token_had_them() {
        let full = Claims {
            iss: Some(ISS.into()),
            sub: Some("sub".into()),
            aud: Some(Audience::One("backend".into())),
            exp: Some(NOW + 600),
            nbf: Some(NOW - 1),
            iat: Some(NOW - 2),
            jti: Some(String::new()),
            scopes: Some(vec!["a".into(), "b".into()]),
            gitlab_realm: Some("self-managed".into()),
            gitlab_instance_id: None,
        };
        let one_in_array = Claims {
            aud: Some(Audience::Many(vec!["backend".into()])),
            scopes: Some(Vec::new()),
            ..Claims::default()
        };
        for claims in [full, one_in_array, Claims::default()] {
            let json = serde_json::to_value(&claims).unwrap();
            let back = verified(claims, None, 0).claims();
            assert_eq!(serde_json::to_value(&back).unwrap(), json);
        }
    }

    #[test]
    fn an_entry_weighs_its_claims_and_its_slot_but_at_least_the_floor() {
        // 1 MiB, of which an eighth is for shared lists, over 1,000 entries: no entry
        // weighs less than 917 bytes.
        let cache = TokenCache::new(1_000, 1 << 20);
        let big = cache.insert(
            "a.b.c",
            verified(
                Claims {
                    sub: Some("s".repeat(3_000)),
                    ..claims()
                },
                Some("k1"),
                1,
            ),
        );
        assert_eq!(cache.weight(), (big.footprint + ENTRY_OVERHEAD) as u64);

        let floor = TokenCache::new(1_000, 1 << 20);
        let small = floor.insert("small.token", verified(claims(), Some("k1"), 1));
        assert!(small.footprint + ENTRY_OVERHEAD < 917);
        floor.insert("small.token", verified(claims(), Some("k1"), 1));
        assert_eq!(floor.weight(), 917);
    }

    #[test]
    fn cache_bytes_bounds_the_entries_and_their_lists() {
        let bytes = 64 * 1024;
        let claim_len = 4 * 1024;
        let cache = TokenCache::new(10_000, bytes);
        for i in 0..200 {
            // Each with its own scope list too, so that the shared lists fill their part.
            let claims = Claims {
                sub: Some("s".repeat(claim_len)),
                ..scoped(&[&format!("scope-{i}"), &"x".repeat(300)])
            };
            cache.insert(&format!("token-{i}"), verified(claims, Some("k1"), 1));
            assert!(cache.weight() <= bytes, "{} bytes held", cache.weight());
            // The claims alone already fill the bound: the weight counts every byte of them.
            assert!(
                cache.len() * claim_len <= bytes as usize,
                "{} entries of {claim_len} bytes held in {bytes} bytes",
                cache.len()
            );
        }
        assert!(!cache.is_empty());
    }

    #[test]
    fn entries_with_the_same_list_share_it_and_count_it_once() {
        let cache = TokenCache::new(1_000, 1 << 20);
        let up = ["code_suggestions", "duo_chat", "complete_code"];
        let held: Vec<Arc<VerifiedToken>> = (0..100)
            .map(|i| {
                let claims = Claims {
                    aud: Some(Audience::One("backend".into())),
                    ..scoped(&up)
                };
                cache.insert(&format!("token-{i}"), verified(claims, Some("k1"), 1))
            })
            .collect();
        let first = &held[0];
        for entry in &held {
            assert!(Arc::ptr_eq(
                entry.scopes.as_ref().unwrap(),
                first.scopes.as_ref().unwrap()
            ));
            assert!(Arc::ptr_eq(
                entry.aud.as_ref().unwrap(),
                first.aud.as_ref().unwrap()
            ));
            assert_eq!(entry.footprint, first.footprint);
        }
        // Neither list is in an entry's footprint: they are counted once, apart.
        assert_eq!(first.footprint, footprint(claims(), Some("k1")));
        let lists = expected_list(&up.map(str::len)) + expected_list(&[7]) + 2 * size_of::<List>();
        let lock = cache.held.as_ref().unwrap().lists.lock().unwrap();
        assert_eq!((lock.held.len(), lock.bytes), (2, lists));
        drop(lock);
        // Another list is another shared list.
        let other = cache.insert("token-x", verified(scoped(&["duo_chat"]), None, 1));
        assert!(!Arc::ptr_eq(
            other.scopes.as_ref().unwrap(),
            first.scopes.as_ref().unwrap()
        ));
        assert_eq!(other.scopes().unwrap(), &[Box::from("duo_chat")][..]);
    }

    #[test]
    fn a_list_that_does_not_fit_the_shared_part_is_its_entrys() {
        // 64 KiB: 8 KiB for shared lists, which one list of 9,000 bytes does not fit in.
        let cache = TokenCache::new(16, 64 * 1024);
        let big = ["u".repeat(9_000)];
        let big: Vec<&str> = big.iter().map(String::as_str).collect();
        let a = cache.insert("a", verified(scoped(&big), None, 1));
        let b = cache.insert("b", verified(scoped(&big), None, 1));
        assert!(!Arc::ptr_eq(
            a.scopes.as_ref().unwrap(),
            b.scopes.as_ref().unwrap()
        ));
        assert_eq!(a.footprint, footprint(scoped(&big), None));
        assert_eq!(
            cache.weight(),
            2 * (a.footprint + ENTRY_OVERHEAD) as u64,
            "counted with each entry"
        );
    }

    #[test]
    fn lists_no_entry_holds_are_swept_to_make_room() {
        let mut lists = SharedLists::new(3 * (expected_list(&[100]) + size_of::<List>()));
        let list = |c: &str| -> List { Arc::from(vec![Box::from(c.repeat(100))]) };
        let (a, shared) = lists.share(list("a"));
        assert!(shared);
        let kept: Vec<List> = ["b", "c"].map(|c| lists.share(list(c)).0).into();
        drop(a);
        // Full: "d" is turned away until as many lists as are held have been, then the
        // sweep drops "a", which nothing else holds, and "d" fits.
        let mut tries = 0;
        let d = loop {
            tries += 1;
            let (d, shared) = lists.share(list("d"));
            if shared {
                break d;
            }
            assert!(tries <= 4, "never swept");
        };
        assert_eq!(tries, 4);
        assert_eq!(lists.held.len(), 3);
        assert!(lists.held.contains(&*d) && kept.iter().all(|k| lists.held.contains(&**k)));
        assert!(!lists.held.contains(&*list("a")));
    }

    #[test]
    fn the_digest_key_is_drawn_for_each_cache() {
        let one = TokenCache::new(16, 1 << 20);
        let other = TokenCache::new(16, 1 << 20);
        let digest =
            |cache: &TokenCache, token: &str| cache.held.as_ref().unwrap().digester.digest(token);
        assert_eq!(digest(&one, "a.b.c"), digest(&one, "a.b.c"));
        assert_ne!(digest(&one, "a.b.c"), digest(&other, "a.b.c"));
        assert_ne!(digest(&one, "a.b.c"), digest(&one, "a.b.d"));
        // Not the unkeyed SHA-256 of the token either.
        use sha2::Digest as _;
        let plain: TokenDigest = Sha256::digest(b"a.b.c").into();
        assert_ne!(digest(&one, "a.b.c"), plain);
        // A token cached in one is not in the other.
        one.insert("a.b.c", verified(claims(), Some("k1"), 1));
        let (config, published) = (config(), keys(&[(Some("k1"), 1)]));
        assert!(one.get("a.b.c", &config, &published, NOW).is_some());
        assert!(other.get("a.b.c", &config, &published, NOW).is_none());
    }

    #[test]
    fn a_token_that_differs_in_any_one_byte_is_not_a_hit() {
        let cache = TokenCache::new(16, 1 << 20);
        let (config, published) = (config(), keys(&[(Some("k1"), 1)]));
        let token: String = (0..1_100)
            .map(|i| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789-_."[i % 39]))
            .collect();
        cache.insert(&token, verified(claims(), Some("k1"), 1));
        assert!(cache.get(&token, &config, &published, NOW).is_some());
        let mut bytes = token.clone().into_bytes();
        for i in 0..bytes.len() {
            let was = bytes[i];
            bytes[i] = if was == b'A' { b'B' } else { b'A' };
            let changed = std::str::from_utf8(&bytes).unwrap();
            assert!(
                cache.get(changed, &config, &published, NOW).is_none(),
                "byte {i}"
            );
            bytes[i] = was;
        }
        // Nor is a token one byte longer or shorter.
        for other in [&token[..token.len() - 1], &format!("{token}a"), &token[1..]] {
            assert!(cache.get(other, &config, &published, NOW).is_none());
        }
        assert_eq!((cache.hits(), cache.len()), (1, 1));
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
            let handed = off.insert("a.b.c", verified(claims(), Some("k1"), 1));
            assert_eq!(handed.kid(), Some("k1"));
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
        let held = |entry: VerifiedToken, config: &Config| {
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
        assert!(!held(other_issuer, &config));

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
