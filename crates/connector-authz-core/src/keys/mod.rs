//! Issuers' public keys: the immutable [`KeySnapshot`] that requests read, and how key
//! sets are parsed ([`jwks`]). Fetching and refreshing them is the sidecar's job.
//!
//! A snapshot is never mutated: a refresh builds a new [`KeySet`] for one issuer and
//! swaps a whole new snapshot in. Keys of one issuer never verify another issuer's token,
//! so every lookup goes through the issuer first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use jsonwebtoken::{Algorithm, DecodingKey};

pub mod jwks;

/// Where a key set came from; shown in logs, readiness and `explain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// Fetched from the issuer over the network.
    Network,
    /// Read from a `jwks_file` in the configuration.
    File,
    /// Read from `keys.cache_dir` at start-up.
    Cache,
    /// The embedded development issuer of `serve --dev`.
    Dev,
}

/// One public key that can verify signatures.
#[derive(Clone)]
pub struct VerifyingKey {
    /// The JWK `kid`, when the key set gives one.
    pub kid: Option<String>,
    /// The JWK `alg`, when the key set pins one; a token must then use exactly it.
    pub alg: Option<Algorithm>,
    /// The key material, ready for `jsonwebtoken::crypto::verify`.
    pub key: DecodingKey,
    /// A stable fingerprint of the key material (not the kid), so that a cache of
    /// verified tokens can tell whether the key that verified a token is still published.
    pub fingerprint: u64,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("fingerprint", &format_args!("{:016x}", self.fingerprint))
            .finish()
    }
}

/// All usable keys of one issuer at one moment.
#[derive(Clone, Debug)]
pub struct KeySet {
    pub keys: Vec<VerifyingKey>,
    pub source: KeySource,
    pub loaded_at: SystemTime,
}

impl KeySet {
    pub fn new(keys: Vec<VerifyingKey>, source: KeySource, loaded_at: SystemTime) -> Self {
        Self {
            keys,
            source,
            loaded_at,
        }
    }

    /// The key with this `kid`. Key sets are small (a handful of keys), so a scan beats a map.
    pub fn by_kid(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.iter().find(|k| k.kid.as_deref() == Some(kid))
    }
}

/// The keys of every configured issuer, keyed by the issuer's canonical name
/// (its configured `url` without a trailing slash). An issuer that is configured but
/// absent here has no keys yet: its tokens get `keys_unavailable`.
#[derive(Clone, Debug, Default)]
pub struct KeySnapshot {
    issuers: HashMap<Arc<str>, Arc<KeySet>>,
}

impl KeySnapshot {
    pub fn get(&self, issuer: &str) -> Option<&Arc<KeySet>> {
        self.issuers.get(issuer)
    }

    /// A new snapshot with `issuer`'s keys replaced; the rest are shared, not copied.
    pub fn with_issuer(&self, issuer: Arc<str>, keys: Arc<KeySet>) -> Self {
        let mut issuers = self.issuers.clone();
        issuers.insert(issuer, keys);
        Self { issuers }
    }

    /// A new snapshot with only the issuers `keep` accepts (a reload drops the others).
    pub fn retain_issuers(&self, keep: impl Fn(&str) -> bool) -> Self {
        let mut issuers = self.issuers.clone();
        issuers.retain(|name, _| keep(name));
        Self { issuers }
    }

    pub fn issuers(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<KeySet>)> {
        self.issuers.iter()
    }
}

/// The canonical form of an issuer identifier: one trailing slash ignored, so that
/// `https://customers.gitlab.com/` (its discovery document) and
/// `https://customers.gitlab.com` (its tokens) name the same issuer.
pub fn canonical_issuer(iss: &str) -> &str {
    iss.strip_suffix('/').unwrap_or(iss)
}

/// Asks for one refresh of an issuer's keys because a token named a `kid` that the
/// snapshot does not hold. Implementations share one fetch among all callers waiting
/// for the same issuer (single flight) and rate-limit it; the future resolves when that
/// refresh has finished (or was skipped), after which the caller loads the snapshot again.
pub trait KeyRefresher: Send + Sync {
    fn refresh_unknown_kid(
        &self,
        issuer: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;
}
