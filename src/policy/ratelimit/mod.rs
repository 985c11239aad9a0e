//! Rate limits, token budgets and cost budgets: which rules apply to a
//! request, what each of them counts, and the decision.
//!
//! [`Limiter::check`] takes a route's rules (`LimitsConfig::rules_for`),
//! the request's identity and body fields, and `now`; it answers with a
//! [`Decision`]: allowed or not and why, `Retry-After`, the rate-limit
//! headers, and a [`Reservation`] of tokens and cost to reconcile with the
//! response's real usage ([`Limiter::reconcile`]).
//!
//! **What is counted, per rule** (see [`math`] for the exact arithmetic):
//! - `requests`: one per request; a rolling window (GCRA, exact, with a
//!   configurable burst);
//! - `tokens`: admission reserves an estimate, `max_tokens` (or the rule's
//!   `default_max_tokens`) plus `⌈prompt characters / 4⌉`; a request whose
//!   estimate does not fit the remaining budget is refused
//!   (`tokens_exceeded`). Reconciliation then charges the real usage;
//! - `cost_usd`: the same estimate priced with `prices` (prompt tokens at
//!   the input price, `max_tokens` at the output price), against a budget
//!   that resets at the UTC calendar boundary of its period
//!   (`budget_exceeded`). A model with no price costs nothing (add a `*`
//!   entry to price every model).
//!
//! **All or nothing.** A request is admitted only if every enforcing rule
//! admits it, and only then is anything charged: a refused request consumes
//! no quota in any window of any rule. In memory this is one atomic step.
//! Through Redis each rule is one atomic script call (all its windows), the
//! rules of a request go in one pipelined round trip, and when one rule
//! refuses, the others' charges are refunded in a second round trip. Between
//! the two, a concurrent request can see that quota as taken, so across
//! rules Redis can under-admit for a moment, never over-admit.
//!
//! **Keys.** A rule's `key` parts are joined with `|` (`alice|chat`); a part
//! the request lacks counts as `-` (for instance every request without a
//! user shares the `-` bucket of a `[user]` rule, unless the rule sets
//! `require_identity`). `|` and `%` inside values are percent-encoded.
//!
//! **Shadow rules** are evaluated and counted exactly like enforcing ones,
//! but never refuse a request: [`Decision::shadow_denied`] and the rule's
//! [`Outcome::ShadowLimited`] report what they would have done. They do not
//! contribute rate-limit headers.
//!
//! **Store errors.** Each rule's `on_store_error` applies when Redis fails
//! or times out: `fail_open` skips the rule, `fail_closed` refuses with
//! 503 `limiter_unavailable`, `local` counts in this process with every
//! limit divided by `store.redis.expected_replicas` (so the fleet as a whole
//! stays near the limit) until Redis answers again. The local counters
//! start empty and are not merged back into Redis.
//!
//! **Reloads.** State is keyed by rule name, key and window (`r:60000`, see
//! `Window::field`), not by position, so an unchanged rule keeps its
//! counters. Changing a window's limit or burst keeps what was consumed
//! (the new limit applies to it at once); changing its `per` or kind starts
//! a new counter (the old one expires on its own); renaming a rule starts
//! afresh.

pub mod math;
pub mod memory;

use std::sync::Arc;

use serde_json::{json, Value};
use smallvec::SmallVec;

use crate::config::limits::{Field, KeyPart, OnStoreError, Price, Prices, RateLimitRule, Window};
use crate::config::StoreConfig;
use crate::policy::identity::Identity;
use crate::request::LlmFields;
use crate::store::{RedisStore, StoreError};
use crate::text::push_u64;

pub use math::Eval;
pub use memory::MemoryStore;

/// Characters per token when estimating a prompt's tokens.
pub const CHARS_PER_TOKEN: u64 = 4;
/// `Retry-After` for a 503 `limiter_unavailable`.
pub const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 1;

/// One entry per rule of a decision, inline up to four (a route has a few
/// rules): a decision allocates nothing per rule.
pub type PerRule<T> = SmallVec<[T; 4]>;
/// One entry per window of a rule, inline up to three.
pub type PerWindow<T> = SmallVec<[T; 3]>;

/// What [`Limiter::check`] needs from a request.
#[derive(Debug, Clone, Copy)]
pub struct LimitRequest<'a> {
    pub identity: &'a Identity,
    /// The matched route's name.
    pub route: &'a str,
    /// The request path as received (for `exempt.paths`).
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
    /// The parsed JSON body fields (`model`, `max_tokens`, prompt size).
    pub llm: Option<&'a LlmFields>,
    /// The snapshot's price table.
    pub prices: &'a Prices,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    RateLimited,
    TokensExceeded,
    BudgetExceeded,
    MissingIdentity,
    LimiterUnavailable,
}

impl Reason {
    /// The `x-floodwall-reason` value and the error body's `code`.
    pub fn code(self) -> &'static str {
        match self {
            Reason::RateLimited => "rate_limited",
            Reason::TokensExceeded => "tokens_exceeded",
            Reason::BudgetExceeded => "budget_exceeded",
            Reason::MissingIdentity => "missing_identity",
            Reason::LimiterUnavailable => "limiter_unavailable",
        }
    }

    fn of(window: &Window) -> Reason {
        match window {
            Window::Requests { .. } => Reason::RateLimited,
            Window::Tokens { .. } => Reason::TokensExceeded,
            Window::Cost { .. } => Reason::BudgetExceeded,
        }
    }
}

