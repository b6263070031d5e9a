//! The Postgres store, for production and for any number of replicas.
//!
//! Native types (`uuid`, `numeric(38,18)`, `timestamptz`). The PlaceOrder
//! transaction runs at READ COMMITTED: a duplicate racing the first call, on
//! any replica, waits on the key's unique index until the first transaction
//! ends, then replays its order. That wait is bounded by `lock_timeout`
//! (shortened to the caller's deadline): past it the call answers `ABORTED`
//! with `IDEMPOTENCY_KEY_IN_USE`. Migrations take Postgres's advisory lock, so
//! replicas starting together apply them once.

use std::{str::FromStr, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{
    PgPool, Postgres, QueryBuilder,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

use super::{
    OrderRecord, Placement, StoreOptions,
    attempt::Attempt,
    batch::{Job, Queues},
    flows::{self, Statements},
    place::{self, KeyRecord, PlaceTx, StoredKey},
};
use crate::{
    domain::{AccountId, ClientRequestId, Cursor, NewOrder, Order, OrderFilter, OrderId, Timestamp},
    error::Error,
};

/// The order columns, in the order [`OrderRow`] reads them. `trim_scale`
/// drops the trailing zeros `numeric(38,18)` pads with.
macro_rules! order_columns {
    () => {
        "order_id, account_id, client_request_id, symbol, side, order_type, \
         trim_scale(quantity) as quantity, trim_scale(limit_price) as limit_price, \
         time_in_force, status, create_time, update_time"
    };
}

/// How long a pooled connection may sit idle before it is pinged on its way
/// out of the pool.
const STALE_AFTER: Duration = Duration::from_secs(1);

mod group_commit;

/// Orders and idempotency keys in a Postgres database.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The `lock_timeout` every connection starts with.
    lock_timeout: Duration,
    /// Where PlaceOrders queue for group commit (none when `pg_max_batch`
    /// is 1).
    queues: Option<Queues>,
    /// The places of PlaceOrders that wait, on a pooled connection, for a
    /// key whose advisory lock another call holds: a quarter of the pool
    /// (at least one), so that a few stuck keys, retried again and again,
    /// cannot take every connection from the new keys' batches.
    key_waiters: Arc<tokio::sync::Semaphore>,
}

/// The share of the pool that waits for keys held elsewhere may take.
pub(crate) fn key_waiter_places(max_connections: u32) -> usize {
    (max_connections as usize / 4).max(1)
}

fn to_datetime(t: Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.as_micros()).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn from_datetime(t: DateTime<Utc>) -> Timestamp {
    Timestamp::from_micros(t.timestamp_micros())
}

/// A duration in whole milliseconds, at least 1 (0 would disable a timeout).
fn millis(d: Duration) -> u128 {
    d.as_millis().max(1)
}

/// A duration as a Postgres setting in milliseconds.
fn millis_setting(d: Duration) -> String {
    format!("{}ms", millis(d))
}

impl PgStore {
    /// Connects to the database named by `url` and migrates it.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, sqlx::Error> {
        let connect = PgConnectOptions::from_str(url)?
            .application_name("order-service")
            // Every statement waits at most this long for a row lock.
            .options([
                ("lock_timeout", millis_setting(options.lock_timeout)),
                // Prepared statements keep one plan: a group commit's
                // statement takes its rows as arrays, whose custom plans
                // Postgres keeps choosing (their estimate looks cheaper than
                // the generic plan's), replanning it on every batch, about a
                // millisecond of the server's CPU each time. Every statement
                // here is by key or by index, where the generic plan is the
                // custom one.
                ("plan_cache_mode", "force_generic_plan".to_owned()),
                // The server notices a client that vanished (a network cut
                // off, a host gone) within about 25 s rather than the
                // kernel's 2 h, and ends its session, rolling back what it
                // had not committed and releasing its keys' locks. Not
                // `client_connection_check_interval`: it would also end a
                // commit waiting for a synchronous standby, leaving it
                // visible before the standby has it.
                ("tcp_keepalives_idle", "10".to_owned()),
                ("tcp_keepalives_interval", "5".to_owned()),
                ("tcp_keepalives_count", "3".to_owned()),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            // sqlx pings every connection before handing it out: a round
            // trip per call. Ping only one that sat idle long enough to have
            // gone stale (the server restarted); sqlx also pings each
            // connection as it comes back, closing broken ones then.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= STALE_AFTER {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        let key_waiters = Arc::new(tokio::sync::Semaphore::new(key_waiter_places(options.max_connections)));
        let mut store = Self { pool, lock_timeout: options.lock_timeout, queues: None, key_waiters };
        if options.pg_max_batch > 1 {
            store.queues = Some(Queues::start(store.clone(), options.pg_max_batch));
        }
        Ok(store)
    }

    /// The ordinary path of one PlaceOrder (group commit off, or a job its
    /// batch sent back): one statement for a new key, one read for a live
    /// one, a transaction for an expired one.
    async fn place_one(&self, job: Job) -> Result<(Order, Placement), Error> {
        let Job { account, new, ttl, lock_wait, lock_deadline, attempt, held_elsewhere, .. } = job;
        let (account, attempt) = (&account, &*attempt);
        let key = new.client_request_id;
        // With group commit off no batch has tried the key's lock: the
        // first attempt only tries it, and finding it held (nothing
        // written) waits as a job its batch left out would.
        let mut held_elsewhere = held_elsewhere;
        let mut try_first = self.queues.is_none() && !held_elsewhere;
        loop {
            // A key held by another call in flight: waiting for it takes a
            // pooled connection for up to the lock wait, so only a bounded
            // number may; the others are told at once that the key is in use
            // (nothing written; retry later), as a wait that ran out would be.
            let _waiting = match held_elsewhere {
                false => None,
                true => match self.key_waiters.clone().try_acquire_owned() {
                    Ok(place) => Some(place),
                    Err(_) => {
                        crate::telemetry::metrics::record_key_wait_refused();
                        return Err(Error::KeyInUse);
                    }
                },
            };
            // A job its batch sent back has waited already: it waits what is
            // left of its lock wait.
            let left = lock_deadline.saturating_duration_since(tokio::time::Instant::now());
            let lock_wait = if left + Duration::from_millis(1) < lock_wait { left } else { lock_wait };
            let mut conn = self.pool.acquire().await.map_err(db("acquiring a database connection"))?;
            // A connection whose server stopped answering must not hold this
            // call, and the pooled connection, for ever (as for a batch): past
            // the bound the connection is closed, never reused. A write already
            // sent may still commit (outcome unknown); one not sent never will
            // (the server rolls back the transaction of a closed connection).
            let bound = self.lock_timeout + group_commit::STATEMENT_SLACK;
            let placing = Self::place_on(
                &mut conn,
                self.lock_timeout,
                account,
                new.clone(),
                ttl,
                lock_wait,
                attempt,
                try_first,
            );
            match tokio::time::timeout(bound, placing).await {
                Ok(Ok(Some(placed))) => return Ok(placed),
                Ok(Ok(None)) => {
                    // Held elsewhere, nothing written: not sent after all.
                    attempt.unsend();
                    (held_elsewhere, try_first) = (true, false);
                }
                Ok(Err(error)) => return Err(error),
                Err(_) => {
                    conn.close_on_drop();
                    let source =
                        format!("the database did not answer within {}", humantime::format_duration(bound));
                    if attempt.abandon() {
                        return Err(Error::Unavailable {
                            context: "placing an order",
                            source: source.into(),
                        });
                    }
                    return Err(Error::OutcomeUnknown {
                        client_request_id: key,
                        deadline: false,
                        context: "placing an order",
                        source: source.into(),
                    });
                }
            }
        }
    }

    /// [`place_one`](Self::place_one) on `conn`; `None` when `try_first`
    /// found the key's advisory lock held by another call (nothing written).
    #[allow(clippy::too_many_arguments)]
    async fn place_on(
        conn: &mut sqlx::PgConnection,
        lock_timeout: Duration,
        account: &AccountId,
        new: NewOrder,
        ttl: Duration,
        lock_wait: Duration,
        attempt: &Attempt,
        try_first: bool,
    ) -> Result<Option<(Order, Placement)>, Error> {
        let key = new.client_request_id;
        // Connections start with the configured lock timeout; only a caller
        // deadline shorter than it needs a transaction to shorten it in.
        let shortened = millis(lock_wait) != millis(lock_timeout);
        if !shortened {
            // The common cases without a transaction: a new key is one
            // statement (key and order, atomic on its own), a live key one
            // read. Only an expired key takes the full transaction below.
            // The statement commits as it runs: from here on a failure the
            // server did not answer leaves the outcome unknown.
            if !attempt.send() {
                return Err(Error::DeadlineExceeded);
            }
            let placed = if try_first {
                let (record, order) = KeyRecord::new(account, &new, ttl);
                match try_insert_key_and_order(conn, &record, &order)
                    .await
                    .map_err(|e| unknown_unless_answered(e, key))?
                {
                    None => return Ok(None),
                    Some(Some(at)) => Some((place::stamped(order, at), Placement::Created)),
                    Some(None) => place::replay(conn.read_key(account, key, ttl).await?, &new)?,
                }
            } else {
                place::place_new_or_live(&mut *conn, account, &new, ttl)
                    .await
                    .map_err(|e| unknown_unless_answered(e, key))?
            };
            if let Some(placed) = placed {
                return Ok(Some(placed));
            }
        }
        let mut tx =
            sqlx::Connection::begin(&mut *conn).await.map_err(db("beginning the order transaction"))?;
        if shortened {
            sqlx::query("select set_config('lock_timeout', $1, true)")
                .bind(millis_setting(lock_wait))
                .execute(&mut *tx)
                .await
                .map_err(db("bounding the lock wait"))?;
            // As above: the first attempt only tries the key's lock (taken,
            // it is held to the transaction's end; the statements below
            // take it again at once).
            if try_first && !try_key_lock(&mut tx, account, key).await? {
                return Ok(None);
            }
        }
        // Until COMMIT is sent, any failure (or the caller giving up, which
        // drops the transaction) rolls everything back: nothing written.
        let placed = place::place(&mut *tx, account, new, ttl).await?;
        if !attempt.send() {
            return Err(Error::DeadlineExceeded);
        }
        tx.commit().await.map_err(|e| unknown_unless_answered(db("committing the order")(e), key))?;
        Ok(Some(placed))
    }

    /// Ready means orders can be placed: the server answers, and would take
    /// a write (it is not a standby, and sessions are not read-only).
    pub(super) async fn ping(&self) -> Result<(), Error> {
        let read_only: bool = sqlx::query_scalar(
            "select pg_is_in_recovery() or current_setting('transaction_read_only')::boolean",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db("pinging the database"))?;
        if read_only {
            return Err(Error::Unavailable {
                context: "pinging the database",
                source: "the server is read-only (a standby, or default_transaction_read_only)".into(),
            });
        }
        Ok(())
    }

    pub(super) fn pool_stats(&self) -> Vec<(&'static str, u32, usize)> {
        vec![("main", self.pool.size(), self.pool.num_idle())]
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }
}

/// Every time here is the database server's clock.
impl Statements for PgStore {
    async fn order_by_id(&self, account: &AccountId, id: OrderId) -> Result<Option<Order>, Error> {
        let query = sqlx::query_as(concat!(
            "select ",
            order_columns!(),
            " from orders where order_id = $1 and account_id = $2"
        ))
        .bind(id.uuid())
        .bind(account.as_str());
        fetch_order(query, &self.pool, "reading the order").await
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
                   where account_id = $1 and client_request_id = $2 and expire_time > clock_timestamp())"
        ))
        .bind(account.as_str())
        .bind(key.uuid());
        fetch_order(query, &self.pool, "reading the order by its key").await
    }

    async fn newest_order_of_key(
        &self,
        account: &AccountId,
        key: ClientRequestId,
    ) -> Result<Option<Order>, Error> {
        let query = sqlx::query_as(concat!(
            "select ",
            order_columns!(),
            r" from orders where account_id = $1 and client_request_id = $2
               order by create_time desc, order_id desc limit 1"
        ))
        .bind(account.as_str())
        .bind(key.uuid());
        fetch_order(query, &self.pool, "reading the newest order of a key").await
    }

    async fn orders_page(
        &self,
        account: &AccountId,
        filter: &OrderFilter,
        after: Option<Cursor>,
        limit: u32,
    ) -> Result<Vec<Order>, Error> {
        let mut query = QueryBuilder::<Postgres>::new(concat!(
            "select ",
            order_columns!(),
            " from orders where account_id = "
        ));
        let after = after.map(|c| (to_datetime(c.create_time), c.order_id.uuid()));
        flows::page_query(&mut query, account, filter, after, limit);
        let rows: Vec<OrderRow> =
            query.build_query_as().fetch_all(&self.pool).await.map_err(db("listing orders"))?;
        rows.into_iter().map(Order::try_from).collect()
    }

    /// A concurrent cancel waits on the row lock, then finds the status
    /// changed and updates nothing: one state change.
    async fn cancel_if_new(&self, account: &AccountId, id: OrderId) -> Result<Option<Order>, Error> {
        let query = sqlx::query_as(concat!(
            r"update orders set status = 'CANCELED', update_time = greatest(clock_timestamp(), create_time)
              where order_id = $1 and account_id = $2 and status = 'NEW'
              returning ",
            order_columns!()
        ))
        .bind(id.uuid())
        .bind(account.as_str());
        fetch_order(query, &self.pool, "cancelling the order").await
    }

    /// Skips keys another replica's purge has locked, so purges on every
    /// replica never wait on each other.
    async fn delete_expired_keys(&self, limit: u32) -> Result<u64, Error> {
        let result = sqlx::query(
            r"delete from idempotency_keys
              where (account_id, client_request_id) in (
                  select account_id, client_request_id from idempotency_keys
                  where expire_time <= statement_timestamp() order by expire_time limit $1
                  for update skip locked)",
        )
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(db("purging expired idempotency keys"))?;
        Ok(result.rows_affected())
    }
}

