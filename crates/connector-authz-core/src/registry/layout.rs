//! The gitlab-cloud-connector directory layout: one YAML file per entry, in five folders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_saphyr::Spanned;

use super::yaml::{self, MAX_FILES, line};
use super::{
    BackendService, Deprecation, GitlabRealm, GitlabVersion, Registry, Service, Timestamp,
    UnitPrimitive, UnknownField, is_valid_name, known_names,
};
use crate::error::ConfigError;

/// One `unit_primitives/*.yml` file. Only `name` is required here: GitLab's schema also
/// requires the text fields, but the gem's own README example omits them, and they do not
/// change a decision. Fields this struct does not know are reported, not refused.
#[derive(Deserialize)]
struct RawUnitPrimitive {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    feature_category: String,
    #[serde(default)]
    documentation_url: String,
    #[serde(default)]
    milestone: Option<String>,
    #[serde(default)]
    introduced_by_url: Option<String>,
    #[serde(default)]
    unit_primitive_issue_url: Option<String>,
    #[serde(default)]
    deprecated_by_url: Option<String>,
    #[serde(default)]
    deprecation_message: Option<String>,
    #[serde(default)]
    cut_off_date: Option<Spanned<String>>,
    #[serde(default)]
    min_gitlab_version: Option<Spanned<String>>,
    #[serde(default)]
    min_gitlab_version_for_free_access: Option<Spanned<String>>,
    /// Former names of this unit primitive that tokens may still carry.
    #[serde(default)]
    alias_names: Vec<Spanned<String>>,
    #[serde(default)]
    backend_services: Vec<Spanned<String>>,
    #[serde(default)]
    add_ons: Vec<Spanned<String>>,
    #[serde(default)]
    license_types: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawBackendService {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    project_url: String,
    #[serde(default)]
    group: String,
    jwt_aud: Spanned<String>,
}

/// An add-on or a license type: a name to refer to, nothing else the sidecar uses.
#[derive(Deserialize)]
struct RawNamed {
    name: Spanned<String>,
    #[serde(default)]
    #[allow(dead_code)] // validated as a string, then not needed
    description: Option<String>,
}

#[derive(Deserialize)]
struct RawService {
    name: Spanned<String>,
    #[serde(default)]
    basic_unit_primitive: Option<Spanned<String>>,
    #[serde(default)]
    gitlab_realm: Vec<Spanned<GitlabRealm>>,
    #[serde(default)]
    description: Option<String>,
    unit_primitives: Spanned<Vec<Spanned<String>>>,
}

trait Named {
    fn name(&self) -> &Spanned<String>;
}

macro_rules! named {
    ($($t:ty),*) => {$(
        impl Named for $t {
            fn name(&self) -> &Spanned<String> {
                &self.name
            }
        }
    )*};
}
named!(RawUnitPrimitive, RawBackendService, RawNamed, RawService);

/// One kind of entry: its folder and what to call it in messages.
#[derive(Clone, Copy)]
struct Kind {
    dir: &'static str,
    noun: &'static str,
    required: bool,
    /// Every field of GitLab's data model for this kind; anything else is reported.
    fields: &'static [&'static str],
}

const UNIT_PRIMITIVES: Kind = Kind {
    dir: "unit_primitives",
    noun: "unit primitive",
    required: true,
    fields: &[
        "name",
        "description",
        "group",
        "feature_category",
        "documentation_url",
        "milestone",
        "introduced_by_url",
        "unit_primitive_issue_url",
        "deprecated_by_url",
        "deprecation_message",
        "cut_off_date",
        "min_gitlab_version",
        "min_gitlab_version_for_free_access",
        "alias_names",
        "backend_services",
        "add_ons",
        "license_types",
    ],
};
const BACKEND_SERVICES: Kind = Kind {
    dir: "backend_services",
    noun: "backend service",
    required: false,
    fields: &["name", "description", "project_url", "group", "jwt_aud"],
};
const ADD_ONS: Kind = Kind {
    dir: "add_ons",
    noun: "add-on",
    required: false,
    fields: &["name", "description"],
};
const LICENSE_TYPES: Kind = Kind {
    dir: "license_types",
    noun: "license type",
    required: false,
    fields: &["name", "description"],
};
const SERVICES: Kind = Kind {
    dir: "services",
    noun: "service",
    required: false,
    fields: &[
        "name",
        "basic_unit_primitive",
        "gitlab_realm",
        "description",
        "unit_primitives",
    ],
};

