//! The breaker state machine, with injected time and seeded jitter.

use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use super::*;

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

fn config(edit: impl FnOnce(&mut BreakerConfig)) -> Arc<BreakerConfig> {
    let mut c = BreakerConfig {
        open_for: Duration::from_secs(10),
        open_for_max: Duration::from_secs(60),
        ..BreakerConfig::default()
    };
    edit(&mut c);
    Arc::new(c)
}

fn breaker(config: Arc<BreakerConfig>) -> Arc<Breaker> {
    Arc::new(Breaker::new(config).with_seed(42))
}

fn permit(b: &Arc<Breaker>, now: Instant) -> Permit {
    match b.try_acquire(now) {
        Admission::Allowed(p) => p,
        Admission::Rejected { retry_after } => {
            panic!("rejected ({retry_after:?}) in state {:?}", b.state(now))
        }
    }
}

fn call(b: &Arc<Breaker>, now: Instant, ok: bool, elapsed: Duration) {
    let p = permit(b, now);
    let outcome = if ok {
        CallOutcome::Success { elapsed }
    } else {
        CallOutcome::Failure { elapsed }
    };
    b.record(p, outcome, now);
}

fn ok(b: &Arc<Breaker>, now: Instant) {
    call(b, now, true, MS);
}

fn fail(b: &Arc<Breaker>, now: Instant) {
    call(b, now, false, MS);
}

fn remaining(b: &Breaker, now: Instant) -> Duration {
    match b.state(now) {
        State::Open { remaining } => remaining,
        other => panic!("expected open, got {other:?}"),
    }
}

fn rejected(b: &Arc<Breaker>, now: Instant) -> Duration {
    match b.try_acquire(now) {
        Admission::Rejected { retry_after } => retry_after,
        Admission::Allowed(p) => panic!("admitted {p:?} in state {:?}", b.state(now)),
    }
}

/// Open time after a trip at `at`: within [base, base + 10%].
fn assert_open_for(b: &Breaker, at: Instant, base: Duration) {
    let left = remaining(b, at);
    assert!(
        left >= base && left <= base + base / 10,
        "open for {left:?}, expected {base:?} + up to 10%"
    );
}

#[test]
fn a_failure_rate_trips_only_with_enough_volume() {
    let t0 = Instant::now();
    let b = breaker(config(|_| {}));
    // 4 failures out of 4: 100%, but below min_requests (5).
    for _ in 0..4 {
        fail(&b, t0);
    }
    assert_eq!(b.state(t0), State::Closed);
    // The 5th call is a success: 4/5 = 80% ≥ 50%, but only failures and
    // slow calls evaluate the trip conditions.
    ok(&b, t0);
    assert_eq!(b.state(t0), State::Closed);
    fail(&b, t0);
    assert_open_for(&b, t0, Duration::from_secs(10));
    assert_eq!(b.trips(), 1);
    assert_eq!(b.state(t0).as_gauge(), 2);
}

#[test]
fn a_rate_below_the_threshold_does_not_trip() {
    let t0 = Instant::now();
    let b = breaker(config(|c| c.failure_rate = 0.5));
    for i in 0..100 {
        // 1 failure in 3: 33%.
        if i % 3 == 0 {
            fail(&b, t0);
        } else {
            ok(&b, t0);
        }
    }
    assert_eq!(b.state(t0), State::Closed);
}

#[test]
fn failures_slide_out_of_the_window() {
    let t0 = Instant::now();
    let b = breaker(config(|c| {
        c.failure_count = Some(5);
        c.failure_rate = 1.0;
        c.window = Duration::from_secs(60);
    }));
    // "5 failures in 60 s": 4 now, among successes...
    for _ in 0..4 {
        fail(&b, t0);
        ok(&b, t0);
        ok(&b, t0);
    }
    assert_eq!(b.state(t0), State::Closed);
    // ...and the 5th 61 s later, when the first 4 have left the window.
    let later = t0 + Duration::from_secs(61);
    fail(&b, later);
    assert_eq!(b.state(later), State::Closed);
    for _ in 0..3 {
        fail(&b, later + SEC);
    }
    assert_eq!(b.state(later + SEC), State::Closed);
    fail(&b, later + 2 * SEC);
    assert_open_for(&b, later + 2 * SEC, Duration::from_secs(10));
}

