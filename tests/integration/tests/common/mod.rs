//! Fixtures shared by the tests that run a real engine with the local backend (files, hostile, local
//! tasks, fair shares, hostile input, the web UI): one engine configuration, each test overriding only
//! what it is about.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use taskpods_engine::config::EngineConfig;
use taskpods_engine::executor::local::LocalConfig;
use taskpods_engine::executor::{BackendConfig, ExecutorConfig};
use taskpods_engine::gateway::GatewayConfig;
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
