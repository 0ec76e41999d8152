//! Operations endpoints, for Prometheus and the kubelet rather than people: `/metrics`, `/healthz`,
//! `/readyz`. They sit outside the access layer: probes and scrapers carry no token, and nothing here
//! reveals task data (counts and timings only). The NetworkPolicy in deploy/engine admits only the
//! namespace's own pods.
//!
//! - `/healthz` (liveness): 200 while the process serves and, under `taskpods serve`, every engine loop
//!   is still running; a stopped loop means the process should be restarted.
//! - `/readyz` (readiness): also the NATS connection is up, NATS answered the last status check and the
//!   projector is not stuck (its oldest unfolded event is younger than [`STUCK_AFTER`]); 503 with the
//!   reasons otherwise.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AppState;
use crate::intake::IntakeStats;
use crate::metrics::{self, Sampled};

/// A projector whose oldest unfolded event is older than this is stuck: the engine is not ready.
pub const STUCK_AFTER_SECS: f64 = 60.0;
/// [`STUCK_AFTER_SECS`] as a name for the docs.
pub const STUCK_AFTER: &str = "60 s";

/// What a running engine tells its HTTP server about itself (absent under `taskpods ui`).
#[derive(Debug, Default)]
pub struct EngineProbe {
    /// The intake's counters, for `taskpods_commands_total`.
    pub intake: Arc<IntakeStats>,
    /// The projector's counters, for `taskpods_projector_*_total`.
    pub projector: Arc<taskpods_projections::ProjectorStats>,
    /// Loops that have stopped, by name.
    stopped: Mutex<Vec<&'static str>>,
}

impl EngineProbe {
    /// A probe over `intake`'s counters.
    pub fn new(intake: Arc<IntakeStats>) -> Self {
        Self {
            intake,
            projector: Arc::default(),
            stopped: Mutex::new(Vec::new()),
        }
    }

    /// The probe reading `projector`'s counters too.
    pub fn with_projector(mut self, projector: Arc<taskpods_projections::ProjectorStats>) -> Self {
        self.projector = projector;
        self
    }

    /// Records that the loop `name` has stopped (whatever the reason).
    pub fn loop_stopped(&self, name: &'static str) {
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name);
    }

    fn stopped(&self) -> Vec<&'static str> {
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The operations routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let mut sampled = Sampled::default();
    let active = state.views.read().await.active().await;
    if let Ok(active) = active {
        let mut by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
        for task in &active {
            *by_state.entry(task.state.name()).or_default() += 1;
        }
        sampled.tasks_by_state = Some(
            by_state
                .into_iter()
                .map(|(state, count)| (state.to_owned(), count))
                .collect(),
        );
    }
    let status = state.status.borrow().clone();
    if status.checked_at.is_some() && status.nats {
        sampled.projector_lag = Some((status.events_behind, status.seconds_behind));
    }
    let intake = state.probe.as_ref().map(|p| &*p.intake);
    sampled.projector = state.probe.as_ref().map(|p| p.projector.clone());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(intake, &sampled),
    )
        .into_response()
}

fn problems(state: &AppState, ready: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(probe) = &state.probe {
        for name in probe.stopped() {
            problems.push(format!("loop {name} stopped"));
        }
    }
    if ready {
        let status = state.status.borrow().clone();
        let connection = state.js.client().connection_state();
        if connection != async_nats::connection::State::Connected {
            problems.push(format!("NATS connection is {connection}"));
        } else if status.checked_at.is_none() {
            problems.push("no status check has completed yet".to_owned());
        } else if !status.nats {
            problems.push("NATS did not answer the last status check".to_owned());
        } else if status.seconds_behind > STUCK_AFTER_SECS {
            problems.push(format!(
                "projector stuck: {} events behind, the oldest {:.0} s old",
                status.events_behind, status.seconds_behind
            ));
        }
    }
    problems
}

fn answer(problems: Vec<String>) -> Response {
    if problems.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", problems.join("\n")),
        )
            .into_response()
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    answer(problems(&state, false))
}

async fn readyz(State(state): State<AppState>) -> Response {
    answer(problems(&state, true))
}
