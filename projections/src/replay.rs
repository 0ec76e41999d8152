//! Replaying a task's log for an operator: the timeline (sequence, time, kind, payload, state after), the
//! state at a point (`--at`), and oddities found by checks that do not use `decide` (so a bug in the
//! state machine cannot hide its own traces): a transition the lifecycle does not allow, a gap or
//! repeat in the task's positions, an event after the end, a kind this version does not know, a message
//! that does not decode, a clock going backwards.
//!
//! Also [`failed_since`]: failed and timed-out tasks from the stream (not the views), for "what went
//! wrong last night".

use std::fmt::Write as _;
use std::str::FromStr;

use async_nats::jetstream::stream::Stream;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use serde::Serialize;
use taskpods_events::{EventBody, Names, TaskId, TaskState};

use crate::log::{self, LogError, Read, StoredEvent};
use crate::view::{TaskView, detail};

/// Errors replaying.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading the stream failed.
    #[error("reading the event stream: {0}")]
    Stream(#[source] async_nats::Error),
    /// The stream has no events for the task.
    #[error("no events for task {0}")]
    NoSuchTask(TaskId),
    /// `--at` is neither a sequence nor a time.
    #[error(
        "--at {0:?}: give a stream sequence (e.g. 42) or an RFC 3339 time (e.g. 2026-11-28T14:00:00Z)"
    )]
    BadAt(String),
    /// `--since` is not a duration.
    #[error("--since {0:?}: give a duration like 30m, 12h or 7d")]
    BadDuration(String),
}

/// A point in a task's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// Up to and including this stream sequence.
    Seq(u64),
    /// Up to and including events decided at or before this time.
    Time(DateTime<Utc>),
}

impl FromStr for At {
    type Err = ReplayError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(seq) = s.parse::<u64>() {
            return Ok(Self::Seq(seq));
        }
        DateTime::parse_from_rfc3339(s)
            .map(|t| Self::Time(t.with_timezone(&Utc)))
            .map_err(|_| ReplayError::BadAt(s.to_owned()))
    }
}

/// Parses `90s`, `30m`, `12h`, `7d`, `2w` (or a bare number of seconds).
pub fn parse_duration(s: &str) -> Result<chrono::TimeDelta, ReplayError> {
    let bad = || ReplayError::BadDuration(s.to_owned());
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: i64 = number.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(secs)
        .and_then(chrono::TimeDelta::try_seconds)
        .ok_or_else(bad)
}

/// What kind of oddity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OddityKind {
    /// The lifecycle does not allow this event in the state before it.
    RefusedTransition,
    /// Positions were skipped (events missing from the log).
    Gap,
    /// A position appears twice.
    Repeat,
    /// An event after the task ended (other than one `reaped`).
    AfterTerminal,
    /// A kind this version does not know.
    UnknownKind,
    /// A message that is not an event.
    Undecodable,
    /// An event decided earlier than the one before it.
    ClockBackwards,
}

/// Something odd in a task's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Oddity {
    /// The stream sequence it was found at.
    pub seq: u64,
    /// What kind.
    pub kind: OddityKind,
    /// In words.
    pub message: String,
}

/// One line of the timeline.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entry {
    /// Stream sequence.
    pub seq: u64,
    /// When the engine decided it (`None` for an undecodable message).
    pub at: Option<DateTime<Utc>>,
    /// When the server stored it.
    pub stored_at: Option<DateTime<Utc>>,
    /// The position from `Nats-Msg-Id`.
    pub position: Option<u64>,
    /// The kind as written.
    pub kind: String,
    /// The decoded payload (the body's fields), or the error for an undecodable message.
    pub payload: serde_json::Value,
    /// A one-line summary.
    pub detail: Option<String>,
    /// The state after this event.
    pub state: String,
}

/// A task's whole timeline.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Timeline {
    /// The task.
    pub task: TaskId,
    /// Every stored message of the task, in order.
    pub entries: Vec<Entry>,
    /// What looked wrong.
    pub oddities: Vec<Oddity>,
    /// The view after every event (or after the `--at` point).
    pub state: TaskView,
}

