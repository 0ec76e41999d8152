//! The agent gateway: answers agents' hellos and watches their heartbeats.
//!
//! - Hello (`<p>.agent.<task>.hello`, request/reply, queue group `taskpods-gateway` so replicas share the
//!   work): executes `Input::AgentHello` through the store and answers a msgpack [`HelloReply`]: `Run`
//!   with the instructions when the task is (now) `Running` (a repeated hello is refused as a duplicate
//!   and answered again), `Wait` while the task is still `Accepted` (the Job is not recorded yet) or the
//!   store is unavailable, `Stop` when the task has ended, is being cancelled, or does not exist.
//! - Heartbeats (`<p>.agent.<task>.heartbeat`, core NATS, every replica listens): a task that is
//!   `Running` and has not been heard from for the heartbeat timeout gets `Input::HeartbeatLost`
//!   (`Failed{AgentLost}`), unless its result waits in the command queue (an agent that reported and
//!   exited is silent too); time the engine itself was disconnected from NATS does not count. Which tasks are running comes from the event stream (last event per task at
//!   start-up, then every new event), so a restarted engine watches the tasks that were running before,
//!   counting their silence from its own start.
//!
//! The hello loop never waits: which tasks are live (or recently ended) comes from the same event
//! follower, so a hello for a live task is handled within `max_concurrent_hellos`, one for an ended task
//! is answered `Stop` at once, and one for a task the gateway has never heard of gets at most
//! `max_concurrent_unknown_lookups` store lookups at a time (a task found unknown is remembered in a
//! bounded cache). Whatever finds no free slot is answered `Wait`, which agents retry, through a bounded
//! reply queue. Heartbeats have their own subscription and loop, so a hello flood cannot delay them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use taskpods_events::codec;
use taskpods_events::{
    Addressed, EventBody, HelloReply, Input, Instructions, Refusal, TaskId, TaskState,
};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tracing::{Instrument as _, debug, info, warn};

use crate::context::EngineCtx;
use crate::seal::{SealError, Sealer};
use crate::store::{ExecuteError, LoadedTask};
use crate::timers;

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// How often agents send heartbeats (handed to them in their instructions).
    pub heartbeat_interval: Duration,
    /// Silence after which a running task fails with `AgentLost`.
    pub heartbeat_timeout: Duration,
    /// The most output an agent streams before its truncation marker (handed to it).
    pub output_cap_bytes: u64,
    /// What `Wait` tells an agent that asked too early.
    pub hello_retry_after: Duration,
    /// Hellos for live tasks handled at once; more are answered `Wait` (agents ask again).
    pub max_concurrent_hellos: usize,
    /// Store lookups at once for hellos naming a task the gateway has not seen (a hello flood for
    /// random ids costs at most this many); more are answered `Wait`.
    pub max_concurrent_unknown_lookups: usize,
    /// Ended tasks and tasks found unknown remembered, each, to answer their hellos without a lookup.
    pub remembered_tasks: usize,
    /// Cheap answers (`Wait`, `Stop`) queued for sending at most; beyond it a hello is dropped (its
    /// agent asks again after its request timeout).
    pub reply_queue: usize,
    /// Callers' inbox prefix. A hello's reply subject must be below it or below the task's own inbox
    /// prefix (`_INBOX_<task>.`); any other hello is ignored and counted.
    pub reply_prefix: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(30),
            output_cap_bytes: 16 << 20,
            hello_retry_after: Duration::from_millis(500),
            max_concurrent_hellos: 64,
            max_concurrent_unknown_lookups: 4,
            remembered_tasks: 65_536,
            reply_queue: 4096,
            reply_prefix: "_INBOX.".to_owned(),
        }
    }
}

/// Counters an operator (and the tests) read.
#[derive(Debug, Default)]
pub struct GatewayStats {
    /// Hellos ignored because their reply subject was no inbox of the caller.
    pub refused_replies: std::sync::atomic::AtomicU64,
}

