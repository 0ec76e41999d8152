//! Rebuild benchmark against a real nats-server (`cargo bench -p taskpods-projections --bench rebuild`).
//!
//! Publishes the projector bench's stream (`BENCH_TASKS` random task histories, default 20,000, about
//! 64,700 events), then `BENCH_REPS` times (default 3) reads it raw with an ordered consumer and rebuilds
//! every view from sequence 1, printing each pair with its ratio; the two alternate so that both see the
//! same machine. Ends with a summary line (the median ratio).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use taskpods_events::Names;
use taskpods_harness::NatsServer;
use taskpods_harness::measure::{self, env_or};
use taskpods_projections::buckets::{self, ViewBuckets};
use taskpods_projections::generate::{self, Rng};
use taskpods_projections::rebuild::{self, FoldedStream, RebuildConfig};

#[tokio::main]
async fn main() {
    let tasks: u64 = env_or("BENCH_TASKS", 20_000);
    let reps: usize = env_or("BENCH_REPS", 3);
    // 0: one per core (the default of `taskpods projections rebuild`).
    let partitions: usize = env_or("BENCH_PARTITIONS", 0);
    let server = NatsServer::start();
    let js = jetstream::new(server.connect().await);
    let names = Names::default();
    js.create_stream(jetstream::stream::Config {
        name: names.event_stream(),
        subjects: vec![names.events_all()],
        allow_direct: true,
        ..Default::default()
    })
    .await
    .expect("event stream");
    println!("{}; {tasks} random task histories", measure::machine_line());

    let histories = generate::histories(1, tasks, Utc::now(), 10);
    let events = generate::interleave(&mut Rng::new(2), &histories);
    let last = generate::publish(&js, &names, &events, 256)
        .await
        .expect("publish");

    // The design bound's writes: every value the rebuild writes, encoded once up front.
    let stream = js.get_stream(names.event_stream()).await.expect("stream");
    let folded = FoldedStream::merge(
        rebuild::fold_partitioned(&stream, &names, last, 1, |_| {})
            .await
            .expect("fold"),
    );
    let mut writes: Vec<(usize, String, Bytes)> = Vec::new();
    for f in folded.tasks.values() {
        let key = f.view.task.to_string();
        writes.push((1, key.clone(), json(&f.history)));
        if let Some(active) = f.active() {
            writes.push((2, key.clone(), json(&active)));
        }
        writes.push((0, key.clone(), json(&f.view)));
        if let Some(done) = &f.finished {
            writes.push((3, key, json(done)));
        }
    }
    let writes = Arc::new(writes);
    let lanes = rebuild::default_partitions();

    let mut ratios = Vec::new();
    let mut bounds = Vec::new();
    for rep in 1..=reps {
        let server_pid = server.pid().unwrap_or(0).to_string();
        let before = (cpu_secs("self"), cpu_secs(&server_pid));
        let started = Instant::now();
        let read = generate::read_raw(&js, &names, last)
            .await
            .expect("raw read");
        let raw_secs = started.elapsed().as_secs_f64();
        println!(
            "   cpu: raw read: bench {:.2} s, server {:.2} s",
            cpu_secs("self") - before.0,
            cpu_secs(&server_pid) - before.1
        );
        let raw = read as f64 / raw_secs;

        let started = Instant::now();
        let cpu = || {
            (
                cpu_secs("self"),
                cpu_secs(&server_pid),
                started.elapsed().as_secs_f64(),
            )
        };
        let at_start = cpu();
        let mut at_fold_end = None;
        let summary = rebuild::rebuild(
            &js,
            &RebuildConfig {
                partitions,
                ..RebuildConfig::default()
            },
            |p| {
                if p.phase == rebuild::Phase::Fold && p.done == p.total {
                    at_fold_end = Some(cpu());
                }
            },
        )
        .await
        .expect("rebuild");
        let secs = started.elapsed().as_secs_f64();
        let at_end = cpu();
        if let Some(f) = at_fold_end {
            println!(
                "   cpu: until fold end {:.2} s wall: bench {:.2} s, server {:.2} s · after: {:.2} s wall: bench {:.2} s, server {:.2} s",
                f.2,
                f.0 - at_start.0,
                f.1 - at_start.1,
                at_end.2 - f.2,
                at_end.0 - f.0,
                at_end.1 - f.1
            );
        }
        let rate = summary.events as f64 / secs;
        ratios.push(rate / raw);

        // The design bound: the same creates with nothing folded or encoded, into fresh buckets.
        let generation = 1000 + rep as u32;
        let target = ViewBuckets::open(&js, &names, generation, Default::default(), true)
            .await
            .expect("buckets");
        let prefixes = Arc::new(
            [
                &target.tasks,
                &target.history,
                &target.active,
                &target.finished,
            ]
            .map(|b| format!("$KV.{}.", b.name)),
        );
        let before = (cpu_secs("self"), cpu_secs(&server_pid));
        let started = Instant::now();
        let mut pumps = tokio::task::JoinSet::new();
        for lane in 0..lanes {
            let (client, writes, prefixes) = (js.client(), writes.clone(), prefixes.clone());
            pumps.spawn(put_raw(client, writes, prefixes, lane, lanes));
        }
        while let Some(done) = pumps.join_next().await {
            done.expect("join");
        }
        let put_secs = started.elapsed().as_secs_f64();
        let bound = read as f64 / (raw_secs + put_secs);
        bounds.push(bound / raw);
        println!(
            "   design bound: raw read + {} raw pipelined creates ({lanes} lanes, {PUT_WINDOW} unacknowledged each) in {put_secs:.3} s (cpu: bench {:.2} s, server {:.2} s) = {bound:.0} ev/s = {:.2}x raw",
            writes.len(),
            cpu_secs("self") - before.0,
            cpu_secs(&server_pid) - before.1,
            bound / raw
        );
        for bucket in buckets::generation_buckets(&names, generation) {
            buckets::delete_bucket(&js, &bucket).await.expect("delete");
        }
        println!(
            "{rep}: raw ordered-consumer read {read} events in {raw_secs:.3} s = {raw:.0} ev/s · rebuild {} events in {secs:.3} s = {rate:.0} ev/s = {:.2}x raw (fold {:.3} s, write {:.3} s, {} tasks) · load {}",
            summary.events,
            rate / raw,
            summary.fold_secs,
            summary.write_secs,
            summary.tasks,
            measure::load_average()
        );
    }
    ratios.sort_by(f64::total_cmp);
    bounds.sort_by(f64::total_cmp);
    let median = |v: &[f64]| v.get(v.len() / 2).copied().unwrap_or(0.0);
    println!(
        "summary: rebuild median {:.2}x raw ordered-consumer read over {reps} runs (goal >= 0.5) · best {:.2}x · design bound (raw read, then the same creates raw) median {:.2}x",
        median(&ratios),
        ratios.last().copied().unwrap_or(0.0),
        median(&bounds)
    );
}

