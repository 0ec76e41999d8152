//! Running the user's code: under `/bin/sh` inside bubblewrap (local backend) or directly (in a pod, which
//! is the sandbox).
//!
//! The bubblewrap sandbox: every namespace unshared (no network at all, own pid namespace, so killing
//! bubblewrap ends every process of the task), read-only root with `/run`, `/root` and `/home` hidden,
//! a private size-limited `/tmp` (and `/dev/shm`), UID/GID 1000, every capability dropped, a new session
//! (no terminal to inject input into), killed when the agent dies, rlimits for processes, file size and
//! CPU time set by a wrapper shell inside the sandbox (`RLIMIT_NPROC` only counts inside the sandbox's user
//! namespace when set there), and an environment holding only the task's variables. When the agent runs as
//! root, bubblewrap is started through `setpriv` as UID/GID 1000, because the kernel never applies
//! `RLIMIT_NPROC` to processes whose real user outside the namespace is root.
//!
//! The task's environment and code reach the sandbox through bubblewrap's `--args FD` (a pipe) and the
//! environment of the processes inside it, never a command line, so other users of the machine cannot
//! read them in the process list; setpriv and bubblewrap themselves run with `PATH` only.
//!
//! The result document: after the code exits, the wrapper copies `/tmp/result.json` (at most 1 MiB) to its
//! standard input, which is one end of a socket pair whose other end the agent reads. The code itself gets
//! `/dev/null` as standard input.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use taskpods_events::{Instructions, Mode};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::task::JoinHandle;

use crate::Config;

/// The largest result document read from `/tmp/result.json`.
pub const RESULT_MAX_BYTES: usize = 1 << 20;

/// How the code is isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sandbox {
    /// bubblewrap (the local backend).
    Bwrap,
    /// None of our own: the pod is the sandbox.
    None,
}

/// Resource limits for the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Size of the private `/tmp`, bytes.
    pub tmp_bytes: u64,
    /// Most processes (`RLIMIT_NPROC`).
    pub max_procs: u64,
    /// Largest file the code may write (`RLIMIT_FSIZE`), bytes.
    pub max_file_bytes: u64,
    /// CPU seconds (`RLIMIT_CPU`); the task's timeout when not set.
    pub cpu_secs: Option<u64>,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Code {
    /// `script` or `agent`.
    pub mode: Mode,
    /// The script or goal.
    pub text: String,
    /// The entrypoint for mode `agent`.
    pub entrypoint: String,
}

impl Code {
    /// The code the instructions ask for.
    pub fn from_instructions(instructions: &Instructions, config: &Config) -> Self {
        Self {
            mode: instructions.mode,
            text: instructions.instructions.clone(),
            entrypoint: config.agent_entrypoint.clone(),
        }
    }
}

/// The shell run inside the sandbox: sets the limits, runs the code, hands back the result document.
/// Arguments: mode, max processes, max file size in 512-byte blocks, CPU seconds (0: none), the
/// entrypoint. The script or goal comes in `TASKPODS_CODE` (the environment, unlike the command line, is
/// not readable by other users of the machine), as does the task's environment.
const WRAPPER: &str = r#"
code=$TASKPODS_CODE; unset TASKPODS_CODE
ulimit -u "$2" 2>/dev/null || ulimit -p "$2" 2>/dev/null || echo "taskpods: cannot limit processes" >&2
ulimit -f "$3" || echo "taskpods: cannot limit file size" >&2
if [ "$4" != 0 ]; then ulimit -t "$4" || echo "taskpods: cannot limit CPU time" >&2; fi
cd /tmp 2>/dev/null
if [ "$1" = agent ]; then "$5" "$code" </dev/null & else TASKPODS_CODE=$code /bin/sh -c 'code=$TASKPODS_CODE; unset TASKPODS_CODE; eval "$code"' taskpods-script </dev/null & fi
child=$!
term=0
trap 'term=1; kill -TERM $child 2>/dev/null' TERM
wait $child; rc=$?
while [ $term = 1 ]; do term=0; wait $child; rc=$?; done
if [ -f /tmp/result.json ]; then head -c 1048576 /tmp/result.json >&0 2>/dev/null; fi
exit $rc
"#;

/// The running code.
#[derive(Debug)]
pub struct Running {
    /// The process (bubblewrap, or the wrapper shell).
    pub child: Child,
    /// Its standard output.
    pub stdout: Option<ChildStdout>,
    /// Its standard error.
    pub stderr: Option<ChildStderr>,
    pid: Option<u32>,
    result: Option<JoinHandle<Vec<u8>>>,
}

impl Running {
    /// Kills the code and everything it started (idempotent).
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    /// Forwards SIGTERM to the code's process group (under bubblewrap this ends the sandbox at once),
    /// waits up to `grace` for it to exit, then kills it; returns its exit status.
    pub async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(pid) = self.pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if let Ok(status) = tokio::time::timeout(grace, self.child.wait()).await {
            return status.ok();
        }
        self.kill();
        self.child.wait().await.ok()
    }

    /// The document the code left in `/tmp/result.json`, once the code has exited.
    pub async fn result_document(&mut self) -> Option<serde_json::Value> {
        let handle = self.result.take()?;
        let bytes = tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .ok()?
            .ok()?;
        if bytes.is_empty() {
            return None;
        }
        Some(
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into())
            }),
        )
    }
}

/// Placeholder in the bubblewrap arguments for the descriptor the private options are read from.
pub const ARGS_FD: &str = "{args-fd}";

