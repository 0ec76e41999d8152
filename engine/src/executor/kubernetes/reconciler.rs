//! The reconciler: at start-up and then periodically, heals what the event log and Kubernetes disagree on
//! (docs/ARCHITECTURE.md, invariant 6). Only one engine replica reconciles at a time: it holds the lease
//! `reconciler` ([`crate::lease`]), so two replicas never delete the same Job or append for the same task
//! from two stale pictures; at shutdown it releases the lease, so another replica takes over at once.
//!
//! One pass:
//! 1. load every live task (from the `active` view, then the event log, which is the truth);
//! 2. list the Jobs carrying our labels (after step 1, so a task recorded `Scheduled` has its Job listed:
//!    the Job is created before `Scheduled` is appended);
//! 3. a live task past its deadline → `DeadlineReached`; a `Scheduled`/`Starting`/`Running`/`Cancelling`
//!    task whose Job is missing → `JobGone` (`Failed{JobLost}`, or `Cancelled` when cancelling, and then
//!    only once its pods are gone too: a cancel deletes the Job with background propagation, so the Job
//!    vanishes before its pods, and "Cancelled" must mean nothing runs any more);
//! 4. a Job whose task is unknown, or ended more than `orphan_grace` ago → an orphan: `Reaped` recorded
//!    when the task ended without it, then the Job deleted (waiting for its pods). Jobs are walked in
//!    task order;
//! 5. a task credentials Secret whose task has no Job → a stray (the garbage collector removes a Secret
//!    with its owning Job; this is the backstop): deleted. Secrets are listed (metadata only) before the
//!    Jobs, and the backend makes a Secret only after its Job, so a Secret of a Job being created is
//!    never taken for a stray.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;
use k8s_openapi::api::batch::v1::Job;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use taskpods_events::{Input, TaskId, TaskState};
use taskpods_projections::Views;
use taskpods_projections::buckets::BucketError;

use tracing::{debug, info, warn};

use super::job::{CREDENTIALS_SELECTOR, MANAGED_SELECTOR, TASK_LABEL};
use super::{KubernetesBackend, KubernetesConfig};
use crate::context::EngineCtx;
use crate::executor::backend::Backend;
use crate::lease::{Lease, LeaseError};
use crate::store::{ExecuteError, StoreError};