/// Builds the timeline from a task's stored messages (as [`log::read_task`] returns them), stopping
/// after `at` when given.
pub fn timeline(task: TaskId, reads: &[Read], at: Option<At>) -> Timeline {
    let mut view = TaskView::empty(task);
    let mut entries = Vec::new();
    let mut oddities = Vec::new();
    let mut index = 0u64;
    let mut last_at: Option<DateTime<Utc>> = None;
    let mut reaped = false;
    for read in reads {
        let seq = match read {
            Ok(e) => e.sequence,
            Err(LogError::Undecodable { seq, .. })
            | Err(LogError::Foreign { seq, .. })
            | Err(LogError::WrongTask { seq, .. }) => *seq,
            Err(LogError::Read { .. }) => 0,
        };
        let past = match (at, read) {
            (Some(At::Seq(limit)), _) => seq > limit,
            (Some(At::Time(limit)), Ok(e)) => e.event.at > limit,
            _ => false,
        };
        if past {
            break;
        }
        let e = match read {
            Ok(e) => e,
            Err(err) => {
                oddities.push(Oddity {
                    seq,
                    kind: OddityKind::Undecodable,
                    message: err.to_string(),
                });
                entries.push(Entry {
                    seq,
                    at: None,
                    stored_at: None,
                    position: None,
                    kind: "undecodable".into(),
                    payload: serde_json::Value::String(err.to_string()),
                    detail: None,
                    state: view.state.name().to_owned(),
                });
                continue;
            }
        };
        check(e, &view, index, last_at, &mut reaped, &mut oddities);
        index = e.position.map_or(index + 1, |p| p.max(index) + 1);
        last_at = Some(last_at.map_or(e.event.at, |t| t.max(e.event.at)));
        view.apply(e);
        entries.push(Entry {
            seq: e.sequence,
            at: Some(e.event.at),
            stored_at: e.stored_at,
            position: e.position,
            kind: e.kind.clone(),
            payload: payload(e),
            detail: detail(&e.event.body),
            state: state_label(&view.state),
        });
    }
    Timeline {
        task,
        entries,
        oddities,
        state: view,
    }
}

fn state_label(state: &TaskState) -> String {
    match state {
        TaskState::Failed { reason } => format!("failed({reason})"),
        other => other.name().to_owned(),
    }
}

fn payload(e: &StoredEvent) -> serde_json::Value {
    let mut value = serde_json::to_value(&e.event.body).unwrap_or(serde_json::Value::Null);
    if let serde_json::Value::Object(map) = &mut value {
        map.remove("kind");
    }
    value
}

/// Which kinds the lifecycle allows after a state (docs/ARCHITECTURE.md section 4). Written out here, apart from
/// `decide`, on purpose: replay checks the log, not the code that wrote it.
fn allowed(state: &TaskState, kind: &str) -> bool {
    use TaskState as S;
    match state {
        S::New => matches!(kind, "accepted" | "rejected"),
        S::Accepted => matches!(
            kind,
            "scheduled" | "cancel_requested" | "cancelled" | "failed" | "timed_out"
        ),
        S::Scheduled | S::Starting => {
            matches!(
                kind,
                "started" | "running" | "cancel_requested" | "failed" | "timed_out"
            ) && !(matches!(state, S::Starting) && kind == "started")
        }
        S::Running => matches!(
            kind,
            "progress" | "cancel_requested" | "succeeded" | "failed" | "timed_out"
        ),
        S::Cancelling => matches!(kind, "progress" | "cancelled"),
        _ => kind == "reaped",
    }
}

