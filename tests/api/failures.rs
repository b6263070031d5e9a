//! Faults: a busy database answers UNAVAILABLE with RetryInfo and writes
//! nothing; an internal fault answers an opaque INTERNAL.

use std::time::Duration;

use order_service::proto::{GetOrderRequest, get_order_request::Lookup};
use sqlx::Connection;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{limit_order, new_key, spawn_app_with};

#[tokio::test]
async fn a_database_locked_past_the_lock_timeout_answers_unavailable_and_writes_nothing() {
    let mut app = spawn_app_with(|c| c.lock_timeout = Duration::from_millis(200)).await;
    // Another process holds the write lock.
    let mut other = sqlx::SqliteConnection::connect(&app.config.database_url)
        .await
        .unwrap();
    sqlx::raw_sql("begin immediate")
        .execute(&mut other)
        .await
        .unwrap();

    let key = new_key();
    let status = app
        .client
        .place_order(limit_order(&key))
        .await
        .expect_err("busy");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let details = status.get_error_details();
    assert_eq!(
        details.error_info().expect("ErrorInfo").reason,
        "DATASTORE_UNAVAILABLE"
    );
    assert!(
        details
            .retry_info()
            .expect("RetryInfo")
            .retry_delay
            .is_some()
    );
    assert!(
        !status.message().to_lowercase().contains("sql"),
        "{}",
        status.message()
    );
    assert!(!status.message().contains("locked"), "{}", status.message());

    sqlx::raw_sql("rollback").execute(&mut other).await.unwrap();
    assert_eq!(app.count("orders").await, 0);
    assert_eq!(app.count("idempotency_keys").await, 0);
    let retry = app
        .client
        .place_order(limit_order(&key))
        .await
        .expect("the retry succeeds");
    assert!(
        !retry.into_inner().replayed,
        "the failed attempt consumed nothing"
    );
}

#[tokio::test]
async fn an_internal_fault_is_opaque() {
    let mut app = spawn_app_with(|_| {}).await;
    let key = new_key();
    app.client.place_order(limit_order(&key)).await.unwrap();
    // Corrupt the stored order behind the service's back.
    let pool = app.db().await;
    sqlx::query("update orders set quantity = 'not a number'")
        .execute(&pool)
        .await
        .unwrap();

    let req = GetOrderRequest {
        lookup: Some(Lookup::ClientRequestId(key)),
    };
    let status = app.client.get_order(req).await.expect_err("corrupt row");
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(status.message(), "internal error");
    assert!(status.details().is_empty());
}
