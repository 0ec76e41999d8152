//! Inputs and artifacts: downloads the task's inputs into `/tmp/in` before the code starts and uploads
//! what it left in `/tmp/out` after it exits, both through the engine (request/reply on
//! `<p>.agent.<task>.files.get|put`), never the object store itself.
//!
//! Uploading never follows a symlink and never leaves the output directory: the tree is walked with
//! `openat(O_NOFOLLOW)` from a descriptor of the directory, one component at a time, so a symlink (to
//! `/etc/passwd`, or a directory swapped for one while the walk runs) is skipped and reported, as are
//! FIFOs, sockets and devices. What goes over the per-task caps (count, total bytes, in path order) is
//! counted as truncated.
//!
//! Where the directories are: in a pod (no sandbox of our own) `$TMPDIR/in` and `$TMPDIR/out`, i.e.
//! `/tmp/in` and `/tmp/out` in the pod's size-limited emptyDir; under bubblewrap,
//! `$TMPDIR/taskpods-files-<task>/in` and `…/out` on the host (reachable only by the sandbox's UID and
//! root), bound into the sandbox at `/tmp/in` (read-only) and `/tmp/out`, and removed once the result is
//! reported (the engine's local backend removes them at reap too, for an agent that was killed). While
//! the code runs, that `/tmp/out` is measured ([`watch_out_dir`]) and held to the size of the sandbox's
//! `/tmp`: past it, the code is stopped, as Kubernetes evicts a pod whose `/tmp` goes past its size.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
use taskpods_events::codec;
use taskpods_events::files::{
    Artifact, ArtifactsTruncated, FileGet, FileGetReply, FileLimits, FilePut, FilePutReply,
    FileRefusal, InputFailure, InputFile, InputProblem, OutDirExceeded, SkippedArtifact,
    check_relative_path,
};
use taskpods_events::{Encoding, Names, TaskId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Largest artifact chunk sent in one request (well under the server's 1 MiB default max payload).
pub const PUT_CHUNK_BYTES: usize = 256 << 10;

/// How long one file request may take before it is asked again.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times a request that got no usable answer is asked again.
const RETRIES: u32 = 5;

/// Deepest directory nesting walked in `/tmp/out`.
const MAX_DEPTH: usize = 32;

/// Most entries looked at in `/tmp/out` (bounds the walk's time, whatever the code left there).
const MAX_ENTRIES: usize = 10_000;

/// Where inputs and artifacts live on the agent's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDirs {
    /// Inputs are downloaded here (`/tmp/in` as the code sees it).
    pub inputs: PathBuf,
    /// Artifacts are uploaded from here (`/tmp/out` as the code sees it).
    pub outputs: PathBuf,
}

impl FileDirs {
    /// `in` and `out` under `base`.
    pub fn under(base: &Path) -> Self {
        Self {
            inputs: base.join("in"),
            outputs: base.join("out"),
        }
    }

    /// Creates both directories. When the code runs as another host user (`code_uid`, the sandbox's),
    /// that user must reach them to bind them and write the outputs: as root, the parent (`base`) and the
    /// output directory are given to it and the parent closed to everyone else; otherwise (a subordinate
    /// id the agent cannot give files to) the parent can be passed through but not listed, and the
    /// output directory is writable by all.
    pub fn create(&self, base: &Path, code_uid: Option<u32>) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let mode = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        };
        for dir in [&self.inputs, &self.outputs] {
            std::fs::create_dir_all(dir)?;
            mode(dir, 0o755)?;
        }
        match code_uid {
            Some(uid) if nix::unistd::geteuid().is_root() => {
                let id = Some(nix::unistd::Uid::from_raw(uid));
                let gid = Some(nix::unistd::Gid::from_raw(uid));
                for dir in [base, self.outputs.as_path()] {
                    nix::unistd::chown(dir, id, gid).map_err(std::io::Error::from)?;
                }
                mode(base, 0o700)?;
            }
            Some(_) => {
                mode(base, 0o711)?;
                mode(&self.outputs, 0o777)?;
            }
            None => {}
        }
        Ok(())
    }

    /// Removes both directories and, if then empty, `base` (the files are uploaded by now).
    pub fn remove(&self, base: &Path) {
        for dir in [&self.inputs, &self.outputs] {
            let _ = std::fs::remove_dir_all(dir);
        }
        let _ = std::fs::remove_dir(base);
    }
}

