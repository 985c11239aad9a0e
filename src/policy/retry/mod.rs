//! Retries: which failures are retried, how long to wait, and how many
//! retries a route may spend.
//!
//! A [`RetryPolicy`] is compiled from a route's `retry` section. The proxy's
//! upstream loop asks it, after each failed attempt, in this order:
//! 1. [`RetryPolicy::delay`]: is this failure retryable, are attempts left,
//!    and how long to wait (the back-off, raised to any server hint read
//!    with [`server_hint`]; a hint above `max_retry_after` gives up);
//! 2. the loop itself checks the `total` deadline: no back-off sleeps past
//!    it and no attempt starts that cannot finish before it;
//! 3. [`RetryBudget::try_withdraw`] last, so that a retry that is not made
//!    spends nothing.
//!
//! What the policy does not decide, because it needs the response: a
//! `400`/`413`/`422` that [`is_request_fault`] blames on the request is
//! never retried (even when `400` is listed in `on`) and never answered by a
//! fallback; and nothing is retried once a byte went to the client.
//! [`RetryPolicy::may_resend`] tells whether a request may be sent again at
//! all (`replay`).

pub mod backoff;
pub mod budget;
pub mod fault;
pub mod retry_after;

use std::time::Duration;

pub use backoff::{Backoff, Jitter};
pub use budget::{BudgetConfig, RetryBudget, BUDGET_WINDOW};
pub use fault::is_request_fault;
pub use retry_after::server_hint;

/// Attempts in all when `retry` is present without `attempts`.
pub const DEFAULT_ATTEMPTS: u32 = 3;
/// The largest `attempts` a route may set.
pub const MAX_ATTEMPTS: u32 = 10;
pub const DEFAULT_BASE: Duration = Duration::from_secs(1);
pub const DEFAULT_FACTOR: f64 = 2.0;
pub const DEFAULT_MAX: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Statuses retried by default.
pub const DEFAULT_STATUSES: [u16; 5] = [429, 500, 502, 503, 504];

/// Why an attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection could not be opened (refused, DNS, TLS, or the
    /// `connect` timeout). Nothing reached the upstream.
    ConnectError,
    /// `response_headers` or `first_token` ran out before anything went to
    /// the client. (`total` is never retried: do not ask.)
    Timeout,
    /// The connection broke before the response header arrived.
    Reset,
    /// The upstream answered with this status.
    Status(u16),
}

impl Failure {
    /// A short, bounded label for metrics and logs: `connect_error`,
    /// `timeout`, `reset`, the status for 429/500/502/503/504, else `4xx`,
    /// `5xx` or `other`.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::ConnectError => "connect_error",
            Failure::Timeout => "timeout",
            Failure::Reset => "reset",
            Failure::Status(429) => "429",
            Failure::Status(500) => "500",
            Failure::Status(502) => "502",
            Failure::Status(503) => "503",
            Failure::Status(504) => "504",
            Failure::Status(400..=499) => "4xx",
            Failure::Status(500..=599) => "5xx",
            Failure::Status(_) => "other",
        }
    }
}

/// The conditions a route retries on (`retry.on`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryOn {
    pub connect_error: bool,
    pub timeout: bool,
    pub reset: bool,
    /// Statuses, each `400..=599`.
    pub statuses: Vec<u16>,
}

impl Default for RetryOn {
    /// Connect errors, timeouts, resets before the header, 429 and
    /// 500/502/503/504.
    fn default() -> Self {
        RetryOn {
            connect_error: true,
            timeout: true,
            reset: true,
            statuses: DEFAULT_STATUSES.to_vec(),
        }
    }
}

/// `routes[].retry`, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included, `1..=10`. 1 = no retries.
    pub attempts: u32,
    pub on: RetryOn,
    pub backoff: Backoff,
    /// Multiplies the back-off after a 429 (`2.0` = "doubled for rate
    /// limits"); at least 1.0. Applied after the `backoff.max` cap.
    pub rate_limited_multiplier: f64,
    /// A server hint longer than this gives up instead of waiting.
    pub max_retry_after: Duration,
    pub budget: BudgetConfig,
    /// Whether a request with a body that is not idempotent by HTTP rules
    /// (an LLM POST) may be sent again. Default true: the body is buffered
    /// whole and replayed.
    pub replay: bool,
}

