//! Following every transition of the tasks a Brain cares about (its own requester, or a set of labels),
//! across all tasks, live: one ordered consumer on `<prefix>.evt.*`, filtered here by each task's
//! `accepted` event. A task first seen mid-life (accepted before the watch started) is matched by reading
//! its first event once; the decision is remembered, so a task costs one lookup at most.
//!
//! To survive restarts, a Brain keeps the stream sequence of the last event it handled and resumes with
//! [`WatchFrom::Sequence`] of the next one (or uses a durable consumer of its own on the same subjects).

use std::collections::{BTreeMap, HashMap, VecDeque};

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use futures::StreamExt;
use taskpods_events::{EventBody, Names, TaskId, TaskSpec};
use taskpods_projections::log::{self, Start, StoredEvent};

use crate::{Client, ClientError, log_error, unreachable};

/// How many tasks' decisions a watch remembers; older ones are looked up again when they show up.
const REMEMBERED_TASKS: usize = 10_000;

/// Which tasks [`Client::watch_tasks`] follows: all conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFilter {
    /// Only tasks launched with this `requester`.
    pub requester: Option<String>,
    /// Only tasks carrying every one of these labels, with these values.
    pub labels: BTreeMap<String, String>,
}

impl TaskFilter {
    /// Tasks launched by `requester`.
    pub fn requester(requester: impl Into<String>) -> Self {
        Self {
            requester: Some(requester.into()),
            labels: BTreeMap::new(),
        }
    }

    /// Also requires the label `key=value`.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Whether a task with this validated launch is followed.
    pub fn matches(&self, spec: &TaskSpec) -> bool {
        self.requester
            .as_ref()
            .is_none_or(|r| spec.requester.as_ref() == Some(r))
            && self
                .labels
                .iter()
                .all(|(k, v)| spec.labels.get(k) == Some(v))
    }
}

/// Where a watch starts reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WatchFrom {
    /// Only what happens from now on.
    #[default]
    New,
    /// Every stored event.
    All,
    /// From this stream sequence on (e.g. one past the last event a Brain handled before a restart).
    Sequence(u64),
}

/// An event of a followed task.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchedEvent {
    /// The event as stored (sequence, task, kind, envelope).
    pub stored: StoredEvent,
    /// The task's validated launch, from its `accepted` event.
    pub spec: TaskSpec,
}

/// What the watch has decided per task, oldest first for forgetting.
#[derive(Debug, Default)]
struct Decisions {
    by_task: HashMap<TaskId, Option<TaskSpec>>,
    order: VecDeque<TaskId>,
}

impl Decisions {
    fn remember(&mut self, task: TaskId, spec: Option<TaskSpec>) {
        if self.by_task.insert(task, spec).is_none() {
            self.order.push_back(task);
        }
        while self.order.len() > REMEMBERED_TASKS {
            if let Some(old) = self.order.pop_front() {
                self.by_task.remove(&old);
            }
        }
    }
}

struct Watch {
    messages: pull::Ordered,
    stream: Stream,
    names: Names,
    filter: TaskFilter,
    decided: Decisions,
}

impl Watch {
    /// The next event of a followed task (`None`: the consumer ended).
    async fn next(&mut self) -> Option<Result<WatchedEvent, ClientError>> {
        loop {
            let message = match self.messages.next().await? {
                Ok(message) => message,
                Err(e) => return Some(Err(unreachable(e))),
            };
            let stored = match log::decode_message(&self.names, &message) {
                Ok(stored) => stored,
                Err(e) => return Some(Err(log_error(e))),
            };
            let task = stored.task();
            let spec = match self.decided.by_task.get(&task) {
                Some(decision) => decision.clone(),
                None => {
                    let spec = match &stored.event.body {
                        EventBody::Accepted { spec, .. } => Some(spec.clone()),
                        EventBody::Rejected { .. } => None,
                        _ => match self.first_spec(task).await {
                            Ok(spec) => spec,
                            Err(e) => return Some(Err(e)),
                        },
                    };
                    let spec = spec.filter(|s| self.filter.matches(s));
                    self.decided.remember(task, spec.clone());
                    spec
                }
            };
            if let Some(spec) = spec {
                return Some(Ok(WatchedEvent { stored, spec }));
            }
        }
    }

    /// The spec in the task's first event (`None`: not accepted).
    async fn first_spec(&self, task: TaskId) -> Result<Option<TaskSpec>, ClientError> {
        let message = match self
            .stream
            .direct_get_next_for_subject(self.names.events(task), Some(1))
            .await
        {
            Ok(message) => message,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(unreachable(e)),
        };
        let first = log::decode(
            &self.names,
            message.subject.as_str(),
            message.sequence,
            Some(&message.headers),
            &message.payload,
            log::to_chrono(message.time.unix_timestamp_nanos()),
        )
        .map_err(log_error)?;
        Ok(match first.event.body {
            EventBody::Accepted { spec, .. } => Some(spec),
            _ => None,
        })
    }
}

impl Client {
    /// Every transition of every task `filter` matches, in stream order, live (never ends by itself;
    /// drop the stream to stop). See the module documentation for how tasks are matched.
    pub async fn watch_tasks(
        &self,
        filter: TaskFilter,
        from: WatchFrom,
    ) -> Result<impl futures::Stream<Item = Result<WatchedEvent, ClientError>> + use<>, ClientError>
    {
        let mut stream = self.event_stream().await?;
        let start = match from {
            WatchFrom::All => Start::First,
            WatchFrom::Sequence(sequence) => Start::Sequence(sequence.max(1)),
            WatchFrom::New => {
                let info = stream.info().await.map_err(unreachable)?;
                Start::Sequence(info.state.last_sequence + 1)
            }
        };
        let messages = log::ordered(&stream, &self.config.names, None, start)
            .await
            .map_err(log_error)?;
        let watch = Watch {
            messages,
            stream,
            names: self.config.names.clone(),
            filter,
            decided: Decisions::default(),
        };
        Ok(futures::stream::unfold(watch, |mut watch| async move {
            watch.next().await.map(|item| (item, watch))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_needs_the_requester_and_every_label() {
        let spec = |requester: Option<&str>, labels: &[(&str, &str)]| TaskSpec {
            image: "img".into(),
            toolbox: None,
            mode: taskpods_events::Mode::Script,
            instructions: "true".into(),
            env: BTreeMap::new(),
            secret_env: BTreeMap::new(),
            timeout_secs: 60,
            resources: taskpods_events::Resources {
                cpu_request_millis: 1,
                cpu_limit_millis: 1,
                memory_request_bytes: 1,
                memory_limit_bytes: 1,
            },
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            requester: requester.map(str::to_owned),
            idempotency_key: None,
            inputs: Vec::new(),
            files: Default::default(),
        };
        let filter = TaskFilter::requester("brain-a").label("team", "ml");
        assert!(filter.matches(&spec(Some("brain-a"), &[("team", "ml"), ("x", "y")])));
        assert!(!filter.matches(&spec(Some("brain-a"), &[("team", "ops")])));
        assert!(!filter.matches(&spec(Some("brain-a"), &[])));
        assert!(!filter.matches(&spec(Some("brain-b"), &[("team", "ml")])));
        assert!(!filter.matches(&spec(None, &[("team", "ml")])));
        assert!(TaskFilter::default().matches(&spec(None, &[])));
    }
}
