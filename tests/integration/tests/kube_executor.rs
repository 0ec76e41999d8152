//! The Kubernetes executor end to end: a real nats-server, the engine with the Kubernetes backend (executor,
//! watcher, reconciler) running under the Role from `deploy/` (a ServiceAccount token, not the admin), the
//! real API server, Job controller and garbage collector, and the node simulator running our real agent as
//! the task pod's container.
//!
//! Each test gets its own namespace (set up from `deploy/`, rewritten to that namespace), its own node
//! simulator, NATS server and engine, so tests run in parallel. Short startup/exit/reconcile settings keep
//! them quick. Needs the binaries built by `tests/kube-env/build.sh` (the tests fail naming the script
//! otherwise, never skip) and PyYAML to read `deploy/` (the validators' virtualenv from
//! `scripts/install-test-deps` has it; else the system's python3).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, ResourceQuota, Secret, ServiceAccount};
use kube::api::{DeleteParams, DynamicObject, ListParams, PostParams};
use kube::discovery::ApiResource;
use kube::{Api, Client};
use serde_json::json;
use taskpods_client::{Client as TaskClient, ClientConfig};
use taskpods_engine::config::EngineConfig;
use taskpods_engine::executor::kubernetes::job::{self, JobConfig, TASK_LABEL};
use taskpods_engine::executor::kubernetes::{KubeClient, KubernetesBackend, KubernetesConfig};
use taskpods_engine::executor::{Backend, BackendConfig, ExecutorConfig};
use taskpods_engine::gateway::GatewayConfig;
use taskpods_engine::server::Engine;
use taskpods_events::files::FileLimits;
use taskpods_events::{EventBody, FailureReason, LaunchPolicy, LaunchTask, TaskId, TaskState};
use taskpods_harness::NatsServer;
use taskpods_harness::kube::{
    ControlPlane, Fault, NodeSimulator, create_namespace, k8s_openapi, kube,
};
use taskpods_integration as fixtures;

const AGENT_IMAGE: &str = "registry.invalid/taskpods/agent:v1";
/// How long a task may take to reach a state. Generous: twenty-odd tests share one control plane (its
/// garbage collector removes a deleted Job's pods) and the CI machine's two cores; a task that is quick
/// alone (about 6 s for an evicted pod) once took over 60 s there.
const WAIT: Duration = Duration::from_secs(120);
/// Where task pods find the attack tool (the simulator shows it in every container).
const ATTACK_TOOL: &str = "/usr/local/bin/taskpods-nats-attack";
/// How long past its deadline a task's identity lasts in the secured tests.
const GRACE: Duration = Duration::from_secs(1);

/// The manifests of `deploy/tasks/` (the task namespace), as JSON objects.
fn deploy_manifests() -> Vec<serde_json::Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/tasks");
    // The validators' virtualenv (scripts/install-test-deps) has PyYAML for sure; else the system's python3.
    let venv = std::env::var_os("TASKPODS_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/taskpods")))
        .map(|cache| cache.join("validators/bin/python"))
        .filter(|p| p.exists());
    let out = std::process::Command::new(venv.unwrap_or_else(|| "python3".into()))
        .arg("-c")
        .arg(
            "import glob, json, sys, yaml\n\
             docs = []\n\
             for f in sorted(glob.glob(sys.argv[1] + '/*.yaml')):\n\
             \x20   if f.endswith('/kustomization.yaml'): continue\n\
             \x20   docs += [d for d in yaml.safe_load_all(open(f)) if d]\n\
             print(json.dumps(docs))",
        )
        .arg(&dir)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "reading deploy/ needs python3 with PyYAML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

struct Setup {
    ns: String,
    admin: Client,
    engine_client: Client,
    sim: NodeSimulator,
    server: NatsServer,
    engine: Option<Engine>,
    tasks: TaskClient,
}

