//! The connection guards, through the real binary over raw TCP:
//! `server.max_connections`, `server.max_request_header_size`,
//! `server.request_header_timeout`, and floodwall's own answer where Pingora
//! refuses a request before any route sees it.

use std::time::{Duration, Instant};

use crate::common::*;

const ROUTE_ALL: &str = "  - name: all\n    match: { path_prefix: / }\n    backend: main\n";

fn guarded(mock: &MockServer, server_extra: &str) -> String {
    policy_with(server_extra, &[("main", &mock_url(mock))], ROUTE_ALL)
}

/// A kept-alive chat call, with `extra` header lines (each ending in CRLF).
fn chat_request(extra: &str) -> Vec<u8> {
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Read one whole response (head and `content-length` body) from `c`.
async fn read_response(c: &mut RawConn) -> (String, Vec<u8>) {
    let head = c.read_head(Duration::from_secs(5)).await;
    let len: usize = head_header(&head, "content-length")
        .map(|v| v.parse().expect("content-length"))
        .unwrap_or(0);
    let body = c.read_exact(len, Duration::from_secs(5)).await;
    (head, body)
}

/// A response head and body that floodwall made: the status, its reason
/// header, and the JSON error with the same code.
fn assert_floodwall_answer(head: &str, body: &[u8], status: u16, reason: &str) {
    let r = Resp::from_raw(head, body);
    r.assert_floodwall_error(status, reason);
    assert_eq!(r.header("content-type"), Some("application/json"));
}

/// `floodwall_connections_refused_total` for `reason`.
fn refused(metrics: &str, reason: &str) -> Option<f64> {
    metric(
        metrics,
        &format!("floodwall_connections_refused_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_max_connections_gets_503_and_a_freed_place_is_reused() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&guarded(&mock, "  max_connections: 2")).await;

    // Two kept-alive connections hold both places.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = RawConn::connect(fw.addr).await;
        c.write(&chat_request("")).await;
        let (head, _) = read_response(&mut c).await;
        assert_eq!(head_status(&head), 200, "{head}");
        held.push(c);
    }
    let m = fw.metrics().await;
    assert_eq!(metric(&m, "floodwall_connections_active"), Some(2.0));
    assert_eq!(metric(&m, "floodwall_connections_limit"), Some(2.0));
    let status = Client::new().get(fw.admin, "/admin/status").await.json();
    assert_eq!(status["connections"]["open"], 2, "{status}");
    assert_eq!(status["connections"]["limit"], 2);
    assert_eq!(
        status["connections"]["limit_source"],
        "server.max_connections"
    );

    // The third is answered and closed.
    let mut third = RawConn::connect(fw.addr).await;
    third.write(&chat_request("")).await;
    let (head, body) = read_response(&mut third).await;
    assert_floodwall_answer(&head, &body, 503, "connection_limit");
    assert_eq!(head_header(&head, "retry-after"), Some("1"));
    assert_eq!(head_header(&head, "connection"), Some("close"));
    assert!(third.read_to_end(Duration::from_secs(5)).await.is_empty());
    assert_eq!(
        mock.stats().requests,
        2,
        "the refused request never went upstream"
    );

    // One place frees: a new connection gets through.
    drop(held.pop());
    let head = eventually("a freed place is taken", Duration::from_secs(5), || async {
        let mut c = RawConn::connect(fw.addr).await;
        c.write(&chat_request("Connection: close\r\n")).await;
        let (head, _) = read_response(&mut c).await;
        (head_status(&head) == 200).then_some(head)
    })
    .await;
    assert_eq!(head_status(&head), 200);

    drop(held);
    let m = fw
        .wait_metrics("every connection closed", |m| {
            metric(m, "floodwall_connections_active") == Some(0.0)
        })
        .await;
    assert!(
        refused(&m, "connection_limit").is_some_and(|v| v >= 1.0),
        "{m}"
    );
    assert!(metric(
        &m,
        r#"floodwall_local_responses_total{reason="connection_limit"}"#
    )
    .is_some_and(|v| v >= 1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_header_over_the_limit_gets_431_on_any_request_of_a_connection() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&guarded(&mock, "  max_request_header_size: 6000")).await;

    // Under the limit: proxied.
    let mut c = RawConn::connect(fw.addr).await;
    let under = format!("x-pad: {}\r\n", "a".repeat(3000));
    c.write(&chat_request(&under)).await;
    let (head, _) = read_response(&mut c).await;
    assert_eq!(head_status(&head), 200, "{head}");

    // A header just under the limit whose end arrives in the same read as
    // the start of its body (Pingora reads 4 KiB first, then up to 4 KiB
    // more): only the header counts.
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "b".repeat(2000)
    );
    let head = |pad: usize| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nx-pad: {}\r\n\r\n",
            body.len(),
            "a".repeat(pad)
        )
    };
    let pad = 5990 - head(0).len();
    let mut req = head(pad).into_bytes();
    assert_eq!(req.len(), 5990);
    req.extend_from_slice(body.as_bytes());
    c.write(&req).await;
    let (head_in, _) = read_response(&mut c).await;
    assert_eq!(
        head_status(&head_in),
        200,
        "a 5990-byte header (limit 6000) is allowed: {head_in}"
    );

    // The next request on the same connection is over it.
    let over = format!("x-pad: {}\r\n", "a".repeat(7000));
    c.write(&chat_request(&over)).await;
    let (head, body) = read_response(&mut c).await;
    assert_floodwall_answer(&head, &body, 431, "header_too_large");
    assert!(
        String::from_utf8_lossy(&body).contains("6000 bytes"),
        "the message gives the limit: {}",
        String::from_utf8_lossy(&body)
    );
    c.read_to_end(Duration::from_secs(5)).await;
    assert_eq!(mock.stats().requests, 2);

    // A header that never ends is refused as soon as it passes the limit.
    let mut c = RawConn::connect(fw.addr).await;
    c.write(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
    c.write(format!("x-pad: {}", "a".repeat(8000)).as_bytes())
        .await;
    let (head, body) = read_response(&mut c).await;
    assert_floodwall_answer(&head, &body, 431, "header_too_large");

    let m = fw.metrics().await;
    assert_eq!(refused(&m, "header_too_large"), Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_trickled_past_its_deadline_gets_408_and_the_connection_closes() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&guarded(&mock, "  request_header_timeout: 1s")).await;
    let started = Instant::now();
    let mut c = RawConn::connect(fw.addr).await;
    // One byte every 100 ms: every read returns data, none completes the head.
    let trickle = async {
        let head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-slow: ";
        for b in head.iter().chain(std::iter::repeat(&b'a')).take(200) {
            use tokio::io::AsyncWriteExt;
            if c.stream.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if started.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_millis(1500), trickle)
        .await
        .ok();
    let (head, body) = read_response(&mut c).await;
    let took = started.elapsed();
    assert_floodwall_answer(&head, &body, 408, "header_timeout");
    assert!(
        took >= Duration::from_millis(900),
        "cut before its deadline: {took:?}"
    );
    c.read_to_end(Duration::from_secs(5)).await;
    assert_eq!(mock.stats().requests, 0);
    let m = fw.metrics().await;
    assert_eq!(refused(&m, "header_timeout"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_at_the_deadline() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&guarded(&mock, "  request_header_timeout: 1s")).await;
    let started = Instant::now();
    let mut c = RawConn::connect(fw.addr).await;
    let got = c.read_to_end(Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(
        got.is_empty(),
        "nothing is said to a silent client: {got:?}"
    );
    assert!(
        took >= Duration::from_millis(900),
        "closed too early: {took:?}"
    );
    let m = fw
        .wait_metrics("the connection is gone", |m| {
            metric(m, "floodwall_connections_active") == Some(0.0)
        })
        .await;
    assert_eq!(refused(&m, "header_timeout"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_idle_time_and_slow_bodies_are_not_header_time() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&guarded(&mock, "  request_header_timeout: 1s")).await;
    let mut c = RawConn::connect(fw.addr).await;
    c.write(&chat_request("")).await;
    assert_eq!(head_status(&read_response(&mut c).await.0), 200);

    // Idle between requests for longer than the header timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.write(&chat_request("")).await;
    assert_eq!(head_status(&read_response(&mut c).await.0), 200);

    // A body sent slowly after a complete header.
    let req = chat_request("");
    let split = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    c.write(&req[..split]).await;
    for part in req[split..].chunks(req[split..].len() / 3 + 1) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.write(part).await;
    }
    let (head, _) = read_response(&mut c).await;
    assert_eq!(head_status(&head), 200, "{head}");
    assert_eq!(mock.stats().requests, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pingora_refuses_get_floodwalls_json_answer() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&guarded(&mock, "")).await;

    let mut c = RawConn::connect(fw.addr).await;
    c.write(b"GET / HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n")
        .await;
    let (head, body) = read_response(&mut c).await;
    assert_floodwall_answer(&head, &body, 400, "invalid_request");
    c.read_to_end(Duration::from_secs(5)).await;

    let mut c = RawConn::connect(fw.addr).await;
    c.write(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .await;
    let (head, body) = read_response(&mut c).await;
    assert_floodwall_answer(&head, &body, 405, "method_not_allowed");

    assert_eq!(mock.stats().requests, 0);
    let m = fw.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"floodwall_local_responses_total{reason="invalid_request"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"floodwall_local_responses_total{reason="method_not_allowed"}"#
        ),
        Some(1.0)
    );
}
