//! The task agent: the program inside a task pod (or, on the local backend, the engine's child process).
//!
//! 1. Reads its configuration from the environment ([`Config::from_env`]).
//! 2. Asks `<p>.agent.<task>.hello` for its instructions (request/reply), retrying with backoff until its
//!    deadline: the engine may be restarting, or may not have recorded the Job yet (`Wait`).
//! 3. Downloads the task's inputs into `/tmp/in` through the engine ([`files`]); an input that cannot be
//!    provided ends the task (`input_missing`, `input_too_large`, …) before any code runs.
//! 4. Runs the script under `/bin/sh` (mode `script`) or hands the goal to the configured entrypoint (mode
//!    `agent`), inside bubblewrap when `TASKPODS_SANDBOX=bwrap` ([`sandbox`]).
//! 5. Streams stdout and stderr as ordered, acked chunks to `<p>.log.<task>` ([`output`]), relays progress
//!    lines (`::progress:: 40% message`) to `<p>.cmd.agent.<task>.progress`, and publishes heartbeats on
//!    core NATS `<p>.agent.<task>.heartbeat`.
//! 6. When the code exits (or on SIGTERM, or past its deadline plus a grace period: then it kills the
//!    code), it flushes the output, writes the end marker, uploads what the code left in `/tmp/out`
//!    (within the task's caps, never following symlinks), and publishes the result, listing the
//!    artifacts, to
//!    `<p>.cmd.agent.<task>.result` with `Nats-Msg-Id: <task>:result`.
//!
//! 7. It always ends ([`lifetime`]): at the latest at its deadline plus its kill and report graces
//!    (whether or not NATS or its engine still answer), and within its kill grace after a SIGTERM.
//!
//! Environment:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `TASKPODS_TASK_ID` | required | the task |
//! | `TASKPODS_NATS_URL` | `nats://127.0.0.1:4222` | NATS server URL(s), comma-separated |
//! | `TASKPODS_NATS_CREDS` | none | a NATS credentials file (the task's own identity); `-`: read once from standard input (the local backend) |
//! | `TASKPODS_PREFIX` | `taskpods` | subject prefix |
//! | `TASKPODS_DEADLINE` | now + 30 min | RFC 3339; the agent stops asking for instructions after it |
//! | `TASKPODS_SANDBOX` | `bwrap` | `bwrap` (local backend) or `none` (the pod is the sandbox) |
//! | `TASKPODS_TMP_BYTES` | 64 MiB | size of the sandbox's private `/tmp` |
//! | `TASKPODS_MAX_PROCS` | 256 | `RLIMIT_NPROC` for the user's code |
//! | `TASKPODS_MAX_FILE_BYTES` | 64 MiB | `RLIMIT_FSIZE` for the user's code |
//! | `TASKPODS_CPU_SECS` | the task's timeout | `RLIMIT_CPU` for the user's code |
//! | `TASKPODS_MEMORY_BYTES` | none | the task's memory limit: `RLIMIT_AS` for the user's code (bubblewrap) |
//! | `TASKPODS_AGENT_ENTRYPOINT` | `/usr/local/bin/taskpods-goal` | what mode `agent` runs with the goal |
//! | `TASKPODS_CHUNK_BYTES` | 64 KiB | largest output chunk |
//! | `TASKPODS_FLUSH_MS` | 200 | longest time output waits before it is sent |
//! | `TASKPODS_KILL_GRACE_MS` | 5000 | how long past the deadline the agent itself kills the code (the engine's timer acts first) |
//! | `TASKPODS_REPORT_GRACE_MS` | 30000 | how long past the deadline plus kill grace the agent keeps trying to report before it exits |
//! | `TASKPODS_TERM_GRACE_MS` | 2000 | on SIGTERM: how long the code gets between the forwarded SIGTERM and SIGKILL |
//! | `TASKPODS_FILES_DIR` | `$TMPDIR` (no sandbox) or `$TMPDIR/taskpods-files-<task>` (bubblewrap) | where `in/` and `out/` live on the agent's side |
//! | `TASKPODS_ENV_FILE` | `/etc/taskpods/agent.env` if it exists | `NAME=value` lines (a mounted file) for any variable above not set in the environment |
//!
//! Layout: [`config`] (the environment above), [`protocol`] (connect, hello, acked reports, message ids),
//! [`lifetime`] (the bounds that make the agent end), [`run`] (one task end to end), [`output`] (output chunks), [`sandbox`] (bubblewrap and limits), [`files`]
//! (inputs in, artifacts out).

pub mod config;
pub mod files;
pub mod lifetime;
pub mod output;
pub mod protocol;
pub mod run;
pub mod sandbox;
pub mod seccomp;

use async_nats::jetstream::context::PublishError;
use taskpods_events::codec::CodecError;

pub use config::{Config, ConfigError, DEFAULT_ENV_FILE, env_file, parse_env_file};
pub use lifetime::{Lifetime, supervise};
pub use protocol::{HelloFailure, connect, hello, progress_msg_id, result_msg_id};
pub use run::{code_env, run};
pub use sandbox::SpawnError;

/// The agent's version, reported in its hello.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The agent's whole program: configuration from the environment, run, exit code (2: bad configuration,
/// 1: could not run or report, 0 otherwise, whatever the code's own exit code).
pub fn main() -> std::process::ExitCode {
    use std::process::ExitCode;
    let file = match env_file(std::env::var_os("TASKPODS_ENV_FILE").map(Into::into)) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("taskpods-agent: configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let lookup = |name: &str| std::env::var(name).ok().or_else(|| file.get(name).cloned());
    let config = match Config::from_env(lookup).and_then(Config::read_credentials) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("taskpods-agent: configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("taskpods-agent: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("taskpods-agent {VERSION}: task {}", config.task);
    match runtime.block_on(supervise(&config, |lifetime| run(config.clone(), lifetime))) {
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

/// Why the agent stopped without running anything, or could not report.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The NATS credentials are not usable.
    #[error("cannot reach NATS: credentials: {0}")]
    Credentials(#[source] std::io::Error),
    /// None of the configured NATS URLs parses.
    #[error("cannot reach NATS: no valid NATS URL")]
    NoUrl,
    /// Connecting failed with no time left to retry before the deadline.
    #[error("cannot reach NATS: {0}")]
    Connect(#[source] async_nats::ConnectError),
    /// The deadline passed while connecting.
    #[error("cannot reach NATS: deadline passed")]
    ConnectDeadline,
    /// The hello could not be encoded.
    #[error("no instructions before the deadline: {0}")]
    EncodeHello(#[source] CodecError),
    /// No instructions before the deadline; the last attempt's failure.
    #[error("no instructions before the deadline: {0}")]
    NoInstructions(#[source] HelloFailure),
    /// The engine said not to run (task ended or cancelling); its reason.
    #[error("the engine said stop: {0}")]
    Stopped(String),
    /// The code could not be started.
    #[error("cannot start the code: {0}")]
    Spawn(#[source] SpawnError),
    /// The result could not be encoded.
    #[error("cannot report the result: {0}")]
    EncodeResult(#[source] CodecError),
    /// The result was not acknowledged before the agent gave up.
    #[error("cannot report the result: {0}")]
    Report(#[source] PublishError),
    /// The agent's own bound passed (deadline plus graces, or the flush after a SIGTERM): it ended
    /// the code and stopped, reported or not ([`lifetime`]).
    #[error("gave up: {0}")]
    GaveUp(&'static str),
}
