//! Output streaming: the code's stdout and stderr as ordered chunks on `<p>.log.<task>` (stream
//! `TASKPODS_LOG`), each published with a JetStream ack before the next, so the stream holds them in order
//! and a retried publish (same `Nats-Msg-Id`) is stored once.
//!
//! Chunk format (one NATS message each; the payload is the raw bytes, binary-safe):
//!
//! | header | value |
//! |---|---|
//! | `Nats-Msg-Id` | `<task>:log:<seq>` |
//! | `Taskpods-Log-Seq` | `0, 1, 2, …`: contiguous per task, across kinds |
//! | `Taskpods-Log-Kind` | `stdout`, `stderr`, `truncated` (once, when the cap is reached) or `end` (last) |
//! | `Taskpods-Log-Offset` | `stdout`/`stderr`: byte offset of the chunk in its stream |
//! | `Taskpods-Stdout-Bytes`, `Taskpods-Stderr-Bytes`, `Taskpods-Dropped-Bytes` | `end`: totals produced and bytes not stored |
//!
//! A chunk is sent when it reaches the chunk size or has waited the flush interval. Order within stdout
//! and within stderr is exact; between the two it is as precise as the flush interval. Once stdout and
//! stderr together reach the task's cap, the part up to the cap is sent, then one `truncated` message
//! (its payload says so in words), and the rest is counted but not stored. `end` is always the last
//! message of a task that finished normally; a reader stops there.
//!
//! Progress: a line of output starting with `::progress::` is relayed as a progress report (it stays in
//! the output too): `::progress:: 40% compiling` (percent optional, 0 to 100), `::progress:: halfway`.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishError;
use bytes::{Bytes, BytesMut};
use taskpods_events::TaskId;
use taskpods_events::codec::HEADER_MSG_ID;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

/// Header: the message's position in the task's output (0-based, contiguous).
pub const HEADER_LOG_SEQ: &str = "Taskpods-Log-Seq";
/// Header: `stdout`, `stderr`, `truncated` or `end`.
pub const HEADER_LOG_KIND: &str = "Taskpods-Log-Kind";
/// Header: byte offset of a `stdout`/`stderr` chunk within its stream.
pub const HEADER_LOG_OFFSET: &str = "Taskpods-Log-Offset";
/// Header on `end`: stdout bytes produced.
pub const HEADER_STDOUT_BYTES: &str = "Taskpods-Stdout-Bytes";
/// Header on `end`: stderr bytes produced.
pub const HEADER_STDERR_BYTES: &str = "Taskpods-Stderr-Bytes";
/// Header on `end`: bytes produced but not stored (over the cap).
pub const HEADER_DROPPED_BYTES: &str = "Taskpods-Dropped-Bytes";
/// The marker that starts a progress line.
pub const PROGRESS_MARKER: &str = "::progress::";

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Kind {
    /// The `Taskpods-Log-Kind` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// How much of the end of the output the result carries.
pub const TAIL_BYTES: usize = 2048;

/// Counters for the result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputStats {
    /// Bytes the code wrote to stdout.
    pub stdout_bytes: u64,
    /// Bytes the code wrote to stderr.
    pub stderr_bytes: u64,
    /// Bytes not stored because of the cap (or a broken connection).
    pub dropped_bytes: u64,
    /// The last [`TAIL_BYTES`] of output, stdout and stderr as they arrived, stored or not.
    pub tail: Vec<u8>,
}

/// A progress line, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// The message.
    pub message: String,
    /// 0 to 100, when given.
    pub percent: Option<f32>,
}

/// Parses a line (without its newline) as a progress report.
pub fn parse_progress(line: &[u8]) -> Option<Progress> {
    let text = std::str::from_utf8(line).ok()?;
    let rest = text.strip_prefix(PROGRESS_MARKER)?.trim();
    let (percent, message) = match rest.split_once(char::is_whitespace) {
        Some((first, tail)) if first.ends_with('%') => (first, tail.trim()),
        None if rest.ends_with('%') => (rest, ""),
        _ => ("", rest),
    };
    let percent = percent
        .strip_suffix('%')
        .and_then(|p| p.parse::<f32>().ok())
        .filter(|p| (0.0..=100.0).contains(p));
    Some(Progress {
        message: message.to_owned(),
        percent,
    })
}