#[test]
fn consecutive_failures_trip_and_a_success_resets_the_run() {
    let t0 = Instant::now();
    let b = breaker(config(|c| {
        c.consecutive_failures = Some(3);
        c.failure_rate = 1.0;
        c.min_requests = 1000;
    }));
    fail(&b, t0);
    fail(&b, t0);
    ok(&b, t0);
    fail(&b, t0);
    fail(&b, t0);
    assert_eq!(b.state(t0), State::Closed);
    fail(&b, t0);
    assert!(matches!(b.state(t0), State::Open { .. }));
}

#[test]
fn a_slow_call_rate_trips_even_when_calls_succeed() {
    let t0 = Instant::now();
    let b = breaker(config(|c| {
        c.min_requests = 4;
        c.slow_call = Some(SlowCall {
            threshold: Duration::from_secs(30),
            rate: 0.5,
        });
    }));
    call(&b, t0, true, MS);
    call(&b, t0, true, MS);
    call(&b, t0, true, Duration::from_secs(31));
    assert_eq!(b.state(t0), State::Closed);
    // 2 of 4 calls took 30 s or more.
    call(&b, t0, true, Duration::from_secs(30));
    assert!(matches!(b.state(t0), State::Open { .. }));
}

#[test]
fn open_rejects_with_the_time_left_then_half_opens() {
    let t0 = Instant::now();
    let b = breaker(config(|c| c.consecutive_failures = Some(1)));
    fail(&b, t0);
    let open_for = remaining(&b, t0);
    let wait = rejected(&b, t0 + SEC);
    assert_eq!(wait, open_for - SEC);
    // Still open a moment before the time is up.
    assert!(rejected(&b, t0 + open_for - MS) <= MS);
    // Then half-open: one probe (the default) is admitted.
    let probe = permit(&b, t0 + open_for);
    assert!(probe.is_probe());
    assert_eq!(b.state(t0 + open_for), State::HalfOpen);
    assert_eq!(b.state(t0 + open_for).as_gauge(), 1);
    assert_eq!(rejected(&b, t0 + open_for), HALF_OPEN_RETRY_AFTER);
    // One success closes it, with an empty window.
    b.record(probe, CallOutcome::Success { elapsed: MS }, t0 + open_for);
    assert_eq!(b.state(t0 + open_for), State::Closed);
    let closed = t0 + open_for + MS;
    ok(&b, closed);
    assert_eq!(b.state(closed), State::Closed);
}

#[test]
fn a_probe_failure_reopens_for_longer_up_to_the_cap() {
    let t0 = Instant::now();
    let b = breaker(config(|c| {
        c.consecutive_failures = Some(1);
        c.open_for = Duration::from_secs(10);
        c.open_for_max = Duration::from_secs(30);
    }));
    fail(&b, t0);
    let mut now = t0;
    for expected in [10, 20, 30, 30] {
        let base = Duration::from_secs(expected);
        assert_open_for(&b, now, base);
        now += remaining(&b, now);
        let probe = permit(&b, now);
        b.record(probe, CallOutcome::Failure { elapsed: MS }, now);
    }
    assert_eq!(b.trips(), 5);
    // Recovery: the probe succeeds, the breaker closes, and the next trip
    // starts again from `open_for`.
    now += remaining(&b, now);
    let probe = permit(&b, now);
    b.record(probe, CallOutcome::Success { elapsed: MS }, now);
    assert_eq!(b.state(now), State::Closed);
    fail(&b, now);
    assert_open_for(&b, now, Duration::from_secs(10));
}

#[test]
fn a_slow_probe_counts_as_a_failure() {
    let t0 = Instant::now();
    let b = breaker(config(|c| {
        c.consecutive_failures = Some(1);
        c.slow_call = Some(SlowCall {
            threshold: SEC,
            rate: 1.0,
        });
    }));
    fail(&b, t0);
    let now = t0 + remaining(&b, t0);
    let probe = permit(&b, now);
    b.record(probe, CallOutcome::Success { elapsed: 2 * SEC }, now);
    assert_open_for(&b, now, Duration::from_secs(20));
}

#[test]
fn several_probes_must_all_succeed_to_close() {
    let t0 = Instant::now();
    let b = breaker(config(|c| {
        c.consecutive_failures = Some(1);
        c.half_open_probes = 3;
    }));
    fail(&b, t0);
    let now = t0 + remaining(&b, t0);
    let probes: Vec<Permit> = (0..3).map(|_| permit(&b, now)).collect();
    rejected(&b, now);
    for (i, p) in probes.into_iter().enumerate() {
        assert_eq!(b.state(now), State::HalfOpen, "after {i} successes");
        b.record(p, CallOutcome::Success { elapsed: MS }, now);
    }
    assert_eq!(b.state(now), State::Closed);
}

