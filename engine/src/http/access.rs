//! Who may read and who may cancel.
//!
//! - Without tokens the server only listens on loopback ([`super::HttpServer::bind`] refuses anything
//!   else), and callers are operators (read and cancel) unless the server is read-only. Such callers must
//!   name a loopback host in `Host`, so a web page that rebinds its own DNS name to 127.0.0.1 gets nothing.
//! - With tokens, every `/api/` request carries one: `Authorization: Bearer <token>`, or the cookie the page
//!   gets by posting the token to `/api/session` (HttpOnly, SameSite=Strict). The read token reads; the
//!   operator token also cancels.
//! - Every request that changes something (POST) carries `X-Taskpods-Request: 1`. A cross-site form or
//!   `fetch` cannot add that header without a CORS preflight, which this server never grants.
//!
//! The page's assets carry no data and are served to anyone; the API is what is guarded.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AppState, HttpConfig};

/// The cookie the page keeps its token in.
pub const TOKEN_COOKIE: &str = "taskpods_token";
/// The header every state-changing request must carry.
pub const REQUEST_HEADER: &str = "x-taskpods-request";

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read the views, output and status.
    Reader,
    /// Also cancel tasks.
    Operator,
}

/// The server's access rules.
#[derive(Clone)]
pub struct Access {
    read_token: Option<String>,
    operator_token: Option<String>,
    anonymous: Role,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the tokens.
        f.debug_struct("Access")
            .field("tokens", &self.has_tokens())
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

impl Access {
    /// The rules `config` asks for.
    pub fn new(config: &HttpConfig) -> Self {
        let nonempty = |t: &Option<String>| t.clone().filter(|t| !t.is_empty());
        Self {
            read_token: nonempty(&config.read_token),
            operator_token: nonempty(&config.operator_token),
            anonymous: if config.read_only {
                Role::Reader
            } else {
                Role::Operator
            },
        }
    }

    /// Whether callers must present a token.
    pub fn has_tokens(&self) -> bool {
        self.read_token.is_some() || self.operator_token.is_some()
    }

    /// The role a presented token grants.
    pub fn role_of_token(&self, token: &str) -> Option<Role> {
        let matches = |want: &Option<String>| {
            want.as_deref()
                .is_some_and(|want| constant_time_eq(want.as_bytes(), token.as_bytes()))
        };
        if matches(&self.operator_token) {
            Some(Role::Operator)
        } else if matches(&self.read_token) {
            Some(Role::Reader)
        } else {
            None
        }
    }

    /// The role of a request, or why it has none.
    pub fn role(&self, headers: &HeaderMap) -> Result<Role, Denied> {
        if !self.has_tokens() {
            return if loopback_host(headers) {
                Ok(self.anonymous)
            } else {
                Err(Denied::ForeignHost)
            };
        }
        let token = bearer(headers).or_else(|| cookie(headers, TOKEN_COOKIE));
        match token {
            None => Err(Denied::NoToken),
            Some(token) => self.role_of_token(&token).ok_or(Denied::BadToken),
        }
    }
}

/// Why a request was turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No token, and the server needs one.
    NoToken,
    /// A token that is not one of the server's.
    BadToken,
    /// A request without a token for a host name that is not loopback (DNS rebinding).
    ForeignHost,
    /// A state-changing request without the `X-Taskpods-Request` header.
    NoRequestHeader,
    /// The caller may read but not cancel.
    ReadOnly,
}

impl Denied {
    fn status(self) -> StatusCode {
        match self {
            Self::NoToken | Self::BadToken => StatusCode::UNAUTHORIZED,
            Self::ForeignHost | Self::NoRequestHeader | Self::ReadOnly => StatusCode::FORBIDDEN,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::NoToken => "a token is needed: Authorization: Bearer <token>",
            Self::BadToken => "the token is not valid",
            Self::ForeignHost => "without a token, only a loopback host name is served",
            Self::NoRequestHeader => {
                "state-changing requests need the header X-Taskpods-Request: 1"
            }
            Self::ReadOnly => "this token (or this server) is read-only: cancelling is not allowed",
        }
    }
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        super::api::ApiError::new(self.status(), self.message()).into_response()
    }
}

/// The access layer: guards `/api/`, and tags each request with its caller's role.
pub async fn layer(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let guarded = path.starts_with("/api/") && path != "/api/session";
    if request.method() == Method::POST
        && request.headers().get(REQUEST_HEADER).map(|v| v.as_bytes()) != Some(b"1")
    {
        return Denied::NoRequestHeader.into_response();
    }
    if guarded {
        match state.access.role(request.headers()) {
            Ok(role) => {
                request.extensions_mut().insert(role);
            }
            Err(denied) => return denied.into_response(),
        }
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    response
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then(|| token.to_owned())
}

/// The value of cookie `name`.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        // HTTP/1.0 without Host: only a local tool does that.
        return true;
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether `a` equals `b`, in a time that does not depend on where they differ (token checks).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, v.parse().expect("header value"));
        }
        map
    }

    #[test]
    fn without_tokens_only_loopback_hosts_are_served() {
        let access = Access::new(&HttpConfig::default());
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "[::1]:8080",
            "LOCALHOST",
        ] {
            assert_eq!(
                access.role(&headers(&[("host", host)])),
                Ok(Role::Operator),
                "{host}"
            );
        }
        for host in [
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "10.0.0.1:8080",
        ] {
            assert_eq!(
                access.role(&headers(&[("host", host)])),
                Err(Denied::ForeignHost),
                "{host}"
            );
        }
    }

    #[test]
    fn tokens_grant_their_role_and_nothing_else() {
        let access = Access::new(&HttpConfig {
            read_token: Some("reader-secret".into()),
            operator_token: Some("operator-secret".into()),
            ..HttpConfig::default()
        });
        let role = |h: &[(&'static str, &str)]| access.role(&headers(h));
        assert_eq!(role(&[("host", "localhost")]), Err(Denied::NoToken));
        assert_eq!(
            role(&[("authorization", "Bearer reader-secret")]),
            Ok(Role::Reader)
        );
        assert_eq!(
            role(&[("authorization", "Bearer operator-secret")]),
            Ok(Role::Operator)
        );
        assert_eq!(
            role(&[("authorization", "Bearer operator-secre")]),
            Err(Denied::BadToken)
        );
        assert_eq!(
            role(&[("authorization", "Basic operator-secret")]),
            Err(Denied::NoToken)
        );
        assert_eq!(
            role(&[("cookie", "a=b; taskpods_token=reader-secret")]),
            Ok(Role::Reader)
        );
        assert!(!format!("{access:?}").contains("secret"));
    }
}
