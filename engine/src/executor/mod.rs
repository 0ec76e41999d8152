//! The executor: a durable consumer of the event stream that makes the backend match each task's state.
//!
//! It is level-triggered: on a task's events it acts on the task's *current* state, so a redelivered or
//! old event never repeats an effect, and every effect is idempotent besides:
//!
//! | current state | effect | then executes |
//! |---|---|---|
//! | `Accepted` | create the sandbox (or adopt the one with the task's deterministic name) | `JobCreated{job}` |
//! | `Cancelling` | stop the sandbox | `JobGone` (→ `Cancelled`) |
//! | terminal, with a Job, not reaped | wait a little for the agent to finish on its own (only after a result it reported), stop it, remove the sandbox | `Reaped` |
//! | anything else | nothing | |
//!
//! **A task's cost per event does not grow with its history.** The executor holds each live task's
//! folded state with the stream sequence of its last event ([`LoadedTask`]) and folds every delivered
//! event onto it with the pure `evolve`. It reads from the store only when the events it is handed do not
//! follow on from that state (a gap: another engine took some of them, or this engine started after the
//! task did), and then only the events after its state's sequence (the whole history when it holds
//! none), or when an append finds the log moved on (a conflict, which the store resolves by reading). So
//! engines sharing the consumer each read the events the others took, once: still a constant cost per
//! event. A brand-new task is folded from its `accepted` event without a read. Events that
//! cannot change an effect (`progress`, and kinds this version does not know) are folded and acked
//! without a reconcile. A task's state is dropped once nothing more can be done for it (ended and reaped,
//! or ended with no sandbox), so nothing is held per finished task; its `reaped` (or `rejected`) event is
//! recognised as the end without a read.
//!
//! **Fair turns** ([`turns`]): delivered events wait in a queue per task; tasks take turns, first come
//! first served, at most `concurrency` at once and each task on at most one worker. A turn takes all of
//! a task's waiting events: they are folded together and reconciled once. So one task's backlog costs it
//! one turn and cannot hold workers or delay other tasks; the consumer loop itself never waits on a task.
//!
//! A turn's messages are acked only after its effect is done and its event appended, except events that
//! cannot call for an effect, acked on delivery so that a flood of them cannot fill the consumer's window
//! of unacked messages and stall every other task's delivery (a crash before they are folded loses
//! nothing: the next engine reads what it is missing). On a transient failure the newest unacked message
//! is naked for redelivery (the others acked) and the task's state is dropped, so the redelivery reads the
//! task and reconciles it whatever the event's kind. At shutdown mid-effect the
//! turn's messages stay unacked for the next engine. The [`Backend`] trait ([`backend`]) is what a
//! backend implements: [`local`] (a sandboxed process per task) is the embedded default; [`kubernetes`] (a
//! Job per task, with its watcher and reconciler) plugs into the same loop; [`noop`] (benchmarks and
//! tests) plays each sandbox and its agent in-process.
//!
//! Layout (imports point one way: `mod.rs` → {`local`, `kubernetes`, `noop`, `turns`} → `backend`; inside
//! `kubernetes/`, {`watcher`, `reconciler`} → `kubernetes/mod.rs` → `job`; nothing imports back up):
//! - `mod.rs`: the executor loop ([`run`], [`reconcile`]), the folded states, and [`BackendConfig`];
//! - [`turns`]: the fair run queue across tasks;
//! - [`backend`]: the [`Backend`] trait and [`BackendError`];
//! - [`local`]: the local backend;
//! - [`noop`]: the no-op backend (benchmarks and tests: no code runs);
//! - [`kubernetes`]: the Kubernetes backend, its Job ([`kubernetes::job`]), watcher
//!   ([`kubernetes::watcher`]) and reconciler ([`kubernetes::reconciler`]).

pub mod backend;
pub mod kubernetes;
pub mod local;
pub mod noop;
pub mod turns;

pub use backend::{Backend, BackendError};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use taskpods_events::{Addressed, EventBody, FailureReason, Input, TaskId, TaskState, evolve};
use taskpods_projections::log;
use tokio::sync::Notify;
use tracing::{Instrument as _, debug, info, warn};

