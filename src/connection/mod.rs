//! The client connection, before any request on it reaches a route: the
//! cap on open connections (`server.max_connections`) and the guards on
//! each request header's size and arrival time
//! (`server.max_request_header_size`, `server.request_header_timeout`), so
//! that a flood of clients, slow or not, cannot exhaust file descriptors or
//! memory.
//!
//! - [`header`]: the pure scanner that finds a header's end and size;
//! - [`stream`]: the connection wrapper that applies it to every read;
//! - here: [`GuardedApp`], which Pingora runs for every accepted connection
//!   in place of the proxy itself: it counts the connection, refuses it
//!   with a `503 connection_limit` when the cap is reached, and otherwise
//!   wraps it and hands it to the proxy, request after request.
//!
//! Every answer written here is floodwall's usual JSON error with its
//! `x-floodwall-reason` (see docs/errors.md), and `Connection: close`.

pub mod header;
pub mod stream;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::{HttpProxy, Session};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

use crate::proxy::headers::new_request_id;
use crate::proxy::reject::{error_body, Reason};
use crate::proxy::FloodwallProxy;
use crate::state::Shared;
use crate::telemetry::connections::ConnectionMetrics;
use header::{HeaderScan, Scan};
use stream::{GuardedStream, HeaderLimits};

/// Files kept for floodwall's own use (listeners, the admin listener, Redis,
/// logs, the reload watcher) when the connection cap is derived from the
/// open-files limit.
const RESERVED_FILES: u64 = 64;
/// The derived cap never goes above this, whatever the open-files limit.
const DERIVED_CAP: u64 = 1_000_000;
/// Connections being refused (read, answered, closed) at once, beyond the
/// cap; more than this are closed without an answer.
const MAX_REFUSING: usize = 1024;
/// Each step of refusing a connection (reading its header, writing the
/// answer, draining what it sent) is bounded by this.
const REFUSE_STEP: Duration = Duration::from_secs(1);
/// Pingora's keep-alive timeout between requests on a connection.
const KEEPALIVE_SECS: u64 = 60;
/// At shutdown, how long first requests still arriving are waited for.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// The connection count and what the guards refused, shared by every
/// listener of the process.
pub struct Connections {
    open: AtomicUsize,
    /// Open connections whose first request has not reached the proxy yet
    /// (see [`GuardedApp::cleanup`]).
    pub(crate) first_pending: AtomicUsize,
    refusing: AtomicUsize,
    /// The cap when the policy sets none: derived from the open-files limit
    /// at start-up.
    default_max: AtomicUsize,
    metrics: ConnectionMetrics,
    /// `floodwall_local_responses_total`, for the answers given here.
    local: Option<prometheus::IntCounterVec>,
}

/// A connection's place under the cap; given back when dropped.
pub struct Slot {
    connections: Arc<Connections>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.connections.open.fetch_sub(1, Ordering::Relaxed);
        self.connections.metrics.active.dec();
    }
}

impl Connections {
    pub fn new(metrics: ConnectionMetrics, local: Option<prometheus::IntCounterVec>) -> Self {
        Connections {
            open: AtomicUsize::new(0),
            first_pending: AtomicUsize::new(0),
            refusing: AtomicUsize::new(0),
            default_max: AtomicUsize::new(derived_cap(None)),
            metrics,
            local,
        }
    }

