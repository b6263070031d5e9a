//! Real concurrency: duplicates racing each other resolve to one order.

use std::collections::HashSet;

use order_service::proto::order_service_client::OrderServiceClient;
use tokio::task::JoinSet;

use crate::helpers::{Engine, channel, engine_tests, limit_order, new_key, spawn_app, spawn_replicas};

async fn a_hundred_concurrent_identical_place_orders_create_one_order_and_99_replays(engine: Engine) {
    let app = spawn_app(engine).await;
    let key = new_key();
    // Spread the calls over several connections, as retries from several
    // client instances would arrive.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(OrderServiceClient::new(channel(app.addr).await));
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(100));
    let mut calls = JoinSet::new();
    for i in 0..100 {
        let mut client = clients[i % clients.len()].clone();
        let req = limit_order(&key);
        let barrier = barrier.clone();
        calls.spawn(async move {
            barrier.wait().await;
            client.place_order(req).await.map(|r| r.into_inner())
        });
    }
    let mut replays = 0;
    let mut order_ids = HashSet::new();
    while let Some(result) = calls.join_next().await {
        let resp = result.unwrap().expect("every duplicate succeeds");
        replays += usize::from(resp.replayed);
        order_ids.insert(resp.order.unwrap().order_id);
    }
    assert_eq!(order_ids.len(), 1, "every caller got the same order");
    assert_eq!(replays, 99);
    assert_eq!(app.count("orders").await, 1);
    assert_eq!(app.count("idempotency_keys").await, 1);
}

async fn two_hundred_concurrent_distinct_keys_create_two_hundred_orders(engine: Engine) {
    let app = spawn_app(engine).await;
    let mut calls = JoinSet::new();
    let keys: Vec<String> = (0..200).map(|_| new_key()).collect();
    for key in &keys {
        let mut client = app.client.clone();
        let req = limit_order(key);
        calls.spawn(async move { client.place_order(req).await.map(|r| r.into_inner()) });
    }
    let mut seen = HashSet::new();
    while let Some(result) = calls.join_next().await {
        let resp = result.unwrap().expect("every order succeeds");
        assert!(!resp.replayed);
        let order = resp.order.unwrap();
        assert!(seen.insert(order.client_request_id.clone()), "one answer per key");
    }
    assert_eq!(seen, keys.into_iter().collect::<HashSet<_>>());
    assert_eq!(app.count("orders").await, 200);
    let distinct = app
        .db()
        .await
        .scalar(
            "select count(*) from idempotency_keys k join orders o on o.order_id = k.order_id \
             where o.client_request_id = k.client_request_id",
        )
        .await;
    assert_eq!(distinct, 200, "every key points to its own order");
}

async fn three_replicas_racing_200_keys_sent_5_times_each_create_200_orders(engine: Engine) {
    let replicas = spawn_replicas(engine).await;
    let keys: Vec<String> = (0..200).map(|_| new_key()).collect();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(keys.len() * 5));
    let mut calls = JoinSet::new();
    for (k, key) in keys.iter().enumerate() {
        for copy in 0..5 {
            let mut client = replicas[(k + copy) % replicas.len()].client.clone();
            let req = limit_order(key);
            let barrier = barrier.clone();
            calls.spawn(async move {
                barrier.wait().await;
                client.place_order(req).await.map(|r| r.into_inner())
            });
        }
    }
    let mut created = 0;
    let mut answers = std::collections::HashMap::new();
    while let Some(result) = calls.join_next().await {
        let resp = result.unwrap().expect("every duplicate succeeds");
        created += usize::from(!resp.replayed);
        let order = resp.order.unwrap();
        let id = answers.entry(order.client_request_id).or_insert(order.order_id.clone());
        assert_eq!(*id, order.order_id, "every reply for a key names the same order");
    }
    let db = replicas[0].db().await;
    let orders = db.scalar("select count(*) from orders").await;
    let keys_stored = db.scalar("select count(*) from idempotency_keys").await;
    let duplicates =
        db.scalar("select count(*) from (select client_request_id from orders group by client_request_id having count(*) > 1) d").await;
    println!(
        "replica race ({engine:?}): orders={orders} keys={keys_stored} duplicates={duplicates} created={created}"
    );
    assert_eq!(answers.len(), 200);
    assert_eq!(created, 200, "exactly one creation per key");
    assert_eq!((orders, keys_stored, duplicates), (200, 200, 0));
}

async fn a_reused_key_racing_new_orders_is_refused_alone(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let reused = new_key();
    app.place(limit_order(&reused)).await;
    // With group commit these land in shared batches: the refusal must not
    // undo or block its batch-mates.
    let mut calls = JoinSet::new();
    for i in 0..60 {
        let mut client = app.client.clone();
        let req = if i % 3 == 0 {
            let mut other = limit_order(&reused);
            other.quantity = format!("{}", 100 + i);
            other
        } else {
            limit_order(&new_key())
        };
        calls.spawn(async move { client.place_order(req).await.map(|r| r.into_inner()) });
    }
    let (mut created, mut refused) = (0, 0);
    while let Some(result) = calls.join_next().await {
        match result.unwrap() {
            Ok(resp) => created += usize::from(!resp.replayed),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((created, refused), (40, 20));
    assert_eq!(app.count("orders").await, 41);
}

engine_tests!(
    a_reused_key_racing_new_orders_is_refused_alone,
    a_hundred_concurrent_identical_place_orders_create_one_order_and_99_replays,
    two_hundred_concurrent_distinct_keys_create_two_hundred_orders,
    three_replicas_racing_200_keys_sent_5_times_each_create_200_orders,
);
