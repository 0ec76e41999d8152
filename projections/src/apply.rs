//! Guarded writes: folding a batch of events into one generation's buckets so that re-delivery,
//! out-of-order delivery and several projectors at once cannot corrupt or regress a view.
//!
//! Per task, in this order (a batch's events of one task are folded together, so a task costs at most
//! one write per bucket per batch):
//! 1. Read the task view and history (or take them from the cache; or, when the batch holds the task's
//!    first event, assume there are none and let the revision-0 writes prove it); events at or below the
//!    view's `seq` are no-ops.
//! 2. Fold the newer events. An event's position (from `Nats-Msg-Id`) must be the view's next position;
//!    when it is further on (an earlier event is still being delivered elsewhere, or was re-delivered
//!    late), the missing events are read from the task's subject first ("healing"), so the fold never
//!    skips an event. A read that comes back short (a lagging stream replica) is repeated a few times
//!    with a pause; a gap still open after that is real, and is folded past, counted and logged.
//! 3. Write history and active, each guarded by its own stored `seq` and the KV revision; an active
//!    entry is deleted when the task ends, and that delete marker is final (nothing re-creates it). A
//!    writer remembers the revisions it wrote, so in the common case (one projector) these are blind
//!    writes with a revision check, not read-modify-write round trips.
//! 4. Write the finished entry (create-only: the first writer wins, retries are no-ops), in the batch's
//!    terminal-sequence order so the index lists tasks in the order they ended.
//! 5. Write the task view last, with the revision read in step 1. It is the commit record: once it holds
//!    sequence `s`, every other bucket has everything up to `s`. On a revision conflict the task is
//!    re-read and done again.
//!
//! A batch does each step for all its tasks at once, pipelined: every write of a step is sent before
//! any ack is awaited (one round trip per step, not per task); a task that loses a race in any step
//! leaves the batch and is done again on its own, one step after the other.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, kv, stream::Stream};
use futures::StreamExt;
use taskpods_events::{Names, TaskId};
use tracing::warn;

use crate::buckets::{BucketError, ViewBuckets, decode_entry};
use crate::log::{self, StoredEvent};
use crate::view::{self, ActiveView, FinishedView, HistoryView, TaskView};

/// How many times a task is re-read and re-done after losing a revision race.
const CONFLICT_RETRIES: usize = 16;

/// How many times a heal read that came back short is repeated before the gap is taken as real.
pub const HEAL_RETRIES: u32 = 4;

/// The pause before the first repeated heal read (doubling: 20 + 40 + 80 + 160 ms in all).
const HEAL_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// Errors applying events.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A bucket operation failed.
    #[error(transparent)]
    Bucket(#[from] BucketError),
    /// Reading missing events from the stream failed.
    #[error(transparent)]
    Log(#[from] log::LogError),
    /// Other writers kept winning the race for one task.
    #[error("task {0}: gave up after {CONFLICT_RETRIES} revision conflicts")]
    Contended(TaskId),
}

/// Counters of what applying did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Events folded into a view.
    pub applied: u64,
    /// Events at or below the view's sequence (re-deliveries, or healed earlier).
    pub skipped: u64,
    /// Events of unknown kinds (counted in the view, otherwise skipped).
    pub unknown: u64,
    /// Events read from the stream to fill a gap.
    pub healed: u64,
    /// Revision conflicts that made a task be re-done.
    pub conflicts: u64,
    /// Heal reads repeated because they came back short (a lagging stream replica).
    pub heal_retries: u64,
    /// Events missing from the stream that a fold went past (a real gap, after the re-reads).
    pub gaps: u64,
}

impl Applied {
    fn add(&mut self, o: Applied) {
        self.applied += o.applied;
        self.skipped += o.skipped;
        self.unknown += o.unknown;
        self.healed += o.healed;
        self.conflicts += o.conflicts;
        self.heal_retries += o.heal_retries;
        self.gaps += o.gaps;
    }
}

