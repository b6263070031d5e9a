//! OpenTelemetry traces, exported over OTLP/gRPC and configured the
//! standard way, by environment: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns them on; `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` (and `_ARG`),
//! `OTEL_EXPORTER_OTLP_HEADERS` and `_TIMEOUT`, and `OTEL_BSP_*` for the
//! queue, are read as the OpenTelemetry SDKs read them. Without an endpoint
//! (or with `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`) nothing
//! is built: no layer, no spans beyond the ones the logs already had.
//!
//! Spans are `tracing` spans; `tracing-opentelemetry` turns them into
//! OpenTelemetry ones:
//! - the **server span** of every RPC (made by the RPC middleware, named
//!   `service/method`, kind server, `rpc.system`, `rpc.service`,
//!   `rpc.method`, `rpc.grpc.status_code`), a child of the caller's span
//!   when the request carries a W3C `traceparent`;
//! - a **database span** under it for the store's work ([`db_span`]);
//! - on SQLite, the **group-commit batch** span, linked to the database span
//!   of every call it wrote, each of which links back to it ([`batch_span`]).
//!
//! A collector that is down or slow never holds an RPC up: finished spans
//! go into a bounded queue ([`QueueProcessor`]) that a thread of its own
//! exports; a span that finds the queue full, or whose export fails, is
//! dropped and counted in `orders_trace_spans_dropped_total{reason}`.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc as std_mpsc,
    },
    time::Duration,
};

use anyhow::Context as _;
use opentelemetry::{
    Context, KeyValue,
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    trace::{SdkTracerProvider, SpanData, SpanExporter as _, SpanLimits, SpanProcessor},
};
use order_client::TraceParent;
use tokio::sync::mpsc;
use tonic::codegen::http;
use tracing::{Span, Subscriber, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;

use super::metrics;

/// Whether spans are exported (an endpoint is configured): read on the hot
/// path, so the spans only traces need are not made otherwise.
static ON: AtomicBool = AtomicBool::new(false);

/// Whether traces are on.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Whether log lines carry trace ids (JSON logs): only then are the ids
/// kept in each traced span's extensions.
static STAMP: AtomicBool = AtomicBool::new(false);

/// Makes every traced span keep its ids for the log lines inside it.
pub(super) fn stamp_log_lines() {
    STAMP.store(true, Ordering::Relaxed);
}

/// The tracer provider, kept to flush and shut down at exit.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Exports what is queued (waiting at most `timeout` for the collector)
    /// and stops the exporting thread. Blocks: call it off the runtime's
    /// worker threads (`spawn_blocking`).
    pub fn shutdown(&self, timeout: Duration) {
        if let Err(error) = self.provider.shutdown_with_timeout(timeout) {
            tracing::warn!(%error, "flushing the trace queue at exit");
        }
    }
}

/// The environment's trace settings, or `None` when traces are off.
fn endpoint() -> Option<String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    if var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none")) {
        return None;
    }
    var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// The largest export queue (`OTEL_BSP_MAX_QUEUE_SIZE`), about 24 MiB of
/// slots.
const MAX_QUEUE: usize = 65_536;

/// `endpoint` without its user name and password, for messages.
fn redact(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(mut url) if !url.username().is_empty() || url.password().is_some() => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        }
        Ok(_) => endpoint.to_owned(),
        Err(_) => "(not a URL)".to_owned(),
    }
}

/// Refuses trace settings the SDK would take silently and then ignore or
/// misread: an endpoint that is not an `http(s)://` URL, another exporter
/// or protocol, an unknown sampler, a ratio outside 0..=1, a timeout that is
/// not a positive number of milliseconds.
fn check_settings(endpoint: &str) -> anyhow::Result<()> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let url = url::Url::parse(endpoint)
        .map_err(|e| anyhow::anyhow!("OTEL_EXPORTER_OTLP_ENDPOINT={}: {e}", redact(endpoint)))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        anyhow::bail!(
            "OTEL_EXPORTER_OTLP_ENDPOINT={}: expected http://HOST:PORT or https://HOST:PORT",
            redact(endpoint)
        );
    }
    if let Some(exporter) = var("OTEL_TRACES_EXPORTER")
        && exporter != "otlp"
    {
        anyhow::bail!("OTEL_TRACES_EXPORTER={exporter:?}: this service exports `otlp` (or `none`)");
    }
    for name in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
        if let Some(protocol) = var(name)
            && protocol != "grpc"
        {
            anyhow::bail!("{name}={protocol:?}: this service exports OTLP over gRPC only");
        }
    }
    let sampler = var("OTEL_TRACES_SAMPLER");
    let samplers = [
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    ];
    if let Some(sampler) = &sampler
        && !samplers.contains(&sampler.as_str())
    {
        anyhow::bail!("OTEL_TRACES_SAMPLER={sampler:?}: expected one of {}", samplers.join(", "));
    }
    if sampler.as_deref().is_some_and(|s| s.ends_with("traceidratio"))
        && let Some(arg) = var("OTEL_TRACES_SAMPLER_ARG")
        && !arg.trim().parse::<f64>().is_ok_and(|r| (0.0..=1.0).contains(&r))
    {
        anyhow::bail!("OTEL_TRACES_SAMPLER_ARG={arg:?}: expected a ratio from 0 to 1");
    }
    for name in ["OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"] {
        if let Some(value) = var(name)
            && !value.trim().parse::<u64>().is_ok_and(|ms| ms > 0)
        {
            anyhow::bail!("{name}={value:?}: expected a positive whole number of milliseconds");
        }
    }
    Ok(())
}

