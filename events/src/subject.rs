//! Subject, stream and bucket names, built and parsed in one place so the engine, the agent, the client and
//! the docs cannot drift apart. Everything hangs off a configurable prefix (default `taskpods`).

use std::fmt;

use crate::TaskId;

/// The default subject prefix.
pub const DEFAULT_PREFIX: &str = "taskpods";

/// Errors building or parsing names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// The prefix has characters NATS subjects, stream names or bucket names cannot carry.
    #[error("invalid subject prefix {0:?}: use letters, digits, '-', '_' and '.'-separated tokens")]
    InvalidPrefix(String),
    /// The subject is not one of ours.
    #[error("subject {0:?} is not a taskpods subject under this prefix")]
    Foreign(String),
    /// The subject is ours but the task token is not a task id.
    #[error("subject {subject:?} has {token:?} where a task id belongs")]
    BadTaskId {
        /// The whole subject.
        subject: String,
        /// The token that should be a UUID.
        token: String,
    },
}

/// What a subject addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addressed {
    /// `<p>.cmd.launch`
    Launch,
    /// `<p>.cmd.cancel.<task>`
    Cancel(TaskId),
    /// `<p>.cmd.agent.<task>.<kind>`
    AgentReport(TaskId, String),
    /// `<p>.agent.<task>.hello`
    AgentHello(TaskId),
    /// `<p>.agent.<task>.heartbeat`
    AgentHeartbeat(TaskId),
    /// `<p>.agent.<task>.files.<op>` (`get` an input, `put` an artifact)
    AgentFiles(TaskId, String),
    /// `<p>.evt.<task>`
    Events(TaskId),
    /// `<p>.log.<task>`
    Log(TaskId),
}

/// Every name derived from one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Default for Names {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }
}

/// The inbox prefix of `task`'s agent (`_INBOX_<task>`): its identity may receive only below it, so it
/// never sees another task's replies. Independent of the installation's subject prefix.
pub fn task_inbox_prefix(task: TaskId) -> String {
    format!("_INBOX_{task}")
}

/// Whether `subject` is a reply inbox below one of `prefixes` (each ending in `.`): a literal subject (no
/// wildcard, no empty token, no whitespace) with at least one token after the prefix. The engine publishes
/// replies only there, never where a caller names a JetStream API, KV or event subject.
pub fn is_reply_inbox(subject: &str, prefixes: &[&str]) -> bool {
    let literal = !subject.is_empty()
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && !token.bytes().any(|b| b.is_ascii_whitespace())
        });
    literal
        && prefixes
            .iter()
            .any(|prefix| subject.len() > prefix.len() && subject.starts_with(prefix))
}

impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prefix)
    }
}

