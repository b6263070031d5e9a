//! One listener's connection budget, and what gives way when it is spent.
//!
//! Every listener (gRPC, `--health-listen`, metrics) has a budget of its own,
//! so a flood of one port cannot take another's connections: a kubelet's
//! probe on the health port never waits on what the gRPC port holds. Every
//! admitted connection is registered here with its [`Activity`]: how many
//! calls it has open, and since when it has had none.
//!
//! When a listener's budget is spent, the newcomer is not refused: a
//! connection without a call open gives way (an idle connection, one still
//! sending its first request's headers, or a half-sent call's), of the
//! address holding the most connections, the oldest of those; it is told
//! GOAWAY and closed; only when every connection
//! has a call open is the newcomer closed. A connection with no call open for
//! `--max-connection-idle` is closed the same way (gRPC's
//! `max_connection_idle`). Both are counted in
//! `orders_connections_evicted_total{reason}`.
//!
//! A client may also reset streams (RST_STREAM) only at a bounded rate,
//! the "rapid reset" defence: a stream opened and reset at once costs the
//! server a spawned call, and h2's own bound (`max_pending_accept_reset_streams`)
//! counts only resets the server has not yet picked up, which a fast server
//! never reaches. Each connection may reset [`CONNECTION_RESETS_BURST`]
//! streams at once and [`CONNECTION_RESETS_PER_SECOND`] after that; beyond
//! its own allowance it draws on its address's [`ADDRESS_RESETS_PER_SECOND`]
//! (as many at once), shared by the connections from that address, which
//! covers a client cancelling every call it has open; a flood from other
//! addresses never spends it. A connection that finds both spent is told to
//! go away and closed (`reason="resets"`): a flood of resets costs its
//! sender a new connection every few dozen streams, and the connections
//! from one address together reset no more than 1,000 a second plus a few
//! a second each.
//!
//! hyper and tonic bound connections only as a whole (no per-connection idle
//! timer, no eviction), and tower's limits count requests, not connections:
//! hence this registry. Calls are counted by [`CallsLayer`], which also
//! hands the connection's [`PeerInfo`] to the layers below it.

