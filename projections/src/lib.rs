//! Projections: folding the task event log into the KV views that UIs and callers read, rebuilding them,
//! and replaying a task's log for an operator.
//!
//! - [`log`]: the event log's one owner (the engine's store and the client use it too): the stored-event
//!   type [`log::StoredEvent`] (sequence, position from `Nats-Msg-Id`, the kind as written even when this
//!   build does not know it), message ids built and parsed, a task's events read, ordered consumers.
//! - [`view`]: the views (`TaskView`, `HistoryView`, `ActiveView`, `FinishedView`) and the pure fold;
//!   the state always comes from `taskpods_events::evolve`.
//! - [`buckets`]: view generations and the pointer readers follow; [`buckets::Views`] for readers
//!   (task, history, active, finished pages newest first, per-task read-your-writes).
//! - [`apply`]: guarded writes (stored sequence + KV revision; the task view is the commit record).
//! - [`projector`]: the durable consumer loop, its lag, and `wait_for_sequence`.
//! - [`pull`]: durable pull consumption that starts over after a NATS node loss (the projector's, and
//!   the engine's intake and executor).
//! - [`rebuild`]: fold the whole stream into a fresh generation and switch readers; `verify`.
//! - [`replay`]: a task's timeline, its state at a point, oddities; failed tasks since a time.
//! - `generate` (feature `test-util`): random valid task histories and a pipelined publisher, for tests
//!   and benchmarks; not part of the library's normal build.

pub mod apply;
pub mod buckets;
#[cfg(any(test, feature = "test-util"))]
pub mod generate;
pub mod log;
pub mod projector;
pub mod pull;
pub mod rebuild;
pub mod replay;
pub mod view;

pub use buckets::{BucketSettings, FinishedPage, Views};
pub use projector::{Lag, ProjectorConfig, ProjectorStats, lag, wait_for_sequence};
pub use view::{ActiveView, FinishedView, Folded, HistoryView, TaskView};