impl Setup {
    /// A namespace set up from `deploy/`, the engine's ServiceAccount bound by its Role, a simulated node.
    async fn namespace(ns: &str) -> (Client, Client, NodeSimulator) {
        let cp = ControlPlane::shared()
            .expect("control plane starts (run tests/kube-env/build.sh first)");
        let admin = cp.client().await.expect("admin client");
        let manifests = deploy_manifests();
        let namespace = manifests
            .iter()
            .find(|m| m["kind"] == "Namespace")
            .expect("deploy/ has the namespace");
        let labels: Vec<(String, String)> = namespace["metadata"]["labels"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        let labels: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        create_namespace(&admin, ns, &labels)
            .await
            .expect("namespace");
        // The engine's ServiceAccount lives in the engine's namespace in production; here, in the test's.
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "taskpods-engine"}})).unwrap();
        Api::<ServiceAccount>::namespaced(admin.clone(), ns)
            .create(&PostParams::default(), &sa)
            .await
            .expect("engine service account");
        for mut m in manifests.into_iter().filter(|m| m["kind"] != "Namespace") {
            m["metadata"]["namespace"] = json!(ns);
            if m["kind"] == "RoleBinding" {
                for s in m["subjects"].as_array_mut().unwrap() {
                    s["namespace"] = json!(ns);
                }
            }
            let (group, version) = match m["apiVersion"].as_str().unwrap().split_once('/') {
                Some((g, v)) => (g.to_owned(), v.to_owned()),
                None => (String::new(), m["apiVersion"].as_str().unwrap().to_owned()),
            };
            let kind = m["kind"].as_str().unwrap().to_owned();
            let gvk = kube::api::GroupVersionKind::gvk(&group, &version, &kind);
            let plural = format!("{}s", kind.to_lowercase()).replace("policys", "policies");
            let resource = ApiResource::from_gvk_with_plural(&gvk, &plural);
            let object: DynamicObject = serde_json::from_value(m).unwrap();
            Api::<DynamicObject>::namespaced_with(admin.clone(), ns, &resource)
                .create(&PostParams::default(), &object)
                .await
                .unwrap_or_else(|e| panic!("apply {kind}: {e}"));
        }
        // The quota admits pods only once the quota controller has computed its status.
        let quotas = Api::<ResourceQuota>::namespaced(admin.clone(), ns);
        wait_for("quota status", || async {
            quotas
                .get("taskpods-tasks")
                .await
                .ok()
                .and_then(|q| q.status?.hard)
        })
        .await;

        let request =
            serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))
                .unwrap();
        let token = Api::<ServiceAccount>::namespaced(admin.clone(), ns)
            .create_token_request("taskpods-engine", &PostParams::default(), &request)
            .await
            .expect("token")
            .status
            .and_then(|s| s.token)
            .expect("token issued");
        let engine_client = cp.client_with_token(&token).await.expect("engine client");
        // The authorizer learns of the new RoleBinding through its informer: wait until it applies, so
        // the engine's first create is not refused (a refusal fails the task, as it should).
        let engine_jobs = Api::<Job>::namespaced(engine_client.clone(), ns);
        wait_for("the engine's Role to apply", || async {
            engine_jobs.list(&ListParams::default()).await.ok()
        })
        .await;
        let sim = NodeSimulator::builder(admin.clone())
            .node_name(format!("sim-{ns}"))
            .namespace(ns)
            .api_server(cp.server_url())
            .image("registry.invalid/taskpods/agent", agent_for_pods())
            .file(ATTACK_TOOL, env!("CARGO_BIN_EXE_taskpods-nats-attack"))
            .start()
            .await
            .expect("node simulator");
        (admin, engine_client, sim)
    }

    async fn start(ns: &str) -> Self {
        Self::start_with(ns, |_| {}).await
    }

    /// Like [`Setup::start`], against nats-server with authorization as deployed: the engine with its
    /// own identity and the task signer (so each task pod gets its own credentials Secret), the test's
    /// client as a Brain.
    async fn start_secured(ns: &str) -> Self {
        Self::start_on(ns, NatsServer::start_secured(), |config, server| {
            let auth = server.auth_dir();
            config.nats_creds = Some(server.creds("engine"));
            config.auth = taskpods_engine::credentials::AuthConfig {
                task_signer: Some(auth.join(taskpods_auth::material::files::TASK_SIGNER)),
                seal_key: Some(auth.join(taskpods_auth::material::files::SEAL_KEY)),
                task_credentials_grace: GRACE,
                ..Default::default()
            };
        })
        .await
    }

    /// Like [`Setup::start`], with the engine's configuration adjusted by `tweak`.
    async fn start_with(ns: &str, tweak: impl FnOnce(&mut EngineConfig)) -> Self {
        Self::start_on(ns, NatsServer::start(), |config, _| tweak(config)).await
    }

    /// The namespace, the engine (configuration adjusted by `tweak`) on `server`, and a client (a Brain
    /// when the server has authorization).
    async fn start_on(
        ns: &str,
        server: NatsServer,
        tweak: impl FnOnce(&mut EngineConfig, &NatsServer),
    ) -> Self {
        logs();
        let (admin, engine_client, sim) = Self::namespace(ns).await;
        server.wait_for_jetstream().await;
        let mut config = Self::config(ns, &server, &engine_client, true);
        tweak(&mut config, &server);
        let secured = config.nats_creds.is_some();
        let engine = Engine::start(config).await.expect("engine");
        let connection = if secured {
            server.connect_as("brain").await
        } else {
            server.connect().await
        };
        let tasks = TaskClient::new(
            connection,
            ClientConfig {
                reply_timeout: Duration::from_secs(10),
                ..ClientConfig::default()
            },
        );
        Self {
            ns: ns.to_owned(),
            admin,
            engine_client,
            sim,
            server,
            engine: Some(engine),
            tasks,
        }
    }

    fn job_config(ns: &str, server: &NatsServer) -> JobConfig {
        JobConfig {
            namespace: ns.to_owned(),
            nats_url: server.url(),
            // Set by the engine from whether it has a task signer; a backend made directly by a test
            // (no signer) mounts none.
            task_credentials: false,
            tmp_bytes: 16 << 20,
            termination_grace_secs: 2,
            image_pull_policy: "IfNotPresent".to_owned(),
            ..JobConfig::default()
        }
    }

    fn config(ns: &str, server: &NatsServer, client: &Client, kubernetes: bool) -> EngineConfig {
        let mut policy = LaunchPolicy {
            allow_any_image: true,
            max_cpu_millis: 4000,
            default_cpu_millis: 100,
            default_memory_bytes: 64 << 20,
            // Inputs and artifacts live in the pods' 16 MiB /tmp.
            files: FileLimits {
                max_input_bytes: 4 << 20,
                max_artifact_bytes: 4 << 20,
                ..FileLimits::default()
            },
            ..LaunchPolicy::default()
        };
        policy
            .toolboxes
            .insert("default".to_owned(), AGENT_IMAGE.to_owned());
        let mut config = EngineConfig {
            nats_urls: vec![server.url()],
            gateway: GatewayConfig {
                heartbeat_interval: Duration::from_millis(300),
                heartbeat_timeout: Duration::from_secs(5),
                output_cap_bytes: 8 << 20,
                hello_retry_after: Duration::from_millis(100),
                ..GatewayConfig::default()
            },
            executor: ExecutorConfig {
                retry_delay: Duration::from_millis(300),
                reap_grace: Duration::from_secs(3),
                ..ExecutorConfig::default()
            },
            backend: if kubernetes {
                BackendConfig::Kubernetes(KubernetesConfig {
                    job: Self::job_config(ns, server),
                    client: Some(KubeClient(client.clone())),
                    startup_timeout: Duration::from_secs(4),
                    exit_grace: Duration::from_secs(1),
                    stop_timeout: Duration::from_secs(30),
                    reconcile_interval: Duration::from_secs(1),
                    lease_ttl: Duration::from_secs(5),
                    orphan_grace: Duration::from_secs(5),
                    ..KubernetesConfig::default()
                })
            } else {
                BackendConfig::None
            },
            ..EngineConfig::default()
        };
        config.intake.policy = policy;
        config
    }

    fn backend(&self) -> KubernetesBackend {
        KubernetesBackend::new(
            self.engine_client.clone(),
            Self::job_config(&self.ns, &self.server),
            Duration::from_secs(30),
        )
    }

    fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    async fn launch(&self, launch: LaunchTask) -> TaskId {
        self.tasks.launch(launch).await.expect("launch").task_id
    }

    async fn script(&self, script: &str, timeout_secs: u32) -> TaskId {
        fixtures::launch_script(&self.tasks, script, timeout_secs).await
    }

    async fn kinds(&self, task: TaskId) -> Vec<&'static str> {
        fixtures::kinds(&self.tasks, task).await
    }

    async fn state(&self, task: TaskId) -> TaskState {
        fixtures::state(&self.tasks, task).await
    }

    /// Waits until the task has ended and been reaped; returns its final state and event kinds.
    async fn finished(&self, task: TaskId) -> (TaskState, Vec<&'static str>) {
        let until = tokio::time::Instant::now() + WAIT;
        loop {
            let kinds = self.kinds(task).await;
            if kinds.last() == Some(&"reaped") {
                return (self.state(task).await, kinds);
            }
            assert!(
                tokio::time::Instant::now() < until,
                "task {task} not reaped within {WAIT:?}: {kinds:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn until_state(&self, task: TaskId, state: TaskState) {
        fixtures::until_state(&self.tasks, task, state, WAIT).await;
    }

    async fn jobs_of(&self, task: TaskId) -> Vec<Job> {
        self.jobs()
            .list(&ListParams::default().labels(&format!("{TASK_LABEL}={task}")))
            .await
            .unwrap()
            .items
    }

    async fn pods_of(&self, task: TaskId) -> Vec<Pod> {
        Api::<Pod>::namespaced(self.admin.clone(), &self.ns)
            .list(&ListParams::default().labels(&format!("{TASK_LABEL}={task}")))
            .await
            .unwrap()
            .items
    }

    /// Asserts the task's Job and pods are gone (now or within the wait).
    async fn all_gone(&self, task: TaskId) {
        wait_for("Job and pods gone", || async {
            (self.jobs_of(task).await.is_empty() && self.pods_of(task).await.is_empty())
                .then_some(())
        })
        .await;
    }
}

/// The engines' logs on the test's output when `RUST_LOG` is set (e.g. `taskpods_engine=debug`), to keep
/// what led to a failure; nothing otherwise.
fn logs() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .with_ansi(false)
            .try_init();
    }
}

