//! Running the user's code: under `/bin/sh` inside bubblewrap (local backend) or directly (in a pod, which
//! is the sandbox).
//!
//! The bubblewrap sandbox:
//! - every namespace unshared (no network at all, own pid namespace, so killing bubblewrap ends every
//!   process of the task), nested user namespaces disabled (`--disable-userns`);
//! - a filesystem of its own, not the host's: read-only binds of an allow-list ([`SYSTEM_DIRS`]: programs
//!   and libraries; [`ETC_ENTRIES`]: what a shell and common tools read in `/etc`), generated
//!   `/etc/passwd`, `/etc/group` and `/etc/hosts`, a private size-limited `/tmp` (and `/dev/shm`;
//!   `/var/tmp` points to `/tmp`), and the root itself read-only; nothing of `/home`, `/root`, `/run`,
//!   `/var` or the engine's data directory exists inside;
//! - a host UID that is never the agent's own: as root, bubblewrap is started through `setpriv` as
//!   [`SANDBOX_UID`]; as another user, through `unshare` mapping [`SANDBOX_UID`] to the first of the
//!   user's subordinate ids (`/etc/subuid`, `/etc/subgid`, set with `newuidmap`), and without such a
//!   range the agent refuses to run the code rather than run it as the engine's user;
//! - every capability dropped, a seccomp filter ([`crate::seccomp`]), a new session (no terminal to
//!   inject input into), killed when the agent dies;
//! - rlimits for processes, file size, CPU time and address space (the task's memory limit,
//!   `RLIMIT_AS`) set by a wrapper shell inside the sandbox (`RLIMIT_NPROC` only counts inside the
//!   sandbox's user namespace when set there; the kernel never applies it to a real root user, hence
//!   the unprivileged host UID).
//!
//! The task's code and environment reach the sandbox as data, never as option text: bubblewrap copies
//! them from a pipe into a read-only file ([`TASK_FILE`], `--ro-bind-data`) that the wrapper shell
//! sources; the environment holds only `PATH` until then. Every value is checked first ([`check`]): a
//! NUL byte or an environment name that is not a shell name is refused (the engine's validation
//! refuses them too; this is the second wall). Nothing of the task shows in the process list;
//! setpriv, unshare and bubblewrap themselves run with `PATH` only.
//!
//! The result document: after the code exits, the wrapper copies `/tmp/result.json` (at most 1 MiB) to its
//! standard input, which is one end of a socket pair whose other end the agent reads. The code itself gets
//! `/dev/null` as standard input.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use taskpods_events::{Instructions, Mode};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::task::JoinHandle;

use crate::Config;
use crate::seccomp::{self, SeccompError};

/// The largest result document read from `/tmp/result.json`.
pub const RESULT_MAX_BYTES: usize = 1 << 20;

/// The UID and GID the code runs as inside the sandbox (and, when the agent runs as root, outside it).
pub const SANDBOX_UID: u32 = 1000;

/// Where the task's environment and code appear inside the sandbox (read-only; sourced by the wrapper).
pub const TASK_FILE: &str = "/run/taskpods/task";

/// Host directories bound read-only into the sandbox (programs and libraries); a symbolic link (as with
/// a merged `/usr`) becomes the same link.
pub const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];

/// Entries of the host's `/etc` bound read-only into the sandbox, when present: what the dynamic
/// linker, a shell and common tools read. Not `passwd`, `group` or `hosts` (generated: the host's users
/// and hosts are none of the code's business), nor secrets (`shadow`, `ssh`, credentials).
pub const ETC_ENTRIES: &[&str] = &[
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "debian_version",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "magic",
    "magic.mime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "perl",
    "profile",
    "protocols",
    "python3",
    "services",
    "shells",
    "ssl",
    "terminfo",
    "timezone",
];

