//! One listener's TLS settings as they are now, replaced whole when its files change.
//!
//! Each handshake takes the current `ServerConfig` once ([`ServerTls::acceptor`]); a new
//! one is built from the files and stored whole, so new handshakes use the new
//! certificate while connections already open keep the one they started with. A file
//! that cannot be used is logged and counted, and the settings in use stay.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use super::files::{PemFiles, TlsFileError, server_config};
use crate::config::TlsFiles;
use crate::metrics::Metrics;

/// Which listener, for messages and metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Grpc,
    Admin,
}

impl Listener {
    /// The metric label and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Grpc => "grpc",
            Listener::Admin => "admin",
        }
    }

    /// The configuration key of its TLS settings.
    pub fn config_key(self) -> &'static str {
        match self {
            Listener::Grpc => "listen.tls",
            Listener::Admin => "listen.admin_tls",
        }
    }

    /// gRPC needs HTTP/2; the admin listener speaks HTTP/1.1 only.
    fn alpn(self) -> &'static [&'static [u8]] {
        match self {
            Listener::Grpc => &[b"h2"],
            Listener::Admin => &[b"http/1.1"],
        }
    }
}

/// Reads `files` and builds the listener's TLS settings, without keeping them: what
/// `check-config` and [`ServerTls::load`] do.
pub fn check(listener: Listener, files: &TlsFiles) -> Result<(), TlsFileError> {
    let pem = PemFiles::read(files);
    server_config(listener.config_key(), files, &pem, listener.alpn()).map(drop)
}

/// The TLS settings a listener hands out to new handshakes, and where they come from.
pub struct ServerTls {
    listener: Listener,
    current: ArcSwap<ServerConfig>,
    /// The files, and the fingerprint of their contents when last read (used or not).
    source: Mutex<Source>,
    metrics: Arc<Metrics>,
}

struct Source {
    files: TlsFiles,
    fingerprint: u64,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads the files and builds the first settings; an unusable file is an error (the
    /// sidecar does not start without them).
    pub fn load(
        listener: Listener,
        files: &TlsFiles,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TlsFileError> {
        let pem = PemFiles::read(files);
        let config = server_config(listener.config_key(), files, &pem, listener.alpn())?;
        metrics.tls_listener(listener.as_str());
        Ok(Self {
            listener,
            current: ArcSwap::from_pointee(config),
            source: Mutex::new(Source {
                files: files.clone(),
                fingerprint: pem.fingerprint(),
            }),
            metrics,
        })
    }

    pub fn listener(&self) -> Listener {
        self.listener
    }

    /// An acceptor with the settings in use now, for one handshake.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// Reads the files again (a configuration reload), from `files` if given (the
    /// reloaded configuration may name others), and uses them if they are good.
    /// Blocking: reads files.
    pub fn reload(&self, files: Option<&TlsFiles>) -> Result<(), TlsFileError> {
        let mut source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(files) = files {
            source.files = files.clone();
        }
        let pem = PemFiles::read(&source.files);
        self.use_files(&mut source, pem)
    }

    /// Reads the files again and, if their contents differ from the last read, uses them
    /// (if they are good). Returns whether they had changed. Blocking: reads files.
    pub fn reload_if_changed(&self) -> bool {
        let mut source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        let pem = PemFiles::read(&source.files);
        if pem.fingerprint() == source.fingerprint {
            return false;
        }
        tracing::info!(
            listener = self.listener.as_str(),
            "the TLS certificate files changed; reloading them"
        );
        let _ = self.use_files(&mut source, pem);
        true
    }

    /// Counts a failed handshake.
    pub(crate) fn handshake_failed(&self) {
        self.metrics.tls_handshake_failed(self.listener.as_str());
    }

    fn use_files(&self, source: &mut Source, pem: PemFiles) -> Result<(), TlsFileError> {
        // Remembered whether usable or not: a bad file is reported once, not on every
        // look, and is read again as soon as it changes.
        source.fingerprint = pem.fingerprint();
        let built = server_config(
            self.listener.config_key(),
            &source.files,
            &pem,
            self.listener.alpn(),
        );
        self.metrics
            .tls_reloaded(self.listener.as_str(), built.is_ok());
        match built {
            Ok(config) => {
                self.current.store(Arc::new(config));
                tracing::info!(
                    listener = self.listener.as_str(),
                    "TLS certificate reloaded; new connections use it"
                );
                Ok(())
            }
            Err(error) => {
                tracing::error!(
                    listener = self.listener.as_str(),
                    %error,
                    "TLS certificate reload rejected; still serving the previous certificate"
                );
                Err(error)
            }
        }
    }
}
