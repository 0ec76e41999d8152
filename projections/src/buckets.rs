//! Where the views live, and how readers find them.
//!
//! Views come in generations. Generation 1 is the topology's buckets (`taskpods_tasks`, ...); a rebuild
//! writes generation `n` into fresh buckets (`taskpods_tasks_g<n>`, ...) and then switches readers over by
//! updating one pointer key (`current` in `<prefix>_projections`). Readers ([`Views`]) and projectors
//! follow the pointer, so nobody ever reads a half-built generation.
//!
//! The finished index (`taskpods_finished`) is written once per task, when it ends, in the order the
//! terminal events were appended; its backing stream therefore lists finished tasks oldest first, and
//! [`Views::finished_page`] reads it backwards by stream sequence with direct gets: a page costs one stream
//! info and `limit` gets, however many tasks were ever stored.

use std::time::Duration;

use async_nats::jetstream::{
    self, kv,
    stream::{self, DirectGetErrorKind, DiscardPolicy, RetentionPolicy, StorageType},
};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use taskpods_events::{Names, TaskId};

use crate::view::{self, ActiveView, FinishedView, HistoryView, TaskView};

/// The pointer key in the meta bucket.
pub const POINTER_KEY: &str = "current";

/// What callers branch on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The server did not answer or the connection broke; retrying later may work.
    Unavailable,
    /// A stored value could not be decoded.
    Corrupt,
    /// A bucket or consumer that should exist does not.
    Missing,
    /// Anything else.
    Other,
}

/// Errors opening, reading or managing view buckets.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    /// A JetStream request failed.
    #[error("JetStream {operation} {name}: {source}")]
    JetStream {
        /// What we were doing.
        operation: &'static str,
        /// The bucket, stream or key.
        name: String,
        /// Its kind, read from the client's own error kinds (see [`kind_of`]).
        kind: ErrorKind,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
    /// Another writer kept winning the revision race on a key; the write was given up.
    #[error("JetStream {operation} {name}: too many concurrent writers")]
    Contended {
        /// What we were doing.
        operation: &'static str,
        /// The key.
        name: String,
    },
    /// A value in a bucket is not what this version writes.
    #[error("bucket {bucket} key {key}: undecodable value: {source}")]
    Corrupt {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// A view could not be encoded (a bug: views are plain data).
    #[error("key {key}: cannot encode the value: {source}")]
    Encode {
        /// The key it was meant for.
        key: String,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
}

impl BucketError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::JetStream { kind, .. } => *kind,
            Self::Contended { .. } => ErrorKind::Other,
            Self::Corrupt { .. } | Self::Encode { .. } => ErrorKind::Corrupt,
        }
    }

    pub(crate) fn js<E>(operation: &'static str, name: impl Into<String>, error: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Self::JetStream {
            operation,
            name: name.into(),
            kind: kind_of(&error),
            source: Box::new(error),
        }
    }
}

/// The kind of a NATS failure, read from async-nats's own error kinds along the error's source chain
/// (never from its text, which changes between client versions): timeouts, broken connections and no
/// responders are [`ErrorKind::Unavailable`]; a JetStream API answer with code 404 (stream, consumer or
/// message not found) or a missing stream is [`ErrorKind::Missing`].
pub fn kind_of(error: &(dyn std::error::Error + 'static)) -> ErrorKind {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(kind) = direct_kind(error) {
            return kind;
        }
        next = error.source();
    }
    ErrorKind::Other
}

