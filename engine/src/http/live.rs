//! What changes while a page is open, pushed as server-sent events.
//!
//! - [`ActiveHub`]: the live tasks in memory, fed by one watch of the active bucket and fanned out to every
//!   open page. It watches first and then reads every key (a watch that replays history missed keys under
//!   churn on nats-server 2.9, see `/work/shared/DESIGN.md` section 8); an update the read already
//!   includes is told apart by the view's `seq`, which the page keeps per task.
//! - [`Status`]: what the header shows (projection generation and lag, engine health), refreshed by
//!   [`run_status`] so pages share one set of requests.
//! - [`active_events`], [`task_events`]: the event streams of the Active page and of one task.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{consumer::pull, kv};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use taskpods_client::output::Chunk;
use taskpods_events::TaskId;
use taskpods_projections::{ActiveView, buckets::BucketError, projector};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::AppState;
use super::api::{self, ApiError, OutputChunk};

/// Why following the active bucket stopped (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// Reading or refreshing the views failed.
    #[error("reading the active view")]
    Views(#[source] BucketError),
    /// The watch could not be started or broke.
    #[error("watching the active bucket")]
    Watch(#[source] async_nats::Error),
    /// The watch ended (the server went away).
    #[error("the watch of the active bucket ended")]
    WatchEnded,
}

/// A change of the live task list.
#[derive(Clone, Debug)]
pub enum HubChange {
    /// The whole list was re-read (start, generation switch): take a new snapshot.
    Reset,
    /// A task appeared or changed.
    Upsert(Box<ActiveView>),
    /// A task ended.
    Remove(TaskId),
}

#[derive(Debug, Default)]
struct HubState {
    tasks: HashMap<TaskId, ActiveView>,
    generation: u32,
    loaded: bool,
}

/// The live tasks, in memory, for every open page.
#[derive(Debug)]
pub struct ActiveHub {
    state: Mutex<HubState>,
    changes: broadcast::Sender<HubChange>,
}

impl Default for ActiveHub {
    fn default() -> Self {
        Self {
            state: Mutex::new(HubState::default()),
            changes: broadcast::channel(4096).0,
        }
    }
}

/// The live tasks at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct ActiveSnapshot {
    /// The view generation they were read from.
    pub generation: u32,
    /// False until the first read of the active bucket completed.
    pub loaded: bool,
    /// The tasks, oldest first.
    pub tasks: Vec<ActiveView>,
}

impl ActiveHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        // A panic while holding the lock leaves a consistent map (every update is one insert or remove).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The list now.
    pub fn snapshot(&self) -> ActiveSnapshot {
        snapshot_of(&self.lock())
    }

    /// The list now and every change after it, with nothing lost in between.
    pub fn subscribe(&self) -> (ActiveSnapshot, broadcast::Receiver<HubChange>) {
        let state = self.lock();
        (snapshot_of(&state), self.changes.subscribe())
    }

    fn reset(&self, generation: u32, tasks: Vec<ActiveView>) {
        let mut state = self.lock();
        state.generation = generation;
        state.loaded = true;
        state.tasks = tasks.into_iter().map(|v| (v.task, v)).collect();
        let _ = self.changes.send(HubChange::Reset);
    }

    fn upsert(&self, view: ActiveView) {
        let mut state = self.lock();
        if state
            .tasks
            .get(&view.task)
            .is_some_and(|v| v.seq >= view.seq)
        {
            return;
        }
        state.tasks.insert(view.task, view.clone());
        let _ = self.changes.send(HubChange::Upsert(Box::new(view)));
    }

    fn remove(&self, task: TaskId) {
        let mut state = self.lock();
        if state.tasks.remove(&task).is_some() {
            let _ = self.changes.send(HubChange::Remove(task));
        }
    }
}

fn snapshot_of(state: &HubState) -> ActiveSnapshot {
    let mut tasks: Vec<ActiveView> = state.tasks.values().cloned().collect();
    tasks.sort_by_key(|v| (v.accepted_at, v.seq));
    ActiveSnapshot {
        generation: state.generation,
        loaded: state.loaded,
        tasks,
    }
}

