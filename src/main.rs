//! The order-service server: parse config, start logging, build, serve until
//! SIGINT or SIGTERM.

use std::process::ExitCode;

use clap::{Parser, error::ErrorKind};
use order_service::{
    api,
    config::{Command, Config},
    startup, telemetry,
};

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
    if let Some(Command::HashToken { account }) = &config.command {
        return match api::new_token(account) {
            Ok((token, line)) => {
                println!("# The token, for the caller (shown once; the server keeps only its hash):");
                println!("{token}");
                println!("# The line for --auth-tokens-file (then send the server SIGHUP):");
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::from(2)
            }
        };
    }
    telemetry::init(config.log_format);
    let result = async {
        let app = startup::Application::build(config).await?;
        app.run(async {
            startup::shutdown_signal().await;
            // A second signal while draining means "now".
            tokio::spawn(async {
                startup::shutdown_signal().await;
                tracing::warn!("second signal: exiting at once");
                std::process::exit(1);
            });
        })
        .await
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
