//! The plugin configuration (JSON, in Envoy's `plugin_config.configuration`): where the
//! sidecar's admin listener is and how often to ask it. Anything else is refused, and the
//! filter then fails closed.

use std::time::Duration;

use serde::Deserialize;

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
}

impl PluginConfig {
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(800);

    /// Parses the configuration; the error is one sentence that says what to fix.
    pub fn parse(bytes: &[u8]) -> Result<PluginConfig, String> {
        const SHAPE: &str = r#"write {"cluster": "<admin cluster>", "authority": "<host:port>", "poll_interval": "5s", "timeout": "800ms"}"#;
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
        Ok(PluginConfig {
            cluster: raw.cluster,
            authority: raw.authority,
            poll_interval,
            timeout,
        })
    }
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
        ] {
            let err = PluginConfig::parse(bad).unwrap_err();
            assert!(err.starts_with("invalid plugin configuration"), "{err}");
        }
    }
}
