//! The `taskpods` task commands, run as a person would run them, against a real nats-server and engine.

use std::process::Output;

use taskpods_engine::config::EngineConfig;
use taskpods_engine::server::Engine;
use taskpods_harness::NatsServer;

async fn taskpods(server: &NatsServer, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_taskpods"))
        .args(args)
        .env("TASKPODS_NATS_URL", server.url())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("taskpods runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn launch_show_events_and_cancel_from_the_command_line() {
    let server = NatsServer::start();
    let engine = Engine::start(EngineConfig {
        nats_urls: vec![server.url()],
        ..EngineConfig::default()
    })
    .await
    .expect("engine");

    let out = taskpods(
        &server,
        &[
            "launch",
            "--script",
            "echo hi",
            "--timeout",
            "60",
            "--key",
            "cli-1",
            "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let launched: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let task = launched["task_id"].as_str().expect("task id").to_owned();
    assert_eq!(launched["created"], true);
    assert_eq!(launched["state"]["state"], "accepted");

    // The same key again finds the same task, and says so.
    let out = taskpods(
        &server,
        &["launch", "--script", "echo hi", "--key", "cli-1"],
    )
    .await;
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains(&format!("task {task} already exists")),
        "{}",
        text(&out.stdout)
    );

    let out = taskpods(&server, &["show", &task]).await;
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(shown.contains("state     accepted"), "{shown}");
    assert!(shown.contains("timeout   60 s"), "{shown}");
    assert!(shown.contains("script    echo hi"), "{shown}");
    let trace_id = taskpods_engine::telemetry::trace_id(task.parse().expect("a task id"));
    assert!(
        shown.contains(&format!("trace     {trace_id}")) && trace_id.to_string().len() == 32,
        "the id of the task's trace: {shown}"
    );

    let out = taskpods(&server, &["cancel", &task, "--reason", "test"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("task {task} cancelled"));

    let out = taskpods(&server, &["events", &task]).await;
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[0].starts_with("#1 ")
            && lines[0].contains("accepted")
            && lines[0].contains("timeout=60s")
    );
    assert!(
        lines[1].contains("cancel_requested")
            && lines[1].contains("test")
            && lines[1].ends_with("→ cancelling")
    );
    assert!(
        lines[2].contains("cancelled") && lines[2].ends_with("→ cancelled"),
        "{}",
        lines[2]
    );

    // Refusals and bad input come back as errors a person can act on, with a failing exit code.
    let out = taskpods(&server, &["cancel", &task]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("already ended (cancelled)"),
        "{}",
        text(&out.stderr)
    );
    let out = taskpods(
        &server,
        &[
            "launch",
            "--script",
            "x",
            "--timeout",
            "0",
            "--key",
            "cli-bad",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("timeout_secs: must be at least 1 second"),
        "{}",
        text(&out.stderr)
    );
    let out = taskpods(&server, &["show", "not-a-task-id"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("invalid value 'not-a-task-id'"),
        "{}",
        text(&out.stderr)
    );

    engine.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn env_values_never_reach_the_log_or_the_command_line_output() {
    let server = NatsServer::start();
    let engine = Engine::start(EngineConfig {
        nats_urls: vec![server.url()],
        ..EngineConfig::default()
    })
    .await
    .expect("engine");
    let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
    let out = taskpods(
        &server,
        &[
            "launch",
            "--script",
            "true",
            "--env",
            &format!("API_TOKEN={token}"),
            "--key",
            "cli-secret",
            "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let launched: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let task = launched["task_id"].as_str().expect("task id").to_owned();
    for args in [
        vec!["show", task.as_str(), "--json"],
        vec!["events", task.as_str(), "--json"],
        vec!["replay", task.as_str(), "--json"],
    ] {
        let out = taskpods(&server, &args).await;
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let shown = text(&out.stdout);
        assert!(!shown.contains(&token), "{args:?} shows the value: {shown}");
        if args[0] == "show" {
            assert!(
                shown.contains("API_TOKEN") && shown.contains("hmac-sha256:"),
                "{shown}"
            );
        }
    }
    engine.shutdown().await.expect("shutdown");
}
