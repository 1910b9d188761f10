//! The configuration as written: serde types that mirror the YAML keys one to one,
//! with the line of every value kept for messages. Nothing here is validated beyond
//! shape; `Compiler` in the parent module does that.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// A value with the line it was written on.
#[derive(Clone, Debug)]
pub struct Spanned<T> {
    pub value: T,
    line: u32,
}

impl<T> Spanned<T> {
    pub fn line(&self) -> u32 {
        self.line
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Spanned<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = serde_saphyr::Spanned::<T>::deserialize(d)?;
        Ok(Spanned {
            value: s.value,
            line: u32::try_from(s.referenced.line()).unwrap_or(u32::MAX),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub listen: RawListen,
    pub issuers: Spanned<Vec<Spanned<RawIssuer>>>,
    #[serde(default)]
    pub keys: RawKeys,
    #[serde(default)]
    pub tokens: RawTokens,
    pub backends: Spanned<Vec<Spanned<RawBackend>>>,
    #[serde(default)]
    pub unit_primitives: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub enforce_min_version: Option<Spanned<bool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub grpc: Option<Spanned<String>>,
    pub admin: Option<Spanned<String>>,
    pub tls: Option<Spanned<RawTls>>,
    pub admin_tls: Option<Spanned<RawTls>>,
}

/// `listen.tls` and `listen.admin_tls`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: Spanned<PathBuf>,
    pub key_file: Spanned<PathBuf>,
    pub client_ca_file: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIssuer {
    pub url: Spanned<String>,
    pub jwks_uri: Option<Spanned<String>>,
    pub jwks_file: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeys {
    pub refresh_interval: Option<Spanned<String>>,
    pub min_refresh_interval: Option<Spanned<String>>,
    pub unknown_kid_wait: Option<Spanned<String>>,
    pub fetch_timeout: Option<Spanned<String>>,
    pub cache_dir: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokens {
    pub algorithms: Option<Spanned<Vec<Spanned<String>>>>,
    pub leeway: Option<Spanned<String>>,
    pub max_bytes: Option<Spanned<usize>>,
    pub cache_entries: Option<Spanned<usize>>,
    pub cache_bytes: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub name: Spanned<String>,
    pub audience: Option<Spanned<String>>,
    pub backend_service: Option<Spanned<String>>,
    pub routes: Spanned<Vec<Spanned<RawRoute>>>,
    /// claim name → upstream header name.
    pub forward_claims: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    pub mode: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub path: Option<Spanned<String>>,
    pub prefix: Option<Spanned<String>>,
    pub methods: Option<Spanned<Vec<String>>>,
    pub require: Option<Spanned<Vec<Spanned<String>>>>,
    pub require_any: Option<Spanned<Vec<Spanned<String>>>>,
    pub user_tokens: Option<Spanned<bool>>,
    pub unit_primitive_header: Option<Spanned<String>>,
    pub public: Option<Spanned<bool>>,
}

/// Parses with a budget that a hand-written sidecar configuration never comes near,
/// so alias bombs and deep nesting fail fast instead of eating memory.
pub fn parse(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = 32;
    budget.max_aliases = 1_000;
    budget.max_anchors = 1_000;
    budget.max_nodes = 250_000;
    budget.max_documents = 1;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.strict_booleans = true;
    serde_saphyr::from_str_with_options(text, options).map_err(|e| ConfigError::from_yaml(path, &e))
}