/// The command line that runs `code`: program, arguments, and (bubblewrap) the private options passed
/// through a pipe (`--args FD`, replacing [`ARGS_FD`]) because they hold the task's environment and
/// code, which must not show in the process list.
pub fn command_line(
    config: &Config,
    instructions: &Instructions,
    code: &Code,
) -> (String, Vec<String>, Vec<String>) {
    let cpu = config.limits.cpu_secs.unwrap_or_else(|| {
        u64::try_from((instructions.deadline - chrono::Utc::now()).num_seconds())
            .unwrap_or(1)
            .max(1)
            + 5
    });
    let mode = match code.mode {
        Mode::Agent => "agent",
        _ => "script",
    };
    let wrapper_args = vec![
        "-c".to_owned(),
        WRAPPER.to_owned(),
        "taskpods-wrapper".to_owned(),
        mode.to_owned(),
        config.limits.max_procs.to_string(),
        config
            .limits
            .max_file_bytes
            .div_ceil(512)
            .max(1)
            .to_string(),
        cpu.to_string(),
        code.entrypoint.clone(),
    ];
    match config.sandbox {
        Sandbox::None => ("/bin/sh".to_owned(), wrapper_args, Vec::new()),
        Sandbox::Bwrap => {
            let mut args: Vec<String> = [
                "--unshare-all",
                "--die-with-parent",
                "--new-session",
                "--ro-bind",
                "/",
                "/",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            for hidden in ["/run", "/root", "/home", "/var/run"] {
                let path = std::path::Path::new(hidden);
                if path.is_dir() && !path.is_symlink() {
                    args.extend(["--tmpfs".to_owned(), hidden.to_owned()]);
                }
            }
            for private in ["/tmp", "/dev/shm"] {
                args.extend([
                    "--size".to_owned(),
                    config.limits.tmp_bytes.to_string(),
                    "--tmpfs".to_owned(),
                    private.to_owned(),
                ]);
            }
            args.extend(
                [
                    "--uid",
                    "1000",
                    "--gid",
                    "1000",
                    "--cap-drop",
                    "ALL",
                    "--chdir",
                    "/tmp",
                    "--args",
                    ARGS_FD,
                ]
                .iter()
                .map(|s| (*s).to_owned()),
            );
            let mut private = vec!["--clearenv".to_owned()];
            for (k, v) in crate::code_env(config, instructions) {
                private.extend(["--setenv".to_owned(), k, v]);
            }
            private.extend([
                "--setenv".to_owned(),
                "TASKPODS_CODE".to_owned(),
                code.text.clone(),
            ]);
            args.push("--".to_owned());
            args.push("/bin/sh".to_owned());
            args.extend(wrapper_args);
            if nix::unistd::geteuid().is_root() {
                // Run bubblewrap itself as UID 1000: the sandbox's user namespace then maps to an
                // unprivileged user, so RLIMIT_NPROC applies (the kernel exempts the root user from it).
                let mut setpriv = vec![
                    "--reuid=1000".to_owned(),
                    "--regid=1000".to_owned(),
                    "--clear-groups".to_owned(),
                    "--".to_owned(),
                    "bwrap".to_owned(),
                ];
                setpriv.extend(args);
                return ("setpriv".to_owned(), setpriv, private);
            }
            ("bwrap".to_owned(), args, private)
        }
    }
}

/// Why the code could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Setting up its pipes and socket failed.
    #[error("{0}")]
    Setup(#[from] std::io::Error),
    /// The program (the shell, bubblewrap or setpriv) could not be executed.
    #[error("{program}: {source}")]
    Start {
        /// The program.
        program: String,
        /// Why it could not be executed.
        #[source]
        source: std::io::Error,
    },
}

/// Starts the code.
pub fn spawn(
    config: &Config,
    instructions: &Instructions,
    code: &Code,
) -> Result<Running, SpawnError> {
    let (program, mut args, private) = command_line(config, instructions, code);
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let mut command = Command::new(&program);
    // The private options travel through a pipe the child inherits (not close-on-exec).
    let mut private_fd = None;
    if !private.is_empty() {
        let (reader, mut writer) = std::io::pipe()?;
        nix::fcntl::fcntl(
            &reader,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .map_err(std::io::Error::from)?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&reader).to_string();
        for arg in &mut args {
            if arg == ARGS_FD {
                arg.clone_from(&fd);
            }
        }
        let mut data = Vec::new();
        for arg in &private {
            data.extend_from_slice(arg.as_bytes());
            data.push(0);
        }
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = writer.write_all(&data);
        });
        private_fd = Some(reader);
    }
    command
        .args(&args)
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .current_dir("/")
        .process_group(0)
        .kill_on_drop(true);
    // Never the agent's own environment (NATS URL, credentials). Without bubblewrap the code gets the
    // task's environment directly; with it, through the private options, so the task's variables
    // (LD_PRELOAD…) never reach setpriv or bubblewrap themselves.
    command.env_clear();
    if private_fd.is_some() {
        command.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    } else {
        command
            .envs(crate::code_env(config, instructions))
            .env("TASKPODS_CODE", &code.text);
    }
    let spawned = command.spawn();
    drop(private_fd);
    let mut child = spawned.map_err(|source| SpawnError::Start {
        program: program.clone(),
        source,
    })?;
    ours.set_nonblocking(true)?;
    let mut ours = tokio::net::UnixStream::from_std(ours)?;
    let result = tokio::spawn(async move {
        let mut kept = Vec::new();
        let mut buf = vec![0u8; 16 << 10];
        while let Ok(n) = ours.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let room = RESULT_MAX_BYTES.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
        kept
    });
    Ok(Running {
        pid: child.id(),
        stdout: child.stdout.take(),
        stderr: child.stderr.take(),
        child,
        result: Some(result),
    })
}

/// The exit code reported for `status`: the code's, or 128 + signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(137)
}
