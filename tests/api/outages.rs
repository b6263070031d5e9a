//! The database becomes unusable under load and comes back: callers get
//! `UNAVAILABLE` (never `INTERNAL`, never a hang past their deadline),
//! nothing is half-written, and the service resumes without a restart.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use order_service::proto::order_service_client::OrderServiceClient;
use tokio::sync::Notify;
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::{
    Cluster, Engine, Readiness, TestApp, channel, limit_order, new_key, postgres_tests, spawn_app_with,
};

/// Each call's deadline; the service must answer within it.
const DEADLINE: Duration = Duration::from_secs(3);

/// What the callers saw so far.
#[derive(Debug, Default)]
struct Seen {
    /// Keys acknowledged with an order.
    acknowledged: Vec<String>,
    /// Keys whose call failed, and how.
    failed: Vec<(String, Code)>,
    /// Of those, the keys whose answer said nothing was written (the others
    /// said the outcome is unknown).
    not_written: Vec<String>,
    /// Calls with no answer within the deadline plus a margin.
    hung: usize,
}

impl Seen {
    fn count(&self, code: Code) -> usize {
        self.failed.iter().filter(|(_, c)| *c == code).count()
    }
}

/// Callers placing orders without pause, each call with its own key and
/// deadline, and no retries: every status is recorded as it came.
struct Load {
    seen: Arc<Mutex<Seen>>,
    progress: Arc<Notify>,
    stop: Arc<AtomicBool>,
    callers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(addr: SocketAddr, callers: usize) -> Load {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let progress = Arc::new(Notify::new());
        let stop = Arc::new(AtomicBool::new(false));
        let channel = channel(addr).await;
        let callers = (0..callers)
            .map(|_| {
                let (seen, progress, stop) = (seen.clone(), progress.clone(), stop.clone());
                let mut client = OrderServiceClient::new(channel.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let key = new_key();
                        let mut request = Request::new(limit_order(&key));
                        request.set_timeout(DEADLINE);
                        let answer = tokio::time::timeout(DEADLINE * 2, client.place_order(request)).await;
                        {
                            let mut seen = seen.lock().unwrap();
                            match answer {
                                Ok(Ok(_)) => seen.acknowledged.push(key),
                                Ok(Err(status)) => {
                                    if !order_client::may_have_written(&status) {
                                        seen.not_written.push(key.clone());
                                    }
                                    seen.failed.push((key, status.code()))
                                }
                                Err(_) => seen.hung += 1,
                            }
                        }
                        progress.notify_waiters();
                    }
                })
            })
            .collect();
        Load { seen, progress, stop, callers }
    }

    /// Waits (bounded) until `done` holds of what the callers saw.
    async fn until(&self, what: &str, done: impl Fn(&Seen) -> bool) {
        let wait = async {
            loop {
                let progressed = self.progress.notified();
                if done(&self.seen.lock().unwrap()) {
                    return;
                }
                progressed.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(60), wait).await.is_err() {
            panic!("waited 60 s for {what}; seen: {:?}", summary(&self.seen.lock().unwrap()));
        }
    }

    async fn stop(self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        for caller in self.callers {
            caller.await.unwrap();
        }
        Arc::try_unwrap(self.seen).unwrap().into_inner().unwrap()
    }
}

fn summary(seen: &Seen) -> String {
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for (_, code) in &seen.failed {
        *codes.entry(format!("{code:?}")).or_default() += 1;
    }
    format!(
        "acknowledged={} failed={codes:?} (not written {}, outcome unknown {}) hung={}",
        seen.acknowledged.len(),
        seen.not_written.len(),
        seen.failed.len() - seen.not_written.len(),
        seen.hung
    )
}

