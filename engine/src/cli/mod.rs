//! The operator's CLI, one module per command group; `main.rs` only parses and dispatches.
//!
//! - [`serve`]: run the engine.
//! - [`logs`]: a task's output, stored or live.
//! - [`render`]: the Kubernetes Job for a launch, as YAML.
//! - [`replay`]: a task's timeline from the stream; failed tasks since a time.
//! - [`projections`]: rebuild, verify and status of the KV views.
//! - [`task`]: launch, show, events, cancel.

pub mod logs;
pub mod projections;
pub mod render;
pub mod replay;
pub mod serve;
pub mod task;

use taskpods_events::Names;

impl Global {
    /// Connects to NATS for a one-shot command; the error names the URLs tried.
    pub async fn connect(&self) -> Result<async_nats::Client, String> {
        let urls = self.nats_urls.join(",");
        async_nats::connect(urls.as_str())
            .await
            .map_err(|e| format!("cannot reach NATS at {urls}: {e}"))
    }
}

/// Options every command shares.
#[derive(Debug, Clone)]
pub struct Global {
    /// NATS server URLs.
    pub nats_urls: Vec<String>,
    /// Subject prefix.
    pub names: Names,
}
