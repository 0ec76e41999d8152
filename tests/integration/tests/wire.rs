//! The wire as a Brain in another language sees it: every message kind taskpods writes in msgpack is
//! decoded by Python's `msgpack` package (not Rust) and must equal its JSON form, ids included as
//! hyphenated strings, and validate against its schema in `docs/schema/` (Python's `jsonschema`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use taskpods_events::codec::{self, Encoding};
use taskpods_events::files::{Artifact, ArtifactsTruncated, FileLimits, InputFile};
use taskpods_events::{
    AgentReport, CancelTask, CommandReply, Event, EventBody, FailureReason, HelloReply,
    Instructions, LaunchTask, Mode, Problem, ResourceRequest, Resources, TaskId, TaskOutcome,
    TaskSpec, TaskState,
};

const PYTHON_CHECK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/check_msgpack.py");
const SCHEMAS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/schema");

fn at() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-28T12:00:00.250Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn task() -> TaskId {
    TaskId::from_idempotency_key("brain-42/turn-7/step-3")
}

fn outcome(exit_code: i32) -> TaskOutcome {
    TaskOutcome {
        exit_code,
        duration_ms: 1234,
        stdout_bytes: 12,
        stderr_bytes: 3,
        output_truncated: false,
        result: Some(serde_json::json!({"answer": 42, "files": ["a.txt"]})),
        output_tail: Some("step 3\ndone\n".into()),
        artifacts: vec![Artifact {
            path: "reports/summary.json".into(),
            size: 512,
            digest: "SHA-256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU=".into(),
        }],
        artifacts_truncated: Some(ArtifactsTruncated {
            files: 2,
            bytes: 4096,
        }),
        ..TaskOutcome::default()
    }
}

fn inputs() -> Vec<InputFile> {
    vec![InputFile {
        name: "data.csv".into(),
        object: format!("{}/in/data.csv", task()),
        path: Some("data.csv".into()),
        size: Some(1024),
        digest: Some("SHA-256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU=".into()),
    }]
}

fn spec() -> TaskSpec {
    TaskSpec {
        image: "ghcr.io/taskpods/task-runner:latest".into(),
        toolbox: Some("default".into()),
        mode: Mode::Script,
        instructions: "echo hello".into(),
        env: BTreeMap::from([("INPUT".into(), "x".into())]),
        secret_env: BTreeMap::new(),
        timeout_secs: 600,
        resources: Resources {
            cpu_request_millis: 250,
            cpu_limit_millis: 1000,
            memory_request_bytes: 256 << 20,
            memory_limit_bytes: 512 << 20,
        },
        labels: BTreeMap::from([("team".into(), "ml".into())]),
        requester: Some("brain-42".into()),
        idempotency_key: Some("brain-42/turn-7/step-3".into()),
        inputs: inputs(),
        files: FileLimits::default(),
    }
}

