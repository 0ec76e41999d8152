//! Shared builders for the events tests: realistic histories that put a task in each state.
#![allow(dead_code)]

use chrono::{DateTime, TimeZone, Utc};
use taskpods_events::{
    CancelTask, Event, EventBody, FailureReason, Input, LaunchPolicy, LaunchTask, Task, TaskId,
    TaskOutcome, decide, evolve, stamp,
};

pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0)
        .single()
        .expect("valid time")
}

pub fn task_id() -> TaskId {
    TaskId::from_idempotency_key("fixture-task")
}

pub fn launch_input() -> Input {
    let mut launch = LaunchTask::script("echo hello; exit 0");
    launch.timeout_secs = Some(600);
    launch.requester = Some("brain".into());
    Input::Launch {
        spec: launch.validate(&LaunchPolicy::default()),
        at: t0(),
    }
}

pub fn cancel_input() -> Input {
    Input::Cancel(CancelTask {
        task_id: task_id().0,
        reason: Some("user asked".into()),
        requester: Some("brain".into()),
    })
}

pub fn outcome(exit_code: i32) -> TaskOutcome {
    TaskOutcome {
        exit_code,
        duration_ms: 1234,
        stdout_bytes: 6,
        stderr_bytes: 0,
        output_truncated: false,
        result: None,
        ..TaskOutcome::default()
    }
}

/// Applies inputs in order through decide/stamp/evolve, panicking on a refusal: for building fixtures.
pub fn run(inputs: &[Input]) -> (Task, Vec<Event>) {
    let mut task = Task::default();
    let mut events = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let bodies = decide(&task, input).unwrap_or_else(|r| panic!("input {i} refused: {r}"));
        let at = t0() + chrono::TimeDelta::seconds(i as i64);
        for event in stamp(task_id(), &task, at, bodies) {
            task = evolve(task, &event);
            events.push(event);
        }
    }
    (task, events)
}

/// Named histories that reach each state the table documents.
pub fn histories() -> Vec<(&'static str, Vec<Input>)> {
    let accepted = vec![launch_input()];
    let scheduled = [
        accepted.clone(),
        vec![Input::JobCreated {
            job: "job-a".into(),
        }],
    ]
    .concat();
    let starting = [
        scheduled.clone(),
        vec![Input::PodBound {
            job: "job-a".into(),
            pod: "pod-a".into(),
            node: Some("node-1".into()),
        }],
    ]
    .concat();
    let running = [starting.clone(), vec![Input::AgentHello]].concat();
    let cancelling = [running.clone(), vec![cancel_input()]].concat();
    let succeeded = [running.clone(), vec![Input::AgentResult(outcome(0))]].concat();
    let failed = [running.clone(), vec![Input::AgentResult(outcome(3))]].concat();
    let timed_out = [
        running.clone(),
        vec![Input::DeadlineReached {
            now: t0() + chrono::TimeDelta::seconds(601),
        }],
    ]
    .concat();
    let cancelled = [cancelling.clone(), vec![Input::JobGone]].concat();
    let rejected = vec![Input::Launch {
        spec: LaunchTask::default().validate(&LaunchPolicy::default()),
        at: t0(),
    }];
    let reaped = [succeeded.clone(), vec![Input::Reaped]].concat();
    vec![
        ("new", vec![]),
        ("accepted", accepted),
        ("scheduled", scheduled),
        ("starting", starting),
        ("running", running),
        ("cancelling", cancelling),
        ("succeeded", succeeded),
        ("failed", failed),
        ("timed_out", timed_out),
        ("cancelled", cancelled),
        ("rejected", rejected),
        ("succeeded+reaped", reaped),
    ]
}

/// One of each kind of input, with a short name for the table.
pub fn inputs() -> Vec<(&'static str, Input)> {
    vec![
        ("launch (valid)", launch_input()),
        (
            "launch (invalid)",
            Input::Launch {
                spec: LaunchTask::default().validate(&LaunchPolicy::default()),
                at: t0(),
            },
        ),
        ("cancel", cancel_input()),
        (
            "job created (job-a)",
            Input::JobCreated {
                job: "job-a".into(),
            },
        ),
        (
            "job created (job-b)",
            Input::JobCreated {
                job: "job-b".into(),
            },
        ),
        (
            "pod bound (pod-a)",
            Input::PodBound {
                job: "job-a".into(),
                pod: "pod-a".into(),
                node: None,
            },
        ),
        ("agent hello", Input::AgentHello),
        (
            "agent progress",
            Input::AgentProgress {
                message: "half way".into(),
                percent: Some(50.0),
            },
        ),
        ("agent result (exit 0)", Input::AgentResult(outcome(0))),
        ("agent result (exit 3)", Input::AgentResult(outcome(3))),
        (
            "pod exited (0, no result)",
            Input::PodExited { exit_code: 0 },
        ),
        (
            "pod exited (137, no result)",
            Input::PodExited { exit_code: 137 },
        ),
        (
            "backend failed (oom_killed)",
            Input::BackendFailed {
                reason: FailureReason::OomKilled,
                message: None,
            },
        ),
        (
            "backend failed (deadline_exceeded)",
            Input::BackendFailed {
                reason: FailureReason::DeadlineExceeded,
                message: None,
            },
        ),
        ("job gone", Input::JobGone),
        (
            "deadline timer (early)",
            Input::DeadlineReached {
                now: t0() + chrono::TimeDelta::seconds(10),
            },
        ),
        (
            "deadline timer (due)",
            Input::DeadlineReached {
                now: t0() + chrono::TimeDelta::seconds(600),
            },
        ),
        (
            "startup timeout (unschedulable)",
            Input::StartupTimedOut {
                reason: FailureReason::Unschedulable,
                message: None,
            },
        ),
        ("heartbeat lost", Input::HeartbeatLost),
        ("reaped", Input::Reaped),
    ]
}

pub fn describe(body: &EventBody) -> String {
    match body {
        EventBody::Failed { reason, .. } => format!("failed[{reason}]"),
        other => other.kind().to_owned(),
    }
}
