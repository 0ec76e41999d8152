//! `taskpods projections rebuild | verify | status`: rebuild every view from sequence 1 into a fresh
//! generation and switch readers over; compare the live views with a fresh fold; show the projector's lag.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use taskpods_projections::projector::{self, ProjectorConfig};
use taskpods_projections::rebuild::{self, Phase, Progress, RebuildConfig};

use crate::cli::{CliError, Global, progress_bar, show};

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

/// Runs `taskpods projections ...`.
pub async fn run(global: Global, args: ProjectionsArgs) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match run_to(&global, &args, &mut out).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `taskpods projections ...` writing to `out` (tests capture it).
pub async fn run_to(
    global: &Global,
    args: &ProjectionsArgs,
    out: &mut impl Write,
) -> Result<ExitCode, CliError> {
    let client = global.connect().await?;
    let js = jetstream::new(client);
    let names = &global.names;
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
            let fold = progress_bar("folding", *json);
            let mut write = None;
            let summary = rebuild::rebuild(&js, &config, |p: Progress| match p.phase {
                Phase::Fold => show(&fold, p.done, p.total),
                _ => {
                    let write = write.get_or_insert_with(|| {
                        fold.finish();
                        progress_bar("writing", *json)
                    });
                    show(write, p.done, p.total);
                }
            })
            .await?;
            match write {
                Some(write) => write.finish(),
                None => fold.finish(),
            }
            if *json {
                serde_json::to_writer_pretty(&mut *out, &summary)?;
                writeln!(out)?;
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
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ProjectionsCommand::Verify { settle_secs, json } => {
            let started = Instant::now();
            let bar = progress_bar("verifying", *json);
            let report = rebuild::verify(
                &js,
                names,
                Duration::from_secs(*settle_secs),
                |p: Progress| show(&bar, p.done, p.total),
            )
            .await?;
            bar.finish();
            if *json {
                serde_json::to_writer_pretty(&mut *out, &report)?;
                writeln!(out)?;
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
                    )?;
                }
                writeln!(
                    out,
                    "verified generation {}: {} tasks, {} events, {} difference(s) in {:.2} s",
                    report.generation,
                    report.tasks,
                    report.events,
                    report.differences.len(),
                    started.elapsed().as_secs_f64()
                )?;
            }
            Ok(if report.differences.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        ProjectionsCommand::Status { json } => {
            let lag = projector::lag(&js, names).await?;
            if *json {
                let doc = serde_json::json!({
                    "generation": lag.generation,
                    "applied_seq": lag.applied_seq,
                    "stream_seq": lag.stream_seq,
                    "events_behind": lag.events_behind,
                    "seconds_behind": lag.seconds_behind,
                });
                serde_json::to_writer_pretty(&mut *out, &doc)?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "views: generation {}, applied through sequence {} of {}: {} events ({:.1} s) behind",
                    lag.generation,
                    lag.applied_seq,
                    lag.stream_seq,
                    lag.events_behind,
                    lag.seconds_behind
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
