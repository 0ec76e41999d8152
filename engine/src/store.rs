//! The event store: a task's events live on its own subject of the event stream. Appends carry the
//! expected last sequence of that subject (optimistic concurrency) and a deterministic `Nats-Msg-Id`
//! (task, position, kind), so concurrent writers cannot interleave and a retry after a crash is a no-op.
//!
//! [`EventStore::execute`] is the one way the engine changes a task: load, `decide`, append, and on a
//! conflict reload and decide again.
//!
//! Reading a task's whole history costs in proportion to its length, so the loops that see every event
//! keep their own folded state and read only on a gap or conflict; [`StoreStats`] counts every read
//! (per store, and in the process's metrics) so tests can hold them to it.
//!
//! The store (shared by every loop of an engine) also keeps each live task's latest state as this
//! engine's own appends left it ([`LatestStates`]), and `execute` starts from the fresher of that and the
//! caller's state: the gateway's hello, the intake's agent result and a backend's observations then need
//! no read when this engine wrote the task's last event, which it does for most of a task's life. The
//! cache can only be behind the log (it is written after the server acked the append), and a state that
//! is behind costs what it always did: an append that expected an older sequence is refused by the server
//! (a conflict, then a read), and a refusal judged on a cached state is judged again on a read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::stream::{
    DirectGetErrorKind, LastRawMessageError, LastRawMessageErrorKind,
};
use async_nats::jetstream::{self, stream::Stream};
use chrono::{DateTime, Utc};
use taskpods_events::codec::{self, CodecError, HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE};
use taskpods_events::{
    Event, EventBody, Input, Names, Refusal, Task, TaskId, decide, evolve, stamp,
};
use taskpods_projections::log::{self, LogError};
use tracing::debug;

/// Header on every appended event: the engine replica that appended it (its `engine_id`), so a task's
/// events show which replica did each effect.
pub const HEADER_ENGINE: &str = "Taskpods-Engine";

/// How many times `execute` reloads and decides again after losing a race.
const CONFLICT_RETRIES: usize = 8;

/// Live tasks whose latest state a store keeps at most; past it the cache is emptied (a forgotten task
/// costs one read at its next command). Finished tasks are dropped at once, so this bounds an engine
/// with this many live tasks, not its history.
const LATEST_HELD: usize = 65_536;

/// What went wrong with a store operation, for callers that branch on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// Another writer appended to the task first; reload and decide again.
    Conflict,
    /// The server did not answer in time or the connection broke; retry later (nothing is lost: the
    /// command stays unacked).
    Unavailable,
    /// A stored event could not be decoded (written by a broken client, or corrupted).
    Corrupt,
    /// The event is larger than the stream accepts.
    TooLarge,
    /// The event stream is full (its byte or message limit, with discard-new): nothing is dropped
    /// from the log of record to make room, so the write waits until an operator raises the limit.
    Full,
    /// Anything else the server refused.
    Other,
}

/// A store failure; [`StoreError::kind`] says what kind, from async-nats's own error kinds.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading the task's events failed: the stream could not be read, or an event is unusable.
    #[error("event store: {0}")]
    Read(#[source] LogError),
    /// An event could not be encoded (a bug: every event is encodable).
    #[error("event store: {0}")]
    Encode(#[source] CodecError),
    /// An env value could not be sealed (no randomness).
    #[error("event store: {0}")]
    Seal(#[source] crate::seal::SealError),
    /// The server did not take an append.
    #[error("event store: append: {0}")]
    Append(#[source] PublishError),
    /// Someone (another replica, or this one before a crash) wrote this position first.
    #[error("event store: event {msg_id} was already written (sequence {sequence})")]
    Duplicate {
        /// The event's message id.
        msg_id: String,
        /// The stream sequence it was stored at.
        sequence: u64,
    },
    /// Other writers kept winning the race for the task.
    #[error("event store: too many concurrent writers")]
    Contended,
    /// The task's events read back end before an event known to be stored: the stream replica that
    /// answered is behind (on a cluster any replica answers direct gets).
    #[error(
        "event store: the events of {task} read end before sequence {sequence} (a lagging replica)"
    )]
    Behind {
        /// The task.
        task: TaskId,
        /// The sequence known to be stored.
        sequence: u64,
    },
    /// The stream leader could not be asked for a task's last sequence (to confirm a refusal).
    #[error("event store: ask the stream leader: {0}")]
    Leader(#[source] LastRawMessageError),
}

impl StoreError {
    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            Self::Read(LogError::Read { .. }) => StoreErrorKind::Unavailable,
            Self::Read(_) => StoreErrorKind::Corrupt,
            Self::Encode(_) | Self::Seal(_) => StoreErrorKind::Other,
            Self::Append(e) => match e.kind() {
                PublishErrorKind::Other if refused_as_full(e) => StoreErrorKind::Full,
                PublishErrorKind::WrongLastSequence => StoreErrorKind::Conflict,
                PublishErrorKind::TimedOut
                | PublishErrorKind::BrokenPipe
                | PublishErrorKind::MaxAckPending
                | PublishErrorKind::StreamNotFound => StoreErrorKind::Unavailable,
                PublishErrorKind::MaxPayloadExceeded => StoreErrorKind::TooLarge,
                _ => StoreErrorKind::Other,
            },
            Self::Duplicate { .. } | Self::Contended => StoreErrorKind::Conflict,
            Self::Behind { .. } | Self::Leader(_) => StoreErrorKind::Unavailable,
        }
    }
}

