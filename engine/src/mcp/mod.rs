//! `taskpods mcp`: a Model Context Protocol server over stdio, so a model can launch and watch tasks
//! through tools (`launch_task`, `get_task`, `task_output`, `cancel_task`, `list_tasks`).
//!
//! - this module: the JSON-RPC 2.0 side of the protocol (newline-delimited messages on stdin and stdout,
//!   `initialize`, `ping`, `tools/list`, `tools/call`), requests served concurrently up to a bound;
//! - [`tools`]: what each tool does, on top of the Rust client (`taskpods_client`);
//! - [`http`]: the same messages over streamable HTTP (`taskpods mcp --http`), loopback and bearer token.
//!
//! Tool failures a model can act on (an invalid launch, an unknown task; [`tools::ToolError`]) are tool
//! results with `isError`; only protocol misuse (unknown method, unknown tool, malformed arguments) is a
//! JSON-RPC error.

pub mod http;
pub mod tools;

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

pub use tools::{McpConfig, Tools};

/// The protocol revisions this server speaks, newest first; a client asking for one of them gets it.
pub const PROTOCOL_VERSIONS: [&str; 4] = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

/// JSON-RPC error codes used here.
mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
}

/// Errors of the stdio loop.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// Reading stdin failed (the host went away).
    #[error("reading stdin: {0}")]
    Io(#[source] std::io::Error),
}

/// A JSON-RPC error answer: code and message.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// The JSON-RPC error code.
    pub code: i64,
    /// What was wrong, for the host's log.
    pub message: String,
}

impl RpcError {
    /// Arguments the method cannot use.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self {
            code: code::INVALID_PARAMS,
            message: message.into(),
        }
    }
}

/// Serves MCP: reads messages from `lines` (one JSON-RPC message or batch per line) until they end (the
/// host closed stdin), and hands every answer to `replies` (the caller writes each as one line). At most
/// `config.max_concurrent_calls` requests are served at once; a call waiting for its task does not hold
/// up `ping`, `tools/list` or other calls. Returns once every request in flight has been answered.
pub async fn serve(
    tools: Tools,
    mut lines: mpsc::Receiver<std::io::Result<String>>,
    replies: mpsc::Sender<Value>,
) -> Result<(), McpError> {
    let tools = Arc::new(tools);
    let slots = tools.config().max_concurrent_calls.max(1);
    let permits = Arc::new(Semaphore::new(slots));
    while let Some(line) = lines.recv().await {
        let line = line.map_err(McpError::Io)?;
        if line.trim().is_empty() {
            continue;
        }
        let message: Value = match serde_json::from_str(&line) {
            Ok(message) => message,
            Err(e) => {
                let _ = replies
                    .send(error(
                        Value::Null,
                        code::PARSE_ERROR,
                        format!("not JSON: {e}"),
                    ))
                    .await;
                continue;
            }
        };
        let batch = match message {
            Value::Array(items) => items,
            single => vec![single],
        };
        for message in batch {
            let tools = tools.clone();
            let replies = replies.clone();
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            tokio::spawn(async move {
                if let Some(reply) = handle(&tools, message).await {
                    let _ = replies.send(reply).await;
                }
                drop(permit);
            });
        }
    }
    // Every slot free again: every call in flight has answered.
    let _ = permits
        .acquire_many(u32::try_from(slots).unwrap_or(u32::MAX))
        .await;
    Ok(())
}

fn error(id: Value, code: i64, message: String) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// Answers one JSON-RPC message (`None` for a notification).
pub async fn handle(tools: &Tools, message: Value) -> Option<Value> {
    let id = message.get("id").cloned();
    let Some(method) = message.get("method").and_then(Value::as_str) else {
        // A response to something we never asked, or not a request at all.
        return id.map(|id| {
            error(
                id,
                code::INVALID_REQUEST,
                "expected a JSON-RPC request with a method".into(),
            )
        });
    };
    let params = message.get("params").cloned().unwrap_or(Value::Null);
    // Notifications (no id) get no answer: `notifications/initialized`, `notifications/cancelled`, …
    let id = id?;
    let result = match method {
        "initialize" => Ok(initialize(&params)),
        "ping" => Ok(json!({})),
        "tools/list" => Ok(json!({"tools": tools::list()})),
        "tools/call" => tools.call(&params).await,
        other => Err(RpcError {
            code: code::METHOD_NOT_FOUND,
            message: format!("method {other:?} is not supported (this server offers tools only)"),
        }),
    };
    Some(match result {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(e) => error(id, e.code, e.message),
    })
}

fn initialize(params: &Value) -> Value {
    let asked = params.get("protocolVersion").and_then(Value::as_str);
    let version = asked
        .filter(|v| PROTOCOL_VERSIONS.contains(v))
        .unwrap_or(PROTOCOL_VERSIONS[0]);
    json!({
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": false}},
        "serverInfo": {"name": "taskpods", "version": env!("CARGO_PKG_VERSION")},
        "instructions": tools::INSTRUCTIONS,
    })
}
