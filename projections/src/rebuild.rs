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

/// Folds the event stream up to `upto` (inclusive) in memory.
pub async fn fold_stream(
    events: &Stream,
    names: &Names,
    upto: u64,
    mut progress: impl FnMut(Progress),
) -> Result<FoldedStream, RebuildError> {
    let mut out = FoldedStream::default();
    if upto == 0 {
        return Ok(out);
    }
    let mut messages = log::ordered(events, names, None, log::Start::First)
        .await
        .map_err(|e| RebuildError::Stream(e.into()))?;
    let mut seen = 0u64;
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| RebuildError::Stream(e.into()))?;
        let Ok(info) = m.info() else { continue };
        let seq = info.stream_sequence;
        if seq > upto {
            break;
        }
        seen += 1;
        out.last_seq = seq;
        match log::decode(
            names,
            m.subject.as_str(),
            seq,
            m.headers.as_ref(),
            &m.payload,
            log::to_chrono(info.published.unix_timestamp_nanos()),
        ) {
            Ok(e) => {
                out.events += 1;
                if e.is_unknown() {
                    out.unknown += 1;
                }
                out.tasks
                    .entry(e.task())
                    .or_insert_with(|| Folded::new(e.task()))
                    .apply(&e);
            }
            Err(e) => out.undecodable.push(e),
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
    progress(Progress {
        phase: Phase::Fold,
        done: upto,
        total: upto,
    });
    Ok(out)
}

/// How a rebuild runs.
#[derive(Clone, Debug)]
pub struct RebuildConfig {
    /// The projector settings used for the catch-up (names, bucket settings, batch sizes).
    pub projector: ProjectorConfig,
    /// Writes awaiting their acks at once while writing the new generation (they are pipelined on one
    /// connection; see `write_generation`).
    pub write_concurrency: usize,
}

impl Default for RebuildConfig {
    fn default() -> Self {
        Self {
            projector: ProjectorConfig::default(),
            write_concurrency: 4096,
        }
    }
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
    let meta = buckets::ensure_bucket(js, &buckets::meta_bucket(names), settings).await?;
    let (pointer, pointer_rev) = buckets::read_pointer(&meta).await?;
    let from = pointer.generation;
    let generation = from + 1;

    // Generations older than the current one are unused; so is a half-built one from a failed run.
    for old in 1..from {
        delete_generation(js, names, old).await?;
    }
    delete_generation(js, names, generation).await?;

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
    let folded = fold_stream(&events, names, upto, &mut progress).await?;
    let fold_secs = started.elapsed().as_secs_f64();

    let target = ViewBuckets::open(js, names, generation, settings, true).await?;
    let write_started = Instant::now();
    write_generation(
        js,
        &target,
        &folded,
        config.write_concurrency,
        &mut progress,
    )
    .await?;
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
        events: folded.events,
        tasks: folded.tasks.len() as u64,
        unknown: folded.unknown,
        undecodable: folded.undecodable.len() as u64,
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

/// Writes the folded views into the (empty, unread) buckets of the new generation, every write
/// pipelined: nobody reads a generation before the pointer names it, so there is no order to keep
/// between a task's buckets and no reason to wait for one write before sending the next. `window`
/// writes are awaiting their acks at any time. Writes are create-only, so a half-built generation left
/// by a failed run is refused rather than silently mixed (rebuild deletes it first).
async fn write_generation(
    js: &jetstream::Context,
    target: &ViewBuckets,
    folded: &FoldedStream,
    window: usize,
    progress: &mut impl FnMut(Progress),
) -> Result<(), RebuildError> {
    let total = folded.tasks.len() as u64;
    let mut writes = Pipeline::new(js, window);
    for (done, f) in folded.tasks.values().enumerate() {
        let key = f.view.task.to_string();
        writes.create(&target.history, &key, &f.history).await?;
        if let Some(active) = f.active() {
            writes.create(&target.active, &key, &active).await?;
        }
        writes.create(&target.tasks, &key, &f.view).await?;
        if (done as u64 + 1).is_multiple_of(1024) {
            progress(Progress {
                phase: Phase::Write,
                done: done as u64 + 1,
                total,
            });
        }
    }
    // The finished index in the order tasks ended: one connection keeps the publishes in that order.
    let mut finished: Vec<&FinishedView> = folded
        .tasks
        .values()
        .filter_map(|f| f.finished.as_ref())
        .collect();
    finished.sort_by_key(|f| f.seq);
    for f in finished {
        writes
            .create(&target.finished, &f.task.to_string(), f)
            .await?;
    }
    writes.finish().await?;
    progress(Progress {
        phase: Phase::Write,
        done: total,
        total,
    });
    Ok(())
}

/// Create-only KV writes with up to `window` acks outstanding.
struct Pipeline<'a> {
    js: &'a jetstream::Context,
    window: usize,
    acks: std::collections::VecDeque<(String, jetstream::context::PublishAckFuture)>,
}

impl<'a> Pipeline<'a> {
    fn new(js: &'a jetstream::Context, window: usize) -> Self {
        Self {
            js,
            window: window.max(1),
            acks: std::collections::VecDeque::new(),
        }
    }

    /// Sends a create of `key` in `bucket` (failing if the key exists), waiting for the oldest ack
    /// first when the window is full.
    async fn create<T: Serialize>(
        &mut self,
        bucket: &kv::Store,
        key: &str,
        value: &T,
    ) -> Result<(), RebuildError> {
        if self.acks.len() >= self.window {
            self.next().await?;
        }
        let bytes = view::encode(value).map_err(|e| unencodable(key, e))?;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        let name = format!("{}/{key}", bucket.name);
        let ack = self
            .js
            .publish_with_headers(format!("$KV.{}.{key}", bucket.name), headers, bytes)
            .await
            .map_err(|e| BucketError::js("write", &name, e))?;
        self.acks.push_back((name, ack));
        Ok(())
    }

    async fn next(&mut self) -> Result<(), RebuildError> {
        if let Some((name, ack)) = self.acks.pop_front() {
            ack.await.map_err(|e| BucketError::js("write", name, e))?;
        }
        Ok(())
    }

    /// Waits for every outstanding ack.
    async fn finish(mut self) -> Result<(), RebuildError> {
        while !self.acks.is_empty() {
            self.next().await?;
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
