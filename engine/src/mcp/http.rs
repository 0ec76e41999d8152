//! `taskpods mcp --http ADDR`: the same tools over MCP's streamable HTTP transport, for hosts that reach
//! tool servers by URL. One endpoint, `/mcp`: a POST carries one JSON-RPC message or a batch and gets the
//! answers as `application/json` (202 and no body when it held only notifications). The server is
//! stateless (no session id; every call stands alone, as the stdio server's do) and offers no event
//! stream: GET and DELETE get 405, which the transport allows.
//!
//! Who may call it: whoever can call it launches code as this server's Brain identity and may cancel any
//! task. On loopback that is still every local user and process, and any web page the user opens (a page
//! can post to 127.0.0.1, or rebind its own name to it). So:
//! - a bearer token is always required (`Authorization: Bearer <token>`, compared in constant time);
//!   a page cannot learn it and another local user cannot guess it;
//! - the listener is loopback only: the token travels in clear (no TLS here), so it must not cross a
//!   network; a remote host goes through a TLS-terminating proxy;
//! - a request carrying an `Origin` that is not a loopback page is refused (the transport's rule against
//!   DNS rebinding), before the token is even looked at.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::{Tools, code, error};

/// The path of the endpoint.
pub const PATH: &str = "/mcp";

/// Why the HTTP server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address is not on loopback: the token would cross the network in clear.
    #[error(
        "{addr} is not a loopback address: `taskpods mcp --http` listens on loopback only (the bearer \
         token travels without TLS); put a TLS-terminating proxy in front to reach it from elsewhere"
    )]
    NotLoopback {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// No token was given (or it is too short to resist guessing).
    #[error(
        "`taskpods mcp --http` needs a bearer token of at least {MIN_TOKEN_LEN} characters in \
         TASKPODS_MCP_TOKEN (e.g. `export TASKPODS_MCP_TOKEN=$(openssl rand -hex 32)`); hosts send it as \
         `Authorization: Bearer <token>`"
    )]
    NoToken,
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server failed while serving.
    #[error("serving MCP over HTTP: {source}")]
    Serve {
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

struct Shared {
    tools: Tools,
    token: String,
    permits: Semaphore,
}

/// An MCP endpoint bound to its loopback address, ready to [`serve`](Self::serve).
pub struct HttpServer {
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("HttpServer")
            .field("addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl HttpServer {
    /// Binds `addr` (loopback only) for `tools`, callers holding `token`.
    pub async fn bind(addr: SocketAddr, token: String, tools: Tools) -> Result<Self, HttpError> {
        if !addr.ip().is_loopback() {
            return Err(HttpError::NotLoopback { addr });
        }
        if token.trim().len() < MIN_TOKEN_LEN {
            return Err(HttpError::NoToken);
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| HttpError::Bind { addr, source })?;
        let slots = tools.config().max_concurrent_calls.max(1);
        Ok(Self {
            listener,
            shared: Arc::new(Shared {
                tools,
                token: token.trim().to_owned(),
                permits: Semaphore::new(slots),
            }),
        })
    }

    /// The address it listens on (the port chosen when 0 was asked for).
    pub fn local_addr(&self) -> Result<SocketAddr, HttpError> {
        self.listener
            .local_addr()
            .map_err(|source| HttpError::Serve { source })
    }

    /// Serves until `shutdown` completes, then finishes the calls in flight.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), HttpError> {
        let router = Router::new()
            .route(PATH, post(answer).get(no_stream).delete(no_stream))
            .with_state(self.shared);
        axum::serve(self.listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| HttpError::Serve { source })
    }
}

/// Why a request was turned away before reaching the tools.
fn refuse(status: StatusCode, message: &str) -> Response {
    let mut response = (status, axum::Json(json!({"error": message}))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// Whether `origin` is a page served from this machine's loopback (`http://127.0.0.1:3000`, …).
fn loopback_origin(origin: &str) -> bool {
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let host = if let Some(v6) = rest.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        rest.split(':').next().unwrap_or_default()
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks the `Origin` and the bearer token; `Some` is the refusal.
fn check(headers: &HeaderMap, token: &str) -> Option<Response> {
    if let Some(origin) = headers.get(header::ORIGIN)
        && !origin.to_str().is_ok_and(loopback_origin)
    {
        return Some(refuse(
            StatusCode::FORBIDDEN,
            "requests from web pages other than loopback ones are refused",
        ));
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        None => Some(refuse(
            StatusCode::UNAUTHORIZED,
            "a bearer token is needed: Authorization: Bearer <TASKPODS_MCP_TOKEN>",
        )),
        Some(given)
            if !crate::http::access::constant_time_eq(given.as_bytes(), token.as_bytes()) =>
        {
            Some(refuse(
                StatusCode::UNAUTHORIZED,
                "the bearer token is wrong",
            ))
        }
        Some(_) => None,
    }
}

async fn answer(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refusal) = check(&headers, &shared.token) {
        return refusal;
    }
    let message: Value = match serde_json::from_slice(&body) {
        Ok(message) => message,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(error(
                    Value::Null,
                    code::PARSE_ERROR,
                    format!("not JSON: {e}"),
                )),
            )
                .into_response();
        }
    };
    let (batch, messages) = match message {
        Value::Array(items) => (true, items),
        single => (false, vec![single]),
    };
    let answers = futures::future::join_all(messages.into_iter().map(|message| {
        let shared = shared.clone();
        async move {
            // The semaphore is never closed, so a permit always comes.
            let _permit = shared.permits.acquire().await.ok();
            super::handle(&shared.tools, message).await
        }
    }))
    .await;
    let mut answers: Vec<Value> = answers.into_iter().flatten().collect();
    if answers.is_empty() {
        // Only notifications (or responses): accepted, nothing to say.
        return StatusCode::ACCEPTED.into_response();
    }
    if batch {
        axum::Json(Value::Array(answers)).into_response()
    } else {
        axum::Json(answers.remove(0)).into_response()
    }
}

async fn no_stream() -> Response {
    let mut response = refuse(
        StatusCode::METHOD_NOT_ALLOWED,
        "this server offers no event stream: POST JSON-RPC messages to /mcp",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pages_served_from_loopback_count_as_loopback_origins() {
        for ok in [
            "http://127.0.0.1:3000",
            "http://localhost",
            "https://localhost:8443",
            "http://[::1]:80",
        ] {
            assert!(loopback_origin(ok), "{ok}");
        }
        for bad in [
            "https://evil.example",
            "http://127.0.0.1.evil.example",
            "http://localhost.evil.example:80",
            "null",
            "file://",
            "http://10.0.0.1",
        ] {
            assert!(!loopback_origin(bad), "{bad}");
        }
    }
}
