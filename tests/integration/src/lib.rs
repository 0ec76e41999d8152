//! Fixtures the integration tests share (the tests themselves live in `tests/`): launching a script,
//! reading a task's event kinds, and waiting, with a deadline that fails the test, until a task reaches a
//! state, has been reaped, or any condition holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::time::Duration;

use taskpods_client::Client;
use taskpods_events::{LaunchTask, TaskId, TaskState};
use taskpods_harness::nats_server_version;

/// Launches `script` with a timeout of `timeout_secs`; returns the task.
pub async fn launch_script(client: &Client, script: &str, timeout_secs: u32) -> TaskId {
    let launch = LaunchTask {
        timeout_secs: Some(timeout_secs),
        ..LaunchTask::script(script)
    };
    client.launch(launch).await.expect("launch").task_id
}

/// The kinds of `task`'s events, in order.
pub async fn kinds(client: &Client, task: TaskId) -> Vec<&'static str> {
    client
        .history(task)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event.body.kind())
        .collect()
}

/// The task's state, folded from its events.
pub async fn state(client: &Client, task: TaskId) -> TaskState {
    client.get(task).await.unwrap().task.state
}

/// Waits until `task` has ended and been reaped (its last event is `reaped`); returns its event kinds.
pub async fn until_reaped(client: &Client, task: TaskId, within: Duration) -> Vec<&'static str> {
    let until = tokio::time::Instant::now() + within;
    loop {
        let kinds = kinds(client, task).await;
        if kinds.last() == Some(&"reaped") {
            return kinds;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "task {task} not reaped within {within:?} (server {}): {kinds:?}",
            nats_server_version()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `task` is in `state`.
pub async fn until_state(client: &Client, task: TaskId, state: TaskState, within: Duration) {
    let until = tokio::time::Instant::now() + within;
    loop {
        let now = self::state(client, task).await;
        if now == state {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "task {task} is {now:?}, not {state:?}, after {within:?}: {:?}",
            kinds(client, task).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `probe` every 200 ms until it yields a value; fails the test after `within`.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
