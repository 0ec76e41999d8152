//! The task agent: the program inside a task pod (or, on the local backend, the engine's child process).
//!
//! 1. Reads its configuration from the environment ([`Config::from_env`]).
//! 2. Asks `<p>.agent.<task>.hello` for its instructions (request/reply), retrying with backoff until its
//!    deadline: the engine may be restarting, or may not have recorded the Job yet (`Wait`).
//! 3. Runs the script under `/bin/sh` (mode `script`) or hands the goal to the configured entrypoint (mode
//!    `agent`), inside bubblewrap when `TASKPODS_SANDBOX=bwrap` ([`sandbox`]).
//! 4. Streams stdout and stderr as ordered, acked chunks to `<p>.log.<task>` ([`output`]), relays progress
//!    lines (`::progress:: 40% message`) to `<p>.cmd.agent.<task>.progress`, and publishes heartbeats on
//!    core NATS `<p>.agent.<task>.heartbeat`.
//! 5. When the code exits (or on SIGTERM, or past its deadline plus a grace period: then it kills the
//!    code), it flushes the output, writes the end marker, and publishes the result to
//!    `<p>.cmd.agent.<task>.result` with `Nats-Msg-Id: <task>:result`.
//!
//! Environment:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `TASKPODS_TASK_ID` | required | the task |
//! | `TASKPODS_NATS_URL` | `nats://127.0.0.1:4222` | NATS server URL(s), comma-separated |
//! | `TASKPODS_NATS_CREDS` | none | a NATS credentials file (scoped to the task's subjects) |
//! | `TASKPODS_PREFIX` | `taskpods` | subject prefix |
//! | `TASKPODS_DEADLINE` | now + 30 min | RFC 3339; the agent stops asking for instructions after it |
//! | `TASKPODS_SANDBOX` | `bwrap` | `bwrap` (local backend) or `none` (the pod is the sandbox) |
//! | `TASKPODS_TMP_BYTES` | 64 MiB | size of the sandbox's private `/tmp` |
//! | `TASKPODS_MAX_PROCS` | 256 | `RLIMIT_NPROC` for the user's code |
//! | `TASKPODS_MAX_FILE_BYTES` | 64 MiB | `RLIMIT_FSIZE` for the user's code |
//! | `TASKPODS_CPU_SECS` | the task's timeout | `RLIMIT_CPU` for the user's code |
//! | `TASKPODS_AGENT_ENTRYPOINT` | `/usr/local/bin/taskpods-goal` | what mode `agent` runs with the goal |
//! | `TASKPODS_CHUNK_BYTES` | 64 KiB | largest output chunk |
//! | `TASKPODS_FLUSH_MS` | 200 | longest time output waits before it is sent |
//! | `TASKPODS_KILL_GRACE_MS` | 5000 | how long past the deadline the agent itself kills the code (the engine's timer acts first) |
//! | `TASKPODS_TERM_GRACE_MS` | 2000 | on SIGTERM: how long the code gets between the forwarded SIGTERM and SIGKILL |
//! | `TASKPODS_ENV_FILE` | `/etc/taskpods/agent.env` if it exists | `NAME=value` lines (a mounted file) for any variable above not set in the environment |

pub mod output;
pub mod sandbox;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use chrono::{DateTime, Utc};
use taskpods_events::codec::{self, HEADER_CONTENT_TYPE, HEADER_MSG_ID, MSGPACK};
use taskpods_events::{
    AgentReport, Encoding, HelloReply, Instructions, Names, TaskId, TaskOutcome,
};
use tokio::sync::mpsc;

