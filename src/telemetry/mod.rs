//! What the service tells its operators: logs (a `tracing` subscriber
//! writing text or JSON lines to stdout, filtered by `RUST_LOG`, default
//! `info`, through `tracing-appender`'s non-blocking writer: a thread of its
//! own writes the lines, so a slow stdout never holds up a call; past
//! [`LOG_BUFFER_LINES`] waiting lines, new ones are dropped and counted in
//! `orders_log_lines_dropped_total`), [`metrics`] (Prometheus), and [`traces`] (OpenTelemetry, when
//! an OTLP endpoint is configured).

pub(crate) mod metrics;
pub mod traces;

use std::io::IsTerminal;

use tracing::{Event, Subscriber};
use tracing_subscriber::{
    EnvFilter, Layer as _,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    layer::SubscriberExt as _,
    registry::LookupSpan,
    util::SubscriberInitExt as _,
};

use crate::config::LogFormat;

pub use traces::Tracing;

/// Most lines a second one [`Throttle`] lets through.
pub const LOGGED_PER_SECOND: u32 = 10;

/// A bound on how often one kind of line is logged, so that callers who
/// can make the server log (refused calls, refused handshakes) cannot make
/// the log a lever: at most [`LOGGED_PER_SECOND`] lines a second, and the
/// number left out told in the next second's first line. (Kept here rather
/// than from a crate: it is a counter and a clock, shared by the server's
/// two refusal logs.)
#[derive(Debug)]
pub struct Throttle(std::sync::Mutex<ThrottleState>);

#[derive(Debug)]
struct ThrottleState {
    second: tokio::time::Instant,
    logged: u32,
    suppressed: u64,
}

impl Default for Throttle {
    fn default() -> Self {
        let second = tokio::time::Instant::now();
        Self(std::sync::Mutex::new(ThrottleState { second, logged: 0, suppressed: 0 }))
    }
}

impl Throttle {
    /// Whether this line may be logged: `Some(n)` if so, `n` being how
    /// many lines were left out in the second before (0 for none).
    pub fn admit(&self) -> Option<u64> {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        let mut left_out = 0;
        if now.duration_since(state.second) >= std::time::Duration::from_secs(1) {
            left_out = state.suppressed;
            *state = ThrottleState { second: now, logged: 0, suppressed: 0 };
        }
        if state.logged < LOGGED_PER_SECOND {
            state.logged += 1;
            Some(left_out)
        } else {
            state.suppressed += 1;
            None
        }
    }
}

/// Most log lines waiting for stdout; more are dropped (and counted).
pub const LOG_BUFFER_LINES: usize = 8192;

/// The count of log lines dropped, once logging is installed.
static DROPPED_LINES: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter> =
    std::sync::OnceLock::new();

/// The log writer's guard: dropping it writes the lines still waiting.
static LOG_WRITER: std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> =
    std::sync::Mutex::new(None);

/// Writes the log lines still waiting, and stops the log writer: call it
/// last, before the process exits (`std::process::exit` runs no
/// destructor, so a line logged just before it would be lost).
pub fn flush_logs() {
    let guard = LOG_WRITER.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(guard);
}

/// Log lines dropped so far because stdout did not keep up.
pub fn log_lines_dropped() -> u64 {
    DROPPED_LINES.get().map_or(0, |counter| counter.dropped_lines() as u64)
}

/// Installs the global subscriber, with the OpenTelemetry layer when the
/// environment configures an OTLP endpoint; returns the tracer provider to
/// flush at exit (and [`flush_logs`] writes the log lines still waiting).
/// Fails on trace settings that cannot work. A second call installs nothing
/// (tests).
pub fn init(format: LogFormat) -> anyhow::Result<Option<Tracing>> {
    // h2 warns once for every connection it closes for the streams it had
    // to reset itself (a peer breaking the protocol: hundreds of lines a
    // second from one attacker, unthrottled); by default only its errors.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,h2=error"));
    // sqlx warns of a connect parameter it does not know with its value
    // (`sslpassword=…`): that line is never written, whatever RUST_LOG says.
    let filter = match "sqlx_postgres::options::parse=error".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let tracing = traces::from_env()?;
    let otel = tracing.as_ref().map(traces::layer);
    let ansi = std::io::stdout().is_terminal();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("order-service-logs")
        .finish(std::io::stdout());
    let _ = DROPPED_LINES.set(writer.error_counter());
    *LOG_WRITER.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(writer).boxed(),
        LogFormat::Json => {
            traces::stamp_log_lines();
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .map_event_format(WithTraceIds)
                .boxed()
        }
    };
    // One global filter (per-layer filters cost every span's every poll a
    // registry lookup per layer): RUST_LOG decides which spans exist, so
    // traces need the service's spans, `order_service=info` (the default).
    // `try_init` fails only when a subscriber is already installed (tests).
    let _ = tracing_subscriber::registry().with(filter).with(otel).with(fmt).try_init();
    traces::keep_log_dispatch();
    Ok(tracing)
}

/// A JSON line format that begins each line of a traced call with its
/// `trace_id` and `span_id` (the innermost traced span's), so a log line
/// leads to its trace and back.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let ids = ctx.event_scope().and_then(|scope| {
            scope.into_iter().find_map(|span| span.extensions().get::<traces::TraceIds>().copied())
        });
        let Some(ids) = ids else { return self.0.format_event(ctx, writer, event) };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => {
                write!(writer, "{{\"trace_id\":\"{}\",\"span_id\":\"{}\",{rest}", ids.trace_id, ids.span_id)
            }
            None => writer.write_str(&line),
        }
    }
}
