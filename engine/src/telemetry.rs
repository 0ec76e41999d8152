//! Logs and traces: the process's `tracing` subscriber, and one trace per task exported over OTLP/HTTP
//! when an endpoint is configured (off by default).
//!
//! **One trace per task, across loops and replicas, without carrying context.** A task's work is done by
//! different loops (intake, executor, gateway, timers), often on different engine replicas, each picking
//! the task up from NATS. Rather than putting a trace context into every event and command (a wire change
//! every client and the event log would carry forever), the trace is a function of the task id:
//! [`trace_id`] and [`root_span_id`] are derived from it (SHA-256, so they are uniformly distributed, as
//! ratio samplers expect; a UUIDv7's own bits are not). Every span a loop opens for a task
//! ([`task_span!`](crate::task_span)) names that root as its parent, and the replica that ends the task
//! exports the root span `task` itself ([`appended`], called at the store's one append path), from
//! acceptance to reap. The sampling decision is a function of the trace id too, so every replica keeps or
//! drops the same tasks' traces.
//!
//! Spans (target [`TARGET`], level DEBUG so that the log output does not pay for them):
//!
//! | span | opened by | covers |
//! |---|---|---|
//! | `task` (root) | whoever appends `reaped` (or the end of a task that never had a sandbox) | acceptance → reap |
//! | `intake` | intake, a launch | validation, the append, the reply |
//! | `cancel` | intake, a cancel command | the append, the reply |
//! | `create` | executor | the backend's create (Job or sandbox), `job_created` |
//! | `hello` | gateway | the agent's hello, `running`, the answer |
//! | `result` | intake, the agent's result | the append, the reply |
//! | `stop` | executor, a cancelled task | stopping the sandbox, `job_gone` |
//! | `timeout` | timers | `timed_out` at the deadline |
//! | `startup_timeout`, `agent_lost` | timers, gateway | the failure |
//! | `reap` | executor | the grace, removing the sandbox, `reaped` |
//!
//! Configuration: [`TelemetryConfig`] (`[telemetry]` in the file), resolved with the OpenTelemetry
//! environment convention by [`TelemetryConfig::resolve`].

use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use opentelemetry::trace::{
    SamplingDecision, Span as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags,
    TraceId, TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, ShouldSample};
use sha2::{Digest, Sha256};
use taskpods_events::{Event, EventBody, Task, TaskId};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The `tracing` target of the per-task spans; the OTLP layer exports these (and the log lines inside
/// them), nothing else.
pub const TARGET: &str = "taskpods::task";

/// The path OTLP/HTTP receivers take traces at, below the endpoint (the OpenTelemetry convention).
const TRACES_PATH: &str = "/v1/traces";

/// The service name spans are exported under unless configured otherwise.
pub const DEFAULT_SERVICE_NAME: &str = "taskpods-engine";

/// The log filter when `RUST_LOG` is not set.
const DEFAULT_LOG_FILTER: &str = "info,async_nats=warn";

/// Trace export settings (`[telemetry]` in the configuration file).
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP endpoint (a collector's port 4318, e.g. `http://otel-collector:4318`); traces are
    /// sent to `<endpoint>/v1/traces`. `None`: the environment decides (`OTEL_EXPORTER_OTLP_ENDPOINT`),
    /// and without it nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of the exported spans (`None`: `OTEL_SERVICE_NAME`, else `taskpods-engine`).
    pub service_name: Option<String>,
    /// The share of tasks whose trace is kept, 0.0 to 1.0 (decided from the trace id, so every replica
    /// keeps the same tasks).
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: None,
            sample_ratio: 1.0,
        }
    }
}

/// Where and how traces are exported, once the configuration and the environment are combined.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    /// The full URL spans are posted to.
    pub traces_url: String,
    /// The exported `service.name`.
    pub service_name: String,
    /// The share of tasks traced.
    pub sample_ratio: f64,
}

