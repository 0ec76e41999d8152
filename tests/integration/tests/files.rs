//! Inputs and artifacts end to end on the local backend: a real nats-server (its object store), the
//! engine (intake, gateway, files loop, executor), the real agent and real bubblewrap; the test plays the
//! Brain through the client, and, for the attacks, a task's agent sending its own file requests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use taskpods_client::{Client, ClientConfig};
use taskpods_engine::files::FilesConfig;
use taskpods_engine::server::Engine;
use taskpods_events::files::{
    FileGet, FileGetReply, FileLimits, FilePut, FilePutReply, FileRefusal, InputFile, input_object,
};
use taskpods_events::{
    Encoding, EventBody, FailureReason, LaunchTask, Names, TaskId, TaskOutcome, TaskState, codec,
};
use taskpods_harness::{NatsServer, nats_server_version};

const MIB: u64 = 1 << 20;

struct Setup {
    server: NatsServer,
    _state: common::StateDir,
    /// Where the agents stage `/tmp/in` and `/tmp/out`.
    files_dir: tempfile::TempDir,
    engine: Option<Engine>,
    client: Client,
}

impl Setup {
    async fn start(files: FileLimits, delete_on_reap: bool) -> Self {
        let server = NatsServer::start();
        let state = common::StateDir::new();
        let files_dir = common::files_dir();
        let mut config = common::local_engine(&server, state.path());
        config.intake.policy.files = files;
        config.executor.reap_grace = Duration::from_secs(3);
        config.files = FilesConfig {
            delete_on_reap,
            ..FilesConfig::default()
        };
        let local = common::local(&mut config);
        local.tmp_bytes = 8 << 20;
        local.kill_grace = Duration::from_secs(4);
        local.files_dir = files_dir.path().to_owned();
        let engine = Engine::start(config).await.expect("engine");
        let client = Client::new(server.connect().await, ClientConfig::default());
        Self {
            server,
            _state: state,
            files_dir,
            engine: Some(engine),
            client,
        }
    }

    /// Launches `script` with `inputs` as task `task`.
    async fn launch(&self, task: TaskId, script: &str, inputs: Vec<InputFile>, timeout: u32) {
        self.client
            .launch(LaunchTask {
                task_id: Some(task.0),
                timeout_secs: Some(timeout),
                inputs,
                ..LaunchTask::script(script)
            })
            .await
            .expect("launch");
    }

