//! `taskpods serve`: run the engine until Ctrl-C or SIGTERM.

use std::process::ExitCode;
use std::time::Duration;

use crate::cli::Global;
use crate::config::EngineConfig;
use crate::config_file::{self, ConfigFileError};
use crate::executor::kubernetes::KubernetesConfig;
use crate::executor::{BackendConfig, local::LocalConfig, noop::NoopConfig};
use crate::server;
use crate::telemetry;
use tokio_util::sync::CancellationToken;

/// Arguments of `taskpods serve`. Each flag, when given, wins over the configuration file; the file
/// (with its `TASKPODS__…` overrides) wins over the embedded defaults.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The configuration file (TOML; `taskpods config dump` prints every key with its default).
    #[arg(long, env = "TASKPODS_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Replicas for streams and buckets (3 on a cluster; default 1).
    #[arg(long, env = "TASKPODS_REPLICAS")]
    pub replicas: Option<usize>,
    /// Seconds to keep trying to reach NATS at start-up (default 30).
    #[arg(long)]
    pub connect_timeout_secs: Option<u64>,
    /// Where tasks run: `local` (sandboxed processes on this machine; the default), `kubernetes` (a
    /// hardened Job per task, in-cluster configuration or ~/.kube/config), `noop` (benchmarks and tests:
    /// no code runs, each task's life is played in-process) or `none` (no executor).
    #[arg(long, env = "TASKPODS_BACKEND", value_enum)]
    pub backend: Option<BackendKind>,
    /// The agent binary for the local backend (default: `taskpods-agent` next to this binary).
    #[arg(long, env = "TASKPODS_AGENT_BIN")]
    pub agent_bin: Option<std::path::PathBuf>,
    /// Kubernetes backend: the namespace task Jobs run in (default `baker-tasks`; see deploy/).
    #[arg(long, env = "TASKPODS_NAMESPACE")]
    pub namespace: Option<String>,
    /// The task signer (`task-signer.nk` from `taskpods auth init`): each task's agent gets its own NATS
    /// identity, limited to the task's subjects and expiring after its deadline. Required with --creds.
    #[arg(long, env = "TASKPODS_TASK_SIGNER")]
    pub task_signer: Option<std::path::PathBuf>,
    /// The seal key (`seal.key` from `taskpods auth init`) env values are sealed with in the event log.
    /// Without it a random key is used that dies with the process.
    #[arg(long, env = "TASKPODS_SEAL_KEY")]
    pub seal_key: Option<std::path::PathBuf>,
    /// Kubernetes backend: API requests per second at most, on average (default 0: no limit).
    #[arg(long, env = "TASKPODS_KUBE_QPS")]
    pub kube_qps: Option<f64>,
    /// Kubernetes backend: API requests at once above that rate (default 100).
    #[arg(long, env = "TASKPODS_KUBE_BURST")]
    pub kube_burst: Option<u32>,
    /// Kubernetes backend: the NATS URL task pods connect to (default: the in-cluster NATS service).
    #[arg(long, env = "TASKPODS_AGENT_NATS_URL")]
    pub agent_nats_url: Option<String>,
    /// Do not serve the web UI and JSON API.
    #[arg(long, env = "TASKPODS_NO_UI")]
    pub no_ui: bool,
    #[command(flatten)]
    pub ui: crate::cli::ui::UiArgs,
    /// Hours task inputs and artifacts are kept (the files bucket's max age, default 168; set when the
    /// bucket is created: changing it later is reported as a conflict, not applied).
    #[arg(long, env = "TASKPODS_FILES_MAX_AGE_HOURS")]
    pub files_max_age_hours: Option<u64>,
    /// Delete a task's inputs and artifacts when the task is reaped.
    #[arg(long, env = "TASKPODS_DELETE_FILES_ON_REAP")]
    pub delete_files_on_reap: bool,
}

/// Where tasks run (`--backend`); clap refuses any other value and lists these.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// Sandboxed processes on this machine.
    Local,
    /// A hardened Job per task.
    Kubernetes,
    /// Benchmarks and tests: no code runs; each task's sandbox and agent are played in-process.
    Noop,
    /// No executor.
    None,
}

/// The engine configuration `serve` runs with: defaults, then the global connection flags, then the file
/// and its overrides, then the flags given.
pub fn engine_config(
    global: Global,
    args: ServeArgs,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<EngineConfig, ConfigFileError> {
    let mut config = config_file::serve_defaults();
    config.nats_urls = global.nats_urls;
    config.nats_creds = global.creds;
    config.topology.names = global.names;
    // The UI flags have defaults of their own, so they come before the file: its [http] section wins.
    config.http = Some(args.ui.config());
    config_file::load(args.config.as_deref(), env)?.apply(&mut config);

    if let Some(replicas) = args.replicas {
        config.topology.replicas = replicas;
    }
    if let Some(secs) = args.connect_timeout_secs {
        config.connect_timeout = Duration::from_secs(secs);
    }
    if let Some(hours) = args.files_max_age_hours {
        config.topology.files_max_age = Duration::from_secs(hours.saturating_mul(3600));
    }
    if args.delete_files_on_reap {
        config.files.delete_on_reap = true;
    }
    if args.task_signer.is_some() {
        config.auth.task_signer = args.task_signer;
    }
    if args.seal_key.is_some() {
        config.auth.seal_key = args.seal_key;
    }
    // A backend already configured by the file keeps its settings when the flag names the same kind.
    match args.backend {
        None => {}
        Some(BackendKind::None) => config.backend = BackendConfig::None,
        Some(BackendKind::Local) if !matches!(config.backend, BackendConfig::Local(_)) => {
            config.backend = BackendConfig::Local(LocalConfig::default());
        }
        Some(BackendKind::Kubernetes)
            if !matches!(config.backend, BackendConfig::Kubernetes(_)) =>
        {
            config.backend = BackendConfig::Kubernetes(KubernetesConfig::default());
        }
        Some(BackendKind::Noop) if !matches!(config.backend, BackendConfig::Noop(_)) => {
            config.backend = BackendConfig::Noop(NoopConfig::default());
        }
        Some(BackendKind::Local | BackendKind::Kubernetes | BackendKind::Noop) => {}
    }
    match &mut config.backend {
        BackendConfig::Local(local) => {
            if let Some(bin) = args.agent_bin {
                local.agent_bin = bin;
            }
        }
        BackendConfig::Kubernetes(kubernetes) => {
            if let Some(namespace) = args.namespace {
                kubernetes.job.namespace = namespace;
            }
            if let Some(url) = args.agent_nats_url {
                kubernetes.job.nats_url = url;
            }
            if let Some(qps) = args.kube_qps {
                kubernetes.api_qps = qps;
            }
            if let Some(burst) = args.kube_burst {
                kubernetes.api_burst = burst;
            }
        }
        BackendConfig::Noop(_) | BackendConfig::None => {}
    }
    if args.no_ui {
        config.http = None;
    }
    Ok(config)
}

/// Runs the engine.
pub async fn run(global: Global, args: ServeArgs) -> ExitCode {
    let config = match engine_config(global, args, std::env::vars()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let telemetry = match config
        .telemetry
        .resolve(|name| std::env::var(name).ok())
        .and_then(|export| telemetry::install(export.as_ref()))
    {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {}", server::error_chain_text(&e));
            return ExitCode::from(2);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown_signal().await;
            shutdown.cancel();
        }
    });
    let result = server::run(config, shutdown).await;
    // The exporter blocks while it sends what is left; off the async workers.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", server::error_chain_text(&e));
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
