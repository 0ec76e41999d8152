//! Attacks from inside a task, against nats-server running with authorization as deployed (operator
//! mode, `taskpods auth init` material, the engine minting one identity per task).
//!
//! On the local backend the user's code runs under bubblewrap with no network: it cannot reach NATS at
//! all and never sees its agent's credentials (shown first). The attacks then assume the worst, a code
//! that has taken over its agent: the agent binary is wrapped so the credentials the engine handed it are
//! kept (as a compromised agent would hold them), and every attack is made with them. Each is refused by
//! the server with a permission error; the task's own work still succeeds; the other task is untouched.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream;
use taskpods_client::Client;
use taskpods_engine::executor::local::LocalConfig;
use taskpods_engine::server::Engine;
use taskpods_events::{LaunchTask, Names, TaskId, TaskState};
use taskpods_harness::{NatsServer, nats_server_version};
use taskpods_integration::{client_on, every_stored_byte, sha256_hex};
use tokio::sync::mpsc;

/// How long past its deadline a task's identity lasts in these tests.
const GRACE: Duration = Duration::from_secs(1);

struct Setup {
    server: NatsServer,
    state: common::StateDir,
    stolen: tempfile::TempDir,
    engine: Engine,
    brain: Client,
    names: Names,
}

/// An agent wrapper that keeps the credentials the engine hands the agent on its standard input, as a
/// compromised agent would, then runs the real agent with them.
fn compromised_agent(dir: &Path) -> PathBuf {
    let wrapper = dir.join("agent.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nstolen=\"{dir}/$TASKPODS_TASK_ID.creds\"\ncat > \"$stolen\"\nexec \"{agent}\" < \"$stolen\"\n",
            dir = dir.display(),
            agent = env!("CARGO_BIN_EXE_taskpods-agent-under-test"),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

/// Everything the engines of this test binary log, at debug level.
fn engine_log() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOG: std::sync::OnceLock<&'static std::sync::Mutex<Vec<u8>>> =
        std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let log: &'static std::sync::Mutex<Vec<u8>> = Box::leak(Box::default());
        let writer = move || LogWriter(log);
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_writer(writer)
            .with_ansi(false)
            .try_init();
        log
    })
}