/// One message of every kind taskpods writes or reads, named `<schema>--<label>`.
fn samples() -> Vec<(String, serde_json::Value, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |schema: &str, label: &str, value: &dyn erased::Both| {
        out.push((format!("{schema}--{label}"), value.json(), value.msgpack()));
    };
    let problems = vec![Problem {
        field: "timeout_secs".into(),
        message: "is 3600; at most 1800 seconds (30 minutes) are allowed".into(),
    }];
    let bodies = vec![
        EventBody::Accepted {
            spec: spec(),
            deadline: at() + TimeDelta::seconds(600),
        },
        EventBody::Rejected {
            problems: problems.clone(),
        },
        EventBody::Scheduled {
            job: task().job_name(),
        },
        EventBody::Started {
            pod: format!("{}-x7k2p", task().job_name()),
            node: Some("node-1".into()),
        },
        EventBody::Running,
        EventBody::Progress {
            message: "compiling".into(),
            percent: Some(42.5),
        },
        EventBody::CancelRequested {
            reason: Some("the user changed their mind".into()),
            requester: Some("brain-42".into()),
        },
        EventBody::Succeeded {
            outcome: outcome(0),
        },
        EventBody::Failed {
            reason: FailureReason::NonZeroExit { exit_code: 3 },
            message: Some("the code exited 3".into()),
            outcome: Some(outcome(3)),
        },
        EventBody::Failed {
            reason: FailureReason::OomKilled,
            message: None,
            outcome: None,
        },
        EventBody::TimedOut {
            detected_by: Some("engine".into()),
        },
        EventBody::Cancelled {
            outcome: Some(outcome(143)),
        },
        EventBody::Reaped,
    ];
    for (position, body) in bodies.into_iter().enumerate() {
        let label = format!("{position:02}-{}", body.kind());
        add(
            "event",
            &label,
            &Event::new(task(), position as u64, at(), body),
        );
    }
    add(
        "launch-task",
        "full",
        &LaunchTask {
            task_id: Some(task().0),
            idempotency_key: Some("brain-42/turn-7/step-3".into()),
            toolbox: Some("default".into()),
            mode: Mode::Script,
            script: Some("echo hello".into()),
            env: BTreeMap::from([("INPUT".into(), "x".into())]),
            timeout_secs: Some(600),
            resources: ResourceRequest {
                cpu_request: Some("250m".into()),
                cpu_limit: Some("1".into()),
                memory_request: Some("256Mi".into()),
                memory_limit: Some("512Mi".into()),
            },
            labels: BTreeMap::from([("team".into(), "ml".into())]),
            requester: Some("brain-42".into()),
            inputs: inputs(),
            ..LaunchTask::default()
        },
    );
    add(
        "cancel-task",
        "full",
        &CancelTask {
            task_id: task().0,
            reason: Some("no longer needed".into()),
            requester: Some("brain-42".into()),
        },
    );
    let replies = [
        CommandReply::Applied {
            task_id: task(),
            state: TaskState::Accepted,
            sequence: 17,
            created: true,
        },
        CommandReply::Rejected {
            task_id: task(),
            problems,
            sequence: 18,
        },
        CommandReply::Refused {
            task_id: task(),
            reason: "the task has already ended (failed)".into(),
            state: TaskState::Failed {
                reason: FailureReason::NonZeroExit { exit_code: 3 },
            },
        },
        CommandReply::Invalid {
            error: "unsupported content type \"text/yaml\"".into(),
        },
    ];
    for reply in &replies {
        add("command-reply", &tag(reply, "outcome"), reply);
    }
    let reports = [
        AgentReport::Hello {
            agent_version: Some("0.1.0".into()),
        },
        AgentReport::Progress {
            message: "compiling".into(),
            percent: Some(40.0),
        },
        AgentReport::Heartbeat,
        AgentReport::Result(outcome(0)),
    ];
    for report in &reports {
        add("agent-report", &tag(report, "report"), report);
    }
    let hellos = [
        HelloReply::Run(Instructions {
            task_id: task(),
            mode: Mode::Script,
            instructions: "echo hello".into(),
            env: BTreeMap::from([("INPUT".into(), "x".into())]),
            deadline: at() + TimeDelta::seconds(600),
            heartbeat_interval_ms: 5000,
            output_cap_bytes: 16 << 20,
            inputs: inputs(),
            files: FileLimits::default(),
        }),
        HelloReply::Wait {
            retry_after_ms: 500,
        },
        HelloReply::Stop {
            reason: "the task is cancelled".into(),
        },
    ];
    for hello in &hellos {
        add("hello-reply", &tag(hello, "answer"), hello);
    }
    out
}

