//! Configuration reload, and the snapshot that requests are decided with as key refresh
//! sees it.
//!
//! A reload (SIGHUP, a change of the file) loads the configuration file again and, if it
//! is valid, swaps it in whole together with the keys for it (see
//! [`KeyManager::reconfigure`]): a request sees the old configuration or the new one, never
//! a mix. An invalid file is logged with its file and line, counted, and the configuration
//! in use stays.
//!
//! The serving side owns the `ArcSwap<Snapshot>`; key refresh only publishes keys into it
//! through [`KeyPublisher`], implemented here, so `keys/` never sees a configuration swap
//! or a decision. This module does not fetch keys and does not decide.

use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError, Listen};
use crate::decide::Snapshot;
use crate::keys::refresh::KeyPublisher;
use crate::keys::{KeyManager, KeySnapshot};
use crate::metrics::Metrics;
use crate::tls::ServerTls;

impl KeyPublisher for ArcSwap<Snapshot> {
    fn keys(&self) -> Arc<KeySnapshot> {
        Arc::clone(&self.load().keys)
    }

    fn update_keys(&self, update: &mut dyn FnMut(&KeySnapshot) -> Option<KeySnapshot>) {
        self.rcu(|current| match update(&current.keys) {
            None => Arc::clone(current),
            Some(keys) => {
                // A snapshot holds keys only for the issuers its configuration names.
                let keys = keys.retain_issuers(|name| current.config.issuer(name).is_some());
                Arc::new(Snapshot::new(Arc::clone(&current.config), Arc::new(keys)))
            }
        });
    }

    fn missing_issuers(&self) -> Vec<Arc<str>> {
        missing_issuers(&self.load())
    }
}

/// The configured issuers that have no keys in `snapshot`. The sidecar is ready when this
/// is empty.
fn missing_issuers(snapshot: &Snapshot) -> Vec<Arc<str>> {
    snapshot
        .config
        .issuers
        .iter()
        .filter(|issuer| snapshot.keys.get(&issuer.name).is_none())
        .map(|issuer| Arc::clone(&issuer.name))
        .collect()
}

/// Swaps `config` into `snapshot` together with the keys `keys` has for it, in one step.
pub(crate) async fn swap_config(
    snapshot: &ArcSwap<Snapshot>,
    keys: &KeyManager,
    config: Arc<Config>,
) {
    keys.reconfigure(&config, |keys_for| {
        snapshot.rcu(|current| {
            Arc::new(Snapshot::new(
                Arc::clone(&config),
                Arc::new(keys_for(&current.keys)),
            ))
        });
    })
    .await;
}

/// A change made to every reloaded configuration (see [`Reloader::adjust`]).
pub(crate) type AdjustConfig = Box<dyn Fn(&mut Config) + Send + Sync>;

/// Reloads the configuration file on request (SIGHUP, a change of the file).
pub(crate) struct Reloader {
    path: PathBuf,
    /// The listen addresses at start; a reload cannot move them.
    listen: Listen,
    /// The gRPC and admin listeners' TLS settings, when they serve TLS: a reload reads
    /// their files again (from the paths the reloaded configuration gives).
    tls: [Option<Arc<ServerTls>>; 2],
    snapshot: Arc<ArcSwap<Snapshot>>,
    keys: Arc<KeyManager>,
    metrics: Arc<Metrics>,
    one_at_a_time: tokio::sync::Mutex<()>,
    /// Applied to every reloaded configuration before it is checked and swapped in.
    pub(crate) adjust: OnceLock<AdjustConfig>,
    /// The fingerprint of the file contents last loaded (or rejected).
    seen: Mutex<Option<u64>>,
}

