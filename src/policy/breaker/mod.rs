//! Circuit breakers: stop sending to a backend (or one endpoint of it) that
//! is failing, give it time, probe it, and resume when it answers again.
//!
//! One [`Breaker`] guards one key (`backend/openai`,
//! `endpoint/openai/https://api.openai.com`); the [`BreakerRegistry`] holds
//! them across reloads. Each request asks [`Breaker::try_acquire`] first and
//! reports how the call went with [`Breaker::record`]:
//!
//! ```text
//!            trip                      open time over
//!  Closed ─────────────▶ Open ──────────────────────────▶ HalfOpen
//!    ▲                    ▲                                 │  │
//!    │                    └──── any probe fails ────────────┘  │
//!    └──────────── `half_open_probes` probes succeed ──────────┘
//! ```
//!
//! **Tripping** (any one of, over a rolling `window` of 10 time buckets):
//! - failure rate ≥ `failure_rate`, once at least `min_requests` calls
//!   finished in the window;
//! - `failure_count` failures in the window, whatever the volume;
//! - `consecutive_failures` failures in a row;
//! - slow-call rate ≥ `slow_call.rate` (calls taking `slow_call.threshold`
//!   or longer, successful or not), once at least `min_requests` finished.
//!
//! **Open time** is `open_for` on the first trip and doubles on each trip
//! that follows without the breaker closing in between, capped at
//! `open_for_max`, plus up to 10% random jitter (so replicas that tripped
//! together do not probe together). It is at least `open_for`, and at most
//! `open_for_max` + 10%. While open, [`Breaker::try_acquire`] rejects with the
//! time left until half-open.
//!
//! **Half-open** admits exactly `half_open_probes` probes through an atomic
//! gate and rejects the rest (with a `retry_after` of one second). Any probe
//! failure reopens the breaker with the grown open time; a probe that
//! succeeds but is slow (when `slow_call` is set) counts as a failure. When
//! `half_open_probes` probes have succeeded the breaker closes and its window
//! starts empty. A probe permit dropped without [`Breaker::record`] (the
//! client went away) gives its place back for another probe.
//!
//! **Generations.** Every state change bumps a generation number, and each
//! [`Permit`] carries the generation it was issued in. An outcome whose
//! permit is from an earlier generation is ignored. So the failures of calls
//! that were already in flight when the breaker opened can never reset or
//! extend the open timer (opossum's bug), and a late success from before a
//! trip can never count as a probe.
//!
//! **Cost.** In the closed state, `try_acquire` is one atomic load and
//! `record` a few relaxed atomic adds on the rolling window (see
//! [`crate::policy::rolling`] for its approximations); the trip conditions
//! are evaluated only after a failure or a slow call. State changes take a
//! small mutex. Nothing here reads the clock: `now` is always an argument.

mod registry;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::policy::retry::backoff::{scale, unit};
use crate::policy::rolling::{duration_nanos, Epoch, Rolling};
pub use registry::{backend_key, endpoint_key, BreakerRegistry, BreakerStatus};

pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_FAILURE_RATE: f64 = 0.5;
pub const DEFAULT_MIN_REQUESTS: u32 = 5;
pub const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(30);
pub const DEFAULT_OPEN_FOR_MAX: Duration = Duration::from_secs(300);
pub const DEFAULT_HALF_OPEN_PROBES: u32 = 1;
pub const DEFAULT_FAILURE_STATUSES: [u16; 5] = [429, 500, 502, 503, 504];
/// The largest `half_open_probes` (the gate counts in 8 bits).
pub const MAX_HALF_OPEN_PROBES: u32 = 100;
/// `retry_after` given to requests rejected while the probes are out.
pub const HALF_OPEN_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Time buckets in the rolling window.
pub const WINDOW_BUCKETS: usize = 10;
/// Up to this share of the open time is added at random.
pub const OPEN_JITTER: f64 = 0.1;

