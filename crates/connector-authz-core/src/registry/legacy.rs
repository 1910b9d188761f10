//! The legacy single-file format (`services:` with `bundled_with`), mapped onto the same
//! model as the directory layout. [`super::Registry::load`] documents the mapping.

use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_saphyr::Spanned;

use super::yaml::{self, line};
use super::{
    BackendService, GitlabVersion, Registry, Service, Timestamp, UnitPrimitive, is_valid_name,
};
use crate::error::ConfigError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    services: Option<Spanned<Entries<RawService>>>,
    #[serde(default)]
    defaults: Option<RawDefaults>,
    // Rails environment sections of CustomersDot's file; they merge `defaults`, so they are
    // accepted and not read.
    #[serde(default)]
    #[allow(dead_code)]
    development: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    test: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    staging: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    production: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    services: Spanned<Entries<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    backend: Spanned<String>,
    // Older CustomersDot files call the cut-off date `service_start_time`.
    #[serde(default, alias = "service_start_time")]
    cut_off_date: Option<Spanned<String>>,
    #[serde(default)]
    min_gitlab_version: Option<Spanned<String>>,
    #[serde(default)]
    min_gitlab_version_for_beta: Option<Spanned<String>>,
    #[serde(default)]
    min_gitlab_version_for_free_access: Option<Spanned<String>>,
    bundled_with: Spanned<Entries<RawBundle>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBundle {
    unit_primitives: Vec<Spanned<String>>,
}

