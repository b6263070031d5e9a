//! PlaceOrder: creation, replays, and a key reused with another payload.

use order_service::proto::{OrderStatus, OrderType, Side, TimeInForce};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{Engine, engine_tests, limit_order, new_key, spawn_app};

async fn a_new_key_creates_an_order_with_normalized_fields(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let key = new_key();
    let mut req = limit_order(&key);
    req.quantity = "007.50".into();
    req.limit_price = "187.500".into();

    let resp = app.client.place_order(req).await.expect("place");
    assert!(resp.metadata().get("idempotent-replayed").is_none());
    let resp = resp.into_inner();
    assert!(!resp.replayed);
    let order = resp.order.expect("order");
    assert_eq!(order.client_request_id, key);
    assert_eq!(order.account_id, "anonymous");
    assert_eq!(order.symbol, "AAPL");
    assert_eq!(order.side, Side::Buy as i32);
    assert_eq!(order.order_type, OrderType::Limit as i32);
    assert_eq!(order.quantity, "7.5");
    assert_eq!(order.limit_price, "187.5");
    assert_eq!(order.time_in_force, TimeInForce::Gtc as i32, "UNSPECIFIED is echoed as GTC");
    assert_eq!(order.status, OrderStatus::New as i32);
    let id = uuid::Uuid::parse_str(&order.order_id).expect("order id is a UUID");
    assert_eq!(id.get_version_num(), 7, "order ids are UUID v7");
    assert_eq!(order.create_time, order.update_time);
    assert_eq!(order.create_time.unwrap().nanos % 1000, 0, "microsecond precision");
    assert_eq!(app.count("orders").await, 1);
    assert_eq!(app.count("idempotency_keys").await, 1);
}

async fn a_retried_place_order_returns_the_same_order_with_replayed_and_the_header(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let key = new_key();
    let first = app.client.place_order(limit_order(&key)).await.unwrap().into_inner();

    let retry = app.client.place_order(limit_order(&key)).await.unwrap();
    assert_eq!(retry.metadata().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    let retry = retry.into_inner();
    assert!(retry.replayed);
    assert_eq!(retry.order, first.order, "the replay is the persisted order");
    assert_eq!(app.count("orders").await, 1);
}

async fn equal_decimals_in_another_spelling_and_an_upper_case_key_replay(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let key = new_key();
    let mut req = limit_order(&key);
    req.quantity = "1.50".into();
    let first = app.client.place_order(req).await.unwrap().into_inner();

    let mut respelled = limit_order(&key.to_uppercase());
    respelled.quantity = "01.5".into();
    respelled.limit_price = "187.50000".into();
    respelled.time_in_force = TimeInForce::Gtc as i32; // what UNSPECIFIED means
    let retry = app.client.place_order(respelled).await.unwrap().into_inner();
    assert!(retry.replayed);
    assert_eq!(retry.order, first.order);
    assert_eq!(retry.order.unwrap().quantity, "1.5");
    assert_eq!(app.count("orders").await, 1);
}

async fn the_same_key_with_another_payload_is_refused_and_nothing_is_written(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let key = new_key();
    let first = app.client.place_order(limit_order(&key)).await.unwrap().into_inner();
    let order_id = first.order.unwrap().order_id;

    let mut other = limit_order(&key);
    other.quantity = "11".into();
    other.limit_price = "188".into();
    let status = app.client.place_order(other).await.expect_err("key reuse is refused");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let info = status.get_error_details().error_info().cloned().expect("ErrorInfo");
    assert_eq!(info.reason, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(info.domain, "orders.v1");
    assert_eq!(info.metadata.get("order_id"), Some(&order_id));
    assert_eq!(info.metadata.get("mismatched_fields").map(String::as_str), Some("quantity,limit_price"));

    let mut market = limit_order(&key);
    market.side = Side::Sell as i32;
    market.order_type = OrderType::Market as i32;
    market.limit_price.clear();
    market.time_in_force = TimeInForce::Ioc as i32;
    let status = app.client.place_order(market).await.expect_err("key reuse is refused");
    let info = status.get_error_details().error_info().cloned().expect("ErrorInfo");
    assert_eq!(info.metadata["mismatched_fields"], "side,order_type,limit_price,time_in_force");

    assert_eq!(app.count("orders").await, 1);
    assert_eq!(app.count("idempotency_keys").await, 1);
    // The original is untouched and still replays.
    let replay = app.client.place_order(limit_order(&key)).await.unwrap().into_inner();
    assert!(replay.replayed);
    assert_eq!(replay.order.unwrap().order_id, order_id);
}

async fn a_market_order_has_no_limit_price(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let mut req = limit_order(&new_key());
    req.order_type = OrderType::Market as i32;
    req.limit_price.clear();
    req.side = Side::Sell as i32;
    req.time_in_force = TimeInForce::Fok as i32;
    let order = app.client.place_order(req).await.unwrap().into_inner().order.unwrap();
    assert_eq!(order.order_type, OrderType::Market as i32);
    assert_eq!(order.side, Side::Sell as i32);
    assert_eq!(order.limit_price, "");
    assert_eq!(order.time_in_force, TimeInForce::Fok as i32);
}

async fn a_server_restarted_on_the_same_database_replays_old_keys(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let key = new_key();
    let first = app.client.place_order(limit_order(&key)).await.unwrap().into_inner();

    let mut app = app.restart().await;
    let retry = app.client.place_order(limit_order(&key)).await.unwrap().into_inner();
    assert!(retry.replayed);
    assert_eq!(retry.order, first.order);
    assert_eq!(app.count("orders").await, 1);
}

engine_tests!(
    a_new_key_creates_an_order_with_normalized_fields,
    a_retried_place_order_returns_the_same_order_with_replayed_and_the_header,
    equal_decimals_in_another_spelling_and_an_upper_case_key_replay,
    the_same_key_with_another_payload_is_refused_and_nothing_is_written,
    a_market_order_has_no_limit_price,
    a_server_restarted_on_the_same_database_replays_old_keys,
);

/// SQLite resolves a pending deferred foreign key by searching the child
/// table for the parent's key: without an index on `idempotency_keys.order_id`
/// that is a scan of every key per order placed, and PlaceOrder slowed as the
/// table grew. Every foreign key's columns must lead some index.
#[tokio::test]
async fn sqlite_every_foreign_key_is_indexed() {
    let app = spawn_app(Engine::Sqlite).await;
    let db = app.db().await;
    let unindexed = db
        .strings(
            r#"select t.name || '.' || fk."from" from sqlite_master t
              join pragma_foreign_key_list(t.name) fk
              where t.type = 'table' and not exists (
                  select 1 from pragma_index_list(t.name) il
                  join pragma_index_info(il.name) ii on ii.seqno = 0
                  where ii.name = fk."from")"#,
        )
        .await;
    assert!(unindexed.is_empty(), "foreign keys without an index: {unindexed:?}");
}
