//! The retrying client and orderctl: retries with one key end in one order.

use std::{sync::Arc, time::Duration};

use order_client::{ClientConfig, OrderClient, RetryPolicy};
use order_service::{proto::PlaceOrderRequest, server::Application};
use tokio::sync::Notify;
use tonic::Code;

use crate::helpers::{Db, Engine, TestDatabase, engine_tests, limit_order, new_key, spawn_app, test_config};

fn client(addr: std::net::SocketAddr, retry: RetryPolicy) -> OrderClient {
    OrderClient::new(ClientConfig { retry, ..ClientConfig::new(format!("http://{addr}")) }).unwrap()
}

fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(200),
        ..RetryPolicy::default()
    }
}

/// A valid order without a key: the client makes one.
fn keyless() -> PlaceOrderRequest {
    PlaceOrderRequest { client_request_id: String::new(), ..limit_order("") }
}

async fn a_reply_lost_after_the_commit_is_retried_with_the_same_key_and_replays(engine: Engine) {
    let app = spawn_app(engine).await;
    app.faults.lose_next_replies(2);
    let mut client = client(app.addr, quick_retries());

    let placed = client.place_order(keyless()).await.expect("the client recovers");
    assert_eq!(placed.attempts, 3, "two lost replies, then the answer");
    assert!(placed.value.replayed, "the answer is the order the first attempt committed");
    let key = placed.client_request_id.clone().unwrap();
    assert_eq!(placed.value.order.unwrap().client_request_id, key);
    assert_eq!(app.count("orders").await, 1, "one order, however many attempts");
}

async fn a_server_that_is_down_at_first_is_retried_until_it_is_up(engine: Engine) {
    // Reserve a port, and leave it closed while the first attempts fail.
    let database = TestDatabase::new(engine).await;
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let failed_once = Arc::new(Notify::new());
    let notify = failed_once.clone();
    let retry = RetryPolicy {
        on_retry: Some(Arc::new(move |_, status: &tonic::Status| {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            notify.notify_one();
        })),
        // Patient enough for a server that migrates its database first.
        max_attempts: 100,
        ..quick_retries()
    };
    let mut client = client(addr, retry);
    let call = tokio::spawn(async move { client.place_order(keyless()).await });

    failed_once.notified().await;
    let mut config = test_config(&database);
    config.listen = addr;
    let app = Application::build(config).await.expect("start the server on the reserved port");
    let server = tokio::spawn(app.run(std::future::pending()));

    let placed = call.await.unwrap().expect("succeeds once the server is up");
    assert!(placed.attempts >= 2, "{} attempts", placed.attempts);
    assert!(!placed.value.replayed);
    assert_eq!(Db::connect(&database.url).await.scalar("select count(*) from orders").await, 1);
    server.abort();
}

async fn refusals_are_final_after_one_attempt(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let key = new_key();
    app.place(limit_order(&key)).await;
    let mut client = client(app.addr, quick_retries());

    let mut other = limit_order(&key);
    other.quantity = "99".into();
    let reused = client.place_order(other).await.unwrap_err();
    assert_eq!((reused.status.code(), reused.attempts), (Code::FailedPrecondition, 1));
    assert!(!reused.is_unreachable());

    let mut bad = keyless();
    bad.symbol = "lower".into();
    let invalid = client.place_order(bad).await.unwrap_err();
    assert_eq!((invalid.status.code(), invalid.attempts), (Code::InvalidArgument, 1));
}

