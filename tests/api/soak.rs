//! Soak: a mixed load on the server binary (new orders, duplicates, replays,
//! gets, lists, cancels) answers nothing but what each call should get, and
//! the server's memory stays flat. 10 seconds by default; the full run is
//! `ORDERS_SOAK_SECS=60 scripts/test soak -- --nocapture`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use order_service::proto::{
    CancelOrderRequest, GetOrderRequest, ListOrdersRequest, OrderStatus, PlaceOrderRequest,
    get_order_request::Lookup, order_service_client::OrderServiceClient,
};
use tonic::Request;

use crate::{
    helpers::process::ServerProcess,
    helpers::{Engine, TestDatabase, channel, engine_tests, limit_order, new_key, random_below},
};

const CALLERS: usize = 8;

fn soak_duration() -> Duration {
    let secs = std::env::var("ORDERS_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    Duration::from_secs(secs)
}

/// `message` with a deadline.
fn deadline<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(Duration::from_secs(10));
    request
}

/// Orders placed so far: the request sent and the order id it got.
type Placed = Arc<Mutex<Vec<(PlaceOrderRequest, String)>>>;

/// What the callers did, by operation and outcome.
type Tally = Arc<Mutex<BTreeMap<(&'static str, String), u64>>>;

async fn one_call(
    client: &mut OrderServiceClient<tonic::transport::Channel>,
    placed: &Placed,
) -> (&'static str, Result<(), String>) {
    let pick = |placed: &Placed, recent: bool| {
        let placed = placed.lock().unwrap();
        if placed.is_empty() {
            return None;
        }
        let window = if recent { placed.len().min(20) } else { placed.len() };
        Some(placed[placed.len() - 1 - random_below(window)].clone())
    };
    let op = match random_below(100) {
        0..50 => "new",
        50..60 => "duplicate",
        60..70 => "replay",
        70..80 => "get",
        80..90 => "list",
        _ => "cancel",
    };
    let target = match op {
        "duplicate" | "cancel" => pick(placed, true),
        "replay" | "get" => pick(placed, false),
        _ => None,
    };
    // Nothing placed yet to act on: place something.
    let op = if target.is_none() && op != "list" { "new" } else { op };
    let outcome = match (op, target) {
        ("list", _) => list_two_pages(client).await,
        (_, None) => {
            let request = limit_order(&new_key());
            match client.place_order(deadline(request.clone())).await {
                Ok(resp) => {
                    let order = resp.into_inner().order.unwrap();
                    placed.lock().unwrap().push((request, order.order_id));
                    Ok(())
                }
                Err(status) => Err(format!("{:?}", status.code())),
            }
        }
        ("duplicate" | "replay", Some((request, order_id))) => {
            match client.place_order(deadline(request)).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    if resp.replayed && resp.order.unwrap().order_id == order_id {
                        Ok(())
                    } else {
                        Err("not the order placed before".to_owned())
                    }
                }
                Err(status) => Err(format!("{:?}", status.code())),
            }
        }
        ("get", Some((request, order_id))) => {
            let lookup = if random_below(2) == 0 {
                Lookup::OrderId(order_id.clone())
            } else {
                Lookup::ClientRequestId(request.client_request_id)
            };
            match client.get_order(deadline(GetOrderRequest { lookup: Some(lookup) })).await {
                Ok(order) if order.get_ref().order_id == order_id => Ok(()),
                Ok(_) => Err("another order".to_owned()),
                Err(status) => Err(format!("{:?}", status.code())),
            }
        }
        (_, Some((_, order_id))) => {
            let cancel = CancelOrderRequest { order_id };
            match client.cancel_order(deadline(cancel)).await {
                Ok(order) if order.get_ref().status == OrderStatus::Canceled as i32 => Ok(()),
                Ok(_) => Err("not cancelled".to_owned()),
                Err(status) => Err(format!("{:?}", status.code())),
            }
        }
    };
    (op, outcome)
}

/// Lists the first page of orders and, if there is one, the next.
async fn list_two_pages(client: &mut OrderServiceClient<tonic::transport::Channel>) -> Result<(), String> {
    let code = |status: tonic::Status| format!("{:?}", status.code());
    let first = ListOrdersRequest { page_size: 20, ..Default::default() };
    let token = client.list_orders(deadline(first)).await.map_err(code)?.into_inner().next_page_token;
    if !token.is_empty() {
        let next = ListOrdersRequest { page_size: 20, page_token: token, ..Default::default() };
        client.list_orders(deadline(next)).await.map_err(code)?;
    }
    Ok(())
}

async fn a_mixed_load_gets_only_expected_answers_and_memory_stays_flat(engine: Engine) {
    let database = TestDatabase::new(engine).await;
    let server = ServerProcess::start(&["--database-url", &database.url]).await;
    let channel = channel(server.addr).await;
    let placed: Placed = Arc::default();
    let tally: Tally = Arc::default();
    let duration = soak_duration();
    let started = Instant::now();
    // Memory once warmed up (a fifth of the way), taken by the first caller
    // past that point, and at the end.
    let server = Arc::new(server);
    let rss_warm = Arc::new(std::sync::OnceLock::new());
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (mut client, placed, tally) =
                (OrderServiceClient::new(channel.clone()), placed.clone(), tally.clone());
            let (rss_warm, server) = (rss_warm.clone(), server.clone());
            tokio::spawn(async move {
                while started.elapsed() < duration {
                    if started.elapsed() >= duration / 5 {
                        rss_warm.get_or_init(|| server.rss_kb());
                    }
                    let (op, outcome) = one_call(&mut client, &placed).await;
                    let outcome = outcome.err().unwrap_or_else(|| "OK".to_owned());
                    *tally.lock().unwrap().entry((op, outcome)).or_default() += 1;
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    let rss_end = server.rss_kb();
    let rss_warm = *rss_warm.get().expect("sampled a fifth of the way");
    let tally = tally.lock().unwrap().clone();
    let calls: u64 = tally.values().sum();
    println!(
        "soak ({engine:?}, {duration:?}): {calls} calls, {} orders; RSS {rss_warm} kB warm, {rss_end} kB at the end; {tally:?}",
        placed.lock().unwrap().len()
    );
    let unexpected: Vec<_> = tally.iter().filter(|((_, outcome), _)| outcome != "OK").collect();
    assert!(unexpected.is_empty(), "answers other than the expected ones: {unexpected:?}");
    assert!(rss_end < rss_warm + 32 * 1024, "RSS grew from {rss_warm} kB to {rss_end} kB");
}

engine_tests!(a_mixed_load_gets_only_expected_answers_and_memory_stays_flat);
