//! The configuration file (YAML, see DESIGN.md) → a validated, compiled [`Config`].
//!
//! Everything that can be wrong with a configuration is found here, once, at load time,
//! and reported with the file, the line and what to do. What requests use afterwards
//! (the [`RouteTable`], the issuer index) cannot fail a lookup.

mod raw;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;

pub use crate::algorithm::parse_algorithm;
pub use crate::error::ConfigError;
use crate::fetch_url::check_url;
use crate::keys::canonical_issuer;
use crate::registry::Registry;
use crate::route::{Access, Methods, Pattern, Route, RouteTable, normalize_path};
use raw::{RawBackend, RawConfig, RawIssuer, RawRoute, RawTls, Spanned};

/// The largest configuration file accepted; a sidecar's config is a few kilobytes.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;
/// The most routes one configuration may declare.
pub const MAX_ROUTES: usize = 10_000;

/// The longest `keys.fetch_timeout` accepted.
pub const MAX_FETCH_TIMEOUT: Duration = Duration::from_secs(60);

pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:9191";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9192";

#[derive(Clone, Debug)]
pub struct Config {
    /// The file this was loaded from (for messages and reloads).
    pub source: PathBuf,
    /// The text it was compiled from (what the sidecar's `/v1/snapshot` sends).
    pub text: Arc<str>,
    pub listen: Listen,
    pub issuers: Vec<Issuer>,
    pub keys: KeySettings,
    pub tokens: TokenSettings,
    pub backends: Vec<Backend>,
    pub routes: RouteTable,
    pub registry: Option<Arc<Registry>>,
    pub enforce_min_version: bool,
    issuer_index: IssuerIndex,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listen {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    /// `listen.tls`: TLS on the gRPC listener; plain TCP (h2c) when `None`.
    pub tls: Option<TlsFiles>,
    /// `listen.admin_tls`: TLS on the admin listener; plain HTTP when `None`.
    pub admin_tls: Option<TlsFiles>,
}

impl Listen {
    /// Whether `other` listens on the same addresses (what a reload cannot change).
    pub fn same_addresses(&self, other: &Listen) -> bool {
        self.grpc == other.grpc && self.admin == other.admin
    }
}

/// A listener's certificate files (`listen.tls`, `listen.admin_tls`). This crate only
/// says where they are: the sidecar reads them (PEM), checks them and serves TLS with them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert_file: ConfigFile,
    /// The private key of the leaf certificate.
    pub key_file: ConfigFile,
    /// When set, clients must present a certificate that chains to a CA in this file (mTLS).
    pub client_ca_file: Option<ConfigFile>,
}

/// A file the configuration names, resolved relative to the configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigFile {
    /// Where it is (relative paths joined to the configuration file's directory).
    pub path: PathBuf,
    /// As written in the configuration.
    pub written: PathBuf,
    /// The line it was written on, for messages.
    pub line: u32,
}

