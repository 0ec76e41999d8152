//! Files in and out of tasks, for Brains: put an input before launching, list and fetch a task's
//! artifacts afterwards. The bytes live in the object store bucket `<prefix>_files` (inputs under
//! `<task>/in/<name>`, artifacts under `<task>/out/<path>`); see `docs/PROTOCOL.md#files`.
//!
//! ```no_run
//! # async fn demo(client: taskpods_client::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use taskpods_events::{LaunchTask, TaskId};
//! let task = TaskId::mint();
//! let input = client.put_input(task, "data.csv", &mut &b"a,b\n1,2\n"[..]).await?;
//! client.launch(LaunchTask {
//!     task_id: Some(task.0),
//!     inputs: vec![input],
//!     ..LaunchTask::script("wc -l /tmp/in/data.csv > /tmp/out/count.txt")
//! }).await?;
//! // ... once the task has ended:
//! for artifact in client.artifacts(task).await? {
//!     let mut bytes = Vec::new();
//!     client.get_artifact(task, &artifact.path, &mut bytes).await?;
//! }
//! # Ok(()) }
//! ```

use async_nats::jetstream::object_store::{self, ObjectMetadata, ObjectStore};
use futures::StreamExt;
use taskpods_events::TaskId;
use taskpods_events::files::{
    Artifact, InputFile, PathProblem, artifact_object, artifacts_prefix, check_relative_path,
    input_object,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::Client;

/// Errors moving files.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The files bucket could not be opened (no engine has created it, or NATS is unreachable).
    #[error("files bucket {bucket}: {source}")]
    Bucket {
        /// The bucket.
        bucket: String,
        /// The client's error.
        #[source]
        source: async_nats::jetstream::context::ObjectStoreError,
    },
    /// An input name or artifact path is not a clean relative path.
    #[error("{path:?}: {source}")]
    BadPath {
        /// The path.
        path: String,
        /// What is wrong with it.
        #[source]
        source: PathProblem,
    },
    /// Storing an input failed.
    #[error("storing {object}: {source}")]
    Put {
        /// The object.
        object: String,
        /// The client's error.
        #[source]
        source: object_store::PutError,
    },
    /// No such artifact (or input).
    #[error("no object {0} in the files bucket")]
    NotFound(String),
    /// Reading an object failed.
    #[error("reading {object}: {source}")]
    Get {
        /// The object.
        object: String,
        /// The client's error.
        #[source]
        source: object_store::GetError,
    },
    /// Listing the bucket could not start.
    #[error("listing the files bucket: {0}")]
    List(#[source] object_store::ListError),
    /// Listing the bucket failed part way.
    #[error("listing the files bucket: {0}")]
    Listing(#[source] object_store::ListerError),
    /// The bytes did not arrive whole (the object store checks each object's digest as it is read).
    #[error("copying {object}: {source}")]
    Io {
        /// The object.
        object: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl Client {
    /// The files bucket.
    pub async fn files_bucket(&self) -> Result<ObjectStore, FilesError> {
        let bucket = self.config.names.files_bucket();
        self.js
            .get_object_store(&bucket)
            .await
            .map_err(|source| FilesError::Bucket { bucket, source })
    }

    /// Stores `data` as input `name` of `task` (object `<task>/in/<name>`) and returns the entry to put
    /// in the launch's `inputs`, with its size and digest (so the engine checks them). The code finds
    /// it at `/tmp/in/<name>`.
    pub async fn put_input(
        &self,
        task: TaskId,
        name: &str,
        data: &mut (impl AsyncRead + Unpin),
    ) -> Result<InputFile, FilesError> {
        check_relative_path(name).map_err(|source| FilesError::BadPath {
            path: name.to_owned(),
            source,
        })?;
        let object = input_object(task, name);
        let bucket = self.files_bucket().await?;
        let put = bucket
            .put(
                ObjectMetadata {
                    name: object.clone(),
                    ..ObjectMetadata::default()
                },
                data,
            )
            .await;
        let info = match put {
            Ok(info) => info,
            // Putting the same input again replaces it; an identity that may not purge streams (a
            // Brain's) leaves the old chunks for the bucket's max age, and the new object is whole.
            Err(source) if source.kind() == object_store::PutErrorKind::PurgeOldChunks => {
                bucket.info(&object).await.map_err(|_| FilesError::Put {
                    object: object.clone(),
                    source,
                })?
            }
            Err(source) => {
                return Err(FilesError::Put {
                    object: object.clone(),
                    source,
                });
            }
        };
        Ok(InputFile {
            name: name.to_owned(),
            object,
            path: None,
            size: Some(info.size as u64),
            digest: info.digest,
        })
    }

    /// The artifacts `task` stored, in path order, read from the bucket (so those of timed-out and
    /// cancelled tasks too). Lists the whole bucket: its cost grows with the number of stored objects.
    pub async fn artifacts(&self, task: TaskId) -> Result<Vec<Artifact>, FilesError> {
        let prefix = artifacts_prefix(task);
        let mut listed = self
            .files_bucket()
            .await?
            .list()
            .await
            .map_err(FilesError::List)?;
        let mut artifacts = Vec::new();
        while let Some(info) = listed.next().await {
            let info = info.map_err(FilesError::Listing)?;
            if let Some(path) = info.name.strip_prefix(&prefix)
                && !info.deleted
            {
                artifacts.push(Artifact {
                    path: path.to_owned(),
                    size: info.size as u64,
                    digest: info.digest.unwrap_or_default(),
                });
            }
        }
        artifacts.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(artifacts)
    }

    /// Copies artifact `path` of `task` into `out`; returns the bytes copied. The object store checks
    /// the bytes against the artifact's digest as they arrive: a mismatch is an error.
    pub async fn get_artifact(
        &self,
        task: TaskId,
        path: &str,
        out: &mut (impl AsyncWrite + Unpin),
    ) -> Result<u64, FilesError> {
        check_relative_path(path).map_err(|source| FilesError::BadPath {
            path: path.to_owned(),
            source,
        })?;
        let object = artifact_object(task, path);
        let mut reader = self
            .files_bucket()
            .await?
            .get(&object)
            .await
            .map_err(|source| match source.kind() {
                object_store::GetErrorKind::NotFound => FilesError::NotFound(object.clone()),
                _ => FilesError::Get {
                    object: object.clone(),
                    source,
                },
            })?;
        let copied = tokio::io::copy(&mut reader, out)
            .await
            .map_err(|source| FilesError::Io {
                object: object.clone(),
                source,
            })?;
        out.flush().await.map_err(|source| FilesError::Io {
            object: object.clone(),
            source,
        })?;
        Ok(copied)
    }
}
