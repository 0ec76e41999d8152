//! The projector: a durable pull consumer on the event stream (one per view generation) whose batches are
//! folded into the current generation's buckets by the guarded [`Writer`]. Messages are acked only after
//! their views are written, so a projector killed at any moment resumes from the consumer's ack floor and
//! re-delivered events are no-ops. Several projectors may share the consumer (engine replicas). Its pull
//! requests start over at the first sign that a NATS node loss took them ([`crate::pull`]), as the
//! engine's intake and executor do.
//!
//! The projector follows the generation pointer: when a rebuild switches readers to a new generation, it
//! moves to that generation's consumer, which the rebuild created starting right after what it folded.
//!
//! [`lag`] and [`wait_for_sequence`] read the consumer's ack floor: everything at or below it is in the
//! views, whichever projector applied it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    kv,
    stream::Stream,
};
use chrono::Utc;
use futures::{FutureExt, StreamExt};
use taskpods_events::Names;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::apply::{ApplyError, Writer};
use crate::buckets::{self, BucketError, BucketSettings, ViewBuckets};
use crate::log::{self, StoredEvent};
use crate::pull::{DurableMessages, PullRequests};

/// How long a batch waits for more of the events the server says are pending.
const GATHER: Duration = Duration::from_millis(5);

/// Errors that stop a projector or a lag query.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    /// A bucket could not be opened or read.
    #[error(transparent)]
    Bucket(#[from] BucketError),
    /// Applying a batch failed in a way retrying did not fix.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The event stream or its consumer could not be reached.
    #[error("event stream {operation}: {message}")]
    Stream {
        /// What we were doing.
        operation: &'static str,
        /// The client's error.
        message: String,
    },
}

fn stream_error(operation: &'static str, e: impl ToString) -> ProjectorError {
    ProjectorError::Stream {
        operation,
        message: e.to_string(),
    }
}

/// How a projector runs.
#[derive(Clone, Debug)]
pub struct ProjectorConfig {
    /// Subject prefix (stream, bucket and consumer names derive from it).
    pub names: Names,
    /// How new buckets are stored.
    pub buckets: BucketSettings,
    /// Most events taken from the consumer and applied together.
    pub batch: usize,
    /// Tasks written concurrently within a batch (throughput comes from writes in flight).
    pub concurrency: usize,
    /// Most unacked events outstanding on the consumer (across all projectors sharing it).
    pub max_ack_pending: i64,
    /// How long the server waits for an ack before re-delivering (a crashed projector's batch).
    pub ack_wait: Duration,
    /// Tasks whose views are cached between batches (saves a read per task and batch).
    pub cache_tasks: usize,
    /// When `true`, return once the consumer has nothing pending (rebuild catch-up, tests, benches)
    /// instead of running until shutdown.
    pub stop_when_caught_up: bool,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            names: Names::default(),
            buckets: BucketSettings::default(),
            batch: 512,
            concurrency: 128,
            max_ack_pending: 8192,
            ack_wait: Duration::from_secs(30),
            cache_tasks: 100_000,
            stop_when_caught_up: false,
        }
    }
}

/// Counters a running projector updates (shared, so the engine's metrics and tests can read them).
#[derive(Debug, Default)]
pub struct ProjectorStats {
    /// Events folded into views.
    pub applied: AtomicU64,
    /// Events that were already in the views (re-deliveries).
    pub skipped: AtomicU64,
    /// Events of unknown kinds, skipped with a warning.
    pub unknown: AtomicU64,
    /// Messages that are not events (undecodable), skipped with a warning.
    pub undecodable: AtomicU64,
    /// Events read from the stream to fill a gap.
    pub healed: AtomicU64,
    /// Revision conflicts with other writers.
    pub conflicts: AtomicU64,
    /// Heal reads repeated because they came back short (a lagging stream replica).
    pub heal_retries: AtomicU64,
    /// Events missing from the stream that the views were folded past (a real gap).
    pub gaps: AtomicU64,
    /// Batches applied.
    pub batches: AtomicU64,
    /// Highest stream sequence applied by this projector.
    pub last_seq: AtomicU64,
    /// The generation being written.
    pub generation: AtomicU64,
    /// Tasks whose views the writer caches now (live tasks only: a finished task's are dropped).
    pub cached_tasks: AtomicU64,
}