use crate::context::EngineCtx;
use crate::store::{ExecuteError, LoadedTask, StoredEvent};
use crate::timers::AbortOnDrop;
use turns::Turns;

/// Which backend the executor drives.
#[derive(Debug, Clone, Default)]
pub enum BackendConfig {
    /// No executor at all: tasks are accepted and wait (engines that only take commands, tests of other
    /// loops). The library default; `taskpods serve` picks `Local` unless told otherwise.
    #[default]
    None,
    /// Local sandboxed processes (the embedded default of `taskpods serve`).
    Local(local::LocalConfig),
    /// Kubernetes Jobs (plus the watcher and the reconciler that come with them).
    Kubernetes(kubernetes::KubernetesConfig),
    /// No sandbox at all: each task's life is played in-process (benchmarks and tests; no code runs).
    Noop(noop::NoopConfig),
}

/// Executor settings.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// The durable consumer's name; engine replicas share it.
    pub durable_name: String,
    /// Events delivered but not yet acked, at most.
    pub max_in_flight: usize,
    /// Tasks worked on at once.
    pub concurrency: usize,
    /// How long the server waits for an ack before redelivering: the time a dead replica's events take
    /// to reach another. Effects may take longer (the turn sends progress acks meanwhile).
    pub ack_wait: Duration,
    /// How long before a message that hit a transient failure is redelivered.
    pub retry_delay: Duration,
    /// How long a finished task's sandbox may take to end on its own before it is stopped.
    pub reap_grace: Duration,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            durable_name: "taskpods-executor".to_owned(),
            max_in_flight: 512,
            concurrency: 64,
            ack_wait: Duration::from_secs(30),
            retry_delay: Duration::from_secs(1),
            reap_grace: Duration::from_secs(10),
        }
    }
}

/// Errors that stop the executor.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The consumer could not be created or read.
    #[error("executor consumer: {0}")]
    Consumer(async_nats::Error),
}

/// What one reconciliation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Nothing was needed.
    Nothing,
    /// The sandbox was created (or adopted) and recorded.
    Created(String),
    /// The sandbox was stopped and recorded gone.
    Stopped,
    /// The sandbox was removed and recorded reaped.
    Reaped,
}

/// Makes the backend match `loaded`, the task's current state (see the module table). Returns what it did
/// and the task after it (as the store left it: after the effect's append, or as found on a refusal).
pub async fn reconcile<B: Backend>(
    ctx: &EngineCtx,
    backend: &B,
    task_id: TaskId,
    loaded: LoadedTask,
    config: &ExecutorConfig,
) -> Result<(Effect, LoadedTask), BackendError> {
    let task = &loaded.task;
    match task.state {
        TaskState::Accepted => {
            let (Some(spec), Some(deadline)) = (&task.spec, task.deadline) else {
                return Ok((Effect::Nothing, loaded));
            };
            let (spec, deadline) = (spec.clone(), deadline);
            let span = crate::task_span!("create", task_id, outcome = tracing::field::Empty);
            async {
                match backend.create(task_id, &spec, deadline).await {
                    Ok(job) => {
                        tracing::Span::current().record("outcome", "created");
                        let input = Input::JobCreated { job: job.clone() };
                        let after = execute(ctx, task_id, &input, loaded).await?;
                        if after.task.state.is_terminal() {
                            // Ended (cancelled) while we created: remove what we made.
                            backend.reap(task_id, &job, Duration::ZERO).await?;
                        } else if after.task.job.as_ref() == Some(&job) {
                            backend.recorded(task_id, &job);
                        }
                        Ok((Effect::Created(job), after))
                    }
                    Err(e) if e.retryable => {
                        tracing::Span::current().record("outcome", "retry");
                        Err(e)
                    }
                    Err(e) => {
                        tracing::Span::current().record("outcome", "failed");
                        let input = Input::BackendFailed {
                            reason: e.reason,
                            message: Some(e.message.clone()),
                        };
                        let after = execute(ctx, task_id, &input, loaded).await?;
                        Ok((Effect::Nothing, after))
                    }
                }
            }
            .instrument(span)
            .await
        }
        TaskState::Cancelling => {
            let Some(job) = &task.job else {
                return Ok((Effect::Nothing, loaded));
            };
            let job = job.clone();
            async {
                backend.stop(task_id, &job).await?;
                let after = execute(ctx, task_id, &Input::JobGone, loaded).await?;
                Ok((Effect::Stopped, after))
            }
            .instrument(crate::task_span!("stop", task_id))
            .await
        }
        state if state.is_terminal() && !task.reaped => {
            let Some(job) = task.job.clone() else {
                return Ok((Effect::Nothing, loaded));
            };
            // After a result the agent reported, it is only flushing and exiting: let it.
            let reported = matches!(
                state,
                TaskState::Succeeded
                    | TaskState::Failed {
                        reason: FailureReason::NonZeroExit { .. }
                    }
            );
            let grace = if reported {
                config.reap_grace
            } else {
                Duration::ZERO
            };
            async {
                backend.reap(task_id, &job, grace).await?;
                let after = execute(ctx, task_id, &Input::Reaped, loaded).await?;
                Ok((Effect::Reaped, after))
            }
            .instrument(crate::task_span!("reap", task_id, state = state.name()))
            .await
        }
        _ => Ok((Effect::Nothing, loaded)),
    }
}

