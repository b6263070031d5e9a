//! Hostile wire input: malformed protobuf, unknown enum numbers (huge
//! strings are in `validation` and `security`), and floods of connections opened and abandoned. Each gets a clear
//! error or is closed, nothing is written, memory stays bounded, and
//! well-behaved callers keep being served.

use std::time::Duration;

use order_client::{ClientConfig, OrderClient};
use order_service::proto::PlaceOrderRequest;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tonic::{Code, Request, codegen::http::uri::PathAndQuery};
use tonic_types::StatusExt;

use crate::{
    helpers::process::ServerProcess,
    helpers::{
        Engine, RawCodec, TestDatabase, channel, closed_by_server, engine_tests, limit_order, new_key,
        raw_h2, read_until_closed, spawn_app, tokens_file,
    },
};

async fn malformed_messages_and_unknown_enums_get_clear_errors_and_write_nothing(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let mut raw = tonic::client::Grpc::new(channel(app.addr).await);
    let malformed: [&[u8]; 5] = [
        b"\xff\xff\xff",             // a varint that never ends
        b"\x0a\x05ab",               // a string shorter than its length
        b"\x08\x96\x01",             // client_request_id as a varint
        b"\x0a\x80\x80\x80\x80\x10", // a length of 4 GiB
        b"\x3a\x02\x08\x01",         // time_in_force as bytes
    ];
    for bytes in malformed {
        raw.ready().await.unwrap();
        let path = PathAndQuery::from_static("/orders.v1.OrderService/PlaceOrder");
        let status = raw.unary(Request::new(bytes.to_vec()), path, RawCodec).await.expect_err("malformed");
        assert_eq!(status.code(), Code::InvalidArgument, "{bytes:?}: {status:?}");
        assert!(status.message().starts_with("failed to decode Protobuf message"), "{status:?}");
    }

    // Enum numbers no version of the API defines.
    let mut req = limit_order(&new_key());
    req.side = 99;
    req.order_type = -7;
    req.time_in_force = 1234;
    let status = app.client.place_order(req).await.expect_err("unknown enums");
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields: Vec<String> = status
        .get_error_details()
        .bad_request()
        .expect("BadRequest")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(fields, ["side", "order_type", "time_in_force"]);

    // Bodies that are not gRPC messages at all: a frame flagged compressed
    // (no compression is served), a body cut short, no message.
    let mut frame = vec![1u8];
    frame.extend_from_slice(&4u32.to_be_bytes());
    frame.extend_from_slice(b"\x0a\x02ab");
    let mut short = vec![0u8];
    short.extend_from_slice(&100u32.to_be_bytes());
    short.extend_from_slice(b"\x0a\x02ab");
    for (name, body) in [("compressed flag", frame), ("cut short", short), ("no message", Vec::new())] {
        let (status, message) = raw_grpc(app.addr, "/orders.v1.OrderService/PlaceOrder", body).await;
        assert_eq!(status, "3", "{name}: INVALID_ARGUMENT ({message}), not INTERNAL");
    }

    // Huge strings: validation::a_huge_field_is_refused_without_echoing_it_whole
    // (within the message limit) and security::an_oversized_request_is_refused_and_the_server_keeps_serving
    // (past it).

    assert_eq!(app.count("orders").await, 0, "nothing written");
    assert_eq!(app.count("idempotency_keys").await, 0);
    assert!(!app.place(limit_order(&new_key())).await.replayed, "and good calls are served");
}

engine_tests!(malformed_messages_and_unknown_enums_get_clear_errors_and_write_nothing);

