//! Route limiter, queue and pacer tests. Time is tokio's paused clock (or
//! an injected `Instant` for the pure pace rule); nothing sleeps for real.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::*;

const SEC: Duration = Duration::from_secs(1);

fn limiter(
    max: Option<u32>,
    per_identity: Option<u32>,
    queue: Option<QueueConfig>,
) -> ConcurrencyLimiter {
    ConcurrencyLimiter::new(ConcurrencyConfig {
        max_in_flight: max,
        per_identity,
        queue,
        shared: None,
    })
}

fn queue(max_depth: u32, max_wait: Duration, classes: &[&str]) -> QueueConfig {
    QueueConfig {
        max_depth,
        max_wait,
        priority: PriorityConfig {
            header: Some("x-priority".into()),
            classes: classes.iter().map(|c| c.to_string()).collect(),
            default: 0,
            streaming: None,
        },
    }
}

/// Polls a future once, without a runtime waker.
fn poll_once<F: Future + ?Sized>(f: &mut Pin<Box<F>>) -> Poll<F::Output> {
    f.as_mut().poll(&mut Context::from_waker(Waker::noop()))
}

type Acquire<'a> = Pin<Box<dyn Future<Output = Result<Slot, Rejected>> + 'a>>;

/// Starts an acquisition and checks that it is queued (pending).
fn queued<'a>(l: &'a ConcurrencyLimiter, identity: Option<&'a str>, class: usize) -> Acquire<'a> {
    let mut f: Acquire<'a> = Box::pin(l.acquire(identity, class));
    assert!(
        poll_once(&mut f).is_pending(),
        "expected the request to queue"
    );
    f
}

fn ready(poll: Poll<Result<Slot, Rejected>>) -> Result<Slot, Rejected> {
    match poll {
        Poll::Ready(r) => r,
        Poll::Pending => panic!("expected a result, the request is still waiting"),
    }
}

// ---------------------------------------------------------------- slots

#[tokio::test]
async fn slot_is_released_on_drop() {
    let l = limiter(Some(2), None, None);
    let a = l.acquire(None, 0).await.unwrap();
    let b = l.acquire(None, 0).await.unwrap();
    assert_eq!(a.queued_for(), Duration::ZERO);
    assert_eq!(l.in_flight(), 2);
    assert!(matches!(
        l.acquire(None, 0).await,
        Err(Rejected::Shed {
            cause: ShedCause::NoQueue,
            ..
        })
    ));
    drop(a);
    assert_eq!(l.in_flight(), 1);
    drop(b);
    assert_eq!(l.in_flight(), 0);
    let stats = l.stats();
    assert_eq!((stats.admitted, stats.shed_no_queue), (2, 1));
}

