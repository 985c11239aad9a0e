//! The upstream loop: one attempt at a backend over Pingora's pooled
//! connectors, streaming the answer back as it arrives.
//!
//! floodwall drives the upstream exchange itself (from `request_filter`)
//! rather than through Pingora's built-in proxy loop, because Pingora 0.9
//! retries only on connect errors (pingora#873) and commits the response as
//! soon as the upstream's header arrives. Owning the loop lets later policies
//! retry on status, hold headers until a first token, and end a broken SSE
//! stream with an error event. It still uses Pingora's `Connector`, so
//! connections are pooled and reused exactly as Pingora's proxy would.

use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::ALPN;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;

use super::reject::{Reason, Reject};
use super::BoxFut;
use crate::config::{Backend, Scheme};
use crate::policy::breaker::{
    backend_key, endpoint_key, Admission, Breaker, BreakerRegistry, Permit,
};
use crate::telemetry::metrics::UpstreamOutcome;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// Per-backend state derived from the snapshot when it is loaded.
pub struct BackendRuntime {
    /// The backend's name, shared: every request's `Ctx` names the backend
    /// it went to (for the access log and `x-floodwall-backend`).
    pub name: Arc<str>,
    /// The name as the `x-floodwall-backend` header's value.
    pub name_header: HeaderValue,
    cursor: AtomicUsize,
    endpoints: Vec<EndpointRuntime>,
    /// The backend-wide breaker (`circuit_breaker`), if configured.
    pub breaker: Option<Arc<Breaker>>,
    /// Its attempt and latency metric children, resolved on first use.
    pub metrics: crate::telemetry::metrics::BackendMetrics,
}

struct EndpointRuntime {
    /// This endpoint's own breaker, if the backend has `circuit_breaker`.
    breaker: Option<Arc<Breaker>>,
    /// `None` when the endpoint could not be prepared (the string says why).
    peer: Result<HttpPeer, String>,
    /// Host header to send (override, or the endpoint's authority); `None`
    /// if it cannot be a header value, and then the client's is kept.
    host: Option<HeaderValue>,
    pub url: String,
}

impl BackendRuntime {
    pub fn build(b: &Backend) -> Result<BackendRuntime, String> {
        let ca = match &b.tls.ca_file {
            Some(path) => Some(load_ca(path)?),
            None => None,
        };
        let endpoints = b
            .endpoints
            .iter()
            .map(|ep| {
                let tls = ep.scheme == Scheme::Https;
                let default_port = if tls { 443 } else { 80 };
                let authority = if ep.port == default_port {
                    bracket(&ep.host)
                } else {
                    format!("{}:{}", bracket(&ep.host), ep.port)
                };
                let host = b.host.clone().unwrap_or(authority);
                let sni = b.host.clone().unwrap_or_else(|| ep.host.clone());
                let peer = resolve(&ep.address).map(|addr| {
                    let mut p = HttpPeer::new(addr, tls, sni);
                    p.options.connection_timeout = Some(b.timeouts.connect);
                    p.options.total_connection_timeout = Some(b.timeouts.connect);
                    p.options.idle_timeout = Some(POOL_IDLE);
                    if tls {
                        p.options.alpn = ALPN::H2H1;
                        p.options.verify_cert = b.tls.verify;
                        p.options.verify_hostname = b.tls.verify;
                        p.options.ca = ca.clone();
                    }
                    p
                });
                EndpointRuntime {
                    breaker: None,
                    peer,
                    host: HeaderValue::from_str(&host).ok(),
                    url: ep.url.clone(),
                }
            })
            .collect();
        Ok(BackendRuntime {
            name: Arc::from(b.name.as_str()),
            name_header: name_header(&b.name),
            cursor: AtomicUsize::new(0),
            endpoints,
            breaker: None,
            metrics: Default::default(),
        })
    }

    /// Attach the breakers of this backend and of each endpoint, taken from
    /// the registry so that their state survives a reload of an unchanged
    /// `circuit_breaker` section.
    pub fn with_breakers(mut self, b: &Backend, registry: &BreakerRegistry) -> Self {
        if let Some(cfg) = &b.circuit_breaker {
            self.breaker = Some(registry.get(&backend_key(&b.name), cfg));
            for ep in &mut self.endpoints {
                ep.breaker = Some(registry.get(&endpoint_key(&b.name, &ep.url), cfg));
            }
        }
        self
    }