/// Binds an order's first ten columns (all but its times), in the column
/// order of `insert into orders`, to any kind of query.
macro_rules! bind_order {
    ($query:expr, $order:expr) => {{
        let order: &Order = $order;
        $query
            .bind(order.order_id.uuid())
            .bind(order.account_id.as_str())
            .bind(order.client_request_id.uuid())
            .bind(order.symbol.as_str())
            .bind(order.side.as_str())
            .bind(order.order_type.as_str())
            .bind(order.quantity.value())
            .bind(order.limit_price.map(|p| p.value()))
            .bind(order.time_in_force.as_str())
            .bind(order.status.as_str())
    }};
}

/// A duration in microseconds, for `$n * interval '1 microsecond'`.
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Binds a new key's parameters ($1 to $5) of [`new_key_statement`].
macro_rules! bind_key {
    ($query:expr, $key:expr) => {
        $query
            .bind($key.account_id.as_str())
            .bind($key.client_request_id.uuid())
            .bind(&$key.fingerprint.0[..])
            .bind($key.order_id.uuid())
            .bind(micros($key.ttl))
    };
}

/// The statement of a new key (see `PlaceTx::insert_key_and_order`), whose
/// `lock` CTE selects `$lock` (a row when the key's advisory lock is taken),
/// with the order's insert between `$insert` and `$tail`: the one text for
/// the statement that waits for the lock and the one that only tries it.
macro_rules! new_key_statement {
    ($lock:expr, $insert:literal, $tail:literal) => {
        concat!(
            "with lock as (select ",
            $lock,
            r"),
              now as (select clock_timestamp() as at from lock),
              key as (
                  insert into idempotency_keys
                      (account_id, client_request_id, fingerprint, order_id, create_time, expire_time)
                  select $1, $2, $3, $4, now.at, now.at + $5::bigint * interval '1 microsecond' from now
                  where coalesce((
                      select create_time from orders
                      where account_id = $1 and client_request_id = $2
                      order by create_time desc limit 1
                  ) <= now.at - $5::bigint * interval '1 microsecond', true)
                  on conflict (account_id, client_request_id) do nothing
                  returning create_time) ",
            $insert,
            r"(order_id, account_id, client_request_id, symbol, side, order_type,
                  quantity, limit_price, time_in_force, status, create_time, update_time)
              select $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, key.create_time, key.create_time
              from key",
            $tail
        )
    };
}

