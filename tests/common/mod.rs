//! Shared harness for the integration tests.
//!
//! - [`Floodwall`] runs the real `floodwall` binary on ephemeral ports (port 0,
//!   reported through `--ready-file`), and kills it by PID when dropped.
//! - The mock LLM backend runs in-process on an ephemeral port.
//! - [`Client`] speaks HTTP/1.1 through Pingora's own client connector, and
//!   records when each body chunk arrived.
//! - [`RedisServer`] starts a private `redis-server` on a free port.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;

#[allow(unused_imports)]
pub use floodwall::mock::{FaultScript, MockOptions, MockServer};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!("fw-{tag}-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_floodwall")
}

/// A running floodwall process.
pub struct Floodwall {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The directory holding the policy file (watched by floodwall's reloader).
    pub dir: TempDir,
    /// Log, ready file and upgrade socket: kept out of `dir`, so that log
    /// writes do not wake the policy watcher.
    pub run_dir: TempDir,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Floodwall {
    /// Start floodwall with this policy (listeners should use port 0).
    pub async fn start(policy: &str) -> Floodwall {
        Self::start_with_env(policy, &[]).await
    }

    pub async fn start_with_env(policy: &str, env: &[(&str, &str)]) -> Floodwall {
        let dir = TempDir::new("fw");
        let config = dir.path().join("policy.yaml");
        std::fs::write(&config, policy).unwrap();
        Self::start_at(dir, config, env).await
    }

    pub async fn start_at(dir: TempDir, config: PathBuf, env: &[(&str, &str)]) -> Floodwall {
        let run_dir = TempDir::new("fw-run");
        let ready = run_dir.path().join("ready.json");
        let log = run_dir.path().join("floodwall.log");
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--upgrade-sock")
            .arg(run_dir.path().join("upgrade.sock"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn floodwall");
        let deadline = Instant::now() + Duration::from_secs(30);
        let info: serde_json::Value = loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                if let Ok(v) = serde_json::from_str(&text) {
                    break v;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "floodwall exited during start-up ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "floodwall not ready within 30s:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let addr = info["listen"][0].as_str().unwrap().parse().unwrap();
        let admin = info["admin"].as_str().unwrap().parse().unwrap();
        Floodwall {
            child,
            addr,
            admin,
            dir,
            run_dir,
            config,
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replace the policy file the way an editor or `kubectl apply` would:
    /// write a new file and rename it over the old one.
    pub fn write_policy(&self, policy: &str) {
        let tmp = self.dir.path().join("policy.yaml.new");
        std::fs::write(&tmp, policy).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn metrics(&self) -> String {
        let r = Client::new().get(self.admin, "/metrics").await;
        assert_eq!(r.status, 200);
        String::from_utf8(r.body.to_vec()).unwrap()
    }

    /// Wait (bounded) until `f` holds for the metrics text.
    pub async fn wait_metrics(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.metrics().await;
            if f(&m) {
                return m;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; metrics:\n{m}\nlogs:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The log once `f` holds for it. floodwall writes its log in batches,
    /// up to 100 ms after a line was logged (`telemetry::writer`). On a
    /// time-out, `Drop` prints the log.
    pub async fn wait_logs(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        eventually(what, Duration::from_secs(10), || {
            let logs = self.logs();
            std::future::ready(f(&logs).then_some(logs))
        })
        .await
    }
}

impl Drop for Floodwall {
    fn drop(&mut self) {
        // SIGKILL: the test owns this process and must not leave it lingering
        // through Pingora's graceful period.
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test: show what floodwall logged (its directory is
        // deleted with this value), so that a rare failure can be read.
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- floodwall's log, last {} lines ---", tail.len());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// The value of a metric sample, e.g. `metric(&m, "floodwall_config_reloads_total{result=\"ok\"}")`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

pub async fn start_mock() -> MockServer {
    MockServer::start(MockOptions::default())
        .await
        .expect("mock starts")
}

/// A response with the arrival time of every body chunk.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub chunks: Vec<(Duration, Bytes)>,
    pub started: Instant,
    /// The body ended with its proper terminator (not cut).
    pub complete: bool,
}

impl Resp {
    /// A response read off a raw connection: its head (status line and
    /// header lines) and its body.
    pub fn from_raw(head: &str, body: &[u8]) -> Resp {
        let mut headers = http::HeaderMap::new();
        for line in head.lines().skip(1) {
            if let Some((k, v)) = line.split_once(':') {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.trim().as_bytes()),
                    http::HeaderValue::from_str(v.trim()),
                ) {
                    headers.append(k, v);
                }
            }
        }
        Resp {
            status: head_status(head),
            headers,
            body: Bytes::copy_from_slice(body),
            chunks: Vec::new(),
            started: Instant::now(),
            complete: true,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The `data:` payloads of an SSE body.
    pub fn sse_data(&self) -> Vec<String> {
        sse_data(&self.text())
    }
    /// Assert the floodwall error envelope and reason header.
    pub fn assert_floodwall_error(&self, status: u16, reason: &str) {
        assert_eq!(self.status, status, "status; body: {}", self.text());
        assert_eq!(
            self.header("x-floodwall-reason"),
            Some(reason),
            "reason header"
        );
        let v = self.json();
        assert_eq!(v["error"]["code"], reason, "error.code in {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "message in {v}"
        );
        assert!(v["error"]["type"].as_str().is_some(), "type in {v}");
    }
}

pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|ev| {
            let data: Vec<&str> = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// A small HTTP/1.1 client built on Pingora's connector.
pub struct Client {
    connector: Connector,
    pub timeout: Duration,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Client {
        Client {
            connector: Connector::new(None),
            timeout: Duration::from_secs(20),
        }
    }

    pub async fn get(&self, addr: SocketAddr, path: &str) -> Resp {
        self.send(addr, "GET", path, &[], b"").await
    }

    pub async fn post_json(&self, addr: SocketAddr, path: &str, body: &serde_json::Value) -> Resp {
        let b = body.to_string();
        self.send(
            addr,
            "POST",
            path,
            &[("content-type", "application/json")],
            b.as_bytes(),
        )
        .await
    }

    pub async fn send(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Resp {
        let (mut s, started) = self.open(addr, method, path, headers, body).await;
        read_all(&mut s, started, self.timeout).await
    }

    /// Send a request and return once the response header arrived.
    pub async fn open(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (HttpSession, Instant) {
        let peer = HttpPeer::new(addr, false, String::new());
        let (mut s, _) = self
            .connector
            .get_http_session(&peer)
            .await
            .expect("connect");
        let mut req = RequestHeader::build(method, path.as_bytes(), None).unwrap();
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.insert_header("host", addr.to_string()).unwrap();
        }
        for (k, v) in headers {
            req.append_header(k.to_string(), *v).unwrap();
        }
        if !body.is_empty() || method == "POST" {
            req.insert_header("content-length", body.len().to_string())
                .unwrap();
        }
        let started = Instant::now();
        let t = self.timeout;
        tokio::time::timeout(t, async {
            s.write_request_header(Box::new(req))
                .await
                .expect("write header");
            if !body.is_empty() {
                s.write_request_body(Bytes::copy_from_slice(body), true)
                    .await
                    .expect("write body");
            }
            s.finish_request_body().await.expect("finish body");
            s.read_response_header()
                .await
                .expect("read response header");
        })
        .await
        .expect("response header within the client timeout");
        (s, started)
    }
}

/// Read a body to its end, recording chunk arrival times.
pub async fn read_all(s: &mut HttpSession, started: Instant, timeout: Duration) -> Resp {
    let h = s.response_header().expect("header").clone();
    let mut chunks = Vec::new();
    let mut body = Vec::new();
    let complete = tokio::time::timeout(timeout, async {
        loop {
            match s.read_response_body().await {
                Ok(Some(c)) => {
                    chunks.push((started.elapsed(), c.clone()));
                    body.extend_from_slice(&c);
                }
                Ok(None) => return s.response_done(),
                Err(_) => return false,
            }
        }
    })
    .await
    .expect("body within the client timeout");
    Resp {
        status: h.status.as_u16(),
        headers: h.headers.clone(),
        body: Bytes::from(body),
        chunks,
        started,
        complete,
    }
}

pub fn chat_body(content: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "gpt-4o-mini",
        "stream": stream,
        "messages": [{"role": "user", "content": content}]
    })
}

/// A policy with one backend in front of `backend_url` and the given routes
/// YAML (indented as list items under `routes:`).
pub fn policy(backend_url: &str, routes: &str) -> String {
    format!(
        r#"version: 1
server:
  listen: ["127.0.0.1:0"]
  admin: {{ listen: "127.0.0.1:0" }}
  threads: 2
  grace_period: 1s
backends:
  main:
    endpoints: ["{backend_url}"]
    timeouts: {{ connect: 1s, response_headers: 5s }}
routes:
{routes}"#
    )
}

/// A private `redis-server` on a free port, killed on drop.
pub struct RedisServer {
    pub child: Child,
    pub port: u16,
    pub dir: TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = free_port();
        Self::start_on(port)
    }

    pub fn start_on(port: u16) -> RedisServer {
        let dir = TempDir::new("redis");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install -y redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer { child, port, dir }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Poll `f` until it yields `Some`, for at most `within`; panic naming `what`
/// otherwise. Every wait in the tests goes through here or through a timeout.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A policy with several backends (name, endpoint URL) and extra `server:`
/// lines (each already indented by two spaces).
pub fn policy_with(server_extra: &str, backends: &[(&str, &str)], routes: &str) -> String {
    let mut b = String::new();
    for (name, url) in backends {
        b.push_str(&format!(
            "  {name}:\n    endpoints: [\"{url}\"]\n    timeouts: {{ connect: 1s, response_headers: 5s }}\n"
        ));
    }
    format!(
        r#"version: 1
server:
  listen: ["127.0.0.1:0"]
  admin: {{ listen: "127.0.0.1:0" }}
  threads: 2
  grace_period: 1s
{server_extra}
backends:
{b}routes:
{routes}"#
    )
}

pub fn mock_url(mock: &MockServer) -> String {
    format!("http://{}", mock.addr())
}

/// An absolute path under `tests/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tiny upstream that answers every request with the same raw bytes
/// (which must frame themselves: Content-Length or chunked). Keep-alive;
/// requests are recorded raw. Stops when dropped.
pub struct FixedUpstream {
    pub addr: SocketAddr,
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FixedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn fixed_upstream(response: &[u8]) -> FixedUpstream {
    fixed_upstream_with(response, false).await
}

/// [`fixed_upstream`] that closes each connection after its answer, for
/// close-delimited bodies.
pub async fn fixed_upstream_closing(response: &[u8]) -> FixedUpstream {
    fixed_upstream_with(response, true).await
}

async fn fixed_upstream_with(response: &[u8], close: bool) -> FixedUpstream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let response = response.to_vec();
    let seen = requests.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let response = response.clone();
            let seen = seen.clone();
            conns.spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // One request: the head, then a Content-Length body.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 8192];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 8192];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let req: Vec<u8> = buf.drain(..head_end + len).collect();
                    seen.lock().unwrap().push(req);
                    if sock.write_all(&response).await.is_err() || close {
                        let _ = sock.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    FixedUpstream {
        addr,
        requests,
        task,
    }
}

/// A raw TCP connection to `addr` with a bounded read of one response head.
pub struct RawConn {
    pub stream: tokio::net::TcpStream,
    /// Bytes read past the head.
    pub rest: Vec<u8>,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream =
            tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
                .await
                .expect("connect within 5s")
                .expect("connect");
        RawConn {
            stream,
            rest: Vec::new(),
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Read up to the end of a response head (within `within`) and return it.
    pub async fn read_head(&mut self, within: Duration) -> String {
        use tokio::io::AsyncReadExt;
        let mut buf = std::mem::take(&mut self.rest);
        tokio::time::timeout(within, async {
            loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    self.rest = buf.split_off(i + 4);
                    return String::from_utf8_lossy(&buf).into_owned();
                }
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).await.expect("read head");
                assert!(
                    n > 0,
                    "connection closed before a response head: {:?}",
                    String::from_utf8_lossy(&buf)
                );
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("response head in time")
    }

    /// Read exactly `n` bytes (after the head), within `within`.
    pub async fn read_exact(&mut self, n: usize, within: Duration) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut out = std::mem::take(&mut self.rest);
        tokio::time::timeout(within, async {
            while out.len() < n {
                let mut chunk = [0u8; 4096];
                let k = self.stream.read(&mut chunk).await.expect("read");
                assert!(k > 0, "connection closed after {} of {n} bytes", out.len());
                out.extend_from_slice(&chunk[..k]);
            }
        })
        .await
        .expect("bytes in time");
        self.rest = out.split_off(n);
        out
    }

    /// Read until the peer closes (within `within`); the bytes read.
    pub async fn read_to_end(&mut self, within: Duration) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut out = std::mem::take(&mut self.rest);
        tokio::time::timeout(within, async {
            let mut chunk = [0u8; 4096];
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => out.extend_from_slice(&chunk[..k]),
                }
            }
        })
        .await
        .expect("connection closed in time");
        out
    }
}

/// The status code of a raw response head.
pub fn head_status(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A header of a raw response head (case-insensitive name).
pub fn head_header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}
