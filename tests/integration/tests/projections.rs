//! Projections against a real nats-server: random histories, live views == rebuilt views; re-delivery,
//! out-of-order delivery and two projectors at once; a projector killed mid-stream; the finished index;
//! read-your-writes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use taskpods_engine::topology::{self, TopologyConfig};
use taskpods_events::{Event, Names, TaskId};
use taskpods_harness::{NatsServer, nats_server_version};
use taskpods_projections::apply::Writer;
use taskpods_projections::buckets::{self, ViewBuckets};
use taskpods_projections::generate::{self, Rng};
use taskpods_projections::log::StoredEvent;
use taskpods_projections::rebuild::{self, RebuildConfig};
use taskpods_projections::{ProjectorConfig, ProjectorStats, TaskView, Views, projector};
use tokio_util::sync::CancellationToken;

fn start_time() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).expect("valid time")
}

async fn setup() -> (NatsServer, jetstream::Context) {
    let server = NatsServer::start();
    let js = jetstream::new(server.connect().await);
    topology::ensure(&js, &TopologyConfig::default())
        .await
        .expect("topology");
    (server, js)
}

/// Publishes `count` random histories, interleaved; returns them and the last stream sequence.
async fn publish_random(
    js: &jetstream::Context,
    seed: u64,
    count: u64,
) -> (Vec<(u64, Event)>, u64) {
    let histories = generate::histories(seed, count, start_time(), 10);
    let events = generate::interleave(&mut Rng::new(seed + 1), &histories);
    let last = generate::publish(js, &Names::default(), &events, 1024)
        .await
        .expect("publish");
    (events, last)
}

fn config() -> ProjectorConfig {
    ProjectorConfig {
        stop_when_caught_up: true,
        ..ProjectorConfig::default()
    }
}

async fn project_until_caught_up(
    js: &jetstream::Context,
    config: ProjectorConfig,
) -> Arc<ProjectorStats> {
    let stats = Arc::new(ProjectorStats::default());
    tokio::time::timeout(
        Duration::from_secs(60),
        projector::run(js.clone(), config, stats.clone(), CancellationToken::new()),
    )
    .await
    .expect("the projector catches up within a minute")
    .expect("projector");
    stats
}

