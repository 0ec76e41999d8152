//! Launch throughput end to end: a launch command published (durably, with a reply inbox) until the
//! engine has stored the task's first event and answered, at 1, 64 and 1024 launches in flight, printed
//! next to the raw JetStream publish rates measured on the same server in the same run (serial for one in
//! flight, 256 in flight for the others), with the ratio and p50/p99/max latency per launch.
//!
//! Next to the raw limit it prints the launch's **design bound**: the NATS operations one launch is made
//! of, done by a bare loop with no engine logic, on streams configured as the engine's (the topology under
//! another prefix): the command published with its ack; pulled from a durable consumer as the intake pulls;
//! the `accepted` event published expecting the task's subject to be empty, with its ack; the reply
//! published on core NATS to the caller's shared reply subscription; the command acked. What the engine
//! adds over that bound is its own cost (decoding, validation, the state machine, encoding, metrics,
//! scheduling) and its other loops' (projector, gateway, timers) share of the machine.
//!
//! `cargo bench -p taskpods-engine --bench launch` (`NATS_SERVER_BIN` picks the server; `LAUNCHES` scales
//! the run).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use futures::future::join_all;
use taskpods_client::Client;
use taskpods_engine::config::EngineConfig;
use taskpods_engine::intake::IntakeConfig;
use taskpods_engine::pull::DurableMessages;
use taskpods_engine::server::Engine;
use taskpods_engine::topology::{self, TopologyConfig};
use taskpods_events::codec::{
    self, HEADER_CONTENT_TYPE, HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, HEADER_KIND, HEADER_MSG_ID,
    MSGPACK,
};
use taskpods_events::{CommandReply, HEADER_REPLY_TO, LaunchTask, Names, TaskId, TaskState};
use taskpods_harness::NatsServer;
use taskpods_harness::measure::{self, Latencies};
use tokio::sync::{Semaphore, oneshot};

