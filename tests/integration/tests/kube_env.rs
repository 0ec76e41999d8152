//! Proves the Kubernetes test environment is the real thing: Pod Security admission, the Job
//! controller's status, deadlines and TTL, the garbage collector, RBAC on ServiceAccount tokens, and the
//! node simulator's kubelet behaviour (exit codes, faults, deletion).
//!
//! Layout: one control plane for the whole binary ([`ControlPlane::shared`]); each test makes its own
//! namespace and its own node simulator restricted to that namespace, so tests run in parallel without
//! seeing each other's pods. Every wait is bounded and reports the last observed state on timeout.
//!
//! Needs the binaries built by `tests/kube-env/build.sh`; without them every test fails with a message
//! naming the script (never skipped).

use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use taskpods_harness::kube::{
    ControlPlane, FAULT_ANNOTATION, Fault, NodeSimulator, create_namespace, k8s_openapi, kube,
};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// Where pods find the in-cluster client check (the simulator shows it in every container; bound by
/// root, so it works even where the build directory is closed to the pods' user).
const WHOAMI: &str = "/usr/local/bin/kube-whoami";

/// A namespace with its own simulated node.
struct TestNs {
    cp: &'static ControlPlane,
    client: Client,
    ns: String,
    sim: NodeSimulator,
}

impl TestNs {
    async fn new(name: &str, restricted: bool) -> Self {
        let cp = ControlPlane::shared()
            .expect("control plane starts (run tests/kube-env/build.sh first)");
        let client = cp.client().await.expect("admin client");
        let labels: &[(&str, &str)] = if restricted {
            &[("pod-security.kubernetes.io/enforce", "restricted")]
        } else {
            &[]
        };
        create_namespace(&client, name, labels)
            .await
            .expect("namespace with its default ServiceAccount");
        let sim = NodeSimulator::builder(client.clone())
            .node_name(format!("sim-{name}"))
            .namespace(name)
            .api_server(cp.server_url())
            .file(WHOAMI, env!("CARGO_BIN_EXE_kube-whoami"))
            .start()
            .await
            .expect("node simulator starts");
        TestNs {
            cp,
            client,
            ns: name.to_string(),
            sim,
        }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.ns)
    }
}

/// Waits until pod `name` reaches `phase` (bounded by [`WAIT`]) and returns it.
async fn pod_in_phase(pods: &Api<Pod>, name: &str, wanted: &str) -> Pod {
    wait_for(&format!("pod {name} {wanted}"), || async {
        pods.get(name).await.ok().filter(|p| phase(p) == wanted)
    })
    .await
}

/// Waits until pod `name` is gone from the API (bounded by [`WAIT`]).
async fn pod_gone(pods: &Api<Pod>, name: &str) {
    wait_for(&format!("pod {name} gone"), || async {
        pods.get_opt(name)
            .await
            .ok()
            .and_then(|p| p.is_none().then_some(()))
    })
    .await
}

/// Polls `probe` every 200 ms until it yields a value; panics after [`WAIT`].
async fn wait_for<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    taskpods_integration::wait_for(what, WAIT, probe).await
}

/// A pod spec that satisfies Pod Security `restricted`, the posture task pods use.
fn restricted_spec(command: &str, extra_env: serde_json::Value) -> serde_json::Value {
    json!({
        "restartPolicy": "Never",
        "automountServiceAccountToken": false,
        "securityContext": {
            "runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"}
        },
        "containers": [{
            "name": "main",
            "image": "registry.invalid/taskpods/busybox:1",
            "command": ["sh", "-c", command],
            "env": extra_env,
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]}
            },
            "resources": {
                "requests": {"cpu": "50m", "memory": "32Mi"},
                "limits": {"cpu": "100m", "memory": "64Mi"}
            }
        }]
    })
}

fn pod(name: &str, spec: serde_json::Value, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(
        json!({"metadata": {"name": name, "annotations": annotations}, "spec": spec}),
    )
    .expect("pod")
}

fn job(name: &str, spec: serde_json::Value, job_fields: serde_json::Value) -> Job {
    let mut job_spec = json!({"backoffLimit": 0, "template": {"metadata": {"labels": {"app": name}}, "spec": spec}});
    if let (Some(target), Some(extra)) = (job_spec.as_object_mut(), job_fields.as_object()) {
        target.extend(extra.clone());
    }
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": job_spec})).expect("job")
}

