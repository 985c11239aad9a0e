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
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::ALPN;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;

use super::reject::{Reason, Reject};
use crate::config::{Backend, Scheme};

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// Per-backend state derived from the snapshot when it is loaded.
pub struct BackendRuntime {
    cursor: AtomicUsize,
    endpoints: Vec<EndpointRuntime>,
}

struct EndpointRuntime {
    /// `None` when the endpoint could not be prepared (the string says why).
    peer: Result<HttpPeer, String>,
    /// Host header to send (override, or the endpoint's authority).
    host: String,
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
                    peer,
                    host,
                    url: ep.url.clone(),
                }
            })
            .collect();
        Ok(BackendRuntime {
            cursor: AtomicUsize::new(0),
            endpoints,
        })
    }

    /// A backend whose TLS material failed to load: every attempt fails with `why`.
    pub fn broken(b: &Backend, why: String) -> BackendRuntime {
        BackendRuntime {
            cursor: AtomicUsize::new(0),
            endpoints: b
                .endpoints
                .iter()
                .map(|ep| EndpointRuntime {
                    peer: Err(why.clone()),
                    host: ep.host.clone(),
                    url: ep.url.clone(),
                })
                .collect(),
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
    pub fn host(&self, i: usize) -> Option<&str> {
        self.endpoints.get(i).map(|e| e.host.as_str())
    }

    pub fn endpoint_url(&self, i: usize) -> &str {
        self.endpoints.get(i).map(|e| e.url.as_str()).unwrap_or("")
    }
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
        let parsed = std::panic::catch_unwind(|| WrappedX509::new(raw, pingora::utils::tls::parse_x509));
        match parsed {
            Ok(c) => certs.push(c),
            Err(_) => return Err(format!("tls.ca_file {}: a certificate is not valid DER", path.display())),
        }
    }
    if certs.is_empty() {
        return Err(format!("tls.ca_file {}: no PEM certificates found", path.display()));
    }
    Ok(Arc::from(certs.into_boxed_slice()))
}

/// Everything one attempt needs from the request.
pub struct AttemptRequest<'a> {
    pub header: RequestHeader,
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
    pub outcome: &'static str,
}

/// The upstream answered with a header; the body is still to be streamed.
pub struct Answer {
    pub session: HttpSession,
    pub endpoint: usize,
}

/// Connect, send the request and wait for the response header.
pub async fn start_attempt(
    connector: &Connector,
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
        report.outcome = "connect_error";
        Reject::new(Reason::UpstreamConnectError, format!("upstream {} unavailable: {why}", ep.url))
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
    let (mut up, reused) = connector.get_http_session(peer).await.map_err(|e| {
        let timed_out = matches!(e.etype(), ErrorType::ConnectTimedout);
        report.outcome = if timed_out { "timeout" } else { "connect_error" };
        let reason = if timed_out { Reason::UpstreamTimeout } else { Reason::UpstreamConnectError };
        Reject::new(reason, format!("could not connect to upstream {}: {}", ep.url, e.etype().as_str()))
    })?;
    report.reused_connection = reused;

    let mut header = req.header;
    header.insert_header("host", ep.host.as_str()).ok();
    if up.as_http2().is_some() {
        header.set_version(http::Version::HTTP_2);
    }
    let deadline = started + req.response_headers_timeout;
    let sent = async {
        up.write_request_header(Box::new(header)).await?;
        if !req.body.is_empty() {
            up.write_request_body(req.body.clone(), true).await?;
        }
        up.finish_request_body().await?;
        // Skip interim answers (100 Continue, 103 Early Hints): the client
        // gets the final one. 101 is final for an upgrade.
        loop {
            up.read_response_header().await?;
            let interim = up
                .response_header()
                .is_some_and(|h| h.status.is_informational() && h.status != http::StatusCode::SWITCHING_PROTOCOLS);
            if !interim {
                return pingora::Result::<()>::Ok(());
            }
        }
    };
    match tokio::time::timeout_at(deadline.into(), sent).await {
        Err(_) => {
            report.outcome = "timeout";
            return Err(Reject::new(
                Reason::UpstreamTimeout,
                format!(
                    "upstream {} sent no response header within {:?}",
                    ep.url, req.response_headers_timeout
                ),
            ));
        }
        Ok(Err(e)) => {
            report.outcome = "reset";
            return Err(Reject::new(
                Reason::UpstreamError,
                format!("upstream {} failed before the response header: {}", ep.url, e.etype().as_str()),
            ));
        }
        Ok(Ok(())) => {}
    }
    report.header_latency = Some(started.elapsed());
    report.upstream_status = up.response_header().map(|h| h.status.as_u16());
    Ok(Answer {
        session: up,
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
    /// The client went away.
    ClientGone,
}

impl StreamEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamEnd::Complete => "complete",
            StreamEnd::UpstreamBroke => "upstream_broke",
            StreamEnd::ClientGone => "client_gone",
        }
    }
}

/// Stream the upstream body to the client. `on_chunk` sees each chunk (for
/// byte counting now; usage parsing and caching later).
pub async fn stream_body(
    session: &mut Session,
    up: &mut HttpSession,
    is_sse: bool,
    mut on_chunk: impl FnMut(&Bytes),
) -> (StreamEnd, Option<String>) {
    loop {
        let next = tokio::select! {
            biased;
            chunk = up.read_response_body() => chunk,
            // The request body was read whole, so any downstream event here
            // means the client closed (or broke protocol): stop at once.
            _ = session.downstream_session.read_body_or_idle(true) => {
                return (StreamEnd::ClientGone, Some("client closed the connection".into()));
            }
        };
        match next {
            Ok(Some(chunk)) => {
                on_chunk(&chunk);
                if let Err(e) = session.write_response_body(Some(chunk), false).await {
                    return (StreamEnd::ClientGone, Some(format!("writing to client: {}", e.etype().as_str())));
                }
            }
            Ok(None) => {
                if !up.response_done() {
                    return broke(session, is_sse, "upstream closed the connection mid-response").await;
                }
                return match session.write_response_body(None, true).await {
                    Ok(()) => (StreamEnd::Complete, None),
                    Err(e) => (StreamEnd::ClientGone, Some(format!("finishing response: {}", e.etype().as_str()))),
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
    if is_sse {
        let body = super::reject::error_body(why, "upstream_error", "upstream_stream_error");
        let mut event = Vec::with_capacity(body.len() + 16);
        event.extend_from_slice(b"data: ");
        event.extend_from_slice(&body);
        event.extend_from_slice(b"\n\n");
        let _ = session.write_response_body(Some(Bytes::from(event)), false).await;
    }
    (StreamEnd::UpstreamBroke, Some(why.to_string()))
}

/// Give a finished upstream session back to the pool, or close it.
pub async fn release(connector: &Connector, backend: &BackendRuntime, endpoint: usize, up: HttpSession, reusable: bool) {
    let Some(Ok(peer)) = backend.endpoints.get(endpoint).map(|e| e.peer.as_ref()) else {
        return;
    };
    if reusable {
        connector.release_http_session(up, peer, Some(POOL_IDLE)).await;
    } else {
        let mut up = up;
        up.shutdown().await;
    }
}

/// Copy of the upstream response header to send downstream.
pub fn downstream_header(up: &HttpSession) -> Option<ResponseHeader> {
    up.response_header().cloned()
}
