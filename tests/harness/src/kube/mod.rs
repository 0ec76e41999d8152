//! A real Kubernetes control plane for tests, plus a node simulator that plays the kubelet.
//!
//! Layout:
//! - [`binaries`]: where the pinned `etcd`, `kube-apiserver` and `kube-controller-manager` live (built
//!   once by `tests/kube-env/build.sh` from the Go modules pinned in `tests/kube-env/go.mod`).
//! - [`pki`]: the CA, serving and client certificates and the service-account signing key, made with the
//!   `openssl` command line tool into the control plane's temporary directory.
//! - [`process`]: child processes with log files, killed on drop, plus a janitor that cleans up after a
//!   test binary that exits without running destructors (the shared instance lives in a `static`).
//! - [`control_plane`]: [`ControlPlane`] starts etcd, the API server (RBAC, PodSecurity admission) and the
//!   controller manager on loopback ports, waits until they serve, writes a kubeconfig and hands out
//!   clients; [`ControlPlane::shared`] gives one instance to a whole test binary.
//! - [`node`]: [`NodeSimulator`] registers a Ready node, binds pending pods to it and runs each pod's
//!   containers as local processes, reporting their status the way a kubelet would, so the real Job
//!   controller computes Job status from it. Faults (OOM kill, image pull failure, eviction) on request.
//!   Each container runs under bubblewrap with the pod's volumes mounted at their `mountPath`s.
//! - `volumes` (private): makes a pod's `emptyDir`, `secret`, `configMap`, `downwardAPI` and `projected`
//!   (incl. `serviceAccountToken` through the TokenRequest API) volumes on the host, and the bubblewrap
//!   arguments that mount them, so in-cluster clients (kube-rs's `Config::incluster`) work in a pod.
//!
//! Nothing here imitates the API server: every request goes to the real one built from upstream source.
//!
//! Typical use in a test (the binaries must have been built by `tests/kube-env/build.sh`):
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use taskpods_harness::kube::{ControlPlane, NodeSimulator, create_namespace};
//!
//! let cp = ControlPlane::shared()?; // one per test binary
//! let client = cp.client().await?; // one per test (clients belong to the test's runtime)
//! let restricted = [("pod-security.kubernetes.io/enforce", "restricted")];
//! create_namespace(&client, "baker-tasks", &restricted).await?;
//! let sim = NodeSimulator::builder(client.clone())
//!     .namespace("baker-tasks")
//!     .image("ghcr.invalid/taskpods/agent", "/path/to/taskpods-agent")
//!     .api_server(cp.server_url())
//!     .start()
//!     .await?;
//! // ... create Jobs through the engine, then assert on Job/Pod status and sim.logs(...)
//! # drop(sim);
//! # Ok(())
//! # }
//! ```

pub mod binaries;
pub mod control_plane;
pub mod node;
pub mod pki;
pub mod process;
mod volumes;

// Re-exported so test crates use exactly the client versions the harness was built with, without
// depending on them (and compiling them) when the `kube` feature is off.
pub use ::kube;
pub use k8s_openapi;

pub use binaries::KubeBinaries;
pub use control_plane::{ControlPlane, create_namespace};
pub use node::{FAULT_ANNOTATION, Fault, NodeSimulator};

use std::path::PathBuf;

/// Everything that can go wrong while bringing up or driving the test cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The control plane binaries are not in the cache; `tests/kube-env/build.sh` builds them.
    #[error(
        "Kubernetes binaries not found in {dir}: run tests/kube-env/build.sh first ({missing} is missing)"
    )]
    BinariesMissing {
        /// Directory that was searched.
        dir: PathBuf,
        /// The first binary that was not there.
        missing: String,
    },
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the harness was doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An `openssl` invocation exited unsuccessfully.
    #[error("openssl {args} failed: {stderr}")]
    Openssl {
        /// The arguments it was called with.
        args: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A control plane component exited while the harness was waiting for it.
    #[error("{component} exited early ({status}); last log lines:\n{log_tail}")]
    ComponentExited {
        /// Which component.
        component: String,
        /// Its exit status.
        status: String,
        /// The end of its log file, which usually names the cause.
        log_tail: String,
    },
    /// A bounded wait ran out.
    #[error("timed out after {seconds}s waiting for {what}{}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long the harness waited.
        seconds: u64,
        /// The last error or log lines seen, if any.
        detail: Option<String>,
    },
    /// The kubeconfig the harness wrote could not be turned into a client configuration.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// A request to the API server failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A pod's spec asks for something the simulator cannot run (e.g. no command and no image mapping).
    #[error("pod {pod}: {reason}")]
    Unrunnable {
        /// `namespace/name` of the pod.
        pod: String,
        /// Why it cannot be run.
        reason: String,
    },
    /// The shared control plane failed to start earlier in this test binary.
    #[error("shared control plane failed to start: {0}")]
    Shared(String),
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
