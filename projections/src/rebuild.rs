//! Rebuilding every view from sequence 1, and verifying the live views against a fresh fold.
//!
//! Rebuild, without a window where readers see half a view:
//! 1. Fold the whole stream (up to its last sequence `E` at the start) in memory with an ordered consumer.
//! 2. Write the folded views into a fresh generation `n+1` (finished entries in the order tasks ended).
//! 3. Create generation `n+1`'s durable consumer at `E+1` and drain it into the new buckets, so events
//!    appended during the rebuild are in.
//! 4. Switch the pointer (a KV update with the revision read at the start: two rebuilds at once cannot
//!    both win). Readers and projectors follow it; the previous generation stays until the next rebuild
//!    as a fallback, older ones are deleted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv, stream::Stream};
use chrono::Utc;
use futures::StreamExt;
use serde::Serialize;
use taskpods_events::codec::HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE;
use taskpods_events::{Names, TaskId};

use crate::buckets::{self, BucketError, BucketSettings, Pointer, ViewBuckets};
use crate::log::{self, LogError};
use crate::projector::{self, ProjectorConfig, ProjectorError, ProjectorStats};
use crate::view::{self, ActiveView, FinishedView, Folded, HistoryView, TaskView};

/// Errors rebuilding or verifying.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// A bucket operation failed.
    #[error(transparent)]
    Bucket(#[from] BucketError),
    /// The catch-up projector failed.
    #[error(transparent)]
    Projector(#[from] ProjectorError),
    /// Reading the event stream failed.
    #[error("reading the event stream: {0}")]
    Stream(#[source] async_nats::Error),
    /// Another rebuild switched the pointer first; this one's generation was left unused.
    #[error("another rebuild switched to generation {0} first; nothing was switched")]
    Raced(u32),
    /// A write into the new generation was refused or never acknowledged (a key already there: a
    /// half-built generation or another rebuild writing the same one). Nothing was switched.
    #[error("writing the new generation: {reason}; nothing was switched")]
    Refused {
        /// The server's answer, or what did not come.
        reason: String,
    },
    /// A fold or write task of the rebuild panicked or was cancelled.
    #[error("a rebuild task failed: {0}")]
    Worker(#[source] tokio::task::JoinError),
}

/// What a fold of the whole stream found.
#[derive(Debug, Default)]
pub struct FoldedStream {
    /// Every task's views.
    pub tasks: HashMap<TaskId, Folded>,
    /// Events folded.
    pub events: u64,
    /// Events of unknown kinds (counted in the views, otherwise skipped).
    pub unknown: u64,
    /// Messages that are not events, with why.
    pub undecodable: Vec<LogError>,
    /// The last stream sequence folded.
    pub last_seq: u64,
}

/// Progress of a long operation, for a progress bar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// What is being done.
    pub phase: Phase,
    /// Units done.
    pub done: u64,
    /// Units in all.
    pub total: u64,
}

/// The phases of a rebuild or verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading and folding the stream (units: events).
    Fold,
    /// Writing views (units: tasks).
    Write,
    /// Comparing with the live views (units: tasks).
    Compare,
}

impl FoldedStream {
    /// Joins the folds of disjoint sets of tasks (the partitions of one fold) into one.
    pub fn merge(parts: Vec<FoldedStream>) -> Self {
        let mut out = FoldedStream {
            tasks: HashMap::with_capacity(parts.iter().map(|p| p.tasks.len()).sum()),
            ..FoldedStream::default()
        };
        for part in parts {
            out.tasks.extend(part.tasks);
            out.events += part.events;
            out.unknown += part.unknown;
            out.undecodable.extend(part.undecodable);
            out.last_seq = out.last_seq.max(part.last_seq);
        }
        out.undecodable.sort_by_key(error_seq);
        out
    }

    fn fold(&mut self, names: &Names, seq: u64, stored_at: i128, m: &jetstream::Message) {
        self.last_seq = self.last_seq.max(seq);
        match log::decode(
            names,
            m.subject.as_str(),
            seq,
            m.headers.as_ref(),
            &m.payload,
            log::to_chrono(stored_at),
        ) {
            Ok(e) => {
                self.events += 1;
                if e.is_unknown() {
                    self.unknown += 1;
                }
                self.tasks
                    .entry(e.task())
                    .or_insert_with(|| Folded::new(e.task()))
                    .apply(&e);
            }
            Err(e) => self.undecodable.push(e),
        }
    }
}

/// The stream sequence a decode error is about (errors are listed in stream order).
fn error_seq(e: &LogError) -> u64 {
    match e {
        LogError::Foreign { seq, .. }
        | LogError::Undecodable { seq, .. }
        | LogError::WrongTask { seq, .. } => *seq,
        LogError::Read { .. } => u64::MAX,
    }
}

/// The number of partitions a fold is split into by default: one per core.
pub fn default_partitions() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Folds the event stream up to `upto` (inclusive) in memory, split across [`default_partitions`].
pub async fn fold_stream(
    events: &Stream,
    names: &Names,
    upto: u64,
    progress: impl FnMut(Progress),
) -> Result<FoldedStream, RebuildError> {
    let parts = fold_partitioned(events, names, upto, default_partitions(), progress).await?;
    Ok(FoldedStream::merge(parts))
}

/// Messages handed from the reader to a partition at once (one channel send per batch, not per event).
const FOLD_BATCH: usize = 256;

/// Folds the event stream up to `upto` (inclusive) in memory, the tasks split into `partitions` by
/// their subject, each partition decoded and folded on its own task (so on its own core): one ordered
/// consumer reads, and hands each message to the partition of its task; a task's events all go to one
/// partition, in stream order, so each partition's fold is exactly the serial fold of its tasks.
/// Returns the partitions' folds (disjoint sets of tasks); [`FoldedStream::merge`] joins them.
pub async fn fold_partitioned(
    events: &Stream,
    names: &Names,
    upto: u64,
    partitions: usize,
    mut progress: impl FnMut(Progress),
) -> Result<Vec<FoldedStream>, RebuildError> {
    let partitions = partitions.max(1);
    if upto == 0 {
        return Ok(vec![FoldedStream::default()]);
    }
    let mut messages = log::ordered(events, names, None, log::Start::First)
        .await
        .map_err(|e| RebuildError::Stream(e.into()))?;
    type Batch = Vec<(u64, i128, jetstream::Message)>;
    let mut senders = Vec::with_capacity(partitions);
    let mut workers = Vec::with_capacity(partitions);
    for _ in 0..partitions {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(16);
        let names = names.clone();
        senders.push(tx);
        workers.push(tokio::spawn(async move {
            let mut out = FoldedStream::default();
            while let Some(batch) = rx.recv().await {
                for (seq, stored_at, m) in &batch {
                    out.fold(&names, *seq, *stored_at, m);
                }
            }
            out
        }));
    }
    let mut batches: Vec<Batch> = (0..partitions)
        .map(|_| Vec::with_capacity(FOLD_BATCH))
        .collect();
    let mut seen = 0u64;
    let read = async {
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| RebuildError::Stream(e.into()))?;
            let Ok(info) = m.info() else { continue };
            let (seq, stored_at) = (info.stream_sequence, info.published.unix_timestamp_nanos());
            if seq > upto {
                break;
            }
            seen += 1;
            // A task's subject ends in its id, whose last character is spread evenly: every event of
            // a task goes to the same partition.
            let slot = usize::from(m.subject.as_bytes().last().copied().unwrap_or(0)) % partitions;
            batches[slot].push((seq, stored_at, m));
            if batches[slot].len() >= FOLD_BATCH {
                let batch = std::mem::replace(&mut batches[slot], Vec::with_capacity(FOLD_BATCH));
                if senders[slot].send(batch).await.is_err() {
                    break;
                }
            }
            if seen.is_multiple_of(4096) {
                progress(Progress {
                    phase: Phase::Fold,
                    done: seq,
                    total: upto,
                });
            }
            if seq >= upto {
                break;
            }
        }
        for (sender, batch) in senders.iter().zip(batches) {
            if !batch.is_empty() {
                let _ = sender.send(batch).await;
            }
        }
        Ok::<_, RebuildError>(())
    };
    let read = read.await;
    drop(senders);
    let mut parts = Vec::with_capacity(partitions);
    for worker in workers {
        parts.push(worker.await.map_err(RebuildError::Worker)?);
    }
    read?;
    progress(Progress {
        phase: Phase::Fold,
        done: upto,
        total: upto,
    });
    Ok(parts)
}