/// A parsed entry and where it came from, for messages about it.
struct Located<T> {
    file: PathBuf,
    raw: T,
}

pub(super) fn load(root: &Path) -> Result<Registry, ConfigError> {
    let mut files_left = MAX_FILES;
    let mut unknown = Vec::new();
    let backend_services =
        read_kind::<RawBackendService>(root, BACKEND_SERVICES, &mut files_left, &mut unknown)?;
    let add_ons = read_kind::<RawNamed>(root, ADD_ONS, &mut files_left, &mut unknown)?;
    let license_types = read_kind::<RawNamed>(root, LICENSE_TYPES, &mut files_left, &mut unknown)?;
    let unit_primitives =
        read_kind::<RawUnitPrimitive>(root, UNIT_PRIMITIVES, &mut files_left, &mut unknown)?;
    let services = read_kind::<RawService>(root, SERVICES, &mut files_left, &mut unknown)?;

    let mut registry = Registry {
        add_ons: add_ons.into_keys().collect(),
        license_types: license_types.into_keys().collect(),
        unknown_fields: unknown,
        ..Registry::default()
    };
    for (name, Located { file, raw }) in backend_services {
        if raw.jwt_aud.value.trim().is_empty() {
            return Err(ConfigError::new(
                &file,
                line(&raw.jwt_aud),
                format!(
                    "backend service \"{name}\" has an empty jwt_aud; set it to the audience its tokens carry, e.g. gitlab-ai-gateway"
                ),
            ));
        }
        let service = BackendService {
            name: name.clone(),
            jwt_aud: raw.jwt_aud.value,
            description: raw.description,
            project_url: raw.project_url,
            group: raw.group,
        };
        registry.backend_services.insert(name, service);
    }
    for (name, located) in unit_primitives {
        let up = unit_primitive(&registry, root, located)?;
        registry.unit_primitives.insert(name, up);
    }
    for (name, located) in services {
        let service = service(&registry, root, located)?;
        registry.services.insert(name, service);
    }
    Ok(registry)
}

fn unit_primitive(
    registry: &Registry,
    root: &Path,
    Located { file, raw }: Located<RawUnitPrimitive>,
) -> Result<UnitPrimitive, ConfigError> {
    let name = raw.name.value;
    let version = |field: Option<Spanned<String>>| -> Result<Option<GitlabVersion>, ConfigError> {
        field
            .map(|v| {
                v.value
                    .parse::<GitlabVersion>()
                    .map_err(|err| ConfigError::new(&file, line(&v), err.to_string()))
            })
            .transpose()
    };
    let min_gitlab_version = version(raw.min_gitlab_version)?;
    let min_gitlab_version_for_free_access = version(raw.min_gitlab_version_for_free_access)?;
    let cut_off_date = raw
        .cut_off_date
        .map(|d| {
            d.value
                .parse::<Timestamp>()
                .map_err(|err| ConfigError::new(&file, line(&d), err.to_string()))
        })
        .transpose()?;
    let deprecation = match (raw.deprecation_message, raw.deprecated_by_url) {
        (None, None) => None,
        (message, by_url) => Some(Deprecation { message, by_url }),
    };

    let refs = References {
        root,
        file: &file,
        owner: &name,
    };
    let backend_services = refs.check(
        raw.backend_services,
        BACKEND_SERVICES,
        |n| registry.backend_services.contains_key(n),
        registry.backend_services.keys(),
    )?;
    let add_ons = refs.check(
        raw.add_ons,
        ADD_ONS,
        |n| registry.add_ons.contains(n),
        registry.add_ons.iter(),
    )?;
    let license_types = refs.check(
        raw.license_types,
        LICENSE_TYPES,
        |n| registry.license_types.contains(n),
        registry.license_types.iter(),
    )?;

    Ok(UnitPrimitive {
        name,
        alias_names: raw.alias_names.into_iter().map(|a| a.value).collect(),
        description: raw.description,
        group: raw.group,
        feature_category: raw.feature_category,
        documentation_url: raw.documentation_url,
        milestone: raw.milestone,
        introduced_by_url: raw.introduced_by_url,
        unit_primitive_issue_url: raw.unit_primitive_issue_url,
        deprecation,
        cut_off_date,
        min_gitlab_version,
        min_gitlab_version_for_free_access,
        backend_services,
        add_ons,
        license_types,
    })
}