async fn all_views(b: &ViewBuckets) -> HashMap<String, (Option<TaskView>, serde_json::Value)> {
    let keys = buckets::all_keys(&b.tasks).await.expect("keys");
    futures::stream::iter(keys.into_iter().map(|key| async move {
        let view: Option<TaskView> = buckets::get(&b.tasks, &key).await.expect("view");
        let history: Option<serde_json::Value> =
            buckets::get(&b.history, &key).await.expect("history");
        let active: Option<serde_json::Value> =
            buckets::get(&b.active, &key).await.expect("active");
        let finished: Option<serde_json::Value> =
            buckets::get(&b.finished, &key).await.expect("finished");
        let rest = serde_json::json!({"history": history, "active": active, "finished": finished});
        (key, (view, rest))
    }))
    .buffer_unordered(64)
    .collect()
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_histories_live_views_equal_rebuilt_views_field_by_field() {
    let (_server, js) = setup().await;
    let names = Names::default();
    let (events, last) = publish_random(&js, 11, 2000).await;
    let tasks: std::collections::HashSet<TaskId> = events.iter().map(|(_, e)| e.task).collect();

    let stats = project_until_caught_up(&js, config()).await;
    assert_eq!(
        stats.applied.load(Ordering::Relaxed),
        events.len() as u64,
        "every event applied once"
    );
    let lag = projector::wait_for_sequence(&js, &names, last, Duration::from_secs(10))
        .await
        .expect("lag")
        .expect("the views reach the last event");
    assert_eq!(lag.events_behind, 0);

    // The live views are what a fresh fold gives, field by field.
    let report = rebuild::verify(&js, &names, Duration::from_secs(10), |_| {})
        .await
        .expect("verify");
    assert_eq!(report.tasks, tasks.len() as u64);
    assert!(
        report.differences.is_empty(),
        "server {}: {:#?}",
        nats_server_version(),
        &report.differences[..report.differences.len().min(10)]
    );

    let live = Views::open(&js, &names, Default::default())
        .await
        .expect("views");
    assert_eq!(live.generation(), 1);
    let live_views = all_views(live.buckets()).await;

    // Rebuild into generation 2: readers switch, and every view is identical.
    let summary = rebuild::rebuild(&js, &RebuildConfig::default(), |_| {})
        .await
        .expect("rebuild");
    assert_eq!((summary.from_generation, summary.generation), (1, 2));
    assert_eq!(summary.events, events.len() as u64);
    assert_eq!(summary.tasks, tasks.len() as u64);
    let rebuilt = Views::open(&js, &names, Default::default())
        .await
        .expect("views");
    assert_eq!(rebuilt.generation(), 2);
    let rebuilt_views = all_views(rebuilt.buckets()).await;
    assert_eq!(live_views.len(), tasks.len());
    assert_eq!(live_views.len(), rebuilt_views.len());
    for (key, live) in &live_views {
        let again = rebuilt_views.get(key).expect("task in the rebuilt views");
        assert_eq!(live, again, "task {key}");
    }

    // A projector started now follows generation 2 and applies what comes next.
    let (more, last2) = publish_random(&js, 12, 100).await;
    let stats = project_until_caught_up(&js, config()).await;
    assert_eq!(stats.generation.load(Ordering::Relaxed), 2);
    assert_eq!(stats.applied.load(Ordering::Relaxed), more.len() as u64);
    assert!(last2 > last);
    let report = rebuild::verify(&js, &names, Duration::from_secs(10), |_| {})
        .await
        .expect("verify");
    assert_eq!(report.generation, 2);
    assert!(report.differences.is_empty(), "{:#?}", report.differences);

    // The finished index pages newest first, in the order tasks ended.
    let mut ended: Vec<(u64, TaskId)> = Vec::new();
    for key in buckets::all_keys(&rebuilt.buckets().finished)
        .await
        .expect("keys")
    {
        let f: taskpods_projections::FinishedView = buckets::get(&rebuilt.buckets().finished, &key)
            .await
            .expect("read")
            .expect("present");
        ended.push((f.seq, f.task));
    }
    ended.sort_by(|a, b| b.cmp(a));
    let mut paged = Vec::new();
    let mut cursor = None;
    loop {
        let page = rebuilt.finished_page(cursor, 100).await.expect("page");
        assert!(page.entries.len() <= 100);
        paged.extend(page.entries.iter().map(|f| (f.seq, f.task)));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(paged, ended, "newest first, every finished task once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_out_of_order_and_two_projectors_give_identical_views_and_no_sequence_goes_back()
{
    let (_server, js) = setup().await;
    let names = Names::default();
    let (events, last) = publish_random(&js, 21, 600).await;

    // Watch every task view; no key's sequence may ever go down.
    let tasks_bucket = js
        .get_key_value(names.tasks_bucket())
        .await
        .expect("bucket");
    let mut watch = tasks_bucket.watch_all().await.expect("watch");
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        let mut seen: HashMap<String, u64> = HashMap::new();
        let mut backwards = Vec::new();
        let mut updates = 0u64;
        let mut stopping = false;
        loop {
            // Until told to stop, wait as long as it takes; then drain what is still in flight.
            let idle = if stopping {
                Duration::from_millis(300)
            } else {
                Duration::from_secs(120)
            };
            let entry = tokio::select! {
                _ = &mut stopped, if !stopping => {
                    stopping = true;
                    continue;
                }
                entry = tokio::time::timeout(idle, watch.next()) => entry,
            };
            let Ok(Some(Ok(entry))) = entry else { break };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            updates += 1;
            let view: TaskView = serde_json::from_slice(&entry.value).expect("a task view");
            let before = seen.insert(entry.key.clone(), view.seq).unwrap_or(0);
            if view.seq < before {
                backwards.push((entry.key, before, view.seq));
            }
        }
        (updates, backwards)
    });

    // Two projectors share the durable consumer, while a third writer applies every event again, in a
    // random order (across and within tasks), in random batches.
    let view_buckets = ViewBuckets::open(&js, &names, 1, Default::default(), true)
        .await
        .expect("buckets");
    let stream = js.get_stream(names.event_stream()).await.expect("stream");
    let writer = Writer::new(
        js.clone(),
        names.clone(),
        stream.clone(),
        view_buckets.clone(),
        10,
    );
    let stored = read_all(&stream, &names, last).await;
    let mut shuffled = stored.clone();
    let mut rng = Rng::new(5);
    for i in (1..shuffled.len()).rev() {
        shuffled.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let small_batches = ProjectorConfig {
        batch: 37,
        concurrency: 8,
        ..config()
    };
    let (a, b, c) = tokio::join!(
        project_until_caught_up(&js, small_batches.clone()),
        project_until_caught_up(&js, small_batches.clone()),
        async {
            let mut applied = 0;
            for chunk in shuffled.chunks(97) {
                applied += writer
                    .apply_batch(chunk.to_vec(), 16)
                    .await
                    .expect("apply")
                    .applied;
            }
            applied
        }
    );
    let applied_by_projectors =
        a.applied.load(Ordering::Relaxed) + b.applied.load(Ordering::Relaxed);
    assert_eq!(
        applied_by_projectors + c,
        events.len() as u64,
        "each event folded exactly once among all writers"
    );
    // And everything delivered once more is a no-op.
    let again = writer.apply_batch(stored, 32).await.expect("apply");
    assert_eq!(again.applied, 0);

    let report = rebuild::verify(&js, &names, Duration::from_secs(10), |_| {})
        .await
        .expect("verify");
    assert!(
        report.differences.is_empty(),
        "server {}: {:#?}",
        nats_server_version(),
        &report.differences[..report.differences.len().min(10)]
    );
    let _ = stop.send(());
    let (updates, backwards) = watcher.await.expect("watcher");
    assert!(updates > 0);
    assert!(
        backwards.is_empty(),
        "sequences went backwards: {backwards:?}"
    );
}

async fn read_all(
    stream: &jetstream::stream::Stream,
    names: &Names,
    last: u64,
) -> Vec<StoredEvent> {
    let folded = rebuild::fold_stream(stream, names, last, |_| {})
        .await
        .expect("fold");
    let mut out = Vec::new();
    for task in folded.tasks.keys() {
        for e in taskpods_projections::log::read_task(stream, names, *task, 1, last)
            .await
            .expect("read")
        {
            out.push(e.expect("decodable"));
        }
    }
    out.sort_by_key(|e| e.sequence);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_mid_stream_resumes_where_it_stopped() {
    let (_server, js) = setup().await;
    let names = Names::default();
    let (events, last) = publish_random(&js, 31, 1500).await;
    let total = events.len() as u64;

    let first = Arc::new(ProjectorStats::default());
    let handle = tokio::spawn(projector::run(
        js.clone(),
        ProjectorConfig {
            batch: 64,
            concurrency: 8,
            // What the killed projector had in flight comes back after this long.
            ack_wait: Duration::from_secs(2),
            ..ProjectorConfig::default()
        },
        first.clone(),
        CancellationToken::new(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while first.seen() < total / 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the projector made no progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Killed: its future is dropped wherever it is, mid-batch or mid-ack.
    handle.abort();
    let _ = handle.await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopped = projector::lag(&js, &names).await.expect("lag");
    assert!(
        stopped.applied_seq > 0 && stopped.applied_seq < last,
        "{stopped:?}"
    );

    // A new projector (a restarted engine) takes over after the ack wait for what was in flight.
    let second = project_until_caught_up(&js, config()).await;
    // It started after the ack floor, not from the beginning: it saw what was above the floor (plus, at
    // most, a batch re-delivered after the short ack wait), and skipped what was applied but not acked.
    let batch = ProjectorConfig::default().batch as u64;
    let seen = second.seen();
    let above_floor = last - stopped.applied_seq;
    assert!(
        seen <= above_floor + batch,
        "saw {seen}, {above_floor} above the floor"
    );
    assert!(seen < total, "started over: saw {seen} of {total}");
    assert_eq!(
        second.applied.load(Ordering::Relaxed) + second.skipped.load(Ordering::Relaxed),
        seen
    );
    let report = rebuild::verify(&js, &names, Duration::from_secs(10), |_| {})
        .await
        .expect("verify");
    assert!(report.differences.is_empty(), "{:#?}", report.differences);
    let lag = projector::lag(&js, &names).await.expect("lag");
    assert_eq!(lag.applied_seq, last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_waits_for_the_views_and_times_out_without_a_projector() {
    let (_server, js) = setup().await;
    let names = Names::default();
    let (events, last) = publish_random(&js, 41, 20).await;
    let task = events.last().expect("events").1.task;

    // No projector yet: the wait times out, and the lag says how far behind the views are.
    let waited = projector::wait_for_sequence(&js, &names, last, Duration::from_millis(200))
        .await
        .expect("wait");
    assert!(waited.is_none());
    let lag = projector::lag(&js, &names).await.expect("lag");
    assert_eq!((lag.applied_seq, lag.events_behind), (0, last));
    assert!(lag.seconds_behind >= 0.0);

    let views = Views::open(&js, &names, Default::default())
        .await
        .expect("views");
    let (view, _) = tokio::join!(
        views.wait_for_task(task, last, Duration::from_secs(20)),
        project_until_caught_up(&js, config())
    );
    let view = view.expect("wait").expect("the view reaches the sequence");
    assert_eq!(view.seq, last);
    let lag = projector::wait_for_sequence(&js, &names, last, Duration::from_secs(5))
        .await
        .expect("wait")
        .expect("reached");
    assert_eq!((lag.applied_seq, lag.events_behind), (last, 0));
    assert!(
        views
            .active()
            .await
            .expect("active")
            .iter()
            .all(|a| a.seq <= last)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_prints_every_difference_and_fails() {
    use taskpods_engine::cli::Global;
    use taskpods_engine::cli::projections::{ProjectionsArgs, ProjectionsCommand, run_to};

    let (server, js) = setup().await;
    let names = Names::default();
    let (events, _) = publish_random(&js, 61, 30).await;
    project_until_caught_up(&js, config()).await;
    let views = Views::open(&js, &names, Default::default())
        .await
        .expect("views");
    let b = views.buckets();
    let task = events[0].1.task;
    let key = task.to_string();

    // Tamper: a wrong field in a task view, a stray view without events.
    let mut view: TaskView = buckets::get(&b.tasks, &key)
        .await
        .expect("read")
        .expect("view");
    view.job = Some("not-the-job".into());
    b.tasks
        .put(&key, serde_json::to_vec(&view).expect("json").into())
        .await
        .expect("tamper");
    let stray = TaskId::from_idempotency_key("stray").to_string();
    b.tasks.put(&stray, "{}".into()).await.expect("stray");

    let global = Global {
        nats_urls: vec![server.url()],
        creds: None,
        names: names.clone(),
    };
    let args = ProjectionsArgs {
        command: ProjectionsCommand::Verify {
            settle_secs: 5,
            json: false,
        },
    };
    let mut out = Vec::new();
    let code = run_to(&global, &args, &mut out).await.expect("verify runs");
    let text = String::from_utf8(out).expect("utf-8");
    assert_eq!(code, std::process::ExitCode::from(1), "{text}");
    assert!(
        text.contains(&format!("task {key} tasks.job: live \"not-the-job\"")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "task {stray} tasks: live present fresh absent (no events)"
        )),
        "{text}"
    );
    assert!(text.contains("2 difference(s)"), "{text}");

    // A rebuild repairs it.
    rebuild::rebuild(&js, &RebuildConfig::default(), |_| {})
        .await
        .expect("rebuild");
    let mut out = Vec::new();
    let code = run_to(&global, &args, &mut out).await.expect("verify runs");
    let text = String::from_utf8(out).expect("utf-8");
    assert_eq!(code, std::process::ExitCode::SUCCESS, "{text}");
    assert!(text.contains("verified generation 2"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_half_built_generation_while_a_rebuild_runs_under_appends() {
    let (_server, js) = setup().await;
    let names = Names::default();
    let (events, _) = publish_random(&js, 71, 800).await;
    project_until_caught_up(&js, config()).await;
    let mut sample: Vec<TaskId> = events.iter().map(|(_, e)| e.task).collect();
    sample.sort();
    sample.dedup();
    sample.truncate(40);

    // A live projector, as in a running engine, and appends while the rebuild runs.
    let stop = CancellationToken::new();
    let live = tokio::spawn(projector::run(
        js.clone(),
        ProjectorConfig::default(),
        Arc::new(ProjectorStats::default()),
        stop.clone(),
    ));
    let appender = {
        let js = js.clone();
        tokio::spawn(async move {
            let mut last = 0;
            for seed in 0..5 {
                last = publish_random(&js, 80 + seed, 40).await.1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            last
        })
    };
    // A reader following the pointer: every sampled task is always there, in whichever generation.
    let (done, mut finished) = tokio::sync::watch::channel(false);
    let reader = {
        let js = js.clone();
        let names = names.clone();
        let sample = sample.clone();
        tokio::spawn(async move {
            let mut generations = Vec::new();
            let mut missing = Vec::new();
            loop {
                // Read the flag first, so the last round opens the views after the rebuild ended.
                let last_round = *finished.borrow_and_update();
                let views = Views::open(&js, &names, Default::default())
                    .await
                    .expect("views");
                for task in &sample {
                    if views.task(*task).await.expect("read").is_none() {
                        missing.push((views.generation(), *task));
                    }
                }
                generations.push(views.generation());
                if last_round {
                    return (generations, missing);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let summary = rebuild::rebuild(&js, &RebuildConfig::default(), |_| {})
        .await
        .expect("rebuild");
    let last = appender.await.expect("appender");
    let _ = done.send(true);
    let (generations, missing) = reader.await.expect("reader");
    assert!(missing.is_empty(), "a reader saw a half view: {missing:?}");
    assert_eq!(generations.first(), Some(&1));
    assert_eq!(generations.last(), Some(&summary.generation));
    assert!(generations.windows(2).all(|w| w[0] <= w[1]));

    // The live projector followed the switch and applied what came after.
    projector::wait_for_sequence(&js, &names, last, Duration::from_secs(30))
        .await
        .expect("wait")
        .expect("the views reach the last append");
    let report = rebuild::verify(&js, &names, Duration::from_secs(10), |_| {})
        .await
        .expect("verify");
    assert_eq!(report.generation, 2);
    assert!(report.differences.is_empty(), "{:#?}", report.differences);
    stop.cancel();
    live.await.expect("join").expect("projector");
}

/// A history of at least `len` events (of a task nobody else uses), with its positions.
fn long_history(seed: u64, len: usize) -> Vec<(u64, Event)> {
    generate::histories(seed, 200, start_time(), 10)
        .into_iter()
        .find(|h| h.len() >= len)
        .expect("a history long enough among 200")
        .into_iter()
        .enumerate()
        .map(|(i, e)| (i as u64, e))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_gap_in_a_task_s_events_is_folded_past_after_a_bounded_number_of_re_reads() {
    let (_server, js) = setup().await;
    let names = Names::default();
    // Position 2 is never written: a real gap, which no re-read can fill.
    let history = long_history(41, 5);
    let task = history[0].1.task;
    let mut written = history.clone();
    written.remove(2);
    let last = generate::publish(&js, &names, &written, 16)
        .await
        .expect("publish");

    let stats = project_until_caught_up(&js, config()).await;
    assert_eq!(stats.gaps.load(Ordering::Relaxed), 1, "one event missing");
    // The gap is read again a bounded number of times, once: the events after it do not read it
    // again.
    assert_eq!(
        stats.heal_retries.load(Ordering::Relaxed),
        u64::from(taskpods_projections::apply::HEAL_RETRIES)
    );
    assert_eq!(
        stats.applied.load(Ordering::Relaxed),
        written.len() as u64,
        "every written event is in the views"
    );
    let live = Views::open(&js, &names, Default::default())
        .await
        .expect("views");
    let view = live.task(task).await.expect("read").expect("a view");
    assert_eq!(view.seq, last);
    // The views are what a fresh fold of the stream gives (it goes past the gap too).
    let report = rebuild::verify(&js, &names, Duration::from_secs(10), |_| {})
        .await
        .expect("verify");
    assert!(report.differences.is_empty(), "{:#?}", report.differences);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heal_read_that_comes_back_short_is_read_again_and_no_history_entry_is_lost() {
    let (_server, js) = setup().await;
    let names = Names::default();
    let history = long_history(43, 4);
    let task = history[0].1.task;
    generate::publish(&js, &names, &history, 16)
        .await
        .expect("publish");
    let stream = js.get_stream(names.event_stream()).await.expect("stream");
    let stored: Vec<StoredEvent> = taskpods_projections::log::read_events(&stream, &names, task)
        .await
        .expect("read");
    let view_buckets = ViewBuckets::open(&js, &names, 1, Default::default(), true)
        .await
        .expect("buckets");
    let writer = Writer::new(js.clone(), names.clone(), stream, view_buckets.clone(), 10);

    // The first event arrives; the fourth arrives before the second and third (delivered elsewhere,
    // or late), and the read of the missing two is answered twice by a replica that lacks them.
    writer
        .apply_batch(vec![stored[0].clone()], 4)
        .await
        .expect("apply");
    writer.lag_next_heal_reads(2);
    let applied = writer
        .apply_batch(vec![stored[3].clone()], 4)
        .await
        .expect("apply");
    assert_eq!(
        applied.heal_retries, 2,
        "read again until it came back whole"
    );
    assert_eq!(applied.healed, 2, "the two missing events were folded in");
    assert_eq!(applied.gaps, 0, "nothing folded past");

    // The views hold the four events, as a fresh fold of them does: no history entry lost.
    let mut fresh = taskpods_projections::Folded::new(task);
    for e in &stored[..4] {
        fresh.apply(e);
    }
    let view: TaskView = buckets::get(&view_buckets.tasks, &task.to_string())
        .await
        .expect("read")
        .expect("a view");
    assert_eq!(view, fresh.view);
    let history: taskpods_projections::HistoryView =
        buckets::get(&view_buckets.history, &task.to_string())
            .await
            .expect("read")
            .expect("a history");
    assert_eq!(history, fresh.history);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_keeps_projecting_after_its_nats_server_is_killed_and_restarted() {
    let mut server = NatsServer::start();
    let js = jetstream::new(server.connect().await);
    topology::ensure(&js, &TopologyConfig::default())
        .await
        .expect("topology");
    let names = Names::default();
    let stats = Arc::new(ProjectorStats::default());
    let stop = CancellationToken::new();
    let running = tokio::spawn(projector::run(
        js.clone(),
        ProjectorConfig::default(),
        stats.clone(),
        stop.clone(),
    ));
    let (_, last) = publish_random(&js, 51, 50).await;
    projector::wait_for_sequence(&js, &names, last, Duration::from_secs(60))
        .await
        .expect("lag")
        .expect("the views reach the last event before the kill");

    // The server dies with the projector's pull requests outstanding, and comes back with its store.
    server.kill();
    server.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while js.get_stream(names.event_stream()).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "JetStream back within a minute"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (more, last2) = publish_random(&js, 52, 50).await;
    assert!(last2 > last);
    let lag = projector::wait_for_sequence(&js, &names, last2, Duration::from_secs(120))
        .await
        .expect("lag")
        .expect("the projector projects what was appended after the restart");
    assert_eq!(lag.events_behind, 0);
    assert!(stats.applied.load(Ordering::Relaxed) >= more.len() as u64);
    let report = rebuild::verify(&js, &names, Duration::from_secs(10), |_| {})
        .await
        .expect("verify");
    assert!(report.differences.is_empty(), "{:#?}", report.differences);
    stop.cancel();
    running.await.expect("projector task").expect("projector");
}
