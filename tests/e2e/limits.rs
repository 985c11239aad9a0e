//! Rate limits, token budgets and cost budgets through the real binary:
//! exact counts in memory and across two instances sharing Redis, the
//! headers of limited routes, token and cost reconciliation, Redis outages
//! under each `on_store_error` mode, JWT and header identities, tiers,
//! shadow rules, and the teams' example policies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

const RELOAD_OK: &str = "floodwall_config_reloads_total{result=\"ok\"}";

/// A policy in front of `mock` with top-level sections (`identity`,
/// `prices`, `store`, `rate_limits`, written at column 0) and routes.
fn limits_policy(mock: &MockServer, top: &str, routes: &str) -> String {
    policy_with(top, &[("main", &mock_url(mock))], routes)
}

/// A route (as a `routes:` list item) on the `main` backend, with its
/// rate-limit rules, each a YAML flow mapping.
fn route(name: &str, prefix: &str, rules: &[&str]) -> String {
    let mut out =
        format!("  - name: {name}\n    match: {{ path_prefix: {prefix} }}\n    backend: main\n");
    if !rules.is_empty() {
        out.push_str("    rate_limits:\n");
        for r in rules {
            out.push_str(&format!("      - {r}\n"));
        }
    }
    out
}

fn decisions(rule: &str, result: &str) -> String {
    format!("floodwall_ratelimit_decisions_total{{result=\"{result}\",rule=\"{rule}\"}}")
}

fn counter(m: &str, series: &str) -> f64 {
    metric(m, series).unwrap_or(0.0)
}

/// `n` concurrent GETs from one shared client, `make(i)` saying where and
/// with which headers; the answers in completion order.
async fn burst(
    n: usize,
    make: impl Fn(usize) -> (std::net::SocketAddr, String, Vec<(String, String)>),
) -> Vec<Resp> {
    let client = Arc::new(Client::new());
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let (addr, path, headers) = make(i);
        let client = client.clone();
        set.spawn(async move {
            let h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            client.send(addr, "GET", &path, &h, b"").await
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        out.push(r.expect("request task"));
    }
    out
}

async fn get_as(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    Client::new().send(addr, "GET", path, headers, b"").await
}

fn header_u64(r: &Resp, name: &str) -> u64 {
    r.header(name)
        .unwrap_or_else(|| {
            panic!(
                "`{name}` missing; status {} headers {:?}",
                r.status, r.headers
            )
        })
        .parse()
        .unwrap_or_else(|_| panic!("`{name}` is not a whole number: {:?}", r.header(name)))
}

/// The 429 of a rate limit: envelope, reason and every rate-limit header.
fn assert_rate_limited(r: &Resp, limit: u64) {
    r.assert_floodwall_error(429, "rate_limited");
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    assert!(
        header_u64(r, "retry-after") >= 1,
        "Retry-After is whole seconds >= 1"
    );
    assert_eq!(header_u64(r, "x-ratelimit-limit"), limit);
    assert_eq!(header_u64(r, "x-ratelimit-remaining"), 0);
    assert!(header_u64(r, "x-ratelimit-reset") >= 1);
    assert!(
        r.header("ratelimit-policy")
            .is_some_and(|v| v.contains(&format!("q={limit}"))),
        "{:?}",
        r.headers
    );
    assert!(
        r.header("ratelimit").is_some_and(|v| v.contains("r=0")),
        "{:?}",
        r.headers
    );
}

// ------------------------------------------------------------ one instance

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_50_lets_exactly_10_through_and_the_rest_get_429_with_headers() {
    let mock = start_mock().await;
    let routes = route(
        "chat",
        "/",
        &["{ name: per-ip, key: [ip], limits: [{ requests: 10, per: 1m }] }"],
    );
    let fw = Floodwall::start(&limits_policy(&mock, "", &routes)).await;
    let answers = burst(50, |_| (fw.addr, "/v1/models".to_string(), Vec::new())).await;

    let ok: Vec<&Resp> = answers.iter().filter(|r| r.status == 200).collect();
    let limited: Vec<&Resp> = answers.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok.len(), 10, "exactly the limit passes");
    assert_eq!(limited.len(), 40, "every other request is limited");
    assert_eq!(
        mock.stats().requests,
        10,
        "limited requests never reach the backend"
    );

    // Allowed answers carry the headers too; each saw a different remainder.
    let mut remaining: Vec<u64> = ok
        .iter()
        .map(|r| {
            assert_eq!(header_u64(r, "x-ratelimit-limit"), 10);
            assert!(header_u64(r, "x-ratelimit-reset") >= 1);
            assert!(r.header("ratelimit-policy").is_some(), "{:?}", r.headers);
            assert!(r.header("ratelimit").is_some(), "{:?}", r.headers);
            header_u64(r, "x-ratelimit-remaining")
        })
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..10).collect::<Vec<u64>>());

    for r in &limited {
        assert_rate_limited(r, 10);
        // 10/1m: the next request is admitted 6 s after the bucket emptied.
        assert!(
            header_u64(r, "retry-after") <= 6,
            "{:?}",
            r.header("retry-after")
        );
        assert!(r.header("x-request-id").is_some());
    }
    let policy = limited[0].header("ratelimit-policy").unwrap();
    assert!(policy.contains("\"per-ip:1m\";q=10;w=60"), "{policy}");
    let m = fw.metrics().await;
    assert_eq!(counter(&m, &decisions("per-ip", "allowed")), 10.0, "{m}");
    assert_eq!(counter(&m, &decisions("per-ip", "limited")), 40.0, "{m}");
}

