//! Wiring of the rate-limit, token and cost rules into the request path:
//! identity, admission (`Limiter::check`), the rate-limit headers, usage
//! tracking on the way back, and reconciliation when the response ends.
//!
//! Usage comes from the response: the JSON body's `usage`, or the final SSE
//! chunk's. A stream without usage is estimated from the streamed content
//! (4 characters a token) and logged as `usage=estimated`. A client that
//! leaves mid-stream is charged for what was streamed, never refunded; a
//! request that never reached a backend releases its whole reservation.
//! Only the attempt that answered is charged (failed attempts return no
//! usage to read).

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pingora::proxy::Session;
use serde_json::Value;
use tracing::{info, warn};

use super::reject::{Reason, Reject};
use super::sse::SseScanner;
use super::{Ctx, FloodwallProxy};
use crate::policy::identity::{self, RequestParts};
use crate::policy::ratelimit::{self, LimitRequest, Outcome, Usage};
use crate::state::Active;

/// The longest JSON response body kept to read its `usage`.
const MAX_USAGE_BODY: usize = 4 << 20;

/// Wall-clock milliseconds since the Unix epoch (limits and cache entries
/// are shared with other replicas, so they use the wall clock).
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Who is calling, as the policy's `identity` section resolves it for this
/// request (rate limits, per-identity caps and per-user cache entries all
/// ask the same question). `doc`: the parsed body, when a source reads it.
pub(super) fn extract_identity(
    session: &Session,
    active: &Active,
    llm: Option<&crate::request::LlmFields>,
    doc: Option<&Value>,
    now_ms: u64,
) -> identity::Identity {
    let snap = &active.snapshot;
    let parts = RequestParts::new(
        &session.req_header().headers,
        super::client_ip(session),
        &snap.server.trusted_proxies,
        now_ms / 1000,
    )
    .with_body(llm, doc);
    identity::extract(&snap.limits.identity, &parts)
}

/// Reads usage from a response body as it streams by.
pub struct UsageTracker {
    sse: SseScanner,
    json: Vec<u8>,
    json_overflow: bool,
}

impl UsageTracker {
    pub fn new() -> Self {
        UsageTracker {
            sse: SseScanner::new(),
            json: Vec::new(),
            json_overflow: false,
        }
    }

    pub fn feed(&mut self, is_sse: bool, chunk: &Bytes) {
        if is_sse {
            self.sse.feed(chunk);
        } else if !self.json_overflow {
            if self.json.len() + chunk.len() > MAX_USAGE_BODY {
                self.json_overflow = true;
                self.json = Vec::new();
            } else {
                self.json.extend_from_slice(chunk);
            }
        }
    }

    /// The usage reported by the backend, or an estimate (`true`) from the
    /// streamed content and the prompt estimate.
    pub fn usage(&self, prompt_estimate: u64) -> (Usage, bool) {
        if let Some(u) = self.sse.usage {
            return (
                Usage {
                    input_tokens: u.prompt_tokens,
                    output_tokens: u.completion_tokens,
                },
                false,
            );
        }
        if !self.json.is_empty() {
            if let Some(u) = usage_of(&self.json) {
                return (
                    Usage {
                        input_tokens: u.prompt_tokens.max(u.input_tokens),
                        output_tokens: u.completion_tokens.max(u.output_tokens),
                    },
                    false,
                );
            }
        }
        let output = self.sse.content_chars.div_ceil(ratelimit::CHARS_PER_TOKEN);
        (
            Usage {
                input_tokens: prompt_estimate,
                output_tokens: output,
            },
            true,
        )
    }
}

#[derive(serde::Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
}

