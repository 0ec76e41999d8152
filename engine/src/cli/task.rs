//! `taskpods launch | show | events | cancel`: the task commands a person (or a shell-script Brain) uses.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt;
use taskpods_client::{Client, ClientConfig, ClientError, StoredEvent};
use taskpods_events::{Event, EventBody, LaunchTask, Mode, Task, TaskId, TaskState, evolve};

use crate::cli::Global;

/// Arguments of `taskpods launch`.
#[derive(clap::Args, Debug)]
pub struct LaunchArgs {
    /// The script to run (mode script); `-` reads it from standard input.
    #[arg(long, conflicts_with = "goal")]
    pub script: Option<String>,
    /// The goal for the agent entrypoint (mode agent).
    #[arg(long)]
    pub goal: Option<String>,
    /// Seconds before the task is timed out (at most 1800).
    #[arg(long)]
    pub timeout: Option<u32>,
    /// Idempotency key: launching the same key again finds the same task.
    #[arg(long)]
    pub key: Option<String>,
    /// Toolbox (configured image) to run in.
    #[arg(long)]
    pub toolbox: Option<String>,
    /// Environment variable for the script, `NAME=value`; repeatable.
    #[arg(long = "env", value_parser = parse_pair)]
    pub env: Vec<(String, String)>,
    /// An input file, `NAME=PATH`: stored in the files bucket before the launch, found by the code at
    /// `/tmp/in/NAME`; repeatable.
    #[arg(long = "input", value_parser = crate::cli::files::parse_input)]
    pub inputs: Vec<(String, std::path::PathBuf)>,
    /// Label, `key=value`; repeatable.
    #[arg(long = "label", value_parser = parse_pair)]
    pub labels: Vec<(String, String)>,
    /// Follow the task's events until it ends; the exit code says how it ended.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds.
    #[arg(long, default_value_t = 1900)]
    pub wait_secs: u64,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `taskpods show`.
#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// The task id.
    pub task: TaskId,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `taskpods events`.
#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    /// The task id.
    pub task: TaskId,
    /// Keep following new events until the task ends.
    #[arg(long, short)]
    pub follow: bool,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `taskpods cancel`.
#[derive(clap::Args, Debug)]
pub struct CancelArgs {
    /// The task id.
    pub task: TaskId,
    /// Why, for the record.
    #[arg(long)]
    pub reason: Option<String>,
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not NAME=value"))
}

/// A client for the one-shot commands.
pub(crate) async fn connect(global: &Global) -> Result<Client, ClientError> {
    let nats = global
        .connect()
        .await
        .map_err(|e| ClientError::Unreachable(e.into()))?;
    Ok(Client::new(
        nats,
        ClientConfig {
            names: global.names.clone(),
            ..ClientConfig::default()
        },
    ))
}

fn fail(error: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::FAILURE
}

/// `taskpods launch`.
pub async fn launch(global: Global, args: LaunchArgs) -> ExitCode {
    let script = match args.script.as_deref() {
        Some("-") => {
            let mut text = String::new();
            if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
                return fail(format!("reading the script from standard input: {e}"));
            }
            Some(text)
        }
        other => other.map(str::to_owned),
    };
    let mut launch = LaunchTask {
        idempotency_key: args.key.clone(),
        toolbox: args.toolbox.clone(),
        mode: if args.goal.is_some() {
            Mode::Agent
        } else {
            Mode::Script
        },
        script,
        goal: args.goal.clone(),
        env: args.env.iter().cloned().collect::<BTreeMap<_, _>>(),
        timeout_secs: args.timeout,
        labels: args.labels.iter().cloned().collect(),
        requester: std::env::var("USER").ok().map(|u| format!("cli:{u}")),
        ..LaunchTask::default()
    };
    let client = match connect(&global).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if !args.inputs.is_empty() {
        // Inputs are stored under the task's id, so the id is fixed before the launch.
        let task = launch.task_id().unwrap_or_else(TaskId::mint);
        launch.task_id = Some(task.0);
        launch.inputs = match crate::cli::files::put_inputs(&client, task, &args.inputs).await {
            Ok(inputs) => inputs,
            Err(e) => return fail(e),
        };
    }
    let launched = match client.launch(launch).await {
        Ok(l) => l,
        Err(ClientError::Rejected { task_id, problems }) => {
            eprintln!("task {task_id} rejected:");
            for problem in problems {
                eprintln!("  {problem}");
            }
            return ExitCode::from(2);
        }
        Err(e) => return fail(e),
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "task_id": launched.task_id,
                "state": launched.state,
                "sequence": launched.sequence,
                "created": launched.created,
            })
        );
    } else {
        let verb = if launched.created {
            "accepted"
        } else {
            "already exists"
        };
        println!(
            "task {} {verb} (state {}, first event #{})",
            launched.task_id,
            launched.state.name(),
            launched.sequence
        );
    }
    if !args.wait {
        return ExitCode::SUCCESS;
    }
    follow(
        &client,
        launched.task_id,
        args.json,
        Some(Duration::from_secs(args.wait_secs)),
    )
    .await
}