async fn wait_for<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    fixtures::wait_for(what, WAIT, probe).await
}

fn failed(reason: FailureReason) -> TaskState {
    TaskState::Failed { reason }
}

#[tokio::test]
async fn a_task_runs_to_success_in_a_hardened_job_and_is_reaped() {
    let s = Setup::start("kx-success").await;
    // The sleep keeps the Job around long enough to be looked at (it is reaped right after).
    let task = s.script("echo \"hello from $(id -u)\"; sleep 2", 60).await;
    let until = tokio::time::Instant::now() + WAIT;
    let job = loop {
        if let Some(job) = s.jobs_of(task).await.into_iter().next() {
            break job;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no Job for {task}: {:?}",
            s.tasks
                .history(task)
                .await
                .map(|h| h.into_iter().map(|e| e.event.body).collect::<Vec<_>>())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pod = &job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.service_account_name.as_deref(), Some("taskpods-task"));
    let (state, kinds) = s.finished(task).await;
    assert_eq!(state, TaskState::Succeeded, "{kinds:?}");
    assert_eq!(kinds.first(), Some(&"accepted"));
    assert!(
        kinds.contains(&"scheduled") && kinds.contains(&"running"),
        "{kinds:?}"
    );
    s.all_gone(task).await;
}

#[tokio::test]
async fn a_task_gets_its_input_and_leaves_an_artifact_in_its_pod() {
    let s = Setup::start("kx-files").await;
    let task = TaskId::mint();
    let input = s
        .tasks
        .put_input(task, "numbers.txt", &mut &b"3\n1\n2\n"[..])
        .await
        .expect("put input");
    // In the node simulator the pod's /tmp is its work directory: the script uses the variables.
    let script = r#"sort -n "$TASKPODS_INPUT_DIR/numbers.txt" > "$TASKPODS_OUTPUT_DIR/sorted.txt""#;
    s.launch(LaunchTask {
        task_id: Some(task.0),
        timeout_secs: Some(60),
        inputs: vec![input],
        ..LaunchTask::script(script)
    })
    .await;
    let (state, kinds) = s.finished(task).await;
    assert_eq!(state, TaskState::Succeeded, "{kinds:?}");
    let history = s.tasks.history(task).await.unwrap();
    let outcome = history
        .iter()
        .find_map(|e| match &e.event.body {
            EventBody::Succeeded { outcome } => Some(outcome.clone()),
            _ => None,
        })
        .expect("succeeded");
    let paths: Vec<&str> = outcome.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["sorted.txt"]);
    let mut sorted = Vec::new();
    s.tasks
        .get_artifact(task, "sorted.txt", &mut sorted)
        .await
        .expect("artifact");
    assert_eq!(sorted, b"1\n2\n3\n");
    s.all_gone(task).await;
}

fn spec(script: &str) -> taskpods_events::TaskSpec {
    LaunchTask {
        image: Some(AGENT_IMAGE.into()),
        timeout_secs: Some(60),
        ..LaunchTask::script(script)
    }
    .validate(&LaunchPolicy {
        allow_any_image: true,
        default_cpu_millis: 100,
        default_memory_bytes: 64 << 20,
        ..LaunchPolicy::default()
    })
    .expect("valid spec")
}

