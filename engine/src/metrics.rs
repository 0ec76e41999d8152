//! Prometheus metrics of the engine, served at `/metrics` by the HTTP server.
//!
//! One registry per process ([`METRICS`]): the engine's loops, the store and the backends record into it
//! without a handle threaded through every call, the way the `metrics` facade and the Go client's default
//! registry work. A process runs one engine in production; tests that assert on the numbers run their
//! engine in a test binary of their own.
//!
//! What is recorded where (each at the one place every such event passes):
//! - `taskpods_transitions_total{kind}` and `taskpods_phase_duration_seconds{phase}`: the event store's
//!   `execute`, after an append (phases: `accepted_to_scheduled`, `accepted_to_running`, `accepted_to_ended`,
//!   `running_to_ended`);
//! - `taskpods_dead_letters_total{reason}`: intake's dead-lettering;
//! - `taskpods_backend_errors_total{kind}`: the executor, when a backend call fails;
//! - `taskpods_kubernetes_api_seconds{verb,outcome}`: the Kubernetes backend's Job calls;
//! - `taskpods_nats_reconnects_total`: the NATS connection's event callback;
//! - `taskpods_store_loads_total` and `taskpods_store_events_read_total`: the event store's whole-history
//!   reads (`store.rs`, `read`), which the loops keep off their per-event path;
//! - `taskpods_store_lagging_reads_total`: the event store, when a refusal was judged on a read behind
//!   the stream leader (a lagging replica) and the input is judged again;
//! - `taskpods_executor_tasks_held`: the executor, when it holds or drops a task's folded state;
//! - `taskpods_nats_reconnects_total`, `taskpods_nats_connected`, `taskpods_nats_slow_consumers_total`: the
//!   NATS connection's event callback (0 connected while degraded: the loops wait, nothing is lost);
//! - `taskpods_in_flight{loop}`: messages the intake and the executor hold unacked (bounded by their max
//!   in flight, so memory stays bounded while NATS is slow);
//! - `taskpods_handed_over_total{loop}`: messages given back to their stream (nak) at shutdown, for
//!   another replica;
//! - `taskpods_lease_held{lease}`: 1 while this replica holds the lease;
//! - `taskpods_commands_total{outcome}`, `taskpods_tasks{state}` and `taskpods_projector_lag_*`: read when
//!   scraped (intake's own counters, the active view, the projector's consumer), see [`render`];
//! - `taskpods_projector_events_total{outcome}`, `..._conflicts_total`, `..._heal_retries_total` and
//!   `..._gaps_total` (events folded past a real gap in the stream): the projector's own counters, read
//!   when scraped.

use std::fmt::Write as _;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use taskpods_events::{Event, EventBody, Task, TaskState};

use crate::intake::IntakeStats;

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Buckets for durations from a few milliseconds (no-op backend) to the 30-minute deadline.
const PHASE_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0,
];

