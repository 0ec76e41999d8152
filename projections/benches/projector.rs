//! Projector benchmark against a real nats-server (`cargo bench -p taskpods-projections --bench projector`).
//!
//! Prints, from one run on one server: the raw rate of reading the event stream with an ordered consumer,
//! the projector's throughput folding the same stream from sequence 1, the rebuild rate, and the
//! projection lag (p50/p99) at steady offered loads, with the ratios to the raw read and a summary line.
//! After the projector it prints design bounds: the same server operations with no projector logic (a
//! durable consumer read with an ack per event; the guarded KV writes the projector must make for this
//! stream, pipelined: one write per bucket per event, one per bucket per task, and the same two for a
//! single value per task, the layout not taken).
//! Sizes: `BENCH_TASKS` (default 20000 tasks, about six events each), `BENCH_RATES` (events/s offered in
//! the lag runs, default `1000,3000,7000`; 7000 is about 1,000 lifecycles/s), `BENCH_LAG_SECS` (default 5).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, kv};
use chrono::Utc;
use futures::StreamExt;
use taskpods_events::{Names, TaskId};
use taskpods_harness::NatsServer;
use taskpods_harness::measure::{self, Latencies};
use taskpods_projections::buckets::ensure_bucket;
use taskpods_projections::generate::{self, Rng};
use taskpods_projections::rebuild::{self, RebuildConfig};
use taskpods_projections::view::encode;
use taskpods_projections::{Folded, ProjectorConfig, ProjectorStats, TaskView, Views, projector};
use tokio_util::sync::CancellationToken;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ensure_topology_streams() -> Vec<jetstream::stream::Config> {
    // The topology lives in the engine crate (which depends on this one); the bench only needs the event
    // stream and generation 1's buckets, which the projector creates itself.
    let names = Names::default();
    vec![jetstream::stream::Config {
        name: names.event_stream(),
        subjects: vec![names.events_all()],
        allow_direct: true,
        ..Default::default()
    }]
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; anything else (e.g. a filter) is ignored.
    let tasks = env("BENCH_TASKS", 20_000);
    let rates: Vec<u64> = std::env::var("BENCH_RATES")
        .ok()
        .map(|v| v.split(',').filter_map(|r| r.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 3_000, 7_000]);
    let lag_secs = env("BENCH_LAG_SECS", 5);
    let server = NatsServer::start();
    let js = jetstream::new(server.connect().await);
    for config in ensure_topology_streams() {
        js.create_stream(config).await.expect("event stream");
    }
    let names = Names::default();
    println!("{}; {tasks} random task histories", measure::machine_line());

    let histories = generate::histories(1, tasks, Utc::now(), 10);
    let events = generate::interleave(&mut Rng::new(2), &histories);
    let started = Instant::now();
    let last = generate::publish(&js, &names, &events, 256)
        .await
        .expect("publish");
    let n = events.len() as f64;
    println!(
        "publish (256 in flight):             {:>9} events in {:>6.2} s = {:>9.0} events/s",
        events.len(),
        started.elapsed().as_secs_f64(),
        n / started.elapsed().as_secs_f64()
    );

    // Raw: the same stream through an ordered consumer, nothing done per message.
    let stream = js.get_stream(names.event_stream()).await.expect("stream");
    let started = Instant::now();
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: names.events_all(),
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut read = 0u64;
    while let Some(m) = messages.next().await {
        let m = m.expect("message");
        read += 1;
        if m.info().expect("info").stream_sequence >= last {
            break;
        }
    }
    let raw_secs = started.elapsed().as_secs_f64();
    let raw = read as f64 / raw_secs;
    println!(
        "raw ordered-consumer read:           {read:>9} events in {raw_secs:>6.2} s = {raw:>9.0} events/s"
    );

    // The projector from sequence 1 into empty buckets.
    let stats = Arc::new(ProjectorStats::default());
    let started = Instant::now();
    projector::run(
        js.clone(),
        ProjectorConfig {
            stop_when_caught_up: true,
            ..ProjectorConfig::default()
        },
        stats.clone(),
        CancellationToken::new(),
    )
    .await
    .expect("projector");
    let secs = started.elapsed().as_secs_f64();
    let projector_rate = stats.seen() as f64 / secs;
    println!(
        "projector (durable, guarded writes): {:>9} events in {secs:>6.2} s = {:>9.0} events/s ({:.2}x raw)",
        stats.seen(),
        stats.seen() as f64 / secs,
        stats.seen() as f64 / secs / raw
    );

    println!(
        "  ({} batches, {:.0} events per batch, {} healed, {} conflicts)",
        stats.batches.load(std::sync::atomic::Ordering::Relaxed),
        stats.seen() as f64
            / stats
                .batches
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(1) as f64,
        stats.healed.load(std::sync::atomic::Ordering::Relaxed),
        stats.conflicts.load(std::sync::atomic::Ordering::Relaxed)
    );

    // Design bounds: the server operations the projector needs for this stream, with no projector logic.
    let (acked, ack_secs) = durable_read_and_ack(&stream, last, 512).await;
    let read_ack = acked as f64 / ack_secs;
    println!(
        "bound: durable read + ack per event: {acked:>9} events in {ack_secs:>6.2} s = {read_ack:>9.0} events/s ({:.2}x raw)",
        read_ack / raw
    );
    let mut bounds = Vec::new();
    for (shape, what) in [
        (Writes::PerEvent, "one write per bucket per event"),
        (Writes::PerTask, "one write per bucket per task"),
        (
            Writes::OneValuePerEvent,
            "one value per task (view + history), one write per event",
        ),
        (
            Writes::OneValuePerTask,
            "one value per task (view + history), one write per task",
        ),
    ] {
        let writes = projector_writes(&stream, &names, last, shape).await;
        let secs = guarded_writes(&js, &writes, 4096, &format!("{shape:?}").to_lowercase()).await;
        // The writes alone, and after the read and acks (one after the other, as a batch must: its
        // events are acked only once written).
        let alone = n / secs;
        let bound = n / (ack_secs + secs);
        println!(
            "bound: guarded KV writes, {what}: {:>7} writes ({:.2} per event) in {secs:>6.2} s = {:>7.0} writes/s; alone {alone:>7.0} events/s ({:.2}x raw), with read + ack {bound:>7.0} events/s ({:.2}x raw)",
            writes.len(),
            writes.len() as f64 / n,
            writes.len() as f64 / secs,
            alone / raw,
            bound / raw
        );
        bounds.push(bound / raw);
    }

    // Rebuild into a fresh generation.
    let started = Instant::now();
    let summary = rebuild::rebuild(&js, &RebuildConfig::default(), |_| {})
        .await
        .expect("rebuild");
    let secs = started.elapsed().as_secs_f64();
    let rebuild_rate = summary.events as f64 / secs;
    println!(
        "rebuild (fold + write + switch):     {:>9} events in {secs:>6.2} s = {:>9.0} events/s ({:.2}x raw; fold {:.2} s, write {:.2} s, {} tasks)",
        summary.events,
        summary.events as f64 / secs,
        summary.events as f64 / secs / raw,
        summary.fold_secs,
        summary.write_secs,
        summary.tasks
    );

    // Lag at steady offered loads: events of new tasks published at each rate, one projector running
    // throughout, a watch on the task views noting when each event's sequence is visible.
    let live = Views::open(&js, &names, Default::default())
        .await
        .expect("views");
    let stop = CancellationToken::new();
    let projector_stats = Arc::new(ProjectorStats::default());
    let running = tokio::spawn(projector::run(
        js.clone(),
        ProjectorConfig::default(),
        projector_stats.clone(),
        stop.clone(),
    ));
    let mut worst_p99 = 0.0f64;
    for (i, rate) in rates.iter().copied().enumerate() {
        let seed = 10 + 2 * i as u64;
        let (achieved, mut lags, observed, total) =
            lag_at(&js, &names, &live, rate, lag_secs, seed).await;
        worst_p99 = worst_p99.max(lags.percentile(0.99).as_secs_f64() * 1e3);
        println!(
            "projection lag at {achieved:>5.0} events/s offered for {lag_secs} s: {} ({observed} of {total} events observed; publish to visible in the task view) · load {}",
            lags.summary(),
            measure::load_average()
        );
    }
    stop.cancel();
    let _ = running.await;
    println!(
        "summary: projector {projector_rate:.0} ev/s = {:.2}x raw (goal >= 0.3; bounds {:.2}x per event, {:.2}x per task; one value per task {:.2}x per event, {:.2}x per task) · rebuild {rebuild_rate:.0} ev/s = {:.2}x raw (goal >= 0.5) · raw read {raw:.0} ev/s · worst lag p99 {worst_p99:.1} ms (goal <= 50 ms at ~7k ev/s)",
        projector_rate / raw,
        bounds[0],
        bounds[1],
        bounds[2],
        bounds[3],
        rebuild_rate / raw,
    );
}

