//! Bodies come through unchanged and unbuffered; upstream connections are pooled.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

const ROUTE_ALL: &str = "  - name: all\n    match: { path_prefix: / }\n    backend: main\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_response_passes_through_byte_for_byte() {
    let body = "{\"id\":\"cmpl-1\",\"choices\":[{\"message\":{\"content\":\"h\u{e9}llo \u{2014} \u{4e16}\u{754c} \u{1f680}\"}}],\"n\":1}";
    let raw = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Upstream: fixed\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let up = fixed_upstream(raw.as_bytes()).await;
    let fw = Floodwall::start(&policy(&format!("http://{}", up.addr), ROUTE_ALL)).await;

    let r = Client::new()
        .post_json(fw.addr, "/v1/chat/completions", &chat_body("hi", false))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body.as_ref(),
        body.as_bytes(),
        "body differs: {:?}",
        r.text()
    );
    assert!(r.complete);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-upstream"), Some("fixed"));
    assert_eq!(r.header("x-floodwall-backend"), Some("main"));
    assert_eq!(up.requests.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_sse_response_passes_through_byte_for_byte() {
    // Chunk boundaries fall inside events and inside multi-byte characters.
    let events: Vec<String> = vec![
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n".into(),
        "data: {\"choices\":[{\"delta\":{\"content\":\"Gr\u{fc}\u{df}e \u{65e5}\u{672c}\"}}]}\n\n".into(),
        ": keep-alive comment\n\n".into(),
        "event: note\ndata: {\"choices\":[{\"delta\":{\"content\":\" \u{1f30d}\u{1f680} caf\u{e9}\"}}]}\n\n".into(),
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n".into(),
        "data: [DONE]\n\n".into(),
    ];
    let body: Vec<u8> = events.concat().into_bytes();
    let cuts = [7usize, 60, 95, 97, 150, 151, body.len()];
    let mut raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let mut at = 0;
    for cut in cuts {
        let piece = &body[at..cut];
        raw.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
        at = cut;
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let up = fixed_upstream(&raw).await;
    let fw = Floodwall::start(&policy(&format!("http://{}", up.addr), ROUTE_ALL)).await;

    let r = Client::new()
        .post_json(fw.addr, "/v1/chat/completions", &chat_body("hi", true))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body.as_ref(),
        body.as_slice(),
        "body differs: {:?}",
        r.text()
    );
    assert!(r.complete, "a finished stream ends with its terminator");
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.sse_data().last().map(String::as_str), Some("[DONE]"));
}

/// Whether an SSE data payload carries non-empty `delta.content`.
fn is_content_event(data: &str) -> bool {
    serde_json::from_str::<Value>(data)
        .ok()
        .and_then(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(|s| !s.is_empty())
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_reach_the_client_as_they_are_produced() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(&mock_url(&mock), ROUTE_ALL)).await;
    let body = chat_body("hello", true).to_string();
    let r = Client::new()
        .send(
            fw.addr,
            "POST",
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("x-mock-fault", "chunk_delay=1500ms;chunks=3"),
            ],
            body.as_bytes(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.complete);
    // When did the k-th content event become complete at the client?
    let mut text = String::new();
    let mut arrivals = Vec::new();
    for (t, c) in &r.chunks {
        text.push_str(&String::from_utf8_lossy(c));
        let complete_events = &text[..text.rfind("\n\n").map_or(0, |i| i + 2)];
        let n = sse_data(complete_events)
            .iter()
            .filter(|d| is_content_event(d))
            .count();
        while arrivals.len() < n {
            arrivals.push(*t);
        }
    }
    assert_eq!(arrivals.len(), 3, "three content events in {:?}", r.text());
    assert!(
        arrivals[0] < Duration::from_millis(1200),
        "first event after {:?}",
        arrivals[0]
    );
    assert!(
        arrivals[2] > Duration::from_millis(2500),
        "last event after {:?}",
        arrivals[2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_prompt_passes_through_intact() {
    let mock = start_mock().await;
    let routes = "  - name: all\n    match: { path_prefix: / }\n    backend: main\n    request: { max_body: 1MiB }\n";
    let fw = Floodwall::start(&policy(&mock_url(&mock), routes)).await;
    let prompt: String = (0..500 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let body = json!({"model": "m", "messages": [{"role": "user", "content": prompt}]}).to_string();
    assert!(body.len() > 500 * 1024);
    let r = Client::new()
        .send(
            fw.addr,
            "POST",
            "/v1/echo",
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["body_len"], body.len());
    assert_eq!(v["body_sha256"], sha256_hex(body.as_bytes()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(&mock_url(&mock), ROUTE_ALL)).await;
    let client = Client::new();
    for _ in 0..5 {
        let r = client.get(fw.addr, "/v1/models").await;
        assert_eq!(r.status, 200);
    }
    let stats = mock.stats();
    let attempts = stats.attempts("default");
    assert_eq!(attempts.len(), 5);
    assert!(
        attempts.iter().any(|a| a.request_on_connection > 0),
        "no request reused a connection: {attempts:?}"
    );
    assert!(
        stats.connections_accepted < 5,
        "{} connections for 5 requests",
        stats.connections_accepted
    );
}
