//! Compiles `proto/` (our subset of Envoy's ext_authz v3 API) with protox, a pure-Rust
//! protobuf compiler, so that building needs no system `protoc`; and embeds the shipped
//! unit primitive registry (`config/cloud_connector/`) for `serve --dev`.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

const PROTOS: &[&str] = &[
    "envoy/service/auth/v3/external_auth.proto",
    "envoy/service/auth/v3/attribute_context.proto",
    "envoy/config/core/v3/base.proto",
    "envoy/config/core/v3/address.proto",
    "envoy/type/v3/http_status.proto",
    "google/rpc/status.proto",
];

const REGISTRY_DIR: &str = "config/cloud_connector";

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"]).map_err(io::Error::other)?;
    // The client is not used by the service itself, but tests and benches drive it
    // through a real gRPC channel.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    embed_registry()
}

/// Writes `$OUT_DIR/embedded_registry.rs`: a slice of (relative path, contents) of every
/// YAML file of the shipped registry, so the dev mode works from the binary alone.
fn embed_registry() -> io::Result<()> {
    println!("cargo:rerun-if-changed={REGISTRY_DIR}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(REGISTRY_DIR);
    let mut files = Vec::new();
    for kind in std::fs::read_dir(&root)? {
        let kind = kind?.path();
        if !kind.is_dir() {
            continue;
        }
        println!("cargo:rerun-if-changed={}", kind.display());
        for file in std::fs::read_dir(&kind)? {
            let file = file?.path();
            if file.extension().is_some_and(|e| e == "yml" || e == "yaml") {
                let relative = file.strip_prefix(&root).map_err(io::Error::other)?;
                files.push((relative.display().to_string(), file.display().to_string()));
            }
        }
    }
    files.sort();
    let mut out = String::from("&[\n");
    for (relative, absolute) in &files {
        writeln!(out, "    ({relative:?}, include_str!({absolute:?})),")
            .map_err(io::Error::other)?;
    }
    out.push_str("]\n");
    let dest = Path::new(&std::env::var("OUT_DIR").map_err(io::Error::other)?)
        .join("embedded_registry.rs");
    std::fs::write(dest, out)
}
