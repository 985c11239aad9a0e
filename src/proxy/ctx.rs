//! Per-request state, carried through Pingora's hooks.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::reject::Reason;
use super::upstream::StreamEnd;
use crate::config::Route;
use crate::request::LlmFields;
use crate::state::Active;
use crate::telemetry::metrics::ActiveGuard;

/// A request's state, boxed: Pingora keeps its `CTX` inline in the
/// per-connection future (twice over), which it boxes, and so copies, for
/// every request and holds for the whole length of a stream. Boxed, that is
/// 8 bytes twice instead of the whole state twice.
pub type Ctx = Box<CtxData>;

/// Large, rarely used parts are boxed too, so that the allocation stays small.
pub struct CtxData {
    pub start: Instant,
    pub request_id: super::headers::RequestId,
    pub trace_id: Option<String>,
    pub method: &'static str,
    /// The snapshot this request started on; it keeps it to the end.
    pub active: Option<Arc<Active>>,
    pub route: Option<Arc<Route>>,
    /// Index of `route` in the snapshot (for per-route runtime state).
    pub route_index: usize,
    /// A retryable upstream answer kept until the retry decision is made.
    /// Boxed: it is rare, and every request (every open stream) carries its
    /// `Ctx`, twice over inside Pingora's per-connection future.
    pub held_answer: Option<Box<super::forward::HeldAnswer>>,
    /// The whole request body, replayable.
    pub body: Bytes,
    pub llm: Option<LlmFields>,
    /// Set when floodwall answered itself.
    pub reason: Option<Reason>,
    pub status: u16,
    /// Any byte of the response went to the client.
    pub response_started: bool,
    pub attempts: u32,
    pub backend: Option<Arc<str>>,
    /// The endpoint of `backend` picked for Pingora's own (WebSocket) path.
    pub endpoint: Option<usize>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub error: Option<String>,
    pub stream_end: Option<StreamEnd>,
    pub cors: Vec<(&'static str, String)>,
    /// Who is calling, when the route has rate-limit rules.
    pub identity: Option<Box<crate::policy::identity::Identity>>,
    /// Tokens and cost reserved at admission, reconciled when the response ends.
    pub reservation: Option<crate::policy::ratelimit::Reservation>,
    /// `X-RateLimit-*` and IETF `RateLimit*` headers for every response of a limited route.
    pub rate_headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Usage read from the response (JSON `usage` or the SSE stream).
    pub usage: Option<Box<super::limits::UsageTracker>>,
    /// Tokens charged when the request ended, and whether they were estimated.
    pub usage_tokens: u64,
    /// The stream slot, when this is a streaming request.
    pub stream: Option<super::admission::StreamGuard>,
    /// The route's concurrency slot.
    /// Boxed: only routes with `concurrency` take one.
    pub slot: Option<Box<super::admission::SlotGuard>>,
    pub usage_estimated: bool,
    /// Decrements the active-requests gauge when dropped, on every path.
    pub active_guard: Option<ActiveGuard>,
    /// Counts the request as in flight for graceful shutdown.
    pub in_flight: Option<crate::shutdown::InFlight>,
    /// The response cache's state, on a cached route.
    pub cache: Option<Box<super::cache::CacheCtx>>,
}

impl CtxData {
    pub fn new() -> Self {
        CtxData {
            start: Instant::now(),
            request_id: Default::default(),
            trace_id: None,
            method: "OTHER",
            active: None,
            route: None,
            route_index: 0,
            held_answer: None,
            body: Bytes::new(),
            llm: None,
            reason: None,
            status: 0,
            response_started: false,
            attempts: 0,
            backend: None,
            endpoint: None,
            bytes_in: 0,
            bytes_out: 0,
            error: None,
            stream_end: None,
            cors: Vec::new(),
            identity: None,
            reservation: None,
            rate_headers: Vec::new(),
            usage: None,
            usage_tokens: 0,
            stream: None,
            slot: None,
            usage_estimated: false,
            active_guard: None,
            in_flight: None,
            cache: None,
        }
    }
}

impl Default for CtxData {
    fn default() -> Self {
        Self::new()
    }
}
