//! The streaming benchmark's load client: N concurrent SSE streams against
//! one target (the mock directly, a bare Pingora proxy or floodwall), over
//! raw HTTP/1.1 on tokio sockets. Driven by `benches/streams.sh`.
//!
//! ```text
//! cargo build --release --example stream_client
//! target/release/examples/stream_client --target 127.0.0.1:PORT --mode idle \
//!     --streams 9000 --script 'heartbeat=15s' --hold 20 --watch proxy=PID
//! target/release/examples/stream_client --target 127.0.0.1:PORT --mode active \
//!     --streams 1000 --chunks 40 --chunk-delay-ms 50 --warmup 3 --duration 10 --watch proxy=PID
//! ```
//!
//! Every stream is `POST /v1/chat/completions` with `"stream": true` and the
//! mock's script in `x-mock-fault`.
//!
//! - **idle**: opens `--streams` streams (at most `--open-concurrency`
//!   being opened at once; a stream is open once its first `data:` event has
//!   arrived), then holds them all for `--hold` seconds, counting the
//!   heartbeat comments (`: ping`) that arrive, and closes them. It samples
//!   VmRSS of each `--watch` process before the first connection, once all
//!   streams are open, every second of the hold, and at its end (with its
//!   count of open files).
//! - **active**: keeps `--streams` streams running: each slot sends one
//!   stream after another on its keep-alive connection, with
//!   `stamp=1;chunks=C;chunk_delay=D` added to the script, so every chunk
//!   carries the mock's send time (`mock_sent_us`). Slots start spread over
//!   one stream's length, so new streams start at an even rate. After
//!   `--warmup` seconds it measures for `--duration` seconds: time to first
//!   token (request written to the first content chunk received; the mock
//!   sends it right after the role chunk), each chunk's delivery delay
//!   (received minus `mock_sent_us`, on the same host's clock), the chunks
//!   received, and the CPU time (utime+stime from `/proc/PID/stat`, and the
//!   finer `/proc/PID/task/*/schedstat`) of each `--watch` process.
//!
//! The result is one line on stdout, `STREAM_RESULT key=value ...` (the
//! form `benches/load.sh` reads from wrk), and progress goes to stderr.
//! Only loopback targets are accepted; the run is bounded (`--max-seconds`,
//! enforced by a watchdog thread) and ends by itself.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};

const USAGE: &str = "usage: stream_client --target 127.0.0.1:PORT --mode idle|active --streams N\n\
    [--script SPEC] [--open-concurrency K] [--watch LABEL=PID]...\n\
    idle:   [--hold SECS]\n\
    active: [--chunks C] [--chunk-delay-ms D] [--warmup SECS] [--duration SECS]\n\
    [--max-seconds SECS]";

/// How long one connect, or one response head, may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Read buffer of one stream (the events are a few hundred bytes).
const READ_CHUNK: usize = 2048;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Idle,
    Active,
}

