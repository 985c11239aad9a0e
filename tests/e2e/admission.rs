//! Stream limits, concurrency limits with the priority admission queue,
//! outgoing-call limits and a soak, through the real binary (issue 6).
//!
//! Holders that must keep a slot for as long as a test needs are endless
//! mock streams (`heartbeat=...` without `duration`), released by dropping
//! the client's connection: no test depends on a sleep being long enough.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pingora::protocols::http::client::HttpSession;
use serde_json::Value;

use crate::common::*;

const IDENTITY: &str = "identity:\n  user: [{ header: x-user-id }]\n";
/// An endless SSE stream: the role chunk, then a `: ping` every 100 ms
/// until the client (floodwall) leaves.
pub(crate) const ENDLESS: &str = "heartbeat=100ms";

/// A policy with one backend `main` in front of `mock`: `top` holds
/// top-level sections (column 0), `backend_extra` lines under `main`
/// (indented by four spaces), then the routes.
pub(crate) fn adm_policy(
    mock: &MockServer,
    top: &str,
    backend_extra: &str,
    routes: &str,
) -> String {
    format!(
        r#"version: 1
server:
  listen: ["127.0.0.1:0"]
  admin: {{ listen: "127.0.0.1:0" }}
  threads: 2
  grace_period: 1s
{top}
backends:
  main:
    endpoints: ["{url}"]
    timeouts: {{ connect: 1s, response_headers: 5s }}
{backend_extra}routes:
{routes}"#,
        url = mock_url(mock)
    )
}

/// `name{k="v",...}` with the labels in Prometheus text order (sorted).
pub(crate) fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let mut l: Vec<_> = labels.to_vec();
    l.sort();
    let inner: Vec<String> = l.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

pub(crate) fn value(m: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(m, &series(name, labels)).unwrap_or(0.0)
}

pub(crate) fn streams_active(route: &str) -> String {
    series("floodwall_streams_active", &[("route", route)])
}

pub(crate) fn requests_active(route: &str) -> String {
    series("floodwall_requests_active", &[("route", route)])
}

pub(crate) fn route_in_flight(route: &str) -> String {
    series("floodwall_route_in_flight", &[("route", route)])
}

fn queue_depth(route: &str, class: &str) -> String {
    series(
        "floodwall_queue_depth",
        &[("class", class), ("route", route)],
    )
}

pub(crate) fn rejections(route: &str, cause: &str) -> String {
    series(
        "floodwall_admission_rejections_total",
        &[("cause", cause), ("route", route)],
    )
}

pub(crate) fn retry_after(r: &Resp) -> u64 {
    r.header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After on a {}: {:?}", r.status, r.headers))
        .parse()
        .expect("Retry-After in whole seconds")
}

/// Send a request and return once the response header arrived.
pub(crate) async fn open(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (HttpSession, Instant) {
    Client::new().open(addr, method, path, headers, body).await
}

/// A streaming chat request as `user` with the mock fault `fault`, and
/// extra headers; returns once the response header arrived.
pub(crate) async fn open_stream(
    addr: SocketAddr,
    user: &str,
    fault: &str,
    extra: &[(&str, &str)],
) -> (HttpSession, Instant) {
    let body = chat_body("hello", true).to_string();
    let mut h = vec![
        ("content-type", "application/json"),
        ("x-user-id", user),
        ("x-mock-fault", fault),
    ];
    h.extend_from_slice(extra);
    open(addr, "POST", "/v1/chat/completions", &h, body.as_bytes()).await
}

/// A stream that was admitted: 200 and its first SSE event read.
pub(crate) async fn hold_stream(addr: SocketAddr, user: &str, fault: &str) -> HttpSession {
    hold_stream_with(addr, user, fault, &[]).await
}

/// [`hold_stream`] with extra request headers.
async fn hold_stream_with(
    addr: SocketAddr,
    user: &str,
    fault: &str,
    extra: &[(&str, &str)],
) -> HttpSession {
    let (mut s, _) = open_stream(addr, user, fault, extra).await;
    let status = s.response_header().unwrap().status.as_u16();
    assert_eq!(status, 200, "the stream is admitted");
    let first = tokio::time::timeout(Duration::from_secs(5), s.read_response_body())
        .await
        .expect("first event in time")
        .expect("first event");
    assert!(
        first.as_ref().is_some_and(|c| c.starts_with(b"data: ")),
        "{first:?}"
    );
    s
}

/// A whole streaming chat request as `user`.
async fn stream_to_end(addr: SocketAddr, user: &str, fault: &str) -> Resp {
    stream_to_end_with(addr, user, fault, &[]).await
}

/// [`stream_to_end`] with extra request headers.
async fn stream_to_end_with(
    addr: SocketAddr,
    user: &str,
    fault: &str,
    extra: &[(&str, &str)],
) -> Resp {
    let (mut s, started) = open_stream(addr, user, fault, extra).await;
    read_all(&mut s, started, Duration::from_secs(10)).await
}

/// A whole `GET /v1/models` with these headers.
pub(crate) async fn get(addr: SocketAddr, headers: &[(&str, &str)]) -> Resp {
    Client::new()
        .send(addr, "GET", "/v1/models", headers, b"")
        .await
}

/// The `admission` section of `/admin/status`.
pub(crate) async fn admission(fw: &Floodwall) -> Value {
    let r = Client::new().get(fw.admin, "/admin/status").await;
    assert_eq!(r.status, 200);
    r.json()["admission"].clone()
}

pub(crate) fn route_status<'a>(adm: &'a Value, route: &str) -> &'a Value {
    adm["routes"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["route"] == route))
        .unwrap_or_else(|| panic!("route `{route}` in {adm}"))
}