#[test]
fn a_dropped_probe_gives_its_place_back_and_counts_nothing() {
    let t0 = Instant::now();
    let b = breaker(config(|c| c.consecutive_failures = Some(1)));
    fail(&b, t0);
    let now = t0 + remaining(&b, t0);
    let probe = permit(&b, now);
    rejected(&b, now);
    drop(probe); // the client went away
    assert_eq!(b.state(now), State::HalfOpen);
    let probe = permit(&b, now);
    b.record(probe, CallOutcome::Success { elapsed: MS }, now);
    assert_eq!(b.state(now), State::Closed);
}

#[test]
fn late_outcomes_from_before_a_state_change_are_ignored() {
    let t0 = Instant::now();
    let b = breaker(config(|c| c.consecutive_failures = Some(2)));
    let early_success = permit(&b, t0);
    let early_failure = permit(&b, t0);
    fail(&b, t0);
    fail(&b, t0);
    let now = t0 + remaining(&b, t0);
    assert_eq!(b.state(now), State::HalfOpen);
    // A success from before the trip does not close the breaker...
    b.record(early_success, CallOutcome::Success { elapsed: MS }, now);
    assert_eq!(b.state(now), State::HalfOpen);
    // ...and a failure from before the trip does not reopen it.
    b.record(early_failure, CallOutcome::Failure { elapsed: MS }, now);
    assert_eq!(b.state(now), State::HalfOpen);
    assert_eq!(b.trips(), 1);
}

#[test]
fn the_half_open_gate_admits_exactly_n_under_contention() {
    for probes in [1u32, 3, 7] {
        let t0 = Instant::now();
        let b = breaker(config(|c| {
            c.consecutive_failures = Some(1);
            c.half_open_probes = probes;
        }));
        fail(&b, t0);
        let now = t0 + remaining(&b, t0);
        let threads = 16;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (b, barrier) = (Arc::clone(&b), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    // Each thread tries several times; every admission is kept.
                    let mut kept = Vec::new();
                    for _ in 0..50 {
                        if let Admission::Allowed(p) = b.try_acquire(now) {
                            kept.push(p);
                        }
                    }
                    kept
                })
            })
            .collect();
        let admitted: Vec<Permit> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(admitted.len(), probes as usize);
        assert!(admitted.iter().all(Permit::is_probe));
        for p in admitted {
            b.record(p, CallOutcome::Success { elapsed: MS }, now);
        }
        assert_eq!(b.state(now), State::Closed);
    }
}

