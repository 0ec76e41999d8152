//! The tools a model sees, and what each does through the Rust client. Descriptions are written for the
//! model: what the sandbox can and cannot do, and what to call next.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use serde::Deserialize;
use serde_json::{Value, json};
use taskpods_client::{Client, ClientConfig, ClientError};
use taskpods_events::{LaunchTask, Mode, Names, Problem, TaskId, TaskState};
use taskpods_projections::buckets::BucketError;
use taskpods_projections::{BucketSettings, TaskView, Views};

use super::RpcError;
use crate::cli::CliError;
use crate::cli::logs::{self, Piece};

/// What every model using these tools should know (sent as the server's `instructions`).
pub const INSTRUCTIONS: &str = "taskpods runs shell scripts (or goals for a configured agent) in \
disposable, locked-down sandboxes: no network, a read-only filesystem except a small private /tmp, \
no credentials, at most 30 minutes per task. Launch with launch_task (wait=true to get the outcome in \
the same call), read output with task_output, check on a task with get_task, stop it with \
cancel_task, and see what runs or ran with list_tasks.";

const SANDBOX: &str = "The sandbox has NO network access (no downloads, no package installs, no API \
calls), a read-only filesystem except /tmp (small, private, deleted afterwards; it is the working \
directory and HOME), runs as an unprivileged user with standard Unix tools and a POSIX shell, and is \
killed after timeout_secs (at most 1800 = 30 minutes). Nothing persists between tasks: pass inputs in \
the script or env, and read results from the output or from the JSON the script writes to \
/tmp/result.json (returned as `result`). A line printed as `::progress:: 40% compiling` reports progress.";

/// Settings of the MCP server.
#[derive(Clone, Debug)]
pub struct McpConfig {
    /// Recorded as the `requester` of every task launched through this server.
    pub requester: Option<String>,
    /// Labels added to every task launched through this server (the call's own labels win).
    pub labels: BTreeMap<String, String>,
    /// Prefix for the idempotency keys a model gives, so two servers' `step-1` do not name one task.
    pub key_prefix: Option<String>,
    /// Tool calls served at once; more wait for a free slot.
    pub max_concurrent_calls: usize,
    /// How long `launch_task` with `wait` waits when the call says nothing.
    pub default_wait: Duration,
    /// The longest `wait_secs` a call may ask for (hosts time tool calls out; a task runs on anyway).
    pub max_wait: Duration,
    /// How long a read of the views may wait for the projector to catch up.
    pub view_timeout: Duration,
}

impl Default for McpConfig {
    fn default() -> Self {
        Self {
            requester: Some("mcp".to_owned()),
            labels: BTreeMap::new(),
            key_prefix: None,
            max_concurrent_calls: 16,
            default_wait: Duration::from_secs(50),
            max_wait: Duration::from_secs(600),
            view_timeout: Duration::from_secs(10),
        }
    }
}

/// The tools, bound to one taskpods installation.
#[derive(Debug, Clone)]
pub struct Tools {
    client: Client,
    js: jetstream::Context,
    names: Names,
    config: McpConfig,
}