/// Why traces cannot be exported as configured.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The environment asks for an OTLP protocol other than HTTP with protobuf.
    #[error(
        "{variable}={value:?}: only http/protobuf is supported (point it at the collector's OTLP/HTTP port, 4318)"
    )]
    Protocol {
        /// The variable that asked.
        variable: &'static str,
        /// What it asked for.
        value: String,
    },
    /// The endpoint is not an http(s) URL.
    #[error("OTLP endpoint {0:?} is not an http:// or https:// URL")]
    Endpoint(String),
    /// The sample ratio is outside 0.0..=1.0.
    #[error("telemetry.sample_ratio {0} is not between 0.0 and 1.0")]
    SampleRatio(f64),
    /// The exporter could not be built.
    #[error("OTLP exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    /// A `tracing` subscriber was already installed in this process.
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled(#[source] tracing_subscriber::util::TryInitError),
}

impl TelemetryConfig {
    /// Where traces go: the configured endpoint, else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (a full URL),
    /// else `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL); `None` when none is set or `OTEL_SDK_DISABLED` is
    /// `true`. `env` reads a variable (`std::env::var` in the binary).
    pub fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Export>, TelemetryError> {
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(TelemetryError::SampleRatio(self.sample_ratio));
        }
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let traces_url = match (
            &self.otlp_endpoint,
            env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            env("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(base), _, _) if !base.trim().is_empty() => traces_url(base.trim()),
            (_, Some(full), _) => full.trim().to_owned(),
            (_, None, Some(base)) => traces_url(base.trim()),
            _ => return Ok(None),
        };
        if !(traces_url.starts_with("http://") || traces_url.starts_with("https://")) {
            return Err(TelemetryError::Endpoint(traces_url));
        }
        for variable in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(value) = env(variable)
                && value.trim() != "http/protobuf"
            {
                return Err(TelemetryError::Protocol { variable, value });
            }
        }
        Ok(Some(Export {
            traces_url,
            service_name: self
                .service_name
                .clone()
                .or_else(|| env("OTEL_SERVICE_NAME"))
                .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned()),
            sample_ratio: self.sample_ratio,
        }))
    }
}

/// `<base>/v1/traces`, without doubling a slash.
fn traces_url(base: &str) -> String {
    format!("{}{TRACES_PATH}", base.trim_end_matches('/'))
}

/// The tracer the root spans are started with, and the sampler that decides per trace id.
#[derive(Debug)]
struct Exporting {
    tracer: SdkTracer,
    ratio: f64,
}

static EXPORTING: OnceLock<Exporting> = OnceLock::new();

/// The installed logging and tracing; [`Telemetry::shutdown`] flushes the spans not yet exported.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports every span ended so far (blocks until the exporter answered).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(e) = provider.force_flush()
        {
            tracing::warn!(error = %e, "flushing the trace exporter");
        }
    }

    /// Flushes and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "stopping the trace exporter");
        }
    }
}

/// Installs the process's subscriber: log lines to stderr (filtered by `RUST_LOG`, default `info`), and,
/// when `export` is given, the per-task spans to its OTLP/HTTP endpoint.
pub fn install(export: Option<&Export>) -> Result<Telemetry, TelemetryError> {
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)),
        );
    let Some(export) = export else {
        tracing_subscriber::registry()
            .with(logs)
            .try_init()
            .map_err(TelemetryError::AlreadyInstalled)?;
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(export.traces_url.clone())
        .build()
        .map_err(TelemetryError::Exporter)?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(export.service_name.clone())
        .with_attribute(KeyValue::new(
            "service.instance.id",
            instance_id().unwrap_or_else(|| "unknown".to_owned()),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            export.sample_ratio,
        ))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("taskpods");
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer.clone())
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            // The task spans, and the log lines (INFO and up) of the engine inside them, which become
            // span events. Other libraries' spans (HTTP clients, the server) would start traces of their
            // own, unrelated to any task.
            if meta.is_span() {
                meta.target() == TARGET
            } else {
                meta.target().starts_with("taskpods") && *meta.level() <= tracing::Level::INFO
            }
        }));
    tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .map_err(TelemetryError::AlreadyInstalled)?;
    // The first install wins, as for the subscriber itself (which `try_init` just ensured is this one).
    let _ = EXPORTING.set(Exporting {
        tracer,
        ratio: export.sample_ratio,
    });
    tracing::info!(url = %export.traces_url, service = %export.service_name, "exporting task traces over OTLP/HTTP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// This replica's name: the pod's (`HOSTNAME` in Kubernetes), else the machine's.
fn instance_id() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
}

