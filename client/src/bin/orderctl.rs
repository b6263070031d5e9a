//! orderctl: place, get, list and cancel orders, and check health, from a
//! terminal, with the same retry rules as `order_client`.
//!
//! Exit codes: 0 success, 2 bad usage, 3 the service refused the request
//! (e.g. `INVALID_ARGUMENT`, `FAILED_PRECONDITION`, `NOT_FOUND`), 4 the
//! service was unreachable or unavailable after every retry (nothing was
//! written), 5 `place` gave up with the outcome unknown: the order may
//! exist; run it again with the `--key` it prints to learn the outcome (it
//! is placed at most once).

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use order_client::{
    Answer, CallError, ClientConfig, ClientTls, OrderClient, RetryPolicy, TraceParent, bench,
    proto::{
        CancelOrderRequest, GetOrderRequest, ListOrdersRequest, Order, OrderStatus, OrderType,
        PlaceOrderRequest, Side, TimeInForce, get_order_request::Lookup,
    },
};
use serde_json::json;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Talk to an order-service.
#[derive(Debug, Parser)]
#[command(name = "orderctl", version)]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
struct Connection {
    /// Server address: HOST:PORT (as grpcurl takes it; TLS with --ca-cert or
    /// --cert), http://HOST:PORT, or https://HOST:PORT.
    #[arg(long, global = true, env = "ORDERCTL_ADDR", default_value = "127.0.0.1:50051")]
    addr: String,
    /// Bearer token (prefer the environment variable: arguments are visible to
    /// other users of the machine).
    #[arg(long, global = true, env = "ORDERCTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM CA that signed the server's certificate.
    #[arg(long, global = true, env = "ORDERCTL_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate, for mutual TLS (with --client-key).
    #[arg(long, global = true, env = "ORDERCTL_CERT", requires = "client_key")]
    cert: Option<PathBuf>,
    /// PEM key of --cert.
    #[arg(long, global = true, env = "ORDERCTL_CLIENT_KEY", requires = "cert")]
    client_key: Option<PathBuf>,
    /// Name to verify the server certificate against, if not the address's host.
    #[arg(long, global = true, env = "ORDERCTL_TLS_DOMAIN")]
    tls_domain: Option<String>,
    /// Print JSON instead of text (errors too, on stderr).
    #[arg(long, global = true, env = "ORDERCTL_JSON", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    json: bool,
    /// Give up after this long, every retry included.
    #[arg(long, global = true, env = "ORDERCTL_TIMEOUT", default_value = "20s",
          value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// W3C traceparent of the trace to continue (00-TRACE_ID-SPAN_ID-FLAGS);
    /// without it each command starts a sampled trace of its own. Its trace
    /// id is printed with --json, and on failure.
    /// (Without the flag, the TRACEPARENT environment variable; a malformed
    /// one there is ignored with a warning.)
    #[arg(long, global = true)]
    traceparent: Option<String>,
}