/// Keeps the hub in line with the active bucket until `stop`; follows a rebuild's generation switch.
pub async fn run_hub(state: AppState, stop: CancellationToken) {
    while !stop.is_cancelled() {
        if let Err(e) = follow_active(&state, &stop).await {
            warn!(error = %e, "following the active view; retrying");
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// Follows the current generation's active bucket; returns when the generation changed or at `stop`.
async fn follow_active(state: &AppState, stop: &CancellationToken) -> Result<(), LiveError> {
    let (bucket, generation) = {
        let views = state.views.read().await;
        (views.buckets().active.clone(), views.generation())
    };
    // Watch first, then read: a change between the two is seen by the watch.
    let mut watch = bucket
        .watch_all()
        .await
        .map_err(|e| LiveError::Watch(e.into()))?;
    let tasks = state
        .views
        .read()
        .await
        .active()
        .await
        .map_err(LiveError::Views)?;
    state.hub.reset(generation, tasks);
    let mut refresh = tokio::time::interval(state.config.refresh_interval);
    refresh.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = refresh.tick() => {
                if state.views.write().await.refresh().await.map_err(LiveError::Views)? {
                    return Ok(());
                }
            }
            entry = watch.next() => match entry {
                None => return Err(LiveError::WatchEnded),
                Some(Err(e)) => return Err(LiveError::Watch(e.into())),
                Some(Ok(entry)) => apply_entry(state, &bucket, entry),
            },
        }
    }
}

fn apply_entry(state: &AppState, bucket: &kv::Store, entry: kv::Entry) {
    let Ok(task) = entry.key.parse::<TaskId>() else {
        return;
    };
    match entry.operation {
        kv::Operation::Put => {
            match taskpods_projections::view::decode::<ActiveView>(&entry.value) {
                Ok(view) => state.hub.upsert(view),
                Err(e) => {
                    warn!(bucket = %bucket.name, key = %entry.key, error = %e, "undecodable active view")
                }
            }
        }
        kv::Operation::Delete | kv::Operation::Purge => state.hub.remove(task),
    }
}

/// The engine as seen from NATS.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EngineHealth {
    /// `up` (an engine is pulling commands), `stalled` (commands wait and nobody pulls), `idle` (nobody
    /// pulls, nothing waits: no engine running, or between pulls), `missing` (no intake consumer at all),
    /// `unknown` (NATS did not answer).
    pub state: String,
    /// Commands stored and not yet handed to an engine.
    pub commands_waiting: u64,
    /// Commands handed out and not yet acknowledged.
    pub commands_in_flight: u64,
}

/// What the header shows.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// When this was measured.
    pub checked_at: Option<DateTime<Utc>>,
    /// Whether NATS answered.
    pub nats: bool,
    /// The view generation readers see.
    pub generation: u32,
    /// Every event up to this stream sequence is in the views.
    pub applied_seq: u64,
    /// The event stream's last sequence.
    pub stream_seq: u64,
    /// Events not yet in the views.
    pub events_behind: u64,
    /// Age of the oldest event not yet in the views (0 when caught up).
    pub seconds_behind: f64,
    /// Whether the views are behind enough that a person should know (over 5 s or a NATS failure).
    pub stale: bool,
    /// The command intake.
    pub engine: EngineHealth,
    /// Live tasks.
    pub active: usize,
    /// What went wrong measuring, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Measures the status now.
pub async fn measure(state: &AppState) -> Status {
    let mut status = Status {
        checked_at: Some(Utc::now()),
        active: state.hub.snapshot().tasks.len(),
        ..Status::default()
    };
    match projector::lag(&state.js, &state.names).await {
        Ok(lag) => {
            status.nats = true;
            status.generation = lag.generation;
            status.applied_seq = lag.applied_seq;
            status.stream_seq = lag.stream_seq;
            status.events_behind = lag.events_behind;
            status.seconds_behind = lag.seconds_behind;
            status.stale = lag.seconds_behind > 5.0;
        }
        Err(e) => {
            status.stale = true;
            status.error = Some(format!("projection lag: {e}"));
        }
    }
    status.engine = engine_health(state).await;
    status
}

async fn engine_health(state: &AppState) -> EngineHealth {
    let durable = crate::intake::IntakeConfig::default().durable_name;
    let health = |s: &str| EngineHealth {
        state: s.to_owned(),
        ..EngineHealth::default()
    };
    let Ok(stream) = state.js.get_stream(state.names.command_stream()).await else {
        return health("unknown");
    };
    match stream.get_consumer::<pull::Config>(&durable).await {
        Ok(consumer) => {
            let info = consumer.cached_info();
            let state = if info.num_waiting > 0 {
                "up"
            } else if info.num_pending > 0 {
                "stalled"
            } else {
                "idle"
            };
            EngineHealth {
                state: state.to_owned(),
                commands_waiting: info.num_pending,
                commands_in_flight: info.num_ack_pending as u64,
            }
        }
        Err(_) => health("missing"),
    }
}

/// Refreshes the shared status every `status_interval` until `stop`.
pub async fn run_status(
    state: AppState,
    out: tokio::sync::watch::Sender<Status>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(state.config.status_interval);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {
                let status = measure(&state).await;
                out.send_replace(status);
            }
        }
    }
}

fn event<T: Serialize>(name: &str, data: &T) -> Option<Event> {
    Event::default().event(name).json_data(data).ok()
}