/// What a writer knows about a task's active entry without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ActiveHint {
    /// Nothing: read it first.
    Unknown,
    /// It was at revision `rev` (0: absent) holding sequence `seq` when we last wrote or read it. The
    /// sequence matters as much as the revision: a writer whose task view is stale must not
    /// overwrite a newer entry just because nobody has written it since.
    Rev {
        /// KV revision (0: absent).
        rev: u64,
        /// The `seq` the entry holds.
        seq: u64,
    },
    /// Deleted when the task ended; final.
    Gone,
}

#[derive(Clone, Debug)]
struct Cached {
    view: TaskView,
    rev: u64,
    history: HistoryView,
    history_rev: u64,
    active: ActiveHint,
}

impl Cached {
    /// What a task nobody has written yet has: nothing, at revision 0 everywhere.
    fn new_task(task: TaskId) -> Self {
        Self {
            view: TaskView::empty(task),
            rev: 0,
            history: HistoryView::empty(task),
            history_rev: 0,
            active: ActiveHint::Rev { rev: 0, seq: 0 },
        }
    }
}

/// One task's views with a batch's events folded in (steps 1-2), then written (step 3), waiting for
/// its finished entry and commit.
#[derive(Debug)]
struct Prepared {
    task: TaskId,
    view: TaskView,
    rev: u64,
    history: HistoryView,
    /// The history's revision: as read (or cached) until step 3 wrote it, then as written.
    history_rev: u64,
    /// The `seq` of the history as read (or cached): a history that moved past it is written.
    stored_history_seq: u64,
    /// The active entry: as read (or cached) until step 3 wrote it, then as written.
    active: ActiveHint,
    finished: Option<FinishedView>,
    events: Vec<StoredEvent>,
    applied: Applied,
}

/// Applies events to one generation's buckets.
#[derive(Debug)]
pub struct Writer {
    js: jetstream::Context,
    names: Names,
    events: Stream,
    buckets: ViewBuckets,
    cache: Mutex<HashMap<TaskId, Cached>>,
    cache_limit: usize,
    warned_unknown: AtomicU64,
    /// Tasks with a real gap folded past: the view's event count and the position there, so the
    /// task's later events do not re-read the gap (the count stays behind the positions for good).
    gaps: Mutex<HashMap<TaskId, (u64, u64)>>,
    #[cfg(any(test, feature = "test-util"))]
    lagging_heal_reads: AtomicU64,
}

impl Writer {
    /// A writer into `buckets`, healing gaps from the event stream `events`.
    pub fn new(
        js: jetstream::Context,
        names: Names,
        events: Stream,
        buckets: ViewBuckets,
        cache_limit: usize,
    ) -> Self {
        Self {
            js,
            names,
            events,
            buckets,
            cache: Mutex::new(HashMap::new()),
            cache_limit,
            warned_unknown: AtomicU64::new(0),
            gaps: Mutex::new(HashMap::new()),
            #[cfg(any(test, feature = "test-util"))]
            lagging_heal_reads: AtomicU64::new(0),
        }
    }

    /// The generation written.
    pub fn generation(&self) -> u32 {
        self.buckets.generation
    }

