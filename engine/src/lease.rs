//! A lease in a KV bucket: at most one engine replica holds a named lease until it expires, so a loop that
//! must not run twice at once (the Kubernetes reconciler) runs on one replica, and another takes over
//! within the lease's time when the holder dies.
//!
//! The bucket is `<prefix>_leases`; the key is the lease's name; the value `<holder> <expiry ms>`. Every
//! write is conditional on the revision read just before (`create` for a missing key, `update` with the
//! revision otherwise), so two replicas that both find the lease free cannot both take it: the second
//! write fails and that replica is refused. A holder renews well before expiry (its loop runs more often
//! than the lease lasts); a holder that stops cleanly [`Lease::release`]s it, so the next replica takes
//! over at its next try instead of after the expiry.
//!
//! Expiry is judged with the wall clocks of the replicas; they must agree to well within the lease's
//! time (NTP does; the default lease is minutes long).

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use chrono::{DateTime, TimeDelta, Utc};
use taskpods_projections::BucketSettings;
use taskpods_projections::buckets::BucketError;

/// Why the lease could not be read or written (the caller tries again at its next turn).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The lease bucket could not be opened or created.
    #[error("lease bucket: {0}")]
    Bucket(#[source] BucketError),
    /// The lease could not be read.
    #[error("lease {key}: read")]
    Read {
        /// The lease's name.
        key: String,
        /// The KV error.
        #[source]
        source: kv::EntryError,
    },
}

/// Who holds a lease and until when, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// The holder's name (an engine id).
    pub holder: String,
    /// When the lease expires unless renewed.
    pub until: DateTime<Utc>,
}

impl Holding {
    fn parse(value: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(value).ok()?;
        let mut parts = text.split_whitespace();
        let holder = parts.next()?.to_owned();
        let until = DateTime::from_timestamp_millis(parts.next()?.parse().ok()?)?;
        Some(Self { holder, until })
    }
}

/// One replica's handle on a named lease.
#[derive(Debug, Clone)]
pub struct Lease {
    kv: kv::Store,
    key: String,
    holder: String,
    ttl: Duration,
}

/// The lease bucket's name for `prefix`.
pub fn bucket_name(prefix: &str) -> String {
    format!("{}_leases", prefix.replace('.', "_"))
}

impl Lease {
    /// Opens (creating when missing) the lease bucket of `prefix`, for the lease `key` held as `holder`.
    pub async fn open(
        js: &jetstream::Context,
        prefix: &str,
        key: &str,
        holder: &str,
        ttl: Duration,
        settings: BucketSettings,
    ) -> Result<Self, LeaseError> {
        let kv = taskpods_projections::buckets::ensure_bucket(js, &bucket_name(prefix), settings)
            .await
            .map_err(LeaseError::Bucket)?;
        Ok(Self {
            kv,
            key: key.to_owned(),
            holder: holder.to_owned(),
            ttl,
        })
    }

