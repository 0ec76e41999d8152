//! The engine's entry point: connect, ensure the topology, build the shared [`EngineCtx`], and start
//! every loop from it in one place ([`Engine::start`]) until shutdown:
//!
//! | loop | module | runs when |
//! |---|---|---|
//! | `intake` | [`crate::intake`] | always |
//! | `projector` | `taskpods_projections::projector` | always |
//! | `gateway` | [`crate::gateway`] | always |
//! | `timers` | [`crate::timers`] | `timers.enabled` |
//! | `executor` | [`crate::executor`] over the configured backend (local, Kubernetes or no-op) | a backend is configured |
//! | `kubernetes watcher`, `reconciler` | [`crate::executor::kubernetes`] | the backend is Kubernetes |
//!
//! Every loop is `run(ctx, its config, ...)` and stops when `ctx.shutdown` is cancelled.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::EngineConfig;
use crate::context::EngineCtx;
use crate::credentials::TaskCredentials;
use crate::executor::kubernetes::reconciler::{self, ReconcilerConfig};
use crate::executor::kubernetes::throttle::Throttle;
use crate::executor::kubernetes::{KubernetesBackend, watcher};
use crate::executor::noop::{AgentLink, NoopBackend};
use crate::executor::{self, BackendConfig, local::LocalBackend};
use crate::files;
use crate::gateway;
use crate::held::HeldTasks;
use crate::http::ops::EngineProbe;
use crate::intake::{self, IntakeStats};
use crate::seal::Sealer;
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
    /// The seal key could not be read.
    #[error(transparent)]
    SealKey(#[from] taskpods_auth::material::SealKeyError),
    /// Without a seal key, no ephemeral one could be made.
    #[error("cannot make an ephemeral seal key")]
    EphemeralSealKey(#[source] crate::seal::SealError),
    /// A URL is not a NATS URL.
    #[error("invalid NATS URL {0:?}")]
    BadUrl(String),
    /// The streams or buckets could not be set up.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The Kubernetes client could not be configured (no in-cluster configuration or kubeconfig).
    #[error("kubernetes backend: {0}")]
    Kubernetes(#[source] kube::Error),
    /// The web UI could not be started.
    #[error("web UI")]
    Http(#[source] crate::http::HttpError),
    /// Replicated streams and buckets (`--replicas` > 1, a cluster) on a nats-server that does not
    /// serialize writes expecting the same last subject sequence there (before 2.9.21, nats-server #4320):
    /// two guarded writes could both succeed, and several engines would lose events, view updates and the
    /// lease. Refused rather than run unsafely.
    #[error(
        "--replicas {replicas} needs nats-server 2.9.21 or newer, and this one is {version}: older servers \
         let two writes expecting the same last subject sequence both succeed on a replicated stream \
         (nats-server #4320), so engines would lose events and view updates; upgrade the cluster"
    )]
    ServerTooOldForReplicas {
        /// The configured stream and bucket replicas.
        replicas: usize,
        /// The version the server reported.
        version: String,
    },
    /// One of the engine's loops failed.
    #[error("engine loop failed: {0}")]
    Loop(#[from] LoopError),
    /// Inputs and artifacts at their per-task caps would not fit in a task pod's `/tmp` (they both live
    /// there, beside the code's own scratch space).
    #[error(
        "inputs ({inputs} bytes) and artifacts ({artifacts} bytes) at their caps need more than three quarters of the pods' /tmp ({tmp} bytes): lower the caps or raise the /tmp size"
    )]
    FilesDoNotFit {
        /// The cap on a task's inputs.
        inputs: u64,
        /// The cap on a task's artifacts.
        artifacts: u64,
        /// The pods' `/tmp` size.
        tmp: u64,
    },
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
        let mut options = async_nats::ConnectOptions::new()
            .name("taskpods-engine")
            .event_callback(|event| async move {
                let metrics = &crate::metrics::METRICS;
                match event {
                    async_nats::Event::Connected => {
                        // The first connection is made before this callback exists; every later
                        // `Connected` is a reconnect.
                        metrics.nats_reconnects.inc();
                        metrics.nats_connected.set(1);
                        info!("NATS connection re-established; loops resume");
                    }
                    async_nats::Event::Disconnected => {
                        metrics.nats_connected.set(0);
                        warn!(
                            "NATS connection lost: commands and events wait in the streams, \
                             the client reconnects on its own"
                        );
                    }
                    async_nats::Event::SlowConsumer(sid) => {
                        metrics.nats_slow_consumers.inc();
                        warn!(sid, "NATS slow consumer: a subscription fell behind");
                    }
                    _ => {}
                }
            });
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
            Ok(client) => {
                crate::metrics::METRICS.nats_connected.set(1);
                return Ok(client);
            }
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

/// Runs a start-up step until it succeeds, retrying JetStream failures (a NATS node down, a stream leader
/// being elected) for up to `within`; a conflicting configuration is reported at once.
async fn until_reachable<T, F>(
    within: Duration,
    mut step: impl FnMut() -> F,
) -> Result<T, TopologyError>
where
    F: Future<Output = Result<T, TopologyError>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut delay = Duration::from_millis(200);
    loop {
        match step().await {
            Err(e @ TopologyError::JetStream { .. })
                if tokio::time::Instant::now() + delay < deadline =>
            {
                warn!(error = %e, "streams and buckets not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// Why one of the engine's loops stopped: the loop's own error, kept as the cause.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// The command intake failed.
    #[error("intake: {0}")]
    Intake(#[from] intake::IntakeError),
    /// The projector failed.
    #[error("projector: {0}")]
    Projector(#[from] taskpods_projections::projector::ProjectorError),
    /// The agent gateway failed.
    #[error("gateway: {0}")]
    Gateway(#[from] gateway::GatewayError),
    /// The timers failed.
    #[error("timers: {0}")]
    Timers(#[from] timers::TimersError),
    /// The files loop failed.
    #[error("files: {0}")]
    Files(#[from] files::FilesError),
    /// The executor failed.
    #[error("executor: {0}")]
    Executor(#[from] executor::ExecutorError),
    /// The Kubernetes watcher failed.
    #[error("kubernetes watcher: {0}")]
    Watcher(#[from] watcher::WatchError),
    /// The reconciler failed.
    #[error("reconciler: {0}")]
    Reconciler(#[from] reconciler::ReconcileError),
    /// The web UI's server failed.
    #[error("web UI: {0}")]
    Http(#[from] crate::http::HttpError),
    /// A loop returned without being asked to stop.
    #[error("{0} stopped unexpectedly")]
    Stopped(&'static str),
    /// A loop panicked (or was aborted).
    #[error("a loop panicked: {0}")]
    Panicked(#[source] tokio::task::JoinError),
    /// No loop is running.
    #[error("no loops running")]
    NoLoops,
}

/// How long past the shutdown grace loops get to return (their hand-over naks, the lease release) before
/// they are aborted.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(2);

/// The engine's loops, each named, ending with its result.
type Loops = JoinSet<(&'static str, Result<(), LoopError>)>;

/// Starts `work` as the loop `name`.
fn spawn<E: Into<LoopError>>(
    loops: &mut Loops,
    probe: &Arc<EngineProbe>,
    name: &'static str,
    work: impl Future<Output = Result<(), E>> + Send + 'static,
) {
    let probe = probe.clone();
    loops.spawn(async move {
        let result = work.await.map_err(Into::into);
        // /healthz reports a stopped loop: the process should be restarted.
        probe.loop_stopped(name);
        (name, result)
    });
}

/// A running engine: its loops, the context they share, and counters.
#[derive(Debug)]
pub struct Engine {
    ctx: Arc<EngineCtx>,
    loops: Loops,
    /// Command intake counters.
    pub intake_stats: Arc<IntakeStats>,
    /// Agent gateway counters.
    pub gateway_stats: Arc<gateway::GatewayStats>,
    /// Projector counters.
    pub projector_stats: Arc<taskpods_projections::ProjectorStats>,
    ui_url: Option<String>,
}

impl Engine {
    /// Connects, ensures the topology and starts every loop.
    pub async fn start(config: EngineConfig) -> Result<Self, ServerError> {
        if let BackendConfig::Kubernetes(kubernetes) = &config.backend {
            let files = config.intake.policy.files;
            if !files.fits_in(kubernetes.job.tmp_bytes) {
                return Err(ServerError::FilesDoNotFit {
                    inputs: files.max_input_bytes,
                    artifacts: files.max_artifact_bytes,
                    tmp: kubernetes.job.tmp_bytes,
                });
            }
        }
        let nats = connect_as(
            &config.nats_urls,
            config.nats_creds.as_deref(),
            config.connect_timeout,
        )
        .await?;
        let version = nats.server_info().version;
        if config.topology.replicas > 1 && !serializes_expected_sequences(&version) {
            return Err(ServerError::ServerTooOldForReplicas {
                replicas: config.topology.replicas,
                version,
            });
        }
        let task_credentials = TaskCredentials::load(&config.auth, &config.topology.names)?;
        if config.nats_creds.is_some()
            && task_credentials.is_none()
            && !matches!(config.backend, BackendConfig::None)
        {
            return Err(ServerError::NoTaskSigner);
        }
        let js = jetstream::new(nats.clone());
        let topology = until_reachable(config.connect_timeout, || {
            topology::ensure(&js, &config.topology)
        })
        .await?;
        let sealer = match &config.auth.seal_key {
            Some(path) => Sealer::new(&taskpods_auth::material::read_seal_key(path)?),
            None => {
                warn!(
                    "no seal key (--seal-key): env values are sealed with a key that dies with this \
                     process; tasks accepted before a restart cannot get their env back"
                );
                Sealer::ephemeral().map_err(ServerError::EphemeralSealKey)?
            }
        };
        let store = EventStore::new(js.clone(), topology.events.clone(), topology.names.clone())
            .with_sealer(Arc::new(sealer))
            .with_engine(&config.engine_id);
        let ctx = Arc::new(EngineCtx {
            nats,
            js,
            store,
            buckets: taskpods_projections::BucketSettings {
                replicas: config.topology.replicas,
                storage: config.topology.storage,
            },
            topology,
            clock: config.clock.clone(),
            shutdown: CancellationToken::new(),
            engine_id: config.engine_id.clone(),
            shutdown_grace: config.shutdown_grace,
            held: crate::held::HeldGauges::default(),
            result_grace: config.timers.result_grace,
        });
        let mut intake_config = config.intake.clone();
        // Only the Kubernetes backend can hand a task values from Kubernetes Secrets.
        intake_config.policy.allow_secret_env =
            matches!(config.backend, BackendConfig::Kubernetes(_));
        let intake_stats = Arc::new(IntakeStats::default());
        let gateway_stats = Arc::new(gateway::GatewayStats::default());
        let mut loops = Loops::new();
        let projector_stats = Arc::new(taskpods_projections::ProjectorStats::default());
        let probe = Arc::new(
            EngineProbe::new(intake_stats.clone()).with_projector(projector_stats.clone()),
        );

        spawn(
            &mut loops,
            &probe,
            "intake",
            intake::run(ctx.clone(), intake_config, intake_stats.clone()),
        );
        // The projector folds events into the KV views; it retries transient failures itself, so it
        // only ends at shutdown (or when the event stream is missing, which `ensure` just ruled out).
        let projector = taskpods_projections::ProjectorConfig {
            names: ctx.names().clone(),
            buckets: ctx.buckets,
            ..taskpods_projections::ProjectorConfig::default()
        };
        spawn(
            &mut loops,
            &probe,
            "projector",
            taskpods_projections::projector::run(
                ctx.js.clone(),
                projector,
                projector_stats.clone(),
                ctx.shutdown.clone(),
            ),
        );
        spawn(
            &mut loops,
            &probe,
            "gateway",
            gateway::run(ctx.clone(), config.gateway.clone(), gateway_stats.clone()),
        );
        let bucket = until_reachable(config.connect_timeout, || async {
            ctx.js
                .get_object_store(ctx.names().files_bucket())
                .await
                .map_err(|e| TopologyError::JetStream {
                    operation: "open bucket",
                    name: ctx.names().files_bucket(),
                    source: e.into(),
                })
        })
        .await?;
        spawn(
            &mut loops,
            &probe,
            "files",
            files::run(ctx.clone(), bucket, config.files.clone()),
        );
        if config.timers.enabled {
            spawn(
                &mut loops,
                &probe,
                "timers",
                timers::run(ctx.clone(), config.timers.clone()),
            );
        }
        match &config.backend {
            BackendConfig::None => {}
            BackendConfig::Local(local) => {
                let backend =
                    LocalBackend::new(local.clone(), ctx.names().clone(), &config.nats_urls)
                        .with_task_credentials(task_credentials.clone());
                spawn(
                    &mut loops,
                    &probe,
                    "executor",
                    executor::run(ctx.clone(), Arc::new(backend), config.executor.clone()),
                );
            }
            BackendConfig::Noop(noop) => {
                let link = AgentLink::connect(&config.nats_urls, task_credentials.clone())
                    .await
                    .map_err(|source| ServerError::Connect {
                        urls: config.nats_urls.join(","),
                        timeout: config.connect_timeout,
                        source,
                    })?;
                let backend = NoopBackend::new(ctx.clone(), link, noop.clone());
                spawn(
                    &mut loops,
                    &probe,
                    "executor",
                    executor::run(ctx.clone(), Arc::new(backend), config.executor.clone()),
                );
            }
            BackendConfig::Kubernetes(kubernetes) => {
                let client = kubernetes.client().await.map_err(ServerError::Kubernetes)?;
                let mut kubernetes = kubernetes.clone();
                // The agents must speak the same subjects as this engine.
                kubernetes.job.prefix = ctx.names().prefix().to_owned();
                let backend = KubernetesBackend::new(
                    client.clone(),
                    kubernetes.job.clone(),
                    kubernetes.stop_timeout,
                )
                .with_task_credentials(task_credentials.clone())
                .with_throttle(Throttle::new(kubernetes.api_qps, kubernetes.api_burst));
                spawn(
                    &mut loops,
                    &probe,
                    "executor",
                    executor::run(
                        ctx.clone(),
                        Arc::new(backend.clone()),
                        config.executor.clone(),
                    ),
                );
                let reconciler = ReconcilerConfig::for_backend(&kubernetes, &ctx.engine_id);
                spawn(
                    &mut loops,
                    &probe,
                    "kubernetes watcher",
                    watcher::run(ctx.clone(), client, kubernetes),
                );
                spawn(
                    &mut loops,
                    &probe,
                    "reconciler",
                    reconciler::run(ctx.clone(), backend, reconciler),
                );
            }
        }

        let mut ui_url = None;
        if let Some(http) = &config.http {
            let server = crate::http::HttpServer::bind(http.clone())
                .await
                .map_err(ServerError::Http)?;
            ui_url = Some(server.url());
            info!(url = %server.url(), "web UI");
            spawn(
                &mut loops,
                &probe,
                "http",
                server.run(
                    ctx.nats.clone(),
                    ctx.names().clone(),
                    Some(probe.clone()),
                    ctx.shutdown.clone(),
                ),
            );
        }

        info!(
            engine = %ctx.engine_id,
            prefix = %ctx.names(),
            events = %ctx.names().event_stream(),
            "engine running"
        );
        Ok(Self {
            ctx,
            loops,
            intake_stats,
            gateway_stats,
            projector_stats,
            ui_url,
        })
    }

    /// How many tasks each of the engine's per-task structures holds now ([`crate::held`]): with no
    /// task live (every one ended, its sandbox gone), all zero.
    pub fn held_tasks(&self) -> HeldTasks {
        self.ctx.held.snapshot(
            self.ctx.store.latest().len() as u64,
            self.projector_stats
                .cached_tasks
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// The web UI's URL, when it is served.
    pub fn ui_url(&self) -> Option<&str> {
        self.ui_url.as_deref()
    }

    /// The streams and buckets in use.
    pub fn topology(&self) -> &Topology {
        &self.ctx.topology
    }

    /// What this engine's event store has read (whole-history reads of tasks).
    pub fn store_stats(&self) -> &Arc<crate::store::StoreStats> {
        self.ctx.store.stats()
    }

    /// This replica's name (in its leases and in the `Taskpods-Engine` header of its events).
    pub fn engine_id(&self) -> &str {
        &self.ctx.engine_id
    }

    /// Stops taking new work, lets every loop finish (or hand back) the work in hand within the
    /// shutdown grace, releases the lease, and flushes. A loop still running a little after the grace
    /// (a NATS call that hangs) is aborted: what it had not acked is redelivered to another replica.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        info!(engine = %self.ctx.engine_id, grace = ?self.ctx.shutdown_grace, "stopping: no new work, finishing or handing over the work in hand");
        self.ctx.shutdown.cancel();
        let mut failed = None;
        let until = tokio::time::Instant::now() + self.ctx.shutdown_grace + SHUTDOWN_MARGIN;
        loop {
            let joined = tokio::select! {
                joined = self.loops.join_next() => joined,
                () = tokio::time::sleep_until(until) => {
                    warn!(loops = self.loops.len(), "loops still running after the shutdown grace; aborting them (their unacked work is redelivered)");
                    self.loops.abort_all();
                    break;
                }
            };
            match joined {
                None => break,
                Some(Ok((_, Ok(())))) => {}
                Some(Ok((_, Err(e)))) => failed = Some(e),
                Some(Err(e)) => failed = Some(LoopError::Panicked(e)),
            }
        }
        let _ = tokio::time::timeout(SHUTDOWN_MARGIN, self.ctx.nats.flush()).await;
        info!(engine = %self.ctx.engine_id, "stopped");
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
            Some(Ok((_, Err(e)))) => ServerError::Loop(e),
            Some(Ok((name, Ok(())))) => ServerError::Loop(LoopError::Stopped(name)),
            Some(Err(e)) => ServerError::Loop(LoopError::Panicked(e)),
            None => ServerError::Loop(LoopError::NoLoops),
        }
    }
}

/// Runs the engine until `shutdown` is cancelled or a loop fails.
pub async fn run(config: EngineConfig, shutdown: CancellationToken) -> Result<(), ServerError> {
    let mut engine = Engine::start(config).await?;
    if let Some(url) = engine.ui_url() {
        println!("taskpods web UI: {url}");
    }
    info!("engine running (Ctrl-C to stop)");
    tokio::select! {
        () = shutdown.cancelled() => {
            info!("shutting down");
            engine.shutdown().await
        }
        error = engine.failed() => Err(error),
    }
}

/// An error and its causes, joined with `: ` (the loops report text until they share one error type).
pub fn error_chain_text(e: &dyn std::error::Error) -> String {
    let mut out = vec![e.to_string()];
    let mut source = e.source();
    while let Some(cause) = source {
        out.push(cause.to_string());
        source = cause.source();
    }
    out.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::kubernetes::KubernetesConfig;

    #[tokio::test]
    async fn file_caps_that_do_not_fit_the_pods_tmp_stop_the_engine_before_it_starts() {
        let mut kubernetes = KubernetesConfig::default();
        kubernetes.job.tmp_bytes = 16 << 20;
        let config = EngineConfig {
            // Nothing listens here: the check comes before any connection.
            nats_urls: vec!["nats://127.0.0.1:1".to_owned()],
            backend: BackendConfig::Kubernetes(kubernetes),
            ..EngineConfig::default()
        };
        match Engine::start(config).await {
            Err(ServerError::FilesDoNotFit {
                inputs,
                artifacts,
                tmp,
            }) => assert_eq!((inputs, artifacts, tmp), (64 << 20, 64 << 20, 16 << 20)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn replicated_streams_on_a_server_before_2_9_21_stop_the_engine_before_it_starts() {
        // One server cannot hold R3 streams anyway; what matters is which error comes first.
        let server = taskpods_harness::NatsServer::start();
        let version = taskpods_harness::nats_server_version();
        let config = EngineConfig {
            nats_urls: vec![server.url()],
            connect_timeout: Duration::from_secs(2),
            topology: crate::topology::TopologyConfig {
                replicas: 3,
                ..Default::default()
            },
            ..EngineConfig::default()
        };
        let outcome = Engine::start(config).await;
        if serializes_expected_sequences(&version) {
            // A fixed server is not refused for its version: the engine goes on to the streams.
            match outcome {
                Err(ServerError::ServerTooOldForReplicas { .. }) => {
                    panic!("nats-server {version} refused: {outcome:?}")
                }
                Ok(engine) => engine.shutdown().await.expect("shutdown"),
                Err(_) => {}
            }
        } else {
            match outcome {
                Err(e @ ServerError::ServerTooOldForReplicas { .. }) => {
                    let text = e.to_string();
                    assert!(text.contains(&version), "{text}");
                    assert!(text.contains("2.9.21"), "{text}");
                }
                other => panic!("nats-server {version} with --replicas 3: {other:?}"),
            }
        }
    }
}

/// Whether a nats-server of `version` checks `Nats-Expected-Last-Subject-Sequence` as part of a
/// replicated stream's consensus. Before 2.9.21 it was only a pre-check on the leader, so two concurrent
/// writes expecting the same sequence could both be stored (nats-server issue #4320, fixed by #4319):
/// the guarded writes several engines rely on (view commits, event appends, the lease) then lose updates.
/// An unparsable version is given the benefit of the doubt.
pub fn serializes_expected_sequences(version: &str) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u64>());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor)), Some(Ok(patch))) => (major, minor, patch) >= (2, 9, 21),
        _ => true,
    }
}

#[cfg(test)]
mod expected_sequence_tests {
    use super::serializes_expected_sequences;

    #[test]
    fn servers_before_2_9_21_do_not_serialize_expected_sequences_on_a_cluster() {
        for old in ["2.9.10", "v2.9.20", "2.8.4"] {
            assert!(!serializes_expected_sequences(old), "{old}");
        }
        for fixed in ["2.9.21", "2.10.0", "v2.12.15", "2.11.0-beta.1", "garbage"] {
            assert!(serializes_expected_sequences(fixed), "{fixed}");
        }
    }
}