#[tokio::main]
async fn main() {
    let scale: usize = std::env::var("LAUNCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let server = NatsServer::start();
    println!("{}", measure::machine_line());

    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let serial = measure::raw_publish_rate(&js, (scale / 4).max(100), 300, 1).await;
    let raw = measure::raw_publish_rate(&js, scale * 4, 300, 256).await;
    println!(
        "raw JetStream publish+ack, 300 B: serial {serial:>8.0}/s · 256 in flight {raw:>8.0}/s"
    );
    let (bound, mut bound_latencies) = design_bound(&server, BOUND_IN_FLIGHT, scale.max(10)).await;
    println!(
        "design bound (a launch's NATS operations, no engine), {BOUND_IN_FLIGHT} in flight: {bound:>8.0}/s = {:.2}x raw  ({})",
        bound / raw,
        bound_latencies.summary(),
    );

    let engine = Engine::start(EngineConfig {
        nats_urls: vec![server.url()],
        intake: IntakeConfig {
            max_in_flight: 4096,
            ..IntakeConfig::default()
        },
        ..EngineConfig::default()
    })
    .await
    .expect("engine");
    let client = measure::client(nats.clone(), Duration::from_secs(60));
    let mut best = 0.0f64;
    for (in_flight, launches, limit) in [
        (1, scale / 10, serial),
        (64, scale, raw),
        (1024, scale, raw),
    ] {
        let (rate, mut latencies) = launch_rate(&client, in_flight, launches.max(10)).await;
        best = best.max(rate);
        println!(
            "launches accepted end to end, {in_flight:>4} in flight: {rate:>8.0}/s = {:.2}x raw  ({}, {launches} launches)",
            rate / limit,
            latencies.summary(),
        );
    }
    println!(
        "summary: launches accepted {best:.0}/s, raw publish+ack {raw:.0}/s, ratio {:.2} (goal >= 0.5); \
         design bound {bound:.0}/s = {:.2}x raw, launches = {:.2}x the bound · load average {}",
        best / raw,
        bound / raw,
        best / bound,
        measure::load_average()
    );
    engine.shutdown().await.expect("shutdown");
}

async fn launch_rate(client: &Client, in_flight: usize, launches: usize) -> (f64, Latencies) {
    let run = uuid_prefix();
    let permits = Arc::new(Semaphore::new(in_flight));
    let start = Instant::now();
    let samples: Vec<Duration> = join_all((0..launches).map(|i| {
        let (client, permits) = (client.clone(), permits.clone());
        let key = format!("bench-{run}-{in_flight}-{i}");
        async move {
            let _permit = permits.acquire_owned().await.expect("semaphore");
            let began = Instant::now();
            let launched = client
                .launch(LaunchTask {
                    idempotency_key: Some(key),
                    ..LaunchTask::script("echo benchmark")
                })
                .await
                .expect("launch");
            assert!(launched.created);
            began.elapsed()
        }
    }))
    .await;
    let rate = launches as f64 / start.elapsed().as_secs_f64();
    let mut latencies = Latencies::new();
    for d in samples {
        latencies.record(d);
    }
    (rate, latencies)
}

fn uuid_prefix() -> String {
    taskpods_events::TaskId::mint().0.simple().to_string()[..8].to_owned()
}

/// Launches in flight for the design bound (the goal's figure).
const BOUND_IN_FLIGHT: usize = 1024;

/// Commands waiting for their reply in the design bound, by the last token of their reply subject.
type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>;

/// The design bound: `launches` launches made of the NATS operations alone (see the module doc), at
/// `in_flight` at once. Its own connections: one for the caller, one for the bare intake.
async fn design_bound(server: &NatsServer, in_flight: usize, launches: usize) -> (f64, Latencies) {
    let names = Names::new("bound").expect("prefix");
    let intake_nats = server.connect().await;
    let intake_js = jetstream::new(intake_nats.clone());
    // The command and event streams as the engine configures them (the rest of its topology would only
    // take the server's storage reservation from the engine started afterwards); deleted after the run.
    let wanted = topology::wanted_streams(&TopologyConfig {
        names: names.clone(),
        ..TopologyConfig::default()
    });
    let mut streams = Vec::new();
    for name in [names.command_stream(), names.event_stream()] {
        let config = wanted
            .iter()
            .find(|c| c.name == name)
            .expect("the engine wants this stream")
            .clone();
        streams.push(intake_js.create_stream(config).await.expect("bound stream"));
    }
    // The consumer as the intake makes it, pulled the same way.
    let defaults = IntakeConfig::default();
    let mut commands = DurableMessages::open(
        &streams[0],
        pull::Config {
            durable_name: Some("bound-intake".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: defaults.ack_wait,
            max_ack_pending: 4096,
            max_deliver: defaults.max_deliver,
            ..Default::default()
        },
        "bound",
    )
    .await
    .expect("bound consumer");
    let bare_intake = tokio::spawn({
        let names = names.clone();
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<jetstream::Message>(4096);
            let handle = tokio::spawn(async move {
                tokio_stream_of(rx)
                    .for_each_concurrent(4096, |message| {
                        bare_accept(&intake_nats, &intake_js, &names, message)
                    })
                    .await;
            });
            for _ in 0..launches {
                let message = commands.next().await;
                if tx.send(message).await.is_err() {
                    break;
                }
            }
            drop(tx);
            handle.await.expect("bare intake");
        }
    });

    // The caller: a shared reply subscription, each launch waiting for its own reply.
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let prefix = nats.new_inbox();
    let mut replies = nats
        .subscribe(format!("{prefix}.*"))
        .await
        .expect("reply subscription");
    let waiting: Waiting = Arc::default();
    let dispatcher = tokio::spawn({
        let (waiting, prefix) = (waiting.clone(), prefix.clone());
        async move {
            while let Some(reply) = replies.next().await {
                let id = reply.subject.as_str()[prefix.len() + 1..].parse::<u64>();
                let waiter = id
                    .ok()
                    .and_then(|id| waiting.lock().expect("lock").remove(&id));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(());
                }
            }
        }
    });
    let permits = Arc::new(Semaphore::new(in_flight));
    let start = Instant::now();
    let samples: Vec<Duration> = join_all((0..launches).map(|i| {
        let (js, names, permits, waiting) =
            (js.clone(), names.clone(), permits.clone(), waiting.clone());
        let prefix = prefix.as_str();
        async move {
            let _permit = permits.acquire_owned().await.expect("semaphore");
            let began = Instant::now();
            let task = TaskId::mint();
            let payload = codec::to_msgpack(&LaunchTask {
                task_id: Some(task.0),
                ..LaunchTask::script("echo benchmark")
            })
            .expect("encode");
            let (tx, reply) = oneshot::channel();
            waiting.lock().expect("lock").insert(i as u64, tx);
            let mut headers = HeaderMap::new();
            headers.insert(HEADER_MSG_ID, format!("launch:{task}").as_str());
            headers.insert(HEADER_CONTENT_TYPE, MSGPACK);
            headers.insert(HEADER_REPLY_TO, format!("{prefix}.{i}").as_str());
            js.publish_with_headers(names.launch(), headers, payload.into())
                .await
                .expect("publish")
                .await
                .expect("ack");
            reply.await.expect("reply");
            began.elapsed()
        }
    }))
    .await;
    let rate = launches as f64 / start.elapsed().as_secs_f64();
    bare_intake.await.expect("bare intake");
    dispatcher.abort();
    for name in [names.command_stream(), names.event_stream()] {
        js.delete_stream(&name).await.expect("bound stream deleted");
    }
    let mut latencies = Latencies::new();
    for d in samples {
        latencies.record(d);
    }
    (rate, latencies)
}

/// What one launch costs the server in the intake, without the intake: the `accepted` event appended
/// expecting an empty task subject (the command's bytes stand in for the event's), the reply, the ack.
async fn bare_accept(
    nats: &async_nats::Client,
    js: &jetstream::Context,
    names: &Names,
    message: jetstream::Message,
) {
    let headers = message.headers.as_ref().expect("command headers");
    let task: TaskId = headers
        .get(HEADER_MSG_ID)
        .and_then(|id| id.as_str().strip_prefix("launch:")?.parse().ok())
        .expect("task id in the message id");
    let reply_to = headers
        .get(HEADER_REPLY_TO)
        .expect("reply subject")
        .as_str()
        .to_owned();
    let mut event_headers = HeaderMap::new();
    event_headers.insert(HEADER_MSG_ID, format!("{task}:0:accepted").as_str());
    event_headers.insert(HEADER_CONTENT_TYPE, MSGPACK);
    event_headers.insert(HEADER_KIND, "accepted");
    event_headers.insert(HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
    let ack = js
        .publish_with_headers(names.events(task), event_headers, message.payload.clone())
        .await
        .expect("append")
        .await
        .expect("append ack");
    let reply = CommandReply::Applied {
        task_id: task,
        state: TaskState::Accepted,
        sequence: ack.sequence,
        created: true,
    };
    nats.publish(reply_to, codec::to_msgpack(&reply).expect("encode").into())
        .await
        .expect("reply");
    message.ack().await.expect("ack");
}

/// A stream over what `rx` receives.
fn tokio_stream_of<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