/// Sends `body` as it is, as the whole request body of a gRPC call to `path`
/// on a fresh HTTP/2 connection; the `grpc-status` and `grpc-message` of the
/// answer (from its headers or its trailers).
async fn raw_grpc(addr: std::net::SocketAddr, path: &str, body: Vec<u8>) -> (String, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut sender = sender.ready().await.unwrap();
    let request = tonic::codegen::http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut stream) = sender.send_request(request, false).unwrap();
    stream.send_data(body.into(), true).unwrap();
    let response = response.await.unwrap();
    let pick = |headers: &tonic::codegen::http::HeaderMap| {
        let get = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("").to_owned());
        get("grpc-status").map(|status| (status, get("grpc-message").unwrap_or_default()))
    };
    if let Some(found) = pick(response.headers()) {
        return found;
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        let _ = data.unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    pick(&trailers).expect("a grpc-status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_abandoned_connections_is_closed_and_good_callers_are_served() {
    let database = TestDatabase::new(Engine::Sqlite).await;
    let server = ServerProcess::start(&["--database-url", &database.url, "--handshake-timeout", "1s"]).await;
    let mut client = OrderClient::new(ClientConfig::new(format!("http://{}", server.addr))).unwrap();
    let place = async |client: &mut OrderClient, n: usize| {
        for _ in 0..n {
            let req = PlaceOrderRequest { client_request_id: String::new(), ..limit_order("") };
            let placed = client.place_order(req).await.expect("a well-behaved caller is served");
            assert_eq!(placed.attempts, 1, "served at the first attempt");
        }
    };
    place(&mut client, 50).await;
    let (rss_before, fds_before) = (server.rss_kb(), server.open_fds());

    // Connections that say nothing, start a handshake and stall, or send
    // garbage; all left open by the client.
    let mut flood = Vec::new();
    for i in 0..300 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        match i % 3 {
            0 => {}
            1 => stream.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap(),
            _ => stream.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(64)).await.unwrap(),
        }
        flood.push(stream);
    }
    // Meanwhile, calls are served as before.
    place(&mut client, 50).await;
    let during = server.open_fds();
    let waits: Vec<_> = flood.into_iter().map(|s| tokio::spawn(closed_by_server(s))).collect();
    let mut closed = 0;
    for wait in waits {
        closed += usize::from(wait.await.unwrap());
    }
    assert_eq!(closed, 300, "every abandoned connection is closed by the server");

    // Connections opened and dropped at once.
    for _ in 0..1_000 {
        drop(TcpStream::connect(server.addr).await.unwrap());
    }
    place(&mut client, 50).await;

    // The server may still be reading the last dropped connections' EOFs:
    // wait (bounded) for its descriptors to come back down.
    let settled = async {
        while server.open_fds() > fds_before + 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), settled).await;
    let (rss_after, fds_after) = (server.rss_kb(), server.open_fds());
    println!(
        "connection flood: RSS {rss_before} kB before, {rss_after} kB after; \
         open fds {fds_before} before, {during} during, {fds_after} after"
    );
    assert!(fds_after <= fds_before + 5, "connections left open: {fds_before} fds before, {fds_after} after");
    assert!(rss_after < rss_before + 32 * 1024, "RSS grew from {rss_before} kB to {rss_after} kB");
}

/// Holds `n` connections to `addr` that finish the HTTP/2 handshake and
/// then stay idle; those the server closes (or could not accept) are
/// dropped. Returns the ones still open.
async fn idle_connections(
    addr: std::net::SocketAddr,
    n: usize,
) -> Vec<h2::client::SendRequest<prost::bytes::Bytes>> {
    let mut open = Vec::new();
    for _ in 0..n {
        let Ok(Ok(tcp)) = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        else {
            continue;
        };
        let handshake = tokio::time::timeout(Duration::from_millis(200), h2::client::handshake(tcp)).await;
        if let Ok(Ok((sender, connection))) = handshake {
            tokio::spawn(connection);
            open.push(sender);
        }
    }
    open
}

/// Health `Check` on `client`, which must answer within a second.
async fn healthy_within_a_second(
    client: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
    when: &str,
) {
    let check = client.check(tonic_health::pb::HealthCheckRequest { service: String::new() });
    let answer = tokio::time::timeout(Duration::from_secs(1), check).await;
    assert!(matches!(answer, Ok(Ok(_))), "health {when}: {answer:?}");
}