/// Whether the gateway answers a hello of `task` at `reply`: only below the task's own inbox prefix or
/// the callers' inbox prefix, never a JetStream API, KV or event subject.
pub fn hello_reply_allowed(task: TaskId, reply: &str, config: &GatewayConfig) -> bool {
    let own = format!("{}.", taskpods_events::subject::task_inbox_prefix(task));
    taskpods_events::subject::is_reply_inbox(reply, &[&own, &config.reply_prefix])
}

/// Errors that stop the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A subscription could not be made.
    #[error("gateway subscription: {0}")]
    Subscribe(async_nats::Error),
    /// The command queue could not be asked whether a silent agent's result waits in it.
    #[error("reading the command queue")]
    CommandQueue {
        /// The stream's answer.
        #[source]
        source: async_nats::jetstream::stream::LastRawMessageError,
    },
}

type Watched = Mutex<HashMap<TaskId, Instant>>;

/// What the gateway knows about tasks without asking the store. Nothing is kept for a task once its
/// sandbox is gone (reaped) or when it ended without one: no agent of it can say hello any more, and
/// one that still did would be answered by a lookup.
#[derive(Debug, Default)]
struct KnownTasks {
    /// Tasks whose last event is not terminal, and whether a sandbox was recorded for each.
    live: HashMap<TaskId, bool>,
    /// Ended tasks whose sandbox may still run, and how they ended, oldest first out.
    ended: Remembered<&'static str>,
    /// Tasks a lookup found not to exist (forgotten as soon as an event for them arrives).
    unknown: Remembered<()>,
}

/// Where a hello's task stands, as far as the gateway knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Live,
    Ended(&'static str),
    KnownUnknown,
    Unheard,
}

impl KnownTasks {
    fn standing(&self, task: TaskId) -> Standing {
        if self.live.contains_key(&task) {
            Standing::Live
        } else if let Some(state) = self.ended.get(task) {
            Standing::Ended(state)
        } else if self.unknown.get(task).is_some() {
            Standing::KnownUnknown
        } else {
            Standing::Unheard
        }
    }

    /// Takes in an event of `task`: how it ended (`None` while live), and whether it records a sandbox.
    fn saw(&mut self, task: TaskId, ended: Option<&'static str>, sandbox: bool, max: usize) {
        self.unknown.remove(task);
        match ended {
            // The sandbox is gone: nothing of the task can say hello any more.
            Some("reaped") => {
                self.live.remove(&task);
                self.ended.remove(task);
            }
            Some(how) => {
                // Ended without a sandbox, nothing is left to stop; one seen only ending (an engine
                // started after the task did) may have had one.
                if self.live.remove(&task).unwrap_or(true) {
                    self.ended.insert(task, how, max);
                }
            }
            None => {
                *self.live.entry(task).or_default() |= sandbox;
            }
        }
    }
}

/// A bounded map that forgets its oldest entries first.
#[derive(Debug)]
struct Remembered<V> {
    values: HashMap<TaskId, V>,
    order: VecDeque<TaskId>,
}

