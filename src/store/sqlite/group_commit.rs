//! SQLite's statements for group commit (`store::batch`): a batch is one
//! `begin immediate … commit` under the write lock (one disk flush), its new
//! keys and orders inserted by two statements, the rest through the
//! ordinary flow inside the same transaction.

use std::collections::HashMap;

use sqlx::{QueryBuilder, Sqlite, SqliteConnection};
use tokio::time::Instant;

use super::{
    SqliteStore, db,
    statements::{SqliteTx, read_keys},
};
use crate::{
    clock::Clock,
    domain::{Order, OrderId, Timestamp},
    error::Error,
    store::{
        Placement,
        batch::{self, BatchFailure, GroupCommit, Job, KeyId, Placed, Written, claim},
        place::{self, StoredKey},
    },
};

impl GroupCommit for SqliteStore {
    const SYSTEM: &'static str = "sqlite";
    const WRITERS: usize = 1;
    const LOOKS_UP_FIRST: bool = true;

    fn lock_timeout(&self) -> std::time::Duration {
        self.lock_timeout
    }

    fn queues(&self) -> Option<&batch::Queues> {
        self.queues.as_ref()
    }

    /// Runs `jobs` in one `begin immediate … commit`: one disk flush for the
    /// whole batch. A job refused for a reused key wrote nothing and leaves
    /// its batch-mates alone; a database error rolls the whole batch back
    /// (nothing of it is committed, so every caller may retry with its key).
    /// Savepoints per job would add two statements per order for no gain:
    /// no refusal writes first.
    async fn write_batch(&self, lock_deadline: Instant, jobs: &[Job]) -> Result<Vec<Written>, BatchFailure> {
        let mut conn = match tokio::time::timeout_at(lock_deadline, self.writer.acquire()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(BatchFailure::NotWritten(db("beginning the order transaction")(e))),
            Err(_) => return Err(BatchFailure::NotBegun),
        };
        let written = write_batch(&mut conn, self.clock.as_ref(), lock_deadline, jobs).await;
        if written.is_err() {
            // After a failed statement or COMMIT (disk full, file made
            // unwritable) SQLite may already have rolled back, and sqlx's own
            // rollback then fails and leaves the connection believing it is
            // still in a transaction, refusing every later BEGIN. Start the
            // next batch on a fresh connection instead.
            conn.close_on_drop();
        }
        Ok(written?.into_iter().map(Written::Placed).collect())
    }

    async fn read_keys(&self, keys: &[KeyId]) -> Result<HashMap<KeyId, StoredKey>, Error> {
        let mut conn = self.reader.acquire().await.map_err(db("reading the idempotency key"))?;
        read_keys(&mut conn, keys, self.clock.now()).await
    }

    /// Group commit off: the key looked up on a reader, then a batch of one.
    async fn place_alone(&self, job: Job) -> Placed {
        let key = batch::key_id(&job.account, job.new.client_request_id);
        let stored = self.read_keys(std::slice::from_ref(&key)).await?.remove(&key);
        if let Some(replayed) = place::replay(stored, &job.new)? {
            return Ok(replayed);
        }
        batch::write_one(self, job).await
    }
}