/// The kind `error` itself says, when it says one; `None` sends [`kind_of`] on to its source.
fn direct_kind(error: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
    use async_nats::jetstream::context::{
        CreateStreamError, CreateStreamErrorKind as Create, GetStreamError,
        GetStreamErrorKind as Get, PublishError, PublishErrorKind as Publish, RequestError,
        RequestErrorKind as Request,
    };
    use async_nats::jetstream::stream::{DirectGetError, PurgeError, PurgeErrorKind as Purge};
    use jetstream::Error as Api;
    use kv::{
        EntryError, EntryErrorKind, UpdateError, UpdateErrorKind, WatchError, WatchErrorKind,
    };

    const UNAVAILABLE: Option<ErrorKind> = Some(ErrorKind::Unavailable);
    let api = |e: &Api| (e.code() == 404).then_some(ErrorKind::Missing);
    if let Some(e) = error.downcast_ref::<PublishError>() {
        match e.kind() {
            Publish::TimedOut | Publish::BrokenPipe => UNAVAILABLE,
            Publish::StreamNotFound => Some(ErrorKind::Missing),
            _ => None,
        }
    } else if let Some(e) = error.downcast_ref::<RequestError>() {
        matches!(e.kind(), Request::TimedOut | Request::NoResponders)
            .then_some(ErrorKind::Unavailable)
    } else if let Some(e) = error.downcast_ref::<async_nats::RequestError>() {
        use async_nats::RequestErrorKind as Core;
        matches!(e.kind(), Core::TimedOut | Core::NoResponders).then_some(ErrorKind::Unavailable)
    } else if let Some(e) = error.downcast_ref::<async_nats::PublishError>() {
        (e.kind() == async_nats::PublishErrorKind::Send).then_some(ErrorKind::Unavailable)
    } else if let Some(e) = error.downcast_ref::<UpdateError>() {
        (e.kind() == UpdateErrorKind::TimedOut).then_some(ErrorKind::Unavailable)
    } else if let Some(e) = error.downcast_ref::<EntryError>() {
        (e.kind() == EntryErrorKind::TimedOut).then_some(ErrorKind::Unavailable)
    } else if let Some(e) = error.downcast_ref::<WatchError>() {
        (e.kind() == WatchErrorKind::TimedOut).then_some(ErrorKind::Unavailable)
    } else if let Some(e) = error.downcast_ref::<DirectGetError>() {
        match e.kind() {
            DirectGetErrorKind::TimedOut => UNAVAILABLE,
            DirectGetErrorKind::NotFound => Some(ErrorKind::Missing),
            _ => None,
        }
    } else if let Some(e) = error.downcast_ref::<CreateStreamError>() {
        match e.kind() {
            Create::TimedOut | Create::JetStreamUnavailable => UNAVAILABLE,
            Create::NotFound => Some(ErrorKind::Missing),
            Create::JetStream(e) => api(&e),
            _ => None,
        }
    } else if let Some(e) = error.downcast_ref::<GetStreamError>() {
        match e.kind() {
            Get::JetStream(e) => api(&e),
            _ => None,
        }
    } else if let Some(e) = error.downcast_ref::<PurgeError>() {
        match e.kind() {
            Purge::TimedOut => UNAVAILABLE,
            Purge::JetStream(e) => api(&e),
            Purge::Request => None,
        }
    } else if let Some(e) = error.downcast_ref::<Api>() {
        api(e)
    } else {
        None
    }
}

/// How new view buckets are stored (matches the topology's settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketSettings {
    /// Replicas (1, or 3 on a cluster).
    pub replicas: usize,
    /// File, or memory for throwaway setups.
    pub storage: StorageType,
}

impl Default for BucketSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            storage: StorageType::File,
        }
    }
}

/// The generation readers follow, stored under [`POINTER_KEY`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Pointer {
    /// The generation in use.
    pub generation: u32,
    /// When it became current.
    pub switched_at: DateTime<Utc>,
    /// The event stream sequence the generation had folded when it became current.
    pub covered_seq: u64,
}

impl Default for Pointer {
    fn default() -> Self {
        Self {
            generation: 1,
            switched_at: DateTime::default(),
            covered_seq: 0,
        }
    }
}

/// The meta bucket: the generation pointer.
pub fn meta_bucket(names: &Names) -> String {
    let tasks = names.tasks_bucket();
    let base = tasks.strip_suffix("_tasks").unwrap_or(&tasks);
    format!("{base}_projections")
}

