//! [`SharedLeases`]: the places one replica holds on a shared route
//! (`concurrency.shared: true`), leased from a [`LeaseStore`] (Redis in
//! production, see `crate::store::leases`). The rules are in [`super::shared`].
//!
//! - **Acquire.** [`SharedLeases::acquire`] asks the store for a lease
//!   (one round trip, bounded by `store.redis.timeout`). When the shared cap
//!   is full, a request that may wait (its route has a `queue`) tries again
//!   after [`shared::retry_delay`] (20 ms doubling to 250 ms, jittered), or
//!   at once when another request of this replica gives its lease back, until
//!   its deadline; one that may not wait is refused at once.
//! - **Renew.** One background task per route renews every lease the
//!   replica holds, in one call every `lease / 3`, while it holds any. A
//!   lease that the store no longer has (it expired while Redis was away) is
//!   taken again if there is room; otherwise the request keeps running
//!   *unleased* (counted as `local`) and the next renewals keep trying.
//! - **Release.** Dropping the [`Lease`] guard removes the lease from the
//!   replica's set at once and from the store in a spawned task (`Drop`
//!   never waits). A release that fails, or a process that dies, leaves the
//!   lease to expire by itself within one lease.
//! - **Store errors.** When the store cannot be asked, a request runs
//!   *locally* (without a lease) while the replica runs fewer than
//!   [`shared::fallback_cap`] requests of the route (`max_in_flight ÷
//!   store.redis.expected_replicas`), and is treated as if the cap were full
//!   otherwise. Errors are reported through [`LeaseBackend::on_event`].
//!
//! A request waiting for a lease has already passed the route's local
//! queue, so within a replica the priority order decides who tries first;
//! across replicas, waiters are served in no particular order (whoever tries
//! first after a place frees). `max_wait` bounds the wait either way.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::shared::{self, Attempt, HoldReply, LeaseTiming, SharedConfig};
use crate::store::StoreError;

/// Where the leases of shared routes live.
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// Holds each of `ids` on `route` for `ttl` (renewing the ones held,
    /// adding the others while fewer than `max` are live): one atomic call.
    async fn hold_leases(
        &self,
        route: &str,
        ids: &[String],
        max: u32,
        ttl: Duration,
    ) -> Result<HoldReply, StoreError>;

    /// Removes `ids` from `route`'s leases.
    async fn release_leases(&self, route: &str, ids: &[String]) -> Result<(), StoreError>;
}

/// Which call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOp {
    Acquire,
    Renew,
    Release,
}

impl LeaseOp {
    /// The `op` label of `floodwall_limiter_store_errors_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseOp::Acquire => "lease_acquire",
            LeaseOp::Renew => "lease_renew",
            LeaseOp::Release => "lease_release",
        }
    }
}

/// What the lease holder reports to the proxy (metrics and logs).
#[derive(Debug)]
pub enum LeaseEvent<'a> {
    StoreError {
        route: &'a str,
        op: LeaseOp,
        error: &'a StoreError,
    },
    /// Renewal found `count` leases gone and no room to take them again:
    /// those requests run on, unleased.
    Lost { route: &'a str, count: u32 },
}

pub type LeaseHook = Arc<dyn Fn(LeaseEvent<'_>) + Send + Sync>;

/// The store and settings shared routes use; one per process.
#[derive(Clone, Default)]
pub struct LeaseBackend {
    /// `None` without `store.redis`: every attempt is a store error (the
    /// config refuses `shared: true` without a store, so only tests and
    /// a store that could not be set up get here).
    pub store: Option<Arc<dyn LeaseStore>>,
    /// `store.redis.expected_replicas` (0 is taken as 1).
    pub expected_replicas: u32,
    pub on_event: Option<LeaseHook>,
}

impl std::fmt::Debug for LeaseBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseBackend")
            .field("store", &self.store.is_some())
            .field("expected_replicas", &self.expected_replicas)
            .finish()
    }
}

/// The lease holder of one shared route. Cheap to clone.
#[derive(Clone)]
pub struct SharedLeases {
    inner: Arc<Inner>,
}

struct Inner {
    route: String,
    backend: LeaseBackend,
    /// The prefix of this holder's lease ids, unique to the process.
    instance: String,
    state: Mutex<State>,
    /// Signalled once per lease given back by this replica.
    freed: Notify,
}

