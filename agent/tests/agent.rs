//! The agent against a real nats-server and real bubblewrap, with this test playing the engine's part:
//! it answers the hello and reads the output and reports from the streams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use taskpods_agent::output::{HEADER_LOG_KIND, HEADER_LOG_SEQ};
use taskpods_events::codec;
use taskpods_events::{
    AgentReport, Encoding, HelloReply, Instructions, Mode, Names, TaskId, TaskOutcome,
};
use taskpods_harness::NatsServer;

struct Run {
    outcome: Option<TaskOutcome>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    kinds: Vec<String>,
    progress: Vec<(String, Option<f32>)>,
    agent_exit: Option<i32>,
    heartbeats: bool,
}

async fn run_agent(
    script: &str,
    timeout_secs: i64,
    cap: u64,
    env: &[(&str, &str)],
    term_after: Option<Duration>,
) -> Run {
    let run = run_agent_with(script, timeout_secs, cap, env, term_after, Extra::default()).await;
    assert!(run.heartbeats, "heartbeats are sent");
    run
}

/// More of what a test may vary.
#[derive(Default)]
struct Extra<'a> {
    /// The task's environment besides `GREETING=hello`, as the engine would hand it over.
    task_env: &'a [(&'a str, &'a str)],
    /// Run the agent as this (non-root) UID and GID, as a non-root engine would.
    user: Option<u32>,
}