    pub fn metrics(&self) -> &ConnectionMetrics {
        &self.metrics
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The cap in force for `configured` (`server.max_connections`).
    pub fn limit(&self, configured: Option<usize>) -> usize {
        configured.unwrap_or_else(|| self.default_max.load(Ordering::Relaxed))
    }

    /// Raise the soft open-files limit to the hard one and derive the
    /// default cap from it (two files per proxied connection). Called once
    /// at start-up; returns the derived cap.
    pub fn init_from_rlimit(&self) -> usize {
        let files = raise_nofile_limit();
        let cap = derived_cap(files);
        self.default_max.store(cap, Ordering::Relaxed);
        cap
    }

    /// Take a place under `limit`, or `None` when every place is taken.
    fn try_acquire(self: &Arc<Self>, limit: usize) -> Option<Slot> {
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        if before >= limit {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        self.metrics.active.inc();
        Some(Slot {
            connections: self.clone(),
        })
    }

    /// A guard closed a connection and answered it.
    fn refused(&self, reason: Reason) {
        self.refused_silently(reason);
        self.answered(reason);
    }

    /// A guard closed a connection without a word (nothing was sent on it).
    fn refused_silently(&self, reason: Reason) {
        self.metrics
            .refused
            .with_label_values(&[reason.code()])
            .inc();
    }

    /// floodwall answered in Pingora's place (a malformed header).
    fn answered(&self, reason: Reason) {
        if let Some(local) = &self.local {
            local.with_label_values(&[reason.code()]).inc();
        }
    }
}

/// `limit` open files allow this many connections, each holding two (the
/// client's and the upstream's).
fn derived_cap(files: Option<u64>) -> usize {
    let files = files.unwrap_or(1024);
    let cap = files.saturating_sub(RESERVED_FILES) / 2;
    cap.clamp(1, DERIVED_CAP) as usize
}

/// Raise RLIMIT_NOFILE's soft limit to its hard limit, as a server that
/// holds thousands of sockets should; returns the soft limit in force.
fn raise_nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                info!(
                    from = lim.rlim_cur,
                    to = lim.rlim_max,
                    "raised the open-files limit"
                );
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    Some(if lim.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        lim.rlim_cur
    })
}

/// floodwall's JSON error as a whole HTTP/1.1 response that closes the
/// connection: written on a connection no request handler owns.
pub fn answer(reason: Reason, message: &str) -> Bytes {
    let body = error_body(message, reason.error_type(), reason.code());
    let status = reason.status();
    let phrase = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut out = BytesMut::with_capacity(320 + body.len());
    let mut line = |s: &str| {
        out.put_slice(s.as_bytes());
        out.put_slice(b"\r\n");
    };
    line(&format!("HTTP/1.1 {status} {phrase}"));
    line("content-type: application/json");
    line(&format!("content-length: {}", body.len()));
    line(&format!("x-floodwall-reason: {}", reason.code()));
    line(&format!("x-request-id: {}", new_request_id()));
    if status == 503 || status == 429 {
        line("retry-after: 1");
    }
    line("cache-control: no-store");
    line("connection: close");
    line("");
    out.put_slice(&body);
    out.freeze()
}

/// The proxy has a request from this connection (`request_filter`): from
/// now on everything passes through untouched.
pub fn claim(session: &Session) {
    if let Some(stream) = session.stream() {
        if let Some(guarded) = (**stream).as_any().downcast_ref::<GuardedStream>() {
            guarded.claim();
        }
    }
}

/// Pingora's HTTP application for the proxy listeners: the connection
/// guards in front of the proxy.
pub struct GuardedApp {
    proxy: Arc<HttpProxy<FloodwallProxy>>,
    shared: Arc<Shared>,
}

impl GuardedApp {
    pub fn new(proxy: HttpProxy<FloodwallProxy>, shared: Arc<Shared>) -> Self {
        GuardedApp {
            proxy: Arc::new(proxy),
            shared,
        }
    }

    /// Answer a connection over the cap with a 503: read its request
    /// header (bounded), answer, then drain what it sent so that closing
    /// does not reset the connection before the client reads the answer.
    async fn refuse(&self, mut stream: Stream, limit: usize, max_header: usize) {
        let connections = &self.shared.connections;
        let refusing = connections.refusing.fetch_add(1, Ordering::Relaxed);
        let _undo = Undo(&connections.refusing);
        if refusing >= MAX_REFUSING {
            connections.refused_silently(Reason::ConnectionLimit);
            return;
        }
        connections.refused(Reason::ConnectionLimit);
        debug!(limit, "connection refused: server.max_connections reached");
        let mut buf = [0u8; 4096];
        let mut scan = HeaderScan::default();
        let read_header = async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => match scan.feed(&buf[..n], max_header) {
                        Scan::More => continue,
                        _ => return true,
                    },
                }
            }
        };
        if !matches!(
            tokio::time::timeout(REFUSE_STEP, read_header).await,
            Ok(true)
        ) {
            return;
        }
        let message = format!(
            "floodwall is at its connection limit ({limit} connections, server.max_connections)"
        );
        let reply = answer(Reason::ConnectionLimit, &message);
        if !matches!(
            tokio::time::timeout(REFUSE_STEP, stream.write_all(&reply)).await,
            Ok(Ok(()))
        ) {
            return;
        }
        let _ = tokio::time::timeout(REFUSE_STEP, stream.flush()).await;
        let drain = async {
            let mut left = 1024 * 1024usize;
            while left > 0 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(REFUSE_STEP, drain).await;
    }
}

