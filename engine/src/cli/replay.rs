//! `taskpods replay`: a task's events from the stream as a timeline (or its state `--at` a point), and
//! `taskpods replay --failed --since <duration>`: failed and timed-out tasks read from the stream, not the
//! views, for "what went wrong last night".

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use async_nats::jetstream;
use chrono::Utc;
use taskpods_events::TaskId;
use taskpods_projections::replay::{self, At};

use crate::cli::Global;
use crate::cli::projections::Bar;

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
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `taskpods replay` writing to `out` (tests capture it).
pub async fn run_to(
    global: &Global,
    args: &ReplayArgs,
    out: &mut impl Write,
) -> Result<ExitCode, String> {
    let at = args
        .at
        .as_deref()
        .map(str::parse::<At>)
        .transpose()
        .map_err(|e| e.to_string())?;
    let client = global.connect().await?;
    let js = jetstream::new(client);
    let names = &global.names;
    let events = js
        .get_stream(names.event_stream())
        .await
        .map_err(|e| format!("event stream {}: {e}", names.event_stream()))?;
    let write_err = |e: std::io::Error| e.to_string();

    if args.failed {
        let since = Utc::now() - replay::parse_duration(&args.since).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut bar = Bar::new("scanning", args.json);
        let report = replay::failed_since(&events, names, since, |done, total| {
            bar.show(done, total, started);
        })
        .await
        .map_err(|e| e.to_string())?;
        bar.finish();
        if args.json {
            serde_json::to_writer_pretty(&mut *out, &report).map_err(|e| e.to_string())?;
            writeln!(out).map_err(write_err)?;
        } else {
            write!(out, "{}", replay::render_failed(&report, since)).map_err(write_err)?;
        }
        return Ok(ExitCode::SUCCESS);
    }

    let Some(task) = args.task else {
        return Err("give a task id, or --failed".into());
    };
    let timeline = replay::replay(&events, names, task, at)
        .await
        .map_err(|e| e.to_string())?;
    if args.json {
        let doc = if at.is_some() {
            serde_json::json!({ "task": task, "at": args.at, "state": timeline.state,
                "oddities": timeline.oddities })
        } else {
            serde_json::to_value(&timeline).map_err(|e| e.to_string())?
        };
        serde_json::to_writer_pretty(&mut *out, &doc).map_err(|e| e.to_string())?;
        writeln!(out).map_err(write_err)?;
    } else if let Some(at) = &args.at {
        writeln!(out, "task {task} at {at}:").map_err(write_err)?;
        writeln!(out, "{}", replay::render_state(&timeline.state)).map_err(write_err)?;
    } else {
        write!(out, "{}", replay::render_text(&timeline)).map_err(write_err)?;
    }
    Ok(ExitCode::SUCCESS)
}
