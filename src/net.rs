//! What every listener admits: accepted connections must start their
//! handshake in time, and may not outnumber `--max-connections`.
//!
//! Neither tonic nor hyper bound how long a connection may sit before its
//! HTTP/2 connection preface arrives, so a client could hold any number of
//! connections (and file descriptors) open by sending nothing, or one byte.
//! Each accepted connection gets a deadline for its first
//! [`HANDSHAKE_BYTES`]: the HTTP/2 preface and the header of the SETTINGS
//! frame that must follow it. Past the deadline its reads fail and hyper
//! closes it. After that, HTTP/2 keepalive pings bound a peer that stops
//! answering, and `--max-connection-age` bounds every connection.
//!
//! Every accepted connection also holds one of `--max-connections` slots
//! until it closes; over the cap a new connection is closed at once and
//! counted. A failed accept (out of descriptors: EMFILE, ENFILE) backs off,
//! from 10 ms doubling to 1 s while failures last, instead of retrying at
//! once in a loop that spins a core; each one is logged and counted.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// The HTTP/2 client preface (24 bytes) and a frame header (9 bytes).
pub const HANDSHAKE_BYTES: usize = 24 + 9;

/// The longest wait after a failed accept.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// What every listener does with an accepted connection: a slot under
/// `--max-connections` (none left: closed at once and counted), and the
/// handshake deadline; a failed accept backs off, logged and counted.
#[derive(Debug, Clone)]
pub struct Admission {
    timeout: Duration,
    slots: Arc<Semaphore>,
    backoff_ms: Arc<AtomicU64>,
}

impl Admission {
    /// Connections get `timeout` to start their handshake and share `slots`.
    pub fn new(timeout: Duration, slots: Arc<Semaphore>) -> Self {
        Self { timeout, slots, backoff_ms: Arc::default() }
    }

    /// The connection to serve, if any, from one accept.
    async fn admit(&self, accepted: io::Result<TcpStream>) -> Option<DeadlineStream> {
        match accepted {
            Ok(stream) => {
                self.backoff_ms.store(0, Ordering::Relaxed);
                match self.slots.clone().try_acquire_owned() {
                    Ok(slot) => Some(DeadlineStream::new(stream, self.timeout, Some(slot))),
                    Err(_) => {
                        crate::metrics::record_connection_refused("max_connections");
                        tracing::debug!(peer = ?stream.peer_addr().ok(), "closing a connection over --max-connections");
                        None
                    }
                }
            }
            Err(error) => {
                let last = self.backoff_ms.load(Ordering::Relaxed);
                let cap = MAX_ACCEPT_BACKOFF.as_millis() as u64;
                let wait = (last * 2).clamp(10, cap);
                self.backoff_ms.store(wait, Ordering::Relaxed);
                crate::metrics::record_accept_error();
                tracing::warn!(%error, backoff_ms = wait, "accepting a connection failed; backing off");
                tokio::time::sleep(Duration::from_millis(wait)).await;
                None
            }
        }
    }
}

/// The connections of `incoming` that `admission` lets in.
pub fn guarded(
    incoming: TcpIncoming,
    admission: Admission,
) -> impl Stream<Item = io::Result<DeadlineStream>> {
    incoming
        .then(move |accepted| {
            let admission = admission.clone();
            async move { admission.admit(accepted).await.map(Ok) }
        })
        .filter_map(|admitted| admitted)
}

/// A listener for axum (the metrics endpoint) under the same admission.
#[derive(Debug)]
pub struct GuardedListener {
    inner: tokio::net::TcpListener,
    admission: Admission,
}

impl GuardedListener {
    /// `inner`, admitting connections by `admission`.
    pub fn new(inner: tokio::net::TcpListener, admission: Admission) -> Self {
        Self { inner, admission }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = DeadlineStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let accepted = self.inner.accept().await;
            let peer = accepted.as_ref().ok().map(|(_, peer)| *peer);
            if let (Some(stream), Some(peer)) = (self.admission.admit(accepted.map(|(s, _)| s)).await, peer) {
                return (stream, peer);
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// How many connections `--max-connections 0` allows: the soft open-file
/// limit (from `/proc/self/limits`) less `reserve` descriptors, at least 16;
/// 4,096 where the limit cannot be read.
pub fn default_max_connections(reserve: u64) -> usize {
    let limit = std::fs::read_to_string("/proc/self/limits").ok().and_then(|limits| {
        let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse::<u64>().ok()
    });
    match limit {
        Some(limit) => usize::try_from(limit.saturating_sub(reserve).max(16)).unwrap_or(usize::MAX),
        None => 4096,
    }
}

/// A TCP connection whose reads fail once its deadline passes before it has
/// received [`HANDSHAKE_BYTES`].
#[derive(Debug)]
pub struct DeadlineStream {
    inner: TcpStream,
    received: usize,
    deadline: Option<Pin<Box<Sleep>>>,
    /// Its place under `--max-connections`, given back when it closes.
    _slot: Option<OwnedSemaphorePermit>,
}

impl DeadlineStream {
    fn new(inner: TcpStream, timeout: Duration, slot: Option<OwnedSemaphorePermit>) -> Self {
        Self { inner, received: 0, deadline: Some(Box::pin(tokio::time::sleep(timeout))), _slot: slot }
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
