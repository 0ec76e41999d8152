//! The task Job, built as a pure function of the task and the configuration, with the posture of
//! docs/ARCHITECTURE.md section 9 (Security) field by field. Nothing here talks to Kubernetes: the same function serves the
//! backend, `taskpods render-job` and the posture tests.
//!
//! | posture | where |
//! |---|---|
//! | dedicated ServiceAccount, no token | `serviceAccountName`, `automountServiceAccountToken: false` |
//! | non-root, UID/GID 1000 | pod and container `runAsNonRoot`, `runAsUser`, `runAsGroup` (+ `fsGroup`) |
//! | read-only root, writable `/tmp` only | `readOnlyRootFilesystem`, one size-limited `emptyDir` at `/tmp` |
//! | no privileges | `capabilities.drop: [ALL]`, `allowPrivilegeEscalation: false`, `privileged: false` |
//! | seccomp | `RuntimeDefault` on the pod and the container |
//! | bounded | `activeDeadlineSeconds = min(timeout + 2, 1800)` (see [`active_deadline_secs`]), `backoffLimit: 0`, `restartPolicy: Never` |
//! | cleaned up | `ttlSecondsAfterFinished` (a backstop: the reaper deletes the Job first) |
//! | accounted | CPU and memory requests and limits always set |
//! | selectable | labels on the Job and on the pod template (NetworkPolicies select pods) |
//! | credentials | the task's own NATS identity, from its own Secret ([`credentials_secret`], owned by the Job), mounted read-only into this pod only |

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, PodSecurityContext,
    PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, Secret, SecretKeySelector,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use taskpods_events::command::MAX_TIMEOUT_SECS;
use taskpods_events::env::{SECRET_ENV_NAMES_VAR, SECRET_ENV_VALUE_PREFIX};
use taskpods_events::{Mode, TaskId, TaskSpec};

/// Label with the task id (a UUID, valid as a label value); the watcher and reconciler select on it.
pub const TASK_LABEL: &str = "taskpods.dev/task-id";
/// Label with the attempt number (always 1 today: one Job per task, `backoffLimit: 0`).
pub const ATTEMPT_LABEL: &str = "taskpods.dev/attempt";
/// The standard managed-by label; its value is [`MANAGED_BY`].
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Who manages task Jobs.
pub const MANAGED_BY: &str = "taskpods";
/// The selector for everything the engine manages.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=taskpods";
/// The task pod's only container.
pub const CONTAINER: &str = "agent";
/// The UID and GID task code runs as (the seed's posture).
pub const TASK_UID: i64 = 1000;
/// Where the task's NATS credentials Secret is mounted.
pub const CREDS_DIR: &str = "/var/run/secrets/taskpods/nats";
/// The key of the credentials file in that Secret.
pub const CREDS_KEY: &str = "nats.creds";
/// Label marking a task's credentials Secret (value [`CREDENTIALS_COMPONENT`]), next to the task labels.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// The component value of credentials Secrets.
pub const CREDENTIALS_COMPONENT: &str = "nats-credentials";
/// The selector for every task credentials Secret the engine made.
pub const CREDENTIALS_SELECTOR: &str =
    "app.kubernetes.io/managed-by=taskpods,app.kubernetes.io/component=nats-credentials";

/// The name of `task`'s credentials Secret: its Job's name plus `-nats`.
pub fn credentials_secret_name(task: TaskId) -> String {
    format!("{}-nats", task.job_name())
}