/// The tool definitions for `tools/list`.
pub fn list() -> Vec<Value> {
    let task_id =
        json!({"type": "string", "description": "The task id (a UUID) launch_task returned."});
    vec![
        json!({
            "name": "launch_task",
            "title": "Run a script in a sandbox",
            "description": format!("Runs a shell script (or a goal for the configured agent) as an isolated task and \
                returns its task_id; with wait=true it also waits for the end (up to wait_secs) and returns the \
                outcome: state, exit code, the last 2 KiB of output and the result document. {SANDBOX} Give an \
                idempotency_key naming this step of the conversation (e.g. '<conversation>/<turn>/<step>'): \
                calling again with the same key returns the same task instead of running it twice."),
            "inputSchema": {
                "type": "object",
                "properties": {
                    "script": {"type": "string", "description": "Shell script to run (POSIX sh), e.g. \"python3 -c 'print(2**100)'\". Give script or goal."},
                    "goal": {"type": "string", "description": "A goal for the installation's configured agent, instead of a script."},
                    "timeout_secs": {"type": "integer", "minimum": 1, "maximum": 1800, "description": "Seconds before the task is killed (default and maximum 1800)."},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Environment variables for the script (names like MY_VAR; TASKPODS_* is reserved)."},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Labels to find the task by later (Kubernetes label syntax)."},
                    "idempotency_key": {"type": "string", "description": "Names this piece of work; the same key always returns the same task."},
                    "wait": {"type": "boolean", "description": "Wait for the task to end and return its outcome (default false)."},
                    "wait_secs": {"type": "integer", "minimum": 1, "maximum": 600, "description": "With wait: how long to wait at most (default 50). A task still running then keeps running; check it with get_task."}
                },
                "additionalProperties": false
            }
        }),
        json!({
            "name": "get_task",
            "title": "Check on a task",
            "description": "The current state of a task: accepted, scheduled, running, cancelling, or how it ended \
                (succeeded, failed with a reason, timed_out, cancelled, rejected with every problem), with its exit \
                code, last progress report, the last 2 KiB of output and its result document.",
            "inputSchema": {
                "type": "object",
                "properties": {"task_id": task_id},
                "required": ["task_id"],
                "additionalProperties": false
            }
        }),
        json!({
            "name": "task_output",
            "title": "Read a task's output",
            "description": "A page of a task's output (stdout and stderr as they arrived), from byte `offset`. The \
                answer says how many bytes are stored, whether more follow (call again with next_offset), whether \
                the task may still write more, and whether the output went over the 16 MiB cap (the rest was not \
                stored).",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "task_id": task_id,
                    "offset": {"type": "integer", "minimum": 0, "description": "Byte offset to start at (default 0)."},
                    "max_bytes": {"type": "integer", "minimum": 1, "maximum": 65536, "description": "Most bytes to return (default 8192)."}
                },
                "required": ["task_id"],
                "additionalProperties": false
            }
        }),
        json!({
            "name": "cancel_task",
            "title": "Stop a task",
            "description": "Stops a task that is still queued or running (its sandbox is killed). A task that has \
                already ended cannot be cancelled; the answer says so.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "task_id": task_id,
                    "reason": {"type": "string", "description": "Why, for the record."}
                },
                "required": ["task_id"],
                "additionalProperties": false
            }
        }),
        json!({
            "name": "list_tasks",
            "title": "List tasks",
            "description": "Lists the tasks running now (which=active), or the tasks that ended, newest first \
                (which=finished; page with `before` = the previous page's next_before).",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "which": {"type": "string", "enum": ["active", "finished"], "description": "active (default) or finished."},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 100, "description": "Most tasks to list (default 20)."},
                    "before": {"type": "integer", "minimum": 1, "description": "For finished: the next_before of the previous page."}
                },
                "additionalProperties": false
            }
        }),
    ]
}

/// Why a tool call failed. The message is the tool's answer to the model (`isError`), so each says what
/// went wrong in the model's terms and, where it can, what to call instead; the cause stays attached for
/// the host's log.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The arguments do not fit the tool's input schema (a typo'd or mistyped field).
    #[error("{tool}: bad arguments: {source}")]
    Arguments {
        /// The tool called.
        tool: &'static str,
        /// What serde found wrong.
        #[source]
        source: serde_json::Error,
    },
    /// A `task_id` argument is not a UUID.
    #[error("{text:?} is not a task id (a UUID as launch_task returned it)")]
    NotATaskId {
        /// What the model passed.
        text: String,
        /// Why it does not parse.
        #[source]
        source: uuid::Error,
    },
    /// The engine rejected the launch; every problem is listed for the model to fix.
    #[error(
        "the launch was rejected (task {task_id}); fix these and launch again with a new \
         idempotency_key:\n{}",
        problems.iter().map(|p| format!("- {}: {}", p.field, p.message)).collect::<Vec<_>>().join("\n")
    )]
    Rejected {
        /// The task that exists now as rejected.
        task_id: TaskId,
        /// Every problem.
        problems: Vec<Problem>,
    },
    /// No task has this id.
    #[error("there is no task {task}: use the task_id launch_task returned")]
    UnknownTask {
        /// The id asked for.
        task: TaskId,
    },
    /// The client failed otherwise (engine refused, NATS unreachable, no answer in time).
    #[error("{source}")]
    Client {
        /// The client's error.
        #[source]
        source: ClientError,
    },
    /// The task's output could not be read.
    #[error("reading the output of {task}: {source}")]
    Output {
        /// The task.
        task: TaskId,
        /// Why.
        #[source]
        source: CliError,
    },
    /// The task lists (the active and finished views) could not be read.
    #[error("reading the task lists: {source}")]
    Lists {
        /// Why.
        #[source]
        source: BucketError,
    },
    /// `which` names no list.
    #[error("which must be \"active\" or \"finished\", not {which:?}")]
    UnknownList {
        /// What the model passed.
        which: String,
    },
}

impl From<ClientError> for ToolError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Rejected { task_id, problems } => Self::Rejected { task_id, problems },
            source => Self::Client { source },
        }
    }
}

