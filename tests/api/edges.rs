//! Exactly-once at the edges: callers' deadlines inside a group-commit
//! batch, locks held by someone else, a key's last second, and replicas whose
//! clocks disagree. Every answer is checked against the database afterwards:
//! an answer that says nothing was written has no order for its key; an
//! outcome-unknown answer may, and a replay of its key returns it.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use order_client::may_have_written;
use order_service::{
    clock::ManualClock,
    proto::{PlaceOrderRequest, PlaceOrderResponse, order_service_client::OrderServiceClient},
};
use tokio::{sync::Notify, task::JoinSet, time::Instant};
use tonic::{Code, Request, Status, transport::Channel};

use crate::helpers::{
    Engine, TestApp, channel, engine_tests, limit_order, new_key, postgres_tests, random_below, spawn_app,
    spawn_app_with, spawn_servers,
};

/// What one PlaceOrder was told.
#[derive(Debug, Clone)]
enum Told {
    /// The order, and whether it was a replay.
    Placed { order_id: String, replayed: bool },
    /// A failure that says nothing was written.
    NotWritten(Code),
    /// A failure that cannot say (the service's `OUTCOME_UNKNOWN`, or no
    /// answer of the service's: the caller's own timer, which tonic's client
    /// runs too and which answers `CANCELLED`, or a broken connection).
    Unknown(Code),
    /// The caller cancelled the call and never learned the outcome.
    Abandoned,
}

fn told(result: Result<tonic::Response<PlaceOrderResponse>, Status>) -> Told {
    match result {
        Ok(response) => {
            let response = response.into_inner();
            Told::Placed { order_id: response.order.expect("an order").order_id, replayed: response.replayed }
        }
        Err(status) if may_have_written(&status) => Told::Unknown(status.code()),
        Err(status) => Told::NotWritten(status.code()),
    }
}

/// PlaceOrder of `req` with a deadline of `timeout` (sent as `grpc-timeout`;
/// the test waits for the server's answer however late it comes).
async fn place_within(
    client: &mut OrderServiceClient<Channel>,
    req: PlaceOrderRequest,
    timeout: Duration,
) -> Told {
    let mut request = Request::new(req);
    request.set_timeout(timeout);
    told(client.place_order(request).await)
}

/// A PlaceOrder its caller cancels (drops) after `after`: it never learns
/// the outcome.
async fn place_and_cancel(
    client: &mut OrderServiceClient<Channel>,
    req: PlaceOrderRequest,
    after: Duration,
) -> Told {
    match tokio::time::timeout(after, client.place_order(req)).await {
        Ok(result) => told(result),
        Err(_) => Told::Abandoned,
    }
}

/// Every order in the database, by its key: (order id, create time in µs).
async fn orders_by_key(app: &TestApp) -> HashMap<String, Vec<(String, i64)>> {
    let micros = match app.engine {
        Engine::Sqlite => "create_time",
        Engine::Postgres => "cast(extract(epoch from create_time) * 1000000 as bigint)",
    };
    let rows = app
        .db()
        .await
        .strings(&format!(
            "select cast(client_request_id as text) || ' ' || cast(order_id as text) || ' ' || \
             cast({micros} as text) from orders"
        ))
        .await;
    let mut by_key: HashMap<String, Vec<(String, i64)>> = HashMap::new();
    for row in rows {
        let mut parts = row.split(' ');
        let (key, id, at) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
        by_key.entry(key.to_owned()).or_default().push((id.to_owned(), at.parse().unwrap()));
    }
    by_key
}

/// What the answers were, checked against the database.
#[derive(Debug, Default)]
struct Tally {
    placed: usize,
    not_written: usize,
    unknown: usize,
    /// "Not written" answers whose key has an order: must be 0.
    not_written_with_order: usize,
    /// Outcome-unknown answers whose order had been written (the replay
    /// returned it rather than placing it).
    unknown_with_order: usize,
    codes: HashMap<String, usize>,
}

