//! Reading the event log: a stored message (from a consumer or a direct get) becomes a [`LoggedEvent`],
//! keeping what the envelope alone does not say: the stream sequence, when the server stored it, the
//! task position from `Nats-Msg-Id`, and the kind named in `Taskpods-Kind` (which survives when this build
//! does not know the kind and decodes the body as `Unknown`).

use async_nats::HeaderMap;
use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use chrono::{DateTime, Utc};
use taskpods_events::codec::{self, HEADER_KIND, HEADER_MSG_ID};
use taskpods_events::{Addressed, Event, EventBody, Names, TaskId};

/// Why a stored message is not a usable event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
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
    #[error("sequence {seq}: undecodable event: {message}")]
    Undecodable {
        /// Stream sequence.
        seq: u64,
        /// The codec's message (with the field path).
        message: String,
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
    #[error("reading the event stream: {0}")]
    Read(String),
}

/// One event as stored on the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedEvent {
    /// Stream sequence.
    pub seq: u64,
    /// When the server stored it.
    pub stored_at: DateTime<Utc>,
    /// The event's position in its task (0 for the first), from `Nats-Msg-Id`; `None` when the writer
    /// did not set a taskpods message id.
    pub position: Option<u64>,
    /// The kind as written: the `Taskpods-Kind` header, else the decoded body's kind. For a kind this
    /// build does not know, `event.body` is `Unknown` and this keeps its real name.
    pub kind: String,
    /// The decoded envelope.
    pub event: Event,
}

impl LoggedEvent {
    /// The task it belongs to.
    pub fn task(&self) -> TaskId {
        self.event.task
    }

    /// Whether this build does not know the kind.
    pub fn is_unknown(&self) -> bool {
        matches!(self.event.body, EventBody::Unknown)
    }
}

/// Decodes a stored message. `time` is the server's storage time.
pub fn decode(
    names: &Names,
    subject: &str,
    seq: u64,
    headers: Option<&HeaderMap>,
    payload: &[u8],
    stored_at: DateTime<Utc>,
) -> Result<LoggedEvent, LogError> {
    let subject_task = match names.parse(subject) {
        Ok(Addressed::Events(task)) => task,
        _ => {
            return Err(LogError::Foreign {
                seq,
                subject: subject.to_owned(),
            });
        }
    };
    let event = codec::decode_event(payload).map_err(|e| LogError::Undecodable {
        seq,
        message: e.to_string(),
    })?;
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
    Ok(LoggedEvent {
        seq,
        stored_at,
        position,
        kind,
        event,
    })
}

/// The position in a taskpods message id `<task>:<position>:<kind>` of `task`.
pub fn position_from_msg_id(task: TaskId, msg_id: &str) -> Option<u64> {
    let mut parts = msg_id.splitn(3, ':');
    let id = parts.next()?;
    let position = parts.next()?;
    parts.next()?;
    if id.parse::<TaskId>().ok()? != task {
        return None;
    }
    position.parse().ok()
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
pub type Read = Result<LoggedEvent, LogError>;

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
            Err(e) => return Err(LogError::Read(e.to_string())),
        }
    }
    Ok(out)
}
