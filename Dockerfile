# syntax=docker/dockerfile:1
# connector-authz container image.
#
#   docker build -t connector-authz:0.1.0 .
#   docker run --rm -p 127.0.0.1:9191:9191 -p 127.0.0.1:9192:9192 connector-authz:0.1.0 \
#       serve --dev --grpc 0.0.0.0:9191 --admin 0.0.0.0:9192   # dev mode binds loopback unless told
#
# Base image choice: a glibc build on distroless "cc" (glibc, libgcc, CA certificates, no
# shell, no package manager), not a static musl binary on distroless "static". aws-lc-rs
# (the crypto behind jsonwebtoken and rustls) builds C code, which for musl needs musl-tools
# and a musl target that this project's development machines and CI cannot install, so a
# musl image could never be tried before release. The builder is Debian 12 and the runtime
# is distroless Debian 12, so the binary links against the same glibc it runs on.
#
# reqwest's rustls reads the system CA certificates, which distroless/cc ships in
# /etc/ssl/certs; issuers' HTTPS keys endpoints need them.
#
# CI does not build this file (no docker there); it is checked by hand when changed.

FROM rust:1.95-bookworm AS build
# aws-lc-sys builds its C code with cc, and falls back to cmake on some targets.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the crate registry and the target directory between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin connector-authz \
 && install -D -m 0755 target/release/connector-authz /out/connector-authz

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/connector-authz /connector-authz
# The shipped unit primitive registry, for configs that say
# `unit_primitives: /usr/share/connector-authz/cloud_connector`.
COPY config/cloud_connector /usr/share/connector-authz/cloud_connector
# distroless "nonroot" is uid/gid 65532; deployment.yaml runs as the same ids.
USER 65532:65532
# 9191: ext_authz gRPC and grpc.health.v1; 9192: /healthz, /readyz, /metrics
EXPOSE 9191 9192
ENTRYPOINT ["/connector-authz"]
CMD ["serve", "--config", "/etc/connector-authz/config.yaml"]