/// Checks each call's answer (one key per call) against the database, then
/// replays every outcome-unknown key with a patient call: it returns the
/// order the key placed, or places it now, and afterwards the key has
/// exactly one order. No key ever has two.
async fn check_against_database(app: &TestApp, answers: &[(String, Told)]) -> Tally {
    let stored = orders_by_key(app).await;
    let mut tally = Tally::default();
    let mut client = app.client.clone();
    let mut replays = Vec::new();
    for (key, told) in answers {
        let orders = stored.get(key).map(Vec::as_slice).unwrap_or_default();
        assert!(orders.len() <= 1, "key {key} has {} orders", orders.len());
        match told {
            Told::Placed { order_id, .. } => {
                tally.placed += 1;
                assert_eq!(
                    orders.first().map(|o| &o.0),
                    Some(order_id),
                    "acknowledged order of {key} is stored"
                );
            }
            Told::NotWritten(code) => {
                tally.not_written += 1;
                *tally.codes.entry(format!("not written {code:?}")).or_default() += 1;
                if !orders.is_empty() {
                    tally.not_written_with_order += 1;
                }
            }
            Told::Unknown(_) | Told::Abandoned => {
                let what = match told {
                    Told::Unknown(code) => format!("unknown {code:?}"),
                    _ => "cancelled by the caller".to_owned(),
                };
                tally.unknown += 1;
                *tally.codes.entry(what).or_default() += 1;
                let replay = place_within(&mut client, limit_order(key), Duration::from_secs(10)).await;
                let Told::Placed { order_id, replayed, .. } = replay else {
                    panic!("a patient replay of {key} fails: {replay:?}");
                };
                // A write cut short may still be committing when the
                // database was read: the replay waits for it and returns it.
                if replayed {
                    tally.unknown_with_order += 1;
                }
                if let Some((stored_id, _)) = orders.first() {
                    assert!(replayed, "{key}: the replay returns the order written before");
                    assert_eq!(&order_id, stored_id);
                }
                replays.push((key, order_id));
            }
        }
    }
    let after = orders_by_key(app).await;
    for (key, told) in answers {
        let n = after.get(key).map_or(0, Vec::len);
        let expected = usize::from(!matches!(told, Told::NotWritten(_)));
        assert_eq!(n, expected, "{key} ({told:?}) has {n} orders");
    }
    for (key, order_id) in replays {
        assert_eq!(&after[key][0].0, &order_id, "{key}: the replay's order is the one stored");
    }
    tally
}

/// Patient callers (10 s deadlines) beside impatient ones (a few ms) and
/// callers who cancel, all on one connection: no patient caller fails, and
/// every answer is true.
async fn one_callers_deadline_never_fails_another_and_every_answer_is_true(engine: Engine) {
    let app = spawn_app(engine).await;
    const PATIENT: usize = 24;
    const EACH: usize = 25;
    // One connection for every caller, as one process's gRPC client shares
    // one: the impatient callers' resets land beside the patient calls.
    let shared = channel(app.addr).await;
    let patients_done = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..PATIENT {
        let (mut client, done) = (OrderServiceClient::new(shared.clone()), patients_done.clone());
        tasks.spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..EACH {
                let key = new_key();
                answers.push((
                    true,
                    key.clone(),
                    place_within(&mut client, limit_order(&key), Duration::from_secs(10)).await,
                ));
            }
            done.fetch_add(1, Ordering::SeqCst);
            answers
        });
    }
    for caller in 0..6 {
        let (mut client, done) = (OrderServiceClient::new(shared.clone()), patients_done.clone());
        tasks.spawn(async move {
            let mut answers = Vec::new();
            // Bounded: at most 5,000 calls, and only while patient calls run.
            for _ in 0..5_000 {
                if done.load(Ordering::SeqCst) == PATIENT {
                    break;
                }
                let key = new_key();
                let wait = Duration::from_micros(1_000 + random_below(7_000) as u64);
                let answer = if caller < 4 {
                    place_within(&mut client, limit_order(&key), wait).await
                } else {
                    place_and_cancel(&mut client, limit_order(&key), wait).await
                };
                answers.push((false, key, answer));
            }
            answers
        });
    }
    let answers: Vec<(bool, String, Told)> = tasks.join_all().await.into_iter().flatten().collect();
    let failures: Vec<_> = answers
        .iter()
        .filter(|(patient, _, told)| *patient && !matches!(told, Told::Placed { .. }))
        .map(|(_, key, told)| format!("{key}: {told:?}"))
        .collect();
    let patient_failed = failures.len();
    let keyed: Vec<(String, Told)> = answers.into_iter().map(|(_, key, told)| (key, told)).collect();
    let tally = check_against_database(&app, &keyed).await;
    println!(
        "mixed deadlines ({engine:?}): calls={} patient={} patient_failed={patient_failed} {tally:?}",
        keyed.len(),
        PATIENT * EACH
    );
    assert_eq!(patient_failed, 0, "patient callers failed: {:?}", &failures[..failures.len().min(3)]);
    assert_eq!(tally.not_written_with_order, 0);
}

