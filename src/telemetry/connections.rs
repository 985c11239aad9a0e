//! Metrics of downstream connections: how many are open, the cap, and the
//! connections floodwall closed itself before a request reached a route.
//! Labels: fixed reasons only.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

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
        Ok(ConnectionMetrics {
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
        })
    }

    pub fn register(&self, r: &Registry) -> Result<(), prometheus::Error> {
        r.register(Box::new(self.active.clone()))?;
        r.register(Box::new(self.limit.clone()))?;
        r.register(Box::new(self.refused.clone()))?;
        Ok(())
    }
}
