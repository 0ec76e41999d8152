//! `taskpods render-job`: print the Kubernetes Job the engine would create for a launch, as YAML, without
//! touching NATS or a cluster (for review, `kubectl apply --dry-run`, and the validators in the tests).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{TimeDelta, Utc};
use taskpods_events::{LaunchPolicy, LaunchTask, TaskId};

use crate::cli::Global;
use crate::executor::kubernetes::job::{self, JobConfig};

/// Arguments of `taskpods render-job`.
#[derive(clap::Args, Debug)]
pub struct RenderArgs {
    /// A launch as JSON (the `cmd.launch` payload); `-` reads stdin. Default: `echo hello`.
    #[arg(long)]
    pub launch: Option<PathBuf>,
    /// The task id (default: from the launch's id or idempotency key, else a fresh one).
    #[arg(long)]
    pub task_id: Option<TaskId>,
    /// The image, overriding the launch's image or toolbox.
    #[arg(long)]
    pub image: Option<String>,
    /// The namespace task Jobs live in.
    #[arg(long, default_value = "baker-tasks")]
    pub namespace: String,
    /// The task pods' ServiceAccount.
    #[arg(long, default_value = "taskpods-task")]
    pub service_account: String,
    /// Render the Job without the task's own credentials Secret (for a NATS server without
    /// authorization); by default it mounts `<job>-nats`, which the engine makes after the Job.
    #[arg(long)]
    pub without_credentials: bool,
    /// The NATS URL the agent connects to (default: the global --nats-url).
    #[arg(long)]
    pub agent_nats_url: Option<String>,
}

/// Errors of `render-job`.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The launch file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The launch is not valid JSON for a launch.
    #[error("not a launch: {0}")]
    Parse(#[from] serde_json::Error),
    /// The launch breaks the policy.
    #[error("invalid launch: {0}")]
    Invalid(String),
}

/// Renders the Job YAML for `args`.
pub fn render(global: &Global, args: &RenderArgs) -> Result<String, RenderError> {
    let mut launch: LaunchTask = match &args.launch {
        None => LaunchTask::script("echo hello"),
        Some(path) => {
            let mut text = String::new();
            let read = if path.as_os_str() == "-" {
                std::io::stdin().read_to_string(&mut text).map(|_| ())
            } else {
                std::fs::read_to_string(path).map(|t| text = t)
            };
            read.map_err(|source| RenderError::Read {
                path: path.display().to_string(),
                source,
            })?;
            serde_json::from_str(&text)?
        }
    };
    if let Some(image) = &args.image {
        launch.image = Some(image.clone());
        launch.toolbox = None;
    }
    let policy = LaunchPolicy {
        allow_any_image: true,
        ..LaunchPolicy::default()
    };
    let spec = launch.validate(&policy).map_err(|problems| {
        RenderError::Invalid(
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let task = args
        .task_id
        .or_else(|| launch.task_id())
        .unwrap_or_else(TaskId::mint);
    let deadline = Utc::now() + TimeDelta::seconds(i64::from(spec.timeout_secs));
    let config = JobConfig {
        namespace: args.namespace.clone(),
        service_account: args.service_account.clone(),
        nats_url: args
            .agent_nats_url
            .clone()
            .unwrap_or_else(|| global.nats_urls.join(",")),
        prefix: global.names.prefix().to_owned(),
        task_credentials: !args.without_credentials,
        ..JobConfig::default()
    };
    let job = job::build(task, &spec, deadline, &config);
    Ok(job::to_yaml(&serde_json::to_value(&job)?))
}

/// Prints the Job YAML.
pub fn run(global: Global, args: RenderArgs) -> ExitCode {
    match render(&global, &args) {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