/// How a rebuild runs.
#[derive(Clone, Debug, Default)]
pub struct RebuildConfig {
    /// The projector settings used for the catch-up (names, bucket settings, batch sizes).
    pub projector: ProjectorConfig,
    /// Partitions the fold and the writes are split into (tasks by subject; 0: one per core).
    pub partitions: usize,
}

/// What a rebuild did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RebuildSummary {
    /// The generation readers saw before.
    pub from_generation: u32,
    /// The generation readers see now.
    pub generation: u32,
    /// Events folded from the stream.
    pub events: u64,
    /// Tasks written.
    pub tasks: u64,
    /// Events of unknown kinds skipped.
    pub unknown: u64,
    /// Messages that were not events.
    pub undecodable: u64,
    /// Events appended during the rebuild and applied before the switch.
    pub caught_up: u64,
    /// Seconds reading and folding.
    pub fold_secs: f64,
    /// Seconds writing the new buckets.
    pub write_secs: f64,
    /// Seconds in all.
    pub total_secs: f64,
}

impl RebuildSummary {
    /// Events per second over the whole rebuild.
    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.total_secs.max(1e-9)
    }
}

/// Rebuilds every view into a fresh generation and switches readers to it.
pub async fn rebuild(
    js: &jetstream::Context,
    config: &RebuildConfig,
    mut progress: impl FnMut(Progress),
) -> Result<RebuildSummary, RebuildError> {
    let started = Instant::now();
    let names = &config.projector.names;
    let settings = config.projector.buckets;
    let partitions = match config.partitions {
        0 => default_partitions(),
        n => n,
    };
    let meta = buckets::ensure_bucket(js, &buckets::meta_bucket(names), settings).await?;
    let (pointer, pointer_rev) = buckets::read_pointer(&meta).await?;
    let from = pointer.generation;
    let generation = from + 1;

    let mut events = js
        .get_stream(names.event_stream())
        .await
        .map_err(|e| RebuildError::Stream(e.into()))?;
    let upto = events
        .info()
        .await
        .map_err(|e| RebuildError::Stream(e.into()))?
        .state
        .last_sequence;
    // Preparing the new generation's buckets is only waiting on the server: it runs while the stream
    // is folded. Generations older than the current one are unused; so is a half-built one from a
    // failed run.
    let prepare = async {
        for old in 1..from {
            delete_generation(js, names, old).await?;
        }
        delete_generation(js, names, generation).await?;
        Ok::<_, RebuildError>(ViewBuckets::open(js, names, generation, settings, true).await?)
    };
    let fold = async {
        let parts = fold_partitioned(&events, names, upto, partitions, &mut progress).await?;
        Ok::<_, RebuildError>((parts, started.elapsed().as_secs_f64()))
    };
    let (target, folded) = tokio::join!(prepare, fold);
    let (parts, fold_secs) = folded?;
    let target = target?;

    let write_started = Instant::now();
    let written = write_generation(js, &target, parts, &mut progress).await?;
    let write_secs = write_started.elapsed().as_secs_f64();

    let stats = ProjectorStats::default();
    projector::catch_up(js, &events, &config.projector, target, upto + 1, &stats).await?;
    let covered = stats
        .last_seq
        .load(std::sync::atomic::Ordering::Relaxed)
        .max(upto);

    let next = Pointer {
        generation,
        switched_at: Utc::now(),
        covered_seq: covered,
    };
    let value = view::encode(&next).map_err(|source| BucketError::Encode {
        key: buckets::POINTER_KEY.into(),
        source,
    })?;
    if let Err(e) = meta.update(buckets::POINTER_KEY, value, pointer_rev).await {
        if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
            let (now, _) = buckets::read_pointer(&meta).await?;
            return Err(RebuildError::Raced(now.generation));
        }
        return Err(BucketError::js("switch pointer", buckets::POINTER_KEY, e).into());
    }
    // The previous generation's consumer has no more readers once projectors follow the pointer;
    // deleting it also stops a projector that missed the switch (it re-reads the pointer on error).
    let _ = events
        .delete_consumer(&buckets::consumer_name(names, from))
        .await;
    Ok(RebuildSummary {
        from_generation: from,
        generation,
        events: written.events,
        tasks: written.tasks,
        unknown: written.unknown,
        undecodable: written.undecodable,
        caught_up: stats.seen(),
        fold_secs,
        write_secs,
        total_secs: started.elapsed().as_secs_f64(),
    })
}

