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
    orderctl, place_concurrently, tokens_file,
};

/// The environment that turns traces on, exporting to `endpoint` quickly.
fn traced(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_SERVICE_NAME", "orders-under-test".to_owned()),
        // OTEL_SERVICE_NAME wins over a service.name here.
        ("OTEL_RESOURCE_ATTRIBUTES", "service.name=not-this,deployment.environment=test".to_owned()),
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
/// before any handler ran (a wrong token) is traced too, with its code,
/// in a trace of its own (its `traceparent` is not followed).
async fn a_traced_place_order_continues_the_callers_trace_to_the_database(engine: Engine) {
    let db = TestDatabase::new(engine).await;
    let dir = tempfile::tempdir().unwrap();
    let (token, tokens) = tokens_file(dir.path(), "checkout");
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
    // scripts/test runs each engine's suite once more with group commit off
    // (ORDERS_SQLITE_MAX_BATCH=1 or ORDERS_PG_MAX_BATCH=1, which the server
    // inherits): no batch then.
    let batch_flag = match engine {
        Engine::Sqlite => "ORDERS_SQLITE_MAX_BATCH",
        Engine::Postgres => "ORDERS_PG_MAX_BATCH",
    };
    let batched = std::env::var(batch_flag).as_deref() != Ok("1");
    let batch_name = format!("group_commit {system}");
    let spans = collector
        .until("the PlaceOrder's server, database (and batch) spans, and the refused call's", |spans| {
            let placed = of_trace(spans, TRACE_ID);
            let complete = named(&placed, "orders.v1.OrderService/PlaceOrder").is_some()
                && named(&placed, &db_name).is_some()
                && (!batched || named(&placed, &batch_name).is_some());
            let refused_span = spans.iter().any(|s| {
                s.span.name == "orders.v1.OrderService/PlaceOrder"
                    && s.attr("rpc.grpc.status_code").as_deref() == Some("16")
            });
            complete && refused_span
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
    if batched {
        let batch = named(&placed_spans, &batch_name).unwrap();
        assert_eq!(batch.parent_span_id(), db_span.span_id(), "the sampled caller's trace holds its batch");
        assert!(batch.links().contains(&db_span.span_id()), "the batch links to its callers: {batch:#?}");
        assert!(db_span.links().contains(&batch.span_id()), "the caller links to its batch: {db_span:#?}");
        assert_eq!(batch.attr("db.operation.batch.size"), None, "not set on a batch of one");
    }

    // The refused call is traced with its code, but in a trace of its own:
    // a caller who never authenticated cannot choose its sampling
    // (floods::refused_calls_never_choose_their_sampling).
    assert!(of_trace(&spans, refused_trace).is_empty(), "the refused call's traceparent is not followed");
    let refused = spans
        .iter()
        .find(|s| {
            s.span.name == "orders.v1.OrderService/PlaceOrder"
                && s.attr("rpc.grpc.status_code").as_deref() == Some("16")
        })
        .expect("the refused call's server span");
    assert_ne!(refused.parent_span_id(), "b7ad6b7169203331");

    let secret = &token[4..];
    for span in &spans {
        let text = format!("{:?}", span.span);
        assert!(!text.contains(secret), "a token in a span: {text}");
        assert!(!text.to_lowercase().contains("bearer"), "a credential in a span: {text}");
    }

    server.signal("TERM");
    assert!(server.child.wait().await.unwrap().success());
    for line in server.lines() {
        assert!(serde_json::from_str::<serde_json::Value>(&line).is_ok(), "not a JSON log line: {line}");
    }
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

    // health continues it too; an empty TRACEPARENT is no TRACEPARENT.
    let health_trace = "0af7651916cd43dd8448eb211c80319c";
    let out = tokio::process::Command::new(orderctl())
        .args(["--addr", &format!("http://{}", server.addr), "--json", "health"])
        .env("TRACEPARENT", format!("00-{health_trace}-{CALLER_SPAN}-01"))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["trace_id"], health_trace);
    let spans = collector
        .until("the health check's server span", |spans| !of_trace(spans, health_trace).is_empty())
        .await;
    let check = named(&of_trace(&spans, health_trace), "grpc.health.v1.Health/Check").expect("a Check span");
    assert_eq!(check.parent_span_id(), CALLER_SPAN);
    let out = tokio::process::Command::new(orderctl())
        .args(["--addr", &format!("http://{}", server.addr), "health"])
        .env("TRACEPARENT", "")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "an empty TRACEPARENT: {}", String::from_utf8_lossy(&out.stderr));
    collector.stop().await;
}

/// Places `n` orders, 16 at a time, each with a 10 s deadline; every one
/// must succeed.
async fn place_many(server: &ServerProcess, n: usize) {
    place_concurrently(server.addr, n, 16, |_| {
        let mut request = Request::new(limit_order(&new_key()));
        request.set_timeout(Duration::from_secs(10));
        request
    })
    .await;
}

/// Waits (bounded) until the server has counted dropped spans for `reason`.
async fn until_spans_dropped(server: &ServerProcess, reason: &str) -> f64 {
    server.until_metric(&format!("orders_trace_spans_dropped_total{{reason=\"{reason}\"}}"), 1.0).await
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

/// A place order tagged by its key, with `headers` added to its metadata.
async fn place_with(server: &ServerProcess, headers: &[(&'static str, &str)]) -> String {
    let mut client = OrderServiceClient::new(channel(server.addr).await);
    let key = new_key();
    let mut request = Request::new(limit_order(&key));
    for (name, value) in headers {
        request.metadata_mut().append(*name, value.parse().unwrap());
    }
    client.place_order(request).await.unwrap();
    key
}

/// Callers that asked not to be sampled get nothing exported, their
/// group-commit batches included; a malformed or repeated `traceparent`
/// starts a new trace rather than being guessed at (short ids padded into
/// someone else's trace); `tracestate` headers are joined, and one over
/// 512 bytes is dropped.
#[tokio::test]
async fn unsampled_callers_export_nothing_and_malformed_trace_headers_start_new_traces() {
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("orders.db").display());
    let mut collector = Collector::start().await;
    let env = traced(&collector.endpoint());
    let server = ServerProcess::start_with_env(&env_refs(&env), &["--database-url", &url]).await;

    place_concurrently(server.addr, 40, 40, |i| {
        let mut request = Request::new(limit_order(&new_key()));
        let traceparent = format!("00-{:032x}-{:016x}-00", 0xabc0_0000 + i, 0xdef0 + i);
        request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
        request
    })
    .await;
    let sampled = place_with(&server, &[("traceparent", &format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))]).await;
    let spans = collector
        .until("the sampled call's server span", |spans| {
            spans.iter().any(|s| s.attr("client_request_id").as_deref() == Some(sampled.as_str()))
        })
        .await;
    for span in &spans {
        assert_eq!(span.trace_id(), TRACE_ID, "only the sampled call's trace is exported: {span:#?}");
    }

    let malformed = [
        "00-abc-def-01",
        "00-1-1-01",
        "00-+1-+1-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-001",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
    ];
    let mut keys = Vec::new();
    for traceparent in malformed {
        keys.push((traceparent.to_owned(), place_with(&server, &[("traceparent", traceparent)]).await));
    }
    let two = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let repeated = [("traceparent", two.as_str()), ("traceparent", two.as_str())];
    keys.push(("two traceparent headers".to_owned(), place_with(&server, &repeated).await));
    let valid = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let joined =
        place_with(&server, &[("traceparent", &valid), ("tracestate", "a=1"), ("tracestate", "b=2")]).await;
    let long_state = format!("a={}", "x".repeat(600));
    let dropped = place_with(&server, &[("traceparent", &valid), ("tracestate", &long_state)]).await;

    let server_span_of = |spans: &[Exported], key: &str| {
        spans.iter().find(|s| s.attr("client_request_id").as_deref() == Some(key)).cloned()
    };
    let all =
        [keys.iter().map(|(_, k)| k.clone()).collect::<Vec<_>>(), vec![joined.clone(), dropped.clone()]]
            .concat();
    let spans = collector
        .until("the server span of every call with odd trace headers", |spans| {
            all.iter().all(|key| server_span_of(spans, key).is_some())
        })
        .await;
    for (traceparent, key) in &keys {
        let span = server_span_of(&spans, key).unwrap();
        assert_eq!(span.parent_span_id(), "", "{traceparent} must start a new trace: {span:#?}");
        assert!(
            !span.trace_id().starts_with("00000000") && span.trace_id() != TRACE_ID,
            "{traceparent} must start a new trace: {span:#?}"
        );
    }
    let span = server_span_of(&spans, &joined).unwrap();
    assert_eq!(span.span.trace_state, "a=1,b=2");
    let span = server_span_of(&spans, &dropped).unwrap();
    assert_eq!(span.span.trace_state, "", "a tracestate over 512 bytes is dropped");
    assert_eq!(span.trace_id(), TRACE_ID, "its traceparent still counts");
    collector.stop().await;
}

/// A group commit's span links to every call it wrote, however large the
/// batch (the SDK's default cuts links at 128): 150 calls queue behind a
/// write lock held from outside, then ride in one or two batches.
#[tokio::test]
async fn a_large_group_commit_links_to_every_call() {
    let db = tempfile::tempdir().unwrap();
    let path = db.path().join("orders.db");
    let url = format!("sqlite://{}", path.display());
    let mut collector = Collector::start().await;
    let env = traced(&collector.endpoint());
    let server =
        ServerProcess::start_with_env(&env_refs(&env), &["--database-url", &url, "--lock-timeout", "30s"])
            .await;
    place_with(&server, &[]).await; // the tables exist
    let mut lock = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url).await.unwrap();
    sqlx::raw_sql("begin exclusive").execute(&mut lock).await.unwrap();

    let n = 150;
    let calls = tokio::spawn(place_concurrently(server.addr, n, n, |_| {
        let mut request = Request::new(limit_order(&new_key()));
        request.set_timeout(Duration::from_secs(60));
        request
    }));
    let started = r#"grpc_server_started_total{grpc_type="unary",grpc_service="orders.v1.OrderService",grpc_method="PlaceOrder"}"#;
    server.until_metric(started, (n + 1) as f64).await;
    sqlx::raw_sql("rollback").execute(&mut lock).await.unwrap();
    calls.await.unwrap();
    let batch_size =
        |s: &Exported| s.attr("db.operation.batch.size").map_or(1, |n| n.parse::<usize>().unwrap());
    let spans = collector
        .until("group-commit spans covering every call", |spans| {
            let batches = spans.iter().filter(|s| s.span.name == "group_commit sqlite");
            batches.map(batch_size).sum::<usize>() > n
        })
        .await;
    let batches: Vec<_> = spans.iter().filter(|s| s.span.name == "group_commit sqlite").collect();
    for batch in &batches {
        assert_eq!(batch.span.links.len(), batch_size(batch), "a link per call: {batch:#?}");
        assert_eq!(batch.span.dropped_links_count, 0);
    }
    let largest = batches.iter().map(|b| batch_size(b)).max().unwrap();
    assert!(largest > 128, "the calls queued behind the lock rode together: largest batch {largest}");
    collector.stop().await;
}

/// Trace settings that cannot work fail the start with one line naming
/// the variable (and never a collector's password), as a bad flag does.
#[tokio::test]
async fn bad_trace_settings_fail_the_start_with_one_line() {
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("orders.db").display());
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317");
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "not-a-url")],
        vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://collector:4317")],
        vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "http://user:s3cretpw@127.0.0.1:99999")],
        vec![endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")],
        vec![endpoint, ("OTEL_TRACES_EXPORTER", "zipkin")],
        vec![endpoint, ("OTEL_TRACES_SAMPLER", "garbage")],
        vec![endpoint, ("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "5")],
        vec![endpoint, ("OTEL_EXPORTER_OTLP_TIMEOUT", "abc")],
        vec![endpoint, ("OTEL_EXPORTER_OTLP_TIMEOUT", "0")],
        vec![endpoint, ("OTEL_BSP_MAX_QUEUE_SIZE", "99999999999999")],
    ];
    for env in cases {
        let out = tokio::process::Command::new(crate::helpers::BIN)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "", "--database-url", &url])
            .envs(env.iter().copied())
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{env:?}: one line: {stderr}");
        let (name, _) = env.last().unwrap();
        assert!(stderr.contains(name), "{env:?}: names the variable: {stderr}");
        assert!(!stderr.contains("s3cretpw"), "{env:?}: a password leaked: {stderr}");
    }
}