impl Default for RetryPolicy {
    /// The policy of a route with an empty `retry: {}`: 3 attempts.
    fn default() -> Self {
        RetryPolicy {
            attempts: DEFAULT_ATTEMPTS,
            on: RetryOn::default(),
            backoff: Backoff {
                base: DEFAULT_BASE,
                factor: DEFAULT_FACTOR,
                max: DEFAULT_MAX,
                jitter: Jitter::Full,
            },
            rate_limited_multiplier: 1.0,
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            budget: BudgetConfig::default(),
            replay: true,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Delay {
    /// Retry after waiting this long (may be zero).
    After(Duration),
    /// Do not retry on this backend; fall back or answer with the failure.
    GiveUp { why: GiveUp },
}

/// Why no retry is made. [`RetryPolicy::delay`] gives the first three; the
/// others are for the caller's own checks, so that every "no retry" has a
/// label from one enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// The failure is not in `retry.on`.
    NotRetryable,
    /// Every attempt was used.
    AttemptsExhausted,
    /// The server asked for a longer wait than `max_retry_after`.
    RetryAfterTooLong { wait: Duration, max: Duration },
    /// The retry budget is spent ([`RetryBudget::try_withdraw`] said no).
    BudgetExhausted,
    /// The wait or the next attempt would not end before the `total` deadline.
    Deadline,
    /// The request may not be sent again ([`RetryPolicy::may_resend`]).
    NoReplay,
}

impl GiveUp {
    /// Label for metrics and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            GiveUp::NotRetryable => "not_retryable",
            GiveUp::AttemptsExhausted => "attempts_exhausted",
            GiveUp::RetryAfterTooLong { .. } => "retry_after_too_long",
            GiveUp::BudgetExhausted => "budget_exhausted",
            GiveUp::Deadline => "deadline",
            GiveUp::NoReplay => "no_replay",
        }
    }

    /// Whether fallback's `retries_exhausted` condition covers this: the
    /// failure was retryable and retrying stopped for a reason of ours or
    /// the server's. `NotRetryable` (a 4xx, above all a refusal) is not.
    pub fn exhausted_retryable(&self) -> bool {
        !matches!(self, GiveUp::NotRetryable)
    }
}

