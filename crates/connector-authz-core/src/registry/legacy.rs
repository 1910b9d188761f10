//! The legacy single-file format (`services:` with `bundled_with`), mapped onto the same
//! model as the directory layout. [`super::Registry::load`] documents the mapping.

use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_saphyr::Spanned;

use super::yaml::{self, Node, line};
use super::{
    BackendService, GitlabVersion, Registry, Service, Timestamp, UnitPrimitive, UnknownField,
    is_valid_name,
};
use crate::error::ConfigError;

/// The whole file. Keys this struct does not name are reported as unknown fields.
#[derive(Deserialize)]
struct RawFile {
    #[serde(default)]
    services: Option<Spanned<Entries<RawService>>>,
    #[serde(default)]
    defaults: Option<RawSection>,
    // Rails environment sections of CustomersDot's file (`development: <<: *defaults`).
    // They are read as the same shape, so a mistake in them is still found, and not used:
    // the registry describes one deployment, the one `defaults` describes.
    #[serde(default)]
    #[allow(dead_code)]
    development: Option<RawSection>,
    #[serde(default)]
    #[allow(dead_code)]
    test: Option<RawSection>,
    #[serde(default)]
    #[allow(dead_code)]
    staging: Option<RawSection>,
    #[serde(default)]
    #[allow(dead_code)]
    production: Option<RawSection>,
}

#[derive(Deserialize)]
struct RawSection {
    #[serde(default)]
    services: Option<Spanned<Entries<RawService>>>,
}

#[derive(Deserialize)]
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
    /// License types (tiers) that include the service's unit primitives.
    #[serde(default)]
    license_types: Vec<Spanned<String>>,
    bundled_with: Spanned<Entries<RawBundle>>,
}

