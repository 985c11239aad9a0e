//! Decoding of the resilience sections: `backends.*.circuit_breaker`,
//! `routes[].retry`, `routes[].timeouts`, `routes[].fallback` and
//! `routes[].fallback_on`.
//!
//! Each function reads one section through the collecting reader in
//! `decode.rs`, reports every problem it finds (with the allowed range and
//! the value given), and returns the section with defaults standing in for
//! invalid values, so the compiler can go on. The compiled types live in
//! `crate::policy::{retry, breaker}` (retry and breaker policies) and in
//! `model.rs` (timeouts and fallback targets); the defaults are the
//! constants there, and `docs/policy.md` documents them.

use std::ops::RangeInclusive;
use std::time::Duration;

use super::decode::{hint, list_names, Value};
use super::model::{FallbackOn, FallbackTarget, RouteTimeouts};
use super::units::format_duration;
use super::yaml::{Node, NodeKind, ScalarStyle};
use crate::policy::breaker::{self, BreakerConfig, SlowCall};
use crate::policy::retry::{self, Backoff, BudgetConfig, Jitter, RetryOn, RetryPolicy};

const BREAKER_FIELDS: &[&str] = &[
    "window",
    "failure_rate",
    "min_requests",
    "failure_count",
    "consecutive_failures",
    "slow_call",
    "open_for",
    "open_for_max",
    "half_open_probes",
    "failure_statuses",
];
const SLOW_CALL_FIELDS: &[&str] = &["threshold", "rate"];
const RETRY_FIELDS: &[&str] = &[
    "attempts",
    "on",
    "backoff",
    "rate_limited_multiplier",
    "max_retry_after",
    "budget",
    "replay",
];
const BACKOFF_FIELDS: &[&str] = &["base", "factor", "max", "jitter"];
const BUDGET_FIELDS: &[&str] = &["ratio", "min_per_second"];
const ROUTE_TIMEOUT_FIELDS: &[&str] = &[
    "connect",
    "response_headers",
    "total",
    "first_token",
    "idle",
    "hold_for_first_token",
];
const FALLBACK_FIELDS: &[&str] = &["backend", "model", "respond", "stale_cache"];
const RESPOND_FIELDS: &[&str] = &["status", "body"];

const RETRY_WORDS: &[&str] = &["connect_error", "timeout", "reset"];
const FALLBACK_ON_WORDS: &[&str] = &["circuit_open", "retries_exhausted"];

