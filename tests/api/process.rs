//! The server binary as an operator runs it, on a free loopback port, with
//! its JSON log lines readable by the test.

use std::{net::SocketAddr, process::Stdio};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};

/// The server binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_order-service");

/// A running server process.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    logs: mpsc::UnboundedReceiver<serde_json::Value>,
}

impl ServerProcess {
    /// Starts the binary with `args` (plus a free port and JSON logs) and
    /// returns once it logs the address it listens on.
    pub async fn start(args: &[&str]) -> ServerProcess {
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the server binary");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, mut logs) = mpsc::unbounded_channel();
        // Keep draining the logs so the server never blocks on a full pipe.
        tokio::spawn(async move {
            loop {
                let Ok(Some(line)) = lines.next_line().await else { break };
                let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        let addr = loop {
            let event = logs.recv().await.expect("the server exited before listening");
            if event["message"] == "listening" {
                break event["addr"].as_str().unwrap().parse().unwrap();
            }
        };
        ServerProcess { child, addr, logs }
    }

    /// Waits (at most 30 s) for the next log event whose message starts
    /// with `prefix`.
    pub async fn log(&mut self, prefix: &str) -> serde_json::Value {
        let wait = async {
            loop {
                let Some(event) = self.logs.recv().await else {
                    panic!("the server exited before logging {prefix:?}");
                };
                if event["message"].as_str().is_some_and(|m| m.starts_with(prefix)) {
                    return event;
                }
            }
        };
        match tokio::time::timeout(std::time::Duration::from_secs(30), wait).await {
            Ok(event) => event,
            Err(_) => panic!("the server did not log {prefix:?} within 30 s"),
        }
    }

    /// Sends the process a signal (`TERM`, `HUP`, …).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok =
            std::process::Command::new("kill").args([&format!("-{name}"), &pid]).status().unwrap().success();
        assert!(ok, "kill -{name} {pid}");
    }
}
