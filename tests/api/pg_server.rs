//! Postgres only: a duplicate waits for the call in flight with its key
//! (and group commit leaves it out of its batch), the service rides out a
//! database restart, and TLS follows the URL's sslmode.

use std::time::Duration;

use order_client::may_have_written;
use order_service::proto::{
    GetOrderRequest, get_order_request::Lookup, order_service_client::OrderServiceClient,
};
use sqlx::{Connection, PgConnection};
use tonic::Code;
use tonic_types::StatusExt;

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{
    Cluster, Db, Engine, Readiness, ServerProcess, TestDatabase, backend_waiting_on_a_lock, channel,
    hold_key_lock, limit_order, new_key, place_concurrently, postgres_tests, signal, spawn_app,
    spawn_app_with,
};

/// Holds the key's row lock from another connection, as a call in flight
/// would: inserts the key and its order in a transaction left open.
async fn hold_key(url: &str, key: &str) -> (PgConnection, String) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let order_id = uuid::Uuid::now_v7().to_string();
    let sql = format!(
        "begin;
         insert into orders (order_id, account_id, client_request_id, symbol, side, order_type, quantity,
             limit_price, time_in_force, status, create_time, update_time)
         values ('{order_id}', 'anonymous', '{key}', 'AAPL', 'BUY', 'LIMIT', 10, 187.5, 'GTC', 'NEW', now(), now());
         insert into idempotency_keys (account_id, client_request_id, fingerprint, order_id, create_time, expire_time)
         select 'anonymous', '{key}', k.fingerprint, '{order_id}', now(), now() + interval '1 day'
         from (select fingerprint from idempotency_keys limit 1) k;"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await.unwrap();
    (conn, order_id)
}

async fn a_duplicate_waits_for_the_call_in_flight_and_replays_its_order(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let url = app.config.database_url.clone();
    // A real order gives the held key the fingerprint of `limit_order`.
    let seed = new_key();
    app.place(limit_order(&seed)).await;

    let key = new_key();
    let (mut holder, held_order_id) = hold_key(&url, &key).await;
    let mut client = app.client.clone();
    let duplicate = tokio::spawn(async move { client.place_order(limit_order(&key)).await });
    backend_waiting_on_a_lock(&url, "").await;
    assert!(!duplicate.is_finished(), "the duplicate waits while the first call is in flight");
    sqlx::raw_sql("commit").execute(&mut holder).await.unwrap();

    let resp = duplicate.await.unwrap().expect("the duplicate replays").into_inner();
    assert!(resp.replayed);
    assert_eq!(resp.order.unwrap().order_id, held_order_id);
    assert_eq!(app.count("orders").await, 2);
}

async fn a_duplicate_past_its_deadline_or_the_lock_timeout_gets_key_in_use(engine: Engine) {
    let mut app = spawn_app_with(engine, |c| c.lock_timeout = Duration::from_secs(2)).await;
    let url = app.config.database_url.clone();
    let seed = new_key();
    app.place(limit_order(&seed)).await;

    let key = new_key();
    let (mut holder, _) = hold_key(&url, &key).await;
    // A caller's deadline shorter than the lock timeout...
    let mut req = tonic::Request::new(limit_order(&key));
    req.set_timeout(Duration::from_secs(1));
    let deadline = app.client.place_order(req).await.expect_err("in use");
    // ...and the lock timeout without a deadline.
    let timeout = app.client.place_order(limit_order(&key)).await.expect_err("in use");
    for status in [deadline, timeout] {
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
        let details = status.get_error_details();
        assert_eq!(details.error_info().expect("ErrorInfo").reason, "IDEMPOTENCY_KEY_IN_USE");
        assert!(details.retry_info().expect("RetryInfo").retry_delay.is_some());
    }
    sqlx::raw_sql("rollback").execute(&mut holder).await.unwrap();
    // The first call never committed: the key is free, and the retry creates.
    let resp = app.place(limit_order(&key)).await;
    assert!(!resp.replayed);
    assert_eq!(app.count("orders").await, 2);
}

