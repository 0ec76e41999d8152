//! Property tests: random histories, driven through the real `decide`, keep the lifecycle's promises.

mod common;

use chrono::TimeDelta;
use common::{cancel_input, launch_input, outcome, t0, task_id};
use proptest::prelude::*;
use taskpods_events::codec::{decode, decode_event, encode_event};
use taskpods_events::{
    AgentReport, CancelTask, Encoding, Event, EventBody, FailureReason, Input, LaunchTask, Task,
    decide, evolve, stamp,
};

fn any_reason() -> impl Strategy<Value = FailureReason> {
    prop_oneof![
        (1i32..256).prop_map(|exit_code| FailureReason::NonZeroExit { exit_code }),
        Just(FailureReason::OomKilled),
        Just(FailureReason::ImagePull),
        Just(FailureReason::Unschedulable),
        Just(FailureReason::QuotaExceeded),
        Just(FailureReason::Evicted),
        Just(FailureReason::DeadlineExceeded),
        Just(FailureReason::BackendError),
    ]
}

fn any_input() -> impl Strategy<Value = Input> {
    let job = prop_oneof![Just("job-a".to_owned()), Just("job-b".to_owned())];
    prop_oneof![
        Just(launch_input()),
        Just(cancel_input()),
        job.clone().prop_map(|job| Input::JobCreated { job }),
        job.prop_map(|job| Input::PodBound {
            job,
            pod: "pod-a".into(),
            node: None
        }),
        Just(Input::AgentHello),
        ("[a-z ]{0,12}", proptest::option::of(0f32..100.0))
            .prop_map(|(message, percent)| Input::AgentProgress { message, percent }),
        (0i32..5).prop_map(|code| Input::AgentResult(outcome(code))),
        (0i32..140).prop_map(|exit_code| Input::PodExited { exit_code }),
        any_reason().prop_map(|reason| Input::BackendFailed {
            reason,
            message: None
        }),
        Just(Input::JobGone),
        (0i64..1200).prop_map(|s| Input::DeadlineReached {
            now: t0() + TimeDelta::seconds(s)
        }),
        any_reason().prop_map(|reason| Input::StartupTimedOut {
            reason,
            message: None
        }),
        Just(Input::HeartbeatLost),
        Just(Input::Reaped),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_histories_keep_the_lifecycle_promises(inputs in prop::collection::vec(any_input(), 0..40)) {
        let mut live = Task::default();
        let mut log: Vec<Event> = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let before = live.clone();
            match decide(&live, input) {
                Ok(bodies) => {
                    prop_assert!(!bodies.is_empty(), "an accepted input appends something");
                    let at = t0() + TimeDelta::milliseconds(i as i64);
                    for event in stamp(task_id(), &live, at, bodies) {
                        live = evolve(live, &event);
                        log.push(event);
                    }
                }
                // A refusal appends nothing and leaves the task as it was.
                Err(_) => prop_assert_eq!(&live, &before),
            }
        }

        // Replaying the log gives the live task, also after a trip through the wire codec.
        prop_assert_eq!(&Task::replay(&log), &live);
        let decoded: Vec<Event> = log
            .iter()
            .map(|e| decode_event(&encode_event(e).expect("encodable")).expect("decodable"))
            .collect();
        prop_assert_eq!(&decoded, &log);
        prop_assert_eq!(&Task::replay(&decoded), &live);

        // Positions are dense and ids deterministic: what makes retried appends no-ops.
        for (i, event) in log.iter().enumerate() {
            prop_assert_eq!(event.id, task_id().event_id(i as u64));
        }
        prop_assert_eq!(live.events, log.len() as u64);

        // Nothing but one `Reaped` follows the terminal event, and there is at most one terminal event.
        if let Some(end) = log.iter().position(|e| e.body.is_terminal()) {
            let after: Vec<&str> = log[end + 1..].iter().map(|e| e.body.kind()).collect();
            prop_assert!(after.is_empty() || after == ["reaped"], "after terminal: {:?}", after);
            prop_assert!(live.state.is_terminal());
            prop_assert_eq!(live.finished_at, Some(log[end].at));
        } else {
            prop_assert!(!live.state.is_terminal());
            prop_assert!(log.iter().all(|e| !matches!(e.body, EventBody::Reaped)));
        }
        // The first event, if any, is the launch's verdict.
        if let Some(first) = log.first() {
            let verdict = matches!(first.body, EventBody::Accepted { .. } | EventBody::Rejected { .. });
            prop_assert!(verdict, "first event is {}", first.body.kind());
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_event(&bytes);
        for encoding in [Encoding::Msgpack, Encoding::Json] {
            let _ = decode::<LaunchTask>("launch command", &bytes, encoding);
            let _ = decode::<CancelTask>("cancel command", &bytes, encoding);
            let _ = decode::<AgentReport>("agent report", &bytes, encoding);
        }
    }

    #[test]
    fn decoding_damaged_events_never_panics(cut in 0usize..400, flip in 0usize..400, bit in 0u8..8) {
        let (_, log) = common::run(&[launch_input(), cancel_input()]);
        let mut bytes = encode_event(&log[0]).expect("encodable");
        if !bytes.is_empty() {
            let i = flip % bytes.len();
            bytes[i] ^= 1 << bit;
            bytes.truncate(cut.max(1).min(bytes.len()));
        }
        let _ = decode_event(&bytes);
    }
}
