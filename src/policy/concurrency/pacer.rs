//! [`Pacer`]: the outgoing-call limits of one backend
//! (`backends.<name>.limits`), protecting a provider's quota.
//!
//! A call may start when all of these hold at `now`:
//! - fewer than `max_in_flight` calls of the backend are running;
//! - fewer than `per_minute` calls started in the last 60 s, i.e. in the
//!   window `(now - 60s, now]` (an exact sliding log of the last
//!   `per_minute` start times, no approximation);
//! - at least `min_spacing` has passed since the previous start.
//!
//! That rule is [`PaceState::check`], a pure function of the state and
//! `now`; [`PaceState::start`] records a start. Tokio is used only to wait.
//!
//! **Waiting.** A call that cannot start joins a FIFO of at most
//! `max_queue` calls and waits at most `max_wait` (or less: see
//! [`Pacer::acquire_within`]), then fails with [`UpstreamQuota`] (503
//! `upstream_quota`). Only the head of the FIFO is ever awake: it sleeps
//! until the rate or spacing allows it, or until a running call finishes,
//! then starts, and wakes the next one. A call that arrives while others
//! wait goes behind them, even if it could start at once. A waiter whose
//! future is dropped leaves the FIFO at once.
//!
//! **What counts.** Every call that starts counts against `per_minute` and
//! `min_spacing` (each attempt of a retried request is a call), whatever
//! its outcome; a [`CallPermit`] holds its `max_in_flight` place until
//! dropped.
//!
//! **Adaptive limit.** With `limits.adaptive`, a [`Gradient`] moves the
//! in-flight cap between its `min` and `max` from the calls' times to
//! their response headers ([`CallPermit::record_latency`]); the cap in
//! force is the lower of it and `max_in_flight`.
//!
//! **Reloads.** [`Pacer::reconfigure`] keeps the in-flight count and the
//! start log. The log holds only the last `per_minute` starts (none when
//! `per_minute` was unset), so raising `per_minute`, or setting it where it
//! was unset, can let up to the new limit start in the first minute whatever
//! started just before the reload.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::adaptive::{AdaptiveConfig, Gradient};
use super::MIN_RETRY_AFTER;

/// `backends.*.limits.max_wait` when not set.
pub const DEFAULT_CALL_MAX_WAIT: Duration = Duration::from_secs(10);
/// `backends.*.limits.max_queue` when not set.
pub const DEFAULT_CALL_MAX_QUEUE: u32 = 1000;
/// The window of `per_minute`.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// `backends.<name>.limits`, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimits {
    /// Calls running at once; `None` = no cap.
    pub max_in_flight: Option<u32>,
    /// Calls started in any 60 s; `None` = no cap.
    pub per_minute: Option<u32>,
    /// Least time between two starts (zero = none).
    pub min_spacing: Duration,
    /// Longest a call waits for its turn (zero = never waits).
    pub max_wait: Duration,
    /// Calls waiting at once (`>= 1`).
    pub max_queue: u32,
    /// An in-flight cap that follows the backend's latency.
    pub adaptive: Option<AdaptiveConfig>,
}

impl Default for CallLimits {
    /// No limit at all.
    fn default() -> Self {
        CallLimits {
            max_in_flight: None,
            per_minute: None,
            min_spacing: Duration::ZERO,
            max_wait: DEFAULT_CALL_MAX_WAIT,
            max_queue: DEFAULT_CALL_MAX_QUEUE,
            adaptive: None,
        }
    }
}

/// Whether a call may start now ([`PaceState::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    Go,
    /// Not before this instant (rate or spacing).
    At(Instant),
    /// Not before a running call finishes (`max_in_flight`).
    Full,
}

/// The pure state of a backend's pace: running calls and recent starts.
#[derive(Debug, Clone, Default)]
pub struct PaceState {
    in_flight: u32,
    /// The last `per_minute` start times, oldest first (empty without
    /// `per_minute`).
    starts: VecDeque<Instant>,
    last_start: Option<Instant>,
}

