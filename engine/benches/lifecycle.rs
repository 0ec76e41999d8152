//! Full lifecycles per second with the no-op backend, and where each lifecycle's time goes.
//!
//! One engine (in this process, `--backend noop`: every task's pod and agent played in-process through
//! the real executor, gateway, intake, timers and projector) against a fresh nats-server. Each task is
//! followed from its launch command to its view: command published → `accepted` → `scheduled` (sandbox
//! recorded) → `running` (agent hello answered) → `succeeded` (result through the command stream) → the
//! task view in KV says succeeded → `reaped`. Each phase is printed with p50/p99/max, at offered loads of
//! 1, 100 and 1,000 launches per second (open loop: launches go out on schedule whatever the replies do)
//! and at saturation (as many as `SATURATION_IN_FLIGHT` launches waiting at once).
//!
//! The raw limit is measured in the same run: JetStream publish+ack of 300 B with 256 in flight. A
//! lifecycle needs at least eight durable publishes (launch command, six events, the agent's result
//! command), so `raw / 8` lifecycles per second is what the server alone would allow; the ratio is the
//! engine's rate to that.
//!
//! `cargo bench -p taskpods-engine --bench lifecycle` (`NATS_SERVER_BIN` picks the server;
//! `LIFECYCLE_SECS` how long each fixed load is offered, default 5; `LIFECYCLE_RATES`, default
//! `1,100,1000`; `SATURATION` lifecycles in the saturation run, default 5000). Goal from the issue: >= 1,000
//! lifecycles per second.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use taskpods_client::Client;
use taskpods_engine::config::EngineConfig;
use taskpods_engine::executor::BackendConfig;
use taskpods_engine::executor::noop::NoopConfig;
use taskpods_engine::intake::IntakeConfig;
use taskpods_engine::server::Engine;
use taskpods_events::codec::HEADER_KIND;
use taskpods_events::{LaunchTask, Names, TaskId};
use taskpods_harness::NatsServer;
use taskpods_harness::measure::{self, Latencies};
use taskpods_projections::{TaskView, Views};

/// Durable publishes one lifecycle needs at least: the launch, six events, the agent's result.
const PUBLISHES_PER_LIFECYCLE: f64 = 8.0;

/// The moments one task was seen reaching each phase.
#[derive(Debug, Default, Clone, Copy)]
struct Phases {
    launched: Option<Instant>,
    accepted: Option<Instant>,
    scheduled: Option<Instant>,
    running: Option<Instant>,
    succeeded: Option<Instant>,
    viewed: Option<Instant>,
    reaped: Option<Instant>,
}

impl Phases {
    /// A lifecycle is done once the task is reaped and its view says it ended.
    fn done(&self) -> bool {
        self.reaped.is_some() && self.viewed.is_some()
    }
}

type Seen = Arc<Mutex<HashMap<TaskId, Phases>>>;

#[tokio::main]
async fn main() {
    let secs: u64 = measure::env_or("LIFECYCLE_SECS", 5);
    let saturation: usize = measure::env_or("SATURATION", 5000);
    let rates: Vec<u64> = std::env::var("LIFECYCLE_RATES")
        .ok()
        .map(|v| v.split(',').filter_map(|r| r.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 100, 1000]);
    let server = NatsServer::start();
    println!("{}", measure::machine_line());
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let raw = measure::raw_publish_rate(&js, 20_000, 300, 256).await;
    let raw_lifecycles = raw / PUBLISHES_PER_LIFECYCLE;
    println!(
        "raw JetStream publish+ack, 300 B, 256 in flight: {raw:>8.0}/s → at most {raw_lifecycles:.0} lifecycles/s ({PUBLISHES_PER_LIFECYCLE} durable publishes each)"
    );

    let engine = Engine::start(EngineConfig {
        nats_urls: vec![server.url()],
        backend: BackendConfig::Noop(NoopConfig::default()),
        intake: IntakeConfig {
            max_in_flight: 4096,
            ..IntakeConfig::default()
        },
        ..EngineConfig::default()
    })
    .await
    .expect("engine");
    let client = measure::client(nats.clone(), Duration::from_secs(120));
    let names = Names::default();
    let seen: Seen = Arc::new(Mutex::new(HashMap::new()));
    let watcher = tokio::spawn(watch(nats.clone(), js.clone(), names.clone(), seen.clone()));

    let mut best = 0.0f64;
    for rate in rates {
        let n = (rate * secs).max(5) as usize;
        let rate_secs = n as f64 / rate as f64;
        let (lifecycles, mut phases) = run(&client, &seen, n, Pace::Rate(rate)).await;
        best = best.max(lifecycles);
        println!(
            "offered {rate:>5}/s for {rate_secs:.0} s: {lifecycles:>7.0} lifecycles/s completed ({n} tasks)"
        );
        print_phases(&mut phases);
    }
    let in_flight = measure::env_or("SATURATION_IN_FLIGHT", 1024);
    let (lifecycles, mut phases) = run(&client, &seen, saturation, Pace::InFlight(in_flight)).await;
    best = best.max(lifecycles);
    println!(
        "saturation ({in_flight} launches in flight, {saturation} tasks): {lifecycles:>7.0} lifecycles/s = {:.2}x raw/8",
        lifecycles / raw_lifecycles
    );
    print_phases(&mut phases);
    println!(
        "summary: {lifecycles:.0} lifecycles/s at saturation (best {best:.0}/s; goal >= 1000/s) = {:.2}x the raw bound {raw_lifecycles:.0}/s · load average {}",
        lifecycles / raw_lifecycles,
        measure::load_average()
    );
    watcher.abort();
    engine.shutdown().await.expect("shutdown");
}

