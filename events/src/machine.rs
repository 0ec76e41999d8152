//! The lifecycle state machine: `decide` turns an input (a command, an observation, a timer) into the
//! events to append, or a refusal; `evolve` folds an event into the task. Both are pure: time, ids and
//! I/O come from the caller, so replaying the same events always gives the same task.
//!
//! ```text
//! Accepted ─▶ Scheduled ─▶ Starting ─▶ Running ─▶ Succeeded | Failed | TimedOut
//!     │            └───────────┴──────────┴──▶ Cancelling ─▶ Cancelled
//!     └─▶ Cancelled (no Job yet)                     (Rejected at intake; Reaped after any end)
//! ```

use chrono::{DateTime, TimeDelta, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::command::{CancelTask, TaskOutcome, TaskSpec};
use crate::event::{Event, EventBody, FailureReason};
use crate::{Problem, TaskId};

/// Where a task is in its lifecycle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TaskState {
    /// No event yet: the task does not exist.
    #[default]
    New,
    /// Validated and recorded; no Job yet.
    Accepted,
    /// The Job exists.
    Scheduled,
    /// The pod is bound and its container starting.
    Starting,
    /// The agent said hello and runs the work.
    Running,
    /// A cancel was requested; waiting for the Job to be gone.
    Cancelling,
    /// Done, exit code 0.
    Succeeded,
    /// Done, with a reason.
    Failed {
        /// Why.
        reason: FailureReason,
    },
    /// Killed at its deadline.
    TimedOut,
    /// Stopped on request.
    Cancelled,
    /// Refused at intake.
    Rejected,
    /// A state this version does not know.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

impl TaskState {
    /// Whether the task has ended (only `Reaped` may follow).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Succeeded
                | Self::Failed { .. }
                | Self::TimedOut
                | Self::Cancelled
                | Self::Rejected
        )
    }

    /// The state's name, as in the `state` tag.
    pub fn name(&self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Accepted => "accepted",
            Self::Scheduled => "scheduled",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Cancelling => "cancelling",
            Self::Succeeded => "succeeded",
            Self::Failed { .. } => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
            Self::Rejected => "rejected",
            Self::Unknown => "unknown",
        }
    }
}

/// A task as folded from its events: what `decide` needs to judge the next input.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Task {
    /// The lifecycle state.
    pub state: TaskState,
    /// How many events have been folded; the next event's position.
    pub events: u64,
    /// The validated launch, once accepted.
    pub spec: Option<TaskSpec>,
    /// When the task was accepted.
    pub accepted_at: Option<DateTime<Utc>>,
    /// When the engine times it out.
    pub deadline: Option<DateTime<Utc>>,
    /// The Job (or local sandbox) name, once scheduled.
    pub job: Option<String>,
    /// The pod name, once started.
    pub pod: Option<String>,
    /// When the task first became running (its code started), for the running → ended duration.
    pub running_at: Option<DateTime<Utc>>,
    /// When the task ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Whether the Job and pod are known to be gone.
    pub reaped: bool,
    /// How many `Progress` events the task has recorded (capped at [`MAX_PROGRESS_EVENTS`]).
    pub progress: u64,
}

/// The most `Progress` events one task records. The last one recorded says the cap was reached; later
/// reports are refused ([`Refusal::LimitReached`]), so one chatty or hostile task cannot grow its history
/// (and the cost of every replay of it) without bound.
pub const MAX_PROGRESS_EVENTS: u64 = 1000;

impl Task {
    /// Folds a whole history from scratch.
    pub fn replay<'a>(events: impl IntoIterator<Item = &'a Event>) -> Self {
        events.into_iter().fold(Self::default(), evolve)
    }
}