/// Group commit: a key in flight in another call (on another replica) is
/// left out of the batch and waits on its own; its batch-mates are written
/// meanwhile, no batch is refused for it, and it is placed once the other
/// call ends. (On a server process of its own: its batch metrics are its.)
async fn a_key_in_flight_elsewhere_never_stalls_its_batch_mates(engine: Engine) {
    let database = TestDatabase::new(engine).await;
    let server = ServerProcess::start(&["--database-url", &database.url]).await;
    let db = Db::connect(&database.url).await;
    let mut client = OrderServiceClient::new(channel(server.addr).await);
    let key = new_key();
    let mut holder = hold_key_lock(&database.url, &key).await;
    let held = tokio::spawn({
        let (key, mut client) = (key.clone(), client.clone());
        async move { client.place_order(limit_order(&key)).await }
    });
    // Its batch-mates, sent with it: every one is written while the key is
    // held (a batch that waited for it would hold them up, then be refused).
    let others: Vec<String> = (0..64).map(|_| new_key()).collect();
    let placing =
        place_concurrently(server.addr, others.len(), 64, |i| tonic::Request::new(limit_order(&others[i])));
    tokio::time::timeout(Duration::from_secs(60), placing).await.expect("the batch-mates were held up");
    backend_waiting_on_a_lock(&database.url, "").await;
    assert!(!held.is_finished(), "the key in flight elsewhere waits for that call");
    assert_eq!(db.scalar("select count(*) from orders").await, 64);
    sqlx::raw_sql("rollback").execute(&mut holder).await.unwrap();
    let resp = held.await.unwrap().expect("placed once the other call ended").into_inner();
    assert!(!resp.replayed);
    assert_eq!(db.scalar("select count(*) from orders").await, 65);
    let again = client.place_order(limit_order(&key)).await.unwrap().into_inner();
    assert_eq!((again.replayed, again.order), (true, resp.order), "placed once");
    for outcome in ["placed_alone", "not_written", "outcome_unknown"] {
        let failures = format!("orders_batch_failures_total{{outcome=\"{outcome}\"}}");
        assert_eq!(server.metric(&failures).await, 0.0, "{failures}");
    }
    // (scripts/test runs the suite once more with ORDERS_PG_MAX_BATCH=1,
    // which the server inherits: nothing is batched then.)
    if std::env::var("ORDERS_PG_MAX_BATCH").as_deref() != Ok("1") {
        assert!(server.metric("orders_batch_size_count").await > 0.0, "the calls were batched");
    }
}

/// Group commit: a writer that does not take the key's advisory lock (a
/// session by hand, a version before group commit) holds a key's row; the
/// batch waiting on it is refused by the database after its short lock
/// wait, and each of its orders is placed alone: only the held key fails
/// (IDEMPOTENCY_KEY_IN_USE after its own lock wait), the others are written.
async fn a_batch_the_database_refuses_fails_only_the_order_that_must(engine: Engine) {
    let mut app = spawn_app_with(engine, |c| c.lock_timeout = Duration::from_secs(2)).await;
    let url = app.config.database_url.clone();
    let seed = new_key();
    app.place(limit_order(&seed)).await;
    let key = new_key();
    let (mut holder, _) = hold_key(&url, &key).await;
    let mut client = app.client.clone();
    let held = tokio::spawn({
        let key = key.clone();
        async move { client.place_order(limit_order(&key)).await }
    });
    let others: Vec<String> = (0..32).map(|_| new_key()).collect();
    place_concurrently(app.addr, others.len(), 32, |i| tonic::Request::new(limit_order(&others[i]))).await;
    let status = held.await.unwrap().expect_err("the held key is in use");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(status.get_error_details().error_info().expect("ErrorInfo").reason, "IDEMPOTENCY_KEY_IN_USE");
    sqlx::raw_sql("rollback").execute(&mut holder).await.unwrap();
    assert_eq!(app.count("orders").await, 33);
    assert!(!app.place(limit_order(&key)).await.replayed, "nothing was written for the held key");
}

