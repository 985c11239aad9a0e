//! Metrics and logs.
//!
//! - [`metrics`]: the Prometheus families floodwall exports on the admin
//!   listener's `/metrics`, with cheap typed helpers for the proxy's hot path
//!   and the label-cardinality rules every caller must follow.
//! - [`logging`]: the `tracing` subscriber (JSON or text on stderr, filtered
//!   by `RUST_LOG`), the `access` and `audit` log targets, and W3C
//!   `traceparent` parsing for correlating log lines with callers' traces.

pub mod access;
pub mod admission;
pub mod cache;
pub mod connections;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod resilience;
pub mod writer;

pub use metrics::Metrics;
