//! Keeping every issuer's keys fresh: the [`KeyManager`].
//!
//! It owns one background task per network issuer (discovery → `jwks_uri` → key set on
//! `keys.refresh_interval`, jittered), the unknown-`kid` refresh ([`KeyRefresher`]), the
//! cache directory at start and after every good fetch, and the readiness signal. It does
//! not parse or fetch (that is [`fetch`](super::fetch) and [`jwks`](super::jwks)), it
//! never makes a request wait on a lock, and it knows nothing of decisions: a fetch runs
//! in its own task, builds its [`KeySet`] outside any lock, and hands a whole new
//! [`KeySnapshot`] (only that issuer's keys replaced) to the [`KeyPublisher`] that the
//! serving side owns.
//!
//! The rules, each kept by one place below:
//! - A failed fetch never removes keys: the last good set stays until a good one replaces
//!   it. An answer that is not a usable key set is a failure like a timeout is.
//! - After a failure the issuer is retried with exponential backoff ([`retry_step`]:
//!   1 s, 2 s, 4 s … capped at 5 min and at `refresh_interval`), each wait shortened by up
//!   to 20 % at random; after a success the next refresh is `refresh_interval` ± 10 %.
//!   The jitter spreads a fleet of sidecars so that they do not hit an issuer together.
//! - One fetch per issuer at a time (single flight). An unknown `kid` joins the fetch in
//!   progress, or starts one if no unknown-kid refresh has started within
//!   `min_refresh_interval` (scheduled fetches and the one at start do not count).
//! - Issuers are independent: each has its own task and flight, and every GET is bounded
//!   by `fetch_timeout`, so a hanging issuer delays nobody else.
//! - Cached keys only fill a gap at start; they never replace keys already held.
//! - A reload ([`KeyManager::reconfigure`]) gives the serving side the keys for the new
//!   configuration to swap in together with it (config reload itself is
//!   `crate::reload`); new issuers start their tasks, removed ones stop.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::Rng as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::cache::KeyCache;
use super::fetch::{
    FetchError, FetchFuture, Fetcher, HttpFetcher, IssuerSource, fetch_key_set, load_key_file,
};
use super::jwks::{KeyLimits, ParsedKeySet};
use super::{KeyRefresher, KeySet, KeySnapshot, KeySource, canonical_issuer};
use crate::config::{Config, Issuer, KeySettings, KeysFrom};

/// The first retry after a failure waits about this long.
pub(crate) const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Retries never wait longer than this (nor longer than `keys.refresh_interval`).
pub(crate) const MAX_RETRY: Duration = Duration::from_secs(5 * 60);

/// The backoff step after `failures` consecutive failures (1, 2, …): [`FIRST_RETRY`]
/// doubled per failure, capped at [`MAX_RETRY`] and at `refresh_interval`. The actual wait
/// is this step shortened by up to 20 % at random.
pub(crate) fn retry_step(failures: u32, refresh_interval: Duration) -> Duration {
    let cap = MAX_RETRY.min(refresh_interval);
    let doublings = failures.saturating_sub(1).min(30);
    FIRST_RETRY.saturating_mul(1 << doublings).min(cap)
}

fn retry_delay(failures: u32, refresh_interval: Duration) -> Duration {
    retry_step(failures, refresh_interval).mul_f64(rand::rng().random_range(0.8..=1.0))
}

fn scheduled_delay(refresh_interval: Duration) -> Duration {
    refresh_interval.mul_f64(rand::rng().random_range(0.9..=1.1))
}

/// Where key refresh puts the keys it loads: the seam between keeping keys fresh and
/// deciding with them. The serving side owns the snapshot that requests are decided with
/// and implements this (`crate::reload`); key refresh sees keys and issuer names only.
pub(crate) trait KeyPublisher: Send + Sync {
    /// The keys requests are decided with now.
    fn keys(&self) -> Arc<KeySnapshot>;

    /// Replaces the published keys with `update(current keys)` in one atomic step; `None`
    /// leaves them as they are. `update` may run more than once when another change races
    /// it. Keys of an issuer that the configuration in use does not name are never
    /// published (a reload may have removed it while its fetch was running).
    fn update_keys(&self, update: &mut dyn FnMut(&KeySnapshot) -> Option<KeySnapshot>);

