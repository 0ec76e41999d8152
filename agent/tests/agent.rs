//! The agent against a real nats-server and real bubblewrap, with this test playing the engine's part:
//! it answers the hello and reads the output and reports from the streams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use taskpods_agent::output::{HEADER_LOG_KIND, HEADER_LOG_SEQ};
use taskpods_events::codec;
use taskpods_events::{
    AgentReport, Encoding, HelloReply, Instructions, Mode, Names, TaskId, TaskOutcome,
};
use taskpods_harness::NatsServer;

struct Run {
    outcome: Option<TaskOutcome>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    kinds: Vec<String>,
    progress: Vec<(String, Option<f32>)>,
    agent_exit: Option<i32>,
}

async fn run_agent(
    script: &str,
    timeout_secs: i64,
    cap: u64,
    env: &[(&str, &str)],
    term_after: Option<Duration>,
) -> Run {
    let server = NatsServer::start();
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let names = Names::default();
    for (name, subjects, retention) in [
        (
            names.command_stream(),
            names.commands_all(),
            stream::RetentionPolicy::WorkQueue,
        ),
        (
            names.log_stream(),
            names.logs_all(),
            stream::RetentionPolicy::Limits,
        ),
    ] {
        js.create_stream(stream::Config {
            name,
            subjects: vec![subjects],
            retention,
            max_message_size: 1 << 20,
            ..Default::default()
        })
        .await
        .expect("stream");
    }
    let task = TaskId::mint();
    let instructions = Instructions {
        task_id: task,
        mode: Mode::Script,
        instructions: script.to_owned(),
        env: BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]),
        deadline: chrono::Utc::now() + chrono::TimeDelta::seconds(timeout_secs),
        heartbeat_interval_ms: 200,
        output_cap_bytes: cap,
    };
    // The engine's part: first answer Wait, then Run.
    let mut hellos = client.subscribe(names.agent_hello(task)).await.unwrap();
    let responder = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Some(msg) = hellos.next().await {
                let reply = if n == 0 {
                    HelloReply::Wait { retry_after_ms: 50 }
                } else {
                    HelloReply::Run(instructions.clone())
                };
                n += 1;
                let payload = codec::to_msgpack(&reply).unwrap();
                client
                    .publish(msg.reply.unwrap(), payload.into())
                    .await
                    .unwrap();
            }
        })
    };
    let mut heartbeats = client.subscribe(names.agent_heartbeat(task)).await.unwrap();

    let mut agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskpods-agent"));
    agent
        .env("TASKPODS_TASK_ID", task.to_string())
        .env("TASKPODS_NATS_URL", server.url())
        .env("TASKPODS_SANDBOX", "bwrap")
        .env("TASKPODS_TMP_BYTES", "4194304")
        .env("TASKPODS_MAX_PROCS", "64")
        .env("TASKPODS_KILL_GRACE_MS", "500")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        agent.env(k, v);
    }
    let mut child = agent.spawn().expect("agent runs");
    if let Some(after) = term_after {
        tokio::time::sleep(after).await;
        let pid = child.id().expect("running").to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
    }
    let status = tokio::time::timeout(
        Duration::from_secs(60 + timeout_secs.unsigned_abs()),
        child.wait(),
    )
    .await
    .expect("agent finishes")
    .expect("agent runs");
    responder.abort();
    assert!(
        tokio::time::timeout(Duration::from_secs(1), heartbeats.next())
            .await
            .is_ok(),
        "heartbeats are sent"
    );

    // Reports on the command stream.
    let cmd = js.get_stream(names.command_stream()).await.unwrap();
    let reports = cmd
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut outcome = None;
    let mut progress = Vec::new();
    let pending = cmd.clone().info().await.unwrap().state.messages;
    let mut msgs = reports
        .fetch()
        .max_messages(pending as usize)
        .messages()
        .await
        .unwrap();
    while let Some(Ok(msg)) = msgs.next().await {
        let report: AgentReport = codec::decode("report", &msg.payload, Encoding::Msgpack).unwrap();
        match report {
            AgentReport::Result(o) => {
                assert!(msg.subject.ends_with(".result"));
                outcome = Some(o);
            }
            AgentReport::Progress { message, percent } => {
                assert!(msg.subject.ends_with(".progress"));
                progress.push((message, percent));
            }
            other => panic!("unexpected report {other:?}"),
        }
    }

    // Output, in order.
    let logs = js.get_stream(names.log_stream()).await.unwrap();
    let reader = logs
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::Explicit,
            filter_subject: names.log(task),
            ..Default::default()
        })
        .await
        .unwrap();
    let total = logs.clone().info().await.unwrap().state.messages as usize;
    let (mut stdout, mut stderr, mut kinds) = (Vec::new(), Vec::new(), Vec::new());
    if total > 0 {
        let mut msgs = reader.fetch().max_messages(total).messages().await.unwrap();
        let mut seq = 0u64;
        while let Some(Ok(msg)) = msgs.next().await {
            let headers = msg.headers.clone().unwrap();
            assert_eq!(
                headers.get(HEADER_LOG_SEQ).unwrap().as_str(),
                seq.to_string()
            );
            seq += 1;
            let kind = headers.get(HEADER_LOG_KIND).unwrap().as_str().to_owned();
            match kind.as_str() {
                "stdout" => stdout.extend_from_slice(&msg.payload),
                "stderr" => stderr.extend_from_slice(&msg.payload),
                _ => {}
            }
            kinds.push(kind);
        }
    }
    Run {
        outcome,
        stdout,
        stderr,
        kinds,
        progress,
        agent_exit: status.code(),
    }
}