async fn orderctl_places_gets_lists_and_cancels_with_json_output(engine: Engine) {
    let app = spawn_app(engine).await;
    let addr = format!("http://{}", app.addr);
    // With --json, an answer is a JSON object on stdout, an error one on
    // stderr (stdout then stays empty).
    let orderctl = |args: &[&str]| {
        let out = std::process::Command::new(crate::helpers::orderctl())
            .args(["--addr", &addr, "--json"])
            .args(args)
            .output()
            .unwrap();
        let (answer, error) =
            if out.status.success() { (&out.stdout, &out.stderr) } else { (&out.stderr, &out.stdout) };
        assert!(error.is_empty(), "{args:?}: {}", String::from_utf8_lossy(error));
        let json = serde_json::from_slice::<serde_json::Value>(answer).unwrap_or_default();
        (out.status.code(), json)
    };
    let (code, placed) =
        orderctl(&["place", "--symbol", "AAPL", "--side", "buy", "--quantity", "10", "--price", "187.50"]);
    assert_eq!(code, Some(0), "{placed}");
    assert_eq!(placed["replayed"], false);
    assert_eq!(placed["order"]["limit_price"], "187.5");
    let key = placed["client_request_id"].as_str().unwrap().to_owned();
    let id = placed["order"]["order_id"].as_str().unwrap().to_owned();

    let (code, again) = orderctl(&[
        "place",
        "--symbol",
        "AAPL",
        "--side",
        "buy",
        "--quantity",
        "10",
        "--price",
        "187.5",
        "--key",
        &key,
    ]);
    assert_eq!(
        (code, &again["replayed"], &again["order"]["order_id"]),
        (Some(0), &true.into(), &id.clone().into())
    );

    let (code, got) = orderctl(&["get", "--key", &key]);
    assert_eq!((code, got["order"]["order_id"].as_str()), (Some(0), Some(id.as_str())));

    let (code, canceled) = orderctl(&["cancel", &id]);
    assert_eq!((code, canceled["order"]["status"].as_str()), (Some(0), Some("ORDER_STATUS_CANCELED")));

    let (code, listed) = orderctl(&["list", "--status", "canceled"]);
    assert_eq!(code, Some(0));
    assert_eq!(listed["orders"].as_array().unwrap().len(), 1);
    // --all follows the pages: one order placed above and four more.
    for _ in 0..4 {
        let (code, _) =
            orderctl(&["place", "--symbol", "IBM", "--side", "buy", "--quantity", "1", "--type", "market"]);
        assert_eq!(code, Some(0));
    }
    let (code, every) = orderctl(&["list", "--all", "--page-size", "2"]);
    assert_eq!(code, Some(0), "{every}");
    assert_eq!(every["orders"].as_array().unwrap().len(), 5, "{every}");
    assert_eq!(every["next_page_token"], "");
    let (_, first) = orderctl(&["list", "--page-size", "2"]);
    assert_eq!(first["orders"].as_array().unwrap().len(), 2);

    // A refused request exits 3, with the status in the JSON.
    let (code, refused) = orderctl(&[
        "place",
        "--symbol",
        "AAPL",
        "--side",
        "buy",
        "--quantity",
        "11",
        "--price",
        "1",
        "--key",
        &key,
    ]);
    assert_eq!((code, refused["error"]["code"].as_str()), (Some(3), Some("FailedPrecondition")));
    let (code, health) = orderctl(&["health"]);
    assert_eq!((code, health["status"].as_str()), (Some(0), Some("SERVING")));
    assert_eq!(app.count("orders").await, 5);

    // Every attempt's reply lost after its commit: the order may exist, so
    // orderctl gives up with "outcome unknown" (exit 5) and the key, never
    // "refused"; placing again with that key replays the one order.
    // orderctl retries until --timeout is spent: every reply in it is lost.
    let place = [
        "--timeout",
        "2s",
        "place",
        "--symbol",
        "MSFT",
        "--side",
        "sell",
        "--quantity",
        "1",
        "--type",
        "market",
    ];
    app.faults.lose_next_replies(1000);
    let (code, unknown) = orderctl(&place);
    assert_eq!((code, unknown["outcome_unknown"].as_bool()), (Some(5), Some(true)), "{unknown}");
    let key = unknown["client_request_id"].as_str().expect("the key to retry with").to_owned();
    app.faults.lose_next_replies(0);
    let (code, replay) = orderctl(&[&place[..], &["--key", &key]].concat());
    assert_eq!((code, &replay["replayed"]), (Some(0), &true.into()), "{replay}");
    assert_eq!(app.count("orders").await, 6);
}

