//! The in-process server: a real server on 127.0.0.1:0 over a fresh database
//! of either engine, a connected gRPC client, and what a test asks of it.

use std::{net::SocketAddr, sync::Arc};

use order_service::{
    clock::ManualClock,
    config::Config,
    proto::{PlaceOrderRequest, order_service_client::OrderServiceClient},
    server::Application,
    store::Store,
};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

use super::{Db, Engine, TestDatabase};

/// A running server and what a test needs to talk to it.
pub struct TestApp {
    pub engine: Engine,
    pub addr: SocketAddr,
    pub client: OrderServiceClient<Channel>,
    pub store: Store,
    pub clock: Arc<ManualClock>,
    pub config: Config,
    pub faults: Arc<order_service::api::FaultInjector>,
    database: Arc<TestDatabase>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A server with default settings on a fresh database.
pub async fn spawn_app(engine: Engine) -> TestApp {
    spawn_app_with(engine, |_| {}).await
}

/// The defaults for a test server on `database`: a free loopback port, no
/// metrics endpoint, no shutdown delay.
pub fn test_config(database: &TestDatabase) -> Config {
    let mut config = Config::defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.database_url = database.url.clone();
    config.metrics_listen = None;
    config.shutdown_delay = std::time::Duration::ZERO;
    config
}

/// A server on a fresh database, with `configure` applied to its config.
pub async fn spawn_app_with(engine: Engine, configure: impl FnOnce(&mut Config)) -> TestApp {
    let database = TestDatabase::new(engine).await;
    let mut config = test_config(&database);
    configure(&mut config);
    start(engine, config, database, Arc::new(ManualClock::new())).await
}

/// Three servers started at once on one fresh database, as replicas of one
/// deployment are (they race to migrate it).
pub async fn spawn_replicas(engine: Engine) -> [TestApp; 3] {
    let clock = Arc::new(ManualClock::new());
    let servers = spawn_servers(engine, |_| {}, vec![clock.clone(), clock.clone(), clock]).await;
    servers.try_into().unwrap_or_else(|_| unreachable!("three clocks, three servers"))
}

/// Servers started at once on one fresh database, with `configure` applied
/// to their config, one per clock.
pub async fn spawn_servers(
    engine: Engine,
    configure: impl FnOnce(&mut Config),
    clocks: Vec<Arc<ManualClock>>,
) -> Vec<TestApp> {
    let database = TestDatabase::new(engine).await;
    let mut config = test_config(&database);
    configure(&mut config);
    let starts = clocks.into_iter().map(|clock| start(engine, config.clone(), database.clone(), clock));
    futures_join_all(starts).await
}

/// Runs `futures` at once; their outputs in order.
async fn futures_join_all<T: Send + 'static>(
    futures: impl IntoIterator<Item = impl Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for handle in handles {
        outputs.push(handle.await.expect("task"));
    }
    outputs
}

async fn start(
    engine: Engine,
    config: Config,
    database: Arc<TestDatabase>,
    clock: Arc<ManualClock>,
) -> TestApp {
    let app =
        Application::build_with_clock(config.clone(), clock.clone()).await.expect("build the application");
    let addr = app.local_addr();
    let store = app.store().clone();
    let faults = app.faults();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run(async {
        let _ = rx.await;
    }));
    let client = OrderServiceClient::new(channel(addr).await);
    TestApp {
        engine,
        addr,
        client,
        store,
        clock,
        config,
        faults,
        database,
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

    /// Stops this server and starts another on the same database.
    pub async fn restart(mut self) -> TestApp {
        self.stop().await;
        start(self.engine, self.config.clone(), self.database.clone(), self.clock.clone()).await
    }

    /// A direct connection to the server's database.
    pub async fn db(&self) -> Db {
        Db::connect(&self.config.database_url).await
    }

    /// Makes every key and order `by` older, as if that much time had
    /// passed, on either engine: Postgres reads the database server's clock,
    /// which a test cannot move, so the rows move instead.
    pub async fn age(&self, by: std::time::Duration) {
        let micros = by.as_micros();
        let sql = match self.engine {
            Engine::Sqlite => format!(
                "update idempotency_keys set create_time = create_time - {micros}, expire_time = expire_time - {micros};
                 update orders set create_time = create_time - {micros}, update_time = update_time - {micros};"
            ),
            Engine::Postgres => format!(
                "update idempotency_keys set create_time = create_time - interval '{micros} microseconds',
                     expire_time = expire_time - interval '{micros} microseconds';
                 update orders set create_time = create_time - interval '{micros} microseconds',
                     update_time = update_time - interval '{micros} microseconds';"
            ),
        };
        self.db().await.execute(&sql).await;
    }

    /// How many rows `table` holds.
    pub async fn count(&self, table: &str) -> i64 {
        self.db().await.scalar(&format!("select count(*) from {table}")).await
    }

    /// Places `req`, expecting success.
    pub async fn place(&mut self, req: PlaceOrderRequest) -> order_service::proto::PlaceOrderResponse {
        self.client.place_order(req).await.expect("PlaceOrder succeeds").into_inner()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// The readiness of the server at `addr` as a health Watch stream reports it.
pub struct Readiness(tonic::Streaming<tonic_health::pb::HealthCheckResponse>);

impl Readiness {
    /// Starts watching `orders.v1.OrderService`.
    pub async fn watch(addr: SocketAddr) -> Readiness {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel(addr).await);
        let request = tonic_health::pb::HealthCheckRequest { service: "orders.v1.OrderService".to_owned() };
        Readiness(health.watch(request).await.unwrap().into_inner())
    }

    /// The next status the server sends (the first is the current one),
    /// waiting at most 15 s.
    pub async fn next(&mut self) -> tonic_health::pb::health_check_response::ServingStatus {
        let message = tokio::time::timeout(std::time::Duration::from_secs(15), self.0.message()).await;
        message.expect("a health change in time").unwrap().expect("the stream goes on").status()
    }
}
