//! The web UI in a real headless Chromium (WebDriver), against a real engine (local backend, real agent,
//! real bubblewrap) and nats-server: tasks launched over NATS appear in Active without a reload, output
//! streams in line by line while the elapsed time ticks, ended tasks move to History with their full
//! output (10,000 lines; truncated), cancel from the page, and task output that holds HTML or script is
//! shown as text and runs nothing.
//!
//! Screenshots are taken at 1280×800 and at 420×800; with `TASKPODS_SCREENSHOTS=docs` they are written to
//! `docs/` (that is how the committed ones were made), otherwise to a temporary directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod web;

use std::path::PathBuf;
use std::time::Duration;

use fantoccini::Locator;
use fantoccini::key::Key;
use taskpods_engine::http::HttpConfig;
use taskpods_events::{LaunchTask, TaskId};
use web::{Browser, Stack, get_json};

fn screenshot_dir() -> (PathBuf, Option<tempfile::TempDir>) {
    if std::env::var("TASKPODS_SCREENSHOTS").as_deref() == Ok("docs") {
        (web::docs_dir(), None)
    } else {
        let dir = tempfile::tempdir().unwrap();
        (dir.path().to_owned(), Some(dir))
    }
}

fn row(task: TaskId) -> String {
    format!("#active-rows tr[data-task=\"{task}\"]")
}

/// What the page shows in a fact of the detail page (`Elapsed`, `Exit code`, ...).
fn fact_script(name: &str) -> String {
    format!(
        "const dt = [...document.querySelectorAll('#t-facts dt')].find(d => d.textContent === {name:?});
         return dt ? dt.nextElementSibling.textContent : null;"
    )
}

