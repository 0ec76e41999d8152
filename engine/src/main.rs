//! `taskpods`: the engine server and the operator's CLI.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use taskpods_engine::config::EngineConfig;
use taskpods_engine::server;
use taskpods_engine::topology::TopologyConfig;
use taskpods_events::Names;

#[derive(Parser, Debug)]
#[command(
    name = "taskpods",
    version,
    about = "Ephemeral, sandboxed task pods driven over NATS"
)]
struct Cli {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "TASKPODS_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    nats_url: String,
    /// Subject prefix (streams and buckets are named after it).
    #[arg(
        long,
        env = "TASKPODS_PREFIX",
        default_value = "taskpods",
        global = true
    )]
    prefix: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the engine until Ctrl-C or SIGTERM.
    Serve {
        /// Replicas for streams and buckets (3 on a cluster).
        #[arg(long, env = "TASKPODS_REPLICAS", default_value_t = 1)]
        replicas: usize,
        /// Seconds to keep trying to reach NATS at start-up.
        #[arg(long, default_value_t = 30)]
        connect_timeout_secs: u64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let names = match Names::new(&cli.prefix) {
        Ok(names) => names,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let nats_urls: Vec<String> = cli
        .nats_url
        .split(',')
        .map(|s| s.trim().to_owned())
        .collect();
    match cli.command {
        Command::Serve {
            replicas,
            connect_timeout_secs,
        } => {
            let config = EngineConfig {
                nats_urls,
                connect_timeout: Duration::from_secs(connect_timeout_secs),
                topology: TopologyConfig {
                    names,
                    replicas,
                    ..TopologyConfig::default()
                },
            };
            match server::run(config, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
