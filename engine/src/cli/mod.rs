//! The operator's CLI, one module per command group; [`app`] parses and dispatches (`main.rs` only starts
//! the runtime).
//!
//! - [`serve`]: run the engine.
//! - [`auth`]: generate the NATS authorization material (`auth init`).
//! - [`logs`]: a task's output, stored or live.
//! - [`mcp`]: the Model Context Protocol server (tools for models) on stdio.
//! - [`render`]: the Kubernetes Job for a launch, as YAML.
//! - [`replay`]: a task's timeline from the stream; failed tasks since a time.
//! - [`projections`]: rebuild, verify and status of the KV views.
//! - [`task`]: launch, show, events, cancel.
//! - [`ui`]: the web UI and JSON API alone (also served by `serve`).
//! - [`files`]: a task's artifacts (list, get, all), and the inputs `launch --input` puts.

pub mod app;
pub mod auth;
pub mod config;
pub mod files;
pub mod logs;
pub mod mcp;
pub mod projections;
pub mod render;
pub mod replay;
pub mod serve;
pub mod task;
pub mod ui;

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use taskpods_events::Names;
use taskpods_projections::projector::ProjectorError;
use taskpods_projections::rebuild::RebuildError;
use taskpods_projections::replay::ReplayError;

/// Why a one-shot command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The NATS credentials file could not be read.
    #[error("cannot read the NATS credentials {}: {source}", path.display())]
    Credentials {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// NATS refused the identity (no credentials where it requires some, or credentials it does not trust).
    #[error("NATS at {urls} refused the connection: {} ({source})", refusal_hint(creds.as_deref()))]
    Refused {
        /// The URLs tried.
        urls: String,
        /// The credentials file given, if any.
        creds: Option<std::path::PathBuf>,
        /// The client's error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// NATS could not be reached.
    #[error("cannot reach NATS at {urls}: {source}")]
    Connect {
        /// The URLs tried.
        urls: String,
        /// The client's error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// A stream or consumer could not be opened or read.
    #[error("{what}: {source}")]
    Stream {
        /// Which (`event stream TASKPODS_EVT`, `log stream`, `log consumer`).
        what: String,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
    /// Replaying failed (or its arguments are wrong).
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// Rebuilding or verifying the views failed.
    #[error(transparent)]
    Rebuild(#[from] RebuildError),
    /// Reading the projector's lag failed.
    #[error(transparent)]
    Projector(#[from] ProjectorError),
    /// Neither a task nor `--failed` was given.
    #[error("give a task id, or --failed")]
    NoTask,
    /// The JSON output could not be written.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// The output could not be written.
    #[error("{0}")]
    Write(#[from] std::io::Error),
}

impl CliError {
    /// A stream error for `what`.
    pub(crate) fn stream(what: impl Into<String>, source: impl Into<async_nats::Error>) -> Self {
        Self::Stream {
            what: what.into(),
            source: source.into(),
        }
    }
}

impl Global {
    /// Connects to NATS for a one-shot command; the error names the URLs tried.
    pub async fn connect(&self) -> Result<async_nats::Client, CliError> {
        let urls = self.nats_urls.join(",");
        let mut options = async_nats::ConnectOptions::new();
        if let Some(creds) = &self.creds {
            options =
                options
                    .credentials_file(creds)
                    .await
                    .map_err(|source| CliError::Credentials {
                        path: creds.clone(),
                        source,
                    })?;
        }
        options
            .connect(urls.as_str())
            .await
            .map_err(|source| match source.kind() {
                async_nats::ConnectErrorKind::AuthorizationViolation
                | async_nats::ConnectErrorKind::Authentication => CliError::Refused {
                    urls,
                    creds: self.creds.clone(),
                    source,
                },
                _ => CliError::Connect { urls, source },
            })
    }
}

/// What to do about a refused connection, for [`CliError::Refused`].
fn refusal_hint(creds: Option<&std::path::Path>) -> String {
    match creds {
        None => "it requires credentials: pass --creds or set TASKPODS_CREDS (brain.creds from \
                 `taskpods auth init`; scripts/run writes them into its data dir's auth folder)"
            .to_owned(),
        Some(path) => format!(
            "it does not accept the credentials {} (another installation's, or revoked?)",
            path.display()
        ),
    }
}

/// `path` with a leading `~/` replaced by the home directory (`$HOME`): configuration files such as an MCP
/// host's pass `TASKPODS_CREDS` as written, with no shell to expand it.
pub fn home_relative(path: std::path::PathBuf) -> std::path::PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => std::path::PathBuf::from(home).join(rest),
        _ => path,
    }
}

/// A progress bar on stderr for a long operation, labelled `label`: hidden when `quiet` (JSON output) or
/// when stderr is not a terminal. Its length is set as the total becomes known ([`show`]).
pub fn progress_bar(label: &'static str, quiet: bool) -> ProgressBar {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0).with_prefix(label);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:<10} [{bar:30}] {percent:>3}% {human_pos}/{human_len} ({per_sec}, {eta} left)",
    ) {
        bar.set_style(style.progress_chars("#>."));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Moves `bar` to `done` of `total`.
pub fn show(bar: &ProgressBar, done: u64, total: u64) {
    bar.set_length(total);
    bar.set_position(done);
}

/// Options every command shares.
#[derive(Debug, Clone)]
pub struct Global {
    /// NATS server URLs.
    pub nats_urls: Vec<String>,
    /// The NATS credentials file to connect with (`--creds`), if the server requires one.
    pub creds: Option<std::path::PathBuf>,
    /// Subject prefix.
    pub names: Names,
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn a_leading_tilde_is_the_home_directory_and_nothing_else_changes() {
        let home = PathBuf::from(std::env::var_os("HOME").expect("HOME is set for tests"));
        assert_eq!(
            home_relative("~/.local/share/taskpods/auth/brain.creds".into()),
            home.join(".local/share/taskpods/auth/brain.creds")
        );
        for unchanged in [
            "/etc/brain.creds",
            "brain.creds",
            "~other/brain.creds",
            "a/~/b",
        ] {
            assert_eq!(home_relative(unchanged.into()), PathBuf::from(unchanged));
        }
    }

    #[test]
    fn a_refusal_says_what_to_pass_or_which_file_was_refused() {
        assert!(refusal_hint(None).contains("TASKPODS_CREDS"));
        assert!(
            refusal_hint(Some(std::path::Path::new("/x/brain.creds"))).contains("/x/brain.creds")
        );
    }
}
