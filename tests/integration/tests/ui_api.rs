//! The JSON API against its documentation (`docs/API.md`), and its access rules attacked from outside:
//! every answer of every endpoint is compared with the document's object tables (no required field
//! missing, no undocumented field, every type as written); requests without the right token, from a
//! foreign `Host`, or without the anti-forgery header change nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod web;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use taskpods_engine::http::{HttpConfig, HttpError, HttpServer};
use taskpods_events::{LaunchTask, TaskId};
use web::{Stack, get_json, request, sse};

/// One documented field.
#[derive(Debug)]
struct Field {
    ty: String,
    required: bool,
}

/// The object tables of docs/API.md: object name → field → type and whether it is required.
fn documented() -> BTreeMap<String, BTreeMap<String, Field>> {
    let text = std::fs::read_to_string(web::docs_dir().join("API.md")).unwrap();
    let mut objects = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("### `") {
            current = Some(name.trim_end_matches('`').to_owned());
            objects.insert(current.clone().unwrap(), BTreeMap::new());
            continue;
        }
        let Some(object) = &current else { continue };
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 5 || !cells[1].starts_with('`') {
            continue;
        }
        objects.get_mut(object).unwrap().insert(
            cells[1].trim_matches('`').to_owned(),
            Field {
                ty: cells[2].to_owned(),
                required: cells[3] == "yes",
            },
        );
    }
    assert!(objects.len() > 10, "docs/API.md has its object tables");
    objects
}

/// Every way `value` (at `path`) differs from the documented `object`.
fn check(
    docs: &BTreeMap<String, BTreeMap<String, Field>>,
    object: &str,
    value: &Value,
    path: &str,
    problems: &mut Vec<String>,
) {
    let Some(fields) = docs.get(object) else {
        problems.push(format!("{path}: object `{object}` is not documented"));
        return;
    };
    let Some(map) = value.as_object() else {
        problems.push(format!("{path}: expected object `{object}`, got {value}"));
        return;
    };
    for (name, field) in fields {
        match map.get(name) {
            None | Some(Value::Null) if field.required => {
                problems.push(format!("{path}.{name}: required by the docs, missing"));
            }
            None | Some(Value::Null) => {}
            Some(v) => check_type(docs, &field.ty, v, &format!("{path}.{name}"), problems),
        }
    }
    for name in map.keys() {
        if !fields.contains_key(name) {
            problems.push(format!("{path}.{name}: not in the docs of `{object}`"));
        }
    }
}

fn check_type(
    docs: &BTreeMap<String, BTreeMap<String, Field>>,
    ty: &str,
    value: &Value,
    path: &str,
    problems: &mut Vec<String>,
) {
    let ok = match ty {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "any" => true,
        "map of string" => value
            .as_object()
            .is_some_and(|m| m.values().all(Value::is_string)),
        _ => {
            if let Some(inner) = ty.strip_prefix("array of ") {
                match value.as_array() {
                    Some(items) => {
                        for (i, item) in items.iter().enumerate() {
                            check_type(docs, inner, item, &format!("{path}[{i}]"), problems);
                        }
                    }
                    None => problems.push(format!("{path}: expected {ty}, got {value}")),
                }
                return;
            }
            check(docs, ty.trim_matches('`'), value, path, problems);
            return;
        }
    };
    if !ok {
        problems.push(format!("{path}: expected {ty}, got {value}"));
    }
}