/// As `PlaceTx::insert_key_and_order`, but only *trying* the key's
/// advisory lock: `None` when another call in flight holds it (nothing
/// written, and nothing waited for), else whether the key and the order
/// were inserted. With group commit off, the ordinary path tries first, so
/// that waiting for a key held elsewhere takes a place in
/// [`PgStore::key_waiters`] as a job its batch left out does.
async fn try_insert_key_and_order(
    conn: &mut sqlx::PgConnection,
    key: &KeyRecord<'_>,
    order: &Order,
) -> Result<Option<Option<Timestamp>>, Error> {
    let query = sqlx::query_as(new_key_statement!(
        concat!("1 where pg_try_advisory_xact_lock(", group_commit::key_lock!("$1", "$2"), ")"),
        ", placed as (insert into orders ",
        " returning create_time) select exists (select from lock), (select create_time from placed)"
    ));
    let (took, created): (bool, Option<DateTime<Utc>>) = bind_order!(bind_key!(query, key), order)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_key("inserting the idempotency key and the order"))?;
    Ok(took.then(|| created.map(from_datetime)))
}

/// Tries the key's advisory lock in a transaction: whether it was taken
/// (then held to the transaction's end) or another call holds it.
async fn try_key_lock(
    tx: &mut sqlx::PgConnection,
    account: &AccountId,
    key: ClientRequestId,
) -> Result<bool, Error> {
    sqlx::query_scalar(concat!("select pg_try_advisory_xact_lock(", group_commit::key_lock!("$1", "$2"), ")"))
        .bind(account.as_str())
        .bind(key.uuid())
        .fetch_one(&mut *tx)
        .await
        .map_err(db("trying the key's lock"))
}