/// Deletes the buckets and consumer of `generation` (generation 1's buckets belong to the topology and are
/// only emptied).
pub async fn delete_generation(
    js: &jetstream::Context,
    names: &Names,
    generation: u32,
) -> Result<(), RebuildError> {
    if let Ok(events) = js.get_stream(names.event_stream()).await {
        let _ = events
            .delete_consumer(&buckets::consumer_name(names, generation))
            .await;
    }
    for bucket in buckets::generation_buckets(names, generation) {
        if generation <= 1 {
            if let Ok(s) = js.get_stream(format!("KV_{bucket}")).await {
                s.purge()
                    .await
                    .map_err(|e| BucketError::js("purge bucket", &bucket, e))?;
            }
        } else {
            buckets::delete_bucket(js, &bucket).await?;
        }
    }
    Ok(())
}

/// What [`write_generation`] wrote, from the folds it was given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Events folded.
    pub events: u64,
    /// Tasks written.
    pub tasks: u64,
    /// Events of unknown kinds skipped.
    pub unknown: u64,
    /// Messages that were not events.
    pub undecodable: u64,
}

/// Writes awaiting their acknowledgements at once, per writing task.
const WRITE_WINDOW: usize = 4096;

/// How long a write's acknowledgement may take before the rebuild gives up (as the client's own).
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes the folded views (one fold per partition, disjoint tasks) into the empty, unread buckets of
/// a new generation.
///
/// Nobody reads a generation before the pointer names it, so no write waits for another: each
/// partition's views are encoded and sent from their own task, [`WRITE_WINDOW`] at a time. Every
/// write is still acknowledged and checked, but the acknowledgements of one task all come to one
/// reply subject and are counted there (a JetStream publish through the client would create a reply
/// subject, a reply slot and a decoded acknowledgement per write). Writes are create-only, so a
/// half-built generation left by a failed run, or a concurrent writer, is refused rather than mixed
/// in. The finished index is written from one task in the order tasks ended, so its stream lists them
/// in that order.
pub async fn write_generation(
    js: &jetstream::Context,
    target: &ViewBuckets,
    mut parts: Vec<FoldedStream>,
    progress: &mut impl FnMut(Progress),
) -> Result<Written, RebuildError> {
    let mut written = Written::default();
    let mut finished: Vec<FinishedView> = Vec::new();
    for part in &mut parts {
        written.events += part.events;
        written.unknown += part.unknown;
        written.undecodable += part.undecodable.len() as u64;
        written.tasks += part.tasks.len() as u64;
        finished.extend(part.tasks.values_mut().filter_map(|f| f.finished.take()));
    }
    finished.sort_by_key(|f| f.seq);
    let total = written.tasks;
    let subjects = Subjects::of(target);
    let client = js.client();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut senders = tokio::task::JoinSet::new();
    for part in parts {
        let (client, subjects, done) = (client.clone(), subjects.clone(), done.clone());
        senders.spawn(async move {
            let mut out = Sender::new(client).await?;
            for f in part.tasks.values() {
                out.views(&subjects, f).await?;
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            out.finish().await
        });
    }
    senders.spawn(async move {
        let mut out = Sender::new(client).await?;
        for f in &finished {
            out.send(&subjects.finished, f.task, f).await?;
        }
        out.finish().await
    });
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            joined = senders.join_next() => match joined {
                Some(result) => result.map_err(RebuildError::Worker)??,
                None => break,
            },
            _ = tick.tick() => progress(Progress {
                phase: Phase::Write,
                done: done.load(std::sync::atomic::Ordering::Relaxed),
                total,
            }),
        }
    }
    progress(Progress {
        phase: Phase::Write,
        done: total,
        total,
    });
    Ok(written)
}

