//! Floods a hostile caller can send without credentials, each held for a
//! few seconds against the server binary: a kubelet-style probe (a fresh
//! connection, one health Check, a 1 s timeout, every 0.5 s) on the gRPC
//! and the health port is answered every time, an authenticated caller's
//! calls all succeed, the server's memory stays under the ceiling (256 MiB,
//! half the manifests' limit) and comes back near where it started. Each
//! flood prints its row of the table in docs/security.md.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use order_service::proto::{ListOrdersRequest, order_service_client::OrderServiceClient};
use prost::bytes::Bytes;
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::Notify, task::JoinSet};
use tonic::Request;

use crate::helpers::{Engine, TestDatabase, process::ServerProcess, tokens_file};

/// One flood at a time: each measures the server's answers within 1 s on a
/// 2-core machine, which a second flood beside it would not leave alone
/// (scripts/test also runs this module apart, one test at a time).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The memory ceiling under every flood.
const RSS_CEILING_KB: u64 = 256 * 1024;
/// How far above its start memory may stay once a flood has ended (within
/// 10 s): jemalloc gives back what was freed after a second unused, but
/// keeps some (about 7 MiB after the 12,800 Watch streams of
/// `watch_floods_are_bounded_on_both_ports`, where glibc kept 31 MiB); a
/// flood that leaked would keep growing past it.
const RSS_KEPT_KB: u64 = 16 * 1024;
/// How long each flood is held.
const HELD: Duration = Duration::from_secs(4);

/// What one flood did to the server.
#[derive(Debug, Default)]
struct Seen {
    probes_sent: [u32; 2],
    probes_answered: [u32; 2],
    calls: u32,
    calls_failed: u32,
    rss_before_kb: u64,
    rss_peak_kb: u64,
    rss_after_kb: u64,
}

/// A server with a health port, an auth token, and what it needs of each.
struct Target {
    server: ServerProcess,
    health: SocketAddr,
    token: String,
    _dir: tempfile::TempDir,
    _database: Arc<TestDatabase>,
    _alone: tokio::sync::MutexGuard<'static, ()>,
}

