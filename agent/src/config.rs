//! The agent's configuration: its environment variables, with an optional `NAME=value` file for any not
//! set (see the table in the crate documentation).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use taskpods_events::{Names, SubjectError, TaskId};

use crate::sandbox::{Sandbox, SandboxLimits};

/// The default configuration file (e.g. a mounted Secret in the task pod).
pub const DEFAULT_ENV_FILE: &str = "/etc/taskpods/agent.env";

/// Reads `NAME=value` lines (blank lines and `#` comments skipped) from `path`, or from
/// [`DEFAULT_ENV_FILE`] when it exists and no path is given.
pub fn env_file(path: Option<PathBuf>) -> Result<BTreeMap<String, String>, ConfigError> {
    let (path, required) = match path {
        Some(path) => (path, true),
        None => (PathBuf::from(DEFAULT_ENV_FILE), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(BTreeMap::new());
        }
        Err(source) => return Err(ConfigError::EnvFile { path, source }),
    };
    parse_env_file(&text).map_err(|line| ConfigError::EnvFileLine { path, line })
}

/// Parses `NAME=value` lines; the error is the 1-based number of the first bad line.
pub fn parse_env_file(text: &str) -> Result<BTreeMap<String, String>, usize> {
    let mut vars = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line.split_once('=').ok_or(i + 1)?;
        let name = name.trim();
        if name.is_empty() {
            return Err(i + 1);
        }
        vars.insert(name.to_owned(), value.trim().to_owned());
    }
    Ok(vars)
}

/// Everything the agent reads from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// The task.
    pub task: TaskId,
    /// NATS URLs.
    pub nats_urls: Vec<String>,
    /// Credentials file, if any.
    pub nats_creds: Option<std::path::PathBuf>,
    /// The credentials themselves, once read ([`Config::read_credentials`]).
    pub nats_credentials: Option<Secret>,
    /// Subject names.
    pub names: Names,
    /// Stop asking for instructions after this.
    pub deadline: DateTime<Utc>,
    /// How the code is isolated.
    pub sandbox: Sandbox,
    /// Limits for the code.
    pub limits: SandboxLimits,
    /// What mode `agent` runs.
    pub agent_entrypoint: String,
    /// Largest output chunk, bytes.
    pub chunk_bytes: usize,
    /// Longest an output byte waits before it is sent.
    pub flush_interval: Duration,
    /// How long past the deadline the agent kills the code itself.
    pub kill_grace: Duration,
    /// How long the code gets between the forwarded SIGTERM and SIGKILL.
    pub term_grace: Duration,
    /// How long past the deadline plus `kill_grace` the agent keeps trying to report before it exits.
    pub report_grace: Duration,
    /// Where `in/` (inputs) and `out/` (artifacts) live on the agent's side.
    pub files_dir: std::path::PathBuf,
    /// Values the kubelet put in the pod from Kubernetes Secrets (the task's `secret_env`), for the code,
    /// by name: `TASKPODS_SECRET_ENV` lists the names, `TASKPODS_SECRET_ENV_<NAME>` holds each value.
    pub secret_env: std::collections::BTreeMap<String, Secret>,
}

