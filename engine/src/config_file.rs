//! The engine's configuration file: `taskpods serve --config taskpods.toml`.
//!
//! The file is TOML and every key is optional: what it leaves out keeps the embedded default, so an empty
//! file is a valid configuration. Its shape ([`FileConfig`], one section per part of the engine) is kept
//! apart from the engine's internal config structs on purpose: the file is a stable, documented interface
//! for operators, while the structs change with the code; [`FileConfig::apply`] maps one onto the other.
//!
//! - [`load`]: read a file, apply `TASKPODS__<SECTION>__<KEY>` environment overrides, and refuse unknown
//!   keys and wrong types with their path (`kubernetes.namspace: unknown field`).
//! - [`FileConfig::apply`]: onto an [`EngineConfig`].
//! - [`FileConfig::effective`]: the complete configuration a given [`EngineConfig`] amounts to; `taskpods
//!   config dump` prints it, and `config check` accepts what it prints.
//! - [`reference`]: the Markdown reference of every key with its default and doc, generated from the doc
//!   comments below (docs/OPERATIONS.md embeds it; a test keeps the two equal).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use taskpods_events::{LaunchPolicy, Names};

use crate::config::EngineConfig;
use crate::executor::BackendConfig;
use crate::executor::kubernetes::KubernetesConfig;
use crate::executor::local::LocalConfig;
use crate::executor::noop::NoopConfig;
use crate::http::HttpConfig;

/// Prefix of the environment variables that override keys of the file: `TASKPODS__NATS__URLS`,
/// `TASKPODS__KUBERNETES__NAMESPACE`. The value is read as a TOML value (`3`, `true`, `["a", "b"]`), else
/// as a string.
pub const ENV_PREFIX: &str = "TASKPODS__";

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{path} is not valid TOML")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's account, with line and column.
        #[source]
        source: toml::de::Error,
    },
    /// A key is unknown or its value has the wrong type.
    #[error("{origin}: {key}: {message}")]
    Invalid {
        /// The file, or the environment variable, the bad value came from.
        origin: String,
        /// The key's path, e.g. `kubernetes.namespace`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// An override variable names no key (`TASKPODS__` alone, or an empty part).
    #[error("environment variable {0} names no configuration key")]
    BadOverride(String),
}

