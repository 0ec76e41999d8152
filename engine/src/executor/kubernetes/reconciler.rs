//! The reconciler: at start-up and then periodically, heals what the event log and Kubernetes disagree on
//! (docs/ARCHITECTURE.md, invariant 6). Only one engine replica reconciles at a time: it holds a lease in the KV bucket
//! `<prefix>_leases` (key `reconciler`, value `<holder> <expiry ms>`, written with revision checks), so two
//! replicas never delete the same Job or append for the same task from two stale pictures.
//!
//! One pass:
//! 1. load every live task (from the `active` view, then the event log, which is the truth);
//! 2. list the Jobs carrying our labels (after step 1, so a task recorded `Scheduled` has its Job listed:
//!    the Job is created before `Scheduled` is appended);
//! 3. a live task past its deadline → `DeadlineReached`; a `Scheduled`/`Starting`/`Running`/`Cancelling`
//!    task whose Job is missing → `JobGone` (`Failed{JobLost}`, or `Cancelled` when cancelling, and then
//!    only once its pods are gone too: a cancel deletes the Job with background propagation, so the Job
//!    vanishes before its pods, and "Cancelled" must mean nothing runs any more);
//! 4. a Job whose task is unknown, or ended more than `orphan_grace` ago → an orphan: deleted (waiting for its pods), and `Reaped`
//!    recorded when the task ended without it;
//! 5. a task credentials Secret whose task has no Job → a stray (the garbage collector removes a Secret
//!    with its owning Job; this is the backstop): deleted. Secrets are listed (metadata only) before the
//!    Jobs, and the backend makes a Secret only after its Job, so a Secret of a Job being created is
//!    never taken for a stray.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use chrono::{DateTime, TimeDelta, Utc};
use k8s_openapi::api::batch::v1::Job;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use taskpods_events::{Input, TaskId, TaskState};
use taskpods_projections::buckets::BucketError;
use taskpods_projections::{BucketSettings, Views};

use tracing::{debug, info, warn};

use super::job::{CREDENTIALS_SELECTOR, MANAGED_SELECTOR, TASK_LABEL};
use super::{KubernetesBackend, KubernetesConfig};
use crate::context::EngineCtx;
use crate::executor::backend::Backend;
use crate::store::{ExecuteError, StoreError};

/// Why a pass could not be completed (the next one tries again).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The lease bucket or the live-task view could not be opened or read.
    #[error("lease or views: {0}")]
    Views(#[from] BucketError),
    /// The lease could not be read.
    #[error("lease: {0}")]
    Lease(#[source] kv::EntryError),
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
    /// The reconciler of the Kubernetes backend configured by `config`, holding the lease as this
    /// replica (`$HOSTNAME` plus a fresh id, so a restarted pod is a new holder).
    pub fn for_backend(config: &KubernetesConfig) -> Self {
        let holder = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .map_or_else(
                || format!("engine-{}", uuid::Uuid::now_v7()),
                |h| format!("{h}-{}", uuid::Uuid::now_v7()),
            );
        Self {
            holder,
            interval: config.reconcile_interval,
            lease_ttl: config.lease_ttl,
            orphan_grace: config.orphan_grace,
        }
    }
}

/// A lease in a KV bucket: at most one holder until it expires.
#[derive(Debug, Clone)]
pub struct Lease {
    kv: kv::Store,
    key: String,
    holder: String,
    ttl: Duration,
}

impl Lease {
    /// Opens (creating when missing) the lease bucket of `prefix`.
    pub async fn open(
        js: &jetstream::Context,
        prefix: &str,
        key: &str,
        holder: &str,
        ttl: Duration,
        settings: BucketSettings,
    ) -> Result<Self, ReconcileError> {
        let bucket = format!("{}_leases", prefix.replace('.', "_"));
        let kv = taskpods_projections::buckets::ensure_bucket(js, &bucket, settings).await?;
        Ok(Self {
            kv,
            key: key.to_owned(),
            holder: holder.to_owned(),
            ttl,
        })
    }

    /// Takes or renews the lease; whether this holder has it now.
    pub async fn acquire(&self, now: DateTime<Utc>) -> Result<bool, ReconcileError> {
        let expiry = now + TimeDelta::from_std(self.ttl).unwrap_or(TimeDelta::seconds(30));
        let value = format!("{} {}", self.holder, expiry.timestamp_millis());
        let current = self
            .kv
            .entry(&self.key)
            .await
            .map_err(ReconcileError::Lease)?;
        let result = match current {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let text = String::from_utf8_lossy(&entry.value);
                let mut parts = text.split_whitespace();
                let holder = parts.next().unwrap_or_default();
                let until = parts
                    .next()
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(0);
                if holder != self.holder && until > now.timestamp_millis() {
                    return Ok(false);
                }
                self.kv
                    .update(&self.key, value.into(), entry.revision)
                    .await
                    .is_ok()
            }
            Some(entry) => self
                .kv
                .update(&self.key, value.into(), entry.revision)
                .await
                .is_ok(),
            None => self.kv.create(&self.key, value.into()).await.is_ok(),
        };
        // A failed conditional write means another replica got there first.
        Ok(result)
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
    let mut by_task: HashMap<TaskId, String> = HashMap::new();
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
        if task.deadline.is_some_and(|d| d <= now) {
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
        if let Err(e) = backend.stop(id, &job).await {
            warn!(task = %id, job, error = %e, "reconciler: orphan not deleted yet");
            continue;
        }
        if task.state.is_terminal() && !task.reaped {
            settle(ctx, id, &Input::Reaped).await?;
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
    loop {
        match lease.acquire(ctx.clock.now()).await {
            Ok(true) => {
                match reconcile_once(&ctx, &mut views, &jobs, &backend, config.orphan_grace).await {
                    Ok(report) if report != Report::default() => info!(?report, "reconciled"),
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "reconciler pass failed; next pass retries"),
                }
            }
            Ok(false) => debug!("reconciler lease held by another replica"),
            Err(e) => warn!(error = %e, "reconciler lease unavailable"),
        }
        tokio::select! {
            () = ctx.shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(config.interval) => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use taskpods_harness::NatsServer;

    /// Against a real nats-server: one holder at a time, renewals keep it, expiry hands it over.
    #[tokio::test]
    async fn the_lease_has_one_holder_until_it_expires() {
        let server = NatsServer::start();
        let js = jetstream::new(server.connect().await);
        let ttl = Duration::from_secs(10);
        let open = |holder: &'static str| {
            let js = js.clone();
            async move {
                Lease::open(
                    &js,
                    "taskpods",
                    "reconciler",
                    holder,
                    ttl,
                    BucketSettings::default(),
                )
                .await
                .expect("lease bucket")
            }
        };
        let (a, b) = (open("a").await, open("b").await);
        let t0 = Utc::now();
        assert!(a.acquire(t0).await.unwrap(), "a takes the free lease");
        assert!(
            !b.acquire(t0).await.unwrap(),
            "b is refused while a holds it"
        );
        assert!(
            a.acquire(t0 + TimeDelta::seconds(5)).await.unwrap(),
            "a renews"
        );
        // Still within a's renewed term (5 s + 10 s).
        assert!(!b.acquire(t0 + TimeDelta::seconds(14)).await.unwrap());
        assert!(
            b.acquire(t0 + TimeDelta::seconds(16)).await.unwrap(),
            "b takes over after expiry"
        );
        assert!(
            !a.acquire(t0 + TimeDelta::seconds(16)).await.unwrap(),
            "a lost it"
        );
    }
}
