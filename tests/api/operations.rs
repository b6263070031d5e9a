//! What operators rely on: Prometheus metrics that move with each outcome,
//! and JSON logs that parse and never carry a secret.

use std::collections::HashMap;

use order_service::proto::{ListOrdersRequest, order_service_client::OrderServiceClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Request, codegen::http::uri::PathAndQuery};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    helpers::process::ServerProcess,
    helpers::{RawCodec, channel, limit_order, new_key},
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
    let (token, line) = order_service::api::new_token("checkout").unwrap();
    let tokens = db.path().join("tokens");
    std::fs::write(&tokens, format!("{line}\n")).unwrap();
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
    for field in ["method", "account_id", "client_request_id", "order_id", "outcome", "code", "latency_ms"] {
        assert!(span.get(field).is_some(), "no {field} in {placed}");
    }
    assert_eq!(span["method"], "PlaceOrder");
    assert_eq!(span["account_id"], "checkout");
    assert_eq!(span["code"], "OK");
}
