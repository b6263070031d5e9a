//! The server process killed with SIGKILL at random moments under load:
//! every acknowledged order is stored once, with the fields its caller sent,
//! and nothing is stored twice or half.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use order_client::{ClientConfig, OrderClient, RetryPolicy};
use order_service::proto::PlaceOrderRequest;
use tokio::sync::Notify;

use crate::{
    helpers::process::ServerProcess,
    helpers::{Db, Engine, TestDatabase, engine_tests, limit_order, new_key, random_below},
};

const CALLERS: usize = 8;
const ORDERS_PER_CALLER: usize = 500;
const KILLS: usize = 10;

/// The request caller `caller` sends as its `n`th order: fields unique to the
/// key, so a mixed-up reply or row would show.
fn request(caller: usize, n: usize) -> PlaceOrderRequest {
    let mut req = limit_order(&new_key());
    req.symbol = format!("C{caller}");
    req.quantity = (n + 1).to_string();
    req.limit_price = format!("{}.25", caller * 1000 + n);
    req
}

/// What one caller saw acknowledged: key → (order id, request sent).
type Acknowledged = HashMap<String, (String, PlaceOrderRequest)>;

async fn killed_servers_lose_no_acknowledged_order_and_duplicate_none(engine: Engine) {
    let database = TestDatabase::new(engine).await;
    let args = ["--database-url", database.url.as_str(), "--shutdown-delay", "0s"];
    let mut server = ServerProcess::start(&args).await;
    let addr = server.addr;

    let acknowledged = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(Notify::new());
    let done = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let (acknowledged, progress) = (acknowledged.clone(), progress.clone());
            tokio::spawn(async move {
                let retry = RetryPolicy {
                    max_attempts: 200,
                    initial_backoff: Duration::from_millis(5),
                    max_backoff: Duration::from_millis(100),
                    attempt_timeout: Duration::from_secs(5),
                    total_timeout: Duration::from_secs(60),
                    on_retry: None,
                };
                let config = ClientConfig { retry, ..ClientConfig::new(format!("http://{addr}")) };
                let mut client = OrderClient::new(config).unwrap();
                let (mut seen, mut attempts, mut replays, mut failed) =
                    (Acknowledged::new(), 0, 0, Vec::new());
                for n in 0..ORDERS_PER_CALLER {
                    let req = request(caller, n);
                    match client.place_order(req.clone()).await {
                        Ok(placed) => {
                            attempts += placed.attempts;
                            replays += usize::from(placed.value.replayed);
                            let order = placed.value.order.expect("an order");
                            assert_eq!(order.client_request_id, req.client_request_id);
                            seen.insert(req.client_request_id.clone(), (order.order_id, req));
                            acknowledged.fetch_add(1, Ordering::SeqCst);
                            progress.notify_one();
                        }
                        Err(error) => {
                            attempts += error.attempts;
                            failed.push(format!("{}: {error}", req.client_request_id));
                        }
                    }
                }
                (seen, attempts, replays, failed)
            })
        })
        .collect();

    // Kill the server after a random number of further acknowledgements
    // (calls are in flight at every moment), and start it again at once.
    let killer = {
        let (acknowledged, progress, done) = (acknowledged.clone(), progress.clone(), done.clone());
        let listen = addr.to_string();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::spawn(async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut kills = 0;
            let total = CALLERS * ORDERS_PER_CALLER;
            while kills < KILLS && !done.load(Ordering::SeqCst) {
                let target =
                    acknowledged.load(Ordering::SeqCst) + 100 + random_below(total / (KILLS + 1) - 100);
                while acknowledged.load(Ordering::SeqCst) < target.min(total - 1) {
                    if done.load(Ordering::SeqCst) {
                        return (server, kills);
                    }
                    progress.notified().await;
                }
                server.kill().await;
                kills += 1;
                server = ServerProcess::start_at(&listen, &args).await;
            }
            (server, kills)
        })
    };

    let (mut acked, mut attempts, mut replays, mut failed) = (Acknowledged::new(), 0, 0, Vec::new());
    for caller in callers {
        let (seen, caller_attempts, caller_replays, caller_failed) = caller.await.expect("caller");
        acked.extend(seen);
        attempts += caller_attempts;
        replays += caller_replays;
        failed.extend(caller_failed);
    }
    done.store(true, Ordering::SeqCst);
    progress.notify_one();
    let (mut server, kills) = killer.await.expect("killer");
    server.kill().await;

    let db = Db::connect(&database.url).await;
    let rows = db
        .strings(match engine {
            Engine::Sqlite => {
                "select client_request_id || ' ' || order_id || ' ' || symbol || ' ' || quantity \
                               || ' ' || limit_price from orders"
            }
            Engine::Postgres => {
                "select client_request_id || ' ' || order_id || ' ' || symbol || ' ' \
                                 || trim_scale(quantity) || ' ' || trim_scale(limit_price) from orders"
            }
        })
        .await;
    let mut stored: HashMap<String, Vec<Vec<String>>> = HashMap::new();
    for row in &rows {
        let fields: Vec<String> = row.split(' ').map(str::to_owned).collect();
        stored.entry(fields[0].clone()).or_default().push(fields);
    }
    let duplicates: Vec<_> = stored.iter().filter(|(_, orders)| orders.len() > 1).collect();
    let mut lost = Vec::new();
    for (key, (order_id, req)) in &acked {
        match stored.get(key).map(Vec::as_slice) {
            Some([fields]) => {
                assert_eq!(&fields[1], order_id, "key {key}: the stored order is the acknowledged one");
                assert_eq!(fields[2..], [req.symbol.clone(), req.quantity.clone(), req.limit_price.clone()]);
            }
            Some(_) => {} // reported as a duplicate
            None => lost.push(key),
        }
    }
    let orders_without_key = db
        .scalar(
            "select count(*) from orders o where not exists \
             (select 1 from idempotency_keys k where k.order_id = o.order_id)",
        )
        .await;
    let keys_without_order = db
        .scalar(
            "select count(*) from idempotency_keys k where not exists \
             (select 1 from orders o where o.order_id = k.order_id)",
        )
        .await;
    let calls = CALLERS * ORDERS_PER_CALLER;
    println!(
        "crash test ({engine:?}): calls={calls} acknowledged={} orders={} kills={kills} attempts={attempts} \
         retries={} replayed={replays} duplicates={} lost={} failed={}",
        acked.len(),
        rows.len(),
        attempts - calls as u32,
        duplicates.len(),
        lost.len(),
        failed.len(),
    );
    assert!(duplicates.is_empty(), "keys with more than one order: {duplicates:?}");
    assert!(lost.is_empty(), "acknowledged keys without an order: {lost:?}");
    assert_eq!(orders_without_key, 0, "orders without their key");
    assert_eq!(keys_without_order, 0, "keys without their order");
    assert!(failed.is_empty(), "calls that failed for good despite retries: {failed:?}");
    assert_eq!(rows.len(), calls, "one order per call, none more");
    assert_eq!(kills, KILLS, "the server was killed under load every time");
}

engine_tests!(killed_servers_lose_no_acknowledged_order_and_duplicate_none);