impl PaceState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a call may start at `now` under `limits`.
    pub fn check(&self, limits: &CallLimits, now: Instant) -> Pace {
        if limits
            .max_in_flight
            .is_some_and(|max| self.in_flight >= max)
        {
            return Pace::Full;
        }
        let mut earliest = now;
        if let Some(last) = self.last_start {
            earliest = earliest.max(last + limits.min_spacing);
        }
        if let Some(n) = limits.per_minute {
            let n = n as usize;
            if n > 0 && self.starts.len() >= n {
                // The n-th most recent start must have left the window.
                earliest = earliest.max(self.starts[self.starts.len() - n] + RATE_WINDOW);
            }
        }
        if earliest <= now {
            Pace::Go
        } else {
            Pace::At(earliest)
        }
    }

    /// Records a call starting at `now` (after [`PaceState::check`] said
    /// [`Pace::Go`]).
    pub fn start(&mut self, limits: &CallLimits, now: Instant) {
        self.in_flight += 1;
        self.last_start = Some(now);
        match limits.per_minute {
            Some(n) => {
                self.starts.push_back(now);
                while self.starts.len() > n as usize {
                    self.starts.pop_front();
                }
            }
            None => self.starts.clear(),
        }
    }

    /// Records a call finishing.
    pub fn finish(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Calls started in `(now - 60s, now]`, as far as the log knows (it
    /// holds at most `per_minute` starts).
    pub fn started_last_minute(&self, now: Instant) -> usize {
        self.starts
            .iter()
            .rev()
            .take_while(|t| now.saturating_duration_since(**t) < RATE_WINDOW)
            .count()
    }

    /// How long until a call could start, for `Retry-After` (at least 1 s;
    /// 1 s when it waits for a running call).
    pub fn retry_after(&self, limits: &CallLimits, now: Instant) -> Duration {
        match self.check(limits, now) {
            Pace::At(t) => t.saturating_duration_since(now).max(MIN_RETRY_AFTER),
            Pace::Go | Pace::Full => MIN_RETRY_AFTER,
        }
    }
}

/// Why an outgoing call was refused: 503, reason `upstream_quota`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the backend's outgoing call limits are reached ({})", cause.describe())]
pub struct UpstreamQuota {
    pub cause: QuotaCause,
    pub retry_after: Duration,
    /// How long the call waited before it was refused.
    pub waited: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaCause {
    /// `max_queue` calls were already waiting.
    QueueFull,
    /// The call waited `max_wait` (or the caller's shorter limit; at once
    /// when that is zero).
    Timeout,
}

impl QuotaCause {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaCause::QueueFull => "queue_full",
            QuotaCause::Timeout => "timeout",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            QuotaCause::QueueFull => "too many calls are waiting",
            QuotaCause::Timeout => "waited too long for a turn",
        }
    }
}

/// A backend's outgoing-call limiter. Cheap to clone: clones share state.
#[derive(Clone)]
pub struct Pacer {
    inner: Arc<PacerInner>,
}

struct PacerInner {
    state: Mutex<PacerState>,
}

struct PacerState {
    limits: CallLimits,
    gradient: Option<Gradient>,
    pace: PaceState,
    /// Waiting calls by ticket (arrival order), each with its wake-up.
    queue: BTreeMap<u64, Arc<Notify>>,
    next_ticket: u64,
    counters: PacerCounters,
}

#[derive(Debug, Default, Clone, Copy)]
struct PacerCounters {
    started: u64,
    started_after_wait: u64,
    queued: u64,
    rejected_queue_full: u64,
    rejected_timeout: u64,
    abandoned: u64,
}

/// A snapshot of a backend's pacer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacerStats {
    pub in_flight: u32,
    pub max_in_flight: Option<u32>,
    /// The adaptive cap in force (`limits.adaptive`).
    pub adaptive_limit: Option<u32>,
    /// Calls waiting now.
    pub queued: usize,
    /// Calls started in the last 60 s (`None` without `per_minute`).
    pub started_last_minute: Option<usize>,
    pub per_minute: Option<u32>,
    /// Counters.
    pub started: u64,
    pub started_after_wait: u64,
    pub queued_total: u64,
    pub rejected_queue_full: u64,
    pub rejected_timeout: u64,
    pub abandoned: u64,
}

/// A running outgoing call. Dropping it frees its `max_in_flight` place and
/// wakes the next waiting call.
#[must_use = "the call's place is released as soon as the permit is dropped"]
pub struct CallPermit {
    inner: Arc<PacerInner>,
    waited: Duration,
}

