//! Commands: what callers (the Brain) and task agents ask of the engine, the validated [`TaskSpec`] a
//! launch becomes, and the engine's replies.
//!
//! Validation against the engine's limits lives in [`crate::policy`].

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::TaskId;
use crate::files::{
    Artifact, ArtifactsTruncated, FileLimits, InputFailure, InputFile, OutDirExceeded,
    SkippedArtifact,
};
use crate::policy::Problem;

/// The longest timeout a task may ask for, in seconds (the seed's 30-minute ceiling).
pub const MAX_TIMEOUT_SECS: u32 = 1800;

/// How the task pod runs the work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Run `script` under a shell.
    #[default]
    Script,
    /// Hand `goal` to the configured agent entrypoint.
    Agent,
}

/// CPU and memory as Kubernetes quantities (`"500m"`, `"2"`, `"512Mi"`); any left out take the policy's
/// defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ResourceRequest {
    /// CPU the scheduler reserves.
    pub cpu_request: Option<String>,
    /// CPU the container may use at most.
    pub cpu_limit: Option<String>,
    /// Memory the scheduler reserves.
    pub memory_request: Option<String>,
    /// Memory above which the container is killed.
    pub memory_limit: Option<String>,
}

/// A request to run one task. Only `script` (or `goal`) is required; everything else has a default.
/// `Debug` shows env names, never values.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LaunchTask {
    /// The task id the caller wants; when absent it is derived from `idempotency_key`.
    pub task_id: Option<Uuid>,
    /// The caller's key for this piece of work: the same key always names the same task.
    pub idempotency_key: Option<String>,
    /// A container image to run; mutually exclusive with `toolbox`.
    pub image: Option<String>,
    /// The name of a configured toolbox image; the policy's default when neither is given.
    pub toolbox: Option<String>,
    /// Script or agent mode.
    pub mode: Mode,
    /// The shell script to run (mode `script`).
    pub script: Option<String>,
    /// The goal handed to the agent entrypoint (mode `agent`).
    pub goal: Option<String>,
    /// Environment variables for the user's code.
    pub env: BTreeMap<String, String>,
    /// Environment variables for the user's code whose values come from keys of Kubernetes Secrets in
    /// the task namespace (Kubernetes backend only; refused by other backends). The engine never reads
    /// them.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: crate::env::SecretEnv,
    /// Seconds before the task is killed; default and maximum 1800.
    pub timeout_secs: Option<u32>,
    /// CPU and memory; defaults and caps come from the policy.
    pub resources: ResourceRequest,
    /// Free-form labels for finding tasks later; Kubernetes label syntax.
    pub labels: BTreeMap<String, String>,
    /// Who asked, for the audit trail.
    pub requester: Option<String>,
    /// Objects of the files bucket the agent downloads into `/tmp/in/<path>` before the code runs.
    pub inputs: Vec<InputFile>,
}

impl LaunchTask {
    /// A script-mode launch with every other field defaulted.
    pub fn script(script: impl Into<String>) -> Self {
        Self {
            script: Some(script.into()),
            ..Self::default()
        }
    }

    /// The task this launch names: the explicit id, else the idempotency key's id, else `None` (the intake
    /// then derives one from the message id or mints one).
    pub fn task_id(&self) -> Option<TaskId> {
        self.task_id.map(TaskId).or_else(|| {
            self.idempotency_key
                .as_deref()
                .map(TaskId::from_idempotency_key)
        })
    }
}

/// A request to stop a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelTask {
    /// The task to stop.
    pub task_id: Uuid,
    /// Why, for the record.
    #[serde(default)]
    pub reason: Option<String>,
    /// Who asked.
    #[serde(default)]
    pub requester: Option<String>,
}

/// A report from the agent inside the task pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "report", rename_all = "snake_case")]
pub enum AgentReport {
    /// The agent is alive and wants its instructions.
    Hello {
        /// The agent's version, for the record.
        #[serde(default)]
        agent_version: Option<String>,
    },
    /// The work moved on.
    Progress {
        /// What the script said.
        message: String,
        /// How far along, 0 to 100, when the script knows.
        #[serde(default)]
        percent: Option<f32>,
    },
    /// Still alive; not recorded as an event.
    Heartbeat,
    /// The work finished.
    Result(TaskOutcome),
}

/// What the agent reports when the user's code has exited.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct TaskOutcome {
    /// The exit code of the user's code; signals are reported as 128 + signal.
    pub exit_code: i32,
    /// Wall-clock time of the user's code.
    pub duration_ms: u64,
    /// Bytes written to stdout.
    pub stdout_bytes: u64,
    /// Bytes written to stderr.
    pub stderr_bytes: u64,
    /// Whether output beyond the per-task cap was dropped.
    pub output_truncated: bool,
    /// The JSON document the script left in `/tmp/result.json`, if any.
    pub result: Option<serde_json::Value>,
    /// The last bytes (at most 2 KiB) the code wrote to stdout and stderr, as they arrived, including
    /// output beyond the cap: what a person looks at first when a task failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tail: Option<String>,
    /// The files the code left in `/tmp/out` that were stored (`<task>/out/<path>`), in path order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
    /// What the per-task artifact caps left out, when they did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifacts_truncated: Option<ArtifactsTruncated>,
    /// What in `/tmp/out` was not stored for another reason (symlinks, special files, bad paths).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub artifacts_skipped: Vec<SkippedArtifact>,
    /// Set when an input could not be provided: the code did not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_failure: Option<InputFailure>,
    /// Set when `/tmp/out` went past its limit while the code ran, and the agent stopped the code (the
    /// local sandbox; in a pod, Kubernetes evicts it when its `/tmp` goes past its size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_dir_exceeded: Option<Box<OutDirExceeded>>,
}

