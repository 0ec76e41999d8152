//! The engine's HTTP server: the web UI and the JSON API it reads, both served from the KV views
//! (`taskpods_tasks`, `taskpods_history`, `taskpods_active`, `taskpods_finished`) and the output stream.
//! It runs as one more loop of `taskpods serve`, or alone as `taskpods ui` against any NATS.
//!
//! - [`api`]: the JSON API under `/api/` (documented in `docs/API.md`).
//! - [`live`]: what changes while a page is open: the active-task hub (one KV watch, fanned out to every
//!   page as server-sent events), the header's status (projection lag, engine health), one task's stream.
//! - [`files`]: a task's inputs and artifacts, listed and downloaded from the object store.
//! - [`access`]: who may read and who may cancel (loopback without a token, or bearer tokens).
//! - [`assets`]: the page itself (HTML, CSS, JS), embedded in the binary.
//!
//! Routes are assembled in [`router`]; another concern adds its own `Router` there (e.g. metrics and
//! health probes) and gets the same state and access layer.

pub mod access;
pub mod api;
pub mod assets;
pub mod files;
pub mod live;
pub mod ops;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use axum::Router;
use taskpods_client::{Client, ClientConfig};
use taskpods_events::Names;
use taskpods_projections::{BucketSettings, Views, buckets::BucketError};
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

pub use access::{Access, Role};

/// How the HTTP server listens and whom it lets in.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Where to listen. Loopback by default; any other address needs a token.
    pub bind: SocketAddr,
    /// A bearer token that may read everything.
    pub read_token: Option<String>,
    /// A bearer token that may read and cancel tasks.
    pub operator_token: Option<String>,
    /// Refuse cancels from callers without a token (on loopback they may cancel by default).
    pub read_only: bool,
    /// How often the header's status (projection lag, engine health) is refreshed.
    pub status_interval: Duration,
    /// How often the view generation pointer is re-read (a rebuild switches it).
    pub refresh_interval: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            read_token: None,
            operator_token: None,
            read_only: false,
            status_interval: Duration::from_secs(2),
            refresh_interval: Duration::from_secs(5),
        }
    }
}

/// Errors that stop the HTTP server.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A non-loopback address was asked for without a token: the UI would be open to the network.
    #[error(
        "refusing to listen on {addr} without a token: set --ui-token (read) or --ui-operator-token \
         (read and cancel), or bind to 127.0.0.1"
    )]
    Exposed {
        /// The address.
        addr: SocketAddr,
    },
    /// The views could not be opened.
    #[error("opening the KV views")]
    Views(#[source] BucketError),
    /// The server failed while serving.
    #[error("serving HTTP")]
    Serve(#[source] std::io::Error),
}

/// What every handler shares.
#[derive(Debug)]
pub struct Shared {
    /// JetStream.
    pub js: jetstream::Context,
    /// The taskpods client (cancel, events, output).
    pub client: Client,
    /// Subject and bucket names.
    pub names: Names,
    /// The views of the current generation (re-opened when a rebuild switches the pointer).
    pub views: RwLock<Views>,
    /// The live active list.
    pub hub: live::ActiveHub,
    /// The header's status, refreshed in the background.
    pub status: tokio::sync::watch::Receiver<live::Status>,
    /// Who may do what.
    pub access: Access,
    /// The server's settings.
    pub config: HttpConfig,
    /// Cancelled when the server stops: open event streams end then.
    pub closing: CancellationToken,
    /// The engine this server runs in (`None` under `taskpods ui`): its counters and loops.
    pub probe: Option<Arc<ops::EngineProbe>>,
}

/// The handlers' state.
pub type AppState = Arc<Shared>;

/// Every route of the server, with the access layer.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(api::routes())
        .merge(files::routes())
        .merge(assets::routes())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access::layer,
        ))
        // Outside the access layer: probes and scrapers carry no token (see [`ops`]).
        .merge(ops::routes())
        .with_state(state)
}

/// A bound (not yet serving) HTTP server: bind first to learn the port, then [`HttpServer::run`].
#[derive(Debug)]
pub struct HttpServer {
    listener: tokio::net::TcpListener,
    config: HttpConfig,
}

impl HttpServer {
    /// Checks the access settings and binds.
    pub async fn bind(config: HttpConfig) -> Result<Self, HttpError> {
        let access = Access::new(&config);
        if !config.bind.ip().is_loopback() && !access.has_tokens() {
            return Err(HttpError::Exposed { addr: config.bind });
        }
        let listener = tokio::net::TcpListener::bind(config.bind)
            .await
            .map_err(|source| HttpError::Bind {
                addr: config.bind,
                source,
            })?;
        Ok(Self { listener, config })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.bind)
    }

    /// The URL a person opens.
    pub fn url(&self) -> String {
        format!("http://{}/", self.local_addr())
    }

    /// Serves until `shutdown`, with the views of `names` read through `nats`.
    pub async fn run(
        self,
        nats: async_nats::Client,
        names: Names,
        probe: Option<Arc<ops::EngineProbe>>,
        shutdown: CancellationToken,
    ) -> Result<(), HttpError> {
        let js = jetstream::new(nats.clone());
        let views = Views::open(&js, &names, BucketSettings::default())
            .await
            .map_err(HttpError::Views)?;
        let client = Client::new(
            nats,
            ClientConfig {
                names: names.clone(),
                ..ClientConfig::default()
            },
        );
        let (status_tx, status) = tokio::sync::watch::channel(live::Status::default());
        let state = Arc::new(Shared {
            js,
            client,
            names,
            views: RwLock::new(views),
            hub: live::ActiveHub::default(),
            status,
            access: Access::new(&self.config),
            config: self.config.clone(),
            closing: shutdown.clone(),
            probe,
        });
        let background = CancellationToken::new();
        let hub = tokio::spawn(live::run_hub(state.clone(), background.clone()));
        let status = tokio::spawn(live::run_status(
            state.clone(),
            status_tx,
            background.clone(),
        ));
        let served = axum::serve(
            self.listener,
            router(state).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(HttpError::Serve);
        background.cancel();
        let _ = hub.await;
        let _ = status.await;
        served
    }
}
