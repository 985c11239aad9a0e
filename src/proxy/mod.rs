//! The Pingora wiring: request intake, routing, the upstream exchange and
//! floodwall's own responses. It asks the pure modules (`routing`,
//! `request`, later `policy::*`) for decisions and acts on them; it holds no
//! policy logic of its own.
//!
//! Request path (all in `request_filter`):
//! 1. load the current snapshot once (a reload never changes a running request);
//! 2. request id, CORS preflight;
//! 3. route match (404 `no_route`);
//! 4. read the whole body up to `max_body` (413), parse what the policies
//!    need (400 `invalid_json`), run the route's request checks (400);
//! 5. one attempt upstream over Pingora's pooled connector
//!    ([`upstream`]), streaming the answer back chunk by chunk.
//!
//! WebSocket routes (`websocket: true`) hand Upgrade requests to Pingora's own
//! proxy loop untouched, through `upstream_peer`.

pub mod admission;
pub mod cache;
pub mod ctx;
pub mod forward;
pub mod headers;
pub mod limits;
pub mod reject;
pub mod sse;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::response::Parts as RespParts;
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};
use tracing::{debug, warn};

pub use ctx::Ctx;
use reject::{Reason, Reject};

use crate::config::{JsonMode, Route};
use crate::request::{self, BodyError};
use crate::state::{Active, Shared};

/// A boxed future. floodwall's rarely taken paths (a refusal, a stale
/// answer, a static fallback, draining a failed answer, storing a cache
/// entry) return one, so that the per-request future, which Pingora boxes
/// and moves for every request, does not reserve room for their states.
pub type BoxFut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// How long a client may take to send its request body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

pub struct FloodwallProxy {
    shared: Arc<Shared>,
    connector: upstream::Connectors,
}

impl FloodwallProxy {
    pub fn new(shared: Arc<Shared>) -> Self {
        FloodwallProxy {
            shared,
            connector: upstream::Connectors::default(),
        }
    }

