//! One connection: the keep-alive request loop, fault handling, the endpoints
//! and the SSE stream writer. Every wait (latency, hang, stall, stream pauses)
//! races a read on the connection, so a client that goes away is noticed at
//! once and recorded as a disconnect.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout};

use super::http::{self, body_kind, frame, head_bytes, read_body, read_head, Head, ReadError};
use super::script::FaultScript;
use super::stats::{AttemptRef, Outcome, StatsStore};
use super::ws;

/// A keep-alive connection idle this long between requests is closed.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Reading one request body may take at most this long.
const BODY_TIMEOUT: Duration = Duration::from_secs(300);
/// While watching for a disconnect, pipelined bytes are buffered up to this.
const WATCH_BUFFER_LIMIT: usize = 1024 * 1024;
/// Content words when `chunks=` is not given.
pub(crate) const DEFAULT_WORDS: usize = 8;
const JSON: &str = "application/json";

/// State shared by the accept loop and every connection.
pub(crate) struct Shared {
    pub name: String,
    pub stats: StatsStore,
    pub defaults: RwLock<FaultScript>,
    /// Numbers the chat replies (`chatcmpl-mock-K`, "mock reply number K").
    pub replies: AtomicU64,
}

impl Shared {
    pub(crate) fn defaults(&self) -> FaultScript {
        match self.defaults.read() {
            Ok(g) => g.clone(),
            Err(e) => e.into_inner().clone(),
        }
    }

    pub(crate) fn set_defaults(&self, f: FaultScript) {
        match self.defaults.write() {
            Ok(mut g) => *g = f,
            Err(e) => *e.into_inner() = f,
        }
    }
}

/// A byte stream the mock can serve: plain TCP or TLS over TCP.
pub(crate) trait MockIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Make the coming drop send a TCP RST (SO_LINGER 0).
    fn prepare_reset(&self);
}

impl MockIo for TcpStream {
    fn prepare_reset(&self) {
        let _ = self.set_zero_linger();
    }
}

impl MockIo for tokio_rustls::server::TlsStream<TcpStream> {
    fn prepare_reset(&self) {
        let _ = self.get_ref().0.set_zero_linger();
    }
}

/// What to do with the connection after a request.
enum Next {
    KeepAlive,
    /// Close gracefully (FIN, TLS close_notify).
    Close,
    /// Drop at once, mid-response.
    Abort,
    /// Drop with a TCP RST.
    Reset,
}

enum StreamEnd {
    Done,
    Cut,
    Stalled,
    Disconnected,
}

struct Req {
    head: Head,
    body: Vec<u8>,
    /// 0-based request number on this connection.
    n: u64,
    keep_alive: bool,
}

struct Conn<S> {
    shared: Arc<Shared>,
    id: u64,
    rd: ReadHalf<S>,
    wr: WriteHalf<S>,
    buf: BytesMut,
}

/// Serve one accepted connection until it closes.
pub(crate) async fn serve<S: MockIo>(shared: Arc<Shared>, io: S, id: u64) {
    let (rd, wr) = tokio::io::split(io);
    let mut c = Conn {
        shared,
        id,
        rd,
        wr,
        buf: BytesMut::with_capacity(8192),
    };
    let mut n = 0u64;
    let next = loop {
        let head = match timeout(IDLE_TIMEOUT, read_head(&mut c.rd, &mut c.buf)).await {
            Err(_) => break Next::Close,
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                c.refuse(e).await;
                break Next::Close;
            }
        };
        let kind = match body_kind(&head) {
            Ok(k) => k,
            Err(e) => {
                c.refuse(e).await;
                break Next::Close;
            }
        };
        if head.expects_continue()
            && !kind.is_empty()
            && send(&mut c.wr, b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            break Next::Abort;
        }
        let body = match timeout(BODY_TIMEOUT, read_body(&mut c.rd, &mut c.buf, kind)).await {
            Err(_) => break Next::Close,
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                c.refuse(e).await;
                break Next::Close;
            }
        };
        let keep_alive = head.keep_alive();
        let next = c
            .handle(Req {
                head,
                body,
                n,
                keep_alive,
            })
            .await;
        n += 1;
        match next {
            Next::KeepAlive => continue,
            other => break other,
        }
    };
    match next {
        Next::Reset => {
            let Conn { rd, wr, .. } = c;
            if rd.is_pair_of(&wr) {
                let io = rd.unsplit(wr);
                io.prepare_reset();
                drop(io);
            }
        }
        Next::Abort => {}
        Next::Close | Next::KeepAlive => {
            let _ = timeout(Duration::from_secs(1), c.wr.shutdown()).await;
        }
    }
}

