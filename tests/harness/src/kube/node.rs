//! A node simulator: the kubelet's job, done with local processes, against the real API server.
//!
//! Layout of this module:
//! - [`NodeSimulator`] / [`SimulatorBuilder`]: registers a Ready `Node`, then watches pods (in one
//!   namespace, or all) and for each event decides: bind it (no scheduler runs; the simulator checks
//!   `nodeSelector` and CPU/memory requests against the node and otherwise marks the pod `Unschedulable`
//!   as kube-scheduler would), start it, stop it, or force-delete it.
//! - `PodRun` (private): one task per pod that plays the container runtime: resolves the env the way the
//!   kubelet does (`value`, `valueFrom` field/secret/config map refs, `envFrom`, `$(VAR)` expansion),
//!   runs init containers in order and then the containers as process groups, and writes pod status
//!   (`Pending` → `Running` → `Succeeded`/`Failed` with each container's exit code) through the
//!   `pods/status` subresource so the real Job controller derives Job status from it.
//! - Faults, chosen per pod by the [`FAULT_ANNOTATION`] annotation or by label rules added with
//!   [`NodeSimulator::inject`]: [`Fault::OomKilled`], [`Fault::ImagePull`], [`Fault::Evicted`]; and
//!   [`NodeSimulator::evict`] evicts a running pod on request; [`NodeSimulator::keep_deleted_pods`]
//!   plays a kubelet that lost contact (deleted pods stay `Terminating`).
//!
//! What a container runs: its `command` + `args` (as the image's entrypoint is unknown here); if it has no
//! `command`, the executable mapped to its image with [`SimulatorBuilder::image`] (this is how task pods
//! run our agent binary). Each container runs under bubblewrap (`/usr/bin/bwrap`) in a mount namespace
//! that shows the host's files with the pod's volumes mounted at the container's `mountPath`s (see
//! `volumes`: emptyDir, secret, configMap, downwardAPI, projected with a TokenRequest-minted
//! ServiceAccount token, so `/var/run/secrets/kubernetes.io/serviceaccount` is what the kubelet would
//! mount), as the pod's `runAsUser`/`runAsGroup` with `fsGroup` and `supplementalGroups` as
//! supplementary groups when the simulator runs as root (as in CI), else as the test's user.
//! `HOME`, `TMPDIR` and the working directory are a per-pod work directory (shared by the pod's
//! containers), or the container's volume at `/tmp` when it has one (which hides the host's `/tmp`).
//! `KUBERNETES_SERVICE_HOST`/`_PORT` name the API server given to [`SimulatorBuilder::api_server`], as the
//! kubelet sets them from the `kubernetes` Service, so in-cluster clients reach the real API server.
//! Each container has its own PID namespace, as a container runtime gives it (its `/proc` is still the
//! host's): when its main process ends, or is killed, every process it started goes with it, whatever
//! process group or session it moved to (the agent runs the user's code in a group of its own). Network is the host's: the point is the API semantics and the
//! files a pod sees, not the sandbox.
//!
//! Deletion: with no real kubelet, a pod with a `deletionTimestamp` would never go away. The simulator
//! stops its processes (SIGTERM, then SIGKILL after the grace period, capped at 10 s), records the final
//! status, and deletes the pod with grace period 0 (UID precondition), as the kubelet does. Finalizers
//! (the Job controller's `batch.kubernetes.io/job-tracking`) still hold it until their owner removes them.
//! A pod that ended for another reason (it ran to completion, was evicted, or ran past its deadline) is
//! force-deleted likewise once it is deleted, even when the deletion came while it was still stopping.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Binding, ConfigMap, Container, EnvVar, Node, ObjectReference, Pod, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::volumes::{MountFailure, PodVolumes, bwrap_mounts, is_root};
use super::{Error, Result};

/// Pod annotation selecting a simulated fault: `oom-killed`, `image-pull` or `evicted`.
pub const FAULT_ANNOTATION: &str = "taskpods.dev/simulate-fault";

/// How long after start a container is OOM-killed or its pod evicted, so the pod is seen `Running` first.
const FAULT_DELAY: Duration = Duration::from_millis(500);
/// Upper bound on honoured termination grace periods, to keep tests quick.
const MAX_GRACE: Duration = Duration::from_secs(10);
/// Back-off before restarting a container under `restartPolicy: OnFailure`/`Always`.
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// First and longest wait between attempts to mount a pod's volumes (the kubelet backs off from 500 ms).
const MOUNT_RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(4));
/// The bubblewrap every container runs under (as the local backend uses it).
const BWRAP: &str = "/usr/bin/bwrap";

/// A failure the simulator plays instead of (or on top of) running the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The first container is killed shortly after it starts, reported as `OOMKilled`, exit code 137.
    OomKilled,
    /// No container runs; each waits with `ErrImagePull`, then `ImagePullBackOff`, until the pod is deleted.
    ImagePull,
    /// The pod is evicted shortly after start: phase `Failed`, reason `Evicted`, `DisruptionTarget` condition.
    Evicted,
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "oom-killed" => Ok(Fault::OomKilled),
            "image-pull" => Ok(Fault::ImagePull),
            "evicted" => Ok(Fault::Evicted),
            other => Err(format!(
                "unknown fault {other:?} (expected oom-killed, image-pull or evicted)"
            )),
        }
    }
}

/// Why a pod's processes are being stopped from outside.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// The pod has a deletionTimestamp; stop within this grace period, then force-delete.
    Deleted(Duration),
    /// Evict on request (or by fault).
    Evict,
    /// The pod's own `activeDeadlineSeconds` ran out (enforced by the kubelet, not a controller).
    Deadline,
}

