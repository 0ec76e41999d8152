//! The local backend (the embedded default): each task runs as a `taskpods-agent` process on this
//! machine, and the agent runs the user's code inside bubblewrap (see the agent's `sandbox` module for the
//! isolation), with the task's memory limit (`resources.memory_limit`) as its address-space limit.
//!
//! The sandbox's name is the task's deterministic Job name (`task-<uuid>`); its state lives in
//! `<state_dir>/<name>/`: `pid` (the agent's pid and its start time, so a recycled pid is never mistaken
//! for it) and `agent.log` (the agent's own diagnostics). Its inputs and artifacts are staged in
//! `<files_dir>/taskpods-files-<task>/` (removed at reap, whatever became of the agent). The agent
//! runs in its own process group, with
//! no pipe to the engine, so it outlives an engine restart; the restarted engine finds it by name and
//! adopts it instead of starting a second one.
//!
//! Nothing of a sandbox outlives its stop or reap: once the agent is gone, what is left of its
//! bubblewrap ([`sandbox_processes`]) is killed. The agent's sandbox normally ends with the agent
//! (bubblewrap's `--die-with-parent`, and a watcher inside the sandbox), but `--die-with-parent` is in
//! force only once bubblewrap has set itself up: an agent killed in that first moment left a sandbox
//! running for good.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, Utc};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use taskpods_events::{FailureReason, Names, TaskId, TaskSpec};
use tracing::{info, warn};

use super::backend::{Backend, BackendError};
use crate::credentials::TaskCredentials;

/// Local backend settings.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The agent binary; default: `taskpods-agent` next to the running executable, else on `PATH`.
    pub agent_bin: PathBuf,
    /// Where sandboxes keep their pid file and agent log.
    pub state_dir: PathBuf,
    /// NATS URLs the agents connect to; default: the engine's.
    pub nats_urls: Option<Vec<String>>,
    /// `bwrap` (isolate the code) or `none` (only for machines without bubblewrap; unsafe).
    pub sandbox: String,
    /// Size of each sandbox's private `/tmp`, bytes.
    pub tmp_bytes: u64,
    /// Most processes per sandbox.
    pub max_procs: u64,
    /// Largest file a task may write, bytes.
    pub max_file_bytes: u64,
    /// How long a stopped agent gets to flush and report before it is killed.
    pub kill_grace: Duration,
    /// How long an agent keeps trying to report past its deadline plus `kill_grace` (its output and
    /// result) before it exits on its own: the bound on an agent whose engine or NATS no longer answers.
    pub report_grace: Duration,
    /// What mode `agent` tasks run with their goal as the argument (the agent's default when `None`).
    pub agent_entrypoint: Option<String>,
    /// Where agents keep each task's `/tmp/in` and `/tmp/out` (`<files_dir>/taskpods-files-<task>`).
    /// The sandbox's UID binds them, so not inside the (closed) data directory; default: the system's
    /// temporary directory. Removed at reap, also when the agent was killed before it could.
    pub files_dir: PathBuf,
}

impl Default for LocalConfig {
    fn default() -> Self {
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("taskpods-agent")))
            .filter(|path| path.exists());
        let data = std::env::var_os("TASKPODS_DATA")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/taskpods"))
            })
            .unwrap_or_else(|| std::env::temp_dir().join("taskpods"));
        Self {
            agent_bin: beside.unwrap_or_else(|| PathBuf::from("taskpods-agent")),
            state_dir: data.join("sandboxes"),
            nats_urls: None,
            sandbox: "bwrap".to_owned(),
            tmp_bytes: 256 << 20,
            max_procs: 256,
            max_file_bytes: 128 << 20,
            kill_grace: Duration::from_secs(5),
            report_grace: Duration::from_secs(30),
            agent_entrypoint: None,
            files_dir: std::env::temp_dir(),
        }
    }
}

/// Runs tasks as local sandboxed processes.
#[derive(Debug)]
pub struct LocalBackend {
    config: LocalConfig,
    names: Names,
    nats_urls: Vec<String>,
    credentials: Option<TaskCredentials>,
}

