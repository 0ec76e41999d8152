//! The Kubernetes backend: one hardened Job per task (built by [`job`]), created under the task's
//! deterministic name so that a second create finds the first Job and adopts it instead of making another.
//!
//! Every effect is safe to repeat after a crash at any point:
//! - `create`: `AlreadyExists` → read the Job, check its task-id label, adopt it (a Job of that name with
//!   another task's label is an error, never overwritten); then, with a task signer, the task's own NATS
//!   credentials go into a Secret owned by the Job (`AlreadyExists`: made by an earlier try, kept). The
//!   Job comes first so the Secret can name it as its owner and goes when the Job goes; its pod waits in
//!   `ContainerCreating` for the Secret meanwhile (a secret volume that is not optional);
//! - `stop`: delete with background propagation (`NotFound` is success), then wait until no pod of the
//!   task is left, so `Cancelled`/`Reaped` are recorded only once nothing runs; past `stop_timeout`,
//!   pods that ended (`Succeeded`/`Failed`) but are not removed (a node that lost contact) are enough,
//!   and only a pod still running fails the stop (retried);
//! - `reap`: give the pod a grace period to finish on its own (the agent flushing output), then `stop`.
//!
//! What Kubernetes reports about the Jobs and pods is turned into events by [`watcher`]; orphans and
//! lost Jobs are healed by [`reconciler`]. The engine's server starts both beside the executor.
//!
//! Layout: `mod.rs` (this: the configuration and [`KubernetesBackend`]) → [`job`] (the Job, pure);
//! [`throttle`] (the API request limit, `api_qps`/`api_burst`); [`watcher`] and [`reconciler`] import
//! from here and from [`job`], never the other way.

pub mod job;
pub mod reconciler;
pub mod throttle;
pub mod watcher;

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use taskpods_events::{FailureReason, TaskId, TaskSpec};
use tracing::{info, warn};

use self::job::{JobConfig, TASK_LABEL};
use self::throttle::Throttle;
use super::backend::{Backend, BackendError};
use crate::credentials::TaskCredentials;

/// A Kubernetes client, wrapped so configurations stay `Debug`.
#[derive(Clone)]
pub struct KubeClient(pub Client);

impl fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KubeClient")
    }
}

/// Kubernetes backend settings.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// What goes into each Job (namespace, ServiceAccount, NATS URL, credentials Secret, sizes).
    pub job: JobConfig,
    /// The client; `None`: in-cluster configuration or `~/.kube/config` (`kube::Client::try_default`).
    pub client: Option<KubeClient>,
    /// A task not running this long after it was accepted fails with the reason Kubernetes gave for it
    /// being stuck. Shorter than the generic startup timer's ([`crate::timers::TimersConfig`], 300 s),
    /// which only knows "no sandbox" or "no hello", so the specific reason is recorded first.
    pub startup_timeout: Duration,
    /// How long after its pod's container ended the watcher waits for the agent's own result before it
    /// records the exit code instead (the result travels through the command stream, maybe later).
    pub exit_grace: Duration,
    /// How long `stop` waits for the task's pods to be gone; after it, pods that ended are enough, and
    /// one still running is a (retried) failure.
    pub stop_timeout: Duration,
    /// How often the reconciler compares the Jobs with the live tasks.
    pub reconcile_interval: Duration,
    /// How long the reconciler's lease lasts without renewal (another replica takes over after it);
    /// longer than `reconcile_interval`, so the holder keeps it between passes.
    pub lease_ttl: Duration,
    /// How long after a task ended the reconciler leaves its Job to the executor's reaper.
    pub orphan_grace: Duration,
    /// Requests per second the executor sends the API server at most, on average (creates, deletes,
    /// pod lists; about four per task); 0: no limit (the `kube` client has none of its own).
    pub api_qps: f64,
    /// Requests the executor may send at once above the average rate, when `api_qps` is set.
    pub api_burst: u32,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            job: JobConfig::default(),
            client: None,
            startup_timeout: Duration::from_secs(240),
            exit_grace: Duration::from_secs(5),
            stop_timeout: Duration::from_secs(60),
            reconcile_interval: Duration::from_secs(60),
            lease_ttl: Duration::from_secs(150),
            orphan_grace: Duration::from_secs(120),
            api_qps: 0.0,
            api_burst: 100,
        }
    }
}

