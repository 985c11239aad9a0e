//! The chaos suite (issue #7), in a bounded form that runs in `cargo test`.
//!
//! Each test puts steady, mixed (plain and SSE) load through a real floodwall
//! and injects one fault: the backend killed and restarted, a slow backend,
//! Redis killed and restarted, 20 hot reloads, malformed clients. Every
//! request is classified as a success, a clean floodwall error (status,
//! `x-floodwall-reason` and the OpenAI error envelope, from docs/errors.md)
//! or a failure (a hang past its deadline, a reset or cut without a
//! floodwall error, a malformed answer). After the fault: the process is
//! alive, the in-flight gauges are back to 0, RSS is within 10% (+2 MiB) of
//! the warm-up baseline, and the success rate has recovered in time.
//!
//! `FLOODWALL_CHAOS_SECONDS` (default 8) sets the length of each load phase;
//! the faults are scheduled as fractions of it. See docs/chaos.md.

#[path = "../common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;

const CHAT: &str = "/v1/chat/completions";
/// Concurrent client tasks of the steady load.
const TASKS: usize = 8;
/// RSS may grow by 10% of the baseline plus this much (allocator slack).
const RSS_SLACK_KIB: u64 = 2048;

/// The load phase of each scenario (`FLOODWALL_CHAOS_SECONDS`, default 8 s).
fn load_duration() -> Duration {
    let secs = std::env::var("FLOODWALL_CHAOS_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s >= 4.0 && *s <= 3600.0)
        .unwrap_or(8.0);
    Duration::from_secs_f64(secs)
}

// ------------------------------------------------------------ the client

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    Stream,
}

/// What one request ended as.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    /// 200 and a complete body (JSON with `choices`, or SSE ending in `[DONE]`).
    Ok,
    /// A response floodwall made itself: status, reason header, envelope.
    Clean(String),
    /// An SSE stream ended by floodwall's final error event (its `code`),
    /// without a terminator, as docs/errors.md describes.
    StreamError(String),
    /// Anything else.
    Failure(String),
}

#[derive(Debug)]
struct Record {
    /// When the request started, since the load started.
    at: Duration,
    took: Duration,
    kind: Kind,
    outcome: Outcome,
}

struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body ended with its framing (Content-Length reached, final chunk).
    complete: bool,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Send raw request bytes on a new connection and read the answer to EOF
/// (requests say `Connection: close`). `Err` on a hang past `deadline`, a
/// refused connection, or a connection closed or reset before a full head.
async fn exchange(addr: SocketAddr, raw: &[u8], deadline: Duration) -> Result<RawResponse, String> {
    let work = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // A write error is not final: floodwall may answer and close before
        // reading everything (an oversized head).
        let write_err = s.write_all(raw).await.err();
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        let mut read_err = None;
        loop {
            match s.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => {
                    read_err = Some(e);
                    break;
                }
            }
        }
        parse_response(&buf).ok_or_else(|| {
            format!(
                "no complete response head ({} bytes; write error: {write_err:?}; read error: {read_err:?}): {:?}",
                buf.len(),
                String::from_utf8_lossy(&buf[..buf.len().min(200)])
            )
        })
    };
    tokio::time::timeout(deadline, work)
        .await
        .unwrap_or_else(|_| Err(format!("hang: no answer within {deadline:?}")))
}

fn parse_response(buf: &[u8]) -> Option<RawResponse> {
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut hs);
    let httparse::Status::Complete(n) = r.parse(buf).ok()? else {
        return None;
    };
    let status = r.code?;
    let headers: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let rest = &buf[n..];
    let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let (body, complete) = if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(rest)
    } else if let Some(len) = get("content-length").and_then(|v| v.trim().parse::<usize>().ok()) {
        (rest[..rest.len().min(len)].to_vec(), rest.len() >= len)
    } else {
        (rest.to_vec(), true)
    };
    Some(RawResponse {
        status,
        headers,
        body,
        complete,
    })
}

