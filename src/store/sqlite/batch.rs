//! Group commit: PlaceOrders that arrive while a batch is being written
//! wait together and are written by the next one, in one transaction (one
//! disk flush); their keys are looked up together too, in one query.
//!
//! Each job keeps its own lock wait, and is taken into its batch only once
//! the write lock is held and only if its caller still waits
//! ([`Attempt`]): a caller that gave up is never written, and one whose
//! write was sent is never told "nothing was written".

use std::{sync::Arc, time::Duration};

use sqlx::{QueryBuilder, Sqlite, SqliteConnection, SqlitePool};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tracing::Instrument as _;

use super::{
    KeyId, db,
    statements::{SqliteTx, read_keys},
};
use crate::{
    clock::Clock,
    domain::{AccountId, NewOrder, Order, OrderId, Timestamp},
    error::Error,
    store::{
        Placement,
        attempt::Attempt,
        place::{self, StoredKey},
    },
};

/// The answer of a PlaceOrder.
type Placed = Result<(Order, Placement), Error>;

/// A queued PlaceOrder and where its answer goes.
pub(super) type Queued = (Job, oneshot::Sender<Placed>);

/// A PlaceOrder's key, queued for the batch reader, and where its stored
/// key (if any) goes.
pub(super) type KeyLookup = (KeyId, oneshot::Sender<Result<Option<StoredKey>, Error>>);

/// One PlaceOrder waiting for the writer.
#[derive(Debug)]
pub(super) struct Job {
    pub account: AccountId,
    pub new: NewOrder,
    pub ttl: Duration,
    /// When its caller stops waiting for the write lock. A batch waits for
    /// the lock until the latest of its jobs' lock deadlines: one impatient
    /// caller never fails its batch-mates.
    pub lock_deadline: Instant,
    /// Whether its write was sent: its batch takes it (after `begin
    /// immediate`) only if its caller has not given up, and a caller that
    /// gives up first is never written.
    pub attempt: Arc<Attempt>,
    /// The caller's span (its database span when traced), which the batch
    /// it rides in links to.
    pub span: tracing::Span,
}

pub(super) fn closed() -> Error {
    Error::Unavailable { context: "placing an order", source: "the database writer has stopped".into() }
}

/// The answer of a job whose write lock was not taken in its lock wait, or
/// whose caller gave up before its batch began: nothing was written.
pub(super) fn lock_not_taken() -> Error {
    Error::Unavailable {
        context: "waiting for the database writer",
        source: "the write lock was not taken within the lock wait".into(),
    }
}

/// How a batch failed.
enum BatchFailure {
    /// Before COMMIT, or a COMMIT SQLite refused whole: nothing of the
    /// batch was committed.
    NotWritten(Error),
    /// The COMMIT failed otherwise (I/O error, disk full): its frames may
    /// have reached the log, so the outcome is unknown.
    AtCommit(sqlx::Error),
}

/// Runs `jobs` in one `begin immediate … commit`: one disk flush for the
/// whole batch, and every job answered only after the commit that holds it.
/// A job refused for a reused key wrote nothing and leaves its batch-mates
/// alone; a database error rolls the whole batch back (nothing of it is
/// committed, so every caller may retry with its key). Savepoints per job
/// would add two statements per order for no gain: no refusal writes first.
pub(super) async fn run_batch(writer: &SqlitePool, clock: &dyn Clock, jobs: Vec<Job>) -> Vec<Placed> {
    let n = jobs.len();
    let Some(lock_deadline) = jobs.iter().map(|job| job.lock_deadline).max() else {
        return Vec::new();
    };
    let mut conn = match tokio::time::timeout_at(lock_deadline, writer.acquire()).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return fail_all(db("beginning the order transaction")(e), n),
        Err(_) => return fail_all(lock_not_taken(), n),
    };
    match write_batch(&mut conn, clock, lock_deadline, &jobs).await {
        Ok(results) => results,
        Err(failure) => {
            // After a failed statement or COMMIT (disk full, file made
            // unwritable) SQLite may already have rolled back, and sqlx's own
            // rollback then fails and leaves the connection believing it is
            // still in a transaction, refusing every later BEGIN. Start the
            // next batch on a fresh connection instead.
            conn.close_on_drop();
            match failure {
                BatchFailure::NotWritten(error) => fail_all(error, n),
                BatchFailure::AtCommit(error) => {
                    tracing::warn!(%error, orders = n, "the batch's COMMIT failed; its outcome is unknown");
                    jobs.iter()
                        .map(|job| {
                            if job.attempt.abandon() {
                                return Err(lock_not_taken());
                            }
                            Err(Error::OutcomeUnknown {
                                client_request_id: job.new.client_request_id,
                                deadline: false,
                                context: "committing the orders",
                                source: format!("the batch's COMMIT failed: {error}").into(),
                            })
                        })
                        .collect()
                }
            }
        }
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
        Err(_) => return Err(BatchFailure::NotWritten(lock_not_taken())),
    };
    // The lock is held: the time of every order of this batch is now, so
    // creation times follow commit order, and expiry is decided at the write.
    let now = clock.now();
    let mut results: Vec<Placed> = jobs.iter().map(|_| Err(lock_not_taken())).collect();
    let taken: Vec<usize> = (0..jobs.len()).filter(|&i| jobs[i].attempt.send()).collect();
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
            BatchFailure::AtCommit(error)
        }
    })?;
    Ok(results)
}

