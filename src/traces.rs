//! OpenTelemetry traces of Checks: one server span per Check, with the decision, the deny
//! reason, the backend, the issuer, the matched route and the HTTP status Envoy answers
//! with; a child span while a Check waits for an unknown-kid refresh of its issuer's keys.
//! The parent comes from the W3C `traceparent` (and `tracestate`) header Envoy forwards in
//! the CheckRequest; without one a Check starts a new trace (if the sampler keeps it).
//!
//! Off unless the standard `OTEL_*` environment variables ask for an OTLP export
//! ([`TraceSettings::from_env`]). Off means no tracer at all: the gRPC service holds an
//! `Option` that is `None`, so a Check makes no span object and parses no header for it.
//! On, spans are queued for the SDK's batch processor, which exports from a thread of its
//! own; when the queue is full (a collector that is down) spans are dropped, never waited
//! for. [`TraceExport::shutdown`] flushes what is queued.
//!
//! This module never puts the token, nor any claim other than the issuer, on a span.

use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanBuilder, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

use crate::decide::Snapshot;
use crate::decision::{Decision, HeaderValue, Headers};

/// The name of a Check's span: the gRPC method, as OpenTelemetry's RPC conventions name it.
pub const CHECK_SPAN_NAME: &str = "envoy.service.auth.v3.Authorization/Check";
/// The name of the child span of a Check that waits for an unknown-kid refresh.
pub const REFRESH_SPAN_NAME: &str = "connector_authz.unknown_kid_refresh";