/// The Job's condition of the given type, if it is `True`: `(reason, message)`.
fn condition(job: &Job, kind: &str) -> Option<(String, String)> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind && c.status == "True")
        .map(|c| {
            (
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

async fn pods_of_job(t: &TestNs, job: &str) -> Vec<Pod> {
    t.pods()
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .expect("list pods")
        .items
}

fn terminated(pod: &Pod) -> Option<(i32, String)> {
    let state = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?;
    let t = state.terminated.as_ref()?;
    Some((t.exit_code, t.reason.clone().unwrap_or_default()))
}

fn phase(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn api_server_reports_the_pinned_kubernetes_version() {
    let t = TestNs::new("version", false).await;
    assert_eq!(t.cp.version(), ControlPlane::pinned_version());
    assert!(
        t.cp.version().starts_with("v1.37."),
        "k8s-openapi is built for v1_37, got {}",
        t.cp.version()
    );
}

#[tokio::test]
async fn restricted_namespace_rejects_noncompliant_pod_and_admits_compliant_one() {
    let t = TestNs::new("psa", true).await;
    // No securityContext at all: runs as root, may escalate, keeps capabilities.
    let bad = pod(
        "root-pod",
        json!({"restartPolicy": "Never", "containers": [
            {"name": "main", "image": "registry.invalid/busybox:1", "command": ["true"]}]}),
        json!({}),
    );
    let err = t
        .pods()
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("non-compliant pod must be refused");
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status
                    .message
                    .contains("violates PodSecurity \"restricted:latest\""),
                "{}",
                status.message
            );
            assert!(
                status.message.contains("runAsNonRoot"),
                "{}",
                status.message
            );
        }
        other => panic!("expected an API refusal, got {other}"),
    }

    let good = pod(
        "compliant",
        restricted_spec("echo admitted as $(id -u):$(id -g)", json!([])),
        json!({}),
    );
    t.pods()
        .create(&PostParams::default(), &good)
        .await
        .expect("compliant pod is admitted");
    let done = pod_in_phase(&t.pods(), "compliant", "Succeeded").await;
    assert_eq!(terminated(&done), Some((0, "Completed".to_string())));
    // As root (CI) the simulator runs the container as its runAsUser/runAsGroup, like a runtime would.
    let user = if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        "1000:1000".to_string()
    } else {
        let out = std::process::Command::new("sh")
            .args(["-c", "echo $(id -u):$(id -g)"])
            .output()
            .expect("id");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        t.sim.logs("psa", "compliant", "main").as_deref(),
        Some(format!("admitted as {user}\n").as_str())
    );
}

#[tokio::test]
async fn job_controller_completes_job_when_simulated_pod_succeeds() {
    let t = TestNs::new("job-ok", true).await;
    let env = json!([
        {"name": "GREETING", "value": "hello"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "MESSAGE", "value": "$(GREETING) from $(POD_NAME)"}
    ]);
    let j = job("ok", restricted_spec("echo \"$MESSAGE\"", env), json!({}));
    t.jobs()
        .create(&PostParams::default(), &j)
        .await
        .expect("create job");

    let done = wait_for("Job Complete", || async {
        t.jobs()
            .get("ok")
            .await
            .ok()
            .filter(|j| condition(j, "Complete").is_some())
    })
    .await;
    let status = done.status.expect("job status");
    assert_eq!(status.succeeded, Some(1));
    assert_eq!(status.failed.unwrap_or(0), 0);
    assert!(status.completion_time.is_some());

    let pods = pods_of_job(&t, "ok").await;
    assert_eq!(
        pods.len(),
        1,
        "exactly one pod for a Job with completions=1"
    );
    let p = &pods[0];
    assert_eq!(phase(p), "Succeeded");
    assert_eq!(
        p.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some(t.sim.node_name())
    );
    let name = p.metadata.name.clone().expect("pod name");
    assert_eq!(
        t.sim.logs("job-ok", &name, "main"),
        Some(format!("hello from {name}\n"))
    );
}

