//! Group commit, written once for both engines: PlaceOrders that arrive
//! while a batch is being written wait together and are written by the next
//! one (one commit, one disk flush, for all of them), and their keys are
//! looked up together first, in one query, so a retry of a committed order
//! is answered without a write.
//!
//! This module owns the queues, the deadlines, the answers and the
//! metrics; each engine supplies its statements ([`GroupCommit`]): SQLite
//! one `begin immediate … commit` under its write lock
//! (`sqlite::batch`), Postgres one statement that commits as it runs
//! (`postgres::batch`).
//!
//! A job is taken into its batch ([`claim`]) only once the batch's write
//! begins and only if its caller still waits ([`Attempt`]): a caller that
//! gave up is never written, and one whose write was sent is never told
//! "nothing was written". A job its batch did not write and whose outcome
//! the batch knows is nothing (on Postgres: its key was locked by a call on
//! another replica, or already stored) goes back to its caller, who places
//! it alone, on the engine's ordinary path.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tracing::Instrument as _;

use super::{
    Placement,
    attempt::Attempt,
    place::{self, StoredKey},
};
use crate::{
    domain::{AccountId, ClientRequestId, NewOrder, Order},
    error::{BoxError, Error},
};

/// The answer of a PlaceOrder.
pub(super) type Placed = Result<(Order, Placement), Error>;

/// An idempotency key as both engines can name it in a batched query:
/// the account, then the key in its text form.
pub(super) type KeyId = (String, String);

pub(super) fn key_id(account: &AccountId, key: ClientRequestId) -> KeyId {
    (account.as_str().to_owned(), key.to_string())
}

/// One PlaceOrder waiting for its batch.
#[derive(Debug)]
pub(super) struct Job {
    pub account: AccountId,
    pub new: NewOrder,
    pub ttl: Duration,
    /// How long its caller waits for a lock (the configured lock timeout,
    /// or less when its deadline is nearer).
    pub lock_wait: Duration,
    /// Whether its caller's deadline shortened `lock_wait`: a wait that runs
    /// out is then the deadline's (see [`Job::not_begun`]).
    pub deadline_bound: bool,
    /// When its caller stops waiting for its write to begin. A batch waits
    /// (for SQLite's write lock, for a pooled connection) until the latest
    /// of its jobs' lock deadlines: one impatient caller never fails its
    /// batch-mates.
    pub lock_deadline: Instant,
    /// Whether its write was sent: see [`claim`].
    pub attempt: Arc<Attempt>,
    /// Whether its batch found its key's advisory lock held by another
    /// call (Postgres): placed alone, it would wait for that call, and only
    /// a bounded number of such waits may hold pooled connections.
    pub held_elsewhere: bool,
    /// The caller's span (its database span when traced), which the batch
    /// it rides in links to.
    pub span: tracing::Span,
}

/// What a batch did with one job.
pub(super) enum Written {
    /// Answered by the batch: created, replayed, refused, or not claimed.
    Placed(Placed),
    /// Nothing of it was written, and the batch cannot answer it (its key is
    /// locked by another call, or already stored): its caller places it
    /// alone, on the engine's ordinary path.
    Alone,
    /// As `Alone`, and its key's advisory lock is held by another call
    /// in flight (see [`Job::held_elsewhere`]).
    Held,
}

/// How a whole batch failed.
pub(super) enum BatchFailure {
    /// Nothing of the batch was written: every caller is told so.
    NotWritten(Error),
    /// The batch's write did not begin within its lock wait (no write
    /// lock, no connection): nothing written, each job answered as
    /// [`Job::not_begun`].
    NotBegun,
    /// The commit was sent and its answer was lost (I/O error, disk full,
    /// the connection gone): every claimed job's outcome is unknown.
    AtCommit(BoxError),
    /// The database refused the batch (nothing written) for what may be
    /// one job's sake: every job is placed alone, so that only what must
    /// fail fails.
    Alone(Error),
}

