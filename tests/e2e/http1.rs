//! HTTP/1.1 framing through floodwall: request bodies in either framing,
//! `Expect: 100-continue`, bodiless statuses, close-delimited upstream bodies.

use std::time::Duration;

use crate::common::*;

const ROUTE_ALL: &str = "  - name: all\n    match: { path_prefix: / }\n    backend: main\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_is_forwarded_intact() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(&mock_url(&mock), ROUTE_ALL)).await;
    let body = "{\"prompt\":\"caf\u{e9} \u{1f680}\",\"n\":1}".as_bytes();
    let (a, b) = body.split_at(13); // splits the multi-byte character
    let mut req = b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for part in [a, b] {
        req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let mut c = RawConn::connect(fw.addr).await;
    c.write(&req).await;
    let head = c.read_head(Duration::from_secs(5)).await;
    assert_eq!(head_status(&head), 200, "{head}");
    let len: usize = head_header(&head, "content-length")
        .expect("content-length")
        .parse()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&c.read_exact(len, Duration::from_secs(5)).await).unwrap();
    assert_eq!(v["body_len"], body.len());
    assert_eq!(v["body_sha256"], sha256_hex(body));
    assert!(
        v["headers"].get("transfer-encoding").is_none(),
        "re-framed with a length: {v}"
    );
    assert_eq!(v["headers"]["content-length"], body.len().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_gets_100_then_the_upstream_answer() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(&mock_url(&mock), ROUTE_ALL)).await;
    let body = b"{\"model\":\"m\",\"messages\":[]}";
    let mut c = RawConn::connect(fw.addr).await;
    c.write(
        format!(
            "POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    // Clients wait about a second for the 100 before sending anyway.
    let interim = c.read_head(Duration::from_millis(900)).await;
    assert_eq!(head_status(&interim), 100, "{interim}");
    c.write(body).await;
    let head = c.read_head(Duration::from_secs(5)).await;
    assert_eq!(
        head_status(&head),
        200,
        "the final answer follows the 100: {head}"
    );
    let len: usize = head_header(&head, "content-length")
        .expect("content-length")
        .parse()
        .unwrap();
    let echoed = c.read_exact(len, Duration::from_secs(5)).await;
    let v: serde_json::Value = serde_json::from_slice(&echoed).unwrap();
    assert_eq!(v["body_sha256"], sha256_hex(body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_over_max_body_gets_413_without_100() {
    let mock = start_mock().await;
    let routes = "  - name: all\n    match: { path_prefix: / }\n    backend: main\n    request: { max_body: 1KiB }\n";
    let fw = Floodwall::start(&policy(&mock_url(&mock), routes)).await;
    let mut c = RawConn::connect(fw.addr).await;
    c.write(b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2048\r\nExpect: 100-continue\r\n\r\n")
        .await;
    let head = c.read_head(Duration::from_secs(5)).await;
    assert_eq!(head_status(&head), 413, "{head}");
    assert_eq!(
        head_header(&head, "x-floodwall-reason"),
        Some("body_too_large")
    );
    assert_eq!(mock.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_statuses_get_no_transfer_encoding() {
    for status in ["204 No Content", "304 Not Modified"] {
        let up = fixed_upstream(format!("HTTP/1.1 {status}\r\nX-A: 1\r\n\r\n").as_bytes()).await;
        let fw = Floodwall::start(&policy(&format!("http://{}", up.addr), ROUTE_ALL)).await;
        let mut c = RawConn::connect(fw.addr).await;
        for _ in 0..2 {
            // keep-alive: the second answer parses, so no stray body bytes came first
            c.write(b"GET /thing HTTP/1.1\r\nHost: x\r\n\r\n").await;
            let head = c.read_head(Duration::from_secs(5)).await;
            assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
            assert_eq!(
                head_header(&head, "transfer-encoding"),
                None,
                "RFC 9112 6.1 forbids it on {status}: {head}"
            );
            assert_eq!(head_header(&head, "x-a"), Some("1"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_upstream_body_is_delivered_complete() {
    let up = fixed_upstream_closing(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nhello \xe2\x82\xac world",
    )
    .await;
    let fw = Floodwall::start(&policy(&format!("http://{}", up.addr), ROUTE_ALL)).await;
    let r = Client::new().get(fw.addr, "/x").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello \u{20ac} world");
    assert!(r.complete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_client_gets_an_unchunked_stream_ended_by_close() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(&mock_url(&mock), ROUTE_ALL)).await;
    let body = chat_body("hi", true).to_string();
    let mut c = RawConn::connect(fw.addr).await;
    c.write(
        format!(
            "POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nx-mock-fault: chunks=2\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let head = c.read_head(Duration::from_secs(5)).await;
    assert_eq!(head_status(&head), 200, "{head}");
    assert_eq!(
        head_header(&head, "transfer-encoding"),
        None,
        "HTTP/1.0 has no chunked coding: {head}"
    );
    let raw = String::from_utf8(c.read_to_end(Duration::from_secs(5)).await).unwrap();
    assert!(raw.starts_with("data: {"), "no chunk-size line: {raw:?}");
    assert!(raw.ends_with("data: [DONE]\n\n"), "{raw:?}");
    assert_eq!(
        sse_data(&raw).len(),
        5,
        "role, two words, finish, [DONE]: {raw:?}"
    );
}
