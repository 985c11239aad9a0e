//! Tests for the mock backend, driven by a raw tokio client so every byte on
//! the wire is visible.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// False when the connection ended before the body did.
    complete: bool,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// SSE events: `data:` payloads (comments skipped).
    fn events(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

struct Client<S> {
    s: S,
    buf: Vec<u8>,
}

impl Client<TcpStream> {
    async fn connect(addr: SocketAddr) -> Self {
        Client {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn send(&mut self, raw: &[u8]) {
        self.s.write_all(raw).await.unwrap();
        self.s.flush().await.unwrap();
    }

    /// Read more bytes; 0 on EOF, error or timeout.
    async fn read_more(&mut self) -> usize {
        let mut tmp = [0u8; 16384];
        match tokio::time::timeout(READ_TIMEOUT, self.s.read(&mut tmp)).await {
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&tmp[..n]);
                n
            }
            _ => 0,
        }
    }

    async fn fill(&mut self, n: usize) -> bool {
        while self.buf.len() < n {
            if self.read_more().await == 0 {
                return false;
            }
        }
        true
    }

    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..p]).into_owned();
                self.buf.drain(..p + 2);
                return Some(line);
            }
            if self.read_more().await == 0 {
                return None;
            }
        }
    }

    /// Read just the response head.
    async fn head(&mut self) -> Option<(u16, Vec<(String, String)>)> {
        loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut hs);
            match r.parse(&self.buf).ok()? {
                httparse::Status::Complete(n) => {
                    let status = r.code.unwrap();
                    let headers = r
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    self.buf.drain(..n);
                    return Some((status, headers));
                }
                httparse::Status::Partial => {
                    if self.read_more().await == 0 {
                        return None;
                    }
                }
            }
        }
    }

    /// Read a whole response (skipping 1xx other than 101); None when the
    /// connection ends before a head arrives.
    async fn response(&mut self) -> Option<Resp> {
        let (status, headers) = self.head().await?;
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
            complete: true,
        };
        if status == 101 {
            return Some(resp);
        }
        if resp
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            loop {
                let Some(line) = self.line().await else {
                    resp.complete = false;
                    return Some(resp);
                };
                let size = usize::from_str_radix(line.trim(), 16).unwrap();
                if size == 0 {
                    let end = self.line().await;
                    resp.complete = end.is_some();
                    return Some(resp);
                }
                if !self.fill(size + 2).await {
                    resp.body.extend_from_slice(&self.buf);
                    self.buf.clear();
                    resp.complete = false;
                    return Some(resp);
                }
                resp.body.extend_from_slice(&self.buf[..size]);
                self.buf.drain(..size + 2);
            }
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().unwrap();
            resp.complete = self.fill(len).await;
            let take = len.min(self.buf.len());
            resp.body = self.buf.drain(..take).collect();
        } else {
            while self.read_more().await > 0 {}
            resp.body = std::mem::take(&mut self.buf);
        }
        Some(resp)
    }

    /// True when the peer has closed (EOF or reset) within the timeout.
    async fn closed(&mut self) -> bool {
        let mut tmp = [0u8; 1024];
        loop {
            match tokio::time::timeout(READ_TIMEOUT, self.s.read(&mut tmp)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

fn get(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut s = format!("GET {path} HTTP/1.1\r\nHost: mock\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str("\r\n");
    s.into_bytes()
}

fn post(path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut s = format!(
        "POST {path} HTTP/1.1\r\nHost: mock\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str("\r\n");
    s.push_str(body);
    s.into_bytes()
}

fn chat_body(model: &str, stream: bool, include_usage: bool) -> String {
    let mut v = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there mock server"},
        ],
        "stream": stream,
    });
    if include_usage {
        v["stream_options"] = json!({"include_usage": true});
    }
    v.to_string()
}

async fn start() -> MockServer {
    MockServer::start(MockOptions::default()).await.unwrap()
}

/// Poll the stats until `f` holds (or fail after 3 s).
async fn wait_stats(server: &MockServer, f: impl Fn(&MockStats) -> bool) -> MockStats {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let s = server.stats();
        if f(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "stats never matched: {s:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn content_of(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect()
}

#[tokio::test]
async fn keep_alive_reuses_the_connection_with_both_body_framings() {
    let server = start().await;
    let mut c = Client::connect(server.addr()).await;

    c.send(&get("/hello?x=1", &[("X-Custom", "a"), ("x-custom", "b")]))
        .await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-mock-request"), Some("0"));
    let echo = r.json();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/hello?x=1");
    assert_eq!(echo["headers"]["x-custom"], "a, b");
    assert_eq!(echo["body_len"], 0);

    // Chunked request body (with an extension and a trailer).
    c.send(
        b"POST /echo HTTP/1.1\r\nHost: mock\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    )
    .await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-mock-request"), Some("1"));
    let echo = r.json();
    assert_eq!(echo["body_len"], 11);
    assert_eq!(
        echo["body_sha256"],
        "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
    );

    // Content-Length body, pipelined with the next request.
    let mut two = post("/x", &[], "abc");
    two.extend_from_slice(&get("/y", &[("Connection", "close")]));
    c.send(&two).await;
    let r = c.response().await.unwrap();
    assert_eq!(r.json()["body_len"], 3);
    assert_eq!(r.header("x-mock-request"), Some("2"));
    let r = c.response().await.unwrap();
    assert_eq!(r.json()["path"], "/y");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed().await);

    let s = wait_stats(&server, |s| s.connections_open == 0).await;
    assert_eq!(s.connections_accepted, 1);
    assert_eq!(s.requests, 4);
    let attempts = s.attempts("default");
    assert_eq!(attempts.len(), 4);
    let ids: Vec<u64> = attempts.iter().map(|a| a.request_on_connection).collect();
    assert_eq!(ids, vec![0, 1, 2, 3]);
    assert!(attempts
        .iter()
        .all(|a| a.connection_id == attempts[0].connection_id && a.outcome == "ok"));
}

#[tokio::test]
async fn fail_counts_attempts_per_scenario() {
    let server = start().await;
    let mut c = Client::connect(server.addr()).await;
    let fault = [("x-mock-fault", "scenario=flaky;fail=2:503;retry_after=1")];
    for _ in 0..2 {
        c.send(&post(
            "/v1/chat/completions",
            &fault,
            &chat_body("gpt", false, false),
        ))
        .await;
        let r = c.response().await.unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.json()["error"]["type"], "server_error");
    }
    c.send(&post(
        "/v1/chat/completions",
        &fault,
        &chat_body("gpt", false, false),
    ))
    .await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["object"], "chat.completion");

    let s = server.stats();
    let outcomes: Vec<(u16, String)> = s
        .attempts("flaky")
        .iter()
        .map(|a| (a.status, a.outcome.to_string()))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (503, "failed".to_string()),
            (503, "failed".to_string()),
            (200, "ok".to_string())
        ]
    );

    // Scripted through the model name; the scenario is the spec itself.
    let model = "mock:fail=1:429";
    c.send(&post(
        "/v1/chat/completions",
        &[],
        &chat_body(model, false, false),
    ))
    .await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    c.send(&post(
        "/v1/chat/completions",
        &[],
        &chat_body(model, false, false),
    ))
    .await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["model"], model);
    assert_eq!(server.stats().attempts("fail=1:429").len(), 2);

    // error_code, and reset_stats clears the attempt counter.
    let fault = [(
        "x-mock-fault",
        "scenario=ctx;fail=1000:400;error_code=context_length_exceeded",
    )];
    c.send(&post(
        "/v1/chat/completions",
        &fault,
        &chat_body("gpt", false, false),
    ))
    .await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    server.reset_stats();
    assert!(server.stats().scenarios.is_empty());
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-fault", "scenario=flaky;fail=2:503")],
        "{}",
    ))
    .await;
    assert_eq!(c.response().await.unwrap().status, 503);
}

