//! The operator's CLI, one module per command group; `main.rs` only parses and dispatches.
//!
//! - [`serve`]: run the engine.
//! - [`auth`]: generate the NATS authorization material (`auth init`).
//! - [`logs`]: a task's output, stored or live.
//! - [`render`]: the Kubernetes Job for a launch, as YAML.
//! - [`replay`]: a task's timeline from the stream; failed tasks since a time.
//! - [`projections`]: rebuild, verify and status of the KV views.
//! - [`task`]: launch, show, events, cancel.

pub mod auth;
pub mod config;
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
        let mut options = async_nats::ConnectOptions::new();
        if let Some(creds) = &self.creds {
            options = options.credentials_file(creds).await.map_err(|e| {
                format!("cannot read the NATS credentials {}: {e}", creds.display())
            })?;
        }
        options
            .connect(urls.as_str())
            .await
            .map_err(|e| format!("cannot reach NATS at {urls}: {e}"))
    }
}

/// Options every command shares.
#[derive(Debug, Clone)]
pub struct Global {
    /// NATS server URLs.
    pub nats_urls: Vec<String>,
    /// The NATS credentials file to connect with (`--creds`), if the server requires one.
    pub creds: Option<std::path::PathBuf>,
    /// Subject prefix.
    pub names: Names,
}
