//! TLS on the listeners (`listen.tls` for gRPC, `listen.admin_tls` for the admin
//! endpoints), with rustls and the aws-lc provider the sidecar already uses for keys.
//!
//! - [`files`]: the PEM files → a rustls `ServerConfig`; every problem is a
//!   [`TlsFileError`] naming the configuration key, the file and the fix.
//! - [`server_tls`]: a listener's settings in use, swapped whole when the files change
//!   ([`watch`]: a look at their contents every few seconds) or on a configuration
//!   reload; a bad file keeps the previous certificate serving.
//! - [`incoming`]: accepting and handshaking, each handshake in its own task.
//!
//! Without these keys a listener is plain TCP, served by [`crate::transport`] exactly
//! as before: nothing here sits on that path.
//!
//! Why a look every few seconds rather than file notifications: cert-manager and the
//! kubelet replace a Secret volume's files by swapping a `..data` symlink, other tools
//! rewrite the files in place; reading three small files every [`TLS_POLL_INTERVAL`] sees
//! both with no platform-specific watcher, at a cost of microseconds.

mod files;
mod incoming;
mod server_tls;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use files::TlsFileError;
pub use incoming::{HANDSHAKE_TIMEOUT, TlsConnection, TlsIncoming};
pub use server_tls::{Listener, ServerTls, check};

use crate::config::{Config, ConfigError};

/// How often the certificate files are looked at for changes.
pub const TLS_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Checks every TLS file `config` names, as `serve` would load them: the first problem
/// as a configuration error (the file and line of the key that names the file).
pub fn check_config(config: &Config) -> Result<(), ConfigError> {
    let listeners = [
        (Listener::Grpc, &config.listen.tls),
        (Listener::Admin, &config.listen.admin_tls),
    ];
    for (listener, files) in listeners {
        if let Some(files) = files {
            check(listener, files).map_err(|e| e.in_config(&config.source))?;
        }
    }
    Ok(())
}

/// Looks at the listeners' certificate files every `every` and reloads those whose
/// contents changed, until `stopped` turns `true`.
pub(crate) fn watch(
    listeners: Vec<Arc<ServerTls>>,
    every: Duration,
    mut stopped: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => return,
                _ = ticks.tick() => {}
            }
            let listeners = listeners.clone();
            let looked = tokio::task::spawn_blocking(move || {
                for tls in &listeners {
                    tls.reload_if_changed();
                }
            })
            .await;
            if let Err(e) = looked {
                tracing::error!(error = %e, "looking at the TLS certificate files failed");
            }
        }
    })
}
