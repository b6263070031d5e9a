//! ListOrders: stable keyset paging, filters, page sizes and page tokens.

use std::{collections::HashSet, time::Duration};

use order_service::proto::{
    CancelOrderRequest, ListOrdersRequest, ListOrdersResponse, Order, OrderStatus,
    order_service_client::OrderServiceClient,
};
use tokio::task::JoinSet;
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

use crate::helpers::{Engine, TestApp, engine_tests, limit_order, new_key, spawn_app};

/// Places `n` orders of `symbol`, `batch` at a time concurrently; the clock
/// moves 1 ms between batches, so orders in one batch share a create_time.
async fn place_many(app: &TestApp, n: usize, symbol: &str, batch: usize) -> Vec<Order> {
    let mut placed = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(batch) {
        let mut calls = JoinSet::new();
        for _ in chunk {
            let mut client = app.client.clone();
            let mut req = limit_order(&new_key());
            req.symbol = symbol.to_owned();
            calls.spawn(async move { client.place_order(req).await.unwrap().into_inner().order.unwrap() });
        }
        placed.extend(calls.join_all().await);
        app.clock.advance(Duration::from_millis(1));
    }
    placed
}

/// Newest first, ties by order_id: the order ListOrders promises.
fn newest_first(mut orders: Vec<Order>) -> Vec<String> {
    orders.sort_by_key(|o| {
        let t = o.create_time.unwrap();
        std::cmp::Reverse((t.seconds, t.nanos, o.order_id.clone()))
    });
    orders.into_iter().map(|o| o.order_id).collect()
}

async fn list(client: &mut OrderServiceClient<Channel>, req: ListOrdersRequest) -> ListOrdersResponse {
    client.list_orders(req).await.expect("ListOrders succeeds").into_inner()
}

/// Every page of a listing, until the empty token.
async fn all_pages(client: &mut OrderServiceClient<Channel>, mut req: ListOrdersRequest) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    for _ in 0..1000 {
        let page = list(client, req.clone()).await;
        pages.push(page.orders.into_iter().map(|o| o.order_id).collect());
        if page.next_page_token.is_empty() {
            return pages;
        }
        req.page_token = page.next_page_token;
    }
    panic!("the listing never ended");
}

async fn paging_through_250_orders_by_40_returns_each_exactly_once_in_order(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let placed = place_many(&app, 250, "AAPL", 50).await;
    let pages = all_pages(&mut app.client, ListOrdersRequest { page_size: 40, ..Default::default() }).await;
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [40, 40, 40, 40, 40, 40, 10]);
    assert_eq!(pages.concat(), newest_first(placed));
}

async fn orders_placed_between_page_calls_are_neither_skipped_nor_repeated(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let placed = place_many(&app, 100, "AAPL", 25).await;
    let first = list(&mut app.client, ListOrdersRequest { page_size: 30, ..Default::default() }).await;
    // New orders arrive: at the same instant as the newest ones, and later.
    place_many(&app, 20, "AAPL", 20).await;
    let mut rest = all_pages(
        &mut app.client,
        ListOrdersRequest { page_size: 30, page_token: first.next_page_token, ..Default::default() },
    )
    .await
    .concat();
    let mut listed: Vec<String> = first.orders.into_iter().map(|o| o.order_id).collect();
    listed.append(&mut rest);
    assert_eq!(listed, newest_first(placed), "the listing as of its first page, each once");
}

