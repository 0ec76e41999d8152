//! The agent's side of the wire: connecting, asking for instructions (`hello`), and publishing reports to
//! JetStream with deduplicating message ids, retried until acked.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishError;
use chrono::{DateTime, Utc};
use taskpods_events::codec::{self, CodecError, HEADER_CONTENT_TYPE, HEADER_MSG_ID, MSGPACK};
use taskpods_events::{AgentReport, Encoding, HelloReply, Instructions, TaskId, TaskOutcome};

use crate::{AgentError, Config, VERSION};

/// What went wrong with the last attempt to get instructions (reported when the deadline passes).
#[derive(Debug, thiserror::Error)]
pub enum HelloFailure {
    /// No attempt was made: the deadline had passed already.
    #[error("no answer")]
    NoAnswer,
    /// The engine answered `Wait` (it has not recorded the Job yet).
    #[error("engine said wait")]
    Wait,
    /// The request got no reply within its timeout.
    #[error("timed out")]
    TimedOut,
    /// The request failed (no responders, connection lost).
    #[error(transparent)]
    Request(async_nats::RequestError),
    /// The reply could not be decoded.
    #[error(transparent)]
    Decode(CodecError),
}

pub(crate) fn until(deadline: DateTime<Utc>) -> Duration {
    (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO)
}

/// Connects to NATS, retrying with backoff until the deadline.
pub async fn connect(config: &Config) -> Result<async_nats::Client, AgentError> {
    let mut delay = Duration::from_millis(100);
    loop {
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("taskpods-agent {}", config.task))
            .custom_inbox_prefix(taskpods_events::subject::task_inbox_prefix(config.task))
            .retry_on_initial_connect();
        if let Some(crate::config::Secret(creds)) = &config.nats_credentials {
            options = options
                .credentials(creds)
                .map_err(AgentError::Credentials)?;
        }
        let addrs: Vec<async_nats::ServerAddr> = config
            .nats_urls
            .iter()
            .filter_map(|u| u.parse().ok())
            .collect();
        if addrs.is_empty() {
            return Err(AgentError::NoUrl);
        }
        let left = until(config.deadline);
        match tokio::time::timeout(left.max(Duration::from_millis(1)), options.connect(addrs)).await
        {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e)) if until(config.deadline) > delay => {
                eprintln!("taskpods-agent: connect failed ({e}); retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Ok(Err(e)) => return Err(AgentError::Connect(e)),
            Err(_) => return Err(AgentError::ConnectDeadline),
        }
    }
}

/// Asks for the instructions until the engine answers `Run`, says `Stop`, or the deadline passes.
pub async fn hello(
    client: &async_nats::Client,
    config: &Config,
) -> Result<Instructions, AgentError> {
    let subject = config.names.agent_hello(config.task);
    let payload = codec::to_msgpack(&AgentReport::Hello {
        agent_version: Some(VERSION.to_owned()),
    })
    .map_err(AgentError::EncodeHello)?;
    let mut delay = Duration::from_millis(50);
    let mut last = HelloFailure::NoAnswer;
    while until(config.deadline) > Duration::ZERO {
        let asked = tokio::time::timeout(
            Duration::from_secs(3),
            client.request(subject.clone(), payload.clone().into()),
        )
        .await;
        let wait = match asked {
            Ok(Ok(reply)) => {
                match codec::decode::<HelloReply>("hello reply", &reply.payload, Encoding::Msgpack)
                {
                    Ok(HelloReply::Run(instructions)) => return Ok(instructions),
                    Ok(HelloReply::Stop { reason }) => return Err(AgentError::Stopped(reason)),
                    Ok(HelloReply::Wait { retry_after_ms }) => {
                        last = HelloFailure::Wait;
                        Duration::from_millis(retry_after_ms.clamp(10, 5000))
                    }
                    Err(e) => {
                        last = HelloFailure::Decode(e);
                        delay
                    }
                }
            }
            Ok(Err(e)) => {
                last = HelloFailure::Request(e);
                delay
            }
            Err(_) => {
                last = HelloFailure::TimedOut;
                delay
            }
        };
        tokio::time::sleep(wait.min(until(config.deadline))).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
    Err(AgentError::NoInstructions(last))
}

/// Publishes to JetStream and waits for the ack, retrying (same `Nats-Msg-Id`, so at most once stored)
/// until `give_up`.
pub(crate) async fn publish_acked(
    js: &async_nats::jetstream::Context,
    subject: String,
    headers: HeaderMap,
    payload: bytes::Bytes,
    give_up: tokio::time::Instant,
) -> Result<(), PublishError> {
    let mut delay = Duration::from_millis(50);
    loop {
        let attempt = async {
            js.publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await?
                .await
        };
        let error = match attempt.await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if tokio::time::Instant::now() + delay > give_up {
            return Err(error);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// The msg id of the agent's result for `task` (one per task, ever).
pub fn result_msg_id(task: TaskId) -> String {
    format!("{task}:result")
}

/// The msg id of the `n`-th progress report of `task`.
pub fn progress_msg_id(task: TaskId, n: u64) -> String {
    format!("{task}:progress:{n}")
}

pub(crate) fn report_headers(msg_id: &str, kind: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_MSG_ID, msg_id);
    headers.insert(HEADER_CONTENT_TYPE, MSGPACK);
    headers.insert(codec::HEADER_KIND, kind);
    headers
}

pub(crate) async fn publish_result(
    js: &async_nats::jetstream::Context,
    config: &Config,
    outcome: &TaskOutcome,
) -> Result<(), AgentError> {
    let payload = codec::to_msgpack(&AgentReport::Result(outcome.clone()))
        .map_err(AgentError::EncodeResult)?;
    // Keep trying well past the deadline: the engine may be restarting, and the msg id makes it once.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
    publish_acked(
        js,
        config.names.agent_report(config.task, "result"),
        report_headers(&result_msg_id(config.task), "result"),
        payload.into(),
        give_up,
    )
    .await
    .map_err(AgentError::Report)
}
