//! Test harness: a real server on 127.0.0.1:0 over a fresh SQLite file, a
//! connected gRPC client, and direct access to the database for assertions.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use order_service::{
    clock::ManualClock,
    config::Config,
    proto::{OrderType, PlaceOrderRequest, Side, order_service_client::OrderServiceClient},
    startup::Application,
    store::Store,
};
use sqlx::{SqlitePool, sqlite::SqliteConnectOptions};
use tempfile::TempDir;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// A running server and what a test needs to talk to it.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: OrderServiceClient<Channel>,
    pub store: Store,
    pub clock: Arc<ManualClock>,
    pub config: Config,
    dir: Arc<TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A server with default settings on a fresh database.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// A server on a fresh database, with `configure` applied to its config.
pub async fn spawn_app_with(configure: impl FnOnce(&mut Config)) -> TestApp {
    let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
    let mut config = Config::defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.database_url = format!("sqlite://{}", dir.path().join("orders.db").display());
    configure(&mut config);
    start(config, dir, Arc::new(ManualClock::new())).await
}

async fn start(config: Config, dir: Arc<TempDir>, clock: Arc<ManualClock>) -> TestApp {
    let app = Application::build_with_clock(config.clone(), clock.clone())
        .await
        .expect("build the application");
    let addr = app.local_addr();
    let store = app.store().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run(async {
        let _ = rx.await;
    }));
    let client = OrderServiceClient::new(channel(addr).await);
    TestApp {
        addr,
        client,
        store,
        clock,
        config,
        dir,
        shutdown: Some(tx),
        server: Some(server),
    }
}

/// A fresh connection (HTTP/2 channel) to `addr`.
pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the test server")
}

impl TestApp {
    /// Stops the server gracefully and waits until it has.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server run");
        }
    }

    /// Stops this server and starts another on the same database file.
    pub async fn restart(mut self) -> TestApp {
        self.stop().await;
        start(self.config.clone(), self.dir.clone(), self.clock.clone()).await
    }

    /// A second server on the same database file, as another replica would be.
    pub async fn another_instance(&self) -> TestApp {
        let mut config = self.config.clone();
        config.listen = "127.0.0.1:0".parse().unwrap();
        start(config, self.dir.clone(), self.clock.clone()).await
    }

    /// The SQLite file behind the server.
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("orders.db")
    }

    /// A separate connection pool to the server's database, for assertions.
    pub async fn db(&self) -> SqlitePool {
        SqlitePool::connect_with(SqliteConnectOptions::new().filename(self.db_path()))
            .await
            .expect("open the test database")
    }

    /// How many rows `table` holds.
    pub async fn count(&self, table: &str) -> i64 {
        let pool = self.db().await;
        let sql = format!("select count(*) from {table}");
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&pool)
            .await
            .expect("count rows");
        pool.close().await;
        n
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// A fresh idempotency key.
pub fn new_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A valid limit order: buy 10 AAPL at 187.5.
pub fn limit_order(key: &str) -> PlaceOrderRequest {
    PlaceOrderRequest {
        client_request_id: key.to_owned(),
        symbol: "AAPL".to_owned(),
        side: Side::Buy as i32,
        order_type: OrderType::Limit as i32,
        quantity: "10".to_owned(),
        limit_price: "187.5".to_owned(),
        time_in_force: 0,
    }
}