/// Talks to the engine's files loop for one task.
#[derive(Debug, Clone)]
pub struct FilesClient {
    client: async_nats::Client,
    get: String,
    put: String,
}

impl FilesClient {
    /// A client for `task`'s file subjects.
    pub fn new(client: async_nats::Client, names: &Names, task: TaskId) -> Self {
        Self {
            client,
            get: names.agent_files(task, "get"),
            put: names.agent_files(task, "put"),
        }
    }

    async fn request<Q: serde::Serialize, A: serde::de::DeserializeOwned>(
        &self,
        subject: &str,
        request: &Q,
    ) -> Result<A, String> {
        let payload = codec::to_msgpack(request).map_err(|e| e.to_string())?;
        let reply = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.client.request(subject.to_owned(), payload.into()),
        )
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
        codec::decode("file reply", &reply.payload, Encoding::Msgpack).map_err(|e| e.to_string())
    }

    /// Downloads every input into `dir/<path>`; the first that cannot be provided is the error.
    pub async fn download_inputs(
        &self,
        inputs: &[InputFile],
        dir: &Path,
    ) -> Result<u64, InputFailure> {
        let mut total = 0;
        for input in inputs {
            total += self.download(input, dir).await?;
        }
        Ok(total)
    }

    async fn download(&self, input: &InputFile, dir: &Path) -> Result<u64, InputFailure> {
        let failure = |problem, message: String| InputFailure {
            problem,
            input: input.name.clone(),
            message,
        };
        let path = input.path();
        check_relative_path(path)
            .map_err(|e| failure(InputProblem::Corrupt, format!("input path {path:?} {e}")))?;
        let target = dir.join(path);
        let local = |e: std::io::Error| {
            failure(
                InputProblem::TooLarge,
                format!("writing {}: {e}", target.display()),
            )
        };
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(local)?;
        }
        let mut file = tokio::fs::File::create(&target).await.map_err(local)?;
        let mut offset = 0u64;
        let mut attempts = 0;
        loop {
            let asked = FileGet {
                input: input.name.clone(),
                offset,
            };
            match self.request::<_, FileGetReply>(&self.get, &asked).await {
                Ok(FileGetReply::Chunk {
                    offset: at,
                    size,
                    data,
                    last,
                    ..
                }) if at == offset => {
                    attempts = 0;
                    file.write_all(&data).await.map_err(local)?;
                    offset += data.len() as u64;
                    if last {
                        if offset != size {
                            return Err(failure(
                                InputProblem::Corrupt,
                                format!("received {offset} bytes of {size}"),
                            ));
                        }
                        file.flush().await.map_err(local)?;
                        return Ok(offset);
                    }
                }
                Ok(FileGetReply::Chunk { offset: at, .. }) => {
                    return Err(failure(
                        InputProblem::Corrupt,
                        format!("asked for offset {offset}, got {at}"),
                    ));
                }
                Ok(FileGetReply::Refused { code, message }) => match code.input_problem() {
                    Some(problem) => return Err(failure(problem, message)),
                    None if attempts < RETRIES => {
                        attempts += 1;
                        backoff(attempts).await;
                    }
                    None => {
                        return Err(failure(
                            InputProblem::Unavailable,
                            format!("{code}: {message}"),
                        ));
                    }
                },
                Err(e) if attempts < RETRIES => {
                    eprintln!("taskpods-agent: input {:?}: {e}; asking again", input.name);
                    attempts += 1;
                    backoff(attempts).await;
                }
                Err(e) => return Err(failure(InputProblem::Unavailable, e)),
            }
        }
    }

    /// Uploads what `dir` holds within `limits`, giving up (and counting the rest as truncated) at
    /// `give_up`.
    pub async fn upload_artifacts(
        &self,
        dir: &Path,
        limits: FileLimits,
        give_up: Instant,
    ) -> ArtifactReport {
        let mut report = ArtifactReport::default();
        let found = match scan(dir, &mut report.skipped) {
            Ok(found) => found,
            Err(e) => {
                eprintln!("taskpods-agent: cannot read {}: {e}", dir.display());
                return report;
            }
        };
        let (chosen, truncated) = choose(found, limits);
        report.truncated = truncated;
        for (index, candidate) in chosen.iter().enumerate() {
            if Instant::now() >= give_up {
                let rest = &chosen[index..];
                report.truncate(rest.len() as u64, rest.iter().map(|c| c.size).sum());
                eprintln!(
                    "taskpods-agent: out of time; {} artifacts not uploaded",
                    rest.len()
                );
                break;
            }
            match self.upload(dir, &candidate.path, give_up).await {
                Ok(artifact) => report.artifacts.push(artifact),
                Err(Upload::OverCap) => {
                    let rest = &chosen[index..];
                    report.truncate(rest.len() as u64, rest.iter().map(|c| c.size).sum());
                    break;
                }
                Err(Upload::Skipped(reason)) => report.skipped.push(SkippedArtifact {
                    path: candidate.path.clone(),
                    reason,
                }),
            }
        }
        report
    }

    async fn upload(&self, dir: &Path, path: &str, give_up: Instant) -> Result<Artifact, Upload> {
        let mut restarts = 0;
        'file: loop {
            let mut file = open_beneath(dir, path).map_err(Upload::Skipped)?;
            let mut offset = 0u64;
            let mut buffer = vec![0u8; PUT_CHUNK_BYTES];
            loop {
                let n = read_full(&mut file, &mut buffer)
                    .await
                    .map_err(|e| Upload::Skipped(format!("unreadable: {e}")))?;
                let last = n < buffer.len();
                let chunk = FilePut {
                    path: path.to_owned(),
                    offset,
                    data: Bytes::copy_from_slice(&buffer[..n]),
                    last,
                };
                let mut attempts = 0;
                let reply = loop {
                    match self.request::<_, FilePutReply>(&self.put, &chunk).await {
                        Ok(FilePutReply::Refused {
                            code: FileRefusal::Unavailable | FileRefusal::NotNow,
                            message,
                        }) if attempts < RETRIES && Instant::now() < give_up => {
                            eprintln!("taskpods-agent: artifact {path:?}: {message}; retrying");
                        }
                        Ok(reply) => break reply,
                        Err(e) if attempts < RETRIES && Instant::now() < give_up => {
                            eprintln!("taskpods-agent: artifact {path:?}: {e}; retrying");
                        }
                        Err(e) => return Err(Upload::Skipped(format!("refused: {e}"))),
                    }
                    attempts += 1;
                    backoff(attempts).await;
                };
                match reply {
                    FilePutReply::Accepted { next_offset } if next_offset == offset + n as u64 => {
                        offset = next_offset;
                    }
                    FilePutReply::Stored(artifact) => return Ok(artifact),
                    FilePutReply::Refused {
                        code: FileRefusal::OverCap,
                        ..
                    } => return Err(Upload::OverCap),
                    FilePutReply::Refused {
                        code: FileRefusal::OutOfOrder,
                        ..
                    }
                    | FilePutReply::Accepted { .. }
                        if restarts < RETRIES =>
                    {
                        restarts += 1;
                        continue 'file;
                    }
                    FilePutReply::Refused { code, message } => {
                        return Err(Upload::Skipped(format!("refused: {code}: {message}")));
                    }
                    FilePutReply::Accepted { .. } => {
                        return Err(Upload::Skipped("refused: the engine lost count".into()));
                    }
                }
            }
        }
    }
}

