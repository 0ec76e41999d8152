//! The engine as a pod of the test cluster, installed from `deploy/` the way a platform team installs it:
//!
//! - `kustomize build deploy/engine` and `deploy/tasks` (the namespaces, the engine's ServiceAccount, its
//!   Role and RoleBinding in the task namespace, the ConfigMap generated from `taskpods.toml`, the
//!   Deployment), applied to the real API server; the Deployment only patched as an overlay would (one
//!   replica, the test's NATS address, a loopback port for the probes);
//! - the Secrets the install asks for made from `taskpods auth init` material, for a nats-server started by
//!   the test with authorization on, as deployed;
//! - the real Deployment and ReplicaSet controllers make the pod; the node simulator runs it with its image
//!   mapped to the `taskpods` binary, under bubblewrap, its ConfigMap, Secret and ServiceAccount token
//!   mounted where the Deployment says, as UID 10001.
//!
//! The engine in the pod has no kubeconfig: it reaches the API server with in-cluster configuration (the
//! mounted token, `KUBERNETES_SERVICE_HOST`), is allowed only what the Role grants, reads its configuration
//! from the ConfigMap (`backend = kubernetes`, `namespace = baker-tasks`) and its credentials from the
//! Secret. A Brain launches tasks over NATS; their Jobs run (the agent binary mapped to the task image) and
//! are reaped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DynamicObject, ListParams, PostParams};
use kube::discovery::pinned_kind;
use kube::{Api, Client};
use serde_json::{Value, json};
use taskpods_client::{Client as TaskClient, ClientConfig};
use taskpods_engine::executor::kubernetes::job::TASK_LABEL;
use taskpods_events::{LaunchPolicy, TaskState};
use taskpods_harness::NatsServer;
use taskpods_harness::kube::{ControlPlane, NodeSimulator, k8s_openapi, kube};
use taskpods_integration as fixtures;

const ENGINE_NS: &str = "taskpods";
const TASKS_NS: &str = "baker-tasks";
const WAIT: Duration = Duration::from_secs(120);

/// `kustomize build deploy/<dir>`, as JSON objects.
fn rendered(dir: &str) -> Vec<Value> {
    fixtures::yaml_objects(&fixtures::kustomize_build(&format!("deploy/{dir}")))
}

/// Creates `object` as the admin would with `kubectl create`.
async fn create(admin: &Client, object: Value) {
    let (group, version) = match object["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g.to_owned(), v.to_owned()),
        None => (
            String::new(),
            object["apiVersion"].as_str().unwrap().to_owned(),
        ),
    };
    let kind = object["kind"].as_str().unwrap().to_owned();
    let gvk = kube::api::GroupVersionKind::gvk(&group, &version, &kind);
    let (resource, caps) = pinned_kind(admin, &gvk).await.expect("kind is served");
    let object: DynamicObject = serde_json::from_value(object).unwrap();
    let api: Api<DynamicObject> = match (&caps.scope, object.metadata.namespace.as_deref()) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => {
            Api::namespaced_with(admin.clone(), ns, &resource)
        }
        _ => Api::all_with(admin.clone(), &resource),
    };
    api.create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("create {kind} {:?}: {e}", object.metadata.name));
}

fn secret(ns: &str, name: &str, files: &[(&str, Vec<u8>)]) -> Value {
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            ..Default::default()
        },
        data: Some(
            files
                .iter()
                .map(|(key, bytes)| ((*key).to_owned(), ByteString(bytes.clone())))
                .collect(),
        ),
        ..Secret::default()
    };
    let mut value = serde_json::to_value(secret).unwrap();
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("Secret");
    value
}