    /// Send a rejection with the request id and CORS headers, and record it.
    fn reject<'a>(
        &'a self,
        session: &'a mut Session,
        ctx: &'a mut Ctx,
        r: Reject,
        body_read: bool,
    ) -> BoxFut<'a, Result<bool>> {
        Box::pin(async move {
            ctx.reason = Some(r.reason);
            ctx.status = r.status();
            ctx.error = Some(r.message.clone());
            if r.reason.is_client_error() {
                debug!(request_id = %ctx.request_id, reason = r.reason.code(), "{}", r.message);
            } else {
                warn!(request_id = %ctx.request_id, reason = r.reason.code(), "{}", r.message);
            }
            self.shared.metrics.local_response(r.reason.code());
            let mut extra: Vec<(http::HeaderName, HeaderValue)> = ctx
                .cors
                .iter()
                .filter_map(|(k, v)| Some((k.parse().ok()?, v.parse().ok()?)))
                .collect();
            extra.extend(ctx.rate_headers.iter().cloned());
            extra.push((headers::names::X_REQUEST_ID, ctx.request_id.header()));
            reject::send(session, &r, &extra, body_read).await?;
            ctx.response_started = true;
            Ok(true)
        })
    }

    /// Read the whole request body, bounded by `max_body` and a time limit.
    async fn read_body(session: &mut Session, max: usize) -> std::result::Result<Bytes, Reject> {
        if let Some(len) = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            if len > max as u64 {
                return Err(too_large(len, max));
            }
        }
        // `Expect: 100-continue`: the body is acceptable so far, so ask for it
        // now rather than leave the client waiting out its own timer.
        if expects_continue(session.req_header()) && !session.is_body_empty() {
            session.write_continue_response().await.map_err(|e| {
                Reject::new(
                    Reason::InvalidRequest,
                    format!("could not send 100 Continue: {}", e.etype().as_str()),
                )
            })?;
        }
        // A body that arrives in one chunk (the common case) is kept as
        // Pingora read it; only a second chunk starts a copy.
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        let read = async {
            while let Some(chunk) = session.read_request_body().await? {
                let had = first.as_ref().map_or(0, Bytes::len) + buf.len();
                if had + chunk.len() > max {
                    return Ok(Err(too_large((had + chunk.len()) as u64, max)));
                }
                match first.take() {
                    None if buf.is_empty() => first = Some(chunk),
                    None => buf.extend_from_slice(&chunk),
                    Some(f) => {
                        buf.reserve(f.len() + chunk.len());
                        buf.extend_from_slice(&f);
                        buf.extend_from_slice(&chunk);
                    }
                }
            }
            Ok::<_, Box<Error>>(Ok(()))
        };
        match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
            Err(_) => Err(Reject::new(
                Reason::RequestTimeout,
                format!(
                    "the request body did not arrive within {}s",
                    BODY_READ_TIMEOUT.as_secs()
                ),
            )),
            Ok(Err(e)) => Err(Reject::new(
                Reason::InvalidRequest,
                format!("could not read the request body: {}", e.etype().as_str()),
            )),
            Ok(Ok(Err(r))) => Err(r),
            Ok(Ok(Ok(()))) => Ok(first.unwrap_or_else(|| buf.freeze())),
        }
    }

    /// The request header to send upstream for `route`, with `host` as its
    /// `Host` and a body of `body_len` bytes.
    ///
    /// Built as plain `http` parts and turned into Pingora's header at the
    /// end: Pingora's own per-header methods parse and copy every name
    /// again and keep a second map of the names' original case, which cost
    /// more than the rest of this function. Names the client sent go
    /// upstream normalized (standard names title-cased, others lower case;
    /// HTTP names are case-insensitive, and Envoy does the same).
    fn upstream_request(
        &self,
        session: &Session,
        ctx: &Ctx,
        route: &Route,
        active: &Active,
        host: Option<&HeaderValue>,
        body_len: usize,
    ) -> Result<RequestHeader> {
        let down = session.req_header();
        let mut parts = down.as_owned_parts();
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let new_pq = crate::routing::rewrite_path(
            route
                .rewrite
                .as_ref()
                .and_then(|r| r.strip_prefix.as_deref()),
            pq,
        );
        let new_target = new_pq != pq || parts.uri.authority().is_some();
        if new_target {
            parts.uri = new_pq.parse().map_err(|_| {
                Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "rewritten path is not a valid URI",
                )
            })?;
        }
        let h = &mut parts.headers;
        // Room for the headers added below, so that adding them does not
        // grow (and rehash) the map.
        h.reserve(5);
        let upgrade = route.websocket && session.is_upgrade_req();
        let upgrade_hdrs = if upgrade {
            (
                h.get(http::header::UPGRADE).cloned(),
                h.get(http::header::CONNECTION).cloned(),
            )
        } else {
            (None, None)
        };
        headers::strip_hop_by_hop(h);
        if let (Some(u), Some(c)) = upgrade_hdrs {
            h.insert(http::header::UPGRADE, u);
            h.insert(http::header::CONNECTION, c);
        }
        let peer_ip = client_ip(session);
        let trusted = headers::is_trusted(&active.snapshot.server.trusted_proxies, peer_ip);
        let existing = h
            .get(headers::names::X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok());
        if let Some(xff) = headers::forwarded_for(existing, peer_ip, trusted) {
            h.insert(headers::names::X_FORWARDED_FOR, headers::value_of(xff)?);
        }
        if !(trusted && h.contains_key(headers::names::X_FORWARDED_PROTO)) {
            h.insert(
                headers::names::X_FORWARDED_PROTO,
                HeaderValue::from_static("http"),
            );
        }
        h.insert(headers::names::X_REQUEST_ID, ctx.request_id.header());
        if let Some(host) = host {
            h.insert(http::header::HOST, host.clone());
        }
        if !upgrade {
            let length = h.get_all(http::header::CONTENT_LENGTH);
            let mut lengths = length.iter();
            let sent = lengths.next();
            if body_len == 0 && sent.is_none() && parts.method != http::Method::POST {
                // no body, no framing header
            } else if lengths.next().is_none()
                && sent.is_some_and(|v| is_decimal(v.as_bytes(), body_len))
            {
                // The client's one Content-Length already says it.
            } else {
                h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body_len));
            }
        }
        let mut req = RequestHeader::from(parts);
        if !new_target && !down.raw_path_is_utf8() {
            // A target that is not UTF-8 goes upstream as the client sent
            // it, not as the URI's lossy rendering.
            req.set_raw_path(down.raw_path())?;
        }
        Ok(req)
    }

    /// Fix up an upstream response header for the client (as plain `http`
    /// parts: see [`Self::upstream_request`] for why).
    fn prepare_response(&self, session: &Session, ctx: &Ctx, resp: &mut RespParts) -> Result<()> {
        let h = &mut resp.headers;
        h.reserve(4 + ctx.rate_headers.len());
        headers::strip_hop_by_hop(h);
        if session.as_http1().is_some() || session.req_header().version < http::Version::HTTP_2 {
            resp.version = http::Version::HTTP_11;
            // Without a length, HTTP/1.1 needs chunked framing; the hop-by-hop
            // pass removed the upstream's own Transfer-Encoding. Statuses that
            // never have a body must not carry it, nor may a response to an
            // HTTP/1.0 request, whose body is then delimited by the close
            // (RFC 9112 §6.1).
            let bodiless = matches!(resp.status.as_u16(), 100..=199 | 204 | 304);
            let client_chunks = session.req_header().version >= http::Version::HTTP_11;
            if !bodiless && client_chunks && !h.contains_key(http::header::CONTENT_LENGTH) {
                h.insert(
                    http::header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            }
        }
        h.insert(headers::names::X_REQUEST_ID, ctx.request_id.header());
        if let Some(c) = &ctx.cache {
            h.insert(
                headers::names::X_CACHE,
                HeaderValue::from_static(c.status.as_str()),
            );
            if !h.contains_key(http::header::AGE) {
                h.insert(http::header::AGE, HeaderValue::from_static("0"));
            }
        }
        headers::add_cors(h, &ctx.cors)?;
        for (k, v) in &ctx.rate_headers {
            h.insert(k.clone(), v.clone());
        }
        Ok(())
    }
}

