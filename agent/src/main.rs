//! `taskpods-agent`: see the library's documentation for its environment and protocol.

use std::process::ExitCode;

use taskpods_agent::{AgentError, Config};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let config = match Config::from_env(|name| std::env::var(name).ok()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("taskpods-agent: configuration: {e}");
            return ExitCode::from(2);
        }
    };
    eprintln!(
        "taskpods-agent {}: task {}",
        taskpods_agent::VERSION,
        config.task
    );
    match taskpods_agent::run(config).await {
        Ok(outcome) => {
            eprintln!("taskpods-agent: done, exit code {}", outcome.exit_code);
            ExitCode::SUCCESS
        }
        Err(AgentError::Stopped(reason)) => {
            eprintln!("taskpods-agent: not running: {reason}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("taskpods-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