/// A process identity that survives pid reuse: pid and start time (clock ticks since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    /// The pid.
    pub pid: u32,
    /// Its start time, from `/proc/<pid>/stat`.
    pub start: u64,
}

/// The state and start time of `pid`, from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

impl ProcessId {
    /// The identity of a running `pid`.
    pub fn of(pid: u32) -> Option<Self> {
        proc_stat(pid).map(|(_, start)| Self { pid, start })
    }

    /// Whether this very process still runs (not exited, not a zombie, pid not reused).
    pub fn alive(&self) -> bool {
        matches!(proc_stat(self.pid), Some((state, start)) if start == self.start && state != 'Z' && state != 'X')
    }

    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split_whitespace();
        Some(Self {
            pid: parts.next()?.parse().ok()?,
            start: parts.next()?.parse().ok()?,
        })
    }
}

impl LocalBackend {
    /// A backend for agents that talk to `nats_urls` under `names`.
    pub fn new(config: LocalConfig, names: Names, engine_nats_urls: &[String]) -> Self {
        let nats_urls = config
            .nats_urls
            .clone()
            .unwrap_or_else(|| engine_nats_urls.to_vec());
        Self {
            config,
            names,
            nats_urls,
            credentials: None,
        }
    }

    /// Gives each agent its own NATS identity, minted by `credentials` (a server with authorization).
    pub fn with_task_credentials(mut self, credentials: Option<TaskCredentials>) -> Self {
        self.credentials = credentials;
        self
    }

    /// The sandbox directory of `job`.
    pub fn dir(&self, job: &str) -> PathBuf {
        self.config.state_dir.join(job)
    }

    /// Where the agent of `task` keeps its inputs and artifacts.
    pub fn files_dir(&self, task: TaskId) -> PathBuf {
        self.config.files_dir.join(files_dir_name(task))
    }

