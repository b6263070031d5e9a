//! Prometheus metrics: what each idempotency outcome, RPC, purge and health
//! change counts, and the `GET /metrics` endpoint that serves them.
//!
//! Names follow grpc-ecosystem's middleware (`grpc_server_handled_total`,
//! `grpc_server_handling_seconds`), so existing dashboards work.

use std::{net::SocketAddr, sync::OnceLock, time::Duration};

use anyhow::Context as _;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tonic::Code;

/// PlaceOrder outcomes: created, replayed, key_reused, key_in_use,
/// expired_reuse, invalid, unavailable, …
pub const PLACE_OUTCOMES: &str = "orders_place_outcomes_total";
/// Finished RPCs by service, method and status code.
pub const HANDLED: &str = "grpc_server_handled_total";
/// RPC latency by service and method.
pub const HANDLING_SECONDS: &str = "grpc_server_handling_seconds";
/// Expired idempotency keys deleted.
pub const KEYS_PURGED: &str = "orders_idempotency_keys_purged_total";
/// Pooled database connections, by pool.
pub const POOL_CONNECTIONS: &str = "orders_db_pool_connections";
/// Idle pooled database connections, by pool.
pub const POOL_IDLE: &str = "orders_db_pool_idle_connections";
/// 1 while the database answers and the server is not draining, else 0.
pub const SERVING: &str = "orders_health_serving";

/// The process-wide recorder (metrics are global in the `metrics` crate).
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder once per process and returns its handle.
fn handle() -> anyhow::Result<PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(HANDLING_SECONDS.to_owned()),
            &buckets,
        )
        .context("configuring histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Binds `addr` for the metrics endpoint (before anything serves, so a busy
/// port fails start-up), installing the recorder.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    handle()?;
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} for metrics"))
}

/// Serves `GET /metrics` on `listener` until `stop` resolves.
pub fn serve(
    listener: TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let handle = handle()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move {
                handle.run_upkeep();
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render())
            }
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
            tracing::error!(%error, "the metrics endpoint failed");
        }
    });
    Ok(task)
}

/// The code's name as grpc-go spells it (`OK`, `InvalidArgument`, …).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Counts one finished unary RPC of `orders.v1.OrderService`.
pub fn record_rpc(method: &'static str, code: Code, elapsed: Duration) {
    let service = "orders.v1.OrderService";
    metrics::counter!(HANDLED, "grpc_type" => "unary", "grpc_service" => service,
        "grpc_method" => method, "grpc_code" => code_name(code))
    .increment(1);
    metrics::histogram!(HANDLING_SECONDS, "grpc_type" => "unary", "grpc_service" => service,
        "grpc_method" => method)
    .record(elapsed.as_secs_f64());
}

/// Counts one PlaceOrder outcome.
pub fn record_place_outcome(outcome: &'static str) {
    metrics::counter!(PLACE_OUTCOMES, "outcome" => outcome).increment(1);
}

/// Counts purged keys.
pub fn record_purged(keys: u64) {
    metrics::counter!(KEYS_PURGED).increment(keys);
}

/// Sets the health gauge.
pub fn set_serving(serving: bool) {
    metrics::gauge!(SERVING).set(if serving { 1.0 } else { 0.0 });
}

/// Sets the pool gauges of one pool.
pub fn set_pool(pool: &'static str, size: u32, idle: usize) {
    metrics::gauge!(POOL_CONNECTIONS, "pool" => pool).set(f64::from(size));
    metrics::gauge!(POOL_IDLE, "pool" => pool).set(idle as f64);
}
