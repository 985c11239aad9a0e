//! The client connection as Pingora sees it, wrapped so that floodwall
//! bounds each request header's size and the time its client may take to
//! send it, and answers in its own words when a request is refused before
//! it reaches the proxy.
//!
//! Pingora reads request headers itself, up to 1 MiB, with a 60 s timeout
//! per read: a client sending one byte every 59 s holds its connection, and
//! its buffer, for as long as it likes. [`GuardedStream`] counts the bytes
//! of every read while a header is being received and fails the read once
//! the header is larger than `server.max_request_header_size` or older than
//! `server.request_header_timeout`. Pingora then shuts the connection down,
//! and the shutdown first writes floodwall's answer (`431
//! header_too_large`, `408 header_timeout`).
//!
//! Counting is enough: Pingora reads again only while the header it has is
//! incomplete, and the proxy claims the request before any body read. So
//! every read before the claim is all header, except the last, which may
//! carry the start of the body; only a read that takes the count past the
//! limit is scanned for the header's end ([`header::end_in`]), to tell a
//! header that ends in time from one that does not. A header that arrives
//! in one read costs an addition and a comparison: no scan, no clock.
//!
//! The phases of one request on the connection:
//!
//! - `IDLE`: between requests on a kept-alive connection. Reads pass
//!   through; Pingora's keep-alive timeout bounds the wait. The first bytes
//!   start a header.
//! - `HEADER`: a header is being received (or has been, and the proxy has
//!   not claimed it yet). Reads are counted; the deadline runs from the
//!   connection's accept (first request) or, on a kept-alive connection,
//!   from the first read that had to wait for more. Anything Pingora writes
//!   now is its own error response (a malformed header: 400; `CONNECT`:
//!   405), which is replaced by floodwall's JSON one.
//! - `CLAIMED`: the proxy's `request_filter` has the request ([`claim`]);
//!   everything passes through untouched until the request is over and the
//!   connection goes back to `IDLE` ([`GuardedStream::next_request`]).
//!
//! [`claim`]: super::claim

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::header;
use super::{answer, Connections, Slot};
use crate::proxy::reject::Reason;

const IDLE: u8 = 0;
const HEADER: u8 = 1;
const CLAIMED: u8 = 2;

/// How long floodwall tries to write its own answer before closing anyway.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// The header limits in force when the connection was accepted.
#[derive(Debug, Clone, Copy)]
pub struct HeaderLimits {
    pub max_size: usize,
    pub timeout: Duration,
}

/// A response floodwall writes itself, and how much of it is out.
#[derive(Debug)]
struct Answer {
    bytes: Bytes,
    written: usize,
}

pub struct GuardedStream {
    inner: Stream,
    /// One of `IDLE`, `HEADER`, `CLAIMED`. Atomic only because
    /// the proxy claims the request through a shared reference; every
    /// access is on the connection's own task.
    phase: AtomicU8,
    limits: HeaderLimits,
    /// Bytes read for the header being received.
    seen: usize,
    /// The last bytes read, for [`header::end_in`].
    tail: [u8; 3],
    tail_len: u8,
    /// When the header being received must be complete. `None` until it is
    /// needed (a header that arrives in one read never reads the clock).
    deadline: Option<Instant>,
    /// Wakes a read that waits for header bytes at the deadline. Allocated
    /// only for a header that does not arrive at once, dropped when it ends.
    timer: Option<Pin<Box<Sleep>>>,
    answer: Option<Answer>,
    connections: Arc<Connections>,
    /// Counted in `Connections::first_pending` until the proxy claims the
    /// connection's first request (or the connection ends).
    first_pending: AtomicBool,
    /// Holds the connection's place under `server.max_connections`.
    _slot: Slot,
}

impl std::fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedStream")
            .field("inner", &self.inner)
            .field("phase", &self.phase.load(Ordering::Relaxed))
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        self.first_request_arrived();
    }
}

impl GuardedStream {
    /// Wrap a just-accepted connection: its first header is due within the
    /// timeout from now.
    pub fn new(
        inner: Stream,
        limits: HeaderLimits,
        connections: Arc<Connections>,
        slot: Slot,
    ) -> Self {
        connections.first_pending.fetch_add(1, Ordering::Relaxed);
        GuardedStream {
            inner,
            phase: AtomicU8::new(HEADER),
            limits,
            seen: 0,
            tail: [0; 3],
            tail_len: 0,
            deadline: Some(Instant::now() + limits.timeout),
            timer: None,
            answer: None,
            connections,
            first_pending: AtomicBool::new(true),
            _slot: slot,
        }
    }

    /// The proxy has the request: stop watching, pass everything through.
    pub fn claim(&self) {
        self.phase.store(CLAIMED, Ordering::Relaxed);
        self.first_request_arrived();
    }

