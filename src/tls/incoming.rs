//! The connections of a TLS listener: accepted, handshaken each in its own task, and
//! handed to the server (tonic as a `Stream`, axum as a `Listener`) once the handshake
//! is done.
//!
//! A handshake runs apart from the accept loop and from every other connection, so a
//! client that stalls or fails its handshake delays no one: it is dropped after
//! [`HANDSHAKE_TIMEOUT`], counted (`connector_authz_tls_handshake_failures_total`) and
//! logged at debug (a port scanner or a client without a certificate must not flood the
//! log). Dropping the stream or listener stops the accept loop and closes the socket.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::ServerTls;
use crate::transport::Unvectored;

/// How long a client may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose handshake is done but that the server has not taken yet.
const READY_QUEUE: usize = 64;

/// A TLS listener's finished handshakes.
pub struct TlsIncoming {
    ready: mpsc::Receiver<(TlsConnection, SocketAddr)>,
    local_addr: SocketAddr,
}

impl TlsIncoming {
    /// Starts accepting on `listener`, handshaking with `tls`'s settings of the moment.
    pub fn new(listener: TcpListener, tls: Arc<ServerTls>) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (sender, ready) = mpsc::channel(READY_QUEUE);
        tokio::spawn(accept_loop(listener, tls, sender));
        Ok(Self { ready, local_addr })
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    ready: mpsc::Sender<(TlsConnection, SocketAddr)>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = ready.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(listener = tls.listener().as_str(), error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let acceptor = tls.acceptor();
        let tls = Arc::clone(&tls);
        let ready = ready.clone();
        tokio::spawn(async move {
            let failure = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(stream)) => {
                    // The server stopped meanwhile: the connection just closes.
                    let _ = ready.send((Unvectored(stream), peer)).await;
                    return;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
            };
            tls.handshake_failed();
            tracing::debug!(
                listener = tls.listener().as_str(),
                %peer,
                error = %failure,
                "TLS handshake failed"
            );
        });
    }
}

impl Stream for TlsIncoming {
    type Item = io::Result<TlsConnection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .ready
            .poll_recv(cx)
            .map(|next| next.map(|(connection, _)| Ok(connection)))
    }
}

impl axum::serve::Listener for TlsIncoming {
    type Io = TlsConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop ends only once this receiver is gone, so this cannot be
            // reached; should it ever be, accept nothing rather than spin.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

/// A TLS connection whose handshake is done. Like the plain listener's connections
/// ([`crate::transport`]), it tells h2 it has no vectored writes, so that a small
/// response is written as one TLS record rather than one per piece.
pub type TlsConnection = Unvectored<TlsStream<TcpStream>>;

impl Connected for TlsConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}