/// What one rule did with a request (for metrics and the audit log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Limited(Reason),
    /// A shadow rule that would have refused.
    ShadowLimited(Reason),
    /// `exempt.paths` or `exempt.keys` matched.
    Exempt,
    /// The request's tier is `unlimited` in this rule.
    Unlimited,
    /// The store failed and the rule fails open.
    FailedOpen,
}

impl Outcome {
    /// A metric label: `allowed`, `limited`, `shadow_limited`, `exempt`,
    /// `unlimited`, `failed_open`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Limited(_) => "limited",
            Outcome::ShadowLimited(_) => "shadow_limited",
            Outcome::Exempt => "exempt",
            Outcome::Unlimited => "unlimited",
            Outcome::FailedOpen => "failed_open",
        }
    }
}

/// One rule's part of a decision.
#[derive(Debug, Clone)]
pub struct RuleOutcome {
    pub rule: Arc<RateLimitRule>,
    /// The rule key (`alice|chat`); empty when the rule did not get that far.
    pub key: String,
    pub outcome: Outcome,
    /// Set when the store failed: the `on_store_error` that was applied.
    pub fallback: Option<OnStoreError>,
}

/// The rate-limit headers of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateHeaders {
    /// `X-RateLimit-Limit`: the window's limit (requests or tokens).
    pub limit: u64,
    /// `X-RateLimit-Remaining`.
    pub remaining: u64,
    /// `X-RateLimit-Reset`: seconds until the window is full again, rounded up.
    pub reset_secs: u64,
    /// `RateLimit-Policy` then `RateLimit`, in one buffer (one allocation).
    text: String,
    /// Where `RateLimit` starts in `text`.
    policy_len: usize,
}

impl RateHeaders {
    /// `RateLimit-Policy`: every request and token window that applied.
    pub fn policy(&self) -> &str {
        &self.text[..self.policy_len]
    }

    /// `RateLimit`: the window reported above.
    pub fn ratelimit(&self) -> &str {
        &self.text[self.policy_len..]
    }

    /// Header names and values as strings (the tests' view of
    /// [`RateHeaders::into_values`]).
    #[cfg(test)]
    pub fn pairs(&self) -> [(&'static str, String); 5] {
        [
            ("x-ratelimit-limit", self.limit.to_string()),
            ("x-ratelimit-remaining", self.remaining.to_string()),
            ("x-ratelimit-reset", self.reset_secs.to_string()),
            ("ratelimit-policy", self.policy().to_string()),
            ("ratelimit", self.ratelimit().to_string()),
        ]
    }

    /// The same, as header values. All five are slices of one buffer (the
    /// numbers are written after the two texts), so cloning them onto a
    /// response only counts references.
    pub fn into_values(self) -> Vec<(http::HeaderName, http::HeaderValue)> {
        use http::HeaderName;
        const NAMES: [HeaderName; 5] = [
            HeaderName::from_static("x-ratelimit-limit"),
            HeaderName::from_static("x-ratelimit-remaining"),
            HeaderName::from_static("x-ratelimit-reset"),
            HeaderName::from_static("ratelimit-policy"),
            HeaderName::from_static("ratelimit"),
        ];
        let mut text = self.text;
        let texts = text.len();
        let mut numbers = [0usize; 3];
        for (i, n) in [self.limit, self.remaining, self.reset_secs]
            .into_iter()
            .enumerate()
        {
            push_u64(&mut text, n);
            numbers[i] = text.len();
        }
        let text = bytes::Bytes::from(text);
        let [a, b, c] = numbers;
        let starts = [texts, a, b, 0, self.policy_len];
        let ends = [a, b, c, self.policy_len, texts];
        let mut out = Vec::with_capacity(5);
        for ((name, start), end) in NAMES.into_iter().zip(starts).zip(ends) {
            // Rule names are checked when the policy loads; a value that is
            // still not a valid header value is left out.
            if let Ok(v) = http::HeaderValue::from_maybe_shared(text.slice(start..end)) {
                out.push((name, v));
            }
        }
        out
    }
}

/// The answer to [`Limiter::check`].
#[derive(Debug)]
pub struct Decision {
    pub allowed: bool,
    /// Why not, when `allowed` is false.
    pub reason: Option<Reason>,
    /// The HTTP status of the refusal: 429, 401/400 (missing identity) or
    /// 503 (limiter unavailable); 200 when allowed.
    pub status: u16,
    /// The rule that refused.
    pub rule: Option<Arc<RateLimitRule>>,
    /// For refusals: whole seconds until the request would be admitted
    /// (rounded up; at least 1).
    pub retry_after_secs: Option<u64>,
    /// For every response of a limited route; `None` when no enforcing
    /// request or token window applied.
    pub headers: Option<RateHeaders>,
    /// Tokens and cost reserved; reconcile it when the response is done.
    pub reservation: Option<Reservation>,
    /// Some shadow rule would have refused this request.
    pub shadow_denied: bool,
    /// Some rule's store failed and its `on_store_error` was applied.
    pub fallback: bool,
    /// The store's error, when `fallback` (for the log and metrics).
    pub store_error: Option<StoreError>,
    pub outcomes: PerRule<RuleOutcome>,
    /// The token estimate used for admission (0 without token or cost windows).
    pub estimated_tokens: u64,
    window: Option<Window>,
}

impl Decision {
    fn allow() -> Decision {
        Decision {
            allowed: true,
            reason: None,
            status: 200,
            rule: None,
            retry_after_secs: None,
            headers: None,
            reservation: None,
            shadow_denied: false,
            fallback: false,
            store_error: None,
            outcomes: PerRule::new(),
            estimated_tokens: 0,
            window: None,
        }
    }