// ------------------------------------------------------------ two instances, one Redis

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_redis_together_let_exactly_the_limit_through_in_two_windows() {
    let redis = RedisServer::start();
    let mock = start_mock().await;
    let top = format!(
        "store:\n  redis: {{ url: \"{}\", key_prefix: fw-e2e-shared, timeout: 1s }}\nidentity:\n  user: [{{ header: x-user-id }}]\n",
        redis.url()
    );
    // Each rule binds on its own route, so that each count is exact by
    // itself (across rules Redis may briefly under-admit, never over-admit;
    // see docs/policy.md). `fail_closed`: a decision that did not go
    // through Redis shows up as a 503 instead of an uncounted pass.
    // GCRA refills continuously, one request per `per / requests` (3 s
    // here): longer than a burst takes, so a burst sees full buckets and no
    // refill; after a whole `per` they are full again.
    let routes = route(
        "per-user",
        "/u/",
        &["{ name: shared-per-user, key: [user], limits: [{ requests: 2, per: 6s }], on_store_error: fail_closed }"],
    ) + &route(
        "global",
        "/g/",
        &["{ name: shared-global, key: [global], limits: [{ requests: 2, per: 6s }], on_store_error: fail_closed }"],
    );
    let policy = limits_policy(&mock, &top, &routes);
    let a = Floodwall::start(&policy).await;
    let b = Floodwall::start(&policy).await;
    const USERS: usize = 100;
    const PER_USER: usize = 3;
    const GLOBAL: usize = 300;
    for window in 0..2 {
        mock.reset_stats();
        let started = Instant::now();
        // 600 concurrent requests, alternating between the two instances:
        // 100 users x 3 on the per-user route, 300 on the global route.
        let answers = burst(USERS * PER_USER + GLOBAL, |i| {
            let addr = if i % 2 == 0 { a.addr } else { b.addr };
            if i < USERS * PER_USER {
                (
                    addr,
                    format!("/u/{i}"),
                    vec![("x-user-id".into(), format!("user-{}", i / PER_USER))],
                )
            } else {
                (
                    addr,
                    format!("/g/{i}"),
                    vec![("x-user-id".into(), format!("user-{}", i % 7))],
                )
            }
        })
        .await;
        let ended = Instant::now();
        let took = ended - started;
        assert!(
            took < Duration::from_secs(3),
            "window {window}: the burst took {took:?}, longer than one refill"
        );
        let of = |prefix: &str, status: u16| {
            answers
                .iter()
                .filter(|r| r.status == status)
                .filter(|r| {
                    r.header("ratelimit-policy")
                        .is_some_and(|p| p.contains(prefix))
                })
                .count()
        };
        let other: Vec<_> = answers
            .iter()
            .filter(|r| r.status != 200 && r.status != 429)
            .map(|r| (r.status, r.text()))
            .collect();
        assert!(
            other.is_empty(),
            "window {window}: every decision went through Redis: {:?}",
            &other[..other.len().min(3)]
        );
        assert_eq!(
            of("shared-per-user", 200),
            USERS * 2,
            "window {window}: exactly 2 per user across both instances (burst {took:?})"
        );
        assert_eq!(
            of("shared-per-user", 429),
            USERS * (PER_USER - 2),
            "window {window}"
        );
        assert_eq!(
            of("shared-global", 200),
            2,
            "window {window}: exactly the global limit across both instances (burst {took:?})"
        );
        assert_eq!(of("shared-global", 429), GLOBAL - 2, "window {window}");
        assert_eq!(
            mock.stats().requests as usize,
            USERS * 2 + 2,
            "window {window}: only admitted requests reach the backend"
        );
        for r in answers.iter().filter(|r| r.status == 429).take(20) {
            r.assert_floodwall_error(429, "rate_limited");
        }
        // Both instances refused some: the count is shared, not per instance.
        for fw in [&a, &b] {
            let m = fw.metrics().await;
            assert!(
                counter(&m, &decisions("shared-global", "limited")) > 0.0,
                "{m}"
            );
        }
        // The next window: the buckets are full again once a whole `per`
        // has passed since the burst.
        tokio::time::sleep_until((ended + Duration::from_millis(6200)).into()).await;
    }
    let (status, body) = admin_limits(&a, "").await;
    assert_eq!(status, 200);
    assert_eq!(body["store"], "redis", "{body}");
}

/// `GET /admin/limits?...` on `fw`'s admin listener: status and JSON.
async fn admin_limits(fw: &Floodwall, query: &str) -> (u16, Value) {
    let path = if query.is_empty() {
        "/admin/limits".to_string()
    } else {
        format!("/admin/limits?{query}")
    };
    let r = Client::new().get(fw.admin, &path).await;
    (r.status, r.json())
}

// ------------------------------------------------------------ reloads

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_at_8_of_10_survives_an_unrelated_reload() {
    let mock = start_mock().await;
    // 10 per 10 minutes: one refill a minute, none during the test.
    let routes = |other: &str| {
        route(
            "limited",
            "/limited",
            &["{ name: ten, key: [global], limits: [{ requests: 10, per: 10m }] }"],
        ) + &route("other", other, &[])
    };
    let fw = Floodwall::start(&limits_policy(&mock, "", &routes("/other"))).await;
    for i in 0..8u64 {
        let r = get_as(fw.addr, "/limited", &[]).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 9 - i);
    }
    let before = counter(&fw.metrics().await, RELOAD_OK);
    assert_eq!(get_as(fw.addr, "/elsewhere", &[]).await.status, 404);
    fw.write_policy(&limits_policy(&mock, "", &routes("/elsewhere")));
    fw.wait_metrics("the reload", |m| counter(m, RELOAD_OK) > before)
        .await;
    assert_eq!(
        get_as(fw.addr, "/elsewhere", &[]).await.status,
        200,
        "the edit applied"
    );

    for i in 0..2u64 {
        let r = get_as(fw.addr, "/limited", &[]).await;
        assert_eq!(
            r.status,
            200,
            "request {} after the reload: {}",
            9 + i,
            r.text()
        );
        assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 1 - i);
    }
    let r = get_as(fw.addr, "/limited", &[]).await;
    assert_rate_limited(&r, 10);
    assert_eq!(
        mock.stats().requests,
        11,
        "10 limited + 1 on the edited route"
    );
}

