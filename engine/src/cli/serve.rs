//! `taskpods serve`: run the engine until Ctrl-C or SIGTERM.

use std::process::ExitCode;
use std::time::Duration;

use crate::cli::Global;
use crate::config::EngineConfig;
use crate::credentials::AuthConfig;
use crate::executor::kubernetes::KubernetesConfig;
use crate::executor::{BackendConfig, local::LocalConfig};
use crate::server;
use crate::topology::TopologyConfig;

/// Arguments of `taskpods serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Replicas for streams and buckets (3 on a cluster).
    #[arg(long, env = "TASKPODS_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
    /// Seconds to keep trying to reach NATS at start-up.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout_secs: u64,
    /// Where tasks run: `local` (sandboxed processes on this machine), `kubernetes` (a hardened Job per
    /// task, in-cluster configuration or ~/.kube/config) or `none` (no executor).
    #[arg(long, env = "TASKPODS_BACKEND", default_value = "local")]
    pub backend: String,
    /// The agent binary for the local backend (default: `taskpods-agent` next to this binary).
    #[arg(long, env = "TASKPODS_AGENT_BIN")]
    pub agent_bin: Option<std::path::PathBuf>,
    /// Kubernetes backend: the namespace task Jobs run in (see deploy/).
    #[arg(long, env = "TASKPODS_NAMESPACE", default_value = "baker-tasks")]
    pub namespace: String,
    /// The task signer (`task-signer.nk` from `taskpods auth init`): each task's agent gets its own NATS
    /// identity, limited to the task's subjects and expiring after its deadline. Required with --creds.
    #[arg(long, env = "TASKPODS_TASK_SIGNER")]
    pub task_signer: Option<std::path::PathBuf>,
    /// Kubernetes backend: the NATS URL task pods connect to (default: the in-cluster NATS service).
    #[arg(long, env = "TASKPODS_AGENT_NATS_URL")]
    pub agent_nats_url: Option<String>,
}

/// Runs the engine.
pub async fn run(global: Global, args: ServeArgs) -> ExitCode {
    let config = EngineConfig {
        nats_urls: global.nats_urls,
        nats_creds: global.creds,
        auth: AuthConfig {
            task_signer: args.task_signer,
            ..AuthConfig::default()
        },
        connect_timeout: Duration::from_secs(args.connect_timeout_secs),
        topology: TopologyConfig {
            names: global.names,
            replicas: args.replicas,
            ..TopologyConfig::default()
        },
        backend: match args.backend.as_str() {
            "local" => {
                let mut local = LocalConfig::default();
                if let Some(bin) = args.agent_bin {
                    local.agent_bin = bin;
                }
                BackendConfig::Local(local)
            }
            "kubernetes" => {
                let mut kubernetes = KubernetesConfig::default();
                kubernetes.job.namespace = args.namespace;
                if let Some(url) = args.agent_nats_url {
                    kubernetes.job.nats_url = url;
                }
                BackendConfig::Kubernetes(kubernetes)
            }
            "none" => BackendConfig::None,
            other => {
                eprintln!("error: unknown backend {other:?}: use local, kubernetes or none");
                return ExitCode::from(2);
            }
        },
        ..EngineConfig::default()
    };
    match server::run(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