impl<V> Default for Remembered<V> {
    fn default() -> Self {
        Self {
            values: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<V: Copy> Remembered<V> {
    fn get(&self, task: TaskId) -> Option<V> {
        self.values.get(&task).copied()
    }

    fn insert(&mut self, task: TaskId, value: V, max: usize) {
        if self.values.insert(task, value).is_none() {
            self.order.push_back(task);
        }
        if self.order.len() > 2 * max.max(1) {
            // Removed ids linger in the queue until they reach its front; drop them in one pass.
            let values = &self.values;
            self.order.retain(|t| values.contains_key(t));
        }
        while self.values.len() > max.max(1) {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.values.remove(&oldest);
        }
    }

    fn remove(&mut self, task: TaskId) {
        // The order queue keeps the id until it reaches the front (removing it there is a no-op), or
        // until removed ids make up half of it: then they are dropped in one pass, so forgotten tasks
        // cost nothing for long (amortised: a pass over n ids comes after at least n/2 removals).
        if self.values.remove(&task).is_some() && self.order.len() > 2 * self.values.len() + 64 {
            let values = &self.values;
            self.order.retain(|t| values.contains_key(t));
        }
    }

    fn len(&self) -> usize {
        self.values.len()
    }
}

/// The instructions for a task the store holds.
/// The env values are opened here, for the task's own agent only (the hello came from its inbox).
pub fn instructions(
    task_id: TaskId,
    task: &LoadedTask,
    config: &GatewayConfig,
    sealer: Option<&Sealer>,
) -> Option<Result<Instructions, SealError>> {
    let spec = task.task.spec.as_ref()?;
    let deadline = task.task.deadline?;
    let env = match crate::seal::open_env(sealer, task_id, &spec.env) {
        Ok(env) => env,
        Err(e) => return Some(Err(e)),
    };
    Some(Ok(Instructions {
        task_id,
        mode: spec.mode,
        instructions: spec.instructions.clone(),
        env,
        deadline,
        heartbeat_interval_ms: u64::try_from(config.heartbeat_interval.as_millis())
            .unwrap_or(u64::MAX),
        output_cap_bytes: config.output_cap_bytes,
        inputs: spec.inputs.clone(),
        files: spec.files,
    }))
}

/// The answer to a hello, given what executing `AgentHello` gave.
pub fn answer(
    task_id: TaskId,
    result: &Result<LoadedTask, (Option<Refusal>, Option<LoadedTask>)>,
    config: &GatewayConfig,
    sealer: Option<&Sealer>,
) -> HelloReply {
    let wait = HelloReply::Wait {
        retry_after_ms: u64::try_from(config.hello_retry_after.as_millis()).unwrap_or(500),
    };
    let task = match result {
        Ok(task) => task,
        Err((Some(Refusal::UnknownTask), _)) => {
            return HelloReply::Stop {
                reason: "no such task".into(),
            };
        }
        Err((_, Some(task))) => task,
        Err((_, None)) => return wait,
    };
    match task.task.state {
        TaskState::Running => match instructions(task_id, task, config, sealer) {
            None => wait,
            Some(Ok(instructions)) => HelloReply::Run(instructions),
            // Running the code without the env it was launched with would be wrong.
            Some(Err(e)) => HelloReply::Stop {
                reason: e.to_string(),
            },
        },
        TaskState::Accepted | TaskState::New => wait,
        state if state.is_terminal() || state == TaskState::Cancelling => HelloReply::Stop {
            reason: format!("the task is {}", state.name()),
        },
        _ => wait,
    }
}

/// One gateway: what the hello handlers, the running-task follower and the heartbeat checker share.
struct Gateway {
    ctx: Arc<EngineCtx>,
    config: GatewayConfig,
    /// Running tasks and when each was last heard from.
    watched: Watched,
    /// Live, ended and unknown tasks, from the event follower and the lookups.
    known: Mutex<KnownTasks>,
}

/// Runs the gateway until `ctx.shutdown`.
pub async fn run(
    ctx: Arc<EngineCtx>,
    config: GatewayConfig,
    stats: Arc<GatewayStats>,
) -> Result<(), GatewayError> {
    let names = ctx.names().clone();
    let mut hellos = ctx
        .nats
        .queue_subscribe(names.agent_hello_all(), "taskpods-gateway".into())
        .await
        .map_err(|e| GatewayError::Subscribe(e.into()))?;
    let heartbeats = ctx
        .nats
        .subscribe(names.agent_heartbeat_all())
        .await
        .map_err(|e| GatewayError::Subscribe(e.into()))?;
    let live_slots = Arc::new(Semaphore::new(config.max_concurrent_hellos.max(1)));
    let lookup_slots = Arc::new(Semaphore::new(config.max_concurrent_unknown_lookups.max(1)));
    let (cheap_tx, cheap_rx) = mpsc::channel(config.reply_queue.max(1));
    let wait = HelloReply::Wait {
        retry_after_ms: u64::try_from(config.hello_retry_after.as_millis()).unwrap_or(500),
    };
    let gateway = Arc::new(Gateway {
        ctx: ctx.clone(),
        config,
        watched: Watched::default(),
        known: Mutex::default(),
    });

    let _follower = timers::AbortOnDrop(tokio::spawn(gateway.clone().follow_running()));
    let _checker = timers::AbortOnDrop(tokio::spawn(gateway.clone().check_heartbeats()));
    let _heartbeats =
        timers::AbortOnDrop(tokio::spawn(gateway.clone().hear_heartbeats(heartbeats)));
    let _replier =
        timers::AbortOnDrop(tokio::spawn(send_cheap_replies(ctx.nats.clone(), cheap_rx)));
    info!("agent gateway running");
    loop {
        let msg = tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            next = hellos.next() => match next {
                Some(msg) => msg,
                None => break,
            },
        };
        let Ok(Addressed::AgentHello(task)) = names.parse(&msg.subject) else {
            continue;
        };
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        if !hello_reply_allowed(task, &reply, &gateway.config) {
            stats
                .refused_replies
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            warn!(%task, reply = crate::intake::escape_bounded(&reply, 256), "hello ignored: its reply subject is not an inbox");
            continue;
        }
        // Nothing below waits: a hello is handed to a free slot or answered from memory.
        let standing = gateway
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .standing(task);
        let slots = match standing {
            Standing::Live => &live_slots,
            Standing::Unheard => &lookup_slots,
            Standing::Ended(how) => {
                let stop = HelloReply::Stop {
                    reason: format!("the task has ended ({how})"),
                };
                let _ = cheap_tx.try_send((reply, stop));
                continue;
            }
            // Wait rather than Stop: the id may have been probed before its launch, and the event
            // follower forgets it the moment the task's first event arrives.
            Standing::KnownUnknown => {
                let _ = cheap_tx.try_send((reply, wait.clone()));
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%task, ?standing, "hello: no free slot; telling the agent to wait");
            let _ = cheap_tx.try_send((reply, wait.clone()));
            continue;
        };
        let gateway = gateway.clone();
        tokio::spawn(async move {
            gateway.hello(task, reply).await;
            drop(permit);
        });
    }
    Ok(())
}

/// Sends the answers the hello loop gives from memory, so that loop never waits on the connection.
async fn send_cheap_replies(
    client: async_nats::Client,
    mut queue: mpsc::Receiver<(async_nats::Subject, HelloReply)>,
) {
    while let Some((reply, answer)) = queue.recv().await {
        if let Ok(payload) = codec::to_msgpack(&answer) {
            let _ = client.publish(reply, payload.into()).await;
        }
    }
}

/// Whether `body` records (or implies) the task's sandbox: after it, an agent may say hello.
fn records_a_sandbox(body: &EventBody) -> bool {
    matches!(
        body,
        EventBody::Scheduled { .. }
            | EventBody::Started { .. }
            | EventBody::Running
            | EventBody::Progress { .. }
    )
}

/// How a task ended, when `body` is (or follows) its end; `None` while it is live.
fn ended_as(body: &EventBody) -> Option<&'static str> {
    match body {
        EventBody::Succeeded { .. } => Some("succeeded"),
        EventBody::Failed { .. } => Some("failed"),
        EventBody::TimedOut { .. } => Some("timed_out"),
        EventBody::Cancelled { .. } => Some("cancelled"),
        EventBody::Rejected { .. } => Some("rejected"),
        EventBody::Reaped => Some("reaped"),
        _ => None,
    }
}

impl Gateway {
    /// Brings the engine's held-task gauges ([`crate::held`]) up to date.
    fn count_held(&self) {
        let held = &self.ctx.held;
        {
            let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            held.gateway_live.set(known.live.len());
            held.gateway_ended.set(known.ended.len());
            held.gateway_unknown.set(known.unknown.len());
        }
        held.gateway_running
            .set(self.watched.lock().unwrap_or_else(|p| p.into_inner()).len());
    }

