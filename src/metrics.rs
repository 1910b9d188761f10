//! Every metric the sidecar exports, defined and registered in this one place
//! (`prometheus-client`), and their exposition for `GET /metrics`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `connector_authz_checks_total` | counter | `decision` (allow, deny, error), `reason`, `backend` |
//! | `connector_authz_check_duration_seconds` | histogram (10 µs … 1 s) | |
//! | `connector_authz_keys_refresh_total` | counter | `issuer`, `result` (success, failure) |
//! | `connector_authz_keys` | gauge: keys held | `issuer` |
//! | `connector_authz_keys_age_seconds` | gauge: since the keys were loaded | `issuer` |
//! | `connector_authz_config_reloads_total` | counter | `result` (success, error) |
//! | `connector_authz_deprecated_unit_primitive_requests_total` | counter | `unit_primitive` |
//! | `connector_authz_token_cache_hits_total`, `..._misses_total` | counter | |
//! | `connector_authz_tls_handshake_failures_total` | counter | `listener` (grpc, admin) |
//! | `connector_authz_tls_reloads_total` | counter | `listener`, `result` (success, error) |
//! | `connector_authz_build_info` | gauge, always 1 | `version` |
//!
//! The key metrics are read at scrape time from the current snapshot and the key
//! manager's fetch counters, so they always describe the issuers configured now: an
//! issuer removed by a reload disappears from them.
//!
//! `reason` is the deny reason word for denies, `public` or `valid_token` for allows and
//! `invalid_argument` for a malformed CheckRequest; `backend` is empty when no route
//! matched.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::decide::Snapshot;
use crate::decision::{Allowed, Decision};
use crate::keys::KeyManager;

/// Upper bounds of the Check latency buckets, in seconds: a Check decided from memory
/// takes tens of microseconds; one that waits for an unknown-kid refresh, up to seconds.
const DURATION_BUCKETS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0,
];

