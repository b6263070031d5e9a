//! Persistence: the one place that speaks SQL.
//!
//! [`Store`] is chosen by the database URL (`sqlite://…` or `postgres://…`)
//! and hides which engine is behind it; the gRPC layer only sees domain types
//! and [`Error`]. Each engine has its own module and its own embedded
//! migrations under `migrations/<engine>`, and supplies statements; the
//! flows over them are written once: the PlaceOrder transaction in `place`
//! (whether its write was sent is tracked in `attempt`, so that a call cut
//! short says truthfully what was written), the others in `flows`.
//!
//! Times are the store's: on Postgres the database server's clock (one clock
//! for every replica), on SQLite the configured [`Clock`] of the process,
//! read when the statement runs.

mod attempt;
mod batch;
mod flows;
mod place;
mod postgres;
mod sqlite;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::{
    clock::{Clock, SystemClock},
    domain::{
        AccountId, ClientRequestId, Cursor, NewOrder, Order, OrderFilter, OrderId, OrderStatus, OrderType,
        PositiveDecimal, Side, Symbol, TimeInForce, Timestamp,
    },
    error::Error,
};

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// How the store connects.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most pooled connections (SQLite: readers; writes use one connection).
    pub max_connections: u32,
    /// How long a write waits for a lock (SQLite's database lock, Postgres's
    /// lock on a key another call is placing).
    pub lock_timeout: Duration,
    /// How long a call waits for a pooled connection, including opening one.
    pub acquire_timeout: Duration,
    /// SQLite: most PlaceOrders committed together (group commit); 1 turns
    /// batching off.
    pub sqlite_max_batch: usize,
    /// Postgres: most PlaceOrders committed together (group commit); 1 is
    /// the ordinary path alone.
    pub pg_max_batch: usize,
    /// SQLite: where times come from (Postgres reads the database server's
    /// clock instead).
    pub clock: Arc<dyn Clock>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            lock_timeout: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(5),
            sqlite_max_batch: 256,
            pg_max_batch: 256,
            clock: Arc::new(SystemClock),
        }
    }
}

/// What `place_order` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A new key: the order was created.
    Created,
    /// A live key with the same payload: the persisted order, nothing written.
    Replayed,
    /// An expired key: a new order was created and the key now points to it.
    ExpiredReuse,
}

impl Placement {
    /// The outcome name used in logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Replayed => "replayed",
            Self::ExpiredReuse => "expired_reuse",
        }
    }
}

/// The order database, whichever engine it is.
#[derive(Debug, Clone)]
pub enum Store {
    /// An embedded SQLite file.
    Sqlite(SqliteStore),
    /// A Postgres server, shared by any number of replicas.
    Postgres(PgStore),
}

/// Calls the same method on whichever engine `$store` is.
macro_rules! dispatch {
    ($store:expr, $s:ident => $call:expr) => {
        match $store {
            Store::Sqlite($s) => $call,
            Store::Postgres($s) => $call,
        }
    };
}

impl Store {
    /// Connects to `url` (`sqlite://PATH`, created if missing, or
    /// `postgres://…`) and applies the embedded migrations.
    pub async fn connect(url: &str, options: &StoreOptions) -> anyhow::Result<Self> {
        let shown = redact(url);
        if url.starts_with("sqlite:") {
            let store = SqliteStore::connect(url, options)
                .await
                .with_context(|| format!("cannot open database {shown}"))?;
            Ok(Self::Sqlite(store))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let store = PgStore::connect(url, options)
                .await
                .with_context(|| format!("cannot open database {shown}"))?;
            Ok(Self::Postgres(store))
        } else {
            anyhow::bail!("unsupported database URL {shown:?}: expected sqlite://PATH or postgres://…")
        }
    }