/// Why the code was not started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// A value bound for the sandbox holds a NUL byte: as option text it would split into a second
    /// option (`--setenv X y\0--share-net`), and no shell can hold it.
    #[error("{field} contains a NUL byte; refused")]
    Nul {
        /// Where: `instructions`, `env.NAME`, `env` (a name), `entrypoint`.
        field: String,
    },
    /// An environment variable name a shell cannot export.
    #[error(
        "env.{name} is not a variable name (a letter or _, then letters, digits and _); refused"
    )]
    EnvName {
        /// The name as given.
        name: String,
    },
    /// The seccomp filter could not be built.
    #[error("the sandbox's seccomp filter")]
    Seccomp(#[source] SeccompError),
    /// The agent runs as neither root nor a user with subordinate ids: the code would run as the
    /// agent's (the engine's) own user.
    #[error(
        "the agent runs as UID {uid} with no subordinate UID and GID range (/etc/subuid, /etc/subgid) \
         or no newuidmap/newgidmap; the code would run as the engine's own user, so it is not run \
         (run the engine as root, or give its user a range: usermod --add-subuids N-M --add-subgids N-M)"
    )]
    NoSeparateUser {
        /// The agent's effective UID.
        uid: u32,
    },
    /// A pipe for the sandbox's data could not be made.
    #[error("a pipe for the sandbox's data")]
    Pipe(#[source] std::io::Error),
    /// The program (bubblewrap, setpriv, unshare, or the shell) could not be started.
    #[error("{program}")]
    Start {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

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
    /// Most processes (`RLIMIT_NPROC`), bubblewrap only: in a pod the pod's PID limit applies, and
    /// `RLIMIT_NPROC` there would count every process of the same UID on the node.
    pub max_procs: u64,
    /// Largest file the code may write (`RLIMIT_FSIZE`), bytes.
    pub max_file_bytes: u64,
    /// CPU seconds (`RLIMIT_CPU`); the task's timeout when not set.
    pub cpu_secs: Option<u64>,
    /// The task's memory limit (`RLIMIT_AS`, address space), bytes; none when not set.
    pub memory_bytes: Option<u64>,
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

/// The shell run inside the sandbox: takes the task's environment and code, sets the limits, runs the
/// code, hands back the result document. Arguments: mode, max processes (0: none), max file size in
/// 512-byte blocks, CPU seconds (0: none), the entrypoint, address space in KiB (0: none), the task
/// file to source (empty: the environment already holds it). The script or goal comes in
/// `TASKPODS_CODE`; neither it nor the environment is ever on a command line, where other users of the
/// machine could read it. Under bubblewrap a watcher kills every process of the sandbox as soon as the
/// agent's end of the result socket closes: should the agent die before bubblewrap has set its
/// `--die-with-parent` signal, the sandbox would otherwise outlive it. `kill -1` reaches only the
/// sandbox's own PID namespace, where the wrapper is PID 2 (bubblewrap's init is 1); the watcher is
/// never started anywhere else.
const WRAPPER: &str = r#"
if [ -n "$7" ]; then . "$7" || { echo "taskpods: cannot read the task" >&2; exit 126; }; fi
if [ -n "$7" ] && [ "$$" = 2 ]; then exec 3<&0; (cat <&3 >/dev/null 2>&1; kill -KILL -1) & exec 3<&-; fi
code=$TASKPODS_CODE; unset TASKPODS_CODE
if [ "$2" != 0 ]; then ulimit -u "$2" 2>/dev/null || ulimit -p "$2" 2>/dev/null || echo "taskpods: cannot limit processes" >&2; fi
ulimit -f "$3" || echo "taskpods: cannot limit file size" >&2
if [ "$4" != 0 ]; then ulimit -t "$4" || echo "taskpods: cannot limit CPU time" >&2; fi
if [ "$6" != 0 ]; then ulimit -v "$6" || echo "taskpods: cannot limit memory" >&2; fi
cd /tmp 2>/dev/null
if [ "$1" = agent ]; then "$5" "$code" </dev/null & else TASKPODS_CODE=$code /bin/sh -c 'code=$TASKPODS_CODE; unset TASKPODS_CODE; eval "$code"' taskpods-script </dev/null & fi
child=$!
term=0
trap 'term=1; kill -TERM "$child" 2>/dev/null' TERM
wait "$child"; rc=$?
while [ "$term" = 1 ]; do term=0; wait "$child"; rc=$?; done
if [ -f /tmp/result.json ]; then head -c 1048576 /tmp/result.json >&0 2>/dev/null; fi
exit "$rc"
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

/// Refuses what must never reach the sandbox: a NUL byte in the code, the entrypoint or the
/// environment, and an environment name that is not a shell variable name. The engine refuses these
/// at validation; this is the second wall, should anything bypass it.
pub fn check(code: &Code, env: &BTreeMap<String, String>) -> Result<(), SpawnError> {
    let refuse_nul = |field: String, value: &str| match value.contains('\0') {
        true => Err(SpawnError::Nul { field }),
        false => Ok(()),
    };
    refuse_nul("instructions".into(), &code.text)?;
    refuse_nul("entrypoint".into(), &code.entrypoint)?;
    for (name, value) in env {
        refuse_nul(format!("env name {name:?}"), name)?;
        if !is_shell_name(name) {
            return Err(SpawnError::EnvName { name: name.clone() });
        }
        refuse_nul(format!("env.{name}"), value)?;
    }
    Ok(())
}

fn is_shell_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `value` as one single-quoted shell word.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The task file the wrapper sources inside the sandbox: one `export NAME='value'` line per variable,
/// then the code in `TASKPODS_CODE`. Names are checked shell names, values single-quoted, so whatever a
/// value holds it stays a value (and sourcing it runs nothing the code itself could not run anyway).
pub fn task_file(env: &BTreeMap<String, String>, code: &str) -> Vec<u8> {
    let mut file = String::new();
    for (name, value) in env {
        file.push_str(&format!("export {name}={}\n", shell_quote(value)));
    }
    file.push_str(&format!("TASKPODS_CODE={}\n", shell_quote(code)));
    file.into_bytes()
}

/// Bytes bubblewrap reads from an inherited pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    /// Stands for the pipe's descriptor number in the arguments until [`spawn`] makes the pipe.
    pub placeholder: String,
    /// What the pipe carries.
    pub bytes: Vec<u8>,
}

/// How to start the code.
#[derive(Debug, Clone)]
pub struct CommandLine {
    /// `setpriv` or `unshare` (in front of bubblewrap), or `/bin/sh` without a sandbox.
    pub program: String,
    /// Its arguments: only our own options and host paths; nothing of the task.
    pub args: Vec<String>,
    /// Data handed over on pipes: the task file, the seccomp filters, the generated `/etc` files.
    pub handovers: Vec<Handover>,
    /// The program's environment: `PATH` only in front of bubblewrap (the code's environment arrives
    /// in the task file), the code's own without a sandbox.
    pub env: BTreeMap<String, String>,
}

/// The `PATH` the agent starts bubblewrap (and the code gets by default) with.
pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const PASSWD: &str = "root:x:0:0:root:/root:/usr/sbin/nologin\n\
                      task:x:1000:1000:task:/tmp:/bin/sh\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const GROUP: &str = "root:x:0:\ntask:x:1000:\nnogroup:x:65534:\n";
const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// The command that runs `code`, after [`check`] passed.
pub fn command_line(
    config: &Config,
    instructions: &Instructions,
    code: &Code,
) -> Result<CommandLine, SpawnError> {
    let env = crate::code_env(config, instructions);
    check(code, &env)?;
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
    let procs = match config.sandbox {
        Sandbox::Bwrap => config.limits.max_procs,
        Sandbox::None => 0,
    };
    let wrapper_args = |task_file: &str| {
        vec![
            "-c".to_owned(),
            WRAPPER.to_owned(),
            "taskpods-wrapper".to_owned(),
            mode.to_owned(),
            procs.to_string(),
            config
                .limits
                .max_file_bytes
                .div_ceil(512)
                .max(1)
                .to_string(),
            cpu.to_string(),
            code.entrypoint.clone(),
            config
                .limits
                .memory_bytes
                .map_or(0, |bytes| bytes.div_ceil(1024).max(1))
                .to_string(),
            task_file.to_owned(),
        ]
    };
    if config.sandbox == Sandbox::None {
        let mut env = env;
        env.insert("TASKPODS_CODE".to_owned(), code.text.clone());
        return Ok(CommandLine {
            program: "/bin/sh".to_owned(),
            args: wrapper_args(""),
            handovers: Vec::new(),
            env,
        });
    }

    let mut handovers = Vec::new();
    let mut hand_over = |bytes: Vec<u8>| {
        let placeholder = format!("{{fd{}}}", handovers.len());
        handovers.push(Handover {
            placeholder: placeholder.clone(),
            bytes,
        });
        placeholder
    };
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| (*s).to_owned()));
    push(&[
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
    ]);
    for dir in SYSTEM_DIRS {
        let path = Path::new(dir);
        if let Ok(target) = std::fs::read_link(path) {
            push(&["--symlink", &target.to_string_lossy(), dir]);
        } else if path.is_dir() {
            push(&["--ro-bind", dir, dir]);
        }
    }
    for entry in ETC_ENTRIES {
        let path = Path::new("/etc").join(entry);
        if path.exists() {
            let path = path.to_string_lossy();
            push(&["--ro-bind", &path, &path]);
        }
    }
    // Python keeps its per-version configuration in /etc/python3.N.
    if let Ok(entries) = std::fs::read_dir("/etc") {
        let mut pythons: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("python3."))
            .collect();
        pythons.sort();
        for name in pythons {
            let path = format!("/etc/{name}");
            push(&["--ro-bind", &path, &path]);
        }
    }
    for (file, text) in [
        ("/etc/passwd", PASSWD),
        ("/etc/group", GROUP),
        ("/etc/hosts", HOSTS),
    ] {
        let fd = hand_over(text.as_bytes().to_vec());
        push(&["--ro-bind-data", &fd, file]);
    }
    if code.mode == Mode::Agent {
        let entrypoint = Path::new(&code.entrypoint);
        let seen = SYSTEM_DIRS.iter().any(|dir| entrypoint.starts_with(dir));
        if entrypoint.is_absolute() && !seen && entrypoint.exists() {
            push(&["--ro-bind", &code.entrypoint, &code.entrypoint]);
        }
    }
    push(&["--proc", "/proc", "--dev", "/dev"]);
    let tmp_bytes = config.limits.tmp_bytes.to_string();
    for private in ["/tmp", "/dev/shm"] {
        push(&["--size", &tmp_bytes, "--tmpfs", private]);
    }
    // Inputs (read-only) and artifacts live outside the sandbox, so they outlive its end.
    let files = crate::files::FileDirs::under(&config.files_dir);
    let (inputs, outputs) = (
        files.inputs.display().to_string(),
        files.outputs.display().to_string(),
    );
    push(&[
        "--ro-bind",
        &inputs,
        "/tmp/in",
        "--bind",
        &outputs,
        "/tmp/out",
    ]);
    push(&["--symlink", "../tmp", "/var/tmp"]);
    let task = hand_over(task_file(&env, &code.text));
    push(&["--ro-bind-data", &task, TASK_FILE]);
    push(&["--remount-ro", "/"]);
    let id = SANDBOX_UID.to_string();
    push(&[
        "--uid",
        &id,
        "--gid",
        &id,
        "--cap-drop",
        "ALL",
        "--chdir",
        "/tmp",
    ]);
    for program in seccomp::programs().map_err(SpawnError::Seccomp)? {
        let fd = hand_over(program);
        push(&["--add-seccomp-fd", &fd]);
    }
    push(&["--", "/bin/sh"]);
    args.extend(wrapper_args(TASK_FILE));

    let mut command = launcher(Path::new("/etc/subuid"), Path::new("/etc/subgid"))?;
    command.push("bwrap".to_owned());
    command.extend(args);
    let program = command.remove(0);
    Ok(CommandLine {
        program,
        args: command,
        handovers,
        env: BTreeMap::from([("PATH".to_owned(), SYSTEM_PATH.to_owned())]),
    })
}

