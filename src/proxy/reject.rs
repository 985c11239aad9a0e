//! Responses that floodwall makes itself, and the one place that maps each
//! reason to its HTTP status, error type, metric label and log level.
//!
//! Every such response carries the OpenAI error envelope
//! `{"error":{"message","type","code"}}` (so SDKs raise it cleanly), an
//! `x-floodwall-reason: <code>` header, the request id, and `Retry-After` on
//! every 429 and 503. `docs/errors.md` lists every code.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

/// Why floodwall answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NoRoute,
    BodyTooLarge,
    InvalidJson,
    RequestTooLarge,
    InvalidRequest,
    RequestTimeout,
    UpstreamConnectError,
    UpstreamTimeout,
    UpstreamError,
    CircuitOpen,
    RateLimited,
    TokensExceeded,
    BudgetExceeded,
    MissingIdentity,
    InvalidToken,
    LimiterUnavailable,
    StreamLimit,
    ConcurrencyLimit,
    Overloaded,
    UpstreamQuota,
    /// `server.max_connections` reached (the connection is answered and closed).
    ConnectionLimit,
    /// The request header is over `server.max_request_header_size`.
    HeaderTooLarge,
    /// The request header did not arrive within `server.request_header_timeout`.
    HeaderTimeout,
    /// `CONNECT` (Pingora refuses it before any route is looked up).
    MethodNotAllowed,
    /// A route's static `fallback.respond` answer (its status is the policy's).
    FallbackResponse,
    Internal,
}

impl Reason {
    pub const ALL: [Reason; 26] = [
        Reason::StreamLimit,
        Reason::ConcurrencyLimit,
        Reason::Overloaded,
        Reason::UpstreamQuota,
        Reason::RateLimited,
        Reason::TokensExceeded,
        Reason::BudgetExceeded,
        Reason::MissingIdentity,
        Reason::InvalidToken,
        Reason::LimiterUnavailable,
        Reason::CircuitOpen,
        Reason::FallbackResponse,
        Reason::NoRoute,
        Reason::BodyTooLarge,
        Reason::InvalidJson,
        Reason::RequestTooLarge,
        Reason::InvalidRequest,
        Reason::RequestTimeout,
        Reason::UpstreamConnectError,
        Reason::UpstreamTimeout,
        Reason::UpstreamError,
        Reason::ConnectionLimit,
        Reason::HeaderTooLarge,
        Reason::HeaderTimeout,
        Reason::MethodNotAllowed,
        Reason::Internal,
    ];

    /// The `x-floodwall-reason` value, the `error.code`, and the metric label.
    pub fn code(self) -> &'static str {
        match self {
            Reason::NoRoute => "no_route",
            Reason::BodyTooLarge => "body_too_large",
            Reason::InvalidJson => "invalid_json",
            Reason::RequestTooLarge => "request_too_large",
            Reason::InvalidRequest => "invalid_request",
            Reason::RequestTimeout => "request_timeout",
            Reason::UpstreamConnectError => "upstream_connect_error",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::UpstreamError => "upstream_error",
            Reason::CircuitOpen => "circuit_open",
            Reason::RateLimited => "rate_limited",
            Reason::TokensExceeded => "tokens_exceeded",
            Reason::BudgetExceeded => "budget_exceeded",
            Reason::MissingIdentity => "missing_identity",
            Reason::InvalidToken => "invalid_token",
            Reason::LimiterUnavailable => "limiter_unavailable",
            Reason::StreamLimit => "stream_limit",
            Reason::ConcurrencyLimit => "concurrency_limit",
            Reason::Overloaded => "overloaded",
            Reason::UpstreamQuota => "upstream_quota",
            Reason::FallbackResponse => "fallback_response",
            Reason::ConnectionLimit => "connection_limit",
            Reason::HeaderTooLarge => "header_too_large",
            Reason::HeaderTimeout => "header_timeout",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::Internal => "internal_error",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Reason::NoRoute => 404,
            Reason::BodyTooLarge => 413,
            Reason::InvalidJson | Reason::RequestTooLarge | Reason::InvalidRequest => 400,
            Reason::RequestTimeout | Reason::HeaderTimeout => 408,
            Reason::HeaderTooLarge => 431,
            Reason::MethodNotAllowed => 405,
            Reason::UpstreamConnectError | Reason::UpstreamError => 502,
            Reason::UpstreamTimeout => 504,
            Reason::CircuitOpen
            | Reason::FallbackResponse
            | Reason::LimiterUnavailable
            | Reason::StreamLimit
            | Reason::Overloaded
            | Reason::UpstreamQuota
            | Reason::ConnectionLimit => 503,
            Reason::ConcurrencyLimit => 429,
            Reason::RateLimited | Reason::TokensExceeded | Reason::BudgetExceeded => 429,
            Reason::MissingIdentity | Reason::InvalidToken => 401,
            Reason::Internal => 500,
        }
    }

    /// The OpenAI-style `error.type`.
    pub fn error_type(self) -> &'static str {
        match self {
            Reason::NoRoute => "not_found_error",
            Reason::BodyTooLarge
            | Reason::InvalidJson
            | Reason::RequestTooLarge
            | Reason::InvalidRequest
            | Reason::RequestTimeout
            | Reason::HeaderTooLarge
            | Reason::HeaderTimeout
            | Reason::MethodNotAllowed => "invalid_request_error",
            Reason::UpstreamConnectError | Reason::UpstreamTimeout | Reason::UpstreamError => {
                "upstream_error"
            }
            Reason::CircuitOpen
            | Reason::FallbackResponse
            | Reason::LimiterUnavailable
            | Reason::StreamLimit
            | Reason::Overloaded
            | Reason::UpstreamQuota
            | Reason::ConnectionLimit => "unavailable",
            Reason::ConcurrencyLimit => "rate_limit_error",
            Reason::RateLimited | Reason::TokensExceeded | Reason::BudgetExceeded => {
                "rate_limit_error"
            }
            Reason::MissingIdentity | Reason::InvalidToken => "authentication_error",
            Reason::Internal => "server_error",
        }
    }

    /// Client mistakes are logged at debug; upstream trouble at warn.
    pub fn is_client_error(self) -> bool {
        self.status() < 500
    }
}