impl Target {
    async fn start(extra: &[&str]) -> Target {
        let alone = ONE_AT_A_TIME.lock().await;
        let database = TestDatabase::new(Engine::Sqlite).await;
        let dir = tempfile::tempdir().unwrap();
        let (token, tokens) = tokens_file(dir.path(), "alice");
        let mut args = vec![
            "--database-url",
            &database.url,
            "--auth-tokens-file",
            tokens.to_str().unwrap(),
            "--health-listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let server = ServerProcess::start(&args).await;
        let health = server.health_addr();
        Target { server, health, token, _dir: dir, _database: database, _alone: alone }
    }

    /// Runs `flood` for [`HELD`] beside the probes and the authenticated
    /// caller, then stops it and waits (at most 10 s) for memory to settle.
    async fn under<F, Fut>(&self, name: &str, flood: F) -> Seen
    where
        F: FnOnce(SocketAddr, SocketAddr, Arc<AtomicBool>, Arc<Notify>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut seen = Seen { rss_before_kb: self.server.rss_kb(), ..Seen::default() };
        let stop = Arc::new(AtomicBool::new(false));
        let established = Arc::new(Notify::new());
        let flood = tokio::spawn(flood(self.server.addr, self.health, stop.clone(), established.clone()));
        // Measure once the flood holds what it opened.
        tokio::time::timeout(Duration::from_secs(30), established.notified())
            .await
            .unwrap_or_else(|_| panic!("{name}: the flood took hold within 30 s"));
        let mut caller = OrderServiceClient::new(crate::helpers::channel(self.server.addr).await);
        let started = std::time::Instant::now();
        while started.elapsed() < HELD {
            for (port, addr) in [self.server.addr, self.health].into_iter().enumerate() {
                seen.probes_sent[port] += 1;
                seen.probes_answered[port] += u32::from(probe(addr).await);
            }
            let mut request = Request::new(ListOrdersRequest { page_size: 1, ..Default::default() });
            request.metadata_mut().insert("authorization", format!("Bearer {}", self.token).parse().unwrap());
            request.set_timeout(Duration::from_secs(1));
            seen.calls += 1;
            let answer = tokio::time::timeout(Duration::from_secs(1), caller.list_orders(request)).await;
            if !matches!(answer, Ok(Ok(_))) {
                seen.calls_failed += 1;
                println!("{name}: the authenticated call failed: {answer:?}");
            }
            seen.rss_peak_kb = seen.rss_peak_kb.max(self.server.rss_kb());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        stop.store(true, Ordering::SeqCst);
        flood.abort();
        let _ = flood.await;
        for _ in 0..100 {
            seen.rss_peak_kb = seen.rss_peak_kb.max(self.server.rss_kb());
            seen.rss_after_kb = self.server.rss_kb();
            if seen.rss_after_kb <= seen.rss_before_kb + RSS_KEPT_KB {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "| {name} | {}/{} | {}/{} | {}/{} | {} / {} / {} MiB |",
            seen.probes_answered[0],
            seen.probes_sent[0],
            seen.probes_answered[1],
            seen.probes_sent[1],
            seen.calls_failed,
            seen.calls,
            seen.rss_before_kb / 1024,
            seen.rss_peak_kb / 1024,
            seen.rss_after_kb / 1024,
        );
        seen
    }
}

/// Every probe answered, every authenticated call served, memory bounded
/// and back near its start.
fn assert_unharmed(name: &str, seen: &Seen) {
    assert_eq!(
        seen.probes_answered, seen.probes_sent,
        "{name}: every probe on both ports answered: {seen:?}"
    );
    assert_eq!(seen.calls_failed, 0, "{name}: every authenticated call served: {seen:?}");
    assert!(seen.rss_peak_kb < RSS_CEILING_KB, "{name}: memory under the ceiling: {seen:?}");
    assert!(
        seen.rss_after_kb <= seen.rss_before_kb + RSS_KEPT_KB,
        "{name}: memory back near its start: {seen:?}"
    );
}

/// A kubelet's gRPC probe: a fresh connection, one Check, 1 s for both.
async fn probe(addr: SocketAddr) -> bool {
    let check = async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).ok()?.connect().await.ok()?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.ok()
    };
    matches!(tokio::time::timeout(Duration::from_secs(1), check).await, Ok(Some(_)))
}

/// An HTTP/2 connection (h2, as a hostile client would drive it).
async fn h2_connection(addr: SocketAddr) -> Option<h2::client::SendRequest<Bytes>> {
    let tcp = tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await.ok()?.ok()?;
    let (sender, connection) =
        tokio::time::timeout(Duration::from_millis(500), h2::client::handshake(tcp)).await.ok()?.ok()?;
    tokio::spawn(connection);
    Some(sender)
}

/// A whole gRPC request for `path` with an empty message; the answer's
/// future is returned unread.
fn grpc_request(
    sender: &mut h2::client::SendRequest<Bytes>,
    path: &str,
) -> Option<h2::client::ResponseFuture> {
    let request = tonic::codegen::http::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .ok()?;
    let (response, mut body) = sender.send_request(request, false).ok()?;
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true).ok()?;
    Some(response)
}

/// Connections to one port, each making one whole health Check and then
/// idling: the other port's probes, and this port's, are still answered
/// (the oldest idle give way to newcomers).
// Two threads: the flood must not starve the test's own caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_held_idle_after_a_call_starve_no_probe() {
    let target = Target::start(&["--max-connections", "64", "--health-max-connections", "16"]).await;
    for (name, on_health) in [("idle connections, gRPC port", false), ("idle connections, health port", true)]
    {
        let seen = target
            .under(name, move |grpc, health, stop, established| async move {
                let addr = if on_health { health } else { grpc };
                let mut held = Vec::new();
                while !stop.load(Ordering::SeqCst) && held.len() < 256 {
                    let Some(mut sender) = h2_connection(addr).await else { continue };
                    if let Some(response) = grpc_request(&mut sender, "/grpc.health.v1.Health/Check") {
                        let _ = tokio::time::timeout(Duration::from_millis(500), response).await;
                    }
                    held.push(sender);
                }
                established.notify_one();
                std::future::pending::<()>().await;
            })
            .await;
        assert_unharmed(name, &seen);
    }
    assert!(target.server.metric("orders_connections_evicted_total{reason=\"budget\"}").await > 0.0);
}

/// An HTTP/2 connection whose flow-control window is 0: no answer's body
/// can ever be sent on it, so every call it makes stays open.
async fn h2_zero_window_connection(addr: SocketAddr) -> Option<h2::client::SendRequest<Bytes>> {
    let tcp = tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await.ok()?.ok()?;
    let handshake = h2::client::Builder::new().initial_window_size(0).handshake(tcp);
    let (sender, connection) =
        tokio::time::timeout(Duration::from_millis(500), handshake).await.ok()?.ok()?;
    tokio::spawn(connection);
    Some(sender)
}