#[tokio::test]
async fn script_output_progress_and_result_arrive_complete_and_in_order() {
    let script = r#"
echo "$GREETING from $(id -u):$(id -g)"
echo "::progress:: 50% halfway"
seq 1 100000
head -c 3000 /dev/zero | tr '\0' 'x'; echo
printf '\000\001\377binary\n' >&2
echo '{"answer": 42}' > /tmp/result.json
env | grep -c NATS >&2 || true
exit 0
"#;
    let run = run_agent(
        script,
        60,
        64 << 20,
        &[("TASKPODS_CHUNK_BYTES", "65536")],
        None,
    )
    .await;
    assert_eq!(run.agent_exit, Some(0));
    let outcome = run.outcome.expect("result reported");
    assert_eq!(outcome.exit_code, 0);
    let mut expected = b"hello from 1000:1000\n::progress:: 50% halfway\n".to_vec();
    for i in 1..=100_000 {
        expected.extend_from_slice(format!("{i}\n").as_bytes());
    }
    expected.extend_from_slice(&[b'x'; 3000]);
    expected.push(b'\n');
    assert_eq!(run.stdout.len(), expected.len());
    assert!(run.stdout == expected, "stdout differs");
    assert_eq!(run.stderr, b"\x00\x01\xffbinary\n0\n");
    assert_eq!(outcome.stdout_bytes, expected.len() as u64);
    assert_eq!(outcome.stderr_bytes, 12);
    assert!(!outcome.output_truncated);
    assert_eq!(outcome.result, Some(serde_json::json!({"answer": 42})));
    let tail = outcome.output_tail.expect("a tail");
    assert!(tail.len() <= 2048 + 8, "{}", tail.len());
    assert!(
        tail.contains(&"x".repeat(1000)),
        "the end of stdout is in the tail"
    );
    assert_eq!(run.progress, [("halfway".to_owned(), Some(50.0))]);
    assert_eq!(run.kinds.last().map(String::as_str), Some("end"));
}

#[tokio::test]
async fn exit_code_and_truncation_are_reported() {
    let run = run_agent("seq 1 100000; echo bye >&2; exit 3", 60, 1000, &[], None).await;
    let outcome = run.outcome.expect("result reported");
    assert_eq!(outcome.exit_code, 3);
    assert!(outcome.output_truncated);
    // The tail shows how the output ended, even though the stored output stops at the cap.
    let tail = outcome.output_tail.expect("a tail");
    assert!(
        tail.contains("99999\n100000\n") && tail.contains("bye\n"),
        "{tail}"
    );
    assert_eq!(run.stdout.len() + run.stderr.len(), 1000);
    assert!(run.kinds.contains(&"truncated".to_owned()));
    assert_eq!(run.kinds.last().map(String::as_str), Some("end"));
}

#[tokio::test]
async fn escapes_fail_and_say_so() {
    let script = r#"
if (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then echo "NET OPEN"; else echo "net blocked"; fi
if echo x > /etc/taskpods-escape 2>/dev/null; then echo "ROOT WRITABLE"; else echo "root read-only"; fi
if head -c 8000000 /dev/zero > /tmp/fill 2>/dev/null; then echo "TMP UNBOUNDED"; else echo "tmp full"; fi
rm -f /tmp/fill
sh -c 'while :; do sleep 2 & done'
echo "bomb stopped: $?"
sleep 3
ls /root /run | head -3
echo done
"#;
    let run = run_agent(
        &format!("exec bash -c '{}'", script.replace('\'', "'\\''")),
        60,
        1 << 20,
        &[],
        None,
    )
    .await;
    let out = String::from_utf8_lossy(&run.stdout);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(out.contains("net blocked"), "{out}\n{err}");
    assert!(out.contains("root read-only"), "{out}\n{err}");
    assert!(out.contains("tmp full"), "{out}\n{err}");
    assert!(err.contains("Cannot fork"), "{out}\n{err}");
    assert!(out.contains("bomb stopped: 2"), "{out}\n{err}");
    assert!(out.contains("done"), "{out}\n{err}");
    assert!(run.outcome.is_some());
}

#[tokio::test]
async fn sigterm_reaches_the_code_and_output_and_result_still_arrive() {
    // Without bubblewrap (as in a pod): the code gets the SIGTERM and may clean up within the grace.
    let script = r#"
trap 'echo "got TERM, cleaning up"; exit 42' TERM
echo started
while :; do sleep 0.1; done
"#;
    let run = run_agent(
        script,
        60,
        1 << 20,
        &[
            ("TASKPODS_SANDBOX", "none"),
            ("TASKPODS_TERM_GRACE_MS", "3000"),
        ],
        Some(Duration::from_secs(2)),
    )
    .await;
    assert_eq!(run.agent_exit, Some(0));
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "started\ngot TERM, cleaning up\n"
    );
    assert_eq!(run.outcome.expect("result reported").exit_code, 42);
    assert_eq!(run.kinds.last().map(String::as_str), Some("end"));
}

#[tokio::test]
async fn the_deadline_backstop_kills_the_code_when_no_engine_does() {
    let run = run_agent(
        "echo waiting; sleep 300",
        2,
        1 << 20,
        &[("TASKPODS_KILL_GRACE_MS", "200")],
        None,
    )
    .await;
    assert_eq!(run.stdout, b"waiting\n");
    let outcome = run.outcome.expect("result reported");
    assert_eq!(outcome.exit_code, 137);
    assert!(outcome.duration_ms < 10_000, "{}", outcome.duration_ms);
}