use crate::output::{OutputStats, Progress};
use crate::sandbox::{Sandbox, SandboxLimits};

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
    let config = match Config::from_env(lookup) {
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
    match runtime.block_on(run(config)) {
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

/// The default configuration file (e.g. a mounted Secret in the task pod).
pub const DEFAULT_ENV_FILE: &str = "/etc/taskpods/agent.env";

/// Reads `NAME=value` lines (blank lines and `#` comments skipped) from `path`, or from
/// [`DEFAULT_ENV_FILE`] when it exists and no path is given.
pub fn env_file(path: Option<std::path::PathBuf>) -> Result<BTreeMap<String, String>, ConfigError> {
    let (path, required) = match path {
        Some(path) => (path, true),
        None => (std::path::PathBuf::from(DEFAULT_ENV_FILE), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(BTreeMap::new());
        }
        Err(e) => return Err(ConfigError(format!("{}: {e}", path.display()))),
    };
    parse_env_file(&text)
        .map_err(|line| ConfigError(format!("{}: line {line} is not NAME=value", path.display())))
}

/// Parses `NAME=value` lines; the error is the 1-based number of the first bad line.
pub fn parse_env_file(text: &str) -> Result<BTreeMap<String, String>, usize> {
    let mut vars = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line.split_once('=').ok_or(i + 1)?;
        let name = name.trim();
        if name.is_empty() {
            return Err(i + 1);
        }
        vars.insert(name.to_owned(), value.trim().to_owned());
    }
    Ok(vars)
}

/// Everything the agent reads from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// The task.
    pub task: TaskId,
    /// NATS URLs.
    pub nats_urls: Vec<String>,
    /// Credentials file, if any.
    pub nats_creds: Option<std::path::PathBuf>,
    /// Subject names.
    pub names: Names,
    /// Stop asking for instructions after this.
    pub deadline: DateTime<Utc>,
    /// How the code is isolated.
    pub sandbox: Sandbox,
    /// Limits for the code.
    pub limits: SandboxLimits,
    /// What mode `agent` runs.
    pub agent_entrypoint: String,
    /// Largest output chunk, bytes.
    pub chunk_bytes: usize,
    /// Longest an output byte waits before it is sent.
    pub flush_interval: Duration,
    /// How long past the deadline the agent kills the code itself.
    pub kill_grace: Duration,
    /// How long the code gets between the forwarded SIGTERM and SIGKILL.
    pub term_grace: Duration,
}

/// A configuration problem.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads the configuration through `var` (the process environment in `main`).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let err = |name: &str, what: &str| ConfigError(format!("{name}: {what}"));
        let num = |name: &str, default: u64| -> Result<u64, ConfigError> {
            match var(name) {
                None => Ok(default),
                Some(v) => v.trim().parse().map_err(|_| err(name, "not a number")),
            }
        };
        let task = var("TASKPODS_TASK_ID")
            .ok_or_else(|| err("TASKPODS_TASK_ID", "is required"))?
            .parse::<TaskId>()
            .map_err(|_| err("TASKPODS_TASK_ID", "not a UUID"))?;
        let nats_urls = var("TASKPODS_NATS_URL")
            .unwrap_or_else(|| "nats://127.0.0.1:4222".into())
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let names = Names::new(&var("TASKPODS_PREFIX").unwrap_or_else(|| "taskpods".into()))
            .map_err(|e| err("TASKPODS_PREFIX", &e.to_string()))?;
        let deadline = match var("TASKPODS_DEADLINE") {
            None => Utc::now() + chrono::TimeDelta::minutes(30),
            Some(v) => DateTime::parse_from_rfc3339(v.trim())
                .map_err(|_| err("TASKPODS_DEADLINE", "not an RFC 3339 time"))?
                .with_timezone(&Utc),
        };
        let sandbox = match var("TASKPODS_SANDBOX").as_deref().unwrap_or("bwrap") {
            "bwrap" => Sandbox::Bwrap,
            "none" => Sandbox::None,
            other => {
                return Err(err(
                    "TASKPODS_SANDBOX",
                    &format!("{other:?}: use bwrap or none"),
                ));
            }
        };
        let limits = SandboxLimits {
            tmp_bytes: num("TASKPODS_TMP_BYTES", 64 << 20)?,
            max_procs: num("TASKPODS_MAX_PROCS", 256)?,
            max_file_bytes: num("TASKPODS_MAX_FILE_BYTES", 64 << 20)?,
            cpu_secs: var("TASKPODS_CPU_SECS")
                .map(|v| {
                    v.trim()
                        .parse()
                        .map_err(|_| err("TASKPODS_CPU_SECS", "not a number"))
                })
                .transpose()?,
        };
        Ok(Self {
            task,
            nats_urls,
            nats_creds: var("TASKPODS_NATS_CREDS").map(Into::into),
            names,
            deadline,
            sandbox,
            limits,
            agent_entrypoint: var("TASKPODS_AGENT_ENTRYPOINT")
                .unwrap_or_else(|| "/usr/local/bin/taskpods-goal".into()),
            chunk_bytes: usize::try_from(
                num("TASKPODS_CHUNK_BYTES", 64 << 10)?.clamp(1, 512 << 10),
            )
            .unwrap_or(64 << 10),
            flush_interval: Duration::from_millis(num("TASKPODS_FLUSH_MS", 200)?.max(1)),
            kill_grace: Duration::from_millis(num("TASKPODS_KILL_GRACE_MS", 5000)?),
            term_grace: Duration::from_millis(num("TASKPODS_TERM_GRACE_MS", 2000)?),
        })
    }
}