#[tokio::test]
async fn the_same_launch_twice_makes_one_job_and_a_repeated_create_adopts() {
    let s = Setup::start("kx-twice").await;
    let launch = LaunchTask {
        idempotency_key: Some("kx-twice-1".into()),
        timeout_secs: Some(60),
        ..LaunchTask::script("sleep 3")
    };
    let a = s.launch(launch.clone()).await;
    let b = s.launch(launch).await;
    assert_eq!(a, b);
    let job = wait_for("the Job", || async {
        s.jobs_of(a).await.into_iter().next()
    })
    .await;
    let uid = job.metadata.uid.clone();
    // The effect itself, repeated (a redelivered event, a second replica): adopts, never a second Job.
    let backend = s.backend();
    let deadline = chrono::Utc::now() + chrono::TimeDelta::seconds(60);
    for _ in 0..2 {
        let name = backend
            .create(a, &spec("sleep 3"), deadline)
            .await
            .expect("adopt");
        assert_eq!(name, a.job_name());
    }
    let jobs = s.jobs_of(a).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].metadata.uid, uid, "the same Job, not a replacement");
    let (state, kinds) = s.finished(a).await;
    assert_eq!(state, TaskState::Succeeded, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "scheduled").count(), 1);
    s.all_gone(a).await;

    // A Job under the task's name but labelled for another task is never adopted.
    let other = TaskId::from_idempotency_key("kx-twice-other");
    let mut foreign = taskpods_engine::executor::kubernetes::job::build(
        other,
        &spec("true"),
        deadline,
        &Setup::job_config(&s.ns, &s.server),
    );
    foreign
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(TASK_LABEL.into(), a.to_string());
    foreign
        .spec
        .as_mut()
        .unwrap()
        .template
        .metadata
        .as_mut()
        .unwrap()
        .labels
        .as_mut()
        .unwrap()
        .insert(TASK_LABEL.into(), a.to_string());
    s.jobs()
        .create(&PostParams::default(), &foreign)
        .await
        .expect("foreign job");
    let err = backend
        .create(other, &spec("true"), deadline)
        .await
        .expect_err("must not adopt another task's Job");
    assert!(
        !err.retryable && err.message.contains("refusing to adopt"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_job_created_by_an_engine_that_crashed_before_recording_it_is_adopted() {
    let CrashedCreate {
        admin,
        engine_client,
        _sim,
        server,
        first,
        tasks,
        task,
    } = job_created_before_a_crash("kx-adopt", "echo adopted", 60).await;
    let jobs: Api<Job> = Api::namespaced(admin.clone(), "kx-adopt");
    let uid = jobs.get(&task.job_name()).await.unwrap().metadata.uid;
    first.abort();

    let engine = Engine::start(Setup::config("kx-adopt", &server, &engine_client, true))
        .await
        .expect("restarted engine");
    let until = tokio::time::Instant::now() + WAIT;
    let kinds = loop {
        let kinds: Vec<&str> = tasks
            .history(task)
            .await
            .unwrap()
            .iter()
            .map(|e| e.event.body.kind())
            .collect();
        if kinds.last() == Some(&"reaped") {
            break kinds;
        }
        if let Ok(Some(j)) = jobs.get_opt(&task.job_name()).await {
            assert_eq!(j.metadata.uid, uid, "never a second Job");
        }
        assert!(tokio::time::Instant::now() < until, "{kinds:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        tasks.get(task).await.unwrap().task.state,
        TaskState::Succeeded,
        "{kinds:?}"
    );
    assert_eq!(kinds.iter().filter(|k| **k == "scheduled").count(), 1);
    engine.shutdown().await.ok();
}

#[tokio::test]
async fn a_job_deleted_behind_our_back_fails_the_task_with_job_lost() {
    let s = Setup::start("kx-lost").await;
    let task = s.script("echo up; sleep 300", 120).await;
    s.until_state(task, TaskState::Running).await;
    s.jobs()
        .delete(&task.job_name(), &DeleteParams::background())
        .await
        .expect("delete behind the engine's back");
    let (state, kinds) = s.finished(task).await;
    assert_eq!(state, failed(FailureReason::JobLost), "{kinds:?}");
    s.all_gone(task).await;
}

#[tokio::test]
async fn exit_code_3_fails_with_non_zero_exit_3() {
    let s = Setup::start("kx-exit").await;
    let task = s.script("echo failing >&2; exit 3", 60).await;
    let (state, kinds) = s.finished(task).await;
    assert_eq!(
        state,
        failed(FailureReason::NonZeroExit { exit_code: 3 }),
        "{kinds:?}"
    );
    s.all_gone(task).await;
}

#[tokio::test]
async fn cancel_while_running_cancels_and_the_job_is_gone() {
    let s = Setup::start("kx-cancel").await;
    let task = s.script("echo working; sleep 300", 120).await;
    s.until_state(task, TaskState::Running).await;
    s.tasks
        .cancel(task, Some("test".into()))
        .await
        .expect("cancel");
    s.until_state(task, TaskState::Cancelled).await;
    // Cancelled is recorded only once the pod is gone (the Job alone vanishes first).
    assert!(
        s.pods_of(task).await.is_empty(),
        "cancelled while the pod is still there"
    );
    let (state, kinds) = s.finished(task).await;
    assert_eq!(state, TaskState::Cancelled, "{kinds:?}");
    assert!(kinds.contains(&"cancel_requested"), "{kinds:?}");
    s.all_gone(task).await;
    assert!(s.sim.running().is_empty(), "{:?}", s.sim.running());
}

#[tokio::test]
async fn past_its_deadline_a_task_times_out_and_its_job_is_gone() {
    let s = Setup::start("kx-deadline").await;
    let task = s.script("echo sleeping; sleep 300", 3).await;
    let (state, _) = s.finished(task).await;
    let timeline: Vec<String> = s
        .tasks
        .history(task)
        .await
        .unwrap()
        .iter()
        .map(|e| format!("{} {:?}", e.event.at.format("%H:%M:%S%.3f"), e.event.body))
        .collect();
    assert_eq!(state, TaskState::TimedOut, "{timeline:#?}");
    s.all_gone(task).await;
}

#[tokio::test]
async fn oom_kill_and_image_pull_failure_are_mapped_to_their_reasons() {
    let s = Setup::start("kx-faults").await;
    let oom = TaskId::from_idempotency_key("kx-faults-oom");
    let pull = TaskId::from_idempotency_key("kx-faults-pull");
    s.sim.inject(
        BTreeMap::from([(TASK_LABEL.to_owned(), oom.to_string())]),
        Fault::OomKilled,
    );
    s.sim.inject(
        BTreeMap::from([(TASK_LABEL.to_owned(), pull.to_string())]),
        Fault::ImagePull,
    );
    for key in ["kx-faults-oom", "kx-faults-pull"] {
        s.launch(LaunchTask {
            idempotency_key: Some(key.into()),
            timeout_secs: Some(120),
            ..LaunchTask::script("sleep 300")
        })
        .await;
    }
    let (state, kinds) = s.finished(oom).await;
    assert_eq!(state, failed(FailureReason::OomKilled), "{kinds:?}");
    let (state, kinds) = s.finished(pull).await;
    assert_eq!(state, failed(FailureReason::ImagePull), "{kinds:?}");
    s.all_gone(oom).await;
    s.all_gone(pull).await;
}

#[tokio::test]
async fn an_exhausted_quota_fails_the_task_with_quota_exceeded_not_a_hang() {
    let s = Setup::start("kx-quota").await;
    let full: ResourceQuota = serde_json::from_value(
        json!({"metadata": {"name": "full"}, "spec": {"hard": {"pods": "0"}}}),
    )
    .unwrap();
    let quotas = Api::<ResourceQuota>::namespaced(s.admin.clone(), &s.ns);
    quotas
        .create(&PostParams::default(), &full)
        .await
        .expect("quota");
    wait_for("quota status", || async {
        quotas.get("full").await.ok().and_then(|q| q.status?.hard)
    })
    .await;
    let task = s.script("echo never", 120).await;
    let (state, kinds) = s.finished(task).await;
    assert_eq!(state, failed(FailureReason::QuotaExceeded), "{kinds:?}");
    let history = s.tasks.history(task).await.unwrap();
    let text = format!(
        "{:?}",
        history.iter().map(|e| &e.event.body).collect::<Vec<_>>()
    );
    assert!(text.contains("exceeded quota"), "{text}");
    s.all_gone(task).await;
}

#[tokio::test]
async fn an_orphan_job_left_by_a_crash_is_reaped_by_the_reconciler() {
    let mut s = Setup::start("kx-orphan").await;
    // A Job with our labels for a task the log does not know, left while no engine ran (its engine
    // crashed, its stream was lost): by the time an engine is back, the Job controller has made its pod.
    s.engine.take().expect("engine").abort();
    let orphan = TaskId::from_idempotency_key("kx-orphan-1");
    let deadline = chrono::Utc::now() + chrono::TimeDelta::seconds(60);
    s.backend()
        .create(orphan, &spec("sleep 300"), deadline)
        .await
        .expect("orphan Job");
    wait_for("the orphan's pod", || async {
        (!s.pods_of(orphan).await.is_empty()).then_some(())
    })
    .await;
    let restarted = Engine::start(Setup::config(&s.ns, &s.server, &s.engine_client, true))
        .await
        .expect("restarted engine");
    s.engine = Some(restarted);
    s.all_gone(orphan).await;
    // And a live task alongside is left alone.
    let task = s.script("echo fine", 60).await;
    let (state, _) = s.finished(task).await;
    assert_eq!(state, TaskState::Succeeded);
}

#[tokio::test]
async fn an_evicted_pod_fails_the_task_as_evicted() {
    let s = Setup::start("kx-evict").await;
    let task = TaskId::from_idempotency_key("kx-evict-1");
    s.sim.inject(
        BTreeMap::from([(TASK_LABEL.to_owned(), task.to_string())]),
        Fault::Evicted,
    );
    s.launch(LaunchTask {
        idempotency_key: Some("kx-evict-1".into()),
        timeout_secs: Some(120),
        ..LaunchTask::script("sleep 300")
    })
    .await;
    let (state, kinds) = s.finished(task).await;
    assert_eq!(state, failed(FailureReason::Evicted), "{kinds:?}");
    s.all_gone(task).await;
    // The eviction killed the pod's processes: the agent and the code it ran (`sleep 300`).
    taskpods_integration::until_no_process_with_env(&format!("TASKPODS_TASK_ID={task}"), WAIT)
        .await;
}

/// A pod its node never removes (the node acts on no deletion, as one whose kubelet lost contact with
/// the API server) holds a cancelled task only while it runs: once the pod has ended (here the node
/// evicts it) it runs nothing, the task is cancelled and, past the stop timeout, reaped with the pod
/// still there, `Terminating`. Before, the reap waited for the pod to go, for ever.
#[tokio::test]
async fn a_pod_its_node_never_removes_holds_the_cancel_only_while_it_runs() {
    let stop_timeout = Duration::from_secs(3);
    let s = Setup::start_with("kx-unremoved", |config| {
        if let BackendConfig::Kubernetes(kubernetes) = &mut config.backend {
            kubernetes.stop_timeout = stop_timeout;
        }
    })
    .await;
    s.sim.keep_deleted_pods(true);
    let task = s.script("echo working; sleep 300", 120).await;
    s.until_state(task, TaskState::Running).await;
    s.tasks.cancel(task, None).await.expect("cancel");
    let pod = wait_for("the pod deleted, still there", || async {
        s.pods_of(task)
            .await
            .into_iter()
            .find(|p| p.metadata.deletion_timestamp.is_some())
    })
    .await;
    // Two stop timeouts with the pod running: the task must still be cancelling (nothing says the
    // pod stopped), however slow the machine.
    tokio::time::sleep(stop_timeout * 2).await;
    assert_eq!(s.state(task).await, TaskState::Cancelling);
    assert!(!processes_of(task).is_empty(), "the pod still runs");
    let name = pod.metadata.name.clone().unwrap();
    assert!(s.sim.evict(&s.ns, &name), "the simulator runs the pod");
    let (state, kinds) = s.finished(task).await;
    assert_eq!(state, TaskState::Cancelled, "{kinds:?}");
    let pods = s.pods_of(task).await;
    assert_eq!(pods.len(), 1, "the pod is still there: {pods:?}");
    assert_eq!(
        pods[0].status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Failed")
    );
    taskpods_integration::until_no_process_with_env(&format!("TASKPODS_TASK_ID={task}"), WAIT)
        .await;
    // The node is back: a force deletion removes the pod.
    s.sim.keep_deleted_pods(false);
    Api::<Pod>::namespaced(s.admin.clone(), &s.ns)
        .delete(&name, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    s.all_gone(task).await;
}

/// Processes carrying `task`'s id in their environment (the agent and its code, in a pod too).
fn processes_of(task: TaskId) -> Vec<u32> {
    taskpods_integration::processes_with_env(&format!("TASKPODS_TASK_ID={task}"))
}

/// A launch no node can take (3 CPUs; the simulated node has 2).
fn too_big(script: &str) -> LaunchTask {
    LaunchTask {
        timeout_secs: Some(120),
        resources: taskpods_events::command::ResourceRequest {
            cpu_request: Some("3".into()),
            cpu_limit: Some("3".into()),
            ..Default::default()
        },
        ..LaunchTask::script(script)
    }
}

#[tokio::test]
async fn a_task_no_node_can_take_fails_as_unschedulable_at_its_startup_timeout() {
    let s = Setup::start("kx-unschedulable").await;
    let task = s.launch(too_big("echo never")).await;
    let (state, kinds) = s.finished(task).await;
    assert_eq!(state, failed(FailureReason::Unschedulable), "{kinds:?}");
    assert!(!kinds.contains(&"running"), "{kinds:?}");
    let history = s.tasks.history(task).await.unwrap();
    let text = format!(
        "{:?}",
        history.iter().map(|e| &e.event.body).collect::<Vec<_>>()
    );
    assert!(
        text.contains("Insufficient cpu"),
        "the reason says why: {text}"
    );
    s.all_gone(task).await;
}

#[tokio::test]
async fn a_job_deleted_while_the_engine_was_down_is_found_lost_by_the_reconciler() {
    let mut s = Setup::start("kx-reconcile").await;
    // A task whose pod stays pending (no agent to report anything while the engine is away).
    let task = s.launch(too_big("echo never")).await;
    s.until_state(task, TaskState::Scheduled).await;
    s.engine.take().expect("engine").abort();
    s.jobs()
        .delete(&task.job_name(), &DeleteParams::background())
        .await
        .expect("delete while the engine is down");
    s.all_gone(task).await;
    let restarted = Engine::start(Setup::config(&s.ns, &s.server, &s.engine_client, true))
        .await
        .expect("restarted engine");
    s.engine = Some(restarted);
    let (state, kinds) = s.finished(task).await;
    assert_eq!(state, failed(FailureReason::JobLost), "{kinds:?}");
}

#[tokio::test]
async fn a_job_left_for_a_task_that_ended_without_it_is_deleted_and_reaped() {
    // An engine created the Job and crashed before recording it; the task was then cancelled (before any
    // Job was recorded, so nothing stops it): the Job is left over.
    let CrashedCreate {
        admin,
        engine_client,
        _sim,
        server,
        first,
        tasks,
        task,
    } = job_created_before_a_crash("kx-leftover", "sleep 300", 120).await;
    tasks.cancel(task, None).await.expect("cancel");
    first.shutdown().await.ok();
    let engine = Engine::start(Setup::config("kx-leftover", &server, &engine_client, true))
        .await
        .expect("kubernetes engine");
    let jobs: Api<Job> = Api::namespaced(admin, "kx-leftover");
    wait_for("the leftover Job deleted", || async {
        jobs.get_opt(&task.job_name())
            .await
            .ok()
            .and_then(|j| j.is_none().then_some(()))
    })
    .await;
    let kinds = wait_for("reaped", || async {
        let kinds: Vec<&str> = tasks
            .history(task)
            .await
            .ok()?
            .iter()
            .map(|e| e.event.body.kind())
            .collect();
        (kinds.last() == Some(&"reaped")).then_some(kinds)
    })
    .await;
    assert!(kinds.contains(&"cancelled"), "{kinds:?}");
    engine.shutdown().await.ok();
}

#[tokio::test]
async fn the_reconciler_times_out_a_task_past_its_deadline_when_no_timer_did() {
    // No deadline timers in this engine: only the reconciler's pass can notice (Kubernetes' own deadline
    // trails by 2 s and would say `kubernetes`).
    let s = Setup::start_with("kx-overdue", |c| c.timers.enabled = false).await;
    let task = s.script("echo sleeping; sleep 300", 3).await;
    let (state, kinds) = s.finished(task).await;
    assert_eq!(state, TaskState::TimedOut, "{kinds:?}");
    let history = s.tasks.history(task).await.unwrap();
    let detected_by = history.iter().find_map(|e| match &e.event.body {
        taskpods_events::EventBody::TimedOut { detected_by } => Some(detected_by.clone()),
        _ => None,
    });
    assert_eq!(detected_by, Some(Some("engine".to_owned())));
    s.all_gone(task).await;
}

#[tokio::test]
async fn a_quota_refusing_the_job_itself_fails_the_task_at_once_with_quota_exceeded() {
    let s = Setup::start("kx-jobquota").await;
    let full: ResourceQuota = serde_json::from_value(
        json!({"metadata": {"name": "no-jobs"}, "spec": {"hard": {"count/jobs.batch": "0"}}}),
    )
    .unwrap();
    let quotas = Api::<ResourceQuota>::namespaced(s.admin.clone(), &s.ns);
    quotas
        .create(&PostParams::default(), &full)
        .await
        .expect("quota");
    wait_for("quota status", || async {
        quotas
            .get("no-jobs")
            .await
            .ok()
            .and_then(|q| q.status?.hard)
    })
    .await;
    let task = s.script("echo never", 120).await;
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let state = s.state(task).await;
        if state.is_terminal() {
            assert_eq!(
                state,
                failed(FailureReason::QuotaExceeded),
                "{:?}",
                s.kinds(task).await
            );
            break;
        }
        assert!(tokio::time::Instant::now() < until, "{state:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.kinds(task).await, ["accepted", "failed"]);
    assert!(s.jobs_of(task).await.is_empty());
}

#[tokio::test]
async fn the_engine_role_grants_nothing_beyond_what_the_executor_needs() {
    let (_admin, engine, _sim) = Setup::namespace("kx-rbac").await;
    let forbidden = |what: &str, r: Result<(), kube::Error>| match r {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what} must be forbidden to the engine, got {other:?}"),
    };
    let secrets = Api::<Secret>::namespaced(engine.clone(), "kx-rbac");
    forbidden(
        "reading a Secret back",
        secrets.get("any").await.map(|_| ()),
    );
    forbidden(
        "changing a Secret",
        secrets
            .patch(
                "any",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await
            .map(|_| ()),
    );
    forbidden(
        "watching Secrets",
        secrets
            .watch(&kube::api::WatchParams::default(), "0")
            .await
            .map(|_| ()),
    );
    forbidden(
        "Secrets in another namespace",
        Api::<Secret>::namespaced(engine.clone(), "default")
            .create(&PostParams::default(), &Secret::default())
            .await
            .map(|_| ()),
    );
    forbidden(
        "deleting pods",
        Api::<Pod>::namespaced(engine.clone(), "kx-rbac")
            .delete("any", &DeleteParams::default())
            .await
            .map(|_| ()),
    );
    forbidden(
        "patching Jobs",
        Api::<Job>::namespaced(engine.clone(), "kx-rbac")
            .patch(
                "any",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await
            .map(|_| ()),
    );
    forbidden(
        "Jobs in another namespace",
        Api::<Job>::namespaced(engine.clone(), "default")
            .list(&ListParams::default())
            .await
            .map(|_| ()),
    );
    forbidden(
        "creating pods directly",
        Api::<Pod>::namespaced(engine.clone(), "kx-rbac")
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "p"},
                    "spec": {"containers": [{"name": "c", "image": "x"}]}}))
                .unwrap(),
            )
            .await
            .map(|_| ()),
    );
    // What it needs works: per-task credentials Secrets made, listed (metadata), deleted.
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "creds-rbac"}, "stringData": {"nats.creds": "x"}}),
    )
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create a Secret");
    secrets
        .list_metadata(&ListParams::default())
        .await
        .expect("list Secrets");
    secrets
        .delete("creds-rbac", &DeleteParams::default())
        .await
        .expect("delete a Secret");
    Api::<Job>::namespaced(engine.clone(), "kx-rbac")
        .list(&ListParams::default())
        .await
        .expect("list Jobs");
    Api::<Pod>::namespaced(engine, "kx-rbac")
        .list(&ListParams::default())
        .await
        .expect("list pods");
}