impl ConfigFile {
    /// The path for a message: as written, and where it resolved to when relative.
    pub fn shown(&self) -> String {
        shown_path(&self.written, &self.path)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issuer {
    /// The canonical name: the configured `url` without a trailing slash. Tokens'
    /// `iss` and discovery documents' `issuer` are compared with it the same way.
    pub name: Arc<str>,
    /// The `url` as written.
    pub url: String,
    pub keys_from: KeysFrom,
    /// The `jwks_file` as written, when it differs from the resolved path in
    /// [`KeysFrom::JwksFile`] (a relative path): messages show both.
    pub jwks_file_as_written: Option<PathBuf>,
}

/// Where an issuer's keys come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeysFrom {
    /// `{url}/.well-known/openid-configuration` → `jwks_uri` → key set.
    Discovery,
    /// A `jwks_uri` given in the configuration: discovery is skipped.
    JwksUri(String),
    /// A key set file, read at start (and on reload); no network.
    JwksFile(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySettings {
    pub refresh_interval: Duration,
    pub min_refresh_interval: Duration,
    /// How long a request with an unknown `kid` waits for that issuer's refresh.
    pub unknown_kid_wait: Duration,
    pub fetch_timeout: Duration,
    pub cache_dir: Option<PathBuf>,
}

impl KeySettings {
    /// Below the 1 s ext_authz timeout of the shipped Envoy configs, so that a request
    /// that waits for a refresh in vain is still answered (401) rather than timed out (503).
    pub const DEFAULT_UNKNOWN_KID_WAIT: Duration = Duration::from_millis(800);
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSettings {
    pub algorithms: Vec<Algorithm>,
    pub leeway: Duration,
    pub max_bytes: usize,
    /// How many verified tokens the token cache keeps; 0 turns it off.
    pub cache_entries: usize,
    /// The most memory the token cache may hold (tokens and their claims), in bytes.
    pub cache_bytes: u64,
}

impl TokenSettings {
    pub const DEFAULT_CACHE_ENTRIES: usize = 10_000;
    pub const DEFAULT_CACHE_BYTES: u64 = 32 * 1024 * 1024;
    /// A bound on `cache_entries` that keeps a typo from reserving gigabytes.
    pub const MAX_CACHE_ENTRIES: usize = 10_000_000;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub name: Arc<str>,
    /// The `aud` a token must hold for this backend.
    pub audience: Arc<str>,
    /// The registry's backend service this backend is: named by `backend_service:`, or
    /// the one whose `jwt_aud` is `audience`. `None` without a registry or a match.
    pub backend_service: Option<Arc<str>>,
    /// Claims copied to upstream headers on an allow (`forward_claims`).
    pub forward_claims: Vec<ForwardClaim>,
    pub mode: Mode,
}

/// One `forward_claims` entry: the claim `claim`, copied to the header `header`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardClaim {
    pub claim: Box<str>,
    /// Lower case, a valid header name, none of the sidecar's own headers.
    pub header: Box<str>,
}

/// Whether a backend's denials are enforced or only reported (`mode:`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Enforce,
    /// Every denial but `bad_path` becomes an allow that carries `x-gitlab-authz-dry-run`.
    DryRun,
}

/// Upstream headers the sidecar itself sets or removes; `forward_claims` may not name them.
pub const RESERVED_HEADERS: [&str; 10] = [
    "x-gitlab-authz-subject",
    "x-gitlab-authz-issuer",
    "x-gitlab-authz-scopes",
    "x-gitlab-authz-unit-primitive",
    "x-gitlab-authz-dry-run",
    "authorization",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
];

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let metadata = std::fs::metadata(path).map_err(|e| {
            ConfigError::new(path, 0, format!("cannot read the configuration: {e}"))
        })?;
        if metadata.len() > MAX_CONFIG_BYTES as u64 {
            return Err(ConfigError::new(
                path,
                0,
                format!(
                    "the configuration is larger than {MAX_CONFIG_BYTES} bytes; a sidecar's configuration is a few kilobytes"
                ),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(path, 0, format!("cannot read the configuration: {e}"))
        })?;
        Config::from_yaml(&text, path)
    }

    /// Parses and validates configuration text; `path` names it in errors and anchors
    /// relative paths (`jwks_file`, `unit_primitives`, `keys.cache_dir`, the TLS files).
    pub fn from_yaml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        if text.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::new(
                path,
                0,
                format!("the configuration is larger than {MAX_CONFIG_BYTES} bytes"),
            ));
        }
        let raw: RawConfig = raw::parse(text, path)?;
        Compiler {
            path,
            base_dir: path.parent().unwrap_or(Path::new(".")),
            given_registry: None,
        }
        .compile(raw, text)
    }

    /// [`Config::from_yaml`] with the unit primitive registry given rather than read from
    /// the `unit_primitives:` path (which is not opened): how the proxy-wasm filter, which
    /// has no files, rebuilds the sidecar's configuration from its `/v1/snapshot`. The
    /// registry is used only when the text names one, as loading would.
    pub fn from_yaml_with_registry(
        text: &str,
        path: &Path,
        registry: Option<Arc<Registry>>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = raw::parse(text, path)?;
        if raw.unit_primitives.is_some() && registry.is_none() {
            return Err(ConfigError::new(
                path,
                0,
                "the configuration names a unit primitive registry (`unit_primitives:`) but none was given with it",
            ));
        }
        Compiler {
            path,
            base_dir: path.parent().unwrap_or(Path::new(".")),
            given_registry: registry,
        }
        .compile(raw, text)
    }

    /// The configured issuer a token's `iss` names, if any.
    pub fn issuer(&self, iss: &str) -> Option<&Issuer> {
        self.issuer_index
            .get(canonical_issuer(iss))
            .map(|&i| &self.issuers[i])
    }
}