#[tokio::test]
async fn chat_completion_non_streaming() {
    let server = start().await;
    let mut c = Client::connect(server.addr()).await;
    c.send(&post(
        "/v1/chat/completions",
        &[],
        &chat_body("gpt-4o-mini", false, false),
    ))
    .await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content, "This is mock reply number 1 to: hello");
    // "be brief" (8) + "hello there mock server" (23) = 31 chars -> 8 tokens.
    assert_eq!(v["usage"]["prompt_tokens"], 8);
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(v["usage"]["total_tokens"], 16);

    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-fault", "chunks=12")],
        &chat_body("m", false, false),
    ))
    .await;
    let v = c.response().await.unwrap().json();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.split(' ').count(), 12);
    assert!(content.starts_with("This is mock reply number 2 to: hello there mock server"));

    c.send(&post("/v1/chat/completions", &[], "not json")).await;
    assert_eq!(c.response().await.unwrap().status, 400);
}

#[tokio::test]
async fn streaming_sends_role_content_stop_done() {
    let server = start().await;
    let mut c = Client::connect(server.addr()).await;
    c.send(&post(
        "/v1/chat/completions",
        &[],
        &chat_body("gpt", true, false),
    ))
    .await;
    let r = c.response().await.unwrap();
    assert!(r.complete);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    let ev = r.events();
    // role + 8 content + stop + [DONE]
    assert_eq!(ev.len(), 11, "{ev:#?}");
    let first: Value = serde_json::from_str(&ev[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    for e in &ev[1..9] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v["choices"][0]["delta"]["content"].is_string());
        assert!(v["choices"][0]["finish_reason"].is_null());
    }
    let stop: Value = serde_json::from_str(&ev[9]).unwrap();
    assert_eq!(stop["choices"][0]["finish_reason"], "stop");
    assert_eq!(ev[10], "[DONE]");
    assert_eq!(content_of(&ev), "This is mock reply number 1 to: hello");
    assert!(!ev.iter().any(|e| e.contains("\"usage\"")));

    // The connection is reusable after a stream.
    c.send(&get("/after", &[])).await;
    let r = c.response().await.unwrap();
    assert_eq!(r.header("x-mock-request"), Some("1"));
    let s = server.stats();
    assert_eq!(s.attempts("default")[0].outcome, "ok");
    assert_eq!(s.attempts("default")[0].status, 200);
}