/// Every instrument the engine records into.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Events appended by this engine, by kind.
    pub transitions: IntCounterVec,
    /// Time between lifecycle points of a task, observed when the later point is appended.
    pub phase_seconds: HistogramVec,
    /// Commands dead-lettered, by reason.
    pub dead_letters: IntCounterVec,
    /// Backend calls that failed, by kind (`transient`, `permanent`).
    pub backend_errors: IntCounterVec,
    /// Kubernetes API calls of the backend, by verb and outcome.
    pub kube_api_seconds: HistogramVec,
    /// Times the NATS connection was re-established.
    pub nats_reconnects: IntCounter,
    /// Whole-history reads of a task by the event store.
    pub store_loads: IntCounter,
    /// Events returned by those reads.
    pub store_events_read: IntCounter,
    /// Refusals judged on a read behind the stream leader, judged again.
    pub store_lagging_reads: IntCounter,
    /// Live tasks whose folded state the executor holds between their events.
    pub executor_tasks_held: IntGauge,
    /// 1 while the NATS connection is up, 0 while it is lost (the client reconnects on its own).
    pub nats_connected: IntGauge,
    /// Times a subscription fell behind and the client dropped messages for it.
    pub nats_slow_consumers: IntCounter,
    /// Messages held unacked, by loop (`intake`, `executor`).
    pub in_flight: IntGaugeVec,
    /// Messages given back to their stream at shutdown for another replica, by loop.
    pub handed_over: IntCounterVec,
    /// 1 while this replica holds the lease, by lease name.
    pub lease_held: IntGaugeVec,
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        // The names and labels below are constants: registering them cannot fail but for a duplicate
        // name, which would be a bug caught by the first test that renders the metrics.
        let transitions = IntCounterVec::new(
            Opts::new(
                "taskpods_transitions_total",
                "Events appended by this engine, by kind.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let phase_seconds = HistogramVec::new(
            HistogramOpts::new(
                "taskpods_phase_duration_seconds",
                "Seconds between lifecycle points of a task (accepted_to_scheduled, accepted_to_running, accepted_to_ended, running_to_ended).",
            )
            .buckets(PHASE_BUCKETS.to_vec()),
            &["phase"],
        )
        .expect("valid metric");
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "taskpods_dead_letters_total",
                "Commands dead-lettered, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let backend_errors = IntCounterVec::new(
            Opts::new(
                "taskpods_backend_errors_total",
                "Backend calls that failed, by kind.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let kube_api_seconds = HistogramVec::new(
            HistogramOpts::new(
                "taskpods_kubernetes_api_seconds",
                "Latency of the backend's Kubernetes API calls, by verb and outcome.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
            &["verb", "outcome"],
        )
        .expect("valid metric");
        let nats_reconnects = IntCounter::new(
            "taskpods_nats_reconnects_total",
            "Times the engine's NATS connection was re-established.",
        )
        .expect("valid metric");
        let store_loads = IntCounter::new(
            "taskpods_store_loads_total",
            "Whole-history reads of a task by the event store (per event they would grow with history).",
        )
        .expect("valid metric");
        let store_events_read = IntCounter::new(
            "taskpods_store_events_read_total",
            "Events returned by the event store's whole-history reads.",
        )
        .expect("valid metric");
        let store_lagging_reads = IntCounter::new(
            "taskpods_store_lagging_reads_total",
            "Refusals judged on a read behind the stream leader (a lagging replica), judged again on a current read.",
        )
        .expect("valid metric");
        let executor_tasks_held = IntGauge::new(
            "taskpods_executor_tasks_held",
            "Live tasks whose folded state the executor holds (none is held once a task is reaped).",
        )
        .expect("valid metric");
        let nats_connected = IntGauge::new(
            "taskpods_nats_connected",
            "1 while the engine's NATS connection is up, 0 while it is lost.",
        )
        .expect("valid metric");
        let nats_slow_consumers = IntCounter::new(
            "taskpods_nats_slow_consumers_total",
            "Times a subscription of the engine fell behind and the client dropped messages for it.",
        )
        .expect("valid metric");
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "taskpods_in_flight",
                "Messages held unacked by a loop (bounded by its max in flight).",
            ),
            &["loop"],
        )
        .expect("valid metric");
        let handed_over = IntCounterVec::new(
            Opts::new(
                "taskpods_handed_over_total",
                "Messages given back to their stream at shutdown, for another replica, by loop.",
            ),
            &["loop"],
        )
        .expect("valid metric");
        let lease_held = IntGaugeVec::new(
            Opts::new(
                "taskpods_lease_held",
                "1 while this replica holds the lease, by lease name.",
            ),
            &["lease"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(transitions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(phase_seconds.clone()),
            Box::new(dead_letters.clone()),
            Box::new(backend_errors.clone()),
            Box::new(kube_api_seconds.clone()),
            Box::new(nats_reconnects.clone()),
            Box::new(store_loads.clone()),
            Box::new(store_events_read.clone()),
            Box::new(store_lagging_reads.clone()),
            Box::new(executor_tasks_held.clone()),
            Box::new(nats_connected.clone()),
            Box::new(nats_slow_consumers.clone()),
            Box::new(in_flight.clone()),
            Box::new(handed_over.clone()),
            Box::new(lease_held.clone()),
        ] {
            registry.register(collector).expect("unique metric names");
        }
        // Series that exist before their first event, so a dashboard or alert sees 0, not "no data".
        for kind in ["transient", "permanent"] {
            backend_errors.with_label_values(&[kind]);
        }
        for verb in ["create", "delete"] {
            for outcome in ["ok", "error"] {
                kube_api_seconds.with_label_values(&[verb, outcome]);
            }
        }
        for name in ["intake", "executor"] {
            in_flight.with_label_values(&[name]);
            handed_over.with_label_values(&[name]);
        }
        for reason in [
            "undecodable",
            "bad_subject",
            "content_type",
            "too_large",
            "panicked",
            "exhausted",
        ] {
            dead_letters.with_label_values(&[reason]);
        }
        Self {
            registry,
            transitions,
            phase_seconds,
            dead_letters,
            backend_errors,
            kube_api_seconds,
            nats_reconnects,
            store_loads,
            store_events_read,
            store_lagging_reads,
            executor_tasks_held,
            nats_connected,
            nats_slow_consumers,
            in_flight,
            handed_over,
            lease_held,
        }
    }

    /// Records what an append did to a task: `before` is the task as it was, `appended` the new events.
    pub fn appended(&self, before: &Task, appended: &[Event]) {
        let mut task = before.clone();
        for event in appended {
            self.transitions
                .with_label_values(&[event.body.kind()])
                .inc();
            let was = task.state;
            task = taskpods_events::evolve(task, event);
            let Some(accepted) = task.accepted_at else {
                continue;
            };
            let phase = match (&event.body, was, task.state) {
                (EventBody::Scheduled { .. }, _, _) => Some("accepted_to_scheduled"),
                (_, w, TaskState::Running) if w != TaskState::Running => {
                    Some("accepted_to_running")
                }
                (_, w, now) if !w.is_terminal() && now.is_terminal() => Some("accepted_to_ended"),
                _ => None,
            };
            if let Some(phase) = phase {
                self.phase_seconds
                    .with_label_values(&[phase])
                    .observe(seconds_between(accepted, event.at));
            }
            // How long the code ran (or was let to), for tasks that got that far.
            if let (Some(running), false, true) =
                (task.running_at, was.is_terminal(), task.state.is_terminal())
            {
                self.phase_seconds
                    .with_label_values(&["running_to_ended"])
                    .observe(seconds_between(running, event.at));
            }
        }
    }

    /// Times one Kubernetes API call of the backend.
    pub fn kube_call(&self, verb: &str, elapsed: Duration, ok: bool) {
        self.kube_api_seconds
            .with_label_values(&[verb, if ok { "ok" } else { "error" }])
            .observe(elapsed.as_secs_f64());
    }
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from)
        .num_microseconds()
        .map_or(0.0, |us| us.max(0) as f64 / 1e6)
}

