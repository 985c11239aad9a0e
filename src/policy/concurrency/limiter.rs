//! [`ConcurrencyLimiter`]: a route's in-flight cap, per-identity cap and
//! priority queue behind one mutex, and the [`Slot`] guard. The policy is
//! described in the module above (`super`).
//!
//! **Invariant.** While the route has room (`in_flight < max_in_flight`)
//! the queue is empty: a released slot is handed to the next waiter before
//! the count goes down, and a reload that adds room admits waiters at once.
//! So a newcomer can never overtake a waiter.
//!
//! **Hand-off and cancellation.** A waiter is a queue entry holding the
//! sending half of a oneshot channel; its future holds the receiving half.
//! Whoever removes an entry does so under the mutex: the releaser (which
//! sends the slot), a displacing newcomer (which sends `Displaced`), or the
//! waiter itself (timeout, or its future dropped). A dropped waiter that
//! finds its entry already gone knows a grant is in its channel, and passes
//! the slot on, so no slot is ever lost and none is given to a waiter that
//! has left.
//!
//! **Shared routes.** After the local slot, [`ConcurrencyLimiter::acquire`]
//! takes a lease from the route's [`SharedLeases`] (outside the mutex) and
//! keeps it in the [`Slot`]; if none can be had, the local slot is given
//! back (to the next waiter) and the request is shed.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::identity::IdentityCounts;
use super::lease::{Lease, LeaseBackend, SharedLeases, SharedStats};
use super::queue::PriorityQueue;
use super::{ConcurrencyConfig, Rejected, ShedCause, DEFAULT_CLASS, MIN_RETRY_AFTER};

/// A route's concurrency limits (`routes[].concurrency`). Cheap to clone:
/// clones share the same counts.
#[derive(Clone)]
pub struct ConcurrencyLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    /// The route's name (the key of its leases when shared).
    route: String,
    /// Where leases come from if the route is, or becomes, shared.
    leases: LeaseBackend,
    state: Mutex<State>,
}

struct State {
    config: ConcurrencyConfig,
    in_flight: u32,
    /// Running or queued places per identity, when `per_identity` is set.
    identities: IdentityCounts,
    queue: PriorityQueue<Waiter>,
    next_ticket: u64,
    counters: Counters,
    /// `Some` while the route is shared.
    shared: Option<SharedLeases>,
}

struct Waiter {
    tx: oneshot::Sender<Grant>,
    identity: Option<Arc<str>>,
    since: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    /// A slot was handed over; the count already includes it.
    Slot,
    /// A higher-priority newcomer took this waiter's place.
    Displaced,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    admitted: u64,
    admitted_after_wait: u64,
    queued: u64,
    rejected_per_identity: u64,
    shed: [u64; 5],
    abandoned: u64,
}

impl Counters {
    fn shed(&mut self, cause: ShedCause) {
        self.shed[cause as usize] += 1;
    }
}

/// A place on a route, held while the request runs (its response streamed
/// included). Dropping it gives the place back: to the next waiter if there
/// is one, else to the route.
#[must_use = "the slot is released as soon as it is dropped"]
pub struct Slot {
    inner: Arc<Inner>,
    identity: Option<Arc<str>>,
    queued_for: Duration,
    /// The place across replicas, on a shared route; given back (after the
    /// local place) when the slot is dropped.
    lease: Option<Lease>,
}

impl Slot {
    /// How long the request waited in the queue (zero when admitted at once).
    pub fn queued_for(&self) -> Duration {
        self.queued_for
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("identity", &self.identity)
            .field("queued_for", &self.queued_for)
            .field("lease", &self.lease)
            .finish()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let identity = self.identity.take();
        self.inner.lock().release_slot(identity);
    }
}

/// Waiters per class, for `/admin/status` and the queue-depth gauge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassDepth {
    pub class: String,
    pub depth: usize,
}

/// A snapshot of a route's counts and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcurrencyStats {
    /// Requests holding a slot now.
    pub in_flight: u32,
    pub max_in_flight: Option<u32>,
    pub per_identity: Option<u32>,
    /// Identities with at least one request running or queued.
    pub identities: usize,
    /// Waiters per class, highest priority first (one entry, `default`,
    /// without a queue).
    pub queued: Vec<ClassDepth>,
    /// How long the oldest waiter has waited (zero when none).
    pub oldest_wait: Duration,
    /// Admitted without waiting (counter).
    pub admitted: u64,
    /// Admitted after waiting in the queue (counter).
    pub admitted_after_wait: u64,
    /// Requests that joined the queue (counter).
    pub queued_total: u64,
    /// Refused per identity (counter).
    pub rejected_per_identity: u64,
    /// Shed, by cause (counters).
    pub shed_no_queue: u64,
    pub shed_queue_full: u64,
    pub shed_displaced: u64,
    pub shed_timeout: u64,
    pub shed_shared_full: u64,
    /// Waiters that left (client gone) before getting a slot (counter).
    pub abandoned: u64,
    /// The leases of a shared route. Its requests waiting for a lease hold
    /// a local slot, so `in_flight` counts them too (`shared.waiting`).
    pub shared: Option<SharedStats>,
}

