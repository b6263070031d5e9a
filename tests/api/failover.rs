//! Postgres failover: a primary and a streaming standby from the machine's
//! own server binaries, a stable address in front of the primary (a proxy,
//! as a Kubernetes Service or haproxy is), the service on that address, and
//! callers retrying through `order_client`. Mid-load, the replication link
//! is held back, the primary's processes are SIGKILLed, the standby is
//! promoted and the address repointed. Then, on the new primary: every order
//! a caller saw acknowledged is there exactly once with the caller's
//! fields, and no key has two orders.
//!
//! With a synchronous standby (`synchronous_standby_names`) a commit waits
//! for the standby, so nothing acknowledged can be lost. With an
//! asynchronous one the primary acknowledges what the standby has not got:
//! that run must lose orders, which shows the test can fail.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use order_client::{ClientConfig, OrderClient, RetryPolicy};
use sqlx::{Connection, PgConnection};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::{
    Cluster, Engine, Proxy, Readiness, limit_order, new_key, postgres_tests, spawn_app_with,
};

/// What one failover measured.
#[derive(Debug)]
struct Figures {
    acknowledged: usize,
    lost: usize,
    wrong_fields: usize,
    duplicates: i64,
    /// From the kill to the first order acknowledged after it.
    first_new_order: Option<Duration>,
    /// The codes of the attempts that were retried, by name.
    retried: BTreeMap<String, usize>,
    saw_not_serving: bool,
}

/// `postgres://…@HOST:PORT/…` → HOST:PORT.
fn addr_of(url: &str) -> SocketAddr {
    let host_port = url.split('@').nth(1).unwrap().split('/').next().unwrap();
    host_port.parse().unwrap()
}

/// Waits (bounded) until the primary at `url` streams to its standby, in
/// `mode` (`sync` or `async`).
async fn until_streaming(url: &str, mode: &str) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    for _ in 0..600 {
        let state: Option<String> = sqlx::query_scalar(
            "select sync_state from pg_stat_replication where application_name = 'standby1' and state = 'streaming'",
        )
        .fetch_optional(&mut conn)
        .await
        .unwrap();
        if state.as_deref() == Some(mode) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the standby never streamed in {mode} mode");
}

