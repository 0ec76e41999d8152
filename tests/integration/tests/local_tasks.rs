//! The local backend end to end: a real nats-server, the engine (intake, gateway, timers, executor), the
//! real agent binary and real bubblewrap. Short heartbeat and deadline settings keep it quick.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use taskpods_client::{Client, ClientConfig};
use taskpods_engine::cli::logs::{self, Piece};
use taskpods_engine::config::EngineConfig;
use taskpods_engine::executor::local::{LocalConfig, ProcessId};
use taskpods_engine::server::Engine;
use taskpods_events::{
    EventBody, FailureReason, LaunchTask, Names, ResourceRequest, TaskId, TaskState,
};
use taskpods_harness::NatsServer;
use taskpods_integration as fixtures;
use taskpods_integration::client_on;

mod common;

const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);

/// The shared local engine with a short heartbeat timeout (for the lost-agent tests) and room for 8 MiB
/// of output.
fn config(server: &NatsServer, state_dir: &Path) -> EngineConfig {
    let mut config = common::local_engine(server, state_dir);
    config.gateway.heartbeat_interval = HEARTBEAT_INTERVAL;
    config.gateway.heartbeat_timeout = HEARTBEAT_TIMEOUT;
    config.gateway.output_cap_bytes = 8 << 20;
    config.executor.reap_grace = Duration::from_secs(3);
    config
}

struct Setup {
    server: NatsServer,
    state: common::StateDir,
    engine: Option<Engine>,
    client: Client,
}

impl Setup {
    async fn start() -> Self {
        let server = NatsServer::start();
        let state = common::StateDir::new();
        let engine = Engine::start(config(&server, state.path()))
            .await
            .expect("engine");
        let client = client_on(server.connect().await);
        Self {
            server,
            state,
            engine: Some(engine),
            client,
        }
    }

    async fn launch(&self, script: &str, timeout_secs: u32) -> TaskId {
        fixtures::launch_script(&self.client, script, timeout_secs).await
    }

    /// Waits until the task has ended and been reaped; returns the event kinds.
    async fn finished(&self, task: TaskId, within: Duration) -> Vec<&'static str> {
        fixtures::until_reaped(&self.client, task, within).await
    }

    async fn until_state(&self, task: TaskId, state: TaskState, within: Duration) {
        fixtures::until_state(&self.client, task, state, within).await;
    }

    /// The agent of a running task, from the sandbox's pid file.
    fn agent(&self, task: TaskId) -> ProcessId {
        let text =
            std::fs::read_to_string(self.state.path().join(task.job_name()).join("pid")).unwrap();
        let mut parts = text.split_whitespace();
        ProcessId {
            pid: parts.next().unwrap().parse().unwrap(),
            start: parts.next().unwrap().parse().unwrap(),
        }
    }

    /// Waits until `task` succeeded and was reaped, and checks its standard output.
    async fn succeeded_with(&self, task: TaskId, stdout: &[u8]) {
        let kinds = self.finished(task, Duration::from_secs(40)).await;
        assert_eq!(
            kinds,
            ["accepted", "scheduled", "running", "succeeded", "reaped"]
        );
        let (out, _, _) = self.output(task).await;
        assert_eq!(out, stdout);
    }

    async fn output(&self, task: TaskId) -> (Vec<u8>, Vec<u8>, Vec<String>) {
        let js = jetstream::new(self.server.connect().await);
        let (mut out, mut err, mut marks) = (Vec::new(), Vec::new(), Vec::new());
        logs::read(
            &js,
            &Names::default(),
            task,
            false,
            Duration::from_secs(2),
            async || true,
            |piece| match piece {
                Piece::Stdout(b) => out.extend_from_slice(&b),
                Piece::Stderr(b) => err.extend_from_slice(&b),
                Piece::Truncated(t) => marks.push(t),
                Piece::End => marks.push("end".into()),
            },
        )
        .await
        .unwrap();
        (out, err, marks)
    }
}