/// Publishes chunks in order, applying the cap.
#[derive(Debug)]
pub struct Writer {
    js: async_nats::jetstream::Context,
    subject: String,
    task: TaskId,
    chunk_bytes: usize,
    flush_interval: Duration,
    cap: u64,
    seq: u64,
    stored: u64,
    offsets: [u64; 2],
    stats: OutputStats,
    truncated: bool,
    broken: Option<PublishError>,
    buffers: [BytesMut; 2],
}

impl Writer {
    /// A writer for `task`'s output on `subject`.
    pub fn new(
        js: async_nats::jetstream::Context,
        subject: String,
        task: TaskId,
        chunk_bytes: usize,
        flush_interval: Duration,
        cap: u64,
    ) -> Self {
        Self {
            js,
            subject,
            task,
            chunk_bytes: chunk_bytes.max(1),
            flush_interval,
            cap,
            seq: 0,
            stored: 0,
            offsets: [0, 0],
            stats: OutputStats::default(),
            truncated: false,
            broken: None,
            buffers: [BytesMut::new(), BytesMut::new()],
        }
    }

    fn index(kind: Kind) -> usize {
        match kind {
            Kind::Stdout => 0,
            Kind::Stderr => 1,
        }
    }

    async fn send(&mut self, kind: &str, headers: &[(&str, String)], payload: Bytes) {
        if self.broken.is_some() {
            self.stats.dropped_bytes += payload.len() as u64;
            return;
        }
        let mut map = HeaderMap::new();
        map.insert(
            HEADER_MSG_ID,
            format!("{}:log:{}", self.task, self.seq).as_str(),
        );
        map.insert(HEADER_LOG_SEQ, self.seq.to_string().as_str());
        map.insert(HEADER_LOG_KIND, kind);
        for (k, v) in headers {
            map.insert(*k, v.as_str());
        }
        let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
        let len = payload.len() as u64;
        match crate::protocol::publish_acked(&self.js, self.subject.clone(), map, payload, give_up)
            .await
        {
            Ok(()) => self.seq += 1,
            Err(e) => {
                eprintln!("taskpods-agent: output stream broken: {e}");
                self.stats.dropped_bytes += len;
                self.broken = Some(e);
            }
        }
    }

    /// Takes `data` from `kind`: counts it, buffers what fits under the cap, sends full chunks.
    pub async fn push(&mut self, kind: Kind, data: &[u8]) {
        match kind {
            Kind::Stdout => self.stats.stdout_bytes += data.len() as u64,
            Kind::Stderr => self.stats.stderr_bytes += data.len() as u64,
        }
        let tail = &mut self.stats.tail;
        tail.extend_from_slice(&data[data.len().saturating_sub(TAIL_BYTES)..]);
        if tail.len() > TAIL_BYTES {
            tail.drain(..tail.len() - TAIL_BYTES);
        }
        let room = self.cap.saturating_sub(self.stored);
        let keep = usize::try_from(room).unwrap_or(usize::MAX).min(data.len());
        self.stored += keep as u64;
        self.stats.dropped_bytes += (data.len() - keep) as u64;
        self.buffers[Self::index(kind)].extend_from_slice(&data[..keep]);
        while self.buffers[Self::index(kind)].len() >= self.chunk_bytes {
            let chunk = self.buffers[Self::index(kind)]
                .split_to(self.chunk_bytes)
                .freeze();
            self.send_chunk(kind, chunk).await;
        }
        if keep < data.len() && !self.truncated {
            self.flush().await;
            self.truncated = true;
            let text = format!(
                "taskpods: output truncated: the cap of {} bytes (stdout and stderr together) was reached; further output is counted but not stored\n",
                self.cap
            );
            self.send("truncated", &[], Bytes::from(text)).await;
        }
    }

    async fn send_chunk(&mut self, kind: Kind, chunk: Bytes) {
        let offset = self.offsets[Self::index(kind)];
        self.offsets[Self::index(kind)] += chunk.len() as u64;
        self.send(
            kind.as_str(),
            &[(HEADER_LOG_OFFSET, offset.to_string())],
            chunk,
        )
        .await;
    }

    /// Sends whatever is buffered (stdout first).
    pub async fn flush(&mut self) {
        for kind in [Kind::Stdout, Kind::Stderr] {
            let i = Self::index(kind);
            if !self.buffers[i].is_empty() {
                let chunk = self.buffers[i].split().freeze();
                self.send_chunk(kind, chunk).await;
            }
        }
    }