async fn backoff(attempt: u32) {
    tokio::time::sleep(Duration::from_millis(100) * 2u32.pow(attempt.min(5))).await;
}

async fn read_full(file: &mut tokio::fs::File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

enum Upload {
    /// The task's caps are reached (the engine said so).
    OverCap,
    /// Not uploaded, for this reason.
    Skipped(String),
}

/// What the upload stored and left out, for the task's outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArtifactReport {
    /// Stored, in path order.
    pub artifacts: Vec<Artifact>,
    /// Left out by the caps (or the clock).
    pub truncated: Option<ArtifactsTruncated>,
    /// Left out for another reason.
    pub skipped: Vec<SkippedArtifact>,
}

impl ArtifactReport {
    fn truncate(&mut self, files: u64, bytes: u64) {
        let t = self
            .truncated
            .get_or_insert_with(ArtifactsTruncated::default);
        t.files += files;
        t.bytes += bytes;
    }
}

/// A regular file found in the output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Relative path.
    pub path: String,
    /// Size when seen.
    pub size: u64,
}

/// The caps applied in path order: what to upload, and what is left out.
pub fn choose(
    mut found: Vec<Found>,
    limits: FileLimits,
) -> (Vec<Found>, Option<ArtifactsTruncated>) {
    found.sort_by(|a, b| a.path.cmp(&b.path));
    let mut chosen = Vec::new();
    let mut left_out = ArtifactsTruncated::default();
    let mut bytes = 0u64;
    for file in found {
        if (chosen.len() as u64) < limits.max_artifacts
            && bytes.saturating_add(file.size) <= limits.max_artifact_bytes
        {
            bytes += file.size;
            chosen.push(file);
        } else {
            left_out.files += 1;
            left_out.bytes += file.size;
        }
    }
    let truncated = (left_out.files > 0).then_some(left_out);
    (chosen, truncated)
}

