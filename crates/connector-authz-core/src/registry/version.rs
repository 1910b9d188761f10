//! GitLab version numbers as unit primitives and the `x-gitlab-version` header use them.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

/// Suffixes that name a GitLab edition rather than a stage of a release: `17.3.0-ee` is the
/// released 17.3.0 of the Enterprise Edition, so it must compare equal to `17.3.0`.
const EDITIONS: [&str; 3] = ["ee", "ce", "jh"];

/// A GitLab version: `16.9`, `16.10.1-ee`, `17.3.0-pre`, `17.3.0-rc1`, `17.0.0-rc42-ee`.
///
/// Ordering is numeric by component (`16.9 < 16.10.1`); a pre-release (`-pre`, `-rc1`) is
/// lower than the release it leads to; an edition suffix (`-ee`, `-ce`, `-jh`) does not take
/// part in comparison, so `17.3.0-ee == 17.3.0`. Equality and hashing follow the ordering.
#[derive(Debug, Clone)]
pub struct GitlabVersion {
    pub major: u32,
    pub minor: u32,
    /// `0` when the text has only two components (`16.9`).
    pub patch: u32,
    /// The pre-release label without its dash (`pre`, `rc1`), if any.
    pub pre_release: Option<String>,
    /// The edition suffix without its dash (`ee`, `ce`, `jh`), if any; kept for display only.
    pub edition: Option<String>,
}

/// Why a text is not a GitLab version; the message says what a valid one looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid GitLab version {text:?}: {reason}; write it like \"17.3\", \"17.3.1\", \"17.3.0-ee\" or \"17.4.0-pre\""
)]
pub struct ParseVersionError {
    text: String,
    reason: &'static str,
}

impl GitlabVersion {
    pub fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
            pre_release: None,
            edition: None,
        }
    }

    pub fn is_pre_release(&self) -> bool {
        self.pre_release.is_some()
    }

    /// What ordering and equality look at: the edition is deliberately absent.
    fn key(&self) -> (u32, u32, u32, Option<PreReleaseKey<'_>>) {
        (
            self.major,
            self.minor,
            self.patch,
            self.pre_release.as_deref().map(PreReleaseKey::of),
        )
    }
}

/// A pre-release label split into its word and its number, so that `rc2 < rc10` and
/// `rc01 == rc1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct PreReleaseKey<'a> {
    word: &'a str,
    number: Option<u64>,
}

impl<'a> PreReleaseKey<'a> {
    fn of(label: &'a str) -> Self {
        let digits_at = label
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(label.len());
        let (word, digits) = label.split_at(digits_at);
        // A label like `rc1a` does not split cleanly; keep it whole as the word so that it
        // still orders deterministically.
        match digits.parse::<u64>() {
            Ok(number) => Self {
                word,
                number: Some(number),
            },
            Err(_) if digits.is_empty() => Self { word, number: None },
            Err(_) => Self {
                word: label,
                number: None,
            },
        }
    }
}

impl Ord for GitlabVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (self.key(), other.key());
        (a.0, a.1, a.2)
            .cmp(&(b.0, b.1, b.2))
            // A release sorts after every pre-release of the same number.
            .then_with(|| match (a.3, b.3) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(x), Some(y)) => x.cmp(&y),
            })
    }
}

impl PartialOrd for GitlabVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for GitlabVersion {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for GitlabVersion {}

impl Hash for GitlabVersion {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl fmt::Display for GitlabVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        if let Some(pre) = &self.pre_release {
            write!(f, "-{pre}")?;
        }
        if let Some(edition) = &self.edition {
            write!(f, "-{edition}")?;
        }
        Ok(())
    }
}