/// The Secret holding `task`'s own NATS credentials (`creds`, a credentials file), owned by its Job
/// (`job_uid`), so that deleting the Job deletes it; immutable, in the Job's namespace.
pub fn credentials_secret(task: TaskId, job_uid: &str, creds: &str, config: &JobConfig) -> Secret {
    let mut labels = labels(task);
    labels.insert(COMPONENT_LABEL.to_owned(), CREDENTIALS_COMPONENT.to_owned());
    Secret {
        metadata: ObjectMeta {
            name: Some(credentials_secret_name(task)),
            namespace: Some(config.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![OwnerReference {
                api_version: "batch/v1".to_owned(),
                kind: "Job".to_owned(),
                name: task.job_name(),
                uid: job_uid.to_owned(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..ObjectMeta::default()
        },
        immutable: Some(true),
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            CREDS_KEY.to_owned(),
            ByteString(creds.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// What the Job builder needs besides the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobConfig {
    /// The namespace task Jobs live in.
    pub namespace: String,
    /// The task pods' ServiceAccount (no RoleBindings, token not mounted).
    pub service_account: String,
    /// NATS URL(s) the agent connects to, comma-separated.
    pub nats_url: String,
    /// Subject prefix.
    pub prefix: String,
    /// Whether task pods mount their own credentials Secret ([`credentials_secret_name`], made by the
    /// backend after the Job). The engine sets it when it has a task signer; without, agents connect
    /// with no credentials, which only a NATS server without authorization accepts.
    pub task_credentials: bool,
    /// Size of the pod's writable `/tmp`, bytes.
    pub tmp_bytes: u64,
    /// Seconds a finished Job stays before Kubernetes deletes it (a backstop to the reaper).
    pub ttl_after_finished_secs: i32,
    /// Seconds between SIGTERM and SIGKILL when the pod is stopped.
    pub termination_grace_secs: i64,
    /// `Always` (a pinned digest makes it cheap) or `IfNotPresent`.
    pub image_pull_policy: String,
    /// Run task pods in their own user namespace (`hostUsers: false`): root or UID 1000 in the pod is an
    /// unprivileged UID on the node. Needs a cluster that supports it (Kubernetes 1.33+ with a kernel
    /// and runtime with ID-mapped mounts, e.g. Linux 6.3+, containerd 2 or CRI-O 1.25+); off by default
    /// because pods on a node without that support do not start.
    pub user_namespace: bool,
}

impl Default for JobConfig {
    fn default() -> Self {
        Self {
            namespace: "baker-tasks".to_owned(),
            service_account: "taskpods-task".to_owned(),
            nats_url: "nats://nats.taskpods.svc:4222".to_owned(),
            prefix: "taskpods".to_owned(),
            task_credentials: true,
            tmp_bytes: 256 << 20,
            ttl_after_finished_secs: 3600,
            termination_grace_secs: 10,
            image_pull_policy: "Always".to_owned(),
            user_namespace: false,
        }
    }
}

/// The labels on the Job and on its pod template.
pub fn labels(task: TaskId) -> BTreeMap<String, String> {
    BTreeMap::from([
        (TASK_LABEL.to_owned(), task.to_string()),
        (ATTEMPT_LABEL.to_owned(), "1".to_owned()),
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        (
            "app.kubernetes.io/name".to_owned(),
            "taskpods-task".to_owned(),
        ),
    ])
}

/// Seconds Kubernetes' deadline trails the engine's own.
pub const BACKSTOP_MARGIN_SECS: u32 = 2;

/// `activeDeadlineSeconds`: the task's timeout plus [`BACKSTOP_MARGIN_SECS`], never more than the seed's
/// 30 minutes. The Job's deadline is the backstop to the engine's timer, which must act first: Kubernetes
/// counts from the Job's `startTime`, kept to the second (truncated), so with exactly the timeout it
/// killed the pod up to a second before the engine's deadline, and the killed code's exit 143 was
/// recorded as a failure instead of `TimedOut`. At the 1800 s cap the margin shrinks to what is left.
pub fn active_deadline_secs(spec: &TaskSpec) -> i64 {
    i64::from(
        spec.timeout_secs
            .clamp(1, MAX_TIMEOUT_SECS)
            .saturating_add(BACKSTOP_MARGIN_SECS)
            .min(MAX_TIMEOUT_SECS),
    )
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn quantities(cpu_millis: u64, memory_bytes: u64) -> BTreeMap<String, Quantity> {
    BTreeMap::from([
        ("cpu".to_owned(), Quantity(format!("{cpu_millis}m"))),
        ("memory".to_owned(), bytes(memory_bytes)),
    ])
}

/// Bytes as a Kubernetes quantity, in the largest binary unit that divides them (`512Mi`, not `536870912`).
pub fn bytes(n: u64) -> Quantity {
    let text = [("Gi", 30), ("Mi", 20), ("Ki", 10)]
        .iter()
        .find(|(_, shift)| n != 0 && n.is_multiple_of(1u64 << shift))
        .map_or_else(
            || n.to_string(),
            |(unit, shift)| format!("{}{unit}", n >> shift),
        );
    Quantity(text)
}

/// The Job for `task`.
pub fn build(task: TaskId, spec: &TaskSpec, deadline: DateTime<Utc>, config: &JobConfig) -> Job {
    let name = task.job_name();
    let labels = labels(task);
    let mut annotations = BTreeMap::from([
        (
            "taskpods.dev/deadline".to_owned(),
            deadline.to_rfc3339_opts(SecondsFormat::Secs, true),
        ),
        (
            "taskpods.dev/mode".to_owned(),
            match spec.mode {
                Mode::Script => "script",
                Mode::Agent => "agent",
            }
            .to_owned(),
        ),
        (
            "taskpods.dev/description".to_owned(),
            format!("taskpods task {task}; see `taskpods show {task}`"),
        ),
    ]);
    if let Some(requester) = &spec.requester {
        annotations.insert("taskpods.dev/requester".to_owned(), requester.clone());
    }
    if let Some(toolbox) = &spec.toolbox {
        annotations.insert("taskpods.dev/toolbox".to_owned(), toolbox.clone());
    }
    // The caller's labels are for people, so they go in an annotation: as pod labels they could match a
    // NetworkPolicy selector and widen what the task may reach.
    if !spec.labels.is_empty()
        && let Ok(json) = serde_json::to_string(&spec.labels)
    {
        annotations.insert("taskpods.dev/labels".to_owned(), json);
    }

    let mut vars = vec![
        env("TASKPODS_TASK_ID", task.to_string()),
        env("TASKPODS_NATS_URL", config.nats_url.clone()),
        env("TASKPODS_PREFIX", config.prefix.clone()),
        env(
            "TASKPODS_DEADLINE",
            deadline.to_rfc3339_opts(SecondsFormat::Secs, true),
        ),
        // The pod is the sandbox: no bubblewrap inside it (it would need privileges the pod lacks).
        env("TASKPODS_SANDBOX", "none"),
        env("TASKPODS_TMP_BYTES", config.tmp_bytes.to_string()),
    ];
    // Values from the task namespace's Secrets: the kubelet resolves them, the engine never reads them.
    // Under a prefix, so a Secret cannot change the agent's own environment; the agent hands each to
    // the code under its own name.
    if !spec.secret_env.is_empty() {
        let names: Vec<&str> = spec.secret_env.keys().map(String::as_str).collect();
        vars.push(env(SECRET_ENV_NAMES_VAR, names.join(",")));
        for (name, reference) in &spec.secret_env {
            vars.push(EnvVar {
                name: format!("{SECRET_ENV_VALUE_PREFIX}{name}"),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: reference.name.clone(),
                        key: reference.key.clone(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            });
        }
    }
    let mut mounts = vec![VolumeMount {
        name: "tmp".to_owned(),
        mount_path: "/tmp".to_owned(),
        ..VolumeMount::default()
    }];
    let mut volumes = vec![Volume {
        name: "tmp".to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(bytes(config.tmp_bytes)),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    }];
    if config.task_credentials {
        // A file, not an environment variable: env leaks into child processes and crash dumps. The
        // Secret is made right after the Job (it is owned by it); until it exists the pod waits in
        // ContainerCreating, as the kubelet does for a missing Secret volume.
        vars.push(env(
            "TASKPODS_NATS_CREDS",
            format!("{CREDS_DIR}/{CREDS_KEY}"),
        ));
        mounts.push(VolumeMount {
            name: "nats-creds".to_owned(),
            mount_path: CREDS_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "nats-creds".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(credentials_secret_name(task)),
                default_mode: Some(0o400),
                optional: Some(false),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }

    let r = &spec.resources;
    let container = Container {
        name: CONTAINER.to_owned(),
        image: Some(spec.image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        // No command: the image's entrypoint is the agent, which fetches the instructions over NATS
        // (so the script never appears in the Job, its events or `kubectl describe`).
        env: Some(vars),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(r.cpu_request_millis, r.memory_request_bytes)),
            limits: Some(quantities(r.cpu_limit_millis, r.memory_limit_bytes)),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(TASK_UID),
            run_as_group: Some(TASK_UID),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };

    let pod = PodSpec {
        service_account_name: Some(config.service_account.clone()),
        automount_service_account_token: Some(false),
        // No Service environment variables: the task has no business knowing the namespace's services.
        enable_service_links: Some(false),
        restart_policy: Some("Never".to_owned()),
        termination_grace_period_seconds: Some(config.termination_grace_secs),
        host_users: config.user_namespace.then_some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(TASK_UID),
            run_as_group: Some(TASK_UID),
            fs_group: Some(TASK_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                localhost_profile: None,
            }),
            ..PodSecurityContext::default()
        }),
        containers: vec![container],
        volumes: Some(volumes),
        ..PodSpec::default()
    };

    Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(config.namespace.clone()),
            labels: Some(labels.clone()),
            annotations: Some(annotations.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            active_deadline_seconds: Some(active_deadline_secs(spec)),
            backoff_limit: Some(0),
            completions: Some(1),
            parallelism: Some(1),
            ttl_seconds_after_finished: Some(config.ttl_after_finished_secs),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// Renders a JSON value as block-style YAML. Strings are written as JSON strings, which are valid YAML
/// double-quoted scalars, so no value can be misread (`"no"`, `"1e3"`, `"0400"`).
pub fn to_yaml(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_yaml(value, 0, &mut out);
    out
}

fn scalar(value: &serde_json::Value) -> Option<String> {
    use serde_json::Value as V;
    match value {
        V::Null => Some("null".to_owned()),
        V::Bool(b) => Some(b.to_string()),
        V::Number(n) => Some(n.to_string()),
        V::String(s) => Some(serde_json::Value::String(s.clone()).to_string()),
        V::Array(a) if a.is_empty() => Some("[]".to_owned()),
        V::Object(o) if o.is_empty() => Some("{}".to_owned()),
        _ => None,
    }
}

fn key(k: &str) -> String {
    let plain = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
        && k.starts_with(|c: char| c.is_ascii_alphabetic());
    if plain {
        k.to_owned()
    } else {
        serde_json::Value::String(k.to_owned()).to_string()
    }
}

fn write_yaml(value: &serde_json::Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                match scalar(v) {
                    Some(s) => out.push_str(&format!("{pad}{}: {s}\n", key(k))),
                    None => {
                        out.push_str(&format!("{pad}{}:\n", key(k)));
                        write_yaml(v, indent + 2, out);
                    }
                }
            }
        }
        serde_json::Value::Array(items) if !items.is_empty() => {
            for item in items {
                match scalar(item) {
                    Some(s) => out.push_str(&format!("{pad}- {s}\n")),
                    None => {
                        // The item's first line goes after the dash, the rest indented under it.
                        let mut inner = String::new();
                        write_yaml(item, indent + 2, &mut inner);
                        let body = inner.get(indent + 2..).unwrap_or_default();
                        out.push_str(&format!("{pad}- {body}"));
                    }
                }
            }
        }
        other => {
            if let Some(s) = scalar(other) {
                out.push_str(&format!("{pad}{s}\n"));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use taskpods_events::Resources;

    fn spec(timeout_secs: u32) -> TaskSpec {
        TaskSpec {
            image: "registry.example/taskpods/runner:1".to_owned(),
            toolbox: Some("default".to_owned()),
            mode: Mode::Script,
            instructions: "echo secret-script".to_owned(),
            env: BTreeMap::from([("SECRET_ENV".to_owned(), "v".to_owned().into())]),
            secret_env: BTreeMap::new(),
            timeout_secs,
            resources: Resources {
                cpu_request_millis: 250,
                cpu_limit_millis: 500,
                memory_request_bytes: 128 << 20,
                memory_limit_bytes: 256 << 20,
            },
            labels: BTreeMap::from([("team".to_owned(), "x".to_owned())]),
            requester: Some("brain-1".to_owned()),
            idempotency_key: None,
            inputs: Vec::new(),
            files: Default::default(),
        }
    }

    fn task() -> TaskId {
        TaskId::from_idempotency_key("posture")
    }

    /// Every field of docs/ARCHITECTURE.md section 9, checked on the serialized Job (what the API server gets).
    #[test]
    fn the_job_has_the_full_posture_field_by_field() {
        let deadline = DateTime::parse_from_rfc3339("2030-01-01T00:10:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let job = build(task(), &spec(600), deadline, &JobConfig::default());
        let j = serde_json::to_value(&job).unwrap();
        assert_eq!(j["apiVersion"], "batch/v1");
        assert_eq!(j["kind"], "Job");
        assert_eq!(j["metadata"]["name"], task().job_name());
        assert_eq!(j["metadata"]["namespace"], "baker-tasks");
        for labels in [
            &j["metadata"]["labels"],
            &j["spec"]["template"]["metadata"]["labels"],
        ] {
            assert_eq!(labels[TASK_LABEL], task().to_string());
            assert_eq!(labels[ATTEMPT_LABEL], "1");
            assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
            assert!(labels.get("team").is_none(), "caller labels stay off pods");
        }
        let ann = &j["metadata"]["annotations"];
        assert_eq!(ann["taskpods.dev/requester"], "brain-1");
        assert_eq!(ann["taskpods.dev/deadline"], "2030-01-01T00:10:00Z");
        assert_eq!(ann["taskpods.dev/labels"], r#"{"team":"x"}"#);

        let s = &j["spec"];
        assert_eq!(s["activeDeadlineSeconds"], 602);
        assert_eq!(s["backoffLimit"], 0);
        assert_eq!(s["completions"], 1);
        assert_eq!(s["parallelism"], 1);
        assert_eq!(s["ttlSecondsAfterFinished"], 3600);

        let pod = &s["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "taskpods-task");
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(pod["enableServiceLinks"], false);
        assert_eq!(pod["restartPolicy"], "Never");
        let psc = &pod["securityContext"];
        assert_eq!(psc["runAsNonRoot"], true);
        assert_eq!(psc["runAsUser"], 1000);
        assert_eq!(psc["runAsGroup"], 1000);
        assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault");
        assert!(pod.get("hostNetwork").is_none() && pod.get("hostPID").is_none());

        let containers = pod["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1);
        let c = &containers[0];
        assert_eq!(c["image"], "registry.example/taskpods/runner:1");
        assert!(
            c.get("command").is_none(),
            "the image's entrypoint is the agent"
        );
        let csc = &c["securityContext"];
        assert_eq!(csc["allowPrivilegeEscalation"], false);
        assert_eq!(csc["privileged"], false);
        assert_eq!(csc["readOnlyRootFilesystem"], true);
        assert_eq!(csc["runAsNonRoot"], true);
        assert_eq!(csc["runAsUser"], 1000);
        assert_eq!(csc["runAsGroup"], 1000);
        assert_eq!(csc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert!(csc["capabilities"].get("add").is_none());
        assert_eq!(csc["seccompProfile"]["type"], "RuntimeDefault");
        let res = &c["resources"];
        assert_eq!(res["requests"]["cpu"], "250m");
        assert_eq!(res["requests"]["memory"], "128Mi");
        assert_eq!(res["limits"]["cpu"], "500m");
        assert_eq!(res["limits"]["memory"], "256Mi");

        // Only /tmp (size-limited emptyDir) is writable; the credentials are read-only.
        let mounts = c["volumeMounts"].as_array().unwrap();
        let writable: Vec<_> = mounts
            .iter()
            .filter(|m| m.get("readOnly") != Some(&serde_json::json!(true)))
            .map(|m| m["mountPath"].as_str().unwrap())
            .collect();
        assert_eq!(writable, ["/tmp"]);
        let volumes = pod["volumes"].as_array().unwrap();
        let tmp = volumes.iter().find(|v| v["name"] == "tmp").unwrap();
        assert_eq!(tmp["emptyDir"]["sizeLimit"], "256Mi");
        assert_eq!(bytes(1000).0, "1000");
        assert_eq!(bytes(3 << 30).0, "3Gi");
        let creds = volumes.iter().find(|v| v["name"] == "nats-creds").unwrap();
        assert_eq!(
            creds["secret"]["secretName"],
            format!("{}-nats", task().job_name())
        );
        assert_eq!(creds["secret"]["defaultMode"], 0o400);
        assert_eq!(volumes.len(), 2, "no other volumes (no hostPath)");

        let env: BTreeMap<&str, &str> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap()))
            .collect();
        assert_eq!(env["TASKPODS_TASK_ID"], task().to_string());
        assert_eq!(env["TASKPODS_NATS_URL"], "nats://nats.taskpods.svc:4222");
        assert_eq!(env["TASKPODS_SANDBOX"], "none");
        assert_eq!(
            env["TASKPODS_NATS_CREDS"],
            "/var/run/secrets/taskpods/nats/nats.creds"
        );
        // The instructions and the caller's env travel over NATS, never in the Job.
        let text = serde_json::to_string(&j).unwrap();
        assert!(!text.contains("secret-script") && !text.contains("SECRET_ENV"));
    }

    #[test]
    fn the_deadline_is_capped_at_30_minutes() {
        let now = Utc::now();
        let job = build(task(), &spec(5000), now, &JobConfig::default());
        let s = job.spec.unwrap();
        assert_eq!(s.active_deadline_seconds, Some(1800));
        let job = build(task(), &spec(3), now, &JobConfig::default());
        assert_eq!(job.spec.unwrap().active_deadline_seconds, Some(5));
        let job = build(task(), &spec(1799), now, &JobConfig::default());
        assert_eq!(job.spec.unwrap().active_deadline_seconds, Some(1800));
    }

    #[test]
    fn a_user_namespace_only_when_asked_for() {
        let j = serde_json::to_value(build(task(), &spec(60), Utc::now(), &JobConfig::default()))
            .unwrap();
        assert!(j["spec"]["template"]["spec"].get("hostUsers").is_none());
        let config = JobConfig {
            user_namespace: true,
            ..JobConfig::default()
        };
        let j = serde_json::to_value(build(task(), &spec(60), Utc::now(), &config)).unwrap();
        assert_eq!(j["spec"]["template"]["spec"]["hostUsers"], false);
    }

    #[test]
    fn without_a_credentials_secret_nothing_refers_to_one() {
        let config = JobConfig {
            task_credentials: false,
            ..JobConfig::default()
        };
        let j = serde_json::to_value(build(task(), &spec(60), Utc::now(), &config)).unwrap();
        let text = j.to_string();
        assert!(!text.contains("TASKPODS_NATS_CREDS") && !text.contains("nats-creds"));
    }

    #[test]
    fn secret_env_becomes_secret_key_refs_under_the_agents_prefix() {
        let mut with_refs = spec(60);
        with_refs.secret_env = BTreeMap::from([(
            "API_TOKEN".to_owned(),
            taskpods_events::env::SecretKeyRef {
                name: "brain-token".to_owned(),
                key: "token".to_owned(),
            },
        )]);
        let j = serde_json::to_value(build(task(), &with_refs, Utc::now(), &JobConfig::default()))
            .unwrap();
        let env = j["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .clone();
        let var = |name: &str| env.iter().find(|e| e["name"] == name).cloned().unwrap();
        assert_eq!(var("TASKPODS_SECRET_ENV")["value"], "API_TOKEN");
        assert_eq!(
            var("TASKPODS_SECRET_ENV_API_TOKEN")["valueFrom"],
            serde_json::json!({"secretKeyRef": {"name": "brain-token", "key": "token", "optional": false}})
        );
        assert!(env.iter().all(|e| e["name"] != "API_TOKEN"));
    }

    #[test]
    fn the_credentials_secret_is_owned_by_the_job_and_immutable() {
        let secret = credentials_secret(task(), "uid-1", "CREDS", &JobConfig::default());
        let s = serde_json::to_value(&secret).unwrap();
        assert_eq!(s["metadata"]["name"], credentials_secret_name(task()));
        assert_eq!(s["metadata"]["namespace"], "baker-tasks");
        let owner = &s["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Job");
        assert_eq!(owner["apiVersion"], "batch/v1");
        assert_eq!(owner["name"], task().job_name());
        assert_eq!(owner["uid"], "uid-1");
        assert_eq!(s["immutable"], true);
        let labels = &s["metadata"]["labels"];
        assert_eq!(labels[TASK_LABEL], task().to_string());
        assert_eq!(labels[COMPONENT_LABEL], CREDENTIALS_COMPONENT);
        assert_eq!(
            CREDENTIALS_SELECTOR,
            format!("{MANAGED_SELECTOR},{COMPONENT_LABEL}={CREDENTIALS_COMPONENT}")
        );
        assert_eq!(secret.data.unwrap()[CREDS_KEY].0, b"CREDS");
    }

    #[test]
    fn yaml_is_block_style_with_quoted_strings_and_sorted_keys() {
        let value = serde_json::json!({
            "a": {"b": [1, "two", {"c": true, "d": [{"e": null}]}], "empty": {}, "none": []},
            "weird key": "no", "n": "0400", "multi": "x\ny"
        });
        let yaml = to_yaml(&value);
        assert_eq!(
            yaml,
            "a:\n  b:\n    - 1\n    - \"two\"\n    - c: true\n      d:\n        - e: null\n  empty: {}\n  none: []\nmulti: \"x\\ny\"\nn: \"0400\"\n\"weird key\": \"no\"\n"
        );
    }
}