/// The four view buckets of `generation`: tasks, history, active, finished.
pub fn generation_buckets(names: &Names, generation: u32) -> [String; 4] {
    let base = names.buckets();
    if generation <= 1 {
        base
    } else {
        base.map(|b| format!("{b}_g{generation}"))
    }
}

/// The durable consumer that feeds `generation`.
pub fn consumer_name(names: &Names, generation: u32) -> String {
    format!(
        "{}_projector_g{generation}",
        names.prefix().replace('.', "_")
    )
}

/// The KV backing stream a bucket needs; the same shape as the topology's (see docs/ARCHITECTURE.md section 12).
pub fn kv_stream_config(bucket: &str, settings: BucketSettings) -> stream::Config {
    stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        retention: RetentionPolicy::Limits,
        max_messages_per_subject: 1,
        discard: DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        storage: settings.storage,
        num_replicas: settings.replicas,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

/// Opens `bucket`, creating its backing stream first when it is missing.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    bucket: &str,
    settings: BucketSettings,
) -> Result<kv::Store, BucketError> {
    let stream_name = format!("KV_{bucket}");
    if js.get_stream(&stream_name).await.is_err() {
        // A concurrent creator wins the race; the open below finds its stream.
        if let Err(e) = js.create_stream(kv_stream_config(bucket, settings)).await
            && js.get_stream(&stream_name).await.is_err()
        {
            return Err(BucketError::js("create bucket", bucket, e));
        }
    }
    open_bucket(js, bucket).await
}

/// Opens an existing bucket.
pub async fn open_bucket(js: &jetstream::Context, bucket: &str) -> Result<kv::Store, BucketError> {
    js.get_key_value(bucket)
        .await
        .map_err(|e| BucketError::js("open bucket", bucket, e))
}

/// Deletes a bucket (its backing stream); missing is fine.
pub async fn delete_bucket(js: &jetstream::Context, bucket: &str) -> Result<(), BucketError> {
    match js.delete_stream(format!("KV_{bucket}")).await {
        Ok(_) => Ok(()),
        Err(e) if kind_of(&e) == ErrorKind::Missing => Ok(()),
        Err(e) => Err(BucketError::js("delete bucket", bucket, e)),
    }
}

/// The current pointer and its KV revision (0 when never written: generation 1).
pub async fn read_pointer(meta: &kv::Store) -> Result<(Pointer, u64), BucketError> {
    match meta.entry(POINTER_KEY).await {
        Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
            let pointer =
                view::decode::<Pointer>(&entry.value).map_err(|source| BucketError::Corrupt {
                    bucket: "projections".into(),
                    key: POINTER_KEY.into(),
                    source,
                })?;
            Ok((pointer, entry.revision))
        }
        Ok(Some(entry)) => Ok((Pointer::default(), entry.revision)),
        Ok(None) => Ok((Pointer::default(), 0)),
        Err(e) => Err(BucketError::js("read pointer", POINTER_KEY, e)),
    }
}

/// The four buckets of one generation.
#[derive(Clone, Debug)]
pub struct ViewBuckets {
    /// Which generation.
    pub generation: u32,
    /// Task → current view.
    pub tasks: kv::Store,
    /// Task → timeline.
    pub history: kv::Store,
    /// Live tasks.
    pub active: kv::Store,
    /// Finished tasks in the order they ended.
    pub finished: kv::Store,
    /// The finished bucket's backing stream, for paging by sequence.
    pub finished_stream: stream::Stream,
}

impl ViewBuckets {
    /// Opens the buckets of `generation`, creating missing ones when `create`.
    pub async fn open(
        js: &jetstream::Context,
        names: &Names,
        generation: u32,
        settings: BucketSettings,
        create: bool,
    ) -> Result<Self, BucketError> {
        let [tasks, history, active, finished] = generation_buckets(names, generation);
        let open = |bucket: String| async move {
            if create {
                ensure_bucket(js, &bucket, settings).await
            } else {
                open_bucket(js, &bucket).await
            }
        };
        let finished_stream_name = format!("KV_{finished}");
        let out = Self {
            generation,
            tasks: open(tasks).await?,
            history: open(history).await?,
            active: open(active).await?,
            finished: open(finished).await?,
            finished_stream: js
                .get_stream(&finished_stream_name)
                .await
                .map_err(|e| BucketError::js("open stream", finished_stream_name, e))?,
        };
        Ok(out)
    }
}