#[tokio::test]
async fn a_cancelled_task_holding_a_slot_releases_it() {
    let l = limiter(Some(1), Some(1), None);
    let held = l.clone();
    let task = tokio::spawn(async move {
        let _slot = held.acquire(Some("alice"), 0).await.unwrap();
        std::future::pending::<()>().await;
    });
    while l.in_flight() == 0 {
        tokio::task::yield_now().await;
    }
    task.abort();
    let _ = task.await;
    assert_eq!(l.in_flight(), 0);
    assert_eq!(l.stats().identities, 0);
    // Alice can run again.
    let _again = l.acquire(Some("alice"), 0).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counts_are_exact_under_1000_concurrent_tasks() {
    let l = limiter(
        Some(10),
        Some(100),
        Some(queue(1000, Duration::from_secs(3600), &["a"])),
    );
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let (l, running, peak) = (l.clone(), running.clone(), peak.clone());
            tokio::spawn(async move {
                let id = format!("user-{}", i % 20);
                let slot = l.acquire(Some(&id), 0).await.unwrap();
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                running.fetch_sub(1, Ordering::SeqCst);
                drop(slot);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let stats = l.stats();
    assert!(
        peak.load(Ordering::SeqCst) <= 10,
        "peak {}",
        peak.load(Ordering::SeqCst)
    );
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.queue_depth(), 0);
    assert_eq!(stats.identities, 0);
    assert_eq!(stats.admitted + stats.admitted_after_wait, 1000);
    assert_eq!(stats.shed(ShedCause::Timeout) + stats.abandoned, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_refusals_never_exceed_the_caps() {
    // No queue: requests over the cap are shed, and every shed or refused
    // request takes nothing.
    let l = limiter(Some(10), Some(2), None);
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let (l, running, peak) = (l.clone(), running.clone(), peak.clone());
            tokio::spawn(async move {
                let id = format!("user-{}", i % 7);
                if let Ok(slot) = l.acquire(Some(&id), 0).await {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    drop(slot);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let stats = l.stats();
    assert!(peak.load(Ordering::SeqCst) <= 10);
    assert_eq!(
        stats.admitted + stats.shed_no_queue + stats.rejected_per_identity,
        1000
    );
    assert_eq!((stats.in_flight, stats.identities), (0, 0));
}

// ---------------------------------------------------------------- per identity

#[tokio::test]
async fn per_identity_cap_refuses_the_fourth_run() {
    let l = limiter(Some(10), Some(3), None);
    let runs: Vec<Slot> = futures_join(&l, "alice", 3).await;
    match l.acquire(Some("alice"), 0).await {
        Err(Rejected::PerIdentity { limit, retry_after }) => {
            assert_eq!((limit, retry_after), (3, SEC));
        }
        other => panic!("expected PerIdentity, got {other:?}"),
    }
    // Others, and requests without an identity, are not affected.
    let bob = l.acquire(Some("bob"), 0).await.unwrap();
    let anonymous = l.acquire(None, 0).await.unwrap();
    assert_eq!(l.stats().identities, 2);
    let mut runs = runs;
    runs.pop();
    let again = l.acquire(Some("alice"), 0).await.unwrap();
    drop((runs, again, bob, anonymous));
    let stats = l.stats();
    assert_eq!((stats.in_flight, stats.identities), (0, 0));
    assert_eq!(stats.rejected_per_identity, 1);
}

async fn futures_join(l: &ConcurrencyLimiter, id: &str, n: usize) -> Vec<Slot> {
    let mut slots = Vec::new();
    for _ in 0..n {
        slots.push(l.acquire(Some(id), 0).await.unwrap());
    }
    slots
}

#[tokio::test(start_paused = true)]
async fn per_identity_counts_queued_requests_too() {
    let l = limiter(Some(1), Some(2), Some(queue(10, 10 * SEC, &["a"])));
    let running = l.acquire(Some("alice"), 0).await.unwrap();
    let waiting = queued(&l, Some("alice"), 0);
    assert!(matches!(
        l.acquire(Some("alice"), 0).await,
        Err(Rejected::PerIdentity { limit: 2, .. })
    ));
    drop(waiting);
    drop(running);
    let stats = l.stats();
    assert_eq!(
        (stats.in_flight, stats.identities, stats.abandoned),
        (0, 0, 1)
    );
}

#[tokio::test]
async fn identity_map_shrinks_to_empty() {
    let l = limiter(None, Some(5), None);
    let slots: Vec<Slot> = (0..500)
        .map(|i| format!("caller-{i}"))
        .map(|id| {
            let mut f = Box::pin(l.acquire(Some(&id), 0));
            ready(poll_once(&mut f)).unwrap()
        })
        .collect();
    assert_eq!(l.stats().identities, 500);
    drop(slots);
    assert_eq!(l.stats().identities, 0);
    assert_eq!(l.in_flight(), 0);
}

// ---------------------------------------------------------------- queue

#[tokio::test(start_paused = true)]
async fn high_priority_is_served_before_low_when_a_slot_frees() {
    let l = limiter(
        Some(1),
        None,
        Some(queue(10, 10 * SEC, &["interactive", "normal", "batch"])),
    );
    let running = l.acquire(None, 0).await.unwrap();
    let mut batch = queued(&l, None, 2);
    let mut normal = queued(&l, None, 1);
    let mut interactive = queued(&l, None, 0);
    let depths: Vec<usize> = l.stats().queued.iter().map(|c| c.depth).collect();
    assert_eq!(depths, [1, 1, 1]);

    tokio::time::advance(SEC).await;
    drop(running);
    assert!(poll_once(&mut batch).is_pending());
    assert!(poll_once(&mut normal).is_pending());
    let slot = ready(poll_once(&mut interactive)).unwrap();
    assert_eq!(slot.queued_for(), SEC);
    drop(slot);
    assert!(poll_once(&mut batch).is_pending());
    let slot = ready(poll_once(&mut normal)).unwrap();
    drop(slot);
    let slot = ready(poll_once(&mut batch)).unwrap();
    assert_eq!(l.in_flight(), 1);
    drop(slot);
    let stats = l.stats();
    assert_eq!((stats.in_flight, stats.queue_depth()), (0, 0));
    assert_eq!(
        (
            stats.admitted,
            stats.admitted_after_wait,
            stats.queued_total
        ),
        (1, 3, 3)
    );
}

#[tokio::test(start_paused = true)]
async fn fifo_within_a_class() {
    let l = limiter(Some(1), None, Some(queue(10, 10 * SEC, &["a", "b"])));
    let mut running = Some(l.acquire(None, 1).await.unwrap());
    let mut waiters: Vec<Acquire<'_>> = (0..5).map(|_| queued(&l, None, 1)).collect();
    for i in 0..5 {
        drop(running.take());
        for later in waiters.iter_mut().skip(i + 1) {
            assert!(poll_once(later).is_pending());
        }
        running = Some(ready(poll_once(&mut waiters[i])).unwrap());
    }
    drop(running);
    assert_eq!(l.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_sheds_with_retry_after() {
    let l = limiter(Some(1), None, Some(queue(2, 10 * SEC, &["a"])));
    let _running = l.acquire(None, 0).await.unwrap();
    let _w1 = queued(&l, None, 0);
    tokio::time::advance(3 * SEC).await;
    let _w2 = queued(&l, None, 0);
    match l.acquire(None, 0).await {
        Err(Rejected::Shed {
            cause: ShedCause::QueueFull,
            retry_after,
            queued_for,
        }) => {
            // The oldest waiter leaves the queue within 10 s - 3 s.
            assert_eq!(retry_after, 7 * SEC);
            assert_eq!(queued_for, Duration::ZERO);
        }
        other => panic!("expected a full queue, got {other:?}"),
    }
    assert_eq!(l.stats().shed_queue_full, 1);
    assert_eq!(l.queue_depth(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_higher_class_displaces_the_newest_lowest_waiter_from_a_full_queue() {
    let l = limiter(Some(1), None, Some(queue(2, 10 * SEC, &["high", "low"])));
    let running = l.acquire(None, 0).await.unwrap();
    let mut low_old = queued(&l, None, 1);
    let mut low_new = queued(&l, None, 1);
    // Same class as the lowest: shed.
    assert!(matches!(
        l.acquire(None, 1).await,
        Err(Rejected::Shed {
            cause: ShedCause::QueueFull,
            ..
        })
    ));
    let mut high = queued(&l, None, 0);
    match ready(poll_once(&mut low_new)) {
        Err(Rejected::Shed {
            cause: ShedCause::Displaced,
            retry_after,
            ..
        }) => assert_eq!(retry_after, SEC),
        other => panic!("expected displacement, got {other:?}"),
    }
    assert!(poll_once(&mut low_old).is_pending());
    drop(running);
    let slot = ready(poll_once(&mut high)).unwrap();
    drop(slot);
    let slot = ready(poll_once(&mut low_old)).unwrap();
    drop(slot);
    let stats = l.stats();
    assert_eq!(
        (stats.shed_displaced, stats.shed_queue_full, stats.in_flight),
        (1, 1, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn max_wait_is_enforced() {
    let l = limiter(Some(1), Some(5), Some(queue(10, 10 * SEC, &["a"])));
    let _running = l.acquire(Some("bob"), 0).await.unwrap();
    let started = tokio::time::Instant::now();
    match l.acquire(Some("alice"), 0).await {
        Err(Rejected::Shed {
            cause: ShedCause::Timeout,
            queued_for,
            retry_after,
        }) => {
            assert_eq!(queued_for, 10 * SEC);
            assert_eq!(retry_after, SEC);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(started.elapsed(), 10 * SEC);
    let stats = l.stats();
    assert_eq!(
        (stats.shed_timeout, stats.queue_depth(), stats.identities),
        (1, 0, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_leaves_leaves_no_trace() {
    let l = limiter(Some(1), Some(1), Some(queue(10, 10 * SEC, &["a"])));
    let running = l.acquire(Some("bob"), 0).await.unwrap();
    let waiter = queued(&l, Some("alice"), 0);
    assert_eq!(l.stats().identities, 2);
    drop(waiter);
    let stats = l.stats();
    assert_eq!(
        (stats.queue_depth(), stats.identities, stats.abandoned),
        (0, 1, 1)
    );
    // The freed slot is not handed to the departed waiter.
    drop(running);
    assert_eq!(l.in_flight(), 0);
    assert_eq!(l.stats().identities, 0);
    // And its timer fires into nothing.
    tokio::time::advance(20 * SEC).await;
    assert_eq!(l.stats().shed_timeout, 0);
}

#[tokio::test(start_paused = true)]
async fn a_slot_handed_to_a_waiter_that_just_left_passes_on() {
    let l = limiter(Some(1), None, Some(queue(10, 10 * SEC, &["a"])));
    let running = l.acquire(None, 0).await.unwrap();
    let first = queued(&l, None, 0);
    let mut second = queued(&l, None, 0);
    // The slot goes to `first`, whose client leaves before it is polled.
    drop(running);
    drop(first);
    let slot = ready(poll_once(&mut second)).unwrap();
    assert_eq!(l.in_flight(), 1);
    drop(slot);
    assert_eq!(l.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_grant_racing_the_timeout_wins() {
    let l = limiter(Some(1), None, Some(queue(10, 10 * SEC, &["a"])));
    let running = l.acquire(None, 0).await.unwrap();
    let mut waiter = queued(&l, None, 0);
    tokio::time::advance(10 * SEC).await;
    // Deadline reached, but the slot is handed over before the waiter runs.
    drop(running);
    let slot = ready(poll_once(&mut waiter)).unwrap();
    assert_eq!(slot.queued_for(), 10 * SEC);
    assert_eq!(l.stats().shed_timeout, 0);
}

#[tokio::test(start_paused = true)]
async fn reconfigure_keeps_counts_and_admits_waiters_when_raised() {
    let l = limiter(Some(1), None, Some(queue(10, 10 * SEC, &["a", "b", "c"])));
    let a = l.acquire(None, 0).await.unwrap();
    let mut w_low = queued(&l, None, 2);
    let mut w_mid = queued(&l, None, 1);
    // Raise to 2 and drop a class: `c` waiters merge into `b`.
    l.reconfigure(ConcurrencyConfig {
        max_in_flight: Some(2),
        per_identity: None,
        queue: Some(queue(10, 10 * SEC, &["a", "b"])),
        shared: None,
    });
    assert_eq!(l.in_flight(), 2);
    // The oldest of the merged class got the new place.
    let low = ready(poll_once(&mut w_low)).unwrap();
    assert!(poll_once(&mut w_mid).is_pending());
    // Lower to 1: two run; the waiter gets nothing until the count is below 1.
    l.reconfigure(ConcurrencyConfig {
        max_in_flight: Some(1),
        per_identity: None,
        queue: Some(queue(10, 10 * SEC, &["a", "b"])),
        shared: None,
    });
    drop(a);
    assert!(poll_once(&mut w_mid).is_pending());
    assert_eq!(l.in_flight(), 1);
    drop(low);
    let mid = ready(poll_once(&mut w_mid)).unwrap();
    assert_eq!(l.in_flight(), 1);
    drop(mid);
    assert_eq!(l.in_flight(), 0);
}

#[test]
fn priority_class_from_header_streaming_and_default() {
    let p = PriorityConfig {
        header: Some("x-priority".into()),
        classes: vec!["interactive".into(), "normal".into(), "batch".into()],
        default: 1,
        streaming: Some(0),
    };
    assert_eq!(p.class_for(None, false), 1);
    assert_eq!(p.class_for(None, true), 0);
    assert_eq!(p.class_for(Some(b"batch"), true), 2);
    assert_eq!(p.class_for(Some(b" Interactive "), false), 0);
    assert_eq!(p.class_for(Some(b"vip"), false), 1);
    assert_eq!(p.class_name(2), "batch");
    assert_eq!(p.class_name(9), "batch");
    let no_queue = ConcurrencyConfig {
        max_in_flight: Some(1),
        per_identity: None,
        queue: None,
        shared: None,
    };
    assert_eq!(no_queue.class_for(Some(b"batch"), true), 0);
    assert_eq!(no_queue.priority_header(), None);
}

// ---------------------------------------------------------------- pacer: pure rule

fn call_limits(in_flight: Option<u32>, per_minute: Option<u32>, spacing_ms: u64) -> CallLimits {
    CallLimits {
        max_in_flight: in_flight,
        per_minute,
        min_spacing: Duration::from_millis(spacing_ms),
        max_wait: 10 * SEC,
        max_queue: 100,
        adaptive: None,
    }
}

#[test]
fn pace_per_minute_is_a_sliding_window() {
    let limits = call_limits(None, Some(3), 0);
    let t0 = Instant::now();
    let mut p = PaceState::new();
    for s in 0..3 {
        let now = t0 + s * SEC;
        assert_eq!(p.check(&limits, now), Pace::Go);
        p.start(&limits, now);
    }
    assert_eq!(p.check(&limits, t0 + 3 * SEC), Pace::At(t0 + 60 * SEC));
    assert_eq!(p.retry_after(&limits, t0 + 3 * SEC), 57 * SEC);
    assert_eq!(p.started_last_minute(t0 + 3 * SEC), 3);
    // The first start leaves the window at exactly +60 s.
    assert_eq!(p.check(&limits, t0 + 60 * SEC), Pace::Go);
    p.start(&limits, t0 + 60 * SEC);
    assert_eq!(p.check(&limits, t0 + 60 * SEC), Pace::At(t0 + 61 * SEC));
    assert_eq!(p.started_last_minute(t0 + 60 * SEC), 3);
}

#[test]
fn pace_never_exceeds_per_minute_in_any_window() {
    // Calls as fast as the rule allows for 5 minutes, 100/min and 100 ms apart.
    let limits = call_limits(None, Some(100), 100);
    let t0 = Instant::now();
    let mut p = PaceState::new();
    let mut starts = Vec::new();
    let mut now = t0;
    while now < t0 + 300 * SEC {
        match p.check(&limits, now) {
            Pace::Go => {
                p.start(&limits, now);
                starts.push(now);
            }
            Pace::At(t) => now = t,
            Pace::Full => unreachable!(),
        }
    }
    assert_eq!(starts.len(), 500);
    for (i, s) in starts.iter().enumerate() {
        let in_window = starts[i..]
            .iter()
            .take_while(|t| **t < *s + 60 * SEC)
            .count();
        assert!(in_window <= 100);
    }
    for pair in starts.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_millis(100));
    }
}

#[test]
fn pace_min_spacing_and_in_flight() {
    let limits = call_limits(Some(2), None, 100);
    let t0 = Instant::now();
    let mut p = PaceState::new();
    p.start(&limits, t0);
    assert_eq!(
        p.check(&limits, t0 + Duration::from_millis(40)),
        Pace::At(t0 + Duration::from_millis(100))
    );
    p.start(&limits, t0 + Duration::from_millis(100));
    assert_eq!(p.check(&limits, t0 + SEC), Pace::Full);
    assert_eq!(p.retry_after(&limits, t0 + SEC), SEC);
    p.finish();
    assert_eq!(p.check(&limits, t0 + SEC), Pace::Go);
    assert_eq!(p.in_flight(), 1);
}

// ---------------------------------------------------------------- pacer: waiting

#[tokio::test(start_paused = true)]
async fn pacer_spaces_calls_in_fifo_order() {
    let pacer = Pacer::new(call_limits(None, None, 100));
    let mut waited = Vec::new();
    let mut permits = Vec::new();
    for _ in 0..5 {
        let permit = pacer.acquire().await.unwrap();
        waited.push(permit.waited());
        permits.push(permit);
    }
    // Each call awaited in turn: the n-th waits 100 ms after the previous.
    assert_eq!(waited[0], Duration::ZERO);
    assert!(waited[1..].iter().all(|w| *w == Duration::from_millis(100)));

    // Concurrent callers are served in arrival order, 100 ms apart.
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let start = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let (pacer, order) = (pacer.clone(), order.clone());
            tokio::spawn(async move {
                let p = pacer.acquire().await.unwrap();
                order.lock().unwrap().push((i, start.elapsed()));
                p
            })
        })
        .collect();
    for t in tasks {
        permits.push(t.await.unwrap());
    }
    let order = order.lock().unwrap().clone();
    let ids: Vec<_> = order.iter().map(|(i, _)| *i).collect();
    assert_eq!(ids, [0, 1, 2, 3]);
    let times: Vec<_> = order.iter().map(|(_, t)| t.as_millis()).collect();
    assert_eq!(times, [100, 200, 300, 400]);
    drop(permits);
    assert_eq!(pacer.in_flight(), 0);
    assert_eq!(pacer.stats().started, 9);
}

#[tokio::test(start_paused = true)]
async fn pacer_per_minute_waits_then_sheds_after_max_wait() {
    let mut limits = call_limits(None, Some(2), 0);
    limits.max_wait = 10 * SEC;
    let pacer = Pacer::new(limits);
    let _a = pacer.acquire().await.unwrap();
    let _b = pacer.acquire().await.unwrap();
    let started = tokio::time::Instant::now();
    match pacer.acquire().await {
        Err(UpstreamQuota {
            cause: QuotaCause::Timeout,
            retry_after,
            waited,
        }) => {
            assert_eq!(waited, 10 * SEC);
            // The window frees at +60 s.
            assert_eq!(retry_after, 50 * SEC);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(started.elapsed(), 10 * SEC);

    // With a longer max_wait the call starts when the window frees.
    limits.max_wait = 120 * SEC;
    pacer.reconfigure(limits);
    let c = pacer.acquire().await.unwrap();
    assert_eq!(c.waited(), 50 * SEC);
    let stats = pacer.stats();
    assert_eq!(stats.started_last_minute, Some(1));
    assert_eq!((stats.rejected_timeout, stats.started_after_wait), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn pacer_in_flight_hands_the_place_to_the_next_call() {
    let pacer = Pacer::new(call_limits(Some(1), None, 0));
    let first = pacer.acquire().await.unwrap();
    let next = pacer.clone();
    let waiting = tokio::spawn(async move { next.acquire().await.map(|p| p.waited()) });
    tokio::time::sleep(3 * SEC).await;
    assert_eq!(pacer.stats().queued, 1);
    drop(first);
    assert_eq!(waiting.await.unwrap().unwrap(), 3 * SEC);
    assert_eq!(pacer.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn pacer_queue_is_bounded_and_leaving_callers_leave_no_trace() {
    let mut limits = call_limits(Some(1), None, 0);
    limits.max_queue = 2;
    let pacer = Pacer::new(limits);
    let first = pacer.acquire().await.unwrap();
    let mut w1 = Box::pin(pacer.acquire());
    let mut w2 = Box::pin(pacer.acquire());
    assert!(poll_once(&mut w1).is_pending());
    assert!(poll_once(&mut w2).is_pending());
    match pacer.acquire().await {
        Err(UpstreamQuota {
            cause: QuotaCause::QueueFull,
            retry_after,
            waited,
        }) => {
            assert_eq!((retry_after, waited), (SEC, Duration::ZERO));
        }
        other => panic!("expected a full queue, got {other:?}"),
    }
    // The head leaves: the next in line moves up and gets the place.
    drop(w1);
    assert_eq!(pacer.stats().queued, 1);
    drop(first);
    let permit = match poll_once(&mut w2) {
        Poll::Ready(r) => r.unwrap(),
        Poll::Pending => panic!("the next call should have started"),
    };
    let stats = pacer.stats();
    assert_eq!(
        (stats.queued, stats.abandoned, stats.rejected_queue_full),
        (0, 1, 1)
    );
    drop(permit);
    assert_eq!(pacer.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn pacer_without_wait_refuses_at_once_and_within_caps_the_wait() {
    let mut limits = call_limits(Some(1), None, 0);
    limits.max_wait = Duration::ZERO;
    let pacer = Pacer::new(limits);
    let _held = pacer.acquire().await.unwrap();
    assert!(matches!(
        pacer.acquire().await,
        Err(UpstreamQuota {
            cause: QuotaCause::Timeout,
            waited: Duration::ZERO,
            ..
        })
    ));
    limits.max_wait = 10 * SEC;
    pacer.reconfigure(limits);
    match pacer.acquire_within(2 * SEC).await {
        Err(UpstreamQuota {
            cause: QuotaCause::Timeout,
            waited,
            ..
        }) => assert_eq!(waited, 2 * SEC),
        other => panic!("expected a timeout, got {other:?}"),
    }
}

// ---------------------------------------------------------------- registry

#[tokio::test]
async fn registry_keeps_counts_across_reloads() {
    let policy = |max: u32, with_limits: bool| {
        let limits = if with_limits {
            "    limits: { max_in_flight: 2 }\n"
        } else {
            ""
        };
        format!(
            "version: 1
server: {{ streams: {{ max_concurrent: 5 }} }}
backends:
  llm:
    endpoints: [\"http://127.0.0.1:8000\"]
{limits}routes:
  - name: agent
    match: {{ path_prefix: /agent }}
    backend: llm
    concurrency: {{ max_in_flight: {max} }}
  - name: chat
    match: {{ path_prefix: / }}
    backend: llm
"
        )
    };
    let compile =
        |text: &str| crate::config::compile_str_with_env(text, "p.yaml", &|_| None).unwrap();
    let registry = AdmissionRegistry::new();
    let first = registry.load(&compile(&policy(1, true)));
    let agent = first.route(0).unwrap().concurrency.clone().unwrap();
    assert!(first.route(1).unwrap().concurrency.is_none());
    assert!(first.pacer(0).is_some());
    let slot = agent.acquire(None, 0).await.unwrap();
    let stream = first.route(1).unwrap().streams.try_acquire(None).unwrap();
    assert_eq!(registry.stream_cap().max(), Some(5));

    // Raise the cap: the same limiter, still counting the running request.
    let second = registry.load(&compile(&policy(2, false)));
    let agent2 = second.route(0).unwrap().concurrency.clone().unwrap();
    assert_eq!(agent2.in_flight(), 1);
    assert_eq!(agent2.config().max_in_flight, Some(2));
    assert!(second.pacer(0).is_none());
    assert_eq!(second.route(1).unwrap().streams.active(), 1);
    let _second_slot = agent2.acquire(None, 0).await.unwrap();
    assert!(agent2.acquire(None, 0).await.is_err());
    drop((slot, stream));
    assert_eq!(agent2.in_flight(), 1);
    assert_eq!(second.stream_cap.active(), 0);
}

#[test]
fn futures_and_guards_are_send() {
    fn send<T: Send>(_: &T) {}
    let l = limiter(Some(1), Some(1), Some(queue(1, SEC, &["a"])));
    let pacer = Pacer::new(call_limits(Some(1), None, 0));
    let id = String::from("alice");
    let acquire = l.acquire(Some(&id), 0);
    let call = pacer.acquire_within(SEC);
    send(&acquire);
    send(&call);
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Slot>();
    send_sync::<CallPermit>();
    send_sync::<crate::policy::streams::StreamSlot>();
    send_sync::<Admission>();
}

#[tokio::test(start_paused = true)]
async fn pacer_adaptive_cap_follows_latency_and_wakes_waiters_when_it_grows() {
    use super::adaptive::AdaptiveConfig;
    let limits = CallLimits {
        max_wait: 60 * SEC,
        adaptive: Some(AdaptiveConfig {
            min: 1,
            max: 4,
            window: Duration::from_millis(100),
            tolerance_pct: 150,
        }),
        ..CallLimits::default()
    };
    let pacer = Pacer::new(limits);
    assert_eq!(pacer.stats().adaptive_limit, Some(4));
    // Four run at once; each reports a fast header, window after window.
    let mut permits = Vec::new();
    for _ in 0..4 {
        permits.push(pacer.acquire().await.expect("a place"));
    }
    let report = |permits: &[CallPermit], ms: u64| {
        for p in permits {
            p.record_latency(Duration::from_millis(ms));
        }
    };
    report(&permits, 10);
    tokio::time::advance(Duration::from_millis(100)).await;
    report(&permits, 10); // closes the first window: baseline 10 ms
    assert_eq!(pacer.stats().adaptive_limit, Some(4));
    // The backend slows down 10x: the cap halves each window, to 1.
    for expected in [2, 1, 1] {
        tokio::time::advance(Duration::from_millis(100)).await;
        report(&permits, 100);
        assert_eq!(pacer.stats().adaptive_limit, Some(expected));
    }
    // With the cap at 1 and four running, a fifth waits even when three end.
    permits.truncate(1);
    let waiter = {
        let pacer = pacer.clone();
        tokio::spawn(async move { pacer.acquire().await.map(|_| ()) })
    };
    tokio::time::advance(Duration::from_millis(10)).await;
    tokio::task::yield_now().await;
    assert_eq!(pacer.stats().queued, 1, "held by the adaptive cap");
    // Fast again, with the cap in use: it grows, and the waiter starts.
    for _ in 0..3 {
        tokio::time::advance(Duration::from_millis(100)).await;
        for _ in 0..3 {
            permits[0].record_latency(Duration::from_millis(10));
        }
    }
    assert!(pacer.stats().adaptive_limit.unwrap() >= 2);
    tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .expect("the waiter started once the cap grew")
        .unwrap()
        .expect("a place");
}
