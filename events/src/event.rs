//! Events: the facts recorded on a task's subject, one envelope each, and the failure reasons they carry.
//!
//! Every enum here decodes values it does not know into an `Unknown` variant, so an engine replays a log
//! written by a newer version without crashing; what it cannot understand it shows and skips.

use std::fmt;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::command::{TaskOutcome, TaskSpec};
use crate::{Problem, TaskId};

/// The envelope version this build writes.
pub const ENVELOPE_VERSION: u16 = 1;

/// One recorded fact about a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    /// Envelope version; readers accept any and rely on field names, not positions.
    pub v: u16,
    /// Deterministic id (task, position), so an append retried after a crash is byte-identical.
    pub id: Uuid,
    /// The task the event belongs to.
    pub task: TaskId,
    /// When the engine decided it.
    pub at: DateTime<Utc>,
    /// What happened.
    #[serde(flatten)]
    pub body: EventBody,
}

impl Event {
    /// The envelope for the task's event number `position` (0 for the first).
    pub fn new(task: TaskId, position: u64, at: DateTime<Utc>, body: EventBody) -> Self {
        Self {
            v: ENVELOPE_VERSION,
            id: task.event_id(position),
            task,
            at,
            body,
        }
    }
}

/// What happened to a task. The tag is `kind`, in snake_case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventBody {
    /// The launch was valid and the task exists; the first event of every accepted task.
    Accepted {
        /// The validated launch.
        spec: TaskSpec,
        /// When the engine will time the task out.
        deadline: DateTime<Utc>,
    },
    /// The launch was invalid; terminal, with every problem found.
    Rejected {
        /// What was wrong.
        problems: Vec<Problem>,
    },
    /// The backend created the task's Job (or local process slot).
    Scheduled {
        /// The Job name (or local sandbox name).
        job: String,
    },
    /// The task's pod was bound to a node and its container is starting.
    Started {
        /// The pod name.
        pod: String,
        /// The node it runs on, when known.
        #[serde(default)]
        node: Option<String>,
    },
    /// The agent in the pod said hello and got its instructions.
    Running,
    /// The user's code reported progress.
    Progress {
        /// What it said.
        message: String,
        /// How far along, 0 to 100.
        #[serde(default)]
        percent: Option<f32>,
    },
    /// Someone asked to stop the task; the Job is being deleted.
    CancelRequested {
        /// Why.
        #[serde(default)]
        reason: Option<String>,
        /// Who.
        #[serde(default)]
        requester: Option<String>,
    },
    /// The user's code exited 0.
    Succeeded {
        /// What the agent reported.
        outcome: TaskOutcome,
    },
    /// The task failed, for a reason a person can act on.
    Failed {
        /// The reason code.
        reason: FailureReason,
        /// Details for a person.
        #[serde(default)]
        message: Option<String>,
        /// What the agent reported, when it got that far.
        #[serde(default)]
        outcome: Option<TaskOutcome>,
    },
    /// The task ran into its deadline and was killed.
    TimedOut {
        /// Who noticed: the engine's timer or the Job controller.
        #[serde(default)]
        detected_by: Option<String>,
    },
    /// The task was stopped on request.
    Cancelled {
        /// What the agent reported, if the code exited before the kill.
        #[serde(default)]
        outcome: Option<TaskOutcome>,
    },
    /// The task's Job and pod are gone; recorded after terminal, once.
    Reaped,
    /// A kind this version does not know (written by a newer engine).
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

impl EventBody {
    /// The `kind` tag as written on the wire and in the `Taskpods-Kind` header.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Accepted { .. } => "accepted",
            Self::Rejected { .. } => "rejected",
            Self::Scheduled { .. } => "scheduled",
            Self::Started { .. } => "started",
            Self::Running => "running",
            Self::Progress { .. } => "progress",
            Self::CancelRequested { .. } => "cancel_requested",
            Self::Succeeded { .. } => "succeeded",
            Self::Failed { .. } => "failed",
            Self::TimedOut { .. } => "timed_out",
            Self::Cancelled { .. } => "cancelled",
            Self::Reaped => "reaped",
            Self::Unknown => "unknown",
        }
    }

    /// Whether this event ends the task (everything after it but `Reaped` is refused).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Rejected { .. }
                | Self::Succeeded { .. }
                | Self::Failed { .. }
                | Self::TimedOut { .. }
                | Self::Cancelled { .. }
        )
    }
}

/// Why a task failed: codes a person (or the Brain) can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum FailureReason {
    /// The user's code exited with this non-zero code.
    NonZeroExit {
        /// The exit code (128 + signal for a signal).
        exit_code: i32,
    },
    /// The container went over its memory limit.
    OomKilled,
    /// The image could not be pulled.
    ImagePull,
    /// No node could take the pod.
    Unschedulable,
    /// The namespace's ResourceQuota refused the pod.
    QuotaExceeded,
    /// The node evicted the pod.
    Evicted,
    /// The agent stopped sending heartbeats.
    AgentLost,
    /// The task's Job disappeared while the task was live.
    JobLost,
    /// Kubernetes killed the Job at its deadline before the engine's own timer did.
    DeadlineExceeded,
    /// The backend failed in a way not listed above (see the message).
    BackendError,
    /// An input named in the launch is not in the files bucket (or not the task's); the code did not run.
    InputMissing,
    /// An input (or all inputs together) is over the per-task cap; the code did not run.
    InputTooLarge,
    /// An input's size or digest differs from what the launch said; the code did not run.
    InputCorrupt,
    /// The inputs could not be fetched (engine or object store unreachable); the code did not run.
    InputUnavailable,
    /// A reason this version does not know.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NonZeroExit { exit_code } => write!(f, "non_zero_exit({exit_code})"),
            Self::OomKilled => f.write_str("oom_killed"),
            Self::ImagePull => f.write_str("image_pull"),
            Self::Unschedulable => f.write_str("unschedulable"),
            Self::QuotaExceeded => f.write_str("quota_exceeded"),
            Self::Evicted => f.write_str("evicted"),
            Self::AgentLost => f.write_str("agent_lost"),
            Self::JobLost => f.write_str("job_lost"),
            Self::DeadlineExceeded => f.write_str("deadline_exceeded"),
            Self::BackendError => f.write_str("backend_error"),
            Self::InputMissing => f.write_str("input_missing"),
            Self::InputTooLarge => f.write_str("input_too_large"),
            Self::InputCorrupt => f.write_str("input_corrupt"),
            Self::InputUnavailable => f.write_str("input_unavailable"),
            Self::Unknown => f.write_str("unknown"),
        }
    }
}