fn check(
    e: &StoredEvent,
    before: &TaskView,
    index: u64,
    last_at: Option<DateTime<Utc>>,
    reaped: &mut bool,
    oddities: &mut Vec<Oddity>,
) {
    let mut odd = |kind, message: String| {
        oddities.push(Oddity {
            seq: e.sequence,
            kind,
            message,
        });
    };
    if let Some(p) = e.position {
        if p > index {
            odd(
                OddityKind::Gap,
                format!(
                    "gap: position {p} follows position {} ({} event(s) missing)",
                    index as i64 - 1,
                    p - index
                ),
            );
        } else if p < index {
            odd(
                OddityKind::Repeat,
                format!("position {p} appears again (expected {index})"),
            );
        }
    }
    if let Some(t) = last_at
        && e.event.at < t
    {
        odd(
            OddityKind::ClockBackwards,
            format!(
                "decided at {} , {} ms before the event preceding it",
                fmt_time(e.event.at),
                (t - e.event.at).num_milliseconds()
            ),
        );
    }
    if e.is_unknown() {
        odd(
            OddityKind::UnknownKind,
            format!(
                "unknown kind `{}`: written by a newer version; shown, not interpreted",
                e.kind
            ),
        );
        return;
    }
    let kind = e.event.body.kind();
    if before.state.is_terminal() {
        if kind == "reaped" && !*reaped {
            *reaped = true;
        } else {
            odd(
                OddityKind::AfterTerminal,
                format!(
                    "`{kind}` after the task ended ({}); the state machine ignores it",
                    state_label(&before.state)
                ),
            );
        }
        return;
    }
    if !allowed(&before.state, kind) {
        odd(
            OddityKind::RefusedTransition,
            format!(
                "refused transition: `{kind}` is not allowed in state {}",
                state_label(&before.state)
            ),
        );
    }
}

fn fmt_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The timeline as text for a person.
pub fn render_text(t: &Timeline) -> String {
    let mut out = String::new();
    let first = t.entries.first().map_or(0, |e| e.seq);
    let last = t.entries.last().map_or(0, |e| e.seq);
    let _ = writeln!(
        out,
        "task {}: {} event(s), stream sequences {first}..{last}",
        t.task,
        t.entries.len()
    );
    let _ = writeln!(
        out,
        "{:>6}  {:<24}  {:<16}  {:<22}  DETAIL",
        "SEQ", "DECIDED AT", "KIND", "STATE AFTER"
    );
    // Oddities are marked on their line and listed below the table.
    for e in &t.entries {
        let at = e.at.map_or_else(|| "-".to_owned(), fmt_time);
        let marks: Vec<&Oddity> = t.oddities.iter().filter(|o| o.seq == e.seq).collect();
        let flag = if marks.is_empty() { "" } else { "  <-- !" };
        let line = format!(
            "{:>6}  {:<24}  {:<16}  {:<22}  {}{flag}",
            e.seq,
            at,
            e.kind,
            e.state,
            e.detail.as_deref().unwrap_or("")
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    if t.oddities.is_empty() {
        let _ = writeln!(out, "oddities: none");
    } else {
        let _ = writeln!(out, "oddities: {}", t.oddities.len());
        for o in &t.oddities {
            let _ = writeln!(out, "  seq {}: {}", o.seq, o.message);
        }
    }
    let _ = writeln!(out, "{}", render_state(&t.state));
    out
}

/// A view as a short block of text.
pub fn render_state(v: &TaskView) -> String {
    let mut out = format!(
        "state: {} after {} event(s) (seq {})",
        state_label(&v.state),
        v.events,
        v.seq
    );
    let mut field = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            let _ = write!(out, "\n  {name}: {value}");
        }
    };
    field("image", v.image.clone());
    field("accepted", v.accepted_at.map(fmt_time));
    field("deadline", v.deadline.map(fmt_time));
    field("job", v.job.clone());
    field("pod", v.pod.clone());
    field("finished", v.finished_at.map(fmt_time));
    field("exit code", v.exit_code.map(|c| c.to_string()));
    field("message", v.message.clone());
    field(
        "last progress",
        v.progress.as_ref().map(|p| p.message.clone()),
    );
    field("reaped", v.reaped.then(|| "yes".to_owned()));
    field(
        "unknown events",
        (v.unknown_events > 0).then(|| v.unknown_events.to_string()),
    );
    out
}

/// Reads a task's timeline from the stream.
pub async fn replay(
    events: &Stream,
    names: &Names,
    task: TaskId,
    at: Option<At>,
) -> Result<Timeline, ReplayError> {
    let reads = log::read_task(events, names, task, 1, u64::MAX)
        .await
        .map_err(|e| ReplayError::Stream(e.into()))?;
    if reads.is_empty() {
        return Err(ReplayError::NoSuchTask(task));
    }
    Ok(timeline(task, &reads, at))
}