    /// Waits until the task has ended; returns its terminal event.
    async fn ended(&self, task: TaskId) -> EventBody {
        let until = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let history = self.client.history(task).await.unwrap();
            if let Some(end) = history.iter().find(|e| e.event.body.is_terminal()) {
                return end.event.body.clone();
            }
            assert!(
                tokio::time::Instant::now() < until,
                "task {task} did not end (server {}): {:?}",
                nats_server_version(),
                history
                    .iter()
                    .map(|e| e.event.body.kind())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn reaped(&self, task: TaskId) {
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        while !self.client.get(task).await.unwrap().task.reaped {
            assert!(tokio::time::Instant::now() < until, "{task} not reaped");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn artifact(&self, task: TaskId, path: &str) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.client
            .get_artifact(task, path, &mut bytes)
            .await
            .unwrap_or_else(|e| panic!("artifact {path}: {e}"));
        bytes
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(engine) = self.engine.take() {
            engine.abort();
        }
    }
}

fn outcome_of(end: &EventBody) -> &TaskOutcome {
    match end {
        EventBody::Succeeded { outcome } => outcome,
        EventBody::Failed {
            outcome: Some(outcome),
            ..
        } => outcome,
        other => panic!("no outcome in {other:?}"),
    }
}

/// Bytes that are not text and not repetitive: a xorshift sequence.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    std::fs::write(&file, bytes).unwrap();
    let out = std::process::Command::new("sha256sum")
        .arg(&file)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

#[tokio::test]
async fn a_50_mib_input_goes_in_and_three_artifacts_come_out_byte_exact() {
    let setup = Setup::start(FileLimits::default(), false).await;
    let task = TaskId::mint();
    let input = noise(50 * MIB as usize, 42);
    let put = setup
        .client
        .put_input(task, "data/big.bin", &mut input.as_slice())
        .await
        .expect("put input");
    assert_eq!(put.size, Some(50 * MIB));
    let script = r#"
        set -e
        sha256sum /tmp/in/data/big.bin | cut -c1-64 > /tmp/out/in.sha256
        mkdir -p /tmp/out/sub/dir
        head -c 1048577 /tmp/in/data/big.bin > /tmp/out/sub/dir/head.bin
        : > /tmp/out/empty
        echo "inputs read-only: $(touch /tmp/in/x 2>/dev/null && echo no || echo yes)"
    "#;
    setup.launch(task, script, vec![put.clone()], 120).await;
    let end = setup.ended(task).await;
    let outcome = outcome_of(&end);
    assert!(
        matches!(end, EventBody::Succeeded { .. }),
        "{end:?} (server {})",
        nats_server_version()
    );
    assert_eq!(
        outcome.output_tail.as_deref(),
        Some("inputs read-only: yes\n")
    );

    // The input arrived whole: the code's digest of it is ours.
    let digest = setup.artifact(task, "in.sha256").await;
    assert_eq!(
        String::from_utf8(digest).unwrap().trim(),
        sha256_hex(&input)
    );
    // Binary bytes, in a subdirectory, and an empty file come back exactly.
    assert_eq!(
        setup.artifact(task, "sub/dir/head.bin").await,
        input[..1_048_577]
    );
    assert_eq!(setup.artifact(task, "empty").await, b"");

    // The outcome lists each artifact with the size and digest the bucket holds.
    let listed = setup.client.artifacts(task).await.unwrap();
    let paths: Vec<&str> = listed.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["empty", "in.sha256", "sub/dir/head.bin"]);
    assert_eq!(outcome.artifacts, listed);
    assert_eq!(listed[2].size, 1_048_577);
    assert_eq!(outcome.artifacts_truncated, None);

    // The event log records the input's name, size and digest, never its bytes.
    let history = setup.client.history(task).await.unwrap();
    let EventBody::Accepted { spec, .. } = &history[0].event.body else {
        panic!("first event");
    };
    assert_eq!(spec.inputs[0].size, Some(50 * MIB));
    assert_eq!(spec.inputs[0].digest, put.digest);
    let largest = history
        .iter()
        .map(|e| codec::to_msgpack(&e.event).unwrap().len())
        .max()
        .unwrap();
    assert!(largest < 16 << 10, "an event holds {largest} bytes");
}

#[tokio::test]
async fn missing_and_oversized_inputs_fail_with_their_reason_before_the_code_runs() {
    let setup = Setup::start(
        FileLimits {
            max_input_bytes: MIB,
            ..FileLimits::default()
        },
        false,
    )
    .await;
    let script = "echo the code ran; echo ran > /tmp/out/ran";

    // Named in the launch, never put.
    let missing = TaskId::mint();
    let absent = InputFile {
        name: "data.csv".into(),
        object: input_object(missing, "data.csv"),
        path: None,
        size: None,
        digest: None,
    };
    setup.launch(missing, script, vec![absent], 60).await;
    // Put, but over the cap (its size not declared, so only the engine can tell).
    let big = TaskId::mint();
    let mut oversized = setup
        .client
        .put_input(big, "big.bin", &mut noise(2 * MIB as usize, 7).as_slice())
        .await
        .unwrap();
    oversized.size = None;
    setup.launch(big, script, vec![oversized], 60).await;
    // Put, but not what the launch says it is.
    let changed = TaskId::mint();
    let mut other = setup
        .client
        .put_input(changed, "a.txt", &mut &b"version 2"[..])
        .await
        .unwrap();
    other.digest = Some("SHA-256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU=".into());
    setup.launch(changed, script, vec![other], 60).await;

    for (task, reason) in [
        (missing, FailureReason::InputMissing),
        (big, FailureReason::InputTooLarge),
        (changed, FailureReason::InputCorrupt),
    ] {
        let end = setup.ended(task).await;
        let EventBody::Failed {
            reason: got,
            message,
            outcome,
        } = &end
        else {
            panic!("{task}: {end:?}");
        };
        assert_eq!(*got, reason, "{message:?}");
        let outcome = outcome.as_ref().expect("the agent reported");
        assert_eq!(outcome.stdout_bytes, 0, "the code did not run");
        assert!(outcome.artifacts.is_empty());
        assert!(setup.client.artifacts(task).await.unwrap().is_empty());
        let state = setup.client.get(task).await.unwrap().task.state;
        assert_eq!(state, TaskState::Failed { reason });
    }

    // A size the launch declares over the cap is refused at launch, with the field.
    let declared = TaskId::mint();
    let error = setup
        .client
        .launch(LaunchTask {
            task_id: Some(declared.0),
            inputs: vec![InputFile {
                name: "x".into(),
                object: "x".into(),
                path: None,
                size: Some(2 * MIB),
                digest: None,
            }],
            ..LaunchTask::script(script)
        })
        .await
        .expect_err("rejected");
    assert!(error.to_string().contains("inputs[0].size"), "{error}");
}

#[tokio::test]
async fn artifacts_over_the_caps_are_counted_as_truncated_and_escapes_are_not_uploaded() {
    let setup = Setup::start(
        FileLimits {
            max_artifacts: 3,
            max_artifact_bytes: 100 << 10,
            ..FileLimits::default()
        },
        false,
    )
    .await;
    let capped = TaskId::mint();
    let script = r#"
        for i in 1 2 3 4 5; do head -c 10240 /dev/zero > /tmp/out/f$i; done
        head -c 204800 /dev/zero > /tmp/out/huge
    "#;
    setup.launch(capped, script, Vec::new(), 60).await;
    let end = setup.ended(capped).await;
    let outcome = outcome_of(&end);
    let paths: Vec<&str> = outcome.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["f1", "f2", "f3"]);
    let truncated = outcome.artifacts_truncated.expect("says it truncated");
    assert_eq!((truncated.files, truncated.bytes), (3, 2 * 10240 + 204800));
    assert_eq!(
        setup.client.artifacts(capped).await.unwrap(),
        outcome.artifacts
    );

    let escaping = TaskId::mint();
    let script = r#"
        ln -s /etc/passwd /tmp/out/passwd
        ln -s / /tmp/out/root
        mkdir /tmp/out/d && echo kept > /tmp/out/d/ok.txt
        ln -s ../../../etc /tmp/out/d/up
        mkfifo /tmp/out/fifo
    "#;
    setup.launch(escaping, script, Vec::new(), 60).await;
    let end = setup.ended(escaping).await;
    let outcome = outcome_of(&end);
    let paths: Vec<&str> = outcome.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["d/ok.txt"]);
    let mut skipped: Vec<(&str, &str)> = outcome
        .artifacts_skipped
        .iter()
        .map(|s| (s.path.as_str(), s.reason.as_str()))
        .collect();
    skipped.sort();
    assert_eq!(
        skipped,
        [
            ("d/up", "symlink"),
            ("fifo", "not a regular file"),
            ("passwd", "symlink"),
            ("root", "symlink"),
        ]
    );
    assert_eq!(setup.artifact(escaping, "d/ok.txt").await, b"kept\n");
    let stored = setup.client.artifacts(escaping).await.unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
}