/// `backends.*.circuit_breaker`, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// The rolling window the rates and counts are taken over.
    pub window: Duration,
    /// Trip at this failure rate (`0.0 < r <= 1.0`)...
    pub failure_rate: f64,
    /// ...once this many calls finished in the window (also gates `slow_call`).
    pub min_requests: u32,
    /// Trip after this many failures in the window, whatever the rate.
    pub failure_count: Option<u32>,
    /// Trip after this many failures in a row.
    pub consecutive_failures: Option<u32>,
    pub slow_call: Option<SlowCall>,
    /// Open time after the first trip.
    pub open_for: Duration,
    /// Cap on the growing open time (≥ `open_for`).
    pub open_for_max: Duration,
    /// Probes admitted while half-open, and successes needed to close
    /// (`1..=100`).
    pub half_open_probes: u32,
    /// Upstream statuses that count as failures (connect errors, timeouts
    /// and resets always do).
    pub failure_statuses: Vec<u16>,
}

/// Trip when `rate` of the calls took `threshold` or longer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowCall {
    pub threshold: Duration,
    pub rate: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: DEFAULT_WINDOW,
            failure_rate: DEFAULT_FAILURE_RATE,
            min_requests: DEFAULT_MIN_REQUESTS,
            failure_count: None,
            consecutive_failures: None,
            slow_call: None,
            open_for: DEFAULT_OPEN_FOR,
            open_for_max: DEFAULT_OPEN_FOR_MAX,
            half_open_probes: DEFAULT_HALF_OPEN_PROBES,
            failure_statuses: DEFAULT_FAILURE_STATUSES.to_vec(),
        }
    }
}

impl BreakerConfig {
    /// How a finished call counts: `status` is the upstream's status, or
    /// `None` for a transport failure (connect error, timeout, reset),
    /// which always counts as a failure. A response that broke mid-stream
    /// should be recorded as a failure by the caller, whatever its status.
    pub fn outcome(&self, status: Option<u16>, elapsed: Duration) -> CallOutcome {
        match status {
            Some(s) if !self.failure_statuses.contains(&s) => CallOutcome::Success { elapsed },
            _ => CallOutcome::Failure { elapsed },
        }
    }

    /// The open time after `trips` trips in a row (1 = the first), before
    /// jitter: `open_for × 2^(trips-1)`, at most `open_for_max`.
    pub fn open_time(&self, trips: u32) -> Duration {
        let doublings = trips.saturating_sub(1).min(63);
        let grown = self
            .open_for
            .checked_mul(1u32.checked_shl(doublings).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX);
        grown.min(self.open_for_max.max(self.open_for))
    }
}

/// How a call that held a [`Permit`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    Success { elapsed: Duration },
    Failure { elapsed: Duration },
}

/// A breaker's state, as seen at some `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    HalfOpen,
    Open { remaining: Duration },
}

impl State {
    /// 0 closed, 1 half-open, 2 open (the `circuit state` gauge).
    pub fn as_gauge(&self) -> i64 {
        self.kind().as_gauge()
    }

    pub fn kind(&self) -> StateKind {
        match self {
            State::Closed => StateKind::Closed,
            State::HalfOpen => StateKind::HalfOpen,
            State::Open { .. } => StateKind::Open,
        }
    }

    pub fn as_str(&self) -> &'static str {
        self.kind().as_str()
    }
}

/// A state without its details, for transitions and labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateKind {
    Closed,
    HalfOpen,
    Open,
}

impl StateKind {
    pub fn as_gauge(self) -> i64 {
        match self {
            StateKind::Closed => 0,
            StateKind::HalfOpen => 1,
            StateKind::Open => 2,
        }
    }

    /// `closed`, `half_open`, `open`.
    pub fn as_str(self) -> &'static str {
        match self {
            StateKind::Closed => "closed",
            StateKind::HalfOpen => "half_open",
            StateKind::Open => "open",
        }
    }

    fn bits(self) -> u64 {
        self.as_gauge() as u64
    }

    fn from_bits(bits: u64) -> StateKind {
        match bits & STATE_MASK {
            0 => StateKind::Closed,
            1 => StateKind::HalfOpen,
            _ => StateKind::Open,
        }
    }
}

/// Called after every state change with the breaker's key, the old state
/// and the new one (outside the breaker's lock; keep it cheap, e.g. bump a
/// Prometheus counter).
pub type OnTransition = Arc<dyn Fn(&str, StateKind, StateKind) + Send + Sync>;

