//! Real concurrency: duplicates racing each other resolve to one order.

use std::collections::HashSet;

use order_service::proto::order_service_client::OrderServiceClient;
use tokio::task::JoinSet;

use crate::helpers::{channel, limit_order, new_key, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_identical_place_orders_create_one_order_and_99_replays() {
    let app = spawn_app().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_distinct_keys_create_two_hundred_orders() {
    let app = spawn_app().await;
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
        assert!(
            seen.insert(order.client_request_id.clone()),
            "one answer per key"
        );
    }
    assert_eq!(seen, keys.into_iter().collect::<HashSet<_>>());
    assert_eq!(app.count("orders").await, 200);
    let pool = app.db().await;
    let distinct: i64 = sqlx::query_scalar(
        "select count(*) from idempotency_keys k join orders o on o.order_id = k.order_id \
         where o.client_request_id = k.client_request_id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(distinct, 200, "every key points to its own order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_racing_on_two_server_instances_over_one_file_create_one_order() {
    let first = spawn_app().await;
    let second = first.another_instance().await;
    let keys: Vec<String> = (0..20).map(|_| new_key()).collect();
    let mut calls = JoinSet::new();
    for key in &keys {
        for app in [&first, &second] {
            for _ in 0..3 {
                let mut client = app.client.clone();
                let req = limit_order(key);
                calls.spawn(async move { client.place_order(req).await.map(|r| r.into_inner()) });
            }
        }
    }
    let mut created = 0;
    let mut answers = std::collections::HashMap::new();
    while let Some(result) = calls.join_next().await {
        let resp = result.unwrap().expect("every duplicate succeeds");
        created += usize::from(!resp.replayed);
        let order = resp.order.unwrap();
        let id = answers
            .entry(order.client_request_id)
            .or_insert(order.order_id.clone());
        assert_eq!(
            *id, order.order_id,
            "one order per key, whichever instance answered"
        );
    }
    assert_eq!(created, keys.len(), "exactly one creation per key");
    assert_eq!(first.count("orders").await, keys.len() as i64);
    assert_eq!(first.count("idempotency_keys").await, keys.len() as i64);
}
