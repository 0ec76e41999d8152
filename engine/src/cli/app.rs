//! The `taskpods` command line: parsing and dispatch only; each command lives in its own module beside
//! this one.

use std::process::ExitCode;

use crate::cli::{self, Global};
use clap::{Parser, Subcommand};
use taskpods_events::Names;

#[derive(Parser, Debug)]
#[command(
    name = "taskpods",
    version,
    about = "Ephemeral, sandboxed task pods driven over NATS"
)]
struct Cli {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "TASKPODS_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    nats_url: String,
    /// NATS credentials file (from `taskpods auth init`: `engine.creds` for `serve`, `brain.creds` or
    /// `operator.creds` for the other commands), as the `nats` CLI's `--creds`. A leading `~/` is the home
    /// directory (MCP hosts pass environment values as written).
    #[arg(long, env = "TASKPODS_CREDS", global = true)]
    creds: Option<std::path::PathBuf>,
    /// Subject prefix (streams and buckets are named after it).
    #[arg(
        long,
        env = "TASKPODS_PREFIX",
        default_value = "taskpods",
        global = true
    )]
    prefix: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the engine until Ctrl-C or SIGTERM.
    Serve(cli::serve::ServeArgs),
    /// Launch a task (and with --wait, follow it to the end).
    Launch(cli::task::LaunchArgs),
    /// Show a task's current state, read from its events.
    Show(cli::task::ShowArgs),
    /// Print a task's events (with --follow, live until it ends).
    Events(cli::task::EventsArgs),
    /// Ask for a task to stop.
    Cancel(cli::task::CancelArgs),
    /// Print a task's output (with -f, follow it live until it ends).
    Logs(cli::logs::LogsArgs),
    /// Replay a task's events from the stream (timeline, --at a point), or list --failed tasks.
    Replay(cli::replay::ReplayArgs),
    /// Rebuild, verify or inspect the KV views.
    Projections(cli::projections::ProjectionsArgs),
    /// Check, print or document the configuration file (`config check FILE`, `config dump`).
    Config(cli::config::ConfigArgs),
    /// Generate NATS identities and the nats-server authorization config (`auth init DIR`).
    Auth(cli::auth::AuthArgs),
    /// Serve the Model Context Protocol on stdio: tools for a model to launch and watch tasks.
    Mcp(cli::mcp::McpArgs),
    /// Serve the web UI and JSON API alone, against any NATS.
    Ui(cli::ui::UiCommandArgs),
    /// List a task's artifacts, or fetch one (--get) or all (--all DIR).
    Artifacts(cli::files::ArtifactsArgs),
    /// Print the Kubernetes Job the engine would create for a launch (YAML).
    RenderJob(cli::render::RenderArgs),
}

/// Parses the command line and runs the command: the whole `taskpods` binary (`src/main.rs` only starts
/// the runtime), so the integration tests can build the same binary for their node simulator's image
/// mapping.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let names = match Names::new(&cli.prefix) {
        Ok(names) => names,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let global = Global {
        nats_urls: cli
            .nats_url
            .split(',')
            .map(|s| s.trim().to_owned())
            .collect(),
        creds: cli.creds.map(cli::home_relative),
        names,
    };
    // `serve` installs logging itself, once its configuration says whether traces are exported.
    let _logs = match &cli.command {
        Command::Serve(_) => None,
        _ => crate::telemetry::install(None).ok(),
    };
    match cli.command {
        Command::Serve(args) => cli::serve::run(global, args).await,
        Command::Launch(args) => cli::task::launch(global, args).await,
        Command::Show(args) => cli::task::show(global, args).await,
        Command::Events(args) => cli::task::events(global, args).await,
        Command::Cancel(args) => cli::task::cancel(global, args).await,
        Command::Logs(args) => cli::logs::run(global, args).await,
        Command::Artifacts(args) => cli::files::run(global, args).await,
        Command::Replay(args) => cli::replay::run(global, args).await,
        Command::Projections(args) => cli::projections::run(global, args).await,
        Command::Mcp(args) => cli::mcp::run(global, args).await,
        Command::Ui(args) => cli::ui::run(global, args).await,
        Command::RenderJob(args) => cli::render::run(global, args),
        Command::Auth(args) => cli::auth::run(&global, args),
        Command::Config(args) => cli::config::run(args),
    }
}