/// The answer to [`Breaker::try_acquire`].
#[derive(Debug)]
#[must_use]
pub enum Admission {
    /// Go ahead; report the outcome with [`Breaker::record`].
    Allowed(Permit),
    /// Do not call: open (`retry_after` = time left until half-open), or
    /// half-open with every probe out.
    Rejected { retry_after: Duration },
}

/// Leave to make one call through a breaker. Hand it back to
/// [`Breaker::record`] with the outcome; dropping it instead counts nothing
/// (and gives a half-open probe place back).
#[must_use = "record the call's outcome with Breaker::record, or drop the permit to count nothing"]
pub struct Permit {
    generation: u64,
    /// The breaker, for probes only (their place is returned on drop).
    probe: Option<Arc<Breaker>>,
    owner: usize,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("generation", &self.generation)
            .field("probe", &self.probe.is_some())
            .finish()
    }
}

impl Permit {
    /// Whether this call is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(breaker) = self.probe.take() {
            breaker.return_probe(self.generation);
        }
    }
}

// The state word: generation << GEN_SHIFT | successes << 10 | tickets << 2 | state.
const STATE_MASK: u64 = 0b11;
const TICKETS_SHIFT: u32 = 2;
const SUCCESSES_SHIFT: u32 = 10;
const COUNT_MASK: u64 = 0xff;
const GEN_SHIFT: u32 = 18;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Word {
    generation: u64,
    state: StateKind,
    /// Half-open: probe places still free.
    tickets: u64,
    /// Half-open: probes that succeeded.
    successes: u64,
}

impl Word {
    fn unpack(w: u64) -> Word {
        Word {
            generation: w >> GEN_SHIFT,
            state: StateKind::from_bits(w),
            tickets: (w >> TICKETS_SHIFT) & COUNT_MASK,
            successes: (w >> SUCCESSES_SHIFT) & COUNT_MASK,
        }
    }

    fn pack(self) -> u64 {
        (self.generation << GEN_SHIFT)
            | ((self.successes & COUNT_MASK) << SUCCESSES_SHIFT)
            | ((self.tickets & COUNT_MASK) << TICKETS_SHIFT)
            | self.state.bits()
    }
}

// Rolling window counters.
const CALLS: usize = 0;
const FAILURES: usize = 1;
const SLOW: usize = 2;

/// What the transition lock protects.
struct Inner {
    /// Trips since the breaker last closed (drives the growing open time).
    streak: u32,
    /// splitmix64 state, for the open-time jitter.
    rng: u64,
}

/// One circuit breaker. Create it with [`Breaker::new`] (or get it from a
/// [`BreakerRegistry`]) and keep it in an `Arc`.
pub struct Breaker {
    key: String,
    config: Arc<BreakerConfig>,
    on_transition: Option<OnTransition>,
    epoch: Epoch,
    window: Rolling<3>,
    word: AtomicU64,
    /// Epoch nanoseconds at which the open state ends (valid while open).
    open_until: AtomicU64,
    consecutive: AtomicU32,
    trips: AtomicU64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("key", &self.key)
            .field("word", &Word::unpack(self.word.load(Ordering::Relaxed)))
            .finish()
    }
}

