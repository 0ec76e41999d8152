//! One trace per task, exported over OTLP/HTTP to a real receiver: an HTTP server in the test that decodes
//! the protobuf export requests with the OpenTelemetry protocol's own generated types, as a collector
//! does. (A collector binary is a Go build of several hundred modules: too heavy for these machines.)
//!
//! Two engines share the NATS server, as two replicas would: one with the local backend, one with none
//! (intake, gateway and timers only), so a task's commands and hellos go to either. Each task's spans must
//! still form one trace: its root `task` and the spans of every loop, all children of that root.
//!
//! Its own test binary: the tracing subscriber and exporter are the process's.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;
use taskpods_client::Client;
use taskpods_engine::config::EngineConfig;
use taskpods_engine::executor::BackendConfig;
use taskpods_engine::server::Engine;
use taskpods_engine::telemetry::{self, TelemetryConfig};
use taskpods_events::{TaskId, TaskState};
use taskpods_harness::NatsServer;
use taskpods_integration::{launch_script, until_reaped, until_state, wait_for};

/// A span as the receiver got it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    name: String,
    start: u64,
    end: u64,
    attributes: BTreeMap<String, String>,
}

type Spans = Arc<Mutex<Vec<Received>>>;

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

/// `POST /v1/traces` with an `application/x-protobuf` body, as OTLP/HTTP specifies.
async fn receive(
    State(spans): State<Spans>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type != "application/x-protobuf" {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new());
    }
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    let mut received = Vec::new();
    for resource_spans in request.resource_spans {
        let resource = attributes(
            &resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default(),
        );
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.push(Received {
                    service: service.clone(),
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                    name: span.name,
                    start: span.start_time_unix_nano,
                    end: span.end_time_unix_nano,
                    attributes: attributes(&span.attributes),
                });
            }
        }
    }
    spans.lock().expect("spans").extend(received);
    (
        StatusCode::OK,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

/// Starts the receiver on a free loopback port.
async fn receiver() -> (SocketAddr, Spans) {
    let spans = Spans::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(receive))
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, spans)
}

/// The spans of `task`'s trace, after the exporter was flushed.
fn trace_of(spans: &[Received], task: TaskId) -> Vec<Received> {
    let trace = telemetry::trace_id(task).to_bytes();
    spans
        .iter()
        .filter(|s| s.trace_id == trace)
        .cloned()
        .collect()
}

