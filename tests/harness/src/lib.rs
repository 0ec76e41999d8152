//! Real servers for tests, never mocks.
//!
//! - [`NatsServer`]: one `nats-server` with JetStream on a random loopback port and a temporary store;
//!   killed and cleaned up on drop; can be killed and restarted on the same port and store for fault tests.
//! - [`measure`]: what the benchmarks share (the machine line, percentiles, `/proc` memory, the raw
//!   JetStream publish rate, a progress line).
//! - [`NatsCluster`]: three routed servers with JetStream clustering, for R3 streams and losing a node;
//!   always nats-server 2.9.21 or newer ([`nats_cluster_server_bin`]: `$NATS_CLUSTER_SERVER_BIN` when
//!   `$NATS_SERVER_BIN` is older, since older servers do not serialize guarded writes on a cluster).
//!
//! The binary is `$NATS_SERVER_BIN`, else `nats-server` on `PATH` (`scripts/install-test-deps` installs both
//! supported versions).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(feature = "kube")]
pub mod kube;
pub mod measure;
mod nats;

pub use nats::{
    CLUSTER_OLDEST_VERSION, NatsCluster, NatsServer, nats_cluster_server_bin, nats_server_bin,
    nats_server_version,
};

/// Retries `op` every 200 ms for up to 20 s (a cluster electing leaders after losing a node), then panics
/// with the last error.
pub async fn eventually<T, E, F>(what: &str, mut op: impl FnMut() -> F) -> T
where
    E: std::fmt::Debug,
    F: std::future::Future<Output = Result<T, E>>,
{
    let mut last = None;
    for _ in 0..100 {
        match op().await {
            Ok(value) => return value,
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
    panic!("{what} kept failing: {last:?}");
}