/// How `/metrics` is written: OpenMetrics for a scraper that asks for it, else the
/// classic Prometheus text format (what `promtool check metrics` and most tools read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Prometheus,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub(crate) fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    decision: &'static str,
    reason: &'static str,
    backend: Option<Arc<str>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerResultLabels {
    listener: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnitPrimitiveLabels {
    unit_primitive: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerLabels {
    issuer: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    issuer: Arc<str>,
    result: &'static str,
}

/// The sidecar's metrics. One instance per running server; cheap to share in an `Arc`.
pub struct Metrics {
    registry: Registry,
    checks: Family<CheckLabels, Counter>,
    check_duration: Histogram,
    config_reloads: Family<ResultLabels, Counter>,
    deprecated_unit_primitives: Family<UnitPrimitiveLabels, Counter>,
    token_cache_hits: Counter,
    token_cache_misses: Counter,
    registry_unknown_fields: Gauge,
    tls_handshake_failures: Family<ListenerLabels, Counter>,
    tls_reloads: Family<ListenerResultLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Metrics without the key metrics (tests, and a service no one scrapes).
impl Default for Metrics {
    fn default() -> Self {
        Self::build(None)
    }
}

impl Metrics {
    /// Metrics with the key metrics, read at each scrape from `snapshot` and `keys`.
    pub(crate) fn with_keys(snapshot: Arc<ArcSwap<Snapshot>>, keys: Arc<KeyManager>) -> Self {
        Self::build(Some(KeysCollector { snapshot, keys }))
    }

    fn build(keys: Option<KeysCollector>) -> Self {
        let mut registry = Registry::with_prefix("connector_authz");
        let checks = Family::<CheckLabels, Counter>::default();
        registry.register(
            "checks",
            "Check requests answered, by decision, reason and backend",
            checks.clone(),
        );
        let check_duration = Histogram::new(DURATION_BUCKETS);
        registry.register_with_unit(
            "check_duration",
            "Time to answer a Check, including any wait for an unknown-kid key refresh",
            Unit::Seconds,
            check_duration.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        // Both results are shown from the start, at 0, so that a rate() over them works.
        for result in ["success", "error"] {
            drop(config_reloads.get_or_create(&ResultLabels { result }));
        }
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP or a changed file), by result",
            config_reloads.clone(),
        );
        let deprecated_unit_primitives = Family::<UnitPrimitiveLabels, Counter>::default();
        registry.register(
            "deprecated_unit_primitive_requests",
            "Allowed requests that used a deprecated unit primitive",
            deprecated_unit_primitives.clone(),
        );
        let token_cache_hits = Counter::default();
        registry.register(
            "token_cache_hits",
            "Checks whose token was found in the verified-token cache",
            token_cache_hits.clone(),
        );
        let token_cache_misses = Counter::default();
        registry.register(
            "token_cache_misses",
            "Checks whose token was not in the verified-token cache",
            token_cache_misses.clone(),
        );
        let registry_unknown_fields = Gauge::default();
        registry.register(
            "registry_unknown_fields",
            "Fields of the loaded unit primitive registry's files that were not understood and were skipped (each is logged once at load)",
            registry_unknown_fields.clone(),
        );
        let tls_handshake_failures = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out, by listener (each is logged at debug)",
            tls_handshake_failures.clone(),
        );
        let tls_reloads = Family::<ListenerResultLabels, Counter>::default();
        registry.register(
            "tls_reloads",
            "Reloads of a listener's certificate files (changed files or a configuration reload), by result",
            tls_reloads.clone(),
        );
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "The running version of connector-authz (always 1)",
            build_info,
        );
        if let Some(keys) = keys {
            registry.register_collector(Box::new(keys));
        }
        Self {
            registry,
            checks,
            check_duration,
            config_reloads,
            deprecated_unit_primitives,
            token_cache_hits,
            token_cache_misses,
            registry_unknown_fields,
            tls_handshake_failures,
            tls_reloads,
        }
    }

    /// Counts one answered Check and its latency.
    pub(crate) fn check_decided(&self, decision: &Decision, elapsed: Duration) {
        let labels = match decision {
            Decision::Allow(Allowed {
                backend,
                dry_run: Some(denied),
                ..
            }) => CheckLabels {
                decision: "dry_run",
                reason: denied.reason.as_str(),
                backend: Some(Arc::clone(backend)),
            },
            Decision::Allow(allowed) => CheckLabels {
                decision: "allow",
                reason: if allowed.identity.is_some() {
                    "valid_token"
                } else {
                    "public"
                },
                backend: Some(Arc::clone(&allowed.backend)),
            },
            Decision::Deny(denied) => CheckLabels {
                decision: "deny",
                reason: denied.reason.as_str(),
                backend: denied.backend.clone(),
            },
        };
        self.checks.get_or_create(&labels).inc();
        self.check_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts a Check that was a gRPC error (a CheckRequest without HTTP attributes).
    pub(crate) fn check_failed(&self, elapsed: Duration) {
        let labels = CheckLabels {
            decision: "error",
            reason: "invalid_argument",
            backend: None,
        };
        self.checks.get_or_create(&labels).inc();
        self.check_duration.observe(elapsed.as_secs_f64());
    }

    pub(crate) fn config_reloaded(&self, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Shows a TLS listener's counters from the start, at 0, so that a rate() over them works.
    pub(crate) fn tls_listener(&self, listener: &'static str) {
        drop(
            self.tls_handshake_failures
                .get_or_create(&ListenerLabels { listener }),
        );
        for result in ["success", "error"] {
            drop(
                self.tls_reloads
                    .get_or_create(&ListenerResultLabels { listener, result }),
            );
        }
    }

    pub(crate) fn tls_handshake_failed(&self, listener: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&ListenerLabels { listener })
            .inc();
    }

    pub(crate) fn tls_reloaded(&self, listener: &'static str, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.tls_reloads
            .get_or_create(&ListenerResultLabels { listener, result })
            .inc();
    }

    /// Records the registry of a configuration that was just loaded (at start or reload).
    pub(crate) fn registry_loaded(&self, registry: Option<&crate::registry::Registry>) {
        let unknown = registry.map_or(0, |r| r.unknown_fields().len());
        self.registry_unknown_fields
            .set(i64::try_from(unknown).unwrap_or(i64::MAX));
    }

    pub(crate) fn deprecated_unit_primitive_used(&self, unit_primitive: &str) {
        self.deprecated_unit_primitives
            .get_or_create(&UnitPrimitiveLabels {
                unit_primitive: unit_primitive.to_owned(),
            })
            .inc();
    }

    /// The token cache's hit and miss counters, for the cache to count into directly
    /// (`TokenCache::counting_into`): one atomic add per lookup, no lock.
    pub(crate) fn token_cache_counters(&self) -> (Counter, Counter) {
        (
            self.token_cache_hits.clone(),
            self.token_cache_misses.clone(),
        )
    }

    /// The exposition, in `format`.
    pub fn encode(&self, format: Format) -> String {
        let mut open_metrics = String::new();
        // Writing into a String cannot fail; a collector's own error would be a bug.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut open_metrics, &self.registry)
        {
            tracing::error!(error = %e, "cannot encode the metrics");
        }
        match format {
            Format::OpenMetrics => open_metrics,
            Format::Prometheus => to_prometheus_text(&open_metrics),
        }
    }
}

/// OpenMetrics text → the classic Prometheus text format: a counter's `HELP` and `TYPE`
/// name its samples (`x_total`) rather than the family (`x`), and there is no `# UNIT`
/// or `# EOF` line. Everything else is the same.
fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: HashSet<&str> = open_metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 64);
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|tag| Some((tag, line.strip_prefix(tag)?)));
        match descriptor {
            Some((tag, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    let _ = writeln!(out, "{tag}{name}_total {tail}");
                } else {
                    let _ = writeln!(out, "{line}");
                }
            }
            None => {
                let _ = writeln!(out, "{line}");
            }
        }
    }
    out
}