/// Resolved CPU and memory, in millicores and bytes, every value within the policy's caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Resources {
    /// CPU reserved, millicores.
    pub cpu_request_millis: u64,
    /// CPU cap, millicores.
    pub cpu_limit_millis: u64,
    /// Memory reserved, bytes.
    pub memory_request_bytes: u64,
    /// Memory cap, bytes.
    pub memory_limit_bytes: u64,
}

/// A validated launch: what the `Accepted` event records and every later step relies on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TaskSpec {
    /// The image the task pod runs.
    pub image: String,
    /// The toolbox the image came from, when it came from one.
    #[serde(default)]
    pub toolbox: Option<String>,
    /// Script or agent mode.
    pub mode: Mode,
    /// The script (mode `script`) or goal (mode `agent`).
    pub instructions: String,
    /// Environment for the user's code: names in clear, values sealed by the engine.
    #[serde(default)]
    pub env: crate::env::Env,
    /// Environment for the user's code from Kubernetes Secrets (references only, never values).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: crate::env::SecretEnv,
    /// Seconds until the task is timed out (at most 1800).
    pub timeout_secs: u32,
    /// CPU and memory.
    pub resources: Resources,
    /// Labels for finding the task.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Who asked.
    #[serde(default)]
    pub requester: Option<String>,
    /// The caller's idempotency key, kept for the record.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// The inputs, with their paths resolved (names, sizes and digests only: never contents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<InputFile>,
    /// The limits on inputs and artifacts that applied at launch.
    #[serde(default)]
    pub files: FileLimits,
}

/// The engine's answer to an agent's hello: everything the agent needs to run its task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum HelloReply {
    /// Run this.
    Run(Instructions),
    /// Not yet (the engine has not recorded the Job); ask again after `retry_after_ms`.
    Wait {
        /// How long to wait before asking again.
        retry_after_ms: u64,
    },
    /// Do not run: the task has ended or is being cancelled.
    Stop {
        /// Why, for the agent's log.
        reason: String,
    },
}

/// What the agent runs, and how it reports. `Debug` shows env names, never values.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Instructions {
    /// The task.
    pub task_id: TaskId,
    /// Script or agent mode.
    pub mode: Mode,
    /// The script (mode `script`) or goal (mode `agent`).
    pub instructions: String,
    /// Environment for the user's code.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// When the engine times the task out; the agent stops the code a little before.
    pub deadline: chrono::DateTime<chrono::Utc>,
    /// How often to send heartbeats, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// The most output (stdout and stderr together) the agent streams before a truncation marker.
    pub output_cap_bytes: u64,
    /// What to download into `/tmp/in` before the code starts (over `<p>.agent.<task>.files.get`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<InputFile>,
    /// The caps on inputs and on the artifacts uploaded from `/tmp/out` after the code exits.
    #[serde(default)]
    pub files: FileLimits,
}

/// The header a command carries to ask for a [`CommandReply`] on a core NATS subject (e.g. an inbox).
pub const HEADER_REPLY_TO: &str = "Taskpods-Reply-To";

/// What the engine answers a command that asked for a reply. Encoded like the command was (JSON in,
/// JSON out).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CommandReply {
    /// The command was applied (for a launch: the task exists now, or existed already).
    Applied {
        /// The task.
        task_id: TaskId,
        /// Its state after the command.
        state: crate::TaskState,
        /// Stream sequence of the task's first event (for a launch) or of the last event appended.
        sequence: u64,
        /// For a launch: whether this command created the task (false: it already existed).
        created: bool,
    },
    /// The launch was invalid; the task exists as `Rejected` with these problems.
    Rejected {
        /// The task.
        task_id: TaskId,
        /// Every problem.
        problems: Vec<Problem>,
        /// Stream sequence of the `Rejected` event.
        sequence: u64,
    },
    /// The command made no sense for the task (unknown, finished, already cancelling); nothing appended.
    Refused {
        /// The task.
        task_id: TaskId,
        /// Why, in words.
        reason: String,
        /// Its state.
        state: crate::TaskState,
    },
    /// The command could not be read at all; it was kept in the dead-letter stream.
    Invalid {
        /// What was wrong.
        error: String,
    },
}

impl std::fmt::Debug for LaunchTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchTask")
            .field("task_id", &self.task_id)
            .field("idempotency_key", &self.idempotency_key)
            .field("image", &self.image)
            .field("toolbox", &self.toolbox)
            .field("mode", &self.mode)
            .field("script", &self.script)
            .field("goal", &self.goal)
            .field("env", &crate::env::Redacted(&self.env))
            .field("secret_env", &self.secret_env)
            .field("timeout_secs", &self.timeout_secs)
            .field("resources", &self.resources)
            .field("labels", &self.labels)
            .field("requester", &self.requester)
            .finish()
    }
}

impl std::fmt::Debug for Instructions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instructions")
            .field("task_id", &self.task_id)
            .field("mode", &self.mode)
            .field("instructions", &self.instructions)
            .field("env", &crate::env::Redacted(&self.env))
            .field("deadline", &self.deadline)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("output_cap_bytes", &self.output_cap_bytes)
            .finish()
    }
}
