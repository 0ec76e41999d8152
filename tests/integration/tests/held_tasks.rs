//! Nothing is held per finished task: a real engine on a real nats-server holds something for each live
//! task (the event store's latest state, the gateway's live and running tasks, the timers, the executor,
//! the no-op sandboxes, the projector's cached views), and once every task has ended and its sandbox is gone, every
//! one of those structures is empty again ([`Engine::held_tasks`] counts them). The `memory` bench shows
//! the same in bytes; this is the count that keeps the leak from coming back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use taskpods_client::{Client, ClientConfig};
use taskpods_engine::config::EngineConfig;
use taskpods_engine::executor::noop::NoopConfig;
use taskpods_engine::executor::{BackendConfig, ExecutorConfig};
use taskpods_engine::held::HeldTasks;
use taskpods_engine::server::Engine;
use taskpods_events::{CancelTask, Input, LaunchTask, TaskId, TaskState};
use taskpods_harness::NatsServer;

/// How long the engine may take to settle (generous: the machine may be loaded).
const SETTLE: Duration = Duration::from_secs(180);

fn client(nats: async_nats::Client) -> Client {
    Client::new(
        nats,
        ClientConfig {
            reply_timeout: Duration::from_secs(60),
            ..ClientConfig::default()
        },
    )
}

async fn launch(client: &Client, n: usize) -> Vec<TaskId> {
    futures::stream::iter(0..n)
        .map(|i| async move {
            client
                .launch(LaunchTask::script(format!("echo {i}")))
                .await
                .expect("launch")
                .task_id
        })
        .buffer_unordered(64)
        .collect()
        .await
}

async fn cancel(client: &Client, tasks: &[TaskId]) {
    futures::stream::iter(tasks)
        .for_each_concurrent(64, |task| async move {
            client
                .cancel(*task, Some("held tasks test".into()))
                .await
                .expect("cancel");
        })
        .await;
}

/// An engine (no backend) whose intake never forgets for being quiet: what it lets go of, it lets go of
/// because the tasks ended.
async fn never_idle_engine(server: &NatsServer) -> Engine {
    let mut config = EngineConfig {
        nats_urls: vec![server.url()],
        ..EngineConfig::default()
    };
    config.intake.cache_idle = Duration::from_secs(3600);
    Engine::start(config).await.expect("engine")
}