async fn send<W: AsyncWrite + Unpin>(wr: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    wr.write_all(bytes).await?;
    wr.flush().await
}

/// Resolves when the peer closes (read returns 0 or fails). Bytes it sends
/// meanwhile (a pipelined request) are kept in `buf`.
async fn watch_closed<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut) {
    loop {
        if buf.len() >= WATCH_BUFFER_LIMIT {
            std::future::pending::<()>().await;
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(8192);
        }
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

impl<S: MockIo> Conn<S> {
    /// Answer an unreadable request and give up on the connection.
    async fn refuse(&mut self, e: ReadError) {
        let (status, msg) = match e {
            ReadError::HeaderTooLarge => (431, "request head too large"),
            ReadError::BodyTooLarge => (413, "request body too large"),
            ReadError::Bad(m) => (400, m),
            ReadError::Io(e) => {
                tracing::trace!(error = %e, connection = self.id, "mock read failed");
                return;
            }
            ReadError::Eof | ReadError::Truncated => return,
        };
        let body = error_body(status, None, msg);
        let mut headers = self.id_headers(0);
        headers.push(("connection".into(), "close".into()));
        headers.push(("content-type".into(), JSON.into()));
        headers.push(("content-length".into(), body.len().to_string()));
        let mut out = head_bytes(status, &headers);
        out.extend_from_slice(&body);
        let _ = timeout(Duration::from_secs(5), send(&mut self.wr, &out)).await;
    }

    fn id_headers(&self, n: u64) -> Vec<(String, String)> {
        let name: String = self
            .shared
            .name
            .chars()
            .filter(|c| !c.is_control())
            .collect();
        vec![
            ("server".into(), "floodwall-mock".into()),
            ("x-mock-server".into(), name),
            ("x-mock-connection".into(), self.id.to_string()),
            ("x-mock-request".into(), n.to_string()),
        ]
    }

    fn base_headers(&self, req: &Req, keep_alive: bool) -> Vec<(String, String)> {
        let mut h = self.id_headers(req.n);
        if !keep_alive {
            h.push(("connection".into(), "close".into()));
        } else if req.head.version == 0 {
            h.push(("connection".into(), "keep-alive".into()));
        }
        h
    }

    /// Response head with a Content-Length.
    fn fixed_head(
        &self,
        req: &Req,
        status: u16,
        ctype: &str,
        extra: Vec<(String, String)>,
        len: usize,
    ) -> Vec<u8> {
        let mut h = self.base_headers(req, req.keep_alive);
        h.push(("content-type".into(), ctype.into()));
        h.push(("content-length".into(), len.to_string()));
        h.extend(extra);
        head_bytes(status, &h)
    }

    /// Send a complete response; `Err` when the client is gone.
    async fn reply(
        &mut self,
        req: &Req,
        status: u16,
        ctype: &str,
        extra: Vec<(String, String)>,
        body: &[u8],
    ) -> Result<(), ()> {
        let mut out = self.fixed_head(req, status, ctype, extra, body.len());
        if req.head.method != "HEAD" {
            out.extend_from_slice(body);
        }
        send(&mut self.wr, &out).await.map_err(|_| ())
    }

    fn after_reply(&self, req: &Req) -> Next {
        if req.keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        }
    }

    /// Reply to an un-tracked request (control endpoints, bad scripts).
    async fn reply_plain(&mut self, req: &Req, status: u16, body: &[u8]) -> Next {
        match self.reply(req, status, JSON, Vec::new(), body).await {
            Ok(()) => self.after_reply(req),
            Err(()) => Next::Abort,
        }
    }

    /// Reply to a tracked request and record how it went.
    #[allow(clippy::too_many_arguments)]
    async fn reply_tracked(
        &mut self,
        req: &Req,
        t: &AttemptRef,
        status: u16,
        outcome: Outcome,
        ctype: &str,
        extra: Vec<(String, String)>,
        body: &[u8],
    ) -> Next {
        match self.reply(req, status, ctype, extra, body).await {
            Ok(()) => {
                self.shared.stats.finish(t, status, outcome);
                self.after_reply(req)
            }
            Err(()) => {
                self.gone(req, t, status, Outcome::Disconnected);
                Next::Abort
            }
        }
    }

    /// Record that the client went away.
    fn gone(&self, req: &Req, t: &AttemptRef, status: u16, outcome: Outcome) {
        self.shared.stats.finish(t, status, outcome);
        self.shared.stats.client_disconnect(t, &req.head.target);
    }

    async fn wait_closed(&mut self) {
        watch_closed(&mut self.rd, &mut self.buf).await;
    }

    /// Sleep `d`; false when the client went away first.
    async fn sleep_unless_closed(&mut self, d: Duration) -> bool {
        let Conn { rd, buf, .. } = self;
        tokio::select! {
            _ = sleep(d) => true,
            _ = watch_closed(rd, buf) => false,
        }
    }

    async fn handle(&mut self, req: Req) -> Next {
        let method = req.head.method.clone();
        let path = req.head.path.clone();

        // Control endpoints: not counted, not scripted.
        if path == "/mock/stats" && method == "GET" {
            let body = serde_json::to_vec_pretty(&self.shared.stats.snapshot()).unwrap_or_default();
            return self.reply_plain(&req, 200, &body).await;
        }
        if path == "/mock/reset" && method == "POST" {
            self.shared.stats.reset();
            return self.reply_plain(&req, 200, br#"{"reset":true}"#).await;
        }

        self.shared.stats.count_request();
        let json_body = parse_json(&req.body);
        let script = match pick_script(&req.head, json_body.as_ref(), &self.shared) {
            Ok(s) => s,
            Err(e) => {
                let body = error_body(400, Some("invalid_fault_script"), &e);
                return self.reply_plain(&req, 400, &body).await;
            }
        };
        let scenario = script.scenario_name();
        let (attempt, t) = self.shared.stats.begin_attempt(
            &scenario,
            self.id,
            req.n,
            &req.head.method,
            &req.head.target,
        );

        if script.reset.is_some_and(|r| attempt < r) {
            self.shared.stats.finish(&t, 0, Outcome::Reset);
            return Next::Reset;
        }
        if script.hang {
            self.shared.stats.finish(&t, 0, Outcome::Hang);
            self.wait_closed().await;
            self.gone(&req, &t, 0, Outcome::Hang);
            return Next::Close;
        }
        if let Some(d) = script.latency {
            if !self.sleep_unless_closed(d).await {
                self.gone(&req, &t, 0, Outcome::Disconnected);
                return Next::Close;
            }
        }
        let forced = script.status.filter(|s| *s >= 400);
        let failing = script
            .fail
            .filter(|(count, _)| attempt < *count)
            .map(|(_, s)| s);
        if let Some(status) = forced.or(failing) {
            let mut extra = Vec::new();
            if let Some(ra) = script.retry_after {
                extra.push(("retry-after".to_string(), ra.to_string()));
            }
            let msg = format!(
                "mock failure: attempt {} of scenario `{scenario}` answers {status}",
                attempt + 1
            );
            let body = error_body(status, script.error_code.as_deref(), &msg);
            return self
                .reply_tracked(&req, &t, status, Outcome::Failed, JSON, extra, &body)
                .await;
        }
        let ok_status = script.status.unwrap_or(200);

        if req.head.is_websocket_upgrade() {
            return self.websocket(&req, &t).await;
        }
        match (method.as_str(), path.as_str()) {
            ("POST", "/v1/chat/completions") => {
                self.chat(&req, json_body, &script, &t, ok_status).await
            }
            ("POST", "/v1/embeddings") => self.embeddings(&req, json_body, &t, ok_status).await,
            ("GET", "/v1/models") => {
                let body = models_body();
                self.reply_tracked(&req, &t, ok_status, Outcome::Ok, JSON, Vec::new(), &body)
                    .await
            }
            _ => {
                let body = echo_body(&req);
                self.reply_tracked(&req, &t, ok_status, Outcome::Ok, JSON, Vec::new(), &body)
                    .await
            }
        }
    }

    async fn bad_request(&mut self, req: &Req, t: &AttemptRef, msg: &str) -> Next {
        let body = error_body(400, None, msg);
        self.reply_tracked(req, t, 400, Outcome::Failed, JSON, Vec::new(), &body)
            .await
    }

    async fn chat(
        &mut self,
        req: &Req,
        body: Option<Value>,
        script: &FaultScript,
        t: &AttemptRef,
        ok_status: u16,
    ) -> Next {
        let Some(v) = body.filter(Value::is_object) else {
            return self
                .bad_request(req, t, "request body must be a JSON object")
                .await;
        };
        let model = v
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("mock-model")
            .to_string();
        let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let include_usage = v
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let (chars, last_user) = scan_messages(v.get("messages"));
        let prompt_tokens = chars.div_ceil(4) as u64;
        let k = self.shared.replies.fetch_add(1, Ordering::Relaxed) + 1;
        let words = reply_words(k, &last_user, script.chunks.unwrap_or(DEFAULT_WORDS));
        let plan = StreamPlan {
            head: Vec::new(),
            chunked: req.head.version >= 1,
            id: format!("chatcmpl-mock-{k}"),
            created: unix_now(),
            model,
            usage: usage(prompt_tokens, words.len() as u64),
            words,
            include_usage,
            ttft: script.ttft,
            chunk_delay: script.chunk_delay,
            cut_after: script.cut_after,
            stall_after: script.stall_after,
            malformed_at: script.malformed_at,
            no_done: script.no_done,
            heartbeat: script.heartbeat,
            duration: script.duration,
            stamp: script.stamp,
        };
        if stream || script.heartbeat.is_some() {
            self.stream_chat(req, t, ok_status, plan).await
        } else {
            self.complete_chat(req, t, ok_status, plan).await
        }
    }

    async fn complete_chat(
        &mut self,
        req: &Req,
        t: &AttemptRef,
        status: u16,
        p: StreamPlan,
    ) -> Next {
        let body = json!({
            "id": p.id,
            "object": "chat.completion",
            "created": p.created,
            "model": p.model,
            "system_fingerprint": "fp_mock",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": p.words.join(" ")},
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": p.usage,
        });
        let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
        if p.malformed_at.is_some() {
            bytes.truncate(bytes.len() / 2);
        }
        if p.cut_after.is_none() && p.stall_after.is_none() {
            return self
                .reply_tracked(req, t, status, Outcome::Ok, JSON, Vec::new(), &bytes)
                .await;
        }
        // Cut or stall half-way through the body.
        let mut out = self.fixed_head(req, status, JSON, Vec::new(), bytes.len());
        out.extend_from_slice(&bytes[..bytes.len() / 2]);
        if send(&mut self.wr, &out).await.is_err() {
            self.gone(req, t, status, Outcome::Disconnected);
            return Next::Abort;
        }
        if p.cut_after.is_some() {
            self.shared.stats.finish(t, status, Outcome::Cut);
            return Next::Abort;
        }
        self.shared.stats.finish(t, status, Outcome::Stalled);
        self.wait_closed().await;
        self.gone(req, t, status, Outcome::Stalled);
        Next::Close
    }

    async fn stream_chat(
        &mut self,
        req: &Req,
        t: &AttemptRef,
        status: u16,
        mut p: StreamPlan,
    ) -> Next {
        let keep_alive = req.keep_alive && p.chunked;
        let mut h = self.base_headers(req, keep_alive);
        h.push(("content-type".into(), "text/event-stream".into()));
        h.push(("cache-control".into(), "no-cache".into()));
        if p.chunked {
            h.push(("transfer-encoding".into(), "chunked".into()));
        }
        p.head = head_bytes(status, &h);
        self.shared.stats.finish(t, status, Outcome::Pending);
        let end = {
            let Conn { rd, wr, buf, .. } = self;
            tokio::select! {
                e = run_stream(wr, &p) => e,
                _ = watch_closed(rd, buf) => StreamEnd::Disconnected,
            }
        };
        match end {
            StreamEnd::Done => {
                self.shared.stats.finish(t, status, Outcome::Ok);
                if keep_alive {
                    Next::KeepAlive
                } else {
                    Next::Close
                }
            }
            StreamEnd::Cut => {
                self.shared.stats.finish(t, status, Outcome::Cut);
                Next::Abort
            }
            StreamEnd::Stalled => {
                self.shared.stats.finish(t, status, Outcome::Stalled);
                self.wait_closed().await;
                self.gone(req, t, status, Outcome::Stalled);
                Next::Close
            }
            StreamEnd::Disconnected => {
                self.gone(req, t, status, Outcome::Disconnected);
                Next::Abort
            }
        }
    }

    async fn embeddings(
        &mut self,
        req: &Req,
        body: Option<Value>,
        t: &AttemptRef,
        status: u16,
    ) -> Next {
        let Some(v) = body.filter(Value::is_object) else {
            return self
                .bad_request(req, t, "request body must be a JSON object")
                .await;
        };
        let inputs: Vec<String> = match v.get("input") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_number) => {
                vec![Value::Array(a.clone()).to_string()]
            }
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| match x {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect(),
            _ => return self.bad_request(req, t, "`input` is required").await,
        };
        let model = v
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("mock-embedding");
        let tokens: u64 = inputs
            .iter()
            .map(|s| s.chars().count().div_ceil(4) as u64)
            .sum();
        let data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .map(|(i, s)| json!({"object": "embedding", "index": i, "embedding": embedding(s)}))
            .collect();
        let body = json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        });
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        self.reply_tracked(req, t, status, Outcome::Ok, JSON, Vec::new(), &bytes)
            .await
    }

    /// `101 Switching Protocols`, then echo raw bytes until EOF.
    async fn websocket(&mut self, req: &Req, t: &AttemptRef) -> Next {
        let key = req.head.header("sec-websocket-key").unwrap_or("");
        let mut h = self.id_headers(req.n);
        h.push(("upgrade".into(), "websocket".into()));
        h.push(("connection".into(), "Upgrade".into()));
        h.push(("sec-websocket-accept".into(), ws::accept_key(key)));
        if send(&mut self.wr, &head_bytes(101, &h)).await.is_err() {
            self.gone(req, t, 0, Outcome::Disconnected);
            return Next::Abort;
        }
        self.shared.stats.finish(t, 101, Outcome::Ok);
        let Conn { rd, wr, buf, .. } = self;
        loop {
            if !buf.is_empty() {
                if send(wr, buf).await.is_err() {
                    return Next::Abort;
                }
                buf.clear();
            }
            if buf.capacity() < 8192 {
                buf.reserve(8192);
            }
            match rd.read_buf(buf).await {
                Ok(0) | Err(_) => return Next::Close,
                Ok(_) => {}
            }
        }
    }
}

