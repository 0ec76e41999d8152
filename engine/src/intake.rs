//! Command intake: the durable consumer of the command stream. Every launch, cancel and agent report is
//! decoded, judged by the state machine and appended through the event store, and only then acked, so a
//! crash at any point replays the command and the replay is a no-op (deterministic ids, expected
//! sequences).
//!
//! Commands for one task are applied in order: messages are sharded by task id onto sequential workers;
//! different tasks proceed in parallel, bounded by the consumer's max ack pending and the shard queues.
//! A command that cannot be read is acked, kept in the dead-letter stream with its reason, and counted;
//! a launch that can be tied to a task id is also recorded as `Rejected`, so its caller learns why.
//!
//! Hostile input never stops the intake: every header value and log line built from input is escaped
//! and bounded ([`escape_bounded`]); a panic while handling one message is caught, the message
//! dead-lettered (`panicked`) and the worker carries on (a worker that dies anyway is respawned); a
//! message delivered `max_deliver` times without being handled is dead-lettered (`exhausted`) instead of
//! being redelivered forever. Agent progress reports are capped in size and rate per task here, and in
//! count per task by the state machine.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull, context::PublishErrorKind};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use futures::FutureExt;
use serde::Deserialize;
use taskpods_events::codec::{self, HEADER_CONTENT_TYPE, HEADER_MSG_ID};
use taskpods_events::{
    Addressed, AgentReport, CancelTask, CodecError, CommandReply, Encoding, HEADER_REPLY_TO, Input,
    LaunchPolicy, LaunchTask, Names, Problem, Refusal, TaskId,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument as _, debug, error, info, warn};

use crate::context::EngineCtx;
use crate::store::{ExecuteError, LoadedTask, StoreErrorKind};

/// Header on a dead letter: why the command could not be read.
pub const HEADER_DEAD_REASON: &str = "Taskpods-Dead-Reason";
/// Header on a dead letter: where the command was published.
pub const HEADER_ORIGINAL_SUBJECT: &str = "Taskpods-Original-Subject";
/// Header on a dead letter kept without its original headers and cut to its first bytes, because the
/// whole would not fit: the original payload size.
pub const HEADER_DEAD_TRUNCATED: &str = "Taskpods-Dead-Truncated-From";
/// How much of a command's payload such a bounded dead letter keeps.
const DEAD_LETTER_KEPT_BYTES: usize = 64 << 10;
/// The longest header value (and log field) the intake builds from input, in bytes.
pub const MAX_HEADER_VALUE_BYTES: usize = 1024;

/// Intake settings.
#[derive(Debug, Clone)]
pub struct IntakeConfig {
    /// The durable consumer's name; engine replicas share it.
    pub durable_name: String,
    /// Commands delivered but not yet acked, at most (backpressure on the stream).
    pub max_in_flight: usize,
    /// Sequential workers; a task always maps to the same one.
    pub workers: usize,
    /// How long the server waits for an ack before redelivering: the time a dead replica's commands
    /// take to reach another.
    pub ack_wait: Duration,
    /// How long to wait before a command that hit a transient failure is redelivered.
    pub retry_delay: Duration,
    /// The largest command payload read; larger ones are dead-lettered.
    pub max_payload_bytes: usize,
    /// The limits launches are validated against.
    pub policy: LaunchPolicy,
    /// Tasks whose progress allowance each worker keeps at most (past it they are all forgotten, which
    /// only forgives). A task's allowance is forgotten as soon as a command ends it.
    pub cache_per_worker: usize,
    /// How long a worker keeps its tasks' progress allowances once no command reaches it: a quiet worker
    /// forgets them all. Tasks that other loops end (a timeout, a cancelled sandbox gone, an agent lost)
    /// are never seen ending here, and this is what lets their allowances go.
    pub cache_idle: Duration,
    /// Deliveries of one command at most; a command still not handled at the last one (transient
    /// failures, or a crash while handling it) is dead-lettered as `exhausted`, never redelivered forever.
    pub max_deliver: i64,
    /// The longest progress message recorded, in bytes; longer ones are cut and marked.
    pub max_progress_bytes: usize,
    /// Progress reports one task may send per second, on average; faster ones are dropped (counted).
    pub progress_per_second: f64,
    /// Progress reports one task may send in a burst above the average rate.
    pub progress_burst: u32,
    /// Callers' inbox prefix: `Taskpods-Reply-To` must name a subject below it, or no reply is sent
    /// (the engine would otherwise publish with its own privileges wherever a caller asks).
    pub reply_prefix: String,
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
            cache_idle: Duration::from_secs(60),
            max_deliver: 5,
            max_progress_bytes: 1024,
            progress_per_second: 10.0,
            progress_burst: 50,
            reply_prefix: "_INBOX.".to_owned(),
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
    /// Commands whose handling panicked (dead-lettered as `panicked`; the worker carried on).
    pub panicked: AtomicU64,
    /// Commands dead-lettered after `max_deliver` deliveries (`exhausted`).
    pub exhausted: AtomicU64,
    /// Progress reports dropped for exceeding their task's rate.
    pub progress_rate_limited: AtomicU64,
    /// Progress reports cut to the size cap.
    pub progress_truncated: AtomicU64,
    /// Progress reports refused because their task reached the per-task count cap.
    pub progress_over_count: AtomicU64,
    /// Replies not sent because `Taskpods-Reply-To` named no inbox below the reply prefix.
    pub refused_replies: AtomicU64,
    /// Appends refused because the event stream is full (each an operator alert).
    pub event_log_full: AtomicU64,
}

