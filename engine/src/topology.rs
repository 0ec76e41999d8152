//! The JetStream topology: the command, event, log and dead-letter streams and the KV buckets of the views.
//!
//! [`ensure`] creates what is missing and checks what exists. It never overwrites: a stream that exists
//! with a different configuration is reported field by field ([`TopologyError::Conflict`]), because
//! silently changing retention or replicas under running engines loses data.
//!
//! KV buckets are created as their backing streams (`KV_<bucket>`) and opened with `get_key_value`, which
//! works on nats-server 2.9 where the client's `create_key_value` fails (see docs/ARCHITECTURE.md section 12). The
//! files object store bucket is created the same way, as its backing stream `OBJ_<prefix>_files`
//! ([`files_stream_config`]), and opened with `get_object_store`.

use std::fmt;
use std::time::Duration;

use async_nats::jetstream::{
    self, kv,
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};
use taskpods_events::Names;

/// Errors ensuring the topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A stream exists with a configuration that differs from the wanted one; nothing was changed.
    #[error("stream {stream} exists with a different configuration (not changed): {}", list(.differences))]
    Conflict {
        /// The stream.
        stream: String,
        /// Each differing field.
        differences: Vec<Difference>,
    },
    /// JetStream refused or failed a request (server unreachable, JetStream disabled, limits).
    #[error("JetStream {operation} {name}: {source}")]
    JetStream {
        /// What we were doing (`create stream`, `get stream`, `open bucket`).
        operation: &'static str,
        /// The stream or bucket.
        name: String,
        /// The client's error.
        source: async_nats::Error,
    },
}

/// A field whose existing value differs from the wanted one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The field.
    pub field: &'static str,
    /// What the server has.
    pub existing: String,
    /// What this engine's configuration wants.
    pub wanted: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is {} but {} is configured",
            self.field, self.existing, self.wanted
        )
    }
}

fn list(differences: &[Difference]) -> String {
    differences
        .iter()
        .map(Difference::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// How the streams and buckets are laid out.
#[derive(Debug, Clone, PartialEq)]
pub struct TopologyConfig {
    /// Subject prefix; stream and bucket names derive from it.
    pub names: Names,
    /// Replicas of every stream and bucket (1, or 3 on a cluster).
    pub replicas: usize,
    /// File or memory storage (memory only for throwaway test setups).
    pub storage: StorageType,
    /// How long task events are kept; zero keeps them forever.
    pub event_max_age: Duration,
    /// How long task output is kept.
    pub log_max_age: Duration,
    /// The most output kept across all tasks, in bytes; when full, the oldest output goes first (output
    /// is not the log of record). 1 GiB holds 64 tasks at the full 16 MiB cap.
    pub log_max_bytes: i64,
    /// The most output messages kept per task (per log subject): beyond it a task's own oldest output
    /// goes, never another task's. Honest agents send at most `cap / chunk` full chunks (256 at 16 MiB
    /// and 64 KiB) plus one partial chunk per flush interval of quiet output.
    pub log_max_messages_per_task: i64,
    /// The largest output message, in bytes: the agent's 64 KiB chunk plus room for its headers. With
    /// `log_max_messages_per_task` it bounds what one task can hold, however it publishes.
    pub log_max_message_bytes: i32,
    /// The most bytes of events kept; when full, appends are refused (discard-new) and the engine
    /// alerts: the log of record never drops old events to make room.
    pub event_max_bytes: i64,
    /// The most bytes of commands waiting in the work queue; when full, publishers are refused.
    pub command_max_bytes: i64,
    /// The most bytes of dead letters kept; when full, the oldest go first (a flood of garbage cannot
    /// stop the intake from recording new dead letters).
    pub dead_letter_max_bytes: i64,
    /// The window in which a re-published command (same `Nats-Msg-Id`) is dropped as a duplicate.
    pub duplicate_window: Duration,
    /// How long undecodable commands are kept for operators.
    pub dead_letter_max_age: Duration,
    /// The largest message any stream accepts, in bytes.
    pub max_message_bytes: i32,
    /// How long task inputs and artifacts are kept in the files bucket; zero keeps them until deleted.
    pub files_max_age: Duration,
    /// The most bytes the files bucket holds; uploads beyond it are refused (nothing older is dropped).
    pub files_max_bytes: i64,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            names: Names::default(),
            replicas: 1,
            storage: StorageType::File,
            event_max_age: Duration::ZERO,
            log_max_age: Duration::from_secs(7 * 24 * 3600),
            log_max_bytes: 1 << 30,
            log_max_messages_per_task: 4096,
            log_max_message_bytes: (64 << 10) + (4 << 10),
            // JetStream reserves every stream's max_bytes on the server's disk at creation, so the
            // defaults stay modest (2.2 GiB in all); the README's capacity plan says how to size them.
            event_max_bytes: 1 << 30,
            command_max_bytes: 128 << 20,
            dead_letter_max_bytes: 64 << 20,
            duplicate_window: Duration::from_secs(120),
            dead_letter_max_age: Duration::from_secs(30 * 24 * 3600),
            max_message_bytes: 1 << 20,
            files_max_age: Duration::from_secs(7 * 24 * 3600),
            files_max_bytes: 512 << 20,
        }
    }
}

