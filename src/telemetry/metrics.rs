//! Prometheus metrics: what each idempotency outcome, RPC, purge and health
//! change counts, and the `GET /metrics` endpoint that serves them.
//!
//! Names follow grpc-ecosystem's middleware (`grpc_server_handled_total`,
//! `grpc_server_handling_seconds`), so existing dashboards work.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll},
    time::Instant,
};

use anyhow::Context as _;
use http_body::{Body, Frame, SizeHint};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tonic::{Code, codegen::http};
use tracing::Instrument as _;

use super::traces;

/// PlaceOrder outcomes: created, replayed, key_reused, key_in_use,
/// expired_reuse, invalid, unavailable, deadline_exceeded (nothing written),
/// outcome_unknown (the write was sent; the caller should retry to learn), …
pub const PLACE_OUTCOMES: &str = "orders_place_outcomes_total";
/// RPCs started (every service) by type, service and method.
pub const STARTED: &str = "grpc_server_started_total";
/// Finished RPCs (every service) by type, service, method and status code.
pub const HANDLED: &str = "grpc_server_handled_total";
/// Request messages received, by type, service and method.
pub const MSG_RECEIVED: &str = "grpc_server_msg_received_total";
/// Response messages sent, by type, service and method.
pub const MSG_SENT: &str = "grpc_server_msg_sent_total";
/// PlaceOrders written together by one group commit (either engine).
pub const BATCH_SIZE: &str = "orders_batch_size";
/// Group-commit batches that failed whole, by `outcome`: `not_written`
/// (every caller told so), `outcome_unknown` (the commit's answer was lost),
/// `placed_alone` (the database refused the batch; each order placed on
/// its own).
pub const BATCH_FAILURES: &str = "orders_batch_failures_total";
/// 1, labelled with the version that runs.
pub const BUILD_INFO: &str = "orders_build_info";
/// RPC latency by service and method.
pub const HANDLING_SECONDS: &str = "grpc_server_handling_seconds";
/// Expired idempotency keys deleted.
pub const KEYS_PURGED: &str = "orders_idempotency_keys_purged_total";
/// When the purge last ran to the end (no expired key left), in Unix
/// seconds; the start of the process until it has.
pub const PURGE_LAST_SUCCESS: &str = "orders_purge_last_success_timestamp_seconds";
/// Pooled database connections, by pool.
pub const POOL_CONNECTIONS: &str = "orders_db_pool_connections";
/// Idle pooled database connections, by pool.
pub const POOL_IDLE: &str = "orders_db_pool_idle_connections";
/// 1 while the database answers and the server is not draining, else 0.
pub const SERVING: &str = "orders_health_serving";
/// Connections closed as soon as they were accepted, by reason
/// (`max_connections`).
pub const CONNECTIONS_REFUSED: &str = "orders_connections_refused_total";
/// Connections a listener's budget told to close (GOAWAY), by `reason`:
/// `budget` (an idle one, when a newcomer needed its place), `idle`
/// (`--max-connection-idle`), `client_ca` (its certificate no longer
/// trusted after a reload), `resets` (more stream resets than its
/// allowance and its listener's cover).
pub const CONNECTIONS_EVICTED: &str = "orders_connections_evicted_total";
/// Health Watch streams refused over their listener's or connection's budget.
pub const WATCHES_REFUSED: &str = "orders_health_watches_refused_total";
/// PlaceOrders told at once that their key is in use, because the pool's
/// share for waiting on keys held elsewhere was taken (Postgres).
pub const KEY_WAITS_REFUSED: &str = "orders_key_waits_refused_total";
/// Log lines dropped because stdout did not keep up.
pub const LOG_LINES_DROPPED: &str = "orders_log_lines_dropped_total";
/// Connections closed for not sending a request's headers within
/// `--handshake-timeout`, by `stage` (`first_request`, `next_request`).
pub const CONNECTIONS_TIMED_OUT: &str = "orders_connections_timed_out_total";
/// Accepts that failed (out of descriptors, EMFILE/ENFILE, …).
pub const ACCEPT_ERRORS: &str = "orders_accept_errors_total";
/// TLS handshakes refused (unknown CA, bad certificate, timeout, plain text).
pub const TLS_HANDSHAKE_FAILURES: &str = "orders_tls_handshake_failures_total";
/// Reloads of the TLS certificate, key or client CA that failed.
pub const TLS_RELOAD_FAILURES: &str = "orders_tls_reload_failures_total";
/// Reloads of the auth tokens file that found bad lines or no readable file.
pub const TOKEN_RELOAD_FAILURES: &str = "orders_auth_token_reload_failures_total";
/// Trace spans sent to the OTLP collector.
pub const SPANS_EXPORTED: &str = "orders_trace_spans_exported_total";
/// Trace spans dropped, by reason (`queue_full`, `export_failed`).
pub const SPANS_DROPPED: &str = "orders_trace_spans_dropped_total";