/// Why a pass could not be completed (the next one tries again).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The live-task view could not be opened or read.
    #[error("views: {0}")]
    Views(#[from] BucketError),
    /// The lease could not be read or written.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The event store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The Jobs could not be listed.
    #[error("list Jobs: {0}")]
    Kubernetes(#[from] kube::Error),
    /// The pods of a cancelling task whose Job is gone could not be listed.
    #[error("list the pods of a cancelling task: {0}")]
    Pods(#[source] crate::executor::backend::BackendError),
    /// The credentials Secrets could not be listed or a stray one deleted.
    #[error("{what}: {source}")]
    Secrets {
        /// What was being done.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Tasks failed because their Job vanished.
    pub lost: Vec<TaskId>,
    /// Tasks timed out past their deadline.
    pub timed_out: Vec<TaskId>,
    /// Orphan Jobs deleted.
    pub orphans: Vec<String>,
    /// Credentials Secrets deleted because their task had no Job.
    pub stray_secrets: Vec<String>,
}

/// The reconciler's settings.
#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    /// This replica's name in the lease.
    pub holder: String,
    /// Time between passes.
    pub interval: Duration,
    /// How long a lease lasts without renewal.
    pub lease_ttl: Duration,
    /// How long after a task ended its leftover Job counts as an orphan (before, the executor reaps it).
    pub orphan_grace: Duration,
}

impl ReconcilerConfig {
    /// The reconciler of the Kubernetes backend configured by `config`, holding the lease as the engine
    /// `engine_id` (unique per process, so a restarted replica is a new holder).
    pub fn for_backend(config: &KubernetesConfig, engine_id: &str) -> Self {
        let holder = engine_id.to_owned();
        Self {
            holder,
            interval: config.reconcile_interval,
            lease_ttl: config.lease_ttl,
            orphan_grace: config.orphan_grace,
        }
    }
}

/// One reconciliation pass (the caller holds the lease).
pub async fn reconcile_once(
    ctx: &EngineCtx,
    views: &mut Views,
    jobs: &Api<Job>,
    backend: &KubernetesBackend,
    orphan_grace: Duration,
) -> Result<Report, ReconcileError> {
    let store = &ctx.store;
    let mut report = Report::default();
    let now = ctx.clock.now();
    let _ = views.refresh().await;
    let active = views.active().await?;
    let mut live = Vec::new();
    for view in active {
        let loaded = store.load(view.task).await?;
        live.push((view.task, loaded.task));
    }
    // Before the Jobs (see step 5 in the module docs).
    let secrets = if backend.makes_credentials() {
        backend
            .secrets()
            .list_metadata(&ListParams::default().labels(CREDENTIALS_SELECTOR))
            .await
            .map_err(|source| ReconcileError::Secrets {
                what: "list credentials Secrets".to_owned(),
                source,
            })?
            .items
    } else {
        Vec::new()
    };
    let listed = jobs
        .list(&ListParams::default().labels(MANAGED_SELECTOR))
        .await?;
    // In task order, so a pass walks the Jobs in the same order on every replica.
    let mut by_task: BTreeMap<TaskId, String> = BTreeMap::new();
    for job in listed.items {
        let (Some(name), Some(task)) = (
            job.metadata.name.clone(),
            job.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(TASK_LABEL))
                .and_then(|t| t.parse::<TaskId>().ok()),
        ) else {
            continue;
        };
        by_task.insert(task, name);
    }

    for (id, task) in &live {
        if task.state.is_terminal() {
            continue;
        }
        if let Some(deadline) = task.deadline.filter(|d| *d <= now) {
            // As for the deadline timer: a result sent before the deadline, still queued, wins.
            if ctx.deadline_waits_for_result(*id, deadline, now).await {
                continue;
            }
            if settle(ctx, *id, &Input::DeadlineReached { now }).await? {
                info!(task = %id, "reconciler: past its deadline");
                report.timed_out.push(*id);
            }
            continue;
        }
        let has_job = matches!(
            task.state,
            TaskState::Scheduled | TaskState::Starting | TaskState::Running | TaskState::Cancelling
        );
        if has_job
            && !by_task.contains_key(id)
            && (task.state != TaskState::Cancelling
                || backend
                    .pods_of(*id)
                    .await
                    .map_err(ReconcileError::Pods)?
                    .is_empty())
            && settle(ctx, *id, &Input::JobGone).await?
        {
            info!(task = %id, "reconciler: the task's Job is gone");
            report.lost.push(*id);
        }
    }

    for secret in secrets {
        let task = secret
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(TASK_LABEL))
            .and_then(|t| t.parse::<TaskId>().ok());
        let Some(name) = secret.metadata.name else {
            continue;
        };
        if task.is_some_and(|t| by_task.contains_key(&t)) {
            continue;
        }
        info!(
            secret = name,
            "reconciler: deleting a credentials Secret whose Job is gone"
        );
        match backend
            .secrets()
            .delete(&name, &DeleteParams::default())
            .await
        {
            Ok(_) => report.stray_secrets.push(name),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(source) => {
                return Err(ReconcileError::Secrets {
                    what: format!("delete Secret {name}"),
                    source,
                });
            }
        }
    }

    for (id, job) in by_task {
        let task = match live.iter().find(|(t, _)| *t == id) {
            Some((_, task)) => task.clone(),
            None => store.load(id).await?.task,
        };
        // A just-finished task's Job is the executor's to reap, after its flush grace: only a Job still
        // there `orphan_grace` after the end is an orphan.
        let ended_long_ago = task.state.is_terminal()
            && task.finished_at.is_none_or(|at| {
                TimeDelta::from_std(orphan_grace)
                    .ok()
                    .and_then(|grace| at.checked_add_signed(grace))
                    .is_some_and(|until| until <= now)
            });
        let orphan = task.state == TaskState::New || ended_long_ago;
        if !orphan {
            continue;
        }
        info!(task = %id, job, state = task.state.name(), "reconciler: deleting an orphan Job");
        // `Reaped` is recorded before the Job is deleted: a holder killed between the two leaves a Job
        // of a reaped, long-ended task, which the next holder's pass finds and deletes (as an orphan,
        // recording nothing twice). The other order would lose the record: once the Job is gone, no
        // pass lists it again, and the ended task is not among the live ones.
        if task.state.is_terminal() && !task.reaped {
            settle(ctx, id, &Input::Reaped).await?;
        }
        if let Err(e) = backend.stop(id, &job).await {
            warn!(task = %id, job, error = %e, "reconciler: orphan not deleted yet");
            continue;
        }
        report.orphans.push(job);
    }
    Ok(report)
}

