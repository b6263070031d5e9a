//! The embedded SQLite store.
//!
//! One file in WAL mode with `synchronous=FULL`, so an acknowledged order
//! survives power loss. Writes go through a pool of exactly one connection and
//! start with `BEGIN IMMEDIATE` (a deferred transaction that reads first fails
//! with `SQLITE_BUSY_SNAPSHOT` once another writer commits); reads use a
//! separate read-only pool and run beside the writer. Another process holding
//! the lock past the busy timeout answers `UNAVAILABLE`.

use std::{str::FromStr, time::Duration};

use sqlx::{
    SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use uuid::Uuid;

use super::{Placement, StoreOptions};
use crate::{
    domain::{
        AccountId, ClientRequestId, NewOrder, Order, OrderId, OrderStatus, OrderType,
        PositiveDecimal, Side, Symbol, TimeInForce, Timestamp,
    },
    error::Error,
};

/// The order columns, in the order [`OrderRow`] reads them.
macro_rules! order_columns {
    () => {
        "order_id, account_id, client_request_id, symbol, side, order_type, quantity, limit_price, \
         time_in_force, status, create_time, update_time"
    };
}

/// Orders and idempotency keys in one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the file named by `url` and migrates it.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, sqlx::Error> {
        let connect = SqliteConnectOptions::from_str(url)?;
        if connect.get_filename() == std::path::Path::new(":memory:") {
            return Err(sqlx::Error::Configuration(
                "an in-memory SQLite database is not supported: name a file, e.g. sqlite://orders.db".into(),
            ));
        }
        let connect = connect
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(options.lock_timeout)
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(options.lock_timeout)
            .connect_with(connect.clone().create_if_missing(true))
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.lock_timeout)
            .connect_with(connect.read_only(true))
            .await?;
        Ok(Self { writer, reader })
    }

    pub(super) async fn place_order(
        &self,
        account: &AccountId,
        new: NewOrder,
        now: Timestamp,
        ttl: Duration,
    ) -> Result<(Order, Placement), Error> {
        let fingerprint = new.fingerprint();
        let key = new.client_request_id.to_string();
        let order_id = OrderId::generate();
        let mut tx = self
            .writer
            .begin_with("begin immediate")
            .await
            .map_err(db("beginning the order transaction"))?;

        let inserted = sqlx::query(
            r"insert into idempotency_keys
                  (account_id, client_request_id, fingerprint, order_id, create_time, expire_time)
              values (?, ?, ?, ?, ?, ?)
              on conflict (account_id, client_request_id) do nothing",
        )
        .bind(account.as_str())
        .bind(&key)
        .bind(&fingerprint.0[..])
        .bind(order_id.to_string())
        .bind(now.as_micros())
        .bind(now.add(ttl).as_micros())
        .execute(&mut *tx)
        .await
        .map_err(db("inserting the idempotency key"))?
        .rows_affected()
            == 1;

        let placement = if inserted {
            Placement::Created
        } else {
            let (stored_fingerprint, stored_order_id, expire_time): (Vec<u8>, String, i64) =
                sqlx::query_as(
                    r"select fingerprint, order_id, expire_time from idempotency_keys
                  where account_id = ? and client_request_id = ?",
                )
                .bind(account.as_str())
                .bind(&key)
                .fetch_one(&mut *tx)
                .await
                .map_err(db("reading the idempotency key"))?;

            if expire_time > now.as_micros() {
                let existing = fetch_order(&mut tx, &stored_order_id).await?;
                tx.commit()
                    .await
                    .map_err(db("ending the replay transaction"))?;
                if stored_fingerprint == fingerprint.0 {
                    return Ok((existing, Placement::Replayed));
                }
                let mismatched = new.mismatched_fields(&existing);
                return Err(Error::KeyReused {
                    order_id: existing.order_id,
                    mismatched,
                });
            }
            sqlx::query(
                r"update idempotency_keys
                  set fingerprint = ?, order_id = ?, create_time = ?, expire_time = ?
                  where account_id = ? and client_request_id = ?",
            )
            .bind(&fingerprint.0[..])
            .bind(order_id.to_string())
            .bind(now.as_micros())
            .bind(now.add(ttl).as_micros())
            .bind(account.as_str())
            .bind(&key)
            .execute(&mut *tx)
            .await
            .map_err(db("replacing the expired idempotency key"))?;
            Placement::ExpiredReuse
        };

        let order = new.into_order(account.clone(), order_id, now);
        sqlx::query(concat!(
            "insert into orders (",
            order_columns!(),
            ") values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(order.order_id.to_string())
        .bind(order.account_id.as_str())
        .bind(order.client_request_id.to_string())
        .bind(order.symbol.as_str())
        .bind(order.side.as_str())
        .bind(order.order_type.as_str())
        .bind(order.quantity.to_string())
        .bind(order.limit_price.map(|p| p.to_string()))
        .bind(order.time_in_force.as_str())
        .bind(order.status.as_str())
        .bind(order.create_time.as_micros())
        .bind(order.update_time.as_micros())
        .execute(&mut *tx)
        .await
        .map_err(db("inserting the order"))?;
        tx.commit().await.map_err(db("committing the order"))?;
        Ok((order, placement))
    }

    pub(super) async fn get_order(&self, account: &AccountId, id: OrderId) -> Result<Order, Error> {
        let row: Option<OrderRow> = sqlx::query_as(concat!(
            "select ",
            order_columns!(),
            " from orders where order_id = ? and account_id = ?"
        ))
        .bind(id.to_string())
        .bind(account.as_str())
        .fetch_optional(&self.reader)
        .await
        .map_err(db("reading the order"))?;
        row.ok_or(Error::NotFound)?.try_into()
    }

    pub(super) async fn get_order_by_key(
        &self,
        account: &AccountId,
        key: ClientRequestId,
        now: Timestamp,
    ) -> Result<Order, Error> {
        let live: Option<OrderRow> = sqlx::query_as(concat!(
            "select ",
            order_columns!(),
            r" from orders where order_id = (
                   select order_id from idempotency_keys
                   where account_id = ? and client_request_id = ? and expire_time > ?)"
        ))
        .bind(account.as_str())
        .bind(key.to_string())
        .bind(now.as_micros())
        .fetch_optional(&self.reader)
        .await
        .map_err(db("reading the order by its key"))?;
        if let Some(row) = live {
            return row.try_into();
        }
        let newest: Option<OrderRow> = sqlx::query_as(concat!(
            "select ",
            order_columns!(),
            r" from orders where account_id = ? and client_request_id = ?
               order by create_time desc, order_id desc limit 1"
        ))
        .bind(account.as_str())
        .bind(key.to_string())
        .fetch_optional(&self.reader)
        .await
        .map_err(db("reading the newest order of a key"))?;
        newest.ok_or(Error::NotFound)?.try_into()
    }

    pub(super) async fn purge_expired_keys(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> Result<u64, Error> {
        let result = sqlx::query(
            r"delete from idempotency_keys
              where (account_id, client_request_id) in (
                  select account_id, client_request_id from idempotency_keys
                  where expire_time <= ? order by expire_time limit ?)",
        )
        .bind(now.as_micros())
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await
        .map_err(db("purging expired idempotency keys"))?;
        Ok(result.rows_affected())
    }

    pub(super) async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }
}