impl CallPermit {
    /// How long the call waited for its turn (zero when it started at once).
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// The call's time to its response header (or to its timeout), for the
    /// adaptive limit. When this sample closed a window, returns the cap in
    /// force and whether the window changed it; `None` otherwise (and
    /// without `limits.adaptive`).
    pub fn record_latency(&self, latency: Duration) -> Option<(u32, bool)> {
        let mut state = self.inner.lock();
        let state = &mut *state;
        let gradient = state.gradient.as_mut()?;
        let before = gradient.limit();
        gradient.record(
            latency,
            state.pace.in_flight(),
            tokio::time::Instant::now().into_std(),
        )?;
        let after = gradient.limit();
        if after > before {
            state.wake_head();
        }
        Some((after, after != before))
    }
}

impl std::fmt::Debug for CallPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallPermit")
            .field("waited", &self.waited)
            .finish()
    }
}

impl Drop for CallPermit {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        state.pace.finish();
        state.wake_head();
    }
}

impl Pacer {
    pub fn new(limits: CallLimits) -> Self {
        let gradient = limits
            .adaptive
            .map(|c| Gradient::new(c, tokio::time::Instant::now().into_std()));
        let state = PacerState {
            limits,
            gradient,
            pace: PaceState::new(),
            queue: BTreeMap::new(),
            next_ticket: 0,
            counters: PacerCounters::default(),
        };
        Pacer {
            inner: Arc::new(PacerInner {
                state: Mutex::new(state),
            }),
        }
    }

    /// Waits for the call's turn, at most `max_wait`.
    pub async fn acquire(&self) -> Result<CallPermit, UpstreamQuota> {
        self.acquire_within(Duration::MAX).await
    }

    /// Waits for the call's turn, at most `max_wait` and at most `limit`
    /// (e.g. what is left of the route's `total` deadline). Returns at once
    /// when the call can start (one uncontended lock, no allocation) or
    /// cannot wait; dropping the future leaves the queue.
    pub async fn acquire_within(&self, limit: Duration) -> Result<CallPermit, UpstreamQuota> {
        let arrived = tokio::time::Instant::now();
        let (ticket, wake, deadline) = {
            let mut state = self.inner.lock();
            let state = &mut *state;
            let now = arrived.into_std();
            if state.queue.is_empty() && state.pace.check(&state.effective(), now) == Pace::Go {
                state.start(now);
                return Ok(self.permit(Duration::ZERO));
            }
            let max_wait = state.limits.max_wait.min(limit);
            let cause = if max_wait.is_zero() {
                Some(QuotaCause::Timeout)
            } else if state.queue.len() >= state.limits.max_queue as usize {
                Some(QuotaCause::QueueFull)
            } else {
                None
            };
            if let Some(cause) = cause {
                return Err(state.refuse(cause, now, Duration::ZERO));
            }
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            let wake = Arc::new(Notify::new());
            state.queue.insert(ticket, Arc::clone(&wake));
            state.counters.queued += 1;
            let deadline = arrived
                .checked_add(max_wait)
                .unwrap_or_else(|| arrived + Duration::from_secs(86_400 * 365));
            (ticket, wake, deadline)
        };

        let mut entry = QueuedCall {
            inner: Arc::clone(&self.inner),
            ticket,
            settled: false,
        };
        loop {
            let sleep_until = {
                let mut state = self.inner.lock();
                let state = &mut *state;
                let now = tokio::time::Instant::now();
                let waited = now.saturating_duration_since(arrived);
                let is_head = state
                    .queue
                    .first_key_value()
                    .is_some_and(|(t, _)| *t == ticket);
                let pace = if is_head {
                    state.pace.check(&state.effective(), now.into_std())
                } else {
                    Pace::Full
                };
                if pace == Pace::Go {
                    state.queue.remove(&ticket);
                    state.start(now.into_std());
                    state.counters.started_after_wait += 1;
                    entry.settled = true;
                    // The next waiter computes its own turn.
                    state.wake_head();
                    return Ok(self.permit(waited));
                }
                if now >= deadline {
                    state.queue.remove(&ticket);
                    entry.settled = true;
                    if is_head {
                        state.wake_head();
                    }
                    return Err(state.refuse(QuotaCause::Timeout, now.into_std(), waited));
                }
                match pace {
                    Pace::At(t) => tokio::time::Instant::from_std(t).min(deadline),
                    Pace::Go | Pace::Full => deadline,
                }
            };
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep_until(sleep_until) => {}
            }
        }
    }

    /// Applies reloaded limits, keeping the running calls and the start log.
    pub fn reconfigure(&self, limits: CallLimits) {
        let mut state = self.inner.lock();
        state.gradient = match (state.gradient.take(), limits.adaptive) {
            (_, None) => None,
            (Some(mut g), Some(c)) => {
                g.reconfigure(c);
                Some(g)
            }
            (None, Some(c)) => Some(Gradient::new(c, tokio::time::Instant::now().into_std())),
        };
        state.limits = limits;
        state.wake_head();
    }

    /// The limits in force.
    pub fn limits(&self) -> CallLimits {
        self.inner.lock().limits
    }

    /// Calls running now.
    pub fn in_flight(&self) -> u32 {
        self.inner.lock().pace.in_flight()
    }

    pub fn stats(&self) -> PacerStats {
        let state = self.inner.lock();
        let now = tokio::time::Instant::now().into_std();
        let c = state.counters;
        PacerStats {
            in_flight: state.pace.in_flight(),
            max_in_flight: state.limits.max_in_flight,
            adaptive_limit: state.gradient.as_ref().map(Gradient::limit),
            queued: state.queue.len(),
            started_last_minute: state
                .limits
                .per_minute
                .map(|_| state.pace.started_last_minute(now)),
            per_minute: state.limits.per_minute,
            started: c.started,
            started_after_wait: c.started_after_wait,
            queued_total: c.queued,
            rejected_queue_full: c.rejected_queue_full,
            rejected_timeout: c.rejected_timeout,
            abandoned: c.abandoned,
        }
    }

    fn permit(&self, waited: Duration) -> CallPermit {
        CallPermit {
            inner: Arc::clone(&self.inner),
            waited,
        }
    }
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.lock();
        f.debug_struct("Pacer")
            .field("limits", &state.limits)
            .field("in_flight", &state.pace.in_flight())
            .field("queued", &state.queue.len())
            .finish()
    }
}

