//! Agents end on their own when their NATS server is gone for good, as an operator would check with
//! `ps`: a real nats-server, the engine with the local backend, the real agent and bubblewrap; the
//! server is SIGKILLed under a running task, and the agent and its sandbox must be gone within the
//! agent's own bound (the task's deadline plus its kill and report graces), or promptly after a
//! SIGTERM. Before these bounds such agents retried for ever and ignored SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use taskpods_client::{Client, ClientConfig};
use taskpods_engine::server::Engine;
use taskpods_events::{TaskId, TaskState};
use taskpods_harness::NatsServer;
use taskpods_integration as fixtures;

mod common;

/// The agents' report grace (`TASKPODS_REPORT_GRACE_MS`, set by the local backend), shorter than the
/// agent's own default (30 s).
const REPORT_GRACE: Duration = Duration::from_secs(3);
/// Room on top of every bound for a loaded machine (load 15 happens here): only a process that does
/// not end at all fails.
const SLACK: Duration = Duration::from_secs(60);

struct Setup {
    server: NatsServer,
    state: common::StateDir,
    engine: Option<Engine>,
    client: Client,
    /// The agents' kill grace (`TASKPODS_KILL_GRACE_MS`).
    kill_grace: Duration,
}

impl Setup {
    async fn start() -> Self {
        let server = NatsServer::start();
        let state = common::StateDir::new();
        let mut config = common::local_engine(&server, state.path());
        common::local(&mut config).report_grace = REPORT_GRACE;
        let kill_grace = common::local(&mut config).kill_grace;
        let engine = Engine::start(config).await.expect("engine");
        let client = Client::new(server.connect().await, ClientConfig::default());
        Self {
            server,
            state,
            engine: Some(engine),
            client,
            kill_grace,
        }
    }

    /// Launches `script` and waits until its code runs in the sandbox (more than the agent alone
    /// carries the task id in its environment); returns the task and its processes.
    async fn running(&self, script: &str, timeout_secs: u32) -> (TaskId, Vec<u32>) {
        let task = fixtures::launch_script(&self.client, script, timeout_secs).await;
        fixtures::until_state(
            &self.client,
            task,
            TaskState::Running,
            Duration::from_secs(30),
        )
        .await;
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let processes = fixtures::processes_with_env(&format!("TASKPODS_TASK_ID={task}"));
            if processes.len() >= 3 {
                return (task, processes);
            }
            assert!(
                tokio::time::Instant::now() < until,
                "the sandbox of {task} never ran its code: {processes:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The agent's pid, from its sandbox's pid file.
    fn agent(&self, task: TaskId) -> u32 {
        let text =
            std::fs::read_to_string(self.state.path().join(task.job_name()).join("pid")).unwrap();
        text.split_whitespace().next().unwrap().parse().unwrap()
    }

    fn stop(mut self) {
        if let Some(engine) = self.engine.take() {
            engine.abort();
        }
    }
}

#[tokio::test]
async fn an_agent_whose_nats_server_is_killed_ends_with_its_sandbox_by_its_deadline() {
    let mut setup = Setup::start().await;
    let timeout = Duration::from_secs(5);
    let (task, _) = setup
        .running(
            "echo started; sleep 600",
            u32::try_from(timeout.as_secs()).unwrap(),
        )
        .await;
    // The engine hands the agent its graces, the report grace included (the agent's default is 30 s).
    let environ = std::fs::read(format!("/proc/{}/environ", setup.agent(task))).unwrap();
    let grace = format!("TASKPODS_REPORT_GRACE_MS={}", REPORT_GRACE.as_millis());
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|var| var == grace.as_bytes()),
        "the agent's environment lacks {grace}"
    );
    // SIGKILL: NATS is gone for good, as when a test or a cluster goes away under its agents.
    setup.server.kill();
    // The agent, bubblewrap and the code: none outlives the agent's bound.
    let bound = timeout + setup.kill_grace + REPORT_GRACE;
    common::gone(task, bound + SLACK).await;
    setup.stop();
}

#[tokio::test]
async fn sigterm_ends_an_agent_whose_nats_server_is_gone() {
    let mut setup = Setup::start().await;
    // A long deadline: only the SIGTERM can end this agent within the test.
    let (task, _) = setup.running("echo started; sleep 1800", 1800).await;
    let agent = setup.agent(task);
    setup.server.kill();
    // Give the agent time to notice the connection is gone before the signal.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &agent.to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -TERM {agent}");
    // The agent's bound after a SIGTERM is its kill grace; the slack is for the machine.
    common::gone(task, setup.kill_grace + SLACK).await;
    setup.stop();
}
