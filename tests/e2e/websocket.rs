//! WebSocket routes: the Upgrade passes through and bytes flow both ways.

use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through_and_echoes_both_ways() {
    let mock = start_mock().await;
    let routes = "  - name: ws\n    match: { path: /ws }\n    websocket: true\n    backend: main\n";
    let fw = Floodwall::start(&policy(&mock_url(&mock), routes)).await;
    let mut c = RawConn::connect(fw.addr).await;
    c.write(
        b"GET /ws HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    let head = c.read_head(Duration::from_secs(5)).await;
    assert_eq!(head_status(&head), 101, "{head}");
    assert_eq!(head_header(&head, "sec-websocket-accept"), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    assert!(head_header(&head, "upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")), "{head}");

    for msg in [&b"hello through floodwall"[..], &[0x81, 0x05, 0xff, 0x00, 0x10, 0x20, 0x30][..]] {
        c.write(msg).await;
        let echoed = c.read_exact(msg.len(), Duration::from_secs(5)).await;
        assert_eq!(echoed, msg);
    }
    assert_eq!(mock.stats().attempts("default")[0].status, 101);
}