/// Callers with short deadlines while someone else holds what they need
/// (SQLite: the write lock; Postgres: their keys, inserted by a transaction
/// left open), and then lets go: every answer is true.
async fn a_held_lock_fails_short_deadlines_truthfully_and_lets_go(engine: Engine) {
    let app = spawn_app(engine).await;
    let keys: Vec<String> = (0..400).map(|_| new_key()).collect();
    let holder = Holder::take(&app, &keys).await;
    let answered = Arc::new(AtomicUsize::new(0));
    let half_answered = Arc::new(Notify::new());
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..8 {
        let mut client = OrderServiceClient::new(channel(app.addr).await);
        let (keys, next, answered, half) =
            (keys.clone(), next.clone(), answered.clone(), half_answered.clone());
        tasks.spawn(async move {
            let mut answers = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(key) = keys.get(i) else { return answers };
                let wait = Duration::from_millis(20 + random_below(100) as u64);
                answers.push((key.clone(), place_within(&mut client, limit_order(key), wait).await));
                if answered.fetch_add(1, Ordering::SeqCst) + 1 == keys.len() / 2 {
                    half.notify_one();
                }
            }
        });
    }
    // Let go once half the calls were answered, while the others run.
    half_answered.notified().await;
    holder.release().await;
    let answers: Vec<(String, Told)> = tasks.join_all().await.into_iter().flatten().collect();
    let tally = check_against_database(&app, &answers).await;
    println!("held lock ({engine:?}): calls={} {tally:?}", answers.len());
    assert!(tally.not_written > 0, "the held lock refused some calls: {tally:?}");
    assert!(tally.placed > 0, "calls after the release succeeded: {tally:?}");
    assert_eq!(tally.not_written_with_order, 0);
}

/// Someone else's open transaction, holding the SQLite write lock or the
/// Postgres keys.
enum Holder {
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>),
    Postgres(sqlx::PgConnection),
}

impl Holder {
    async fn take(app: &TestApp, keys: &[String]) -> Holder {
        use sqlx::Connection;
        match app.engine {
            Engine::Sqlite => {
                let pool = sqlx::SqlitePool::connect(&app.config.database_url).await.unwrap();
                let mut conn = pool.acquire().await.unwrap();
                sqlx::raw_sql("begin immediate").execute(&mut *conn).await.unwrap();
                Holder::Sqlite(conn)
            }
            Engine::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&app.config.database_url).await.unwrap();
                sqlx::raw_sql("begin").execute(&mut conn).await.unwrap();
                for key in keys {
                    sqlx::query(
                        "insert into idempotency_keys values ('anonymous', $1::uuid, '\\x00', gen_random_uuid(), now(), now() + interval '1 day')",
                    )
                    .bind(key)
                    .execute(&mut conn)
                    .await
                    .unwrap();
                }
                Holder::Postgres(conn)
            }
        }
    }

    /// Rolls the transaction back: nothing of it was ever committed.
    async fn release(self) {
        match self {
            Holder::Sqlite(mut conn) => sqlx::raw_sql("rollback").execute(&mut *conn).await.map(drop),
            Holder::Postgres(mut conn) => sqlx::raw_sql("rollback").execute(&mut conn).await.map(drop),
        }
        .unwrap();
    }
}

