//! The taskpods engine: the service that turns launch commands into supervised, sandboxed task runs.
//!
//! - [`cli`]: the operator's commands, one module per group.
//! - [`config`]: the engine's configuration, with embedded defaults.
//! - [`config_file`]: `taskpods.toml`, the operator's file form of it (env overrides, unknown keys refused).
//! - [`credentials`]: per-task NATS identities, minted with the account signing key.
//! - [`context`]: [`context::EngineCtx`], the handles every loop shares (NATS, JetStream, topology,
//!   store, bucket settings, clock, shutdown token), built once by [`server`].
//! - [`clock`]: the injectable clock every loop reads the time from.
//! - [`executor`]: drives the backend (local sandboxed processes, or Kubernetes) from the events; the
//!   Kubernetes backend (`executor/kubernetes/`) brings its Job builder, watcher and reconciler (which heals
//!   Jobs and tasks that disagree: orphans, lost Jobs, missed deadlines).
//! - [`held`]: what each loop holds in memory per task, counted (nothing once a task has ended).
//! - [`http`]: the web UI and its JSON API, read from the KV views (a loop of `serve`, or `taskpods ui`).
//! - [`gateway`]: agents' hellos (instructions) and heartbeats (`AgentLost`).
//! - [`files`]: agents' inputs and artifacts, served from and stored into the files object store.
//! - [`timers`]: deadlines (`TimedOut`).
//! - [`mcp`]: the Model Context Protocol server: tools for models (launch, get, output, cancel, list).
//! - [`metrics`]: the Prometheus instruments and `/metrics` text.
//! - [`pull`]: durable pull consumption that starts over with fresh pull requests when a NATS node is
//!   lost (intake, executor); a re-export of `taskpods_projections::pull`, which the projector uses too.
//! - [`intake`]: the command consumer: launches, cancels, agent reports → events, exactly once.
//! - [`lease`]: a named lease in the `<prefix>_leases` KV bucket, for loops that one replica runs at a
//!   time (the Kubernetes reconciler).
//! - [`topology`]: streams and KV buckets, created or checked at start-up.
//! - [`store`]: the event store: load a task, append with optimistic concurrency, execute inputs.
//! - [`telemetry`]: the log subscriber, and one trace per task (ids derived from the task id) exported over
//!   OTLP/HTTP when configured.
//! - [`seal`]: env values sealed in the `accepted` event, opened only for the task's own agent.
//! - [`server`]: `run(config, shutdown)`, the entry point that starts every loop, in one place, from one
//!   shared context.
//!
//! The `taskpods` binary (`src/main.rs`) is a thin CLI over these.

pub mod cli;
pub mod clock;
pub mod config;
pub mod config_file;
pub mod context;
pub mod credentials;
pub mod executor;
pub mod files;
pub mod gateway;
pub mod held;
pub mod http;
pub mod intake;
pub mod lease;
pub mod mcp;
pub mod metrics;
pub mod pull;
pub mod seal;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod timers;
pub mod topology;