/// Reads the key metrics at scrape time.
#[derive(Debug)]
struct KeysCollector {
    snapshot: Arc<ArcSwap<Snapshot>>,
    keys: Arc<KeyManager>,
}

impl Collector for KeysCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshot.load();
        let now = SystemTime::now();
        let held = Family::<IssuerLabels, Gauge>::default();
        let age = Family::<IssuerLabels, Gauge<f64, AtomicU64>>::default();
        for issuer in &snapshot.config.issuers {
            let labels = IssuerLabels {
                issuer: Arc::clone(&issuer.name),
            };
            let keys = snapshot.keys.get(&issuer.name);
            let count = keys.map_or(0, |k| k.keys.len());
            held.get_or_create(&labels)
                .set(i64::try_from(count).unwrap_or(i64::MAX));
            if let Some(keys) = keys {
                let seconds = now
                    .duration_since(keys.loaded_at)
                    .unwrap_or_default()
                    .as_secs_f64();
                age.get_or_create(&labels).set(seconds);
            }
        }
        let refreshes = Family::<RefreshLabels, Counter>::default();
        for (issuer, stats) in self.keys.all_fetch_stats() {
            let successes = RefreshLabels {
                issuer: Arc::clone(&issuer),
                result: "success",
            };
            refreshes.get_or_create(&successes).inc_by(stats.successes);
            let failures = RefreshLabels {
                issuer,
                result: "failure",
            };
            refreshes.get_or_create(&failures).inc_by(stats.failures);
        }
        held.encode(encoder.encode_descriptor(
            "keys",
            "Public keys held per issuer",
            None,
            held.metric_type(),
        )?)?;
        age.encode(encoder.encode_descriptor(
            "keys_age",
            "Time since the issuer's keys were loaded (fetched, read from a file or the cache)",
            Some(&Unit::Seconds),
            age.metric_type(),
        )?)?;
        refreshes.encode(encoder.encode_descriptor(
            "keys_refresh",
            "Key fetches per network issuer, by result",
            None,
            refreshes.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{Allowed, DenyReason};

    fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
    }

    #[test]
    fn checks_are_counted_by_decision_reason_and_backend() {
        let metrics = Metrics::default();
        let allow = Decision::Allow(Allowed {
            backend: Arc::from("ai_gateway"),
            route: None,
            identity: None,
            dry_run: None,
            removed_headers: Vec::new(),
        });
        metrics.check_decided(&allow, Duration::from_micros(40));
        metrics.check_decided(&allow, Duration::from_micros(60));
        metrics.check_decided(
            &Decision::deny(DenyReason::NoRoute, "no"),
            Duration::from_micros(5),
        );
        metrics.check_failed(Duration::from_micros(1));
        let text = metrics.encode(Format::Prometheus);
        assert_eq!(
            sample(
                &text,
                r#"connector_authz_checks_total{decision="allow",reason="public",backend="ai_gateway"}"#
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"connector_authz_checks_total{decision="deny",reason="no_route",backend=""}"#
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"connector_authz_checks_total{decision="error",reason="invalid_argument",backend=""}"#
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "connector_authz_check_duration_seconds_count"),
            Some(4.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"connector_authz_check_duration_seconds_bucket{le="0.00005"}"#
            ),
            Some(3.0),
            "{text}"
        );
    }

    #[test]
    fn prometheus_text_names_counters_by_their_samples() {
        let metrics = Metrics::default();
        metrics.config_reloaded(false);
        metrics.token_cache_counters().0.inc();
        let text = metrics.encode(Format::Prometheus);
        assert!(
            text.contains("# TYPE connector_authz_config_reloads_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP connector_authz_token_cache_hits_total "));
        assert!(text.contains("connector_authz_token_cache_hits_total 1\n"));
        assert!(text.contains("connector_authz_token_cache_misses_total 0\n"));
        assert!(text.contains("connector_authz_build_info{version=\""));
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("# UNIT"));

        let open = metrics.encode(Format::OpenMetrics);
        assert!(open.contains("# TYPE connector_authz_config_reloads counter\n"));
        assert!(open.ends_with("# EOF\n"));
    }

    #[test]
    fn the_accept_header_chooses_the_format() {
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(
            Format::from_accept(Some("text/plain;version=0.0.4;q=0.5,*/*;q=0.1")),
            Format::Prometheus
        );
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
            )),
            Format::OpenMetrics
        );
    }
}
