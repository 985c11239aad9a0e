//! A rolling window of counters, split into time buckets, updated without
//! locks.
//!
//! Both the retry budget (requests and retries over 10 s) and the circuit
//! breaker (calls, failures and slow calls over its `window`) need "how many
//! X in the last W seconds" on every request, from every worker thread. A
//! `Mutex` would do, but this sits on the hot path of every proxied request,
//! so each bucket is a tick stamp plus `K` atomic counters:
//!
//! - time is cut into ticks of `window / buckets`; tick `t` lives in bucket
//!   `t % buckets`;
//! - a writer whose tick matches the bucket's stamp just adds;
//! - a writer that finds an older stamp claims the bucket (stamp -> `BUSY`
//!   by compare-and-swap), zeroes it, and stamps it with the new tick; other
//!   writers wait for the stamp (a few spins) and then add.
//!
//! **Approximations.** The window slides by whole buckets, so a sum covers
//! between `(buckets - 1) / buckets` of the window and all of it. A writer
//! that stalls for a whole window between reading the stamp and adding can
//! land its count in a recycled bucket, and a writer that finds a bucket
//! being reset for longer than a few spins drops its sample; both are
//! vanishingly rare and only ever off by a handful of events. A reader may
//! see a bucket mid-update. Neither the budget nor the breaker needs more.
//!
//! Time is passed in as nanoseconds from an [`Epoch`], so nothing here
//! reads the clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Turns `Instant`s into nanoseconds since the first instant it was given,
/// so that times fit in an atomic. Earlier instants (a thread whose `now`
/// was taken a moment before another's) count as 0.
#[derive(Debug, Default)]
pub struct Epoch(OnceLock<Instant>);

impl Epoch {
    pub fn new() -> Self {
        Epoch(OnceLock::new())
    }

    /// Nanoseconds from the epoch's origin to `now` (saturating).
    pub fn nanos(&self, now: Instant) -> u64 {
        let origin = *self.0.get_or_init(|| now);
        duration_nanos(now.saturating_duration_since(origin))
    }
}

/// A duration in whole nanoseconds, saturating at `u64::MAX` (~584 years).
pub fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Stamp of a bucket that has never been used (or was cleared).
const EMPTY: u64 = u64::MAX;
/// Stamp of a bucket being zeroed by one writer.
const BUSY: u64 = u64::MAX - 1;
/// How many times a writer looks at a bucket that another writer is
/// zeroing before it gives up on its sample (the first few busy-wait, the
/// rest yield the thread, in case the other writer was preempted).
const SPINS: usize = 64;
const BUSY_WAITS: usize = 8;

struct Bucket<const K: usize> {
    tick: AtomicU64,
    counts: [AtomicU64; K],
}

/// `K` counters summed over a rolling window.
pub struct Rolling<const K: usize> {
    step: u64,
    buckets: Box<[Bucket<K>]>,
}

impl<const K: usize> std::fmt::Debug for Rolling<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rolling")
            .field("step_nanos", &self.step)
            .field("buckets", &self.buckets.len())
            .finish()
    }
}

impl<const K: usize> Rolling<K> {
    /// A window of `window` cut into `buckets` buckets (at least 1; each at
    /// least 1 ns long).
    pub fn new(window: Duration, buckets: usize) -> Self {
        let n = buckets.max(1);
        let step = (duration_nanos(window) / n as u64).max(1);
        let buckets = (0..n)
            .map(|_| Bucket {
                tick: AtomicU64::new(EMPTY),
                counts: std::array::from_fn(|_| AtomicU64::new(0)),
            })
            .collect();
        Rolling { step, buckets }
    }

    fn tick(&self, at: u64) -> u64 {
        // Kept below the two sentinel stamps.
        (at / self.step).min(BUSY - 1)
    }