/// CPU seconds (user + system) of a process so far, from `/proc/<pid>/stat` (`self` for this one).
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the command; clock ticks are 1/100 s.
    (ticks(11) + ticks(12)) / 100.0
}

/// Unacknowledged creates per lane in the design bound (as the rebuild's writer).
const PUT_WINDOW: usize = 4096;

/// Sends every `lanes`-th of `writes` (from `lane`) as a create-only KV publish, `PUT_WINDOW`
/// unacknowledged at a time, the acknowledgements counted on one reply subject; panics on a refusal.
async fn put_raw(
    client: async_nats::Client,
    writes: Arc<Vec<(usize, String, Bytes)>>,
    prefixes: Arc<[String; 4]>,
    lane: usize,
    lanes: usize,
) {
    let reply = async_nats::Subject::from(client.new_inbox());
    let mut acks = client.subscribe(reply.clone()).await.expect("subscribe");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    let mut outstanding = 0usize;
    let take = |ack: Option<async_nats::Message>| {
        let ack = ack.expect("acknowledgement");
        assert!(
            ack.status.is_none() && !ack.payload.windows(7).any(|w| w == b"\"error\""),
            "refused: {ack:?}"
        );
    };
    for (bucket, key, value) in writes.iter().skip(lane).step_by(lanes) {
        while outstanding >= PUT_WINDOW {
            take(
                tokio::time::timeout(Duration::from_secs(30), acks.next())
                    .await
                    .expect("ack in time"),
            );
            outstanding -= 1;
        }
        client
            .publish_with_reply_and_headers(
                format!("{}{key}", prefixes[*bucket]),
                reply.clone(),
                headers.clone(),
                value.clone(),
            )
            .await
            .expect("publish");
        outstanding += 1;
    }
    while outstanding > 0 {
        take(
            tokio::time::timeout(Duration::from_secs(30), acks.next())
                .await
                .expect("ack in time"),
        );
        outstanding -= 1;
    }
}

/// A view as the rebuild writes it.
fn json<T: serde::Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("views encode"))
}