/// The process-wide recorder (metrics are global in the `metrics` crate).
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder once per process and returns its handle.
fn handle() -> anyhow::Result<PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
    let batches = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(HANDLING_SECONDS.to_owned()),
            &buckets,
        )
        .context("configuring histogram buckets")?
        .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Full(BATCH_SIZE.to_owned()), &batches)
        .context("configuring histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe();
    // Every series of every known RPC exists from the start, at zero (as
    // go-grpc-prometheus's InitializeMetrics does), so rate() sees the
    // first call and dashboards computing started - handled work at once.
    for rpc in 0..RPCS.len() {
        Rpc(rpc).initialize();
    }
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::counter!(SPANS_EXPORTED).increment(0);
    for reason in ["queue_full", "export_failed"] {
        metrics::counter!(SPANS_DROPPED, "reason" => reason).increment(0);
    }
    metrics::counter!(KEYS_PURGED).increment(0);
    record_purge_success();
    // Every PlaceOrder outcome from the start, at zero: an alert's rate()
    // sees the first key_reused or outcome_unknown after a restart.
    for outcome in [
        "created",
        "replayed",
        "expired_reuse",
        "key_reused",
        "key_in_use",
        "invalid",
        "unauthenticated",
        "overloaded",
        "not_found",
        "deadline_exceeded",
        "outcome_unknown",
        "unavailable",
        "error",
    ] {
        metrics::counter!(PLACE_OUTCOMES, "outcome" => outcome).increment(0);
    }
    for outcome in ["not_written", "outcome_unknown", "placed_alone"] {
        metrics::counter!(BATCH_FAILURES, "outcome" => outcome).increment(0);
    }
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// `# HELP` for every metric.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(PLACE_OUTCOMES, "PlaceOrder calls by idempotency outcome.");
    describe_counter!(STARTED, "RPCs started on the server.");
    describe_counter!(HANDLED, "RPCs finished on the server, by the status code the caller got.");
    describe_counter!(MSG_RECEIVED, "Request messages received by the server.");
    describe_counter!(MSG_SENT, "Response messages sent by the server.");
    describe_histogram!(HANDLING_SECONDS, metrics::Unit::Seconds, "Time from an RPC's start to its status.");
    describe_counter!(KEYS_PURGED, "Expired idempotency keys deleted by the purge.");
    describe_gauge!(
        PURGE_LAST_SUCCESS,
        metrics::Unit::Seconds,
        "When the purge last left no expired key (Unix time); the process start until it has."
    );
    describe_gauge!(POOL_CONNECTIONS, "Pooled database connections, by pool.");
    describe_gauge!(POOL_IDLE, "Idle pooled database connections, by pool.");
    describe_gauge!(SERVING, "1 while the database takes writes and the server is not draining, else 0.");
    describe_counter!(CONNECTIONS_REFUSED, "Connections closed as soon as they were accepted, by reason.");
    describe_counter!(
        CONNECTIONS_EVICTED,
        "Connections told to close by their listener's budget, by reason."
    );
    describe_counter!(WATCHES_REFUSED, "Health Watch streams refused over their budget.");
    describe_counter!(
        KEY_WAITS_REFUSED,
        "PlaceOrders refused at once: the pool's share for waiting on held keys was taken."
    );
    describe_counter!(LOG_LINES_DROPPED, "Log lines dropped because stdout did not keep up.");
    describe_counter!(CONNECTIONS_TIMED_OUT, "Connections closed by their deadline, by stage.");
    describe_counter!(ACCEPT_ERRORS, "Accepts that failed (out of descriptors, ...).");
    describe_counter!(TLS_HANDSHAKE_FAILURES, "TLS handshakes refused.");
    describe_counter!(TLS_RELOAD_FAILURES, "Reloads of the TLS certificate, key or client CA that failed.");
    describe_counter!(TOKEN_RELOAD_FAILURES, "Reloads of the auth tokens file that found problems.");
    describe_histogram!(BATCH_SIZE, "PlaceOrders written together by one group commit.");
    describe_counter!(BATCH_FAILURES, "Group-commit batches that failed whole, by outcome.");
    describe_gauge!(BUILD_INFO, "1, labelled with the version that runs.");
    describe_counter!(SPANS_EXPORTED, "Trace spans sent to the OTLP collector.");
    describe_counter!(
        SPANS_DROPPED,
        "Trace spans dropped: the export queue was full, or their export failed."
    );
}

