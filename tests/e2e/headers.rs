//! Request ids, trace context, hop-by-hop removal and X-Forwarded-*.

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
