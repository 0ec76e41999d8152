//! `taskpods projections rebuild | verify | status`: rebuild every view from sequence 1 into a fresh
//! generation and switch readers over; compare the live views with a fresh fold; show the projector's lag.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use taskpods_projections::projector::{self, ProjectorConfig};
use taskpods_projections::rebuild::{self, Phase, Progress, RebuildConfig};

use crate::cli::Global;

/// Arguments of `taskpods projections`.
#[derive(clap::Args, Debug)]
pub struct ProjectionsArgs {
    #[command(subcommand)]
    pub command: ProjectionsCommand,
}

/// The `projections` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum ProjectionsCommand {
    /// Rebuild every view from sequence 1 into fresh buckets and switch readers to them.
    Rebuild {
        /// Replicas for the new buckets (3 on a cluster).
        #[arg(long, env = "TASKPODS_REPLICAS", default_value_t = 1)]
        replicas: usize,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare the live views with a fresh fold of the stream and print every difference.
    Verify {
        /// Seconds to let the projector catch up before comparing.
        #[arg(long, default_value_t = 10)]
        settle_secs: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the views' generation and how far the projector is behind the stream.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A progress bar on stderr, only when stderr is a terminal (and not in JSON mode).
#[derive(Debug)]
pub struct Bar {
    label: &'static str,
    enabled: bool,
    last: Option<Instant>,
}

impl Bar {
    /// A bar labelled `label`; silent when `quiet` or stderr is not a terminal.
    pub fn new(label: &'static str, quiet: bool) -> Self {
        Self {
            label,
            enabled: !quiet && std::io::stderr().is_terminal(),
            last: None,
        }
    }

    /// Redraws (at most ten times a second).
    pub fn show(&mut self, done: u64, total: u64, started: Instant) {
        if !self.enabled
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(Instant::now());
        let fraction = if total == 0 {
            1.0
        } else {
            done as f64 / total as f64
        };
        let filled = (fraction * 30.0).round() as usize;
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
        eprint!(
            "\r{:<10} [{}{}] {:>5.1}% {done}/{total} ({:.0}/s)   ",
            self.label,
            "#".repeat(filled.min(30)),
            ".".repeat(30 - filled.min(30)),
            fraction * 100.0,
            rate
        );
        let _ = std::io::stderr().flush();
    }

    /// Ends the bar's line.
    pub fn finish(&mut self) {
        if self.enabled && self.last.is_some() {
            eprintln!();
        }
    }
}

/// Runs `taskpods projections ...`.
pub async fn run(global: Global, args: ProjectionsArgs) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match run_to(&global, &args, &mut out).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `taskpods projections ...` writing to `out` (tests capture it).
pub async fn run_to(
    global: &Global,
    args: &ProjectionsArgs,
    out: &mut impl Write,
) -> Result<ExitCode, String> {
    let client = global.connect().await?;
    let js = jetstream::new(client);
    let names = &global.names;
    let io = |e: std::io::Error| e.to_string();
    match &args.command {
        ProjectionsCommand::Rebuild { replicas, json } => {
            let config = RebuildConfig {
                projector: ProjectorConfig {
                    names: names.clone(),
                    buckets: taskpods_projections::BucketSettings {
                        replicas: *replicas,
                        ..Default::default()
                    },
                    ..ProjectorConfig::default()
                },
                ..RebuildConfig::default()
            };
            let started = Instant::now();
            let mut fold = Bar::new("folding", *json);
            let mut write = Bar::new("writing", *json);
            let summary = rebuild::rebuild(&js, &config, |p: Progress| match p.phase {
                Phase::Fold => fold.show(p.done, p.total, started),
                _ => {
                    fold.finish();
                    write.show(p.done, p.total, started);
                }
            })
            .await
            .map_err(|e| e.to_string())?;
            write.finish();
            if *json {
                serde_json::to_writer_pretty(&mut *out, &summary).map_err(|e| e.to_string())?;
                writeln!(out).map_err(io)?;
            } else {
                writeln!(
                    out,
                    "rebuilt generation {} from {} events ({} tasks) in {:.2} s: {:.0} events/s \
                     (fold {:.2} s, write {:.2} s, {} caught up during the rebuild{}); readers switched \
                     from generation {}",
                    summary.generation,
                    summary.events,
                    summary.tasks,
                    summary.total_secs,
                    summary.events_per_sec(),
                    summary.fold_secs,
                    summary.write_secs,
                    summary.caught_up,
                    if summary.unknown + summary.undecodable > 0 {
                        format!(
                            ", {} unknown and {} undecodable skipped",
                            summary.unknown, summary.undecodable
                        )
                    } else {
                        String::new()
                    },
                    summary.from_generation
                )
                .map_err(io)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ProjectionsCommand::Verify { settle_secs, json } => {
            let started = Instant::now();
            let mut bar = Bar::new("verifying", *json);
            let report = rebuild::verify(
                &js,
                names,
                Duration::from_secs(*settle_secs),
                |p: Progress| bar.show(p.done, p.total, started),
            )
            .await
            .map_err(|e| e.to_string())?;
            bar.finish();
            if *json {
                serde_json::to_writer_pretty(&mut *out, &report).map_err(|e| e.to_string())?;
                writeln!(out).map_err(io)?;
            } else {
                for d in &report.differences {
                    let field = if d.field == "." {
                        String::new()
                    } else {
                        format!(".{}", d.field)
                    };
                    writeln!(
                        out,
                        "task {} {}{field}: live {} fresh {}",
                        d.task, d.bucket, d.live, d.fresh
                    )
                    .map_err(io)?;
                }
                writeln!(
                    out,
                    "verified generation {}: {} tasks, {} events, {} difference(s) in {:.2} s",
                    report.generation,
                    report.tasks,
                    report.events,
                    report.differences.len(),
                    started.elapsed().as_secs_f64()
                )
                .map_err(io)?;
            }
            Ok(if report.differences.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        ProjectionsCommand::Status { json } => {
            let lag = projector::lag(&js, names)
                .await
                .map_err(|e| e.to_string())?;
            if *json {
                let doc = serde_json::json!({
                    "generation": lag.generation,
                    "applied_seq": lag.applied_seq,
                    "stream_seq": lag.stream_seq,
                    "events_behind": lag.events_behind,
                    "seconds_behind": lag.seconds_behind,
                });
                serde_json::to_writer_pretty(&mut *out, &doc).map_err(|e| e.to_string())?;
                writeln!(out).map_err(io)?;
            } else {
                writeln!(
                    out,
                    "views: generation {}, applied through sequence {} of {}: {} events ({:.1} s) behind",
                    lag.generation,
                    lag.applied_seq,
                    lag.stream_seq,
                    lag.events_behind,
                    lag.seconds_behind
                )
                .map_err(io)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
