//! OpenTelemetry traces, as a collector receives them: the server span of
//! each RPC in its caller's trace, the database span under it (and on
//! SQLite the group-commit batch it rode in), the trace ids in the JSON
//! logs, `orderctl` starting or continuing a trace; and a collector that is
//! down or silent never failing or holding a call.

use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use order_service::proto::order_service_client::OrderServiceClient;
use tonic::{Code, Request};

use crate::helpers::{
    Collector, Engine, Exported, ServerProcess, TestDatabase, channel, engine_tests, limit_order, new_key,
    orderctl,
};

/// The environment that turns traces on, exporting to `endpoint` quickly.
fn traced(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_SERVICE_NAME", "orders-under-test".to_owned()),
        ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test".to_owned()),
        ("OTEL_TRACES_SAMPLER", "parentbased_always_on".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "20".to_owned()),
    ]
}

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The spans of `trace_id`.
fn of_trace<'a>(spans: &'a [Exported], trace_id: &str) -> Vec<&'a Exported> {
    spans.iter().filter(|s| s.trace_id() == trace_id).collect()
}

fn named<'a>(spans: &[&'a Exported], name: &str) -> Option<&'a Exported> {
    spans.iter().copied().find(|s| s.span.name == name)
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// A PlaceOrder whose caller sent a `traceparent` is exported as a server
/// span in the caller's trace, the caller's span its parent, named and
/// attributed per the RPC conventions with the account, key, order and
/// outcome (never the token); the database span is its child, and on
/// SQLite the batch span links to it (and it to the batch). The call's
/// JSON log line carries the same trace and span ids. A call refused
/// before any handler ran (a wrong token) is traced too, with its code.
async fn a_traced_place_order_continues_the_callers_trace_to_the_database(engine: Engine) {
    let db = TestDatabase::new(engine).await;
    let dir = tempfile::tempdir().unwrap();
    let (token, line) = order_service::api::new_token("checkout").unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{line}\n")).unwrap();
    let mut collector = Collector::start().await;
    let env = traced(&collector.endpoint());
    let mut server = ServerProcess::start_with_env(
        &env_refs(&env),
        &[
            "--database-url",
            &db.url,
            "--auth-tokens-file",
            tokens.to_str().unwrap(),
            "--shutdown-delay",
            "0s",
        ],
    )
    .await;
    let mut client = OrderServiceClient::new(channel(server.addr).await);
    let key = new_key();
    let mut request = Request::new(limit_order(&key));
    let metadata = request.metadata_mut();
    metadata.insert("authorization", format!("Bearer {token}").parse().unwrap());
    metadata.insert("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01").parse().unwrap());
    metadata.insert("tracestate", "vendor=opaque".parse().unwrap());
    let placed = client.place_order(request).await.unwrap().into_inner();
    let order_id = placed.order.unwrap().order_id;

    let refused_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut refused = Request::new(limit_order(&new_key()));
    refused.metadata_mut().insert("authorization", format!("Bearer {token}x").parse().unwrap());
    refused
        .metadata_mut()
        .insert("traceparent", format!("00-{refused_trace}-b7ad6b7169203331-01").parse().unwrap());
    assert_eq!(client.place_order(refused).await.unwrap_err().code(), Code::Unauthenticated);

    let system = match engine {
        Engine::Sqlite => "sqlite",
        Engine::Postgres => "postgresql",
    };
    let db_name = format!("place_order {system}");
    let spans = collector
        .until("the PlaceOrder's server, database (and batch) spans, and the refused call's", |spans| {
            let placed = of_trace(spans, TRACE_ID);
            let complete = named(&placed, "orders.v1.OrderService/PlaceOrder").is_some()
                && named(&placed, &db_name).is_some()
                && (engine == Engine::Postgres || named(&placed, "group_commit sqlite").is_some());
            complete && !of_trace(spans, refused_trace).is_empty()
        })
        .await;
    let placed_spans = of_trace(&spans, TRACE_ID);
    let server_span = named(&placed_spans, "orders.v1.OrderService/PlaceOrder").unwrap();
    assert_eq!(server_span.span.kind, SpanKind::Server as i32);
    assert_eq!(server_span.parent_span_id(), CALLER_SPAN, "the caller's span is the parent");
    for (key_name, value) in [
        ("rpc.system", "grpc"),
        ("rpc.service", "orders.v1.OrderService"),
        ("rpc.method", "PlaceOrder"),
        ("rpc.grpc.status_code", "0"),
        ("account_id", "checkout"),
        ("client_request_id", key.as_str()),
        ("order_id", order_id.as_str()),
        ("outcome", "created"),
    ] {
        assert_eq!(server_span.attr(key_name).as_deref(), Some(value), "{key_name} of {server_span:#?}");
    }
    assert_eq!(server_span.resource_attr("service.name").as_deref(), Some("orders-under-test"));
    assert_eq!(server_span.resource_attr("deployment.environment").as_deref(), Some("test"));
    assert!(server_span.resource_attr("service.version").is_some());

    let db_span = named(&placed_spans, &db_name).unwrap();
    assert_eq!(
        db_span.parent_span_id(),
        server_span.span_id(),
        "the database span is the server span's child"
    );
    assert_eq!(db_span.span.kind, SpanKind::Client as i32);
    assert_eq!(db_span.attr("db.system.name").as_deref(), Some(system));
    if engine == Engine::Sqlite {
        let batch = named(&placed_spans, "group_commit sqlite").unwrap();
        assert_eq!(batch.parent_span_id(), db_span.span_id(), "the sampled caller's trace holds its batch");
        assert!(batch.links().contains(&db_span.span_id()), "the batch links to its callers: {batch:#?}");
        assert!(db_span.links().contains(&batch.span_id()), "the caller links to its batch: {db_span:#?}");
        assert_eq!(batch.attr("db.operation.batch.size").as_deref(), Some("1"));
    }

    let refused = of_trace(&spans, refused_trace);
    let refused =
        named(&refused, "orders.v1.OrderService/PlaceOrder").expect("the refused call's server span");
    assert_eq!(refused.attr("rpc.grpc.status_code").as_deref(), Some("16"));
    assert_eq!(refused.parent_span_id(), "b7ad6b7169203331");

    let secret = &token[4..];
    for span in &spans {
        let text = format!("{:?}", span.span);
        assert!(!text.contains(secret), "a token in a span: {text}");
        assert!(!text.to_lowercase().contains("bearer"), "a credential in a span: {text}");
    }

    server.signal("TERM");
    assert!(server.child.wait().await.unwrap().success());
    let finished = server
        .lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["message"] == "finished" && e["span"]["client_request_id"] == key.as_str())
        .expect("the PlaceOrder's finished line");
    assert_eq!(finished["trace_id"], TRACE_ID, "{finished}");
    assert_eq!(finished["span_id"], server_span.span_id().as_str(), "{finished}");
    assert_eq!(finished["span"]["rpc.method"], "PlaceOrder", "{finished}");
    collector.stop().await;
}

