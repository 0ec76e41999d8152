//! Hostile input against a real engine and nats-server: a corpus of malformed commands (every field of
//! the wrong type, CR/LF/NUL and invalid UTF-8 in values and keys, odd headers, huge and deeply nested
//! payloads, unknown content types, wrong subjects, floods of reports). Each must be answered with a
//! clear reason or dead-lettered; the engine must stay up, leave nothing unacked, and run a normal task
//! afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use serde_json::{Value, json};
use taskpods_engine::server::Engine;
use taskpods_events::codec::{self, HEADER_CONTENT_TYPE, HEADER_MSG_ID};
use taskpods_events::{
    CommandReply, Encoding, HEADER_REPLY_TO, LaunchTask, Names, TaskId, TaskState,
};
use taskpods_harness::NatsServer;
use taskpods_integration::{Redeliveries, assert_nothing_stuck, client_on};

/// One malformed command: where it goes, its headers and its bytes.
struct Case {
    name: String,
    subject: String,
    content_type: Option<String>,
    extra_headers: Vec<(String, String)>,
    payload: Vec<u8>,
    /// The field a `Rejected` answer must name, when the case targets one.
    expect_field: Option<&'static str>,
}

fn case(name: impl Into<String>, subject: &str, json_payload: bool, payload: Vec<u8>) -> Case {
    Case {
        name: name.into(),
        subject: subject.to_owned(),
        content_type: json_payload.then(|| "application/json".to_owned()),
        extra_headers: Vec::new(),
        payload,
        expect_field: None,
    }
}

fn json_case(name: impl Into<String>, subject: &str, value: &Value) -> Case {
    case(name, subject, true, serde_json::to_vec(value).unwrap())
}

/// Values of every JSON type but the one a field wants.
fn wrong_values(field: &str) -> Vec<Value> {
    let all = [
        json!(123),
        json!(-1),
        json!(1.5),
        json!(true),
        json!("text"),
        json!([]),
        json!(["a", 1]),
        json!({}),
        json!({"a": {"b": [1, {"c": null}]}}),
    ];
    let keep = |v: &Value| match field {
        "idempotency_key" | "image" | "toolbox" | "script" | "goal" | "requester" => !v.is_string(),
        "task_id" => true,
        "mode" => true,
        "timeout_secs" => !(v.is_u64()),
        "env" | "labels" => !v.is_object() || v.as_object().is_some_and(|o| !o.is_empty()),
        // serde reads a struct from an array of its fields, so an empty array is a valid `resources`.
        "resources" => {
            (!v.is_object() || v.as_object().is_some_and(|o| !o.is_empty()))
                && v.as_array().is_none_or(|a| !a.is_empty())
        }
        _ => true,
    };
    let mut values: Vec<Value> = all.into_iter().filter(keep).collect();
    match field {
        "task_id" => values.extend([json!("not-a-uuid"), json!("")]),
        "mode" => values.extend([json!("shell"), json!("")]),
        "timeout_secs" => values.extend([json!(4_294_967_296u64), json!("60")]),
        "env" => values.extend([json!({"A": 1}), json!({"A": null}), json!({"A": ["x"]})]),
        "labels" => values.extend([json!({"a": 1}), json!({"a": {}})]),
        "resources" => values.extend([json!({"cpu": "1"}), json!({"cpu_limit": 1})]),
        _ => {}
    }
    values
}

