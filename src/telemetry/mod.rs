//! What the service tells its operators: logs (a `tracing` subscriber
//! writing text or JSON lines to stdout, filtered by `RUST_LOG`, default
//! `info`), [`metrics`] (Prometheus), and [`traces`] (OpenTelemetry, when
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

/// Installs the global subscriber, with the OpenTelemetry layer when the
/// environment configures an OTLP endpoint; returns the tracer provider to
/// flush at exit. Fails on trace settings that cannot work. A second call
/// installs nothing (tests).
pub fn init(format: LogFormat) -> anyhow::Result<Option<Tracing>> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // sqlx warns of a connect parameter it does not know with its value
    // (`sslpassword=…`): that line is never written, whatever RUST_LOG says.
    let filter = match "sqlx_postgres::options::parse=error".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let tracing = traces::from_env()?;
    let otel = tracing.as_ref().map(traces::layer);
    let ansi = std::io::stdout().is_terminal();
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_ansi(ansi).boxed(),
        LogFormat::Json => {
            traces::stamp_log_lines();
            tracing_subscriber::fmt::layer()
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
