//! The no-op backend (`--backend noop`): a benchmark and testing backend that runs no code. It plays each
//! task's sandbox in-process, so the engine's own cost per lifecycle can be measured without spawning a
//! process or creating a Job, and tests can drive thousands of lifecycles in seconds.
//!
//! Its "sandbox" is a tokio task, the simulated agent, started once the executor has recorded the sandbox
//! (`Scheduled`, see [`Backend::recorded`]). It goes through the lifecycle the way a Kubernetes pod does:
//!
//! 1. **pod bound**: it executes `Input::PodBound` through the event store, the way the Kubernetes watcher
//!    records a pod bound to a node (there is no agent message for this: it is an observation of the
//!    backend, and this is the same path the watcher's observation takes) → `Started`;
//! 2. **hello**: it asks `<prefix>.agent.<task>.hello` over NATS, exactly as `taskpods-agent` does, and is
//!    answered by the real gateway (which executes `AgentHello` → `Running`); `Wait` is obeyed, `Stop` ends
//!    it;
//! 3. **work**: it waits [`NoopConfig::work`] (zero by default), sending heartbeats on the task's
//!    heartbeat subject at the interval its instructions give, so a long simulated task is watched like a
//!    real one;
//! 4. **result**: it publishes `AgentReport::Result` (exit code 0) to `<prefix>.cmd.agent.<task>.result`
//!    in JetStream with the agent's message id, so the intake turns it into `Succeeded`; the executor
//!    then reaps it (`Reaped`) as it reaps any sandbox, and timers and projector see every event as usual.
//!
//! **Why over NATS rather than by calling the gateway's and intake's functions**: the point of the
//! backend is to measure the engine, and most of an agent's cost to the engine is on those paths (the
//! gateway's queue subscription and hello slots, the command stream, the intake consumer's sharding and
//! dedup). Calling their handlers directly would skip them and flatter the figures. So the simulated agent
//! publishes what an agent publishes, where it publishes it, and with the identity an agent has: on a
//! server with authorization (the engine has a task signer), each simulated agent connects with its own
//! minted per-task identity and inbox prefix, as `taskpods-agent` does (one connection per task, which
//! costs what a real agent's connection costs); without authorization all simulated agents share one
//! connection of their own (not the engine's), with the callers' inbox prefix the gateway accepts.
//! Only the agent's process (bubblewrap, the user's code, output streaming) is left out.
//!
//! The simulated agents live in the engine's process: an engine that stops takes them with it, and a
//! restarted engine finds its `Running` tasks silent (the heartbeat timeout fails them), as a host that
//! lost its processes would. With several engines, a sandbox lives in the engine that created it: a stop
//! or reap handled by another engine finds nothing there to stop (the agent ends with its work or its
//! engine). Never use it for real work: the task's code is not run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use chrono::{DateTime, Utc};
use taskpods_events::codec::{self, HEADER_CONTENT_TYPE, HEADER_KIND, HEADER_MSG_ID, MSGPACK};
use taskpods_events::{
    AgentReport, Encoding, HelloReply, Input, TaskId, TaskOutcome, TaskSpec, subject,
};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::backend::{Backend, BackendError};
use crate::context::EngineCtx;
use crate::credentials::TaskCredentials;

/// No-op backend settings.
#[derive(Debug, Clone, Default)]
pub struct NoopConfig {
    /// How long each simulated task "runs" between its hello and its result (zero: at once).
    pub work: Duration,
}

/// How the simulated agents reach NATS.
#[derive(Debug, Clone)]
pub enum AgentLink {
    /// One connection shared by every simulated agent (a server without authorization).
    Shared(async_nats::Client),
    /// A connection per task, with the task's own minted identity (a server with authorization).
    PerTask {
        /// The NATS URLs the agents connect to.
        urls: Vec<String>,
        /// Mints each task's identity.
        credentials: TaskCredentials,
    },
}

impl AgentLink {
    /// The link for an engine at `urls`: per-task identities when `credentials` can mint them, else one
    /// shared connection of the agents' own (made here).
    pub async fn connect(
        urls: &[String],
        credentials: Option<TaskCredentials>,
    ) -> Result<Self, async_nats::ConnectError> {
        if let Some(credentials) = credentials {
            return Ok(Self::PerTask {
                urls: urls.to_vec(),
                credentials,
            });
        }
        let client = async_nats::ConnectOptions::new()
            .name("taskpods noop agents")
            .connect(
                urls.iter()
                    .filter_map(|u| u.parse::<async_nats::ServerAddr>().ok())
                    .collect::<Vec<_>>(),
            )
            .await?;
        Ok(Self::Shared(client))
    }

