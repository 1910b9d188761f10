//! What the sidecar does when an allow relied on a deprecated unit primitive: count every
//! use, and warn once per unit primitive per loaded configuration with the registry's
//! notice. `decide` only reports the names (in the identity); the policy lives here, out
//! of the gRPC glue.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::metrics::Metrics;

/// Which deprecated unit primitives were logged already, for the configuration loaded now.
#[derive(Default)]
pub(crate) struct DeprecationNotices {
    /// The configuration the names belong to (compared by address), and the names.
    seen: Mutex<(usize, HashSet<String>)>,
}

impl DeprecationNotices {
    /// Counts every use in `used` (as `decide` reported it, under `config`, the
    /// configuration that decided) and warns on the first use of each.
    pub(crate) fn note(&self, config: &Arc<Config>, used: &[Arc<str>], metrics: &Metrics) {
        let Some(registry) = config.registry.as_deref() else {
            return;
        };
        for name in used.iter().map(|n| &**n) {
            metrics.deprecated_unit_primitive_used(name);
            let Some(deprecation) = registry
                .unit_primitive(name)
                .and_then(|up| up.deprecation.as_ref())
            else {
                continue;
            };
            if self.first_use(config, name) {
                tracing::warn!(
                    unit_primitive = name,
                    deprecation = deprecation.message.as_deref().unwrap_or(""),
                    url = deprecation.by_url.as_deref().unwrap_or(""),
                    "a request was allowed through a deprecated unit primitive (logged once per unit primitive until the configuration is reloaded)"
                );
            }
        }
    }

    /// `true` the first time `name` is seen with this `config`.
    fn first_use(&self, config: &Arc<Config>, name: &str) -> bool {
        let id = Arc::as_ptr(config) as usize;
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.0 != id {
            *seen = (id, HashSet::new());
        }
        seen.1.insert(name.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config() -> Arc<Config> {
        let yaml = "issuers: [{url: https://issuer.test}]\nbackends: [{name: b, audience: a, routes: [{prefix: /, require: []}]}]\n";
        Arc::new(Config::from_yaml(yaml, Path::new("test.yaml")).expect("test config"))
    }

    #[test]
    fn each_name_is_new_once_per_configuration() {
        let notices = DeprecationNotices::default();
        let (first, second) = (config(), config());
        assert!(notices.first_use(&first, "duo_chat"));
        assert!(!notices.first_use(&first, "duo_chat"));
        assert!(notices.first_use(&first, "complete_code"));
        // A reload (another configuration) logs each name once more.
        assert!(notices.first_use(&second, "duo_chat"));
        assert!(!notices.first_use(&second, "duo_chat"));
    }
}