/// Everything the SSE writer needs, computed up front.
struct StreamPlan {
    head: Vec<u8>,
    chunked: bool,
    id: String,
    created: u64,
    model: String,
    words: Vec<String>,
    usage: Value,
    include_usage: bool,
    ttft: Option<Duration>,
    chunk_delay: Option<Duration>,
    cut_after: Option<usize>,
    stall_after: Option<usize>,
    malformed_at: Option<usize>,
    no_done: bool,
    heartbeat: Option<Duration>,
    duration: Option<Duration>,
    /// `stamp=1`: each data chunk carries `mock_sent_us`.
    stamp: bool,
}

impl StreamPlan {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Vec<u8> {
        self.stamped(json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        }))
    }

    fn usage_chunk(&self) -> Vec<u8> {
        self.stamped(json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_mock",
            "choices": [],
            "usage": self.usage,
        }))
    }

    /// The SSE event of `v`, with the send time when `stamp=1` (chunks are
    /// built right before they are written).
    fn stamped(&self, mut v: Value) -> Vec<u8> {
        if self.stamp {
            let us = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0);
            if let Some(m) = v.as_object_mut() {
                m.insert("mock_sent_us".into(), us.into());
            }
        }
        sse(&v)
    }

    fn malformed_chunk(&self, text: &str) -> Vec<u8> {
        let text = serde_json::to_string(text).unwrap_or_default();
        format!(
            "data: {{\"id\":\"{}\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{text}\n\n",
            self.id
        )
        .into_bytes()
    }
}

