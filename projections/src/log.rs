//! The event log: the one owner of how task events sit on the event stream. Every writer and reader goes
//! through here: the engine's event store (appends, loads), the client (a task's history, following it
//! live), the projector, rebuild and replay.
//!
//! - [`StoredEvent`]: an event as stored: stream sequence, when the server stored it, the task position
//!   from `Nats-Msg-Id`, the kind named in `Taskpods-Kind` (which survives when this build does not know
//!   the kind and decodes the body as `Unknown`), and the envelope.
//! - [`msg_id`] / [`parse_msg_id`]: the deterministic message id `<task>:<position>:<kind>` built for an
//!   append and parsed back; [`headers`]: every header an append carries.
//! - [`decode`] / [`decode_message`]: a stored message (direct get or consumer) → [`StoredEvent`].
//! - [`read_events`] (all of a task's events, strictly) and [`read_task`] (a range, each message decoded
//!   or its error in place): direct gets on the task's subject, which any replica answers.
//! - [`ordered`]: an ordered consumer on one task's subject or all of them, from a [`Start`].
//!
//! Why in `taskpods-projections` rather than a crate of its own: both the client (views) and the engine
//! already depend on this crate and it is the log's main reader, so the engine reads its own store
//! without going through the client, and a separate crate would cut no dependency.

use async_nats::HeaderMap;
use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull},
    stream::{DirectGetErrorKind, Stream},
};
use chrono::{DateTime, Utc};
use taskpods_events::codec::{self, HEADER_CONTENT_TYPE, HEADER_KIND, HEADER_MSG_ID, MSGPACK};
use taskpods_events::{Addressed, Event, EventBody, Names, TaskId};

/// Why a stored message is not a usable event.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The subject is not a task event subject under this prefix.
    #[error("sequence {seq}: subject {subject:?} is not a task event subject")]
    Foreign {
        /// Stream sequence.
        seq: u64,
        /// The subject.
        subject: String,
    },
    /// The payload is not an event envelope (a broken writer, or corruption).
    #[error("sequence {seq}: undecodable event: {source}")]
    Undecodable {
        /// Stream sequence.
        seq: u64,
        /// The codec's error (with the field path).
        #[source]
        source: codec::CodecError,
    },
    /// The envelope names a different task than the subject it was stored on.
    #[error("sequence {seq}: event for task {envelope} stored on the subject of task {subject}")]
    WrongTask {
        /// Stream sequence.
        seq: u64,
        /// The task of the subject.
        subject: TaskId,
        /// The task of the envelope.
        envelope: TaskId,
    },
    /// Reading the stream failed (server unreachable, timeout).
    #[error("reading the event stream: {operation}: {source}")]
    Read {
        /// What was being read (`direct get`, `ordered consumer`, `message metadata`).
        operation: &'static str,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
}

impl LogError {
    fn read(operation: &'static str, source: impl Into<async_nats::Error>) -> Self {
        Self::Read {
            operation,
            source: source.into(),
        }
    }
}

/// One event as stored on the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Stream sequence.
    pub sequence: u64,
    /// When the server stored it; `None` for an event this process just appended (the publish
    /// acknowledgement does not say).
    pub stored_at: Option<DateTime<Utc>>,
    /// The event's position in its task (0 for the first), from `Nats-Msg-Id`; `None` when the writer
    /// did not set a taskpods message id.
    pub position: Option<u64>,
    /// The kind as written: the `Taskpods-Kind` header, else the decoded body's kind. For a kind this
    /// build does not know, `event.body` is `Unknown` and this keeps its real name.
    pub kind: String,
    /// The decoded envelope.
    pub event: Event,
}

impl StoredEvent {
    /// The task it belongs to.
    pub fn task(&self) -> TaskId {
        self.event.task
    }

    /// Whether this build does not know the kind.
    pub fn is_unknown(&self) -> bool {
        matches!(self.event.body, EventBody::Unknown)
    }
}

/// The `Nats-Msg-Id` of the event of `kind` at `position` of `task`: the same task, position and kind
/// always give the same id, so JetStream drops a retried append inside its duplicate window.
pub fn msg_id(task: TaskId, position: u64, kind: &str) -> String {
    format!("{task}:{position}:{kind}")
}

/// The task, position and kind of a message id built by [`msg_id`]; `None` for any other id.
pub fn parse_msg_id(msg_id: &str) -> Option<(TaskId, u64, &str)> {
    let mut parts = msg_id.splitn(3, ':');
    let task = parts.next()?.parse::<TaskId>().ok()?;
    let position = parts.next()?.parse().ok()?;
    let kind = parts.next()?;
    Some((task, position, kind))
}

/// The position in a taskpods message id of `task` (`None` when the id is another task's or not ours).
pub fn position_from_msg_id(task: TaskId, msg_id: &str) -> Option<u64> {
    parse_msg_id(msg_id)
        .filter(|(id, _, _)| *id == task)
        .map(|(_, position, _)| position)
}

/// The headers an append of `event` at `position` carries: its message id, the content type and kind.
pub fn headers(event: &Event, position: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        HEADER_MSG_ID,
        msg_id(event.task, position, event.body.kind()).as_str(),
    );
    headers.insert(HEADER_CONTENT_TYPE, MSGPACK);
    headers.insert(HEADER_KIND, event.body.kind());
    headers
}

