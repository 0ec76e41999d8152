//! A task's cost per event does not grow with its history, and one task's flood of events delays no other
//! task: real nats-server, real engine, the no-op backend (so the engine is the only thing measured).
//!
//! Once with one engine, once with two sharing the work (each executor is handed part of the task's events
//! and reads the ones the other took: once each, never the whole history per event).
//!
//! The flood is 10,000 `progress` events of one running task, written to its subject of the event log
//! the way the store writes them. Agents cannot get that many in (the state machine records at most
//! `MAX_PROGRESS_EVENTS` reports per task; `fair_shares.rs` floods through the agent path), but the log is
//! the truth and the engine must cope with whatever length a history has: every loop that follows the
//! event stream (executor, gateway, timers, projector) sees 10,000 events of one task here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use taskpods_client::{Client, ClientConfig};
use taskpods_engine::config::EngineConfig;
use taskpods_engine::executor::noop::NoopConfig;
use taskpods_engine::executor::{BackendConfig, ExecutorConfig};
use taskpods_engine::server::Engine;
use taskpods_engine::store::EventStore;
use taskpods_events::{Event, EventBody, LaunchTask, Names, Task, TaskId, TaskState, evolve};
use taskpods_harness::NatsServer;

const FLOOD: u64 = 10_000;
const OTHERS: usize = 20;

fn client(nats: async_nats::Client) -> Client {
    Client::new(
        nats,
        ClientConfig {
            reply_timeout: Duration::from_secs(30),
            ..ClientConfig::default()
        },
    )
}

/// Waits (generously: this is no timing assertion) until `task` is as `done` says.
async fn wait_for(client: &Client, task: TaskId, done: impl Fn(&Task) -> bool, what: &str) {
    let until = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let task_now = client.get(task).await.unwrap().task;
        if done(&task_now) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{task} never {what} (still {:?})",
            task_now.state
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the executor's durable consumer has handled (acked) every event in the stream.
async fn executor_drained(js: &jetstream::Context) {
    let stream = js
        .get_stream(Names::default().event_stream())
        .await
        .unwrap();
    let mut consumer: jetstream::consumer::Consumer<pull::Config> =
        stream.get_consumer("taskpods-executor").await.unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let info = consumer.info().await.unwrap().clone();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the executor did not get through the events: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sums `(loads, events_read)` of `engines`' stores.
fn reads(engines: &[Engine]) -> (u64, u64) {
    engines
        .iter()
        .map(|e| e.store_stats().snapshot())
        .fold((0, 0), |(l, r), (l2, r2)| (l + l2, r + r2))
}

/// Starts `replicas` engines on one server, floods one running task with [`FLOOD`] events while
/// [`OTHERS`] tasks launch, checks the others start, and returns the store reads the engines made while
/// the flood went by, then ends every task.
async fn flood_while_others_start(replicas: usize) -> (u64, u64) {
    let server = NatsServer::start();
    let mut engines = Vec::new();
    for _ in 0..replicas {
        let config = EngineConfig {
            nats_urls: vec![server.url()],
            executor: ExecutorConfig {
                retry_delay: Duration::from_millis(200),
                ..ExecutorConfig::default()
            },
            // Every task "runs" until it is cancelled.
            backend: BackendConfig::Noop(NoopConfig {
                work: Duration::from_secs(3600),
            }),
            ..EngineConfig::default()
        };
        engines.push(Engine::start(config).await.expect("engine"));
    }
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let client = client(nats);

    let busy = client
        .launch(LaunchTask::script("the busy one"))
        .await
        .unwrap()
        .task_id;
    wait_for(&client, busy, |t| t.state == TaskState::Running, "running").await;
    let (loads_before, read_before) = reads(&engines);

    // The flood, in order and with expected sequences, as the store appends.
    let written = Arc::new(AtomicU64::new(0));
    let flood = tokio::spawn({
        let store = EventStore::new(
            js.clone(),
            engines[0].topology().events.clone(),
            Names::default(),
        );
        let written = written.clone();
        async move {
            let mut current = store.load(busy).await.unwrap();
            for _ in 0..FLOOD / 100 {
                let events: Vec<Event> = (0..100)
                    .map(|i| {
                        Event::new(
                            busy,
                            current.task.events + i,
                            chrono::Utc::now(),
                            EventBody::Progress {
                                message: format!("step {}", current.task.events + i),
                                percent: None,
                            },
                        )
                    })
                    .collect();
                let appended = store.append(&current, &events).await.unwrap();
                for stored in &appended {
                    current.task = evolve(std::mem::take(&mut current.task), &stored.event);
                    current.last_sequence = stored.sequence;
                }
                written.fetch_add(100, Ordering::Relaxed);
            }
        }
    });

    // Other tasks launch while the flood is under way, and all of them start.
    while written.load(Ordering::Relaxed) < FLOOD / 10 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut others = Vec::new();
    for i in 0..OTHERS {
        others.push(
            client
                .launch(LaunchTask::script(format!("other {i}")))
                .await
                .unwrap()
                .task_id,
        );
    }
    let during = written.load(Ordering::Relaxed);
    for &task in &others {
        wait_for(&client, task, |t| t.state == TaskState::Running, "running").await;
    }
    eprintln!(
        "{replicas} engine(s): {OTHERS} other tasks launched after {during} flood events and running by \
         event {} of {FLOOD}",
        written.load(Ordering::Relaxed)
    );
    flood.await.unwrap();
    executor_drained(&js).await;
    let (loads, read) = reads(&engines);
    let (loads, read) = (loads - loads_before, read - read_before);
    let events = FLOOD + 4 * OTHERS as u64;
    eprintln!(
        "{replicas} engine(s): store reads while {events} events went by: {loads} task reads, {read} \
         events read ({:.4} per event)",
        read as f64 / events as f64
    );

    // The engines still work for the busy task, and everything ends.
    for &task in others.iter().chain([&busy]) {
        client.cancel(task, None).await.unwrap();
    }
    for &task in others.iter().chain([&busy]) {
        wait_for(&client, task, |t| t.reaped, "reaped").await;
    }
    assert_eq!(
        client.history(busy).await.unwrap().len() as u64,
        4 + FLOOD + 3,
        "accepted, scheduled, started, running, the flood, cancel_requested, cancelled, reaped"
    );
    for engine in engines {
        engine.shutdown().await.expect("shutdown");
    }
    (loads, read)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_of_one_task_delay_no_other_task_and_cost_no_reads_per_event() {
    let (loads, read) = flood_while_others_start(1).await;
    // Each other task is read twice at its start (its pod bound and its hello: a few events each); the
    // flood itself costs no read at all. A read per event of the busy task would be about 50 million.
    assert!(
        loads <= 4 * OTHERS as u64 && read <= 40 * OTHERS as u64,
        "reads grew with the flood: {loads} reads, {read} events read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_sharing_a_floods_events_read_each_missing_event_once() {
    let (_, read) = flood_while_others_start(2).await;
    // Each executor is handed about half of the flood and reads the half the other took, about once
    // each; a read of the whole history per missing event would be tens of millions.
    assert!(
        read <= 3 * FLOOD + 40 * OTHERS as u64,
        "reads grew with the history: {read} events read for a flood of {FLOOD}"
    );
}
