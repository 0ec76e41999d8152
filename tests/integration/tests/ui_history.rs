//! History over 1,000 finished tasks, through the API and in headless Chromium: newest first, paged
//! with a cursor (each page a bounded number of reads), filtered by state, reason, requester, label and
//! time, and the filtered page is a link that opens the same rows when pasted.
//!
//! The tasks' events are appended straight to the event stream (the real projector folds them), so the
//! thousand tasks take seconds; the expected answers are computed from how they were made.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod web;

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use taskpods_events::{EventBody, FailureReason, TaskId, TaskOutcome};
use taskpods_projections::generate;
use web::{Browser, ViewsOnly, get_json};

const TASKS: usize = 1_000;
const TEAMS: [&str; 3] = ["red", "blue", "green"];

fn task(i: usize) -> TaskId {
    TaskId::from_idempotency_key(&format!("history-{i}"))
}

fn outcome(exit_code: i32) -> TaskOutcome {
    TaskOutcome {
        exit_code,
        duration_ms: 900,
        stdout_bytes: 10,
        stderr_bytes: 0,
        output_truncated: false,
        result: None,
        output_tail: None,
        ..TaskOutcome::default()
    }
}

/// How task `i` ends: succeeded, failed with exit 2, failed out of memory, timed out, in turn.
fn end(i: usize) -> EventBody {
    match i % 4 {
        0 => EventBody::Succeeded {
            outcome: outcome(0),
        },
        1 => EventBody::Failed {
            reason: FailureReason::NonZeroExit { exit_code: 2 },
            message: Some("exit 2".into()),
            outcome: Some(outcome(2)),
        },
        2 => EventBody::Failed {
            reason: FailureReason::OomKilled,
            message: Some("over its memory limit".into()),
            outcome: None,
        },
        _ => EventBody::TimedOut {
            detected_by: Some("timer".into()),
        },
    }
}

fn finished_at(base: DateTime<Utc>, i: usize) -> DateTime<Utc> {
    base + TimeDelta::seconds(2 * i as i64) + TimeDelta::seconds(1)
}

/// The ids of the tasks matching `keep`, newest first (tasks ended in index order).
fn expected(keep: impl Fn(usize) -> bool) -> Vec<String> {
    (0..TASKS)
        .rev()
        .filter(|&i| keep(i))
        .map(|i| task(i).to_string())
        .collect()
}

async fn page_ids(stack: &ViewsOnly, query: &str) -> (Vec<String>, Option<u64>, u64) {
    let (status, page) = get_json(stack.addr, &format!("/api/history?{query}")).await;
    assert_eq!(status, 200, "{page}");
    let ids = page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task"].as_str().unwrap().to_owned())
        .collect();
    (
        ids,
        page["next"].as_u64(),
        page["scanned"].as_u64().unwrap(),
    )
}

