//! Micro-benchmarks of floodwall's per-request decisions (see BENCHMARKS.md):
//!
//! - rate-limit decisions (`Limiter::check`) in memory: one rule with one
//!   window; three rules (per-user 3 windows, a global rule, a token rule) on
//!   one thread and on two threads sharing the limiter; the refusal path;
//!   check + reconcile of the token reservation;
//! - the same through Redis (a private `redis-server` on a free port, killed
//!   at the end): sequential (one decision at a time) and 64 concurrent tasks
//!   (pipelined on the one multiplexed connection), next to a bare `PING`
//!   through the same client and a raw `PING` on a blocking socket;
//! - the circuit breaker's `try_acquire` + `record` (closed), the retry
//!   `delay()` arithmetic, the retry budget's per-request `deposit`, and SSE
//!   scanning per chunk;
//! - queue admission: `ConcurrencyLimiter::acquire` + the `Slot`'s drop on
//!   an uncontended route (the copilot-agent route's limits: 10 in flight,
//!   3 per identity, a 3-class queue), on one and two threads;
//! - the response cache: the key of a ~1.2 KB chat body (canonical JSON +
//!   SHA-256; benches/cache-body.json, the body benches/cache.sh sends), a
//!   memory-tier hit and insert on a tier of 10,000 entries, a miss's flight
//!   (join as leader, publish, complete), an entry's encoding for Redis and
//!   its decoding, and a cache hit through Redis (`CacheStore::get`, GET +
//!   decode) next to a `PING` through the same client.
//!
//! Every figure is the median [min-max] of 5 rounds (the rounds are
//! interleaved across the items, so drift on a shared machine is spread).
//!
//! ```sh
//! cargo bench --bench decisions                 # full: 5 rounds (~3 min)
//! cargo bench --bench decisions -- --quick      # 1 short round (~15 s)
//! cargo bench --bench decisions -- --rounds 3 --no-redis
//! ```
//!
//! Plain `std::time::Instant` loops with `std::hint::black_box`; no
//! benchmark framework.

use std::future::Future;
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::PathBuf;
use std::pin::pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use floodwall::config::limits::Prices;
use floodwall::config::{compile_str, RedisConfig, Snapshot};
use floodwall::policy::breaker::{Admission, Breaker, BreakerConfig, CallOutcome};
use floodwall::policy::cache::flight::Head;
use floodwall::policy::cache::key::{canonical_json, Body};
use floodwall::policy::cache::lru::Lookup;
use floodwall::policy::cache::{
    CacheKey, CacheStoreConfig, Chunk, Entry, Flights, Join, KeyParts, MemoryTier, StoreKind,
};
use floodwall::policy::concurrency::{
    ConcurrencyConfig, ConcurrencyLimiter, PriorityConfig, QueueConfig,
};
use floodwall::policy::identity::Identity;
use floodwall::policy::ratelimit::{LimitRequest, Limiter, Usage};
use floodwall::policy::retry::{BudgetConfig, Delay, Failure, RetryBudget, RetryPolicy};
use floodwall::proxy::sse::SseScanner;
use floodwall::request::LlmFields;
use floodwall::store::cache::CacheStore;
use floodwall::store::RedisStore;

// --- options ----------------------------------------------------------------

struct Opts {
    rounds: usize,
    /// Length of one throughput or latency pass of a CPU-bound item.
    cpu_pass: Duration,
    /// Length of one pass through Redis.
    redis_pass: Duration,
    redis: bool,
    quick: bool,
    /// Run only the items whose name contains this (for profiling).
    only: Option<String>,
}

/// Set by `new_item` when `--only` excludes the item: the measuring
/// functions then return no figures at once.
static SKIP: AtomicBool = AtomicBool::new(false);

fn skipped() -> bool {
    SKIP.load(Ordering::Relaxed)
}

fn opts() -> Opts {
    let mut o = Opts {
        rounds: 5,
        cpu_pass: Duration::from_millis(400),
        redis_pass: Duration::from_millis(1500),
        redis: true,
        quick: false,
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => {
                o.quick = true;
                o.rounds = 1;
                o.cpu_pass = Duration::from_millis(100);
                o.redis_pass = Duration::from_millis(300);
            }
            "--rounds" => {
                o.rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n >= 1)
                    .expect("--rounds takes a whole number >= 1")
            }
            "--no-redis" => o.redis = false,
            "--only" => o.only = Some(args.next().expect("--only takes a substring of item names")),
            // `cargo bench` passes `--bench`; ignore it and anything unknown.
            _ => {}
        }
    }
    o
}

// --- statistics -------------------------------------------------------------

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One round's figures of one item: named values.
type Figures = Vec<(&'static str, f64)>;

struct Item {
    group: &'static str,
    name: String,
    /// Round by round.
    rounds: Vec<Figures>,
    notes: Vec<String>,
}

fn med_min_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[0], v[n - 1])
}

