//! Several executor replicas sharing one event consumer (real nats-server; a test backend that counts
//! the sandboxes each replica starts and can be made slow):
//! - an effect that takes longer than the consumer's ack wait is done once, by one replica (the handler
//!   keeps its message alive instead of letting the server hand it to another);
//! - a replica stopped mid-effect hands its event to another at once (not after the ack wait), and the
//!   other finishes it: the task is scheduled once, by the replica that took over.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod replicas;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use taskpods_client::{Client as TaskClient, ClientConfig};
use taskpods_engine::clock::Clock;
use taskpods_engine::config::EngineConfig;
use taskpods_engine::context::EngineCtx;
use taskpods_engine::executor::{self, Backend, BackendError, ExecutorConfig};
use taskpods_engine::server::Engine;
use taskpods_engine::store::EventStore;
use taskpods_engine::topology::{self, TopologyConfig};
use taskpods_events::{LaunchTask, TaskId, TaskSpec, TaskState};
use taskpods_harness::NatsServer;
use taskpods_integration as fixtures;
use taskpods_projections::BucketSettings;
use tokio_util::sync::CancellationToken;

/// A backend that records how many sandboxes it started and takes `create_time` to start one.
#[derive(Debug, Default)]
struct CountingBackend {
    creates: AtomicUsize,
    create_time: Duration,
}

impl Backend for CountingBackend {
    async fn create(
        &self,
        task: TaskId,
        _spec: &TaskSpec,
        _deadline: DateTime<Utc>,
    ) -> Result<String, BackendError> {
        self.creates.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.create_time).await;
        Ok(task.job_name())
    }

    async fn stop(&self, _task: TaskId, _job: &str) -> Result<(), BackendError> {
        Ok(())
    }

    async fn reap(&self, _task: TaskId, _job: &str, _grace: Duration) -> Result<(), BackendError> {
        Ok(())
    }
}

/// One replica's context on `server`, named `engine_id`.
async fn replica(server: &NatsServer, engine_id: &str, shutdown_grace: Duration) -> Arc<EngineCtx> {
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let topology = topology::ensure(&js, &TopologyConfig::default())
        .await
        .expect("topology");
    let store = EventStore::new(js.clone(), topology.events.clone(), topology.names.clone())
        .with_engine(engine_id);
    Arc::new(EngineCtx {
        nats,
        js,
        topology,
        store,
        buckets: BucketSettings::default(),
        clock: Clock::wall(),
        shutdown: CancellationToken::new(),
        engine_id: engine_id.to_owned(),
        shutdown_grace,
        held: Default::default(),
        result_grace: taskpods_engine::timers::TimersConfig::default().result_grace,
    })
}

/// An engine that only takes commands (intake, projector, gateway, timers): the executors under test
/// are started on their own.
async fn command_engine(server: &NatsServer) -> (Engine, TaskClient) {
    let engine = Engine::start(EngineConfig {
        nats_urls: vec![server.url()],
        ..EngineConfig::default()
    })
    .await
    .expect("engine");
    let tasks = TaskClient::new(server.connect().await, ClientConfig::default());
    (engine, tasks)
}

async fn launch(tasks: &TaskClient, key: &str) -> TaskId {
    tasks
        .launch(LaunchTask {
            idempotency_key: Some(key.to_owned()),
            timeout_secs: Some(600),
            ..LaunchTask::script("true")
        })
        .await
        .expect("launch")
        .task_id
}

/// Who appended each `scheduled` event of `task`.
async fn scheduled_by(server: &NatsServer, task: TaskId) -> Vec<Option<String>> {
    let js = jetstream::new(server.connect().await);
    replicas::event_log(&js, &Default::default(), Duration::from_secs(30))
        .await
        .into_iter()
        .filter(|e| e.task == task && e.kind == "scheduled")
        .map(|e| e.engine)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_longer_than_the_ack_wait_is_done_once_by_one_replica() {
    let server = NatsServer::start();
    let (_engine, tasks) = command_engine(&server).await;
    let config = ExecutorConfig {
        ack_wait: Duration::from_secs(3),
        ..ExecutorConfig::default()
    };
    let slow = Duration::from_secs(9);
    let mut backends = Vec::new();
    for id in ["a", "b"] {
        let backend = Arc::new(CountingBackend {
            create_time: slow,
            ..CountingBackend::default()
        });
        let ctx = replica(&server, id, Duration::from_secs(1)).await;
        tokio::spawn(executor::run(ctx, backend.clone(), config.clone()));
        backends.push(backend);
    }
    let task = launch(&tasks, "slow-create").await;
    fixtures::until_state(&tasks, task, TaskState::Scheduled, Duration::from_secs(60)).await;
    // Three ack waits after the first create began: without the keep-alive a second would have started.
    tokio::time::sleep(slow).await;
    let creates: Vec<usize> = backends
        .iter()
        .map(|b| b.creates.load(Ordering::SeqCst))
        .collect();
    assert_eq!(
        creates.iter().sum::<usize>(),
        1,
        "one sandbox in all, per replica: {creates:?}"
    );
    assert_eq!(scheduled_by(&server, task).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_mid_effect_hands_its_event_to_another_at_once() {
    let server = NatsServer::start();
    let (_engine, tasks) = command_engine(&server).await;
    // An ack wait far longer than the test's patience: only a hand-over can get the event to b in time.
    let config = ExecutorConfig {
        ack_wait: Duration::from_secs(120),
        ..ExecutorConfig::default()
    };
    let stuck = Arc::new(CountingBackend {
        create_time: Duration::from_secs(3600),
        ..CountingBackend::default()
    });
    let a = replica(&server, "a", Duration::from_millis(500)).await;
    let a_executor = tokio::spawn(executor::run(a.clone(), stuck.clone(), config.clone()));
    let task = launch(&tasks, "handed-over").await;
    fixtures::wait_for("a starts the sandbox", Duration::from_secs(30), || async {
        (stuck.creates.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;

    let quick = Arc::new(CountingBackend::default());
    let b = replica(&server, "b", Duration::from_secs(1)).await;
    tokio::spawn(executor::run(b, quick.clone(), config));
    let stopping = Instant::now();
    a.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), a_executor)
        .await
        .expect("a's executor returns after its shutdown grace")
        .expect("joined")
        .expect("a stopped cleanly");
    let a_stopped = stopping.elapsed();
    // Half the ack wait: only a hand-over gets the event to b within it.
    fixtures::until_state(&tasks, task, TaskState::Scheduled, Duration::from_secs(60)).await;
    let taken_over = stopping.elapsed();
    println!("a stopped in {a_stopped:?}; b had scheduled the task {taken_over:?} after the stop");
    assert_eq!(quick.creates.load(Ordering::SeqCst), 1);
    assert_eq!(
        scheduled_by(&server, task).await,
        vec![Some("b".to_owned())],
        "scheduled once, by the replica that took over"
    );
}