/// Executes `input`; whether it was appended (a refusal is fine: someone else moved the task on).
async fn settle(ctx: &EngineCtx, task: TaskId, input: &Input) -> Result<bool, ReconcileError> {
    match ctx.store.execute(task, input, ctx.clock.now(), None).await {
        Ok(_) => Ok(true),
        Err(ExecuteError::Refused { refusal, .. }) => {
            debug!(%task, %refusal, ?input, "reconciler input refused");
            Ok(false)
        }
        Err(ExecuteError::Store(e)) => Err(ReconcileError::Store(e)),
    }
}

/// Renews `lease` every third of `ttl`; completes when a renewal is refused or fails twice in a row
/// (renewals are a third of the lease apart, so two failures still leave the lease ours when this gives
/// up).
async fn renew_until_lost(lease: &Lease, ctx: &EngineCtx, ttl: Duration) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    let mut failures = 0;
    loop {
        tokio::time::sleep(period).await;
        match lease.acquire(ctx.clock.now()).await {
            Ok(true) => failures = 0,
            Ok(false) => return,
            Err(e) => {
                failures += 1;
                warn!(error = %e, "reconciler lease renewal failed");
                if failures >= 2 {
                    return;
                }
            }
        }
    }
}

/// Runs passes every `config.interval` while holding the lease, until `ctx.shutdown`.
pub async fn run(
    ctx: Arc<EngineCtx>,
    backend: KubernetesBackend,
    config: ReconcilerConfig,
) -> Result<(), ReconcileError> {
    let lease = Lease::open(
        &ctx.js,
        ctx.names().prefix(),
        "reconciler",
        &config.holder,
        config.lease_ttl,
        ctx.buckets,
    )
    .await?;
    let mut views = Views::open(&ctx.js, ctx.names(), ctx.buckets).await?;
    let jobs = backend.jobs().clone();
    info!(holder = %config.holder, interval = ?config.interval, "reconciler running");
    let held = crate::metrics::METRICS
        .lease_held
        .with_label_values(&["reconciler"]);
    loop {
        let acquired = lease.acquire(ctx.clock.now()).await;
        held.set(i64::from(matches!(acquired, Ok(true))));
        match acquired {
            Ok(true) => {
                // A pass can outlast the lease (a Job whose pods take long to go): the lease is renewed
                // while it runs, and the pass is abandoned the moment it cannot be, so a second holder
                // never works beside it.
                let pass = reconcile_once(&ctx, &mut views, &jobs, &backend, config.orphan_grace);
                tokio::select! {
                    result = pass => match result {
                        Ok(report) if report != Report::default() => info!(?report, "reconciled"),
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "reconciler pass failed; next pass retries"),
                    },
                    () = renew_until_lost(&lease, &ctx, config.lease_ttl) => {
                        held.set(0);
                        warn!("reconciler lease lost mid-pass; pass abandoned (the new holder redoes it)");
                    }
                    () = crate::executor::hand_over_time(&ctx) => {
                        info!("stopping mid-pass; the next holder redoes it");
                        break;
                    }
                }
            }
            Ok(false) => debug!("reconciler lease held by another replica"),
            Err(e) => warn!(error = %e, "reconciler lease unavailable"),
        }
        tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            () = tokio::time::sleep(config.interval) => {}
        }
    }
    held.set(0);
    match lease.release().await {
        Ok(true) => info!(holder = %config.holder, "reconciler lease released"),
        Ok(false) => {}
        Err(e) => warn!(error = %e, "reconciler lease not released; it expires on its own"),
    }
    Ok(())
}