    /// Applies `events` (any order, any tasks, duplicates allowed), reading at most `concurrency` tasks
    /// at a time.
    ///
    /// Each task's events of the batch are folded together, so a task costs one write per bucket per
    /// batch however many of its events the batch holds. The writes are pipelined: every history and
    /// active write of the batch is sent before the first ack is awaited, then every finished entry,
    /// then every task view, so a batch costs three round trips rather than a few per task. A task
    /// that loses a revision race anywhere is done again on its own ([`Writer::apply_task`]).
    pub async fn apply_batch(
        &self,
        events: Vec<StoredEvent>,
        concurrency: usize,
    ) -> Result<Applied, ApplyError> {
        let mut groups: HashMap<TaskId, Vec<StoredEvent>> = HashMap::new();
        for e in events {
            groups.entry(e.task()).or_default().push(e);
        }
        let mut total = Applied::default();
        let folded: Vec<Result<Result<Prepared, u64>, ApplyError>> =
            futures::stream::iter(groups.into_iter().map(|(task, mut group)| {
                group.sort_by_key(|e| e.sequence);
                group.dedup_by_key(|e| e.sequence);
                async move {
                    let n = group.len() as u64;
                    Ok(self.fold_task(task, group, true).await?.ok_or(n))
                }
            }))
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        let mut ready = Vec::with_capacity(folded.len());
        for p in folded {
            match p? {
                Ok(p) => ready.push(p),
                Err(skipped) => total.skipped += skipped,
            }
        }
        // Tasks that lost a race, to be done again one by one.
        let mut redo: Vec<(TaskId, Vec<StoredEvent>, u64)> = Vec::new();

        // Step 3 for every task at once.
        let sides = self.write_sides_pipelined(&mut ready).await?;
        let mut written = Vec::with_capacity(ready.len());
        for (p, ok) in ready.into_iter().zip(sides) {
            if ok {
                written.push(p);
            } else {
                self.forget(p.task);
                redo.push((p.task, p.events, p.applied.conflicts + 1));
            }
        }

        // Finished entries in the order the tasks ended, pipelined on one connection so the server
        // stores them in that order.
        let mut finished: Vec<&FinishedView> =
            written.iter().filter_map(|p| p.finished.as_ref()).collect();
        finished.sort_by_key(|f| f.seq);
        self.create_finished(&finished).await?;

        // Step 5, the commit records, for every task at once.
        let commits = self.commit_pipelined(&mut written).await?;
        for (p, ok) in written.into_iter().zip(commits) {
            if ok {
                total.add(p.applied);
            } else {
                // Lost the race on the task view: someone else moved it; do the task again from
                // what is stored now.
                redo.push((p.task, p.events, p.applied.conflicts + 1));
            }
        }

        let again: Vec<Result<Applied, ApplyError>> = futures::stream::iter(redo.into_iter().map(
            |(task, events, conflicts)| async move {
                let again = self.apply_task(task, events).await?;
                Ok(Applied {
                    conflicts: conflicts + again.conflicts,
                    ..again
                })
            },
        ))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
        for r in again {
            total.add(r?);
        }
        Ok(total)
    }

    /// Applies one task's events sequentially, retrying on conflicts (the slow path).
    pub async fn apply_task(
        &self,
        task: TaskId,
        mut events: Vec<StoredEvent>,
    ) -> Result<Applied, ApplyError> {
        events.sort_by_key(|e| e.sequence);
        for conflicts in 0..CONFLICT_RETRIES as u64 {
            let Some(mut p) = self.prepare(task, events.clone()).await? else {
                return Ok(Applied {
                    skipped: events.len() as u64,
                    conflicts,
                    ..Applied::default()
                });
            };
            if let Some(f) = &p.finished {
                self.create_finished(&[f]).await?;
            }
            if self.commit(&mut p).await? {
                return Ok(Applied {
                    conflicts,
                    ..p.applied
                });
            }
        }
        Err(ApplyError::Contended(task))
    }

    /// Steps 1-3 for one task, one write after the other. `None` when every event is already folded.
    async fn prepare(
        &self,
        task: TaskId,
        mut events: Vec<StoredEvent>,
    ) -> Result<Option<Prepared>, ApplyError> {
        let key = task.to_string();
        let mut conflicts = 0;
        for attempt in 0..CONFLICT_RETRIES {
            let Some(mut p) = self.fold_task(task, events, attempt == 0).await? else {
                return Ok(None);
            };
            // History and active are independent of each other, so they are written concurrently.
            // History is guarded by its own sequence (never behind the task view's listed events, see
            // the module doc); a conflict means another projector wrote it: re-read and fold again.
            let history_write = async {
                if p.history.seq > p.stored_history_seq {
                    let bytes = encode(&p.history)?;
                    match self
                        .buckets
                        .history
                        .update(&key, bytes, p.history_rev)
                        .await
                    {
                        Ok(rev) => Ok(Some(rev)),
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                        Err(e) => Err(ApplyError::from(BucketError::js("write history", &key, e))),
                    }
                } else {
                    Ok(Some(p.history_rev))
                }
            };
            let (history_rev, active) =
                futures::join!(history_write, self.write_active(&key, &p.view, p.active));
            p.active = active?;
            let Some(history_rev) = history_rev? else {
                self.forget(task);
                conflicts += 1;
                events = p.events;
                continue;
            };
            p.history_rev = history_rev;
            p.applied.conflicts += conflicts;
            return Ok(Some(p));
        }
        Err(ApplyError::Contended(task))
    }