    /// The issuers the configuration in use names that have no keys (from the network, a
    /// file or the cache). The sidecar is ready when this is empty.
    fn missing_issuers(&self) -> Vec<Arc<str>>;
}

/// Fetch counters of one network issuer; `/metrics` reads them at each scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Fetches started (scheduled, retries and unknown-`kid` refreshes).
    pub attempts: u64,
    /// Fetches that installed a new key set.
    pub successes: u64,
    /// Fetches that did not give a usable key set.
    pub failures: u64,
    /// Failures since the last success; 0 when the issuer is healthy.
    pub consecutive_failures: u32,
}

/// Starts and owns the key refresh of every configured issuer; see the module docs.
/// Dropping it (or [`KeyManager::shutdown`]) stops the background tasks.
pub struct KeyManager {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    first_fetches: Vec<watch::Receiver<Option<Outcome>>>,
    /// Reloads apply one at a time.
    reconfiguring: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for KeyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyManager")
            .field(
                "issuers",
                &self.shared.issuers.load().keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl KeyManager {
    /// [`KeyManager::start`] with the real HTTP client, bounded by `keys.fetch_timeout`
    /// and the default [`KeyLimits`].
    pub(crate) fn start_http(
        config: &Config,
        publisher: Arc<dyn KeyPublisher>,
    ) -> Result<Arc<Self>, FetchError> {
        let limits = KeyLimits::default();
        // Each GET is bounded by the configured `fetch_timeout` (which a reload may
        // change); the client's own timeout is only the ceiling the configuration allows.
        let fetcher =
            HttpFetcher::new(crate::config::MAX_FETCH_TIMEOUT, limits.max_document_bytes)?;
        Ok(Self::start(config, publisher, Arc::new(fetcher), limits))
    }

    /// Loads what is at hand at once (`jwks_file` issuers, then the cache directory for
    /// network issuers that have no keys yet), so that readiness is known when this
    /// returns, and spawns one refresh task per network issuer, whose first fetch starts
    /// immediately. `config` is the configuration `publisher` serves now; its issuers and
    /// `keys` settings apply. Must be called within a Tokio runtime.
    pub(crate) fn start(
        config: &Config,
        publisher: Arc<dyn KeyPublisher>,
        fetcher: Arc<dyn Fetcher>,
        limits: KeyLimits,
    ) -> Arc<Self> {
        let (stop, stopped) = watch::channel(false);
        let network: HashMap<_, _> = config
            .issuers
            .iter()
            .filter_map(|issuer| {
                let source = network_source(issuer)?;
                Some((
                    Arc::clone(&issuer.name),
                    NetworkIssuer::new(&issuer.name, source),
                ))
            })
            .collect();
        let shared = Arc::new(Shared {
            publisher,
            fetcher,
            limits,
            settings: ArcSwap::from_pointee(config.keys.clone()),
            issuers: ArcSwap::from_pointee(network),
            ready: watch::channel(false).0,
            stopped,
        });

        for issuer in &config.issuers {
            match &issuer.keys_from {
                KeysFrom::JwksFile(path) => shared.load_file(&issuer.name, path),
                _ => shared.load_cached(&issuer.name),
            }
        }
        shared.update_readiness();

        // The first fetches start here rather than in the tasks, so that
        // `initial_load` has them to wait for as soon as this returns.
        let mut first_fetches = Vec::new();
        let mut tasks = Vec::new();
        for issuer in shared.issuers.load().values() {
            let first = shared.begin(issuer, None);
            if let Some(Flight(flight)) = &first {
                first_fetches.push(flight.clone());
            }
            let task = run_schedule(Arc::clone(&shared), Arc::clone(issuer), first);
            tasks.push(tokio::spawn(task));
        }
        Arc::new(Self {
            shared,
            stop,
            tasks: Mutex::new(tasks),
            first_fetches,
            reconfiguring: tokio::sync::Mutex::new(()),
        })
    }

    /// Applies a reloaded configuration to key refresh. `swap` is the serving side's swap
    /// of the configuration: it is called once, and must put `config` in together with
    /// the keys that the function it is given makes of the keys it replaces, in one
    /// atomic step, so that no request sees the new routes without their keys. Those keys
    /// are the current keys of every issuer that remains, the `jwks_file`s read again, and
    /// new network issuers filled from the cache directory; removed issuers' keys leave
    /// with them. Then the refresh of issuers that are gone stops and starts for new ones,
    /// whose first fetch begins at once. A network issuer whose `jwks_uri` changed is
    /// restarted but keeps its keys until the new source answers. Key settings (`keys.*`)
    /// apply from now on. Reloads apply one at a time.
    pub(crate) async fn reconfigure(
        &self,
        config: &Config,
        swap: impl FnOnce(&dyn Fn(&KeySnapshot) -> KeySnapshot),
    ) {
        let _one_at_a_time = self.reconfiguring.lock().await;
        if self.shared.is_stopped() {
            return;
        }
        let old = self.shared.issuers.load_full();
        let mut next = HashMap::new();
        let mut started = Vec::new();
        for issuer in &config.issuers {
            let Some(source) = network_source(issuer) else {
                continue;
            };
            let kept = old.get(&issuer.name).filter(|o| o.source == source);
            let network = match kept {
                Some(existing) => Arc::clone(existing),
                None => {
                    let new = NetworkIssuer::new(&issuer.name, source);
                    started.push(Arc::clone(&new));
                    new
                }
            };
            next.insert(Arc::clone(&issuer.name), network);
        }

        // Keys at hand for the new configuration, read before the swap.
        let mut files = Vec::new();
        for issuer in &config.issuers {
            if let KeysFrom::JwksFile(path) = &issuer.keys_from {
                match load_key_file(path, &self.shared.limits) {
                    Ok(parsed) => {
                        log_skipped_keys(&issuer.name, &parsed);
                        files.push((Arc::clone(&issuer.name), Arc::new(parsed.key_set)));
                    }
                    Err(error) => tracing::error!(
                        issuer = %issuer.name,
                        %error,
                        "the issuer's jwks_file is unusable; keeping the keys it had, if any"
                    ),
                }
            }
        }
        let mut cached = Vec::new();
        if let Some(cache) = config.keys.cache_dir.as_ref().map(KeyCache::new) {
            for issuer in &started {
                if let Some(parsed) = cache.load(&issuer.name, &self.shared.limits) {
                    log_skipped_keys(&issuer.name, &parsed);
                    cached.push((Arc::clone(&issuer.name), Arc::new(parsed.key_set)));
                }
            }
        }

        self.shared.settings.store(Arc::new(config.keys.clone()));
        for (name, issuer) in old.iter() {
            if !next.get(name).is_some_and(|n| Arc::ptr_eq(n, issuer)) {
                issuer.stop.send_replace(true);
                tracing::info!(issuer = %name, "issuer removed or changed by the reload: its key refresh stops");
            }
        }
        self.shared.issuers.store(Arc::new(next));
        swap(&|current: &KeySnapshot| {
            let mut keys = current.retain_issuers(|name| config.issuer(name).is_some());
            for (name, set) in &files {
                keys = keys.with_issuer(Arc::clone(name), Arc::clone(set));
            }
            for (name, set) in &cached {
                if keys.get(name).is_none() {
                    keys = keys.with_issuer(Arc::clone(name), Arc::clone(set));
                }
            }
            keys
        });
        self.shared.update_readiness();

        let mut tasks = lock(&self.tasks);
        tasks.retain(|task| !task.is_finished());
        for issuer in started {
            tracing::info!(issuer = %issuer.name, "issuer added by the reload: fetching its keys");
            let first = self.shared.begin(&issuer, None);
            let task = run_schedule(Arc::clone(&self.shared), issuer, first);
            tasks.push(tokio::spawn(task));
        }
    }

    /// Resolves when every issuer has keys, or else when every issuer's first fetch has
    /// finished (either way; a fetch is bounded by `keys.fetch_timeout` per GET). Serving
    /// can wait for this so that a sidecar that reaches its issuers is ready when it
    /// starts, while one with a warm cache does not wait for the network at all.
    pub(crate) async fn initial_load(&self) {
        let mut ready = self.ready();
        let first_fetches = self.first_fetches.iter().cloned().map(Flight);
        let all_finished = async {
            for flight in first_fetches {
                flight.outcome().await;
            }
        };
        tokio::select! {
            _ = ready.wait_for(|ready| *ready) => {}
            () = all_finished => {}
        }
    }

    /// The configured issuers without keys right now (empty: ready).
    pub fn missing_issuers(&self) -> Vec<Arc<str>> {
        self.shared.publisher.missing_issuers()
    }

    /// `true` while every configured issuer has keys; changes when that does.
    pub(crate) fn ready(&self) -> watch::Receiver<bool> {
        self.shared.ready.subscribe()
    }

    /// The fetch counters of a network issuer (by canonical name); `None` for a
    /// `jwks_file` issuer or an unknown name.
    pub fn fetch_stats(&self, issuer: &str) -> Option<FetchStats> {
        let issuers = self.shared.issuers.load();
        Some(issuers.get(canonical_issuer(issuer))?.stats())
    }

    /// The fetch counters of every network issuer configured now.
    pub(crate) fn all_fetch_stats(&self) -> Vec<(Arc<str>, FetchStats)> {
        let issuers = self.shared.issuers.load();
        issuers
            .iter()
            .map(|(name, issuer)| (Arc::clone(name), issuer.stats()))
            .collect()
    }

    /// Stops the refresh tasks and waits for them; a fetch in progress is abandoned.
    pub(crate) async fn shutdown(&self) {
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for task in tasks {
            task.await.ok();
        }
    }
}

impl KeyRefresher for KeyManager {
    fn refresh_unknown_kid(
        &self,
        issuer: &str,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        // The flight starts here, not when the future is first polled, and runs in its own
        // task: a caller that gives up (drops the future) does not cancel it.
        let min_gap = self.shared.settings.load().min_refresh_interval;
        let flight = self
            .shared
            .issuers
            .load()
            .get(canonical_issuer(issuer))
            .and_then(|issuer| self.shared.begin(issuer, Some(min_gap)));
        Box::pin(async move {
            if let Some(flight) = flight {
                flight.outcome().await;
            }
        })
    }
}

struct Shared {
    publisher: Arc<dyn KeyPublisher>,
    fetcher: Arc<dyn Fetcher>,
    limits: KeyLimits,
    /// The configuration's `keys` settings; a reload replaces them.
    settings: ArcSwap<KeySettings>,
    /// Network issuers by canonical name; `jwks_file` issuers need no state. A reload
    /// replaces the map.
    issuers: ArcSwap<HashMap<Arc<str>, Arc<NetworkIssuer>>>,
    ready: watch::Sender<bool>,
    /// Becomes `true` (or closes) when the manager stops.
    stopped: watch::Receiver<bool>,
}

struct NetworkIssuer {
    name: Arc<str>,
    source: IssuerSource,
    counters: Counters,
    state: Mutex<IssuerState>,
    /// The bytes last written to the cache file, so that an unchanged key set is not
    /// rewritten every refresh; the lock also keeps two writes of one file in order.
    cache_written: tokio::sync::Mutex<Option<Vec<u8>>>,
    /// Set when a reload removes (or replaces) this issuer: its task and fetch stop.
    stop: watch::Sender<bool>,
}

impl NetworkIssuer {
    fn new(name: &Arc<str>, source: IssuerSource) -> Arc<Self> {
        Arc::new(NetworkIssuer {
            name: Arc::clone(name),
            source,
            counters: Counters::default(),
            state: Mutex::new(IssuerState::default()),
            cache_written: tokio::sync::Mutex::new(None),
            stop: watch::channel(false).0,
        })
    }

    fn state(&self) -> MutexGuard<'_, IssuerState> {
        lock(&self.state)
    }

    fn stats(&self) -> FetchStats {
        FetchStats {
            attempts: self.counters.attempts.load(Ordering::Relaxed),
            successes: self.counters.successes.load(Ordering::Relaxed),
            failures: self.counters.failures.load(Ordering::Relaxed),
            consecutive_failures: self.state().consecutive_failures,
        }
    }
}

/// Where a network issuer's keys come from; `None` for a `jwks_file` issuer.
pub(crate) fn network_source(issuer: &Issuer) -> Option<IssuerSource> {
    match &issuer.keys_from {
        KeysFrom::JwksFile(_) => None,
        KeysFrom::Discovery => Some(IssuerSource::Discovery {
            issuer_url: issuer.url.clone(),
        }),
        KeysFrom::JwksUri(jwks_uri) => Some(IssuerSource::JwksUri {
            issuer_url: issuer.url.clone(),
            jwks_uri: jwks_uri.clone(),
        }),
    }
}

#[derive(Default)]
struct Counters {
    attempts: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
}

/// Held only for a few instructions, never across an await.
#[derive(Default)]
struct IssuerState {
    /// The latest fetch; in progress while its value is `None`.
    flight: Option<watch::Receiver<Option<Outcome>>>,
    /// When the last unknown-kid refresh started. Only those count against
    /// `min_refresh_interval`: a scheduled fetch (or the one at start) must not use the
    /// limit up, or a key published just after it is refused until the limit passes.
    last_unknown_kid: Option<Instant>,
    health: Health,
    consecutive_failures: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Health {
    #[default]
    Starting,
    Healthy,
    Failing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Fetched,
    Failed,
    /// Rate-limited: no fetch was started.
    Skipped,
    /// The manager stopped.
    Stopped,
}

/// One fetch in progress (or finished) that any number of callers can wait for.
struct Flight(watch::Receiver<Option<Outcome>>);

impl Flight {
    async fn outcome(mut self) -> Outcome {
        match self.0.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.unwrap_or(Outcome::Stopped),
            // The fetch task ended without a word: it was aborted with the runtime.
            Err(_) => Outcome::Stopped,
        }
    }
}

impl Shared {
    /// Joins the fetch of `issuer` in progress or starts one. With `min_gap` (an unknown-kid
    /// refresh), a fetch is not started if the last unknown-kid refresh started less than
    /// `min_gap` ago (`None` is returned).
    fn begin(
        self: &Arc<Self>,
        issuer: &Arc<NetworkIssuer>,
        min_gap: Option<Duration>,
    ) -> Option<Flight> {
        if self.is_stopped() || *issuer.stop.borrow() {
            return None;
        }
        let mut state = issuer.state();
        if let Some(flight) = &state.flight
            && flight.borrow().is_none()
        {
            return Some(Flight(flight.clone()));
        }
        let now = Instant::now();
        if let Some(gap) = min_gap {
            if state
                .last_unknown_kid
                .is_some_and(|last| now.duration_since(last) < gap)
            {
                return None;
            }
            state.last_unknown_kid = Some(now);
        }
        let (done, flight) = watch::channel(None);
        state.flight = Some(flight.clone());
        drop(state);

        let shared = Arc::clone(self);
        let issuer = Arc::clone(issuer);
        tokio::spawn(async move {
            let fetched = tokio::select! {
                biased;
                () = shared.wait_stopped(&issuer) => {
                    done.send_replace(Some(Outcome::Stopped));
                    return;
                }
                fetched = shared.fetch_and_install(&issuer) => fetched,
            };
            let outcome = if fetched.is_some() {
                Outcome::Fetched
            } else {
                Outcome::Failed
            };
            // Waiters need the new snapshot, not the cache file: tell them first.
            done.send_replace(Some(outcome));
            if let Some(parsed) = fetched {
                shared.write_cache(&issuer, &parsed).await;
            }
        });
        Some(Flight(flight))
    }

