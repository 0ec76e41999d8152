//! The engine's entry point: connect, ensure the topology, run the loops until shutdown.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, stream::Stream};
use tracing::info;

use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::EngineConfig;
use crate::credentials::TaskCredentials;
use crate::executor::kubernetes::reconciler::{self, ReconcilerConfig};
use crate::executor::kubernetes::{KubernetesBackend, KubernetesConfig, watcher};
use crate::executor::{self, BackendConfig, ExecutorConfig, local::LocalBackend};
use crate::gateway;
use crate::intake::{self, IntakeStats};
use crate::store::EventStore;
use crate::timers;
use crate::topology::{self, Topology, TopologyError};

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
    /// The credentials file could not be read.
    #[error("cannot read the NATS credentials {path}")]
    Credentials {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The task signer could not be loaded.
    #[error(transparent)]
    Signer(#[from] taskpods_auth::SignerError),
    /// The engine authenticates but cannot mint identities for agents, which then could not connect.
    #[error(
        "the engine connects with credentials but has no task signer: agents could not connect \
         (pass --task-signer, the task-signer.nk from `taskpods auth init`)"
    )]
    NoTaskSigner,
    /// A URL is not a NATS URL.
    #[error("invalid NATS URL {0:?}")]
    BadUrl(String),
    /// The streams or buckets could not be set up.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// One of the engine's loops failed.
    #[error("engine loop failed: {0}")]
    Loop(String),
}

/// Connects to NATS without credentials, retrying until `timeout` (the server may be starting alongside
/// us).
pub async fn connect(
    urls: &[String],
    timeout: Duration,
) -> Result<async_nats::Client, ServerError> {
    connect_as(urls, None, timeout).await
}

