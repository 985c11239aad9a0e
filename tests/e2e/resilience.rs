//! Retries, timeouts, circuit breakers and fallback (issue 4), each driven
//! through the real binary by the mock's fault scripts.
//!
//! Fault scripts reach the primary either in the `x-mock-fault` header (which
//! floodwall forwards to every target, fallbacks included), in a `mock:...`
//! model name (which a fallback's `model` rewrite removes, so only the
//! primary misbehaves), or through [`MockServer::set_defaults`] on one mock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

const CHAT: &str = "/v1/chat/completions";
const FALLBACK_MODEL: &str = "fallback-model";

/// One backend of a test policy: its name, URL, and extra YAML lines under it
/// (indented by four spaces). Without `timeouts` in `extra`, the backend gets
/// `{ connect: 1s, response_headers: 5s }`.
struct Be<'a>(&'a str, String, &'a str);

fn resilience_policy(backends: &[Be<'_>], routes: &str) -> String {
    let mut b = String::new();
    for Be(name, url, extra) in backends {
        b.push_str(&format!("  {name}:\n    endpoints: [\"{url}\"]\n"));
        if !extra.contains("timeouts:") {
            b.push_str("    timeouts: { connect: 1s, response_headers: 5s }\n");
        }
        b.push_str(extra);
    }
    format!(
        r#"version: 1
server:
  listen: ["127.0.0.1:0"]
  admin: {{ listen: "127.0.0.1:0" }}
  threads: 2
  grace_period: 1s
backends:
{b}routes:
{routes}"#
    )
}

/// A `chat` route on `backend` catching every path, with extra YAML lines
/// (indented by four spaces).
fn route(backend: &str, extra: &str) -> String {
    format!("  - name: chat\n    match: {{ path_prefix: / }}\n    backend: {backend}\n{extra}")
}

/// A fallback to backend `fb` that rewrites `model` (so a `mock:` model
/// name scripts the primary only).
const FALLBACK_FB: &str = "    fallback:\n      - backend: fb\n        model: fallback-model\n";

fn body(model: &str, stream: bool) -> Vec<u8> {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "hello"}]
    })
    .to_string()
    .into_bytes()
}

/// POST a chat completion; `fault` goes in `x-mock-fault` when set.
async fn chat(fw: &Floodwall, model: &str, stream: bool, fault: Option<&str>) -> Resp {
    chat_with(&Client::new(), fw.addr, model, stream, fault).await
}

async fn chat_with(
    client: &Client,
    addr: std::net::SocketAddr,
    model: &str,
    stream: bool,
    fault: Option<&str>,
) -> Resp {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(f) = fault {
        headers.push(("x-mock-fault", f));
    }
    client
        .send(addr, "POST", CHAT, &headers, &body(model, stream))
        .await
}

/// Gaps in milliseconds between consecutive attempts.
fn gaps(attempts: &[floodwall::mock::Attempt]) -> Vec<f64> {
    attempts
        .windows(2)
        .map(|w| w[1].at_ms - w[0].at_ms)
        .collect()
}

/// The content of an SSE `data:` payload's first delta, if it is a chunk.
fn delta_content(data: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    v["choices"][0]["delta"]["content"]
        .as_str()
        .map(str::to_string)
}

fn state_series(backend: &str) -> String {
    format!("floodwall_circuit_state{{breaker=\"backend/{backend}\"}}")
}

fn transitions_series(backend: &str, to: &str) -> String {
    format!("floodwall_circuit_transitions_total{{breaker=\"backend/{backend}\",to=\"{to}\"}}")
}

/// The backend breaker's entry in `/admin/status`.
async fn breaker_status(fw: &Floodwall, backend: &str) -> serde_json::Value {
    let r = Client::new().get(fw.admin, "/admin/status").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let key = format!("backend/{backend}");
    v["circuit_breakers"]
        .as_array()
        .and_then(|l| l.iter().find(|b| b["key"] == key.as_str()).cloned())
        .unwrap_or_else(|| panic!("no breaker {key} in {v}"))
}

