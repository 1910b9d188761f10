//! Compiles `proto/` (our subset of Envoy's ext_authz v3 API) with protox, a pure-Rust
//! protobuf compiler, so that building needs no system `protoc`.

use std::io;

const PROTOS: &[&str] = &[
    "envoy/service/auth/v3/external_auth.proto",
    "envoy/service/auth/v3/attribute_context.proto",
    "envoy/config/core/v3/base.proto",
    "envoy/config/core/v3/address.proto",
    "envoy/type/v3/http_status.proto",
    "google/rpc/status.proto",
];

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"]).map_err(io::Error::other)?;
    // The client is not used by the service itself, but tests and benches drive it
    // through a real gRPC channel.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
}
