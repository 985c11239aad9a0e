//! The response cache (`routes[].cache`): hits, keys, streams, collapsing,
//! TTL, stale serving, scoping, purges and the Redis tier.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;

const CHAT: &str = "/v1/chat/completions";

fn cached(cache: &str) -> String {
    format!(
        "  - name: chat\n    match: {{ path_prefix: /v1/ }}\n    backend: main\n    cache: {cache}\n"
    )
}

async fn post(fw: &Floodwall, body: &serde_json::Value, headers: &[(&str, &str)]) -> Resp {
    send_chat(fw.addr, body.to_string().as_bytes(), headers).await
}

async fn send_chat(addr: SocketAddr, body: &[u8], headers: &[(&str, &str)]) -> Resp {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    Client::new().send(addr, "POST", CHAT, &h, body).await
}

/// A chat call with a mock fault script, from a spawned task (owned inputs).
async fn post_to(addr: SocketAddr, body: &str, fault: &str) -> Resp {
    send_chat(addr, body.as_bytes(), &[("x-mock-fault", fault)]).await
}

/// A policy in front of `mock` with a private Redis store and one cached route.
fn with_redis(
    mock: &floodwall::mock::MockServer,
    redis: &RedisServer,
    extra: &str,
    cache: &str,
) -> String {
    let store = format!("store:\n  redis: {{ url: \"{}\", {extra} }}\n", redis.url());
    policy(&mock_url(mock), &cached(cache)).replace("backends:\n", &format!("{store}backends:\n"))
}

fn upstream_calls(mock: &floodwall::mock::MockServer) -> u64 {
    mock.stats().requests
}

async fn admin_post(fw: &Floodwall, path: &str, body: &serde_json::Value) -> Resp {
    Client::new().post_json(fw.admin, path, body).await
}

