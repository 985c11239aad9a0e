//! Request checks answered by floodwall itself: 413 and the 400s. Each
//! message names the field, the limit and the size that was sent.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

const ROUTES: &str = r#"  - name: small
    match: { path_prefix: /small/ }
    backend: main
    request: { max_body: 1KiB }
  - name: chat
    match: { path_prefix: /v1/chat/ }
    backend: main
    request:
      max_messages: 3
      max_prompt_chars: 100
  - name: search
    match: { path_prefix: /search }
    backend: main
    request:
      fields:
        - { path: query, max_chars: 20 }
        - { path: metadata.sessionId, format: uuid }
        - { path: prompt, min_chars: 1 }
"#;

async fn setup() -> (MockServer, Floodwall) {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(&mock_url(&mock), ROUTES)).await;
    (mock, fw)
}

fn message(r: &Resp) -> String {
    r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} does not mention {p:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_max_body_gets_413() {
    let (mock, fw) = setup().await;
    let body = vec![b'x'; 2048];
    let r = Client::new()
        .send(
            fw.addr,
            "POST",
            "/small/upload",
            &[("content-type", "text/plain")],
            &body,
        )
        .await;
    r.assert_floodwall_error(413, "body_too_large");
    assert_mentions(&message(&r), &["2048", "1024"]);
    assert_eq!(mock.stats().requests, 0);
    // A body just under the limit passes.
    let ok = Client::new()
        .send(fw.addr, "POST", "/small/upload", &[], &[b'x'; 1000])
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_max_body_gets_413() {
    let (mock, fw) = setup().await;
    let mut c = RawConn::connect(fw.addr).await;
    let mut req =
        b"POST /small/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        req.extend_from_slice(b"400\r\n");
        req.extend_from_slice(&[b'y'; 0x400]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    c.write(&req).await;
    let head = c.read_head(Duration::from_secs(5)).await;
    assert_eq!(head_status(&head), 413, "{head}");
    assert_eq!(
        head_header(&head, "x-floodwall-reason"),
        Some("body_too_large")
    );
    assert_eq!(mock.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_gets_400_saying_where() {
    let (mock, fw) = setup().await;
    let body = b"{\"model\": \"m\",\n  \"messages\": [}\n";
    let r = Client::new()
        .send(
            fw.addr,
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            body,
        )
        .await;
    r.assert_floodwall_error(400, "invalid_json");
    assert_mentions(&message(&r), &["line 2 column 16"]);
    assert_eq!(mock.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_messages_gets_400_naming_limit_and_size() {
    let (_mock, fw) = setup().await;
    let msgs: Vec<_> = (0..5)
        .map(|i| json!({"role": "user", "content": format!("m{i}")}))
        .collect();
    let r = Client::new()
        .post_json(
            fw.addr,
            "/v1/chat/completions",
            &json!({"model": "m", "messages": msgs}),
        )
        .await;
    r.assert_floodwall_error(400, "request_too_large");
    assert_mentions(&message(&r), &["messages", "5", "3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_prompt_gets_400_naming_limit_and_size() {
    let (_mock, fw) = setup().await;
    let r = Client::new()
        .post_json(
            fw.addr,
            "/v1/chat/completions",
            &chat_body(&"z".repeat(150), false),
        )
        .await;
    r.assert_floodwall_error(400, "request_too_large");
    assert_mentions(&message(&r), &["prompt", "150", "100"]);
    // Within the limits the request goes through.
    let ok = Client::new()
        .post_json(fw.addr, "/v1/chat/completions", &chat_body("short", false))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_checks_name_the_field_limit_and_size() {
    let (mock, fw) = setup().await;
    let client = Client::new();
    let good_uuid = "123e4567-e89b-12d3-a456-426614174000";

    let r = client
        .post_json(
            fw.addr,
            "/search",
            &json!({"query": "q".repeat(25), "prompt": "p"}),
        )
        .await;
    r.assert_floodwall_error(400, "request_too_large");
    assert_mentions(&message(&r), &["query", "25", "20"]);

    let r = client
        .post_json(
            fw.addr,
            "/search",
            &json!({"query": "ok", "prompt": "p", "metadata": {"sessionId": "not-a-uuid"}}),
        )
        .await;
    r.assert_floodwall_error(400, "request_too_large");
    assert_mentions(&message(&r), &["metadata.sessionId", "UUID", "10"]);

    let r = client
        .post_json(fw.addr, "/search", &json!({"query": "ok", "prompt": ""}))
        .await;
    r.assert_floodwall_error(400, "request_too_large");
    assert_mentions(&message(&r), &["prompt", "0", "1"]);

    assert_eq!(mock.stats().requests, 0);
    let ok = client
        .post_json(
            fw.addr,
            "/search",
            &json!({"query": "ok", "prompt": "p", "metadata": {"sessionId": good_uuid}}),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
}
