//! The whole Check handler (`AuthzService::check`: extract, decide with a cached token,
//! respond, metrics), called in process, with tracing off and on: the hot-path cost of
//! traces (README "Tracing").
//!
//!   cargo bench --bench check -- --warm-up-time 1 --measurement-time 3
//!
//! `on` uses the SDK's batch processor, as `serve` does, with an exporter that drops each
//! batch: the figure is what a Check pays (the span, its attributes, the queue); encoding
//! and sending a batch happen on the processor's own thread. `on_sampled_out` is a Check
//! whose `traceparent` says "not sampled" under the default `parentbased_always_on`.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use connector_authz::grpc::AuthzService;
use connector_authz::proto::envoy::service::auth::v3::authorization_server::Authorization;
use connector_authz::proto::envoy::service::auth::v3::{CheckRequest, check_response};
use connector_authz::traces::CheckTracer;
use criterion::{Criterion, criterion_group, criterion_main};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};

/// Counts the spans it is given and drops them.
#[derive(Debug, Default)]
struct Discard(Arc<AtomicU64>);

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

fn request(traceparent: Option<&str>) -> CheckRequest {
    let mut headers = common::envoy_headers(Some(&common::token("bench-1")));
    if let Some(traceparent) = traceparent {
        headers.insert("traceparent".into(), traceparent.into());
    }
    connector_authz::grpc::http_check_request("POST", common::PATH, headers)
}

fn bench_check(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let service = || AuthzService::new(Arc::new(ArcSwap::from_pointee(common::snapshot())), None);
    let exported = Arc::new(AtomicU64::new(0));
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(Discard(exported.clone()))
        .build();
    let off = service();
    let on = service().with_tracer(CheckTracer::new(&provider));
    let sampled = request(Some(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ));
    let not_sampled = request(Some(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
    ));
    let no_parent = request(None);
    let check = |service: &AuthzService, request: &CheckRequest| {
        let response = runtime
            .block_on(service.check(tonic::Request::new(black_box(request.clone()))))
            .expect("a Check answers");
        matches!(
            response.into_inner().http_response,
            Some(check_response::HttpResponse::OkResponse(_))
        )
    };
    assert!(check(&off, &sampled) && check(&on, &sampled) && check(&on, &not_sampled));

    let mut group = c.benchmark_group("check");
    group.bench_function("tracing_off", |b| b.iter(|| check(&off, &sampled)));
    group.bench_function("tracing_on_with_traceparent", |b| {
        b.iter(|| check(&on, &sampled))
    });
    group.bench_function("tracing_on_new_root", |b| b.iter(|| check(&on, &no_parent)));
    group.bench_function("tracing_on_sampled_out", |b| {
        b.iter(|| check(&on, &not_sampled))
    });
    group.finish();
    provider.shutdown().expect("flush");
    eprintln!(
        "check bench: {} spans reached the exporter",
        exported.load(Ordering::Relaxed)
    );
}

criterion_group!(benches, bench_check);
criterion_main!(benches);