async fn status_cache(fw: &Floodwall) -> serde_json::Value {
    let r = Client::new().get(fw.admin, "/admin/status").await;
    assert_eq!(r.status, 200);
    r.json()["cache"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_reach_the_mock_once_and_the_second_is_a_hit() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(
        &mock_url(&mock),
        &cached("{ ttl: 1m, scope: shared }"),
    ))
    .await;
    let body = chat_body("what is a circuit breaker?", false);
    let first = post(&fw, &body, &[]).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(first.header("age"), Some("0"));
    let second = post(&fw, &body, &[]).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-cache"), Some("HIT"));
    assert!(second.header("age").is_some());
    assert_eq!(second.body, first.body, "a hit returns the stored body");
    assert_eq!(second.header("content-type"), first.header("content-type"));
    assert_ne!(
        second.header("x-request-id"),
        first.header("x-request-id"),
        "per-request headers are set afresh"
    );
    assert_eq!(upstream_calls(&mock), 1);
    let m = fw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "floodwall_cache_requests_total{result=\"hit\",route=\"chat\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "floodwall_cache_requests_total{result=\"miss\",route=\"chat\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "floodwall_cache_entries{route=\"chat\"}"),
        Some(1.0)
    );
    assert!(metric(&m, "floodwall_cache_bytes{route=\"chat\"}").unwrap_or(0.0) > 100.0);
    let st = status_cache(&fw).await;
    assert_eq!(st["routes"][0]["hits"], 1, "{st}");
    assert_eq!(st["routes"][0]["hit_ratio"], 0.5, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_differing_field_misses_and_an_ignored_field_hits() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(
        &mock_url(&mock),
        &cached("{ ttl: 1m, scope: shared, ignore_fields: [user, metadata.trace] }"),
    ))
    .await;
    let mut a = chat_body("hello", false);
    a["user"] = "alice".into();
    a["metadata"] = serde_json::json!({"trace": "t1", "tenant": "x"});
    assert_eq!(post(&fw, &a, &[]).await.header("x-cache"), Some("MISS"));
    // Only ignored fields differ, and the keys come in another order.
    let b = serde_json::json!({
        "metadata": {"tenant": "x", "trace": "t2"},
        "messages": [{"content": "hello", "role": "user"}],
        "user": "bob",
        "stream": false,
        "model": "gpt-4o-mini",
    });
    assert_eq!(post(&fw, &b, &[]).await.header("x-cache"), Some("HIT"));
    assert_eq!(upstream_calls(&mock), 1);
    // A field that counts.
    let mut c = a.clone();
    c["temperature"] = 0.5.into();
    assert_eq!(post(&fw, &c, &[]).await.header("x-cache"), Some("MISS"));
    let mut d = a.clone();
    d["metadata"]["tenant"] = "y".into();
    assert_eq!(post(&fw, &d, &[]).await.header("x-cache"), Some("MISS"));
    assert_eq!(upstream_calls(&mock), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_recorded_and_replayed_and_a_cut_stream_is_not_stored() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(
        &mock_url(&mock),
        &cached("{ ttl: 1m, scope: shared }"),
    ))
    .await;
    let body = chat_body("stream me", true);
    // A stream cut mid-way is passed on (cut) and not stored.
    let cut = post(&fw, &body, &[("x-mock-fault", "scenario=cut;cut_after=2")]).await;
    assert_eq!(cut.status, 200);
    assert!(!cut.complete);
    let first = post(&fw, &body, &[]).await;
    assert_eq!(
        first.header("x-cache"),
        Some("MISS"),
        "the cut stream was not stored"
    );
    assert!(first.complete);
    assert_eq!(first.sse_data().last().map(String::as_str), Some("[DONE]"));
    let replay = post(&fw, &body, &[]).await;
    assert_eq!(replay.header("x-cache"), Some("HIT"));
    assert!(replay.complete);
    assert_eq!(
        replay
            .header("content-type")
            .map(|c| c.starts_with("text/event-stream")),
        Some(true)
    );
    assert_eq!(replay.sse_data(), first.sse_data(), "identical data events");
    assert_eq!(upstream_calls(&mock), 2);
    // A non-stream request for the same prompt is a different entry.
    let plain = post(&fw, &chat_body("stream me", false), &[]).await;
    assert_eq!(plain.header("x-cache"), Some("MISS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_identical_misses_make_one_upstream_call() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(
        &mock_url(&mock),
        &cached("{ ttl: 1m, scope: shared }"),
    ))
    .await;
    let body = chat_body("the same question", false);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (addr, b) = (fw.addr, body.to_string());
        tasks.push(tokio::spawn(async move {
            post_to(addr, &b, "latency=500ms").await
        }));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.complete);
        bodies.push(r.body);
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "everyone got the full answer"
    );
    assert_eq!(
        upstream_calls(&mock),
        1,
        "one upstream call for 50 identical misses"
    );
    let m = fw.metrics().await;
    let collapsed = metric(&m, "floodwall_cache_collapsed_total{route=\"chat\"}").unwrap_or(0.0);
    let hits = metric(
        &m,
        "floodwall_cache_requests_total{result=\"hit\",route=\"chat\"}",
    )
    .unwrap_or(0.0);
    assert_eq!(collapsed + hits, 49.0, "{m}");
    assert!(collapsed >= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_followers_get_events_before_the_leader_stream_ends() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(
        &mock_url(&mock),
        &cached("{ ttl: 1m, scope: shared }"),
    ))
    .await;
    let body = chat_body("a slow stream", true).to_string();
    // The leader's stream takes about 10 × 200ms.
    let fault = "chunks=10;chunk_delay=200ms";
    let leader = {
        let (addr, b) = (fw.addr, body.clone());
        tokio::spawn(async move {
            let r = post_to(addr, &b, fault).await;
            (r, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut followers = Vec::new();
    for _ in 0..49 {
        let (addr, b) = (fw.addr, body.clone());
        followers.push(tokio::spawn(async move {
            let r = post_to(addr, &b, fault).await;
            // When this follower's first event arrived.
            let first = r.started + r.chunks.first().expect("a chunk").0;
            (r, first)
        }));
    }
    let (lead, lead_end) = leader.await.unwrap();
    assert!(lead.complete);
    assert_eq!(lead.header("x-cache"), Some("MISS"));
    for f in followers {
        let (r, first) = f.await.unwrap();
        assert_eq!(r.header("x-cache"), Some("MISS"), "a collapsed miss");
        assert!(r.complete);
        assert_eq!(r.sse_data(), lead.sse_data(), "the same events");
        assert!(
            first + Duration::from_millis(300) < lead_end,
            "a follower's first event ({:?} before the leader's end) must come well before the leader's stream ends",
            lead_end.saturating_duration_since(first)
        );
    }
    assert_eq!(upstream_calls(&mock), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_entry_goes_back_upstream() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(
        &mock_url(&mock),
        &cached("{ ttl: 1s, scope: shared }"),
    ))
    .await;
    let body = chat_body("short lived", false);
    assert_eq!(post(&fw, &body, &[]).await.header("x-cache"), Some("MISS"));
    assert_eq!(post(&fw, &body, &[]).await.header("x-cache"), Some("HIT"));
    // Let the one-second TTL run out.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(post(&fw, &body, &[]).await.header("x-cache"), Some("MISS"));
    assert_eq!(upstream_calls(&mock), 2);
    // Without stale_if_error nothing is kept past the TTL.
    let m = fw.metrics().await;
    assert_eq!(
        metric(&m, "floodwall_cache_entries{route=\"chat\"}"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_serves_the_expired_answer_while_the_upstream_is_down() {
    let mock = start_mock().await;
    let routes = cached("{ ttl: 1s, scope: shared, stale_if_error: 1h }");
    let text = policy(&mock_url(&mock), &routes).replace(
        "    timeouts: { connect: 1s, response_headers: 5s }\n",
        "    timeouts: { connect: 1s, response_headers: 5s }\n    circuit_breaker: { consecutive_failures: 2, open_for: 30s, window: 10s }\n",
    );
    let fw = Floodwall::start(&text).await;
    let body = chat_body("keep this answer", false);
    let fresh = post(&fw, &body, &[]).await;
    assert_eq!(fresh.header("x-cache"), Some("MISS"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The upstream fails twice (the breaker opens), then would answer again.
    let fail = [("x-mock-fault", "scenario=down;status=503")];
    for i in 0..2 {
        let r = post(&fw, &body, &fail).await;
        assert_eq!(r.status, 200, "attempt {i}: {}", r.text());
        assert_eq!(r.header("x-cache"), Some("STALE"));
        assert_eq!(r.body, fresh.body);
    }
    assert_eq!(mock.stats().attempts("down").len(), 2);
    // The breaker is open: nothing reaches the upstream, the stale answer is served.
    let r = post(&fw, &body, &[]).await;
    assert_eq!(r.header("x-cache"), Some("STALE"), "{}", r.text());
    assert_eq!(r.body, fresh.body);
    assert_eq!(
        upstream_calls(&mock),
        3,
        "no upstream call while the breaker is open"
    );
    let m = fw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "floodwall_cache_requests_total{result=\"stale\",route=\"chat\"}"
        ),
        Some(3.0)
    );
    // A prompt with no entry still gets the clean error.
    let other = post(&fw, &chat_body("never asked", false), &[]).await;
    other.assert_floodwall_error(503, "circuit_open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_never_cross_credentials_or_users() {
    let mock = start_mock().await;
    let routes = format!(
        "{}{}",
        cached("{ ttl: 1m, scope: shared }"),
        "  - name: per-user\n    match: { path_prefix: /u/ }\n    rewrite: { strip_prefix: /u }\n    backend: main\n    cache: { ttl: 1m, scope: user }\n"
    );
    let text = policy(&mock_url(&mock), &routes).replace(
        "backends:\n",
        "identity:\n  user: [{ header: x-user-id }]\nbackends:\n",
    );
    let fw = Floodwall::start(&text).await;
    let body = chat_body("my notes", false);
    // Shared scope, but a different Authorization is never served another's answer.
    let a = [("authorization", "Bearer key-a")];
    let b = [("authorization", "Bearer key-b")];
    assert_eq!(post(&fw, &body, &a).await.header("x-cache"), Some("MISS"));
    assert_eq!(post(&fw, &body, &b).await.header("x-cache"), Some("MISS"));
    assert_eq!(post(&fw, &body, &[]).await.header("x-cache"), Some("MISS"));
    assert_eq!(post(&fw, &body, &a).await.header("x-cache"), Some("HIT"));
    assert_eq!(upstream_calls(&mock), 3);
    // Per-user scope: each user has their own entry.
    let send = |user: &'static str| {
        let addr = fw.addr;
        let b = body.to_string();
        async move {
            Client::new()
                .send(
                    addr,
                    "POST",
                    "/u/v1/chat/completions",
                    &[("content-type", "application/json"), ("x-user-id", user)],
                    b.as_bytes(),
                )
                .await
        }
    };
    assert_eq!(send("alice").await.header("x-cache"), Some("MISS"));
    assert_eq!(send("bob").await.header("x-cache"), Some("MISS"));
    assert_eq!(send("alice").await.header("x-cache"), Some("HIT"));
    assert_eq!(send("bob").await.header("x-cache"), Some("HIT"));
    assert_eq!(upstream_calls(&mock), 5);

    // Purge one user's entries: alice misses, bob still hits.
    let r = admin_post(
        &fw,
        "/admin/cache/purge",
        &serde_json::json!({"identity": "alice"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["purged"]["memory"], 1, "{}", r.text());
    assert_eq!(send("alice").await.header("x-cache"), Some("MISS"));
    assert_eq!(send("bob").await.header("x-cache"), Some("HIT"));
    // Purge a route.
    let r = admin_post(&fw, "/admin/cache/purge?route=chat", &serde_json::json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = Client::new()
        .send(fw.admin, "POST", "/admin/cache/purge?route=chat", &[], b"")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(post(&fw, &body, &a).await.header("x-cache"), Some("MISS"));
    assert_eq!(
        send("bob").await.header("x-cache"),
        Some("HIT"),
        "another route's entries stay"
    );
    // Everything.
    let r = admin_post(&fw, "/admin/cache/purge", &serde_json::json!({"all": true})).await;
    assert_eq!(r.status, 200);
    assert_eq!(send("bob").await.header("x-cache"), Some("MISS"));
    // A purge that names nothing is refused.
    let r = admin_post(&fw, "/admin/cache/purge", &serde_json::json!({})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_purge", "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_cache_control_bypasses_and_refreshes() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(
        &mock_url(&mock),
        &cached("{ ttl: 1m, scope: shared }"),
    ))
    .await;
    let body = chat_body("directives", false);
    let r = post(&fw, &body, &[("cache-control", "no-store")]).await;
    assert_eq!(r.header("x-cache"), Some("BYPASS"));
    // no-store stored nothing.
    assert_eq!(post(&fw, &body, &[]).await.header("x-cache"), Some("MISS"));
    assert_eq!(post(&fw, &body, &[]).await.header("x-cache"), Some("HIT"));
    // no-cache skips the lookup and refreshes the entry.
    let r = post(&fw, &body, &[("cache-control", "no-cache")]).await;
    assert_eq!(r.header("x-cache"), Some("BYPASS"));
    let after = post(&fw, &body, &[]).await;
    assert_eq!(after.header("x-cache"), Some("HIT"));
    assert_eq!(after.body, r.body, "the refreshed answer is the one stored");
    assert_eq!(upstream_calls(&mock), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tier_is_shared_fails_open_and_comes_back_after_a_restart() {
    let mock = start_mock().await;
    let redis = RedisServer::start();
    let port = redis.port;
    let text = with_redis(
        &mock,
        &redis,
        "key_prefix: fw-e2e-cache, timeout: 100ms",
        "{ ttl: 1m, scope: shared, store: redis }",
    );
    let a = Floodwall::start(&text).await;
    let b = Floodwall::start(&text).await;
    let body = chat_body("shared across replicas", false);
    assert_eq!(post(&a, &body, &[]).await.header("x-cache"), Some("MISS"));
    let from_b = post(&b, &body, &[]).await;
    assert_eq!(
        from_b.header("x-cache"),
        Some("HIT"),
        "the other replica's entry"
    );
    assert_eq!(upstream_calls(&mock), 1);

    // Redis goes away: requests still succeed, as misses, without delay.
    drop(redis);
    for i in 0..3 {
        let started = Instant::now();
        let r = post(&a, &body, &[]).await;
        assert_eq!(r.status, 200, "request {i} with Redis down: {}", r.text());
        assert_eq!(r.header("x-cache"), Some("MISS"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a Redis outage must not stall a request ({:?})",
            started.elapsed()
        );
    }
    assert_eq!(upstream_calls(&mock), 4);
    let m = a.metrics().await;
    assert!(
        metric(
            &m,
            "floodwall_cache_errors_total{op=\"get\",route=\"chat\",tier=\"redis\"}"
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{m}"
    );

    // Redis comes back (empty): the next request stores, the one after hits.
    let _redis = RedisServer::start_on(port);
    eventually("hits from Redis again", Duration::from_secs(10), || async {
        let r = post(&a, &body, &[]).await;
        assert_eq!(r.status, 200);
        (post(&b, &body, &[]).await.header("x-cache") == Some("HIT")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_clears_every_replicas_memory_tier() {
    let mock = start_mock().await;
    let redis = RedisServer::start();
    let text = with_redis(
        &mock,
        &redis,
        "key_prefix: fw-e2e-purge, timeout: 1s",
        "{ ttl: 1m, scope: shared, store: tiered }",
    );
    let a = Floodwall::start(&text).await;
    let b = Floodwall::start(&text).await;
    let body = chat_body("purge me everywhere", false);
    assert_eq!(post(&a, &body, &[]).await.header("x-cache"), Some("MISS"));
    // b gets it from Redis and keeps a copy in memory.
    assert_eq!(post(&b, &body, &[]).await.header("x-cache"), Some("HIT"));
    assert_eq!(
        metric(
            &b.metrics().await,
            "floodwall_cache_entries{route=\"chat\"}"
        ),
        Some(1.0)
    );
    eventually(
        "b's purge subscription",
        Duration::from_secs(10),
        || async { (status_cache(&b).await["purge_subscription"] == true).then_some(()) },
    )
    .await;
    let r = admin_post(
        &a,
        "/admin/cache/purge",
        &serde_json::json!({"route": "chat"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["purged"]["redis"], 1, "{}", r.text());
    // b's memory copy goes too (relayed over pub/sub)...
    b.wait_metrics("b's memory tier to be purged", |m| {
        metric(m, "floodwall_cache_entries{route=\"chat\"}") == Some(0.0)
    })
    .await;
    // ...so b does not serve what was purged.
    assert_eq!(post(&b, &body, &[]).await.header("x-cache"), Some("MISS"));
    assert_eq!(upstream_calls(&mock), 2);
}

/// Tokens used by `alice` under the `tokens` rule, once reconciled.
async fn tokens_used(fw: &Floodwall) -> u64 {
    let r = Client::new()
        .get(fw.admin, "/admin/limits?rule=tokens&key=alice")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["windows"][0]["used"].as_u64().unwrap_or(0)
}

async fn hits_and_budget(charge_hits: bool) -> (u64, u64) {
    let mock = start_mock().await;
    let cache = format!("{{ ttl: 1m, scope: user, charge_hits: {charge_hits} }}");
    let routes = format!(
        "{}    rate_limits: [{{ name: tokens, key: [user], limits: [{{ tokens: 10000, per: 1d }}] }}]\n",
        cached(&cache)
    );
    let text = policy(&mock_url(&mock), &routes).replace(
        "backends:\n",
        "identity:\n  user: [{ header: x-user-id }]\nbackends:\n",
    );
    let fw = Floodwall::start(&text).await;
    let mut body = chat_body("count my tokens", false);
    body["max_tokens"] = 50.into();
    let alice = [("x-user-id", "alice")];
    assert_eq!(
        post(&fw, &body, &alice).await.header("x-cache"),
        Some("MISS")
    );
    let after_miss = eventually(
        "the miss to be reconciled",
        Duration::from_secs(5),
        || async {
            let used = tokens_used(&fw).await;
            // Reconciled to the reported usage, below the reservation.
            (used > 0 && used < 50).then_some(used)
        },
    )
    .await;
    assert_eq!(
        post(&fw, &body, &alice).await.header("x-cache"),
        Some("HIT")
    );
    // The hit's own reservation (50 + the prompt) is settled when it ends.
    // GCRA refills continuously (10000 a day: about one token in 9 s), so
    // allow a token of drift.
    let near = |a: u64, b: u64| a.abs_diff(b) <= 1;
    let after_hit = eventually("the hit to be settled", Duration::from_secs(5), || async {
        let used = tokens_used(&fw).await;
        (near(used, after_miss) || near(used, 2 * after_miss)).then_some(used)
    })
    .await;
    assert_eq!(upstream_calls(&mock), 1);
    (after_miss, after_hit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_costs_no_tokens_unless_the_route_charges_hits() {
    let (miss, hit) = hits_and_budget(false).await;
    assert!(hit.abs_diff(miss) <= 1, "a hit is free: {miss} then {hit}");
    let (miss, hit) = hits_and_budget(true).await;
    assert!(
        hit.abs_diff(2 * miss) <= 1,
        "charge_hits: the hit pays its recorded usage: {miss} then {hit}"
    );
}

/// `n` identical requests: the first leads; the others are sent once it
/// has reached the mock (`scenario`'s first attempt), so they arrive while
/// it waits out the mock's latency, however slow a loaded machine makes
/// the leader's own trip (a fixed head start flaked in the full suite).
async fn burst(
    fw: &Floodwall,
    mock: &floodwall::mock::MockServer,
    scenario: &str,
    n: usize,
    body: &serde_json::Value,
    fault: &'static str,
) -> Vec<Resp> {
    let send = |b: String| {
        let addr = fw.addr;
        tokio::spawn(async move { post_to(addr, &b, fault).await })
    };
    let mut tasks = vec![send(body.to_string())];
    eventually(
        "the leader reaches the mock",
        Duration::from_secs(10),
        || async { (!mock.stats().attempts(scenario).is_empty()).then_some(()) },
    )
    .await;
    tasks.extend((1..n).map(|_| send(body.to_string())));
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The answers of a burst and the mock's attempts, for a failure message.
fn seen(rs: &[Resp], mock: &floodwall::mock::MockServer, scenario: &str) -> String {
    let answers: Vec<_> = rs
        .iter()
        .map(|r| (r.status, r.header("x-cache").map(str::to_string), r.text()))
        .collect();
    format!("{answers:?} {:?}", mock.stats().attempts(scenario))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_fails_one_follower_takes_over_or_each_goes_alone() {
    // takeover (the default): the leader's 503 is its own; one follower
    // becomes the leader, the rest follow it.
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(
        &mock_url(&mock),
        &cached("{ ttl: 1m, scope: shared }"),
    ))
    .await;
    let body = chat_body("leader fails", false);
    let rs = burst(
        &fw,
        &mock,
        "t",
        6,
        &body,
        "scenario=t;fail=1:503;latency=800ms",
    )
    .await;
    assert_eq!(rs[0].status, 503, "{}", seen(&rs, &mock, "t"));
    for r in &rs[1..] {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(
        mock.stats().attempts("t").len(),
        2,
        "the failed leader, then one taker"
    );

    // each: every follower goes upstream on its own.
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(
        &mock_url(&mock),
        &cached("{ ttl: 1m, scope: shared, on_leader_failure: each }"),
    ))
    .await;
    let rs = burst(
        &fw,
        &mock,
        "e",
        6,
        &body,
        "scenario=e;fail=1:503;latency=800ms",
    )
    .await;
    assert_eq!(rs[0].status, 503, "{}", seen(&rs, &mock, "e"));
    assert!(rs[1..].iter().all(|r| r.status == 200));
    assert_eq!(
        mock.stats().attempts("e").len(),
        6,
        "the leader and five on their own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_replay_keeps_the_recorded_gaps() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(
        &mock_url(&mock),
        &cached("{ ttl: 1m, scope: shared, replay: paced }"),
    ))
    .await;
    let body = chat_body("paced", true);
    let fault = [("x-mock-fault", "chunks=4;chunk_delay=200ms")];
    let first = post(&fw, &body, &fault).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    let replay = post(&fw, &body, &fault).await;
    assert_eq!(replay.header("x-cache"), Some("HIT"));
    assert_eq!(replay.sse_data(), first.sse_data());
    // Four content chunks 200 ms apart were recorded: the replay spreads
    // its events over (about) the same time instead of sending them at once.
    let spread = replay.chunks.last().unwrap().0 - replay.chunks.first().unwrap().0;
    assert!(
        spread >= Duration::from_millis(500),
        "replayed over {spread:?}"
    );
}
