//! Wire compatibility: events written by earlier versions stay readable (fixtures on disk), unknown kinds
//! decode instead of failing, and bad commands get errors that name the field.

mod common;

use std::collections::BTreeMap;

use common::{cancel_input, launch_input, outcome, run, task_id};
use taskpods_events::codec::{decode, decode_event, encode_event, to_msgpack};
use taskpods_events::{
    AgentReport, CodecError, Encoding, EventBody, FailureReason, Input, LaunchTask, Mode, TaskState,
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1");

/// The history the v1 fixtures were written from: every event kind this version writes.
fn fixture_history() -> Vec<taskpods_events::Event> {
    let running = &common::histories()[4].1;
    let (_, mut log) = run(&[
        running.clone(),
        vec![
            Input::AgentProgress {
                message: "compiling".into(),
                percent: Some(42.5),
            },
            cancel_input(),
            Input::AgentResult(outcome(143)),
            Input::Reaped,
        ],
    ]
    .concat());
    let (_, failed) = run(&[running.clone(), vec![Input::AgentResult(outcome(3))]].concat());
    let (_, timed_out) = run(&[
        running.clone(),
        vec![Input::DeadlineReached {
            now: common::t0() + chrono::TimeDelta::seconds(900),
        }],
    ]
    .concat());
    let (_, ok) = run(&[running.clone(), vec![Input::AgentResult(outcome(0))]].concat());
    let (_, rejected) = run(&[Input::Launch {
        spec: LaunchTask::default().validate(&Default::default()),
        at: common::t0(),
    }]);
    log.extend(failed.last().cloned());
    log.extend(timed_out.last().cloned());
    log.extend(ok.last().cloned());
    log.extend(rejected);
    log
}

#[test]
fn v1_fixtures_still_decode_to_the_same_events() {
    let history = fixture_history();
    let kinds: Vec<&str> = history.iter().map(|e| e.body.kind()).collect();
    assert_eq!(
        kinds,
        [
            "accepted",
            "scheduled",
            "started",
            "running",
            "progress",
            "cancel_requested",
            "cancelled",
            "reaped",
            "failed",
            "timed_out",
            "succeeded",
            "rejected"
        ]
    );
    if std::env::var_os("TASKPODS_WRITE_FIXTURES").is_some() {
        std::fs::create_dir_all(FIXTURES).expect("fixture dir");
        for (i, event) in history.iter().enumerate() {
            let path = format!("{FIXTURES}/{i:02}-{}.msgpack", event.body.kind());
            std::fs::write(path, encode_event(event).expect("encodable")).expect("write fixture");
        }
    }
    for (i, expected) in history.iter().enumerate() {
        let path = format!("{FIXTURES}/{i:02}-{}.msgpack", expected.body.kind());
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let decoded = decode_event(&bytes).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(&decoded, expected, "{path}");
        assert_eq!(decoded.v, 1);
    }
}

/// A msgpack map as a newer engine might write it.
fn newer_event(kind: &str) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Future<'a> {
        v: u16,
        id: uuid::Uuid,
        task: uuid::Uuid,
        at: &'a str,
        kind: &'a str,
        teleported_to: &'a str,
        hops: Vec<u32>,
    }
    to_msgpack(&Future {
        v: 7,
        id: task_id().event_id(3),
        task: task_id().0,
        at: "2027-01-01T00:00:00Z",
        kind,
        teleported_to: "mars",
        hops: vec![1, 2, 3],
    })
    .expect("encodable")
}