/// What `decide` judges: a command, an observation of the backend or agent, or a timer.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A launch, already validated by the intake against its policy, received at `at`.
    Launch {
        /// The validated spec, or every problem with the launch.
        spec: Result<TaskSpec, Vec<Problem>>,
        /// When the intake received it; the deadline counts from here.
        at: DateTime<Utc>,
    },
    /// A cancel request.
    Cancel(CancelTask),
    /// The backend created (or adopted) the task's Job.
    JobCreated {
        /// Its name.
        job: String,
    },
    /// The pod was bound to a node.
    PodBound {
        /// The Job it belongs to.
        job: String,
        /// The pod.
        pod: String,
        /// The node.
        node: Option<String>,
    },
    /// The agent said hello.
    AgentHello,
    /// The agent relayed progress.
    AgentProgress {
        /// What the script said.
        message: String,
        /// How far along.
        percent: Option<f32>,
    },
    /// The agent reported the user's code exited.
    AgentResult(TaskOutcome),
    /// The pod ended without an agent result (or the result was lost): exit code of the container.
    PodExited {
        /// The container's exit code.
        exit_code: i32,
    },
    /// The pod or Job failed for a reason Kubernetes (or the local backend) gave.
    BackendFailed {
        /// The reason code.
        reason: FailureReason,
        /// Details.
        message: Option<String>,
    },
    /// The task's Job is gone (deleted by us on cancel, or behind our back).
    JobGone,
    /// The engine's deadline timer fired at `now`.
    DeadlineReached {
        /// The timer's clock.
        now: DateTime<Utc>,
    },
    /// The task did not start within the startup timeout; `reason` says why it is stuck.
    StartupTimedOut {
        /// The diagnosis (e.g. `Unschedulable`, `ImagePull`, `QuotaExceeded`).
        reason: FailureReason,
        /// Details.
        message: Option<String>,
    },
    /// The agent's heartbeats stopped.
    HeartbeatLost,
    /// The Job and pod of a finished task are gone.
    Reaped,
}