async fn fetch_order(tx: &mut sqlx::SqliteConnection, order_id: &str) -> Result<Order, Error> {
    let row: OrderRow = sqlx::query_as(concat!(
        "select ",
        order_columns!(),
        " from orders where order_id = ?"
    ))
    .bind(order_id)
    .fetch_one(tx)
    .await
    .map_err(db("reading the order of an idempotency key"))?;
    row.try_into()
}

/// Maps a sqlx error to `UNAVAILABLE` when retrying later can succeed (busy,
/// locked, read-only, I/O, pool exhausted or closed), else to `INTERNAL`.
fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |error| {
        let unavailable = match &error {
            sqlx::Error::Database(e) => e
                .code()
                .and_then(|code| code.parse::<i32>().ok())
                // Primary result codes: BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN.
                .is_some_and(|code| matches!(code & 0xff, 5 | 6 | 8 | 10 | 13 | 14)),
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            _ => false,
        };
        if unavailable {
            Error::Unavailable {
                context,
                source: error.into(),
            }
        } else {
            Error::internal(context, error)
        }
    }
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    order_id: String,
    account_id: String,
    client_request_id: String,
    symbol: String,
    side: String,
    order_type: String,
    quantity: String,
    limit_price: Option<String>,
    time_in_force: String,
    status: String,
    create_time: i64,
    update_time: i64,
}

impl TryFrom<OrderRow> for Order {
    type Error = Error;

    fn try_from(row: OrderRow) -> Result<Self, Error> {
        let corrupt = |what: &str| {
            Error::internal(
                "decoding a stored order",
                format!("bad {what} in row {}", row.order_id),
            )
        };
        let uuid = |s: &str, what: &str| Uuid::try_parse(s).map_err(|_| corrupt(what));
        let decimal = |s: &str, what: &str| PositiveDecimal::parse(s).map_err(|_| corrupt(what));
        Ok(Order {
            order_id: OrderId::from_uuid(uuid(&row.order_id, "order_id")?),
            client_request_id: ClientRequestId::from_uuid(uuid(
                &row.client_request_id,
                "client_request_id",
            )?),
            account_id: AccountId::new(row.account_id.clone()),
            symbol: Symbol::parse(&row.symbol).map_err(|_| corrupt("symbol"))?,
            side: Side::from_str_opt(&row.side).ok_or_else(|| corrupt("side"))?,
            order_type: OrderType::from_str_opt(&row.order_type)
                .ok_or_else(|| corrupt("order_type"))?,
            quantity: decimal(&row.quantity, "quantity")?,
            limit_price: row
                .limit_price
                .as_deref()
                .map(|p| decimal(p, "limit_price"))
                .transpose()?,
            time_in_force: TimeInForce::from_str_opt(&row.time_in_force)
                .ok_or_else(|| corrupt("time_in_force"))?,
            status: OrderStatus::from_str_opt(&row.status).ok_or_else(|| corrupt("status"))?,
            create_time: Timestamp::from_micros(row.create_time),
            update_time: Timestamp::from_micros(row.update_time),
        })
    }
}