/// Why the agent stopped without running anything.
#[derive(Debug)]
pub enum AgentError {
    /// NATS could not be reached before the deadline.
    Connect(String),
    /// No instructions before the deadline.
    NoInstructions(String),
    /// The engine said not to run (task ended or cancelling).
    Stopped(String),
    /// The code could not be started.
    Spawn(String),
    /// The result could not be published.
    Report(String),
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "cannot reach NATS: {e}"),
            Self::NoInstructions(e) => write!(f, "no instructions before the deadline: {e}"),
            Self::Stopped(e) => write!(f, "the engine said stop: {e}"),
            Self::Spawn(e) => write!(f, "cannot start the code: {e}"),
            Self::Report(e) => write!(f, "cannot report the result: {e}"),
        }
    }
}

impl std::error::Error for AgentError {}

fn until(deadline: DateTime<Utc>) -> Duration {
    (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO)
}

/// Connects to NATS, retrying with backoff until the deadline.
pub async fn connect(config: &Config) -> Result<async_nats::Client, AgentError> {
    let mut delay = Duration::from_millis(100);
    loop {
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("taskpods-agent {}", config.task))
            .retry_on_initial_connect();
        if let Some(creds) = &config.nats_creds {
            options = options
                .credentials_file(creds)
                .await
                .map_err(|e| AgentError::Connect(format!("credentials {creds:?}: {e}")))?;
        }
        let addrs: Vec<async_nats::ServerAddr> = config
            .nats_urls
            .iter()
            .filter_map(|u| u.parse().ok())
            .collect();
        if addrs.is_empty() {
            return Err(AgentError::Connect("no valid NATS URL".into()));
        }
        let left = until(config.deadline);
        match tokio::time::timeout(left.max(Duration::from_millis(1)), options.connect(addrs)).await
        {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e)) if until(config.deadline) > delay => {
                eprintln!("taskpods-agent: connect failed ({e}); retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Ok(Err(e)) => return Err(AgentError::Connect(e.to_string())),
            Err(_) => return Err(AgentError::Connect("deadline passed".into())),
        }
    }
}

