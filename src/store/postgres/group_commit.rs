//! Postgres's statements for group commit (`store::batch`): a batch is one
//! statement that commits as it runs (one round trip, one commit, one WAL
//! flush for every order in it). Keys are not looked up before the batch: the
//! keys it did not insert (retries, mostly) are looked up after it, in one
//! query for all of them, and a live one is answered from there (its order,
//! or refused if reused).
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
//! call and then replays, refuses or places as usual (with group commit
//! off, the ordinary path's first statement only tries the lock too, so
//! that waiting for a held key is bounded the same way: `PgStore::place_one`).
//! So the batch's
//! `insert … on conflict do nothing` meets no uncommitted key row of
//! another writer, and waits for none; one duplicate in flight never stalls
//! or fails its batch-mates. (It can still wait for a purge deleting that
//! very expired key, one statement long, or for a writer of a version
//! without the lock during a rolling upgrade; and at most for
//! [`batch_lock_wait`], past which the database refuses the batch and each
//! of its orders is placed alone. That bound covers row locks, not the
//! table locks the statement takes as it starts: a `LOCK TABLE` or DDL holds
//! it up to the connection's lock timeout.)
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

use std::{collections::HashMap, time::Duration};

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
        batch::{BatchFailure, GroupCommit, Job, KeyId, Placed, Written, claim, key_id},
        place::{self, KeyRecord, StoredKey, stamped},
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

/// How much longer than the lock timeout a batch's statement (or a
/// PlaceOrder placed alone) may take before the service gives up on the
/// connection (its outcome is then unknown).
pub(super) const STATEMENT_SLACK: Duration = Duration::from_secs(1);

/// The batch's statement: its lock wait bounded (each key's guard is a
/// lateral lookup of the key's newest order, which only the index by key
/// serves without a sort, so the plan stays a lookup by key whatever the
/// statistics, as in `read_keys`); the keys whose advisory lock it takes, inserted
/// unless stored or guarded; the orders of the keys it inserted; per job
/// (its position `n`), the creation time of its order, if created, and
/// whether its lock was taken.
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
          from locked l cross join now
          left join lateral (
              select o.create_time from orders o
              where o.account_id = l.account_id and o.client_request_id = l.client_request_id
              order by o.create_time desc limit 1) newest on true
          where newest.create_time is null
             or newest.create_time <= now.at - l.ttl * interval '1 microsecond'
          on conflict (account_id, client_request_id) do nothing
          returning order_id, create_time),
      placed as (
          insert into orders (order_id, account_id, client_request_id, symbol, side, order_type,
              quantity, limit_price, time_in_force, status, create_time, update_time)
          select i.order_id, i.account_id, i.client_request_id, i.symbol, i.side, i.order_type,
                 i.quantity, i.limit_price, i.time_in_force, i.status, k.create_time, k.create_time
          from input i join keys k on k.order_id = i.order_id
          returning order_id)
      select i.n, k.create_time, i.n in (select n from locked) as took_lock
      from input i left join keys k on k.order_id = i.order_id
      order by i.n"
);

impl GroupCommit for PgStore {
    const SYSTEM: &'static str = "postgresql";
    const WRITERS: usize = 2;
    const LOOKS_UP_FIRST: bool = false;

    fn lock_timeout(&self) -> Duration {
        self.lock_timeout
    }

    fn queues(&self) -> Option<&crate::store::batch::Queues> {
        self.queues.as_ref()
    }

