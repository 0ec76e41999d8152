//! The files loop: moves tasks' inputs and artifacts between their agents and the object store bucket
//! `<prefix>_files`, so that an agent never needs access to the object store itself (a task's NATS
//! identity may not reach `$O.>` or `$JS.API.>`).
//!
//! - `<p>.agent.<task>.files.get` ([`FileGet`] → [`FileGetReply`]): a chunk of one of the task's inputs.
//!   Only inputs named in the task's own launch are served (anything else: `not_an_input`), only while the
//!   task runs. On the first chunk the object is checked: missing (`input_missing`), over the per-task cap
//!   alone or with the task's other inputs (`input_too_large`), size or digest other than the launch said
//!   (`input_corrupt`). The object store reader checks the bytes against the digest at the end: a mismatch
//!   is `input_corrupt` and the last chunk is never sent. An open reader is kept per (task, input) so
//!   sequential chunks cost one read each.
//! - `<p>.agent.<task>.files.put` ([`FilePut`] → [`FilePutReply`]): a chunk of an artifact, stored as
//!   `<task>/out/<path>`. The path must be a clean relative path; the task's count and byte caps (from its
//!   spec) are enforced here as well as in the agent. Chunks of one file stream into one object store
//!   `put`; offset 0 starts a file, each later chunk must continue it (`out_of_order` otherwise: the agent
//!   restarts the file). Accepted while the task runs and, for the flush an agent does on SIGTERM, for
//!   [`FilesConfig::upload_grace`] after it ended.
//! - Retention: the bucket's max age ([`crate::topology::TopologyConfig::files_max_age`]); with
//!   [`FilesConfig::delete_on_reap`], a task's objects (`<task>/…`) are deleted when its `reaped` event
//!   arrives.
//!
//! Requests are answered in queue group `taskpods-files`, at most [`FilesConfig::max_concurrent`] at once.
//! Open readers, uploads and byte counts live in this engine's memory: with several replicas, a file's
//! chunks may reach another replica, which answers `out_of_order` for a continuation (the agent restarts
//! that file) and counts caps from what it has seen.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::object_store::{
    self, GetErrorKind, InfoErrorKind, Object, ObjectInfo, ObjectMetadata, ObjectStore,
};
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use taskpods_events::codec;
use taskpods_events::files::{
    Artifact, FileGet, FileGetReply, FileLimits, FilePut, FilePutReply, FileRefusal, InputFile,
    artifact_object, check_relative_path, task_prefix,
};
use taskpods_events::{Addressed, Encoding, EventBody, TaskId, TaskSpec, TaskState};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::context::EngineCtx;
use tracing::{debug, info, warn};

use crate::store::{EventStore, LoadedTask};
use crate::timers;

/// Files loop settings.
#[derive(Debug, Clone)]
pub struct FilesConfig {
    /// Most input bytes in one reply (kept well under the server's max payload).
    pub chunk_bytes: usize,
    /// Requests handled at once.
    pub max_concurrent: usize,
    /// How long after its task ended an agent may still hand over artifacts (its flush on SIGTERM).
    pub upload_grace: Duration,
    /// How long an open input reader or an unfinished upload is kept without a request.
    pub idle_timeout: Duration,
    /// Delete a task's objects (`<task>/in/…`, `<task>/out/…`) when the task is reaped.
    pub delete_on_reap: bool,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: 256 << 10,
            max_concurrent: 32,
            upload_grace: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            delete_on_reap: false,
        }
    }
}