/// A caller whose deadline ends its wait for the database writer (SQLite's
/// write lock held by another process; on Postgres, the one pooled
/// connection busy) is told `DEADLINE_EXCEEDED`, nothing written, as the
/// API promises: not `UNAVAILABLE`, which would page an operator over a
/// healthy database (it was, for a caller queued for a group commit).
async fn a_deadline_that_ends_the_wait_for_the_writer_answers_deadline_exceeded(engine: Engine) {
    let app = spawn_app_with(engine, |c| {
        c.db_max_connections = 1;
        c.lock_timeout = Duration::from_secs(5);
    })
    .await;
    let mut client = OrderServiceClient::new(channel(app.addr).await);
    let held = new_key();
    let (holder, waiting) = match engine {
        Engine::Sqlite => (Holder::take(&app, &[]).await, None),
        Engine::Postgres => {
            // A call in flight elsewhere holds a key's advisory lock; this
            // server's call for that key waits for it on the only pooled
            // connection.
            let conn = crate::helpers::hold_key_lock(&app.config.database_url, &held).await;
            let mut waiter = client.clone();
            let key = held.clone();
            let call = tokio::spawn(async move { waiter.place_order(limit_order(&key)).await });
            crate::helpers::backend_waiting_on_a_lock(&app.config.database_url, "").await;
            (Holder::Postgres(conn), Some(call))
        }
    };
    let key = new_key();
    let mut request = Request::new(limit_order(&key));
    request.set_timeout(Duration::from_millis(400));
    let status = client.place_order(request).await.expect_err("the writer was busy past the deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(!may_have_written(&status), "nothing was written: {status:?}");
    holder.release().await;
    if let Some(call) = waiting {
        call.await.unwrap().expect("placed once the other call let go");
    }
    assert!(!orders_by_key(&app).await.contains_key(&key), "nothing was written for the key");
}

/// Callers on one connection (as a process's gRPC client shares one) whose
/// deadlines pass while the server is busy reset their streams before the
/// server accepted them; many such resets must not make the server close
/// the connection (HTTP/2's "too many resets" defence) and kill a patient
/// caller's call on it.
async fn impatient_resets_do_not_kill_a_patient_call_on_the_same_connection(engine: Engine) {
    let app = spawn_app(engine).await;
    let shared = channel(app.addr).await;
    let holder = Holder::take(&app, &[]).await;
    let patient_key = new_key();
    let mut patient_client = OrderServiceClient::new(shared.clone());
    let patient = tokio::spawn({
        let key = patient_key.clone();
        async move { place_within(&mut patient_client, limit_order(&key), Duration::from_secs(20)).await }
    });
    let mut impatient = JoinSet::new();
    for _ in 0..500 {
        let mut client = OrderServiceClient::new(shared.clone());
        impatient.spawn(async move {
            let key = new_key();
            let told = place_and_cancel(&mut client, limit_order(&key), Duration::from_millis(1)).await;
            (key, told)
        });
    }
    let mut answers = impatient.join_all().await;
    holder.release().await;
    let patient = patient.await.unwrap();
    assert!(matches!(patient, Told::Placed { .. }), "the patient call on the shared connection: {patient:?}");
    answers.push((patient_key, patient));
    let tally = check_against_database(&app, &answers).await;
    assert_eq!(tally.not_written_with_order, 0);
}

/// Postgres connections killed under the service while it writes
/// (`pg_terminate_backend`, as a failover or a crashed backend would): a
/// call whose connection broke after its write was sent answers
/// `OUTCOME_UNKNOWN`, never "not written", and every answer is true.
async fn connections_killed_mid_write_answer_truthfully(engine: Engine) {
    let app = spawn_app(engine).await;
    let killer_db = app.db().await;
    let next = Arc::new(AtomicUsize::new(0));
    const CALLS: usize = 600;
    let mut tasks = JoinSet::new();
    for _ in 0..6 {
        let mut client = OrderServiceClient::new(channel(app.addr).await);
        let next = next.clone();
        tasks.spawn(async move {
            let mut answers = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < CALLS {
                let key = new_key();
                answers.push((
                    key.clone(),
                    place_within(&mut client, limit_order(&key), Duration::from_secs(5)).await,
                ));
            }
            answers
        });
    }
    // Kill the service's connections again and again while calls run.
    let mut kills = 0;
    while next.load(Ordering::SeqCst) < CALLS && kills < 200 {
        killer_db
            .execute(
                "select pg_terminate_backend(pid) from pg_stat_activity
                 where application_name = 'order-service' and datname = current_database()",
            )
            .await;
        kills += 1;
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(random_below(20) as u64)).await;
    }
    let answers: Vec<(String, Told)> = tasks.join_all().await.into_iter().flatten().collect();
    let tally = check_against_database(&app, &answers).await;
    println!("connections killed ({engine:?}): kills={kills} calls={} {tally:?}", answers.len());
    assert!(tally.placed > 0 && tally.not_written + tally.unknown > 0, "the kills cut some calls: {tally:?}");
    assert_eq!(tally.not_written_with_order, 0);
}