impl ConcurrencyStats {
    /// Waiters across all classes.
    pub fn queue_depth(&self) -> usize {
        self.queued.iter().map(|c| c.depth).sum()
    }

    /// The shed counter of `cause`.
    pub fn shed(&self, cause: ShedCause) -> u64 {
        match cause {
            ShedCause::NoQueue => self.shed_no_queue,
            ShedCause::QueueFull => self.shed_queue_full,
            ShedCause::Displaced => self.shed_displaced,
            ShedCause::Timeout => self.shed_timeout,
            ShedCause::SharedFull => self.shed_shared_full,
        }
    }
}

enum Admit {
    Now(Slot),
    Wait(Waiting),
}

impl ConcurrencyLimiter {
    /// A limiter without a lease store (a shared route then always applies
    /// the fallback share, see [`SharedLeases`]).
    pub fn new(config: ConcurrencyConfig) -> Self {
        Self::for_route("", config, LeaseBackend::default())
    }

    /// The limiter of route `route`, leasing from `leases` when shared.
    pub fn for_route(route: &str, config: ConcurrencyConfig, leases: LeaseBackend) -> Self {
        let classes = config
            .queue
            .as_ref()
            .map_or(1, |q| q.priority.classes.len());
        let shared = config
            .shared
            .map(|c| SharedLeases::new(route, shared_max(&config), c, leases.clone()));
        ConcurrencyLimiter {
            inner: Arc::new(Inner {
                route: route.to_string(),
                leases,
                state: Mutex::new(State {
                    config,
                    in_flight: 0,
                    identities: IdentityCounts::default(),
                    queue: PriorityQueue::new(classes),
                    next_ticket: 0,
                    counters: Counters::default(),
                    shared,
                }),
            }),
        }
    }

    /// Admits a request of priority `class` (from
    /// [`ConcurrencyConfig::class_for`]) for `identity`, waiting in the queue
    /// if need be (see the module docs for the order of checks).
    ///
    /// Returns at once when the route has room or the request is refused;
    /// otherwise resolves when a slot is handed over or the request is shed
    /// (after `max_wait` at most). Dropping the future leaves the queue.
    ///
    /// On a shared route the request then takes a lease (see the module
    /// docs of `super`): it may wait for one until `max_wait` from its
    /// arrival when the route has a queue, and is shed otherwise.
    pub async fn acquire(&self, identity: Option<&str>, class: usize) -> Result<Slot, Rejected> {
        let arrived = Instant::now();
        let mut slot = match self.admit(identity, class)? {
            Admit::Now(slot) => slot,
            Admit::Wait(waiting) => waiting.wait().await?,
        };
        let (leases, max_wait) = {
            let state = self.inner.lock();
            (
                state.shared.clone(),
                state.config.queue.as_ref().map(|q| q.max_wait),
            )
        };
        let Some(leases) = leases else {
            return Ok(slot);
        };
        match leases.acquire(max_wait.map(|w| arrived + w)).await {
            Ok(lease) => {
                if lease.waited() || !slot.queued_for.is_zero() {
                    slot.queued_for = arrived.elapsed();
                }
                slot.lease = Some(lease);
                Ok(slot)
            }
            Err(refused) => {
                let cause = if refused.timed_out {
                    ShedCause::Timeout
                } else {
                    ShedCause::SharedFull
                };
                self.inner.lock().counters.shed(cause);
                // Gives the local place to the next waiter.
                drop(slot);
                Err(shed(cause, MIN_RETRY_AFTER, arrived.elapsed()))
            }
        }
    }

    /// Applies a reloaded configuration, keeping the counts (see the module
    /// docs). A change of `per_identity` applies to new requests.
    pub fn reconfigure(&self, config: ConcurrencyConfig) {
        let mut state = self.inner.lock();
        let classes = config
            .queue
            .as_ref()
            .map_or(1, |q| q.priority.classes.len());
        state.queue.resize(classes);
        match (&state.shared, config.shared) {
            (Some(leases), Some(c)) => leases.reconfigure(shared_max(&config), c),
            (None, Some(c)) => {
                state.shared = Some(SharedLeases::new(
                    &self.inner.route,
                    shared_max(&config),
                    c,
                    self.inner.leases.clone(),
                ));
            }
            // Running requests keep their leases and give them back when
            // they end.
            (Some(_), None) => state.shared = None,
            (None, None) => {}
        }
        state.config = config;
        state.grant_waiters();
    }