    /// The breaker keys this runtime uses (for the registry's `retain`).
    pub fn breaker_keys(&self) -> impl Iterator<Item = &str> {
        self.breaker
            .iter()
            .chain(self.endpoints.iter().filter_map(|e| e.breaker.as_ref()))
            .map(|b| b.key())
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// The next endpoint round-robin, avoiding `avoid` (the endpoint of the
    /// previous attempt) when there is another, and skipping endpoints whose
    /// breaker is open. Returns the endpoint and its breaker permit, or the
    /// shortest time until an endpoint's breaker half-opens.
    pub fn choose(
        &self,
        avoid: Option<usize>,
        now: Instant,
    ) -> Result<(usize, Option<Permit>), Duration> {
        let n = self.endpoints.len().max(1);
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let mut soonest = Duration::MAX;
        let mut fallback_same: Option<usize> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if Some(i) == avoid && n > 1 {
                fallback_same = Some(i);
                continue;
            }
            match self.acquire(i, now) {
                Ok(p) => return Ok((i, p)),
                Err(wait) => soonest = soonest.min(wait),
            }
        }
        if let Some(i) = fallback_same {
            match self.acquire(i, now) {
                Ok(p) => return Ok((i, p)),
                Err(wait) => soonest = soonest.min(wait),
            }
        }
        Err(soonest)
    }

    fn acquire(&self, i: usize, now: Instant) -> Result<Option<Permit>, Duration> {
        match self.endpoints.get(i).and_then(|e| e.breaker.as_ref()) {
            None => Ok(None),
            Some(b) => match b.try_acquire(now) {
                Admission::Allowed(p) => Ok(Some(p)),
                Admission::Rejected { retry_after } => Err(retry_after),
            },
        }
    }

    /// The breaker of endpoint `i`.
    pub fn endpoint_breaker(&self, i: usize) -> Option<&Arc<Breaker>> {
        self.endpoints.get(i).and_then(|e| e.breaker.as_ref())
    }

    /// A backend whose TLS material failed to load: every attempt fails with `why`.
    pub fn broken(b: &Backend, why: String) -> BackendRuntime {
        BackendRuntime {
            name: Arc::from(b.name.as_str()),
            name_header: name_header(&b.name),
            cursor: AtomicUsize::new(0),
            endpoints: b
                .endpoints
                .iter()
                .map(|ep| EndpointRuntime {
                    breaker: None,
                    peer: Err(why.clone()),
                    host: HeaderValue::from_str(&ep.host).ok(),
                    url: ep.url.clone(),
                })
                .collect(),
            breaker: None,
            metrics: Default::default(),
        }
    }

    /// The next endpoint, round-robin.
    pub fn pick(&self) -> usize {
        let n = self.endpoints.len().max(1);
        self.cursor.fetch_add(1, Ordering::Relaxed) % n
    }

    /// The prepared peer of endpoint `i` (for Pingora's own proxy path).
    pub fn peer(&self, i: usize) -> Option<&HttpPeer> {
        self.endpoints.get(i).and_then(|e| e.peer.as_ref().ok())
    }

    /// The Host header for endpoint `i`.
    pub fn host(&self, i: usize) -> Option<&HeaderValue> {
        self.endpoints.get(i).and_then(|e| e.host.as_ref())
    }

    pub fn endpoint_url(&self, i: usize) -> &str {
        self.endpoints.get(i).map(|e| e.url.as_str()).unwrap_or("")
    }
}

/// Backend names are checked to be identifiers when the policy compiles;
/// anything else would be shown as `invalid`.
fn name_header(name: &str) -> HeaderValue {
    HeaderValue::from_str(name).unwrap_or(HeaderValue::from_static("invalid"))
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn resolve(address: &str) -> Result<std::net::SocketAddr, String> {
    address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {address}: no addresses"))
}

fn load_ca(path: &std::path::Path) -> Result<Arc<pingora::protocols::tls::CaType>, String> {
    use pingora::utils::tls::WrappedX509;
    let pem = std::fs::read(path).map_err(|e| format!("tls.ca_file {}: {e}", path.display()))?;
    let mut certs = Vec::new();
    for item in rustls_pemfile::certs(&mut pem.as_slice()) {
        let der = item.map_err(|e| format!("tls.ca_file {}: {e}", path.display()))?;
        let raw = der.as_ref().to_vec();
        // Pingora's parser panics on bad DER: contain it and report instead.
        let parsed =
            std::panic::catch_unwind(|| WrappedX509::new(raw, pingora::utils::tls::parse_x509));
        match parsed {
            Ok(c) => certs.push(c),
            Err(_) => {
                return Err(format!(
                    "tls.ca_file {}: a certificate is not valid DER",
                    path.display()
                ))
            }
        }
    }
    if certs.is_empty() {
        return Err(format!(
            "tls.ca_file {}: no PEM certificates found",
            path.display()
        ));
    }
    Ok(Arc::from(certs.into_boxed_slice()))
}

/// Everything one attempt needs from the request.
pub struct AttemptRequest<'a> {
    /// Boxed, as Pingora takes it, with the endpoint's `Host` already set.
    pub header: Box<RequestHeader>,
    pub body: &'a Bytes,
    pub response_headers_timeout: Duration,
    pub connect_timeout: Option<Duration>,
}