    /// This replica's name in the lease.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Who holds the lease now, if anyone (an expired or released lease is held by no one).
    pub async fn current(&self, now: DateTime<Utc>) -> Result<Option<Holding>, LeaseError> {
        let entry = self.entry().await?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| Holding::parse(&e.value))
            .filter(|h| h.until > now))
    }

    async fn entry(&self) -> Result<Option<kv::Entry>, LeaseError> {
        self.kv
            .entry(&self.key)
            .await
            .map_err(|source| LeaseError::Read {
                key: self.key.clone(),
                source,
            })
    }

    /// Takes or renews the lease; whether this holder has it now.
    pub async fn acquire(&self, now: DateTime<Utc>) -> Result<bool, LeaseError> {
        let expiry = now + TimeDelta::from_std(self.ttl).unwrap_or(TimeDelta::seconds(30));
        let value = format!("{} {}", self.holder, expiry.timestamp_millis());
        let result = match self.entry().await? {
            Some(entry) => {
                if entry.operation == kv::Operation::Put
                    && let Some(held) = Holding::parse(&entry.value)
                    && held.holder != self.holder
                    && held.until > now
                {
                    return Ok(false);
                }
                self.kv
                    .update(&self.key, value.into(), entry.revision)
                    .await
                    .is_ok()
            }
            None => self.kv.create(&self.key, value.into()).await.is_ok(),
        };
        // A failed conditional write means another replica got there first.
        Ok(result)
    }

    /// Gives the lease up if this replica holds it, so another takes over at once instead of after the
    /// expiry; whether it was released. (A write that loses a race leaves the other holder's lease.)
    pub async fn release(&self) -> Result<bool, LeaseError> {
        let Some(entry) = self.entry().await? else {
            return Ok(false);
        };
        let ours = entry.operation == kv::Operation::Put
            && Holding::parse(&entry.value).is_some_and(|h| h.holder == self.holder);
        if !ours {
            return Ok(false);
        }
        // An expiry in the past, written with the revision read: free for anyone, and never a
        // stale release of a lease someone else took meanwhile.
        let value = format!("{} 0", self.holder);
        Ok(self
            .kv
            .update(&self.key, value.into(), entry.revision)
            .await
            .is_ok())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use taskpods_harness::NatsServer;

    async fn open(js: &jetstream::Context, holder: &str, ttl: Duration) -> Lease {
        Lease::open(
            js,
            "taskpods",
            "reconciler",
            holder,
            ttl,
            BucketSettings::default(),
        )
        .await
        .expect("lease bucket")
    }

    /// Against a real nats-server: one holder at a time, renewals keep it, expiry hands it over.
    #[tokio::test]
    async fn the_lease_has_one_holder_until_it_expires() {
        let server = NatsServer::start();
        let js = jetstream::new(server.connect().await);
        let ttl = Duration::from_secs(10);
        let (a, b) = (open(&js, "a", ttl).await, open(&js, "b", ttl).await);
        let t0 = Utc::now();
        assert!(a.acquire(t0).await.unwrap(), "a takes the free lease");
        assert!(
            !b.acquire(t0).await.unwrap(),
            "b is refused while a holds it"
        );
        assert!(
            a.acquire(t0 + TimeDelta::seconds(5)).await.unwrap(),
            "a renews"
        );
        // Still within a's renewed term (5 s + 10 s).
        assert!(!b.acquire(t0 + TimeDelta::seconds(14)).await.unwrap());
        assert!(
            b.acquire(t0 + TimeDelta::seconds(16)).await.unwrap(),
            "b takes over after expiry"
        );
        assert!(
            !a.acquire(t0 + TimeDelta::seconds(16)).await.unwrap(),
            "a lost it"
        );
        let held = a.current(t0 + TimeDelta::seconds(16)).await.unwrap();
        assert_eq!(held.map(|h| h.holder), Some("b".to_owned()));
    }

    /// A released lease is free at once; a replica that does not hold it cannot release it.
    #[tokio::test]
    async fn a_released_lease_is_taken_at_once_and_only_the_holder_can_release_it() {
        let server = NatsServer::start();
        let js = jetstream::new(server.connect().await);
        let ttl = Duration::from_secs(600);
        let (a, b) = (open(&js, "a", ttl).await, open(&js, "b", ttl).await);
        let now = Utc::now();
        assert!(a.acquire(now).await.unwrap());
        assert!(!b.release().await.unwrap(), "b does not hold it");
        assert!(!b.acquire(now).await.unwrap(), "a still holds it");
        assert!(a.release().await.unwrap());
        assert_eq!(a.current(now).await.unwrap(), None);
        assert!(
            b.acquire(now).await.unwrap(),
            "b takes it long before the ten-minute expiry"
        );
        assert!(!a.release().await.unwrap(), "a no longer holds it");
        assert_eq!(
            b.current(now).await.unwrap().map(|h| h.holder),
            Some("b".to_owned())
        );
    }
}