    /// Adds `deltas` to the counters at time `at` (epoch nanoseconds).
    pub fn add(&self, at: u64, deltas: [u64; K]) {
        let tick = self.tick(at);
        let bucket = &self.buckets[(tick % self.buckets.len() as u64) as usize];
        for round in 0..SPINS {
            let stamp = bucket.tick.load(Ordering::Acquire);
            if stamp == tick {
                for (counter, delta) in bucket.counts.iter().zip(deltas) {
                    if delta != 0 {
                        counter.fetch_add(delta, Ordering::Relaxed);
                    }
                }
                return;
            }
            if stamp == BUSY {
                if round < BUSY_WAITS {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            if stamp != EMPTY && stamp > tick {
                // This writer is older than the bucket's current tick: its
                // moment has already slid out of the window.
                return;
            }
            if bucket
                .tick
                .compare_exchange(stamp, BUSY, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                for counter in &bucket.counts {
                    counter.store(0, Ordering::Relaxed);
                }
                bucket.tick.store(tick, Ordering::Release);
            }
        }
    }

    /// The counters summed over the window ending at `at`.
    pub fn sum(&self, at: u64) -> [u64; K] {
        let tick = self.tick(at);
        let n = self.buckets.len() as u64;
        let mut total = [0u64; K];
        for bucket in self.buckets.iter() {
            let stamp = bucket.tick.load(Ordering::Acquire);
            if stamp >= BUSY || stamp > tick || tick - stamp >= n {
                continue;
            }
            for (sum, counter) in total.iter_mut().zip(&bucket.counts) {
                *sum = sum.saturating_add(counter.load(Ordering::Relaxed));
            }
        }
        total
    }

    /// Forgets everything counted so far.
    pub fn clear(&self) {
        for bucket in self.buckets.iter() {
            bucket.tick.store(EMPTY, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const S: u64 = 1_000_000_000;

    #[test]
    fn counts_slide_out_bucket_by_bucket() {
        let w: Rolling<2> = Rolling::new(Duration::from_secs(10), 10);
        w.add(0, [1, 0]);
        w.add(S / 2, [1, 1]);
        w.add(3 * S, [1, 0]);
        assert_eq!(w.sum(3 * S), [3, 1]);
        // At 9.9 s the first bucket (0..1 s) is still in the window.
        assert_eq!(w.sum(9 * S + S / 2), [3, 1]);
        // At 10 s it has slid out.
        assert_eq!(w.sum(10 * S), [1, 0]);
        assert_eq!(w.sum(13 * S), [0, 0]);
        // A bucket is reused for a later tick and starts from zero.
        w.add(20 * S, [5, 5]);
        assert_eq!(w.sum(20 * S), [5, 5]);
    }

    #[test]
    fn stale_writers_and_clear() {
        let w: Rolling<1> = Rolling::new(Duration::from_secs(10), 10);
        w.add(15 * S, [1]);
        // Tick 5 shares a bucket with tick 15 and is older: dropped.
        w.add(5 * S, [1]);
        assert_eq!(w.sum(15 * S), [1]);
        w.clear();
        assert_eq!(w.sum(15 * S), [0]);
        w.add(15 * S, [2]);
        assert_eq!(w.sum(15 * S), [2]);
    }

    #[test]
    fn concurrent_adds_are_all_counted() {
        let w: Arc<Rolling<1>> = Arc::new(Rolling::new(Duration::from_secs(10), 10));
        // Stamp the bucket first: a writer that finds it being zeroed for
        // too long may drop its sample, which would make the count inexact.
        w.add(3 * S, [0]);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let w = Arc::clone(&w);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        w.add(3 * S, [1]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(w.sum(3 * S), [80_000]);
    }

    #[test]
    fn epoch_counts_from_the_first_instant() {
        let e = Epoch::new();
        let t0 = Instant::now();
        assert_eq!(e.nanos(t0 + Duration::from_secs(1)), 0);
        assert_eq!(e.nanos(t0 + Duration::from_secs(3)), 2 * S);
        assert_eq!(e.nanos(t0), 0);
    }
}