/// Waits until `engine`'s counts pass `done`; the last counts.
async fn held_until(engine: &Engine, done: impl Fn(&HeldTasks) -> bool) -> HeldTasks {
    let until = tokio::time::Instant::now() + SETTLE;
    loop {
        let held = engine.held_tasks();
        if done(&held) || tokio::time::Instant::now() >= until {
            return held;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every task in `tasks` is in `state`.
async fn all_in(client: &Client, tasks: &[TaskId], state: TaskState) {
    let until = tokio::time::Instant::now() + SETTLE;
    for task in tasks {
        loop {
            let now = client.get(*task).await.expect("get").task.state;
            if now == state {
                break;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "task {task} is {now:?}, not {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Tasks accepted and cancelled before any sandbox (the `memory` bench's waves): each is held by the
/// store (its latest state, once: the intake keeps no copy of its own), the gateway, the timers and the
/// projector while live, and by none of them once cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_tasks_are_held_while_live_and_forgotten_once_cancelled() {
    const N: usize = 300;
    let server = NatsServer::start();
    let engine = never_idle_engine(&server).await;
    let client = client(server.connect().await);
    assert_eq!(engine.held_tasks(), HeldTasks::default());

    let tasks = launch(&client, N).await;
    let n = N as u64;
    let live = held_until(&engine, |h| {
        h.gateway_live == n && h.projector_cached == n && h.timers_deadlines == n
    })
    .await;
    assert_eq!(
        (
            live.store_latest,
            live.gateway_live,
            live.timers_deadlines,
            live.timers_startups,
            live.projector_cached
        ),
        (n, n, n, n, n),
        "each live task is held by the store, gateway, timers and projector: {live:?}"
    );

    cancel(&client, &tasks).await;
    let after = held_until(&engine, |h| h.total() == 0).await;
    assert_eq!(
        after,
        HeldTasks::default(),
        "something is still held for the {N} cancelled tasks"
    );
    engine.shutdown().await.expect("shutdown");
}

/// Whole lifecycles with the no-op backend, and running tasks cancelled: once they are reaped, nothing is
/// held anywhere, including the store's latest states, the intake's progress allowances of tasks that
/// other loops ended (it forgets them once quiet) and the no-op sandboxes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaped_tasks_leave_nothing_held() {
    const RUNNING: usize = 40;
    const LIFECYCLES: usize = 200;
    let server = NatsServer::start();
    let mut config = EngineConfig {
        nats_urls: vec![server.url()],
        executor: ExecutorConfig {
            retry_delay: Duration::from_millis(200),
            reap_grace: Duration::ZERO,
            ..ExecutorConfig::default()
        },
        // Each task "runs" until it is cancelled.
        backend: BackendConfig::Noop(NoopConfig {
            work: Duration::from_secs(600),
        }),
        ..EngineConfig::default()
    };
    config.intake.cache_idle = Duration::from_secs(1);
    let engine = Engine::start(config).await.expect("engine");
    let client = client(server.connect().await);

    let running = launch(&client, RUNNING).await;
    all_in(&client, &running, TaskState::Running).await;
    let n = RUNNING as u64;
    let live = held_until(&engine, |h| {
        h.gateway_running == n && h.projector_cached == n
    })
    .await;
    assert_eq!(
        (
            live.store_latest,
            live.gateway_live,
            live.gateway_running,
            live.executor_held,
            live.noop_sandboxes,
            live.timers_deadlines,
            live.projector_cached
        ),
        (n, n, n, n, n, n, n),
        "each running task is held by the store, gateway, executor, sandbox, timers and projector: {live:?}"
    );

    // Cancelled while running: the intake records `cancelling`, the executor stops the sandbox and
    // records the end, then reaps it.
    cancel(&client, &running).await;
    all_in(&client, &running, TaskState::Cancelled).await;
    let after = held_until(&engine, |h| h.total() == 0).await;
    assert_eq!(
        after,
        HeldTasks::default(),
        "something is still held for the {RUNNING} cancelled tasks"
    );
    engine.shutdown().await.expect("shutdown");

    // Whole lifecycles to `succeeded` and `reaped`, on an engine whose agents finish at once.
    let server = NatsServer::start();
    let client = self::client(server.connect().await);
    let engine = Engine::start(EngineConfig {
        nats_urls: vec![server.url()],
        executor: ExecutorConfig {
            retry_delay: Duration::from_millis(200),
            reap_grace: Duration::ZERO,
            ..ExecutorConfig::default()
        },
        backend: BackendConfig::Noop(NoopConfig::default()),
        ..EngineConfig::default()
    })
    .await
    .expect("engine");
    let done = launch(&client, LIFECYCLES).await;
    all_in(&client, &done, TaskState::Succeeded).await;
    for task in &done {
        let until = tokio::time::Instant::now() + SETTLE;
        while !client.get(*task).await.expect("get").task.reaped {
            assert!(tokio::time::Instant::now() < until, "{task} not reaped");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let after = held_until(&engine, |h| h.total() == 0).await;
    assert_eq!(
        after,
        HeldTasks::default(),
        "something is still held for the {LIFECYCLES} reaped tasks"
    );
    engine.shutdown().await.expect("shutdown");
}

/// Tasks another engine ends: this engine holds each one's latest state from its own `accepted` append,
/// and lets it go once it sees (following the event stream) the end another engine wrote. Before, such
/// states stayed until the store's bound emptied them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_another_engine_ends_are_not_held() {
    const N: usize = 100;
    let server = NatsServer::start();
    let engine = never_idle_engine(&server).await;
    let client = client(server.connect().await);
    let tasks = launch(&client, N).await;
    let n = N as u64;
    let live = held_until(&engine, |h| h.store_latest == n && h.gateway_live == n).await;
    assert_eq!(
        (live.store_latest, live.gateway_live),
        (n, n),
        "the engine that accepted them holds them: {live:?}"
    );

    // Another engine (its own connection and store) cancels every task.
    let js = async_nats::jetstream::new(server.connect().await);
    let topology = taskpods_engine::topology::ensure(&js, &Default::default())
        .await
        .expect("topology");
    let other = taskpods_engine::store::EventStore::new(
        js.clone(),
        topology.events.clone(),
        topology.names.clone(),
    )
    .with_engine("other");
    for task in &tasks {
        let cancel = Input::Cancel(CancelTask {
            task_id: task.0,
            reason: Some("cancelled by another engine".into()),
            requester: None,
        });
        let executed = other
            .execute(*task, &cancel, chrono::Utc::now(), None)
            .await
            .expect("the other engine cancels the task");
        assert_eq!(executed.task.task.state, TaskState::Cancelled);
    }
    let after = held_until(&engine, |h| h.total() == 0).await;
    assert_eq!(
        after,
        HeldTasks::default(),
        "something is still held for the {N} tasks another engine cancelled"
    );
    engine.shutdown().await.expect("shutdown");
}