    /// Steps 1-2 for one task: its views (from the cache when `use_cache`; none for a task whose
    /// first event is here; else read) with `events` folded in. No writes. `None` when every event is
    /// already folded.
    async fn fold_task(
        &self,
        task: TaskId,
        events: Vec<StoredEvent>,
        use_cache: bool,
    ) -> Result<Option<Prepared>, ApplyError> {
        // The batch holds the task's first event (position 0): its views cannot exist yet, unless the
        // batch is a re-delivery or another projector got there first, and then the revision-0 writes
        // fail and the task is read and done again. A new task therefore costs no reads.
        let first_event_here = events.first().is_some_and(|e| e.position == Some(0));
        // Taken out of the cache, not copied: the fold works on it in place (a copy would cost the
        // size of the task's history on every batch); the commit puts the result back.
        let cached = if use_cache {
            self.take_cached(task)
        } else {
            None
        };
        let current = match cached {
            Some(c) => c,
            None if use_cache && first_event_here => Cached::new_task(task),
            None => self.read(task).await?,
        };
        let newest = events.last().map_or(0, |e| e.sequence);
        if newest <= current.view.seq {
            // Nothing new for the task view; the other buckets were written before it (it is the
            // commit record), so there is nothing to do.
            self.remember(task, current);
            return Ok(None);
        }
        let Cached {
            mut view,
            rev,
            mut history,
            history_rev,
            active,
        } = current;
        let stored_history_seq = history.seq;
        let was_terminal = view.is_terminal();
        let mut finished = None;
        let mut applied = Applied::default();
        for e in &events {
            if e.sequence <= view.seq {
                applied.skipped += 1;
                continue;
            }
            if self.gap_before(&view, e).await? {
                self.heal(
                    task,
                    &mut view,
                    &mut history,
                    &mut finished,
                    e,
                    &mut applied,
                )
                .await?;
            }
            self.fold(&mut view, &mut history, &mut finished, e, &mut applied);
        }
        if was_terminal {
            finished = None;
        }
        // What the active entry holds, when nothing is known about it (a task read, not cached).
        let active = match active {
            ActiveHint::Unknown => self.read_active(&task.to_string()).await?,
            known => known,
        };
        Ok(Some(Prepared {
            task,
            view,
            rev,
            history,
            history_rev,
            stored_history_seq,
            active,
            finished,
            events,
            applied,
        }))
    }