    fn is_stopped(&self) -> bool {
        // A closed channel means the manager was dropped, which stops us too.
        *self.stopped.borrow() || self.stopped.has_changed().is_err()
    }

    /// Resolves when the manager stops or a reload removes `issuer`.
    async fn wait_stopped(&self, issuer: &NetworkIssuer) {
        let mut manager = self.stopped.clone();
        let mut this_issuer = issuer.stop.subscribe();
        tokio::select! {
            () = wait_stopped(&mut manager) => {}
            () = wait_stopped(&mut this_issuer) => {}
        }
    }

    fn cache(&self) -> Option<KeyCache> {
        self.settings.load().cache_dir.as_ref().map(KeyCache::new)
    }

    /// One fetch of one issuer; on success its keys are in the snapshot when this returns.
    async fn fetch_and_install(&self, issuer: &NetworkIssuer) -> Option<ParsedKeySet> {
        issuer.counters.attempts.fetch_add(1, Ordering::Relaxed);
        let fetcher = Bounded {
            inner: Arc::clone(&self.fetcher),
            timeout: self.settings.load().fetch_timeout,
        };
        match fetch_key_set(&fetcher, &issuer.source, &self.limits).await {
            Ok(parsed) => {
                issuer.counters.successes.fetch_add(1, Ordering::Relaxed);
                log_skipped_keys(&issuer.name, &parsed);
                self.install(&issuer.name, Arc::new(parsed.key_set.clone()));
                self.update_readiness();
                self.record_success(issuer, &parsed);
                Some(parsed)
            }
            Err(error) => {
                issuer.counters.failures.fetch_add(1, Ordering::Relaxed);
                self.record_failure(issuer, &error);
                None
            }
        }
    }

