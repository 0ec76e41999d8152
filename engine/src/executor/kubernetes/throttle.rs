//! The engine's own limit on requests to the Kubernetes API server: a token bucket of `qps` requests per
//! second with bursts of up to `burst`, as client-go's QPS/burst (the `kube` client has no limit of its
//! own). A shared API server is protected from a flood of launches; callers queue in arrival order
//! instead of being refused.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket shared by clones; `qps` <= 0 means no limit.
#[derive(Debug, Clone)]
pub struct Throttle {
    bucket: Option<Arc<Mutex<Bucket>>>,
}

#[derive(Debug)]
struct Bucket {
    qps: f64,
    burst: f64,
    /// Tokens available at `at`; negative when callers have reserved tokens not yet refilled.
    tokens: f64,
    at: Instant,
}

impl Throttle {
    /// At most `qps` requests per second on average, `burst` at once; `qps` <= 0: unlimited.
    pub fn new(qps: f64, burst: u32) -> Self {
        if qps.is_nan() || qps <= 0.0 {
            return Self::unlimited();
        }
        let burst = f64::from(burst.max(1));
        Self {
            bucket: Some(Arc::new(Mutex::new(Bucket {
                qps,
                burst,
                tokens: burst,
                at: Instant::now(),
            }))),
        }
    }

    /// No limit.
    pub fn unlimited() -> Self {
        Self { bucket: None }
    }

    /// Waits until one more request is allowed. Each call reserves its token at once, so waiting
    /// callers are served in arrival order.
    pub async fn acquire(&self) {
        let Some(wait) = self.reserve() else {
            return;
        };
        tokio::time::sleep(wait).await;
    }

    /// Takes a token; how long the caller must wait before using it (`None`: at once).
    fn reserve(&self) -> Option<Duration> {
        let bucket = self.bucket.as_ref()?;
        // A poisoned lock only means another caller panicked mid-update of plain numbers.
        let mut b = bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let refill = now.duration_since(b.at).as_secs_f64() * b.qps;
        b.tokens = (b.tokens + refill).min(b.burst);
        b.at = now;
        b.tokens -= 1.0;
        (b.tokens < 0.0).then(|| Duration::from_secs_f64(-b.tokens / b.qps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_at_once_then_requests_are_spaced_by_the_rate() {
        let throttle = Throttle::new(10.0, 5);
        let started = Instant::now();
        for _ in 0..5 {
            throttle.acquire().await;
        }
        assert_eq!(started.elapsed(), Duration::ZERO, "the burst is free");
        for _ in 0..10 {
            throttle.acquire().await;
        }
        // Ten more at 10/s after the burst: one second, to the clock's resolution.
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(999) && elapsed <= Duration::from_millis(1001),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_bucket_refills_only_up_to_the_burst() {
        let throttle = Throttle::new(100.0, 3);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let started = Instant::now();
        for _ in 0..4 {
            throttle.acquire().await;
        }
        // Three free, the fourth waits one token's time (10 ms), however long the bucket was idle.
        assert_eq!(started.elapsed(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_or_negative_qps_is_unlimited() {
        for qps in [0.0, -1.0, f64::NAN] {
            let throttle = Throttle::new(qps, 1);
            let started = Instant::now();
            for _ in 0..1000 {
                throttle.acquire().await;
            }
            assert_eq!(started.elapsed(), Duration::ZERO);
        }
    }
}
