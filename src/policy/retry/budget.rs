//! The retry budget: retries may be at most `ratio` of recent requests,
//! plus a floor of `min_per_second`.
//!
//! Why a budget and not just `attempts`? `attempts: 3` on its own lets a
//! failing backend receive three times its normal load exactly when it can
//! least take it: a retry storm. A budget caps retries *across* requests.
//! This is tower's `TpsBudget` (and Finagle's `RetryBudget`):
//! - every request deposits `ratio` of a token (the caller calls
//!   [`RetryBudget::deposit`] once per request, not per attempt);
//! - every retry withdraws one whole token ([`RetryBudget::try_withdraw`]),
//!   and is not made when there is none;
//! - deposits and withdrawals expire after [`BUDGET_WINDOW`] (10 s), and
//!   `min_per_second × 10` tokens are always available on top, so that a
//!   quiet route can still retry its rare failures.
//!
//! With `ratio: 20%` and 1,000 requests in 10 s, at most 200 + the floor
//! retries go out in those 10 s, however many attempts each route allows.
//!
//! **Approximate:** the window slides in one-second buckets (see
//! [`crate::policy::rolling`]), and two threads that withdraw the very last
//! token at the same moment may both get it: the budget can be overdrawn by
//! at most the number of threads racing for it.

use std::time::{Duration, Instant};

use crate::policy::rolling::{Epoch, Rolling};

/// How long deposits and withdrawals count.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
const BUCKETS: usize = 10;
const DEPOSITS: usize = 0;
const WITHDRAWALS: usize = 1;

/// `routes[].retry.budget`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetConfig {
    /// Retries allowed per request, `0.0..=1.0` (default 0.2).
    pub ratio: f64,
    /// Retries always allowed per second on top (default 10).
    pub min_per_second: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: 0.2,
            min_per_second: 10,
        }
    }
}

/// A retry budget shared by every request of one route (keep it in the
/// service behind an `Arc`, keyed by route name, and keep it across reloads
/// while [`RetryBudget::config`] is unchanged).
#[derive(Debug)]
pub struct RetryBudget {
    config: BudgetConfig,
    epoch: Epoch,
    window: Rolling<2>,
}

impl RetryBudget {
    pub fn new(config: BudgetConfig) -> Self {
        RetryBudget {
            config,
            epoch: Epoch::new(),
            window: Rolling::new(BUDGET_WINDOW, BUCKETS),
        }
    }

    pub fn config(&self) -> &BudgetConfig {
        &self.config
    }

    /// Records one request (call once per client request, before or after
    /// its first attempt).
    pub fn deposit(&self, now: Instant) {
        let at = self.epoch.nanos(now);
        self.window.add(at, [1, 0]);
    }

    /// Takes one retry from the budget; `false` when it is spent (the retry
    /// must not be made). Call it last, once every other check said "retry",
    /// so that a retry that is not made does not spend a token.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let at = self.epoch.nanos(now);
        if self.balance_at(at) < 1.0 {
            return false;
        }
        self.window.add(at, [0, 1]);
        true
    }

    /// Retries available right now (may be fractional), for metrics.
    pub fn balance(&self, now: Instant) -> f64 {
        self.balance_at(self.epoch.nanos(now))
    }

    fn balance_at(&self, at: u64) -> f64 {
        let counts = self.window.sum(at);
        let reserve = f64::from(self.config.min_per_second) * BUDGET_WINDOW.as_secs_f64();
        reserve + self.config.ratio * counts[DEPOSITS] as f64 - counts[WITHDRAWALS] as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, min_per_second: u32) -> RetryBudget {
        RetryBudget::new(BudgetConfig {
            ratio,
            min_per_second,
        })
    }

    fn withdraw_all(b: &RetryBudget, now: Instant) -> usize {
        let mut n = 0;
        while b.try_withdraw(now) {
            n += 1;
            assert!(n < 100_000, "budget never ran out");
        }
        n
    }

    #[test]
    fn retries_are_a_share_of_requests() {
        let t0 = Instant::now();
        let b = budget(0.2, 0);
        assert!(!b.try_withdraw(t0), "no requests, no floor: no retries");
        for _ in 0..100 {
            b.deposit(t0);
        }
        assert_eq!(withdraw_all(&b, t0), 20);
        // Five more requests buy one more retry.
        for _ in 0..5 {
            b.deposit(t0);
        }
        assert_eq!(withdraw_all(&b, t0), 1);
    }

    #[test]
    fn the_floor_allows_retries_without_traffic() {
        let t0 = Instant::now();
        let b = budget(0.2, 1);
        // 1 per second over the 10 s window.
        assert_eq!(withdraw_all(&b, t0), 10);
        assert!((b.balance(t0) - 0.0).abs() < 1e-9);
    }

    #[test]
    fn deposits_and_withdrawals_expire_after_the_window() {
        let t0 = Instant::now();
        let b = budget(0.5, 0);
        for _ in 0..10 {
            b.deposit(t0);
        }
        assert_eq!(withdraw_all(&b, t0), 5);
        // 5 s later the old deposits still count, and so do the withdrawals.
        assert!(!b.try_withdraw(t0 + Duration::from_secs(5)));
        // After the window both are gone: nothing is owed, nothing is saved.
        let later = t0 + BUDGET_WINDOW + Duration::from_secs(1);
        assert!(!b.try_withdraw(later));
        b.deposit(later);
        b.deposit(later);
        assert_eq!(withdraw_all(&b, later), 1);
    }

    #[test]
    fn a_failing_route_at_high_concurrency_stays_within_the_budget() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let t0 = Instant::now();
        let b = Arc::new(budget(0.2, 1));
        // Stamp the bucket first (see the rolling window's approximations).
        b.window.add(b.epoch.nanos(t0), [0, 0]);
        let retries = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (b, retries) = (Arc::clone(&b), Arc::clone(&retries));
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        b.deposit(t0);
                        // Every request fails and wants up to 3 retries.
                        for _ in 0..3 {
                            if b.try_withdraw(t0) {
                                retries.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // 8000 requests × 20% + 10 floor = 1610, overdrawn by at most the
        // 8 racing threads.
        let n = retries.load(Ordering::Relaxed);
        assert!((1600..=1618).contains(&n), "{n} retries");
    }
}
