//! The views and the pure fold that builds them. Values are JSON in KV (readable by the web UI, by
//! `nats kv get`, and by Brains in any language); every value carries `seq`, the stream sequence of the
//! last event folded into it, which is what guards writes against re-delivery and concurrent projectors.
//!
//! The lifecycle state comes from `taskpods_events::evolve`, so a view can never disagree with the state
//! machine about what state a history leads to; the fold only adds the details a reader wants.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use taskpods_events::{EventBody, FailureReason, Mode, Problem, Task, TaskId, TaskState, evolve};

use crate::log::StoredEvent;

/// Most history entries kept per task; beyond this the oldest non-first entries are dropped and counted
/// (a KV value must stay well under the server's 1 MiB message limit).
pub const MAX_HISTORY_ENTRIES: usize = 256;

/// The last progress the task's code reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProgressView {
    /// What it said.
    pub message: String,
    /// How far along, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f32>,
    /// When the engine recorded it.
    pub at: DateTime<Utc>,
}

/// A cancel request, as recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CancelView {
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester: Option<String>,
    /// When.
    pub at: DateTime<Utc>,
}

/// `taskpods_tasks`: the current view of one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskView {
    /// The task.
    pub task: TaskId,
    /// The lifecycle state (`state`, plus `reason` when failed), as `evolve` computes it.
    #[serde(flatten)]
    pub state: TaskState,
    /// Stream sequence of the last event folded in.
    pub seq: u64,
    /// Stream sequence of the first event.
    pub first_seq: u64,
    /// How many events were folded (the next event's position).
    pub events: u64,
    /// When the last event was decided.
    pub updated_at: DateTime<Utc>,
    /// The image the pod runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The toolbox the image came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toolbox: Option<String>,
    /// Script or agent mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Who launched it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester: Option<String>,
    /// Labels for finding it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Seconds allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
    /// When it was accepted (or rejected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_at: Option<DateTime<Utc>>,
    /// When the engine times it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// When its Job was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<DateTime<Utc>>,
    /// When its pod was bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When the agent said hello.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_at: Option<DateTime<Utc>>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// The Job (or local sandbox) name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The pod name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The node the pod ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Details of the failure (or the rejection's problems, joined).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Every problem of a rejected launch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
    /// The user's code's exit code, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Wall-clock time of the user's code, when reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Bytes of stdout plus stderr, when reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
    /// Whether output beyond the cap was dropped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub output_truncated: bool,
    /// The last 2 KiB of output, as the agent reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tail: Option<String>,
    /// The result document the script left, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The last progress report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressView>,
    /// How many progress reports there were.
    #[serde(default)]
    pub progress_count: u64,
    /// The cancel request, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<CancelView>,
    /// Whether the Job and pod are known to be gone.
    #[serde(default)]
    pub reaped: bool,
    /// How many events of kinds this version does not know were skipped.
    #[serde(default)]
    pub unknown_events: u64,
}

impl TaskView {
    /// The view before any event of `task`.
    pub fn empty(task: TaskId) -> Self {
        Self {
            task,
            state: TaskState::New,
            seq: 0,
            first_seq: 0,
            events: 0,
            updated_at: DateTime::default(),
            image: None,
            toolbox: None,
            mode: None,
            requester: None,
            labels: BTreeMap::new(),
            timeout_secs: None,
            accepted_at: None,
            deadline: None,
            scheduled_at: None,
            started_at: None,
            running_at: None,
            finished_at: None,
            job: None,
            pod: None,
            node: None,
            message: None,
            problems: Vec::new(),
            exit_code: None,
            duration_ms: None,
            output_bytes: None,
            output_truncated: false,
            output_tail: None,
            result: None,
            progress: None,
            progress_count: 0,
            cancel: None,
            reaped: false,
            unknown_events: 0,
        }
    }

    /// When the task entered its current state, as far as the events say.
    pub fn state_since(&self) -> Option<DateTime<Utc>> {
        match self.state {
            TaskState::New | TaskState::Unknown => None,
            TaskState::Accepted | TaskState::Rejected => self.accepted_at,
            TaskState::Scheduled => self.scheduled_at,
            TaskState::Starting => self.started_at,
            TaskState::Running => self.running_at,
            TaskState::Cancelling => self.cancel.as_ref().map(|c| c.at),
            TaskState::Succeeded
            | TaskState::Failed { .. }
            | TaskState::TimedOut
            | TaskState::Cancelled => self.finished_at,
        }
    }

    /// Whether the task has ended.
    pub fn is_terminal(&self) -> bool {
        self.state.is_terminal()
    }