#[tokio::test]
async fn a_timed_out_task_keeps_the_artifacts_it_wrote_before_its_deadline() {
    let setup = Setup::start(FileLimits::default(), false).await;
    let task = TaskId::mint();
    let script = "echo 'written before the deadline' > /tmp/out/partial.txt; sleep 120";
    setup.launch(task, script, Vec::new(), 2).await;
    let end = setup.ended(task).await;
    assert!(matches!(end, EventBody::TimedOut { .. }), "{end:?}");
    setup.reaped(task).await;
    let listed = setup.client.artifacts(task).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        setup.artifact(task, "partial.txt").await,
        b"written before the deadline\n"
    );
}

/// Sends a file request as `task`'s agent would.
async fn ask<Q: serde::Serialize, A: serde::de::DeserializeOwned>(
    nats: &async_nats::Client,
    subject: String,
    request: &Q,
) -> A {
    let reply = nats
        .request(subject, codec::to_msgpack(request).unwrap().into())
        .await
        .unwrap();
    codec::decode("reply", &reply.payload, Encoding::Msgpack).unwrap()
}

/// Asks for `input` of `task` from its start, as the task's agent would.
async fn get_input(nats: &async_nats::Client, task: TaskId, input: &str) -> FileGetReply {
    let request = FileGet {
        input: input.to_owned(),
        offset: 0,
    };
    ask(nats, Names::default().agent_files(task, "get"), &request).await
}

/// Hands over a last chunk of artifact `path` of `task` at `offset`, as the task's agent would.
async fn put_chunk(
    nats: &async_nats::Client,
    task: TaskId,
    path: &str,
    offset: u64,
) -> FilePutReply {
    let request = FilePut {
        path: path.to_owned(),
        offset,
        data: bytes::Bytes::from_static(b"forged"),
        last: true,
    };
    ask(nats, Names::default().agent_files(task, "put"), &request).await
}