/// The process's own metrics, in the Prometheus client libraries' names,
/// read from /proc when scraped (Linux; elsewhere none).
fn process_metrics() -> String {
    let mut out = String::new();
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return out };
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // Clock ticks and pages as Linux reports them (USER_HZ is 100, pages 4 KiB on every
    // architecture this runs on).
    let (ticks, page) = (100.0, 4096.0);
    let mut put = |name: &str, kind: &str, help: &str, value: f64| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    };
    if let (Some(user), Some(system)) = (field(11), field(12)) {
        put(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent in seconds.",
            (user + system) / ticks,
        );
    }
    if let Some(rss) = field(21) {
        put("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss * page);
    }
    if let Some(vsize) = field(20) {
        put("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", vsize);
    }
    if let (Some(start), Ok(uptime), Ok(boot)) =
        (field(19), std::fs::read_to_string("/proc/uptime"), std::fs::read_to_string("/proc/stat"))
    {
        let _ = uptime;
        if let Some(btime) = boot.lines().find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok()) {
            put(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since the Unix epoch in seconds.",
                btime + start / ticks,
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        put("process_open_fds", "gauge", "Number of open file descriptors.", fds.count() as f64);
    }
    let limit = std::fs::read_to_string("/proc/self/limits").ok().and_then(|limits| {
        let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse::<f64>().ok()
    });
    if let Some(limit) = limit {
        put("process_max_fds", "gauge", "Maximum number of open file descriptors.", limit);
    }
    out
}

/// Binds `addr` for the metrics endpoint (before anything serves, so a busy
/// port fails start-up), installing the recorder.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    handle()?;
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} for metrics"))
}

/// The metrics endpoint: `GET /metrics`.
pub fn router() -> anyhow::Result<axum::Router> {
    let handle = handle()?;
    Ok(axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move {
                handle.run_upkeep();
                set_log_lines_dropped(super::log_lines_dropped());
                let body = handle.render() + &process_metrics();
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
            }
        }),
    ))
}

/// Whether a call's W3C `traceparent` may make its server span the
/// caller's child (and so choose its sampling under `parentbased_*`): false
/// for a call that will be refused before authentication, whose caller must
/// not be able to force spans into the export queue. It may leave what it
/// learned in the request's extensions (the account it authenticated).
#[derive(Clone)]
pub struct TrustParent(pub std::sync::Arc<TrustFn>);

/// What [`TrustParent`] asks of a call.
pub type TrustFn = dyn Fn(&mut http::Request<tonic::body::Body>) -> bool + Send + Sync;

impl std::fmt::Debug for TrustParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrustParent")
    }
}

/// Wraps the gRPC server in [`RpcMetrics`]; every caller's `traceparent` is
/// followed unless [`trusting`](Self::trusting) says otherwise.
#[derive(Debug, Clone, Default)]
pub struct RpcMetricsLayer {
    trust: Option<TrustParent>,
}