/// Whether the stream refused an append because it hit its limits: JetStream's own error code (the
/// append's source), never the message text.
fn refused_as_full(error: &PublishError) -> bool {
    let code = std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .map(jetstream::Error::error_code);
    matches!(
        code,
        Some(jetstream::ErrorCode::STREAM_STORE_FAILED)
            | Some(jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED)
    )
}

/// Why `execute` appended nothing.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    /// The state machine refused the input; `task` is the state it judged.
    #[error("refused: {refusal}")]
    Refused {
        /// Why.
        refusal: Refusal,
        /// The task as it stood.
        task: Box<LoadedTask>,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A task folded from the stream, with the stream sequence of its last event (0: no events).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadedTask {
    /// The folded task.
    pub task: Task,
    /// Stream sequence of the task's last event; the expected sequence for the next append.
    pub last_sequence: u64,
    /// Stream sequence of the task's first event (0: none).
    pub first_sequence: u64,
}

impl LoadedTask {
    /// Whether nothing more can ever happen to the task: unknown (no events), or ended with its sandbox
    /// gone or never made.
    pub fn finished(&self) -> bool {
        self.task.state == taskpods_events::TaskState::New
            || (self.task.state.is_terminal() && (self.task.reaped || self.task.job.is_none()))
    }
}

pub use taskpods_projections::log::StoredEvent;

/// The outcome of a successful `execute`.
#[derive(Debug, Clone)]
pub struct Executed {
    /// The events appended, in order.
    pub appended: Vec<StoredEvent>,
    /// The task after them.
    pub task: LoadedTask,
}

/// What a store has read, since it was made (shared by its clones).
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Reads of a task's events ([`EventStore::load`] and [`EventStore::read`] of the whole history,
    /// including the reloads `execute` does after a conflict or a refusal judged on a cached state, and
    /// [`EventStore::read_after`] of the events after a sequence).
    pub loads: AtomicU64,
    /// Events those reads returned.
    pub events_read: AtomicU64,
    /// Reads of a task's first event alone ([`EventStore::first`]: one message, whatever the history).
    pub first_reads: AtomicU64,
}

impl StoreStats {
    /// `(loads, events_read)` now.
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.loads.load(Ordering::Relaxed),
            self.events_read.load(Ordering::Relaxed),
        )
    }
}

/// Reads and appends task events.
#[derive(Debug, Clone)]
pub struct EventStore {
    js: jetstream::Context,
    stream: Stream,
    names: Names,
    sealer: Option<std::sync::Arc<crate::seal::Sealer>>,
    stats: Arc<StoreStats>,
    engine: Option<String>,
    latest: Arc<LatestStates>,
}

/// Each live task's latest state as this engine's own appends (and the reads `execute` made) left it:
/// the starting point of the next `execute` for the task. Shared by a store's clones.
#[derive(Debug, Default)]
pub struct LatestStates {
    tasks: Mutex<HashMap<TaskId, LoadedTask>>,
}