async fn fail_over(synchronous: bool) -> Figures {
    let primary = Cluster(tempfile::tempdir().unwrap());
    let conf = if synchronous {
        "-c synchronous_commit=on -c synchronous_standby_names=standby1"
    } else {
        "-c synchronous_commit=on"
    };
    let primary_url = primary.run_with("start", &[], conf);
    let link = Proxy::start(addr_of(&primary_url)).await;
    let standby = Cluster(tempfile::tempdir().unwrap());
    let standby_url = standby.run_with("standby", &[&link.addr.port().to_string()], "");
    until_streaming(&primary_url, if synchronous { "sync" } else { "async" }).await;

    let front = Proxy::start(addr_of(&primary_url)).await;
    let front_url = format!("postgres://postgres@{}/postgres", front.addr);
    let app = spawn_app_with(Engine::Postgres, |c| {
        c.database_url = front_url.clone();
        c.db_acquire_timeout = Duration::from_secs(1);
        c.health_interval = Duration::from_millis(100);
    })
    .await;
    let mut readiness = Readiness::watch(app.addr).await;
    assert_eq!(readiness.next().await, ServingStatus::Serving);

    // Callers placing orders with fresh keys and varied quantities.
    let stop = Arc::new(AtomicBool::new(false));
    let retried = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let acked = Arc::new(Mutex::new(Vec::<(String, String, Instant)>::new()));
    let mut callers = Vec::new();
    for caller in 0..8 {
        let (stop, retried, acked) = (stop.clone(), retried.clone(), acked.clone());
        let on_retry = Arc::new(move |_: u32, status: &tonic::Status| {
            let name = if order_client::broke_in_transport(status) {
                "transport".to_owned()
            } else {
                format!("{:?}", status.code())
            };
            *retried.lock().unwrap().entry(name).or_default() += 1;
        });
        let retry = RetryPolicy {
            max_attempts: 100,
            attempt_timeout: Duration::from_secs(2),
            total_timeout: Duration::from_secs(40),
            on_retry: Some(on_retry),
            ..RetryPolicy::default()
        };
        let mut client =
            OrderClient::new(ClientConfig { retry, ..ClientConfig::new(format!("http://{}", app.addr)) })
                .unwrap();
        callers.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = new_key();
                let quantity = format!("{}", caller * 100_000 + n);
                let request = order_service::proto::PlaceOrderRequest {
                    quantity: quantity.clone(),
                    ..limit_order(&key)
                };
                if client.place_order(request).await.is_ok() {
                    acked.lock().unwrap().push((key, quantity, Instant::now()));
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_millis(1500)).await; // load before the failure
    link.hold(true); // the standby stops receiving
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed = Instant::now();
    primary.run("kill");
    standby.run("promote");
    front.repoint(addr_of(&standby_url)).await;
    // Not ready while no writable primary answered; ready again by itself.
    let mut saw_not_serving = false;
    let back = async {
        loop {
            match readiness.next().await {
                ServingStatus::Serving => return,
                _ => saw_not_serving = true,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), back).await.expect("ready again after the failover");
    tokio::time::sleep(Duration::from_millis(1500)).await; // load after it
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    let mut conn = PgConnection::connect(&standby_url).await.unwrap();
    let mut lost = 0;
    let mut wrong_fields = 0;
    for (key, quantity, _) in &acked {
        let stored: Vec<String> = sqlx::query_scalar(
            "select trim_scale(quantity)::text from orders where client_request_id = $1::uuid",
        )
        .bind(key)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        match stored.as_slice() {
            [] => lost += 1,
            [one] if one == quantity => {}
            _ => wrong_fields += 1,
        }
    }
    let duplicates: i64 = sqlx::query_scalar(
        "select count(*) from (select 1 from orders group by account_id, client_request_id having count(*) > 1) d",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let first_new_order = acked.iter().filter(|(_, _, at)| *at > killed).map(|(_, _, at)| *at - killed).min();
    let retried = retried.lock().unwrap().clone();
    standby.run("stop");
    Figures {
        acknowledged: acked.len(),
        lost,
        wrong_fields,
        duplicates,
        first_new_order,
        retried,
        saw_not_serving,
    }
}

/// The promise's configuration: nothing acknowledged is lost or doubled,
/// callers see only retryable codes, readiness follows the switch.
async fn a_synchronous_standby_loses_no_acknowledged_order_at_failover(engine: Engine) {
    assert_eq!(engine, Engine::Postgres);
    let figures = fail_over(true).await;
    println!("failover, synchronous standby: {figures:?}");
    assert!(figures.acknowledged > 100, "load ran: {figures:?}");
    assert_eq!((figures.lost, figures.wrong_fields, figures.duplicates), (0, 0, 0), "{figures:?}");
    assert!(figures.first_new_order.is_some(), "orders are placed after the failover: {figures:?}");
    assert!(figures.saw_not_serving, "not ready while no writable primary answered: {figures:?}");
    for code in figures.retried.keys() {
        let retryable =
            ["Unavailable", "DeadlineExceeded", "Cancelled", "Aborted", "ResourceExhausted", "transport"];
        assert!(retryable.contains(&code.as_str()), "only retryable answers during the switch: {code}");
    }
}

/// The negative control: an asynchronous standby that falls behind loses
/// acknowledged orders, and the test sees it.
async fn an_asynchronous_standby_loses_acknowledged_orders_and_the_test_sees_it(engine: Engine) {
    assert_eq!(engine, Engine::Postgres);
    let figures = fail_over(false).await;
    println!("failover, asynchronous standby (negative control): {figures:?}");
    assert!(figures.lost > 0, "an asynchronous standby held back loses acknowledged orders: {figures:?}");
    assert_eq!((figures.wrong_fields, figures.duplicates), (0, 0), "{figures:?}");
}

postgres_tests!(
    a_synchronous_standby_loses_no_acknowledged_order_at_failover,
    an_asynchronous_standby_loses_acknowledged_orders_and_the_test_sees_it,
);
