//! Jobs per second with the Kubernetes backend, next to the raw create rate of the same API server.
//!
//! Against the test control plane (real etcd, kube-apiserver and kube-controller-manager, started here)
//! and the node simulator running our real agent for each pod:
//! - raw: `JOBS` Jobs (built by the engine's own Job builder) created straight through the `kube` client,
//!   as many at once as the executor's concurrency, through the same [`Throttle`] settings the engine
//!   uses; in a namespace without a node, so nothing else loads the API server;
//! - engine: `JOBS` tasks launched through NATS, with the engine's Kubernetes backend; Jobs/s is tasks
//!   launched until the last `scheduled` event (its Job created), and the run goes on until every task is
//!   reaped (its pod ran the agent, the Job was deleted) for lifecycles/s with Kubernetes.
//!
//! `TASKPODS_KUBE_BIN=~/.cache/taskpods/kube-v1.37.2/bin cargo bench -p taskpods-integration --features
//! kube --bench kube` (`JOBS`, default 200; `KUBE_QPS`/`KUBE_BURST`, the executor's API limit, default
//! no limit / 100; `NATS_SERVER_BIN` picks the server). Goal from the issue: >= 100 Jobs/s and >= 0.5 of
//! the raw create rate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use serde_json::json;
use taskpods_client::{Client as TaskClient, ClientConfig};
use taskpods_engine::config::EngineConfig;
use taskpods_engine::executor::kubernetes::job::{self, JobConfig};
use taskpods_engine::executor::kubernetes::throttle::Throttle;
use taskpods_engine::executor::kubernetes::{KubeClient, KubernetesConfig};
use taskpods_engine::executor::{BackendConfig, ExecutorConfig};
use taskpods_engine::server::Engine;
use taskpods_events::codec::HEADER_KIND;
use taskpods_events::{LaunchPolicy, LaunchTask, Names, TaskId};
use taskpods_harness::NatsServer;
use taskpods_harness::kube::{ControlPlane, NodeSimulator, create_namespace, k8s_openapi, kube};
use taskpods_harness::measure::{self, Latencies};

const AGENT_IMAGE: &str = "registry.invalid/taskpods/agent:v1";

#[tokio::main]
async fn main() {
    let jobs: usize = measure::env_or("JOBS", 200);
    let qps: f64 = measure::env_or("KUBE_QPS", 0.0);
    let burst: u32 = measure::env_or("KUBE_BURST", 100);
    let concurrency = ExecutorConfig::default().concurrency;
    let cp = ControlPlane::start()
        .await
        .expect("control plane starts (run tests/kube-env/build.sh, export TASKPODS_KUBE_BIN)");
    println!(
        "{} · Kubernetes {} · API limit {} · executor concurrency {concurrency}",
        measure::machine_line(),
        cp.version(),
        if qps > 0.0 {
            format!("{qps} QPS, burst {burst}")
        } else {
            "none".to_owned()
        }
    );
    let admin = cp.client().await.expect("admin client");

    // Raw: the API server's create rate with the same client, concurrency and limit.
    create_namespace(&admin, "bench-raw", &[])
        .await
        .expect("namespace");
    let raw = raw_creates(&admin, jobs, concurrency, Throttle::new(qps, burst)).await;
    println!(
        "raw kube client Job creates: {jobs} in {:.2} s = {raw:>7.1}/s",
        jobs as f64 / raw
    );

    // The engine, with a simulated node running the agent.
    let ns = "bench-engine";
    create_namespace(&admin, ns, &[]).await.expect("namespace");
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": JobConfig::default().service_account}}))
            .unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .expect("task service account");
    let sim = NodeSimulator::builder(admin.clone())
        .node_name("sim-bench")
        .namespace(ns)
        .api_server(cp.server_url())
        .image("registry.invalid/taskpods/agent", agent_for_pods())
        .capacity("1000", "1000Gi")
        .start()
        .await
        .expect("node simulator");
    let server = NatsServer::start();
    let mut config = EngineConfig {
        nats_urls: vec![server.url()],
        backend: BackendConfig::Kubernetes(KubernetesConfig {
            job: job_config(ns, &server.url()),
            client: Some(KubeClient(admin.clone())),
            startup_timeout: Duration::from_secs(120),
            api_qps: qps,
            api_burst: burst,
            ..KubernetesConfig::default()
        }),
        executor: ExecutorConfig {
            reap_grace: Duration::ZERO,
            ..ExecutorConfig::default()
        },
        ..EngineConfig::default()
    };
    config.intake.policy = policy();
    let engine = Engine::start(config).await.expect("engine");
    let nats = server.connect().await;
    let names = Names::default();
    let mut events = nats.subscribe(names.events_all()).await.expect("subscribe");
    let tasks = TaskClient::new(
        nats.clone(),
        ClientConfig {
            reply_timeout: Duration::from_secs(60),
            ..ClientConfig::default()
        },
    );

    let started = Instant::now();
    let mut launched_at = std::collections::HashMap::new();
    let mut launches = futures::stream::iter(0..jobs)
        .map(|_| {
            let tasks = tasks.clone();
            async move {
                let id = TaskId::mint();
                tasks
                    .launch(LaunchTask {
                        task_id: Some(id.0),
                        ..LaunchTask::script("echo kube benchmark")
                    })
                    .await
                    .expect("launch");
                (id, Instant::now())
            }
        })
        .buffer_unordered(64);
    // Launch and watch at once: Jobs are created while later tasks are still being launched.
    let mut scheduled: HashSet<String> = HashSet::new();
    let mut reaped: HashSet<String> = HashSet::new();
    let mut create_latency = Latencies::new();
    let mut scheduled_at = None;
    let mut progress = measure::Progress::new("tasks scheduled / reaped", jobs as u64 * 2);
    let deadline = started + Duration::from_secs(600);
    let mut launching = true;
    while reaped.len() < jobs && Instant::now() < deadline {
        tokio::select! {
            next = launches.next(), if launching => match next {
                Some((id, at)) => { launched_at.insert(id.to_string(), at); }
                None => launching = false,
            },
            Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), events.next()) => {
                let task = m.subject.as_str().rsplit('.').next().unwrap_or_default().to_owned();
                match m.headers.as_ref().and_then(|h| h.get(HEADER_KIND)).map(|k| k.as_str()) {
                    Some("scheduled") => {
                        if let Some(at) = launched_at.get(&task) {
                            create_latency.record(at.elapsed());
                        }
                        scheduled.insert(task);
                        if scheduled.len() == jobs {
                            scheduled_at = Some(started.elapsed());
                        }
                    }
                    Some("reaped") => {
                        reaped.insert(task);
                    }
                    _ => {}
                }
                progress.update((scheduled.len() + reaped.len()) as u64);
            }
            // Nothing arrived for 5 s and nothing is left to launch: check the deadline again.
            else => {}
        }
    }
    progress.finish();
    let total = started.elapsed();
    let engine_rate = scheduled_at.map_or(scheduled.len() as f64 / total.as_secs_f64(), |t| {
        jobs as f64 / t.as_secs_f64()
    });
    println!(
        "engine Jobs created (launch → scheduled): {} of {jobs} in {:.2} s = {engine_rate:>7.1}/s = {:.2}x raw ({} from launch reply to scheduled)",
        scheduled.len(),
        scheduled_at.unwrap_or(total).as_secs_f64(),
        engine_rate / raw,
        create_latency.summary()
    );
    println!(
        "engine lifecycles with Kubernetes (launch → pod ran the agent → Job reaped): {} of {jobs} in {:.2} s = {:.1}/s",
        reaped.len(),
        total.as_secs_f64(),
        reaped.len() as f64 / total.as_secs_f64()
    );
    println!(
        "summary: Jobs {engine_rate:.1}/s (goal >= 100/s), raw creates {raw:.1}/s, ratio {:.2} (goal >= 0.5) · load average {}",
        engine_rate / raw,
        measure::load_average()
    );
    engine.shutdown().await.expect("shutdown");
    sim.shutdown().await.expect("simulator");
}