/// The service name spans carry unless `OTEL_SERVICE_NAME` says otherwise.
const DEFAULT_SERVICE_NAME: &str = "connector-authz";
/// A claimed issuer on a deny is whatever the token says: it is cut to this many bytes.
const MAX_ISSUER_BYTES: usize = 256;
/// How long shutting down waits for the last spans to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// A mistake in the `OTEL_*` variables, found at start-up.
#[derive(Debug, thiserror::Error)]
pub enum TraceConfigError {
    #[error("{var}={value:?}: {why}")]
    Invalid {
        var: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("cannot start the OTLP trace exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `http/protobuf`, the spec's default: POST `{endpoint}/v1/traces`.
    HttpProtobuf,
    /// `grpc`: `opentelemetry.proto.collector.trace.v1.TraceService/Export`.
    Grpc,
}

/// What the `OTEL_*` variables ask for, checked.
#[derive(Debug)]
pub struct TraceSettings {
    pub protocol: Protocol,
    /// Where spans go, as the exporter will use it (`/v1/traces` added for HTTP when the
    /// endpoint came from `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub endpoint: String,
    /// The sampler as the variables name it, for the start-up log line.
    pub sampler_name: String,
    sampler: Sampler,
    pub service_name: String,
}

/// Whether traces are exported, and if not, why (for the start-up log line).
#[derive(Debug)]
pub enum TracesFromEnv {
    Off(&'static str),
    On(TraceSettings),
}

impl TraceSettings {
    /// Reads the process environment; see [`TraceSettings::from_vars`].
    pub fn from_env() -> Result<TracesFromEnv, TraceConfigError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads the standard variables through `var` (an empty value counts as unset, as the
    /// specification says). Export is on only when an OTLP endpoint is set, the SDK is not
    /// disabled (`OTEL_SDK_DISABLED=true`) and `OTEL_TRACES_EXPORTER` is not `none`. A
    /// value we cannot honour is an error rather than a silent default: a sidecar that
    /// traces other than asked is worse than one that says so at start.
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<TracesFromEnv, TraceConfigError> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(TracesFromEnv::Off("OTEL_SDK_DISABLED=true"));
        }
        match var("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
            None | Some("otlp") => {}
            Some("none") => return Ok(TracesFromEnv::Off("OTEL_TRACES_EXPORTER=none")),
            Some(other) => {
                return Err(invalid(
                    "OTEL_TRACES_EXPORTER",
                    other,
                    "connector-authz exports traces only over OTLP: use otlp or none",
                ));
            }
        }
        let (endpoint, endpoint_is_for_traces) = match (
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            var("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(traces), _) => (traces.trim().to_owned(), true),
            (None, Some(all)) => (all.trim().to_owned(), false),
            (None, None) => {
                return Ok(TracesFromEnv::Off(
                    "neither OTEL_EXPORTER_OTLP_ENDPOINT nor OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set",
                ));
            }
        };
        let endpoint_var = if endpoint_is_for_traces {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        } else {
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        };
        let (protocol_var, protocol) = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
            Some(p) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", Some(p)),
            None => (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                var("OTEL_EXPORTER_OTLP_PROTOCOL"),
            ),
        };
        let protocol = match protocol.as_deref().map(str::trim) {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(other) => {
                return Err(invalid(
                    protocol_var,
                    other,
                    "use http/protobuf (the default) or grpc; http/json is not built in",
                ));
            }
        };
        let lower = endpoint.to_ascii_lowercase();
        let https = lower.starts_with("https://");
        if !https && !lower.starts_with("http://") {
            return Err(invalid(
                endpoint_var,
                &endpoint,
                "the OTLP endpoint must be an http:// or https:// URL, for example http://otel-collector:4318",
            ));
        }
        if https && protocol == Protocol::Grpc {
            return Err(invalid(
                endpoint_var,
                &endpoint,
                "OTLP over gRPC is built without TLS: use OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf for an https:// collector, or a plain http:// gRPC endpoint",
            ));
        }
        let endpoint = match protocol {
            Protocol::HttpProtobuf if !endpoint_is_for_traces => {
                format!("{}/v1/traces", endpoint.trim_end_matches('/'))
            }
            _ => endpoint,
        };
        let (sampler_name, sampler) = sampler_from_vars(&var)?;
        // OTEL_SERVICE_NAME, else a service.name in OTEL_RESOURCE_ATTRIBUTES (which the SDK
        // reads too), else ours rather than the SDK's `unknown_service`.
        let service_name = var("OTEL_SERVICE_NAME")
            .map(|s| s.trim().to_owned())
            .or_else(|| {
                var("OTEL_RESOURCE_ATTRIBUTES")?
                    .split(',')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(key, _)| key.trim() == "service.name")
                    .map(|(_, value)| value.trim().to_owned())
            })
            .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
        Ok(TracesFromEnv::On(TraceSettings {
            protocol,
            endpoint,
            sampler_name,
            sampler,
            service_name,
        }))
    }
}

fn invalid(var: &'static str, value: &str, why: &'static str) -> TraceConfigError {
    TraceConfigError::Invalid {
        var,
        value: value.to_owned(),
        why,
    }
}

/// `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` with the specification's values;
/// `parentbased_always_on` unless set, a ratio of 1.0 unless `OTEL_TRACES_SAMPLER_ARG` says.
fn sampler_from_vars(
    var: &impl Fn(&str) -> Option<String>,
) -> Result<(String, Sampler), TraceConfigError> {
    let name = var("OTEL_TRACES_SAMPLER").map_or_else(
        || "parentbased_always_on".to_owned(),
        |s| s.trim().to_owned(),
    );
    let ratio = || -> Result<f64, TraceConfigError> {
        let Some(arg) = var("OTEL_TRACES_SAMPLER_ARG") else {
            return Ok(1.0);
        };
        arg.trim()
            .parse::<f64>()
            .ok()
            .filter(|r| (0.0..=1.0).contains(r))
            .ok_or_else(|| {
                invalid(
                    "OTEL_TRACES_SAMPLER_ARG",
                    &arg,
                    "the sampling ratio must be a number from 0 to 1, such as 0.25",
                )
            })
    };
    let parent_based = |root: Sampler| Sampler::ParentBased(Box::new(root));
    let (shown, sampler) = match name.as_str() {
        "always_on" => (name.clone(), Sampler::AlwaysOn),
        "always_off" => (name.clone(), Sampler::AlwaysOff),
        "traceidratio" => {
            let r = ratio()?;
            (format!("{name} {r}"), Sampler::TraceIdRatioBased(r))
        }
        "parentbased_always_on" => (name.clone(), parent_based(Sampler::AlwaysOn)),
        "parentbased_always_off" => (name.clone(), parent_based(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => {
            let r = ratio()?;
            (
                format!("{name} {r}"),
                parent_based(Sampler::TraceIdRatioBased(r)),
            )
        }
        _ => {
            return Err(invalid(
                "OTEL_TRACES_SAMPLER",
                &name,
                "use always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio",
            ));
        }
    };
    Ok((shown, sampler))
}

/// The running exporter; hand its [`CheckTracer`] to the gRPC service, and call
/// [`TraceExport::shutdown`] once the last Check has been answered.
pub struct TraceExport {
    provider: SdkTracerProvider,
}

impl TraceExport {
    /// Starts the exporter: the batch processor's thread and the transport. Must run inside
    /// the Tokio runtime (the gRPC transport's connection lives there). Nothing is
    /// contacted yet: an unreachable collector shows up later, in the SDK's own log lines,
    /// and never in a Check.
    pub fn start(settings: &TraceSettings) -> Result<(Self, CheckTracer), TraceConfigError> {
        let exporter_error = |source| TraceConfigError::Exporter {
            endpoint: settings.endpoint.clone(),
            source,
        };
        // The endpoint is passed as resolved above; the builders still read the other
        // OTEL_EXPORTER_OTLP_* variables (headers, timeout, compression) themselves.
        let exporter = match settings.protocol {
            Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(settings.endpoint.clone())
                .build(),
            Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(settings.endpoint.clone())
                .build(),
        }
        .map_err(exporter_error)?;
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(settings.sampler.clone())
            .with_resource(resource)
            .build();
        let tracer = CheckTracer::new(&provider);
        Ok((Self { provider }, tracer))
    }

    /// Exports the spans still queued (within a few seconds) and stops the exporter.
    pub async fn shutdown(self) {
        // The SDK blocks this thread until the export ends; the export may need the
        // runtime (gRPC), so it waits on a blocking thread, not on a runtime worker.
        let provider = self.provider;
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT))
                .await;
        match flushed {
            Ok(Ok(())) => tracing::debug!("traces: flushed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "traces: the last spans were not exported"),
            Err(e) => tracing::warn!(error = %e, "traces: flushing failed"),
        }
    }
}

/// Starts the spans of Checks; cheap to clone.
#[derive(Clone, Debug)]
pub struct CheckTracer {
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl CheckTracer {
    /// A tracer of `provider` (benches and tests bring their own; `serve` uses
    /// [`TraceExport::start`]).
    pub fn new(provider: &SdkTracerProvider) -> Self {
        let scope = opentelemetry::InstrumentationScope::builder("connector-authz")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        CheckTracer {
            tracer: opentelemetry::trace::TracerProvider::tracer_with_scope(provider, scope),
            propagator: TraceContextPropagator::new(),
        }
    }

    /// Starts the span of one Check, as a child of the request's `traceparent` when
    /// `headers` carry a valid one (and of nothing when the CheckRequest was malformed).
    pub fn start_check(&self, headers: Option<&dyn Headers>) -> CheckSpan<'_> {
        let parent = match headers {
            Some(headers) => self.propagator.extract(&TraceHeaders(headers)),
            None => Context::new(),
        };
        let builder = SpanBuilder::from_name(CHECK_SPAN_NAME)
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", "envoy.service.auth.v3.Authorization"),
                KeyValue::new("rpc.method", "Check"),
            ]);
        let span = self.tracer.build_with_context(builder, &parent);
        CheckSpan {
            cx: parent.with_span(span),
            tracer: &self.tracer,
        }
    }
}

