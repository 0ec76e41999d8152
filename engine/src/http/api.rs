//! The JSON API under `/api/`, documented field by field in `docs/API.md` (a test checks the responses
//! against that document). The page uses nothing else; Brains and other UIs may read it too.

use std::collections::BTreeMap;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use taskpods_client::ClientErrorKind;
use taskpods_client::output::Piece;
use taskpods_events::{EventBody, TaskId, TaskState};
use taskpods_projections::{FinishedView, HistoryView, TaskView, log};

use super::AppState;
use super::access::{self, Denied, Role};
use super::live;

/// Most bytes of output one page returns.
pub const MAX_OUTPUT_PAGE: usize = 4 << 20;
/// Most finished tasks one history request examines (a filter that matches rarely returns fewer rows and
/// a cursor to continue from: each request costs at most this many reads, however big the history).
pub const HISTORY_SCAN_BUDGET: usize = 2_000;
/// Most rows of one history page.
pub const MAX_HISTORY_PAGE: usize = 200;
/// The clock skew between engines tolerated when a `since` filter stops the scan early.
const SINCE_SLACK: chrono::Duration = chrono::Duration::seconds(60);

/// The API's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/whoami", get(whoami))
        .route("/api/session", post(session))
        .route("/api/status", get(status))
        .route("/api/active", get(active))
        .route("/api/live", get(live::active_events))
        .route("/api/history", get(history))
        .route("/api/tasks/{task}", get(task))
        .route("/api/tasks/{task}/live", get(live::task_events))
        .route("/api/tasks/{task}/output", get(output))
        .route("/api/tasks/{task}/output.txt", get(download))
        .route("/api/tasks/{task}/cancel", post(cancel))
}

