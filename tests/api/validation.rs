//! Validation: every bad field is named at once, nothing is written, and the
//! key is not consumed.

use order_service::proto::{OrderType, PlaceOrderRequest};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{Engine, engine_tests, limit_order, new_key, spawn_app, spawn_app_with};

type Mutation = fn(&mut PlaceOrderRequest);

async fn every_bad_field_is_named_and_the_key_is_not_consumed(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let cases: &[(&str, Mutation, &[&str])] = &[
        ("missing key", |r| r.client_request_id.clear(), &["client_request_id"]),
        ("key not a UUID", |r| r.client_request_id = "order-1".into(), &["client_request_id"]),
        (
            "key without hyphens",
            |r| r.client_request_id = r.client_request_id.replace('-', ""),
            &["client_request_id"],
        ),
        (
            "key in braces",
            |r| r.client_request_id = format!("{{{}}}", r.client_request_id),
            &["client_request_id"],
        ),
        ("nil key", |r| r.client_request_id = uuid::Uuid::nil().to_string(), &["client_request_id"]),
        ("missing symbol", |r| r.symbol.clear(), &["symbol"]),
        ("lower-case symbol", |r| r.symbol = "aapl".into(), &["symbol"]),
        ("symbol too long", |r| r.symbol = "A".repeat(33), &["symbol"]),
        ("symbol starts with a dash", |r| r.symbol = "-AAPL".into(), &["symbol"]),
        ("symbol with a space", |r| r.symbol = "AA PL".into(), &["symbol"]),
        ("missing side", |r| r.side = 0, &["side"]),
        ("unknown side", |r| r.side = 9, &["side"]),
        ("missing order type", |r| r.order_type = 0, &["order_type"]),
        ("unknown order type", |r| r.order_type = -1, &["order_type"]),
        ("unknown time in force", |r| r.time_in_force = 4, &["time_in_force"]),
        ("missing quantity", |r| r.quantity.clear(), &["quantity"]),
        ("zero quantity", |r| r.quantity = "0.000".into(), &["quantity"]),
        ("negative quantity", |r| r.quantity = "-1".into(), &["quantity"]),
        ("signed quantity", |r| r.quantity = "+1".into(), &["quantity"]),
        ("exponent quantity", |r| r.quantity = "1e3".into(), &["quantity"]),
        ("bare fraction", |r| r.quantity = ".5".into(), &["quantity"]),
        ("trailing point", |r| r.quantity = "1.".into(), &["quantity"]),
        ("padded quantity", |r| r.quantity = " 1".into(), &["quantity"]),
        ("19 decimals", |r| r.quantity = "0.0000000000000000001".into(), &["quantity"]),
        ("29 significant digits", |r| r.quantity = "12345678901.123456789012345678".into(), &["quantity"]),
        ("limit without price", |r| r.limit_price.clear(), &["limit_price"]),
        ("bad price", |r| r.limit_price = "1,5".into(), &["limit_price"]),
        ("market with price", |r| r.order_type = OrderType::Market as i32, &["limit_price"]),
        (
            "everything wrong at once",
            |r| {
                *r = PlaceOrderRequest {
                    client_request_id: "x".into(),
                    symbol: "x".into(),
                    side: 5,
                    order_type: 0,
                    quantity: "x".into(),
                    limit_price: "x".into(),
                    time_in_force: 9,
                }
            },
            &[
                "client_request_id",
                "symbol",
                "side",
                "order_type",
                "quantity",
                "limit_price",
                "time_in_force",
            ],
        ),
    ];

    for (name, mutate, fields) in cases {
        let key = new_key();
        let mut req = limit_order(&key);
        mutate(&mut req);
        let status = app.client.place_order(req).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "case {name:?}");
        let details = status.get_error_details();
        let named: Vec<&str> = details
            .bad_request()
            .unwrap_or_else(|| panic!("case {name:?}: no BadRequest"))
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(named, *fields, "case {name:?}: violations {:?}", details.bad_request());
        assert!(!status.message().to_lowercase().contains("sql"), "case {name:?}: {}", status.message());

        // The key was not consumed: the same key with a valid payload is a new order.
        let placed = app.client.place_order(limit_order(&key)).await;
        let placed = placed.unwrap_or_else(|e| panic!("case {name:?}: valid retry failed: {e}"));
        assert!(!placed.into_inner().replayed, "case {name:?}");
    }
    assert_eq!(app.count("orders").await, cases.len() as i64, "only the valid retries wrote");
}

async fn a_huge_field_is_refused_without_echoing_it_whole(engine: Engine) {
    // Raise the request size limit so validation, not the limit, refuses it.
    let mut app = spawn_app_with(engine, |c| c.max_request_size = 4 * 1024 * 1024).await;
    let mut req = limit_order(&new_key());
    req.symbol = "A".repeat(1_000_000);
    req.quantity = "9".repeat(500_000);
    let status = app.client.place_order(req).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().len() < 1_000, "message is {} bytes", status.message().len());
    assert!(status.details().len() < 2_000, "details carry {} bytes", status.details().len());
}

engine_tests!(
    every_bad_field_is_named_and_the_key_is_not_consumed,
    a_huge_field_is_refused_without_echoing_it_whole,
);