use std::{
    collections::HashMap,
    future::Future,
    net::IpAddr,
    num::NonZeroU32,
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{body::Body, codegen::http};

use crate::api::PeerInfo;

/// Streams one connection may reset a second once its burst is spent.
pub const CONNECTION_RESETS_PER_SECOND: u32 = 10;
/// Streams the connections from one address may reset a second beyond
/// their own allowances (and at once, as a burst), on one listener.
pub const ADDRESS_RESETS_PER_SECOND: u32 = 1_000;
/// Streams one connection may reset at once, before it draws on its
/// listener's allowance: small, since a connection opened again and again
/// gets it anew each time.
pub const CONNECTION_RESETS_BURST: u32 = 32;

type Limiter = governor::DefaultDirectRateLimiter;
type ByAddress = governor::DefaultKeyedRateLimiter<Option<IpAddr>>;

/// A client certificate chain.
pub type Certs = Arc<Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>>;

/// What one connection is doing, as its listener's budget sees it.
#[derive(Debug)]
pub struct Activity {
    id: u64,
    /// The address it came from.
    peer: Option<IpAddr>,
    /// When it was accepted.
    pub accepted: Instant,
    open_calls: AtomicUsize,
    /// Of those, the order calls (authenticated, bounded by
    /// `--request-timeout`).
    open_order_calls: AtomicUsize,
    /// When it last had no call open, in milliseconds after `accepted`.
    idle_since_ms: AtomicU64,
    /// When its open calls began to be open without a pause, in
    /// milliseconds after `accepted`.
    busy_since_ms: AtomicU64,
    /// Health Watch streams it has open (see `server::health`).
    pub watches: AtomicUsize,
    /// The client certificate chain of its TLS handshake, if any: checked
    /// again when the client CA is reloaded.
    pub certs: OnceLock<Certs>,
    /// Its own allowance of stream resets.
    resets: Limiter,
    /// Cancelled when the connection must close (evicted, idle too long,
    /// too many resets, or its client certificate no longer trusted).
    close: CancellationToken,
    told: AtomicBool,
}

impl Activity {
    fn new(id: u64, peer: Option<IpAddr>, resets: governor::Quota) -> Self {
        Self {
            resets: Limiter::direct(resets),
            id,
            peer,
            accepted: Instant::now(),
            open_calls: AtomicUsize::new(0),
            open_order_calls: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            busy_since_ms: AtomicU64::new(0),
            watches: AtomicUsize::new(0),
            certs: OnceLock::new(),
            close: CancellationToken::new(),
            told: AtomicBool::new(false),
        }
    }

    fn idle_since(&self) -> Option<Instant> {
        (self.open_calls.load(Ordering::Acquire) == 0)
            .then(|| self.accepted + Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed)))
    }

    /// When it has had calls open without a pause, if only calls to the
    /// open services (health, reflection) or half-sent order calls: those
    /// need no credentials (a half-sent call's message, whoever sent its
    /// headers, may never end), and one whose answer the caller never lets
    /// through (a zero flow-control window) would otherwise hold the
    /// connection's place for ever.
    fn busy_without_order_calls_since(&self) -> Option<Instant> {
        (self.open_calls.load(Ordering::Acquire) > 0 && self.open_order_calls.load(Ordering::Acquire) == 0)
            .then(|| self.accepted + Duration::from_millis(self.busy_since_ms.load(Ordering::Relaxed)))
    }

    fn millis_since_accepted(&self) -> u64 {
        Instant::now().saturating_duration_since(self.accepted).as_millis() as u64
    }

    /// A call opened (not yet an order call: see [`Self::order_call_sent`]).
    fn call_started(&self) {
        if self.open_calls.fetch_add(1, Ordering::AcqRel) == 0 {
            self.busy_since_ms.store(self.millis_since_accepted(), Ordering::Relaxed);
        }
    }

    /// An open call's request has been read whole, and it is an order call.
    fn order_call_sent(&self) {
        self.open_order_calls.fetch_add(1, Ordering::AcqRel);
    }

    fn call_ended(&self, order_call: bool) {
        self.idle_since_ms.store(self.millis_since_accepted(), Ordering::Relaxed);
        self.open_calls.fetch_sub(1, Ordering::AcqRel);
        if order_call {
            self.open_order_calls.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Tells the connection to close (GOAWAY, then closed), counted by
    /// `reason`. The first reason given is the one counted.
    pub fn evict(&self, reason: &'static str) {
        if !self.told.swap(true, Ordering::AcqRel) {
            crate::telemetry::metrics::record_connection_evicted(reason);
            self.close.cancel();
        }
    }

    /// Resolves when the connection must close.
    pub(super) fn closing(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.close.clone().cancelled_owned()
    }
}

/// The connections one listener holds, at most `most`.
#[derive(Debug)]
pub struct Budget {
    most: usize,
    /// Each connection's allowance of stream resets.
    connection_resets: governor::Quota,
    /// What the connections from each address may reset beyond their own
    /// allowances.
    resets: ByAddress,
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Activity>>>,
}

/// A connection's place in its listener's budget, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    budget: Arc<Budget>,
    pub activity: Arc<Activity>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut live = self.budget.live.lock().unwrap_or_else(|e| e.into_inner());
        live.remove(&self.activity.id);
    }
}

impl Slot {
    /// The client reset `streams` more: whether its own allowance, or else
    /// its address's, still covers each. When neither does, the connection
    /// is told to close (counted as `reason="resets"`).
    pub fn streams_reset(&self, streams: u64) -> bool {
        let (own, shared) = (&self.activity.resets, &self.budget.resets);
        let covered =
            (0..streams).all(|_| own.check().is_ok() || shared.check_key(&self.activity.peer).is_ok());
        if !covered {
            self.activity.evict("resets");
        }
        covered
    }
}