    /// The failure reason, when failed.
    pub fn reason(&self) -> Option<FailureReason> {
        match self.state {
            TaskState::Failed { reason } => Some(reason),
            _ => None,
        }
    }

    /// Folds one event in. The caller guarantees order (each task's events by stream sequence); an event
    /// at or below `seq` is ignored, so folding a re-delivered event is harmless.
    pub fn apply(&mut self, logged: &StoredEvent) {
        if logged.sequence <= self.seq {
            return;
        }
        let event = &logged.event;
        let before = Task {
            state: self.state,
            events: self.events,
            reaped: self.reaped,
            ..Task::default()
        };
        let was_terminal = before.state.is_terminal();
        let after = evolve(before, event);
        self.state = after.state;
        self.events = after.events;
        self.reaped = after.reaped;
        if self.first_seq == 0 {
            self.first_seq = logged.sequence;
        }
        self.seq = logged.sequence;
        self.updated_at = event.at;
        if matches!(event.body, EventBody::Unknown) {
            self.unknown_events += 1;
            return;
        }
        // `evolve` ignores everything after the end but `Reaped`; the details follow the same rule so
        // a late event cannot rewrite how a task ended.
        if was_terminal {
            return;
        }
        match &event.body {
            EventBody::Accepted { spec, deadline } => {
                self.image = Some(spec.image.clone());
                self.toolbox.clone_from(&spec.toolbox);
                self.mode = Some(spec.mode);
                self.requester.clone_from(&spec.requester);
                self.labels.clone_from(&spec.labels);
                self.timeout_secs = Some(spec.timeout_secs);
                self.accepted_at = Some(event.at);
                self.deadline = Some(*deadline);
            }
            EventBody::Rejected { problems } => {
                self.accepted_at = Some(event.at);
                self.problems.clone_from(problems);
                self.message = Some(
                    problems
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                );
            }
            EventBody::Scheduled { job } => {
                self.job = Some(job.clone());
                self.scheduled_at = Some(event.at);
            }
            EventBody::Started { pod, node } => {
                self.pod = Some(pod.clone());
                self.node.clone_from(node);
                self.started_at = Some(event.at);
            }
            EventBody::Running => self.running_at = Some(event.at),
            EventBody::Progress { message, percent } => {
                self.progress_count += 1;
                self.progress = Some(ProgressView {
                    message: message.clone(),
                    percent: *percent,
                    at: event.at,
                });
            }
            EventBody::CancelRequested { reason, requester } => {
                self.cancel = Some(CancelView {
                    reason: reason.clone(),
                    requester: requester.clone(),
                    at: event.at,
                });
            }
            EventBody::Succeeded { outcome } => self.outcome(Some(outcome)),
            EventBody::Failed {
                reason,
                message,
                outcome,
            } => {
                self.message.clone_from(message);
                self.outcome(outcome.as_ref());
                if let FailureReason::NonZeroExit { exit_code } = reason {
                    self.exit_code.get_or_insert(*exit_code);
                }
            }
            EventBody::TimedOut { detected_by } => {
                self.message = detected_by
                    .as_ref()
                    .map(|by| format!("deadline reached (detected by {by})"));
            }
            EventBody::Cancelled { outcome } => self.outcome(outcome.as_ref()),
            EventBody::Reaped | EventBody::Unknown => {}
        }
        if self.state.is_terminal() {
            self.finished_at = Some(event.at);
        }
    }

    fn outcome(&mut self, outcome: Option<&taskpods_events::TaskOutcome>) {
        if let Some(o) = outcome {
            self.exit_code = Some(o.exit_code);
            self.duration_ms = Some(o.duration_ms);
            self.output_bytes = Some(o.stdout_bytes.saturating_add(o.stderr_bytes));
            self.output_truncated = o.output_truncated;
            self.output_tail.clone_from(&o.output_tail);
            self.result.clone_from(&o.result);
        }
    }
}

/// One line of a task's timeline in `taskpods_history`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HistoryEntry {
    /// Stream sequence.
    pub seq: u64,
    /// When the engine decided it.
    pub at: DateTime<Utc>,
    /// The kind as written (unknown kinds keep their name).
    pub kind: String,
    /// The state after it.
    pub state: String,
    /// A short human summary (job name, reason, message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `taskpods_history`: the timeline of a task's transitions. Progress reports are not listed one by one
/// (the task view keeps the last and a count), so a chatty task cannot grow its history without bound.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HistoryView {
    /// The task.
    pub task: TaskId,
    /// Stream sequence of the last entry.
    pub seq: u64,
    /// The transitions, oldest first.
    pub entries: Vec<HistoryEntry>,
    /// Entries dropped to stay under [`MAX_HISTORY_ENTRIES`].
    #[serde(default)]
    pub dropped: u64,
}

