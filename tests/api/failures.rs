//! Faults: a locked or unreachable database answers UNAVAILABLE with
//! RetryInfo and writes nothing; an internal fault answers an opaque INTERNAL.

use std::time::Duration;

use order_service::proto::{
    GetOrderRequest, get_order_request::Lookup, order_service_client::OrderServiceClient,
};
use sqlx::Connection;
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

use crate::helpers::{Engine, engine_tests, limit_order, new_key, spawn_app, spawn_app_with};

fn assert_unavailable(status: &tonic::Status) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let details = status.get_error_details();
    assert_eq!(details.error_info().expect("ErrorInfo").reason, "DATASTORE_UNAVAILABLE");
    assert!(details.retry_info().expect("RetryInfo").retry_delay.is_some());
    let message = status.message().to_lowercase();
    for leak in ["sql", "locked", "connection", "error returned"] {
        assert!(!message.contains(leak), "message leaks {leak:?}: {}", status.message());
    }
}

#[tokio::test]
async fn a_sqlite_file_locked_past_the_lock_timeout_answers_unavailable_and_writes_nothing() {
    let mut app = spawn_app_with(Engine::Sqlite, |c| c.lock_timeout = Duration::from_millis(200)).await;
    // Another process holds the write lock.
    let mut other = sqlx::SqliteConnection::connect(&app.config.database_url).await.unwrap();
    sqlx::raw_sql("begin immediate").execute(&mut other).await.unwrap();

    let key = new_key();
    let status = app.client.place_order(limit_order(&key)).await.expect_err("busy");
    assert_unavailable(&status);

    sqlx::raw_sql("rollback").execute(&mut other).await.unwrap();
    assert_eq!(app.count("orders").await, 0);
    assert_eq!(app.count("idempotency_keys").await, 0);
    let retry = app.place(limit_order(&key)).await;
    assert!(!retry.replayed, "the failed attempt consumed nothing");
}

async fn an_internal_fault_is_opaque(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let key = new_key();
    app.place(limit_order(&key)).await;
    // Corrupt the stored order behind the service's back.
    app.db().await.execute("update orders set symbol = 'lower case'").await;

    let req = GetOrderRequest { lookup: Some(Lookup::ClientRequestId(key)) };
    let status = app.client.get_order(req).await.expect_err("corrupt row");
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(status.message(), "internal error");
    assert!(status.details().is_empty());
}

engine_tests!(an_internal_fault_is_opaque);

#[tokio::test]
async fn calls_beyond_the_concurrency_cap_are_refused_at_once_not_queued() {
    let mut app = spawn_app_with(Engine::Sqlite, |c| {
        c.max_concurrent_requests = 1;
        c.lock_timeout = Duration::from_secs(30);
    })
    .await;
    // Hold the database so the one permitted call stays in flight.
    let mut other = sqlx::SqliteConnection::connect(&app.config.database_url).await.unwrap();
    sqlx::raw_sql("begin immediate").execute(&mut other).await.unwrap();
    let key = new_key();
    let place = |mut client: OrderServiceClient<Channel>, key: String| {
        tokio::spawn(async move { client.place_order(limit_order(&key)).await })
    };
    let mut first = place(app.client.clone(), key.clone());

    // Probe (bounded) until a call is refused while the first holds the only
    // permit; a probe that wins the permit first just means trying again.
    let probe = GetOrderRequest { lookup: Some(Lookup::ClientRequestId(new_key())) };
    let mut refused = None;
    for _ in 0..500 {
        if first.is_finished() {
            let status = first.await.unwrap().expect_err("the first call can only lose the race");
            assert_eq!(status.code(), Code::ResourceExhausted);
            first = place(app.client.clone(), key.clone());
        }
        match app.client.get_order(probe.clone()).await {
            Err(status) if status.code() == Code::ResourceExhausted && !first.is_finished() => {
                refused = Some(status);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let refused = refused.expect("a call beyond the cap is refused");
    let details = refused.get_error_details();
    assert_eq!(details.error_info().expect("ErrorInfo").reason, "OVERLOADED");
    assert!(details.retry_info().expect("RetryInfo").retry_delay.is_some());

    sqlx::raw_sql("rollback").execute(&mut other).await.unwrap();
    first.await.unwrap().expect("the permitted call completes");
    app.place(limit_order(&new_key())).await;
    assert_eq!(app.count("orders").await, 2);
}
