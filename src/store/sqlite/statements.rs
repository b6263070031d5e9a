//! The SQLite statements: PlaceOrder's ([`PlaceTx`], inside a batch's
//! transaction, at the batch's time) and the other flows' ([`Statements`]),
//! and the rows they read. Times are stored as microseconds, decimals and
//! UUIDs as text.

use std::time::Duration;

use sqlx::{QueryBuilder, Sqlite, SqliteConnection};
use uuid::Uuid;

use super::{SqliteStore, db};
use crate::{
    domain::{AccountId, ClientRequestId, Cursor, Order, OrderFilter, OrderId, PositiveDecimal, Timestamp},
    error::Error,
    store::{
        OrderRecord,
        batch::{KeyId, key_id},
        flows::{self, Statements},
        place::{self, KeyRecord, PlaceTx, StoredKey},
    },
};

/// The stored keys (each joined with its order) among `keys`, in one query,
/// live if unexpired at `now`.
pub(super) async fn read_keys(
    conn: &mut SqliteConnection,
    keys: &[KeyId],
    now: Timestamp,
) -> Result<std::collections::HashMap<KeyId, StoredKey>, Error> {
    if keys.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let mut query = QueryBuilder::<Sqlite>::new(concat!(
        "select key_account_id, key_client_request_id, key_fingerprint, key_expire_time, ",
        order_columns!(),
        r" from (select k.account_id as key_account_id, k.client_request_id as key_client_request_id,
                        k.fingerprint as key_fingerprint, k.expire_time as key_expire_time,
                        k.order_id as key_order_id
                 from ("
    ));
    // Padded to a power of two, so a reader connection caches at most nine
    // such statements, not one per batch size. The padding is NULLs, which
    // equal nothing, so it finds no rows.
    let padding = keys.len().next_power_of_two() - keys.len();
    let padded = keys.iter().map(Some).chain(std::iter::repeat_n(None, padding));
    query.push_values(padded, |mut row, key| {
        row.push_bind(key.map(|(account, _)| account.as_str())).push_bind(key.map(|(_, key)| key.as_str()));
    });
    query.push(
        r") as wanted
                 join idempotency_keys k
                   on k.account_id = wanted.column1 and k.client_request_id = wanted.column2)
           join orders on orders.order_id = key_order_id",
    );
    let rows: Vec<KeyOrderRow> =
        query.build_query_as().fetch_all(conn).await.map_err(db("reading the idempotency key"))?;
    rows.into_iter()
        .map(|row| {
            let key = (row.key_account_id, row.key_client_request_id);
            let stored = StoredKey {
                fingerprint: Some(row.key_fingerprint),
                live: row.key_expire_time > now.as_micros(),
                order: row.order.try_into()?,
            };
            Ok((key, stored))
        })
        .collect()
}

/// The PlaceOrder statements inside a batch's transaction, at the batch's
/// time (read under the write lock).
pub(super) struct SqliteTx<'c> {
    pub conn: &'c mut SqliteConnection,
    pub now: Timestamp,
}

impl PlaceTx for SqliteTx<'_> {
    async fn insert_key_and_order(
        &mut self,
        key: &KeyRecord<'_>,
        order: &Order,
    ) -> Result<Option<Timestamp>, Error> {
        let now = self.now;
        let result = sqlx::query(
            r"insert into idempotency_keys
                  (account_id, client_request_id, fingerprint, order_id, create_time, expire_time)
              select ?, ?, ?, ?, ?, ?
              where not exists (
                  select 1 from orders
                  where account_id = ? and client_request_id = ? and create_time > ?)
              on conflict (account_id, client_request_id) do nothing",
        )
        .bind(key.account_id.as_str())
        .bind(key.client_request_id.to_string())
        .bind(&key.fingerprint.0[..])
        .bind(key.order_id.to_string())
        .bind(now.as_micros())
        .bind(now.add(key.ttl).as_micros())
        .bind(key.account_id.as_str())
        .bind(key.client_request_id.to_string())
        .bind(now.sub(key.ttl).as_micros())
        .execute(&mut *self.conn)
        .await
        .map_err(db("inserting the idempotency key"))?;
        if result.rows_affected() == 0 {
            return Ok(None);
        }
        self.insert_order(&place::stamped(order.clone(), now)).await?;
        Ok(Some(now))
    }

    async fn read_key(
        &mut self,
        account: &AccountId,
        key: ClientRequestId,
        ttl: Duration,
    ) -> Result<Option<StoredKey>, Error> {
        let id = key_id(account, key);
        if let Some(stored) = read_keys(self.conn, std::slice::from_ref(&id), self.now).await?.remove(&id) {
            return Ok(Some(stored));
        }
        // No key row (purged): an order younger than the lifetime still binds.
        let recent: Option<OrderRow> = sqlx::query_as(concat!(
            "select ",
            order_columns!(),
            r" from orders where account_id = ? and client_request_id = ? and create_time > ?
               order by create_time desc, order_id desc limit 1"
        ))
        .bind(account.as_str())
        .bind(key.to_string())
        .bind(self.now.sub(ttl).as_micros())
        .fetch_optional(&mut *self.conn)
        .await
        .map_err(db("reading the recent order of a key"))?;
        recent.map(|row| Ok(StoredKey { fingerprint: None, live: true, order: row.try_into()? })).transpose()
    }

    async fn replace_expired_key(&mut self, key: &KeyRecord<'_>) -> Result<Option<Timestamp>, Error> {
        let now = self.now;
        let result = sqlx::query(
            r"update idempotency_keys
              set fingerprint = ?, order_id = ?, create_time = ?, expire_time = ?
              where account_id = ? and client_request_id = ? and expire_time <= ?",
        )
        .bind(&key.fingerprint.0[..])
        .bind(key.order_id.to_string())
        .bind(now.as_micros())
        .bind(now.add(key.ttl).as_micros())
        .bind(key.account_id.as_str())
        .bind(key.client_request_id.to_string())
        .bind(now.as_micros())
        .execute(&mut *self.conn)
        .await
        .map_err(db("replacing the expired idempotency key"))?;
        Ok((result.rows_affected() == 1).then_some(now))
    }

    async fn insert_order(&mut self, order: &Order) -> Result<(), Error> {
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
        .execute(&mut *self.conn)
        .await
        .map_err(db("inserting the order"))?;
        Ok(())
    }
}