impl HistoryView {
    /// The history before any event.
    pub fn empty(task: TaskId) -> Self {
        Self {
            task,
            seq: 0,
            entries: Vec::new(),
            dropped: 0,
        }
    }

    /// Appends the entry for `logged`, given the task view after it. Ignores events at or below `seq`.
    pub fn apply(&mut self, logged: &StoredEvent, after: &TaskView) {
        if logged.sequence <= self.seq {
            return;
        }
        // Progress is not listed, and does not move `seq` either: the history is only rewritten when
        // it gains an entry.
        if matches!(logged.event.body, EventBody::Progress { .. }) {
            return;
        }
        self.seq = logged.sequence;
        if self.entries.len() >= MAX_HISTORY_ENTRIES {
            // Keep the first entry (acceptance) and drop the oldest after it.
            self.entries.remove(1);
            self.dropped += 1;
        }
        self.entries.push(HistoryEntry {
            seq: logged.sequence,
            at: logged.event.at,
            kind: logged.kind.clone(),
            state: after.state.name().to_owned(),
            detail: detail(&logged.event.body),
        });
    }
}

/// A one-line summary of what an event says beyond its kind.
pub fn detail(body: &EventBody) -> Option<String> {
    match body {
        EventBody::Accepted { spec, deadline } => Some(format!(
            "image {} timeout {}s deadline {}",
            spec.image,
            spec.timeout_secs,
            deadline.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )),
        EventBody::Rejected { problems } => Some(
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        ),
        EventBody::Scheduled { job } => Some(format!("job {job}")),
        EventBody::Started { pod, node } => Some(match node {
            Some(node) => format!("pod {pod} on {node}"),
            None => format!("pod {pod}"),
        }),
        EventBody::Progress { message, percent } => Some(match percent {
            Some(p) => format!("{p}% {message}"),
            None => message.clone(),
        }),
        EventBody::CancelRequested { reason, requester } => {
            let who = requester.as_deref().unwrap_or("unknown");
            Some(match reason {
                Some(r) => format!("by {who}: {r}"),
                None => format!("by {who}"),
            })
        }
        EventBody::Succeeded { outcome } => Some(format!(
            "exit 0 in {} ms, {} bytes of output",
            outcome.duration_ms,
            outcome.stdout_bytes + outcome.stderr_bytes
        )),
        EventBody::Failed {
            reason, message, ..
        } => Some(match message {
            Some(m) => format!("{reason}: {m}"),
            None => reason.to_string(),
        }),
        EventBody::TimedOut { detected_by } => detected_by.as_ref().map(|by| format!("by {by}")),
        EventBody::Cancelled { outcome } => outcome
            .as_ref()
            .map(|o| format!("code exited {} before the kill", o.exit_code)),
        EventBody::Running | EventBody::Reaped | EventBody::Unknown => None,
    }
}

/// `taskpods_active`: a live task's summary; deleted when the task ends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ActiveView {
    /// The task.
    pub task: TaskId,
    /// The lifecycle state.
    #[serde(flatten)]
    pub state: TaskState,
    /// Stream sequence of the last event folded in.
    pub seq: u64,
    /// When it was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_at: Option<DateTime<Utc>>,
    /// When the engine times it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// The image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// When the last event was decided.
    pub updated_at: DateTime<Utc>,
    /// When the task entered its current state (a list shows "time in state" from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_since: Option<DateTime<Utc>>,
    /// The toolbox the image came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toolbox: Option<String>,
    /// Who launched it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester: Option<String>,
    /// Labels for finding it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The last progress report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressView>,
    /// The cancel request, while cancelling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<CancelView>,
}

impl From<&TaskView> for ActiveView {
    fn from(v: &TaskView) -> Self {
        Self {
            task: v.task,
            state: v.state,
            seq: v.seq,
            accepted_at: v.accepted_at,
            deadline: v.deadline,
            image: v.image.clone(),
            job: v.job.clone(),
            pod: v.pod.clone(),
            updated_at: v.updated_at,
            state_since: v.state_since(),
            toolbox: v.toolbox.clone(),
            requester: v.requester.clone(),
            labels: v.labels.clone(),
            progress: v.progress.clone(),
            cancel: v.cancel.clone(),
        }
    }
}

