//! `GET /admin/limits`: the rate-limit rules and their usage.
//!
//! - `/admin/limits`: every rule, with its windows and its top 10 keys
//!   (for budgets: the top spenders of the current period);
//! - `/admin/limits?rule=NAME&key=KEY[&tier=TIER]`: one key's usage of one
//!   rule, window by window (nothing is charged);
//! - `/admin/limits?rule=NAME&top=N`: the top N keys of one rule.
//!
//! It is async (the counters may live in Redis), so it is served beside the
//! synchronous endpoints of [`super::AdminApp::handle`].

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::state::Shared;

fn param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Percent-decoding for query values (keys such as `alice|chat`).
fn decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(x) => {
                        out.push(x);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The JSON body and status of `/admin/limits`.
pub async fn render(shared: &Shared, query: Option<&str>) -> (u16, Value) {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let snapshot = shared.snapshot();
    let rules: Vec<_> = snapshot.limits.all_rules().cloned().collect();
    let limiter = &shared.limiter;
    if let Some(name) = param(query, "rule").map(decode) {
        let Some(rule) = rules.iter().find(|r| r.name == name) else {
            let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
            return (
                404,
                json!({"error": {"message": format!("no rule named `{name}`; rules: {names:?}"), "type": "not_found_error", "code": "no_such_rule"}}),
            );
        };
        if let Some(key) = param(query, "key").map(decode) {
            let tier = param(query, "tier").map(decode);
            return match limiter.usage(rule, &key, tier.as_deref(), now_ms).await {
                Ok(windows) => (
                    200,
                    json!({"rule": rule.name, "key": key, "windows": windows.iter().map(|w| w.to_json()).collect::<Vec<_>>()}),
                ),
                Err(e) => (
                    503,
                    json!({"error": {"message": format!("store unavailable: {e}"), "type": "unavailable", "code": "limiter_unavailable"}}),
                ),
            };
        }
        let n = param(query, "top")
            .and_then(|v| v.parse().ok())
            .unwrap_or(10usize)
            .min(1000);
        return match limiter.top(rule, n, now_ms).await {
            Ok(top) => (
                200,
                json!({"rule": rule.name, "top": top.iter().map(|t| t.to_json()).collect::<Vec<_>>()}),
            ),
            Err(e) => (
                503,
                json!({"error": {"message": format!("store unavailable: {e}"), "type": "unavailable", "code": "limiter_unavailable"}}),
            ),
        };
    }
    if let Some(key) = param(query, "key").map(decode) {
        // One key's usage in every rule (e.g. a user id).
        let tier = param(query, "tier").map(decode);
        let mut out = Vec::new();
        for rule in &rules {
            let usage = match limiter.usage(rule, &key, tier.as_deref(), now_ms).await {
                Ok(w) => json!(w.iter().map(|w| w.to_json()).collect::<Vec<_>>()),
                Err(e) => json!({"error": e.to_string()}),
            };
            out.push(json!({"rule": rule.name, "windows": usage}));
        }
        return (200, json!({"key": key, "rules": out}));
    }
    let mut out = Vec::new();
    for rule in &rules {
        let top = match limiter.top(rule, 10, now_ms).await {
            Ok(t) => json!(t.iter().map(|t| t.to_json()).collect::<Vec<_>>()),
            Err(e) => json!({"error": e.to_string()}),
        };
        out.push(json!({
            "name": rule.name,
            "origin": rule.origin,
            "shadow": rule.shadow,
            "windows": rule.limits.iter().map(|w| w.describe()).collect::<Vec<_>>(),
            "tiers": rule.tiers.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
            "top": top,
        }));
    }
    (
        200,
        json!({"store": if limiter.redis().is_some() { "redis" } else { "memory" }, "rules": out}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_found_and_decoded() {
        assert_eq!(param(Some("rule=a&key=b%7Cc"), "key"), Some("b%7Cc"));
        assert_eq!(decode("b%7Cc"), "b|c");
        assert_eq!(decode("a+b%zz"), "a b%zz");
        assert_eq!(param(None, "x"), None);
    }
}