#[tokio::test]
async fn failing_container_fails_job_with_its_exit_code() {
    let t = TestNs::new("job-fail", true).await;
    t.jobs()
        .create(
            &PostParams::default(),
            &job("bad", restricted_spec("exit 3", json!([])), json!({})),
        )
        .await
        .expect("create job");
    let failed = wait_for("Job Failed", || async {
        t.jobs()
            .get("bad")
            .await
            .ok()
            .and_then(|j| condition(&j, "Failed"))
    })
    .await;
    assert_eq!(failed.0, "BackoffLimitExceeded");
    let pods = pods_of_job(&t, "bad").await;
    assert_eq!(pods.len(), 1);
    assert_eq!(phase(&pods[0]), "Failed");
    assert_eq!(terminated(&pods[0]), Some((3, "Error".to_string())));
}

#[tokio::test]
async fn active_deadline_fails_job_with_deadline_exceeded_and_stops_its_pod() {
    let t = TestNs::new("job-deadline", true).await;
    let j = job(
        "slow",
        restricted_spec("sleep 300", json!([])),
        json!({"activeDeadlineSeconds": 3}),
    );
    t.jobs()
        .create(&PostParams::default(), &j)
        .await
        .expect("create job");
    wait_for("pod running", || async {
        pods_of_job(&t, "slow")
            .await
            .into_iter()
            .find(|p| phase(p) == "Running")
    })
    .await;
    let (reason, _) = wait_for("Job Failed", || async {
        t.jobs()
            .get("slow")
            .await
            .ok()
            .and_then(|j| condition(&j, "Failed"))
    })
    .await;
    assert_eq!(reason, "DeadlineExceeded");
    // The Job controller deletes the still-running pod; the simulator must stop the process and let it go.
    wait_for("pod deleted", || async {
        pods_of_job(&t, "slow").await.is_empty().then_some(())
    })
    .await;
    assert!(
        t.sim.running().is_empty(),
        "processes still running: {:?}",
        t.sim.running()
    );
}