#[derive(Debug)]
struct PodEntry {
    key: String,
    stop: mpsc::UnboundedSender<Stop>,
    /// Process groups currently running, so Drop can kill them synchronously.
    pgids: Arc<Mutex<Vec<i32>>>,
    /// Set once the pod has stopped for good (processes gone, final status written); its task then only
    /// waits for the pod's deletion, to remove it from the API.
    ended: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

struct Inner {
    client: Client,
    node: String,
    namespace: Option<String>,
    images: HashMap<String, PathBuf>,
    files: Vec<(PathBuf, PathBuf)>,
    api_server: Option<(String, u16)>,
    labels: BTreeMap<String, String>,
    capacity: Capacity,
    rules: Mutex<Vec<(BTreeMap<String, String>, Fault)>>,
    /// Set by [`NodeSimulator::keep_deleted_pods`]: deletions are not acted on.
    keep_deleted: AtomicBool,
    pods: Mutex<HashMap<String, PodEntry>>,
    work: tempfile::TempDir,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("node", &self.node)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// Configures a [`NodeSimulator`].
pub struct SimulatorBuilder {
    client: Client,
    node: String,
    namespace: Option<String>,
    images: HashMap<String, PathBuf>,
    files: Vec<(PathBuf, PathBuf)>,
    api_server: Option<(String, u16)>,
    labels: BTreeMap<String, String>,
    capacity: Capacity,
}

/// What the node offers to pods: the scheduler-side check the simulator does before binding.
#[derive(Debug, Clone, Copy)]
struct Capacity {
    /// CPU in millicores.
    milli_cpu: u64,
    /// Memory in bytes.
    memory: u64,
}

impl std::fmt::Debug for SimulatorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatorBuilder")
            .field("node", &self.node)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl SimulatorBuilder {
    /// Name of the Node to register (default `taskpods-sim`). Use distinct names for simulators that
    /// run side by side.
    pub fn node_name(mut self, name: impl Into<String>) -> Self {
        self.node = name.into();
        self
    }

    /// Only bind and run pods of this namespace (default: all namespaces). Lets parallel tests each
    /// have their own simulator without competing for pods.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Runs `executable` for containers of `image` that have no `command` (as the image's entrypoint
    /// would). `image` matches with or without its tag.
    pub fn image(mut self, image: impl Into<String>, executable: impl Into<PathBuf>) -> Self {
        self.images.insert(image.into(), executable.into());
        self
    }

    /// Shows the host file `host` at `inside` (read-only) in every container, as if every image contained
    /// it (e.g. a tool a test's pod runs). Bound by root, so `host` may sit where the pod's user cannot go.
    pub fn file(mut self, inside: impl Into<PathBuf>, host: impl Into<PathBuf>) -> Self {
        self.files.push((inside.into(), host.into()));
        self
    }

    /// Sets `KUBERNETES_SERVICE_HOST`/`_PORT` in containers from an `https://host:port` URL, as the
    /// kubelet does for the `kubernetes` Service.
    pub fn api_server(mut self, url: &str) -> Self {
        let rest = url
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        if let Some((host, port)) = rest.rsplit_once(':')
            && let Ok(port) = port.trim_end_matches('/').parse()
        {
            self.api_server = Some((host.to_string(), port));
        }
        self
    }

    /// Adds a label to the Node, for pods' `nodeSelector` to match.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets the node's allocatable CPU and memory as Kubernetes quantities (default `2` and `24Gi`).
    /// Pods whose requests exceed it stay Pending as `Unschedulable`. Unparseable values are ignored.
    pub fn capacity(mut self, cpu: &str, memory: &str) -> Self {
        if let Some(milli_cpu) = parse_quantity(cpu, true) {
            self.capacity.milli_cpu = milli_cpu;
        }
        if let Some(bytes) = parse_quantity(memory, false) {
            self.capacity.memory = bytes;
        }
        self
    }

    /// Registers the node and starts watching pods.
    pub async fn start(self) -> Result<NodeSimulator> {
        let work = tempfile::Builder::new()
            .prefix("taskpods-node-")
            .tempdir()
            .map_err(Error::io("creating node work directory"))?;
        // Traversable by the users pods run as (see `PodRun::identity`); each pod's own directory is
        // then handed to its user.
        std::fs::set_permissions(
            work.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .map_err(Error::io("opening up node work directory"))?;
        // Pods' volumes: reachable by the simulator only (bubblewrap binds them as root), so no pod
        // reads another pod's volumes through host paths.
        let volumes = work.path().join(VOLUMES_DIR);
        std::fs::create_dir(&volumes).map_err(Error::io("creating the volumes directory"))?;
        std::fs::set_permissions(
            &volumes,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(Error::io("restricting the volumes directory"))?;
        let mut labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_string(), self.node.clone()),
            ("kubernetes.io/os".to_string(), "linux".to_string()),
            ("kubernetes.io/arch".to_string(), "amd64".to_string()),
            ("taskpods.dev/simulated".to_string(), "true".to_string()),
        ]);
        labels.extend(self.labels);
        let inner = Arc::new(Inner {
            client: self.client,
            node: self.node,
            namespace: self.namespace,
            images: self.images,
            files: self.files,
            api_server: self.api_server,
            labels,
            capacity: self.capacity,
            rules: Mutex::new(Vec::new()),
            keep_deleted: AtomicBool::new(false),
            pods: Mutex::new(HashMap::new()),
            work,
        });
        register_node(&inner).await?;
        let task = tokio::spawn(watch_pods(Arc::clone(&inner)));
        Ok(NodeSimulator { inner, task })
    }
}

/// Plays the kubelet of one Node; see the module docs. Dropping it kills every process it started.
#[derive(Debug)]
pub struct NodeSimulator {
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl NodeSimulator {
    /// Starts configuring a simulator that talks to the API server through `client`.
    pub fn builder(client: Client) -> SimulatorBuilder {
        SimulatorBuilder {
            client,
            node: "taskpods-sim".into(),
            namespace: None,
            images: HashMap::new(),
            files: Vec::new(),
            api_server: None,
            labels: BTreeMap::new(),
            // The machine this runs on: 2 cores, 24 GiB.
            capacity: Capacity {
                milli_cpu: 2000,
                memory: 24 << 30,
            },
        }
    }

    /// The Node's name.
    pub fn node_name(&self) -> &str {
        &self.inner.node
    }

    /// While `keep` is set, the simulator acts on no deletion: a deleted pod stays, `Terminating`, its
    /// processes left as they are, as on a node whose kubelet lost contact with the API server. A pod
    /// removed from the API (force-deleted) still has its processes killed, as such a kubelet does once
    /// it is back.
    pub fn keep_deleted_pods(&self, keep: bool) {
        self.inner.keep_deleted.store(keep, Ordering::Release);
    }

    /// Every pod started from now on whose labels include all of `labels` gets `fault`.
    pub fn inject(&self, labels: BTreeMap<String, String>, fault: Fault) {
        lock(&self.inner.rules).push((labels, fault));
    }

    /// Evicts a running pod, as the kubelet does under node pressure. Returns false if the simulator
    /// runs no pod of that name.
    pub fn evict(&self, namespace: &str, name: &str) -> bool {
        let key = format!("{namespace}/{name}");
        lock(&self.inner.pods)
            .values()
            .filter(|e| e.key == key && !e.ended.load(Ordering::Acquire) && !e.task.is_finished())
            .any(|e| e.stop.send(Stop::Evict).is_ok())
    }

    /// What a pod's container wrote to stdout and stderr so far (the API server's `pods/log` needs a real
    /// kubelet, so tests read it here).
    pub fn logs(&self, namespace: &str, pod: &str, container: &str) -> Option<String> {
        std::fs::read_to_string(
            pod_dir(self.inner.work.path(), namespace, pod).join(format!("{container}.log")),
        )
        .ok()
    }

    /// `namespace/name` of pods whose processes are still running.
    pub fn running(&self) -> Vec<String> {
        lock(&self.inner.pods)
            .values()
            .filter(|e| !lock(&e.pgids).is_empty())
            .map(|e| e.key.clone())
            .collect()
    }

    /// Stops watching, kills all processes and deletes the Node object.
    pub async fn shutdown(self) -> Result<()> {
        self.task.abort();
        self.kill_all();
        let nodes: Api<Node> = Api::all(self.inner.client.clone());
        match nodes
            .delete(&self.inner.node, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn kill_all(&self) {
        for entry in lock(&self.inner.pods).values() {
            entry.task.abort();
            for pgid in lock(&entry.pgids).iter() {
                let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
            }
        }
    }
}

impl Drop for NodeSimulator {
    fn drop(&mut self) {
        self.task.abort();
        self.kill_all();
    }
}

/// Locks a std mutex, ignoring poisoning: the guarded maps stay consistent across a panicking holder.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now() -> String {
    // Whole seconds, like the kubelet's timestamps (metav1.Time has second precision).
    Timestamp::from_second(Timestamp::now().as_second())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn pod_dir(work: &Path, namespace: &str, pod: &str) -> PathBuf {
    work.join(namespace).join(pod)
}

/// Where an image's mapped executable appears inside its containers.
const IMAGE_DIR: &str = "/run/taskpods-node-simulator/image";

/// Where pods' volumes are made, under the node's work directory (one directory per pod UID).
const VOLUMES_DIR: &str = ".volumes";

/// Sends `signal` to a container's processes. The group leader is bubblewrap's monitor, which dies of a
/// SIGTERM at once without passing it on; so a SIGTERM goes to the processes inside only (bubblewrap
/// then exits with their status), and reaches the leader only when nothing else is left in the group.
fn signal_container(pgid: i32, signal: Signal) {
    if signal == Signal::SIGKILL {
        let _ = killpg(Pid::from_raw(pgid), signal);
        return;
    }
    let members: Vec<i32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != pgid)
        .filter(|pid| {
            // Field 5 of /proc/PID/stat, after the parenthesised command name.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.rsplit_once(')')?.1.to_owned();
                    rest.split_whitespace().nth(2)?.parse::<i32>().ok()
                })
                == Some(pgid)
        })
        .collect();
    if members.is_empty() {
        let _ = killpg(Pid::from_raw(pgid), signal);
    }
    for pid in members {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
    }
}

async fn register_node(inner: &Inner) -> Result<()> {
    let nodes: Api<Node> = Api::all(inner.client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(inner.node.clone()),
            labels: Some(inner.labels.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let resources = json!({
        "cpu": format!("{}m", inner.capacity.milli_cpu),
        "memory": inner.capacity.memory.to_string(),
        "pods": "110",
        "ephemeral-storage": "100Gi",
    });
    let t = now();
    let condition = |kind: &str, status: &str, reason: &str| {
        json!({"type": kind, "status": status, "reason": reason, "message": "simulated",
               "lastHeartbeatTime": t, "lastTransitionTime": t})
    };
    let status = json!({"status": {
        "capacity": resources, "allocatable": resources,
        "conditions": [
            condition("Ready", "True", "KubeletReady"),
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID"),
        ],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": inner.node}],
        "nodeInfo": {"machineID": "taskpods-sim", "systemUUID": "taskpods-sim", "bootID": "taskpods-sim",
            "kernelVersion": "simulated", "osImage": "taskpods node simulator", "containerRuntimeVersion": "sim://1",
            "kubeletVersion": super::binaries::kubernetes_version(), "kubeProxyVersion": "",
            "operatingSystem": "linux", "architecture": "amd64"},
    }});
    nodes
        .patch_status(&inner.node, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

async fn watch_pods(inner: Arc<Inner>) {
    let api: Api<Pod> = match &inner.namespace {
        Some(ns) => Api::namespaced(inner.client.clone(), ns),
        None => Api::all(inner.client.clone()),
    };
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                if let Err(e) = on_pod(&inner, pod).await {
                    tracing::warn!(node = %inner.node, error = %e, "node simulator: handling pod event failed");
                }
            }
            Ok(watcher::Event::Delete(pod)) => {
                // Gone from the API: make sure nothing of it keeps running.
                if let Some(entry) = lock(&inner.pods).remove(&pod.uid().unwrap_or_default()) {
                    let _ = entry.stop.send(Stop::Deleted(Duration::ZERO));
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(node = %inner.node, error = %e, "node simulator: pod watch error")
            }
        }
    }
}

async fn on_pod(inner: &Arc<Inner>, pod: Pod) -> Result<()> {
    let (Some(uid), Some(name), Some(namespace)) =
        (pod.uid(), pod.metadata.name.clone(), pod.namespace())
    else {
        return Ok(());
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(inner.client.clone(), &namespace);
    match spec.node_name.as_deref() {
        None => {
            let ours = spec
                .scheduler_name
                .as_deref()
                .is_none_or(|s| s == "default-scheduler");
            if ours && pod.metadata.deletion_timestamp.is_none() {
                match unschedulable(inner, &spec) {
                    None => bind(&api, &name, &namespace, &inner.node).await?,
                    Some(message) => mark_unschedulable(&api, &pod, &message).await?,
                }
            }
            Ok(())
        }
        Some(node) if node == inner.node => {
            if pod.metadata.deletion_timestamp.is_some()
                && inner.keep_deleted.load(Ordering::Acquire)
            {
                return Ok(());
            }
            if pod.metadata.deletion_timestamp.is_some() {
                let grace = pod
                    .metadata
                    .deletion_grace_period_seconds
                    .unwrap_or(0)
                    .max(0) as u64;
                let grace = Duration::from_secs(grace).min(MAX_GRACE);
                let running = lock(&inner.pods)
                    .get(&uid)
                    .filter(|e| !e.task.is_finished())
                    .map(|e| e.stop.clone());
                match running {
                    // The pod task kills its processes, records status, then force-deletes.
                    Some(stop) => {
                        let _ = stop.send(Stop::Deleted(grace));
                    }
                    None => force_delete(&api, &name, &uid).await?,
                }
                return Ok(());
            }
            let phase = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .unwrap_or("Pending");
            let mut pods = lock(&inner.pods);
            if phase == "Pending" && !pods.contains_key(&uid) {
                let (stop, stop_rx) = mpsc::unbounded_channel();
                let pgids = Arc::new(Mutex::new(Vec::new()));
                let ended = Arc::new(AtomicBool::new(false));
                let run = PodRun {
                    inner: Arc::clone(inner),
                    api,
                    pod,
                    key: format!("{namespace}/{name}"),
                    stop_rx,
                    pgids: Arc::clone(&pgids),
                    ended: Arc::clone(&ended),
                    volumes: PodVolumes::default(),
                };
                let task = tokio::spawn(run.run());
                pods.insert(
                    uid,
                    PodEntry {
                        key: format!("{namespace}/{name}"),
                        stop,
                        pgids,
                        ended,
                        task,
                    },
                );
            }
            Ok(())
        }
        Some(_) => Ok(()),
    }
}

/// The scheduler's verdict on this node, in its words, if the pod does not fit: `nodeSelector` labels
/// and CPU/memory requests (summed over containers, or the largest init container if that is more).
/// Affinity, taints and the requests of pods already on the node are not considered.
fn unschedulable(inner: &Inner, spec: &k8s_openapi::api::core::v1::PodSpec) -> Option<String> {
    let selector_ok = spec
        .node_selector
        .as_ref()
        .is_none_or(|sel| sel.iter().all(|(k, v)| inner.labels.get(k) == Some(v)));
    if !selector_ok {
        return Some(
            "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.".into(),
        );
    }
    let request = |c: &Container, name: &str, cpu: bool| {
        c.resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get(name))
            .and_then(|q| parse_quantity(&q.0, cpu))
            .unwrap_or(0)
    };
    let need = |name: &str, cpu: bool| {
        let app: u64 = spec.containers.iter().map(|c| request(c, name, cpu)).sum();
        let init = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| request(c, name, cpu))
            .max()
            .unwrap_or(0);
        app.max(init)
    };
    let mut short = Vec::new();
    if need("cpu", true) > inner.capacity.milli_cpu {
        short.push("1 Insufficient cpu");
    }
    if need("memory", false) > inner.capacity.memory {
        short.push("1 Insufficient memory");
    }
    (!short.is_empty()).then(|| format!("0/1 nodes are available: {}.", short.join(", ")))
}

/// Records `PodScheduled=False` like kube-scheduler, once (rewriting it would trigger another event).
async fn mark_unschedulable(api: &Api<Pod>, pod: &Pod, message: &str) -> Result<()> {
    let already = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "PodScheduled" && c.status == "False")
        });
    if already {
        return Ok(());
    }
    let status = json!({"status": {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": message, "lastTransitionTime": now(),
    }]}});
    api.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&status),
    )
    .await?;
    Ok(())
}