/// A failed or timed-out task found in the stream.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FailedTask {
    /// The task.
    pub task: TaskId,
    /// Stream sequence of the terminal event.
    pub seq: u64,
    /// When it ended.
    pub at: DateTime<Utc>,
    /// `failed` or `timed_out`.
    pub kind: String,
    /// The reason code (`timed_out` for timeouts).
    pub reason: String,
    /// Details.
    pub message: Option<String>,
}

/// What [`failed_since`] found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FailedReport {
    /// Failed and timed-out tasks, oldest first.
    pub tasks: Vec<FailedTask>,
    /// Events scanned.
    pub scanned: u64,
    /// Messages that did not decode.
    pub undecodable: u64,
}

/// Scans the stream from `since` for failed and timed-out tasks. Only messages whose `Taskpods-Kind`
/// header says `failed` or `timed_out` are decoded.
pub async fn failed_since(
    events: &Stream,
    names: &Names,
    since: DateTime<Utc>,
    mut progress: impl FnMut(u64, u64),
) -> Result<FailedReport, ReplayError> {
    let mut stream = events.clone();
    let info = stream
        .info()
        .await
        .map_err(|e| ReplayError::Stream(e.into()))?;
    let last = info.state.last_sequence;
    let mut report = FailedReport::default();
    if info.state.messages == 0 {
        return Ok(report);
    }
    let mut messages = log::ordered(&stream, names, None, log::Start::Time(since))
        .await
        .map_err(|e| ReplayError::Stream(e.into()))?;
    loop {
        // An ordered consumer starting past the end delivers nothing; a short idle wait ends the scan.
        let next = tokio::time::timeout(std::time::Duration::from_secs(2), messages.next()).await;
        let Ok(Some(m)) = next else { break };
        let m = m.map_err(|e| ReplayError::Stream(e.into()))?;
        let Ok(meta) = m.info() else { continue };
        let seq = meta.stream_sequence;
        let pending = meta.pending;
        report.scanned += 1;
        let kind = m
            .headers
            .as_ref()
            .and_then(|h| h.get(taskpods_events::codec::HEADER_KIND))
            .map(|v| v.as_str().to_owned());
        // Without the header (foreign writers), decode to find out.
        if kind
            .as_deref()
            .is_none_or(|k| k == "failed" || k == "timed_out")
        {
            match log::decode(
                names,
                m.subject.as_str(),
                seq,
                m.headers.as_ref(),
                &m.payload,
                log::to_chrono(meta.published.unix_timestamp_nanos()),
            ) {
                Ok(e) => match &e.event.body {
                    EventBody::Failed {
                        reason, message, ..
                    } => report.tasks.push(FailedTask {
                        task: e.task(),
                        seq,
                        at: e.event.at,
                        kind: "failed".into(),
                        reason: reason.to_string(),
                        message: message.clone(),
                    }),
                    EventBody::TimedOut { detected_by } => report.tasks.push(FailedTask {
                        task: e.task(),
                        seq,
                        at: e.event.at,
                        kind: "timed_out".into(),
                        reason: "timed_out".into(),
                        message: detected_by.as_ref().map(|by| format!("detected by {by}")),
                    }),
                    _ => {}
                },
                Err(_) => report.undecodable += 1,
            }
        }
        if report.scanned.is_multiple_of(4096) {
            progress(seq, last);
        }
        if pending == 0 || seq >= last {
            break;
        }
    }
    progress(last, last);
    Ok(report)
}

/// Failed tasks as text.
pub fn render_failed(report: &FailedReport, since: DateTime<Utc>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<36}  {:<24}  {:<22}  MESSAGE",
        "TASK", "ENDED AT", "REASON"
    );
    for t in &report.tasks {
        let _ = writeln!(
            out,
            "{:<36}  {:<24}  {:<22}  {}",
            t.task,
            fmt_time(t.at),
            t.reason,
            t.message.as_deref().unwrap_or("")
        );
    }
    let failed = report.tasks.iter().filter(|t| t.kind == "failed").count();
    let _ = writeln!(
        out,
        "{failed} failed, {} timed out since {} ({} events scanned{})",
        report.tasks.len() - failed,
        fmt_time(since),
        report.scanned,
        if report.undecodable > 0 {
            format!(", {} undecodable", report.undecodable)
        } else {
            String::new()
        }
    );
    out
}