/// An environment variable of the engine container, added or replaced.
fn set_env(container: &mut Value, name: &str, value: &str) {
    let env = container["env"]
        .as_array_mut()
        .expect("the container has env");
    env.retain(|e| e["name"] != name);
    env.push(json!({"name": name, "value": value}));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on the engine pod's HTTP port: the status code, or `None` while nothing answers.
async fn http_status(port: u16, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok()?;
    answer.split_whitespace().nth(1)?.parse().ok()
}

/// What the engine's namespace holds (Deployment, ReplicaSets, pods, events), for a failure message.
async fn describe(admin: &Client, sim: &NodeSimulator) -> String {
    let mut out = String::new();
    for (kind, plural, group) in [
        ("Deployment", "deployments", "apps/v1"),
        ("ReplicaSet", "replicasets", "apps/v1"),
        ("Pod", "pods", "v1"),
        ("Event", "events", "v1"),
    ] {
        let (g, v) = group.split_once('/').unwrap_or(("", group));
        let resource = kube::discovery::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk(g, v, kind),
            plural,
        );
        let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), ENGINE_NS, &resource);
        if let Ok(list) = api.list(&ListParams::default()).await {
            for item in list.items {
                let name = item.metadata.name.clone().unwrap_or_default();
                let detail = if kind == "Event" {
                    format!("{} {}", item.data["reason"], item.data["message"])
                } else {
                    item.data["status"].to_string()
                };
                out.push_str(&format!("{kind} {name}: {detail}\n"));
                if kind == "Pod" {
                    for container in ["engine"] {
                        if let Some(log) = sim.logs(ENGINE_NS, &name, container) {
                            out.push_str(&format!("--- log of {name}/{container}:\n{log}\n"));
                        }
                    }
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_engine_runs_as_a_pod_from_deploy_and_its_tasks_run_and_are_reaped() {
    let cp =
        ControlPlane::shared().expect("control plane starts (run tests/kube-env/build.sh first)");
    let admin = cp.client().await.expect("admin client");
    let nats = NatsServer::start_secured();

    // The installation, as rendered. Namespaces first, the Deployment last (after its Secrets).
    let mut objects = rendered("tasks");
    objects.extend(rendered("engine"));
    let (namespaces, rest): (Vec<_>, Vec<_>) =
        objects.into_iter().partition(|o| o["kind"] == "Namespace");
    let (mut deployments, rest): (Vec<_>, Vec<_>) =
        rest.into_iter().partition(|o| o["kind"] == "Deployment");
    assert_eq!(
        namespaces.len(),
        2,
        "deploy/engine and deploy/tasks each have their namespace"
    );
    assert_eq!(
        deployments.len(),
        1,
        "deploy/engine has the engine's Deployment"
    );
    for object in namespaces.into_iter().chain(rest) {
        create(&admin, object).await;
    }

    // The Secrets the install asks the operator for, from `taskpods auth init` material.
    let auth = nats.auth_dir();
    let read =
        |file: &str| std::fs::read(auth.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    create(
        &admin,
        secret(
            ENGINE_NS,
            "taskpods-engine-creds",
            &[
                ("engine.creds", read("engine.creds")),
                ("task-signer.nk", read("task-signer.nk")),
                ("seal.key", read("seal.key")),
            ],
        ),
    )
    .await;
    create(
        &admin,
        secret(
            ENGINE_NS,
            "taskpods-ui-tokens",
            &[
                ("read", b"read-token-of-the-test".to_vec()),
                ("operator", b"operator-token-of-the-test".to_vec()),
            ],
        ),
    )
    .await;

    // The Deployment, patched as an overlay would: one replica (the probes' port is the host's here), the
    // test's NATS server, and the probes on a free loopback port.
    let http_port = free_port();
    let mut deployment = deployments.remove(0);
    deployment["spec"]["replicas"] = json!(1);
    let container = &mut deployment["spec"]["template"]["spec"]["containers"][0];
    let engine_image = container["image"].as_str().unwrap().to_owned();
    set_env(
        container,
        "TASKPODS__NATS__URLS",
        &format!("[\"{}\"]", nats.url()),
    );
    set_env(container, "TASKPODS__TOPOLOGY__REPLICAS", "1");
    set_env(
        container,
        "TASKPODS__KUBERNETES__AGENT_NATS_URL",
        &nats.url(),
    );
    set_env(
        container,
        "TASKPODS__HTTP__BIND",
        &format!("127.0.0.1:{http_port}"),
    );
    create(&admin, deployment).await;

    // One node, running the engine's image as the `taskpods` binary and the task image as the agent.
    let policy = LaunchPolicy::default();
    let task_image = policy.toolboxes[&policy.default_toolbox].clone();
    let repository = |image: &str| {
        image
            .rsplit_once(':')
            .map_or(image.to_owned(), |(r, _)| r.to_owned())
    };
    let sim = NodeSimulator::builder(admin.clone())
        .node_name("sim-engine-pod")
        .api_server(cp.server_url())
        .capacity("32", "64Gi")
        .image(
            repository(&engine_image),
            env!("CARGO_BIN_EXE_taskpods-under-test"),
        )
        .image(
            repository(&task_image),
            env!("CARGO_BIN_EXE_taskpods-agent-under-test"),
        )
        .start()
        .await
        .expect("node simulator");

    // The Deployment controller makes the pod; the engine in it becomes ready (NATS reachable with the
    // Secret's credentials, every loop running).
    let pods = Api::<Pod>::namespaced(admin.clone(), ENGINE_NS);
    let running = tokio::time::timeout(WAIT, async {
        loop {
            let running = pods
                .list(&ListParams::default().labels("app.kubernetes.io/name=taskpods-engine"))
                .await
                .ok()
                .and_then(|list| {
                    list.items.into_iter().find(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                });
            if let Some(pod) = running {
                return pod;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    let Ok(engine_pod) = running else {
        panic!(
            "the engine's pod never ran:\n{}",
            describe(&admin, &sim).await
        );
    };
    let pod_name = engine_pod.metadata.name.clone().unwrap();
    let logs = || sim.logs(ENGINE_NS, &pod_name, "engine").unwrap_or_default();
    let ready = tokio::time::timeout(WAIT, async {
        loop {
            if http_status(http_port, "/readyz").await == Some(200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    assert!(
        ready.is_ok(),
        "the engine pod never became ready; its log:\n{}",
        logs()
    );
    let spec = engine_pod.spec.as_ref().unwrap();
    assert_eq!(
        spec.service_account_name.as_deref(),
        Some("taskpods-engine")
    );
    assert!(
        spec.volumes
            .iter()
            .flatten()
            .any(|v| v.projected.as_ref().is_some_and(|p| p
                .sources
                .iter()
                .flatten()
                .any(|s| s.service_account_token.is_some()))),
        "the pod has the ServiceAccount token volume the engine's in-cluster configuration reads"
    );

    // A Brain launches tasks; the engine in the pod makes their Jobs in baker-tasks (its Role), the node
    // runs the agent, and each task ends and is reaped.
    let brain = TaskClient::new(
        async_nats::ConnectOptions::new()
            .credentials_file(nats.creds("brain"))
            .await
            .expect("brain creds")
            .connect(nats.url())
            .await
            .expect("brain connects"),
        ClientConfig {
            reply_timeout: Duration::from_secs(10),
            ..ClientConfig::default()
        },
    );
    let ok = fixtures::launch_script(
        &brain,
        "echo \"hello from the engine pod's task, uid $(id -u)\"",
        120,
    )
    .await;
    let fails = fixtures::launch_script(&brain, "exit 7", 120).await;
    let jobs = Api::<Job>::namespaced(admin.clone(), TASKS_NS);
    let job = fixtures::wait_for("the first task's Job", WAIT, || async {
        jobs.list(&ListParams::default().labels(&format!("{TASK_LABEL}={ok}")))
            .await
            .ok()?
            .items
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(
        job.metadata.name.as_deref(),
        Some(ok.job_name().as_str()),
        "the Job is the engine's, named after the task"
    );
    for task in [ok, fails] {
        let kinds = fixtures::until_reaped(&brain, task, WAIT).await;
        assert!(
            kinds.contains(&"running"),
            "{task}: {kinds:?}\nengine log:\n{}",
            logs()
        );
    }
    assert_eq!(fixtures::state(&brain, ok).await, TaskState::Succeeded);
    assert!(matches!(
        fixtures::state(&brain, fails).await,
        TaskState::Failed { .. }
    ));
    let page = brain
        .output_page(ok, 0, 1 << 20)
        .await
        .expect("the task's output");
    let stdout: Vec<u8> = page
        .chunks
        .iter()
        .filter_map(|c| match &c.piece {
            taskpods_client::output::Piece::Stdout(bytes) => Some(bytes.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    let stdout = String::from_utf8_lossy(&stdout);
    assert!(
        stdout.contains("hello from the engine pod's task, uid 1000"),
        "{stdout}"
    );
    // Reaped: the Jobs are gone (deleted by the engine, through its Role).
    fixtures::wait_for("the Jobs to be deleted", WAIT, || async {
        let left = jobs
            .list(&ListParams::default().labels(TASK_LABEL))
            .await
            .ok()?
            .items
            .into_iter()
            .filter(|j| j.metadata.deletion_timestamp.is_none())
            .count();
        (left == 0).then_some(())
    })
    .await;

    // The engine had no other way in: no kubeconfig in the pod, and the API server saw the engine's
    // ServiceAccount (its token is the only credential mounted).
    let env: Vec<String> = engine_pod.spec.as_ref().unwrap().containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| e.name.clone())
        .collect();
    assert!(!env.iter().any(|e| e == "KUBECONFIG"), "{env:?}");

    sim.shutdown().await.expect("node simulator stops");
}