async fn run_agent_with(
    script: &str,
    timeout_secs: i64,
    cap: u64,
    env: &[(&str, &str)],
    term_after: Option<Duration>,
    extra: Extra<'_>,
) -> Run {
    let server = NatsServer::start();
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let names = Names::default();
    for (name, subjects, retention) in [
        (
            names.command_stream(),
            names.commands_all(),
            stream::RetentionPolicy::WorkQueue,
        ),
        (
            names.log_stream(),
            names.logs_all(),
            stream::RetentionPolicy::Limits,
        ),
    ] {
        js.create_stream(stream::Config {
            name,
            subjects: vec![subjects],
            retention,
            max_message_size: 1 << 20,
            ..Default::default()
        })
        .await
        .expect("stream");
    }
    let task = TaskId::mint();
    let instructions = Instructions {
        task_id: task,
        mode: Mode::Script,
        instructions: script.to_owned(),
        env: [("GREETING", "hello")]
            .iter()
            .chain(extra.task_env)
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        deadline: chrono::Utc::now() + chrono::TimeDelta::seconds(timeout_secs),
        heartbeat_interval_ms: 200,
        output_cap_bytes: cap,
        inputs: Vec::new(),
        files: Default::default(),
    };
    // The engine's part: first answer Wait, then Run.
    let mut hellos = client.subscribe(names.agent_hello(task)).await.unwrap();
    let responder = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Some(msg) = hellos.next().await {
                let reply = if n == 0 {
                    HelloReply::Wait { retry_after_ms: 50 }
                } else {
                    HelloReply::Run(instructions.clone())
                };
                n += 1;
                let payload = codec::to_msgpack(&reply).unwrap();
                client
                    .publish(msg.reply.unwrap(), payload.into())
                    .await
                    .unwrap();
            }
        })
    };
    let mut heartbeats = client.subscribe(names.agent_heartbeat(task)).await.unwrap();

    // A non-root agent runs a copy it can read (the build dir may sit in root's home).
    let copy = tempfile::tempdir().unwrap();
    let mut agent = match extra.user {
        None => tokio::process::Command::new(env!("CARGO_BIN_EXE_taskpods-agent")),
        Some(uid) => {
            let bin = copy.path().join("taskpods-agent");
            std::fs::copy(env!("CARGO_BIN_EXE_taskpods-agent"), &bin).unwrap();
            std::fs::set_permissions(copy.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let mut setpriv = tokio::process::Command::new("setpriv");
            setpriv
                .args([
                    format!("--reuid={uid}"),
                    format!("--regid={uid}"),
                    "--clear-groups".to_owned(),
                    "--".to_owned(),
                ])
                .arg(&bin)
                .current_dir("/");
            setpriv
        }
    };
    agent
        .env("TASKPODS_TASK_ID", task.to_string())
        .env("TASKPODS_NATS_URL", server.url())
        .env("TASKPODS_SANDBOX", "bwrap")
        .env("TASKPODS_TMP_BYTES", "4194304")
        .env("TASKPODS_MAX_PROCS", "64")
        .env("TASKPODS_KILL_GRACE_MS", "500")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        agent.env(k, v);
    }
    let mut child = agent.spawn().expect("agent runs");
    if let Some(after) = term_after {
        tokio::time::sleep(after).await;
        let pid = child.id().expect("running").to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
    }
    let status = tokio::time::timeout(
        Duration::from_secs(60 + timeout_secs.unsigned_abs()),
        child.wait(),
    )
    .await
    .expect("agent finishes")
    .expect("agent runs");
    responder.abort();
    let heartbeats = tokio::time::timeout(Duration::from_secs(1), heartbeats.next())
        .await
        .is_ok();

    // Reports on the command stream.
    let cmd = js.get_stream(names.command_stream()).await.unwrap();
    let reports = cmd
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut outcome = None;
    let mut progress = Vec::new();
    let pending = cmd.clone().info().await.unwrap().state.messages;
    let mut msgs = reports
        .fetch()
        .max_messages(pending as usize)
        .messages()
        .await
        .unwrap();
    while let Some(Ok(msg)) = msgs.next().await {
        let report: AgentReport = codec::decode("report", &msg.payload, Encoding::Msgpack).unwrap();
        match report {
            AgentReport::Result(o) => {
                assert!(msg.subject.ends_with(".result"));
                outcome = Some(o);
            }
            AgentReport::Progress { message, percent } => {
                assert!(msg.subject.ends_with(".progress"));
                progress.push((message, percent));
            }
            other => panic!("unexpected report {other:?}"),
        }
    }

    // Output, in order.
    let logs = js.get_stream(names.log_stream()).await.unwrap();
    let reader = logs
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::Explicit,
            filter_subject: names.log(task),
            ..Default::default()
        })
        .await
        .unwrap();
    let total = logs.clone().info().await.unwrap().state.messages as usize;
    let (mut stdout, mut stderr, mut kinds) = (Vec::new(), Vec::new(), Vec::new());
    if total > 0 {
        let mut msgs = reader.fetch().max_messages(total).messages().await.unwrap();
        let mut seq = 0u64;
        while let Some(Ok(msg)) = msgs.next().await {
            let headers = msg.headers.clone().unwrap();
            assert_eq!(
                headers.get(HEADER_LOG_SEQ).unwrap().as_str(),
                seq.to_string()
            );
            seq += 1;
            let kind = headers.get(HEADER_LOG_KIND).unwrap().as_str().to_owned();
            match kind.as_str() {
                "stdout" => stdout.extend_from_slice(&msg.payload),
                "stderr" => stderr.extend_from_slice(&msg.payload),
                _ => {}
            }
            kinds.push(kind);
        }
    }
    Run {
        outcome,
        stdout,
        stderr,
        kinds,
        progress,
        agent_exit: status.code(),
        heartbeats,
    }
}

#[tokio::test]
async fn script_output_progress_and_result_arrive_complete_and_in_order() {
    let script = r#"
echo "$GREETING from $(id -u):$(id -g)"
echo "::progress:: 50% halfway"
seq 1 100000
head -c 3000 /dev/zero | tr '\0' 'x'; echo
printf '\000\001\377binary\n' >&2
echo '{"answer": 42}' > /tmp/result.json
env | grep -c NATS >&2 || true
exit 0
"#;
    let run = run_agent(
        script,
        60,
        64 << 20,
        &[("TASKPODS_CHUNK_BYTES", "65536")],
        None,
    )
    .await;
    assert_eq!(run.agent_exit, Some(0));
    let outcome = run.outcome.expect("result reported");
    assert_eq!(outcome.exit_code, 0);
    let mut expected = b"hello from 1000:1000\n::progress:: 50% halfway\n".to_vec();
    for i in 1..=100_000 {
        expected.extend_from_slice(format!("{i}\n").as_bytes());
    }
    expected.extend_from_slice(&[b'x'; 3000]);
    expected.push(b'\n');
    assert_eq!(run.stdout.len(), expected.len());
    assert!(run.stdout == expected, "stdout differs");
    assert_eq!(run.stderr, b"\x00\x01\xffbinary\n0\n");
    assert_eq!(outcome.stdout_bytes, expected.len() as u64);
    assert_eq!(outcome.stderr_bytes, 12);
    assert!(!outcome.output_truncated);
    assert_eq!(outcome.result, Some(serde_json::json!({"answer": 42})));
    let tail = outcome.output_tail.expect("a tail");
    assert!(tail.len() <= 2048 + 8, "{}", tail.len());
    assert!(
        tail.contains(&"x".repeat(1000)),
        "the end of stdout is in the tail"
    );
    assert_eq!(run.progress, [("halfway".to_owned(), Some(50.0))]);
    assert_eq!(run.kinds.last().map(String::as_str), Some("end"));
}

