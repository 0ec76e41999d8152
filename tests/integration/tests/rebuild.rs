//! Rebuild against a real nats-server: the fold split by task across partitions gives exactly the
//! serial fold (undecodable messages and unknown kinds included), a rebuild with several partitions
//! equals a fresh fold, and a write into a generation that already holds a key is refused, so nothing
//! is switched to a mixed generation.

use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use taskpods_engine::topology::{self, TopologyConfig};
use taskpods_events::{Names, TaskId};
use taskpods_harness::NatsServer;
use taskpods_projections::buckets::{self, ViewBuckets};
use taskpods_projections::generate::{self, Rng};
use taskpods_projections::rebuild::{self, FoldedStream, RebuildConfig, RebuildError};
use taskpods_projections::{BucketSettings, Views};

fn start_time() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).expect("valid time")
}

/// A server with the topology and `count` random interleaved histories, plus an event of a kind this
/// build does not know and a message that is not an event; returns the last stream sequence.
async fn setup(seed: u64, count: u64) -> (NatsServer, jetstream::Context, u64) {
    let server = NatsServer::start();
    let js = jetstream::new(server.connect().await);
    topology::ensure(&js, &TopologyConfig::default())
        .await
        .expect("topology");
    let names = Names::default();
    let histories = generate::histories(seed, count, start_time(), 10);
    let events = generate::interleave(&mut Rng::new(seed + 1), &histories);
    let (head, tail) = events.split_at(events.len() / 2);
    generate::publish(&js, &names, head, 512)
        .await
        .expect("publish");
    // In the middle of the stream: a kind from a newer engine on a known task, and garbage.
    let known = head[0].1.task;
    let future = generate::future_event(known, 999, start_time(), "snapshotted").expect("encode");
    js.publish(names.events(known), future.into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let other = TaskId::from_idempotency_key("garbage");
    js.publish(names.events(other), "not msgpack".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let last = generate::publish(&js, &names, tail, 512)
        .await
        .expect("publish");
    (server, js, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fold_split_across_partitions_gives_exactly_the_serial_fold() {
    let (_server, js, last) = setup(201, 1500).await;
    let names = Names::default();
    let stream = js.get_stream(names.event_stream()).await.expect("stream");

    let serial = rebuild::fold_partitioned(&stream, &names, last, 1, |_| {})
        .await
        .expect("serial fold");
    assert_eq!(serial.len(), 1);
    let serial = FoldedStream::merge(serial);
    assert!(serial.tasks.len() >= 1500, "{}", serial.tasks.len());
    assert_eq!(serial.unknown, 1, "the newer kind is counted");
    assert_eq!(serial.undecodable.len(), 1, "the garbage is reported");
    assert!(matches!(
        serial.undecodable[0],
        taskpods_projections::log::LogError::Undecodable { .. }
    ));
    assert_eq!(serial.last_seq, last);

    for partitions in [2, 3, 7] {
        let parts = rebuild::fold_partitioned(&stream, &names, last, partitions, |_| {})
            .await
            .expect("partitioned fold");
        assert_eq!(parts.len(), partitions);
        // Every task is in exactly one partition.
        let in_parts: usize = parts.iter().map(|p| p.tasks.len()).sum();
        assert_eq!(in_parts, serial.tasks.len(), "{partitions} partitions");
        assert!(
            parts.iter().all(|p| !p.tasks.is_empty()),
            "the tasks are spread over all {partitions} partitions"
        );
        let merged = FoldedStream::merge(parts);
        assert_eq!(merged.events, serial.events);
        assert_eq!(merged.unknown, serial.unknown);
        assert_eq!(merged.last_seq, serial.last_seq);
        assert_eq!(
            merged
                .undecodable
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            serial
                .undecodable
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        );
        assert_eq!(merged.tasks.len(), serial.tasks.len());
        for (task, folded) in &serial.tasks {
            assert_eq!(
                merged.tasks.get(task),
                Some(folded),
                "task {task}, {partitions} partitions"
            );
        }
    }

    // Folding only up to a sequence in the middle stops there, in every partition.
    let half = last / 2;
    let serial = FoldedStream::merge(
        rebuild::fold_partitioned(&stream, &names, half, 1, |_| {})
            .await
            .expect("fold"),
    );
    let split = FoldedStream::merge(
        rebuild::fold_partitioned(&stream, &names, half, 4, |_| {})
            .await
            .expect("fold"),
    );
    assert_eq!(serial.last_seq, half);
    assert_eq!(split.last_seq, half);
    assert_eq!(split.events, serial.events);
    assert_eq!(split.tasks, serial.tasks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_with_several_partitions_equals_a_fresh_fold_and_reports_progress() {
    let (_server, js, _) = setup(211, 1200).await;
    let names = Names::default();
    let mut phases = Vec::new();
    let summary = rebuild::rebuild(
        &js,
        &RebuildConfig {
            partitions: 3,
            ..RebuildConfig::default()
        },
        |p| phases.push(p),
    )
    .await
    .expect("rebuild");
    assert_eq!((summary.from_generation, summary.generation), (1, 2));
    assert_eq!(summary.unknown, 1);
    assert_eq!(summary.undecodable, 1);
    // Progress: the fold, then the writes, each ending complete.
    let last_of = |phase| phases.iter().rev().find(|p| p.phase == phase).copied();
    let fold = last_of(rebuild::Phase::Fold).expect("fold progress");
    let write = last_of(rebuild::Phase::Write).expect("write progress");
    assert_eq!((fold.done, write.done), (fold.total, write.total));
    assert_eq!(write.total, summary.tasks);

    let report = rebuild::verify(&js, &names, Duration::from_secs(10), |_| {})
        .await
        .expect("verify");
    assert_eq!(report.generation, 2);
    assert_eq!(report.tasks, summary.tasks);
    assert!(
        report.differences.is_empty(),
        "{:#?}",
        &report.differences[..report.differences.len().min(10)]
    );
    // The finished index lists the tasks in the order they ended.
    let views = Views::open(&js, &names, Default::default())
        .await
        .expect("views");
    let mut seqs = Vec::new();
    let mut cursor = None;
    loop {
        let page = views.finished_page(cursor, 200).await.expect("page");
        seqs.extend(page.entries.iter().map(|f| f.seq));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert!(!seqs.is_empty());
    assert!(seqs.windows(2).all(|w| w[0] > w[1]), "newest first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_into_a_generation_that_already_holds_a_key_is_refused() {
    let (_server, js, last) = setup(221, 300).await;
    let names = Names::default();
    let stream = js.get_stream(names.event_stream()).await.expect("stream");
    let parts = rebuild::fold_partitioned(&stream, &names, last, 2, |_| {})
        .await
        .expect("fold");
    let some_task = parts
        .iter()
        .find_map(|p| p.tasks.keys().next().copied())
        .expect("a task");

    // A generation someone else has begun: one of the keys is already there.
    let target = ViewBuckets::open(&js, &names, 9, BucketSettings::default(), true)
        .await
        .expect("buckets");
    target
        .history
        .put(some_task.to_string(), "{\"other\":true}".into())
        .await
        .expect("put");
    let result = rebuild::write_generation(&js, &target, parts, &mut |_| {}).await;
    match result {
        Err(RebuildError::Refused { reason }) => {
            assert!(reason.contains("wrong last sequence"), "{reason}")
        }
        other => panic!("expected a refused write, got {other:?}"),
    }
    // The other writer's value is untouched.
    let kept: Option<serde_json::Value> = buckets::get(&target.history, &some_task.to_string())
        .await
        .expect("read");
    assert_eq!(kept, Some(serde_json::json!({"other": true})));
    // Readers still see generation 1.
    let views = Views::open(&js, &names, Default::default())
        .await
        .expect("views");
    assert_eq!(views.generation(), 1);
}
