//! The Kubernetes watcher: Job, pod and Job-event changes in the task namespace (only what carries our
//! labels) turned into observations, and observations into [`Input`]s executed through the store.
//!
//! | Kubernetes says | observation | input |
//! |---|---|---|
//! | pod has a `nodeName` | now | `PodBound` |
//! | container terminated `OOMKilled` | now | `BackendFailed{OomKilled}` |
//! | container terminated otherwise | after [`KubernetesConfig::exit_grace`] | `PodExited{exit_code}` (the agent's own result wins if it arrives first, or still waits in the command queue) |
//! | container waiting `ImagePullBackOff` / `InvalidImageName` / `ErrImageNeverPull` | now | `BackendFailed{ImagePull}` (Kubernetes already retried) |
//! | pod `Failed` with reason `Evicted`, or condition `DisruptionTarget` (set before the kill) | now | `BackendFailed{Evicted}` |
//! | Job condition `FailureTarget` or `Failed` with reason `DeadlineExceeded` | now | `BackendFailed{DeadlineExceeded}` → `TimedOut` |
//! | Job deleted (task not cancelling: a cancel records `JobGone` itself once the pods are gone) | now | `JobGone` → `Failed{JobLost}` |
//! | `PodScheduled=False` `Unschedulable`; `ErrImagePull`; `CreateContainerConfigError` | stuck | |
//! | Job event `FailedCreate` "exceeded quota" | stuck | |
//!
//! A task that is stuck (Kubernetes said why it cannot start) and is still not running
//! [`KubernetesConfig::startup_timeout`] after it was accepted fails with `StartupTimedOut` and that
//! reason (`Unschedulable`, `QuotaExceeded`, ...), instead of waiting: quota or capacity may free up
//! within the timeout, so these are not failed at once. Without a diagnosis the generic startup timer
//! ([`crate::timers`]) decides. Refused inputs (late observations) are normal. What the watcher misses
//! while disconnected (a Job deleted then) is healed by [`super::reconciler`].

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;
use futures::{Stream, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event as KubeEvent, Pod};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use taskpods_events::{FailureReason, Input, TaskId, TaskState};
use tracing::{debug, info, warn};

use super::KubernetesConfig;
use super::job::{MANAGED_SELECTOR, TASK_LABEL};
use crate::context::EngineCtx;
use crate::store::ExecuteError;

/// How often, after a pod exited, the watcher looks again for its agent's result still waiting in the
/// command queue before recording the exit: with [`RESULT_QUEUED_PAUSE`], an hour at most.
const RESULT_QUEUED_CHECKS: u32 = 360;
/// The pause between those looks (or the exit grace, if longer).
const RESULT_QUEUED_PAUSE: Duration = Duration::from_secs(10);

/// Errors that stop the watcher.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// A watch stream ended, which kube-runtime's watcher never does unless dropped.
    #[error("the {0} watch ended")]
    Ended(&'static str),
}

/// What one change of a Job, pod or event means for its task.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// Execute this input now (boxed: a launch spec makes inputs large).
    Now(Box<Input>),
    /// The container ended with this code: recorded unless the agent's result arrives within the grace.
    Exited(i32),
    /// Why the task cannot start (kept until it starts or its startup timeout).
    Stuck(FailureReason, String),
    /// The pod looks healthy: any earlier pod diagnosis is stale.
    Fine,
}

impl Observation {
    /// Execute `input` now.
    pub fn now(input: Input) -> Self {
        Self::Now(Box::new(input))
    }
}