/// How long the key's-last-second tests retry (`ORDERS_EDGE_SECS`, 15 s).
fn edge_duration() -> Duration {
    let secs = std::env::var("ORDERS_EDGE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    Duration::from_secs(secs)
}

/// `servers` retry `keys` continuously (round robin) for `duration`; then
/// no key has two orders less than `ttl` apart, and no acknowledged order is
/// lost. Returns (placements, acknowledged orders, orders stored).
async fn retry_keys_around_expiry(
    servers: &[TestApp],
    keys: usize,
    ttl: Duration,
    duration: Duration,
) -> (usize, usize, usize) {
    let mut tasks = JoinSet::new();
    for k in 0..keys {
        let mut clients = Vec::new();
        for server in servers {
            clients.push(OrderServiceClient::new(channel(server.addr).await));
        }
        tasks.spawn(async move {
            let key = new_key();
            let started = Instant::now();
            let mut answers = Vec::new();
            let mut i = k;
            while started.elapsed() < duration {
                i += 1;
                let n = clients.len();
                let client = &mut clients[i % n];
                answers.push(place_within(client, limit_order(&key), Duration::from_secs(5)).await);
            }
            (key, answers)
        });
    }
    let answers = tasks.join_all().await;
    let stored = orders_by_key(&servers[0]).await;
    let ttl_micros = i64::try_from(ttl.as_micros()).unwrap();
    let (mut placements, mut acknowledged, mut close_pairs, mut orders) = (0, 0, 0, 0);
    for (key, answers) in &answers {
        let mut mine = stored.get(key).cloned().unwrap_or_default();
        mine.sort_by_key(|(id, at)| (*at, id.clone()));
        orders += mine.len();
        for pair in mine.windows(2) {
            if pair[1].1 - pair[0].1 < ttl_micros {
                close_pairs += 1;
                eprintln!(
                    "{key}: orders {} and {} are {} µs apart",
                    pair[0].0,
                    pair[1].0,
                    pair[1].1 - pair[0].1
                );
            }
        }
        for told in answers {
            placements += 1;
            match told {
                Told::Placed { order_id, .. } => {
                    acknowledged += 1;
                    assert!(
                        mine.iter().any(|(id, _)| id == order_id),
                        "acknowledged order {order_id} of {key} lost"
                    );
                }
                other => panic!("{key}: a patient retry failed: {other:?}"),
            }
        }
    }
    assert_eq!(close_pairs, 0, "pairs of orders of one key closer than the lifetime");
    (placements, acknowledged, orders)
}

/// Three servers on one database (for SQLite: one file, as processes
/// sharing it are), a 1 s key lifetime, the purge every 100 ms on each: keys
/// retried continuously around their expiry never get two orders less than
/// the lifetime apart.
async fn a_keys_last_second_never_places_a_second_order_too_soon(engine: Engine) {
    let ttl = Duration::from_secs(1);
    let clocks = (0..3).map(|_| Arc::new(ManualClock::running())).collect();
    let servers = spawn_servers(
        engine,
        |c| {
            c.idempotency_ttl = ttl;
            c.purge_interval = Duration::from_millis(100);
        },
        clocks,
    )
    .await;
    let (placements, acknowledged, orders) =
        retry_keys_around_expiry(&servers, 6, ttl, edge_duration()).await;
    println!(
        "last second ({engine:?}): placements={placements} acknowledged={acknowledged} orders={orders} pairs_closer_than_ttl=0"
    );
    assert!(orders > 6, "keys expired and were placed again during the run: {orders} orders");
}

/// Two servers on one Postgres database, one with its clock five minutes
/// ahead: expiry, replacement and purge follow the database's clock, so the
/// fast one neither expires a live key nor purges it, and keys retried
/// through both around expiry keep their lifetime.
async fn replicas_whose_clocks_disagree_agree_on_every_key(engine: Engine) {
    let ttl = Duration::from_secs(2);
    let (right, ahead) = (Arc::new(ManualClock::running()), Arc::new(ManualClock::running()));
    ahead.advance(Duration::from_secs(300));
    let servers = spawn_servers(
        engine,
        |c| {
            c.idempotency_ttl = ttl;
            c.purge_interval = Duration::from_millis(100);
        },
        vec![right, ahead],
    )
    .await;
    let key = new_key();
    let mut on_right = servers[0].client.clone();
    let mut on_ahead = servers[1].client.clone();
    let first = on_right.place_order(limit_order(&key)).await.unwrap().into_inner();
    let again = on_ahead.place_order(limit_order(&key)).await.unwrap().into_inner();
    assert!(again.replayed, "the replica whose clock is ahead replays a live key");
    assert_eq!(again.order.unwrap().order_id, first.order.unwrap().order_id);
    assert_eq!(order_service::server::purge_expired(&servers[1].store, 100).await.unwrap(), 0);
    assert_eq!(servers[0].count("idempotency_keys").await, 1, "its purge spared the live key");

    let duration = edge_duration().min(Duration::from_secs(8));
    let (placements, acknowledged, orders) = retry_keys_around_expiry(&servers, 4, ttl, duration).await;
    println!(
        "skewed clocks: placements={placements} acknowledged={acknowledged} orders={orders} pairs_closer_than_ttl=0"
    );
}

engine_tests!(
    one_callers_deadline_never_fails_another_and_every_answer_is_true,
    a_held_lock_fails_short_deadlines_truthfully_and_lets_go,
    impatient_resets_do_not_kill_a_patient_call_on_the_same_connection,
    a_keys_last_second_never_places_a_second_order_too_soon,
    a_deadline_that_ends_the_wait_for_the_writer_answers_deadline_exceeded,
);

mod pg_only {
    use super::*;
    postgres_tests!(
        replicas_whose_clocks_disagree_agree_on_every_key,
        connections_killed_mid_write_answer_truthfully
    );
}
