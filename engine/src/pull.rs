//! Durable pull consumption that survives losing a NATS node (intake, executor): the projector uses it too,
//! so it lives in the projections crate, which the engine depends on.

pub use taskpods_projections::pull::{DurableMessages, PullRequests};