impl RpcMetricsLayer {
    /// Follows a caller's `traceparent` only where `trust` says so.
    pub fn trusting(trust: TrustParent) -> Self {
        Self { trust: Some(trust) }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics(inner, self.trust.clone())
    }
}

/// Counts every RPC the server finishes in `grpc_server_handled_total`,
/// times it in `grpc_server_handling_seconds`, and runs it in its server
/// span ([`traces::server_span`]), which ends with the status: every service (orders,
/// health, reflection), and calls refused before any handler runs (a
/// message that does not decode, an unknown method). The code is the one
/// the caller sees: from the headers of a trailers-only answer, else from
/// the trailers at the end of the body; a call whose body is dropped before
/// its trailers (the caller went away) counts as `Canceled`.
#[derive(Debug, Clone)]
pub struct RpcMetrics<S>(S, Option<TrustParent>);

impl<S, R> tower::Service<http::Request<tonic::body::Body>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<MeteredBody<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let rpc = Rpc::of(request.uri().path());
        let (_, service, method) = RPCS[rpc.0];
        let trusted = self.1.as_ref().is_none_or(|trust| (trust.0)(&mut request));
        let untrusted = http::HeaderMap::new();
        let parent = if trusted { request.headers() } else { &untrusted };
        let span = traces::server_span(&SPAN_NAMES[rpc.0], service, method, parent);
        rpc.series().started.increment(1);
        let started = Instant::now();
        let request = request.map(|inner| {
            tonic::body::Body::new(CountedBody {
                inner,
                messages: Messages::default(),
                counter: rpc.series().received.clone(),
            })
        });
        let response = span.in_scope(|| self.0.call(request));
        let call_span = span.clone();
        Box::pin(
            async move {
                let response = response.await?;
                let mut metered = Metered { rpc, started, finished: false, span: Some(span) };
                if let Some(code) = grpc_status(response.headers()) {
                    metered.finish(code);
                }
                Ok(response.map(|inner| MeteredBody { inner, metered, sent: Messages::default() }))
            }
            .instrument(call_span),
        )
    }
}

/// Counts the gRPC messages (a flag byte, a 4-byte length, the bytes) in a
/// stream of body bytes, however they are split into frames.
#[derive(Debug, Default)]
struct Messages {
    header: [u8; 5],
    header_len: usize,
    left: usize,
}

impl Messages {
    /// How many messages end in `bytes`.
    fn count(&mut self, mut bytes: &[u8]) -> u64 {
        let mut ended = 0;
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                self.left -= n;
                bytes = &bytes[n..];
                if self.left == 0 {
                    ended += 1;
                }
                continue;
            }
            let n = (5 - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == 5 {
                self.header_len = 0;
                let [_, a, b, c, d] = self.header;
                self.left = u32::from_be_bytes([a, b, c, d]) as usize;
                if self.left == 0 {
                    ended += 1;
                }
            }
        }
        ended
    }
}

/// A request body that counts the messages it carries.
struct CountedBody {
    inner: tonic::body::Body,
    messages: Messages,
    counter: metrics::Counter,
}

impl Body for CountedBody {
    type Data = <tonic::body::Body as Body>::Data;
    type Error = <tonic::body::Body as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.counter.increment(this.messages.count(data));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that records its RPC when the trailers go out.
#[derive(Debug)]
pub struct MeteredBody<B> {
    inner: B,
    metered: Metered,
    sent: Messages,
}

impl<B: Body + Unpin> Body for MeteredBody<B>
where
    B::Data: prost::bytes::Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let sent = this.sent.count(prost::bytes::Buf::chunk(data));
            this.metered.rpc.series().sent.increment(sent);
        }
        if !this.metered.finished {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        this.metered.finish(grpc_status(trailers).unwrap_or(Code::Unknown));
                    }
                }
                Poll::Ready(Some(Err(_))) => this.metered.finish(Code::Internal),
                Poll::Ready(None) => this.metered.finish(Code::Unknown),
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One RPC in flight, recorded once; its span ends with it.
#[derive(Debug)]
struct Metered {
    rpc: Rpc,
    started: Instant,
    finished: bool,
    span: Option<tracing::Span>,
}