/// A duration written the way people write them: `30s`, `5m`, `1h 30m`, `250ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!("{text:?} is not a duration like 30s or 5m: {e}"))
            })
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// Defines a section: a struct whose fields are all optional, plus the doc of each field for
/// [`reference`] (doc comments are not visible to code otherwise).
macro_rules! section {
    ($(#[doc = $sdoc:literal])* $name:ident { $( $(#[doc = $doc:literal])+ $field:ident : $ty:ty ),* $(,)? }) => {
        $(#[doc = $sdoc])*
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $( $(#[doc = $doc])+ #[serde(skip_serializing_if = "Option::is_none")] pub $field: Option<$ty>, )*
        }
        impl $name {
            /// Each key of this section with its doc comment.
            pub const KEYS: &'static [(&'static str, &'static str)] =
                &[ $( (stringify!($field), concat!($($doc, "\n"),+)) ),* ];
        }
    };
}

section! {
    /// `[nats]`: how the engine reaches NATS.
    NatsSection {
        /// NATS server URLs; the client learns the rest of a cluster from any one of them.
        urls: Vec<String>,
        /// NATS credentials file (the engine identity, `engine.creds` from `taskpods auth init`).
        creds: PathBuf,
        /// How long to keep trying to reach NATS at start-up before giving up.
        connect_timeout: HumanDuration,
        /// Subject prefix; streams and buckets are named after it (`acme.prod` → `ACME_PROD_EVT`).
        prefix: String,
    }
}

section! {
    /// `[engine]`: this replica (several may run against one NATS; see the README's "Running several
    /// engines").
    EngineSection {
        /// After SIGTERM, how long work in hand may take to finish before it is handed back to the streams
        /// for another replica; the process exits shortly after.
        shutdown_grace: HumanDuration,
    }
}

section! {
    /// `[topology]`: the streams and buckets the engine creates or checks at start-up.
    TopologySection {
        /// Replicas of every stream and bucket (3 on a three-node cluster).
        replicas: usize,
        /// `file` or `memory` storage for the streams.
        storage: String,
        /// How long task output is kept.
        log_max_age: HumanDuration,
        /// Most bytes of task output kept, all tasks together.
        log_max_bytes: i64,
        /// Window in which a repeated `Nats-Msg-Id` is recognised as a duplicate.
        duplicate_window: HumanDuration,
        /// How long dead letters (undecodable commands) are kept.
        dead_letter_max_age: HumanDuration,
        /// Largest message the streams accept, bytes.
        max_message_bytes: i32,
    }
}

section! {
    /// `[intake]`: the command consumer.
    IntakeSection {
        /// Commands in flight at once (the consumer's max ack pending).
        max_in_flight: usize,
        /// Workers applying commands (commands for one task always go to the same worker, in order).
        workers: usize,
        /// Largest command accepted, bytes.
        max_payload_bytes: usize,
        /// Deliveries of one command before it is dead-lettered.
        max_deliver: i64,
        /// How long a delivered command may stay unacked before it is redelivered: the longest a dead
        /// replica's commands wait before another replica takes them.
        ack_wait: HumanDuration,
    }
}

section! {
    /// `[gateway]`: what the engine tells agents and expects from them.
    GatewaySection {
        /// How often agents send a heartbeat.
        heartbeat_interval: HumanDuration,
        /// A running task whose agent was silent this long fails as `AgentLost`.
        heartbeat_timeout: HumanDuration,
        /// Most bytes of output stored per task (the rest is counted, and the tail kept in the result).
        output_cap_bytes: u64,
    }
}

section! {
    /// `[timers]`: deadlines and start-up limits.
    TimersSection {
        /// A task with no sandbox or no hello this long after acceptance fails.
        startup_timeout: HumanDuration,
    }
}

section! {
    /// `[executor]`: the loop that creates, stops and reaps sandboxes.
    ExecutorSection {
        /// Tasks reconciled at once.
        concurrency: usize,
        /// How long an ended task's sandbox is kept before it is reaped.
        reap_grace: HumanDuration,
        /// How long a delivered event may stay unacked before it is redelivered: the longest a dead
        /// replica's effects wait before another replica takes them (live work renews it).
        ack_wait: HumanDuration,
    }
}

section! {
    /// `[backend]`: where tasks run.
    BackendSection {
        /// `local` (sandboxed processes on the engine's machine), `kubernetes` (a hardened Job per task),
        /// `noop` (benchmarks and tests only: no code runs, each task's life is played in-process) or `none`
        /// (no executor: this engine only takes commands).
        kind: String,
    }
}

section! {
    /// `[local]`: the local backend.
    LocalSection {
        /// The agent binary (default: `taskpods-agent` next to the engine, else on `PATH`).
        agent_bin: PathBuf,
        /// Where sandboxes keep their pid file and agent log.
        state_dir: PathBuf,
    }
}

section! {
    /// `[noop]`: the no-op backend (benchmarks and tests).
    NoopSection {
        /// How long each simulated task runs between its agent's hello and its result.
        work: HumanDuration,
    }
}

section! {
    /// `[kubernetes]`: the Kubernetes backend.
    KubernetesSection {
        /// The namespace task Jobs run in.
        namespace: String,
        /// The task pods' ServiceAccount (no bindings; its token is never mounted).
        service_account: String,
        /// The NATS URL task pods connect to; the engine resolves its host names and gives pods the
        /// addresses (task pods have no DNS).
        agent_nats_url: String,
        /// Task pods in their own user namespace (`hostUsers: false`); only where the cluster supports it
        /// (Kubernetes 1.33+, Linux 6.3+, a runtime with ID-mapped mounts).
        user_namespace: bool,
        /// A task not running this long after acceptance fails with the reason Kubernetes gives.
        startup_timeout: HumanDuration,
        /// How often the reconciler compares Jobs with live tasks.
        reconcile_interval: HumanDuration,
        /// How long the reconciler's lease lasts without renewal (another replica takes over after it).
        lease_ttl: HumanDuration,
        /// Requests per second the executor sends the API server at most, on average (about four per
        /// task: create, pod lists, delete); 0: no limit.
        api_qps: f64,
        /// Requests the executor may send at once above the average rate.
        api_burst: u32,
    }
}

section! {
    /// `[http]`: the web UI, its JSON API, `/metrics` and the health probes.
    HttpSection {
        /// Serve them at all (`false`: as `--no-ui`).
        enabled: bool,
        /// Where to listen (`0.0.0.0:8080` in a pod); any address but loopback needs a token.
        bind: SocketAddr,
        /// A bearer token that may read everything. Set it from a Secret through the environment
        /// (`TASKPODS__HTTP__READ_TOKEN`), not in a file others can read.
        read_token: String,
        /// A bearer token that may read and cancel (also best set through the environment).
        operator_token: String,
        /// Refuse cancels from callers without the operator token.
        read_only: bool,
    }
}

section! {
    /// `[auth]`: per-task NATS identities.
    AuthSection {
        /// The task signer (`task-signer.nk` from `taskpods auth init`) each task's identity is minted with.
        task_signer: PathBuf,
        /// How long past its deadline a task's identity stays valid.
        task_credentials_grace: HumanDuration,
        /// The seal key (`seal.key` from `taskpods auth init`) env values are sealed with in events.
        seal_key: PathBuf,
    }
}

section! {
    /// `[telemetry]`: one trace per task, exported over OTLP/HTTP (off unless an endpoint is set here or
    /// in `OTEL_EXPORTER_OTLP_ENDPOINT`).
    TelemetrySection {
        /// The OTLP/HTTP endpoint of a collector (its port 4318, e.g. `http://otel-collector:4318`); traces
        /// go to `<endpoint>/v1/traces`. Unset: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
        /// `OTEL_EXPORTER_OTLP_ENDPOINT` when set, else no export. Only http/protobuf is spoken.
        otlp_endpoint: String,
        /// The exported `service.name` (unset: `OTEL_SERVICE_NAME`, else `taskpods-engine`).
        service_name: String,
        /// The share of tasks traced, 0.0 to 1.0, decided from the task's trace id (the same on every replica).
        sample_ratio: f64,
    }
}

/// The whole file. Each section is optional, and so is each key in it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// How the engine reaches NATS.
    pub nats: NatsSection,
    /// This replica.
    pub engine: EngineSection,
    /// Streams and buckets.
    pub topology: TopologySection,
    /// The command consumer.
    pub intake: IntakeSection,
    /// Launch policy: toolboxes (name → image, pinned by digest), allowed images, limits and defaults.
    pub policy: Option<LaunchPolicy>,
    /// The agent gateway.
    pub gateway: GatewaySection,
    /// Deadlines and start-up limits.
    pub timers: TimersSection,
    /// The executor loop.
    pub executor: ExecutorSection,
    /// Where tasks run.
    pub backend: BackendSection,
    /// The local backend.
    pub local: LocalSection,
    /// The Kubernetes backend.
    pub kubernetes: KubernetesSection,
    /// The no-op backend.
    pub noop: NoopSection,
    /// Per-task NATS identities.
    pub auth: AuthSection,
    /// The web UI, API, metrics and probes.
    pub http: HttpSection,
    /// Trace export.
    pub telemetry: TelemetrySection,
}

/// Reads `path`, applies the `TASKPODS__…` overrides from `env`, and checks every key.
pub fn load(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<FileConfig, ConfigFileError> {
    let (mut table, origin) = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
                path: path.to_owned(),
                source,
            })?;
            let table: toml::Table =
                toml::from_str(&text).map_err(|source| ConfigFileError::Syntax {
                    path: path.to_owned(),
                    source,
                })?;
            (table, path.display().to_string())
        }
        None => (toml::Table::new(), "(defaults)".to_owned()),
    };
    // Each override is checked on its own first, so an error names the variable, not the file.
    let mut overrides: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    overrides.sort();
    for (name, raw) in overrides {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigFileError::BadOverride(name));
        }
        let value = parse_override(&raw);
        let mut single = toml::Table::new();
        insert(&mut single, &path, value.clone());
        check(single, &name)?;
        insert(&mut table, &path, value);
    }
    check(table, &origin)
}