    /// Executes `AgentHello` for `task` and answers on `reply`.
    async fn hello(&self, task: TaskId, reply: async_nats::Subject) {
        let span = crate::task_span!("hello", task, answer = tracing::field::Empty);
        self.answer_hello(task, reply).instrument(span).await;
    }

    async fn answer_hello(&self, task: TaskId, reply: async_nats::Subject) {
        let result = match self
            .ctx
            .store
            .execute(task, &Input::AgentHello, self.ctx.clock.now(), None)
            .await
        {
            Ok(executed) => Ok(executed.task),
            Err(ExecuteError::Refused { refusal, task }) => Err((Some(refusal), Some(*task))),
            Err(ExecuteError::Store(e)) => {
                warn!(%task, error = %e, "hello: store unavailable; telling the agent to wait");
                Err((None, None))
            }
        };
        if let Err((Some(Refusal::UnknownTask), _)) = &result {
            let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            if known.standing(task) == Standing::Unheard {
                known.unknown.insert(task, (), self.config.remembered_tasks);
            }
            drop(known);
            self.count_held();
        }
        let answer = answer(task, &result, &self.config, self.ctx.store.sealer());
        if matches!(answer, HelloReply::Run(_)) {
            self.watched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(task)
                .or_insert_with(Instant::now);
            self.count_held();
        }
        tracing::Span::current().record(
            "answer",
            match &answer {
                HelloReply::Run(_) => "run",
                HelloReply::Wait { .. } => "wait",
                HelloReply::Stop { .. } => "stop",
            },
        );
        debug!(%task, ?answer, "hello answered");
        if let Ok(payload) = codec::to_msgpack(&answer) {
            let _ = self.ctx.nats.publish(reply, payload.into()).await;
        }
    }

