//! `/metrics`, `/healthz` and `/readyz` of a real engine (local backend, real nats-server), scraped the way
//! Prometheus and the kubelet do: a few tasks run, and each counter and histogram moved by exactly what
//! they did; the probes answer without a token; every metric the Grafana dashboard in deploy/ plots exists.
//!
//! Its own test binary: the metrics registry is the process's, so no other engine may run beside it.

mod web;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use taskpods_engine::http::HttpConfig;
use web::{Stack, request};

/// The samples of an exposition text: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn value(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    samples.get(key).copied().unwrap_or(0.0)
}

async fn scrape(stack: &Stack) -> (String, BTreeMap<String, f64>) {
    let answer = request(stack.addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert!(
        answer
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        answer.headers
    );
    let text = String::from_utf8(answer.body).expect("UTF-8");
    let parsed = samples(&text);
    (text, parsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_what_the_tasks_did_and_the_probes_answer() {
    // A token on the UI: the probes and the scrape must still answer without one.
    let stack = Stack::start(HttpConfig {
        read_token: Some("secret-read-token".to_owned()),
        ..HttpConfig::default()
    })
    .await;
    let (_, before) = scrape(&stack).await;

    let ok: Vec<_> = [
        stack.launch("echo one", 60).await,
        stack.launch("echo two", 60).await,
    ]
    .to_vec();
    let failing = stack.launch("exit 3", 60).await;
    for task in ok.iter().chain([&failing]) {
        stack.ended(*task, Duration::from_secs(60)).await;
    }
    let raw = stack.server.connect().await;
    raw.publish("taskpods.cmd.launch", "not json at all".into())
        .await
        .expect("published");
    raw.flush().await.expect("flushed");

    // The reap comes a little after the end, and the dead letter a little after its publish.
    let mut after = BTreeMap::new();
    let mut text = String::new();
    for _ in 0..100 {
        (text, after) = scrape(&stack).await;
        let reaped = value(&after, "taskpods_transitions_total{kind=\"reaped\"}")
            - value(&before, "taskpods_transitions_total{kind=\"reaped\"}");
        let dead = value(
            &after,
            "taskpods_dead_letters_total{reason=\"undecodable\"}",
        );
        if reaped >= 3.0 && dead >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let moved = |key: &str| value(&after, key) - value(&before, key);

    assert_eq!(
        moved("taskpods_transitions_total{kind=\"accepted\"}"),
        3.0,
        "{text}"
    );
    assert_eq!(
        moved("taskpods_transitions_total{kind=\"scheduled\"}"),
        3.0,
        "{text}"
    );
    assert_eq!(
        moved("taskpods_transitions_total{kind=\"running\"}"),
        3.0,
        "{text}"
    );
    assert_eq!(
        moved("taskpods_transitions_total{kind=\"succeeded\"}"),
        2.0,
        "{text}"
    );
    assert_eq!(
        moved("taskpods_transitions_total{kind=\"failed\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        moved("taskpods_transitions_total{kind=\"reaped\"}"),
        3.0,
        "{text}"
    );
    for phase in [
        "accepted_to_scheduled",
        "accepted_to_running",
        "accepted_to_ended",
        "running_to_ended",
    ] {
        let count = format!("taskpods_phase_duration_seconds_count{{phase=\"{phase}\"}}");
        assert_eq!(moved(&count), 3.0, "{phase}: {text}");
        let sum = format!("taskpods_phase_duration_seconds_sum{{phase=\"{phase}\"}}");
        assert!(
            moved(&sum) > 0.0 && moved(&sum) < 3.0 * 60.0,
            "{phase}: {text}"
        );
    }
    // Ends come after starts, for every task: the sums say so too.
    assert!(
        moved("taskpods_phase_duration_seconds_sum{phase=\"accepted_to_ended\"}")
            >= moved("taskpods_phase_duration_seconds_sum{phase=\"accepted_to_running\"}")
    );
    assert_eq!(
        moved("taskpods_dead_letters_total{reason=\"undecodable\"}"),
        1.0,
        "{text}"
    );
    // Three launches and the agents' three results (progress reports: none) were applied.
    assert!(
        moved("taskpods_commands_total{outcome=\"applied\"}") >= 6.0,
        "{text}"
    );
    assert_eq!(
        moved("taskpods_commands_total{outcome=\"dead_lettered\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        moved("taskpods_backend_errors_total{kind=\"transient\"}"),
        0.0
    );
    assert!(
        after.contains_key("taskpods_projector_lag_events"),
        "{text}"
    );
    assert!(
        after.contains_key("taskpods_projector_lag_seconds"),
        "{text}"
    );
    // The projector folded the tasks' events, and found no gap in the stream.
    assert!(
        moved("taskpods_projector_events_total{outcome=\"applied\"}") >= 3.0,
        "{text}"
    );
    assert!(
        after.contains_key("taskpods_projector_gaps_total"),
        "{text}"
    );
    assert_eq!(
        value(&after, "taskpods_projector_gaps_total"),
        0.0,
        "{text}"
    );

    // A live task shows in the gauge by its state.
    let sleeper = stack.launch("sleep 30", 60).await;
    // Up to 60 s: on a loaded machine a sandbox takes a while to start.
    let mut running = 0.0;
    for _ in 0..300 {
        let (_, now) = scrape(&stack).await;
        running = value(&now, "taskpods_tasks{state=\"running\"}");
        if running >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(running, 1.0, "the sleeping task is counted as running");
    stack.client.cancel(sleeper, None).await.expect("cancel");

    // Probes answer without a token, and mean it.
    for probe in ["/healthz", "/readyz"] {
        let answer = request(stack.addr, "GET", probe, &[], b"").await;
        assert_eq!(
            answer.status,
            200,
            "{probe}: {}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    // ...while the API itself still wants the token.
    let api = request(stack.addr, "GET", "/api/active", &[], b"").await;
    assert_eq!(api.status, 401);

    // Every metric the dashboard plots is one the engine exposes.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/grafana/taskpods-dashboard.json"),
    )
    .expect("the dashboard");
    let exposed: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut plotted = BTreeSet::new();
    for word in dashboard.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("taskpods_") && word.len() > "taskpods_".len() {
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix))
                .unwrap_or(word);
            plotted.insert(base.to_owned());
        }
    }
    assert!(plotted.len() >= 8, "{plotted:?}");
    for metric in &plotted {
        assert!(
            exposed.contains(metric.as_str()),
            "the dashboard plots {metric}, which /metrics does not expose"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_not_ready_when_nats_is_gone_and_recovers() {
    let mut stack = Stack::start(HttpConfig::default()).await;
    // Not ready until the first status check has run, then ready.
    let mut ready = request(stack.addr, "GET", "/readyz", &[], b"").await;
    for _ in 0..100 {
        if ready.status == 200 {
            break;
        }
        let body = String::from_utf8_lossy(&ready.body).into_owned();
        assert!(body.contains("no status check has completed yet"), "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = request(stack.addr, "GET", "/readyz", &[], b"").await;
    }
    assert_eq!(
        ready.status,
        200,
        "{}",
        String::from_utf8_lossy(&ready.body)
    );

    stack.server.kill();
    let mut answer = None;
    for _ in 0..100 {
        let now = request(stack.addr, "GET", "/readyz", &[], b"").await;
        if now.status == 503 {
            answer = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let answer = answer.expect("/readyz turns 503 while NATS is down");
    assert!(
        String::from_utf8_lossy(&answer.body).contains("NATS connection is disconnected"),
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    // Liveness stays: restarting the engine would not bring NATS back.
    let live = request(stack.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(live.status, 200);

    stack.server.restart();
    let mut recovered = false;
    for _ in 0..150 {
        if request(stack.addr, "GET", "/readyz", &[], b"").await.status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "/readyz recovers once NATS is back");
}
