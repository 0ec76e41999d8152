//! Timers: every live task's deadline, and `Input::DeadlineReached{now}` when it passes (the state machine
//! refuses an early firing, so clock skew between replicas cannot time a task out early), unless the
//! task's agent sent its result before the deadline and it still waits in the command queue: then the
//! timeout waits for the intake to apply it, for at most [`TimersConfig::result_grace`]
//! ([`EngineCtx::deadline_waits_for_result`]; a result sent after the deadline loses); and the startup
//! timeout, `Input::StartupTimedOut` for a task not `Running` within [`TimersConfig::startup_timeout`] of
//! its acceptance.
//!
//! Which tasks are live, and their deadlines, come from the event stream through [`follow_events`]: an
//! ordered consumer that first delivers the last event of every task (the state at start-up: a task
//! whose last event is not terminal is live) and then every new event. A live task first seen by a later
//! event is armed from its first event (`accepted`: the deadline and the acceptance time), one read
//! whatever the length of its history; whether its startup timeout applies follows from the event seen.
//! So a restarted engine re-arms every deadline without replaying whole histories, and no event costs a
//! read of its task's history.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use taskpods_events::{Event, EventBody, FailureReason, Input, Names, TaskId, TaskState};
use taskpods_projections::log;
use tokio::sync::mpsc;
use tracing::{Instrument as _, debug, info, warn};

use crate::context::EngineCtx;
use crate::store::{EventStore, ExecuteError};

/// A spawned task aborted when this guard is dropped (so an aborted engine leaves nothing running).
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The receiving end of [`follow_events`]; dropping it stops the follower.
#[derive(Debug)]
pub struct Follower {
    rx: mpsc::Receiver<(TaskId, u64, Event)>,
    _task: AbortOnDrop,
}

impl Follower {
    /// The next `(task, event)`.
    pub async fn recv(&mut self) -> Option<(TaskId, Event)> {
        self.recv_at().await.map(|(task, _, event)| (task, event))
    }

    /// The next `(task, stream sequence, event)`.
    pub async fn recv_at(&mut self) -> Option<(TaskId, u64, Event)> {
        self.rx.recv().await
    }
}

/// Every task's last event at start-up, then every new event, as `(task, event)`. Reconnects by itself
/// (ordered consumer); ends when the [`Follower`] is dropped.
pub fn follow_events(events: Stream, names: Names) -> Follower {
    let (tx, rx) = mpsc::channel(1024);
    let task = tokio::spawn(async move {
        let mut delay = Duration::from_millis(100);
        let mut start = log::Start::LastOfEachTask;
        loop {
            let mut messages = match log::ordered(&events, &names, None, start).await {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, "event follower: cannot read; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            delay = Duration::from_millis(100);
            while let Some(next) = messages.next().await {
                let msg = match next {
                    Ok(msg) => msg,
                    Err(e) => {
                        warn!(error = %e, "event follower: stream error; resuming");
                        break;
                    }
                };
                if let Ok(info) = msg.info() {
                    start = log::Start::Sequence(info.stream_sequence + 1);
                }
                let Ok(stored) = log::decode_message(&names, &msg) else {
                    continue;
                };
                if tx
                    .send((stored.task(), stored.sequence, stored.event))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(delay).await;
        }
    });
    Follower {
        rx,
        _task: AbortOnDrop(task),
    }
}

/// The deadlines of live tasks, soonest first.
#[derive(Debug, Default)]
pub struct Deadlines {
    by_time: BTreeSet<(DateTime<Utc>, TaskId)>,
    by_task: HashMap<TaskId, DateTime<Utc>>,
}

impl Deadlines {
    /// Arms (or moves) `task`'s deadline.
    pub fn insert(&mut self, task: TaskId, deadline: DateTime<Utc>) {
        self.remove(task);
        self.by_time.insert((deadline, task));
        self.by_task.insert(task, deadline);
    }

    /// Disarms `task`.
    pub fn remove(&mut self, task: TaskId) {
        if let Some(old) = self.by_task.remove(&task) {
            self.by_time.remove(&(old, task));
        }
    }

    /// Whether `task` is armed.
    pub fn contains(&self, task: TaskId) -> bool {
        self.by_task.contains_key(&task)
    }

    /// When `task` is armed to fire, if it is.
    pub fn at(&self, task: TaskId) -> Option<DateTime<Utc>> {
        self.by_task.get(&task).copied()
    }

    /// How many are armed.
    pub fn len(&self) -> usize {
        self.by_task.len()
    }

    /// Whether none is armed.
    pub fn is_empty(&self) -> bool {
        self.by_task.is_empty()
    }

    /// How long from `now` until the soonest deadline (zero when one has passed).
    pub fn next_in(&self, now: DateTime<Utc>) -> Option<Duration> {
        self.by_time
            .first()
            .map(|(at, _)| (*at - now).to_std().unwrap_or(Duration::ZERO))
    }

    /// The tasks whose deadline is at or before `now`.
    pub fn due(&self, now: DateTime<Utc>) -> Vec<TaskId> {
        self.by_time
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, task)| *task)
            .collect()
    }
}