/// The span of one Check in progress; ends with [`CheckSpan::end_decided`] or
/// [`CheckSpan::end_invalid`] (or, dropped, with no decision on it).
pub struct CheckSpan<'a> {
    cx: Context,
    tracer: &'a SdkTracer,
}

impl CheckSpan<'_> {
    /// Starts the child span of a wait for an unknown-kid refresh of `issuer`'s keys.
    pub fn refresh_wait(&self, issuer: &str) -> RefreshWaitSpan {
        let builder = SpanBuilder::from_name(REFRESH_SPAN_NAME)
            .with_kind(SpanKind::Internal)
            .with_attributes([KeyValue::new("authz.issuer", issuer.to_owned())]);
        RefreshWaitSpan(self.tracer.build_with_context(builder, &self.cx))
    }

    /// Puts the decision on the span and ends it: `authz.decision` (`allow`, `deny` or
    /// `dry_run`), `authz.reason`, `authz.backend`, `authz.issuer`, `authz.route` (the
    /// matched pattern) and, when Envoy answers the client itself, `http.response.status_code`.
    pub fn end_decided(self, snapshot: &Snapshot, decision: &Decision) {
        let span = self.cx.span();
        if span.is_recording() {
            span.set_attributes(decision_attributes(snapshot, decision));
        }
        span.end();
    }

    /// Ends the span of a CheckRequest that could not be read (a gRPC error).
    pub fn end_invalid(self, message: &str) {
        let span = self.cx.span();
        span.set_status(Status::error(message.to_owned()));
        span.end();
    }
}