fn task_label(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<TaskId> {
    meta.labels.as_ref()?.get(TASK_LABEL)?.parse().ok()
}

/// What a pod's state says about its task.
pub fn observe_pod(pod: &Pod) -> Option<(TaskId, Vec<Observation>)> {
    let task = task_label(&pod.metadata)?;
    let name = pod.metadata.name.clone()?;
    let mut out = Vec::new();
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let status = pod.status.as_ref();
    if node.is_some() {
        out.push(Observation::now(Input::PodBound {
            job: task.job_name(),
            pod: name,
            node: node.clone(),
        }));
    }
    let phase = status.and_then(|s| s.phase.as_deref());
    if phase == Some("Failed") && status.and_then(|s| s.reason.as_deref()) == Some("Evicted") {
        let message = status
            .and_then(|s| s.message.clone())
            .unwrap_or_else(|| "the node evicted the pod".into());
        out.push(Observation::now(Input::BackendFailed {
            reason: FailureReason::Evicted,
            message: Some(message),
        }));
        return Some((task, out));
    }
    // The kubelet, the eviction API, preemption and the taint manager mark a pod `DisruptionTarget`
    // *before* killing it: recording the eviction then beats the agent's report of the SIGTERM's exit 143.
    if let Some(c) = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "DisruptionTarget"))
        && c.status == "True"
    {
        out.push(Observation::now(Input::BackendFailed {
            reason: FailureReason::Evicted,
            message: Some(format!(
                "{}: {}",
                c.reason.as_deref().unwrap_or("DisruptionTarget"),
                c.message.as_deref().unwrap_or("the pod is being evicted")
            )),
        }));
        return Some((task, out));
    }
    let mut stuck = None;
    if let Some(c) = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled"))
        && c.status == "False"
        && c.reason.as_deref() == Some("Unschedulable")
    {
        stuck = Some(Observation::Stuck(
            FailureReason::Unschedulable,
            c.message.clone().unwrap_or_else(|| "no node fits".into()),
        ));
    }
    for container in status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
    {
        let Some(state) = &container.state else {
            continue;
        };
        if let Some(t) = &state.terminated {
            if t.reason.as_deref() == Some("OOMKilled") {
                out.push(Observation::now(Input::BackendFailed {
                    reason: FailureReason::OomKilled,
                    message: Some(format!(
                        "container {} went over its memory limit (exit code {})",
                        container.name, t.exit_code
                    )),
                }));
            } else {
                out.push(Observation::Exited(t.exit_code));
            }
        } else if let Some(w) = &state.waiting {
            let reason = w.reason.as_deref().unwrap_or_default();
            let message = format!("{reason}: {}", w.message.as_deref().unwrap_or("no message"));
            match reason {
                "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull" => {
                    out.push(Observation::now(Input::BackendFailed {
                        reason: FailureReason::ImagePull,
                        message: Some(message),
                    }));
                }
                "ErrImagePull" => {
                    stuck = Some(Observation::Stuck(FailureReason::ImagePull, message))
                }
                "CreateContainerConfigError" | "CreateContainerError" => {
                    stuck = Some(Observation::Stuck(FailureReason::BackendError, message));
                }
                _ => {}
            }
        }
    }
    out.push(stuck.unwrap_or(Observation::Fine));
    Some((task, out))
}

/// What a Job's state says about its task.
pub fn observe_job(job: &Job) -> Option<(TaskId, Vec<Observation>)> {
    let task = task_label(&job.metadata)?;
    let mut out = Vec::new();
    // `FailureTarget` is set in the same sync that deletes the pods, before `Failed` (which waits for
    // them to be gone): reacting to it records the timeout before the killed agent reports exit 143.
    let failed = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| {
            cs.iter().find(|c| {
                matches!(c.type_.as_str(), "FailureTarget" | "Failed") && c.status == "True"
            })
        });
    if let Some(c) = failed
        && c.reason.as_deref() == Some("DeadlineExceeded")
    {
        out.push(Observation::now(Input::BackendFailed {
            reason: FailureReason::DeadlineExceeded,
            message: c.message.clone(),
        }));
    }
    Some((task, out))
}

/// What a Job's event says: the Job controller could not create the pod.
pub fn observe_event(event: &KubeEvent) -> Option<(TaskId, Observation)> {
    if event.involved_object.kind.as_deref() != Some("Job")
        || event.reason.as_deref() != Some("FailedCreate")
    {
        return None;
    }
    let task = TaskId::from_job_name(event.involved_object.name.as_deref()?)?;
    let message = event.message.clone().unwrap_or_default();
    let reason = if message.contains("exceeded quota") {
        FailureReason::QuotaExceeded
    } else {
        FailureReason::BackendError
    };
    Some((task, Observation::Stuck(reason, message)))
}

/// One change from any of the three watches.
enum Change {
    Job(Box<watcher::Event<Job>>),
    Pod(Box<watcher::Event<Pod>>),
    Event(Box<watcher::Event<KubeEvent>>),
}

type Changes = Pin<Box<dyn Stream<Item = Result<Change, watcher::Error>> + Send>>;

/// What the watcher knows about a task that has not started yet.
#[derive(Debug, Default)]
struct Tracked {
    /// Diagnosis from the pod (unschedulable, image, config).
    pod_stuck: Option<(FailureReason, String)>,
    /// Diagnosis from the Job's events (quota); cleared once a pod exists.
    job_stuck: Option<(FailureReason, String)>,
}