/// What starts bubblewrap so that the code's host UID is never the agent's: `setpriv` to
/// [`SANDBOX_UID`] as root, else `unshare` mapping [`SANDBOX_UID`] to the agent's user's first
/// subordinate ids.
fn launcher(subuid: &Path, subgid: &Path) -> Result<Vec<String>, SpawnError> {
    let uid = nix::unistd::geteuid();
    let id = SANDBOX_UID.to_string();
    if uid.is_root() {
        // RLIMIT_NPROC applies to this unprivileged user, never to root.
        return Ok(vec![
            "setpriv".to_owned(),
            format!("--reuid={id}"),
            format!("--regid={id}"),
            "--clear-groups".to_owned(),
            "--".to_owned(),
        ]);
    }
    let refused = SpawnError::NoSeparateUser { uid: uid.as_raw() };
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|user| user.name);
    let first = |path: &Path| {
        let text = std::fs::read_to_string(path).ok()?;
        subordinate_id(&text, name.as_deref(), uid.as_raw())
    };
    let (Some(host_uid), Some(host_gid)) = (first(subuid), first(subgid)) else {
        return Err(refused);
    };
    let helpers = ["newuidmap", "newgidmap"]
        .iter()
        .all(|helper| on_path(helper));
    if !helpers || host_uid == uid.as_raw() {
        return Err(refused);
    }
    Ok(vec![
        "unshare".to_owned(),
        "--user".to_owned(),
        format!("--map-users={host_uid},{id},1"),
        format!("--map-groups={host_gid},{id},1"),
        format!("--setuid={id}"),
        format!("--setgid={id}"),
        "--".to_owned(),
    ])
}

