//! `taskpods ui`: the web UI and JSON API alone, against any NATS (an operator can run it outside the
//! cluster, with `--creds` of the `operator` identity: read-only plus cancel); the same server
//! `taskpods serve` runs as one of its loops. [`UiArgs`] are shared by both.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cli::Global;
use crate::cli::serve::shutdown_signal;
use crate::http::{HttpConfig, HttpServer};

/// Where the UI listens and whom it lets in (shared by `serve` and `ui`).
#[derive(clap::Args, Debug, Clone)]
pub struct UiArgs {
    /// Address of the web UI and JSON API; anything but loopback needs a token.
    #[arg(long, env = "TASKPODS_UI_BIND", default_value = "127.0.0.1:8080")]
    pub ui_bind: SocketAddr,
    /// A bearer token that may read the UI and API.
    #[arg(long, env = "TASKPODS_UI_TOKEN", hide_env_values = true)]
    pub ui_token: Option<String>,
    /// A bearer token that may read and cancel tasks.
    #[arg(long, env = "TASKPODS_UI_OPERATOR_TOKEN", hide_env_values = true)]
    pub ui_operator_token: Option<String>,
    /// Nobody may cancel from the UI without the operator token (on loopback without tokens, the local
    /// user may by default).
    #[arg(long, env = "TASKPODS_UI_READ_ONLY")]
    pub ui_read_only: bool,
}

impl UiArgs {
    /// The server settings these arguments ask for.
    pub fn config(&self) -> HttpConfig {
        HttpConfig {
            bind: self.ui_bind,
            read_token: self.ui_token.clone(),
            operator_token: self.ui_operator_token.clone(),
            read_only: self.ui_read_only,
            ..HttpConfig::default()
        }
    }
}

/// Arguments of `taskpods ui`.
#[derive(clap::Args, Debug)]
pub struct UiCommandArgs {
    #[command(flatten)]
    pub ui: UiArgs,
    /// Seconds to keep trying to reach NATS at start-up.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout_secs: u64,
}

/// Runs `taskpods ui` until Ctrl-C or SIGTERM.
pub async fn run(global: Global, args: UiCommandArgs) -> ExitCode {
    let nats = match crate::server::connect_as(
        &global.nats_urls,
        global.creds.as_deref(),
        Duration::from_secs(args.connect_timeout_secs),
    )
    .await
    {
        Ok(nats) => nats,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match HttpServer::bind(args.ui.config()).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("error: {}", crate::server::error_chain_text(&e));
            return ExitCode::FAILURE;
        }
    };
    println!("taskpods web UI: {}", server.url());
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.cancel();
    });
    match server.run(nats, global.names, None, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::server::error_chain_text(&e));
            ExitCode::FAILURE
        }
    }
}
