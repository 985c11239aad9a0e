//! The counting rules, as pure integer functions of (parameters, stored
//! state, amount, now). The in-memory store calls them directly; the Redis
//! script (`crate::store::redis::SCRIPT`) is a line-by-line transcription,
//! and the Redis integration tests run the same scenarios against both.
//!
//! **Rolling windows (`requests`, `tokens`): GCRA**, written as a leaky
//! bucket with integer units. A window of `limit` per `per` with `burst`
//! counts time in ticks (1 ms, or 1 s for windows over an hour). One request
//! (or token) adds `per_ticks` units to the bucket's level; the level drains
//! by `limit` units per tick; the bucket holds `burst × per_ticks` units. A
//! request of `n` is admitted iff `level + n × per_ticks ≤ capacity`. So:
//! - a fresh key may send `burst` at once (default `burst = limit`), and
//!   after that one more every `per / limit`;
//! - over any interval of length `t` at most `burst + ⌊t × limit / per⌋`
//!   pass. That is the only sense in which it is "per window": in a rolling
//!   window of length `per` a key that first empties its bucket and then
//!   keeps pace with the refill can pass up to `burst + limit` (2× with the
//!   default burst). Combine windows (10/min *and* 100/h) to bound longer
//!   horizons;
//! - every count is exact: there is no sampling and no interpolation. The
//!   only rounding is time, to the tick (a drain of `limit` units per tick
//!   is exact since a request is `per_ticks` units).
//!
//! Because the level is kept in `count × tick` units, its meaning does not
//! depend on `limit`: changing a limit keeps what was consumed, changing
//! `per` is a different counter.
//!
//! **Cost budgets: calendar windows.** The spend (nano-USD) of the current
//! UTC period (hour, day, ISO week or month) plus the period's start; a new
//! period starts from zero. Exact; a request is admitted iff
//! `spent + estimate ≤ budget`.
//!
//! **Reservations larger than the bucket** (a request whose token estimate
//! exceeds the whole budget) reserve the whole bucket, so they pass only when
//! it is untouched, rather than never. Reconciliation then charges what was
//! really used, which can leave the level above the capacity (debt), at most
//! one more bucket.

use crate::config::limits::{CostPeriod, Window};

const DAY_MS: u64 = 86_400_000;
const HOUR_MS: u64 = 3_600_000;

/// A window's numbers in integer units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Params {
    Gcra {
        tick_ms: u64,
        per_ticks: u64,
        /// `limit`: units drained per tick.
        rate: u64,
        /// `burst × per_ticks`.
        capacity: u64,
    },
    Calendar {
        period: CostPeriod,
        budget: u64,
    },
}

impl Params {
    /// The parameters of `window`, with its limits divided by `divisor`
    /// (at least 1 each; `divisor` is 1 except for the `local` fallback).
    pub fn of(window: &Window, divisor: u64) -> Params {
        let d = divisor.max(1);
        let div = |n: u64| (n / d).max(1);
        match window {
            Window::Requests { limit, burst, .. } => {
                let (tick_ms, per_ticks) = window.ticks().unwrap_or((1, 1));
                Params::Gcra {
                    tick_ms,
                    per_ticks,
                    rate: div(*limit),
                    capacity: div(*burst).saturating_mul(per_ticks),
                }
            }
            Window::Tokens { limit, .. } => {
                let (tick_ms, per_ticks) = window.ticks().unwrap_or((1, 1));
                Params::Gcra {
                    tick_ms,
                    per_ticks,
                    rate: div(*limit),
                    capacity: div(*limit).saturating_mul(per_ticks),
                }
            }
            Window::Cost { nanos, period } => Params::Calendar {
                period: *period,
                budget: div(*nanos),
            },
        }
    }

    /// The most one request may reserve, in counts (requests, tokens or
    /// nano-USD): the whole bucket.
    pub fn max_reserve(&self) -> u64 {
        match *self {
            Params::Gcra {
                per_ticks,
                capacity,
                ..
            } => capacity / per_ticks.max(1),
            Params::Calendar { budget, .. } => budget,
        }
    }
}

/// The stored state of one window. For GCRA `level` is in units and `at` is
/// the tick it was last brought up to date; for a calendar window `level` is
/// the spend and `at` the period's start (Unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct State {
    pub level: u64,
    pub at: u64,
}

