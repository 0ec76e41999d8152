//! NATS identities for taskpods, enforced by nats-server in operator (decentralized JWT) mode.
//!
//! - [`material`]: what `taskpods auth init` generates: operator, account and system account, the
//!   standing roles' credentials, the task signer, the seal key, the nats-server configuration.
//! - [`roles`]: each role's publish/subscribe permissions (admin, engine, brain, operator, task).
//! - [`signer`]: minting user credentials with the account signing key (per-task users, by the engine).
//! - [`jwt`]: signing and reading NATS JWTs.
//! - [`creds`]: the credentials file format every NATS client reads.
//!
//! Why JWTs: a per-task identity must be created at run time without touching the server's
//! configuration. A user JWT signed by a key the account lists is accepted by any server that trusts the
//! account (2.9 and later), carries its own permissions and expiry, and needs no server round trip.

pub mod creds;
pub mod jwt;
pub mod material;
pub mod roles;
pub mod signer;

pub use creds::{Credentials, CredsError};
pub use material::{Material, MaterialError};
pub use roles::{Permissions, Role, permissions};
pub use signer::{DEFAULT_MAX_PAYLOAD, Signer, SignerError};
pub use taskpods_events::subject::task_inbox_prefix;