fn kind(stat: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Every regular file under `dir` (symlinks and special files go to `skipped`), never leaving it.
pub fn scan(dir: &Path, skipped: &mut Vec<SkippedArtifact>) -> nix::Result<Vec<Found>> {
    let root = nix::fcntl::open(dir, DIR_FLAGS, Mode::empty())?;
    let mut found = Vec::new();
    let mut budget = MAX_ENTRIES;
    walk(root, "", 0, &mut budget, &mut found, skipped)?;
    Ok(found)
}

fn walk(
    dir: OwnedFd,
    prefix: &str,
    depth: usize,
    budget: &mut usize,
    found: &mut Vec<Found>,
    skipped: &mut Vec<SkippedArtifact>,
) -> nix::Result<()> {
    // One descriptor for the *at calls, its duplicate for reading the entries.
    let at = dir.try_clone().map_err(|_| nix::errno::Errno::EMFILE)?;
    let mut entries = nix::dir::Dir::from_fd(dir)?;
    fn skip(skipped: &mut Vec<SkippedArtifact>, path: String, reason: &str) {
        skipped.push(SkippedArtifact {
            path,
            reason: reason.to_owned(),
        });
    }
    for entry in entries.iter() {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        if *budget == 0 {
            skip(skipped, format!("{prefix}…"), "too many entries");
            return Ok(());
        }
        *budget -= 1;
        let Ok(text) = name.to_str() else {
            skip(
                skipped,
                format!("{prefix}{}", String::from_utf8_lossy(bytes)),
                "bad path",
            );
            continue;
        };
        let path = format!("{prefix}{text}");
        let Ok(stat) = fstatat(at.as_fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) else {
            skip(skipped, path, "unreadable");
            continue;
        };
        match kind(&stat) {
            SFlag::S_IFREG if check_relative_path(&path).is_ok() => found.push(Found {
                path,
                size: u64::try_from(stat.st_size).unwrap_or(0),
            }),
            SFlag::S_IFREG => skip(skipped, path, "bad path"),
            SFlag::S_IFDIR if depth < MAX_DEPTH => {
                match openat(at.as_fd(), name, DIR_FLAGS, Mode::empty()) {
                    Ok(sub) => walk(sub, &format!("{path}/"), depth + 1, budget, found, skipped)?,
                    Err(_) => skip(skipped, path, "unreadable"),
                }
            }
            SFlag::S_IFDIR => skip(skipped, path, "nested too deep"),
            SFlag::S_IFLNK => skip(skipped, path, "symlink"),
            _ => skip(skipped, path, "not a regular file"),
        }
    }
    Ok(())
}

/// What a directory tree uses on disk, as `du` counts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of disk (512-byte blocks: a sparse file counts what it really uses).
    pub bytes: u64,
    /// Files, directories and anything else, below the top directory.
    pub entries: u64,
}

