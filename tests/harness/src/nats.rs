//! Spawning `nats-server` for tests. Each server gets its own temporary directory holding its config,
//! JetStream store, ports file and log; the client port is chosen by the server (`-1`) on first start and
//! kept across restarts, so clients reconnect to the same URL.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a server may take to open its ports.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long JetStream may take to become available (cluster leader election included).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The `nats-server` binary tests run: `$NATS_SERVER_BIN`, else `nats-server` from `PATH`.
pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// The version the binary reports (e.g. `2.9.10`), for test output and version-dependent checks.
pub fn nats_server_version() -> String {
    version_of(&nats_server_bin())
}

/// The oldest nats-server a cluster can run: before 2.9.21 a replicated stream did not serialize writes
/// that expect the same last subject sequence (nats-server #4320), so two engines' guarded writes (view
/// commits, event appends, the lease) could both succeed. Single servers are not affected.
pub const CLUSTER_OLDEST_VERSION: (u64, u64, u64) = (2, 9, 21);

/// The `nats-server` binary a [`NatsCluster`] runs: `$NATS_SERVER_BIN` when it is at least
/// [`CLUSTER_OLDEST_VERSION`], else `$NATS_CLUSTER_SERVER_BIN` (`scripts/env.sh` points it at the
/// 2.9.25 that `scripts/install-test-deps` builds), saying so on stdout. Panics when neither is usable: a
/// cluster suite is never skipped.
pub fn nats_cluster_server_bin() -> PathBuf {
    let bin = nats_server_bin();
    let version = version_of(&bin);
    if version_at_least(&version, CLUSTER_OLDEST_VERSION) {
        return bin;
    }
    let Some(cluster_bin) = std::env::var_os("NATS_CLUSTER_SERVER_BIN").map(PathBuf::from) else {
        panic!(
            "NATS_SERVER_BIN is nats-server {version}, too old for a cluster (2.9.21 or newer, \
             nats-server #4320), and NATS_CLUSTER_SERVER_BIN is not set: `source scripts/env.sh` after \
             scripts/install-test-deps"
        );
    };
    let cluster_version = version_of(&cluster_bin);
    assert!(
        version_at_least(&cluster_version, CLUSTER_OLDEST_VERSION),
        "NATS_CLUSTER_SERVER_BIN {} is nats-server {cluster_version}; a cluster needs 2.9.21 or newer",
        cluster_bin.display()
    );
    println!(
        "NatsCluster: nats-server {version} (NATS_SERVER_BIN) is older than 2.9.21, which clusters need \
         (nats-server #4320); this cluster runs nats-server {cluster_version} ({})",
        cluster_bin.display()
    );
    cluster_bin
}

/// Whether a `major.minor.patch` version (any suffix ignored) is at least `oldest`; an unreadable one is not.
fn version_at_least(version: &str, oldest: (u64, u64, u64)) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u64>);
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor)), Some(Ok(patch))) => (major, minor, patch) >= oldest,
        _ => false,
    }
}

fn version_of(bin: &Path) -> String {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); run scripts/install-test-deps or set NATS_SERVER_BIN",
                bin.display()
            )
        });
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .trim_start_matches("nats-server: ")
        .trim_start_matches('v')
        .to_owned()
}

/// One `nats-server` with JetStream, on loopback.
#[derive(Debug)]
pub struct NatsServer {
    dir: TempDir,
    bin: PathBuf,
    name: String,
    child: Option<Child>,
    port: Option<u16>,
    cluster: Option<ClusterRole>,
    secured: bool,
}

#[derive(Debug, Clone)]
struct ClusterRole {
    name: String,
    listen_port: u16,
    routes: Vec<u16>,
}

impl NatsServer {
    /// Starts a standalone server and waits until it accepts clients.
    pub fn start() -> Self {
        Self::spawn(nats_server_bin(), "n1".to_owned(), None, false)
    }

    /// Starts a standalone server with authorization as deployed: `taskpods auth init` material for the
    /// `taskpods` prefix in [`Self::auth_dir`], the server in operator mode trusting it. The harness's own
    /// connections ([`Self::connect`]) use the admin identity; [`Self::creds`] names each role's file.
    pub fn start_secured() -> Self {
        Self::spawn(nats_server_bin(), "n1".to_owned(), None, true)
    }

    fn spawn(bin: PathBuf, name: String, cluster: Option<ClusterRole>, secured: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("taskpods-nats-")
            .tempdir()
            .expect("temporary directory for nats-server");
        let mut server = Self {
            dir,
            bin,
            name,
            child: None,
            port: None,
            cluster,
            secured,
        };
        if secured {
            let names = taskpods_events::Names::new("taskpods").expect("default prefix");
            taskpods_auth::Material::generate()
                .and_then(|m| m.write(&server.auth_dir(), &names, false))
                .expect("auth material");
        }
        server.launch();
        server
    }