/// Timer settings.
#[derive(Debug, Clone)]
pub struct TimersConfig {
    /// Whether the timers run at all.
    pub enabled: bool,
    /// How long a task may take from `Accepted` to `Running` (its agent's hello) before it fails:
    /// `BackendError` when no sandbox was recorded, `AgentLost` when the agent never asked for its
    /// instructions. A backstop: a backend that can diagnose (unschedulable, image pull) reports first.
    pub startup_timeout: Duration,
    /// How long past a task's deadline the timeout waits for a result the agent sent before the
    /// deadline and that still waits for the intake (a backlog, or no engine running when it came);
    /// past it the task times out all the same.
    pub result_grace: Duration,
}

impl Default for TimersConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            startup_timeout: Duration::from_secs(300),
            result_grace: Duration::from_secs(60),
        }
    }
}

/// How often a deadline that waits for a queued result looks again.
const RESULT_POLL: Duration = Duration::from_millis(500);

/// Why the timers stopped before shutdown.
#[derive(Debug, thiserror::Error)]
pub enum TimersError {
    /// The event follower ended (it reconnects by itself, so only a bug ends it).
    #[error("the event follower ended")]
    FollowerEnded,
}

/// Runs the deadline and startup timers until `ctx.shutdown`, reading the time from `ctx.clock`.
pub async fn run(ctx: Arc<EngineCtx>, config: TimersConfig) -> Result<(), TimersError> {
    let store = &ctx.store;
    let mut follow = follow_events(ctx.topology.events.clone(), ctx.names().clone());
    let mut timers = Timers {
        deadlines: Deadlines::default(),
        waiting: HashMap::new(),
        startups: Deadlines::default(),
        startup_timeout: chrono::TimeDelta::from_std(config.startup_timeout)
            .unwrap_or(chrono::TimeDelta::MAX),
    };
    info!("deadline and startup timers running");
    loop {
        let now = ctx.clock.now();
        let wait = [timers.deadlines.next_in(now), timers.startups.next_in(now)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            () = ctx.shutdown.cancelled() => return Ok(()),
            next = follow.recv() => {
                let Some((task, event)) = next else { return Err(TimersError::FollowerEnded) };
                timers.track(store, task, event).await;
            }
            () = tokio::time::sleep(wait) => {
                let now = ctx.clock.now();
                timers.fire_deadlines(&ctx, now).await;
                timers.fire_startups(store, now).await;
            }
        }
        ctx.held.timers_deadlines.set(timers.deadlines.len());
        ctx.held.timers_startups.set(timers.startups.len());
    }
}

struct Timers {
    deadlines: Deadlines,
    /// The deadlines of tasks whose timeout waits for a result sent before it (their entry in
    /// `deadlines` is then the next look).
    waiting: HashMap<TaskId, DateTime<Utc>>,
    startups: Deadlines,
    startup_timeout: chrono::TimeDelta,
}

impl Timers {
    async fn track(&mut self, store: &EventStore, task: TaskId, event: Event) {
        match event.body {
            EventBody::Accepted { deadline, .. } => {
                self.waiting.remove(&task);
                self.deadlines.insert(task, deadline);
                self.startups.insert(task, event.at + self.startup_timeout);
            }
            body if body.is_terminal() || matches!(body, EventBody::Reaped) => {
                self.waiting.remove(&task);
                self.deadlines.remove(task);
                self.startups.remove(task);
            }
            EventBody::Running | EventBody::CancelRequested { .. } => {
                self.startups.remove(task);
                self.arm_from_first_event(store, task, false).await;
            }
            // Not yet running: the startup timeout applies.
            EventBody::Scheduled { .. } | EventBody::Started { .. } => {
                self.arm_from_first_event(store, task, true).await;
            }
            // Progress (running or cancelling), or a kind this version does not know.
            _ => self.arm_from_first_event(store, task, false).await,
        }
    }

    /// A live task first seen by a later event (start-up): arms its deadline, and its startup timeout when
    /// it is still `starting`, from its `accepted` event. Once armed, its later events read nothing.
    async fn arm_from_first_event(&mut self, store: &EventStore, task: TaskId, starting: bool) {
        if self.deadlines.contains(task) {
            return;
        }
        match store.first(task).await {
            Ok(Some(first)) => {
                if let EventBody::Accepted { deadline, .. } = first.event.body {
                    self.deadlines.insert(task, deadline);
                    if starting {
                        self.startups
                            .insert(task, first.event.at + self.startup_timeout);
                    }
                }
            }
            Ok(None) => {}
            Err(e) => warn!(%task, error = %e, "timers: cannot read the task's deadline"),
        }
    }

