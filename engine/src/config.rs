//! Engine configuration. Every field has a default, so `taskpods serve` runs with no configuration at all
//! against a local nats-server.

use std::time::Duration;

use crate::clock::Clock;
use crate::credentials::AuthConfig;
use crate::executor::{BackendConfig, ExecutorConfig};
use crate::files::FilesConfig;
use crate::gateway::GatewayConfig;
use crate::http::HttpConfig;
use crate::intake::IntakeConfig;
use crate::telemetry::TelemetryConfig;
use crate::timers::TimersConfig;
use crate::topology::TopologyConfig;

/// Everything the engine needs to start.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// NATS server URLs (comma-separated in the CLI).
    pub nats_urls: Vec<String>,
    /// The engine's NATS credentials file (`engine.creds` from `taskpods auth init`); none on a server
    /// without authorization.
    pub nats_creds: Option<std::path::PathBuf>,
    /// How long to keep trying to reach NATS at start-up before giving up.
    pub connect_timeout: Duration,
    /// Streams, buckets and the subject prefix.
    pub topology: TopologyConfig,
    /// Command intake: consumer, concurrency, launch policy.
    pub intake: IntakeConfig,
    /// Agent gateway: hello answers, heartbeat interval and timeout, output cap handed to agents.
    pub gateway: GatewayConfig,
    /// Executor: the event consumer that creates, stops and reaps sandboxes.
    pub executor: ExecutorConfig,
    /// The backend the executor drives (`None` here: no executor; `taskpods serve` uses `Local`).
    pub backend: BackendConfig,
    /// Deadline and startup timers.
    pub timers: TimersConfig,
    /// Per-task NATS identities (the task signer) and their limits.
    pub auth: AuthConfig,
    /// Where every loop reads the time (the wall clock; a test's clock to move time).
    pub clock: Clock,
    /// The web UI and JSON API (`None`: not served).
    pub http: Option<HttpConfig>,
    /// Inputs and artifacts moved between agents and the files bucket.
    pub files: FilesConfig,
    /// This replica's name: in its leases, in the `Taskpods-Engine` header of every event it appends,
    /// and in its logs. Unique per process (the host name plus a random suffix), so a restarted replica
    /// is a new holder.
    pub engine_id: String,
    /// How long, after a shutdown signal, work in hand may take to finish before it is handed back to
    /// the streams (nak) for another replica, and the process exits.
    pub shutdown_grace: Duration,
    /// Trace export (OTLP); installed by `taskpods serve` with the process's subscriber.
    pub telemetry: TelemetryConfig,
}

/// A fresh engine id: `$HOSTNAME` (a pod's name) or `engine`, then 8 random hex digits.
pub fn fresh_engine_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty() && !h.contains(char::is_whitespace))
        .unwrap_or_else(|| "engine".to_owned());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &random[..8])
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            nats_urls: vec!["nats://127.0.0.1:4222".to_owned()],
            nats_creds: None,
            connect_timeout: Duration::from_secs(30),
            topology: TopologyConfig::default(),
            intake: IntakeConfig::default(),
            gateway: GatewayConfig::default(),
            executor: ExecutorConfig::default(),
            backend: BackendConfig::default(),
            timers: TimersConfig::default(),
            auth: AuthConfig::default(),
            clock: Clock::wall(),
            http: None,
            files: FilesConfig::default(),
            engine_id: fresh_engine_id(),
            shutdown_grace: Duration::from_secs(5),
            telemetry: TelemetryConfig::default(),
        }
    }
}
