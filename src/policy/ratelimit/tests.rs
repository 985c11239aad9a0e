//! Decision tests with an injected clock, in memory; then the same
//! behaviour through a private `redis-server`.

use std::net::IpAddr;
use std::sync::Arc;

use super::*;
use crate::config::{compile_str_with_env, Snapshot};

/// 2023-11-14T22:13:20Z, a whole second.
const T0: u64 = 1_700_000_000_000;
const DAY: u64 = 86_400_000;

fn env(name: &str) -> Option<String> {
    (name == "JWT_SECRET").then(|| "0123456789abcdef0123456789abcdef".to_string())
}

/// A policy with one route `chat` whose `rate_limits` is `rules` (one line
/// of flow YAML), plus `top` at the top level.
fn policy(top: &str, rules: &str) -> Arc<Snapshot> {
    let text = format!(
        "version: 1
identity:
  user: [{{ header: x-user-id }}]
  tier: {{ header: x-tier, default: free }}
prices:
  gpt-4o-mini: {{ input: 0.15, output: 0.60 }}
  big: {{ input: 10, output: 30 }}
{top}
backends:
  b: {{ endpoints: [\"http://127.0.0.1:9\"] }}
routes:
  - name: chat
    match: {{ path_prefix: / }}
    backend: b
    rate_limits: {rules}
"
    );
    match compile_str_with_env(&text, "t.yaml", &env) {
        Ok(s) => Arc::new(s),
        Err(e) => panic!("{e}\n{text}"),
    }
}

struct Req {
    identity: Identity,
    llm: Option<LlmFields>,
    path: String,
    headers: http::HeaderMap,
}

fn req(user: Option<&str>) -> Req {
    Req {
        identity: Identity {
            user: user.map(str::to_string),
            user_from: None,
            tier: "free".into(),
            ip: Some("198.51.100.7".parse::<IpAddr>().unwrap()),
            jwt_error: None,
        },
        llm: None,
        path: "/v1/chat/completions".into(),
        headers: http::HeaderMap::new(),
    }
}

fn with_tier(mut r: Req, tier: &str) -> Req {
    r.identity.tier = tier.into();
    r
}

fn with_llm(mut r: Req, model: &str, max_tokens: Option<u64>, prompt_chars: usize) -> Req {
    r.llm = Some(LlmFields {
        model: Some(model.into()),
        max_tokens,
        prompt_chars,
        ..Default::default()
    });
    r
}

async fn check(l: &Limiter, snap: &Snapshot, r: &Req, now: u64) -> Decision {
    let request = LimitRequest {
        identity: &r.identity,
        route: "chat",
        path: &r.path,
        headers: &r.headers,
        llm: r.llm.as_ref(),
        prices: &snap.limits.prices,
    };
    l.check(snap.limits.rules_for(0), &request, now).await
}

/// How many of `n` identical requests at `now` pass.
async fn burst(l: &Limiter, snap: &Snapshot, r: &Req, n: usize, now: u64) -> usize {
    let mut passed = 0;
    for _ in 0..n {
        if check(l, snap, r, now).await.allowed {
            passed += 1;
        }
    }
    passed
}

async fn used(l: &Limiter, snap: &Snapshot, rule: usize, key: &str, now: u64) -> Vec<u64> {
    let rule = &snap.limits.rules_for(0)[rule];
    l.usage(rule, key, None, now)
        .await
        .unwrap()
        .iter()
        .map(|u| u.used)
        .collect()
}

#[tokio::test]
async fn ten_per_minute_lets_exactly_ten_through_and_the_eleventh_gets_429_with_headers() {
    let snap = policy(
        "",
        "[{ name: per-user, key: [user], limits: [{ requests: 10, per: 1m }] }]",
    );
    let l = Limiter::in_memory();
    let r = req(Some("alice"));
    let mut statuses = Vec::new();
    for i in 0..50 {
        let d = check(&l, &snap, &r, T0).await;
        if i < 10 {
            assert!(d.allowed, "request {i}");
            let h = d.headers.as_ref().unwrap();
            assert_eq!((h.limit, h.remaining), (10, 9 - i as u64));
            assert!(d.reservation.is_none());
        }
        statuses.push(d.status);
        if i == 10 {
            assert!(!d.allowed);
            assert_eq!(d.reason, Some(Reason::RateLimited));
            assert_eq!(d.status, 429);
            assert_eq!(d.retry_after_secs, Some(6));
            assert_eq!(d.rule.as_ref().map(|r| r.name.as_str()), Some("per-user"));
            let h = d.headers.as_ref().unwrap();
            assert_eq!((h.limit, h.remaining, h.reset_secs), (10, 0, 60));
            assert_eq!(h.policy(), "\"per-user:1m\";q=10;w=60");
            assert_eq!(h.ratelimit(), "\"per-user:1m\";r=0;t=60");
            assert!(
                d.message()
                    .contains("rule `per-user` allows 10/1m; retry after 6s"),
                "{}",
                d.message()
            );
        }
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 10);
    // Another key has its own bucket.
    assert_eq!(burst(&l, &snap, &req(Some("bob")), 50, T0).await, 10);
}

#[tokio::test]
async fn windows_refill_at_their_edges() {
    let snap = policy(
        "",
        "[{ name: r, key: [user], limits: [{ requests: 10, per: 1m }] }]",
    );
    let l = Limiter::in_memory();
    let r = req(Some("alice"));
    assert_eq!(burst(&l, &snap, &r, 10, T0).await, 10);
    let d = check(&l, &snap, &r, T0 + 5_999).await;
    assert!(!d.allowed);
    assert_eq!(d.retry_after_secs, Some(1));
    assert_eq!(burst(&l, &snap, &r, 5, T0 + 6_000).await, 1);
    // A whole window after the burst: full again.
    assert_eq!(burst(&l, &snap, &r, 50, T0 + 66_000).await, 10);
}

#[tokio::test]
async fn all_windows_of_a_rule_are_checked_together_and_a_refusal_charges_none() {
    let snap = policy(
        "",
        "[{ name: r, key: [user], limits: [{ requests: 3, per: 1m }, { requests: 5, per: 1h }] }]",
    );
    let l = Limiter::in_memory();
    let r = req(Some("alice"));
    assert_eq!(burst(&l, &snap, &r, 10, T0).await, 3);
    assert_eq!(used(&l, &snap, 0, "alice", T0).await, [3, 3]);
    // A minute later the minute window is full again, the hour has 2 left.
    assert_eq!(burst(&l, &snap, &r, 10, T0 + 60_000).await, 2);
    let d = check(&l, &snap, &r, T0 + 60_000).await;
    assert_eq!(d.reason, Some(Reason::RateLimited));
    // The hour refused: the minute window was not charged for the refusals.
    assert_eq!(used(&l, &snap, 0, "alice", T0 + 60_000).await, [2, 5]);
    // Retry-After is the hour window's (the longest wait): 1h/5 = 720 s
    // after the first request.
    assert_eq!(d.retry_after_secs, Some(660));
    let h = d.headers.unwrap();
    assert_eq!((h.limit, h.remaining), (5, 0));
}

#[tokio::test]
async fn a_request_refused_by_one_rule_is_not_charged_by_the_others() {
    let snap = policy(
        "",
        "[{ name: per-user, key: [user], limits: [{ requests: 5, per: 1m }] }, { name: global, key: [global], limits: [{ requests: 3, per: 1m }] }]",
    );
    let l = Limiter::in_memory();
    let r = req(Some("alice"));
    assert_eq!(burst(&l, &snap, &r, 10, T0).await, 3);
    assert_eq!(used(&l, &snap, 0, "alice", T0).await, [3]);
    assert_eq!(used(&l, &snap, 1, "global", T0).await, [3]);
    let d = check(&l, &snap, &r, T0).await;
    assert_eq!(d.rule.as_ref().map(|r| r.name.as_str()), Some("global"));
    let labels: Vec<&str> = d.outcomes.iter().map(|o| o.outcome.label()).collect();
    assert_eq!(labels, ["allowed", "limited"]);
}

#[tokio::test]
async fn burst_above_the_limit_allows_a_spike_then_the_steady_rate() {
    let snap = policy(
        "",
        "[{ name: r, key: [user], limits: [{ requests: 10, per: 1m, burst: 20 }] }]",
    );
    let l = Limiter::in_memory();
    let r = req(Some("alice"));
    assert_eq!(burst(&l, &snap, &r, 50, T0).await, 20);
    assert_eq!(burst(&l, &snap, &r, 50, T0 + 6_000).await, 1);
}

#[tokio::test]
async fn tiers_override_limits_and_unlimited_is_unlimited() {
    let snap = policy(
        "",
        "[{ name: r, key: [user], limits: [{ requests: 2, per: 1h }], tiers: { premium: [{ requests: 5, per: 1h }], admin: unlimited } }]",
    );
    let l = Limiter::in_memory();
    assert_eq!(
        burst(&l, &snap, &with_tier(req(Some("f")), "free"), 10, T0).await,
        2
    );
    assert_eq!(
        burst(&l, &snap, &with_tier(req(Some("p")), "premium"), 10, T0).await,
        5
    );
    let admin = with_tier(req(Some("a")), "admin");
    assert_eq!(burst(&l, &snap, &admin, 100, T0).await, 100);
    let d = check(&l, &snap, &admin, T0).await;
    assert!(d.headers.is_none());
    assert_eq!(d.outcomes[0].outcome, Outcome::Unlimited);
    // An unknown tier gets the rule's own limits.
    assert_eq!(
        burst(&l, &snap, &with_tier(req(Some("x")), "gold"), 10, T0).await,
        2
    );
    // Upgrading keeps what was used in a window of the same length.
    assert_eq!(
        burst(&l, &snap, &with_tier(req(Some("f")), "premium"), 10, T0).await,
        3
    );
}

#[tokio::test]
async fn shadow_rules_count_but_never_refuse() {
    let snap = policy(
        "",
        "[{ name: s, key: [user], limits: [{ requests: 2, per: 1m }], shadow: true }]",
    );
    let l = Limiter::in_memory();
    let r = req(Some("alice"));
    for i in 0..5 {
        let d = check(&l, &snap, &r, T0).await;
        assert!(d.allowed);
        assert_eq!(d.shadow_denied, i >= 2, "request {i}");
        assert!(d.headers.is_none(), "shadow rules add no headers");
        let expected = if i >= 2 {
            Outcome::ShadowLimited(Reason::RateLimited)
        } else {
            Outcome::Allowed
        };
        assert_eq!(d.outcomes[0].outcome, expected);
    }
    // It counted like an enforcing rule would have: only what it admitted.
    assert_eq!(used(&l, &snap, 0, "alice", T0).await, [2]);
}

#[tokio::test]
async fn exempt_paths_and_keys_are_not_counted() {
    let snap = policy(
        "",
        "[{ name: r, key: [user], limits: [{ requests: 1, per: 1m }], exempt: { paths: [/health], keys: [vip] } }]",
    );
    let l = Limiter::in_memory();
    let mut health = req(Some("alice"));
    health.path = "/health/ready".into();
    assert_eq!(burst(&l, &snap, &health, 10, T0).await, 10);
    assert_eq!(
        check(&l, &snap, &health, T0).await.outcomes[0].outcome,
        Outcome::Exempt
    );
    assert_eq!(burst(&l, &snap, &req(Some("vip")), 10, T0).await, 10);
    assert_eq!(burst(&l, &snap, &req(Some("alice")), 10, T0).await, 1);
    let mut healthz = req(Some("bob"));
    healthz.path = "/healthz".into();
    assert_eq!(burst(&l, &snap, &healthz, 10, T0).await, 1);
}

#[tokio::test]
async fn a_required_identity_refuses_anonymous_requests_without_counting() {
    let snap = policy(
        "",
        "[{ name: a, key: [user], limits: [{ requests: 5, per: 1m }], require_identity: true }, { name: b, key: [ip], limits: [{ requests: 5, per: 1m }], require_identity: true, missing_identity_status: 400 }]",
    );
    let l = Limiter::in_memory();
    let d = check(&l, &snap, &req(None), T0).await;
    assert!(!d.allowed);
    assert_eq!((d.reason, d.status), (Some(Reason::MissingIdentity), 401));
    assert!(d.message().contains("requires an identity"));
    assert_eq!(l.local_entries(), 0, "nothing was counted");
    // The first refusing rule sets the status.
    let snap = policy(
        "",
        "[{ name: b, key: [ip], limits: [{ requests: 5, per: 1m }], require_identity: true, missing_identity_status: 400 }]",
    );
    assert_eq!(check(&l, &snap, &req(None), T0).await.status, 400);
    assert!(check(&l, &snap, &req(Some("alice")), T0).await.allowed);
}

#[tokio::test]
async fn anonymous_requests_share_one_bucket_without_require_identity() {
    let snap = policy(
        "",
        "[{ name: r, key: [user], limits: [{ requests: 2, per: 1m }] }]",
    );
    let l = Limiter::in_memory();
    assert_eq!(burst(&l, &snap, &req(None), 5, T0).await, 2);
    let d = check(&l, &snap, &req(None), T0).await;
    assert_eq!(d.outcomes[0].key, "-");
}

#[tokio::test]
async fn token_reservations_are_reconciled_with_real_usage() {
    let snap = policy(
        "",
        "[{ name: t, key: [user], limits: [{ tokens: 1000, per: 1m }], default_max_tokens: 300 }]",
    );
    let l = Limiter::in_memory();
    // 400 prompt characters = 100 tokens, plus max_tokens 500: 600 reserved.
    let r = with_llm(req(Some("alice")), "gpt-4o-mini", Some(500), 400);
    let first = check(&l, &snap, &r, T0).await;
    assert!(first.allowed);
    assert_eq!(first.estimated_tokens, 600);
    let h = first.headers.as_ref().unwrap();
    assert_eq!((h.limit, h.remaining), (1000, 400));
    assert_eq!(h.policy(), "\"t:tokens:1m\";q=1000;w=60;qu=\"tokens\"");
    let reservation = first.reservation.unwrap();
    assert_eq!(
        (reservation.prompt_tokens, reservation.reserved_tokens()),
        (100, 600)
    );
    // A second 600 does not fit the 400 left.
    let second = check(&l, &snap, &r, T0).await;
    assert_eq!(second.reason, Some(Reason::TokensExceeded));
    assert!(
        second.message().contains("estimated at 600 tokens"),
        "{}",
        second.message()
    );
    // 12 s for 200 tokens to drain back.
    assert_eq!(second.retry_after_secs, Some(12));
    // The call really used 100 + 50: 450 come back.
    let usage = Usage {
        input_tokens: 100,
        output_tokens: 50,
    };
    l.reconcile(reservation, usage, T0 + 10).await.unwrap();
    let third = check(&l, &snap, &r, T0 + 10).await;
    assert!(third.allowed);
    // Without max_tokens the rule's default_max_tokens is the estimate.
    let no_max = with_llm(req(Some("bob")), "gpt-4o-mini", None, 0);
    assert_eq!(check(&l, &snap, &no_max, T0).await.estimated_tokens, 300);
}

#[tokio::test]
async fn an_under_estimate_is_charged_in_full_at_reconciliation() {
    let snap = policy(
        "",
        "[{ name: t, key: [user], limits: [{ tokens: 1000, per: 1m }] }]",
    );
    let l = Limiter::in_memory();
    let r = with_llm(req(Some("alice")), "gpt-4o-mini", Some(100), 0);
    let d = check(&l, &snap, &r, T0).await;
    // The stream ran far past max_tokens (a backend that ignores it): 1500.
    let res = d.reservation.unwrap();
    l.reconcile(
        res,
        Usage {
            input_tokens: 0,
            output_tokens: 1_500,
        },
        T0,
    )
    .await
    .unwrap();
    let next = check(&l, &snap, &r, T0 + 1).await;
    assert_eq!(next.reason, Some(Reason::TokensExceeded));
    // Releasing a reservation (the backend was never reached) refunds it whole.
    let r2 = with_llm(req(Some("bob")), "gpt-4o-mini", Some(900), 0);
    let d = check(&l, &snap, &r2, T0).await;
    assert!(!check(&l, &snap, &r2, T0).await.allowed);
    l.reconcile(d.reservation.unwrap(), Usage::default(), T0)
        .await
        .unwrap();
    assert!(check(&l, &snap, &r2, T0).await.allowed);
}

#[tokio::test]
async fn cost_budgets_reset_at_the_utc_day_boundary() {
    // big: $10 in / $30 out per 1M tokens. 1000 max_tokens = $0.03.
    let snap = policy(
        "",
        "[{ name: spend, key: [user], limits: [{ cost_usd: 0.05, per: 1d }] }]",
    );
    let l = Limiter::in_memory();
    let midnight = (T0 / DAY + 1) * DAY;
    let r = with_llm(req(Some("alice")), "big", Some(1000), 0);
    let first = check(&l, &snap, &r, midnight - 2_000).await;
    assert!(first.allowed);
    let second = check(&l, &snap, &r, midnight - 1_000).await;
    assert_eq!(
        (second.reason, second.status),
        (Some(Reason::BudgetExceeded), 429)
    );
    assert_eq!(second.retry_after_secs, Some(1), "until 00:00 UTC");
    assert!(
        second.message().contains("$0.05/day"),
        "{}",
        second.message()
    );
    // Cost windows do not set the request/token headers.
    assert!(second.headers.is_none());
    // The first call really produced 333 tokens ($0.00999): the rest comes back.
    let res = first.reservation.unwrap();
    assert_eq!(res.price, snap.limits.prices.get("big"));
    l.reconcile(
        res,
        Usage {
            input_tokens: 0,
            output_tokens: 333,
        },
        midnight - 500,
    )
    .await
    .unwrap();
    assert!(check(&l, &snap, &r, midnight - 400).await.allowed);
    assert!(!check(&l, &snap, &r, midnight - 300).await.allowed);
    // At midnight the budget is whole again.
    assert!(check(&l, &snap, &r, midnight).await.allowed);
    let top = l
        .top(&snap.limits.rules_for(0)[0], 5, midnight)
        .await
        .unwrap();
    assert_eq!(top.len(), 1);
    assert_eq!((top[0].key.as_str(), top[0].used), ("alice", 30_000_000));
    let usage = l
        .usage(&snap.limits.rules_for(0)[0], "alice", None, midnight)
        .await
        .unwrap();
    assert_eq!(usage[0].to_json()["used_usd"], serde_json::json!(0.03));
}

#[tokio::test]
async fn two_models_are_priced_differently() {
    let snap = policy(
        "",
        "[{ name: spend, key: [global], limits: [{ cost_usd: 1, per: 1d }] }]",
    );
    let l = Limiter::in_memory();
    let cheap = with_llm(req(Some("a")), "gpt-4o-mini", Some(1000), 4000);
    let dear = with_llm(req(Some("a")), "big", Some(1000), 4000);
    let d = check(&l, &snap, &cheap, T0).await;
    // 1000 prompt tokens × $0.15/M + 1000 × $0.60/M = $0.00075.
    let res = d.reservation.unwrap();
    l.reconcile(
        res,
        Usage {
            input_tokens: 1000,
            output_tokens: 1000,
        },
        T0,
    )
    .await
    .unwrap();
    let d = check(&l, &snap, &dear, T0).await;
    // 1000 × $10/M + 1000 × $30/M = $0.04.
    l.reconcile(
        d.reservation.unwrap(),
        Usage {
            input_tokens: 1000,
            output_tokens: 1000,
        },
        T0,
    )
    .await
    .unwrap();
    let top = l.top(&snap.limits.rules_for(0)[0], 1, T0).await.unwrap();
    assert_eq!(top[0].used, 750_000 + 40_000_000);
}

#[tokio::test]
async fn headers_report_the_window_with_the_least_remaining() {
    let snap = policy(
        "",
        "[{ name: u, key: [user], limits: [{ requests: 10, per: 1m }, { requests: 100, per: 1h }] }, { name: g, key: [global], limits: [{ requests: 5, per: 1s }] }]",
    );
    let l = Limiter::in_memory();
    let d = check(&l, &snap, &req(Some("alice")), T0).await;
    let h = d.headers.unwrap();
    assert_eq!((h.limit, h.remaining, h.reset_secs), (5, 4, 1));
    assert_eq!(
        h.policy(),
        "\"u:1m\";q=10;w=60, \"u:1h\";q=100;w=3600, \"g:1s\";q=5;w=1"
    );
    assert_eq!(h.ratelimit(), "\"g:1s\";r=4;t=1");
    let pairs = h.pairs();
    assert_eq!(pairs[0], ("x-ratelimit-limit", "5".to_string()));
}

#[tokio::test]
async fn header_values_carry_the_same_text_as_the_pairs() {
    let snap = policy(
        "",
        "[{ name: u, key: [user], limits: [{ requests: 10, per: 1m }, { tokens: 1000, per: 1h }] }]",
    );
    let l = Limiter::in_memory();
    let d = check(
        &l,
        &snap,
        &with_llm(req(Some("alice")), "m", Some(10), 40),
        T0,
    )
    .await;
    let h = d.headers.unwrap();
    let pairs = h.pairs();
    let values = h.into_values();
    let values: Vec<(&str, &str)> = values
        .iter()
        .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
        .collect();
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(n, v)| (*n, v.as_str())).collect();
    assert_eq!(values, pairs);
    assert_eq!(
        values[3].1,
        "\"u:1m\";q=10;w=60, \"u:tokens:1h\";q=1000;w=3600;qu=\"tokens\""
    );
}

#[tokio::test]
async fn each_outcome_keeps_its_own_rule_key_after_skipped_rules() {
    // The first rule is skipped (no identity; shadow), the other two are
    // evaluated: their keys must land on their own outcomes, whether the
    // request is admitted or refused.
    let snap = policy(
        "",
        "[{ name: s, key: [user], limits: [{ requests: 1, per: 1m }], require_identity: true, shadow: true }, { name: ip, key: [ip], limits: [{ requests: 100, per: 1m }] }, { name: g, key: [route], limits: [{ requests: 1, per: 1m }] }]",
    );
    let l = Limiter::in_memory();
    let keys = |d: &Decision| -> Vec<(String, String)> {
        d.outcomes
            .iter()
            .map(|o| (o.rule.name.clone(), o.key.clone()))
            .collect()
    };
    let expected = vec![
        ("s".to_string(), String::new()),
        ("ip".to_string(), "198.51.100.7".to_string()),
        ("g".to_string(), "chat".to_string()),
    ];
    let admitted = check(&l, &snap, &req(None), T0).await;
    assert!(admitted.allowed);
    assert_eq!(keys(&admitted), expected);
    let refused = check(&l, &snap, &req(None), T0).await;
    assert!(!refused.allowed);
    assert_eq!(
        refused.outcomes[2].outcome,
        Outcome::Limited(Reason::RateLimited)
    );
    assert_eq!(keys(&refused), expected);
}

#[tokio::test]
async fn combined_keys_are_escaped_and_counted_separately() {
    let snap = policy(
        "",
        "[{ name: r, key: [user, route, header:x-team], limits: [{ requests: 1, per: 1m }] }]",
    );
    let l = Limiter::in_memory();
    let mut r = req(Some("a|b"));
    r.headers
        .insert("x-team", http::HeaderValue::from_static("blue"));
    let d = check(&l, &snap, &r, T0).await;
    assert_eq!(d.outcomes[0].key, "a%7Cb|chat|blue");
    assert!(!check(&l, &snap, &r, T0).await.allowed);
    r.headers
        .insert("x-team", http::HeaderValue::from_static("red"));
    assert!(check(&l, &snap, &r, T0).await.allowed);
}

#[tokio::test]
async fn top_level_rules_apply_to_their_routes() {
    let text = "version: 1
rate_limits:
  - { name: per-ip, key: [ip], limits: [{ requests: 2, per: 15m }], routes: [b] }
  - { name: everywhere, key: [global], limits: [{ requests: 100, per: 1m }] }
backends:
  x: { endpoints: [\"http://127.0.0.1:9\"] }
routes:
  - { name: a, match: { path_prefix: /a }, backend: x }
  - { name: b, match: { path_prefix: /b }, backend: x, rate_limits: [{ name: own, key: [ip], limits: [{ requests: 1, per: 1m }] }] }
";
    let snap = compile_str_with_env(text, "t.yaml", &env).unwrap();
    let names = |i: usize| {
        snap.limits
            .rules_for(i)
            .iter()
            .map(|r| r.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(0), ["everywhere"]);
    assert_eq!(names(1), ["per-ip", "everywhere", "own"]);
    assert!(snap.limits.rules_for(7).is_empty());
    assert_eq!(snap.limits.all_rules().count(), 3);
}

#[tokio::test]
async fn idle_keys_are_evicted() {
    let snap = policy(
        "",
        "[{ name: r, key: [user], limits: [{ requests: 10, per: 1m }] }]",
    );
    let l = Limiter::in_memory();
    for i in 0..100 {
        assert!(
            check(&l, &snap, &req(Some(&format!("u{i}"))), T0)
                .await
                .allowed
        );
    }
    assert_eq!(l.local_entries(), 100);
    // Each key drained 6 s after its request; later decisions sweep every
    // shard in turn and drop them.
    for _ in 0..64 {
        check(
            &l,
            &snap,
            &req(Some("late")),
            T0 + 6_000 + memory::SWEEP_EVERY_MS,
        )
        .await;
    }
    assert_eq!(l.local_entries(), 1, "only `late` is left");
}

#[tokio::test]
async fn changing_a_limit_keeps_the_count_and_changing_per_starts_afresh() {
    let l = Limiter::in_memory();
    let r = req(Some("alice"));
    let v1 = policy(
        "",
        "[{ name: r, key: [user], limits: [{ requests: 10, per: 1m }] }]",
    );
    assert_eq!(burst(&l, &v1, &r, 8, T0).await, 8);
    // An unrelated reload: the same rule, a new snapshot.
    let v2 = policy("", "[{ name: r, key: [user], limits: [{ requests: 10, per: 1m }] }, { name: other, key: [ip], limits: [{ requests: 1000, per: 1h }] }]");
    assert_eq!(burst(&l, &v2, &r, 5, T0).await, 2);
    // The limit raised to 20: the 10 used still count.
    let v3 = policy(
        "",
        "[{ name: r, key: [user], limits: [{ requests: 20, per: 1m }] }]",
    );
    assert_eq!(burst(&l, &v3, &r, 50, T0).await, 10);
    // A different window length is a new counter.
    let v4 = policy(
        "",
        "[{ name: r, key: [user], limits: [{ requests: 5, per: 2m }] }]",
    );
    assert_eq!(burst(&l, &v4, &r, 50, T0).await, 5);
}

mod config {
    use super::*;
    use crate::config::limits::{
        CostPeriod, JwtAlg, KeyPart, OnStoreError, TierFrom, TierLimits, UserSource,
    };
    use std::time::Duration;

    fn errors(top: &str, rules: &str) -> Vec<String> {
        let text = format!(
            "version: 1
{top}
backends:
  b: {{ endpoints: [\"http://127.0.0.1:9\"] }}
routes:
  - name: chat
    match: {{ path_prefix: / }}
    backend: b
    rate_limits: {rules}
"
        );
        match compile_str_with_env(&text, "p.yaml", &env) {
            Ok(_) => panic!("expected errors:\n{text}"),
            Err(e) => e.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn a_full_rule_compiles_with_every_field() {
        let snap = policy(
            "",
            "[{ name: full, key: [user, route], limits: [{ requests: 10, per: 1m, burst: 15 }, { tokens: 50000, per: 1h }, { cost_usd: 5, per: 1d }, { cost_usd: 100, per: month }], tiers: { premium: [{ requests: 200, per: 1h }], admin: unlimited }, require_identity: true, missing_identity_status: 400, on_store_error: local, shadow: true, exempt: { paths: [/health], keys: [bot] }, default_max_tokens: 512 }]",
        );
        let r = &snap.routes[0].rate_limits[0];
        assert_eq!(r.name, "full");
        assert_eq!(r.key, [KeyPart::User, KeyPart::Route]);
        assert_eq!(
            r.limits,
            [
                Window::Requests {
                    limit: 10,
                    per: Duration::from_secs(60),
                    burst: 15
                },
                Window::Tokens {
                    limit: 50_000,
                    per: Duration::from_secs(3600)
                },
                Window::Cost {
                    nanos: 5_000_000_000,
                    period: CostPeriod::Day
                },
                Window::Cost {
                    nanos: 100_000_000_000,
                    period: CostPeriod::Month
                },
            ]
        );
        assert_eq!(r.tiers[1], ("admin".to_string(), TierLimits::Unlimited));
        assert!(r.require_identity && r.shadow);
        assert_eq!(r.missing_identity_status, 400);
        assert_eq!(r.on_store_error, OnStoreError::Local);
        assert_eq!(r.default_max_tokens, 512);
        assert_eq!(r.origin, "routes[0].rate_limits[0]");
        assert!(r.reserves_tokens());
        assert_eq!(
            snap.limits.identity.tier.from,
            TierFrom::Header("x-tier".into())
        );
        assert_eq!(
            snap.limits.prices.get("gpt-4o-mini").map(|p| p.output_pico),
            Some(600_000)
        );
    }

    #[test]
    fn defaults() {
        let snap = policy(
            "",
            "[{ name: d, key: [ip], limits: [{ requests: 10, per: 1m }] }]",
        );
        let r = &snap.routes[0].rate_limits[0];
        assert_eq!(
            r.limits[0],
            Window::Requests {
                limit: 10,
                per: Duration::from_secs(60),
                burst: 10
            }
        );
        assert_eq!(
            (r.require_identity, r.shadow, r.missing_identity_status),
            (false, false, 401)
        );
        assert_eq!(r.on_store_error, OnStoreError::FailOpen);
        assert_eq!(r.default_max_tokens, 256);
        assert!(r.routes.is_none());
    }

    #[test]
    fn identity_sources_compile() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwt/rs256-public.pem");
        let top = format!(
            "identity:
  user:
    - header: X-User-Id
    - jwt: {{ secret_env: JWT_SECRET }}
    - jwt: {{ header: x-token, claim: uid, public_key_file: {}, issuer: me, audience: you, leeway: 30s }}
    - api_key: {{ header: x-api-key }}
    - body: metadata.user_id
    - ip
  tier: {{ jwt_claim: tier, default: basic }}",
            dir.display()
        );
        let text = format!("version: 1\n{top}\nbackends:\n  b: {{ endpoints: [\"http://127.0.0.1:9\"] }}\nroutes:\n  - {{ name: a, match: {{ path_prefix: / }}, backend: b }}\n");
        let snap = compile_str_with_env(&text, "p.yaml", &env).unwrap_or_else(|e| panic!("{e}"));
        let id = &snap.limits.identity;
        assert_eq!(id.user.len(), 6);
        assert!(matches!(&id.user[0], UserSource::Header(h) if h == "x-user-id"));
        let UserSource::Jwt(hs) = &id.user[1] else {
            panic!()
        };
        assert_eq!(
            (hs.header.as_str(), hs.claim.as_str()),
            ("authorization", "sub")
        );
        assert_eq!(hs.algorithms, [JwtAlg::Hs256]);
        let printed = format!("{hs:?}");
        assert!(
            printed.contains("HmacKey(<secret>)")
                && !printed.contains("0123456789abcdef0123456789abcdef"),
            "the secret is never printed: {printed}"
        );
        let UserSource::Jwt(rs) = &id.user[2] else {
            panic!()
        };
        assert_eq!(rs.algorithms, [JwtAlg::Rs256]);
        assert_eq!(rs.leeway, Duration::from_secs(30));
        assert!(rs.rs256_key.is_some());
        assert!(id.needs_body_doc());
        assert_eq!(id.tier.from, TierFrom::JwtClaim("tier".into()));
        assert_eq!(id.tier.default, "basic");
    }

    #[test]
    fn every_problem_is_reported_with_its_position() {
        let errs = errors(
            "identity: { user: [{ jwt: { secret_env: NOPE, algorithms: [HS512] } }, { head: x }, bogus] }",
            "[{ name: Bad Name, key: [usr], limits: [] }, { name: x, key: [global, ip], limits: [{ requests: 0, per: 1m }, { tokens: 5, per: 1m, burst: 3 }, { cost_usd: 5, per: 2d }, { requests: 1, tokens: 1, per: 1s }] }, { name: y, key: [ip], limits: [{ requests: 10, per: 1m }], on_store_error: fail, missing_identity_status: 403, routes: [chat] }]",
        );
        let joined = errs.join("\n");
        for expected in [
            "identity.user[0].jwt.secret_env: environment variable `NOPE` is not set or is empty",
            "identity.user[0].jwt.algorithms[0]: must be one of `HS256`, `RS256` (was `HS512`)",
            "identity.user[1].head: unknown field `head`",
            "identity.user[2]: expected `ip` or a mapping",
            "routes[0].rate_limits[0].name: rule name `Bad Name` must be",
            "routes[0].rate_limits[0].key[0]: must be one of `global`, `ip`, `user`, `tier`, `route`, `model`, `header:<name>` (was `usr`); did you mean `user`?",
            "routes[0].rate_limits[0].limits: must list at least one window",
            "routes[0].rate_limits[1].key: `global` counts every request in one bucket",
            "routes[0].rate_limits[1].limits[0].requests: must be 1..=1000000000 (was 0)",
            "routes[0].rate_limits[1].limits[1].burst: `burst` applies to `requests` windows only",
            "routes[0].rate_limits[1].limits[2].per: a cost budget resets at a UTC calendar boundary",
            "routes[0].rate_limits[1].limits[3]: a window sets exactly one of `requests`, `tokens`, `cost_usd`",
            "routes[0].rate_limits[1].limits[2].cost_usd: a `cost_usd` budget needs a `prices` table",
            "routes[0].rate_limits[2].on_store_error: must be one of `fail_open`, `fail_closed`, `local` (was `fail`)",
            "routes[0].rate_limits[2].missing_identity_status: must be 401 or 400 (was 403)",
            "routes[0].rate_limits[2].routes: `routes` is for top-level rules",
        ] {
            assert!(joined.contains(expected), "missing: {expected}\n---\n{joined}");
        }
        assert!(errs.iter().all(|e| e.starts_with("p.yaml:")), "{joined}");
    }

    #[test]
    fn cross_section_checks() {
        let errs = errors(
            "rate_limits:\n  - { name: dup, key: [user], limits: [{ requests: 1, per: 1m }], routes: [chta], tiers: { gold: unlimited }, require_identity: true }",
            "[{ name: dup, key: [ip], limits: [{ requests: 1, per: 1m }] }]",
        );
        let joined = errs.join("\n");
        for expected in [
            "rate_limits[0].key[0]: the key uses `user`, but `identity.user` lists no sources",
            "rate_limits[0].routes[0]: unknown route `chta`; defined routes: `chat`; did you mean `chat`?",
            "rate_limits[0].tiers: tiers need `identity.tier`",
            "rate_limits[0].require_identity: `require_identity: true` needs `identity.user` sources",
            "routes[0].rate_limits[0].name: duplicate rate-limit rule name `dup` (also rate_limits[0])",
        ] {
            assert!(joined.contains(expected), "missing: {expected}\n---\n{joined}");
        }
    }

    #[test]
    fn ranges_beyond_the_exact_counter_are_refused() {
        let errs = errors(
            "",
            "[{ name: t, key: [ip], limits: [{ tokens: 1000000000000, per: 30d }] }]",
        );
        assert!(
            errs[0].contains("is too large for `per: 30d`: the counter is exact up to"),
            "{errs:?}"
        );
        let errs = errors("", "[{ name: t, key: [ip], limits: [{ requests: 1, per: 500ms }, { requests: 1, per: 1.5s }, { requests: 1, per: 90000.5s }] }]");
        let joined = errs.join("\n");
        assert!(
            joined.contains("limits[0].per: must be 1s..=366d (was 500ms)"),
            "{joined}"
        );
        assert!(
            !joined.contains("limits[1]"),
            "1.5s is a whole number of ms: {joined}"
        );
        assert!(
            joined.contains("limits[2].per: must be a whole number of seconds"),
            "{joined}"
        );
        let errs = errors("", "[{ name: t, key: [ip], limits: [{ requests: 1, per: 1m }, { requests: 5, per: 60s }] }]");
        assert!(
            errs[0].contains("a second `requests` window of the same length as `1/1m`"),
            "{errs:?}"
        );
    }

    #[test]
    fn prices_are_validated() {
        let errs = errors("prices:\n  a: { input: -1, output: 0.6 }\n  b: { input: 0.1234567, output: 1 }\n  \"c*d\": { input: 1, output: 1 }\n  e: { input: 1 }", "[]");
        let joined = errs.join("\n");
        assert!(
            joined.contains("prices.a.input: expected a price in USD per 1M tokens"),
            "{joined}"
        );
        assert!(joined.contains("at most 6 decimal places"), "{joined}");
        assert!(
            joined.contains("`c*d` is not a model name or a `prefix*` pattern"),
            "{joined}"
        );
        assert!(
            joined.contains("prices.e.output: missing required field `output`"),
            "{joined}"
        );
    }

    #[test]
    fn jwt_sources_need_a_key_and_matching_algorithms() {
        let errs = errors("identity: { user: [{ jwt: { claim: sub } }, { jwt: { secret_env: JWT_SECRET, algorithms: [RS256] } }], tier: { jwt_claim: t, header: x } }", "[]");
        let joined = errs.join("\n");
        assert!(
            joined.contains(
                "identity.user[0].jwt: set `secret_env` (HS256) or `public_key_file` (RS256)"
            ),
            "{joined}"
        );
        assert!(
            joined.contains("identity.user[1].jwt.algorithms: `RS256` needs `public_key_file`"),
            "{joined}"
        );
        assert!(
            joined.contains("identity.tier.jwt_claim: set `header` or `jwt_claim`, not both"),
            "{joined}"
        );
    }
}

/// The same behaviour through Redis (a private `redis-server` per test).
mod redis {
    use super::*;
    use crate::store::testutil::RedisServer;
    use crate::store::RedisStore;
    use std::time::{Duration, Instant};

    fn limiter(server: &RedisServer, client_clock: bool) -> Limiter {
        let cfg = server.config(Duration::from_millis(200));
        let store = if client_clock {
            RedisStore::with_client_clock(&cfg)
        } else {
            RedisStore::new(&cfg)
        };
        Limiter::with_redis(store.unwrap(), cfg.expected_replicas)
    }

    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// A deterministic mix of requests, clock steps and reconciliations,
    /// run against both stores: every decision must be identical.
    #[tokio::test]
    async fn redis_and_memory_decide_identically() {
        let server = RedisServer::start();
        let snap = policy(
            "",
            "[{ name: mix, key: [user], limits: [{ requests: 5, per: 10s, burst: 7 }, { requests: 20, per: 1m }, { tokens: 3000, per: 1m }, { cost_usd: 0.02, per: 1d }] }, { name: g, key: [global], limits: [{ requests: 30, per: 2h }] }]",
        );
        let memory = Limiter::in_memory();
        let redis = limiter(&server, true);
        let mut now = (T0 / DAY + 1) * DAY - 45_000; // 45 s before midnight UTC
        let mut seed: u64 = 42;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        };
        let mut seen: Vec<Option<Reason>> = Vec::new();
        for step in 0..120 {
            now += next() % 2_500;
            let user = format!("u{}", next() % 2);
            let model = if next() % 3 == 0 {
                "big"
            } else {
                "gpt-4o-mini"
            };
            let r = with_llm(
                req(Some(&user)),
                model,
                Some(next() % 600),
                (next() % 2000) as usize,
            );
            let a = check(&memory, &snap, &r, now).await;
            let b = check(&redis, &snap, &r, now).await;
            assert!(!b.fallback, "step {step}: {:?}", b.store_error);
            assert_eq!(
                (a.allowed, a.reason, a.retry_after_secs, &a.headers),
                (b.allowed, b.reason, b.retry_after_secs, &b.headers),
                "step {step} at {now}"
            );
            if !seen.contains(&a.reason) {
                seen.push(a.reason);
            }
            if let (Some(ra), Some(rb)) = (a.reservation, b.reservation) {
                let usage = Usage {
                    input_tokens: next() % 400,
                    output_tokens: next() % 700,
                };
                memory.reconcile(ra, usage, now + 100).await.unwrap();
                redis.reconcile(rb, usage, now + 100).await.unwrap();
            }
        }
        // The scenario exercised every kind of decision.
        for reason in [
            None,
            Some(Reason::RateLimited),
            Some(Reason::TokensExceeded),
            Some(Reason::BudgetExceeded),
        ] {
            assert!(
                seen.contains(&reason),
                "{reason:?} never happened: {seen:?}"
            );
        }
        for rule in snap.limits.rules_for(0) {
            for key in ["u0", "u1", "global"] {
                assert_eq!(
                    memory.usage(rule, key, None, now).await.unwrap(),
                    redis.usage(rule, key, None, now).await.unwrap(),
                    "{} {key}",
                    rule.name
                );
            }
        }
        let spend = &snap.limits.rules_for(0)[0];
        assert_eq!(
            memory.top(spend, 5, now).await.unwrap(),
            redis.top(spend, 5, now).await.unwrap()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn exact_counts_under_200_concurrent_decisions() {
        let server = RedisServer::start();
        let snap = policy(
            "",
            "[{ name: c, key: [user], limits: [{ requests: 50, per: 1h }] }]",
        );
        let l = Arc::new(limiter(&server, false));
        assert_eq!(concurrently(&l, &snap, 1, 200).await, 50);
    }

    async fn concurrently(l: &Arc<Limiter>, snap: &Arc<Snapshot>, users: usize, n: usize) -> usize {
        let mut tasks = Vec::new();
        for i in 0..n {
            let (l, snap) = (l.clone(), snap.clone());
            tasks.push(tokio::spawn(async move {
                let user = format!("u{}", i % users);
                let d = check(&l, &snap, &req(Some(&user)), now_ms()).await;
                assert!(!d.fallback, "{:?}", d.store_error);
                d.allowed
            }));
        }
        let mut allowed = 0;
        for t in tasks {
            allowed += usize::from(t.await.unwrap());
        }
        allowed
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_windows_of_a_rule_stay_all_or_nothing_under_concurrency() {
        let server = RedisServer::start();
        let snap = policy("", "[{ name: w, key: [user], limits: [{ requests: 100, per: 1h }, { requests: 15, per: 1d }] }]");
        let l = Arc::new(limiter(&server, false));
        assert_eq!(concurrently(&l, &snap, 1, 200).await, 15);
        // The hour window was charged exactly for the admitted requests.
        assert_eq!(used(&l, &snap, 0, "u0", now_ms()).await, [15, 15]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_refusal_by_one_rule_is_refunded_on_the_others_under_concurrency() {
        let server = RedisServer::start();
        let snap = policy(
            "",
            "[{ name: per-user, key: [user], limits: [{ requests: 100, per: 1h }] }, { name: global, key: [global], limits: [{ requests: 40, per: 1h }] }]",
        );
        let l = Arc::new(limiter(&server, false));
        assert_eq!(
            concurrently(&l, &snap, 4, 200).await,
            40,
            "the global limit"
        );
        // Every per-user charge of a refused request was refunded.
        let mut total = 0;
        for u in 0..4 {
            total += used(&l, &snap, 0, &format!("u{u}"), now_ms()).await[0];
        }
        assert_eq!(total, 40);
        assert_eq!(used(&l, &snap, 1, "global", now_ms()).await, [40]);
    }

    #[tokio::test]
    async fn a_killed_redis_fails_fast_by_mode_and_is_used_again_after_restart() {
        let mut server = RedisServer::start();
        let snap = policy(
            "",
            "[{ name: open, key: [user], limits: [{ requests: 1000, per: 1h }], on_store_error: fail_open }, { name: local, key: [user], limits: [{ requests: 10, per: 1h }], on_store_error: local }]",
        );
        let closed = policy("", "[{ name: closed, key: [user], limits: [{ requests: 1000, per: 1h }], on_store_error: fail_closed }]");
        let l = limiter(&server, false);
        let r = req(Some("alice"));
        assert!(!check(&l, &snap, &r, now_ms()).await.fallback);
        assert_eq!(used(&l, &snap, 1, "alice", now_ms()).await, [1]);

        server.kill();
        let started = Instant::now();
        let d = check(&l, &snap, &r, now_ms()).await;
        let took = started.elapsed();
        assert!(d.fallback && d.store_error.is_some());
        // No hang: bounded by the 200 ms store timeout (plus scheduling).
        assert!(took < Duration::from_secs(1), "took {took:?}");
        let modes: Vec<_> = d
            .outcomes
            .iter()
            .map(|o| (o.outcome.label(), o.fallback))
            .collect();
        assert_eq!(
            modes,
            [
                ("failed_open", Some(OnStoreError::FailOpen)),
                ("allowed", Some(OnStoreError::Local))
            ]
        );
        // `local`: 10 ÷ expected_replicas (2) = 5 per replica, from an empty
        // local counter (the request above was the first).
        assert_eq!(burst(&l, &snap, &r, 20, now_ms()).await, 4);
        // A decision by `local` rules alone still reports the store's error
        // (for the log and metrics), and its headers give the limit in force
        // on this replica, consistent with the remaining count.
        let local_only = policy("", "[{ name: local, key: [user], limits: [{ requests: 10, per: 1h }], on_store_error: local }]");
        let d = check(&l, &local_only, &req(Some("bob")), now_ms()).await;
        assert!(
            d.allowed && d.fallback && d.store_error.is_some(),
            "{:?}",
            d.store_error
        );
        let h = d.headers.expect("rate-limit headers");
        assert_eq!((h.limit, h.remaining), (5, 4));
        assert!(h.policy().contains("q=5;"), "{}", h.policy());
        let d = check(&l, &closed, &r, now_ms()).await;
        assert_eq!(
            (d.allowed, d.reason, d.status),
            (false, Some(Reason::LimiterUnavailable), 503)
        );
        assert_eq!(d.retry_after_secs, Some(1));

        server.restart();
        // The same client reconnects by itself.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let d = check(&l, &closed, &r, now_ms()).await;
            if d.allowed && !d.fallback {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "redis was not used again: {:?}",
                d.store_error
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A fresh server: the counters start again in Redis.
        assert!(!check(&l, &snap, &r, now_ms()).await.fallback);
    }

    #[tokio::test]
    async fn an_unreachable_redis_at_start_is_an_error_not_a_hang() {
        let mut server = RedisServer::start();
        server.kill();
        let snap = policy("", "[{ name: closed, key: [user], limits: [{ requests: 10, per: 1h }], on_store_error: fail_closed }]");
        let l = limiter(&server, false);
        let started = Instant::now();
        let d = check(&l, &snap, &req(Some("a")), now_ms()).await;
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(d.reason, Some(Reason::LimiterUnavailable));
        assert!(matches!(
            d.store_error,
            Some(StoreError::Timeout(_)) | Some(StoreError::Unavailable(_))
        ));
        server.restart();
        let deadline = Instant::now() + Duration::from_secs(15);
        while !check(&l, &snap, &req(Some("a")), now_ms()).await.allowed {
            assert!(Instant::now() < deadline, "never connected");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_flushed_script_is_reloaded() {
        let server = RedisServer::start();
        let snap = policy(
            "",
            "[{ name: r, key: [user], limits: [{ requests: 3, per: 1h }] }]",
        );
        let l = limiter(&server, false);
        let r = req(Some("alice"));
        assert!(check(&l, &snap, &r, now_ms()).await.allowed);
        let client = ::redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = ::redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        let d = check(&l, &snap, &r, now_ms()).await;
        assert!(d.allowed && !d.fallback, "{:?}", d.store_error);
        // The counter lives under the pinned key format.
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg("fwtest:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(keys, ["fwtest:v1:rl:{r}:alice"]);
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(&keys[0])
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= 2 * 1_200_000 + 1_000, "ttl {ttl}");
    }

    #[tokio::test]
    async fn cost_budgets_and_spend_ranking_through_redis() {
        let server = RedisServer::start();
        let snap = policy(
            "",
            "[{ name: spend, key: [user], limits: [{ cost_usd: 0.05, per: 1d }] }]",
        );
        let l = limiter(&server, true);
        let midnight = (T0 / DAY + 1) * DAY;
        for (user, out) in [("a", 1000), ("b", 300), ("c", 10)] {
            let r = with_llm(req(Some(user)), "big", Some(1000), 0);
            let d = check(&l, &snap, &r, midnight - 5_000).await;
            l.reconcile(
                d.reservation.unwrap(),
                Usage {
                    input_tokens: 0,
                    output_tokens: out,
                },
                midnight - 4_000,
            )
            .await
            .unwrap();
        }
        let top = l
            .top(&snap.limits.rules_for(0)[0], 2, midnight - 3_000)
            .await
            .unwrap();
        let ranked: Vec<(&str, u64)> = top.iter().map(|t| (t.key.as_str(), t.used)).collect();
        assert_eq!(ranked, [("a", 30_000_000), ("b", 9_000_000)]);
        // After midnight the period and its ranking are new.
        assert!(l
            .top(&snap.limits.rules_for(0)[0], 2, midnight)
            .await
            .unwrap()
            .is_empty());
    }
}