    /// Step 3 for every task of a batch: each history and active write that is needed is sent, then
    /// the acks are awaited together. Per task, `false` when one of its writes lost a revision race.
    async fn write_sides_pipelined(&self, ready: &mut [Prepared]) -> Result<Vec<bool>, ApplyError> {
        enum Side {
            History,
            Active { seq: u64, deleted: bool },
        }
        let mut sent = Vec::with_capacity(ready.len() * 2);
        for (i, p) in ready.iter().enumerate() {
            let key = p.task.to_string();
            if p.history.seq > p.stored_history_seq {
                let ack = self
                    .send_guarded(
                        &self.buckets.history,
                        &key,
                        Some(p.history_rev),
                        Some(encode(&p.history)?),
                    )
                    .await?;
                sent.push((i, Side::History, ack));
            }
            let ActiveHint::Rev { rev, seq } = p.active else {
                continue;
            };
            if seq >= p.view.seq {
                continue;
            }
            let ack = if p.view.is_terminal() {
                // Leave a marker (a delete) so a slower projector's older event cannot create the
                // entry; the marker is final.
                self.send_guarded(&self.buckets.active, &key, (rev != 0).then_some(rev), None)
                    .await?
            } else {
                let value = encode(&ActiveView::from(&p.view))?;
                self.send_guarded(&self.buckets.active, &key, Some(rev), Some(value))
                    .await?
            };
            sent.push((
                i,
                Side::Active {
                    seq: p.view.seq,
                    deleted: p.view.is_terminal(),
                },
                ack,
            ));
        }
        let mut ok = vec![true; ready.len()];
        for (i, side, ack) in sent {
            let p = &mut ready[i];
            match ack.await {
                Ok(ack) => match side {
                    Side::History => p.history_rev = ack.sequence,
                    Side::Active { deleted: true, .. } => p.active = ActiveHint::Gone,
                    Side::Active { seq, .. } => {
                        p.active = ActiveHint::Rev {
                            rev: ack.sequence,
                            seq,
                        }
                    }
                },
                // Another writer moved the entry on (the server's 10071, wrong last sequence).
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => ok[i] = false,
                Err(e) => {
                    let operation = match side {
                        Side::History => "write history",
                        Side::Active { .. } => "write active",
                    };
                    return Err(BucketError::js(operation, p.task.to_string(), e).into());
                }
            }
        }
        Ok(ok)
    }

    /// Step 5 for every task of a batch, pipelined like step 3. Per task, `false` on a revision
    /// conflict; the tasks written are back in the cache.
    async fn commit_pipelined(&self, written: &mut [Prepared]) -> Result<Vec<bool>, ApplyError> {
        let mut sent = Vec::with_capacity(written.len());
        for p in written.iter() {
            let key = p.task.to_string();
            sent.push(
                self.send_guarded(
                    &self.buckets.tasks,
                    &key,
                    Some(p.rev),
                    Some(encode(&p.view)?),
                )
                .await?,
            );
        }
        let mut ok = Vec::with_capacity(written.len());
        for (p, ack) in written.iter_mut().zip(sent) {
            match ack.await {
                Ok(ack) => {
                    tracing::debug!(task = %p.task, seq = p.view.seq, expected = p.rev,
                        rev = ack.sequence, "projector commit");
                    self.keep(p, ack.sequence);
                    ok.push(true);
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    tracing::debug!(task = %p.task, seq = p.view.seq, expected = p.rev,
                        "projector commit conflict");
                    self.forget(p.task);
                    ok.push(false);
                }
                Err(e) => {
                    return Err(BucketError::js("write task view", p.task.to_string(), e).into());
                }
            }
        }
        Ok(ok)
    }