/// More idle connections than `--max-connections` allows (sized from a
/// 128-descriptor limit): the oldest idle ones give way to newcomers
/// (GOAWAY, closed, counted), health answers throughout on a connection already open and
/// within a second on a new one once the flood stops, and the CPU stays low.
#[tokio::test]
async fn connections_over_the_cap_give_way_and_are_counted() {
    let database = TestDatabase::new(Engine::Sqlite).await;
    let server = ServerProcess::start_with_nofile(128, &["--database-url", &database.url]).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(server.addr).await);
    healthy_within_a_second(&mut health, "before the flood").await;
    let cpu_before = server.cpu_ticks();
    let flood = idle_connections(server.addr, 300).await;
    healthy_within_a_second(&mut health, "during the flood, on an open connection").await;
    let cpu_during = server.cpu_ticks() - cpu_before;
    let fds_during = server.open_fds();
    drop(flood);
    let mut fresh = tonic_health::pb::health_client::HealthClient::new(channel(server.addr).await);
    healthy_within_a_second(&mut fresh, "after the flood, on a new connection").await;
    let evicted = server.metric("orders_connections_evicted_total{reason=\"budget\"}").await;
    println!(
        "over the cap: 300 idle connections, {evicted} let go for newcomers and counted, {fds_during} \
         descriptors open, {cpu_during} CPU ticks"
    );
    assert!(fds_during < 128, "the cap held: {fds_during} descriptors open");
    assert!(evicted > 0.0, "the idle connections that gave way are counted");
    assert!(cpu_during < 300, "no spinning: {cpu_during} ticks of CPU");
}

