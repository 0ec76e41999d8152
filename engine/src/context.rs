//! What every engine loop shares, built once at start-up by [`crate::server`] and handed to each loop as
//! an `Arc<EngineCtx>` (as kube-runtime hands a controller its context): the NATS connection and
//! JetStream, the streams and names, the event store, the bucket settings, the clock, the shutdown
//! token and the gauges of what each loop holds per task. A loop's `run(ctx, config, ...)` takes only
//! this and its own settings.

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use taskpods_events::{Names, TaskId};
use taskpods_projections::BucketSettings;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::store::EventStore;
use crate::topology::Topology;

/// The handles every loop of one engine shares.
#[derive(Debug)]
pub struct EngineCtx {
    /// The NATS connection (agents' hellos and heartbeats, command replies).
    pub nats: async_nats::Client,
    /// JetStream over that connection.
    pub js: jetstream::Context,
    /// The streams and buckets, as ensured at start-up.
    pub topology: Topology,
    /// The event store over the event stream.
    pub store: EventStore,
    /// Replicas and storage of the buckets the loops open (views, the reconciler's lease).
    pub buckets: BucketSettings,
    /// Where every loop reads the time.
    pub clock: Clock,
    /// Cancelled when the engine stops; every loop finishes the work in hand and returns.
    pub shutdown: CancellationToken,
    /// This replica's name (leases, the `Taskpods-Engine` header of its events, logs).
    pub engine_id: String,
    /// How long work in hand may take to finish after `shutdown` before it is handed back (nak).
    pub shutdown_grace: std::time::Duration,
    /// How many tasks each loop holds something for ([`crate::held`]), kept current by the loops.
    pub held: crate::held::HeldGauges,
    /// How long past a task's deadline a result its agent sent before the deadline, still queued for
    /// the intake, holds the timeout off ([`crate::timers::TimersConfig::result_grace`]).
    pub result_grace: std::time::Duration,
}

impl EngineCtx {
    /// The subject, stream and bucket names in use.
    pub fn names(&self) -> &Names {
        &self.topology.names
    }

    /// Whether `task`'s agent has a result in the command queue that the intake has not applied yet:
    /// the stream keeps a command until the intake acks it (work-queue retention). An agent that
    /// reported and exited looks like a lost one (silent, its pod gone) while its result waits behind a
    /// backlog, so whoever would fail the task for silence asks this first. Read from the stream's
    /// leader (a stored-message get), not a replica that may lag.
    pub async fn agent_result_queued(
        &self,
        task: TaskId,
    ) -> Result<bool, jetstream::stream::LastRawMessageError> {
        Ok(self.queued_agent_result(task).await?.is_some())
    }

    /// When the command stream stored `task`'s agent result that the intake has not applied yet, if
    /// one waits (see [`EngineCtx::agent_result_queued`]): the server's time of receipt.
    pub async fn queued_agent_result(
        &self,
        task: TaskId,
    ) -> Result<Option<DateTime<Utc>>, jetstream::stream::LastRawMessageError> {
        let subject = self.names().agent_report(task, "result");
        match self
            .topology
            .commands
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(message) => Ok(Some(taskpods_projections::log::to_chrono(
                message.time.unix_timestamp_nanos(),
            ))),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether `task`'s timeout, its `deadline` passed at `now`, waits for the task's result: the agent
    /// sent one *before* the deadline (the command stream received it then) and it still waits for the
    /// intake, behind a backlog or with no intake running. The deadline is when the code must have
    /// finished, not when the engine must have read its report; a result sent after the deadline does
    /// not hold it off. Bounded: not past `deadline` + [`EngineCtx::result_grace`], whatever the queue
    /// says. A queue that cannot be read counts as holding such a result, within the same bound.
    pub async fn deadline_waits_for_result(
        &self,
        task: TaskId,
        deadline: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> bool {
        let grace =
            chrono::TimeDelta::from_std(self.result_grace).unwrap_or(chrono::TimeDelta::MAX);
        if now >= deadline + grace {
            return false;
        }
        match self.queued_agent_result(task).await {
            Ok(Some(sent)) => sent <= deadline,
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(%task, error = %e, "deadline passed but the command queue cannot be read; waiting for a result sent in time");
                true
            }
        }
    }
}