/// What happened upstream, for logs and metrics.
#[derive(Debug, Default)]
pub struct AttemptReport {
    pub endpoint: usize,
    pub reused_connection: bool,
    pub upstream_status: Option<u16>,
    /// Time until the response header arrived.
    pub header_latency: Option<Duration>,
    pub outcome: crate::telemetry::metrics::UpstreamOutcome,
}

/// The upstream answered with a header; the body is still to be streamed.
pub struct Answer {
    /// Boxed: the answer is moved down through several async fns (attempt,
    /// commit, ...), and each keeps its arguments in its own state for the
    /// whole length of a stream (~470 bytes each time, inline).
    pub session: Box<HttpSession>,
    pub endpoint: usize,
}

/// Pingora's connectors: the general one (h2 by ALPN on TLS endpoints) and
/// an HTTP/1 one for plain-http endpoints. A plain-http attempt first looks
/// for a pooled connection, a small future; only a new connection builds
/// Pingora's connect future (~9 KB, boxed so that the per-request future
/// does not carry it).
pub struct Connectors {
    any: Connector,
    h1: pingora::connectors::http::v1::Connector,
}

impl Default for Connectors {
    fn default() -> Self {
        Connectors {
            any: Connector::new(None),
            h1: pingora::connectors::http::v1::Connector::new(None),
        }
    }
}

impl Connectors {
    async fn get(&self, peer: &HttpPeer) -> pingora::Result<(HttpSession, bool)> {
        if peer.is_tls() {
            return Box::pin(self.any.get_http_session(peer)).await;
        }
        if let Some(s) = self.h1.reused_http_session(peer).await {
            return Ok((HttpSession::H1(s), true));
        }
        let (s, reused) = Box::pin(self.h1.get_http_session(peer)).await?;
        Ok((HttpSession::H1(s), reused))
    }

    async fn release(&self, up: HttpSession, peer: &HttpPeer) {
        match up {
            HttpSession::H1(s) if !peer.is_tls() => {
                Box::pin(self.h1.release_http_session(s, peer, Some(POOL_IDLE))).await
            }
            up => Box::pin(self.any.release_http_session(up, peer, Some(POOL_IDLE))).await,
        }
    }
}

/// Connect, send the request and wait for the response header.
pub async fn start_attempt(
    connector: &Connectors,
    backend: &BackendRuntime,
    endpoint: usize,
    req: AttemptRequest<'_>,
    report: &mut AttemptReport,
) -> Result<Answer, Reject> {
    report.endpoint = endpoint;
    let ep = backend
        .endpoints
        .get(endpoint)
        .ok_or_else(|| Reject::new(Reason::Internal, "backend has no endpoints"))?;
    let base_peer = ep.peer.as_ref().map_err(|why| {
        report.outcome = UpstreamOutcome::ConnectError;
        Reject::new(
            Reason::UpstreamConnectError,
            format!("upstream {} unavailable: {why}", ep.url),
        )
    })?;
    let overridden;
    let peer = match req.connect_timeout {
        Some(t) => {
            let mut p = base_peer.clone();
            p.options.connection_timeout = Some(t);
            p.options.total_connection_timeout = Some(t);
            overridden = p;
            &overridden
        }
        None => base_peer,
    };
    let started = Instant::now();
    let (mut up, reused) = connector.get(peer).await.map_err(|e| {
        let timed_out = matches!(e.etype(), ErrorType::ConnectTimedout);
        report.outcome = if timed_out {
            UpstreamOutcome::Timeout
        } else {
            UpstreamOutcome::ConnectError
        };
        let reason = if timed_out {
            Reason::UpstreamTimeout
        } else {
            Reason::UpstreamConnectError
        };
        Reject::new(
            reason,
            format!(
                "could not connect to upstream {}: {}",
                ep.url,
                e.etype().as_str()
            ),
        )
    })?;
    report.reused_connection = reused;

    let mut header = req.header;
    if up.as_http2().is_some() {
        header.set_version(http::Version::HTTP_2);
    }
    let deadline = started + req.response_headers_timeout;
    let sent = async {
        up.write_request_header(header).await?;
        if !req.body.is_empty() {
            up.write_request_body(req.body.clone(), true).await?;
        }
        up.finish_request_body().await?;
        // Skip interim answers (100 Continue, 103 Early Hints): the client
        // gets the final one. 101 is final for an upgrade.
        loop {
            up.read_response_header().await?;
            let interim = up.response_header().is_some_and(|h| {
                h.status.is_informational() && h.status != http::StatusCode::SWITCHING_PROTOCOLS
            });
            if !interim {
                return pingora::Result::<()>::Ok(());
            }
        }
    };
    match tokio::time::timeout_at(deadline.into(), sent).await {
        Err(_) => {
            report.outcome = UpstreamOutcome::Timeout;
            return Err(Reject::new(
                Reason::UpstreamTimeout,
                format!(
                    "upstream {} sent no response header within {:?}",
                    ep.url, req.response_headers_timeout
                ),
            ));
        }
        Ok(Err(e)) => {
            report.outcome = UpstreamOutcome::Reset;
            return Err(Reject::new(
                Reason::UpstreamError,
                format!(
                    "upstream {} failed before the response header: {}",
                    ep.url,
                    e.etype().as_str()
                ),
            ));
        }
        Ok(Ok(())) => {}
    }
    report.header_latency = Some(started.elapsed());
    report.upstream_status = up.response_header().map(|h| h.status.as_u16());
    Ok(Answer {
        session: Box::new(up),
        endpoint,
    })
}