    async fn fire_deadlines(&mut self, ctx: &EngineCtx, now: DateTime<Utc>) {
        let store = &ctx.store;
        for task in self.deadlines.due(now) {
            let deadline = match self.waiting.get(&task) {
                Some(deadline) => *deadline,
                None => self.deadlines.at(task).unwrap_or(now),
            };
            if ctx.deadline_waits_for_result(task, deadline, now).await {
                debug!(%task, "deadline passed; the result sent before it waits for the intake");
                self.waiting.insert(task, deadline);
                self.deadlines.insert(
                    task,
                    now + chrono::TimeDelta::from_std(RESULT_POLL).unwrap_or_default(),
                );
                continue;
            }
            if self.waiting.remove(&task).is_some() {
                info!(%task, "deadline: no result sent before it is waiting any more (applied, or past the result grace)");
            }
            match store
                .execute(task, &Input::DeadlineReached { now }, now, None)
                .instrument(crate::task_span!("timeout", task))
                .await
            {
                Ok(executed) => {
                    info!(%task, state = executed.task.task.state.name(), "deadline reached");
                    self.deadlines.remove(task);
                }
                Err(ExecuteError::Refused {
                    refusal,
                    task: loaded,
                }) => {
                    debug!(%task, %refusal, "deadline timer refused");
                    match loaded.task.deadline {
                        // Another replica's clock, or a moved deadline: fire again at the stored one.
                        Some(d) if d > now && !loaded.task.state.is_terminal() => {
                            self.deadlines.insert(task, d);
                        }
                        _ => self.deadlines.remove(task),
                    }
                }
                Err(ExecuteError::Store(e)) => {
                    warn!(%task, error = %e, "deadline reached but the store is unavailable; retrying");
                    self.deadlines
                        .insert(task, now + chrono::TimeDelta::seconds(1));
                }
            }
        }
    }

    async fn fire_startups(&mut self, store: &EventStore, now: DateTime<Utc>) {
        for task in self.startups.due(now) {
            let loaded = match store.load(task).await {
                Ok(loaded) => loaded,
                Err(e) => {
                    warn!(%task, error = %e, "startup timeout but the store is unavailable; retrying");
                    self.startups
                        .insert(task, now + chrono::TimeDelta::seconds(1));
                    continue;
                }
            };
            let waited = self.startup_timeout.to_std().unwrap_or_default();
            let input = match loaded.task.state {
                TaskState::Accepted => Input::StartupTimedOut {
                    reason: FailureReason::BackendError,
                    message: Some(format!("no sandbox was created within {waited:?}")),
                },
                TaskState::Scheduled | TaskState::Starting => Input::StartupTimedOut {
                    reason: FailureReason::AgentLost,
                    message: Some(format!(
                        "the agent did not ask for its instructions within {waited:?}"
                    )),
                },
                _ => {
                    self.startups.remove(task);
                    continue;
                }
            };
            match store
                .execute(task, &input, now, Some(loaded))
                .instrument(crate::task_span!("startup_timeout", task))
                .await
            {
                Ok(_) => {
                    info!(%task, "startup timed out");
                    self.startups.remove(task);
                }
                Err(ExecuteError::Refused { .. }) => self.startups.remove(task),
                Err(ExecuteError::Store(e)) => {
                    warn!(%task, error = %e, "startup timeout not recorded; retrying");
                    self.startups
                        .insert(task, now + chrono::TimeDelta::seconds(1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;

    #[test]
    fn deadlines_come_due_in_order_and_can_be_disarmed() {
        let base = Utc::now();
        let secs = chrono::TimeDelta::seconds;
        let (a, b, c) = (TaskId::mint(), TaskId::mint(), TaskId::mint());
        let mut d = Deadlines::default();
        d.insert(a, base + secs(30));
        d.insert(b, base + secs(10));
        d.insert(c, base + secs(20));
        d.insert(c, base + secs(40)); // moved
        assert_eq!(d.len(), 3);
        assert_eq!(d.next_in(base), Some(Duration::from_secs(10)));
        assert_eq!(d.due(base + secs(30)), [b, a]);
        d.remove(b);
        assert_eq!(d.due(base + secs(100)), [a, c]);
        assert_eq!(d.next_in(base + secs(100)), Some(Duration::ZERO));
        d.remove(a);
        d.remove(c);
        assert!(d.is_empty());
        assert_eq!(d.next_in(base), None);
    }

    /// The timer loop's waiting, on tokio's paused clock: a deadline an hour away fires after exactly an
    /// hour of (virtual) time, not before.
    #[tokio::test(start_paused = true)]
    async fn the_wait_ends_exactly_at_the_deadline() {
        let start = tokio::time::Instant::now();
        let base = Utc::now();
        let clock = Clock::tokio(base);
        let mut d = Deadlines::default();
        let task = TaskId::mint();
        d.insert(task, base + chrono::TimeDelta::seconds(3600));
        let mut fired_at = None;
        for _ in 0..10 {
            let wait = d.next_in(clock.now()).unwrap_or(Duration::from_secs(3600));
            tokio::time::sleep(wait).await;
            if !d.due(clock.now()).is_empty() {
                fired_at = Some(start.elapsed());
                break;
            }
        }
        assert_eq!(fired_at, Some(Duration::from_secs(3600)));
    }
}