/// A secret text (NATS credentials) that `Debug` never shows.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A configuration problem: which variable (or file), and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required variable is not set.
    #[error("{name}: is required")]
    Missing {
        /// The variable.
        name: &'static str,
    },
    /// A variable that must be a whole number is not one.
    #[error("{name}: not a number")]
    NotANumber {
        /// The variable.
        name: &'static str,
        /// Why it does not parse.
        #[source]
        source: std::num::ParseIntError,
    },
    /// `TASKPODS_TASK_ID` is not a UUID.
    #[error("TASKPODS_TASK_ID: not a UUID")]
    TaskId(#[source] uuid::Error),
    /// `TASKPODS_PREFIX` is not a valid subject prefix.
    #[error("TASKPODS_PREFIX: {0}")]
    Prefix(#[source] SubjectError),
    /// `TASKPODS_DEADLINE` is not an RFC 3339 time.
    #[error("TASKPODS_DEADLINE: not an RFC 3339 time")]
    Deadline(#[source] chrono::ParseError),
    /// `TASKPODS_SANDBOX` names no sandbox this agent knows (the value given).
    #[error("TASKPODS_SANDBOX: {0:?}: use bwrap or none")]
    Sandbox(String),
    /// The environment file could not be read.
    #[error("{}: {source}", path.display())]
    EnvFile {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The NATS credentials (`TASKPODS_NATS_CREDS`) could not be read.
    #[error("TASKPODS_NATS_CREDS: {}: {source}", if path.as_os_str() == "-" { "standard input".into() } else { path.display().to_string() })]
    Credentials {
        /// The file, or `-` for standard input.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The NATS credentials are empty.
    #[error("TASKPODS_NATS_CREDS: the credentials are empty")]
    EmptyCredentials,
    /// A line of the environment file is not `NAME=value`.
    #[error("{}: line {line} is not NAME=value", path.display())]
    EnvFileLine {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
    },
}

impl Config {
    /// Reads the configuration through `var` (the process environment in `main`).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let number = |name: &'static str, text: String| {
            text.trim()
                .parse()
                .map_err(|source| ConfigError::NotANumber { name, source })
        };
        let num = |name: &'static str, default: u64| -> Result<u64, ConfigError> {
            var(name).map_or(Ok(default), |v| number(name, v))
        };
        let task = var("TASKPODS_TASK_ID")
            .ok_or(ConfigError::Missing {
                name: "TASKPODS_TASK_ID",
            })?
            .parse::<TaskId>()
            .map_err(ConfigError::TaskId)?;
        let nats_urls = var("TASKPODS_NATS_URL")
            .unwrap_or_else(|| "nats://127.0.0.1:4222".into())
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let names = Names::new(&var("TASKPODS_PREFIX").unwrap_or_else(|| "taskpods".into()))
            .map_err(ConfigError::Prefix)?;
        let deadline = match var("TASKPODS_DEADLINE") {
            None => Utc::now() + chrono::TimeDelta::minutes(30),
            Some(v) => DateTime::parse_from_rfc3339(v.trim())
                .map_err(ConfigError::Deadline)?
                .with_timezone(&Utc),
        };
        let sandbox = match var("TASKPODS_SANDBOX").as_deref().unwrap_or("bwrap") {
            "bwrap" => Sandbox::Bwrap,
            "none" => Sandbox::None,
            other => return Err(ConfigError::Sandbox(other.to_owned())),
        };
        let limits = SandboxLimits {
            tmp_bytes: num("TASKPODS_TMP_BYTES", 64 << 20)?,
            max_procs: num("TASKPODS_MAX_PROCS", 256)?,
            max_file_bytes: num("TASKPODS_MAX_FILE_BYTES", 64 << 20)?,
            cpu_secs: var("TASKPODS_CPU_SECS")
                .map(|v| number("TASKPODS_CPU_SECS", v))
                .transpose()?,
            memory_bytes: var("TASKPODS_MEMORY_BYTES")
                .map(|v| number("TASKPODS_MEMORY_BYTES", v))
                .transpose()?,
        };
        // Under bubblewrap the directories are bound into the sandbox by its own (unprivileged) UID, so
        // they cannot sit in the engine's state directory, which is closed to that UID.
        let files_dir = match (var("TASKPODS_FILES_DIR"), sandbox) {
            (Some(dir), _) => dir.into(),
            (None, Sandbox::None) => std::env::temp_dir(),
            (None, Sandbox::Bwrap) => std::env::temp_dir().join(format!("taskpods-files-{task}")),
        };
        Ok(Self {
            task,
            files_dir,
            nats_urls,
            nats_creds: var("TASKPODS_NATS_CREDS").map(Into::into),
            nats_credentials: None,
            names,
            deadline,
            sandbox,
            limits,
            agent_entrypoint: var("TASKPODS_AGENT_ENTRYPOINT")
                .unwrap_or_else(|| "/usr/local/bin/taskpods-goal".into()),
            chunk_bytes: usize::try_from(
                num("TASKPODS_CHUNK_BYTES", 64 << 10)?.clamp(1, 512 << 10),
            )
            .unwrap_or(64 << 10),
            flush_interval: Duration::from_millis(num("TASKPODS_FLUSH_MS", 200)?.max(1)),
            kill_grace: Duration::from_millis(num("TASKPODS_KILL_GRACE_MS", 5000)?),
            term_grace: Duration::from_millis(num("TASKPODS_TERM_GRACE_MS", 2000)?),
            report_grace: Duration::from_millis(num("TASKPODS_REPORT_GRACE_MS", 30_000)?),
            secret_env: var(taskpods_events::env::SECRET_ENV_NAMES_VAR)
                .unwrap_or_default()
                .split(',')
                .filter(|name| !name.is_empty())
                .filter_map(|name| {
                    let value = var(&format!(
                        "{}{name}",
                        taskpods_events::env::SECRET_ENV_VALUE_PREFIX
                    ))?;
                    Some((name.to_owned(), Secret(value)))
                })
                .collect(),
        })
    }
}

impl Config {
    /// Reads the credentials `nats_creds` names, once: from standard input for `-` (the local
    /// backend's pipe, which nothing else can read afterwards), else from the file.
    pub fn read_credentials(mut self) -> Result<Self, ConfigError> {
        let Some(path) = &self.nats_creds else {
            return Ok(self);
        };
        let text = if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|source| {
                ConfigError::Credentials {
                    path: path.clone(),
                    source,
                }
            })?;
            text
        } else {
            std::fs::read_to_string(path).map_err(|source| ConfigError::Credentials {
                path: path.clone(),
                source,
            })?
        };
        if text.trim().is_empty() {
            return Err(ConfigError::EmptyCredentials);
        }
        self.nats_credentials = Some(Secret(text));
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_reads_the_environment_with_defaults() {
        let task = TaskId::mint();
        let env = BTreeMap::from([
            ("TASKPODS_TASK_ID".to_owned(), task.to_string()),
            (
                "TASKPODS_NATS_URL".to_owned(),
                "nats://a:1, nats://b:2".to_owned(),
            ),
            ("TASKPODS_SANDBOX".to_owned(), "none".to_owned()),
            ("TASKPODS_MAX_PROCS".to_owned(), "32".to_owned()),
        ]);
        let config = Config::from_env(|n| env.get(n).cloned()).expect("valid");
        assert_eq!(config.task, task);
        assert_eq!(config.nats_urls, ["nats://a:1", "nats://b:2"]);
        assert_eq!(config.sandbox, Sandbox::None);
        assert_eq!(config.limits.max_procs, 32);
        assert_eq!(config.chunk_bytes, 64 << 10);
        assert_eq!(config.names.prefix(), "taskpods");
        let missing = Config::from_env(|_| None).expect_err("task id required");
        assert!(missing.to_string().contains("TASKPODS_TASK_ID"));
        let bad = Config::from_env(|n| match n {
            "TASKPODS_TASK_ID" => Some(task.to_string()),
            "TASKPODS_SANDBOX" => Some("docker".into()),
            _ => None,
        })
        .expect_err("bad sandbox");
        assert!(bad.to_string().contains("use bwrap or none"));
    }

    #[test]
    fn secret_env_values_come_from_their_prefixed_variables_and_never_show() {
        let task = TaskId::mint();
        let env = BTreeMap::from([
            ("TASKPODS_TASK_ID".to_owned(), task.to_string()),
            (
                "TASKPODS_SECRET_ENV".to_owned(),
                "API_TOKEN,ABSENT".to_owned(),
            ),
            (
                "TASKPODS_SECRET_ENV_API_TOKEN".to_owned(),
                "s3cret".to_owned(),
            ),
            // Not listed: not handed to the code.
            ("TASKPODS_SECRET_ENV_OTHER".to_owned(), "x".to_owned()),
        ]);
        let config = Config::from_env(|n| env.get(n).cloned()).expect("valid");
        assert_eq!(config.secret_env.len(), 1);
        assert_eq!(config.secret_env["API_TOKEN"].0, "s3cret");
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn env_files_are_name_value_lines() {
        let vars =
            parse_env_file("# comment\n\nTASKPODS_TASK_ID = x\nTASKPODS_NATS_URL=nats://h:4222\n")
                .expect("valid");
        assert_eq!(vars["TASKPODS_TASK_ID"], "x");
        assert_eq!(vars["TASKPODS_NATS_URL"], "nats://h:4222");
        assert_eq!(parse_env_file("A=1\nnonsense\n"), Err(2));
        assert!(env_file(Some("/nonexistent/agent.env".into())).is_err());
    }
}
