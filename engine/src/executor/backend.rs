//! What a backend is: the [`Backend`] trait the executor drives, and the [`BackendError`] it reports.
//! Every backend ([`super::local`], [`super::kubernetes`], [`super::noop`]) depends on this module and
//! nothing else of the executor, so the executor's modules import each other in one direction only.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use taskpods_events::{FailureReason, TaskId, TaskSpec};

/// A backend failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// The reason code recorded when the failure ends the task.
    pub reason: FailureReason,
    /// Details.
    pub message: String,
    /// Whether trying again later may work (the message is redelivered) or the task must fail.
    pub retryable: bool,
    /// The error that caused it, when there is one (the message, which the task's events record as
    /// text, already says it in words).
    #[source]
    pub source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl BackendError {
    /// A failure worth retrying.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            reason: FailureReason::BackendError,
            message: message.into(),
            retryable: true,
            source: None,
        }
    }

    /// A failure worth retrying, caused by `source`; the message says what was being done, then the cause.
    pub fn transient_from(
        doing: impl std::fmt::Display,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            reason: FailureReason::BackendError,
            message: format!("{doing}: {source}"),
            retryable: true,
            source: Some(Arc::new(source)),
        }
    }

    /// A failure that ends the task with `reason`.
    pub fn fatal(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            retryable: false,
            source: None,
        }
    }
}

/// What runs tasks: Kubernetes Jobs, or local sandboxed processes. Every method is idempotent.
pub trait Backend: Send + Sync + 'static {
    /// Creates the task's sandbox, or adopts the one that already exists under the task's deterministic
    /// name (never a second one); returns that name (the `job` of `Scheduled`).
    fn create(
        &self,
        task: TaskId,
        spec: &TaskSpec,
        deadline: DateTime<Utc>,
    ) -> impl Future<Output = Result<String, BackendError>> + Send;

    /// The executor has recorded `job` as the task's sandbox (`Scheduled` is appended). Backends whose
    /// sandbox starts its work by itself ignore it; the no-op backend starts its simulated agent here, so
    /// the agent's first report cannot overtake the record of its sandbox.
    fn recorded(&self, task: TaskId, job: &str) {
        let _ = (task, job);
    }

    /// Stops the sandbox now (cancel, timeout, lost agent): asks politely, then kills after a grace
    /// period. Returns once nothing of the task runs any more. Succeeds when there is nothing to stop.
    fn stop(
        &self,
        task: TaskId,
        job: &str,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Waits up to `grace` for the sandbox to end on its own (the agent flushing its output after its
    /// result), stops it if it did not, and removes what is left. Succeeds when nothing is left.
    fn reap(
        &self,
        task: TaskId,
        job: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
}