/// Asserts `task`'s trace: one root `task` with the task's root span id, no parent and the final state,
/// and every other span a child of it carrying the task id; returns the children's names.
fn assert_one_trace(spans: &[Received], task: TaskId, state: &str) -> BTreeSet<String> {
    let trace = trace_of(spans, task);
    let root_id = telemetry::root_span_id(task).to_bytes().to_vec();
    let roots: Vec<_> = trace.iter().filter(|s| s.name == "task").collect();
    assert_eq!(roots.len(), 1, "{task}: one root span: {trace:#?}");
    let root = roots[0];
    assert_eq!(root.span_id, root_id, "{task}: the root's id is the task's");
    assert!(
        root.parent_span_id.is_empty(),
        "{task}: the root has no parent"
    );
    assert_eq!(
        root.attributes.get("taskpods.state").map(String::as_str),
        Some(state)
    );
    assert!(
        root.end > root.start,
        "{task}: the root spans the task's life"
    );
    let mut names = BTreeSet::new();
    for span in trace.iter().filter(|s| s.name != "task") {
        assert_eq!(
            span.parent_span_id, root_id,
            "{task}: {} is a child of the task's root",
            span.name
        );
        assert_eq!(
            span.attributes.get("taskpods.task_id"),
            Some(&task.to_string()),
            "{task}: {} names its task",
            span.name
        );
        assert!(span.end >= span.start);
        names.insert(span.name.clone());
    }
    names
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_task_is_one_trace_with_a_span_per_step_whichever_replica_took_it() {
    let (addr, spans) = receiver().await;
    let export = TelemetryConfig {
        otlp_endpoint: Some(format!("http://{addr}")),
        service_name: Some("taskpods-under-test".to_owned()),
        sample_ratio: 1.0,
    }
    .resolve(|_| None)
    .expect("resolves")
    .expect("exporting");
    assert_eq!(export.traces_url, format!("http://{addr}/v1/traces"));
    let telemetry = telemetry::install(Some(&export)).expect("installed");
    assert!(telemetry.exporting());

    let server = NatsServer::start();
    let state = common::StateDir::new();
    let runner = Engine::start(common::local_engine(&server, state.path()))
        .await
        .expect("engine with the local backend");
    let second = Engine::start(EngineConfig {
        backend: BackendConfig::None,
        ..common::local_engine(&server, state.path())
    })
    .await
    .expect("second engine, without a backend");
    let client = Client::connect(&server.url()).await.expect("client");

    let succeeds = launch_script(&client, "echo traced", 60).await;
    let cancelled = launch_script(&client, "sleep 60", 60).await;
    let times_out = launch_script(&client, "sleep 60", 2).await;
    until_state(
        &client,
        cancelled,
        TaskState::Running,
        Duration::from_secs(60),
    )
    .await;
    client
        .cancel(cancelled, Some("trace test".to_owned()))
        .await
        .expect("cancel");
    for task in [succeeds, cancelled, times_out] {
        until_reaped(&client, task, Duration::from_secs(90)).await;
    }

    // The exporter batches: flush what has ended (it blocks until the receiver answered).
    let telemetry = tokio::task::spawn_blocking(move || {
        telemetry.flush();
        telemetry
    })
    .await
    .expect("flushed");
    let received = wait_for("every task's root span", Duration::from_secs(30), || {
        let spans = spans.clone();
        async move {
            let spans = spans.lock().expect("spans").clone();
            [succeeds, cancelled, times_out]
                .iter()
                .all(|t| trace_of(&spans, *t).iter().any(|s| s.name == "task"))
                .then_some(spans)
        }
    })
    .await;

    let of = |task: TaskId, name: &str| {
        trace_of(&received, task)
            .into_iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} of {task}"))
    };
    let steps = assert_one_trace(&received, succeeds, "succeeded");
    assert_eq!(
        steps,
        names(&["intake", "create", "hello", "result", "reap"]),
        "the steps of a task that succeeded"
    );
    let steps = assert_one_trace(&received, cancelled, "cancelled");
    assert!(
        steps.is_superset(&names(&[
            "intake", "create", "hello", "cancel", "stop", "reap"
        ])),
        "the steps of a cancelled task: {steps:?}"
    );
    // (The agent of a cancelled task may still report how its code ended: a `result` span too.)
    let steps = assert_one_trace(&received, times_out, "timed_out");
    assert!(
        steps.is_superset(&names(&["intake", "create", "hello", "timeout", "reap"])),
        "the steps of a task that timed out: {steps:?}"
    );

    // What each step says about itself.
    assert_eq!(
        of(succeeds, "intake")
            .attributes
            .get("outcome")
            .map(String::as_str),
        Some("applied")
    );
    assert_eq!(
        of(succeeds, "hello")
            .attributes
            .get("answer")
            .map(String::as_str),
        Some("run")
    );
    assert_eq!(
        of(succeeds, "create")
            .attributes
            .get("outcome")
            .map(String::as_str),
        Some("created")
    );

    // Nothing else is exported: every span belongs to one of the tasks, under the configured name.
    let traces: BTreeSet<_> = [succeeds, cancelled, times_out]
        .iter()
        .map(|t| telemetry::trace_id(*t).to_bytes().to_vec())
        .collect();
    for span in &received {
        assert!(
            traces.contains(&span.trace_id),
            "a span outside the tasks' traces: {span:#?}"
        );
        assert_eq!(span.service, "taskpods-under-test");
    }
    println!(
        "{} spans in 3 traces; the succeeded task's: {:?}",
        received.len(),
        trace_of(&received, succeeds)
            .iter()
            .map(|s| format!("{} {:.1} ms", s.name, (s.end - s.start) as f64 / 1e6))
            .collect::<Vec<_>>()
    );

    second.shutdown().await.expect("second engine stops");
    runner.shutdown().await.expect("engine stops");
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .expect("exporter stopped");
}
