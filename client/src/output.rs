//! A task's output as the agent stored it on `<prefix>.log.<task>` (stream `TASKPODS_LOG`): ordered chunks
//! of stdout and stderr, one `truncated` marker when the cap was reached, and an `end` marker last. The
//! chunk format is the agent's (`taskpods_agent::output`).
//!
//! Chunks are addressed by their log stream sequence, so a reader can stop and resume anywhere:
//! [`Client::output_page`] reads what is stored after a cursor (bounded in bytes, for paging and
//! downloads), [`Client::follow_output`] reads from a cursor and then live until the `end` marker.

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull::OrderedConfig},
    stream::{DirectGetErrorKind, Stream},
};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use taskpods_events::TaskId;

use crate::{Client, ClientError, unreachable};

/// The header naming a chunk's kind (see `taskpods_agent::output`).
pub const HEADER_LOG_KIND: &str = "Taskpods-Log-Kind";

/// One piece of a task's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Bytes the code wrote to stdout.
    Stdout(Bytes),
    /// Bytes the code wrote to stderr.
    Stderr(Bytes),
    /// The cap was reached; the text says so.
    Truncated(String),
    /// The agent finished the output.
    End,
}

impl Piece {
    /// Reads a stored chunk; `None` for a kind this version does not know (skipped by readers).
    pub fn from_message(kind: Option<&str>, payload: &Bytes) -> Option<Self> {
        match kind? {
            "stdout" => Some(Self::Stdout(payload.clone())),
            "stderr" => Some(Self::Stderr(payload.clone())),
            "truncated" => Some(Self::Truncated(
                String::from_utf8_lossy(payload).into_owned(),
            )),
            "end" => Some(Self::End),
            _ => None,
        }
    }

    /// The bytes it adds to the output a person reads (the truncation notice included).
    pub fn len(&self) -> usize {
        match self {
            Self::Stdout(b) | Self::Stderr(b) => b.len(),
            Self::Truncated(text) => text.len(),
            Self::End => 0,
        }
    }

    /// Whether it adds nothing to read.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A piece with its place in the log stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The log stream sequence: the cursor to resume after.
    pub seq: u64,
    /// What it holds.
    pub piece: Piece,
}

/// Stored output read from a cursor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutputPage {
    /// The chunks, in order.
    pub chunks: Vec<Chunk>,
    /// The cursor for the next page (the last chunk's sequence, or the cursor given when none came).
    pub next: u64,
    /// Whether the `end` marker was read: the output is complete.
    pub end: bool,
}

impl Client {
    async fn log_stream(&self) -> Result<Stream, ClientError> {
        self.js
            .get_stream(self.config.names.log_stream())
            .await
            .map_err(unreachable)
    }

    /// Whether anything of `task`'s output is stored after log sequence `after`.
    async fn has_output_after(
        &self,
        stream: &Stream,
        task: TaskId,
        after: u64,
    ) -> Result<bool, ClientError> {
        match stream
            .direct_get_next_for_subject(self.config.names.log(task), Some(after + 1))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(false),
            Err(e) => Err(unreachable(e)),
        }
    }

    /// The chunks of `task`'s output stored after log sequence `after` (0: from the start), until about
    /// `max_bytes` have been read (at least one chunk), the `end` marker, or what is stored now.
    pub async fn output_page(
        &self,
        task: TaskId,
        after: u64,
        max_bytes: usize,
    ) -> Result<OutputPage, ClientError> {
        let stream = self.log_stream().await?;
        let mut page = OutputPage {
            next: after,
            ..OutputPage::default()
        };
        if !self.has_output_after(&stream, task, after).await? {
            return Ok(page);
        }
        let mut messages = ordered(&stream, self.config.names.log(task), after).await?;
        let mut bytes = 0;
        while let Some(message) = messages.try_next().await.map_err(unreachable)? {
            let info = message.info().map_err(unreachable)?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            page.next = seq;
            if let Some(piece) = piece(&message) {
                bytes += piece.len();
                page.end = piece == Piece::End;
                page.chunks.push(Chunk { seq, piece });
            }
            if page.end || pending == 0 || bytes >= max_bytes {
                break;
            }
        }
        Ok(page)
    }

    /// `task`'s output after log sequence `after`, then live; the stream ends after the `end` marker.
    /// It never ends by itself for a task whose agent died without one: callers stop following when the
    /// task has ended and nothing came for a while.
    pub async fn follow_output(
        &self,
        task: TaskId,
        after: u64,
    ) -> Result<impl futures::Stream<Item = Result<Chunk, ClientError>> + use<>, ClientError> {
        let stream = self.log_stream().await?;
        let messages = ordered(&stream, self.config.names.log(task), after).await?;
        Ok(messages
            .map_err(unreachable)
            .and_then(|message| async move {
                let seq = message.info().map_err(unreachable)?.stream_sequence;
                Ok((seq, piece(&message)))
            })
            .try_filter_map(
                |(seq, piece)| async move { Ok(piece.map(|piece| Chunk { seq, piece })) },
            )
            .scan(false, |ended, chunk| {
                // Stop after the end marker (it is still handed out).
                if *ended {
                    return futures::future::ready(None);
                }
                *ended = matches!(
                    &chunk,
                    Ok(Chunk {
                        piece: Piece::End,
                        ..
                    })
                );
                futures::future::ready(Some(chunk))
            }))
    }
}

async fn ordered(
    stream: &Stream,
    subject: String,
    after: u64,
) -> Result<jetstream::consumer::pull::Ordered, ClientError> {
    let deliver_policy = if after == 0 {
        DeliverPolicy::All
    } else {
        DeliverPolicy::ByStartSequence {
            start_sequence: after + 1,
        }
    };
    stream
        .create_consumer(OrderedConfig {
            filter_subject: subject,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(unreachable)?
        .messages()
        .await
        .map_err(unreachable)
}

fn piece(message: &jetstream::Message) -> Option<Piece> {
    let kind = message
        .headers
        .as_ref()
        .and_then(|h| h.get(HEADER_LOG_KIND))
        .map(|v| v.as_str());
    Piece::from_message(kind, &message.payload)
}
