//! GetOrder by order id and by client_request_id.

use order_service::proto::{GetOrderRequest, get_order_request::Lookup};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{Engine, engine_tests, limit_order, new_key, spawn_app};

fn by_id(id: &str) -> GetOrderRequest {
    GetOrderRequest { lookup: Some(Lookup::OrderId(id.to_owned())) }
}

fn by_key(key: &str) -> GetOrderRequest {
    GetOrderRequest { lookup: Some(Lookup::ClientRequestId(key.to_owned())) }
}

async fn an_order_is_found_by_its_id_and_by_its_key_in_any_case(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let key = new_key();
    let placed = app.client.place_order(limit_order(&key)).await.unwrap().into_inner().order.unwrap();

    let found = app.client.get_order(by_id(&placed.order_id)).await.unwrap().into_inner();
    assert_eq!(found, placed);
    let found = app.client.get_order(by_id(&placed.order_id.to_uppercase())).await.unwrap().into_inner();
    assert_eq!(found, placed);
    let found = app.client.get_order(by_key(&key.to_uppercase())).await.unwrap().into_inner();
    assert_eq!(found, placed);
}

async fn unknown_orders_are_not_found(engine: Engine) {
    let mut app = spawn_app(engine).await;
    app.client.place_order(limit_order(&new_key())).await.unwrap();
    for req in [by_id(&uuid::Uuid::now_v7().to_string()), by_key(&new_key())] {
        let status = app.client.get_order(req.clone()).await.expect_err("not found");
        assert_eq!(status.code(), Code::NotFound, "{req:?}");
    }
}

async fn malformed_lookups_are_invalid_arguments_naming_the_field(engine: Engine) {
    let mut app = spawn_app(engine).await;
    for (req, field) in [
        (by_id("not-a-uuid"), "order_id"),
        (by_id(""), "order_id"),
        (by_id("0123456789abcdef0123456789abcdef"), "order_id"),
        (by_key("123"), "client_request_id"),
        (GetOrderRequest { lookup: None }, "lookup"),
    ] {
        let status = app.client.get_order(req.clone()).await.expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument, "{req:?}");
        let details = status.get_error_details();
        let violations = &details.bad_request().expect("BadRequest").field_violations;
        assert_eq!(violations.len(), 1, "{req:?}");
        assert_eq!(violations[0].field, field, "{req:?}");
    }
}

engine_tests!(
    an_order_is_found_by_its_id_and_by_its_key_in_any_case,
    unknown_orders_are_not_found,
    malformed_lookups_are_invalid_arguments_naming_the_field,
);
