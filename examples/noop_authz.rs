//! The do-nothing ext_authz server: the ceiling every load figure of connector-authz is
//! held against (BENCHMARKS.md). It is built from the same `proto/` types, the same tonic
//! stack and the same runtime shape (two worker threads, TCP_NODELAY) as connector-authz,
//! decodes each CheckRequest in full, and answers every Check with OK without looking at it.
//!
//!   cargo run --release --example noop_authz -- 127.0.0.1:9291
//!
//! It runs until SIGINT or SIGTERM.

use std::net::SocketAddr;

use connector_authz::proto::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, OkHttpResponse,
    authorization_server::{Authorization, AuthorizationServer},
    check_response::HttpResponse,
};
use connector_authz::proto::google::rpc;
use tonic::transport::server::TcpIncoming;

struct AllowEverything;

#[tonic::async_trait]
impl Authorization for AllowEverything {
    async fn check(
        &self,
        _request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(CheckResponse {
            status: Some(rpc::Status::default()),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            dynamic_metadata: None,
        }))
    }
}

fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9291".into())
        .parse()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(addr))
}

async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let incoming = TcpIncoming::bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?
        .with_nodelay(Some(true));
    eprintln!("noop_authz: answering every Check with OK on {addr}");
    tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(AllowEverything))
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
