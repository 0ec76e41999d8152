//! What the engine holds in memory per task, loop by loop.
//!
//! Each loop keeps some state per task while something can still happen to it: the event store's latest
//! state of each live task (shared by every loop), the intake's progress allowance, the gateway's live,
//! running and recently ended tasks, the timers' deadlines, the executor's held state and queued turns,
//! the no-op backend's sandboxes, the projector's cached views. Once a task has ended and its sandbox is gone, none of them keeps anything for it, so
//! the engine's memory does not grow with the tasks it has finished (`benches/README.md`, the `memory`
//! bench). The loops keep a [`HeldGauges`] current (shared through [`crate::context::EngineCtx`]);
//! [`crate::server::Engine::held_tasks`] reads it as a [`HeldTasks`] snapshot, which the tests check
//! drops back to zero once every task has ended.

use std::sync::atomic::{AtomicI64, Ordering};

/// A count of tasks one structure holds, kept current by the loop that owns it.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// The structure now holds `n` tasks.
    pub fn set(&self, n: usize) {
        self.0
            .store(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// The structure's count moved by `from` → `to` (for a structure split over several owners, such as
    /// the intake's workers).
    pub fn moved(&self, from: usize, to: usize) {
        let delta = i64::try_from(to).unwrap_or(i64::MAX) - i64::try_from(from).unwrap_or(i64::MAX);
        if delta != 0 {
            self.0.fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// The count now.
    pub fn get(&self) -> u64 {
        u64::try_from(self.0.load(Ordering::Relaxed)).unwrap_or(0)
    }
}

/// The gauges of one engine's per-task structures.
#[derive(Debug, Default)]
pub struct HeldGauges {
    /// Tasks with a progress allowance (token bucket) in an intake worker.
    pub intake_progress: Gauge,
    /// Tasks the gateway knows to be live.
    pub gateway_live: Gauge,
    /// Running tasks whose heartbeats the gateway watches.
    pub gateway_running: Gauge,
    /// Ended tasks whose sandbox may still run, remembered so their agents' hellos are answered from
    /// memory (forgotten once reaped).
    pub gateway_ended: Gauge,
    /// Task ids a hello named that had no task (bounded; forgotten when the task appears).
    pub gateway_unknown: Gauge,
    /// Armed deadlines.
    pub timers_deadlines: Gauge,
    /// Armed startup timeouts.
    pub timers_startups: Gauge,
    /// Tasks whose folded state the executor holds between turns.
    pub executor_held: Gauge,
    /// Tasks with a turn queued or in progress in the executor.
    pub executor_turns: Gauge,
    /// Sandboxes the no-op backend plays.
    pub noop_sandboxes: Gauge,
}

impl HeldGauges {
    /// The counts now, with the event store's held latest states (which the store counts itself) and
    /// the projector's (which lives outside the engine crate and counts itself).
    pub fn snapshot(&self, store_latest: u64, projector_cached: u64) -> HeldTasks {
        HeldTasks {
            store_latest,
            intake_progress: self.intake_progress.get(),
            gateway_live: self.gateway_live.get(),
            gateway_running: self.gateway_running.get(),
            gateway_ended: self.gateway_ended.get(),
            gateway_unknown: self.gateway_unknown.get(),
            timers_deadlines: self.timers_deadlines.get(),
            timers_startups: self.timers_startups.get(),
            executor_held: self.executor_held.get(),
            executor_turns: self.executor_turns.get(),
            noop_sandboxes: self.noop_sandboxes.get(),
            projector_cached,
        }
    }
}

/// How many tasks each per-task structure of an engine holds, at one moment (see [`HeldGauges`] for
/// what each field counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct HeldTasks {
    /// Tasks whose latest state the event store holds ([`crate::store::LatestStates`]): the one copy of a
    /// live task's folded state that the intake, gateway and timers start from.
    pub store_latest: u64,
    pub intake_progress: u64,
    pub gateway_live: u64,
    pub gateway_running: u64,
    pub gateway_ended: u64,
    pub gateway_unknown: u64,
    pub timers_deadlines: u64,
    pub timers_startups: u64,
    pub executor_held: u64,
    pub executor_turns: u64,
    pub noop_sandboxes: u64,
    /// Tasks whose views the projector's writer caches.
    pub projector_cached: u64,
}

impl HeldTasks {
    /// Entries over every structure.
    pub fn total(&self) -> u64 {
        self.store_latest
            + self.intake_progress
            + self.gateway_live
            + self.gateway_running
            + self.gateway_ended
            + self.gateway_unknown
            + self.timers_deadlines
            + self.timers_startups
            + self.executor_held
            + self.executor_turns
            + self.noop_sandboxes
            + self.projector_cached
    }
}