/// Why an input produced no event. Callers ack and move on; none of these is an engine failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The task does not exist (no `Accepted` event).
    #[error("no such task")]
    UnknownTask,
    /// A launch for a task that already exists: the caller gets the existing task.
    #[error("the task already exists")]
    AlreadyExists,
    /// The task has ended; a late observation or command changes nothing.
    #[error("the task has already ended ({0})")]
    Finished(&'static str),
    /// The input was already applied (a retry, a duplicate report).
    #[error("already applied")]
    Duplicate,
    /// The input makes no sense in the task's state.
    #[error("not allowed while the task is {0}")]
    NotNow(&'static str),
    /// A timer fired before its time (clock skew, or a timer from an older deadline).
    #[error("the deadline has not passed yet")]
    NotYet,
    /// The task already recorded as many of these as one task may (e.g. progress reports).
    #[error("the task reached its limit of {0}")]
    LimitReached(&'static str),
}

/// Judges `input` against `task`: the events to append (in order), or why there are none.
pub fn decide(task: &Task, input: &Input) -> Result<Vec<EventBody>, Refusal> {
    use EventBody as E;
    use TaskState as S;

    let state = task.state;
    match (state, input) {
        (S::New, Input::Launch { spec: Ok(spec), at }) => {
            let deadline = *at + TimeDelta::seconds(i64::from(spec.timeout_secs));
            return Ok(vec![E::Accepted {
                spec: spec.clone(),
                deadline,
            }]);
        }
        (
            S::New,
            Input::Launch {
                spec: Err(problems),
                ..
            },
        ) => {
            return Ok(vec![E::Rejected {
                problems: problems.clone(),
            }]);
        }
        (S::New, _) => return Err(Refusal::UnknownTask),
        (_, Input::Launch { .. }) => return Err(Refusal::AlreadyExists),
        (_, Input::Reaped) if state.is_terminal() && task.reaped => {
            return Err(Refusal::Duplicate);
        }
        (_, Input::Reaped) if state.is_terminal() => return Ok(vec![E::Reaped]),
        (_, Input::Reaped) => return Err(Refusal::NotNow(state.name())),
        _ if state.is_terminal() || state == S::Unknown => {
            return Err(Refusal::Finished(state.name()));
        }
        _ => {}
    }

    let live_before_running = matches!(state, S::Accepted | S::Scheduled | S::Starting);
    let events = match input {
        // Answered above, whatever the state.
        Input::Launch { .. } | Input::Reaped => return Err(Refusal::AlreadyExists),

        Input::Cancel(cancel) => match state {
            S::Accepted => vec![cancel_requested(cancel), E::Cancelled { outcome: None }],
            S::Cancelling => return Err(Refusal::Duplicate),
            _ => vec![cancel_requested(cancel)],
        },

        Input::JobCreated { job } => match state {
            S::Accepted => vec![E::Scheduled { job: job.clone() }],
            _ if task.job.as_ref() == Some(job) => return Err(Refusal::Duplicate),
            _ => return Err(Refusal::NotNow(state.name())),
        },

        Input::PodBound { job, pod, node } => match state {
            S::Accepted => vec![
                E::Scheduled { job: job.clone() },
                E::Started {
                    pod: pod.clone(),
                    node: node.clone(),
                },
            ],
            S::Scheduled => vec![E::Started {
                pod: pod.clone(),
                node: node.clone(),
            }],
            _ if task.pod.as_ref() == Some(pod) => return Err(Refusal::Duplicate),
            _ => return Err(Refusal::NotNow(state.name())),
        },

        Input::AgentHello => match state {
            S::Scheduled | S::Starting => vec![E::Running],
            S::Running => return Err(Refusal::Duplicate),
            _ => return Err(Refusal::NotNow(state.name())),
        },

        Input::AgentProgress { message, percent } => match state {
            S::Running | S::Cancelling if task.progress >= MAX_PROGRESS_EVENTS => {
                return Err(Refusal::LimitReached("progress reports"));
            }
            // The last one the cap allows says so, so the timeline shows why progress stopped.
            S::Running | S::Cancelling if task.progress + 1 == MAX_PROGRESS_EVENTS => {
                vec![E::Progress {
                    message: format!(
                        "progress limit reached: {MAX_PROGRESS_EVENTS} reports recorded, later ones are not"
                    ),
                    percent: *percent,
                }]
            }
            S::Running | S::Cancelling => vec![E::Progress {
                message: message.clone(),
                percent: *percent,
            }],
            _ => return Err(Refusal::NotNow(state.name())),
        },

        // Once a cancel is requested, however the code ends is the cancel taking effect: a script
        // killed by the Job's deletion must not read as a failure of its own.
        Input::AgentResult(outcome) => match state {
            S::Cancelling => vec![E::Cancelled {
                outcome: Some(outcome.clone()),
            }],
            // The agent only runs the work after its hello was recorded, so a result before that is
            // from a confused or forged agent.
            // The inputs could not be provided, so the code never ran: the reason is the input's.
            S::Running if outcome.input_failure.is_some() => {
                let failure = outcome.input_failure.as_ref();
                vec![E::Failed {
                    reason: failure.map_or(FailureReason::InputUnavailable, |f| {
                        f.problem.failure_reason()
                    }),
                    message: failure.map(|f| f.message.clone()),
                    outcome: Some(outcome.clone()),
                }]
            }
            // Like a pod evicted for going past its `/tmp`: the code was stopped by the agent.
            S::Running if outcome.out_dir_exceeded.is_some() => vec![E::Failed {
                reason: FailureReason::Evicted,
                message: outcome
                    .out_dir_exceeded
                    .as_ref()
                    .map(|over| over.to_string()),
                outcome: Some(outcome.clone()),
            }],
            S::Running if outcome.exit_code == 0 => vec![E::Succeeded {
                outcome: outcome.clone(),
            }],
            S::Running => vec![E::Failed {
                reason: FailureReason::NonZeroExit {
                    exit_code: outcome.exit_code,
                },
                message: None,
                outcome: Some(outcome.clone()),
            }],
            _ => return Err(Refusal::NotNow(state.name())),
        },

        Input::PodExited { exit_code } => match state {
            S::Cancelling => vec![E::Cancelled { outcome: None }],
            // Without the agent's report we cannot vouch for the output, so exit 0 without a result
            // means the agent died or could not report: the task did not demonstrably succeed.
            _ if *exit_code == 0 => vec![E::Failed {
                reason: FailureReason::AgentLost,
                message: Some("the pod exited 0 without the agent reporting a result".into()),
                outcome: None,
            }],
            _ => vec![E::Failed {
                reason: FailureReason::NonZeroExit {
                    exit_code: *exit_code,
                },
                message: Some("the pod exited without the agent reporting a result".into()),
                outcome: None,
            }],
        },

        Input::BackendFailed { reason, message } => match (state, reason) {
            (S::Cancelling, _) => vec![E::Cancelled { outcome: None }],
            (_, FailureReason::DeadlineExceeded) => vec![E::TimedOut {
                detected_by: Some("kubernetes".into()),
            }],
            _ => vec![E::Failed {
                reason: *reason,
                message: message.clone(),
                outcome: None,
            }],
        },

        Input::JobGone => match state {
            S::Cancelling => vec![E::Cancelled { outcome: None }],
            _ => vec![E::Failed {
                reason: FailureReason::JobLost,
                message: Some("the task's Job disappeared while the task was live".into()),
                outcome: None,
            }],
        },

        Input::DeadlineReached { now } => match task.deadline {
            Some(deadline) if *now < deadline => return Err(Refusal::NotYet),
            _ if state == S::Cancelling => vec![E::Cancelled { outcome: None }],
            _ => vec![E::TimedOut {
                detected_by: Some("engine".into()),
            }],
        },

        Input::StartupTimedOut { reason, message } => {
            if !live_before_running {
                return Err(Refusal::NotNow(state.name()));
            }
            vec![E::Failed {
                reason: *reason,
                message: message.clone(),
                outcome: None,
            }]
        }

        Input::HeartbeatLost => match state {
            S::Running => vec![E::Failed {
                reason: FailureReason::AgentLost,
                message: Some("the agent stopped sending heartbeats".into()),
                outcome: None,
            }],
            _ => return Err(Refusal::NotNow(state.name())),
        },
    };
    Ok(events)
}

fn cancel_requested(cancel: &CancelTask) -> EventBody {
    EventBody::CancelRequested {
        reason: cancel.reason.clone(),
        requester: cancel.requester.clone(),
    }
}

/// Wraps decided bodies into envelopes at the task's next positions, all stamped `at`.
pub fn stamp(
    task_id: TaskId,
    task: &Task,
    at: DateTime<Utc>,
    bodies: Vec<EventBody>,
) -> Vec<Event> {
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| Event::new(task_id, task.events + i as u64, at, body))
        .collect()
}

/// Folds one event into the task. Total: the log is the truth, so every event is applied as it says,
/// except that after the end only `Reaped` changes anything and unknown kinds change nothing.
pub fn evolve(mut task: Task, event: &Event) -> Task {
    use EventBody as E;
    use TaskState as S;

    task.events += 1;
    if task.state.is_terminal() {
        if let E::Reaped = event.body {
            task.reaped = true;
        }
        return task;
    }
    match &event.body {
        E::Accepted { spec, deadline } => {
            task.state = S::Accepted;
            task.spec = Some(spec.clone());
            task.accepted_at = Some(event.at);
            task.deadline = Some(*deadline);
        }
        E::Rejected { .. } => task.state = S::Rejected,
        E::Scheduled { job } => {
            task.state = S::Scheduled;
            task.job = Some(job.clone());
        }
        E::Started { pod, .. } => {
            task.state = S::Starting;
            task.pod = Some(pod.clone());
        }
        E::Running => {
            task.state = S::Running;
            task.running_at.get_or_insert(event.at);
        }
        E::Progress { .. } => task.progress += 1,
        E::Reaped | E::Unknown => {}
        E::CancelRequested { .. } => task.state = S::Cancelling,
        E::Succeeded { .. } => task.state = S::Succeeded,
        E::Failed { reason, .. } => task.state = S::Failed { reason: *reason },
        E::TimedOut { .. } => task.state = S::TimedOut,
        E::Cancelled { .. } => task.state = S::Cancelled,
    }
    if task.state.is_terminal() {
        task.finished_at = Some(event.at);
    }
    task
}
