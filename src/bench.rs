//! `order-service bench-store`: the service's own PlaceOrder transaction
//! driven straight into the database, without gRPC, by the closed loop of
//! `orderctl bench` ([`order_client::bench::drive`]): the database's limit,
//! to set beside what the service reaches over gRPC.

use std::time::Duration;

use order_client::bench::{BenchReport, Caller, Mode, drive};

use crate::{
    config::BenchStore,
    domain::{AccountId, ClientRequestId, NewOrder, OrderType, PositiveDecimal, Side, Symbol, TimeInForce},
    store::{Store, StoreOptions},
};

/// A worker's handle on the store.
struct Placer {
    store: Store,
    account: AccountId,
}

impl Caller for Placer {
    async fn call(&mut self, key: uuid::Uuid) -> Result<(), String> {
        let (ttl, lock_wait) = (Duration::from_secs(24 * 3600), Duration::from_secs(5));
        self.store
            .place_order(&self.account, new_order(key), ttl, lock_wait, None)
            .await
            .map(drop)
            .map_err(|e| order_client::code_name(e.code()).to_owned())
    }
}

/// The order every call places (with its own key): the one `orderctl bench`
/// sends.
fn new_order(key: uuid::Uuid) -> NewOrder {
    // Fixed, valid values: parsing cannot fail.
    let decimal = |s| PositiveDecimal::parse(s).unwrap_or_else(|_| unreachable!());
    NewOrder {
        client_request_id: ClientRequestId::from_uuid(key),
        symbol: Symbol::parse("BENCH").unwrap_or_else(|_| unreachable!()),
        side: Side::Buy,
        order_type: OrderType::Limit,
        quantity: decimal("10"),
        limit_price: Some(decimal("100.25")),
        time_in_force: TimeInForce::Gtc,
    }
}

/// Runs `bench` and reports.
pub async fn run(bench: &BenchStore) -> anyhow::Result<BenchReport> {
    let options = StoreOptions { max_connections: bench.concurrency, ..StoreOptions::default() };
    let store = Store::connect(&bench.database_url, &options).await?;
    let callers = (0..bench.concurrency)
        .map(|_| Placer { store: store.clone(), account: AccountId::new("bench") })
        .collect();
    let mode = if bench.replay {
        Mode::Replay
    } else {
        Mode::Place { duplicate_ratio: bench.duplicate_ratio.clamp(0.0, 1.0) }
    };
    let report = drive(callers, mode, bench.duration).await;
    store.close().await;
    report
}
