//! The do-nothing ext_authz server: the ceiling every load figure of connector-authz is
//! held against (BENCHMARKS.md). It is built from the same `proto/` types, the same tonic
//! stack, listener (`transport::CoalescingIncoming`, TCP_NODELAY) and runtime shape
//! (`--workers auto`'s, so one thread on 2 CPUs) as connector-authz, decodes each
//! CheckRequest in full, and answers every Check with OK without looking at it.
//!
//!   cargo run --release --example noop_authz -- 127.0.0.1:9291 [--same-answer]
//!
//! With `--same-answer` it answers every Check with the allow response connector-authz
//! gives the load benchmark's request (the identity headers and the access-log metadata),
//! built once at start: what Envoy does with that answer then costs the same as with
//! connector-authz, and only the deciding is left out. It runs until SIGINT or SIGTERM.

#[path = "../benches/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use connector_authz::decision::{Allowed, Decision, Identity};
use connector_authz::grpc::to_response;
use connector_authz::proto::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, OkHttpResponse,
    authorization_server::{Authorization, AuthorizationServer},
    check_response::HttpResponse,
};
use connector_authz::proto::google::rpc;
use connector_authz::transport::CoalescingIncoming;
use tonic::transport::server::TcpIncoming;

struct AllowEverything {
    answer: CheckResponse,
}

#[tonic::async_trait]
impl Authorization for AllowEverything {
    async fn check(
        &self,
        _request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.answer.clone()))
    }
}

/// An empty OK, or connector-authz's allow for the benchmark token.
fn answer(same_as_connector_authz: bool) -> CheckResponse {
    if !same_as_connector_authz {
        return CheckResponse {
            status: Some(rpc::Status::default()),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            dynamic_metadata: None,
        };
    }
    to_response(&Decision::Allow(Allowed {
        backend: Arc::from("ai_gateway"),
        route: None,
        identity: Some(Identity {
            subject: common::INSTANCE.into(),
            issuer: Arc::from(common::ISSUER),
            scopes: common::SCOPES.iter().map(|s| s.to_string()).collect(),
            jti: Some("load-1".into()),
            unit_primitive: None,
            deprecated: Vec::new(),
            forwarded: Vec::new(),
        }),
        dry_run: None,
        removed_headers: Vec::new(),
    }))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr: SocketAddr = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map_or("127.0.0.1:9291", String::as_str)
        .parse()?;
    let same_answer = args.iter().any(|a| a == "--same-answer");
    let mut runtime = match connector_authz::cli::Workers::Auto.threads() {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    runtime
        .enable_all()
        .build()?
        .block_on(serve(addr, answer(same_answer)))
}

async fn serve(addr: SocketAddr, answer: CheckResponse) -> anyhow::Result<()> {
    let incoming = CoalescingIncoming::new(
        TcpIncoming::bind(addr)
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?
            .with_nodelay(Some(true)),
    );
    eprintln!("noop_authz: answering every Check with OK on {addr}");
    tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(AllowEverything { answer }))
        .serve_with_incoming_shutdown(incoming, stop())
        .await?;
    Ok(())
}

async fn stop() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
