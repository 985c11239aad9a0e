//! The arithmetic of a cap held across replicas (`concurrency.shared: true`),
//! with no I/O and the clock as an argument.
//!
//! A replica may run a request on a shared route only while it holds a
//! *lease*: an entry of the route's lease set in Redis, `lease id -> expiry`
//! (a sorted set scored by expiry, in the server's milliseconds). The set
//! holds at most `max_in_flight` live leases:
//!
//! - **hold** (acquire and renew are one operation): expired leases are
//!   dropped first; a lease id already in the set gets a fresh expiry
//!   (`now + ttl`); a new one is added only while fewer than
//!   `max_in_flight` live leases remain. Renewing a lease that expired (a
//!   replica that could not reach Redis for a while) is therefore the same
//!   as acquiring it again: it succeeds only if there is room.
//! - **release**: the id is removed.
//!
//! A replica that crashes stops renewing, so its leases expire within one
//! `ttl` and the places come back by themselves. Holders renew every
//! `ttl / 3` ([`LeaseTiming::renew_every`]): a lease survives two missed
//! renewals (a slow Redis, a long pause) before it can be lost.
//!
//! [`LeaseTable`] is that model in memory; the Lua script in
//! `crate::store::leases` is its transcription, and a test runs both
//! through the same scenario. [`decide`] turns the answer of one attempt
//! into what the limiter does; [`fallback_cap`] is the cap a replica keeps
//! on its own while Redis cannot be reached; [`retry_delay`] spaces the
//! attempts of a request waiting for a lease.

use std::collections::HashMap;
use std::time::Duration;

/// `concurrency.lease` when not set.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// The shortest and longest `concurrency.lease`.
pub const MIN_LEASE: Duration = Duration::from_secs(1);
pub const MAX_LEASE: Duration = Duration::from_secs(600);

/// The first wait before a request tries for a lease again.
pub const RETRY_MIN: Duration = Duration::from_millis(20);
/// The longest wait between two tries of one request.
pub const RETRY_MAX: Duration = Duration::from_millis(250);

/// `routes[].concurrency` with `shared: true`, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedConfig {
    /// How long a lease lives without being renewed (`concurrency.lease`):
    /// the longest a crashed replica's places stay taken.
    pub lease: Duration,
}

impl Default for SharedConfig {
    fn default() -> Self {
        SharedConfig {
            lease: DEFAULT_LEASE,
        }
    }
}

/// When leases expire and are renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    pub ttl: Duration,
}

impl LeaseTiming {
    pub fn new(ttl: Duration) -> Self {
        LeaseTiming {
            ttl: ttl.max(Duration::from_millis(3)),
        }
    }

    /// How often holders renew: a third of the lease, so that two renewals
    /// in a row can fail before the lease expires.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// The lease in whole milliseconds, as sent to Redis.
    pub fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis().min(u128::from(u64::MAX)) as u64
    }
}

/// The cap a replica enforces on its own while Redis cannot be reached:
/// `max_in_flight ÷ expected_replicas`, rounded down but at least 1, so
/// that the fleet stays within `max_in_flight` while it has no more than
/// `expected_replicas` replicas (each still runs at least one request).
pub fn fallback_cap(max_in_flight: u32, expected_replicas: u32) -> u32 {
    (max_in_flight / expected_replicas.max(1)).max(1)
}

/// What one attempt at a lease means for the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Redis granted the lease: the request runs.
    Leased,
    /// Redis could not be asked, and this replica is under its
    /// [`fallback_cap`]: the request runs without a lease (one is taken
    /// for it by the next renewal that reaches Redis, if there is room).
    Local,
    /// The shared cap is full (or, without Redis, this replica's fallback
    /// cap): the request waits or is shed.
    Full,
}

/// Decides one attempt. `granted` is Redis' answer (`None` when the call
/// failed); `running_here` is how many requests of the route this replica
/// runs now (with or without a lease).
pub fn decide(granted: Option<bool>, running_here: u32, fallback_cap: u32) -> Attempt {
    match granted {
        Some(true) => Attempt::Leased,
        Some(false) => Attempt::Full,
        None if running_here < fallback_cap => Attempt::Local,
        None => Attempt::Full,
    }
}

/// The wait before try `attempt + 1` (the first retry is `attempt` 0) of a
/// request waiting for a lease: doubling from [`RETRY_MIN`] up to
/// [`RETRY_MAX`], then between half and all of it, picked by `seed`, so
/// that waiters on several replicas do not try in step.
pub fn retry_delay(attempt: u32, seed: u64) -> Duration {
    let base = RETRY_MIN
        .saturating_mul(1u32 << attempt.min(16))
        .min(RETRY_MAX);
    // splitmix64: a well-spread value from any seed.
    let mut z = seed.wrapping_add(u64::from(attempt).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let half = base / 2;
    let spread = half.as_micros() as u64 + 1;
    half + Duration::from_micros(z % spread)
}

/// The answer to a hold: per lease id, whether it is held now, and how many
/// live leases the route has (across the fleet) after the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldReply {
    pub held: Vec<bool>,
    pub in_use: u32,
}

/// The lease set of one route, in memory: the reference model of the Redis
/// script (and the store of the unit tests).
#[derive(Debug, Default, Clone)]
pub struct LeaseTable {
    /// Lease id -> expiry (ms).
    leases: HashMap<String, u64>,
}