/// The trace to continue: none when `--traceparent` / `TRACEPARENT` is
/// unset or empty.
fn trace_parent(c: &Connection) -> Result<Option<TraceParent>, String> {
    let expected = "expected 00-<32 hex digits>-<16 hex digits>-<2 hex digits>";
    if let Some(value) = c.traceparent.as_deref().map(str::trim) {
        return TraceParent::parse(value)
            .map(Some)
            .ok_or_else(|| format!("invalid --traceparent {value:?}: {expected}"));
    }
    // Inherited from whatever started orderctl: a malformed one must not
    // stop every command.
    let inherited = std::env::var("TRACEPARENT").unwrap_or_default();
    match inherited.trim() {
        "" => Ok(None),
        value => Ok(TraceParent::parse(value).or_else(|| {
            eprintln!("warning: ignoring TRACEPARENT {value:?} ({expected})");
            None
        })),
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Place an order (exactly once: retries reuse its key).
    Place(Place),
    /// Show one order, by id or by the key that placed it.
    #[command(group(clap::ArgGroup::new("lookup").required(true).args(["id", "key"])))]
    Get {
        /// Order id.
        #[arg(long)]
        id: Option<String>,
        /// The client_request_id that placed it.
        #[arg(long)]
        key: Option<String>,
    },
    /// List your orders, newest first.
    List {
        /// Only this symbol.
        #[arg(long)]
        symbol: Option<String>,
        /// Only this status.
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// Orders per page.
        #[arg(long, default_value_t = 50)]
        page_size: i32,
        /// The next_page_token of the previous page.
        #[arg(long, default_value = "", conflicts_with = "all")]
        page_token: String,
        /// Every page, not just the first.
        #[arg(long)]
        all: bool,
    },
    /// Cancel an order (safe to repeat).
    Cancel {
        /// Order id.
        id: String,
    },
    /// Closed-loop load: N workers, one call in flight each, for a duration.
    Bench(Bench),
    /// Check the server's health.
    Health {
        /// Service name ("" for the whole server).
        #[arg(long, default_value = "orders.v1.OrderService")]
        service: String,
    },
    /// Print a shell completion script (source it from your shell's rc file).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
struct Bench {
    /// Workers, each with one call in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to measure.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Repeat orders placed before the clock starts (the replay path).
    #[arg(long, conflicts_with_all = ["noop", "duplicate_ratio"])]
    replay: bool,
    /// Share (0 to 1) of PlaceOrders that reuse one of the worker's recent keys.
    #[arg(long, default_value_t = 0.0)]
    duplicate_ratio: f64,
    /// Health Check instead of PlaceOrder: the floor cost of one call.
    #[arg(long)]
    noop: bool,
}

#[derive(Debug, Args)]
struct Place {
    /// Instrument, e.g. AAPL.
    #[arg(long)]
    symbol: String,
    /// buy or sell.
    #[arg(long, value_enum)]
    side: SideArg,
    /// limit (needs --price) or market.
    #[arg(long = "type", value_enum, default_value = "limit")]
    order_type: TypeArg,
    /// Quantity, e.g. 10 or 0.5.
    #[arg(long)]
    quantity: String,
    /// Limit price.
    #[arg(long)]
    price: Option<String>,
    /// Time in force.
    #[arg(long, value_enum, default_value = "gtc")]
    tif: TifArg,
    /// Idempotency key to use (reuse one on purpose to retry an earlier
    /// place); a fresh UUID if not given.
    #[arg(long)]
    key: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SideArg {
    Buy,
    Sell,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TypeArg {
    Limit,
    Market,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TifArg {
    Gtc,
    Ioc,
    Fok,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StatusArg {
    New,
    Canceled,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// `--addr` as a URI: `HOST:PORT` gets `http://` (`https://` when TLS
/// settings are given); anything that is not a host and port is a usage
/// error, found before any connection is tried.
fn endpoint_uri(addr: &str, tls: bool) -> Result<String, String> {
    let addr = addr.trim();
    // Credentials in the address (`user:secret@`) are refused, and never
    // repeated in the message.
    let shown = match addr.rsplit_once('@') {
        Some((before, host)) => match before.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://<credentials hidden>@{host}"),
            None => format!("<credentials hidden>@{host}"),
        },
        None => addr.to_owned(),
    };
    let usage = || format!("invalid --addr {shown:?}: expected HOST:PORT or http(s)://HOST:PORT");
    if addr.contains('@') || addr.contains('#') {
        return Err(usage());
    }
    if tls && addr.to_ascii_lowercase().starts_with("http://") {
        return Err(format!(
            "--addr {addr:?} is plain text, but --ca-cert or --cert asks for TLS: use https://"
        ));
    }
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("{}://{addr}", if tls { "https" } else { "http" })
    };
    let parsed: tonic::codegen::http::Uri = uri
        .parse()
        .map_err(|e| format!("invalid --addr {addr:?}: {e} (expected HOST:PORT or http(s)://HOST:PORT)"))?;
    let scheme_ok = matches!(parsed.scheme_str(), Some("http" | "https"));
    let host_ok = parsed.host().is_some_and(|h| !h.is_empty());
    let path_ok = matches!(parsed.path(), "" | "/") && parsed.query().is_none();
    if !scheme_ok || !host_ok || !path_ok || parsed.port_u16().is_none_or(|port| port == 0) {
        return Err(usage());
    }
    Ok(uri)
}

fn client_config(c: &Connection) -> Result<ClientConfig, String> {
    let wants_tls = c.ca_cert.is_some() || c.cert.is_some();
    let endpoint = endpoint_uri(&c.addr, wants_tls)?;
    let tls = if wants_tls || endpoint.starts_with("https://") {
        Some(ClientTls {
            ca_pem: c.ca_cert.as_ref().map(read).transpose()?,
            identity: match (&c.cert, &c.client_key) {
                (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
                _ => None,
            },
            domain: c.tls_domain.clone(),
        })
    } else {
        None
    };
    let quiet = c.json;
    // --timeout decides, not a count of attempts: retry until it is spent.
    let retry = RetryPolicy {
        total_timeout: c.timeout,
        attempt_timeout: RetryPolicy::default().attempt_timeout.min(c.timeout),
        max_attempts: u32::MAX,
        on_retry: Some(Arc::new(move |attempt, status| {
            if !quiet {
                eprintln!("attempt {attempt} failed ({:?}: {}); retrying", status.code(), status.message());
            }
        })),
        ..RetryPolicy::default()
    };
    Ok(ClientConfig {
        endpoint,
        token: c.token.clone(),
        tls,
        retry,
        trace_parent: trace_parent(c)?,
        start_traces: true,
    })
}

fn enum_name<E: std::fmt::Debug>(value: Result<E, prost::UnknownEnumValue>) -> String {
    value.map(|v| format!("{v:?}").to_uppercase()).unwrap_or_else(|_| "UNKNOWN".to_owned())
}

fn timestamp(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref().map(|t| t.to_string()).unwrap_or_default()
}

fn order_json(o: &Order) -> serde_json::Value {
    json!({
        "order_id": o.order_id,
        "client_request_id": o.client_request_id,
        "account_id": o.account_id,
        "symbol": o.symbol,
        "side": Side::try_from(o.side).map(|s| s.as_str_name()).unwrap_or("UNKNOWN"),
        "order_type": OrderType::try_from(o.order_type).map(|s| s.as_str_name()).unwrap_or("UNKNOWN"),
        "quantity": o.quantity,
        "limit_price": o.limit_price,
        "time_in_force": TimeInForce::try_from(o.time_in_force).map(|s| s.as_str_name()).unwrap_or("UNKNOWN"),
        "status": OrderStatus::try_from(o.status).map(|s| s.as_str_name()).unwrap_or("UNKNOWN"),
        "create_time": timestamp(&o.create_time),
        "update_time": timestamp(&o.update_time),
    })
}

fn order_text(o: &Order) -> String {
    let price = if o.limit_price.is_empty() { "market".to_owned() } else { format!("@ {}", o.limit_price) };
    format!(
        "{}  {} {} {} {} {}  {}  key {}  placed {}",
        o.order_id,
        enum_name(Side::try_from(o.side)).trim_start_matches("SIDE_").to_lowercase(),
        o.quantity,
        o.symbol,
        price,
        enum_name(TimeInForce::try_from(o.time_in_force)),
        enum_name(OrderStatus::try_from(o.status)),
        o.client_request_id,
        timestamp(&o.create_time),
    )
}

/// Prints a failure and picks the exit code.
fn failed(error: &CallError, json: bool) -> ExitCode {
    if json {
        let out = json!({
            "error": { "code": format!("{:?}", error.status.code()), "message": error.status.message() },
            "attempts": error.attempts,
            "client_request_id": error.client_request_id,
            "outcome_unknown": error.outcome_unknown,
            "trace_id": error.trace_id,
        });
        eprintln!("{out}");
    } else {
        eprintln!("error: {error}");
        if let Some(trace_id) = &error.trace_id {
            eprintln!("trace id: {trace_id}");
        }
        if let Some(key) = &error.client_request_id {
            if error.outcome_unknown {
                eprintln!(
                    "the outcome is unknown: the order may have been placed; run again with --key {key} \
                     to learn the outcome (it is placed at most once)"
                );
            } else if error.is_unreachable() {
                eprintln!("nothing was placed: retry with --key {key} to place it exactly once");
            }
        }
    }
    ExitCode::from(match () {
        () if error.outcome_unknown => 5,
        () if error.is_unreachable() => 4,
        () => 3,
    })
}

/// Writes one answer to stdout. A reader that went away (`| head`) ends
/// the command quietly; any other failure (a full disk) is reported on
/// stderr with `lost`: what must not be lost, such as a placed order's key.
fn emit(line: &str, lost: &str) -> ExitCode {
    use std::io::Write as _;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot print the answer ({e}){lost}");
            ExitCode::from(1)
        }
    }
}

fn print<T>(json: bool, answer: &Answer<T>, as_json: serde_json::Value, text: String) -> ExitCode {
    let lost = match &answer.client_request_id {
        Some(key) => format!("; the order is placed, with key {key}"),
        None => String::new(),
    };
    if json {
        let mut out = as_json;
        out["attempts"] = answer.attempts.into();
        if let Some(trace_id) = &answer.trace_id {
            out["trace_id"] = trace_id.as_str().into();
        }
        emit(&out.to_string(), &lost)
    } else {
        emit(&text, &lost)
    }
}

/// Prints one order (get, cancel), or the failure.
fn print_order(json: bool, result: Result<Answer<Order>, CallError>) -> ExitCode {
    match result {
        Ok(answer) => {
            print(json, &answer, json!({ "order": order_json(&answer.value) }), order_text(&answer.value))
        }
        Err(e) => failed(&e, json),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut command, "orderctl", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let config = match client_config(&cli.connection) {
        Ok(config) => config,
        Err(e) => {
            if cli.connection.json {
                eprintln!("{}", json!({ "error": { "code": "InvalidArgument", "message": e } }));
            } else {
                eprintln!("error: {e}");
            }
            return ExitCode::from(2);
        }
    };
    let json = cli.connection.json;
    if let Command::Health { service } = &cli.command {
        return health(&config, service, json).await;
    }
    if let Command::Bench(bench) = &cli.command {
        return run_bench(&cli.connection, bench).await;
    }
    let mut client = match OrderClient::new(config) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("error: {}", e.status.message());
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Place(p) => {
            let request = PlaceOrderRequest {
                client_request_id: p.key.unwrap_or_default(),
                symbol: p.symbol,
                side: match p.side {
                    SideArg::Buy => Side::Buy,
                    SideArg::Sell => Side::Sell,
                } as i32,
                order_type: match p.order_type {
                    TypeArg::Limit => OrderType::Limit,
                    TypeArg::Market => OrderType::Market,
                } as i32,
                quantity: p.quantity,
                limit_price: p.price.unwrap_or_default(),
                time_in_force: match p.tif {
                    TifArg::Gtc => TimeInForce::Gtc,
                    TifArg::Ioc => TimeInForce::Ioc,
                    TifArg::Fok => TimeInForce::Fok,
                } as i32,
            };
            match client.place_order(request).await {
                Ok(answer) => {
                    let order = answer.value.order.clone().unwrap_or_default();
                    let replayed = answer.value.replayed;
                    let mut value = json!({ "order": order_json(&order), "replayed": replayed });
                    value["client_request_id"] = answer.client_request_id.clone().into();
                    let note = if replayed { "  (replayed: placed earlier with this key)" } else { "" };
                    print(json, &answer, value, format!("{}{note}", order_text(&order)))
                }
                Err(e) => failed(&e, json),
            }
        }
        Command::Get { id, key } => {
            let lookup = match (id, key) {
                (Some(id), _) => Lookup::OrderId(id),
                (None, Some(key)) => Lookup::ClientRequestId(key),
                (None, None) => {
                    eprintln!("error: one of --id or --key is required");
                    return ExitCode::from(2);
                }
            };
            print_order(json, client.get_order(GetOrderRequest { lookup: Some(lookup) }).await)
        }
        Command::List { symbol, status, page_size, page_token, all } => {
            let request = ListOrdersRequest {
                page_size,
                page_token,
                symbol: symbol.unwrap_or_default(),
                status: match status {
                    None => OrderStatus::Unspecified,
                    Some(StatusArg::New) => OrderStatus::New,
                    Some(StatusArg::Canceled) => OrderStatus::Canceled,
                } as i32,
            };
            let listed = if all {
                list_all(&mut client, request, cli.connection.timeout).await
            } else {
                client.list_orders(request).await
            };
            match listed {
                Ok(answer) => {
                    let page = &answer.value;
                    let value = json!({
                        "orders": page.orders.iter().map(order_json).collect::<Vec<_>>(),
                        "next_page_token": page.next_page_token,
                    });
                    let mut text: Vec<String> = page.orders.iter().map(order_text).collect();
                    if text.is_empty() {
                        text.push("no orders".to_owned());
                    }
                    if !page.next_page_token.is_empty() {
                        text.push(format!("more: --page-token {}", page.next_page_token));
                    }
                    print(json, &answer, value, text.join("\n"));
                    ExitCode::SUCCESS
                }
                Err(e) => failed(&e, json),
            }
        }
        Command::Cancel { id } => {
            print_order(json, client.cancel_order(CancelOrderRequest { order_id: id }).await)
        }
        Command::Health { .. } | Command::Bench(_) | Command::Completions { .. } => {
            unreachable!("handled above")
        }
    }
}

/// Every page of a listing, as one page, within `timeout` for them all
/// (each page's retries included); the attempts are all the pages'.
async fn list_all(
    client: &mut OrderClient,
    mut request: ListOrdersRequest,
    timeout: Duration,
) -> Result<Answer<order_client::proto::ListOrdersResponse>, CallError> {
    let mut orders = Vec::new();
    let mut attempts = 0;
    let every_page = async {
        loop {
            let mut page = client.list_orders(request.clone()).await?;
            attempts += page.attempts;
            orders.append(&mut page.value.orders);
            if page.value.next_page_token.is_empty() {
                page.value.orders = std::mem::take(&mut orders);
                page.attempts = attempts;
                return Ok(page);
            }
            request.page_token = std::mem::take(&mut page.value.next_page_token);
        }
    };
    match tokio::time::timeout(timeout, every_page).await {
        Ok(listed) => listed,
        Err(_) => Err(CallError {
            status: tonic::Status::deadline_exceeded(format!(
                "not every page within {}",
                humantime::format_duration(timeout)
            )),
            attempts,
            client_request_id: None,
            outcome_unknown: false,
            trace_id: None,
        }),
    }
}

async fn health(config: &ClientConfig, service: &str, json: bool) -> ExitCode {
    let trace = config.trace_parent.clone().unwrap_or_else(|| TraceParent::start(true));
    let trace_id = Some(trace.trace_id_hex());
    let result = async {
        let channel =
            config.endpoint().map_err(|e| e.status)?.connect().await.map_err(|e| {
                tonic::Status::unavailable(format!("cannot connect to {}: {e}", config.endpoint))
            })?;
        let mut client = HealthClient::new(channel);
        let mut request = tonic::Request::new(HealthCheckRequest { service: service.to_owned() });
        if let Ok(header) = trace.to_string().parse() {
            request.metadata_mut().insert("traceparent", header);
        }
        client.check(request).await.map(|r| r.into_inner().status())
    };
    match tokio::time::timeout(config.retry.total_timeout, result).await {
        Ok(Ok(status)) => {
            let name = status.as_str_name();
            if json {
                emit(&json!({ "service": service, "status": name, "trace_id": trace_id }).to_string(), "");
            } else {
                emit(name, "");
                if name != "SERVING" {
                    eprintln!("error: {service:?} is {name}");
                }
            }
            if name == "SERVING" { ExitCode::SUCCESS } else { ExitCode::from(3) }
        }
        Ok(Err(status)) => {
            let error = CallError {
                status,
                attempts: 1,
                client_request_id: None,
                outcome_unknown: false,
                trace_id: trace_id.clone(),
            };
            failed(&error, json)
        }
        Err(_) => failed(
            &CallError {
                status: tonic::Status::deadline_exceeded(format!(
                    "no answer within {}",
                    humantime::format_duration(config.retry.total_timeout)
                )),
                attempts: 1,
                client_request_id: None,
                outcome_unknown: false,
                trace_id,
            },
            json,
        ),
    }
}

async fn run_bench(c: &Connection, b: &Bench) -> ExitCode {
    let mode = if b.noop {
        bench::Mode::Noop
    } else if b.replay {
        bench::Mode::Replay
    } else {
        bench::Mode::Place { duplicate_ratio: b.duplicate_ratio.clamp(0.0, 1.0) }
    };
    let endpoint = match endpoint_uri(&c.addr, false) {
        Ok(endpoint) => endpoint,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let config = bench::BenchConfig {
        endpoint,
        token: c.token.clone(),
        mode,
        concurrency: b.concurrency.max(1),
        duration: b.duration,
    };
    match bench::run(config).await {
        Ok(report) => {
            report.print(c.json);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(4)
        }
    }
}