/// The agent binary where a pod's user (UID 1000) can run it. The build directory may sit where that user
/// cannot go (CI keeps it under root's home, mode 700), so a copy is placed in the system temp dir once.
fn agent_for_pods() -> std::path::PathBuf {
    static COPY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join("taskpods-kube-agent");
        std::fs::create_dir_all(&dir).expect("agent dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("agent dir mode");
        // Copy, then rename into place: a run never sees a half-written binary, and reruns reuse the path.
        let staging = dir.join(format!("taskpods-agent.{}", std::process::id()));
        std::fs::copy(env!("CARGO_BIN_EXE_taskpods-agent-under-test"), &staging)
            .expect("copy the agent");
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755))
            .expect("agent mode");
        let copy = dir.join("taskpods-agent");
        std::fs::rename(&staging, &copy).expect("agent in place");
        copy
    })
    .clone()
}

/// What a crash right after creating a task's Job leaves: the task accepted by an engine that only takes
/// commands, its Job created through the engine's Role, and no `Scheduled` recorded.
struct CrashedCreate {
    admin: Client,
    engine_client: Client,
    _sim: NodeSimulator,
    server: NatsServer,
    first: Engine,
    tasks: TaskClient,
    task: TaskId,
}

async fn job_created_before_a_crash(ns: &str, script: &str, timeout_secs: u32) -> CrashedCreate {
    let (admin, engine_client, _sim) = Setup::namespace(ns).await;
    let server = NatsServer::start();
    let first = Engine::start(Setup::config(ns, &server, &engine_client, false))
        .await
        .expect("engine");
    let tasks = TaskClient::new(server.connect().await, ClientConfig::default());
    let task = tasks
        .launch(LaunchTask {
            timeout_secs: Some(timeout_secs),
            ..LaunchTask::script(script)
        })
        .await
        .expect("launch")
        .task_id;
    let backend = KubernetesBackend::new(
        engine_client.clone(),
        Setup::job_config(ns, &server),
        Duration::from_secs(30),
    );
    let deadline = chrono::Utc::now() + chrono::TimeDelta::seconds(i64::from(timeout_secs));
    backend
        .create(task, &spec(script), deadline)
        .await
        .expect("create");
    CrashedCreate {
        admin,
        engine_client,
        _sim,
        server,
        first,
        tasks,
        task,
    }
}

