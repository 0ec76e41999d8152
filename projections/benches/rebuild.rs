//! Rebuild benchmark against a real nats-server (`cargo bench -p taskpods-projections --bench rebuild`).
//!
//! Publishes the projector bench's stream (`BENCH_TASKS` random task histories, default 20,000, about
//! 64,700 events), then `BENCH_REPS` times (default 3) reads it raw with an ordered consumer and rebuilds
//! every view from sequence 1, printing each pair with its ratio; the two alternate so that both see the
//! same machine. Ends with a summary line (the median ratio).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use async_nats::jetstream;
use chrono::Utc;
use taskpods_events::Names;
use taskpods_harness::NatsServer;
use taskpods_harness::measure::{self, env_or};
use taskpods_projections::generate::{self, Rng};
use taskpods_projections::rebuild::{self, RebuildConfig};

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

    let mut ratios = Vec::new();
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
    let median = ratios.get(ratios.len() / 2).copied().unwrap_or(0.0);
    println!(
        "summary: rebuild median {median:.2}x raw ordered-consumer read over {reps} runs (goal >= 0.5) · best {:.2}x",
        ratios.last().copied().unwrap_or(0.0)
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
