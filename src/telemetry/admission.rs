//! Metrics of the stream limits, the concurrency limits and their queue.
//! Labels: route names, class names (from the policy file), fixed causes.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

pub struct AdmissionMetrics {
    /// Open streams by route (returns to exactly 0 when they end).
    pub streams_active: IntGaugeVec,
    pub stream_duration: HistogramVec,
    pub stream_disconnects: IntCounterVec,
    pub stream_timeouts: IntCounterVec,
    /// Time to the first response byte of a stream, by route.
    pub stream_ttfb: HistogramVec,
    pub in_flight: IntGaugeVec,
    /// Requests of shared routes by lease state (leased, local, waiting).
    pub shared_slots: IntGaugeVec,
    pub queue_depth: IntGaugeVec,
    pub queued_seconds: HistogramVec,
    /// Requests refused by admission, by route and cause.
    pub sheds: IntCounterVec,
    /// The adaptive in-flight cap of a backend (`limits.adaptive`).
    pub adaptive_limit: IntGaugeVec,
}

impl AdmissionMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let secs = vec![
            0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
            1800.0,
        ];
        Ok(AdmissionMetrics {
            streams_active: IntGaugeVec::new(
                Opts::new(
                    "floodwall_streams_active",
                    "Open streaming responses, by route",
                ),
                &["route"],
            )?,
            stream_duration: HistogramVec::new(
                HistogramOpts::new(
                    "floodwall_stream_duration_seconds",
                    "Duration of streaming responses, by route",
                )
                .buckets(secs.clone()),
                &["route"],
            )?,
            stream_disconnects: IntCounterVec::new(
                Opts::new(
                    "floodwall_stream_disconnects_total",
                    "Streams whose client left before the end, by route",
                ),
                &["route"],
            )?,
            stream_timeouts: IntCounterVec::new(
                Opts::new(
                    "floodwall_stream_timeouts_total",
                    "Streams ended by max_duration or idle, by route and kind",
                ),
                &["route", "kind"],
            )?,
            stream_ttfb: HistogramVec::new(
                HistogramOpts::new(
                    "floodwall_stream_ttfb_seconds",
                    "Time to the first byte of a streaming response, by route",
                )
                .buckets(secs.clone()),
                &["route"],
            )?,
            in_flight: IntGaugeVec::new(
                Opts::new(
                    "floodwall_route_in_flight",
                    "Requests holding a concurrency slot, by route",
                ),
                &["route"],
            )?,
            shared_slots: IntGaugeVec::new(
                Opts::new(
                    "floodwall_route_shared_slots",
                    "Requests of routes with a cap across replicas, by route and lease state \
                     (leased, local: running without a lease while Redis is away, waiting: for a lease)",
                ),
                &["route", "state"],
            )?,
            queue_depth: IntGaugeVec::new(
                Opts::new(
                    "floodwall_queue_depth",
                    "Requests waiting in the admission queue, by route and class",
                ),
                &["route", "class"],
            )?,
            queued_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "floodwall_queue_wait_seconds",
                    "Time spent in the admission queue, by route",
                )
                .buckets(secs),
                &["route"],
            )?,
            sheds: IntCounterVec::new(
                Opts::new(
                    "floodwall_admission_rejections_total",
                    "Requests refused by stream or concurrency limits, by route and cause",
                ),
                &["route", "cause"],
            )?,
            adaptive_limit: IntGaugeVec::new(
                Opts::new(
                    "floodwall_backend_adaptive_limit",
                    "The adaptive in-flight limit of a backend (limits.adaptive), by backend",
                ),
                &["backend"],
            )?,
        })
    }

    pub fn register(&self, r: &Registry) -> Result<(), prometheus::Error> {
        r.register(Box::new(self.streams_active.clone()))?;
        r.register(Box::new(self.stream_duration.clone()))?;
        r.register(Box::new(self.stream_disconnects.clone()))?;
        r.register(Box::new(self.stream_timeouts.clone()))?;
        r.register(Box::new(self.stream_ttfb.clone()))?;
        r.register(Box::new(self.in_flight.clone()))?;
        r.register(Box::new(self.shared_slots.clone()))?;
        r.register(Box::new(self.queue_depth.clone()))?;
        r.register(Box::new(self.queued_seconds.clone()))?;
        r.register(Box::new(self.sheds.clone()))?;
        r.register(Box::new(self.adaptive_limit.clone()))?;
        Ok(())
    }
}