    /// Flushes and sends the `end` message; returns the counters (or why output is incomplete).
    pub async fn finish(mut self) -> Result<OutputStats, PublishError> {
        self.flush().await;
        let stats = self.stats.clone();
        self.send(
            "end",
            &[
                (HEADER_STDOUT_BYTES, stats.stdout_bytes.to_string()),
                (HEADER_STDERR_BYTES, stats.stderr_bytes.to_string()),
                (HEADER_DROPPED_BYTES, stats.dropped_bytes.to_string()),
            ],
            Bytes::new(),
        )
        .await;
        match self.broken {
            Some(e) => Err(e),
            None => Ok(self.stats),
        }
    }
}

/// Finds progress lines in one stream.
#[derive(Debug, Default)]
struct LineScanner {
    line: Vec<u8>,
    overlong: bool,
}

impl LineScanner {
    const MAX_LINE: usize = 4096;

    fn feed(&mut self, data: &[u8], mut found: impl FnMut(Progress)) {
        for part in data.split_inclusive(|b| *b == b'\n') {
            let complete = part.ends_with(b"\n");
            let body = if complete {
                &part[..part.len() - 1]
            } else {
                part
            };
            if !self.overlong {
                if self.line.len() + body.len() > Self::MAX_LINE {
                    self.overlong = true;
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(body);
                }
            }
            if complete {
                if !self.overlong
                    && let Some(p) = parse_progress(&self.line)
                {
                    found(p);
                }
                self.line.clear();
                self.overlong = false;
            }
        }
    }
}

async fn read_into(
    mut from: impl AsyncRead + Unpin,
    kind: Kind,
    to: mpsc::Sender<(Kind, Bytes)>,
    progress: mpsc::Sender<Progress>,
) {
    let mut scanner = LineScanner::default();
    loop {
        let mut buf = BytesMut::with_capacity(64 << 10);
        match from.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                scanner.feed(&buf, |p| {
                    let _ = progress.try_send(p);
                });
                if to.send((kind, buf.freeze())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Streams `stdout` and `stderr` through `writer` until both end; relays progress lines.
pub async fn pump(
    mut writer: Writer,
    stdout: Option<impl AsyncRead + Unpin + Send + 'static>,
    stderr: Option<impl AsyncRead + Unpin + Send + 'static>,
    progress: mpsc::Sender<Progress>,
) -> Result<OutputStats, PublishError> {
    let (tx, mut rx) = mpsc::channel::<(Kind, Bytes)>(16);
    if let Some(out) = stdout {
        tokio::spawn(read_into(out, Kind::Stdout, tx.clone(), progress.clone()));
    }
    if let Some(err) = stderr {
        tokio::spawn(read_into(err, Kind::Stderr, tx.clone(), progress.clone()));
    }
    drop(tx);
    drop(progress);
    let mut tick = tokio::time::interval(writer.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            next = rx.recv() => match next {
                Some((kind, data)) => writer.push(kind, &data).await,
                None => break,
            },
            _ = tick.tick() => writer.flush().await,
        }
    }
    writer.finish().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_parse() {
        assert_eq!(
            parse_progress(b"::progress:: 40% compiling things"),
            Some(Progress {
                message: "compiling things".into(),
                percent: Some(40.0)
            })
        );
        assert_eq!(
            parse_progress(b"::progress:: halfway"),
            Some(Progress {
                message: "halfway".into(),
                percent: None
            })
        );
        assert_eq!(
            parse_progress(b"::progress:: 100%"),
            Some(Progress {
                message: String::new(),
                percent: Some(100.0)
            })
        );
        assert_eq!(
            parse_progress(b"::progress:: 140% over"),
            Some(Progress {
                message: "over".into(),
                percent: None
            })
        );
        assert_eq!(parse_progress(b"progress 40%"), None);
    }

    #[test]
    fn scanner_finds_progress_across_reads_and_skips_overlong_lines() {
        let mut scanner = LineScanner::default();
        let mut found = Vec::new();
        scanner.feed(b"hello\n::prog", |p| found.push(p));
        scanner.feed(b"ress:: 5% a\nx", |p| found.push(p));
        let long = vec![b'y'; 5000];
        scanner.feed(&long, |p| found.push(p));
        scanner.feed(b"\n::progress:: b\n", |p| found.push(p));
        let messages: Vec<&str> = found.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(messages, ["a", "b"]);
        assert_eq!(found[0].percent, Some(5.0));
    }
}