/// One engine's statements behind group commit.
pub(super) trait GroupCommit: Clone + Send + Sync + 'static {
    /// The engine, as OpenTelemetry's `db.system.name` spells it.
    const SYSTEM: &'static str;

    /// Whether each PlaceOrder's key is looked up (by the batch reader)
    /// before it is queued for a batch. SQLite: yes, on readers beside the
    /// one writer, so a retry never waits for the write lock. Postgres: no,
    /// a batch's statement finds the stored keys itself (then looks them up
    /// in one query), which spares a new order a round trip.
    const LOOKS_UP_FIRST: bool;

    /// The configured lock timeout: a caller's lock wait shorter than it
    /// was shortened by the caller's deadline.
    fn lock_timeout(&self) -> Duration;

    /// The store's queues, when group commit is on.
    fn queues(&self) -> Option<&Queues>;

    /// How many batches may be written at once. SQLite: one (one writer).
    /// Postgres: a few, so that one batch's round trip and commit overlap
    /// the next (the server merges their WAL flushes) and a lone caller
    /// never waits for a batch it is not in; calls queue into a batch only
    /// while every writer is busy.
    const WRITERS: usize;

    /// Writes `jobs` as one batch: begins the write (waiting at most until
    /// `lock_deadline`), [`claim`]s the jobs whose callers still wait,
    /// writes those, commits, and says per job what it did. Every answer
    /// comes after the commit that holds it.
    fn write_batch(
        &self,
        lock_deadline: Instant,
        jobs: &[Job],
    ) -> impl Future<Output = Result<Vec<Written>, BatchFailure>> + Send;

    /// The stored keys among `keys`, in one query (a key asked for twice is
    /// answered once).
    fn read_keys(
        &self,
        keys: &[KeyId],
    ) -> impl Future<Output = Result<HashMap<KeyId, StoredKey>, Error>> + Send;

    /// Places one job on the engine's ordinary path (group commit off, or a
    /// job its batch sent back): the whole flow, its key looked up
    /// included.
    fn place_alone(&self, job: Job) -> impl Future<Output = Placed> + Send;
}

impl Job {
    /// The answer of a job whose write did not begin in its lock wait, or
    /// whose caller gave up before its batch began: nothing was written.
    /// `DEADLINE_EXCEEDED` when its caller's deadline had shortened the
    /// wait, else `UNAVAILABLE` (see [`lock_not_taken`]).
    pub fn not_begun(&self) -> Error {
        if self.deadline_bound { Error::DeadlineExceeded } else { lock_not_taken() }
    }
}

/// Takes into the batch every job whose caller still waits, marking its
/// write sent; the indexes taken. Called once the batch's write begins.
pub(super) fn claim(jobs: &[Job]) -> Vec<usize> {
    (0..jobs.len()).filter(|&i| jobs[i].attempt.send()).collect()
}

pub(super) fn closed() -> Error {
    Error::Unavailable { context: "placing an order", source: "the database writer has stopped".into() }
}

/// The answer of a job whose write did not begin in its lock wait (SQLite:
/// the write lock not taken; Postgres: no connection for its batch), or
/// whose caller gave up before its batch began: nothing was written.
pub(super) fn lock_not_taken() -> Error {
    Error::Unavailable {
        context: "waiting for the database writer",
        source: "the write did not begin within the lock wait (no write lock, or no connection)".into(),
    }
}

/// A queued PlaceOrder and where its answer goes.
type Queued = (Job, oneshot::Sender<Answer>);

/// A batch's answer to one caller: its placement, or its job back to be
/// placed alone.
enum Answer {
    Placed(Placed),
    Alone(Job),
}

/// A PlaceOrder's key, queued for the batch reader, and where its stored
/// key (if any) goes.
type KeyLookup = (KeyId, oneshot::Sender<Result<Option<StoredKey>, Error>>);

/// The queues of a store with group commit on; dropping them (with the
/// store) ends the writer and the reader.
#[derive(Debug, Clone)]
pub(super) struct Queues {
    writes: mpsc::Sender<Queued>,
    lookups: Option<mpsc::Sender<KeyLookup>>,
    /// Whether the batch writers are getting anything written.
    pub progress: Arc<WriterProgress>,
}