/// What a tool answers: a result for the model, or an error the model can act on (`isError`).
type ToolResult = Result<Value, ToolError>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LaunchArgs {
    script: Option<String>,
    goal: Option<String>,
    timeout_secs: Option<u32>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    idempotency_key: Option<String>,
    #[serde(default)]
    wait: bool,
    wait_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskArgs {
    task_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputArgs {
    task_id: String,
    #[serde(default)]
    offset: u64,
    max_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelArgs {
    task_id: String,
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    #[serde(default)]
    which: Option<String>,
    limit: Option<usize>,
    before: Option<u64>,
}

fn args<T: for<'de> Deserialize<'de>>(
    tool: &'static str,
    arguments: &Value,
) -> Result<T, ToolError> {
    let arguments = if arguments.is_null() {
        json!({})
    } else {
        arguments.clone()
    };
    serde_json::from_value(arguments).map_err(|source| ToolError::Arguments { tool, source })
}

fn parse_task(text: &str) -> Result<TaskId, ToolError> {
    text.trim().parse().map_err(|source| ToolError::NotATaskId {
        text: text.to_owned(),
        source,
    })
}

/// The parts of a task view a model needs, without the projector's bookkeeping.
fn summary(view: &TaskView) -> Value {
    let mut value = serde_json::to_value(view).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        for internal in [
            "seq",
            "first_seq",
            "events",
            "unknown_events",
            "progress_count",
        ] {
            map.remove(internal);
        }
        if let Some(task) = map.remove("task") {
            map.insert("task_id".into(), task);
        }
    }
    value
}

impl Tools {
    /// Tools on `nats`, for the installation under `names`.
    pub fn new(nats: async_nats::Client, names: Names, config: McpConfig) -> Self {
        let js = jetstream::new(nats.clone());
        let client = Client::new(
            nats,
            ClientConfig {
                names: names.clone(),
                ..ClientConfig::default()
            },
        );
        Self {
            client,
            js,
            names,
            config,
        }
    }

    /// The server's settings.
    pub fn config(&self) -> &McpConfig {
        &self.config
    }

    /// Answers `tools/call`.
    pub async fn call(&self, params: &Value) -> Result<Value, RpcError> {
        let name = params
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| RpcError::invalid_params("tools/call needs a tool `name`"))?;
        let arguments = params.get("arguments").cloned().unwrap_or(Value::Null);
        let outcome = match name {
            "launch_task" => self.launch(&arguments).await,
            "get_task" => self.get(&arguments).await,
            "task_output" => self.output(&arguments).await,
            "cancel_task" => self.cancel(&arguments).await,
            "list_tasks" => self.list(&arguments).await,
            other => {
                return Err(RpcError::invalid_params(format!(
                    "unknown tool {other:?}; the tools are launch_task, get_task, task_output, \
                     cancel_task and list_tasks"
                )));
            }
        };
        Ok(match outcome {
            Ok(value) => json!({
                "content": [{"type": "text", "text": serde_json::to_string_pretty(&value).unwrap_or_default()}],
                "structuredContent": value,
                "isError": false,
            }),
            Err(e) => json!({
                "content": [{"type": "text", "text": e.to_string()}],
                "isError": true,
            }),
        })
    }

    async fn launch(&self, arguments: &Value) -> ToolResult {
        let a: LaunchArgs = args("launch_task", arguments)?;
        let mut labels = self.config.labels.clone();
        labels.extend(a.labels);
        let launch = LaunchTask {
            mode: if a.goal.is_some() && a.script.is_none() {
                Mode::Agent
            } else {
                Mode::Script
            },
            script: a.script,
            goal: a.goal,
            timeout_secs: a.timeout_secs,
            env: a.env,
            labels,
            requester: self.config.requester.clone(),
            idempotency_key: a.idempotency_key.map(|key| match &self.config.key_prefix {
                Some(prefix) => format!("{prefix}{key}"),
                None => key,
            }),
            ..LaunchTask::default()
        };
        let launched = self.client.launch(launch).await?;
        let task_id = launched.task_id;
        if !a.wait {
            return Ok(json!({
                "task_id": task_id.to_string(),
                "state": launched.state.name(),
                "created": launched.created,
                "next": "call get_task or task_output with this task_id to see how it goes",
            }));
        }
        let wait = a
            .wait_secs
            .map_or(self.config.default_wait, Duration::from_secs)
            .min(self.config.max_wait);
        match self.client.wait(task_id, wait).await {
            Ok(_) => {}
            Err(ClientError::TimedOut { .. }) => {
                let mut now = self.describe(task_id).await?;
                now["created"] = json!(launched.created);
                now["next"] = json!(format!(
                    "still running after {} s; it keeps running: call get_task or task_output later",
                    wait.as_secs()
                ));
                return Ok(now);
            }
            Err(e) => return Err(e.into()),
        }
        let mut ended = self.describe(task_id).await?;
        ended["created"] = json!(launched.created);
        Ok(ended)
    }

    /// The task's view once it includes every event stored now (falls back to the event log's state
    /// when the views lag).
    async fn describe(&self, task: TaskId) -> ToolResult {
        let snapshot = self.client.get(task).await?;
        if snapshot.task.state == TaskState::New {
            return Err(ToolError::UnknownTask { task });
        }
        match self
            .client
            .view(task, snapshot.last_sequence, self.config.view_timeout)
            .await
        {
            Ok(view) => Ok(summary(&view)),
            Err(_) => Ok(json!({
                "task_id": task.to_string(),
                "state": snapshot.task.state,
                "note": "details are not available yet (the views are catching up); ask again shortly",
            })),
        }
    }

    async fn get(&self, arguments: &Value) -> ToolResult {
        let a: TaskArgs = args("get_task", arguments)?;
        self.describe(parse_task(&a.task_id)?).await
    }

    async fn output(&self, arguments: &Value) -> ToolResult {
        let a: OutputArgs = args("task_output", arguments)?;
        let task = parse_task(&a.task_id)?;
        let snapshot = self.client.get(task).await?;
        if snapshot.task.state == TaskState::New {
            return Err(ToolError::UnknownTask { task });
        }
        let max = a.max_bytes.unwrap_or(8192).clamp(1, 65536);
        let mut stored = Vec::new();
        let mut cap_note = None;
        let mut ended_output = false;
        logs::read(
            &self.js,
            &self.names,
            task,
            false,
            Duration::from_secs(1),
            async || true,
            |piece| match piece {
                Piece::Stdout(b) | Piece::Stderr(b) => stored.extend_from_slice(&b),
                Piece::Truncated(text) => cap_note = Some(text),
                Piece::End => ended_output = true,
            },
        )
        .await
        .map_err(|source| ToolError::Output { task, source })?;
        let total = stored.len() as u64;
        let start = a.offset.min(total);
        let end = start.saturating_add(max).min(total);
        let page = &stored[usize::try_from(start).unwrap_or(0)..usize::try_from(end).unwrap_or(0)];
        let finished = ended_output || snapshot.task.state.is_terminal();
        let mut answer = json!({
            "task_id": task.to_string(),
            "state": snapshot.task.state.name(),
            "offset": start,
            "bytes": end - start,
            "stored_bytes": total,
            "text": String::from_utf8_lossy(page),
            "more_stored": end < total,
            "output_complete": finished,
        });
        if end < total {
            answer["next_offset"] = json!(end);
            answer["note"] = json!(format!(
                "showing bytes {start}..{end} of {total}; call task_output again with offset={end} for more"
            ));
        } else if !finished {
            answer["note"] = json!("the task is still running: more output may come");
        }
        if let Some(text) = cap_note {
            answer["truncated_at_cap"] = json!(true);
            answer["cap_note"] = json!(text);
        }
        Ok(answer)
    }

    async fn cancel(&self, arguments: &Value) -> ToolResult {
        let a: CancelArgs = args("cancel_task", arguments)?;
        let task = parse_task(&a.task_id)?;
        let state = self.client.cancel(task, a.reason).await?;
        Ok(json!({
            "task_id": task.to_string(),
            "state": state.name(),
            "next": if state == TaskState::Cancelled {
                "the task is cancelled"
            } else {
                "the sandbox is being stopped; get_task shows `cancelled` once it is gone"
            },
        }))
    }

    async fn list(&self, arguments: &Value) -> ToolResult {
        let a: ListArgs = args("list_tasks", arguments)?;
        let limit = a.limit.unwrap_or(20).clamp(1, 100);
        let views = Views::open(&self.js, &self.names, BucketSettings::default())
            .await
            .map_err(|source| ToolError::Lists { source })?;
        match a.which.as_deref().unwrap_or("active") {
            "active" => {
                let active = views
                    .active()
                    .await
                    .map_err(|source| ToolError::Lists { source })?;
                let count = active.len();
                Ok(json!({
                    "which": "active",
                    "count": count,
                    "tasks": active.into_iter().take(limit).collect::<Vec<_>>(),
                    "more": count > limit,
                }))
            }
            "finished" => {
                let page = views
                    .finished_page(a.before, limit)
                    .await
                    .map_err(|source| ToolError::Lists { source })?;
                let mut answer = json!({"which": "finished", "tasks": page.entries});
                if let Some(next) = page.next {
                    answer["next_before"] = json!(next);
                }
                Ok(answer)
            }
            other => Err(ToolError::UnknownList {
                which: other.to_owned(),
            }),
        }
    }
}