#[tokio::test]
async fn ttl_after_finished_deletes_job_and_garbage_collector_its_pods() {
    let t = TestNs::new("job-ttl", true).await;
    let j = job(
        "short-lived",
        restricted_spec("true", json!([])),
        json!({"ttlSecondsAfterFinished": 1}),
    );
    let created = t
        .jobs()
        .create(&PostParams::default(), &j)
        .await
        .expect("create job");
    let uid = created.metadata.uid.expect("uid");
    // Observe it finished first, so the deletion is the TTL controller's doing, not a failed creation.
    wait_for("Job Complete", || async {
        match t.jobs().get_opt("short-lived").await {
            Ok(Some(j)) if condition(&j, "Complete").is_some() => Some(()),
            // Already deleted by the TTL controller between two polls: it had to complete first.
            Ok(None) => Some(()),
            _ => None,
        }
    })
    .await;
    wait_for("Job deleted by TTL", || async {
        match t.jobs().get_opt("short-lived").await {
            Ok(None) => Some(()),
            Ok(Some(j)) if j.metadata.uid.as_deref() != Some(&uid) => Some(()),
            _ => None,
        }
    })
    .await;
    wait_for("pods garbage-collected", || async {
        pods_of_job(&t, "short-lived")
            .await
            .is_empty()
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn service_account_token_is_refused_verbs_its_role_lacks() {
    let t = TestNs::new("rbac", false).await;
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "reader"}})).expect("sa");
    Api::<ServiceAccount>::namespaced(t.client.clone(), "rbac")
        .create(&PostParams::default(), &sa)
        .await
        .expect("create sa");
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
    }))
    .expect("role");
    Api::<Role>::namespaced(t.client.clone(), "rbac")
        .create(&PostParams::default(), &role)
        .await
        .expect("create role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "reader-reads-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "rbac"}]
    }))
    .expect("binding");
    Api::<RoleBinding>::namespaced(t.client.clone(), "rbac")
        .create(&PostParams::default(), &binding)
        .await
        .expect("create binding");

    let request =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 600}}))
            .expect("token request");
    let token = Api::<ServiceAccount>::namespaced(t.client.clone(), "rbac")
        .create_token_request("reader", &PostParams::default(), &request)
        .await
        .expect("token request")
        .status
        .expect("token status")
        .token
        .expect("token issued");
    let reader = t.cp.client_with_token(&token).await.expect("token client");

    // The granted verb works: the token authenticates (so a later 403 is authorization, not a bad token).
    Api::<Pod>::namespaced(reader.clone(), "rbac")
        .list(&ListParams::default())
        .await
        .expect("list pods is allowed");

    let forbidden = |r: &Result<ConfigMap, kube::Error>| match r {
        Err(kube::Error::Api(s)) => {
            s.code == 403 && s.message.contains("system:serviceaccount:rbac:reader")
        }
        _ => false,
    };
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "x"}})).expect("cm");
    let create = Api::<ConfigMap>::namespaced(reader.clone(), "rbac")
        .create(&PostParams::default(), &cm)
        .await;
    assert!(
        forbidden(&create),
        "creating a ConfigMap must be forbidden: {create:?}"
    );

    let p = pod("victim", restricted_spec("sleep 30", json!([])), json!({}));
    t.pods()
        .create(&PostParams::default(), &p)
        .await
        .expect("admin creates pod");
    match Api::<Pod>::namespaced(reader.clone(), "rbac")
        .delete("victim", &DeleteParams::default())
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("deleting a pod must be forbidden, got {other:?}"),
    }
    match Api::<Pod>::namespaced(reader, "default")
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("reading another namespace must be forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn simulator_reports_oom_kill_image_pull_failure_and_eviction() {
    let t = TestNs::new("faults", true).await;
    let create = |name: &str, fault: &str| {
        let annotations = if fault.is_empty() {
            json!({})
        } else {
            json!({ FAULT_ANNOTATION: fault })
        };
        pod(name, restricted_spec("sleep 300", json!([])), annotations)
    };
    for (name, fault) in [
        ("oom", "oom-killed"),
        ("pull", "image-pull"),
        ("evict", "evicted"),
        ("on-request", ""),
    ] {
        t.pods()
            .create(&PostParams::default(), &create(name, fault))
            .await
            .expect("create pod");
    }

    let oom = pod_in_phase(&t.pods(), "oom", "Failed").await;
    assert_eq!(terminated(&oom), Some((137, "OOMKilled".to_string())));

    wait_for("ImagePullBackOff", || async {
        let p = t.pods().get("pull").await.ok()?;
        let s = p
            .status?
            .container_statuses?
            .into_iter()
            .next()?
            .state?
            .waiting?;
        (s.reason.as_deref() == Some("ImagePullBackOff")).then_some(())
    })
    .await;
    assert_eq!(
        phase(&t.pods().get("pull").await.expect("pull pod")),
        "Pending"
    );

    let evicted = pod_in_phase(&t.pods(), "evict", "Failed").await;
    assert_eq!(
        evicted.status.as_ref().and_then(|s| s.reason.as_deref()),
        Some("Evicted")
    );

    pod_in_phase(&t.pods(), "on-request", "Running").await;
    assert!(
        t.sim.evict("faults", "on-request"),
        "the simulator runs the pod"
    );
    let evicted = pod_in_phase(&t.pods(), "on-request", "Failed").await;
    assert_eq!(
        evicted.status.as_ref().and_then(|s| s.reason.as_deref()),
        Some("Evicted")
    );
    assert!(!t.sim.running().contains(&"faults/on-request".to_string()));
}

/// A real eviction kills the pod's containers, every process in them: here a shell that ignores SIGTERM
/// (so the eviction takes the pod's grace period) and a process in a session of its own, which a
/// signal to the container's process group would not reach. The pod is deleted while the eviction
/// is still stopping it, as a Job's garbage collection does: it is removed all the same, never left
/// `Terminating`.
#[tokio::test]
async fn an_eviction_ends_every_process_of_the_pod_and_a_deletion_meanwhile_removes_it() {
    let t = TestNs::new("evict-all", true).await;
    let marker = format!("evict-all-{}", std::process::id());
    let var = format!("TASKPODS_SIM_MARKER={marker}");
    let mut spec = restricted_spec(
        "trap '' TERM; setsid sleep 300 & sleep 300",
        json!([{"name": "TASKPODS_SIM_MARKER", "value": marker}]),
    );
    spec["terminationGracePeriodSeconds"] = json!(3);
    t.pods()
        .create(&PostParams::default(), &pod("stubborn", spec, json!({})))
        .await
        .expect("create pod");
    pod_in_phase(&t.pods(), "stubborn", "Running").await;
    wait_for("both sleeps started", || async {
        let sleeps = taskpods_integration::processes_with_env(&var)
            .into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "sleep")
            })
            .count();
        (sleeps == 2).then_some(())
    })
    .await;
    assert!(
        t.sim.evict("evict-all", "stubborn"),
        "the simulator runs the pod"
    );
    t.pods()
        .delete("stubborn", &DeleteParams::default())
        .await
        .expect("delete");
    pod_gone(&t.pods(), "stubborn").await;
    taskpods_integration::until_no_process_with_env(&var, WAIT).await;
    assert!(t.sim.running().is_empty(), "{:?}", t.sim.running());
}