impl PacerInner {
    fn lock(&self) -> MutexGuard<'_, PacerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl PacerState {
    /// The limits in force: the policy's, with the adaptive cap (when
    /// there is one) lowering `max_in_flight`.
    fn effective(&self) -> CallLimits {
        let mut limits = self.limits;
        if let Some(g) = &self.gradient {
            let cap = g.limit();
            limits.max_in_flight = Some(limits.max_in_flight.map_or(cap, |m| m.min(cap)));
        }
        limits
    }

    /// Records a start in the pace and the adaptive limit.
    fn start(&mut self, now: Instant) {
        self.pace.start(&self.effective(), now);
        self.counters.started += 1;
        if let Some(g) = self.gradient.as_mut() {
            g.started(self.pace.in_flight());
        }
    }

    /// Wakes the head of the queue so it re-checks its turn.
    fn wake_head(&self) {
        if let Some((_, wake)) = self.queue.first_key_value() {
            wake.notify_one();
        }
    }

    fn refuse(&mut self, cause: QuotaCause, now: Instant, waited: Duration) -> UpstreamQuota {
        match cause {
            QuotaCause::QueueFull => self.counters.rejected_queue_full += 1,
            QuotaCause::Timeout => self.counters.rejected_timeout += 1,
        }
        UpstreamQuota {
            cause,
            retry_after: self.pace.retry_after(&self.effective(), now),
            waited,
        }
    }
}

/// A waiting call's place in the queue; leaves it when dropped unsettled.
struct QueuedCall {
    inner: Arc<PacerInner>,
    ticket: u64,
    settled: bool,
}

impl Drop for QueuedCall {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut state = self.inner.lock();
        let was_head = state
            .queue
            .first_key_value()
            .is_some_and(|(t, _)| *t == self.ticket);
        if state.queue.remove(&self.ticket).is_some() {
            state.counters.abandoned += 1;
        }
        if was_head {
            state.wake_head();
        }
    }
}