    /// Keeps `watched` to the set of running tasks, from the event stream.
    async fn follow_running(self: Arc<Self>) {
        let mut follow =
            timers::follow_events(self.ctx.topology.events.clone(), self.ctx.names().clone());
        loop {
            let next = tokio::select! {
                () = self.ctx.shutdown.cancelled() => return,
                next = follow.recv_at() => next,
            };
            let Some((task, sequence, event)) = next else {
                return;
            };
            let ended = ended_as(&event.body);
            if ended.is_some() {
                // The store's held state of a task another engine ended would otherwise stay.
                self.ctx.store.latest().ended_at(task, sequence);
            }
            self.known.lock().unwrap_or_else(|p| p.into_inner()).saw(
                task,
                ended,
                records_a_sandbox(&event.body),
                self.config.remembered_tasks,
            );
            {
                let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
                match event.body {
                    EventBody::Running | EventBody::Progress { .. } => {
                        watched.entry(task).or_insert_with(Instant::now);
                    }
                    _ => {
                        watched.remove(&task);
                    }
                }
            }
            self.count_held();
        }
    }

    /// Records heartbeats, on their own subscription and task so hellos cannot hold them up.
    async fn hear_heartbeats(self: Arc<Self>, mut heartbeats: async_nats::Subscriber) {
        let names = self.ctx.names().clone();
        loop {
            let msg = tokio::select! {
                () = self.ctx.shutdown.cancelled() => return,
                next = heartbeats.next() => match next {
                    Some(msg) => msg,
                    None => return,
                },
            };
            if let Ok(Addressed::AgentHeartbeat(task)) = names.parse(&msg.subject) {
                let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(seen) = watched.get_mut(&task) {
                    *seen = Instant::now();
                }
            }
        }
    }

