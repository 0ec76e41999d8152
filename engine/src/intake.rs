//! Command intake: the durable consumer of the command stream. Every launch, cancel and agent report is
//! decoded, judged by the state machine and appended through the event store, and only then acked, so a
//! crash at any point replays the command and the replay is a no-op (deterministic ids, expected
//! sequences).
//!
//! Commands for one task are applied in order: messages are sharded by task id onto sequential workers;
//! different tasks proceed in parallel, bounded by the consumer's max ack pending and the shard queues.
//! A command that cannot be read is acked, kept in the dead-letter stream with its reason, and counted;
//! a launch that can be tied to a task id is also recorded as `Rejected`, so its caller learns why.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::pull, stream::Stream};
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use serde::Deserialize;
use taskpods_events::codec::{self, HEADER_CONTENT_TYPE, HEADER_MSG_ID};
use taskpods_events::{
    Addressed, AgentReport, CancelTask, CodecError, CommandReply, Encoding, HEADER_REPLY_TO, Input,
    LaunchPolicy, LaunchTask, Names, Problem, Refusal, TaskId,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::{EventStore, ExecuteError, LoadedTask, StoreErrorKind};

/// Header on a dead letter: why the command could not be read.
pub const HEADER_DEAD_REASON: &str = "Taskpods-Dead-Reason";
/// Header on a dead letter: where the command was published.
pub const HEADER_ORIGINAL_SUBJECT: &str = "Taskpods-Original-Subject";

/// Intake settings.
#[derive(Debug, Clone)]
pub struct IntakeConfig {
    /// The durable consumer's name; engine replicas share it.
    pub durable_name: String,
    /// Commands delivered but not yet acked, at most (backpressure on the stream).
    pub max_in_flight: usize,
    /// Sequential workers; a task always maps to the same one.
    pub workers: usize,
    /// How long the server waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// How long to wait before a command that hit a transient failure is redelivered.
    pub retry_delay: Duration,
    /// The largest command payload read; larger ones are dead-lettered.
    pub max_payload_bytes: usize,
    /// The limits launches are validated against.
    pub policy: LaunchPolicy,
    /// Tasks whose latest state each worker keeps in memory, to skip a load per command.
    pub cache_per_worker: usize,
}

impl Default for IntakeConfig {
    fn default() -> Self {
        Self {
            durable_name: "taskpods-intake".to_owned(),
            max_in_flight: 1024,
            workers: 32,
            ack_wait: Duration::from_secs(30),
            retry_delay: Duration::from_millis(500),
            max_payload_bytes: 1 << 20,
            policy: LaunchPolicy::default(),
            cache_per_worker: 4096,
        }
    }
}

/// Errors that stop the intake.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The consumer could not be created or read.
    #[error("command consumer: {0}")]
    Consumer(async_nats::Error),
}

/// Counters an operator (and the tests) read.
#[derive(Debug, Default)]
pub struct IntakeStats {
    /// Commands that appended at least one event.
    pub applied: AtomicU64,
    /// Launches that were invalid (recorded as `Rejected`).
    pub rejected: AtomicU64,
    /// Commands the state machine refused (nothing appended).
    pub refused: AtomicU64,
    /// Commands that could not be read (dead-lettered).
    pub dead_lettered: AtomicU64,
    /// Transient failures (the command was left for redelivery).
    pub retried: AtomicU64,
}

/// Everything a worker needs.
#[derive(Debug)]
struct Shared {
    js: jetstream::Context,
    client: async_nats::Client,
    store: EventStore,
    names: Names,
    config: IntakeConfig,
    stats: Arc<IntakeStats>,
}