/// Deepest nesting [`usage`] measures; anything deeper counts as over any entry limit, so nothing can
/// hide below it.
const MEASURE_DEPTH: usize = 64;

/// What `dir` uses, never following a symlink, walked from a descriptor of it like [`scan`]. Stops
/// counting once `max_entries` is passed (the answer is then over it), so a tree of millions of files
/// costs no more than that.
pub fn usage(dir: &Path, max_entries: u64) -> nix::Result<Usage> {
    fn measure(dir: OwnedFd, depth: usize, max_entries: u64, usage: &mut Usage) -> nix::Result<()> {
        let at = dir.try_clone().map_err(|_| nix::errno::Errno::EMFILE)?;
        let mut entries = nix::dir::Dir::from_fd(dir)?;
        for entry in entries.iter() {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            if matches!(name.to_bytes(), b"." | b"..") {
                continue;
            }
            usage.entries += 1;
            if usage.entries > max_entries {
                return Ok(());
            }
            let Ok(stat) = fstatat(at.as_fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            else {
                continue;
            };
            usage.bytes = usage.bytes.saturating_add(
                u64::try_from(stat.st_blocks)
                    .unwrap_or(0)
                    .saturating_mul(512),
            );
            if kind(&stat) == SFlag::S_IFDIR {
                if depth >= MEASURE_DEPTH {
                    usage.entries = max_entries.saturating_add(1);
                    return Ok(());
                }
                if let Ok(sub) = openat(at.as_fd(), name, DIR_FLAGS, Mode::empty()) {
                    measure(sub, depth + 1, max_entries, usage)?;
                }
            }
        }
        Ok(())
    }
    let root = nix::fcntl::open(dir, DIR_FLAGS, Mode::empty())?;
    let mut total = Usage::default();
    measure(root, 0, max_entries, &mut total)?;
    Ok(total)
}

/// How often the output directory is measured while the code runs.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// Most files and directories the local sandbox's `/tmp/out` may hold while the code runs.
pub const OUT_DIR_MAX_ENTRIES: u64 = 10_000;

/// Measures `dir` every [`WATCH_INTERVAL`] and returns once it uses more than `limit_bytes` of disk or
/// holds more than [`OUT_DIR_MAX_ENTRIES`] entries: the caller then stops the code. The local sandbox's
/// `/tmp/out` is a host directory (so it outlives the sandbox for the upload), outside the sandbox's
/// size-limited `/tmp`; this holds it to the same size.
pub async fn watch_out_dir(dir: PathBuf, limit_bytes: u64) -> OutDirExceeded {
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let measured = dir.clone();
        let used = tokio::task::spawn_blocking(move || usage(&measured, OUT_DIR_MAX_ENTRIES))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        if used.bytes > limit_bytes || used.entries > OUT_DIR_MAX_ENTRIES {
            return OutDirExceeded {
                limit_bytes,
                limit_entries: OUT_DIR_MAX_ENTRIES,
                used_bytes: used.bytes,
                entries: used.entries,
            };
        }
    }
}