const INJECTED: &str = "document.querySelector('#t-output script, #t-output img, #t-output b, \
     #t-result img, #active-rows img, #t-facts img') !== null || window.__pwned !== undefined";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tasks_stream_move_to_history_cancel_and_never_run_task_html() {
    let stack = Stack::start(HttpConfig::default()).await;
    let (shots, _keep) = screenshot_dir();
    let browser = Browser::start(1280, 800).await;
    browser.goto(&stack.url("/")).await;
    browser
        .until(
            "the Active page",
            Duration::from_secs(20),
            "return !document.getElementById('page-active').hidden && /generation/.test(document.getElementById('status').textContent)",
        )
        .await;

    // Launched over NATS while the page is open: they appear without a reload.
    let streamer = stack
        .launch_with(LaunchTask {
            timeout_secs: Some(120),
            requester: Some("brain-7".into()),
            labels: [("team".to_owned(), "infra".to_owned())].into(),
            env: [("API_TOKEN".to_owned(), "value-never-shown-1234".to_owned())].into(),
            // Line 1, then lines 2 to 8 only once the test has the task's page open (it drops
            // `/tmp/out/go` in, at most 120 s from now): how many lines came before the page opened no
            // longer depends on the machine's load, so the page always sees the output grow.
            ..LaunchTask::script(
                "line() { echo \"line $1\"; echo \"::progress:: $(($1*12))% step $1\"; echo \"warning $1\" >&2; }; \
                 line 1; n=0; while [ ! -e /tmp/out/go ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n+1)); done; \
                 rm -f /tmp/out/go; for i in $(seq 2 8); do line $i; sleep 0.8; done; \
                 echo '{\"lines\": 8}' > /tmp/result.json",
            )
        })
        .await;
    let long = stack.launch("sleep 120", 180).await;
    let html = stack
        .launch(
            "echo '::progress:: 50% <img src=x onerror=window.__pwned=5>'; \
             echo '<script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=2\"><b>bold</b>'; \
             echo '{\"html\": \"<img src=x onerror=window.__pwned=4>\"}' > /tmp/result.json; sleep 4",
            60,
        )
        .await;
    for task in [streamer, long, html] {
        browser
            .until(
                &format!("task {task} in Active"),
                Duration::from_secs(20),
                &format!("return document.querySelector('{}') !== null", row(task)),
            )
            .await;
    }
    // The progress message holding HTML is shown as text.
    browser
        .until(
            "the HTML progress message as text",
            Duration::from_secs(20),
            &format!(
                "const r = document.querySelector('{}'); return r && r.textContent.includes('<img src=x onerror=window.__pwned=5>');",
                row(html)
            ),
        )
        .await;
    assert_eq!(browser.js(&format!("return {INJECTED};")).await, false);
    // The row says who, what and how far, and its elapsed time ticks.
    let streamer_row = browser
        .until(
            "the streamer running with progress",
            Duration::from_secs(20),
            &format!(
                "const r = document.querySelector('{}'); return r && r.textContent.includes('running') && r.textContent.includes('step') ? r.textContent : null;",
                row(streamer)
            ),
        )
        .await;
    let text = streamer_row.as_str().unwrap();
    assert!(
        text.contains("brain-7") && text.contains("team=infra"),
        "{text}"
    );
    let elapsed = format!(
        "return document.querySelector('{}').cells[3].textContent",
        row(streamer)
    );
    let before = browser.js(&elapsed).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_ne!(browser.js(&elapsed).await, before, "elapsed time ticks");
    browser.screenshot(&shots.join("ui-active.png")).await;

    // Open the streamer with the keyboard: focus its link, press Enter.
    let link = browser
        .client
        .find(Locator::Css(&format!("{} a", row(streamer))))
        .await
        .unwrap();
    link.send_keys(&Key::Enter.to_string()).await.unwrap();
    browser
        .until(
            "the detail page",
            Duration::from_secs(10),
            &format!("return document.getElementById('t-id').textContent === '{streamer}'"),
        )
        .await;
    // The page is open: let the streamer go on (its `/tmp/out`, staged on this machine by its agent).
    let go = taskpods_engine::executor::local::LocalConfig::default()
        .files_dir
        .join(format!("taskpods-files-{streamer}/out/go"));
    std::fs::write(&go, b"").unwrap_or_else(|e| panic!("{}: {e}", go.display()));
    // The output streams in line by line; the elapsed time ticks meanwhile.
    let mut seen = Vec::new();
    let mut elapsed_seen = std::collections::BTreeSet::new();
    let mut shot = false;
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = browser.text("t-output").await;
        let lines = out.lines().filter(|l| l.starts_with("line ")).count();
        if seen.last() != Some(&lines) {
            seen.push(lines);
        }
        if let Some(e) = browser.js(&fact_script("Elapsed")).await.as_str() {
            elapsed_seen.insert(e.to_owned());
        }
        if lines >= 3 && !shot {
            browser.screenshot(&shots.join("ui-task.png")).await;
            shot = true;
        }
        if lines == 8 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "output stopped at {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(
        seen.len() >= 4 && seen.windows(2).all(|w| w[0] < w[1]),
        "the output grew line by line: {seen:?}"
    );
    assert!(elapsed_seen.len() >= 3, "elapsed ticked: {elapsed_seen:?}");
    // Its spec shows env names, never values; stderr is marked as such.
    let spec = browser.text("t-spec").await;
    assert!(
        spec.contains("API_TOKEN") && !spec.contains("value-never-shown-1234"),
        "{spec}"
    );
    assert!(
        !browser
            .text("main")
            .await
            .contains("value-never-shown-1234")
    );
    let stderr = browser
        .js("return [...document.querySelectorAll('#t-output .stderr')].map(e => e.textContent).join('')")
        .await;
    assert!(stderr.as_str().unwrap().contains("warning 1"), "{stderr}");
    // It ends: the page says so without a reload, with the result document and the exit code.
    browser
        .until(
            "succeeded",
            Duration::from_secs(30),
            "return document.getElementById('t-state').dataset.state === 'succeeded'",
        )
        .await;
    assert_eq!(browser.js(&fact_script("Exit code")).await, "0");
    assert!(browser.text("t-result").await.contains("\"lines\": 8"));
    assert!(browser.text("t-timeline").await.contains("succeeded"));
    assert_eq!(
        browser.text("t-replay").await,
        format!("taskpods replay {streamer}")
    );

    // The HTML task's output and result are text; nothing ran.
    browser.goto(&stack.url(&format!("/#/task/{html}"))).await;
    browser
        .until(
            "the HTML task's output",
            Duration::from_secs(20),
            "return document.getElementById('t-output').textContent.includes('<script>window.__pwned=1</script>')",
        )
        .await;
    assert!(
        browser
            .text("t-output")
            .await
            .contains("<img src=x onerror=\"window.__pwned=2\"><b>bold</b>")
    );
    stack.ended(html, Duration::from_secs(30)).await;
    browser
        .until(
            "the HTML result document",
            Duration::from_secs(20),
            "return document.getElementById('t-result').textContent.includes('onerror=window.__pwned=4')",
        )
        .await;
    assert_eq!(browser.js(&format!("return {INJECTED};")).await, false);

    // Cancel from the page.
    browser.goto(&stack.url(&format!("/#/task/{long}"))).await;
    browser
        .until(
            "the cancel button",
            Duration::from_secs(20),
            "const b = document.getElementById('t-cancel'); return !b.hidden && document.getElementById('t-state').dataset.state === 'running';",
        )
        .await;
    browser
        .client
        .find(Locator::Id("t-cancel"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .until(
            "cancelled",
            Duration::from_secs(30),
            "return document.getElementById('t-state').dataset.state === 'cancelled'",
        )
        .await;
    assert!(
        browser
            .text("t-timeline")
            .await
            .contains("cancel_requested")
    );

    // A 10,000-line task and a truncated one end; History lists them; each opens with its full output.
    let many = stack.launch("seq 1 10000 | sed 's/^/row /'", 120).await;
    let truncated = stack
        .launch("head -c 1500000 /dev/zero | tr '\\0' x | fold -w 99", 120)
        .await;
    stack.ended(many, Duration::from_secs(60)).await;
    stack.ended(truncated, Duration::from_secs(60)).await;
    browser
        .client
        .find(Locator::Id("nav-history"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    for task in [streamer, long, html, many, truncated] {
        browser
            .until(
                &format!("{task} in History"),
                Duration::from_secs(20),
                &format!(
                    "return document.querySelector('#h-rows tr[data-task=\"{task}\"]') !== null"
                ),
            )
            .await;
    }
    let truncated_row = browser
        .text_of(&format!("#h-rows tr[data-task=\"{truncated}\"]"))
        .await;
    assert!(
        truncated_row.contains("output truncated"),
        "{truncated_row}"
    );
    // Active no longer lists them.
    let (_, active) = get_json(stack.addr, "/api/active").await;
    assert_eq!(active["tasks"].as_array().unwrap().len(), 0, "{active}");

    browser
        .client
        .find(Locator::Css(&format!("#h-rows tr[data-task=\"{many}\"] a")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let complete = browser
        .until(
            "the 10,000 lines",
            Duration::from_secs(30),
            "const info = document.getElementById('t-output-info').textContent; return info.includes('output complete') ? document.getElementById('t-output').textContent : null;",
        )
        .await;
    let lines: Vec<&str> = complete.as_str().unwrap().lines().collect();
    assert_eq!(lines.len(), 10_000);
    assert_eq!(lines[0], "row 1");
    assert_eq!(lines[9_999], "row 10000");

    browser
        .goto(&stack.url(&format!("/#/task/{truncated}")))
        .await;
    let notice = browser
        .until(
            "the truncation notice",
            Duration::from_secs(30),
            "const n = document.querySelector('#t-output .truncated'); return n && document.getElementById('t-output-info').textContent.includes('output complete') ? n.textContent : null;",
        )
        .await;
    assert!(notice.as_str().unwrap().contains("truncated"), "{notice}");
    let shown = browser.text("t-output").await;
    let stored = shown.len() - notice.as_str().unwrap().len();
    assert!(
        stored as u64 <= web::OUTPUT_CAP + 1 && stored as u64 > web::OUTPUT_CAP - 200,
        "the page shows what was stored up to the cap: {stored} characters"
    );
    assert_eq!(browser.js(&format!("return {INJECTED};")).await, false);

    // The narrow window: the same pages stay readable (one card per task).
    browser.client.set_window_size(420, 800).await.unwrap();
    browser.goto(&stack.url("/#/history")).await;
    browser
        .until(
            "History on a narrow window",
            Duration::from_secs(20),
            "return document.querySelectorAll('#h-rows tr').length >= 5",
        )
        .await;
    browser
        .screenshot(&shots.join("ui-history-narrow.png"))
        .await;
    browser
        .goto(&stack.url(&format!("/#/task/{streamer}")))
        .await;
    browser
        .until(
            "the detail on a narrow window",
            Duration::from_secs(20),
            "return document.getElementById('t-output-info').textContent.includes('output complete')",
        )
        .await;
    browser.screenshot(&shots.join("ui-task-narrow.png")).await;
}

/// Fetches the link of the file row `path` in table `table` the way a click would (same origin, the
/// page's cookies) and returns its status, headers, attributes and bytes.
const FETCH_LINK: &str = "const [table, path, done] = arguments;
     const row = [...document.querySelectorAll(`#${table} tr`)].find(r => r.dataset.path === path);
     if (!row) { done({ error: 'no row ' + path }); return; }
     const a = row.querySelector('a');
     fetch(a.href, { credentials: 'same-origin' }).then(async (r) => done({
       status: r.status,
       type: r.headers.get('content-type'),
       disposition: r.headers.get('content-disposition'),
       download: a.getAttribute('download'),
       href: a.getAttribute('href'),
       bytes: Array.from(new Uint8Array(await r.arrayBuffer())),
     })).catch((e) => done({ error: String(e) }));";

fn bytes_of(fetched: &serde_json::Value) -> Vec<u8> {
    fetched["bytes"]
        .as_array()
        .unwrap_or_else(|| panic!("no bytes: {fetched}"))
        .iter()
        .map(|b| b.as_u64().unwrap() as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_inputs_and_artifacts_are_listed_and_download_byte_exact() {
    let stack = Stack::start(HttpConfig::default()).await;
    let files = stack.files_task().await;
    let task = files.task;
    let stored = stack.client.artifacts(task).await.unwrap();
    let (shots, _keep) = screenshot_dir();
    let browser = Browser::start(1280, 800).await;
    browser.goto(&stack.url(&format!("/#/task/{task}"))).await;
    let paths = browser
        .until(
            "the artifacts",
            Duration::from_secs(30),
            "const rows = [...document.querySelectorAll('#t-artifacts tr')]; \
             return rows.length === 4 ? rows.map(r => r.dataset.path) : null;",
        )
        .await;
    assert_eq!(paths, serde_json::json!(web::FILES_ARTIFACTS));
    // Each row shows the path, the size and the digest the object store recorded.
    let rows = browser
        .js("return [...document.querySelectorAll('#t-artifacts tr')].map(r => [...r.cells].map(c => c.textContent));")
        .await;
    for (row, artifact) in rows.as_array().unwrap().iter().zip(&stored) {
        assert_eq!(row[0], artifact.path.as_str());
        assert!(
            row[1]
                .as_str()
                .unwrap()
                .contains(&format!("{} ", artifact.size))
                || row[1] == format!("{} B", artifact.size),
            "{row} {artifact:?}"
        );
        assert_eq!(row[2], artifact.digest.as_str());
    }
    let inputs = browser.text("t-inputs").await;
    assert!(
        inputs.contains("data.bin")
            && inputs.contains("307200 bytes")
            && inputs.contains("SHA-256="),
        "{inputs}"
    );
    assert!(
        browser.text("t-files-info").await.contains("4 artifacts"),
        "{}",
        browser.text("t-files-info").await
    );
    browser
        .js("document.getElementById('t-files').scrollIntoView(); return true;")
        .await;
    browser.screenshot(&shots.join("ui-files.png")).await;

    // Following a link returns the exact bytes, as an attachment named after the file.
    let fetch = |table: &'static str, path: &'static str| {
        let client = browser.client.clone();
        async move {
            client
                .execute_async(FETCH_LINK, vec![table.into(), path.into()])
                .await
                .expect("the fetch script")
        }
    };
    let copy = fetch("t-artifacts", "copy.bin").await;
    assert_eq!(copy["status"], 200, "{}", copy["error"]);
    assert!(
        bytes_of(&copy) == files.input,
        "copy.bin differs from the input"
    );
    assert_eq!(copy["download"], "copy.bin");
    assert_eq!(
        copy["href"],
        format!("/api/tasks/{task}/artifacts/copy.bin")
    );
    let input = fetch("t-inputs", "data.bin").await;
    assert_eq!(input["status"], 200, "{}", input["error"]);
    assert!(bytes_of(&input) == files.input, "the input differs");
    let report = fetch("t-artifacts", "sub/dir/report.txt").await;
    assert_eq!(bytes_of(&report), b"report line\n");
    assert_eq!(report["download"], "report.txt");
    let empty = fetch("t-artifacts", "empty.dat").await;
    assert_eq!(
        (empty["status"].clone(), bytes_of(&empty).len()),
        (200.into(), 0)
    );
    // The hostile name is one encoded URL component per path component, its bytes are served as an
    // inert attachment, and nothing of it ran in the page.
    let html = fetch("t-artifacts", "we\"ird é.html").await;
    assert_eq!(
        html["href"],
        format!("/api/tasks/{task}/artifacts/we%22ird%20%C3%A9.html")
    );
    assert_eq!(bytes_of(&html), web::HOSTILE_HTML.as_bytes());
    assert_eq!(html["type"], "application/octet-stream");
    assert!(
        html["disposition"]
            .as_str()
            .unwrap()
            .starts_with("attachment;"),
        "{html}"
    );
    assert_eq!(browser.js(&format!("return {INJECTED};")).await, false);
}