    /// Publishes `issuer`'s keys, keeping every other issuer's. Cached keys never replace
    /// keys already held (and the publisher drops those of an issuer no longer
    /// configured). Returns whether the keys were offered.
    fn install(&self, issuer: &Arc<str>, keys: Arc<KeySet>) -> bool {
        let mut installed = false;
        self.publisher.update_keys(&mut |current| {
            let stale = keys.source == KeySource::Cache && current.get(issuer).is_some();
            installed = !stale;
            installed.then(|| current.with_issuer(Arc::clone(issuer), Arc::clone(&keys)))
        });
        installed
    }

    fn update_readiness(&self) {
        let mut now_ready = false;
        // Computed under the channel's lock, so two issuers finishing together cannot
        // publish their answers in the wrong order.
        let changed = self.ready.send_if_modified(|ready| {
            now_ready = self.publisher.missing_issuers().is_empty();
            std::mem::replace(ready, now_ready) != now_ready
        });
        if changed && now_ready {
            tracing::info!("every issuer has keys: ready");
        } else if changed {
            tracing::warn!("an issuer has no keys: not ready");
        }
    }

    fn record_success(&self, issuer: &NetworkIssuer, parsed: &ParsedKeySet) {
        let (was, failures) = {
            let mut state = issuer.state();
            let failures = std::mem::take(&mut state.consecutive_failures);
            (
                std::mem::replace(&mut state.health, Health::Healthy),
                failures,
            )
        };
        let keys = parsed.key_set.keys.len();
        match was {
            Health::Starting => {
                tracing::info!(issuer = %issuer.name, keys, "fetched the issuer's keys")
            }
            Health::Failing => tracing::info!(
                issuer = %issuer.name,
                keys,
                failed_attempts = failures,
                "fetching the issuer's keys works again"
            ),
            Health::Healthy => {
                tracing::debug!(issuer = %issuer.name, keys, "refreshed the issuer's keys")
            }
        }
    }

