//! The executor: a durable consumer of the event stream that makes the backend match each task's state.
//!
//! It is level-triggered: on any event of a task it loads the task and acts on its *current* state, so a
//! redelivered or old event never repeats an effect, and every effect is idempotent besides:
//!
//! | current state | effect | then executes |
//! |---|---|---|
//! | `Accepted` | create the sandbox (or adopt the one with the task's deterministic name) | `JobCreated{job}` |
//! | `Cancelling` | stop the sandbox | `JobGone` (→ `Cancelled`) |
//! | terminal, with a Job, not reaped | wait a little for the agent to finish on its own (only after a result it reported), stop it, remove the sandbox | `Reaped` |
//! | anything else | nothing | |
//!
//! A message is acked only after its effect is done and its event appended; a transient failure naks it
//! for redelivery. Different tasks proceed in parallel (bounded); one task's messages are handled one at
//! a time. The [`Backend`] trait ([`backend`]) is what a backend implements: [`local`] (a sandboxed process per
//! task) is the embedded default; [`kubernetes`] (a Job per task, with its watcher and reconciler) plugs into
//! the same loop; [`noop`] (benchmarks and tests) plays each sandbox and its agent in-process.
//!
//! Layout (imports point one way: `mod.rs` → {`local`, `kubernetes`, `noop`} → `backend`; inside `kubernetes/`,
//! {`watcher`, `reconciler`} → `kubernetes/mod.rs` → `job`; nothing imports back up):
//! - `mod.rs`: the executor loop ([`run`], [`reconcile`]) and [`BackendConfig`];
//! - [`backend`]: the [`Backend`] trait and [`BackendError`];
//! - [`local`]: the local backend;
//! - [`noop`]: the no-op backend (benchmarks and tests: no code runs);
//! - [`kubernetes`]: the Kubernetes backend, its Job ([`kubernetes::job`]), watcher
//!   ([`kubernetes::watcher`]) and reconciler ([`kubernetes::reconciler`]).

pub mod backend;
pub mod kubernetes;
pub mod local;
pub mod noop;

pub use backend::{Backend, BackendError};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::StreamExt;
use taskpods_events::{Addressed, FailureReason, Input, TaskId, TaskState};
use tracing::{debug, info, warn};

use crate::context::EngineCtx;
use crate::store::{ExecuteError, LoadedTask};

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
    /// How long the server waits for an ack before redelivering (longer than any effect).
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
            ack_wait: Duration::from_secs(60),
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

