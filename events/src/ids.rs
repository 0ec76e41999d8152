//! Task identity: the task id every subject, event, Job and KV key is keyed by, and how a caller's
//! idempotency key maps to it.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Namespace for UUIDv5 task ids derived from idempotency keys. Fixed forever: changing it would make a
/// retried launch start a second task.
pub const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x6c1f_3a2e_9b7d_4e55_8a10_7a5f_2c3d_9e01);

/// Namespace for deterministic event ids, so that a retried append produces byte-identical ids.
const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x0b8e_51d4_6f2a_4c77_9d3e_15a0_c4b2_7f66);

/// What every task's Job name starts with (see [`TaskId::job_name`]).
const JOB_NAME_PREFIX: &str = "task-";

/// The identity of one task: a UUID (v7 when we mint it, v5 when derived from an idempotency key).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct TaskId(pub Uuid);

impl TaskId {
    /// A fresh, time-ordered id for a launch that carried neither an id nor an idempotency key.
    pub fn mint() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id a caller's idempotency key stands for: the same key always names the same task.
    pub fn from_idempotency_key(key: &str) -> Self {
        Self(Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, key.as_bytes()))
    }

    /// The id of the `n`-th event (0-based) of this task; deterministic so retries are byte-identical.
    pub fn event_id(&self, n: u64) -> Uuid {
        let mut name = [0u8; 24];
        name[..16].copy_from_slice(self.0.as_bytes());
        name[16..].copy_from_slice(&n.to_be_bytes());
        Uuid::new_v5(&EVENT_NAMESPACE, &name)
    }

    /// The Kubernetes Job name for this task: deterministic, so a second create finds the first Job
    /// (DNS-1123 label, 45 characters).
    pub fn job_name(&self) -> String {
        format!("{JOB_NAME_PREFIX}{}", self.0.as_simple())
    }

    /// The task a Job name stands for: the inverse of [`TaskId::job_name`] (`None` for any other name).
    pub fn from_job_name(name: &str) -> Option<Self> {
        let simple = name.strip_prefix(JOB_NAME_PREFIX)?;
        (simple.len() == 32)
            .then(|| Uuid::try_parse(simple).ok().map(Self))
            .flatten()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for TaskId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let a = TaskId::from_idempotency_key("brain-42/step-7");
        assert_eq!(a, TaskId::from_idempotency_key("brain-42/step-7"));
        assert_ne!(a, TaskId::from_idempotency_key("brain-42/step-8"));
        assert_eq!(a.0.get_version_num(), 5);
        // Pinned (and computed independently with Python's uuid5): if this changes, launches retried
        // across an upgrade would start a second task.
        assert_eq!(a.to_string(), "b93a59e2-5a88-5b05-a0d5-9b8f3e41016f");
        assert_eq!(a.event_id(0), a.event_id(0));
        assert_ne!(a.event_id(0), a.event_id(1));
        assert_eq!(TaskId::mint().0.get_version_num(), 7);
        let job = a.job_name();
        assert!(job.len() <= 63 && job.starts_with("task-"));
        assert!(
            job.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        assert_eq!(a.to_string().parse::<TaskId>().ok(), Some(a));
        assert_eq!(TaskId::from_job_name(&job), Some(a));
        assert_eq!(TaskId::from_job_name("task-nope"), None);
    }
}