    /// Kills what is left of `task`'s sandbox once its agent is gone: SIGKILL to bubblewrap's monitor
    /// and to the init of the sandbox's PID namespace, which takes every process of the sandbox with
    /// it. Nothing is left in the normal case; a leftover is logged.
    fn end_sandbox(task: TaskId) {
        let left = sandbox_processes(task);
        if left.is_empty() {
            return;
        }
        warn!(%task, processes = ?left.iter().map(|p| p.pid).collect::<Vec<_>>(),
            "the sandbox outlived its agent; killing it");
        for id in left {
            if let Some(pid) = Self::pid(id).filter(|_| id.alive()) {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
    }

    /// The agent process of `job`, if it runs.
    pub fn process(&self, job: &str) -> Option<ProcessId> {
        let text = std::fs::read_to_string(self.dir(job).join("pid")).ok()?;
        ProcessId::parse(&text).filter(ProcessId::alive)
    }

    fn spawn(
        &self,
        task: TaskId,
        spec: &TaskSpec,
        job: &str,
        deadline: DateTime<Utc>,
    ) -> Result<ProcessId, BackendError> {
        let dir = self.dir(job);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .map_err(|e| BackendError::transient(format!("agent log: {e}")))?;
        let log_err = log
            .try_clone()
            .map_err(|e| BackendError::transient(format!("agent log: {e}")))?;
        // The task's identity reaches the agent through a pipe on its standard input, read once at
        // start: no file or environment variable the sandboxed code (or another user) could read.
        let credentials = match &self.credentials {
            Some(minter) => Some(minter.mint(task, deadline).map_err(|e| {
                BackendError::fatal(
                    FailureReason::BackendError,
                    format!("cannot mint the task's NATS credentials: {e}"),
                )
            })?),
            None => None,
        };
        let (stdin, credentials_pipe) = match &credentials {
            Some(_) => {
                let (reader, writer) = std::io::pipe()
                    .map_err(|e| BackendError::transient(format!("credentials pipe: {e}")))?;
                (Stdio::from(reader), Some(writer))
            }
            None => (Stdio::null(), None),
        };
        let mut command = tokio::process::Command::new(&self.config.agent_bin);
        command
            .env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .env("TASKPODS_TASK_ID", task.to_string())
            .env("TASKPODS_NATS_URL", self.nats_urls.join(","))
            .env("TASKPODS_PREFIX", self.names.prefix())
            .env("TASKPODS_DEADLINE", deadline.to_rfc3339())
            .env("TASKPODS_SANDBOX", &self.config.sandbox)
            .env("TASKPODS_TMP_BYTES", self.config.tmp_bytes.to_string())
            .env("TASKPODS_FILES_DIR", self.files_dir(task))
            .env("TASKPODS_MAX_PROCS", self.config.max_procs.to_string())
            .env(
                "TASKPODS_MAX_FILE_BYTES",
                self.config.max_file_bytes.to_string(),
            )
            // The task's memory limit, which the agent applies to the sandbox.
            .env(
                "TASKPODS_MEMORY_BYTES",
                spec.resources.memory_limit_bytes.to_string(),
            )
            .env(
                "TASKPODS_KILL_GRACE_MS",
                self.config.kill_grace.as_millis().to_string(),
            )
            // Half the grace for the code, half for flushing output and reporting.
            .env(
                "TASKPODS_TERM_GRACE_MS",
                (self.config.kill_grace / 2).as_millis().to_string(),
            )
            .env(
                "TASKPODS_REPORT_GRACE_MS",
                self.config.report_grace.as_millis().to_string(),
            )
            .envs(
                self.config
                    .agent_entrypoint
                    .iter()
                    .map(|e| ("TASKPODS_AGENT_ENTRYPOINT", e)),
            )
            .envs(credentials.iter().map(|_| ("TASKPODS_NATS_CREDS", "-")))
            .current_dir(&dir)
            .stdin(stdin)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            // Its own process group: no terminal signal meant for the engine reaches it, and it
            // outlives the engine (adopted on restart).
            .process_group(0)
            .kill_on_drop(false);
        let mut child = command.spawn().map_err(|e| {
            BackendError::fatal(
                FailureReason::BackendError,
                format!(
                    "cannot start the agent {}: {e}",
                    self.config.agent_bin.display()
                ),
            )
        })?;
        if let (Some(mut pipe), Some(credentials)) = (credentials_pipe, credentials) {
            use std::io::Write;
            // A credentials file is far smaller than a pipe's buffer: this never blocks.
            pipe.write_all(credentials.to_file().as_bytes())
                .map_err(|e| {
                    BackendError::transient(format!("hand the agent its credentials: {e}"))
                })?;
        }
        let pid = child.id().ok_or_else(|| {
            BackendError::transient("the agent exited before it could be recorded")
        })?;
        let id = ProcessId::of(pid).unwrap_or(ProcessId { pid, start: 0 });
        let pid_file = dir.join("pid");
        let tmp = dir.join("pid.tmp");
        std::fs::write(&tmp, format!("{} {}\n", id.pid, id.start))
            .and_then(|()| std::fs::rename(&tmp, &pid_file))
            .map_err(|e| BackendError::transient(format!("pid file: {e}")))?;
        // Collect its exit status when it ends, so it leaves no zombie behind.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(id)
    }

    async fn wait_gone(id: ProcessId, within: Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        while id.alive() {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        true
    }

    fn pid(id: ProcessId) -> Option<Pid> {
        i32::try_from(id.pid).ok().map(Pid::from_raw)
    }
}

/// The name of `task`'s files directory, under [`LocalConfig::files_dir`].
fn files_dir_name(task: TaskId) -> String {
    format!("taskpods-files-{task}")
}

/// The processes of `task`'s sandbox: bubblewrap (its monitor, and the init of the sandbox's PID
/// namespace) binds the task's files directory, so its command line names it. (The code inside
/// carries the task id in its environment; bubblewrap itself runs with `PATH` alone.)
pub fn sandbox_processes(task: TaskId) -> Vec<ProcessId> {
    let needle = format!("/{}/", files_dir_name(task));
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let mut args = cmdline.split(|b| *b == 0);
            let bwrap = args
                .next()
                .is_some_and(|program| program.ends_with(b"bwrap"));
            bwrap && args.any(|arg| String::from_utf8_lossy(arg).contains(&needle))
        })
        .filter_map(ProcessId::of)
        .filter(ProcessId::alive)
        .collect()
}

fn remove_dir(dir: &Path) -> Result<(), BackendError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BackendError::transient(format!(
            "remove {}: {e}",
            dir.display()
        ))),
    }
}

