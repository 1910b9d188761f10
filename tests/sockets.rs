//! Socket options of the accepted connections, read from the server's own sockets (the
//! server runs in this process, so its file descriptors are ours to inspect): both
//! listeners set TCP_NODELAY. Without it an HTTP/2 answer written as two frames can wait
//! for the peer's delayed ACK; BENCHMARKS.md measured that as 20-30 ms p99 spikes on the
//! filter's `/v1/verify` calls to the admin listener.
#![cfg(target_os = "linux")]

mod support;

use std::net::{SocketAddr, TcpStream};
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::time::Duration;

use connector_authz::config::Config;
use connector_authz::serve;
use support::{FakeIssuer, test_key, within};

/// TCP_NODELAY of the server's end of the connection from `client` to `server`, once the
/// server has accepted it; `None` while no such socket exists in this process.
fn server_nodelay(server: SocketAddr, client: &TcpStream) -> Option<bool> {
    let client_addr = client.local_addr().ok()?;
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: the descriptor is open (just listed) and only borrowed for these calls;
        // the server's task owns it and nothing here closes it.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let local = socket.local_addr().ok().and_then(|a| a.as_socket());
        let peer = socket.peer_addr().ok().and_then(|a| a.as_socket());
        if local == Some(server) && peer == Some(client_addr) {
            return socket.tcp_nodelay().ok();
        }
    }
    None
}

#[tokio::test]
async fn both_listeners_set_tcp_nodelay_on_accepted_connections() {
    let key = test_key(1);
    let issuer = FakeIssuer::start(&[&key]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cloud_connector");
    let yaml = format!(
        "listen: {{grpc: 127.0.0.1:0, admin: 127.0.0.1:0}}
issuers:
  - url: {iss}
unit_primitives: {registry}
backends:
  - name: ai_gateway
    backend_service: ai_gateway
    routes:
      - prefix: /ai/v2/code/
        require: [complete_code]
",
        iss = issuer.url(),
        registry = registry.display(),
    );
    let config =
        Config::from_yaml(&yaml, &dir.path().join("config.yaml")).expect("test config is valid");
    let running = serve::start(config).await.expect("server starts");

    for (name, addr) in [("gRPC", running.grpc_addr), ("admin", running.admin_addr)] {
        let client = TcpStream::connect(addr).expect("connect");
        // The client's own socket has Nagle on: the option read below is the server's.
        assert!(!client.nodelay().expect("client option"));
        let mut seen = None;
        let accepted = within(Duration::from_secs(10), async || {
            seen = server_nodelay(addr, &client);
            seen.is_some()
        })
        .await;
        assert!(
            accepted,
            "the {name} listener never accepted the connection"
        );
        assert_eq!(
            seen,
            Some(true),
            "the {name} listener's connection has Nagle on"
        );
    }
    running.shutdown().await;
}
