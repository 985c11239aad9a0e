//! Metrics of downstream connections: how many are open, the cap, and the
//! connections floodwall closed itself before a request reached a route.
//! Labels: fixed reasons only.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// The `reason` label values of `floodwall_connections_refused_total`.
pub const REASONS: [&str; 3] = ["connection_limit", "header_too_large", "header_timeout"];

pub struct ConnectionMetrics {
    /// Client connections open on the proxy listeners (returns to 0).
    pub active: IntGauge,
    /// The cap in force (`server.max_connections`, or the derived default).
    pub limit: IntGauge,
    /// Connections closed by a guard, by reason: `connection_limit`,
    /// `header_too_large`, `header_timeout`.
    pub refused: IntCounterVec,
}

impl ConnectionMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let m = ConnectionMetrics {
            active: IntGauge::with_opts(Opts::new(
                "floodwall_connections_active",
                "Client connections open on the proxy listeners",
            ))?,
            limit: IntGauge::with_opts(Opts::new(
                "floodwall_connections_limit",
                "The maximum number of client connections (server.max_connections or its default)",
            ))?,
            refused: IntCounterVec::new(
                Opts::new(
                    "floodwall_connections_refused_total",
                    "Client connections closed by floodwall before a request was routed, by reason \
                     (connection_limit, header_too_large, header_timeout)",
                ),
                &["reason"],
            )?,
        };
        // Exported from the start (at 0), so that rates and alerts see them.
        for reason in REASONS {
            m.refused.with_label_values(&[reason]);
        }
        Ok(m)
    }

    pub fn register(&self, r: &Registry) -> Result<(), prometheus::Error> {
        r.register(Box::new(self.active.clone()))?;
        r.register(Box::new(self.limit.clone()))?;
        r.register(Box::new(self.refused.clone()))?;
        Ok(())
    }
}
