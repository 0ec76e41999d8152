//! The task agent, built alongside the integration tests (`CARGO_BIN_EXE_taskpods-agent-under-test`).

fn main() -> std::process::ExitCode {
    taskpods_agent::main()
}
