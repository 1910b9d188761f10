//! A listener's certificate files (PEM) → a rustls `ServerConfig`, with an error that
//! names the configuration key, the file and what to do about it.
//!
//! The files are read once into [`PemFiles`]; the same bytes are fingerprinted (to see
//! whether they changed) and turned into the configuration, so a file rewritten between
//! the two is never half seen.

use std::hash::{Hash as _, Hasher as _};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{RootCertStore, ServerConfig};

use crate::config::{ConfigError, ConfigFile, TlsFiles};

/// A certificate chain, a key or a CA bundle is a few kilobytes; this bounds a mistake
/// such as pointing `cert_file` at a log file.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// A certificate file that cannot be used: which key of the configuration named it, the
/// file, its line in the configuration, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} {file}: {problem}")]
pub struct TlsFileError {
    /// `listen.tls.cert_file`, `listen.admin_tls.client_ca_file`, ...
    pub key: String,
    /// The path as written (and where it resolved to when relative).
    pub file: String,
    /// The configuration line that names the file.
    pub line: u32,
    pub problem: String,
}

impl TlsFileError {
    fn new(key: &str, file: &ConfigFile, problem: impl Into<String>) -> Self {
        Self {
            key: key.to_owned(),
            file: file.shown(),
            line: file.line,
            problem: problem.into(),
        }
    }

    /// The error as a configuration error of `config_file`, at the line naming the file.
    pub fn in_config(&self, config_file: &Path) -> ConfigError {
        ConfigError::new(
            config_file,
            self.line,
            format!("{} {}: {}", self.key, self.file, self.problem),
        )
    }
}

/// The contents of a listener's certificate files, or why one could not be read.
#[derive(Debug, Hash)]
pub(crate) struct PemFiles {
    cert: Result<Vec<u8>, String>,
    key: Result<Vec<u8>, String>,
    client_ca: Option<Result<Vec<u8>, String>>,
}

impl PemFiles {
    /// Reads the files (following symlinks: a Kubernetes Secret volume swaps `..data`).
    pub(crate) fn read(files: &TlsFiles) -> Self {
        Self {
            cert: read(&files.cert_file.path),
            key: read(&files.key_file.path),
            client_ca: files.client_ca_file.as_ref().map(|f| read(&f.path)),
        }
    }

    /// A hash of what was read, errors included: equal fingerprints mean nothing changed.
    pub(crate) fn fingerprint(&self) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut hasher);
        hasher.finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    let metadata =
        std::fs::metadata(path).map_err(|e| format!("cannot read it: {}", io_problem(&e)))?;
    if !metadata.is_file() {
        return Err("is not a file; give the path of a PEM file".to_owned());
    }
    if metadata.len() > MAX_PEM_BYTES {
        return Err(format!(
            "is larger than {MAX_PEM_BYTES} bytes; a PEM certificate or key is a few kilobytes"
        ));
    }
    std::fs::read(path).map_err(|e| format!("cannot read it: {}", io_problem(&e)))
}

fn io_problem(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_owned(),
        std::io::ErrorKind::PermissionDenied => {
            "permission denied (the sidecar's user must be able to read it)".to_owned()
        }
        _ => e.to_string(),
    }
}

/// The TLS settings of one listener: its certificate and key, the CAs its clients'
/// certificates must chain to (when `client_ca_file` is set), and the ALPN protocols it
/// offers. `prefix` is the configuration key (`listen.tls`, `listen.admin_tls`).
pub(crate) fn server_config(
    prefix: &str,
    files: &TlsFiles,
    pem: &PemFiles,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsFileError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cert_key = format!("{prefix}.cert_file");
    let key_key = format!("{prefix}.key_file");
    let cert_error = |problem: String| TlsFileError::new(&cert_key, &files.cert_file, problem);
    let key_error = |problem: String| TlsFileError::new(&key_key, &files.key_file, problem);

    let chain = certificates(pem.cert.as_deref()).map_err(cert_error)?;
    let key = private_key(pem.key.as_deref()).map_err(key_error)?;
    let signing_key = provider.key_provider.load_private_key(key).map_err(|e| {
        key_error(format!(
            "the key cannot be used ({e}); give an RSA, ECDSA (P-256, P-384) or Ed25519 key"
        ))
    })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(key_error(format!(
                "is not the private key of the certificate in {cert_key} ({}); give the key the certificate was issued for",
                files.cert_file.shown()
            )));
        }
        Err(e) => {
            return Err(cert_error(format!(
                "the first certificate cannot be used ({e}); it must be the server's own certificate, followed by its intermediates"
            )));
        }
    }

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| cert_error(format!("no TLS version available: {e}")))?;
    let builder = match (&files.client_ca_file, &pem.client_ca) {
        (Some(file), Some(bytes)) => {
            let ca_key = format!("{prefix}.client_ca_file");
            let ca_error = |problem: String| TlsFileError::new(&ca_key, file, problem);
            let mut roots = RootCertStore::empty();
            for ca in certificates(bytes.as_deref()).map_err(ca_error)? {
                roots.add(ca).map_err(|e| {
                    ca_error(format!(
                        "holds a certificate that cannot be a CA ({e}); give the PEM certificates of the CAs that issue client certificates"
                    ))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ca_error(format!("cannot verify clients with it: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Every certificate in a PEM file; at least one.
fn certificates(bytes: Result<&[u8], &String>) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = bytes.map_err(Clone::clone)?;
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("is not valid PEM ({e})"))?;
    if certs.is_empty() {
        return Err(
            "holds no certificate; give PEM certificates (-----BEGIN CERTIFICATE-----)".to_owned(),
        );
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
fn private_key(bytes: Result<&[u8], &String>) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = bytes.map_err(Clone::clone)?;
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            "holds no private key; give a PEM key (-----BEGIN PRIVATE KEY-----, or RSA PRIVATE KEY, or EC PRIVATE KEY)".to_owned()
        }
        e => format!("is not valid PEM ({e})"),
    })
}