#[tokio::test]
async fn exit_code_and_truncation_are_reported() {
    let run = run_agent("seq 1 100000; echo bye >&2; exit 3", 60, 1000, &[], None).await;
    let outcome = run.outcome.expect("result reported");
    assert_eq!(outcome.exit_code, 3);
    assert!(outcome.output_truncated);
    // The tail shows how the output ended, even though the stored output stops at the cap.
    let tail = outcome.output_tail.expect("a tail");
    assert!(
        tail.contains("99999\n100000\n") && tail.contains("bye\n"),
        "{tail}"
    );
    assert_eq!(run.stdout.len() + run.stderr.len(), 1000);
    assert!(run.kinds.contains(&"truncated".to_owned()));
    assert_eq!(run.kinds.last().map(String::as_str), Some("end"));
}

#[tokio::test]
async fn escapes_fail_and_say_so() {
    let script = r#"
if (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then echo "NET OPEN"; else echo "net blocked"; fi
if echo x > /etc/taskpods-escape 2>/dev/null; then echo "ROOT WRITABLE"; else echo "root read-only"; fi
if head -c 8000000 /dev/zero > /tmp/fill 2>/dev/null; then echo "TMP UNBOUNDED"; else echo "tmp full"; fi
rm -f /tmp/fill
sh -c 'while :; do sleep 2 & done'
echo "bomb stopped: $?"
sleep 3
ls /root /run | head -3
echo done
"#;
    let run = run_agent(
        &format!("exec bash -c '{}'", script.replace('\'', "'\\''")),
        60,
        1 << 20,
        &[],
        None,
    )
    .await;
    let out = String::from_utf8_lossy(&run.stdout);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(out.contains("net blocked"), "{out}\n{err}");
    assert!(out.contains("root read-only"), "{out}\n{err}");
    assert!(out.contains("tmp full"), "{out}\n{err}");
    assert!(err.contains("Cannot fork"), "{out}\n{err}");
    assert!(out.contains("bomb stopped: 2"), "{out}\n{err}");
    assert!(out.contains("done"), "{out}\n{err}");
    assert!(run.outcome.is_some());
}

#[tokio::test]
async fn sigterm_reaches_the_code_and_output_and_result_still_arrive() {
    // Without bubblewrap (as in a pod): the code gets the SIGTERM and may clean up within the grace.
    let script = r#"
trap 'echo "got TERM, cleaning up"; exit 42' TERM
echo started
while :; do sleep 0.1; done
"#;
    let run = run_agent(
        script,
        60,
        1 << 20,
        &[
            ("TASKPODS_SANDBOX", "none"),
            ("TASKPODS_TERM_GRACE_MS", "3000"),
        ],
        Some(Duration::from_secs(2)),
    )
    .await;
    assert_eq!(run.agent_exit, Some(0));
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "started\ngot TERM, cleaning up\n"
    );
    assert_eq!(run.outcome.expect("result reported").exit_code, 42);
    assert_eq!(run.kinds.last().map(String::as_str), Some("end"));
}

#[tokio::test]
async fn the_deadline_backstop_kills_the_code_when_no_engine_does() {
    let run = run_agent(
        "echo waiting; sleep 300",
        2,
        1 << 20,
        &[("TASKPODS_KILL_GRACE_MS", "200")],
        None,
    )
    .await;
    assert_eq!(run.stdout, b"waiting\n");
    let outcome = run.outcome.expect("result reported");
    assert_eq!(outcome.exit_code, 137);
    assert!(outcome.duration_ms < 10_000, "{}", outcome.duration_ms);
}

// Escapes, tried from inside a real sandbox the way a hostile script would, each asserted to fail the
// way the attacker sees it.