/// Every time here is the database server's clock (`clock_timestamp()`, read
/// once per statement), so replicas with skewed clocks agree.
impl PlaceTx for sqlx::PgConnection {
    /// One statement: the key is inserted unless it exists or an order
    /// placed with it is younger than its lifetime (its newest order, looked
    /// up by the index by key, whatever the statistics), and the order only if
    /// the key was; so a new order costs one round trip (and, outside a
    /// transaction, is its own atomic transaction). It first takes the
    /// key's advisory lock (`group_commit::key_lock`) until its
    /// transaction ends, so that a group commit on any replica skips this
    /// key rather than wait for it.
    async fn insert_key_and_order(
        &mut self,
        key: &KeyRecord<'_>,
        order: &Order,
    ) -> Result<Option<Timestamp>, Error> {
        let query = sqlx::query_scalar(new_key_statement!(
            concat!("pg_advisory_xact_lock(", group_commit::key_lock!("$1", "$2"), ")"),
            "insert into orders ",
            " returning create_time"
        ));
        let created: Option<DateTime<Utc>> = bind_order!(bind_key!(query, key), order)
            .fetch_optional(&mut *self)
            .await
            .map_err(db_key("inserting the idempotency key and the order"))?;
        Ok(created.map(from_datetime))
    }

    async fn read_key(
        &mut self,
        account: &AccountId,
        key: ClientRequestId,
        ttl: Duration,
    ) -> Result<Option<StoredKey>, Error> {
        let row: Option<KeyOrderRow> = sqlx::query_as(concat!(
            "select key_fingerprint, key_live, ",
            order_columns!(),
            r" from (select fingerprint as key_fingerprint, expire_time > clock_timestamp() as key_live,
                            order_id as key_order_id
                     from idempotency_keys where account_id = $1 and client_request_id = $2) as key
               join orders on orders.order_id = key.key_order_id"
        ))
        .bind(account.as_str())
        .bind(key.uuid())
        .fetch_optional(&mut *self)
        .await
        .map_err(db_key("reading the idempotency key"))?;
        if let Some(row) = row {
            return Ok(Some(StoredKey {
                fingerprint: Some(row.key_fingerprint),
                live: row.key_live,
                order: row.order.try_into()?,
            }));
        }
        // No key row (purged): an order younger than the lifetime still binds.
        let recent: Option<OrderRow> = sqlx::query_as(concat!(
            "select ",
            order_columns!(),
            r" from orders where account_id = $1 and client_request_id = $2
                 and create_time > clock_timestamp() - $3::bigint * interval '1 microsecond'
               order by create_time desc, order_id desc limit 1"
        ))
        .bind(account.as_str())
        .bind(key.uuid())
        .bind(micros(ttl))
        .fetch_optional(&mut *self)
        .await
        .map_err(db("reading the recent order of a key"))?;
        recent.map(|row| Ok(StoredKey { fingerprint: None, live: true, order: row.try_into()? })).transpose()
    }

    async fn replace_expired_key(&mut self, key: &KeyRecord<'_>) -> Result<Option<Timestamp>, Error> {
        let replaced: Option<DateTime<Utc>> = sqlx::query_scalar(
            r"with now as (select clock_timestamp() as at)
              update idempotency_keys
              set fingerprint = $1, order_id = $2, create_time = now.at,
                  expire_time = now.at + $3::bigint * interval '1 microsecond'
              from now
              where account_id = $4 and client_request_id = $5 and expire_time <= now.at
              returning idempotency_keys.create_time",
        )
        .bind(&key.fingerprint.0[..])
        .bind(key.order_id.uuid())
        .bind(micros(key.ttl))
        .bind(key.account_id.as_str())
        .bind(key.client_request_id.uuid())
        .fetch_optional(&mut *self)
        .await
        .map_err(db_key("replacing the expired idempotency key"))?;
        Ok(replaced.map(from_datetime))
    }

    async fn insert_order(&mut self, order: &Order) -> Result<(), Error> {
        let query = sqlx::query(
            r"insert into orders (order_id, account_id, client_request_id, symbol, side, order_type,
                  quantity, limit_price, time_in_force, status, create_time, update_time)
              values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        );
        bind_order!(query, order)
            .bind(to_datetime(order.create_time))
            .bind(to_datetime(order.update_time))
            .execute(&mut *self)
            .await
            .map_err(db("inserting the order"))?;
        Ok(())
    }
}

