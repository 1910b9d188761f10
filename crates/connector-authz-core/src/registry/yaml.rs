//! Reading one registry file: bounded in size and in parser work, errors located.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_saphyr::{Budget, Options, Spanned};

use crate::error::ConfigError;

/// Largest registry file accepted. The biggest real file (the generated legacy
/// `cloud_connector.yml`) is tens of kilobytes; anything near this is a mistake or an attack.
pub(crate) const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Largest number of YAML files read from one registry directory tree.
pub(crate) const MAX_FILES: usize = 4096;

/// Parser limits. Registry files are shallow (the legacy file nests six levels) and use at
/// most a handful of anchors (`defaults: &defaults`), so these are generous for real input
/// while an alias bomb or a deeply nested document fails fast.
fn options() -> Options {
    let mut budget = Budget::default();
    budget.max_depth = 16;
    budget.flow_nesting_limit = 16;
    budget.max_events = 200_000;
    budget.max_nodes = 100_000;
    budget.max_aliases = 256;
    budget.max_anchors = 256;
    budget.max_documents = 1;
    budget.max_total_scalar_bytes = MAX_FILE_BYTES as usize;
    budget.max_recorded_anchor_events = 100_000;
    budget.max_recorded_anchor_bytes = MAX_FILE_BYTES as usize;
    budget.max_inclusion_depth = 0;

    let mut options = Options::default();
    options.budget = Some(budget);
    options.alias_limits.max_total_replayed_events = 100_000;
    options.alias_limits.max_replay_stack_depth = 16;
    options.alias_limits.max_alias_expansions_per_anchor = 256;
    // The message goes into one log line; a source snippet would make it several.
    options.with_snippet = false;
    options
}

/// Reads `path` (at most [`MAX_FILE_BYTES`]) and deserializes it, and returns its mapping
/// keys as a [`Node`] tree so that the caller can find the fields `T` skipped: GitLab adds
/// fields to its registry files over time, and an unknown one is a warning, not an error.
pub(crate) fn read<T: DeserializeOwned>(path: &Path) -> Result<(T, Node), ConfigError> {
    let text = read_text(path)?;
    let value = parse(path, &text)?;
    // The same text parsed a second time for its shape; it parsed once, so it parses again.
    let shape = parse(path, &text)?;
    Ok((value, shape))
}

pub(crate) fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    serde_saphyr::from_str_with_options(text, options())
    .map_err(|err| {
        let mut located = ConfigError::from_yaml(path, &err);
        if is_resource_limit(&err) {
            located.message.push_str(
                "; registry files are plain, shallow YAML: remove the anchors, aliases or nesting that exceed the limit",
            );
        }
        located
    })
}

/// Whether parsing stopped at one of our limits rather than at a mistake in the YAML.
fn is_resource_limit(mut err: &serde_saphyr::Error) -> bool {
    use serde_saphyr::Error;
    loop {
        match err {
            // Alias errors and snippets wrap the error that actually stopped the parser.
            Error::AliasError { error, .. } | Error::WithSnippet { error, .. } => err = error,
            Error::Budget { .. }
            | Error::AliasReplayLimitExceeded { .. }
            | Error::AliasExpansionLimitExceeded { .. }
            | Error::AliasReplayStackDepthExceeded { .. } => return true,
            _ => return false,
        }
    }
}

fn read_text(path: &Path) -> Result<String, ConfigError> {
    let io = |err: std::io::Error| {
        ConfigError::new(path, 0, format!("cannot read registry file: {err}"))
    };
    let file = File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    // Read one byte past the limit instead of trusting the size in the metadata, which can
    // change between the check and the read.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ConfigError::new(
            path,
            0,
            format!(
                "registry file is larger than {} KiB; is this the right file?",
                MAX_FILE_BYTES / 1024
            ),
        ));
    }
    String::from_utf8(bytes)
        .map_err(|_| ConfigError::new(path, 0, "registry file is not UTF-8 text; save it as UTF-8"))
}

/// The 1-based line where a spanned value was written (0 if unknown).
pub(crate) fn line<T>(spanned: &Spanned<T>) -> u32 {
    u32::try_from(spanned.referenced.line()).unwrap_or(u32::MAX)
}

/// The shape of a YAML document: mappings with their keys and lines, nothing else.
#[derive(Debug, Default)]
pub(crate) enum Node {
    Map(Vec<(String, u32, Node)>),
    Seq(#[allow(dead_code)] Vec<Node>),
    #[default]
    Scalar,
}

impl Node {
    /// The value under `key`, if this is a mapping that has it.
    pub(crate) fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map(entries) => entries.iter().find(|(k, _, _)| k == key).map(|(_, _, v)| v),
            _ => None,
        }
    }

    /// The entries of a mapping (none for anything else).
    pub(crate) fn entries(&self) -> &[(String, u32, Node)] {
        match self {
            Node::Map(entries) => entries,
            _ => &[],
        }
    }

    /// Keys of this mapping that are not in `known`, as `(prefix.key, line)`.
    pub(crate) fn unknown_keys(&self, known: &[&str], prefix: &str, out: &mut Vec<(String, u32)>) {
        for (key, line, _) in self.entries() {
            if !known.contains(&key.as_str()) {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                out.push((path, *line));
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{MapAccess, SeqAccess, Visitor};
        use std::fmt;

        struct NodeVisitor;

        macro_rules! scalar {
            ($($method:ident: $t:ty),*) => {$(
                fn $method<E: serde::de::Error>(self, _: $t) -> Result<Node, E> {
                    Ok(Node::Scalar)
                }
            )*};
        }

        impl<'de> Visitor<'de> for NodeVisitor {
            type Value = Node;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }

            scalar!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128,
                visit_u128: u128, visit_f64: f64, visit_str: &str, visit_bytes: &[u8]);

            fn visit_unit<E: serde::de::Error>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }

            fn visit_none<E: serde::de::Error>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }

            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                <Node as serde::Deserialize>::deserialize(d)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    let at = line(&key);
                    entries.push((key.value, at, map.next_value()?));
                }
                Ok(Node::Map(entries))
            }
        }

        deserializer.deserialize_any(NodeVisitor)
    }
}