fn sse(v: &Value) -> Vec<u8> {
    format!("data: {v}\n\n").into_bytes()
}

/// Write the SSE stream; returns how it ended (never `Disconnected` unless a
/// write failed).
async fn run_stream<W: AsyncWrite + Unpin>(wr: &mut W, p: &StreamPlan) -> StreamEnd {
    let mut out = p.head.clone();
    frame(
        p.chunked,
        &p.chunk(json!({"role": "assistant", "content": ""}), None),
        &mut out,
    );
    if send(wr, &out).await.is_err() {
        return StreamEnd::Disconnected;
    }
    if let Some(hb) = p.heartbeat {
        let start = Instant::now();
        loop {
            let wait = match p.duration {
                Some(total) => {
                    let left = total.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    hb.min(left)
                }
                None => hb,
            };
            sleep(wait).await;
            if p.duration.is_some_and(|total| start.elapsed() >= total) {
                break;
            }
            let mut ping = Vec::new();
            frame(p.chunked, b": ping\n\n", &mut ping);
            if send(wr, &ping).await.is_err() {
                return StreamEnd::Disconnected;
            }
        }
    }
    let n = p.words.len();
    for (i, word) in p.words.iter().enumerate() {
        if p.cut_after == Some(i) {
            return StreamEnd::Cut;
        }
        if p.stall_after == Some(i) {
            return StreamEnd::Stalled;
        }
        let delay = if i == 0 { p.ttft } else { p.chunk_delay };
        if let Some(d) = delay.filter(|d| !d.is_zero()) {
            sleep(d).await;
        }
        let text = if i == 0 {
            word.clone()
        } else {
            format!(" {word}")
        };
        let data = if p.malformed_at == Some(i + 1) {
            p.malformed_chunk(&text)
        } else {
            p.chunk(json!({"content": text}), None)
        };
        let mut out = Vec::with_capacity(data.len() + 16);
        frame(p.chunked, &data, &mut out);
        if send(wr, &out).await.is_err() {
            return StreamEnd::Disconnected;
        }
    }
    if p.cut_after.is_some_and(|k| k >= n) {
        return StreamEnd::Cut;
    }
    if p.stall_after.is_some_and(|k| k >= n) {
        return StreamEnd::Stalled;
    }
    if n == 0 {
        if let Some(d) = p.ttft.filter(|d| !d.is_zero()) {
            sleep(d).await;
        }
    }
    let mut out = Vec::new();
    frame(p.chunked, &p.chunk(json!({}), Some("stop")), &mut out);
    if p.include_usage {
        frame(p.chunked, &p.usage_chunk(), &mut out);
    }
    if !p.no_done {
        frame(p.chunked, b"data: [DONE]\n\n", &mut out);
    }
    if p.chunked {
        out.extend_from_slice(http::LAST_CHUNK);
    }
    if send(wr, &out).await.is_err() {
        return StreamEnd::Disconnected;
    }
    StreamEnd::Done
}

