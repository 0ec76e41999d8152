//! Timers: every live task's deadline, and `Input::DeadlineReached{now}` when it passes (the state machine
//! refuses an early firing, so clock skew between replicas cannot time a task out early).
//!
//! Which tasks are live, and their deadlines, come from the event stream through [`follow_events`]: an
//! ordered consumer that first delivers the last event of every task (the state at start-up: a task
//! whose last event is not terminal is live, and is loaded once for its deadline) and then every new event.
//! So a restarted engine re-arms every deadline without replaying whole histories.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use async_nats::jetstream::stream::Stream;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use taskpods_events::codec;
use taskpods_events::{Addressed, EventBody, Input, Names, TaskId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::{EventStore, ExecuteError};

/// The clock the timers read (the wall clock, or a test's).
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The wall clock.
pub fn wall_clock() -> Clock {
    Arc::new(Utc::now)
}

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
    rx: mpsc::Receiver<(TaskId, EventBody)>,
    _task: AbortOnDrop,
}

impl Follower {
    /// The next `(task, event body)`.
    pub async fn recv(&mut self) -> Option<(TaskId, EventBody)> {
        self.rx.recv().await
    }
}

/// Every task's last event at start-up, then every new event, as `(task, body)`. Reconnects by itself
/// (ordered consumer); ends when the [`Follower`] is dropped.
pub fn follow_events(events: Stream, names: Names) -> Follower {
    let (tx, rx) = mpsc::channel(1024);
    let task = tokio::spawn(async move {
        let mut delay = Duration::from_millis(100);
        let mut start = DeliverPolicy::LastPerSubject;
        loop {
            let consumer = events
                .create_consumer(OrderedConfig {
                    filter_subject: names.events_all(),
                    deliver_policy: start,
                    ..Default::default()
                })
                .await;
            let mut messages = match consumer {
                Ok(c) => match c.messages().await {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(error = %e, "event follower: cannot read; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
                Err(e) => {
                    warn!(error = %e, "event follower: cannot create consumer; retrying");
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
                    start = DeliverPolicy::ByStartSequence {
                        start_sequence: info.stream_sequence + 1,
                    };
                }
                let Ok(Addressed::Events(task)) = names.parse(&msg.subject) else {
                    continue;
                };
                let Ok(event) = codec::decode_event(&msg.payload) else {
                    continue;
                };
                if tx.send((task, event.body)).await.is_err() {
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

/// Runs the deadline timers until `shutdown`.
pub async fn run(
    store: EventStore,
    events: Stream,
    clock: Clock,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let mut follow = follow_events(events, store.names().clone());
    let mut deadlines = Deadlines::default();
    info!("deadline timers running");
    loop {
        let wait = deadlines
            .next_in(clock())
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            next = follow.recv() => {
                let Some((task, body)) = next else { return Err("event follower ended".into()) };
                track(&store, &mut deadlines, task, body).await;
            }
            () = tokio::time::sleep(wait) => {
                fire(&store, &mut deadlines, clock()).await;
            }
        }
    }
}

async fn track(store: &EventStore, deadlines: &mut Deadlines, task: TaskId, body: EventBody) {
    match body {
        EventBody::Accepted { deadline, .. } => deadlines.insert(task, deadline),
        body if body.is_terminal() || matches!(body, EventBody::Reaped) => deadlines.remove(task),
        _ if deadlines.contains(task) => {}
        // A live task seen first by a later event (start-up): load it once for its deadline.
        _ => match store.load(task).await {
            Ok(loaded) if !loaded.task.state.is_terminal() => {
                if let Some(deadline) = loaded.task.deadline {
                    deadlines.insert(task, deadline);
                }
            }
            Ok(_) => {}
            Err(e) => warn!(%task, error = %e, "timers: cannot load task for its deadline"),
        },
    }
}

async fn fire(store: &EventStore, deadlines: &mut Deadlines, now: DateTime<Utc>) {
    for task in deadlines.due(now) {
        match store
            .execute(task, &Input::DeadlineReached { now }, now, None)
            .await
        {
            Ok(executed) => {
                info!(%task, state = executed.task.task.state.name(), "deadline reached");
                deadlines.remove(task);
            }
            Err(ExecuteError::Refused {
                refusal,
                task: loaded,
            }) => {
                debug!(%task, %refusal, "deadline timer refused");
                match loaded.task.deadline {
                    // Another replica's clock, or a moved deadline: fire again at the stored one.
                    Some(d) if d > now && !loaded.task.state.is_terminal() => {
                        deadlines.insert(task, d)
                    }
                    _ => deadlines.remove(task),
                }
            }
            Err(ExecuteError::Store(e)) => {
                warn!(%task, error = %e, "deadline reached but the store is unavailable; retrying");
                deadlines.insert(task, now + chrono::TimeDelta::seconds(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let clock: Clock = Arc::new(move || {
            base + chrono::TimeDelta::from_std(start.elapsed()).unwrap_or_default()
        });
        let mut d = Deadlines::default();
        let task = TaskId::mint();
        d.insert(task, base + chrono::TimeDelta::seconds(3600));
        let mut fired_at = None;
        for _ in 0..10 {
            let wait = d.next_in(clock()).unwrap_or(Duration::from_secs(3600));
            tokio::time::sleep(wait).await;
            if !d.due(clock()).is_empty() {
                fired_at = Some(start.elapsed());
                break;
            }
        }
        assert_eq!(fired_at, Some(Duration::from_secs(3600)));
    }
}
