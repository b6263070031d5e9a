//! The server binary as an operator runs it: start-up errors and SIGTERM.

use std::{
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use order_client::RetryPolicy;
use order_service::proto::order_service_client::OrderServiceClient;
use tokio::{net::TcpListener, process::Command, sync::Notify, task::JoinSet};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    helpers::process::{BIN, ServerProcess, send_signal},
    helpers::{Db, Engine, TestDatabase, channel, engine_tests, limit_order, new_key},
};

async fn sigterm_during_a_stream_of_calls_completes_or_fails_each_retryably_and_exits_zero(engine: Engine) {
    let database = TestDatabase::new(engine).await;
    let mut server = ServerProcess::start(&["--database-url", &database.url, "--shutdown-delay", "1s"]).await;
    let addr = server.addr;
    let mut health = HealthClient::new(channel(addr).await);
    let watch = HealthCheckRequest { service: "orders.v1.OrderService".to_owned() };
    let mut statuses = health.watch(watch).await.unwrap().into_inner();
    assert_eq!(statuses.message().await.unwrap().unwrap().status(), ServingStatus::Serving);

    let failed = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let enough = Arc::new(Notify::new());
    let mut callers = JoinSet::new();
    for _ in 0..8 {
        let mut client = OrderServiceClient::new(channel(addr).await);
        let (done, enough, failed) = (done.clone(), enough.clone(), failed.clone());
        callers.spawn(async move {
            let mut acknowledged = Vec::new();
            // Bounded: the server stops long before this many calls.
            for _ in 0..100_000 {
                let key = new_key();
                match client.place_order(limit_order(&key)).await {
                    Ok(resp) => {
                        assert_eq!(resp.into_inner().order.unwrap().client_request_id, key);
                        acknowledged.push(key);
                        if done.fetch_add(1, Ordering::SeqCst) + 1 == 50 {
                            enough.notify_one();
                        }
                    }
                    Err(status) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        // Cancelled: the drain cut a call; INTERNAL with GOAWAY:
                        // tonic's report of a call the server refused unread.
                        assert!(
                            status.code() == Code::Cancelled || RetryPolicy::may_retry(&status),
                            "a call failed non-retryably: {status:?}"
                        );
                        return acknowledged;
                    }
                }
            }
            panic!("the server never stopped answering");
        });
    }
    enough.notified().await;
    let signalled = std::time::Instant::now();
    server.signal("TERM");

    // Health turns NOT_SERVING before any call is refused.
    let next = statuses.message().await.unwrap().unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no call failed before health said NOT_SERVING");

    // Within the shutdown delay (1 s) plus the grace (20 s).
    let status = tokio::time::timeout(Duration::from_secs(21), server.child.wait())
        .await
        .expect("the server exits within its delay and grace")
        .unwrap();
    assert!(signalled.elapsed() >= Duration::from_secs(1), "it kept serving for the shutdown delay");
    assert!(status.success(), "exit status {status:?}");

    let mut acknowledged = Vec::new();
    while let Some(keys) = callers.join_next().await {
        acknowledged.extend(keys.unwrap());
    }
    assert!(acknowledged.len() >= 50);
    let db = Db::connect(&database.url).await;
    for key in &acknowledged {
        let n = db
            .scalar(&format!("select count(*) from orders where cast(client_request_id as text) = '{key}'"))
            .await;
        assert_eq!(n, 1, "acknowledged key {key} has exactly one order");
    }
}

#[tokio::test]
async fn a_bad_flag_exits_non_zero_with_one_clear_line() {
    let out = Command::new(BIN).args(["--idempotency-ttl", "soon"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "stderr: {stderr}");
    assert!(stderr.contains("--idempotency-ttl"), "stderr: {stderr}");
}

#[tokio::test]
async fn an_unopenable_database_exits_non_zero_with_one_clear_line() {
    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--database-url", "sqlite:///nonexistent-dir/sub/orders.db"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "stderr: {stderr}");
    assert!(stderr.contains("cannot open database"), "stderr: {stderr}");
}

engine_tests!(sigterm_during_a_stream_of_calls_completes_or_fails_each_retryably_and_exits_zero);

/// A second signal while draining exits at once (code 1) instead of waiting
/// out the shutdown delay. The signals are caught from start-up on, so one
/// second TERM is enough, however soon it follows the first.
#[tokio::test]
async fn a_second_signal_while_draining_exits_at_once() {
    let database = TestDatabase::new(Engine::Sqlite).await;
    let mut server =
        ServerProcess::start(&["--database-url", &database.url, "--shutdown-delay", "300s"]).await;
    server.signal("TERM");
    server.log("draining").await;
    server.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .expect("the second signal ended the process well within the 300 s delay")
        .unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}");
    // The log reader may not have caught up with the exit yet: wait for the
    // line (the pipe's end comes after it, so a missing line still fails).
    server.log("second signal").await;
}

/// Signals that arrive during start-up (here: while the database has not
/// answered yet) are caught, not left to their default action, which kills
/// the process: SIGHUP is harmless and SIGTERM stops it at once, cleanly.
#[tokio::test]
async fn signals_during_start_up_are_caught_and_term_stops_it_cleanly() {
    // A "database" that accepts the connection and never says a word.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("postgres://orders@{}/orders", silent.local_addr().unwrap());
    let child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json", "--database-url", &url])
        .args(["--db-connect-timeout", "300s"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Once it is connecting to the database, it is mid-start-up.
    let (_connection, _) = silent.accept().await.unwrap();
    send_signal(&child, "HUP");
    send_signal(&child, "TERM");
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("SIGTERM stopped it well within the 300 s connect timeout")
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{:?}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("stopped before serving"), "{stdout}");
}