impl LatestStates {
    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, LoadedTask>> {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The held state of `task`, if any.
    fn get(&self, task: TaskId) -> Option<LoadedTask> {
        self.tasks().get(&task).cloned()
    }

    /// Keeps `loaded` as `task`'s latest state unless a later one is held; drops the task once
    /// nothing more can happen to it.
    fn keep(&self, task: TaskId, loaded: &LoadedTask) {
        let mut tasks = self.tasks();
        if loaded.finished() {
            tasks.remove(&task);
            return;
        }
        match tasks.get_mut(&task) {
            Some(held) if held.last_sequence >= loaded.last_sequence => {}
            Some(held) => held.clone_from(loaded),
            None => {
                if tasks.len() >= LATEST_HELD {
                    tasks.clear();
                }
                tasks.insert(task, loaded.clone());
            }
        }
    }

    /// Drops `task`'s held state if it is older than `sequence`, where an event that ended the task is
    /// stored: another engine ended it (or moved it on before), so this engine's copy would only cost a
    /// conflict, and without this it would stay until the bound empties the cache.
    pub fn ended_at(&self, task: TaskId, sequence: u64) {
        let mut tasks = self.tasks();
        if tasks
            .get(&task)
            .is_some_and(|held| held.last_sequence < sequence)
        {
            tasks.remove(&task);
        }
    }

    /// Tasks held now.
    pub fn len(&self) -> usize {
        self.tasks().len()
    }

    /// Whether no task is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl EventStore {
    /// A store over the event stream `stream` (from the topology).
    pub fn new(js: jetstream::Context, stream: Stream, names: Names) -> Self {
        Self {
            js,
            stream,
            names,
            sealer: None,
            stats: Arc::default(),
            engine: None,
            latest: Arc::default(),
        }
    }

    /// The live tasks' latest states this store (and its clones) holds.
    pub fn latest(&self) -> &Arc<LatestStates> {
        &self.latest
    }

    /// What this store (and its clones) has read.
    pub fn stats(&self) -> &Arc<StoreStats> {
        &self.stats
    }

    /// Marks every appended event with `engine_id` ([`HEADER_ENGINE`]).
    pub fn with_engine(mut self, engine_id: &str) -> Self {
        self.engine = Some(engine_id.to_owned());
        self
    }

    /// Seals env values before they are written (the `accepted` event), with `sealer`.
    pub fn with_sealer(mut self, sealer: std::sync::Arc<crate::seal::Sealer>) -> Self {
        self.sealer = Some(sealer);
        self
    }

    /// The sealer env values are sealed with, if any.
    pub fn sealer(&self) -> Option<&crate::seal::Sealer> {
        self.sealer.as_deref()
    }

    /// `event` as it is written: with its launch's env values sealed.
    fn sealed(&self, event: &Event) -> Result<Event, StoreError> {
        let (Some(sealer), EventBody::Accepted { spec, .. }) = (&self.sealer, &event.body) else {
            return Ok(event.clone());
        };
        if spec.env.values().all(|v| !v.is_clear()) {
            return Ok(event.clone());
        }
        let env = sealer
            .seal_env(event.task, &spec.env)
            .map_err(StoreError::Seal)?;
        let mut sealed = event.clone();
        if let EventBody::Accepted { spec, .. } = &mut sealed.body {
            spec.env = env;
        }
        Ok(sealed)
    }

    /// The subject names in use.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Every event of `task`, in order, with stream sequences.
    pub async fn read(&self, task: TaskId) -> Result<Vec<StoredEvent>, StoreError> {
        self.read_after(task, 0).await
    }

    /// The events of `task` stored after stream sequence `after`, in order: what a holder of the task's
    /// state up to `after` is missing, at a cost in proportion to that and not to the whole history.
    pub async fn read_after(
        &self,
        task: TaskId,
        after: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let events: Vec<StoredEvent> =
            log::read_task(&self.stream, &self.names, task, after + 1, u64::MAX)
                .await
                .map_err(StoreError::Read)?
                .into_iter()
                .collect::<Result<_, _>>()
                .map_err(StoreError::Read)?;
        let read = events.len() as u64;
        self.stats.loads.fetch_add(1, Ordering::Relaxed);
        self.stats.events_read.fetch_add(read, Ordering::Relaxed);
        crate::metrics::METRICS.store_loads.inc();
        crate::metrics::METRICS.store_events_read.inc_by(read);
        Ok(events)
    }

    /// The first event of `task` (its `accepted`, which holds the launch and the deadline, or its
    /// `rejected`): one direct get, whatever the length of its history. `None` for an unknown task.
    pub async fn first(&self, task: TaskId) -> Result<Option<StoredEvent>, StoreError> {
        self.stats.first_reads.fetch_add(1, Ordering::Relaxed);
        let subject = self.names.events(task);
        match self
            .stream
            .direct_get_next_for_subject(subject, Some(1))
            .await
        {
            Ok(message) => log::decode(
                &self.names,
                message.subject.as_str(),
                message.sequence,
                Some(&message.headers),
                &message.payload,
                log::to_chrono(message.time.unix_timestamp_nanos()),
            )
            .map(Some)
            .map_err(StoreError::Read),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Read(LogError::Read {
                operation: "direct get",
                source: e.into(),
            })),
        }
    }