/// The batch's transaction on `conn`; an error says what was committed.
/// Only the jobs whose callers still wait once the lock is taken are
/// written (each marked sent first); the others are answered "not written".
async fn write_batch(
    conn: &mut SqliteConnection,
    clock: &dyn Clock,
    lock_deadline: Instant,
    jobs: &[Job],
) -> Result<Vec<Placed>, BatchFailure> {
    // Past the deadline the BEGIN is abandoned; if SQLite still takes the
    // lock afterwards, sqlx rolls that unacknowledged BEGIN back.
    let begin = sqlx::Connection::begin_with(conn, "begin immediate");
    let mut tx = match tokio::time::timeout_at(lock_deadline, begin).await {
        Ok(tx) => tx.map_err(|e| BatchFailure::NotWritten(db("beginning the order transaction")(e)))?,
        Err(_) => return Err(BatchFailure::NotBegun),
    };
    // The lock is held: the time of every order of this batch is now, so
    // creation times follow commit order, and expiry is decided at the write.
    let now = clock.now();
    let mut results: Vec<Placed> = jobs.iter().map(|job| Err(job.not_begun())).collect();
    let taken = claim(jobs);
    if taken.is_empty() {
        return Ok(results); // every caller gave up: roll back, nothing written
    }
    let batch: Vec<&Job> = taken.iter().map(|&i| &jobs[i]).collect();
    let created = insert_new(&mut tx, &batch, now).await.map_err(BatchFailure::NotWritten)?;
    for (&i, created) in taken.iter().zip(created) {
        let job = &jobs[i];
        // A key the batch insert took is a new order, already written; any
        // other (a retry, a duplicate inside this batch, an expired key) runs
        // the ordinary flow, which now sees the batch's own rows.
        let placed = match created {
            Some(order) => Ok((order, Placement::Created)),
            None => {
                let mut flow = SqliteTx { conn: &mut tx, now };
                place::place(&mut flow, &job.account, job.new.clone(), job.ttl).await
            }
        };
        match placed {
            // A refused key wrote nothing (the flow only reads after a
            // conflicting insert), so its batch-mates are untouched.
            Ok(_) | Err(Error::KeyReused { .. } | Error::KeyInUse) => results[i] = placed,
            // A database error may have left a half-done order: roll the
            // whole batch back; every caller may retry with its key.
            Err(error) => return Err(BatchFailure::NotWritten(error)),
        }
    }
    tx.commit().await.map_err(|error| {
        // BUSY or LOCKED: SQLite kept the transaction open and committed
        // nothing (sqlx rolls it back).
        let refused_whole = matches!(&error, sqlx::Error::Database(e)
            if e.code().and_then(|c| c.parse::<i32>().ok()).is_some_and(|c| matches!(c & 0xff, 5 | 6)));
        if refused_whole {
            BatchFailure::NotWritten(db("committing the orders")(error))
        } else {
            BatchFailure::AtCommit(error.into())
        }
    })?;
    Ok(results)
}

/// Inserts every job's key in one statement and, for the keys it took, every
/// new order in a second: two statements per batch instead of two per order.
/// A key is taken unless it exists or an order placed with it is younger
/// than its lifetime (see `place`). Returns, per job, its created order, or
/// `None` if its key was not taken (then the ordinary flow decides: replay,
/// refusal or expired reuse).
async fn insert_new(
    tx: &mut SqliteConnection,
    jobs: &[&Job],
    now: Timestamp,
) -> Result<Vec<Option<Order>>, Error> {
    let ids: Vec<OrderId> = jobs.iter().map(|_| OrderId::generate()).collect();
    let mut keys = QueryBuilder::<Sqlite>::new(
        "insert into idempotency_keys \
         (account_id, client_request_id, fingerprint, order_id, create_time, expire_time) \
         select column1, column2, column3, column4, column5, column6 from (",
    );
    keys.push_values(jobs.iter().zip(&ids), |mut row, (job, id)| {
        row.push_bind(job.account.as_str())
            .push_bind(job.new.client_request_id.to_string())
            .push_bind(job.new.fingerprint().0.to_vec())
            .push_bind(id.to_string())
            .push_bind(now.as_micros())
            .push_bind(now.add(job.ttl).as_micros())
            .push_bind(now.sub(job.ttl).as_micros());
    });
    keys.push(
        ") as new where not exists (
             select 1 from orders
             where orders.account_id = new.column1 and orders.client_request_id = new.column2
               and orders.create_time > new.column7)
         on conflict (account_id, client_request_id) do nothing returning order_id",
    );
    let taken: std::collections::HashSet<String> = keys
        .build_query_scalar::<String>()
        .fetch_all(&mut *tx)
        .await
        .map_err(db("inserting the idempotency keys"))?
        .into_iter()
        .collect();
    let created: Vec<Option<Order>> = jobs
        .iter()
        .zip(&ids)
        .map(|(job, id)| {
            taken.contains(&id.to_string()).then(|| job.new.clone().into_order(job.account.clone(), *id, now))
        })
        .collect();
    let new_orders: Vec<&Order> = created.iter().flatten().collect();
    if !new_orders.is_empty() {
        let mut orders = QueryBuilder::<Sqlite>::new(concat!("insert into orders (", order_columns!(), ") "));
        orders.push_values(new_orders, |mut row, order| {
            row.push_bind(order.order_id.to_string())
                .push_bind(order.account_id.as_str().to_owned())
                .push_bind(order.client_request_id.to_string())
                .push_bind(order.symbol.as_str().to_owned())
                .push_bind(order.side.as_str())
                .push_bind(order.order_type.as_str())
                .push_bind(order.quantity.to_string())
                .push_bind(order.limit_price.map(|p| p.to_string()))
                .push_bind(order.time_in_force.as_str())
                .push_bind(order.status.as_str())
                .push_bind(order.create_time.as_micros())
                .push_bind(order.update_time.as_micros());
        });
        orders.build().execute(&mut *tx).await.map_err(db("inserting the orders"))?;
    }
    Ok(created)
}