impl Backend for LocalBackend {
    async fn create(
        &self,
        task: TaskId,
        spec: &TaskSpec,
        deadline: DateTime<Utc>,
    ) -> Result<String, BackendError> {
        if !spec.secret_env.is_empty() {
            // Intake refuses these for this backend; an event accepted by another engine's policy
            // still cannot run here.
            return Err(BackendError::fatal(
                taskpods_events::FailureReason::BackendError,
                "secret_env (values from Kubernetes Secrets) needs the Kubernetes backend",
            ));
        }
        let job = task.job_name();
        // The sandbox exists once its directory does, whether or not its agent still runs (as a Job
        // exists after its pod died): adopt it, never start a second agent for the task. Creating the
        // directory is the claim, atomic across engine replicas sharing the state directory: of two
        // executors racing for one task, one creates it and the other adopts. A dead agent (or one that
        // never started, its engine killed between the claim and the spawn) is found by the startup
        // timer or the heartbeat timeout.
        let dir = self.dir(&job);
        std::fs::create_dir_all(&self.config.state_dir).map_err(|e| {
            BackendError::transient(format!("create {}: {e}", self.config.state_dir.display()))
        })?;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                match self.process(&job) {
                    Some(id) => info!(%task, pid = id.pid, "adopting the running sandbox"),
                    None => warn!(%task, "adopting the sandbox; its agent is not running"),
                }
                return Ok(job);
            }
            Err(e) => {
                return Err(BackendError::transient(format!(
                    "create {}: {e}",
                    dir.display()
                )));
            }
        }
        let id = match self.spawn(task, spec, &job, deadline) {
            Ok(id) => id,
            Err(e) => {
                // Nothing started (no pid file): give the claim up, so a retry can start it.
                if !dir.join("pid").exists() {
                    let _ = remove_dir(&dir);
                }
                return Err(e);
            }
        };
        info!(%task, pid = id.pid, job, "sandbox started");
        Ok(job)
    }

    async fn stop(&self, task: TaskId, job: &str) -> Result<(), BackendError> {
        let Some(id) = self.process(job) else {
            Self::end_sandbox(task);
            return Ok(());
        };
        let Some(pid) = Self::pid(id) else {
            return Ok(());
        };
        // The agent forwards the stop to the code (kills the sandbox), flushes output and reports.
        let _ = kill(pid, Signal::SIGTERM);
        if !Self::wait_gone(id, self.config.kill_grace).await {
            warn!(%task, pid = id.pid, "agent did not stop within the grace period; killing");
            if id.alive() {
                let _ = killpg(pid, Signal::SIGKILL);
                let _ = kill(pid, Signal::SIGKILL);
            }
            if !Self::wait_gone(id, Duration::from_secs(5)).await {
                return Err(BackendError::transient(format!(
                    "agent {} of {task} survives SIGKILL",
                    id.pid
                )));
            }
        }
        Self::end_sandbox(task);
        Ok(())
    }

    async fn reap(&self, task: TaskId, job: &str, grace: Duration) -> Result<(), BackendError> {
        if let Some(id) = self.process(job)
            && !Self::wait_gone(id, grace).await
        {
            self.stop(task, job).await?;
        }
        Self::end_sandbox(task);
        // An agent that was killed (SIGKILL, a crash) left its inputs and artifacts behind. Best effort:
        // an engine that is not root cannot remove directories the code made as its subordinate UID,
        // and that must not hold up the reap.
        let files = self.files_dir(task);
        if let Err(e) = remove_dir(&files) {
            warn!(%task, dir = %files.display(), "cannot remove the task's files: {e}");
        }
        remove_dir(&self.dir(job))
    }
}