/// One page of the finished index, newest first.
#[derive(Clone, Debug, PartialEq)]
pub struct FinishedPage {
    /// The entries, newest first.
    pub entries: Vec<FinishedView>,
    /// The cursor for the next (older) page; `None` at the end.
    pub next: Option<u64>,
}

/// What UIs and callers read: the current generation's views.
#[derive(Clone, Debug)]
pub struct Views {
    js: jetstream::Context,
    names: Names,
    meta: kv::Store,
    buckets: ViewBuckets,
}

impl Views {
    /// Follows the pointer and opens the current generation's buckets (creating generation 1's when the
    /// topology has not yet been set up).
    pub async fn open(
        js: &jetstream::Context,
        names: &Names,
        settings: BucketSettings,
    ) -> Result<Self, BucketError> {
        let meta = ensure_bucket(js, &meta_bucket(names), settings).await?;
        let (pointer, _) = read_pointer(&meta).await?;
        let buckets = ViewBuckets::open(js, names, pointer.generation, settings, true).await?;
        Ok(Self {
            js: js.clone(),
            names: names.clone(),
            meta,
            buckets,
        })
    }

    /// Re-reads the pointer; returns whether the generation changed. Long-lived readers call this
    /// periodically (or after a read finds a bucket missing).
    pub async fn refresh(&mut self) -> Result<bool, BucketError> {
        let (pointer, _) = read_pointer(&self.meta).await?;
        if pointer.generation == self.buckets.generation {
            return Ok(false);
        }
        self.buckets = ViewBuckets::open(
            &self.js,
            &self.names,
            pointer.generation,
            BucketSettings::default(),
            false,
        )
        .await?;
        Ok(true)
    }

    /// The generation being read.
    pub fn generation(&self) -> u32 {
        self.buckets.generation
    }

    /// The buckets being read.
    pub fn buckets(&self) -> &ViewBuckets {
        &self.buckets
    }

    /// The current view of `task`.
    pub async fn task(&self, task: TaskId) -> Result<Option<TaskView>, BucketError> {
        get(&self.buckets.tasks, &task.to_string()).await
    }

    /// The timeline of `task`.
    pub async fn history(&self, task: TaskId) -> Result<Option<HistoryView>, BucketError> {
        get(&self.buckets.history, &task.to_string()).await
    }

    /// Every live task (cost grows with the number of live tasks, never with finished ones).
    pub async fn active(&self) -> Result<Vec<ActiveView>, BucketError> {
        let keys = all_keys(&self.buckets.active).await?;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(v) = get::<ActiveView>(&self.buckets.active, &key).await? {
                out.push(v);
            }
        }
        out.sort_by_key(|v| (v.accepted_at, v.seq));
        Ok(out)
    }

    /// Finished tasks, newest first: `limit` entries older than `before` (a cursor from the previous
    /// page; `None` for the newest). The cost is one stream info plus `limit` direct gets.
    pub async fn finished_page(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<FinishedPage, BucketError> {
        finished_page(&self.buckets.finished_stream, before, limit).await
    }

    /// Waits until the view of `task` has folded the event at stream sequence `seq` (read-your-writes
    /// for one task; watches the key, so it costs nothing while waiting). `None` on timeout.
    pub async fn wait_for_task(
        &self,
        task: TaskId,
        seq: u64,
        timeout: Duration,
    ) -> Result<Option<TaskView>, BucketError> {
        let key = task.to_string();
        let deadline = tokio::time::Instant::now() + timeout;
        // Watch first, then read: an update between the two is seen by the watch.
        let mut watch = self
            .buckets
            .tasks
            .watch(&key)
            .await
            .map_err(|e| BucketError::js("watch", &key, e))?;
        if let Some(v) = self.task(task).await?
            && v.seq >= seq
        {
            return Ok(Some(v));
        }
        loop {
            let next = tokio::time::timeout_at(deadline, watch.next()).await;
            match next {
                Err(_) => return Ok(None),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(BucketError::js("watch", &key, e)),
                Ok(Some(Ok(entry))) => {
                    if entry.operation != kv::Operation::Put {
                        continue;
                    }
                    let v: TaskView = decode_entry(&self.buckets.tasks, &key, &entry.value)?;
                    if v.seq >= seq {
                        return Ok(Some(v));
                    }
                }
            }
        }
    }
}