impl KubernetesConfig {
    /// The configured client, or the default one (in-cluster, else kubeconfig).
    pub async fn client(&self) -> Result<Client, kube::Error> {
        match &self.client {
            Some(client) => Ok(client.0.clone()),
            None => Client::try_default().await,
        }
    }
}

/// Runs tasks as Kubernetes Jobs.
#[derive(Clone)]
pub struct KubernetesBackend {
    config: JobConfig,
    stop_timeout: Duration,
    jobs: Api<Job>,
    pods: Api<Pod>,
    secrets: Api<Secret>,
    credentials: Option<TaskCredentials>,
    throttle: Throttle,
}

impl fmt::Debug for KubernetesBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesBackend")
            .field("namespace", &self.config.namespace)
            .finish_non_exhaustive()
    }
}

/// How a Kubernetes API failure affects the task.
pub fn classify(what: &str, error: kube::Error) -> BackendError {
    match error {
        kube::Error::Api(status) => {
            let message = format!("{what}: {} ({})", status.message, status.code);
            if status.code == 403 && status.message.contains("exceeded quota") {
                BackendError::fatal(FailureReason::QuotaExceeded, message)
            } else if (400..500).contains(&status.code) && !matches!(status.code, 409 | 429) {
                // Refused for good (invalid, forbidden): retrying changes nothing, the task fails.
                BackendError::fatal(FailureReason::BackendError, message)
            } else {
                BackendError::transient(message)
            }
        }
        other => BackendError::transient_from(what, other),
    }
}

fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(s) if s.code == code)
}

impl KubernetesBackend {
    /// A backend creating Jobs in `config.namespace` through `client`.
    pub fn new(client: Client, config: JobConfig, stop_timeout: Duration) -> Self {
        Self {
            jobs: Api::namespaced(client.clone(), &config.namespace),
            pods: Api::namespaced(client.clone(), &config.namespace),
            secrets: Api::namespaced(client, &config.namespace),
            config,
            stop_timeout,
            credentials: None,
            throttle: Throttle::unlimited(),
        }
    }

    /// The same backend with its API requests limited by `throttle`.
    pub fn with_throttle(mut self, throttle: Throttle) -> Self {
        self.throttle = throttle;
        self
    }

    /// Gives each task pod its own NATS identity, minted by `credentials` into a per-task Secret (a
    /// server with authorization); `None`: pods mount no credentials.
    pub fn with_task_credentials(mut self, credentials: Option<TaskCredentials>) -> Self {
        self.config.task_credentials = credentials.is_some();
        self.credentials = credentials;
        self
    }

    /// The task credentials Secrets in the task namespace (the reconciler removes strays).
    pub fn secrets(&self) -> &Api<Secret> {
        &self.secrets
    }

