//! Command intake against a real nats-server: idempotent launches, foreign clients, bad input, crashes
//! between append and ack, and cancel refusals.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures::StreamExt;
use futures::future::join_all;
use taskpods_client::{Client, ClientConfig, ClientErrorKind};
use taskpods_engine::clock::Clock;
use taskpods_engine::config::EngineConfig;
use taskpods_engine::server::Engine;
use taskpods_engine::store::EventStore;
use taskpods_engine::topology::TopologyConfig;
use taskpods_events::codec::{self, HEADER_CONTENT_TYPE, HEADER_MSG_ID};
use taskpods_events::{
    CommandReply, Encoding, EventBody, HEADER_REPLY_TO, Input, LaunchTask, Names, Problem, TaskId,
    TaskState,
};
use taskpods_harness::NatsServer;
use taskpods_integration::{Redeliveries, assert_nothing_stuck, client_on};

fn config(server: &NatsServer) -> EngineConfig {
    EngineConfig {
        nats_urls: vec![server.url()],
        ..EngineConfig::default()
    }
}

async fn client(server: &NatsServer) -> Client {
    client_on(server.connect().await)
}

/// Publishes a raw command to the command stream, as any client could, and returns the engine's reply.
async fn raw_command(
    nats: &async_nats::Client,
    subject: String,
    msg_id: &str,
    content_type: Option<&str>,
    payload: Vec<u8>,
) -> CommandReply {
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(inbox.clone()).await.expect("subscribe");
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_MSG_ID, msg_id);
    headers.insert(HEADER_REPLY_TO, inbox.as_str());
    if let Some(ct) = content_type {
        headers.insert(HEADER_CONTENT_TYPE, ct);
    }
    let js = jetstream::new(nats.clone());
    js.publish_with_headers(subject, headers, payload.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("a reply within 10 s")
        .expect("reply");
    let encoding = Encoding::from_content_type(
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get(HEADER_CONTENT_TYPE))
            .map(|v| v.as_str()),
    )
    .expect("known content type");
    codec::decode("reply", &reply.payload, encoding).expect("decodable reply")
}

async fn events_of(nats: &async_nats::Client, task: TaskId) -> Vec<EventBody> {
    let stream = jetstream::new(nats.clone())
        .get_stream(Names::default().event_stream())
        .await
        .expect("event stream");
    taskpods_client::read_events(&stream, &Names::default(), task)
        .await
        .expect("read")
        .into_iter()
        .map(|e| e.event.body)
        .collect()
}

