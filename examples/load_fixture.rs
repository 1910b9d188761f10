//! Writes what `benches/load.sh` needs into a directory: the issuer's key set (`jwks.json`),
//! connector-authz configurations with and without the token cache, a token shaped like a
//! CustomersDot service token (`token`), and that request as a gRPC-framed `CheckRequest`
//! body (`check.bin`) for h2load, built the way Envoy's ext_authz filter builds it; with
//! TOKENS, that many distinct valid tokens, one per line (`tokens`), minted on every core.
//!
//!   cargo run --release --example load_fixture -- DIR GRPC_PORT ADMIN_PORT [TOKENS]

#[path = "../benches/common/mod.rs"]
mod common;

use std::path::Path;

use connector_authz::proto::envoy::config::core::v3::{
    Address, SocketAddress, address, socket_address,
};
use connector_authz::proto::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context,
};
use prost::Message;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dir, grpc, admin, count) = match args.as_slice() {
        [dir, grpc, admin] => (dir, grpc, admin, 0),
        [dir, grpc, admin, count] => (dir, grpc, admin, count.parse::<usize>()?),
        _ => anyhow::bail!("usage: load_fixture DIR GRPC_PORT ADMIN_PORT [TOKENS]"),
    };
    let dir = Path::new(dir);
    std::fs::create_dir_all(dir)?;
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, common::jwks_json())?;
    let grpc = format!("127.0.0.1:{grpc}");
    let admin = format!("127.0.0.1:{admin}");
    std::fs::write(
        dir.join("authz.yaml"),
        common::config_yaml(&jwks, &grpc, &admin, ""),
    )?;
    std::fs::write(
        dir.join("authz-nocache.yaml"),
        common::config_yaml(&jwks, &grpc, &admin, "  cache_entries: 0"),
    )?;
    let token = common::token("load-1");
    std::fs::write(dir.join("token"), &token)?;
    std::fs::write(dir.join("check.bin"), grpc_frame(&check_request(&token)))?;
    if count > 0 {
        std::fs::write(dir.join("tokens"), distinct_tokens(count))?;
    }
    println!("{}", dir.display());
    Ok(())
}

/// `count` valid tokens that differ in their `jti`, one per line, signed on every core.
fn distinct_tokens(count: usize) -> String {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = count.div_ceil(threads);
    let parts: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let range = t * per_thread..((t + 1) * per_thread).min(count);
                    let mut lines = String::new();
                    for i in range {
                        lines.push_str(&common::token(&format!("cold-{i}")));
                        lines.push('\n');
                    }
                    lines
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a minting thread panicked"))
            .collect()
    });
    parts.concat()
}

/// A CheckRequest as Envoy 1.40 sends it for `POST /ai/v2/code/completions` with the
/// headers of `common::envoy_headers` (the `headers` map, not `header_map`).
fn check_request(token: &str) -> CheckRequest {
    let peer = |port: u32| attribute_context::Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "127.0.0.1".into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    let http = attribute_context::HttpRequest {
        id: "12718146419163375426".into(),
        method: "POST".into(),
        headers: common::envoy_headers(Some(token)),
        path: common::PATH.into(),
        host: "cloud.gitlab.com".into(),
        scheme: "http".into(),
        protocol: "HTTP/1.1".into(),
        size: 0,
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer(51234)),
            destination: Some(peer(10000)),
            request: Some(attribute_context::Request {
                time: Some(prost_types::Timestamp {
                    seconds: common::now_secs() as i64,
                    nanos: 0,
                }),
                http: Some(http),
            }),
            ..Default::default()
        }),
    }
}

/// The gRPC length-prefixed message: no compression flag, a 4-byte big-endian length.
fn grpc_frame(message: &impl Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut framed = Vec::with_capacity(body.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    framed
}
