//! Engine configuration. Every field has a default, so `taskpods serve` runs with no configuration at all
//! against a local nats-server.

use std::time::Duration;

use crate::intake::IntakeConfig;
use crate::topology::TopologyConfig;

/// Everything the engine needs to start.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// NATS server URLs (comma-separated in the CLI).
    pub nats_urls: Vec<String>,
    /// How long to keep trying to reach NATS at start-up before giving up.
    pub connect_timeout: Duration,
    /// Streams, buckets and the subject prefix.
    pub topology: TopologyConfig,
    /// Command intake: consumer, concurrency, launch policy.
    pub intake: IntakeConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            nats_urls: vec!["nats://127.0.0.1:4222".to_owned()],
            connect_timeout: Duration::from_secs(30),
            topology: TopologyConfig::default(),
            intake: IntakeConfig::default(),
        }
    }
}