    /// Places `order` for `account` exactly once per key (see `place`):
    /// creates it, replays the order the key already placed, or refuses a key
    /// reused with other fields (`Error::KeyReused`, nothing written). Waits at
    /// most `lock_wait` for a lock held by another call, and answers by
    /// `deadline`: `DeadlineExceeded` if the write was not sent by then
    /// (nothing written, ever), `OutcomeUnknown` if it was.
    pub async fn place_order(
        &self,
        account: &AccountId,
        order: NewOrder,
        ttl: Duration,
        lock_wait: Duration,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(Order, Placement), Error> {
        let key = order.client_request_id;
        let attempt = Arc::new(attempt::Attempt::default());
        // However the caller's wait ends (answered, cut short by its
        // deadline, cancelled), a write not yet sent never will be.
        let _abandon = attempt::AbandonOnDrop(&attempt);
        // Not a task of its own: what must never be dropped half-way (a
        // transaction) runs in one, spawned by `batch` (the batch writer, or
        // the task placing one order alone); the caller only waits, and gives
        // up by `attempt`, which that task heeds before sending its write.
        let placing = async {
            dispatch!(self, s => batch::place_order(s, account, order, ttl, lock_wait, &attempt).await)
        };
        match deadline {
            None => placing.await,
            Some(deadline) => tokio::time::timeout_at(deadline, placing)
                .await
                .unwrap_or_else(|_| Err(attempt.cut_short(key))),
        }
    }

    /// The account's order with this id.
    pub async fn get_order(&self, account: &AccountId, id: OrderId) -> Result<Order, Error> {
        dispatch!(self, s => flows::get_order(s, account, id).await)
    }

    /// The order the account's live key points to; once the key has expired
    /// or been purged, the newest of the account's orders placed with it.
    pub async fn get_order_by_key(&self, account: &AccountId, key: ClientRequestId) -> Result<Order, Error> {
        dispatch!(self, s => flows::get_order_by_key(s, account, key).await)
    }

    /// Up to `limit` of the account's orders matching `filter`, newest first
    /// (by `create_time`, then `order_id`), starting after `after`.
    pub async fn list_orders(
        &self,
        account: &AccountId,
        filter: &OrderFilter,
        after: Option<Cursor>,
        limit: u32,
    ) -> Result<Vec<Order>, Error> {
        dispatch!(self, s => flows::Statements::orders_page(s, account, filter, after, limit).await)
    }

    /// Cancels the account's order if it is `NEW`; returns the order as it
    /// now is and whether this call changed it. `NotFound` if there is no such
    /// order for this account.
    pub async fn cancel_order(&self, account: &AccountId, id: OrderId) -> Result<(Order, bool), Error> {
        dispatch!(self, s => flows::cancel_order(s, account, id).await)
    }

    /// Deletes at most `limit` keys that have expired (on the store's
    /// clock); returns how many it deleted. Orders are never deleted.
    pub async fn purge_expired_keys(&self, limit: u32) -> Result<u64, Error> {
        dispatch!(self, s => flows::Statements::delete_expired_keys(s, limit).await)
    }

    /// The readiness probe: whether the database answers and takes writes
    /// (SQLite: one row rewritten; Postgres: not a standby, not read-only).
    pub async fn ping(&self) -> Result<(), Error> {
        dispatch!(self, s => s.ping().await)
    }

    /// The engine, as OpenTelemetry's `db.system.name` spells it.
    pub fn system(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgresql",
        }
    }

    /// Each pool's name, size and idle connections, for metrics.
    pub fn pool_stats(&self) -> Vec<(&'static str, u32, usize)> {
        dispatch!(self, s => s.pool_stats())
    }

    /// Whether group commit's writers have tried batches for `after` and
    /// written none (false without group commit, or without calls).
    pub fn writers_stuck(&self, after: Duration) -> bool {
        use batch::GroupCommit as _;
        let queues = match self {
            Store::Sqlite(s) => s.queues(),
            Store::Postgres(s) => s.queues(),
        };
        queues.is_some_and(|queues| queues.progress.stuck(after))
    }

    /// Closes every pooled connection, waiting for those in use.
    pub async fn close(&self) {
        dispatch!(self, s => s.close().await)
    }
}

