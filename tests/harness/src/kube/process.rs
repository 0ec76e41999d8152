//! Child processes of the control plane, and the janitor that outlives the test binary.
//!
//! [`ManagedProcess`] starts a program with stdout and stderr appended to a log file (read back into
//! errors when a component dies, since its last lines usually say why) and kills it on drop.
//!
//! A control plane kept in a `static` (see [`super::ControlPlane::shared`]) is never dropped: Rust runs no
//! destructors for statics at exit. [`Janitor`] covers that case: a small shell loop, started first,
//! polls the test process and, once it is gone, kills the pids listed in `<dir>/pids` and removes `<dir>`.
//! It also covers a test binary killed by a signal. Dropping the control plane normally stops the janitor.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{Error, Result};

/// A running component with its log file.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ManagedProcess {
    /// Starts `program args…`, logging to `log`, and records its pid in `pid_file` for the janitor.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
        pid_file: &Path,
    ) -> Result<Self> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(Error::io(format!("opening {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(Error::io("duplicating log handle"))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(Error::io(format!("starting {}", program.display())))?;
        let mut pids = OpenOptions::new()
            .create(true)
            .append(true)
            .open(pid_file)
            .map_err(Error::io("opening pid file"))?;
        std::io::Write::write_all(&mut pids, format!("{}\n", child.id()).as_bytes())
            .map_err(Error::io("writing pid file"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// Fails with the log tail if the process has already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::ComponentExited {
                component: self.name.clone(),
                status: status.to_string(),
                log_tail: self.log_tail(40),
            }),
            Err(e) => Err(Error::Io {
                what: format!("checking {}", self.name),
                source: e,
            }),
        }
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        // SIGKILL: the data directory is deleted right after, so a graceful shutdown buys nothing and
        // the API server's graceful termination would add seconds to every test binary.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `lines` lines of a log file (reads at most the final 64 KiB).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Cleans up after the test process if it exits without dropping the control plane.
#[derive(Debug)]
pub struct Janitor {
    child: Child,
}

impl Janitor {
    /// Starts the janitor for `dir`, whose `pids` file lists the processes to kill.
    pub fn start(dir: &Path) -> Result<Self> {
        // Polling once a second is plenty: it only matters after the test binary has gone.
        const SCRIPT: &str = r#"
            parent="$1"; dir="$2"
            while kill -0 "$parent" 2>/dev/null; do sleep 1; done
            if [ -f "$dir/pids" ]; then
                for p in $(cat "$dir/pids"); do kill -KILL "$p" 2>/dev/null; done
            fi
            rm -rf "$dir"
        "#;
        let child = Command::new("sh")
            .args(["-c", SCRIPT, "taskpods-kube-janitor"])
            .arg(std::process::id().to_string())
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(Error::io("starting janitor"))?;
        Ok(Self { child })
    }
}

impl Drop for Janitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