#[derive(Clone, Debug)]
struct Args {
    target: SocketAddr,
    mode: Mode,
    streams: usize,
    script: String,
    open_concurrency: usize,
    watch: Vec<(String, u32)>,
    hold: Duration,
    chunks: usize,
    chunk_delay: Duration,
    warmup: Duration,
    duration: Duration,
    max_seconds: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut target = None;
    let mut mode = None;
    let mut streams = None;
    let mut a = Args {
        target: SocketAddr::from(([127, 0, 0, 1], 0)),
        mode: Mode::Idle,
        streams: 0,
        script: String::new(),
        open_concurrency: 200,
        watch: Vec::new(),
        hold: Duration::from_secs(20),
        chunks: 40,
        chunk_delay: Duration::from_millis(50),
        warmup: Duration::from_secs(3),
        duration: Duration::from_secs(10),
        max_seconds: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let num = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name}: expected a whole number, got {v:?}"))
        };
        match arg.as_str() {
            "--target" => {
                let v = value("--target")?;
                target = Some(
                    v.parse::<SocketAddr>()
                        .map_err(|e| format!("--target {v}: {e}"))?,
                );
            }
            "--mode" => {
                mode = Some(match value("--mode")?.as_str() {
                    "idle" => Mode::Idle,
                    "active" => Mode::Active,
                    other => return Err(format!("--mode: idle or active, not {other:?}")),
                })
            }
            "--streams" => streams = Some(num("--streams", value("--streams")?)? as usize),
            "--script" => a.script = value("--script")?,
            "--open-concurrency" => {
                a.open_concurrency =
                    num("--open-concurrency", value("--open-concurrency")?)?.max(1) as usize
            }
            "--watch" => {
                let v = value("--watch")?;
                let (label, pid) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--watch {v}: expected LABEL=PID"))?;
                if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    return Err(format!("--watch {v}: the label must be [A-Za-z0-9_]+"));
                }
                let pid = num("--watch", pid.to_string())? as u32;
                a.watch.push((label.to_string(), pid));
            }
            "--hold" => a.hold = Duration::from_secs(num("--hold", value("--hold")?)?),
            "--chunks" => a.chunks = num("--chunks", value("--chunks")?)?.max(1) as usize,
            "--chunk-delay-ms" => {
                a.chunk_delay =
                    Duration::from_millis(num("--chunk-delay-ms", value("--chunk-delay-ms")?)?)
            }
            "--warmup" => a.warmup = Duration::from_secs(num("--warmup", value("--warmup")?)?),
            "--duration" => {
                a.duration = Duration::from_secs(num("--duration", value("--duration")?)?.max(1))
            }
            "--max-seconds" => a.max_seconds = Some(num("--max-seconds", value("--max-seconds")?)?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    a.target = target.ok_or("--target is required")?;
    if !a.target.ip().is_loopback() {
        return Err(format!(
            "--target {}: only loopback targets (127.0.0.1) are allowed",
            a.target
        ));
    }
    a.mode = mode.ok_or("--mode is required")?;
    a.streams = streams.ok_or("--streams is required")?;
    if a.streams == 0 {
        return Err("--streams must be at least 1".into());
    }
    Ok(a)
}

// ------------------------------------------------------------------ clocks

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// VmRSS of a process, in KiB.
fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Open files of a process (entries of `/proc/PID/fd`).
fn open_files(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// utime+stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU time of all of a process's threads, in ns (`/proc/PID/task/*/schedstat`).
fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            total += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Some(total)
}

