//! The unit primitive registry: which unit primitives exist, which backend service delivers
//! each one, which add-ons and license types include it, and from which GitLab version.
//!
//! It reads the [gitlab-cloud-connector] configuration, either as its directory layout
//!
//! ```text
//! D/unit_primitives/*.yml    one file per unit primitive (the scopes a token can carry)
//! D/backend_services/*.yml   name, description, project_url, group, jwt_aud (the token audience)
//! D/add_ons/*.yml            name, optional description
//! D/license_types/*.yml      name, optional description
//! D/services/*.yml           legacy grouping of unit primitives (optional)
//! ```
//!
//! or as the legacy single file with a top-level `services:` map, as CustomersDot's
//! `cloud_connector.yml` and GitLab's former `access_data.yml` spell it. Both become the same
//! in-memory [`Registry`]; see [`Registry::load`] for how the legacy file maps onto it.
//!
//! The registry owns loading and validation only: every dangling reference, duplicate,
//! misnamed file, bad version and bad date is a [`ConfigError`] with the file and line. A
//! field it does not know is not an error (GitLab adds fields over time): it is kept as an
//! [`UnknownField`] and logged once per load.
//! After [`Registry::load`] succeeds, lookups cannot fail for a reason other than an unknown
//! name. It must not know about routes, tokens or requests; the route table asks it questions.
//!
//! ```
//! use connector_authz_core::registry::{GitlabVersion, Registry};
//! use std::path::Path;
//!
//! let registry = Registry::load(Path::new("../../config/cloud_connector")).unwrap();
//! let chat = registry.unit_primitive("duo_chat").unwrap();
//! assert!(registry.delivered_by("duo_chat", "ai_gateway"));
//! assert!(chat.min_gitlab_version.as_ref().unwrap() <= &"17.3.0-ee".parse::<GitlabVersion>().unwrap());
//! assert_eq!(registry.backend_service("ai_gateway").unwrap().jwt_aud, "gitlab-ai-gateway");
//! ```
//!
//! [gitlab-cloud-connector]: https://gitlab.com/gitlab-org/cloud-connector/gitlab-cloud-connector

mod layout;
mod legacy;
mod timestamp;
mod version;
mod yaml;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

pub use timestamp::{ParseTimestampError, Timestamp};
pub use version::{GitlabVersion, ParseVersionError};

/// The validated unit primitive registry. Built once by [`Registry::load`]; immutable after.
/// Serialized (serde) as the facts it holds, for the proxy-wasm filter, which has no files
/// to load it from: the sidecar sends it in its `/v1/snapshot`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Registry {
    unit_primitives: BTreeMap<String, UnitPrimitive>,
    backend_services: BTreeMap<String, BackendService>,
    services: BTreeMap<String, Service>,
    add_ons: BTreeSet<String>,
    license_types: BTreeSet<String>,
    /// Warned about where the files were loaded; not part of the facts.
    #[serde(skip)]
    unknown_fields: Vec<UnknownField>,
}

/// A field of a registry file that this version does not know (GitLab added it later, or it
/// is a typo). Loading goes on without it; [`Registry::load`] logs each one once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownField {
    pub file: std::path::PathBuf,
    /// 1-based line of the field's key.
    pub line: u32,
    /// Dotted path inside the file, e.g. `owner` or `services.duo_chat.bundled_with.duo_pro.note`.
    pub field: String,
}

/// The smallest feature a token scope can grant (`code_suggestions`, `duo_chat`, ...).
///
/// Text fields that only the directory layout has (`description`, `group`,
/// `feature_category`, `documentation_url`) are empty when loaded from the legacy file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitPrimitive {
    /// The scope string a token carries for this feature.
    pub name: String,
    /// Other names GitLab knows this unit primitive by (`alias_names`); kept as data, not
    /// accepted in place of `name`.
    pub alias_names: Vec<String>,
    pub description: String,
    pub group: String,
    pub feature_category: String,
    pub documentation_url: String,
    pub milestone: Option<String>,
    pub introduced_by_url: Option<String>,
    pub unit_primitive_issue_url: Option<String>,
    /// Set when the file has `deprecation_message` or `deprecated_by_url`.
    pub deprecation: Option<Deprecation>,
    /// When free access ends; `None` means it never does.
    pub cut_off_date: Option<Timestamp>,
    /// The oldest GitLab that may use it; `None` means any version.
    pub min_gitlab_version: Option<GitlabVersion>,
    /// The oldest GitLab that may use it during the free access period; `None` means any.
    pub min_gitlab_version_for_free_access: Option<GitlabVersion>,
    /// Names of [`BackendService`]s that serve it, in file order.
    pub backend_services: Vec<String>,
    /// Names of add-ons that include it, in file order.
    pub add_ons: Vec<String>,
    /// Names of license types that include it, in file order.
    pub license_types: Vec<String>,
}

/// Why a unit primitive is deprecated; at least one of the two is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deprecation {
    pub message: Option<String>,
    pub by_url: Option<String>,
}