/// Executes `input` on `current`; a refusal is fine (someone else moved the task on) and gives the task as
/// it is. A stale `current` costs the store a read (conflict), never a wrong decision.
async fn execute(
    ctx: &EngineCtx,
    task: TaskId,
    input: &Input,
    current: LoadedTask,
) -> Result<LoadedTask, BackendError> {
    match ctx
        .store
        .execute(task, input, ctx.clock.now(), Some(current))
        .await
    {
        Ok(executed) => Ok(executed.task),
        Err(ExecuteError::Refused { refusal, task: t }) => {
            debug!(%task, %refusal, ?input, "executor input refused");
            Ok(*t)
        }
        Err(ExecuteError::Store(e)) => Err(BackendError::transient_from("recording the effect", e)),
    }
}

/// Whether an event of this kind can never call for an effect: it changes no state the effect table
/// reads (a progress report leaves a running or cancelling task as it was).
fn cannot_change_an_effect(body: &EventBody) -> bool {
    matches!(body, EventBody::Progress { .. } | EventBody::Unknown)
}

/// Whether an event of this kind ends the executor's interest in its task for good: `reaped` is a task's
/// last event, and a `rejected` task never had a sandbox.
fn ends_the_task(body: &EventBody) -> bool {
    matches!(body, EventBody::Reaped | EventBody::Rejected { .. })
}

/// A delivered event waiting for its task's turn.
struct Delivery {
    /// The message to ack once the turn's effect is done; `None` when it was acked on delivery (an event
    /// that cannot call for an effect, see [`run`]).
    msg: Option<jetstream::Message>,
    /// The event, or `None` when it could not be decoded (the task is then read from the store).
    event: Option<StoredEvent>,
}

/// What a turn found when it folded its events onto the task's state.
struct Folding {
    /// The task's state after the events that follow on from it.
    current: LoadedTask,
    /// An event did not follow on (or could not be read): the state must be read from the store.
    gap: bool,
    /// An event may call for an effect.
    effectful: bool,
    /// An event says nothing more can be done for the task.
    ended: bool,
}

/// Folds a turn's events (`None`: one that could not be decoded) onto `current`: events at the next
/// position are evolved in, events already folded (this executor's own appends, redeliveries) skipped,
/// anything else is a gap.
fn fold<'a>(
    mut current: LoadedTask,
    events: impl IntoIterator<Item = Option<&'a StoredEvent>>,
) -> Folding {
    let (mut gap, mut effectful, mut ended) = (false, false, false);
    for event in events {
        let Some(stored) = event else {
            gap = true;
            effectful = true;
            continue;
        };
        effectful |= !cannot_change_an_effect(&stored.event.body);
        ended |= ends_the_task(&stored.event.body);
        match stored.position {
            Some(p) if p == current.task.events && stored.sequence > current.last_sequence => {
                current.task = evolve(std::mem::take(&mut current.task), &stored.event);
                if current.first_sequence == 0 {
                    current.first_sequence = stored.sequence;
                }
                current.last_sequence = stored.sequence;
            }
            Some(p) if p < current.task.events => {}
            _ => gap = true,
        }
    }
    Folding {
        current,
        gap,
        effectful,
        ended,
    }
}