/// An override's value: a TOML value when it reads as one (`3`, `true`, `["a"]`), else the text itself.
fn parse_override(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn insert(table: &mut toml::Table, path: &[String], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

fn check(table: toml::Table, origin: &str) -> Result<FileConfig, ConfigFileError> {
    let file: FileConfig =
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            ConfigFileError::Invalid {
                origin: origin.to_owned(),
                key: e.path().to_string(),
                message: e.inner().to_string(),
            }
        })?;
    file.validate(origin)?;
    Ok(file)
}

impl FileConfig {
    /// Checks what types alone cannot.
    fn validate(&self, origin: &str) -> Result<(), ConfigFileError> {
        let invalid = |key: &str, message: String| ConfigFileError::Invalid {
            origin: origin.to_owned(),
            key: key.to_owned(),
            message,
        };
        if let Some(kind) = &self.backend.kind
            && !matches!(kind.as_str(), "local" | "kubernetes" | "noop" | "none")
        {
            return Err(invalid(
                "backend.kind",
                format!("{kind:?} is not one of local, kubernetes, noop, none"),
            ));
        }
        if let Some(storage) = &self.topology.storage
            && !matches!(storage.as_str(), "file" | "memory")
        {
            return Err(invalid(
                "topology.storage",
                format!("{storage:?} is not one of file, memory"),
            ));
        }
        if let Some(prefix) = &self.nats.prefix
            && Names::new(prefix).is_err()
        {
            return Err(invalid(
                "nats.prefix",
                format!("{prefix:?} is not a valid subject prefix"),
            ));
        }
        if self.nats.urls.as_ref().is_some_and(Vec::is_empty) {
            return Err(invalid("nats.urls", "needs at least one URL".to_owned()));
        }
        if let Some(ratio) = self.telemetry.sample_ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            return Err(invalid(
                "telemetry.sample_ratio",
                format!("{ratio} is not between 0.0 and 1.0"),
            ));
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(invalid(
                "telemetry.otlp_endpoint",
                format!("{endpoint:?} is not an http:// or https:// URL"),
            ));
        }
        if let Some(policy) = &self.policy
            && !policy.toolboxes.contains_key(&policy.default_toolbox)
        {
            return Err(invalid(
                "policy.default_toolbox",
                format!("{:?} is not one of the toolboxes", policy.default_toolbox),
            ));
        }
        Ok(())
    }

    /// Applies every key the file sets onto `config`; the rest of `config` is left as it is.
    pub fn apply(&self, config: &mut EngineConfig) {
        fn set<T: Clone>(target: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *target = v.clone();
            }
        }
        fn set_duration(target: &mut Duration, value: &Option<HumanDuration>) {
            if let Some(v) = value {
                *target = v.0;
            }
        }
        let nats = &self.nats;
        set(&mut config.nats_urls, &nats.urls);
        if nats.creds.is_some() {
            config.nats_creds = nats.creds.clone();
        }
        set_duration(&mut config.connect_timeout, &nats.connect_timeout);
        if let Some(names) = nats.prefix.as_deref().and_then(|p| Names::new(p).ok()) {
            config.topology.names = names;
        }

        set_duration(&mut config.shutdown_grace, &self.engine.shutdown_grace);

        let topology = &self.topology;
        set(&mut config.topology.replicas, &topology.replicas);
        if let Some(storage) = &topology.storage {
            config.topology.storage = match storage.as_str() {
                "memory" => async_nats::jetstream::stream::StorageType::Memory,
                _ => async_nats::jetstream::stream::StorageType::File,
            };
        }
        set_duration(&mut config.topology.log_max_age, &topology.log_max_age);
        set(&mut config.topology.log_max_bytes, &topology.log_max_bytes);
        set_duration(
            &mut config.topology.duplicate_window,
            &topology.duplicate_window,
        );
        set_duration(
            &mut config.topology.dead_letter_max_age,
            &topology.dead_letter_max_age,
        );
        set(
            &mut config.topology.max_message_bytes,
            &topology.max_message_bytes,
        );

        let intake = &self.intake;
        set(&mut config.intake.max_in_flight, &intake.max_in_flight);
        set(&mut config.intake.workers, &intake.workers);
        set(
            &mut config.intake.max_payload_bytes,
            &intake.max_payload_bytes,
        );
        set(&mut config.intake.max_deliver, &intake.max_deliver);
        set_duration(&mut config.intake.ack_wait, &intake.ack_wait);
        set(&mut config.intake.policy, &self.policy);

        let gateway = &self.gateway;
        set_duration(
            &mut config.gateway.heartbeat_interval,
            &gateway.heartbeat_interval,
        );
        set_duration(
            &mut config.gateway.heartbeat_timeout,
            &gateway.heartbeat_timeout,
        );
        set(
            &mut config.gateway.output_cap_bytes,
            &gateway.output_cap_bytes,
        );

        set_duration(
            &mut config.timers.startup_timeout,
            &self.timers.startup_timeout,
        );
        set(&mut config.executor.concurrency, &self.executor.concurrency);
        set_duration(&mut config.executor.reap_grace, &self.executor.reap_grace);
        set_duration(&mut config.executor.ack_wait, &self.executor.ack_wait);

        if self.auth.task_signer.is_some() {
            config.auth.task_signer = self.auth.task_signer.clone();
        }
        if self.auth.seal_key.is_some() {
            config.auth.seal_key = self.auth.seal_key.clone();
        }
        set_duration(
            &mut config.auth.task_credentials_grace,
            &self.auth.task_credentials_grace,
        );

        let http = &self.http;
        match http.enabled {
            Some(false) => config.http = None,
            Some(true) if config.http.is_none() => config.http = Some(HttpConfig::default()),
            _ => {}
        }
        if let Some(server) = &mut config.http {
            set(&mut server.bind, &http.bind);
            if http.read_token.is_some() {
                server.read_token = http.read_token.clone();
            }
            if http.operator_token.is_some() {
                server.operator_token = http.operator_token.clone();
            }
            set(&mut server.read_only, &http.read_only);
        }

        let telemetry = &self.telemetry;
        if telemetry.otlp_endpoint.is_some() {
            config.telemetry.otlp_endpoint = telemetry.otlp_endpoint.clone();
        }
        if telemetry.service_name.is_some() {
            config.telemetry.service_name = telemetry.service_name.clone();
        }
        set(&mut config.telemetry.sample_ratio, &telemetry.sample_ratio);

        // The backend: the kind the file names (else the one `config` has), then its section's keys.
        match self.backend.kind.as_deref() {
            Some("none") => config.backend = BackendConfig::None,
            Some("local") if !matches!(config.backend, BackendConfig::Local(_)) => {
                config.backend = BackendConfig::Local(LocalConfig::default());
            }
            Some("kubernetes") if !matches!(config.backend, BackendConfig::Kubernetes(_)) => {
                config.backend = BackendConfig::Kubernetes(KubernetesConfig::default());
            }
            Some("noop") if !matches!(config.backend, BackendConfig::Noop(_)) => {
                config.backend = BackendConfig::Noop(NoopConfig::default());
            }
            _ => {}
        }
        match &mut config.backend {
            BackendConfig::Local(local) => {
                set(&mut local.agent_bin, &self.local.agent_bin);
                set(&mut local.state_dir, &self.local.state_dir);
            }
            BackendConfig::Kubernetes(kube) => {
                let section = &self.kubernetes;
                set(&mut kube.job.namespace, &section.namespace);
                set(&mut kube.job.service_account, &section.service_account);
                set(&mut kube.job.nats_url, &section.agent_nats_url);
                set(&mut kube.job.user_namespace, &section.user_namespace);
                set_duration(&mut kube.startup_timeout, &section.startup_timeout);
                set_duration(&mut kube.reconcile_interval, &section.reconcile_interval);
                set_duration(&mut kube.lease_ttl, &section.lease_ttl);
                set(&mut kube.api_qps, &section.api_qps);
                set(&mut kube.api_burst, &section.api_burst);
            }
            BackendConfig::Noop(noop) => set_duration(&mut noop.work, &self.noop.work),
            BackendConfig::None => {}
        }
    }

    /// Every key, with the value `config` has for it: the complete file `config` amounts to.
    pub fn effective(config: &EngineConfig) -> FileConfig {
        let d = |d: Duration| Some(HumanDuration(d));
        let local_defaults = LocalConfig::default();
        let kube_defaults = KubernetesConfig::default();
        let noop_defaults = NoopConfig::default();
        let (kind, local, kube, noop) = match &config.backend {
            BackendConfig::None => ("none", &local_defaults, &kube_defaults, &noop_defaults),
            BackendConfig::Local(local) => ("local", local, &kube_defaults, &noop_defaults),
            BackendConfig::Kubernetes(kube) => {
                ("kubernetes", &local_defaults, kube, &noop_defaults)
            }
            BackendConfig::Noop(noop) => ("noop", &local_defaults, &kube_defaults, noop),
        };
        FileConfig {
            nats: NatsSection {
                urls: Some(config.nats_urls.clone()),
                creds: config.nats_creds.clone(),
                connect_timeout: d(config.connect_timeout),
                prefix: Some(config.topology.names.prefix().to_owned()),
            },
            engine: EngineSection {
                shutdown_grace: d(config.shutdown_grace),
            },
            topology: TopologySection {
                replicas: Some(config.topology.replicas),
                storage: Some(
                    match config.topology.storage {
                        async_nats::jetstream::stream::StorageType::Memory => "memory",
                        async_nats::jetstream::stream::StorageType::File => "file",
                    }
                    .to_owned(),
                ),
                log_max_age: d(config.topology.log_max_age),
                log_max_bytes: Some(config.topology.log_max_bytes),
                duplicate_window: d(config.topology.duplicate_window),
                dead_letter_max_age: d(config.topology.dead_letter_max_age),
                max_message_bytes: Some(config.topology.max_message_bytes),
            },
            intake: IntakeSection {
                max_in_flight: Some(config.intake.max_in_flight),
                workers: Some(config.intake.workers),
                max_payload_bytes: Some(config.intake.max_payload_bytes),
                max_deliver: Some(config.intake.max_deliver),
                ack_wait: d(config.intake.ack_wait),
            },
            policy: Some(config.intake.policy.clone()),
            gateway: GatewaySection {
                heartbeat_interval: d(config.gateway.heartbeat_interval),
                heartbeat_timeout: d(config.gateway.heartbeat_timeout),
                output_cap_bytes: Some(config.gateway.output_cap_bytes),
            },
            timers: TimersSection {
                startup_timeout: d(config.timers.startup_timeout),
            },
            executor: ExecutorSection {
                concurrency: Some(config.executor.concurrency),
                reap_grace: d(config.executor.reap_grace),
                ack_wait: d(config.executor.ack_wait),
            },
            backend: BackendSection {
                kind: Some(kind.to_owned()),
            },
            local: LocalSection {
                agent_bin: Some(local.agent_bin.clone()),
                state_dir: Some(local.state_dir.clone()),
            },
            kubernetes: KubernetesSection {
                namespace: Some(kube.job.namespace.clone()),
                service_account: Some(kube.job.service_account.clone()),
                agent_nats_url: Some(kube.job.nats_url.clone()),
                user_namespace: Some(kube.job.user_namespace),
                startup_timeout: d(kube.startup_timeout),
                reconcile_interval: d(kube.reconcile_interval),
                lease_ttl: d(kube.lease_ttl),
                api_qps: Some(kube.api_qps),
                api_burst: Some(kube.api_burst),
            },
            noop: NoopSection { work: d(noop.work) },
            auth: AuthSection {
                task_signer: config.auth.task_signer.clone(),
                task_credentials_grace: d(config.auth.task_credentials_grace),
                seal_key: config.auth.seal_key.clone(),
            },
            http: match &config.http {
                // Tokens are secrets: a dump never prints them.
                Some(http) => HttpSection {
                    enabled: Some(true),
                    bind: Some(http.bind),
                    read_token: None,
                    operator_token: None,
                    read_only: Some(http.read_only),
                },
                None => HttpSection {
                    enabled: Some(false),
                    ..HttpSection::default()
                },
            },
            telemetry: TelemetrySection {
                otlp_endpoint: config.telemetry.otlp_endpoint.clone(),
                service_name: config.telemetry.service_name.clone(),
                sample_ratio: Some(config.telemetry.sample_ratio),
            },
        }
    }

    /// The file as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }
}