    async fn write_batch(&self, lock_deadline: Instant, jobs: &[Job]) -> Result<Vec<Written>, BatchFailure> {
        let mut conn = match tokio::time::timeout_at(lock_deadline, self.pool.acquire()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(BatchFailure::NotWritten(db("acquiring a database connection")(e))),
            Err(_) => return Err(BatchFailure::NotBegun),
        };
        let mut written: Vec<Written> =
            jobs.iter().map(|job| Written::Placed(Err(job.not_begun()))).collect();
        let taken = claim(jobs);
        if taken.is_empty() {
            return Ok(written); // every caller gave up: nothing sent
        }
        let batch: Vec<&Job> = taken.iter().map(|&i| &jobs[i]).collect();
        // A connection whose server stopped answering (a hung backend, a
        // network gone silent) must not hold this writer for ever: past the
        // bound the statement may still commit, so the outcome is unknown,
        // and the connection is closed rather than reused.
        let bound = self.lock_timeout + STATEMENT_SLACK;
        let created = match tokio::time::timeout(bound, insert_batch(&mut conn, &batch)).await {
            Ok(Ok(created)) => created,
            Ok(Err(error)) if answered(&error) => {
                return Err(BatchFailure::Alone(db("inserting a batch of orders")(error)));
            }
            Ok(Err(error)) => return Err(BatchFailure::AtCommit(error.into())),
            Err(_) => {
                conn.close_on_drop();
                let waited = humantime::format_duration(bound);
                return Err(BatchFailure::AtCommit(
                    format!("the database did not answer within {waited}").into(),
                ));
            }
        };
        let mut stored_keys = Vec::new();
        for (&i, created) in taken.iter().zip(created) {
            written[i] = match created {
                (Some(order), _) => Written::Placed(Ok((order, Placement::Created))),
                (None, took_lock) => {
                    stored_keys.push(i);
                    if took_lock { Written::Alone } else { Written::Held }
                }
            };
        }
        // The keys it did not insert (retries, mostly): looked up together,
        // after its commit. A live one is answered from there (its order, or
        // refused if reused); the others, or all of them if the lookup
        // fails, are placed alone.
        if !stored_keys.is_empty() {
            let keys: Vec<KeyId> = stored_keys
                .iter()
                .map(|&i| key_id(&jobs[i].account, jobs[i].new.client_request_id))
                .collect();
            match tokio::time::timeout(bound, read_keys(&mut conn, &keys)).await {
                Ok(Ok(found)) => {
                    for (&i, key) in stored_keys.iter().zip(&keys) {
                        match place::replay(found.get(key).cloned(), &jobs[i].new) {
                            Ok(Some(replayed)) => written[i] = Written::Placed(Ok(replayed)),
                            Err(refused) => written[i] = Written::Placed(Err(refused)),
                            Ok(None) => {}
                        }
                    }
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, orders = keys.len(), "looking up the keys a batch did not insert failed; \
                        they are placed alone");
                }
                Err(_) => {
                    tracing::warn!(
                        orders = keys.len(),
                        "looking up the keys a batch did not insert took too long; \
                        they are placed alone"
                    );
                    conn.close_on_drop();
                }
            }
        }
        Ok(written)
    }

    async fn read_keys(&self, keys: &[KeyId]) -> Result<HashMap<KeyId, StoredKey>, Error> {
        let mut conn = self.pool.acquire().await.map_err(db("reading the idempotency keys"))?;
        read_keys(&mut conn, keys).await
    }

    async fn place_alone(&self, job: Job) -> Placed {
        self.place_one(job).await
    }
}

/// [`read_keys`]'s statement.
const READ_KEYS: &str = concat!(
    "select key_account_id, key_client_request_id, key_fingerprint, key_live, ",
    order_columns!(),
    r" from unnest($1::text[], $2::uuid[]) as wanted(wanted_account_id, wanted_client_request_id)
           cross join lateral (
               select k.account_id as key_account_id, k.client_request_id::text as key_client_request_id,
                      k.fingerprint as key_fingerprint, k.expire_time > clock_timestamp() as key_live,
                      k.order_id as key_order_id
               from idempotency_keys k
               where k.account_id = wanted.wanted_account_id
                 and k.client_request_id = wanted.wanted_client_request_id
               limit 1) as key
           cross join lateral (select * from orders where orders.order_id = key.key_order_id limit 1) as orders"
);