enum Pace {
    /// Launches per second, open loop.
    Rate(u64),
    /// As fast as replies come, this many waiting at once.
    InFlight(usize),
}

/// Launches `n` tasks at `pace` and waits until each is reaped and its view says it ended (or 10
/// minutes pass); lifecycles per second (first launch to the last of those) and each task's phases.
async fn run(client: &Client, seen: &Seen, n: usize, pace: Pace) -> (f64, Vec<Phases>) {
    let ids: Vec<TaskId> = (0..n).map(|_| TaskId::mint()).collect();
    {
        let mut seen = seen.lock().expect("lock");
        for id in &ids {
            seen.insert(*id, Phases::default());
        }
    }
    let launch = |id: TaskId| {
        let (client, seen) = (client.clone(), seen.clone());
        async move {
            if let Some(p) = seen.lock().expect("lock").get_mut(&id) {
                p.launched = Some(Instant::now());
            }
            client
                .launch(LaunchTask {
                    task_id: Some(id.0),
                    ..LaunchTask::script("echo lifecycle")
                })
                .await
                .expect("launch");
        }
    };
    let started = Instant::now();
    let mut progress = measure::Progress::new("lifecycles reaped and viewed", n as u64);
    let launching = async {
        match pace {
            Pace::Rate(rate) => {
                let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
                let mut pending = Vec::with_capacity(n);
                for (i, id) in ids.iter().enumerate() {
                    let due = started + interval.mul_f64(i as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        tokio::time::sleep(wait).await;
                    }
                    pending.push(tokio::spawn(launch(*id)));
                }
                for p in pending {
                    p.await.expect("launch task");
                }
            }
            Pace::InFlight(in_flight) => {
                futures::stream::iter(ids.iter().copied())
                    .map(launch)
                    .buffer_unordered(in_flight)
                    .collect::<Vec<()>>()
                    .await;
            }
        }
    };
    let waiting = async {
        let deadline = started + Duration::from_secs(600);
        loop {
            let done = {
                let seen = seen.lock().expect("lock");
                ids.iter()
                    .filter(|id| seen.get(id).is_some_and(Phases::done))
                    .count()
            };
            progress.update(done as u64);
            if done == n || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    futures::join!(launching, waiting);
    progress.finish();
    let mut seen = seen.lock().expect("lock");
    let phases: Vec<Phases> = ids.iter().filter_map(|id| seen.remove(id)).collect();
    let last = phases
        .iter()
        .filter(|p| p.done())
        .filter_map(|p| p.reaped.max(p.viewed))
        .max();
    let done = phases.iter().filter(|p| p.done()).count();
    let elapsed = last.map_or(started.elapsed(), |l| l.duration_since(started));
    if done < n {
        println!("  (only {done} of {n} reaped and viewed within the time limit)");
    }
    (done as f64 / elapsed.as_secs_f64(), phases)
}

fn print_phases(phases: &mut [Phases]) {
    type Step = (
        &'static str,
        fn(&Phases) -> Option<Instant>,
        fn(&Phases) -> Option<Instant>,
    );
    let steps: [Step; 7] = [
        ("command → accepted", |p| p.launched, |p| p.accepted),
        ("accepted → scheduled", |p| p.accepted, |p| p.scheduled),
        ("scheduled → running", |p| p.scheduled, |p| p.running),
        ("running → succeeded", |p| p.running, |p| p.succeeded),
        ("succeeded → view updated", |p| p.succeeded, |p| p.viewed),
        ("succeeded → reaped", |p| p.succeeded, |p| p.reaped),
        ("command → view updated", |p| p.launched, |p| p.viewed),
    ];
    for (name, from, to) in steps {
        let mut latencies = Latencies::new();
        for p in phases.iter() {
            if let (Some(a), Some(b)) = (from(p), to(p)) {
                latencies.record(b.saturating_duration_since(a));
            }
        }
        println!("  {name:<26} {}", latencies.summary());
    }
}

/// Notes when each followed task reaches each phase: its events from a plain subscription on the event
/// subjects, its view from a watch on the task views.
async fn watch(nats: async_nats::Client, js: jetstream::Context, names: Names, seen: Seen) {
    let mut events = nats
        .subscribe(names.events_all())
        .await
        .expect("subscribe to events");
    let views = Views::open(&js, &names, Default::default())
        .await
        .expect("views");
    let mut updates = views.buckets().tasks.watch_all().await.expect("watch");
    loop {
        tokio::select! {
            Some(m) = events.next() => {
                let Some(task) = m.subject.as_str().rsplit('.').next().and_then(|t| t.parse::<TaskId>().ok()) else {
                    continue;
                };
                let kind = m.headers.as_ref().and_then(|h| h.get(HEADER_KIND)).map(|k| k.as_str().to_owned());
                let now = Instant::now();
                if let Some(p) = seen.lock().expect("lock").get_mut(&task) {
                    let slot = match kind.as_deref() {
                        Some("accepted") => &mut p.accepted,
                        Some("scheduled") => &mut p.scheduled,
                        Some("running") => &mut p.running,
                        Some("succeeded") => &mut p.succeeded,
                        Some("reaped") => &mut p.reaped,
                        _ => continue,
                    };
                    slot.get_or_insert(now);
                }
            }
            Some(Ok(entry)) = updates.next() => {
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                let Ok(view) = serde_json::from_slice::<TaskView>(&entry.value) else { continue };
                if view.is_terminal() && let Some(p) = seen.lock().expect("lock").get_mut(&view.task) {
                    p.viewed.get_or_insert(Instant::now());
                }
            }
            else => break,
        }
    }
}