/// Runs the intake until `shutdown`, then finishes the commands in hand.
pub async fn run(
    js: jetstream::Context,
    client: async_nats::Client,
    commands: Stream,
    store: EventStore,
    config: IntakeConfig,
    stats: Arc<IntakeStats>,
    shutdown: CancellationToken,
) -> Result<(), IntakeError> {
    let consumer: pull::Stream = commands
        .get_or_create_consumer(
            &config.durable_name,
            pull::Config {
                durable_name: Some(config.durable_name.clone()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait,
                max_ack_pending: i64::try_from(config.max_in_flight).unwrap_or(i64::MAX),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| IntakeError::Consumer(e.into()))?
        .messages()
        .await
        .map_err(|e| IntakeError::Consumer(e.into()))?;
    let names = store.names().clone();
    let shared = Arc::new(Shared {
        js,
        client,
        store,
        names,
        config: config.clone(),
        stats,
    });

    let workers = config.workers.max(1);
    let mut queues = Vec::with_capacity(workers);
    let mut handles = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = mpsc::channel::<Routed>(64);
        queues.push(tx);
        handles.push(tokio::spawn(worker(shared.clone(), rx)));
    }
    info!(
        workers,
        max_in_flight = config.max_in_flight,
        "intake running"
    );

    let mut messages = consumer;
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => break,
            next = messages.next() => next,
        };
        let message = match message {
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                // Heartbeat misses and reconnects surface here; the consumer keeps going.
                warn!(error = %e, "command consumer hiccup");
                continue;
            }
            None => break,
        };
        let routed = route(&shared, message);
        let shard = routed.shard(workers);
        if queues[shard].send(routed).await.is_err() {
            break;
        }
    }
    drop(queues);
    for handle in handles {
        let _ = handle.await;
    }
    info!("intake stopped");
    Ok(())
}

/// A command with what routing learned about it.
struct Routed {
    message: jetstream::Message,
    kind: Result<Command, DeadLetter>,
}

enum Command {
    Launch {
        task: TaskId,
        launch: Box<Result<LaunchTask, CodecError>>,
        encoding: Encoding,
    },
    Cancel {
        task: TaskId,
        cancel: Result<CancelTask, CodecError>,
        encoding: Encoding,
    },
    Agent {
        task: TaskId,
        kind: String,
        report: Result<AgentReport, CodecError>,
        encoding: Encoding,
    },
}

impl Command {
    fn task(&self) -> TaskId {
        match self {
            Self::Launch { task, .. } | Self::Cancel { task, .. } | Self::Agent { task, .. } => {
                *task
            }
        }
    }
}

/// Why a command went to the dead-letter stream.
#[derive(Debug)]
struct DeadLetter {
    /// A short token for the subject (`bad_subject`, `content_type`, `too_large`, `undecodable`).
    reason: &'static str,
    /// The full explanation.
    detail: String,
}

impl Routed {
    fn shard(&self, workers: usize) -> usize {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        match &self.kind {
            Ok(command) => command.task().hash(&mut hasher),
            Err(_) => self.message.subject.as_str().hash(&mut hasher),
        }
        (hasher.finish() % workers as u64) as usize
    }
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers.and_then(|h| h.get(name)).map(|v| v.as_str())
}

/// Works out what a message is and which task it is for, without touching the network.
fn route(shared: &Shared, message: jetstream::Message) -> Routed {
    let kind = classify(shared, &message);
    Routed { message, kind }
}

fn classify(shared: &Shared, message: &jetstream::Message) -> Result<Command, DeadLetter> {
    let dead = |reason, detail: String| DeadLetter { reason, detail };
    let addressed = shared
        .names
        .parse(message.subject.as_str())
        .map_err(|e| dead("bad_subject", e.to_string()))?;
    let headers = message.headers.as_ref();
    let encoding = Encoding::from_content_type(header(headers, HEADER_CONTENT_TYPE))
        .map_err(|e| dead("content_type", e.to_string()))?;
    let payload = &message.payload;
    if payload.len() > shared.config.max_payload_bytes {
        return Err(dead(
            "too_large",
            CodecError::TooLarge {
                size: payload.len(),
                max: shared.config.max_payload_bytes,
            }
            .to_string(),
        ));
    }
    match addressed {
        Addressed::Launch => {
            let launch = codec::decode::<LaunchTask>("launch command", payload, encoding);
            let task = match &launch {
                // A launch without id or key is tied to its message id, so a re-publish of the same
                // message (after the stream's duplicate window) still finds the same task.
                Ok(launch) => launch.task_id().or_else(|| {
                    header(headers, HEADER_MSG_ID)
                        .map(|id| TaskId::from_idempotency_key(&format!("msg-id:{id}")))
                }),
                // Even a launch we cannot read may name its task; then its caller can learn why. A
                // message id alone does not make garbage a task.
                Err(_) => launch_identity(payload, encoding),
            };
            match (task, launch) {
                (Some(task), launch) => Ok(Command::Launch {
                    task,
                    launch: Box::new(launch),
                    encoding,
                }),
                (None, Ok(launch)) => Ok(Command::Launch {
                    task: TaskId::mint(),
                    launch: Box::new(Ok(launch)),
                    encoding,
                }),
                (None, Err(e)) => Err(undecodable(&e)),
            }
        }
        Addressed::Cancel(task) => {
            let cancel = if payload.is_empty() {
                Ok(CancelTask {
                    task_id: task.0,
                    reason: None,
                    requester: None,
                })
            } else {
                codec::decode::<CancelTask>("cancel command", payload, encoding)
            };
            Ok(Command::Cancel {
                task,
                cancel,
                encoding,
            })
        }
        Addressed::AgentReport(task, kind) => Ok(Command::Agent {
            task,
            report: codec::decode::<AgentReport>("agent report", payload, encoding),
            kind,
            encoding,
        }),
        other => Err(dead(
            "bad_subject",
            format!("{other:?} is not a command subject"),
        )),
    }
}