/// Out of descriptors (a 128-descriptor limit and a cap above it): failed
/// accepts back off instead of spinning, are counted, and health answers on
/// a connection already open, and on a new one once the flood stops.
#[tokio::test]
async fn out_of_descriptors_accepts_back_off_and_health_still_answers() {
    let database = TestDatabase::new(Engine::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let (token, tokens) = tokens_file(dir.path(), "alice");
    let server = ServerProcess::start_with_nofile(
        128,
        &[
            "--database-url",
            &database.url,
            "--max-connections",
            "1000",
            "--auth-tokens-file",
            tokens.to_str().unwrap(),
        ],
    )
    .await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(server.addr).await);
    let mut orders =
        order_service::proto::order_service_client::OrderServiceClient::new(channel(server.addr).await);
    // Both connections make a request first: one that never has is closed
    // after --handshake-timeout, and could not be opened again here.
    healthy_within_a_second(&mut health, "before the flood").await;
    let mut request = Request::new(limit_order(&new_key()));
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    orders.place_order(request).await.expect("served before the flood");
    let flood = idle_connections(server.addr, 300).await;
    // Hold the flood for three seconds of the server's life (the tokens file
    // is polled every 2), then measure.
    let cpu_before = server.cpu_ticks();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        healthy_within_a_second(&mut health, "out of descriptors, on an open connection").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Running out of descriptors is not a revocation: the token still works.
    let mut request = Request::new(limit_order(&new_key()));
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let answer = orders.place_order(request).await;
    assert!(
        !matches!(&answer, Err(status) if status.code() == Code::Unauthenticated),
        "a passing fault revoked the token: {answer:?}"
    );
    let cpu = server.cpu_ticks() - cpu_before;
    drop(flood);
    let settled = async {
        loop {
            let Ok(metrics_addr) = server.metrics_addr.clone().ok_or(()) else { return };
            if tokio::net::TcpStream::connect(&metrics_addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), settled).await.expect("descriptors come back");
    let mut fresh = tonic_health::pb::health_client::HealthClient::new(channel(server.addr).await);
    healthy_within_a_second(&mut fresh, "after the flood, on a new connection").await;
    let errors = server.metric("orders_accept_errors_total").await;
    println!("out of descriptors: {errors} failed accepts counted, {cpu} CPU ticks in 3 s");
    assert!(errors > 0.0, "failed accepts are counted");
    assert!(cpu < 150, "no spinning: {cpu} ticks of CPU in 3 s (a spinning core is 300)");
}

/// Every listener (gRPC, plain-text health, metrics) closes within
/// `--handshake-timeout` a connection that is silent or sends half a
/// request; the HTTP/2 ones also one that connects and never asks (told
/// GOAWAY first) and one that stalls in a later request's header block; the
/// metrics one also a keep-alive connection idle after its response. Each
/// is counted by stage.
#[tokio::test]
async fn every_listener_closes_connections_slow_or_silent_before_their_request_headers() {
    let database = TestDatabase::new(Engine::Sqlite).await;
    let server = ServerProcess::start(&[
        "--database-url",
        &database.url,
        "--handshake-timeout",
        "1s",
        "--health-listen",
        "127.0.0.1:0",
    ])
    .await;
    let health = server.health_addr();
    let metrics: std::net::SocketAddr = server.metrics_addr.clone().unwrap().parse().unwrap();
    for (name, addr) in [("health", health), ("metrics", metrics), ("gRPC", server.addr)] {
        let silent = TcpStream::connect(addr).await.unwrap();
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /metr").await.unwrap();
        assert!(closed_by_server(silent).await, "{name}: a silent connection is closed");
        assert!(closed_by_server(half).await, "{name}: a half-sent request is closed");
    }
    for (name, addr) in [("health", health), ("gRPC", server.addr)] {
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(&raw_h2::opening()).await.unwrap();
        let sent = read_until_closed(idle).await;
        let sent = sent.unwrap_or_else(|| panic!("{name}: a connection that never asks is closed"));
        assert_eq!(raw_h2::goaways(&sent), [(0, 0)], "{name}: told GOAWAY (last stream 0, NO_ERROR) first");

        let mut stalled = TcpStream::connect(addr).await.unwrap();
        let bytes = [raw_h2::opening_and_request(), raw_h2::stalled_headers()].concat();
        stalled.write_all(&bytes).await.unwrap();
        assert!(closed_by_server(stalled).await, "{name}: a header block stalled after a request is closed");
    }
    let mut kept = TcpStream::connect(metrics).await.unwrap();
    kept.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let sent = read_until_closed(kept).await.expect("metrics: a keep-alive connection idle is closed");
    assert!(sent.starts_with(b"HTTP/1.1 200"), "metrics: the request was answered first");
    // Blank lines alone are no request: hyper skips them and waits on.
    let mut blank = TcpStream::connect(metrics).await.unwrap();
    blank.write_all(b"\r\n\r\n\n\n").await.unwrap();
    assert!(closed_by_server(blank).await, "metrics: a connection sending blank lines alone is closed");
    // HTTP/2 to the metrics listener (h2c): refused at once, nothing served.
    let mut h2c = TcpStream::connect(metrics).await.unwrap();
    h2c.write_all(&raw_h2::opening_and_request()).await.unwrap();
    let sent = read_until_closed(h2c).await.expect("metrics: an HTTP/2 connection is closed");
    assert!(sent.is_empty(), "metrics: nothing is served over HTTP/2: {sent:?}");

    let first = server.metric("orders_connections_timed_out_total{stage=\"first_request\"}").await;
    let next = server.metric("orders_connections_timed_out_total{stage=\"next_request\"}").await;
    let protocol = server.metric("orders_connections_refused_total{reason=\"protocol\"}").await;
    // Half a request on an HTTP/2 listener is a bad preface: hyper closes it
    // at once, uncounted here.
    assert_eq!((first, next), (7.0, 3.0), "closes counted by stage (first request, next request)");
    assert_eq!(protocol, 1.0, "the HTTP/2 connection to the metrics listener is counted");
}

/// A peer that sends and never reads stops the server's reads too (its
/// writes back up): it is closed within `--handshake-timeout` all the same,
/// before its first request and after one. (It was held for good: the
/// deadline was looked at only when a read waited.)
#[tokio::test]
async fn a_peer_that_never_reads_is_closed() {
    let database = TestDatabase::new(Engine::Sqlite).await;
    let server = ServerProcess::start(&["--database-url", &database.url, "--handshake-timeout", "1s"]).await;
    for (stage, opening) in
        [("first_request", raw_h2::opening()), ("stalled_write", raw_h2::opening_and_request())]
    {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let (_unread, mut writer) = socket.connect(server.addr).await.unwrap().into_split();
        // Each PING asks for a PING ACK that is never read.
        let pings = raw_h2::frame(0x6, 0, 0, &[0; 8]).repeat(4096);
        let flood = tokio::spawn(async move {
            let _ = writer.write_all(&opening).await;
            while writer.write_all(&pings).await.is_ok() {}
        });
        let sample = format!("orders_connections_timed_out_total{{stage=\"{stage}\"}}");
        let closed = async {
            while server.metric(&sample).await < 1.0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let closed = tokio::time::timeout(Duration::from_secs(20), closed).await;
        flood.abort();
        assert!(closed.is_ok(), "{stage}: a peer that never reads is closed and counted");
    }
}

/// The plain-text health listener has the HTTP/2 bounds of the gRPC one
/// (it had none: unbounded streams, 1 MiB windows): the same SETTINGS.
#[tokio::test]
async fn the_health_listener_has_the_http2_bounds_of_the_grpc_listener() {
    let database = TestDatabase::new(Engine::Sqlite).await;
    let server =
        ServerProcess::start(&["--database-url", &database.url, "--health-listen", "127.0.0.1:0"]).await;
    let settings = async |addr| {
        use tokio::io::AsyncReadExt;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&raw_h2::opening()).await.unwrap();
        let mut header = [0u8; 9];
        stream.read_exact(&mut header).await.unwrap();
        assert_eq!(header[3], 0x4, "the server's first frame is its SETTINGS");
        let mut payload = vec![0u8; u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize];
        stream.read_exact(&mut payload).await.unwrap();
        payload
            .chunks(6)
            .map(|s| (u16::from_be_bytes([s[0], s[1]]), u32::from_be_bytes([s[2], s[3], s[4], s[5]])))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let grpc = settings(server.addr).await;
    let health = settings(server.health_addr()).await;
    assert_eq!(health, grpc, "the same SETTINGS on both listeners");
    assert_eq!(health.get(&0x3), Some(&128), "at most 128 streams a connection");
    assert_eq!(health.get(&0x4), Some(&65_536), "a 64 KiB stream window");
}

/// A client that connects early and idles past `--handshake-timeout` before
/// its first call is told GOAWAY, and its call is served on a new
/// connection, at the first attempt.
#[tokio::test]
async fn a_client_that_connects_early_and_idles_is_served() {
    let database = TestDatabase::new(Engine::Sqlite).await;
    let server = ServerProcess::start(&["--database-url", &database.url, "--handshake-timeout", "1s"]).await;
    let mut orders =
        order_service::proto::order_service_client::OrderServiceClient::new(channel(server.addr).await);
    let told = async {
        while server.metric("orders_connections_timed_out_total{stage=\"first_request\"}").await < 1.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(15), told).await.expect("the idle connection is closed");
    orders.place_order(limit_order(&new_key())).await.expect("served at the first attempt");
}

/// At `--max-connection-age` the server sends GOAWAY and lets the calls in
/// flight finish: a call waiting (for the SQLite lock) across the age, and
/// across what used to be the grace after it, completes. (With a grace set,
/// tonic sent no GOAWAY and cut the connection at age + grace.)
#[tokio::test]
async fn max_connection_age_lets_the_calls_in_flight_finish() {
    let database = TestDatabase::new(Engine::Sqlite).await;
    let server = ServerProcess::start(&[
        "--database-url",
        &database.url,
        "--max-connection-age",
        "1s",
        "--shutdown-grace",
        "500ms",
    ])
    .await;
    let mut client =
        order_service::proto::order_service_client::OrderServiceClient::new(channel(server.addr).await);
    client.place_order(limit_order(&new_key())).await.expect("the database is ready");
    let pool = sqlx::SqlitePool::connect(&database.url).await.unwrap();
    let mut holder = pool.acquire().await.unwrap();
    sqlx::raw_sql("begin immediate").execute(&mut *holder).await.unwrap();
    let mut client =
        order_service::proto::order_service_client::OrderServiceClient::new(channel(server.addr).await);
    let call = tokio::spawn(async move {
        let mut request = Request::new(limit_order(&new_key()));
        request.set_timeout(Duration::from_secs(10));
        client.place_order(request).await
    });
    // Past the connection's age (1 s) and the old grace after it (0.5 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    sqlx::raw_sql("rollback").execute(&mut *holder).await.unwrap();
    let answer = call.await.unwrap();
    assert!(answer.is_ok(), "the call in flight at the connection's age finished: {answer:?}");
}

/// Idle scrapers on the metrics endpoint (HTTP keep-alive) hold slots of
/// its own small cap, never the gRPC listener's: a new order call is still
/// served while 100 of them sit idle.
#[tokio::test]
async fn idle_metrics_connections_never_take_the_grpc_listeners_slots() {
    let database = TestDatabase::new(Engine::Sqlite).await;
    let server = ServerProcess::start_with_nofile(128, &["--database-url", &database.url]).await;
    let metrics: std::net::SocketAddr = server.metrics_addr.clone().unwrap().parse().unwrap();
    let mut idle = Vec::new();
    for _ in 0..100 {
        let mut stream = TcpStream::connect(metrics).await.unwrap();
        let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        idle.push(stream);
    }
    let mut client =
        order_service::proto::order_service_client::OrderServiceClient::new(channel(server.addr).await);
    client.place_order(limit_order(&new_key())).await.expect("the gRPC listener still has room");
    drop(idle);
}