fn fmt_num(x: f64) -> String {
    if x >= 100_000.0 {
        let s = format!("{:.0}", x);
        // thousands separators (thin space would be nicer; keep ASCII)
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if x >= 100.0 {
        format!("{:.0}", x)
    } else if x >= 10.0 {
        format!("{:.1}", x)
    } else {
        format!("{:.2}", x)
    }
}

fn cell(item: &Item, key: &str) -> String {
    let v: Vec<f64> = item
        .rounds
        .iter()
        .filter_map(|r| r.iter().find(|(k, _)| *k == key).map(|(_, v)| *v))
        .collect();
    if v.is_empty() {
        return "-".into();
    }
    let (med, min, max) = med_min_max(v.clone());
    if v.len() == 1 {
        fmt_num(med)
    } else {
        format!("{} [{}-{}]", fmt_num(med), fmt_num(min), fmt_num(max))
    }
}

fn median_of(item: &Item, key: &str) -> Option<f64> {
    let v: Vec<f64> = item
        .rounds
        .iter()
        .filter_map(|r| r.iter().find(|(k, _)| *k == key).map(|(_, v)| *v))
        .collect();
    (!v.is_empty()).then(|| med_min_max(v).0)
}

// --- helpers ----------------------------------------------------------------

/// Polls a future that must not wait (the in-memory limiter never does).
fn now_or_never<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("an in-memory decision waited"),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs `op` on `threads` threads for `pass` (untimed: throughput), then
/// again timing every call (latency). `make(thread)` builds each thread's
/// operation; `op(i)` is called with a running counter. Returns
/// (ops per second over all threads, mean ns per op per thread, p50 ns, p99 ns).
fn cpu_item<M, F>(threads: usize, pass: Duration, make: M) -> Figures
where
    M: Fn(usize) -> F + Sync,
    F: FnMut(u64),
{
    const BATCH: u64 = 256;
    if skipped() {
        return Vec::new();
    }
    // Throughput.
    let barrier = Barrier::new(threads);
    let counts: Vec<(u64, Duration)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, make) = (&barrier, &make);
                s.spawn(move || {
                    let mut op = make(t);
                    for i in 0..BATCH {
                        op(i); // warm-up
                    }
                    barrier.wait();
                    let start = Instant::now();
                    let mut n = 0u64;
                    loop {
                        for _ in 0..BATCH {
                            op(n);
                            n += 1;
                        }
                        if start.elapsed() >= pass {
                            break;
                        }
                    }
                    (n, start.elapsed())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ops_per_s: f64 = counts
        .iter()
        .map(|(n, d)| *n as f64 / d.as_secs_f64())
        .sum();
    let mean_ns: f64 = counts
        .iter()
        .map(|(n, d)| d.as_nanos() as f64 / *n as f64)
        .sum::<f64>()
        / threads as f64;
    // Latency: every call timed.
    let barrier = Barrier::new(threads);
    let mut lat: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, make) = (&barrier, &make);
                s.spawn(move || {
                    let mut op = make(t);
                    for i in 0..BATCH {
                        op(i);
                    }
                    let mut lat = Vec::with_capacity(1 << 20);
                    barrier.wait();
                    let start = Instant::now();
                    let mut n = 0u64;
                    while start.elapsed() < pass {
                        for _ in 0..BATCH {
                            let t0 = Instant::now();
                            op(n);
                            lat.push(t0.elapsed().as_nanos() as u64);
                            n += 1;
                        }
                    }
                    lat
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    lat.sort_unstable();
    vec![
        ("ops_s", ops_per_s),
        ("mean_ns", mean_ns),
        ("p50_ns", percentile(&lat, 0.5) as f64),
        ("p99_ns", percentile(&lat, 0.99) as f64),
    ]
}

// --- rate-limit fixtures -----------------------------------------------------

const USERS: usize = 10_000;

fn policy(rules: &str) -> Snapshot {
    let text = format!(
        "version: 1
identity:
  user: [{{ header: x-user-id }}]
backends:
  b: {{ endpoints: [\"http://127.0.0.1:9\"] }}
routes:
  - name: chat
    match: {{ path_prefix: / }}
    backend: b
    rate_limits:
{rules}"
    );
    compile_str(&text, "bench.yaml").unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// One rule, one window. The limit is high enough that every decision is
/// admitted (GCRA's arithmetic does not depend on the numbers).
fn one_rule() -> Snapshot {
    policy("      - { name: per-user, key: [user], limits: [{ requests: 1000000000, per: 1m }] }\n")
}

/// Three rules: per-user with three windows (the shape of 10/min + 100/h +
/// 500/day), a global request rule and a global token rule. Limits high
/// enough that every decision is admitted and every window is evaluated and
/// charged.
fn three_rules() -> Snapshot {
    policy(
        "      - name: per-user
        key: [user]
        limits:
          - { requests: 1000000000, per: 1m }
          - { requests: 1000000000, per: 1h }
          - { requests: 1000000000, per: 1d }
      - { name: global, key: [global], limits: [{ requests: 1000000000, per: 1m }] }
      - { name: tokens, key: [global], limits: [{ tokens: 10000000000, per: 1m }] }
",
    )
}

/// The literal 10/min + 100/h + 500/day rule, for the refusal path.
fn strict_rule() -> Snapshot {
    policy(
        "      - name: per-user
        key: [user]
        limits:
          - { requests: 10, per: 1m }
          - { requests: 100, per: 1h }
          - { requests: 500, per: 1d }
",
    )
}

struct Fixture {
    identities: Vec<Identity>,
    llm: LlmFields,
    headers: http::HeaderMap,
    prices: Prices,
}

fn fixture(users: usize) -> Fixture {
    let ip: IpAddr = "198.51.100.7".parse().unwrap();
    Fixture {
        identities: (0..users)
            .map(|i| {
                let mut id = Identity::anonymous(Some(ip), "free");
                id.user = Some(format!("user-{i:05}"));
                id
            })
            .collect(),
        // The load benchmark's request: max_tokens 16, ~80 prompt characters.
        llm: LlmFields {
            model: Some("mock-model".into()),
            max_tokens: Some(16),
            prompt_chars: 80,
            message_count: 2,
            ..Default::default()
        },
        headers: http::HeaderMap::new(),
        prices: Prices::default(),
    }
}

impl Fixture {
    fn request(&self, i: u64) -> LimitRequest<'_> {
        LimitRequest {
            identity: &self.identities[i as usize % self.identities.len()],
            route: "chat",
            path: "/v1/chat/completions",
            headers: &self.headers,
            llm: Some(&self.llm),
            prices: &self.prices,
        }
    }
}

/// A memory decision loop for `cpu_item`. `now_ms` is the wall clock,
/// re-read every 64 decisions (the proxy reads it once per request).
fn memory_op<'a>(
    limiter: &'a Limiter,
    snap: &'a Snapshot,
    fx: &'a Fixture,
    thread: usize,
    expect_allowed: bool,
    reconcile: bool,
) -> impl FnMut(u64) + 'a {
    let rules = snap.limits.rules_for(0);
    let mut now = unix_ms();
    // Each thread walks its own half of the users.
    let offset = (thread * fx.identities.len() / 2) as u64;
    move |i| {
        if i % 64 == 0 {
            now = unix_ms();
        }
        let d = now_or_never(limiter.check(rules, &fx.request(offset + i), now));
        if d.allowed != expect_allowed {
            panic!("unexpected decision: allowed = {}", d.allowed);
        }
        if reconcile {
            if let Some(r) = d.reservation {
                let usage = Usage {
                    input_tokens: 20,
                    output_tokens: 16,
                };
                now_or_never(limiter.reconcile(r, usage, now)).unwrap();
            }
        } else {
            black_box(d);
        }
    }
}

// --- Redis ----------------------------------------------------------------------

/// A private `redis-server` on a free port; killed on drop (also on panic).
struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl RedisServer {
    fn start() -> Result<RedisServer, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("no free port: {e}"))?;
        let dir = std::env::temp_dir().join(format!(
            "floodwall-bench-redis-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir: {e}"))?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot start redis-server ({e}); apt-get install redis-server")
            })?;
        let server = RedisServer {
            child: Some(child),
            port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while raw_ping(port).is_err() {
            if Instant::now() > deadline {
                return Err(format!("redis-server did not answer on port {port}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    fn version() -> String {
        Command::new("redis-server")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| {
                s.split_whitespace()
                    .find(|w| w.starts_with("v="))
                    .map(|w| w[2..].to_string())
            })
            .unwrap_or_else(|| "?".into())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn raw_ping(port: u16) -> std::io::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n")?;
    s.read_exact(&mut buf)?;
    Ok(())
}

/// CPU time (ns) a process has used, from /proc/PID/task/*/schedstat.
fn proc_cpu_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

fn self_cpu_ns() -> u64 {
    proc_cpu_ns(std::process::id())
}

/// The server's `total_reads_processed` and `total_writes_processed`
/// (`INFO stats`): how many times it read a batch of commands from a client
/// and wrote replies back. For a sequential caller, one of each per
/// decision means one round trip, however many commands the batch held.
/// (The INFO call itself counts one of each; the caller subtracts it.)
fn server_io(port: u16) -> (u64, u64) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, 0);
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"*2\r\n$4\r\nINFO\r\n$5\r\nstats\r\n").is_err() {
        return (0, 0);
    }
    let mut text = Vec::new();
    let mut buf = [0u8; 8192];
    // A bulk string: `$<len>\r\n<len bytes>\r\n`.
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
        }
        let header_end = text.windows(2).position(|w| w == b"\r\n");
        if let Some(h) = header_end {
            let len: usize = std::str::from_utf8(&text[1..h])
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if text.len() >= h + 2 + len {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&text);
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (
        get("total_reads_processed:"),
        get("total_writes_processed:"),
    )
}

/// Latency figures from per-call samples plus the throughput.
fn latency_figures(mut lat: Vec<u64>, ops: u64, elapsed: Duration) -> Figures {
    lat.sort_unstable();
    vec![
        ("ops_s", ops as f64 / elapsed.as_secs_f64()),
        ("p50_ns", percentile(&lat, 0.5) as f64),
        ("p99_ns", percentile(&lat, 0.99) as f64),
    ]
}

/// `tasks` concurrent tasks run `op` until `pass` is over; every call timed.
/// Returns throughput and latency, plus the client's and the server's CPU
/// per operation.
async fn redis_item<F, Fut>(
    tasks: usize,
    pass: Duration,
    server_pid: u32,
    port: u16,
    op: F,
) -> Figures
where
    F: Fn(u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = bool> + Send,
{
    if skipped() {
        return Vec::new();
    }
    let start = Instant::now();
    let (c0, s0, io0) = (self_cpu_ns(), proc_cpu_ns(server_pid), server_io(port));
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1 << 16);
                let mut bad = 0u64;
                let mut i = (t as u64) << 32;
                while start.elapsed() < pass {
                    let t0 = Instant::now();
                    let ok = op(i).await;
                    lat.push(t0.elapsed().as_nanos() as u64);
                    bad += u64::from(!ok);
                    i += 1;
                }
                (lat, bad)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut bad = 0;
    for h in handles {
        let (l, b) = h.await.unwrap();
        lat.extend(l);
        bad += b;
    }
    let elapsed = start.elapsed();
    let (c1, s1, io1) = (self_cpu_ns(), proc_cpu_ns(server_pid), server_io(port));
    let ops = lat.len() as u64;
    let mut f = latency_figures(lat, ops, elapsed);
    f.push(("client_cpu_ns", (c1 - c0) as f64 / ops as f64));
    f.push(("server_cpu_ns", (s1 - s0) as f64 / ops as f64));
    f.push((
        "reads",
        (io1.0 - io0.0).saturating_sub(1) as f64 / ops as f64,
    ));
    f.push((
        "writes",
        (io1.1 - io0.1).saturating_sub(1) as f64 / ops as f64,
    ));
    f.push(("bad", bad as f64));
    f
}

// --- SSE fixture ------------------------------------------------------------

/// A mock-like chat completion stream: role, 8 content chunks, stop, usage,
/// `[DONE]`; one event per element.
fn sse_events() -> Vec<Vec<u8>> {
    let head = r#"{"id":"chatcmpl-bench0001","object":"chat.completion.chunk","created":1700000000,"model":"mock-model","system_fingerprint":"fp_mock","choices":"#;
    let mut ev = Vec::new();
    let mut push = |json: String| ev.push(format!("data: {json}\n\n").into_bytes());
    push(format!(
        r#"{head}[{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}]}}"#
    ));
    for w in [
        "Hello",
        " there,",
        " load",
        " benchmark",
        "!",
        " How",
        " are",
        " you?",
    ] {
        push(format!(
            r#"{head}[{{"index":0,"delta":{{"content":"{w}"}},"logprobs":null,"finish_reason":null}}]}}"#
        ));
    }
    push(format!(
        r#"{head}[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"stop"}}]}}"#
    ));
    push(format!(
        r#"{head}[],"usage":{{"prompt_tokens":20,"completion_tokens":8,"total_tokens":28}}}}"#
    ));
    ev.push(b"data: [DONE]\n\n".to_vec());
    ev
}

// --- cache fixtures -----------------------------------------------------------

/// The chat request of the cache load benchmark (benches/cache.sh): a system
/// prompt with two documentation excerpts, two user turns, one assistant turn.
const CHAT_BODY: &str = include_str!("cache-body.json");

/// Entries in the populated memory tier.
const TIER_ENTRIES: usize = 10_000;

fn chat_doc() -> serde_json::Value {
    serde_json::from_str(CHAT_BODY.trim()).expect("benches/cache-body.json is JSON")
}

/// The key of a chat request as a `scope: user` route computes it: an
/// `Authorization` header (hashed into the key) and a user id.
fn chat_key(body: Body<'_>) -> CacheKey {
    CacheKey::compute(&KeyParts {
        route: "chat",
        method: "POST",
        path_and_query: "/v1/chat/completions",
        headers: Vec::new(),
        authorization: Some(b"Bearer sk-bench-00000000000000000000000000000000"),
        identity: Some(Some("bench-user-1")),
        body,
        ignore_fields: &[],
    })
}

/// A stored non-streaming chat answer of about the mock's size.
fn chat_entry(now_ms: u64) -> Entry {
    let body: &'static [u8] = br#"{"id":"chatcmpl-bench0001","object":"chat.completion","created":1700000000,"model":"mock-model","system_fingerprint":"fp_mock","choices":[{"index":0,"message":{"role":"assistant","content":"Stopping and starting an instance within the same hour is billed as one hour."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":262,"completion_tokens":17,"total_tokens":279}}"#;
    Entry {
        status: 200,
        headers: vec![
            ("content-type".into(), b"application/json".to_vec()),
            ("x-mock-server".into(), b"floodwall-mock".to_vec()),
        ],
        chunks: vec![Chunk {
            at_ms: 0,
            data: bytes::Bytes::from_static(body),
        }],
        sse: false,
        stored_at_ms: now_ms,
        ttl_ms: 3_600_000,
        keep_ms: 3_600_000,
    }
}

/// xorshift64: a cheap spread of indices over the tier.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

// --- main -------------------------------------------------------------------

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn main() {
    let o = opts();
    let load_before = loadavg();
    let started = Instant::now();
    eprintln!(
        "[decisions] {} round(s), {:?} per CPU pass, {:?} per Redis pass; load average {load_before}",
        o.rounds, o.cpu_pass, o.redis_pass
    );

    let one = one_rule();
    let three = three_rules();
    let strict = strict_rule();
    let fx = fixture(USERS);
    let fx_single = fixture(1);

    let mut items: Vec<Item> = Vec::new();
    let only = o.only.clone();
    let new_item = |items: &mut Vec<Item>, group: &'static str, name: &str| -> usize {
        SKIP.store(
            only.as_deref().is_some_and(|f| !name.contains(f)),
            Ordering::Relaxed,
        );
        if let Some(i) = items.iter().position(|it| it.name == name) {
            return i;
        }
        items.push(Item {
            group,
            name: name.to_string(),
            rounds: Vec::new(),
            notes: Vec::new(),
        });
        items.len() - 1
    };

    // Redis: the server, a runtime with 2 workers (like the proxy), limiters.
    let redis = if o.redis {
        match RedisServer::start() {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("[decisions] skipping Redis: {e}");
                None
            }
        }
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let redis_limiter = redis.as_ref().map(|s| {
        let config = RedisConfig {
            url: format!("redis://127.0.0.1:{}/0", s.port),
            key_prefix: "fwbench".into(),
            // Generous, so that a scheduling hiccup on a loaded machine is
            // counted as a slow decision instead of a fail-open fallback.
            timeout: Duration::from_secs(1),
            expected_replicas: 1,
        };
        Arc::new(Limiter::with_redis(RedisStore::new(&config).unwrap(), 1))
    });
    let redis_fx = Arc::new(fixture(USERS));
    let (one_arc, three_arc) = (Arc::new(one_rule()), Arc::new(three_rules()));
    if let Some(l) = &redis_limiter {
        // Connect and load the script before measuring.
        rt.block_on(async {
            let rules = three_arc.limits.rules_for(0);
            for i in 0..2000u64 {
                let d = l.check(rules, &redis_fx.request(i), unix_ms()).await;
                assert!(d.allowed && !d.fallback, "Redis warm-up decision: {d:?}");
                let d = l
                    .check(one_arc.limits.rules_for(0), &redis_fx.request(i), unix_ms())
                    .await;
                assert!(d.allowed && !d.fallback, "Redis warm-up decision: {d:?}");
            }
        });
    }

    // The response cache's memory tier, populated with TIER_ENTRIES chat
    // answers under realistic keys; and a Redis-backed cache store (sharing
    // the limiter's client, as the proxy does) holding the chat answer.
    let doc = chat_doc();
    let tier_keys: Vec<String> = (0..TIER_ENTRIES as u64)
        .map(|i| chat_key(Body::Raw(&i.to_le_bytes())).as_str().to_string())
        .collect();
    let tier = MemoryTier::new(1 << 30);
    let stored = Arc::new(chat_entry(unix_ms()));
    for k in &tier_keys {
        let _ = tier.insert(k.clone(), stored.clone());
    }
    let redis_cache = redis_limiter.as_ref().map(|l| {
        let cs = CacheStore::new(
            &CacheStoreConfig::default(),
            Some(l.redis().unwrap().clone()),
        );
        let key = Arc::new(chat_key(Body::Json(&doc)));
        rt.block_on(async {
            let (_, err) = cs
                .put(StoreKind::Redis, &key, stored.clone(), unix_ms())
                .await;
            assert!(err.is_none(), "storing the cache entry in Redis: {err:?}");
            for _ in 0..200 {
                let (found, err) = cs.get(StoreKind::Redis, &key, unix_ms()).await;
                assert!(matches!(found, Lookup::Fresh(_)) && err.is_none());
            }
        });
        (cs, key)
    });

    for round in 1..=o.rounds {
        eprintln!(
            "[decisions] round {round}/{} (load average {})",
            o.rounds,
            loadavg()
        );
        let pass = o.cpu_pass;

        // Timer overhead: two back-to-back Instant::now() (what each timed
        // call in the latency passes pays on top).
        let i = new_item(&mut items, "timer", "Instant::now() pair (timing overhead)");
        items[i].rounds.push(cpu_item(1, pass, |_| {
            move |_| {
                let t0 = Instant::now();
                black_box(t0.elapsed());
            }
        }));

        // Memory decisions.
        let limiter = Limiter::in_memory();
        let i = new_item(
            &mut items,
            "memory",
            "memory: 1 rule, 1 window (per-user), 1 thread",
        );
        items[i].rounds.push(cpu_item(1, pass, |t| {
            memory_op(&limiter, &one, &fx, t, true, false)
        }));
        let limiter = Limiter::in_memory();
        let i = new_item(
            &mut items,
            "memory",
            "memory: 3 rules (per-user 3 windows + global + tokens), 1 thread",
        );
        items[i].rounds.push(cpu_item(1, pass, |t| {
            memory_op(&limiter, &three, &fx, t, true, false)
        }));
        let limiter = Limiter::in_memory();
        let i = new_item(
            &mut items,
            "memory",
            "memory: 3 rules, 2 threads sharing the limiter (ops/s = both together)",
        );
        items[i].rounds.push(cpu_item(2, pass, |t| {
            memory_op(&limiter, &three, &fx, t, true, false)
        }));
        let limiter = Limiter::in_memory();
        let i = new_item(
            &mut items,
            "memory",
            "memory: 3 rules, check + reconcile (token reservation), 1 thread",
        );
        items[i].rounds.push(cpu_item(1, pass, |t| {
            memory_op(&limiter, &three, &fx, t, true, true)
        }));
        let limiter = Limiter::in_memory();
        // Prime the single user past 10/min, then every decision is refused.
        for _ in 0..20 {
            black_box(now_or_never(limiter.check(
                strict.limits.rules_for(0),
                &fx_single.request(0),
                unix_ms(),
            )));
        }
        let i = new_item(
            &mut items,
            "memory",
            "memory: 10/min + 100/h + 500/day, every decision refused (429 path), 1 thread",
        );
        items[i].rounds.push(cpu_item(1, pass, |t| {
            memory_op(&limiter, &strict, &fx_single, t, false, false)
        }));

        // Queue admission: the copilot-agent route's limiter (10 in flight,
        // 3 per identity, a 3-class queue of 100), uncontended: `acquire`
        // takes the fast path (room, per-identity count) and the Slot's drop
        // gives the place back. The identity rotates over USERS users, so
        // the per-identity count is created and removed each time, as for a
        // user with one request at a time.
        let queue_config = ConcurrencyConfig {
            max_in_flight: Some(10),
            per_identity: Some(3),
            queue: Some(QueueConfig {
                max_depth: 100,
                max_wait: Duration::from_secs(600),
                priority: PriorityConfig {
                    header: Some("x-priority".into()),
                    classes: vec!["interactive".into(), "normal".into(), "batch".into()],
                    default: 1,
                    streaming: Some(0),
                },
            }),
            shared: None,
        };
        let admission = ConcurrencyLimiter::new(queue_config.clone());
        let user_ids: Vec<String> = (0..USERS).map(|u| format!("user-{u}")).collect();
        let admit_op = |t: usize| {
            let (admission, user_ids, priority) = (
                &admission,
                &user_ids,
                &queue_config.queue.as_ref().unwrap().priority,
            );
            move |n: u64| {
                let id = &user_ids[(n as usize * 2 + t) % USERS];
                let class = priority.class_for(black_box(None), false);
                let slot = now_or_never(admission.acquire(Some(id.as_str()), class))
                    .expect("an uncontended admission was refused");
                drop(black_box(slot));
            }
        };
        let i = new_item(
            &mut items,
            "queue",
            "queue admission: class_for + acquire + Slot drop (uncontended), 1 thread",
        );
        items[i].rounds.push(cpu_item(1, pass, admit_op));
        let i = new_item(
            &mut items,
            "queue",
            "queue admission: the same, 2 threads, one limiter",
        );
        items[i].rounds.push(cpu_item(2, pass, admit_op));
        let i = new_item(
            &mut items,
            "queue",
            "queue admission: the same, one user for every request (count kept at 1)",
        );
        // One slot held by the same user throughout: its interned key stays,
        // so no allocation per admission.
        let held = now_or_never(admission.acquire(Some("user-held"), 1)).unwrap();
        items[i].rounds.push(cpu_item(1, pass, |_| {
            let admission = &admission;
            move |_| {
                let slot = now_or_never(admission.acquire(Some("user-held"), 1))
                    .expect("an uncontended admission was refused");
                drop(black_box(slot));
            }
        }));
        drop(held);
        assert_eq!(admission.in_flight(), 0, "a slot was not given back");

        // Resilience.
        let breaker = Arc::new(Breaker::new(Arc::new(BreakerConfig::default())));
        let closed_op = |_t: usize| {
            let b = breaker.clone();
            let mut now = Instant::now();
            move |i: u64| {
                if i.is_multiple_of(64) {
                    now = Instant::now();
                }
                match b.try_acquire(now) {
                    Admission::Allowed(p) => b.record(
                        p,
                        CallOutcome::Success {
                            elapsed: Duration::from_millis(20),
                        },
                        now,
                    ),
                    _ => panic!("the breaker is not closed"),
                }
            }
        };
        let i = new_item(
            &mut items,
            "resilience",
            "breaker: try_acquire + record (closed), 1 thread",
        );
        items[i].rounds.push(cpu_item(1, pass, closed_op));
        let i = new_item(
            &mut items,
            "resilience",
            "breaker: try_acquire + record (closed), 2 threads, one breaker",
        );
        items[i].rounds.push(cpu_item(2, pass, closed_op));
        let policy = RetryPolicy::default();
        let i = new_item(
            &mut items,
            "resilience",
            "retry: delay() (backoff + full jitter)",
        );
        items[i].rounds.push(cpu_item(1, pass, |_| {
            let policy = &policy;
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            move |n| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let d = policy.delay(
                    black_box(1 + (n % 2) as u32),
                    &Failure::Status(503),
                    None,
                    x,
                );
                assert!(matches!(d, Delay::After(_)));
                black_box(d);
            }
        }));
        let budget = RetryBudget::new(BudgetConfig::default());
        let i = new_item(
            &mut items,
            "resilience",
            "retry budget: deposit (once per request)",
        );
        items[i].rounds.push(cpu_item(1, pass, |_| {
            let budget = &budget;
            let mut now = Instant::now();
            move |n| {
                if n % 64 == 0 {
                    now = Instant::now();
                }
                budget.deposit(now);
            }
        }));

        // SSE scanning.
        let events = sse_events();
        let stream: Vec<u8> = events.concat();
        let n_events = events.len() as f64;
        let i = new_item(
            &mut items,
            "sse",
            "SSE scan: one event per chunk (~200 B), per chunk",
        );
        items[i].rounds.push(cpu_item(1, pass, |_| {
            let events = &events;
            let mut sc = SseScanner::new();
            move |n| {
                let k = (n % events.len() as u64) as usize;
                if k == 0 {
                    sc = SseScanner::new();
                }
                sc.feed(black_box(&events[k]));
                black_box(&sc);
            }
        }));
        let i = new_item(
            &mut items,
            "sse",
            "SSE scan: a whole 12-event stream (2.4 KB) in one chunk, per event",
        );
        let mut f = cpu_item(1, pass, |_| {
            let stream = &stream;
            move |_| {
                let mut sc = SseScanner::new();
                sc.feed(black_box(stream));
                assert!(sc.done);
                black_box(&sc);
            }
        });
        for (k, v) in f.iter_mut() {
            match *k {
                "ops_s" => *v *= n_events,
                _ => *v /= n_events,
            }
        }
        items[i].rounds.push(f);
        let i = new_item(
            &mut items,
            "sse",
            "SSE scan: the same stream in 16-byte pieces, per event",
        );
        let mut f = cpu_item(1, pass, |_| {
            let stream = &stream;
            move |_| {
                let mut sc = SseScanner::new();
                for piece in stream.chunks(16) {
                    sc.feed(black_box(piece));
                }
                assert!(sc.done);
                black_box(&sc);
            }
        });
        for (k, v) in f.iter_mut() {
            match *k {
                "ops_s" => *v *= n_events,
                _ => *v /= n_events,
            }
        }
        items[i].rounds.push(f);

        // Response cache: the key.
        let body_len = CHAT_BODY.trim().len();
        let i = new_item(
            &mut items,
            "cache",
            &format!("for scale: serde_json parse of the {body_len} B chat body (the proxy parses it anyway)"),
        );
        items[i].rounds.push(cpu_item(1, pass, |_| {
            move |_| {
                let v: serde_json::Value =
                    serde_json::from_str(black_box(CHAT_BODY.trim())).unwrap();
                black_box(v);
            }
        }));
        let i = new_item(
            &mut items,
            "cache",
            "key: canonical JSON of that body (keys sorted, compact; canonical_json)",
        );
        items[i].rounds.push(cpu_item(1, pass, |_| {
            let doc = &doc;
            move |_| {
                black_box(canonical_json(black_box(doc), &[]));
            }
        }));
        let i = new_item(
            &mut items,
            "cache",
            "key: CacheKey::compute (canonical JSON + SHA-256, Authorization hashed, scope user)",
        );
        items[i].rounds.push(cpu_item(1, pass, |_| {
            let doc = &doc;
            move |_| {
                black_box(chat_key(Body::Json(black_box(doc))));
            }
        }));
        let i = new_item(
            &mut items,
            "cache",
            "key: compute (with the lookup's key string)",
        );
        items[i].rounds.push(cpu_item(1, pass, |_| {
            let doc = &doc;
            move |_| {
                black_box(chat_key(Body::Json(black_box(doc))).as_str().to_string());
            }
        }));

        // Response cache: the memory tier.
        let tier_get = |t: usize| {
            let (tier, keys) = (&tier, &tier_keys);
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
            let mut now = unix_ms();
            move |n: u64| {
                if n.is_multiple_of(64) {
                    now = unix_ms();
                }
                let k = &keys[(xorshift(&mut x) % keys.len() as u64) as usize];
                match tier.get(k, now) {
                    Lookup::Fresh(e) => {
                        black_box(e);
                    }
                    _ => panic!("a memory-tier lookup missed"),
                }
            }
        };
        let i = new_item(
            &mut items,
            "cache",
            "memory tier: MemoryTier::get, a hit among 10,000 entries (random keys), 1 thread",
        );
        items[i].rounds.push(cpu_item(1, pass, tier_get));
        let i = new_item(
            &mut items,
            "cache",
            "memory tier: the same, 2 threads sharing the tier",
        );
        items[i].rounds.push(cpu_item(2, pass, tier_get));
        let i = new_item(
            &mut items,
            "cache",
            "memory tier: MemoryTier::insert of a new key into a full tier of 10,000 (one eviction)",
        );
        if !skipped() {
            let slot = stored.size() + tier_keys[0].len();
            let full = MemoryTier::new((slot * TIER_ENTRIES) as u64);
            for k in &tier_keys {
                let _ = full.insert(k.clone(), stored.clone());
            }
            // Every pass inserts keys never seen before (of the same length
            // as the ones in the tier, so each insert evicts exactly one).
            let next = std::sync::atomic::AtomicU64::new(0);
            items[i].rounds.push(cpu_item(1, pass, |_| {
                let (full, stored) = (&full, &stored);
                let base = next.fetch_add(1 << 40, Ordering::Relaxed);
                move |n| {
                    let k = format!("chat:{:016x}:{:064x}", 0, base + n);
                    black_box(full.insert(k, stored.clone()));
                }
            }));
        }

        // Response cache: a miss's flight, and the Redis encoding.
        let flights = Flights::new();
        let head = Head {
            status: 200,
            headers: stored.headers.clone(),
            sse: false,
        };
        let i = new_item(
            &mut items,
            "cache",
            "flight: join as leader + complete + drop (no identical request in flight)",
        );
        items[i].rounds.push(cpu_item(1, pass, |_| {
            let (flights, keys) = (&flights, &tier_keys);
            move |n| {
                let Join::Leader(mut l) = flights.join(&keys[n as usize % keys.len()]) else {
                    panic!("followed a flight nobody leads");
                };
                l.complete();
                drop(l);
            }
        }));
        let i = new_item(
            &mut items,
            "cache",
            "flight: a miss's whole flight (join, publish the header, push the body, complete, drop)",
        );
        items[i].rounds.push(cpu_item(1, pass, |_| {
            let (flights, keys, head) = (&flights, &tier_keys, &head);
            let chunk = stored.chunks[0].data.clone();
            move |n| {
                let Join::Leader(mut l) = flights.join(&keys[n as usize % keys.len()]) else {
                    panic!("followed a flight nobody leads");
                };
                l.publish_head(head.clone());
                l.push(chunk.clone());
                l.complete();
                drop(l);
            }
        }));
        let encoded = stored.encode(None);
        let i = new_item(
            &mut items,
            "cache",
            &format!(
                "entry: Entry::encode of the stored chat answer ({} B; a Redis store)",
                encoded.len()
            ),
        );
        items[i].rounds.push(cpu_item(1, pass, |_| {
            let stored = &stored;
            move |_| {
                black_box(stored.encode(None));
            }
        }));
        let i = new_item(
            &mut items,
            "cache",
            "entry: Entry::decode of it (a Redis hit)",
        );
        items[i].rounds.push(cpu_item(1, pass, |_| {
            let encoded = &encoded;
            move |_| {
                black_box(Entry::decode(black_box(encoded)).unwrap());
            }
        }));

        // Redis.
        if let (Some(server), Some(limiter)) = (&redis, &redis_limiter) {
            let port = server.port;
            let spid = server.pid();
            let rpass = o.redis_pass;

            // Raw PING on a blocking socket: the floor of one round trip.
            let i = new_item(
                &mut items,
                "redis",
                "raw PING, blocking socket, sequential (no client library)",
            );
            if !skipped() {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_nodelay(true).unwrap();
                let mut lat = Vec::new();
                let start = Instant::now();
                let (c0, s0, io0) = (self_cpu_ns(), proc_cpu_ns(spid), server_io(port));
                let mut buf = [0u8; 7];
                while start.elapsed() < rpass {
                    let t0 = Instant::now();
                    s.write_all(b"PING\r\n").unwrap();
                    s.read_exact(&mut buf).unwrap();
                    lat.push(t0.elapsed().as_nanos() as u64);
                }
                let elapsed = start.elapsed();
                let (c1, s1, io1) = (self_cpu_ns(), proc_cpu_ns(spid), server_io(port));
                let n = lat.len() as u64;
                let mut f = latency_figures(lat, n, elapsed);
                f.push(("client_cpu_ns", (c1 - c0) as f64 / n as f64));
                f.push(("server_cpu_ns", (s1 - s0) as f64 / n as f64));
                f.push(("reads", (io1.0 - io0.0).saturating_sub(1) as f64 / n as f64));
                f.push((
                    "writes",
                    (io1.1 - io0.1).saturating_sub(1) as f64 / n as f64,
                ));
                items[i].rounds.push(f);
            }

            let store = limiter.redis().unwrap().clone();
            for (tasks, label) in [(1usize, "sequential"), (64, "64 concurrent tasks")] {
                let i = new_item(
                    &mut items,
                    "redis",
                    &format!("PING through the store's client (RedisStore::ping), {label}"),
                );
                let st = store.clone();
                let f = rt.block_on(redis_item(tasks, rpass, spid, port, move |_| {
                    let st = st.clone();
                    async move { st.ping().await.is_ok() }
                }));
                items[i].rounds.push(f);

                for (snap, what) in [
                    (&one_arc, "1 rule, 1 window"),
                    (&three_arc, "3 rules (5 windows)"),
                ] {
                    let i = new_item(
                        &mut items,
                        "redis",
                        &format!("decision through Redis: {what}, {label}"),
                    );
                    let (l, s, fx) = (limiter.clone(), snap.clone(), redis_fx.clone());
                    let f = rt.block_on(redis_item(tasks, rpass, spid, port, move |n| {
                        let (l, s, fx) = (l.clone(), s.clone(), fx.clone());
                        async move {
                            let d = l
                                .check(s.limits.rules_for(0), &fx.request(n), unix_ms())
                                .await;
                            d.allowed && !d.fallback
                        }
                    }));
                    items[i].rounds.push(f);
                }

                if let Some((cs, key)) = &redis_cache {
                    let i = new_item(
                        &mut items,
                        "redis",
                        &format!("cache hit through Redis: CacheStore::get, store: redis (GET + decode), {label}"),
                    );
                    let (cs, key) = (cs.clone(), key.clone());
                    let f = rt.block_on(redis_item(tasks, rpass, spid, port, move |_| {
                        let (cs, key) = (cs.clone(), key.clone());
                        async move {
                            let (found, err) = cs.get(StoreKind::Redis, &key, unix_ms()).await;
                            matches!(found, Lookup::Fresh(_)) && err.is_none()
                        }
                    }));
                    items[i].rounds.push(f);
                }
            }
        }
    }
    drop(redis_cache);
    drop(redis_limiter);
    let redis_version = redis.as_ref().map(|_| RedisServer::version());
    drop(redis); // kills redis-server
    let load_after = loadavg();
    let elapsed = started.elapsed();

    // --- report ---------------------------------------------------------
    items.retain(|it| it.rounds.iter().any(|r| !r.is_empty()));
    let mut out = String::new();
    let rev = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "?".into());
    let dirty = Command::new("git")
        .args(["diff", "--quiet", "HEAD"])
        .status()
        .map(|s| !s.success())
        .unwrap_or(false);
    out += &format!(
        "# floodwall decision benchmarks\n\n- command: `cargo bench --bench decisions{}` ({} round(s), {:.0} s)\n- commit: {rev}{}\n- machine: nproc {}; load average before {load_before}, after {load_after}{}\n- each cell: median [min-max] over the rounds; ns = nanoseconds per operation.\n\n",
        if o.quick { " -- --quick" } else { "" },
        o.rounds,
        elapsed.as_secs_f64(),
        if dirty { " (+ uncommitted changes)" } else { "" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        redis_version.map(|v| format!("; redis-server {v}")).unwrap_or_default(),
    );
    let timer = items
        .iter()
        .find(|i| i.group == "timer")
        .and_then(|i| median_of(i, "mean_ns"));
    out += &format!(
        "Timing overhead: one timed call pays two `Instant::now()` (median {} ns per pair); \
         it is included in the p50/p99 columns, not in the throughput and mean columns.\n\n",
        timer.map(fmt_num).unwrap_or_else(|| "?".into())
    );
    let sections: [(&str, &str); 5] = [
        (
            "memory",
            "## Rate-limit decisions in memory (`Limiter::check`)",
        ),
        (
            "resilience",
            "## Retry and circuit breaker (pure arithmetic)",
        ),
        (
            "queue",
            "## Queue admission (`ConcurrencyLimiter::acquire` + `Slot` drop)",
        ),
        ("sse", "## SSE scanning (`SseScanner::feed`)"),
        (
            "cache",
            "## Response cache (key, memory tier, flights, entry encoding)",
        ),
    ];
    for (group, title) in sections {
        out += &format!("{title}\n\n| what | ops/s | mean ns/op (per thread) | p50 ns (timed) | p99 ns (timed) |\n|---|---|---|---|---|\n");
        for it in items.iter().filter(|i| i.group == group) {
            out += &format!(
                "| {} | {} | {} | {} | {} |\n",
                it.name,
                cell(it, "ops_s"),
                cell(it, "mean_ns"),
                cell(it, "p50_ns"),
                cell(it, "p99_ns")
            );
        }
        out += "\n";
    }
    if items.iter().any(|i| i.group == "redis") {
        out += "## Through Redis (private redis-server on 127.0.0.1; client: 2 tokio workers)\n\n\
                | what | ops/s | p50 µs | p99 µs | client CPU µs/op | redis-server CPU µs/op | server reads / writes per op |\n|---|---|---|---|---|---|---|\n";
        for it in items.iter_mut().filter(|i| i.group == "redis") {
            let us = |it: &Item, k: &str| -> String {
                let v: Vec<f64> = it
                    .rounds
                    .iter()
                    .filter_map(|r| r.iter().find(|(x, _)| *x == k).map(|(_, v)| *v / 1000.0))
                    .collect();
                if v.is_empty() {
                    return "-".into();
                }
                let (m, lo, hi) = med_min_max(v.clone());
                if v.len() == 1 {
                    format!("{m:.1}")
                } else {
                    format!("{m:.1} [{lo:.1}-{hi:.1}]")
                }
            };
            let bad: f64 = it
                .rounds
                .iter()
                .filter_map(|r| r.iter().find(|(x, _)| *x == "bad").map(|(_, v)| *v))
                .sum();
            if bad > 0.0 {
                it.notes.push(format!("{bad} calls failed or fell back"));
            }
            let per_op =
                |it: &Item, k: &str| median_of(it, k).map_or("-".into(), |v| format!("{v:.2}"));
            out += &format!(
                "| {}{} | {} | {} | {} | {} | {} | {} / {} |\n",
                it.name,
                if it.notes.is_empty() {
                    String::new()
                } else {
                    format!(" (**{}**)", it.notes.join("; "))
                },
                cell(it, "ops_s"),
                us(it, "p50_ns"),
                us(it, "p99_ns"),
                us(it, "client_cpu_ns"),
                us(it, "server_cpu_ns"),
                per_op(it, "reads"),
                per_op(it, "writes"),
            );
        }
        out += "\n\"server reads / writes per op\": redis-server's `total_reads_processed` / \
                `total_writes_processed` (INFO stats) per operation: 1.00 / 1.00 for a sequential \
                caller is one round trip per operation, whatever the number of commands in it; \
                under concurrency, batches from several tasks share reads and writes.\n\n";
        // Paired by round: the decision against PING through the same client.
        out += "Decisions and cache hits against one PING round trip, paired round by round \
                (operation ÷ PING through the same client, same concurrency):\n\n\
                | operation | p50 ÷ PING p50 | p99 ÷ PING p99 | p50 minus PING p50 (µs) |\n|---|---|---|---|\n";
        for label in ["sequential", "64 concurrent tasks"] {
            let ping = items.iter().find(|i| {
                i.name == format!("PING through the store's client (RedisStore::ping), {label}")
            });
            let Some(ping) = ping else { continue };
            for it in items.iter().filter(|i| {
                (i.name.starts_with("decision through Redis")
                    || i.name.starts_with("cache hit through Redis"))
                    && i.name.ends_with(label)
            }) {
                let paired = |k: &str, diff: bool| -> String {
                    let v: Vec<f64> = it
                        .rounds
                        .iter()
                        .zip(&ping.rounds)
                        .filter_map(|(a, b)| {
                            let a = a.iter().find(|(x, _)| *x == k)?.1;
                            let b = b.iter().find(|(x, _)| *x == k)?.1;
                            Some(if diff { (a - b) / 1000.0 } else { a / b })
                        })
                        .collect();
                    if v.is_empty() {
                        return "-".into();
                    }
                    let (m, lo, hi) = med_min_max(v.clone());
                    let f = |x: f64| {
                        if diff {
                            format!("{x:+.1}")
                        } else {
                            format!("{x:.2}×")
                        }
                    };
                    if v.len() == 1 {
                        f(m)
                    } else {
                        format!("{} [{}-{}]", f(m), f(lo), f(hi))
                    }
                };
                out += &format!(
                    "| {} | {} | {} | {} |\n",
                    it.name
                        .trim_start_matches("decision through Redis: ")
                        .trim_start_matches("cache hit through Redis: "),
                    paired("p50_ns", false),
                    paired("p99_ns", false),
                    paired("p50_ns", true),
                );
            }
        }
        out += "\n";
    }
    print!("{out}");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench-results");
    if std::fs::create_dir_all(&dir).is_ok() {
        let stamp = Command::new("date")
            .args(["-u", "+%Y%m%dT%H%M%SZ"])
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "now".into());
        let path = dir.join(format!("decisions-{stamp}.md"));
        if std::fs::write(&path, &out).is_ok() {
            eprintln!("[decisions] written: {}", path.display());
        }
    }
}