const MS: Duration = Duration::from_millis(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// Status of a `respond` fallback without `status`.
pub const DEFAULT_RESPOND_STATUS: u16 = 503;

// ---------------------------------------------------------------- circuit breaker

/// `backends.<name>.circuit_breaker`.
pub fn circuit_breaker(v: &Value<'_>) -> BreakerConfig {
    let mut c = BreakerConfig::default();
    let Some(mut m) = v.map(BREAKER_FIELDS) else {
        return c;
    };
    c.window = m
        .duration_in("window", Duration::from_millis(100)..=HOUR)
        .unwrap_or(breaker::DEFAULT_WINDOW);
    c.failure_rate = m
        .get("failure_rate")
        .and_then(|x| ratio_in(&x, 0.01..=1.0))
        .unwrap_or(breaker::DEFAULT_FAILURE_RATE);
    c.min_requests = m
        .u64_in("min_requests", 1..=1_000_000)
        .map_or(breaker::DEFAULT_MIN_REQUESTS, to_u32);
    c.failure_count = m.u64_in("failure_count", 1..=1_000_000).map(to_u32);
    c.consecutive_failures = m.u64_in("consecutive_failures", 1..=1_000_000).map(to_u32);
    c.slow_call = m.get("slow_call").and_then(|x| slow_call(&x));
    c.open_for = m
        .duration_in("open_for", MS..=DAY)
        .unwrap_or(breaker::DEFAULT_OPEN_FOR);
    c.open_for_max = match m.get("open_for_max") {
        Some(x) => match x.duration_in(MS..=DAY) {
            Some(max) if max < c.open_for => {
                x.error(format!(
                    "must be at least open_for ({}) (was {})",
                    format_duration(c.open_for),
                    format_duration(max)
                ));
                c.open_for
            }
            Some(max) => max,
            None => breaker::DEFAULT_OPEN_FOR_MAX.max(c.open_for),
        },
        // A long `open_for` raises the default cap with it.
        None => breaker::DEFAULT_OPEN_FOR_MAX.max(c.open_for),
    };
    c.half_open_probes = m
        .u64_in(
            "half_open_probes",
            1..=u64::from(breaker::MAX_HALF_OPEN_PROBES),
        )
        .map_or(breaker::DEFAULT_HALF_OPEN_PROBES, to_u32);
    if let Some(list) = m.get("failure_statuses") {
        c.failure_statuses = status_list(&list, 400..=599);
    }
    c
}

fn slow_call(v: &Value<'_>) -> Option<SlowCall> {
    let mut m = v.map(SLOW_CALL_FIELDS)?;
    let threshold = m.require("threshold").and_then(|x| x.duration_in(MS..=DAY));
    let rate = m.require("rate").and_then(|x| ratio_in(&x, 0.01..=1.0));
    Some(SlowCall {
        threshold: threshold?,
        rate: rate?,
    })
}

// ---------------------------------------------------------------- retry

/// `routes[].retry`. Without the section a route makes a single attempt
/// ([`RetryPolicy::single_attempt`]); with it, `attempts` defaults to 3.
pub fn retry(v: &Value<'_>) -> RetryPolicy {
    let mut p = RetryPolicy::default();
    let Some(mut m) = v.map(RETRY_FIELDS) else {
        return p;
    };
    p.attempts = m
        .u64_in("attempts", 1..=u64::from(retry::MAX_ATTEMPTS))
        .map_or(retry::DEFAULT_ATTEMPTS, to_u32);
    if let Some(on) = m.get("on") {
        p.on = retry_on(&on);
    }
    if let Some(b) = m.get("backoff") {
        p.backoff = backoff(&b);
    }
    p.rate_limited_multiplier = m
        .get("rate_limited_multiplier")
        .and_then(|x| decimal_in(&x, 1.0..=10.0))
        .unwrap_or(1.0);
    p.max_retry_after = m
        .duration_in("max_retry_after", Duration::ZERO..=DAY)
        .unwrap_or(retry::DEFAULT_MAX_RETRY_AFTER);
    if let Some(b) = m.get("budget") {
        p.budget = budget(&b);
    }
    p.replay = m.bool("replay").unwrap_or(true);
    p
}

fn retry_on(v: &Value<'_>) -> RetryOn {
    let mut on = RetryOn {
        connect_error: false,
        timeout: false,
        reset: false,
        statuses: Vec::new(),
    };
    let Some(items) = v.list_or_one() else {
        return RetryOn::default();
    };
    if items.is_empty() {
        v.error("must list at least one condition (to turn retries off, set `attempts: 1`)");
        return RetryOn::default();
    }
    let mut seen: Vec<String> = Vec::new();
    for item in items {
        let Some(text) = item.str() else { continue };
        if seen.iter().any(|s| s == text) {
            item.error(format!("`{text}` is listed twice"));
            continue;
        }
        seen.push(text.to_string());
        if text.bytes().all(|b| b.is_ascii_digit()) {
            if let Some(status) = item.u64_in(400..=599) {
                on.statuses.push(status as u16);
            }
            continue;
        }
        match text {
            "connect_error" => on.connect_error = true,
            "timeout" => on.timeout = true,
            "reset" => on.reset = true,
            _ => item.error(format!(
                "must be one of {} or a status code 400..=599 (was `{text}`){}",
                list_names(RETRY_WORDS),
                hint(text, RETRY_WORDS)
            )),
        }
    }
    on
}

fn backoff(v: &Value<'_>) -> Backoff {
    let mut b = RetryPolicy::default().backoff;
    let Some(mut m) = v.map(BACKOFF_FIELDS) else {
        return b;
    };
    b.base = m
        .duration_in("base", MS..=HOUR)
        .unwrap_or(retry::DEFAULT_BASE);
    b.factor = m
        .get("factor")
        .and_then(|x| decimal_in(&x, 1.0..=10.0))
        .unwrap_or(retry::DEFAULT_FACTOR);
    b.max = match m.get("max") {
        Some(x) => match x.duration_in(MS..=DAY) {
            Some(max) if max < b.base => {
                x.error(format!(
                    "must be at least base ({}) (was {})",
                    format_duration(b.base),
                    format_duration(max)
                ));
                b.base
            }
            Some(max) => max,
            None => retry::DEFAULT_MAX.max(b.base),
        },
        None => retry::DEFAULT_MAX.max(b.base),
    };
    if let Some(x) = m.get("jitter") {
        b.jitter = x
            .parse_with("`full`, `none` or a percentage such as 10%", |s| match s {
                "full" => Ok(Jitter::Full),
                "none" => Ok(Jitter::None),
                _ if s.ends_with('%') => super::units::parse_ratio(s).map(Jitter::Up),
                _ => Err(format!(
                    "must be `full`, `none` or a percentage such as 10% (was `{s}`){}",
                    hint(s, &["full", "none"])
                )),
            })
            .unwrap_or(Jitter::Full);
    }
    b
}

fn budget(v: &Value<'_>) -> BudgetConfig {
    let mut b = BudgetConfig::default();
    let Some(mut m) = v.map(BUDGET_FIELDS) else {
        return b;
    };
    b.ratio = m
        .get("ratio")
        .and_then(|x| x.ratio())
        .unwrap_or(BudgetConfig::default().ratio);
    b.min_per_second = m
        .u64_in("min_per_second", 0..=1_000_000)
        .map_or(BudgetConfig::default().min_per_second, to_u32);
    if b.ratio == 0.0 && b.min_per_second == 0 {
        v.error("ratio 0% with min_per_second 0 allows no retry at all; to turn retries off, set `attempts: 1`");
    }
    b
}

// ---------------------------------------------------------------- timeouts

/// `routes[].timeouts`.
pub fn route_timeouts(v: &Value<'_>) -> RouteTimeouts {
    let mut t = RouteTimeouts::default();
    let Some(mut m) = v.map(ROUTE_TIMEOUT_FIELDS) else {
        return t;
    };
    t.connect = m.duration_in("connect", MS..=10 * MINUTE);
    let headers_value = m.get("response_headers");
    t.response_headers = headers_value.as_ref().and_then(|x| x.duration_in(MS..=DAY));
    t.total = m.duration_in("total", MS..=DAY);
    let first_value = m.get("first_token");
    t.first_token = first_value.as_ref().and_then(|x| x.duration_in(MS..=DAY));
    t.idle = m.duration_in("idle", MS..=DAY);
    let hold_value = m.get("hold_for_first_token");
    t.hold_for_first_token = match (&hold_value, t.first_token) {
        (Some(x), first) => {
            let hold = x.bool().unwrap_or(false);
            if hold && first.is_none() && first_value.is_none() {
                x.error("needs `first_token`: the hold ends at the first token or when first_token runs out");
            }
            hold
        }
        (None, first) => first.is_some(),
    };
    if let Some(total) = t.total {
        for (value, d) in [
            (&headers_value, t.response_headers),
            (&first_value, t.first_token),
        ] {
            if let (Some(x), Some(d)) = (value, d) {
                if d > total {
                    x.error(format!(
                        "must be at most total ({}), or it could never fire (was {})",
                        format_duration(total),
                        format_duration(d)
                    ));
                }
            }
        }
    }
    t
}

// ---------------------------------------------------------------- fallback

/// `routes[].fallback`: the targets tried in order once the primary is
/// given up on. `route_backend` is the name of the route's own backend.
pub fn fallback(
    v: &Value<'_>,
    route_backend: &str,
    backend_names: &[String],
    stale_ok: bool,
) -> Vec<FallbackTarget> {
    let Some(items) = v.list() else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    let mut seen: Vec<String> = Vec::new();
    let mut respond_at: Option<String> = None;
    for item in items {
        if let Some(at) = &respond_at {
            item.error(format!(
                "comes after the static `respond` at {at}, which always answers, so it would never be tried; `respond` must be last"
            ));
        }
        let Some(mut m) = item.map(FALLBACK_FIELDS) else {
            continue;
        };
        let model = m.get("model");
        let stale = m.get("stale_cache");
        if stale.is_some() && (m.has("backend") || m.has("respond")) {
            item.error("set one target per entry: `backend`, `stale_cache` or `respond`");
            continue;
        }
        if let Some(s) = stale {
            if let Some(x) = model {
                x.error("`model` applies only to a `backend` target");
            }
            match s.bool() {
                Some(true) if !stale_ok => s.error(
                    "needs `cache.stale_if_error` on this route (how old a stale answer may be)",
                ),
                Some(true) => {
                    if out.contains(&FallbackTarget::StaleCache) {
                        s.error("`stale_cache` is listed twice");
                    } else {
                        out.push(FallbackTarget::StaleCache);
                    }
                }
                Some(false) => s.error("`stale_cache: false` is not a target; remove the entry"),
                None => {}
            }
            continue;
        }
        match (m.get("backend"), m.get("respond")) {
            (Some(b), None) => {
                let (index, name) = super::compile::backend_ref(&b, backend_names);
                if name == route_backend && !name.is_empty() {
                    b.error(format!(
                        "`{name}` is the route's own backend; a fallback must be another backend"
                    ));
                } else if seen.contains(&name) {
                    b.error(format!("backend `{name}` is listed twice"));
                } else {
                    seen.push(name.clone());
                }
                let model = model.and_then(|x| x.non_empty_string());
                out.push(FallbackTarget::Backend {
                    backend: index,
                    name,
                    model,
                });
            }
            (None, Some(r)) => {
                if let Some(x) = model {
                    x.error("`model` applies only to a `backend` target");
                }
                respond_at = Some(item.path().to_string());
                if let Some(target) = respond(&r) {
                    out.push(target);
                }
            }
            (Some(_), Some(r)) => {
                r.error("set one target per entry: `backend`, `stale_cache` or `respond`");
            }
            (None, None) => {
                // A misspelled target is reported as an unknown field.
                if !m.misspelled(&["backend", "respond", "stale_cache"]) {
                    item.error(
                        "set a target: `backend` (another backend, optionally with `model`), `stale_cache: true` or `respond` (a static answer)",
                    );
                }
            }
        }
    }
    out
}

fn respond(v: &Value<'_>) -> Option<FallbackTarget> {
    let mut m = v.map(RESPOND_FIELDS)?;
    let status = m
        .u64_in("status", 200..=599)
        .map_or(DEFAULT_RESPOND_STATUS, |s| s as u16);
    let body = match m.get("body") {
        Some(b) => to_json(b.node()),
        None => serde_json::json!({
            "error": {
                "message": "the service is temporarily unavailable",
                "type": "unavailable",
                "code": "fallback",
            }
        }),
    };
    Some(FallbackTarget::Respond { status, body })
}

/// `routes[].fallback_on`: when the fallback targets are used. `fallback`
/// is the route's `fallback` value, if any.
pub fn fallback_on(v: Option<Value<'_>>, fallback: Option<&Value<'_>>) -> FallbackOn {
    let Some(v) = v else {
        return FallbackOn::default();
    };
    let has_targets = fallback.is_some_and(|f| match &f.node().kind {
        NodeKind::Seq(items) => !items.is_empty(),
        _ => true,
    });
    if !has_targets {
        v.error("has no effect without `fallback` targets; add `fallback` or remove `fallback_on`");
    }
    let Some(items) = v.list_or_one() else {
        return FallbackOn::default();
    };
    if items.is_empty() {
        v.error(format!(
            "must list at least one of {} (to turn fallback off, remove `fallback`)",
            list_names(FALLBACK_ON_WORDS)
        ));
        return FallbackOn::default();
    }
    let mut on = FallbackOn {
        circuit_open: false,
        retries_exhausted: false,
    };
    for item in items {
        let Some(word) = item.one_of(&[("circuit_open", 0), ("retries_exhausted", 1)]) else {
            continue;
        };
        let flag = if word == 0 {
            &mut on.circuit_open
        } else {
            &mut on.retries_exhausted
        };
        if *flag {
            item.error(format!("`{}` is listed twice", FALLBACK_ON_WORDS[word]));
        }
        *flag = true;
    }
    on
}

// ---------------------------------------------------------------- helpers

fn to_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A percentage within `range` (as fractions).
fn ratio_in(v: &Value<'_>, range: RangeInclusive<f64>) -> Option<f64> {
    let r = v.ratio()?;
    if range.contains(&r) {
        return Some(r);
    }
    let was = v.node().as_scalar().map(|(t, _)| t).unwrap_or_default();
    v.error(format!(
        "must be {}%..={}% (was {was})",
        range.start() * 100.0,
        range.end() * 100.0
    ));
    None
}

/// A plain (unquoted) decimal number within `range`, such as `2` or `1.5`.
pub(super) fn decimal_in(v: &Value<'_>, range: RangeInclusive<f64>) -> Option<f64> {
    const FORMS: &str = "a number such as 2 or 1.5";
    match v.node().as_scalar() {
        Some((_, ScalarStyle::Plain)) => {}
        Some(_) => {
            v.type_error(&format!("{FORMS} (write it without quotes)"));
            return None;
        }
        None => {
            v.type_error(FORMS);
            return None;
        }
    }
    let n = v.parse_with(FORMS, |s| {
        let valid = !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            && !s.starts_with('.')
            && !s.ends_with('.');
        valid
            .then(|| s.parse::<f64>().ok())
            .flatten()
            .ok_or_else(|| format!("expected {FORMS}, got `{s}`"))
    })?;
    if range.contains(&n) {
        return Some(n);
    }
    v.error(format!(
        "must be {}..={} (was {n})",
        range.start(),
        range.end()
    ));
    None
}

/// A list of distinct HTTP statuses within `range`.
fn status_list(v: &Value<'_>, range: RangeInclusive<u64>) -> Vec<u16> {
    let Some(items) = v.list_or_one() else {
        return Vec::new();
    };
    if items.is_empty() {
        v.error("must list at least one status");
    }
    let mut out: Vec<u16> = Vec::new();
    for item in items {
        let Some(status) = item.u64_in(range.clone()) else {
            continue;
        };
        let status = status as u16;
        if out.contains(&status) {
            item.error(format!("{status} is listed twice"));
            continue;
        }
        out.push(status);
    }
    out
}

/// A YAML value as JSON: plain scalars that read as booleans or numbers
/// become them, everything else a string.
fn to_json(node: &Node) -> serde_json::Value {
    use serde_json::Value as J;
    match &node.kind {
        NodeKind::Null => J::Null,
        NodeKind::Seq(items) => J::Array(items.iter().map(to_json).collect()),
        NodeKind::Map(entries) => J::Object(
            entries
                .iter()
                .map(|(k, v)| (k.name.clone(), to_json(v)))
                .collect(),
        ),
        NodeKind::Scalar(text, ScalarStyle::Plain) => match text.as_str() {
            "true" | "True" | "TRUE" => J::Bool(true),
            "false" | "False" | "FALSE" => J::Bool(false),
            _ => {
                if let Ok(n) = text.parse::<i64>() {
                    J::from(n)
                } else if let Some(n) = text
                    .parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite())
                    .and_then(serde_json::Number::from_f64)
                {
                    J::Number(n)
                } else {
                    J::String(text.clone())
                }
            }
        },
        NodeKind::Scalar(text, _) => J::String(text.clone()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::{compile_str_with_env, ConfigErrors, FallbackOn, FallbackTarget, Snapshot};
    use crate::policy::breaker::SlowCall;
    use crate::policy::retry::{Jitter, RetryPolicy};

    const HEAD: &str = "\
version: 1
backends:
  openai:
    endpoints: [\"https://api.openai.com\"]
  local:
    endpoints: [\"http://127.0.0.1:8000\"]
  small:
    endpoints: [\"http://127.0.0.1:8001\"]
routes:
  - name: chat
    match: { path_prefix: / }
    backend: openai
";

    fn compile(text: &str) -> Result<Snapshot, ConfigErrors> {
        compile_str_with_env(text, "p.yaml", &|_| None)
    }

    /// `HEAD` plus `extra` (indented as fields of the route, or of the
    /// `openai` backend when it starts with `backend:`).
    fn with(extra: &str) -> String {
        match extra.strip_prefix("backend:\n") {
            Some(rest) => HEAD.replace(
                "    endpoints: [\"https://api.openai.com\"]\n",
                &format!("    endpoints: [\"https://api.openai.com\"]\n{rest}"),
            ),
            None => format!("{HEAD}{extra}"),
        }
    }

    fn errors(text: &str) -> Vec<String> {
        match compile(text) {
            Ok(_) => panic!("expected errors, but the policy compiled:\n{text}"),
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    }

    const FULL: &str = "    timeouts: { connect: 1s, response_headers: 20s, total: 120s, first_token: 15s, idle: 30s }
    retry:
      attempts: 4
      on: [connect_error, timeout, reset, 429, 503]
      backoff: { base: 500ms, factor: 1.5, max: 30s, jitter: 10% }
      rate_limited_multiplier: 2
      max_retry_after: 1m
      budget: { ratio: 25%, min_per_second: 5 }
      replay: false
    fallback:
      - backend: local
        model: llama-3-8b
      - backend: small
      - respond:
          status: 200
          body: { error: { message: \"unavailable\", type: unavailable }, retry: true, after: 1.5, n: 3, none: null, tags: [a, \"1\"] }
    fallback_on: [retries_exhausted]
";

    #[test]
    fn every_resilience_field_compiles() {
        let text = with(FULL).replace(
            "    endpoints: [\"https://api.openai.com\"]\n",
            "    endpoints: [\"https://api.openai.com\"]
    circuit_breaker:
      window: 60s
      failure_rate: 40%
      min_requests: 10
      failure_count: 5
      consecutive_failures: 3
      slow_call: { threshold: 30s, rate: 80% }
      open_for: 1m
      open_for_max: 10m
      half_open_probes: 2
      failure_statuses: [500, 503]
",
        );
        let snap = compile(&text).unwrap_or_else(|e| panic!("{e}"));
        let cb = snap.backends[0].circuit_breaker.as_deref().unwrap();
        assert_eq!(cb.window, Duration::from_secs(60));
        assert_eq!(cb.failure_rate, 0.4);
        assert_eq!(cb.min_requests, 10);
        assert_eq!(cb.failure_count, Some(5));
        assert_eq!(cb.consecutive_failures, Some(3));
        assert_eq!(
            cb.slow_call,
            Some(SlowCall {
                threshold: Duration::from_secs(30),
                rate: 0.8
            })
        );
        assert_eq!(cb.open_for, Duration::from_secs(60));
        assert_eq!(cb.open_for_max, Duration::from_secs(600));
        assert_eq!(cb.half_open_probes, 2);
        assert_eq!(cb.failure_statuses, [500, 503]);
        assert!(snap.backends[1].circuit_breaker.is_none());

        let route = &snap.routes[0];
        let t = &route.timeouts;
        assert_eq!(t.connect, Some(Duration::from_secs(1)));
        assert_eq!(t.response_headers, Some(Duration::from_secs(20)));
        assert_eq!(t.total, Some(Duration::from_secs(120)));
        assert_eq!(t.first_token, Some(Duration::from_secs(15)));
        assert_eq!(t.idle, Some(Duration::from_secs(30)));
        assert!(t.hold_for_first_token);

        let r = &route.retry;
        assert_eq!(r.attempts, 4);
        assert!(r.on.connect_error && r.on.timeout && r.on.reset);
        assert_eq!(r.on.statuses, [429, 503]);
        assert_eq!(r.backoff.base, Duration::from_millis(500));
        assert_eq!(r.backoff.factor, 1.5);
        assert_eq!(r.backoff.max, Duration::from_secs(30));
        assert_eq!(r.backoff.jitter, Jitter::Up(0.1));
        assert_eq!(r.rate_limited_multiplier, 2.0);
        assert_eq!(r.max_retry_after, Duration::from_secs(60));
        assert_eq!(r.budget.ratio, 0.25);
        assert_eq!(r.budget.min_per_second, 5);
        assert!(!r.replay);

        assert_eq!(route.fallback.len(), 3);
        assert_eq!(
            route.fallback[0],
            FallbackTarget::Backend {
                backend: 1,
                name: "local".into(),
                model: Some("llama-3-8b".into())
            }
        );
        assert_eq!(
            route.fallback[1],
            FallbackTarget::Backend {
                backend: 2,
                name: "small".into(),
                model: None
            }
        );
        assert_eq!(
            route.fallback[2],
            FallbackTarget::Respond {
                status: 200,
                body: serde_json::json!({
                    "error": { "message": "unavailable", "type": "unavailable" },
                    "retry": true, "after": 1.5, "n": 3, "none": null, "tags": ["a", "1"]
                })
            }
        );
        assert_eq!(
            route.fallback_on,
            FallbackOn {
                circuit_open: false,
                retries_exhausted: true
            }
        );
    }

    #[test]
    fn defaults_when_sections_are_absent_or_empty() {
        let snap = compile(HEAD).unwrap_or_else(|e| panic!("{e}"));
        let route = &snap.routes[0];
        assert_eq!(*route.retry, RetryPolicy::single_attempt());
        assert!(!route.retry.enabled());
        assert!(route.fallback.is_empty());
        assert_eq!(route.fallback_on, FallbackOn::default());
        assert_eq!(route.timeouts.total, None);
        assert!(!route.timeouts.hold_for_first_token);
        assert!(snap.backends[0].circuit_breaker.is_none());

        let text = with("backend:\n    circuit_breaker: {}\n")
            + "    retry: {}\n    timeouts: { first_token: 10s }\n    fallback:\n      - respond: {}\n";
        let snap = compile(&text).unwrap_or_else(|e| panic!("{e}"));
        let route = &snap.routes[0];
        assert_eq!(*route.retry, RetryPolicy::default());
        assert_eq!(route.retry.attempts, 3);
        assert_eq!(route.retry.backoff.jitter, Jitter::Full);
        assert_eq!(route.retry.on.statuses, [429, 500, 502, 503, 504]);
        assert!(route.timeouts.hold_for_first_token);
        assert!(matches!(
            &route.fallback[0],
            FallbackTarget::Respond { status: 503, body } if body["error"]["type"] == "unavailable"
        ));
        let cb = snap.backends[0].circuit_breaker.as_deref().unwrap();
        assert_eq!(*cb, crate::policy::breaker::BreakerConfig::default());

        // A long open_for raises the default cap; `hold_for_first_token: false` is kept.
        let text = with("backend:\n    circuit_breaker: { open_for: 10m }\n")
            + "    timeouts: { first_token: 10s, hold_for_first_token: false }\n    retry: { backoff: { base: 20s } }\n";
        let snap = compile(&text).unwrap_or_else(|e| panic!("{e}"));
        let cb = snap.backends[0].circuit_breaker.as_deref().unwrap();
        assert_eq!(cb.open_for_max, Duration::from_secs(600));
        assert!(!snap.routes[0].timeouts.hold_for_first_token);
        assert_eq!(snap.routes[0].retry.backoff.max, Duration::from_secs(20));
    }

    #[test]
    fn the_teams_plans_are_expressible() {
        // research-citation: 3 attempts, initial 1s, max 30s, base 2, doubled
        // for rate limits, up to 10% jitter; notes assistant: 5 failures in
        // 60 s, open 30 s, one success closes it.
        let text = with("backend:\n    circuit_breaker: { window: 60s, failure_count: 5, failure_rate: 100%, open_for: 30s, half_open_probes: 1 }\n")
            + "    retry:\n      attempts: 3\n      on: [timeout, connect_error, 429, 500, 502, 503, 504]\n      backoff: { base: 1s, factor: 2, max: 30s, jitter: 10% }\n      rate_limited_multiplier: 2\n";
        compile(&text).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn retry_errors_name_the_range_and_the_value() {
        let text = with(
            "    retry:
      attempts: 0
      on: [connect_error, timeuot, 600, 429, 429, \"503\"]
      backoff: { base: 2s, factor: 0.5, max: 1s, jitter: half }
      rate_limited_multiplier: \"2\"
      max_retry_after: 2d
      budget: { ratio: 0%, min_per_second: 0 }
      replay: yes
",
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:14:17 routes[0].retry.attempts: must be 1..=10 (was 0)",
                "p.yaml:15:27 routes[0].retry.on[1]: must be one of `connect_error`, `timeout`, `reset` or a status code 400..=599 (was `timeuot`); did you mean `timeout`?",
                "p.yaml:15:36 routes[0].retry.on[2]: must be 400..=599 (was 600)",
                "p.yaml:15:46 routes[0].retry.on[4]: `429` is listed twice",
                "p.yaml:15:51 routes[0].retry.on[5]: expected a whole number (write it without quotes), got the string \"503\"",
                "p.yaml:16:36 routes[0].retry.backoff.factor: must be 1..=10 (was 0.5)",
                "p.yaml:16:46 routes[0].retry.backoff.max: must be at least base (2s) (was 1s)",
                "p.yaml:16:58 routes[0].retry.backoff.jitter: must be `full`, `none` or a percentage such as 10% (was `half`)",
                "p.yaml:17:32 routes[0].retry.rate_limited_multiplier: expected a number such as 2 or 1.5 (write it without quotes), got the string \"2\"",
                "p.yaml:18:24 routes[0].retry.max_retry_after: must be 0s..=1d (was 2d)",
                "p.yaml:19:15 routes[0].retry.budget: ratio 0% with min_per_second 0 allows no retry at all; to turn retries off, set `attempts: 1`",
                "p.yaml:20:15 routes[0].retry.replay: expected true or false, got `yes`",
            ]
        );
        let text = with("    retry: { on: [], attempts: 11, backoff: { jitter: 150% } }\n");
        assert_eq!(
            errors(&text),
            [
                "p.yaml:13:18 routes[0].retry.on: must list at least one condition (to turn retries off, set `attempts: 1`)",
                "p.yaml:13:32 routes[0].retry.attempts: must be 1..=10 (was 11)",
                "p.yaml:13:55 routes[0].retry.backoff.jitter: `150%` is out of range; expected a percentage such as 50% or 12.5% (0% to 100%)",
            ]
        );
    }

    #[test]
    fn breaker_errors_name_the_range_and_the_value() {
        let text = with(
            "backend:
    circuit_breaker:
      window: 50ms
      failure_rate: 0%
      min_requests: 0
      failure_count: 0
      consecutive_failures: -1
      slow_call: { threshold: 0s }
      open_for: 1m
      open_for_max: 30s
      half_open_probes: 101
      failure_statuses: [200, 503, 503]
      reset_timeout: 30s
",
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:6:15 backends.openai.circuit_breaker.window: must be 100ms..=1h (was 50ms)",
                "p.yaml:7:21 backends.openai.circuit_breaker.failure_rate: must be 1%..=100% (was 0%)",
                "p.yaml:8:21 backends.openai.circuit_breaker.min_requests: must be 1..=1000000 (was 0)",
                "p.yaml:9:22 backends.openai.circuit_breaker.failure_count: must be 1..=1000000 (was 0)",
                "p.yaml:10:29 backends.openai.circuit_breaker.consecutive_failures: must be 1..=1000000 (was -1)",
                "p.yaml:11:18 backends.openai.circuit_breaker.slow_call.rate: missing required field `rate`",
                "p.yaml:11:31 backends.openai.circuit_breaker.slow_call.threshold: must be 1ms..=1d (was 0s)",
                "p.yaml:13:21 backends.openai.circuit_breaker.open_for_max: must be at least open_for (1m) (was 30s)",
                "p.yaml:14:25 backends.openai.circuit_breaker.half_open_probes: must be 1..=100 (was 101)",
                "p.yaml:15:26 backends.openai.circuit_breaker.failure_statuses[0]: must be 400..=599 (was 200)",
                "p.yaml:15:36 backends.openai.circuit_breaker.failure_statuses[2]: 503 is listed twice",
                "p.yaml:16:7 backends.openai.circuit_breaker.reset_timeout: unknown field `reset_timeout`; expected one of `window`, `failure_rate`, `min_requests`, `failure_count`, `consecutive_failures`, `slow_call`, `open_for`, `open_for_max`, `half_open_probes`, `failure_statuses`",
            ]
        );
        let text = with("backend:\n    circuit_breaker: { failure_rate: 50 }\n");
        assert_eq!(
            errors(&text),
            ["p.yaml:5:38 backends.openai.circuit_breaker.failure_rate: expected a percentage such as 50% or 12.5% (0% to 100%), got `50`"]
        );
    }

    #[test]
    fn timeout_errors() {
        let text = with(
            "    timeouts: { total: 10s, first_token: 15s, response_headers: 20s, idle: 0s }\n",
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:13:42 routes[0].timeouts.first_token: must be at most total (10s), or it could never fire (was 15s)",
                "p.yaml:13:65 routes[0].timeouts.response_headers: must be at most total (10s), or it could never fire (was 20s)",
                "p.yaml:13:76 routes[0].timeouts.idle: must be 1ms..=1d (was 0s)",
            ]
        );
        let text = with("    timeouts: { hold_for_first_token: true, totl: 5s }\n");
        assert_eq!(
            errors(&text),
            [
                "p.yaml:13:39 routes[0].timeouts.hold_for_first_token: needs `first_token`: the hold ends at the first token or when first_token runs out",
                "p.yaml:13:45 routes[0].timeouts.totl: unknown field `totl`; did you mean `total`?",
            ]
        );
    }

    #[test]
    fn fallback_errors() {
        let text = with(
            "    fallback:
      - backend: openai
      - backend: locl
      - backend: small
      - backend: small
      - { respond: { status: 99 }, model: x }
      - {}
      - stale_cache: true
      - { backend: local, respond: {} }
    fallback_on: [circuit_open, circuit_open, sometimes]
",
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:14:18 routes[0].fallback[0].backend: `openai` is the route's own backend; a fallback must be another backend",
                "p.yaml:15:18 routes[0].fallback[1].backend: unknown backend `locl`; defined backends: `openai`, `local`, `small`; did you mean `local`?",
                "p.yaml:17:18 routes[0].fallback[3].backend: backend `small` is listed twice",
                "p.yaml:18:30 routes[0].fallback[4].respond.status: must be 200..=599 (was 99)",
                "p.yaml:18:43 routes[0].fallback[4].model: `model` applies only to a `backend` target",
                "p.yaml:19:9 routes[0].fallback[5]: comes after the static `respond` at routes[0].fallback[4], which always answers, so it would never be tried; `respond` must be last",
                "p.yaml:19:9 routes[0].fallback[5]: set a target: `backend` (another backend, optionally with `model`), `stale_cache: true` or `respond` (a static answer)",
                "p.yaml:20:9 routes[0].fallback[6]: comes after the static `respond` at routes[0].fallback[4], which always answers, so it would never be tried; `respond` must be last",
                "p.yaml:20:22 routes[0].fallback[6].stale_cache: needs `cache.stale_if_error` on this route (how old a stale answer may be)",
                "p.yaml:21:9 routes[0].fallback[7]: comes after the static `respond` at routes[0].fallback[4], which always answers, so it would never be tried; `respond` must be last",
                "p.yaml:21:36 routes[0].fallback[7].respond: set one target per entry: `backend`, `stale_cache` or `respond`",
                "p.yaml:22:33 routes[0].fallback_on[1]: `circuit_open` is listed twice",
                "p.yaml:22:47 routes[0].fallback_on[2]: must be one of `circuit_open`, `retries_exhausted` (was `sometimes`)",
            ]
        );
        let text = with("    fallback: []\n    fallback_on: circuit_open\n");
        assert_eq!(
            errors(&text),
            ["p.yaml:14:18 routes[0].fallback_on: has no effect without `fallback` targets; add `fallback` or remove `fallback_on`"]
        );
        let text = with("    fallback: [{ backend: local }]\n    fallback_on: []\n");
        assert_eq!(
            errors(&text),
            ["p.yaml:14:18 routes[0].fallback_on: must list at least one of `circuit_open`, `retries_exhausted` (to turn fallback off, remove `fallback`)"]
        );
    }
}
