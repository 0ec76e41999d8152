//! What every engine loop shares, built once at start-up by [`crate::server`] and handed to each loop as
//! an `Arc<EngineCtx>` (as kube-runtime hands a controller its context): the NATS connection and
//! JetStream, the streams and names, the event store, the bucket settings, the clock, the shutdown
//! token and the gauges of what each loop holds per task. A loop's `run(ctx, config, ...)` takes only
//! this and its own settings.

use async_nats::jetstream;
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
        let subject = self.names().agent_report(task, "result");
        match self
            .topology
            .commands
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}
