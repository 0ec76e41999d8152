//! `taskpods logs <task> [-f]`: a task's output, stdout to stdout and stderr to stderr, byte for byte.
//! Without `-f` it prints what is stored and exits; with `-f` it follows live until the agent's `end`
//! marker (or, if the agent died without one, until the task has ended and no output came for a while).
//! The chunk format is the agent's (`taskpods_agent::output`).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull::OrderedConfig},
    stream::DirectGetErrorKind,
};
use futures::StreamExt;
use taskpods_events::{Names, TaskId};

use crate::cli::{CliError, Global};

/// Header values of the agent's output chunks (see `taskpods_agent::output`).
const HEADER_LOG_KIND: &str = "Taskpods-Log-Kind";

/// Arguments of `taskpods logs`.
#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// The task.
    pub task: TaskId,
    /// Follow live output until the task's output ends.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

/// One piece of a task's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Bytes the code wrote to stdout.
    Stdout(bytes::Bytes),
    /// Bytes the code wrote to stderr.
    Stderr(bytes::Bytes),
    /// The cap was reached; the text says so.
    Truncated(String),
    /// The agent finished the output.
    End,
}

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
    let stream = js
        .get_stream(names.log_stream())
        .await
        .map_err(|e| CliError::stream("log stream", e))?;
    let subject = names.log(task);
    if !follow {
        match stream.direct_get_last_for_subject(subject.clone()).await {
            Ok(_) => {}
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(CliError::stream("log stream", e)),
        }
    }
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: subject,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| CliError::stream("log consumer", e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| CliError::stream("log consumer", e))?;
    loop {
        let next = match tokio::time::timeout(quiet, messages.next()).await {
            Ok(next) => next,
            Err(_) => {
                if !follow || ended().await {
                    return Ok(());
                }
                continue;
            }
        };
        let Some(msg) = next else { return Ok(()) };
        let msg = msg.map_err(|e| CliError::stream("log consumer", e))?;
        let kind = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(HEADER_LOG_KIND))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let pending = msg.info().map(|i| i.pending).unwrap_or(1);
        match kind.as_str() {
            "stdout" => each(Piece::Stdout(msg.payload.clone())),
            "stderr" => each(Piece::Stderr(msg.payload.clone())),
            "truncated" => each(Piece::Truncated(
                String::from_utf8_lossy(&msg.payload).into_owned(),
            )),
            "end" => {
                each(Piece::End);
                return Ok(());
            }
            _ => {}
        }
        if !follow && pending == 0 {
            return Ok(());
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