impl Breaker {
    /// A closed breaker with a random jitter seed and no name.
    pub fn new(config: Arc<BreakerConfig>) -> Breaker {
        let window = Rolling::new(config.window, WINDOW_BUCKETS);
        Breaker {
            key: String::new(),
            config,
            on_transition: None,
            epoch: Epoch::new(),
            window,
            word: AtomicU64::new(
                Word {
                    generation: 0,
                    state: StateKind::Closed,
                    tickets: 0,
                    successes: 0,
                }
                .pack(),
            ),
            open_until: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
            trips: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                streak: 0,
                rng: random_seed(),
            }),
        }
    }

    /// Names the breaker (passed to the transition hook and shown in status).
    pub fn with_key(mut self, key: impl Into<String>) -> Breaker {
        self.key = key.into();
        self
    }

    /// Seeds the open-time jitter (tests; the default seed is random).
    pub fn with_seed(self, seed: u64) -> Breaker {
        self.lock().rng = seed;
        self
    }

    /// Calls `hook` after every state change.
    pub fn with_hook(mut self, hook: OnTransition) -> Breaker {
        self.on_transition = Some(hook);
        self
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn config(&self) -> &Arc<BreakerConfig> {
        &self.config
    }

    /// How many times the breaker has tripped (closed or half-open → open).
    pub fn trips(&self) -> u64 {
        self.trips.load(Ordering::Relaxed)
    }

    /// May a call go through now? Moves an open breaker whose time is up to
    /// half-open.
    pub fn try_acquire(self: &Arc<Self>, now: Instant) -> Admission {
        let mut current = self.word.load(Ordering::Acquire);
        loop {
            let w = Word::unpack(current);
            match w.state {
                StateKind::Closed => {
                    return Admission::Allowed(Permit {
                        generation: w.generation,
                        probe: None,
                        owner: self.id(),
                    })
                }
                StateKind::Open => {
                    let remaining = self.open_remaining(now);
                    if !remaining.is_zero() {
                        return Admission::Rejected {
                            retry_after: remaining,
                        };
                    }
                    self.transition(w.generation, StateKind::Open, StateKind::HalfOpen, now);
                    current = self.word.load(Ordering::Acquire);
                }
                StateKind::HalfOpen => {
                    if w.tickets == 0 {
                        return Admission::Rejected {
                            retry_after: HALF_OPEN_RETRY_AFTER,
                        };
                    }
                    let taken = Word {
                        tickets: w.tickets - 1,
                        ..w
                    };
                    match self.word.compare_exchange_weak(
                        current,
                        taken.pack(),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => {
                            return Admission::Allowed(Permit {
                                generation: w.generation,
                                probe: Some(Arc::clone(self)),
                                owner: self.id(),
                            })
                        }
                        Err(actual) => current = actual,
                    }
                }
            }
        }
    }

    /// Reports how a call went. Outcomes of permits from before the last
    /// state change (or from another breaker) are ignored.
    pub fn record(&self, mut permit: Permit, outcome: CallOutcome, now: Instant) {
        if permit.owner != self.id() {
            // Dropping it gives a probe place back to its own breaker.
            debug_assert!(false, "a permit was recorded on another breaker");
            return;
        }
        // The place of a recorded probe is used up, not given back.
        let probe = permit.probe.take().is_some();
        let generation = permit.generation;
        let (failed, elapsed) = match outcome {
            CallOutcome::Success { elapsed } => (false, elapsed),
            CallOutcome::Failure { elapsed } => (true, elapsed),
        };
        let slow = self
            .config
            .slow_call
            .is_some_and(|s| elapsed >= s.threshold);
        if probe {
            self.record_probe(generation, failed || slow, now);
        } else {
            self.record_closed(generation, failed, slow, now);
        }
    }

    /// The state at `now` (an open breaker whose time is up moves to
    /// half-open, as on the next request).
    pub fn state(&self, now: Instant) -> State {
        let w = Word::unpack(self.word.load(Ordering::Acquire));
        match w.state {
            StateKind::Closed => State::Closed,
            StateKind::HalfOpen => State::HalfOpen,
            StateKind::Open => {
                let remaining = self.open_remaining(now);
                if !remaining.is_zero() {
                    return State::Open { remaining };
                }
                self.transition(w.generation, StateKind::Open, StateKind::HalfOpen, now);
                match Word::unpack(self.word.load(Ordering::Acquire)).state {
                    StateKind::Closed => State::Closed,
                    StateKind::HalfOpen => State::HalfOpen,
                    StateKind::Open => State::Open {
                        remaining: self.open_remaining(now),
                    },
                }
            }
        }
    }

    fn id(&self) -> usize {
        self as *const Breaker as usize
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing panics while holding it; a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open_remaining(&self, now: Instant) -> Duration {
        let at = self.epoch.nanos(now);
        let until = self.open_until.load(Ordering::Acquire);
        Duration::from_nanos(until.saturating_sub(at))
    }

    fn record_closed(&self, generation: u64, failed: bool, slow: bool, now: Instant) {
        let w = Word::unpack(self.word.load(Ordering::Acquire));
        if w.state != StateKind::Closed || w.generation != generation {
            return;
        }
        let at = self.epoch.nanos(now);
        self.window.add(at, [1, u64::from(failed), u64::from(slow)]);
        let in_a_row = if failed {
            self.consecutive.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.consecutive.store(0, Ordering::Relaxed);
            0
        };
        if (failed || slow) && self.should_trip(at, in_a_row) {
            self.transition(generation, StateKind::Closed, StateKind::Open, now);
        }
    }

    fn should_trip(&self, at: u64, in_a_row: u32) -> bool {
        let c = &self.config;
        if c.consecutive_failures.is_some_and(|n| in_a_row >= n) {
            return true;
        }
        let counts = self.window.sum(at);
        let (calls, failures, slow) = (counts[CALLS], counts[FAILURES], counts[SLOW]);
        if c.failure_count.is_some_and(|n| failures >= u64::from(n)) {
            return true;
        }
        if calls == 0 || calls < u64::from(c.min_requests) {
            return false;
        }
        let rate = |n: u64| n as f64 / calls as f64;
        rate(failures) >= c.failure_rate || c.slow_call.is_some_and(|s| rate(slow) >= s.rate)
    }

    fn record_probe(&self, generation: u64, failed: bool, now: Instant) {
        if failed {
            self.transition(generation, StateKind::HalfOpen, StateKind::Open, now);
            return;
        }
        let mut current = self.word.load(Ordering::Acquire);
        loop {
            let w = Word::unpack(current);
            if w.state != StateKind::HalfOpen || w.generation != generation {
                return;
            }
            let counted = Word {
                successes: w.successes + 1,
                ..w
            };
            match self.word.compare_exchange_weak(
                current,
                counted.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    if counted.successes >= u64::from(self.config.half_open_probes) {
                        self.transition(generation, StateKind::HalfOpen, StateKind::Closed, now);
                    }
                    return;
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// A probe permit was dropped unrecorded: free its place, if the
    /// half-open period it belongs to is still going.
    fn return_probe(&self, generation: u64) {
        let _ = self
            .word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                let w = Word::unpack(current);
                (w.state == StateKind::HalfOpen && w.generation == generation).then(|| {
                    Word {
                        tickets: w.tickets + 1,
                        ..w
                    }
                    .pack()
                })
            });
    }

    /// Moves from `from` (in `generation`) to `to`; does nothing if the
    /// breaker has moved on since (someone else made this transition).
    fn transition(&self, generation: u64, from: StateKind, to: StateKind, now: Instant) {
        {
            let mut inner = self.lock();
            let mut current = self.word.load(Ordering::Acquire);
            let w = Word::unpack(current);
            if w.state != from || w.generation != generation {
                return;
            }
            let mut next = Word {
                generation: generation + 1,
                state: to,
                tickets: 0,
                successes: 0,
            };
            match to {
                StateKind::Open => {
                    inner.streak = inner.streak.saturating_add(1);
                    let base = self.config.open_time(inner.streak);
                    let jitter = OPEN_JITTER * unit(splitmix64(&mut inner.rng));
                    let open_for = base.saturating_add(scale(base, jitter));
                    let until = self
                        .epoch
                        .nanos(now)
                        .saturating_add(duration_nanos(open_for));
                    self.open_until.store(until, Ordering::Release);
                    self.trips.fetch_add(1, Ordering::Relaxed);
                }
                StateKind::HalfOpen => {
                    next.tickets = u64::from(self.config.half_open_probes);
                }
                StateKind::Closed => {
                    inner.streak = 0;
                    self.window.clear();
                    self.consecutive.store(0, Ordering::Relaxed);
                }
            }
            // Only ticket and success counts (which keep the generation)
            // can race with this store, and they are void once it changes.
            loop {
                match self.word.compare_exchange_weak(
                    current,
                    next.pack(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break,
                    Err(actual) => {
                        let a = Word::unpack(actual);
                        if a.state != from || a.generation != generation {
                            // Unreachable: generation changes are made under the lock.
                            return;
                        }
                        current = actual;
                    }
                }
            }
        }
        if let Some(hook) = &self.on_transition {
            hook(&self.key, from, to);
        }
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A random seed from the standard library's per-process hash keys.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0x5eed);
    hasher.finish()
}

#[cfg(test)]
mod tests;
