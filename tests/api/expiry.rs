//! Key lifetime: expired keys place new orders and are purged; orders stay.

use std::time::Duration;

use order_service::{
    proto::{GetOrderRequest, get_order_request::Lookup},
    server::purge_expired,
};

use crate::helpers::{Engine, engine_tests, limit_order, new_key, spawn_app, spawn_app_with};

const HOUR: Duration = Duration::from_secs(3600);

async fn an_expired_key_places_a_new_order_and_the_key_points_to_it(engine: Engine) {
    let mut app = spawn_app(engine).await; // default lifetime: 24 h
    let key = new_key();
    let first = app.client.place_order(limit_order(&key)).await.unwrap().into_inner().order.unwrap();

    app.age(23 * HOUR).await;
    let replay = app.client.place_order(limit_order(&key)).await.unwrap().into_inner();
    assert!(replay.replayed, "a key younger than its lifetime replays");

    app.age(HOUR).await;
    let mut other = limit_order(&key);
    other.quantity = "99".into(); // any payload: the old key no longer binds
    let second = app.client.place_order(other).await.unwrap().into_inner();
    assert!(!second.replayed);
    let second = second.order.unwrap();
    assert_ne!(second.order_id, first.order_id);
    assert_eq!(second.quantity, "99");

    let by_key = GetOrderRequest { lookup: Some(Lookup::ClientRequestId(key.clone())) };
    let found = app.client.get_order(by_key).await.unwrap().into_inner();
    assert_eq!(found.order_id, second.order_id, "the key now points to the new order");
    assert_eq!(app.count("orders").await, 2, "orders are never deleted");
    assert_eq!(app.count("idempotency_keys").await, 1, "the old key row was replaced");

    let replay = app.client.place_order(limit_order(&key)).await;
    assert_eq!(replay.unwrap_err().code(), tonic::Code::FailedPrecondition, "the new key binds");
}

async fn the_lifetime_is_configurable(engine: Engine) {
    let mut app = spawn_app_with(engine, |c| c.idempotency_ttl = Duration::from_secs(90)).await;
    let key = new_key();
    app.client.place_order(limit_order(&key)).await.unwrap();
    app.age(Duration::from_secs(88)).await;
    assert!(app.client.place_order(limit_order(&key)).await.unwrap().into_inner().replayed);
    app.age(Duration::from_secs(2)).await;
    assert!(!app.client.place_order(limit_order(&key)).await.unwrap().into_inner().replayed);
}

async fn the_purge_removes_expired_keys_only_in_batches_and_keeps_orders(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let old_keys: Vec<String> = (0..5).map(|_| new_key()).collect();
    for key in &old_keys {
        app.client.place_order(limit_order(key)).await.unwrap();
    }
    app.age(12 * HOUR).await;
    let young = new_key();
    app.client.place_order(limit_order(&young)).await.unwrap();
    app.age(12 * HOUR).await; // the first five are now 24 h old

    let purged = purge_expired(&app.store, 2).await.unwrap();
    assert_eq!(purged, 5);
    assert_eq!(app.count("idempotency_keys").await, 1);
    assert_eq!(app.count("orders").await, 6);
    let left = app.db().await.strings("select cast(client_request_id as text) from idempotency_keys").await;
    assert_eq!(left, [young]);
    assert_eq!(purge_expired(&app.store, 2).await.unwrap(), 0);

    // A purged key's orders can still be found by the key.
    let by_key = GetOrderRequest { lookup: Some(Lookup::ClientRequestId(old_keys[0].clone())) };
    let found = app.client.get_order(by_key).await.unwrap().into_inner();
    assert_eq!(found.client_request_id, old_keys[0]);
}

engine_tests!(
    an_expired_key_places_a_new_order_and_the_key_points_to_it,
    the_lifetime_is_configurable,
    the_purge_removes_expired_keys_only_in_batches_and_keeps_orders,
);
