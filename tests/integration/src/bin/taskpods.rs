//! The `taskpods` binary (engine and CLI), built alongside the integration tests
//! (`CARGO_BIN_EXE_taskpods-under-test`): the node simulator runs it for the engine's image.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    taskpods_engine::cli::app::main().await
}