/// The queue's limits, from the `OTEL_BSP_*` variables (milliseconds and
/// counts) with the specification's defaults.
#[derive(Debug, Clone, Copy)]
struct QueueSettings {
    max_queue: usize,
    max_batch: usize,
    delay: Duration,
    export_timeout: Duration,
}

impl QueueSettings {
    fn from_env() -> anyhow::Result<Self> {
        let number = |name: &str, default: u64| -> anyhow::Result<u64> {
            match std::env::var(name) {
                Ok(v) if !v.trim().is_empty() => v
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|&n| n > 0)
                    .with_context(|| format!("{name}={v:?}: expected a positive whole number")),
                _ => Ok(default),
            }
        };
        let max_queue = number("OTEL_BSP_MAX_QUEUE_SIZE", 2048)? as usize;
        // The queue's slots are allocated at start.
        if max_queue > MAX_QUEUE {
            anyhow::bail!("OTEL_BSP_MAX_QUEUE_SIZE={max_queue}: at most {MAX_QUEUE}");
        }
        Ok(Self {
            max_queue,
            max_batch: (number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)? as usize).min(max_queue),
            delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 5000)?),
            export_timeout: Duration::from_millis(number("OTEL_BSP_EXPORT_TIMEOUT", 30_000)?),
        })
    }
}

/// Builds the exporter and the provider when an endpoint is configured.
/// Errors are settings that cannot work (a protocol other than gRPC, a bad
/// number), reported at start like any bad flag.
pub(super) fn from_env() -> anyhow::Result<Option<Tracing>> {
    let Some(endpoint) = endpoint() else { return Ok(None) };
    check_settings(&endpoint)?;
    let settings = QueueSettings::from_env()?;
    let processor = QueueProcessor::start(settings)
        .with_context(|| format!("the OTLP trace exporter for {}", redact(&endpoint)))?;
    let mut resource = Resource::builder();
    // The SDK reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, but lets
    // the latter's service.name win; the specification says the former
    // does. Without either the name would be `unknown_service`.
    match std::env::var("OTEL_SERVICE_NAME").ok().filter(|v| !v.is_empty()) {
        Some(name) => resource = resource.with_service_name(name),
        None if std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name=")) => {}
        None => resource = resource.with_service_name("order-service"),
    }
    let resource =
        resource.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))).build();
    // The sampler comes from OTEL_TRACES_SAMPLER (default: parentbased_always_on).
    // A group-commit span links to every call of its batch: the SDK's
    // default of 128 links would cut the larger batches short.
    let limits = SpanLimits {
        max_links_per_span: crate::config::SQLITE_MAX_BATCH_LIMIT.max(crate::config::PG_MAX_BATCH_LIMIT),
        ..SpanLimits::default()
    };
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_span_limits(limits)
        .with_span_processor(processor)
        .build();
    ON.store(true, Ordering::Relaxed);
    tracing::debug!(endpoint = %redact(&endpoint), "exporting traces");
    Ok(Some(Tracing { provider }))
}

/// The `tracing` layer that makes OpenTelemetry spans of `tracing` spans.
pub(super) fn layer<S>(tracing: &Tracing) -> impl tracing_subscriber::Layer<S> + use<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracing.provider.tracer("order-service"))
        // What these add (busy/idle time, thread, source location, an
        // activated OpenTelemetry context on every poll) costs on every
        // span and tells an operator little.
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        .with_target(false)
        .with_context_activation(false)
}