impl Names {
    /// Names under `prefix`, which must be dot-separated tokens of letters, digits, `-` and `_`.
    pub fn new(prefix: &str) -> Result<Self, SubjectError> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 64
            && prefix.split('.').all(|token| {
                !token.is_empty()
                    && token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(SubjectError::InvalidPrefix(prefix.to_owned()));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    /// The subject prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where launches are published.
    pub fn launch(&self) -> String {
        format!("{}.cmd.launch", self.prefix)
    }

    /// Where a cancel for `task` is published.
    pub fn cancel(&self, task: TaskId) -> String {
        format!("{}.cmd.cancel.{task}", self.prefix)
    }

    /// Where the agent of `task` publishes a report of `kind` (`progress`, `result`, `heartbeat`).
    pub fn agent_report(&self, task: TaskId, kind: &str) -> String {
        format!("{}.cmd.agent.{task}.{kind}", self.prefix)
    }

    /// Where the agent of `task` asks for its instructions (request/reply).
    pub fn agent_hello(&self, task: TaskId) -> String {
        format!("{}.agent.{task}.hello", self.prefix)
    }

    /// Where the agent of `task` sends heartbeats (core NATS: a lost heartbeat is harmless, and they
    /// would only churn the command stream).
    pub fn agent_heartbeat(&self, task: TaskId) -> String {
        format!("{}.agent.{task}.heartbeat", self.prefix)
    }

    /// Every agent heartbeat, for the gateway's subscription.
    pub fn agent_heartbeat_all(&self) -> String {
        format!("{}.agent.*.heartbeat", self.prefix)
    }

    /// Where the agent of `task` asks for its inputs (`op` `get`) and hands over its artifacts (`put`),
    /// request/reply: the agent never touches the object store itself.
    pub fn agent_files(&self, task: TaskId, op: &str) -> String {
        format!("{}.agent.{task}.files.{op}", self.prefix)
    }

    /// Every agent file request, for the files loop's subscription.
    pub fn agent_files_all(&self) -> String {
        format!("{}.agent.*.files.*", self.prefix)
    }

    /// Every agent hello, for the gateway's subscription.
    pub fn agent_hello_all(&self) -> String {
        format!("{}.agent.*.hello", self.prefix)
    }

    /// Every command subject (the command stream's subjects).
    pub fn commands_all(&self) -> String {
        format!("{}.cmd.>", self.prefix)
    }

    /// The events of `task`.
    pub fn events(&self, task: TaskId) -> String {
        format!("{}.evt.{task}", self.prefix)
    }

    /// Every task's events (the event stream's subjects).
    pub fn events_all(&self) -> String {
        format!("{}.evt.*", self.prefix)
    }

    /// The output of `task`.
    pub fn log(&self, task: TaskId) -> String {
        format!("{}.log.{task}", self.prefix)
    }

    /// Every task's output (the log stream's subjects).
    pub fn logs_all(&self) -> String {
        format!("{}.log.*", self.prefix)
    }

    /// Where commands that could not be decoded are kept, by what was wrong.
    pub fn dead_letter(&self, reason: &str) -> String {
        format!("{}.dead.{reason}", self.prefix)
    }

    /// Every dead letter (the dead-letter stream's subjects).
    pub fn dead_letters_all(&self) -> String {
        format!("{}.dead.>", self.prefix)
    }

    fn stream(&self, suffix: &str) -> String {
        format!(
            "{}_{suffix}",
            self.prefix.replace('.', "_").to_ascii_uppercase()
        )
    }

    fn bucket(&self, suffix: &str) -> String {
        format!("{}_{suffix}", self.prefix.replace('.', "_"))
    }

    /// The command stream (work queue).
    pub fn command_stream(&self) -> String {
        self.stream("CMD")
    }

    /// The event stream (the log of record).
    pub fn event_stream(&self) -> String {
        self.stream("EVT")
    }

    /// The task output stream.
    pub fn log_stream(&self) -> String {
        self.stream("LOG")
    }

    /// The dead-letter stream.
    pub fn dead_letter_stream(&self) -> String {
        self.stream("DEAD")
    }

    /// KV bucket: task → current view.
    pub fn tasks_bucket(&self) -> String {
        self.bucket("tasks")
    }

    /// KV bucket: task → timeline of transitions.
    pub fn history_bucket(&self) -> String {
        self.bucket("history")
    }

    /// KV bucket: task → summary, only while the task is live.
    pub fn active_bucket(&self) -> String {
        self.bucket("active")
    }

    /// KV bucket: finished tasks keyed for newest-first listing.
    pub fn finished_bucket(&self) -> String {
        self.bucket("finished")
    }

    /// Object store bucket: task inputs and artifacts (`<task>/in/<name>`, `<task>/out/<path>`).
    pub fn files_bucket(&self) -> String {
        self.bucket("files")
    }

    /// Every KV bucket, in creation order.
    pub fn buckets(&self) -> [String; 4] {
        [
            self.tasks_bucket(),
            self.history_bucket(),
            self.active_bucket(),
            self.finished_bucket(),
        ]
    }

    /// What `subject` addresses, or why it is not one of ours.
    pub fn parse(&self, subject: &str) -> Result<Addressed, SubjectError> {
        let foreign = || SubjectError::Foreign(subject.to_owned());
        let rest = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('.'))
            .ok_or_else(foreign)?;
        let tokens: Vec<&str> = rest.split('.').collect();
        let task = |token: &str| {
            token
                .parse::<TaskId>()
                .map_err(|_| SubjectError::BadTaskId {
                    subject: subject.to_owned(),
                    token: token.to_owned(),
                })
        };
        match tokens.as_slice() {
            ["cmd", "launch"] => Ok(Addressed::Launch),
            ["cmd", "cancel", t] => Ok(Addressed::Cancel(task(t)?)),
            ["cmd", "agent", t, kind] if !kind.is_empty() => {
                Ok(Addressed::AgentReport(task(t)?, (*kind).to_owned()))
            }
            ["agent", t, "hello"] => Ok(Addressed::AgentHello(task(t)?)),
            ["agent", t, "heartbeat"] => Ok(Addressed::AgentHeartbeat(task(t)?)),
            ["agent", t, "files", op] if !op.is_empty() => {
                Ok(Addressed::AgentFiles(task(t)?, (*op).to_owned()))
            }
            ["evt", t] => Ok(Addressed::Events(task(t)?)),
            ["log", t] => Ok(Addressed::Log(task(t)?)),
            _ => Err(foreign()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_go_only_to_literal_subjects_below_an_inbox_prefix() {
        let inbox = ["_INBOX."];
        assert!(is_reply_inbox("_INBOX.abc.1", &inbox));
        for hostile in [
            "$JS.API.STREAM.PURGE.TASKPODS_EVT",
            "$KV.taskpods_tasks.0193a5b6-1b2c-7def-8123-456789abcdef",
            "taskpods.evt.0193a5b6-1b2c-7def-8123-456789abcdef",
            "_INBOX.",
            "_INBOX",
            "_INBOX.>",
            "_INBOX.*.x",
            "_INBOX..x",
            "_INBOX.a b",
            "_INBOXES.a",
            "",
        ] {
            assert!(!is_reply_inbox(hostile, &inbox), "{hostile:?}");
        }
        let task = TaskId::mint();
        let own = format!("{}.", task_inbox_prefix(task));
        assert!(is_reply_inbox(&format!("{own}x.1"), &[own.as_str()]));
        assert!(!is_reply_inbox("_INBOX_other.x", &[own.as_str()]));
    }

    #[test]
    fn names_round_trip_through_parse() {
        let task = TaskId::from_idempotency_key("k");
        for names in [Names::default(), Names::new("acme.prod-1").expect("valid")] {
            let p = names.prefix().to_owned();
            assert_eq!(names.parse(&names.launch()), Ok(Addressed::Launch));
            assert_eq!(
                names.parse(&names.cancel(task)),
                Ok(Addressed::Cancel(task))
            );
            assert_eq!(
                names.parse(&names.agent_report(task, "progress")),
                Ok(Addressed::AgentReport(task, "progress".into()))
            );
            assert_eq!(
                names.parse(&names.agent_hello(task)),
                Ok(Addressed::AgentHello(task))
            );
            assert_eq!(
                names.parse(&names.events(task)),
                Ok(Addressed::Events(task))
            );
            assert_eq!(names.parse(&names.log(task)), Ok(Addressed::Log(task)));
            assert_eq!(
                names.parse(&names.agent_files(task, "get")),
                Ok(Addressed::AgentFiles(task, "get".into()))
            );
            assert_eq!(names.events(task), format!("{p}.evt.{task}"));
            assert_eq!(
                names.parse(&format!("{p}.cmd.cancel.not-a-uuid")),
                Err(SubjectError::BadTaskId {
                    subject: format!("{p}.cmd.cancel.not-a-uuid"),
                    token: "not-a-uuid".into()
                })
            );
            assert!(matches!(
                names.parse(&format!("{p}x.cmd.launch")),
                Err(SubjectError::Foreign(_))
            ));
            assert!(matches!(
                names.parse(&format!("{p}.cmd.reboot")),
                Err(SubjectError::Foreign(_))
            ));
        }
        let names = Names::new("acme.prod-1").expect("valid");
        assert_eq!(names.event_stream(), "ACME_PROD-1_EVT");
        assert_eq!(names.tasks_bucket(), "acme_prod-1_tasks");
        assert_eq!(names.files_bucket(), "acme_prod-1_files");
        assert_eq!(Names::default().command_stream(), "TASKPODS_CMD");
        assert_eq!(Names::default().history_bucket(), "taskpods_history");
        for bad in ["", "a..b", "a.*", "a b", ">", "a.>"] {
            assert_eq!(
                Names::new(bad),
                Err(SubjectError::InvalidPrefix(bad.into()))
            );
        }
    }
}