/// Publishes events of fresh tasks at `rate` per second for `secs` seconds while the projector runs, and
/// measures for each event the time from its publish to a task view holding its sequence. Returns the
/// rate achieved, the lags, and how many of how many events were observed.
async fn lag_at(
    js: &jetstream::Context,
    names: &Names,
    live: &Views,
    rate: u64,
    secs: u64,
    seed: u64,
) -> (f64, Latencies, usize, usize) {
    let mut watch = live.buckets().tasks.watch_all().await.expect("watch");
    let steady = generate::histories(seed, (rate * secs) / 5 + 1, Utc::now(), 8);
    let steady = generate::interleave(&mut Rng::new(seed + 1), &steady);
    let total = steady.len().min((rate * secs) as usize);
    let seen = tokio::spawn(async move {
        let mut seen: HashMap<TaskId, Vec<(u64, Instant)>> = HashMap::new();
        while let Ok(Some(Ok(entry))) =
            tokio::time::timeout(Duration::from_secs(3), watch.next()).await
        {
            if entry.operation != kv::Operation::Put {
                continue;
            }
            if let Ok(v) = serde_json::from_slice::<TaskView>(&entry.value) {
                seen.entry(v.task)
                    .or_default()
                    .push((v.seq, Instant::now()));
            }
        }
        seen
    });
    let mut published: Vec<(TaskId, u64, Instant)> = Vec::with_capacity(total);
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let started = Instant::now();
    let mut acks = Vec::new();
    let mut progress = measure::Progress::new(format!("lag at {rate} ev/s"), total as u64);
    for (i, (position, event)) in steady.iter().take(total).enumerate() {
        let due = started + interval.mul_f64(i as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let sent = Instant::now();
        let ack = js
            .publish_with_headers(
                names.events(event.task),
                taskpods_projections::log::headers(event, *position),
                taskpods_events::codec::encode_event(event)
                    .expect("encode")
                    .into(),
            )
            .await
            .expect("publish");
        acks.push((event.task, sent, ack));
        if acks.len() >= 64 {
            for (task, sent, ack) in acks.drain(..) {
                published.push((task, ack.await.expect("ack").sequence, sent));
            }
            progress.update(i as u64);
        }
    }
    for (task, sent, ack) in acks.drain(..) {
        published.push((task, ack.await.expect("ack").sequence, sent));
    }
    progress.finish();
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    let seen = seen.await.expect("watcher");
    let mut lags = Latencies::new();
    for (task, seq, sent) in &published {
        if let Some(at) = seen
            .get(task)
            .and_then(|s| s.iter().find(|(s, _)| s >= seq))
            .map(|(_, at)| *at)
        {
            lags.record(at.duration_since(*sent));
        }
    }
    let observed = lags.len();
    (achieved, lags, observed, published.len())
}

/// Design bound, reading: the projector's durable consumer with nothing done per message but the ack
/// (pull requests of the projector's batch size, every message acked on its own as the projector does).
/// Returns the events read and the seconds taken.
async fn durable_read_and_ack(
    stream: &jetstream::stream::Stream,
    last: u64,
    batch: usize,
) -> (u64, f64) {
    let name = "bench_bound_read_ack";
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name.into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 65_536,
            ..Default::default()
        })
        .await
        .expect("bound consumer");
    let started = Instant::now();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(batch)
        .messages()
        .await
        .expect("messages");
    let mut read = 0u64;
    while let Some(m) = messages.next().await {
        let m = m.expect("message");
        read += 1;
        let seq = m.info().expect("info").stream_sequence;
        m.ack().await.expect("ack");
        if seq >= last {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    drop(messages);
    let _ = stream.delete_consumer(name).await;
    (read, secs)
}

/// One KV write of a design bound: bucket (index into the scratch buckets), key, value (`None`: delete).
type BoundWrite = (usize, String, Option<bytes::Bytes>);

/// Which writes a design bound makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Writes {
    /// One write per bucket per event, as batches holding one event per task need (history unless
    /// unchanged, active put or delete marker, finished once, task view): the projector on this stream.
    PerEvent,
    /// The whole stream folded at once: one write per bucket per task, the fewest the layout allows.
    PerTask,
    /// The layout not taken: history and active in the task's one value (the finished index stays), one
    /// write per event.
    OneValuePerEvent,
    /// That layout with the whole stream folded at once: one write per task (and its finished entry).
    OneValuePerTask,
}