/// The `usage` object of a JSON response body.
///
/// Fast path: providers put `usage` at the end of the body, so look for the
/// last `"usage":` key from the end and read only the object after it (a
/// `"` inside a JSON string is always escaped, so the unescaped bytes
/// `"usage"` followed by `:` can only be a key). When that finds nothing,
/// the whole body is parsed, skipping every other field unbuilt.
fn usage_of(json: &[u8]) -> Option<RawUsage> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = json.len();
    while end >= KEY.len() {
        // The previous `"` from `end`, scanning backwards.
        let Some(i) = json[..end].iter().rposition(|&b| b == b'"') else {
            break;
        };
        if i + 1 >= KEY.len() && &json[i + 1 - KEY.len()..=i] == KEY {
            let after = json[i + 1..].trim_ascii_start();
            if let Some(value) = after.strip_prefix(b":").map(<[u8]>::trim_ascii_start) {
                if value.starts_with(b"{") {
                    use serde::Deserialize;
                    let mut de = serde_json::Deserializer::from_slice(value);
                    if let Ok(u) = RawUsage::deserialize(&mut de) {
                        return Some(u);
                    }
                }
                break;
            }
        }
        end = i;
    }
    #[derive(serde::Deserialize)]
    struct Body {
        usage: Option<RawUsage>,
    }
    serde_json::from_slice::<Body>(json).ok()?.usage
}

impl Default for UsageTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl FloodwallProxy {
    /// Identity and rate-limit admission. `Ok(Some(_))` when a response was
    /// sent (refused), `Ok(None)` to go on.
    pub(super) async fn admit_limits(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        active: &Active,
        doc: Option<&Value>,
    ) -> pingora::Result<Option<bool>> {
        let snap = &active.snapshot;
        let rules = snap.limits.rules_for(ctx.route_index);
        if rules.is_empty() {
            return Ok(None);
        }
        let Some(route) = ctx.route.clone() else {
            return Ok(None);
        };
        let now_ms = now_ms();
        let ident = extract_identity(session, active, ctx.llm.as_ref(), doc, now_ms);
        if let Some(e) = &ident.jwt_error {
            warn!(target: "audit", request_id = %ctx.request_id, route = %route.name, reason = e.code(), ip = ?ident.ip, "rejected token");
            let r = Reject::new(Reason::InvalidToken, format!("invalid token: {e}"));
            return self.reject(session, ctx, r, true).await.map(Some);
        }
        let store_timer = std::time::Instant::now();
        // The request header is only read while the limiter decides.
        let req = session.req_header();
        let mut decision = self
            .shared
            .limiter
            .check(
                rules,
                &LimitRequest {
                    identity: &ident,
                    route: &route.name,
                    path: req.uri.path(),
                    headers: &req.headers,
                    llm: ctx.llm.as_ref(),
                    prices: &snap.limits.prices,
                },
                now_ms,
            )
            .await;
        let m = &self.shared.limit_metrics;
        if self.shared.limiter.redis().is_some() {
            if let Ok(h) = m.store_duration.get_metric_with_label_values(&["check"]) {
                h.observe(store_timer.elapsed().as_secs_f64());
            }
        }
        if decision.store_error.is_some() {
            if let Ok(c) = m.store_errors.get_metric_with_label_values(&["check"]) {
                c.inc();
            }
        }
        for o in &decision.outcomes {
            let label = match (o.fallback, o.outcome) {
                (Some(_), Outcome::Allowed) => "local",
                _ => o.outcome.label(),
            };
            if let Ok(c) = m
                .decisions
                .get_metric_with_label_values(&[&o.rule.name, label])
            {
                c.inc();
            }
            if let Outcome::ShadowLimited(reason) = o.outcome {
                info!(target: "audit", request_id = %ctx.request_id, rule = %o.rule.name, key = %o.key, reason = reason.code(), "shadow rule would have refused");
            }
            if let Outcome::Limited(reason) = o.outcome {
                info!(target: "audit", request_id = %ctx.request_id, rule = %o.rule.name, key = %o.key, reason = reason.code(), "limit hit");
            }
        }
        if let Some(h) = decision.headers.take() {
            ctx.rate_headers = h.into_values();
        }
        ctx.identity = Some(Box::new(ident));
        if !decision.allowed {
            let reason = match decision.reason {
                Some(ratelimit::Reason::RateLimited) => Reason::RateLimited,
                Some(ratelimit::Reason::TokensExceeded) => Reason::TokensExceeded,
                Some(ratelimit::Reason::BudgetExceeded) => Reason::BudgetExceeded,
                Some(ratelimit::Reason::MissingIdentity) => {
                    warn!(target: "audit", request_id = %ctx.request_id, route = %route.name, "missing required identity");
                    Reason::MissingIdentity
                }
                Some(ratelimit::Reason::LimiterUnavailable) | None => Reason::LimiterUnavailable,
            };
            let mut r = Reject::new(reason, decision.message());
            if decision.status != reason.status() && decision.status >= 400 {
                r.status = Some(decision.status);
            }
            r.retry_after = decision.retry_after_secs;
            return self.reject(session, ctx, r, true).await.map(Some);
        }
        if decision.reservation.is_some() {
            ctx.usage = Some(Box::new(UsageTracker::new()));
        }
        ctx.reservation = decision.reservation;
        Ok(None)
    }

