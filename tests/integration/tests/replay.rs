//! `taskpods replay` against a real nats-server: the timeline of a fixed history (golden file), `--at`,
//! JSON, oddities, an unknown event kind (shown by replay, skipped by the projector), and
//! `--failed --since`.
//!
//! Regenerate the golden file with `UPDATE_GOLDEN=1 cargo test -p taskpods-integration --test replay`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, TimeDelta, Utc};
use taskpods_engine::cli::Global;
use taskpods_engine::cli::replay::{ReplayArgs, run_to};
use taskpods_engine::topology::{self, TopologyConfig};
use taskpods_events::{Event, EventBody, Names, TaskId, TaskOutcome, TaskState, codec};
use taskpods_harness::NatsServer;
use taskpods_projections::generate::{self, Rng};
use taskpods_projections::{ProjectorConfig, ProjectorStats, Views, projector};
use tokio_util::sync::CancellationToken;

fn t(secs: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-28T10:00:00Z")
        .expect("time")
        .with_timezone(&Utc)
        + TimeDelta::seconds(secs)
}

/// A task that succeeded, with a duplicate hello (refused transition), a kind from a newer version, a
/// progress line after the end, and one event missing before `reaped` (a gap).
fn fixed_history(task: TaskId) -> Vec<(u64, Option<Event>)> {
    let spec = generate::spec(1);
    let ev = |position: u64, secs: i64, body: EventBody| {
        (position, Some(Event::new(task, position, t(secs), body)))
    };
    vec![
        ev(
            0,
            0,
            EventBody::Accepted {
                spec,
                deadline: t(600),
            },
        ),
        ev(
            1,
            1,
            EventBody::Scheduled {
                job: task.job_name(),
            },
        ),
        ev(
            2,
            2,
            EventBody::Started {
                pod: format!("{}-x7k2p", task.job_name()),
                node: Some("node-a".into()),
            },
        ),
        ev(3, 3, EventBody::Running),
        ev(4, 4, EventBody::Running),
        ev(
            5,
            5,
            EventBody::Progress {
                message: "cloning".into(),
                percent: Some(10.0),
            },
        ),
        ev(
            6,
            6,
            EventBody::Progress {
                message: "testing".into(),
                percent: Some(60.0),
            },
        ),
        ev(
            7,
            7,
            EventBody::Succeeded {
                outcome: TaskOutcome {
                    exit_code: 0,
                    duration_ms: 4200,
                    stdout_bytes: 1000,
                    stderr_bytes: 24,
                    output_truncated: false,
                    result: Some(serde_json::json!({"answer": 42})),
                    output_tail: Some("all done\n".into()),
                    ..TaskOutcome::default()
                },
            },
        ),
        // Position 8: a kind from a newer engine (published raw below).
        (8, None),
        ev(
            9,
            9,
            EventBody::Progress {
                message: "late line".into(),
                percent: None,
            },
        ),
        // Position 10 is missing.
        ev(11, 11, EventBody::Reaped),
    ]
}

async fn publish_fixed(js: &jetstream::Context, names: &Names, task: TaskId) -> u64 {
    let mut last = 0;
    for (position, event) in fixed_history(task) {
        let (payload, headers) = match event {
            Some(e) => (
                codec::encode_event(&e).expect("encode"),
                taskpods_projections::log::headers(&e, position),
            ),
            None => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(
                    "Nats-Msg-Id",
                    format!("{task}:{position}:snapshotted").as_str(),
                );
                headers.insert("Taskpods-Kind", "snapshotted");
                (
                    generate::future_event(task, position, t(8), "snapshotted").expect("encode"),
                    headers,
                )
            }
        };
        last = js
            .publish_with_headers(names.events(task), headers, payload.into())
            .await
            .expect("publish")
            .await
            .expect("ack")
            .sequence;
    }
    last
}