#[test]
fn concurrent_failures_while_open_never_extend_the_open_timer() {
    let t0 = Instant::now();
    let b = breaker(config(|c| {
        c.min_requests = 5;
        c.open_for = Duration::from_secs(10);
    }));
    // 4000 calls are in flight when the backend goes down.
    let in_flight: Vec<Permit> = (0..4000).map(|_| permit(&b, t0)).collect();
    for _ in 0..5 {
        fail(&b, t0);
    }
    let open_for = remaining(&b, t0);
    assert_eq!(b.trips(), 1);

    // Their failures arrive from 8 threads over the next 9 seconds, while
    // other requests keep being turned away.
    let mut chunks: Vec<Vec<Permit>> = (0..8).map(|_| Vec::new()).collect();
    for (i, p) in in_flight.into_iter().enumerate() {
        chunks[i % 8].push(p);
    }
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = chunks
        .into_iter()
        .enumerate()
        .map(|(t, chunk)| {
            let (b, barrier) = (Arc::clone(&b), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                for (i, p) in chunk.into_iter().enumerate() {
                    let now = t0 + Duration::from_millis((i as u64 * 17 + t as u64) % 9000);
                    b.record(p, CallOutcome::Failure { elapsed: SEC }, now);
                    assert!(matches!(b.try_acquire(now), Admission::Rejected { .. }));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // Same open time as right after the trip: not reset, not extended.
    assert_eq!(remaining(&b, t0), open_for);
    assert_eq!(b.trips(), 1);
    assert!(matches!(b.state(t0 + open_for - MS), State::Open { .. }));
    assert_eq!(b.state(t0 + open_for), State::HalfOpen);
}

#[test]
fn concurrent_probe_failures_reopen_once() {
    let t0 = Instant::now();
    let b = breaker(config(|c| {
        c.consecutive_failures = Some(1);
        c.half_open_probes = 8;
    }));
    fail(&b, t0);
    let now = t0 + remaining(&b, t0);
    let probes: Vec<Permit> = (0..8).map(|_| permit(&b, now)).collect();
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = probes
        .into_iter()
        .map(|p| {
            let (b, barrier) = (Arc::clone(&b), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                b.record(p, CallOutcome::Failure { elapsed: MS }, now);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(b.trips(), 2);
    assert_open_for(&b, now, Duration::from_secs(20));
}

#[test]
fn transitions_are_reported_to_the_hook() {
    let t0 = Instant::now();
    let seen: Arc<Mutex<Vec<(String, StateKind, StateKind)>>> = Arc::default();
    let log = Arc::clone(&seen);
    let hook: OnTransition = Arc::new(move |key: &str, from: StateKind, to: StateKind| {
        log.lock().unwrap().push((key.to_string(), from, to));
    });
    let b = Arc::new(
        Breaker::new(config(|c| c.consecutive_failures = Some(1)))
            .with_key("backend/openai")
            .with_seed(1)
            .with_hook(hook),
    );
    fail(&b, t0);
    let now = t0 + remaining(&b, t0);
    let probe = permit(&b, now);
    b.record(probe, CallOutcome::Success { elapsed: MS }, now);
    use StateKind::*;
    let key = "backend/openai".to_string();
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (key.clone(), Closed, Open),
            (key.clone(), Open, HalfOpen),
            (key, HalfOpen, Closed)
        ]
    );
}

#[test]
fn the_jitter_is_seeded() {
    let t0 = Instant::now();
    let open_time = |seed| {
        let b =
            Arc::new(Breaker::new(config(|c| c.consecutive_failures = Some(1))).with_seed(seed));
        fail(&b, t0);
        remaining(&b, t0)
    };
    assert_eq!(open_time(7), open_time(7));
    let spread: std::collections::HashSet<Duration> = (0..20).map(open_time).collect();
    assert!(spread.len() > 1, "jitter should vary with the seed");
}

#[test]
fn outcomes_follow_failure_statuses() {
    let c = BreakerConfig::default();
    let is_failure = |status| matches!(c.outcome(status, MS), CallOutcome::Failure { .. });
    assert!(is_failure(None));
    for s in [429, 500, 502, 503, 504] {
        assert!(is_failure(Some(s)), "{s}");
    }
    for s in [200, 400, 404, 501] {
        assert!(!is_failure(Some(s)), "{s}");
    }
    assert_eq!(c.open_time(1), Duration::from_secs(30));
    assert_eq!(c.open_time(2), Duration::from_secs(60));
    assert_eq!(c.open_time(5), Duration::from_secs(300));
    assert_eq!(c.open_time(u32::MAX), Duration::from_secs(300));
}

#[test]
fn the_registry_keeps_unchanged_breakers_across_a_reload() {
    let t0 = Instant::now();
    let registry = BreakerRegistry::new();
    let cfg = config(|c| c.consecutive_failures = Some(1));
    let key = backend_key("openai");
    assert_eq!(key, "backend/openai");
    assert_eq!(
        endpoint_key("openai", "https://api.openai.com"),
        "endpoint/openai/https://api.openai.com"
    );
    let b = registry.get(&key, &cfg);
    fail(&b, t0);
    let open_for = remaining(&b, t0);

    // A reload compiles a new, equal config: the same breaker, still open.
    let reloaded = config(|c| c.consecutive_failures = Some(1));
    assert!(!Arc::ptr_eq(&cfg, &reloaded));
    let again = registry.get(&key, &reloaded);
    assert!(Arc::ptr_eq(&b, &again));
    assert_eq!(remaining(&again, t0), open_for);

    // A changed config starts a fresh, closed breaker.
    let changed = config(|c| c.consecutive_failures = Some(2));
    let fresh = registry.get(&key, &changed);
    assert!(!Arc::ptr_eq(&b, &fresh));
    assert_eq!(fresh.state(t0), State::Closed);

    let other = registry.get(&endpoint_key("openai", "https://a"), &cfg);
    fail(&other, t0);
    let status = registry.snapshot(t0 + SEC);
    assert_eq!(status.len(), 2);
    assert_eq!(status[0].key, "backend/openai");
    assert_eq!(status[0].state, State::Closed);
    assert_eq!(status[0].remaining, None);
    assert_eq!(status[1].key, "endpoint/openai/https://a");
    assert!(status[1].remaining.is_some());
    assert_eq!(status[1].trips, 1);

    registry.retain(|k| k.starts_with("backend/"));
    assert_eq!(registry.len(), 1);
}
