//! The event store's promises against a real server: one writer wins a race, stale writers get a
//! conflict (not a failure), a retried append is a no-op, and a server that goes away mid-write is an
//! `Unavailable` error that loses nothing.

use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use taskpods_engine::store::{EventStore, ExecuteError, LoadedTask, StoreErrorKind};
use taskpods_engine::topology::{self, TopologyConfig};
use taskpods_events::{EventBody, Input, LaunchTask, Names, Refusal, TaskId, TaskState, stamp};
use taskpods_harness::NatsServer;

async fn store(server: &NatsServer) -> EventStore {
    let nats = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(1))
        .connect(server.url())
        .await
        .expect("connect");
    let mut js = jetstream::new(nats);
    js.set_timeout(Duration::from_secs(2));
    let topology = topology::ensure(&js, &TopologyConfig::default())
        .await
        .expect("topology");
    EventStore::new(js, topology.events, Names::default())
}

fn launch(key: &str) -> Input {
    Input::Launch {
        spec: LaunchTask {
            idempotency_key: Some(key.into()),
            ..LaunchTask::script("echo")
        }
        .validate(&Default::default()),
        at: Utc::now(),
    }
}

#[tokio::test]
async fn racing_replicas_stale_writers_and_retries() {
    let server = NatsServer::start();
    let (a, b) = (store(&server).await, store(&server).await);
    let task = TaskId::from_idempotency_key("race");

    // Two replicas launch the same task at once, both believing it new: exactly one appends.
    let input = launch("race");
    let fresh = || Some(LoadedTask::default());
    let (ra, rb) = tokio::join!(
        a.execute(task, &input, Utc::now(), fresh()),
        b.execute(task, &input, Utc::now(), fresh())
    );
    let outcomes = [&ra, &rb];
    let created = outcomes.iter().filter(|r| r.is_ok()).count();
    let refused = outcomes
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(ExecuteError::Refused {
                    refusal: Refusal::AlreadyExists,
                    ..
                })
            )
        })
        .count();
    assert_eq!((created, refused), (1, 1), "{ra:?} / {rb:?}");
    let loaded = a.load(task).await.expect("load");
    assert_eq!(loaded.task.events, 1);
    assert_eq!(loaded.task.state, TaskState::Accepted);

    // A writer holding a stale view gets a conflict kind, and nothing is written.
    let stale = LoadedTask::default();
    let job = stamp(
        task,
        &loaded.task,
        Utc::now(),
        vec![EventBody::Scheduled { job: "j".into() }],
    );
    let err = a.append(&stale, &job).await.expect_err("stale");
    assert_eq!(err.kind(), StoreErrorKind::Conflict);
    assert_eq!(a.load(task).await.expect("load").task.events, 1);

    // The right append, then the very same append again (a retry after a crash): the retry is a
    // conflict, the log holds the event once.
    a.append(&loaded, &job).await.expect("append");
    let err = a.append(&loaded, &job).await.expect_err("retry");
    assert_eq!(err.kind(), StoreErrorKind::Conflict);
    let events = a.read(task).await.expect("read");
    let kinds: Vec<&str> = events.iter().map(|e| e.event.body.kind()).collect();
    assert_eq!(kinds, ["accepted", "scheduled"]);
    // execute, by contrast, judges again after the conflict and reports the input as already applied.
    let err = a
        .execute(
            task,
            &Input::JobCreated { job: "j".into() },
            Utc::now(),
            Some(loaded),
        )
        .await
        .expect_err("already applied");
    assert!(
        matches!(
            err,
            ExecuteError::Refused {
                refusal: Refusal::Duplicate,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_server_that_goes_away_mid_write_is_unavailable_and_loses_nothing() {
    let mut server = NatsServer::start();
    let store = store(&server).await;
    let task = TaskId::from_idempotency_key("outage");
    store
        .execute(task, &launch("outage"), Utc::now(), None)
        .await
        .expect("launch");

    server.kill();
    let err = store
        .execute(
            task,
            &Input::JobCreated { job: "j".into() },
            Utc::now(),
            None,
        )
        .await
        .expect_err("no server");
    match err {
        ExecuteError::Store(e) => assert_eq!(e.kind(), StoreErrorKind::Unavailable, "{e}"),
        other => panic!("expected a store error, got {other}"),
    }

    server.restart();
    server.wait_for_jetstream().await;
    // The same client reconnects by itself; the write that failed is simply done again.
    let mut done = None;
    for _ in 0..50 {
        match store
            .execute(
                task,
                &Input::JobCreated { job: "j".into() },
                Utc::now(),
                None,
            )
            .await
        {
            Ok(executed) => {
                done = Some(executed);
                break;
            }
            Err(ExecuteError::Store(e)) if e.kind() == StoreErrorKind::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(other) => panic!("{other}"),
        }
    }
    let done = done.expect("the store works again after the restart");
    assert_eq!(done.task.task.state, TaskState::Scheduled);
    let kinds: Vec<&str> = store
        .read(task)
        .await
        .expect("read")
        .iter()
        .map(|e| e.event.body.kind())
        .collect();
    assert_eq!(kinds, ["accepted", "scheduled"]);
}
