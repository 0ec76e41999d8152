//! Launch throughput end to end: a launch command published (durably, with a reply inbox) until the
//! engine has stored the task's first event and answered, at 1, 64 and 1024 launches in flight, printed
//! next to the raw JetStream publish rates measured on the same server in the same run.
//!
//! `cargo bench -p taskpods-engine --bench launch` (`NATS_SERVER_BIN` picks the server; `LAUNCHES` scales
//! the run).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use futures::future::join_all;
use taskpods_client::{Client, ClientConfig};
use taskpods_engine::config::EngineConfig;
use taskpods_engine::intake::IntakeConfig;
use taskpods_engine::server::Engine;
use taskpods_events::LaunchTask;
use taskpods_harness::{NatsServer, nats_server_version};
use tokio::sync::Semaphore;

#[tokio::main]
async fn main() {
    let scale: usize = std::env::var("LAUNCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let server = NatsServer::start();
    println!(
        "nats-server {} · {} cores",
        nats_server_version(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let (serial, parallel) = raw_publish_rates(&js, scale).await;
    println!(
        "raw JetStream publish+ack, 300 B: serial {serial:>8.0}/s · 256 in flight {parallel:>8.0}/s"
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
    for (in_flight, launches) in [(1, scale / 10), (64, scale), (1024, scale)] {
        let (rate, p50, p99) = launch_rate(&client, in_flight, launches.max(10)).await;
        println!(
            "launches accepted end to end, {in_flight:>4} in flight: {rate:>8.0}/s  (p50 {:>7.2} ms, p99 {:>7.2} ms, {launches} launches)",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
        );
    }
    engine.shutdown().await.expect("shutdown");
}

async fn raw_publish_rates(js: &jetstream::Context, n: usize) -> (f64, f64) {
    js.create_stream(stream::Config {
        name: "BENCH_RAW".into(),
        subjects: vec!["bench.raw.>".into()],
        ..Default::default()
    })
    .await
    .expect("bench stream");
    let payload = bytes::Bytes::from(vec![7u8; 300]);
    let serial_n = (n / 4).max(100);
    let start = Instant::now();
    for i in 0..serial_n {
        js.publish(format!("bench.raw.s.{}", i % 1000), payload.clone())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
    let serial = serial_n as f64 / start.elapsed().as_secs_f64();

    let permits = Arc::new(Semaphore::new(256));
    let start = Instant::now();
    let acks = join_all((0..n * 4).map(|i| {
        let (js, payload, permits) = (js.clone(), payload.clone(), permits.clone());
        async move {
            let _permit = permits.acquire_owned().await.expect("semaphore");
            js.publish(format!("bench.raw.p.{}", i % 1000), payload)
                .await
                .expect("publish")
                .await
                .expect("ack");
        }
    }))
    .await;
    let parallel = acks.len() as f64 / start.elapsed().as_secs_f64();
    (serial, parallel)
}

async fn launch_rate(
    client: &Client,
    in_flight: usize,
    launches: usize,
) -> (f64, Duration, Duration) {
    let run = uuid_prefix();
    let permits = Arc::new(Semaphore::new(in_flight));
    let start = Instant::now();
    let mut latencies: Vec<Duration> = join_all((0..launches).map(|i| {
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
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    (rate, pct(0.50), pct(0.99))
}

fn uuid_prefix() -> String {
    taskpods_events::TaskId::mint().0.simple().to_string()[..8].to_owned()
}
