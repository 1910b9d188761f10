//! The plugin configuration (JSON, in Envoy's `plugin_config.configuration`): where the
//! sidecar's admin listener is and how often to ask it. Anything else is refused, and the
//! filter then fails closed.

use std::time::Duration;

use serde::Deserialize;

/// The decision's facts the filter can record as filter state (`wasm.connector_authz.<fact>`).
pub const FACTS: [&str; 8] = [
    "decision",
    "reason",
    "backend",
    "subject",
    "issuer",
    "scopes",
    "unit_primitive",
    "jti",
];
/// Recorded unless the configuration lists others: each fact is one host call per request,
/// and Envoy builds a filter state object for each (several microseconds apiece).
pub const DEFAULT_FACTS: [&str; 3] = ["decision", "reason", "backend"];

/// The most a verify call may pause a request; above Envoy's own stream timeouts it
/// would only hide a misconfiguration.
const MAX_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginConfig {
    /// The Envoy cluster of the sidecar's admin listener.
    pub cluster: String,
    /// The `:authority` of calls to it (`host:port`).
    pub authority: String,
    /// How often `/v1/snapshot` is asked for.
    pub poll_interval: Duration,
    /// How long a request may wait for `/v1/verify` (and a snapshot call may take).
    pub timeout: Duration,
    /// Which of [`FACTS`] are recorded, as a bit per fact.
    facts: u8,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    cluster: String,
    authority: String,
    #[serde(default)]
    poll_interval: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    facts: Option<Vec<String>>,
}

impl PluginConfig {
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(800);

    /// Parses the configuration; the error is one sentence that says what to fix.
    pub fn parse(bytes: &[u8]) -> Result<PluginConfig, String> {
        const SHAPE: &str = r#"write {"cluster": "<admin cluster>", "authority": "<host:port>", "poll_interval": "5s", "timeout": "800ms", "facts": ["decision", "reason", "backend"]}"#;
        let raw: Raw = serde_json::from_slice(bytes)
            .map_err(|e| format!("invalid plugin configuration ({e}); {SHAPE}"))?;
        if raw.cluster.trim().is_empty() || raw.authority.trim().is_empty() {
            return Err(format!(
                "invalid plugin configuration: cluster and authority must not be empty; {SHAPE}"
            ));
        }
        let duration = |name: &str, value: Option<String>, default: Duration| {
            match value {
            None => Ok(default),
            Some(text) => humantime::parse_duration(&text)
                .map_err(|e| format!("invalid plugin configuration: {name} {text:?}: {e}; write it like \"5s\" or \"800ms\"")),
        }
        };
        let poll_interval = duration(
            "poll_interval",
            raw.poll_interval,
            Self::DEFAULT_POLL_INTERVAL,
        )?;
        let timeout = duration("timeout", raw.timeout, Self::DEFAULT_TIMEOUT)?;
        if poll_interval < MIN_POLL_INTERVAL {
            return Err(format!(
                "invalid plugin configuration: poll_interval must be at least {}",
                humantime::format_duration(MIN_POLL_INTERVAL)
            ));
        }
        if timeout.is_zero() || timeout > MAX_TIMEOUT {
            return Err(format!(
                "invalid plugin configuration: timeout must be above 0 and at most {}",
                humantime::format_duration(MAX_TIMEOUT)
            ));
        }
        let facts = match raw.facts {
            None => fact_bits(DEFAULT_FACTS.iter().copied())?,
            Some(names) => fact_bits(names.iter().map(String::as_str))?,
        };
        Ok(PluginConfig {
            cluster: raw.cluster,
            authority: raw.authority,
            poll_interval,
            timeout,
            facts,
        })
    }

    /// Whether the fact `name` is recorded.
    pub fn records(&self, name: &str) -> bool {
        FACTS
            .iter()
            .position(|&f| f == name)
            .is_some_and(|i| self.facts & (1 << i) != 0)
    }
}

fn fact_bits<'a>(names: impl Iterator<Item = &'a str>) -> Result<u8, String> {
    let mut bits = 0u8;
    for name in names {
        let Some(i) = FACTS.iter().position(|&f| f == name) else {
            return Err(format!(
                "invalid plugin configuration: facts: unknown fact {name:?}; the facts are {}",
                FACTS.join(", ")
            ));
        };
        bits |= 1 << i;
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_configuration_parses() {
        let config = PluginConfig::parse(
            br#"{"cluster": "authz_admin", "authority": "127.0.0.1:9192", "poll_interval": "2s", "timeout": "300ms"}"#,
        )
        .unwrap();
        assert_eq!(config.cluster, "authz_admin");
        assert_eq!(config.authority, "127.0.0.1:9192");
        assert_eq!(config.poll_interval, Duration::from_secs(2));
        assert_eq!(config.timeout, Duration::from_millis(300));
        let defaults = PluginConfig::parse(br#"{"cluster": "a", "authority": "b:1"}"#).unwrap();
        assert_eq!(defaults.poll_interval, PluginConfig::DEFAULT_POLL_INTERVAL);
        assert_eq!(defaults.timeout, PluginConfig::DEFAULT_TIMEOUT);
        for fact in FACTS {
            assert_eq!(
                defaults.records(fact),
                DEFAULT_FACTS.contains(&fact),
                "{fact}"
            );
        }
    }

    #[test]
    fn the_recorded_facts_are_those_listed() {
        let config = PluginConfig::parse(
            br#"{"cluster": "a", "authority": "b:1", "facts": ["subject", "jti"]}"#,
        )
        .unwrap();
        let recorded: Vec<&str> = FACTS.into_iter().filter(|f| config.records(f)).collect();
        assert_eq!(recorded, ["subject", "jti"]);
        let none =
            PluginConfig::parse(br#"{"cluster": "a", "authority": "b:1", "facts": []}"#).unwrap();
        assert!(FACTS.iter().all(|f| !none.records(f)));
        assert!(!config.records("nonsense"));
    }

    #[test]
    fn anything_else_is_refused_with_what_to_write() {
        for bad in [
            &b""[..],
            b"not json",
            br#"{"cluster": "a"}"#,
            br#"{"cluster": "a", "authority": "b:1", "extra": 1}"#,
            br#"{"cluster": "", "authority": "b:1"}"#,
            br#"{"cluster": "a", "authority": "b:1", "timeout": "soon"}"#,
            br#"{"cluster": "a", "authority": "b:1", "timeout": "0s"}"#,
            br#"{"cluster": "a", "authority": "b:1", "timeout": "1h"}"#,
            br#"{"cluster": "a", "authority": "b:1", "poll_interval": "1ms"}"#,
            br#"{"cluster": 1, "authority": "b:1"}"#,
            br#"{"cluster": "a", "authority": "b:1", "facts": ["decision", "token"]}"#,
            br#"{"cluster": "a", "authority": "b:1", "facts": "all"}"#,
        ] {
            let err = PluginConfig::parse(bad).unwrap_err();
            assert!(err.starts_with("invalid plugin configuration"), "{err}");
        }
    }
}
