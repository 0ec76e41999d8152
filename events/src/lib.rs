//! The taskpods vocabulary, with no I/O: what callers and agents ask (commands), what happened (events),
//! how both travel (codec, subjects), and the lifecycle rules (the state machine).
//!
//! - [`ids`]: task ids, idempotency keys → ids, deterministic event ids and Job names.
//! - [`command`]: `LaunchTask`, `CancelTask`, agent reports, the validated `TaskSpec`, command replies.
//! - [`policy`]: `LaunchPolicy`, launch validation (every problem with its field), quantity parsing.
//! - [`env`]: env values as recorded: sealed by the engine, or in clear in events from before sealing.
//! - [`files`]: inputs and artifacts: limits, path rules, the agent's file requests and replies.
//! - [`event`]: the versioned envelope and event kinds, failure reason codes.
//! - [`machine`]: `decide` (input → events or refusal) and `evolve` (event → task).
//! - [`codec`]: msgpack/JSON encoding with field-path errors; header names.
//! - [`subject`]: every subject, stream and bucket name, built and parsed in one place.

pub mod codec;
pub mod command;
pub mod env;
pub mod event;
pub mod files;
pub mod ids;
pub mod machine;
pub mod policy;
pub mod subject;

pub use codec::{CodecError, Encoding};
pub use command::{
    AgentReport, CancelTask, CommandReply, HEADER_REPLY_TO, HelloReply, Instructions, LaunchTask,
    Mode, ResourceRequest, Resources, TaskOutcome, TaskSpec,
};
pub use event::{Event, EventBody, FailureReason};
pub use ids::TaskId;
pub use machine::{Input, MAX_PROGRESS_EVENTS, Refusal, Task, TaskState, decide, evolve, stamp};
pub use policy::{LaunchPolicy, Problem};
pub use subject::{Addressed, Names, SubjectError};
