//! What every listener admits: accepted connections must send each
//! request's headers in time, and may not outnumber `--max-connections`.
//!
//! Neither tonic nor hyper bound how long a connection may take to send a
//! request's headers, so a client could hold any number of connections (and
//! file descriptors) open by sending nothing, one byte, or half a header
//! block. Every accepted connection gets `--handshake-timeout` from its
//! accept to complete its TLS handshake (if any) and its first request's
//! headers, and the same again for any later header block once its first
//! byte arrives; on the metrics listener (HTTP/1) also from each response
//! until the next request's head, so an idle keep-alive connection closes.
//! [`progress`] reads frame headers to tell where a header block ends. Past
//! a deadline the connection's reads fail and hyper closes it; one that never
//! sent a request is first told GOAWAY (last stream 0), so a client that
//! connected early and idles reconnects cleanly. Each close is counted in
//! `orders_connections_timed_out_total{stage}`. Between requests an HTTP/2
//! connection may idle: keepalive pings bound a peer that stops answering,
//! and `--max-connection-age` bounds every connection.
//!
//! Every accepted connection also holds a place in its listener's
//! [`budget`] until it closes; when the budget is spent, the connection idle
//! the longest gives way (GOAWAY, then closed), and only when none is idle is
//! the newcomer closed at once and counted. A failed accept (out of descriptors: EMFILE, ENFILE) backs off,
//! from 10 ms doubling to 250 ms while failures last, instead of retrying at
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
    sync::mpsc,
    time::{Instant, Sleep},
};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::transport::server::{Connected, TcpIncoming};

use self::tls::Tls;
use crate::api::PeerInfo;

pub(super) mod budget;
mod progress;
pub(super) mod tls;

pub use budget::{Budget, CallsLayer, ConnInfo};

pub use progress::Protocol;
use progress::{Due, Frames, Progress};

/// The longest wait after a failed accept.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_millis(250);

/// What every listener does with an accepted connection: a place in its
/// budget (see [`budget`]), and the handshake deadline; a failed accept
/// backs off, logged and counted.
#[derive(Debug, Clone)]
pub struct Admission {
    timeout: Duration,
    protocol: Protocol,
    slots: Arc<Budget>,
    backoff_ms: Arc<AtomicU64>,
}

/// An accepted TCP connection, and what it holds.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub stream: TcpStream,
    pub ticket: Ticket,
}

/// What an admitted connection holds: its slot and its first deadline.
#[derive(Debug)]
pub(crate) struct Ticket {
    pub peer: Option<SocketAddr>,
    /// When its first request's headers (and TLS handshake) must be in.
    pub deadline: Instant,
    timeout: Duration,
    protocol: Protocol,
    slot: budget::Slot,
}

impl Ticket {
    /// `inner` (the connection, or what TLS made of it) under this ticket's
    /// deadlines and slot.
    pub(crate) fn wrap<S>(self, inner: S) -> DeadlineStream<S> {
        DeadlineStream::new(inner, self)
    }
}

impl Admission {
    /// Connections speaking `protocol` get `timeout` for each request's
    /// headers (the first counted from the accept) and share `slots`.
    pub fn new(timeout: Duration, protocol: Protocol, slots: Arc<Budget>) -> Self {
        Self { timeout, protocol, slots, backoff_ms: Arc::default() }
    }

    /// The connection to serve, if any, from one accept.
    async fn admit(&self, accepted: io::Result<TcpStream>) -> Option<Admitted> {
        match accepted {
            Ok(stream) => {
                self.backoff_ms.store(0, Ordering::Relaxed);
                let peer = stream.peer_addr().ok();
                match self.slots.admit(peer.map(|peer| peer.ip())) {
                    Some(slot) => {
                        let ticket = Ticket {
                            peer,
                            deadline: Instant::now() + self.timeout,
                            timeout: self.timeout,
                            protocol: self.protocol,
                            slot,
                        };
                        Some(Admitted { stream, ticket })
                    }
                    None => {
                        crate::telemetry::metrics::record_connection_refused("max_connections");
                        tracing::debug!(?peer, "closing a connection: every place is taken by a call");
                        None
                    }
                }
            }
            Err(error) => {
                let last = self.backoff_ms.load(Ordering::Relaxed);
                let cap = MAX_ACCEPT_BACKOFF.as_millis() as u64;
                let wait = (last * 2).clamp(10, cap);
                self.backoff_ms.store(wait, Ordering::Relaxed);
                crate::telemetry::metrics::record_accept_error();
                tracing::warn!(%error, backoff_ms = wait, "accepting a connection failed; backing off");
                tokio::time::sleep(Duration::from_millis(wait)).await;
                None
            }
        }
    }
}