fn parse_json(body: &[u8]) -> Option<Value> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// Header first, then a `mock:` model name, then the server defaults.
fn pick_script(head: &Head, body: Option<&Value>, shared: &Shared) -> Result<FaultScript, String> {
    if let Some(h) = head.header("x-mock-fault").filter(|h| !h.trim().is_empty()) {
        return FaultScript::parse(h);
    }
    let from_model = body
        .and_then(|v| v.get("model"))
        .and_then(Value::as_str)
        .and_then(|m| m.strip_prefix("mock:"));
    if let Some(spec) = from_model {
        return FaultScript::parse(spec);
    }
    Ok(shared.defaults())
}

/// An OpenAI-style error body.
pub(crate) fn error_body(status: u16, code: Option<&str>, message: &str) -> Vec<u8> {
    let (kind, default_code) = match status {
        429 => ("requests", Some("rate_limit_exceeded")),
        401 => ("invalid_request_error", Some("invalid_api_key")),
        400..=499 => ("invalid_request_error", None),
        _ => ("server_error", None),
    };
    let body = json!({
        "error": {
            "message": message,
            "type": kind,
            "param": null,
            "code": code.or(default_code),
        }
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Total content chars of all messages, and the text of the last user message.
fn scan_messages(messages: Option<&Value>) -> (usize, String) {
    let mut chars = 0usize;
    let mut last_user = String::new();
    for m in messages.and_then(Value::as_array).into_iter().flatten() {
        let parts: Vec<&str> = match m.get("content") {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
            _ => Vec::new(),
        };
        chars += parts.iter().map(|p| p.chars().count()).sum::<usize>();
        if m.get("role").and_then(Value::as_str) == Some("user") {
            last_user = parts.join(" ");
        }
    }
    (chars, last_user)
}

/// "This is mock reply number K to: <user words> <filler>", cut to `n` words.
pub(crate) fn reply_words(k: u64, last_user: &str, n: usize) -> Vec<String> {
    const FILLER: [&str; 8] = [
        "lorem",
        "ipsum",
        "dolor",
        "sit",
        "amet",
        "consectetur",
        "adipiscing",
        "elit",
    ];
    let mut w: Vec<String> = ["This", "is", "mock", "reply", "number"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    w.push(k.to_string());
    w.push("to:".to_string());
    w.extend(
        last_user
            .split_whitespace()
            .take(32)
            .map(|s| s.chars().take(64).collect::<String>()),
    );
    let mut i = 0;
    while w.len() < n {
        w.push(FILLER[i % FILLER.len()].to_string());
        i += 1;
    }
    w.truncate(n);
    w
}

/// 8 floats in [-1, 1] derived from SHA-256 of the input.
fn embedding(input: &str) -> Vec<f64> {
    let digest = Sha256::digest(input.as_bytes());
    digest
        .chunks_exact(4)
        .map(|c| {
            let v = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
            let f = f64::from(v) / f64::from(u32::MAX) * 2.0 - 1.0;
            (f * 1e6).round() / 1e6
        })
        .collect()
}

fn models_body() -> Vec<u8> {
    let created = 1_700_000_000u64;
    let data: Vec<Value> = [
        "mock-gpt-4o",
        "mock-gpt-4o-mini",
        "mock-model",
        "mock-embedding",
    ]
    .iter()
    .map(
        |id| json!({"id": id, "object": "model", "created": created, "owned_by": "floodwall-mock"}),
    )
    .collect();
    serde_json::to_vec(&json!({"object": "list", "data": data})).unwrap_or_default()
}

fn echo_body(req: &Req) -> Vec<u8> {
    let mut headers = serde_json::Map::new();
    for (k, v) in &req.head.headers {
        match headers.get_mut(k) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(v);
            }
            _ => {
                headers.insert(k.clone(), Value::String(v.clone()));
            }
        }
    }
    let sha: String = Sha256::digest(&req.body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let body = json!({
        "method": req.head.method,
        "path": req.head.target,
        "headers": headers,
        "body_len": req.body.len(),
        "body_sha256": sha,
    });
    serde_json::to_vec(&body).unwrap_or_default()
}
