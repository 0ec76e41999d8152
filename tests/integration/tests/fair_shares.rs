//! Fair shares, enforced by the server and the engine rather than by a well-behaved agent: one task
//! flooding its own output subject cannot evict another task's output, one task's flood of progress
//! reports stores at most the per-task cap, and a hello flood for random ids does not hold up a real
//! task's start. Real nats-server, real engine, real agent and bubblewrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use bytes::Bytes;
use futures::StreamExt;
use taskpods_engine::config::EngineConfig;
use taskpods_engine::intake::IntakeConfig;
use taskpods_engine::server::Engine;
use taskpods_engine::store::EventStore;
use taskpods_events::codec::{self, HEADER_CONTENT_TYPE};
use taskpods_events::{
    AgentReport, EventBody, Input, LaunchTask, MAX_PROGRESS_EVENTS, Names, TaskId, TaskState,
};
use taskpods_harness::NatsServer;
use taskpods_integration as fixtures;
use taskpods_integration::client_on;

/// Every message stored on `task`'s output subject: (stream sequence, payload).
async fn stored_output(js: &jetstream::Context, task: TaskId) -> Vec<(u64, Bytes)> {
    let names = Names::default();
    let stream = js.get_stream(names.log_stream()).await.unwrap();
    let Ok(last) = stream.direct_get_last_for_subject(names.log(task)).await else {
        return Vec::new();
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: names.log(task),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    while let Some(message) = messages.next().await {
        let message = message.unwrap();
        let sequence = message.info().unwrap().stream_sequence;
        out.push((sequence, message.payload.clone()));
        if sequence >= last.sequence {
            break;
        }
    }
    out
}

#[tokio::test]
async fn a_task_flooding_its_own_output_subject_never_evicts_another_tasks_output() {
    let server = NatsServer::start();
    let state = common::StateDir::new();
    let mut config = common::local_engine(&server, state.path());
    // A small pool, so the flood below is far larger than all of it.
    config.topology.log_max_bytes = 8 << 20;
    config.topology.log_max_messages_per_task = 16;
    let engine = Engine::start(config).await.expect("engine");
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let client = client_on(nats.clone());

    // An honest task writes its output through its agent.
    let honest = client
        .launch(LaunchTask {
            timeout_secs: Some(60),
            ..LaunchTask::script("for i in $(seq 1 200); do echo \"honest line $i\"; done")
        })
        .await
        .unwrap()
        .task_id;
    fixtures::until_state(
        &client,
        honest,
        TaskState::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    let before = stored_output(&js, honest).await;
    let text: Vec<u8> = before.iter().flat_map(|(_, p)| p.to_vec()).collect();
    assert!(
        String::from_utf8_lossy(&text).contains("honest line 200"),
        "the honest output is stored"
    );

    // Another task publishes 24 MiB straight onto its own output subject, as code holding its
    // agent's credentials could: three times the whole pool.
    let hostile = TaskId::from_idempotency_key("a task that floods its output");
    let chunk = Bytes::from(vec![b'x'; 60 << 10]);
    let mut acks = Vec::new();
    for i in 0..400 {
        let mut headers = HeaderMap::new();
        headers.insert("Taskpods-Log-Seq", i.to_string().as_str());
        headers.insert("Taskpods-Log-Kind", "stdout");
        acks.push(
            js.publish_with_headers(Names::default().log(hostile), headers, chunk.clone())
                .await
                .unwrap(),
        );
    }
    for ack in acks {
        ack.await
            .expect("each flood message is stored (evicting only its own)");
    }

    // Not one byte of the honest task's output went; the flood holds at most its own share.
    let after = stored_output(&js, honest).await;
    assert_eq!(after, before, "the honest task's stored output changed");
    let flood = stored_output(&js, hostile).await;
    assert_eq!(
        flood.len(),
        16,
        "the flooding task keeps its newest 16 messages"
    );
    let info = js
        .get_stream(Names::default().log_stream())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    eprintln!(
        "output stream after a 24 MiB flood: {} messages, {} bytes; honest task {} messages intact",
        info.state.messages,
        info.state.bytes,
        after.len()
    );
    engine.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn ten_thousand_progress_reports_from_one_task_store_at_most_the_cap() {
    let server = NatsServer::start();
    let mut config = EngineConfig {
        nats_urls: vec![server.url()],
        intake: IntakeConfig {
            // Let every report through the rate limit, so the count cap is what stops them.
            progress_per_second: 1e9,
            progress_burst: u32::MAX,
            ..IntakeConfig::default()
        },
        ..EngineConfig::default()
    };
    config.timers.enabled = false;
    let engine = Engine::start(config).await.expect("engine");
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let client = client_on(nats.clone());

    // A running task (no backend here: the store is told what a backend and agent would say).
    let task = client
        .launch(LaunchTask::script("sleep 600"))
        .await
        .unwrap()
        .task_id;
    let store = EventStore::new(
        js.clone(),
        engine.topology().events.clone(),
        Names::default(),
    );
    for input in [
        Input::JobCreated {
            job: "job-progress-flood".into(),
        },
        Input::AgentHello,
    ] {
        store
            .execute(task, &input, chrono::Utc::now(), None)
            .await
            .unwrap();
    }

    let subject = Names::default().agent_report(task, "progress");
    let started = Instant::now();
    let mut acks = Vec::new();
    for i in 0..10_000u32 {
        let report = AgentReport::Progress {
            message: format!("step {i} {}", "p".repeat(200)),
            percent: None,
        };
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_CONTENT_TYPE, codec::MSGPACK);
        acks.push(
            js.publish_with_headers(
                subject.clone(),
                headers,
                codec::to_msgpack(&report).unwrap().into(),
            )
            .await
            .unwrap(),
        );
        // The client bounds acks in flight: collect them in batches.
        if acks.len() == 500 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let stats = &engine.intake_stats;
    let until = tokio::time::Instant::now() + Duration::from_secs(120);
    while stats.applied.load(Ordering::Relaxed) + stats.progress_over_count.load(Ordering::Relaxed)
        < 10_000 + 1
    {
        assert!(
            tokio::time::Instant::now() < until,
            "intake did not get through the reports: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let history = client.history(task).await.unwrap();
    let progress: Vec<&EventBody> = history
        .iter()
        .map(|e| &e.event.body)
        .filter(|b| matches!(b, EventBody::Progress { .. }))
        .collect();
    eprintln!(
        "10000 progress reports handled in {:?}: {} stored, {} refused over the cap",
        started.elapsed(),
        progress.len(),
        stats.progress_over_count.load(Ordering::Relaxed)
    );
    assert_eq!(progress.len() as u64, MAX_PROGRESS_EVENTS);
    assert!(
        matches!(progress.last(), Some(EventBody::Progress { message, .. }) if message.contains("progress limit reached")),
        "the last stored report says why progress stopped: {:?}",
        progress.last()
    );
    assert_eq!(
        stats.progress_over_count.load(Ordering::Relaxed),
        10_000 - MAX_PROGRESS_EVENTS
    );
    // The task itself is unharmed: it still takes a result.
    assert_eq!(
        client.get(task).await.unwrap().task.state,
        TaskState::Running
    );
    engine.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_hello_flood_for_random_ids_does_not_hold_up_a_real_tasks_start() {
    let server = NatsServer::start();
    let state = common::StateDir::new();
    let engine = Engine::start(common::local_engine(&server, state.path()))
        .await
        .expect("engine");
    let nats = server.connect().await;
    let client = client_on(nats.clone());

    // Flooders: 40,000 hellos for random ids from four connections, as fast as they can publish,
    // each asking for an answer on an inbox nobody reads.
    let names = Names::default();
    let mut flooders = Vec::new();
    for _ in 0..4 {
        let flood = server.connect().await;
        let names = names.clone();
        flooders.push(tokio::spawn(async move {
            let hello = codec::to_msgpack(&AgentReport::Hello {
                agent_version: None,
            })
            .unwrap();
            let inbox = flood.new_inbox();
            for _ in 0..10_000 {
                let _ = flood
                    .publish_with_reply(
                        names.agent_hello(TaskId::mint()),
                        inbox.clone(),
                        hello.clone().into(),
                    )
                    .await;
            }
            flood.flush().await.ok();
        }));
    }

    // Meanwhile a real task starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let launched_at = Instant::now();
    let task = client
        .launch(LaunchTask {
            timeout_secs: Some(120),
            // It stays running a while, so the poll below cannot miss its Running state.
            ..LaunchTask::script("echo started; sleep 3")
        })
        .await
        .unwrap()
        .task_id;
    fixtures::until_state(&client, task, TaskState::Running, Duration::from_secs(30)).await;
    let delay = launched_at.elapsed();
    for flooder in flooders {
        flooder.await.unwrap();
    }
    eprintln!(
        "a real task reached Running {delay:?} after its launch, during a 40,000-hello flood"
    );
    fixtures::until_state(&client, task, TaskState::Succeeded, Duration::from_secs(60)).await;
    engine.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_full_event_log_refuses_new_events_alerts_and_keeps_the_command() {
    let server = NatsServer::start();
    let mut config = EngineConfig {
        nats_urls: vec![server.url()],
        intake: IntakeConfig {
            retry_delay: Duration::from_millis(100),
            max_deliver: 3,
            ..IntakeConfig::default()
        },
        ..EngineConfig::default()
    };
    config.timers.enabled = false;
    config.topology.event_max_bytes = 64 << 10;
    let engine = Engine::start(config).await.expect("engine");
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let client = client_on(nats.clone());

    // Launches of 8 KiB scripts until the event stream refuses one.
    let mut accepted = Vec::new();
    let refused = loop {
        let launch = LaunchTask::script(format!("echo {}", "x".repeat(8 << 10)));
        match client.launch(launch).await {
            Ok(launched) => accepted.push(launched.task_id),
            Err(e) => break e,
        }
        assert!(accepted.len() < 20, "64 KiB of events never filled up");
    };
    let mut events = js
        .get_stream(Names::default().event_stream())
        .await
        .unwrap();
    let state = events.info().await.unwrap().state.clone();
    eprintln!(
        "{} launches fit in 64 KiB of events; the next was refused: {refused}",
        accepted.len()
    );
    // Nothing old was dropped to make room: every accepted task still has its first event.
    assert_eq!(state.first_sequence, 1);
    assert_eq!(state.messages, accepted.len() as u64);
    for task in &accepted {
        assert_eq!(client.history(*task).await.unwrap().len(), 1);
    }
    // The refusal was an alert, retried, and the command is kept with the reason, not lost.
    let stats = &engine.intake_stats;
    assert!(
        stats.event_log_full.load(Ordering::Relaxed) >= 1,
        "{stats:?}"
    );
    assert_eq!(stats.exhausted.load(Ordering::Relaxed), 1, "{stats:?}");
    assert!(refused.to_string().contains("deliveries"), "{refused}");
    let dead = js
        .get_stream(Names::default().dead_letter_stream())
        .await
        .unwrap();
    let kept = dead
        .direct_get_last_for_subject(Names::default().dead_letter("exhausted"))
        .await
        .expect("the refused launch is kept");
    assert!(kept.payload.len() > 8 << 10);
    engine.shutdown().await.expect("shutdown");
}
