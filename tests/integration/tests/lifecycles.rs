//! Ten thousand whole lifecycles (launch → accepted → scheduled → started → running → succeeded → reaped)
//! through a real engine with the no-op backend, then every task's views are compared with a fresh fold
//! of its events: what the live loops built equals what a replay gives. Real nats-server.
//!
//! `TASKPODS_LIFECYCLES=<n>` runs another number of them (the default is the 10,000).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use taskpods_engine::config::EngineConfig;
use taskpods_engine::executor::noop::NoopConfig;
use taskpods_engine::executor::{BackendConfig, ExecutorConfig};
use taskpods_engine::server::Engine;
use taskpods_events::{LaunchTask, Names, TaskState};
use taskpods_harness::{NatsServer, measure};
use taskpods_projections::rebuild;

/// Events of one no-op lifecycle: accepted, scheduled, started, running, succeeded, reaped.
const EVENTS_PER_LIFECYCLE: u64 = 6;

fn lifecycles() -> u64 {
    std::env::var("TASKPODS_LIFECYCLES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_noop_lifecycles_end_reaped_and_every_view_equals_a_fresh_fold() {
    let n = lifecycles();
    let server = NatsServer::start();
    let config = EngineConfig {
        nats_urls: vec![server.url()],
        executor: ExecutorConfig {
            retry_delay: Duration::from_millis(200),
            ..ExecutorConfig::default()
        },
        backend: BackendConfig::Noop(NoopConfig::default()),
        ..EngineConfig::default()
    };
    let engine = Engine::start(config).await.expect("engine");
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let client = measure::client(nats, Duration::from_secs(60));

    let started = Instant::now();
    let mut launches = futures::stream::iter(0..n)
        .map(|i| {
            let client = &client;
            async move {
                let mut launch = LaunchTask::script(format!("echo {i}"));
                launch.idempotency_key = Some(format!("lifecycle-{i}"));
                client.launch(launch).await.unwrap().task_id
            }
        })
        .buffer_unordered(256);
    let mut launched = 0u64;
    while launches.next().await.is_some() {
        launched += 1;
        if launched.is_multiple_of(1000) {
            eprintln!("{launched}/{n} launched after {:?}", started.elapsed());
        }
    }
    drop(launches);

    // Every lifecycle ends reaped: the log holds all of their events.
    let names = Names::default();
    let mut events = js.get_stream(names.event_stream()).await.unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(900);
    let mut last_report = Instant::now();
    loop {
        let stored = events.info().await.unwrap().state.messages;
        if stored >= n * EVENTS_PER_LIFECYCLE {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "{stored}/{} events after {:?}",
                n * EVENTS_PER_LIFECYCLE,
                started.elapsed()
            );
            last_report = Instant::now();
        }
        assert!(
            tokio::time::Instant::now() < until,
            "lifecycles did not end: {stored} of {} events",
            n * EVENTS_PER_LIFECYCLE
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{n} lifecycles (launch to reaped) in {elapsed:?}: {:.0}/s",
        n as f64 / elapsed.as_secs_f64()
    );

    // Each task's whole life, as its events say.
    let upto = events.info().await.unwrap().state.last_sequence;
    let folded = rebuild::fold_stream(&events, &names, upto, |_| {})
        .await
        .unwrap();
    assert_eq!(folded.tasks.len() as u64, n);
    assert_eq!(folded.events, n * EVENTS_PER_LIFECYCLE);
    for (task, views) in &folded.tasks {
        assert_eq!(views.view.state, TaskState::Succeeded, "{task}");
        assert!(views.view.reaped, "{task}");
        assert_eq!(views.view.events, EVENTS_PER_LIFECYCLE, "{task}");
    }

    // Live == replay: every view the projector wrote equals a fresh fold of the task's events.
    let report = rebuild::verify(&js, &names, Duration::from_secs(300), |_| {})
        .await
        .unwrap();
    assert_eq!(report.tasks, n);
    assert!(
        report.differences.is_empty(),
        "{} views differ from a fresh fold, e.g. {:?}",
        report.differences.len(),
        report.differences.first()
    );

    // Nothing is held per finished task, and the store was read a few times per task, never per event:
    // the pod-bound observation, the hello and the intake's result each read a task of a few events
    // (an executor that read the task for each of its events would add six reads per lifecycle).
    let (loads, read) = engine.store_stats().snapshot();
    eprintln!("store: {loads} task loads, {read} events read for {n} lifecycles");
    assert!(loads <= 5 * n, "{loads} loads for {n} lifecycles");
    assert_eq!(
        taskpods_engine::metrics::METRICS.executor_tasks_held.get(),
        0,
        "the executor holds no state of a reaped task"
    );
    engine.shutdown().await.expect("shutdown");
}
