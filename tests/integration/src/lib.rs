//! Fixtures the integration tests share (the tests themselves live in `tests/`): launching a script,
//! reading a task's event kinds, and waiting, with a deadline that fails the test, until a task reaches a
//! state, has been reaped, or any condition holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use taskpods_client::Client;
use taskpods_events::{LaunchTask, Names, TaskId, TaskState};
use taskpods_harness::{NatsServer, nats_server_version};

/// A Brain's client on `nats` that waits up to 10 s for a reply (a loaded machine is slow, not broken).
pub fn client_on(nats: async_nats::Client) -> Client {
    taskpods_harness::measure::client(nats, Duration::from_secs(10))
}

/// Whether a command that was delivered more than once counts as stuck in
/// [`assert_nothing_stuck`]: tests that make the intake hand commands back on purpose allow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redeliveries {
    /// Commands delivered again along the way are fine, as long as every one was acked in the end.
    Allowed,
    /// Every command must have been acked at its first delivery.
    Forbidden,
}

/// Asserts the intake consumer holds nothing, within `within`: every command was acked (and, with
/// [`Redeliveries::Forbidden`], none was ever delivered twice).
pub async fn assert_nothing_stuck(
    nats: &async_nats::Client,
    within: Duration,
    redeliveries: Redeliveries,
) {
    let js = jetstream::new(nats.clone());
    let stream = js
        .get_stream(Names::default().command_stream())
        .await
        .expect("stream");
    let mut consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_consumer("taskpods-intake")
        .await
        .expect("consumer");
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let info = consumer.info().await.expect("consumer info").clone();
        let redelivered_ok = redeliveries == Redeliveries::Allowed || info.num_redelivered == 0;
        if info.num_pending == 0 && info.num_ack_pending == 0 && redelivered_ok {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "commands left unacked: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Live processes (not zombies) whose environment holds `var` (`NAME=value`): what is left of a task or a
/// pod, whatever process group, session or PID namespace its processes moved to.
pub fn processes_with_env(var: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        // Field 3 of /proc/PID/stat, after the parenthesised command name: Z and X are dead.
        let alive = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|stat| stat.rsplit_once(") ")?.1.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X');
        if alive && environ.split(|b| *b == 0).any(|v| v == var.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

/// Every live process of `task` on this machine: those with its id in their environment (the agent, the
/// code), the local sandbox's bubblewrap (which runs with `PATH` alone, see
/// `taskpods_engine::executor::local::sandbox_processes`), and all their descendants (the sandbox's
/// wrapper shell).
pub fn task_processes(task: TaskId) -> Vec<u32> {
    let mut found: std::collections::BTreeSet<u32> =
        processes_with_env(&format!("TASKPODS_TASK_ID={task}"))
            .into_iter()
            .chain(
                taskpods_engine::executor::local::sandbox_processes(task)
                    .into_iter()
                    .map(|p| p.pid),
            )
            .collect();
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let mut fields = stat.rsplit_once(") ")?.1.split_whitespace();
            let state = fields.next()?;
            let ppid = fields.next()?.parse::<u32>().ok()?;
            (state != "Z" && state != "X").then_some((pid, ppid))
        })
        .collect();
    loop {
        let before = found.len();
        for (pid, ppid) in &parents {
            if found.contains(ppid) {
                found.insert(*pid);
            }
        }
        if found.len() == before {
            return found.into_iter().collect();
        }
    }
}

/// Waits until no process has `var` in its environment ([`processes_with_env`]), failing after `within`.
pub async fn until_no_process_with_env(var: &str, within: Duration) {
    until_no_process(var, within, || processes_with_env(var)).await;
}

/// Waits until `find` finds no process, failing after `within` with what is left of `what`.
pub async fn until_no_process(what: &str, within: Duration, find: impl Fn() -> Vec<u32>) {
    let until = tokio::time::Instant::now() + within;
    loop {
        let left = find();
        if left.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "processes of {what} still running after {within:?}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

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

/// Every message of every stream of the installation, raw (payload and headers).
pub async fn every_stored_byte(server: &NatsServer) -> Vec<u8> {
    use futures::StreamExt;
    let js = async_nats::jetstream::new(server.connect().await);
    let mut names = js.stream_names();
    let mut all = Vec::new();
    let mut streams = Vec::new();
    while let Some(name) = names.next().await {
        streams.push(name.unwrap());
    }
    for name in streams {
        let stream = js.get_stream(&name).await.unwrap();
        let last = stream.cached_info().state.last_sequence;
        for seq in 1..=last {
            if let Ok(message) = stream.get_raw_message(seq).await {
                all.extend_from_slice(&message.payload);
                all.extend_from_slice(format!("{:?}", message.headers).as_bytes());
            }
        }
    }
    all
}

/// The SHA-256 of `text`, in hex (as `sha256sum` prints it, which computes it).
pub fn sha256_hex(text: &str) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// What hostile code publishes to with a task's credentials to attack task `theirs` and the engine's
/// state (the server must refuse each): forge the other task's result, progress, output and heartbeat;
/// publish an event, launch, cancel; purge the event stream, read and write a KV bucket, call the
/// JetStream API at all. (Reading its hello and listening on `_INBOX.>` are tried besides.)
pub fn attacked_subjects(names: &taskpods_events::Names, theirs: TaskId) -> Vec<String> {
    vec![
        names.agent_report(theirs, "result"),
        names.agent_report(theirs, "progress"),
        names.log(theirs),
        names.agent_heartbeat(theirs),
        names.events(theirs),
        names.launch(),
        names.cancel(theirs),
        format!("$JS.API.STREAM.PURGE.{}", names.event_stream()),
        format!(
            "$JS.API.DIRECT.GET.KV_{b}.$KV.{b}.{theirs}",
            b = names.tasks_bucket()
        ),
        format!("$KV.{}.{theirs}", names.tasks_bucket()),
        "$JS.API.INFO".to_owned(),
    ]
}

/// The repository's root (for `deploy/`).
pub fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where `scripts/install-test-deps` puts its tools (`$TASKPODS_CACHE`, else `~/.cache/taskpods`).
pub fn cache() -> std::path::PathBuf {
    std::env::var_os("TASKPODS_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache/taskpods"))
        })
        .expect("HOME or TASKPODS_CACHE is set")
}

/// `kustomize build <repo>/<dir>`, as YAML (the binary `scripts/install-test-deps` builds from its Go
/// module, or `$TASKPODS_KUSTOMIZE`).
pub fn kustomize_build(dir: &str) -> String {
    let bin = std::env::var_os("TASKPODS_KUSTOMIZE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| cache().join("bin/kustomize-v5.8.1/kustomize"));
    assert!(
        bin.exists(),
        "kustomize not found at {}: run scripts/install-test-deps",
        bin.display()
    );
    let out = std::process::Command::new(&bin)
        .arg("build")
        .arg(repo().join(dir))
        .output()
        .expect("kustomize runs");
    assert!(
        out.status.success(),
        "kustomize build {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kustomize prints UTF-8")
}

/// YAML documents as JSON objects, read by PyYAML (from the validators' virtualenv, else the system's
/// python3).
pub fn yaml_objects(yaml: &str) -> Vec<serde_json::Value> {
    let python = Some(cache().join("validators/bin/python"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "python3".into());
    let mut child = std::process::Command::new(python)
        .arg("-c")
        .arg("import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), yaml.as_bytes())
        .expect("yaml written");
    let out = child.wait_with_output().expect("python exits");
    assert!(out.status.success(), "PyYAML could not read the YAML");
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}