    /// The connection `task`'s simulated agent speaks over.
    async fn client_for(
        &self,
        task: TaskId,
        deadline: DateTime<Utc>,
    ) -> Result<async_nats::Client, String> {
        match self {
            Self::Shared(client) => Ok(client.clone()),
            Self::PerTask { urls, credentials } => {
                let creds = credentials
                    .mint(task, deadline)
                    .map_err(|e| format!("mint the task's identity: {e}"))?;
                let addrs: Vec<async_nats::ServerAddr> =
                    urls.iter().filter_map(|u| u.parse().ok()).collect();
                async_nats::ConnectOptions::new()
                    .name(format!("taskpods noop agent {task}"))
                    .custom_inbox_prefix(subject::task_inbox_prefix(task))
                    .credentials(&creds.to_file())
                    .map_err(|e| format!("the task's identity: {e}"))?
                    .connect(addrs)
                    .await
                    .map_err(|e| format!("connect: {e}"))
            }
        }
    }
}

/// A simulated sandbox.
#[derive(Debug)]
enum Sandbox {
    /// Created; its agent starts once the executor has recorded it.
    Created { deadline: DateTime<Utc> },
    /// Its agent runs (or has finished).
    Playing(JoinHandle<()>),
}

/// Plays every task's sandbox in-process (see the module doc).
#[derive(Debug)]
pub struct NoopBackend {
    ctx: Arc<EngineCtx>,
    link: AgentLink,
    config: NoopConfig,
    sandboxes: Mutex<HashMap<TaskId, Sandbox>>,
}

impl NoopBackend {
    /// A backend whose agents speak over `link` to the engine of `ctx`.
    pub fn new(ctx: Arc<EngineCtx>, link: AgentLink, config: NoopConfig) -> Self {
        Self {
            ctx,
            link,
            config,
            sandboxes: Mutex::default(),
        }
    }

