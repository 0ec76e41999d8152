//! Projector benchmark against a real nats-server (`cargo bench -p taskpods-projections --bench projector`).
//!
//! Prints, from one run on one server: the raw rate of reading the event stream with an ordered consumer,
//! the projector's throughput folding the same stream from sequence 1, the rebuild rate, and the
//! projection lag (p50/p99) at steady offered loads, with the ratios to the raw read and a summary line.
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
use taskpods_projections::generate::{self, Rng};
use taskpods_projections::rebuild::{self, RebuildConfig};
use taskpods_projections::{ProjectorConfig, ProjectorStats, TaskView, Views, projector};
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
        "summary: projector {projector_rate:.0} ev/s = {:.2}x raw (goal >= 0.3) · rebuild {rebuild_rate:.0} ev/s = {:.2}x raw (goal >= 0.5) · raw read {raw:.0} ev/s · worst lag p99 {worst_p99:.1} ms (goal <= 50 ms at ~7k ev/s)",
        projector_rate / raw,
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