/// How streaming the body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The upstream finished the body and the client received all of it.
    Complete,
    /// The upstream broke off mid-body; the client was told (SSE error event)
    /// and the response must end abnormally.
    UpstreamBroke,
    /// The upstream sent nothing for `timeouts.idle`; handled like
    /// `UpstreamBroke`, and counted as a stream timeout.
    IdleTimeout,
    /// The client went away.
    ClientGone,
    /// `streams.max_duration` was reached: the client got a `stream_timeout`
    /// error event and the response ends abnormally.
    MaxDuration,
    /// The grace period of a shutdown ran out: a `shutting_down` event was sent.
    ShuttingDown,
}

impl StreamEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamEnd::Complete => "complete",
            StreamEnd::UpstreamBroke => "upstream_broke",
            StreamEnd::IdleTimeout => "idle_timeout",
            StreamEnd::ClientGone => "client_gone",
            StreamEnd::MaxDuration => "max_duration",
            StreamEnd::ShuttingDown => "shutting_down",
        }
    }
}

/// Time limits on a body being streamed to the client.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamLimits {
    /// The longest gap between two chunks (`timeouts.idle`).
    pub idle: Option<Duration>,
    /// SSE only: the first token must have arrived by then
    /// (`timeouts.first_token` when the header was not held for it).
    pub first_token_due: Option<Instant>,
    /// The stream is ended here with a `stream_timeout` error event
    /// (`streams.max_duration`).
    pub cut_at: Option<Instant>,
}

