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
//! commits every waiting new order in one transaction (`batch`). The
//! statements, PlaceOrder's and those of the other flows, are in
//! `statements`.

use std::{str::FromStr, sync::Arc, time::Duration};

use super::{StoreOptions, batch::Queues};
use crate::{clock::Clock, error::Error};
use sqlx::{
    SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

/// The order columns, in the order [`OrderRow`] reads them.
macro_rules! order_columns {
    () => {
        "order_id, account_id, client_request_id, symbol, side, order_type, quantity, limit_price, \
         time_in_force, status, create_time, update_time"
    };
}

mod group_commit;
mod statements;

/// Orders and idempotency keys in one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    /// Where times come from (read under the write lock for writes).
    clock: Arc<dyn Clock>,
    /// How long a write waits for the file's lock.
    lock_timeout: Duration,
    /// Where PlaceOrders queue for group commit (none when
    /// `sqlite_max_batch` is 1).
    queues: Option<Queues>,
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
            .foreign_keys(true)
            // SQLite's temporary files (a batch's statement journals) stay in
            // memory: in a container with a read-only root filesystem there
            // is no writable /tmp, and every batched write failed with
            // SQLITE_IOERR_GETTEMPPATH.
            .pragma("temp_store", "memory");
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
        let mut store = Self {
            writer,
            reader,
            clock: options.clock.clone(),
            lock_timeout: options.lock_timeout,
            queues: None,
        };
        if options.sqlite_max_batch > 1 {
            store.queues = Some(Queues::start(store.clone(), options.sqlite_max_batch));
        }
        Ok(store)
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

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::{statements::read_keys, *};
    use crate::{
        domain::{AccountId, ClientRequestId, NewOrder},
        store::{
            Placement,
            batch::{GroupCommit as _, Job, KeyId, Written, key_id},
        },
    };

    fn order(key: ClientRequestId, symbol: &str) -> NewOrder {
        NewOrder::sample(key, symbol)
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
            async move {
                crate::store::batch::place_order(&store, &account, new, wait, wait, &Arc::default())
                    .await
                    .unwrap()
            }
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

    /// Temporary files are never needed: every connection keeps them in
    /// memory (a read-only root filesystem has no /tmp for them).
    #[tokio::test]
    async fn every_connection_keeps_temporary_files_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("orders.db").display());
        let store = SqliteStore::connect(&url, &StoreOptions::default()).await.unwrap();
        for pool in [&store.writer, &store.reader] {
            let mut conn = pool.acquire().await.unwrap();
            let temp_store: i64 =
                sqlx::query_scalar("pragma temp_store").fetch_one(&mut *conn).await.unwrap();
            assert_eq!(temp_store, 2, "2 is MEMORY");
        }
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
                let span = tracing::Span::none();
                Job {
                    account: account.clone(),
                    new: order(key, "AAPL"),
                    ttl: wait,
                    lock_wait: wait,
                    deadline_bound: false,
                    lock_deadline,
                    attempt,
                    held_elsewhere: false,
                    span,
                }
            })
            .collect();
        let keys: Vec<KeyId> = jobs.iter().map(|job| key_id(&account, job.new.client_request_id)).collect();
        let Ok(results) = store.write_batch(lock_deadline, &jobs).await else { panic!("the batch failed") };
        assert_eq!(results.len(), max);
        for result in results {
            let Written::Placed(placed) = result else { panic!("sent back") };
            assert_eq!(placed.expect("placed").1, Placement::Created);
        }
        let mut conn = store.reader.acquire().await.unwrap();
        assert_eq!(read_keys(&mut conn, &keys, store.clock.now()).await.unwrap().len(), max);
    }
}