/// Calls that never end, without credentials, on every connection a port
/// has: one Watch on each (within the Watch caps), or a Check whose answer
/// a zero flow-control window never lets through. Probes on both ports are
/// still answered: Watches take at most half a listener's connections, and
/// a connection busy with open-service calls only gives way to a newcomer.
// Two threads: the flood must not starve the test's own caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_never_end_starve_no_probe() {
    let target = Target::start(&["--max-connections", "64"]).await;
    for (name, on_health, zero_window) in [
        ("a Watch on every connection, health port", true, false),
        ("a Watch on every connection, gRPC port", false, false),
        ("stuck Checks (zero window), health port", true, true),
        ("stuck Checks (zero window), gRPC port", false, true),
    ] {
        let seen = target
            .under(name, move |grpc, health, stop, established| async move {
                let addr = if on_health { health } else { grpc };
                let (mut senders, mut held) = (Vec::new(), Vec::new());
                while !stop.load(Ordering::SeqCst) && senders.len() < 64 {
                    let connection = if zero_window {
                        h2_zero_window_connection(addr).await
                    } else {
                        h2_connection(addr).await
                    };
                    let Some(mut sender) = connection else { continue };
                    let path = if zero_window {
                        "/grpc.health.v1.Health/Check"
                    } else {
                        "/grpc.health.v1.Health/Watch"
                    };
                    if let Some(response) = grpc_request(&mut sender, path) {
                        // Its headers: the server has the call (a zero
                        // window holds back only the message).
                        if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(2), response).await
                        {
                            held.push(response);
                        }
                    }
                    senders.push(sender);
                }
                established.notify_one();
                std::future::pending::<()>().await;
            })
            .await;
        assert_unharmed(name, &seen);
    }
}

/// PlaceOrders with credentials whose message never ends (a few bytes of
/// it, then nothing), one on every connection the gRPC port has: a
/// half-sent call gives way to a newcomer whoever sent it, so the probes
/// and the authenticated caller are still served.
// Two threads: the flood must not starve the test's own caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_order_calls_starve_no_probe() {
    let target = Target::start(&["--max-connections", "64"]).await;
    let token = target.token.clone();
    let name = "half-sent PlaceOrders with credentials, gRPC port";
    let seen = target
        .under(name, move |grpc, _, stop, established| async move {
            let (mut senders, mut held) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::SeqCst) && senders.len() < 80 {
                let Some(mut sender) = h2_connection(grpc).await else { continue };
                let request =
                    tonic::codegen::http::Request::post("http://localhost/orders.v1.OrderService/PlaceOrder")
                        .header("content-type", "application/grpc")
                        .header("te", "trailers")
                        .header("authorization", format!("Bearer {token}"))
                        .body(())
                        .unwrap();
                if let Ok((response, mut body)) = sender.send_request(request, false) {
                    // A message of 100 bytes, of which 5 are sent.
                    let _ =
                        body.send_data(Bytes::from_static(&[0, 0, 0, 0, 100, 0x0a, 0x24, 0, 0, 0]), false);
                    held.push((response, body));
                }
                senders.push(sender);
            }
            established.notify_one();
            std::future::pending::<()>().await;
        })
        .await;
    assert_unharmed(name, &seen);
}

/// Health Watches, 128 a connection on many connections, on each port:
/// counted against their budgets (the rest refused), memory stays bounded.
// Two threads: the flood must not starve the test's own caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_floods_are_bounded_on_both_ports() {
    let target = Target::start(&[]).await;
    for (name, on_health) in [("watches, gRPC port", false), ("watches, health port", true)] {
        let seen = target
            .under(name, move |grpc, health, stop, established| async move {
                let addr = if on_health { health } else { grpc };
                let (mut senders, mut held) = (Vec::new(), Vec::new());
                for _ in 0..100 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Some(mut sender) = h2_connection(addr).await else { continue };
                    for _ in 0..128 {
                        sender = match sender.clone().ready().await {
                            Ok(ready) => ready,
                            Err(_) => break,
                        };
                        match grpc_request(&mut sender, "/grpc.health.v1.Health/Watch") {
                            Some(response) => held.push(response),
                            None => break,
                        }
                    }
                    senders.push(sender);
                }
                // Established once the server has answered every Watch
                // (most of them refused): what is held from then on.
                let mut open = Vec::new();
                for response in held {
                    if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(5), response).await {
                        open.push(response);
                    }
                }
                established.notify_one();
                let _held = (senders, open);
                std::future::pending::<()>().await;
            })
            .await;
        assert_unharmed(name, &seen);
    }
    assert!(target.server.metric("orders_health_watches_refused_total").await > 0.0, "refusals are counted");
}