/// A connection a listener serves: plain, or with TLS terminated here.
#[derive(Debug)]
pub enum Conn {
    /// Plain text.
    Plain(Box<DeadlineStream<TcpStream>>, ConnInfo),
    /// After its TLS handshake.
    Tls(Box<DeadlineStream<tokio_rustls::server::TlsStream<TcpStream>>>, ConnInfo),
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
                    let info = ConnInfo { peer, activity: admitted.ticket.slot.activity.clone() };
                    let conn = Conn::Plain(Box::new(admitted.ticket.wrap(admitted.stream)), info);
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

/// The metrics endpoint's connections, as [`CallsLayer`] counts their
/// requests: a scrape under way is a call open, so a newcomer's eviction
/// takes an idle or half-sent connection before it.
impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, GuardedListener>> for ConnInfo {
    fn connect_info(stream: axum::serve::IncomingStream<'_, GuardedListener>) -> Self {
        let peer = PeerInfo { remote: Some(*stream.remote_addr()), certs: None };
        ConnInfo { peer, activity: stream.io().slot.activity.clone() }
    }
}

/// The most connections `--max-connections 0` allows whatever the
/// open-file limit: each costs about 27 KiB of memory once it has made a
/// call, so 4,096 hold about 110 MiB, under half the manifests' 512 MiB
/// limit (the open-file limit alone allowed 19,926 here, 530 MiB).
pub const MAX_CONNECTIONS_CEILING: usize = 4096;

/// How many connections `--max-connections 0` allows: the soft open-file
/// limit (from `/proc/self/limits`) less `reserve` descriptors, at least 16,
/// at most [`MAX_CONNECTIONS_CEILING`] (also where the limit cannot be read).
pub fn default_max_connections(reserve: u64) -> usize {
    let limit = std::fs::read_to_string("/proc/self/limits").ok().and_then(|limits| {
        let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse::<u64>().ok()
    });
    match limit {
        Some(limit) => usize::try_from(limit.saturating_sub(reserve).max(16))
            .unwrap_or(usize::MAX)
            .min(MAX_CONNECTIONS_CEILING),
        None => MAX_CONNECTIONS_CEILING,
    }
}

/// A GOAWAY frame: last stream 0, `NO_ERROR`. A client that receives it
/// knows no request of its was processed, and reconnects.
const GOAWAY: [u8; 17] = [0, 0, 8, 0x7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// A connection whose reads fail when a deadline of `--handshake-timeout`
/// passes while the server waits on the client for a request's headers
/// (see [`progress`] for when one runs), holding its slot until dropped.
#[derive(Debug)]
pub struct DeadlineStream<S> {
    inner: S,
    progress: Progress,
    /// The server's own HTTP/2 frames, followed so that a GOAWAY can be put
    /// between two of them.
    written: Option<Frames>,
    /// Resolves when the connection's budget tells it to close.
    closing: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    armed: bool,
    /// When a write that made no progress gives up: a peer that stops
    /// reading stops the server reading too (its writes back up), so the
    /// read side's deadline would never be looked at.
    stall: Pin<Box<Sleep>>,
    stalled: bool,
    peer: Option<SocketAddr>,
    /// Streams the client had reset as of the last read.
    resets: u64,
    /// Its place in its listener's budget, given back when it closes.
    slot: budget::Slot,
}

impl<S> DeadlineStream<S> {
    fn new(inner: S, ticket: Ticket) -> Self {
        let written = (ticket.protocol == Protocol::Http2).then(Frames::server);
        Self {
            inner,
            progress: Progress::new(ticket.protocol),
            written,
            closing: Box::pin(ticket.slot.activity.closing()),
            timeout: ticket.timeout,
            deadline: Box::pin(tokio::time::sleep_until(ticket.deadline)),
            armed: true,
            stall: Box::pin(tokio::time::sleep_until(ticket.deadline)),
            stalled: false,
            peer: ticket.peer,
            resets: 0,
            slot: ticket.slot,
        }
    }

    /// Starts or stops the deadline as `due` says.
    fn apply(&mut self, due: Due) {
        match due {
            Due::Keep => {}
            Due::Start if !self.armed => {
                self.deadline.as_mut().reset(Instant::now() + self.timeout);
                self.armed = true;
            }
            Due::Start => {}
            Due::Stop => self.armed = false,
            // Answered by the read that saw it.
            Due::Refuse => {}
        }
    }

    /// The read deadline passed (while it runs): closes the connection,
    /// counted by stage.
    fn timed_out(&mut self, stage: &'static str) -> io::Error {
        crate::telemetry::metrics::record_connection_timed_out(stage);
        tracing::debug!(peer = ?self.peer, stage, "closing a connection that did not keep up in time");
        io::Error::new(io::ErrorKind::TimedOut, "closed by the connection's deadline")
    }

    /// The server wrote `bytes`, in a poll with `cx`. A deadline this starts
    /// is registered with `cx` at once: the task may not read again (and
    /// look at the deadline there) before something wakes it.
    fn wrote<'a>(&mut self, cx: &mut Context<'_>, bytes: impl Iterator<Item = &'a [u8]>) {
        let mut any = false;
        for piece in bytes {
            any |= !piece.is_empty();
            if let Some(written) = &mut self.written {
                written.read(piece);
            }
        }
        if any {
            let due = self.progress.wrote();
            self.apply(due);
            if self.armed && self.deadline.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> DeadlineStream<S> {
    /// Tells a client to go away (GOAWAY, last stream 0), if the server's
    /// stream is between two frames: a client that never made a request, or
    /// has none open (see [`budget`]), reconnects cleanly, and one whose new
    /// call crossed the GOAWAY knows it was not processed (the order calls
    /// are safe to retry whatever was written). Best effort: the connection
    /// is closed next either way.
    fn say_goaway(&mut self, cx: &mut Context<'_>) {
        if !self.written.as_ref().is_some_and(Frames::at_boundary) {
            return;
        }
        let mut sent = 0;
        while sent < GOAWAY.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &GOAWAY[sent..]) {
                Poll::Ready(Ok(n)) if n > 0 => sent += n,
                _ => return,
            }
        }
        let _ = Pin::new(&mut self.inner).poll_flush(cx);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for DeadlineStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closing.as_mut().poll(cx).is_ready() {
            this.say_goaway(cx);
            tracing::debug!(peer = ?this.peer, "closing a connection its listener's budget let go");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed by its budget",
            )));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if !read.is_empty() {
                    let due = this.progress.read(read);
                    if due == Due::Refuse {
                        crate::telemetry::metrics::record_connection_refused("protocol");
                        tracing::debug!(peer = ?this.peer, "closing an HTTP/2 connection to an HTTP/1 listener");
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "this listener serves HTTP/1 only",
                        )));
                    }
                    this.apply(due);
                    let resets = this.progress.resets();
                    if resets > this.resets {
                        if !this.slot.streams_reset(resets - this.resets) {
                            tracing::debug!(peer = ?this.peer, "closing a connection that reset too many streams");
                        }
                        this.resets = resets;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if !this.armed || this.deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let stage = if this.progress.before_first_request() {
                    this.say_goaway(cx);
                    "first_request"
                } else {
                    "next_request"
                };
                Poll::Ready(Err(this.timed_out(stage)))
            }
            failed => failed,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for DeadlineStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let Poll::Ready(written) = Pin::new(&mut self.inner).poll_write(cx, buf) else {
            return self.write_pending(cx);
        };
        let written = written?;
        self.stalled = false;
        self.wrote(cx, std::iter::once(&buf[..written]));
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Poll::Ready(written) = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) else {
            return self.write_pending(cx);
        };
        let written = written?;
        self.stalled = false;
        let mut left = written;
        self.wrote(
            cx,
            bufs.iter().map(|buf| {
                let n = left.min(buf.len());
                left -= n;
                &buf[..n]
            }),
        );
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Poll::Ready(flushed) = Pin::new(&mut self.inner).poll_flush(cx) else {
            return self.write_pending(cx);
        };
        self.stalled = false;
        Poll::Ready(flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncWrite + Unpin> DeadlineStream<S> {
    /// A write (or flush) that cannot go on: the peer is not reading. It
    /// fails once the read deadline has passed (a peer that never sent its
    /// request's headers and stopped the server's reads by not reading), or
    /// once it has made no progress for `--handshake-timeout`.
    fn write_pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if self.armed && self.deadline.as_mut().poll(cx).is_ready() {
            let stage = if self.progress.before_first_request() { "first_request" } else { "next_request" };
            return Poll::Ready(Err(self.timed_out(stage)));
        }
        if !self.stalled {
            self.stall.as_mut().reset(Instant::now() + self.timeout);
            self.stalled = true;
        }
        if self.stall.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(self.timed_out("stalled_write")));
        }
        Poll::Pending
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
    type ConnectInfo = ConnInfo;

    /// The peer's address and TLS client certificates, for every request.
    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Conn::Plain(_, peer) | Conn::Tls(_, peer) => peer.clone(),
        }
    }
}