/// Any image, the agent's image as the default toolbox, small requests (many pods on one node).
fn policy() -> LaunchPolicy {
    let mut policy = LaunchPolicy {
        allow_any_image: true,
        default_cpu_millis: 10,
        default_memory_bytes: 16 << 20,
        ..LaunchPolicy::default()
    };
    policy
        .toolboxes
        .insert("default".to_owned(), AGENT_IMAGE.to_owned());
    policy
}

fn job_config(ns: &str, nats_url: &str) -> JobConfig {
    JobConfig {
        namespace: ns.to_owned(),
        nats_url: nats_url.to_owned(),
        task_credentials: false,
        // Room for the default input and artifact caps (the engine refuses to start otherwise).
        tmp_bytes: 256 << 20,
        termination_grace_secs: 2,
        image_pull_policy: "IfNotPresent".to_owned(),
        ..JobConfig::default()
    }
}

/// Creates `n` Jobs in `bench-raw`, `concurrency` at once through `throttle`; creates per second.
async fn raw_creates(
    client: &kube::Client,
    n: usize,
    concurrency: usize,
    throttle: Throttle,
) -> f64 {
    let jobs: Api<Job> = Api::namespaced(client.clone(), "bench-raw");
    let config = job_config("bench-raw", "nats://127.0.0.1:4222");
    let spec = LaunchTask::script("echo raw")
        .validate(&policy())
        .expect("a valid spec");
    let deadline = chrono::Utc::now() + chrono::TimeDelta::minutes(10);
    let started = Instant::now();
    let mut creates = futures::stream::iter(0..n)
        .map(|_| {
            let (jobs, throttle) = (jobs.clone(), throttle.clone());
            let job = job::build(TaskId::mint(), &spec, deadline, &config);
            async move {
                throttle.acquire().await;
                jobs.create(&PostParams::default(), &job)
                    .await
                    .expect("create Job");
            }
        })
        .buffer_unordered(concurrency);
    while creates.next().await.is_some() {}
    n as f64 / started.elapsed().as_secs_f64()
}

/// The agent binary, copied where the simulator's pods may execute it (as the kube tests do).
fn agent_for_pods() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join("taskpods-kube-agent-bench");
    std::fs::create_dir_all(&dir).expect("agent dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("dir mode");
    let staging = dir.join(format!("taskpods-agent.{}", std::process::id()));
    std::fs::copy(env!("CARGO_BIN_EXE_taskpods-agent-under-test"), &staging)
        .expect("copy the agent");
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755)).expect("agent mode");
    let copy = dir.join("taskpods-agent");
    std::fs::rename(&staging, &copy).expect("agent in place");
    copy
}
