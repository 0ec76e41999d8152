//! The taskpods client: what a Brain written in Rust links.
//!
//! - [`Client::launch`]: publish a launch durably and get the task's id, state and first event sequence.
//! - [`Client::get`], [`Client::events`], [`Client::wait`]: read a task from its event subject (the log of
//!   record), follow it live, wait until it ends.
//! - [`Client::cancel`]: ask for a task to stop.
//! - [`Client::view`]: the task's view from the KV views, once they include a given event (read your writes).
//! - [`Client::watch_tasks`] ([`watch`]): every transition of the tasks of one requester or label set, live.
//! - [`output`]: a task's output (stdout, stderr, truncation, end), paged from a cursor or followed live.
//! - [`files`]: [`Client::put_input`] before a launch, [`Client::artifacts`] and [`Client::get_artifact`]
//!   after a task ended.
//!
//! The event log itself (the stored-event type, reading a task's events, following them) belongs to
//! [`taskpods_projections::log`]; [`StoredEvent`] is re-exported from there and [`read_events`]
//! wraps its reader.
//!
//! Everything is keyed by task id; a launch without an id or idempotency key gets a fresh UUIDv7 here, so
//! the caller can always read its own write.

pub mod files;
mod replies;

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::Stream};
use bytes::Bytes;
use futures::StreamExt;
use taskpods_events::codec::{self, CodecError, HEADER_CONTENT_TYPE, HEADER_MSG_ID, MSGPACK};
use taskpods_events::{
    CancelTask, CommandReply, Encoding, HEADER_REPLY_TO, LaunchTask, Names, Problem, Task, TaskId,
    TaskState, evolve,
};
use taskpods_projections::log::{self, LogError};
use taskpods_projections::{BucketSettings, TaskView, Views};

pub use taskpods_projections::log::StoredEvent;

pub mod watch;
pub use watch::{TaskFilter, WatchFrom, WatchedEvent};
pub mod output;

/// What kind of failure a [`ClientError`] is, for callers that branch on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientErrorKind {
    /// The launch was invalid; the task exists as `Rejected`.
    Rejected,
    /// The engine refused the command (unknown task, already ended, already cancelling).
    Refused,
    /// The command could not be read by the engine.
    Invalid,
    /// NATS could not be reached or a request failed.
    Unreachable,
    /// Nobody answered in time.
    TimedOut,
    /// A stored event could not be decoded.
    Corrupt,
}