#[tokio::test]
async fn nul_injected_options_are_refused_and_the_code_never_runs() {
    // As if the engine's validation had been bypassed: each NUL would have ended one bubblewrap option
    // and started another (`--share-net`: the host's network, NATS included).
    for (task_env, script, says) in [
        (
            &[("X", "y\0--share-net")][..],
            "echo RAN",
            "env.X contains a NUL byte; refused",
        ),
        (
            &[("X\0--share-net", "y")][..],
            "echo RAN",
            r#"env name "X\0--share-net" contains a NUL byte; refused"#,
        ),
        (
            &[("BAD-NAME", "y")][..],
            "echo RAN",
            "env.BAD-NAME is not a variable name",
        ),
        (
            &[][..],
            "echo RAN\0--share-net",
            "instructions contains a NUL byte; refused",
        ),
    ] {
        let run = run_agent_with(
            script,
            60,
            1 << 20,
            &[],
            None,
            Extra {
                task_env,
                ..Extra::default()
            },
        )
        .await;
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains(says), "{says:?} missing:\n{err}");
        assert!(run.stdout.is_empty(), "the code ran: {:?}", run.stdout);
        assert_eq!(run.outcome.expect("a result").exit_code, 127);
        assert_eq!(run.agent_exit, Some(1));
    }
}

#[tokio::test]
async fn only_the_allow_list_of_the_host_is_visible() {
    let script = r#"
for path in /root /home /run/user /var/lib /var/log /etc/shadow /etc/ssh /etc/hostname /etc/resolv.conf /opt /srv /mnt; do
  if [ -e "$path" ]; then echo "VISIBLE $path"; else echo "absent $path"; fi
done
cut -d: -f1 /etc/passwd | tr '\n' ' '; echo
echo x > /usr/escape 2>/dev/null && echo "USR WRITABLE" || echo "usr: read-only"
echo x > /etc/escape 2>/dev/null && echo "ETC WRITABLE" || echo "etc: read-only"
echo x > /escape 2>/dev/null && echo "ROOT WRITABLE" || echo "root: read-only"
"#;
    let run = run_agent(script, 60, 1 << 20, &[], None).await;
    let out = String::from_utf8_lossy(&run.stdout);
    let err = String::from_utf8_lossy(&run.stderr);
    for path in [
        "/root",
        "/home",
        "/run/user",
        "/var/lib",
        "/var/log",
        "/etc/shadow",
        "/etc/ssh",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/opt",
        "/srv",
        "/mnt",
    ] {
        assert!(
            out.contains(&format!("absent {path}\n")),
            "{path}:\n{out}\n{err}"
        );
    }
    assert!(out.contains("root task nobody \n"), "{out}");
    for line in ["usr: read-only", "etc: read-only", "root: read-only"] {
        assert!(out.contains(line), "{line:?} missing:\n{out}\n{err}");
    }
    assert!(
        !out.contains("VISIBLE") && !out.contains("WRITABLE"),
        "{out}"
    );
}

