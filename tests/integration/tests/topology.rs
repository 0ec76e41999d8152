//! The topology against real servers: a standalone server and a three-node cluster with R3 streams.

use std::time::Duration;

use async_nats::jetstream::{self, stream::RetentionPolicy};
use futures::future::join_all;
use taskpods_engine::server::{self, ServerError};
use taskpods_engine::topology::{self, TopologyConfig, TopologyError};
use taskpods_events::Names;
use taskpods_harness::{NatsCluster, NatsServer, eventually, nats_server_version};

#[tokio::test]
async fn ensure_creates_everything_once_and_is_idempotent_under_races() {
    let server = NatsServer::start();
    let js = jetstream::new(server.connect().await);
    let config = TopologyConfig::default();

    // Four engines starting at once all succeed and agree.
    let results = join_all((0..4).map(|_| topology::ensure(&js, &config))).await;
    for result in &results {
        assert!(result.is_ok(), "concurrent ensure failed: {result:?}");
    }
    let again = topology::ensure(&js, &config).await.expect("second ensure");

    let names = Names::default();
    let mut streams: Vec<String> = js.stream_names().try_collect_all().await;
    streams.sort();
    assert_eq!(
        streams,
        [
            "KV_taskpods_active",
            "KV_taskpods_finished",
            "KV_taskpods_history",
            "KV_taskpods_tasks",
            "OBJ_taskpods_files",
            "TASKPODS_CMD",
            "TASKPODS_DEAD",
            "TASKPODS_EVT",
            "TASKPODS_LOG",
        ],
        "server {}",
        nats_server_version()
    );
    let mut commands = again.commands.clone();
    let info = commands.info().await.expect("info");
    assert_eq!(info.config.retention, RetentionPolicy::WorkQueue);
    assert_eq!(info.config.subjects, [names.commands_all()]);
    assert_eq!(info.config.duplicate_window, Duration::from_secs(120));

    // The event stream takes a task's event and dedups a retried one by Nats-Msg-Id.
    let task = taskpods_events::TaskId::from_idempotency_key("topology-test");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "same-id");
    let first = js
        .publish_with_headers(names.events(task), headers.clone(), "one".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let retry = js
        .publish_with_headers(names.events(task), headers, "one".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    assert!(!first.duplicate);
    assert!(retry.duplicate);
    assert_eq!(first.sequence, retry.sequence);

    // The buckets work as KV stores, on 2.9 as on current servers.
    let rev = again.tasks.put("k", "v1".into()).await.expect("kv put");
    let rev2 = again
        .tasks
        .update("k", "v2".into(), rev)
        .await
        .expect("kv update with revision");
    assert!(
        again.tasks.update("k", "v3".into(), rev).await.is_err(),
        "stale revision must fail"
    );
    let entry = again
        .tasks
        .entry("k")
        .await
        .expect("kv entry")
        .expect("present");
    assert_eq!(entry.revision, rev2);
    assert_eq!(&entry.value[..], b"v2");
}

trait CollectAll {
    async fn try_collect_all(self) -> Vec<String>;
}

impl<S> CollectAll for S
where
    S: futures::Stream<Item = Result<String, async_nats::jetstream::context::StreamsError>> + Unpin,
{
    async fn try_collect_all(self) -> Vec<String> {
        use futures::TryStreamExt;
        self.try_collect().await.expect("list streams")
    }
}

#[tokio::test]
async fn a_conflicting_stream_is_reported_field_by_field_and_left_alone() {
    let server = NatsServer::start();
    let js = jetstream::new(server.connect().await);
    let names = Names::new("acme").expect("prefix");
    js.create_stream(jetstream::stream::Config {
        name: names.event_stream(),
        subjects: vec![names.events_all()],
        retention: RetentionPolicy::Interest,
        max_age: Duration::from_secs(60),
        ..Default::default()
    })
    .await
    .expect("pre-existing stream");

    let config = TopologyConfig {
        names: names.clone(),
        ..TopologyConfig::default()
    };
    let err = topology::ensure(&js, &config).await.expect_err("conflict");
    match &err {
        TopologyError::Conflict {
            stream,
            differences,
        } => {
            assert_eq!(stream, "ACME_EVT");
            let fields: Vec<&str> = differences.iter().map(|d| d.field).collect();
            assert!(fields.contains(&"retention"), "{fields:?}");
            assert!(fields.contains(&"max_age"), "{fields:?}");
            assert!(!fields.contains(&"subjects"), "{fields:?}");
        }
        other => panic!("expected a conflict, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("stream ACME_EVT exists with a different configuration (not changed)")
            && message.contains("retention is Interest but Limits is configured"),
        "{message}"
    );
    let mut stream = js.get_stream("ACME_EVT").await.expect("still there");
    let info = stream.info().await.expect("info");
    assert_eq!(
        info.config.retention,
        RetentionPolicy::Interest,
        "must not be overwritten"
    );
}

#[tokio::test]
async fn an_unreachable_server_is_a_clear_error_after_the_timeout() {
    let mut server = NatsServer::start();
    let url = server.url();
    server.kill();
    let err = server::connect(std::slice::from_ref(&url), Duration::from_millis(300))
        .await
        .expect_err("nobody listens");
    assert!(matches!(err, ServerError::Connect { .. }), "{err}");
    assert!(err.to_string().contains(&url), "{err}");
    let err = server::connect(&["not a url at all ::".into()], Duration::from_millis(300))
        .await
        .expect_err("bad url");
    assert!(matches!(err, ServerError::BadUrl(_)), "{err}");
}

#[tokio::test]
async fn a_restarted_server_keeps_its_port_and_streams() {
    let mut server = NatsServer::start();
    let url = server.url();
    {
        let js = jetstream::new(server.connect().await);
        topology::ensure(&js, &TopologyConfig::default())
            .await
            .expect("ensure");
        js.publish(
            Names::default().events(taskpods_events::TaskId::mint()),
            "e".into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    }
    server.restart();
    assert_eq!(server.url(), url);
    server.wait_for_jetstream().await;
    let js = jetstream::new(server.connect().await);
    let topology = topology::ensure(&js, &TopologyConfig::default())
        .await
        .expect("ensure after restart");
    let mut events = topology.events.clone();
    assert_eq!(events.info().await.expect("info").state.messages, 1);
}

#[tokio::test]
async fn three_node_cluster_with_r3_streams_survives_losing_a_node() {
    let mut cluster = NatsCluster::start().await;
    let js = jetstream::new(cluster.connect().await);
    let config = TopologyConfig {
        replicas: 3,
        ..TopologyConfig::default()
    };
    let topology = eventually("ensure", || topology::ensure(&js, &config)).await;
    let mut events = topology.events.clone();
    let info = events.info().await.expect("info");
    assert_eq!(info.config.num_replicas, 3);
    let cluster_info = info.cluster.clone().expect("clustered");
    assert_eq!(cluster_info.replicas.len(), 2, "a leader and two replicas");

    // Lose the leader of the event stream: writes still succeed once a new leader is elected.
    let leader = cluster_info.leader.clone().expect("leader");
    let victim = cluster
        .servers
        .iter()
        .position(|s| s.name() == leader)
        .expect("the leader is one of ours");
    cluster.servers[victim].kill();

    // Streams whose leader was on the lost node elect a new one; until then writes are retried, as the
    // engine's own appends are.
    let task = taskpods_events::TaskId::mint();
    let subject = Names::default().events(task);
    let ack = eventually("publish an event", || async {
        js.publish(subject.clone(), "after loss".into())
            .await?
            .await
    })
    .await;
    assert!(ack.sequence >= 1);
    let rev = eventually("kv put", || topology.tasks.put("after-loss", "ok".into())).await;
    assert!(rev >= 1);

    // And ensure still answers (it only reads when everything exists).
    eventually("ensure", || topology::ensure(&js, &config)).await;
}

#[tokio::test]
async fn streams_refuse_purges_and_an_older_stream_is_tightened_in_place() {
    let server = NatsServer::start();
    let js = jetstream::new(server.connect().await);
    let config = TopologyConfig::default();
    let names = config.names.clone();
    // The event stream as an engine from before purges were refused created it, with one event in it.
    let mut older = topology::wanted_streams(&config)
        .into_iter()
        .find(|s| s.name == names.event_stream())
        .expect("event stream");
    older.deny_purge = false;
    js.create_stream(older).await.expect("older stream");
    js.publish(names.events(taskpods_events::TaskId::mint()), "e".into())
        .await
        .expect("publish")
        .await
        .expect("stored");

    let topology = topology::ensure(&js, &config)
        .await
        .expect("tightened, no conflict");
    for stream in [&topology.events, &topology.commands] {
        let mut stream = stream.clone();
        assert!(stream.info().await.expect("info").config.deny_purge);
    }
    let purge = topology.events.purge().await;
    assert!(purge.is_err(), "a purge must be refused");
    let mut events = topology.events.clone();
    assert_eq!(events.info().await.expect("info").state.messages, 1);
}