/// Clock ticks per second of `/proc/PID/stat`: std has no `sysconf`, so the
/// script passes `getconf CLK_TCK` in `$CLK_TCK`; 100 (Linux's) otherwise.
fn clk_tck() -> u64 {
    std::env::var("CLK_TCK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

#[derive(Clone, Copy, Default)]
struct CpuSample {
    ticks: u64,
    ns: u64,
}

fn cpu_sample(pid: u32) -> CpuSample {
    CpuSample {
        ticks: cpu_ticks(pid).unwrap_or(0),
        ns: cpu_ns(pid).unwrap_or(0),
    }
}

// ------------------------------------------------------------------ HTTP/1.1 + SSE

/// One item of a streamed response.
#[derive(Debug, PartialEq)]
enum Item {
    /// A `data:` event: its `mock_sent_us`, whether it is `[DONE]`, and
    /// whether it carries content (a non-empty `"content"`).
    Data {
        sent_us: Option<u64>,
        done: bool,
        content: bool,
    },
    /// A comment line such as `: ping` (a heartbeat).
    Comment,
    /// The response ended (last chunk, or the whole Content-Length).
    End,
}

#[derive(Debug, Clone, Copy)]
enum Framing {
    /// Chunked: what is left of the current chunk (`None`: at a size line).
    Chunked(Option<usize>),
    /// Chunked, the data of a chunk read; its CRLF is next.
    ChunkCrlf,
    /// Chunked, after the last chunk: trailer lines until an empty one.
    Trailer,
    /// Content-Length: bytes left.
    Length(usize),
    /// Until the connection closes.
    Close,
    Finished,
}

/// A keep-alive connection and the response being read on it.
struct Conn {
    s: TcpStream,
    buf: BytesMut,
    framing: Framing,
    /// Decoded body bytes not yet split into events.
    sse: Vec<u8>,
    keep_alive: bool,
    /// When the last read that returned bytes did: wall clock (µs since the
    /// epoch, to compare with `mock_sent_us`) and monotonic.
    last_read: (u64, Instant),
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn classify(ev: &[u8]) -> Item {
    let ev = ev.strip_prefix(b"\n").unwrap_or(ev);
    if ev.starts_with(b":") {
        return Item::Comment;
    }
    let data = ev.strip_prefix(b"data:").unwrap_or(ev);
    let data = data.strip_prefix(b" ").unwrap_or(data);
    if data.starts_with(b"[DONE]") {
        return Item::Data {
            sent_us: None,
            done: true,
            content: false,
        };
    }
    const KEY: &[u8] = b"\"mock_sent_us\":";
    let sent_us = find(data, KEY).and_then(|i| {
        let digits: &[u8] = &data[i + KEY.len()..];
        let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
        std::str::from_utf8(&digits[..n]).ok()?.parse().ok()
    });
    let content = find(data, b"\"content\":\"").is_some_and(|i| data.get(i + 11) != Some(&b'"'));
    Item::Data {
        sent_us,
        done: false,
        content,
    }
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Result<Conn, String> {
        let s = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| "connect_timeout".to_string())?
            .map_err(|e| format!("connect_{:?}", e.kind()))?;
        let _ = s.set_nodelay(true);
        Ok(Conn {
            s,
            buf: BytesMut::with_capacity(READ_CHUNK),
            framing: Framing::Finished,
            sse: Vec::new(),
            keep_alive: true,
            last_read: (unix_us(), Instant::now()),
        })
    }

    /// Read more bytes; `Ok(false)` on EOF.
    async fn fill(&mut self) -> Result<bool, String> {
        if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(READ_CHUNK);
        }
        match self.s.read_buf(&mut self.buf).await {
            Ok(0) => Ok(false),
            Ok(_) => {
                self.last_read = (unix_us(), Instant::now());
                Ok(true)
            }
            Err(e) => Err(format!("read_{:?}", e.kind())),
        }
    }

    /// Send a streaming chat request and read the response head; an error
    /// string (a short label) unless the answer is `200 text/event-stream`.
    async fn start_stream(&mut self, request: &[u8]) -> Result<(), String> {
        self.s
            .write_all(request)
            .await
            .map_err(|e| format!("write_{:?}", e.kind()))?;
        let head = async {
            loop {
                if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                    return Ok(end + 4);
                }
                if self.buf.len() > 64 * 1024 {
                    return Err("head_too_large".to_string());
                }
                if !self.fill().await? {
                    return Err("closed_before_head".to_string());
                }
            }
        };
        let head_len = tokio::time::timeout(STEP_TIMEOUT, head)
            .await
            .map_err(|_| "head_timeout".to_string())??;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(&self.buf[..head_len])
            .map_err(|_| "bad_head".to_string())?;
        let status = resp.code.unwrap_or(0);
        let value = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(str::to_ascii_lowercase)
        };
        let chunked = value("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let length = value("content-length").and_then(|v| v.trim().parse::<usize>().ok());
        let sse = value("content-type").is_some_and(|v| v.starts_with("text/event-stream"));
        self.keep_alive = resp.version == Some(1)
            && !value("connection").is_some_and(|v| v.contains("close"))
            && (chunked || length.is_some());
        self.framing = if chunked {
            Framing::Chunked(None)
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            Framing::Close
        };
        self.buf.advance(head_len);
        self.sse.clear();
        if status != 200 {
            self.keep_alive = false;
            return Err(format!("status_{status}"));
        }
        if !sse {
            self.keep_alive = false;
            return Err("not_sse".into());
        }
        Ok(())
    }

    /// The next complete item from what is buffered, without reading.
    fn take_item(&mut self) -> Result<Option<Item>, String> {
        loop {
            if let Some(i) = find(&self.sse, b"\n\n") {
                let item = classify(&self.sse[..i]);
                self.sse.drain(..i + 2);
                return Ok(Some(item));
            }
            match self.framing {
                Framing::Finished => return Ok(Some(Item::End)),
                Framing::Chunked(None) => {
                    let Some(eol) = find(&self.buf, b"\r\n") else {
                        return Ok(None);
                    };
                    let line = std::str::from_utf8(&self.buf[..eol]).map_err(|_| "bad_chunk")?;
                    let size =
                        usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                            .map_err(|_| "bad_chunk".to_string())?;
                    self.buf.advance(eol + 2);
                    self.framing = if size == 0 {
                        Framing::Trailer
                    } else {
                        Framing::Chunked(Some(size))
                    };
                }
                Framing::Chunked(Some(left)) => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let n = left.min(self.buf.len());
                    self.sse.extend_from_slice(&self.buf[..n]);
                    self.buf.advance(n);
                    self.framing = if n == left {
                        Framing::ChunkCrlf
                    } else {
                        Framing::Chunked(Some(left - n))
                    };
                }
                Framing::ChunkCrlf => {
                    if self.buf.len() < 2 {
                        return Ok(None);
                    }
                    if &self.buf[..2] != b"\r\n" {
                        return Err("bad_chunk".into());
                    }
                    self.buf.advance(2);
                    self.framing = Framing::Chunked(None);
                }
                Framing::Trailer => {
                    let Some(eol) = find(&self.buf, b"\r\n") else {
                        return Ok(None);
                    };
                    self.buf.advance(eol + 2);
                    if eol == 0 {
                        self.framing = Framing::Finished;
                    }
                }
                Framing::Length(left) => {
                    if left == 0 {
                        self.framing = Framing::Finished;
                        continue;
                    }
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let n = left.min(self.buf.len());
                    self.sse.extend_from_slice(&self.buf[..n]);
                    self.buf.advance(n);
                    self.framing = Framing::Length(left - n);
                }
                Framing::Close => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    self.sse.extend_from_slice(&self.buf);
                    self.buf.clear();
                }
            }
        }
    }

    /// The next item, reading as needed; it arrived at `self.last_read`.
    async fn next_item(&mut self) -> Result<Item, String> {
        loop {
            if let Some(item) = self.take_item()? {
                if item == Item::End {
                    self.framing = Framing::Finished;
                }
                return Ok(item);
            }
            if !self.fill().await? {
                if matches!(self.framing, Framing::Close) {
                    self.framing = Framing::Finished;
                    self.keep_alive = false;
                    continue;
                }
                return Err("closed_mid_stream".into());
            }
        }
    }
}