/// An RPC's span name: its full method name.
pub(super) fn span_name(service: &str, method: &str) -> String {
    if service == "unknown" { "unknown".to_owned() } else { format!("{service}/{method}") }
}

/// The server span of one RPC: named and attributed per the OpenTelemetry
/// RPC conventions, the parent of every span and log line of the call. The
/// handler records the account, key, order and outcome on it; the RPC
/// middleware records the status code. With traces on, a W3C `traceparent`
/// in `headers` makes it the caller's span's child.
pub(super) fn server_span(
    name: &'static str,
    service: &'static str,
    method: &'static str,
    headers: &http::HeaderMap,
) -> Span {
    let span = tracing::info_span!(
        "rpc",
        otel.name = Empty,
        otel.kind = "server",
        otel.status_code = Empty,
        error.type = Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        account_id = Empty,
        client_request_id = Empty,
        order_id = Empty,
        listed = Empty,
        outcome = Empty,
        code = Empty,
        latency_ms = Empty,
    );
    if enabled() && !span.is_disabled() {
        span.record("otel.name", name);
        if let Some(parent) = remote_parent(headers) {
            // Fails only once the span has started, which it has not.
            let _ = span.set_parent(Context::new().with_remote_span_context(parent));
        }
        stamp(&span);
    }
    span
}

/// Records how an RPC ended on its server span: the gRPC code, and an
/// error status for the codes the conventions call server errors.
pub(super) fn record_status(span: &Span, code: tonic::Code) {
    span.record("rpc.grpc.status_code", code as i64);
    record_error(span, code);
}

/// Marks `span` failed (status error, `error.type` the code's name) when
/// `code` is one the conventions call a server error: a refused request
/// (invalid, not found, key reused) is the caller's, not the span's.
pub fn record_error(span: &Span, code: tonic::Code) {
    use tonic::Code::*;
    if matches!(code, Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss) {
        span.record("otel.status_code", "error");
        span.record("error.type", order_client::code_name(code));
    }
}

/// A span for one call's database work, the child of the current (server)
/// span; with traces off, no span.
pub fn db_span(operation: &'static str, system: &'static str) -> Span {
    if !enabled() {
        return Span::none();
    }
    let name = match (operation, system) {
        ("place_order", "sqlite") => "place_order sqlite",
        ("place_order", _) => "place_order postgresql",
        ("get_order", "sqlite") => "get_order sqlite",
        ("get_order", _) => "get_order postgresql",
        ("list_orders", "sqlite") => "list_orders sqlite",
        ("list_orders", _) => "list_orders postgresql",
        ("cancel_order", "sqlite") => "cancel_order sqlite",
        ("cancel_order", _) => "cancel_order postgresql",
        _ => operation,
    };
    let span = tracing::info_span!(
        "db",
        otel.name = name,
        otel.kind = "client",
        otel.status_code = Empty,
        error.type = Empty,
        db.system.name = system,
        db.operation.name = operation,
    );
    stamp(&span);
    span
}

/// The span of one group commit on `system` (`sqlite`, `postgresql`) writing `n` orders for the calls
/// whose database spans are `callers`: linked to each of them, and each of
/// them to it. Its parent is the first sampled caller's span, so a sampled
/// trace holds the batch it rode in; with traces off, no span.
pub fn batch_span<'a>(system: &'static str, n: usize, callers: impl Iterator<Item = &'a Span>) -> Span {
    if !enabled() {
        return Span::none();
    }
    let contexts: Vec<(&Span, SpanContext)> = callers
        .map(|caller| (caller, caller.context().span().span_context().clone()))
        .filter(|(_, cx)| cx.is_valid())
        .collect();
    // Only a sampled caller's trace gets it: a batch of callers that all
    // asked not to be recorded is not recorded either.
    let Some((first, _)) = contexts.iter().find(|(_, cx)| cx.is_sampled()) else {
        return Span::none();
    };
    let span = tracing::info_span!(
        parent: None,
        "batch",
        otel.name = %format_args!("group_commit {system}"),
        otel.kind = "client",
        db.system.name = system,
        db.operation.name = "group_commit",
        // The conventions set the batch size only on batches of two or more.
        db.operation.batch.size = (n > 1).then_some(n as i64),
    );
    let _ = span.set_parent(first.context());
    for (_, cx) in &contexts {
        span.add_link(cx.clone());
    }
    let batch = span.context().span().span_context().clone();
    if batch.is_valid() {
        for (caller, _) in &contexts {
            caller.add_link(batch.clone());
        }
    }
    stamp(&span);
    span
}

