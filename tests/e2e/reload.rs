//! Live reload: file edits, broken edits, in-flight streams, SIGHUP and
//! Kubernetes ConfigMap symlink swaps.

use std::time::Duration;

use crate::common::*;

const OK: &str = "floodwall_config_reloads_total{result=\"ok\"}";
const ERROR: &str = "floodwall_config_reloads_total{result=\"error\"}";

struct Two {
    a: MockServer,
    b: MockServer,
}

impl Two {
    async fn start() -> Two {
        Two {
            a: start_mock().await,
            b: start_mock().await,
        }
    }

    /// Both backends defined; the route uses `backend`.
    fn policy(&self, backend: &str) -> String {
        let routes =
            format!("  - name: chat\n    match: {{ path_prefix: / }}\n    backend: {backend}\n");
        policy_with(
            "",
            &[("a", &mock_url(&self.a)), ("b", &mock_url(&self.b))],
            &routes,
        )
    }
}

async fn backend_of(fw: &Floodwall) -> String {
    let r = Client::new().get(fw.addr, "/v1/models").await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.header("x-floodwall-backend")
        .unwrap_or_default()
        .to_string()
}

async fn wait_for_backend(fw: &Floodwall, want: &str) {
    eventually(
        &format!("requests to go to backend `{want}`"),
        Duration::from_secs(10),
        || async { (backend_of(fw).await == want).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_route_backend_applies_to_the_next_requests() {
    let two = Two::start().await;
    let fw = Floodwall::start(&two.policy("a")).await;
    assert_eq!(backend_of(&fw).await, "a");
    fw.write_policy(&two.policy("b"));
    wait_for_backend(&fw, "b").await;
    assert!(two.b.stats().requests > 0);
    let m = fw.metrics().await;
    assert!(metric(&m, OK).unwrap_or(0.0) >= 1.0, "{m}");
    assert_eq!(metric(&m, ERROR), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_edit_keeps_the_old_policy_serving() {
    let two = Two::start().await;
    let fw = Floodwall::start(&two.policy("a")).await;
    fw.write_policy(
        &two.policy("b")
            .replace("routes:", "routes: [oops")
            .replace("threads: 2", "threads: 0"),
    );
    fw.wait_metrics("a failed reload", |m| {
        metric(m, ERROR).unwrap_or(0.0) >= 1.0
    })
    .await;
    assert_eq!(
        backend_of(&fw).await,
        "a",
        "the previous policy still serves"
    );
    let m = fw.metrics().await;
    assert_eq!(metric(&m, OK), Some(0.0));
    assert_eq!(two.b.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_in_flight_completes_across_a_reload() {
    let two = Two::start().await;
    let fw = Floodwall::start(&two.policy("a")).await;
    let body = chat_body("hello", true).to_string();
    let (mut s, started) = Client::new()
        .open(
            fw.addr,
            "POST",
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("x-mock-fault", "chunk_delay=200ms;chunks=10"),
            ],
            body.as_bytes(),
        )
        .await;
    assert_eq!(
        s.response_header()
            .unwrap()
            .headers
            .get("x-floodwall-backend")
            .unwrap(),
        "a"
    );
    let first = tokio::time::timeout(Duration::from_secs(5), s.read_response_body())
        .await
        .expect("first event in time")
        .expect("first event")
        .expect("a body chunk");

    fw.write_policy(&two.policy("b"));
    fw.wait_metrics("the reload", |m| metric(m, OK).unwrap_or(0.0) >= 1.0)
        .await;
    assert_eq!(
        backend_of(&fw).await,
        "b",
        "new requests use the new policy"
    );

    let rest = read_all(&mut s, started, Duration::from_secs(10)).await;
    assert!(rest.complete, "the stream finished cleanly");
    let mut text = String::from_utf8_lossy(&first).into_owned();
    text.push_str(&rest.text());
    let data = sse_data(&text);
    let content = data
        .iter()
        .filter(|d| {
            serde_json::from_str::<serde_json::Value>(d)
                .ok()
                .is_some_and(|v| {
                    v["choices"][0]["delta"]["content"]
                        .as_str()
                        .is_some_and(|c| !c.is_empty())
                })
        })
        .count();
    assert_eq!(content, 10, "{text}");
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        two.a.stats().attempts("chunk_delay=200ms;chunks=10")[0].outcome,
        "ok"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_forces_a_reload() {
    let two = Two::start().await;
    let fw = Floodwall::start(&two.policy("a")).await;
    assert_eq!(backend_of(&fw).await, "a");
    fw.signal("HUP");
    fw.wait_metrics("the SIGHUP reload", |m| metric(m, OK).unwrap_or(0.0) >= 1.0)
        .await;
    assert_eq!(backend_of(&fw).await, "a", "still serving after SIGHUP");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let two = Two::start().await;
    let dir = TempDir::new("configmap");
    let root = dir.path().to_path_buf();
    std::fs::create_dir(root.join("..v1")).unwrap();
    std::fs::write(root.join("..v1/policy.yaml"), two.policy("a")).unwrap();
    symlink("..v1", root.join("..data")).unwrap();
    symlink("..data/policy.yaml", root.join("policy.yaml")).unwrap();
    let fw = Floodwall::start_at(dir, root.join("policy.yaml"), &[]).await;
    assert_eq!(backend_of(&fw).await, "a");

    // What the kubelet does: new version dir, temp symlink, atomic rename.
    std::fs::create_dir(root.join("..v2")).unwrap();
    std::fs::write(root.join("..v2/policy.yaml"), two.policy("b")).unwrap();
    symlink("..v2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..v1")).unwrap();

    wait_for_backend(&fw, "b").await;
}
