//! Durable pull consumption that survives losing a NATS node, for the loops that share work through a
//! durable consumer (the engine's intake and executor, the projector). It lives here, in the lowest
//! crate that pulls, so the engine and the projector use the same one.
//!
//! A pull consumer's message stream keeps pull requests outstanding on the server it is connected to.
//! When that server dies the requests die with it, but the client still counts them as outstanding and
//! asks for no more: the stream reports missed heartbeats and would never deliver again. So on a missed
//! heartbeat (or a deleted consumer, no responders, or the stream ending) [`DurableMessages`] starts over:
//! it gets or creates the consumer again and issues fresh pull requests. Messages the old stream had
//! received but not yet handed out are redelivered by the server after the consumer's ack wait.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use async_nats::jetstream::{self, stream::Stream};
use futures::{FutureExt, StreamExt};
use tracing::{info, warn};

/// How big and how long-lived the pull requests are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PullRequests {
    /// Most messages one pull request asks for.
    pub batch: usize,
    /// How often the server says it is still there while it has nothing to deliver; two missed in a row
    /// mean the pull requests are lost and the consumption starts over.
    pub heartbeat: Duration,
    /// How long one pull request waits on the server.
    pub expires: Duration,
}

impl Default for PullRequests {
    /// What the client uses unless told otherwise.
    fn default() -> Self {
        Self {
            batch: 200,
            heartbeat: Duration::from_secs(15),
            expires: Duration::from_secs(30),
        }
    }
}

/// A durable pull consumer's messages, started over with fresh pull requests when the old ones are lost.
pub struct DurableMessages {
    stream: Stream,
    config: pull::Config,
    requests: PullRequests,
    messages: pull::Stream,
    /// The pull requests are lost and fresh ones not yet issued (kept across a cancelled `next`).
    lost: bool,
    loop_name: &'static str,
}

impl std::fmt::Debug for DurableMessages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableMessages")
            .field("consumer", &self.config.durable_name)
            .field("loop_name", &self.loop_name)
            .finish_non_exhaustive()
    }
}

impl DurableMessages {
    /// Gets or creates the durable consumer `config` on `stream` and starts pulling, for `loop_name`
    /// (in logs).
    pub async fn open(
        stream: &Stream,
        config: pull::Config,
        loop_name: &'static str,
    ) -> Result<Self, async_nats::Error> {
        Self::open_with(stream, config, PullRequests::default(), loop_name).await
    }

    /// [`DurableMessages::open`] with pull requests sized by `requests`.
    pub async fn open_with(
        stream: &Stream,
        config: pull::Config,
        requests: PullRequests,
        loop_name: &'static str,
    ) -> Result<Self, async_nats::Error> {
        let messages = subscribe(stream, &config, requests).await?;
        Ok(Self {
            stream: stream.clone(),
            config,
            requests,
            messages,
            lost: false,
            loop_name,
        })
    }

    /// The next message. Errors are logged; those that mean the outstanding pull requests are lost
    /// start the stream over (retrying with backoff while the server is unreachable). Never ends: the
    /// caller stops by no longer asking (it is cancel-safe).
    pub async fn next(&mut self) -> jetstream::Message {
        loop {
            if self.lost {
                self.restart().await;
            }
            match self.messages.next().await {
                Some(Ok(message)) => return message,
                Some(Err(e)) => {
                    let lost = matches!(
                        e.kind(),
                        MessagesErrorKind::MissingHeartbeat
                            | MessagesErrorKind::ConsumerDeleted
                            | MessagesErrorKind::NoResponders
                    );
                    warn!(loop_name = self.loop_name, error = %e, lost, "consumer error");
                    self.lost = lost;
                }
                None => self.lost = true,
            }
        }
    }

    /// Stops pulling (at shutdown) and returns the messages already received and not yet handed out,
    /// to hand them back.
    ///
    /// The pull subscription is dropped here, which unsubscribes its inbox, **before** anything is
    /// handed back: the server keeps this engine's pull requests waiting (up to their expiry) and
    /// delivers a nak'd message again to the first waiting request it finds with interest. With the
    /// subscription still open that could be this engine's own request: the message then landed in a
    /// buffer nobody reads any more and reached another replica only after the consumer's ack wait.
    /// The unsubscribe goes out on the same connection before any nak, so the server drops this
    /// engine's requests (no interest) before it redelivers.
    pub fn stop(self) -> Vec<jetstream::Message> {
        let Self { mut messages, .. } = self;
        let mut out = Vec::new();
        while let Some(Some(Ok(message))) = messages.next().now_or_never() {
            out.push(message);
        }
        drop(messages);
        out
    }

    async fn restart(&mut self) {
        let mut delay = Duration::from_millis(200);
        loop {
            match subscribe(&self.stream, &self.config, self.requests).await {
                Ok(messages) => {
                    self.messages = messages;
                    self.lost = false;
                    info!(
                        loop_name = self.loop_name,
                        "consumer started over with fresh pull requests"
                    );
                    return;
                }
                Err(e) => {
                    warn!(loop_name = self.loop_name, error = %e, retry_in = ?delay, "consumer unavailable");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

async fn subscribe(
    stream: &Stream,
    config: &pull::Config,
    requests: PullRequests,
) -> Result<pull::Stream, async_nats::Error> {
    let name = config.durable_name.clone().unwrap_or_default();
    let consumer: PullConsumer = stream.get_or_create_consumer(&name, config.clone()).await?;
    Ok(consumer
        .stream()
        .max_messages_per_batch(requests.batch)
        .heartbeat(requests.heartbeat)
        .expires(requests.expires)
        .messages()
        .await?)
}