/// Group commit: a batch whose database backend stops answering (here:
/// stopped with SIGSTOP while it waits for a table lock) is given up after
/// the lock timeout and a second, its callers told the outcome is unknown;
/// the other writer keeps placing orders meanwhile, and a retry of the
/// stuck key finds its one order once the backend runs again. (It used to
/// hold the replica's only writer, and every PlaceOrder, for as long as
/// the backend was stopped.)
async fn a_batch_whose_backend_stops_answering_is_given_up_and_others_go_on(engine: Engine) {
    if std::env::var("ORDERS_PG_MAX_BATCH").as_deref() == Ok("1") {
        // Group commit off (scripts/test's second run): no batch to stop.
        return;
    }
    let mut app = spawn_app_with(engine, |c| {
        c.lock_timeout = Duration::from_secs(1);
        c.db_max_connections = 4;
    })
    .await;
    app.place(limit_order(&new_key())).await;
    let url = app.config.database_url.clone();
    let mut locker = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("begin; lock table idempotency_keys in access exclusive mode")
        .execute(&mut locker)
        .await
        .unwrap();
    let stuck = new_key();
    let mut client = app.client.clone();
    let call = tokio::spawn({
        let key = stuck.clone();
        async move { client.place_order(limit_order(&key)).await }
    });
    // The batch's backend, waiting for the table: stop it before its lock
    // timeout ends the wait.
    let backend = backend_waiting_on_a_lock(&url, "with input as").await;
    signal(backend, "-STOP");
    sqlx::raw_sql("commit").execute(&mut locker).await.unwrap();
    // Another order goes through the other writer while that one is stuck.
    let other =
        tokio::time::timeout(Duration::from_secs(20), app.client.place_order(limit_order(&new_key())))
            .await
            .expect("the other writer placed an order while one backend was stopped");
    let given_up = tokio::time::timeout(Duration::from_secs(20), call).await;
    signal(backend, "-CONT");
    other.expect("placed");
    let status = given_up.expect("the stuck batch was given up").unwrap().expect_err("outcome unknown");
    assert!(may_have_written(&status), "the stuck batch may have committed: {status:?}");
    let retried = app.place(limit_order(&stuck)).await;
    let orders = app
        .db()
        .await
        .scalar(&format!("select count(*) from orders where client_request_id = '{stuck}'"))
        .await;
    assert_eq!(orders, 1, "one order for the key: {retried:?}");
}

/// The same for an order placed alone (group commit off, or sent back by
/// its batch): its backend, stopped while it waits for a key row held by a
/// session without the advisory lock, is given up after the lock timeout
/// and a second and its connection closed, rather than held (with a pooled
/// connection) for as long as the backend is stopped.
async fn an_order_placed_alone_whose_backend_stops_answering_is_given_up(engine: Engine) {
    let mut app = spawn_app_with(engine, |c| {
        c.lock_timeout = Duration::from_secs(1);
        c.db_max_connections = 4;
    })
    .await;
    app.place(limit_order(&new_key())).await;
    let url = app.config.database_url.clone();
    let stuck = new_key();
    let (mut holder, _) = hold_key(&url, &stuck).await;
    let mut client = app.client.clone();
    let call = tokio::spawn({
        let key = stuck.clone();
        async move { client.place_order(limit_order(&key)).await }
    });
    // The ordinary path's statement (it takes the advisory lock first),
    // waiting for the held row: stop it before its lock timeout.
    let backend = backend_waiting_on_a_lock(&url, "with lock as").await;
    signal(backend, "-STOP");
    let given_up = tokio::time::timeout(Duration::from_secs(20), call).await;
    sqlx::raw_sql("rollback").execute(&mut holder).await.unwrap();
    signal(backend, "-CONT");
    let status = given_up.expect("the stuck call was given up").unwrap().expect_err("given up");
    let count = format!("select count(*) from orders where client_request_id = '{stuck}'");
    // Alone after its batch, it ran in a transaction whose COMMIT was never
    // sent: "not written" is then the truth, and the key has no order.
    if !may_have_written(&status) {
        assert_eq!(app.db().await.scalar(&count).await, 0, "told not written: {status:?}");
    }
    app.place(limit_order(&new_key())).await;
    // The resumed backend lets go of the key's lock once it finds its
    // connection closed: a retry may meet it first, and is answered ABORTED.
    let mut retried = None;
    for _ in 0..10 {
        match app.client.place_order(limit_order(&stuck)).await {
            Ok(placed) => {
                retried = Some(placed.into_inner());
                break;
            }
            Err(status) if status.code() == Code::Aborted => continue,
            Err(status) => panic!("the retry: {status:?}"),
        }
    }
    let retried = retried.expect("the retry was placed");
    let orders = app
        .db()
        .await
        .scalar(&format!("select count(*) from orders where client_request_id = '{stuck}'"))
        .await;
    assert_eq!(orders, 1, "one order for the key: {retried:?}");
}