#[tokio::test]
async fn injected_fault_by_label_fails_the_job_as_oom() {
    let t = TestNs::new("inject", true).await;
    t.sim.inject(
        BTreeMap::from([("app".to_string(), "hungry".to_string())]),
        Fault::OomKilled,
    );
    t.jobs()
        .create(
            &PostParams::default(),
            &job("hungry", restricted_spec("sleep 300", json!([])), json!({})),
        )
        .await
        .expect("job");
    let (reason, _) = wait_for("Job Failed", || async {
        t.jobs()
            .get("hungry")
            .await
            .ok()
            .and_then(|j| condition(&j, "Failed"))
    })
    .await;
    assert_eq!(reason, "BackoffLimitExceeded");
    let pods = pods_of_job(&t, "hungry").await;
    assert_eq!(terminated(&pods[0]), Some((137, "OOMKilled".to_string())));
}

#[tokio::test]
async fn deleting_a_running_pod_stops_its_process_and_removes_it() {
    let t = TestNs::new("delete", false).await;
    let p = pod(
        "sleeper",
        restricted_spec("sleep 300", json!([])),
        json!({}),
    );
    t.pods()
        .create(&PostParams::default(), &p)
        .await
        .expect("create pod");
    pod_in_phase(&t.pods(), "sleeper", "Running").await;
    assert_eq!(t.sim.running(), vec!["delete/sleeper".to_string()]);
    t.pods()
        .delete("sleeper", &DeleteParams::default().grace_period(2))
        .await
        .expect("delete");
    pod_gone(&t.pods(), "sleeper").await;
    assert!(t.sim.running().is_empty(), "{:?}", t.sim.running());
}

#[tokio::test]
async fn mapped_image_runs_local_executable_with_secret_and_config_map_env() {
    let cp =
        ControlPlane::shared().expect("control plane starts (run tests/kube-env/build.sh first)");
    let client = cp.client().await.expect("admin client");
    create_namespace(&client, "agent", &[])
        .await
        .expect("namespace");
    // Task pods name no command: the image's entrypoint is our agent, which the simulator maps to a
    // local executable (here a shell, so the test can print what the "agent" sees).
    let sim = NodeSimulator::builder(client.clone())
        .node_name("sim-agent")
        .namespace("agent")
        .api_server(cp.server_url())
        .image("registry.invalid/taskpods/agent", "/bin/sh")
        .start()
        .await
        .expect("simulator");
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}
    }))
    .expect("secret");
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), "agent")
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "settings"}, "data": {"NATS_URL": "nats://127.0.0.1:4222"}
    }))
    .expect("config map");
    Api::<ConfigMap>::namespaced(client.clone(), "agent")
        .create(&PostParams::default(), &cm)
        .await
        .expect("create config map");

    let spec = json!({
        "restartPolicy": "Never",
        "containers": [{
            "name": "agent",
            "image": "registry.invalid/taskpods/agent:v1",
            "args": ["-c", "echo \"$TOKEN $NATS_URL $TASK_ID $KUBERNETES_SERVICE_HOST\""],
            "envFrom": [{"configMapRef": {"name": "settings"}}],
            "env": [
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "TASK_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['task']"}}}
            ]
        }]
    });
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": "task-pod", "labels": {"task": "t-42"}}, "spec": spec
    }))
    .expect("pod");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "agent");
    pods.create(&PostParams::default(), &p)
        .await
        .expect("create pod");
    let done = pod_in_phase(&pods, "task-pod", "Succeeded").await;
    assert_eq!(terminated(&done), Some((0, "Completed".to_string())));
    assert_eq!(
        sim.logs("agent", "task-pod", "agent").as_deref(),
        Some("s3cret nats://127.0.0.1:4222 t-42 127.0.0.1\n")
    );
}