/// Asks for the instructions until the engine answers `Run`, says `Stop`, or the deadline passes.
pub async fn hello(
    client: &async_nats::Client,
    config: &Config,
) -> Result<Instructions, AgentError> {
    let subject = config.names.agent_hello(config.task);
    let payload = codec::to_msgpack(&AgentReport::Hello {
        agent_version: Some(VERSION.to_owned()),
    })
    .map_err(|e| AgentError::NoInstructions(e.to_string()))?;
    let mut delay = Duration::from_millis(50);
    let mut last = String::from("no answer");
    while until(config.deadline) > Duration::ZERO {
        let asked = tokio::time::timeout(
            Duration::from_secs(3),
            client.request(subject.clone(), payload.clone().into()),
        )
        .await;
        let wait = match asked {
            Ok(Ok(reply)) => {
                match codec::decode::<HelloReply>("hello reply", &reply.payload, Encoding::Msgpack)
                {
                    Ok(HelloReply::Run(instructions)) => return Ok(instructions),
                    Ok(HelloReply::Stop { reason }) => return Err(AgentError::Stopped(reason)),
                    Ok(HelloReply::Wait { retry_after_ms }) => {
                        last = "engine said wait".into();
                        Duration::from_millis(retry_after_ms.clamp(10, 5000))
                    }
                    Err(e) => {
                        last = e.to_string();
                        delay
                    }
                }
            }
            Ok(Err(e)) => {
                last = e.to_string();
                delay
            }
            Err(_) => {
                last = "timed out".into();
                delay
            }
        };
        tokio::time::sleep(wait.min(until(config.deadline))).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
    Err(AgentError::NoInstructions(last))
}

/// Publishes to JetStream and waits for the ack, retrying (same `Nats-Msg-Id`, so at most once stored)
/// until `give_up`.
pub(crate) async fn publish_acked(
    js: &async_nats::jetstream::Context,
    subject: String,
    headers: HeaderMap,
    payload: bytes::Bytes,
    give_up: tokio::time::Instant,
) -> Result<(), String> {
    let mut delay = Duration::from_millis(50);
    loop {
        let attempt = async {
            js.publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        };
        let error = match attempt.await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if tokio::time::Instant::now() + delay > give_up {
            return Err(error);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// The msg id of the agent's result for `task` (one per task, ever).
pub fn result_msg_id(task: TaskId) -> String {
    format!("{task}:result")
}

/// The msg id of the `n`-th progress report of `task`.
pub fn progress_msg_id(task: TaskId, n: u64) -> String {
    format!("{task}:progress:{n}")
}

fn report_headers(msg_id: &str, kind: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_MSG_ID, msg_id);
    headers.insert(HEADER_CONTENT_TYPE, MSGPACK);
    headers.insert(codec::HEADER_KIND, kind);
    headers
}

/// Runs the whole task: hello, code, output, heartbeats, result. Returns the outcome it reported.
pub async fn run(config: Config) -> Result<TaskOutcome, AgentError> {
    let client = connect(&config).await?;
    let instructions = hello(&client, &config).await?;
    let js = async_nats::jetstream::new(client.clone());
    let task = config.task;

    // Heartbeats (core NATS: cheap, and a lost one is harmless).
    let heartbeat = {
        let client = client.clone();
        let subject = config.names.agent_heartbeat(task);
        let every = Duration::from_millis(instructions.heartbeat_interval_ms.max(50));
        let payload: bytes::Bytes = codec::to_msgpack(&AgentReport::Heartbeat)
            .unwrap_or_default()
            .into();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let _ = client.publish(subject.clone(), payload.clone()).await;
                let _ = client.flush().await;
            }
        })
    };

    // Progress: latest wins while a report is in flight; ordered, deduplicated by msg id.
    let (progress_tx, mut progress_rx) = mpsc::channel::<Progress>(64);
    let progress_task = {
        let js = js.clone();
        let subject = config.names.agent_report(task, "progress");
        tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(mut p) = progress_rx.recv().await {
                while let Ok(newer) = progress_rx.try_recv() {
                    p = newer;
                }
                let report = AgentReport::Progress {
                    message: p.message,
                    percent: p.percent,
                };
                let Ok(payload) = codec::to_msgpack(&report) else {
                    continue;
                };
                let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
                let headers = report_headers(&progress_msg_id(task, n), "progress");
                if let Err(e) =
                    publish_acked(&js, subject.clone(), headers, payload.into(), give_up).await
                {
                    eprintln!("taskpods-agent: progress report lost: {e}");
                }
                n += 1;
                // At most a few reports a second reach the event log.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let started = tokio::time::Instant::now();
    let code = sandbox::Code::from_instructions(&instructions, &config);
    let (exit_code, stats, result_doc) =
        match run_code(&config, &instructions, code, &js, progress_tx).await {
            Ok(done) => done,
            Err(e) => {
                heartbeat.abort();
                // Report the failure as a result so the task ends now rather than at its deadline.
                let outcome = TaskOutcome {
                    exit_code: 127,
                    duration_ms: 0,
                    ..TaskOutcome::default()
                };
                let _ = publish_result(&js, &config, &outcome).await;
                return Err(e);
            }
        };
    let _ = progress_task.await;

    let outcome = TaskOutcome {
        exit_code,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        stdout_bytes: stats.stdout_bytes,
        stderr_bytes: stats.stderr_bytes,
        output_truncated: stats.dropped_bytes > 0,
        result: result_doc,
        output_tail: (!stats.tail.is_empty())
            .then(|| String::from_utf8_lossy(&stats.tail).into_owned()),
    };
    let reported = publish_result(&js, &config, &outcome).await;
    heartbeat.abort();
    client.flush().await.ok();
    reported.map(|()| outcome)
}

async fn publish_result(
    js: &async_nats::jetstream::Context,
    config: &Config,
    outcome: &TaskOutcome,
) -> Result<(), AgentError> {
    let payload = codec::to_msgpack(&AgentReport::Result(outcome.clone()))
        .map_err(|e| AgentError::Report(e.to_string()))?;
    // Keep trying well past the deadline: the engine may be restarting, and the msg id makes it once.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
    publish_acked(
        js,
        config.names.agent_report(config.task, "result"),
        report_headers(&result_msg_id(config.task), "result"),
        payload.into(),
        give_up,
    )
    .await
    .map_err(AgentError::Report)
}

/// Runs the code and streams its output; returns exit code, output counters and the result document.
async fn run_code(
    config: &Config,
    instructions: &Instructions,
    code: sandbox::Code,
    js: &async_nats::jetstream::Context,
    progress: mpsc::Sender<Progress>,
) -> Result<(i32, OutputStats, Option<serde_json::Value>), AgentError> {
    let mut writer = output::Writer::new(
        js.clone(),
        config.names.log(config.task),
        config.task,
        config.chunk_bytes,
        config.flush_interval,
        instructions.output_cap_bytes,
    );
    let mut running = match sandbox::spawn(config, instructions, &code) {
        Ok(running) => running,
        Err(e) => {
            // Say so where the task's owner looks: in its output.
            let text = format!("taskpods-agent: cannot start the code: {e}\n");
            writer.push(output::Kind::Stderr, text.as_bytes()).await;
            let _ = writer.finish().await;
            return Err(AgentError::Spawn(e.to_string()));
        }
    };
    let pump = output::pump(
        writer,
        running.stdout.take(),
        running.stderr.take(),
        progress,
    );
    let pump = tokio::spawn(pump);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let hard_stop = until(instructions.deadline) + config.kill_grace;
    let status = tokio::select! {
        status = running.child.wait() => status.ok(),
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {
            eprintln!("taskpods-agent: SIGTERM: stopping the code");
            running.terminate(config.term_grace).await
        }
        () = tokio::time::sleep(hard_stop) => {
            eprintln!("taskpods-agent: past the deadline: killing the code");
            running.kill();
            running.child.wait().await.ok()
        }
    };
    // Background processes outside a pid namespace could hold the pipes open: end the group.
    running.kill();
    let exit_code = status.map_or(137, sandbox::exit_code);
    let stats = match tokio::time::timeout(Duration::from_secs(30), pump).await {
        Ok(Ok(Ok(stats))) => stats,
        Ok(Ok(Err(e))) => {
            eprintln!("taskpods-agent: output incomplete: {e}");
            OutputStats::default()
        }
        _ => {
            eprintln!("taskpods-agent: output did not finish in time");
            OutputStats::default()
        }
    };
    let result = running.result_document().await;
    Ok((exit_code, stats, result))
}

/// The environment the user's code sees: the task's env plus a few taskpods variables, never the NATS
/// URL or credentials.
pub fn code_env(config: &Config, instructions: &Instructions) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        (
            "PATH".to_owned(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        ),
        ("HOME".to_owned(), "/tmp".to_owned()),
        ("TMPDIR".to_owned(), "/tmp".to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ("TASKPODS_TASK_ID".to_owned(), config.task.to_string()),
        (
            "TASKPODS_DEADLINE".to_owned(),
            instructions.deadline.to_rfc3339(),
        ),
    ]);
    for (k, v) in &instructions.env {
        env.insert(k.clone(), v.clone());
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_reads_the_environment_with_defaults() {
        let task = TaskId::mint();
        let env = BTreeMap::from([
            ("TASKPODS_TASK_ID".to_owned(), task.to_string()),
            (
                "TASKPODS_NATS_URL".to_owned(),
                "nats://a:1, nats://b:2".to_owned(),
            ),
            ("TASKPODS_SANDBOX".to_owned(), "none".to_owned()),
            ("TASKPODS_MAX_PROCS".to_owned(), "32".to_owned()),
        ]);
        let config = Config::from_env(|n| env.get(n).cloned()).expect("valid");
        assert_eq!(config.task, task);
        assert_eq!(config.nats_urls, ["nats://a:1", "nats://b:2"]);
        assert_eq!(config.sandbox, Sandbox::None);
        assert_eq!(config.limits.max_procs, 32);
        assert_eq!(config.chunk_bytes, 64 << 10);
        assert_eq!(config.names.prefix(), "taskpods");
        let missing = Config::from_env(|_| None).expect_err("task id required");
        assert!(missing.0.contains("TASKPODS_TASK_ID"));
        let bad = Config::from_env(|n| match n {
            "TASKPODS_TASK_ID" => Some(task.to_string()),
            "TASKPODS_SANDBOX" => Some("docker".into()),
            _ => None,
        })
        .expect_err("bad sandbox");
        assert!(bad.0.contains("use bwrap or none"));
    }

    #[test]
    fn env_files_are_name_value_lines() {
        let vars =
            parse_env_file("# comment\n\nTASKPODS_TASK_ID = x\nTASKPODS_NATS_URL=nats://h:4222\n")
                .expect("valid");
        assert_eq!(vars["TASKPODS_TASK_ID"], "x");
        assert_eq!(vars["TASKPODS_NATS_URL"], "nats://h:4222");
        assert_eq!(parse_env_file("A=1\nnonsense\n"), Err(2));
        assert!(env_file(Some("/nonexistent/agent.env".into())).is_err());
    }
}
