//! Who may do what on NATS: the permissions of each taskpods identity, enforced by nats-server from the
//! user JWT. Deny entries win over allow entries; an identity may publish or subscribe only where an
//! allow entry says so (an empty allow list would mean "everything" to nats-server, so every role but
//! `admin` has one).

use serde_json::{Value, json};
use taskpods_events::subject::task_inbox_prefix;
use taskpods_events::{Names, TaskId};

/// The identities taskpods knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Full rights in the taskpods account: creating the topology, rebuilding views, repairs.
    Admin,
    /// The engine: its streams, buckets and subjects; no stream purge or delete.
    Engine,
    /// A Brain: launch and cancel, its replies, events, output and views.
    Brain,
    /// An operator or UI: read-only, plus cancel.
    Operator,
    /// One task's agent (minted per task by the engine): its own reports, output and inbox only.
    Task(TaskId),
}

impl Role {
    /// The roles `taskpods auth init` writes credentials for.
    pub const STANDING: [Role; 4] = [Role::Admin, Role::Engine, Role::Brain, Role::Operator];

    /// The file stem of the role's credentials (`engine` → `engine.creds`).
    pub fn name(&self) -> String {
        match self {
            Role::Admin => "admin".into(),
            Role::Engine => "engine".into(),
            Role::Brain => "brain".into(),
            Role::Operator => "operator".into(),
            Role::Task(task) => format!("task-{task}"),
        }
    }
}

/// Publish and subscribe allow/deny lists, and whether replies to received requests are allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects the identity may publish to.
    pub publish: Vec<String>,
    /// Subjects it may never publish to, whatever `publish` says.
    pub publish_deny: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
    /// Subjects it may never subscribe to.
    pub subscribe_deny: Vec<String>,
    /// May publish once to the reply subject of a request it received (`resp`), even outside `publish`.
    pub replies: bool,
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// JetStream API requests that read a stream (`S`): info, direct and stored-message gets, and ordered
/// (ephemeral) consumers.
fn stream_reads(stream: &str) -> Vec<String> {
    [
        "$JS.API.STREAM.INFO.S",
        "$JS.API.STREAM.MSG.GET.S",
        "$JS.API.DIRECT.GET.S",
        "$JS.API.DIRECT.GET.S.>",
        "$JS.API.CONSUMER.CREATE.S",
        "$JS.API.CONSUMER.CREATE.S.>",
        "$JS.API.CONSUMER.INFO.S.*",
        "$JS.API.CONSUMER.DELETE.S.*",
        "$JS.API.CONSUMER.MSG.NEXT.S.*",
    ]
    .iter()
    .map(|s| s.replace(".S", &format!(".{stream}")))
    .collect()
}

/// Reading every stream of the account except those named in `closed` (the command work queue, where a
/// consumer would steal commands, and the ones holding what readers must not see).
fn readers(names: &Names, closed: &[String]) -> Permissions {
    let mut publish = strings(&[
        "$JS.API.INFO",
        "$JS.API.STREAM.NAMES",
        "$JS.API.STREAM.LIST",
        "$JS.API.STREAM.INFO.*",
        "$JS.API.STREAM.MSG.GET.*",
        "$JS.API.DIRECT.GET.*",
        "$JS.API.DIRECT.GET.*.>",
        "$JS.API.CONSUMER.CREATE.*",
        "$JS.API.CONSUMER.CREATE.*.>",
        "$JS.API.CONSUMER.INFO.*.*",
        "$JS.API.CONSUMER.DELETE.*.*",
        "$JS.API.CONSUMER.MSG.NEXT.*.*",
        "$JS.FC.>",
    ]);
    publish.sort();
    let mut publish_deny: Vec<String> = closed.iter().flat_map(|s| stream_reads(s)).collect();
    // Never a durable consumer (they outlive the reader), never anything that writes.
    publish_deny.extend(strings(&[
        "$JS.API.CONSUMER.DURABLE.CREATE.>",
        "$JS.API.STREAM.CREATE.>",
        "$JS.API.STREAM.UPDATE.>",
        "$JS.API.STREAM.DELETE.>",
        "$JS.API.STREAM.PURGE.>",
        "$JS.API.STREAM.MSG.DELETE.>",
        "$KV.>",
    ]));
    publish_deny.push(format!("{}.evt.>", names.prefix()));
    publish_deny.push(format!("{}.cmd.agent.>", names.prefix()));
    Permissions {
        publish,
        publish_deny,
        subscribe: strings(&["_INBOX.>"]),
        subscribe_deny: Vec::new(),
        replies: false,
    }
}