fn too_large(len: u64, max: usize) -> Reject {
    Reject::new(
        Reason::BodyTooLarge,
        format!("request body is {len} bytes; the route's max_body is {max} bytes"),
    )
}

/// `v` is exactly `n` written in decimal (no sign, spaces or leading zeros).
fn is_decimal(v: &[u8], n: usize) -> bool {
    let mut rest = n;
    for (i, &b) in v.iter().enumerate().rev() {
        if !b.is_ascii_digit() || usize::from(b - b'0') != rest % 10 {
            return false;
        }
        rest /= 10;
        if rest == 0 {
            return i == 0;
        }
    }
    false
}

fn client_ip(session: &Session) -> Option<std::net::IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

fn header_str(req: &RequestHeader, name: impl http::header::AsHeaderName) -> Option<&str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

/// An HTTP/1.1 request with `Expect: 100-continue` (RFC 9110 §10.1.1).
fn expects_continue(req: &RequestHeader) -> bool {
    req.version == http::Version::HTTP_11
        && header_str(req, http::header::EXPECT)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
}

fn is_json_content_type(req: &RequestHeader) -> bool {
    header_str(req, http::header::CONTENT_TYPE).is_some_and(|ct| {
        let ct = ct.split(';').next().unwrap_or("").trim();
        ct.eq_ignore_ascii_case("application/json")
            || (ct.len() >= 5 && ct.as_bytes()[ct.len() - 5..].eq_ignore_ascii_case(b"+json"))
    })
}