/// The stored keys among `keys`, in one query whatever their number (bound
/// as two arrays): live if unexpired on the database's clock. Each key is
/// its own lateral lookup (`limit 1` keeps the planner from turning them
/// into a join over the whole table): prepared statements keep one plan,
/// made when the table may still be empty, and it must stay a lookup by key
/// however the table grows.
async fn read_keys(conn: &mut PgConnection, keys: &[KeyId]) -> Result<HashMap<KeyId, StoredKey>, Error> {
    let (accounts, ids): (Vec<&str>, Vec<Uuid>) =
        keys.iter().filter_map(|(account, key)| Some((account.as_str(), Uuid::parse_str(key).ok()?))).unzip();
    let rows: Vec<BatchKeyRow> = sqlx::query_as(READ_KEYS)
        .bind(accounts)
        .bind(ids)
        .fetch_all(&mut *conn)
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

/// Runs [`INSERT_BATCH`] for `jobs`: per job, its created order, or `None`
/// if its key was not inserted (nothing was written for it).
/// Each job's order, if created, and whether its key's advisory lock was
/// taken (false: another call holds it).
async fn insert_batch(
    conn: &mut PgConnection,
    jobs: &[&Job],
) -> Result<Vec<(Option<Order>, bool)>, sqlx::Error> {
    let orders: Vec<(KeyRecord<'_>, Order)> =
        jobs.iter().map(|job| KeyRecord::new(&job.account, &job.new, job.ttl)).collect();
    let column = |f: fn(&Order) -> &str| -> Vec<&str> { orders.iter().map(|(_, order)| f(order)).collect() };
    let rows: Vec<(i64, Option<DateTime<Utc>>, bool)> = sqlx::query_as(INSERT_BATCH)
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
    // A job the statement did not name counts as locked by this batch: it
    // is then placed alone like any key the batch did not insert.
    let mut created: Vec<(Option<Order>, bool)> = jobs.iter().map(|_| (None, true)).collect();
    let mut orders = orders.into_iter().map(|(_, order)| Some(order)).collect::<Vec<_>>();
    for (n, at, took_lock) in rows {
        let i = usize::try_from(n - 1).unwrap_or(usize::MAX);
        if let Some(job) = created.get_mut(i) {
            job.1 = took_lock;
        }
        if let (Some(at), Some(order)) = (at, orders.get_mut(i).and_then(Option::take)) {
            created[i].0 = Some(stamped(order, from_datetime(at)));
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

#[cfg(test)]
mod tests {
    use sqlx::Connection as _;

    use super::*;
    use crate::store::{Store, StoreOptions};

    /// A fresh database of its own, migrated.
    async fn fresh_store() -> (PgStore, sqlx::PgConnection, String) {
        let url = std::env::var("TEST_DATABASE_URL").expect("TEST_DATABASE_URL");
        let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
        let name = format!("batch_{}", Uuid::new_v4().simple());
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
        let (base, _) = url.rsplit_once('/').unwrap();
        let Store::Postgres(store) =
            Store::connect(&format!("{base}/{name}"), &StoreOptions::default()).await.unwrap()
        else {
            unreachable!()
        };
        (store, admin, name)
    }

    async fn drop_store(store: PgStore, mut admin: sqlx::PgConnection, name: String) {
        store.close().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("drop database {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
    }

    fn job(key: &str, symbol: &str) -> Job {
        use crate::domain::{AccountId, ClientRequestId, NewOrder};
        let wait = Duration::from_secs(5);
        Job {
            account: AccountId::new("alice"),
            new: NewOrder::sample(ClientRequestId::parse(key).unwrap(), symbol),
            ttl: Duration::from_secs(3600),
            lock_wait: wait,
            deadline_bound: false,
            lock_deadline: Instant::now() + wait,
            attempt: Default::default(),
            held_elsewhere: false,
            span: tracing::Span::none(),
        }
    }

    /// One batch answers its new keys (created), its stored keys (the
    /// persisted order, or refused when reused with other fields) and a key
    /// twice in it (the first created, the second its replay) from its
    /// statement and one lookup after it; nothing goes alone.
    #[tokio::test]
    #[ignore = "needs TEST_DATABASE_URL; scripts/test runs it"]
    async fn a_batch_answers_new_stored_reused_and_repeated_keys_itself() {
        let (store, admin, name) = fresh_store().await;
        let [stored, reused, new, twice] =
            [1, 2, 3, 4].map(|i| format!("0b6e8a53-2a4e-4c8e-9d62-3f1b1f0e6a0{i}"));
        let seed = [job(&stored, "AAPL"), job(&reused, "AAPL")];
        let Ok(first) = store.write_batch(Instant::now() + Duration::from_secs(5), &seed).await else {
            panic!("the first batch failed")
        };
        let orders: Vec<Order> = first
            .into_iter()
            .map(|w| match w {
                Written::Placed(Ok((order, Placement::Created))) => order,
                _ => panic!("not created"),
            })
            .collect();
        let jobs = [
            job(&stored, "AAPL"),
            job(&reused, "MSFT"),
            job(&new, "AAPL"),
            job(&twice, "AAPL"),
            job(&twice, "AAPL"),
        ];
        let Ok(written) = store.write_batch(Instant::now() + Duration::from_secs(5), &jobs).await else {
            panic!("the batch failed")
        };
        let answers: Vec<Placed> = written
            .into_iter()
            .map(|w| match w {
                Written::Placed(placed) => placed,
                Written::Alone | Written::Held => panic!("sent alone"),
            })
            .collect();
        assert!(
            matches!(&answers[0], Ok((order, Placement::Replayed)) if *order == orders[0]),
            "{:?}",
            answers[0]
        );
        assert!(matches!(&answers[1], Err(Error::KeyReused { .. })), "{:?}", answers[1]);
        assert!(matches!(&answers[2], Ok((_, Placement::Created))), "{:?}", answers[2]);
        let (Ok((created, Placement::Created)), Ok((replayed, Placement::Replayed))) =
            (&answers[3], &answers[4])
        else {
            panic!("{:?} {:?}", answers[3], answers[4])
        };
        assert_eq!(created, replayed);
        drop_store(store, admin, name).await;
    }

    /// The group commit's statements are prepared once per connection and
    /// keep one plan, made on a table that may still be empty: on a fresh
    /// database their plans must already look each key up by its index.
    /// (The batched lookup was a hash join over the whole key table, and the
    /// guard's lookup used the index by status, until the first analyze.)
    #[tokio::test]
    #[ignore = "needs TEST_DATABASE_URL; scripts/test runs it"]
    async fn on_a_fresh_database_the_batch_statements_look_each_key_up_by_index() {
        let (store, admin, name) = fresh_store().await;
        let mut conn = store.pool.acquire().await.unwrap();
        let plan =
            async |conn: &mut PgConnection, name: &str, types: &str, sql: &str, args: &str| -> String {
                let prepare = format!("prepare {name}({types}) as {sql}");
                sqlx::raw_sql(sqlx::AssertSqlSafe(prepare)).execute(&mut *conn).await.unwrap();
                let lines: Vec<String> =
                    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("explain execute {name}({args})")))
                        .fetch_all(&mut *conn)
                        .await
                        .unwrap();
                lines.join("\n")
            };
        let key = "array['a']::text[], array['0b6e8a53-2a4e-4c8e-9d62-3f1b1f0e6a01']::uuid[]";
        let lookup = plan(&mut conn, "lookup", "text[], uuid[]", READ_KEYS, key).await;
        assert!(!lookup.contains("Seq Scan"), "{lookup}");
        assert!(lookup.contains("idempotency_keys_pkey") && lookup.contains("orders_pkey"), "{lookup}");
        let types = "text[], uuid[], bytea[], uuid[], bigint[], text[], text[], text[], numeric[], numeric[], text[], text[]";
        let args = format!(
            "{key}, array['\\x00']::bytea[], array['0b6e8a53-2a4e-4c8e-9d62-3f1b1f0e6a02']::uuid[], \
             array[1000000]::bigint[], array['X'], array['BUY'], array['LIMIT'], array[1]::numeric[], \
             array[1]::numeric[], array['GTC'], array['NEW']"
        );
        let insert = plan(&mut conn, "batch", types, INSERT_BATCH, &args).await;
        assert!(!insert.contains("Seq Scan"), "{insert}");
        assert!(
            insert.contains("orders_by_account_key"),
            "the guard looks the key's orders up by key: {insert}"
        );
        drop(conn);
        drop_store(store, admin, name).await;
    }
}