/// Decodes a stored message. `stored_at` is the server's storage time.
pub fn decode(
    names: &Names,
    subject: &str,
    seq: u64,
    headers: Option<&HeaderMap>,
    payload: &[u8],
    stored_at: DateTime<Utc>,
) -> Result<StoredEvent, LogError> {
    let subject_task = match names.parse(subject) {
        Ok(Addressed::Events(task)) => task,
        _ => {
            return Err(LogError::Foreign {
                seq,
                subject: subject.to_owned(),
            });
        }
    };
    let event =
        codec::decode_event(payload).map_err(|source| LogError::Undecodable { seq, source })?;
    if event.task != subject_task {
        return Err(LogError::WrongTask {
            seq,
            subject: subject_task,
            envelope: event.task,
        });
    }
    let header = |name: &str| {
        headers
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let position = header(HEADER_MSG_ID).and_then(|id| position_from_msg_id(subject_task, &id));
    let kind = header(HEADER_KIND)
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| event.body.kind().to_owned());
    Ok(StoredEvent {
        sequence: seq,
        stored_at: Some(stored_at),
        position,
        kind,
        event,
    })
}

/// Decodes a message delivered by a consumer on the event stream.
pub fn decode_message(
    names: &Names,
    message: &jetstream::Message,
) -> Result<StoredEvent, LogError> {
    let info = message
        .info()
        .map_err(|e| LogError::read("message metadata", e))?;
    decode(
        names,
        message.subject.as_str(),
        info.stream_sequence,
        message.headers.as_ref(),
        &message.payload,
        to_chrono(info.published.unix_timestamp_nanos()),
    )
}

/// Converts the client's timestamp type (from the `time` crate) without naming that crate.
pub fn to_chrono(nanos: i128) -> DateTime<Utc> {
    let secs = nanos.div_euclid(1_000_000_000);
    let sub = nanos.rem_euclid(1_000_000_000);
    i64::try_from(secs)
        .ok()
        .and_then(|s| DateTime::from_timestamp(s, u32::try_from(sub).unwrap_or(0)))
        .unwrap_or_default()
}

/// One stored message of a task's subject read with a direct get: the decoded event, or why it is not
/// usable (the replay tool shows those instead of stopping).
pub type Read = Result<StoredEvent, LogError>;

/// Every event of `task` with a stream sequence in `from..=to` (`to`: `u64::MAX` for all), in order.
/// Messages that do not decode are returned as errors in place, so callers decide whether to skip them.
pub async fn read_task(
    stream: &Stream,
    names: &Names,
    task: TaskId,
    from: u64,
    to: u64,
) -> Result<Vec<Read>, LogError> {
    let subject = names.events(task);
    let mut out = Vec::new();
    let mut next = from.max(1);
    while next <= to {
        match stream
            .direct_get_next_for_subject(subject.clone(), Some(next))
            .await
        {
            Ok(message) => {
                if message.sequence > to {
                    break;
                }
                next = message.sequence + 1;
                out.push(decode(
                    names,
                    message.subject.as_str(),
                    message.sequence,
                    Some(&message.headers),
                    &message.payload,
                    to_chrono(message.time.unix_timestamp_nanos()),
                ));
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
            Err(e) => return Err(LogError::read("direct get", e)),
        }
    }
    Ok(out)
}

/// Every event of `task`, in order (empty for an unknown task). Strict: the first message that is not a
/// usable event of this task is the error, so nothing is folded from a log that cannot be read whole.
pub async fn read_events(
    stream: &Stream,
    names: &Names,
    task: TaskId,
) -> Result<Vec<StoredEvent>, LogError> {
    read_task(stream, names, task, 1, u64::MAX)
        .await?
        .into_iter()
        .collect()
}

/// Where an [`ordered`] consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The first stored event.
    First,
    /// The event at this stream sequence (or the next one after it).
    Sequence(u64),
    /// The first event stored at or after this time.
    Time(DateTime<Utc>),
    /// The last event of every task, then every new one (the state at start-up, then live).
    LastOfEachTask,
}

/// An ordered consumer (ephemeral, flow-controlled, recreated by the client after a gap) on the events of
/// `task`, or of every task when `None`, from `start`. Decode what it delivers with [`decode_message`].
pub async fn ordered(
    stream: &Stream,
    names: &Names,
    task: Option<TaskId>,
    start: Start,
) -> Result<pull::Ordered, LogError> {
    let deliver_policy = match start {
        Start::First => DeliverPolicy::All,
        Start::Sequence(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
        Start::Time(at) => DeliverPolicy::ByStartTime {
            start_time: to_time(at),
        },
        Start::LastOfEachTask => DeliverPolicy::LastPerSubject,
    };
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: task.map_or_else(|| names.events_all(), |t| names.events(t)),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| LogError::read("ordered consumer", e))?;
    consumer
        .messages()
        .await
        .map_err(|e| LogError::read("ordered consumer", e))
}

/// A start time for the server, to the second (a scan from it may include the rest of that second).
fn to_time(at: DateTime<Utc>) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(at.timestamp())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_built_and_parsed_back() {
        let task = TaskId::from_idempotency_key("log-test");
        let id = msg_id(task, 7, "accepted");
        assert_eq!(id, format!("{task}:7:accepted"));
        assert_eq!(parse_msg_id(&id), Some((task, 7, "accepted")));
        assert_eq!(position_from_msg_id(task, &id), Some(7));
        assert_eq!(position_from_msg_id(TaskId::mint(), &id), None);
        assert_eq!(parse_msg_id("launch:whatever"), None);
        assert_eq!(parse_msg_id(&format!("{task}:x:accepted")), None);
        assert_eq!(parse_msg_id(&format!("{task}:7")), None);
    }
}
