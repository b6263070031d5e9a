//! Accepted connections must start their handshake in time.
//!
//! Neither tonic nor hyper bound how long a connection may sit before its
//! HTTP/2 connection preface arrives, so a client could hold any number of
//! connections (and file descriptors) open by sending nothing, or one byte.
//! Each accepted connection gets a deadline for its first
//! [`HANDSHAKE_BYTES`]: the HTTP/2 preface and the header of the SETTINGS
//! frame that must follow it. Past the deadline its reads fail and hyper
//! closes it. After that, HTTP/2 keepalive pings bound a peer that stops
//! answering, and `--max-connection-age` bounds every connection.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Sleep,
};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// The HTTP/2 client preface (24 bytes) and a frame header (9 bytes).
pub const HANDSHAKE_BYTES: usize = 24 + 9;

/// The connections of `incoming`, each closed unless its first
/// [`HANDSHAKE_BYTES`] arrive within `timeout`.
pub fn handshake_deadline(
    incoming: TcpIncoming,
    timeout: Duration,
) -> impl Stream<Item = io::Result<DeadlineStream>> {
    incoming.map(move |accepted| accepted.map(|stream| DeadlineStream::new(stream, timeout)))
}

/// A TCP connection whose reads fail once its deadline passes before it has
/// received [`HANDSHAKE_BYTES`].
#[derive(Debug)]
pub struct DeadlineStream {
    inner: TcpStream,
    received: usize,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl DeadlineStream {
    fn new(inner: TcpStream, timeout: Duration) -> Self {
        Self { inner, received: 0, deadline: Some(Box::pin(tokio::time::sleep(timeout))) }
    }
}

impl AsyncRead for DeadlineStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.received += buf.filled().len() - before;
                if this.received >= HANDSHAKE_BYTES {
                    this.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired =
                    this.deadline.as_mut().is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                tracing::debug!(peer = ?this.inner.peer_addr().ok(), "closing a connection that did not start its handshake in time");
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no handshake within the deadline")))
            }
            failed => failed,
        }
    }
}

impl AsyncWrite for DeadlineStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for DeadlineStream {
    type ConnectInfo = TcpConnectInfo;

    /// The TCP connection's own, so TLS peer certificates and remote
    /// addresses reach requests as they would without the deadline.
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