/// A response floodwall will send instead of proxying.
#[derive(Debug, Clone)]
pub struct Reject {
    pub reason: Reason,
    /// A status other than the reason's usual one (e.g. a rule's
    /// `missing_identity_status: 400`).
    pub status: Option<u16>,
    pub message: String,
    /// Seconds, rounded up; always set on 429 and 503.
    pub retry_after: Option<u64>,
}

impl Reject {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Reject {
            reason,
            status: None,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn status(&self) -> u16 {
        self.status.unwrap_or_else(|| self.reason.status())
    }

    pub fn body(&self) -> Bytes {
        error_body(&self.message, self.reason.error_type(), self.reason.code())
    }

    /// The response header, without request-id or CORS headers (the caller adds those).
    pub fn header(&self, body_len: usize) -> pingora::Result<ResponseHeader> {
        let status = self.status();
        let mut h = ResponseHeader::build(status, Some(6))?;
        h.insert_header("content-type", "application/json")?;
        h.insert_header("content-length", body_len.to_string())?;
        h.insert_header("x-floodwall-reason", self.reason.code())?;
        let retry_after = match (self.retry_after, status) {
            (Some(s), _) => Some(s),
            (None, 429 | 503) => Some(1),
            _ => None,
        };
        if let Some(s) = retry_after {
            h.insert_header("retry-after", s.to_string())?;
        }
        h.insert_header("cache-control", "no-store")?;
        Ok(h)
    }
}

/// The OpenAI error envelope, serialised.
pub fn error_body(message: &str, error_type: &str, code: &str) -> Bytes {
    let v = serde_json::json!({
        "error": { "message": message, "type": error_type, "code": code }
    });
    Bytes::from(v.to_string())
}

/// Write a rejection to the client. `extra` headers (request id, CORS) are
/// added on top. The connection is closed afterwards when the request body
/// was not read to the end, so that unread bytes are never parsed as a request.
pub async fn send(
    session: &mut Session,
    reject: &Reject,
    extra: &[(http::HeaderName, http::HeaderValue)],
    body_fully_read: bool,
) -> pingora::Result<()> {
    let body = reject.body();
    let mut h = reject.header(body.len())?;
    for (k, v) in extra {
        h.insert_header(k.clone(), v.clone())?;
    }
    if !body_fully_read {
        session.set_keepalive(None);
        h.insert_header("connection", "close")?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(h), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_openai_envelope() {
        let r = Reject::new(Reason::NoRoute, "no route for GET /x");
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["error"]["message"], "no route for GET /x");
        assert_eq!(v["error"]["type"], "not_found_error");
        assert_eq!(v["error"]["code"], "no_route");
    }

    #[test]
    fn header_carries_reason_and_retry_after_on_503() {
        let r = Reject::new(Reason::UpstreamTimeout, "t");
        let h = r.header(10).unwrap();
        assert_eq!(h.status.as_u16(), 504);
        assert_eq!(
            h.headers.get("x-floodwall-reason").unwrap(),
            "upstream_timeout"
        );
        assert!(h.headers.get("retry-after").is_none());
        let codes: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), Reason::ALL.len(), "codes are unique");
    }
}