fn service(
    registry: &Registry,
    root: &Path,
    Located { file, raw }: Located<RawService>,
) -> Result<Service, ConfigError> {
    let name = raw.name.value;
    if raw.unit_primitives.value.is_empty() {
        return Err(ConfigError::new(
            &file,
            line(&raw.unit_primitives),
            format!(
                "service \"{name}\" lists no unit primitives; list the unit primitives it delivers"
            ),
        ));
    }
    let refs = References {
        root,
        file: &file,
        owner: &name,
    };
    let unit_primitives = refs.check(
        raw.unit_primitives.value,
        UNIT_PRIMITIVES,
        |n| registry.unit_primitives.contains_key(n),
        registry.unit_primitives.keys(),
    )?;
    // The schema lets `basic_unit_primitive` default to the first listed one.
    let basic_unit_primitive = match raw.basic_unit_primitive {
        None => unit_primitives[0].clone(),
        Some(basic) if unit_primitives.contains(&basic.value) => basic.value,
        Some(basic) => {
            return Err(ConfigError::new(
                &file,
                line(&basic),
                format!(
                    "service \"{name}\" has basic_unit_primitive \"{}\", which is not in its unit_primitives list; add it there or pick one of: {}",
                    basic.value,
                    unit_primitives.join(", ")
                ),
            ));
        }
    };
    let mut gitlab_realms = Vec::new();
    for realm in raw.gitlab_realm {
        if gitlab_realms.contains(&realm.value) {
            return Err(ConfigError::new(
                &file,
                line(&realm),
                format!("service \"{name}\" lists a gitlab_realm twice; remove one"),
            ));
        }
        gitlab_realms.push(realm.value);
    }
    Ok(Service {
        name,
        basic_unit_primitive,
        gitlab_realms,
        description: raw.description,
        unit_primitives,
    })
}

/// Checks the names one entry lists against the entries of another kind.
struct References<'a> {
    root: &'a Path,
    file: &'a Path,
    owner: &'a str,
}

impl References<'_> {
    fn check<'k>(
        &self,
        listed: Vec<Spanned<String>>,
        kind: Kind,
        exists: impl Fn(&str) -> bool,
        known: impl Iterator<Item = &'k String>,
    ) -> Result<Vec<String>, ConfigError> {
        let mut names = Vec::with_capacity(listed.len());
        for item in &listed {
            if !exists(&item.value) {
                return Err(ConfigError::new(
                    self.file,
                    line(item),
                    format!(
                        "\"{}\" lists {} \"{}\", but there is no {}; add that file or fix the name ({})",
                        self.owner,
                        kind.noun,
                        item.value,
                        self.root
                            .join(kind.dir)
                            .join(format!("{}.yml", item.value))
                            .display(),
                        known_names(known),
                    ),
                ));
            }
            if names.contains(&item.value) {
                return Err(ConfigError::new(
                    self.file,
                    line(item),
                    format!(
                        "\"{}\" lists {} \"{}\" twice; remove one",
                        self.owner, kind.noun, item.value
                    ),
                ));
            }
            names.push(item.value.clone());
        }
        Ok(names)
    }
}

