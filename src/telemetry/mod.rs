//! What the service tells its operators: logs (a `tracing` subscriber
//! writing text or JSON lines to stdout, filtered by `RUST_LOG`, default
//! `info`), and [`metrics`] (Prometheus).

pub(crate) mod metrics;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber; a second call does nothing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // sqlx warns of a connect parameter it does not know with its value
    // (`sslpassword=…`): that line is never written, whatever RUST_LOG says.
    let filter = match "sqlx_postgres::options::parse=error".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(std::io::stdout().is_terminal());
    // `try_init` fails only when a subscriber is already installed (tests).
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => {
            builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init()
        }
    };
}