/// Whether the batch writers get anything written, for readiness: a
/// database that answers its health probe can still write nothing (a
/// table lock, a hung backend per batch), and then no PlaceOrder can be
/// placed. Times are milliseconds after `base`; 0 is "none".
#[derive(Debug)]
pub(super) struct WriterProgress {
    base: Instant,
    /// When the first batch began that no written batch has followed.
    unwritten_since: std::sync::atomic::AtomicU64,
    /// When a batch last began or ended.
    last_activity: std::sync::atomic::AtomicU64,
}

impl WriterProgress {
    fn new() -> Self {
        Self { base: Instant::now(), unwritten_since: Default::default(), last_activity: Default::default() }
    }

    fn now(&self) -> u64 {
        Instant::now().saturating_duration_since(self.base).as_millis() as u64 + 1
    }

    fn began(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.now();
        let _ = self.unwritten_since.compare_exchange(0, now, Relaxed, Relaxed);
        self.last_activity.store(now, Relaxed);
    }

    fn ended(&self, wrote: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if wrote {
            self.unwritten_since.store(0, Relaxed);
        }
        self.last_activity.store(self.now(), Relaxed);
    }

    /// Whether batches have been tried for `after` and none was written,
    /// and they are still being tried (without calls there is nothing to
    /// judge: an idle writer is not a stuck one).
    pub fn stuck(&self, after: Duration) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let (now, after) = (self.now(), after.as_millis() as u64);
        let since = self.unwritten_since.load(Relaxed);
        since != 0 && now - since >= after && now - self.last_activity.load(Relaxed) < after
    }
}

impl Queues {
    /// Starts the batch writer of `engine` and, if it looks keys up first,
    /// its batch reader, each taking up to `max_batch` waiting calls at once.
    pub fn start<E: GroupCommit>(engine: E, max_batch: usize) -> Self {
        let (writes, queued) = mpsc::channel(max_batch * 4);
        let progress = Arc::new(WriterProgress::new());
        tokio::spawn(batch_writer(engine.clone(), max_batch, queued, progress.clone()));
        let lookups = E::LOOKS_UP_FIRST.then(|| {
            let (lookups, keys) = mpsc::channel(max_batch * 4);
            tokio::spawn(batch_reader(engine, max_batch, keys));
            lookups
        });
        Self { writes, lookups, progress }
    }
}

/// Places `new` for `account`: with the engine's queues (group commit on), its key is
/// looked up by the batch reader if the engine looks up first (a live key is
/// answered from there), else it waits for the batch writer; without, it is
/// placed alone. `attempt` says whether its write was sent.
pub(super) async fn place_order<E: GroupCommit>(
    engine: &E,
    account: &AccountId,
    new: NewOrder,
    ttl: Duration,
    lock_wait: Duration,
    attempt: &Arc<Attempt>,
) -> Placed {
    let lock_deadline = Instant::now() + lock_wait;
    let deadline_bound = lock_wait < engine.lock_timeout();
    let job = |new| Job {
        account: account.clone(),
        new,
        ttl,
        lock_wait,
        deadline_bound,
        lock_deadline,
        attempt: attempt.clone(),
        held_elsewhere: false,
        span: tracing::Span::current(),
    };
    let Some(queues) = engine.queues() else {
        return place_alone(engine, job(new)).await;
    };
    // A retry of a committed order needs no write: answer it from the
    // batched lookup.
    if let Some(lookups) = &queues.lookups {
        let (reply, answer) = oneshot::channel();
        lookups.send((key_id(account, new.client_request_id), reply)).await.map_err(|_| closed())?;
        let stored = answer.await.map_err(|_| closed())??;
        if let Some(replayed) = place::replay(stored, &new)? {
            return Ok(replayed);
        }
    }
    let key = new.client_request_id;
    let (reply, answer) = oneshot::channel();
    queues.writes.send((job(new), reply)).await.map_err(|_| closed())?;
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
    let answer = match tokio::time::timeout_at(lock_deadline, &mut answer).await {
        Ok(answer) => answer,
        // The lock wait passed before the batch began: never written.
        Err(_) if attempt.abandon() => {
            return Err(if deadline_bound { Error::DeadlineExceeded } else { lock_not_taken() });
        }
        // The batch has begun: its answer comes with its commit, or the
        // caller's deadline cuts the wait (outcome unknown).
        Err(_) => answer.await,
    };
    match answer {
        Ok(Answer::Placed(placed)) => placed,
        Ok(Answer::Alone(job)) => place_alone(engine, job).await,
        Err(_) => Err(gone(attempt)),
    }
}