    async fn check_heartbeats(self: Arc<Self>) {
        let timeout = self.config.heartbeat_timeout;
        let every = (timeout / 4).max(Duration::from_millis(20));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.ctx.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // While the engine itself cannot hear NATS, silence proves nothing about the agents: count
            // it from the reconnection instead.
            if self.ctx.nats.connection_state() != async_nats::connection::State::Connected {
                let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
                for seen in watched.values_mut() {
                    *seen = Instant::now();
                }
                continue;
            }
            let silent = silent(
                &self.watched.lock().unwrap_or_else(|p| p.into_inner()),
                timeout,
            );
            let lost = !silent.is_empty();
            for task in silent {
                // An agent that reported its result and exited is silent too: its result only waits
                // behind the intake's queue (a backlog, or no intake running). Lost it is not.
                match self.ctx.agent_result_queued(task).await {
                    Ok(false) => {}
                    Ok(true) => {
                        debug!(%task, "silent, but its result waits in the command queue");
                        if let Some(seen) = self
                            .watched
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_mut(&task)
                        {
                            *seen = Instant::now();
                        }
                        continue;
                    }
                    Err(e) => {
                        let e = GatewayError::CommandQueue { source: e };
                        // Asked again next tick; the task's deadline bounds how long.
                        warn!(%task, error = %e, "heartbeat lost but the command queue cannot be read; retrying");
                        continue;
                    }
                }
                match self
                    .ctx
                    .store
                    .execute(task, &Input::HeartbeatLost, self.ctx.clock.now(), None)
                    .instrument(crate::task_span!("agent_lost", task))
                    .await
                {
                    Ok(_) => {
                        info!(%task, "no heartbeat within {timeout:?}: agent lost");
                        self.watched
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&task);
                    }
                    Err(ExecuteError::Refused { .. }) => {
                        self.watched
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&task);
                    }
                    Err(ExecuteError::Store(e)) => {
                        warn!(%task, error = %e, "heartbeat lost but the store is unavailable; retrying");
                    }
                }
            }
            if lost {
                self.count_held();
            }
        }
    }
}