struct Watcher {
    ctx: Arc<EngineCtx>,
    config: KubernetesConfig,
    /// Inputs already executed (or scheduled), so a re-listed object is not judged again.
    applied: HashSet<(TaskId, String)>,
    tracked: HashMap<TaskId, Tracked>,
}

impl Watcher {
    async fn execute(&self, task: TaskId, input: &Input) -> bool {
        execute(&self.ctx, task, input).await
    }

    async fn handle(&mut self, task: TaskId, observations: Vec<Observation>, from_pod: bool) {
        let tracked = self.tracked.entry(task).or_default();
        if from_pod {
            // A pod exists, so its creation is no longer blocked.
            tracked.job_stuck = None;
        }
        for observation in observations {
            match observation {
                Observation::Fine => {
                    if let Some(t) = self.tracked.get_mut(&task) {
                        t.pod_stuck = None;
                    }
                }
                Observation::Stuck(reason, message) => {
                    debug!(%task, %reason, message, "task stuck");
                    let t = self.tracked.entry(task).or_default();
                    if from_pod {
                        t.pod_stuck = Some((reason, message));
                    } else {
                        t.job_stuck = Some((reason, message));
                    }
                }
                Observation::Now(input) => {
                    let key = (task, format!("{input:?}"));
                    if self.applied.contains(&key) {
                        continue;
                    }
                    if self.execute(task, &input).await {
                        self.applied.insert(key);
                    }
                }
                Observation::Exited(code) => {
                    let key = (task, format!("exited {code}"));
                    if !self.applied.insert(key) {
                        continue;
                    }
                    let (ctx, grace) = (self.ctx.clone(), self.config.exit_grace);
                    tokio::spawn(async move {
                        // The agent reports its result through the command stream before it exits;
                        // give that report the chance to be recorded first, and longer while it still
                        // waits in the queue (a backlog at the intake), up to the task's deadline or
                        // an hour, whichever the timers end first.
                        tokio::time::sleep(grace).await;
                        for _ in 0..RESULT_QUEUED_CHECKS {
                            match ctx.agent_result_queued(task).await {
                                Ok(false) => break,
                                Ok(true) => {
                                    debug!(%task, "pod exited; its result waits in the command queue")
                                }
                                Err(e) => {
                                    warn!(%task, error = %e, "pod exited; the command queue cannot be read")
                                }
                            }
                            tokio::time::sleep(grace.max(RESULT_QUEUED_PAUSE)).await;
                        }
                        execute(&ctx, task, &Input::PodExited { exit_code: code }).await;
                    });
                }
            }
        }
    }

    fn forget(&mut self, task: TaskId) {
        self.tracked.remove(&task);
        self.applied.retain(|(t, _)| *t != task);
    }

    /// Fails tasks that are stuck past their startup timeout; stops tracking started or ended ones.
    async fn check_startups(&mut self) {
        let timeout = TimeDelta::from_std(self.config.startup_timeout).unwrap_or(TimeDelta::MAX);
        let now = self.ctx.clock.now();
        let tasks: Vec<TaskId> = self.tracked.keys().copied().collect();
        for task in tasks {
            let Ok(loaded) = self.ctx.store.load(task).await else {
                continue;
            };
            let t = &loaded.task;
            let starting = matches!(
                t.state,
                TaskState::Accepted | TaskState::Scheduled | TaskState::Starting
            );
            if !starting {
                if t.state.is_terminal() {
                    // Nothing more to judge: drop what we remember (bounded memory).
                    self.forget(task);
                } else if t.state == TaskState::Running {
                    self.tracked.remove(&task);
                }
                continue;
            }
            let Some(accepted) = t.accepted_at else {
                continue;
            };
            if accepted
                .checked_add_signed(timeout)
                .is_none_or(|until| now < until)
            {
                continue;
            }
            let Some(tracked) = self.tracked.get(&task) else {
                continue;
            };
            let Some((reason, message)) = tracked.pod_stuck.clone().or(tracked.job_stuck.clone())
            else {
                // Nothing known: the generic startup timer decides.
                continue;
            };
            info!(%task, %reason, message, "task stuck past its startup timeout");
            let input = Input::StartupTimedOut {
                reason,
                message: Some(format!(
                    "not started within {:?}: {message}",
                    self.config.startup_timeout
                )),
            };
            if execute(&self.ctx, task, &input).await {
                self.tracked.remove(&task);
            }
        }
    }
}

