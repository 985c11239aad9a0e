//! SIGTERM: requests in flight finish, streams still open at the end of the
//! grace period get a `shutting_down` event, and the process exits 0.

use std::time::{Duration, Instant};

use crate::common::*;

fn policy_with_grace(mock: &MockServer, grace: &str) -> String {
    format!(
        r#"version: 1
server:
  listen: ["127.0.0.1:0"]
  admin: {{ listen: "127.0.0.1:0" }}
  threads: 2
  grace_period: {grace}
backends:
  main:
    endpoints: ["http://{}"]
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    backend: main
"#,
        mock.addr()
    )
}

/// Wait (bounded) for the process to exit; its exit code.
async fn exit_code(fw: &mut Floodwall, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = fw.child.try_wait() {
            return status.code();
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_request_in_flight_finish_then_exits_0() {
    let mock = start_mock().await;
    let mut fw = Floodwall::start(&policy_with_grace(&mock, "10s")).await;
    let addr = fw.addr;
    let req = tokio::spawn(async move {
        Client::new()
            .send(
                addr,
                "POST",
                "/v1/chat/completions",
                &[
                    ("content-type", "application/json"),
                    ("x-mock-fault", "latency=700ms"),
                ],
                chat_body("hi", false).to_string().as_bytes(),
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    fw.signal("TERM");
    let resp = req.await.unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    let code = exit_code(&mut fw, Duration::from_secs(5)).await;
    assert_eq!(code, Some(0), "logs:\n{}", fw.logs());
    // It exits once the request is done, not at the end of the 10 s grace period.
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_streams_with_shutting_down_within_the_grace_period() {
    let mock = start_mock().await;
    let mut fw = Floodwall::start(&policy_with_grace(&mock, "2s")).await;
    let body = chat_body("hi", true).to_string();
    let (mut s, started) = Client::new()
        .open(
            fw.addr,
            "POST",
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("x-mock-fault", "chunk_delay=300ms;chunks=100"),
            ],
            body.as_bytes(),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    fw.signal("TERM");
    let resp = read_all(&mut s, started, Duration::from_secs(10)).await;
    let ended = t0.elapsed();
    let events = resp.sse_data();
    let last = events.last().cloned().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&last).unwrap_or_default();
    assert_eq!(v["error"]["code"], "shutting_down", "last event: {last}");
    assert!(!resp.complete, "a cut stream must not end cleanly");
    assert!(
        events.len() > 2,
        "the stream ran until the grace period ended"
    );
    assert!(
        ended >= Duration::from_millis(1200) && ended < Duration::from_millis(2500),
        "ended {ended:?} after SIGTERM (grace 2s, streams end 500ms before it)"
    );
    let code = exit_code(&mut fw, Duration::from_secs(5)).await;
    assert_eq!(code, Some(0), "logs:\n{}", fw.logs());
}

/// A connection accepted before the shutdown whose first request is still
/// arriving gets its answer: Pingora's own clean-up drops every connection
/// still waiting for a request header, so floodwall lets first requests
/// arrive (bounded) before it runs (a binary upgrade hands the listener
/// over the same way, with clients mid-request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_a_first_request_that_was_still_arriving() {
    let mock = start_mock().await;
    let mut fw = Floodwall::start(&policy_with_grace(&mock, "10s")).await;
    let body = chat_body("late", false).to_string();
    let mut c = RawConn::connect(fw.addr).await;
    c.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    fw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.write(
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let head = c.read_head(Duration::from_secs(5)).await;
    assert_eq!(head_status(&head), 200, "{head}\nlogs:\n{}", fw.logs());
    assert_eq!(
        head_header(&head, "connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("close"),
        "{head}"
    );
    let code = exit_code(&mut fw, Duration::from_secs(5)).await;
    assert_eq!(code, Some(0), "logs:\n{}", fw.logs());
}