struct State {
    max: u32,
    timing: LeaseTiming,
    fallback_cap: u32,
    next_id: u64,
    /// Leases of running requests: id -> held in the store (`false`: the
    /// request runs locally, without a lease).
    held: BTreeMap<u64, bool>,
    waiting: u32,
    renewing: bool,
    in_use: Option<u32>,
    counters: Counters,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    leased: u64,
    local: u64,
    refused: u64,
    lost: u64,
    store_errors: u64,
}

/// A snapshot of a shared route, for `/admin/status` and the gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedStats {
    pub lease: Duration,
    /// Requests of this replica running with a lease.
    pub leased: u32,
    /// Requests of this replica running without one (Redis was away).
    pub local: u32,
    /// Requests of this replica waiting for a lease.
    pub waiting: u32,
    /// Leases of the whole fleet, as of this replica's last call.
    pub in_use: Option<u32>,
    /// The cap this replica keeps on its own while Redis is away.
    pub fallback_cap: u32,
    pub leased_total: u64,
    pub local_total: u64,
    pub refused_total: u64,
    pub lost_total: u64,
    pub store_errors_total: u64,
}

/// Why no lease was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoLease {
    /// The request could wait and its deadline passed (`false`: it could
    /// not wait).
    pub timed_out: bool,
}

/// A place on a shared route, held while the request runs. Dropping it
/// gives the place back (see the module docs).
#[must_use = "the lease is given back as soon as it is dropped"]
pub struct Lease {
    inner: Arc<Inner>,
    id: u64,
    waited: bool,
}

impl Lease {
    /// Whether the request had to try more than once.
    pub fn waited(&self) -> bool {
        self.waited
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("route", &self.inner.route)
            .field("id", &self.inner.lease_id(self.id))
            .finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.inner.lock().held.remove(&self.id);
        self.inner.release_in_background(self.id);
    }
}

/// An id being tried for: given back on drop unless it became a [`Lease`],
/// if the store may hold it (its last call failed, timed out or was
/// cancelled, and may still have been applied).
struct Pending {
    inner: Arc<Inner>,
    id: u64,
    /// No definite "not held" answer since the last call was sent.
    uncertain: bool,
    armed: bool,
    waiting: bool,
}

impl Pending {
    fn into_lease(mut self, waited: bool) -> Lease {
        self.armed = false;
        Lease {
            inner: Arc::clone(&self.inner),
            id: self.id,
            waited,
        }
    }

    fn start_waiting(&mut self) {
        if !self.waiting {
            self.waiting = true;
            self.inner.lock().waiting += 1;
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.waiting {
            let mut st = self.inner.lock();
            st.waiting = st.waiting.saturating_sub(1);
        }
        if self.armed && self.uncertain {
            self.inner.release_in_background(self.id);
        }
    }
}

impl SharedLeases {
    /// The holder of `route`, capped at `max` leases across the fleet.
    pub fn new(route: &str, max: u32, config: SharedConfig, backend: LeaseBackend) -> Self {
        let fallback_cap = shared::fallback_cap(max, backend.expected_replicas);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let host: String = std::env::var("HOSTNAME")
            .unwrap_or_default()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
            .take(40)
            .collect();
        SharedLeases {
            inner: Arc::new(Inner {
                route: route.to_string(),
                instance: format!("{host}/{:x}.{nanos:x}", std::process::id()),
                backend,
                state: Mutex::new(State {
                    max,
                    timing: LeaseTiming::new(config.lease),
                    fallback_cap,
                    next_id: 0,
                    held: BTreeMap::new(),
                    waiting: 0,
                    renewing: false,
                    in_use: None,
                    counters: Counters::default(),
                }),
                freed: Notify::new(),
            }),
        }
    }

    /// Applies a reload: the new cap and lease apply to the next call (a
    /// lowered cap lets running requests finish and admits nobody until the
    /// fleet is below it).
    pub fn reconfigure(&self, max: u32, config: SharedConfig) {
        let mut st = self.inner.lock();
        st.max = max;
        st.timing = LeaseTiming::new(config.lease);
        st.fallback_cap = shared::fallback_cap(max, self.inner.backend.expected_replicas);
    }