/// Reads on the reader pool, writes on the writer; times on the store's clock.
impl Statements for SqliteStore {
    async fn order_by_id(&self, account: &AccountId, id: OrderId) -> Result<Option<Order>, Error> {
        let query = sqlx::query_as(concat!(
            "select ",
            order_columns!(),
            " from orders where order_id = ? and account_id = ?"
        ))
        .bind(id.to_string())
        .bind(account.as_str());
        fetch_order(query, &self.reader, "reading the order").await
    }

    async fn order_of_live_key(
        &self,
        account: &AccountId,
        key: ClientRequestId,
    ) -> Result<Option<Order>, Error> {
        let query = sqlx::query_as(concat!(
            "select ",
            order_columns!(),
            r" from orders where order_id = (
                   select order_id from idempotency_keys
                   where account_id = ? and client_request_id = ? and expire_time > ?)"
        ))
        .bind(account.as_str())
        .bind(key.to_string())
        .bind(self.clock.now().as_micros());
        fetch_order(query, &self.reader, "reading the order by its key").await
    }

    async fn newest_order_of_key(
        &self,
        account: &AccountId,
        key: ClientRequestId,
    ) -> Result<Option<Order>, Error> {
        let query = sqlx::query_as(concat!(
            "select ",
            order_columns!(),
            r" from orders where account_id = ? and client_request_id = ?
               order by create_time desc, order_id desc limit 1"
        ))
        .bind(account.as_str())
        .bind(key.to_string());
        fetch_order(query, &self.reader, "reading the newest order of a key").await
    }

    async fn orders_page(
        &self,
        account: &AccountId,
        filter: &OrderFilter,
        after: Option<Cursor>,
        limit: u32,
    ) -> Result<Vec<Order>, Error> {
        let mut query = QueryBuilder::<Sqlite>::new(concat!(
            "select ",
            order_columns!(),
            " from orders where account_id = "
        ));
        let after = after.map(|c| (c.create_time.as_micros(), c.order_id.to_string()));
        flows::page_query(&mut query, account, filter, after, limit);
        let rows: Vec<OrderRow> =
            query.build_query_as().fetch_all(&self.reader).await.map_err(db("listing orders"))?;
        rows.into_iter().map(Order::try_from).collect()
    }

    async fn cancel_if_new(&self, account: &AccountId, id: OrderId) -> Result<Option<Order>, Error> {
        let query = sqlx::query_as(concat!(
            r"update orders set status = 'CANCELED', update_time = max(?, create_time)
              where order_id = ? and account_id = ? and status = 'NEW'
              returning ",
            order_columns!()
        ))
        .bind(self.clock.now().as_micros())
        .bind(id.to_string())
        .bind(account.as_str());
        fetch_order(query, &self.writer, "cancelling the order").await
    }

    async fn delete_expired_keys(&self, limit: u32) -> Result<u64, Error> {
        let result = sqlx::query(
            r"delete from idempotency_keys
              where (account_id, client_request_id) in (
                  select account_id, client_request_id from idempotency_keys
                  where expire_time <= ? order by expire_time limit ?)",
        )
        .bind(self.clock.now().as_micros())
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await
        .map_err(db("purging expired idempotency keys"))?;
        Ok(result.rows_affected())
    }
}

/// The order `query` (a select, or an update returning the order's
/// columns) finds, if any.
async fn fetch_order(
    query: sqlx::query::QueryAs<'_, Sqlite, OrderRow, sqlx::sqlite::SqliteArguments>,
    pool: &sqlx::SqlitePool,
    context: &'static str,
) -> Result<Option<Order>, Error> {
    query.fetch_optional(pool).await.map_err(db(context))?.map(Order::try_from).transpose()
}

/// A key row joined with its order.
#[derive(sqlx::FromRow)]
struct KeyOrderRow {
    key_account_id: String,
    key_client_request_id: String,
    key_fingerprint: Vec<u8>,
    key_expire_time: i64,
    #[sqlx(flatten)]
    order: OrderRow,
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
        let uuid = |s: &str| Uuid::try_parse(s).map_err(|e| Error::internal("decoding a stored order", e));
        let decimal = |s: &str| {
            PositiveDecimal::parse(s)
                .map(|d| d.value())
                .map_err(|e| Error::internal("decoding a stored order", e))
        };
        OrderRecord {
            order_id: uuid(&row.order_id)?,
            client_request_id: uuid(&row.client_request_id)?,
            quantity: decimal(&row.quantity)?,
            limit_price: row.limit_price.as_deref().map(decimal).transpose()?,
            create_time: Timestamp::from_micros(row.create_time),
            update_time: Timestamp::from_micros(row.update_time),
            account_id: row.account_id,
            symbol: row.symbol,
            side: row.side,
            order_type: row.order_type,
            time_in_force: row.time_in_force,
            status: row.status,
        }
        .try_into()
    }
}
