//! The order-service server: parse config, start logging, catch SIGINT and
//! SIGTERM, build, serve until one arrives.

use std::process::ExitCode;

use clap::{Parser, error::ErrorKind};
use order_service::{
    api,
    config::{Command, Config},
    server, telemetry,
};

/// mimalloc rather than glibc's malloc: after a flood of connections or
/// streams ends, glibc kept most of what it had freed (tens of MiB, 158 MiB
/// after 8,000 connections) in its per-thread arenas; mimalloc gives freed
/// pages back to the system within moments, so memory comes back near its
/// start (the floods in tests/api/floods.rs measure it).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(config) => config,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
        Err(e) => {
            // One clear line instead of clap's usage block.
            let rendered = e.render().to_string();
            eprintln!("{}", rendered.lines().next().unwrap_or("error: invalid arguments"));
            return ExitCode::from(2);
        }
    };
    if let Some(Command::CheckTokens { file }) = &config.command {
        return match api::check_token_file(file) {
            Ok(tokens) => {
                println!("{}: {tokens} tokens, no problems", file.display());
                ExitCode::SUCCESS
            }
            Err(problems) => {
                for problem in problems {
                    eprintln!("{}: {problem}", file.display());
                }
                ExitCode::from(1)
            }
        };
    }
    if let Some(Command::HashToken { account }) = &config.command {
        return match api::new_token(account) {
            Ok((token, line)) => {
                println!("# The token, for the caller (shown once; the server keeps only its hash):");
                println!("{token}");
                println!("# The line for --auth-tokens-file (the server reloads it within seconds):");
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::from(2)
            }
        };
    }
    if let Some(Command::BenchStore(bench)) = &config.command {
        return match order_service::bench::run(bench).await {
            Ok(report) => {
                report.print(bench.json);
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let tracing = match telemetry::init(config.log_format) {
        Ok(tracing) => tracing,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(2);
        }
    };
    let result = async {
        // Caught from here on: a signal during start-up stops the process
        // cleanly instead of killing it, and a second one is never missed.
        let mut signals = server::ShutdownSignals::install()?;
        let app = tokio::select! {
            app = server::Application::build(config) => app?,
            () = signals.recv() => {
                tracing::info!("stopped before serving");
                return Ok(());
            }
        };
        app.run(async move {
            signals.recv().await;
            // A second signal while draining means "now".
            tokio::spawn(async move {
                signals.recv().await;
                tracing::warn!("second signal: exiting at once");
                telemetry::flush_logs();
                std::process::exit(1);
            });
        })
        .await
    }
    .await;
    if let Some(tracing) = tracing {
        // What the calls of the last seconds traced, within the grace the
        // collector gets (an unreachable one costs at most this at exit).
        let _ =
            tokio::task::spawn_blocking(move || tracing.shutdown(std::time::Duration::from_secs(5))).await;
    }
    // The lines still waiting are written before the process exits.
    telemetry::flush_logs();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
