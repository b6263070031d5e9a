//! What operators rely on: Prometheus metrics that move with each outcome,
//! and JSON logs that parse and never carry a secret.

use std::collections::HashMap;

use order_service::proto::{ListOrdersRequest, order_service_client::OrderServiceClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Request, codegen::http::uri::PathAndQuery};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    helpers::process::ServerProcess,
    helpers::{RawCodec, channel, limit_order, new_key, tokens_file},
};

/// `GET /metrics` over a plain HTTP/1.1 connection; the body.
pub(crate) async fn scrape(addr: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_lowercase().contains("content-type: text/plain"), "{head}");
    body.to_owned()
}

/// Parses the Prometheus text format strictly enough to catch a broken
/// exposition: every sample is `name{labels} value`, every name declared by a
/// `# TYPE` line. Returns sample values by `name{labels}`.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut types = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line}");
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "{line}");
        }
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        assert!(types.contains_key(name) || types.contains_key(base), "undeclared metric: {line}");
        samples.insert(series.to_owned(), value);
    }
    samples
}

#[tokio::test]
async fn metrics_parse_and_outcome_counters_move_with_calls() {
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("orders.db").display());
    let mut server = ServerProcess::start(&["--database-url", &url, "--shutdown-delay", "0s"]).await;
    let metrics_addr = server.metrics_addr.clone().expect("the metrics endpoint is on");
    let mut client = OrderServiceClient::new(channel(server.addr).await);

    let key = new_key();
    client.place_order(limit_order(&key)).await.unwrap();
    client.place_order(limit_order(&key)).await.unwrap();
    let mut other = limit_order(&key);
    other.quantity = "11".into();
    assert_eq!(client.place_order(other).await.unwrap_err().code(), Code::FailedPrecondition);
    let mut bad = limit_order(&new_key());
    bad.symbol = "bad symbol".into();
    assert_eq!(client.place_order(bad).await.unwrap_err().code(), Code::InvalidArgument);
    client.list_orders(ListOrdersRequest::default()).await.unwrap();
    // Calls no order handler sees: a health check, a message that does not
    // decode, a method that does not exist.
    let mut health = HealthClient::new(channel(server.addr).await);
    health.check(HealthCheckRequest::default()).await.unwrap();
    let mut raw = tonic::client::Grpc::new(channel(server.addr).await);
    for (path, code) in [
        ("/orders.v1.OrderService/PlaceOrder", Code::InvalidArgument),
        ("/orders.v1.OrderService/Nonsense", Code::Unimplemented),
    ] {
        raw.ready().await.unwrap();
        let path = PathAndQuery::from_static(path);
        let status = raw.unary(Request::new(b"\xff\xff\xff".to_vec()), path, RawCodec).await.unwrap_err();
        assert_eq!(status.code(), code);
    }

    let body = scrape(&metrics_addr).await;
    let samples = parse_prometheus(&body);
    let get = |series: &str| samples.get(series).copied().unwrap_or_else(|| panic!("no {series} in\n{body}"));
    for (outcome, n) in [("created", 1.0), ("replayed", 1.0), ("key_reused", 1.0), ("invalid", 1.0)] {
        assert_eq!(get(&format!("orders_place_outcomes_total{{outcome=\"{outcome}\"}}")), n, "{outcome}");
    }
    let handled_by = |kind: &str, service: &str, method: &str, code: &str| {
        format!(
            "grpc_server_handled_total{{grpc_type=\"{kind}\",grpc_service=\"{service}\",\
             grpc_method=\"{method}\",grpc_code=\"{code}\"}}"
        )
    };
    let handled = |method: &str, code: &str| handled_by("unary", "orders.v1.OrderService", method, code);
    assert_eq!(get(&handled("PlaceOrder", "OK")), 2.0);
    assert_eq!(get(&handled("PlaceOrder", "FailedPrecondition")), 1.0);
    // The invalid symbol, and the message that did not decode.
    assert_eq!(get(&handled("PlaceOrder", "InvalidArgument")), 2.0);
    assert_eq!(get(&handled("ListOrders", "OK")), 1.0);
    assert_eq!(get(&handled_by("unary", "grpc.health.v1.Health", "Check", "OK")), 1.0);
    // A made-up method is counted without adding its name to the series.
    assert_eq!(get(&handled_by("unknown", "unknown", "unknown", "Unimplemented")), 1.0);
    assert!(!body.contains("Nonsense"), "{body}");
    assert!(body.contains("grpc_server_handling_seconds_bucket{"), "{body}");
    assert_eq!(get("orders_health_serving"), 1.0);
    assert!(body.contains("orders_db_pool_connections{pool=\"writer\"}"), "{body}");

    // And they keep moving.
    client.place_order(limit_order(&key)).await.unwrap();
    let samples = parse_prometheus(&scrape(&metrics_addr).await);
    assert_eq!(samples["orders_place_outcomes_total{outcome=\"replayed\"}"], 2.0);
    server.signal("TERM");
    assert!(server.child.wait().await.unwrap().success());
}