/// The subject prefixes of a generation's buckets (`$KV.<bucket>.`).
#[derive(Clone, Debug)]
struct Subjects {
    tasks: String,
    history: String,
    active: String,
    finished: String,
}

impl Subjects {
    fn of(target: &ViewBuckets) -> Self {
        let prefix = |b: &kv::Store| format!("$KV.{}.", b.name);
        Self {
            tasks: prefix(&target.tasks),
            history: prefix(&target.history),
            active: prefix(&target.active),
            finished: prefix(&target.finished),
        }
    }
}

/// Sends create-only writes on one connection, encoding into one reused buffer, with their
/// acknowledgements coming to one reply subject of its own.
struct Sender {
    client: async_nats::Client,
    buffer: bytes::BytesMut,
    create_only: HeaderMap,
    reply: async_nats::Subject,
    acks: async_nats::Subscriber,
    /// Writes sent whose acknowledgement has not come yet.
    outstanding: usize,
}

impl Sender {
    async fn new(client: async_nats::Client) -> Result<Self, RebuildError> {
        let mut create_only = HeaderMap::new();
        create_only.insert(HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
        let reply = async_nats::Subject::from(client.new_inbox());
        let acks = client
            .subscribe(reply.clone())
            .await
            .map_err(|e| BucketError::js("subscribe", reply.as_str(), e))?;
        Ok(Self {
            client,
            buffer: bytes::BytesMut::with_capacity(64 * 1024),
            create_only,
            reply,
            acks,
            outstanding: 0,
        })
    }

    /// One task's views: history, the active entry while live, then the task view.
    async fn views(&mut self, subjects: &Subjects, f: &Folded) -> Result<(), RebuildError> {
        self.send(&subjects.history, f.view.task, &f.history)
            .await?;
        if let Some(active) = f.active() {
            self.send(&subjects.active, f.view.task, &active).await?;
        }
        self.send(&subjects.tasks, f.view.task, &f.view).await
    }

    /// A create of `task`'s key under `prefix`; waits for the oldest acknowledgements first when
    /// the window is full.
    async fn send<T: Serialize>(
        &mut self,
        prefix: &str,
        task: TaskId,
        value: &T,
    ) -> Result<(), RebuildError> {
        while self.outstanding >= WRITE_WINDOW {
            self.ack().await?;
        }
        self.buffer.clear();
        if self.buffer.capacity() < 4096 {
            self.buffer.reserve(64 * 1024);
        }
        serde_json::to_writer(bytes::BufMut::writer(&mut self.buffer), value)
            .map_err(|e| unencodable(&task.to_string(), e))?;
        let bytes = self.buffer.split().freeze();
        let subject = format!("{prefix}{task}");
        self.client
            .publish_with_reply_and_headers(
                subject.clone(),
                self.reply.clone(),
                self.create_only.clone(),
                bytes,
            )
            .await
            .map_err(|e| BucketError::js("write", subject, e))?;
        self.outstanding += 1;
        Ok(())
    }

    /// Takes one acknowledgement; a refusal (the key existed, the bucket is gone) is the error.
    async fn ack(&mut self) -> Result<(), RebuildError> {
        let reply = tokio::time::timeout(ACK_TIMEOUT, self.acks.next())
            .await
            .map_err(|_| RebuildError::Refused {
                reason: format!(
                    "no acknowledgement for {ACK_TIMEOUT:?} ({} writes outstanding)",
                    self.outstanding
                ),
            })?
            .ok_or_else(|| RebuildError::Refused {
                reason: "the connection closed before every write was acknowledged".into(),
            })?;
        self.outstanding = self.outstanding.saturating_sub(1);
        if let Some(status) = reply.status {
            return Err(RebuildError::Refused {
                reason: format!("status {status}: the bucket's stream does not answer"),
            });
        }
        // `{"stream":..,"seq":..}` when stored, `{"error":{..},..}` when refused.
        if reply.payload.windows(7).any(|w| w == b"\"error\"") {
            return Err(RebuildError::Refused {
                reason: String::from_utf8_lossy(&reply.payload).into_owned(),
            });
        }
        Ok(())
    }

    /// Waits for every outstanding acknowledgement.
    async fn finish(mut self) -> Result<(), RebuildError> {
        while self.outstanding > 0 {
            self.ack().await?;
        }
        Ok(())
    }
}

fn unencodable(key: &str, source: serde_json::Error) -> BucketError {
    BucketError::Encode {
        key: key.to_owned(),
        source,
    }
}

/// One way the live views differ from a fresh fold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// The task.
    pub task: String,
    /// Which view (`tasks`, `history`, `active`, `finished`).
    pub bucket: &'static str,
    /// The field path (`.` for the whole value).
    pub field: String,
    /// What the live view holds (`absent` when missing).
    pub live: String,
    /// What a fresh fold gives.
    pub fresh: String,
}