    fn record_failure(&self, issuer: &NetworkIssuer, error: &FetchError) {
        let (was, failures) = {
            let mut state = issuer.state();
            state.consecutive_failures = state.consecutive_failures.saturating_add(1);
            let was = std::mem::replace(&mut state.health, Health::Failing);
            (was, state.consecutive_failures)
        };
        let refresh_interval = self.settings.load().refresh_interval;
        let retry_in = humantime::format_duration(retry_step(failures, refresh_interval));
        if was == Health::Failing {
            // Once per state change at warn; each further attempt only at debug.
            tracing::debug!(issuer = %issuer.name, %error, failures, %retry_in, "key fetch failed again");
        } else if self.publisher.keys().get(&issuer.name).is_some() {
            tracing::warn!(
                issuer = %issuer.name,
                %error,
                %retry_in,
                "could not refresh the issuer's keys; keeping the last good keys and retrying with backoff"
            );
        } else {
            tracing::warn!(
                issuer = %issuer.name,
                %error,
                %retry_in,
                "could not fetch the issuer's keys; its tokens get 503 keys_unavailable until a fetch succeeds"
            );
        }
    }

    fn load_file(&self, issuer: &Arc<str>, path: &std::path::Path) {
        match load_key_file(path, &self.limits) {
            Ok(parsed) => {
                log_skipped_keys(issuer, &parsed);
                self.install(issuer, Arc::new(parsed.key_set));
            }
            Err(error) => tracing::error!(
                %issuer,
                %error,
                "the issuer's jwks_file is unusable; its tokens get 503 keys_unavailable"
            ),
        }
    }