/// `taskpods_finished`: one finished task in the newest-first index. Written once, when the task ends,
/// so the bucket's stream holds the entries in the order the tasks ended (see `buckets::finished_page`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FinishedView {
    /// The task.
    pub task: TaskId,
    /// How it ended.
    #[serde(flatten)]
    pub state: TaskState,
    /// Stream sequence of the terminal event.
    pub seq: u64,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// When it was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_at: Option<DateTime<Utc>>,
    /// The image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Who launched it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester: Option<String>,
    /// The exit code, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Failure details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The toolbox the image came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toolbox: Option<String>,
    /// Labels for finding it (history filters on them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Wall-clock time of the user's code, when reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Whether output beyond the cap was dropped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub output_truncated: bool,
}

impl FinishedView {
    /// The index entry of a view that has just ended. Built from the view at the terminal event, so
    /// later `Reaped` events do not change it.
    pub fn from_terminal(v: &TaskView, terminal_seq: u64) -> Self {
        Self {
            task: v.task,
            state: v.state,
            seq: terminal_seq,
            finished_at: v.finished_at,
            accepted_at: v.accepted_at,
            image: v.image.clone(),
            requester: v.requester.clone(),
            exit_code: v.exit_code,
            message: v.message.clone(),
            toolbox: v.toolbox.clone(),
            labels: v.labels.clone(),
            duration_ms: v.duration_ms,
            output_truncated: v.output_truncated,
        }
    }
}

/// Every view of one task, folded in memory: what a rebuild writes and what verify compares with.
#[derive(Clone, Debug, PartialEq)]
pub struct Folded {
    /// The current view.
    pub view: TaskView,
    /// The timeline.
    pub history: HistoryView,
    /// The finished-index entry, once the task has ended.
    pub finished: Option<FinishedView>,
}

impl Folded {
    /// Nothing folded yet.
    pub fn new(task: TaskId) -> Self {
        Self {
            view: TaskView::empty(task),
            history: HistoryView::empty(task),
            finished: None,
        }
    }

    /// Folds one event into every view.
    pub fn apply(&mut self, logged: &StoredEvent) {
        if logged.sequence <= self.view.seq {
            return;
        }
        let was_terminal = self.view.is_terminal();
        self.view.apply(logged);
        self.history.apply(logged, &self.view);
        if !was_terminal && self.view.is_terminal() {
            self.finished = Some(FinishedView::from_terminal(&self.view, logged.sequence));
        }
    }

    /// The active entry, while the task is live.
    pub fn active(&self) -> Option<ActiveView> {
        (!self.view.is_terminal() && self.view.state != TaskState::New)
            .then(|| ActiveView::from(&self.view))
    }
}

/// Encodes a view for KV.
pub fn encode<T: Serialize>(value: &T) -> Result<bytes::Bytes, serde_json::Error> {
    serde_json::to_vec(value).map(bytes::Bytes::from)
}

/// Decodes a view read from KV.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate;
    use taskpods_events::codec;

    fn logged(seq: u64, position: u64, event: &taskpods_events::Event) -> StoredEvent {
        StoredEvent {
            sequence: seq,
            stored_at: Some(event.at),
            position: Some(position),
            kind: event.body.kind().to_owned(),
            event: event.clone(),
        }
    }

    #[test]
    fn the_view_state_is_what_evolve_says_and_views_survive_json() {
        let start = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        for history in generate::histories(7, 500, start, 12) {
            let task = history[0].task;
            let mut folded = Folded::new(task);
            for (i, e) in history.iter().enumerate() {
                folded.apply(&logged(i as u64 + 1, i as u64, e));
                // Folding again is a no-op.
                let before = folded.clone();
                folded.apply(&logged(i as u64 + 1, i as u64, e));
                assert_eq!(before, folded);
            }
            let machine = Task::replay(history.iter());
            assert_eq!(folded.view.state, machine.state);
            assert_eq!(folded.view.events, machine.events);
            assert_eq!(folded.view.reaped, machine.reaped);
            assert_eq!(folded.view.finished_at, machine.finished_at);
            assert_eq!(folded.finished.is_some(), machine.state.is_terminal());
            assert_eq!(folded.active().is_some(), !machine.state.is_terminal());
            let json = encode(&folded.view).expect("encode");
            assert_eq!(decode::<TaskView>(&json).expect("decode"), folded.view);
            let json = encode(&folded.history).expect("encode");
            assert_eq!(
                decode::<HistoryView>(&json).expect("decode"),
                folded.history
            );
        }
    }

    #[test]
    fn an_unknown_kind_with_fields_decodes_as_unknown() {
        let task = TaskId::from_idempotency_key("unknown-kind");
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let bytes = generate::future_event(task, 1, at, "snapshotted").expect("encode");
        let event = codec::decode_event(&bytes).expect("decodes");
        assert_eq!(event.body, EventBody::Unknown);
    }
}