    /// Sends a KV write of `key` (a delete when `value` is `None`) that the server stores only if the
    /// key is at revision `expected` (0: absent), without waiting for the ack.
    async fn send_guarded(
        &self,
        bucket: &kv::Store,
        key: &str,
        expected: Option<u64>,
        value: Option<bytes::Bytes>,
    ) -> Result<jetstream::context::PublishAckFuture, ApplyError> {
        let mut headers = HeaderMap::new();
        if let Some(rev) = expected {
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                rev.to_string().as_str(),
            );
        }
        if value.is_none() {
            headers.insert("KV-Operation", "DEL");
        }
        let subject = format!("$KV.{}.{key}", bucket.name);
        self.js
            .publish_with_headers(subject, headers, value.unwrap_or_default())
            .await
            .map_err(|e| BucketError::js("write", format!("{}/{key}", bucket.name), e).into())
    }

    /// Reads and folds the events missing between `view` and `e` ("healing"). On a cluster the read
    /// may be answered by a stream replica that is behind the one that delivered `e`, and come back
    /// short: it is repeated [`HEAL_RETRIES`] times with a doubling pause. A gap still open after
    /// that is a real one (the events are not in the stream: deleted, or never written), and `e` is
    /// folded past it as a fresh fold of the stream would, counted in [`Applied::gaps`] and logged.
    /// Bounded, so a real gap costs at most the pauses, once per task (the writer remembers it).
    async fn heal(
        &self,
        task: TaskId,
        view: &mut TaskView,
        history: &mut HistoryView,
        finished: &mut Option<FinishedView>,
        e: &StoredEvent,
        step: &mut Applied,
    ) -> Result<(), ApplyError> {
        let mut pause = HEAL_PAUSE;
        for attempt in 0..=HEAL_RETRIES {
            if attempt > 0 {
                step.heal_retries += 1;
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            let missing = log::read_task(
                &self.events,
                &self.names,
                task,
                view.seq + 1,
                e.sequence - 1,
            )
            .await?;
            #[cfg(any(test, feature = "test-util"))]
            let missing = {
                let mut missing = missing;
                self.lag_heal_read(&mut missing);
                missing
            };
            let mut undecodable = false;
            for m in missing {
                match m {
                    Ok(m) => {
                        step.healed += 1;
                        self.fold(view, history, finished, &m, step);
                    }
                    Err(err) => {
                        // Not folded, so the task's event count stays behind the positions: no
                        // retry reads it any better.
                        undecodable = true;
                        warn!(%task, error = %err, "skipping an undecodable event");
                    }
                }
            }
            if undecodable || !self.gap_before(view, e).await? {
                return Ok(());
            }
        }
        let missing = e.position.map_or(0, |p| p.saturating_sub(view.events));
        step.gaps += missing;
        if let Ok(mut gaps) = self.gaps.lock() {
            if gaps.len() >= self.cache_limit {
                gaps.clear();
            }
            gaps.insert(task, (view.events, e.position.unwrap_or(view.events)));
        }
        warn!(%task, seq = e.sequence, position = ?e.position, missing,
            "events missing from the stream before this one (still missing after {HEAL_RETRIES} \
             re-reads): folded past the gap");
        Ok(())
    }

    /// Test hook standing in for a lagging stream replica: drops the events of the next heal reads.
    #[cfg(any(test, feature = "test-util"))]
    fn lag_heal_read(&self, read: &mut Vec<log::Read>) {
        let lagging =
            self.lagging_heal_reads
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if lagging.is_ok() {
            read.clear();
        }
    }

    /// Makes the next `reads` heal reads come back empty, as a stream replica that is behind would
    /// answer them (tests only: a lagging replica cannot be produced on demand).
    #[cfg(any(test, feature = "test-util"))]
    pub fn lag_next_heal_reads(&self, reads: u64) {
        self.lagging_heal_reads.store(reads, Ordering::Relaxed);
    }

    fn fold(
        &self,
        view: &mut TaskView,
        history: &mut HistoryView,
        finished: &mut Option<FinishedView>,
        e: &StoredEvent,
        step: &mut Applied,
    ) {
        let was_terminal = view.is_terminal();
        view.apply(e);
        history.apply(e, view);
        if e.is_unknown() {
            step.unknown += 1;
            // One warning per event would flood the log when a newer engine writes many; the count
            // is in the view (`unknown_events`) and the projector's stats.
            if self.warned_unknown.fetch_add(1, Ordering::Relaxed) < 16 {
                warn!(task = %e.task(), seq = e.sequence, kind = %e.kind,
                    "skipping an event of a kind this version does not know");
            }
        } else {
            step.applied += 1;
        }
        if !was_terminal && view.is_terminal() {
            *finished = Some(FinishedView::from_terminal(view, e.sequence));
        }
    }

    /// Whether events of the task are missing between the view and `e` (a gap already found real and
    /// folded past does not count again).
    async fn gap_before(&self, view: &TaskView, e: &StoredEvent) -> Result<bool, ApplyError> {
        match e.position {
            Some(p) if p <= view.events => Ok(false),
            Some(p) => {
                let known = self
                    .gaps
                    .lock()
                    .ok()
                    .and_then(|gaps| gaps.get(&e.task()).copied());
                // The view's count lags the positions by the missing events from then on.
                Ok(known.is_none_or(|(events, position)| {
                    view.events < events || p - view.events != position - events
                }))
            }
            // A writer without taskpods message ids: ask the stream for the task's next event.
            None => {
                let next = log::read_task(
                    &self.events,
                    &self.names,
                    e.task(),
                    view.seq + 1,
                    e.sequence,
                )
                .await?;
                Ok(next.first().is_some_and(|r| match r {
                    Ok(m) => m.sequence < e.sequence,
                    Err(_) => true,
                }))
            }
        }
    }

    /// What the active entry of `key` holds now.
    async fn read_active(&self, key: &str) -> Result<ActiveHint, ApplyError> {
        let active = &self.buckets.active;
        let entry = active
            .entry(key)
            .await
            .map_err(|e| BucketError::js("read active", key, e))?;
        Ok(match entry {
            // Deleted when the task ended; a task never becomes live again, so the marker is final.
            Some(e) if e.operation != kv::Operation::Put => ActiveHint::Gone,
            Some(e) => {
                let current: ActiveView = decode_entry(active, key, &e.value)?;
                ActiveHint::Rev {
                    rev: e.revision,
                    seq: current.seq,
                }
            }
            None => ActiveHint::Rev { rev: 0, seq: 0 },
        })
    }

    /// Brings the active entry in line with `view`; returns what is known about it afterwards.
    async fn write_active(
        &self,
        key: &str,
        view: &TaskView,
        hint: ActiveHint,
    ) -> Result<ActiveHint, ApplyError> {
        let active = &self.buckets.active;
        let mut hint = hint;
        for _ in 0..CONFLICT_RETRIES {
            // With a revision we wrote ourselves (or 0 for a task we have never seen), write directly;
            // if anyone else wrote since, the revision check fails and we read what is there.
            let (rev, stored_seq) = match hint {
                ActiveHint::Gone => return Ok(ActiveHint::Gone),
                ActiveHint::Rev { rev, seq } => (rev, seq),
                ActiveHint::Unknown => match self.read_active(key).await? {
                    ActiveHint::Rev { rev, seq } => (rev, seq),
                    _ => return Ok(ActiveHint::Gone),
                },
            };
            if stored_seq >= view.seq {
                return Ok(ActiveHint::Rev {
                    rev,
                    seq: stored_seq,
                });
            }
            let result = if view.is_terminal() {
                if rev == 0 {
                    // Leave a marker so a slower projector's older event cannot create the entry.
                    active.delete(key).await
                } else {
                    active.delete_expect_revision(key, Some(rev)).await
                }
                .map(|()| ActiveHint::Gone)
            } else {
                active
                    .update(key, encode(&ActiveView::from(view))?, rev)
                    .await
                    .map(|rev| ActiveHint::Rev { rev, seq: view.seq })
            };
            match result {
                Ok(hint) => return Ok(hint),
                // Another writer moved the entry on (the server's 10071, wrong last sequence).
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    hint = ActiveHint::Unknown;
                }
                Err(e) => return Err(BucketError::js("write active", key, e).into()),
            }
        }
        Err(BucketError::Contended {
            operation: "write active",
            name: key.to_owned(),
        }
        .into())
    }

    /// Writes finished entries create-only, in the given order.
    async fn create_finished(&self, entries: &[&FinishedView]) -> Result<(), ApplyError> {
        if entries.is_empty() {
            return Ok(());
        }
        let bucket = &self.buckets.finished;
        let mut acks = Vec::with_capacity(entries.len());
        for f in entries {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
            let subject = format!("$KV.{}.{}", bucket.name, f.task);
            // Awaiting the send (not the ack) keeps the order on the wire.
            let ack = self
                .js
                .publish_with_headers(subject, headers, encode(f)?)
                .await
                .map_err(|e| BucketError::js("write finished", f.task.to_string(), e))?;
            acks.push((f.task, ack));
        }
        for (task, ack) in acks {
            match ack.await {
                Ok(_) => {}
                // Already written by an earlier attempt or another projector: the first one stands.
                // (`Nats-Expected-Last-Subject-Sequence: 0` failed: the server's 10071.)
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {}
                Err(e) => return Err(BucketError::js("write finished", task.to_string(), e).into()),
            }
        }
        Ok(())
    }

    /// Step 5; `false` on a revision conflict.
    async fn commit(&self, p: &mut Prepared) -> Result<bool, ApplyError> {
        let key = p.task.to_string();
        match self
            .buckets
            .tasks
            .update(&key, encode(&p.view)?, p.rev)
            .await
        {
            Ok(rev) => {
                // Expected and obtained revision: shows two projectors' writes of one task that both
                // succeeded (nats-server < 2.9.21 on a cluster, #4320).
                tracing::debug!(task = %p.task, seq = p.view.seq, expected = p.rev, rev, "projector commit");
                self.keep(p, rev);
                Ok(true)
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                tracing::debug!(task = %p.task, seq = p.view.seq, expected = p.rev, "projector commit conflict");
                self.forget(p.task);
                Ok(false)
            }
            Err(e) => Err(BucketError::js("write task view", &key, e).into()),
        }
    }

    /// Puts a committed task (its task view now at `rev`) in the cache: moved, not copied, as the task
    /// is done for this batch.
    fn keep(&self, p: &mut Prepared, rev: u64) {
        self.remember(
            p.task,
            Cached {
                view: std::mem::replace(&mut p.view, TaskView::empty(p.task)),
                rev,
                history: std::mem::replace(&mut p.history, HistoryView::empty(p.task)),
                history_rev: p.history_rev,
                active: p.active,
            },
        );
    }

    async fn read(&self, task: TaskId) -> Result<Cached, ApplyError> {
        let key = task.to_string();
        let (tasks, history) = futures::join!(
            self.buckets.tasks.entry(&key),
            self.buckets.history.entry(&key)
        );
        let tasks = tasks.map_err(|e| BucketError::js("read task view", &key, e))?;
        let history = history.map_err(|e| BucketError::js("read history", &key, e))?;
        let (view, rev) = match tasks {
            Some(e) if e.operation == kv::Operation::Put => (
                decode_entry(&self.buckets.tasks, &key, &e.value)?,
                e.revision,
            ),
            Some(e) => (TaskView::empty(task), e.revision),
            None => (TaskView::empty(task), 0),
        };
        let (history, history_rev) = match history {
            Some(e) if e.operation == kv::Operation::Put => (
                decode_entry(&self.buckets.history, &key, &e.value)?,
                e.revision,
            ),
            Some(e) => (HistoryView::empty(task), e.revision),
            None => (HistoryView::empty(task), 0),
        };
        // A task nobody has written yet has no active entry either (if a concurrent projector has
        // just created one, the revision check on our write finds it).
        let active = if rev == 0 && history_rev == 0 {
            ActiveHint::Rev { rev: 0, seq: 0 }
        } else {
            ActiveHint::Unknown
        };
        Ok(Cached {
            view,
            rev,
            history,
            history_rev,
            active,
        })
    }

    fn take_cached(&self, task: TaskId) -> Option<Cached> {
        self.cache.lock().ok()?.remove(&task)
    }

    /// Tasks whose views are cached now.
    pub fn cached_tasks(&self) -> usize {
        self.cache.lock().map_or(0, |cache| cache.len())
    }

    fn remember(&self, task: TaskId, c: Cached) {
        // A finished task (ended and reaped, or ended without a sandbox) gets no more events: keeping
        // its views would cost memory per finished task. A late event costs one read.
        if c.view.is_terminal() && (c.view.reaped || c.view.job.is_none()) {
            return;
        }
        if let Ok(mut cache) = self.cache.lock() {
            // A crude bound: a full cache starts over; the cost is one read per task afterwards.
            if cache.len() >= self.cache_limit {
                cache.clear();
            }
            cache.insert(task, c);
        }
    }

    fn forget(&self, task: TaskId) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(&task);
        }
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Result<bytes::Bytes, ApplyError> {
    view::encode(value).map_err(|source| {
        ApplyError::Bucket(BucketError::Encode {
            key: String::new(),
            source,
        })
    })
}