/// The configuration `taskpods serve` starts from: the engine's defaults with the local backend.
pub fn serve_defaults() -> EngineConfig {
    EngineConfig {
        backend: BackendConfig::Local(LocalConfig::default()),
        http: Some(HttpConfig::default()),
        ..EngineConfig::default()
    }
}

/// The Markdown reference of every key: section, key, default (as `taskpods serve` starts) and doc.
pub fn reference() -> String {
    let defaults = FileConfig::effective(&serve_defaults());
    let sections = [
        Section::new(
            "nats",
            "How the engine reaches NATS.",
            NatsSection::KEYS,
            &defaults.nats,
        ),
        Section::new(
            "engine",
            "This replica (several may share one NATS).",
            EngineSection::KEYS,
            &defaults.engine,
        ),
        Section::new(
            "topology",
            "Streams and buckets, created or checked at start-up.",
            TopologySection::KEYS,
            &defaults.topology,
        ),
        Section::new(
            "intake",
            "The command consumer.",
            IntakeSection::KEYS,
            &defaults.intake,
        ),
        Section::new(
            "gateway",
            "What the engine tells agents and expects from them.",
            GatewaySection::KEYS,
            &defaults.gateway,
        ),
        Section::new(
            "timers",
            "Deadlines and start-up limits.",
            TimersSection::KEYS,
            &defaults.timers,
        ),
        Section::new(
            "executor",
            "The loop that creates, stops and reaps sandboxes.",
            ExecutorSection::KEYS,
            &defaults.executor,
        ),
        Section::new(
            "backend",
            "Where tasks run.",
            BackendSection::KEYS,
            &defaults.backend,
        ),
        Section::new(
            "local",
            "The local backend (sandboxed processes).",
            LocalSection::KEYS,
            &defaults.local,
        ),
        Section::new(
            "kubernetes",
            "The Kubernetes backend (defaults shown are the backend's own).",
            KubernetesSection::KEYS,
            &defaults.kubernetes,
        ),
        Section::new(
            "noop",
            "The no-op backend: for benchmarks and tests only, it runs no code (see ARCHITECTURE.md).",
            NoopSection::KEYS,
            &defaults.noop,
        ),
        Section::new(
            "auth",
            "Per-task NATS identities.",
            AuthSection::KEYS,
            &defaults.auth,
        ),
        Section::new(
            "http",
            "The web UI, its JSON API, `/metrics` and the health probes.",
            HttpSection::KEYS,
            &defaults.http,
        ),
        Section::new(
            "telemetry",
            "One trace per task (spans for intake, create, hello, result, reap, cancel and timeouts), exported over OTLP/HTTP; off unless an endpoint is set.",
            TelemetrySection::KEYS,
            &defaults.telemetry,
        ),
    ];
    let mut out = String::from(
        "Every key is optional; environment variables `TASKPODS__<SECTION>__<KEY>` override the file \
         (e.g. `TASKPODS__KUBERNETES__NAMESPACE=prod-tasks`). Durations are written `30s`, `5m`, `1h 30m`.\n",
    );
    for Section {
        name,
        doc,
        keys,
        values,
    } in sections
    {
        out.push_str(&format!(
            "\n### `[{name}]`\n\n{doc}\n\n| key | default | meaning |\n|---|---|---|\n"
        ));
        for (key, key_doc) in keys {
            // Defaults that depend on the machine are described rather than printed.
            let default = match (name, *key) {
                ("local", "agent_bin") => "`taskpods-agent` beside the engine binary".to_owned(),
                ("local", "state_dir") => {
                    "`$TASKPODS_DATA/sandboxes` (`~/.local/share/taskpods`)".to_owned()
                }
                _ => values
                    .get(*key)
                    .map(|v| format!("`{}`", v.to_string().replace('|', "\\|")))
                    .unwrap_or_else(|| "(none)".to_owned()),
            };
            let meaning = key_doc.split_whitespace().collect::<Vec<_>>().join(" ");
            out.push_str(&format!("| `{key}` | {default} | {meaning} |\n"));
        }
    }
    out.push_str(
        "\n### `[policy]`\n\nLaunch policy: every key of it at once (a `[policy]` table replaces the defaults \
         as a whole; keys it leaves out take the defaults below). Toolbox images should be pinned by digest.\n\n```toml\n",
    );
    let policy = toml::to_string_pretty(&toml::Table::from_iter([(
        "policy".to_owned(),
        toml::Value::try_from(LaunchPolicy::default())
            .unwrap_or(toml::Value::Table(toml::Table::new())),
    )]))
    .unwrap_or_default();
    out.push_str(&policy);
    out.push_str("```\n");
    out
}