#[tokio::test]
async fn include_usage_adds_the_usage_chunk() {
    let server = start().await;
    let mut c = Client::connect(server.addr()).await;
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-fault", "chunks=5")],
        &chat_body("gpt", true, true),
    ))
    .await;
    let r = c.response().await.unwrap();
    let ev = r.events();
    // role + 5 content + stop + usage + [DONE]
    assert_eq!(ev.len(), 9, "{ev:#?}");
    let usage: Value = serde_json::from_str(&ev[7]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert_eq!(usage["usage"]["prompt_tokens"], 8);
    assert_eq!(usage["usage"]["total_tokens"], 13);
    assert_eq!(ev[8], "[DONE]");
}

#[tokio::test]
async fn cut_after_closes_mid_stream() {
    let server = start().await;
    let mut c = Client::connect(server.addr()).await;
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-fault", "scenario=cut;cut_after=3")],
        &chat_body("gpt", true, false),
    ))
    .await;
    let r = c.response().await.unwrap();
    assert!(!r.complete, "stream should end without the last chunk");
    let ev = r.events();
    assert_eq!(ev.len(), 4, "role + 3 content: {ev:#?}");
    assert!(!ev.iter().any(|e| e == "[DONE]"));
    let s = wait_stats(&server, |s| s.connections_open == 0).await;
    assert_eq!(s.attempts("cut")[0].outcome, "cut");
}