/// Stream the upstream body to the client. `on_chunk` sees each chunk (for
/// byte counting now; usage parsing and caching later).
pub async fn stream_body(
    session: &mut Session,
    up: &mut HttpSession,
    is_sse: bool,
    limits: StreamLimits,
    shutdown: &crate::shutdown::Shutdown,
    mut on_chunk: impl FnMut(&Bytes),
) -> (StreamEnd, Option<String>) {
    let must_end = shutdown.streams_must_end();
    tokio::pin!(must_end);
    let idle = limits.idle;
    let mut first_token = limits
        .first_token_due
        .filter(|_| is_sse)
        // Boxed: a stream keeps this future for its whole length.
        .map(|due| (due, Box::new(super::sse::SseScanner::new())));
    loop {
        // Wait at most `idle`, and no later than the first token is due.
        let now = Instant::now();
        let due = first_token
            .as_ref()
            .map(|(d, _)| d.saturating_duration_since(now));
        let cut = limits.cut_at.map(|c| c.saturating_duration_since(now));
        let first_token_binds =
            due.is_some_and(|d| idle.is_none_or(|i| d <= i) && cut.is_none_or(|c| d <= c));
        let cut_binds = !first_token_binds && cut.is_some_and(|c| idle.is_none_or(|i| c <= i));
        let limit = if first_token_binds {
            due
        } else if cut_binds {
            cut
        } else {
            idle
        };
        let read = async {
            match limit {
                Some(t) => match tokio::time::timeout(t, up.read_response_body()).await {
                    Ok(r) => Ok(r),
                    Err(_) => Err(t),
                },
                None => Ok(up.read_response_body().await),
            }
        };
        let next = tokio::select! {
            biased;
            chunk = read => match chunk {
                Ok(c) => c,
                Err(_) if first_token_binds => {
                    let why = "upstream sent no first token in time (timeouts.first_token)";
                    return broke(session, is_sse, why).await;
                }
                Err(_) if cut_binds => {
                    let why = "the stream reached the route's streams.max_duration";
                    end_with_event(session, is_sse, why, "stream_timeout").await;
                    return (StreamEnd::MaxDuration, Some(why.to_string()));
                }
                Err(t) => {
                    let why = format!("upstream sent nothing for {}ms (timeouts.idle)", t.as_millis());
                    end_with_event(session, is_sse, &why, "upstream_stream_error").await;
                    return (StreamEnd::IdleTimeout, Some(why));
                }
            },
            // The request body was read whole, so any downstream event here
            // means the client closed (or broke protocol): stop at once.
            _ = session.downstream_session.read_body_or_idle(true) => {
                return (StreamEnd::ClientGone, Some("client closed the connection".into()));
            }
            _ = &mut must_end => {
                let why = "floodwall is shutting down; retry on another instance";
                end_with_event(session, is_sse, why, "shutting_down").await;
                return (StreamEnd::ShuttingDown, Some(why.to_string()));
            }
        };
        match next {
            Ok(Some(chunk)) => {
                if let Some((_, scanner)) = first_token.as_mut() {
                    scanner.feed(&chunk);
                    if scanner.first_token {
                        first_token = None;
                    }
                }
                on_chunk(&chunk);
                if let Err(e) = session.write_response_body(Some(chunk), false).await {
                    return (
                        StreamEnd::ClientGone,
                        Some(format!("writing to client: {}", e.etype().as_str())),
                    );
                }
            }
            Ok(None) => {
                if !up.response_done() {
                    return broke(
                        session,
                        is_sse,
                        "upstream closed the connection mid-response",
                    )
                    .await;
                }
                return match session.write_response_body(None, true).await {
                    Ok(()) => (StreamEnd::Complete, None),
                    Err(e) => (
                        StreamEnd::ClientGone,
                        Some(format!("finishing response: {}", e.etype().as_str())),
                    ),
                };
            }
            Err(e) => {
                let why = format!("upstream failed mid-response: {}", e.etype().as_str());
                return broke(session, is_sse, &why).await;
            }
        }
    }
}

/// The upstream broke after the client got the header. For SSE, send a final
/// event whose data is an OpenAI error object (SDKs raise it), then the caller
/// ends the response without its terminator so the cut is visible.
async fn broke(session: &mut Session, is_sse: bool, why: &str) -> (StreamEnd, Option<String>) {
    end_with_event(session, is_sse, why, "upstream_stream_error").await;
    (StreamEnd::UpstreamBroke, Some(why.to_string()))
}

/// Send a final SSE event carrying an OpenAI error object with `code`.
///
/// Boxed: it ends a stream once, and inline its state (a body write, ~900
/// bytes) would be reserved in every open stream's future.
fn end_with_event<'a>(
    session: &'a mut Session,
    is_sse: bool,
    why: &'a str,
    code: &'a str,
) -> BoxFut<'a, ()> {
    Box::pin(async move {
        if is_sse {
            let body = super::reject::error_body(why, "upstream_error", code);
            let mut event = Vec::with_capacity(body.len() + 16);
            event.extend_from_slice(b"data: ");
            event.extend_from_slice(&body);
            event.extend_from_slice(b"\n\n");
            let _ = session
                .write_response_body(Some(Bytes::from(event)), false)
                .await;
        }
    })
}

/// Give a finished upstream session back to the pool, or close it.
pub async fn release(
    connector: &Connectors,
    backend: &BackendRuntime,
    endpoint: usize,
    mut up: Box<HttpSession>,
    reusable: bool,
) {
    let Some(Ok(peer)) = backend.endpoints.get(endpoint).map(|e| e.peer.as_ref()) else {
        return;
    };
    if reusable {
        connector.release(*up, peer).await;
    } else {
        up.shutdown().await;
    }
}

/// Copy of the upstream response header to send downstream (boxed, as
/// Pingora takes it, and as it is moved through the response path),
/// without the names' original case (see `FloodwallProxy::upstream_request`).
pub fn downstream_header(up: &HttpSession) -> Option<Box<ResponseHeader>> {
    up.response_header()
        .map(|h| Box::new(ResponseHeader::from(h.as_owned_parts())))
}