/// One section of [`reference`]: its name, doc, keys with their docs, and default values.
struct Section {
    name: &'static str,
    doc: &'static str,
    keys: &'static [(&'static str, &'static str)],
    values: BTreeMap<String, toml::Value>,
}

impl Section {
    fn new(
        name: &'static str,
        doc: &'static str,
        keys: &'static [(&'static str, &'static str)],
        defaults: &impl Serialize,
    ) -> Self {
        let values = match toml::Value::try_from(defaults) {
            Ok(toml::Value::Table(table)) => table.into_iter().collect(),
            _ => BTreeMap::new(),
        };
        Self {
            name,
            doc,
            keys,
            values,
        }
    }
}

impl fmt::Display for FileConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_toml())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_dump_of_the_defaults_loads_back_to_the_same_configuration() {
        let dump = FileConfig::effective(&serve_defaults()).to_toml();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("taskpods.toml");
        std::fs::write(&path, &dump).expect("written");
        let loaded = load(Some(&path), env(&[])).expect("the dump loads");
        let mut config = EngineConfig::default();
        loaded.apply(&mut config);
        assert_eq!(
            FileConfig::effective(&config).to_toml(),
            dump,
            "dump → load → dump is stable"
        );
        assert!(matches!(config.backend, BackendConfig::Local(_)));
    }

    #[test]
    fn the_noop_backend_is_chosen_by_the_file_with_its_work_time_and_dumps_back() {
        let loaded = load(
            None,
            env(&[
                ("TASKPODS__BACKEND__KIND", "noop"),
                ("TASKPODS__NOOP__WORK", "250ms"),
            ]),
        )
        .expect("loads");
        let mut config = serve_defaults();
        loaded.apply(&mut config);
        let BackendConfig::Noop(noop) = &config.backend else {
            panic!("noop backend expected, got {:?}", config.backend);
        };
        assert_eq!(noop.work, Duration::from_millis(250));
        let dump = FileConfig::effective(&config);
        assert_eq!(dump.backend.kind.as_deref(), Some("noop"));
        assert_eq!(
            dump.noop.work,
            Some(HumanDuration(Duration::from_millis(250)))
        );
    }

    #[test]
    fn file_values_and_overrides_reach_the_engine_config_and_bad_keys_name_their_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("taskpods.toml");
        std::fs::write(
            &path,
            "[nats]\nurls = [\"nats://a:4222\", \"nats://b:4222\"]\nconnect_timeout = \"5s\"\n\
             [topology]\nreplicas = 3\n[backend]\nkind = \"kubernetes\"\n\
             [kubernetes]\nnamespace = \"tasks-a\"\nlease_ttl = \"2m\"\n\
             [policy]\ntoolboxes = { py = \"img@sha256:abc\" }\ndefault_toolbox = \"py\"\n",
        )
        .expect("written");
        let loaded = load(
            Some(&path),
            env(&[
                ("TASKPODS__KUBERNETES__NAMESPACE", "tasks-b"),
                ("TASKPODS__INTAKE__WORKERS", "7"),
                (
                    "TASKPODS__TELEMETRY__OTLP_ENDPOINT",
                    "http://collector:4318",
                ),
                ("TASKPODS_NOT_AN_OVERRIDE", "x"),
            ]),
        )
        .expect("loads");
        let mut config = EngineConfig::default();
        loaded.apply(&mut config);
        assert_eq!(config.nats_urls, ["nats://a:4222", "nats://b:4222"]);
        assert_eq!(config.connect_timeout, Duration::from_secs(5));
        assert_eq!(config.topology.replicas, 3);
        assert_eq!(config.intake.workers, 7);
        assert_eq!(config.intake.policy.default_toolbox, "py");
        assert_eq!(
            config.telemetry.otlp_endpoint.as_deref(),
            Some("http://collector:4318")
        );
        let BackendConfig::Kubernetes(kube) = &config.backend else {
            panic!("kubernetes backend expected, got {:?}", config.backend);
        };
        assert_eq!(
            kube.job.namespace, "tasks-b",
            "the environment overrides the file"
        );
        assert_eq!(kube.lease_ttl, Duration::from_secs(120));

        for (text, key) in [
            ("[kubernetes]\nnamspace = \"x\"\n", "kubernetes.namspace"),
            ("[nats]\nurls = \"nats://a\"\n", "nats.urls"),
            (
                "[timers]\nstartup_timeout = \"soon\"\n",
                "timers.startup_timeout",
            ),
            ("[backend]\nkind = \"docker\"\n", "backend.kind"),
            ("[colour]\nx = 1\n", "colour"),
            (
                "[policy]\ndefault_toolbox = \"missing\"\n",
                "policy.default_toolbox",
            ),
            (
                "[telemetry]\nsample_ratio = 2.0\n",
                "telemetry.sample_ratio",
            ),
            (
                "[telemetry]\notlp_endpoint = \"collector:4318\"\n",
                "telemetry.otlp_endpoint",
            ),
        ] {
            std::fs::write(&path, text).expect("written");
            let err = load(Some(&path), env(&[])).expect_err(text);
            match &err {
                ConfigFileError::Invalid { key: k, .. } => {
                    assert!(k.starts_with(key), "{text}: {err}")
                }
                other => panic!("{text}: {other}"),
            }
            assert!(err.to_string().contains(key), "{err}");
        }
        let err =
            load(None, env(&[("TASKPODS__KUBERNETES__NAMSPACE", "x")])).expect_err("bad override");
        assert!(
            err.to_string()
                .starts_with("TASKPODS__KUBERNETES__NAMSPACE: kubernetes.namspace"),
            "{err}"
        );
        std::fs::write(&path, "[nats\n").expect("written");
        assert!(matches!(
            load(Some(&path), env(&[])),
            Err(ConfigFileError::Syntax { .. })
        ));
    }
}