#[tokio::test]
async fn malformed_and_no_done() {
    let server = start().await;
    let mut c = Client::connect(server.addr()).await;
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-fault", "malformed_at=2;no_done=1;chunks=3")],
        &chat_body("gpt", true, false),
    ))
    .await;
    let r = c.response().await.unwrap();
    assert!(r.complete);
    let ev = r.events();
    assert_eq!(ev.len(), 5, "role + 3 content + stop: {ev:#?}");
    assert!(serde_json::from_str::<Value>(&ev[1]).is_ok());
    assert!(serde_json::from_str::<Value>(&ev[2]).is_err());
    assert!(serde_json::from_str::<Value>(&ev[3]).is_ok());
    assert!(!ev.iter().any(|e| e == "[DONE]"));
}

#[tokio::test]
async fn client_disconnect_is_recorded() {
    let server = start().await;

    // Mid-stream.
    let mut c = Client::connect(server.addr()).await;
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-fault", "scenario=slow;chunks=50;chunk_delay=100ms")],
        &chat_body("gpt", true, false),
    ))
    .await;
    let (status, _) = c.head().await.unwrap();
    assert_eq!(status, 200);
    drop(c);
    let s = wait_stats(&server, |s| s.disconnects.len() == 1).await;
    assert_eq!(s.disconnects[0].scenario, "slow");
    assert_eq!(s.disconnects[0].path, "/v1/chat/completions");
    assert!(s.disconnects[0].at_ms >= s.attempts("slow")[0].at_ms);
    assert_eq!(s.scenarios["slow"].client_disconnects.len(), 1);
    assert_eq!(s.attempts("slow")[0].outcome, "disconnected");

    // While hanging.
    let mut c = Client::connect(server.addr()).await;
    c.send(&get("/x", &[("x-mock-fault", "scenario=hang;hang=1")]))
        .await;
    wait_stats(&server, |s| s.attempts("hang").len() == 1).await;
    drop(c);
    let s = wait_stats(&server, |s| s.disconnects.len() == 2).await;
    assert_eq!(s.attempts("hang")[0].outcome, "hang");
    assert_eq!(s.attempts("hang")[0].status, 0);
    assert_eq!(s.scenarios["hang"].client_disconnects.len(), 1);

    // During latency.
    let mut c = Client::connect(server.addr()).await;
    c.send(&get("/x", &[("x-mock-fault", "scenario=lat;latency=10s")]))
        .await;
    wait_stats(&server, |s| s.attempts("lat").len() == 1).await;
    drop(c);
    let s = wait_stats(&server, |s| s.disconnects.len() == 3).await;
    assert_eq!(s.attempts("lat")[0].outcome, "disconnected");
    wait_stats(&server, |s| s.connections_open == 0).await;
}

#[tokio::test]
async fn stall_after_keeps_the_connection_open() {
    let server = start().await;
    let mut c = Client::connect(server.addr()).await;
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-fault", "scenario=stall;stall_after=2")],
        &chat_body("gpt", true, false),
    ))
    .await;
    c.head().await.unwrap();
    // role + 2 content chunks arrive, then nothing.
    let deadline = Instant::now() + Duration::from_secs(3);
    while String::from_utf8_lossy(&c.buf).matches("data: ").count() < 3 {
        assert!(Instant::now() < deadline);
        c.read_more().await;
    }
    let mut tmp = [0u8; 64];
    let more = tokio::time::timeout(Duration::from_millis(300), c.s.read(&mut tmp)).await;
    assert!(more.is_err(), "nothing should arrive after the stall");
    let s = wait_stats(&server, |s| {
        s.attempts("stall")
            .first()
            .is_some_and(|a| a.outcome == "stalled")
    })
    .await;
    assert_eq!(s.connections_open, 1);
    drop(c);
    let s = wait_stats(&server, |s| s.disconnects.len() == 1).await;
    assert_eq!(s.attempts("stall")[0].outcome, "stalled");
}