impl LeaseTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Holds each of `ids` (see the module docs): renews the ones present,
    /// adds the others in order while fewer than `max` are live.
    pub fn hold(&mut self, ids: &[String], max: u32, ttl_ms: u64, now_ms: u64) -> HoldReply {
        self.leases.retain(|_, expiry| *expiry > now_ms);
        let mut count = self.leases.len() as u64;
        let expiry = now_ms.saturating_add(ttl_ms);
        let held = ids
            .iter()
            .map(|id| {
                if let Some(e) = self.leases.get_mut(id) {
                    *e = expiry;
                    true
                } else if count < u64::from(max) {
                    self.leases.insert(id.clone(), expiry);
                    count += 1;
                    true
                } else {
                    false
                }
            })
            .collect();
        HoldReply {
            held,
            in_use: count.min(u64::from(u32::MAX)) as u32,
        }
    }

    /// Removes `ids`.
    pub fn release(&mut self, ids: &[String]) {
        for id in ids {
            self.leases.remove(id);
        }
    }

    /// Live leases at `now_ms`.
    pub fn live(&self, now_ms: u64) -> usize {
        self.leases.values().filter(|e| **e > now_ms).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn renew_is_a_third_of_the_lease() {
        let t = LeaseTiming::new(Duration::from_secs(3));
        assert_eq!(t.renew_every(), Duration::from_secs(1));
        assert_eq!(t.ttl_ms(), 3000);
        let t = LeaseTiming::new(DEFAULT_LEASE);
        assert_eq!(t.renew_every(), Duration::from_nanos(3_333_333_333));
    }

    #[test]
    fn the_cap_holds_across_holders_and_frees_on_release() {
        let mut t = LeaseTable::new();
        assert_eq!(
            t.hold(&ids(&["a:1", "a:2"]), 2, 1000, 0),
            HoldReply {
                held: vec![true, true],
                in_use: 2
            }
        );
        // A second replica finds the cap full.
        assert_eq!(
            t.hold(&ids(&["b:1"]), 2, 1000, 10),
            HoldReply {
                held: vec![false],
                in_use: 2
            }
        );
        t.release(&ids(&["a:1"]));
        assert_eq!(t.hold(&ids(&["b:1"]), 2, 1000, 20).held, [true]);
        assert_eq!(t.live(20), 2);
    }

    #[test]
    fn a_crashed_holder_s_leases_expire_and_renewed_ones_do_not() {
        let mut t = LeaseTable::new();
        t.hold(&ids(&["dead:1", "live:1"]), 2, 3000, 0);
        // The live replica renews every ttl/3; the dead one never does.
        for now in [1000, 2000, 3000 - 1] {
            assert_eq!(t.hold(&ids(&["live:1"]), 2, 3000, now).held, [true]);
            assert_eq!(t.hold(&ids(&["new:1"]), 2, 3000, now).held, [false]);
        }
        // At the dead lease's expiry, its place comes back.
        let r = t.hold(&ids(&["new:1"]), 2, 3000, 3000);
        assert_eq!(r.held, [true]);
        assert_eq!(r.in_use, 2);
    }

    #[test]
    fn renewing_an_expired_lease_takes_a_place_only_if_there_is_room() {
        let mut t = LeaseTable::new();
        t.hold(&ids(&["a:1"]), 1, 100, 0);
        // a:1 was not renewed in time; b:1 took the place.
        assert_eq!(t.hold(&ids(&["b:1"]), 1, 100, 150).held, [true]);
        assert_eq!(t.hold(&ids(&["a:1"]), 1, 100, 160).held, [false]);
        t.release(&ids(&["b:1"]));
        assert_eq!(t.hold(&ids(&["a:1"]), 1, 100, 170).held, [true]);
    }

    #[test]
    fn a_lowered_cap_keeps_running_leases_and_admits_nobody_until_below_it() {
        let mut t = LeaseTable::new();
        t.hold(&ids(&["a", "b", "c"]), 3, 1000, 0);
        let r = t.hold(&ids(&["a", "b", "c", "d"]), 2, 1000, 10);
        assert_eq!(r.held, [true, true, true, false]);
        assert_eq!(r.in_use, 3);
        t.release(&ids(&["a"]));
        assert_eq!(t.hold(&ids(&["d"]), 2, 1000, 20).held, [false]);
        t.release(&ids(&["b"]));
        assert_eq!(t.hold(&ids(&["d"]), 2, 1000, 30).held, [true]);
    }

    #[test]
    fn decide_falls_back_to_the_local_share_only_when_redis_is_away() {
        assert_eq!(decide(Some(true), 99, 1), Attempt::Leased);
        assert_eq!(decide(Some(false), 0, 10), Attempt::Full);
        assert_eq!(decide(None, 4, 5), Attempt::Local);
        assert_eq!(decide(None, 5, 5), Attempt::Full);
        assert_eq!(fallback_cap(10, 3), 3);
        assert_eq!(fallback_cap(2, 3), 1);
        assert_eq!(fallback_cap(100, 0), 100);
    }

    #[test]
    fn retry_delays_grow_to_the_cap_with_jitter_in_the_upper_half() {
        for seed in [0, 1, 42, u64::MAX] {
            let mut last_base = Duration::ZERO;
            for attempt in 0..40 {
                let base = RETRY_MIN
                    .saturating_mul(1 << attempt.min(16))
                    .min(RETRY_MAX);
                let d = retry_delay(attempt, seed);
                assert!(d >= base / 2 && d <= base, "{attempt}: {d:?} of {base:?}");
                assert!(base >= last_base);
                last_base = base;
            }
            assert_eq!(last_base, RETRY_MAX);
        }
        // Different seeds spread out.
        let spread: std::collections::HashSet<_> =
            (0..50).map(|s| retry_delay(10, s).as_micros()).collect();
        assert!(spread.len() > 40, "{spread:?}");
    }
}
