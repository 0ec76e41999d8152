//! Starting and stopping the test control plane: etcd, kube-apiserver, kube-controller-manager.
//!
//! Everything lives in one temporary directory (`pki/`, `etcd/`, component logs, kubeconfigs, the
//! `pids` file the janitor reads), listens on loopback only, on ports picked by the kernel, so several
//! test binaries can run side by side. Start-up waits are bounded; a component that dies is reported
//! with the end of its log.
//!
//! Configuration choices, and why:
//! - etcd without TLS on 127.0.0.1 and with `--unsafe-no-fsync`: it is private to the test and thrown
//!   away, and fsync dominates etcd latency on small disks.
//! - API server with `--authorization-mode=Node,RBAC` and the `PodSecurity` admission plugin (plus the
//!   default plugins such as `ServiceAccount`), TLS with a real CA so clients verify the server.
//! - Controller manager authenticates as `system:kube-controller-manager` and runs each controller with
//!   its own service-account credentials, so the controllers are subject to RBAC exactly as in a cluster.
//!   Only the controllers the tests need run (see [`CONTROLLERS`]), which keeps CPU use low on 2 cores.
//!   No scheduler: the node simulator binds pods itself, as a scheduler would.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};

use super::binaries::{KubeBinaries, kubernetes_version};
use super::pki::Pki;
use super::process::{Janitor, ManagedProcess};
use super::{Error, Result};

/// Controllers started in kube-controller-manager. `serviceaccount` creates each namespace's `default`
/// ServiceAccount (pods cannot be admitted without it), `root-ca-certificate-publisher` the
/// `kube-root-ca.crt` ConfigMap that projected service-account volumes reference, and `resourcequota`
/// fills in a ResourceQuota's status, without which the quota admission plugin refuses every pod in its
/// namespace ("status unknown for quota"). `deployment` and `replicaset` turn the engine's Deployment from
/// `deploy/` into its pod (the engine-as-a-pod test).
pub const CONTROLLERS: &str = "job-controller,ttl-after-finished-controller,garbage-collector-controller,\
namespace-controller,serviceaccount-controller,serviceaccount-token-controller,\
root-ca-certificate-publisher-controller,resourcequota-controller,deployment-controller,\
replicaset-controller";

/// How long start-up may take before the harness gives up (first start on a busy 2-core machine is
/// the slow case: the API server installs its bootstrap RBAC policy and priority levels).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A running control plane. Dropping it kills the components and deletes its directory.
#[derive(Debug)]
pub struct ControlPlane {
    // Field order is drop order: controllers first, the store last, then the janitor and the files.
    controller_manager: ManagedProcess,
    apiserver: ManagedProcess,
    etcd: ManagedProcess,
    _janitor: Janitor,
    server: String,
    kubeconfig: PathBuf,
    pki: Pki,
    version: String,
    dir: tempfile::TempDir,
}

fn free_port() -> Result<u16> {
    // The kernel picks an unused port; it is released for the component to bind. Another process can
    // take it in between, which start() handles by retrying with new ports.
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(Error::io("picking a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(Error::io("reading bound port"))?
        .port())
}

fn etcd_healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.contains("\"health\":\"true\"")
}

fn args(list: &[(&str, String)]) -> Vec<String> {
    list.iter().map(|(k, v)| format!("--{k}={v}")).collect()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn kubeconfig_yaml(server: &str, ca: &Path, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: taskpods-test\n  cluster:\n    server: {server}\n    \
         certificate-authority: {ca}\nusers:\n- name: user\n  user:\n{user}\ncontexts:\n- name: taskpods-test\n  \
         context:\n    cluster: taskpods-test\n    user: user\ncurrent-context: taskpods-test\n",
        ca = ca.display()
    )
}

fn cert_user(crt: &Path, key: &Path) -> String {
    format!(
        "    client-certificate: {}\n    client-key: {}",
        crt.display(),
        key.display()
    )
}

impl ControlPlane {
    /// Starts a control plane using the binaries from the cache (see [`KubeBinaries::locate`]).
    pub async fn start() -> Result<Self> {
        Self::start_with(&KubeBinaries::locate()?).await
    }

