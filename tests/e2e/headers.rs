//! Request ids, trace context, hop-by-hop removal and X-Forwarded-*.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const ROUTE_ALL: &str = "  - name: all\n    match: { path_prefix: / }\n    backend: main\n";

/// The headers the mock's echo endpoint saw.
fn upstream_headers(r: &Resp) -> serde_json::Map<String, Value> {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["headers"]
        .as_object()
        .cloned()
        .expect("echo headers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_request_id_is_passed_upstream_and_echoed() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(&mock_url(&mock), ROUTE_ALL)).await;
    let r = Client::new()
        .send(
            fw.addr,
            "GET",
            "/echo",
            &[("x-request-id", "req-abc-123")],
            b"",
        )
        .await;
    assert_eq!(upstream_headers(&r)["x-request-id"], "req-abc-123");
    assert_eq!(r.header("x-request-id"), Some("req-abc-123"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_request_id_is_generated_and_sent_both_ways() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(&mock_url(&mock), ROUTE_ALL)).await;
    let client = Client::new();
    let r = client.get(fw.addr, "/echo").await;
    let id = r
        .header("x-request-id")
        .expect("x-request-id on the response")
        .to_string();
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    assert_eq!(upstream_headers(&r)["x-request-id"], id.as_str());
    let again = client.get(fw.addr, "/echo").await;
    assert_ne!(
        again.header("x-request-id"),
        Some(id.as_str()),
        "ids are fresh per request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_passes_through_unchanged() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(&mock_url(&mock), ROUTE_ALL)).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = Client::new()
        .send(
            fw.addr,
            "GET",
            "/echo",
            &[("traceparent", tp), ("tracestate", "vendor=abc")],
            b"",
        )
        .await;
    let h = upstream_headers(&r);
    assert_eq!(h["traceparent"], tp);
    assert_eq!(h["tracestate"], "vendor=abc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(&mock_url(&mock), ROUTE_ALL)).await;
    let r = Client::new()
        .send(
            fw.addr,
            "GET",
            "/echo",
            &[
                ("connection", "keep-alive, x-secret"),
                ("x-secret", "do-not-forward"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("trailer", "x-checksum"),
                ("proxy-authorization", "Basic Zm9vOmJhcg=="),
                ("proxy-connection", "keep-alive"),
                ("x-keep", "yes"),
            ],
            b"",
        )
        .await;
    let h = upstream_headers(&r);
    for gone in [
        "x-secret",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(!h.contains_key(gone), "`{gone}` was forwarded: {h:?}");
    }
    if let Some(c) = h.get("connection").and_then(Value::as_str) {
        assert!(
            !c.contains("x-secret"),
            "the client's Connection header was forwarded: {c}"
        );
    }
    assert_eq!(h["x-keep"], "yes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_set_to_the_client() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(&mock_url(&mock), ROUTE_ALL)).await;
    let h = upstream_headers(&Client::new().get(fw.addr, "/echo").await);
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_from_a_trusted_peer_is_appended() {
    // Loopback is trusted by default.
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(&mock_url(&mock), ROUTE_ALL)).await;
    let r = Client::new()
        .send(
            fw.addr,
            "GET",
            "/echo",
            &[
                ("x-forwarded-for", "203.0.113.7"),
                ("x-forwarded-proto", "https"),
            ],
            b"",
        )
        .await;
    let h = upstream_headers(&r);
    assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(
        h["x-forwarded-proto"], "https",
        "a trusted proxy's X-Forwarded-Proto is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_from_an_untrusted_peer_are_replaced() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy_with(
        "  trusted_proxies: [10.0.0.0/8]",
        &[("main", &mock_url(&mock))],
        ROUTE_ALL,
    ))
    .await;
    let r = Client::new()
        .send(
            fw.addr,
            "GET",
            "/echo",
            &[
                ("x-forwarded-for", "203.0.113.7"),
                ("x-forwarded-proto", "https"),
            ],
            b"",
        )
        .await;
    let h = upstream_headers(&r);
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_id_is_replaced() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(&mock_url(&mock), ROUTE_ALL)).await;
    let long = "a".repeat(129);
    for bad in ["has space", long.as_str()] {
        let r = Client::new()
            .send(fw.addr, "GET", "/echo", &[("x-request-id", bad)], b"")
            .await;
        let id = r.header("x-request-id").expect("x-request-id").to_string();
        assert_eq!(id.len(), 32, "{bad:?} replaced by a fresh id, got {id}");
        assert_eq!(upstream_headers(&r)["x-request-id"], id.as_str());
    }
}

/// The request head floodwall sends upstream, byte for byte: the target
/// goes as the client sent it (percent-escapes untouched; a target that is
/// not UTF-8 never gets this far: Pingora answers 400); each header floodwall sets is
/// there once, with the endpoint's Host; the client's own headers keep
/// their values (their names go in lower case, as documented).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_request_head_is_rebuilt_exactly() {
    let up =
        fixed_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Upstream-Case: Kept\r\n\r\nok")
            .await;
    let url = format!("http://{}", up.addr);
    let fw = Floodwall::start(&policy(&url, ROUTE_ALL)).await;
    let mut c = RawConn::connect(fw.addr).await;
    c.write(b"GET /v1/caf%C3%A9;v=1/%2F?q=%FF&r=a+b~ HTTP/1.1\r\nHost: client.example\r\nX-Custom-Thing: Value With Case\r\nX-Request-ID: rid-1\r\nConnection: close\r\n\r\n")
        .await;
    let head = c.read_head(Duration::from_secs(5)).await;
    assert_eq!(head_status(&head), 200, "{head}");
    assert_eq!(head_header(&head, "x-request-id"), Some("rid-1"));
    assert_eq!(head_header(&head, "x-floodwall-backend"), Some("main"));
    assert_eq!(head_header(&head, "x-upstream-case"), Some("Kept"));
    assert_eq!(head.matches("x-request-id").count(), 1, "{head}");

    let sent = up.requests.lock().unwrap()[0].clone();
    let head_end = sent.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let (line, rest) = sent[..head_end].split_at(sent.iter().position(|&b| b == b'\r').unwrap());
    assert_eq!(
        line,
        b"GET /v1/caf%C3%A9;v=1/%2F?q=%FF&r=a+b~ HTTP/1.1",
        "{}",
        String::from_utf8_lossy(line)
    );
    let rest = String::from_utf8(rest.to_vec())
        .unwrap()
        .to_ascii_lowercase();
    let count = |name: &str| {
        rest.lines()
            .filter(|l| l.starts_with(&format!("{name}:")))
            .count()
    };
    for name in [
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-request-id",
        "x-custom-thing",
    ] {
        assert_eq!(count(name), 1, "{name} once in {rest}");
    }
    assert_eq!(count("connection"), 0, "hop-by-hop dropped: {rest}");
    assert!(rest.contains(&format!("host: {}\r\n", up.addr)), "{rest}");
    assert!(rest.contains("x-request-id: rid-1\r\n"), "{rest}");
    assert!(rest.contains("x-forwarded-for: 127.0.0.1\r\n"), "{rest}");
    let raw = String::from_utf8(sent[..head_end].to_vec()).unwrap_or_default();
    assert!(raw.contains("x-custom-thing: Value With Case"), "{raw}");
}