/// The answer for one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eval {
    pub allowed: bool,
    /// Counts reserved when admitted (the amount, capped at the bucket).
    pub reserved: u64,
    /// The state to store when the request is admitted.
    pub next: State,
    /// Counts still available after this request (if admitted) or now (if not).
    pub remaining: u64,
    /// Milliseconds until the window is back to full (empty bucket, or the
    /// period's end for a budget), after this request if admitted.
    pub reset_ms: u64,
    /// Milliseconds until this request would be admitted (0 when it is).
    pub wait_ms: u64,
    /// Calendar windows: the current period's start (Unix ms); else 0.
    pub period_start: u64,
}

/// GCRA level drained to tick `now_t`.
fn drained(params_rate: u64, state: State, now_t: u64) -> u64 {
    let elapsed = now_t.saturating_sub(state.at);
    state
        .level
        .saturating_sub(elapsed.saturating_mul(params_rate))
}

/// Evaluates a request of `amount` counts against one window, without
/// changing anything.
pub fn evaluate(params: &Params, state: Option<State>, amount: u64, now_ms: u64) -> Eval {
    match *params {
        Params::Gcra {
            tick_ms,
            per_ticks,
            rate,
            capacity,
        } => {
            let tick_ms = tick_ms.max(1);
            let rate = rate.max(1);
            let now_t = now_ms / tick_ms;
            let state = state.unwrap_or(State {
                level: 0,
                at: now_t,
            });
            let level = drained(rate, state, now_t);
            let at = state.at.max(now_t);
            let reserved = amount.min(capacity / per_ticks.max(1));
            let units = reserved * per_ticks;
            let until = |level: u64| -> u64 {
                // Ticks until `level` has drained away, as ms from now.
                let ticks = level.div_ceil(rate);
                if ticks == 0 {
                    0
                } else {
                    (now_t + ticks) * tick_ms - now_ms
                }
            };
            if level + units <= capacity {
                let next = level + units;
                Eval {
                    allowed: true,
                    reserved,
                    next: State { level: next, at },
                    remaining: (capacity - next) / per_ticks.max(1),
                    reset_ms: until(next),
                    wait_ms: 0,
                    period_start: 0,
                }
            } else {
                let excess = level + units - capacity;
                Eval {
                    allowed: false,
                    reserved: 0,
                    next: State { level, at },
                    remaining: capacity.saturating_sub(level) / per_ticks.max(1),
                    reset_ms: until(level),
                    wait_ms: until(excess),
                    period_start: 0,
                }
            }
        }
        Params::Calendar { period, budget } => {
            let (start, end) = period_bounds(period, now_ms);
            let spent = match state {
                Some(s) if s.at == start => s.level,
                _ => 0,
            };
            let reserved = amount.min(budget);
            let reset_ms = end - now_ms;
            if spent + reserved <= budget {
                let next = spent + reserved;
                Eval {
                    allowed: true,
                    reserved,
                    next: State {
                        level: next,
                        at: start,
                    },
                    remaining: budget - next,
                    reset_ms,
                    wait_ms: 0,
                    period_start: start,
                }
            } else {
                Eval {
                    allowed: false,
                    reserved: 0,
                    next: State {
                        level: spent,
                        at: start,
                    },
                    remaining: budget.saturating_sub(spent),
                    reset_ms,
                    wait_ms: reset_ms,
                    period_start: start,
                }
            }
        }
    }
}

/// Applies a signed correction of `delta` counts (a reconciliation, or the
/// refund of a request that another rule refused) to a window.
///
/// GCRA: the level moves by `delta × per_ticks`, never below zero and never
/// above twice the capacity. Calendar: applied to the period the request was
/// admitted in (`period_start`) while it is current; once that period is
/// over, a refund is dropped and an extra charge goes to the current period.
pub fn adjust(
    params: &Params,
    state: Option<State>,
    delta: i64,
    period_start: u64,
    now_ms: u64,
) -> State {
    match *params {
        Params::Gcra {
            tick_ms,
            per_ticks,
            rate,
            capacity,
        } => {
            let now_t = now_ms / tick_ms.max(1);
            let state = state.unwrap_or(State {
                level: 0,
                at: now_t,
            });
            let level = drained(rate.max(1), state, now_t);
            let units = delta.unsigned_abs().saturating_mul(per_ticks);
            let level = if delta >= 0 {
                level.saturating_add(units).min(capacity.saturating_mul(2))
            } else {
                level.saturating_sub(units)
            };
            State {
                level,
                at: state.at.max(now_t),
            }
        }
        Params::Calendar { period, .. } => {
            let (start, _) = period_bounds(period, now_ms);
            let spent = match state {
                Some(s) if s.at == start => s.level,
                _ => 0,
            };
            let spent = if period_start == start {
                if delta >= 0 {
                    spent.saturating_add(delta as u64)
                } else {
                    spent.saturating_sub(delta.unsigned_abs())
                }
            } else if delta > 0 {
                spent.saturating_add(delta as u64)
            } else {
                spent
            };
            State {
                level: spent,
                at: start,
            }
        }
    }
}

