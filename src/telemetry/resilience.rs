//! Metrics of the retry, circuit-breaker and fallback policies.
//!
//! Labels are bounded by the policy file: route names, backend names,
//! breaker keys (`backend/<name>`, `endpoint/<name>/<url>`), fallback target
//! names, and fixed reason strings. Never a user, a raw path or a status
//! beyond the configured ones.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

pub mod names {
    pub const RETRIES: &str = "floodwall_retries_total";
    pub const RETRY_GIVEUPS: &str = "floodwall_retry_giveups_total";
    pub const ATTEMPTS: &str = "floodwall_attempts_per_request";
    pub const FALLBACKS: &str = "floodwall_fallbacks_total";
    pub const CIRCUIT_STATE: &str = "floodwall_circuit_state";
    pub const CIRCUIT_TRANSITIONS: &str = "floodwall_circuit_transitions_total";
    pub const CIRCUIT_REJECTIONS: &str = "floodwall_circuit_rejections_total";
}

pub struct ResilienceMetrics {
    /// Retries made, by route and the failure that caused them.
    pub retries: IntCounterVec,
    /// Why retrying stopped, by route (`attempts_exhausted`, `budget_exhausted`...).
    pub giveups: IntCounterVec,
    /// Attempts per request (1 = no retry), by route.
    pub attempts: HistogramVec,
    /// Fallback targets used, by route and target.
    pub fallbacks: IntCounterVec,
    /// 0 closed, 1 half-open, 2 open, by breaker key.
    pub circuit_state: IntGaugeVec,
    /// Breaker transitions, by breaker key and the state entered.
    pub circuit_transitions: IntCounterVec,
    /// Requests not sent because a backend's breaker (or all its endpoints') was open.
    pub circuit_rejections: IntCounterVec,
}

impl ResilienceMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(ResilienceMetrics {
            retries: IntCounterVec::new(
                Opts::new(
                    names::RETRIES,
                    "Retries made, by route and the failure that caused them",
                ),
                &["route", "reason"],
            )?,
            giveups: IntCounterVec::new(
                Opts::new(
                    names::RETRY_GIVEUPS,
                    "Why retrying stopped after a retryable failure, by route",
                ),
                &["route", "why"],
            )?,
            attempts: HistogramVec::new(
                HistogramOpts::new(
                    names::ATTEMPTS,
                    "Upstream attempts per proxied request, by route",
                )
                .buckets(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]),
                &["route"],
            )?,
            fallbacks: IntCounterVec::new(
                Opts::new(
                    names::FALLBACKS,
                    "Fallback targets used, by route and target",
                ),
                &["route", "target"],
            )?,
            circuit_state: IntGaugeVec::new(
                Opts::new(
                    names::CIRCUIT_STATE,
                    "Circuit breaker state: 0 closed, 1 half-open, 2 open",
                ),
                &["breaker"],
            )?,
            circuit_transitions: IntCounterVec::new(
                Opts::new(
                    names::CIRCUIT_TRANSITIONS,
                    "Circuit breaker transitions, by the state entered",
                ),
                &["breaker", "to"],
            )?,
            circuit_rejections: IntCounterVec::new(
                Opts::new(
                    names::CIRCUIT_REJECTIONS,
                    "Requests short-circuited by an open breaker, by backend",
                ),
                &["backend"],
            )?,
        })
    }

    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.retries.clone()))?;
        registry.register(Box::new(self.giveups.clone()))?;
        registry.register(Box::new(self.attempts.clone()))?;
        registry.register(Box::new(self.fallbacks.clone()))?;
        registry.register(Box::new(self.circuit_state.clone()))?;
        registry.register(Box::new(self.circuit_transitions.clone()))?;
        registry.register(Box::new(self.circuit_rejections.clone()))?;
        Ok(())
    }

    pub fn inc(vec: &IntCounterVec, labels: &[&str]) {
        if let Ok(c) = vec.get_metric_with_label_values(labels) {
            c.inc();
        }
    }
}