    /// Reconcile the reservation with what the response used, and count
    /// tokens and cost. Called once, when the request ends.
    pub(super) async fn settle_usage(&self, ctx: &mut Ctx) {
        let Some(reservation) = ctx.reservation.take() else {
            return;
        };
        let reached_backend = ctx.response_started && ctx.reason.is_none();
        let (usage, estimated) = match (&ctx.usage, reached_backend) {
            (Some(t), true) => t.usage(reservation.prompt_tokens),
            _ => (Usage::default(), false),
        };
        let route = ctx.route.as_ref().map(|r| r.name.as_str()).unwrap_or("");
        if reached_backend {
            let model_label = ctx
                .llm
                .as_ref()
                .and_then(|l| l.model.as_deref())
                .filter(|m| {
                    ctx.active
                        .as_ref()
                        .is_some_and(|a| a.snapshot.limits.prices.get(m).is_some())
                })
                .unwrap_or("other")
                .to_string();
            let m = &self.shared.limit_metrics;
            let source = if estimated { "estimated" } else { "reported" };
            for (kind, n) in [
                ("input", usage.input_tokens),
                ("output", usage.output_tokens),
            ] {
                if let Ok(c) =
                    m.tokens
                        .get_metric_with_label_values(&[route, &model_label, kind, source])
                {
                    c.inc_by(n);
                }
            }
            if let Some(price) = reservation.price {
                let usd = price.cost_nanos(usage.input_tokens, usage.output_tokens) as f64 / 1e9;
                if let Ok(c) = m.cost.get_metric_with_label_values(&[route, &model_label]) {
                    c.inc_by(usd);
                }
            }
        }
        // Boxed: `logging` awaits this for every request, and Pingora boxes
        // that future each time; inline, a store round trip's state would
        // make every request's box bigger, reservation or not.
        if let Err(e) = Box::pin(self.shared.limiter.reconcile(reservation, usage, now_ms())).await
        {
            if let Ok(c) = self
                .shared
                .limit_metrics
                .store_errors
                .get_metric_with_label_values(&["reconcile"])
            {
                c.inc();
            }
            warn!(request_id = %ctx.request_id, error = %e, "could not reconcile token usage");
        }
        ctx.usage_estimated = estimated;
        ctx.usage_tokens = usage.input_tokens + usage.output_tokens;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(body: &str) -> (Usage, bool) {
        let mut t = UsageTracker::new();
        t.feed(false, &Bytes::from(body.to_string()));
        t.usage(7)
    }

    #[test]
    fn usage_is_read_from_a_json_body() {
        let openai = r#"{"id":"c1","choices":[{"message":{"role":"assistant","content":"say \"usage\": {\"prompt_tokens\": 99}"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17},"system_fingerprint":"fp"}"#;
        assert_eq!(
            tokens(openai),
            (
                Usage {
                    input_tokens: 12,
                    output_tokens: 5
                },
                false
            )
        );
        let anthropic = r#"{"type":"message","content":[{"type":"text","text":"hi"}],"usage" : {"input_tokens":3,"output_tokens":4}}"#;
        assert_eq!(
            tokens(anthropic),
            (
                Usage {
                    input_tokens: 3,
                    output_tokens: 4
                },
                false
            )
        );
        // `"usage"` as a value, then the real key earlier in the body.
        let value_last = r#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"kind":"usage"}"#;
        assert_eq!(
            tokens(value_last),
            (
                Usage {
                    input_tokens: 1,
                    output_tokens: 2
                },
                false
            )
        );
        // No usage, or a null one: estimated.
        assert!(tokens(r#"{"choices":[]}"#).1);
        assert!(tokens(r#"{"usage":null}"#).1);
        assert!(tokens("not json").1);
    }
}