    /// The configuration in force.
    pub fn config(&self) -> ConcurrencyConfig {
        self.inner.lock().config.clone()
    }

    /// Requests holding a slot now.
    pub fn in_flight(&self) -> u32 {
        self.inner.lock().in_flight
    }

    /// Waiters across all classes.
    pub fn queue_depth(&self) -> usize {
        self.inner.lock().queue.len()
    }

    pub fn stats(&self) -> ConcurrencyStats {
        let state = self.inner.lock();
        let names: Vec<String> = match &state.config.queue {
            Some(q) => q.priority.classes.clone(),
            None => vec![DEFAULT_CLASS.to_string()],
        };
        let queued = state
            .queue
            .depths()
            .enumerate()
            .map(|(i, depth)| ClassDepth {
                class: names
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| DEFAULT_CLASS.to_string()),
                depth,
            })
            .collect();
        let oldest_wait = state
            .queue
            .oldest()
            .map_or(Duration::ZERO, |w| w.since.elapsed());
        let c = state.counters;
        ConcurrencyStats {
            in_flight: state.in_flight,
            max_in_flight: state.config.max_in_flight,
            per_identity: state.config.per_identity,
            identities: state.identities.len(),
            queued,
            oldest_wait,
            admitted: c.admitted,
            admitted_after_wait: c.admitted_after_wait,
            queued_total: c.queued,
            rejected_per_identity: c.rejected_per_identity,
            shed_no_queue: c.shed[ShedCause::NoQueue as usize],
            shed_queue_full: c.shed[ShedCause::QueueFull as usize],
            shed_displaced: c.shed[ShedCause::Displaced as usize],
            shed_timeout: c.shed[ShedCause::Timeout as usize],
            shed_shared_full: c.shed[ShedCause::SharedFull as usize],
            abandoned: c.abandoned,
            shared: state.shared.as_ref().map(SharedLeases::stats),
        }
    }

    /// The synchronous part of [`ConcurrencyLimiter::acquire`].
    fn admit(&self, identity: Option<&str>, class: usize) -> Result<Admit, Rejected> {
        let mut guard = self.inner.lock();
        let state = &mut *guard;
        let tracked = match (state.config.per_identity, identity) {
            (Some(limit), Some(id)) => {
                if state.identities.get(id) >= limit {
                    state.counters.rejected_per_identity += 1;
                    return Err(Rejected::PerIdentity {
                        limit,
                        retry_after: MIN_RETRY_AFTER,
                    });
                }
                Some(id)
            }
            _ => None,
        };

        if state.has_room() {
            state.in_flight += 1;
            state.counters.admitted += 1;
            let identity = tracked.map(|id| state.identities.acquire(id));
            return Ok(Admit::Now(Slot {
                inner: Arc::clone(&self.inner),
                identity,
                queued_for: Duration::ZERO,
                lease: None,
            }));
        }

        let Some(queue) = &state.config.queue else {
            state.counters.shed(ShedCause::NoQueue);
            return Err(shed(ShedCause::NoQueue, MIN_RETRY_AFTER, Duration::ZERO));
        };
        let max_wait = queue.max_wait;
        let now = Instant::now();
        if state.queue.len() >= queue.max_depth as usize {
            match state.queue.pop_displaceable(class) {
                Some((_, victim)) => {
                    state.release_identity(victim.identity.as_deref());
                    state.counters.shed(ShedCause::Displaced);
                    // The victim's future is alive: its entry was in the queue.
                    let _ = victim.tx.send(Grant::Displaced);
                }
                None => {
                    // A place frees at the latest when the oldest waiter's
                    // `max_wait` runs out.
                    let retry_after = state.queue.oldest().map_or(MIN_RETRY_AFTER, |w| {
                        (w.since + max_wait).saturating_duration_since(now)
                    });
                    state.counters.shed(ShedCause::QueueFull);
                    return Err(shed(
                        ShedCause::QueueFull,
                        retry_after.max(MIN_RETRY_AFTER),
                        Duration::ZERO,
                    ));
                }
            }
        }

        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let identity = tracked.map(|id| state.identities.acquire(id));
        let (tx, rx) = oneshot::channel();
        state.queue.push(
            class,
            ticket,
            Waiter {
                tx,
                identity: identity.clone(),
                since: now,
            },
        );
        state.counters.queued += 1;
        Ok(Admit::Wait(Waiting {
            inner: Arc::clone(&self.inner),
            ticket,
            rx,
            identity,
            since: now,
            deadline: now + max_wait,
            settled: false,
        }))
    }
}

