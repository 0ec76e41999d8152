//! `taskpods mcp`: the Model Context Protocol server on stdin/stdout (see [`crate::mcp`]), for an MCP host
//! (a desktop assistant, an agent framework) to give its model the taskpods tools; with `--http ADDR`, the
//! same over streamable HTTP on loopback, callers holding the bearer token in `TASKPODS_MCP_TOKEN`.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::process::ExitCode;

use crate::cli::Global;
use crate::mcp::{self, McpConfig, Tools, http::HttpServer};

/// Arguments of `taskpods mcp`.
#[derive(clap::Args, Debug)]
pub struct McpArgs {
    /// Recorded as the requester of every task launched through this server.
    #[arg(long, env = "TASKPODS_MCP_REQUESTER", default_value = "mcp")]
    pub requester: String,
    /// A label added to every task launched through this server (`key=value`, repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Prefix for the idempotency keys the model gives (e.g. the conversation id).
    #[arg(long, env = "TASKPODS_MCP_KEY_PREFIX")]
    pub key_prefix: Option<String>,
    /// Serve MCP over streamable HTTP on this loopback address (`127.0.0.1:8765`; port 0 picks one)
    /// instead of stdio, at `/mcp`. Callers send `Authorization: Bearer $TASKPODS_MCP_TOKEN`.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<std::net::SocketAddr>,
}

/// The environment variable holding the bearer token of `--http` (never a flag: `ps` shows flags).
pub const TOKEN_ENV: &str = "TASKPODS_MCP_TOKEN";

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not key=value"))
}

/// Serves MCP until the host closes stdin.
pub async fn run(global: Global, args: McpArgs) -> ExitCode {
    let nats = match global.connect().await {
        Ok(nats) => nats,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = McpConfig {
        requester: Some(args.requester),
        labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        key_prefix: args.key_prefix,
        ..McpConfig::default()
    };
    let tools = Tools::new(nats, global.names, config);
    if let Some(addr) = args.http {
        return serve_http(addr, tools).await;
    }
    // Blocking threads for stdin and stdout: a host reads one JSON message per line, flushed at once.
    let (lines_in, lines) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if lines_in.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let (replies, mut replies_out) = tokio::sync::mpsc::channel::<serde_json::Value>(64);
    let writer = std::thread::spawn(move || {
        let mut stdout = std::io::stdout().lock();
        while let Some(reply) = replies_out.blocking_recv() {
            // serde_json writes no raw newline inside a value: one message, one line.
            if writeln!(stdout, "{reply}")
                .and_then(|()| stdout.flush())
                .is_err()
            {
                break;
            }
        }
    });
    let served = mcp::serve(tools, lines, replies).await;
    let _ = writer.join();
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves MCP over HTTP on `addr` until SIGINT or SIGTERM.
async fn serve_http(addr: std::net::SocketAddr, tools: Tools) -> ExitCode {
    let token = std::env::var(TOKEN_ENV).unwrap_or_default();
    let server = match HttpServer::bind(addr, token, tools).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match server.local_addr() {
        Ok(bound) => eprintln!(
            "taskpods mcp: serving MCP on http://{bound}{} (Authorization: Bearer ${TOKEN_ENV})",
            mcp::http::PATH
        ),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    match server.serve(crate::cli::serve::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