    /// Takes a lease. Without a `deadline` the request cannot wait: one
    /// attempt. With one, it tries until the deadline (see the module docs).
    /// Dropping the future gives back whatever it may have taken.
    pub async fn acquire(&self, deadline: Option<Instant>) -> Result<Lease, NoLease> {
        let inner = &self.inner;
        let id = {
            let mut st = inner.lock();
            st.next_id += 1;
            st.next_id
        };
        let lease_id = inner.lease_id(id);
        let seed = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            lease_id.hash(&mut h);
            h.finish()
        };
        let mut pending = Pending {
            inner: Arc::clone(inner),
            id,
            uncertain: false,
            armed: true,
            waiting: false,
        };
        let mut attempt = 0u32;
        loop {
            let (max, ttl) = {
                let st = inner.lock();
                (st.max, st.timing.ttl)
            };
            let granted = match &inner.backend.store {
                Some(store) => {
                    pending.uncertain = true;
                    match store
                        .hold_leases(&inner.route, std::slice::from_ref(&lease_id), max, ttl)
                        .await
                    {
                        Ok(reply) => {
                            pending.uncertain = false;
                            inner.lock().in_use = Some(reply.in_use);
                            Some(reply.held.first().copied().unwrap_or(false))
                        }
                        Err(e) => {
                            inner.store_error(LeaseOp::Acquire, &e);
                            None
                        }
                    }
                }
                None => {
                    inner.store_error(
                        LeaseOp::Acquire,
                        &StoreError::Unavailable("no store is configured".into()),
                    );
                    None
                }
            };
            {
                let mut st = inner.lock();
                let running = u32::try_from(st.held.len()).unwrap_or(u32::MAX);
                let outcome = shared::decide(granted, running, st.fallback_cap);
                if outcome != Attempt::Full {
                    let leased = outcome == Attempt::Leased;
                    st.held.insert(id, leased);
                    if leased {
                        st.counters.leased += 1;
                    } else {
                        st.counters.local += 1;
                    }
                    inner.ensure_renewer(&mut st);
                    drop(st);
                    return Ok(pending.into_lease(attempt > 0));
                }
            }
            let now = Instant::now();
            let Some(deadline) = deadline.filter(|d| now < *d) else {
                inner.lock().counters.refused += 1;
                return Err(NoLease {
                    timed_out: deadline.is_some(),
                });
            };
            pending.start_waiting();
            let wake = (now + shared::retry_delay(attempt, seed)).min(deadline);
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = inner.freed.notified() => {}
            }
            attempt = attempt.saturating_add(1);
        }
    }

    pub fn stats(&self) -> SharedStats {
        let st = self.inner.lock();
        let leased = st.held.values().filter(|l| **l).count() as u32;
        SharedStats {
            lease: st.timing.ttl,
            leased,
            local: st.held.len() as u32 - leased,
            waiting: st.waiting,
            in_use: st.in_use,
            fallback_cap: st.fallback_cap,
            leased_total: st.counters.leased,
            local_total: st.counters.local,
            refused_total: st.counters.refused,
            lost_total: st.counters.lost,
            store_errors_total: st.counters.store_errors,
        }
    }
}