/// A YAML mapping with its keys' locations, in file order (a `BTreeMap` would lose both).
struct Entries<V>(Vec<(Spanned<String>, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<V>(PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<V> {
            type Value = Entries<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }

        deserializer.deserialize_map(EntriesVisitor(PhantomData))
    }
}

/// One service's view of a unit primitive, before services are combined.
struct Terms {
    cut_off_date: Option<Timestamp>,
    min_gitlab_version: Option<GitlabVersion>,
    min_gitlab_version_for_free_access: Option<GitlabVersion>,
}

pub(super) fn load(path: &Path) -> Result<Registry, ConfigError> {
    let raw: RawFile = yaml::read(path)?;
    let services = match (raw.services, raw.defaults) {
        (Some(services), None) => services,
        (None, Some(defaults)) => defaults.services,
        (Some(services), Some(_)) => {
            return Err(ConfigError::new(
                path,
                line(&services),
                "the file has both `services` and `defaults.services`; keep one of them",
            ));
        }
        (None, None) => {
            return Err(ConfigError::new(
                path,
                0,
                "no `services` map found; a legacy Cloud Connector file has a top-level `services:` (or `defaults: services:`), a registry directory has unit_primitives/",
            ));
        }
    };

    if services.value.0.is_empty() {
        return Err(ConfigError::new(
            path,
            line(&services),
            "`services` is empty; list at least one service",
        ));
    }
    let mut registry = Registry::default();
    for (service_name, raw) in services.value.0 {
        let error = |at: u32, message: String| ConfigError::new(path, at, message);
        let name_line = line(&service_name);
        let name = service_name.value;
        if !is_valid_name(&name) {
            return Err(error(
                name_line,
                format!(
                    "service name \"{name}\" must be snake_case (lowercase letters, digits and underscores, starting with a letter)"
                ),
            ));
        }
        let backend = backend_service(&registry, path, &raw.backend)?;
        let backend_name = backend.name.clone();
        registry
            .backend_services
            .entry(backend.name.clone())
            .or_insert(backend);

        let version =
            |field: Option<Spanned<String>>| -> Result<Option<GitlabVersion>, ConfigError> {
                field
                    .map(|v| {
                        v.value
                            .parse::<GitlabVersion>()
                            .map_err(|err| error(line(&v), err.to_string()))
                    })
                    .transpose()
            };
        let free_access = match (
            raw.min_gitlab_version_for_beta,
            raw.min_gitlab_version_for_free_access,
        ) {
            (Some(_), Some(both)) => {
                return Err(error(
                    line(&both),
                    format!(
                        "service \"{name}\" sets both min_gitlab_version_for_beta and min_gitlab_version_for_free_access, which mean the same; keep one"
                    ),
                ));
            }
            (beta, free) => beta.or(free),
        };
        let terms = Terms {
            cut_off_date: raw
                .cut_off_date
                .map(|d| {
                    d.value
                        .parse::<Timestamp>()
                        .map_err(|err| error(line(&d), err.to_string()))
                })
                .transpose()?,
            min_gitlab_version: version(raw.min_gitlab_version)?,
            min_gitlab_version_for_free_access: version(free_access)?,
        };

        let bundled_with_line = line(&raw.bundled_with);
        let mut delivered: Vec<String> = Vec::new();
        for (add_on, bundle) in raw.bundled_with.value.0 {
            if !is_valid_name(&add_on.value) {
                return Err(error(
                    line(&add_on),
                    format!(
                        "add-on name \"{}\" must be snake_case (lowercase letters, digits and underscores, starting with a letter)",
                        add_on.value
                    ),
                ));
            }
            registry.add_ons.insert(add_on.value.clone());
            let mut in_bundle: Vec<&str> = Vec::new();
            for up in &bundle.unit_primitives {
                if !is_valid_name(&up.value) {
                    return Err(error(
                        line(up),
                        format!(
                            "unit primitive name \"{}\" must be snake_case (lowercase letters, digits and underscores, starting with a letter)",
                            up.value
                        ),
                    ));
                }
                if in_bundle.contains(&up.value.as_str()) {
                    return Err(error(
                        line(up),
                        format!(
                            "add-on \"{}\" of service \"{name}\" lists unit primitive \"{}\" twice; remove one",
                            add_on.value, up.value
                        ),
                    ));
                }
                in_bundle.push(&up.value);
                add_unit_primitive(
                    &mut registry,
                    &up.value,
                    &add_on.value,
                    &backend_name,
                    &terms,
                    first_sight(&delivered, &up.value),
                );
                if !delivered.contains(&up.value) {
                    delivered.push(up.value.clone());
                }
            }
        }
        if delivered.is_empty() {
            return Err(error(
                bundled_with_line,
                format!(
                    "service \"{name}\" bundles no unit primitives; list them under bundled_with: <add_on>: unit_primitives:"
                ),
            ));
        }
        // A service usually shares its name with its main unit primitive (`duo_chat`).
        let basic_unit_primitive = if delivered.contains(&name) {
            name.clone()
        } else {
            delivered[0].clone()
        };
        registry.services.insert(
            name.clone(),
            Service {
                name,
                basic_unit_primitive,
                gitlab_realms: Vec::new(),
                description: None,
                unit_primitives: delivered,
            },
        );
    }
    Ok(registry)
}

/// Whether this service has not yet contributed `up` (a unit primitive may sit under several
/// of its add-ons; the service's terms count once).
fn first_sight(delivered: &[String], up: &str) -> bool {
    !delivered.iter().any(|d| d == up)
}

fn add_unit_primitive(
    registry: &mut Registry,
    name: &str,
    add_on: &str,
    backend: &str,
    terms: &Terms,
    new_for_service: bool,
) {
    let up = registry
        .unit_primitives
        .entry(name.to_string())
        .or_insert_with(|| UnitPrimitive {
            name: name.to_string(),
            description: String::new(),
            group: String::new(),
            feature_category: String::new(),
            documentation_url: String::new(),
            milestone: None,
            introduced_by_url: None,
            unit_primitive_issue_url: None,
            deprecation: None,
            cut_off_date: terms.cut_off_date.clone(),
            min_gitlab_version: terms.min_gitlab_version.clone(),
            min_gitlab_version_for_free_access: terms.min_gitlab_version_for_free_access.clone(),
            backend_services: Vec::new(),
            add_ons: Vec::new(),
            license_types: Vec::new(),
        });
    if new_for_service {
        up.cut_off_date = most_permissive(&up.cut_off_date, &terms.cut_off_date, Ord::max);
        up.min_gitlab_version =
            most_permissive(&up.min_gitlab_version, &terms.min_gitlab_version, Ord::min);
        up.min_gitlab_version_for_free_access = most_permissive(
            &up.min_gitlab_version_for_free_access,
            &terms.min_gitlab_version_for_free_access,
            Ord::min,
        );
    }
    if !up.add_ons.iter().any(|a| a == add_on) {
        up.add_ons.push(add_on.to_string());
    }
    if !up.backend_services.iter().any(|b| b == backend) {
        up.backend_services.push(backend.to_string());
    }
}

/// `None` is no limit at all, so it beats any value; otherwise `pick` chooses.
fn most_permissive<T: Clone + Ord>(a: &Option<T>, b: &Option<T>, pick: fn(T, T) -> T) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(pick(a.clone(), b.clone())),
        _ => None,
    }
}

/// The backend service for a legacy `backend:` value (the audience), named so that routes
/// can say `ai_gateway` as they would with the directory layout.
fn backend_service(
    registry: &Registry,
    path: &Path,
    backend: &Spanned<String>,
) -> Result<BackendService, ConfigError> {
    let audience = backend.value.as_str();
    let name = audience
        .strip_prefix("gitlab-")
        .unwrap_or(audience)
        .replace(['-', '.'], "_")
        .to_ascii_lowercase();
    if audience.trim().is_empty() || !is_valid_name(&name) {
        return Err(ConfigError::new(
            path,
            line(backend),
            format!(
                "backend \"{audience}\" is not a usable audience; use the backend's JWT audience, e.g. gitlab-ai-gateway"
            ),
        ));
    }
    if let Some(existing) = registry.backend_services.get(&name)
        && existing.jwt_aud != audience
    {
        return Err(ConfigError::new(
            path,
            line(backend),
            format!(
                "backends \"{}\" and \"{audience}\" would both be called \"{name}\"; use one spelling of the audience",
                existing.jwt_aud
            ),
        ));
    }
    Ok(BackendService {
        name,
        jwt_aud: audience.to_string(),
        project_url: String::new(),
        group: String::new(),
    })
}