/// A path from the configuration for a message: as written, and for a relative one also
/// where it resolved to (relative to the configuration file's directory, made absolute).
pub fn shown_path(written: &Path, resolved: &Path) -> String {
    if written.is_absolute() {
        return written.display().to_string();
    }
    let absolute = std::path::absolute(resolved).unwrap_or_else(|_| resolved.to_path_buf());
    format!(
        "{} (resolved to {}, relative to the configuration file)",
        written.display(),
        absolute.display()
    )
}

/// Canonical issuer name → index into `Config::issuers`.
type IssuerIndex = HashMap<Arc<str>, usize>;

struct Compiler<'a> {
    path: &'a Path,
    base_dir: &'a Path,
    /// Used instead of loading `unit_primitives:` ([`Config::from_yaml_with_registry`]).
    given_registry: Option<Arc<Registry>>,
}

impl Compiler<'_> {
    fn err(&self, line: u32, message: impl Into<String>) -> ConfigError {
        ConfigError::new(self.path, line, message)
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    fn compile(&self, raw: RawConfig, text: &str) -> Result<Config, ConfigError> {
        let listen = Listen {
            grpc: self.socket_addr(raw.listen.grpc.as_ref(), DEFAULT_GRPC_LISTEN, "listen.grpc")?,
            admin: self.socket_addr(
                raw.listen.admin.as_ref(),
                DEFAULT_ADMIN_LISTEN,
                "listen.admin",
            )?,
            tls: self.tls_files(raw.listen.tls.as_ref(), "listen.tls")?,
            admin_tls: self.tls_files(raw.listen.admin_tls.as_ref(), "listen.admin_tls")?,
        };
        // Port 0 asks the OS for a free port: two of those never collide.
        if listen.grpc == listen.admin && listen.grpc.port() != 0 {
            return Err(self.err(0, "listen.grpc and listen.admin are the same address; give the admin listener its own port"));
        }
        let (issuers, issuer_index) = self.issuers(&raw.issuers)?;
        let keys = self.key_settings(&raw)?;
        let tokens = self.token_settings(&raw)?;
        let registry = match &raw.unit_primitives {
            Some(_) if self.given_registry.is_some() => self.given_registry.clone(),
            Some(dir) => Some(Arc::new(
                Registry::load(&self.resolve(&dir.value)).map_err(|e| {
                    if e.line == 0 && e.file == self.resolve(&dir.value) {
                        let shown = shown_path(&dir.value, &self.resolve(&dir.value));
                        self.err(
                            dir.line(),
                            format!("unit_primitives {shown}: {}", e.message),
                        )
                    } else {
                        e
                    }
                })?,
            )),
            None => None,
        };
        let enforce_min_version = raw.enforce_min_version.as_ref().is_some_and(|v| v.value);
        if enforce_min_version && registry.is_none() {
            let line = raw.enforce_min_version.as_ref().map_or(0, |v| v.line());
            return Err(self.err(line, "enforce_min_version needs the unit primitive registry: set `unit_primitives:` to its directory"));
        }
        let (backends, routes) = self.backends(&raw.backends, registry.as_deref())?;
        Ok(Config {
            source: self.path.to_path_buf(),
            text: Arc::from(text),
            listen,
            issuers,
            keys,
            tokens,
            backends,
            routes,
            registry,
            enforce_min_version,
            issuer_index,
        })
    }

    fn socket_addr(
        &self,
        value: Option<&Spanned<String>>,
        default: &str,
        key: &str,
    ) -> Result<SocketAddr, ConfigError> {
        match value {
            None => Ok(default.parse().expect("default listen addresses are valid")),
            Some(v) => v.value.parse().map_err(|_| {
                self.err(
                    v.line(),
                    format!(
                        "{key}: {:?} is not an address with a port; write it like {default}",
                        v.value
                    ),
                )
            }),
        }
    }

    fn tls_files(
        &self,
        raw: Option<&Spanned<RawTls>>,
        key: &str,
    ) -> Result<Option<TlsFiles>, ConfigError> {
        let Some(raw) = raw else { return Ok(None) };
        let file = |value: &Spanned<PathBuf>, field: &str| {
            if value.value.as_os_str().is_empty() {
                return Err(self.err(
                    value.line(),
                    format!("{key}.{field} is empty; give the path of a PEM file"),
                ));
            }
            Ok(ConfigFile {
                path: self.resolve(&value.value),
                written: value.value.clone(),
                line: value.line(),
            })
        };
        Ok(Some(TlsFiles {
            cert_file: file(&raw.value.cert_file, "cert_file")?,
            key_file: file(&raw.value.key_file, "key_file")?,
            client_ca_file: raw
                .value
                .client_ca_file
                .as_ref()
                .map(|f| file(f, "client_ca_file"))
                .transpose()?,
        }))
    }

    fn duration(
        &self,
        value: Option<&Spanned<String>>,
        default: Duration,
        key: &str,
    ) -> Result<Duration, ConfigError> {
        let Some(v) = value else { return Ok(default) };
        humantime::parse_duration(v.value.trim()).map_err(|e| {
            self.err(
                v.line(),
                format!(
                    "{key}: {:?} is not a duration ({e}); write it like 30s, 5m or 24h",
                    v.value
                ),
            )
        })
    }

    fn issuers(
        &self,
        raw: &Spanned<Vec<Spanned<RawIssuer>>>,
    ) -> Result<(Vec<Issuer>, IssuerIndex), ConfigError> {
        if raw.value.is_empty() {
            return Err(self.err(raw.line(), "issuers: list at least one token issuer (its url, and optionally jwks_uri or jwks_file)"));
        }
        let mut issuers = Vec::new();
        let mut index: HashMap<Arc<str>, usize> = HashMap::new();
        let mut lines: HashMap<Arc<str>, u32> = HashMap::new();
        for entry in &raw.value {
            let line = entry.line();
            let RawIssuer {
                url,
                jwks_uri,
                jwks_file,
            } = &entry.value;
            let url_text = url.value.trim();
            if url_text.is_empty() {
                return Err(self.err(
                    url.line(),
                    "issuers: url is empty; give the issuer's URL as it appears in its tokens' iss",
                ));
            }
            let keys_from = match (jwks_uri, jwks_file) {
                (Some(_), Some(f)) => {
                    return Err(self.err(
                        f.line(),
                        format!("issuer {url_text}: give jwks_uri or jwks_file, not both"),
                    ));
                }
                (Some(uri), None) => {
                    check_url(&uri.value).map_err(|why| {
                        self.err(uri.line(), format!("issuer {url_text}: jwks_uri {why}"))
                    })?;
                    KeysFrom::JwksUri(uri.value.clone())
                }
                (None, Some(file)) => KeysFrom::JwksFile(self.resolve(&file.value)),
                (None, None) => {
                    check_url(url_text).map_err(|why| {
                        self.err(url.line(), format!("issuer {url_text}: url {why} (or give a jwks_file for an issuer without discovery)"))
                    })?;
                    KeysFrom::Discovery
                }
            };
            let name: Arc<str> = canonical_issuer(url_text).into();
            if let Some(first) = lines.get(&name) {
                return Err(self.err(line, format!("issuer {url_text} is listed twice (first at line {first}); keep one entry per issuer")));
            }
            lines.insert(name.clone(), line);
            index.insert(name.clone(), issuers.len());
            let jwks_file_as_written = jwks_file
                .as_ref()
                .map(|f| f.value.clone())
                .filter(|f| f.is_relative());
            issuers.push(Issuer {
                name,
                url: url_text.to_string(),
                keys_from,
                jwks_file_as_written,
            });
        }
        Ok((issuers, index))
    }

    fn key_settings(&self, raw: &RawConfig) -> Result<KeySettings, ConfigError> {
        let k = &raw.keys;
        let settings = KeySettings {
            refresh_interval: self.duration(
                k.refresh_interval.as_ref(),
                Duration::from_secs(24 * 3600),
                "keys.refresh_interval",
            )?,
            min_refresh_interval: self.duration(
                k.min_refresh_interval.as_ref(),
                Duration::from_secs(30),
                "keys.min_refresh_interval",
            )?,
            unknown_kid_wait: self.duration(
                k.unknown_kid_wait.as_ref(),
                KeySettings::DEFAULT_UNKNOWN_KID_WAIT,
                "keys.unknown_kid_wait",
            )?,
            fetch_timeout: self.duration(
                k.fetch_timeout.as_ref(),
                Duration::from_secs(5),
                "keys.fetch_timeout",
            )?,
            cache_dir: k.cache_dir.as_ref().map(|d| self.resolve(&d.value)),
        };
        let line_of = |v: &Option<Spanned<String>>| v.as_ref().map_or(0, |v| v.line());
        if settings.refresh_interval < Duration::from_secs(1) {
            return Err(self.err(
                line_of(&k.refresh_interval),
                "keys.refresh_interval must be at least 1s",
            ));
        }
        if settings.min_refresh_interval < Duration::from_secs(1) {
            return Err(self.err(
                line_of(&k.min_refresh_interval),
                "keys.min_refresh_interval must be at least 1s: it is all that keeps tokens with made-up key ids from making us fetch keys on every request",
            ));
        }
        if settings.unknown_kid_wait.is_zero() || settings.unknown_kid_wait > MAX_FETCH_TIMEOUT {
            return Err(self.err(
                line_of(&k.unknown_kid_wait),
                "keys.unknown_kid_wait must be between 1ms and 60s; keep it below Envoy's ext_authz timeout (1s in the shipped configs)",
            ));
        }
        if settings.min_refresh_interval > settings.refresh_interval {
            return Err(self.err(
                line_of(&k.min_refresh_interval),
                "keys.min_refresh_interval must not be longer than keys.refresh_interval",
            ));
        }
        if settings.fetch_timeout.is_zero() || settings.fetch_timeout > MAX_FETCH_TIMEOUT {
            return Err(self.err(
                line_of(&k.fetch_timeout),
                "keys.fetch_timeout must be between 1ms and 60s",
            ));
        }
        Ok(settings)
    }

    fn token_settings(&self, raw: &RawConfig) -> Result<TokenSettings, ConfigError> {
        let t = &raw.tokens;
        let algorithms = match &t.algorithms {
            None => vec![Algorithm::RS256],
            Some(list) => {
                if list.value.is_empty() {
                    return Err(self.err(list.line(), "tokens.algorithms is empty; list the signing algorithms to accept, like [RS256]"));
                }
                let mut algorithms = Vec::new();
                for name in &list.value {
                    let alg = parse_algorithm(&name.value).map_err(|why| {
                        self.err(name.line(), format!("tokens.algorithms: {why}"))
                    })?;
                    if !algorithms.contains(&alg) {
                        algorithms.push(alg);
                    }
                }
                algorithms
            }
        };
        let leeway = self.duration(t.leeway.as_ref(), Duration::from_secs(30), "tokens.leeway")?;
        if leeway > Duration::from_secs(600) {
            return Err(self.err(t.leeway.as_ref().map_or(0, |v| v.line()), "tokens.leeway must be at most 10m; clocks that far apart need fixing, not tolerating"));
        }
        let max_bytes = match &t.max_bytes {
            None => 8192,
            Some(v) if (512..=65536).contains(&v.value) => v.value,
            Some(v) => {
                return Err(self.err(
                    v.line(),
                    format!(
                        "tokens.max_bytes is {}; choose between 512 and 65536",
                        v.value
                    ),
                ));
            }
        };
        let cache_entries = match &t.cache_entries {
            None => TokenSettings::DEFAULT_CACHE_ENTRIES,
            Some(v) if v.value <= TokenSettings::MAX_CACHE_ENTRIES => v.value,
            Some(v) => {
                return Err(self.err(
                    v.line(),
                    format!(
                        "tokens.cache_entries is {}; choose at most {} (0 turns the cache off)",
                        v.value,
                        TokenSettings::MAX_CACHE_ENTRIES
                    ),
                ));
            }
        };
        let cache_bytes = match &t.cache_bytes {
            None => TokenSettings::DEFAULT_CACHE_BYTES,
            // One token of max_bytes must fit, or nothing would ever be cached.
            Some(v) if v.value >= 65_536 && v.value <= 1 << 40 => v.value,
            Some(v) => {
                return Err(self.err(
                    v.line(),
                    format!(
                        "tokens.cache_bytes is {}; choose between 65536 (64 KiB) and 1099511627776 (1 TiB)",
                        v.value
                    ),
                ));
            }
        };
        Ok(TokenSettings {
            algorithms,
            leeway,
            max_bytes,
            cache_entries,
            cache_bytes,
        })
    }

    fn backends(
        &self,
        raw: &Spanned<Vec<Spanned<RawBackend>>>,
        registry: Option<&Registry>,
    ) -> Result<(Vec<Backend>, RouteTable), ConfigError> {
        if raw.value.is_empty() {
            return Err(self.err(
                raw.line(),
                "backends: list at least one backend with its audience and routes",
            ));
        }
        let mut backends: Vec<Backend> = Vec::new();
        let mut routes = Vec::new();
        let mut route_lines = Vec::new();
        let mut names: HashMap<String, u32> = HashMap::new();
        let mut audiences: HashMap<Arc<str>, (String, u32)> = HashMap::new();
        for entry in &raw.value {
            let b = &entry.value;
            let name = b.name.value.trim();
            if name.is_empty() {
                return Err(self.err(b.name.line(), "backend name is empty"));
            }
            if let Some(first) = names.insert(name.to_string(), b.name.line()) {
                return Err(self.err(b.name.line(), format!("backend {name} is declared twice (first at line {first}); give each backend its own name")));
            }
            let backend_service = b.backend_service.as_ref();
            let audience: Arc<str> = match (&b.audience, backend_service) {
                (Some(a), None) if !a.value.trim().is_empty() => a.value.trim().into(),
                (Some(a), None) => {
                    return Err(self.err(a.line(), format!("backend {name}: audience is empty")));
                }
                (Some(a), Some(_)) => {
                    return Err(self.err(
                        a.line(),
                        format!("backend {name}: give audience or backend_service, not both"),
                    ));
                }
                (None, Some(bs)) => {
                    let Some(registry) = registry else {
                        return Err(self.err(bs.line(), format!("backend {name}: backend_service needs the unit primitive registry; set `unit_primitives:` or give `audience:`")));
                    };
                    let Some(service) = registry.backend_service(&bs.value) else {
                        return Err(self.err(bs.line(), format!("backend {name}: backend_service {:?} is not in the unit primitive registry", bs.value)));
                    };
                    service.jwt_aud.as_str().into()
                }
                (None, None) => {
                    return Err(self.err(entry.line(), format!("backend {name}: give the audience its tokens carry (audience: gitlab-ai-gateway) or a registry backend_service")));
                }
            };
            if let Some((other, first)) = audiences.get(&audience) {
                return Err(self.err(entry.line(), format!("backends {other} (line {first}) and {name} have the same audience {audience}; each backend needs its own")));
            }
            audiences.insert(audience.clone(), (name.to_string(), entry.line()));
            if b.routes.value.is_empty() {
                return Err(self.err(
                    b.routes.line(),
                    format!("backend {name} has no routes; list the paths it serves"),
                ));
            }
            let named_service = backend_service.map(|s| s.value.trim());
            let backend_service: Option<Arc<str>> = match (backend_service, registry) {
                (Some(bs), _) => Some(bs.value.trim().into()),
                (None, Some(registry)) => registry
                    .backend_services()
                    .find(|s| *s.jwt_aud == *audience)
                    .map(|s| s.name.as_str().into()),
                (None, None) => None,
            };
            let forward_claims = self.forward_claims(name, b.forward_claims.as_ref())?;
            let mode = match &b.mode {
                None => Mode::Enforce,
                Some(m) if m.value.trim() == "enforce" => Mode::Enforce,
                Some(m) if m.value.trim() == "dry_run" => Mode::DryRun,
                Some(m) => {
                    return Err(self.err(
                        m.line(),
                        format!(
                            "backend {name}: mode {:?} is not a mode; write enforce (the default) or dry_run",
                            m.value
                        ),
                    ));
                }
            };
            let backend_index = backends.len();
            for route in &b.routes.value {
                if routes.len() >= MAX_ROUTES {
                    return Err(self.err(
                        route.line(),
                        format!("more than {MAX_ROUTES} routes; group paths under prefixes"),
                    ));
                }
                routes.push(self.route(route, backend_index, name, named_service, registry)?);
                route_lines.push(route.line());
            }
            backends.push(Backend {
                name: name.into(),
                audience,
                backend_service,
                forward_claims,
                mode,
            });
        }
        let table = RouteTable::new(routes).map_err(|conflict| {
            let first = &raw_route_pattern(&raw.value, conflict.first);
            let line = route_lines[conflict.second];
            match &conflict.via_trailing_slash {
                None => self.err(line, format!("{first} is claimed twice for the same methods (first at line {}); merge the two routes or split them by methods", route_lines[conflict.first])),
                Some(slashed) => {
                    let second = raw_route_pattern(&raw.value, conflict.second);
                    self.err(line, format!("{second} needs a token, so it also matches {slashed:?}, which {first} (line {}) claims for the same methods; drop one of them or split them by methods", route_lines[conflict.first]))
                }
            }
        })?;
        Ok((backends, table))
    }

    fn route(
        &self,
        raw: &Spanned<RawRoute>,
        backend: usize,
        backend_name: &str,
        backend_service: Option<&str>,
        registry: Option<&Registry>,
    ) -> Result<Route, ConfigError> {
        let line = raw.line();
        let r = &raw.value;
        let pattern = match (&r.path, &r.prefix) {
            (Some(p), None) => Pattern::Exact(self.route_path(p, "path")?),
            (None, Some(p)) => Pattern::Prefix(self.route_path(p, "prefix")?),
            (Some(_), Some(_)) => return Err(self.err(line, format!("backend {backend_name}: a route has both path and prefix; give one (path for one exact path, prefix for a subtree)"))),
            (None, None) => return Err(self.err(line, format!("backend {backend_name}: a route has neither path nor prefix; add `path: /exact` or `prefix: /subtree/`"))),
        };
        let methods = match &r.methods {
            None => Methods::ANY,
            Some(list) if list.value.is_empty() => return Err(self.err(list.line(), format!("route {pattern}: methods is empty; leave it out to allow every method"))),
            Some(list) => Methods::parse(list.value.iter().map(String::as_str))
                .map_err(|m| self.err(list.line(), format!("route {pattern}: {m:?} is not an HTTP method; use GET, HEAD, POST, PUT, PATCH, DELETE or OPTIONS")))?,
        };
        let public = r.public.as_ref().is_some_and(|p| p.value);
        let access = if public {
            if r.require.is_some()
                || r.require_any.is_some()
                || r.unit_primitive_header.is_some()
                || r.user_tokens.is_some()
            {
                return Err(self.err(line, format!("route {pattern} is public and also asks for a token (require, require_any, unit_primitive_header or user_tokens); drop one of them")));
            }
            Access::Public
        } else {
            if r.require.is_none() && r.require_any.is_none() && r.unit_primitive_header.is_none() {
                return Err(self.err(line, format!("route {pattern}: say what it needs: `require: [unit_primitive]`, `require_any: [a, b]`, `unit_primitive_header: x-gitlab-unit-primitive`, or `public: true`")));
            }
            let mut require: Vec<Arc<str>> = Vec::new();
            for up in r.require.iter().flat_map(|l| &l.value) {
                let name = up.value.trim();
                self.check_unit_primitive(name, up.line(), &pattern, backend_service, registry)?;
                if !require.iter().any(|r| &**r == name) {
                    require.push(name.into());
                }
            }
            let mut require_any: Vec<Arc<str>> = Vec::new();
            if let Some(list) = &r.require_any {
                if list.value.is_empty() {
                    return Err(self.err(list.line(), format!("route {pattern}: require_any is empty; list the unit primitives of which one is enough, or leave it out")));
                }
                for up in &list.value {
                    let name = up.value.trim();
                    self.check_unit_primitive(
                        name,
                        up.line(),
                        &pattern,
                        backend_service,
                        registry,
                    )?;
                    if !require_any.iter().any(|r| &**r == name) {
                        require_any.push(name.into());
                    }
                }
            }
            let unit_primitive_header = match &r.unit_primitive_header {
                None => None,
                Some(h) => {
                    let header = h.value.trim().to_ascii_lowercase();
                    if !is_header_name(&header) {
                        return Err(self.err(
                            h.line(),
                            format!(
                                "route {pattern}: unit_primitive_header {:?} is not a header name",
                                h.value
                            ),
                        ));
                    }
                    if registry.is_none() {
                        return Err(self.err(h.line(), format!("route {pattern}: unit_primitive_header needs the unit primitive registry to know which names are valid; set `unit_primitives:`")));
                    }
                    Some(header.into_boxed_str())
                }
            };
            Access::Token {
                require,
                require_any,
                user_tokens: r.user_tokens.as_ref().is_none_or(|u| u.value),
                unit_primitive_header,
            }
        };
        let deprecated = match (&access, registry) {
            (
                Access::Token {
                    require,
                    require_any,
                    ..
                },
                Some(registry),
            ) => require
                .iter()
                .chain(require_any)
                .filter(|name| {
                    registry
                        .unit_primitive(name)
                        .is_some_and(|up| up.deprecation.is_some())
                })
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        Ok(Route {
            pattern,
            methods,
            access,
            backend,
            line,
            deprecated,
        })
    }

    fn forward_claims(
        &self,
        backend: &str,
        raw: Option<&Spanned<std::collections::BTreeMap<String, Spanned<String>>>>,
    ) -> Result<Vec<ForwardClaim>, ConfigError> {
        let Some(map) = raw else {
            return Ok(Vec::new());
        };
        let mut out: Vec<ForwardClaim> = Vec::new();
        for (claim, header) in &map.value {
            let claim = claim.trim();
            if claim.is_empty() {
                return Err(self.err(
                    map.line(),
                    format!("backend {backend}: forward_claims names an empty claim"),
                ));
            }
            let name = header.value.trim().to_ascii_lowercase();
            if !is_header_name(&name) || name.contains('_') {
                return Err(self.err(header.line(), format!("backend {backend}: forward_claims: {:?} is not a header name (letters, digits and - only)", header.value)));
            }
            if RESERVED_HEADERS.contains(&name.as_str()) {
                return Err(self.err(header.line(), format!("backend {backend}: forward_claims: {name} is a header the sidecar or HTTP itself sets; choose another, such as x-gitlab-authz-{}", claim.replace('_', "-"))));
            }
            if let Some(other) = out.iter().find(|f| *f.header == *name) {
                return Err(self.err(header.line(), format!("backend {backend}: forward_claims sends the claims {} and {claim} to the same header {name}; give each its own", other.claim)));
            }
            out.push(ForwardClaim {
                claim: claim.into(),
                header: name.into(),
            });
        }
        Ok(out)
    }

    fn route_path(&self, p: &Spanned<String>, key: &str) -> Result<String, ConfigError> {
        let value = p.value.as_str();
        if value.contains(['?', '#']) {
            return Err(self.err(
                p.line(),
                format!("{key} {value:?} contains '?' or '#'; routes match the path without its query, so drop them"),
            ));
        }
        match normalize_path(value) {
            Ok(n) if n == value => Ok(value.to_string()),
            Ok(n) => Err(self.err(
                p.line(),
                format!("{key} {value:?} is not in canonical form (route patterns are matched against decoded, resolved paths and have no '%'); write it as {n:?}"),
            )),
            Err(e) => Err(self.err(
                p.line(),
                format!(
                    "{key} {value:?}: {}",
                    e.message().replace("the request path", "it")
                ),
            )),
        }
    }

    fn check_unit_primitive(
        &self,
        name: &str,
        line: u32,
        pattern: &Pattern,
        backend_service: Option<&str>,
        registry: Option<&Registry>,
    ) -> Result<(), ConfigError> {
        if name.is_empty() {
            return Err(self.err(
                line,
                format!("route {pattern}: an empty unit primitive name in require"),
            ));
        }
        let Some(registry) = registry else {
            return Ok(());
        };
        if registry.unit_primitive(name).is_none() {
            return Err(self.err(line, format!("route {pattern} requires unknown unit primitive {name:?}; check its spelling against the registry")));
        }
        if let Some(service) = backend_service
            && !registry.delivered_by(name, service)
        {
            return Err(self.err(line, format!("route {pattern} requires unit primitive {name:?}, which backend service {service:?} does not deliver (see its backend_services in the registry)")));
        }
        Ok(())
    }
}

fn raw_route_pattern(backends: &[Spanned<RawBackend>], mut index: usize) -> String {
    for b in backends {
        if index < b.value.routes.value.len() {
            let r = &b.value.routes.value[index].value;
            return match (&r.path, &r.prefix) {
                (Some(p), _) => format!("path {}", p.value),
                (_, Some(p)) => format!("prefix {}", p.value),
                _ => "a route".to_string(),
            };
        }
        index -= b.value.routes.value.len();
    }
    "a route".to_string()
}

/// An HTTP header name as this service writes one: lower-case letters, digits, `-` and `_`.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests;