/// `orderctl place` starts a trace of its own (its id in the JSON output)
/// that the collector gets down to the database span; with `TRACEPARENT`
/// set it continues that trace instead.
#[tokio::test]
async fn orderctl_starts_a_trace_or_continues_traceparent() {
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("orders.db").display());
    let mut collector = Collector::start().await;
    let env = traced(&collector.endpoint());
    let server = ServerProcess::start_with_env(&env_refs(&env), &["--database-url", &url]).await;
    let place = async |traceparent: Option<&str>| {
        let mut command = tokio::process::Command::new(orderctl());
        command.args(["--addr", &format!("http://{}", server.addr), "--json"]);
        command.args(["place", "--symbol", "AAPL", "--side", "buy", "--quantity", "10", "--price", "187.50"]);
        command.env_remove("TRACEPARENT");
        if let Some(traceparent) = traceparent {
            command.env("TRACEPARENT", traceparent);
        }
        let out = command.output().await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };

    let started = place(None).await;
    let trace_id = started["trace_id"].as_str().expect("a trace id in the JSON output").to_owned();
    assert_eq!(trace_id.len(), 32);
    let spans = collector
        .until("orderctl's trace down to the database span", |spans| {
            let trace = of_trace(spans, &trace_id);
            named(&trace, "orders.v1.OrderService/PlaceOrder").is_some()
                && named(&trace, "place_order sqlite").is_some()
        })
        .await;
    let trace = of_trace(&spans, &trace_id);
    let server_span = named(&trace, "orders.v1.OrderService/PlaceOrder").unwrap();
    assert_eq!(server_span.parent_span_id().len(), 16, "orderctl's span is the parent");
    assert_eq!(
        server_span.attr("client_request_id").as_deref(),
        started["order"]["client_request_id"].as_str()
    );
    assert_eq!(named(&trace, "place_order sqlite").unwrap().parent_span_id(), server_span.span_id());

    let continued = place(Some(&format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))).await;
    assert_eq!(continued["trace_id"], TRACE_ID);
    let spans = collector
        .until("the continued trace's server span", |spans| {
            named(&of_trace(spans, TRACE_ID), "orders.v1.OrderService/PlaceOrder").is_some()
        })
        .await;
    let server_span = named(&of_trace(&spans, TRACE_ID), "orders.v1.OrderService/PlaceOrder").unwrap();
    assert_eq!(server_span.parent_span_id(), CALLER_SPAN);
    collector.stop().await;
}