#[test]
fn unknown_kinds_reasons_and_fields_decode_instead_of_failing() {
    let event = decode_event(&newer_event("teleported")).expect("an unknown kind still decodes");
    assert_eq!(event.body, EventBody::Unknown);
    assert_eq!(event.v, 7);
    assert_eq!(event.task, task_id());
    assert_eq!(event.id, task_id().event_id(3));

    // A known kind with extra fields from the future decodes, keeping what it understands.
    let running = decode_event(&newer_event("running")).expect("decodes");
    assert_eq!(running.body, EventBody::Running);

    // Unknown failure reasons and states decode to their Unknown variants.
    let reason: FailureReason = decode(
        "reason",
        br#"{"code":"cosmic_ray","bit":7}"#,
        Encoding::Json,
    )
    .expect("decodes");
    assert_eq!(reason, FailureReason::Unknown);
    let state: TaskState =
        decode("state", br#"{"state":"hibernating"}"#, Encoding::Json).expect("decodes");
    assert_eq!(state, TaskState::Unknown);

    // And an unknown event folds into nothing: the task keeps its state, but the position advances.
    let (task, _) = run(&[launch_input()]);
    let after = taskpods_events::evolve(task.clone(), &event);
    assert_eq!(after.state, task.state);
    assert_eq!(after.events, task.events + 1);
}

#[test]
fn json_commands_from_other_languages_decode_and_bad_ones_name_the_field() {
    let launch: LaunchTask = decode(
        "launch command",
        br#"{"idempotency_key":"py-1","script":"print(1)","mode":"script","env":{"A":"1"},
            "timeout_secs":60,"resources":{"memory_limit":"256Mi"},"labels":{"team":"ml"}}"#,
        Encoding::Json,
    )
    .expect("a Python Brain's launch decodes");
    assert_eq!(launch.script.as_deref(), Some("print(1)"));
    assert_eq!(launch.mode, Mode::Script);
    assert_eq!(
        launch.env,
        BTreeMap::from([("A".to_owned(), "1".to_owned())])
    );
    assert_eq!(launch.resources.memory_limit.as_deref(), Some("256Mi"));

    let cases: [(&[u8], &str, &str); 6] = [
        (
            br#"{"script": 5}"#,
            "script",
            "invalid type: integer `5`, expected a string",
        ),
        (
            br#"{"timeout_secs": "soon"}"#,
            "timeout_secs",
            "invalid type: string \"soon\"",
        ),
        (
            br#"{"timeout_secs": -1}"#,
            "timeout_secs",
            "invalid value: integer `-1`",
        ),
        (
            br#"{"resources": {"gpus": "8"}}"#,
            "resources.gpus",
            "unknown field `gpus`",
        ),
        (br#"{"mode": "yolo"}"#, "mode", "unknown variant `yolo`"),
        (br#"{"script": "x"} trailing"#, ".", "trailing characters"),
    ];
    for (bytes, path, message) in cases {
        match decode::<LaunchTask>("launch command", bytes, Encoding::Json) {
            Err(CodecError::Decode {
                path: p,
                message: m,
                ..
            }) => {
                assert_eq!(p, path, "{}", String::from_utf8_lossy(bytes));
                assert!(m.contains(message), "{m:?} should contain {message:?}");
            }
            other => panic!(
                "{}: expected a decode error, got {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    // msgpack with a wrong type names the field too, and trailing bytes are refused.
    let bad =
        to_msgpack(&serde_json::json!({"script": ["not", "a", "string"]})).expect("encodable");
    let err =
        decode::<LaunchTask>("launch command", &bad, Encoding::Msgpack).expect_err("wrong type");
    assert!(
        matches!(&err, CodecError::Decode { path, .. } if path == "script"),
        "{err}"
    );
    let mut good = to_msgpack(&LaunchTask::script("echo")).expect("encodable");
    good.push(0xc0);
    let err =
        decode::<LaunchTask>("launch command", &good, Encoding::Msgpack).expect_err("trailing");
    assert!(err.to_string().contains("1 trailing bytes"), "{err}");

    // Agent reports are tagged by `report`.
    let report: AgentReport = decode(
        "agent report",
        br#"{"report":"progress","message":"50%","percent":50}"#,
        Encoding::Json,
    )
    .expect("decodes");
    assert_eq!(
        report,
        AgentReport::Progress {
            message: "50%".into(),
            percent: Some(50.0)
        }
    );

    assert_eq!(Encoding::from_content_type(None), Ok(Encoding::Msgpack));
    assert_eq!(
        Encoding::from_content_type(Some("application/json; charset=utf-8")),
        Ok(Encoding::Json)
    );
    assert_eq!(
        Encoding::from_content_type(Some("text/yaml")),
        Err(CodecError::UnsupportedContentType("text/yaml".into()))
    );
}