    /// The task folded from all its events.
    pub async fn load(&self, task: TaskId) -> Result<LoadedTask, StoreError> {
        let events = self.read(task).await?;
        Ok(LoadedTask {
            first_sequence: events.first().map_or(0, |e| e.sequence),
            last_sequence: events.last().map_or(0, |e| e.sequence),
            task: Task::replay(events.iter().map(|e| &e.event)),
        })
    }

    /// The task folded from all its events, including at least the one stored at `sequence` (an event
    /// just delivered by a consumer). On a cluster any replica of the stream answers the direct gets a
    /// load is made of, and one that lags may not have that event yet: acting on its answer would act on
    /// a state the task has left. Such a read is retried for a moment, then reported
    /// [`StoreError::Behind`] (`Unavailable`: the caller retries later).
    pub async fn load_at_least(
        &self,
        task: TaskId,
        sequence: u64,
    ) -> Result<LoadedTask, StoreError> {
        let mut delay = Duration::from_millis(10);
        for _ in 0..8 {
            let loaded = self.load(task).await?;
            if loaded.last_sequence >= sequence {
                return Ok(loaded);
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        Err(StoreError::Behind { task, sequence })
    }

    /// The stream sequence of `task`'s last event as the stream leader holds it (0: no event). Not a
    /// direct get, which any replica answers (a lagging one too), but the message-get API, which only
    /// the leader answers: it includes every acknowledged append.
    pub async fn leader_last_sequence(&self, task: TaskId) -> Result<u64, StoreError> {
        match self
            .stream
            .get_last_raw_message_by_subject(&self.names.events(task))
            .await
        {
            Ok(message) => Ok(message.sequence),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(StoreError::Leader(e)),
        }
    }

    /// Appends `events` (positions following `expected.task.events`) after `expected.last_sequence`.
    /// A retry of the same append (same positions and kinds) is dropped by the server as a duplicate and
    /// answers with the original sequence.
    pub async fn append(
        &self,
        expected: &LoadedTask,
        events: &[Event],
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut last = expected.last_sequence;
        let mut stored = Vec::with_capacity(events.len());
        for (i, event) in events.iter().enumerate() {
            let position = expected.task.events + i as u64;
            let event = &self.sealed(event)?;
            let payload = codec::encode_event(event).map_err(StoreError::Encode)?;
            let mut headers = log::headers(event, position);
            headers.insert(
                HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE,
                last.to_string().as_str(),
            );
            if let Some(engine) = &self.engine {
                headers.insert(HEADER_ENGINE, engine.as_str());
            }
            let ack = self
                .js
                .publish_with_headers(self.names.events(event.task), headers, payload.into())
                .await
                .map_err(StoreError::Append)?
                .await
                .map_err(StoreError::Append)?;
            // The server checks the message id before the expected sequence, so a write of this
            // position by anyone (another replica, or ourselves before a crash) comes back as a
            // duplicate rather than a conflict: either way the log moved on, so judge again.
            if ack.duplicate {
                return Err(StoreError::Duplicate {
                    msg_id: log::msg_id(event.task, position, event.body.kind()),
                    sequence: ack.sequence,
                });
            }
            last = ack.sequence;
            stored.push(StoredEvent {
                sequence: ack.sequence,
                stored_at: None,
                position: Some(position),
                kind: event.body.kind().to_owned(),
                event: event.clone(),
            });
        }
        Ok(stored)
    }

    /// Loads the task, decides `input`, appends the result; on a lost race, reloads and decides again.
    /// It starts from the fresher of `cached` (the caller's view of the task) and the state this engine's
    /// own last write left ([`LatestStates`]), and reads only when it holds neither; a stale start only
    /// costs a conflict and a reload.
    pub async fn execute(
        &self,
        task_id: TaskId,
        input: &Input,
        at: DateTime<Utc>,
        cached: Option<LoadedTask>,
    ) -> Result<Executed, ExecuteError> {
        let cached = match (cached, self.latest.get(task_id)) {
            (Some(given), Some(held)) if held.last_sequence > given.last_sequence => Some(held),
            (given @ Some(_), _) => given,
            (None, held) => held,
        };
        let mut from_cache = cached.is_some();
        let mut confirmed = false;
        let mut current = match cached {
            Some(c) => c,
            None => self.load(task_id).await?,
        };
        for attempt in 0..=CONFLICT_RETRIES {
            let bodies = match decide(&current.task, input) {
                Ok(bodies) => bodies,
                // A cached view can only be behind the log, and a refusal judged on it may be wrong
                // (progress refused as "not running yet"): judge again on the log itself. A limit
                // reached on the view is reached on the log too (counts only grow), and re-reading a
                // long history for every report over the cap is exactly the cost the cap prevents.
                Err(refusal) if from_cache && !matches!(refusal, Refusal::LimitReached(_)) => {
                    from_cache = false;
                    current = self.load(task_id).await?;
                    continue;
                }
                // A read can only miss events, never add them: a refusal for lack of state (unknown
                // task, not in that state yet) judged on a lagging replica's read would be final and
                // wrong (an agent's result lost). Confirm it once against the stream leader; if the read
                // was behind, judge again on one that includes the leader's last event.
                Err(refusal) if !confirmed && may_come_from_a_lagging_read(&refusal) => {
                    confirmed = true;
                    let latest = self.leader_last_sequence(task_id).await?;
                    if latest <= current.last_sequence {
                        return Err(ExecuteError::Refused {
                            refusal,
                            task: Box::new(current),
                        });
                    }
                    debug!(%task_id, %refusal, read = current.last_sequence, latest, "refusal judged on a lagging read: judging again");
                    crate::metrics::METRICS.store_lagging_reads.inc();
                    current = self.load_at_least(task_id, latest).await?;
                    continue;
                }
                Err(refusal) => {
                    if !from_cache {
                        self.latest.keep(task_id, &current);
                    }
                    return Err(ExecuteError::Refused {
                        refusal,
                        task: Box::new(current),
                    });
                }
            };
            let events = stamp(task_id, &current.task, at, bodies);
            match self.append(&current, &events).await {
                Ok(appended) => {
                    crate::metrics::METRICS.appended(&current.task, &events);
                    crate::telemetry::appended(&current.task, &events);
                    let mut task = current.task;
                    for e in &appended {
                        task = evolve(task, &e.event);
                    }
                    let last_sequence = appended
                        .last()
                        .map_or(current.last_sequence, |e| e.sequence);
                    let first_sequence = if current.first_sequence == 0 {
                        appended.first().map_or(0, |e| e.sequence)
                    } else {
                        current.first_sequence
                    };
                    let task = LoadedTask {
                        task,
                        last_sequence,
                        first_sequence,
                    };
                    self.latest.keep(task_id, &task);
                    return Ok(Executed { appended, task });
                }
                Err(e) if e.kind() == StoreErrorKind::Conflict && attempt < CONFLICT_RETRIES => {
                    // Someone else moved the task on; judge the input again against the new state.
                    tokio::time::sleep(Duration::from_millis(attempt as u64)).await;
                    from_cache = false;
                    current = self.load(task_id).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Contended.into())
    }
}

/// Whether `refusal` says the task lacks something (it is unknown, or not yet in the state the input
/// needs): what a read that misses the latest events can wrongly conclude. The other refusals rest on
/// events the read did show, which stay true however far behind it is.
fn may_come_from_a_lagging_read(refusal: &Refusal) -> bool {
    matches!(
        refusal,
        Refusal::UnknownTask | Refusal::NotNow(_) | Refusal::NotYet
    )
}
