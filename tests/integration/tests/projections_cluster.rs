//! Projections on a three-node cluster with R3 streams and buckets: the projector and a rebuild create
//! their buckets with three replicas, and verify finds no difference. (Losing a node is covered for the
//! streams and buckets by `topology.rs`; here it only added leader-election time.)

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::DateTime;
use taskpods_engine::topology::{self, TopologyConfig};
use taskpods_events::Names;
use taskpods_harness::{NatsCluster, eventually};
use taskpods_projections::buckets::{self, BucketSettings};
use taskpods_projections::generate::{self, Rng};
use taskpods_projections::rebuild::{self, RebuildConfig};
use taskpods_projections::{ProjectorConfig, ProjectorStats, projector};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_views_are_projected_and_rebuilt_with_three_replicas() {
    let cluster = NatsCluster::start().await;
    let js = jetstream::new(cluster.connect().await);
    let config = TopologyConfig {
        replicas: 3,
        ..TopologyConfig::default()
    };
    eventually("topology", || topology::ensure(&js, &config)).await;
    let names = Names::default();
    let start = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
    let histories = generate::histories(91, 200, start, 10);
    let events = generate::interleave(&mut Rng::new(92), &histories);
    let last = eventually("publish", || generate::publish(&js, &names, &events, 256)).await;

    let projector_config = ProjectorConfig {
        buckets: BucketSettings {
            replicas: 3,
            ..BucketSettings::default()
        },
        stop_when_caught_up: true,
        ..ProjectorConfig::default()
    };
    let stats = Arc::new(ProjectorStats::default());
    tokio::time::timeout(
        Duration::from_secs(60),
        projector::run(
            js.clone(),
            projector_config.clone(),
            stats,
            CancellationToken::new(),
        ),
    )
    .await
    .expect("caught up")
    .expect("projector");

    let rebuild_config = RebuildConfig {
        projector: projector_config.clone(),
        ..RebuildConfig::default()
    };
    let summary = eventually("rebuild", || rebuild::rebuild(&js, &rebuild_config, |_| {})).await;
    assert_eq!(summary.generation, 2);
    for bucket in buckets::generation_buckets(&names, 2)
        .into_iter()
        .chain([buckets::meta_bucket(&names)])
    {
        let mut stream = js
            .get_stream(format!("KV_{bucket}"))
            .await
            .expect("bucket stream");
        let info = stream.info().await.expect("info");
        assert_eq!(info.config.num_replicas, 3, "{bucket}");
    }

    let report = rebuild::verify(&js, &names, Duration::from_secs(10), |_| {})
        .await
        .expect("verify");
    assert_eq!(report.generation, 2);
    assert_eq!(report.events, events.len() as u64);
    assert!(report.differences.is_empty(), "{:#?}", report.differences);
    let lag = projector::lag(&js, &names).await.expect("lag");
    assert_eq!(lag.applied_seq, last);
}