#[tokio::test]
async fn a_script_succeeds_with_ordered_events_progress_and_complete_output() {
    let setup = Setup::start().await;
    let script = r#"
echo "start as $(id -u)"
echo "::progress:: 10% warming up"
seq 1 100000
echo "::progress:: 90% nearly there"
head -c 100000 /dev/zero | tr '\0' 'L'; echo
printf '\000\001\002\377\376' >&2
echo '{"ok": true}' > /tmp/result.json
"#;
    let task = setup.launch(script, 120).await;
    let kinds = setup.finished(task, Duration::from_secs(60)).await;
    assert_eq!(
        kinds,
        [
            "accepted",
            "scheduled",
            "running",
            "progress",
            "progress",
            "succeeded",
            "reaped"
        ]
    );
    let history = setup.client.history(task).await.unwrap();
    let EventBody::Succeeded { outcome } = &history[5].event.body else {
        panic!("{:?}", history[5]);
    };
    let EventBody::Progress { message, percent } = &history[3].event.body else {
        panic!();
    };
    assert_eq!((message.as_str(), *percent), ("warming up", Some(10.0)));
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(outcome.result, Some(serde_json::json!({"ok": true})));

    let mut expected = b"start as 1000\n::progress:: 10% warming up\n".to_vec();
    for i in 1..=100_000 {
        expected.extend_from_slice(format!("{i}\n").as_bytes());
    }
    expected.extend_from_slice(b"::progress:: 90% nearly there\n");
    expected.extend_from_slice(&[b'L'; 100_000]);
    expected.push(b'\n');
    let (out, err, marks) = setup.output(task).await;
    assert_eq!(out.len(), expected.len());
    assert!(out == expected, "stdout differs from what the script wrote");
    assert_eq!(err, [0, 1, 2, 255, 254]);
    assert_eq!(marks, ["end"]);
    assert_eq!(outcome.stdout_bytes, expected.len() as u64);
    assert_eq!(outcome.stderr_bytes, 5);
    // The task's view, as a UI reads it, carries the output size and a short tail.
    let view = setup
        .client
        .view(task, history[5].sequence, Duration::from_secs(10))
        .await
        .expect("the views include the result");
    assert_eq!(view.output_bytes, Some(expected.len() as u64 + 5));
    let tail = view.output_tail.expect("a tail in the view");
    assert!(tail.contains(&"L".repeat(1500)), "the tail ends the output");
    assert!(tail.len() <= 2048 + 8, "{}", tail.len());
    assert!(!setup.state.path().join(task.job_name()).exists());
    common::gone(task, Duration::from_secs(5)).await;
}

/// Values from Kubernetes Secrets need the Kubernetes backend: the local backend's engine rejects such a
/// launch, saying so, and runs nothing.
#[tokio::test]
async fn a_secret_key_ref_is_rejected_with_a_clear_error() {
    let setup = Setup::start().await;
    let launch = LaunchTask {
        secret_env: std::collections::BTreeMap::from([(
            "API_TOKEN".to_owned(),
            taskpods_events::env::SecretKeyRef {
                name: "brain-tokens".into(),
                key: "api-token".into(),
            },
        )]),
        ..LaunchTask::script("echo ran")
    };
    let error = setup.client.launch(launch).await.expect_err("rejected");
    let taskpods_client::ClientError::Rejected { task_id, problems } = error else {
        panic!("not a rejection: {error}");
    };
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].field, "secret_env");
    assert!(
        problems[0].message.contains("need the Kubernetes backend"),
        "{problems:?}"
    );
    assert_eq!(
        setup.client.get(task_id).await.unwrap().task.state,
        TaskState::Rejected
    );
}

#[tokio::test]
async fn exit_code_3_fails_with_its_code() {
    let setup = Setup::start().await;
    let task = setup.launch("echo failing >&2; exit 3", 60).await;
    let kinds = setup.finished(task, Duration::from_secs(30)).await;
    assert_eq!(
        kinds,
        ["accepted", "scheduled", "running", "failed", "reaped"]
    );
    let task_now = setup.client.get(task).await.unwrap().task;
    assert_eq!(
        task_now.state,
        TaskState::Failed {
            reason: FailureReason::NonZeroExit { exit_code: 3 }
        }
    );
    let (_, err, _) = setup.output(task).await;
    assert_eq!(err, b"failing\n");
}