/// Everything a worker needs.
#[derive(Debug)]
struct Shared {
    ctx: Arc<EngineCtx>,
    config: IntakeConfig,
    stats: Arc<IntakeStats>,
    /// Set at shutdown: from then on, commands still queued are handed back (nak) instead of handled.
    hand_over_at: std::sync::OnceLock<Instant>,
}

/// Runs the intake until `ctx.shutdown`, then finishes the commands in hand within the shutdown grace
/// and hands the rest back to the stream (nak) for another replica.
pub async fn run(
    ctx: Arc<EngineCtx>,
    config: IntakeConfig,
    stats: Arc<IntakeStats>,
) -> Result<(), IntakeError> {
    let mut messages = crate::pull::DurableMessages::open(
        &ctx.topology.commands,
        pull::Config {
            durable_name: Some(config.durable_name.clone()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            max_ack_pending: i64::try_from(config.max_in_flight).unwrap_or(i64::MAX),
            max_deliver: config.max_deliver.max(2),
            ..Default::default()
        },
        "intake",
    )
    .await
    .map_err(IntakeError::Consumer)?;
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        config: config.clone(),
        stats,
        hand_over_at: std::sync::OnceLock::new(),
    });

    let workers = config.workers.max(1);
    let mut queues = Vec::with_capacity(workers);
    let mut handles = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, handle) = spawn_worker(&shared);
        queues.push(tx);
        handles.push(handle);
    }
    info!(
        workers,
        max_in_flight = config.max_in_flight,
        "intake running"
    );

    loop {
        // Heartbeat misses and reconnects are handled (and logged) by `DurableMessages`.
        let message = tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            message = messages.next() => message,
        };
        crate::metrics::METRICS
            .in_flight
            .with_label_values(&["intake"])
            .inc();
        let routed = route(&shared, message);
        let shard = routed.shard(workers);
        if let Err(mpsc::error::SendError(routed)) = queues[shard].send(routed).await {
            // The worker is gone (it can only end by panicking outside the per-message guard): start a
            // new one for its shard, so one bad message never stops the intake.
            error!(shard, "intake worker died; restarting it");
            let (tx, handle) = spawn_worker(&shared);
            queues[shard] = tx;
            handles[shard] = handle;
            if queues[shard].send(routed).await.is_err() {
                break;
            }
        }
    }
    // Stopping: commands the client pulled but nobody queued go back at once; the queued ones are
    // handled until the grace is over, then handed back.
    let _ = shared.hand_over_at.set(Instant::now() + ctx.shutdown_grace);
    let mut handed = 0;
    // Stop pulling before handing anything back (see `DurableMessages::stop`).
    for message in messages.stop() {
        crate::executor::hand_over(&message, "intake").await;
        handed += 1;
    }
    drop(queues);
    for handle in handles {
        let _ = handle.await;
    }
    info!(handed_over_unstarted = handed, "intake stopped");
    Ok(())
}

fn spawn_worker(shared: &Arc<Shared>) -> (mpsc::Sender<Routed>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<Routed>(64);
    (tx, tokio::spawn(worker(shared.clone(), rx)))
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
    let classified = std::panic::catch_unwind(AssertUnwindSafe(|| {
        classify(
            shared.ctx.names(),
            &shared.config,
            message.subject.as_str(),
            message.headers.as_ref(),
            &message.payload,
        )
    }));
    let kind = classified.unwrap_or_else(|panic| {
        shared.stats.panicked.fetch_add(1, Ordering::Relaxed);
        Err(DeadLetter {
            reason: "panicked",
            detail: format!("reading the command panicked: {}", panic_text(&*panic)),
        })
    });
    Routed { message, kind }
}