    fn load_cached(&self, issuer: &Arc<str>) {
        let Some(parsed) = self.cache().and_then(|c| c.load(issuer, &self.limits)) else {
            return;
        };
        log_skipped_keys(issuer, &parsed);
        let keys = parsed.key_set.keys.len();
        if self.install(issuer, Arc::new(parsed.key_set.clone())) {
            tracing::info!(%issuer, keys, "using cached keys until the first fetch succeeds");
        }
        if let Some(network) = self.issuers.load().get(issuer) {
            // What the file holds already; no need to write it again unless it changes.
            if let Ok(mut written) = network.cache_written.try_lock() {
                *written = Some(parsed.accepted_jwks_bytes());
            }
        }
    }

    async fn write_cache(&self, issuer: &NetworkIssuer, parsed: &ParsedKeySet) {
        let Some(cache) = self.cache() else {
            return;
        };
        let bytes = parsed.accepted_jwks_bytes();
        let mut written = issuer.cache_written.lock().await;
        if written.as_deref() == Some(&bytes[..]) {
            return;
        }
        let name = Arc::clone(&issuer.name);
        let stored = tokio::task::spawn_blocking({
            let bytes = bytes.clone();
            move || cache.store(&name, &bytes)
        })
        .await;
        match stored {
            Ok(Ok(_)) => *written = Some(bytes),
            Ok(Err(error)) => tracing::warn!(
                issuer = %issuer.name,
                %error,
                "could not write the key cache; a restart while the issuer is down will not be ready"
            ),
            Err(error) => {
                tracing::warn!(issuer = %issuer.name, %error, "key cache write did not finish")
            }
        }
    }
}

fn log_skipped_keys(issuer: &str, parsed: &ParsedKeySet) {
    for warning in &parsed.warnings {
        tracing::warn!(%issuer, "{warning}");
    }
}

/// The life of one network issuer (its first fetch already started): fetch, wait (`refresh_interval` ± 10 % after a
/// success, the backoff after a failure), again, until the manager stops.
async fn run_schedule(shared: Arc<Shared>, issuer: Arc<NetworkIssuer>, first: Option<Flight>) {
    let mut next = first;
    loop {
        if *issuer.stop.borrow() {
            return;
        }
        let outcome = match next.take().or_else(|| shared.begin(&issuer, None)) {
            Some(flight) => flight.outcome().await,
            None => Outcome::Skipped,
        };
        let refresh_interval = shared.settings.load().refresh_interval;
        let delay = match outcome {
            Outcome::Fetched | Outcome::Skipped => scheduled_delay(refresh_interval),
            Outcome::Failed => retry_delay(issuer.state().consecutive_failures, refresh_interval),
            Outcome::Stopped => return,
        };
        tokio::select! {
            biased;
            () = shared.wait_stopped(&issuer) => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn wait_stopped(stopped: &mut watch::Receiver<bool>) {
    // An error means the manager is gone, which stops us too.
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Bounds each GET by `keys.fetch_timeout` whatever the fetcher does, so that a hanging
/// issuer costs a timeout and a retry, never a stuck task.
struct Bounded {
    inner: Arc<dyn Fetcher>,
    timeout: Duration,
}

impl Fetcher for Bounded {
    fn get(&self, url: &str) -> FetchFuture<'_> {
        let url = url.to_owned();
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, self.inner.get(&url)).await {
                Ok(answer) => answer,
                Err(_) => Err(FetchError::Timeout {
                    url,
                    timeout: self.timeout,
                }),
            }
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code panics while holding these locks; if one did, its data is still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests;