/// The watched tasks not heard from for longer than `timeout` (on tokio's clock, so paused time works).
fn silent(watched: &HashMap<TaskId, Instant>, timeout: Duration) -> Vec<TaskId> {
    watched
        .iter()
        .filter(|(_, seen)| seen.elapsed() > timeout)
        .map(|(task, _)| *task)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use taskpods_events::{LaunchPolicy, LaunchTask, Task, decide, evolve, stamp};

    fn task_in(inputs: &[Input]) -> LoadedTask {
        let id = TaskId::from_idempotency_key("gateway");
        let mut task = Task::default();
        let at = Utc::now();
        let launch = Input::Launch {
            spec: LaunchTask::script("echo hi").validate(&LaunchPolicy::default()),
            at,
        };
        for input in std::iter::once(&launch).chain(inputs) {
            let bodies = decide(&task, input).expect("valid history");
            for event in stamp(id, &task, at, bodies) {
                task = evolve(task, &event);
            }
        }
        LoadedTask {
            task,
            last_sequence: 1,
            first_sequence: 1,
        }
    }

    #[test]
    fn the_gateway_remembers_live_ended_and_unknown_tasks_within_its_bound() {
        let (a, b, c, d) = (
            TaskId::mint(),
            TaskId::mint(),
            TaskId::mint(),
            TaskId::mint(),
        );
        let mut known = KnownTasks::default();
        assert_eq!(known.standing(a), Standing::Unheard);
        known.saw(a, None, false, 2);
        assert_eq!(known.standing(a), Standing::Live);
        known.saw(a, None, true, 2);
        known.saw(a, Some("succeeded"), false, 2);
        // Its sandbox may still run: a hello is answered from memory until it is reaped.
        assert_eq!(known.standing(a), Standing::Ended("succeeded"));
        known.saw(a, Some("reaped"), false, 2);
        assert_eq!(known.standing(a), Standing::Unheard);
        // An id found unknown is forgotten the moment its task's first event arrives.
        known.unknown.insert(b, (), 2);
        assert_eq!(known.standing(b), Standing::KnownUnknown);
        known.saw(b, None, false, 2);
        assert_eq!(known.standing(b), Standing::Live);
        // Ended without a sandbox: nothing to remember.
        known.saw(b, Some("cancelled"), false, 2);
        assert_eq!(known.standing(b), Standing::Unheard);
        assert!(known.live.is_empty() && known.ended.values.is_empty());
        // Seen only ending (the engine started later): remembered, within the bound, oldest out first.
        known.saw(a, Some("failed"), false, 2);
        known.saw(c, Some("timed_out"), false, 2);
        known.saw(d, Some("cancelled"), false, 2);
        assert_eq!(known.standing(a), Standing::Unheard);
        assert_eq!(known.standing(c), Standing::Ended("timed_out"));
        assert_eq!(known.standing(d), Standing::Ended("cancelled"));
        let mut remembered = Remembered::default();
        for _ in 0..10_000 {
            let id = TaskId::mint();
            remembered.insert(id, (), 8);
            remembered.remove(id);
        }
        assert!(remembered.order.len() <= 16, "{}", remembered.order.len());
    }

    #[test]
    fn hello_answers_follow_the_task_state() {
        let id = TaskId::from_idempotency_key("gateway");
        let config = GatewayConfig::default();
        let job = Input::JobCreated { job: "j".into() };
        let running = task_in(&[job.clone(), Input::AgentHello]);
        match answer(id, &Ok(running.clone()), &config, None) {
            HelloReply::Run(i) => {
                assert_eq!(i.instructions, "echo hi");
                assert_eq!(i.heartbeat_interval_ms, 5000);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            answer(
                id,
                &Err((Some(Refusal::Duplicate), Some(running))),
                &config,
                None
            ),
            HelloReply::Run(_)
        ));
        assert!(matches!(
            answer(
                id,
                &Err((Some(Refusal::NotNow("accepted")), Some(task_in(&[])))),
                &config,
                None
            ),
            HelloReply::Wait {
                retry_after_ms: 500
            }
        ));
        let cancelling = task_in(&[
            job,
            Input::Cancel(taskpods_events::CancelTask {
                task_id: id.0,
                reason: None,
                requester: None,
            }),
        ]);
        assert_eq!(
            answer(
                id,
                &Err((Some(Refusal::NotNow("cancelling")), Some(cancelling))),
                &config,
                None
            ),
            HelloReply::Stop {
                reason: "the task is cancelling".into()
            }
        );
        assert_eq!(
            answer(id, &Err((Some(Refusal::UnknownTask), None)), &config, None),
            HelloReply::Stop {
                reason: "no such task".into()
            }
        );
        assert!(matches!(
            answer(id, &Err((None, None)), &config, None),
            HelloReply::Wait { .. }
        ));
    }

    /// The heartbeat timeout on tokio's paused clock: a task is silent only once the timeout has fully
    /// passed since it was last heard from, and a heartbeat starts its count again.
    #[tokio::test(start_paused = true)]
    async fn a_task_is_silent_only_past_the_timeout_since_its_last_heartbeat() {
        let timeout = Duration::from_secs(30);
        let (quiet, chatty) = (TaskId::mint(), TaskId::mint());
        let mut watched = HashMap::from([(quiet, Instant::now()), (chatty, Instant::now())]);
        tokio::time::advance(Duration::from_secs(20)).await;
        watched.insert(chatty, Instant::now());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            silent(&watched, timeout).is_empty(),
            "exactly the timeout is not past it"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(silent(&watched, timeout), [quiet]);
        tokio::time::advance(Duration::from_secs(20)).await;
        let mut both = silent(&watched, timeout);
        both.sort();
        let mut expected = vec![quiet, chatty];
        expected.sort();
        assert_eq!(both, expected);
    }
}
