//! [`Gradient`]: an adaptive in-flight limit for one backend
//! (`backends.<name>.limits.adaptive`), in the style of Envoy's adaptive
//! concurrency filter and Netflix's gradient limiter: when the backend's
//! latency rises above what it was when it was healthy, the number of calls
//! floodwall lets run at once shrinks; when latency is back near its
//! baseline and the limit is in use, it grows again.
//!
//! **Samples.** Each call that got a response header (or timed out waiting
//! for one) reports its time to that header. A streaming answer's length
//! depends on how much the model writes, so its total time says nothing
//! about load; its first byte does.
//!
//! **Every `window`**, closed by the first sample that arrives after it
//! ends (so an idle backend never moves) once it holds at least
//! [`MIN_SAMPLES`] samples (a slow backend at a low limit gets longer
//! windows rather than none):
//!
//! - `sample` = the mean time to header over the window;
//! - `baseline` = the lowest `sample` seen, allowed to creep up by
//!   [`BASELINE_DRIFT`] a window, so that a backend that became slower for
//!   good is eventually taken as it is (about 41 windows to accept 1.5× at
//!   1% a window) instead of being throttled forever;
//! - `gradient` = `tolerance × baseline ÷ sample`, kept within 0.5..=1.0:
//!   at most a halving per window;
//! - `limit` = `limit × gradient`, plus `√limit` of headroom when the
//!   gradient is 1 and at some point in the window at least half the limit
//!   was running (a limit the traffic never reaches is not raised);
//! - kept within `min..=max`. The limit starts at `max`.
//!
//! Pure: time comes in as `now`; the pacer calls it under its lock.

use std::time::{Duration, Instant};

/// A window closes only once it holds this many samples.
pub const MIN_SAMPLES: u32 = 3;
/// How far the baseline may rise in one window.
pub const BASELINE_DRIFT: f64 = 0.01;

/// `backends.<name>.limits.adaptive`, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptiveConfig {
    pub min: u32,
    pub max: u32,
    pub window: Duration,
    /// How much slower than its baseline the backend may get before the
    /// limit shrinks, in hundredths (150 = 1.5×).
    pub tolerance_pct: u32,
}

/// The controller's state.
#[derive(Debug, Clone)]
pub struct Gradient {
    config: AdaptiveConfig,
    limit: f64,
    /// Seconds.
    baseline: Option<f64>,
    window_start: Instant,
    sum: f64,
    count: u32,
    /// The most calls running at once during the window.
    peak_in_flight: u32,
}

/// What one window changed, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowReport {
    pub sample: Duration,
    pub baseline: Duration,
    pub gradient: f64,
    pub limit: u32,
}

impl Gradient {
    pub fn new(config: AdaptiveConfig, now: Instant) -> Self {
        Gradient {
            config,
            limit: f64::from(config.max),
            baseline: None,
            window_start: now,
            sum: 0.0,
            count: 0,
            peak_in_flight: 0,
        }
    }

    /// The limit in force: calls that may run at once.
    pub fn limit(&self) -> u32 {
        // The float stays within min..=max, both u32.
        (self.limit.floor() as u32).clamp(self.config.min, self.config.max)
    }

    pub fn config(&self) -> AdaptiveConfig {
        self.config
    }

    /// New settings from a reload: the limit carries over, within the new
    /// bounds; the baseline is kept.
    pub fn reconfigure(&mut self, config: AdaptiveConfig) {
        self.config = config;
        self.limit = self
            .limit
            .clamp(f64::from(config.min), f64::from(config.max));
    }

    /// A call started with `in_flight` calls running (itself included).
    pub fn started(&mut self, in_flight: u32) {
        self.peak_in_flight = self.peak_in_flight.max(in_flight);
    }

    /// A call's time to its response header, with `in_flight` calls running
    /// now. Closes the window when it is over, and returns what that window
    /// did.
    pub fn record(
        &mut self,
        latency: Duration,
        in_flight: u32,
        now: Instant,
    ) -> Option<WindowReport> {
        self.sum += latency.as_secs_f64();
        self.count += 1;
        self.peak_in_flight = self.peak_in_flight.max(in_flight);
        if now.saturating_duration_since(self.window_start) < self.config.window
            || self.count < MIN_SAMPLES
        {
            return None;
        }
        let report = self.close_window();
        self.window_start = now;
        self.sum = 0.0;
        self.count = 0;
        self.peak_in_flight = in_flight;
        report
    }