/// Handles on everything [`ensure`] set up.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The names it was built from.
    pub names: Names,
    /// The command work queue.
    pub commands: stream::Stream,
    /// The event log of record.
    pub events: stream::Stream,
    /// Task output.
    pub logs: stream::Stream,
    /// Undecodable commands.
    pub dead_letters: stream::Stream,
    /// The files bucket's backing stream (open it with `get_object_store(names.files_bucket())`).
    pub files: stream::Stream,
    /// Task → current view.
    pub tasks: kv::Store,
    /// Task → timeline.
    pub history: kv::Store,
    /// Live tasks only.
    pub active: kv::Store,
    /// Finished tasks, newest first.
    pub finished: kv::Store,
}

/// The stream configurations the engine wants, in creation order (pure, so tests can inspect them).
pub fn wanted_streams(config: &TopologyConfig) -> Vec<stream::Config> {
    let names = &config.names;
    let base = stream::Config {
        storage: config.storage,
        num_replicas: config.replicas,
        max_message_size: config.max_message_bytes,
        duplicate_window: config.duplicate_window,
        ..Default::default()
    };
    let mut streams = vec![
        stream::Config {
            name: names.command_stream(),
            description: Some(
                "taskpods commands: launches, cancels, agent reports (work queue)".into(),
            ),
            subjects: vec![names.commands_all()],
            retention: RetentionPolicy::WorkQueue,
            deny_purge: true,
            max_bytes: config.command_max_bytes,
            discard: DiscardPolicy::New,
            ..base.clone()
        },
        stream::Config {
            name: names.event_stream(),
            description: Some("taskpods task events: the log of record".into()),
            subjects: vec![names.events_all()],
            retention: RetentionPolicy::Limits,
            max_age: config.event_max_age,
            max_bytes: config.event_max_bytes,
            discard: DiscardPolicy::New,
            allow_direct: true,
            deny_delete: true,
            deny_purge: true,
            ..base.clone()
        },
        stream::Config {
            name: names.log_stream(),
            description: Some("taskpods task output (stdout/stderr chunks)".into()),
            subjects: vec![names.logs_all()],
            retention: RetentionPolicy::Limits,
            max_age: config.log_max_age,
            max_bytes: config.log_max_bytes,
            max_messages_per_subject: config.log_max_messages_per_task,
            max_message_size: config.log_max_message_bytes,
            discard: DiscardPolicy::Old,
            allow_direct: true,
            ..base.clone()
        },
        stream::Config {
            name: names.dead_letter_stream(),
            description: Some(
                "taskpods commands that could not be decoded, with the reason".into(),
            ),
            subjects: vec![names.dead_letters_all()],
            retention: RetentionPolicy::Limits,
            max_age: config.dead_letter_max_age,
            max_bytes: config.dead_letter_max_bytes,
            discard: DiscardPolicy::Old,
            allow_direct: true,
            ..base.clone()
        },
        files_stream_config(config),
    ];
    // The view buckets are shaped by the projections crate, which also creates later generations of
    // them: one definition, so a rebuilt generation and the topology can never disagree.
    let settings = taskpods_projections::BucketSettings {
        replicas: config.replicas,
        storage: config.storage,
    };
    for bucket in names.buckets() {
        streams.push(taskpods_projections::buckets::kv_stream_config(
            &bucket, settings,
        ));
    }
    streams
}

/// The backing stream of the files object store bucket, as the client's `create_object_store` would
/// make it (chunks and metadata subjects, roll-ups for metadata, discard new so a full bucket refuses
/// uploads instead of dropping parts of stored files), with the configured age and size limits.
pub fn files_stream_config(config: &TopologyConfig) -> stream::Config {
    let bucket = config.names.files_bucket();
    stream::Config {
        name: format!("OBJ_{bucket}"),
        description: Some("taskpods task inputs and artifacts (object store)".into()),
        subjects: vec![format!("$O.{bucket}.C.>"), format!("$O.{bucket}.M.>")],
        retention: RetentionPolicy::Limits,
        max_age: config.files_max_age,
        max_bytes: config.files_max_bytes,
        discard: DiscardPolicy::New,
        allow_rollup: true,
        allow_direct: true,
        storage: config.storage,
        num_replicas: config.replicas,
        max_message_size: config.max_message_bytes,
        duplicate_window: config.duplicate_window,
        ..Default::default()
    }
}