impl Budget {
    /// A budget of `most` connections (at least one).
    pub fn new(most: usize) -> Arc<Self> {
        let per_second = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        let connection_resets = governor::Quota::per_second(per_second(CONNECTION_RESETS_PER_SECOND))
            .allow_burst(per_second(CONNECTION_RESETS_BURST));
        let resets = ByAddress::keyed(governor::Quota::per_second(per_second(ADDRESS_RESETS_PER_SECOND)));
        Arc::new(Self {
            most: most.max(1),
            connection_resets,
            resets,
            next_id: AtomicU64::new(0),
            live: Mutex::default(),
        })
    }

    /// A place for a new connection from `peer`. When all are taken, one
    /// gives way: a connection with no call open (idle, or still sending its
    /// first request); else one busy with calls to the open services only
    /// (a Watch, a call whose answer its caller never lets through); else
    /// none, and there is no place (order calls are authenticated, and end
    /// within `--request-timeout`). Within each kind, a connection of the
    /// address holding the most connections (the newcomer counted) gives
    /// way first, so one host's flood takes its own connections before
    /// anyone else's; then the oldest: by when it was accepted, not by when
    /// its last call ended, so connections that make a call now and then
    /// cannot look fresher than a newcomer still sending its first request
    /// (a probe's connection, milliseconds old, is reached only after every
    /// older one).
    pub fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Option<Slot> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        // Connections told to close still hold their descriptor for a moment,
        // but no longer their place.
        live.retain(|_, activity| !activity.close.is_cancelled());
        if live.len() >= self.most {
            let mut held: HashMap<Option<IpAddr>, usize> = HashMap::from([(peer, 1)]);
            for activity in live.values() {
                *held.entry(activity.peer).or_default() += 1;
            }
            let most_held_first = |activity: &Arc<Activity>, since: Instant| {
                (std::cmp::Reverse(held[&activity.peer]), since, activity.id)
            };
            let idle = live
                .values()
                .filter(|activity| activity.idle_since().is_some())
                .min_by_key(|activity| most_held_first(activity, activity.accepted));
            let busy = || {
                live.values()
                    .filter_map(|activity| Some((activity.busy_without_order_calls_since()?, activity)))
                    .min_by_key(|(since, activity)| most_held_first(activity, *since))
                    .map(|(_, activity)| activity)
            };
            let gives_way = idle.or_else(busy)?.clone();
            gives_way.evict("budget");
            live.remove(&gives_way.id);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new(id, peer, self.connection_resets));
        live.insert(id, activity.clone());
        Some(Slot { budget: self.clone(), activity })
    }

    /// Tells every connection with no call open for `idle` to close (and
    /// forgets the addresses whose reset allowance is whole again).
    pub fn close_idle(&self, idle: Duration) {
        self.resets.retain_recent();
        let now = Instant::now();
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        for activity in live.values() {
            if activity.idle_since().is_some_and(|since| now.saturating_duration_since(since) >= idle) {
                activity.evict("idle");
            }
        }
    }

    /// Every connection open now.
    pub fn connections(&self) -> Vec<Arc<Activity>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }
}

/// Closes `budget`'s connections idle for `idle`, checking every tenth of
/// it (at most every second), until `stop` changes.
pub async fn close_idle(budget: Arc<Budget>, idle: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticks =
        tokio::time::interval((idle / 10).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => budget.close_idle(idle),
            _ = stop.changed() => return,
        }
    }
}

/// What tonic puts in every request's extensions about its connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Who is at the other end.
    pub peer: PeerInfo,
    /// What the connection is doing.
    pub activity: Arc<Activity>,
}

/// Wraps a service in [`Calls`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CallsLayer;

impl<S> tower::Layer<S> for CallsLayer {
    type Service = Calls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Calls(inner)
    }
}

/// Counts each call as open on its connection from its headers until its
/// answer ends (or is dropped), and puts the connection's [`PeerInfo`] in
/// the request's extensions.
#[derive(Debug, Clone)]
pub struct Calls<S>(S);