struct LogWriter(&'static std::sync::Mutex<Vec<u8>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Setup {
    async fn start() -> Self {
        engine_log();
        let server = NatsServer::start_secured();
        server.wait_for_jetstream().await;
        let state = common::StateDir::new();
        let stolen = tempfile::tempdir().unwrap();
        // The shared local engine, with identities on (operator mode) and the compromised agent.
        let mut config = common::local_engine(&server, state.path());
        common::with_identities(&mut config, &server);
        config.auth.task_credentials_grace = GRACE;
        config.executor.reap_grace = Duration::from_secs(3);
        let local = common::local(&mut config);
        local.agent_bin = compromised_agent(stolen.path());
        local.max_procs = LocalConfig::default().max_procs;
        let engine = Engine::start(config).await.expect("engine");
        let brain = client_on(server.connect_as("brain").await);
        Self {
            server,
            state,
            stolen,
            engine,
            brain,
            names: Names::default(),
        }
    }

    async fn launch(&self, script: &str, timeout_secs: u32) -> TaskId {
        let launch = LaunchTask {
            timeout_secs: Some(timeout_secs),
            ..LaunchTask::script(script)
        };
        self.brain.launch(launch).await.expect("launch").task_id
    }

    async fn until_state(&self, task: TaskId, state: TaskState, within: Duration) {
        let until = tokio::time::Instant::now() + within;
        loop {
            let now = self.brain.get(task).await.unwrap().task.state;
            if now == state {
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "task {task} is {now:?}, not {state:?}, after {within:?} (server {})",
                nats_server_version()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The credentials the engine handed `task`'s agent.
    fn stolen(&self, task: TaskId) -> String {
        std::fs::read_to_string(self.stolen.path().join(format!("{task}.creds"))).unwrap()
    }

    /// A connection with the identity the engine handed `task`'s agent, recording the server's errors.
    async fn as_task(&self, task: TaskId) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
        connect_recording(
            &self.server.url(),
            &self.stolen(task),
            Some(taskpods_events::subject::task_inbox_prefix(task)),
        )
        .await
    }

    /// Everything `task` wrote to its output.
    async fn stdout(&self, task: TaskId) -> String {
        let js = jetstream::new(self.server.connect().await);
        let mut out = Vec::new();
        taskpods_engine::cli::logs::read(
            &js,
            &self.names,
            task,
            false,
            Duration::from_secs(2),
            async || true,
            |piece| {
                if let taskpods_engine::cli::logs::Piece::Stdout(b) = piece {
                    out.extend_from_slice(&b);
                }
            },
        )
        .await
        .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// A connection with `creds` that records the server's error messages (permission violations arrive
/// that way), with the inbox prefix `inbox` (a task's agent uses `_INBOX_<task>`).
async fn connect_recording(
    url: &str,
    creds: &str,
    inbox: Option<String>,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut options = async_nats::ConnectOptions::with_credentials(creds)
        .expect("credentials")
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        });
    if let Some(prefix) = inbox {
        options = options.custom_inbox_prefix(prefix);
    }
    (options.connect(url).await.expect("connect"), rx)
}

/// Waits for the server's permission error for `action` (`publish` or `subscription`) on `subject`.
async fn refused(errors: &mut mpsc::UnboundedReceiver<String>, action: &str, subject: &str) {
    let wanted = format!("permissions violation for {action} to \"{subject}\"").to_lowercase();
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, errors.recv()).await {
            Ok(Some(error)) if error.to_lowercase().contains(&wanted) => return,
            Ok(Some(other)) => seen.push(other),
            _ => panic!("the server did not refuse: {wanted} (it said {seen:?})"),
        }
    }
}

#[tokio::test]
async fn code_in_a_local_task_sees_no_credentials_and_cannot_reach_nats() {
    let setup = Setup::start().await;
    let auth = setup.server.auth_dir();
    let script = format!(
        r#"
env | grep -i -E 'nats|jwt|seed|creds' && echo LEAK:env
grep -l -s -a 'NATS USER JWT' /proc/[0-9]*/environ /proc/[0-9]*/cmdline /proc/[0-9]*/fd/0 && echo LEAK:proc
ls "{state}" 2>/dev/null && echo LEAK:state
cat "{auth}/task-signer.nk" "{auth}/engine.creds" 2>/dev/null && echo LEAK:auth
python3 -c 'import socket; socket.create_connection(("127.0.0.1", {port}), 2)' 2>/dev/null && echo LEAK:network
echo checked
"#,
        state = setup.state.path().display(),
        auth = auth.display(),
        port = setup.server.port(),
    );
    let task = setup.launch(&script, 60).await;
    let ended = setup
        .brain
        .wait(task, Duration::from_secs(60))
        .await
        .expect("task ends");
    assert!(
        matches!(ended.state, TaskState::Succeeded),
        "{:?}",
        ended.state
    );
    let out = setup.stdout(task).await;
    assert!(out.contains("checked"), "the script ran: {out}");
    assert!(!out.contains("LEAK"), "the code found a way out: {out}");
    // The agent did get an identity of its own, outside the sandbox.
    assert!(setup.stolen(task).contains("BEGIN NATS USER JWT"));
}

