//! Faults: a locked or unreachable database answers UNAVAILABLE with
//! RetryInfo and writes nothing; an internal fault answers an opaque INTERNAL.

use std::time::Duration;

use order_service::proto::{GetOrderRequest, get_order_request::Lookup};
use sqlx::Connection;
use tonic::Code;
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
