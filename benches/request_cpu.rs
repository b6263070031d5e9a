//! The CPU work each PlaceOrder does before it touches the database:
//! validation and normalization of the request, and its fingerprint.
//!
//! `cargo bench --bench request_cpu`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use order_service::{
    domain::{NewOrder, PositiveDecimal},
    proto::{OrderType, PlaceOrderRequest, Side},
};

fn request() -> PlaceOrderRequest {
    PlaceOrderRequest {
        client_request_id: "123e4567-e89b-12d3-a456-426614174000".to_owned(),
        symbol: "AAPL".to_owned(),
        side: Side::Buy as i32,
        order_type: OrderType::Limit as i32,
        quantity: "0010.500".to_owned(),
        limit_price: "187.50".to_owned(),
        time_in_force: 0,
    }
}

fn bench(c: &mut Criterion) {
    c.bench_function("normalize a decimal", |b| {
        b.iter(|| PositiveDecimal::parse(black_box("0012345.678900")).map(|d| d.to_string()))
    });
    c.bench_function("validate a PlaceOrderRequest", |b| {
        b.iter_batched(request, |r| NewOrder::try_from(black_box(r)), criterion::BatchSize::SmallInput)
    });
    let order = NewOrder::try_from(request()).unwrap_or_else(|e| panic!("{e}"));
    c.bench_function("fingerprint an order", |b| b.iter(|| black_box(&order).fingerprint()));
    let mut invalid = request();
    invalid.symbol = "bad symbol".to_owned();
    invalid.quantity = "1e3".to_owned();
    c.bench_function("refuse an invalid request", |b| {
        b.iter_batched(
            || invalid.clone(),
            |r| NewOrder::try_from(black_box(r)),
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
