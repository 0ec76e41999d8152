//! `taskpods logs <task> [-f]`: a task's output, stdout to stdout and stderr to stderr, byte for byte.
//! Without `-f` it prints what is stored and exits; with `-f` it follows live until the agent's `end`
//! marker (or, if the agent died without one, until the task has ended and no output came for a while).
//! Reading is `taskpods_client::output`'s; the chunk format is the agent's (`taskpods_agent::output`).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use taskpods_client::{Client, ClientConfig};
use taskpods_events::{Names, TaskId};

use crate::cli::{CliError, Global};

/// Arguments of `taskpods logs`.
#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// The task.
    pub task: TaskId,
    /// Follow live output until the task's output ends.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

pub use taskpods_client::output::Piece;

/// Reads `task`'s output from the log stream, handing each piece to `each`, until the `end` marker, or
/// (without `follow`) until what is stored has been read, or (with `follow`) until `ended()` says the
/// task is over and nothing arrived for `quiet`.
pub async fn read(
    js: &jetstream::Context,
    names: &Names,
    task: TaskId,
    follow: bool,
    quiet: Duration,
    mut ended: impl AsyncFnMut() -> bool,
    mut each: impl FnMut(Piece),
) -> Result<(), CliError> {
    let client = Client::new(
        js.client(),
        ClientConfig {
            names: names.clone(),
            ..ClientConfig::default()
        },
    );
    if !follow {
        let mut after = 0;
        loop {
            let page = client
                .output_page(task, after, 1 << 20)
                .await
                .map_err(|e| CliError::stream("log stream", e))?;
            let done = page.end || page.next == after;
            after = page.next;
            page.chunks.into_iter().for_each(|c| each(c.piece));
            if done {
                return Ok(());
            }
        }
    }
    let chunks = client
        .follow_output(task, 0)
        .await
        .map_err(|e| CliError::stream("log consumer", e))?;
    let mut chunks = std::pin::pin!(chunks);
    loop {
        match tokio::time::timeout(quiet, chunks.next()).await {
            Err(_) => {
                if ended().await {
                    return Ok(());
                }
            }
            Ok(None) => return Ok(()),
            Ok(Some(chunk)) => each(
                chunk
                    .map_err(|e| CliError::stream("log consumer", e))?
                    .piece,
            ),
        }
    }
}

/// Runs `taskpods logs`.
pub async fn run(global: Global, args: LogsArgs) -> ExitCode {
    let client = match crate::server::connect_as(
        &global.nats_urls,
        global.creds.as_deref(),
        Duration::from_secs(5),
    )
    .await
    {
        Ok(client) => client,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let js = jetstream::new(client);
    let events = match js.get_stream(global.names.event_stream()).await {
        Ok(stream) => stream,
        Err(e) => {
            eprintln!("error: event stream: {e}");
            return ExitCode::FAILURE;
        }
    };
    let names = global.names.clone();
    let task = args.task;
    let ended = async || match taskpods_projections::log::read_events(&events, &names, task).await {
        Ok(stored) => taskpods_events::Task::replay(stored.iter().map(|e| &e.event))
            .state
            .is_terminal(),
        Err(_) => false,
    };
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    let result = read(
        &js,
        &global.names,
        task,
        args.follow,
        Duration::from_secs(2),
        ended,
        |piece| match piece {
            Piece::Stdout(b) => {
                let _ = stdout.write_all(&b);
                let _ = stdout.flush();
            }
            Piece::Stderr(b) => {
                let _ = stderr.write_all(&b);
            }
            Piece::Truncated(text) => {
                let _ = stderr.write_all(text.as_bytes());
            }
            Piece::End => {}
        },
    )
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