/// Places `job` alone as a task of its own, never dropped half-way: a
/// future dropped inside a transaction (in `BEGIN`, say) can leave the
/// pooled connection in a transaction sqlx does not know of, and the next
/// caller's statement would run, and be acknowledged, inside it. The caller
/// gives up by the job's attempt, which the engine heeds before sending its
/// write.
async fn place_alone<E: GroupCommit>(engine: &E, job: Job) -> Placed {
    let (key, attempt) = (job.new.client_request_id, job.attempt.clone());
    let engine = engine.clone();
    // The caller's span (its database span when traced) goes along.
    let placing =
        tokio::spawn(async move { engine.place_alone(job).await }.instrument(tracing::Span::current()));
    placing.await.unwrap_or_else(|panicked| {
        let error = Error::internal("placing an order", panicked);
        if attempt.abandon() {
            return Err(error);
        }
        Err(Error::OutcomeUnknown {
            client_request_id: key,
            deadline: false,
            context: "placing an order",
            source: "the placing task failed after sending the write".into(),
        })
    })
}

/// The batch writer: once one of the engine's writers is free, takes the
/// first waiting PlaceOrder, then every other one already waiting (up to
/// `max_batch`), without waiting for more, and writes them as one batch.
/// Ends when the store is dropped.
async fn batch_writer<E: GroupCommit>(
    engine: E,
    max_batch: usize,
    mut queue: mpsc::Receiver<Queued>,
    progress: Arc<WriterProgress>,
) {
    let writers = Arc::new(tokio::sync::Semaphore::new(E::WRITERS));
    let mut waiting = Vec::with_capacity(max_batch);
    loop {
        let Ok(writer) = writers.clone().acquire_owned().await else { return };
        if queue.recv_many(&mut waiting, max_batch).await == 0 {
            return;
        }
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
                let _ = reply.send(Answer::Placed(Err(job.not_begun())));
                None
            })
            .unzip();
        if jobs.is_empty() {
            continue;
        }
        crate::telemetry::metrics::record_batch(jobs.len());
        let span =
            crate::telemetry::traces::batch_span(E::SYSTEM, jobs.len(), jobs.iter().map(|job| &job.span));
        let (engine, progress) = (engine.clone(), progress.clone());
        progress.began();
        let write = async move {
            let (answers, wrote) = run_batch(&engine, jobs).await;
            progress.ended(wrote);
            drop(writer);
            for (reply, answer) in replies.into_iter().zip(answers) {
                // The caller may have given up (deadline): its order still stands.
                let _ = reply.send(answer);
            }
        };
        if E::WRITERS == 1 {
            write.instrument(span).await;
        } else {
            tokio::spawn(write.instrument(span));
        }
    }
}

/// Writes one job as a batch of its own (group commit off), with a
/// batch's answers.
pub(super) async fn write_one<E: GroupCommit>(engine: &E, job: Job) -> Placed {
    match run_batch(engine, vec![job]).await.0.pop() {
        Some(Answer::Placed(placed)) => placed,
        // An engine that sends a job back places it alone itself.
        Some(Answer::Alone(_)) | None => Err(closed()),
    }
}