#[derive(Deserialize)]
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
    let (raw, shape): (RawFile, _) = yaml::read(path)?;
    let unknown = unknown_fields(&shape);
    let defaults = raw.defaults.map(|d| {
        d.services.ok_or_else(|| {
            ConfigError::new(
                path,
                0,
                "`defaults` has no `services` map; put the services under `defaults: services:`",
            )
        })
    });
    let services = match (raw.services, defaults.transpose()?) {
        (Some(services), None) => services,
        (None, Some(defaults)) => defaults,
        (Some(services), Some(_)) => {
            return Err(ConfigError::new(
                path,
                line(&services),
                "the file has both `services` and `defaults.services`; keep one of them",
            ));
        }
        (None, None) => {
            // A misspelt `services` is the likely cause: name the first key not understood.
            let (hint, at) = match unknown.first() {
                Some((field, at)) => (format!(" (`{field}` is not a key of it)"), *at),
                None => (String::new(), 0),
            };
            return Err(ConfigError::new(
                path,
                at,
                format!(
                    "no `services` map found{hint}; a legacy Cloud Connector file has a top-level `services:` (or `defaults: services:`), a registry directory has unit_primitives/"
                ),
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
    let mut registry = Registry {
        unknown_fields: unknown
            .into_iter()
            .map(|(field, line)| UnknownField {
                file: path.to_path_buf(),
                line,
                field,
            })
            .collect(),
        ..Registry::default()
    };
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

        let mut license_types: Vec<String> = Vec::new();
        for license in raw.license_types {
            if !is_valid_name(&license.value) {
                return Err(error(
                    line(&license),
                    format!(
                        "license type \"{}\" must be snake_case (lowercase letters, digits and underscores, starting with a letter)",
                        license.value
                    ),
                ));
            }
            if license_types.contains(&license.value) {
                return Err(error(
                    line(&license),
                    format!(
                        "service \"{name}\" lists license type \"{}\" twice; remove one",
                        license.value
                    ),
                ));
            }
            registry.license_types.insert(license.value.clone());
            license_types.push(license.value);
        }

        let bundled_with_line = line(&raw.bundled_with);
        let mut delivered: Vec<String> = Vec::new();
        for (add_on, bundle) in raw.bundled_with.value.0 {
            // `_irrelevant` / `_irrelevant_` in GitLab's access_data.yml: the unit primitives
            // are delivered, but no add-on sells them (GitLab checks no add-on without a
            // cut-off date).
            let add_on_name = if is_pseudo_add_on(&add_on.value) {
                None
            } else if is_valid_name(&add_on.value) {
                registry.add_ons.insert(add_on.value.clone());
                Some(add_on.value.as_str())
            } else {
                return Err(error(
                    line(&add_on),
                    format!(
                        "add-on name \"{}\" must be snake_case (lowercase letters, digits and underscores, starting with a letter), or start with `_` for no add-on (`_irrelevant`)",
                        add_on.value
                    ),
                ));
            };
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
                    Delivery {
                        add_on: add_on_name,
                        backend: &backend_name,
                        license_types: &license_types,
                        terms: &terms,
                        new_for_service: first_sight(&delivered, &up.value),
                    },
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

const SECTIONS: [&str; 4] = ["development", "test", "staging", "production"];
const SERVICE_FIELDS: [&str; 8] = [
    "backend",
    "cut_off_date",
    "service_start_time",
    "min_gitlab_version",
    "min_gitlab_version_for_beta",
    "min_gitlab_version_for_free_access",
    "license_types",
    "bundled_with",
];

/// The keys of the file that [`RawFile`] skips, as dotted paths with their lines.
fn unknown_fields(shape: &Node) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let mut top = vec!["services", "defaults"];
    top.extend(SECTIONS);
    shape.unknown_keys(&top, "", &mut out);
    let services = |section: &Node, prefix: &str, out: &mut Vec<(String, u32)>| {
        let Some(services) = section.get("services") else {
            return;
        };
        for (name, _, service) in services.entries() {
            let at = format!("{prefix}services.{name}");
            service.unknown_keys(&SERVICE_FIELDS, &at, out);
            if let Some(bundles) = service.get("bundled_with") {
                for (add_on, _, bundle) in bundles.entries() {
                    bundle.unknown_keys(
                        &["unit_primitives"],
                        &format!("{at}.bundled_with.{add_on}"),
                        out,
                    );
                }
            }
        }
    };
    services(shape, "", &mut out);
    for section in std::iter::once("defaults").chain(SECTIONS) {
        if let Some(node) = shape.get(section) {
            // A section merges `defaults` (`<<: *defaults`) and holds `services`.
            node.unknown_keys(&["services", "<<"], section, &mut out);
            services(node, &format!("{section}."), &mut out);
        }
    }
    out
}

/// Whether this service has not yet contributed `up` (a unit primitive may sit under several
/// of its add-ons; the service's terms count once).
fn first_sight(delivered: &[String], up: &str) -> bool {
    !delivered.iter().any(|d| d == up)
}

/// A pseudo add-on: a `bundled_with` key that names no add-on (`_irrelevant`, `_irrelevant_`).
fn is_pseudo_add_on(name: &str) -> bool {
    name.strip_prefix('_').is_some_and(|rest| {
        rest.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    })
}

/// How one service delivers one unit primitive.
struct Delivery<'a> {
    /// `None` for a pseudo add-on.
    add_on: Option<&'a str>,
    backend: &'a str,
    license_types: &'a [String],
    terms: &'a Terms,
    /// Whether this service has not yet contributed this unit primitive.
    new_for_service: bool,
}

fn add_unit_primitive(registry: &mut Registry, name: &str, delivery: Delivery<'_>) {
    let Delivery {
        add_on,
        backend,
        license_types,
        terms,
        new_for_service,
    } = delivery;
    let up = registry
        .unit_primitives
        .entry(name.to_string())
        .or_insert_with(|| UnitPrimitive {
            name: name.to_string(),
            alias_names: Vec::new(),
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
    if let Some(add_on) = add_on
        && !up.add_ons.iter().any(|a| a == add_on)
    {
        up.add_ons.push(add_on.to_string());
    }
    for license in license_types {
        if !up.license_types.contains(license) {
            up.license_types.push(license.clone());
        }
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
        description: String::new(),
        project_url: String::new(),
        group: String::new(),
    })
}