#[tokio::test]
async fn reset_drops_the_first_attempts() {
    let server = start().await;
    let fault = [("x-mock-fault", "scenario=rst;reset=1")];
    let mut c = Client::connect(server.addr()).await;
    c.send(&get("/x", &fault)).await;
    assert!(c.response().await.is_none());
    let mut c = Client::connect(server.addr()).await;
    c.send(&get("/x", &fault)).await;
    assert_eq!(c.response().await.unwrap().status, 200);
    let s = server.stats();
    let a = s.attempts("rst");
    assert_eq!((a[0].status, a[0].outcome), (0, Outcome::Reset));
    assert_eq!((a[1].status, a[1].outcome), (200, Outcome::Ok));
}

#[tokio::test]
async fn latency_ttft_and_heartbeat() {
    let server = start().await;
    let mut c = Client::connect(server.addr()).await;
    let t = Instant::now();
    c.send(&get("/x", &[("x-mock-fault", "latency=200ms")]))
        .await;
    assert_eq!(c.response().await.unwrap().status, 200);
    assert!(t.elapsed() >= Duration::from_millis(200));

    // ttft: headers at once, first content later.
    let t = Instant::now();
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-fault", "ttft=300ms;chunks=2")],
        &chat_body("gpt", true, false),
    ))
    .await;
    c.head().await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(250));
    let r = {
        // Read the rest of the chunked body.
        let mut body = Vec::new();
        loop {
            let line = c.line().await.unwrap();
            let n = usize::from_str_radix(&line, 16).unwrap();
            if n == 0 {
                c.line().await.unwrap();
                break;
            }
            assert!(c.fill(n + 2).await);
            body.extend_from_slice(&c.buf[..n]);
            c.buf.drain(..n + 2);
        }
        String::from_utf8(body).unwrap()
    };
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(r.ends_with("data: [DONE]\n\n"));

    // Heartbeats, then the normal end of the stream (heartbeat implies a stream).
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-fault", "heartbeat=50ms;duration=230ms;chunks=1")],
        &chat_body("gpt", false, false),
    ))
    .await;
    let r = c.response().await.unwrap();
    assert!(r.complete);
    let pings = r.text().matches(": ping\n\n").count();
    assert!((3..=5).contains(&pings), "{pings} pings");
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn stamp_puts_the_send_time_in_every_data_chunk() {
    let server = start().await;
    let mut c = Client::connect(server.addr()).await;
    let now_us = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
    };
    let before = now_us();
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-fault", "stamp=1;chunks=3;chunk_delay=20ms")],
        &chat_body("gpt", true, false),
    ))
    .await;
    let r = c.response().await.unwrap();
    let after = now_us();
    let stamps: Vec<u64> = r
        .events()
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["mock_sent_us"].as_u64().unwrap()
        })
        .collect();
    // Role chunk, three words, the finish chunk.
    assert_eq!(stamps.len(), 5, "{}", r.text());
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{stamps:?}");
    assert!(before <= stamps[0] && stamps[4] <= after, "{stamps:?}");
    // The words are 20ms apart.
    assert!(stamps[3] - stamps[1] >= 40_000, "{stamps:?}");

    // Without `stamp`, no extra field.
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-fault", "chunks=1")],
        &chat_body("gpt", true, false),
    ))
    .await;
    let r = c.response().await.unwrap();
    assert!(!r.text().contains("mock_sent_us"));
}

#[tokio::test]
async fn status_and_live_defaults() {
    let server = start().await;
    let mut c = Client::connect(server.addr()).await;
    server.set_defaults(FaultScript::parse("status=503;retry_after=2").unwrap());
    c.send(&get("/v1/models", &[])).await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("2"));
    // A request's own script replaces the defaults.
    c.send(&get("/v1/models", &[("x-mock-fault", "scenario=own")]))
        .await;
    assert_eq!(c.response().await.unwrap().status, 200);
    server.set_defaults(FaultScript::default());
    c.send(&get("/v1/models", &[])).await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["object"], "list");
    assert!(r.json()["data"].as_array().unwrap().len() >= 3);

    c.send(&get("/x", &[("x-mock-fault", "bogus=1")])).await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_fault_script");
}

