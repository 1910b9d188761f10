//! `check`: send one Check to a running sidecar and print its decision.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Args;

use super::{RequestArgs, print_out};
use crate::proto::envoy::service::auth::v3::{
    authorization_client::AuthorizationClient, check_response,
};

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The sidecar's gRPC address.
    #[arg(long, default_value = crate::config::DEFAULT_GRPC_LISTEN)]
    pub grpc: SocketAddr,
    #[command(flatten)]
    pub request: RequestArgs,
}

pub(super) async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let request = crate::grpc::http_check_request(
        &args.request.method.to_ascii_uppercase(),
        &args.request.path,
        args.request.header_list().into_iter().collect(),
    );
    let mut client = AuthorizationClient::connect(format!("http://{}", args.grpc))
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach connector-authz at {}: {e}", args.grpc))?;
    let response = client.check(request).await?.into_inner();
    let mut out = String::new();
    let code = match response.http_response {
        Some(check_response::HttpResponse::OkResponse(ok)) => {
            out.push_str("allow\n");
            for h in ok.headers.iter().filter_map(|h| h.header.as_ref()) {
                out.push_str(&format!("  {}: {}\n", h.key, h.value));
            }
            ExitCode::SUCCESS
        }
        Some(check_response::HttpResponse::DeniedResponse(denied)) => {
            let status = denied.status.map_or(0, |s| s.code);
            out.push_str(&format!("deny {status}\n"));
            for h in denied.headers.iter().filter_map(|h| h.header.as_ref()) {
                out.push_str(&format!("  {}: {}\n", h.key, h.value));
            }
            out.push_str(&format!("  {}\n", denied.body));
            ExitCode::from(1)
        }
        None => {
            let code = response.status.map_or(0, |s| s.code);
            out.push_str(if code == 0 { "allow\n" } else { "deny\n" });
            ExitCode::from(u8::from(code != 0))
        }
    };
    print_out(&out)?;
    Ok(code)
}