/// The fields of `existing` that differ from `wanted`, among those the engine relies on.
pub fn differences(existing: &stream::Config, wanted: &stream::Config) -> Vec<Difference> {
    // Each field as the engine cares about it, rendered the same way for both sides.
    let fields: [(&'static str, Render); 14] = [
        ("subjects", |c| {
            let mut subjects = c.subjects.clone();
            subjects.sort();
            format!("{subjects:?}")
        }),
        ("retention", |c| format!("{:?}", c.retention)),
        ("storage", |c| format!("{:?}", c.storage)),
        ("replicas", |c| c.num_replicas.to_string()),
        ("max_age", |c| format!("{:?}", c.max_age)),
        ("max_bytes", |c| limit(c.max_bytes)),
        ("max_messages_per_subject", |c| {
            limit(c.max_messages_per_subject)
        }),
        ("discard", |c| format!("{:?}", c.discard)),
        ("allow_rollup", |c| c.allow_rollup.to_string()),
        ("deny_delete", |c| c.deny_delete.to_string()),
        ("deny_purge", |c| c.deny_purge.to_string()),
        ("allow_direct", |c| c.allow_direct.to_string()),
        ("duplicate_window", |c| format!("{:?}", c.duplicate_window)),
        ("max_message_size", |c| limit(c.max_message_size.into())),
    ];
    fields
        .into_iter()
        .filter_map(|(field, render)| {
            let (existing, wanted) = (render(existing), render(wanted));
            (existing != wanted).then_some(Difference {
                field,
                existing,
                wanted,
            })
        })
        .collect()
}

/// Renders one field of a stream configuration for comparison and for the conflict message.
type Render = fn(&stream::Config) -> String;

/// Servers store "no limit" as -1 whether it was sent as 0 or -1.
fn limit(value: i64) -> String {
    if value <= 0 {
        "unlimited".to_owned()
    } else {
        value.to_string()
    }
}

/// Creates the streams and buckets that are missing and checks those that exist. Idempotent; safe to run
/// from several engines at once.
pub async fn ensure(
    js: &jetstream::Context,
    config: &TopologyConfig,
) -> Result<Topology, TopologyError> {
    let mut streams = Vec::new();
    for wanted in wanted_streams(config) {
        streams.push(ensure_stream(js, wanted).await?);
    }
    let open = |bucket: String| async move {
        js.get_key_value(bucket.clone())
            .await
            .map_err(|e| TopologyError::JetStream {
                operation: "open bucket",
                name: bucket,
                source: e.into(),
            })
    };
    let [tasks, history, active, finished] = config.names.buckets();
    let mut streams = streams.into_iter();
    let mut next = || streams.next().expect("one stream per wanted config");
    Ok(Topology {
        names: config.names.clone(),
        commands: next(),
        events: next(),
        logs: next(),
        dead_letters: next(),
        files: next(),
        tasks: open(tasks).await?,
        history: open(history).await?,
        active: open(active).await?,
        finished: open(finished).await?,
    })
}

async fn ensure_stream(
    js: &jetstream::Context,
    wanted: stream::Config,
) -> Result<stream::Stream, TopologyError> {
    let name = wanted.name.clone();
    // Two engines may race to create; the loser finds the winner's stream on the second look.
    for _ in 0..2 {
        match js.get_stream(&name).await {
            Ok(mut stream) => {
                let existing = stream
                    .info()
                    .await
                    .map_err(|e| TopologyError::JetStream {
                        operation: "get stream",
                        name: name.clone(),
                        source: e.into(),
                    })?
                    .config
                    .clone();
                let differences = differences(&existing, &wanted);
                if differences.is_empty() {
                    return Ok(stream);
                }
                if only_tightens(&differences) {
                    // A stream from before purges were refused: refusing them now loses nothing and
                    // servers accept it (they refuse only the reverse).
                    tracing::info!(stream = %name, "refusing purges on the existing stream");
                    return js.update_stream(wanted).await.map(|_| stream).map_err(|e| {
                        TopologyError::JetStream {
                            operation: "update stream",
                            name,
                            source: e.into(),
                        }
                    });
                }
                return Err(TopologyError::Conflict {
                    stream: name,
                    differences,
                });
            }
            Err(e) if is_not_found(&e) => match js.create_stream(wanted.clone()).await {
                Ok(stream) => return Ok(stream),
                Err(e) if is_already_in_use(&e) => continue,
                Err(e) => {
                    return Err(TopologyError::JetStream {
                        operation: "create stream",
                        name,
                        source: e.into(),
                    });
                }
            },
            Err(e) => {
                return Err(TopologyError::JetStream {
                    operation: "get stream",
                    name,
                    source: e.into(),
                });
            }
        }
    }
    Err(TopologyError::JetStream {
        operation: "create stream",
        name,
        source: "created concurrently but could not be read back".into(),
    })
}

/// Whether the only differences turn on `deny_purge`, which is safe to apply to a live stream.
fn only_tightens(differences: &[Difference]) -> bool {
    differences
        .iter()
        .all(|d| d.field == "deny_purge" && d.existing == "false" && d.wanted == "true")
}

fn is_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

fn is_already_in_use(error: &jetstream::context::CreateStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::CreateStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST
    )
}