/// One executor: what every turn shares.
struct Executor<B> {
    ctx: Arc<EngineCtx>,
    backend: Arc<B>,
    config: ExecutorConfig,
    /// The run queue across tasks.
    turns: Mutex<Turns<Delivery>>,
    /// Woken when a task joins the line.
    ready: Notify,
    /// Each live task's folded state, as of the last event this executor saw or wrote. A task is in it
    /// only between its turns (a turn takes it out), and never once [`LoadedTask::finished`].
    folded: Mutex<HashMap<TaskId, LoadedTask>>,
}

impl<B: Backend> Executor<B> {
    fn turns(&self) -> std::sync::MutexGuard<'_, Turns<Delivery>> {
        self.turns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn folded(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, LoadedTask>> {
        self.folded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a delivered event for its task's turn.
    fn deliver(&self, task: TaskId, delivery: Delivery) {
        let mut turns = self.turns();
        let joined = turns.push(task, delivery);
        self.ctx.held.executor_turns.set(turns.tasks());
        drop(turns);
        if joined {
            self.ready.notify_one();
        }
    }

    /// The next ready task and its events, once there is one.
    async fn next_turn(&self) -> (TaskId, Vec<Delivery>) {
        loop {
            let notified = self.ready.notified();
            if let Some(turn) = self.turns().take_turn() {
                return turn;
            }
            notified.await;
        }
    }

    /// Ends `task`'s turn; it joins the line again if events arrived meanwhile.
    fn end_turn(&self, task: TaskId) {
        let mut turns = self.turns();
        let again = turns.done(task);
        self.ctx.held.executor_turns.set(turns.tasks());
        drop(turns);
        if again {
            self.ready.notify_one();
        }
    }

    /// Keeps `loaded` as `task`'s state until its next turn, unless nothing more can be done for it.
    fn hold(&self, task: TaskId, mut loaded: LoadedTask) {
        let mut folded = self.folded();
        if !loaded.finished() {
            // The launch is only needed to create the sandbox: do not hold it for the task's whole life.
            if loaded.task.state != TaskState::Accepted {
                loaded.task.spec = None;
            }
            folded.insert(task, loaded);
        }
        crate::metrics::METRICS
            .executor_tasks_held
            .set(i64::try_from(folded.len()).unwrap_or(i64::MAX));
        self.ctx.held.executor_held.set(folded.len());
    }

    /// One turn of `task`: fold its events, reconcile once if any may call for an effect, then ack.
    async fn turn(&self, task: TaskId, batch: Vec<Delivery>) {
        let held = {
            let mut folded = self.folded();
            let held = folded.remove(&task);
            self.ctx.held.executor_held.set(folded.len());
            held
        };
        let was_held = held.is_some();
        let Folding {
            mut current,
            gap,
            effectful,
            ended,
        } = fold(
            held.unwrap_or_default(),
            batch.iter().map(|delivery| delivery.event.as_ref()),
        );
        if ended {
            // The task is done for good: nothing to read, nothing to hold.
            ack_all(&batch).await;
            self.hold(task, LoadedTask::default());
            return;
        }
        if gap {
            // The state read must include the newest event delivered: on a cluster a lagging stream
            // replica may answer the read without it.
            let newest = batch
                .iter()
                .filter_map(|d| d.msg.as_ref()?.info().ok().map(|i| i.stream_sequence))
                .max()
                .unwrap_or(0);
            match self.catch_up(task, current, newest).await {
                Ok(caught_up) => current = caught_up,
                Err(e) => {
                    warn!(%task, error = %e, "executor: cannot read the task; will retry");
                    self.retry_later(&batch).await;
                    return;
                }
            }
        }
        if was_held && !gap && !effectful {
            ack_all(&batch).await;
            self.hold(task, current);
            return;
        }
        // While the effect runs the turn's messages are kept alive with progress acks, so the
        // consumer's ack wait (how long a dead replica's events take to reach another) can be short
        // however long an effect takes. At shutdown the effect gets the shutdown grace, then its
        // messages are handed back for another replica, which redoes it idempotently.
        let work = keep_alive(
            &batch,
            self.config.ack_wait,
            reconcile(&self.ctx, &*self.backend, task, current, &self.config),
        );
        let result = tokio::select! {
            result = work => Some(result),
            () = hand_over_time(&self.ctx) => None,
        };
        match result {
            Some(Ok((effect, after))) => {
                if effect != Effect::Nothing {
                    debug!(%task, ?effect, "executor");
                }
                // The effect's own event comes back through the consumer: it is already folded then.
                self.hold(task, after);
                ack_all(&batch).await;
            }
            Some(Err(e)) => {
                crate::metrics::METRICS
                    .backend_errors
                    .with_label_values(&[if e.retryable {
                        "transient"
                    } else {
                        "permanent"
                    }])
                    .inc();
                warn!(%task, error = %e, "executor: will retry");
                self.retry_later(&batch).await;
            }
            None => {
                info!(%task, "executor: stopping mid-effect; handing the events to another replica");
                for msg in batch.iter().filter_map(|d| d.msg.as_ref()) {
                    hand_over(msg, "executor").await;
                }
            }
        }
    }

    /// `held` brought up to date with the events stored after it: only the missing events are read (one
    /// or two when another engine took them), so a gap costs what is missing, not the whole history. A
    /// state those events do not follow on from is replaced by a read of the whole task.
    async fn catch_up(
        &self,
        task: TaskId,
        held: LoadedTask,
        newest: u64,
    ) -> Result<LoadedTask, crate::store::StoreError> {
        let store = &self.ctx.store;
        let missing = store.read_after(task, held.last_sequence).await?;
        let caught_up = fold(held, missing.iter().map(Some));
        if caught_up.gap || caught_up.current.last_sequence < newest {
            // A gap, or a read that ends before an event already delivered (a lagging replica).
            return store.load_at_least(task, newest).await;
        }
        Ok(caught_up.current)
    }

    /// Acks all of `batch` but its newest unacked message, which is redelivered after the retry delay;
    /// the task's state is not held, so the redelivery reads it and reconciles whatever the event's kind.
    /// (A turn whose every message was acked on delivery called for no effect: dropping the state is all.)
    async fn retry_later(&self, batch: &[Delivery]) {
        let mut unacked = batch.iter().filter_map(|d| d.msg.as_ref());
        let Some(newest) = unacked.next_back() else {
            return;
        };
        for msg in unacked {
            let _ = msg.ack().await;
        }
        let _ = newest
            .ack_with(AckKind::Nak(Some(self.config.retry_delay)))
            .await;
    }
}

/// Completes `shutdown_grace` after the engine was asked to stop: the moment work still in hand is
/// handed back to its stream.
pub(crate) async fn hand_over_time(ctx: &EngineCtx) {
    ctx.shutdown.cancelled().await;
    tokio::time::sleep(ctx.shutdown_grace).await;
}

/// Gives `msg` back to its stream for immediate redelivery (to another replica), counting it.
pub(crate) async fn hand_over(msg: &jetstream::Message, loop_name: &str) {
    crate::metrics::METRICS
        .handed_over
        .with_label_values(&[loop_name])
        .inc();
    if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
        // Not handed back: the server redelivers it after its ack wait anyway.
        warn!(error = %e, loop_name, "could not hand a message back; it is redelivered after its ack wait");
    }
}

/// Runs `work`, telling the server every third of `ack_wait` that the messages of `batch` are still
/// being worked on.
async fn keep_alive<T>(
    batch: &[Delivery],
    ack_wait: Duration,
    work: impl std::future::Future<Output = T>,
) -> T {
    let period = (ack_wait / 3).max(Duration::from_millis(100));
    let mut work = std::pin::pin!(work);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            result = &mut work => return result,
            _ = ticks.tick() => {
                for msg in batch.iter().filter_map(|d| d.msg.as_ref()) {
                    let _ = msg.ack_with(AckKind::Progress).await;
                }
            }
        }
    }
}