/// The 32 bytes a task's trace and root span ids are cut from.
fn task_digest(task: TaskId) -> [u8; 32] {
    let mut digest = Sha256::new();
    digest.update(b"taskpods trace\0");
    digest.update(task.0.as_bytes());
    digest.finalize().into()
}

/// The trace id of `task`'s trace: the same on every replica, for every loop.
pub fn trace_id(task: TaskId) -> TraceId {
    let digest = task_digest(task);
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    // An all-zero id is invalid; a digest that starts with 16 zero bytes will not be met in practice,
    // but the id must be valid regardless.
    if id == [0; 16] {
        id[15] = 1;
    }
    TraceId::from_bytes(id)
}

/// The span id of `task`'s root span `task`, which every other span of the task names as its parent.
pub fn root_span_id(task: TaskId) -> SpanId {
    let digest = task_digest(task);
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[16..24]);
    if id == [0; 8] {
        id[7] = 1;
    }
    SpanId::from_bytes(id)
}

/// The context of `task`'s root span, as a remote parent: sampled as the ratio decides for its trace id.
fn task_context(task: TaskId, exporting: &Exporting) -> Context {
    let trace_id = trace_id(task);
    let decision = Sampler::TraceIdRatioBased(exporting.ratio)
        .should_sample(None, trace_id, "task", &SpanKind::Internal, &[], &[])
        .decision;
    let flags = if decision == SamplingDecision::RecordAndSample {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    Context::new().with_remote_span_context(SpanContext::new(
        trace_id,
        root_span_id(task),
        flags,
        true,
        TraceState::default(),
    ))
}

/// Makes `span` a child of `task`'s root span (call before the span is first entered). Nothing happens
/// when traces are not exported.
pub fn join(span: &tracing::Span, task: TaskId) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if let Some(exporting) = EXPORTING.get() {
        // An error means the span is disabled (not exported): nothing to join.
        let _ = span.set_parent(task_context(task, exporting));
    }
}

/// Opens a span of a task's trace: `task_span!("create", task_id)`, with more fields after the task
/// (`outcome = tracing::field::Empty`, to be recorded later). Instrument the work with it.
#[macro_export]
macro_rules! task_span {
    ($name:literal, $task:expr $(, $($field:tt)+)?) => {{
        let task: ::taskpods_events::TaskId = $task;
        let span = ::tracing::debug_span!(
            target: "taskpods::task",
            $name,
            "taskpods.task_id" = %task
            $(, $($field)+)?
        );
        $crate::telemetry::join(&span, task);
        span
    }};
}

/// After an append (the store's one path): when `appended` ends the task's life (its `reaped`, or its
/// end when it never had a sandbox to reap), exports the root span `task`, from acceptance to now.
pub fn appended(before: &Task, appended: &[Event]) {
    let Some(exporting) = EXPORTING.get() else {
        return;
    };
    let mut task = before.clone();
    for event in appended {
        let was_terminal = task.state.is_terminal();
        task = taskpods_events::evolve(task, event);
        let life_over = match &event.body {
            EventBody::Reaped => true,
            body if body.is_terminal() => !was_terminal && task.job.is_none(),
            _ => false,
        };
        if life_over {
            export_root(exporting, event.task, &task, event.at);
        }
    }
}