/// The task a launch names, read leniently from a payload that failed strict decoding.
fn launch_identity(payload: &[u8], encoding: Encoding) -> Option<TaskId> {
    #[derive(Deserialize)]
    struct Identity {
        #[serde(default)]
        task_id: Option<uuid::Uuid>,
        #[serde(default)]
        idempotency_key: Option<String>,
    }
    let identity: Identity = codec::decode("launch identity", payload, encoding).ok()?;
    identity.task_id.map(TaskId).or_else(|| {
        identity
            .idempotency_key
            .filter(|k| !k.is_empty() && k.len() <= 256)
            .map(|k| TaskId::from_idempotency_key(&k))
    })
}

async fn worker(shared: Arc<Shared>, mut queue: mpsc::Receiver<Routed>) {
    let mut cache: HashMap<TaskId, LoadedTask> = HashMap::new();
    while let Some(routed) = queue.recv().await {
        let Routed { message, kind } = routed;
        let disposition = match kind {
            Ok(command) => apply(&shared, &mut cache, command, &message).await,
            Err(dead) => dead_letter(&shared, &message, dead).await,
        };
        let ack = match disposition {
            Disposition::Done => AckKind::Ack,
            Disposition::Retry => {
                shared.stats.retried.fetch_add(1, Ordering::Relaxed);
                AckKind::Nak(Some(shared.config.retry_delay))
            }
        };
        if let Err(e) = message.ack_with(ack).await {
            // The command will be redelivered; applying it again is a no-op.
            warn!(error = %e, subject = %message.subject, "ack failed");
        }
    }
}

enum Disposition {
    /// Applied, refused, or dead-lettered: ack.
    Done,
    /// A transient failure: leave it for redelivery.
    Retry,
}

async fn apply(
    shared: &Shared,
    cache: &mut HashMap<TaskId, LoadedTask>,
    command: Command,
    message: &jetstream::Message,
) -> Disposition {
    let now = Utc::now();
    let reply_to = header(message.headers.as_ref(), HEADER_REPLY_TO).map(str::to_owned);
    let (task, encoding, input, is_launch) = match command {
        Command::Launch {
            task,
            launch,
            encoding,
        } => {
            let spec = match *launch {
                Ok(launch) => launch.validate(&shared.config.policy),
                Err(e) => Err(vec![decode_problem(&e)]),
            };
            (task, encoding, Input::Launch { spec, at: now }, true)
        }
        Command::Cancel {
            task,
            cancel,
            encoding,
        } => match cancel {
            Ok(cancel) => (task, encoding, Input::Cancel(cancel), false),
            Err(e) => return dead_letter(shared, message, undecodable(&e)).await,
        },
        Command::Agent {
            task,
            kind,
            report,
            encoding,
        } => {
            let input = match report {
                Ok(AgentReport::Progress { message, percent }) => {
                    Input::AgentProgress { message, percent }
                }
                Ok(AgentReport::Result(outcome)) => Input::AgentResult(outcome),
                Ok(other) => {
                    debug!(%task, ?other, "agent report kind not handled by intake");
                    return Disposition::Done;
                }
                Err(e) => return dead_letter(shared, message, undecodable(&e)).await,
            };
            debug!(%task, %kind, "agent report");
            (task, encoding, input, false)
        }
    };

    // A launch is almost always for a new task: append with expected sequence 0 straight away and let a
    // conflict (the task exists) trigger the load. Saves a round trip on the hot path.
    let cached = cache
        .get(&task)
        .cloned()
        .or_else(|| is_launch.then(LoadedTask::default));
    let reply = match shared.store.execute(task, &input, now, cached).await {
        Ok(executed) => {
            remember(
                cache,
                task,
                executed.task.clone(),
                shared.config.cache_per_worker,
            );
            let first = executed.appended.first().map_or(0, |e| e.sequence);
            match &executed.appended.first().map(|e| &e.event.body) {
                Some(taskpods_events::EventBody::Rejected { problems }) => {
                    shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    CommandReply::Rejected {
                        task_id: task,
                        problems: problems.clone(),
                        sequence: first,
                    }
                }
                _ => {
                    shared.stats.applied.fetch_add(1, Ordering::Relaxed);
                    CommandReply::Applied {
                        task_id: task,
                        state: executed.task.task.state,
                        sequence: if is_launch {
                            first
                        } else {
                            executed.task.last_sequence
                        },
                        created: is_launch,
                    }
                }
            }
        }
        Err(ExecuteError::Refused {
            refusal,
            task: current,
        }) => {
            remember(
                cache,
                task,
                (*current).clone(),
                shared.config.cache_per_worker,
            );
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            match (refusal, is_launch) {
                // A repeated launch is answered with the task it names: that is the idempotency promise.
                (Refusal::AlreadyExists, true) => CommandReply::Applied {
                    task_id: task,
                    state: current.task.state,
                    sequence: current.first_sequence,
                    created: false,
                },
                _ => CommandReply::Refused {
                    task_id: task,
                    reason: refusal.to_string(),
                    state: current.task.state,
                },
            }
        }
        Err(ExecuteError::Store(e)) => match e.kind() {
            StoreErrorKind::Unavailable | StoreErrorKind::Conflict => {
                warn!(%task, error = %e, "transient store failure; command left for redelivery");
                cache.remove(&task);
                return Disposition::Retry;
            }
            StoreErrorKind::Corrupt | StoreErrorKind::TooLarge | StoreErrorKind::Other => {
                warn!(%task, error = %e, "command cannot be applied");
                cache.remove(&task);
                CommandReply::Invalid {
                    error: e.to_string(),
                }
            }
        },
    };
    send_reply(shared, reply_to, encoding, &reply).await;
    Disposition::Done
}

