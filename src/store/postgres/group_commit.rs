//! Postgres's statements for group commit (`store::batch`): a batch is one
//! statement that commits as it runs (one round trip, one commit, one WAL
//! flush for every order in it), and its keys are looked up by one query.
//!
//! # Why a batch never waits for another replica, and places each order once
//!
//! Every writer of a key row takes the key's transaction-level advisory
//! lock first ([`key_lock`]): the ordinary path waits for it (its
//! `insert_key_and_order` takes it, bounded by `lock_timeout` like the
//! unique index wait it precedes), a batch only *tries* it, per key, inside
//! its statement. A key whose lock is held is in flight in another call
//! (on any replica, or in an earlier batch of this one): the batch leaves it
//! out and sends its caller down the ordinary path, which waits for that
//! call and then replays, refuses or places as usual. So the batch's
//! `insert … on conflict do nothing` meets no uncommitted key row of
//! another writer, and waits for none; one duplicate in flight never stalls
//! or fails its batch-mates. (It can still wait for a purge deleting that
//! very expired key, one statement long, or for a writer of a version
//! without the lock during a rolling upgrade; and at most for
//! [`batch_lock_wait`], past which the database refuses the batch and each
//! of its orders is placed alone.)
//!
//! The lock is only about waiting. Exactly once rests, as on the ordinary
//! path, on the key's primary key: a key row is inserted by one committed
//! statement at most, and an order is inserted only with the key row the
//! same statement inserted (its id is the one that row names), or, for an
//! expired key, by the ordinary path's transaction. A hash collision of two
//! keys' locks sends a key down the ordinary path for nothing; it never
//! writes twice. The batch's guard against a purged key (no order of the
//! key younger than its lifetime) is the ordinary statement's, row for row.
//!
//! A key the batch did not insert (locked elsewhere, already stored, a
//! duplicate within the batch, expired) had nothing written for it: its
//! caller places it alone, on the ordinary path. A statement the server
//! refused (an `ERROR`) was rolled back whole: every job is placed alone, so
//! only what must fail fails. A statement whose answer was lost may have
//! committed: every job's outcome is unknown.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::PgConnection;
use tokio::time::Instant;
use uuid::Uuid;

use super::{KeyOrderRow, PgStore, answered, db, from_datetime, micros};
use crate::{
    domain::Order,
    error::Error,
    store::{
        Placement,
        batch::{BatchFailure, GroupCommit, Job, KeyId, Placed, Written, claim, lock_not_taken},
        place::{KeyRecord, StoredKey, stamped},
    },
};

/// The expression of a key's advisory lock, over the statement's
/// `account_id` and `client_request_id` columns or parameters: a 64-bit
/// hash of both, the same on every replica (the database computes it).
macro_rules! key_lock {
    ($account:literal, $key:literal) => {
        concat!("hashtextextended(", $account, " || '/' || ", $key, "::text, 0)")
    };
}
pub(super) use key_lock;

/// How long a batch's statement waits for a lock before the database
/// refuses it (and each of its orders is placed alone): a batch waits only
/// for a purge deleting one of its expired keys, or for a writer that does
/// not take the advisory lock (a version before group commit, or a session
/// by hand).
macro_rules! batch_lock_wait {
    () => {
        "100ms"
    };
}