/// `taskpods show`.
pub async fn show(global: Global, args: ShowArgs) -> ExitCode {
    let client = match connect(&global).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let snapshot = match client.get(args.task).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let task = &snapshot.task;
    if task.state == TaskState::New {
        return fail(format!("no task {}", args.task));
    }
    if args.json {
        println!("{}", task_json(args.task, task, snapshot.last_sequence));
        return ExitCode::SUCCESS;
    }
    println!("task      {}", args.task);
    println!("state     {}", state_label(&task.state));
    if let Some(spec) = &task.spec {
        println!("image     {}", spec.image);
        println!("timeout   {} s", spec.timeout_secs);
        let first_line = spec.instructions.lines().next().unwrap_or("");
        println!(
            "{:<9} {first_line}",
            if spec.mode == Mode::Script {
                "script"
            } else {
                "goal"
            }
        );
    }
    let at =
        |t: Option<chrono::DateTime<chrono::Utc>>| t.map_or("-".to_owned(), |t| t.to_rfc3339());
    println!("accepted  {}", at(task.accepted_at));
    println!("deadline  {}", at(task.deadline));
    println!("finished  {}", at(task.finished_at));
    println!("job       {}", task.job.as_deref().unwrap_or("-"));
    println!("pod       {}", task.pod.as_deref().unwrap_or("-"));
    println!("reaped    {}", if task.reaped { "yes" } else { "no" });
    println!(
        "events    {} (last #{})",
        task.events, snapshot.last_sequence
    );
    // The id its trace has in the tracing backend, when traces are exported (derived from the task id).
    println!("trace     {}", crate::telemetry::trace_id(args.task));
    ExitCode::SUCCESS
}

/// `taskpods events`.
pub async fn events(global: Global, args: EventsArgs) -> ExitCode {
    let client = match connect(&global).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if args.follow {
        return follow(&client, args.task, args.json, None).await;
    }
    let history = match client.history(args.task).await {
        Ok(h) if h.is_empty() => return fail(format!("no task {}", args.task)),
        Ok(h) => h,
        Err(e) => return fail(e),
    };
    let mut task = Task::default();
    for stored in &history {
        task = evolve(task, &stored.event);
        print_event(stored, &task, args.json);
    }
    ExitCode::SUCCESS
}

/// `taskpods cancel`.
pub async fn cancel(global: Global, args: CancelArgs) -> ExitCode {
    let client = match connect(&global).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match client.cancel(args.task, args.reason).await {
        Ok(state) => {
            println!("task {} {}", args.task, state_label(&state));
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// Prints events as they come until the task ends; exit code 0 only for `Succeeded`.
async fn follow(client: &Client, task_id: TaskId, json: bool, limit: Option<Duration>) -> ExitCode {
    let mut events = match client.events(task_id).await {
        Ok(s) => Box::pin(s),
        Err(e) => return fail(e),
    };
    let run = async {
        let mut task = Task::default();
        while let Some(stored) = events.next().await {
            let stored = stored?;
            task = evolve(task, &stored.event);
            print_event(&stored, &task, json);
            if task.state.is_terminal() {
                return Ok(task);
            }
        }
        Err(ClientError::SubscriptionEnded)
    };
    let result = match limit {
        Some(limit) => {
            tokio::time::timeout(limit, run)
                .await
                .unwrap_or(Err(ClientError::TimedOut {
                    what: "the task to end",
                    after: limit,
                }))
        }
        None => run.await,
    };
    match result {
        Ok(task) if task.state == TaskState::Succeeded => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => fail(e),
    }
}

fn state_label(state: &TaskState) -> String {
    match state {
        TaskState::Failed { reason } => format!("failed ({reason})"),
        other => other.name().to_owned(),
    }
}

/// One line for a person: `#seq time kind details → state`.
pub fn event_line(stored: &StoredEvent, after: &Task) -> String {
    let event: &Event = &stored.event;
    let detail = match &event.body {
        EventBody::Accepted { spec, deadline } => {
            format!(
                "image={} timeout={}s deadline={}",
                spec.image,
                spec.timeout_secs,
                deadline.to_rfc3339()
            )
        }
        EventBody::Rejected { problems } => problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
        EventBody::Scheduled { job } => format!("job={job}"),
        EventBody::Started { pod, node } => {
            format!("pod={pod} node={}", node.as_deref().unwrap_or("-"))
        }
        EventBody::Progress { message, percent } => match percent {
            Some(p) => format!("{p:.0}% {message}"),
            None => message.clone(),
        },
        EventBody::CancelRequested { reason, .. } => reason.clone().unwrap_or_default(),
        EventBody::Succeeded { outcome } => format!("exit=0 duration={}ms", outcome.duration_ms),
        EventBody::Failed {
            reason, message, ..
        } => {
            format!(
                "{reason}{}",
                message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            )
        }
        EventBody::TimedOut { detected_by } => detected_by
            .clone()
            .map(|d| format!("by {d}"))
            .unwrap_or_default(),
        EventBody::Running
        | EventBody::Cancelled { .. }
        | EventBody::Reaped
        | EventBody::Unknown => String::new(),
    };
    format!(
        "#{:<6} {} {:<16} {:<40} → {}",
        stored.sequence,
        event.at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
        event.body.kind(),
        detail,
        state_label(&after.state)
    )
}

fn print_event(stored: &StoredEvent, after: &Task, json: bool) {
    let line = if json {
        serde_json::json!({
            "sequence": stored.sequence,
            "event": stored.event,
            "state_after": after.state,
        })
        .to_string()
    } else {
        event_line(stored, after)
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn task_json(task_id: TaskId, task: &Task, last_sequence: u64) -> serde_json::Value {
    serde_json::json!({
        "task_id": task_id,
        "state": task.state,
        "spec": task.spec,
        "accepted_at": task.accepted_at,
        "deadline": task.deadline,
        "finished_at": task.finished_at,
        "job": task.job,
        "pod": task.pod,
        "reaped": task.reaped,
        "events": task.events,
        "last_sequence": last_sequence,
    })
}