    /// Starts a control plane from the given binaries. Retries twice with fresh ports if a component
    /// lost the race for its port.
    pub async fn start_with(bins: &KubeBinaries) -> Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(bins).await {
                Err(Error::ComponentExited { log_tail, .. })
                    if attempt < 3 && log_tail.contains("address already in use") =>
                {
                    continue;
                }
                other => return other,
            }
        }
    }

    async fn start_once(bins: &KubeBinaries) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("taskpods-kube-")
            .tempdir()
            .map_err(Error::io("creating control plane directory"))?;
        let root = dir.path().to_path_buf();
        let janitor = Janitor::start(&root)?;
        let pids = root.join("pids");
        let pki = Pki::generate(&root.join("pki"))?;
        let deadline = Instant::now() + START_TIMEOUT;

        let (etcd_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = ManagedProcess::spawn(
            "etcd",
            &bins.etcd,
            &args(&[
                ("name", "taskpods".into()),
                ("data-dir", path(&root.join("etcd"))),
                ("listen-client-urls", etcd_url.clone()),
                ("advertise-client-urls", etcd_url.clone()),
                ("listen-peer-urls", peer_url.clone()),
                ("initial-advertise-peer-urls", peer_url.clone()),
                ("initial-cluster", format!("taskpods={peer_url}")),
                ("unsafe-no-fsync", "true".into()),
                ("log-level", "warn".into()),
            ]),
            &root.join("etcd.log"),
            &pids,
        )?;
        while !etcd_healthy(etcd_port) {
            etcd.check_alive()?;
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "etcd /health".into(),
                    seconds: START_TIMEOUT.as_secs(),
                    detail: Some(etcd.log_tail(20)),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let server = format!("https://127.0.0.1:{api_port}");
        let mut apiserver = ManagedProcess::spawn(
            "kube-apiserver",
            &bins.apiserver,
            &args(&[
                ("etcd-servers", etcd_url),
                ("bind-address", "127.0.0.1".into()),
                ("advertise-address", "127.0.0.1".into()),
                // The endpoint reconciler refuses a loopback advertise address, and the `kubernetes`
                // Service's endpoints are of no use without cluster networking anyway.
                ("endpoint-reconciler-type", "none".into()),
                ("secure-port", api_port.to_string()),
                ("cert-dir", path(&root.join("apiserver-certs"))),
                ("tls-cert-file", path(&pki.apiserver_crt)),
                ("tls-private-key-file", path(&pki.apiserver_key)),
                ("client-ca-file", path(&pki.ca_crt)),
                (
                    "service-account-issuer",
                    "https://kubernetes.default.svc.cluster.local".into(),
                ),
                ("service-account-key-file", path(&pki.sa_pub)),
                ("service-account-signing-key-file", path(&pki.sa_key)),
                ("service-cluster-ip-range", "10.0.0.0/24".into()),
                ("authorization-mode", "Node,RBAC".into()),
                (
                    "enable-admission-plugins",
                    "PodSecurity,NodeRestriction".into(),
                ),
                ("allow-privileged", "false".into()),
                ("profiling", "false".into()),
                ("v", "1".into()),
            ]),
            &root.join("kube-apiserver.log"),
            &pids,
        )?;

        let kubeconfig = root.join("admin.kubeconfig");
        write(
            &kubeconfig,
            &kubeconfig_yaml(
                &server,
                &pki.ca_crt,
                &cert_user(&pki.admin_crt, &pki.admin_key),
            ),
        )?;
        let kcm_kubeconfig = root.join("controller-manager.kubeconfig");
        write(
            &kcm_kubeconfig,
            &kubeconfig_yaml(
                &server,
                &pki.ca_crt,
                &cert_user(&pki.controller_manager_crt, &pki.controller_manager_key),
            ),
        )?;

        let client = client_from(&kubeconfig).await?;
        // The `default` namespace is created by the API server's own bootstrap, after it has started
        // serving; waiting for it means requests are answered, not just that the port is open.
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let version = loop {
            apiserver.check_alive()?;
            let last = match namespaces.get("default").await {
                Ok(_) => match client.apiserver_version().await {
                    Ok(info) => break info.git_version,
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "kube-apiserver to serve the default namespace".into(),
                    seconds: START_TIMEOUT.as_secs(),
                    detail: Some(format!("{last}\n{}", apiserver.log_tail(20))),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };

        let mut controller_manager = ManagedProcess::spawn(
            "kube-controller-manager",
            &bins.controller_manager,
            &args(&[
                ("kubeconfig", path(&kcm_kubeconfig)),
                ("controllers", CONTROLLERS.into()),
                ("use-service-account-credentials", "true".into()),
                ("service-account-private-key-file", path(&pki.sa_key)),
                ("root-ca-file", path(&pki.ca_crt)),
                ("leader-elect", "false".into()),
                // No serving endpoint: readiness is observed through the API (below), and serving
                // would need delegated authentication set up for nothing.
                ("secure-port", "0".into()),
                ("v", "1".into()),
            ]),
            &root.join("kube-controller-manager.log"),
            &pids,
        )?;
        // The serviceaccount controller creating `default/default` proves the controller manager is
        // up, authenticated and authorized (RBAC bootstrap policy in place).
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        loop {
            controller_manager.check_alive()?;
            apiserver.check_alive()?;
            if accounts.get_opt("default").await.ok().flatten().is_some() {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "kube-controller-manager to create the default ServiceAccount".into(),
                    seconds: START_TIMEOUT.as_secs(),
                    detail: Some(controller_manager.log_tail(20)),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }

        Ok(Self {
            controller_manager,
            apiserver,
            etcd,
            _janitor: janitor,
            server,
            kubeconfig,
            pki,
            version,
            dir,
        })
    }

    /// One control plane for the whole test binary, started on first use.
    ///
    /// It is started on a separate thread with its own runtime, so this may be called from any test
    /// (async or not); clients must still be made per test with [`ControlPlane::client`], because a
    /// client belongs to the runtime it was created on. The instance is never dropped; the janitor
    /// kills its processes and removes its directory when the test binary exits.
    pub fn shared() -> Result<&'static ControlPlane> {
        static SHARED: OnceLock<std::result::Result<ControlPlane, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                std::thread::spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    runtime
                        .block_on(ControlPlane::start())
                        .map_err(|e| e.to_string())
                })
                .join()
                .unwrap_or_else(|_| Err("control plane start-up thread panicked".to_string()))
            })
            .as_ref()
            .map_err(|e| Error::Shared(e.clone()))
    }

    /// A client authenticated as the cluster admin (`system:masters`).
    pub async fn client(&self) -> Result<Client> {
        client_from(&self.kubeconfig).await
    }

    /// A client that authenticates with a bearer token (e.g. a ServiceAccount token), verifying the
    /// server against the test CA.
    pub async fn client_with_token(&self, token: &str) -> Result<Client> {
        let yaml = kubeconfig_yaml(
            &self.server,
            &self.pki.ca_crt,
            &format!("    token: {token}"),
        );
        let config = Kubeconfig::from_yaml(&yaml).map_err(|e| Error::Kubeconfig(e.to_string()))?;
        let config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
            .await
            .map_err(|e| Error::Kubeconfig(e.to_string()))?;
        Ok(Client::try_from(config)?)
    }

    /// Path of the admin kubeconfig (usable with `kubectl --kubeconfig` when debugging).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server URL, `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server
    }

    /// The version the API server reports (e.g. `v1.37.2`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The version pinned in `tests/kube-env/go.mod`.
    pub fn pinned_version() -> &'static str {
        kubernetes_version()
    }

    /// The directory holding certificates, data and component logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The end of each component's log, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        [&self.etcd, &self.apiserver, &self.controller_manager]
            .iter()
            .map(|p| format!("== {} ==\n{}", p.log_path().display(), p.log_tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(Error::io(format!("writing {}", path.display())))
}

async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let config = Kubeconfig::read_from(kubeconfig).map_err(|e| Error::Kubeconfig(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Kubeconfig(e.to_string()))?;
    Ok(Client::try_from(config)?)
}

/// Creates a namespace with `labels` (an existing one is kept) and waits, bounded, until its `default`
/// ServiceAccount exists: until then the ServiceAccount admission plugin refuses every pod in it.
pub async fn create_namespace(client: &Client, name: &str, labels: &[(&str, &str)]) -> Result<()> {
    let namespace = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<Namespace>::all(client.clone())
        .create(&kube::api::PostParams::default(), &namespace)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    let deadline = Instant::now() + Duration::from_secs(30);
    while accounts.get_opt("default").await?.is_none() {
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!("the default ServiceAccount in namespace {name}"),
                seconds: 30,
                detail: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