/// Everything `task` wrote to its standard output, read as the test's client (a Brain may read output).
/// The task's whole stdout: pages read until the agent's end marker, within [`WAIT`]. One page used to be
/// taken as the whole; once, under load, it came back without the digest the script printed (cause not
/// found), and reading to the end marker rules a short page out.
async fn stdout_of(s: &Setup, task: TaskId) -> String {
    let until = tokio::time::Instant::now() + WAIT;
    let mut out = Vec::new();
    let mut next = 0;
    loop {
        let page = s
            .tasks
            .output_page(task, next, 8 << 20)
            .await
            .expect("output");
        next = page.next;
        for chunk in page.chunks {
            if let taskpods_client::output::Piece::Stdout(bytes) = chunk.piece {
                out.extend_from_slice(&bytes);
            }
        }
        if page.end || tokio::time::Instant::now() >= until {
            return String::from_utf8_lossy(&out).into_owned();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Code in a real task pod, against nats-server with authorization as deployed: it reads the
/// credentials mounted in its pod (its own, from the Secret the engine made for it, owned by its Job)
/// and tries every attack with them. Each is refused by the server with a permission error; its own
/// work succeeds; the other task ends on its own terms; the credentials are refused once the task has
/// ended (past its deadline plus the grace), and the Secret goes with the Job.
#[tokio::test]
async fn code_in_a_task_pod_can_do_nothing_with_its_credentials_but_its_own_work() {
    let s = Setup::start_secured("kx-hostile").await;
    let theirs = s
        .script(
            "echo theirs; sleep 6; echo '{\"mine\": false}' > /tmp/result.json",
            60,
        )
        .await;
    s.until_state(theirs, TaskState::Running).await;
    let creds = format!("{}/{}", job::CREDS_DIR, job::CREDS_KEY);
    let script = format!(
        "echo BEGIN-CREDS; cat {creds}; echo END-CREDS\n\
         {ATTACK_TOOL} {url} {creds} \"$TASKPODS_TASK_ID\" {theirs}\n",
        url = s.server.url(),
    );
    let mine = s.script(&script, 8).await;
    // While it runs: its own Secret, owned by its Job, mounted read-only into its pod only.
    let secret = wait_for("the task's credentials Secret", || async {
        Api::<Secret>::namespaced(s.admin.clone(), &s.ns)
            .get_opt(&job::credentials_secret_name(mine))
            .await
            .ok()
            .flatten()
    })
    .await;
    let job_uid = s.jobs_of(mine).await[0].metadata.uid.clone();
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), Some(&owner.uid)),
        ("Job", job_uid.as_ref())
    );
    let (state, kinds) = s.finished(mine).await;
    assert_eq!(state, TaskState::Succeeded, "{kinds:?}");
    let out = stdout_of(&s, mine).await;
    // What the code found is its own identity (a user JWT), nothing shared.
    let found = out
        .split("BEGIN-CREDS\n")
        .nth(1)
        .and_then(|rest| rest.split("END-CREDS").next())
        .unwrap_or_default()
        .to_owned();
    assert!(found.contains("BEGIN NATS USER JWT"), "{out}");
    let names = taskpods_events::Names::default();
    let attacked = [
        ("publish", names.agent_hello(theirs)),
        ("subscription", "_INBOX.>".to_owned()),
    ]
    .into_iter()
    .chain(
        fixtures::attacked_subjects(&names, theirs)
            .into_iter()
            .map(|subject| ("publish", subject)),
    );
    for (action, subject) in attacked {
        let line = format!("REFUSED {action} {subject} :: ");
        let refused = out.lines().find(|l| l.starts_with(&line));
        assert!(
            refused.is_some_and(|l| l.to_lowercase().contains("permissions violation")),
            "{subject} was not refused with a permission error:\n{out}"
        );
    }
    assert!(!out.contains("NOT-REFUSED"), "{out}");
    assert!(out.contains("OWN-WORK stored"), "its own work: {out}");
    let progress = s
        .tasks
        .history(mine)
        .await
        .unwrap()
        .iter()
        .any(|e| format!("{:?}", e.event.body).contains("own work"));
    assert!(progress, "its own progress report was recorded");

    // The other task was untouched: it ran to its own end, with its own result.
    let (state, kinds) = s.finished(theirs).await;
    assert_eq!(state, TaskState::Succeeded, "{kinds:?}");
    assert!(stdout_of(&s, theirs).await.contains("theirs"));

    // The Secret went with the Job (garbage collector); the credentials die with the task.
    s.all_gone(mine).await;
    wait_for("the credentials Secret gone with its Job", || async {
        Api::<Secret>::namespaced(s.admin.clone(), &s.ns)
            .get_opt(&job::credentials_secret_name(mine))
            .await
            .ok()
            .filter(Option::is_none)
    })
    .await;
    let deadline = s.tasks.get(mine).await.unwrap().task.deadline.unwrap();
    let expiry = deadline + chrono::TimeDelta::from_std(GRACE).unwrap();
    let wait = (expiry - chrono::Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(2);
    tokio::time::sleep(wait).await;
    let refused = async_nats::ConnectOptions::with_credentials(&found)
        .unwrap()
        .connect(s.server.url())
        .await
        .expect_err("credentials of an ended task must be refused");
    assert!(
        refused.to_string().to_lowercase().contains("authorization"),
        "{refused}"
    );
}

/// A credentials Secret whose task has no Job (left by a crash, or made by hand) is deleted by the
/// reconciler; a Secret of a live task's Job is kept.
#[tokio::test]
async fn the_reconciler_deletes_credentials_secrets_whose_job_is_gone() {
    let s = Setup::start_secured("kx-stray").await;
    let live = s.script("sleep 20", 60).await;
    s.until_state(live, TaskState::Running).await;
    let stray_task = TaskId::mint();
    let config = JobConfig {
        namespace: s.ns.clone(),
        ..JobConfig::default()
    };
    let mut stray = job::credentials_secret(stray_task, "no-such-uid", "x", &config);
    // Without an owner the garbage collector would not touch it: only the reconciler removes it.
    stray.metadata.owner_references = None;
    let secrets = Api::<Secret>::namespaced(s.admin.clone(), &s.ns);
    secrets
        .create(&PostParams::default(), &stray)
        .await
        .expect("stray Secret");
    wait_for("the stray Secret deleted", || async {
        secrets
            .get_opt(&job::credentials_secret_name(stray_task))
            .await
            .ok()
            .filter(Option::is_none)
    })
    .await;
    assert!(
        secrets
            .get_opt(&job::credentials_secret_name(live))
            .await
            .unwrap()
            .is_some(),
        "the live task's Secret is kept"
    );
    s.tasks.cancel(live, None).await.expect("cancel");
}

/// A launch taking `API_TOKEN` from a Secret of the task namespace: the script sees the value; the value is
/// in no stream or bucket of the installation (events, views, output, dead letters) and not in the Job; the
/// `accepted` event holds only the reference.
#[tokio::test]
async fn a_secret_key_ref_reaches_the_script_and_nowhere_else() {
    let s = Setup::start("kx-secret-env").await;
    let token = TaskId::mint().to_string().replace('-', "");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "brain-tokens"}, "stringData": {"api-token": token}
    }))
    .unwrap();
    Api::<Secret>::namespaced(s.admin.clone(), &s.ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("the Brain's Secret");
    let reference = taskpods_events::env::SecretKeyRef {
        name: "brain-tokens".into(),
        key: "api-token".into(),
    };
    let task = s
        .launch(LaunchTask {
            timeout_secs: Some(60),
            secret_env: BTreeMap::from([("API_TOKEN".to_owned(), reference.clone())]),
            // The sleep keeps the Job around long enough to be seen (it is reaped right after).
            ..LaunchTask::script(r#"printf %s "$API_TOKEN" | sha256sum; sleep 2"#)
        })
        .await;
    let job = wait_for("the Job", || async {
        let job = s.jobs_of(task).await.into_iter().next();
        assert!(
            job.is_some() || !s.state(task).await.is_terminal(),
            "{:?}",
            s.tasks.history(task).await.unwrap()
        );
        job
    })
    .await;
    let (state, kinds) = s.finished(task).await;
    assert_eq!(state, TaskState::Succeeded, "{kinds:?}");
    let out = stdout_of(&s, task).await;
    assert!(
        out.contains(&fixtures::sha256_hex(&token)),
        "the script saw the value: {out}"
    );
    let history = s.tasks.history(task).await.unwrap();
    let accepted = history
        .iter()
        .find_map(|e| match &e.event.body {
            EventBody::Accepted { spec, .. } => Some(spec.clone()),
            _ => None,
        })
        .expect("accepted");
    assert_eq!(accepted.secret_env["API_TOKEN"], reference);
    let stored = fixtures::every_stored_byte(&s.server).await;
    assert!(
        !String::from_utf8_lossy(&stored).contains(&token),
        "the value is stored somewhere"
    );
    assert!(!serde_json::to_string(&job).unwrap().contains(&token));
}

/// Who holds the reconciler's lease on `server` now, and until when.
async fn reconciler_lease(server: &NatsServer) -> Option<taskpods_engine::lease::Holding> {
    let js = async_nats::jetstream::new(server.connect().await);
    let lease = taskpods_engine::lease::Lease::open(
        &js,
        "taskpods",
        "reconciler",
        "observer",
        Duration::from_secs(5),
        taskpods_projections::BucketSettings::default(),
    )
    .await
    .expect("lease bucket");
    lease.current(chrono::Utc::now()).await.expect("lease read")
}

/// The engine that appended each `reaped` event of `task` (its `Taskpods-Engine` header).
async fn reaped_by(server: &NatsServer, task: TaskId) -> Vec<Option<String>> {
    use futures::StreamExt;
    let js = async_nats::jetstream::new(server.connect().await);
    let names = taskpods_events::Names::default();
    let stream = js.get_stream(names.event_stream()).await.expect("stream");
    let mut messages = taskpods_projections::log::ordered(
        &stream,
        &names,
        Some(task),
        taskpods_projections::log::Start::First,
    )
    .await
    .expect("ordered consumer");
    let mut by = Vec::new();
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_secs(2), messages.next()).await
    {
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        if header(taskpods_events::codec::HEADER_KIND).as_deref() == Some("reaped") {
            by.push(header(taskpods_engine::store::HEADER_ENGINE));
        }
        if message.info().is_ok_and(|info| info.pending == 0) {
            break;
        }
    }
    by
}