/// The trace and span id of a span, kept in its extensions for the JSON
/// log lines of the events inside it.
#[derive(Debug, Clone, Copy)]
pub(super) struct TraceIds {
    pub trace_id: opentelemetry::trace::TraceId,
    pub span_id: opentelemetry::trace::SpanId,
}

/// Stores `span`'s OpenTelemetry ids in its extensions (see [`TraceIds`]).
fn stamp(span: &Span) {
    if !STAMP.load(Ordering::Relaxed) {
        return;
    }
    let cx = span.context();
    let span_ref = cx.span();
    let ids = span_ref.span_context();
    if !ids.is_valid() {
        return;
    }
    let ids = TraceIds { trace_id: ids.trace_id(), span_id: ids.span_id() };
    span.with_subscriber(|(id, dispatch)| {
        if let Some(registry) = dispatch.downcast_ref::<tracing_subscriber::Registry>()
            && let Some(data) = registry.span(id)
        {
            data.extensions_mut().replace(ids);
        }
    });
}

/// Most bytes of `tracestate` kept: the W3C minimum a vendor must
/// propagate. A longer one is dropped whole, so a caller cannot make every
/// span of its call (and its batch) carry kilobytes.
const MAX_TRACESTATE: usize = 512;

/// The caller's span, from the W3C `traceparent` and `tracestate` headers,
/// read as strictly as the client writes them ([`TraceParent::parse`]): a
/// malformed or repeated `traceparent` starts a new trace instead of being
/// guessed at; `tracestate` headers are joined, and dropped when over
/// [`MAX_TRACESTATE`] or malformed.
fn remote_parent(headers: &http::HeaderMap) -> Option<SpanContext> {
    let mut traceparents = headers.get_all("traceparent").iter();
    let (Some(value), None) = (traceparents.next(), traceparents.next()) else { return None };
    let parent = TraceParent::parse(value.to_str().ok()?)?;
    let mut state = String::new();
    for value in headers.get_all("tracestate") {
        let Ok(value) = value.to_str() else { return Some(context(&parent, TraceState::default())) };
        if !state.is_empty() {
            state.push(',');
        }
        state.push_str(value);
    }
    let state = match state.len() {
        0 => TraceState::default(),
        n if n > MAX_TRACESTATE => TraceState::default(),
        _ => state.parse().unwrap_or_default(),
    };
    Some(context(&parent, state))
}

fn context(parent: &TraceParent, state: TraceState) -> SpanContext {
    let flags = if parent.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
    SpanContext::new(TraceId::from(parent.trace_id), SpanId::from(parent.parent_id), flags, true, state)
}

/// What the exporting thread is asked besides spans.
enum Control {
    /// The resource (service name, version, attributes) spans are sent
    /// with: given once, before any span.
    Resource(Resource),
    /// A batch's worth of spans is queued: export them now.
    Export,
    /// Export everything queued, then answer.
    Flush(std_mpsc::SyncSender<()>),
    /// Export everything queued, answer, and stop.
    Shutdown(std_mpsc::SyncSender<()>),
}