/// The KV writes the projector must make for the stream in the given `shape`, its events folded per task
/// with the real fold before any timing.
async fn projector_writes(
    stream: &jetstream::stream::Stream,
    names: &Names,
    last: u64,
    shape: Writes,
) -> Vec<BoundWrite> {
    let mut ordered = taskpods_projections::log::ordered(
        stream,
        names,
        None,
        taskpods_projections::log::Start::First,
    )
    .await
    .expect("ordered");
    let mut folded: HashMap<TaskId, Folded> = HashMap::new();
    let mut writes = Vec::new();
    while let Some(m) = ordered.next().await {
        let m = m.expect("message");
        let e = taskpods_projections::log::decode_message(names, &m).expect("decode");
        let f = folded
            .entry(e.task())
            .or_insert_with(|| Folded::new(e.task()));
        let history_seq = f.history.seq;
        let had_finished = f.finished.is_some();
        f.apply(&e);
        let key = e.task().to_string();
        if shape == Writes::OneValuePerEvent {
            if let (false, Some(done)) = (had_finished, &f.finished) {
                writes.push((3, key.clone(), Some(encode(done).expect("encode"))));
            }
            let value = encode(&(&f.view, &f.history)).expect("encode");
            writes.push((0, key, Some(value)));
        } else if shape == Writes::PerEvent {
            if f.history.seq > history_seq {
                writes.push((1, key.clone(), Some(encode(&f.history).expect("encode"))));
            }
            match f.active() {
                Some(a) => writes.push((2, key.clone(), Some(encode(&a).expect("encode")))),
                None if !had_finished && f.finished.is_some() => {
                    writes.push((2, key.clone(), None))
                }
                None => {}
            }
            if let (false, Some(done)) = (had_finished, &f.finished) {
                writes.push((3, key.clone(), Some(encode(done).expect("encode"))));
            }
            writes.push((0, key, Some(encode(&f.view).expect("encode"))));
        }
        if e.sequence >= last {
            break;
        }
    }
    if shape == Writes::OneValuePerTask {
        for f in folded.values() {
            let key = f.view.task.to_string();
            if let Some(done) = &f.finished {
                writes.push((3, key.clone(), Some(encode(done).expect("encode"))));
            }
            let value = encode(&(&f.view, &f.history)).expect("encode");
            writes.push((0, key, Some(value)));
        }
    }
    if shape == Writes::PerTask {
        for f in folded.values() {
            let key = f.view.task.to_string();
            writes.push((1, key.clone(), Some(encode(&f.history).expect("encode"))));
            match f.active() {
                Some(a) => writes.push((2, key.clone(), Some(encode(&a).expect("encode")))),
                None if f.finished.is_some() => writes.push((2, key.clone(), None)),
                None => {}
            }
            if let Some(done) = &f.finished {
                writes.push((3, key.clone(), Some(encode(done).expect("encode"))));
            }
            writes.push((0, key, Some(encode(&f.view).expect("encode"))));
        }
    }
    writes
}