fn export_root(exporting: &Exporting, task_id: TaskId, task: &Task, ended: DateTime<Utc>) {
    let trace_id = trace_id(task_id);
    let started = task.accepted_at.unwrap_or(ended);
    let mut attributes = vec![
        KeyValue::new("taskpods.task_id", task_id.to_string()),
        KeyValue::new("taskpods.state", task.state.name()),
    ];
    if let Some(job) = &task.job {
        attributes.push(KeyValue::new("taskpods.job", job.clone()));
    }
    if let Some(spec) = &task.spec {
        attributes.push(KeyValue::new("taskpods.image", spec.image.clone()));
    }
    let mut span = exporting
        .tracer
        .span_builder("task")
        .with_kind(SpanKind::Internal)
        .with_trace_id(trace_id)
        .with_span_id(root_span_id(task_id))
        .with_start_time(std::time::SystemTime::from(started))
        .with_attributes(attributes)
        .start_with_context(&exporting.tracer, &Context::new());
    span.end_with_timestamp(std::time::SystemTime::from(ended));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn export_is_off_unless_an_endpoint_is_configured_or_in_the_environment() {
        let config = TelemetryConfig::default();
        assert_eq!(config.resolve(env(&[])).expect("resolves"), None);

        let from_env = config
            .resolve(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                ("OTEL_SERVICE_NAME", "engine-a"),
            ]))
            .expect("resolves")
            .expect("exporting");
        assert_eq!(from_env.traces_url, "http://collector:4318/v1/traces");
        assert_eq!(from_env.service_name, "engine-a");

        let signal = config
            .resolve(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://traces:4318/custom",
                ),
            ]))
            .expect("resolves")
            .expect("exporting");
        assert_eq!(
            signal.traces_url, "http://traces:4318/custom",
            "the per-signal variable is a full URL and wins over the base one"
        );

        let file = TelemetryConfig {
            otlp_endpoint: Some("http://file:4318".to_owned()),
            service_name: Some("from-file".to_owned()),
            sample_ratio: 0.25,
        };
        let chosen = file
            .resolve(env(&[
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://env:4318/v1/traces",
                ),
                ("OTEL_SERVICE_NAME", "from-env"),
            ]))
            .expect("resolves")
            .expect("exporting");
        assert_eq!(
            chosen,
            Export {
                traces_url: "http://file:4318/v1/traces".to_owned(),
                service_name: "from-file".to_owned(),
                sample_ratio: 0.25,
            },
            "the configuration file wins over the environment"
        );
        assert_eq!(
            file.resolve(env(&[("OTEL_SDK_DISABLED", "true")]))
                .expect("resolves"),
            None
        );
    }

    #[test]
    fn unsupported_protocols_bad_urls_and_ratios_are_refused_with_what_to_change() {
        let config = TelemetryConfig::default();
        let err = config
            .resolve(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ]))
            .expect_err("grpc is not supported");
        assert!(
            err.to_string().contains("OTEL_EXPORTER_OTLP_PROTOCOL")
                && err.to_string().contains("4318"),
            "{err}"
        );
        assert!(
            config
                .resolve(env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ]))
                .expect("http/protobuf is fine")
                .is_some()
        );
        let err = config
            .resolve(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")]))
            .expect_err("not a URL");
        assert!(matches!(err, TelemetryError::Endpoint(_)), "{err}");
        let ratio = TelemetryConfig {
            sample_ratio: 1.5,
            ..TelemetryConfig::default()
        };
        assert!(matches!(
            ratio.resolve(env(&[])),
            Err(TelemetryError::SampleRatio(_))
        ));
    }

    #[test]
    fn a_tasks_trace_and_root_span_ids_are_fixed_by_its_id_and_differ_between_tasks() {
        let a = TaskId::from_idempotency_key("a");
        let b = TaskId::from_idempotency_key("b");
        assert_eq!(trace_id(a), trace_id(a));
        assert_eq!(root_span_id(a), root_span_id(a));
        assert_ne!(trace_id(a), trace_id(b));
        assert_ne!(root_span_id(a), root_span_id(b));
        assert_ne!(trace_id(a), TraceId::INVALID);
        assert_ne!(root_span_id(a), SpanId::INVALID);
    }
}