/// Every page of `query`, following `next`; asserts each request stayed within the scan budget.
async fn all_pages(stack: &ViewsOnly, query: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let q = match before {
            Some(b) => format!("{query}&before={b}"),
            None => query.to_owned(),
        };
        let (ids, next, scanned) = page_ids(stack, &q).await;
        assert!(scanned <= 2_000, "a page examined {scanned} tasks");
        out.extend(ids);
        match next {
            Some(n) => before = Some(n),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_and_filters_a_thousand_finished_tasks() {
    let stack = ViewsOnly::start().await;
    let base = Utc::now() - TimeDelta::hours(3);
    let mut events = Vec::new();
    for i in 0..TASKS {
        let mut spec = generate::spec(i as u64);
        spec.requester = Some(format!("brain-{}", i % 5));
        spec.labels = [("team".to_owned(), TEAMS[i % 3].to_owned())].into();
        let at = base + TimeDelta::seconds(2 * i as i64);
        events.extend(web::synthetic_task(task(i), spec, at, Some(end(i))));
    }
    stack.publish(&events).await;

    // The API: everything, newest first, in pages of 200.
    assert_eq!(all_pages(&stack, "limit=200").await, expected(|_| true));
    // Filters, alone and together.
    assert_eq!(
        all_pages(&stack, "state=failed&limit=200").await,
        expected(|i| i % 4 == 1 || i % 4 == 2)
    );
    assert_eq!(
        all_pages(
            &stack,
            "state=failed&reason=oom_killed&label=team=red&limit=50"
        )
        .await,
        expected(|i| i % 4 == 2 && i % 3 == 0)
    );
    assert_eq!(
        all_pages(&stack, "requester=brain-3&label=team&limit=100").await,
        expected(|i| i % 5 == 3)
    );
    let since = finished_at(base, 400).to_rfc3339();
    let until = finished_at(base, 500).to_rfc3339();
    let query = format!(
        "state=timed_out&since={}&until={}",
        urlencode(&since),
        urlencode(&until)
    );
    assert_eq!(
        all_pages(&stack, &query).await,
        expected(|i| (400..=500).contains(&i) && i % 4 == 3)
    );
    // `until` starts the read near the answer instead of scanning from the newest.
    let (ids, _, scanned) =
        page_ids(&stack, &format!("until={}&limit=10", urlencode(&until))).await;
    assert_eq!(ids, expected(|i| i <= 500)[..10].to_vec());
    assert_eq!(scanned, 10);
    let (none, next, _) = page_ids(&stack, "until=2000-01-01T00:00:00Z").await;
    assert!(none.is_empty() && next.is_none());

    // The page: newest first, then older pages.
    let browser = Browser::start(1280, 800).await;
    browser.goto(&stack.url("/#/history")).await;
    let first_row =
        "const r = document.querySelector('#h-rows tr'); return r ? r.dataset.task : null;";
    browser
        .until(
            "the newest 50",
            Duration::from_secs(20),
            "return document.querySelectorAll('#h-rows tr').length === 50",
        )
        .await;
    assert_eq!(browser.js(first_row).await, task(TASKS - 1).to_string());
    if std::env::var("TASKPODS_SCREENSHOTS").as_deref() == Ok("docs") {
        browser
            .screenshot(&web::docs_dir().join("ui-history.png"))
            .await;
    }
    for page in 1..=2 {
        browser
            .client
            .find(fantoccini::Locator::Id("h-older"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let want = task(TASKS - 1 - 50 * page).to_string();
        browser
            .until(
                &format!("page {page}"),
                Duration::from_secs(20),
                &format!("return document.querySelector('#h-rows tr').dataset.task === '{want}'"),
            )
            .await;
    }
    // Filters from the form.
    browser
        .js("document.getElementById('h-state').value = 'failed';
             document.getElementById('h-reason').value = 'oom_killed';
             document.getElementById('h-label').value = 'team=red';")
        .await;
    browser
        .client
        .find(fantoccini::Locator::Id("h-apply"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let want = expected(|i| i % 4 == 2 && i % 3 == 0);
    let rows = "return [...document.querySelectorAll('#h-rows tr')].map(r => r.dataset.task)";
    browser
        .until(
            "the filtered rows",
            Duration::from_secs(20),
            &format!("return document.querySelector('#h-rows tr') && document.querySelector('#h-rows tr').dataset.task === '{}'", want[0]),
        )
        .await;
    let shown: Vec<String> = serde_json::from_value(browser.js(rows).await).unwrap();
    assert_eq!(shown, want[..50].to_vec());
    let states = browser
        .js("return [...document.querySelectorAll('#h-rows tr [data-state]')].map(c => c.parentElement.textContent)")
        .await;
    assert!(
        states
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s.as_str().unwrap().contains("failed")
                && s.as_str().unwrap().contains("oom_killed")),
        "every row says failed with its reason in words: {states}"
    );
    // The link pastes: a fresh page at the same URL shows the same rows.
    let link = browser.client.current_url().await.unwrap().to_string();
    assert!(
        link.contains("reason=oom_killed") && link.contains("label=team%3Dred"),
        "{link}"
    );
    let other = Browser::start(1280, 800).await;
    other.goto(&link).await;
    other
        .until(
            "the pasted link's rows",
            Duration::from_secs(20),
            "return document.querySelectorAll('#h-rows tr').length === 50",
        )
        .await;
    let pasted: Vec<String> = serde_json::from_value(other.js(rows).await).unwrap();
    assert_eq!(pasted, shown);
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}