    /// The client-facing message of a refusal (never names the key).
    pub fn message(&self) -> String {
        let rule = self.rule.as_ref().map(|r| r.name.as_str()).unwrap_or("");
        let window = self.window.map(|w| w.describe()).unwrap_or_default();
        let retry = self
            .retry_after_secs
            .map(|s| format!("; retry after {s}s"))
            .unwrap_or_default();
        match self.reason {
            None => String::new(),
            Some(Reason::RateLimited) => format!("rate limit exceeded: rule `{rule}` allows {window}{retry}"),
            Some(Reason::TokensExceeded) => format!(
                "token limit exceeded: rule `{rule}` allows {window}, and this request is estimated at {} tokens (max_tokens plus the prompt){retry}",
                self.estimated_tokens
            ),
            Some(Reason::BudgetExceeded) => format!("budget exhausted: rule `{rule}` allows {window}{retry}"),
            Some(Reason::MissingIdentity) => format!(
                "this route requires an identity (rule `{rule}`): send a valid token, API key or user id"
            ),
            Some(Reason::LimiterUnavailable) => "the rate limiter is unavailable; retry shortly".to_string(),
        }
    }
}

/// Real usage of a completed call, for [`Limiter::reconcile`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// `usage.prompt_tokens`.
    pub input_tokens: u64,
    /// `usage.completion_tokens`; for a broken stream, what was streamed.
    pub output_tokens: u64,
}

/// Tokens and cost reserved at admission. Reconcile it with the real
/// usage; dropping it keeps the estimate charged.
#[derive(Debug, Clone)]
#[must_use = "reconcile it with the response's usage (Usage::default() if the backend was never reached)"]
pub struct Reservation {
    /// The prompt estimate, ⌈prompt characters / 4⌉.
    pub prompt_tokens: u64,
    /// The model's price, when known.
    pub price: Option<Price>,
    entries: Vec<Reserved>,
}

#[derive(Debug, Clone)]
struct Reserved {
    store: Where,
    rule: Arc<RateLimitRule>,
    key: String,
    windows: Vec<ReservedWindow>,
}

#[derive(Debug, Clone)]
struct ReservedWindow {
    field: Field,
    window: Window,
    reserved: u64,
    period_start: u64,
}

impl Reservation {
    /// Tokens reserved by the first token window (0 if none).
    pub fn reserved_tokens(&self) -> u64 {
        self.entries
            .iter()
            .flat_map(|e| &e.windows)
            .find(|w| matches!(w.window, Window::Tokens { .. }))
            .map_or(0, |w| w.reserved)
    }
}

/// Where a rule's state is kept for one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    Memory,
    Redis,
    /// The `local` fallback, with limits divided by this.
    Local(u64),
}

/// One rule to evaluate for one request.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub rule: Arc<RateLimitRule>,
    pub key: String,
    pub enforce: bool,
    pub windows: PerWindow<PlanWindow>,
}

#[derive(Debug, Clone)]
pub(crate) struct PlanWindow {
    pub field: Field,
    pub window: Window,
    /// Requests: 1; tokens: the estimate; cost: the estimate in nano-USD.
    pub amount: u64,
}

/// A store's answer for one plan.
#[derive(Debug, Clone)]
pub(crate) struct RuleEval {
    /// Every window admits the request.
    pub allowed: bool,
    /// The store charged it.
    pub charged: bool,
    pub windows: PerWindow<Eval>,
}

/// A correction of one (rule, key).
#[derive(Debug, Clone)]
pub(crate) struct Adjustment {
    pub rule: String,
    pub key: String,
    pub windows: Vec<AdjustWindow>,
}

#[derive(Debug, Clone)]
pub(crate) struct AdjustWindow {
    pub field: Field,
    pub window: Window,
    pub delta: i64,
    pub period_start: u64,
}

/// One window's usage, for `/admin/status`.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowUsage {
    pub window: Window,
    /// The limit in the window's unit (requests, tokens or nano-USD).
    pub limit: u64,
    pub used: u64,
    pub remaining: u64,
    pub reset_secs: u64,
}

impl WindowUsage {
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "window": self.window.describe(),
            "kind": self.window.kind(),
            "limit": self.limit,
            "used": self.used,
            "remaining": self.remaining,
            "reset_seconds": self.reset_secs,
        });
        if matches!(self.window, Window::Cost { .. }) {
            v["used_usd"] = json!(self.used as f64 / 1e9);
            v["limit_usd"] = json!(self.limit as f64 / 1e9);
        }
        v
    }
}

/// One key's place in a rule's ranking, for `/admin/status`.
#[derive(Debug, Clone, PartialEq)]
pub struct TopEntry {
    pub key: String,
    /// In the window's unit (requests, tokens or nano-USD).
    pub used: u64,
    pub window: Window,
}