#[tokio::test]
async fn init_containers_run_first_and_on_failure_restarts_until_success() {
    let t = TestNs::new("restarts", true).await;
    // The pod's containers share its work directory ($HOME), like a shared emptyDir volume.
    let mut spec = restricted_spec(
        "cat \"$HOME/ready\"; if [ -f \"$HOME/tried\" ]; then exit 0; fi; touch \"$HOME/tried\"; exit 1",
        json!([]),
    );
    let mut init = spec["containers"][0].clone();
    init["name"] = json!("prepare");
    init["command"] = json!(["sh", "-c", "echo prepared > \"$HOME/ready\""]);
    spec["initContainers"] = json!([init]);
    spec["restartPolicy"] = json!("OnFailure");
    let j = job("flaky", spec, json!({"backoffLimit": 2}));
    t.jobs()
        .create(&PostParams::default(), &j)
        .await
        .expect("create job");
    wait_for("Job Complete", || async {
        t.jobs()
            .get("flaky")
            .await
            .ok()
            .filter(|j| condition(j, "Complete").is_some())
    })
    .await;
    let pods = pods_of_job(&t, "flaky").await;
    assert_eq!(pods.len(), 1, "OnFailure restarts in place, no new pod");
    let status = pods[0].status.clone().expect("pod status");
    let main = &status.container_statuses.expect("container statuses")[0];
    assert_eq!(main.restart_count, 1);
    let last = main.last_state.as_ref().and_then(|s| s.terminated.as_ref());
    assert_eq!(last.map(|t| t.exit_code), Some(1));
    let init = &status.init_container_statuses.expect("init statuses")[0];
    assert_eq!(
        init.state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code),
        Some(0)
    );
    let name = pods[0].metadata.name.clone().expect("name");
    assert_eq!(
        t.sim.logs("restarts", &name, "main").as_deref(),
        Some("prepared\nprepared\n")
    );
}

#[tokio::test]
async fn resource_quota_refuses_pods_beyond_it_and_job_controller_reports_it() {
    let t = TestNs::new("quota", true).await;
    let quota: k8s_openapi::api::core::v1::ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "pods"}, "spec": {"hard": {"pods": "1"}}
    }))
    .expect("quota");
    let quotas =
        Api::<k8s_openapi::api::core::v1::ResourceQuota>::namespaced(t.client.clone(), "quota");
    quotas
        .create(&PostParams::default(), &quota)
        .await
        .expect("create quota");
    // The quota controller must compute the status before the admission plugin admits anything.
    wait_for("quota status", || async {
        quotas.get("pods").await.ok().and_then(|q| q.status?.hard)
    })
    .await;

    let j = job(
        "wide",
        restricted_spec("sleep 300", json!([])),
        json!({"parallelism": 2, "completions": 2}),
    );
    t.jobs()
        .create(&PostParams::default(), &j)
        .await
        .expect("create job");
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(t.client.clone(), "quota");
    let message = wait_for("FailedCreate event for the Job", || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("FailedCreate")
                    && e.involved_object.name.as_deref() == Some("wide")
            })
            .and_then(|e| e.message)
    })
    .await;
    assert!(message.contains("exceeded quota: pods"), "{message}");
    assert_eq!(
        pods_of_job(&t, "wide").await.len(),
        1,
        "quota allows one pod"
    );

    let extra = pod("extra", restricted_spec("true", json!([])), json!({}));
    match t.pods().create(&PostParams::default(), &extra).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{s:?}");
            assert!(s.message.contains("exceeded quota"), "{}", s.message);
        }
        other => panic!("a pod beyond the quota must be refused, got {other:?}"),
    }
}

#[tokio::test]
async fn dropping_a_control_plane_stops_its_servers_and_removes_its_files() {
    let cp = ControlPlane::start()
        .await
        .expect("a second, private control plane starts");
    let dir = cp.dir().to_path_buf();
    let addr = cp.server_url().trim_start_matches("https://").to_string();
    let client = cp.client().await.expect("client");
    client.apiserver_version().await.expect("it serves");
    assert!(dir.join("admin.kubeconfig").is_file());
    drop(client);
    drop(cp);
    assert!(!dir.exists(), "{} must be removed", dir.display());
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "the API server at {addr} must be gone"
    );
}

