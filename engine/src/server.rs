//! The engine's entry point: connect, ensure the topology, run the loops until shutdown.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream;
use tracing::info;

use crate::config::EngineConfig;
use crate::topology::{self, TopologyError};

/// Errors that stop the engine.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// NATS could not be reached within the connect timeout.
    #[error("cannot reach NATS at {urls} within {timeout:?}: {source}")]
    Connect {
        /// The URLs tried.
        urls: String,
        /// How long we tried.
        timeout: Duration,
        /// The last error.
        source: async_nats::ConnectError,
    },
    /// A URL is not a NATS URL.
    #[error("invalid NATS URL {0:?}")]
    BadUrl(String),
    /// The streams or buckets could not be set up.
    #[error(transparent)]
    Topology(#[from] TopologyError),
}

/// Connects to NATS, retrying until `timeout` (the server may be starting alongside us).
pub async fn connect(
    urls: &[String],
    timeout: Duration,
) -> Result<async_nats::Client, ServerError> {
    let addrs = urls
        .iter()
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|_| ServerError::BadUrl(u.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    loop {
        match async_nats::ConnectOptions::new()
            .name("taskpods-engine")
            .connect(addrs.clone())
            .await
        {
            Ok(client) => return Ok(client),
            Err(source) if tokio::time::Instant::now() + delay > deadline => {
                return Err(ServerError::Connect {
                    urls: urls.join(","),
                    timeout,
                    source,
                });
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Runs the engine until `shutdown` completes.
pub async fn run(
    config: EngineConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let client = connect(&config.nats_urls, config.connect_timeout).await?;
    let js = jetstream::new(client.clone());
    let topology = topology::ensure(&js, &config.topology).await?;
    info!(
        prefix = %topology.names,
        events = %topology.names.event_stream(),
        "topology ready; engine running (Ctrl-C to stop)"
    );
    shutdown.await;
    info!("shutting down");
    client.flush().await.ok();
    Ok(())
}