/// A call open on a connection; closed when dropped. It counts as an
/// order call once its request has been read whole (`order`): until then
/// it is a half-sent call, which gives way to a newcomer like an idle one's
/// connection would, whoever sent its headers.
#[derive(Debug)]
struct OpenCall {
    activity: Arc<Activity>,
    /// [`HALF_SENT`], [`ORDER`] or [`ENDED`].
    order: Arc<AtomicU8>,
}

/// An open call whose request has not been read whole (or is no order
/// call), one counted as an order call, and one that has ended.
const HALF_SENT: u8 = 0;
const ORDER: u8 = 1;
const ENDED: u8 = 2;

impl Drop for OpenCall {
    fn drop(&mut self) {
        let was = self.order.swap(ENDED, Ordering::AcqRel);
        self.activity.call_ended(was == ORDER);
    }
}

/// A body type a request's body can be put back into, wrapped.
pub trait Rewrap {
    /// `body` as this type.
    fn rewrap<B>(body: B) -> Self
    where
        B: http_body::Body<Data = tonic::codegen::Bytes> + Send + 'static,
        B::Error: Into<tonic::codegen::StdError>;
}

impl Rewrap for Body {
    fn rewrap<B>(body: B) -> Self
    where
        B: http_body::Body<Data = tonic::codegen::Bytes> + Send + 'static,
        B::Error: Into<tonic::codegen::StdError>,
    {
        Body::new(body)
    }
}

impl Rewrap for axum::body::Body {
    fn rewrap<B>(body: B) -> Self
    where
        B: http_body::Body<Data = tonic::codegen::Bytes> + Send + 'static,
        B::Error: Into<tonic::codegen::StdError>,
    {
        axum::body::Body::new(body)
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for Calls<S>
where
    B: Rewrap + http_body::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: http_body::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    R::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let order_call = request.uri().path().starts_with(crate::api::ORDER_SERVICE_PATH);
        // tonic puts the connection's ConnInfo in the extensions, axum its
        // ConnectInfo (the metrics endpoint).
        let info = request.extensions().get::<ConnInfo>().cloned().or_else(|| {
            let axum::extract::ConnectInfo(info) = request.extensions().get()?;
            Some(ConnInfo::clone(info))
        });
        let open = info.map(|info| {
            info.activity.call_started();
            request.extensions_mut().insert(info.peer);
            OpenCall { activity: info.activity, order: Arc::default() }
        });
        let request = match &open {
            Some(open) if order_call => {
                let (activity, order) = (open.activity.clone(), open.order.clone());
                request.map(|body| B::rewrap(Sent { body, activity, order }))
            }
            _ => request,
        };
        let response = self.0.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match open {
                Some(open) => response.map(|body| Body::new(Counted { body, _open: open })),
                None => response.map(Body::new),
            })
        })
    }
}

pin_project_lite::pin_project! {
    /// An order call's request body, which marks its call an order call
    /// once it has ended.
    struct Sent<B> {
        #[pin]
        body: B,
        activity: Arc<Activity>,
        order: Arc<AtomicU8>,
    }
}

impl<B: http_body::Body> http_body::Body for Sent<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.body.poll_frame(cx);
        let ended = match &frame {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
            _ => false,
        };
        // Counted once, and only while the call is open.
        if ended && this.order.compare_exchange(HALF_SENT, ORDER, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            this.activity.order_call_sent();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// An answer's body, holding its call open until it ends (boxed once,
    /// into tonic's body, with the body it wraps).
    struct Counted<B> {
        #[pin]
        body: B,
        _open: OpenCall,
    }
}