/// The span of a wait for an unknown-kid refresh.
pub struct RefreshWaitSpan(opentelemetry_sdk::trace::Span);

impl RefreshWaitSpan {
    /// Ends the span; `finished` says whether the refresh ended within the wait (else the
    /// Check went on with the keys at hand).
    pub fn end(mut self, finished: bool) {
        use opentelemetry::trace::Span as _;
        self.0
            .set_attribute(KeyValue::new("authz.refresh.finished", finished));
        self.0.end();
    }
}

fn decision_attributes(snapshot: &Snapshot, decision: &Decision) -> Vec<KeyValue> {
    let route = |index: Option<usize>| {
        index
            .and_then(|i| snapshot.config.routes.routes().get(i))
            .map(|r| KeyValue::new("authz.route", r.pattern.to_string()))
    };
    let mut attributes = Vec::with_capacity(6);
    let denied = match decision {
        Decision::Allow(allowed) => {
            attributes.push(KeyValue::new("authz.backend", allowed.backend.to_string()));
            attributes.extend(route(allowed.route));
            match allowed.dry_run.as_deref() {
                None => {
                    let identity = allowed.identity.as_ref();
                    attributes.push(KeyValue::new("authz.decision", "allow"));
                    attributes.push(KeyValue::new(
                        "authz.reason",
                        if identity.is_some() {
                            "valid_token"
                        } else {
                            "public"
                        },
                    ));
                    if let Some(identity) = identity {
                        attributes.push(KeyValue::new("authz.issuer", identity.issuer.to_string()));
                    }
                    return attributes;
                }
                Some(denied) => {
                    attributes.push(KeyValue::new("authz.decision", "dry_run"));
                    denied
                }
            }
        }
        Decision::Deny(denied) => {
            attributes.push(KeyValue::new("authz.decision", "deny"));
            attributes.extend(
                denied
                    .backend
                    .as_ref()
                    .map(|b| KeyValue::new("authz.backend", b.to_string())),
            );
            attributes.extend(route(denied.route));
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(denied.reason.http_status()),
            ));
            denied
        }
    };
    attributes.push(KeyValue::new("authz.reason", denied.reason.as_str()));
    if let Some(issuer) = denied.claimed.as_ref().and_then(|c| c.issuer.as_deref()) {
        attributes.push(KeyValue::new("authz.issuer", cut(issuer, MAX_ISSUER_BYTES)));
    }
    attributes
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// The request headers, as the W3C trace-context propagator reads them (`traceparent`,
/// `tracestate`). A header sent twice is no header: the propagator must not pick one.
struct TraceHeaders<'a>(&'a dyn Headers);