impl std::fmt::Debug for ConcurrencyLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.lock();
        f.debug_struct("ConcurrencyLimiter")
            .field("config", &state.config)
            .field("in_flight", &state.in_flight)
            .field("queued", &state.queue.len())
            .finish()
    }
}

/// The cap across replicas of a shared route (`max_in_flight`; the config
/// never makes a shared route without it).
fn shared_max(config: &ConcurrencyConfig) -> u32 {
    config.max_in_flight.unwrap_or(u32::MAX)
}

fn shed(cause: ShedCause, retry_after: Duration, queued_for: Duration) -> Rejected {
    Rejected::Shed {
        cause,
        retry_after,
        queued_for,
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the counts consistent
        // (every update is a single step), so keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn has_room(&self) -> bool {
        self.config
            .max_in_flight
            .is_none_or(|max| self.in_flight < max)
    }

    fn release_identity(&mut self, identity: Option<&str>) {
        if let Some(id) = identity {
            self.identities.release(id);
        }
    }

    /// Gives back one slot (counted in `in_flight`): hands it to the next
    /// waiter while the route is within its limit, else frees it.
    fn release_slot(&mut self, identity: Option<Arc<str>>) {
        self.release_identity(identity.as_deref());
        let within_limit = self
            .config
            .max_in_flight
            .is_none_or(|max| self.in_flight <= max);
        if within_limit && self.hand_over() {
            return;
        }
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Sends a slot to the next live waiter; false when there is none.
    fn hand_over(&mut self) -> bool {
        while let Some((_, waiter)) = self.queue.pop_next() {
            match waiter.tx.send(Grant::Slot) {
                Ok(()) => {
                    self.counters.admitted_after_wait += 1;
                    return true;
                }
                // Unreachable while waiters remove their entry before their
                // receiver goes; if it happens, the place is theirs no more.
                Err(_) => self.release_identity(waiter.identity.as_deref()),
            }
        }
        false
    }

    /// Admits waiters while there is room (after a reload raised the limit).
    fn grant_waiters(&mut self) {
        while self.has_room() && !self.queue.is_empty() {
            self.in_flight += 1;
            if !self.hand_over() {
                self.in_flight -= 1;
                break;
            }
        }
    }
}

/// A queued request: its ticket, and the channel its slot arrives on.
/// Dropping it before it settles leaves the queue (see the module docs).
struct Waiting {
    inner: Arc<Inner>,
    ticket: u64,
    rx: oneshot::Receiver<Grant>,
    identity: Option<Arc<str>>,
    since: Instant,
    deadline: Instant,
    /// The outcome was taken (a slot or a refusal); nothing to undo on drop.
    settled: bool,
}

impl Waiting {
    async fn wait(mut self) -> Result<Slot, Rejected> {
        let deadline = self.deadline;
        let received = tokio::select! {
            biased;
            grant = &mut self.rx => Some(grant.unwrap_or(Grant::Displaced)),
            () = tokio::time::sleep_until(deadline) => None,
        };
        let grant = match received {
            Some(grant) => grant,
            None => self.expire()?,
        };
        self.settled = true;
        let queued_for = self.since.elapsed();
        match grant {
            Grant::Slot => Ok(Slot {
                inner: Arc::clone(&self.inner),
                identity: self.identity.take(),
                queued_for,
                lease: None,
            }),
            Grant::Displaced => Err(shed(ShedCause::Displaced, MIN_RETRY_AFTER, queued_for)),
        }
    }

    /// `max_wait` is up: leave the queue, unless a grant won the race.
    fn expire(&mut self) -> Result<Grant, Rejected> {
        let mut state = self.inner.lock();
        if let Some(waiter) = state.queue.remove(self.ticket) {
            state.release_identity(waiter.identity.as_deref());
            state.counters.shed(ShedCause::Timeout);
            self.settled = true;
            return Err(shed(
                ShedCause::Timeout,
                MIN_RETRY_AFTER,
                self.since.elapsed(),
            ));
        }
        // The entry is gone, so its remover has already sent the outcome.
        Ok(self.rx.try_recv().unwrap_or(Grant::Displaced))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut state = self.inner.lock();
        if let Some(waiter) = state.queue.remove(self.ticket) {
            state.counters.abandoned += 1;
            state.release_identity(waiter.identity.as_deref());
            return;
        }
        if let Ok(Grant::Slot) = self.rx.try_recv() {
            // Handed a slot in the same instant the client left: pass it on.
            state.counters.abandoned += 1;
            let identity = self.identity.take();
            state.release_slot(identity);
        }
    }
}