struct Undo<'a>(&'a AtomicUsize);

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl ServerApp for GuardedApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let (limit, limits) = {
            let active = self.shared.config.load();
            let server = &active.snapshot.server;
            (
                self.shared.connections.limit(server.max_connections),
                HeaderLimits {
                    max_size: server.max_request_header_size,
                    timeout: server.request_header_timeout,
                },
            )
        };
        // Kept current across reloads; a store per connection.
        self.shared.connections.metrics.limit.set(limit as i64);
        let Some(slot) = self.shared.connections.try_acquire(limit) else {
            self.refuse(stream, limit, limits.max_size).await;
            return None;
        };
        let guarded = GuardedStream::new(stream, limits, self.shared.connections.clone(), slot);
        // What Pingora's HTTP/1 application does for a plain connection
        // (floodwall's listeners are plain TCP, HTTP/1.x), with one step
        // between requests: the connection's guard starts a new header.
        let mut session = ServerSession::new_http1(Box::new(guarded));
        session.set_keepalive(if *shutdown.borrow() {
            None
        } else {
            Some(KEEPALIVE_SECS)
        });
        let request_limit = self
            .proxy
            .server_options()
            .and_then(|o| o.keepalive_request_limit);
        session.set_keepalive_reuses_remaining(request_limit);
        let mut result = self.proxy.process_new_http(session, shutdown).await;
        while let Some((stream, settings)) = result.map(|r| r.consume()) {
            match (*stream).as_any().downcast_ref::<GuardedStream>() {
                Some(g) => g.next_request(),
                None => warn!("a reused connection lost its guard"),
            }
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            result = self.proxy.process_new_http(session, shutdown).await;
        }
        None
    }

    /// At shutdown, after the listeners stopped accepting. Pingora's own
    /// clean-up drops every connection still waiting for a request header,
    /// so a client whose connection was accepted just before (a binary
    /// upgrade hands the listeners over under load) would lose its first
    /// request. Those first requests are given up to
    /// [`FIRST_REQUEST_GRACE`] to arrive first; a connection waiting for a
    /// later request on a kept-alive connection is dropped as before.
    async fn cleanup(&self) {
        let deadline = tokio::time::Instant::now() + FIRST_REQUEST_GRACE;
        while self
            .shared
            .connections
            .first_pending
            .load(Ordering::Relaxed)
            > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.proxy.http_cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_leaves_two_files_per_connection_and_a_reserve() {
        assert_eq!(derived_cap(Some(20_000)), 9_968);
        assert_eq!(derived_cap(Some(1024)), 480);
        assert_eq!(derived_cap(Some(10)), 1);
        assert_eq!(derived_cap(Some(u64::MAX)), 1_000_000);
        assert_eq!(derived_cap(None), 480);
    }

    #[test]
    fn an_answer_is_a_whole_closing_response_with_the_json_error() {
        let a = answer(Reason::HeaderTooLarge, "too big");
        let text = std::str::from_utf8(&a).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nx-floodwall-reason: header_too_large"));
        assert!(head.contains("\r\nconnection: close"));
        assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "header_too_large");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["message"], "too big");
        assert!(!head.contains("retry-after"));
        let a = answer(Reason::ConnectionLimit, "full");
        let text = std::str::from_utf8(&a).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(text.contains("\r\nretry-after: 1\r\n"));
    }
}
