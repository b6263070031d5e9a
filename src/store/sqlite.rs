//! The embedded SQLite store.
//!
//! One file in WAL mode with `synchronous=FULL`, so an acknowledged order
//! survives power loss. Writes go through a pool of exactly one connection and
//! start with `BEGIN IMMEDIATE` (a deferred transaction that reads first fails
//! with `SQLITE_BUSY_SNAPSHOT` once another writer commits); reads use a
//! separate read-only pool and run beside the writer. Another process holding
//! the lock past the busy timeout answers `UNAVAILABLE`.
//!
//! With group commit on (`sqlite_max_batch` > 1), PlaceOrders queue twice:
//! the batch reader looks up every waiting key in one query (a live key is
//! answered from there, without the write lock), and the batch writer
//! commits every waiting new order in one transaction.

use std::{str::FromStr, sync::Arc, time::Duration};

use sqlx::{
    AssertSqlSafe, QueryBuilder, Sqlite, SqliteConnection, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use uuid::Uuid;

use super::{
    OrderRecord, Placement, StoreOptions,
    attempt::Attempt,
    place::{self, KeyRecord, PlaceTx, StoredKey},
};
use crate::{
    clock::Clock,
    domain::{
        AccountId, ClientRequestId, Cursor, NewOrder, Order, OrderFilter, OrderId, PositiveDecimal, Timestamp,
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
    /// Where times come from (read under the write lock for writes).
    clock: Arc<dyn Clock>,
    /// Where PlaceOrders queue for the group-commit writer (none when
    /// `sqlite_max_batch` is 1).
    batcher: Option<mpsc::Sender<Queued>>,
    /// Where PlaceOrders queue to have their key looked up (none when
    /// `sqlite_max_batch` is 1).
    lookups: Option<mpsc::Sender<Lookup>>,
}

/// The answer of a PlaceOrder.
type Placed = Result<(Order, Placement), Error>;

/// A queued PlaceOrder and where its answer goes.
type Queued = (Job, oneshot::Sender<Placed>);

/// A PlaceOrder's key, queued for the batch reader, and where its stored
/// key (if any) goes.
type Lookup = (KeyId, oneshot::Sender<Result<Option<StoredKey>, Error>>);

/// An idempotency key as the tables spell it: account, then the key.
type KeyId = (String, String);

fn key_id(account: &AccountId, key: ClientRequestId) -> KeyId {
    (account.as_str().to_owned(), key.to_string())
}

/// One PlaceOrder waiting for the writer.
#[derive(Debug)]
struct Job {
    account: AccountId,
    new: NewOrder,
    ttl: Duration,
    /// When its caller stops waiting for the write lock. A batch waits for
    /// the lock until the latest of its jobs' lock deadlines: one impatient
    /// caller never fails its batch-mates.
    lock_deadline: Instant,
    /// Whether its write was sent: its batch takes it (after `begin
    /// immediate`) only if its caller has not given up, and a caller that
    /// gives up first is never written.
    attempt: Arc<Attempt>,
}

fn closed() -> Error {
    Error::Unavailable { context: "placing an order", source: "the database writer has stopped".into() }
}

/// The answer of a job whose write lock was not taken in its lock wait, or
/// whose caller gave up before its batch began: nothing was written.
fn lock_not_taken() -> Error {
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
async fn run_batch(writer: &SqlitePool, clock: &dyn Clock, jobs: Vec<Job>) -> Vec<Placed> {
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
async fn batch_writer(
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
        let results = run_batch(&writer, clock.as_ref(), jobs).await;
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
async fn batch_reader(
    reader: SqlitePool,
    clock: Arc<dyn Clock>,
    max_batch: usize,
    mut queue: mpsc::Receiver<Lookup>,
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

/// The stored keys (each joined with its order) among `keys`, in one query,
/// live if unexpired at `now`.
async fn read_keys(
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
        // SQLite has no migration lock: servers starting together on one file
        // would race to switch it to WAL and to apply the same migration. Take
        // turns on a lock file beside the database while setting it up.
        let lock_path = format!("{}.startup-lock", connect.get_filename().display());
        let db_path = connect.get_filename().to_owned();
        let startup_lock = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
            let file = private_file(std::path::Path::new(&lock_path))?;
            file.lock()?;
            // Orders are nobody else's business: a new database file is
            // the owner's alone, and SQLite gives its -wal and -shm files
            // the database file's mode.
            if !db_path.exists() {
                private_file(&db_path)?;
            }
            Ok(file)
        })
        .await
        .map_err(|e| sqlx::Error::Io(std::io::Error::other(e)))??;
        // No ping before each use: a connection to a local file cannot go
        // stale, and the ping is a round trip to the connection's worker
        // thread on every call (a writer that failed is replaced instead).
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect.clone().create_if_missing(true))
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&writer).await?;
        drop(startup_lock);
        let reader = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .test_before_acquire(false)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect.read_only(true))
            .await?;
        let batching = options.sqlite_max_batch > 1;
        let clock = options.clock.clone();
        let batcher = batching.then(|| {
            let (queue, jobs) = mpsc::channel(options.sqlite_max_batch * 4);
            tokio::spawn(batch_writer(writer.clone(), clock.clone(), options.sqlite_max_batch, jobs));
            queue
        });
        let lookups = batching.then(|| {
            let (queue, lookups) = mpsc::channel(options.sqlite_max_batch * 4);
            tokio::spawn(batch_reader(reader.clone(), clock.clone(), options.sqlite_max_batch, lookups));
            queue
        });
        Ok(Self { writer, reader, clock, batcher, lookups })
    }

    pub(super) async fn place_order(
        &self,
        account: &AccountId,
        new: NewOrder,
        ttl: Duration,
        lock_wait: Duration,
        attempt: &Arc<Attempt>,
    ) -> Result<(Order, Placement), Error> {
        // A retry of a committed order needs no write lock: answer it from a
        // reader, beside the writer.
        let stored = match &self.lookups {
            Some(lookups) => {
                let (reply, answer) = oneshot::channel();
                lookups.send((key_id(account, new.client_request_id), reply)).await.map_err(|_| closed())?;
                answer.await.map_err(|_| closed())??
            }
            None => {
                let mut reader = self.reader.acquire().await.map_err(db("reading the idempotency key"))?;
                let key = key_id(account, new.client_request_id);
                read_keys(&mut reader, std::slice::from_ref(&key), self.clock.now()).await?.remove(&key)
            }
        };
        if let Some(replayed) = place::replay(stored, &new)? {
            return Ok(replayed);
        }
        let key = new.client_request_id;
        let lock_deadline = Instant::now() + lock_wait;
        let job = Job { account: account.clone(), new, ttl, lock_deadline, attempt: attempt.clone() };
        let Some(batcher) = &self.batcher else {
            let mut results = run_batch(&self.writer, self.clock.as_ref(), vec![job]).await;
            return results.pop().unwrap_or_else(|| Err(closed()));
        };
        let (reply, answer) = oneshot::channel();
        batcher.send((job, reply)).await.map_err(|_| closed())?;
        let mut answer = std::pin::pin!(answer);
        let gone = |attempt: &Attempt| {
            if attempt.abandon() {
                return closed();
            }
            Error::OutcomeUnknown {
                client_request_id: key,
                deadline: false,
                context: "waiting for the database writer",
                source: "the database writer stopped with the batch begun".into(),
            }
        };
        match tokio::time::timeout_at(lock_deadline, &mut answer).await {
            Ok(result) => result.unwrap_or_else(|_| Err(gone(attempt))),
            // The lock wait passed before the batch began: never written.
            Err(_) if attempt.abandon() => Err(lock_not_taken()),
            // The batch has begun: its answer comes with its commit, or the
            // caller's deadline cuts the wait (outcome unknown).
            Err(_) => answer.await.unwrap_or_else(|_| Err(gone(attempt))),
        }
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
    ) -> Result<Order, Error> {
        let now = self.clock.now();
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

    pub(super) async fn list_orders(
        &self,
        account: &AccountId,
        filter: &OrderFilter,
        after: Option<Cursor>,
        limit: u32,
    ) -> Result<Vec<Order>, Error> {
        // Built from fixed fragments only; every value is bound.
        let mut sql = String::from(concat!("select ", order_columns!(), " from orders where account_id = ?"));
        if filter.symbol.is_some() {
            sql.push_str(" and symbol = ?");
        }
        if filter.status.is_some() {
            sql.push_str(" and status = ?");
        }
        if after.is_some() {
            sql.push_str(" and (create_time, order_id) < (?, ?)");
        }
        sql.push_str(" order by create_time desc, order_id desc limit ?");
        let mut query = sqlx::query_as::<_, OrderRow>(AssertSqlSafe(sql)).bind(account.as_str());
        if let Some(symbol) = &filter.symbol {
            query = query.bind(symbol.as_str());
        }
        if let Some(status) = filter.status {
            query = query.bind(status.as_str());
        }
        if let Some(after) = after {
            query = query.bind(after.create_time.as_micros()).bind(after.order_id.to_string());
        }
        let rows =
            query.bind(i64::from(limit)).fetch_all(&self.reader).await.map_err(db("listing orders"))?;
        rows.into_iter().map(Order::try_from).collect()
    }

    pub(super) async fn cancel_order(
        &self,
        account: &AccountId,
        id: OrderId,
    ) -> Result<(Order, bool), Error> {
        let now = self.clock.now();
        let canceled: Option<OrderRow> = sqlx::query_as(concat!(
            r"update orders set status = 'CANCELED', update_time = max(?, create_time)
              where order_id = ? and account_id = ? and status = 'NEW'
              returning ",
            order_columns!()
        ))
        .bind(now.as_micros())
        .bind(id.to_string())
        .bind(account.as_str())
        .fetch_optional(&self.writer)
        .await
        .map_err(db("cancelling the order"))?;
        match canceled {
            Some(row) => Ok((row.try_into()?, true)),
            // Already cancelled, or not this account's order.
            None => Ok((self.get_order(account, id).await?, false)),
        }
    }

    pub(super) async fn purge_expired_keys(&self, limit: u32) -> Result<u64, Error> {
        let now = self.clock.now();
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

    /// Ready means orders can be placed: the file answers a read, and takes a
    /// write (one row rewritten and committed, so a full disk, a read-only
    /// or immutable file, or a lock held past the busy timeout all fail it).
    pub(super) async fn ping(&self) -> Result<(), Error> {
        sqlx::query("select 1").execute(&self.reader).await.map_err(db("pinging the database"))?;
        let mut conn = self.writer.acquire().await.map_err(db("probing a write"))?;
        let probe = async {
            let mut tx = sqlx::Connection::begin_with(&mut *conn, "begin immediate").await?;
            sqlx::query("update health_probe set probes = probes + 1 where id = 1").execute(&mut *tx).await?;
            tx.commit().await
        };
        if let Err(error) = probe.await {
            // As after a failed batch: start afresh rather than trust a
            // connection whose transaction state a failed COMMIT confused.
            conn.close_on_drop();
            return Err(db("probing a write")(error));
        }
        Ok(())
    }

    pub(super) fn pool_stats(&self) -> Vec<(&'static str, u32, usize)> {
        vec![
            ("writer", self.writer.size(), self.writer.num_idle()),
            ("reader", self.reader.size(), self.reader.num_idle()),
        ]
    }

    pub(super) async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }
}

/// The PlaceOrder statements inside a batch's transaction, at the batch's
/// time (read under the write lock).
struct SqliteTx<'c> {
    conn: &'c mut SqliteConnection,
    now: Timestamp,
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

/// Opens `path` for writing, creating it readable and writable by its owner
/// alone (0600) if missing.
fn private_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
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
            Error::Unavailable { context, source: error.into() }
        } else {
            Error::internal(context, error)
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{OrderType, Side, Symbol, TimeInForce};

    fn order(key: ClientRequestId, symbol: &str) -> NewOrder {
        NewOrder {
            client_request_id: key,
            symbol: Symbol::parse(symbol).unwrap(),
            side: Side::Buy,
            order_type: OrderType::Limit,
            quantity: PositiveDecimal::parse("1").unwrap(),
            limit_price: Some(PositiveDecimal::parse("10").unwrap()),
            time_in_force: TimeInForce::Gtc,
        }
    }

    /// The batched lookup answers each key for its own account: the same key
    /// under two accounts names two orders, an absent key finds nothing,
    /// and a key asked for twice in one batch is found for both.
    #[tokio::test]
    async fn read_keys_finds_each_key_under_its_own_account() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("orders.db").display());
        let wait = Duration::from_secs(5);
        let options = StoreOptions {
            max_connections: 1,
            lock_timeout: wait,
            acquire_timeout: wait,
            sqlite_max_batch: 1,
            ..StoreOptions::default()
        };
        let store = SqliteStore::connect(&url, &options).await.unwrap();
        let (alice, bob) = (AccountId::new("alice"), AccountId::new("bob"));
        let shared = ClientRequestId::parse("0b6e8a53-2a4e-4c8e-9d62-3f1b1f0e6a01").unwrap();
        let absent = ClientRequestId::parse("0b6e8a53-2a4e-4c8e-9d62-3f1b1f0e6a02").unwrap();
        let place = |account: &AccountId, new: NewOrder| {
            let (store, account) = (store.clone(), account.clone());
            async move { store.place_order(&account, new, wait, wait, &Arc::default()).await.unwrap() }
        };
        let (for_alice, _) = place(&alice, order(shared, "AAPL")).await;
        let (for_bob, _) = place(&bob, order(shared, "MSFT")).await;

        // Five keys: the query pads them to eight.
        let wanted = [
            key_id(&alice, shared),
            key_id(&bob, shared),
            key_id(&alice, absent),
            key_id(&alice, shared),
            key_id(&bob, absent),
        ];
        let mut conn = store.reader.acquire().await.unwrap();
        let found = read_keys(&mut conn, &wanted, store.clock.now()).await.unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[&wanted[0]].order, for_alice);
        assert_eq!(found[&wanted[1]].order, for_bob);
        assert_eq!(found[&wanted[0]].fingerprint, Some(order(shared, "AAPL").fingerprint().0.to_vec()));
        assert!(found[&wanted[0]].live && found[&wanted[1]].live);
        assert!(!found.contains_key(&wanted[2]) && !found.contains_key(&wanted[4]));
    }

    /// The largest batch the flags allow fits in SQLite's statements: every
    /// order of a full batch is written and every key found in one lookup.
    #[tokio::test]
    async fn the_largest_batch_allowed_is_written_and_looked_up() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("orders.db").display());
        let wait = Duration::from_secs(30);
        let max = crate::config::SQLITE_MAX_BATCH_LIMIT as usize;
        let options = StoreOptions {
            max_connections: 1,
            lock_timeout: wait,
            acquire_timeout: wait,
            sqlite_max_batch: max,
            ..StoreOptions::default()
        };
        let store = SqliteStore::connect(&url, &options).await.unwrap();
        let account = AccountId::new("alice");
        let lock_deadline = Instant::now() + wait;
        let jobs: Vec<Job> = (0..max)
            .map(|i| {
                let key = ClientRequestId::parse(&format!("00000000-0000-4000-8000-{i:012}")).unwrap();
                let attempt = Arc::default();
                Job { account: account.clone(), new: order(key, "AAPL"), ttl: wait, lock_deadline, attempt }
            })
            .collect();
        let keys: Vec<KeyId> = jobs.iter().map(|job| key_id(&account, job.new.client_request_id)).collect();
        let results = run_batch(&store.writer, store.clock.as_ref(), jobs).await;
        assert_eq!(results.len(), max);
        for result in results {
            assert_eq!(result.expect("placed").1, Placement::Created);
        }
        let mut conn = store.reader.acquire().await.unwrap();
        assert_eq!(read_keys(&mut conn, &keys, store.clock.now()).await.unwrap().len(), max);
    }
}