/// The corpus. Every case is malformed; none may create a task.
fn corpus(names: &Names) -> Vec<Case> {
    let launch = names.launch();
    let unknown = TaskId::from_idempotency_key("hostile: a task that does not exist");
    let progress = names.agent_report(unknown, "progress");
    let mut cases = Vec::new();

    // Every field of a launch with a value of the wrong type, with and without a key that names the task
    // (named: recorded as Rejected; unnamed: dead-lettered).
    let fields = [
        "task_id",
        "idempotency_key",
        "image",
        "toolbox",
        "mode",
        "script",
        "goal",
        "env",
        "timeout_secs",
        "resources",
        "labels",
        "requester",
    ];
    for field in fields {
        for (i, value) in wrong_values(field).into_iter().enumerate() {
            for named in [false, true] {
                let mut launch_value = json!({"script": "echo hi"});
                launch_value[field] = value.clone();
                if named && field != "idempotency_key" && field != "task_id" {
                    launch_value["idempotency_key"] = json!(format!("hostile-{field}-{i}"));
                }
                cases.push(json_case(
                    format!("{field}={value} named={named}"),
                    &launch,
                    &launch_value,
                ));
            }
        }
    }

    // CR, LF, NUL and other control characters in keys (the detail of an "unknown field" error quotes
    // the key: a header with a newline panicked the engine).
    for key in [
        "bad\nkey",
        "\r\n",
        "\u{0}",
        "x\r\nTaskpods-Injected: 1",
        "\u{1b}[2J",
        "\u{2028}",
    ] {
        let mut value = json!({"script": "echo hi"});
        value[key] = json!(1);
        cases.push(json_case(format!("key {key:?}"), &launch, &value));
        let mut named = value.clone();
        named["idempotency_key"] = json!(format!("hostile-key-{}", key.len()));
        cases.push(json_case(format!("named key {key:?}"), &launch, &named));
        let mut cancel = json!({"task_id": unknown.0});
        cancel[key] = json!(1);
        cases.push(json_case(
            format!("cancel key {key:?}"),
            &names.cancel(unknown),
            &cancel,
        ));
    }
    // NUL and other control characters in every text that reaches a process, a header or a terminal:
    // recorded as Rejected, naming the field.
    let controls = ["\u{0}", "\r", "\u{1b}[2J", "\u{7f}", "\u{85}", "\u{2028}"];
    for (i, control) in controls.iter().enumerate() {
        let bad = format!("y{control}--share-net");
        for (field, value) in [
            ("script", json!({"script": bad})),
            ("goal", json!({"mode": "agent", "goal": bad})),
            ("env.X", json!({"script": "x", "env": {"X": bad}})),
            ("requester", json!({"script": "x", "requester": bad})),
            ("image", json!({"script": "x", "image": bad})),
            ("toolbox", json!({"script": "x", "toolbox": bad})),
        ] {
            let mut value = value;
            value["idempotency_key"] = json!(format!("hostile-control-{field}-{i}"));
            let mut c = json_case(format!("{field} with {control:?}"), &launch, &value);
            c.expect_field = Some(field);
            cases.push(c);
        }
        let mut named = json!({"script": "x", "idempotency_key": format!("k{control}")});
        named["task_id"] =
            json!(TaskId::from_idempotency_key(&format!("hostile-key-control-{i}")).0);
        let mut c = json_case(format!("idempotency_key with {control:?}"), &launch, &named);
        c.expect_field = Some("idempotency_key");
        cases.push(c);
    }

    // A report kind with a newline, and the same in a msgpack map key.
    cases.push(json_case(
        "report x\\ny",
        &progress,
        &json!({"report": "x\ny"}),
    ));
    cases.push(case(
        "msgpack report x\\ny",
        &progress,
        false,
        codec::to_msgpack(&json!({"report": "x\ny"})).unwrap(),
    ));
    let mut key_map = serde_json::Map::new();
    key_map.insert("script".into(), json!("x"));
    key_map.insert("k\r\ney".into(), json!(1));
    cases.push(case(
        "msgpack key with CRLF",
        &launch,
        false,
        codec::to_msgpack(&key_map).unwrap(),
    ));

    // Invalid UTF-8 where text belongs.
    for (i, bytes) in [
        b"{\"script\": \"echo \xff\xfe\"}".to_vec(),
        b"{\"scr\xffipt\": \"echo\"}".to_vec(),
        b"{\"idempotency_key\": \"k\xc3\x28\", \"script\": 1}".to_vec(),
        b"\xef\xbb\xbf{\"script\": \"bom\"}".to_vec(),
    ]
    .into_iter()
    .enumerate()
    {
        cases.push(case(
            format!("json invalid utf-8 {i}"),
            &launch,
            true,
            bytes,
        ));
    }
    // msgpack: a map {"script": <str with invalid UTF-8>} and a key with invalid UTF-8.
    let mut bad_str = vec![0x81, 0xa6];
    bad_str.extend_from_slice(b"script");
    bad_str.extend_from_slice(&[0xa3, 0xff, 0xfe, 0xfd]);
    cases.push(case("msgpack invalid utf-8 value", &launch, false, bad_str));
    let mut bad_key = vec![0x81, 0xa3, 0xff, 0x00, 0x0a];
    bad_key.extend_from_slice(&[0xa1, b'x']);
    cases.push(case("msgpack invalid utf-8 key", &launch, false, bad_key));

    // Huge and deeply nested payloads.
    cases.push(json_case(
        "script over the cap",
        &launch,
        &json!({"idempotency_key": "hostile-huge-script", "script": "x".repeat(300 << 10)}),
    ));
    let many_env: serde_json::Map<String, Value> =
        (0..5000).map(|i| (format!("V{i}"), json!("v"))).collect();
    cases.push(json_case(
        "5000 env vars",
        &launch,
        &json!({"idempotency_key": "hostile-env", "script": "x", "env": many_env}),
    ));
    let many_labels: serde_json::Map<String, Value> =
        (0..2000).map(|i| (format!("l{i}"), json!("v"))).collect();
    cases.push(json_case(
        "2000 labels",
        &launch,
        &json!({"idempotency_key": "hostile-labels", "script": "x", "labels": many_labels}),
    ));
    let bad_env: serde_json::Map<String, Value> = (0..3000)
        .map(|i| (format!("{i}-bad name {}", "y".repeat(280)), json!("v")))
        .collect();
    cases.push(json_case(
        "3000 bad env names (the rejection must stay under the message size)",
        &launch,
        &json!({"idempotency_key": "hostile-bad-env", "script": "x", "env": bad_env}),
    ));
    for depth in [200, 10_000, 200_000] {
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        cases.push(case(
            format!("json nested {depth}"),
            &launch,
            true,
            format!(r#"{{"script":"x","env":{nested}}}"#).into_bytes(),
        ));
        cases.push(case(
            format!("json nested {depth} at the top"),
            &launch,
            true,
            nested.into_bytes(),
        ));
        // msgpack: fixarray of one element, nested.
        let mut packed = vec![0x91; depth];
        packed.push(0xc0);
        cases.push(case(
            format!("msgpack nested {depth}"),
            &launch,
            false,
            packed,
        ));
    }
    // msgpack headers that claim far more data than follows.
    cases.push(case(
        "msgpack str32 of 4 GiB",
        &launch,
        false,
        vec![0xdb, 0xff, 0xff, 0xff, 0xff, b'x'],
    ));
    cases.push(case(
        "msgpack map32 of 4G entries",
        &launch,
        false,
        vec![0xdf, 0xff, 0xff, 0xff, 0xff],
    ));
    cases.push(case(
        "msgpack array32 of 4G",
        &launch,
        false,
        vec![0xdd, 0xff, 0xff, 0xff, 0xff],
    ));

    // Unknown content types and payloads in the wrong encoding.
    for content_type in [
        "text/yaml",
        "text/plain",
        "application/octet-stream",
        "application/json\u{7f}",
        "application/json; charset=\u{1}",
        "аpplication/json",
        &"x".repeat(4096),
        "*/*",
    ] {
        let mut c = json_case(
            format!("content type {:.40?}", content_type),
            &launch,
            &json!({"script": "x"}),
        );
        c.content_type = Some(content_type.to_owned());
        cases.push(c);
    }
    cases.push(case(
        "json without content type",
        &launch,
        false,
        br#"{"script":"x"}"#.to_vec(),
    ));
    cases.push(case(
        "msgpack labelled json",
        &launch,
        true,
        codec::to_msgpack(&LaunchTask::script("x")).unwrap(),
    ));
    cases.push(case("empty launch", &launch, false, Vec::new()));
    cases.push(case("empty json launch", &launch, true, Vec::new()));
    for (name, value) in [
        ("nil", json!(null)),
        ("int", json!(7)),
        ("string", json!("echo hi")),
        ("array", json!(["echo hi"])),
        ("float", json!(1e308)),
    ] {
        cases.push(json_case(format!("json top-level {name}"), &launch, &value));
        cases.push(case(
            format!("msgpack top-level {name}"),
            &launch,
            false,
            codec::to_msgpack(&value).unwrap(),
        ));
    }
    // Random bytes (a fixed generator, so failures reproduce).
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..20 {
        let len = 1 + (i * 37) % 300;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        cases.push(case(
            format!("random bytes {i}"),
            &launch,
            i % 2 == 0,
            bytes,
        ));
    }

    // Odd headers on an otherwise well-formed launch.
    for (name, value) in [
        ("Nats-Msg-Id", "x".repeat(2000)),
        ("Taskpods-Kind", "\u{7}bell".to_owned()),
        ("X-Odd", "\u{2028}\u{0}".to_owned()),
    ] {
        let mut c = json_case(format!("header {name:.20}"), &launch, &json!({"script": 5}));
        c.extra_headers.push((name.to_owned(), value));
        cases.push(c);
    }

    // Subjects that are under the command stream but are no command.
    for subject in [
        format!("{}.cmd.foo", names.prefix()),
        format!("{}.cmd.launch.extra", names.prefix()),
        format!("{}.cmd.cancel.not-a-uuid", names.prefix()),
        format!("{}.cmd.cancel", names.prefix()),
        format!("{}.cmd.cancel.{unknown}.extra", names.prefix()),
        format!("{}.cmd.agent.{unknown}", names.prefix()),
        format!("{}.cmd.agent.not-a-uuid.progress", names.prefix()),
        format!("{}.cmd.agent.{unknown}.progress.extra", names.prefix()),
        format!("{}.cmd.\u{1}", names.prefix()),
    ] {
        cases.push(json_case(
            format!("subject {subject}"),
            &subject,
            &json!({"script": "x"}),
        ));
    }

    // Cancels and agent reports of the wrong shape.
    let cancel = names.cancel(unknown);
    for value in [
        json!({"task_id": 1}),
        json!({"task_id": unknown.0, "reason": 5}),
        json!([]),
        json!("cancel"),
        json!({"task_id": unknown.0, "extra": true}),
    ] {
        cases.push(json_case(format!("cancel {value}"), &cancel, &value));
    }
    for value in [
        json!({"report": "nope"}),
        json!({"report": "progress"}),
        json!({"report": "progress", "message": 1}),
        json!({"report": "result", "exit_code": "x"}),
        json!({"report": "hello"}),
        json!({"report": "heartbeat"}),
        json!({}),
        json!([]),
        json!({"report": "progress", "message": "m", "percent": "half"}),
        json!({"report": "progress", "message": "unknown task", "percent": 5}),
    ] {
        cases.push(json_case(format!("report {value}"), &progress, &value));
    }
    cases
}

/// What became of one case.
#[derive(Debug)]
enum Fate {
    /// The server refused to store it (wrong subject, too large): the publisher got the error.
    NotStored(String),
    /// The engine answered.
    Answered(CommandReply),
}

#[tokio::test]
async fn two_hundred_malformed_commands_are_each_answered_and_the_engine_lives_on() {
    let server = NatsServer::start();
    let state = common::StateDir::new();
    let engine = Engine::start(common::local_engine(&server, state.path()))
        .await
        .expect("engine");
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let names = Names::default();
    let cases = corpus(&names);
    assert!(cases.len() >= 200, "the corpus has {} cases", cases.len());

    let mut replies = nats.subscribe("_INBOX.hostile.>").await.unwrap();
    let mut fates: HashMap<usize, Fate> = HashMap::new();
    for (i, case) in cases.iter().enumerate() {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_MSG_ID, format!("hostile-{i}").as_str());
        headers.insert(HEADER_REPLY_TO, format!("_INBOX.hostile.{i}").as_str());
        if let Some(ct) = &case.content_type {
            headers.insert(HEADER_CONTENT_TYPE, ct.as_str());
        }
        for (name, value) in &case.extra_headers {
            headers.insert(name.as_str(), value.as_str());
        }
        let stored = async {
            js.publish_with_headers(case.subject.clone(), headers, case.payload.clone().into())
                .await?
                .await
        };
        if let Err(e) = stored.await {
            fates.insert(i, Fate::NotStored(e.to_string()));
        }
    }
    let expected_answers = cases.len() - fates.len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut answered = 0;
    while answered < expected_answers {
        let reply = tokio::time::timeout_at(deadline, replies.next())
            .await
            .unwrap_or_else(|_| {
                let missing: Vec<&str> = (0..cases.len())
                    .filter(|i| !fates.contains_key(i))
                    .map(|i| cases[i].name.as_str())
                    .collect();
                panic!("no answer within 60 s for {missing:?}")
            })
            .expect("reply");
        let i: usize = reply
            .subject
            .as_str()
            .rsplit('.')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let encoding = Encoding::from_content_type(
            reply
                .headers
                .as_ref()
                .and_then(|h| h.get(HEADER_CONTENT_TYPE))
                .map(|v| v.as_str()),
        )
        .unwrap();
        let decoded: CommandReply = codec::decode("reply", &reply.payload, encoding).unwrap();
        assert!(
            fates.insert(i, Fate::Answered(decoded)).is_none(),
            "{}: answered twice",
            cases[i].name
        );
        answered += 1;
    }

    // Every case got a clear reason; none created a task.
    let mut invalid = 0u64;
    let mut counts: HashMap<&'static str, usize> = HashMap::new();
    for (i, case) in cases.iter().enumerate() {
        match &fates[&i] {
            Fate::NotStored(error) => {
                assert!(!error.is_empty(), "{}", case.name);
                *counts.entry("not stored").or_default() += 1;
            }
            Fate::Answered(CommandReply::Invalid { error }) => {
                assert!(case.expect_field.is_none(), "{}: {error}", case.name);
                assert!(
                    !error.is_empty() && !error.contains('\n'),
                    "{}: {error:?}",
                    case.name
                );
                invalid += 1;
                *counts.entry("dead-lettered").or_default() += 1;
            }
            Fate::Answered(CommandReply::Rejected { problems, .. }) => {
                assert!(!problems.is_empty(), "{}", case.name);
                if let Some(field) = case.expect_field {
                    assert!(
                        problems.iter().any(|p| p.field == field),
                        "{}: {field} not named: {problems:?}",
                        case.name
                    );
                }
                for p in problems {
                    assert!(
                        !p.field.is_empty() && !p.message.is_empty(),
                        "{}: {p:?}",
                        case.name
                    );
                }
                *counts.entry("rejected").or_default() += 1;
            }
            Fate::Answered(CommandReply::Refused { reason, state, .. }) => {
                assert!(!reason.is_empty(), "{}", case.name);
                assert_ne!(*state, TaskState::Accepted, "{}", case.name);
                *counts.entry("refused").or_default() += 1;
            }
            Fate::Answered(reply @ CommandReply::Applied { .. }) => {
                panic!("{}: a malformed command was applied: {reply:?}", case.name)
            }
        }
    }
    eprintln!("{} malformed commands: {counts:?}", cases.len());

    // Every dead-lettered case is kept, each with a one-line reason.
    let mut dead = js.get_stream(names.dead_letter_stream()).await.unwrap();
    assert_eq!(dead.info().await.unwrap().state.messages, invalid);
    assert_eq!(
        engine.intake_stats.dead_lettered.load(Ordering::Relaxed),
        invalid
    );
    let consumer = dead
        .create_consumer(pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut letters = consumer.messages().await.unwrap().take(invalid as usize);
    while let Some(letter) = letters.next().await {
        let letter = letter.unwrap();
        let reason = letter
            .headers
            .as_ref()
            .and_then(|h| h.get("Taskpods-Dead-Reason"));
        let reason = reason.expect("a reason").as_str();
        assert!(!reason.is_empty() && reason.len() <= 1024, "{reason:?}");
    }

    // Nothing is left unacked or pending redelivery.
    assert_nothing_stuck(&nats, Duration::from_secs(10), Redeliveries::Forbidden).await;

    // The engine is still up: a normal task runs to success.
    let client = client_on(server.connect().await);
    let launched = client
        .launch(LaunchTask {
            timeout_secs: Some(60),
            ..LaunchTask::script("echo still fine")
        })
        .await
        .expect("a normal launch after the corpus");
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let state = client.get(launched.task_id).await.unwrap().task.state;
        if state == TaskState::Succeeded {
            break;
        }
        assert!(
            !state.is_terminal() && tokio::time::Instant::now() < until,
            "the task after the corpus ended {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    engine
        .shutdown()
        .await
        .expect("the engine shuts down cleanly");
}

/// The launch that killed the engine before: a JSON key holding a newline, whose "unknown field" detail
/// went into a header value. Then the same through an agent's own report subject.
#[tokio::test]
async fn a_newline_in_a_key_is_dead_lettered_and_does_not_stop_the_engine() {
    let server = NatsServer::start();
    let state = common::StateDir::new();
    let mut engine = Engine::start(common::local_engine(&server, state.path()))
        .await
        .expect("engine");
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let names = Names::default();
    let task = TaskId::from_idempotency_key("newline report");
    for (subject, payload) in [
        (
            names.launch(),
            br#"{"script":"echo","bad\nkey":1}"#.to_vec(),
        ),
        (
            names.agent_report(task, "progress"),
            br#"{"report":"x\ny"}"#.to_vec(),
        ),
    ] {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_CONTENT_TYPE, "application/json");
        js.publish_with_headers(subject, headers, payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    assert_nothing_stuck(&nats, Duration::from_secs(10), Redeliveries::Forbidden).await;
    assert_eq!(engine.intake_stats.dead_lettered.load(Ordering::Relaxed), 2);
    assert_eq!(engine.intake_stats.panicked.load(Ordering::Relaxed), 0);
    let still_running = tokio::time::timeout(Duration::from_secs(1), engine.failed()).await;
    assert!(
        still_running.is_err(),
        "the engine stopped: {still_running:?}"
    );
    let mut dead = js.get_stream(names.dead_letter_stream()).await.unwrap();
    let kept = dead
        .direct_get_last_for_subject(names.dead_letter("undecodable"))
        .await
        .unwrap();
    let reason = kept.headers.get("Taskpods-Dead-Reason").unwrap().as_str();
    assert!(
        reason.contains("x\\ny"),
        "the newline is escaped: {reason:?}"
    );
    assert!(dead.info().await.unwrap().state.messages == 2);
    engine.shutdown().await.expect("shutdown");
}