#[tokio::test]
async fn embeddings_models_and_control_endpoints() {
    let server = start().await;
    let mut c = Client::connect(server.addr()).await;
    let body = json!({"model": "text-embedding-3-small", "input": ["hello", "world!"]}).to_string();
    c.send(&post("/v1/embeddings", &[], &body)).await;
    let v = c.response().await.unwrap().json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "text-embedding-3-small");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["index"], 1);
    let e0 = v["data"][0]["embedding"].as_array().unwrap();
    assert_eq!(e0.len(), 8);
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    // Deterministic.
    let body = json!({"model": "m", "input": "hello"}).to_string();
    c.send(&post("/v1/embeddings", &[], &body)).await;
    let v2 = c.response().await.unwrap().json();
    assert_eq!(&v2["data"][0]["embedding"], &v["data"][0]["embedding"]);

    c.send(&get("/mock/stats", &[])).await;
    let s = c.response().await.unwrap().json();
    assert_eq!(s["requests"], 2);
    assert_eq!(s["connections_open"], 1);
    assert_eq!(s["scenarios"]["default"]["attempts"][0]["outcome"], "ok");
    c.send(&post("/mock/reset", &[], "")).await;
    assert_eq!(c.response().await.unwrap().status, 200);
    assert_eq!(server.stats().requests, 0);
    assert!(server.stats().scenarios.is_empty());
}

#[tokio::test]
async fn websocket_upgrade_then_echo() {
    let server = start().await;
    let mut c = Client::connect(server.addr()).await;
    c.send(&get(
        "/ws",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
    ))
    .await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 101);
    assert_eq!(r.header("upgrade"), Some("websocket"));
    assert_eq!(
        r.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    c.send(b"raw bytes \x00\x01\x02").await;
    assert!(c.fill(13).await);
    assert_eq!(&c.buf[..13], b"raw bytes \x00\x01\x02");
    assert_eq!(server.stats().attempts("default")[0].status, 101);
}