/// What verify found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct VerifyReport {
    /// The generation compared.
    pub generation: u32,
    /// Tasks compared.
    pub tasks: u64,
    /// Events folded.
    pub events: u64,
    /// Every difference.
    pub differences: Vec<Difference>,
}

/// Compares the current generation's views with a fresh fold of the stream. Waits up to `settle` for the
/// projector to reach the stream's end first, and folds tasks that moved on during the comparison up to
/// the live view's sequence, so a busy system does not report phantom differences.
pub async fn verify(
    js: &jetstream::Context,
    names: &Names,
    settle: Duration,
    mut progress: impl FnMut(Progress),
) -> Result<VerifyReport, RebuildError> {
    let views = buckets::Views::open(js, names, BucketSettings::default()).await?;
    let mut events = js
        .get_stream(names.event_stream())
        .await
        .map_err(|e| RebuildError::Stream(e.into()))?;
    let upto = events
        .info()
        .await
        .map_err(|e| RebuildError::Stream(e.into()))?
        .state
        .last_sequence;
    projector::wait_for_sequence(js, names, upto, settle).await?;
    let folded = fold_stream(&events, names, upto, &mut progress).await?;
    let b = views.buckets();
    let mut report = VerifyReport {
        generation: views.generation(),
        tasks: folded.tasks.len() as u64,
        events: folded.events,
        differences: Vec::new(),
    };
    let total = folded.tasks.len() as u64;
    let mut done = 0u64;
    // One task's comparison is a handful of reads; run many at once.
    let events_ref = &events;
    let mut checks = futures::stream::iter(folded.tasks.iter().map(|(task, fresh)| async move {
        let mut fresh = fresh.clone();
        let mut out = VerifyReport::default();
        let key = task.to_string();
        let live: Option<TaskView> = buckets::get(&b.tasks, &key).await?;
        if let Some(live) = &live
            && live.seq > fresh.view.seq
        {
            // The task moved on while we compared: fold its newer events too.
            for e in log::read_task(events_ref, names, *task, fresh.view.seq + 1, live.seq)
                .await
                .map_err(|e| RebuildError::Stream(e.into()))?
                .into_iter()
                .flatten()
            {
                fresh.apply(&e);
            }
        }
        compare(&mut out, &key, "tasks", live.as_ref(), Some(&fresh.view));
        let history: Option<HistoryView> = buckets::get(&b.history, &key).await?;
        compare(
            &mut out,
            &key,
            "history",
            history.as_ref(),
            Some(&fresh.history),
        );
        let active: Option<ActiveView> = buckets::get(&b.active, &key).await?;
        compare(
            &mut out,
            &key,
            "active",
            active.as_ref(),
            fresh.active().as_ref(),
        );
        let finished: Option<FinishedView> = buckets::get(&b.finished, &key).await?;
        compare(
            &mut out,
            &key,
            "finished",
            finished.as_ref(),
            fresh.finished.as_ref(),
        );
        Ok::<_, RebuildError>(out.differences)
    }))
    .buffer_unordered(64);
    while let Some(differences) = checks.next().await {
        report.differences.extend(differences?);
        done += 1;
        if done.is_multiple_of(1024) {
            progress(Progress {
                phase: Phase::Compare,
                done,
                total,
            });
        }
    }
    drop(checks);
    // Views of tasks the log does not have.
    for (bucket, store) in [
        ("tasks", &b.tasks),
        ("history", &b.history),
        ("active", &b.active),
        ("finished", &b.finished),
    ] {
        for key in buckets::all_keys(store).await? {
            let known = key
                .parse::<TaskId>()
                .is_ok_and(|t| folded.tasks.contains_key(&t));
            if !known {
                report.differences.push(Difference {
                    task: key,
                    bucket,
                    field: ".".into(),
                    live: "present".into(),
                    fresh: "absent (no events)".into(),
                });
            }
        }
    }
    let _ = events.info().await;
    progress(Progress {
        phase: Phase::Compare,
        done: total,
        total,
    });
    report
        .differences
        .sort_by(|a, b| (&a.task, a.bucket, &a.field).cmp(&(&b.task, b.bucket, &b.field)));
    Ok(report)
}