impl TopEntry {
    pub fn to_json(&self) -> Value {
        let mut v = json!({ "key": self.key, "used": self.used, "window": self.window.describe() });
        if matches!(self.window, Window::Cost { .. }) {
            v["used_usd"] = json!(self.used as f64 / 1e9);
        }
        v
    }
}

enum Primary {
    Memory(MemoryStore),
    Redis(RedisStore),
}

/// The rate limiter: one per process, kept across reloads (its state is
/// keyed by rule name, so unchanged rules keep their counters).
pub struct Limiter {
    primary: Primary,
    /// Counters for rules whose store failed and that fall back to `local`.
    local: MemoryStore,
    expected_replicas: u64,
}

impl Limiter {
    /// Exact counters in this process (no `store` section).
    pub fn in_memory() -> Limiter {
        Limiter {
            primary: Primary::Memory(MemoryStore::new()),
            local: MemoryStore::new(),
            expected_replicas: 1,
        }
    }

    /// Counters in Redis. No I/O happens here: the connection is made on
    /// first use, in the background.
    pub fn with_redis(store: RedisStore, expected_replicas: u32) -> Limiter {
        Limiter {
            primary: Primary::Redis(store),
            local: MemoryStore::new(),
            expected_replicas: u64::from(expected_replicas.max(1)),
        }
    }

    /// In memory without a `store` section, else through Redis.
    pub fn from_config(store: Option<&StoreConfig>) -> Result<Limiter, StoreError> {
        match store {
            None => Ok(Limiter::in_memory()),
            Some(s) => Ok(Limiter::with_redis(
                RedisStore::new(&s.redis)?,
                s.redis.expected_replicas,
            )),
        }
    }

    /// The Redis store, when limits are shared.
    pub fn redis(&self) -> Option<&RedisStore> {
        match &self.primary {
            Primary::Redis(r) => Some(r),
            Primary::Memory(_) => None,
        }
    }

    /// Decides whether a request may proceed under `rules`, charging it if
    /// so (see the module docs). `now_ms` is Unix milliseconds; through
    /// Redis the decision itself uses the server's clock and `now_ms` only
    /// serves the local fallback and index keys.
    pub async fn check(
        &self,
        rules: &[Arc<RateLimitRule>],
        req: &LimitRequest<'_>,
        now_ms: u64,
    ) -> Decision {
        match &self.primary {
            // No await on this path: the decision is made in one call, and
            // the caller's future carries none of its state.
            Primary::Memory(m) => {
                let (mut decision, planned) = self.plan(rules, req);
                let Some(mut planned) = planned else {
                    return decision;
                };
                let slots = m
                    .check(&planned.plans, 1, now_ms)
                    .into_iter()
                    .map(|e| Slot::Evaluated(Where::Memory, e))
                    .collect();
                let redis_refunds = self.decide(&mut decision, &mut planned, slots, now_ms);
                debug_assert!(
                    redis_refunds.is_empty(),
                    "a memory decision has no Redis refunds"
                );
                decision
            }
            // Boxed: a Redis round trip's state is large, and rare next to
            // the memory path's.
            Primary::Redis(r) => Box::pin(self.check_redis(r, rules, req, now_ms)).await,
        }
    }

    async fn check_redis(
        &self,
        r: &RedisStore,
        rules: &[Arc<RateLimitRule>],
        req: &LimitRequest<'_>,
        now_ms: u64,
    ) -> Decision {
        let (mut decision, planned) = self.plan(rules, req);
        let Some(mut planned) = planned else {
            return decision;
        };
        let replies = match r.check(&planned.plans, now_ms).await {
            Ok(replies) => replies,
            Err(e) => planned.plans.iter().map(|_| Err(e.clone())).collect(),
        };
        let slots = replies
            .into_iter()
            .map(|reply| match reply {
                Ok(e) => Slot::Evaluated(Where::Redis, e),
                Err(e) => Slot::Failed(e),
            })
            .collect();
        let refunds = self.decide(&mut decision, &mut planned, slots, now_ms);
        if !refunds.is_empty() {
            if let Err(e) = r.adjust(&refunds, now_ms).await {
                tracing::debug!(error = %e, "could not refund a refused request's charges; they expire with their windows");
            }
        }
        decision
    }

