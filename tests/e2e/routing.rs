//! Route matching, path rewriting, the no-route answer and round-robin.

use crate::common::*;

/// Five backends on one mock: the `x-floodwall-backend` header names the route taken.
async fn routed() -> (MockServer, Floodwall) {
    let mock = start_mock().await;
    let url = mock_url(&mock);
    let routes = r#"  - name: exact
    match: { path: /v1/special }
    backend: exact
  - name: posts
    match: { path_prefix: /v1/, methods: [POST] }
    backend: posts
  - name: beta
    match: { path_prefix: /v1/, header: { x-route: beta } }
    backend: beta
  - name: internal
    match: { path_prefix: /v1/, host: internal.example.com }
    backend: internal
  - name: general
    match: { path_prefix: /v1/ }
    backend: general
"#;
    let names = ["exact", "posts", "beta", "internal", "general"];
    let backends: Vec<(&str, &str)> = names.iter().map(|n| (*n, url.as_str())).collect();
    let fw = Floodwall::start(&policy_with("", &backends, routes)).await;
    (mock, fw)
}

async fn backend_for(fw: &Floodwall, method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let r = Client::new()
        .send(fw.addr, method, path, headers, b"")
        .await;
    assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
    r.header("x-floodwall-backend")
        .expect("x-floodwall-backend")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_matching_route_wins() {
    let (_mock, fw) = routed().await;
    assert_eq!(backend_for(&fw, "GET", "/v1/special", &[]).await, "exact");
    // POST would match `posts` too, but `exact` comes first.
    assert_eq!(backend_for(&fw, "POST", "/v1/special", &[]).await, "exact");
    // An exact path does not match as a prefix.
    assert_eq!(
        backend_for(&fw, "GET", "/v1/special/more", &[]).await,
        "general"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_filter_selects_the_route() {
    let (_mock, fw) = routed().await;
    assert_eq!(backend_for(&fw, "POST", "/v1/echo", &[]).await, "posts");
    assert_eq!(backend_for(&fw, "GET", "/v1/echo", &[]).await, "general");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_match_selects_the_route() {
    let (_mock, fw) = routed().await;
    assert_eq!(
        backend_for(&fw, "GET", "/v1/echo", &[("x-route", "beta")]).await,
        "beta"
    );
    assert_eq!(
        backend_for(&fw, "GET", "/v1/echo", &[("x-route", "gamma")]).await,
        "general"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_match_ignores_port_and_case() {
    let (_mock, fw) = routed().await;
    assert_eq!(
        backend_for(
            &fw,
            "GET",
            "/v1/echo",
            &[("host", "Internal.Example.com:8080")]
        )
        .await,
        "internal"
    );
    assert_eq!(
        backend_for(&fw, "GET", "/v1/echo", &[("host", "other.example.com")]).await,
        "general"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_request_gets_404_no_route() {
    let (mock, fw) = routed().await;
    let r = Client::new().get(fw.addr, "/elsewhere").await;
    r.assert_floodwall_error(404, "no_route");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/elsewhere"));
    assert!(r.header("x-request-id").is_some());
    assert_eq!(mock.stats().requests, 0, "nothing reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_prefix_rewrites_the_path_and_keeps_the_query() {
    let mock = start_mock().await;
    let routes = "  - name: egress\n    match: { path_prefix: /openai/v1/ }\n    rewrite: { strip_prefix: /openai }\n    backend: main\n";
    let fw = Floodwall::start(&policy(&mock_url(&mock), routes)).await;
    let r = Client::new().get(fw.addr, "/openai/v1/models?x=1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["object"], "list", "the mock's /v1/models answered");
    let stats = mock.stats();
    let paths: Vec<&str> = stats
        .attempts("default")
        .iter()
        .map(|a| a.path.as_str())
        .collect();
    assert_eq!(paths, ["/v1/models?x=1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_of_a_backend_share_requests_round_robin() {
    let a = start_mock().await;
    let b = start_mock().await;
    let p = format!(
        r#"version: 1
server:
  listen: ["127.0.0.1:0"]
  admin: {{ listen: "127.0.0.1:0" }}
  threads: 2
backends:
  pair:
    endpoints: ["{}", "{}"]
    timeouts: {{ connect: 1s, response_headers: 5s }}
routes:
  - name: all
    match: {{ path_prefix: / }}
    backend: pair
"#,
        mock_url(&a),
        mock_url(&b)
    );
    let fw = Floodwall::start(&p).await;
    let client = Client::new();
    for _ in 0..10 {
        assert_eq!(client.get(fw.addr, "/v1/models").await.status, 200);
    }
    assert_eq!((a.stats().requests, b.stats().requests), (5, 5));
}