/// Parses a Kubernetes quantity into millicores (`milli`) or plain units (bytes). Returns None for
/// forms the simulator does not need (exponents, fractions of binary units).
fn parse_quantity(q: &str, milli: bool) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "m" => 0.001,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let value = number * factor * if milli { 1000.0 } else { 1.0 };
    // Round up, as Kubernetes does when converting to a smaller scale.
    Some(value.ceil() as u64)
}

async fn bind(api: &Api<Pod>, name: &str, namespace: &str, node: &str) -> Result<()> {
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.into()),
            ..Default::default()
        },
    };
    match api
        .create_subresource::<Binding, Value>("binding", name, &PostParams::default(), &binding)
        .await
    {
        Ok(_) => Ok(()),
        // Already bound (a re-delivered event) or deleted meanwhile: nothing to do.
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn force_delete(api: &Api<Pod>, name: &str, uid: &str) -> Result<()> {
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        // 404: already gone; 409: the UID precondition failed, i.e. a new pod took the name.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// State of one container, rendered into `containerStatuses`.
#[derive(Debug, Clone)]
enum CState {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        started: String,
    },
    Terminated {
        code: i32,
        reason: String,
        message: String,
        started: String,
        finished: String,
    },
}

#[derive(Debug)]
struct Ctr {
    spec: Container,
    state: CState,
    last: Option<CState>,
    restarts: i32,
    pgid: Option<i32>,
    /// Bumped on every start, so an exit report from a previous run is not mistaken for the current one.
    generation: u32,
}

impl Ctr {
    fn new(spec: Container) -> Self {
        Ctr {
            spec,
            state: CState::Waiting {
                reason: "ContainerCreating".into(),
                message: String::new(),
            },
            last: None,
            restarts: 0,
            pgid: None,
            generation: 0,
        }
    }

    fn status(&self, init: bool) -> Value {
        let render = |s: &CState| match s {
            CState::Waiting { reason, message } => {
                json!({"waiting": {"reason": reason, "message": message}})
            }
            CState::Running { started } => json!({"running": {"startedAt": started}}),
            CState::Terminated {
                code,
                reason,
                message,
                started,
                finished,
            } => json!({"terminated": {
                "exitCode": code, "reason": reason, "message": message,
                "startedAt": started, "finishedAt": finished, "containerID": "sim://exited"}}),
        };
        let running = matches!(self.state, CState::Running { .. });
        json!({
            "name": self.spec.name,
            "image": self.spec.image.clone().unwrap_or_default(),
            "imageID": format!("sim://{}", self.spec.image.clone().unwrap_or_default()),
            "containerID": self.pgid.map(|p| format!("sim://{p}")),
            "ready": running && !init,
            "started": running,
            "restartCount": self.restarts,
            "state": render(&self.state),
            "lastState": self.last.as_ref().map(render).unwrap_or_else(|| json!({})),
        })
    }

    fn terminated_code(&self) -> Option<i32> {
        match self.state {
            CState::Terminated { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The container runtime for one pod (see the module docs).
struct PodRun {
    inner: Arc<Inner>,
    api: Api<Pod>,
    pod: Pod,
    key: String,
    stop_rx: mpsc::UnboundedReceiver<Stop>,
    pgids: Arc<Mutex<Vec<i32>>>,
    /// Set when the pod has stopped for good (see [`PodEntry::ended`]).
    ended: Arc<AtomicBool>,
    /// The pod's volumes, once made (before any container starts).
    volumes: PodVolumes,
}

/// An exit report from a container's waiter task: (init container?, index, generation, exit code).
type Exit = (bool, usize, u32, i32);

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Exit code as a container runtime reports it: the code, or 128 + signal number.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

/// Checks that `program` names an executable (a path, or a name found on `path`), as the runtime's exec
/// would, before the sandbox starts, so a missing one is a start error.
fn find_executable(program: &str, path: Option<&str>) -> std::result::Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.contains('/') {
        executable(Path::new(program))
    } else {
        path.unwrap_or("/usr/local/bin:/usr/bin:/bin")
            .split(':')
            .any(|dir| executable(&Path::new(dir).join(program)))
    };
    if found {
        Ok(())
    } else {
        Err(format!(
            "starting {program:?}: executable file not found in $PATH or no such file"
        ))
    }
}

/// Records a container's exit, and ends what is left of it: as a runtime stops a container whose main
/// process ended, every process it started dies with it (bubblewrap's init, which holds the container's
/// PID namespace, is still in the container's process group; killing it kills the namespace).
fn exited(c: &mut Ctr, code: i32, pgids: &Mutex<Vec<i32>>) {
    if let Some(pgid) = c.pgid.take() {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        lock(pgids).retain(|p| *p != pgid);
    }
    let started = match &c.state {
        CState::Running { started } => started.clone(),
        _ => now(),
    };
    let reason = if code == 0 { "Completed" } else { "Error" };
    c.state = CState::Terminated {
        code,
        reason: reason.into(),
        message: String::new(),
        started,
        finished: now(),
    };
}

/// Expands `$(VAR)` references the way the kubelet does: defined names are replaced, `$$` escapes a
/// dollar, and undefined references are left as written.
fn expand(input: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&rest[pos..pos + 2 + end + 1]),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

impl PodRun {
    fn name(&self) -> String {
        self.pod.name_any()
    }

    async fn run(mut self) {
        if let Err(e) = self.run_inner().await {
            tracing::warn!(pod = %self.key, error = %e, "node simulator: pod run failed");
        }
        // Whatever happened, leave no process behind, and no volume (secrets included).
        for pgid in lock(&self.pgids).drain(..) {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(self.volume_root());
        self.ended.store(true, Ordering::Release);
        // As a kubelet does, remove the stopped pod from the API once it is deleted. A deletion seen
        // while the pod was stopping for another reason (an eviction, its deadline) waits in the
        // channel meanwhile: it is not lost, or the pod would stay `Terminating` for ever. The loop
        // ends when the pod is gone from the API (its entry, the channel's sender, is dropped then).
        while let Some(stop) = self.stop_rx.recv().await {
            if let Stop::Deleted(_) = stop {
                let uid = self.pod.uid().unwrap_or_default();
                if let Err(e) = force_delete(&self.api, &self.name(), &uid).await {
                    tracing::warn!(pod = %self.key, error = %e, "node simulator: removing a deleted pod failed");
                }
            }
        }
    }

    fn volume_root(&self) -> PathBuf {
        self.inner
            .work
            .path()
            .join(VOLUMES_DIR)
            .join(self.pod.uid().unwrap_or_default())
    }

    /// Makes the pod's volumes, trying again with back-off while something they need is missing (the
    /// pod stays `Pending`, its containers `ContainerCreating` with the kubelet's message), until the pod
    /// is stopped or its deadline passes. `false` when the pod was stopped (and its status written).
    async fn mount_volumes(
        &mut self,
        base: &Value,
        inits: &mut [Ctr],
        ctrs: &mut [Ctr],
        deadline: Option<tokio::time::Instant>,
    ) -> Result<bool> {
        let mut delay = MOUNT_RETRY.0;
        let mut reported = String::new();
        loop {
            let failure =
                match PodVolumes::materialize(&self.inner.client, &self.pod, &self.volume_root())
                    .await
                {
                    Ok(volumes) => {
                        self.volumes = volumes;
                        return Ok(true);
                    }
                    Err(failure) => failure,
                };
            let message = failure.to_string();
            if message != reported {
                tracing::debug!(pod = %self.key, %message, "node simulator: volumes not mounted yet");
                for c in inits.iter_mut().chain(ctrs.iter_mut()) {
                    c.state = CState::Waiting {
                        reason: "ContainerCreating".into(),
                        message: message.clone(),
                    };
                }
                self.patch(self.status(base, "Pending", inits, ctrs, None))
                    .await?;
                reported = message;
            }
            let retry = match failure {
                MountFailure::NotYet(_) => Some(tokio::time::Instant::now() + delay),
                MountFailure::Unsupported(_) => None,
            };
            delay = (delay * 2).min(MOUNT_RETRY.1);
            let stop = tokio::select! {
                Some(stop) = self.stop_rx.recv() => Some(stop),
                _ = sleep_until(deadline) => Some(Stop::Deadline),
                _ = sleep_until(retry) => None,
            };
            if let Some(stop) = stop {
                let (_tx, mut rx) = mpsc::unbounded_channel();
                self.stop_all(base, inits, ctrs, &mut rx, stop).await?;
                return Ok(false);
            }
        }
    }

    fn fault(&self) -> std::result::Result<Option<Fault>, String> {
        if let Some(value) = self.pod.annotations().get(FAULT_ANNOTATION) {
            return value.parse().map(Some);
        }
        let labels = self.pod.labels();
        Ok(lock(&self.inner.rules)
            .iter()
            .find(|(want, _)| want.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map(|(_, f)| *f))
    }

    async fn patch(&self, status: Value) -> Result<()> {
        self.api
            .patch_status(
                &self.name(),
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": status })),
            )
            .await?;
        Ok(())
    }

    /// The pod status document for the current container states.
    fn status(
        &self,
        base: &Value,
        phase: &str,
        inits: &[Ctr],
        ctrs: &[Ctr],
        reason: Option<(&str, &str)>,
    ) -> Value {
        let t = now();
        let cond = |kind: &str, ok: bool, reason: &str| json!({"type": kind, "status": if ok { "True" } else { "False" }, "reason": reason, "lastTransitionTime": t});
        let initialized = inits.iter().all(|c| c.terminated_code() == Some(0));
        let running = phase == "Running"
            && ctrs
                .iter()
                .all(|c| matches!(c.state, CState::Running { .. }));
        let not_ready = match phase {
            "Succeeded" | "Failed" => "PodCompleted",
            _ => "ContainersNotReady",
        };
        let mut conditions = vec![
            cond("PodScheduled", true, ""),
            cond(
                "Initialized",
                initialized,
                if initialized {
                    ""
                } else {
                    "ContainersNotInitialized"
                },
            ),
            cond(
                "ContainersReady",
                running,
                if running { "" } else { not_ready },
            ),
            cond("Ready", running, if running { "" } else { not_ready }),
        ];
        if reason.is_some_and(|(r, _)| r == "Evicted" || r == "DeadlineExceeded") {
            // What the kubelet adds when it terminates a pod itself; the Job controller's pod failure
            // policy and the disruption accounting key off this condition.
            conditions.push(json!({"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                                   "message": reason.map(|(_, m)| m).unwrap_or_default(), "lastTransitionTime": t}));
        }
        let mut status = base.clone();
        status["phase"] = json!(phase);
        status["conditions"] = json!(conditions);
        status["initContainerStatuses"] =
            json!(inits.iter().map(|c| c.status(true)).collect::<Vec<_>>());
        status["containerStatuses"] =
            json!(ctrs.iter().map(|c| c.status(false)).collect::<Vec<_>>());
        if let Some((reason, message)) = reason {
            status["reason"] = json!(reason);
            status["message"] = json!(message);
        }
        status
    }

    /// Resolves a container's environment as the kubelet would; `dir` is its `HOME` and `TMPDIR`.
    async fn env(&self, c: &Container, dir: &Path) -> Result<Vec<(String, String)>> {
        let ns = self.pod.namespace().unwrap_or_else(|| "default".into());
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
            ),
            ("HOSTNAME".into(), self.name()),
            ("HOME".into(), dir.display().to_string()),
            // The pod's private, writable directory (or its volume at /tmp) as the temporary directory.
            ("TMPDIR".into(), dir.display().to_string()),
        ];
        if let Some((host, port)) = &self.inner.api_server {
            env.push(("KUBERNETES_SERVICE_HOST".into(), host.clone()));
            env.push(("KUBERNETES_SERVICE_PORT".into(), port.to_string()));
        }
        for source in c.env_from.clone().unwrap_or_default() {
            let prefix = source.prefix.clone().unwrap_or_default();
            if let Some(r) = source.config_map_ref {
                let cms: Api<ConfigMap> = Api::namespaced(self.inner.client.clone(), &ns);
                match cms.get_opt(&r.name).await? {
                    Some(cm) => {
                        for (k, v) in cm.data.unwrap_or_default() {
                            env.push((format!("{prefix}{k}"), v));
                        }
                    }
                    None if r.optional == Some(true) => {}
                    None => {
                        return Err(self.unrunnable(format!("configmap {:?} not found", r.name)));
                    }
                }
            }
            if let Some(r) = source.secret_ref {
                let secrets: Api<Secret> = Api::namespaced(self.inner.client.clone(), &ns);
                match secrets.get_opt(&r.name).await? {
                    Some(s) => {
                        for (k, v) in s.data.unwrap_or_default() {
                            env.push((
                                format!("{prefix}{k}"),
                                String::from_utf8_lossy(&v.0).into_owned(),
                            ));
                        }
                    }
                    None if r.optional == Some(true) => {}
                    None => return Err(self.unrunnable(format!("secret {:?} not found", r.name))),
                }
            }
        }
        for var in c.env.clone().unwrap_or_default() {
            if let Some(value) = self.env_value(&var, &env).await? {
                env.push((var.name.clone(), value));
            }
        }
        Ok(env)
    }

    fn unrunnable(&self, reason: String) -> Error {
        Error::Unrunnable {
            pod: self.key.clone(),
            reason,
        }
    }

    async fn env_value(&self, var: &EnvVar, env: &[(String, String)]) -> Result<Option<String>> {
        let Some(from) = &var.value_from else {
            return Ok(Some(expand(var.value.as_deref().unwrap_or_default(), env)));
        };
        let ns = self.pod.namespace().unwrap_or_else(|| "default".into());
        if let Some(field) = &from.field_ref {
            let path = field.field_path.as_str();
            let meta = &self.pod.metadata;
            let spec = self.pod.spec.clone().unwrap_or_default();
            let indexed = |prefix: &str, map: Option<&BTreeMap<String, String>>| {
                path.strip_prefix(prefix)
                    .and_then(|k| k.strip_suffix("']"))
                    .map(|k| map.and_then(|m| m.get(k)).cloned().unwrap_or_default())
            };
            let value = match path {
                "metadata.name" => meta.name.clone(),
                "metadata.namespace" => meta.namespace.clone(),
                "metadata.uid" => meta.uid.clone(),
                "spec.nodeName" => Some(self.inner.node.clone()),
                "spec.serviceAccountName" => spec.service_account_name.clone(),
                "status.hostIP" | "status.podIP" | "status.hostIPs" | "status.podIPs" => {
                    Some("127.0.0.1".into())
                }
                _ => indexed("metadata.labels['", meta.labels.as_ref())
                    .or_else(|| indexed("metadata.annotations['", meta.annotations.as_ref())),
            };
            return Ok(Some(value.unwrap_or_default()));
        }
        if let Some(r) = &from.secret_key_ref {
            let secrets: Api<Secret> = Api::namespaced(self.inner.client.clone(), &ns);
            let value = secrets
                .get_opt(&r.name)
                .await?
                .and_then(|s| s.data)
                .and_then(|d| {
                    d.get(&r.key)
                        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                });
            return match value {
                Some(v) => Ok(Some(v)),
                None if r.optional == Some(true) => Ok(None),
                None => Err(self.unrunnable(format!("secret key {}/{} not found", r.name, r.key))),
            };
        }
        if let Some(r) = &from.config_map_key_ref {
            let cms: Api<ConfigMap> = Api::namespaced(self.inner.client.clone(), &ns);
            let value = cms
                .get_opt(&r.name)
                .await?
                .and_then(|c| c.data)
                .and_then(|d| d.get(&r.key).cloned());
            return match value {
                Some(v) => Ok(Some(v)),
                None if r.optional == Some(true) => Ok(None),
                None => {
                    Err(self.unrunnable(format!("configmap key {}/{} not found", r.name, r.key)))
                }
            };
        }
        if let Some(r) = &from.resource_field_ref {
            // The kubelet reports the limit (or request) in the divisor's unit; the raw quantity is
            // close enough for programs that only log it.
            let container = self.pod.spec.as_ref().and_then(|s| {
                s.containers
                    .iter()
                    .find(|c| Some(&c.name) == r.container_name.as_ref())
            });
            let resources = container
                .and_then(|c| c.resources.clone())
                .unwrap_or_default();
            let (kind, name) = r
                .resource
                .split_once('.')
                .unwrap_or(("limits", r.resource.as_str()));
            let map = if kind == "requests" {
                resources.requests
            } else {
                resources.limits
            };
            return Ok(Some(
                map.and_then(|m| m.get(name).map(|q| q.0.clone()))
                    .unwrap_or_else(|| "0".into()),
            ));
        }
        Ok(Some(String::new()))
    }

    /// The argv for a container: `command` + `args`, or the mapped image executable + `args`.
    fn argv(
        &self,
        c: &Container,
        env: &[(String, String)],
    ) -> std::result::Result<Vec<String>, String> {
        let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
        if argv.is_empty() {
            let image = c.image.clone().unwrap_or_default();
            let repo = image.split('@').next().unwrap_or_default();
            let untagged = match repo.rsplit_once(':') {
                Some((r, tag)) if !tag.contains('/') => r,
                _ => repo,
            };
            let exe = self.inner.images.get(&image).or_else(|| self.inner.images.get(untagged)).ok_or_else(|| {
                format!("container {} has no command and image {image:?} is not mapped to an executable", c.name)
            })?;
            argv.push(exe.display().to_string());
        }
        argv.extend(c.args.clone().unwrap_or_default());
        Ok(argv.iter().map(|a| expand(a, env)).collect())
    }

    /// The user and group a container runs as, from `runAsUser`/`runAsGroup` (container over pod; group
    /// 0 when unset, as a runtime does for an image without a group). Only when the simulator runs as
    /// root, which can switch to any user; otherwise processes run as the simulator's own user.
    fn identity(&self, c: &Container) -> Option<(u32, u32)> {
        let root = is_root();
        let pod = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref());
        let ctr = c.security_context.as_ref();
        let uid = ctr
            .and_then(|s| s.run_as_user)
            .or_else(|| pod.and_then(|s| s.run_as_user))?;
        let gid = ctr
            .and_then(|s| s.run_as_group)
            .or_else(|| pod.and_then(|s| s.run_as_group))
            .unwrap_or(0);
        (root && uid >= 0 && gid >= 0).then_some((uid as u32, gid as u32))
    }

    /// The supplementary groups of the pod's processes: `fsGroup` and `supplementalGroups`, as the
    /// runtime adds them.
    fn supplementary_groups(&self) -> Vec<u32> {
        let Some(sc) = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref())
        else {
            return Vec::new();
        };
        let mut groups: Vec<u32> = sc
            .fs_group
            .into_iter()
            .chain(sc.supplemental_groups.iter().flatten().copied())
            .filter_map(|g| u32::try_from(g).ok())
            .collect();
        groups.sort_unstable();
        groups.dedup();
        groups
    }

    /// Starts a container's process; a start failure is recorded as the runtime would (`StartError`, 128).
    async fn spawn(
        &self,
        c: &mut Ctr,
        init: bool,
        idx: usize,
        dir: &Path,
        exits: &mpsc::UnboundedSender<Exit>,
    ) -> Result<()> {
        c.generation += 1;
        let started = now();
        let fail = |c: &mut Ctr, message: String| {
            c.state = CState::Terminated {
                code: 128,
                reason: "StartError".into(),
                message,
                started: started.clone(),
                finished: now(),
            };
        };
        let mut mounts = match self.volumes.mounts_of(&c.spec) {
            Ok(mounts) => mounts,
            Err(failure) => {
                c.state = CState::Waiting {
                    reason: "CreateContainerConfigError".into(),
                    message: failure.to_string(),
                };
                return Ok(());
            }
        };
        // The pod's directory lives under the host's /tmp: a container with a volume there (task pods
        // have one at /tmp) does not see it, and uses that volume as its home and temporary directory.
        let hidden = |p: &Path| mounts.iter().any(|(at, ..)| p.starts_with(at));
        let home = if !hidden(dir) {
            dir.to_path_buf()
        } else if mounts.iter().any(|(at, ..)| at == Path::new("/tmp")) {
            PathBuf::from("/tmp")
        } else {
            PathBuf::from("/")
        };
        let env = match self.env(&c.spec, &home).await {
            Ok(env) => env,
            // A missing secret or config map keeps a real container in CreateContainerConfigError.
            Err(Error::Unrunnable { reason, .. }) => {
                c.state = CState::Waiting {
                    reason: "CreateContainerConfigError".into(),
                    message: reason,
                };
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut argv = match self.argv(&c.spec, &env) {
            Ok(argv) => argv,
            Err(message) => {
                fail(c, message);
                return Ok(());
            }
        };
        // What a container runs must exist, as the runtime's exec checks: a missing one is a start
        // error, not an exit of the process.
        let path_var = env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone());
        if let Err(message) = find_executable(&argv[0], path_var.as_deref()) {
            fail(c, message);
            return Ok(());
        }
        mounts.extend(
            self.inner
                .files
                .iter()
                .map(|(inside, host)| (inside.clone(), host.clone(), true)),
        );
        if c.spec.command.as_ref().is_none_or(Vec::is_empty) {
            // The image's entrypoint is part of the image: mounted where no volume can hide it (a
            // volume at /tmp would hide an executable kept there on the host).
            let name = Path::new(&argv[0])
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "entrypoint".into());
            let inside = PathBuf::from(IMAGE_DIR).join(&name);
            mounts.push((inside.clone(), PathBuf::from(&argv[0]), true));
            argv[0] = inside.display().to_string();
        }
        let workdir = c
            .spec
            .working_dir
            .as_deref()
            .map(PathBuf::from)
            .unwrap_or_else(|| home.clone());
        let mut sandbox = match bwrap_mounts(&mounts) {
            Ok(args) => args,
            Err(failure) => {
                fail(c, failure.to_string());
                return Ok(());
            }
        };
        if !is_root() {
            // Without root, mount namespaces need a user namespace (mapped to the same user).
            sandbox.insert(0, "--unshare-user".into());
        }
        // A PID namespace per container, as a runtime gives it, so that ending the container (see
        // `exited`) ends everything it started, even processes in a group or session of their own (the
        // agent runs the user's code in its own process group), which a signal to the container's
        // process group alone would leave running.
        sandbox.insert(0, "--unshare-pid".into());
        sandbox.push("--chdir".into());
        sandbox.push(workdir.into());
        sandbox.push("--".into());
        let log = dir.join(format!("{}.log", c.spec.name));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(Error::io(format!("opening {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(Error::io("duplicating log handle"))?;
        let mut command = tokio::process::Command::new(BWRAP);
        command.args(sandbox);
        if let Some((uid, gid)) = self.identity(&c.spec) {
            // The pod's directory is its writable scratch space, so it must belong to that user.
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                .map_err(Error::io(format!("chown {}", dir.display())))?;
            // bubblewrap mounts as root; the container's process then becomes the pod's user.
            let groups = self.supplementary_groups();
            command.args([
                "/usr/bin/setpriv".to_owned(),
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                if groups.is_empty() {
                    "--clear-groups".to_owned()
                } else {
                    format!(
                        "--groups={}",
                        groups
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                },
                "--".to_owned(),
            ]);
        }
        command
            .args(&argv)
            .env_clear()
            .envs(env)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Own process group, so stopping the container also stops whatever it forked.
            .process_group(0)
            .kill_on_drop(true);
        match command.spawn() {
            Ok(mut child) => {
                let pgid = child.id().map(|p| p as i32);
                c.pgid = pgid;
                if let Some(pgid) = pgid {
                    lock(&self.pgids).push(pgid);
                }
                c.state = CState::Running { started };
                let (exits, generation) = (exits.clone(), c.generation);
                tokio::spawn(async move {
                    let code = match child.wait().await {
                        Ok(status) => exit_code(status),
                        Err(_) => 255,
                    };
                    let _ = exits.send((init, idx, generation, code));
                });
            }
            Err(e) => fail(c, format!("starting {:?}: {e}", argv[0])),
        }
        Ok(())
    }

    async fn run_inner(&mut self) -> Result<()> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let base = json!({"hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}], "podIP": "127.0.0.1",
                          "podIPs": [{"ip": "127.0.0.1"}], "startTime": now()});
        let mut inits: Vec<Ctr> = spec
            .init_containers
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(Ctr::new)
            .collect();
        let mut ctrs: Vec<Ctr> = spec.containers.clone().into_iter().map(Ctr::new).collect();
        let ns = self.pod.namespace().unwrap_or_else(|| "default".into());
        let dir = pod_dir(self.inner.work.path(), &ns, &self.name());
        std::fs::create_dir_all(&dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let deadline = spec
            .active_deadline_seconds
            .map(|s| tokio::time::Instant::now() + Duration::from_secs(s.max(0) as u64));
        let restart_policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());

        let fault = match self.fault() {
            Ok(f) => f,
            Err(message) => {
                let status = self.status(
                    &base,
                    "Failed",
                    &inits,
                    &ctrs,
                    Some(("UnknownFault", &message)),
                );
                return self.patch(status).await;
            }
        };
        if fault == Some(Fault::ImagePull) {
            return self
                .image_pull_failure(&base, &inits, &mut ctrs, deadline)
                .await;
        }
        if !self
            .mount_volumes(&base, &mut inits, &mut ctrs, deadline)
            .await?
        {
            return Ok(());
        }
        for c in inits.iter_mut().chain(ctrs.iter_mut()) {
            c.state = CState::Waiting {
                reason: "ContainerCreating".into(),
                message: String::new(),
            };
        }

        let (exit_tx, mut exit_rx) = mpsc::unbounded_channel::<Exit>();
        let mut next_init = 0;
        let mut main_started = false;
        let mut fault_at = None;
        let mut restart_at: Vec<Option<tokio::time::Instant>> = vec![None; ctrs.len()];
        loop {
            if !main_started {
                if let Some(c) = inits.get_mut(next_init) {
                    match c.state {
                        CState::Waiting { ref reason, .. } if reason == "ContainerCreating" => {
                            self.spawn(c, true, next_init, &dir, &exit_tx).await?;
                            self.patch(self.status(&base, "Pending", &inits, &ctrs, None))
                                .await?;
                            continue;
                        }
                        CState::Terminated { code: 0, .. } => {
                            next_init += 1;
                            continue;
                        }
                        // Init containers are not restarted: a failed one fails the pod.
                        CState::Terminated { .. } => {
                            return self.finish(&base, &inits, &ctrs, None).await;
                        }
                        CState::Waiting { .. } => {
                            let status = self.status(&base, "Pending", &inits, &ctrs, None);
                            self.patch(status).await?;
                            return self
                                .wait_for_stop(&base, &mut inits, &mut ctrs, &mut exit_rx, deadline)
                                .await;
                        }
                        CState::Running { .. } => {}
                    }
                } else {
                    for (i, c) in ctrs.iter_mut().enumerate() {
                        self.spawn(c, false, i, &dir, &exit_tx).await?;
                    }
                    main_started = true;
                    fault_at = fault.map(|_| tokio::time::Instant::now() + FAULT_DELAY);
                    self.patch(self.status(&base, "Running", &inits, &ctrs, None))
                        .await?;
                    if ctrs
                        .iter()
                        .any(|c| matches!(&c.state, CState::Waiting { .. }))
                    {
                        return self
                            .wait_for_stop(&base, &mut inits, &mut ctrs, &mut exit_rx, deadline)
                            .await;
                    }
                }
            }
            if main_started
                && ctrs.iter().all(|c| c.pgid.is_none())
                && restart_at.iter().all(Option::is_none)
            {
                // Start failures under a restarting policy are retried like exits.
                let retry: Vec<usize> = (0..ctrs.len())
                    .filter(|&i| restarts(&restart_policy, ctrs[i].terminated_code()))
                    .collect();
                if retry.is_empty() {
                    return self.finish(&base, &inits, &ctrs, None).await;
                }
                for i in retry {
                    restart_at[i] = Some(tokio::time::Instant::now() + RESTART_DELAY);
                }
            }
            let next_restart = restart_at.iter().flatten().min().copied();
            tokio::select! {
                Some((init, idx, generation, code)) = exit_rx.recv() => {
                    let list = if init { &mut inits } else { &mut ctrs };
                    if let Some(c) = list.get_mut(idx).filter(|c| c.generation == generation && c.pgid.is_some()) {
                        exited(c, code, &self.pgids);
                        if !init && restarts(&restart_policy, Some(code)) {
                            restart_at[idx] = Some(tokio::time::Instant::now() + RESTART_DELAY);
                        }
                        if main_started {
                            self.patch(self.status(&base, "Running", &inits, &ctrs, None)).await?;
                        }
                    }
                }
                Some(stop) = self.stop_rx.recv() => {
                    return self.stop_all(&base, &mut inits, &mut ctrs, &mut exit_rx, stop).await;
                }
                _ = sleep_until(deadline) => {
                    return self.stop_all(&base, &mut inits, &mut ctrs, &mut exit_rx, Stop::Deadline).await;
                }
                _ = sleep_until(fault_at) => {
                    fault_at = None;
                    match fault {
                        Some(Fault::OomKilled) => {
                            // The kernel's OOM killer sends SIGKILL; the runtime then reports OOMKilled.
                            if let Some(pgid) = ctrs.first().and_then(|c| c.pgid) {
                                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                                let code = wait_exit(&mut exit_rx, 0, ctrs[0].generation).await;
                                exited(&mut ctrs[0], code, &self.pgids);
                                if let CState::Terminated { reason, .. } = &mut ctrs[0].state {
                                    *reason = "OOMKilled".into();
                                }
                                if restarts(&restart_policy, Some(code)) {
                                    restart_at[0] = Some(tokio::time::Instant::now() + RESTART_DELAY);
                                }
                                self.patch(self.status(&base, "Running", &inits, &ctrs, None)).await?;
                            }
                        }
                        Some(Fault::Evicted) => {
                            return self.stop_all(&base, &mut inits, &mut ctrs, &mut exit_rx, Stop::Evict).await;
                        }
                        _ => {}
                    }
                }
                _ = sleep_until(next_restart) => {
                    let now = tokio::time::Instant::now();
                    for i in 0..ctrs.len() {
                        if restart_at[i].is_some_and(|t| t <= now) {
                            restart_at[i] = None;
                            ctrs[i].last = Some(ctrs[i].state.clone());
                            ctrs[i].restarts += 1;
                            self.spawn(&mut ctrs[i], false, i, &dir, &exit_tx).await?;
                        }
                    }
                    self.patch(self.status(&base, "Running", &inits, &ctrs, None)).await?;
                }
            }
        }
    }

    /// Plays a pod whose image cannot be pulled: waits in `ErrImagePull`, then `ImagePullBackOff`.
    async fn image_pull_failure(
        &mut self,
        base: &Value,
        inits: &[Ctr],
        ctrs: &mut [Ctr],
        deadline: Option<tokio::time::Instant>,
    ) -> Result<()> {
        let pending = |reason: &str, ctrs: &mut [Ctr]| {
            for c in ctrs.iter_mut() {
                let image = c.spec.image.clone().unwrap_or_default();
                c.state = CState::Waiting {
                    reason: reason.into(),
                    message: format!("simulated: failed to pull image {image:?}: not found"),
                };
            }
        };
        pending("ErrImagePull", ctrs);
        self.patch(self.status(base, "Pending", inits, ctrs, None))
            .await?;
        let stop = tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => None,
            Some(stop) = self.stop_rx.recv() => Some(stop),
            _ = sleep_until(deadline) => Some(Stop::Deadline),
        };
        let stop = match stop {
            Some(stop) => stop,
            None => {
                pending("ImagePullBackOff", ctrs);
                self.patch(self.status(base, "Pending", inits, ctrs, None))
                    .await?;
                tokio::select! {
                    Some(stop) = self.stop_rx.recv() => stop,
                    _ = sleep_until(deadline) => Stop::Deadline,
                }
            }
        };
        let (_tx, mut rx) = mpsc::unbounded_channel();
        let mut inits = Vec::new();
        self.stop_all(base, &mut inits, ctrs, &mut rx, stop).await
    }

    /// For a pod stuck before running (e.g. a missing secret): wait until it is stopped from outside.
    async fn wait_for_stop(
        &mut self,
        base: &Value,
        inits: &mut [Ctr],
        ctrs: &mut [Ctr],
        exits: &mut mpsc::UnboundedReceiver<Exit>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<()> {
        let stop = tokio::select! {
            Some(stop) = self.stop_rx.recv() => stop,
            _ = sleep_until(deadline) => Stop::Deadline,
        };
        self.stop_all(base, inits, ctrs, exits, stop).await
    }

    /// Stops every running process (SIGTERM, then SIGKILL after the grace period) and records why.
    async fn stop_all(
        &mut self,
        base: &Value,
        inits: &mut [Ctr],
        ctrs: &mut [Ctr],
        exits: &mut mpsc::UnboundedReceiver<Exit>,
        stop: Stop,
    ) -> Result<()> {
        let grace = match stop {
            Stop::Deleted(grace) => grace,
            _ => self
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
                .map(|s| Duration::from_secs(s.max(0) as u64))
                .unwrap_or(MAX_GRACE)
                .min(MAX_GRACE),
        };
        if matches!(stop, Stop::Evict) {
            // A kubelet marks the pod as a disruption target before it kills anything, so whoever
            // watches the pod learns why its containers are about to die before they report dying.
            let mut marked = self.status(base, "Running", inits, ctrs, None);
            if let Some(conditions) = marked["conditions"].as_array_mut() {
                conditions.push(json!({"type": "DisruptionTarget", "status": "True",
                    "reason": "TerminationByKubelet", "lastTransitionTime": now(),
                    "message": "The node was low on resource: memory. (simulated eviction)"}));
            }
            match self.patch(marked).await {
                Ok(()) | Err(Error::Kube(kube::Error::Api(_))) => {}
                Err(e) => return Err(e),
            }
        }
        let running = |inits: &[Ctr], ctrs: &[Ctr]| {
            inits
                .iter()
                .chain(ctrs.iter())
                .filter_map(|c| c.pgid)
                .collect::<Vec<_>>()
        };
        for (signal, wait) in [
            (Signal::SIGTERM, grace),
            (Signal::SIGKILL, Duration::from_secs(5)),
        ] {
            let pgids = running(inits, ctrs);
            if pgids.is_empty() {
                break;
            }
            for pgid in pgids {
                signal_container(pgid, signal);
            }
            let until = tokio::time::Instant::now() + wait;
            while !running(inits, ctrs).is_empty() {
                match tokio::time::timeout_at(until, exits.recv()).await {
                    Ok(Some((init, idx, generation, code))) => {
                        let list: &mut [Ctr] = if init { inits } else { ctrs };
                        if let Some(c) = list.get_mut(idx).filter(|c| c.generation == generation) {
                            exited(c, code, &self.pgids);
                        }
                    }
                    _ => break,
                }
            }
        }
        // Containers that never ran end as terminated too, as the kubelet reports for a stopped pod.
        for c in inits.iter_mut().chain(ctrs.iter_mut()) {
            if let CState::Waiting { reason, message } = &c.state {
                let (reason, message) = (reason.clone(), message.clone());
                c.state = CState::Terminated {
                    code: 137,
                    reason: "ContainerStatusUnknown".into(),
                    message: format!("{reason}: {message}"),
                    started: now(),
                    finished: now(),
                };
            }
            if c.pgid.take().is_some() {
                c.state = CState::Terminated {
                    code: 137,
                    reason: "Error".into(),
                    message: "did not stop".into(),
                    started: now(),
                    finished: now(),
                };
            }
        }
        let name = self.name();
        let uid = self.pod.uid().unwrap_or_default();
        match stop {
            Stop::Deleted(_) => {
                // Status first (terminal phase, as the kubelet sets before removing a pod), then delete.
                let status = self.status(base, "Failed", inits, ctrs, None);
                match self.patch(status).await {
                    Ok(()) | Err(Error::Kube(kube::Error::Api(_))) => {}
                    Err(e) => return Err(e),
                }
                force_delete(&self.api, &name, &uid).await
            }
            Stop::Evict => {
                let message = "The node was low on resource: memory. (simulated eviction)";
                self.patch(self.status(base, "Failed", inits, ctrs, Some(("Evicted", message))))
                    .await
            }
            Stop::Deadline => {
                let message = "Pod was active on the node longer than the specified deadline";
                self.patch(self.status(
                    base,
                    "Failed",
                    inits,
                    ctrs,
                    Some(("DeadlineExceeded", message)),
                ))
                .await
            }
        }
    }

    /// Writes the terminal status after every container has exited on its own.
    async fn finish(
        &self,
        base: &Value,
        inits: &[Ctr],
        ctrs: &[Ctr],
        reason: Option<(&str, &str)>,
    ) -> Result<()> {
        let ok = inits
            .iter()
            .chain(ctrs.iter())
            .all(|c| c.terminated_code() == Some(0));
        let phase = if ok { "Succeeded" } else { "Failed" };
        self.patch(self.status(base, phase, inits, ctrs, reason))
            .await
    }
}

/// Whether the restart policy restarts a container that ended with `code`.
fn restarts(policy: &str, code: Option<i32>) -> bool {
    match (policy, code) {
        ("Always", Some(_)) => true,
        ("OnFailure", Some(code)) => code != 0,
        _ => false,
    }
}

/// Waits (bounded) for a main container's exit report.
async fn wait_exit(exits: &mut mpsc::UnboundedReceiver<Exit>, idx: usize, generation: u32) -> i32 {
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Some((init, i, g, code))) = tokio::time::timeout_at(until, exits.recv()).await {
        if !init && i == idx && g == generation {
            return code;
        }
    }
    137
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_the_kubelet() {
        let env = vec![
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "two".to_string()),
        ];
        assert_eq!(expand("$(A)-$(B)", &env), "1-two");
        assert_eq!(expand("$(MISSING) $$(A) $", &env), "$(MISSING) $(A) $");
        assert_eq!(expand("plain", &env), "plain");
    }

    #[test]
    fn restart_policy() {
        assert!(!restarts("Never", Some(1)));
        assert!(restarts("OnFailure", Some(1)));
        assert!(!restarts("OnFailure", Some(0)));
        assert!(restarts("Always", Some(0)));
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("100m", true), Some(100));
        assert_eq!(parse_quantity("2", true), Some(2000));
        assert_eq!(parse_quantity("0.5", true), Some(500));
        assert_eq!(parse_quantity("64Mi", false), Some(64 << 20));
        assert_eq!(parse_quantity("1G", false), Some(1_000_000_000));
        assert_eq!(parse_quantity("1e3", false), None);
    }

    #[test]
    fn faults_parse() {
        assert_eq!("oom-killed".parse::<Fault>(), Ok(Fault::OomKilled));
        assert!("melt".parse::<Fault>().is_err());
    }
}