    fn close_window(&mut self) -> Option<WindowReport> {
        let sample = self.sum / f64::from(self.count);
        let baseline = match self.baseline {
            None => sample,
            Some(b) => (b * (1.0 + BASELINE_DRIFT)).min(sample),
        };
        self.baseline = Some(baseline);
        let tolerance = f64::from(self.config.tolerance_pct) / 100.0;
        let gradient = if sample > 0.0 {
            (tolerance * baseline / sample).clamp(0.5, 1.0)
        } else {
            1.0
        };
        let mut limit = self.limit * gradient;
        if gradient >= 1.0 && f64::from(self.peak_in_flight) * 2.0 >= self.limit {
            limit += self.limit.sqrt().max(1.0);
        }
        self.limit = limit.clamp(f64::from(self.config.min), f64::from(self.config.max));
        Some(WindowReport {
            sample: Duration::from_secs_f64(sample),
            baseline: Duration::from_secs_f64(baseline),
            gradient,
            limit: self.limit(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn config() -> AdaptiveConfig {
        AdaptiveConfig {
            min: 2,
            max: 40,
            window: Duration::from_secs(1),
            tolerance_pct: 150,
        }
    }

    /// One window of `n` calls of `latency` each, with `in_flight` running
    /// at the busiest moment; the clock advances by a window.
    fn window(
        g: &mut Gradient,
        now: &mut Instant,
        n: u32,
        latency: Duration,
        in_flight: u32,
    ) -> Option<WindowReport> {
        g.started(in_flight);
        // The n-th sample lands on the window's end and closes it.
        let step = g.config().window / n;
        let mut last = None;
        for _ in 0..n {
            *now += step;
            last = g.record(latency, 0, *now).or(last);
        }
        last
    }

    #[test]
    fn starts_at_max_and_stays_there_while_latency_is_flat() {
        let mut now = Instant::now();
        let mut g = Gradient::new(config(), now);
        assert_eq!(g.limit(), 40);
        for _ in 0..10 {
            window(&mut g, &mut now, 20, 100 * MS, 40);
        }
        assert_eq!(g.limit(), 40);
    }

    #[test]
    fn rising_latency_shrinks_the_limit_at_most_by_half_a_window_down_to_min() {
        let mut now = Instant::now();
        let mut g = Gradient::new(config(), now);
        window(&mut g, &mut now, 20, 100 * MS, 40); // baseline 100 ms
                                                    // 1.5x is within tolerance: no change.
        window(&mut g, &mut now, 20, 150 * MS, 40);
        assert_eq!(g.limit(), 40);
        // 3x: gradient 1.5 x 102.01 / 300 (the baseline has drifted 1% a
        // window for two windows).
        let r = window(&mut g, &mut now, 20, 300 * MS, 40).expect("a window closed");
        assert!((r.gradient - 1.5 * 102.01 / 300.0).abs() < 1e-9, "{r:?}");
        assert_eq!(r.baseline, Duration::from_micros(102_010));
        assert_eq!(g.limit(), 20);
        // 10x: still at most halved each window, never below min.
        let mut limits = Vec::new();
        for _ in 0..6 {
            window(&mut g, &mut now, 20, 1000 * MS, 40);
            limits.push(g.limit());
        }
        assert_eq!(limits, [10, 5, 2, 2, 2, 2]);
    }

    #[test]
    fn recovered_latency_grows_the_limit_back_when_it_is_used() {
        let mut now = Instant::now();
        let mut g = Gradient::new(config(), now);
        window(&mut g, &mut now, 20, 100 * MS, 40);
        for _ in 0..5 {
            window(&mut g, &mut now, 20, 1000 * MS, 40);
        }
        assert_eq!(g.limit(), 2);
        // Back to normal, with every place taken: +sqrt(limit) a window.
        let mut limits = Vec::new();
        for _ in 0..12 {
            let used = g.limit();
            window(&mut g, &mut now, 20, 100 * MS, used);
            limits.push(g.limit());
        }
        assert!(limits.windows(2).all(|w| w[1] >= w[0]), "{limits:?}");
        assert_eq!(limits.last(), Some(&40), "{limits:?}");
        assert_eq!(limits[0], 3, "2 + sqrt(2)");
    }

    #[test]
    fn an_unused_limit_is_not_raised() {
        let mut now = Instant::now();
        let mut g = Gradient::new(config(), now);
        window(&mut g, &mut now, 20, 100 * MS, 40);
        window(&mut g, &mut now, 20, 300 * MS, 40);
        assert_eq!(g.limit(), 20);
        // Fast again, but only 3 calls ever run at once.
        for _ in 0..5 {
            window(&mut g, &mut now, 20, 100 * MS, 3);
        }
        assert_eq!(g.limit(), 20);
    }

    #[test]
    fn a_window_waits_for_enough_samples_and_idle_time_changes_nothing() {
        let mut now = Instant::now();
        let mut g = Gradient::new(config(), now);
        window(&mut g, &mut now, 20, 100 * MS, 40);
        // Two slow samples, then a long pause: not enough to judge.
        for _ in 0..2 {
            now += Duration::from_millis(500);
            assert_eq!(g.record(1000 * MS, 40, now), None);
        }
        now += Duration::from_secs(3600);
        assert_eq!(g.limit(), 40);
        // The third closes the window: the backend is 10x slower.
        let r = g.record(1000 * MS, 40, now).expect("the window closed");
        assert_eq!(r.sample, 1000 * MS);
        assert_eq!(g.limit(), 20);
    }

    #[test]
    fn a_backend_slower_for_good_is_eventually_accepted() {
        let mut now = Instant::now();
        let mut g = Gradient::new(config(), now);
        window(&mut g, &mut now, 20, 100 * MS, 40);
        // 2x the baseline, forever, with the limit in use.
        let mut windows = 0;
        while g.limit() < 40 || windows < 2 {
            let used = g.limit();
            window(&mut g, &mut now, 20, 200 * MS, used);
            windows += 1;
            assert!(windows < 200, "never recovered: limit {}", g.limit());
        }
        // ln(2/1.5)/ln(1.01) = 29 windows of drift, then growth.
        assert!(windows > 25, "recovered after {windows} windows");
    }

    #[test]
    fn a_reload_keeps_the_limit_within_the_new_bounds() {
        let mut now = Instant::now();
        let mut g = Gradient::new(config(), now);
        window(&mut g, &mut now, 20, 100 * MS, 40);
        window(&mut g, &mut now, 20, 300 * MS, 40);
        assert_eq!(g.limit(), 20);
        g.reconfigure(AdaptiveConfig {
            max: 10,
            ..config()
        });
        assert_eq!(g.limit(), 10);
        g.reconfigure(AdaptiveConfig {
            min: 15,
            max: 50,
            ..config()
        });
        assert_eq!(g.limit(), 15);
    }
}