/// The states a live (non-terminal) task can be in.
const LIVE_STATES: &[&str] = &["accepted", "scheduled", "starting", "running", "cancelling"];

/// What is read when `/metrics` is scraped rather than recorded as it happens.
#[derive(Debug, Default, Clone)]
pub struct Sampled {
    /// Live tasks by state (from the active view), when it could be read.
    pub tasks_by_state: Option<Vec<(String, u64)>>,
    /// The projector's lag, events and seconds, when it could be read.
    pub projector_lag: Option<(u64, f64)>,
    /// The projector's counters (under a running engine).
    pub projector: Option<std::sync::Arc<taskpods_projections::ProjectorStats>>,
}

/// The exposition text: the registry's instruments, intake's counters, and what was sampled.
pub fn render(intake: Option<&IntakeStats>, sampled: &Sampled) -> String {
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&METRICS.registry.gather(), &mut out);
    let mut text = String::from_utf8(out).unwrap_or_default();
    if let Some(stats) = intake {
        counters_by_outcome(
            &mut text,
            "taskpods_commands_total",
            "Commands handled by this engine's intake, by outcome.",
            [
                ("applied", &stats.applied),
                ("rejected", &stats.rejected),
                ("refused", &stats.refused),
                ("dead_lettered", &stats.dead_lettered),
                ("retried", &stats.retried),
            ],
        );
    }
    if let Some(tasks) = &sampled.tasks_by_state {
        text.push_str(
            "# HELP taskpods_tasks Live tasks by state (from the active view).\n# TYPE taskpods_tasks gauge\n",
        );
        // Every live state is present, at 0 when no task is in it: an alert sees 0, not "no data".
        let mut counts: std::collections::BTreeMap<&str, u64> =
            LIVE_STATES.iter().map(|s| (*s, 0)).collect();
        for (state, count) in tasks {
            *counts.entry(state.as_str()).or_default() += count;
        }
        for (state, count) in counts {
            let _ = writeln!(text, "taskpods_tasks{{state=\"{state}\"}} {count}");
        }
    }
    if let Some((events, seconds)) = sampled.projector_lag {
        let _ = write!(
            text,
            "# HELP taskpods_projector_lag_events Events appended but not yet folded into the views.\n\
             # TYPE taskpods_projector_lag_events gauge\ntaskpods_projector_lag_events {events}\n\
             # HELP taskpods_projector_lag_seconds Age of the oldest event not yet folded into the views.\n\
             # TYPE taskpods_projector_lag_seconds gauge\ntaskpods_projector_lag_seconds {seconds}\n"
        );
    }
    if let Some(stats) = &sampled.projector {
        counters_by_outcome(
            &mut text,
            "taskpods_projector_events_total",
            "Events the projector took, by what became of them.",
            [
                ("applied", &stats.applied),
                ("skipped", &stats.skipped),
                ("unknown", &stats.unknown),
                ("undecodable", &stats.undecodable),
                ("healed", &stats.healed),
            ],
        );
        let _ = write!(
            text,
            "# HELP taskpods_projector_conflicts_total Revision conflicts with other writers of the views.\n\
             # TYPE taskpods_projector_conflicts_total counter\ntaskpods_projector_conflicts_total {}\n\
             # HELP taskpods_projector_heal_retries_total Reads of missing events repeated because they came back short (a lagging stream replica).\n\
             # TYPE taskpods_projector_heal_retries_total counter\ntaskpods_projector_heal_retries_total {}\n\
             # HELP taskpods_projector_gaps_total Events missing from the stream that the views were folded past.\n\
             # TYPE taskpods_projector_gaps_total counter\ntaskpods_projector_gaps_total {}\n",
            stats.conflicts.load(Ordering::Relaxed),
            stats.heal_retries.load(Ordering::Relaxed),
            stats.gaps.load(Ordering::Relaxed),
        );
    }
    text
}

/// One counter family with an `outcome` label, in the text exposition format.
fn counters_by_outcome<const N: usize>(
    text: &mut String,
    name: &str,
    help: &str,
    counters: [(&str, &AtomicU64); N],
) {
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} counter");
    for (outcome, counter) in counters {
        let _ = writeln!(
            text,
            "{name}{{outcome=\"{outcome}\"}} {}",
            counter.load(Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_family_is_written_with_its_help_type_and_one_line_per_outcome() {
        let (applied, refused) = (AtomicU64::new(7), AtomicU64::new(0));
        let mut text = String::new();
        counters_by_outcome(
            &mut text,
            "taskpods_commands_total",
            "Commands handled.",
            [("applied", &applied), ("refused", &refused)],
        );
        assert_eq!(
            text,
            "# HELP taskpods_commands_total Commands handled.\n\
             # TYPE taskpods_commands_total counter\n\
             taskpods_commands_total{outcome=\"applied\"} 7\n\
             taskpods_commands_total{outcome=\"refused\"} 0\n"
        );
    }
}