/// `error` for the first of `n` jobs, and the same failure for the others.
fn fail_all<T>(error: Error, n: usize) -> Vec<Result<T, Error>> {
    let others: Vec<_> = (1..n).map(|_| Err(same_failure(&error))).collect();
    std::iter::once(Err(error)).chain(others).collect()
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

/// The same failure again, for the other jobs of a failed batch.
fn same_failure(error: &Error) -> Error {
    match error {
        Error::Internal { context, .. } => Error::internal(context, "the batch's transaction failed"),
        Error::Unavailable { context, .. } => {
            Error::Unavailable { context, source: "the batch's transaction failed".into() }
        }
        _ => closed(),
    }
}

/// The group-commit writer: takes the first waiting PlaceOrder, then every
/// other one already waiting (up to `max_batch`), without waiting for more,
/// and runs them as one batch. Ends when the store is dropped.
pub(super) async fn batch_writer(
    writer: SqlitePool,
    clock: Arc<dyn Clock>,
    max_batch: usize,
    mut queue: mpsc::Receiver<Queued>,
) {
    let mut waiting = Vec::with_capacity(max_batch);
    while queue.recv_many(&mut waiting, max_batch).await > 0 {
        // A caller that gave up while queued, or whose lock wait passed
        // there, is told so (if it still listens); its order is never placed.
        let now = Instant::now();
        let (jobs, replies): (Vec<_>, Vec<_>) = waiting
            .drain(..)
            .filter_map(|(job, reply): Queued| {
                if job.lock_deadline > now && !reply.is_closed() {
                    return Some((job, reply));
                }
                job.attempt.abandon();
                let _ = reply.send(Err(lock_not_taken()));
                None
            })
            .unzip();
        if jobs.is_empty() {
            continue;
        }
        crate::telemetry::metrics::record_batch(jobs.len());
        let span = crate::telemetry::traces::batch_span(jobs.len(), jobs.iter().map(|job| &job.span));
        let results = run_batch(&writer, clock.as_ref(), jobs).instrument(span).await;
        for (reply, result) in replies.into_iter().zip(results) {
            // The caller may have given up (deadline): its order still stands.
            let _ = reply.send(result);
        }
    }
}

/// The batch reader: takes the first waiting key lookup, then every other
/// one already waiting (up to `max_batch`), and answers them all with one
/// query: one trip to a reader connection's worker thread (and one release
/// ping) for the batch instead of one each. Ends when the store is dropped.
pub(super) async fn batch_reader(
    reader: SqlitePool,
    clock: Arc<dyn Clock>,
    max_batch: usize,
    mut queue: mpsc::Receiver<KeyLookup>,
) {
    let mut waiting = Vec::with_capacity(max_batch);
    while queue.recv_many(&mut waiting, max_batch).await > 0 {
        let (keys, replies): (Vec<_>, Vec<_>) =
            waiting.drain(..).filter(|(_, reply)| !reply.is_closed()).unzip();
        if keys.is_empty() {
            continue;
        }
        let found = match reader.acquire().await {
            Ok(mut conn) => read_keys(&mut conn, &keys, clock.now()).await,
            Err(e) => Err(db("reading the idempotency key")(e)),
        };
        let results = match found {
            // A key asked for twice in one batch: each asker gets it.
            Ok(found) => keys.iter().map(|key| Ok(found.get(key).cloned())).collect(),
            Err(error) => fail_all(error, keys.len()),
        };
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}