/// Connects to NATS with the credentials file `creds` (when given), retrying until `timeout`.
pub async fn connect_as(
    urls: &[String],
    creds: Option<&std::path::Path>,
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
        let mut options = async_nats::ConnectOptions::new().name("taskpods-engine");
        if let Some(creds) = creds {
            // A missing or malformed file is a configuration error: no point in retrying.
            options = options.credentials_file(creds).await.map_err(|source| {
                ServerError::Credentials {
                    path: creds.display().to_string(),
                    source,
                }
            })?;
        }
        match options.connect(addrs.clone()).await {
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

/// A running engine: its loops, their shared shutdown token, and counters.
#[derive(Debug)]
pub struct Engine {
    client: async_nats::Client,
    topology: Topology,
    shutdown: CancellationToken,
    loops: JoinSet<(&'static str, Result<(), String>)>,
    /// Command intake counters.
    pub intake_stats: Arc<IntakeStats>,
    /// Agent gateway counters.
    pub gateway_stats: Arc<gateway::GatewayStats>,
}

impl Engine {
    /// Connects, ensures the topology and starts every loop.
    pub async fn start(config: EngineConfig) -> Result<Self, ServerError> {
        let client = connect_as(
            &config.nats_urls,
            config.nats_creds.as_deref(),
            config.connect_timeout,
        )
        .await?;
        let task_credentials = TaskCredentials::load(&config.auth, &config.topology.names)?;
        if config.nats_creds.is_some()
            && task_credentials.is_none()
            && !matches!(config.backend, BackendConfig::None)
        {
            return Err(ServerError::NoTaskSigner);
        }
        let js = jetstream::new(client.clone());
        let topology = topology::ensure(&js, &config.topology).await?;
        let store = EventStore::new(js.clone(), topology.events.clone(), topology.names.clone());
        let shutdown = CancellationToken::new();
        let intake_stats = Arc::new(IntakeStats::default());
        let gateway_stats = Arc::new(gateway::GatewayStats::default());
        let mut loops = JoinSet::new();

        loops.spawn({
            let (js, client, commands, store) = (
                js.clone(),
                client.clone(),
                topology.commands.clone(),
                store.clone(),
            );
            let (config, stats, shutdown) = (
                config.intake.clone(),
                intake_stats.clone(),
                shutdown.clone(),
            );
            async move {
                let result =
                    intake::run(js, client, commands, store, config, stats, shutdown).await;
                ("intake", result.map_err(|e| e.to_string()))
            }
        });

        // The projector folds events into the KV views; it retries transient failures itself, so it
        // only ends at shutdown (or when the event stream is missing, which `ensure` just ruled out).
        loops.spawn({
            let js = js.clone();
            let projector = taskpods_projections::ProjectorConfig {
                names: topology.names.clone(),
                buckets: taskpods_projections::BucketSettings {
                    replicas: config.topology.replicas,
                    storage: config.topology.storage,
                },
                ..taskpods_projections::ProjectorConfig::default()
            };
            let shutdown = shutdown.clone();
            async move {
                let stats = Arc::new(taskpods_projections::ProjectorStats::default());
                let result = taskpods_projections::projector::run(
                    js,
                    projector,
                    stats,
                    shutdown.cancelled_owned(),
                )
                .await;
                ("projector", result.map_err(|e| e.to_string()))
            }
        });

        loops.spawn({
            let (client, store, events, config, stats, shutdown) = (
                client.clone(),
                store.clone(),
                topology.events.clone(),
                config.gateway.clone(),
                gateway_stats.clone(),
                shutdown.clone(),
            );
            async move {
                let result = gateway::run(client, store, events, config, stats, shutdown).await;
                ("gateway", result.map_err(|e| e.to_string()))
            }
        });
        if config.timers.enabled {
            let (store, events, timers_config, shutdown) = (
                store.clone(),
                topology.events.clone(),
                config.timers.clone(),
                shutdown.clone(),
            );
            loops.spawn(async move {
                let clock = timers::wall_clock();
                let result = timers::run(store, events, timers_config, clock, shutdown).await;
                ("timers", result)
            });
        }
        if let BackendConfig::Local(local) = &config.backend {
            let backend = Arc::new(
                LocalBackend::new(local.clone(), topology.names.clone(), &config.nats_urls)
                    .with_task_credentials(task_credentials.clone()),
            );
            let (store, events, executor, shutdown) = (
                store.clone(),
                topology.events.clone(),
                config.executor.clone(),
                shutdown.clone(),
            );
            loops.spawn(async move {
                let result = executor::run(backend, store, events, executor, shutdown).await;
                ("executor", result.map_err(|e| e.to_string()))
            });
        }
        if let BackendConfig::Kubernetes(kube_config) = &config.backend {
            let buckets = taskpods_projections::BucketSettings {
                replicas: config.topology.replicas,
                storage: config.topology.storage,
            };
            spawn_kubernetes_loops(
                &mut loops,
                kube_config,
                KubernetesShared {
                    js: js.clone(),
                    store: store.clone(),
                    events: topology.events.clone(),
                    executor: config.executor.clone(),
                    buckets,
                    shutdown: shutdown.clone(),
                },
            )
            .await
            .map_err(|e| ServerError::Loop(format!("kubernetes backend: {e}")))?;
        }

        info!(
            prefix = %topology.names,
            events = %topology.names.event_stream(),
            "engine running"
        );
        Ok(Self {
            client,
            topology,
            shutdown,
            loops,
            intake_stats,
            gateway_stats,
        })
    }

    /// The streams and buckets in use.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Stops every loop, lets them finish the work in hand, and flushes.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        self.shutdown.cancel();
        let mut failed = None;
        while let Some(joined) = self.loops.join_next().await {
            match joined {
                Ok((_, Ok(()))) => {}
                Ok((name, Err(e))) => failed = Some(format!("{name}: {e}")),
                Err(e) => failed = Some(e.to_string()),
            }
        }
        self.client.flush().await.ok();
        failed.map_or(Ok(()), |e| Err(ServerError::Loop(e)))
    }

    /// Stops every loop at once, mid-work, as a crash would (for fault tests): nothing is acked or
    /// flushed beyond what already was.
    pub fn abort(mut self) {
        self.loops.abort_all();
    }

    /// Completes when a loop stops on its own (an error the engine cannot continue past).
    pub async fn failed(&mut self) -> ServerError {
        match self.loops.join_next().await {
            Some(Ok((name, Err(e)))) => ServerError::Loop(format!("{name}: {e}")),
            Some(Ok((name, Ok(())))) => ServerError::Loop(format!("{name} stopped unexpectedly")),
            Some(Err(e)) => ServerError::Loop(e.to_string()),
            None => ServerError::Loop("no loops running".into()),
        }
    }
}

/// What the Kubernetes loops share with the rest of the engine.
#[derive(Debug)]
struct KubernetesShared {
    /// JetStream (the reconciler's lease and the live-task view).
    js: jetstream::Context,
    /// The event store.
    store: EventStore,
    /// The event stream the executor consumes.
    events: Stream,
    /// Executor settings.
    executor: ExecutorConfig,
    /// Replicas and storage for the lease bucket.
    buckets: taskpods_projections::BucketSettings,
    /// The engine's shutdown signal.
    shutdown: CancellationToken,
}

/// Starts the executor over Kubernetes, the watcher and the reconciler in `loops`.
async fn spawn_kubernetes_loops(
    loops: &mut JoinSet<(&'static str, Result<(), String>)>,
    config: &KubernetesConfig,
    shared: KubernetesShared,
) -> Result<(), kube::Error> {
    let client = config.client().await?;
    let mut config = config.clone();
    // The agents must speak the same subjects as this engine.
    config.job.prefix = shared.store.names().prefix().to_owned();
    let backend = KubernetesBackend::new(client.clone(), config.job.clone(), config.stop_timeout);

    loops.spawn({
        let (backend, store, events, executor, shutdown) = (
            Arc::new(backend.clone()),
            shared.store.clone(),
            shared.events.clone(),
            shared.executor.clone(),
            shared.shutdown.clone(),
        );
        async move {
            let result = executor::run(backend, store, events, executor, shutdown).await;
            ("executor", result.map_err(|e| e.to_string()))
        }
    });
    loops.spawn({
        let (client, store, config, shutdown) = (
            client.clone(),
            shared.store.clone(),
            config.clone(),
            shared.shutdown.clone(),
        );
        async move {
            let result = watcher::run(client, store, config, shutdown).await;
            ("kubernetes watcher", result.map_err(|e| e.to_string()))
        }
    });
    let holder = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .map_or_else(
            || format!("engine-{}", uuid::Uuid::now_v7()),
            |h| format!("{h}-{}", uuid::Uuid::now_v7()),
        );
    let reconciler_config = ReconcilerConfig {
        holder,
        interval: config.reconcile_interval,
        lease_ttl: config.lease_ttl,
        buckets: shared.buckets,
        orphan_grace: config.orphan_grace,
    };
    let namespace = config.job.namespace.clone();
    loops.spawn(async move {
        let result = reconciler::run(
            shared.js,
            shared.store,
            client,
            backend,
            namespace,
            reconciler_config,
            shared.shutdown,
        )
        .await;
        ("reconciler", result.map_err(|e| e.to_string()))
    });
    Ok(())
}

/// Runs the engine until `shutdown` completes or a loop fails.
pub async fn run(
    config: EngineConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let mut engine = Engine::start(config).await?;
    info!("engine running (Ctrl-C to stop)");
    tokio::select! {
        () = shutdown => {
            info!("shutting down");
            engine.shutdown().await
        }
        error = engine.failed() => Err(error),
    }
}