    /// The plans of a request: one per rule that applies, with its key and
    /// the amounts to charge. The decision so far holds the skipped rules'
    /// outcomes; `None` when no rule is left to evaluate or an identity is
    /// missing (the decision is then final).
    fn plan(
        &self,
        rules: &[Arc<RateLimitRule>],
        req: &LimitRequest<'_>,
    ) -> (Decision, Option<Planned>) {
        let mut decision = Decision::allow();
        if rules.is_empty() {
            return (decision, None);
        }
        let model = req.llm.and_then(|l| l.model.as_deref());
        let price = model.and_then(|m| req.prices.get(m));
        let prompt_tokens = req
            .llm
            .map_or(0, |l| (l.prompt_chars as u64).div_ceil(CHARS_PER_TOKEN));

        let mut plans: PerRule<Plan> = PerRule::new();
        let mut missing: Option<Arc<RateLimitRule>> = None;
        for rule in rules {
            let skipped = |key: String, outcome: Outcome| RuleOutcome {
                rule: rule.clone(),
                key,
                outcome,
                fallback: None,
            };
            if rule.exempt.path(req.path) {
                decision
                    .outcomes
                    .push(skipped(String::new(), Outcome::Exempt));
                continue;
            }
            if rule.require_identity && req.identity.user.is_none() {
                if rule.shadow {
                    decision.shadow_denied = true;
                    let o = Outcome::ShadowLimited(Reason::MissingIdentity);
                    decision.outcomes.push(skipped(String::new(), o));
                } else {
                    missing.get_or_insert_with(|| rule.clone());
                    let o = Outcome::Limited(Reason::MissingIdentity);
                    decision.outcomes.push(skipped(String::new(), o));
                }
                continue;
            }
            let key = rule_key(rule, req);
            if rule.exempt.key(&key) {
                decision.outcomes.push(skipped(key, Outcome::Exempt));
                continue;
            }
            let Some(windows) = rule.windows_for(&req.identity.tier) else {
                decision.outcomes.push(skipped(key, Outcome::Unlimited));
                continue;
            };
            let completion = req
                .llm
                .and_then(|l| l.max_tokens)
                .unwrap_or(rule.default_max_tokens);
            let tokens = prompt_tokens.saturating_add(completion);
            let cost = price.map_or(0, |p| p.cost_nanos(prompt_tokens, completion));
            let windows = windows
                .iter()
                .map(|w| PlanWindow {
                    field: w.field(),
                    window: *w,
                    amount: match w {
                        Window::Requests { .. } => 1,
                        Window::Tokens { .. } => tokens,
                        Window::Cost { .. } => cost,
                    },
                })
                .collect::<PerWindow<_>>();
            if windows
                .iter()
                .any(|w| !matches!(w.window, Window::Requests { .. }))
            {
                decision.estimated_tokens = decision.estimated_tokens.max(tokens);
            }
            plans.push(Plan {
                rule: rule.clone(),
                key,
                enforce: !rule.shadow,
                windows,
            });
        }

        if let Some(rule) = missing {
            decision.allowed = false;
            decision.reason = Some(Reason::MissingIdentity);
            decision.status = rule.missing_identity_status;
            decision.rule = Some(rule);
            return (decision, None);
        }
        if plans.is_empty() {
            return (decision, None);
        }
        let planned = Planned {
            plans,
            prompt_tokens,
            price,
        };
        (decision, Some(planned))
    }