/// Executes `input`; whether it is settled (appended or refused), i.e. need not be tried again.
async fn execute(ctx: &EngineCtx, task: TaskId, input: &Input) -> bool {
    match ctx.store.execute(task, input, ctx.clock.now(), None).await {
        Ok(_) => {
            debug!(%task, ?input, "kubernetes observation recorded");
            true
        }
        Err(ExecuteError::Refused { refusal, .. }) => {
            debug!(%task, %refusal, ?input, "kubernetes observation refused");
            true
        }
        Err(ExecuteError::Store(e)) => {
            warn!(%task, error = %e, ?input, "kubernetes observation not recorded");
            false
        }
    }
}

/// Watches the task namespace until `ctx.shutdown`.
pub async fn run(
    ctx: Arc<EngineCtx>,
    client: Client,
    config: KubernetesConfig,
) -> Result<(), WatchError> {
    let ns = config.job.namespace.clone();
    let managed = watcher::Config::default().labels(MANAGED_SELECTOR);
    let jobs: Changes = Box::pin(
        watcher(Api::<Job>::namespaced(client.clone(), &ns), managed.clone())
            .default_backoff()
            .map(|r| r.map(|e| Change::Job(Box::new(e)))),
    );
    let pods: Changes = Box::pin(
        watcher(Api::<Pod>::namespaced(client.clone(), &ns), managed)
            .default_backoff()
            .map(|r| r.map(|e| Change::Pod(Box::new(e)))),
    );
    let events: Changes = Box::pin(
        watcher(
            Api::<KubeEvent>::namespaced(client, &ns),
            watcher::Config::default().fields("involvedObject.kind=Job,reason=FailedCreate"),
        )
        .default_backoff()
        .map(|r| r.map(|e| Change::Event(Box::new(e)))),
    );
    let mut changes = futures::stream::select_all([jobs, pods, events]);
    let tick =
        (config.startup_timeout / 4).clamp(Duration::from_millis(200), Duration::from_secs(5));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut w = Watcher {
        ctx: ctx.clone(),
        config,
        applied: HashSet::new(),
        tracked: HashMap::new(),
    };
    info!(namespace = %ns, "kubernetes watcher running");
    loop {
        let change = tokio::select! {
            () = ctx.shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {
                w.check_startups().await;
                continue;
            }
            change = changes.next() => change,
        };
        let change = match change {
            Some(Ok(change)) => change,
            Some(Err(e)) => {
                // The backoff wrapper retries; this is only worth a line in the log.
                warn!(error = %e, "kubernetes watch error");
                continue;
            }
            None => return Err(WatchError::Ended("kubernetes")),
        };
        use watcher::Event as E;
        match change {
            Change::Job(event) => match *event {
                E::Apply(job) | E::InitApply(job) => {
                    if let Some((task, observations)) = observe_job(&job) {
                        w.handle(task, observations, false).await;
                    }
                }
                E::Delete(job) => {
                    if let Some(task) = task_label(&job.metadata) {
                        // A cancel deletes the Job itself and records `JobGone` once the pods are gone
                        // too ("Cancelled" means nothing runs); with background propagation the Job
                        // vanishes first, so the watcher leaves cancelling tasks to the executor.
                        let cancelling = matches!(
                            w.ctx.store.load(task).await.map(|l| l.task.state),
                            Ok(TaskState::Cancelling)
                        );
                        if !cancelling {
                            info!(%task, "Job deleted");
                            execute(&w.ctx, task, &Input::JobGone).await;
                        }
                        w.forget(task);
                    }
                }
                E::Init | E::InitDone => {}
            },
            Change::Pod(event) => {
                if let E::Apply(pod) | E::InitApply(pod) = *event
                    && let Some((task, observations)) = observe_pod(&pod)
                {
                    w.handle(task, observations, true).await;
                }
            }
            Change::Event(event) => {
                if let E::Apply(event) | E::InitApply(event) = *event
                    && let Some((task, observation)) = observe_event(&event)
                {
                    w.handle(task, vec![observation], false).await;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task() -> TaskId {
        TaskId::from_idempotency_key("watcher")
    }

    fn pod(spec: serde_json::Value, status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p1", "labels": {TASK_LABEL: task().to_string()}},
            "spec": spec, "status": status
        }))
        .unwrap()
    }

    fn unbound() -> serde_json::Value {
        json!({"containers": [{"name": "agent"}]})
    }

    fn bound() -> serde_json::Value {
        json!({"containers": [{"name": "agent"}], "nodeName": "n1"})
    }

    #[test]
    fn pods_map_to_observations() {
        let (t, obs) = observe_pod(&pod(bound(), json!({"phase": "Running"}))).unwrap();
        assert_eq!(t, task());
        assert_eq!(
            obs,
            [
                Observation::now(Input::PodBound {
                    job: task().job_name(),
                    pod: "p1".into(),
                    node: Some("n1".into())
                }),
                Observation::Fine
            ]
        );

        let terminated = |reason: &str, code: i32| {
            pod(
                bound(),
                json!({"phase": "Failed", "containerStatuses": [{"name": "agent", "image": "i", "imageID": "",
                    "ready": false, "restartCount": 0,
                    "state": {"terminated": {"exitCode": code, "reason": reason}}}]}),
            )
        };
        let (_, obs) = observe_pod(&terminated("Error", 3)).unwrap();
        assert_eq!(obs[1], Observation::Exited(3));
        let (_, obs) = observe_pod(&terminated("OOMKilled", 137)).unwrap();
        assert!(matches!(
            &obs[1],
            Observation::Now(input) if matches!(**input, Input::BackendFailed { reason: FailureReason::OomKilled, .. })
        ));

        let waiting = |reason: &str| {
            pod(
                bound(),
                json!({"phase": "Pending", "containerStatuses": [{"name": "agent", "image": "i", "imageID": "",
                    "ready": false, "restartCount": 0,
                    "state": {"waiting": {"reason": reason, "message": "pull failed"}}}]}),
            )
        };
        let (_, obs) = observe_pod(&waiting("ImagePullBackOff")).unwrap();
        assert!(matches!(
            &obs[1],
            Observation::Now(input) if matches!(**input, Input::BackendFailed { reason: FailureReason::ImagePull, .. })
        ));
        let (_, obs) = observe_pod(&waiting("ErrImagePull")).unwrap();
        assert!(matches!(
            &obs[1],
            Observation::Stuck(FailureReason::ImagePull, _)
        ));

        let (_, obs) = observe_pod(&pod(
            unbound(),
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable", "message": "0/1 nodes: Insufficient cpu"}]}),
        ))
        .unwrap();
        assert_eq!(
            obs,
            [Observation::Stuck(
                FailureReason::Unschedulable,
                "0/1 nodes: Insufficient cpu".into()
            )]
        );

        let (_, obs) = observe_pod(&pod(
            bound(),
            json!({"phase": "Failed", "reason": "Evicted", "message": "low on memory"}),
        ))
        .unwrap();
        assert_eq!(
            obs[1],
            Observation::now(Input::BackendFailed {
                reason: FailureReason::Evicted,
                message: Some("low on memory".into())
            })
        );
        let (_, obs) = observe_pod(&pod(
            bound(),
            json!({"phase": "Running", "conditions": [{"type": "DisruptionTarget", "status": "True",
                "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting"}]}),
        ))
        .unwrap();
        assert_eq!(
            obs[1],
            Observation::now(Input::BackendFailed {
                reason: FailureReason::Evicted,
                message: Some("EvictionByEvictionAPI: Eviction API: evicting".into())
            })
        );
        // Not ours: no task label.
        let foreign: Pod = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
        assert!(observe_pod(&foreign).is_none());
    }

    #[test]
    fn job_deadline_and_quota_events_map_to_reasons() {
        let job: Job = serde_json::from_value(json!({
            "metadata": {"name": task().job_name(), "labels": {TASK_LABEL: task().to_string()}},
            "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                "message": "Job was active longer than specified deadline"}]}
        }))
        .unwrap();
        let (_, obs) = observe_job(&job).unwrap();
        assert!(matches!(
            &obs[0],
            Observation::Now(input) if matches!(**input, Input::BackendFailed { reason: FailureReason::DeadlineExceeded, .. })
        ));

        let event: KubeEvent = serde_json::from_value(json!({
            "metadata": {"name": "e"},
            "involvedObject": {"kind": "Job", "name": task().job_name()},
            "reason": "FailedCreate",
            "message": "Error creating: pods \"x\" is forbidden: exceeded quota: pods, requested: pods=1"
        }))
        .unwrap();
        let (t, obs) = observe_event(&event).unwrap();
        assert_eq!(t, task());
        assert!(matches!(
            obs,
            Observation::Stuck(FailureReason::QuotaExceeded, _)
        ));
    }
}
