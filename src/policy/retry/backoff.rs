//! Back-off arithmetic: how long to wait before retry number `n`.
//!
//! The nominal delay is `base × factor^(n-1)`, capped at `max`. Jitter then
//! spreads it so that many clients failing together do not retry together:
//! - `full` (the default): uniform in `[0, d]`, the "full jitter" of AWS's
//!   back-off study, which spreads retries best;
//! - `none`: exactly `d`;
//! - `N%`: `d` plus up to N% of `d` (`10%`: uniform in `[d, 1.1 d]`), for
//!   plans that ask for "up to 10% jitter".
//!
//! Randomness comes in as a `u64` from the caller (any uniform source), so
//! the arithmetic is deterministic under test.

use std::time::Duration;

/// How a delay is spread.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Jitter {
    /// Uniform in `[0, d]`.
    Full,
    /// Exactly `d`.
    None,
    /// `d` plus uniform in `[0, fraction × d]`; `fraction` is in `0.0..=1.0`.
    Up(f64),
}

/// Exponential back-off: `base × factor^(n-1)`, capped at `max`, jittered.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    /// At least 1.0.
    pub factor: f64,
    /// The cap on the nominal delay (before jitter and the rate-limit
    /// multiplier).
    pub max: Duration,
    pub jitter: Jitter,
}

impl Backoff {
    /// The delay before retry `retry_number` (1 = the first retry) before
    /// jitter: `base × factor^(n-1)`, at most `max`.
    pub fn nominal(&self, retry_number: u32) -> Duration {
        let exponent = i32::try_from(retry_number.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.base.as_secs_f64() * self.factor.max(1.0).powi(exponent);
        secs_to_duration(secs).min(self.max)
    }
}

/// Applies `jitter` to `d` with the random value `rand`.
pub fn jittered(jitter: Jitter, d: Duration, rand: u64) -> Duration {
    match jitter {
        Jitter::None => d,
        Jitter::Full => scale(d, unit(rand)),
        Jitter::Up(fraction) => d.saturating_add(scale(d, fraction.clamp(0.0, 1.0) * unit(rand))),
    }
}

/// A uniform value in `[0, 1)` from the top 53 bits of `rand`.
pub fn unit(rand: u64) -> f64 {
    (rand >> 11) as f64 / (1u64 << 53) as f64
}

/// `d × k` for a finite, non-negative `k`, saturating.
pub fn scale(d: Duration, k: f64) -> Duration {
    secs_to_duration(d.as_secs_f64() * k)
}

fn secs_to_duration(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(jitter: Jitter) -> Backoff {
        Backoff {
            base: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_secs(10),
            jitter,
        }
    }

    #[test]
    fn nominal_delays_grow_exponentially_up_to_the_cap() {
        let b = backoff(Jitter::None);
        let secs: Vec<u64> = (1..=6).map(|n| b.nominal(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 10, 10]);
        assert_eq!(b.nominal(0), Duration::from_secs(1));
        assert_eq!(b.nominal(u32::MAX), Duration::from_secs(10));
        let flat = Backoff { factor: 1.0, ..b };
        assert_eq!(flat.nominal(5), Duration::from_secs(1));
        let half = Backoff {
            base: Duration::from_millis(500),
            factor: 1.5,
            ..backoff(Jitter::None)
        };
        assert_eq!(half.nominal(3), Duration::from_millis(1125));
    }

    #[test]
    fn full_jitter_stays_within_zero_and_the_delay() {
        let d = Duration::from_secs(4);
        assert_eq!(jittered(Jitter::Full, d, 0), Duration::ZERO);
        assert_eq!(jittered(Jitter::Full, d, 1 << 63), Duration::from_secs(2));
        let top = jittered(Jitter::Full, d, u64::MAX);
        assert!(top <= d && top > Duration::from_millis(3999), "{top:?}");
        let mut seed = 7u64;
        for _ in 0..1000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            assert!(jittered(Jitter::Full, d, seed) <= d);
        }
    }

    #[test]
    fn percent_jitter_adds_up_to_that_share() {
        let d = Duration::from_secs(10);
        assert_eq!(jittered(Jitter::Up(0.1), d, 0), d);
        assert_eq!(
            jittered(Jitter::Up(0.1), d, 1 << 63),
            Duration::from_millis(10_500)
        );
        let top = jittered(Jitter::Up(0.1), d, u64::MAX);
        assert!(top <= Duration::from_secs(11) && top > Duration::from_millis(10_999));
        assert_eq!(jittered(Jitter::None, d, u64::MAX), d);
    }
}