#[tokio::test]
async fn a_script_past_its_deadline_times_out_and_is_killed() {
    let setup = Setup::start().await;
    let task = setup.launch("echo sleeping; sleep 300", 2).await;
    setup
        .until_state(task, TaskState::Running, Duration::from_secs(20))
        .await;
    let agent = setup.agent(task);
    assert!(agent.alive());
    assert!(!common::processes_of(task).is_empty());
    let kinds = setup.finished(task, Duration::from_secs(30)).await;
    assert_eq!(
        kinds,
        ["accepted", "scheduled", "running", "timed_out", "reaped"]
    );
    assert!(!agent.alive());
    common::gone(task, Duration::from_secs(5)).await;
    let (out, _, _) = setup.output(task).await;
    assert_eq!(out, b"sleeping\n");
}

#[tokio::test]
async fn cancel_while_running_cancels_and_kills() {
    let setup = Setup::start().await;
    let task = setup.launch("echo working; sleep 300", 120).await;
    setup
        .until_state(task, TaskState::Running, Duration::from_secs(20))
        .await;
    let agent = setup.agent(task);
    setup
        .client
        .cancel(task, Some("test".into()))
        .await
        .expect("cancel");
    let kinds = setup.finished(task, Duration::from_secs(30)).await;
    assert_eq!(
        kinds,
        [
            "accepted",
            "scheduled",
            "running",
            "cancel_requested",
            "cancelled",
            "reaped"
        ]
    );
    assert!(!agent.alive());
    common::gone(task, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn escapes_fail_and_say_so_in_the_output() {
    let setup = Setup::start().await;
    let port = setup.server.port();
    let script = format!(
        r#"
bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' && echo "NATS REACHABLE" || echo "network: blocked"
echo escape > /etc/taskpods-escape && echo "ROOT WRITABLE" || echo "root: read-only"
head -c 8000000 /dev/zero > /tmp/fill && echo "TMP UNLIMITED" || echo "tmp: full"
rm -f /tmp/fill
sh -c 'while :; do sleep 2 & done'
echo "fork bomb: stopped ($?)"
"#
    );
    let task = setup.launch(&script, 60).await;
    let kinds = setup.finished(task, Duration::from_secs(40)).await;
    assert_eq!(kinds[3], "succeeded", "{kinds:?}");
    let (out, err, _) = setup.output(task).await;
    let (out, err) = (String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    for expected in [
        "network: blocked",
        "root: read-only",
        "tmp: full",
        "fork bomb: stopped (2)",
    ] {
        assert!(
            out.contains(expected),
            "{expected:?} missing:\n{out}\n{err}"
        );
    }
    for says in [
        "Read-only file system",
        "No space left on device",
        "Cannot fork",
    ] {
        assert!(err.contains(says), "{says:?} missing from stderr:\n{err}");
    }
}

#[tokio::test]
async fn a_killed_agent_is_lost_after_the_heartbeat_timeout() {
    let setup = Setup::start().await;
    let task = setup
        .launch("echo partial > /tmp/out/partial.txt; sleep 300", 120)
        .await;
    setup
        .until_state(task, TaskState::Running, Duration::from_secs(20))
        .await;
    // The agent stages the task's /tmp/in and /tmp/out on the host; a killed agent cannot remove them.
    let staged = LocalConfig::default()
        .files_dir
        .join(format!("taskpods-files-{task}"));
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while !staged.join("out/partial.txt").exists() {
        assert!(tokio::time::Instant::now() < until, "{staged:?} not staged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent = setup.agent(task);
    assert!(
        !taskpods_engine::executor::local::sandbox_processes(task).is_empty(),
        "bubblewrap is found by its command line"
    );
    let killed = std::time::Instant::now();
    std::process::Command::new("kill")
        .args(["-KILL", &agent.pid.to_string()])
        .status()
        .unwrap();
    setup
        .until_state(
            task,
            TaskState::Failed {
                reason: FailureReason::AgentLost,
            },
            Duration::from_secs(20),
        )
        .await;
    // The gateway counts from the agent's last heartbeat, which came up to one interval before the kill.
    assert!(
        killed.elapsed() + HEARTBEAT_INTERVAL >= HEARTBEAT_TIMEOUT,
        "lost after {:?}, before the timeout",
        killed.elapsed()
    );
    let kinds = setup.finished(task, Duration::from_secs(20)).await;
    assert_eq!(
        kinds,
        ["accepted", "scheduled", "running", "failed", "reaped"]
    );
    common::gone(task, Duration::from_secs(5)).await;
    // The reap removed what the killed agent left behind.
    assert!(!staged.exists(), "{staged:?} is left behind after the reap");
}

#[tokio::test]
async fn an_engine_restart_mid_run_neither_kills_nor_duplicates_the_task() {
    let mut setup = Setup::start().await;
    let task = setup.launch("echo before; sleep 4; echo after", 120).await;
    setup
        .until_state(task, TaskState::Running, Duration::from_secs(20))
        .await;
    let agent = setup.agent(task);
    setup.engine.take().unwrap().abort();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(agent.alive(), "the agent must outlive the engine");
    setup.engine = Some(
        Engine::start(config(&setup.server, setup.state.path()))
            .await
            .expect("engine restarts"),
    );
    let kinds = setup.finished(task, Duration::from_secs(40)).await;
    assert_eq!(
        kinds,
        ["accepted", "scheduled", "running", "succeeded", "reaped"]
    );
    let (out, _, marks) = setup.output(task).await;
    assert_eq!(out, b"before\nafter\n");
    assert_eq!(marks, ["end"]);
    setup.engine.take().unwrap().shutdown().await.unwrap();
}

/// An agent that reported its result and exited is silent, like a dead one. While its result waits in
/// the command queue (here: no engine was running when it came, and the test holds it as a busy intake
/// would), the heartbeat timeout must not fail the task: the result wins once the intake gets to it.
#[tokio::test]
async fn a_result_waiting_in_the_command_queue_is_not_taken_for_a_lost_agent() {
    let mut setup = Setup::start().await;
    let task = setup.launch("sleep 2; echo done", 120).await;
    setup
        .until_state(task, TaskState::Running, Duration::from_secs(20))
        .await;
    let agent = setup.agent(task);
    setup.engine.take().unwrap().abort();
    fixtures::wait_for(
        "the agent to report and exit",
        Duration::from_secs(60),
        async || (!agent.alive()).then_some(()),
    )
    .await;

    let held = hold_commands(&setup.server).await;
    let result_subject = Names::default().agent_report(task, "result");
    assert!(
        held.iter().any(|m| m.subject.as_str() == result_subject),
        "the agent's result is queued: {:?}",
        held.iter().map(|m| m.subject.as_str()).collect::<Vec<_>>()
    );

    // A new engine watches the running task, hears nothing for three heartbeat timeouts, and waits.
    setup.engine = Some(
        Engine::start(config(&setup.server, setup.state.path()))
            .await
            .expect("engine restarts"),
    );
    let silent_until = tokio::time::Instant::now() + 3 * HEARTBEAT_TIMEOUT;
    while tokio::time::Instant::now() < silent_until {
        let history = setup.client.history(task).await.unwrap();
        assert_eq!(
            history.last().map(|e| e.event.body.kind()),
            Some("running"),
            "a silent agent whose result is queued is not lost: {:?}",
            history
                .iter()
                .map(|e| e.event.body.kind())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(HEARTBEAT_INTERVAL).await;
    }
    // The intake gets to the result: the task succeeds with the agent's output, and nothing failed it.
    let_through(held).await;
    setup.succeeded_with(task, b"done\n").await;
    setup.engine.take().unwrap().shutdown().await.unwrap();
}

/// The deadline is when the code must have finished, not when the engine must have read its report. Two
/// agents report while no engine runs and their results wait in the command queue (the test then holds
/// them as a busy intake would) until both deadlines have passed: the one sent before its deadline wins
/// over the timeout; the one sent after it (the agent killed its code past the deadline) loses.
#[tokio::test]
async fn a_result_sent_before_the_deadline_wins_over_the_timeout_and_one_sent_after_loses() {
    let mut setup = Setup::start().await;
    let in_time = setup.launch("sleep 1; echo done", 20).await;
    let late = setup.launch("echo started; sleep 120", 3).await;
    for task in [in_time, late] {
        setup
            .until_state(task, TaskState::Running, Duration::from_secs(20))
            .await;
    }
    let agents = [setup.agent(in_time), setup.agent(late)];
    setup.engine.take().unwrap().abort();
    fixtures::wait_for(
        "both agents to report and exit",
        Duration::from_secs(60),
        async || agents.iter().all(|a| !a.alive()).then_some(()),
    )
    .await;
    let deadline = async |task| {
        let history = setup.client.history(task).await.unwrap();
        history
            .iter()
            .find_map(|e| match &e.event.body {
                EventBody::Accepted { deadline, .. } => Some(*deadline),
                _ => None,
            })
            .expect("accepted")
    };
    let last_deadline = deadline(in_time).await.max(deadline(late).await);
    let held = hold_commands(&setup.server).await;
    let names = Names::default();
    for task in [in_time, late] {
        let subject = names.agent_report(task, "result");
        assert!(
            held.iter().any(|m| m.subject.as_str() == subject),
            "{task}'s result is queued"
        );
    }
    // Past both deadlines, a new engine: its timers find both due at once.
    while chrono::Utc::now() <= last_deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    setup.engine = Some(
        Engine::start(config(&setup.server, setup.state.path()))
            .await
            .expect("engine restarts"),
    );
    setup
        .until_state(late, TaskState::TimedOut, Duration::from_secs(30))
        .await;
    // The timers looked at both; the task whose result was sent in time is still running, waiting.
    for _ in 0..10 {
        assert_eq!(
            fixtures::state(&setup.client, in_time).await,
            TaskState::Running,
            "a result sent before the deadline holds the timeout off"
        );
        tokio::time::sleep(HEARTBEAT_INTERVAL).await;
    }
    let_through(held).await;
    setup.succeeded_with(in_time, b"done\n").await;
    let kinds = setup.finished(late, Duration::from_secs(40)).await;
    assert_eq!(
        kinds,
        ["accepted", "scheduled", "running", "timed_out", "reaped"],
        "the result sent after the deadline is refused"
    );
    fixtures::assert_nothing_stuck(
        &setup.server.connect().await,
        Duration::from_secs(30),
        fixtures::Redeliveries::Allowed,
    )
    .await;
    setup.engine.take().unwrap().shutdown().await.unwrap();
}

/// Hands commands held by [`hold_commands`] back to the intake.
async fn let_through(held: Vec<jetstream::Message>) {
    for message in held {
        message
            .ack_with(jetstream::AckKind::Nak(None))
            .await
            .unwrap();
    }
}

/// Takes every queued command off the intake's consumer and holds it unacked (its ack wait is 30 s), as
/// a busy intake would.
async fn hold_commands(server: &NatsServer) -> Vec<jetstream::Message> {
    let js = jetstream::new(server.connect().await);
    let consumer: jetstream::consumer::PullConsumer = js
        .get_stream(Names::default().command_stream())
        .await
        .unwrap()
        .get_consumer("taskpods-intake")
        .await
        .unwrap();
    let mut held = Vec::new();
    let mut batch = consumer
        .fetch()
        .max_messages(100)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    while let Some(message) = futures::StreamExt::next(&mut batch).await {
        held.push(message.unwrap());
    }
    held
}

#[tokio::test]
async fn an_agent_that_cannot_start_fails_the_task_with_a_backend_error() {
    let server = NatsServer::start();
    let state = common::StateDir::new();
    let mut config = config(&server, state.path());
    common::local(&mut config).agent_bin = state.path().join("no-such-agent");
    let engine = Engine::start(config).await.expect("engine");
    let client = Client::new(server.connect().await, ClientConfig::default());
    let task = client
        .launch(LaunchTask::script("echo never"))
        .await
        .unwrap()
        .task_id;
    let ended = client.wait(task, Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        ended.state,
        TaskState::Failed {
            reason: FailureReason::BackendError
        }
    );
    let history = client.history(task).await.unwrap();
    let EventBody::Failed { message, .. } = &history[1].event.body else {
        panic!("{history:?}");
    };
    assert!(
        message
            .as_deref()
            .unwrap_or("")
            .contains("cannot start the agent"),
        "{message:?}"
    );
    engine.shutdown().await.unwrap();
}

/// What `taskpods logs -f` does: follows from the first chunk, live, until the end marker; for an agent
/// that died without one, until the task has ended and the output has been quiet.
async fn follow(setup: &Setup, task: TaskId) -> (Vec<u8>, Vec<String>) {
    let js = jetstream::new(setup.server.connect().await);
    let (mut out, mut marks) = (Vec::new(), Vec::new());
    let client = &setup.client;
    logs::read(
        &js,
        &Names::default(),
        task,
        true,
        Duration::from_millis(500),
        async || client.get(task).await.unwrap().task.state.is_terminal(),
        |piece| match piece {
            Piece::Stdout(b) | Piece::Stderr(b) => out.extend_from_slice(&b),
            Piece::Truncated(t) => marks.push(t),
            Piece::End => marks.push("end".into()),
        },
    )
    .await
    .unwrap();
    (out, marks)
}

#[tokio::test]
async fn logs_follow_live_output_to_its_end_even_when_the_agent_dies() {
    let setup = Setup::start().await;
    let task = setup
        .launch("echo one; sleep 1; echo two; sleep 1; echo three", 60)
        .await;
    let (out, marks) = tokio::time::timeout(Duration::from_secs(30), follow(&setup, task))
        .await
        .expect("follow ends at the end marker");
    assert_eq!(out, b"one\ntwo\nthree\n");
    assert_eq!(marks, ["end"]);

    let task = setup.launch("echo last words; sleep 300", 60).await;
    setup
        .until_state(task, TaskState::Running, Duration::from_secs(20))
        .await;
    // The agent dies once its output is stored (a fixed wait raced the output's flush on a busy machine).
    let stored = tokio::time::Instant::now() + Duration::from_secs(20);
    while setup.output(task).await.0.is_empty() {
        assert!(tokio::time::Instant::now() < stored, "no output stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent = setup.agent(task);
    std::process::Command::new("kill")
        .args(["-KILL", &agent.pid.to_string()])
        .status()
        .unwrap();
    let (out, marks) = tokio::time::timeout(Duration::from_secs(30), follow(&setup, task))
        .await
        .expect("follow ends once the task has ended");
    assert_eq!(out, b"last words\n");
    assert!(marks.is_empty(), "{marks:?}");
}

#[tokio::test]
async fn the_script_and_its_environment_stay_out_of_the_process_list() {
    let setup = Setup::start().await;
    let launch = LaunchTask {
        timeout_secs: Some(60),
        env: [("API_TOKEN".to_owned(), "tok-7f3a9c".to_owned())].into(),
        ..LaunchTask::script("# marker-5e1d\necho \"token ${#API_TOKEN}\"; sleep 300")
    };
    let task = setup.client.launch(launch).await.unwrap().task_id;
    setup
        .until_state(task, TaskState::Running, Duration::from_secs(20))
        .await;
    // The code runs once its first line is out (under load, more than 300 ms after the hello: the
    // cancel then stopped it before it printed anything).
    fixtures::wait_for(
        "the script's first line",
        Duration::from_secs(30),
        async || (setup.output(task).await.0 == b"token 10\n").then_some(()),
    )
    .await;
    let mut seen = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline);
            assert!(!text.contains("marker-5e1d"), "script visible: {text}");
            assert!(!text.contains("tok-7f3a9c"), "env visible: {text}");
            seen += 1;
        }
    }
    assert!(seen > 0);
    setup.client.cancel(task, None).await.unwrap();
    setup.finished(task, Duration::from_secs(20)).await;
    let (out, _, _) = setup.output(task).await;
    assert_eq!(out, b"token 10\n");
}

#[tokio::test]
async fn an_agent_that_never_says_hello_fails_at_the_startup_timeout() {
    let server = NatsServer::start();
    let state = common::StateDir::new();
    let mut config = config(&server, state.path());
    common::local(&mut config).agent_bin = "/bin/true".into();
    config.timers.startup_timeout = Duration::from_secs(1);
    let engine = Engine::start(config).await.expect("engine");
    let client = Client::new(server.connect().await, ClientConfig::default());
    let task = client
        .launch(LaunchTask::script("echo never"))
        .await
        .unwrap()
        .task_id;
    let ended = client.wait(task, Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        ended.state,
        TaskState::Failed {
            reason: FailureReason::AgentLost
        }
    );
    let history = client.history(task).await.unwrap();
    let kinds: Vec<&str> = history.iter().map(|e| e.event.body.kind()).collect();
    assert_eq!(kinds[..3], ["accepted", "scheduled", "failed"]);
    let EventBody::Failed { message, .. } = &history[2].event.body else {
        panic!("{history:?}");
    };
    assert!(
        message
            .as_deref()
            .unwrap_or("")
            .contains("did not ask for its instructions"),
        "{message:?}"
    );
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_nats_restart_mid_run_loses_and_duplicates_no_output() {
    let mut setup = Setup::start().await;
    // Agents reconnect with their own backoff: give them more than the usual test timeout to be heard.
    setup.engine.take().unwrap().shutdown().await.unwrap();
    let mut config = config(&setup.server, setup.state.path());
    config.gateway.heartbeat_timeout = Duration::from_secs(10);
    setup.engine = Some(Engine::start(config).await.expect("engine"));
    let task = setup
        .launch(
            "for i in $(seq 1 40); do echo \"line $i\"; sleep 0.1; done",
            120,
        )
        .await;
    setup
        .until_state(task, TaskState::Running, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    setup.server.kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    setup.server.restart();
    setup.server.wait_for_jetstream().await;
    let kinds = setup.finished(task, Duration::from_secs(60)).await;
    assert_eq!(
        kinds,
        ["accepted", "scheduled", "running", "succeeded", "reaped"]
    );
    let (out, _, marks) = setup.output(task).await;
    let expected: String = (1..=40).map(|i| format!("line {i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&out), expected);
    assert_eq!(marks, ["end"]);
}

#[tokio::test]
async fn agent_mode_hands_the_goal_to_the_entrypoint() {
    let server = NatsServer::start();
    let state = common::StateDir::new();
    let mut config = config(&server, state.path());
    common::local(&mut config).agent_entrypoint = Some("/bin/echo".into());
    let engine = Engine::start(config).await.expect("engine");
    let setup_client = Client::new(server.connect().await, ClientConfig::default());
    let launch = LaunchTask {
        mode: taskpods_events::Mode::Agent,
        goal: Some("summarise the logs; be brief".into()),
        timeout_secs: Some(60),
        ..LaunchTask::default()
    };
    let task = setup_client.launch(launch).await.unwrap().task_id;
    let ended = setup_client
        .wait(task, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(ended.state, TaskState::Succeeded);
    let js = jetstream::new(server.connect().await);
    let mut out = Vec::new();
    logs::read(
        &js,
        &Names::default(),
        task,
        true,
        Duration::from_millis(500),
        async || true,
        |piece| {
            if let Piece::Stdout(b) = piece {
                out.extend_from_slice(&b);
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(out, b"summarise the logs; be brief\n");
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_cancel_racing_the_sandbox_creation_leaves_nothing_behind() {
    let setup = Setup::start().await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let task = setup.launch("sleep 300", 60).await;
        let _ = setup.client.cancel(task, None).await;
        tasks.push(task);
    }
    for task in tasks {
        let ended = setup
            .client
            .wait(task, Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(ended.state, TaskState::Cancelled);
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        while setup.state.path().join(task.job_name()).exists() {
            assert!(
                tokio::time::Instant::now() < until,
                "sandbox of {task} left behind"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        common::gone(task, Duration::from_secs(10)).await;
    }
}

#[tokio::test]
async fn a_task_reaches_neither_the_engine_s_data_nor_more_memory_than_its_limit() {
    let setup = Setup::start().await;
    let store = setup
        .server
        .log_path()
        .parent()
        .unwrap()
        .join("jetstream")
        .display()
        .to_string();
    let state = setup.state.path().display().to_string();
    assert!(
        std::path::Path::new(&store).is_dir(),
        "the NATS store exists"
    );
    let script = format!(
        r#"
ls {store} && echo "NATS STORE VISIBLE" || echo "nats store: absent"
ls {state} && echo "ENGINE STATE VISIBLE" || echo "engine state: absent"
ls /root /home || echo "homes: absent"
echo "limit: $(ulimit -v) KiB"
perl -e '$x = "a" x (256 << 20); print "ALLOCATED\n"' || echo "256 MiB: refused"
"#
    );
    let launch = LaunchTask {
        timeout_secs: Some(60),
        resources: ResourceRequest {
            memory_request: Some("64Mi".into()),
            memory_limit: Some("128Mi".into()),
            ..ResourceRequest::default()
        },
        ..LaunchTask::script(&script)
    };
    let task = setup.client.launch(launch).await.unwrap().task_id;
    let kinds = setup.finished(task, Duration::from_secs(40)).await;
    assert_eq!(kinds[3], "succeeded", "{kinds:?}");
    let (out, err, _) = setup.output(task).await;
    let (out, err) = (String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    for line in [
        "nats store: absent",
        "engine state: absent",
        "homes: absent",
        "limit: 131072 KiB",
        "256 MiB: refused",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}\n{err}");
    }
    assert!(err.contains("Out of memory"), "{err}");
    assert!(
        !out.contains("VISIBLE") && !out.contains("ALLOCATED"),
        "{out}"
    );
}

#[tokio::test]
async fn a_brain_follows_every_transition_of_its_own_tasks_and_nothing_else() {
    use futures::StreamExt;
    use taskpods_client::{TaskFilter, WatchFrom};

    let setup = Setup::start().await;
    let launch = |script: &str, requester: &str, team: Option<&str>| LaunchTask {
        timeout_secs: Some(60),
        requester: Some(requester.into()),
        labels: team
            .map(|t| [("team".to_owned(), t.to_owned())].into())
            .unwrap_or_default(),
        ..LaunchTask::script(script)
    };
    // Accepted before the watch starts: matched by its first event when its next transition arrives.
    let early = setup
        .client
        .launch(launch("sleep 1", "brain-a", Some("ml")))
        .await
        .unwrap()
        .task_id;
    let mut watch = Box::pin(
        setup
            .client
            .watch_tasks(
                TaskFilter::requester("brain-a").label("team", "ml"),
                WatchFrom::New,
            )
            .await
            .unwrap(),
    );
    let mine_ok = setup
        .client
        .launch(launch("echo ok", "brain-a", Some("ml")))
        .await
        .unwrap()
        .task_id;
    let other_brain = setup
        .client
        .launch(launch("echo b", "brain-b", Some("ml")))
        .await
        .unwrap()
        .task_id;
    let other_team = setup
        .client
        .launch(launch("echo c", "brain-a", Some("ops")))
        .await
        .unwrap()
        .task_id;
    let mine_failed = setup
        .client
        .launch(launch("exit 4", "brain-a", Some("ml")))
        .await
        .unwrap()
        .task_id;
    let mine = [early, mine_ok, mine_failed];
    let mut seen: Vec<(TaskId, &'static str, u64)> = Vec::new();
    let collect = async {
        while let Some(watched) = watch.next().await {
            let watched = watched.unwrap();
            assert_eq!(watched.spec.requester.as_deref(), Some("brain-a"));
            seen.push((
                watched.stored.task(),
                watched.stored.event.body.kind(),
                watched.stored.sequence,
            ));
            let reaped = |t: &TaskId| seen.iter().any(|(s, k, _)| s == t && *k == "reaped");
            if mine.iter().all(reaped) {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), collect)
        .await
        .unwrap_or_else(|_| panic!("not every task of brain-a was followed to its end"));
    let kinds = |task: TaskId| -> Vec<&str> {
        seen.iter()
            .filter(|(t, _, _)| *t == task)
            .map(|(_, k, _)| *k)
            .collect()
    };
    assert_eq!(
        kinds(mine_ok),
        ["accepted", "scheduled", "running", "succeeded", "reaped"]
    );
    assert_eq!(
        kinds(mine_failed),
        ["accepted", "scheduled", "running", "failed", "reaped"]
    );
    assert_eq!(kinds(early).last(), Some(&"reaped"));
    assert!(
        !kinds(early).contains(&"accepted"),
        "only what happened after the watch started"
    );
    assert!(kinds(other_brain).is_empty() && kinds(other_team).is_empty());
    assert!(seen.windows(2).all(|w| w[0].2 < w[1].2), "in stream order");

    // Resuming from a sequence (after a Brain restart) sees exactly what came from there on.
    let resume_at = seen[seen.len() - 3].2;
    let resumed: Vec<u64> = setup
        .client
        .watch_tasks(
            TaskFilter::requester("brain-a").label("team", "ml"),
            WatchFrom::Sequence(resume_at),
        )
        .await
        .unwrap()
        .take(3)
        .map(|w| w.unwrap().stored.sequence)
        .collect()
        .await;
    let expected: Vec<u64> = seen[seen.len() - 3..].iter().map(|(_, _, s)| *s).collect();
    assert_eq!(resumed, expected);
}