fn on_path(program: &str) -> bool {
    SYSTEM_PATH
        .split(':')
        .any(|dir| Path::new(dir).join(program).is_file())
}

/// The first id of the range that `/etc/subuid`-style `text` (`owner:first:count` lines, the owner a
/// user name or a UID) gives the user `name`/`id`.
pub fn subordinate_id(text: &str, name: Option<&str>, id: u32) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        let owner = fields.next()?;
        let first = fields.next()?.parse::<u32>().ok()?;
        let count = fields.next()?.parse::<u32>().ok()?;
        let ours = Some(owner) == name || owner.parse::<u32>().ok() == Some(id);
        (ours && count >= 1).then_some(first)
    })
}

/// Starts the code.
pub fn spawn(
    config: &Config,
    instructions: &Instructions,
    code: &Code,
) -> Result<Running, SpawnError> {
    let CommandLine {
        program,
        mut args,
        handovers,
        env,
    } = command_line(config, instructions, code)?;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(SpawnError::Pipe)?;
    // Each handover travels through a pipe the child inherits (not close-on-exec); a thread per pipe
    // writes it, so bubblewrap may read them in any order.
    let mut readers = Vec::new();
    for Handover { placeholder, bytes } in handovers {
        let (reader, mut writer) = std::io::pipe().map_err(SpawnError::Pipe)?;
        nix::fcntl::fcntl(
            &reader,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .map_err(|e| SpawnError::Pipe(e.into()))?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&reader).to_string();
        for arg in &mut args {
            if *arg == placeholder {
                arg.clone_from(&fd);
            }
        }
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = writer.write_all(&bytes);
        });
        readers.push(reader);
    }
    let mut command = Command::new(&program);
    command
        .args(&args)
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .current_dir("/")
        .process_group(0)
        .kill_on_drop(true)
        // Never the agent's own environment (NATS URL, credentials).
        .env_clear()
        .envs(&env);
    let spawned = command.spawn();
    drop(readers);
    let mut child = spawned.map_err(|source| SpawnError::Start {
        program: program.clone(),
        source,
    })?;
    let start = |source| SpawnError::Start {
        program: program.clone(),
        source,
    };
    ours.set_nonblocking(true).map_err(start)?;
    let mut ours = tokio::net::UnixStream::from_std(ours).map_err(start)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(env: &[(&str, &str)]) -> (Config, Instructions) {
        let task = taskpods_events::TaskId::mint();
        let config = Config::from_env(|name| match name {
            "TASKPODS_TASK_ID" => Some(task.to_string()),
            "TASKPODS_MEMORY_BYTES" => Some("104857600".into()),
            _ => None,
        })
        .expect("valid");
        let instructions = Instructions {
            task_id: task,
            mode: Mode::Script,
            instructions: "echo hi".into(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            deadline: chrono::Utc::now() + chrono::TimeDelta::seconds(60),
            heartbeat_interval_ms: 1000,
            output_cap_bytes: 1 << 20,
            inputs: Vec::new(),
            files: Default::default(),
        };
        (config, instructions)
    }

    #[test]
    fn nothing_of_the_task_becomes_an_option() {
        let (config, instructions) = config(&[("X", "y --share-net --bind / /host")]);
        let code = Code::from_instructions(&instructions, &config);
        let line = command_line(&config, &instructions, &code).expect("valid");
        assert!(
            !line.args.iter().any(|a| a.contains("share-net")),
            "{line:?}"
        );
        assert!(!line.args.iter().any(|a| a == "/host" || a == "echo hi"));
        assert_eq!(line.env.keys().collect::<Vec<_>>(), ["PATH"]);
        let task = line
            .handovers
            .iter()
            .find(|h| String::from_utf8_lossy(&h.bytes).contains("share-net"))
            .expect("the task file carries the value");
        let text = String::from_utf8_lossy(&task.bytes);
        assert!(
            text.contains("export X='y --share-net --bind / /host'\n"),
            "{text}"
        );
        assert!(text.ends_with("TASKPODS_CODE='echo hi'\n"), "{text}");
        let at = line.args.iter().position(|a| *a == task.placeholder);
        assert_eq!(
            at.map(|i| (line.args[i - 1].as_str(), line.args[i + 1].as_str())),
            Some(("--ro-bind-data", TASK_FILE))
        );
        for must in ["--disable-userns", "--add-seccomp-fd", "--remount-ro"] {
            assert!(line.args.iter().any(|a| a == must), "{must} missing");
        }
        assert!(!line.args.windows(3).any(|w| w == ["--ro-bind", "/", "/"]));
        assert!(line.args.iter().any(|a| a == "102400"), "RLIMIT_AS in KiB");
    }

    #[test]
    fn nul_bytes_and_bad_names_are_refused() {
        for (env, script, says) in [
            (
                &[("X", "y\0--share-net")][..],
                "true",
                "env.X contains a NUL byte",
            ),
            (
                &[("X\0Y", "y")][..],
                "true",
                "env name \"X\\0Y\" contains a NUL byte",
            ),
            (
                &[("A=B", "y")][..],
                "true",
                "env.A=B is not a variable name",
            ),
            (
                &[][..],
                "true\0--share-net",
                "instructions contains a NUL byte",
            ),
        ] {
            let (config, mut instructions) = config(env);
            instructions.instructions = script.into();
            let code = Code::from_instructions(&instructions, &config);
            let refused = command_line(&config, &instructions, &code).expect_err("refused");
            assert!(refused.to_string().contains(says), "{refused}");
        }
    }

    #[test]
    fn quoting_keeps_every_value_a_value() {
        let env = BTreeMap::from([("Q".to_owned(), "it's '$(x)'\n`y`".to_owned())]);
        let file = String::from_utf8(task_file(&env, "echo 'a'")).expect("utf-8");
        assert_eq!(
            file,
            "export Q='it'\\''s '\\''$(x)'\\''\n`y`'\nTASKPODS_CODE='echo '\\''a'\\'''\n"
        );
    }

    #[test]
    fn subordinate_ranges_are_found_by_name_or_uid() {
        let text = "alice:100000:65536\n1001:200000:65536\nbob:300000:0\n";
        assert_eq!(subordinate_id(text, Some("alice"), 1000), Some(100_000));
        assert_eq!(subordinate_id(text, Some("carol"), 1001), Some(200_000));
        assert_eq!(subordinate_id(text, Some("bob"), 1002), None, "empty range");
        assert_eq!(subordinate_id(text, None, 1003), None);
    }
}