/// A service behind Cloud Connector that checks tokens; `jwt_aud` is the audience a token
/// for it must carry. `description`, `project_url` and `group` are empty when the file does
/// not say (always, for the legacy file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendService {
    pub name: String,
    pub jwt_aud: String,
    pub description: String,
    pub project_url: String,
    pub group: String,
}

/// The older "service" grouping of unit primitives (`duo_chat` delivers `duo_chat`,
/// `documentation_search`, ...), kept for GitLab versions that still think in services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    /// The unit primitive whose cut-off date and versions stand for the whole service.
    pub basic_unit_primitive: String,
    /// Where it is offered; empty when the file does not say (always, for the legacy file).
    pub gitlab_realms: Vec<GitlabRealm>,
    pub description: Option<String>,
    pub unit_primitives: Vec<String>,
}

/// A kind of GitLab deployment, as `services/*.yml` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GitlabRealm {
    #[serde(rename = "gitlab-com")]
    GitlabCom,
    #[serde(rename = "self-managed")]
    SelfManaged,
}

impl Registry {
    /// Loads a registry from a gitlab-cloud-connector directory, or from a legacy file.
    ///
    /// The legacy file (`services: {<service>: {backend, cut_off_date, min_gitlab_version,
    /// min_gitlab_version_for_beta, bundled_with: {<add_on>: {unit_primitives: [...]}}}}`)
    /// maps onto the same model:
    /// - every name under a `bundled_with` list is a unit primitive, every `bundled_with`
    ///   key an add-on, except a pseudo add-on starting with `_` (`_irrelevant`), which names
    ///   none; a service's `license_types` apply to all its unit primitives;
    /// - each distinct `backend` is a backend service whose `jwt_aud` is that value and whose
    ///   name drops a leading `gitlab-` and turns `-` into `_` (`gitlab-ai-gateway` →
    ///   `ai_gateway`), so routes can name it the same way in either format;
    /// - a unit primitive takes `cut_off_date`, `min_gitlab_version` and
    ///   `min_gitlab_version_for_free_access` (legacy spelling: `min_gitlab_version_for_beta`)
    ///   from its service. When several services deliver it, the most permissive value wins
    ///   (the lowest version, the latest cut-off, and "none" over any), because an issuer
    ///   grants the scope through whichever service allows it;
    /// - the map may sit under `defaults:` (CustomersDot's `defaults: &defaults` for Rails
    ///   environments). The sections `development`, `test`, `staging` and `production` are
    ///   then checked for shape but not used: they merge `defaults`, and the registry
    ///   describes one deployment.
    pub fn load(path: &Path) -> Result<Registry, ConfigError> {
        let metadata = std::fs::metadata(path).map_err(|err| {
            ConfigError::new(
                path,
                0,
                format!(
                    "cannot read the unit primitive registry ({err}); point `unit_primitives` at a gitlab-cloud-connector config directory or a legacy cloud_connector.yml"
                ),
            )
        })?;
        let registry = if metadata.is_dir() {
            layout::load(path)?
        } else {
            legacy::load(path)?
        };
        for unknown in &registry.unknown_fields {
            tracing::warn!(
                file = %unknown.file.display(),
                line = unknown.line,
                field = %unknown.field,
                "unknown field in the unit primitive registry, ignored; a newer GitLab registry or a typo"
            );
        }
        Ok(registry)
    }

    /// Fields of the registry files that were not understood and were skipped, in load order.
    pub fn unknown_fields(&self) -> &[UnknownField] {
        &self.unknown_fields
    }

    pub fn unit_primitive(&self, name: &str) -> Option<&UnitPrimitive> {
        self.unit_primitives.get(name)
    }

    pub fn backend_service(&self, name: &str) -> Option<&BackendService> {
        self.backend_services.get(name)
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.get(name)
    }

    /// All unit primitives, sorted by name.
    pub fn unit_primitives(&self) -> impl Iterator<Item = &UnitPrimitive> {
        self.unit_primitives.values()
    }

    /// All backend services, sorted by name.
    pub fn backend_services(&self) -> impl Iterator<Item = &BackendService> {
        self.backend_services.values()
    }

    /// Whether unit primitive `up` is listed as served by backend service `backend_service`
    /// (by name, e.g. `ai_gateway`). False when either is unknown.
    pub fn delivered_by(&self, up: &str, backend_service: &str) -> bool {
        self.unit_primitives
            .get(up)
            .is_some_and(|up| up.backend_services.iter().any(|b| b == backend_service))
    }
}

/// Whether `name` can name a registry entry: it becomes a token scope or a file name, so it is
/// held to the snake_case the gitlab-cloud-connector schema asks for.
fn is_valid_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A short, bounded list of known names for "did you mean" style hints.
fn known_names<'a>(names: impl Iterator<Item = &'a String>) -> String {
    const SHOWN: usize = 12;
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        return "none are defined".to_string();
    }
    let mut text = names[..names.len().min(SHOWN)].join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    format!("known: {text}")
}

#[cfg(test)]
mod tests;