impl Metered {
    fn finish(&mut self, code: Code) {
        self.finished = true;
        self.rpc.record(code, self.started.elapsed());
        if let Some(span) = self.span.take() {
            traces::record_status(&span, code);
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(Code::Cancelled);
        }
    }
}

/// The `grpc-status` among `headers`, if any.
fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(Code::from_i32(value))
}

/// The RPCs the server knows, as (type, service, method) labels; the last
/// is every other path. Fixed strings: a caller's made-up path is
/// `unknown`, so it cannot grow the set of series.
const RPCS: [(&str, &str, &str); 9] = [
    ("unary", ORDERS, "PlaceOrder"),
    ("unary", ORDERS, "GetOrder"),
    ("unary", ORDERS, "ListOrders"),
    ("unary", ORDERS, "CancelOrder"),
    ("unary", HEALTH, "Check"),
    ("server_stream", HEALTH, "Watch"),
    ("bidi_stream", "grpc.reflection.v1.ServerReflection", "ServerReflectionInfo"),
    ("bidi_stream", "grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo"),
    ("unknown", "unknown", "unknown"),
];
const ORDERS: &str = "orders.v1.OrderService";
const HEALTH: &str = "grpc.health.v1.Health";

/// The series of one RPC, registered on first use and then recorded
/// without a registry lookup: one per status code, and the latencies.
/// A handle taken before the recorder is installed records nothing, so the
/// recorder is installed when the metrics endpoint binds, before any RPC.
struct RpcSeries {
    handled: [OnceLock<metrics::Counter>; 17],
    seconds: OnceLock<metrics::Histogram>,
}

/// The counters of one RPC that every call touches.
struct CallSeries {
    started: metrics::Counter,
    received: metrics::Counter,
    sent: metrics::Counter,
}

static SERIES: [RpcSeries; RPCS.len()] =
    [const { RpcSeries { handled: [const { OnceLock::new() }; 17], seconds: OnceLock::new() } }; RPCS.len()];

/// Each RPC's span name, made once.
static SPAN_NAMES: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
    RPCS.iter().map(|&(_, service, method)| traces::span_name(service, method)).collect()
});

static CALL_SERIES: [OnceLock<CallSeries>; RPCS.len()] = [const { OnceLock::new() }; RPCS.len()];

/// An RPC: its index in [`RPCS`].
#[derive(Debug, Clone, Copy)]
struct Rpc(usize);

impl Rpc {
    fn of(path: &str) -> Self {
        let (service, method) = path.strip_prefix('/').and_then(|p| p.split_once('/')).unwrap_or_default();
        let known = RPCS[..RPCS.len() - 1].iter().position(|&(_, s, m)| s == service && m == method);
        Rpc(known.unwrap_or(RPCS.len() - 1))
    }

    fn series(self) -> &'static CallSeries {
        CALL_SERIES[self.0].get_or_init(|| {
            let (kind, service, method) = RPCS[self.0];
            let labels = [("grpc_type", kind), ("grpc_service", service), ("grpc_method", method)];
            CallSeries {
                started: metrics::counter!(STARTED, &labels),
                received: metrics::counter!(MSG_RECEIVED, &labels),
                sent: metrics::counter!(MSG_SENT, &labels),
            }
        })
    }

    fn handled(self, code: Code) -> &'static metrics::Counter {
        let (kind, service, method) = RPCS[self.0];
        SERIES[self.0].handled[code as usize].get_or_init(|| {
            metrics::counter!(HANDLED, "grpc_type" => kind, "grpc_service" => service,
                "grpc_method" => method, "grpc_code" => order_client::code_name(code))
        })
    }

    fn seconds(self) -> &'static metrics::Histogram {
        let (kind, service, method) = RPCS[self.0];
        SERIES[self.0].seconds.get_or_init(|| {
            metrics::histogram!(HANDLING_SECONDS, "grpc_type" => kind, "grpc_service" => service,
                "grpc_method" => method)
        })
    }

    /// Every series of this RPC, at zero.
    fn initialize(self) {
        let series = self.series();
        for counter in [&series.started, &series.received, &series.sent] {
            counter.increment(0);
        }
        for code in 0..17 {
            self.handled(Code::from_i32(code)).increment(0);
        }
        let _ = self.seconds();
    }

    fn record(self, code: Code, elapsed: std::time::Duration) {
        self.handled(code).increment(1);
        self.seconds().record(elapsed.as_secs_f64());
    }
}