fn request_bytes(target: SocketAddr, script: &str) -> Vec<u8> {
    let body = r#"{"model":"mock-model","stream":true,"messages":[{"role":"user","content":"stream benchmark"}]}"#;
    let mut r = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {target}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !script.is_empty() {
        r.push_str(&format!("x-mock-fault: {script}\r\n"));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

/// Error labels and their counts.
#[derive(Default)]
struct Errors(Mutex<BTreeMap<String, u64>>);

impl Errors {
    fn add(&self, what: &str) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(what.to_string()).or_default() += 1;
        }
    }

    fn total(&self) -> u64 {
        self.0.lock().map(|m| m.values().sum()).unwrap_or(0)
    }

    /// `label:count,label:count` (`none` when empty).
    fn summary(&self) -> String {
        let m = match self.0.lock() {
            Ok(m) => m.clone(),
            Err(_) => return "unknown".into(),
        };
        if m.is_empty() {
            return "none".into();
        }
        m.iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

// ------------------------------------------------------------------ idle

#[derive(Default)]
struct IdleState {
    opened: AtomicUsize,
    /// Streams whose open failed (counted in `errors` too).
    failed: AtomicUsize,
    /// Opened streams that ended before the hold was over.
    closed_early: AtomicUsize,
    /// Opened streams that received at least one heartbeat.
    with_heartbeat: AtomicUsize,
    heartbeats: AtomicU64,
    errors: Errors,
}

async fn idle_stream(
    target: SocketAddr,
    request: Arc<Vec<u8>>,
    permits: Arc<Semaphore>,
    st: Arc<IdleState>,
    mut stop: watch::Receiver<bool>,
) {
    let opened = {
        let Ok(_permit) = permits.acquire().await else {
            return;
        };
        let open = async {
            let mut c = Conn::connect(target).await?;
            c.start_stream(&request).await?;
            match tokio::time::timeout(STEP_TIMEOUT, c.next_item()).await {
                Err(_) => Err("first_event_timeout".to_string()),
                Ok(Err(e)) => Err(e),
                Ok(Ok(Item::Data { .. })) => Ok(c),
                Ok(Ok(other)) => Err(format!("first_item_{other:?}").to_ascii_lowercase()),
            }
        };
        match open.await {
            Ok(c) => c,
            Err(e) => {
                st.errors.add(&e);
                st.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    };
    st.opened.fetch_add(1, Ordering::Relaxed);
    let mut c = opened;
    let mut beats = 0u64;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            item = c.next_item() => match item {
                Ok(Item::Comment) => {
                    beats += 1;
                    st.heartbeats.fetch_add(1, Ordering::Relaxed);
                    if beats == 1 {
                        st.with_heartbeat.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Item::Data { .. }) => {}
                Ok(Item::End) => {
                    st.errors.add("ended_during_hold");
                    st.closed_early.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    st.errors.add(&e);
                    st.closed_early.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

async fn run_idle(a: Args, out: &mut Vec<(String, String)>) {
    let st = Arc::new(IdleState::default());
    let request = Arc::new(request_bytes(a.target, &a.script));
    let permits = Arc::new(Semaphore::new(a.open_concurrency));
    let (stop_tx, stop_rx) = watch::channel(false);
    for (label, pid) in &a.watch {
        out.push((format!("rss_before_kb.{label}"), opt(rss_kb(*pid))));
    }
    let cpu0: Vec<CpuSample> = a.watch.iter().map(|(_, p)| cpu_sample(*p)).collect();
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..a.streams {
        tasks.spawn(idle_stream(
            a.target,
            request.clone(),
            permits.clone(),
            st.clone(),
            stop_rx.clone(),
        ));
    }
    // Wait until every stream is open or has failed.
    let mut last_report = Instant::now();
    loop {
        let done = st.opened.load(Ordering::Relaxed) + st.failed.load(Ordering::Relaxed);
        if done >= a.streams {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            eprintln!(
                "[stream_client] {:.1}s: {} open, {} failed",
                t0.elapsed().as_secs_f64(),
                st.opened.load(Ordering::Relaxed),
                st.failed.load(Ordering::Relaxed)
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open_secs = t0.elapsed().as_secs_f64();
    let opened = st.opened.load(Ordering::Relaxed);
    eprintln!(
        "[stream_client] {opened} streams open after {open_secs:.1}s ({} failed); holding {}s",
        st.failed.load(Ordering::Relaxed),
        a.hold.as_secs()
    );
    for (label, pid) in &a.watch {
        out.push((format!("rss_open_kb.{label}"), opt(rss_kb(*pid))));
    }
    // Hold, sampling RSS every second.
    let hold_start = Instant::now();
    let mut max_rss: Vec<u64> = vec![0; a.watch.len()];
    let hb0 = st.heartbeats.load(Ordering::Relaxed);
    let cpu_h0: Vec<CpuSample> = a.watch.iter().map(|(_, p)| cpu_sample(*p)).collect();
    loop {
        for (i, (_, pid)) in a.watch.iter().enumerate() {
            max_rss[i] = max_rss[i].max(rss_kb(*pid).unwrap_or(0));
        }
        let left = a.hold.saturating_sub(hold_start.elapsed());
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
    let cpu_h1: Vec<CpuSample> = a.watch.iter().map(|(_, p)| cpu_sample(*p)).collect();
    let hb_hold = st.heartbeats.load(Ordering::Relaxed) - hb0;
    for (i, (label, pid)) in a.watch.iter().enumerate() {
        out.push((format!("rss_hold_kb.{label}"), opt(rss_kb(*pid))));
        out.push((format!("rss_hold_max_kb.{label}"), max_rss[i].to_string()));
        out.push((
            format!("open_files.{label}"),
            open_files(*pid).map_or_else(|| "0".into(), |n| n.to_string()),
        ));
        out.push((
            format!("cpu_hold_ns.{label}"),
            cpu_h1[i].ns.saturating_sub(cpu_h0[i].ns).to_string(),
        ));
        out.push((
            format!("cpu_ticks.{label}"),
            cpu_h1[i].ticks.saturating_sub(cpu0[i].ticks).to_string(),
        ));
    }
    let alive = opened - st.closed_early.load(Ordering::Relaxed);
    out.push(("opened".into(), opened.to_string()));
    out.push((
        "failed".into(),
        st.failed.load(Ordering::Relaxed).to_string(),
    ));
    out.push((
        "closed_early".into(),
        st.closed_early.load(Ordering::Relaxed).to_string(),
    ));
    out.push(("alive_at_end".into(), alive.to_string()));
    out.push((
        "with_heartbeat".into(),
        st.with_heartbeat.load(Ordering::Relaxed).to_string(),
    ));
    out.push((
        "heartbeats".into(),
        st.heartbeats.load(Ordering::Relaxed).to_string(),
    ));
    out.push(("heartbeats_in_hold".into(), hb_hold.to_string()));
    out.push(("open_secs".into(), format!("{open_secs:.2}")));
    out.push((
        "hold_secs".into(),
        format!("{:.2}", hold_start.elapsed().as_secs_f64()),
    ));
    out.push(("errors".into(), st.errors.total().to_string()));
    out.push(("error_kinds".into(), st.errors.summary()));
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
}

// ------------------------------------------------------------------ active

#[derive(Default)]
struct Samples {
    /// Time to first token, µs.
    ttft: Vec<u32>,
    /// Chunk delivery delay (received minus `mock_sent_us`), µs.
    delay: Vec<u32>,
}

struct ActiveState {
    window: (Instant, Instant),
    samples: Mutex<Samples>,
    /// Data events received inside the window.
    events: AtomicU64,
    /// Streams started / completed inside the window.
    started: AtomicU64,
    completed: AtomicU64,
    /// Data events without `mock_sent_us` (should be only `[DONE]`).
    unstamped: AtomicU64,
    errors: Errors,
}

impl ActiveState {
    fn in_window(&self, t: Instant) -> bool {
        t >= self.window.0 && t < self.window.1
    }
}

/// One slot: streams back to back on a keep-alive connection until `end`.
async fn active_slot(
    target: SocketAddr,
    request: Arc<Vec<u8>>,
    start_at: Instant,
    end: Instant,
    st: Arc<ActiveState>,
) {
    tokio::time::sleep_until(start_at.into()).await;
    let mut conn: Option<Conn> = None;
    let mut ttft = Vec::new();
    let mut delay = Vec::new();
    while Instant::now() < end {
        let mut c = match conn.take() {
            Some(c) => c,
            None => match Conn::connect(target).await {
                Ok(c) => c,
                Err(e) => {
                    st.errors.add(&e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let sent = Instant::now();
        if st.in_window(sent) {
            st.started.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = c.start_stream(&request).await {
            st.errors.add(&e);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let mut first = true;
        let ok = loop {
            let item = tokio::select! {
                i = c.next_item() => i,
                _ = tokio::time::sleep_until(end.into()) => break false,
            };
            match item {
                Ok(Item::Data {
                    sent_us,
                    done,
                    content,
                }) => {
                    let (now_us, now) = c.last_read;
                    if !st.in_window(now) {
                        first &= !content;
                        continue;
                    }
                    st.events.fetch_add(1, Ordering::Relaxed);
                    match sent_us {
                        Some(s) => delay.push(now_us.saturating_sub(s).min(u32::MAX as u64) as u32),
                        None if !done => {
                            st.unstamped.fetch_add(1, Ordering::Relaxed);
                        }
                        None => {}
                    }
                    if first && content {
                        first = false;
                        let t = now.duration_since(sent).as_micros();
                        ttft.push(t.min(u32::MAX as u128) as u32);
                    }
                }
                Ok(Item::Comment) => {}
                Ok(Item::End) => {
                    if st.in_window(c.last_read.1) {
                        st.completed.fetch_add(1, Ordering::Relaxed);
                    }
                    break true;
                }
                Err(e) => {
                    if Instant::now() < end {
                        st.errors.add(&e);
                    }
                    break false;
                }
            }
        };
        if ok && c.keep_alive {
            conn = Some(c);
        }
    }
    if let Ok(mut s) = st.samples.lock() {
        s.ttft.extend_from_slice(&ttft);
        s.delay.extend_from_slice(&delay);
    }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run_active(a: Args, out: &mut Vec<(String, String)>) {
    let mut script = a.script.clone();
    if !script.is_empty() {
        script.push(';');
    }
    let _ = write!(
        script,
        "stamp=1;chunks={};chunk_delay={}ms",
        a.chunks,
        a.chunk_delay.as_millis()
    );
    let request = Arc::new(request_bytes(a.target, &script));
    // Slots start spread over one stream's length, so that streams start
    // (and end) at an even rate rather than in waves.
    let stream_len = a.chunk_delay * a.chunks as u32;
    let t0 = Instant::now() + Duration::from_millis(50);
    let ramp = stream_len.max(Duration::from_millis(100));
    let w0 = t0 + ramp + a.warmup;
    let w1 = w0 + a.duration;
    let st = Arc::new(ActiveState {
        window: (w0, w1),
        samples: Mutex::new(Samples::default()),
        events: AtomicU64::new(0),
        started: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        unstamped: AtomicU64::new(0),
        errors: Errors::default(),
    });
    eprintln!(
        "[stream_client] {} streams x {} chunks every {}ms; ramp {:.1}s, warm-up {}s, measuring {}s",
        a.streams,
        a.chunks,
        a.chunk_delay.as_millis(),
        ramp.as_secs_f64(),
        a.warmup.as_secs(),
        a.duration.as_secs()
    );
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..a.streams {
        let at = t0 + ramp.mul_f64(i as f64 / a.streams as f64);
        tasks.spawn(active_slot(a.target, request.clone(), at, w1, st.clone()));
    }
    tokio::time::sleep_until(w0.into()).await;
    let c0: Vec<CpuSample> = a.watch.iter().map(|(_, p)| cpu_sample(*p)).collect();
    let real0 = Instant::now();
    tokio::time::sleep_until(w1.into()).await;
    let c1: Vec<CpuSample> = a.watch.iter().map(|(_, p)| cpu_sample(*p)).collect();
    let window = real0.elapsed().as_secs_f64();
    let rss: Vec<Option<u64>> = a.watch.iter().map(|(_, p)| rss_kb(*p)).collect();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();

    let events = st.events.load(Ordering::Relaxed);
    let (mut ttft, mut delay) = match st.samples.lock() {
        Ok(mut s) => (std::mem::take(&mut s.ttft), std::mem::take(&mut s.delay)),
        Err(_) => (Vec::new(), Vec::new()),
    };
    ttft.sort_unstable();
    delay.sort_unstable();
    let tck = clk_tck();
    out.push(("window_secs".into(), format!("{window:.3}")));
    out.push(("events".into(), events.to_string()));
    out.push((
        "events_per_sec".into(),
        format!("{:.0}", events as f64 / window),
    ));
    out.push((
        "streams_started".into(),
        st.started.load(Ordering::Relaxed).to_string(),
    ));
    out.push((
        "streams_completed".into(),
        st.completed.load(Ordering::Relaxed).to_string(),
    ));
    out.push((
        "unstamped".into(),
        st.unstamped.load(Ordering::Relaxed).to_string(),
    ));
    for (name, v) in [("ttft", &ttft), ("chunk", &delay)] {
        out.push((format!("{name}_n"), v.len().to_string()));
        for p in [50.0, 90.0, 99.0, 99.9] {
            out.push((
                format!("{name}_p{}_us", p.to_string().replace('.', "")),
                percentile(v, p).to_string(),
            ));
        }
        out.push((
            format!("{name}_max_us"),
            v.last().copied().unwrap_or(0).to_string(),
        ));
    }
    for (i, (label, _)) in a.watch.iter().enumerate() {
        let ticks = c1[i].ticks.saturating_sub(c0[i].ticks);
        let ns = c1[i].ns.saturating_sub(c0[i].ns);
        out.push((format!("cpu_ticks.{label}"), ticks.to_string()));
        out.push((format!("cpu_ns.{label}"), ns.to_string()));
        let per = |us: f64| {
            if events == 0 {
                "0".to_string()
            } else {
                format!("{:.2}", us / events as f64)
            }
        };
        out.push((
            format!("cpu_us_per_chunk.{label}"),
            per(ticks as f64 * 1e6 / tck as f64),
        ));
        out.push((
            format!("cpu_sched_us_per_chunk.{label}"),
            per(ns as f64 / 1e3),
        ));
        out.push((format!("rss_kb.{label}"), opt(rss[i])));
    }
    out.push(("errors".into(), st.errors.total().to_string()));
    out.push(("error_kinds".into(), st.errors.summary()));
}

fn opt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "0".into())
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("stream_client: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    // A hard bound on the run, whatever happens to the runtime.
    let limit = a.max_seconds.unwrap_or_else(|| match a.mode {
        Mode::Idle => 180 + a.hold.as_secs(),
        Mode::Active => 60 + (a.chunk_delay * a.chunks as u32 + a.warmup + a.duration).as_secs(),
    });
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(limit));
        eprintln!("stream_client: still running after {limit}s (--max-seconds): giving up");
        std::process::exit(3);
    });
    // One thread: the client's own footprint stays small and the same for
    // every target it is pointed at.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stream_client: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let mut out: Vec<(String, String)> = vec![
        (
            "mode".into(),
            match a.mode {
                Mode::Idle => "idle",
                Mode::Active => "active",
            }
            .into(),
        ),
        ("streams".into(), a.streams.to_string()),
    ];
    let mode = a.mode;
    rt.block_on(async {
        match mode {
            Mode::Idle => run_idle(a, &mut out).await,
            Mode::Active => run_active(a, &mut out).await,
        }
    });
    let mut line = String::from("STREAM_RESULT");
    for (k, v) in &out {
        let _ = write!(line, " {k}={v}");
    }
    println!("{line}");
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_events() {
        assert_eq!(classify(b": ping"), Item::Comment);
        assert_eq!(
            classify(b"data: [DONE]"),
            Item::Data {
                sent_us: None,
                done: true,
                content: false
            }
        );
        assert_eq!(
            classify(br#"data: {"choices":[{"delta":{"content":"hi"}}],"mock_sent_us":1700000000123456}"#),
            Item::Data {
                sent_us: Some(1_700_000_000_123_456),
                done: false,
                content: true
            }
        );
        assert_eq!(
            classify(br#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#),
            Item::Data {
                sent_us: None,
                done: false,
                content: false
            }
        );
    }
}