async fn calls_answer_unavailable_while_postgres_is_down_and_succeed_once_it_is_back(engine: Engine) {
    assert_eq!(engine, Engine::Postgres);
    let cluster = Cluster(tempfile::tempdir().unwrap());
    let url = cluster.run("start");
    let mut app = spawn_app_with(engine, |c| {
        c.database_url = url.clone();
        c.db_acquire_timeout = Duration::from_secs(1);
    })
    .await;
    let before = new_key();
    app.place(limit_order(&before)).await;

    cluster.run("stop");
    let key = new_key();
    for attempt in 0..3 {
        let status = app.client.place_order(limit_order(&key)).await.expect_err("database down");
        assert_eq!(status.code(), Code::Unavailable, "attempt {attempt}: {status:?}");
        // A pooled connection the stopping server sent its FATAL to reads it
        // only when the write was sent: the service cannot tell that from a
        // FATAL after a commit, so it may say the outcome is unknown.
        let reason = status.get_error_details().error_info().expect("ErrorInfo").reason.clone();
        assert!(["DATASTORE_UNAVAILABLE", "OUTCOME_UNKNOWN"].contains(&reason.as_str()), "{reason}");
    }
    let get = GetOrderRequest { lookup: Some(Lookup::ClientRequestId(before.clone())) };
    assert_eq!(app.client.get_order(get.clone()).await.unwrap_err().code(), Code::Unavailable);

    cluster.run("start");
    let resp = app.place(limit_order(&key)).await;
    assert!(!resp.replayed, "nothing was half-written while the database was down");
    assert_eq!(app.client.get_order(get).await.unwrap().into_inner().client_request_id, before);
    assert_eq!(app.count("orders").await, 2);
}

async fn tls_to_postgres_follows_the_urls_sslmode(engine: Engine) {
    let cluster = Cluster(tempfile::tempdir().unwrap());
    let url = cluster.run("start");
    let ca = cluster.0.path().join("ca.crt");
    assert!(ca.exists(), "pg-cluster made no certificate (is openssl installed?)");
    let tls_url = format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display());
    let mut app = spawn_app_with(engine, |c| c.database_url = tls_url.clone()).await;
    app.place(limit_order(&new_key())).await;
    let encrypted = app
        .db()
        .await
        .scalar(
            "select count(*) from pg_stat_ssl s join pg_stat_activity a using (pid) \
             where a.application_name = 'order-service' and s.ssl",
        )
        .await;
    assert!(encrypted > 0, "the service's connections are encrypted");

    // verify-full refuses a server whose certificate it cannot verify.
    let mut config = app.config.clone();
    config.database_url = format!("{url}?sslmode=verify-full");
    config.db_connect_timeout = Duration::from_secs(10);
    let refused = order_service::server::Application::build(config).await;
    let error = format!("{:#}", refused.expect_err("an unverifiable server is refused"));
    assert!(error.contains("cannot open database"), "{error}");
}

