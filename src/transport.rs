//! The connections of the gRPC listener: TCP with `TCP_NODELAY`, presented to h2 as a
//! transport without vectored writes so that one Check response leaves in one write.
//!
//! Why: h2 copies a DATA payload into its write buffer only when it is smaller than a
//! threshold (256 bytes on a transport with vectored writes, 1,024 without); a larger one
//! is chained, and h2 flushes before it can buffer the trailers. An allow response (the
//! identity headers and the access-log metadata, 845 bytes for a token with a dozen
//! scopes) then costs two `writev` calls and two packets that Envoy must read, instead of
//! one: measured on loopback, about a third more CPU per Check in connector-authz and a
//! noticeable share of Envoy's (BENCHMARKS.md). Without vectored writes a response below
//! 1 KiB is copied once into h2's buffer and written with its headers and trailers.
//!
//! Nothing else changes: reads, flushes and shutdowns go straight to the socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// The accepted connections of a [`TcpIncoming`], each as an [`UnvectoredTcp`].
pub struct CoalescingIncoming(TcpIncoming);

impl CoalescingIncoming {
    pub fn new(incoming: TcpIncoming) -> Self {
        Self(incoming)
    }
}

impl Stream for CoalescingIncoming {
    type Item = io::Result<UnvectoredTcp>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.get_mut().0)
            .poll_next(cx)
            .map(|next| next.map(|accepted| accepted.map(Unvectored)))
    }
}

/// A stream that tells its writer it has no vectored writes: a plain TCP connection
/// ([`UnvectoredTcp`]) or a TLS one (`crate::tls::TlsConnection`), for which it also means
/// one TLS record for a small response rather than one per piece.
pub struct Unvectored<S>(pub(crate) S);

/// A TCP connection of the gRPC listener.
pub type UnvectoredTcp = Unvectored<TcpStream>;

impl<S: AsyncRead + Unpin> AsyncRead for Unvectored<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Unvectored<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl Connected for UnvectoredTcp {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn passes_bytes_both_ways_and_says_it_has_no_vectored_writes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let client = tokio::spawn(async move {
            let mut client = TcpStream::connect(addr).await.expect("connect");
            client.write_all(b"ping").await.expect("write");
            let mut reply = [0u8; 4];
            client.read_exact(&mut reply).await.expect("read");
            reply
        });
        let (socket, _) = listener.accept().await.expect("accept");
        let mut server = Unvectored(socket);
        assert!(!server.is_write_vectored());
        assert_eq!(
            server.connect_info().remote_addr.map(|a| a.ip()),
            Some(addr.ip())
        );
        let mut request = [0u8; 4];
        server.read_exact(&mut request).await.expect("read");
        assert_eq!(&request, b"ping");
        server.write_all(b"pong").await.expect("write");
        server.flush().await.expect("flush");
        assert_eq!(&client.await.expect("client"), b"pong");
    }
}