#[tokio::test]
async fn a_task_reads_only_its_own_inputs_and_writes_only_clean_paths() {
    let setup = Setup::start(FileLimits::default(), false).await;
    let secret = TaskId::mint();
    let secret_input = setup
        .client
        .put_input(secret, "secret.txt", &mut &b"another task's data"[..])
        .await
        .unwrap();
    setup
        .launch(secret, "sleep 30", vec![secret_input.clone()], 60)
        .await;
    let attacker = TaskId::mint();
    let own = setup
        .client
        .put_input(attacker, "own.txt", &mut &b"mine"[..])
        .await
        .unwrap();
    setup.launch(attacker, "sleep 30", vec![own], 60).await;
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while setup.client.get(attacker).await.unwrap().task.state != TaskState::Running {
        assert!(tokio::time::Instant::now() < until, "attacker never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let nats = setup.server.connect().await;

    // By the other task's input name, on its own subject: not one of its inputs.
    let reply = get_input(&nats, attacker, &secret_input.name).await;
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
    // Its own input is served.
    let reply = get_input(&nats, attacker, "own.txt").await;
    assert!(
        matches!(&reply, FileGetReply::Chunk { data, last: true, .. } if data.as_ref() == b"mine"),
        "{reply:?}"
    );
    // Artifact paths that would leave the task's `out/` are refused, and so is a continuation of an
    // upload that never started.
    for (path, offset, refusal) in [
        ("../../in/secret.txt", 0, FileRefusal::BadPath),
        ("/etc/passwd", 0, FileRefusal::BadPath),
        ("a/../../b", 0, FileRefusal::BadPath),
        ("a//b", 0, FileRefusal::BadPath),
        ("x", 10, FileRefusal::OutOfOrder),
    ] {
        let reply = put_chunk(&nats, attacker, path, offset).await;
        assert!(
            matches!(reply, FilePutReply::Refused { code, .. } if code == refusal),
            "{path}: {reply:?}"
        );
    }
    let mut stolen = Vec::new();
    assert!(
        setup
            .client
            .get_artifact(secret, "../in/secret.txt", &mut stolen)
            .await
            .is_err()
    );
    setup.client.cancel(secret, None).await.unwrap();
    setup.client.cancel(attacker, None).await.unwrap();
}

#[tokio::test]
async fn with_delete_on_reap_a_tasks_objects_go_with_it() {
    let setup = Setup::start(FileLimits::default(), true).await;
    let task = TaskId::mint();
    let input = setup
        .client
        .put_input(task, "in.txt", &mut &b"input"[..])
        .await
        .unwrap();
    let keep = TaskId::mint();
    setup
        .client
        .put_input(keep, "other.txt", &mut &b"someone else's"[..])
        .await
        .unwrap();
    setup
        .launch(task, "cp /tmp/in/in.txt /tmp/out/copy.txt", vec![input], 60)
        .await;
    let end = setup.ended(task).await;
    assert_eq!(outcome_of(&end).artifacts.len(), 1);
    setup.reaped(task).await;
    let bucket = setup.client.files_bucket().await.unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let gone = bucket
            .info(input_object(task, "in.txt"))
            .await
            .map_or(true, |info| info.deleted)
            && setup.client.artifacts(task).await.unwrap().is_empty();
        if gone {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "objects of {task} kept"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let kept = bucket.info(input_object(keep, "other.txt")).await.unwrap();
    assert!(!kept.deleted, "another task's input is kept");
}

/// The local sandbox's `/tmp/out` is a host directory (it must outlive the sandbox for the upload), so the
/// sandbox's size-limited `/tmp` does not bound it: the agent measures it while the code runs and stops
/// the code once it goes past the same size (8 MiB here), as Kubernetes evicts a pod past its `/tmp`.
#[tokio::test]
async fn a_task_filling_tmp_out_past_the_sandboxes_tmp_size_is_stopped_as_evicted() {
    let setup = Setup::start(FileLimits::default(), false).await;
    let task = TaskId::mint();
    // Up to 250 MiB in 256 KiB files, then a line on stdout: it never gets that far.
    // (`a-kept.txt` sorts first, so the artifact caps take it before any fill file.)
    let script = "echo kept > /tmp/out/a-kept.txt; \
                  for i in $(seq 1 1000); do head -c 262144 /dev/zero > /tmp/out/fill-$i.bin; done; \
                  echo finished";
    setup.launch(task, script, Vec::new(), 120).await;
    let end = setup.ended(task).await;
    let EventBody::Failed {
        reason,
        message,
        outcome: Some(outcome),
    } = &end
    else {
        panic!("{end:?}");
    };
    assert_eq!(*reason, FailureReason::Evicted);
    let message = message.as_deref().unwrap_or_default();
    assert!(
        message.contains("/tmp/out went past its limit"),
        "{message}"
    );
    let over = outcome
        .out_dir_exceeded
        .as_deref()
        .expect("the outcome says why");
    assert_eq!(over.limit_bytes, 8 * MIB);
    assert!(over.used_bytes > over.limit_bytes, "{over:?}");
    // How far past the limit the code got before the agent's next measurement (not asserted: it depends
    // on the machine's load).
    eprintln!(
        "/tmp/out stopped at {} bytes in {} entries (limit {} bytes)",
        over.used_bytes, over.entries, over.limit_bytes
    );
    assert_eq!(
        outcome.stdout_bytes, 0,
        "the code was stopped before its end"
    );
    // What it wrote is still uploaded within the artifact caps, and the host directory is gone.
    assert_eq!(setup.artifact(task, "a-kept.txt").await, b"kept\n");
    setup.reaped(task).await;
    let staged = setup
        .files_dir
        .path()
        .join(format!("taskpods-files-{task}"));
    assert!(!staged.exists(), "{staged:?} left behind");
}