impl ProjectorStats {
    /// Events this projector has taken from the consumer (applied, skipped, unknown, undecodable).
    pub fn seen(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
            + self.skipped.load(Ordering::Relaxed)
            + self.unknown.load(Ordering::Relaxed)
            + self.undecodable.load(Ordering::Relaxed)
    }
}

/// The durable consumer feeding `generation`, starting at `start` when it is new.
fn consumer_config(config: &ProjectorConfig, generation: u32, start: u64) -> pull::Config {
    let name = buckets::consumer_name(&config.names, generation);
    let deliver_policy = if start <= 1 {
        DeliverPolicy::All
    } else {
        DeliverPolicy::ByStartSequence {
            start_sequence: start,
        }
    };
    pull::Config {
        durable_name: Some(name),
        description: Some(format!("taskpods projector, view generation {generation}")),
        // No filter: the stream holds only task events, and on nats-server 2.9 a filtered consumer
        // over many subjects makes every consumer-info (pending count) and delivery scan per-subject
        // state; the projector ran 10x slower with 20k tasks.
        ack_policy: AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        max_ack_pending: config.max_ack_pending,
        deliver_policy,
        ..Default::default()
    }
}

/// Creates (or opens) the durable consumer feeding `generation`, starting at `start` when it is new.
pub async fn ensure_consumer(
    events: &Stream,
    config: &ProjectorConfig,
    generation: u32,
    start: u64,
) -> Result<PullConsumer, ProjectorError> {
    let consumer = consumer_config(config, generation, start);
    let name = consumer.durable_name.clone().unwrap_or_default();
    events
        .get_or_create_consumer(&name, consumer)
        .await
        .map_err(|e| stream_error("create consumer", e))
}