/// Works out what a command is and which task it is for, from its subject, headers and payload alone.
fn classify(
    names: &Names,
    config: &IntakeConfig,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<Command, DeadLetter> {
    let dead = |reason, detail: String| DeadLetter { reason, detail };
    let addressed = names
        .parse(subject)
        .map_err(|e| dead("bad_subject", e.to_string()))?;
    let encoding = Encoding::from_content_type(header(headers, HEADER_CONTENT_TYPE))
        .map_err(|e| dead("content_type", e.to_string()))?;
    if payload.len() > config.max_payload_bytes {
        return Err(dead(
            "too_large",
            CodecError::TooLarge {
                size: payload.len(),
                max: config.max_payload_bytes,
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

/// Most commands a worker takes from its queue at once.
const WORKER_BATCH: usize = 64;

/// Takes the commands queued for this worker in batches: commands of one task are applied in order,
/// those of different tasks concurrently (their appends and acks are in flight together instead of one
/// round trip after another), and the next batch is taken once this one is done.
async fn worker(shared: Arc<Shared>, mut queue: mpsc::Receiver<Routed>) {
    let local = Mutex::new(WorkerState::default());
    let mut batch = Vec::with_capacity(WORKER_BATCH);
    loop {
        let holding = !lock(&local).is_empty();
        let received = tokio::select! {
            received = queue.recv_many(&mut batch, WORKER_BATCH) => received,
            () = tokio::time::sleep(shared.config.cache_idle), if holding => {
                change(&shared, &local, |state| *state = WorkerState::default());
                continue;
            }
        };
        if received == 0 {
            break;
        }
        let mut groups: Vec<Vec<Routed>> = Vec::new();
        let mut by_task: HashMap<TaskId, usize> = HashMap::new();
        for routed in batch.drain(..) {
            match routed.kind.as_ref().ok().map(Command::task) {
                Some(task) => {
                    let group = *by_task.entry(task).or_insert_with(|| {
                        groups.push(Vec::new());
                        groups.len() - 1
                    });
                    groups[group].push(routed);
                }
                None => groups.push(vec![routed]),
            }
        }
        futures::future::join_all(groups.into_iter().map(|group| {
            let (shared, local) = (&shared, &local);
            async move {
                for routed in group {
                    process(shared, local, routed).await;
                }
            }
        }))
        .await;
    }
}

/// Handles one command, catching a panic, and acks (or naks) it.
async fn process(shared: &Shared, local: &Mutex<WorkerState>, routed: Routed) {
    let Routed { message, kind } = routed;
    let in_flight = crate::metrics::METRICS
        .in_flight
        .with_label_values(&["intake"]);
    if shared
        .hand_over_at
        .get()
        .is_some_and(|at| Instant::now() >= *at)
    {
        crate::executor::hand_over(&message, "intake").await;
        in_flight.dec();
        return;
    }
    let delivered = message.info().map_or(1, |info| info.delivered);
    let handled = AssertUnwindSafe(handle(shared, local, kind, &message))
        .catch_unwind()
        .await;
    let mut disposition = match handled {
        Ok(disposition) => disposition,
        Err(panic) => {
            // What the worker held may be half-updated: forget it, keep the message for operators.
            change(shared, local, |state| *state = WorkerState::default());
            shared.stats.panicked.fetch_add(1, Ordering::Relaxed);
            let detail = format!("handling the command panicked: {}", panic_text(&*panic));
            error!(subject = %escape_bounded(&message.subject, MAX_HEADER_VALUE_BYTES), detail = %escape_bounded(&detail, MAX_HEADER_VALUE_BYTES), "intake worker caught a panic");
            let dead = DeadLetter {
                reason: "panicked",
                detail,
            };
            AssertUnwindSafe(dead_letter(shared, &message, dead))
                .catch_unwind()
                .await
                .unwrap_or(Disposition::Retry)
        }
    };
    if matches!(disposition, Disposition::Retry) && delivered >= shared.config.max_deliver {
        // The server will not deliver it again: keep it with the reason rather than strand it.
        shared.stats.exhausted.fetch_add(1, Ordering::Relaxed);
        let dead = DeadLetter {
            reason: "exhausted",
            detail: format!(
                "not handled after {delivered} deliveries (transient failures); kept here instead of retried forever"
            ),
        };
        disposition = AssertUnwindSafe(dead_letter(shared, &message, dead))
            .catch_unwind()
            .await
            .unwrap_or(Disposition::Retry);
    }
    let ack = match disposition {
        Disposition::Done => AckKind::Ack,
        Disposition::Retry => {
            shared.stats.retried.fetch_add(1, Ordering::Relaxed);
            // Backing off with each delivery, so a store unavailable for a while (a stream leader
            // being elected after a node loss) does not use up `max_deliver` in a few seconds.
            let doublings = u32::try_from(delivered.saturating_sub(1).min(6)).unwrap_or(6);
            let delay = (shared.config.retry_delay * 2u32.pow(doublings))
                .min(std::time::Duration::from_secs(30));
            AckKind::Nak(Some(delay))
        }
    };
    if let Err(e) = message.ack_with(ack).await {
        // The command will be redelivered; applying it again is a no-op.
        warn!(error = %e, subject = %escape_bounded(&message.subject, MAX_HEADER_VALUE_BYTES), "ack failed");
    }
    in_flight.dec();
}

/// The worker's state; a panic while it was held only leaves plain data behind.
fn lock(local: &Mutex<WorkerState>) -> std::sync::MutexGuard<'_, WorkerState> {
    local
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `edit` on the worker's state and moves the engine's held-task gauges by what it added or
/// removed.
fn change<R>(
    shared: &Shared,
    local: &Mutex<WorkerState>,
    edit: impl FnOnce(&mut WorkerState) -> R,
) -> R {
    let mut state = lock(local);
    let progress = state.progress.len();
    let out = edit(&mut state);
    shared
        .ctx
        .held
        .intake_progress
        .moved(progress, state.progress.len());
    out
}

/// What one worker keeps between commands (its tasks only: a task always maps to the same worker).
/// Not the tasks' states: the event store holds each live task's latest state for every loop
/// ([`crate::store::LatestStates`]), and a second copy here cost as much memory again per live task.
#[derive(Debug, Default)]
struct WorkerState {
    /// Each task's progress allowance.
    progress: HashMap<TaskId, ProgressBucket>,
}

/// A token bucket: `tokens` reports may be sent now; it refills at the configured rate.
#[derive(Debug, Clone, Copy)]
struct ProgressBucket {
    tokens: f64,
    at: Instant,
}

impl WorkerState {
    /// Whether the worker holds nothing.
    fn is_empty(&self) -> bool {
        self.progress.is_empty()
    }

    /// Forgets `task` once a command left it ended (`loaded`): a late report for it is refused anyway,
    /// and keeping its allowance would cost memory per finished task.
    fn saw(&mut self, task: TaskId, loaded: &LoadedTask) {
        if loaded.task.state.is_terminal() {
            self.progress.remove(&task);
        }
    }

    /// Takes one progress token for `task`; false when the task is over its rate.
    fn allow_progress(&mut self, task: TaskId, config: &IntakeConfig) -> bool {
        let now = Instant::now();
        let burst = f64::from(config.progress_burst.max(1));
        if self.progress.len() >= config.cache_per_worker.max(1)
            && !self.progress.contains_key(&task)
        {
            // Bounded: a forgotten bucket starts full again, which only forgives.
            self.progress.clear();
        }
        let bucket = self.progress.entry(task).or_insert(ProgressBucket {
            tokens: burst,
            at: now,
        });
        let refill =
            now.duration_since(bucket.at).as_secs_f64() * config.progress_per_second.max(0.0);
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Applies a classified command or dead-letters an unreadable one.
async fn handle(
    shared: &Shared,
    local: &Mutex<WorkerState>,
    kind: Result<Command, DeadLetter>,
    message: &jetstream::Message,
) -> Disposition {
    match kind {
        Ok(command) => apply(shared, local, command, message).await,
        Err(dead) => dead_letter(shared, message, dead).await,
    }
}

/// The text of a caught panic's payload.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// `text` safe to put in a header value or a log line: control characters (CR, LF, NUL, escape, ...)
/// and Unicode line separators written as escapes, cut to at most `max` bytes (marked with `…`).
pub fn escape_bounded(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        let piece: String = if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        if out.len() + piece.len() > max.saturating_sub('…'.len_utf8()) {
            out.push('…');
            return out;
        }
        out.push_str(&piece);
    }
    out
}

/// A header value built from input: escaped and bounded, so it can never fail (or panic) to encode.
pub fn header_value(text: &str) -> HeaderValue {
    escape_bounded(text, MAX_HEADER_VALUE_BYTES)
        .parse()
        .unwrap_or_default()
}

enum Disposition {
    /// Applied, refused, or dead-lettered: ack.
    Done,
    /// A transient failure: leave it for redelivery.
    Retry,
}

async fn apply(
    shared: &Shared,
    local: &Mutex<WorkerState>,
    command: Command,
    message: &jetstream::Message,
) -> Disposition {
    let now = shared.ctx.clock.now();
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
            }
            .map_err(bounded_problems);
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
                    if !change(shared, local, |state| {
                        state.allow_progress(task, &shared.config)
                    }) {
                        shared
                            .stats
                            .progress_rate_limited
                            .fetch_add(1, Ordering::Relaxed);
                        debug!(%task, "progress report over the task's rate: dropped");
                        return Disposition::Done;
                    }
                    let message = match cut_progress(&message, shared.config.max_progress_bytes) {
                        Some(cut) => {
                            shared
                                .stats
                                .progress_truncated
                                .fetch_add(1, Ordering::Relaxed);
                            cut
                        }
                        None => message,
                    };
                    Input::AgentProgress { message, percent }
                }
                Ok(AgentReport::Result(outcome)) => Input::AgentResult(outcome),
                Ok(other) => {
                    let dead = DeadLetter {
                        reason: "bad_report",
                        detail: format!(
                            "{} reports are not commands: agents send them to the gateway subjects",
                            report_name(&other)
                        ),
                    };
                    return dead_letter(shared, message, dead).await;
                }
                Err(e) => return dead_letter(shared, message, undecodable(&e)).await,
            };
            debug!(%task, %kind, "agent report");
            (task, encoding, input, false)
        }
    };

    // The task's trace (crate::telemetry): launches, cancels and results; progress reports are too many.
    let span = match &input {
        Input::Launch { .. } => crate::task_span!("intake", task, outcome = tracing::field::Empty),
        Input::Cancel(_) => crate::task_span!("cancel", task, outcome = tracing::field::Empty),
        Input::AgentResult(_) => crate::task_span!("result", task, outcome = tracing::field::Empty),
        _ => tracing::Span::none(),
    };
    // A launch is almost always for a new task: append with expected sequence 0 straight away and let a
    // conflict (the task exists) trigger the load. Saves a round trip on the hot path. Other commands
    // start from the store's held state of the task (a read when it holds none).
    let executed = shared
        .ctx
        .store
        .execute(task, &input, now, is_launch.then(LoadedTask::default))
        .instrument(span.clone())
        .await;
    let reply = match executed {
        Ok(executed) => {
            change(shared, local, |state| state.saw(task, &executed.task));
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
            change(shared, local, |state| state.saw(task, &current));
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            if matches!(refusal, Refusal::LimitReached(_)) {
                shared
                    .stats
                    .progress_over_count
                    .fetch_add(1, Ordering::Relaxed);
            }
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
            StoreErrorKind::Full => {
                // The log of record refuses rather than forgets: the command waits (and after
                // max_deliver is kept in the dead-letter stream) until an operator makes room.
                error!(%task, error = %e, "ALERT: the event stream is full; commands wait until its max_bytes is raised");
                shared.stats.event_log_full.fetch_add(1, Ordering::Relaxed);
                return Disposition::Retry;
            }
            StoreErrorKind::Unavailable | StoreErrorKind::Conflict => {
                warn!(%task, error = %e, "transient store failure; command left for redelivery");
                return Disposition::Retry;
            }
            StoreErrorKind::Corrupt | StoreErrorKind::TooLarge | StoreErrorKind::Other => {
                warn!(%task, error = %e, "command cannot be applied");
                CommandReply::Invalid {
                    error: e.to_string(),
                }
            }
        },
    };
    span.record(
        "outcome",
        match &reply {
            CommandReply::Applied { .. } => "applied",
            CommandReply::Rejected { .. } => "rejected",
            CommandReply::Refused { .. } => "refused",
            CommandReply::Invalid { .. } => "invalid",
        },
    );
    send_reply(shared, reply_to, encoding, &reply)
        .instrument(span)
        .await;
    Disposition::Done
}

/// Problems recorded on a `Rejected` event at most; the rest are counted in one last problem.
pub const MAX_PROBLEMS: usize = 32;
/// The longest problem field path or message recorded, in bytes.
pub const MAX_PROBLEM_TEXT_BYTES: usize = 512;

/// `problems` cut to [`MAX_PROBLEMS`] entries of bounded, escaped text: problems quote input, and a
/// rejection must stay far below the stream's largest message however large the launch was.
pub fn bounded_problems(problems: Vec<Problem>) -> Vec<Problem> {
    let total = problems.len();
    let mut kept: Vec<Problem> = problems
        .into_iter()
        .take(MAX_PROBLEMS)
        .map(|p| Problem {
            field: escape_bounded(&p.field, MAX_PROBLEM_TEXT_BYTES),
            message: escape_bounded(&p.message, MAX_PROBLEM_TEXT_BYTES),
        })
        .collect();
    if total > MAX_PROBLEMS {
        kept.push(Problem {
            field: ".".to_owned(),
            message: format!(
                "{} more problems not listed; fix these and send again",
                total - MAX_PROBLEMS
            ),
        });
    }
    kept
}

fn report_name(report: &AgentReport) -> &'static str {
    match report {
        AgentReport::Hello { .. } => "hello",
        AgentReport::Progress { .. } => "progress",
        AgentReport::Heartbeat => "heartbeat",
        AgentReport::Result(_) => "result",
    }
}

/// `message` cut to at most `max` bytes with a marker saying how long it was; `None` when it fits.
fn cut_progress(message: &str, max: usize) -> Option<String> {
    if message.len() <= max {
        return None;
    }
    let marker = format!("… [cut: {} bytes]", message.len());
    let mut end = max.saturating_sub(marker.len());
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    Some(format!("{}{marker}", &message[..end]))
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

/// Header on a dead letter whose launch payload was not kept: it could not be read, so env values in it
/// could not be told apart (the size says what was dropped).
pub const HEADER_PAYLOAD_WITHHELD: &str = "Taskpods-Payload-Withheld";

/// A launch payload as a dead letter keeps it: re-encoded with every `env` value replaced by
/// `<redacted>`, when it reads as a JSON or msgpack map; `None` when it does not read (it is withheld:
/// values an operator must never see could be anywhere in it).
pub fn launch_without_env_values(payload: &[u8]) -> Option<Bytes> {
    let redact = |value: &mut serde_json::Value| {
        if let Some(env) = value.get_mut("env").and_then(|e| e.as_object_mut()) {
            for v in env.values_mut() {
                *v = serde_json::Value::from("<redacted>");
            }
        }
    };
    if let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(payload) {
        if !value.is_object() {
            return None;
        }
        redact(&mut value);
        return serde_json::to_vec(&value).ok().map(Bytes::from);
    }
    // Bounded nesting, as serde_json bounds it: a hostile payload must not overflow the stack.
    let mut decoder = rmp_serde::Deserializer::from_read_ref(payload);
    decoder.set_max_depth(64);
    let mut value = <serde_json::Value as serde::Deserialize>::deserialize(&mut decoder).ok()?;
    if !value.is_object() {
        return None;
    }
    redact(&mut value);
    rmp_serde::to_vec_named(&value).ok().map(Bytes::from)
}

async fn dead_letter(
    shared: &Shared,
    message: &jetstream::Message,
    dead: DeadLetter,
) -> Disposition {
    // Subject and detail quote input: escaped, so a log line is one line and a header cannot break.
    warn!(
        subject = %escape_bounded(&message.subject, MAX_HEADER_VALUE_BYTES),
        reason = dead.reason,
        detail = %escape_bounded(&dead.detail, MAX_HEADER_VALUE_BYTES),
        "dead-lettering command"
    );
    let original = message.headers.as_ref();
    let mut headers = original.cloned().unwrap_or_default();
    headers.insert(HEADER_DEAD_REASON, header_value(&dead.detail));
    headers.insert(HEADER_ORIGINAL_SUBJECT, header_value(&message.subject));
    let payload = if message.subject.as_str() == shared.ctx.topology.names.launch() {
        let kept = launch_without_env_values(&message.payload);
        if kept.is_none() {
            headers.insert(
                HEADER_PAYLOAD_WITHHELD,
                format!("{} bytes", message.payload.len()).as_str(),
            );
        }
        kept.unwrap_or_default()
    } else {
        message.payload.clone()
    };
    // The original Nats-Msg-Id makes a redelivered dead letter a duplicate, not a second record.
    let subject = shared.ctx.names().dead_letter(dead.reason);
    let publish = |subject: String, headers: HeaderMap, payload: Bytes| async move {
        shared
            .ctx
            .js
            .publish_with_headers(subject, headers, payload)
            .await?
            .await
    };
    if let Err(e) = publish(subject.clone(), headers, payload.clone()).await {
        if !matches!(
            e.kind(),
            PublishErrorKind::MaxPayloadExceeded | PublishErrorKind::Other
        ) {
            warn!(error = %e, "dead-letter stream unavailable; command left for redelivery");
            return Disposition::Retry;
        }
        // Too large once our headers are added (or refused for what it carries): keep a bounded
        // record of it instead, so it is never retried forever.
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_DEAD_REASON, header_value(&dead.detail));
        headers.insert(HEADER_ORIGINAL_SUBJECT, header_value(&message.subject));
        headers.insert(
            HEADER_DEAD_TRUNCATED,
            header_value(&message.payload.len().to_string()),
        );
        let kept = message
            .payload
            .slice(..message.payload.len().min(DEAD_LETTER_KEPT_BYTES));
        if let Err(e) = publish(subject, headers, kept).await {
            warn!(error = %e, "dead-letter stream refused even the bounded record; command left for redelivery");
            return Disposition::Retry;
        }
    }
    shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    crate::metrics::METRICS
        .dead_letters
        .with_label_values(&[dead.reason])
        .inc();
    let encoding = Encoding::from_content_type(header(original, HEADER_CONTENT_TYPE))
        .unwrap_or(Encoding::Json);
    let reply_to = header(original, HEADER_REPLY_TO).map(str::to_owned);
    let error = escape_bounded(&dead.detail, MAX_HEADER_VALUE_BYTES);
    send_reply(shared, reply_to, encoding, &CommandReply::Invalid { error }).await;
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
    if !taskpods_events::subject::is_reply_inbox(&reply_to, &[&shared.config.reply_prefix]) {
        shared.stats.refused_replies.fetch_add(1, Ordering::Relaxed);
        warn!(
            reply_to = escape_bounded(&reply_to, 256),
            prefix = shared.config.reply_prefix,
            "reply refused: Taskpods-Reply-To is not an inbox"
        );
        return;
    }
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
        .ctx
        .nats
        .publish_with_headers(reply_to, headers, Bytes::from(payload))
        .await
    {
        debug!(error = %e, "reply not sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use taskpods_events::{EventBody, Names};

    /// Text with the characters attackers reach for: CR, LF, NUL, escapes, separators, quotes.
    fn hostile_text() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                any::<char>(),
                Just('\r'),
                Just('\n'),
                Just('\0'),
                Just('\u{1b}'),
                Just('\u{2028}'),
                Just('"'),
                Just('.'),
                Just('*'),
                Just('>'),
            ],
            0..64,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    /// Payloads: raw bytes, or JSON and msgpack maps with launch field names and hostile values.
    fn payload() -> impl Strategy<Value = Vec<u8>> {
        let field = prop_oneof![
            Just("script".to_owned()),
            Just("goal".to_owned()),
            Just("env".to_owned()),
            Just("labels".to_owned()),
            Just("idempotency_key".to_owned()),
            Just("task_id".to_owned()),
            Just("mode".to_owned()),
            Just("resources".to_owned()),
            Just("timeout_secs".to_owned()),
            Just("report".to_owned()),
            Just("message".to_owned()),
            hostile_text(),
        ];
        let leaf = prop_oneof![
            hostile_text().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<bool>().prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
        ];
        let value = leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map(hostile_text(), inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        });
        let object = prop::collection::btree_map(field, value, 0..6)
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect()));
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            object
                .clone()
                .prop_map(|v| serde_json::to_vec(&v).unwrap_or_default()),
            object.prop_map(|v| codec::to_msgpack(&v).unwrap_or_default()),
        ]
    }

    fn subject() -> impl Strategy<Value = String> {
        let task = "0190a5a4-7b1e-7c3d-9e8f-0123456789ab";
        prop_oneof![
            Just("taskpods.cmd.launch".to_owned()),
            Just(format!("taskpods.cmd.cancel.{task}")),
            Just(format!("taskpods.cmd.agent.{task}.progress")),
            Just(format!("taskpods.cmd.agent.{task}.result")),
            hostile_text().prop_map(|t| format!("taskpods.cmd.{t}")),
            hostile_text().prop_map(|t| format!("taskpods.cmd.agent.{t}.progress")),
            hostile_text(),
        ]
    }

    fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
        let name = prop_oneof![
            Just(HEADER_CONTENT_TYPE.to_owned()),
            Just(HEADER_MSG_ID.to_owned()),
            Just(HEADER_REPLY_TO.to_owned()),
            "[A-Za-z-]{1,16}",
        ];
        let value = prop_oneof![
            Just("application/json".to_owned()),
            Just("application/msgpack".to_owned()),
            hostile_text(),
        ];
        prop::collection::vec((name, value), 0..4)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever arrives, classification, validation, the rejection it records, the dead letter's
        /// headers and the reply never panic, and what goes into headers and logs is one bounded line.
        #[test]
        fn any_command_is_classified_and_answered_without_panicking(
            subject in subject(),
            headers in headers(),
            payload in payload(),
        ) {
            let names = Names::default();
            let config = IntakeConfig::default();
            let mut map = HeaderMap::new();
            for (name, value) in &headers {
                // Only what the wire can carry: the client refuses CR and LF in values itself.
                if let Ok(value) = value.parse::<HeaderValue>() {
                    map.insert(name.as_str(), value);
                }
            }
            match classify(&names, &config, &subject, Some(&map), &payload) {
                Err(dead) => {
                    let value = header_value(&dead.detail);
                    prop_assert!(!value.as_str().contains(['\r', '\n']));
                    prop_assert!(value.as_str().len() <= MAX_HEADER_VALUE_BYTES);
                    let _ = header_value(&subject);
                }
                Ok(Command::Launch { task, launch, .. }) => {
                    let spec = match *launch {
                        Ok(launch) => launch.validate(&config.policy),
                        Err(e) => Err(vec![decode_problem(&e)]),
                    }
                    .map_err(bounded_problems);
                    if let Err(problems) = &spec {
                        prop_assert!(problems.len() <= MAX_PROBLEMS + 1);
                        let event = taskpods_events::Event::new(
                            task,
                            0,
                            chrono::Utc::now(),
                            EventBody::Rejected { problems: problems.clone() },
                        );
                        let encoded = codec::encode_event(&event).expect("encodable");
                        prop_assert!(encoded.len() < 64 << 10);
                    }
                }
                Ok(Command::Cancel { .. } | Command::Agent { .. }) => {}
            }
        }
    }

    #[test]
    fn problem_lists_are_bounded_whatever_the_launch() {
        let problems = (0..10_000)
            .map(|i| Problem {
                field: format!("env.{i}\n{}", "x".repeat(5000)),
                message: "y".repeat(5000),
            })
            .collect();
        let kept = bounded_problems(problems);
        assert_eq!(kept.len(), MAX_PROBLEMS + 1);
        assert!(kept[0].field.starts_with("env.0\\n"));
        assert!(kept.iter().all(|p| p.field.len() <= MAX_PROBLEM_TEXT_BYTES));
        assert_eq!(
            kept[MAX_PROBLEMS].message,
            "9968 more problems not listed; fix these and send again"
        );
    }

    #[test]
    fn escaping_keeps_one_line_and_the_bound() {
        assert_eq!(escape_bounded("a\r\nb\u{0}c", 100), "a\\r\\nb\\u{0}c");
        let long = escape_bounded(&"\n".repeat(1000), 64);
        assert!(long.len() <= 64 && long.ends_with('…'), "{long}");
        assert_eq!(escape_bounded("héllo", 100), "héllo");
    }

    #[test]
    fn progress_is_cut_at_a_character_boundary_with_its_length() {
        assert_eq!(cut_progress("short", 10), None);
        let cut = cut_progress(&"é".repeat(100), 40).expect("cut");
        assert!(cut.len() <= 40, "{cut}");
        assert!(cut.ends_with("… [cut: 200 bytes]"), "{cut}");
    }

    #[tokio::test(start_paused = true)]
    async fn progress_rate_is_a_token_bucket_per_task() {
        let config = IntakeConfig {
            progress_per_second: 10.0,
            progress_burst: 5,
            ..IntakeConfig::default()
        };
        let (a, b) = (TaskId::mint(), TaskId::mint());
        let mut local = WorkerState::default();
        let allowed = (0..20).filter(|_| local.allow_progress(a, &config)).count();
        assert_eq!(allowed, 5, "the burst, then nothing");
        assert!(
            local.allow_progress(b, &config),
            "another task has its own bucket"
        );
        tokio::time::advance(Duration::from_millis(300)).await;
        let allowed = (0..20).filter(|_| local.allow_progress(a, &config)).count();
        assert_eq!(allowed, 3, "refilled at 10 per second");
    }
}

#[cfg(test)]
mod dead_letter_tests {
    use super::*;

    #[test]
    fn dead_lettered_launches_keep_no_env_value() {
        let json = br#"{"script":"x","env":{"API_TOKEN":"tok-1"},"bogus":1}"#;
        let kept = launch_without_env_values(json).expect("json kept");
        let text = String::from_utf8_lossy(&kept);
        assert!(
            !text.contains("tok-1") && text.contains("API_TOKEN") && text.contains("bogus"),
            "{text}"
        );
        let msgpack =
            rmp_serde::to_vec_named(&serde_json::json!({"env": {"A": "tok-2"}})).expect("encode");
        let kept = launch_without_env_values(&msgpack).expect("msgpack kept");
        assert!(!kept.windows(5).any(|w| w == b"tok-2"));
        assert_eq!(launch_without_env_values(b"env: {A: tok-3}"), None);
        assert_eq!(launch_without_env_values(b"\"just a string\""), None);
        // Nested far deeper than any launch: refused (withheld), not a stack overflow.
        let mut deep = vec![0x91u8; 200_000];
        deep.push(0xc0);
        assert_eq!(launch_without_env_values(&deep), None);
    }
}