async fn setup() -> (NatsServer, jetstream::Context, Global) {
    let server = NatsServer::start();
    let js = jetstream::new(server.connect().await);
    topology::ensure(&js, &TopologyConfig::default())
        .await
        .expect("topology");
    let global = Global {
        nats_urls: vec![server.url()],
        creds: None,
        names: Names::default(),
    };
    (server, js, global)
}

fn args(task: Option<TaskId>) -> ReplayArgs {
    ReplayArgs {
        task,
        at: None,
        failed: false,
        since: "24h".into(),
        json: false,
    }
}

async fn replay_text(global: &Global, args: &ReplayArgs) -> String {
    let mut out = Vec::new();
    let code = run_to(global, args, &mut out).await.expect("replay runs");
    assert_eq!(code, ExitCode::SUCCESS);
    String::from_utf8(out).expect("utf-8")
}

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn check_golden(name: &str, actual: &str) {
    let path = golden(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("golden dir");
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(
        actual,
        expected,
        "replay output differs from {} (UPDATE_GOLDEN=1 rewrites it after review)",
        path.display()
    );
}

#[tokio::test]
async fn replay_prints_the_golden_timeline_and_the_state_at_a_point() {
    let (_server, js, global) = setup().await;
    let task = TaskId::from_idempotency_key("golden-replay");
    let last = publish_fixed(&js, &global.names, task).await;
    assert_eq!(last, 11);

    let text = replay_text(&global, &args(Some(task))).await;
    check_golden("replay_timeline.txt", &text);
    // What the golden file must show, whatever its layout.
    assert!(text.contains("snapshotted"), "{text}");
    assert!(text.contains("refused transition: `running` is not allowed in state running"));
    assert!(text.contains("unknown kind `snapshotted`"));
    assert!(text.contains("`progress` after the task ended (succeeded)"));
    assert!(text.contains("gap: position 11 follows position 9 (1 event(s) missing)"));

    // --at a sequence, and at a time.
    let at = |at: &str| ReplayArgs {
        at: Some(at.into()),
        ..args(Some(task))
    };
    let text = replay_text(&global, &at("3")).await;
    check_golden("replay_at_seq_3.txt", &text);
    assert!(
        text.contains("state: starting after 3 event(s) (seq 3)"),
        "{text}"
    );
    let text = replay_text(&global, &at("2026-11-28T10:00:01Z")).await;
    assert!(
        text.contains("state: scheduled after 2 event(s) (seq 2)"),
        "{text}"
    );
    let text = replay_text(&global, &at("2026-11-28T10:00:07.5Z")).await;
    assert!(text.contains("state: succeeded after 8 event(s)"), "{text}");

    // JSON for machines.
    let json = replay_text(
        &global,
        &ReplayArgs {
            json: true,
            ..args(Some(task))
        },
    )
    .await;
    let doc: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let entries = doc["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 11);
    assert_eq!(entries[8]["kind"], "snapshotted");
    assert_eq!(entries[8]["state"], "succeeded");
    assert_eq!(entries[7]["payload"]["outcome"]["result"]["answer"], 42);
    let kinds: Vec<&str> = doc["oddities"]
        .as_array()
        .expect("oddities")
        .iter()
        .filter_map(|o| o["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "refused_transition",
            "unknown_kind",
            "after_terminal",
            "gap"
        ]
    );
    assert_eq!(doc["state"]["state"], "succeeded");

    // Bad input is a clear error, not a panic.
    let mut out = Vec::new();
    let err = run_to(&global, &at("yesterday"), &mut out)
        .await
        .expect_err("bad --at");
    assert!(err.to_string().contains("RFC 3339"), "{err}");
    let err = run_to(&global, &args(Some(TaskId::mint())), &mut out)
        .await
        .expect_err("no such task");
    assert!(err.to_string().contains("no events for task"), "{err}");
}

#[tokio::test]
async fn an_unknown_event_kind_is_skipped_by_the_projector_with_a_warning() {
    let (_server, js, global) = setup().await;
    let task = TaskId::from_idempotency_key("golden-replay");
    let last = publish_fixed(&js, &global.names, task).await;

    let stats = Arc::new(ProjectorStats::default());
    tokio::time::timeout(
        Duration::from_secs(30),
        projector::run(
            js.clone(),
            ProjectorConfig {
                stop_when_caught_up: true,
                ..ProjectorConfig::default()
            },
            stats.clone(),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("caught up")
    .expect("projector");
    assert_eq!(stats.unknown.load(Ordering::Relaxed), 1);
    assert_eq!(stats.applied.load(Ordering::Relaxed), 10);
    let views = Views::open(&js, &global.names, Default::default())
        .await
        .expect("views");
    let view = views.task(task).await.expect("read").expect("view");
    assert_eq!(view.state, TaskState::Succeeded);
    assert_eq!(view.seq, last);
    assert_eq!(view.unknown_events, 1);
    assert_eq!(view.progress_count, 2, "the late progress line is ignored");
    assert_eq!(
        view.progress.as_ref().map(|p| p.message.as_str()),
        Some("testing")
    );
    assert!(view.reaped);
    assert_eq!(view.exit_code, Some(0));
    assert_eq!(view.output_bytes, Some(1024));
    let history = views.history(task).await.expect("read").expect("history");
    let kinds: Vec<&str> = history.entries.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "accepted",
            "scheduled",
            "started",
            "running",
            "running",
            "succeeded",
            "snapshotted",
            "reaped"
        ]
    );
    assert!(views.active().await.expect("active").is_empty());
    let page = views.finished_page(None, 10).await.expect("page");
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.entries[0].task, task);
    assert_eq!(page.next, None);
}

#[tokio::test]
async fn replay_failed_lists_failed_and_timed_out_tasks_from_the_stream() {
    let (_server, js, global) = setup().await;
    let histories = generate::histories(51, 300, t(0), 10);
    let events = generate::interleave(&mut Rng::new(52), &histories);
    generate::publish(&js, &global.names, &events, 512)
        .await
        .expect("publish");
    let mut expected: Vec<(TaskId, &str)> = events
        .iter()
        .filter_map(|(_, e)| match &e.body {
            EventBody::Failed { .. } => Some((e.task, "failed")),
            EventBody::TimedOut { .. } => Some((e.task, "timed_out")),
            _ => None,
        })
        .collect();
    expected.sort();
    assert!(!expected.is_empty());

    let json = replay_text(
        &global,
        &ReplayArgs {
            failed: true,
            since: "1h".into(),
            json: true,
            ..args(None)
        },
    )
    .await;
    let doc: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let mut found: Vec<(TaskId, String)> = doc["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| {
            (
                t["task"].as_str().expect("id").parse().expect("task id"),
                t["kind"].as_str().expect("kind").to_owned(),
            )
        })
        .collect();
    found.sort();
    let expected: Vec<(TaskId, String)> = expected
        .into_iter()
        .map(|(t, k)| (t, k.to_owned()))
        .collect();
    assert_eq!(found, expected);
    assert_eq!(doc["scanned"], events.len() as u64);

    let text = replay_text(
        &global,
        &ReplayArgs {
            failed: true,
            since: "2h".into(),
            ..args(None)
        },
    )
    .await;
    let failed = found.iter().filter(|(_, k)| k == "failed").count();
    assert!(
        text.contains(&format!(
            "{failed} failed, {} timed out since",
            found.len() - failed
        )),
        "{text}"
    );
    let mut out = Vec::new();
    let err = run_to(
        &global,
        &ReplayArgs {
            failed: true,
            since: "soon".into(),
            ..args(None)
        },
        &mut out,
    )
    .await
    .expect_err("bad duration");
    assert!(err.to_string().contains("30m"), "{err}");
}