#[tokio::test]
async fn a_non_root_engine_s_data_is_out_of_reach_and_the_code_never_runs_as_its_user() {
    let engine_uid = engine_user();
    // The engine's data directory: its NATS store holds other tasks' output.
    let data = tempfile::Builder::new()
        .prefix("taskpods-engine-data")
        .tempdir_in("/var/tmp")
        .unwrap();
    let store = data.path().join("jetstream");
    std::fs::create_dir(&store).unwrap();
    std::fs::write(store.join("other-task-output"), "secret-41c7").unwrap();
    if let Some(uid) = engine_uid {
        let owner = Some(nix::unistd::Uid::from_raw(uid));
        let group = Some(nix::unistd::Gid::from_raw(uid));
        for path in [data.path(), &store, &store.join("other-task-output")] {
            nix::unistd::chown(path, owner, group).unwrap();
        }
    }
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let data_dir = data.path().display().to_string();
    let script = format!(
        r#"
cat {data_dir}/jetstream/other-task-output && echo "READ THE STORE" || echo "store: unreadable"
ls {data_dir} && echo "LISTED THE DATA DIR" || echo "data dir: absent"
ls /root /home || echo "homes: absent"
sleep 2
"#
    );
    // Who runs the task's processes, seen from the host while it runs.
    let marker = TaskId::mint().to_string();
    let watcher = {
        let needle = format!("TASKPODS_TEST_MARKER={marker}");
        std::thread::spawn(move || {
            let mut uids = std::collections::BTreeSet::new();
            let until = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < until && uids.is_empty() {
                uids.extend(uids_of_processes_with(&needle));
                std::thread::sleep(Duration::from_millis(20));
            }
            uids
        })
    };
    let run = run_agent_with(
        &script,
        60,
        1 << 20,
        &[],
        None,
        Extra {
            task_env: &[("TASKPODS_TEST_MARKER", &marker)],
            user: engine_uid,
        },
    )
    .await;
    let out = String::from_utf8_lossy(&run.stdout);
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.agent_exit, Some(0), "{out}\n{err}");
    for line in ["store: unreadable", "data dir: absent", "homes: absent"] {
        assert!(out.contains(line), "{line:?} missing:\n{out}\n{err}");
    }
    assert!(!out.contains("secret-41c7"), "{out}");
    assert!(err.contains("No such file or directory"), "{err}");
    let uids = watcher.join().unwrap();
    let engine = engine_uid.unwrap_or_else(|| nix::unistd::geteuid().as_raw());
    assert!(!uids.is_empty(), "the task's processes were seen");
    assert!(
        !uids.contains(&engine),
        "a task process ran as the engine's UID {engine}: {uids:?}"
    );
}

/// The UID a non-root engine runs as in this test: as root, `nobody`, given the subordinate ID range
/// an operator would give the engine's user (`usermod --add-subuids`); otherwise this test's own user
/// (`None`), which then needs such a range itself.
fn engine_user() -> Option<u32> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if !text.lines().any(|line| line.starts_with("nobody:")) {
            use std::io::Write;
            let mut out = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(file)
                .unwrap();
            writeln!(out, "nobody:300000:65536").unwrap();
        }
    }
    Some(65534)
}

/// The host UIDs of the processes whose environment holds `needle` (all of them as root, else only
/// our own user's).
fn uids_of_processes_with(needle: &str) -> Vec<u32> {
    let mut uids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if !environ
            .split(|b| *b == 0)
            .any(|var| var == needle.as_bytes())
        {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let uid: Option<u32> = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next()?.parse().ok());
        uids.extend(uid);
    }
    uids
}

#[tokio::test]
async fn memory_beyond_the_task_s_limit_is_refused_and_the_limit_cannot_be_raised() {
    let script = r#"
echo "limit: $(ulimit -v) KiB"
ulimit -v unlimited && echo "RAISED" || echo "raise: refused"
perl -e '$x = "a" x (16 << 20); print "16 MiB: ok\n"'
perl -e '$x = "a" x (512 << 20); print "512 MiB: ALLOCATED\n"' || echo "512 MiB: refused ($?)"
python3 -c 'b = bytearray(512 << 20); print("512 MiB: ALLOCATED")' 2>&1 | tail -1
"#;
    let run = run_agent(
        script,
        60,
        1 << 20,
        &[("TASKPODS_MEMORY_BYTES", &(192u64 << 20).to_string())],
        None,
    )
    .await;
    let out = String::from_utf8_lossy(&run.stdout);
    let err = String::from_utf8_lossy(&run.stderr);
    for line in [
        "limit: 196608 KiB",
        "raise: refused",
        "16 MiB: ok",
        "512 MiB: refused",
        "MemoryError",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}\n{err}");
    }
    assert!(
        !out.contains("ALLOCATED") && !out.contains("RAISED"),
        "{out}"
    );
    assert!(err.contains("Out of memory"), "{err}");
}