/// Makes the backend match the task's current state (see the module table).
pub async fn reconcile<B: Backend>(
    ctx: &EngineCtx,
    backend: &B,
    task_id: TaskId,
    config: &ExecutorConfig,
) -> Result<Effect, BackendError> {
    let store = &ctx.store;
    let loaded = store
        .load(task_id)
        .await
        .map_err(|e| BackendError::transient_from("loading the task", e))?;
    let task = &loaded.task;
    match task.state {
        TaskState::Accepted => {
            let (Some(spec), Some(deadline)) = (&task.spec, task.deadline) else {
                return Ok(Effect::Nothing);
            };
            match backend.create(task_id, spec, deadline).await {
                Ok(job) => {
                    let input = Input::JobCreated { job: job.clone() };
                    match execute(ctx, task_id, &input, Some(loaded.clone())).await? {
                        Some(after) if after.task.state.is_terminal() => {
                            // Ended (cancelled) while we created: remove what we made.
                            backend.reap(task_id, &job, Duration::ZERO).await?;
                        }
                        Some(after) if after.task.job.as_ref() == Some(&job) => {
                            backend.recorded(task_id, &job);
                        }
                        _ => {}
                    }
                    Ok(Effect::Created(job))
                }
                Err(e) if e.retryable => Err(e),
                Err(e) => {
                    let input = Input::BackendFailed {
                        reason: e.reason,
                        message: Some(e.message.clone()),
                    };
                    execute(ctx, task_id, &input, Some(loaded.clone())).await?;
                    Ok(Effect::Nothing)
                }
            }
        }
        TaskState::Cancelling => {
            let Some(job) = &task.job else {
                return Ok(Effect::Nothing);
            };
            backend.stop(task_id, job).await?;
            execute(ctx, task_id, &Input::JobGone, None).await?;
            Ok(Effect::Stopped)
        }
        state if state.is_terminal() && !task.reaped => {
            let Some(job) = &task.job else {
                return Ok(Effect::Nothing);
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
            backend.reap(task_id, job, grace).await?;
            execute(ctx, task_id, &Input::Reaped, None).await?;
            Ok(Effect::Reaped)
        }
        _ => Ok(Effect::Nothing),
    }
}

/// Executes `input`; a refusal is fine (someone else moved the task on) and gives the task as it is.
async fn execute(
    ctx: &EngineCtx,
    task: TaskId,
    input: &Input,
    cached: Option<LoadedTask>,
) -> Result<Option<LoadedTask>, BackendError> {
    match ctx
        .store
        .execute(task, input, ctx.clock.now(), cached)
        .await
    {
        Ok(executed) => Ok(Some(executed.task)),
        Err(ExecuteError::Refused { refusal, task: t }) => {
            debug!(%task, %refusal, ?input, "executor input refused");
            Ok(Some(*t))
        }
        Err(ExecuteError::Store(e)) => Err(BackendError::transient_from("recording the effect", e)),
    }
}

/// One executor: what every message's work shares.
struct Executor<B> {
    ctx: Arc<EngineCtx>,
    backend: Arc<B>,
    config: ExecutorConfig,
    /// One lock per task with work in hand, so a task's messages are handled one at a time.
    locks: Mutex<HashMap<TaskId, Arc<tokio::sync::Mutex<()>>>>,
}

impl<B: Backend> Executor<B> {
    /// The lock of `task`, taken in message order (before the work is spawned).
    fn lock_of(&self, task: TaskId) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(task)
            .or_default()
            .clone()
    }

    /// Reconciles `task` for `msg` under its `lock`, then acks, naks or, at shutdown, leaves it.
    async fn handle(
        &self,
        task: TaskId,
        msg: jetstream::Message,
        lock: Arc<tokio::sync::Mutex<()>>,
    ) {
        let guard = lock.lock().await;
        let work = reconcile(&self.ctx, &*self.backend, task, &self.config);
        let result = tokio::select! {
            result = work => Some(result),
            () = self.ctx.shutdown.cancelled() => None,
        };
        match result {
            Some(Ok(effect)) => {
                if effect != Effect::Nothing {
                    debug!(%task, ?effect, "executor");
                }
                let _ = msg.double_ack().await;
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
                let _ = msg
                    .ack_with(AckKind::Nak(Some(self.config.retry_delay)))
                    .await;
            }
            // Shutting down mid-effect: leave the message unacked, the next engine redoes it.
            None => {}
        }
        drop(guard);
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&lock) == 2 {
            locks.remove(&task);
        }
    }
}

/// Runs the executor over `backend` until `ctx.shutdown`.
pub async fn run<B: Backend>(
    ctx: Arc<EngineCtx>,
    backend: Arc<B>,
    config: ExecutorConfig,
) -> Result<(), ExecutorError> {
    let names = ctx.names().clone();
    let mut messages = ctx
        .topology
        .events
        .get_or_create_consumer(
            &config.durable_name,
            pull::Config {
                durable_name: Some(config.durable_name.clone()),
                filter_subject: names.events_all(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait,
                max_ack_pending: i64::try_from(config.max_in_flight).unwrap_or(i64::MAX),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| ExecutorError::Consumer(e.into()))?
        .messages()
        .await
        .map_err(|e| ExecutorError::Consumer(e.into()))?;
    let limit = Arc::new(tokio::sync::Semaphore::new(config.concurrency.max(1)));
    let executor = Arc::new(Executor {
        ctx: ctx.clone(),
        backend,
        config,
        locks: Mutex::default(),
    });
    info!("executor running");
    loop {
        let next = tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            next = messages.next() => next,
        };
        let msg = match next {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => {
                warn!(error = %e, "executor: consumer error");
                continue;
            }
            None => break,
        };
        let Ok(Addressed::Events(task)) = names.parse(&msg.subject) else {
            let _ = msg.ack().await;
            continue;
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let lock = executor.lock_of(task);
        let executor = executor.clone();
        tokio::spawn(async move {
            executor.handle(task, msg, lock).await;
            drop(permit);
        });
    }
    Ok(())
}
