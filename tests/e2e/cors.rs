//! CORS: preflights answered by floodwall, headers on every response.

use crate::common::*;

const ORIGIN: &str = "https://app.example.com";

async fn setup() -> (MockServer, Floodwall) {
    let mock = start_mock().await;
    let server = r#"  cors:
    allow_origins: ["https://app.example.com"]
    allow_headers: [authorization, content-type, x-request-id]
    expose_headers: [retry-after, x-floodwall-reason]"#;
    let routes = "  - name: v1\n    match: { path_prefix: /v1/ }\n    backend: main\n";
    let fw = Floodwall::start(&policy_with(server, &[("main", &mock_url(&mock))], routes)).await;
    (mock, fw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_is_answered_with_204() {
    let (mock, fw) = setup().await;
    let r = Client::new()
        .send(
            fw.addr,
            "OPTIONS",
            "/v1/chat/completions",
            &[
                ("origin", ORIGIN),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "content-type"),
            ],
            b"",
        )
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
    let methods = r
        .header("access-control-allow-methods")
        .expect("allow-methods");
    assert!(methods.contains("POST"), "{methods}");
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("authorization, content-type, x-request-id")
    );
    assert!(r.body.is_empty());
    assert_eq!(
        mock.stats().requests,
        0,
        "a preflight never reaches the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_and_local_responses_carry_cors_headers() {
    let (_mock, fw) = setup().await;
    let client = Client::new();
    let ok = client
        .send(fw.addr, "GET", "/v1/models", &[("origin", ORIGIN)], b"")
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(
        ok.header("access-control-expose-headers"),
        Some("retry-after, x-floodwall-reason")
    );

    let missing = client
        .send(fw.addr, "GET", "/nowhere", &[("origin", ORIGIN)], b"")
        .await;
    missing.assert_floodwall_error(404, "no_route");
    assert_eq!(missing.header("access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(
        missing.header("access-control-expose-headers"),
        Some("retry-after, x-floodwall-reason")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_origin_gets_no_cors_headers() {
    let (_mock, fw) = setup().await;
    let client = Client::new();
    let evil = "https://evil.example";
    let r = client
        .send(fw.addr, "GET", "/v1/models", &[("origin", evil)], b"")
        .await;
    assert_eq!(r.status, 200);
    let pre = client
        .send(
            fw.addr,
            "OPTIONS",
            "/v1/models",
            &[("origin", evil), ("access-control-request-method", "GET")],
            b"",
        )
        .await;
    for resp in [&r, &pre] {
        let cors: Vec<_> = resp
            .headers
            .keys()
            .filter(|k| k.as_str().starts_with("access-control-"))
            .collect();
        assert!(
            cors.is_empty(),
            "CORS headers for a disallowed origin: {cors:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_vary_is_merged_with_the_upstreams_vary() {
    let up = fixed_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nVary: Accept-Encoding\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    let server = "  cors:\n    allow_origins: [\"https://app.example.com\"]";
    let routes = "  - name: v1\n    match: { path_prefix: /v1/ }\n    backend: main\n";
    let fw = Floodwall::start(&policy_with(
        server,
        &[("main", &format!("http://{}", up.addr))],
        routes,
    ))
    .await;
    let r = Client::new()
        .send(fw.addr, "GET", "/v1/models", &[("origin", ORIGIN)], b"")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
    let vary: Vec<String> = r
        .headers
        .get_all("vary")
        .iter()
        .flat_map(|v| {
            v.to_str()
                .unwrap()
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        vary.contains(&"accept-encoding".to_string()),
        "upstream's Vary kept: {vary:?}"
    );
    assert!(
        vary.contains(&"origin".to_string()),
        "Vary: Origin added: {vary:?}"
    );
}