/// A span processor with a bounded queue that never blocks the span's
/// ender: a full queue drops the span (counted). A thread of its own, with
/// its own single-threaded runtime, exports the queue in batches, so the
/// collector's connection, its retries and its slowness stay off the
/// server's runtime. The thread is woken once per batch (or by the schedule
/// delay), never per span: a wake-up per span cost the RPC workers a
/// system call each.
#[derive(Debug)]
struct QueueProcessor {
    spans: std_mpsc::SyncSender<SpanData>,
    /// Spans queued since the exporting thread was last woken.
    unannounced: AtomicUsize,
    max_batch: usize,
    control: mpsc::UnboundedSender<Control>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl QueueProcessor {
    /// Builds the OTLP exporter inside the exporting thread and starts it.
    fn start(settings: QueueSettings) -> anyhow::Result<Self> {
        let (spans, spans_rx) = std_mpsc::sync_channel(settings.max_queue);
        let (control, control_rx) = mpsc::unbounded_channel();
        let (built_tx, built_rx) = std_mpsc::sync_channel(1);
        // The thread's own client (tonic, hyper, h2) never traces or logs
        // itself into the queue it empties; its own log lines go to the
        // process's subscriber explicitly ([`LOGS`]).
        let thread = std::thread::Builder::new()
            .name("otel-export".into())
            .spawn(move || {
                let _silent = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = built_tx.send(Err(anyhow::Error::from(error)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build();
                    let exporter = match exporter {
                        Ok(exporter) => {
                            let _ = built_tx.send(Ok(()));
                            exporter
                        }
                        Err(error) => {
                            let _ = built_tx.send(Err(anyhow::Error::from(error)));
                            return;
                        }
                    };
                    export_queue(exporter, spans_rx, control_rx, settings).await;
                });
            })
            .context("starting the trace exporting thread")?;
        built_rx.recv().context("the trace exporting thread stopped")??;
        Ok(Self {
            spans,
            unannounced: AtomicUsize::new(0),
            max_batch: settings.max_batch,
            control,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Sends `control` and waits at most `timeout` for the answer.
    fn ask(
        &self,
        control: impl FnOnce(std_mpsc::SyncSender<()>) -> Control,
        timeout: Duration,
    ) -> OTelSdkResult {
        let (reply, answer) = std_mpsc::sync_channel(1);
        self.control.send(control(reply)).map_err(|_| OTelSdkError::AlreadyShutdown)?;
        answer.recv_timeout(timeout).map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn set_resource(&mut self, resource: &Resource) {
        let _ = self.control.send(Control::Resource(resource.clone()));
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.spans.try_send(span).is_err() {
            metrics::record_spans_dropped("queue_full", 1);
            return;
        }
        if self.unannounced.fetch_add(1, Ordering::Relaxed) + 1 >= self.max_batch {
            self.unannounced.store(0, Ordering::Relaxed);
            let _ = self.control.send(Control::Export);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Control::Flush, Duration::from_secs(30))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let answered = self.ask(Control::Shutdown, timeout);
        if answered.is_ok()
            && let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take())
        {
            let _ = thread.join();
        }
        answered
    }
}

/// The exporting thread's loop: everything queued goes out, in batches,
/// when a batch's worth is announced, when the schedule delay passes, or
/// when asked.
async fn export_queue(
    mut exporter: opentelemetry_otlp::SpanExporter,
    spans: std_mpsc::Receiver<SpanData>,
    mut control: mpsc::UnboundedReceiver<Control>,
    settings: QueueSettings,
) {
    let mut failing = false;
    loop {
        let asked = tokio::select! {
            biased;
            asked = control.recv() => asked,
            () = tokio::time::sleep(settings.delay) => Some(Control::Export),
        };
        let asked = match asked {
            Some(Control::Resource(resource)) => {
                exporter.set_resource(&resource);
                continue;
            }
            // The processor is gone: what is queued is all there will be.
            None => Control::Export,
            Some(asked) => asked,
        };
        let mut batch = Vec::new();
        while let Ok(span) = spans.try_recv() {
            batch.push(span);
            if batch.len() >= settings.max_batch {
                export(&exporter, &mut batch, settings, &mut failing).await;
            }
        }
        export(&exporter, &mut batch, settings, &mut failing).await;
        match asked {
            Control::Flush(reply) => {
                let _ = reply.send(());
            }
            Control::Shutdown(reply) => {
                let _ = exporter.shutdown();
                let _ = reply.send(());
                return;
            }
            Control::Resource(_) | Control::Export => {}
        }
        if control.is_closed() && control.is_empty() {
            return;
        }
    }
}

/// The process's subscriber, for the exporting thread's own log lines.
static LOGS: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();

/// Keeps the process's subscriber (once installed) for the exporting
/// thread's log lines.
pub(super) fn keep_log_dispatch() {
    let _ = LOGS.set(tracing::dispatcher::get_default(Clone::clone));
}

/// Logs from the exporting thread, to the process's subscriber.
fn log(event: impl FnOnce()) {
    if let Some(dispatch) = LOGS.get() {
        tracing::dispatcher::with_default(dispatch, event);
    }
}

/// Exports `batch` (emptying it) within the export timeout; a batch that
/// fails is dropped and counted. Logs when exporting starts failing and
/// when it recovers, not once per batch.
async fn export(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: &mut Vec<SpanData>,
    settings: QueueSettings,
    failing: &mut bool,
) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::take(batch);
    let n = spans.len() as u64;
    let error = match tokio::time::timeout(settings.export_timeout, exporter.export(spans)).await {
        Ok(Ok(())) => {
            metrics::record_spans_exported(n);
            if std::mem::take(failing) {
                log(|| tracing::info!("exporting traces again"));
            }
            return;
        }
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("no answer within {}", humantime::format_duration(settings.export_timeout)),
    };
    metrics::record_spans_dropped("export_failed", n);
    if !std::mem::replace(failing, true) {
        log(|| {
            tracing::warn!(%error, spans = n, "exporting traces failed; spans are dropped until the collector answers");
        });
    }
}