    /// The client URL (`nats://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port())
    }

    /// The server's name (`n1` standalone, `n1`..`n3` in a cluster).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port.expect("server was started")
    }

    /// The server's log file, for debugging a failing test.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Where the auth material of a secured server lives (see [`Self::start_secured`]).
    pub fn auth_dir(&self) -> PathBuf {
        self.dir.path().join("auth")
    }

    /// The credentials file of `role` (`admin`, `engine`, `brain`, `operator`) on a secured server.
    pub fn creds(&self, role: &str) -> PathBuf {
        self.auth_dir().join(format!("{role}.creds"))
    }

    /// Connects a client (as admin on a secured server).
    pub async fn connect(&self) -> async_nats::Client {
        if self.secured {
            return self.connect_as("admin").await;
        }
        async_nats::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url()))
    }

    /// Connects with the credentials of `role` on a secured server.
    pub async fn connect_as(&self, role: &str) -> async_nats::Client {
        async_nats::ConnectOptions::with_credentials_file(self.creds(role))
            .await
            .unwrap_or_else(|e| panic!("{role} credentials: {e}"))
            .connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connect to {} as {role}: {e}", self.url()))
    }

    /// Waits until JetStream answers (leader elected, store ready), with a bounded wait. Asks the raw
    /// `$JS.API.INFO` endpoint because the client's account query cannot parse 2.9's reply.
    pub async fn wait_for_jetstream(&self) {
        let client = self.connect().await;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let last = match client.request("$JS.API.INFO", "".into()).await {
                Ok(reply) => {
                    let body: serde_json::Value =
                        serde_json::from_slice(&reply.payload).unwrap_or_default();
                    if body.get("error").is_none() && body.get("type").is_some() {
                        return;
                    }
                    body.to_string()
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                panic!(
                    "JetStream on {} not ready after {READY_TIMEOUT:?}: {last}\n{}",
                    self.url(),
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the server abruptly (SIGKILL), as a crash would; the store stays for [`Self::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's process id while it runs (to pause it, for lag tests).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    fn config(&self) -> String {
        let store = self.dir.path().join("jetstream");
        let mut config = format!(
            "server_name: {name}\n\
             listen: \"127.0.0.1:{port}\"\n\
             http: \"127.0.0.1:-1\"\n\
             ports_file_dir: {ports:?}\n\
             jetstream {{\n  store_dir: {store:?}\n  max_memory_store: 268435456\n  max_file_store: 4294967296\n}}\n",
            name = self.name,
            port = self.port.map_or("-1".to_owned(), |p| p.to_string()),
            ports = self.ports_dir(),
            store = store,
        );
        if self.secured {
            let auth = self
                .auth_dir()
                .join(taskpods_auth::material::files::SERVER_CONFIG);
            config.push_str(&fs::read_to_string(&auth).expect("auth server config"));
        }
        if let Some(cluster) = &self.cluster {
            let routes: Vec<String> = cluster
                .routes
                .iter()
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            config.push_str(&format!(
                "cluster {{\n  name: {}\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
                cluster.name,
                cluster.listen_port,
                routes.join(", ")
            ));
        }
        config
    }

    fn ports_dir(&self) -> PathBuf {
        self.dir.path().join("ports")
    }

    fn launch(&mut self) {
        let ports_dir = self.ports_dir();
        let _ = fs::remove_dir_all(&ports_dir);
        fs::create_dir_all(&ports_dir).expect("ports dir");
        let config_path = self.dir.path().join("server.conf");
        fs::write(&config_path, self.config()).expect("write nats-server config");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("server log");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}); run scripts/install-test-deps or set NATS_SERVER_BIN",
                    self.bin.display()
                )
            });
        self.child = Some(child);
        let port = self.wait_for_ports(&ports_dir);
        self.port = Some(port);
    }

    fn wait_for_ports(&mut self, ports_dir: &Path) -> u16 {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(port) = read_client_port(ports_dir) {
                return port;
            }
            if !self.is_running() {
                panic!("nats-server exited during start:\n{}", self.log_tail(30));
            }
            if Instant::now() > deadline {
                panic!(
                    "nats-server did not open its ports within {START_TIMEOUT:?}:\n{}",
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn read_client_port(ports_dir: &Path) -> Option<u16> {
    let entry = fs::read_dir(ports_dir)
        .ok()?
        .flatten()
        .find(|e| e.path().extension().is_some_and(|ext| ext == "ports"))?;
    let text = fs::read_to_string(entry.path()).ok()?;
    let ports: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = ports.get("nats")?.as_array()?.first()?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three routed servers with clustered JetStream.
#[derive(Debug)]
pub struct NatsCluster {
    /// The servers, `n1`..`n3`.
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts three servers routed to each other (nats-server 2.9.21 or newer, see
    /// [`nats_cluster_server_bin`]) and waits for JetStream to elect a leader.
    pub async fn start() -> Self {
        let bin = nats_cluster_server_bin();
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let cluster_name = format!("taskpods-test-{}", std::process::id());
        let servers = (0..3)
            .map(|i| {
                NatsServer::spawn(
                    bin.clone(),
                    format!("n{}", i + 1),
                    Some(ClusterRole {
                        name: cluster_name.clone(),
                        listen_port: cluster_ports[i],
                        routes: cluster_ports.clone(),
                    }),
                    false,
                )
            })
            .collect();
        let cluster = Self { servers };
        for server in &cluster.servers {
            server.wait_for_jetstream().await;
        }
        cluster
    }

    /// A client URL list naming every server, so the client fails over.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// Connects a client that knows every server.
    pub async fn connect(&self) -> async_nats::Client {
        let addrs: Vec<async_nats::ServerAddr> = self
            .urls()
            .iter()
            .map(|u| u.parse().expect("valid url"))
            .collect();
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(addrs)
            .await
            .expect("connect to cluster")
    }
}

/// A currently free loopback port. A small race with other processes is possible, which is acceptable for
/// cluster ports in tests (the client port is always chosen by the server itself).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

#[cfg(test)]
mod tests {
    use super::{CLUSTER_OLDEST_VERSION, version_at_least};

    #[test]
    fn clusters_need_2_9_21_or_newer() {
        for old in ["2.9.10", "v2.9.20", "2.8.4", "", "garbage"] {
            assert!(!version_at_least(old, CLUSTER_OLDEST_VERSION), "{old}");
        }
        for fixed in ["2.9.21", "v2.9.25", "2.10.0", "2.12.15", "2.11.0-beta.1"] {
            assert!(version_at_least(fixed, CLUSTER_OLDEST_VERSION), "{fixed}");
        }
    }
}
