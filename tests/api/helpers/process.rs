//! The server binary as an operator runs it, on a free loopback port, with
//! its JSON log lines readable by the test.

use std::{
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};

/// The server binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_order-service");

/// `orderctl`, built beside the server binary by `cargo test --workspace`
/// (as `scripts/test` runs it).
pub fn orderctl() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/api-… → target/<profile>/orderctl
    let path = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>").join("orderctl");
    assert!(
        path.exists(),
        "{} is missing: run the suite with `cargo test --workspace` (scripts/test does)",
        path.display()
    );
    path
}

/// A fresh bearer token for `account` and the `--auth-tokens-file` in
/// `dir` that grants it.
pub fn tokens_file(dir: &std::path::Path, account: &str) -> (String, std::path::PathBuf) {
    let (token, line) = order_service::api::new_token(account).unwrap();
    let path = dir.join("tokens");
    std::fs::write(&path, format!("{line}\n")).unwrap();
    (token, path)
}

/// A running server process.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// Where `GET /metrics` is served, if the server logged it.
    pub metrics_addr: Option<String>,
    logs: mpsc::UnboundedReceiver<serde_json::Value>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl ServerProcess {
    /// Starts the binary with `args` (plus a free port and JSON logs) and
    /// returns once it logs the address it listens on.
    pub async fn start(args: &[&str]) -> ServerProcess {
        Self::start_at("127.0.0.1:0", args).await
    }

    /// As [`ServerProcess::start`], listening on `listen` (a restart on the
    /// port an earlier process had).
    pub async fn start_at(listen: &str, args: &[&str]) -> ServerProcess {
        Self::spawn(Command::new(BIN), listen, args).await
    }

    /// As [`ServerProcess::start`], with the environment variables `env`
    /// set (the OpenTelemetry settings, say).
    pub async fn start_with_env(env: &[(&str, &str)], args: &[&str]) -> ServerProcess {
        let mut command = Command::new(BIN);
        command.envs(env.iter().copied());
        Self::spawn(command, "127.0.0.1:0", args).await
    }

    /// As [`ServerProcess::start`], with at most `nofile` open descriptors
    /// (`prlimit`, which then runs the server in its own place).
    pub async fn start_with_nofile(nofile: u64, args: &[&str]) -> ServerProcess {
        let mut command = Command::new("prlimit");
        command.arg(format!("--nofile={nofile}:{nofile}")).arg("--").arg(BIN);
        Self::spawn(command, "127.0.0.1:0", args).await
    }

    async fn spawn(mut command: Command, listen: &str, args: &[&str]) -> ServerProcess {
        let mut child = command
            .args(["--listen", listen, "--log-format", "json", "--metrics-listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the server binary");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, mut logs) = mpsc::unbounded_channel();
        let raw = Arc::new(Mutex::new(Vec::new()));
        let kept = raw.clone();
        // Keep draining the logs so the server never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                // A line that is not JSON stays in `lines` for the test to see.
                let event = serde_json::from_str(&line).unwrap_or(serde_json::Value::Null);
                kept.lock().unwrap().push(line);
                let _ = tx.send(event);
            }
        });
        let mut metrics_addr = None;
        let addr = loop {
            let event = logs.recv().await.expect("the server exited before listening");
            if event["message"] == "metrics listening" {
                metrics_addr = event["addr"].as_str().map(str::to_owned);
            }
            if event["message"] == "listening" {
                break event["addr"].as_str().unwrap().parse().unwrap();
            }
        };
        ServerProcess { child, addr, metrics_addr, logs, lines: raw }
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

    /// The address of the `--health-listen` listener.
    pub fn health_addr(&self) -> SocketAddr {
        // Logged before "listening", which the start waited for.
        self.lines()
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|event| event["message"] == "health listening")
            .and_then(|event| event["addr"].as_str()?.parse().ok())
            .expect("the health listener's address (start with --health-listen)")
    }

    /// Every line the server has written to stdout so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Kills the process with SIGKILL, as the kernel's OOM killer or a lost
    /// node would, and waits for it to be gone.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("SIGKILL the server");
    }

    /// The process's resident memory, in kB.
    pub fn rss_kb(&self) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Waits (at most 10 s, scraping every 20 ms) until the sample reaches
    /// `at_least`, and returns its value.
    pub async fn until_metric(&self, sample: &str, at_least: f64) -> f64 {
        for _ in 0..500 {
            let value = self.metric(sample).await;
            if value >= at_least {
                return value;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("{sample} did not reach {at_least} within 10 s");
    }

    /// The value of the first sample on the metrics endpoint whose line
    /// starts with `sample` (a name, with labels if any), or 0.
    pub async fn metric(&self, sample: &str) -> f64 {
        let metrics = crate::operations::scrape(self.metrics_addr.as_deref().expect("metrics are on")).await;
        metrics
            .lines()
            .find(|line| line.starts_with(sample))
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// CPU time the process has used (user and system), in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let pid = self.child.id().expect("running");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// How many file descriptors the process has open.
    pub fn open_fds(&self) -> usize {
        let pid = self.child.id().expect("running");
        std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
    }

    /// Sends the process a signal (`TERM`, `HUP`, …).
    pub fn signal(&self, name: &str) {
        send_signal(&self.child, name);
    }
}

/// Sends the signal `name` (`TERM`, `HUP`, …) to a running `child`.
pub fn send_signal(child: &Child, name: &str) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill").args([&format!("-{name}"), &pid]).status().unwrap().success();
    assert!(ok, "kill -{name} {pid}");
}