/// Errors of the files loop: the one that stops it, and why an artifact chunk was not stored (answered
/// to the agent as a refusal whose message carries the causes).
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The request subscription could not be made.
    #[error("files subscription")]
    Subscribe(#[source] async_nats::SubscribeError),
    /// The chunk would take the task past its cap on the number of artifacts.
    #[error("the task may keep at most {limit} artifacts")]
    TooManyArtifacts {
        /// The cap.
        limit: u64,
    },
    /// The chunk would take the task past its cap on the bytes of artifacts.
    #[error("the task may keep at most {limit} bytes of artifacts")]
    TooManyArtifactBytes {
        /// The cap, bytes.
        limit: u64,
    },
    /// The chunk could not be handed to the object store upload of its file.
    #[error("storing {path:?}")]
    Write {
        /// The artifact's path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The object store failed the upload.
    #[error("storing {path:?}")]
    Store {
        /// The artifact's path.
        path: String,
        /// Why.
        #[source]
        source: object_store::PutError,
    },
    /// The file replaced an earlier object whose chunks could not be purged (an identity that may not
    /// purge), and the new object could not be read back to confirm it.
    #[error(
        "storing {path:?}: the earlier object's chunks stay ({purge}); reading the new one back"
    )]
    ReadBack {
        /// The artifact's path.
        path: String,
        /// The purge failure that was tolerated.
        purge: object_store::PutError,
        /// Why the new object could not be read back.
        #[source]
        source: object_store::InfoError,
    },
    /// The upload of the file stopped without an answer (it panicked or was aborted).
    #[error("storing {path:?}: the upload stopped")]
    Stopped {
        /// The artifact's path.
        path: String,
        /// Why.
        #[source]
        source: tokio::task::JoinError,
    },
}

impl FilesError {
    /// The refusal an agent gets for this failure of its upload.
    pub fn refusal(&self) -> FileRefusal {
        match self {
            Self::TooManyArtifacts { .. } | Self::TooManyArtifactBytes { .. } => {
                FileRefusal::OverCap
            }
            _ => FileRefusal::Unavailable,
        }
    }
}

/// The refusal of an artifact chunk, with the failure and its causes in the message.
fn refused_upload(failure: &FilesError) -> FilePutReply {
    refused_put(failure.refusal(), crate::server::error_chain_text(failure))
}

/// An input being read, at `position`.
struct OpenInput {
    object: Object,
    position: u64,
    size: u64,
    digest: String,
    used: Instant,
}

/// An artifact being written: chunks go into `writer`, an object store `put` reads the other end.
struct Upload {
    writer: DuplexStream,
    next_offset: u64,
    put: JoinHandle<Result<ObjectInfo, object_store::PutError>>,
    used: Instant,
}

impl Drop for Upload {
    fn drop(&mut self) {
        // An abandoned upload must not finish as a short object.
        if !self.put.is_finished() {
            self.put.abort();
        }
    }
}

/// Bytes per artifact path a task has handed over (to enforce its caps).
type Counted = HashMap<TaskId, HashMap<String, u64>>;

struct Files {
    store: EventStore,
    bucket: ObjectStore,
    config: FilesConfig,
    readers: Mutex<HashMap<(TaskId, String), OpenInput>>,
    uploads: Mutex<HashMap<(TaskId, String), Upload>>,
    counted: Mutex<Counted>,
}

fn refused_get(code: FileRefusal, message: impl Into<String>) -> FileGetReply {
    FileGetReply::Refused {
        code,
        message: message.into(),
    }
}