fn remember(cache: &mut HashMap<TaskId, LoadedTask>, task: TaskId, loaded: LoadedTask, max: usize) {
    if cache.len() >= max && !cache.contains_key(&task) {
        // Crude but bounded: a cache miss only costs one load.
        cache.clear();
    }
    cache.insert(task, loaded);
}

fn undecodable(error: &CodecError) -> DeadLetter {
    DeadLetter {
        reason: "undecodable",
        detail: error.to_string(),
    }
}

fn decode_problem(error: &CodecError) -> Problem {
    match error {
        CodecError::Decode { path, message, .. } => Problem {
            field: path.clone(),
            message: message.clone(),
        },
        other => Problem {
            field: ".".to_owned(),
            message: other.to_string(),
        },
    }
}

async fn dead_letter(
    shared: &Shared,
    message: &jetstream::Message,
    dead: DeadLetter,
) -> Disposition {
    warn!(subject = %message.subject, reason = dead.reason, detail = %dead.detail, "dead-lettering command");
    let original = message.headers.as_ref();
    let mut headers = original.cloned().unwrap_or_default();
    headers.insert(HEADER_DEAD_REASON, dead.detail.as_str());
    headers.insert(HEADER_ORIGINAL_SUBJECT, message.subject.as_str());
    // The original Nats-Msg-Id makes a redelivered dead letter a duplicate, not a second record.
    let subject = shared.names.dead_letter(dead.reason);
    let stored = async {
        shared
            .js
            .publish_with_headers(subject, headers, message.payload.clone())
            .await?
            .await
    };
    if let Err(e) = stored.await {
        warn!(error = %e, "dead-letter stream unavailable; command left for redelivery");
        return Disposition::Retry;
    }
    shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    let encoding = Encoding::from_content_type(header(original, HEADER_CONTENT_TYPE))
        .unwrap_or(Encoding::Json);
    let reply_to = header(original, HEADER_REPLY_TO).map(str::to_owned);
    send_reply(
        shared,
        reply_to,
        encoding,
        &CommandReply::Invalid { error: dead.detail },
    )
    .await;
    Disposition::Done
}

async fn send_reply(
    shared: &Shared,
    reply_to: Option<String>,
    encoding: Encoding,
    reply: &CommandReply,
) {
    let Some(reply_to) = reply_to else {
        return;
    };
    let payload = match codec::encode(reply, encoding) {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "cannot encode reply");
            return;
        }
    };
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_CONTENT_TYPE, encoding.content_type());
    // Replies are best effort: the caller can always read the task's events instead.
    if let Err(e) = shared
        .client
        .publish_with_headers(reply_to, headers, Bytes::from(payload))
        .await
    {
        debug!(error = %e, "reply not sent");
    }
}