/// When the stored state can be forgotten because it equals a fresh one:
/// the bucket has drained, or the period has ended (Unix ms).
pub fn expires_at(params: &Params, state: State, now_ms: u64) -> u64 {
    match *params {
        Params::Gcra { tick_ms, rate, .. } => {
            let tick_ms = tick_ms.max(1);
            let at = state.at.max(now_ms / tick_ms);
            let level = drained(rate.max(1), state, at);
            (at + level.div_ceil(rate.max(1))) * tick_ms
        }
        Params::Calendar { period, .. } => period_bounds(period, state.at).1,
    }
}

/// The UTC period containing `now_ms`, as (start, end) in Unix ms.
pub fn period_bounds(period: CostPeriod, now_ms: u64) -> (u64, u64) {
    match period {
        CostPeriod::Hour => {
            let start = now_ms - now_ms % HOUR_MS;
            (start, start + HOUR_MS)
        }
        CostPeriod::Day => {
            let day = now_ms / DAY_MS;
            (day * DAY_MS, (day + 1) * DAY_MS)
        }
        CostPeriod::Week => {
            // 1970-01-01 was a Thursday; ISO weeks start on Monday.
            let day = now_ms / DAY_MS;
            let monday = day - (day + 3) % 7;
            (monday * DAY_MS, (monday + 7) * DAY_MS)
        }
        CostPeriod::Month => {
            let (y, m, _) = civil_from_days(now_ms / DAY_MS);
            let start = days_from_civil(y, m, 1);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (start * DAY_MS, days_from_civil(ny, nm, 1) * DAY_MS)
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// algorithm, for years from 1970 on).
pub fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01.
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const T0: u64 = 1_700_000_000_000; // 2023-11-14T22:13:20Z

    fn requests(limit: u64, per_secs: u64, burst: u64) -> Params {
        Params::of(
            &Window::Requests {
                limit,
                per: Duration::from_secs(per_secs),
                burst,
            },
            1,
        )
    }

    /// Runs `n` requests of `amount` at `now`, committing the admitted ones.
    fn run(p: &Params, state: &mut Option<State>, n: usize, amount: u64, now: u64) -> usize {
        let mut passed = 0;
        for _ in 0..n {
            let e = evaluate(p, *state, amount, now);
            if e.allowed {
                *state = Some(e.next);
                passed += 1;
            }
        }
        passed
    }

    #[test]
    fn ten_per_minute_lets_exactly_ten_through_a_burst_of_fifty() {
        let p = requests(10, 60, 10);
        let mut s = None;
        assert_eq!(run(&p, &mut s, 50, 1, T0), 10);
        // The 11th: one request frees up every 6 s.
        let e = evaluate(&p, s, 1, T0);
        assert!(!e.allowed);
        assert_eq!((e.remaining, e.wait_ms, e.reset_ms), (0, 6_000, 60_000));
    }

    #[test]
    fn gcra_at_the_window_edges() {
        let p = requests(10, 60, 10);
        let mut s = None;
        run(&p, &mut s, 10, 1, T0);
        // One millisecond before the first refill: still refused.
        assert!(!evaluate(&p, s, 1, T0 + 5_999).allowed);
        assert_eq!(evaluate(&p, s, 1, T0 + 5_999).wait_ms, 1);
        // Exactly at it: one passes, the next does not.
        assert_eq!(run(&p, &mut s, 5, 1, T0 + 6_000), 1);
        // A full window after the burst, the bucket is full again.
        let mut s2 = None;
        run(&p, &mut s2, 10, 1, T0);
        assert_eq!(run(&p, &mut s2, 50, 1, T0 + 60_000), 10);
        // Half a window: half the limit.
        let mut s3 = None;
        run(&p, &mut s3, 10, 1, T0);
        assert_eq!(run(&p, &mut s3, 50, 1, T0 + 30_000), 5);
    }

    #[test]
    fn a_refused_request_consumes_nothing() {
        let p = requests(2, 60, 2);
        let mut s = None;
        run(&p, &mut s, 2, 1, T0);
        let before = s;
        for i in 0..100 {
            let e = evaluate(&p, s, 1, T0 + i);
            assert!(!e.allowed);
        }
        assert_eq!(s, before);
        assert!(evaluate(&p, s, 1, T0 + 30_000).allowed);
    }

    #[test]
    fn burst_smaller_than_limit_smooths_and_larger_allows_spikes() {
        // 60/min with burst 1: one per second, no bunching.
        let p = requests(60, 60, 1);
        let mut s = None;
        assert_eq!(run(&p, &mut s, 10, 1, T0), 1);
        assert_eq!(run(&p, &mut s, 10, 1, T0 + 999), 0);
        assert_eq!(run(&p, &mut s, 10, 1, T0 + 1_000), 1);
        // 10/min with burst 20: twenty at once, then the usual pace.
        let p = requests(10, 60, 20);
        let mut s = None;
        assert_eq!(run(&p, &mut s, 50, 1, T0), 20);
        assert_eq!(run(&p, &mut s, 50, 1, T0 + 6_000), 1);
    }

    #[test]
    fn long_windows_count_in_seconds() {
        // 500/day: one every 172.8 s, counted in whole seconds.
        let p = requests(500, 86_400, 500);
        assert_eq!(
            p,
            Params::Gcra {
                tick_ms: 1000,
                per_ticks: 86_400,
                rate: 500,
                capacity: 500 * 86_400
            }
        );
        let mut s = None;
        assert_eq!(run(&p, &mut s, 600, 1, T0), 500);
        let e = evaluate(&p, s, 1, T0);
        // 172.8 s rounds up to the 173rd whole second.
        assert_eq!(e.wait_ms, 173_000);
        assert!(!evaluate(&p, s, 1, T0 + 172_999).allowed);
        assert!(evaluate(&p, s, 1, T0 + 173_000).allowed);
    }

    #[test]
    fn tokens_reserve_reconcile_and_never_drop_below_zero() {
        let p = Params::of(
            &Window::Tokens {
                limit: 1_000,
                per: Duration::from_secs(60),
            },
            1,
        );
        let mut s = None;
        // Reserve 600: 400 left; a second 600 is refused.
        let e = evaluate(&p, s, 600, T0);
        assert!(e.allowed && e.reserved == 600 && e.remaining == 400);
        s = Some(e.next);
        let refused = evaluate(&p, s, 600, T0);
        assert!(!refused.allowed);
        // 200 tokens drain every 12 s, so 600 fit again after 12 s.
        assert_eq!(refused.wait_ms, 12_000);
        // The response used 100: refund 500.
        s = Some(adjust(&p, s, -500, 0, T0));
        assert_eq!(evaluate(&p, s, 1, T0).remaining, 899);
        // A refund larger than the level stops at zero.
        s = Some(adjust(&p, s, -5_000, 0, T0));
        assert_eq!(s.map(|s| s.level), Some(0));
        // Under-estimated: the response used 1500 more than reserved.
        s = Some(adjust(&p, s, 1_500, 0, T0));
        let e = evaluate(&p, s, 1, T0);
        assert!(!e.allowed);
        assert_eq!(e.remaining, 0);
    }

    #[test]
    fn an_estimate_larger_than_the_bucket_reserves_the_whole_bucket() {
        let p = Params::of(
            &Window::Tokens {
                limit: 1_000,
                per: Duration::from_secs(60),
            },
            1,
        );
        let e = evaluate(&p, None, 5_000, T0);
        assert!(e.allowed);
        assert_eq!(e.reserved, 1_000);
        assert!(!evaluate(&p, Some(e.next), 5_000, T0 + 1).allowed);
    }

    #[test]
    fn cost_budget_resets_at_the_utc_day_boundary() {
        let p = Params::of(
            &Window::Cost {
                nanos: 5_000_000_000,
                period: CostPeriod::Day,
            },
            1,
        );
        let midnight = (T0 / DAY_MS + 1) * DAY_MS;
        let before = midnight - 1;
        let e = evaluate(&p, None, 4_000_000_000, before);
        assert!(e.allowed);
        assert_eq!((e.remaining, e.reset_ms), (1_000_000_000, 1));
        let s = Some(e.next);
        let refused = evaluate(&p, s, 2_000_000_000, before);
        assert!(!refused.allowed);
        assert_eq!(refused.wait_ms, 1);
        // At 00:00:00.000 UTC the budget is whole again.
        let after = evaluate(&p, s, 5_000_000_000, midnight);
        assert!(after.allowed);
        assert_eq!(after.period_start, midnight);
        assert_eq!(after.reset_ms, DAY_MS);
    }

    #[test]
    fn cost_reconciliation_after_the_period_ended() {
        let p = Params::of(
            &Window::Cost {
                nanos: 1_000,
                period: CostPeriod::Day,
            },
            1,
        );
        let midnight = (T0 / DAY_MS + 1) * DAY_MS;
        let e = evaluate(&p, None, 300, midnight - 10);
        let s = Some(e.next);
        // Same period: exact correction.
        assert_eq!(adjust(&p, s, 200, e.period_start, midnight - 5).level, 500);
        assert_eq!(adjust(&p, s, -200, e.period_start, midnight - 5).level, 100);
        // Next period: a refund is dropped, an extra charge lands today.
        assert_eq!(adjust(&p, s, -200, e.period_start, midnight + 5).level, 0);
        let today = adjust(&p, s, 200, e.period_start, midnight + 5);
        assert_eq!((today.level, today.at), (200, midnight));
    }

    #[test]
    fn calendar_periods() {
        // 2024-02-29T12:00:00Z (a Thursday, leap day).
        let t = days_from_civil(2024, 2, 29) * DAY_MS + 12 * HOUR_MS;
        assert_eq!(civil_from_days(t / DAY_MS), (2024, 2, 29));
        let (s, e) = period_bounds(CostPeriod::Month, t);
        assert_eq!(
            (s, e),
            (
                days_from_civil(2024, 2, 1) * DAY_MS,
                days_from_civil(2024, 3, 1) * DAY_MS
            )
        );
        assert_eq!((e - s) / DAY_MS, 29);
        let (s, e) = period_bounds(CostPeriod::Week, t);
        assert_eq!(civil_from_days(s / DAY_MS), (2024, 2, 26)); // Monday
        assert_eq!(e - s, 7 * DAY_MS);
        let (s, _) = period_bounds(CostPeriod::Hour, t + 59 * 60_000);
        assert_eq!(s, t);
        // December rolls over to January.
        let dec = days_from_civil(2023, 12, 31) * DAY_MS;
        assert_eq!(
            period_bounds(CostPeriod::Month, dec).1,
            days_from_civil(2024, 1, 1) * DAY_MS
        );
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }

    #[test]
    fn local_fallback_divides_limits() {
        let w = Window::Requests {
            limit: 10,
            per: Duration::from_secs(60),
            burst: 10,
        };
        assert_eq!(
            Params::of(&w, 3),
            Params::Gcra {
                tick_ms: 1,
                per_ticks: 60_000,
                rate: 3,
                capacity: 180_000
            }
        );
        assert_eq!(Params::of(&w, 100).max_reserve(), 1);
        let c = Window::Cost {
            nanos: 100,
            period: CostPeriod::Day,
        };
        assert_eq!(
            Params::of(&c, 3),
            Params::Calendar {
                period: CostPeriod::Day,
                budget: 33
            }
        );
    }

    #[test]
    fn expiry_is_when_the_state_is_fresh_again() {
        let p = requests(10, 60, 10);
        let e = evaluate(&p, None, 1, T0);
        assert_eq!(expires_at(&p, e.next, T0), T0 + 6_000);
        let c = Params::of(
            &Window::Cost {
                nanos: 100,
                period: CostPeriod::Day,
            },
            1,
        );
        let e = evaluate(&c, None, 1, T0);
        assert_eq!(expires_at(&c, e.next, T0), (T0 / DAY_MS + 1) * DAY_MS);
    }
}