async fn health_follows_the_database_down_and_up_without_a_restart(engine: Engine) {
    let cluster = Cluster(tempfile::tempdir().unwrap());
    let url = cluster.run("start");
    let app = spawn_app_with(engine, |c| {
        c.database_url = url.clone();
        c.health_interval = Duration::from_millis(200);
        c.db_acquire_timeout = Duration::from_secs(1);
    })
    .await;
    let mut readiness = Readiness::watch(app.addr).await;
    assert_eq!(readiness.next().await, ServingStatus::Serving);
    cluster.run("stop");
    assert_eq!(readiness.next().await, ServingStatus::NotServing);
    let mut health = HealthClient::new(channel(app.addr).await);
    let liveness = health.check(HealthCheckRequest { service: "liveness".to_owned() }).await.unwrap();
    assert_eq!(liveness.into_inner().status(), ServingStatus::Serving, "alive, though not ready");
    cluster.run("start");
    assert_eq!(readiness.next().await, ServingStatus::Serving);
}

/// Readiness means orders can be placed: a Postgres that answers reads but
/// refuses writes (here made read-only for every session, as a standby is)
/// turns health NOT_SERVING, and SERVING again once it takes writes.
async fn health_follows_whether_postgres_takes_writes(engine: Engine) {
    let cluster = Cluster(tempfile::tempdir().unwrap());
    let url = cluster.run("start");
    let app = spawn_app_with(engine, |c| {
        c.database_url = url.clone();
        c.health_interval = Duration::from_millis(200);
    })
    .await;
    let mut admin = PgConnection::connect(&url).await.unwrap();
    let mut read_only = async |on: bool| {
        let set =
            if on { "alter system set default_transaction_read_only = on" } else { "alter system reset all" };
        sqlx::query(set).execute(&mut admin).await.unwrap();
        sqlx::query("select pg_reload_conf()").execute(&mut admin).await.unwrap();
    };
    let mut readiness = Readiness::watch(app.addr).await;
    assert_eq!(readiness.next().await, ServingStatus::Serving);
    read_only(true).await;
    assert_eq!(readiness.next().await, ServingStatus::NotServing);
    read_only(false).await;
    assert_eq!(readiness.next().await, ServingStatus::Serving);
}

/// New keys placed by `callers` callers, each placing one after another,
/// during `window`.
async fn new_keys_placed(app: &crate::helpers::TestApp, callers: usize, window: Duration) -> usize {
    let until = std::time::Instant::now() + window;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let mut client = app.client.clone();
        tasks.spawn(async move {
            let mut placed = 0;
            while std::time::Instant::now() < until {
                let mut request = tonic::Request::new(limit_order(&new_key()));
                request.set_timeout(Duration::from_secs(2));
                if client.place_order(request).await.is_ok() {
                    placed += 1;
                }
            }
            placed
        });
    }
    tasks.join_all().await.into_iter().sum()
}

/// A session holds 30 keys' advisory locks (as stuck calls elsewhere would)
/// while 30 callers retry those keys (as RetryInfo says): waiting for a held key
/// takes at most a quarter of the pool, so new keys keep being written at
/// half their rate or more (they fell to 1% when every retry waited on a
/// pooled connection). Group commit on: its batch tries each key's lock.
async fn a_few_stuck_keys_hold_only_themselves(engine: Engine) {
    stuck_keys_hold_only_themselves(engine, 256).await;
}

/// As [`a_few_stuck_keys_hold_only_themselves`], group commit off
/// (`--pg-max-batch 1`): each call's first statement only tries its key's
/// lock (new keys fell from 1,718 to 32-48 per 5 s when every retry waited).
async fn a_few_stuck_keys_hold_only_themselves_without_group_commit(engine: Engine) {
    stuck_keys_hold_only_themselves(engine, 1).await;
}

