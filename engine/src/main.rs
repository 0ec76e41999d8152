//! `taskpods`: the engine server and the operator's CLI (`taskpods_engine::cli::app`).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    taskpods_engine::cli::app::main().await
}