/// Sends `writes` in order into four scratch buckets shaped like the views', each guarded by the key's
/// current revision as the projector's are (`Nats-Expected-Last-Subject-Sequence`), up to `window` acks
/// outstanding (a key's next write waits for its previous ack, which gives the revision). Returns the
/// seconds taken.
async fn guarded_writes(
    js: &jetstream::Context,
    writes: &[BoundWrite],
    window: usize,
    tag: &str,
) -> f64 {
    let buckets: Vec<String> = ["tasks", "history", "active", "finished"]
        .iter()
        .map(|b| format!("bench_bound_{tag}_{b}"))
        .collect();
    for b in &buckets {
        ensure_bucket(js, b, Default::default())
            .await
            .expect("bound bucket");
    }
    let started = Instant::now();
    let mut revisions: HashMap<(usize, &str), u64> = HashMap::new();
    let mut in_flight: std::collections::HashSet<(usize, &str)> = Default::default();
    let mut acks: std::collections::VecDeque<(
        (usize, &str),
        jetstream::context::PublishAckFuture,
    )> = Default::default();
    for (bucket, key, value) in writes {
        let k = (*bucket, key.as_str());
        while in_flight.contains(&k) || acks.len() >= window {
            let (done, ack) = acks.pop_front().expect("an ack in flight");
            revisions.insert(done, ack.await.expect("guarded write").sequence);
            in_flight.remove(&done);
        }
        let mut headers = async_nats::HeaderMap::new();
        let expected = revisions.get(&k).copied().unwrap_or(0);
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        if value.is_none() {
            headers.insert("KV-Operation", "DEL");
        }
        let ack = js
            .publish_with_headers(
                format!("$KV.{}.{key}", buckets[*bucket]),
                headers,
                value.clone().unwrap_or_default(),
            )
            .await
            .expect("send");
        in_flight.insert(k);
        acks.push_back((k, ack));
    }
    while let Some((done, ack)) = acks.pop_front() {
        revisions.insert(done, ack.await.expect("guarded write").sequence);
    }
    let secs = started.elapsed().as_secs_f64();
    for b in &buckets {
        let _ = js.delete_stream(format!("KV_{b}")).await;
    }
    secs
}
