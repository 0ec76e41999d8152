//! Launch throughput end to end: a launch command published (durably, with a reply inbox) until the
//! engine has stored the task's first event and answered, at 1, 64 and 1024 launches in flight, printed
//! next to the raw JetStream publish rates measured on the same server in the same run (serial for one in
//! flight, 256 in flight for the others), with the ratio and p50/p99/max latency per launch.
//!
//! `cargo bench -p taskpods-engine --bench launch` (`NATS_SERVER_BIN` picks the server; `LAUNCHES` scales
//! the run).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::future::join_all;
use taskpods_client::{Client, ClientConfig};
use taskpods_engine::config::EngineConfig;
use taskpods_engine::intake::IntakeConfig;
use taskpods_engine::server::Engine;
use taskpods_events::LaunchTask;
use taskpods_harness::NatsServer;
use taskpods_harness::measure::{self, Latencies};
use tokio::sync::Semaphore;

#[tokio::main]
async fn main() {
    let scale: usize = std::env::var("LAUNCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let server = NatsServer::start();
    println!("{}", measure::machine_line());

    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let serial = measure::raw_publish_rate(&js, (scale / 4).max(100), 300, 1).await;
    let raw = measure::raw_publish_rate(&js, scale * 4, 300, 256).await;
    println!(
        "raw JetStream publish+ack, 300 B: serial {serial:>8.0}/s · 256 in flight {raw:>8.0}/s"
    );

    let engine = Engine::start(EngineConfig {
        nats_urls: vec![server.url()],
        intake: IntakeConfig {
            max_in_flight: 4096,
            ..IntakeConfig::default()
        },
        ..EngineConfig::default()
    })
    .await
    .expect("engine");
    let client = Client::new(
        nats.clone(),
        ClientConfig {
            reply_timeout: Duration::from_secs(60),
            ..ClientConfig::default()
        },
    );
    let mut best = 0.0f64;
    for (in_flight, launches, limit) in [
        (1, scale / 10, serial),
        (64, scale, raw),
        (1024, scale, raw),
    ] {
        let (rate, mut latencies) = launch_rate(&client, in_flight, launches.max(10)).await;
        best = best.max(rate);
        println!(
            "launches accepted end to end, {in_flight:>4} in flight: {rate:>8.0}/s = {:.2}x raw  ({}, {launches} launches)",
            rate / limit,
            latencies.summary(),
        );
    }
    println!(
        "summary: launches accepted {best:.0}/s, raw publish+ack {raw:.0}/s, ratio {:.2} (goal >= 0.5) · load average {}",
        best / raw,
        measure::load_average()
    );
    engine.shutdown().await.expect("shutdown");
}

async fn launch_rate(client: &Client, in_flight: usize, launches: usize) -> (f64, Latencies) {
    let run = uuid_prefix();
    let permits = Arc::new(Semaphore::new(in_flight));
    let start = Instant::now();
    let samples: Vec<Duration> = join_all((0..launches).map(|i| {
        let (client, permits) = (client.clone(), permits.clone());
        let key = format!("bench-{run}-{in_flight}-{i}");
        async move {
            let _permit = permits.acquire_owned().await.expect("semaphore");
            let began = Instant::now();
            let launched = client
                .launch(LaunchTask {
                    idempotency_key: Some(key),
                    ..LaunchTask::script("echo benchmark")
                })
                .await
                .expect("launch");
            assert!(launched.created);
            began.elapsed()
        }
    }))
    .await;
    let rate = launches as f64 / start.elapsed().as_secs_f64();
    let mut latencies = Latencies::new();
    for d in samples {
        latencies.record(d);
    }
    (rate, latencies)
}

fn uuid_prefix() -> String {
    taskpods_events::TaskId::mint().0.simple().to_string()[..8].to_owned()
}