/// A failure after the write was sent: unless the server answered that the
/// statement or COMMIT failed (an `ERROR`: the transaction is rolled back,
/// nothing was written), the outcome is unknown. A connection that broke, or
/// a `FATAL` (the backend terminated by an administrator, a failover or a
/// crash), can come after the commit was made durable.
fn unknown_unless_answered(error: Error, key: ClientRequestId) -> Error {
    let (context, source) = match error {
        Error::Unavailable { context, source } | Error::Internal { context, source } => (context, source),
        other => return other,
    };
    if source.downcast_ref::<sqlx::Error>().is_some_and(answered) {
        return db_error_again(context, source);
    }
    Error::OutcomeUnknown { client_request_id: key, deadline: false, context, source }
}

/// Whether the server answered that the statement (or COMMIT) failed: an
/// `ERROR`, so it was rolled back and nothing was written; or the pool gave
/// no connection, so nothing was sent. A connection that broke, or a
/// `FATAL`, can come after the commit was made durable.
fn answered(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(e) => {
            let dying = e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_none_or(|e| {
                matches!(e.severity(), sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic)
            });
            let code = e.code();
            let code = code.as_deref().unwrap_or_default();
            rolled_back_unfinished(code) || (!dying && !code.starts_with("08") && !code.starts_with("57P"))
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        _ => false,
    }
}

