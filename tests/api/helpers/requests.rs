//! What tests send: fresh keys, valid orders, random choices.

use order_service::proto::{OrderType, PlaceOrderRequest, Side};

/// A fresh idempotency key.
pub fn new_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A valid limit order: buy 10 AAPL at 187.5.
pub fn limit_order(key: &str) -> PlaceOrderRequest {
    PlaceOrderRequest {
        client_request_id: key.to_owned(),
        symbol: "AAPL".to_owned(),
        side: Side::Buy as i32,
        order_type: OrderType::Limit as i32,
        quantity: "10".to_owned(),
        limit_price: "187.5".to_owned(),
        time_in_force: 0,
    }
}

/// A uniformly random number below `n`, from the OS's random source.
pub fn random_below(n: usize) -> usize {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    (u64::from_le_bytes(bytes[..8].try_into().unwrap()) % n as u64) as usize
}

/// Places `n` orders at `addr`, at most `at_once` in flight (spread over up
/// to 16 connections), the `i`th request made by `request(i)`; every one
/// must succeed.
pub async fn place_concurrently(
    addr: std::net::SocketAddr,
    n: usize,
    at_once: usize,
    request: impl Fn(usize) -> tonic::Request<PlaceOrderRequest>,
) {
    use order_service::proto::order_service_client::OrderServiceClient;
    let mut clients = Vec::new();
    for _ in 0..at_once.clamp(1, 16) {
        clients.push(OrderServiceClient::new(super::channel(addr).await));
    }
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..n {
        if calls.len() >= at_once {
            calls.join_next().await.unwrap().unwrap();
        }
        let (mut client, request) = (clients[i % clients.len()].clone(), request(i));
        calls.spawn(async move {
            client.place_order(request).await.unwrap_or_else(|e| panic!("call {i}: {e:?}"));
        });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }
}