/// The value of an enum's tag field (`outcome`, `report`, `answer`), to name its sample.
fn tag(value: &impl Serialize, field: &str) -> String {
    serde_json::to_value(value).unwrap()[field]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Both encodings of a value, for a list of values of different types.
mod erased {
    use super::*;

    pub trait Both {
        fn json(&self) -> serde_json::Value;
        fn msgpack(&self) -> Vec<u8>;
    }

    impl<T: Serialize> Both for T {
        fn json(&self) -> serde_json::Value {
            let bytes = codec::encode(self, Encoding::Json).expect("JSON");
            serde_json::from_slice(&bytes).expect("valid JSON")
        }
        fn msgpack(&self) -> Vec<u8> {
            codec::encode(self, Encoding::Msgpack).expect("msgpack")
        }
    }
}

/// Writes the samples into `dir` as the Python check expects them.
fn write_samples(dir: &Path) -> usize {
    let samples = samples();
    for (name, json, msgpack) in &samples {
        std::fs::write(dir.join(format!("{name}.msgpack")), msgpack).unwrap();
        std::fs::write(
            dir.join(format!("{name}.json")),
            serde_json::to_vec_pretty(json).unwrap(),
        )
        .unwrap();
    }
    samples.len()
}

fn python_check(args: &[&Path]) -> String {
    let out = std::process::Command::new("python3")
        .arg(PYTHON_CHECK)
        .args(args)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the Python check failed (scripts/install-test-deps installs its `msgpack` and `jsonschema`):\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn every_message_kind_decodes_with_a_foreign_msgpack_library_as_its_json_form_and_its_schema() {
    let dir = tempfile::tempdir().unwrap();
    let count = write_samples(dir.path());
    let report = python_check(&[dir.path(), Path::new(SCHEMAS)]);
    assert!(
        report.contains(&format!("summary: {count} messages ok, 0 wrong")),
        "{report}"
    );
    // Every event kind this version writes is among them.
    for kind in [
        "accepted",
        "rejected",
        "scheduled",
        "started",
        "running",
        "progress",
        "cancel_requested",
        "succeeded",
        "failed",
        "timed_out",
        "cancelled",
        "reaped",
    ] {
        assert!(report.contains(&format!("-{kind}\n")), "{kind}: {report}");
    }
}

#[test]
fn the_check_catches_binary_ids_as_written_before() {
    // The v1 fixtures were written when rmp-serde put a Uuid as 16 bytes: our decoder still reads
    // them, but a foreign decoder sees bytes, and the check says so.
    let dir = tempfile::tempdir().unwrap();
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../events/tests/fixtures/v1/03-running.msgpack"
    );
    let bytes = std::fs::read(fixture).unwrap();
    let event = codec::decode_event(&bytes).expect("old binary ids still decode");
    assert_eq!(event.body, EventBody::Running);
    std::fs::write(dir.path().join("event--old.msgpack"), &bytes).unwrap();
    std::fs::write(
        dir.path().join("event--old.json"),
        codec::encode(&event, Encoding::Json).unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new("python3")
        .arg(PYTHON_CHECK)
        .arg(dir.path())
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("task is b'") && stdout.contains("not a hyphenated UUID string"),
        "{stdout}"
    );
    // Re-encoded today, the same event carries strings.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("event--new.msgpack"),
        codec::encode_event(&event).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("event--new.json"),
        codec::encode(&event, Encoding::Json).unwrap(),
    )
    .unwrap();
    assert!(python_check(&[dir.path()]).contains("summary: 1 messages ok, 0 wrong"));
}

/// The Python example of `docs/PROTOCOL.md`, exactly as printed but for the server URL, against a real
/// engine.
#[tokio::test]
async fn the_python_example_in_the_protocol_runs_as_printed() {
    let protocol = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/PROTOCOL.md"
    ))
    .unwrap();
    let start = protocol
        .find("```python\n")
        .expect("PROTOCOL.md has a Python example")
        + "```python\n".len();
    let example = &protocol[start..start + protocol[start..].find("```").unwrap()];
    assert!(example.contains("nats://127.0.0.1:4222"), "{example}");

    // Authorization as deployed: the example connects as the Brain, from where scripts/run writes it.
    let server = taskpods_harness::NatsServer::start_secured();
    server.wait_for_jetstream().await;
    let auth = server.auth_dir();
    let engine = taskpods_engine::server::Engine::start(taskpods_engine::config::EngineConfig {
        nats_urls: vec![server.url()],
        nats_creds: Some(server.creds("engine")),
        auth: taskpods_engine::credentials::AuthConfig {
            seal_key: Some(auth.join(taskpods_auth::material::files::SEAL_KEY)),
            task_signer: Some(auth.join(taskpods_auth::material::files::TASK_SIGNER)),
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .expect("engine");
    let home = tempfile::tempdir().unwrap();
    let brain = home.path().join(".local/share/taskpods/auth/brain.creds");
    std::fs::create_dir_all(brain.parent().unwrap()).unwrap();
    std::fs::copy(server.creds("brain"), &brain).unwrap();
    let run = |home: &std::path::Path| {
        tokio::process::Command::new("python3")
            .arg("-c")
            .arg(example.replace("nats://127.0.0.1:4222", &server.url()))
            .env("HOME", home)
            .env_remove("TASKPODS_CREDS")
            .output()
    };
    // Without the credentials file it stops, naming the file.
    let nobody = tempfile::tempdir().unwrap();
    let refused = run(nobody.path()).await.expect("python3 runs");
    assert!(
        !refused.status.success(),
        "the example ran without credentials"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("brain.creds"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let out = run(home.path()).await.expect("python3 runs");
    assert!(
        out.status.success(),
        "the example failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        printed.trim(),
        format!("applied {}", TaskId::from_idempotency_key("py-1")),
        "the example prints what its comment says"
    );
    engine.shutdown().await.expect("shutdown");
}