/// `--addr` takes `HOST:PORT` as grpcurl does, and `http://HOST:PORT`; a
/// malformed address is a usage error (exit 2) at once, never retried.
async fn orderctl_takes_host_port_and_refuses_a_malformed_address_at_once(engine: Engine) {
    let app = spawn_app(engine).await;
    for addr in [app.addr.to_string(), format!("http://{}", app.addr)] {
        let out = tokio::process::Command::new(crate::helpers::orderctl())
            .args(["--addr", &addr, "health"])
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{addr}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let bad_addresses = [
        "local host:50051",
        "127.0.0.1",
        "http://127.0.0.1:port",
        "ftp://127.0.0.1:21",
        "http://h:1/path",
        "127.0.0.1:0",
        "user@127.0.0.1:50051",
        "http://user:SECRET-PASSWORD@127.0.0.1:50051",
    ];
    for bad in bad_addresses {
        let started = std::time::Instant::now();
        let out = tokio::process::Command::new(crate::helpers::orderctl())
            .args(["--addr", bad, "--timeout", "30s", "list"])
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("--addr"), "{bad}: {stderr}");
        assert!(!stderr.contains("SECRET"), "credentials are never repeated: {stderr}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{bad}: refused at once, not retried");
    }
    let orderctl = |args: &[&str]| {
        let mut command = std::process::Command::new(crate::helpers::orderctl());
        command.env_remove("ORDERCTL_JSON").env_remove("TRACEPARENT").args(args);
        command
    };
    // Plain text asked for TLS settings: a usage error, not a token in clear.
    let out = orderctl(&["--addr", &format!("http://{}", app.addr), "--ca-cert", "/dev/null", "health"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    // With --json, a usage error is JSON on stderr too.
    let out = orderctl(&["--json", "--addr", "bad", "health"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let error: serde_json::Value = serde_json::from_slice(&out.stderr).expect("a JSON error on stderr");
    assert_eq!(error["error"]["code"], "InvalidArgument");
    // bench takes HOST:PORT as every other command does.
    let addr = app.addr.to_string();
    let out = orderctl(&["--addr", &addr, "bench", "--duration", "200ms", "--concurrency", "1", "--noop"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // ORDERCTL_JSON takes 1/yes as true; a malformed inherited TRACEPARENT
    // is ignored with a warning.
    let out = orderctl(&["--addr", &addr, "health"])
        .env("ORDERCTL_JSON", "1")
        .env("TRACEPARENT", "garbage")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let health: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(health["status"], "SERVING");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ignoring TRACEPARENT"));
    // An answer that cannot be printed (a full disk) loses no key: the
    // placed order's key goes to stderr.
    let before = app.count("orders").await;
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let out = orderctl(&[
        "--addr",
        &addr,
        "place",
        "--symbol",
        "IBM",
        "--side",
        "buy",
        "--quantity",
        "1",
        "--type",
        "market",
    ])
    .stdout(full)
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the order is placed, with key"), "{stderr}");
    assert_eq!(app.count("orders").await, before + 1);
}

/// `--timeout` bounds `list --all` as a whole, not each page: 3000 pages
/// of one order cannot all come within 200 ms.
#[tokio::test]
async fn orderctl_timeout_bounds_every_page_of_list_all() {
    let app = spawn_app(Engine::Sqlite).await;
    crate::helpers::place_concurrently(app.addr, 3000, 16, |_| {
        tonic::Request::new(crate::helpers::limit_order(&crate::helpers::new_key()))
    })
    .await;
    let started = std::time::Instant::now();
    let out = tokio::process::Command::new(crate::helpers::orderctl())
        .args(["--addr", &app.addr.to_string(), "--timeout", "200ms", "list", "--all", "--page-size", "1"])
        .output()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(4), "gave up: {}", String::from_utf8_lossy(&out.stderr));
    assert!(took < std::time::Duration::from_millis(1500), "took {took:?}");
}

/// `--timeout` bounds the whole command, retries included, `health` too:
/// against a listener that never answers, `--timeout 1s` returns within
/// 1.5 s.
#[tokio::test]
async fn orderctl_timeout_bounds_the_whole_command() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    for command in [&["list"][..], &["health"], &["get", "--key", "7c3c1e55-3a5c-4b1e-9d0e-2f4f1b8a9c10"]] {
        let started = std::time::Instant::now();
        let out = tokio::process::Command::new(crate::helpers::orderctl())
            .args(["--addr", &addr, "--timeout", "1s"])
            .args(command)
            .output()
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(4), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(took < std::time::Duration::from_millis(1500), "{command:?} took {took:?}");
    }
    drop(silent);
}

#[tokio::test]
async fn orderctl_exits_4_when_the_service_is_unreachable() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = tokio::process::Command::new(crate::helpers::orderctl())
        .args(["--addr", &format!("http://{addr}"), "--timeout", "1s", "list"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
}

engine_tests!(
    a_reply_lost_after_the_commit_is_retried_with_the_same_key_and_replays,
    a_server_that_is_down_at_first_is_retried_until_it_is_up,
    refusals_are_final_after_one_attempt,
    orderctl_takes_host_port_and_refuses_a_malformed_address_at_once,
    orderctl_places_gets_lists_and_cancels_with_json_output,
);