/// Places `n` orders, 16 at a time; every one must succeed.
async fn place_many(server: &ServerProcess, n: usize) {
    let client = OrderServiceClient::new(channel(server.addr).await);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut client = client.clone();
        if calls.len() >= 16 {
            calls.join_next().await.unwrap().unwrap();
        }
        calls.spawn(async move {
            let mut request = Request::new(limit_order(&new_key()));
            request.set_timeout(Duration::from_secs(10));
            client.place_order(request).await.unwrap_or_else(|e| panic!("call {i}: {e:?}"));
        });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }
}

/// Waits (bounded) until the server has counted dropped spans for `reason`.
async fn until_spans_dropped(server: &ServerProcess, reason: &str) -> f64 {
    let sample = format!("orders_trace_spans_dropped_total{{reason=\"{reason}\"}}");
    for _ in 0..500 {
        let dropped = server.metric(&sample).await;
        if dropped > 0.0 {
            return dropped;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no span was counted as dropped for {reason}");
}

/// With the collector stopped (connections refused), or silent (accepts
/// and never answers), every call still succeeds; the spans that cannot go
/// are dropped and counted, and the server still stops promptly.
#[tokio::test]
async fn a_collector_that_is_down_or_silent_never_fails_or_holds_a_call() {
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("orders.db").display());

    // Down: a collector that took spans, then stopped.
    let mut collector = Collector::start().await;
    let env = traced(&collector.endpoint());
    let mut server =
        ServerProcess::start_with_env(&env_refs(&env), &["--database-url", &url, "--shutdown-delay", "0s"])
            .await;
    place_many(&server, 1).await;
    collector.until("a span before the collector stops", |spans| !spans.is_empty()).await;
    collector.stop().await;
    place_many(&server, 200).await;
    until_spans_dropped(&server, "export_failed").await;
    let warned = server.log("exporting traces failed").await;
    assert_eq!(warned["level"], "WARN", "{warned}");
    server.signal("TERM");
    assert!(server.child.wait().await.unwrap().success());

    // Silent: the port accepts (the kernel's backlog) and nothing answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut env = traced(&format!("http://{}", silent.local_addr().unwrap()));
    env.extend([
        ("OTEL_BSP_MAX_QUEUE_SIZE", "8".to_owned()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "120000".to_owned()),
        ("OTEL_BSP_EXPORT_TIMEOUT", "120000".to_owned()),
    ]);
    let url = format!("sqlite://{}", db.path().join("silent.db").display());
    let mut server =
        ServerProcess::start_with_env(&env_refs(&env), &["--database-url", &url, "--shutdown-delay", "0s"])
            .await;
    place_many(&server, 200).await;
    let dropped = until_spans_dropped(&server, "queue_full").await;
    assert!(
        dropped >= 200.0,
        "at most 16 of 400 spans fit the queue and the stuck export; {dropped} dropped"
    );
    // At exit the queue gets a bounded grace (5 s), not the export timeout.
    server.signal("TERM");
    let exited = tokio::time::timeout(Duration::from_secs(60), server.child.wait()).await;
    assert!(exited.expect("the server exits despite the silent collector").unwrap().success());
    drop(silent);
}

engine_tests!(a_traced_place_order_continues_the_callers_trace_to_the_database);
