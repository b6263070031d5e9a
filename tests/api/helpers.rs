//! Test harness: a real server on 127.0.0.1:0 over a fresh database of either
//! engine, a connected gRPC client, and direct access to the database for
//! assertions.
//!
//! Each test body is an `async fn(Engine)`; [`engine_tests!`] turns it into a
//! SQLite test and a Postgres test. The Postgres ones are ignored unless run
//! with `--include-ignored` (as `scripts/test` does) and need
//! `TEST_DATABASE_URL`; each gets a database of its own on that server.

use std::{net::SocketAddr, path::Path, sync::Arc};

use order_service::{
    clock::ManualClock,
    config::Config,
    proto::{OrderType, PlaceOrderRequest, Side, order_service_client::OrderServiceClient},
    server::Application,
    store::Store,
};
use sqlx::{Connection, PgConnection, PgPool, SqlitePool};
use tempfile::TempDir;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// Generates `mod sqlite` and `mod postgres`, each with one test per name
/// calling the `async fn name(engine: Engine)` of the enclosing module.
macro_rules! engine_tests {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::helpers::Engine::Sqlite).await
                }
            )+
        }
        $crate::helpers::postgres_tests!($($name),+);
    };
}

/// Generates `mod postgres` with one Postgres-only test per name.
macro_rules! postgres_tests {
    ($($name:ident),+ $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                #[ignore = "needs TEST_DATABASE_URL; scripts/test runs it"]
                async fn $name() {
                    super::$name($crate::helpers::Engine::Postgres).await
                }
            )+
        }
    };
}

pub(crate) use {engine_tests, postgres_tests};

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

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

/// The path of a file in this repository.
pub fn repo_path(relative: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// A private Postgres cluster a test may stop and start (`scripts/pg-cluster`).
pub struct Cluster(pub tempfile::TempDir);

impl Cluster {
    /// `scripts/pg-cluster VERB DIR`: `start` prints the URL.
    pub fn run(&self, verb: &str) -> String {
        let out = std::process::Command::new(repo_path("scripts/pg-cluster"))
            .arg(verb)
            .arg(self.0.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "pg-cluster {verb}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new(repo_path("scripts/pg-cluster"))
            .arg("stop")
            .arg(self.0.path())
            .output();
    }
}

/// A uniformly random number below `n`, from the OS's random source.
pub fn random_below(n: usize) -> usize {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    (u64::from_le_bytes(bytes[..8].try_into().unwrap()) % n as u64) as usize
}

/// Whether the server closes `stream` (reading until it does) within 15 s.
pub async fn closed_by_server(stream: impl tokio::io::AsyncRead + Unpin) -> bool {
    read_until_closed(stream).await.is_some()
}

/// Everything the server sends on `stream` until it closes it, if it does
/// within 15 s.
pub async fn read_until_closed(mut stream: impl tokio::io::AsyncRead + Unpin) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    let read_to_end = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(15), read_to_end).await.ok()?;
    Some(received)
}

/// HTTP/2 bytes as no client library would send them.
pub mod raw_h2 {
    /// An HTTP/2 frame.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let [_, a, b, c] = (payload.len() as u32).to_be_bytes();
        let mut bytes = vec![a, b, c, kind, flags];
        bytes.extend(stream.to_be_bytes());
        bytes.extend(payload);
        bytes
    }

    /// The client preface and an empty SETTINGS frame: connected, no request.
    pub fn opening() -> Vec<u8> {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(0x4, 0, 0, &[]));
        bytes
    }

    /// [`opening`], then a whole request on stream 1 (`GET /` from HPACK's
    /// static table, END_HEADERS and END_STREAM).
    pub fn opening_and_request() -> Vec<u8> {
        let mut bytes = opening();
        bytes.extend(frame(0x1, 0x4 | 0x1, 1, &[0x82, 0x86, 0x84]));
        bytes
    }

    /// A HEADERS frame on stream 3 announcing three bytes, of which one is
    /// sent: a header block begun and never finished.
    pub fn stalled_headers() -> Vec<u8> {
        let mut bytes = frame(0x1, 0x4, 3, &[0x82, 0x86, 0x84]);
        bytes.truncate(bytes.len() - 2);
        bytes
    }

    /// The GOAWAY frames (last stream id, error code) among the frames the
    /// server sent, `bytes` (a server sends no preface but its SETTINGS).
    pub fn goaways(mut bytes: &[u8]) -> Vec<(u32, u32)> {
        let mut found = Vec::new();
        while bytes.len() >= 9 {
            let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            let Some(payload) = bytes.get(9..9 + len) else { break };
            if bytes[3] == 0x7 && len >= 8 {
                let word = |at: usize| u32::from_be_bytes(payload[at..at + 4].try_into().unwrap());
                found.push((word(0) & 0x7fff_ffff, word(4)));
            }
            bytes = &bytes[9 + len..];
        }
        found
    }
}

/// Sends and receives message bytes as they are, so a test can send what no
/// generated client would.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut bytes = vec![0; prost::bytes::Buf::remaining(src)];
        prost::bytes::Buf::copy_to_slice(src, &mut bytes);
        Ok(Some(bytes))
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