    fn first_request_arrived(&self) {
        if self.first_pending.swap(false, Ordering::Relaxed) {
            self.connections
                .first_pending
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether the proxy has claimed the request being received.
    fn claimed(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == CLAIMED
    }

    /// The previous request is over (its body drained, its response
    /// written): the next bytes are a new header.
    pub fn next_request(&self) {
        self.phase.store(IDLE, Ordering::Relaxed);
    }

    /// Give up on the header: remember the answer for the shutdown that
    /// follows, and fail the read.
    fn refuse(&mut self, reason: Reason, message: String) -> Poll<io::Result<()>> {
        self.connections.refused(reason);
        self.answer = Some(Answer {
            bytes: answer(reason, &message),
            written: 0,
        });
        self.timer = None;
        let kind = match reason {
            Reason::HeaderTimeout => io::ErrorKind::TimedOut,
            _ => io::ErrorKind::InvalidData,
        };
        Poll::Ready(Err(io::Error::new(kind, message)))
    }

    fn timed_out(&mut self) -> Poll<io::Result<()>> {
        let message = format!(
            "the request header was not received within {}ms (server.request_header_timeout)",
            self.limits.timeout.as_millis()
        );
        self.refuse(Reason::HeaderTimeout, message)
    }

    /// Whether the header's deadline has passed; arms the timer so that a
    /// read waiting for more bytes is woken at the deadline.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = self.deadline else {
            return false;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready()
    }

    /// Write out floodwall's own answer, if it has one pending.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(a) = self.answer.as_mut() {
            if a.written == a.bytes.len() {
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &a.bytes[a.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            a.written += n;
        }
        Poll::Ready(Ok(()))
    }

    /// Pingora is writing a response before the proxy saw the request: its
    /// own plain error page. Answer with floodwall's instead, and let
    /// Pingora's bytes go nowhere.
    fn replace_pingora_answer(&mut self, first: &[u8]) {
        if self.answer.is_some() {
            return;
        }
        // "HTTP/1.1 400 Bad Request\r\n..."
        let status = first.get(9..12).and_then(|s| std::str::from_utf8(s).ok());
        let (reason, message) = match status {
            Some("405") => (
                Reason::MethodNotAllowed,
                "floodwall does not proxy CONNECT requests".to_string(),
            ),
            _ => (
                Reason::InvalidRequest,
                "the request line or a header could not be parsed as HTTP/1.1".to_string(),
            ),
        };
        self.connections.answered(reason);
        self.answer = Some(Answer {
            bytes: answer(reason, &message),
            written: 0,
        });
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let phase = this.phase.load(Ordering::Relaxed);
        if phase == CLAIMED {
            // The header's timer, if one was armed, has nothing left to do.
            this.timer = None;
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => {
                if phase == HEADER {
                    if this.deadline.is_none() {
                        // A kept-alive request's header that needs more
                        // than one read: its time starts now.
                        this.deadline = Some(Instant::now() + this.limits.timeout);
                    }
                    if this.poll_deadline(cx) {
                        if this.seen == 0 {
                            // Nothing sent at all: close without a word, as
                            // for an idle keep-alive connection.
                            this.connections.refused_silently(Reason::HeaderTimeout);
                            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                        }
                        return this.timed_out();
                    }
                }
                Poll::Pending
            }
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if read.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                if phase == IDLE {
                    this.phase.store(HEADER, Ordering::Relaxed);
                    this.seen = 0;
                    this.tail_len = 0;
                    this.deadline = None;
                    this.timer = None;
                } else if this.seen > 0 && this.deadline.is_some_and(|d| Instant::now() >= d) {
                    // A client trickling bytes is not always caught waiting.
                    return this.timed_out();
                }
                let max = this.limits.max_size;
                if this.seen + read.len() > max {
                    let tail = &this.tail[..usize::from(this.tail_len)];
                    let within = this.seen <= max
                        && header::end_in(tail, read).is_some_and(|used| this.seen + used <= max);
                    if !within {
                        let message = format!(
                            "the request header is larger than {max} bytes (server.max_request_header_size)"
                        );
                        return this.refuse(Reason::HeaderTooLarge, message);
                    }
                }
                this.seen += read.len();
                header::push_tail(&mut this.tail, &mut this.tail_len, read);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.claimed() && this.answer.is_none() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.replace_pingora_answer(buf);
        ready!(this.poll_answer(cx))?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.claimed() && this.answer.is_none() {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map(|b| &b[..])
            .unwrap_or(&[]);
        this.replace_pingora_answer(first);
        ready!(this.poll_answer(cx))?;
        Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_answer(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_answer(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        if self.answer.is_some() {
            // A refused header: the answer goes out first, within a bound.
            let written = tokio::time::timeout(
                ANSWER_TIMEOUT,
                std::future::poll_fn(|cx| self.poll_answer(cx)),
            )
            .await;
            if !matches!(written, Ok(Ok(()))) {
                return;
            }
            let _ = tokio::time::timeout(ANSWER_TIMEOUT, self.inner.flush()).await;
        }
        Shutdown::shutdown(&mut *self.inner).await;
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}