/// The batch's statement: its lock wait bounded; the keys whose advisory lock it takes, inserted
/// unless stored or guarded; the orders of the keys it inserted; per job
/// (its position `n`), whether its lock was taken and the creation time of
/// its order, if created.
const INSERT_BATCH: &str = concat!(
    r"with input as (
          select * from unnest($1::text[], $2::uuid[], $3::bytea[], $4::uuid[], $5::bigint[],
                               $6::text[], $7::text[], $8::text[], $9::numeric[], $10::numeric[],
                               $11::text[], $12::text[])
              with ordinality as i(account_id, client_request_id, fingerprint, order_id, ttl,
                                   symbol, side, order_type, quantity, limit_price, time_in_force,
                                   status, n)),
      bounded as materialized (select set_config('lock_timeout', '",
    batch_lock_wait!(),
    r"', true)),
      locked as materialized (
          select input.* from input, bounded where pg_try_advisory_xact_lock(",
    key_lock!("account_id", "client_request_id"),
    r")),
      now as (select clock_timestamp() as at),
      keys as (
          insert into idempotency_keys
              (account_id, client_request_id, fingerprint, order_id, create_time, expire_time)
          select l.account_id, l.client_request_id, l.fingerprint, l.order_id, now.at,
                 now.at + l.ttl * interval '1 microsecond'
          from locked l, now
          where not exists (
              select 1 from orders o
              where o.account_id = l.account_id and o.client_request_id = l.client_request_id
                and o.create_time > now.at - l.ttl * interval '1 microsecond')
          on conflict (account_id, client_request_id) do nothing
          returning order_id, create_time),
      placed as (
          insert into orders (order_id, account_id, client_request_id, symbol, side, order_type,
              quantity, limit_price, time_in_force, status, create_time, update_time)
          select i.order_id, i.account_id, i.client_request_id, i.symbol, i.side, i.order_type,
                 i.quantity, i.limit_price, i.time_in_force, i.status, k.create_time, k.create_time
          from input i join keys k on k.order_id = i.order_id
          returning order_id)
      select i.n, k.create_time
      from input i left join keys k on k.order_id = i.order_id
      order by i.n"
);

impl GroupCommit for PgStore {
    const SYSTEM: &'static str = "postgresql";

    async fn write_batch(&self, lock_deadline: Instant, jobs: &[Job]) -> Result<Vec<Written>, BatchFailure> {
        let mut conn = match tokio::time::timeout_at(lock_deadline, self.pool.acquire()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(BatchFailure::NotWritten(db("acquiring a database connection")(e))),
            Err(_) => return Err(BatchFailure::NotWritten(lock_not_taken())),
        };
        let mut written: Vec<Written> = jobs.iter().map(|_| Written::Placed(Err(lock_not_taken()))).collect();
        let taken = claim(jobs);
        if taken.is_empty() {
            return Ok(written); // every caller gave up: nothing sent
        }
        let batch: Vec<&Job> = taken.iter().map(|&i| &jobs[i]).collect();
        let created = insert_batch(&mut conn, &batch).await.map_err(|error| {
            if answered(&error) {
                BatchFailure::Alone(db("inserting a batch of orders")(error))
            } else {
                BatchFailure::AtCommit(error.into())
            }
        })?;
        for (&i, created) in taken.iter().zip(created) {
            written[i] = match created {
                Some(order) => Written::Placed(Ok((order, Placement::Created))),
                None => Written::Alone,
            };
        }
        Ok(written)
    }

    /// One query for every key, whatever the batch's size (the keys are
    /// bound as two arrays): live if unexpired on the database's clock.
    async fn read_keys(&self, keys: &[KeyId]) -> Result<HashMap<KeyId, StoredKey>, Error> {
        let (accounts, ids): (Vec<&str>, Vec<Uuid>) = keys
            .iter()
            .filter_map(|(account, key)| Some((account.as_str(), Uuid::parse_str(key).ok()?)))
            .unzip();
        let rows: Vec<BatchKeyRow> = sqlx::query_as(concat!(
            "select key_account_id, key_client_request_id, key_fingerprint, key_live, ",
            order_columns!(),
            r" from (select k.account_id as key_account_id, k.client_request_id::text as key_client_request_id,
                            k.fingerprint as key_fingerprint, k.expire_time > clock_timestamp() as key_live,
                            k.order_id as key_order_id
                     from unnest($1::text[], $2::uuid[]) as wanted(account_id, client_request_id)
                     join idempotency_keys k using (account_id, client_request_id)) as key
               join orders on orders.order_id = key.key_order_id"
        ))
        .bind(accounts)
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading the idempotency keys"))?;
        rows.into_iter()
            .map(|row| {
                let stored = StoredKey {
                    fingerprint: Some(row.key.key_fingerprint),
                    live: row.key.key_live,
                    order: row.key.order.try_into()?,
                };
                Ok(((row.key_account_id, row.key_client_request_id), stored))
            })
            .collect()
    }

    async fn place_alone(&self, job: Job) -> Placed {
        self.place_one(job).await
    }
}

/// Runs [`INSERT_BATCH`] for `jobs`: per job, its created order, or `None`
/// if its key was not inserted (nothing was written for it).
async fn insert_batch(conn: &mut PgConnection, jobs: &[&Job]) -> Result<Vec<Option<Order>>, sqlx::Error> {
    let orders: Vec<(KeyRecord<'_>, Order)> =
        jobs.iter().map(|job| KeyRecord::new(&job.account, &job.new, job.ttl)).collect();
    let column = |f: fn(&Order) -> &str| -> Vec<&str> { orders.iter().map(|(_, order)| f(order)).collect() };
    let rows: Vec<(i64, Option<DateTime<Utc>>)> = sqlx::query_as(INSERT_BATCH)
        .bind(orders.iter().map(|(key, _)| key.account_id.as_str()).collect::<Vec<_>>())
        .bind(orders.iter().map(|(key, _)| key.client_request_id.uuid()).collect::<Vec<_>>())
        .bind(orders.iter().map(|(key, _)| key.fingerprint.0.to_vec()).collect::<Vec<_>>())
        .bind(orders.iter().map(|(key, _)| key.order_id.uuid()).collect::<Vec<_>>())
        .bind(orders.iter().map(|(key, _)| micros(key.ttl)).collect::<Vec<_>>())
        .bind(column(|order| order.symbol.as_str()))
        .bind(column(|order| order.side.as_str()))
        .bind(column(|order| order.order_type.as_str()))
        .bind(orders.iter().map(|(_, order)| order.quantity.value()).collect::<Vec<Decimal>>())
        .bind(orders.iter().map(|(_, order)| order.limit_price.map(|p| p.value())).collect::<Vec<_>>())
        .bind(column(|order| order.time_in_force.as_str()))
        .bind(column(|order| order.status.as_str()))
        .fetch_all(&mut *conn)
        .await?;
    let mut created: Vec<Option<Order>> = jobs.iter().map(|_| None).collect();
    let mut orders = orders.into_iter().map(|(_, order)| Some(order)).collect::<Vec<_>>();
    for (n, at) in rows {
        let i = usize::try_from(n - 1).unwrap_or(usize::MAX);
        if let (Some(at), Some(order)) = (at, orders.get_mut(i).and_then(Option::take)) {
            created[i] = Some(stamped(order, from_datetime(at)));
        }
    }
    Ok(created)
}

/// A stored key found by a batched lookup, with the key it answers.
#[derive(sqlx::FromRow)]
struct BatchKeyRow {
    key_account_id: String,
    key_client_request_id: String,
    #[sqlx(flatten)]
    key: KeyOrderRow,
}