fn compare<T: Serialize>(
    report: &mut VerifyReport,
    task: &str,
    bucket: &'static str,
    live: Option<&T>,
    fresh: Option<&T>,
) {
    let to_value = |v: Option<&T>| v.and_then(|v| serde_json::to_value(v).ok());
    let (live, fresh) = (to_value(live), to_value(fresh));
    let mut out = Vec::new();
    diff_json(".", live.as_ref(), fresh.as_ref(), &mut out);
    for (field, live, fresh) in out {
        report.differences.push(Difference {
            task: task.to_owned(),
            bucket,
            field,
            live,
            fresh,
        });
    }
}

/// Field-by-field differences between two JSON values.
pub fn diff_json(
    path: &str,
    a: Option<&serde_json::Value>,
    b: Option<&serde_json::Value>,
    out: &mut Vec<(String, String, String)>,
) {
    use serde_json::Value;
    let show = |v: Option<&Value>| v.map_or_else(|| "absent".to_owned(), Value::to_string);
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if path == "." {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff_json(&sub, x.get(k), y.get(k), out);
            }
        }
        (Some(Value::Array(x)), Some(Value::Array(y))) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff_json(&format!("{path}[{i}]"), Some(p), Some(q), out);
            }
        }
        (a, b) if a != b => out.push((path.to_owned(), show(a), show(b))),
        _ => {}
    }
}