#[tokio::test]
async fn every_log_line_is_json_with_the_rpc_fields_and_no_secret() {
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("orders.db").display());
    let (token, tokens) = tokens_file(db.path(), "checkout");
    let mut server = ServerProcess::start(&[
        "--database-url",
        &url,
        "--auth-tokens-file",
        tokens.to_str().unwrap(),
        "--shutdown-delay",
        "0s",
    ])
    .await;
    let mut client = OrderServiceClient::new(channel(server.addr).await);
    let with = |token: &str| {
        let mut request = Request::new(limit_order(&new_key()));
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };
    client.place_order(with(&token)).await.unwrap();
    let wrong = format!("{token}x");
    assert_eq!(client.place_order(with(&wrong)).await.unwrap_err().code(), Code::Unauthenticated);
    server.signal("TERM");
    assert!(server.child.wait().await.unwrap().success());
    server.log("stopped").await;

    let lines = server.lines();
    assert!(lines.len() >= 5, "{lines:?}");
    for line in &lines {
        let event: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for field in ["timestamp", "level", "message"] {
            assert!(event.get(field).is_some(), "no {field}: {line}");
        }
        assert!(!line.contains(&token[4..]), "a token leaked: {line}");
        assert!(!line.to_lowercase().contains("bearer"), "a credential leaked: {line}");
        assert!(!line.to_lowercase().contains("authorization"), "a header leaked: {line}");
    }
    let placed = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["message"] == "finished" && e["span"]["outcome"] == "created")
        .expect("a finished PlaceOrder line");
    let span = &placed["span"];
    for field in
        ["rpc.method", "account_id", "client_request_id", "order_id", "outcome", "code", "latency_ms"]
    {
        assert!(span.get(field).is_some(), "no {field} in {placed}");
    }
    assert_eq!(span["rpc.method"], "PlaceOrder");
    assert_eq!(span["account_id"], "checkout");
    assert_eq!(span["code"], "OK");
}

