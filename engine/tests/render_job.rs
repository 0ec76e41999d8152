//! `taskpods render-job` output, together with `deploy/`, checked by third-party validators from PyPI:
//! `kubernetes-validate` (the Kubernetes 1.37 schemas, offline, strict) and `checkov` (security checks,
//! offline with `BC_SKIP_MAPPING=TRUE`). `scripts/install-test-deps` installs both into
//! `$TASKPODS_CACHE/validators` (default `~/.cache/taskpods/validators`); without them these tests fail
//! with a message naming that script (never skipped).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Checks allowed to fail, each with the reason. Nothing else may.
const ACCEPTED_FINDINGS: &[(&str, &str)] = &[(
    "CKV_K8S_40",
    "wants a UID >= 10000 to avoid clashing with host users; the seed's posture asks for UID/GID 1000, \
     and the pod is non-root, without capabilities or privilege escalation, with a read-only root",
)];

/// Toolbox images are pinned by digest (checkov's CKV_K8S_43); a tag alone is what it flags.
const IMAGE: &str = "registry.example/taskpods/task-runner:1.0@sha256:\
                     0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn validators() -> PathBuf {
    let cache = std::env::var_os("TASKPODS_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/taskpods")))
        .expect("HOME or TASKPODS_CACHE");
    let bin = cache.join("validators/bin");
    assert!(
        bin.join("checkov").exists() && bin.join("kubernetes-validate").exists(),
        "validators not found in {}: run scripts/install-test-deps",
        bin.display()
    );
    bin
}

/// A directory with the rendered Job and every manifest of `deploy/tasks/` (the task namespace).
fn manifests(name: &str) -> PathBuf {
    // Not under the target dir: CI keeps that in ~/.cache, and checkov skips hidden directories.
    let dir =
        std::env::temp_dir().join(format!("taskpods-manifests-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_taskpods"))
        .args([
            "render-job",
            "--image",
            IMAGE,
            "--task-id",
            "0191b5a6-2c6f-7d3e-9a4b-5c6d7e8f9a0b",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.join("job.yaml"), &out.stdout).unwrap();
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tasks");
    for entry in std::fs::read_dir(deploy).unwrap() {
        let path = entry.unwrap().path();
        // kustomization.yaml lists the files; it is not a Kubernetes object.
        if path.extension().is_some_and(|e| e == "yaml")
            && path.file_name().is_some_and(|n| n != "kustomization.yaml")
        {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    dir
}

#[test]
fn rendered_job_and_deploy_pass_the_kubernetes_1_37_schemas() {
    let bin = validators();
    let dir = manifests("schema");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let out = Command::new(bin.join("kubernetes-validate"))
        .args(["-k", "1.37", "--strict"])
        .args(&files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    for resource in [
        "job/task-0191b5a62c6f7d3e9a4b5c6d7e8f9a0b",
        "namespace/baker-tasks",
        "resourcequota/taskpods-tasks",
        "limitrange/taskpods-tasks",
        "networkpolicy/default-deny",
        "networkpolicy/task-egress-nats",
        "serviceaccount/taskpods-task",
        "role/taskpods-engine",
        "rolebinding/taskpods-engine",
    ] {
        assert!(
            text.contains(&format!(
                "passed for resource {resource} against version 1.37"
            )),
            "{resource} not validated:\n{text}"
        );
    }
}

#[test]
fn checkov_finds_nothing_but_the_accepted_uid_finding() {
    let bin = validators();
    let dir = manifests("checkov");
    let out = Command::new(bin.join("checkov"))
        .env("BC_SKIP_MAPPING", "TRUE")
        .args([
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--quiet",
            "-d",
        ])
        .arg(&dir)
        .output()
        .unwrap();
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
        summary["passed"].as_u64().unwrap() >= 90,
        "checkov ran too few checks: {summary}"
    );
    let failed: BTreeSet<String> = report["results"]["failed_checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["check_id"].as_str().unwrap(),
                c["resource"].as_str().unwrap()
            )
        })
        .collect();
    let unexpected: Vec<&String> = failed
        .iter()
        .filter(|f| !ACCEPTED_FINDINGS.iter().any(|(id, _)| f.starts_with(id)))
        .collect();
    assert!(
        unexpected.is_empty(),
        "checkov findings beyond the accepted ones: {unexpected:#?}"
    );
    // The accepted finding is the Job's, and it is still there (so the list above stays honest).
    assert!(
        failed.contains("CKV_K8S_40 Job.baker-tasks.task-0191b5a62c6f7d3e9a4b5c6d7e8f9a0b"),
        "{failed:?}"
    );
}

#[test]
fn a_launch_from_stdin_renders_its_resources_and_keeps_its_script_and_env_out_of_the_job() {
    let launch = r#"{"script": "echo s3cret-script", "image": "registry.example/x:1",
        "env": {"API_TOKEN": "s3cret-env"}, "timeout_secs": 90,
        "resources": {"cpu_request": "250m", "cpu_limit": "1", "memory_request": "128Mi", "memory_limit": "256Mi"},
        "idempotency_key": "render-1", "requester": "brain-7"}"#;
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskpods"))
        .args(["render-job", "--launch", "-", "--without-credentials"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), launch.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    let task = taskpods_events::TaskId::from_idempotency_key("render-1");
    for expected in [
        format!("name: \"{}\"", task.job_name()),
        format!("taskpods.dev/task-id: \"{task}\""),
        "activeDeadlineSeconds: 92".to_owned(),
        "cpu: \"250m\"".to_owned(),
        "cpu: \"1000m\"".to_owned(),
        "memory: \"128Mi\"".to_owned(),
        "memory: \"256Mi\"".to_owned(),
        "image: \"registry.example/x:1\"".to_owned(),
        "taskpods.dev/requester: \"brain-7\"".to_owned(),
    ] {
        assert!(yaml.contains(&expected), "{expected} missing from:\n{yaml}");
    }
    assert!(
        !yaml.contains("s3cret"),
        "script and env travel over NATS only:\n{yaml}"
    );
    assert!(!yaml.contains("TASKPODS_NATS_CREDS"), "{yaml}");

    let bad = Command::new(env!("CARGO_BIN_EXE_taskpods"))
        .args(["render-job", "--launch", "/nonexistent/launch.json"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cannot read /nonexistent/launch.json"));
}
