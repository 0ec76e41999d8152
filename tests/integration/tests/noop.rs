//! The no-op backend (`--backend noop`) against a real nats-server and a real engine: a task's whole life
//! (accepted, scheduled, pod bound, hello through the gateway, result through the command stream,
//! reaped) is played in-process, the views follow it, a cancel stops it, and with authorization on its
//! simulated agents speak with the per-task identities real agents get.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use taskpods_client::{Client, ClientConfig};
use taskpods_engine::config::EngineConfig;
use taskpods_engine::credentials::AuthConfig;
use taskpods_engine::executor::noop::NoopConfig;
use taskpods_engine::executor::{BackendConfig, ExecutorConfig};
use taskpods_engine::server::Engine;
use taskpods_events::{LaunchTask, TaskId, TaskState};
use taskpods_harness::NatsServer;

/// The event kinds of a no-op task's whole life.
const LIFECYCLE: [&str; 6] = [
    "accepted",
    "scheduled",
    "started",
    "running",
    "succeeded",
    "reaped",
];

/// An engine on `server` with the no-op backend whose tasks "run" for `work`.
fn noop_engine(server: &NatsServer, work: Duration) -> EngineConfig {
    EngineConfig {
        nats_urls: vec![server.url()],
        executor: ExecutorConfig {
            retry_delay: Duration::from_millis(200),
            reap_grace: Duration::from_secs(2),
            ..ExecutorConfig::default()
        },
        backend: BackendConfig::Noop(NoopConfig { work }),
        ..EngineConfig::default()
    }
}

fn client(nats: async_nats::Client) -> Client {
    Client::new(
        nats,
        ClientConfig {
            reply_timeout: Duration::from_secs(20),
            ..ClientConfig::default()
        },
    )
}

/// The kinds of `task`'s events once it is reaped (waits up to two minutes for that).
async fn kinds_once_reaped(client: &Client, task: TaskId) -> Vec<String> {
    let until = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let history = client.history(task).await.unwrap();
        let kinds: Vec<String> = history.iter().map(|e| e.kind.clone()).collect();
        if kinds.last().map(String::as_str) == Some("reaped") {
            return kinds;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "task {task} not reaped: {kinds:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_noop_task_lives_its_whole_life_and_the_views_follow() {
    let server = NatsServer::start();
    let engine = Engine::start(noop_engine(&server, Duration::ZERO))
        .await
        .expect("engine");
    let client = client(server.connect().await);

    let launched = client
        .launch(LaunchTask::script("echo this is never run"))
        .await
        .unwrap();
    let task = launched.task_id;
    let kinds = kinds_once_reaped(&client, task).await;
    assert_eq!(kinds, LIFECYCLE);
    let history = client.history(task).await.unwrap();
    let last = history.last().unwrap().sequence;
    let view = client
        .view(task, last, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(view.state, TaskState::Succeeded);
    assert!(view.reaped, "{view:?}");
    assert_eq!(view.events, 6);
    engine.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_cancelled_noop_task_is_stopped_and_reaped() {
    let server = NatsServer::start();
    // Long enough that only the cancel can end it.
    let engine = Engine::start(noop_engine(&server, Duration::from_secs(3600)))
        .await
        .expect("engine");
    let client = client(server.connect().await);

    let task = client
        .launch(LaunchTask::script("sleep 3600"))
        .await
        .unwrap()
        .task_id;
    let until = tokio::time::Instant::now() + Duration::from_secs(120);
    while client.get(task).await.unwrap().task.state != TaskState::Running {
        assert!(tokio::time::Instant::now() < until, "never running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.cancel(task, Some("enough".into())).await.unwrap();
    let kinds = kinds_once_reaped(&client, task).await;
    assert_eq!(
        &kinds[kinds.len() - 3..],
        ["cancel_requested", "cancelled", "reaped"],
        "{kinds:?}"
    );
    engine.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn with_authorization_the_noop_agents_use_per_task_identities() {
    let server = NatsServer::start_secured();
    server.wait_for_jetstream().await;
    let mut config = noop_engine(&server, Duration::ZERO);
    config.nats_creds = Some(server.creds("engine"));
    config.auth = AuthConfig {
        seal_key: Some(
            server
                .auth_dir()
                .join(taskpods_auth::material::files::SEAL_KEY),
        ),
        task_signer: Some(
            server
                .auth_dir()
                .join(taskpods_auth::material::files::TASK_SIGNER),
        ),
        ..AuthConfig::default()
    };
    let engine = Engine::start(config).await.expect("engine");
    let client = client(server.connect_as("brain").await);

    let mut tasks = Vec::new();
    for i in 0..3 {
        tasks.push(
            client
                .launch(LaunchTask::script(format!("echo {i}")))
                .await
                .unwrap()
                .task_id,
        );
    }
    for task in tasks {
        let kinds = kinds_once_reaped(&client, task).await;
        assert_eq!(kinds, LIFECYCLE);
    }
    engine.shutdown().await.expect("shutdown");
}