// ------------------------------------------------------------------ retries

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_before_the_second_attempt() {
    let mock = start_mock().await;
    let routes = route(
        "main",
        "    retry: { attempts: 3, backoff: { base: 10ms, jitter: none } }\n",
    );
    let fw = Floodwall::start(&resilience_policy(
        &[Be("main", mock_url(&mock), "")],
        &routes,
    ))
    .await;
    let r = chat(
        &fw,
        "gpt-4o",
        false,
        Some("scenario=ra;fail=1:429;retry_after=1"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let attempts = mock.stats().attempts("ra").to_vec();
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    assert_eq!(attempts[0].status, 429);
    let gap = gaps(&attempts)[0];
    // The back-off alone is 10 ms: only Retry-After explains a 1 s wait.
    assert!(
        (1000.0..2500.0).contains(&gap),
        "second attempt {gap} ms after the first"
    );
    let m = fw.metrics().await;
    assert_eq!(
        metric(&m, "floodwall_retries_total{reason=\"429\",route=\"chat\"}"),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_429_is_bounded_backs_off_and_passes_through() {
    let mock = start_mock().await;
    let routes = route(
        "main",
        "    retry: { attempts: 4, backoff: { base: 100ms, factor: 2, jitter: none } }\n",
    );
    let fw = Floodwall::start(&resilience_policy(
        &[Be("main", mock_url(&mock), "")],
        &routes,
    ))
    .await;
    let r = chat(&fw, "gpt-4o", false, Some("scenario=rl;status=429")).await;
    // The upstream's own answer, not one of floodwall's.
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("x-floodwall-reason"), None);
    assert_eq!(r.header("x-floodwall-backend"), Some("main"));
    assert_eq!(
        r.json()["error"]["code"],
        "rate_limit_exceeded",
        "{}",
        r.text()
    );

    // Let any (wrong) extra attempt show up before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let attempts = mock.stats().attempts("rl").to_vec();
    assert_eq!(
        attempts.len(),
        4,
        "attempts are bounded by retry.attempts: {attempts:#?}"
    );
    let g = gaps(&attempts);
    for (gap, nominal) in g.iter().zip([100.0, 200.0, 400.0]) {
        assert!(
            *gap >= nominal && *gap < nominal + 400.0,
            "gaps {g:?} should be about 100, 200, 400 ms"
        );
    }
    assert!(g[0] < g[1] && g[1] < g[2], "back-off grows: {g:?}");
    let m = fw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "floodwall_retry_giveups_total{route=\"chat\",why=\"attempts_exhausted\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_500_then_success_takes_two_attempts() {
    let mock = start_mock().await;
    let routes = route(
        "main",
        "    retry: { attempts: 3, backoff: { base: 10ms } }\n",
    );
    let fw = Floodwall::start(&resilience_policy(
        &[Be("main", mock_url(&mock), "")],
        &routes,
    ))
    .await;
    let r = chat(&fw, "gpt-4o", false, Some("scenario=s500;fail=1:500")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["object"], "chat.completion");
    let attempts = mock.stats().attempts("s500").to_vec();
    let statuses: Vec<u16> = attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [500, 200], "{attempts:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_reuse_the_pooled_upstream_connection() {
    let mock = start_mock().await;
    let routes = route(
        "main",
        "    retry: { attempts: 3, backoff: { base: 10ms } }\n",
    );
    let fw = Floodwall::start(&resilience_policy(
        &[Be("main", mock_url(&mock), "")],
        &routes,
    ))
    .await;
    let r = chat(&fw, "gpt-4o", false, Some("scenario=reuse;fail=1:500")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let attempts = mock.stats().attempts("reuse").to_vec();
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    assert_eq!(attempts[0].request_on_connection, 0, "{attempts:#?}");
    assert!(
        attempts[1].request_on_connection > 0
            && attempts[1].connection_id == attempts[0].connection_id,
        "the retry went out on the failed attempt's pooled connection: {attempts:#?}"
    );
    assert_eq!(mock.stats().connections_accepted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_goes_to_another_endpoint_of_the_backend() {
    let bad = start_mock().await;
    let good = start_mock().await;
    bad.set_defaults(FaultScript::parse("status=503").unwrap());
    // Two endpoints, two attempts: a retry on the same endpoint fails again.
    let endpoints = format!("{}\", \"{}", mock_url(&bad), mock_url(&good));
    let routes = route(
        "main",
        "    retry: { attempts: 2, backoff: { base: 400ms, jitter: none } }\n",
    );
    let fw = Floodwall::start(&resilience_policy(&[Be("main", endpoints, "")], &routes)).await;
    let addr = fw.addr;
    // The first request's first attempt goes to `bad` (round-robin starts there)...
    let first =
        tokio::spawn(async move { chat_with(&Client::new(), addr, "gpt-4o", false, None).await });
    eventually("the first attempt", Duration::from_secs(3), || async {
        (bad.stats().requests == 1).then_some(())
    })
    .await;
    // ...another request moves the round-robin on during its back-off, so
    // plain round-robin would send the retry back to `bad`.
    let other = chat(&fw, "gpt-4o", false, None).await;
    assert_eq!(other.status, 200, "{}", other.text());
    let r = first.await.unwrap();
    assert_eq!(
        r.status,
        200,
        "the retry avoided the endpoint that failed: {}",
        r.text()
    );
    assert_eq!(bad.stats().requests, 1);
    assert_eq!(good.stats().requests, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_before_the_headers_is_retried() {
    let mock = start_mock().await;
    let routes = route(
        "main",
        "    retry: { attempts: 3, backoff: { base: 10ms } }\n",
    );
    let fw = Floodwall::start(&resilience_policy(
        &[Be("main", mock_url(&mock), "")],
        &routes,
    ))
    .await;
    let r = chat(&fw, "gpt-4o", false, Some("scenario=rst;reset=1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let attempts = mock.stats().attempts("rst").to_vec();
    let outcomes: Vec<String> = attempts.iter().map(|a| a.outcome.to_string()).collect();
    assert_eq!(outcomes, ["reset", "ok"], "{attempts:#?}");
    let m = fw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "floodwall_retries_total{reason=\"reset\",route=\"chat\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_length_exceeded_is_one_attempt_no_fallback_body_unchanged() {
    let primary = start_mock().await;
    let fb = start_mock().await;
    let routes = route(
        "main",
        &format!("    retry: {{ attempts: 3, backoff: {{ base: 10ms }}, on: [400, 500, 503] }}\n{FALLBACK_FB}"),
    );
    let fw = Floodwall::start(&resilience_policy(
        &[
            Be("main", mock_url(&primary), ""),
            Be("fb", mock_url(&fb), ""),
        ],
        &routes,
    ))
    .await;
    let fault = "scenario=ctx;fail=100:400;error_code=context_length_exceeded";
    // What the backend says, asked directly (then forget that attempt).
    let direct = chat_with(&Client::new(), primary.addr(), "gpt-4o", false, Some(fault)).await;
    assert_eq!(direct.status, 400);
    primary.reset_stats();

    let r = chat(&fw, "gpt-4o", false, Some(fault)).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.body, direct.body,
        "the refusal's body passes through byte for byte"
    );
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    assert_eq!(r.header("x-floodwall-reason"), None);
    assert_eq!(r.header("x-floodwall-backend"), Some("main"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        primary.stats().attempts("ctx").len(),
        1,
        "never retried, even with 400 in retry.on"
    );
    assert_eq!(
        fb.stats().requests,
        0,
        "a refusal is never answered by a fallback"
    );
    let m = fw.metrics().await;
    assert!(!m.contains("floodwall_fallbacks_total{"), "{m}");
    assert!(!m.contains("floodwall_retries_total{"), "{m}");
}

// ------------------------------------------------------------------ fallback

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_503_falls_back_and_names_the_fallback_model() {
    let primary = start_mock().await;
    let fb = start_mock().await;
    let routes = route(
        "main",
        &format!("    retry: {{ attempts: 2, backoff: {{ base: 10ms }} }}\n{FALLBACK_FB}"),
    );
    let fw = Floodwall::start(&resilience_policy(
        &[
            Be("main", mock_url(&primary), ""),
            Be("fb", mock_url(&fb), ""),
        ],
        &routes,
    ))
    .await;
    let r = chat(&fw, "mock:scenario=p503;status=503", false, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], FALLBACK_MODEL, "{}", r.text());
    assert_eq!(r.header("x-floodwall-backend"), Some("fb"));
    assert_eq!(
        primary.stats().attempts("p503").len(),
        2,
        "retries first, then the fallback"
    );
    assert_eq!(fb.stats().requests, 1);
    let m = fw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "floodwall_fallbacks_total{route=\"chat\",target=\"fb\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_respond_is_the_last_resort() {
    let primary = start_mock().await;
    let routes = route(
        "main",
        "    fallback:\n      - respond: { status: 503, body: { error: { message: degraded, type: unavailable } } }\n",
    );
    let fw = Floodwall::start(&resilience_policy(
        &[Be("main", mock_url(&primary), "")],
        &routes,
    ))
    .await;
    let r = chat(&fw, "gpt-4o", false, Some("status=502")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("x-floodwall-reason"), Some("fallback_response"));
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.json()["error"]["message"], "degraded", "{}", r.text());
    let m = fw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "floodwall_fallbacks_total{route=\"chat\",target=\"respond\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

// ------------------------------------------------------------------ timeouts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_answers_ends_within_total() {
    let mock = start_mock().await;
    let routes = route(
        "main",
        "    timeouts: { total: 2s }\n    retry: { attempts: 3, backoff: { base: 10ms } }\n",
    );
    let fw = Floodwall::start(&resilience_policy(
        &[Be(
            "main",
            mock_url(&mock),
            "    timeouts: { connect: 1s, response_headers: 10s }\n",
        )],
        &routes,
    ))
    .await;
    let started = Instant::now();
    let r = chat(&fw, "gpt-4o", false, Some("scenario=hang;hang=1")).await;
    let took = started.elapsed();
    r.assert_floodwall_error(504, "upstream_timeout");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(3000),
        "took {took:?} (total is 2s)"
    );
    assert_eq!(
        mock.stats().attempts("hang").len(),
        1,
        "total is never retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_first_token_fails_over_within_first_token() {
    let primary = start_mock().await;
    let fb = start_mock().await;
    let routes = route(
        "main",
        &format!("    timeouts: {{ first_token: 500ms }}\n{FALLBACK_FB}"),
    );
    let fw = Floodwall::start(&resilience_policy(
        &[
            Be("main", mock_url(&primary), ""),
            Be("fb", mock_url(&fb), ""),
        ],
        &routes,
    ))
    .await;
    let r = chat(&fw, "mock:scenario=slow;ttft=3s", true, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-floodwall-backend"), Some("fb"));
    let (first_at, _) = r.chunks.first().expect("a body");
    assert!(
        *first_at >= Duration::from_millis(450) && *first_at < Duration::from_millis(1500),
        "first byte at {first_at:?}: first_token is 500ms, the primary's token would come at 3s"
    );
    assert!(r.complete, "a clean, complete stream");
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:#?}");
    let roles = data.iter().filter(|d| d.contains("\"role\"")).count();
    assert_eq!(
        roles, 1,
        "exactly one role chunk (the fallback's): {data:#?}"
    );
    for d in data.iter().filter(|d| *d != "[DONE]") {
        let v: serde_json::Value = serde_json::from_str(d).unwrap();
        assert_eq!(
            v["model"], FALLBACK_MODEL,
            "only the fallback's events: {d}"
        );
    }
    // The held primary attempt was abandoned (its connection closed).
    eventually(
        "the primary to see floodwall leave",
        Duration::from_secs(3),
        || async {
            (primary.stats().attempts("slow").first()?.outcome == "disconnected").then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_token_counts_from_the_request_not_from_the_headers() {
    let primary = start_mock().await;
    let fb = start_mock().await;
    let routes = route(
        "main",
        &format!("    timeouts: {{ first_token: 500ms }}\n{FALLBACK_FB}"),
    );
    let fw = Floodwall::start(&resilience_policy(
        &[
            Be("main", mock_url(&primary), ""),
            Be("fb", mock_url(&fb), ""),
        ],
        &routes,
    ))
    .await;
    // The header alone comes after first_token; the token much later.
    let r = chat(&fw, "mock:scenario=late;latency=900ms;ttft=3s", true, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-floodwall-backend"), Some("fb"));
    let (first_at, _) = r.chunks.first().expect("a body");
    assert!(
        *first_at < Duration::from_millis(1100),
        "first byte at {first_at:?}: first_token (500ms) counts from sending the request"
    );
    assert!(r.complete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_token_without_hold_ends_the_started_stream_with_an_error_event() {
    let primary = start_mock().await;
    let fb = start_mock().await;
    let routes = route(
        "main",
        &format!(
            "    timeouts: {{ first_token: 500ms, hold_for_first_token: false }}\n    retry: {{ attempts: 3, backoff: {{ base: 10ms }} }}\n{FALLBACK_FB}"
        ),
    );
    let fw = Floodwall::start(&resilience_policy(
        &[
            Be("main", mock_url(&primary), ""),
            Be("fb", mock_url(&fb), ""),
        ],
        &routes,
    ))
    .await;
    let r = chat(&fw, "mock:scenario=nohold;ttft=3s", true, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-floodwall-backend"),
        Some("main"),
        "headers went out at once"
    );
    assert!(!r.complete, "the stream must not end cleanly");
    let (first_at, _) = r.chunks.first().expect("a body");
    assert!(
        *first_at < Duration::from_millis(400),
        "role chunk at {first_at:?}: not held"
    );
    let (last_at, _) = r.chunks.last().unwrap();
    assert!(
        *last_at >= Duration::from_millis(450) && *last_at < Duration::from_millis(1500),
        "error event at {last_at:?} (first_token 500ms)"
    );
    let data = r.sse_data();
    let err: serde_json::Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "upstream_stream_error", "{data:#?}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("first_token"),
        "{err}"
    );
    assert!(
        !data
            .iter()
            .any(|d| delta_content(d).is_some_and(|c| !c.is_empty())),
        "{data:#?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        primary.stats().attempts("nohold").len(),
        1,
        "no retry after the headers went out"
    );
    assert_eq!(
        fb.stats().requests,
        0,
        "no fallback after the headers went out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_event_is_not_buffered_behind_retries_and_first_token() {
    let mock = start_mock().await;
    let routes = route(
        "main",
        "    timeouts: { first_token: 1s }\n    retry: { attempts: 3, backoff: { base: 10ms } }\n",
    );
    let fw = Floodwall::start(&resilience_policy(
        &[Be("main", mock_url(&mock), "")],
        &routes,
    ))
    .await;
    let r = chat(&fw, "gpt-4o", true, Some("chunk_delay=1500ms;chunks=3")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.complete);
    let content: Vec<Duration> = r
        .chunks
        .iter()
        .filter(|(_, c)| {
            sse_data(&String::from_utf8_lossy(c))
                .iter()
                .any(|d| delta_content(d).is_some_and(|s| !s.is_empty()))
        })
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(content.len(), 3, "{:?}", r.chunks);
    assert!(
        content[0] < Duration::from_millis(1200),
        "first content event at {:?}",
        content[0]
    );
    assert!(
        content[2] > Duration::from_millis(2500),
        "last content event at {:?}",
        content[2]
    );
}

// ------------------------------------------------------------------ streams

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_cut_after_output_is_not_retried_and_ends_with_an_error_event() {
    let mock = start_mock().await;
    let routes = route(
        "main",
        "    retry: { attempts: 3, backoff: { base: 10ms } }\n",
    );
    let fw = Floodwall::start(&resilience_policy(
        &[Be("main", mock_url(&mock), "")],
        &routes,
    ))
    .await;
    let r = chat(&fw, "gpt-4o", true, Some("scenario=cut;cut_after=2")).await;
    assert_eq!(r.status, 200);
    assert!(!r.complete, "a cut stream must not end cleanly");
    let data = r.sse_data();
    let last: serde_json::Value = serde_json::from_str(data.last().expect("events")).expect("JSON");
    assert_eq!(last["error"]["code"], "upstream_stream_error", "{data:#?}");
    assert!(!data.iter().any(|d| d == "[DONE]"));
    let content = data
        .iter()
        .filter(|d| delta_content(d).is_some_and(|s| !s.is_empty()))
        .count();
    assert_eq!(content, 2, "{data:#?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        mock.stats().attempts("cut").len(),
        1,
        "no retry once bytes went to the client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_stream_is_ended_by_idle_and_floodwall_stays_healthy() {
    let mock = start_mock().await;
    let routes = route("main", "    timeouts: { idle: 500ms }\n");
    let fw = Floodwall::start(&resilience_policy(
        &[Be("main", mock_url(&mock), "")],
        &routes,
    ))
    .await;
    let r = chat(&fw, "gpt-4o", true, Some("scenario=stall;stall_after=2")).await;
    assert_eq!(r.status, 200);
    assert!(!r.complete, "a stalled stream must not end cleanly");
    let (last_at, last) = r.chunks.last().expect("chunks").clone();
    let last_data = sse_data(&String::from_utf8_lossy(&last));
    let err: serde_json::Value = serde_json::from_str(last_data.last().expect("an event")).unwrap();
    assert_eq!(err["error"]["code"], "upstream_stream_error", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("idle"),
        "{err}"
    );
    // When the last content arrived, and how long until the stall was called.
    let content_at = r
        .chunks
        .iter()
        .filter(|(_, c)| {
            sse_data(&String::from_utf8_lossy(c))
                .iter()
                .any(|d| delta_content(d).is_some_and(|s| !s.is_empty()))
        })
        .map(|(t, _)| *t)
        .last()
        .expect("content before the stall");
    let detected = last_at - content_at;
    assert!(
        detected >= Duration::from_millis(450) && detected < Duration::from_secs(2),
        "stall detected {detected:?} after the last chunk (idle is 500ms)"
    );
    // floodwall let go of the stalled upstream...
    eventually(
        "the mock to see floodwall leave",
        Duration::from_secs(3),
        || async {
            let stats = mock.stats();
            (!stats.scenarios.get("stall")?.client_disconnects.is_empty()).then_some(())
        },
    )
    .await;
    // ...and serves the next request.
    let next = chat(&fw, "gpt-4o", true, None).await;
    assert_eq!(next.status, 200);
    assert!(next.complete);
    assert_eq!(next.sse_data().last().map(String::as_str), Some("[DONE]"));
    // The idle cut is counted as a stream timeout of its own kind.
    let text = fw.metrics().await;
    assert_eq!(
        metric(
            &text,
            "floodwall_stream_timeouts_total{kind=\"idle\",route=\"chat\"}"
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_done_is_finalised_promptly() {
    let mock = start_mock().await;
    let routes = route("main", "    timeouts: { idle: 5s }\n");
    let fw = Floodwall::start(&resilience_policy(
        &[Be("main", mock_url(&mock), "")],
        &routes,
    ))
    .await;
    let started = Instant::now();
    let r = chat(&fw, "gpt-4o", true, Some("no_done=1")).await;
    let took = started.elapsed();
    assert_eq!(r.status, 200);
    assert!(r.complete, "a stream that ended normally is complete");
    assert!(
        took < Duration::from_secs(1),
        "took {took:?}: it must not wait for [DONE] or idle"
    );
    let data = r.sse_data();
    assert!(!data.iter().any(|d| d == "[DONE]"), "{data:#?}");
    let v: serde_json::Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
}

// ------------------------------------------------------------------ breakers

const FLAPPY_BREAKER: &str =
    "    circuit_breaker: { window: 2s, min_requests: 3, failure_rate: 50%, open_for: 1s }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_primary_opens_the_breaker_falls_back_probes_and_closes() {
    let primary = start_mock().await;
    let fb = start_mock().await;
    let routes = route("primary", FALLBACK_FB);
    let fw = Floodwall::start(&resilience_policy(
        &[
            Be("primary", mock_url(&primary), FLAPPY_BREAKER),
            Be("fb", mock_url(&fb), ""),
        ],
        &routes,
    ))
    .await;
    let state = state_series("primary");

    // Healthy.
    let r = chat(&fw, "gpt-4o", false, None).await;
    assert_eq!(r.header("x-floodwall-backend"), Some("primary"));

    // Outage: failures trip the breaker; the fallback answers meanwhile.
    primary.set_defaults(FaultScript::parse("status=503").unwrap());
    let mut sent = 0;
    loop {
        let r = chat(&fw, "gpt-4o", false, None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-floodwall-backend"), Some("fb"));
        assert_eq!(r.json()["model"], FALLBACK_MODEL);
        sent += 1;
        if metric(&fw.metrics().await, &state) == Some(2.0) {
            break;
        }
        assert!(sent < 10, "the breaker did not open after {sent} failures");
    }
    // The first failure makes 2 calls (under min_requests 3); the second
    // makes 2 failures in 3 calls, over 50%.
    assert_eq!(sent, 2, "min_requests 3, failure_rate 50%");

    // While open: nothing reaches the primary, the fallback serves at once.
    let before = primary.stats().requests;
    for _ in 0..3 {
        let r = chat(&fw, "gpt-4o", false, None).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-floodwall-backend"), Some("fb"));
    }
    assert_eq!(
        primary.stats().requests,
        before,
        "an open breaker sends nothing"
    );
    let m = fw.metrics().await;
    assert!(
        metric(
            &m,
            "floodwall_circuit_rejections_total{backend=\"primary\"}"
        ) == Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "floodwall_fallbacks_total{route=\"chat\",target=\"fb\"}"
        ),
        Some(5.0),
        "2 after failures, 3 while open: {m}"
    );

    // Recovery: after open_for a probe reaches the primary and closes it.
    primary.set_defaults(FaultScript::default());
    let recovered = Instant::now();
    let answered_by = eventually("the breaker to close", Duration::from_secs(5), || async {
        let r = chat(&fw, "gpt-4o", false, None).await;
        assert_eq!(r.status, 200);
        let by = r
            .header("x-floodwall-backend")
            .unwrap_or_default()
            .to_string();
        (metric(&fw.metrics().await, &state) == Some(0.0)).then_some(by)
    })
    .await;
    assert_eq!(
        answered_by, "primary",
        "the probe that closed it was answered by the primary"
    );
    assert!(
        recovered.elapsed() < Duration::from_millis(2500),
        "closed {:?} after recovery (open_for 1s)",
        recovered.elapsed()
    );
    assert!(primary.stats().requests > before, "a probe ran");
    let m = fw.metrics().await;
    for to in ["open", "half_open", "closed"] {
        assert!(
            metric(&m, &transitions_series("primary", to)).unwrap_or(0.0) >= 1.0,
            "transition to {to}: {m}"
        );
    }
    let r = chat(&fw, "gpt-4o", false, None).await;
    assert_eq!(r.header("x-floodwall-backend"), Some("primary"));
}

/// A breaker that trips on two failures and stays open long enough to test.
const STICKY_BREAKER: &str =
    "    circuit_breaker: { window: 10s, min_requests: 2, failure_rate: 50%, open_for: 5s }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_breaker_without_fallback_gets_fast_503_circuit_open() {
    let primary = start_mock().await;
    primary.set_defaults(FaultScript::parse("status=503").unwrap());
    let routes = route("primary", "");
    let fw = Floodwall::start(&resilience_policy(
        &[Be("primary", mock_url(&primary), STICKY_BREAKER)],
        &routes,
    ))
    .await;
    for _ in 0..2 {
        let r = chat(&fw, "gpt-4o", false, None).await;
        assert_eq!(r.status, 503);
        assert_eq!(
            r.header("x-floodwall-reason"),
            None,
            "the upstream's own 503"
        );
    }
    let started = Instant::now();
    let r = chat(&fw, "gpt-4o", false, None).await;
    let took = started.elapsed();
    r.assert_floodwall_error(503, "circuit_open");
    let retry_after: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(
        (1..=6).contains(&retry_after),
        "Retry-After {retry_after} (open_for 5s)"
    );
    assert!(took < Duration::from_millis(500), "took {took:?}");
    assert_eq!(primary.stats().requests, 2);
    let status = breaker_status(&fw, "primary").await;
    assert_eq!(status["state"], "open", "{status}");
    assert!(
        status["open_remaining_ms"].as_u64().unwrap_or(0) > 1000,
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_breaker_stays_open_across_an_unrelated_reload() {
    let primary = start_mock().await;
    primary.set_defaults(FaultScript::parse("status=503").unwrap());
    let backends = [Be("primary", mock_url(&primary), STICKY_BREAKER)];
    let fw = Floodwall::start(&resilience_policy(&backends, &route("primary", ""))).await;
    for _ in 0..2 {
        assert_eq!(chat(&fw, "gpt-4o", false, None).await.status, 503);
    }
    let state = state_series("primary");
    assert_eq!(metric(&fw.metrics().await, &state), Some(2.0));

    // An unrelated edit: one more route.
    let edited = format!(
        "{}  - name: other\n    match: {{ path_prefix: /other }}\n    backend: primary\n",
        route("primary", "").replace("path_prefix: /", "path_prefix: /v1")
    );
    fw.write_policy(&resilience_policy(&backends, &edited));
    fw.wait_metrics("the reload", |m| {
        metric(m, "floodwall_config_reloads_total{result=\"ok\"}").unwrap_or(0.0) >= 1.0
    })
    .await;
    let v = Client::new().get(fw.admin, "/admin/status").await.json();
    assert_eq!(
        v["routes"].as_array().map(Vec::len),
        Some(2),
        "the edit is live: {v}"
    );

    assert_eq!(metric(&fw.metrics().await, &state), Some(2.0));
    assert_eq!(breaker_status(&fw, "primary").await["state"], "open");
    let r = chat(&fw, "gpt-4o", false, None).await;
    r.assert_floodwall_error(503, "circuit_open");
    assert_eq!(
        primary.stats().requests,
        2,
        "still short-circuited after the reload"
    );
}

// ------------------------------------------------------------------ budget

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_retries_under_a_failing_backend() {
    const REQUESTS: usize = 100;
    let mock = start_mock().await;
    mock.set_defaults(FaultScript::parse("status=503").unwrap());
    let routes = route(
        "main",
        "    retry:\n      attempts: 5\n      backoff: { base: 20ms, factor: 1, jitter: none }\n      budget: { ratio: 10%, min_per_second: 1 }\n",
    );
    let fw = Floodwall::start(&resilience_policy(
        &[Be("main", mock_url(&mock), "")],
        &routes,
    ))
    .await;
    let client = Arc::new(Client::new());
    let addr = fw.addr;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..REQUESTS {
        let client = client.clone();
        set.spawn(async move { chat_with(&client, addr, "gpt-4o", false, None).await.status });
    }
    let mut statuses = Vec::new();
    while let Some(s) = set.join_next().await {
        statuses.push(s.unwrap());
    }
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");

    // Budget over the 10 s window: min_per_second × 10 = 10 retries, plus
    // 10% of 100 requests = 10; a few more may slip through when threads
    // race for the last token.
    let attempts = mock.stats().requests as usize;
    let retries = attempts - REQUESTS;
    assert!(
        retries >= 10,
        "the floor alone allows 10 retries; {retries} were made"
    );
    assert!(
        retries <= 20 + 4,
        "{retries} retries for {REQUESTS} requests (a storm would be {})",
        REQUESTS * 4
    );
    let m = fw.metrics().await;
    assert!(
        metric(
            &m,
            "floodwall_retry_giveups_total{route=\"chat\",why=\"budget_exhausted\"}"
        )
        .unwrap_or(0.0)
            > 0.0,
        "{m}"
    );
}