/// The metrics are complete to the grpc-ecosystem conventions: every series
/// of every known method exists at zero before the first call; every
/// metric has `# HELP` and `# TYPE`; process and build metrics are there;
/// after a burst, started and handled calls and messages agree; and
/// `promtool check metrics` passes (scripts/test installs promtool).
#[tokio::test]
async fn metrics_start_at_zero_agree_after_a_burst_and_pass_promtool() {
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("orders.db").display());
    let server = ServerProcess::start(&["--database-url", &url]).await;
    let metrics_addr = server.metrics_addr.clone().expect("the metrics endpoint is on");
    let labels = r#"grpc_type="unary",grpc_service="orders.v1.OrderService",grpc_method="PlaceOrder""#;
    let series = |name: &str| format!("{name}{{{labels}}}");
    let ok = format!(r#"grpc_server_handled_total{{{labels},grpc_code="OK"}}"#);

    let before = scrape(&metrics_addr).await;
    let samples = parse_prometheus(&before);
    for name in ["grpc_server_started_total", "grpc_server_msg_received_total", "grpc_server_msg_sent_total"]
    {
        assert_eq!(samples.get(&series(name)), Some(&0.0), "{name} at zero before the first call:\n{before}");
    }
    assert_eq!(samples.get(&ok), Some(&0.0), "handled at zero before the first call");
    for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"] {
        assert!(samples.contains_key(name), "{name}");
    }
    let build = format!(r#"orders_build_info{{version="{}"}}"#, env!("CARGO_PKG_VERSION"));
    assert_eq!(samples.get(&build), Some(&1.0), "build info");
    let families: std::collections::BTreeSet<&str> = before
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    for family in &families {
        assert!(before.contains(&format!("# HELP {family} ")), "no # HELP for {family}");
    }

    let mut client = OrderServiceClient::new(channel(server.addr).await);
    for _ in 0..20 {
        client.place_order(limit_order(&new_key())).await.unwrap();
    }
    let after = parse_prometheus(&scrape(&metrics_addr).await);
    let handled: f64 = after
        .iter()
        .filter(|(name, _)| name.starts_with("grpc_server_handled_total{") && name.contains(labels))
        .map(|(_, value)| value)
        .sum();
    let started = after[&series("grpc_server_started_total")];
    assert_eq!((started, handled), (20.0, 20.0), "started and handled agree");
    assert_eq!(after[&series("grpc_server_msg_received_total")], 20.0, "one request message a call");
    assert_eq!(after[&series("grpc_server_msg_sent_total")], 20.0, "one response message a call");
    assert!(after.keys().any(|name| name.starts_with("orders_batch_size_count")), "batch sizes");

    let body = scrape(&metrics_addr).await;
    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test installs it)");
    promtool.stdin.take().unwrap().write_all(body.as_bytes()).await.unwrap();
    let out = promtool.wait_with_output().await.unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics:\n{said}");
}

/// Every metric the Grafana dashboard (`deploy/grafana/order-service.json`)
/// and the alert rules (the PrometheusRule component) name is one a running
/// server exports: scraped after a few orders, so that every histogram has
/// samples. promtool's rule tests cannot see a misspelt metric (they feed
/// the series the rules name); this can.
#[tokio::test]
async fn every_metric_the_dashboard_and_the_alert_rules_name_is_exported() {
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("orders.db").display());
    let server = ServerProcess::start(&["--database-url", &url]).await;
    let mut client = OrderServiceClient::new(channel(server.addr).await);
    for _ in 0..3 {
        client.place_order(limit_order(&new_key())).await.unwrap();
    }
    let body = scrape(server.metrics_addr.as_deref().expect("the metrics endpoint is on")).await;
    let families: std::collections::BTreeSet<&str> = body
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/order-service.json")).unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| target["expr"].as_str().expect("expr").to_owned())
        .collect();
    assert!(exprs.len() >= 10, "the dashboard's queries: {exprs:?}");
    let rules = std::fs::read_to_string(
        root.join("deploy/kubernetes/components/prometheus-rules/prometheusrule.yaml"),
    )
    .unwrap();
    exprs.extend(rules.lines().filter(|line| !line.trim_start().starts_with('#')).map(str::to_owned));
    let mut named = std::collections::BTreeSet::new();
    for expr in &exprs {
        let mut token = String::new();
        for c in expr.chars().chain([' ']) {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                token.push(c);
                continue;
            }
            let is_metric = ["grpc_server_", "orders_", "process_"].iter().any(|p| token.starts_with(p));
            // Label values and recording rules' names (with a colon) are not.
            if is_metric && !token.contains(':') && c != '"' && !expr[..].contains(&format!("\"{token}\"")) {
                named.insert(token.clone());
            }
            token.clear();
        }
    }
    assert!(named.len() >= 10, "metrics named: {named:?}");
    for metric in &named {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| metric.strip_suffix(suffix).filter(|base| families.contains(base)))
            .unwrap_or(metric);
        assert!(families.contains(family), "{metric} is named but not exported; exported: {families:?}");
    }
}
