//! A task's files on the page: the inputs its launch named and the artifacts it left in `/tmp/out`,
//! listed as JSON and downloaded as attachments streamed from the object store (`<prefix>_files`).
//!
//! Everything in a download's URL is hostile: the task id must parse as a UUID, an artifact path must be
//! a clean relative path (no `..`, empty, absolute or control-character components), and the object read
//! is always `<task>/out/<path>` of a task the views know. An input is found by its name in the task's
//! recorded launch, never by an object name from the URL. The bytes are served as an attachment with a
//! type from a short list of inert types (never HTML, SVG or script), `nosniff` and a sandboxing
//! Content-Security-Policy, so a task's file cannot run in the page's origin.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use taskpods_client::files::FilesError;
use taskpods_events::files::{
    Artifact, ArtifactsTruncated, SkippedArtifact, artifact_object, check_relative_path,
};
use taskpods_events::{EventBody, TaskId, TaskOutcome, TaskSpec};
use taskpods_projections::{TaskView, log};
use tokio::io::AsyncReadExt;

use super::AppState;
use super::api::{ApiError, parse_task};

/// The bytes read from the object store per body chunk.
const CHUNK: usize = 64 * 1024;

/// The file routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/tasks/{task}/files", get(files))
        .route("/api/tasks/{task}/artifacts/{*path}", get(artifact))
        .route("/api/tasks/{task}/inputs/{*name}", get(input))
}

/// One input as the page shows it (names, sizes and digests: never contents).
#[derive(Debug, Clone, Serialize)]
pub struct InputEntry {
    /// The input's name (what its download URL names).
    pub name: String,
    /// Where the code found it, under `/tmp/in`.
    pub path: String,
    /// The size the launch declared, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The digest the launch declared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// A task's files: `GET /api/tasks/{task}/files`.
#[derive(Debug, Clone, Serialize)]
pub struct FilesDocument {
    /// The inputs named in the launch.
    pub inputs: Vec<InputEntry>,
    /// The stored artifacts, in path order.
    pub artifacts: Vec<Artifact>,
    /// Where the artifact list came from: `outcome` (what the agent reported), `bucket` (the task ended
    /// without an outcome, e.g. timed out: the objects stored under it) or `none` (not ended yet, or its
    /// code never ran).
    pub artifacts_from: &'static str,
    /// What the per-task caps left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifacts_truncated: Option<ArtifactsTruncated>,
    /// What in `/tmp/out` was not stored (symlinks, special files), and why.
    pub artifacts_skipped: Vec<SkippedArtifact>,
}

/// The view of `task`, or 404.
async fn known_task(state: &AppState, task: TaskId) -> Result<TaskView, ApiError> {
    let views = state.views.read().await;
    views
        .task(task)
        .await
        .map_err(|e| ApiError::unavailable("reading the task view", e))?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no task {task}")))
}

/// The launch spec and the last outcome the agent reported, from the task's events.
async fn recorded(
    state: &AppState,
    view: &TaskView,
) -> Result<(Option<TaskSpec>, Option<TaskOutcome>), ApiError> {
    let stream = state
        .js
        .get_stream(state.names.event_stream())
        .await
        .map_err(|e| ApiError::unavailable("opening the event stream", e))?;
    let events = log::read_task(&stream, &state.names, view.task, view.first_seq, view.seq)
        .await
        .map_err(|e| ApiError::unavailable("reading the task's events", e))?;
    let (mut spec, mut outcome) = (None, None);
    for read in events.into_iter().flatten() {
        match read.event.body {
            EventBody::Accepted { spec: s, .. } => spec = Some(s),
            EventBody::Succeeded { outcome: o } => outcome = Some(o),
            EventBody::Failed { outcome: o, .. } | EventBody::Cancelled { outcome: o } => {
                outcome = o.or(outcome);
            }
            _ => {}
        }
    }
    Ok((spec, outcome))
}

async fn files(
    State(state): State<AppState>,
    Path(task): Path<String>,
) -> Result<Json<FilesDocument>, ApiError> {
    let task = parse_task(&task)?;
    let view = known_task(&state, task).await?;
    let (spec, outcome) = recorded(&state, &view).await?;
    let inputs = spec
        .map(|s| s.inputs)
        .unwrap_or_default()
        .into_iter()
        .map(|i| InputEntry {
            path: i.path().to_owned(),
            name: i.name,
            size: i.size,
            digest: i.digest,
        })
        .collect();
    let document = match outcome {
        Some(outcome) => FilesDocument {
            inputs,
            artifacts: outcome.artifacts,
            artifacts_from: "outcome",
            artifacts_truncated: outcome.artifacts_truncated,
            artifacts_skipped: outcome.artifacts_skipped,
        },
        None => {
            // Ended without an outcome (timed out, lost, cancelled before the code exited): what the
            // agent flushed is only in the bucket. A task whose agent never ran has nothing there.
            let ended = view.state.is_terminal() && view.running_at.is_some();
            let artifacts = if ended {
                state
                    .client
                    .artifacts(task)
                    .await
                    .map_err(|e| ApiError::unavailable("listing the files bucket", e))?
            } else {
                Vec::new()
            };
            FilesDocument {
                inputs,
                artifacts,
                artifacts_from: if ended { "bucket" } else { "none" },
                artifacts_truncated: None,
                artifacts_skipped: Vec::new(),
            }
        }
    };
    Ok(Json(document))
}

/// `GET /api/tasks/{task}/artifacts/{path}`: the artifact's bytes.
async fn artifact(
    State(state): State<AppState>,
    Path((task, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let task = parse_task(&task)?;
    check_relative_path(&path).map_err(|problem| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("artifact path {path:?} {problem}"),
        )
    })?;
    known_task(&state, task).await?;
    serve_object(&state, artifact_object(task, &path), &path).await
}

/// `GET /api/tasks/{task}/inputs/{name}`: the bytes of an input the task's launch named.
async fn input(
    State(state): State<AppState>,
    Path((task, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let task = parse_task(&task)?;
    let view = known_task(&state, task).await?;
    let (spec, _) = recorded(&state, &view).await?;
    let input = spec
        .into_iter()
        .flat_map(|s| s.inputs)
        .find(|i| i.name == name)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("task {task} has no input named {name:?}"),
            )
        })?;
    let path = input.path().to_owned();
    serve_object(&state, input.object, &path).await
}

