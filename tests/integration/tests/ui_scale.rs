//! How the page copes with 1,000 live tasks and with a 100,000-line output, measured in headless Chromium:
//! time to first paint, time until everything is on the page, how long a live change takes to show, the
//! page's JS heap and the browser's memory (proportional set size of all its processes). It prints the figures (README "Web UI" quotes them);
//! it asserts what a person would check (every task listed, every line shown), never a time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod web;

use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use taskpods_events::{Event, EventBody, TaskId, TaskOutcome};
use taskpods_projections::generate;
use web::{Browser, ViewsOnly};

const ACTIVE: usize = 1_000;
const LINES: usize = 100_000;

fn mib(bytes: f64) -> String {
    format!("{:.0} MiB", bytes / f64::from(1 << 20))
}

async fn heap(browser: &Browser) -> f64 {
    browser
        .js("return performance.memory ? performance.memory.usedJSHeapSize : 0")
        .await
        .as_f64()
        .unwrap_or(0.0)
}

async fn first_paint(browser: &Browser) -> f64 {
    browser
        .js("const p = performance.getEntriesByName('first-contentful-paint')[0]; return p ? p.startTime : -1;")
        .await
        .as_f64()
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_for_a_thousand_live_tasks_and_a_hundred_thousand_lines() {
    let stack = ViewsOnly::start().await;
    let now = Utc::now();
    let mut events = Vec::new();
    for i in 0..ACTIVE {
        let task = TaskId::from_idempotency_key(&format!("scale-{i}"));
        let mut spec = generate::spec(i as u64);
        spec.requester = Some(format!("brain-{}", i % 7));
        events.extend(web::synthetic_task(
            task,
            spec,
            now - TimeDelta::seconds(i as i64),
            None,
        ));
    }
    let big = TaskId::from_idempotency_key("scale-output");
    events.extend(web::synthetic_task(
        big,
        generate::spec(1),
        now,
        Some(EventBody::Succeeded {
            outcome: TaskOutcome {
                exit_code: 0,
                duration_ms: 4_000,
                stdout_bytes: 0,
                stderr_bytes: 0,
                output_truncated: false,
                result: None,
                output_tail: None,
                ..TaskOutcome::default()
            },
        }),
    ));
    stack.publish(&events).await;
    stack.write_output(big, LINES).await;

    // 1,000 live tasks.
    let hub = Instant::now();
    loop {
        let (_, active) = web::get_json(stack.addr, "/api/active").await;
        if active["tasks"].as_array().map(Vec::len) == Some(ACTIVE) {
            break;
        }
        assert!(
            hub.elapsed() < Duration::from_secs(60),
            "the server lists {ACTIVE} tasks"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hub = hub.elapsed();
    let browser = Browser::start(1280, 800).await;
    let started = Instant::now();
    browser.goto(&stack.url("/")).await;
    browser
        .until(
            "1,000 rows",
            Duration::from_secs(60),
            &format!("return document.querySelectorAll('#active-rows tr').length === {ACTIVE}"),
        )
        .await;
    let listed = started.elapsed();
    let paint = first_paint(&browser).await;
    // A live change: one more progress report, until its row shows it.
    let one = TaskId::from_idempotency_key("scale-500");
    let change = Instant::now();
    stack
        .publish(&[(
            5,
            Event::new(
                one,
                5,
                Utc::now(),
                EventBody::Progress {
                    message: "moved on".into(),
                    percent: Some(90.0),
                },
            ),
        )])
        .await;
    browser
        .until(
            "the change",
            Duration::from_secs(30),
            &format!("const r = document.querySelector('#active-rows tr[data-task=\"{one}\"]'); return r && r.textContent.includes('moved on');"),
        )
        .await;
    let change_shown = change.elapsed();
    // Typing in the filter narrows 1,000 rows.
    let filter = browser
        .js("const t = performance.now(); const f = document.getElementById('active-filter'); f.value = 'brain-3';
             f.dispatchEvent(new Event('input')); return performance.now() - t;")
        .await
        .as_f64()
        .unwrap();
    let shown = browser
        .js("return [...document.querySelectorAll('#active-rows tr')].filter(r => !r.hidden).length")
        .await;
    let brain_3 = (0..ACTIVE).filter(|i| i % 7 == 3).count();
    assert_eq!(shown.as_u64().unwrap() as usize, brain_3);
    let active_heap = heap(&browser).await;
    let active_rss = browser.resident_bytes() as f64;
    println!(
        "(the server's live list held all {ACTIVE} {:.0} ms after the projector had folded them)",
        hub.as_secs_f64() * 1e3
    );
    println!(
        "web UI, {ACTIVE} live tasks: first paint {paint:.0} ms; all rows listed {:.0} ms after navigation; \
         a progress report shown {:.0} ms after it was appended; filter over {ACTIVE} rows {filter:.0} ms; \
         JS heap {}, browser memory (PSS) {}",
        listed.as_secs_f64() * 1e3,
        change_shown.as_secs_f64() * 1e3,
        mib(active_heap),
        mib(active_rss),
    );

    // A 100,000-line output.
    let reader = Browser::start(1280, 800).await;
    let started = Instant::now();
    reader.goto(&stack.url(&format!("/#/task/{big}"))).await;
    let text = reader
        .until(
            "100,000 lines",
            Duration::from_secs(120),
            "const info = document.getElementById('t-output-info').textContent; return info.includes('output complete') ? document.getElementById('t-output').textContent.length : null;",
        )
        .await;
    let loaded = started.elapsed();
    let lines = reader
        .js("return (document.getElementById('t-output').textContent.match(/\\n/g) || []).length")
        .await;
    assert_eq!(lines.as_u64().unwrap() as usize, LINES);
    let paint = first_paint(&reader).await;
    // Responsive afterwards: scroll to the top and back.
    let scroll = reader
        .js("const t = performance.now(); const o = document.getElementById('t-output'); o.scrollTop = 0;
             o.getBoundingClientRect(); o.scrollTop = o.scrollHeight; o.getBoundingClientRect(); return performance.now() - t;")
        .await
        .as_f64()
        .unwrap();
    println!(
        "web UI, a {LINES}-line output ({}): first paint {paint:.0} ms; all lines shown {:.0} ms after navigation; \
         scroll top to bottom {scroll:.0} ms; JS heap {}, browser memory (PSS) {}",
        mib(text.as_f64().unwrap()),
        loaded.as_secs_f64() * 1e3,
        mib(heap(&reader).await),
        mib(reader.resident_bytes() as f64),
    );
}