#[tokio::test]
async fn a_compromised_agent_can_do_nothing_but_its_own_task() {
    let setup = Setup::start().await;
    let names = &setup.names;
    let mine = setup.launch("echo mine; sleep 4; echo mine-done", 60).await;
    let theirs = setup
        .launch(
            "echo theirs; sleep 4; echo '{\"ok\": true}' > /tmp/result.json",
            60,
        )
        .await;
    setup
        .until_state(mine, TaskState::Running, Duration::from_secs(30))
        .await;
    setup
        .until_state(theirs, TaskState::Running, Duration::from_secs(30))
        .await;
    let (client, mut errors) = connect_recording(
        &setup.server.url(),
        &setup.stolen(mine),
        Some(taskpods_events::subject::task_inbox_prefix(mine)),
    )
    .await;

    // Read another task's instructions.
    let _ = client
        .publish_with_reply(names.agent_hello(theirs), "_INBOX_x.y", "".into())
        .await;
    refused(&mut errors, "publish", &names.agent_hello(theirs)).await;
    // Listen to every reply.
    let _all = client.subscribe("_INBOX.>").await.unwrap();
    refused(&mut errors, "subscription", "_INBOX.>").await;
    // Forge another task's reports, write events and commands, touch the JetStream API.
    for subject in taskpods_integration::attacked_subjects(names, theirs) {
        client.publish(subject.clone(), "x".into()).await.unwrap();
        refused(&mut errors, "publish", &subject).await;
    }

    // Its own work still succeeds: a progress report of its own is stored (acked on its own inbox).
    let js = jetstream::new(client.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("{mine}:progress:own"));
    js.publish_with_headers(
        names.agent_report(mine, "progress"),
        headers,
        taskpods_events::codec::to_msgpack(&taskpods_events::AgentReport::Progress {
            message: "own".into(),
            percent: Some(50.0),
        })
        .unwrap()
        .into(),
    )
    .await
    .expect("own publish")
    .await
    .expect("own report stored");

    // Both tasks end as their own code decided; the other task's result is its own.
    let theirs_ended = setup
        .brain
        .wait(theirs, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(matches!(theirs_ended.state, TaskState::Succeeded));
    let view = setup.brain.get(theirs).await.unwrap();
    let result = format!("{:?}", view.task.state);
    assert!(result.contains("Succeeded"), "{result}");
    let mine_ended = setup
        .brain
        .wait(mine, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(matches!(mine_ended.state, TaskState::Succeeded));
    assert!(setup.stdout(theirs).await.contains("theirs"));
}

#[tokio::test]
async fn a_task_identity_expires_shortly_after_the_deadline() {
    let setup = Setup::start().await;
    let task = setup.launch("sleep 30", 2).await;
    setup
        .until_state(task, TaskState::Running, Duration::from_secs(30))
        .await;
    let creds = setup.stolen(task);
    // Still valid while the task runs.
    let (early, _) = connect_recording(&setup.server.url(), &creds, None).await;
    drop(early);
    let ended = match setup.brain.wait(task, Duration::from_secs(30)).await {
        Ok(ended) => ended,
        Err(e) => panic!(
            "{e}: {:?}\n{}",
            setup.brain.get(task).await,
            setup.server.log_tail(40)
        ),
    };
    assert!(
        matches!(ended.state, TaskState::TimedOut),
        "{:?}",
        ended.state
    );
    let deadline = ended.deadline.unwrap();
    let expiry = deadline + chrono::TimeDelta::from_std(GRACE).unwrap();
    let wait =
        (expiry - chrono::Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(1500);
    tokio::time::sleep(wait).await;
    let refused = async_nats::ConnectOptions::with_credentials(&creds)
        .unwrap()
        .connect(setup.server.url())
        .await
        .expect_err("an expired task identity must be refused");
    assert!(
        refused.to_string().to_lowercase().contains("authorization"),
        "{refused}"
    );
}

/// The event stream's first sequence and message count.
async fn event_stream_state(setup: &Setup) -> (u64, u64) {
    let js = jetstream::new(setup.server.connect().await);
    let mut stream = js.get_stream(setup.names.event_stream()).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    (state.first_sequence, state.messages)
}

const HOSTILE_REPLIES: usize = 3;

fn hostile_replies(names: &Names, task: TaskId) -> [String; HOSTILE_REPLIES] {
    [
        format!("$JS.API.STREAM.PURGE.{}", names.event_stream()),
        format!("$KV.{}.{task}", names.tasks_bucket()),
        names.events(task),
    ]
}

#[tokio::test]
async fn replies_go_only_to_inboxes_and_the_streams_keep_every_message() {
    let setup = Setup::start().await;
    let names = &setup.names;
    let task = setup.launch("sleep 3", 60).await;
    setup
        .until_state(task, TaskState::Running, Duration::from_secs(30))
        .await;
    let (first, before) = event_stream_state(&setup).await;

    // A Brain names hostile reply subjects on its launches.
    let brain = setup.server.connect_as("brain").await;
    let js = jetstream::new(brain.clone());
    for (i, reply) in hostile_replies(names, task).iter().enumerate() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("hostile-reply-{i}"));
        headers.insert("Content-Type", "application/json");
        headers.insert(taskpods_events::HEADER_REPLY_TO, reply.as_str());
        js.publish_with_headers(names.launch(), headers, r#"{"script": "true"}"#.into())
            .await
            .unwrap()
            .await
            .expect("launch stored");
    }
    // A task's agent asks for its instructions with hostile reply subjects.
    let (agent, _) = connect_recording(
        &setup.server.url(),
        &setup.stolen(task),
        Some(taskpods_events::subject::task_inbox_prefix(task)),
    )
    .await;
    for reply in hostile_replies(names, task) {
        agent
            .publish_with_reply(names.agent_hello(task), reply, "".into())
            .await
            .unwrap();
    }
    agent.flush().await.unwrap();

    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    let count = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    while count(&setup.engine.intake_stats.refused_replies) < HOSTILE_REPLIES as u64
        || count(&setup.engine.gateway_stats.refused_replies) < HOSTILE_REPLIES as u64
    {
        assert!(
            tokio::time::Instant::now() < until,
            "refused: {} replies, {} hellos",
            count(&setup.engine.intake_stats.refused_replies),
            count(&setup.engine.gateway_stats.refused_replies)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing was purged, nothing planted: the stream still starts where it did, holds at least every
    // message it held, and every event of the task (and its view) still decodes.
    let (first_after, after) = event_stream_state(&setup).await;
    assert_eq!(first_after, first);
    assert!(after >= before, "{after} < {before}");
    let ended = setup
        .brain
        .wait(task, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        matches!(ended.state, TaskState::Succeeded),
        "{:?}",
        ended.state
    );
    let view = setup
        .brain
        .view(task, 0, Duration::from_secs(10))
        .await
        .expect("the task's view still decodes");
    assert_eq!(view.task, task);
}

#[tokio::test]
async fn an_api_token_reaches_the_script_and_nowhere_else() {
    let setup = Setup::start().await;
    let token = format!("tok-{}", uuid_like());
    let digest = sha256_hex(&token);
    let launch = LaunchTask {
        env: std::collections::BTreeMap::from([("API_TOKEN".to_owned(), token.clone())]),
        timeout_secs: Some(60),
        ..LaunchTask::script("printf %s \"$API_TOKEN\" | sha256sum")
    };
    let task = setup.brain.launch(launch).await.expect("launch").task_id;
    let ended = setup
        .brain
        .wait(task, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        matches!(ended.state, TaskState::Succeeded),
        "{:?}",
        ended.state
    );
    assert!(
        setup.stdout(task).await.contains(&digest),
        "the script saw the value"
    );
    // A launch that cannot be read, carrying the token: dead-lettered without it.
    let brain = setup.server.connect_as("brain").await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    headers.insert("Nats-Msg-Id", "unreadable-with-token");
    jetstream::new(brain)
        .publish_with_headers(
            setup.names.launch(),
            headers,
            format!(r#"{{"script": "x", "env": {{"API_TOKEN": "{token}"}}, "nonsense": true}}"#)
                .into(),
        )
        .await
        .unwrap()
        .await
        .expect("stored");
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while setup
        .engine
        .intake_stats
        .dead_lettered
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(tokio::time::Instant::now() < until, "not dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let stored = every_stored_byte(&setup.server).await;
    assert!(
        !stored.windows(token.len()).any(|w| w == token.as_bytes()),
        "the token is stored in a stream or bucket"
    );
    assert!(
        stored.windows(9).any(|w| w == b"API_TOKEN"),
        "names stay readable"
    );
    let log = engine_log().lock().unwrap().clone();
    assert!(log.len() > 1000, "the engine logged at debug level");
    assert!(
        !log.windows(token.len()).any(|w| w == token.as_bytes()),
        "the token is in the engine log"
    );
}

fn uuid_like() -> String {
    TaskId::mint().to_string().replace('-', "")
}

#[tokio::test]
async fn a_brain_cannot_write_events_or_agent_reports_and_an_operator_cannot_launch() {
    let server = NatsServer::start_secured();
    server.wait_for_jetstream().await;
    let names = Names::default();
    let task = TaskId::mint();
    let creds = |role: &str| std::fs::read_to_string(server.creds(role)).unwrap();

    let (brain, mut errors) = connect_recording(&server.url(), &creds("brain"), None).await;
    for subject in [
        names.events(task),
        names.agent_report(task, "result"),
        names.agent_report(task, "progress"),
        names.agent_hello(task),
        names.log(task),
        format!("$KV.{}.{task}", names.tasks_bucket()),
        format!("$JS.API.STREAM.PURGE.{}", names.event_stream()),
        format!("$JS.API.CONSUMER.CREATE.{}", names.command_stream()),
        // Another client's answers (a Brain's replies, a rebuild's write acknowledgements).
        "_INBOX.someone.1".to_owned(),
    ] {
        brain.publish(subject.clone(), "x".into()).await.unwrap();
        refused(&mut errors, "publish", &subject).await;
    }

    let (operator, mut errors) = connect_recording(&server.url(), &creds("operator"), None).await;
    for subject in [
        names.launch(),
        names.events(task),
        names.agent_report(task, "result"),
        format!("$JS.API.STREAM.DELETE.{}", names.event_stream()),
        "_INBOX.someone.1".to_owned(),
    ] {
        operator.publish(subject.clone(), "x".into()).await.unwrap();
        refused(&mut errors, "publish", &subject).await;
    }
}

#[tokio::test]
async fn with_identities_files_move_only_through_the_engine_and_only_the_tasks_own() {
    use taskpods_events::EventBody;
    use taskpods_events::files::{FileGet, FileGetReply, FileRefusal};
    let setup = Setup::start().await;
    let names = &setup.names;
    // The Brain puts an input for each task with its own identity, and launches them.
    let theirs = TaskId::mint();
    let secret = setup
        .brain
        .put_input(theirs, "secret.txt", &mut &b"their data"[..])
        .await
        .expect("a Brain may put inputs");
    setup
        .brain
        .launch(LaunchTask {
            task_id: Some(theirs.0),
            inputs: vec![secret.clone()],
            ..LaunchTask::script("sleep 5")
        })
        .await
        .expect("launch");
    let mine = TaskId::mint();
    let own = setup
        .brain
        .put_input(mine, "own.txt", &mut &b"my data"[..])
        .await
        .unwrap();
    setup
        .brain
        .launch(LaunchTask {
            task_id: Some(mine.0),
            inputs: vec![own],
            ..LaunchTask::script("tr a-z A-Z < /tmp/in/own.txt > /tmp/out/upper.txt; sleep 3")
        })
        .await
        .expect("launch");
    setup
        .until_state(mine, TaskState::Running, Duration::from_secs(30))
        .await;
    let (client, mut errors) = setup.as_task(mine).await;

    // Its own identity gets its own input through the engine...
    let reply = get_input(&client, names.agent_files(mine, "get"), "own.txt").await;
    assert!(
        matches!(&reply, FileGetReply::Chunk { data, .. } if data.as_ref() == b"my data"),
        "{reply:?}"
    );
    // ...but not another task's, by name on its own subject...
    let reply = get_input(&client, names.agent_files(mine, "get"), "secret.txt").await;
    assert!(
        matches!(
            reply,
            FileGetReply::Refused {
                code: FileRefusal::NotAnInput,
                ..
            }
        ),
        "{reply:?}"
    );
    // ...nor on the other task's subject (the server refuses the publish)...
    let request = FileGet {
        input: "secret.txt".into(),
        offset: 0,
    };
    client
        .publish(names.agent_files(theirs, "get"), codec_bytes(&request))
        .await
        .unwrap();
    refused(&mut errors, "publish", &names.agent_files(theirs, "get")).await;
    // ...and it cannot hand over artifacts as the other task either.
    let forged = taskpods_events::files::FilePut {
        path: "forged.txt".into(),
        offset: 0,
        data: bytes::Bytes::from_static(b"forged"),
        last: true,
    };
    client
        .publish(names.agent_files(theirs, "put"), codec_bytes(&forged))
        .await
        .unwrap();
    refused(&mut errors, "publish", &names.agent_files(theirs, "put")).await;
    // ...and the object store itself is closed to it: no stream API, no object subjects.
    let chunk = format!("$O.{}.C.forged", names.files_bucket());
    client.publish(chunk.clone(), "x".into()).await.unwrap();
    refused(&mut errors, "publish", &chunk).await;
    let info = format!("$JS.API.STREAM.INFO.OBJ_{}", names.files_bucket());
    client.publish(info.clone(), "".into()).await.unwrap();
    refused(&mut errors, "publish", &info).await;
    // Nor can it read the other task's input's bytes from the stream, or sniff chunks as they are put.
    let direct = format!("$JS.API.DIRECT.GET.OBJ_{}", names.files_bucket());
    client
        .publish(direct.clone(), r#"{"last_by_subj": "$O.>"}"#.into())
        .await
        .unwrap();
    refused(&mut errors, "publish", &direct).await;
    let sniff = format!("$O.{}.>", names.files_bucket());
    let _subscription = client.subscribe(sniff.clone()).await.unwrap();
    refused(&mut errors, "subscription", &sniff).await;

    // The task's own work went through: its artifact is stored, listed and readable by the Brain.
    let ended = setup
        .brain
        .wait(mine, Duration::from_secs(60))
        .await
        .expect("task ends");
    assert!(matches!(ended.state, TaskState::Succeeded), "{ended:?}");
    let history = setup.brain.history(mine).await.unwrap();
    assert!(history.iter().any(|e| matches!(
        &e.event.body,
        EventBody::Succeeded { outcome } if outcome.artifacts.len() == 1
    )));
    let mut upper = Vec::new();
    setup
        .brain
        .get_artifact(mine, "upper.txt", &mut upper)
        .await
        .expect("the Brain reads artifacts");
    assert_eq!(upper, b"MY DATA");
    let listed = setup
        .brain
        .artifacts(mine)
        .await
        .expect("the Brain lists artifacts");
    assert_eq!(
        listed.iter().map(|a| a.path.as_str()).collect::<Vec<_>>(),
        ["upper.txt"]
    );
    assert!(
        setup.brain.artifacts(theirs).await.unwrap().is_empty(),
        "nothing was stored as the other task's artifact"
    );
}

fn codec_bytes<T: serde::Serialize>(value: &T) -> bytes::Bytes {
    taskpods_events::codec::to_msgpack(value).unwrap().into()
}

/// Asks the engine for `input` from its start on `subject`, as an agent would.
async fn get_input(
    client: &async_nats::Client,
    subject: String,
    input: &str,
) -> taskpods_events::files::FileGetReply {
    let request = taskpods_events::files::FileGet {
        input: input.to_owned(),
        offset: 0,
    };
    let reply = client
        .request(subject, codec_bytes(&request))
        .await
        .expect("the engine answers");
    taskpods_events::codec::decode("reply", &reply.payload, taskpods_events::Encoding::Msgpack)
        .unwrap()
}
