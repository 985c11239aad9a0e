//! Metrics of the response cache. Labels: route names (from the policy
//! file), fixed results, tiers and operations.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

pub struct CacheMetrics {
    /// Responses of cached routes by `x-cache` result (hit, miss, bypass, stale).
    pub requests: IntCounterVec,
    /// Entries written, by route.
    pub stores: IntCounterVec,
    /// Misses answered by another request's upstream call, by route.
    pub collapsed: IntCounterVec,
    /// Memory-tier entries evicted to make room, by route.
    pub evictions: IntCounterVec,
    /// Cache-store failures (each one a miss or a skipped write), by route, tier and operation.
    pub errors: IntCounterVec,
    /// Memory-tier entries and bytes, by route (refreshed at scrape time).
    pub entries: IntGaugeVec,
    pub bytes: IntGaugeVec,
}

impl CacheMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(CacheMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "floodwall_cache_requests_total",
                    "Responses of cached routes, by route and result (hit, miss, bypass, stale)",
                ),
                &["route", "result"],
            )?,
            stores: IntCounterVec::new(
                Opts::new(
                    "floodwall_cache_stores_total",
                    "Cache entries written, by route",
                ),
                &["route"],
            )?,
            collapsed: IntCounterVec::new(
                Opts::new(
                    "floodwall_cache_collapsed_total",
                    "Misses served by an identical request's upstream call, by route",
                ),
                &["route"],
            )?,
            evictions: IntCounterVec::new(
                Opts::new(
                    "floodwall_cache_evictions_total",
                    "Memory-tier entries evicted to make room, by route",
                ),
                &["route"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "floodwall_cache_errors_total",
                    "Cache store failures (treated as misses), by route, tier and operation",
                ),
                &["route", "tier", "op"],
            )?,
            entries: IntGaugeVec::new(
                Opts::new(
                    "floodwall_cache_entries",
                    "Entries in the memory tier, by route",
                ),
                &["route"],
            )?,
            bytes: IntGaugeVec::new(
                Opts::new(
                    "floodwall_cache_bytes",
                    "Bytes held by the memory tier, by route",
                ),
                &["route"],
            )?,
        })
    }

    pub fn register(&self, r: &Registry) -> Result<(), prometheus::Error> {
        r.register(Box::new(self.requests.clone()))?;
        r.register(Box::new(self.stores.clone()))?;
        r.register(Box::new(self.collapsed.clone()))?;
        r.register(Box::new(self.evictions.clone()))?;
        r.register(Box::new(self.errors.clone()))?;
        r.register(Box::new(self.entries.clone()))?;
        r.register(Box::new(self.bytes.clone()))?;
        Ok(())
    }

    pub fn inc(vec: &IntCounterVec, labels: &[&str]) {
        if let Ok(c) = vec.get_metric_with_label_values(labels) {
            c.inc();
        }
    }
}
