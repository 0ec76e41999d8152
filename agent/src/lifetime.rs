//! The agent's own bounds, so that it always ends, whatever became of its engine and NATS: the task's
//! deadline plus the kill and report graces, and a prompt exit after SIGTERM.
//!
//! Without them an agent whose NATS server was gone for good kept retrying its reports for ever, and
//! its SIGTERM path waited on a flush that nothing answered: orphans that only SIGKILL ended. The
//! sandboxed code ends with the agent (bubblewrap's `--die-with-parent`, and the wrapper's watcher on
//! the result socket).

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::protocol::until;
use crate::{AgentError, Config};

/// What [`run`](crate::run) hears from its supervisor, and tells it.
#[derive(Debug)]
pub struct Lifetime {
    /// Turns `true` when a SIGTERM arrived: stop the code, flush briefly, report.
    pub stop: watch::Receiver<bool>,
    /// The task's deadline once the hello gave it (until then the configured one).
    pub deadline: watch::Sender<DateTime<Utc>>,
}

impl Lifetime {
    /// Whether a SIGTERM has arrived.
    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Resolves once a SIGTERM has arrived (at once if one has).
    pub async fn stopped(&mut self) {
        // An error means the supervisor is gone, which ends this future's process anyway.
        let _ = self.stop.wait_for(|stop| *stop).await;
    }
}

/// The latest the agent lives for a task whose deadline is `deadline`: its kill grace (the code is
/// killed then) plus its report grace (output and result get that long to be acked).
pub fn hard_end(config: &Config, deadline: DateTime<Utc>) -> Instant {
    Instant::now() + until(deadline) + config.kill_grace + config.report_grace
}

/// How long the agent keeps going after a SIGTERM: the code's grace, then a short bound for flushing
/// its output and publishing its result (the engine kills it after its own kill grace anyway).
pub fn after_term(config: &Config) -> std::time::Duration {
    config
        .kill_grace
        .max(config.term_grace + std::time::Duration::from_secs(1))
}

/// Runs `task` (the agent's [`run`](crate::run) given a [`Lifetime`]) within the agent's bounds:
/// returns its result, or [`AgentError::GaveUp`] when the deadline plus graces passed, or the bound
/// after a SIGTERM did. Dropping the task kills the code it runs.
pub async fn supervise<F, T>(
    config: &Config,
    task: impl FnOnce(Lifetime) -> F,
) -> Result<T, AgentError>
where
    F: std::future::Future<Output = Result<T, AgentError>>,
{
    use tokio::signal::unix::{SignalKind, signal};
    // Installed before anything else: from now on a SIGTERM is this loop's to handle, at any stage.
    let mut term = signal(SignalKind::terminate()).ok();
    let (stop_tx, stop) = watch::channel(false);
    let (deadline, mut deadline_rx) = watch::channel(config.deadline);
    let task = task(Lifetime { stop, deadline });
    tokio::pin!(task);
    let mut end = hard_end(config, config.deadline);
    let mut why = "past the deadline plus its graces";
    let mut terminated = false;
    let mut deadline_open = true;
    loop {
        tokio::select! {
            done = &mut task => return done,
            () = tokio::time::sleep_until(end) => {
                eprintln!("taskpods-agent: {why}: giving up");
                return Err(AgentError::GaveUp(why));
            }
            changed = deadline_rx.changed(), if deadline_open && !terminated => match changed {
                Ok(()) => end = hard_end(config, *deadline_rx.borrow_and_update()),
                Err(_) => deadline_open = false,
            },
            () = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending().await,
                }
            }, if !terminated => {
                eprintln!("taskpods-agent: SIGTERM: stopping");
                terminated = true;
                let _ = stop_tx.send(true);
                end = end.min(Instant::now() + after_term(config));
                why = "SIGTERM and the flush did not finish in time";
            }
        }
    }
}
