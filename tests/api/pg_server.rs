//! Postgres only: a duplicate waits for the call in flight with its key, the
//! service rides out a database restart, and TLS follows the URL's sslmode.

use std::time::Duration;

use order_service::proto::{GetOrderRequest, get_order_request::Lookup};
use sqlx::{Connection, PgConnection};
use tonic::Code;
use tonic_types::StatusExt;

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{
    Cluster, Engine, Readiness, channel, limit_order, new_key, postgres_tests, spawn_app, spawn_app_with,
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

/// Waits (bounded) until some backend is blocked on a lock.
async fn until_a_call_waits_on_a_lock(url: &str) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity where wait_event_type = 'Lock' and datname = current_database()",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no call ever waited on the key's lock");
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
    until_a_call_waits_on_a_lock(&url).await;
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

postgres_tests!(
    health_follows_the_database_down_and_up_without_a_restart,
    health_follows_whether_postgres_takes_writes,
    tls_to_postgres_follows_the_urls_sslmode,
    a_duplicate_waits_for_the_call_in_flight_and_replays_its_order,
    a_duplicate_past_its_deadline_or_the_lock_timeout_gets_key_in_use,
    calls_answer_unavailable_while_postgres_is_down_and_succeed_once_it_is_back,
);