    /// Completes `decision` from the primary store's answers (`slots`, one
    /// a plan): the local fallback for rules whose store failed with
    /// `on_store_error: local`, then the outcomes, the headers, and either
    /// the refusal (refunding what was charged) or the reservation.
    /// Returns the refunds still to send to Redis.
    fn decide(
        &self,
        decision: &mut Decision,
        planned: &mut Planned,
        mut slots: PerRule<Slot>,
        now_ms: u64,
    ) -> Vec<Adjustment> {
        let Planned {
            plans,
            prompt_tokens,
            price,
        } = planned;
        let (prompt_tokens, price) = (*prompt_tokens, *price);
        let local_idx: PerRule<usize> = slots
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                matches!(s, Slot::Failed(_)) && plans[*i].rule.on_store_error == OnStoreError::Local
            })
            .map(|(i, _)| i)
            .collect();
        if !local_idx.is_empty() {
            // Keep the store's error for the log and metrics: the local
            // evaluations below replace the failed slots.
            if let Slot::Failed(e) = &slots[local_idx[0]] {
                decision.store_error.get_or_insert_with(|| e.clone());
            }
            let local_plans: PerRule<Plan> = local_idx.iter().map(|&i| plans[i].clone()).collect();
            let evals = self
                .local
                .check(&local_plans, self.expected_replicas, now_ms);
            for (&i, e) in local_idx.iter().zip(evals) {
                slots[i] = Slot::Evaluated(Where::Local(self.expected_replicas), e);
            }
        }

        // Combine. The plans' outcomes follow the skipped rules' ones; their
        // keys move in at the end, once nothing else reads them.
        let first_planned = decision.outcomes.len();
        let mut refused_by: Option<(u64, Reason, usize, Option<Window>)> = None;
        let mut unavailable: Option<usize> = None;
        for (i, (plan, slot)) in plans.iter().zip(&slots).enumerate() {
            if let (Slot::Failed(e), None) = (slot, &decision.store_error) {
                decision.store_error = Some(e.clone());
            }
            let (outcome, fallback) = match slot {
                Slot::Failed(_) => match plan.rule.on_store_error {
                    OnStoreError::FailClosed if plan.enforce => {
                        unavailable.get_or_insert(i);
                        (
                            Outcome::Limited(Reason::LimiterUnavailable),
                            Some(OnStoreError::FailClosed),
                        )
                    }
                    OnStoreError::FailClosed => {
                        decision.shadow_denied = true;
                        (
                            Outcome::ShadowLimited(Reason::LimiterUnavailable),
                            Some(OnStoreError::FailClosed),
                        )
                    }
                    mode => (Outcome::FailedOpen, Some(mode)),
                },
                Slot::Evaluated(place, eval) => {
                    let fallback = matches!(place, Where::Local(_)).then_some(OnStoreError::Local);
                    // The window that keeps the request out longest.
                    let refusing = eval
                        .windows
                        .iter()
                        .zip(&plan.windows)
                        .filter(|(e, _)| !e.allowed)
                        .max_by_key(|(e, _)| e.wait_ms);
                    match refusing {
                        None => (Outcome::Allowed, fallback),
                        Some((e, w)) => {
                            let reason = Reason::of(&w.window);
                            if plan.enforce {
                                if refused_by
                                    .as_ref()
                                    .is_none_or(|(wait, ..)| e.wait_ms > *wait)
                                {
                                    refused_by = Some((e.wait_ms, reason, i, Some(w.window)));
                                }
                                (Outcome::Limited(reason), fallback)
                            } else {
                                decision.shadow_denied = true;
                                (Outcome::ShadowLimited(reason), fallback)
                            }
                        }
                    }
                }
            };
            decision.fallback |= fallback.is_some();
            decision.outcomes.push(RuleOutcome {
                rule: plan.rule.clone(),
                key: String::new(),
                outcome,
                fallback,
            });
        }
        decision.headers = headers(plans, &slots, refused_by.map(|(_, _, i, _)| i));

        let refused = refused_by.is_some() || unavailable.is_some();
        if refused {
            // Nothing may stay charged for a refused request.
            let redis_refunds = self.refund(plans, &slots, now_ms);
            move_keys(decision, first_planned, plans);
            decision.allowed = false;
            if let Some((wait_ms, reason, i, window)) = refused_by {
                decision.reason = Some(reason);
                decision.status = 429;
                decision.rule = Some(plans[i].rule.clone());
                decision.retry_after_secs = Some(wait_ms.div_ceil(1000).max(1));
                decision.window = window;
            } else if let Some(i) = unavailable {
                decision.reason = Some(Reason::LimiterUnavailable);
                decision.status = 503;
                decision.rule = Some(plans[i].rule.clone());
                decision.retry_after_secs = Some(UNAVAILABLE_RETRY_AFTER_SECS);
            }
            return redis_refunds;
        }

        let entries: Vec<Reserved> = plans
            .iter()
            .zip(&slots)
            .filter_map(|(plan, slot)| {
                let Slot::Evaluated(place, eval) = slot else {
                    return None;
                };
                if !eval.charged {
                    return None;
                }
                let windows: Vec<ReservedWindow> = plan
                    .windows
                    .iter()
                    .zip(&eval.windows)
                    .filter(|(w, _)| !matches!(w.window, Window::Requests { .. }))
                    .map(|(w, e)| ReservedWindow {
                        field: w.field,
                        window: w.window,
                        reserved: e.reserved,
                        period_start: e.period_start,
                    })
                    .collect();
                (!windows.is_empty()).then(|| Reserved {
                    store: *place,
                    rule: plan.rule.clone(),
                    key: plan.key.clone(),
                    windows,
                })
            })
            .collect();
        move_keys(decision, first_planned, plans);
        if !entries.is_empty() {
            decision.reservation = Some(Reservation {
                prompt_tokens,
                price,
                entries,
            });
        }
        Vec::new()
    }

    /// Refunds every charged plan (all its windows) of a refused request:
    /// in memory now; the Redis ones are returned, for the caller to send.
    fn refund(&self, plans: &[Plan], slots: &[Slot], now_ms: u64) -> Vec<Adjustment> {
        let mut redis: Vec<Adjustment> = Vec::new();
        for (plan, slot) in plans.iter().zip(slots) {
            let Slot::Evaluated(place, eval) = slot else {
                continue;
            };
            if !eval.charged {
                continue;
            }
            let adjustment = Adjustment {
                rule: plan.rule.name.clone(),
                key: plan.key.clone(),
                windows: plan
                    .windows
                    .iter()
                    .zip(&eval.windows)
                    .map(|(w, e)| AdjustWindow {
                        field: w.field,
                        window: w.window,
                        delta: -(e.reserved as i64),
                        period_start: e.period_start,
                    })
                    .collect(),
            };
            match place {
                Where::Memory => self.memory_adjust(&[adjustment], 1, now_ms),
                Where::Local(d) => self.local.adjust(&[adjustment], *d, now_ms),
                Where::Redis => redis.push(adjustment),
            }
        }
        redis
    }

    fn memory_adjust(&self, adjustments: &[Adjustment], divisor: u64, now_ms: u64) {
        if let Primary::Memory(m) = &self.primary {
            m.adjust(adjustments, divisor, now_ms);
        }
    }

    /// Corrects a reservation with the call's real usage: token windows by
    /// `input + output − reserved` tokens, budgets by the real cost minus
    /// the reserved cost. Pass what was really consumed: for a stream cut
    /// short, the tokens streamed so far (never less), so a disconnect is
    /// not refunded below what was served. `Usage::default()` releases the
    /// whole reservation (the backend was never reached).
    pub async fn reconcile(
        &self,
        reservation: Reservation,
        usage: Usage,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let tokens = usage.input_tokens.saturating_add(usage.output_tokens);
        let cost = reservation
            .price
            .map_or(0, |p| p.cost_nanos(usage.input_tokens, usage.output_tokens));
        let mut redis: Vec<Adjustment> = Vec::new();
        for entry in reservation.entries {
            let windows: Vec<AdjustWindow> = entry
                .windows
                .iter()
                .filter_map(|w| {
                    let actual = match w.window {
                        Window::Tokens { .. } => tokens,
                        Window::Cost { .. } => cost,
                        Window::Requests { .. } => return None,
                    };
                    let delta = i64::try_from(actual).unwrap_or(i64::MAX)
                        - i64::try_from(w.reserved).unwrap_or(i64::MAX);
                    (delta != 0).then_some(AdjustWindow {
                        field: w.field,
                        window: w.window,
                        delta,
                        period_start: w.period_start,
                    })
                })
                .collect();
            if windows.is_empty() {
                continue;
            }
            let adjustment = Adjustment {
                rule: entry.rule.name.clone(),
                key: entry.key,
                windows,
            };
            match entry.store {
                Where::Memory => self.memory_adjust(&[adjustment], 1, now_ms),
                Where::Local(d) => self.local.adjust(&[adjustment], d, now_ms),
                Where::Redis => redis.push(adjustment),
            }
        }
        match (&self.primary, redis.is_empty()) {
            (Primary::Redis(r), false) => r.adjust(&redis, now_ms).await,
            _ => Ok(()),
        }
    }

    /// One key's usage of a rule (`key` as shown in outcomes and status,
    /// e.g. `alice` or `alice|chat`), with the windows of `tier` (`None`:
    /// the rule's base `limits`). Nothing is charged.
    pub async fn usage(
        &self,
        rule: &Arc<RateLimitRule>,
        key: &str,
        tier: Option<&str>,
        now_ms: u64,
    ) -> Result<Vec<WindowUsage>, StoreError> {
        let windows = match tier {
            Some(t) => rule.windows_for(t).unwrap_or(&[]),
            None => &rule.limits[..],
        };
        let plan = Plan {
            rule: rule.clone(),
            key: key.to_string(),
            enforce: true,
            windows: windows
                .iter()
                .map(|w| PlanWindow {
                    field: w.field(),
                    window: *w,
                    amount: 0,
                })
                .collect(),
        };
        let evals = match &self.primary {
            Primary::Memory(m) => m.peek(&plan, 1, now_ms),
            Primary::Redis(r) => r.peek(&plan, now_ms).await?,
        };
        Ok(plan
            .windows
            .iter()
            .zip(evals)
            .map(|(w, e)| {
                let limit = match w.window {
                    Window::Requests { limit, .. } | Window::Tokens { limit, .. } => limit,
                    Window::Cost { nanos, .. } => nanos,
                };
                let capacity = math::Params::of(&w.window, 1).max_reserve();
                WindowUsage {
                    window: w.window,
                    limit,
                    used: capacity.saturating_sub(e.remaining),
                    remaining: e.remaining,
                    reset_secs: e.reset_ms.div_ceil(1000),
                }
            })
            .collect())
    }

    /// The `n` keys that used most of `rule`'s first budget (`cost_usd`)
    /// window in the current period, largest first. In memory, a rule
    /// without a budget is ranked by its first window instead (through
    /// Redis only budgets keep a ranking).
    pub async fn top(
        &self,
        rule: &Arc<RateLimitRule>,
        n: usize,
        now_ms: u64,
    ) -> Result<Vec<TopEntry>, StoreError> {
        let window = rule
            .limits
            .iter()
            .find(|w| matches!(w, Window::Cost { .. }))
            .or_else(|| rule.limits.first());
        let Some(window) = window.copied() else {
            return Ok(Vec::new());
        };
        let params = math::Params::of(&window, 1);
        let field = window.field();
        let ranked = match &self.primary {
            Primary::Memory(m) => m.top(&rule.name, field, &params, n, now_ms),
            Primary::Redis(r) => r.top(&rule.name, field, &params, n, now_ms).await?,
        };
        let per_count = match params {
            math::Params::Gcra { per_ticks, .. } => per_ticks,
            math::Params::Calendar { .. } => 1,
        };
        Ok(ranked
            .into_iter()
            .map(|(key, used)| TopEntry {
                key,
                used: used.div_ceil(per_count.max(1)),
                window,
            })
            .collect())
    }

    /// Number of (rule, key) entries held in this process (the primary
    /// memory store and the local fallback), for metrics.
    pub fn local_entries(&self) -> usize {
        let primary = match &self.primary {
            Primary::Memory(m) => m.len(),
            Primary::Redis(_) => 0,
        };
        primary + self.local.len()
    }
}