    /// How many sandboxes exist (created and not yet reaped or stopped): nothing is kept per ended task.
    pub fn sandboxes(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Sandbox>> {
        self.sandboxes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes `task`'s sandbox, returning its agent if one was started.
    fn take_agent(&self, task: TaskId) -> Option<JoinHandle<()>> {
        let mut sandboxes = self.lock();
        let taken = sandboxes.remove(&task);
        self.ctx.held.noop_sandboxes.set(sandboxes.len());
        match taken {
            Some(Sandbox::Playing(agent)) => Some(agent),
            _ => None,
        }
    }
}

impl Backend for NoopBackend {
    async fn create(
        &self,
        task: TaskId,
        _spec: &TaskSpec,
        deadline: DateTime<Utc>,
    ) -> Result<String, BackendError> {
        // An existing sandbox is adopted, never a second one started.
        let mut sandboxes = self.lock();
        sandboxes
            .entry(task)
            .or_insert(Sandbox::Created { deadline });
        self.ctx.held.noop_sandboxes.set(sandboxes.len());
        Ok(task.job_name())
    }

    fn recorded(&self, task: TaskId, job: &str) {
        let mut sandboxes = self.lock();
        let Some(Sandbox::Created { deadline }) = sandboxes.get(&task) else {
            return;
        };
        let agent = SimulatedAgent {
            ctx: self.ctx.clone(),
            link: self.link.clone(),
            task,
            job: job.to_owned(),
            deadline: *deadline,
            work: self.config.work,
        };
        sandboxes.insert(task, Sandbox::Playing(tokio::spawn(agent.play())));
    }

    async fn stop(&self, task: TaskId, _job: &str) -> Result<(), BackendError> {
        if let Some(agent) = self.take_agent(task) {
            agent.abort();
            let _ = agent.await;
        }
        Ok(())
    }

    async fn reap(&self, task: TaskId, job: &str, grace: Duration) -> Result<(), BackendError> {
        if let Some(mut agent) = self.take_agent(task)
            && tokio::time::timeout(grace, &mut agent).await.is_err()
        {
            debug!(%task, job, "noop agent still running after the grace period; stopping it");
            agent.abort();
            let _ = agent.await;
        }
        Ok(())
    }
}

/// One task's simulated agent.
struct SimulatedAgent {
    ctx: Arc<EngineCtx>,
    link: AgentLink,
    task: TaskId,
    job: String,
    deadline: DateTime<Utc>,
    work: Duration,
}

/// The message id of an agent's result, as `taskpods-agent` sets it (one per task, ever).
fn result_msg_id(task: TaskId) -> String {
    format!("{task}:result")
}

impl SimulatedAgent {
    /// Pod bound, hello, work, result (see the module doc). Ends early when the task has moved on.
    async fn play(self) {
        let task = self.task;
        let bound = Input::PodBound {
            job: self.job.clone(),
            pod: format!("{}-noop", self.job),
            node: Some("noop".to_owned()),
        };
        if let Err(crate::store::ExecuteError::Store(e)) = self
            .ctx
            .store
            .execute(task, &bound, self.ctx.clock.now(), None)
            .await
        {
            // The hello does not need it: `Scheduled` takes a hello as well as `Starting` does.
            warn!(%task, error = %e, "noop agent: pod bound not recorded");
        }
        let client = match self.link.client_for(task, self.deadline).await {
            Ok(client) => client,
            Err(e) => {
                warn!(%task, error = %e, "noop agent: cannot connect; the startup timer will fail the task");
                return;
            }
        };
        let Some(heartbeat_every) = self.hello(&client).await else {
            return;
        };
        if !self.work.is_zero() {
            let subject = self.ctx.names().agent_heartbeat(task);
            let beat: bytes::Bytes = codec::to_msgpack(&AgentReport::Heartbeat)
                .unwrap_or_default()
                .into();
            let mut tick = tokio::time::interval(heartbeat_every);
            let work = tokio::time::sleep(self.work);
            tokio::pin!(work);
            loop {
                tokio::select! {
                    () = &mut work => break,
                    _ = tick.tick() => {
                        let _ = client.publish(subject.clone(), beat.clone()).await;
                    }
                }
            }
        }
        self.report(&client).await;
    }

    /// Asks for the instructions until `Run` (the heartbeat interval they give), `Stop` or the deadline.
    async fn hello(&self, client: &async_nats::Client) -> Option<Duration> {
        let task = self.task;
        let subject = self.ctx.names().agent_hello(task);
        let payload: bytes::Bytes = codec::to_msgpack(&AgentReport::Hello {
            agent_version: Some(concat!("noop-", env!("CARGO_PKG_VERSION")).to_owned()),
        })
        .ok()?
        .into();
        let mut delay = Duration::from_millis(10);
        while Utc::now() < self.deadline {
            let asked = tokio::time::timeout(
                Duration::from_secs(3),
                client.request(subject.clone(), payload.clone()),
            )
            .await;
            let wait = match asked {
                Ok(Ok(reply)) => match codec::decode::<HelloReply>(
                    "hello reply",
                    &reply.payload,
                    Encoding::Msgpack,
                ) {
                    Ok(HelloReply::Run(instructions)) => {
                        return Some(Duration::from_millis(
                            instructions.heartbeat_interval_ms.max(50),
                        ));
                    }
                    Ok(HelloReply::Stop { reason }) => {
                        debug!(%task, reason, "noop agent told to stop");
                        return None;
                    }
                    Ok(HelloReply::Wait { retry_after_ms }) => {
                        Duration::from_millis(retry_after_ms.clamp(10, 5000))
                    }
                    Err(_) => delay,
                },
                Ok(Err(_)) | Err(_) => delay,
            };
            tokio::time::sleep(wait).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        None
    }

    /// Publishes the result to the command stream and waits for its ack, retrying (same message id, so
    /// stored once) for as long as a real agent would.
    async fn report(&self, client: &async_nats::Client) {
        let task = self.task;
        let outcome = TaskOutcome {
            exit_code: 0,
            duration_ms: u64::try_from(self.work.as_millis()).unwrap_or(u64::MAX),
            ..TaskOutcome::default()
        };
        let Ok(payload) = codec::to_msgpack(&AgentReport::Result(outcome)) else {
            return;
        };
        let payload: bytes::Bytes = payload.into();
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_MSG_ID, result_msg_id(task).as_str());
        headers.insert(HEADER_CONTENT_TYPE, MSGPACK);
        headers.insert(HEADER_KIND, "result");
        let js = async_nats::jetstream::new(client.clone());
        let subject = self.ctx.names().agent_report(task, "result");
        let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
        let mut delay = Duration::from_millis(50);
        loop {
            let attempt = async {
                js.publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                    .await?
                    .await
            };
            match attempt.await {
                Ok(_) => return,
                Err(e) if tokio::time::Instant::now() + delay > give_up => {
                    warn!(%task, error = %e, "noop agent: result not stored");
                    return;
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