/// The error `db` made of `source`, given back unchanged.
fn db_error_again(context: &'static str, source: crate::error::BoxError) -> Error {
    match source.downcast::<sqlx::Error>() {
        Ok(error) => db(context)(*error),
        Err(source) => Error::Internal { context, source },
    }
}

/// Whether `code` says the server ended the session because its
/// transaction waited for the client (`idle_in_transaction_session_timeout`,
/// Postgres 17's `transaction_timeout`): the timer runs only while the
/// server waits for the next statement, so the COMMIT had not been read and
/// the transaction was rolled back. Nothing was written, though the
/// connection is gone (a `FATAL`).
fn rolled_back_unfinished(code: &str) -> bool {
    matches!(code, "25P03" | "25P04")
}

/// Whether retrying later can succeed, by SQLSTATE: the connection or
/// server is gone, the server is out of resources or shutting down, a
/// transaction was ended before its COMMIT, a standby refused a write, a
/// statement was cancelled, a serialization failure or deadlock, a lock not
/// granted in time.
fn retryable_code(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources
        || code.starts_with("57P") // admin or crash shutdown, cannot connect now
        || rolled_back_unfinished(code)
        || matches!(code, "57014" | "25006" | "40001" | "40P01" | "55P03")
}

/// Whether retrying later can succeed: the connection or server is gone,
/// the server is out of resources or shutting down, a standby refused a
/// write, a statement was cancelled, or no pooled connection was free.
fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(e) => e.code().is_some_and(|code| retryable_code(&code)),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// Maps a sqlx error to `UNAVAILABLE` when retrying later can succeed, else
/// to `INTERNAL`.
fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |error| {
        if is_unavailable(&error) {
            Error::Unavailable { context, source: error.into() }
        } else {
            Error::internal(context, error)
        }
    }
}