impl FromStr for GitlabVersion {
    type Err = ParseVersionError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason| ParseVersionError {
            text: text.to_string(),
            reason,
        };
        let (numbers, suffix) = match text.split_once('-') {
            Some((numbers, suffix)) => (numbers, Some(suffix)),
            None => (text, None),
        };
        let mut parts = numbers.split('.');
        let mut component = |required: bool| -> Result<Option<u32>, ParseVersionError> {
            match parts.next() {
                None if required => Err(fail("it needs at least a major and a minor number")),
                None => Ok(None),
                Some(p) if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) => {
                    Err(fail("each component must be a number"))
                }
                Some(p) => p
                    .parse::<u32>()
                    .map(Some)
                    .map_err(|_| fail("a component is too large")),
            }
        };
        let major = component(true)?.unwrap_or_default();
        let minor = component(true)?.unwrap_or_default();
        let patch = component(false)?.unwrap_or_default();
        if parts.next().is_some() {
            return Err(fail("it has more than three components"));
        }

        let mut pre_release = None;
        let mut edition = None;
        if let Some(suffix) = suffix {
            let labels: Vec<&str> = suffix.split('-').collect();
            if labels
                .iter()
                .any(|l| l.is_empty() || !l.bytes().all(|b| b.is_ascii_alphanumeric()))
            {
                return Err(fail("a suffix must be letters and digits after a dash"));
            }
            let (last, rest) = labels
                .split_last()
                .ok_or_else(|| fail("a suffix must be letters and digits after a dash"))?;
            let last_lower = last.to_ascii_lowercase();
            let pre_labels = if EDITIONS.contains(&last_lower.as_str()) {
                edition = Some(last_lower);
                rest
            } else {
                &labels[..]
            };
            match pre_labels {
                [] => {}
                [one] => pre_release = Some(one.to_ascii_lowercase()),
                _ => return Err(fail("it has more than one pre-release label")),
            }
        }

        Ok(Self {
            major,
            minor,
            patch,
            pre_release,
            edition,
        })
    }
}

/// As its text, which [`FromStr`] reads back.
impl serde::Serialize for GitlabVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for GitlabVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> GitlabVersion {
        text.parse().unwrap()
    }

    #[test]
    fn compares_components_numerically() {
        assert!(v("16.9") < v("16.10.1-ee"));
        assert!(v("16.9") < v("16.10"));
        assert!(v("16.10") < v("16.10.1"));
        assert!(v("9.9.9") < v("10.0"));
        assert_eq!(v("16.9"), v("16.9.0"));
    }

    #[test]
    fn pre_release_is_lower_than_the_release() {
        assert!(v("17.3.0-pre") < v("17.3.0"));
        assert!(v("17.3.0-rc1") < v("17.3.0"));
        assert!(v("17.3.0-rc1") < v("17.3.0-ee"));
        assert!(v("17.2.9") < v("17.3.0-pre"));
        assert!(v("17.3.0-rc2") < v("17.3.0-rc10"));
        assert!(v("17.0.0-rc42-ee") < v("17.0.0"));
        assert_eq!(v("17.0.0-rc42-ee"), v("17.0.0-rc42"));
        assert!(v("17.3.0-pre").is_pre_release());
    }

    #[test]
    fn edition_is_not_a_pre_release() {
        assert_eq!(v("17.3.0-ee"), v("17.3.0"));
        assert_eq!(v("17.3.0-ce"), v("17.3-ee"));
        assert!(!v("17.3.0-ee").is_pre_release());
        use std::collections::HashSet;
        let set: HashSet<_> = [v("17.3.0-ee"), v("17.3.0")].into_iter().collect();
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn displays_all_three_components() {
        assert_eq!(v("16.9").to_string(), "16.9.0");
        assert_eq!(v("16.10.1-ee").to_string(), "16.10.1-ee");
        assert_eq!(v("17.0.0-RC42-ee").to_string(), "17.0.0-rc42-ee");
    }

    #[test]
    fn rejects_what_is_not_a_version() {
        for bad in [
            "",
            "17",
            "17.",
            "v17.3",
            "17.3.0.1",
            "17.a",
            "17.3-",
            "17.3.0-rc 1",
            " 17.3",
            "99999999999.1",
            "17.3.0-pre-rc1",
        ] {
            let err = bad.parse::<GitlabVersion>().unwrap_err();
            assert!(err.to_string().contains("write it like"), "{bad}: {err}");
        }
    }
}