/// Counts one PlaceOrder outcome.
pub fn record_place_outcome(outcome: &'static str) {
    metrics::counter!(PLACE_OUTCOMES, "outcome" => outcome).increment(1);
}

/// Counts a connection closed as soon as it was accepted.
pub fn record_connection_refused(reason: &'static str) {
    metrics::counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

/// Counts a connection closed for its slow or missing request headers.
pub fn record_connection_timed_out(stage: &'static str) {
    metrics::counter!(CONNECTIONS_TIMED_OUT, "stage" => stage).increment(1);
}

/// Counts a failed accept.
pub fn record_accept_error() {
    metrics::counter!(ACCEPT_ERRORS).increment(1);
}

/// Counts a connection its listener's budget told to close.
pub fn record_connection_evicted(reason: &'static str) {
    metrics::counter!(CONNECTIONS_EVICTED, "reason" => reason).increment(1);
}

/// Counts a PlaceOrder refused at once for a key held elsewhere.
pub fn record_key_wait_refused() {
    metrics::counter!(KEY_WAITS_REFUSED).increment(1);
}

/// Counts a Watch refused over its budget.
pub fn record_watch_refused() {
    metrics::counter!(WATCHES_REFUSED).increment(1);
}

/// Sets the count of log lines dropped so far.
pub fn set_log_lines_dropped(total: u64) {
    metrics::counter!(LOG_LINES_DROPPED).absolute(total);
}

/// Counts a refused TLS handshake.
pub fn record_tls_handshake_failure() {
    metrics::counter!(TLS_HANDSHAKE_FAILURES).increment(1);
}

/// Counts a failed TLS reload.
pub fn record_tls_reload_failure() {
    metrics::counter!(TLS_RELOAD_FAILURES).increment(1);
}

/// Counts a token reload that found problems.
pub fn record_token_reload_failure() {
    metrics::counter!(TOKEN_RELOAD_FAILURES).increment(1);
}

/// Records that a purge ran to the end: no expired key is left.
pub fn record_purge_success() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    metrics::gauge!(PURGE_LAST_SUCCESS).set(now.as_secs_f64());
}

/// Counts purged keys.
pub fn record_purged(keys: u64) {
    metrics::counter!(KEYS_PURGED).increment(keys);
}

/// Sets the health gauge.
pub fn set_serving(serving: bool) {
    metrics::gauge!(SERVING).set(if serving { 1.0 } else { 0.0 });
}

/// Counts trace spans the collector took.
pub fn record_spans_exported(n: u64) {
    metrics::counter!(SPANS_EXPORTED).increment(n);
}

/// Counts trace spans dropped for `reason`.
pub fn record_spans_dropped(reason: &'static str, n: u64) {
    metrics::counter!(SPANS_DROPPED, "reason" => reason).increment(n);
}

/// Records the size of one group commit.
pub fn record_batch(size: usize) {
    metrics::histogram!(BATCH_SIZE).record(size as f64);
}

/// Counts one group commit that failed whole.
pub fn record_batch_failure(outcome: &'static str) {
    metrics::counter!(BATCH_FAILURES, "outcome" => outcome).increment(1);
}

/// Sets the pool gauges of one pool.
pub fn set_pool(pool: &'static str, size: u32, idle: usize) {
    metrics::gauge!(POOL_CONNECTIONS, "pool" => pool).set(f64::from(size));
    metrics::gauge!(POOL_IDLE, "pool" => pool).set(idle as f64);
}