/// As [`db`], for statements on the key row: a lock timeout there means
/// another call is placing this key (`ABORTED`, `IDEMPOTENCY_KEY_IN_USE`).
fn db_key(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |error| match &error {
        sqlx::Error::Database(e) if e.code().as_deref() == Some("55P03") => Error::KeyInUse,
        _ => db(context)(error),
    }
}

/// The order `query` (a select, or an update returning the order's
/// columns) finds, if any.
async fn fetch_order(
    query: sqlx::query::QueryAs<'_, Postgres, OrderRow, sqlx::postgres::PgArguments>,
    pool: &PgPool,
    context: &'static str,
) -> Result<Option<Order>, Error> {
    query.fetch_optional(pool).await.map_err(db(context))?.map(Order::try_from).transpose()
}

/// A key row joined with its order.
#[derive(sqlx::FromRow)]
struct KeyOrderRow {
    key_fingerprint: Vec<u8>,
    key_live: bool,
    #[sqlx(flatten)]
    order: OrderRow,
}

#[derive(sqlx::FromRow)]
struct OrderRow {
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
    create_time: DateTime<Utc>,
    update_time: DateTime<Utc>,
}

impl TryFrom<OrderRow> for Order {
    type Error = Error;

    fn try_from(row: OrderRow) -> Result<Self, Error> {
        OrderRecord {
            order_id: row.order_id,
            account_id: row.account_id,
            client_request_id: row.client_request_id,
            symbol: row.symbol,
            side: row.side,
            order_type: row.order_type,
            quantity: row.quantity,
            limit_price: row.limit_price,
            time_in_force: row.time_in_force,
            status: row.status,
            create_time: from_datetime(row.create_time),
            update_time: from_datetime(row.update_time),
        }
        .try_into()
    }
}

#[cfg(test)]
mod tests {
    use super::{retryable_code, rolled_back_unfinished};

    /// Every class of SQLSTATE the service can meet, and what it answers:
    /// retryable (`UNAVAILABLE`, or "not written" when the write was sent
    /// and the server answered) or not (`INTERNAL`).
    #[test]
    fn database_errors_map_to_codes_class_by_class() {
        let retryable = [
            ("08006", "connection failure"),
            ("08P01", "protocol violation"),
            ("53300", "too many connections"),
            ("53100", "disk full"),
            ("57P01", "admin shutdown (pg_terminate_backend)"),
            ("57P05", "idle session timeout"),
            ("25P03", "idle in transaction session timeout"),
            ("25P04", "transaction timeout"),
            ("57014", "statement timeout or cancel"),
            ("25006", "read-only transaction (a standby)"),
            ("40001", "serialization failure"),
            ("40P01", "deadlock"),
            ("55P03", "lock not available"),
        ];
        for (code, what) in retryable {
            assert!(retryable_code(code), "{code} ({what}) is retryable");
        }
        let internal = [
            ("23505", "unique violation"),
            ("23502", "not null violation"),
            ("22003", "numeric out of range"),
            ("42P01", "undefined table"),
            ("42501", "insufficient privilege"),
            ("XX000", "internal error"),
        ];
        for (code, what) in internal {
            assert!(!retryable_code(code), "{code} ({what}) is not retryable");
        }
        // A session ended while its transaction waited for the client was
        // rolled back before any COMMIT: not written, though FATAL.
        assert!(rolled_back_unfinished("25P03") && rolled_back_unfinished("25P04"));
        assert!(!rolled_back_unfinished("57P01"), "a terminated backend may have committed");
    }
}
