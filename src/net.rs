//! What every listener admits: accepted connections must start their
//! handshake in time, and may not outnumber `--max-connections`.
//!
//! Neither tonic nor hyper bound how long a connection may sit before its
//! HTTP/2 connection preface arrives, so a client could hold any number of
//! connections (and file descriptors) open by sending nothing, or one byte.
//! Each accepted connection gets a deadline for its first
//! [`HANDSHAKE_BYTES`] of HTTP: the HTTP/2 preface and the header of the
//! SETTINGS frame that must follow it. Under TLS the same deadline covers
//! the TLS handshake *and* those bytes after it (TLS is terminated here, see
//! [`crate::tls`]), so a connection silent after its TLS handshake is closed
//! too. Past the deadline its reads fail and hyper closes it. After that,
//! HTTP/2 keepalive pings bound a peer that stops answering, and
//! `--max-connection-age` bounds every connection.
//!
//! Every accepted connection also holds one of `--max-connections` slots
//! until it closes; over the cap a new connection is closed at once and
//! counted. A failed accept (out of descriptors: EMFILE, ENFILE) backs off,
//! from 10 ms doubling to 1 s while failures last, instead of retrying at
//! once in a loop that spins a core; each one is logged and counted.

use std::{
    io,
    net::SocketAddr,
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
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::{Instant, Sleep},
};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::transport::server::{Connected, TcpIncoming};

use crate::tls::Tls;

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

/// An accepted TCP connection, and what it holds.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub stream: TcpStream,
    pub ticket: Ticket,
}

/// What an admitted connection holds: its slot and its handshake deadline.
#[derive(Debug)]
pub(crate) struct Ticket {
    pub peer: Option<SocketAddr>,
    pub deadline: Instant,
    slot: OwnedSemaphorePermit,
}

impl Ticket {
    /// `inner` (the connection, or what TLS made of it) under this ticket's
    /// deadline and slot.
    pub(crate) fn wrap<S>(self, inner: S) -> DeadlineStream<S> {
        DeadlineStream::new(inner, self.deadline, self.slot)
    }
}

impl Admission {
    /// Connections get `timeout` to start their handshake and share `slots`.
    pub fn new(timeout: Duration, slots: Arc<Semaphore>) -> Self {
        Self { timeout, slots, backoff_ms: Arc::default() }
    }

    /// The connection to serve, if any, from one accept.
    async fn admit(&self, accepted: io::Result<TcpStream>) -> Option<Admitted> {
        match accepted {
            Ok(stream) => {
                self.backoff_ms.store(0, Ordering::Relaxed);
                let peer = stream.peer_addr().ok();
                match self.slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let ticket = Ticket { peer, deadline: Instant::now() + self.timeout, slot };
                        Some(Admitted { stream, ticket })
                    }
                    Err(_) => {
                        crate::metrics::record_connection_refused("max_connections");
                        tracing::debug!(?peer, "closing a connection over --max-connections");
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

/// Who is at the other end of a connection: in every request's extensions.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// The client certificate chain it presented in its TLS handshake.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// A connection a listener serves: plain, or with TLS terminated here.
#[derive(Debug)]
pub enum Conn {
    /// Plain text.
    Plain(DeadlineStream<TcpStream>, PeerInfo),
    /// After its TLS handshake.
    Tls(Box<DeadlineStream<tokio_rustls::server::TlsStream<TcpStream>>>, PeerInfo),
}

/// The connections of `incoming` that `admission` lets in, with TLS
/// terminated by `tls` if given. Handshakes run beside the accept loop, so a
/// slow one holds up no other connection.
pub fn connections(
    incoming: TcpIncoming,
    admission: Admission,
    tls: Option<Arc<Tls>>,
) -> impl Stream<Item = io::Result<Conn>> {
    let (tx, rx) = mpsc::channel::<io::Result<Conn>>(64);
    tokio::spawn(async move {
        let mut incoming = std::pin::pin!(incoming);
        loop {
            let accepted = tokio::select! {
                accepted = incoming.next() => accepted,
                // The server stopped: stop accepting, and free the port.
                () = tx.closed() => return,
            };
            let Some(accepted) = accepted else { return };
            let Some(admitted) = admission.admit(accepted).await else { continue };
            match &tls {
                None => {
                    let peer = PeerInfo { remote: admitted.ticket.peer, certs: None };
                    let conn = Conn::Plain(admitted.ticket.wrap(admitted.stream), peer);
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let (tx, tls) = (tx.clone(), tls.clone());
                    tokio::spawn(async move {
                        if let Some(conn) = tls.handshake(admitted).await {
                            let _ = tx.send(Ok(conn)).await;
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(rx)
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
    type Io = DeadlineStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let accepted = self.inner.accept().await.map(|(stream, _)| stream);
            if let Some(Admitted { stream, ticket }) = self.admission.admit(accepted).await
                && let Some(peer) = ticket.peer
            {
                return (ticket.wrap(stream), peer);
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

/// A connection whose reads fail once its deadline passes before it has
/// received [`HANDSHAKE_BYTES`], holding its slot until it is dropped.
#[derive(Debug)]
pub struct DeadlineStream<S> {
    inner: S,
    received: usize,
    deadline: Option<Pin<Box<Sleep>>>,
    /// Its place under `--max-connections`, given back when it closes.
    _slot: OwnedSemaphorePermit,
}

impl<S> DeadlineStream<S> {
    fn new(inner: S, deadline: Instant, slot: OwnedSemaphorePermit) -> Self {
        Self { inner, received: 0, deadline: Some(Box::pin(tokio::time::sleep_until(deadline))), _slot: slot }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for DeadlineStream<S> {
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
                tracing::debug!("closing a connection that did not start its handshake in time");
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no handshake within the deadline")))
            }
            failed => failed,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for DeadlineStream<S> {
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

/// Calls `$method` on whichever stream a [`Conn`] holds.
macro_rules! both {
    ($conn:expr, $s:ident => $call:expr) => {
        match $conn {
            Conn::Plain($s, _) => $call,
            Conn::Tls($s, _) => $call,
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        both!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        both!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        both!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        both!(self, s => s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    /// The peer's address and TLS client certificates, for every request.
    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Conn::Plain(_, peer) | Conn::Tls(_, peer) => peer.clone(),
        }
    }
}