impl RetryPolicy {
    /// The policy of a route without `retry`: a single attempt. The `on`
    /// conditions still say which failures count as "retryable" for
    /// fallback's `retries_exhausted`.
    pub fn single_attempt() -> Self {
        RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// Whether any retry can happen at all (`attempts > 1`).
    pub fn enabled(&self) -> bool {
        self.attempts > 1
    }

    /// Whether `failure` is one of the `on` conditions.
    pub fn retryable(&self, failure: &Failure) -> bool {
        match failure {
            Failure::ConnectError => self.on.connect_error,
            Failure::Timeout => self.on.timeout,
            Failure::Reset => self.on.reset,
            Failure::Status(status) => self.on.statuses.contains(status),
        }
    }

    /// Whether a request with this method may be sent again after `failure`.
    /// Idempotent methods always may; others (POST, PATCH) only with
    /// `replay: true`, except after a connect error, when nothing was sent.
    pub fn may_resend(&self, method: &http::Method, failure: &Failure) -> bool {
        self.replay || method.is_idempotent() || *failure == Failure::ConnectError
    }

    /// The wait before retry `retry_number` (1 = the first retry, i.e. the
    /// second attempt) after `failure`, or why there is none.
    ///
    /// `base × factor^(n-1)`, capped at `backoff.max`, times
    /// `rate_limited_multiplier` after a 429, then jittered with `rand` (any
    /// uniformly random `u64`). A `server_hint` ([`server_hint`]) is a
    /// floor: the result is the larger of the two, and a hint above
    /// `max_retry_after` gives up.
    pub fn delay(
        &self,
        retry_number: u32,
        failure: &Failure,
        server_hint: Option<Duration>,
        rand: u64,
    ) -> Delay {
        if !self.retryable(failure) {
            return Delay::GiveUp {
                why: GiveUp::NotRetryable,
            };
        }
        if retry_number == 0 || retry_number >= self.attempts {
            return Delay::GiveUp {
                why: GiveUp::AttemptsExhausted,
            };
        }
        if let Some(wait) = server_hint {
            if wait > self.max_retry_after {
                return Delay::GiveUp {
                    why: GiveUp::RetryAfterTooLong {
                        wait,
                        max: self.max_retry_after,
                    },
                };
            }
        }
        let mut d = self.backoff.nominal(retry_number);
        if *failure == Failure::Status(429) {
            d = backoff::scale(d, self.rate_limited_multiplier.max(1.0));
        }
        let d = backoff::jittered(self.backoff.jitter, d, rand);
        Delay::After(d.max(server_hint.unwrap_or(Duration::ZERO)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HALF: u64 = 1 << 63;

    fn policy(jitter: Jitter) -> RetryPolicy {
        RetryPolicy {
            attempts: 4,
            backoff: Backoff {
                jitter,
                ..RetryPolicy::default().backoff
            },
            ..RetryPolicy::default()
        }
    }

    fn after(d: Delay) -> Duration {
        match d {
            Delay::After(d) => d,
            Delay::GiveUp { why } => panic!("gave up: {why:?}"),
        }
    }

    #[test]
    fn defaults_retry_transport_failures_and_overload_statuses() {
        let p = RetryPolicy::default();
        assert_eq!(p.attempts, 3);
        for f in [
            Failure::ConnectError,
            Failure::Timeout,
            Failure::Reset,
            Failure::Status(429),
            Failure::Status(500),
            Failure::Status(502),
            Failure::Status(503),
            Failure::Status(504),
        ] {
            assert!(p.retryable(&f), "{f:?}");
        }
        for status in [400, 401, 403, 404, 413, 422, 501] {
            assert!(!p.retryable(&Failure::Status(status)), "{status}");
        }
        assert!(!RetryPolicy::single_attempt().enabled());
        assert!(p.enabled());
    }

    #[test]
    fn delays_grow_then_cap_and_attempts_run_out() {
        let p = policy(Jitter::None);
        let f = Failure::Status(503);
        assert_eq!(after(p.delay(1, &f, None, 0)), Duration::from_secs(1));
        assert_eq!(after(p.delay(2, &f, None, 0)), Duration::from_secs(2));
        assert_eq!(after(p.delay(3, &f, None, 0)), Duration::from_secs(4));
        // 4 attempts = 3 retries.
        assert_eq!(
            p.delay(4, &f, None, 0),
            Delay::GiveUp {
                why: GiveUp::AttemptsExhausted
            }
        );
        let long = RetryPolicy {
            attempts: 10,
            ..policy(Jitter::None)
        };
        assert_eq!(after(long.delay(9, &f, None, 0)), Duration::from_secs(10));
        assert_eq!(
            p.delay(1, &Failure::Status(404), None, 0),
            Delay::GiveUp {
                why: GiveUp::NotRetryable
            }
        );
    }

    #[test]
    fn full_jitter_is_deterministic_given_the_random_value() {
        let p = policy(Jitter::Full);
        let f = Failure::Timeout;
        assert_eq!(after(p.delay(3, &f, None, 0)), Duration::ZERO);
        assert_eq!(after(p.delay(3, &f, None, HALF)), Duration::from_secs(2));
        assert!(after(p.delay(3, &f, None, u64::MAX)) <= Duration::from_secs(4));
        // Same input, same answer.
        assert_eq!(p.delay(2, &f, None, 12345), p.delay(2, &f, None, 12345));
    }

    #[test]
    fn rate_limits_double_the_capped_delay_plus_ten_percent_jitter() {
        // The research-citation plan: initial 1s, base 2, max 30s, doubled
        // for rate limits, plus up to 10% jitter.
        let p = RetryPolicy {
            attempts: 10,
            backoff: Backoff {
                base: Duration::from_secs(1),
                factor: 2.0,
                max: Duration::from_secs(30),
                jitter: Jitter::Up(0.1),
            },
            rate_limited_multiplier: 2.0,
            max_retry_after: Duration::from_secs(120),
            ..RetryPolicy::default()
        };
        let limited = Failure::Status(429);
        assert_eq!(after(p.delay(1, &limited, None, 0)), Duration::from_secs(2));
        assert_eq!(after(p.delay(3, &limited, None, 0)), Duration::from_secs(8));
        assert_eq!(
            after(p.delay(3, &limited, None, HALF)),
            Duration::from_millis(8400)
        );
        // Capped at 30s first, then doubled.
        assert_eq!(
            after(p.delay(6, &limited, None, 0)),
            Duration::from_secs(60)
        );
        // Other failures are not doubled.
        assert_eq!(
            after(p.delay(3, &Failure::Status(503), None, HALF)),
            Duration::from_millis(4200)
        );
    }

    #[test]
    fn a_server_hint_is_a_floor_and_a_long_one_gives_up() {
        let p = policy(Jitter::None);
        let f = Failure::Status(429);
        // The hint is longer than the back-off: wait for the hint.
        assert_eq!(
            after(p.delay(1, &f, Some(Duration::from_secs(7)), 0)),
            Duration::from_secs(7)
        );
        // The back-off is longer than the hint: keep the back-off.
        assert_eq!(
            after(p.delay(3, &f, Some(Duration::from_secs(1)), 0)),
            Duration::from_secs(4)
        );
        // Exactly max_retry_after is still honoured.
        assert_eq!(
            after(p.delay(1, &f, Some(Duration::from_secs(30)), 0)),
            Duration::from_secs(30)
        );
        assert_eq!(
            p.delay(1, &f, Some(Duration::from_secs(31)), 0),
            Delay::GiveUp {
                why: GiveUp::RetryAfterTooLong {
                    wait: Duration::from_secs(31),
                    max: Duration::from_secs(30)
                }
            }
        );
        // Full jitter never goes below the hint either.
        let full = policy(Jitter::Full);
        assert_eq!(
            after(full.delay(1, &f, Some(Duration::from_secs(3)), 0)),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn hints_from_headers_feed_the_delay() {
        use http::{HeaderMap, HeaderValue};
        use std::time::{SystemTime, UNIX_EPOCH};
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        let p = policy(Jitter::None);
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:12 GMT"),
        );
        let hint = server_hint(&h, now);
        assert_eq!(
            after(p.delay(1, &Failure::Status(503), hint, 0)),
            Duration::from_secs(12)
        );
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-reset-tokens", HeaderValue::from_static("6m0s"));
        let hint = server_hint(&h, SystemTime::now());
        assert!(matches!(
            p.delay(1, &Failure::Status(429), hint, 0),
            Delay::GiveUp {
                why: GiveUp::RetryAfterTooLong { .. }
            }
        ));
    }

    #[test]
    fn replay_off_resends_only_idempotent_requests_or_unsent_ones() {
        let p = RetryPolicy {
            replay: false,
            ..RetryPolicy::default()
        };
        let post = http::Method::POST;
        assert!(!p.may_resend(&post, &Failure::Status(503)));
        assert!(!p.may_resend(&post, &Failure::Timeout));
        assert!(p.may_resend(&post, &Failure::ConnectError));
        assert!(p.may_resend(&http::Method::GET, &Failure::Status(503)));
        assert!(RetryPolicy::default().may_resend(&post, &Failure::Reset));
    }

    #[test]
    fn failure_reasons_are_bounded_labels() {
        assert_eq!(Failure::Status(429).reason(), "429");
        assert_eq!(Failure::Status(418).reason(), "4xx");
        assert_eq!(Failure::Status(599).reason(), "5xx");
        assert_eq!(Failure::Status(302).reason(), "other");
        assert_eq!(Failure::Reset.reason(), "reset");
        assert!(!GiveUp::NotRetryable.exhausted_retryable());
        assert!(GiveUp::BudgetExhausted.exhausted_retryable());
    }
}