/// Waiters of `class` on `route`, per `/admin/status`.
fn queued(adm: &Value, route: &str, class: &str) -> u64 {
    route_status(adm, route)["concurrency"]["queued"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["class"] == class))
        .and_then(|d| d["depth"].as_u64())
        .unwrap_or_else(|| panic!("class `{class}` of `{route}` in {adm}"))
}

pub(crate) fn in_flight(adm: &Value, route: &str) -> u64 {
    route_status(adm, route)["concurrency"]["in_flight"]
        .as_u64()
        .unwrap_or_else(|| panic!("in_flight of `{route}` in {adm}"))
}

/// Wait (bounded) until `/admin/status`'s admission section satisfies `f`.
pub(crate) async fn wait_admission(
    fw: &Floodwall,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let adm = admission(fw).await;
        if f(&adm) {
            return adm;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}; admission status: {adm}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A request (`GET /v1/models`) on its own task; its answer and when it
/// arrived.
pub(crate) fn spawn_get(
    addr: SocketAddr,
    headers: Vec<(&'static str, String)>,
) -> tokio::task::JoinHandle<(Resp, Instant)> {
    tokio::spawn(async move {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = get(addr, &h).await;
        (r, Instant::now())
    })
}

pub(crate) async fn join<T>(h: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(15), h)
        .await
        .expect("request task in time")
        .expect("request task")
}

// ------------------------------------------------------------ stream limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_stream_of_one_user_gets_429_stream_limit_and_one_is_admitted_after_another_ends() {
    let mock = start_mock().await;
    let routes = "  - name: chat\n    match: { path_prefix: / }\n    backend: main\n    streams: { per_identity: 2 }\n";
    let fw = Floodwall::start(&adm_policy(&mock, IDENTITY, "", routes)).await;

    let held = hold_stream(fw.addr, "alice", ENDLESS).await;
    // The second ends by itself after 800 ms.
    let (mut ending, ending_started) =
        open_stream(fw.addr, "alice", "heartbeat=100ms;duration=800ms", &[]).await;
    assert_eq!(ending.response_header().unwrap().status.as_u16(), 200);

    let third = stream_to_end(fw.addr, "alice", "chunks=2").await;
    third.assert_floodwall_error(429, "stream_limit");
    assert!(retry_after(&third) >= 1);
    assert!(
        third.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("identity limit of 2"),
        "{}",
        third.text()
    );
    assert_eq!(
        mock.stats().requests,
        2,
        "a refused stream never reaches the backend"
    );

    // Another user is not limited by alice's streams.
    let bob = stream_to_end(fw.addr, "bob", "chunks=2").await;
    assert_eq!(bob.status, 200);
    assert!(bob.complete);

    let m = fw
        .wait_metrics("two open streams", |m| {
            metric(m, &streams_active("chat")) == Some(2.0)
        })
        .await;
    assert_eq!(
        value(
            &m,
            "floodwall_admission_rejections_total",
            &[("cause", "stream_limit"), ("route", "chat")]
        ),
        1.0,
        "{m}"
    );
    let adm = admission(&fw).await;
    assert_eq!(route_status(&adm, "chat")["active_streams"], 2, "{adm}");
    assert_eq!(adm["streams_active"], 2, "{adm}");

    // One of alice's streams ends: her next one is admitted.
    let ended = read_all(&mut ending, ending_started, Duration::from_secs(10)).await;
    assert!(ended.complete, "the 800 ms stream ends cleanly");
    fw.wait_metrics("the ended stream's slot back", |m| {
        metric(m, &streams_active("chat")) == Some(1.0)
    })
    .await;
    let again = hold_stream(fw.addr, "alice", ENDLESS).await;
    // And she is at her cap again.
    stream_to_end(fw.addr, "alice", "chunks=2")
        .await
        .assert_floodwall_error(429, "stream_limit");

    drop(held);
    drop(again);
    fw.wait_metrics("every stream slot back", |m| {
        metric(m, &streams_active("chat")) == Some(0.0)
            && metric(m, &requests_active("chat")) == Some(0.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_and_instance_stream_caps_answer_503_stream_limit_and_let_other_requests_through() {
    let mock = start_mock().await;
    // `capped` (one stream) for requests with `x-route: capped`, `other`
    // (no cap of its own) for the rest; two streams in the instance.
    let routes = "  - name: capped\n    match: { path_prefix: /, header: { x-route: capped } }\n    backend: main\n    streams: { max_concurrent: 1 }\n  - name: other\n    match: { path_prefix: / }\n    backend: main\n";
    let server = "  streams: { max_concurrent: 2 }\n";
    let fw = Floodwall::start(&adm_policy(&mock, server, "", routes)).await;
    let capped = [("x-route", "capped")];

    let held_capped = hold_stream_with(fw.addr, "alice", ENDLESS, &capped).await;
    // Another caller: the route's cap counts every caller.
    let refused = stream_to_end_with(fw.addr, "bob", "chunks=2", &capped).await;
    refused.assert_floodwall_error(503, "stream_limit");
    assert!(retry_after(&refused) >= 1);
    let message = refused.json()["error"]["message"].clone();
    assert!(
        message.as_str().unwrap().contains("route limit of 1"),
        "{message}"
    );
    // A request that is not a stream takes no stream slot.
    let plain = Client::new()
        .send(
            fw.addr,
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json"), ("x-route", "capped")],
            chat_body("hi", false).to_string().as_bytes(),
        )
        .await;
    assert_eq!(plain.status, 200, "{}", plain.text());

    // The instance cap counts every route: a second stream elsewhere fills it.
    let held_other = hold_stream(fw.addr, "carol", ENDLESS).await;
    let refused = stream_to_end(fw.addr, "dave", "chunks=2").await;
    refused.assert_floodwall_error(503, "stream_limit");
    assert!(retry_after(&refused) >= 1);
    let message = refused.json()["error"]["message"].clone();
    assert!(
        message.as_str().unwrap().contains("instance limit of 2"),
        "{message}"
    );
    let adm = admission(&fw).await;
    assert_eq!(
        (adm["streams_active"].as_u64(), adm["streams_max"].as_u64()),
        (Some(2), Some(2)),
        "{adm}"
    );
    let m = fw.metrics().await;
    assert_eq!(
        metric(&m, &rejections("capped", "stream_limit")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, &rejections("other", "stream_limit")),
        Some(1.0),
        "{m}"
    );

    // A stream ends: the instance has room again, and the route too.
    drop(held_capped);
    fw.wait_metrics("the capped route's stream slot back", |m| {
        metric(m, &streams_active("capped")) == Some(0.0)
    })
    .await;
    let next = stream_to_end(fw.addr, "dave", "chunks=2").await;
    assert_eq!(next.status, 200);
    assert!(next.complete);
    fw.wait_metrics("that stream's slot back", |m| {
        metric(m, &streams_active("other")) == Some(1.0)
    })
    .await;
    let next = stream_to_end_with(fw.addr, "bob", "chunks=2", &capped).await;
    assert_eq!(next.status, 200);
    assert!(next.complete);
    drop(held_other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_turns_out_to_be_sse_takes_a_stream_slot_too() {
    let mock = start_mock().await;
    let routes = "  - name: chat\n    match: { path_prefix: / }\n    backend: main\n    streams: { max_concurrent: 1 }\n";
    let fw = Floodwall::start(&adm_policy(&mock, "", "", routes)).await;
    // `stream: false`, but the backend answers with an endless SSE stream.
    let sse_without_asking = |fault: &'static str| {
        let body = chat_body("hello", false).to_string();
        async move {
            let h = [
                ("content-type", "application/json"),
                ("x-mock-fault", fault),
            ];
            open(fw.addr, "POST", "/v1/chat/completions", &h, body.as_bytes()).await
        }
    };
    let (mut held, _) = sse_without_asking(ENDLESS).await;
    let head = held.response_header().unwrap().clone();
    assert_eq!(head.status.as_u16(), 200);
    assert_eq!(head.headers["content-type"], "text/event-stream");
    let first = tokio::time::timeout(Duration::from_secs(5), held.read_response_body())
        .await
        .expect("first event in time")
        .expect("first event");
    assert!(first.is_some());
    let m = fw.metrics().await;
    assert_eq!(metric(&m, &streams_active("chat")), Some(1.0), "{m}");

    // It holds the route's one stream slot: an asked-for stream is refused...
    stream_to_end(fw.addr, "bob", "chunks=2")
        .await
        .assert_floodwall_error(503, "stream_limit");
    // ...and so is another unasked one, when its SSE answer arrives (the
    // upstream request is then dropped).
    let (mut s, started) = sse_without_asking("heartbeat=100ms;scenario=late-sse").await;
    let r = read_all(&mut s, started, Duration::from_secs(5)).await;
    r.assert_floodwall_error(503, "stream_limit");
    eventually(
        "the refused SSE answer's upstream to close",
        Duration::from_secs(3),
        || async {
            (mock.stats().attempts("late-sse").first()?.outcome == "disconnected").then_some(())
        },
    )
    .await;

    drop(held);
    let m = fw
        .wait_metrics("the stream slot back", |m| {
            metric(m, &streams_active("chat")) == Some(0.0)
        })
        .await;
    assert_eq!(
        value(
            &m,
            "floodwall_stream_duration_seconds_count",
            &[("route", "chat")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, &rejections("chat", "stream_limit")),
        Some(2.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_frees_the_upstream_within_1s_and_every_gauge_returns_to_0() {
    let mock = start_mock().await;
    let routes = "  - name: chat\n    match: { path_prefix: / }\n    backend: main\n    streams: { max_concurrent: 10 }\n    concurrency: { max_in_flight: 5 }\n";
    let fw = Floodwall::start(&adm_policy(&mock, "", "", routes)).await;
    // Slow chunks: floodwall must notice the client leaving by itself, not
    // when its next write fails.
    let fault = "chunk_delay=3s;chunks=5";
    let s = hold_stream(fw.addr, "alice", fault).await;
    let m = fw.metrics().await;
    for s in [
        streams_active("chat"),
        requests_active("chat"),
        route_in_flight("chat"),
    ] {
        assert_eq!(metric(&m, &s), Some(1.0), "{s} while streaming:\n{m}");
    }

    drop(s);
    let dropped = Instant::now();
    eventually(
        "the mock to see the upstream connection close",
        Duration::from_secs(3),
        || async { (!mock.stats().disconnects.is_empty()).then_some(()) },
    )
    .await;
    let noticed = dropped.elapsed();
    assert!(
        noticed < Duration::from_secs(1),
        "upstream closed {noticed:?} after the client left"
    );
    assert_eq!(mock.stats().attempts(fault)[0].outcome, "disconnected");

    let m = fw
        .wait_metrics("the gauges to return to 0", |m| {
            metric(m, &streams_active("chat")) == Some(0.0)
                && metric(m, &requests_active("chat")) == Some(0.0)
                && metric(m, &route_in_flight("chat")) == Some(0.0)
        })
        .await;
    assert_eq!(
        value(
            &m,
            "floodwall_stream_disconnects_total",
            &[("route", "chat")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            "floodwall_stream_duration_seconds_count",
            &[("route", "chat")]
        ),
        1.0,
        "{m}"
    );
    let adm = admission(&fw).await;
    assert_eq!(route_status(&adm, "chat")["active_streams"], 0, "{adm}");
    assert_eq!(in_flight(&adm, "chat"), 0, "{adm}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_duration_ends_a_long_stream_with_a_stream_timeout_event_and_counts_it() {
    let mock = start_mock().await;
    let routes = "  - name: chat\n    match: { path_prefix: / }\n    backend: main\n    streams: { max_duration: 1s }\n";
    let fw = Floodwall::start(&adm_policy(&mock, "", "", routes)).await;

    let r = stream_to_end(fw.addr, "alice", ENDLESS).await;
    let took = r.chunks.last().map(|(t, _)| *t).unwrap_or_default();
    assert_eq!(r.status, 200);
    assert!(
        !r.complete,
        "a cut stream must not look complete: {}",
        r.text()
    );
    assert!(
        r.text().contains(": ping"),
        "the heartbeats went through first: {}",
        r.text()
    );
    let events = r.sse_data();
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "stream_timeout", "{}", r.text());
    assert!(last["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_duration"));
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2500),
        "cut after {took:?}"
    );

    // The upstream request is aborted too.
    eventually(
        "the mock to see the upstream connection close",
        Duration::from_secs(3),
        || async { (!mock.stats().disconnects.is_empty()).then_some(()) },
    )
    .await;
    let m = fw
        .wait_metrics("the stream slot back", |m| {
            metric(m, &streams_active("chat")) == Some(0.0)
                && metric(m, &requests_active("chat")) == Some(0.0)
        })
        .await;
    assert_eq!(
        value(
            &m,
            "floodwall_stream_timeouts_total",
            &[("kind", "max_duration"), ("route", "chat")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            "floodwall_stream_disconnects_total",
            &[("route", "chat")]
        ),
        0.0,
        "a cut is not a disconnect"
    );
    assert_eq!(
        value(
            &m,
            "floodwall_stream_ttfb_seconds_count",
            &[("route", "chat")]
        ),
        1.0,
        "time to first byte observed: {m}"
    );
    assert_eq!(
        value(
            &m,
            "floodwall_stream_duration_seconds_count",
            &[("route", "chat")]
        ),
        1.0,
        "{m}"
    );
}

// ------------------------------------------------------------ concurrency and the queue

const PRIORITY_ROUTE: &str = "  - name: agent
    match: { path_prefix: / }
    backend: main
    concurrency:
      max_in_flight: 1
      queue:
        max_depth: 10
        max_wait: 10s
        priority: { header: x-priority, classes: [interactive, normal, batch], default: normal, streaming: interactive }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_slot_frees_a_queued_interactive_request_goes_before_an_earlier_batch_one() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&adm_policy(&mock, "", "", PRIORITY_ROUTE)).await;
    let holder = hold_stream(fw.addr, "holder", ENDLESS).await;

    // Queued in this order: batch (by header), normal (the default),
    // interactive (by header, any case), a stream (no header: `streaming`).
    let fault = |s: &str| ("x-mock-fault", format!("scenario={s};latency=100ms"));
    let batch = spawn_get(
        fw.addr,
        vec![("x-priority", "batch".into()), fault("batch")],
    );
    wait_admission(&fw, "the batch request to queue", |a| {
        queued(a, "agent", "batch") == 1
    })
    .await;
    let normal = spawn_get(fw.addr, vec![fault("normal")]);
    wait_admission(&fw, "the normal request to queue", |a| {
        queued(a, "agent", "normal") == 1
    })
    .await;
    let interactive = spawn_get(
        fw.addr,
        vec![("x-priority", "Interactive".into()), fault("interactive")],
    );
    wait_admission(&fw, "the interactive request to queue", |a| {
        queued(a, "agent", "interactive") == 1
    })
    .await;
    let streamed = tokio::spawn({
        let addr = fw.addr;
        async move {
            let r = stream_to_end(addr, "streamer", "scenario=streamed;chunks=2").await;
            (r, Instant::now())
        }
    });
    let adm = wait_admission(&fw, "the stream to queue as interactive", |a| {
        queued(a, "agent", "interactive") == 2
    })
    .await;
    let agent = route_status(&adm, "agent");
    assert_eq!(agent["concurrency"]["in_flight"], 1, "{adm}");
    assert_eq!(agent["concurrency"]["max_in_flight"], 1, "{adm}");
    assert_eq!(queued(&adm, "agent", "batch"), 1, "{adm}");
    assert_eq!(queued(&adm, "agent", "normal"), 1, "{adm}");
    assert!(
        agent["concurrency"]["oldest_wait_ms"].as_u64().unwrap() > 0,
        "{adm}"
    );
    let m = fw.metrics().await;
    assert_eq!(
        metric(&m, &queue_depth("agent", "interactive")),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, &queue_depth("agent", "normal")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(metric(&m, &queue_depth("agent", "batch")), Some(1.0), "{m}");
    assert_eq!(metric(&m, &route_in_flight("agent")), Some(1.0), "{m}");
    assert_eq!(
        mock.stats().requests,
        1,
        "queued requests wait in floodwall"
    );

    drop(holder);
    let (ri, done_i) = join(interactive).await;
    let (rs, _) = join(streamed).await;
    let (rn, _) = join(normal).await;
    let (rb, done_b) = join(batch).await;
    assert_eq!(
        (ri.status, rs.status, rn.status, rb.status),
        (200, 200, 200, 200)
    );
    assert!(rs.complete);
    assert!(done_i < done_b, "interactive finished before batch");
    // One at a time (max_in_flight 1), so the backend saw them in the
    // order they were admitted: by class, then by arrival.
    let stats = mock.stats();
    let order = ["interactive", "streamed", "normal", "batch"];
    let at: Vec<f64> = order.iter().map(|s| stats.attempts(s)[0].at_ms).collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "the backend saw {order:?} at {at:?} ms"
    );
    let m = fw
        .wait_metrics("the queue and the slot to empty", |m| {
            metric(m, &route_in_flight("agent")) == Some(0.0)
                && ["interactive", "normal", "batch"]
                    .iter()
                    .all(|c| metric(m, &queue_depth("agent", c)) == Some(0.0))
        })
        .await;
    assert_eq!(
        value(
            &m,
            "floodwall_queue_wait_seconds_count",
            &[("route", "agent")]
        ),
        4.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_sheds_the_newcomer_with_503_overloaded() {
    let mock = start_mock().await;
    let routes = "  - name: agent\n    match: { path_prefix: / }\n    backend: main\n    concurrency: { max_in_flight: 1, queue: { max_depth: 1, max_wait: 10s } }\n";
    let fw = Floodwall::start(&adm_policy(&mock, "", "", routes)).await;
    let holder = hold_stream(fw.addr, "holder", ENDLESS).await;
    let waiter = spawn_get(fw.addr, vec![("x-mock-fault", "scenario=waiter".into())]);
    wait_admission(&fw, "the first request to queue", |a| {
        queued(a, "agent", "default") == 1
    })
    .await;

    let started = Instant::now();
    let shed = get(fw.addr, &[("x-mock-fault", "scenario=shed")]).await;
    shed.assert_floodwall_error(503, "overloaded");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "shed at once, not after waiting"
    );
    // Until the waiter must have left the queue: at most max_wait.
    assert!((1..=10).contains(&retry_after(&shed)), "{:?}", shed.headers);
    assert!(shed.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("queue is full"));
    assert!(mock.stats().attempts("shed").is_empty());
    let m = fw.metrics().await;
    assert_eq!(
        metric(&m, &rejections("agent", "queue_full")),
        Some(1.0),
        "{m}"
    );

    drop(holder);
    let (r, _) = join(waiter).await;
    assert_eq!(r.status, 200, "the queued request is served");
    fw.wait_metrics("the slot back", |m| {
        metric(m, &route_in_flight("agent")) == Some(0.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_longer_than_max_wait_is_shed_with_503_overloaded() {
    let mock = start_mock().await;
    let routes = "  - name: agent\n    match: { path_prefix: / }\n    backend: main\n    concurrency: { max_in_flight: 1, queue: { max_depth: 5, max_wait: 600ms } }\n";
    let fw = Floodwall::start(&adm_policy(&mock, "", "", routes)).await;
    let holder = hold_stream(fw.addr, "holder", ENDLESS).await;

    let started = Instant::now();
    let r = get(fw.addr, &[("x-mock-fault", "scenario=late")]).await;
    let waited = started.elapsed();
    r.assert_floodwall_error(503, "overloaded");
    assert!(retry_after(&r) >= 1);
    assert!(
        waited >= Duration::from_millis(550) && waited < Duration::from_millis(2000),
        "shed after {waited:?}, max_wait is 600ms"
    );
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("waited too long"));
    assert!(mock.stats().attempts("late").is_empty());
    let m = fw.metrics().await;
    assert_eq!(
        metric(&m, &rejections("agent", "timeout")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, &queue_depth("agent", "default")),
        Some(0.0),
        "{m}"
    );
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_concurrent_agent_run_of_one_user_gets_429_concurrency_limit() {
    let mock = start_mock().await;
    let routes = "  - name: agent\n    match: { path_prefix: / }\n    backend: main\n    concurrency: { max_in_flight: 10, per_identity: 3 }\n";
    let fw = Floodwall::start(&adm_policy(&mock, IDENTITY, "", routes)).await;
    let alice = |i: usize| {
        vec![
            ("x-user-id", "alice".to_string()),
            ("x-mock-fault", format!("scenario=run-{i};latency=1500ms")),
        ]
    };
    let runs: Vec<_> = (0..3).map(|i| spawn_get(fw.addr, alice(i))).collect();
    wait_admission(&fw, "three runs in flight", |a| in_flight(a, "agent") == 3).await;

    let started = Instant::now();
    let fourth = get(
        fw.addr,
        &[("x-user-id", "alice"), ("x-mock-fault", "scenario=fourth")],
    )
    .await;
    fourth.assert_floodwall_error(429, "concurrency_limit");
    assert!(retry_after(&fourth) >= 1);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    assert!(mock.stats().attempts("fourth").is_empty());
    // Another user still has room on the route.
    let bob = get(fw.addr, &[("x-user-id", "bob")]).await;
    assert_eq!(bob.status, 200);

    for run in runs {
        assert_eq!(join(run).await.0.status, 200);
    }
    fw.wait_metrics("alice's runs to end", |m| {
        metric(m, &route_in_flight("agent")) == Some(0.0)
    })
    .await;
    let again = get(fw.addr, &[("x-user-id", "alice")]).await;
    assert_eq!(again.status, 200, "alice has room again");
    let m = fw.metrics().await;
    assert_eq!(
        metric(&m, &rejections("agent", "per_identity")),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_queued_never_takes_a_slot() {
    let mock = start_mock().await;
    let routes = "  - name: agent\n    match: { path_prefix: / }\n    backend: main\n    concurrency: { max_in_flight: 1, queue: { max_depth: 5, max_wait: 5s } }\n";
    let fw = Floodwall::start(&adm_policy(&mock, "", "", routes)).await;
    let holder = hold_stream(fw.addr, "holder", ENDLESS).await;

    // First in the queue, then gone.
    let mut leaver = RawConn::connect(fw.addr).await;
    leaver
        .write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-mock-fault: scenario=left\r\n\r\n")
        .await;
    wait_admission(&fw, "the leaver to queue", |a| {
        queued(a, "agent", "default") == 1
    })
    .await;
    let next = spawn_get(fw.addr, vec![("x-mock-fault", "scenario=next".into())]);
    wait_admission(&fw, "the next request to queue behind it", |a| {
        queued(a, "agent", "default") == 2
    })
    .await;
    drop(leaver);
    wait_admission(&fw, "the leaver to leave the queue", |a| {
        queued(a, "agent", "default") == 1
    })
    .await;

    // The holder ends: the place goes straight to the request still waiting.
    drop(holder);
    let released = Instant::now();
    let (r, done) = join(next).await;
    assert_eq!(r.status, 200);
    let took = done - released;
    assert!(
        took < Duration::from_secs(1),
        "admitted {took:?} after the slot freed"
    );
    assert!(
        mock.stats().attempts("left").is_empty(),
        "the leaver never reached the backend"
    );
    let adm = wait_admission(&fw, "nothing in flight", |a| in_flight(a, "agent") == 0).await;
    assert_eq!(queued(&adm, "agent", "default"), 0, "{adm}");
    fw.wait_metrics("the gauges to return to 0", |m| {
        metric(m, &route_in_flight("agent")) == Some(0.0)
            && metric(m, &requests_active("agent")) == Some(0.0)
    })
    .await;
}

// ------------------------------------------------------------ outgoing-call limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_over_the_backend_in_flight_limit_waits_max_wait_then_gets_503_upstream_quota() {
    let mock = start_mock().await;
    let routes = "  - name: llm\n    match: { path_prefix: / }\n    backend: main\n";
    let limits = "    limits: { max_in_flight: 1, max_wait: 200ms }\n";
    let fw = Floodwall::start(&adm_policy(&mock, "", limits, routes)).await;
    let holder = hold_stream(fw.addr, "holder", ENDLESS).await;

    let started = Instant::now();
    let r = get(fw.addr, &[("x-mock-fault", "scenario=second")]).await;
    let waited = started.elapsed();
    r.assert_floodwall_error(503, "upstream_quota");
    assert!(retry_after(&r) >= 1);
    assert!(
        waited >= Duration::from_millis(180) && waited < Duration::from_millis(1500),
        "answered after {waited:?}, max_wait is 200ms"
    );
    assert!(mock.stats().attempts("second").is_empty());

    drop(holder);
    fw.wait_metrics("the held call to end", |m| {
        metric(m, &requests_active("llm")) == Some(0.0)
    })
    .await;
    let r = get(fw.addr, &[("x-mock-fault", "scenario=third")]).await;
    assert_eq!(r.status, 200, "the call slot is free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_min_spacing_shows_in_the_mock_attempt_times() {
    let mock = start_mock().await;
    let routes = "  - name: llm\n    match: { path_prefix: / }\n    backend: main\n";
    let limits = "    limits: { min_spacing: 300ms }\n";
    let fw = Floodwall::start(&adm_policy(&mock, "", limits, routes)).await;
    let calls: Vec<_> = (0..4)
        .map(|_| spawn_get(fw.addr, vec![("x-mock-fault", "scenario=spaced".into())]))
        .collect();
    for c in calls {
        assert_eq!(join(c).await.0.status, 200);
    }
    let stats = mock.stats();
    let mut at: Vec<f64> = stats.attempts("spaced").iter().map(|a| a.at_ms).collect();
    assert_eq!(at.len(), 4);
    at.sort_by(f64::total_cmp);
    for w in at.windows(2) {
        let gap = w[1] - w[0];
        // 300 ms at floodwall; the connection set-up of each call may shift
        // its arrival a little either way.
        assert!(
            (270.0..1500.0).contains(&gap),
            "attempts at {at:?} ms: a gap of {gap} ms"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_over_the_backend_per_minute_limit_gets_503_upstream_quota_with_the_wait() {
    let mock = start_mock().await;
    let routes = "  - name: llm\n    match: { path_prefix: / }\n    backend: main\n";
    // `max_wait: 0s`: a call that cannot start at once is refused at once.
    let limits = "    limits: { per_minute: 2, max_wait: 0s }\n";
    let fw = Floodwall::start(&adm_policy(&mock, "", limits, routes)).await;
    for _ in 0..2 {
        let r = get(fw.addr, &[("x-mock-fault", "scenario=minute")]).await;
        assert_eq!(r.status, 200);
    }
    let started = Instant::now();
    let r = get(fw.addr, &[("x-mock-fault", "scenario=minute")]).await;
    r.assert_floodwall_error(503, "upstream_quota");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    // The first call leaves the 60 s window in just under a minute.
    assert!(
        (50..=60).contains(&retry_after(&r)),
        "Retry-After {:?}",
        r.header("retry-after")
    );
    assert_eq!(mock.stats().attempts("minute").len(), 2);
}

// ------------------------------------------------------------ soak

fn soak_policy(mock: &MockServer, route_max: u32, calls_max: u32) -> String {
    let routes = format!(
        "  - name: soak
    match: {{ path_prefix: / }}
    backend: main
    streams: {{ max_concurrent: 1000, per_identity: 100, max_duration: 30s }}
    concurrency:
      max_in_flight: {route_max}
      per_identity: {route_max}
      queue:
        max_depth: 200
        max_wait: 10s
        priority: {{ header: x-priority, classes: [high, low], default: low, streaming: high }}
"
    );
    let limits = format!("    limits: {{ max_in_flight: {calls_max}, max_wait: 10s }}\n");
    adm_policy(mock, IDENTITY, &limits, &routes)
}

/// A small deterministic generator (no `rand` in the tree).
fn mix(seed: u64) -> u64 {
    let mut x = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// One soak request, chosen by `i`; `Err` describes an unexpected outcome.
async fn soak_one(addr: SocketAddr, i: usize) -> Result<(), String> {
    let r = mix(i as u64);
    let user = format!("u{}", r % 10);
    let kind = (r >> 8) % 100;
    let priority = if (r >> 16).is_multiple_of(4) {
        "low"
    } else {
        "high"
    };
    let pause = Duration::from_millis((r >> 24) % 40);
    let extra = [("x-priority", priority)];
    match kind {
        // A whole stream.
        0..=49 => {
            let (mut s, started) =
                open_stream(addr, &user, "chunks=8;chunk_delay=5ms", &extra).await;
            let resp = read_all(&mut s, started, Duration::from_secs(15)).await;
            if resp.status != 200 || !resp.complete {
                return Err(format!("whole stream: {} {}", resp.status, resp.text()));
            }
        }
        // The client leaves mid-stream.
        50..=64 => {
            let (mut s, _) = open_stream(addr, &user, "chunks=40;chunk_delay=20ms", &extra).await;
            let status = s.response_header().unwrap().status.as_u16();
            if status != 200 {
                return Err(format!("stream to leave: {status}"));
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_response_body()).await;
            tokio::time::sleep(pause).await;
        }
        // The backend cuts the stream.
        65..=79 => {
            let (mut s, started) =
                open_stream(addr, &user, "chunks=8;chunk_delay=5ms;cut_after=3", &extra).await;
            let resp = read_all(&mut s, started, Duration::from_secs(15)).await;
            let last = resp.sse_data().last().cloned().unwrap_or_default();
            if resp.status != 200 || resp.complete || !last.contains("upstream_stream_error") {
                return Err(format!("cut stream: {} {}", resp.status, resp.text()));
            }
        }
        // The client leaves at any point: queued, waiting for a call slot,
        // before or just after the response header.
        80..=91 => {
            let body = chat_body("hello", true).to_string();
            let mut c = RawConn::connect(addr).await;
            c.write(
                format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\nx-user-id: {user}\r\nx-mock-fault: chunks=20;chunk_delay=10ms\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
            tokio::time::sleep(pause).await;
        }
        // Not a stream.
        _ => {
            let body = chat_body("hello", false).to_string();
            let resp = Client::new()
                .send(
                    addr,
                    "POST",
                    "/v1/chat/completions",
                    &[
                        ("content-type", "application/json"),
                        ("x-user-id", &user),
                        ("x-mock-fault", "latency=20ms"),
                    ],
                    body.as_bytes(),
                )
                .await;
            if resp.status != 200 {
                return Err(format!("plain request: {} {}", resp.status, resp.text()));
            }
        }
    }
    Ok(())
}

/// `n` soak requests (indices `from..from + n`), `workers` at a time;
/// `at_half` runs when half of them have started.
async fn soak_pass(
    addr: SocketAddr,
    from: usize,
    n: usize,
    workers: usize,
    at_half: impl std::future::Future<Output = ()>,
) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (next, errors) = (next.clone(), errors.clone());
        set.spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n {
                    return;
                }
                if let Err(e) = soak_one(addr, from + k).await {
                    errors
                        .lock()
                        .unwrap()
                        .push(format!("request {}: {e}", from + k));
                }
            }
        });
    }
    eventually("half of the pass to start", Duration::from_secs(20), || {
        let next = next.clone();
        async move { (next.load(Ordering::Relaxed) >= n / 2).then_some(()) }
    })
    .await;
    at_half.await;
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(r) = set.join_next().await {
            r.expect("soak worker");
        }
    })
    .await
    .expect("the soak pass ends in time");
    let errors = errors.lock().unwrap().clone();
    errors
}

/// Every admission gauge of the soak route is back to exactly 0.
async fn assert_soak_gauges_at_zero(fw: &Floodwall, when: &str) {
    fw.wait_metrics(&format!("every gauge at 0 {when}"), |m| {
        [
            streams_active("soak"),
            requests_active("soak"),
            route_in_flight("soak"),
            queue_depth("soak", "high"),
            queue_depth("soak", "low"),
        ]
        .iter()
        .all(|s| metric(m, s) == Some(0.0))
    })
    .await;
    let adm = wait_admission(fw, "admission status at 0", |a| {
        a["streams_active"] == 0 && in_flight(a, "soak") == 0
    })
    .await;
    let route = route_status(&adm, "soak");
    assert_eq!(route["active_streams"], 0, "{adm}");
    assert_eq!(
        queued(&adm, "soak", "high") + queued(&adm, "soak", "low"),
        0,
        "{adm}"
    );
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_disconnects_cuts_and_a_reload_leaves_every_gauge_at_0_and_rss_at_its_warm_level()
{
    const WORKERS: usize = 50;
    const WARM: usize = 150;
    const SOAK: usize = 300;
    let started = Instant::now();
    let mock = start_mock().await;
    let fw = Floodwall::start(&soak_policy(&mock, 40, 35)).await;

    // Warm-up: the same mix, twice, so that connection pools, buffers and
    // the allocator's arenas reach their working size (measured here: the
    // first pass leaves RSS about 2 MiB short of where it settles; from the
    // second on it stays flat within a few hundred KiB over 20 passes).
    for pass in 0..2 {
        let errors = soak_pass(fw.addr, pass * WARM, WARM, WORKERS, async {}).await;
        assert!(errors.is_empty(), "warm-up: {errors:#?}");
    }
    assert_soak_gauges_at_zero(&fw, "after the warm-up").await;
    let warm = rss_kib(fw.pid());

    // The soak, with a reload half-way that lowers both limits.
    let reload = async {
        fw.write_policy(&soak_policy(&mock, 30, 25));
        fw.wait_metrics("the reload", |m| {
            metric(m, "floodwall_config_reloads_total{result=\"ok\"}") == Some(1.0)
        })
        .await;
    };
    let errors = soak_pass(fw.addr, 2 * WARM, SOAK, WORKERS, reload).await;
    assert!(errors.is_empty(), "soak: {errors:#?}");
    assert_soak_gauges_at_zero(&fw, "after the soak").await;
    let m = fw.metrics().await;
    assert!(
        value(
            &m,
            "floodwall_stream_disconnects_total",
            &[("route", "soak")]
        ) > 0.0,
        "the soak had client disconnects: {m}"
    );
    let after = rss_kib(fw.pid());
    eprintln!(
        "soak: RSS {warm} KiB after the warm-up, {after} KiB after the soak; {:?} in all",
        started.elapsed()
    );
    // The issue's bound: within 10% of the warm level (about 4 MiB on this
    // debug build, twice the largest step seen after a warm-up), with a
    // floor of 2 MiB in case the build gets much leaner, since glibc's
    // arenas grow in steps of their own that are not leaks. A leak of a
    // few KiB per request (a stream's buffers, a slot, a metric series per
    // request) over these 300 requests shows well above it.
    let allowed = (warm / 10).max(2048);
    assert!(
        after <= warm + allowed,
        "RSS grew from {warm} KiB to {after} KiB (allowed +{allowed} KiB)"
    );
}

/// The backend's entry in the `admission` section of `/admin/status`.
async fn backend_status(fw: &Floodwall, backend: &str) -> Value {
    let adm = admission(fw).await;
    adm["backends"]
        .as_array()
        .and_then(|a| a.iter().find(|b| b["backend"] == backend))
        .cloned()
        .unwrap_or_else(|| panic!("no backend {backend} in {adm}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adaptive_limit_shrinks_as_backend_latency_rises_and_grows_back_when_it_recovers() {
    use std::sync::atomic::AtomicBool;
    let mock = start_mock().await;
    // 50 ms healthy, so that the scheduling noise of a loaded test machine
    // (tens of ms) stays well inside tolerance x baseline (150 ms).
    mock.set_defaults(FaultScript::parse("latency=50ms").unwrap());
    let routes = "  - name: llm\n    match: { path_prefix: / }\n    backend: main\n";
    let limits = "    limits: { max_wait: 30s, adaptive: { min: 1, max: 8, window: 200ms, tolerance: 3 } }\n";
    let fw = Floodwall::start(&adm_policy(&mock, "", limits, routes)).await;
    assert_eq!(backend_status(&fw, "main").await["adaptive_limit"], 8);

    // Eight clients call back to back until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (addr, stop, failures) = (fw.addr, stop.clone(), failures.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                    let r = get(addr, &[]).await;
                    if r.status != 200 {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{} {}", r.status, r.text()));
                    }
                }
            })
        })
        .collect();
    let limit = |fw: &Floodwall| {
        let fw_admin = fw.admin;
        async move {
            let r = Client::new().get(fw_admin, "/admin/status").await;
            let adm = r.json()["admission"].clone();
            adm["backends"][0]["adaptive_limit"].as_u64().unwrap()
        }
    };

    // Healthy: the limit stays near its max (at most one halving, for a
    // window the test machine stalled).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let healthy = limit(&fw).await;
    assert!(healthy >= 4, "limit {healthy} at a steady 50 ms");

    // Ten times slower: the limit comes down, and the backend sees fewer
    // calls at once.
    mock.set_defaults(FaultScript::parse("latency=500ms").unwrap());
    eventually(
        "the limit to shrink to 2 or less",
        Duration::from_secs(15),
        || async { (limit(&fw).await <= 2).then_some(()) },
    )
    .await;
    // Calls already running when the cap came down finish (they are never
    // cut); then no more than the cap run, and the others wait their turn.
    let fw_ref = &fw;
    eventually(
        "the running calls to drain under the cap, the others queued",
        Duration::from_secs(10),
        || async move {
            let st = backend_status(fw_ref, "main").await;
            let (running, cap, queued) = (
                st["in_flight"].as_u64().unwrap(),
                st["adaptive_limit"].as_u64().unwrap(),
                st["queued"].as_u64().unwrap(),
            );
            (running <= cap && cap <= 2 && queued >= 4).then_some(())
        },
    )
    .await;
    let m = fw.metrics().await;
    assert!(
        metric(&m, r#"floodwall_backend_adaptive_limit{backend="main"}"#).is_some_and(|v| v <= 2.0),
        "{m}"
    );

    // Healthy again: the limit grows back.
    mock.set_defaults(FaultScript::parse("latency=50ms").unwrap());
    eventually(
        "the limit to grow back to 6 or more",
        Duration::from_secs(20),
        || async { (limit(&fw).await >= 6).then_some(()) },
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        tokio::time::timeout(Duration::from_secs(30), c)
            .await
            .expect("clients stop")
            .unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "every call waited its turn and succeeded: {failures:?}"
    );
}
