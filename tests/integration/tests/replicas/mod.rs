//! What the tests of several engine replicas share: the whole event log read with the headers that say
//! which engine appended each event.
#![allow(dead_code)]

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use taskpods_engine::store::HEADER_ENGINE;
use taskpods_events::codec::HEADER_KIND;
use taskpods_events::{Addressed, Names, TaskId};
use taskpods_projections::log::{self, Start};

/// One event as stored: its task, kind, stream sequence and the engine that appended it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    /// The task.
    pub task: TaskId,
    /// The event's kind (`accepted`, `scheduled`, …).
    pub kind: String,
    /// The stream sequence.
    pub sequence: u64,
    /// The `Taskpods-Engine` header: the replica that appended it.
    pub engine: Option<String>,
    /// When the server stored it.
    pub stored_at: chrono::DateTime<chrono::Utc>,
}

/// Every event of the event stream, in order, read within `within`.
pub async fn event_log(js: &jetstream::Context, names: &Names, within: Duration) -> Vec<Logged> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, try_event_log(js, names)).await {
            Ok(Ok(logged)) => return logged,
            Ok(Err(e)) if tokio::time::Instant::now() < deadline => {
                eprintln!("reading the event log: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(Err(e)) => panic!("reading the event log: {e}"),
            Err(_) => panic!("the event log was not read within {within:?}"),
        }
    }
}

async fn try_event_log(
    js: &jetstream::Context,
    names: &Names,
) -> Result<Vec<Logged>, async_nats::Error> {
    let mut stream = js.get_stream(names.event_stream()).await?;
    let last = stream.info().await?.state.last_sequence;
    let mut logged = Vec::new();
    if last == 0 {
        return Ok(logged);
    }
    let mut messages = log::ordered(&stream, names, None, Start::First).await?;
    while let Some(message) = messages.next().await {
        let message = message?;
        let info = message.info()?;
        let sequence = info.stream_sequence;
        let published = info.published.unix_timestamp_nanos();
        let stored_at =
            chrono::DateTime::from_timestamp_nanos(i64::try_from(published).unwrap_or(i64::MAX));
        let Ok(Addressed::Events(task)) = names.parse(&message.subject) else {
            continue;
        };
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        logged.push(Logged {
            task,
            kind: header(HEADER_KIND).unwrap_or_default(),
            sequence,
            engine: header(HEADER_ENGINE),
            stored_at,
        });
        if sequence >= last {
            break;
        }
    }
    Ok(logged)
}