#[tokio::test]
async fn oversized_head_is_refused() {
    let server = start().await;
    let mut c = Client::connect(server.addr()).await;
    let big = "a".repeat(MAX_HEADER_BYTES + 10);
    c.send(&get("/x", &[("x-big", &big)])).await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 431);
    assert!(c.closed().await);

    let mut c = Client::connect(server.addr()).await;
    c.send(
        format!(
            "POST /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(c.response().await.unwrap().status, 413);
}

#[tokio::test]
async fn shutdown_and_drop_close_everything() {
    let server = start().await;
    let addr = server.addr();
    let mut idle = Client::connect(addr).await;
    idle.send(&get("/x", &[])).await;
    idle.response().await.unwrap();
    let mut hung = Client::connect(addr).await;
    hung.send(&get("/x", &[("x-mock-fault", "hang=1")])).await;
    wait_stats(&server, |s| s.requests == 2).await;
    server.shutdown().await;
    assert!(idle.closed().await);
    assert!(hung.closed().await);
    assert!(TcpStream::connect(addr).await.is_err());

    let server = start().await;
    let addr = server.addr();
    let mut idle = Client::connect(addr).await;
    idle.send(&get("/x", &[])).await;
    idle.response().await.unwrap();
    drop(server);
    assert!(idle.closed().await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(addr).await.is_err());
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

#[tokio::test]
async fn tls_handshake_with_the_test_ca() {
    use tokio_rustls::rustls::pki_types::ServerName;

    let server = MockServer::start(MockOptions {
        tls: Some(MockTls {
            cert_pem: fixture("server.pem"),
            key_pem: fixture("server.key"),
        }),
        name: "tls-mock".into(),
        ..MockOptions::default()
    })
    .await
    .unwrap();

    let mut roots = rustls::RootCertStore::empty();
    let mut pem = std::io::BufReader::new(std::fs::File::open(fixture("ca.pem")).unwrap());
    for cert in rustls_pemfile::certs(&mut pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));

    for name in ["localhost", "127.0.0.1"] {
        let tcp = TcpStream::connect(server.addr()).await.unwrap();
        let tls = connector
            .connect(ServerName::try_from(name).unwrap().to_owned(), tcp)
            .await
            .unwrap_or_else(|e| panic!("handshake as {name}: {e}"));
        let mut c = Client {
            s: tls,
            buf: Vec::new(),
        };
        c.send(&post(
            "/v1/chat/completions",
            &[],
            &chat_body("gpt", true, true),
        ))
        .await;
        let r = c.response().await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-mock-server"), Some("tls-mock"));
        assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
        c.send(&get("/again", &[])).await;
        assert_eq!(
            c.response().await.unwrap().header("x-mock-request"),
            Some("1")
        );
    }
    assert_eq!(server.stats().connections_accepted, 2);

    // A plain-text client gets no HTTP answer.
    let mut c = Client::connect(server.addr()).await;
    c.send(&get("/x", &[])).await;
    assert!(c.response().await.is_none());

    // Bad paths are reported, not panicked on.
    let err = MockServer::start(MockOptions {
        tls: Some(MockTls {
            cert_pem: fixture("missing.pem"),
            key_pem: fixture("server.key"),
        }),
        ..MockOptions::default()
    })
    .await
    .err()
    .unwrap();
    assert!(err.to_string().contains("missing.pem"));
}

#[test]
fn fault_script_parsing() {
    let s = FaultScript::parse(
        "scenario=x; fail=2:503 ;retry_after=1;latency=250ms;ttft=1.5s;chunks=3;no_done;hang=0;stamp",
    )
    .unwrap();
    assert!(s.stamp);
    assert_eq!(s.scenario.as_deref(), Some("x"));
    assert_eq!(s.fail, Some((2, 503)));
    assert_eq!(s.retry_after, Some(1));
    assert_eq!(s.latency, Some(Duration::from_millis(250)));
    assert_eq!(s.ttft, Some(Duration::from_millis(1500)));
    assert_eq!(s.chunks, Some(3));
    assert!(s.no_done);
    assert!(!s.hang);
    assert_eq!(s.scenario_name(), "x");

    let s = FaultScript::parse("fail=1000:400;error_code=context_length_exceeded").unwrap();
    assert_eq!(s.fail, Some((1000, 400)));
    assert_eq!(s.error_code.as_deref(), Some("context_length_exceeded"));
    assert_eq!(
        s.scenario_name(),
        "fail=1000:400;error_code=context_length_exceeded"
    );
    assert_eq!(FaultScript::parse("fail=3").unwrap().fail, Some((3, 500)));
    assert_eq!(
        FaultScript::parse("Chunk-Delay=20").unwrap().chunk_delay,
        Some(Duration::from_millis(20))
    );
    assert!(FaultScript::parse("").unwrap().is_empty());
    assert_eq!(FaultScript::default().scenario_name(), "default");
    for bad in [
        "nope=1",
        "fail=x:503",
        "fail=1:99",
        "latency=5parsecs",
        "status=abc",
        "malformed_at=0",
        "heartbeat=0s",
        "latency=48h",
        "chunks=100001",
    ] {
        assert!(FaultScript::parse(bad).is_err(), "{bad} should not parse");
    }
    let built = FaultScript {
        latency: Some(Duration::from_millis(20)),
        fail: Some((1, 503)),
        ..FaultScript::default()
    };
    let round = FaultScript::parse(&built.to_string()).unwrap();
    assert_eq!(round.latency, built.latency);
    assert_eq!(round.fail, built.fail);
    assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
}