/// Moves each plan's key to its outcome (`first`: the first plan's).
fn move_keys(decision: &mut Decision, first: usize, plans: &mut [Plan]) {
    for (o, plan) in decision.outcomes[first..].iter_mut().zip(plans) {
        o.key = std::mem::take(&mut plan.key);
    }
}

/// The plans of one request, with what their amounts were computed from.
struct Planned {
    plans: PerRule<Plan>,
    /// The prompt estimate, ⌈prompt characters / 4⌉.
    prompt_tokens: u64,
    price: Option<Price>,
}

enum Slot {
    Evaluated(Where, RuleEval),
    Failed(StoreError),
}

/// The headers: the enforcing request or token window with the least
/// remaining (ties: the longer reset), or for a refusal the window that
/// refused it; `RateLimit-Policy` lists every such window.
fn headers(plans: &[Plan], slots: &[Slot], refused_by: Option<usize>) -> Option<RateHeaders> {
    struct Item<'a> {
        rule: &'a str,
        window: &'a Window,
        limit: u64,
        eval: &'a Eval,
        plan: usize,
    }
    /// `rule:1m` or `rule:tokens:1m` (the length as `format_duration`
    /// writes it, without allocating).
    fn name(out: &mut String, it: &Item<'_>) {
        out.push_str(it.rule);
        let per = match it.window {
            Window::Tokens { per, .. } => {
                out.push_str(":tokens:");
                per
            }
            Window::Requests { per, .. } => {
                out.push(':');
                per
            }
            Window::Cost { .. } => return,
        };
        // In u64: a u128 remainder is a library call.
        let ms = u64::try_from(per.as_millis()).unwrap_or(u64::MAX);
        let unit = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1_000, "s"),
        ]
        .into_iter()
        .find(|(scale, _)| ms % scale == 0);
        match unit {
            Some((scale, unit)) => {
                push_u64(out, ms / scale);
                out.push_str(unit);
            }
            None => {
                push_u64(out, ms);
                out.push_str("ms");
            }
        }
    }
    let mut items: SmallVec<[Item<'_>; 6]> = SmallVec::new();
    for (i, (plan, slot)) in plans.iter().zip(slots).enumerate() {
        let Slot::Evaluated(place, eval) = slot else {
            continue;
        };
        if !plan.enforce {
            continue;
        }
        // The `local` fallback enforces limit ÷ expected_replicas: report
        // the limit in force, consistent with the remaining count.
        let divisor = match place {
            Where::Local(d) => (*d).max(1),
            Where::Memory | Where::Redis => 1,
        };
        for (w, e) in plan.windows.iter().zip(&eval.windows) {
            let limit = match w.window {
                Window::Requests { limit, .. } | Window::Tokens { limit, .. } => {
                    (limit / divisor).max(1)
                }
                Window::Cost { .. } => continue,
            };
            items.push(Item {
                rule: &plan.rule.name,
                window: &w.window,
                limit,
                eval: e,
                plan: i,
            });
        }
    }
    let least = |items: &'_ [Item<'_>]| -> Option<usize> {
        (0..items.len())
            .min_by_key(|&j| (items[j].eval.remaining, u64::MAX - items[j].eval.reset_ms))
    };
    let chosen = match refused_by {
        Some(p) => (0..items.len())
            .filter(|&j| items[j].plan == p && !items[j].eval.allowed)
            .max_by_key(|&j| items[j].eval.wait_ms)
            .or_else(|| least(&items)),
        None => least(&items),
    }?;
    // Both texts in one buffer, with room for the three numbers that
    // `into_values` writes after them.
    let mut policy = String::with_capacity(48 * items.len() + 48 + 60);
    for (j, it) in items.iter().enumerate() {
        if j > 0 {
            policy.push_str(", ");
        }
        policy.push('"');
        name(&mut policy, it);
        let per = match it.window {
            Window::Requests { per, .. } | Window::Tokens { per, .. } => per.as_secs(),
            Window::Cost { .. } => 0,
        };
        policy.push_str("\";q=");
        push_u64(&mut policy, it.limit);
        policy.push_str(";w=");
        push_u64(&mut policy, per);
        if matches!(it.window, Window::Tokens { .. }) {
            policy.push_str(";qu=\"tokens\"");
        }
    }
    let it = items.get(chosen)?;
    let reset_secs = it.eval.reset_ms.div_ceil(1000);
    let policy_len = policy.len();
    let mut text = policy;
    text.push('"');
    name(&mut text, it);
    text.push_str("\";r=");
    push_u64(&mut text, it.eval.remaining);
    text.push_str(";t=");
    push_u64(&mut text, reset_secs);
    Some(RateHeaders {
        limit: it.limit,
        remaining: it.eval.remaining,
        reset_secs,
        text,
        policy_len,
    })
}