#[tokio::test]
async fn user_namespaces_and_forbidden_system_calls_fail() {
    // Through perl's syscall(), so no tool's own checks stand in for the sandbox's.
    let call = |name: &str, nr: i64, args: &str| {
        format!(
            r#"perl -e 'my ($s, $t, $f) = ("none", "/tmp", "tmpfs"); my $r = syscall({nr}, {args}); print "{name}: ", ($r == -1 ? "$!" : "ALLOWED"), "\n"'"#
        )
    };
    let script = [
        "unshare --user --map-root-user id -u 2>&1 || echo \"unshare: refused\"".to_owned(),
        call(
            "unshare(CLONE_NEWUSER)",
            nix::libc::SYS_unshare,
            &nix::libc::CLONE_NEWUSER.to_string(),
        ),
        // PTRACE_TRACEME succeeds for any process not being traced: only the filter stops it.
        call("ptrace(PTRACE_TRACEME)", nix::libc::SYS_ptrace, "0, 0, 0, 0"),
        // KEYCTL_JOIN_SESSION_KEYRING: any process may, without the filter.
        call("keyctl", nix::libc::SYS_keyctl, "1, 0"),
        call("mount", nix::libc::SYS_mount, "$s, $t, $f, 0, 0"),
        call("bpf", nix::libc::SYS_bpf, "0, 0, 0"),
        call("perf_event_open", nix::libc::SYS_perf_event_open, "0, 0, -1, -1, 0"),
        // The C library falls back from clone3 (ENOSYS) to clone: threads still work.
        "python3 -c 'import threading; t = threading.Thread(target=print, args=(\"thread: ok\",)); t.start(); t.join()'".to_owned(),
    ]
    .join("\n");
    let run = run_agent(&script, 60, 1 << 20, &[], None).await;
    let out = String::from_utf8_lossy(&run.stdout);
    let err = String::from_utf8_lossy(&run.stderr);
    for line in [
        "unshare: refused",
        "unshare(CLONE_NEWUSER): Operation not permitted",
        "ptrace(PTRACE_TRACEME): Operation not permitted",
        "keyctl: Operation not permitted",
        "mount: Operation not permitted",
        "bpf: Operation not permitted",
        "perf_event_open: Operation not permitted",
        "thread: ok",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}\n{err}");
    }
    assert!(!out.contains("ALLOWED"), "{out}");
    assert_eq!(run.outcome.expect("a result").exit_code, 0);
}

#[tokio::test]
async fn ordinary_work_with_common_tools_still_succeeds() {
    let script = r#"
set -e
mkdir -p /tmp/work && cd /tmp/work
seq 1 1000 | awk '{ s += $1 } END { print "sum", s }' > sum.txt
printf 'b\na\nc\n' | sort | tr '\n' ' ' | sed 's/ $//' > sorted.txt; echo >> sorted.txt
tar czf bundle.tgz sum.txt sorted.txt && tar tzf bundle.tgz | wc -l
python3 -c 'import json, hashlib; print(json.dumps({"sha": hashlib.sha256(b"x").hexdigest()[:8]}))'
cat sum.txt sorted.txt
echo "home=$HOME user=$(id -un) tmp=$TMPDIR greeting=$GREETING quote=$QUOTED"
grep -c . /etc/passwd > /dev/null && date +%Y > /dev/null && echo tools-ok
echo '{"done": true}' > /tmp/result.json
"#;
    let run = run_agent_with(
        script,
        60,
        1 << 20,
        &[("TASKPODS_MEMORY_BYTES", &(512u64 << 20).to_string())],
        None,
        Extra {
            task_env: &[("QUOTED", "it's $(not run) `either` \"x\"\nline2")],
            ..Extra::default()
        },
    )
    .await;
    let out = String::from_utf8_lossy(&run.stdout);
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(
        out,
        "2\n{\"sha\": \"2d711642\"}\nsum 500500\na b c\n\
         home=/tmp user=task tmp=/tmp greeting=hello quote=it's $(not run) `either` \"x\"\nline2\n\
         tools-ok\n",
        "{err}"
    );
    let outcome = run.outcome.expect("a result");
    assert_eq!(outcome.exit_code, 0, "{err}");
    assert_eq!(outcome.result, Some(serde_json::json!({"done": true})));
}

#[tokio::test]
async fn in_a_pod_the_process_limit_is_the_pod_s_not_rlimit_nproc() {
    // RLIMIT_NPROC counts every process of the UID on the node, other tasks' pods included: without
    // bubblewrap (as in a pod) the agent leaves it alone and the pod's PID limit applies.
    let inherited = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "ulimit -u"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let run = run_agent(
        "ulimit -u",
        60,
        1 << 20,
        &[("TASKPODS_SANDBOX", "none"), ("TASKPODS_MAX_PROCS", "64")],
        None,
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&run.stdout), inherited);
    assert_ne!(inherited, "64\n");
}
