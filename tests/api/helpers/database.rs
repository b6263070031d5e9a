//! Test databases: a fresh one per test (a SQLite file in a temp dir, or a
//! database of its own on the `TEST_DATABASE_URL` server), and a direct
//! connection to it for assertions.

use std::sync::Arc;

use sqlx::{Connection, PgConnection, PgPool, SqlitePool};
use tempfile::TempDir;

use super::Engine;

/// A fresh, empty database: its URL, and the temp dir a SQLite file lives in.
pub struct TestDatabase {
    pub url: String,
    _dir: Option<TempDir>,
}

impl TestDatabase {
    pub async fn new(engine: Engine) -> Arc<Self> {
        Arc::new(match engine {
            Engine::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("orders.db").display());
                Self { url, _dir: Some(dir) }
            }
            Engine::Postgres => {
                let admin = std::env::var("TEST_DATABASE_URL")
                    .expect("TEST_DATABASE_URL is not set: run scripts/test, which starts a Postgres");
                let name = format!("order_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = PgConnection::connect(&admin).await.expect("connect to TEST_DATABASE_URL");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("create a test database");
                conn.close().await.ok();
                Self { url: with_database(&admin, &name), _dir: None }
            }
        })
    }
}

/// `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let (scheme, rest) = base.split_once("://").expect("a URL");
    let host = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{host}/{name}{query}")
}

/// A direct connection to a test database, for assertions.
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Db {
    pub async fn connect(url: &str) -> Db {
        if url.starts_with("sqlite:") {
            Db::Sqlite(SqlitePool::connect(url).await.expect("open the test database"))
        } else {
            Db::Postgres(PgPool::connect(url).await.expect("open the test database"))
        }
    }

    /// The one `bigint` value `sql` selects.
    pub async fn scalar(&self, sql: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Db::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
            Db::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        }
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The text values `sql` selects, in order.
    pub async fn strings(&self, sql: &str) -> Vec<String> {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Db::Sqlite(pool) => sqlx::query_scalar(sql).fetch_all(pool).await,
            Db::Postgres(pool) => sqlx::query_scalar(sql).fetch_all(pool).await,
        }
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `sql` for its effect.
    pub async fn execute(&self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Db::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
            Db::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// The pid of a backend of the Postgres database at `url` that waits on a
/// lock while it runs a statement starting with `statement` (any statement
/// when empty), polled for at most about five seconds.
pub async fn backend_waiting_on_a_lock(url: &str, statement: &str) -> i32 {
    let mut conn = PgConnection::connect(url).await.unwrap();
    for _ in 0..1000 {
        let pid: Option<i32> = sqlx::query_scalar(
            "select pid from pg_stat_activity where wait_event_type = 'Lock' \
             and datname = current_database() and query like $1 || '%' limit 1",
        )
        .bind(statement)
        .fetch_optional(&mut conn)
        .await
        .unwrap();
        if let Some(pid) = pid {
            return pid;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("no backend waited on a lock running {statement:?}");
}

/// Sends `signal` (`-STOP`, `-CONT`) to the process `pid` (a Postgres
/// backend: tests run as root, as CI does).
pub fn signal(pid: i32, signal: &str) {
    let status = std::process::Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// Holds the key's advisory lock from another connection, in a transaction
/// left open, as a call in flight with the key holds it on any replica.
pub async fn hold_key_lock(url: &str, key: &str) -> PgConnection {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let sql = format!("begin; select pg_advisory_xact_lock(hashtextextended('anonymous/{key}', 0));");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await.unwrap();
    conn
}