#[tokio::test]
async fn a_lease_holder_killed_mid_reconcile_is_replaced_within_the_lease_time_and_the_reconcile_completes_once()
 {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Patch, PatchParams};
    const HOLD: &str = "taskpods.test/hold";
    let ns = "kx-lease";
    let (admin, engine_client, _sim) = Setup::namespace(ns).await;
    let server = NatsServer::start();
    // Three tasks cancelled before any Job was recorded, each with a Job left over (created behind the
    // back of an engine that only takes commands, as by one that crashed before recording it).
    let first = Engine::start(Setup::config(ns, &server, &engine_client, false))
        .await
        .expect("engine");
    let tasks = TaskClient::new(server.connect().await, ClientConfig::default());
    let backend = KubernetesBackend::new(
        engine_client.clone(),
        Setup::job_config(ns, &server),
        Duration::from_secs(30),
    );
    let mut left = Vec::new();
    for i in 0..3 {
        let task = tasks
            .launch(LaunchTask {
                idempotency_key: Some(format!("kx-lease-{i}")),
                timeout_secs: Some(120),
                ..LaunchTask::script("sleep 300")
            })
            .await
            .expect("launch")
            .task_id;
        let deadline = chrono::Utc::now() + chrono::TimeDelta::seconds(120);
        backend
            .create(task, &spec("sleep 300"), deadline)
            .await
            .expect("left-over Job");
        tasks.cancel(task, None).await.expect("cancel");
        left.push(task);
    }
    for task in &left {
        fixtures::until_state(&tasks, *task, TaskState::Cancelled, WAIT).await;
    }
    first.shutdown().await.ok();
    // The reconciler walks Jobs in task order: the first one's pod cannot go away (a finalizer the test
    // holds), so the holder that deletes it waits there, mid-pass, renewing its lease.
    left.sort();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let pods_of = |task: TaskId| {
        let pods = pods.clone();
        async move {
            pods.list(&ListParams::default().labels(&format!("{TASK_LABEL}={task}")))
                .await
                .unwrap()
                .items
        }
    };
    let held_pod = wait_for("the first left-over Job's pod", || async {
        pods_of(left[0]).await.into_iter().next()
    })
    .await;
    let held_name = held_pod.metadata.name.clone().expect("pod name");
    pods.patch(
        &held_name,
        &PatchParams::default(),
        &Patch::Strategic(json!({"metadata": {"finalizers": [HOLD]}})),
    )
    .await
    .expect("hold the pod");

    // a waits at the held pod for longer than the test may take to see it there (the garbage collector,
    // busy with every other test's namespace, can mark the pod deleted tens of seconds late): past its
    // stop timeout it would move on to the next Job before it is killed, as it once did under load.
    let mut config_a = Setup::config(ns, &server, &engine_client, true);
    if let BackendConfig::Kubernetes(kubernetes) = &mut config_a.backend {
        kubernetes.stop_timeout = 2 * WAIT;
    }
    let a = Engine::start(config_a).await.expect("engine a");
    let a_id = a.engine_id().to_owned();
    wait_for("a holds the lease", || async {
        reconciler_lease(&server)
            .await
            .filter(|h| h.holder == a_id)
            .map(|_| ())
    })
    .await;
    let b = Engine::start(Setup::config(ns, &server, &engine_client, true))
        .await
        .expect("engine b");
    let b_id = b.engine_id().to_owned();
    // a is mid-pass: it recorded the first task reaped and deleted its Job, and waits for the held pod.
    wait_for("a mid-pass on the first Job", || async {
        let deleting = pods
            .get_opt(&held_name)
            .await
            .ok()
            .flatten()
            .is_some_and(|p| p.metadata.deletion_timestamp.is_some());
        (deleting && reaped_by(&server, left[0]).await.len() == 1).then_some(())
    })
    .await;
    let a_until = reconciler_lease(&server)
        .await
        .filter(|h| h.holder == a_id)
        .expect("a still holds the lease mid-pass (it renews while it works)")
        .until;
    a.abort();
    let killed = std::time::Instant::now();
    let b_holds = wait_for("b takes the lease over", || async {
        reconciler_lease(&server).await.filter(|h| h.holder == b_id)
    })
    .await;
    let failover = killed.elapsed();
    println!(
        "lease failover after the holder was killed: {failover:?} (lease 5 s, passes 1 s apart)"
    );
    // b's term began (its expiry minus the lease time) no earlier than a's ended: never two holders.
    assert!(
        b_holds.until - chrono::TimeDelta::seconds(5) >= a_until,
        "b took the lease at {} while a held it until {a_until}",
        b_holds.until - chrono::TimeDelta::seconds(5)
    );
    // Let the held pod go, then everything a left undone is done by b, and nothing twice.
    let current = pods.get(&held_name).await.expect("held pod");
    let finalizers: Vec<String> = current
        .metadata
        .finalizers
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f != HOLD)
        .collect();
    pods.patch(
        &held_name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": finalizers}})),
    )
    .await
    .expect("release the pod");
    let jobs: Api<Job> = Api::namespaced(admin.clone(), ns);
    for task in &left {
        wait_for("the left-over Job and its pods gone", || async {
            let job = jobs.get_opt(&task.job_name()).await.ok()?;
            (job.is_none() && pods_of(*task).await.is_empty()).then_some(())
        })
        .await;
    }
    for task in &left[1..] {
        wait_for("reaped by b", || async {
            (!reaped_by(&server, *task).await.is_empty()).then_some(())
        })
        .await;
    }
    assert_eq!(reaped_by(&server, left[0]).await, vec![Some(a_id.clone())]);
    for task in &left[1..] {
        assert_eq!(
            reaped_by(&server, *task).await,
            vec![Some(b_id.clone())],
            "reaped once, by the holder that took over"
        );
    }
    b.shutdown().await.ok();
    assert_eq!(
        reconciler_lease(&server).await,
        None,
        "b released the lease at its shutdown"
    );
}