impl Extractor for TraceHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.get(key) {
            HeaderValue::One(value) => Some(value),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        // Only the trace-context propagator reads these headers, and it asks by name.
        Vec::new()
    }
}

impl std::fmt::Display for TracesFromEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TracesFromEnv::Off(why) => write!(f, "off ({why})"),
            TracesFromEnv::On(settings) => {
                let protocol = match settings.protocol {
                    Protocol::HttpProtobuf => "http/protobuf",
                    Protocol::Grpc => "grpc",
                };
                write!(
                    f,
                    "OTLP {protocol} to {}, sampler {}, service.name {}",
                    settings.endpoint, settings.sampler_name, settings.service_name
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use opentelemetry::trace::TraceContextExt as _;

    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<TracesFromEnv, TraceConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TraceSettings::from_vars(|name| vars.get(name).cloned())
    }

    fn on(vars: &[(&str, &str)]) -> TraceSettings {
        match from(vars) {
            Ok(TracesFromEnv::On(settings)) => settings,
            other => panic!("expected tracing on for {vars:?}, got {other:?}"),
        }
    }

    fn error(vars: &[(&str, &str)]) -> String {
        match from(vars) {
            Err(e) => e.to_string(),
            other => panic!("expected an error for {vars:?}, got {other:?}"),
        }
    }

    const ENDPOINT: (&str, &str) = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");

    #[test]
    fn off_without_an_endpoint_and_when_disabled() {
        for vars in [
            &[][..],
            &[
                ("OTEL_TRACES_SAMPLER", "always_on"),
                ("OTEL_SERVICE_NAME", "x"),
            ][..],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")][..],
            &[ENDPOINT, ("OTEL_SDK_DISABLED", "TRUE")][..],
            &[ENDPOINT, ("OTEL_TRACES_EXPORTER", "none")][..],
        ] {
            assert!(matches!(from(vars), Ok(TracesFromEnv::Off(_))), "{vars:?}");
        }
        // Anything but "true" leaves the SDK enabled, as the specification says.
        on(&[ENDPOINT, ("OTEL_SDK_DISABLED", "false")]);
    }

    #[test]
    fn the_endpoint_gets_the_traces_path_unless_it_is_the_traces_endpoint() {
        let settings = on(&[ENDPOINT]);
        assert_eq!(settings.protocol, Protocol::HttpProtobuf);
        assert_eq!(settings.endpoint, "http://collector:4318/v1/traces");
        let settings = on(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/base/")]);
        assert_eq!(settings.endpoint, "http://collector:4318/base/v1/traces");
        let settings = on(&[
            ENDPOINT,
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://traces.example/otlp",
            ),
        ]);
        assert_eq!(settings.endpoint, "https://traces.example/otlp");
        let settings = on(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]);
        assert_eq!(settings.protocol, Protocol::Grpc);
        assert_eq!(settings.endpoint, "http://collector:4317");
        // The signal's own protocol variable wins.
        let settings = on(&[
            ENDPOINT,
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ]);
        assert_eq!(settings.protocol, Protocol::HttpProtobuf);
    }

    #[test]
    fn samplers_have_the_specifications_names_and_default() {
        assert_eq!(on(&[ENDPOINT]).sampler_name, "parentbased_always_on");
        for name in [
            "always_on",
            "always_off",
            "parentbased_always_on",
            "parentbased_always_off",
        ] {
            assert_eq!(
                on(&[ENDPOINT, ("OTEL_TRACES_SAMPLER", name)]).sampler_name,
                name
            );
        }
        let settings = on(&[
            ENDPOINT,
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ]);
        assert_eq!(settings.sampler_name, "parentbased_traceidratio 0.25");
        let settings = on(&[ENDPOINT, ("OTEL_TRACES_SAMPLER", "traceidratio")]);
        assert_eq!(settings.sampler_name, "traceidratio 1");
        // The argument of a sampler that takes none is ignored.
        on(&[
            ENDPOINT,
            ("OTEL_TRACES_SAMPLER", "always_on"),
            ("OTEL_TRACES_SAMPLER_ARG", "lots"),
        ]);
    }

    #[test]
    fn values_it_cannot_honour_are_errors_that_name_the_variable() {
        let cases: [(&[(&str, &str)], &str); 7] = [
            (
                &[ENDPOINT, ("OTEL_TRACES_SAMPLER", "sometimes")],
                "OTEL_TRACES_SAMPLER=\"sometimes\"",
            ),
            (
                &[
                    ENDPOINT,
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
                ],
                "OTEL_TRACES_SAMPLER_ARG=\"1.5\"",
            ),
            (
                &[
                    ENDPOINT,
                    ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "half"),
                ],
                "OTEL_TRACES_SAMPLER_ARG=\"half\"",
            ),
            (
                &[ENDPOINT, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
                "OTEL_EXPORTER_OTLP_PROTOCOL=\"http/json\"",
            ),
            (
                &[ENDPOINT, ("OTEL_TRACES_EXPORTER", "zipkin")],
                "OTEL_TRACES_EXPORTER=\"zipkin\"",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")],
                "OTEL_EXPORTER_OTLP_ENDPOINT=\"collector:4318\"",
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://c:4317"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ],
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=\"https://c:4317\"",
            ),
        ];
        for (vars, expected) in cases {
            let message = error(vars);
            assert!(message.starts_with(expected), "{vars:?}: {message}");
        }
    }

    #[test]
    fn the_service_name_defaults_to_connector_authz() {
        assert_eq!(on(&[ENDPOINT]).service_name, "connector-authz");
        assert_eq!(
            on(&[ENDPOINT, ("OTEL_SERVICE_NAME", "authz-eu")]).service_name,
            "authz-eu"
        );
        let attributes = ("OTEL_RESOURCE_ATTRIBUTES", "team=ai, service.name=authz-us");
        assert_eq!(on(&[ENDPOINT, attributes]).service_name, "authz-us");
        assert_eq!(
            on(&[ENDPOINT, attributes, ("OTEL_SERVICE_NAME", "authz-eu")]).service_name,
            "authz-eu"
        );
    }

    #[test]
    fn the_parent_is_a_single_valid_traceparent() {
        let propagator = TraceContextPropagator::new();
        let parent = |headers: &[(&str, &str)]| {
            let headers = headers.to_vec();
            let cx = propagator.extract(&TraceHeaders(&headers));
            let span = cx.span();
            let context = span.span_context();
            context.is_valid().then(|| {
                (
                    context.trace_id().to_string(),
                    context.span_id().to_string(),
                )
            })
        };
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parent(&[("traceparent", valid)]),
            Some((
                "4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
                "00f067aa0ba902b7".to_owned()
            ))
        );
        assert_eq!(parent(&[]), None);
        assert_eq!(
            parent(&[("traceparent", "00-zz-00f067aa0ba902b7-01")]),
            None
        );
        // Sent twice, it is no parent at all rather than one picked at random.
        assert_eq!(
            parent(&[("traceparent", valid), ("traceparent", valid)]),
            None
        );
    }

    #[test]
    fn a_claimed_issuer_is_cut_on_a_character_boundary() {
        assert_eq!(cut("abc", 5), "abc");
        assert_eq!(cut("abcdef", 3), "abc");
        assert_eq!(cut("aé", 2), "a");
    }
}