    /// Whether task pods get per-task credentials Secrets (the engine has a task signer).
    pub fn makes_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// Makes `task`'s credentials Secret, owned by its Job `job_uid`; one made by an earlier try is kept
    /// (its name is the task's, and it goes with that task's Job).
    async fn create_credentials(
        &self,
        task: TaskId,
        job_uid: &str,
        deadline: DateTime<Utc>,
    ) -> Result<(), BackendError> {
        let Some(minter) = &self.credentials else {
            return Ok(());
        };
        let creds = minter.mint(task, deadline).map_err(|e| {
            let mut error = BackendError::fatal(
                FailureReason::BackendError,
                format!("cannot mint the task's NATS credentials: {e}"),
            );
            error.source = Some(std::sync::Arc::new(e));
            error
        })?;
        let secret = job::credentials_secret(task, job_uid, &creds.to_file(), &self.config);
        let name = job::credentials_secret_name(task);
        self.throttle.acquire().await;
        match self.secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                info!(%task, secret = name, "credentials Secret created");
                Ok(())
            }
            Err(e) if is_status(&e, 409) => Ok(()),
            Err(e) => Err(classify(&format!("create Secret {name}"), e)),
        }
    }

    /// The Jobs in the task namespace.
    pub fn jobs(&self) -> &Api<Job> {
        &self.jobs
    }

    /// The pods of `task`, whatever their state.
    pub(super) async fn pods_of(&self, task: TaskId) -> Result<Vec<Pod>, BackendError> {
        self.throttle.acquire().await;
        self.pods
            .list(&ListParams::default().labels(&format!("{TASK_LABEL}={task}")))
            .await
            .map(|list| list.items)
            .map_err(|e| BackendError::transient_from(format_args!("list pods of {task}"), e))
    }

    /// Waits until no pod of `task` passes `keep`, for at most `within`; whether that happened.
    async fn wait_pods(
        &self,
        task: TaskId,
        within: Duration,
        keep: impl Fn(&Pod) -> bool,
    ) -> Result<bool, BackendError> {
        let until = tokio::time::Instant::now() + within;
        loop {
            if !self.pods_of(task).await?.iter().any(&keep) {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= until {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Adopts the existing Job `name` if it carries `task`'s label; its UID.
    async fn adopt(&self, task: TaskId, name: &str) -> Result<String, BackendError> {
        self.throttle.acquire().await;
        let existing = self
            .jobs
            .get_opt(name)
            .await
            .map_err(|e| classify(&format!("read Job {name}"), e))?;
        let Some(existing) = existing else {
            // Deleted between our create and our read: the next try creates it.
            return Err(BackendError::transient(format!(
                "Job {name} vanished while being adopted"
            )));
        };
        let owner = existing
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(TASK_LABEL));
        if owner.map(String::as_str) == Some(task.to_string().as_str()) {
            info!(%task, job = name, "adopting the existing Job");
            Ok(existing.metadata.uid.unwrap_or_default())
        } else {
            Err(BackendError::fatal(
                FailureReason::BackendError,
                format!(
                    "a Job named {name} exists in {} but its {TASK_LABEL} label is {owner:?}, not {task}: \
                     refusing to adopt or replace it",
                    self.config.namespace
                ),
            ))
        }
    }
}

fn pod_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

impl Backend for KubernetesBackend {
    async fn create(
        &self,
        task: TaskId,
        spec: &TaskSpec,
        deadline: DateTime<Utc>,
    ) -> Result<String, BackendError> {
        // Task pods get no DNS (a resolver answers for any name, which is a channel out): the engine
        // resolves the NATS address and hands the pod IP addresses.
        let nats_url = resolve_nats_urls(&self.config.nats_url)
            .await
            .map_err(|e| {
                BackendError::transient(format!(
                    "resolve the NATS address {:?} for the task pod: {e}",
                    self.config.nats_url
                ))
            })?;
        let config = JobConfig {
            nats_url,
            ..self.config.clone()
        };
        let job = job::build(task, spec, deadline, &config);
        let name = task.job_name();
        self.throttle.acquire().await;
        let started = std::time::Instant::now();
        let created = self.jobs.create(&PostParams::default(), &job).await;
        crate::metrics::METRICS.kube_call(
            "create",
            started.elapsed(),
            created.is_ok() || created.as_ref().is_err_and(|e| is_status(e, 409)),
        );
        let uid = match created {
            Ok(job) => {
                info!(%task, job = name, namespace = %self.config.namespace, "Job created");
                job.metadata.uid.unwrap_or_default()
            }
            Err(e) if is_status(&e, 409) => self.adopt(task, &name).await?,
            Err(e) => return Err(classify(&format!("create Job {name}"), e)),
        };
        self.create_credentials(task, &uid, deadline).await?;
        Ok(name)
    }

    async fn stop(&self, task: TaskId, job: &str) -> Result<(), BackendError> {
        self.throttle.acquire().await;
        let started = std::time::Instant::now();
        let deleted = self.jobs.delete(job, &DeleteParams::background()).await;
        crate::metrics::METRICS.kube_call(
            "delete",
            started.elapsed(),
            deleted.is_ok() || deleted.as_ref().is_err_and(|e| is_status(e, 404)),
        );
        match deleted {
            Ok(_) => info!(%task, job, "Job deleted"),
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(classify(&format!("delete Job {job}"), e)),
        }
        // Background propagation returns at once; the garbage collector removes the pods after. We
        // report stopped only when they are gone, so "Cancelled" means nothing runs any more.
        if self.wait_pods(task, self.stop_timeout, |_| true).await? {
            return Ok(());
        }
        // Past the stop timeout, pods that ended are enough: a pod's phase is `Succeeded` or `Failed`
        // only once every container of it stopped, so it runs nothing. Its removal is its node's
        // kubelet's to do, and a node that no longer acts (lost, partitioned) would otherwise hold the
        // task unreaped for ever. A pod still running keeps the stop failing, retried: nothing says
        // it stopped.
        let left = self.pods_of(task).await?;
        let running = left.iter().filter(|p| !pod_finished(p)).count();
        if running == 0 {
            warn!(%task, job, pods = left.len(), timeout = ?self.stop_timeout,
                "pods of the deleted Job ended but are still not removed; stopped (their node removes them)");
            return Ok(());
        }
        warn!(%task, job, running, "pods still running after the Job was deleted");
        Err(BackendError::transient(format!(
            "{running} pod(s) of {job} still running {:?} after its deletion",
            self.stop_timeout
        )))
    }

    async fn reap(&self, task: TaskId, job: &str, grace: Duration) -> Result<(), BackendError> {
        if !grace.is_zero() {
            self.wait_pods(task, grace, |p| !pod_finished(p)).await?;
        }
        self.stop(task, job).await
    }
}

/// `urls` (comma-separated NATS URLs) with every host name replaced by the addresses it resolves to, one
/// URL per address, scheme, credentials and port kept (4222 when none is given); IP addresses stay.
pub async fn resolve_nats_urls(urls: &str) -> std::io::Result<String> {
    let mut resolved = Vec::new();
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let (scheme, rest) = url.split_once("://").unwrap_or(("nats", url));
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((user, hostport)) => (format!("{user}@"), hostport),
            None => (String::new(), rest),
        };
        let hostport = hostport.trim_end_matches('/');
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => (host, port),
            _ => (hostport, "4222"),
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if bare.parse::<std::net::IpAddr>().is_ok() {
            resolved.push(format!("{scheme}://{userinfo}{host}:{port}"));
            continue;
        }
        let port_number: u16 = port.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{url}: port {port:?} is not a number"),
            )
        })?;
        let mut addresses: Vec<std::net::IpAddr> = tokio::net::lookup_host((bare, port_number))
            .await?
            .map(|a| a.ip())
            .collect();
        addresses.sort();
        addresses.dedup();
        for ip in addresses {
            let host = match ip {
                std::net::IpAddr::V4(ip) => ip.to_string(),
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            };
            resolved.push(format!("{scheme}://{userinfo}{host}:{port}"));
        }
    }
    if resolved.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no address",
        ));
    }
    Ok(resolved.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_become_addresses_and_addresses_stay() {
        assert_eq!(
            resolve_nats_urls("nats://10.0.0.7:4222, tls://u:p@[fd00::1]:7422")
                .await
                .expect("addresses"),
            "nats://10.0.0.7:4222,tls://u:p@[fd00::1]:7422"
        );
        let resolved = resolve_nats_urls("nats://localhost:4223")
            .await
            .expect("localhost resolves");
        assert!(
            resolved
                .split(',')
                .all(|u| u == "nats://127.0.0.1:4223" || u == "nats://[::1]:4223"),
            "{resolved}"
        );
        assert!(resolved.contains("nats://127.0.0.1:4223"), "{resolved}");
        assert!(
            resolve_nats_urls("nats://no-such-host.invalid:4222")
                .await
                .is_err()
        );
        assert!(resolve_nats_urls("nats://localhost:port").await.is_err());
    }
}
