//! Fixtures shared by the tests that run a real engine with the local backend (files, hostile, local
//! tasks, fair shares, hostile input, the web UI): one engine configuration, each test overriding only
//! what it is about.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use taskpods_engine::config::EngineConfig;
use taskpods_engine::executor::local::{LocalConfig, ProcessId, sandbox_processes};
use taskpods_engine::executor::{BackendConfig, ExecutorConfig};
use taskpods_engine::gateway::GatewayConfig;
use taskpods_events::TaskId;
use taskpods_harness::NatsServer;

/// An engine with the local backend (the agent built with these tests, real bubblewrap), tuned to
/// answer hellos and reap quickly.
pub fn local_engine(server: &NatsServer, state_dir: &Path) -> EngineConfig {
    EngineConfig {
        nats_urls: vec![server.url()],
        gateway: GatewayConfig {
            heartbeat_interval: Duration::from_millis(200),
            hello_retry_after: Duration::from_millis(100),
            ..GatewayConfig::default()
        },
        executor: ExecutorConfig {
            retry_delay: Duration::from_millis(200),
            reap_grace: Duration::from_secs(2),
            ..ExecutorConfig::default()
        },
        backend: BackendConfig::Local(LocalConfig {
            agent_bin: env!("CARGO_BIN_EXE_taskpods-agent-under-test").into(),
            state_dir: state_dir.to_owned(),
            tmp_bytes: 4 << 20,
            max_procs: 64,
            kill_grace: Duration::from_secs(1),
            ..LocalConfig::default()
        }),
        ..EngineConfig::default()
    }
}

/// Turns identities on in `config` for `server` (started with `NatsServer::start_secured`): the engine's
/// own credentials, and the task signer and seal key `taskpods auth init` wrote.
pub fn with_identities(config: &mut EngineConfig, server: &NatsServer) {
    use taskpods_auth::material::files::{SEAL_KEY, TASK_SIGNER};
    config.nats_creds = Some(server.creds("engine"));
    config.auth.seal_key = Some(server.auth_dir().join(SEAL_KEY));
    config.auth.task_signer = Some(server.auth_dir().join(TASK_SIGNER));
}

/// The local backend's settings of `config` (made by [`local_engine`]), to override a field.
pub fn local(config: &mut EngineConfig) -> &mut LocalConfig {
    match &mut config.backend {
        BackendConfig::Local(local) => local,
        other => panic!("not the local backend: {other:?}"),
    }
}

/// A directory for the agents' `/tmp/in` and `/tmp/out` ([`LocalConfig::files_dir`]) that the
/// sandbox's UID can pass through (a fresh temporary directory is closed to everyone but its owner).
pub fn files_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temporary directory");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("open the directory to the sandbox's UID");
    dir
}

/// The local backend's state directory for one test. Dropped at the test's end (a failed one
/// included), it kills the agents whose pid files it holds, and their sandboxes: the agents outlive
/// their engine by design (it adopts them on restart), so without this every test that ends with a
/// task running would leave its agent behind; and a sandbox whose agent is killed while bubblewrap
/// sets itself up is not ended by bubblewrap's `--die-with-parent`.
#[derive(Debug)]
pub struct StateDir(tempfile::TempDir);

impl StateDir {
    /// A fresh, empty state directory.
    pub fn new() -> Self {
        Self(tempfile::tempdir().expect("temporary directory"))
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let Ok(sandboxes) = std::fs::read_dir(self.path()) else {
            return;
        };
        for sandbox in sandboxes.flatten() {
            let task = sandbox.file_name().to_str().and_then(TaskId::from_job_name);
            let Ok(text) = std::fs::read_to_string(sandbox.path().join("pid")) else {
                continue;
            };
            let mut fields = text.split_whitespace();
            let (Some(Ok(pid)), Some(Ok(start))) = (
                fields.next().map(str::parse::<u32>),
                fields.next().map(str::parse::<u64>),
            ) else {
                continue;
            };
            // Only the very process this test's engine started (its start time guards against a
            // recycled pid); the agent leads its own process group.
            if (ProcessId { pid, start }).alive() {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}"), &pid.to_string()])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
            for process in task.map(sandbox_processes).unwrap_or_default() {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &process.pid.to_string()])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
}

/// Processes of `task` still alive: the agent and the code (they carry the task id in their
/// environment), bubblewrap (found by its command line) and whatever runs under it.
pub fn processes_of(task: TaskId) -> Vec<u32> {
    taskpods_integration::task_processes(task)
}

/// Waits until no process of `task` runs (see [`processes_of`]), failing after `within`.
pub async fn gone(task: TaskId, within: Duration) {
    taskpods_integration::until_no_process(&task.to_string(), within, || processes_of(task)).await;
}