/// A database URL fit for logs and errors: parsed, with the password of its
/// user part and any query parameter whose name holds `pass` (`password`,
/// `sslpassword`, `passwd`, …) replaced by `***`. A URL
/// that does not parse as one with an authority (`scheme://…`) is shown as
/// its scheme alone, since where its secret sits cannot be known. SQLite
/// URLs name a file and carry no secret: they are shown as they are.
pub fn redact(url: &str) -> String {
    if url.starts_with("sqlite:") {
        return url.to_owned();
    }
    let scheme_only = || match url.split_once(':') {
        Some((scheme, _)) if scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)) => {
            format!("{scheme}://(unparsable URL hidden)")
        }
        _ => "(unparsable URL hidden)".to_owned(),
    };
    let Ok(mut parsed) = url::Url::parse(url) else {
        return scheme_only();
    };
    if parsed.cannot_be_a_base() || !url.contains("://") {
        return scheme_only();
    }
    if parsed.password().is_some() && parsed.set_password(Some("***")).is_err() {
        return scheme_only();
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(key, value)| {
                // password, sslpassword, passwd, PASSWORD, …
                let hidden = key.to_ascii_lowercase().contains("pass");
                (key.into_owned(), if hidden { "***".to_owned() } else { value.into_owned() })
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// An order row in engine-neutral types, checked into an [`Order`].
struct OrderRecord {
    order_id: Uuid,
    account_id: String,
    client_request_id: Uuid,
    symbol: String,
    side: String,
    order_type: String,
    quantity: Decimal,
    limit_price: Option<Decimal>,
    time_in_force: String,
    status: String,
    create_time: Timestamp,
    update_time: Timestamp,
}

impl TryFrom<OrderRecord> for Order {
    type Error = Error;

    /// Refuses (as `INTERNAL`) a row no valid request could have written.
    fn try_from(r: OrderRecord) -> Result<Self, Error> {
        let corrupt = |what: &str| {
            Error::internal("decoding a stored order", format!("bad {what} in order {}", r.order_id))
        };
        let decimal = |d: Decimal, what: &str| PositiveDecimal::from_decimal(d).ok_or_else(|| corrupt(what));
        Ok(Order {
            order_id: OrderId::from_uuid(r.order_id),
            client_request_id: ClientRequestId::from_uuid(r.client_request_id),
            account_id: AccountId::new(r.account_id.clone()),
            symbol: Symbol::parse(&r.symbol).map_err(|_| corrupt("symbol"))?,
            side: Side::from_str_opt(&r.side).ok_or_else(|| corrupt("side"))?,
            order_type: OrderType::from_str_opt(&r.order_type).ok_or_else(|| corrupt("order_type"))?,
            quantity: decimal(r.quantity, "quantity")?,
            limit_price: r.limit_price.map(|p| decimal(p, "limit_price")).transpose()?,
            time_in_force: TimeInForce::from_str_opt(&r.time_in_force)
                .ok_or_else(|| corrupt("time_in_force"))?,
            status: OrderStatus::from_str_opt(&r.status).ok_or_else(|| corrupt("status"))?,
            create_time: r.create_time,
            update_time: r.update_time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/orders?sslmode=require"),
            "postgres://app:***@db:5432/orders?sslmode=require"
        );
        assert_eq!(redact("postgres://app@db/orders"), "postgres://app@db/orders");
        assert_eq!(redact("postgres://db/orders"), "postgres://db/orders");
        assert_eq!(redact("sqlite://orders.db"), "sqlite://orders.db");
        assert_eq!(
            redact("sqlite:///var/lib/orders/orders.db?mode=rwc"),
            "sqlite:///var/lib/orders/orders.db?mode=rwc"
        );
    }

    /// Passwords with the characters that end a URL's parts (`/`, `?`,
    /// `@`, `#`, `%`), passwords as query parameters, and URLs that do not
    /// parse: the password is never shown.
    #[test]
    fn redact_never_shows_a_password_however_it_is_written() {
        for (url, secret) in [
            ("postgres://app:hun/ter2@db/orders", "ter2"),
            ("postgres://app:hun?ter2@db/orders", "ter2"),
            ("postgres://app:hun#ter2@db/orders", "ter2"),
            ("postgres://app:p@ss@db/orders", "p@ss"),
            ("postgres://app:p%40ss%2Fw0rd@db/orders", "w0rd"),
            ("postgres://app:p%ZZss@db/orders", "ZZss"),
            ("postgres://h/orders?user=app&password=hunter2", "hunter2"),
            ("postgres://h/orders?user=app&PASSWORD=hunter2&sslmode=require", "hunter2"),
            ("postgres://h/orders?sslpassword=hunter2", "hunter2"),
            ("postgres://h/orders?passwd=hunter2", "hunter2"),
            ("postgres://h/orders?password%3D=hunter2", "hunter2"),
            ("postgres:app:hunter2@db/orders", "hunter2"),
            ("postgresql://app:hunter2@[::1", "hunter2"),
            ("app:hunter2@db", "hunter2"),
            ("hunter2", "hunter2"),
        ] {
            let shown = redact(url);
            assert!(!shown.contains(secret), "{url} was shown as {shown}");
        }
        assert_eq!(
            redact("postgres://h/orders?user=app&password=hunter2"),
            "postgres://h/orders?user=app&password=***"
        );
        assert_eq!(redact("postgres:app:hunter2@db/orders"), "postgres://(unparsable URL hidden)");
    }
}