impl std::fmt::Debug for SharedLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLeases")
            .field("route", &self.inner.route)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a single step: a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lease_id(&self, n: u64) -> String {
        format!("{}:{n}", self.instance)
    }

    fn store_error(&self, op: LeaseOp, error: &StoreError) {
        self.lock().counters.store_errors += 1;
        if let Some(hook) = &self.backend.on_event {
            hook(LeaseEvent::StoreError {
                route: &self.route,
                op,
                error,
            });
        }
    }

    /// Removes lease `n` from the store in a spawned task, then wakes one
    /// request waiting for a lease. Without a runtime (or a store) the
    /// lease is left to expire.
    fn release_in_background(self: &Arc<Self>, n: u64) {
        let Some(store) = self.backend.store.clone() else {
            self.freed.notify_one();
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = Arc::clone(self);
        runtime.spawn(async move {
            let ids = [inner.lease_id(n)];
            if let Err(e) = store.release_leases(&inner.route, &ids).await {
                inner.store_error(LeaseOp::Release, &e);
            }
            inner.freed.notify_one();
        });
    }

    /// Starts the renewal task if it is not running (called with a lease
    /// just added to `held`).
    fn ensure_renewer(self: &Arc<Self>, st: &mut State) {
        if st.renewing || self.backend.store.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        st.renewing = true;
        runtime.spawn(Arc::clone(self).renew());
    }

    /// Renews every held lease every `lease / 3`, until none is held.
    async fn renew(self: Arc<Self>) {
        let Some(store) = self.backend.store.clone() else {
            self.lock().renewing = false;
            return;
        };
        loop {
            let every = self.lock().timing.renew_every();
            tokio::time::sleep(every).await;
            let (numbers, max, ttl) = {
                let mut st = self.lock();
                if st.held.is_empty() {
                    st.renewing = false;
                    return;
                }
                let numbers: Vec<u64> = st.held.keys().copied().collect();
                (numbers, st.max, st.timing.ttl)
            };
            let ids: Vec<String> = numbers.iter().map(|n| self.lease_id(*n)).collect();
            let reply = match store.hold_leases(&self.route, &ids, max, ttl).await {
                Ok(reply) => reply,
                Err(e) => {
                    self.store_error(LeaseOp::Renew, &e);
                    continue;
                }
            };
            let mut lost = 0u32;
            let mut stray = Vec::new();
            {
                let mut st = self.lock();
                st.in_use = Some(reply.in_use);
                for (n, held) in numbers.iter().zip(&reply.held) {
                    match st.held.get_mut(n) {
                        Some(leased) => {
                            if *leased && !held {
                                lost += 1;
                            }
                            *leased = *held;
                        }
                        // Released while this renewal was on its way: the
                        // renewal may have put it back. Release it again.
                        None if *held => stray.push(*n),
                        None => {}
                    }
                }
                st.counters.lost += u64::from(lost);
            }
            for n in stray {
                self.release_in_background(n);
            }
            if lost > 0 {
                if let Some(hook) = &self.backend.on_event {
                    hook(LeaseEvent::Lost {
                        route: &self.route,
                        count: lost,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Two or more holders (replicas) over one in-memory lease table, on
    //! tokio's paused clock.

    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use super::*;
    use crate::policy::concurrency::shared::{LeaseTable, RETRY_MAX};
    use crate::policy::concurrency::{
        ConcurrencyConfig, ConcurrencyLimiter, PriorityConfig, QueueConfig, Rejected, ShedCause,
    };

    const TTL: Duration = Duration::from_secs(3);

    /// "Redis": one table per route, with the paused clock.
    struct Tables {
        tables: Mutex<HashMap<String, LeaseTable>>,
        start: Instant,
    }

    impl Tables {
        fn new() -> Arc<Tables> {
            Arc::new(Tables {
                tables: Mutex::new(HashMap::new()),
                start: Instant::now(),
            })
        }

        fn now_ms(&self) -> u64 {
            self.start.elapsed().as_millis() as u64
        }

        fn live(&self, route: &str) -> usize {
            let now = self.now_ms();
            self.tables
                .lock()
                .unwrap()
                .get(route)
                .map_or(0, |t| t.live(now))
        }
    }

    /// One replica's connection to the tables: it can be cut (`down`), and
    /// can apply a hold and still answer an error (`apply_then_fail`), as a
    /// call that times out after Redis ran it.
    struct Conn {
        tables: Arc<Tables>,
        down: AtomicBool,
        apply_then_fail: AtomicBool,
        holds: AtomicU32,
    }

    impl Conn {
        fn new(tables: &Arc<Tables>) -> Arc<Conn> {
            Arc::new(Conn {
                tables: Arc::clone(tables),
                down: AtomicBool::new(false),
                apply_then_fail: AtomicBool::new(false),
                holds: AtomicU32::new(0),
            })
        }
    }

    #[async_trait]
    impl LeaseStore for Conn {
        async fn hold_leases(
            &self,
            route: &str,
            ids: &[String],
            max: u32,
            ttl: Duration,
        ) -> Result<HoldReply, StoreError> {
            self.holds.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("down".into()));
            }
            let now = self.tables.now_ms();
            let reply = self
                .tables
                .tables
                .lock()
                .unwrap()
                .entry(route.to_string())
                .or_default()
                .hold(ids, max, ttl.as_millis() as u64, now);
            if self.apply_then_fail.load(Ordering::SeqCst) {
                return Err(StoreError::Timeout(Duration::from_millis(50)));
            }
            Ok(reply)
        }

        async fn release_leases(&self, route: &str, ids: &[String]) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("down".into()));
            }
            if let Some(t) = self.tables.tables.lock().unwrap().get_mut(route) {
                t.release(ids);
            }
            Ok(())
        }
    }

    fn backend(conn: &Arc<Conn>, replicas: u32) -> (LeaseBackend, Arc<Mutex<Vec<String>>>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&events);
        let backend = LeaseBackend {
            store: Some(Arc::clone(conn) as Arc<dyn LeaseStore>),
            expected_replicas: replicas,
            on_event: Some(Arc::new(move |e: LeaseEvent<'_>| {
                let line = match e {
                    LeaseEvent::StoreError { op, .. } => op.as_str().to_string(),
                    LeaseEvent::Lost { count, .. } => format!("lost {count}"),
                };
                seen.lock().unwrap().push(line);
            })),
        };
        (backend, events)
    }

    fn replica(tables: &Arc<Tables>, max: u32) -> (SharedLeases, Arc<Conn>) {
        let conn = Conn::new(tables);
        let (be, _) = backend(&conn, 2);
        let leases = SharedLeases::new("agent", max, SharedConfig { lease: TTL }, be);
        (leases, conn)
    }

    /// Lets spawned releases and renewals run.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_holds_across_replicas_and_a_release_frees_a_place() {
        let tables = Tables::new();
        let (a, _) = replica(&tables, 2);
        let (b, _) = replica(&tables, 2);
        let a1 = a.acquire(None).await.unwrap();
        let b1 = b.acquire(None).await.unwrap();
        assert_eq!(
            a.acquire(None).await.unwrap_err(),
            NoLease { timed_out: false }
        );
        assert_eq!(
            b.acquire(None).await.unwrap_err(),
            NoLease { timed_out: false }
        );
        assert_eq!(tables.live("agent"), 2);
        drop(a1);
        settle().await;
        assert_eq!(tables.live("agent"), 1);
        let b2 = b.acquire(None).await.unwrap();
        let st = b.stats();
        assert_eq!(
            (st.leased, st.local, st.waiting, st.in_use),
            (2, 0, 0, Some(2))
        );
        assert_eq!((st.leased_total, st.refused_total), (2, 1));
        drop((b1, b2));
        settle().await;
        assert_eq!(tables.live("agent"), 0);
        assert_eq!(b.stats().leased, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_keeps_leases_alive_and_a_dead_replica_s_expire_within_one_lease() {
        let tables = Tables::new();
        let (a, a_conn) = replica(&tables, 2);
        let (b, b_conn) = replica(&tables, 2);
        let _a1 = a.acquire(None).await.unwrap();
        let _a2 = a.acquire(None).await.unwrap();
        // Renewed every TTL/3: still held long after one lease.
        tokio::time::sleep(3 * TTL).await;
        assert!(b.acquire(None).await.is_err());
        assert!(a_conn.holds.load(Ordering::SeqCst) >= 9);
        // A's connection dies right after a renewal (as its process would).
        let renewals = a_conn.holds.load(Ordering::SeqCst);
        while a_conn.holds.load(Ordering::SeqCst) == renewals {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        a_conn.down.store(true, Ordering::SeqCst);
        let died = Instant::now();
        // Refused until the lease runs out, then admitted.
        let mut admitted = None;
        while admitted.is_none() {
            admitted = b.acquire(None).await.ok();
            if admitted.is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let took = died.elapsed();
        assert!(
            took >= TTL - Duration::from_millis(20) && took <= TTL + Duration::from_millis(20),
            "B admitted {took:?} after A died; the lease is {TTL:?}"
        );
        assert!(b_conn.holds.load(Ordering::SeqCst) > 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_the_place_when_it_frees_or_is_shed_at_its_deadline() {
        let tables = Tables::new();
        let (a, _) = replica(&tables, 1);
        let (b, _) = replica(&tables, 1);
        let held = a.acquire(None).await.unwrap();

        let started = Instant::now();
        let r = b.acquire(Some(started + Duration::from_secs(2))).await;
        assert_eq!(r.unwrap_err(), NoLease { timed_out: true });
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(b.stats().waiting, 0);

        // Released on the other replica while B waits: B has it within one
        // retry delay.
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move {
                let lease = b
                    .acquire(Some(Instant::now() + Duration::from_secs(10)))
                    .await;
                (lease, Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(b.stats().waiting, 1);
        let released = Instant::now();
        drop(held);
        let (lease, at) = waiter.await.unwrap();
        let lease = lease.unwrap();
        assert!(lease.waited());
        assert!(at - released <= RETRY_MAX, "{:?}", at - released);
        assert_eq!(b.stats().waiting, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_release_on_the_same_replica_wakes_a_waiter_at_once() {
        let tables = Tables::new();
        let (a, _) = replica(&tables, 1);
        let held = a.acquire(None).await.unwrap();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move {
                let lease = a
                    .acquire(Some(Instant::now() + Duration::from_secs(10)))
                    .await;
                (lease, Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        let released = Instant::now();
        drop(held);
        let (lease, at) = waiter.await.unwrap();
        assert!(lease.is_ok());
        assert_eq!(at, released, "woken by the release, not by its retry delay");
    }

    #[tokio::test(start_paused = true)]
    async fn without_redis_a_replica_runs_its_share_and_registers_it_when_redis_returns() {
        let tables = Tables::new();
        let conn = Conn::new(&tables);
        let (be, events) = backend(&conn, 2);
        let a = SharedLeases::new("agent", 4, SharedConfig { lease: TTL }, be);
        conn.down.store(true, Ordering::SeqCst);
        // 4 ÷ 2 replicas = 2 here.
        let l1 = a.acquire(None).await.unwrap();
        let l2 = a.acquire(None).await.unwrap();
        assert_eq!(
            a.acquire(None).await.unwrap_err(),
            NoLease { timed_out: false }
        );
        let st = a.stats();
        assert_eq!((st.leased, st.local, st.fallback_cap), (0, 2, 2));
        assert_eq!(st.store_errors_total, 3);
        assert_eq!(events.lock().unwrap().len(), 3);
        assert!(events.lock().unwrap().iter().all(|e| e == "lease_acquire"));
        // Redis returns: the next renewal takes leases for both.
        conn.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(TTL / 3 + Duration::from_millis(5)).await;
        let st = a.stats();
        assert_eq!((st.leased, st.local), (2, 0));
        assert_eq!(tables.live("agent"), 2);
        drop((l1, l2));
        settle().await;
        assert_eq!(tables.live("agent"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_lost_while_redis_was_away_runs_on_locally_and_is_reported() {
        let tables = Tables::new();
        let conn = Conn::new(&tables);
        let (be, events) = backend(&conn, 1);
        let a = SharedLeases::new("agent", 1, SharedConfig { lease: TTL }, be);
        let (b, _) = replica(&tables, 1);
        let held = a.acquire(None).await.unwrap();
        conn.down.store(true, Ordering::SeqCst);
        tokio::time::sleep(TTL + Duration::from_millis(10)).await;
        // A's lease expired; B takes the place.
        let _b1 = b.acquire(None).await.unwrap();
        conn.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(TTL / 3).await;
        let st = a.stats();
        assert_eq!((st.leased, st.local, st.lost_total), (0, 1, 1));
        assert!(events.lock().unwrap().contains(&"lost 1".to_string()));
        assert!(events.lock().unwrap().contains(&"lease_renew".to_string()));
        drop(held);
        settle().await;
        assert_eq!(tables.live("agent"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_failed_after_redis_applied_it_is_given_back() {
        let tables = Tables::new();
        let conn = Conn::new(&tables);
        let (be, _) = backend(&conn, 1);
        let a = SharedLeases::new("agent", 1, SharedConfig { lease: TTL }, be);
        let (b, _) = replica(&tables, 1);
        let _b1 = b.acquire(None).await.unwrap();
        // The only place is B's; A's hold is refused (and fails): nothing
        // of A's stays in Redis.
        conn.apply_then_fail.store(true, Ordering::SeqCst);
        let _a1 = a.acquire(None).await.unwrap(); // the local share (1 ÷ 1)
        assert!(a.acquire(None).await.is_err());
        settle().await;
        assert_eq!(tables.live("agent"), 1);

        // With room, the applied-but-failed hold becomes a local lease,
        // and the first renewal finds it in Redis.
        let tables = Tables::new();
        let conn = Conn::new(&tables);
        let (be, _) = backend(&conn, 1);
        let a = SharedLeases::new("agent", 2, SharedConfig { lease: TTL }, be);
        conn.apply_then_fail.store(true, Ordering::SeqCst);
        let lease = a.acquire(None).await.unwrap();
        assert_eq!((a.stats().leased, a.stats().local), (0, 1));
        assert_eq!(tables.live("agent"), 1);
        conn.apply_then_fail.store(false, Ordering::SeqCst);
        tokio::time::sleep(TTL / 3 + Duration::from_millis(5)).await;
        assert_eq!((a.stats().leased, a.stats().local), (1, 0));
        drop(lease);
        settle().await;
        assert_eq!(tables.live("agent"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_nothing_behind() {
        let tables = Tables::new();
        let (a, _) = replica(&tables, 1);
        let (b, _) = replica(&tables, 1);
        let held = a.acquire(None).await.unwrap();
        let task = {
            let b = b.clone();
            tokio::spawn(async move {
                b.acquire(Some(Instant::now() + Duration::from_secs(60)))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(b.stats().waiting, 1);
        task.abort();
        let _ = task.await;
        settle().await;
        assert_eq!(b.stats().waiting, 0);
        drop(held);
        settle().await;
        assert_eq!(tables.live("agent"), 0);
        // The renewal task stops once nothing is held.
        tokio::time::sleep(TTL).await;
        assert!(!a.inner.lock().renewing);
    }

    fn shared_config(max: u32, queue: Option<Duration>) -> ConcurrencyConfig {
        ConcurrencyConfig {
            max_in_flight: Some(max),
            per_identity: None,
            queue: queue.map(|max_wait| QueueConfig {
                max_depth: 10,
                max_wait,
                priority: PriorityConfig::default(),
            }),
            shared: Some(SharedConfig { lease: TTL }),
        }
    }

    fn limiter(tables: &Arc<Tables>, config: ConcurrencyConfig) -> ConcurrencyLimiter {
        let conn = Conn::new(tables);
        let (be, _) = backend(&conn, 2);
        ConcurrencyLimiter::for_route("agent", config, be)
    }

    #[tokio::test(start_paused = true)]
    async fn the_limiter_holds_a_lease_per_slot_and_sheds_when_the_fleet_is_full() {
        let tables = Tables::new();
        let a = limiter(&tables, shared_config(2, None));
        let b = limiter(&tables, shared_config(2, None));
        let a1 = a.acquire(None, 0).await.unwrap();
        let b1 = b.acquire(None, 0).await.unwrap();
        // B has local room (1 of 2) but the fleet is full.
        match b.acquire(None, 0).await {
            Err(Rejected::Shed {
                cause: ShedCause::SharedFull,
                retry_after,
                ..
            }) => assert_eq!(retry_after, Duration::from_secs(1)),
            other => panic!("expected SharedFull, got {other:?}"),
        }
        let st = b.stats();
        assert_eq!((st.in_flight, st.shed_shared_full), (1, 1));
        assert_eq!(st.shared.as_ref().map(|s| s.leased), Some(1));
        drop(a1);
        settle().await;
        let b2 = b.acquire(None, 0).await.unwrap();
        assert_eq!(b.in_flight(), 2);
        drop((b1, b2));
        settle().await;
        assert_eq!((b.in_flight(), tables.live("agent")), (0, 0));
        assert_eq!(b.stats().shared.map(|s| s.leased), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_limiter_waits_for_a_lease_within_max_wait() {
        let tables = Tables::new();
        let a = limiter(&tables, shared_config(1, None));
        let b = limiter(&tables, shared_config(1, Some(Duration::from_secs(2))));
        let held = a.acquire(None, 0).await.unwrap();
        let started = Instant::now();
        match b.acquire(None, 0).await {
            Err(Rejected::Shed {
                cause: ShedCause::Timeout,
                queued_for,
                ..
            }) => assert_eq!(queued_for, Duration::from_secs(2)),
            other => panic!("expected Timeout, got {other:?}"),
        }
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(b.in_flight(), 0, "the local slot was given back");

        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.acquire(None, 0).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let st = b.stats();
        assert_eq!((st.in_flight, st.shared.map(|s| s.waiting)), (1, Some(1)));
        drop(held);
        let slot = waiter.await.unwrap().unwrap();
        assert!(slot.queued_for() >= Duration::from_millis(500));
        assert!(slot.queued_for() < Duration::from_millis(800));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_can_share_a_route_and_unshare_it_without_losing_a_lease() {
        let tables = Tables::new();
        let mut config = shared_config(2, None);
        config.shared = None;
        let l = limiter(&tables, config.clone());
        let plain = l.acquire(None, 0).await.unwrap();
        assert_eq!(tables.live("agent"), 0);
        l.reconfigure(shared_config(2, None));
        let leased = l.acquire(None, 0).await.unwrap();
        assert_eq!(tables.live("agent"), 1);
        l.reconfigure(config);
        assert!(l.stats().shared.is_none());
        drop((plain, leased));
        settle().await;
        assert_eq!((l.in_flight(), tables.live("agent")), (0, 0));
    }
}