/// Calls refused for their credentials, as fast as they can be sent: each
/// is counted, few are logged, and the probes and callers keep being served.
// Two threads: the flood must not starve the test's own caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_are_counted_always_and_logged_at_a_bounded_rate() {
    let target = Target::start(&[]).await;
    let sent = Arc::new(AtomicU32::new(0));
    let counter = sent.clone();
    let seen = target
        .under("refused calls", move |grpc, _, stop, established| async move {
            established.notify_one();
            let mut tasks = JoinSet::new();
            for _ in 0..8 {
                let (stop, counter) = (stop.clone(), counter.clone());
                tasks.spawn(async move {
                    let mut client = OrderServiceClient::new(crate::helpers::channel(grpc).await);
                    while !stop.load(Ordering::SeqCst) {
                        let _ = client.list_orders(ListOrdersRequest::default()).await;
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
            tasks.join_all().await;
        })
        .await;
    assert_unharmed("refused calls", &seen);
    let sent = f64::from(sent.load(Ordering::SeqCst));
    let counted = target
        .server
        .metric(
            "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"orders.v1.OrderService\",\
             grpc_method=\"ListOrders\",grpc_code=\"Unauthenticated\"}",
        )
        .await;
    let logged = target
        .server
        .lines()
        .iter()
        .filter(|line| line.contains("refused a call before reading its message"))
        .count();
    println!("refused calls: {sent} sent, {counted} counted, {logged} logged one by one");
    assert!(counted >= sent - 8.0 && sent > 200.0, "every refused call is counted: {counted} of {sent}");
    // 10 a second, for the few seconds of the flood.
    assert!(logged <= 10 * 8, "refused calls are logged at a bounded rate: {logged}");
}

/// Idle and trickling connections holding the metrics port: a scrape still
/// succeeds (the oldest idle connection gives way).
#[tokio::test]
async fn metrics_are_scraped_while_idle_connections_hold_the_port() {
    let target = Target::start(&[]).await;
    let metrics_addr = target.server.metrics_addr.clone().unwrap();
    let mut held = Vec::new();
    for i in 0..24 {
        let mut stream = TcpStream::connect(&metrics_addr).await.unwrap();
        if i % 2 == 0 {
            // A keep-alive scrape, then idle.
            let request = format!("GET /metrics HTTP/1.1\r\nHost: {metrics_addr}\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
        } else {
            // A request trickling in, one byte so far.
            stream.write_all(b"G").await.unwrap();
        }
        held.push(stream);
    }
    for _ in 0..5 {
        let scrape =
            tokio::time::timeout(Duration::from_secs(2), crate::operations::scrape(&metrics_addr)).await;
        assert!(scrape.is_ok(), "a scrape succeeds while 24 idle connections hold the port");
    }
    drop(held);
}

/// Connections to the metrics port from another address (127.0.0.2),
/// opened as fast as they are closed, each sending a request it never reads
/// the answer to, or one byte of one: a scrape is never the one that gives
/// way (the address holding the most connections gives way first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_while_connections_churn() {
    let target = Target::start(&[]).await;
    let metrics_addr = target.server.metrics_addr.clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut churn = JoinSet::new();
    for task in 0..4 {
        let (addr, stop) = (metrics_addr.clone(), stop.clone());
        churn.spawn(async move {
            let (mut opened, mut _held) = (0u32, None);
            while !stop.load(Ordering::SeqCst) {
                let Ok(mut stream) = connect_from([127, 0, 0, 2], &addr).await else { continue };
                let request = if task % 2 == 0 {
                    format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n")
                } else {
                    "G".to_owned()
                };
                let _ = stream.write_all(request.as_bytes()).await;
                opened += 1;
                // Held until the server closes it, or this task's next one
                // is open: the port stays full of them.
                _held = Some(stream);
                tokio::task::yield_now().await;
            }
            opened
        });
    }
    let (mut scrapes, mut failed) = (0, 0);
    for _ in 0..10 {
        scrapes += 1;
        let answer = tokio::time::timeout(Duration::from_secs(2), try_scrape(&metrics_addr)).await;
        if !matches!(answer, Ok(true)) {
            failed += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let opened: u32 = churn.join_all().await.into_iter().sum();
    println!("metrics under churn: {failed} of {scrapes} scrapes failed beside {opened} connections opened");
    assert!(opened > 100, "the churn took hold: {opened} connections");
    assert_eq!(failed, 0, "every scrape succeeds while connections churn");
}

/// A TCP connection to `addr` from the loopback address `from`.
async fn connect_from(from: [u8; 4], addr: &str) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    socket.connect(addr.parse().map_err(std::io::Error::other)?).await
}

/// One scrape, its whole answer read: whether it was a 200 with a body.
async fn try_scrape(addr: &str) -> bool {
    use tokio::io::AsyncReadExt;
    let Ok(mut stream) = TcpStream::connect(addr).await else { return false };
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut response = Vec::new();
    if stream.read_to_end(&mut response).await.is_err() {
        return false;
    }
    let response = String::from_utf8_lossy(&response);
    response.starts_with("HTTP/1.1 200") && response.contains("\r\n\r\n# ")
}

/// Refused calls carrying a sampled `traceparent` are never sampled from it:
/// under `parentbased_always_off`, only an authenticated caller's sampled
/// parent makes a span.
#[tokio::test]
async fn refused_calls_never_choose_their_sampling() {
    let mut collector = crate::helpers::collector::Collector::start().await;
    let database = TestDatabase::new(Engine::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let (token, tokens) = tokens_file(dir.path(), "alice");
    let endpoint = collector.endpoint();
    let server = ServerProcess::start_with_env(
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_off"),
            ("OTEL_BSP_SCHEDULE_DELAY", "20"),
        ],
        &["--database-url", &database.url, "--auth-tokens-file", tokens.to_str().unwrap()],
    )
    .await;
    let mut client = OrderServiceClient::new(crate::helpers::channel(server.addr).await);
    let refused_trace = "0af7651916cd43dd8448eb211c80319c";
    for _ in 0..20 {
        let mut request = Request::new(ListOrdersRequest::default());
        let parent = format!("00-{refused_trace}-b7ad6b7169203331-01");
        request.metadata_mut().insert("traceparent", parent.parse().unwrap());
        assert!(client.list_orders(request).await.is_err(), "refused without credentials");
    }
    let served_trace = "1af7651916cd43dd8448eb211c80319d";
    let mut request = Request::new(ListOrdersRequest::default());
    request
        .metadata_mut()
        .insert("traceparent", format!("00-{served_trace}-b7ad6b7169203331-01").parse().unwrap());
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    client.list_orders(request).await.expect("served");
    let spans = collector
        .until("the served call's span", |spans| spans.iter().any(|s| s.trace_id() == served_trace))
        .await;
    assert!(
        spans.iter().all(|span| span.trace_id() != refused_trace),
        "no span of a refused call was sampled from its traceparent"
    );
    drop(server);
    collector.stop().await;
}

/// "Rapid reset": streams opened and reset at once, as fast as a few
/// connections take them, each connection opened again whenever the server
/// closes it: reset by the client (HEADERS, then RST_STREAM), or by the
/// server itself (HEADERS with `content-length: 0`, then a DATA frame
/// longer than that), from another address (127.0.0.2). The probes and the
/// authenticated caller are still served, and a caller who gives up on
/// call after call (each resetting its stream) keeps its connection: the
/// flood spends its own address's allowance, not this caller's.
// Two threads: the flood must not starve the test's own caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_resets_are_bounded_on_both_ports() {
    let target = Target::start(&[]).await;
    for (name, on_health, lying) in [
        ("rapid reset, gRPC port", false, false),
        ("rapid reset, health port", true, false),
        ("server-side resets (content-length), gRPC port", false, true),
        ("server-side resets (content-length), health port", true, true),
    ] {
        let reset = Arc::new(AtomicU32::new(0));
        let counter = reset.clone();
        let (cancelled, cut) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let (cancelled_seen, cut_seen) = (cancelled.clone(), cut.clone());
        let seen = target
            .under(name, move |grpc, health, stop, established| async move {
                let addr = if on_health { health } else { grpc };
                established.notify_one();
                let mut tasks = JoinSet::new();
                // The impatient caller, on one connection: health Watches
                // it gives up on as soon as they are answered, each stream
                // reset by its client.
                let (impatient_stop, cancelled, cut) = (stop.clone(), cancelled.clone(), cut.clone());
                tasks.spawn(async move {
                    let Some(mut sender) = h2_connection(addr).await else { return };
                    while !impatient_stop.load(Ordering::SeqCst) {
                        sender = match sender.ready().await {
                            Ok(ready) => ready,
                            Err(_) => {
                                // The server closed the connection.
                                cut.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        };
                        let Some(response) = grpc_request(&mut sender, "/grpc.health.v1.Health/Watch") else {
                            continue;
                        };
                        if let Ok(Ok(answer)) = tokio::time::timeout(Duration::from_secs(1), response).await {
                            // Dropped while open: reset.
                            drop(answer);
                            cancelled.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
                for _ in 0..4 {
                    let (stop, counter) = (stop.clone(), counter.clone());
                    tasks.spawn(async move {
                        while !stop.load(Ordering::SeqCst) {
                            let Ok(tcp) = connect_from([127, 0, 0, 2], &addr.to_string()).await else {
                                continue;
                            };
                            let (mut read, mut write) = tcp.into_split();
                            // Whatever the server sends is read and dropped.
                            let drain = tokio::spawn(async move {
                                let _ = tokio::io::copy(&mut read, &mut tokio::io::sink()).await;
                            });
                            let mut stream_id = 1;
                            let mut opening = PREFACE.to_vec();
                            opening.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
                            let mut sent = write.write_all(&opening).await.is_ok();
                            while sent && !stop.load(Ordering::SeqCst) {
                                let mut frames = Vec::new();
                                for _ in 0..64 {
                                    reset_stream(&mut frames, stream_id, lying);
                                    stream_id += 2;
                                }
                                sent = write.write_all(&frames).await.is_ok();
                                counter.fetch_add(64, Ordering::SeqCst);
                            }
                            drain.abort();
                        }
                    });
                }
                tasks.join_all().await;
            })
            .await;
        let (cancelled, cut) = (cancelled_seen.load(Ordering::SeqCst), cut_seen.load(Ordering::SeqCst));
        println!(
            "{name}: {} streams reset by the flood; the impatient caller's calls: {cancelled} given up \
             on, {cut} cut off",
            reset.load(Ordering::SeqCst)
        );
        assert_unharmed(name, &seen);
        assert!(cancelled > 50, "{name}: the impatient caller gave up on its calls: {cancelled}");
        assert_eq!(
            cut, 0,
            "{name}: the impatient caller's connection is never closed for the flood's resets"
        );
    }
    let evicted = target.server.metric("orders_connections_evicted_total{reason=\"resets\"}").await;
    println!("rapid reset: {evicted} connections closed for their resets");
    assert!(evicted > 0.0, "connections resetting without end are closed");
}

/// What an HTTP/2 client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A HEADERS frame opening a health Check on `stream_id`, then its
/// RST_STREAM (CANCEL), as raw HTTP/2 frames; or, `lying`, a HEADERS frame
/// saying `content-length: 0` and a 5-byte DATA frame, which the server
/// answers by resetting the stream itself.
fn reset_stream(frames: &mut Vec<u8>, stream_id: u32, lying: bool) {
    // HPACK: :method POST, :scheme http, then literals without indexing.
    let mut block = vec![0x83, 0x86];
    for (name_index, value) in [(&[0x04][..], "/grpc.health.v1.Health/Check"), (&[0x01], "localhost")] {
        block.extend_from_slice(name_index);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block.extend_from_slice(&[0x0f, 0x10, 16]);
    block.extend_from_slice(b"application/grpc");
    block.extend_from_slice(&[0x00, 2]);
    block.extend_from_slice(b"te");
    block.push(8);
    block.extend_from_slice(b"trailers");
    if lying {
        // content-length (static table 28): 0.
        block.extend_from_slice(&[0x0f, 0x0d, 1, b'0']);
    }
    let id = stream_id.to_be_bytes();
    let length = (block.len() as u32).to_be_bytes();
    // HEADERS, END_HEADERS.
    frames.extend_from_slice(&[length[1], length[2], length[3], 0x1, 0x4]);
    frames.extend_from_slice(&id);
    frames.extend_from_slice(&block);
    if lying {
        // DATA, END_STREAM: an empty gRPC message, 5 bytes.
        frames.extend_from_slice(&[0, 0, 5, 0x0, 0x1]);
        frames.extend_from_slice(&id);
        frames.extend_from_slice(&[0; 5]);
    } else {
        // RST_STREAM, CANCEL (0x8).
        frames.extend_from_slice(&[0, 0, 4, 0x3, 0]);
        frames.extend_from_slice(&id);
        frames.extend_from_slice(&8u32.to_be_bytes());
    }
}
