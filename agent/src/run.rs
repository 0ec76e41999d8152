//! Running one task: hello, the code in its sandbox, output and progress streaming, heartbeats, and the
//! result report.

use std::collections::BTreeMap;
use std::time::Duration;

use taskpods_events::codec;
use taskpods_events::files::OutDirExceeded;
use taskpods_events::{AgentReport, Instructions, TaskOutcome};
use tokio::sync::mpsc;

use crate::files::{ArtifactReport, FileDirs, FilesClient};
use crate::lifetime::Lifetime;
use crate::output::{self, OutputStats, Progress};
use crate::protocol::{
    connect, hello, progress_msg_id, publish_acked, publish_result, report_headers, until,
};
use crate::sandbox::{self, Sandbox};
use crate::{AgentError, Config};

/// Runs the whole task: hello, code, output, heartbeats, result. Returns the outcome it reported.
/// `lifetime` (from [`supervise`](crate::supervise)) brings a SIGTERM and takes the hello's deadline.
pub async fn run(config: Config, mut lifetime: Lifetime) -> Result<TaskOutcome, AgentError> {
    let sigterm = || AgentError::Stopped("SIGTERM before the code started".to_owned());
    let client = tokio::select! {
        client = connect(&config) => client?,
        () = lifetime.stopped() => return Err(sigterm()),
    };
    let instructions = tokio::select! {
        instructions = hello(&client, &config) => instructions?,
        () = lifetime.stopped() => return Err(sigterm()),
    };
    lifetime.deadline.send_replace(instructions.deadline);
    let js = async_nats::jetstream::new(client.clone());
    let task = config.task;

    // Heartbeats (core NATS: cheap, and a lost one is harmless).
    let heartbeat = {
        let client = client.clone();
        let subject = config.names.agent_heartbeat(task);
        let every = Duration::from_millis(instructions.heartbeat_interval_ms.max(50));
        let payload: bytes::Bytes = codec::to_msgpack(&AgentReport::Heartbeat)
            .unwrap_or_default()
            .into();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let _ = client.publish(subject.clone(), payload.clone()).await;
                let _ = client.flush().await;
            }
        })
    };

    // Progress: latest wins while a report is in flight; ordered, deduplicated by msg id.
    let (progress_tx, mut progress_rx) = mpsc::channel::<Progress>(64);
    let progress_task = {
        let js = js.clone();
        let subject = config.names.agent_report(task, "progress");
        tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(mut p) = progress_rx.recv().await {
                while let Ok(newer) = progress_rx.try_recv() {
                    p = newer;
                }
                let report = AgentReport::Progress {
                    message: p.message,
                    percent: p.percent,
                };
                let Ok(payload) = codec::to_msgpack(&report) else {
                    continue;
                };
                let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
                let headers = report_headers(&progress_msg_id(task, n), "progress");
                if let Err(e) =
                    publish_acked(&js, subject.clone(), headers, payload.into(), give_up).await
                {
                    eprintln!("taskpods-agent: progress report lost: {e}");
                }
                n += 1;
                // At most a few reports a second reach the event log.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // Inputs first: if one cannot be provided, the task fails with its reason and no code runs.
    let files = FilesClient::new(client.clone(), &config.names, task);
    let dirs = FileDirs::under(&config.files_dir);
    let code_uid = (config.sandbox == Sandbox::Bwrap).then_some(sandbox::SANDBOX_UID);
    let prepared = match dirs.create(&config.files_dir, code_uid) {
        Ok(()) => {
            files
                .download_inputs(&instructions.inputs, &dirs.inputs)
                .await
        }
        Err(e) => Err(taskpods_events::files::InputFailure {
            problem: taskpods_events::files::InputProblem::Unavailable,
            input: String::new(),
            message: format!("cannot create {}: {e}", config.files_dir.display()),
        }),
    };
    if let Err(failure) = prepared {
        eprintln!(
            "taskpods-agent: input {:?} not provided ({:?}): {}",
            failure.input, failure.problem, failure.message
        );
        heartbeat.abort();
        let outcome = TaskOutcome {
            exit_code: 127,
            input_failure: Some(failure),
            ..TaskOutcome::default()
        };
        if config.sandbox == Sandbox::Bwrap {
            dirs.remove(&config.files_dir);
        }
        return publish_result(&js, &config, &outcome)
            .await
            .map(|()| outcome);
    }

    let started = tokio::time::Instant::now();
    let code = sandbox::Code::from_instructions(&instructions, &config);
    let (exit_code, stats, result_doc, stopped_at, out_dir_exceeded) = match run_code(
        &config,
        &instructions,
        code,
        &js,
        progress_tx,
        &mut lifetime,
    )
    .await
    {
        Ok(done) => done,
        Err(e) => {
            heartbeat.abort();
            // Report the failure as a result so the task ends now rather than at its deadline.
            let outcome = TaskOutcome {
                exit_code: 127,
                duration_ms: 0,
                ..TaskOutcome::default()
            };
            let _ = publish_result(&js, &config, &outcome).await;
            return Err(e);
        }
    };
    let _ = progress_task.await;

    // Artifacts before the result. After a SIGTERM the engine kills the agent once its grace period is
    // over, so the upload keeps a quarter of it for the result.
    let give_up = match stopped_at {
        Some(at) => at + config.kill_grace.mul_f32(0.75),
        None => {
            tokio::time::Instant::now()
                + until(instructions.deadline)
                + config.kill_grace.max(Duration::from_secs(5))
        }
    };
    let ArtifactReport {
        artifacts,
        truncated,
        skipped,
    } = files
        .upload_artifacts(&dirs.outputs, instructions.files, give_up)
        .await;
    if !artifacts.is_empty() || truncated.is_some() || !skipped.is_empty() {
        eprintln!(
            "taskpods-agent: {} artifacts stored, {} left out by the caps, {} skipped",
            artifacts.len(),
            truncated.map_or(0, |t| t.files),
            skipped.len()
        );
    }

    let outcome = TaskOutcome {
        exit_code,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        stdout_bytes: stats.stdout_bytes,
        stderr_bytes: stats.stderr_bytes,
        output_truncated: stats.dropped_bytes > 0,
        result: result_doc,
        output_tail: (!stats.tail.is_empty())
            .then(|| String::from_utf8_lossy(&stats.tail).into_owned()),
        artifacts,
        artifacts_truncated: truncated,
        artifacts_skipped: skipped,
        input_failure: None,
        out_dir_exceeded,
    };
    let reported = publish_result(&js, &config, &outcome).await;
    if config.sandbox == Sandbox::Bwrap {
        dirs.remove(&config.files_dir);
    }
    heartbeat.abort();
    client.flush().await.ok();
    reported.map(|()| outcome)
}

/// What running the code gave: exit code, output counters, the result document, when a SIGTERM
/// stopped it (if one did), and whether it was stopped for filling `/tmp/out`.
type CodeDone = (
    i32,
    OutputStats,
    Option<serde_json::Value>,
    Option<tokio::time::Instant>,
    Option<Box<OutDirExceeded>>,
);

/// Runs the code and streams its output.
async fn run_code(
    config: &Config,
    instructions: &Instructions,
    code: sandbox::Code,
    js: &async_nats::jetstream::Context,
    progress: mpsc::Sender<Progress>,
    lifetime: &mut Lifetime,
) -> Result<CodeDone, AgentError> {
    let mut writer = output::Writer::new(
        js.clone(),
        config.names.log(config.task),
        config.task,
        config.chunk_bytes,
        config.flush_interval,
        instructions.output_cap_bytes,
    );
    let mut running = match sandbox::spawn(config, instructions, &code) {
        Ok(running) => running,
        Err(e) => {
            // Say so where the task's owner looks: in its output.
            let mut reason = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(inner) = cause {
                reason.push_str(&format!(": {inner}"));
                cause = inner.source();
            }
            let text = format!("taskpods-agent: cannot start the code: {reason}\n");
            writer.push(output::Kind::Stderr, text.as_bytes()).await;
            let _ = writer.finish().await;
            return Err(AgentError::Spawn(e));
        }
    };
    let pump = output::pump(
        writer,
        running.stdout.take(),
        running.stderr.take(),
        progress,
    );
    let pump = tokio::spawn(pump);

    let hard_stop = until(instructions.deadline) + config.kill_grace;
    let mut stopped_at = None;
    let mut out_dir_exceeded = None;
    // Under bubblewrap `/tmp/out` is a host directory outside the sandbox's size-limited `/tmp`: hold it
    // to the same size. (In a pod it is part of the size-limited `/tmp`, which Kubernetes enforces.)
    let watch = async {
        match config.sandbox {
            Sandbox::Bwrap => {
                let outputs = FileDirs::under(&config.files_dir).outputs;
                crate::files::watch_out_dir(outputs, config.limits.tmp_bytes).await
            }
            Sandbox::None => std::future::pending().await,
        }
    };
    let status = tokio::select! {
        status = running.child.wait() => status.ok(),
        () = lifetime.stopped() => {
            eprintln!("taskpods-agent: SIGTERM: stopping the code");
            stopped_at = Some(tokio::time::Instant::now());
            running.terminate(config.term_grace).await
        }
        over = watch => {
            eprintln!("taskpods-agent: {over}");
            out_dir_exceeded = Some(Box::new(over));
            running.kill();
            running.child.wait().await.ok()
        }
        () = tokio::time::sleep(hard_stop) => {
            eprintln!("taskpods-agent: past the deadline: killing the code");
            running.kill();
            running.child.wait().await.ok()
        }
    };
    // Background processes outside a pid namespace could hold the pipes open: end the group.
    running.kill();
    let exit_code = status.map_or(137, sandbox::exit_code);
    let stats = match tokio::time::timeout(Duration::from_secs(30), pump).await {
        Ok(Ok(Ok(stats))) => stats,
        Ok(Ok(Err(e))) => {
            eprintln!("taskpods-agent: output incomplete: {e}");
            OutputStats::default()
        }
        _ => {
            eprintln!("taskpods-agent: output did not finish in time");
            OutputStats::default()
        }
    };
    let result = running.result_document().await;
    Ok((exit_code, stats, result, stopped_at, out_dir_exceeded))
}

/// The environment the user's code sees: the task's env plus a few taskpods variables, never the NATS
/// URL or credentials.
pub fn code_env(config: &Config, instructions: &Instructions) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("PATH".to_owned(), sandbox::SYSTEM_PATH.to_owned()),
        ("HOME".to_owned(), "/tmp".to_owned()),
        ("TMPDIR".to_owned(), "/tmp".to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ("TASKPODS_TASK_ID".to_owned(), config.task.to_string()),
        (
            "TASKPODS_DEADLINE".to_owned(),
            instructions.deadline.to_rfc3339(),
        ),
    ]);
    // Under bubblewrap the directories are bound at /tmp/in and /tmp/out; in a pod they are where the
    // agent made them (/tmp/in and /tmp/out of the pod's /tmp).
    let dirs = match config.sandbox {
        Sandbox::Bwrap => FileDirs::under(std::path::Path::new("/tmp")),
        Sandbox::None => FileDirs::under(&config.files_dir),
    };
    env.insert(
        "TASKPODS_INPUT_DIR".to_owned(),
        dirs.inputs.display().to_string(),
    );
    env.insert(
        "TASKPODS_OUTPUT_DIR".to_owned(),
        dirs.outputs.display().to_string(),
    );
    // Values from Kubernetes Secrets (the intake keeps their names apart from `env`'s).
    for (k, v) in &config.secret_env {
        env.insert(k.clone(), v.0.clone());
    }
    for (k, v) in &instructions.env {
        env.insert(k.clone(), v.clone());
    }
    env
}