#[tokio::test]
async fn pods_that_do_not_fit_the_node_stay_pending_as_unschedulable() {
    let t = TestNs::new("unschedulable", true).await;
    let mut picky = restricted_spec("true", json!([]));
    picky["nodeSelector"] = json!({"disktype": "ssd"});
    let mut greedy = restricted_spec("true", json!([]));
    greedy["containers"][0]["resources"] = json!({"requests": {"cpu": "64", "memory": "32Mi"}, "limits": {"cpu": "64", "memory": "32Mi"}});
    for (name, spec) in [("picky", picky), ("greedy", greedy)] {
        t.pods()
            .create(&PostParams::default(), &pod(name, spec, json!({})))
            .await
            .expect("create pod");
    }
    for (name, expected) in [
        ("picky", "didn't match Pod's node affinity/selector"),
        ("greedy", "Insufficient cpu"),
    ] {
        let message = wait_for("PodScheduled=False", || async {
            let p = t.pods().get(name).await.ok()?;
            let c = p
                .status?
                .conditions?
                .into_iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
            assert_eq!(c.reason.as_deref(), Some("Unschedulable"));
            c.message
        })
        .await;
        assert!(message.contains(expected), "{name}: {message}");
        let p = t.pods().get(name).await.expect("pod");
        assert_eq!(phase(&p), "Pending");
        assert!(
            p.spec.and_then(|s| s.node_name).is_none(),
            "{name} must stay unbound"
        );
    }
}

#[tokio::test]
async fn pod_failure_policy_ignores_eviction_and_the_job_controller_replaces_the_pod() {
    let t = TestNs::new("disruption", true).await;
    let policy = json!({"podFailurePolicy": {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    ]}});
    let j = job("resilient", restricted_spec("sleep 2", json!([])), policy);
    t.jobs()
        .create(&PostParams::default(), &j)
        .await
        .expect("create job");
    let first = wait_for("first pod running", || async {
        pods_of_job(&t, "resilient")
            .await
            .into_iter()
            .find(|p| phase(p) == "Running")
    })
    .await;
    let first = first.metadata.name.expect("name");
    assert!(
        t.sim.evict("disruption", &first),
        "the simulator runs {first}"
    );
    wait_for("Job Complete", || async {
        t.jobs()
            .get("resilient")
            .await
            .ok()
            .filter(|j| condition(j, "Complete").is_some())
    })
    .await;
    let status = t
        .jobs()
        .get("resilient")
        .await
        .expect("job")
        .status
        .expect("status");
    assert_eq!(status.succeeded, Some(1));
    // The evicted pod matched the Ignore rule: not counted as a failure despite backoffLimit 0.
    assert_eq!(status.failed.unwrap_or(0), 0);
    let pods = pods_of_job(&t, "resilient").await;
    let evicted = pods
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(first.as_str()))
        .expect("evicted pod kept");
    assert_eq!(
        evicted.status.as_ref().and_then(|s| s.reason.as_deref()),
        Some("Evicted")
    );
    assert!(
        pods.iter().any(|p| phase(p) == "Succeeded"),
        "a replacement pod succeeded"
    );
}