// ------------------------------------------------------------ tokens and cost

async fn post_chat(addr: std::net::SocketAddr, headers: &[(&str, &str)], body: &Value) -> Resp {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    Client::new()
        .send(
            addr,
            "POST",
            "/v1/chat/completions",
            &h,
            body.to_string().as_bytes(),
        )
        .await
}

/// One window of `/admin/limits?rule=..&key=..`, by kind.
async fn key_usage(fw: &Floodwall, rule: &str, key: &str) -> Value {
    let (status, body) = admin_limits(fw, &format!("rule={rule}&key={key}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["key"], key, "{body}");
    body["windows"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_usage_chunk_debits_the_token_budget_and_the_next_request_over_it_is_refused() {
    let mock = start_mock().await;
    let top = "identity:\n  user: [{ header: x-user-id }]\n";
    let routes = route(
        "chat",
        "/v1/",
        &["{ name: tokens, key: [user], limits: [{ tokens: 1000, per: 1d }] }"],
    );
    let fw = Floodwall::start(&limits_policy(&mock, top, &routes)).await;
    let alice = [("x-user-id", "alice"), ("x-mock-fault", "chunks=900")];

    // A stream whose final chunk reports 900 completion tokens, far more
    // than the 10 reserved for `max_tokens`.
    let body = json!({
        "model": "gpt-4o-mini", "stream": true, "max_tokens": 10,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]
    });
    let r = post_chat(fw.addr, &alice, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.complete);
    assert_eq!(header_u64(&r, "x-ratelimit-limit"), 1000);
    let reserved = 1000 - header_u64(&r, "x-ratelimit-remaining");
    assert!(
        (11..=20).contains(&reserved),
        "admission reserved max_tokens + the prompt estimate, not {reserved}"
    );
    let usage: Value = r
        .sse_data()
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v.get("usage").filter(|u| u.is_object()).cloned())
        .expect("the final chunk carries usage");
    assert_eq!(usage["completion_tokens"], 900);
    let used = usage["prompt_tokens"].as_u64().unwrap() + 900;

    // Reconciled when the response ends: the budget holds the reported usage.
    let window = eventually(
        "the usage to be reconciled",
        Duration::from_secs(5),
        || async {
            let w = key_usage(&fw, "tokens", "alice").await;
            (w["used"].as_u64() == Some(used)).then_some(w)
        },
    )
    .await;
    assert_eq!(window["remaining"].as_u64(), Some(1000 - used), "{window}");
    let m = fw.metrics().await;
    let series = "floodwall_tokens_total{kind=\"output\",model=\"other\",route=\"chat\",source=\"reported\"}";
    assert_eq!(counter(&m, series), 900.0, "{m}");

    // Over the remaining budget: refused before the backend.
    let before = mock.stats().requests;
    let over = json!({"model": "gpt-4o-mini", "max_tokens": 200, "messages": [{"role": "user", "content": "hi"}]});
    let r = post_chat(fw.addr, &alice, &over).await;
    r.assert_floodwall_error(429, "tokens_exceeded");
    assert!(header_u64(&r, "retry-after") >= 1);
    assert_eq!(header_u64(&r, "x-ratelimit-limit"), 1000);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens"),
        "{}",
        r.text()
    );
    assert_eq!(
        mock.stats().requests,
        before,
        "no attempt reached the backend"
    );

    // The refusal consumed nothing, and a request that fits still passes.
    let fits = json!({"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]});
    let r = post_chat(fw.addr, &[("x-user-id", "alice")], &fits).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Another user has a budget of their own.
    let r = post_chat(fw.addr, &[("x-user-id", "bob")], &over).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // A stream without usage is charged an estimate from its content, and
    // marked as estimated.
    let no_usage = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let r = post_chat(
        fw.addr,
        &[("x-user-id", "carol"), ("x-mock-fault", "chunks=400")],
        &no_usage,
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.sse_data().iter().all(|d| !d.contains("\"usage\"")),
        "no usage chunk was asked for"
    );
    let estimated = "floodwall_tokens_total{kind=\"output\",model=\"other\",route=\"chat\",source=\"estimated\"}";
    let m = fw
        .wait_metrics("an estimated usage", |m| counter(m, estimated) > 0.0)
        .await;
    // 400 streamed words of a few characters each, at 4 characters a token.
    assert!((100.0..=1000.0).contains(&counter(&m, estimated)), "{m}");
    let w = key_usage(&fw, "tokens", "carol").await;
    assert!(
        w["used"].as_u64().unwrap() > 100,
        "the estimate is charged, not the 11 reserved: {w}"
    );
    fw.wait_logs("carol's access line marked usage=estimated", |logs| {
        logs.lines()
            .any(|l| l.contains("user=carol") && l.contains("usage=estimated"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_budget_is_exhausted_faster_by_the_expensive_model() {
    let mock = start_mock().await;
    // USD per 1M tokens: the expensive model costs 100 times more.
    let top = "identity:\n  user: [{ header: x-user-id }]\nprices:\n  cheap-model: { input: 1, output: 1 }\n  pricey-model: { input: 100, output: 100 }\n";
    let routes = route(
        "chat",
        "/v1/",
        &["{ name: spend, key: [user], limits: [{ cost_usd: 0.01, per: 1d }] }"],
    );
    let fw = Floodwall::start(&limits_policy(&mock, top, &routes)).await;
    let body = |model: &str| json!({"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]});
    // Nano-USD of a call at `usd_per_m` for both directions.
    let cost = |r: &Resp, usd_per_m: u64| {
        r.json()["usage"]["total_tokens"].as_u64().unwrap() * usd_per_m * 1000
    };

    // alice calls the expensive model until the budget refuses her.
    let mut alice_spent = 0;
    let mut refused = None;
    for i in 0..40 {
        let r = post_chat(fw.addr, &[("x-user-id", "alice")], &body("pricey-model")).await;
        if r.status != 200 {
            refused = Some((i, r));
            break;
        }
        alice_spent += cost(&r, 100);
    }
    let (calls, r) = refused.expect("the budget refuses the expensive model within 40 calls");
    r.assert_floodwall_error(429, "budget_exceeded");
    assert!(
        header_u64(&r, "retry-after") >= 1 && header_u64(&r, "retry-after") <= 86_400,
        "until the next UTC day"
    );
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("$0.01/day"),
        "{}",
        r.text()
    );
    let per_call = alice_spent / calls as u64;
    assert!(
        alice_spent <= 10_000_000 && alice_spent + per_call > 10_000_000,
        "{calls} calls, {alice_spent} nano-USD"
    );
    let before = mock.stats().requests;
    let r = post_chat(fw.addr, &[("x-user-id", "alice")], &body("pricey-model")).await;
    r.assert_floodwall_error(429, "budget_exceeded");
    assert_eq!(mock.stats().requests, before, "refused before the backend");

    // bob makes more calls on the cheap model and stays far inside it.
    let mut bob_spent = 0;
    for i in 0..calls + 5 {
        let r = post_chat(fw.addr, &[("x-user-id", "bob")], &body("cheap-model")).await;
        assert_eq!(r.status, 200, "bob's call {i}: {}", r.text());
        bob_spent += cost(&r, 1);
    }

    // Spend per key, exactly what the reported usage costs.
    for (key, spent) in [("alice", alice_spent), ("bob", bob_spent)] {
        let w = eventually(
            &format!("{key}'s spend to be reconciled"),
            Duration::from_secs(5),
            || async {
                let w = key_usage(&fw, "spend", key).await;
                (w["used"].as_u64() == Some(spent)).then_some(w)
            },
        )
        .await;
        assert_eq!(w["kind"], "cost_usd", "{w}");
        assert_eq!(w["limit_usd"].as_f64(), Some(0.01), "{w}");
        assert!(
            (w["used_usd"].as_f64().unwrap() - spent as f64 / 1e9).abs() < 1e-12,
            "{w}"
        );
    }
    let (status, top) = admin_limits(&fw, "rule=spend&top=5").await;
    assert_eq!(status, 200);
    assert_eq!(top["top"][0]["key"], "alice", "{top}");
    assert_eq!(top["top"][1]["key"], "bob", "{top}");
    // /admin/status carries the same: each rule with its top keys, and with
    // `?key=` one key's usage in every rule.
    let st = Client::new().get(fw.admin, "/admin/status").await.json();
    assert_eq!(st["rate_limits"]["rules"][0]["name"], "spend", "{st}");
    assert_eq!(
        st["rate_limits"]["rules"][0]["top"][0]["key"], "alice",
        "{st}"
    );
    let st = Client::new()
        .get(fw.admin, "/admin/status?key=alice")
        .await
        .json();
    assert_eq!(st["rate_limits"]["key"], "alice", "{st}");
    assert_eq!(
        st["rate_limits"]["rules"][0]["windows"][0]["used"].as_u64(),
        Some(alice_spent),
        "{st}"
    );
    let m = fw.metrics().await;
    let usd = |model: &str| {
        counter(
            &m,
            &format!("floodwall_cost_usd_total{{model=\"{model}\",route=\"chat\"}}"),
        )
    };
    assert!(
        (usd("pricey-model") - alice_spent as f64 / 1e9).abs() < 1e-9,
        "{m}"
    );
    assert!(
        (usd("cheap-model") - bob_spent as f64 / 1e9).abs() < 1e-9,
        "{m}"
    );
}

// ------------------------------------------------------------ Redis outages

/// A GET that must answer within `within`; the answer and its latency.
async fn timed_get(addr: std::net::SocketAddr, path: &str, within: Duration) -> (Resp, Duration) {
    let started = Instant::now();
    let r = tokio::time::timeout(within, get_as(addr, path, &[]))
        .await
        .unwrap_or_else(|_| panic!("GET {path} hung past {within:?}"));
    (r, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_each_on_store_error_mode_applies_and_redis_is_used_again_after_restart(
) {
    let redis = RedisServer::start();
    let port = redis.port;
    let mock = start_mock().await;
    let top = format!(
        "store:\n  redis: {{ url: \"{}\", key_prefix: fw-e2e-outage, timeout: 100ms, expected_replicas: 2 }}\n",
        redis.url()
    );
    let rule = |name: &str, limit: u32, mode: &str| {
        let r = format!(
            "{{ name: {name}, key: [global], limits: [{{ requests: {limit}, per: 10m }}], on_store_error: {mode} }}"
        );
        route(name, &format!("/{name}"), &[&r])
    };
    let routes = [
        rule("open", 3, "fail_open"),
        rule("closed", 100, "fail_closed"),
        rule("local", 10, "local"),
    ]
    .concat();
    let fw = Floodwall::start(&limits_policy(&mock, &top, &routes)).await;
    // The Redis timeout, plus a margin for a loaded test machine; far below
    // the 2 s a connection attempt may take in the background.
    let bound = Duration::from_millis(100 + 900);

    // Redis up: the counts are in Redis.
    for _ in 0..3 {
        assert_eq!(get_as(fw.addr, "/open", &[]).await.status, 200);
    }
    assert_rate_limited(&get_as(fw.addr, "/open", &[]).await, 3);
    assert_eq!(get_as(fw.addr, "/closed", &[]).await.status, 200);
    assert_eq!(get_as(fw.addr, "/local", &[]).await.status, 200);

    drop(redis);

    // fail_open: the rule is skipped, so the exhausted limit lets requests pass.
    for i in 0..5 {
        let (r, took) = timed_get(fw.addr, "/open", bound).await;
        assert_eq!(r.status, 200, "fail_open request {i}: {}", r.text());
        assert!(took < bound, "fail_open request {i} took {took:?}");
    }
    // fail_closed: 503 limiter_unavailable with Retry-After.
    for i in 0..3 {
        let (r, took) = timed_get(fw.addr, "/closed", bound).await;
        r.assert_floodwall_error(503, "limiter_unavailable");
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(took < bound, "fail_closed request {i} took {took:?}");
    }
    // local: limit / expected_replicas = 10 / 2 = 5 in this process.
    let mut passed = 0;
    for i in 0..8 {
        let (r, took) = timed_get(fw.addr, "/local", bound).await;
        assert!(took < bound, "local request {i} took {took:?}");
        match r.status {
            200 => passed += 1,
            _ => assert_rate_limited(&r, 5),
        }
    }
    assert_eq!(passed, 5, "the local fallback enforces 10 / 2 replicas");
    let m = fw.metrics().await;
    assert!(counter(&m, &decisions("open", "failed_open")) >= 5.0, "{m}");
    assert_eq!(counter(&m, &decisions("local", "local")), 5.0, "{m}");
    assert!(counter(&m, &decisions("closed", "limited")) >= 3.0, "{m}");
    assert!(
        counter(&m, "floodwall_limiter_store_errors_total{op=\"check\"}") >= 16.0,
        "{m}"
    );

    // Redis back on the same port: used again without a restart of floodwall.
    let _redis = RedisServer::start_on(port);
    eventually(
        "floodwall to use Redis again",
        Duration::from_secs(15),
        || async { (get_as(fw.addr, "/closed", &[]).await.status == 200).then_some(()) },
    )
    .await;
    // The new Redis is empty: the limits start afresh and hold again.
    for _ in 0..3 {
        assert_eq!(get_as(fw.addr, "/open", &[]).await.status, 200);
    }
    assert_rate_limited(&get_as(fw.addr, "/open", &[]).await, 3);
    // The full limit of 10 again (through Redis, not the exhausted local 5).
    for i in 0..10 {
        let r = get_as(fw.addr, "/local", &[]).await;
        assert_eq!(
            r.status,
            200,
            "local request {i} with Redis back: {}",
            r.text()
        );
    }
    assert_rate_limited(&get_as(fw.addr, "/local", &[]).await, 10);
}

// ------------------------------------------------------------ identity

fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// An HS256 token for `claims`, signed with `secret`.
fn hs256(secret: &str, claims: &Value) -> String {
    let head = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = b64url(claims.to_string().as_bytes());
    let signing_input = format!("{head}.{body}");
    let sig =
        floodwall::policy::identity::jwt::hmac_sha256(secret.as_bytes(), signing_input.as_bytes());
    format!("{signing_input}.{}", b64url(&sig))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

const JWT_SECRET: &str = "e2e-limits-hs256-secret-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_keyed_limit_counts_users_apart_and_refuses_bad_tokens_and_missing_identities() {
    let mock = start_mock().await;
    let top = format!(
        "identity:\n  user:\n    - jwt: {{ secret_env: E2E_LIMITS_JWT_SECRET, public_key_file: \"{}\", claim: sub }}\n",
        fixture("jwt/rs256-public.pem").display()
    );
    let rule = |name: &str, extra: &str| {
        let r = format!(
            "{{ name: {name}-per-user, key: [user], limits: [{{ requests: 2, per: 10m }}], require_identity: true{extra} }}"
        );
        route(name, &format!("/{name}"), &[&r])
    };
    let routes = rule("api", "") + &rule("strict", ", missing_identity_status: 400");
    let fw = Floodwall::start_with_env(
        &limits_policy(&mock, &top, &routes),
        &[("E2E_LIMITS_JWT_SECRET", JWT_SECRET)],
    )
    .await;
    let exp = unix_now() + 3600;
    let token = |sub: &str| {
        format!(
            "Bearer {}",
            hs256(JWT_SECRET, &json!({"sub": sub, "exp": exp}))
        )
    };
    let (alice, bob) = (token("alice"), token("bob"));
    let call = |path: &'static str, auth: Option<String>| {
        let addr = fw.addr;
        async move {
            match auth {
                Some(a) => get_as(addr, path, &[("authorization", &a)]).await,
                None => get_as(addr, path, &[]).await,
            }
        }
    };

    // Two users, counted apart.
    for _ in 0..2 {
        assert_eq!(call("/api", Some(alice.clone())).await.status, 200);
    }
    assert_rate_limited(&call("/api", Some(alice.clone())).await, 2);
    for _ in 0..2 {
        assert_eq!(
            call("/api", Some(bob.clone())).await.status,
            200,
            "bob has a bucket of his own"
        );
    }
    assert_rate_limited(&call("/api", Some(bob.clone())).await, 2);
    // The RS256 fixture token (sub rs-user-1), through the same source.
    let rs = std::fs::read_to_string(fixture("jwt/rs256-token.txt")).unwrap();
    assert_eq!(
        call("/api", Some(format!("Bearer {}", rs.trim())))
            .await
            .status,
        200
    );
    let (status, usage) = admin_limits(&fw, "rule=api-per-user&key=rs-user-1").await;
    assert_eq!(status, 200);
    assert_eq!(usage["windows"][0]["used"], 1, "{usage}");

    // Expired: 401 invalid_token saying so.
    let expired = hs256(
        JWT_SECRET,
        &json!({"sub": "carol", "exp": unix_now() - 120}),
    );
    let r = call("/api", Some(format!("Bearer {expired}"))).await;
    r.assert_floodwall_error(401, "invalid_token");
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{}",
        r.text()
    );
    // A bad signature (signed with another secret): 401.
    let forged = hs256(
        "another-secret-of-32-bytes-long!!",
        &json!({"sub": "alice", "exp": exp}),
    );
    let r = call("/api", Some(format!("Bearer {forged}"))).await;
    r.assert_floodwall_error(401, "invalid_token");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("signature"),
        "{}",
        r.text()
    );
    // No identity at all: 401, or 400 where the rule says so.
    let r = call("/api", None).await;
    r.assert_floodwall_error(401, "missing_identity");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requires an identity"),
        "{}",
        r.text()
    );
    call("/strict", None)
        .await
        .assert_floodwall_error(400, "missing_identity");
    assert_eq!(
        call("/strict", Some(alice.clone())).await.status,
        200,
        "alice's count is per route rule"
    );

    assert_eq!(
        mock.stats().requests,
        2 + 2 + 1 + 1,
        "refused requests never reach the backend"
    );
    // Every request's lines are written once the last one's access line is.
    let logs = fw
        .wait_logs("the last request's access line", |l| {
            l.lines()
                .any(|l| l.contains("route=strict") && l.contains("status=200"))
        })
        .await;
    assert!(
        !logs.contains(&expired) && !logs.contains(&forged) && !logs.contains(&alice[7..]),
        "tokens are never logged"
    );
    assert!(
        logs.contains("rejected token"),
        "the audit log records the rejection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_tiers_raise_limits_and_admin_is_unlimited_but_only_from_trusted_peers() {
    let mock = start_mock().await;
    let top = "identity:\n  user: [{ header: x-user-id }]\n  tier: { header: x-user-tier, default: free }\n";
    let routes = route(
        "api",
        "/",
        &["{ name: tiered, key: [user], limits: [{ requests: 2, per: 10m }], tiers: { premium: [{ requests: 5, per: 10m }], admin: unlimited } }"],
    );
    let policy = limits_policy(&mock, top, &routes);
    let fw = Floodwall::start(&policy).await;
    let as_user = |user: &'static str, tier: Option<&'static str>| {
        let addr = fw.addr;
        async move {
            let mut h = vec![("x-user-id", user)];
            if let Some(t) = tier {
                h.push(("x-user-tier", t));
            }
            get_as(addr, "/v1/models", &h).await
        }
    };
    let passes = |user: &'static str, tier: Option<&'static str>, n: usize| async move {
        let mut ok = 0;
        let mut last = None;
        for _ in 0..n {
            let r = as_user(user, tier).await;
            if r.status == 200 {
                ok += 1;
            }
            last = Some(r);
        }
        (ok, last.unwrap())
    };

    // No tier header: the default tier `free` uses the rule's limits.
    let (ok, last) = passes("fay", None, 3).await;
    assert_eq!(ok, 2);
    assert_rate_limited(&last, 2);
    let (ok, last) = passes("frank", Some("free"), 3).await;
    assert_eq!(ok, 2);
    assert_rate_limited(&last, 2);
    // premium: higher.
    let (ok, last) = passes("pat", Some("premium"), 6).await;
    assert_eq!(ok, 5);
    assert_rate_limited(&last, 5);
    // admin: unlimited, and no rate-limit headers (no window applies).
    let (ok, last) = passes("ada", Some("admin"), 30).await;
    assert_eq!(ok, 30);
    assert!(
        last.header("x-ratelimit-limit").is_none(),
        "{:?}",
        last.headers
    );
    let m = fw.metrics().await;
    assert_eq!(counter(&m, &decisions("tiered", "unlimited")), 30.0, "{m}");

    // From a peer outside `server.trusted_proxies`, the tier (and user)
    // headers are not believed: `admin` buys nothing.
    let untrusted = policy.replace(
        "  grace_period: 1s\n",
        "  grace_period: 1s\n  trusted_proxies: [10.0.0.0/8]\n",
    );
    assert_ne!(untrusted, policy);
    let fw2 = Floodwall::start(&untrusted).await;
    let mut ok = 0;
    for _ in 0..4 {
        let r = get_as(
            fw2.addr,
            "/v1/models",
            &[("x-user-id", "ada"), ("x-user-tier", "admin")],
        )
        .await;
        if r.status == 200 {
            ok += 1;
        } else {
            assert_rate_limited(&r, 2);
        }
    }
    assert_eq!(ok, 2, "an untrusted client cannot name its own tier");
}

// ------------------------------------------------------------ shadow mode

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_rule_never_refuses_but_counts_what_it_would_have_done() {
    let mock = start_mock().await;
    let routes = route(
        "api",
        "/",
        &["{ name: trial, key: [global], limits: [{ requests: 2, per: 10m }], shadow: true }"],
    );
    let fw = Floodwall::start(&limits_policy(&mock, "", &routes)).await;
    for i in 0..5 {
        let r = get_as(fw.addr, "/v1/models", &[]).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert!(
            r.header("x-ratelimit-limit").is_none(),
            "a shadow rule adds no headers"
        );
    }
    assert_eq!(mock.stats().requests, 5);
    let m = fw.metrics().await;
    assert_eq!(counter(&m, &decisions("trial", "allowed")), 2.0, "{m}");
    assert_eq!(
        counter(&m, &decisions("trial", "shadow_limited")),
        3.0,
        "{m}"
    );
    fw.wait_logs("the shadow rule's audit line", |l| {
        l.contains("shadow rule would have refused")
    })
    .await;
}

// ------------------------------------------------------------ the teams' examples

/// `examples/<name>.yaml` with its limits kept, and its listeners and
/// backend endpoints moved to the test's (`127.0.0.1:0`, `backend`).
fn example_policy(name: &str, backend: &str) -> String {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{name}.yaml"));
    let text = std::fs::read_to_string(&path).unwrap();
    let (mut listens, mut endpoints) = (0, 0);
    let out: Vec<String> = text
        .lines()
        .map(|line| {
            let indent = &line[..line.len() - line.trim_start().len()];
            let t = line.trim_start();
            if t.starts_with("listen:") {
                listens += 1;
                if t.contains('[') {
                    format!("{indent}listen: [\"127.0.0.1:0\"]")
                } else {
                    format!("{indent}listen: \"127.0.0.1:0\"")
                }
            } else if t.starts_with("endpoints:") {
                endpoints += 1;
                format!("{indent}endpoints: [\"{backend}\"]")
            } else if t.starts_with("timeout:") && indent.len() == 4 {
                // store.redis.timeout: the example's 50ms is for production;
                // a loaded 2-core test machine can miss it and fail open.
                format!("{indent}timeout: 2s")
            } else {
                line.to_string()
            }
        })
        .collect();
    assert_eq!(listens, 2, "{name}: the proxy and admin listeners");
    assert!(endpoints >= 2, "{name}: backends");
    out.join("\n") + "\n"
}

async fn post_json_as(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> Resp {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    Client::new()
        .send(addr, "POST", path, &h, body.to_string().as_bytes())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notes_assistant_example_limits_users_to_10_a_minute_and_prices_inference_calls() {
    let redis = RedisServer::start();
    let mock = start_mock().await;
    let policy = example_policy("notes-assistant", &mock_url(&mock));
    let fw = Floodwall::start_with_env(&policy, &[("REDIS_URL", &redis.url())]).await;
    let query = json!({"query": "what did I write about sequencing?"});

    for i in 0..10 {
        let r = post_json_as(fw.addr, "/query", &[("x-user-id", "alice")], &query).await;
        assert_eq!(
            r.status,
            200,
            "docs/teams.md na-02: alice's query {i}: {}",
            r.text()
        );
        if i == 0 {
            // na-05, na-07: the three per-user windows and the global one, together.
            let policy = r.header("ratelimit-policy").unwrap();
            for w in [
                "\"per-user:1m\";q=10;w=60",
                "\"per-user:1h\";q=100;w=3600",
                "\"per-user:1d\";q=500;w=86400",
                "\"global:1h\";q=1000;w=3600",
            ] {
                assert!(
                    policy.contains(w),
                    "docs/teams.md na-05/na-07: {w} in {policy}"
                );
            }
        }
    }
    let r = post_json_as(fw.addr, "/query", &[("x-user-id", "alice")], &query).await;
    assert_rate_limited(&r, 10); // na-13: 429 with Retry-After
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("per-user"),
        "{}",
        r.text()
    );
    let r = post_json_as(fw.addr, "/query", &[("x-user-id", "bob")], &query).await;
    assert_eq!(r.status, 200, "another user has a bucket of his own");
    assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 9);
    let (status, global) = admin_limits(&fw, "rule=global&key=global").await;
    assert_eq!(status, 200);
    assert_eq!(
        global["windows"][0]["used"], 11,
        "docs/teams.md na-07: the global count: {global}"
    );

    // na-08..na-11: an inference call is priced from its reported usage and
    // counted against alice's $5 and the $100 daily budgets.
    let chat = json!({"model": "mistralai/Mistral-7B-Instruct-v0.3", "max_tokens": 16, "messages": [{"role": "user", "content": "summarise my notes"}]});
    let r = post_json_as(
        fw.addr,
        "/hf/v1/chat/completions",
        &[("x-user-id", "alice")],
        &chat,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let usage = &r.json()["usage"];
    // $0.50 / $1.50 per 1M tokens = 500 / 1500 nano-USD per token.
    let nanos = usage["prompt_tokens"].as_u64().unwrap() * 500
        + usage["completion_tokens"].as_u64().unwrap() * 1500;
    for (rule, key, limit) in [
        ("spend-user", "alice", 5.0),
        ("spend-total", "global", 100.0),
    ] {
        let w = eventually(
            &format!("{rule} to hold the call's cost"),
            Duration::from_secs(5),
            || async {
                let w = key_usage(&fw, rule, key).await;
                (w["used"].as_u64() == Some(nanos)).then_some(w)
            },
        )
        .await;
        assert_eq!(
            w["limit_usd"].as_f64(),
            Some(limit),
            "docs/teams.md na-08/na-09: {w}"
        );
    }
    let (_, top) = admin_limits(&fw, "rule=spend-user").await;
    assert_eq!(
        top["top"][0]["key"], "alice",
        "docs/teams.md na-11: per-user spend: {top}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn research_copilot_example_enforces_the_tier_table_per_action_and_per_ip() {
    let redis = RedisServer::start();
    let mock = start_mock().await;
    let policy = example_policy("research-copilot", &mock_url(&mock));
    let secret = "copilot-e2e-hs256-secret-0123456789";
    let env = [
        ("REDIS_URL", redis.url()),
        ("FLOODWALL_ADMIN_TOKEN", "e2e-admin".to_string()),
        ("COPILOT_JWT_SECRET", secret.to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let fw = Floodwall::start_with_env(&policy, &env).await;
    let exp = unix_now() + 3600;
    let bearer = |sub: &str, tier: Option<&str>| {
        let mut claims = json!({"sub": sub, "exp": exp});
        if let Some(t) = tier {
            claims["tier"] = json!(t);
        }
        format!("Bearer {}", hs256(secret, &claims))
    };
    let body = json!({"query": "which variants are pathogenic?", "messages": [{"role": "user", "content": "hi"}]});
    // Each user from their own client IP, so that the per-IP limit stays out of the way.
    let calls = |path: &'static str, auth: String, ip: &'static str, n: usize| {
        let (addr, body) = (fw.addr, body.clone());
        async move {
            let mut out = Vec::new();
            for _ in 0..n {
                out.push(
                    post_json_as(
                        addr,
                        path,
                        &[("authorization", &auth), ("x-forwarded-for", ip)],
                        &body,
                    )
                    .await,
                );
            }
            out
        }
    };
    let passed = |rs: &[Resp]| rs.iter().filter(|r| r.status == 200).count();

    // The tier table on the agent route (rc-12, rc-15, rc-18, rc-21).
    for (user, tier, ip, limit) in [
        ("fiona", Some("free"), "203.0.113.1", 10),
        ("nora", None, "203.0.113.2", 10),
        ("pedro", Some("premium"), "203.0.113.3", 50),
    ] {
        let rs = calls("/copilot-agent", bearer(user, tier), ip, limit + 1).await;
        assert_eq!(
            passed(&rs),
            limit,
            "docs/teams.md rc-12/rc-15: {user} ({tier:?}) on /copilot-agent"
        );
        assert_rate_limited(rs.last().unwrap(), limit as u64);
        assert!(rs.last().unwrap().json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("agent-per-user"));
    }
    let rs = calls(
        "/copilot-agent",
        bearer("ada", Some("admin")),
        "203.0.113.4",
        1,
    )
    .await;
    assert_eq!(rs[0].status, 200);
    let policy_header = rs[0].header("ratelimit-policy").unwrap();
    assert!(
        policy_header.contains("\"agent-per-user:1h\";q=1000;w=3600"),
        "docs/teams.md rc-18: {policy_header}"
    );
    assert!(
        policy_header.contains("\"per-ip:15m\";q=100;w=900"),
        "docs/teams.md rc-10: {policy_header}"
    );
    // A tier outside the table gets the plan's per-action number.
    let rs = calls(
        "/copilot-agent",
        bearer("otto", Some("trial")),
        "203.0.113.5",
        1,
    )
    .await;
    assert!(
        rs[0]
            .header("ratelimit-policy")
            .unwrap()
            .contains("\"agent-per-user:1h\";q=20;w=3600"),
        "docs/teams.md rc-05"
    );

    // Actions are counted apart: pedro's agent runs are used up, his chat is not (rc-16).
    let rs = calls("/chat", bearer("pedro", Some("premium")), "203.0.113.3", 1).await;
    assert_eq!(rs[0].status, 200, "{}", rs[0].text());
    let policy_header = rs[0].header("ratelimit-policy").unwrap();
    assert!(
        policy_header.contains("\"chat-per-user:1h\";q=200;w=3600"),
        "docs/teams.md rc-16: premium chat 200/h: {policy_header}"
    );
    // The headers report the window with the least left: here the per-IP one
    // (100 - 50 agent runs - this call).
    assert_eq!(header_u64(&rs[0], "x-ratelimit-limit"), 100);
    assert_eq!(header_u64(&rs[0], "x-ratelimit-remaining"), 49);
    // session_create: 50 a day (rc-08).
    let rs = calls("/sessions", bearer("sam", None), "203.0.113.6", 51).await;
    assert_eq!(passed(&rs), 50, "docs/teams.md rc-08");
    assert_rate_limited(rs.last().unwrap(), 50);

    // Without a token, the per-user actions refuse; a bad token is a 401.
    let r = post_json_as(fw.addr, "/copilot-agent", &[], &body).await;
    r.assert_floodwall_error(401, "missing_identity");
    let forged = format!(
        "Bearer {}",
        hs256(
            "not-the-copilot-secret-0123456789",
            &json!({"sub": "fiona", "tier": "admin", "exp": exp})
        )
    );
    post_json_as(fw.addr, "/chat", &[("authorization", &forged)], &body)
        .await
        .assert_floodwall_error(401, "invalid_token");

    // Per IP, before auth: 100 per 15 minutes on the client-facing routes (rc-10).
    let answers = burst(101, |_| {
        (
            fw.addr,
            "/api/projects".to_string(),
            vec![("x-forwarded-for".into(), "198.51.100.7".into())],
        )
    })
    .await;
    assert_eq!(
        answers.iter().filter(|r| r.status == 200).count(),
        100,
        "docs/teams.md rc-10"
    );
    assert_rate_limited(answers.iter().find(|r| r.status == 429).unwrap(), 100);
    assert_eq!(
        get_as(
            fw.addr,
            "/api/projects",
            &[("x-forwarded-for", "198.51.100.8")]
        )
        .await
        .status,
        200,
        "another client IP"
    );
}
