//! Per-task NATS identities. With a task signer (the account signing key from `taskpods auth init`),
//! the engine mints for each task a user that may publish only the task's own agent subjects and output
//! and receive only on the task's own inbox prefix, valid until shortly after the task's deadline. The
//! backend hands it to the task's agent: over the agent's standard input on the local backend (never a
//! file or variable the sandboxed code could read), as a per-task Secret in Kubernetes.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use taskpods_auth::{Credentials, Signer, SignerError};
use taskpods_events::{Names, TaskId};

/// Authorization settings of the engine.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// The task signer file (`task-signer.nk` from `taskpods auth init`). Without it agents connect with
    /// no credentials, which only a server without authorization accepts.
    pub task_signer: Option<PathBuf>,
    /// How long past its deadline a task's identity stays valid (the agent flushes its output and
    /// reports after the engine's deadline kill).
    pub task_credentials_grace: Duration,
    /// The largest message a task may publish, bytes (nats-server's default limit: 1 MiB).
    pub task_max_payload: i64,
    /// The seal key file (`seal.key` from `taskpods auth init`) env values are sealed with in events.
    /// Without it the engine seals with a random key of its own: values stay out of the log, but a task
    /// accepted before a restart cannot get its env back.
    pub seal_key: Option<PathBuf>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            task_signer: None,
            task_credentials_grace: Duration::from_secs(120),
            task_max_payload: taskpods_auth::DEFAULT_MAX_PAYLOAD,
            seal_key: None,
        }
    }
}

/// Mints per-task credentials.
#[derive(Debug, Clone)]
pub struct TaskCredentials {
    signer: Signer,
    names: Names,
    grace: Duration,
    max_payload: i64,
}

impl TaskCredentials {
    /// The minter `config` describes, if it names a signer.
    pub fn load(config: &AuthConfig, names: &Names) -> Result<Option<Self>, SignerError> {
        let Some(path) = &config.task_signer else {
            return Ok(None);
        };
        Ok(Some(Self {
            signer: Signer::load(path)?,
            names: names.clone(),
            grace: config.task_credentials_grace,
            max_payload: config.task_max_payload,
        }))
    }

    /// The credentials of `task`, valid until `deadline` plus the grace period.
    pub fn mint(&self, task: TaskId, deadline: DateTime<Utc>) -> Result<Credentials, SignerError> {
        let grace = chrono::TimeDelta::from_std(self.grace).unwrap_or(chrono::TimeDelta::MAX);
        let expires = deadline.checked_add_signed(grace).unwrap_or(deadline);
        self.signer
            .mint_task(task, &self.names, self.max_payload, expires)
    }
}