/// An error answer: `{"error": "..."}` with a status code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// NATS or a view could not be read.
    pub fn unavailable(what: &str, e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, format!("{what}: {e}"))
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// A query string that does not parse.
    pub fn query(rejection: QueryRejection) -> Self {
        Self::bad_request(rejection.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// A task id from a path, or a 400 that says what is wrong.
pub fn parse_task(raw: &str) -> Result<TaskId, ApiError> {
    raw.parse::<TaskId>()
        .map_err(|_| ApiError::bad_request(format!("{raw:?} is not a task id (a UUID)")))
}

#[derive(Serialize)]
struct WhoAmI {
    role: Role,
    tokens: bool,
}

async fn whoami(State(state): State<AppState>, Extension(role): Extension<Role>) -> Json<WhoAmI> {
    Json(WhoAmI {
        role,
        tokens: state.access.has_tokens(),
    })
}

#[derive(Deserialize)]
struct SessionRequest {
    token: String,
}

/// `POST /api/session {"token": ...}`: a valid token is kept in an HttpOnly cookie for the page.
async fn session(State(state): State<AppState>, Json(request): Json<SessionRequest>) -> Response {
    match state.access.role_of_token(&request.token) {
        Some(role) => {
            let cookie = format!(
                "{}={}; HttpOnly; SameSite=Strict; Path=/",
                access::TOKEN_COOKIE,
                request.token
            );
            match header::HeaderValue::from_str(&cookie) {
                Ok(value) => (
                    [(header::SET_COOKIE, value)],
                    Json(WhoAmI { role, tokens: true }),
                )
                    .into_response(),
                Err(_) => ApiError::bad_request("the token has characters a cookie cannot hold")
                    .into_response(),
            }
        }
        None => Denied::BadToken.into_response(),
    }
}

async fn status(State(state): State<AppState>) -> Json<live::Status> {
    let current = state.status.borrow().clone();
    if current.checked_at.is_some() {
        return Json(current);
    }
    Json(live::measure(&state).await)
}

async fn active(State(state): State<AppState>) -> Json<live::ActiveSnapshot> {
    Json(state.hub.snapshot())
}

/// The launch as recorded, without env values.
#[derive(Debug, Clone, Serialize)]
pub struct SpecView {
    /// The image.
    pub image: String,
    /// The toolbox it came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub toolbox: Option<String>,
    /// `script` or `agent`.
    pub mode: Value,
    /// The script or goal.
    pub instructions: String,
    /// The names of the env variables (their values are never shown).
    pub env: Vec<String>,
    /// Seconds allowed.
    pub timeout_secs: u32,
    /// CPU and memory.
    pub resources: Value,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Who launched it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requester: Option<String>,
    /// The caller's idempotency key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Everything the detail page shows of a task.
#[derive(Debug, Clone, Serialize)]
pub struct TaskDocument {
    /// The current view.
    pub task: TaskView,
    /// The timeline.
    pub history: Option<HistoryView>,
    /// The launch as accepted (absent for a rejected launch).
    pub spec: Option<SpecView>,
    /// The operator command that replays the task from the event log.
    pub replay_command: String,
}

/// Reads the task's view, history and spec.
pub async fn task_document(state: &AppState, task: TaskId) -> Result<TaskDocument, ApiError> {
    let (view, history) = {
        let views = state.views.read().await;
        let view = views
            .task(task)
            .await
            .map_err(|e| ApiError::unavailable("reading the task view", e))?;
        let history = views
            .history(task)
            .await
            .map_err(|e| ApiError::unavailable("reading the task history", e))?;
        (view, history)
    };
    let view =
        view.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no task {task}")))?;
    let spec = spec(state, &view).await;
    Ok(TaskDocument {
        task: view,
        history,
        spec,
        replay_command: format!("taskpods replay {task}"),
    })
}

async fn spec(state: &AppState, view: &TaskView) -> Option<SpecView> {
    let stream = state.js.get_stream(state.names.event_stream()).await.ok()?;
    let first = log::read_task(
        &stream,
        &state.names,
        view.task,
        view.first_seq,
        view.first_seq,
    )
    .await
    .ok()?;
    let Some(Ok(logged)) = first.into_iter().next() else {
        return None;
    };
    let EventBody::Accepted { spec, .. } = logged.event.body else {
        return None;
    };
    Some(SpecView {
        image: spec.image,
        toolbox: spec.toolbox,
        mode: serde_json::to_value(spec.mode).unwrap_or(Value::Null),
        instructions: spec.instructions,
        env: spec.env.into_keys().collect(),
        timeout_secs: spec.timeout_secs,
        resources: serde_json::to_value(spec.resources).unwrap_or(Value::Null),
        labels: spec.labels,
        requester: spec.requester,
        idempotency_key: spec.idempotency_key,
    })
}

async fn task(
    State(state): State<AppState>,
    Path(task): Path<String>,
) -> Result<Json<TaskDocument>, ApiError> {
    let task = parse_task(&task)?;
    task_document(&state, task).await.map(Json)
}

/// One chunk of output as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct OutputChunk {
    /// Its log stream sequence (the cursor).
    pub seq: u64,
    /// `stdout`, `stderr`, `truncated` or `end`.
    pub stream: &'static str,
    /// The text (invalid UTF-8 replaced).
    pub text: String,
}

impl OutputChunk {
    /// The API's form of a piece.
    pub fn new(seq: u64, piece: &Piece) -> Self {
        let (stream, text) = match piece {
            Piece::Stdout(b) => ("stdout", String::from_utf8_lossy(b).into_owned()),
            Piece::Stderr(b) => ("stderr", String::from_utf8_lossy(b).into_owned()),
            Piece::Truncated(text) => ("truncated", text.clone()),
            Piece::End => ("end", String::new()),
        };
        Self { seq, stream, text }
    }
}

#[derive(Debug, Deserialize)]
struct OutputQuery {
    #[serde(default)]
    after: u64,
    max_bytes: Option<usize>,
}

#[derive(Serialize)]
struct OutputPageDocument {
    chunks: Vec<OutputChunk>,
    next: u64,
    end: bool,
}

async fn output(
    State(state): State<AppState>,
    Path(task): Path<String>,
    query: Result<Query<OutputQuery>, QueryRejection>,
) -> Result<Json<OutputPageDocument>, ApiError> {
    let Query(query) = query.map_err(ApiError::query)?;
    let task = parse_task(&task)?;
    let max = query.max_bytes.unwrap_or(1 << 20).clamp(1, MAX_OUTPUT_PAGE);
    let page = state
        .client
        .output_page(task, query.after, max)
        .await
        .map_err(|e| ApiError::unavailable("reading the output", e))?;
    Ok(Json(OutputPageDocument {
        chunks: page
            .chunks
            .iter()
            .map(|c| OutputChunk::new(c.seq, &c.piece))
            .collect(),
        next: page.next,
        end: page.end,
    }))
}

/// `GET /api/tasks/{task}/output.txt`: the whole stored output as one file (stdout and stderr interleaved
/// as stored, the truncation notice where the cap was reached).
async fn download(
    State(state): State<AppState>,
    Path(task): Path<String>,
) -> Result<Response, ApiError> {
    let task = parse_task(&task)?;
    let client = state.client.clone();
    let pages = futures::stream::unfold(Some(0u64), move |after| {
        let client = client.clone();
        async move {
            let after = after?;
            match client.output_page(task, after, 1 << 20).await {
                Ok(page) => {
                    let done = page.end || page.next == after;
                    let mut bytes = Vec::new();
                    for chunk in page.chunks {
                        match chunk.piece {
                            Piece::Stdout(b) | Piece::Stderr(b) => bytes.extend_from_slice(&b),
                            Piece::Truncated(text) => bytes.extend_from_slice(text.as_bytes()),
                            Piece::End => {}
                        }
                    }
                    let next = (!done).then_some(page.next);
                    Some((Ok::<_, std::io::Error>(bytes), next))
                }
                Err(e) => Some((Err(std::io::Error::other(e)), None)),
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{task}.log\""),
            ),
        ],
        Body::from_stream(pages),
    )
        .into_response())
}

#[derive(Debug, Default, Deserialize)]
struct CancelRequest {
    reason: Option<String>,
}

async fn cancel(
    State(state): State<AppState>,
    Extension(role): Extension<Role>,
    Path(task): Path<String>,
    body: Option<Json<CancelRequest>>,
) -> Result<Json<Value>, Response> {
    if role < Role::Operator {
        return Err(Denied::ReadOnly.into_response());
    }
    let task = parse_task(&task).map_err(IntoResponse::into_response)?;
    let reason = body
        .and_then(|Json(b)| b.reason)
        .unwrap_or_else(|| "cancelled from the web UI".to_owned());
    match state.client.cancel(task, Some(reason)).await {
        Ok(state) => Ok(Json(
            serde_json::json!({ "task": task, "state": state.name() }),
        )),
        Err(e) => {
            let status = match e.kind() {
                ClientErrorKind::Refused => StatusCode::CONFLICT,
                ClientErrorKind::TimedOut => StatusCode::GATEWAY_TIMEOUT,
                ClientErrorKind::Invalid | ClientErrorKind::Rejected => StatusCode::BAD_REQUEST,
                ClientErrorKind::Unreachable | ClientErrorKind::Corrupt => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            };
            Err(ApiError::new(status, e.to_string()).into_response())
        }
    }
}

/// Filters and cursor of `GET /api/history`.
#[derive(Debug, Default, Deserialize)]
pub struct HistoryQuery {
    /// `succeeded`, `failed`, `timed_out`, `cancelled` or `rejected`.
    pub state: Option<String>,
    /// A failure reason code (`non_zero_exit`, `oom_killed`, ...).
    pub reason: Option<String>,
    /// Exactly this requester.
    pub requester: Option<String>,
    /// `key=value`, or `key` for any value.
    pub label: Option<String>,
    /// Finished at or after.
    pub since: Option<DateTime<Utc>>,
    /// Finished at or before.
    pub until: Option<DateTime<Utc>>,
    /// The cursor from the previous page's `next`.
    pub before: Option<u64>,
    /// Rows per page (default 50, at most 200).
    pub limit: Option<usize>,
}

impl HistoryQuery {
    fn matches(&self, v: &FinishedView) -> bool {
        let empty = |o: &Option<String>| o.as_deref().is_none_or(str::is_empty);
        if !empty(&self.state) && self.state.as_deref() != Some(v.state.name()) {
            return false;
        }
        if !empty(&self.reason) {
            let code = match v.state {
                TaskState::Failed { reason } => {
                    let text = reason.to_string();
                    text.split('(').next().unwrap_or_default().to_owned()
                }
                _ => String::new(),
            };
            if self.reason.as_deref() != Some(code.as_str()) {
                return false;
            }
        }
        if !empty(&self.requester) && self.requester != v.requester {
            return false;
        }
        if let Some(label) = self.label.as_deref().filter(|l| !l.is_empty()) {
            let found = match label.split_once('=') {
                Some((k, want)) => v.labels.get(k).is_some_and(|have| have == want),
                None => v.labels.contains_key(label),
            };
            if !found {
                return false;
            }
        }
        let at = v.finished_at;
        if self.since.is_some_and(|s| at.is_none_or(|at| at < s)) {
            return false;
        }
        if self.until.is_some_and(|u| at.is_none_or(|at| at > u)) {
            return false;
        }
        true
    }
}

/// A page of finished tasks.
#[derive(Debug, Serialize)]
pub struct HistoryPage {
    /// Matching tasks, newest first.
    pub tasks: Vec<FinishedView>,
    /// The cursor for older tasks; `null` when there are none.
    pub next: Option<u64>,
    /// How many finished tasks were examined for this page.
    pub scanned: usize,
}

async fn history(
    State(state): State<AppState>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<HistoryPage>, ApiError> {
    let Query(query) = query.map_err(ApiError::query)?;
    let limit = query.limit.unwrap_or(50).clamp(1, MAX_HISTORY_PAGE);
    let views = state.views.read().await;
    let unavailable = |e| ApiError::unavailable("reading the finished view", e);
    let mut cursor = query.before;
    if cursor.is_none()
        && let Some(until) = query.until
    {
        cursor = seek_until(&views, until).await.map_err(unavailable)?;
        if cursor == Some(1) {
            return Ok(Json(HistoryPage {
                tasks: Vec::new(),
                next: None,
                scanned: 0,
            }));
        }
    }
    let mut page = HistoryPage {
        tasks: Vec::new(),
        next: cursor,
        scanned: 0,
    };
    let mut started = false;
    while page.tasks.len() < limit && page.scanned < HISTORY_SCAN_BUDGET {
        if started && page.next.is_none() {
            break;
        }
        started = true;
        // Never read past what the page can hold, so the cursor after a batch is exact.
        let want = (limit - page.tasks.len()).min(HISTORY_SCAN_BUDGET - page.scanned);
        let batch = views
            .finished_page(page.next, want)
            .await
            .map_err(unavailable)?;
        page.scanned += batch.entries.len();
        page.next = batch.next;
        let mut past_since = false;
        for entry in batch.entries {
            if let (Some(since), Some(at)) = (query.since, entry.finished_at)
                && at < since - SINCE_SLACK
            {
                past_since = true;
            }
            if query.matches(&entry) {
                page.tasks.push(entry);
            }
        }
        if past_since {
            page.next = None;
        }
    }
    Ok(Json(page))
}

/// The cursor that starts a newest-first read at the newest task finished at or before `until`: a
/// binary search over the finished index (entries are stored in the order tasks ended), costing about
/// log2(n) reads. `None`: start at the newest; `Some(1)`: nothing finished that early.
async fn seek_until(
    views: &taskpods_projections::Views,
    until: DateTime<Utc>,
) -> Result<Option<u64>, taskpods_projections::buckets::BucketError> {
    let newest = views.finished_page(None, 1).await?;
    let Some(last) = newest.entries.first() else {
        return Ok(None);
    };
    if last.finished_at.is_some_and(|at| at <= until) {
        return Ok(None);
    }
    // Reading one entry with cursor `c` returns the entry at the highest sequence below `c` and, as
    // `next`, that sequence (`None` when it was the first). `low` is always a sequence whose entry (or
    // the gap below it) finished at or before `until`, 0 meaning none; `high` bounds the answer.
    let (mut low, mut high) = (0u64, newest.next.map_or(0, |s| s - 1));
    while low < high {
        let mid = low + (high - low).div_ceil(2);
        let probe = views.finished_page(Some(mid + 1), 1).await?;
        match probe.entries.first() {
            Some(e) if e.finished_at.is_some_and(|at| at > until) => {
                high = probe.next.map_or(low, |s| s.saturating_sub(1).max(low));
            }
            _ => low = mid,
        }
    }
    Ok(Some(low + 1))
}