/// Reads and decodes `key` (absent or deleted: `None`).
pub async fn get<T: for<'de> Deserialize<'de>>(
    bucket: &kv::Store,
    key: &str,
) -> Result<Option<T>, BucketError> {
    match bucket.entry(key).await {
        Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
            decode_entry(bucket, key, &entry.value).map(Some)
        }
        Ok(_) => Ok(None),
        Err(e) => Err(BucketError::js("read", key, e)),
    }
}

pub(crate) fn decode_entry<T: for<'de> Deserialize<'de>>(
    bucket: &kv::Store,
    key: &str,
    bytes: &[u8],
) -> Result<T, BucketError> {
    view::decode(bytes).map_err(|source| BucketError::Corrupt {
        bucket: bucket.name.clone(),
        key: key.to_owned(),
        source,
    })
}

/// Every live key of a bucket (for verify and the active list).
pub async fn all_keys(bucket: &kv::Store) -> Result<Vec<String>, BucketError> {
    let mut keys = bucket
        .keys()
        .await
        .map_err(|e| BucketError::js("list keys", &bucket.name, e))?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        out.push(key.map_err(|e| BucketError::js("list keys", &bucket.name, e))?);
    }
    Ok(out)
}

/// Reads the finished index backwards from `before` (exclusive).
pub async fn finished_page(
    stream: &stream::Stream,
    before: Option<u64>,
    limit: usize,
) -> Result<FinishedPage, BucketError> {
    let mut stream = stream.clone();
    let name = stream.cached_info().config.name.clone();
    let info = stream
        .info()
        .await
        .map_err(|e| BucketError::js("stream info", &name, e))?;
    let first = info.state.first_sequence.max(1);
    let mut cursor = before.unwrap_or(info.state.last_sequence.saturating_add(1));
    let mut entries = Vec::with_capacity(limit);
    let limit = limit.max(1);
    // Entries are written once per task, so the sequences are dense and one round of gets normally
    // fills the page; the loop only continues over gaps (purged or deleted entries).
    while entries.len() < limit && cursor > first {
        let want = (limit - entries.len()) as u64;
        let low = cursor.saturating_sub(want).max(first);
        let gets = (low..cursor).rev().map(|seq| {
            let stream = &stream;
            async move { (seq, stream.direct_get(seq).await) }
        });
        let results = futures::future::join_all(gets).await;
        for (seq, result) in results {
            match result {
                Ok(message) => {
                    let deleted = message
                        .headers
                        .get("KV-Operation")
                        .is_some_and(|op| op.as_str() != "PUT");
                    if deleted || message.payload.is_empty() {
                        continue;
                    }
                    let entry: FinishedView =
                        view::decode(&message.payload).map_err(|source| BucketError::Corrupt {
                            bucket: name.clone(),
                            key: format!("sequence {seq}"),
                            source,
                        })?;
                    entries.push(entry);
                }
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => {}
                Err(e) => return Err(BucketError::js("direct get", &name, e)),
            }
        }
        cursor = low;
    }
    Ok(FinishedPage {
        entries,
        next: (cursor > first).then_some(cursor),
    })
}