fn refused_put(code: FileRefusal, message: impl Into<String>) -> FilePutReply {
    FilePutReply::Refused {
        code,
        message: message.into(),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether the task may still hand over artifacts at `now`: while it runs, and for `grace` after it
/// ended (the agent's flush on SIGTERM at a deadline or cancel), until it is reaped.
pub fn accepts_artifacts(task: &LoadedTask, now: chrono::DateTime<Utc>, grace: Duration) -> bool {
    match task.task.state {
        TaskState::Running | TaskState::Cancelling => true,
        state if state.is_terminal() && !task.task.reaped => task
            .task
            .finished_at
            .and_then(|at| (now - at).to_std().ok())
            .is_some_and(|since| since <= grace),
        _ => false,
    }
}

impl Files {
    async fn spec(&self, task: TaskId) -> Result<(LoadedTask, TaskSpec), (FileRefusal, String)> {
        let loaded = self
            .store
            .load(task)
            .await
            .map_err(|e| (FileRefusal::Unavailable, format!("event store: {e}")))?;
        let spec = loaded
            .task
            .spec
            .clone()
            .ok_or((FileRefusal::NotNow, "no such task".to_owned()))?;
        Ok((loaded, spec))
    }

    async fn get(&self, task: TaskId, request: FileGet) -> FileGetReply {
        let (loaded, spec) = match self.spec(task).await {
            Ok(found) => found,
            Err((code, message)) => return refused_get(code, message),
        };
        if !matches!(
            loaded.task.state,
            TaskState::Running | TaskState::Cancelling
        ) {
            return refused_get(
                FileRefusal::NotNow,
                format!("the task is {}", loaded.task.state.name()),
            );
        }
        let Some(input) = spec.inputs.iter().find(|i| i.name == request.input) else {
            return refused_get(
                FileRefusal::NotAnInput,
                format!(
                    "the task's launch names no input {:?}; a task reads only its own inputs",
                    request.input
                ),
            );
        };
        let key = (task, request.input.clone());
        let cached = lock(&self.readers)
            .remove(&key)
            .filter(|open| open.position == request.offset);
        let mut open = match cached {
            Some(open) => open,
            None => match self.open(&spec, input, request.offset).await {
                Ok(open) => open,
                Err((code, message)) => return refused_get(code, message),
            },
        };
        let want = usize::try_from(open.size.saturating_sub(open.position))
            .unwrap_or(usize::MAX)
            .min(self.config.chunk_bytes);
        let mut data = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            match open.object.read(&mut data[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => {
                    // The object store reader checks the digest when the last chunk arrives and
                    // reports a mismatch as invalid data (other read failures are transport errors).
                    let code = if e.kind() == std::io::ErrorKind::InvalidData {
                        FileRefusal::InputCorrupt
                    } else {
                        FileRefusal::Unavailable
                    };
                    return refused_get(code, format!("reading input {:?}: {e}", input.name));
                }
            }
        }
        if filled < want {
            return refused_get(
                FileRefusal::InputCorrupt,
                format!(
                    "input {:?} ended at {} bytes; its object says {}",
                    input.name,
                    open.position + filled as u64,
                    open.size
                ),
            );
        }
        data.truncate(filled);
        let offset = open.position;
        open.position += filled as u64;
        let last = open.position >= open.size;
        if last {
            // Drain the reader so its digest check runs before the last bytes are handed out.
            let mut rest = [0u8; 1];
            match open.object.read(&mut rest).await {
                Ok(0) => {}
                Ok(_) => {
                    return refused_get(
                        FileRefusal::InputCorrupt,
                        format!("input {:?} is longer than its object says", input.name),
                    );
                }
                Err(e) => {
                    return refused_get(
                        FileRefusal::InputCorrupt,
                        format!("input {:?}: {e}", input.name),
                    );
                }
            }
        }
        let reply = FileGetReply::Chunk {
            offset,
            size: open.size,
            digest: open.digest.clone(),
            data: Bytes::from(data),
            last,
        };
        if !last {
            open.used = Instant::now();
            lock(&self.readers).insert(key, open);
        }
        reply
    }

    /// Checks an input's object against the launch and the caps, and opens it at `offset`.
    async fn open(
        &self,
        spec: &TaskSpec,
        input: &InputFile,
        offset: u64,
    ) -> Result<OpenInput, (FileRefusal, String)> {
        let info = self.info(input).await?;
        let limits = spec.files;
        if info.size as u64 > limits.max_input_bytes {
            return Err((
                FileRefusal::InputTooLarge,
                format!(
                    "input {:?} is {} bytes; at most {} bytes of inputs are allowed per task",
                    input.name, info.size, limits.max_input_bytes
                ),
            ));
        }
        if offset == 0 {
            let mut total = 0u64;
            for other in &spec.inputs {
                total = total.saturating_add(if other.name == input.name {
                    info.size as u64
                } else {
                    self.info(other).await.map_or(0, |i| i.size as u64)
                });
            }
            if total > limits.max_input_bytes {
                return Err((
                    FileRefusal::InputTooLarge,
                    format!(
                        "the task's inputs add up to {total} bytes; at most {} are allowed per task",
                        limits.max_input_bytes
                    ),
                ));
            }
        }
        let digest = info.digest.clone().unwrap_or_default();
        if input.size.is_some_and(|size| size != info.size as u64) {
            return Err((
                FileRefusal::InputCorrupt,
                format!(
                    "input {:?} is {} bytes but the launch says {}",
                    input.name,
                    info.size,
                    input.size.unwrap_or_default()
                ),
            ));
        }
        if input.digest.as_ref().is_some_and(|d| *d != digest) {
            return Err((
                FileRefusal::InputCorrupt,
                format!(
                    "input {:?} has digest {digest} but the launch says {}",
                    input.name,
                    input.digest.clone().unwrap_or_default()
                ),
            ));
        }
        let mut object = self.bucket.get(&input.object).await.map_err(|e| {
            let code = match e.kind() {
                GetErrorKind::NotFound => FileRefusal::InputMissing,
                _ => FileRefusal::Unavailable,
            };
            (code, format!("input {:?}: {e}", input.name))
        })?;
        if offset > 0 {
            let skipped = tokio::io::copy(&mut (&mut object).take(offset), &mut tokio::io::sink())
                .await
                .map_err(|e| {
                    (
                        FileRefusal::Unavailable,
                        format!("input {:?}: {e}", input.name),
                    )
                })?;
            if skipped < offset {
                return Err((
                    FileRefusal::InputCorrupt,
                    format!("input {:?} is shorter than offset {offset}", input.name),
                ));
            }
        }
        Ok(OpenInput {
            object,
            position: offset,
            size: info.size as u64,
            digest,
            used: Instant::now(),
        })
    }

    async fn info(&self, input: &InputFile) -> Result<ObjectInfo, (FileRefusal, String)> {
        let missing = || {
            (
                FileRefusal::InputMissing,
                format!(
                    "input {:?}: object {:?} is not in the files bucket",
                    input.name, input.object
                ),
            )
        };
        match self.bucket.info(&input.object).await {
            Ok(info) if info.deleted => Err(missing()),
            Ok(info) => Ok(info),
            Err(e) if e.kind() == InfoErrorKind::NotFound => Err(missing()),
            Err(e) => Err((
                FileRefusal::Unavailable,
                format!("input {:?}: {e}", input.name),
            )),
        }
    }

    async fn put(&self, task: TaskId, request: FilePut) -> FilePutReply {
        if let Err(problem) = check_relative_path(&request.path) {
            return refused_put(
                FileRefusal::BadPath,
                format!("artifact path {:?} {problem}", request.path),
            );
        }
        let (loaded, spec) = match self.spec(task).await {
            Ok(found) => found,
            Err((code, message)) => return refused_put(code, message),
        };
        if !accepts_artifacts(&loaded, Utc::now(), self.config.upload_grace) {
            return refused_put(
                FileRefusal::NotNow,
                format!(
                    "the task is {} and no longer takes artifacts",
                    loaded.task.state.name()
                ),
            );
        }
        let key = (task, request.path.clone());
        let len = request.data.len() as u64;
        if let Err(over) = self.count(task, &request, spec.files) {
            lock(&self.uploads).remove(&key);
            return refused_upload(&over);
        }
        let upload = if request.offset == 0 {
            let (writer, mut reader) = tokio::io::duplex(self.config.chunk_bytes.max(64 << 10));
            let bucket = self.bucket.clone();
            let meta = ObjectMetadata {
                name: artifact_object(task, &request.path),
                ..ObjectMetadata::default()
            };
            let put = tokio::spawn(async move { bucket.put(meta, &mut reader).await });
            Some(Upload {
                writer,
                next_offset: 0,
                put,
                used: Instant::now(),
            })
        } else {
            lock(&self.uploads)
                .remove(&key)
                .filter(|u| u.next_offset == request.offset)
        };
        let Some(mut upload) = upload else {
            return refused_put(
                FileRefusal::OutOfOrder,
                format!(
                    "no upload of {:?} continues at offset {}; start the file again at 0",
                    request.path, request.offset
                ),
            );
        };
        if let Err(source) = upload.writer.write_all(&request.data).await {
            return refused_upload(&FilesError::Write {
                path: request.path,
                source,
            });
        }
        upload.next_offset += len;
        if !request.last {
            let next_offset = upload.next_offset;
            upload.used = Instant::now();
            lock(&self.uploads).insert(key, upload);
            return FilePutReply::Accepted { next_offset };
        }
        if let Err(source) = upload.writer.shutdown().await {
            return refused_upload(&FilesError::Write {
                path: request.path,
                source,
            });
        }
        let path = request.path;
        let stored = match (&mut upload.put).await {
            // A file uploaded again replaces the earlier object; when this identity may not purge
            // streams, the old chunks stay until the bucket's max age, and the new object is whole.
            Ok(Err(purge)) if purge.kind() == object_store::PutErrorKind::PurgeOldChunks => self
                .bucket
                .info(artifact_object(task, &path))
                .await
                .map_err(|source| FilesError::ReadBack {
                    path: path.clone(),
                    purge,
                    source,
                }),
            Ok(result) => result.map_err(|source| FilesError::Store {
                path: path.clone(),
                source,
            }),
            Err(source) => Err(FilesError::Stopped {
                path: path.clone(),
                source,
            }),
        };
        match stored {
            Ok(info) => FilePutReply::Stored(Artifact {
                path,
                size: info.size as u64,
                digest: info.digest.unwrap_or_default(),
            }),
            Err(failure) => refused_upload(&failure),
        }
    }

    /// Counts the chunk against the task's caps; the error says which cap it would break.
    fn count(&self, task: TaskId, request: &FilePut, limits: FileLimits) -> Result<(), FilesError> {
        let mut counted = lock(&self.counted);
        let paths = counted.entry(task).or_default();
        let before = if request.offset == 0 {
            0
        } else {
            paths.get(&request.path).copied().unwrap_or(0)
        };
        let others: u64 = paths
            .iter()
            .filter(|(path, _)| **path != request.path)
            .map(|(_, bytes)| bytes)
            .sum();
        let files = paths.len() as u64 + u64::from(!paths.contains_key(&request.path));
        let bytes = others + before + request.data.len() as u64;
        if files > limits.max_artifacts {
            return Err(FilesError::TooManyArtifacts {
                limit: limits.max_artifacts,
            });
        }
        if bytes > limits.max_artifact_bytes {
            return Err(FilesError::TooManyArtifactBytes {
                limit: limits.max_artifact_bytes,
            });
        }
        paths.insert(request.path.clone(), before + request.data.len() as u64);
        Ok(())
    }

    /// Drops readers and uploads nobody asked about within the idle timeout.
    fn sweep(&self) {
        let idle = self.config.idle_timeout;
        lock(&self.readers).retain(|_, open| open.used.elapsed() < idle);
        lock(&self.uploads).retain(|_, upload| upload.used.elapsed() < idle);
    }

    /// Forgets everything about `tasks` and, when configured, deletes their objects.
    async fn reaped(&self, tasks: &HashSet<TaskId>) {
        lock(&self.counted).retain(|task, _| !tasks.contains(task));
        lock(&self.readers).retain(|(task, _), _| !tasks.contains(task));
        lock(&self.uploads).retain(|(task, _), _| !tasks.contains(task));
        if !self.config.delete_on_reap {
            return;
        }
        let prefixes: Vec<String> = tasks.iter().map(|t| task_prefix(*t)).collect();
        let mut listed = match self.bucket.list().await {
            Ok(listed) => listed,
            Err(e) => {
                warn!(error = %e, "files: cannot list the bucket to delete reaped tasks' objects");
                return;
            }
        };
        let mut doomed = Vec::new();
        while let Some(next) = listed.next().await {
            match next {
                Ok(info) if prefixes.iter().any(|p| info.name.starts_with(p.as_str())) => {
                    doomed.push(info.name);
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "files: listing the bucket failed");
                    break;
                }
            }
        }
        for name in doomed {
            match self.bucket.delete(&name).await {
                Ok(()) => debug!(object = %name, "files: deleted with its reaped task"),
                Err(e) => {
                    // Marked deleted but not purged (an engine identity may not purge streams): the
                    // object is gone for readers and its bytes go at the bucket's max age.
                    if self.bucket.info(&name).await.is_ok_and(|info| info.deleted) {
                        debug!(object = %name, error = %e, "files: deleted; its chunks stay until the bucket's max age");
                    } else {
                        warn!(object = %name, error = %e, "files: cannot delete");
                    }
                }
            }
        }
    }
}

/// Runs the files loop until `ctx.shutdown`, over the files bucket `bucket`.
pub async fn run(
    ctx: Arc<EngineCtx>,
    bucket: ObjectStore,
    config: FilesConfig,
) -> Result<(), FilesError> {
    let (client, store, shutdown) = (ctx.nats.clone(), ctx.store.clone(), ctx.shutdown.clone());
    let events = ctx.topology.events.clone();
    let names = store.names().clone();
    let mut requests = client
        .queue_subscribe(names.agent_files_all(), "taskpods-files".into())
        .await
        .map_err(FilesError::Subscribe)?;
    let limit = Arc::new(tokio::sync::Semaphore::new(config.max_concurrent.max(1)));
    let files = Arc::new(Files {
        store,
        bucket,
        config,
        readers: Mutex::default(),
        uploads: Mutex::default(),
        counted: Mutex::default(),
    });
    let _reaper = timers::AbortOnDrop(tokio::spawn(follow_reaped(
        files.clone(),
        events,
        shutdown.clone(),
    )));
    let mut sweep = tokio::time::interval(files.config.idle_timeout.max(Duration::from_secs(1)));
    info!("files loop running");
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = sweep.tick() => files.sweep(),
            Some(msg) = requests.next() => {
                let Ok(Addressed::AgentFiles(task, op)) = names.parse(&msg.subject) else { continue };
                let Some(reply) = msg.reply.clone() else { continue };
                let Ok(permit) = limit.clone().acquire_owned().await else { break };
                let (client, files) = (client.clone(), files.clone());
                tokio::spawn(async move {
                    let payload = match op.as_str() {
                        "get" => {
                            let answer = match codec::decode::<FileGet>("file get", &msg.payload, Encoding::Msgpack) {
                                Ok(request) => files.get(task, request).await,
                                Err(e) => refused_get(FileRefusal::Unknown, e.to_string()),
                            };
                            if let FileGetReply::Refused { code, message } = &answer {
                                debug!(%task, %code, message, "file get refused");
                            }
                            codec::to_msgpack(&answer)
                        }
                        "put" => {
                            let answer = match codec::decode::<FilePut>("file put", &msg.payload, Encoding::Msgpack) {
                                Ok(request) => files.put(task, request).await,
                                Err(e) => refused_put(FileRefusal::Unknown, e.to_string()),
                            };
                            if let FilePutReply::Refused { code, message } = &answer {
                                debug!(%task, %code, message, "file put refused");
                            }
                            codec::to_msgpack(&answer)
                        }
                        _ => codec::to_msgpack(&refused_get(FileRefusal::Unknown, format!("unknown file operation {op:?}"))),
                    };
                    if let Ok(payload) = payload {
                        let _ = client.publish(reply, payload.into()).await;
                    }
                    drop(permit);
                });
            }
            else => break,
        }
    }
    Ok(())
}

/// Forgets reaped tasks (and deletes their objects when configured), in batches.
async fn follow_reaped(
    files: Arc<Files>,
    events: async_nats::jetstream::stream::Stream,
    shutdown: CancellationToken,
) {
    let started = Utc::now() - chrono::TimeDelta::seconds(5);
    let mut follow = timers::follow_events(events, files.store.names().clone());
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return,
            next = follow.recv() => next,
        };
        let Some((task, event)) = next else { return };
        // The follower starts with every task's last event: only reaps from now on delete objects
        // (older ones are left to the bucket's max age).
        if !matches!(event.body, EventBody::Reaped) || event.at < started {
            continue;
        }
        let mut batch = HashSet::from([task]);
        let until = Instant::now() + Duration::from_millis(500);
        while let Ok(Some((task, event))) = tokio::time::timeout_at(until, follow.recv()).await {
            if matches!(event.body, EventBody::Reaped) {
                batch.insert(task);
            }
        }
        files.reaped(&batch).await;
    }
}