async fn stuck_keys_hold_only_themselves(engine: Engine, pg_max_batch: u32) {
    let app = spawn_app_with(engine, |c| c.pg_max_batch = pg_max_batch).await;
    let url = app.config.database_url.clone();
    let window = Duration::from_secs(3);
    let before = new_keys_placed(&app, 16, window).await;

    let stuck: Vec<String> = (0..30).map(|_| new_key()).collect();
    let mut holder = PgConnection::connect(&url).await.unwrap();
    let locks: Vec<String> = stuck
        .iter()
        .map(|key| format!("pg_advisory_xact_lock(hashtextextended('anonymous/{key}', 0))"))
        .collect();
    let sql = format!("begin; select {};", locks.join(", "));
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut holder).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut retriers = tokio::task::JoinSet::new();
    for key in stuck.clone() {
        let (mut client, stop) = (app.client.clone(), stop.clone());
        retriers.spawn(async move {
            let mut in_use = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match client.place_order(limit_order(&key)).await {
                    Err(status) if status.code() == Code::Aborted => {
                        in_use += 1;
                        // As a well-behaved caller does: wait as RetryInfo says.
                        let delay = status.get_error_details().retry_info().and_then(|info| info.retry_delay);
                        tokio::time::sleep(delay.unwrap_or(Duration::from_millis(100))).await;
                    }
                    Err(status) if status.code() == Code::Unavailable && !may_have_written(&status) => {}
                    other => panic!("a held key is never placed while held: {other:?}"),
                }
            }
            in_use
        });
    }
    let during = new_keys_placed(&app, 16, window).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let in_use: u32 = retriers.join_all().await.into_iter().sum();
    sqlx::raw_sql("commit").execute(&mut holder).await.unwrap();
    let ratio = during as f64 / before.max(1) as f64;
    println!(
        "30 keys held, 30 callers retrying them (--pg-max-batch {pg_max_batch}): new keys {before} before, \
         {during} during ({ratio:.2}x) in {window:?} at 16 callers; the held keys' retries were told IDEMPOTENCY_KEY_IN_USE {in_use} times"
    );
    assert!(before > 0 && ratio >= 0.5, "new keys keep being written: {during} during vs {before} before");
    // Released, each held key is placed once.
    for key in &stuck {
        let mut client = app.client.clone();
        let placed = client.place_order(limit_order(key)).await.expect("placed once released");
        assert!(!placed.into_inner().replayed);
    }
}

/// A table lock stops every batch (the database still answers its health
/// probe): readiness turns NOT_SERVING while orders are being tried and
/// none is written, and SERVING again once one is.
async fn readiness_tells_when_no_batch_gets_written(engine: Engine) {
    let app = spawn_app_with(engine, |c| {
        c.pg_max_batch = 256;
        c.health_interval = Duration::from_millis(100);
    })
    .await;
    let mut readiness = Readiness::watch(app.addr).await;
    assert_eq!(readiness.next().await, ServingStatus::Serving);
    let mut holder = PgConnection::connect(&app.config.database_url).await.unwrap();
    sqlx::raw_sql("begin; lock table idempotency_keys in access exclusive mode")
        .execute(&mut holder)
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (mut client, stop) = (app.client.clone(), stop.clone());
        callers.spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = client.place_order(limit_order(&new_key())).await;
            }
        });
    }
    let not_serving = tokio::time::timeout(Duration::from_secs(20), readiness.next()).await;
    assert_eq!(not_serving.ok(), Some(ServingStatus::NotServing), "no batch written: not ready");
    sqlx::raw_sql("commit").execute(&mut holder).await.unwrap();
    let serving = tokio::time::timeout(Duration::from_secs(20), readiness.next()).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    callers.join_all().await;
    assert_eq!(serving.ok(), Some(ServingStatus::Serving), "written again: ready");
}

postgres_tests!(
    a_few_stuck_keys_hold_only_themselves,
    a_few_stuck_keys_hold_only_themselves_without_group_commit,
    readiness_tells_when_no_batch_gets_written,
    health_follows_the_database_down_and_up_without_a_restart,
    health_follows_whether_postgres_takes_writes,
    tls_to_postgres_follows_the_urls_sslmode,
    a_duplicate_waits_for_the_call_in_flight_and_replays_its_order,
    a_duplicate_past_its_deadline_or_the_lock_timeout_gets_key_in_use,
    calls_answer_unavailable_while_postgres_is_down_and_succeed_once_it_is_back,
    a_key_in_flight_elsewhere_never_stalls_its_batch_mates,
    a_batch_the_database_refuses_fails_only_the_order_that_must,
    a_batch_whose_backend_stops_answering_is_given_up_and_others_go_on,
    an_order_placed_alone_whose_backend_stops_answering_is_given_up,
);