impl<B: http_body::Body> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_resetting_past_both_allowances_is_closed_and_only_it() {
        let budget = Budget::new(4);
        let (flood, quiet) = (budget.admit(None).unwrap(), budget.admit(None).unwrap());
        // Its own burst, then its address's 1,000 (and the little either
        // earns back while this runs).
        let covered = (0..3_000).take_while(|_| flood.streams_reset(1)).count() as u32;
        let least = CONNECTION_RESETS_BURST + ADDRESS_RESETS_PER_SECOND;
        assert!((least..3_000).contains(&covered), "{covered} resets covered");
        assert!(flood.activity.close.is_cancelled(), "told to close");
        // Another connection still has its own allowance.
        assert!(quiet.streams_reset(u64::from(CONNECTION_RESETS_BURST)));
        assert!(!quiet.activity.close.is_cancelled());
        // One from another address has its own and its address's.
        let elsewhere = budget.admit(Some([127, 0, 0, 9].into())).unwrap();
        assert!(elsewhere.streams_reset(u64::from(CONNECTION_RESETS_BURST + 500)));
        assert!(!elsewhere.activity.close.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn the_longest_idle_connection_gives_way_and_a_busy_one_never_does() {
        let budget = Budget::new(2);
        let first = budget.admit(None).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let second = budget.admit(None).unwrap();
        // Full: the first (the oldest idle) gives way.
        let third = budget.admit(None).unwrap();
        assert!(first.activity.close.is_cancelled());
        assert!(!second.activity.close.is_cancelled());
        // Both left busy with order calls: no place for a newcomer.
        second.activity.call_started();
        second.activity.order_call_sent();
        third.activity.call_started();
        third.activity.order_call_sent();
        assert!(budget.admit(None).is_none());
        // A call ends: that connection is idle, and gives way.
        third.activity.call_ended(true);
        assert!(budget.admit(None).is_some());
        assert!(third.activity.close.is_cancelled());
        assert!(!second.activity.close.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn the_address_holding_the_most_connections_gives_way_first() {
        let (one, flood): (IpAddr, IpAddr) = ([127, 0, 0, 1].into(), [127, 0, 0, 2].into());
        let budget = Budget::new(4);
        let scraper = budget.admit(Some(one)).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let flooded: Vec<Slot> = (0..3).map(|_| budget.admit(Some(flood)).unwrap()).collect();
        // Newcomers from either address: the flood's oldest gives way, never
        // the lone older connection of the other address.
        let _more = budget.admit(Some(flood)).unwrap();
        assert!(flooded[0].activity.close.is_cancelled());
        let _other = budget.admit(Some(one)).unwrap();
        assert!(flooded[1].activity.close.is_cancelled());
        assert!(!scraper.activity.close.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_just_made_a_call_is_no_fresher_than_a_newcomer() {
        let budget = Budget::new(2);
        let old = budget.admit(None).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let newcomer = budget.admit(None).unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        // The old connection makes a call, which ends after the newcomer
        // came (still sending its first request): the old one gives way.
        old.activity.call_started();
        old.activity.call_ended(false);
        let _next = budget.admit(None).unwrap();
        assert!(old.activity.close.is_cancelled());
        assert!(!newcomer.activity.close.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_held_busy_by_open_service_calls_only_gives_way() {
        let budget = Budget::new(2);
        let health = budget.admit(None).unwrap();
        let orders = budget.admit(None).unwrap();
        health.activity.call_started();
        orders.activity.call_started();
        orders.activity.order_call_sent();
        // A health call gives way; an order call never does.
        let newcomer = budget.admit(None).expect("the health call gave way");
        assert!(health.activity.close.is_cancelled());
        assert!(!orders.activity.close.is_cancelled());
        newcomer.activity.call_started();
        newcomer.activity.order_call_sent();
        assert!(budget.admit(None).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn only_connections_idle_long_enough_are_closed() {
        let budget = Budget::new(8);
        let idle = budget.admit(None).unwrap();
        let busy = budget.admit(None).unwrap();
        busy.activity.call_started();
        busy.activity.order_call_sent();
        tokio::time::advance(Duration::from_secs(5)).await;
        let fresh = budget.admit(None).unwrap();
        budget.close_idle(Duration::from_secs(5));
        assert!(idle.activity.close.is_cancelled());
        assert!(!busy.activity.close.is_cancelled());
        assert!(!fresh.activity.close.is_cancelled());
        drop(idle);
        assert_eq!(budget.connections().len(), 2);
    }
}