/// Errors from the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The launch was invalid; the task exists as `Rejected` with these problems.
    #[error("task {task_id} rejected: {}", problems.iter().map(Problem::to_string).collect::<Vec<_>>().join("; "))]
    Rejected {
        /// The task.
        task_id: TaskId,
        /// Every problem.
        problems: Vec<Problem>,
    },
    /// The engine refused the command; nothing changed.
    #[error("task {task_id}: {reason} (state {})", state.name())]
    Refused {
        /// The task.
        task_id: TaskId,
        /// Why.
        reason: String,
        /// Its state.
        state: TaskState,
    },
    /// The engine could not read the command (its answer).
    #[error("the engine could not read the command: {0}")]
    Invalid(String),
    /// The command could not be encoded.
    #[error("cannot encode the command: {0}")]
    Encode(#[source] CodecError),
    /// NATS could not be reached or a request failed.
    #[error("NATS: {0}")]
    Unreachable(#[source] async_nats::Error),
    /// The NATS credentials file could not be read.
    #[error("NATS: credentials {}: {source}", path.display())]
    Credentials {
        /// The file.
        path: std::path::PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// A subscription ended because the connection was closed: the task's events before the task
    /// ended, or the replies to commands.
    #[error("NATS: subscription ended (connection closed)")]
    SubscriptionEnded,
    /// Nobody answered within the timeout.
    #[error("timed out after {after:?} waiting for {what}")]
    TimedOut {
        /// What we waited for.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// A stored event could not be decoded.
    #[error("corrupt event: {0}")]
    Corrupt(#[source] LogError),
    /// The engine's reply could not be decoded.
    #[error("undecodable command reply: {0}")]
    CorruptReply(#[source] CodecError),
}

impl ClientError {
    /// The kind of failure.
    pub fn kind(&self) -> ClientErrorKind {
        match self {
            Self::Rejected { .. } => ClientErrorKind::Rejected,
            Self::Refused { .. } => ClientErrorKind::Refused,
            Self::Invalid(_) | Self::Encode(_) => ClientErrorKind::Invalid,
            Self::Unreachable(_) | Self::Credentials { .. } | Self::SubscriptionEnded => {
                ClientErrorKind::Unreachable
            }
            Self::TimedOut { .. } => ClientErrorKind::TimedOut,
            Self::Corrupt(_) | Self::CorruptReply(_) => ClientErrorKind::Corrupt,
        }
    }
}

fn unreachable(e: impl Into<async_nats::Error>) -> ClientError {
    ClientError::Unreachable(e.into())
}

/// A failure reading the event log: unreadable stream → `Unreachable`, unusable event → `Corrupt`.
fn log_error(e: LogError) -> ClientError {
    match e {
        LogError::Read { .. } => unreachable(e),
        _ => ClientError::Corrupt(e),
    }
}

/// The answer to a launch.
#[derive(Debug, Clone, PartialEq)]
pub struct Launched {
    /// The task.
    pub task_id: TaskId,
    /// Its state when the engine answered.
    pub state: TaskState,
    /// Stream sequence of its first event (read-your-writes: views at or past it include the task).
    pub sequence: u64,
    /// False when the launch found an existing task (same id or idempotency key).
    pub created: bool,
}

/// A task read from its events.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSnapshot {
    /// The folded task.
    pub task: Task,
    /// Stream sequence of its last event.
    pub last_sequence: u64,
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Subject prefix of the taskpods installation.
    pub names: Names,
    /// How long to wait for the engine's answer to a command.
    pub reply_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            names: Names::default(),
            reply_timeout: Duration::from_secs(10),
        }
    }
}

/// The environment variable naming a NATS credentials file for [`Client::connect`].
pub const CREDS_ENV: &str = "TASKPODS_CREDS";

/// A connection to a taskpods installation.
#[derive(Debug, Clone)]
pub struct Client {
    js: jetstream::Context,
    config: ClientConfig,
    /// One reply subscription for every command this client (and its clones) sends.
    replies: Arc<replies::Replies>,
}

impl Client {
    /// Connects to `url` with the default configuration, with the credentials file named by
    /// `TASKPODS_CREDS` when it is set (as the `nats` CLI reads `NATS_CREDS`).
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        let creds = std::env::var_os(CREDS_ENV).map(std::path::PathBuf::from);
        Self::connect_with_credentials(url, creds.as_deref()).await
    }

    /// Connects to `url` with the default configuration and, when given, a NATS credentials file (a
    /// Brain's identity: see `taskpods auth init`).
    pub async fn connect_with_credentials(
        url: &str,
        creds: Option<&std::path::Path>,
    ) -> Result<Self, ClientError> {
        let mut options = async_nats::ConnectOptions::new();
        if let Some(creds) = creds {
            options = options.credentials_file(creds).await.map_err(|source| {
                ClientError::Credentials {
                    path: creds.to_owned(),
                    source,
                }
            })?;
        }
        let nats = options.connect(url).await.map_err(unreachable)?;
        Ok(Self::new(nats, ClientConfig::default()))
    }

    /// A client over an existing NATS connection.
    pub fn new(nats: async_nats::Client, config: ClientConfig) -> Self {
        let js = jetstream::new(nats.clone());
        let replies = Arc::new(replies::Replies::new(nats));
        Self {
            js,
            config,
            replies,
        }
    }

    /// The subject names in use.
    pub fn names(&self) -> &Names {
        &self.config.names
    }

    async fn event_stream(&self) -> Result<Stream, ClientError> {
        self.js
            .get_stream(self.config.names.event_stream())
            .await
            .map_err(unreachable)
    }

    /// Publishes `payload` to a command subject durably, asking for a reply, and waits for it.
    /// `None`: the command stream dropped it as a duplicate of an earlier one, or no reply came in time.
    async fn command(
        &self,
        subject: String,
        msg_id: String,
        payload: Vec<u8>,
    ) -> Result<Option<CommandReply>, ClientError> {
        let Some(mut pending) = self.replies.pending().await.map_err(unreachable)? else {
            return Err(ClientError::SubscriptionEnded);
        };
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_MSG_ID, msg_id.as_str());
        headers.insert(HEADER_CONTENT_TYPE, MSGPACK);
        headers.insert(HEADER_REPLY_TO, pending.subject.as_str());
        let ack = self
            .js
            .publish_with_headers(subject, headers, Bytes::from(payload))
            .await
            .map_err(unreachable)?
            .await
            .map_err(unreachable)?;
        if ack.duplicate {
            return Ok(None);
        }
        match tokio::time::timeout(self.config.reply_timeout, pending.reply()).await {
            Ok(Some(message)) => {
                let encoding = Encoding::from_content_type(
                    message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(HEADER_CONTENT_TYPE))
                        .map(|v| v.as_str()),
                )
                .unwrap_or_default();
                codec::decode("command reply", &message.payload, encoding)
                    .map(Some)
                    .map_err(ClientError::CorruptReply)
            }
            Ok(None) | Err(_) => Ok(None),
        }
    }

    /// Launches a task, or finds the one this launch names already (same `task_id` or
    /// `idempotency_key`). An invalid launch is an error with every problem.
    pub async fn launch(&self, mut launch: LaunchTask) -> Result<Launched, ClientError> {
        let task_id = match launch.task_id() {
            Some(id) => id,
            None => {
                let id = TaskId::mint();
                launch.task_id = Some(id.0);
                id
            }
        };
        let payload = codec::to_msgpack(&launch).map_err(ClientError::Encode)?;
        let reply = self
            .command(
                self.config.names.launch(),
                format!("launch:{task_id}"),
                payload,
            )
            .await?;
        match reply.map(applied) {
            // A repeat inside the duplicate window, or an engine that restarted before replying: the
            // task's own subject has the answer once its first event exists.
            None => self.first_event(task_id).await,
            // A repeat of a rejected launch: the problems are in the task's first event.
            Some(Ok(launched)) if launched.state == TaskState::Rejected => {
                self.first_event(task_id).await
            }
            Some(result) => result,
        }
    }

    async fn first_event(&self, task_id: TaskId) -> Result<Launched, ClientError> {
        let stream = self.event_stream().await?;
        let deadline = tokio::time::Instant::now() + self.config.reply_timeout;
        loop {
            let events = read_events(&stream, &self.config.names, task_id).await?;
            if let Some(first) = events.first() {
                let task = Task::replay(events.iter().map(|e| &e.event));
                if let taskpods_events::EventBody::Rejected { problems } = &first.event.body {
                    return Err(ClientError::Rejected {
                        task_id,
                        problems: problems.clone(),
                    });
                }
                return Ok(Launched {
                    task_id,
                    state: task.state,
                    sequence: first.sequence,
                    created: false,
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ClientError::TimedOut {
                    what: "the engine to record the launch (is an engine running?)",
                    after: self.config.reply_timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks for `task_id` to stop. A task that is unknown, has ended or is already being cancelled is
    /// a [`ClientErrorKind::Refused`] error.
    pub async fn cancel(
        &self,
        task_id: TaskId,
        reason: Option<String>,
    ) -> Result<TaskState, ClientError> {
        let cancel = CancelTask {
            task_id: task_id.0,
            reason,
            requester: None,
        };
        let payload = codec::to_msgpack(&cancel).map_err(ClientError::Encode)?;
        // Unique per request: a second cancel must reach the engine to be refused, not be dropped.
        let msg_id = format!("cancel:{task_id}:{}", TaskId::mint());
        match self
            .command(self.config.names.cancel(task_id), msg_id, payload)
            .await?
        {
            Some(reply) => applied(reply).map(|done| done.state),
            None => Err(ClientError::TimedOut {
                what: "the engine to answer the cancel (is an engine running?)",
                after: self.config.reply_timeout,
            }),
        }
    }

    /// The task's stored events, in order (empty for an unknown task).
    pub async fn history(&self, task_id: TaskId) -> Result<Vec<StoredEvent>, ClientError> {
        let stream = self.event_stream().await?;
        read_events(&stream, &self.config.names, task_id).await
    }

    /// The task as its events say now. An unknown task has state `New` and no events.
    pub async fn get(&self, task_id: TaskId) -> Result<TaskSnapshot, ClientError> {
        let events = self.history(task_id).await?;
        Ok(TaskSnapshot {
            last_sequence: events.last().map_or(0, |e| e.sequence),
            task: Task::replay(events.iter().map(|e| &e.event)),
        })
    }

    /// The task's events from the first, then live as they are appended (never ends by itself).
    pub async fn events(
        &self,
        task_id: TaskId,
    ) -> Result<impl futures::Stream<Item = Result<StoredEvent, ClientError>> + use<>, ClientError>
    {
        let stream = self.event_stream().await?;
        let messages = log::ordered(
            &stream,
            &self.config.names,
            Some(task_id),
            log::Start::First,
        )
        .await
        .map_err(log_error)?;
        let names = self.config.names.clone();
        Ok(messages.map(move |message| {
            log::decode_message(&names, &message.map_err(unreachable)?).map_err(log_error)
        }))
    }

    /// The task's view as UIs read it (the `tasks` bucket), once the projector has folded at least the
    /// event at stream sequence `at_least` (e.g. [`Launched::sequence`]): read-your-writes on the views.
    pub async fn view(
        &self,
        task_id: TaskId,
        at_least: u64,
        timeout: Duration,
    ) -> Result<TaskView, ClientError> {
        let views = Views::open(&self.js, &self.config.names, BucketSettings::default())
            .await
            .map_err(unreachable)?;
        views
            .wait_for_task(task_id, at_least, timeout)
            .await
            .map_err(unreachable)?
            .ok_or(ClientError::TimedOut {
                what: "the views to reach the sequence (is a projector running?)",
                after: timeout,
            })
    }

    /// Follows the task until it ends (or `timeout` passes) and returns it.
    pub async fn wait(&self, task_id: TaskId, timeout: Duration) -> Result<Task, ClientError> {
        let follow = async {
            let mut events = Box::pin(self.events(task_id).await?);
            let mut task = Task::default();
            while let Some(stored) = events.next().await {
                task = evolve(task, &stored?.event);
                if task.state.is_terminal() {
                    return Ok(task);
                }
            }
            Err(ClientError::SubscriptionEnded)
        };
        tokio::time::timeout(timeout, follow)
            .await
            .map_err(|_| ClientError::TimedOut {
                what: "the task to end",
                after: timeout,
            })?
    }
}

/// An `applied` reply as its result; every other outcome as the error it stands for.
fn applied(reply: CommandReply) -> Result<Launched, ClientError> {
    match reply {
        CommandReply::Applied {
            task_id,
            state,
            sequence,
            created,
        } => Ok(Launched {
            task_id,
            state,
            sequence,
            created,
        }),
        CommandReply::Rejected {
            task_id, problems, ..
        } => Err(ClientError::Rejected { task_id, problems }),
        CommandReply::Refused {
            task_id,
            reason,
            state,
        } => Err(ClientError::Refused {
            task_id,
            reason,
            state,
        }),
        CommandReply::Invalid { error } => Err(ClientError::Invalid(error)),
    }
}

/// Every stored event of `task`, in order, read with direct gets (any replica can answer).
pub async fn read_events(
    stream: &Stream,
    names: &Names,
    task: TaskId,
) -> Result<Vec<StoredEvent>, ClientError> {
    log::read_events(stream, names, task)
        .await
        .map_err(log_error)
}