/// Writes `jobs` as one batch and answers each; and whether the batch's
/// write went through (the database answered it, whatever it answered).
async fn run_batch<E: GroupCommit>(engine: &E, jobs: Vec<Job>) -> (Vec<Answer>, bool) {
    let n = jobs.len();
    let Some(lock_deadline) = jobs.iter().map(|job| job.lock_deadline).max() else {
        return (Vec::new(), true);
    };
    let written = engine.write_batch(lock_deadline, &jobs).await;
    let wrote = written.is_ok();
    let answers = match written {
        Ok(written) => jobs
            .into_iter()
            .zip(written)
            .map(|(job, written)| match written {
                Written::Placed(placed) => Answer::Placed(placed),
                Written::Alone => alone(job),
                Written::Held => alone(Job { held_elsewhere: true, ..job }),
            })
            .collect(),
        Err(BatchFailure::NotWritten(error)) => {
            crate::telemetry::metrics::record_batch_failure("not_written");
            fail_all(error, n).into_iter().map(Answer::Placed).collect()
        }
        Err(BatchFailure::NotBegun) => {
            crate::telemetry::metrics::record_batch_failure("not_written");
            jobs.iter().map(|job| Answer::Placed(Err(job.not_begun()))).collect()
        }
        Err(BatchFailure::AtCommit(error)) => {
            crate::telemetry::metrics::record_batch_failure("outcome_unknown");
            tracing::warn!(%error, orders = n, "the batch's commit failed; its outcome is unknown");
            let error = error.to_string();
            jobs.iter()
                .map(|job| {
                    if job.attempt.abandon() {
                        return Answer::Placed(Err(job.not_begun()));
                    }
                    Answer::Placed(Err(Error::OutcomeUnknown {
                        client_request_id: job.new.client_request_id,
                        deadline: false,
                        context: "committing the orders",
                        source: format!("the batch's commit failed: {error}").into(),
                    }))
                })
                .collect()
        }
        Err(BatchFailure::Alone(error)) => {
            crate::telemetry::metrics::record_batch_failure("placed_alone");
            tracing::warn!(%error, orders = n,
                "the database refused the batch, which wrote nothing; each of its orders is placed alone");
            jobs.into_iter().map(alone).collect()
        }
    };
    (answers, wrote)
}

/// A job its batch did not write goes back to its caller, its write not
/// sent (its caller may again be told "not written"); one whose caller gave
/// up meanwhile is answered so.
fn alone(job: Job) -> Answer {
    job.attempt.unsend();
    Answer::Alone(job)
}

/// `error` for the first of `n` jobs, and the same failure for the others.
pub(super) fn fail_all<T>(error: Error, n: usize) -> Vec<Result<T, Error>> {
    let others: Vec<_> = (1..n).map(|_| Err(same_failure(&error))).collect();
    std::iter::once(Err(error)).chain(others).collect()
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

/// The batch reader: takes the first waiting key lookup, then every other
/// one already waiting (up to `max_batch`), and answers them all with one
/// query. Ends when the store is dropped.
async fn batch_reader<E: GroupCommit>(engine: E, max_batch: usize, mut queue: mpsc::Receiver<KeyLookup>) {
    let mut waiting = Vec::with_capacity(max_batch);
    while queue.recv_many(&mut waiting, max_batch).await > 0 {
        let (keys, replies): (Vec<_>, Vec<_>) =
            waiting.drain(..).filter(|(_, reply)| !reply.is_closed()).unzip();
        if keys.is_empty() {
            continue;
        }
        let results = match engine.read_keys(&keys).await {
            // A key asked for twice in one batch: each asker gets it.
            Ok(found) => keys.iter().map(|key| Ok(found.get(key).cloned())).collect(),
            Err(error) => fail_all(error, keys.len()),
        };
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::GroupCommit;
    use crate::store::{postgres::PgStore, sqlite::SqliteStore};

    /// docs/operations.md states how many batches Postgres writes at once
    /// and which engine looks keys up before its batch: as the code has
    /// them.
    #[test]
    fn the_operations_guide_states_the_writers_and_the_lookups_as_the_code_has_them() {
        let guide: Vec<&str> = include_str!("../../docs/operations.md").split_whitespace().collect();
        let guide = guide.join(" ");
        let writers = ["One batch is", "Two batches are", "Three batches are"]
            .iter()
            .position(|figure| guide.contains(&format!("{figure} written at once")))
            .map(|n| n + 1);
        assert_eq!(writers, Some(<PgStore as GroupCommit>::WRITERS), "Postgres's writers");
        let sqlite_first = guide.contains("On SQLite every PlaceOrder's key is looked up first");
        assert_eq!(<SqliteStore as GroupCommit>::LOOKS_UP_FIRST, sqlite_first, "SQLite's lookups");
        let postgres_after = guide.contains("on Postgres nothing is looked up first");
        assert_eq!(<PgStore as GroupCommit>::LOOKS_UP_FIRST, !postgres_after, "Postgres's lookups");
    }
}
