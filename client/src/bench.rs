//! `orderctl bench`: a closed-loop load generator. Each of `concurrency`
//! workers sends one call, waits for the answer, and sends the next, until
//! the duration is up; latencies go into an HDR histogram.
//!
//! Modes: fresh keys (every call a new order), `duplicate_ratio` (that share
//! of calls reuses one of the worker's recent keys), `replay` (every call
//! repeats an order placed before the clock starts), and `noop` (health
//! Check: the floor cost of one call). The loop itself is [`drive`], over
//! any [`Caller`]: the service over gRPC here ([`run`]), the service's own
//! store without gRPC in the server's `order-service bench-store`.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    code_name,
    proto::{self, PlaceOrderRequest, order_service_client::OrderServiceClient},
};

/// One worker's way of making a call.
pub trait Caller: Send + 'static {
    /// Makes one call with `key`; a failure is named by its code.
    fn call(&mut self, key: uuid::Uuid) -> impl Future<Output = Result<(), String>> + Send;
}

/// Which calls to make.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// PlaceOrder with fresh keys; `duplicate_ratio` of them reuse a recent key.
    Place {
        /// Share (0..1) of calls that reuse one of the worker's recent keys.
        duplicate_ratio: f64,
    },
    /// PlaceOrder repeating orders placed before the clock starts.
    Replay,
    /// Health Check.
    Noop,
}

/// A benchmark run against the service.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The service's endpoint (`http://host:port`).
    pub endpoint: String,
    /// Bearer token, if the server wants one.
    pub token: Option<String>,
    /// Which calls.
    pub mode: Mode,
    /// Workers, each with one call in flight.
    pub concurrency: usize,
    /// How long to measure.
    pub duration: Duration,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// Calls that succeeded.
    pub ops: u64,
    /// Successful calls per second.
    pub ops_per_sec: f64,
    /// Latency percentiles of successful calls, in milliseconds.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Failed calls by status code.
    pub errors: BTreeMap<String, u64>,
}

impl BenchReport {
    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ops": self.ops,
            "ops_per_sec": (self.ops_per_sec * 10.0).round() / 10.0,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "errors": self.errors,
        })
    }
}

impl BenchReport {
    /// Prints the report to stdout: one JSON object, or one line of text.
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", self.to_json());
        } else {
            println!("{self}");
        }
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ops {}  ops/s {:.0}  p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms  errors {:?}",
            self.ops, self.ops_per_sec, self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms, self.errors
        )
    }
}

struct Worker {
    latencies: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

impl Worker {
    fn new() -> Self {
        // Microseconds up to 100 s, 3 significant digits: cannot fail.
        let latencies = Histogram::new_with_bounds(1, 100_000_000, 3).unwrap_or_else(|_| unreachable!());
        Self { latencies, errors: BTreeMap::new() }
    }

    fn record(&mut self, started: Instant, result: Result<(), String>) {
        match result {
            Ok(()) => {
                let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
                let _ = self.latencies.record(micros);
            }
            Err(code) => *self.errors.entry(code).or_default() += 1,
        }
    }
}

fn order_request(key: &str) -> PlaceOrderRequest {
    PlaceOrderRequest {
        client_request_id: key.to_owned(),
        symbol: "BENCH".to_owned(),
        side: proto::Side::Buy as i32,
        order_type: proto::OrderType::Limit as i32,
        quantity: "10".to_owned(),
        limit_price: "100.25".to_owned(),
        time_in_force: proto::TimeInForce::Gtc as i32,
    }
}

/// A fair coin weighted `p`.
fn chance(p: f64) -> bool {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    ((u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64) < p
}

/// A worker's gRPC clients (one connection of a few shared by all).
struct Service {
    orders: OrderServiceClient<Channel>,
    health: HealthClient<Channel>,
    token: Option<String>,
    mode: Mode,
}

impl Caller for Service {
    async fn call(&mut self, key: uuid::Uuid) -> Result<(), String> {
        let result = if self.mode == Mode::Noop {
            self.health.check(HealthCheckRequest { service: String::new() }).await.map(drop)
        } else {
            let mut request = tonic::Request::new(order_request(&key.to_string()));
            if let Some(token) = &self.token
                && let Ok(value) = format!("Bearer {token}").parse()
            {
                request.metadata_mut().insert("authorization", value);
            }
            self.orders.place_order(request).await.map(drop)
        };
        result.map_err(|status| code_name(status.code()).to_owned())
    }
}

/// Runs the benchmark against the service and reports.
pub async fn run(config: BenchConfig) -> anyhow::Result<BenchReport> {
    let endpoint = Endpoint::from_shared(config.endpoint.clone())?.tcp_nodelay(true);
    // A few connections shared by the workers, as a pool of clients would.
    let connections = config.concurrency.clamp(1, 8);
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(endpoint.connect().await?);
    }
    let callers = (0..config.concurrency)
        .map(|i| {
            let channel = channels[i % connections].clone();
            Service {
                orders: OrderServiceClient::new(channel.clone()),
                health: HealthClient::new(channel),
                token: config.token.clone(),
                mode: config.mode,
            }
        })
        .collect();
    drive(callers, config.mode, config.duration).await
}

/// Runs one worker per caller for `duration` (after each has made its
/// first call, in replay mode) and reports what they measured together.
pub async fn drive<C: Caller>(
    callers: Vec<C>,
    mode: Mode,
    duration: Duration,
) -> anyhow::Result<BenchReport> {
    let start = Arc::new(tokio::sync::Barrier::new(callers.len() + 1));
    let mut tasks = Vec::new();
    for mut caller in callers {
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let mut worker = Worker::new();
            let mut recent: Vec<uuid::Uuid> = Vec::new();
            let fixed = uuid::Uuid::new_v4();
            if mode == Mode::Replay {
                let _ = caller.call(fixed).await;
            }
            start.wait().await;
            let deadline = Instant::now() + duration;
            while Instant::now() < deadline {
                let key = match mode {
                    Mode::Replay => fixed,
                    Mode::Place { duplicate_ratio } if !recent.is_empty() && chance(duplicate_ratio) => {
                        recent[recent.len() - 1]
                    }
                    _ => uuid::Uuid::new_v4(),
                };
                let started = Instant::now();
                let result = caller.call(key).await;
                worker.record(started, result);
                if matches!(mode, Mode::Place { .. }) {
                    recent.push(key);
                    if recent.len() > 16 {
                        recent.remove(0);
                    }
                }
            }
            worker
        }));
    }
    start.wait().await;
    let began = Instant::now();
    let mut total = Worker::new();
    for task in tasks {
        let worker = task.await?;
        total.latencies.add(&worker.latencies)?;
        for (code, n) in worker.errors {
            *total.errors.entry(code).or_default() += n;
        }
    }
    let elapsed = began.elapsed().as_secs_f64();
    let ms = |q: f64| total.latencies.value_at_quantile(q) as f64 / 1000.0;
    Ok(BenchReport {
        ops: total.latencies.len(),
        ops_per_sec: total.latencies.len() as f64 / elapsed,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: total.latencies.max() as f64 / 1000.0,
        errors: total.errors,
    })
}