/// Reads every `*.yml` / `*.yaml` file of one folder, keyed by name. The file name must be
/// the entry's name, which is what makes names unique within a kind.
fn read_kind<T: DeserializeOwned + Named>(
    root: &Path,
    kind: Kind,
    files_left: &mut usize,
    unknown_fields: &mut Vec<UnknownField>,
) -> Result<BTreeMap<String, Located<T>>, ConfigError> {
    let dir = root.join(kind.dir);
    let mut entries = BTreeMap::new();
    let files = match list_yaml_files(&dir, files_left)? {
        Some(files) => files,
        None if kind.required => {
            return Err(ConfigError::new(
                &dir,
                0,
                format!(
                    "not a gitlab-cloud-connector config directory: {} is missing; point `unit_primitives` at the folder that holds unit_primitives/ and backend_services/",
                    dir.display()
                ),
            ));
        }
        None => return Ok(entries),
    };
    let mut seen_at: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (stem, file) in files {
        let (raw, shape): (T, _) = yaml::read(&file)?;
        let mut unknown = Vec::new();
        shape.unknown_keys(kind.fields, "", &mut unknown);
        unknown_fields.extend(unknown.into_iter().map(|(field, line)| UnknownField {
            file: file.clone(),
            line,
            field,
        }));
        let name = raw.name();
        if !is_valid_name(&name.value) {
            return Err(ConfigError::new(
                &file,
                line(name),
                format!(
                    "{} name \"{}\" must be snake_case (lowercase letters, digits and underscores, starting with a letter)",
                    kind.noun, name.value
                ),
            ));
        }
        if name.value != stem {
            return Err(ConfigError::new(
                &file,
                line(name),
                format!(
                    "file name says \"{stem}\" but the {} is named \"{}\"; rename the file to {}.yml or set `name: {stem}`",
                    kind.noun, name.value, name.value
                ),
            ));
        }
        if let Some(first) = seen_at.get(&stem) {
            return Err(ConfigError::new(
                &file,
                line(name),
                format!(
                    "{} \"{stem}\" is defined twice, here and in {}; delete one of the files",
                    kind.noun,
                    first.display()
                ),
            ));
        }
        seen_at.insert(stem.clone(), file.clone());
        entries.insert(stem, Located { file, raw });
    }
    Ok(entries)
}

/// `(stem, path)` of the YAML files directly in `dir`, sorted; `None` if `dir` does not exist.
/// Hidden files, other extensions and subfolders are not registry entries and are skipped.
fn list_yaml_files(
    dir: &Path,
    files_left: &mut usize,
) -> Result<Option<Vec<(String, PathBuf)>>, ConfigError> {
    let io = |err: std::io::Error| {
        ConfigError::new(dir, 0, format!("cannot list registry folder: {err}"))
    };
    let read_dir = match std::fs::read_dir(dir) {
        Ok(read_dir) => read_dir,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(io(err)),
    };
    let mut files = Vec::new();
    for entry in read_dir {
        let path = entry.map_err(io)?.path();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = file_name
            .strip_suffix(".yml")
            .or_else(|| file_name.strip_suffix(".yaml"))
        else {
            continue;
        };
        // `metadata` follows symlinks, so a linked file counts and a linked folder does not.
        if stem.is_empty() || stem.starts_with('.') || !path.metadata().is_ok_and(|m| m.is_file()) {
            continue;
        }
        if *files_left == 0 {
            return Err(ConfigError::new(
                dir,
                0,
                format!(
                    "the registry has more than {MAX_FILES} files; is `unit_primitives` pointing at the right folder?"
                ),
            ));
        }
        *files_left -= 1;
        files.push((stem.to_string(), path));
    }
    files.sort();
    Ok(Some(files))
}