/// Opens `dir/path` for reading one component at a time without following any symlink; only a
/// regular file.
fn open_beneath(dir: &Path, path: &str) -> Result<tokio::fs::File, String> {
    check_relative_path(path).map_err(|e| format!("bad path: {e}"))?;
    let mut current =
        nix::fcntl::open(dir, DIR_FLAGS, Mode::empty()).map_err(|e| format!("unreadable: {e}"))?;
    let mut components = path.split('/').peekable();
    while let Some(component) = components.next() {
        if components.peek().is_some() {
            current = openat(current.as_fd(), component, DIR_FLAGS, Mode::empty())
                .map_err(|e| format!("unreadable: {e}"))?;
            continue;
        }
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let file =
            openat(current.as_fd(), component, flags, Mode::empty()).map_err(|e| match e {
                nix::errno::Errno::ELOOP => "symlink".to_owned(),
                e => format!("unreadable: {e}"),
            })?;
        let stat = fstat(&file).map_err(|e| format!("unreadable: {e}"))?;
        if kind(&stat) != SFlag::S_IFREG {
            return Err("not a regular file".into());
        }
        return Ok(tokio::fs::File::from_std(std::fs::File::from(file)));
    }
    Err("bad path: empty".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_disk_and_entries_without_following_symlinks() {
        let dir = tempfile::tempdir().expect("dir");
        let out = dir.path().join("out");
        std::fs::create_dir_all(out.join("a/b")).expect("mkdir");
        std::fs::write(out.join("a/b/one.bin"), vec![7u8; 100_000]).expect("write");
        std::fs::write(out.join("empty"), b"").expect("write");
        // A symlink to a big tree counts as one entry of its own, never what it points to.
        std::os::unix::fs::symlink("/usr", out.join("usr")).expect("symlink");
        let used = usage(&out, 1_000).expect("measured");
        assert_eq!(used.entries, 5, "a, a/b, a/b/one.bin, empty, usr");
        assert!(
            (100_000..200_000).contains(&used.bytes),
            "the file's blocks: {used:?}"
        );
        // Past the entry limit the count stops, over the limit.
        for i in 0..20 {
            std::fs::write(out.join(format!("f{i}")), b"").expect("write");
        }
        assert_eq!(usage(&out, 10).expect("measured").entries, 11);
    }

    fn found(path: &str, size: u64) -> Found {
        Found {
            path: path.into(),
            size,
        }
    }

    #[test]
    fn caps_apply_in_path_order_and_count_what_they_leave_out() {
        let limits = FileLimits {
            max_artifacts: 2,
            max_artifact_bytes: 100,
            ..FileLimits::default()
        };
        let (chosen, truncated) = choose(
            vec![
                found("c", 10),
                found("a", 60),
                found("b", 50),
                found("d", 5),
            ],
            limits,
        );
        assert_eq!(chosen, [found("a", 60), found("c", 10)]);
        assert_eq!(
            truncated,
            Some(ArtifactsTruncated {
                files: 2,
                bytes: 55
            })
        );
        let (all, none) = choose(vec![found("x", 0)], limits);
        assert_eq!(all.len(), 1);
        assert_eq!(none, None);
    }

    #[test]
    fn the_scan_skips_symlinks_and_special_files_and_never_leaves_the_directory() {
        let dir = tempfile_dir();
        let out = dir.join("out");
        std::fs::create_dir_all(out.join("sub/deeper")).expect("mkdir");
        std::fs::write(out.join("a.txt"), b"hello").expect("write");
        std::fs::write(out.join("sub/deeper/b.bin"), [0u8, 1, 2]).expect("write");
        std::fs::write(out.join("empty"), b"").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", out.join("passwd")).expect("symlink");
        std::os::unix::fs::symlink("/etc", out.join("etc")).expect("symlink");
        nix::unistd::mkfifo(&out.join("fifo"), Mode::from_bits_truncate(0o644)).expect("fifo");
        let mut skipped = Vec::new();
        let mut seen = scan(&out, &mut skipped).expect("scan");
        seen.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(
            seen,
            [
                found("a.txt", 5),
                found("empty", 0),
                found("sub/deeper/b.bin", 3)
            ]
        );
        skipped.sort_by(|a, b| a.path.cmp(&b.path));
        let skipped: Vec<(&str, &str)> = skipped
            .iter()
            .map(|s| (s.path.as_str(), s.reason.as_str()))
            .collect();
        assert_eq!(
            skipped,
            [
                ("etc", "symlink"),
                ("fifo", "not a regular file"),
                ("passwd", "symlink")
            ]
        );
        // Even asked by name, a symlink is not opened.
        assert_eq!(
            open_beneath(&out, "passwd").err().as_deref(),
            Some("symlink")
        );
        assert!(open_beneath(&out, "etc/passwd").is_err());
        assert!(open_beneath(&out, "../out/a.txt").is_err());
        assert!(open_beneath(&out, "sub/deeper/b.bin").is_ok());
        std::fs::remove_dir_all(&dir).ok();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("taskpods-agent-files-{}", TaskId::mint()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }
}