/// What the kubelet gives a pod that a real cluster's in-cluster clients rely on: Secret and ConfigMap
/// files at their mount paths (read-only, modes and `fsGroup` honoured), a writable emptyDir, and the
/// ServiceAccount admission plugin's projected `kube-api-access-*` volume (a TokenRequest-minted token,
/// `kube-root-ca.crt`, the namespace), so kube-rs's in-cluster configuration authenticates as the pod's
/// ServiceAccount over verified TLS. Nothing is created on the host for the new mount points.
#[tokio::test]
async fn pods_see_their_volumes_and_in_cluster_clients_authenticate() {
    let t = TestNs::new("volumes", true).await;
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "creds"}, "stringData": {"nats.creds": "TOP-SECRET", "other": "x"}
    }))
    .expect("secret");
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(t.client.clone(), &t.ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "settings"}, "data": {"engine.toml": "answer = 42\n"}
    }))
    .expect("config map");
    Api::<ConfigMap>::namespaced(t.client.clone(), &t.ns)
        .create(&PostParams::default(), &cm)
        .await
        .expect("create config map");
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    let script = format!(
        r#"set -u
echo "id=$(id -u):$(id -g) groups=$(id -G)"
echo "secret=$(cat /var/run/secrets/taskpods/nats/nats.creds) mode=$(stat -L -c %a /var/run/secrets/taskpods/nats/nats.creds)"
test -e /var/run/secrets/taskpods/nats/other && echo LEAK:unlisted-key
touch /var/run/secrets/taskpods/nats/x 2>/dev/null && echo LEAK:secret-writable
echo "config=$(cat /etc/taskpods-volume-test/engine.toml)"
echo scratch > /tmp/scratch && echo "tmp=$(cat /tmp/scratch)"
echo "namespace=$(cat {sa}/namespace)"
grep -q 'BEGIN CERTIFICATE' {sa}/ca.crt && echo ca=present
{WHOAMI}
"#
    );
    let mut spec = restricted_spec(&script, json!([]));
    spec["automountServiceAccountToken"] = json!(true);
    spec["securityContext"]["fsGroup"] = json!(2000);
    spec["volumes"] = json!([
        {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o400,
            "items": [{"key": "nats.creds", "path": "nats.creds"}]}},
        {"name": "settings", "configMap": {"name": "settings"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}},
    ]);
    spec["containers"][0]["volumeMounts"] = json!([
        {"name": "creds", "mountPath": "/var/run/secrets/taskpods/nats", "readOnly": true},
        {"name": "settings", "mountPath": "/etc/taskpods-volume-test"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]);
    let pods = t.pods();
    pods.create(&PostParams::default(), &pod("mounts", spec, json!({})))
        .await
        .expect("create pod");
    let done = wait_for("pod mounts to end", || async {
        pods.get("mounts")
            .await
            .ok()
            .filter(|p| matches!(phase(p).as_str(), "Succeeded" | "Failed"))
    })
    .await;
    let logs = t.sim.logs(&t.ns, "mounts", "main").unwrap_or_default();
    assert_eq!(terminated(&done), Some((0, "Completed".into())), "{logs}");
    for expected in [
        "id=1000:1000 groups=1000 2000",
        // 0400 as asked, plus group-read for the fsGroup (the kubelet's ownership rules).
        "secret=TOP-SECRET mode=440",
        "config=answer = 42",
        "tmp=scratch",
        &format!("namespace={}", t.ns),
        "ca=present",
        &format!(
            "user=system:serviceaccount:{}:default namespace={}",
            t.ns, t.ns
        ),
    ] {
        assert!(
            logs.contains(expected),
            "{expected:?} missing from:\n{logs}"
        );
    }
    assert!(!logs.contains("LEAK"), "{logs}");
    assert!(!Path::new("/var/run/secrets/taskpods").exists());
    assert!(!Path::new("/etc/taskpods-volume-test").exists());
}

/// A pod whose Secret does not exist yet waits in `ContainerCreating`, with the kubelet's message, and
/// starts once the Secret is created (the order the engine's per-task Secrets are made in).
#[tokio::test]
async fn a_pod_waits_for_its_secret_then_starts() {
    let t = TestNs::new("late-secret", true).await;
    let mut spec = restricted_spec("cat /var/run/secrets/late/key", json!([]));
    spec["volumes"] = json!([{"name": "late", "secret": {"secretName": "late"}}]);
    spec["containers"][0]["volumeMounts"] =
        json!([{"name": "late", "mountPath": "/var/run/secrets/late", "readOnly": true}]);
    let pods = t.pods();
    pods.create(&PostParams::default(), &pod("waits", spec, json!({})))
        .await
        .expect("create pod");
    let waiting = wait_for("the pod to wait for its secret", || async {
        let pod = pods.get("waits").await.ok()?;
        let status = pod.status?.container_statuses?.into_iter().next()?;
        let waiting = status.state?.waiting?;
        waiting
            .message
            .filter(|m| m.contains("secret \"late\" not found"))
            .map(|m| (waiting.reason, m))
    })
    .await;
    assert_eq!(
        waiting.0.as_deref(),
        Some("ContainerCreating"),
        "{waiting:?}"
    );
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "late"}, "stringData": {"key": "arrived"}
    }))
    .expect("secret");
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(t.client.clone(), &t.ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
    let done = pod_in_phase(&pods, "waits", "Succeeded").await;
    assert_eq!(terminated(&done), Some((0, "Completed".into())));
    assert_eq!(
        t.sim.logs(&t.ns, "waits", "main").as_deref(),
        Some("arrived")
    );
}
