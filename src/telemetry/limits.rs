//! Metrics of the rate-limit, token and cost rules.
//!
//! Labels: rule and route names (from the policy file), fixed result
//! strings, and a model name only when the price table names it (else
//! `other`), so a client cannot create series. Never an identity.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

pub mod names {
    pub const DECISIONS: &str = "floodwall_ratelimit_decisions_total";
    pub const TOKENS: &str = "floodwall_tokens_total";
    pub const COST: &str = "floodwall_cost_usd_total";
    pub const STORE_DURATION: &str = "floodwall_limiter_store_duration_seconds";
    pub const STORE_ERRORS: &str = "floodwall_limiter_store_errors_total";
}

pub struct LimitMetrics {
    /// Decisions by rule and result (allowed, limited, shadow_limited,
    /// exempt, unlimited, failed_open, local).
    pub decisions: IntCounterVec,
    /// Tokens counted, by route, model and kind (input, output) and whether
    /// they were reported by the backend or estimated.
    pub tokens: IntCounterVec,
    /// Spend in micro-USD... exported as a float counter of USD.
    pub cost: prometheus::CounterVec,
    /// Time of a limiter decision through Redis.
    pub store_duration: HistogramVec,
    /// Store errors by operation (check, reconcile).
    pub store_errors: IntCounterVec,
}

impl LimitMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(LimitMetrics {
            decisions: IntCounterVec::new(
                Opts::new(names::DECISIONS, "Rate-limit decisions by rule and result"),
                &["rule", "result"],
            )?,
            tokens: IntCounterVec::new(
                Opts::new(
                    names::TOKENS,
                    "LLM tokens counted, by route, model and kind",
                ),
                &["route", "model", "kind", "source"],
            )?,
            cost: prometheus::CounterVec::new(
                Opts::new(
                    names::COST,
                    "Spend in USD from token usage and the price table, by route and model",
                ),
                &["route", "model"],
            )?,
            store_duration: HistogramVec::new(
                HistogramOpts::new(
                    names::STORE_DURATION,
                    "Time of a rate-limit decision through Redis",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                ]),
                &["op"],
            )?,
            store_errors: IntCounterVec::new(
                Opts::new(
                    names::STORE_ERRORS,
                    "Redis errors or timeouts seen by the limiter, by operation",
                ),
                &["op"],
            )?,
        })
    }

    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.decisions.clone()))?;
        registry.register(Box::new(self.tokens.clone()))?;
        registry.register(Box::new(self.cost.clone()))?;
        registry.register(Box::new(self.store_duration.clone()))?;
        registry.register(Box::new(self.store_errors.clone()))?;
        Ok(())
    }
}