impl Reloader {
    pub(crate) fn new(
        path: PathBuf,
        listen: Listen,
        tls: [Option<Arc<ServerTls>>; 2],
        snapshot: Arc<ArcSwap<Snapshot>>,
        keys: Arc<KeyManager>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            path,
            listen,
            tls,
            snapshot,
            keys,
            metrics,
            one_at_a_time: tokio::sync::Mutex::new(()),
            adjust: OnceLock::new(),
            seen: Mutex::new(None),
        }
    }

    pub(crate) async fn reload(&self) -> Result<(), ConfigError> {
        let _one_at_a_time = self.one_at_a_time.lock().await;
        let path = self.path.clone();
        // The fingerprint first: should the file change while it is loaded, the next
        // look sees a difference and loads it again.
        let (fingerprint, loaded) =
            tokio::task::spawn_blocking(move || (file_fingerprint(&path), Config::load(&path)))
                .await
                .map_err(|e| {
                    ConfigError::new(&self.path, 0, format!("reload did not finish: {e}"))
                })?;
        self.remember(fingerprint);
        let mut config = match loaded {
            Ok(config) => config,
            Err(error) => {
                self.metrics.config_reloaded(false);
                tracing::error!(%error, "configuration reload rejected; still serving the previous configuration");
                return Err(error);
            }
        };
        if let Some(adjust) = self.adjust.get() {
            adjust(&mut config);
        }
        if !config.listen.same_addresses(&self.listen) {
            tracing::warn!(
                grpc = %config.listen.grpc,
                admin = %config.listen.admin,
                "listen addresses cannot change on reload; restart connector-authz to move them (still listening on the old ones)"
            );
        }
        let (issuers, routes) = (config.issuers.len(), config.routes.routes().len());
        let listen = config.listen.clone();
        self.metrics.registry_loaded(config.registry.as_deref());
        swap_config(&self.snapshot, &self.keys, Arc::new(config)).await;
        self.metrics.config_reloaded(true);
        tracing::info!(issuers, routes, path = %self.path.display(), "configuration reloaded");
        self.reload_tls(&listen).await;
        Ok(())
    }

    /// Reads the TLS listeners' certificate files again, from the paths `listen` gives.
    /// A file that cannot be used is logged and counted by [`ServerTls::reload`], and the
    /// certificate in use stays: it does not undo the configuration reload.
    async fn reload_tls(&self, listen: &Listen) {
        let configured = [
            (&listen.tls, "listen.tls"),
            (&listen.admin_tls, "listen.admin_tls"),
        ];
        for (tls, (files, key)) in self.tls.iter().zip(configured) {
            match (tls, files) {
                (Some(tls), Some(files)) => {
                    let (tls, files) = (Arc::clone(tls), files.clone());
                    let _ = tokio::task::spawn_blocking(move || tls.reload(Some(&files))).await;
                }
                (None, None) => {}
                (Some(_), None) | (None, Some(_)) => tracing::warn!(
                    key,
                    "TLS cannot be turned on or off on reload; restart connector-authz to change it (the listener keeps serving as it started)"
                ),
            }
        }
    }

    /// Reloads whenever the configuration file's contents change, looking every `every`,
    /// until `stopped` turns `true`. Reading the contents (rather than a modification
    /// time) also sees a Kubernetes ConfigMap update, which swaps a symlink under the
    /// file's path.
    pub(crate) fn watch(
        self: &Arc<Self>,
        every: Duration,
        mut stopped: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let reloader = Arc::clone(self);
        reloader.remember(file_fingerprint(&reloader.path));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => return,
                    _ = ticks.tick() => {}
                }
                let path = reloader.path.clone();
                let now = tokio::task::spawn_blocking(move || file_fingerprint(&path))
                    .await
                    .ok()
                    .flatten();
                // A file that is briefly missing (mid-swap) is not a change.
                if now.is_some() && now != reloader.seen() {
                    tracing::info!(path = %reloader.path.display(), "the configuration file changed; reloading");
                    let _ = reloader.reload().await;
                }
            }
        })
    }

    fn seen(&self) -> Option<u64> {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, fingerprint: Option<u64>) {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = fingerprint;
    }
}

/// A hash of the file's contents (following symlinks); `None` when it cannot be read.
fn file_fingerprint(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    Some(hasher.finish())
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::keys::{KeySet, KeySource};

    fn config(issuers: &[&str]) -> Arc<Config> {
        let issuers: String = issuers.iter().map(|i| format!("  - url: {i}\n")).collect();
        let yaml = format!(
            "issuers:\n{issuers}\
             backends:\n  - name: svc\n    audience: svc\n    routes: [{{prefix: /, require: []}}]\n"
        );
        Arc::new(Config::from_yaml(&yaml, Path::new("test.yaml")).expect("test config"))
    }

    fn some_keys() -> Arc<KeySet> {
        Arc::new(KeySet::new(
            Vec::new(),
            KeySource::Network,
            SystemTime::now(),
        ))
    }

    #[test]
    fn published_keys_go_in_only_for_configured_issuers_and_keep_the_config() {
        let config = config(&["https://a.test", "https://b.test"]);
        let snapshot = ArcSwap::from_pointee(Snapshot::new(Arc::clone(&config), Arc::default()));
        let publisher: &dyn KeyPublisher = &snapshot;
        assert_eq!(publisher.missing_issuers().len(), 2);

        publisher.update_keys(&mut |keys| {
            Some(
                keys.with_issuer("https://a.test".into(), some_keys())
                    .with_issuer("https://gone.test".into(), some_keys()),
            )
        });
        let now = snapshot.load();
        assert!(Arc::ptr_eq(&now.config, &config));
        assert!(now.keys.get("https://a.test").is_some());
        assert!(now.keys.get("https://gone.test").is_none());
        assert_eq!(
            publisher.missing_issuers(),
            [Arc::<str>::from("https://b.test")]
        );

        // `None` leaves the very same snapshot in place.
        let before = snapshot.load_full();
        publisher.update_keys(&mut |_| None);
        assert!(Arc::ptr_eq(&before, &snapshot.load_full()));
    }
}
