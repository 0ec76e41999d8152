//! The engine's clock. Every loop reads the time through the one in [`crate::context::EngineCtx`], never
//! `Utc::now()` directly, so a test can move time: [`Clock::tokio`] follows tokio's clock, which
//! `tokio::time::pause()` stops and `tokio::time::advance` moves, and [`Clock::from_fn`] is any clock.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};

/// Where the engine gets the current time (cheap to clone; shared by every loop).
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>);

impl Clock {
    /// The wall clock (what the engine runs on).
    pub fn wall() -> Self {
        Self(Arc::new(Utc::now))
    }

    /// `start`, advanced by tokio's time since this call: under `tokio::time::pause()` it moves only when
    /// tokio's time does (`advance`, or auto-advance to the next timer), so a timer test runs in no time.
    pub fn tokio(start: DateTime<Utc>) -> Self {
        let origin = tokio::time::Instant::now();
        Self(Arc::new(move || {
            start + TimeDelta::from_std(origin.elapsed()).unwrap_or(TimeDelta::MAX)
        }))
    }

    /// A clock reading `now` (a test's fixed or shifted time).
    pub fn from_fn(now: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Self {
        Self(Arc::new(now))
    }

    /// The current time.
    pub fn now(&self) -> DateTime<Utc> {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::wall()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Clock").field(&self.now()).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_moves_only_with_tokio_time() {
        let start = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let clock = Clock::tokio(start);
        assert_eq!(clock.now(), start);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now(), start + TimeDelta::seconds(90));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(clock.now(), start + TimeDelta::seconds(3690));
    }
}
