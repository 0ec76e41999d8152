//! `taskpods replay`: a task's events from the stream as a timeline (or its state `--at` a point), and
//! `taskpods replay --failed --since <duration>`: failed and timed-out tasks read from the stream, not the
//! views, for "what went wrong last night".

use std::io::Write;
use std::process::ExitCode;

use async_nats::jetstream;
use chrono::Utc;
use taskpods_events::TaskId;
use taskpods_projections::replay::{self, At};

use crate::cli::{CliError, Global, progress_bar, show};

/// Arguments of `taskpods replay`.
#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// The task to replay (omit with --failed).
    #[arg(required_unless_present = "failed", conflicts_with = "failed")]
    pub task: Option<TaskId>,
    /// Show the state at this point: a stream sequence (e.g. 42) or an RFC 3339 time.
    #[arg(long)]
    pub at: Option<String>,
    /// List failed and timed-out tasks instead of replaying one.
    #[arg(long)]
    pub failed: bool,
    /// With --failed: how far back to look (e.g. 30m, 12h, 7d).
    #[arg(long, default_value = "24h", requires = "failed")]
    pub since: String,
    /// Print JSON (one document) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `taskpods replay`.
pub async fn run(global: Global, args: ReplayArgs) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match run_to(&global, &args, &mut out).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `taskpods replay` writing to `out` (tests capture it).
pub async fn run_to(
    global: &Global,
    args: &ReplayArgs,
    out: &mut impl Write,
) -> Result<ExitCode, CliError> {
    let at = args.at.as_deref().map(str::parse::<At>).transpose()?;
    let client = global.connect().await?;
    let js = jetstream::new(client);
    let names = &global.names;
    let events = js
        .get_stream(names.event_stream())
        .await
        .map_err(|e| CliError::stream(format!("event stream {}", names.event_stream()), e))?;

    if args.failed {
        let since = Utc::now() - replay::parse_duration(&args.since)?;
        let bar = progress_bar("scanning", args.json);
        let report = replay::failed_since(&events, names, since, |done, total| {
            show(&bar, done, total);
        })
        .await?;
        bar.finish();
        if args.json {
            serde_json::to_writer_pretty(&mut *out, &report)?;
            writeln!(out)?;
        } else {
            write!(out, "{}", replay::render_failed(&report, since))?;
        }
        return Ok(ExitCode::SUCCESS);
    }

    let Some(task) = args.task else {
        return Err(CliError::NoTask);
    };
    let timeline = replay::replay(&events, names, task, at).await?;
    if args.json {
        let doc = if at.is_some() {
            serde_json::json!({ "task": task, "at": args.at, "state": timeline.state,
                "oddities": timeline.oddities })
        } else {
            serde_json::to_value(&timeline)?
        };
        serde_json::to_writer_pretty(&mut *out, &doc)?;
        writeln!(out)?;
    } else if let Some(at) = &args.at {
        writeln!(out, "task {task} at {at}:")?;
        writeln!(out, "{}", replay::render_state(&timeline.state))?;
    } else {
        write!(out, "{}", replay::render_text(&timeline))?;
    }
    Ok(ExitCode::SUCCESS)
}