/// Streams `object` as an attachment named after the last component of `path`.
async fn serve_object(state: &AppState, object: String, path: &str) -> Result<Response, ApiError> {
    let bucket = state
        .client
        .files_bucket()
        .await
        .map_err(|e| ApiError::unavailable("opening the files bucket", e))?;
    let reader = bucket.get(&object).await.map_err(|source| {
        use async_nats::jetstream::object_store::GetErrorKind;
        match source.kind() {
            GetErrorKind::NotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "{path:?} is not stored (never written, or deleted when the task was reaped)"
                ),
            ),
            _ => ApiError::unavailable(
                "reading the files bucket",
                FilesError::Get {
                    object: object.clone(),
                    source,
                },
            ),
        }
    })?;
    let size = reader.info().size;
    let name = path.rsplit('/').next().unwrap_or(path);
    // The object store checks the digest as the last chunk arrives: a corrupt object ends the body with
    // an error, so the client sees a broken download rather than wrong bytes.
    let body = futures::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        let mut buf = vec![0u8; CHUNK];
        match reader.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), Some(reader)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, content_type(name).to_owned()),
            (header::CONTENT_DISPOSITION, content_disposition(name)),
            (header::CONTENT_LENGTH, size.to_string()),
            (header::CONTENT_SECURITY_POLICY, "sandbox".to_owned()),
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// The type a file is served as: a few inert types by extension, anything else as bytes.
pub fn content_type(name: &str) -> &'static str {
    let extension = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match extension.as_str() {
        "txt" | "log" | "md" => "text/plain; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "json" => "application/json",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "pdf" => "application/pdf",
        "gz" | "tgz" => "application/gzip",
        "tar" => "application/x-tar",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

/// `attachment` with the file name twice: an ASCII fallback (`filename`, anything else replaced by
/// `_`) and the exact name percent-encoded as UTF-8 (`filename*`, RFC 6266 / RFC 8187).
pub fn content_disposition(name: &str) -> String {
    let fallback: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+' | ' ') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::with_capacity(name.len() * 3);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_quoted_so_no_header_or_parameter_can_be_injected() {
        assert_eq!(
            content_disposition("report.csv"),
            "attachment; filename=\"report.csv\"; filename*=UTF-8''report.csv"
        );
        assert_eq!(
            content_disposition("a\";b=c; x.html"),
            "attachment; filename=\"a__b_c_ x.html\"; filename*=UTF-8''a%22%3Bb%3Dc%3B%20x.html"
        );
        assert_eq!(
            content_disposition("résumé.txt"),
            "attachment; filename=\"r_sum_.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9.txt"
        );
    }

    #[test]
    fn active_content_is_served_as_bytes() {
        for name in [
            "x.html", "x.htm", "x.svg", "x.js", "x.xhtml", "noext", "x.HTML",
        ] {
            assert_eq!(content_type(name), "application/octet-stream", "{name}");
        }
        assert_eq!(content_type("a.CSV"), "text/csv; charset=utf-8");
        assert_eq!(content_type("b.json"), "application/json");
    }
}