#[async_trait]
impl ProxyHttp for FloodwallProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Box::new(ctx::CtxData::new())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        crate::connection::claim(session);
        ctx.in_flight = Some(self.shared.shutdown.enter());
        let active = self.shared.active();
        let req = session.req_header();
        ctx.request_id = headers::RequestId::new(
            headers::accept_request_id(
                req.headers
                    .get(headers::names::X_REQUEST_ID)
                    .map(|v| v.as_bytes()),
            )
            .unwrap_or_else(headers::new_request_id),
        );
        ctx.trace_id = header_str(req, headers::names::TRACEPARENT)
            .and_then(crate::telemetry::logging::trace_id_from_traceparent)
            .map(str::to_string);
        ctx.method = crate::telemetry::metrics::method_label(&req.method);
        let snap = &active.snapshot;

        // CORS: headers on every response, and preflights answered here.
        if let Some(cors) = &snap.server.cors {
            let origin = header_str(req, http::header::ORIGIN);
            ctx.cors = headers::cors_headers(cors, origin);
            if req.method == http::Method::OPTIONS
                && origin.is_some()
                && req.headers.contains_key("access-control-request-method")
            {
                let mut h = ResponseHeader::build(204, Some(8))?;
                if !ctx.cors.is_empty() {
                    for (k, v) in ctx
                        .cors
                        .iter()
                        .cloned()
                        .chain(headers::preflight_headers(cors))
                    {
                        h.insert_header(k, v)?;
                    }
                }
                h.insert_header("x-request-id", ctx.request_id.as_str())?;
                h.insert_header("content-length", "0")?;
                ctx.status = 204;
                session.write_response_header(Box::new(h), true).await?;
                ctx.response_started = true;
                return Ok(true);
            }
        }

        // Routing.
        let found = {
            let req = session.req_header();
            let host = header_str(req, http::header::HOST).or_else(|| req.uri.host());
            let lookup = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
            crate::routing::find(
                &snap.routes,
                &crate::routing::RequestParts {
                    method: &req.method,
                    path: req.uri.path(),
                    host,
                    header: &lookup,
                },
            )
        };
        let Some(idx) = found else {
            let req = session.req_header();
            let msg = format!("no route matches {} {}", req.method, req.uri.path());
            ctx.active = Some(active);
            let body_done = session.is_body_empty();
            return self
                .reject(session, ctx, Reject::new(Reason::NoRoute, msg), body_done)
                .await;
        };
        let route = snap.routes[idx].clone();
        ctx.route = Some(route.clone());
        ctx.route_index = idx;
        ctx.active_guard = Some(match active.route_metrics.get(idx) {
            Some(slot) => self.shared.metrics.active_request_on(slot, &route.name),
            None => self.shared.metrics.active_request(&route.name),
        });
        ctx.active = Some(active.clone());

        if route.websocket && session.is_upgrade_req() {
            // Pingora's own loop proxies the upgrade untouched (upstream_peer below).
            return Ok(false);
        }

        // Body.
        ctx.body = match Self::read_body(session, route.request.max_body).await {
            Ok(b) => b,
            Err(r) => return self.reject(session, ctx, r, false).await,
        };
        ctx.bytes_in = ctx.body.len() as u64;
        let parse_json = match route.request.json {
            JsonMode::Off => false,
            JsonMode::Required => true,
            JsonMode::Auto => is_json_content_type(session.req_header()),
        };
        let mut doc: Option<serde_json::Value> = None;
        if parse_json {
            // `request.fields` checks read their paths in the parse's own
            // pass; the whole document is built only for what reads it.
            let keep_doc = snap.limits.identity.needs_body_doc() || route.cache.is_some();
            match request::parse(&ctx.body, keep_doc, &route.request.fields) {
                Ok(Some(parsed)) => {
                    if let Err(e) = request::check(&route.request, Some(&parsed), &ctx.body) {
                        return self.reject(session, ctx, body_reject(e), true).await;
                    }
                    ctx.llm = Some(parsed.llm);
                    doc = parsed.doc;
                }
                Ok(None) if route.request.json == JsonMode::Required => {
                    let r = Reject::new(
                        Reason::InvalidJson,
                        "request body is empty; this route expects JSON",
                    );
                    return self.reject(session, ctx, r, true).await;
                }
                Ok(None) => {
                    if let Err(e) = request::check(&route.request, None, &ctx.body) {
                        return self.reject(session, ctx, body_reject(e), true).await;
                    }
                }
                Err(e) => return self.reject(session, ctx, body_reject(e), true).await,
            }
        } else if !route.request.fields.is_empty() || route.request.max_messages.is_some() {
            // Checks that need JSON, on a body that is not declared JSON:
            // refuse rather than let the checks be silently skipped.
            if !ctx.body.is_empty() {
                let r = Reject::new(
                    Reason::InvalidRequest,
                    "this route checks JSON fields; send the body as Content-Type: application/json",
                );
                return self.reject(session, ctx, r, true).await;
            }
        }

        // Identity, rate limits, token and cost budgets. This and the
        // admission below are boxed so that their states (a Redis round
        // trip, a queue wait) do not stay part of the request future for the
        // whole length of a stream.
        // Each is called only when the route has something for it to do,
        // so that a route without policies allocates none of their boxes.
        if !snap.limits.rules_for(idx).is_empty() {
            if let Some(sent) =
                Box::pin(self.admit_limits(session, ctx, &active, doc.as_ref())).await?
            {
                return Ok(sent);
            }
        }
        // The response cache: a hit or a collapsed miss is answered here
        // (boxed like the steps around it: a hit's replay, a follower's wait).
        if route.cache.is_some() {
            if let Some(sent) =
                Box::pin(self.admit_cache(session, ctx, &active, &route, doc.as_ref())).await?
            {
                return Ok(sent);
            }
        }
        drop(doc);

        // Stream slots and the route's concurrency limit (may queue).
        if admission::admission_applies(ctx, &active) {
            if let Some(sent) = Box::pin(self.admit_admission(session, ctx, &active)).await? {
                return Ok(sent);
            }
        }

        self.forward(session, ctx, &active, &route).await
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        // Only WebSocket upgrades take Pingora's own path.
        let (Some(active), Some(route)) = (ctx.active.as_ref(), ctx.route.as_ref()) else {
            return Error::e_explain(ErrorType::InternalError, "upstream_peer without a route");
        };
        let backend = &active.backends[route.backend];
        let i = backend.pick();
        ctx.endpoint = Some(i);
        ctx.backend = Some(backend.name.clone());
        ctx.attempts += 1;
        match backend.peer(i) {
            Some(p) => Ok(Box::new(p.clone())),
            None => Error::e_explain(ErrorType::ConnectNoRoute, "backend endpoint unavailable"),
        }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let (Some(active), Some(route)) = (ctx.active.clone(), ctx.route.clone()) else {
            return Ok(());
        };
        // The Host of the endpoint `upstream_peer` picked, not the first one.
        let host = active.backends[route.backend].host(ctx.endpoint.unwrap_or(0));
        *upstream_request =
            self.upstream_request(session, ctx, &route, &active, host, ctx.body.len())?;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.status = resp.status.as_u16();
        ctx.response_started = true;
        let backend = ctx
            .active
            .as_ref()
            .zip(ctx.route.as_ref())
            .map(|(a, r)| a.backends[r.backend].name_header.clone());
        let id = ctx.request_id.header();
        headers::edit_response(resp, |p| {
            p.headers.insert(headers::names::X_REQUEST_ID, id);
            if let Some(b) = backend {
                p.headers.insert(headers::names::X_FLOODWALL_BACKEND, b);
            }
            headers::add_cors(&mut p.headers, &ctx.cors)
        })
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, _error: &Error) -> bool {
        // Errors floodwall raised itself were already logged with context.
        ctx.error.is_some()
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if ctx.response_started {
            return FailToProxy {
                error_code: ctx.status,
                can_reuse_downstream: false,
            };
        }
        let reason = match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                if *e.esource() == pingora::ErrorSource::Upstream {
                    Reason::UpstreamTimeout
                } else {
                    Reason::RequestTimeout
                }
            }
            ErrorType::ConnectError
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::TLSHandshakeFailure => Reason::UpstreamConnectError,
            _ => match e.esource() {
                pingora::ErrorSource::Upstream => Reason::UpstreamError,
                pingora::ErrorSource::Downstream => {
                    if matches!(
                        e.etype(),
                        ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed
                    ) {
                        if ctx.error.is_none() {
                            ctx.error = Some(format!("client went away: {}", e.etype().as_str()));
                        }
                        return FailToProxy {
                            error_code: 0,
                            can_reuse_downstream: false,
                        };
                    }
                    Reason::InvalidRequest
                }
                _ => Reason::Internal,
            },
        };
        let r = Reject::new(reason, e.etype().as_str().to_string());
        let code = r.status();
        let _ = self.reject(session, ctx, r, false).await;
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let elapsed = ctx.start.elapsed();
        self.settle_usage(ctx).await;
        let route = ctx
            .route
            .as_ref()
            .map(|r| r.name.as_str())
            .unwrap_or("unmatched");
        let status = if ctx.status == 0 {
            session
                .response_written()
                .map(|r| r.status.as_u16())
                .unwrap_or(0)
        } else {
            ctx.status
        };
        let m = &self.shared.metrics;
        let secs = elapsed.as_secs_f64();
        let slot = ctx.route.as_ref().and(ctx.active.as_ref());
        match slot.and_then(|a| a.route_metrics.get(ctx.route_index)) {
            Some(slot) => m.finish_request_on(
                slot,
                route,
                ctx.method,
                status,
                secs,
                (ctx.bytes_in, ctx.bytes_out),
            ),
            _ => {
                m.observe_request(route, ctx.method, status, secs);
                m.add_bytes(route, ctx.bytes_in, ctx.bytes_out);
            }
        }
        ctx.active_guard.take();
        ctx.in_flight.take();
        let error = ctx.error.as_deref().or(e.map(|_| "proxy error"));
        crate::telemetry::access::emit(&crate::telemetry::access::AccessLine {
            request_id: &ctx.request_id,
            trace_id: ctx.trace_id.as_deref().unwrap_or(""),
            method: ctx.method,
            route,
            backend: ctx.backend.as_deref().unwrap_or(""),
            status,
            latency_ms: elapsed.as_secs_f64() * 1000.0,
            attempts: ctx.attempts,
            bytes_in: ctx.bytes_in,
            bytes_out: ctx.bytes_out,
            reason: ctx.reason.map(|r| r.code()).unwrap_or(""),
            stream_end: ctx.stream_end.map(|s| s.as_str()).unwrap_or(""),
            user: ctx
                .identity
                .as_ref()
                .and_then(|i| i.user.as_deref())
                .unwrap_or(""),
            tokens: ctx.usage_tokens,
            usage: if ctx.usage_estimated { "estimated" } else { "" },
            error: error.unwrap_or(""),
        });
    }
}

fn body_reject(e: BodyError) -> Reject {
    match e {
        BodyError::InvalidJson(_) => Reject::new(Reason::InvalidJson, e.to_string()),
        BodyError::TooLarge(_) => Reject::new(Reason::RequestTooLarge, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::is_decimal;

    #[test]
    fn content_length_matches_only_its_exact_decimal_form() {
        assert!(is_decimal(b"0", 0));
        assert!(is_decimal(b"225", 225));
        assert!(is_decimal(b"1000000", 1_000_000));
        for (v, n) in [
            (&b""[..], 0),
            (b"00", 0),
            (b"0225", 225),
            (b"1225", 225),
            (b"25", 225),
            (b"+225", 225),
            (b" 225", 225),
            (b"2a5", 225),
        ] {
            assert!(!is_decimal(v, n), "{:?} {n}", String::from_utf8_lossy(v));
        }
    }
}