/// Acks every message of `batch` not acked yet. The acks are sent, not awaited: a turn that waited for the
/// server's confirmation held its worker for a round trip per event, which under load made workers, not
/// effects, the executor's limit (accepted → scheduled waited seconds). A lost ack only means a
/// redelivery, which the fold skips as already seen.
async fn ack_all(batch: &[Delivery]) {
    for msg in batch.iter().filter_map(|d| d.msg.as_ref()) {
        let _ = msg.ack().await;
    }
}

/// Runs the executor over `backend` until `ctx.shutdown`.
pub async fn run<B: Backend>(
    ctx: Arc<EngineCtx>,
    backend: Arc<B>,
    config: ExecutorConfig,
) -> Result<(), ExecutorError> {
    let names = ctx.names().clone();
    let mut messages = crate::pull::DurableMessages::open(
        &ctx.topology.events,
        pull::Config {
            durable_name: Some(config.durable_name.clone()),
            filter_subject: names.events_all(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            max_ack_pending: i64::try_from(config.max_in_flight).unwrap_or(i64::MAX),
            ..Default::default()
        },
        "executor",
    )
    .await
    .map_err(ExecutorError::Consumer)?;
    let workers = config.concurrency.max(1);
    let limit = Arc::new(tokio::sync::Semaphore::new(workers));
    let all_workers = limit.clone();
    let executor = Arc::new(Executor {
        ctx: ctx.clone(),
        backend,
        config,
        turns: Mutex::default(),
        ready: Notify::new(),
        folded: Mutex::default(),
    });
    // Hands ready tasks to workers, first come first served, as workers free up.
    let dispatcher = AbortOnDrop(tokio::spawn({
        let executor = executor.clone();
        async move {
            loop {
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    return;
                };
                let (task, batch) = executor.next_turn().await;
                let executor = executor.clone();
                tokio::spawn(async move {
                    executor.turn(task, batch).await;
                    executor.end_turn(task);
                    drop(permit);
                });
            }
        }
    }));
    info!(ack_wait = ?executor.config.ack_wait, "executor running");
    loop {
        let msg = tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            msg = messages.next() => msg,
        };
        let Ok(Addressed::Events(task)) = names.parse(&msg.subject) else {
            let _ = msg.ack().await;
            continue;
        };
        let event = log::decode_message(&names, &msg).ok();
        // An event that cannot call for an effect is acked now, before its turn: acking it later could
        // only redo nothing, and a flood of them must not fill the consumer's window of unacked messages
        // (`max_in_flight`), which would stop the delivery of every other task's events.
        let msg = match &event {
            Some(stored) if cannot_change_an_effect(&stored.event.body) => {
                let _ = msg.ack().await;
                None
            }
            _ => Some(msg),
        };
        executor.deliver(task, Delivery { msg, event });
    }
    // Stopping: no new turns; what the client pulled but nobody started goes back at once; the turns
    // in hand finish or hand their events back (each bounds itself by the shutdown grace); then what
    // queued behind them goes back too.
    drop(dispatcher);
    let mut handed = 0;
    // Stop pulling before handing anything back (see `DurableMessages::stop`): a nak'd message must
    // go to another replica, not to this engine's own pull requests still waiting on the server.
    for msg in messages.stop() {
        hand_over(&msg, "executor").await;
        handed += 1;
    }
    let all = u32::try_from(workers).unwrap_or(u32::MAX);
    let finished = tokio::time::timeout(
        ctx.shutdown_grace + Duration::from_secs(1),
        all_workers.acquire_many(all),
    )
    .await
    .is_ok();
    let queued: Vec<Delivery> = {
        let mut turns = executor.turns();
        std::iter::from_fn(|| turns.take_turn())
            .flat_map(|(_, batch)| batch)
            .collect()
    };
    for msg in queued.iter().filter_map(|d| d.msg.as_ref()) {
        hand_over(msg, "executor").await;
        handed += 1;
    }
    info!(handed_over_unstarted = handed, finished, "executor stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use taskpods_events::{Event, LaunchPolicy, LaunchTask, Task, decide, stamp};

    /// A task's events as stored from stream sequence 10 on, with positions.
    fn history(task: TaskId, inputs: &[Input]) -> Vec<StoredEvent> {
        let at = Utc::now();
        let mut folded = Task::default();
        let mut out = Vec::new();
        for input in inputs {
            let events: Vec<Event> = stamp(task, &folded, at, decide(&folded, input).unwrap());
            for event in events {
                folded = evolve(folded, &event);
                out.push(StoredEvent {
                    sequence: 10 + out.len() as u64,
                    stored_at: None,
                    position: Some(out.len() as u64),
                    kind: event.body.kind().to_owned(),
                    event,
                });
            }
        }
        out
    }

    fn lifecycle(task: TaskId) -> Vec<StoredEvent> {
        let launch = Input::Launch {
            spec: LaunchTask::script("true").validate(&LaunchPolicy::default()),
            at: Utc::now(),
        };
        let mut inputs = vec![
            launch,
            Input::JobCreated { job: "j".into() },
            Input::AgentHello,
        ];
        for i in 0..5 {
            inputs.push(Input::AgentProgress {
                message: format!("{i}"),
                percent: None,
            });
        }
        inputs.push(Input::AgentResult(Default::default()));
        inputs.push(Input::Reaped);
        history(task, &inputs)
    }

    #[test]
    fn a_new_task_is_folded_from_its_first_event_and_equals_a_replay() {
        let events = lifecycle(TaskId::mint());
        let replay = Task::replay(events.iter().map(|e| &e.event));
        // Event by event, and all at once, as turns coalesce them.
        let mut current = LoadedTask::default();
        for e in &events {
            let f = fold(current, [Some(e)]);
            assert!(!f.gap, "{e:?}");
            current = f.current;
        }
        assert_eq!(current.task, replay);
        assert_eq!(
            (current.first_sequence, current.last_sequence),
            (10, 10 + events.len() as u64 - 1)
        );
        let all = fold(LoadedTask::default(), events.iter().map(Some));
        assert_eq!((all.current, all.gap), (current, false));
    }

    #[test]
    fn events_already_folded_are_skipped_and_a_missing_one_is_a_gap() {
        let events = lifecycle(TaskId::mint());
        let upto = |n: usize| fold(LoadedTask::default(), events[..n].iter().map(Some)).current;
        // Redelivered (or this executor's own append coming back): nothing changes, no gap.
        let f = fold(upto(4), [Some(&events[2]), Some(&events[3])]);
        assert_eq!((f.current, f.gap), (upto(4), false));
        // An event that does not follow on: the task must be read.
        assert!(fold(upto(3), [Some(&events[4])]).gap);
        // The first event seen is not the task's first (another replica, or a restart): read it.
        assert!(fold(LoadedTask::default(), [Some(&events[5])]).gap);
        // An event that could not be decoded: read it.
        assert!(fold(upto(3), [None]).gap);
    }

    #[test]
    fn progress_calls_for_no_effect_and_reaped_ends_the_executors_interest() {
        let events = lifecycle(TaskId::mint());
        let progress: Vec<&StoredEvent> = events
            .iter()
            .filter(|e| matches!(e.event.body, EventBody::Progress { .. }))
            .collect();
        assert_eq!(progress.len(), 5);
        let running = fold(LoadedTask::default(), events[..4].iter().map(Some)).current;
        let f = fold(running, progress.iter().copied().map(Some));
        assert!(!f.effectful && !f.gap && !f.ended);
        assert_eq!(f.current.task.progress, 5);
        let reaped = events.last().unwrap();
        let f = fold(LoadedTask::default(), [Some(reaped)]);
        assert!(
            f.ended,
            "a reaped event needs no read, whatever the state held"
        );
        let done = fold(LoadedTask::default(), events.iter().map(Some)).current;
        assert!(done.finished());
        let ended_not_reaped = fold(
            LoadedTask::default(),
            events[..events.len() - 1].iter().map(Some),
        )
        .current;
        assert!(
            !ended_not_reaped.finished(),
            "its sandbox is still to be reaped"
        );
    }
}