/// Asserts that `value` is the documented `object`.
fn conforms(
    docs: &BTreeMap<String, BTreeMap<String, Field>>,
    object: &str,
    value: &Value,
    what: &str,
) {
    let mut problems = Vec::new();
    check(docs, object, value, what, &mut problems);
    assert!(
        problems.is_empty(),
        "{what} differs from docs/API.md:\n{}",
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_is_what_docs_api_md_says() {
    let docs = documented();
    let stack = Stack::start(HttpConfig::default()).await;
    let addr = stack.addr;
    let finished = stack
        .launch_with(LaunchTask {
            timeout_secs: Some(60),
            requester: Some("brain-1".into()),
            labels: [("team".to_owned(), "red".to_owned())].into(),
            env: [("SECRET".to_owned(), "hunter2-value".to_owned())].into(),
            ..LaunchTask::script(
                "echo '::progress:: 50% half'; echo out; echo err >&2; \
                 echo '{\"answer\": [1, 2]}' > /tmp/result.json",
            )
        })
        .await;
    let failed = stack.launch("echo bye; exit 3", 60).await;
    let rejected = TaskId::mint();
    let refused = stack
        .client
        .launch(LaunchTask {
            task_id: Some(rejected.0),
            timeout_secs: Some(999_999),
            ..LaunchTask::script("true")
        })
        .await;
    assert!(refused.is_err(), "an over-long timeout is rejected");
    let running = stack
        .launch_with(LaunchTask {
            timeout_secs: Some(120),
            labels: [("team".to_owned(), "blue".to_owned())].into(),
            ..LaunchTask::script("echo '::progress:: 10% waiting'; sleep 100")
        })
        .await;
    stack.ended(finished, Duration::from_secs(30)).await;
    stack.ended(failed, Duration::from_secs(30)).await;

    let (status, who) = get_json(addr, "/api/whoami").await;
    assert_eq!(status, 200);
    conforms(&docs, "WhoAmI", &who, "whoami");
    assert_eq!(who["role"], "operator");

    // The running task is in the active list with its progress.
    let active = {
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (_, active) = get_json(addr, "/api/active").await;
            if active["tasks"][0]["state"] == "running"
                && active["tasks"][0]["progress"].is_object()
            {
                break active;
            }
            assert!(tokio::time::Instant::now() < until, "{active}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    conforms(&docs, "ActiveSnapshot", &active, "active");
    assert_eq!(active["tasks"][0]["task"], running.to_string());

    let (_, status_doc) = get_json(addr, "/api/status").await;
    conforms(&docs, "Status", &status_doc, "status");
    assert_eq!(status_doc["engine"]["state"], "up");

    let (_, history) = get_json(addr, "/api/history").await;
    conforms(&docs, "HistoryPage", &history, "history");
    let listed: Vec<&str> = history["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task"].as_str().unwrap())
        .collect();
    for task in [finished, failed, rejected] {
        assert!(
            listed.contains(&task.to_string().as_str()),
            "{task} in {listed:?}"
        );
    }

    for task in [finished, failed, rejected, running] {
        let (status, doc) = get_json(addr, &format!("/api/tasks/{task}")).await;
        assert_eq!(status, 200, "{doc}");
        conforms(&docs, "TaskDocument", &doc, &format!("task {task}"));
        let (status, page) = get_json(addr, &format!("/api/tasks/{task}/output")).await;
        assert_eq!(status, 200, "{page}");
        conforms(&docs, "OutputPage", &page, &format!("output of {task}"));
    }
    let (_, doc) = get_json(addr, &format!("/api/tasks/{finished}")).await;
    assert_eq!(doc["spec"]["env"], serde_json::json!(["SECRET"]));
    assert_eq!(doc["task"]["result"]["answer"], serde_json::json!([1, 2]));
    let raw = request(addr, "GET", &format!("/api/tasks/{finished}"), &[], b"").await;
    assert!(
        !String::from_utf8_lossy(&raw.body).contains("hunter2-value"),
        "env values are never returned"
    );
    let (_, doc) = get_json(addr, &format!("/api/tasks/{rejected}")).await;
    assert_eq!(doc["task"]["state"], "rejected");
    assert!(doc["spec"].is_null());

    // The output: a page, and the download.
    let (_, page) = get_json(addr, &format!("/api/tasks/{finished}/output")).await;
    let streams: Vec<&str> = page["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["stream"].as_str().unwrap())
        .collect();
    assert!(
        streams.contains(&"stdout") && streams.contains(&"stderr"),
        "{streams:?}"
    );
    assert_eq!(page["end"], true);
    let download = request(
        addr,
        "GET",
        &format!("/api/tasks/{finished}/output.txt"),
        &[],
        b"",
    )
    .await;
    assert_eq!(download.status, 200);
    assert!(
        download
            .header("content-disposition")
            .unwrap()
            .contains("attachment")
    );
    let text = String::from_utf8(download.body).unwrap();
    assert!(text.contains("out\n") && text.contains("err\n"), "{text:?}");

    // The live streams.
    let events = sse(addr, "/api/live", Duration::from_secs(10), |e| {
        e.iter().any(|(n, _)| n == "snapshot") && e.iter().any(|(n, _)| n == "status")
    })
    .await;
    for (name, data) in &events {
        match name.as_str() {
            "snapshot" => conforms(&docs, "ActiveSnapshot", data, "live snapshot"),
            "status" => conforms(&docs, "Status", data, "live status"),
            "upsert" => conforms(&docs, "ActiveView", data, "live upsert"),
            "remove" => conforms(&docs, "Removed", data, "live remove"),
            other => panic!("undocumented event {other}"),
        }
    }
    let events = sse(
        addr,
        &format!("/api/tasks/{finished}/live?after=0"),
        Duration::from_secs(10),
        |e| e.iter().any(|(n, _)| n == "done"),
    )
    .await;
    assert!(events.iter().any(|(n, _)| n == "done"), "{events:?}");
    for (name, data) in &events {
        match name.as_str() {
            "task" => conforms(&docs, "TaskDocument", data, "task live"),
            "output" => conforms(&docs, "OutputChunk", data, "task output"),
            "done" => {}
            other => panic!("undocumented event {other}"),
        }
    }

    // Cancel, and the errors.
    let answer = request(
        addr,
        "POST",
        &format!("/api/tasks/{running}/cancel"),
        &[
            ("X-Taskpods-Request", "1"),
            ("Content-Type", "application/json"),
        ],
        br#"{"reason": "from the API test"}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.json());
    conforms(&docs, "Cancelled", &answer.json(), "cancel");
    stack.ended(running, Duration::from_secs(30)).await;
    let again = request(
        addr,
        "POST",
        &format!("/api/tasks/{running}/cancel"),
        &[("X-Taskpods-Request", "1")],
        b"",
    )
    .await;
    assert_eq!(again.status, 409, "cancelling an ended task is refused");
    conforms(&docs, "Error", &again.json(), "refused cancel");
    for (path, code) in [
        ("/api/tasks/not-a-uuid", 400),
        (&*format!("/api/tasks/{}", TaskId::mint()), 404),
        ("/api/history?since=yesterday", 400),
    ] {
        let answer = request(addr, "GET", path, &[], b"").await;
        assert_eq!(answer.status, code, "{path}");
        conforms(&docs, "Error", &answer.json(), path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_foreign_hosts_and_forged_posts_get_nothing() {
    let stack = Stack::start(HttpConfig::default()).await;
    let addr = stack.addr;
    let task = stack.launch("sleep 60", 90).await;
    // A page that rebinds its DNS name to 127.0.0.1 sends its own name as Host.
    let rebound = request(
        addr,
        "GET",
        "/api/active",
        &[("Host", "attacker.example:8080")],
        b"",
    )
    .await;
    assert_eq!(rebound.status, 403);
    assert!(!String::from_utf8_lossy(&rebound.body).contains(&task.to_string()));
    // A cross-site form post cannot set the anti-forgery header.
    let forged = request(
        addr,
        "POST",
        &format!("/api/tasks/{task}/cancel"),
        &[("Content-Type", "text/plain")],
        b"",
    )
    .await;
    assert_eq!(forged.status, 403);
    // Nor can such a page list or download a task's files.
    for path in [
        format!("/api/tasks/{task}/files"),
        format!("/api/tasks/{task}/artifacts/report.txt"),
        format!("/api/tasks/{task}/inputs/data.csv"),
    ] {
        let answer = request(
            addr,
            "GET",
            &path,
            &[("Host", "attacker.example:8080")],
            b"",
        )
        .await;
        assert_eq!(answer.status, 403, "{path}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, doc) = get_json(addr, &format!("/api/tasks/{task}")).await;
    assert!(
        doc["task"]["cancel"].is_null(),
        "no cancel was recorded: {doc}"
    );
    // The page's policy forbids inline script and other origins.
    let page = request(addr, "GET", "/", &[], b"").await;
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_let_readers_read_and_only_operators_cancel() {
    let stack = Stack::start(HttpConfig {
        read_token: Some("reader-token-1".into()),
        operator_token: Some("operator-token-2".into()),
        ..HttpConfig::default()
    })
    .await;
    let addr = stack.addr;
    let task = stack.launch("sleep 60", 90).await;
    let path = format!("/api/tasks/{task}");
    assert_eq!(request(addr, "GET", &path, &[], b"").await.status, 401);
    let wrong = [("Authorization", "Bearer reader-token-X")];
    assert_eq!(request(addr, "GET", &path, &wrong, b"").await.status, 401);
    let reader = [("Authorization", "Bearer reader-token-1")];
    assert_eq!(request(addr, "GET", &path, &reader, b"").await.status, 200);
    let cancel = format!("/api/tasks/{task}/cancel");
    let denied = request(
        addr,
        "POST",
        &cancel,
        &[
            ("Authorization", "Bearer reader-token-1"),
            ("X-Taskpods-Request", "1"),
        ],
        b"",
    )
    .await;
    assert_eq!(denied.status, 403);
    let (_, doc) = {
        let answer = request(addr, "GET", &path, &reader, b"").await;
        (answer.status, answer.json())
    };
    assert!(
        doc["task"]["cancel"].is_null(),
        "a reader's cancel changed nothing: {doc}"
    );
    // The page's sign-in: the token becomes an HttpOnly, SameSite=Strict cookie.
    let session = request(
        addr,
        "POST",
        "/api/session",
        &[
            ("X-Taskpods-Request", "1"),
            ("Content-Type", "application/json"),
        ],
        br#"{"token": "operator-token-2"}"#,
    )
    .await;
    assert_eq!(session.status, 200);
    let cookie = session.header("set-cookie").unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();
    let bad = request(
        addr,
        "POST",
        "/api/session",
        &[
            ("X-Taskpods-Request", "1"),
            ("Content-Type", "application/json"),
        ],
        br#"{"token": "guess"}"#,
    )
    .await;
    assert_eq!(bad.status, 401);
    assert!(bad.header("set-cookie").is_none());
    let done = request(
        addr,
        "POST",
        &cancel,
        &[("Cookie", &pair), ("X-Taskpods-Request", "1")],
        b"",
    )
    .await;
    assert_eq!(done.status, 200, "{:?}", done.json());
    assert_eq!(
        stack.ended(task, Duration::from_secs(30)).await["task"]["state"],
        "cancelled"
    );
}

#[tokio::test]
async fn a_non_loopback_address_without_a_token_is_refused() {
    let refused = HttpServer::bind(HttpConfig {
        bind: "0.0.0.0:0".parse().unwrap(),
        ..HttpConfig::default()
    })
    .await;
    assert!(
        matches!(refused, Err(HttpError::Exposed { .. })),
        "{refused:?}"
    );
    let allowed = HttpServer::bind(HttpConfig {
        bind: "0.0.0.0:0".parse().unwrap(),
        read_token: Some("t".into()),
        ..HttpConfig::default()
    })
    .await;
    assert!(allowed.is_ok());
}

/// The artifact list and downloads with a read token, and every way an attacker could phrase a URL to
/// reach another object: `..` raw and encoded, absolute paths, NUL and CR/LF, a task id that is not one,
/// another task's input by name, a task the views do not know. None of them returns a byte of the other
/// task's input, and the same input is served to its own task (so the refusals mean something).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_download_byte_exact_and_hostile_urls_reach_no_other_object() {
    let docs = documented();
    let stack = Stack::start(HttpConfig {
        read_token: Some("reader-token-1".into()),
        ..HttpConfig::default()
    })
    .await;
    let addr = stack.addr;
    let reader = [("Authorization", "Bearer reader-token-1")];
    // A task that times out after writing an artifact: it reports no outcome, its files come from the
    // bucket.
    let late = stack
        .launch("echo late > /tmp/out/late.txt; sleep 60", 2)
        .await;
    let files = stack.files_task().await;
    let task = files.task;
    const SECRET: &str = "top secret input of another task";
    let other = TaskId::mint();
    let secret = stack
        .client
        .put_input(other, "secret.txt", &mut SECRET.as_bytes())
        .await
        .unwrap();
    stack
        .launch_with(LaunchTask {
            task_id: Some(other.0),
            inputs: vec![secret],
            ..LaunchTask::script("true")
        })
        .await;
    let unknown = TaskId::mint();
    stack
        .client
        .put_input(unknown, "x", &mut SECRET.as_bytes())
        .await
        .unwrap();

    // Without the token: nothing.
    for path in [
        format!("/api/tasks/{task}/files"),
        format!("/api/tasks/{task}/artifacts/copy.bin"),
        format!("/api/tasks/{task}/inputs/data.bin"),
    ] {
        let answer = request(addr, "GET", &path, &[], b"").await;
        assert_eq!(answer.status, 401, "{path}");
        assert!(
            answer.body.len() < 200,
            "{path}: {} bytes",
            answer.body.len()
        );
    }

    // The list: documented, the artifacts as the object store has them.
    let listed = request(
        addr,
        "GET",
        &format!("/api/tasks/{task}/files"),
        &reader,
        b"",
    )
    .await;
    assert_eq!(listed.status, 200);
    let listed = listed.json();
    conforms(&docs, "Files", &listed, "GET /api/tasks/{task}/files");
    assert_eq!(listed["artifacts_from"], "outcome");
    let stored = stack.client.artifacts(task).await.unwrap();
    assert_eq!(
        stored.iter().map(|a| a.path.as_str()).collect::<Vec<_>>(),
        web::FILES_ARTIFACTS
    );
    assert_eq!(listed["artifacts"], serde_json::to_value(&stored).unwrap());
    assert_eq!(listed["inputs"][0]["name"], "data.bin");
    assert_eq!(listed["inputs"][0]["size"], files.input.len());

    // Downloads: exact bytes, an attachment with its name, an inert type.
    let url = |path: &str| format!("/api/tasks/{task}/artifacts/{path}");
    let copy = request(addr, "GET", &url("copy.bin"), &reader, b"").await;
    assert_eq!(copy.status, 200);
    assert!(
        copy.body == files.input,
        "copy.bin is the input, byte for byte"
    );
    assert_eq!(
        copy.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(
        copy.header("content-disposition"),
        Some("attachment; filename=\"copy.bin\"; filename*=UTF-8''copy.bin")
    );
    assert_eq!(copy.header("x-content-type-options"), Some("nosniff"));
    let input = request(
        addr,
        "GET",
        &format!("/api/tasks/{task}/inputs/data.bin"),
        &reader,
        b"",
    )
    .await;
    assert_eq!(input.status, 200);
    assert!(input.body == files.input, "the input, byte for byte");
    let empty = request(addr, "GET", &url("empty.dat"), &reader, b"").await;
    assert_eq!((empty.status, empty.body.len()), (200, 0));
    let report = request(addr, "GET", &url("sub/dir/report.txt"), &reader, b"").await;
    assert_eq!(report.status, 200);
    assert_eq!(report.body, b"report line\n");
    assert_eq!(
        report.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    let html = request(addr, "GET", &url("we%22ird%20%C3%A9.html"), &reader, b"").await;
    assert_eq!(html.status, 200);
    assert_eq!(html.body, web::HOSTILE_HTML.as_bytes());
    assert_eq!(
        html.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(html.header("content-security-policy"), Some("sandbox"));
    assert_eq!(
        html.header("content-disposition"),
        Some("attachment; filename=\"we_ird _.html\"; filename*=UTF-8''we%22ird%20%C3%A9.html")
    );

    // The other task's input is served to a reader under its own task, and under no other name.
    let own = request(
        addr,
        "GET",
        &format!("/api/tasks/{other}/inputs/secret.txt"),
        &reader,
        b"",
    )
    .await;
    assert_eq!((own.status, own.body.as_slice()), (200, SECRET.as_bytes()));
    let hostile = [
        (format!("/api/tasks/{task}/artifacts/../in/data.bin"), 400),
        (
            format!("/api/tasks/{task}/artifacts/..%2F..%2F{other}%2Fin%2Fsecret.txt"),
            400,
        ),
        (
            format!("/api/tasks/{task}/artifacts/../../{other}/in/secret.txt"),
            400,
        ),
        (
            format!("/api/tasks/{task}/artifacts/sub%2F..%2F..%2Fin%2Fdata.bin"),
            400,
        ),
        (format!("/api/tasks/{task}/artifacts/%2Fetc%2Fpasswd"), 400),
        (format!("/api/tasks/{task}/artifacts//etc/passwd"), 400),
        (
            format!("/api/tasks/{task}/artifacts/sub//dir/report.txt"),
            400,
        ),
        (format!("/api/tasks/{task}/artifacts/copy.bin%00.txt"), 400),
        (
            format!("/api/tasks/{task}/artifacts/copy.bin%0D%0AX-Evil:%201"),
            400,
        ),
        (format!("/api/tasks/{task}/artifacts/%FF"), 400),
        (format!("/api/tasks/..%2F{other}/artifacts/x"), 400),
        (format!("/api/tasks/{other}%2Fin/inputs/secret.txt"), 400),
        ("/api/tasks/not-a-task/files".to_owned(), 400),
        (format!("/api/tasks/{task}/artifacts/secret.txt"), 404),
        (format!("/api/tasks/{task}/inputs/secret.txt"), 404),
        (
            format!("/api/tasks/{task}/inputs/..%2F..%2F{other}%2Fin%2Fsecret.txt"),
            404,
        ),
        (
            format!("/api/tasks/{task}/inputs/{other}/in/secret.txt"),
            404,
        ),
        (format!("/api/tasks/{unknown}/inputs/x"), 404),
        (format!("/api/tasks/{unknown}/artifacts/x"), 404),
        (format!("/api/tasks/{unknown}/files"), 404),
    ];
    for (path, status) in hostile {
        let answer = request(addr, "GET", &path, &reader, b"").await;
        assert_eq!(answer.status, status, "{path}: {:?}", answer.json());
        let body = String::from_utf8_lossy(&answer.body);
        assert!(
            !body.contains(SECRET) && answer.body.len() < 1000,
            "{path} answered {body}"
        );
        assert!(answer.header("x-evil").is_none(), "{path}");
    }

    // The timed-out task: no outcome, its artifact listed from the bucket and served.
    let end = stack.ended(late, Duration::from_secs(60)).await;
    assert_eq!(end["task"]["state"], "timed_out", "{end}");
    // The agent's flush on SIGTERM may land just after the timeout is recorded.
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let listed = request(
            addr,
            "GET",
            &format!("/api/tasks/{late}/files"),
            &reader,
            b"",
        )
        .await;
        let listed = listed.json();
        if listed["artifacts"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
            || tokio::time::Instant::now() > until
        {
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    conforms(&docs, "Files", &listed, "the files of a timed-out task");
    assert_eq!(listed["artifacts_from"], "bucket", "{listed}");
    assert_eq!(listed["artifacts"][0]["path"], "late.txt", "{listed}");
    let late_file = request(
        addr,
        "GET",
        &format!("/api/tasks/{late}/artifacts/late.txt"),
        &reader,
        b"",
    )
    .await;
    assert_eq!(
        (late_file.status, late_file.body.as_slice()),
        (200, &b"late\n"[..])
    );
}