/// The rule's key for a request: its parts joined with `|`.
pub fn rule_key(rule: &RateLimitRule, req: &LimitRequest<'_>) -> String {
    let mut out = String::with_capacity(48);
    for (i, part) in rule.key.iter().enumerate() {
        if i > 0 {
            out.push('|');
        }
        let value: Option<&str> = match part {
            KeyPart::Global => Some("global"),
            KeyPart::Ip => {
                match req.identity.ip {
                    Some(ip) => crate::text::push_ip(&mut out, ip),
                    None => out.push('-'),
                }
                continue;
            }
            KeyPart::User => req.identity.user.as_deref(),
            KeyPart::Tier => Some(req.identity.tier.as_str()),
            KeyPart::Route => Some(req.route),
            KeyPart::Model => req.llm.and_then(|l| l.model.as_deref()),
            KeyPart::Header(name) => req
                .headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty()),
        };
        match value {
            Some(v) => push_escaped(&mut out, &bounded(v)),
            None => out.push('-'),
        }
    }
    out
}

fn push_escaped(out: &mut String, value: &str) {
    if !value.bytes().any(|b| b == b'|' || b == b'%') {
        out.push_str(value);
        return;
    }
    for c in value.chars() {
        match c {
            '|' => out.push_str("%7C"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
}

/// Long or odd values become `h:` + 32 hex digits of their SHA-256.
fn bounded(value: &str) -> std::borrow::Cow<'_, str> {
    use sha2::{Digest, Sha256};
    if value.len() <= crate::policy::identity::MAX_IDENTITY_LEN
        && !value.chars().any(char::is_control)
    {
        return value.into();
    }
    let digest = Sha256::digest(value.as_bytes());
    let mut out = String::from("h:");
    for b in &digest[..16] {
        out.push_str(&format!("{b:02x}"));
    }
    out.into()
}

#[cfg(test)]
mod tests;