/// Runs load through an outage that `begin` starts and `end` ends, and checks
/// what callers saw and what the database holds.
async fn through_an_outage(app: &mut TestApp, begin: impl FnOnce(), end: impl FnOnce()) {
    let load = Load::start(app.addr, 4).await;
    load.until("orders before the outage", |s| s.acknowledged.len() >= 50).await;
    begin();
    load.until("refusals during the outage", |s| s.count(Code::Unavailable) >= 20).await;
    end();
    let at_end = load.seen.lock().unwrap().acknowledged.len();
    load.until("orders after the outage", |s| s.acknowledged.len() >= at_end + 50).await;
    let seen = load.stop().await;
    println!("outage ({:?}): {}", app.engine, summary(&seen));

    assert_eq!(seen.hung, 0, "calls with no answer by their deadline");
    let unexpected: Vec<_> = seen.failed.iter().filter(|(_, code)| *code != Code::Unavailable).collect();
    assert!(unexpected.is_empty(), "failures other than UNAVAILABLE: {unexpected:?}");

    // Nothing half-written: keys and orders pair up, one order per key.
    let db = app.db().await;
    let orders = db.scalar("select count(*) from orders").await;
    let keys = db.scalar("select count(*) from idempotency_keys").await;
    let paired =
        db.scalar("select count(*) from orders o join idempotency_keys k on k.order_id = o.order_id").await;
    assert_eq!((orders, keys), (paired, paired), "every order has its key and every key its order");
    assert!(orders as usize >= seen.acknowledged.len());
    assert!(orders as usize <= seen.acknowledged.len() + seen.failed.len(), "orders nobody asked for");
    if app.engine == Engine::Sqlite {
        assert_eq!(db.strings("pragma integrity_check").await, ["ok"]);
    }
    // An answer that said nothing was written is true.
    let stored: std::collections::HashSet<String> =
        db.strings("select cast(client_request_id as text) from orders").await.into_iter().collect();
    let untrue: Vec<_> = seen.not_written.iter().filter(|key| stored.contains(*key)).collect();
    assert!(untrue.is_empty(), "'not written' answers whose order exists: {untrue:?}");
    // Every acknowledged key replays its order; every refused key can be
    // retried now and ends in exactly one order.
    for key in &seen.acknowledged {
        assert!(app.place(limit_order(key)).await.replayed, "acknowledged {key} is stored");
    }
    for (key, _) in &seen.failed {
        app.place(limit_order(key)).await;
    }
    let expected = seen.acknowledged.len() + seen.failed.len();
    assert_eq!(app.count("orders").await as usize, expected, "one order per key, after retries");
}

async fn postgres_stopped_and_restarted_under_load(engine: Engine) {
    let cluster = Cluster(tempfile::tempdir().unwrap());
    let url = cluster.run("start");
    let mut app = spawn_app_with(engine, |c| {
        c.database_url = url.clone();
        c.db_acquire_timeout = Duration::from_secs(1);
        c.db_connect_timeout = Duration::from_secs(1);
    })
    .await;
    through_an_outage(&mut app, || drop(cluster.run("stop")), || drop(cluster.run("start"))).await;
}

postgres_tests!(postgres_stopped_and_restarted_under_load);

/// Files made immutable (`chattr +i`), and made writable again on drop. As
/// root, read-only permissions would not stop the server (root ignores
/// them, and they do not apply to files already open); the immutable flag
/// does both: every write to the open database file fails with EPERM.
struct Unwritable(Vec<PathBuf>);

impl Unwritable {
    fn set(paths: Vec<PathBuf>) -> Unwritable {
        chattr("+i", &paths);
        Unwritable(paths)
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        chattr("-i", &self.0);
    }
}

fn chattr(flag: &str, paths: &[PathBuf]) {
    let out = std::process::Command::new("chattr").arg(flag).args(paths).output().expect("run chattr");
    assert!(
        out.status.success(),
        "chattr {flag} {paths:?} (needs root: CAP_LINUX_IMMUTABLE): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root for chattr +i; scripts/test runs it"]
async fn a_sqlite_file_made_unwritable_under_load_and_restored() {
    let mut app = spawn_app_with(Engine::Sqlite, |c| c.lock_timeout = Duration::from_secs(1)).await;
    let file = PathBuf::from(app.config.database_url.trim_start_matches("sqlite://"));
    let wal = PathBuf::from(format!("{}-wal", file.display()));
    let unwritable = Mutex::new(None);
    through_an_outage(
        &mut app,
        || *unwritable.lock().unwrap() = Some(Unwritable::set(vec![file.clone(), wal.clone()])),
        || drop(unwritable.lock().unwrap().take()),
    )
    .await;
}

/// Readiness means orders can be placed: a file that stops taking writes
/// (here made immutable) turns health NOT_SERVING though reads still work,
/// and SERVING again once it takes writes, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root for chattr +i; scripts/test runs it"]
async fn health_follows_whether_the_sqlite_file_takes_writes() {
    let app = spawn_app_with(Engine::Sqlite, |c| {
        c.health_interval = Duration::from_millis(200);
        c.lock_timeout = Duration::from_secs(1);
    })
    .await;
    let file = PathBuf::from(app.config.database_url.trim_start_matches("sqlite://"));
    let wal = PathBuf::from(format!("{}-wal", file.display()));
    let mut readiness = Readiness::watch(app.addr).await;
    assert_eq!(readiness.next().await, ServingStatus::Serving);
    let unwritable = Unwritable::set(vec![file, wal]);
    assert_eq!(readiness.next().await, ServingStatus::NotServing);
    drop(unwritable);
    assert_eq!(readiness.next().await, ServingStatus::Serving);
}