async fn filters_by_symbol_and_status(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let aapl = place_many(&app, 6, "AAPL", 6).await;
    let msft = place_many(&app, 4, "MSFT", 4).await;
    for order in [&aapl[0], &aapl[1], &msft[0]] {
        let req = CancelOrderRequest { order_id: order.order_id.clone() };
        app.client.cancel_order(req).await.unwrap();
    }
    let ids = |orders: &[Order]| orders.iter().map(|o| o.order_id.clone()).collect::<HashSet<_>>();
    let cases = [
        ("MSFT", OrderStatus::Unspecified, ids(&msft)),
        ("AAPL", OrderStatus::Canceled, ids(&aapl[..2])),
        ("", OrderStatus::Canceled, ids(&[aapl[0].clone(), aapl[1].clone(), msft[0].clone()])),
        ("AAPL", OrderStatus::New, ids(&aapl[2..])),
        ("TSLA", OrderStatus::Unspecified, HashSet::new()),
    ];
    for (symbol, status, expected) in cases {
        let req = ListOrdersRequest {
            page_size: 2,
            symbol: symbol.to_owned(),
            status: status as i32,
            ..Default::default()
        };
        let listed = all_pages(&mut app.client, req).await.concat();
        assert_eq!(listed.len(), expected.len(), "{symbol:?} {status:?}: no repeats");
        assert_eq!(listed.into_iter().collect::<HashSet<_>>(), expected, "{symbol:?} {status:?}");
    }
    let all = list(&mut app.client, ListOrdersRequest::default()).await;
    assert_eq!(all.orders.len(), 10);
    assert!(all.next_page_token.is_empty());
}

async fn page_sizes_default_to_50_and_clamp_to_1000(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let empty = list(&mut app.client, ListOrdersRequest::default()).await;
    assert!(empty.orders.is_empty() && empty.next_page_token.is_empty());

    place_many(&app, 1001, "AAPL", 100).await;
    let default = list(&mut app.client, ListOrdersRequest::default()).await;
    assert_eq!(default.orders.len(), 50);
    assert!(!default.next_page_token.is_empty());
    let clamped = list(&mut app.client, ListOrdersRequest { page_size: 5000, ..Default::default() }).await;
    assert_eq!(clamped.orders.len(), 1000);
    let last = list(
        &mut app.client,
        ListOrdersRequest { page_size: 5000, page_token: clamped.next_page_token, ..Default::default() },
    )
    .await;
    assert_eq!(last.orders.len(), 1);
    assert!(last.next_page_token.is_empty());
}

async fn bad_requests_and_tampered_or_reused_tokens_are_invalid_arguments(engine: Engine) {
    let mut app = spawn_app(engine).await;
    place_many(&app, 3, "AAPL", 3).await;
    let first = list(&mut app.client, ListOrdersRequest { page_size: 1, ..Default::default() }).await;
    let token = first.next_page_token;
    let mut flipped = token.clone().into_bytes();
    flipped[5] = if flipped[5] == b'a' { b'b' } else { b'a' };
    let flipped = String::from_utf8(flipped).unwrap();

    let with_token =
        |t: &str| ListOrdersRequest { page_size: 1, page_token: t.to_owned(), ..Default::default() };
    let cases = [
        ("negative page size", ListOrdersRequest { page_size: -1, ..Default::default() }, "page_size"),
        ("bad symbol", ListOrdersRequest { symbol: "aapl".into(), ..Default::default() }, "symbol"),
        ("unknown status", ListOrdersRequest { status: 7, ..Default::default() }, "status"),
        ("garbage token", with_token("not-a-token"), "page_token"),
        ("tampered token", with_token(&flipped), "page_token"),
        ("truncated token", with_token(&token[..token.len() - 2]), "page_token"),
        (
            "token with another symbol",
            ListOrdersRequest { symbol: "AAPL".into(), ..with_token(&token) },
            "page_token",
        ),
        (
            "token with another status",
            ListOrdersRequest { status: OrderStatus::New as i32, ..with_token(&token) },
            "page_token",
        ),
    ];
    for (name, req, field) in cases {
        let status = app.client.list_orders(req).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}");
        let details = status.get_error_details();
        let violations = &details.bad_request().expect("BadRequest").field_violations;
        assert_eq!(violations[0].field, field, "{name}");
    }
    // The untouched token still works, with a different page size too.
    let next = list(&mut app.client, ListOrdersRequest { page_size: 5, ..with_token(&token) }).await;
    assert_eq!(next.orders.len(), 2);
}

engine_tests!(
    paging_through_250_orders_by_40_returns_each_exactly_once_in_order,
    orders_placed_between_page_calls_are_neither_skipped_nor_repeated,
    filters_by_symbol_and_status,
    page_sizes_default_to_50_and_clamp_to_1000,
    bad_requests_and_tampered_or_reused_tokens_are_invalid_arguments,
);