/// Decode a chunked body; `complete` when the final (0) chunk was seen.
fn dechunk(mut rest: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let line = String::from_utf8_lossy(&rest[..eol]);
        let Ok(size) = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
        else {
            return (out, false);
        };
        rest = &rest[eol + 2..];
        if size == 0 {
            return (out, true);
        }
        if rest.len() < size + 2 {
            out.extend_from_slice(&rest[..rest.len().min(size)]);
            return (out, false);
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fn chat_request(kind: Kind, content: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let body = chat_body(content, kind == Kind::Stream).to_string();
    let mut head = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: chaos\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body.as_bytes());
    raw
}

/// A response floodwall made itself, checked against docs/errors.md: the
/// reason code, or why it is not one.
fn clean_error(r: &RawResponse) -> Result<String, String> {
    let reason = r
        .header("x-floodwall-reason")
        .ok_or_else(|| format!("status {} without x-floodwall-reason", r.status))?;
    let v: serde_json::Value =
        serde_json::from_slice(&r.body).map_err(|e| format!("{reason}: body is not JSON ({e})"))?;
    let code = v["error"]["code"].as_str().unwrap_or_default();
    let message = v["error"]["message"].as_str().unwrap_or_default();
    if code != reason || message.is_empty() || v["error"]["type"].as_str().is_none() {
        return Err(format!("{reason}: not the error envelope: {v}"));
    }
    Ok(reason.to_string())
}

fn classify(kind: Kind, r: Result<RawResponse, String>) -> Outcome {
    let r = match r {
        Ok(r) => r,
        Err(e) => return Outcome::Failure(e),
    };
    let text = String::from_utf8_lossy(&r.body).into_owned();
    match r.status {
        200 if kind == Kind::Stream => {
            let data = sse_data(&text);
            if r.complete && data.last().map(String::as_str) == Some("[DONE]") {
                return Outcome::Ok;
            }
            let last_error = data.last().and_then(|d| {
                let v: serde_json::Value = serde_json::from_str(d).ok()?;
                v["error"]["code"].as_str().map(str::to_string)
            });
            match last_error {
                Some(code) if !r.complete => Outcome::StreamError(code),
                _ => Outcome::Failure(format!(
                    "stream not ended by [DONE] nor a final error event (complete: {}): {text:?}",
                    r.complete
                )),
            }
        }
        200 => {
            let ok = r.complete
                && serde_json::from_str::<serde_json::Value>(&text)
                    .is_ok_and(|v| v["choices"].is_array());
            if ok {
                Outcome::Ok
            } else {
                Outcome::Failure(format!(
                    "200 incomplete or not a completion (complete: {}): {text:?}",
                    r.complete
                ))
            }
        }
        s if s >= 400 && r.complete => match clean_error(&r) {
            Ok(code) => Outcome::Clean(code),
            Err(e) => Outcome::Failure(e),
        },
        s => Outcome::Failure(format!("status {s} (complete: {}): {text:?}", r.complete)),
    }
}

// -------------------------------------------------------------- the load

/// What a load task sends: a chat request, or a malformed one.
#[derive(Clone)]
enum Req {
    Chat {
        kind: Kind,
        content: String,
        headers: Vec<(String, String)>,
    },
    Malformed(Malformed),
}

#[derive(Clone, Copy, Debug)]
enum Malformed {
    TruncatedJson,
    HugeHeader,
    InvalidUtf8,
    ShortBody,
}

type MakeReq = Arc<dyn Fn(usize, u64) -> Req + Send + Sync>;

fn plain_or_stream(task: usize, i: u64) -> Kind {
    if (task as u64 + i).is_multiple_of(2) {
        Kind::Plain
    } else {
        Kind::Stream
    }
}

fn simple(content: &'static str) -> MakeReq {
    Arc::new(move |task, i| Req::Chat {
        kind: plain_or_stream(task, i),
        content: content.to_string(),
        headers: Vec::new(),
    })
}

async fn perform(addr: SocketAddr, req: &Req, deadline: Duration) -> (Kind, Outcome) {
    match req {
        Req::Chat {
            kind,
            content,
            headers,
        } => {
            let h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let raw = chat_request(*kind, content, &h);
            (*kind, classify(*kind, exchange(addr, &raw, deadline).await))
        }
        Req::Malformed(m) => (Kind::Plain, malformed(addr, *m, deadline).await),
    }
}

/// Run `TASKS` client loops for `duration`, each request bounded by
/// `deadline`; every outcome, in no particular order.
/// `start` is the origin of the records' times: a scenario that spawns the
/// load passes the instant its own timeline starts from, so that "before
/// the kill" compares times measured from the same origin.
async fn run_load(
    addr: SocketAddr,
    start: Instant,
    duration: Duration,
    deadline: Duration,
    make: MakeReq,
) -> Vec<Record> {
    let mut set = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let make = make.clone();
        set.spawn(async move {
            let mut out = Vec::new();
            let mut i = 0u64;
            while start.elapsed() < duration {
                let req = make(task, i);
                let at = start.elapsed();
                let (kind, outcome) = perform(addr, &req, deadline).await;
                out.push(Record {
                    at,
                    took: start.elapsed() - at,
                    kind,
                    outcome,
                });
                i += 1;
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.expect("load task"));
    }
    all.sort_by_key(|r| r.at);
    all
}

/// Panic listing the records that fail `ok` (with the floodwall log tail).
fn assert_all(fw: &Floodwall, records: &[Record], what: &str, ok: impl Fn(&Record) -> bool) {
    let bad: Vec<&Record> = records.iter().filter(|r| !ok(r)).collect();
    if !bad.is_empty() {
        let logs = fw.logs();
        let tail: String = logs
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        panic!(
            "{what}: {} of {} requests broke it, e.g. {:#?}\nlog tail:\n{tail}",
            bad.len(),
            records.len(),
            &bad[..bad.len().min(5)]
        );
    }
}

fn summary(records: &[Record]) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for r in records {
        let k = match &r.outcome {
            Outcome::Ok => "ok".to_string(),
            Outcome::Clean(c) => c.clone(),
            Outcome::StreamError(c) => format!("stream:{c}"),
            Outcome::Failure(_) => "FAILURE".to_string(),
        };
        *counts.entry(k).or_default() += 1;
    }
    format!("{counts:?}")
}

/// The summary table's columns (docs/chaos.md keeps the latest table).
const TABLE_HEAD: &str = "| scenario | requests | ok | documented errors | stream error events | failures | latency p50 / p99 / max (ms) | after the fault |\n|---|---|---|---|---|---|---|---|";

/// Print this scenario's row of the summary table, and the table of every
/// scenario of this run that has finished so far (the last to finish
/// prints the whole table). Rows are kept under the test target's temporary
/// directory, one file per scenario, named by this process's id.
fn report(scenario: &str, records: &[Record], after_fault: &str) {
    let mut clean = std::collections::BTreeMap::<&str, usize>::new();
    let (mut ok, mut stream, mut failures) = (0, 0, 0);
    for r in records {
        match &r.outcome {
            Outcome::Ok => ok += 1,
            Outcome::Clean(c) => *clean.entry(c.as_str()).or_default() += 1,
            Outcome::StreamError(_) => stream += 1,
            Outcome::Failure(_) => failures += 1,
        }
    }
    let mut took: Vec<u128> = records.iter().map(|r| r.took.as_millis()).collect();
    took.sort_unstable();
    let pct = |p: f64| {
        took.get(((took.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .map_or("-".to_string(), |v| v.to_string())
    };
    let clean = if clean.is_empty() {
        "-".to_string()
    } else {
        clean
            .iter()
            .map(|(c, n)| format!("`{c}` {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let row = format!(
        "| `{scenario}` | {} | {ok} | {clean} | {stream} | {failures} | {} / {} / {} | {after_fault} |",
        records.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0),
    );
    eprintln!("{row}");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-summary");
    let pid = std::process::id();
    if std::fs::create_dir_all(&dir).is_ok()
        && std::fs::write(dir.join(format!("{pid}-{scenario}.md")), &row).is_ok()
    {
        let mut rows: Vec<String> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{pid}-"))
            })
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .collect();
        rows.sort();
        eprintln!(
            "\nchaos summary ({} scenarios so far):\n{TABLE_HEAD}\n{}\n",
            rows.len(),
            rows.join("\n")
        );
    }
}

fn success_rate(records: &[&Record]) -> f64 {
    let ok = records.iter().filter(|r| r.outcome == Outcome::Ok).count();
    ok as f64 / records.len().max(1) as f64
}

/// "recovered N s after <what>" for the summary table.
fn recovery_note(after: Option<Duration>, what: &str) -> String {
    match after {
        Some(d) => format!("success ≥ 95% again {:.1} s after {what}", d.as_secs_f64()),
        None => format!("success never back to 95% after {what}"),
    }
}

/// The first time (since the load started) from which every 500 ms window
/// up to the end has a success rate of at least 95%.
fn recovered_at(records: &[Record], after: Duration) -> Option<Duration> {
    let step = Duration::from_millis(500);
    let end = records.last()?.at;
    let mut t = after;
    let mut first_good = None;
    while t < end {
        let w: Vec<&Record> = records
            .iter()
            .filter(|r| r.at >= t && r.at < t + step)
            .collect();
        if !w.is_empty() {
            if success_rate(&w) >= 0.95 {
                first_good.get_or_insert(t);
            } else {
                first_good = None;
            }
        }
        t += step;
    }
    first_good
}

// ------------------------------------------------------ process health

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The sum of every sample of a metric family.
fn family_sum(m: &str, name: &str) -> f64 {
    m.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

const GAUGES: [&str; 4] = [
    "floodwall_requests_active",
    "floodwall_streams_active",
    "floodwall_route_in_flight",
    // Every chaos client closes its connection after its request.
    "floodwall_connections_active",
];

fn assert_alive(fw: &mut Floodwall) {
    if let Ok(Some(status)) = fw.child.try_wait() {
        panic!("floodwall exited ({status}):\n{}", fw.logs());
    }
}

async fn gauges_back_to_zero(fw: &Floodwall) {
    fw.wait_metrics("in-flight gauges back to 0", |m| {
        GAUGES.iter().all(|g| family_sum(m, g) == 0.0)
    })
    .await;
}

/// Warm up with `make`'s traffic, then take the RSS baseline (KiB).
async fn warm_up(fw: &mut Floodwall, deadline: Duration, make: MakeReq) -> u64 {
    let records = run_load(
        fw.addr,
        Instant::now(),
        Duration::from_millis(1500),
        deadline,
        make,
    )
    .await;
    assert_all(fw, &records, "warm-up", |r| r.outcome == Outcome::Ok);
    gauges_back_to_zero(fw).await;
    rss_kib(fw.pid())
}

/// After a scenario: alive, gauges at 0, RSS back near the baseline.
async fn assert_healthy_after(fw: &mut Floodwall, baseline_kib: u64) {
    assert_alive(fw);
    gauges_back_to_zero(fw).await;
    let bound = baseline_kib + baseline_kib / 10 + RSS_SLACK_KIB;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut rss = rss_kib(fw.pid());
    while rss > bound && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss = rss_kib(fw.pid());
    }
    eprintln!("RSS: baseline {baseline_kib} KiB, after {rss} KiB (bound {bound} KiB)");
    assert!(
        rss <= bound,
        "RSS {rss} KiB is over the baseline {baseline_kib} KiB + 10% + {RSS_SLACK_KIB} KiB"
    );
    assert_alive(fw);
}

fn secs(d: Duration, f: f64) -> Duration {
    d.mul_f64(f)
}

// ------------------------------------------------------------- scenarios

/// A policy with a breaker on the backend, retries and a `total` deadline.
fn breaker_policy(backend_url: &str, total: &str, extra_top: &str) -> String {
    format!(
        r#"version: 1
server:
  listen: ["127.0.0.1:0"]
  admin: {{ listen: "127.0.0.1:0" }}
  threads: 2
  grace_period: 1s
{extra_top}backends:
  main:
    endpoints: ["{backend_url}"]
    timeouts: {{ connect: 500ms, response_headers: 2s }}
    circuit_breaker: {{ window: 2s, failure_rate: 50%, min_requests: 5, open_for: 1s, open_for_max: 2s }}
routes:
  - name: chat
    match: {{ path_prefix: / }}
    backend: main
    retry: {{ attempts: 2, backoff: {{ base: 50ms, jitter: none }} }}
    timeouts: {{ total: {total} }}
"#
    )
}

/// The breaker's longest open time (2 s, +10% jitter), plus a margin for a
/// loaded 2-core machine.
const BREAKER_RECOVERY: Duration = Duration::from_millis(2200 + 2000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_and_restarted() {
    let mock = start_mock().await;
    let listen = mock.addr();
    let mut fw = Floodwall::start(&breaker_policy(&mock_url(&mock), "3s", "")).await;
    let deadline = Duration::from_secs(5);
    // Streams trickle, so that some are cut mid-body by the kill.
    let make: MakeReq = Arc::new(|task, i| {
        let kind = plain_or_stream(task, i);
        Req::Chat {
            kind,
            content: "hello".to_string(),
            headers: vec![("x-mock-fault".to_string(), "chunk_delay=20ms".to_string())],
        }
    });
    let baseline = warm_up(&mut fw, deadline, make.clone()).await;

    let d = load_duration();
    let (kill_at, restart_at) = (secs(d, 0.2), secs(d, 0.4));
    let t0 = Instant::now();
    let load = tokio::spawn(run_load(fw.addr, t0, d, deadline, make));
    tokio::time::sleep(kill_at).await;
    let killed = t0.elapsed();
    mock.shutdown().await;
    tokio::time::sleep(restart_at.saturating_sub(t0.elapsed())).await;
    let restarted = t0.elapsed();
    let mock = MockServer::start(MockOptions {
        listen,
        ..MockOptions::default()
    })
    .await
    .expect("mock restarts on the same port");
    let records = load.await.unwrap();
    let rec = recovered_at(&records, restarted);
    report(
        "backend_killed_and_restarted",
        &records,
        &recovery_note(rec.map(|r| r.saturating_sub(restarted)), "the restart"),
    );

    assert_all(&fw, &records, "no failures", |r| match &r.outcome {
        Outcome::Ok => true,
        Outcome::Clean(c) => [
            "upstream_connect_error",
            "upstream_error",
            "upstream_timeout",
            "circuit_open",
        ]
        .contains(&c.as_str()),
        Outcome::StreamError(c) => r.kind == Kind::Stream && c == "upstream_stream_error",
        Outcome::Failure(_) => false,
    });
    assert_all(&fw, &records, "no hang past the deadline", |r| {
        r.took < deadline
    });
    // Before the kill, everything succeeds.
    assert_all(&fw, &records, "successes before the kill", |r| {
        r.at + r.took >= killed || r.outcome == Outcome::Ok
    });
    assert!(
        records
            .iter()
            .any(|r| r.at >= killed && r.at < restarted && r.outcome != Outcome::Ok),
        "the kill was not noticed: {}",
        summary(&records)
    );
    let rec = rec.expect("success rate never recovered");
    assert!(
        rec <= restarted + BREAKER_RECOVERY,
        "success rate back to 95% only {:?} after the restart",
        rec - restarted
    );
    assert!(mock.stats().requests > 0);
    assert_healthy_after(&mut fw, baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_ten_times_slower() {
    let mock = start_mock().await;
    let fast = FaultScript::parse("latency=80ms").unwrap();
    let slow = FaultScript::parse("latency=800ms").unwrap();
    mock.set_defaults(fast.clone());
    let total = Duration::from_millis(500);
    let mut fw = Floodwall::start(&breaker_policy(&mock_url(&mock), "500ms", "")).await;
    let deadline = total + Duration::from_secs(2);
    let baseline = warm_up(&mut fw, deadline, simple("hello")).await;

    let d = load_duration();
    let t0 = Instant::now();
    let load = tokio::spawn(run_load(fw.addr, t0, d, deadline, simple("hello")));
    tokio::time::sleep(secs(d, 0.2)).await;
    let slow_from = t0.elapsed();
    mock.set_defaults(slow);
    tokio::time::sleep(secs(d, 0.45).saturating_sub(t0.elapsed())).await;
    let slow_until = t0.elapsed();
    mock.set_defaults(fast);
    let records = load.await.unwrap();
    let rec = recovered_at(&records, slow_until);
    report(
        "backend_ten_times_slower",
        &records,
        &recovery_note(
            rec.map(|r| r.saturating_sub(slow_until)),
            "the slowness ended",
        ),
    );

    assert_all(&fw, &records, "no failures", |r| match &r.outcome {
        Outcome::Ok => true,
        Outcome::Clean(c) => c == "upstream_timeout" || c == "circuit_open",
        _ => false,
    });
    // timeouts.total bounds every answer (plus scheduling slack).
    assert_all(&fw, &records, "no answer later than timeouts.total", |r| {
        r.outcome == Outcome::Ok || r.took < total + Duration::from_millis(700)
    });
    assert!(
        records
            .iter()
            .any(|r| r.outcome == Outcome::Clean("upstream_timeout".into())),
        "no upstream_timeout while slow: {}",
        summary(&records)
    );
    assert!(records
        .iter()
        .filter(|r| r.at + r.took < slow_from)
        .all(|r| r.outcome == Outcome::Ok));
    let rec = rec.expect("success rate never recovered");
    assert!(
        rec <= slow_until + total + BREAKER_RECOVERY,
        "success rate back to 95% only {:?} after the slowness ended",
        rec - slow_until
    );
    assert_healthy_after(&mut fw, baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted() {
    let mock = start_mock().await;
    let redis = RedisServer::start();
    let port = redis.port;
    let top = format!(
        "store:\n  redis: {{ url: \"{}\", key_prefix: fw-chaos, timeout: 100ms }}\n  cache: {{ max_memory: 1MiB }}\nrate_limits:\n  - {{ name: cap, key: [global], limits: [{{ requests: 10000000, per: 1m }}], on_store_error: fail_open }}\n",
        redis.url()
    );
    let text = breaker_policy(&mock_url(&mock), "3s", &top).replace(
        "    timeouts: { total: 3s }\n",
        "    timeouts: { total: 3s }\n    cache: { ttl: 1m, scope: shared, store: tiered }\n",
    );
    let mut fw = Floodwall::start(&text).await;
    let deadline = Duration::from_secs(5);
    // Half repeated prompts (hits), half unique ones (misses and stores).
    let make: MakeReq = Arc::new(|task, i| Req::Chat {
        kind: plain_or_stream(task, i),
        content: if i % 2 == 0 {
            format!("repeated {}", i % 8)
        } else {
            format!("unique {task} {i} {:?}", Instant::now())
        },
        headers: Vec::new(),
    });
    let baseline = warm_up(&mut fw, deadline, make.clone()).await;

    let d = load_duration();
    let t0 = Instant::now();
    let load = tokio::spawn(run_load(fw.addr, t0, d, deadline, make.clone()));
    tokio::time::sleep(secs(d, 0.2)).await;
    drop(redis);
    tokio::time::sleep(secs(d, 0.575).saturating_sub(t0.elapsed())).await;
    let m_down = fw.metrics().await;
    let _redis = RedisServer::start_on(port);
    let records = load.await.unwrap();
    report(
        "redis_killed_then_restarted",
        &records,
        "every request succeeded through the outage (rate limit failed open, cache missed)",
    );

    assert_all(&fw, &records, "every request succeeds", |r| {
        r.outcome == Outcome::Ok && r.took < deadline
    });
    let store_errors = "floodwall_limiter_store_errors_total{op=\"check\"}";
    let failed_open = "floodwall_ratelimit_decisions_total{result=\"failed_open\",rule=\"cap\"}";
    let allowed = "floodwall_ratelimit_decisions_total{result=\"allowed\",rule=\"cap\"}";
    assert!(
        metric(&m_down, failed_open).unwrap_or(0.0) > 0.0,
        "the outage was not noticed: {m_down}"
    );
    // Redis is used again: decisions are made by Redis with no new errors.
    eventually("Redis to be used again", Duration::from_secs(15), || {
        let (fw, make) = (&fw, make.clone());
        async move {
            let before = fw.metrics().await;
            let r = run_load(
                fw.addr,
                Instant::now(),
                Duration::from_millis(300),
                deadline,
                make,
            )
            .await;
            assert!(r.iter().all(|r| r.outcome == Outcome::Ok));
            let after = fw.metrics().await;
            let delta =
                |s: &str| metric(&after, s).unwrap_or(0.0) - metric(&before, s).unwrap_or(0.0);
            (delta(store_errors) == 0.0 && delta(failed_open) == 0.0 && delta(allowed) > 0.0)
                .then_some(())
        }
    })
    .await;
    assert_healthy_after(&mut fw, baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_hot_reloads_under_load() {
    const OK: &str = "floodwall_config_reloads_total{result=\"ok\"}";
    const ERROR: &str = "floodwall_config_reloads_total{result=\"error\"}";
    let mock = start_mock().await;
    let rule = |n: u32| {
        format!(
            "rate_limits:\n  - {{ name: cap, key: [global], limits: [{{ requests: {n}, per: 1m }}] }}\n"
        )
    };
    let a = breaker_policy(&mock_url(&mock), "3s", &rule(10_000_000));
    let b = breaker_policy(&mock_url(&mock), "4s", &rule(20_000_000));
    let invalid = b.replace("threads: 2", "threads: 0");
    let mut fw = Floodwall::start(&a).await;
    let deadline = Duration::from_secs(6);
    let baseline = warm_up(&mut fw, deadline, simple("hello")).await;

    let d = load_duration();
    let m0 = fw.metrics().await;
    let (ok0, err0) = (
        metric(&m0, OK).unwrap_or(0.0),
        metric(&m0, ERROR).unwrap_or(0.0),
    );
    let t0 = Instant::now();
    let load = tokio::spawn(run_load(fw.addr, t0, d, deadline, simple("hello")));
    // 20 valid reloads spread over 80% of the load, an invalid one in the middle.
    let spacing = secs(d, 0.8) / 21;
    let (mut oks, mut errs) = (0.0, 0.0);
    for k in 0..21u32 {
        tokio::time::sleep((spacing * k).saturating_sub(t0.elapsed())).await;
        if k == 10 {
            fw.write_policy(&invalid);
            errs += 1.0;
        } else {
            fw.write_policy(if (oks as u32).is_multiple_of(2) {
                &b
            } else {
                &a
            });
            oks += 1.0;
        }
        fw.wait_metrics(&format!("reload {k} to be counted"), |m| {
            metric(m, OK).unwrap_or(0.0) == ok0 + oks
                && metric(m, ERROR).unwrap_or(0.0) == err0 + errs
        })
        .await;
    }
    let records = load.await.unwrap();
    report(
        "twenty_hot_reloads_under_load",
        &records,
        &format!(
            "21 reloads (one invalid, refused) in {:.1} s",
            t0.elapsed().as_secs_f64()
        ),
    );
    assert_all(&fw, &records, "no request failed by a reload", |r| {
        r.outcome == Outcome::Ok && r.took < deadline
    });
    let m = fw.metrics().await;
    assert_eq!(metric(&m, OK), Some(ok0 + 20.0), "{m}");
    assert_eq!(metric(&m, ERROR), Some(err0 + 1.0), "{m}");
    assert_healthy_after(&mut fw, baseline).await;
}

// ------------------------------------------------------ malformed traffic

/// Send one malformed request; `Ok` when floodwall handled it as
/// documented (see docs/chaos.md).
async fn malformed(addr: SocketAddr, m: Malformed, deadline: Duration) -> Outcome {
    let head = |len: usize, extra: &str| {
        format!(
            "POST {CHAT} HTTP/1.1\r\nhost: chaos\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n{extra}\r\n"
        )
    };
    let good = chat_body("hello", false).to_string();
    match m {
        Malformed::TruncatedJson | Malformed::InvalidUtf8 => {
            let body: Vec<u8> = match m {
                Malformed::TruncatedJson => good.as_bytes()[..good.len() / 2].to_vec(),
                _ => {
                    // `"hello"` becomes `"h\xffllo"`: not UTF-8.
                    let mut b = good.clone().into_bytes();
                    let at = good.find("hello").expect("content") + 1;
                    b[at] = 0xff;
                    b
                }
            };
            let mut raw = head(body.len(), "").into_bytes();
            raw.extend_from_slice(&body);
            match classify(Kind::Plain, exchange(addr, &raw, deadline).await) {
                Outcome::Clean(c) if c == "invalid_json" => Outcome::Ok,
                other => Outcome::Failure(format!("{m:?}: {other:?}")),
            }
        }
        Malformed::HugeHeader => {
            // Over server.max_request_header_size (64 KiB by default):
            // floodwall answers 431 and closes as soon as the head passes the
            // limit (or the connection is reset while we still write).
            let big = format!("x-huge: {}\r\n", "a".repeat(1100 * 1024));
            let mut raw = head(good.len(), &big).into_bytes();
            raw.extend_from_slice(good.as_bytes());
            match exchange(addr, &raw, deadline).await {
                Ok(r)
                    if r.status == 431
                        && r.header("x-floodwall-reason") == Some("header_too_large") =>
                {
                    Outcome::Ok
                }
                Ok(r) => Outcome::Failure(format!(
                    "huge header: status {}, reason {:?}",
                    r.status,
                    r.header("x-floodwall-reason")
                )),
                Err(e) if e.starts_with("no complete response head (0 bytes") => Outcome::Ok,
                Err(e) => Outcome::Failure(format!("huge header: {e}")),
            }
        }
        Malformed::ShortBody => {
            // Declare 1000 bytes, send 100, then give up: floodwall must not
            // hang nor leak (checked by the gauges afterwards).
            let work = async {
                let mut s = TcpStream::connect(addr).await.ok()?;
                let mut raw = head(1000, "").into_bytes();
                raw.extend_from_slice(&[b' '; 100]);
                s.write_all(&raw).await.ok()?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                drop(s);
                Some(())
            };
            match tokio::time::timeout(deadline, work).await {
                Ok(Some(())) => Outcome::Ok,
                Ok(None) => Outcome::Failure("short body: connect or write failed".into()),
                Err(_) => Outcome::Failure("short body: hang".into()),
            }
        }
    }
}

/// A client that trickles its request head one byte at a time, forever (up
/// to `bound`); returns whether floodwall closed the connection, and when.
async fn slow_loris(addr: SocketAddr, gap: Duration, bound: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut head = format!("POST {CHAT} HTTP/1.1\r\nhost: chaos\r\n").into_bytes();
    let mut n = 0u64;
    while started.elapsed() < bound {
        if head.is_empty() {
            head = format!("x-loris-{n}: {n}\r\n").into_bytes();
            n += 1;
        }
        let b = head.remove(0);
        if s.write_all(&[b]).await.is_err() {
            return Some(started.elapsed());
        }
        // A closed connection shows as a readable EOF.
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(gap, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_traffic_at_ten_percent() {
    let mock = start_mock().await;
    let mut fw = Floodwall::start(&breaker_policy(&mock_url(&mock), "3s", "")).await;
    let deadline = Duration::from_secs(5);
    let baseline = warm_up(&mut fw, deadline, simple("hello")).await;

    let d = load_duration();
    // Slow-loris clients for the whole run: they must not block the others.
    let lorises: Vec<_> = (0..4)
        .map(|_| {
            let addr = fw.addr;
            tokio::spawn(async move { slow_loris(addr, Duration::from_millis(100), d).await })
        })
        .collect();
    let make: MakeReq = Arc::new(|task, i| {
        if i % 10 == 9 {
            let kinds = [
                Malformed::TruncatedJson,
                Malformed::HugeHeader,
                Malformed::InvalidUtf8,
                Malformed::ShortBody,
            ];
            Req::Malformed(kinds[(task + (i / 10) as usize) % kinds.len()])
        } else {
            Req::Chat {
                kind: plain_or_stream(task, i),
                content: "hello".to_string(),
                headers: Vec::new(),
            }
        }
    });
    let records = run_load(fw.addr, Instant::now(), d, deadline, make).await;
    report(
        "malformed_traffic_at_ten_percent",
        &records,
        "malformed requests are counted as ok when answered as documented",
    );
    assert_all(&fw, &records, "malformed traffic handled cleanly", |r| {
        r.outcome == Outcome::Ok && r.took < deadline
    });
    let malformed_count = records.len() / 10;
    assert!(
        malformed_count >= 8,
        "too few malformed requests: {}",
        records.len()
    );
    for l in lorises {
        let closed = l.await.unwrap();
        eprintln!("slow-loris connection closed by floodwall: {closed:?}");
    }
    assert_healthy_after(&mut fw, baseline).await;
}

/// A client trickling its request head is disconnected at
/// `server.request_header_timeout` (10 s by default), however steadily it
/// sends: Pingora's own read timeout (60 s) applies to each read, not to the
/// whole head; floodwall's connection guard bounds the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_connection_is_closed_by_floodwall() {
    let mock = start_mock().await;
    let mut fw = Floodwall::start(&breaker_policy(&mock_url(&mock), "3s", "")).await;
    let bound = Duration::from_secs(15);
    let closed = slow_loris(fw.addr, Duration::from_millis(200), bound).await;
    assert_alive(&mut fw);
    report(
        "slow_loris_connection_is_closed_by_floodwall",
        &[],
        &closed.map_or("never closed".to_string(), |c| {
            format!(
                "closed after {:.1} s (request_header_timeout 10 s)",
                c.as_secs_f64()
            )
        }),
    );
    let closed = closed.unwrap_or_else(|| {
        panic!("floodwall kept a slow-loris connection open for {bound:?} (one header byte every 200 ms)")
    });
    assert!(
        closed >= Duration::from_millis(9_500),
        "closed before the 10 s header deadline: {closed:?}"
    );
}
