//! The published gRPC service config (`deploy/grpc-service-config.json`)
//! is enough for a caller in another language: a Python grpcio channel with
//! it, and no retry loop of its own, places every order exactly once
//! through a server killed (SIGKILL) and restarted twice.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::{Db, ServerProcess};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Starts the Python caller (`tests/python/place_with_service_config.py`)
/// placing `n` orders at `listen` with the service config at `config`, its
/// stubs generated into `dir` from the repository's proto by grpcio-tools
/// (scripts/test installs grpcio and grpcio-tools when missing).
async fn python_caller(
    dir: &std::path::Path,
    listen: &str,
    n: usize,
    config: &std::path::Path,
) -> (tokio::process::Child, tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) {
    let stubs = dir.join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let generated = tokio::process::Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I", &format!("{ROOT}/proto")])
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(format!("{ROOT}/proto/orders/v1/orders.proto"))
        .output()
        .await
        .expect("python3 with grpcio-tools (scripts/test installs it)");
    assert!(generated.status.success(), "{}", String::from_utf8_lossy(&generated.stderr));
    let mut caller = tokio::process::Command::new("python3")
        .arg(format!("{ROOT}/tests/python/place_with_service_config.py"))
        .args([listen, &n.to_string()])
        .arg(config)
        .arg(&stubs)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(caller.stdout.take().unwrap()).lines();
    (caller, lines)
}

#[tokio::test]
async fn a_grpcio_caller_with_only_the_service_config_places_each_order_once_through_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("orders.db").display());
    let args = ["--database-url", url.as_str(), "--shutdown-delay", "0s"];
    let mut server = ServerProcess::start(&args).await;
    let listen = server.addr.to_string();

    let n = 60;
    let config = format!("{ROOT}/deploy/grpc-service-config.json");
    let (mut caller, mut lines) = python_caller(dir.path(), &listen, n, config.as_ref()).await;
    let mut placed = Vec::new();
    let mut restarts = 0;
    while let Some(line) = lines.next_line().await.unwrap() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[0], "placed", "every order is acknowledged: {line}");
        placed.push((fields[1].to_owned(), fields[2].to_owned()));
        // Mid-run, twice: kill the server outright and start it again on
        // the same port and file; the channel waits and retries by itself.
        if placed.len() == n / 3 || placed.len() == 2 * n / 3 {
            server.kill().await;
            server = ServerProcess::start_at(&listen, &args).await;
            restarts += 1;
        }
    }
    assert!(caller.wait().await.unwrap().success());
    assert_eq!((placed.len(), restarts), (n, 2));

    let db = Db::connect(&url).await;
    assert_eq!(db.scalar("select count(*) from orders").await, n as i64, "one order per key, no duplicate");
    let mut ids: Vec<&str> = placed.iter().map(|(_, id)| id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "each acknowledgement names its own order");
}

/// The control: the same caller with an empty service config loses calls
/// to the restart (they fail `UNAVAILABLE`), so the published config is
/// what carried the first test through.
#[tokio::test]
async fn without_the_service_config_the_same_caller_loses_calls_to_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("orders.db").display());
    let args = ["--database-url", url.as_str(), "--shutdown-delay", "0s"];
    let mut server = ServerProcess::start(&args).await;
    let listen = server.addr.to_string();
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "{}").unwrap();
    let (mut caller, mut lines) = python_caller(dir.path(), &listen, 40, &empty).await;
    let (mut seen, mut failed) = (0, 0);
    while let Some(line) = lines.next_line().await.unwrap() {
        seen += 1;
        failed += usize::from(line.starts_with("failed"));
        if seen == 10 {
            server.kill().await;
            server = ServerProcess::start_at(&listen, &args).await;
        }
    }
    assert!(!caller.wait().await.unwrap().success());
    assert!(failed > 0, "without retries a call fails across the restart");
    drop(server);
}
