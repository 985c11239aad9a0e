//! WebSocket routes: the Upgrade passes through and bytes flow both ways.

use std::time::Duration;

use crate::common::*;

const UPGRADE: &[u8] =
    b"GET /ws HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through_and_echoes_both_ways() {
    let mock = start_mock().await;
    let routes = "  - name: ws\n    match: { path: /ws }\n    websocket: true\n    backend: main\n";
    let fw = Floodwall::start(&policy(&mock_url(&mock), routes)).await;
    let mut c = RawConn::connect(fw.addr).await;
    c.write(UPGRADE).await;
    let head = c.read_head(Duration::from_secs(5)).await;
    assert_eq!(head_status(&head), 101, "{head}");
    assert_eq!(
        head_header(&head, "sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    assert!(
        head_header(&head, "upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")),
        "{head}"
    );

    for msg in [
        &b"hello through floodwall"[..],
        &[0x81, 0x05, 0xff, 0x00, 0x10, 0x20, 0x30][..],
    ] {
        c.write(msg).await;
        let echoed = c.read_exact(msg.len(), Duration::from_secs(5)).await;
        assert_eq!(echoed, msg);
    }
    assert_eq!(mock.stats().attempts("default")[0].status, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_round_robin_with_each_endpoints_host() {
    let answer =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    let a = fixed_upstream(answer).await;
    let b = fixed_upstream(answer).await;
    let p = format!(
        r#"version: 1
server:
  listen: ["127.0.0.1:0"]
  admin: {{ listen: "127.0.0.1:0" }}
  threads: 2
backends:
  pair:
    endpoints: ["http://{}", "http://{}"]
routes:
  - name: ws
    match: {{ path: /ws }}
    websocket: true
    backend: pair
"#,
        a.addr, b.addr
    );
    let fw = Floodwall::start(&p).await;
    for _ in 0..2 {
        let mut c = RawConn::connect(fw.addr).await;
        c.write(UPGRADE).await;
        let head = c.read_head(Duration::from_secs(5)).await;
        assert_eq!(head_status(&head), 101, "{head}");
    }
    for up in [&a, &b] {
        let seen = up.requests.lock().unwrap();
        assert_eq!(seen.len(), 1, "one upgrade per endpoint");
        let head = String::from_utf8_lossy(&seen[0]).into_owned();
        assert_eq!(
            head_header(&head, "host"),
            Some(up.addr.to_string().as_str()),
            "{head}"
        );
        assert_eq!(
            head_header(&head, "x-forwarded-for"),
            Some("127.0.0.1"),
            "{head}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_backend_refusing_gets_502_upstream_connect_error() {
    let port = free_port();
    let routes = "  - name: ws\n    match: { path: /ws }\n    websocket: true\n    backend: main\n";
    let fw = Floodwall::start(&policy(&format!("http://127.0.0.1:{port}"), routes)).await;
    let mut c = RawConn::connect(fw.addr).await;
    c.write(UPGRADE).await;
    let head = c.read_head(Duration::from_secs(5)).await;
    assert_eq!(head_status(&head), 502, "{head}");
    assert_eq!(
        head_header(&head, "x-floodwall-reason"),
        Some("upstream_connect_error")
    );
    let body = c.read_to_end(Duration::from_secs(5)).await;
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON error body");
    assert_eq!(v["error"]["code"], "upstream_connect_error");
}