/// An SSE response fed by a task that writes into a channel until the page goes away or the server stops.
fn sse_from<F, Fut>(
    closing: CancellationToken,
    produce: F,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>>
where
    F: FnOnce(mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Event>(256);
    let work = produce(tx);
    tokio::spawn(async move {
        tokio::select! {
            () = closing.cancelled() => {}
            () = work => {}
        }
    });
    let stream =
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// `GET /api/live`: `snapshot` (the active list), then `upsert` and `remove` as tasks change, and
/// `status` whenever the header's status is refreshed.
pub async fn active_events(
    State(state): State<AppState>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let (first, mut changes) = state.hub.subscribe();
    let mut status = state.status.clone();
    let hub_state = state.clone();
    sse_from(state.closing.clone(), move |tx| async move {
        let send = |e: Option<Event>| {
            let tx = tx.clone();
            async move {
                match e {
                    Some(e) => tx.send(e).await.is_ok(),
                    None => true,
                }
            }
        };
        let current = status.borrow_and_update().clone();
        if !send(event("snapshot", &first)).await || !send(event("status", &current)).await {
            return;
        }
        loop {
            let next = tokio::select! {
                change = changes.recv() => match change {
                    Ok(HubChange::Upsert(view)) => event("upsert", &view),
                    Ok(HubChange::Remove(task)) => event("remove", &serde_json::json!({ "task": task })),
                    Ok(HubChange::Reset) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Re-subscribe before reading, so nothing between the two is lost.
                        let (snapshot, fresh) = hub_state.hub.subscribe();
                        changes = fresh;
                        event("snapshot", &snapshot)
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                changed = status.changed() => match changed {
                    Ok(()) => {
                        let current = status.borrow_and_update().clone();
                        event("status", &current)
                    }
                    Err(_) => return,
                },
            };
            if !send(next).await {
                return;
            }
        }
    })
}

/// Query of `GET /api/tasks/{task}/live`.
#[derive(Debug, Deserialize)]
pub struct TaskLiveQuery {
    /// Send output chunks after this log sequence (the `next` of the last output page read); absent: no
    /// output, only the view.
    pub after: Option<u64>,
}

/// `GET /api/tasks/{task}/live`: `task` (view, history) now and on every change; `output` chunks after
/// the cursor, live; `done` once the task has ended and its output is complete.
pub async fn task_events(
    State(state): State<AppState>,
    Path(task): Path<String>,
    query: Result<Query<TaskLiveQuery>, QueryRejection>,
) -> Result<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(query) = query.map_err(ApiError::query)?;
    let task = api::parse_task(&task)?;
    let tasks = state.views.read().await.buckets().tasks.clone();
    // Watch first, then read.
    let mut watch = tasks
        .watch(task.to_string())
        .await
        .map_err(|e| ApiError::unavailable("watching the task", e))?;
    let first = api::task_document(&state, task).await?;
    let output = match query.after {
        Some(after) => Some(
            state
                .client
                .follow_output(task, after)
                .await
                .map_err(|e| ApiError::unavailable("reading the output", e))?,
        ),
        None => None,
    };
    let reader = state.clone();
    Ok(sse_from(state.closing.clone(), move |tx| async move {
        let mut terminal = first.task.is_terminal();
        if let Some(e) = event("task", &first)
            && tx.send(e).await.is_err()
        {
            return;
        }
        let mut output = output.map(Box::pin);
        let mut output_done = output.is_none();
        let quiet = Duration::from_secs(3);
        loop {
            if terminal && output_done {
                let _ = tx.send(Event::default().event("done").data("{}")).await;
                return;
            }
            let next_output = async {
                match output.as_mut() {
                    Some(o) => tokio::time::timeout(quiet, o.next()).await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                entry = watch.next() => match entry {
                    Some(Ok(_)) => match api::task_document(&reader, task).await {
                        Ok(doc) => {
                            terminal = doc.task.is_terminal();
                            event("task", &doc)
                        }
                        Err(_) => None,
                    },
                    _ => return,
                },
                chunk = next_output => match chunk {
                    Ok(Some(Ok(Chunk { seq, piece }))) => {
                        if piece == taskpods_client::output::Piece::End {
                            output_done = true;
                        }
                        event("output", &OutputChunk::new(seq, &piece))
                    }
                    Ok(Some(Err(_))) | Ok(None) => {
                        output_done = true;
                        None
                    }
                    // Nothing for a while: an agent that died without an end marker leaves the output
                    // open; once the task has ended there is nothing more to wait for.
                    Err(_) => {
                        output_done = terminal;
                        None
                    }
                },
            };
            if let Some(e) = next
                && tx.send(e).await.is_err()
            {
                return;
            }
        }
    }))
}