/// The permissions of `role` in the installation named by `names`.
pub fn permissions(role: Role, names: &Names) -> Permissions {
    let p = names.prefix();
    match role {
        Role::Admin => Permissions::default(),
        Role::Engine => Permissions {
            publish: vec![
                format!("{p}.evt.>"),
                format!("{p}.dead.>"),
                format!("{p}.log.*"),
                "$JS.API.>".into(),
                "$JS.ACK.>".into(),
                "$JS.FC.>".into(),
                "$KV.>".into(),
                // The files bucket: the engine serves inputs to agents and stores their artifacts.
                format!("$O.{}.>", names.files_bucket()),
                "_INBOX.>".into(),
            ],
            publish_deny: strings(&[
                "$JS.API.STREAM.DELETE.>",
                "$JS.API.STREAM.PURGE.>",
                "$JS.API.STREAM.MSG.DELETE.>",
                "$JS.API.CONSUMER.DURABLE.DELETE.>",
            ]),
            subscribe: vec![format!("{p}.agent.>"), "_INBOX.>".into()],
            subscribe_deny: Vec::new(),
            // Hello (and file) requests come from task inboxes (`_INBOX_<task>.…`), outside `publish`.
            replies: true,
        },
        Role::Brain => {
            let mut brain = readers(names, &[names.command_stream(), names.dead_letter_stream()]);
            brain.publish.push(names.launch());
            brain.publish.push(format!("{p}.cmd.cancel.*"));
            // Inputs are put into the files bucket before the launch names them.
            brain.publish.push(format!("$O.{}.>", names.files_bucket()));
            brain
        }
        Role::Operator => {
            let mut operator = readers(names, &[names.command_stream()]);
            operator.publish.extend([
                format!("{p}.cmd.cancel.*"),
                "$JS.API.CONSUMER.LIST.*".into(),
                "$JS.API.CONSUMER.NAMES.*".into(),
            ]);
            operator
        }
        Role::Task(task) => Permissions {
            publish: vec![
                format!("{p}.agent.{task}.>"),
                format!("{p}.cmd.agent.{task}.>"),
                names.log(task),
            ],
            publish_deny: Vec::new(),
            subscribe: vec![format!("{}.>", task_inbox_prefix(task))],
            subscribe_deny: Vec::new(),
            replies: false,
        },
    }
}

impl Permissions {
    /// The `pub`/`sub`/`resp` part of a user JWT's `nats` claims.
    pub fn to_claims(&self) -> Value {
        let list = |allow: &[String], deny: &[String]| {
            let mut value = json!({});
            if !allow.is_empty() {
                value["allow"] = json!(allow);
            }
            if !deny.is_empty() {
                value["deny"] = json!(deny);
            }
            value
        };
        let mut claims = json!({
            "pub": list(&self.publish, &self.publish_deny),
            "sub": list(&self.subscribe, &self.subscribe_deny),
        });
        if self.replies {
            // One reply per request, within the server's default two minutes.
            claims["resp"] = json!({"max": 1, "ttl": 0});
        }
        claims
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_may_touch_only_its_own_subjects_and_inbox() {
        let names = Names::new("taskpods").expect("prefix");
        let task = TaskId::mint();
        let perms = permissions(Role::Task(task), &names);
        assert_eq!(
            perms.publish,
            [
                format!("taskpods.agent.{task}.>"),
                format!("taskpods.cmd.agent.{task}.>"),
                format!("taskpods.log.{task}"),
            ]
        );
        assert_eq!(perms.subscribe, [format!("_INBOX_{task}.>")]);
        assert!(!perms.replies);
        let claims = perms.to_claims();
        assert!(claims.get("resp").is_none());
        assert!(claims["pub"].get("deny").is_none());
    }

    #[test]
    fn readers_never_consume_the_command_queue_nor_write() {
        let names = Names::new("taskpods").expect("prefix");
        for role in [Role::Brain, Role::Operator] {
            let perms = permissions(role, &names);
            for denied in [
                "$JS.API.CONSUMER.CREATE.TASKPODS_CMD",
                "$JS.API.CONSUMER.CREATE.TASKPODS_CMD.>",
                "$JS.API.STREAM.PURGE.>",
                "$KV.>",
                "taskpods.evt.>",
            ] {
                assert!(
                    perms.publish_deny.iter().any(|d| d == denied),
                    "{role:?} lacks deny {denied}"
                );
            }
            assert!(
                !perms.publish.iter().any(|p| p == "taskpods.cmd.launch") || role == Role::Brain
            );
        }
        let brain = permissions(Role::Brain, &names);
        assert!(
            brain
                .publish_deny
                .iter()
                .any(|d| d == "$JS.API.DIRECT.GET.TASKPODS_DEAD")
        );
        assert!(
            permissions(Role::Admin, &names).to_claims()["pub"]
                .get("allow")
                .is_none()
        );
    }
}
