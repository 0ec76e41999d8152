//! The cluster installation in `deploy/` (the kustomize base and `overlays/production`), checked the way a
//! platform team checks manifests before applying them:
//!
//! - rendered by `kustomize build` (the binary `scripts/install-test-deps` builds from its Go module);
//! - every object validated by `kubernetes-validate -k 1.37 --strict`, and checkov finding nothing but the
//!   skips written next to the objects (`checkov.io/skip*` annotations, each with its reason);
//! - (feature `kube`) applied to the real test API server with server-side dry-run (schema, defaulting,
//!   RBAC escalation and quota admission), and every workload's pod template admitted by Pod Security
//!   `restricted` in its namespace, with a loosened copy refused to show the check has teeth.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use taskpods_integration::{cache, kustomize_build, yaml_objects as objects};

fn validators() -> PathBuf {
    let bin = cache().join("validators/bin");
    assert!(
        bin.join("checkov").exists() && bin.join("kubernetes-validate").exists(),
        "validators not found in {}: run scripts/install-test-deps",
        bin.display()
    );
    bin
}

/// The rendering written to a fresh directory (not under a hidden one: checkov skips those).
fn rendered_dir(name: &str, yaml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("taskpods-deploy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("install.yaml"), yaml).expect("rendering written");
    dir
}

fn kind_name(o: &serde_json::Value) -> String {
    format!(
        "{}/{}",
        o["kind"].as_str().unwrap_or("?").to_lowercase(),
        o["metadata"]["name"].as_str().unwrap_or("?")
    )
}

#[test]
fn the_installation_renders_every_part_and_passes_kubernetes_validate_strict() {
    for overlay in ["deploy/base", "deploy/overlays/production"] {
        let yaml = kustomize_build(overlay);
        let objects = objects(&yaml);
        let names: BTreeSet<String> = objects.iter().map(kind_name).collect();
        for expected in [
            "namespace/baker-tasks",
            "namespace/taskpods",
            "resourcequota/taskpods-tasks",
            "networkpolicy/default-deny",
            "networkpolicy/taskpods-engine",
            "networkpolicy/nats",
            "serviceaccount/taskpods-task",
            "serviceaccount/taskpods-engine",
            "role/taskpods-engine",
            "rolebinding/taskpods-engine",
            "deployment/taskpods-engine",
            "poddisruptionbudget/taskpods-engine",
            "service/taskpods-ui",
            "statefulset/nats",
            "service/nats",
            "service/nats-cluster",
            "poddisruptionbudget/nats",
        ] {
            assert!(
                names.contains(expected),
                "{overlay}: {expected} missing from {names:?}"
            );
        }
        let engine = objects
            .iter()
            .find(|o| kind_name(o) == "deployment/taskpods-engine")
            .expect("engine deployment");
        let replicas = engine["spec"]["replicas"].as_u64().unwrap_or(0);
        assert!(
            replicas >= 2,
            "{overlay}: the engine runs {replicas} replica(s)"
        );
        let nats = objects
            .iter()
            .find(|o| kind_name(o) == "statefulset/nats")
            .expect("nats statefulset");
        assert_eq!(
            nats["spec"]["replicas"], 3,
            "{overlay}: NATS is a three-node cluster"
        );
        // The engine's config is the ConfigMap kustomize generated, with a content-hash name.
        let volumes = engine["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .expect("volumes");
        let config = volumes
            .iter()
            .find(|v| v["name"] == "config")
            .and_then(|v| v["configMap"]["name"].as_str())
            .expect("config volume");
        assert!(
            config.starts_with("taskpods-engine-config-")
                && names.contains(&format!("configmap/{config}")),
            "{overlay}: the engine mounts {config}, which the rendering does not contain"
        );
        if overlay.ends_with("production") {
            let image = engine["spec"]["template"]["spec"]["containers"][0]["image"]
                .as_str()
                .expect("image");
            assert!(
                image.contains("@sha256:"),
                "production pins the engine by digest: {image}"
            );
            assert_eq!(replicas, 3);
        }

        let dir = rendered_dir("validate", &yaml);
        let out = Command::new(validators().join("kubernetes-validate"))
            .args(["-k", "1.37", "--strict"])
            .arg(dir.join("install.yaml"))
            .output()
            .expect("kubernetes-validate runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{overlay}: kubernetes-validate failed:\n{text}"
        );
        for name in &names {
            assert!(
                text.contains(&format!("passed for resource {name} against version 1.37")),
                "{overlay}: {name} not validated:\n{text}"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn task_pods_may_reach_nats_and_nothing_else_not_even_dns() {
    let objects = objects(&kustomize_build("deploy/overlays/production"));
    let policies: Vec<&serde_json::Value> = objects
        .iter()
        .filter(|o| o["kind"] == "NetworkPolicy")
        .collect();
    let task_egress = policies
        .iter()
        .find(|p| p["metadata"]["name"] == "task-egress-nats")
        .expect("the task egress policy");
    let namespace = &task_egress["metadata"]["namespace"];
    let mut ports = BTreeSet::new();
    for policy in policies
        .iter()
        .filter(|p| &p["metadata"]["namespace"] == namespace)
    {
        for rule in policy["spec"]["egress"].as_array().into_iter().flatten() {
            // A rule without `to` allows every destination.
            assert!(
                rule["to"].as_array().is_some_and(|to| !to.is_empty()),
                "{}: an egress rule open to anywhere: {rule}",
                kind_name(policy)
            );
            let rule_ports = rule["ports"]
                .as_array()
                .expect("every egress rule names its ports");
            for port in rule_ports {
                ports.insert(format!(
                    "{}/{}",
                    port["protocol"].as_str().unwrap_or("TCP"),
                    port["port"]
                ));
            }
        }
    }
    assert_eq!(
        ports,
        BTreeSet::from(["TCP/4222".to_owned()]),
        "task pods' egress (53 would be DNS, a channel out through any resolver)"
    );
}

#[test]
fn checkov_finds_nothing_but_the_written_skips() {
    let yaml = kustomize_build("deploy/overlays/production");
    let dir = rendered_dir("checkov", &yaml);
    let out = Command::new(validators().join("checkov"))
        .env("BC_SKIP_MAPPING", "TRUE")
        // Not --quiet: the report must list the skipped checks too.
        .args(["--framework", "kubernetes", "--output", "json", "-d"])
        .arg(&dir)
        .output()
        .expect("checkov runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "checkov printed no JSON report ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let summary = &report["summary"];
    assert_eq!(summary["parsing_errors"], 0, "{summary}");
    assert!(
        summary["passed"].as_u64().unwrap_or(0) >= 150,
        "checkov ran too few checks: {summary}"
    );
    let failed: Vec<String> = report["results"]["failed_checks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| format!("{} {} ({})", c["check_id"], c["resource"], c["check_name"]))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        failed.is_empty(),
        "checkov findings:\n{}",
        failed.join("\n")
    );
    // Every skip is written next to its object with a reason, and no other skip exists.
    let skipped: BTreeSet<String> = report["results"]["skipped_checks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    let reason = c["check_result"]["suppress_comment"].as_str().unwrap_or("");
                    assert!(
                        reason.len() > 20,
                        "skip of {} has no real reason: {reason:?}",
                        c["check_id"]
                    );
                    format!(
                        "{} {}",
                        c["check_id"].as_str().unwrap_or("?"),
                        c["resource"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let expected: BTreeSet<String> = [
        "CKV_K8S_38 Deployment.taskpods.taskpods-engine",
        "CKV_K8S_35 Deployment.taskpods.taskpods-engine",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(skipped, expected, "the written checkov skips");
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(feature = "kube")]
mod cluster {
    use super::*;
    use taskpods_harness::kube::{ControlPlane, k8s_openapi, kube};

    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
    use kube::core::GroupVersionKind;
    use kube::{Api, Client};

    async fn api_for(client: &Client, object: &serde_json::Value) -> Api<DynamicObject> {
        let (group, version) = match object["apiVersion"]
            .as_str()
            .expect("apiVersion")
            .split_once('/')
        {
            Some((g, v)) => (g.to_owned(), v.to_owned()),
            None => (
                String::new(),
                object["apiVersion"].as_str().unwrap_or_default().to_owned(),
            ),
        };
        let gvk = GroupVersionKind::gvk(&group, &version, object["kind"].as_str().expect("kind"));
        let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
            .await
            .unwrap_or_else(|e| panic!("the API server does not serve {gvk:?}: {e}"));
        match (object["metadata"]["namespace"].as_str(), caps.scope) {
            (Some(ns), kube::discovery::Scope::Namespaced) => {
                Api::namespaced_with(client.clone(), ns, &resource)
            }
            _ => Api::all_with(client.clone(), &resource),
        }
    }

    /// A pod made from a workload's pod template, as its controller would create it.
    fn pod_from_template(workload: &serde_json::Value) -> Pod {
        let template = &workload["spec"]["template"];
        let mut pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": format!("{}-dry-run", workload["metadata"]["name"].as_str().unwrap_or("x")),
                "namespace": workload["metadata"]["namespace"],
                "labels": template["metadata"]["labels"],
            },
            "spec": template["spec"],
        });
        // Volume claim templates become PVC volumes; the dry-run pod needs no storage.
        if let Some(volumes) = pod["spec"]["volumes"].as_array_mut() {
            volumes.push(serde_json::json!({"name": "data", "emptyDir": {}}));
        }
        serde_json::from_value(pod).expect("a pod")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_installation_is_accepted_by_a_real_api_server_with_server_side_dry_run() {
        let cp = ControlPlane::shared().expect("control plane");
        let client = cp.client().await.expect("admin client");
        let objects = objects(&kustomize_build("deploy/overlays/production"));

        // Namespaces are created for real (a dry-run namespace cannot hold dry-run objects), then their
        // ServiceAccounts (pod admission needs them to exist); everything else only as a server-side dry run.
        let manager = PatchParams::apply("taskpods-deploy-test").force();
        for phase in ["Namespace", "ServiceAccount"] {
            for object in objects.iter().filter(|o| o["kind"] == phase) {
                let name = object["metadata"]["name"].as_str().expect("name");
                let dynamic: DynamicObject =
                    serde_json::from_value(object.clone()).expect("object");
                api_for(&client, object)
                    .await
                    .patch(name, &manager, &Patch::Apply(&dynamic))
                    .await
                    .unwrap_or_else(|e| panic!("{} refused: {e}", kind_name(object)));
            }
        }
        let dry_run = PatchParams::apply("taskpods-deploy-test").force().dry_run();
        let mut accepted = 0;
        for object in objects
            .iter()
            .filter(|o| o["kind"] != "Namespace" && o["kind"] != "ServiceAccount")
        {
            let name = object["metadata"]["name"].as_str().expect("name");
            let dynamic: DynamicObject = serde_json::from_value(object.clone()).expect("object");
            let result = api_for(&client, object)
                .await
                .patch(name, &dry_run, &Patch::Apply(&dynamic))
                .await
                .unwrap_or_else(|e| panic!("{} refused by the API server: {e}", kind_name(object)));
            assert_eq!(result.metadata.name.as_deref(), Some(name));
            accepted += 1;
        }
        // Everything but the 2 namespaces and 3 ServiceAccounts: the engine's and NATS's workloads, services,
        // PDBs, ConfigMaps, policies, quota, limits, Role and binding.
        assert!(
            accepted >= 15,
            "only {accepted} objects were dry-run applied"
        );

        // Pod Security `restricted` (enforced in both namespaces) admits every workload's pods...
        let workloads: Vec<&serde_json::Value> = objects
            .iter()
            .filter(|o| o["kind"] == "Deployment" || o["kind"] == "StatefulSet")
            .collect();
        assert_eq!(workloads.len(), 2, "the engine and NATS");
        let dry_create = PostParams {
            dry_run: true,
            ..Default::default()
        };
        for workload in &workloads {
            let pod = pod_from_template(workload);
            let ns = pod.metadata.namespace.clone().expect("namespace");
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            pods.create(&dry_create, &pod).await.unwrap_or_else(|e| {
                panic!("{}'s pod refused by admission: {e}", kind_name(workload))
            });
            // ...and refuses the same pod with its posture loosened, so the admission above was real.
            let mut loose = pod.clone();
            if let Some(container) = loose.spec.as_mut().and_then(|s| s.containers.first_mut()) {
                let sc = container
                    .security_context
                    .get_or_insert_with(Default::default);
                sc.allow_privilege_escalation = Some(true);
                sc.capabilities = None;
            }
            let refused = pods
                .create(&dry_create, &loose)
                .await
                .expect_err("a loosened pod must be refused");
            assert!(
                refused.to_string().contains("violates PodSecurity"),
                "{}: refused for another reason: {refused}",
                kind_name(workload)
            );
        }
    }
}
