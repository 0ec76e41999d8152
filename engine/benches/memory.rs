//! The engine's memory with many live tasks, and after they end.
//!
//! Runs `taskpods serve --backend none --no-ui` as its own process (so its memory is the engine's
//! alone, not the benchmark's client) against a fresh nats-server, and reads `/proc/<pid>/status`:
//! idle; with 1,000 then 10,000 live tasks (accepted, each with its deadline timer, its active view and
//! its intake state); after all of them are cancelled (ended); and after a second wave of the same size
//! was launched and cancelled. The last two are the retention check: if the engine kept anything per
//! finished task, the second wave would add it again, so the difference divided by the wave is what one
//! finished task still costs (goal: nothing, within the allocator's noise).
//!
//! `cargo bench -p taskpods-engine --bench memory` (`NATS_SERVER_BIN` picks the server; `TASKS` sets the
//! larger wave, default 10000). Goal from the issue: RSS <= 64 MiB with 10,000 live tasks.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use taskpods_client::Client;
use taskpods_events::{LaunchTask, Names, TaskId};
use taskpods_harness::NatsServer;
use taskpods_harness::measure::{self, Memory};

/// Launches or cancels in flight at once.
const IN_FLIGHT: usize = 256;

struct EngineProcess(Child);

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    let wave: usize = std::env::var("TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let server = NatsServer::start();
    println!("{}", measure::machine_line());
    let engine = EngineProcess(
        Command::new(env!("CARGO_BIN_EXE_taskpods"))
            .args([
                "--nats-url",
                &server.url(),
                "serve",
                "--backend",
                "none",
                "--no-ui",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("taskpods serve starts"),
    );
    let pid = engine.0.id();
    let nats = server.connect().await;
    let js = async_nats::jetstream::new(nats.clone());
    let client = measure::client(nats, Duration::from_secs(60));
    // The engine is ready once it answers a launch.
    let started = Instant::now();
    let first = loop {
        match client.launch(LaunchTask::script("echo ready")).await {
            Ok(launched) => break launched.task_id,
            Err(_) if started.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the engine did not start: {e}"),
        }
    };
    let names = Names::default();
    settle(&js, &names).await;
    let idle = memory(pid);
    println!("engine idle (1 live task):            {}", idle.summary());

    let small = wave / 10;
    let mut live = vec![first];
    live.extend(launch(&client, small - 1).await);
    settle(&js, &names).await;
    let at_small = memory(pid);
    println!(
        "engine with {small:>6} live tasks:         {}",
        at_small.summary()
    );
    live.extend(launch(&client, wave - small).await);
    settle(&js, &names).await;
    let at_wave = memory(pid);
    println!(
        "engine with {wave:>6} live tasks:         {}",
        at_wave.summary()
    );

    cancel(&client, &live).await;
    settle(&js, &names).await;
    let ended = memory(pid);
    println!(
        "after they ended ({wave} finished):     {}",
        ended.summary()
    );

    let second = launch(&client, wave).await;
    cancel(&client, &second).await;
    settle(&js, &names).await;
    let again = memory(pid);
    println!(
        "after a second wave ({} finished):    {}",
        wave * 2,
        again.summary()
    );
    let per_task = |a: u64, b: u64| (b as f64 - a as f64) * 1024.0 / wave as f64;
    println!(
        "summary: RSS with {wave} live tasks {:.1} MiB (goal <= 64 MiB), {:.0} B per live task over idle; \
         retained per finished task {:.0} B RSS, {:.0} B anonymous (second wave over first) · load average {}",
        at_wave.rss_kib as f64 / 1024.0,
        per_task(idle.rss_kib, at_wave.rss_kib) * wave as f64 / (wave - 1) as f64,
        per_task(ended.rss_kib, again.rss_kib),
        per_task(ended.anon_kib, again.anon_kib),
        measure::load_average()
    );
}

fn memory(pid: u32) -> Memory {
    Memory::of(pid).expect("the engine process is running")
}

/// Waits until the views hold every event (the projector's lag is zero), then a moment for the engine's
/// other loops to go idle.
async fn settle(js: &async_nats::jetstream::Context, names: &Names) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let lag = taskpods_projections::lag(js, names).await.expect("lag");
        if lag.events_behind == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "projector did not catch up: {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
}

async fn launch(client: &Client, n: usize) -> Vec<TaskId> {
    let mut progress = measure::Progress::new("launching", n as u64);
    let mut launches = futures::stream::iter(0..n)
        .map(|_| async move {
            client
                .launch(LaunchTask::script("echo memory"))
                .await
                .expect("launch")
                .task_id
        })
        .buffer_unordered(IN_FLIGHT);
    let mut ids = Vec::with_capacity(n);
    while let Some(id) = launches.next().await {
        ids.push(id);
        progress.update(ids.len() as u64);
    }
    progress.finish();
    ids
}

async fn cancel(client: &Client, tasks: &[TaskId]) {
    let mut progress = measure::Progress::new("cancelling", tasks.len() as u64);
    let mut cancels = futures::stream::iter(tasks.iter().copied())
        .map(|task| async move {
            client
                .cancel(task, Some("memory benchmark".into()))
                .await
                .expect("cancel")
        })
        .buffer_unordered(IN_FLIGHT);
    let mut done = 0u64;
    while cancels.next().await.is_some() {
        done += 1;
        progress.update(done);
    }
    progress.finish();
}