/// Runs a projector until `shutdown` is cancelled (or, with `stop_when_caught_up`, until nothing is
/// pending). Transient failures are retried with a back-off; the error is returned only for what
/// retrying cannot fix at start-up (no event stream).
pub async fn run(
    js: jetstream::Context,
    config: ProjectorConfig,
    stats: Arc<ProjectorStats>,
    shutdown: CancellationToken,
) -> Result<(), ProjectorError> {
    let events = js
        .get_stream(config.names.event_stream())
        .await
        .map_err(|e| stream_error("open", e))?;
    let meta =
        buckets::ensure_bucket(&js, &buckets::meta_bucket(&config.names), config.buckets).await?;
    let mut delay = Duration::from_millis(100);
    loop {
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            outcome = run_generation(&js, &events, &meta, &config, &stats) => outcome,
        };
        match outcome {
            Ok(Next::Done) => return Ok(()),
            Ok(Next::Switch) => delay = Duration::from_millis(100),
            Err(e) => {
                warn!(error = %e, "projector failed; retrying in {delay:?}");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

enum Next {
    /// Caught up (with `stop_when_caught_up`).
    Done,
    /// The pointer moved; start over with the new generation.
    Switch,
}

async fn run_generation(
    js: &jetstream::Context,
    events: &Stream,
    meta: &kv::Store,
    config: &ProjectorConfig,
    stats: &ProjectorStats,
) -> Result<Next, ProjectorError> {
    // Watch before reading, so a switch between the two is not missed.
    let mut pointer_watch = meta
        .watch(buckets::POINTER_KEY)
        .await
        .map_err(|e| BucketError::js("watch pointer", buckets::POINTER_KEY, e))?;
    let (pointer, _) = buckets::read_pointer(meta).await?;
    let generation = pointer.generation;
    let view_buckets =
        ViewBuckets::open(js, &config.names, generation, config.buckets, true).await?;
    let consumer = ensure_consumer(events, config, generation, 1).await?;
    let messages = pull_messages(events, config, generation, 1).await?;
    stats
        .generation
        .store(u64::from(generation), Ordering::Relaxed);
    let writer = Writer::new(
        js.clone(),
        config.names.clone(),
        events.clone(),
        view_buckets,
        config.cache_tasks,
    );
    info!(generation, "projector running");
    drain(
        &consumer,
        messages,
        &writer,
        config,
        stats,
        Some(&mut pointer_watch),
        generation,
    )
    .await
}

/// The consumer's messages, in pull requests of a batch each, started over with fresh pull requests
/// when a NATS node loss takes the outstanding ones (see [`DurableMessages`]).
async fn pull_messages(
    events: &Stream,
    config: &ProjectorConfig,
    generation: u32,
    start: u64,
) -> Result<DurableMessages, ProjectorError> {
    DurableMessages::open_with(
        events,
        consumer_config(config, generation, start),
        PullRequests {
            batch: config.batch,
            heartbeat: Duration::from_secs(2),
            expires: Duration::from_secs(5),
        },
        "projector",
    )
    .await
    .map_err(|e| stream_error("consume", e))
}

/// Takes batches from `messages` into `writer` until the pointer leaves `generation`, or (with
/// `stop_when_caught_up`) until nothing is pending on `consumer`.
async fn drain(
    consumer: &PullConsumer,
    mut pulled: DurableMessages,
    writer: &Writer,
    config: &ProjectorConfig,
    stats: &ProjectorStats,
    mut pointer_watch: Option<&mut kv::Watch>,
    generation: u32,
) -> Result<Next, ProjectorError> {
    let names = &config.names;
    let mut idle = tokio::time::interval(Duration::from_millis(200));
    idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // What the last delivered message said was left; only when nothing is left is it worth asking the
    // server whether re-deliveries are still outstanding.
    let mut last_pending = u64::MAX;
    let mut last_message = std::time::Instant::now();
    loop {
        let first = tokio::select! {
            first = pulled.next() => first,
            changed = next_pointer(&mut pointer_watch) => {
                if changed != generation {
                    info!(from = generation, to = changed, "views switched generation; following");
                    return Ok(Next::Switch);
                }
                continue;
            }
            _ = idle.tick(), if config.stop_when_caught_up => {
                // Asking the server costs a request; only ask when the last message said nothing was
                // left, or when nothing has come for a while (another projector took the rest).
                if last_pending != 0
                    && last_pending != u64::MAX
                    && last_message.elapsed() < Duration::from_secs(1)
                {
                    continue;
                }
                let mut c = consumer.clone();
                let info = c.info().await.map_err(|e| stream_error("consumer info", e))?;
                if info.num_pending == 0 && info.num_ack_pending == 0 {
                    return Ok(Next::Done);
                }
                continue;
            }
        };
        let mut messages = Vec::with_capacity(config.batch);
        messages.push(first);
        // Fuller batches mean fewer round trips per event: take what has arrived, and wait for more
        // only while the server says more is pending, and only briefly (a live projector that keeps
        // up adds no latency).
        let gather_until = tokio::time::Instant::now() + GATHER;
        while messages.len() < config.batch {
            if let Some(m) = pulled.next().now_or_never() {
                messages.push(m);
                continue;
            }
            let pending = messages
                .last()
                .and_then(|m| m.info().ok())
                .map_or(0, |i| i.pending);
            if pending == 0 {
                break;
            }
            match tokio::time::timeout_at(gather_until, pulled.next()).await {
                Ok(m) => messages.push(m),
                Err(_) => break,
            }
        }
        let mut batch = Vec::with_capacity(messages.len());
        for m in &messages {
            let Ok(info) = m.info() else {
                continue;
            };
            let seq = info.stream_sequence;
            last_pending = info.pending;
            last_message = std::time::Instant::now();
            match log::decode(
                names,
                m.subject.as_str(),
                seq,
                m.headers.as_ref(),
                &m.payload,
                log::to_chrono(info.published.unix_timestamp_nanos()),
            ) {
                Ok(e) => batch.push(e),
                Err(e) => {
                    stats.undecodable.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, "skipping a message that is not a task event");
                }
            }
        }
        let last = batch
            .iter()
            .map(|e: &StoredEvent| e.sequence)
            .max()
            .unwrap_or(0);
        let applied = writer.apply_batch(batch, config.concurrency).await?;
        // Ack only now: the views hold every event of the batch.
        let acks = messages.iter().map(|m| m.ack());
        for r in futures::future::join_all(acks).await {
            if let Err(e) = r {
                warn!(error = %e, "ack failed; the event will be re-delivered and skipped");
            }
        }
        stats.applied.fetch_add(applied.applied, Ordering::Relaxed);
        stats.skipped.fetch_add(applied.skipped, Ordering::Relaxed);
        stats.unknown.fetch_add(applied.unknown, Ordering::Relaxed);
        stats.healed.fetch_add(applied.healed, Ordering::Relaxed);
        stats
            .conflicts
            .fetch_add(applied.conflicts, Ordering::Relaxed);
        stats
            .heal_retries
            .fetch_add(applied.heal_retries, Ordering::Relaxed);
        stats.gaps.fetch_add(applied.gaps, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .cached_tasks
            .store(writer.cached_tasks() as u64, Ordering::Relaxed);
        stats.last_seq.fetch_max(last, Ordering::Relaxed);
    }
}

/// The generation the pointer names after its next change (pending forever without a watch).
async fn next_pointer(watch: &mut Option<&mut kv::Watch>) -> u32 {
    let Some(watch) = watch else {
        return std::future::pending().await;
    };
    loop {
        match watch.next().await {
            Some(Ok(entry)) if entry.operation == kv::Operation::Put => {
                if let Ok(p) = crate::view::decode::<buckets::Pointer>(&entry.value) {
                    return p.generation;
                }
            }
            Some(_) => {}
            None => return std::future::pending().await,
        }
    }
}

/// Runs the consumer of `generation` into `buckets` until nothing is pending (rebuild catch-up).
pub async fn catch_up(
    js: &jetstream::Context,
    events: &Stream,
    config: &ProjectorConfig,
    view_buckets: ViewBuckets,
    start: u64,
    stats: &ProjectorStats,
) -> Result<(), ProjectorError> {
    let generation = view_buckets.generation;
    let consumer = ensure_consumer(events, config, generation, start).await?;
    let messages = pull_messages(events, config, generation, start).await?;
    let writer = Writer::new(
        js.clone(),
        config.names.clone(),
        events.clone(),
        view_buckets,
        config.cache_tasks,
    );
    let config = ProjectorConfig {
        stop_when_caught_up: true,
        ..config.clone()
    };
    drain(
        &consumer, messages, &writer, &config, stats, None, generation,
    )
    .await?;
    Ok(())
}

/// How far the views are behind the event stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Lag {
    /// The generation readers see.
    pub generation: u32,
    /// Every event at or below this stream sequence is in the views (the consumer's ack floor).
    pub applied_seq: u64,
    /// The stream's last sequence.
    pub stream_seq: u64,
    /// Events not yet in the views.
    pub events_behind: u64,
    /// How long ago the oldest event not yet in the views was stored (0 when caught up).
    pub seconds_behind: f64,
}

/// The projector's lag, from the current generation's consumer.
pub async fn lag(js: &jetstream::Context, names: &Names) -> Result<Lag, ProjectorError> {
    let meta = buckets::open_bucket(js, &buckets::meta_bucket(names)).await;
    let pointer = match meta {
        Ok(meta) => buckets::read_pointer(&meta).await?.0,
        Err(_) => buckets::Pointer::default(),
    };
    let generation = pointer.generation;
    let mut events = js
        .get_stream(names.event_stream())
        .await
        .map_err(|e| stream_error("open", e))?;
    let stream_seq = events
        .info()
        .await
        .map_err(|e| stream_error("info", e))?
        .state
        .last_sequence;
    let name = buckets::consumer_name(names, generation);
    // The stream was read first: if the consumer then has nothing pending or unacked, everything up to
    // that sequence is in the views. A rebuilt generation's consumer starts after what the rebuild
    // folded, and reports an ack floor of 0 until it has acked something; the pointer says what it
    // covered.
    let applied_seq = match events.get_consumer::<pull::Config>(&name).await {
        Ok(consumer) => {
            let info = consumer.cached_info();
            let mut applied = info.ack_floor.stream_sequence.max(pointer.covered_seq);
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                applied = applied.max(stream_seq);
            }
            applied
        }
        // No projector has ever run: nothing is in the views.
        Err(_) => 0,
    };
    let events_behind = stream_seq.saturating_sub(applied_seq);
    let seconds_behind = if events_behind == 0 {
        0.0
    } else {
        match events.direct_get(applied_seq + 1).await {
            Ok(m) => {
                let stored = log::to_chrono(m.time.unix_timestamp_nanos());
                ((Utc::now() - stored).num_milliseconds().max(0) as f64) / 1000.0
            }
            Err(_) => 0.0,
        }
    };
    Ok(Lag {
        generation,
        applied_seq,
        stream_seq,
        events_behind,
        seconds_behind,
    })
}

/// Waits until the views hold every event up to stream sequence `seq` (read-your-writes for callers
/// that appended at `seq`). Returns the lag when reached, or `None` after `timeout`.
pub async fn wait_for_sequence(
    js: &jetstream::Context,
    names: &Names,
    seq: u64,
    timeout: Duration,
) -> Result<Option<Lag>, ProjectorError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(2);
    loop {
        let lag = lag(js, names).await?;
        if lag.applied_seq >= seq {
            return Ok(Some(lag));
        }
        if tokio::time::Instant::now() + delay > deadline {
            return Ok(None);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}