#[tokio::test]
async fn a_hundred_concurrent_launches_with_one_key_make_one_task() {
    let server = NatsServer::start();
    let engine = Engine::start(config(&server)).await.expect("engine");
    let nats = server.connect().await;
    let client = client(&server).await;

    // Fifty through the client (identical message ids: the stream drops repeats) and fifty raw, each
    // with its own message id, as fifty different Brains retrying would: all reach the engine.
    let mut launch = LaunchTask::script("echo once");
    launch.idempotency_key = Some("brain-7/step-1".into());
    let via_client = join_all((0..50).map(|_| client.launch(launch.clone())));
    let payload = codec::to_msgpack(&launch).expect("encodable");
    let via_raw = join_all((0..50).map(|i| {
        let (nats, payload) = (nats.clone(), payload.clone());
        async move {
            let msg_id = format!("raw-{i}");
            raw_command(&nats, Names::default().launch(), &msg_id, None, payload).await
        }
    }));
    let (via_client, via_raw) = tokio::join!(via_client, via_raw);

    let task = TaskId::from_idempotency_key("brain-7/step-1");
    let mut created = 0;
    let mut sequences = Vec::new();
    for launched in via_client {
        let launched = launched.expect("launch");
        assert_eq!(launched.task_id, task);
        created += usize::from(launched.created);
        sequences.push(launched.sequence);
    }
    for reply in via_raw {
        match reply {
            CommandReply::Applied {
                task_id,
                created: c,
                sequence,
                state,
            } => {
                assert_eq!(task_id, task);
                assert_eq!(state, TaskState::Accepted);
                created += usize::from(c);
                sequences.push(sequence);
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert_eq!(created, 1, "exactly one launch created the task");
    sequences.dedup();
    assert_eq!(
        sequences.len(),
        1,
        "everyone got the same first-event sequence"
    );
    let events = events_of(&nats, task).await;
    assert_eq!(events.len(), 1, "one Accepted event: {events:?}");
    assert!(matches!(events[0], EventBody::Accepted { .. }));
    assert_nothing_stuck(&nats, Duration::from_secs(5), Redeliveries::Allowed).await;
    assert_eq!(engine.intake_stats.applied.load(Ordering::Relaxed), 1);
    engine.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn the_same_key_after_the_duplicate_window_still_finds_the_task() {
    let server = NatsServer::start();
    let mut config = config(&server);
    config.topology = TopologyConfig {
        names: Names::new("shortwindow").expect("prefix"),
        duplicate_window: Duration::from_secs(1),
        ..TopologyConfig::default()
    };
    let engine = Engine::start(config).await.expect("engine");
    let client = Client::new(
        server.connect().await,
        ClientConfig {
            names: Names::new("shortwindow").expect("prefix"),
            ..ClientConfig::default()
        },
    );
    let mut launch = LaunchTask::script("echo later");
    launch.idempotency_key = Some("nightly-report".into());
    let first = client.launch(launch.clone()).await.expect("first");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = client
        .launch(launch)
        .await
        .expect("again, after the window");
    assert!(first.created);
    assert!(
        !again.created,
        "the engine, not the stream, recognised the repeat"
    );
    assert_eq!(first.task_id, again.task_id);
    assert_eq!(first.sequence, again.sequence);
    let snapshot = client.get(first.task_id).await.expect("get");
    assert_eq!(snapshot.task.events, 1);
    assert_eq!(engine.intake_stats.refused.load(Ordering::Relaxed), 1);
    engine.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn json_msgpack_and_a_python_brain_are_all_accepted() {
    let server = NatsServer::start();
    let engine = Engine::start(config(&server)).await.expect("engine");
    let nats = server.connect().await;
    let client = client(&server).await;

    let json = br#"{"idempotency_key":"json-1","script":"echo json","timeout_secs":60}"#.to_vec();
    let reply = raw_command(
        &nats,
        Names::default().launch(),
        "j1",
        Some("application/json"),
        json,
    )
    .await;
    assert!(
        matches!(reply, CommandReply::Applied { created: true, .. }),
        "{reply:?}"
    );

    let msgpack = codec::to_msgpack(&LaunchTask {
        idempotency_key: Some("mp-1".into()),
        ..LaunchTask::script("echo msgpack")
    })
    .expect("encodable");
    let reply = raw_command(&nats, Names::default().launch(), "m1", None, msgpack).await;
    assert!(
        matches!(reply, CommandReply::Applied { created: true, .. }),
        "{reply:?}"
    );

    // A Python Brain using nats-py, plain JSON, JetStream publish, and the reply header.
    let script = format!(
        r#"
import asyncio, json, nats
async def main():
    nc = await nats.connect("{url}")
    js = nc.jetstream()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await js.publish("taskpods.cmd.launch",
        json.dumps({{"idempotency_key": "py-1", "script": "print(42)", "labels": {{"team": "ml"}}}}).encode(),
        headers={{"Content-Type": "application/json", "Nats-Msg-Id": "py-1", "Taskpods-Reply-To": inbox}})
    msg = await sub.next_msg(timeout=10)
    print(msg.data.decode())
    await nc.close()
asyncio.run(main())
"#,
        url = server.url()
    );
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .await
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("JSON reply to a JSON command");
    assert_eq!(reply["outcome"], "applied");
    assert_eq!(
        reply["task_id"],
        TaskId::from_idempotency_key("py-1").to_string()
    );
    assert_eq!(reply["state"]["state"], "accepted");

    for key in ["json-1", "mp-1", "py-1"] {
        let snapshot = client
            .get(TaskId::from_idempotency_key(key))
            .await
            .expect("get");
        assert_eq!(snapshot.task.state, TaskState::Accepted, "{key}");
    }
    let py = client
        .get(TaskId::from_idempotency_key("py-1"))
        .await
        .expect("get");
    let spec = py.task.spec.expect("spec");
    assert_eq!(spec.instructions, "print(42)");
    assert_eq!(spec.labels.get("team").map(String::as_str), Some("ml"));
    engine.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn bad_input_gets_a_precise_reason_and_nothing_is_stuck() {
    let server = NatsServer::start();
    let engine = Engine::start(config(&server)).await.expect("engine");
    let nats = server.connect().await;
    let client = client(&server).await;
    let launch = Names::default().launch();
    let json = Some("application/json");

    // Garbage with no way to tell which task it meant: dead-lettered, and the caller told why.
    let reply = raw_command(
        &nats,
        launch.clone(),
        "g1",
        None,
        vec![0xc1, 0xff, 0x00, 0x13],
    )
    .await;
    let CommandReply::Invalid { error } = reply else {
        panic!("{reply:?}")
    };
    assert!(error.contains("cannot decode launch command"), "{error}");

    // Launches that name their task are recorded as Rejected, each with the field and the reason.
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("wrong-type", br#"{"idempotency_key":"wrong-type","script":42}"#.to_vec(), "script", "invalid type: integer `42`"),
        ("missing", br#"{"idempotency_key":"missing"}"#.to_vec(), "script", "is required"),
        ("zero", br#"{"idempotency_key":"zero","script":"x","timeout_secs":0}"#.to_vec(), "timeout_secs", "at least 1 second"),
        ("too-long", br#"{"idempotency_key":"too-long","script":"x","timeout_secs":1801}"#.to_vec(), "timeout_secs", "at most 1800 seconds"),
        (
            "oversized",
            format!(r#"{{"idempotency_key":"oversized","script":"{}"}}"#, "x".repeat(300 * 1024)).into_bytes(),
            "script",
            "307200 bytes; at most 262144",
        ),
        ("toolbox", br#"{"idempotency_key":"toolbox","script":"x","toolbox":"cuda-magic"}"#.to_vec(), "toolbox", "unknown toolbox \"cuda-magic\""),
        (
            "caps",
            br#"{"idempotency_key":"caps","script":"x","resources":{"cpu_limit":"64","memory_limit":"1Ti"}}"#.to_vec(),
            "resources.cpu_limit",
            "above the cap of 2000m",
        ),
    ];
    for (key, payload, field, message) in cases {
        let reply = raw_command(&nats, launch.clone(), key, json, payload).await;
        let CommandReply::Rejected {
            task_id,
            problems,
            sequence,
        } = reply
        else {
            panic!("{key}: {reply:?}")
        };
        assert_eq!(task_id, TaskId::from_idempotency_key(key));
        assert!(sequence > 0);
        let problem: &Problem = problems
            .iter()
            .find(|p| p.field == field)
            .unwrap_or_else(|| panic!("{key}: no problem on {field}: {problems:?}"));
        assert!(problem.message.contains(message), "{key}: {problem}");
        let events = events_of(&nats, task_id).await;
        assert_eq!(events.len(), 1, "{key}");
        assert!(
            matches!(&events[0], EventBody::Rejected { problems: p } if *p == problems),
            "{key}"
        );
        // And the client reports the same, as an error with every problem.
        let again = client
            .launch(LaunchTask {
                idempotency_key: Some(key.into()),
                ..LaunchTask::script("x")
            })
            .await
            .expect_err("still rejected");
        assert_eq!(again.kind(), ClientErrorKind::Rejected, "{key}: {again}");
    }

    // An encoding we do not speak, and a subject that is not a command: dead-lettered with the reason.
    let reply = raw_command(
        &nats,
        launch.clone(),
        "y1",
        Some("text/yaml"),
        b"script: x".to_vec(),
    )
    .await;
    assert!(
        matches!(&reply, CommandReply::Invalid { error } if error.contains("unsupported content type")),
        "{reply:?}"
    );
    let reply = raw_command(
        &nats,
        "taskpods.cmd.cancel.not-a-uuid".into(),
        "c1",
        None,
        vec![],
    )
    .await;
    assert!(
        matches!(&reply, CommandReply::Invalid { error } if error.contains("where a task id belongs")),
        "{reply:?}"
    );

    // Everything was acked, the dead letters are kept with their reasons, and a good launch still works.
    assert_nothing_stuck(&nats, Duration::from_secs(5), Redeliveries::Allowed).await;
    assert_eq!(engine.intake_stats.dead_lettered.load(Ordering::Relaxed), 3);
    assert_eq!(engine.intake_stats.rejected.load(Ordering::Relaxed), 7);
    let js = jetstream::new(nats.clone());
    let mut dead = js
        .get_stream(Names::default().dead_letter_stream())
        .await
        .expect("dead letters");
    assert_eq!(dead.info().await.expect("info").state.messages, 3);
    let kept = dead
        .direct_get_last_for_subject(Names::default().dead_letter("content_type"))
        .await
        .expect("kept");
    // A launch that cannot be read is not kept (env values in it could not be found), only its size.
    assert!(kept.payload.is_empty());
    assert_eq!(
        kept.headers
            .get("Taskpods-Payload-Withheld")
            .map(|v| v.as_str().to_owned())
            .as_deref(),
        Some("9 bytes")
    );
    let reason = kept
        .headers
        .get("Taskpods-Dead-Reason")
        .map(|v| v.as_str().to_owned());
    assert!(reason.is_some_and(|r| r.contains("text/yaml")));
    let ok = client
        .launch(LaunchTask::script("echo fine"))
        .await
        .expect("a good launch");
    assert!(ok.created);
    // Read-your-writes on the views: the caller waits for the sequence its launch answered with.
    let view = client
        .view(ok.task_id, ok.sequence, Duration::from_secs(10))
        .await
        .expect("the views catch up");
    assert_eq!(view.task, ok.task_id);
    assert_eq!(view.state, TaskState::Accepted);
    assert!(view.seq >= ok.sequence);
    let rejected = client
        .view(
            TaskId::from_idempotency_key("zero"),
            1,
            Duration::from_secs(10),
        )
        .await
        .expect("a rejected task has a view too");
    assert_eq!(rejected.state, TaskState::Rejected);
    engine.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_crash_between_append_and_ack_neither_duplicates_nor_loses_the_answer() {
    let server = NatsServer::start();
    let nats = server.connect().await;

    // The state a crash leaves: the first event appended, the command still unacked in the stream.
    // Build it by hand with the engine's own store before any engine consumes the command.
    // A short ack wait (fixed when the consumer is first created) so that commands a crashed engine
    // held are redelivered within the test.
    let mut quick = config(&server);
    quick.intake.ack_wait = Duration::from_secs(2);
    let config = |_: &NatsServer| quick.clone();
    let first_engine = Engine::start(config(&server)).await.expect("engine");
    let topology = first_engine.topology().clone();
    first_engine
        .shutdown()
        .await
        .expect("stop before the command arrives");
    let js = jetstream::new(nats.clone());
    let store = EventStore::new(js.clone(), topology.events.clone(), Names::default());
    let launch = LaunchTask {
        idempotency_key: Some("crashy".into()),
        ..LaunchTask::script("echo crash")
    };
    let task = TaskId::from_idempotency_key("crashy");
    let input = Input::Launch {
        spec: launch.validate(&Default::default()),
        at: chrono::Utc::now(),
    };
    let appended = store
        .execute(task, &input, chrono::Utc::now(), None)
        .await
        .expect("append");
    let first_sequence = appended.appended[0].sequence;

    // The caller's command is still in the stream; a new engine finds the task instead of duplicating.
    let reply = tokio::spawn({
        let nats = nats.clone();
        let payload = codec::to_msgpack(&launch).expect("encodable");
        async move { raw_command(&nats, Names::default().launch(), "crashy-1", None, payload).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let engine = Engine::start(config(&server))
        .await
        .expect("restarted engine");
    let reply = reply.await.expect("reply task");
    assert_eq!(
        reply,
        CommandReply::Applied {
            task_id: task,
            state: TaskState::Accepted,
            sequence: first_sequence,
            created: false,
        }
    );
    assert_eq!(events_of(&nats, task).await.len(), 1);
    engine.shutdown().await.expect("shutdown");

    // A real crash under load: abort the engine mid-stream, start another, and every launch lands once.
    let engine = Engine::start(config(&server)).await.expect("engine");
    let launches: Vec<_> = (0..300)
        .map(|i| {
            let payload = codec::to_msgpack(&LaunchTask {
                idempotency_key: Some(format!("load-{i}")),
                ..LaunchTask::script("echo load")
            })
            .expect("encodable");
            let js = js.clone();
            async move {
                let mut headers = HeaderMap::new();
                headers.insert(HEADER_MSG_ID, format!("load-{i}").as_str());
                js.publish_with_headers(Names::default().launch(), headers, payload.into())
                    .await
                    .expect("publish")
                    .await
                    .expect("stored")
            }
        })
        .collect();
    join_all(launches).await;
    for _ in 0..200 {
        if engine.intake_stats.applied.load(Ordering::Relaxed) >= 30 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let applied_before_crash = engine.intake_stats.applied.load(Ordering::Relaxed);
    engine.abort();
    let engine = Engine::start(config(&server))
        .await
        .expect("engine after crash");
    // The aborted engine's unacked commands come back after the consumer's ack wait.
    assert_nothing_stuck(&nats, Duration::from_secs(40), Redeliveries::Allowed).await;
    for i in 0..300 {
        let events = events_of(&nats, TaskId::from_idempotency_key(&format!("load-{i}"))).await;
        assert_eq!(events.len(), 1, "load-{i}: {events:?}");
        assert!(matches!(events[0], EventBody::Accepted { .. }));
    }
    assert!(
        applied_before_crash < 300,
        "the crash happened mid-stream ({applied_before_crash} applied)"
    );
    engine.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn cancels_of_unknown_finished_and_cancelling_tasks_are_refused_without_events() {
    let server = NatsServer::start();
    let engine = Engine::start(config(&server)).await.expect("engine");
    let nats = server.connect().await;
    let client = client(&server).await;

    let unknown = TaskId::mint();
    let err = client.cancel(unknown, None).await.expect_err("unknown");
    assert_eq!(err.kind(), ClientErrorKind::Refused);
    assert!(err.to_string().contains("no such task"), "{err}");
    assert!(events_of(&nats, unknown).await.is_empty());

    // A task with no Job yet is cancelled at once; a second cancel finds it finished.
    let queued = client
        .launch(LaunchTask::script("sleep 1"))
        .await
        .expect("launch");
    let state = client
        .cancel(queued.task_id, Some("changed my mind".into()))
        .await
        .expect("cancel");
    assert_eq!(state, TaskState::Cancelled);
    let err = client
        .cancel(queued.task_id, None)
        .await
        .expect_err("finished");
    assert!(
        err.to_string().contains("already ended (cancelled)"),
        "{err}"
    );
    let kinds: Vec<&str> = events_of(&nats, queued.task_id)
        .await
        .iter()
        .map(EventBody::kind)
        .collect();
    assert_eq!(kinds, ["accepted", "cancel_requested", "cancelled"]);

    // A task whose Job exists goes to Cancelling; cancelling twice is refused, with no second event.
    let live = client
        .launch(LaunchTask::script("sleep 100"))
        .await
        .expect("launch");
    let store = EventStore::new(
        jetstream::new(nats.clone()),
        engine.topology().events.clone(),
        Names::default(),
    );
    store
        .execute(
            live.task_id,
            &Input::JobCreated {
                job: live.task_id.job_name(),
            },
            chrono::Utc::now(),
            None,
        )
        .await
        .expect("scheduled");
    assert_eq!(
        client.cancel(live.task_id, None).await.expect("cancel"),
        TaskState::Cancelling
    );
    let err = client.cancel(live.task_id, None).await.expect_err("twice");
    assert_eq!(err.kind(), ClientErrorKind::Refused);
    assert!(err.to_string().contains("already applied"), "{err}");
    let kinds: Vec<&str> = events_of(&nats, live.task_id)
        .await
        .iter()
        .map(EventBody::kind)
        .collect();
    assert_eq!(kinds, ["accepted", "scheduled", "cancel_requested"]);
    assert_eq!(engine.intake_stats.refused.load(Ordering::Relaxed), 3);
    engine.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn commands_for_one_task_apply_in_the_order_they_were_published() {
    let server = NatsServer::start();
    let engine = Engine::start(config(&server)).await.expect("engine");
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());

    // For each of 200 tasks a launch and, right behind it, a cancel, all published in one burst without
    // waiting: if the intake reordered a task's commands, the cancel would find no task and be refused.
    let publishes = (0..200).map(|i| {
        let js = js.clone();
        async move {
            let key = format!("order-{i}");
            let task = TaskId::from_idempotency_key(&key);
            let launch = codec::to_msgpack(&LaunchTask {
                idempotency_key: Some(key),
                ..LaunchTask::script("sleep 60")
            })
            .expect("encodable");
            let launched = js
                .publish(Names::default().launch(), launch.into())
                .await
                .expect("publish");
            let cancelled = js
                .publish(Names::default().cancel(task), "".into())
                .await
                .expect("publish");
            launched.await.expect("stored");
            cancelled.await.expect("stored");
            task
        }
    });
    let tasks = join_all(publishes).await;

    let client = client(&server).await;
    for task in tasks {
        let ended = client
            .wait(task, Duration::from_secs(20))
            .await
            .expect("ends");
        assert_eq!(ended.state, TaskState::Cancelled, "{task}");
        let kinds: Vec<&str> = events_of(&nats, task)
            .await
            .iter()
            .map(EventBody::kind)
            .collect();
        assert_eq!(
            kinds,
            ["accepted", "cancel_requested", "cancelled"],
            "{task}"
        );
    }
    assert_eq!(engine.intake_stats.refused.load(Ordering::Relaxed), 0);
    assert_eq!(engine.intake_stats.applied.load(Ordering::Relaxed), 400);
    engine.shutdown().await.expect("shutdown");
}

/// Every loop reads the time from the engine's clock (`EngineConfig::clock`), never the wall clock: a
/// launch is accepted, and its deadline counted, at the clock's time.
#[tokio::test]
async fn a_launch_is_stamped_with_the_engine_clock_not_the_wall_clock() {
    let server = NatsServer::start();
    let at = chrono::DateTime::from_timestamp(1_938_000_000, 0).expect("a time in 2031");
    let engine = Engine::start(EngineConfig {
        clock: Clock::from_fn(move || at),
        ..config(&server)
    })
    .await
    .expect("engine");
    let client = client(&server).await;
    let launched = client
        .launch(LaunchTask {
            timeout_secs: Some(120),
            ..LaunchTask::script("true")
        })
        .await
        .expect("launch");
    let task = client.get(launched.task_id).await.expect("get").task;
    assert_eq!(task.accepted_at, Some(at));
    assert_eq!(task.deadline, Some(at + chrono::TimeDelta::seconds(120)));
    engine.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn one_clients_concurrent_commands_each_get_their_own_answer_on_one_reply_subscription() {
    let server = NatsServer::start();
    let engine = Engine::start(config(&server)).await.expect("engine");
    let nats = server.connect().await;
    let client = client(&server).await;
    // What the engine is asked: every command's reply subject, seen as any subscriber sees them.
    let mut commands = nats
        .subscribe(Names::default().commands_all())
        .await
        .expect("subscribe");
    // The server has the subscription before the first command (another connection) is published.
    nats.flush().await.expect("flush");

    let keys: Vec<String> = (0..200).map(|i| format!("shared-replies-{i}")).collect();
    let launched = join_all(keys.iter().map(|key| {
        let client = client.clone();
        let launch = LaunchTask {
            idempotency_key: Some(key.clone()),
            ..LaunchTask::script("echo mine")
        };
        async move { client.launch(launch).await }
    }))
    .await;
    let mut tasks = Vec::new();
    for (key, launched) in keys.iter().zip(launched) {
        let launched = launched.expect("launch answered");
        assert_eq!(
            launched.task_id,
            TaskId::from_idempotency_key(key),
            "a launch got another command's answer"
        );
        assert!(launched.created);
        tasks.push(launched.task_id);
    }
    // Cancels of the same tasks, twice each at once: each command gets its own task's answer, one
    // applied and one refused per task (whichever came second).
    let cancels = join_all(tasks.iter().flat_map(|task| {
        [client.clone(), client.clone()]
            .map(|client| async move { (*task, client.cancel(*task, None).await) })
    }))
    .await;
    for task in &tasks {
        let answers: Vec<_> = cancels.iter().filter(|(t, _)| t == task).collect();
        let applied = answers.iter().filter(|(_, r)| r.is_ok()).count();
        assert_eq!(applied, 1, "one cancel of {task} applied: {answers:?}");
        for (_, answer) in &answers {
            if let Err(e) = answer {
                assert_eq!(e.kind(), ClientErrorKind::Refused, "{e}");
                assert!(e.to_string().contains(&task.to_string()), "{e}");
            }
        }
    }

    // 600 commands, one reply subscription: the reply subjects share one inbox and differ in the last
    // token only.
    let mut reply_subjects = std::collections::HashSet::new();
    while reply_subjects.len() < 600 {
        let message = tokio::time::timeout(Duration::from_secs(10), commands.next())
            .await
            .expect("every command seen")
            .expect("subscription");
        let reply = message
            .headers
            .as_ref()
            .and_then(|h| h.get(HEADER_REPLY_TO))
            .expect("a reply subject")
            .to_string();
        reply_subjects.insert(reply);
    }
    let inboxes: std::collections::HashSet<&str> = reply_subjects
        .iter()
        .map(|s| s.rsplit_once('.').expect("inbox.n").0)
        .collect();
    assert_eq!(inboxes.len(), 1, "one reply inbox: {inboxes:?}");
    assert!(inboxes.iter().all(|i| i.starts_with("_INBOX.")));
    engine.shutdown().await.expect("clean shutdown");
}

/// The shared reply inbox is an input path: on a server without authorization anyone can publish there
/// (with it, only the engine may: SECURITY.md), and so send it anything. Garbage, ids
/// nobody waits for and an oversized payload are ignored; a forged answer to a waiting command fails
/// that command as undecodable; nothing panics and the client's next command gets its own answer.
#[tokio::test]
async fn forged_and_garbage_replies_on_the_shared_reply_inbox_break_nothing() {
    let server = NatsServer::start();
    // The engine makes the streams and stops: the next command waits for an answer nobody sends.
    Engine::start(config(&server))
        .await
        .expect("engine")
        .shutdown()
        .await
        .expect("shutdown");
    let attacker = server.connect().await;
    let mut commands = attacker
        .subscribe(Names::default().commands_all())
        .await
        .expect("subscribe");
    attacker.flush().await.expect("flush");
    let client = client(&server).await;
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.launch(LaunchTask::script("echo forged")).await }
    });
    let command = tokio::time::timeout(Duration::from_secs(10), commands.next())
        .await
        .expect("the command is seen")
        .expect("subscription");
    let reply_to = command
        .headers
        .as_ref()
        .and_then(|h| h.get(HEADER_REPLY_TO))
        .expect("a reply subject")
        .to_string();
    let (inbox, _) = reply_to.rsplit_once('.').expect("<inbox>.<id>");

    for token in [
        "x",
        "-1",
        "99999999999999999999999",
        "18446744073709551615",
        "007",
    ] {
        attacker
            .publish(
                format!("{inbox}.{token}"),
                b"\x00\xffnot a reply".to_vec().into(),
            )
            .await
            .expect("publish");
    }
    attacker
        .publish(format!("{inbox}.424242"), vec![b'A'; 200 * 1024].into())
        .await
        .expect("publish");
    attacker
        .publish(reply_to.clone(), b"\xc1\x00forged".to_vec().into())
        .await
        .expect("publish");
    attacker.flush().await.expect("flush");

    let forged = waiting.await.expect("the waiting command did not panic");
    let error = forged.expect_err("a forged reply is not an answer");
    assert_eq!(error.kind(), ClientErrorKind::Corrupt, "{error}");

    let engine = Engine::start(config(&server)).await.expect("engine");
    let launched = client
        .launch(LaunchTask {
            idempotency_key: Some("after-forgery".into()),
            ..LaunchTask::script("echo fine")
        })
        .await
        .expect("the next command is answered");
    assert_eq!(
        launched.task_id,
        TaskId::from_idempotency_key("after-forgery")
    );
    engine.shutdown().await.expect("shutdown");
}
