//! Concurrency limits: how many requests a route runs at once, how many of
//! them one identity may hold, the priority queue in front of a full route,
//! and the pace of outgoing calls to a backend.
//!
//! Three pieces, each usable on its own:
//!
//! - [`ConcurrencyLimiter`] (`routes[].concurrency`): an in-flight cap per
//!   route (`max_in_flight`), a cap per identity (`per_identity`), and an
//!   optional admission [`queue`](QueueConfig) with priority classes. A
//!   request is admitted with a [`Slot`], an RAII guard that gives its place
//!   back when dropped, on every path (success, error, a cancelled future, a
//!   client that went away).
//! - [`Pacer`] (`backends.*.limits`): outgoing calls to one backend, across
//!   every route that uses it. At most `max_in_flight` calls at once, at most
//!   `per_minute` started in any 60 s, at least `min_spacing` between two
//!   starts; the excess waits in a bounded FIFO for at most `max_wait`. Each
//!   admitted call holds a [`CallPermit`].
//! - [`AdmissionRegistry`]: the limiters and pacers by route and backend
//!   name, kept across reloads so that a reload never forgets who holds a
//!   slot.
//!
//! # Admission, step by step (`ConcurrencyLimiter::acquire`)
//!
//! 1. **Per identity.** When `per_identity` is set and the request has an
//!    identity that already holds `per_identity` places on the route
//!    (running *or queued*), it is refused at once:
//!    [`Rejected::PerIdentity`] (429 `concurrency_limit`). Counting queued
//!    places too means one identity cannot fill the queue either. A request
//!    without an identity is not limited per identity.
//! 2. **Capacity.** When fewer than `max_in_flight` requests run, the
//!    request runs now. This fast path takes one uncontended mutex and
//!    allocates nothing (except the first time an identity is seen: its key
//!    is interned as an `Arc<str>` shared by its slots).
//! 3. **Queue.** Otherwise, without a `queue` the request is shed at once
//!    ([`ShedCause::NoQueue`]); with one it waits in its priority class.
//!
//! # The queue and its starvation policy
//!
//! - **Strict priority between classes.** When a slot frees, it is handed
//!   directly to the oldest waiter of the highest-priority non-empty class
//!   (`classes[0]` is the highest). The slot never becomes free in between,
//!   so a newcomer cannot overtake a waiter, and only one waiter is woken
//!   (no thundering herd).
//! - **FIFO within a class**, by arrival.
//! - **No aging.** A lower class is served only while every higher class is
//!   empty, so under sustained high-priority load it can starve; what bounds
//!   it is `max_wait`: no request waits longer than `max_wait`, it is then
//!   shed ([`ShedCause::Timeout`], 503 `overloaded`). So a batch job either
//!   gets a slot within `max_wait` or a clean 503 it can retry.
//! - **A full queue** (`max_depth` waiters across all classes): if the
//!   newcomer's class is higher than the lowest non-empty class, the newest
//!   waiter of that lowest class is shed ([`ShedCause::Displaced`]) and the
//!   newcomer takes its place; otherwise the newcomer is shed
//!   ([`ShedCause::QueueFull`]). An interactive request is therefore never
//!   turned away because batch jobs filled the queue.
//! - **A waiter that leaves** (its future is dropped because the client went
//!   away) is removed from the queue at once and never consumes a slot; a
//!   slot handed to it in the same instant is passed on to the next waiter.
//!
//! # Retry-After
//!
//! Every refusal carries a `retry_after` (at least one second):
//! - per identity, no queue, queue timeout, displaced, shared cap full:
//!   1 s (when a running request ends is unknowable);
//! - a full queue: until the oldest waiter is certain to have left the queue
//!   (`max_wait` minus the time it has waited), which frees a place.
//!
//! # Reloads
//!
//! [`ConcurrencyLimiter::reconfigure`] applies new limits in place and keeps
//! the counts: a raised `max_in_flight` admits waiters at once; a lowered one
//! lets running requests finish and admits nobody until the count is below
//! it. Waiters keep the deadline they queued with; a class that disappeared
//! merges into the new lowest class (keeping arrival order).
//!
//! # A cap across replicas (`shared: true`)
//!
//! A shared route admits a request in two steps: the local steps above
//! (per identity, the instance's own count against `max_in_flight`, the
//! priority queue), then a *lease* on one of the route's `max_in_flight`
//! places across the fleet, taken in Redis before the request runs and held
//! by the [`Slot`] ([`SharedLeases`], rules in [`shared`]). When the fleet
//! is full, a request of a route without a queue is shed at once
//! ([`ShedCause::SharedFull`]); with a queue it keeps trying until
//! `max_wait` (from its arrival) and is then shed ([`ShedCause::Timeout`]).
//! While Redis cannot be reached, each instance admits up to
//! `max_in_flight ÷ store.redis.expected_replicas` on its own.
//! `per_identity` stays a cap per instance.
//!
//! # Approximations
//!
//! None on one instance: counts are exact (one mutex per route). Across
//! replicas: requests waiting for a lease are not ordered by priority
//! between instances (within one, the local queue orders them before they
//! try); a replica that dies holds its places until its leases expire (one
//! `lease`, 10 s by default); while Redis is away, the cap is the local
//! share, and requests admitted then are counted in Redis only once a
//! renewal finds room for them.

pub mod adaptive;
pub(crate) mod identity;
mod lease;
mod limiter;
mod pacer;
mod queue;
mod registry;
pub mod shared;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use lease::{
    Lease, LeaseBackend, LeaseEvent, LeaseHook, LeaseOp, LeaseStore, NoLease, SharedLeases,
    SharedStats,
};
pub use limiter::{ClassDepth, ConcurrencyLimiter, ConcurrencyStats, Slot};
pub use pacer::{
    CallLimits, CallPermit, Pace, PaceState, Pacer, PacerStats, QuotaCause, UpstreamQuota,
    DEFAULT_CALL_MAX_QUEUE, DEFAULT_CALL_MAX_WAIT, RATE_WINDOW,
};
pub use registry::{Admission, AdmissionRegistry, RouteAdmission};
pub use shared::{HoldReply, LeaseTable, SharedConfig};

/// `queue.max_depth` when not set.
pub const DEFAULT_QUEUE_MAX_DEPTH: u32 = 100;
/// `queue.max_wait` when not set.
pub const DEFAULT_QUEUE_MAX_WAIT: Duration = Duration::from_secs(10);
/// The one class of a queue without `priority`.
pub const DEFAULT_CLASS: &str = "default";
/// The most priority classes a queue may have.
pub const MAX_CLASSES: usize = 16;
/// The smallest `retry_after` of any refusal.
pub const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// `routes[].concurrency`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcurrencyConfig {
    /// Requests running at once on the route; `None` = no route cap.
    pub max_in_flight: Option<u32>,
    /// Requests one identity may have running or queued on the route.
    pub per_identity: Option<u32>,
    /// Where requests wait when `max_in_flight` is reached; `None` = they
    /// are shed at once. Only set together with `max_in_flight`.
    pub queue: Option<QueueConfig>,
    /// `shared: true`: `max_in_flight` holds across replicas (leases in
    /// Redis). Only set together with `max_in_flight` and `store.redis`.
    pub shared: Option<SharedConfig>,
}

/// `routes[].concurrency.queue`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Waiters across all classes (`>= 1`).
    pub max_depth: u32,
    /// The longest a request waits before it is shed.
    pub max_wait: Duration,
    pub priority: PriorityConfig,
}

/// `routes[].concurrency.queue.priority`, compiled: class names by index,
/// highest priority first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorityConfig {
    /// Lower-case request header naming the class, e.g. `x-priority`.
    pub header: Option<String>,
    /// 1..=[`MAX_CLASSES`] distinct names, highest priority first.
    pub classes: Vec<String>,
    /// Index of the class of a request that names none.
    pub default: usize,
    /// Index of the class of a streaming request (`stream: true`) that
    /// names none in the header.
    pub streaming: Option<usize>,
}

impl Default for PriorityConfig {
    /// One class, [`DEFAULT_CLASS`]: plain FIFO.
    fn default() -> Self {
        PriorityConfig {
            header: None,
            classes: vec![DEFAULT_CLASS.to_string()],
            default: 0,
            streaming: None,
        }
    }
}

impl PriorityConfig {
    /// The class of a request: the class named by the header value
    /// (`header_value`, matched case-insensitively after trimming) if it
    /// names one, else `streaming` for a streaming request if set, else
    /// `default`. An unknown header value is ignored.
    pub fn class_for(&self, header_value: Option<&[u8]>, streaming: bool) -> usize {
        if let Some(value) = header_value {
            let value = value.trim_ascii();
            if let Some(i) = self
                .classes
                .iter()
                .position(|c| c.as_bytes().eq_ignore_ascii_case(value))
            {
                return i;
            }
        }
        match (streaming, self.streaming) {
            (true, Some(class)) => class,
            _ => self.default,
        }
    }

    /// The name of class `index` (the last class for an index past the end).
    pub fn class_name(&self, index: usize) -> &str {
        self.classes
            .get(index)
            .or(self.classes.last())
            .map_or(DEFAULT_CLASS, String::as_str)
    }
}

impl ConcurrencyConfig {
    /// The queue class of a request (0 when the route has no queue). See
    /// [`PriorityConfig::class_for`].
    pub fn class_for(&self, header_value: Option<&[u8]>, streaming: bool) -> usize {
        self.queue
            .as_ref()
            .map_or(0, |q| q.priority.class_for(header_value, streaming))
    }

    /// The priority header to read, if any.
    pub fn priority_header(&self) -> Option<&str> {
        self.queue.as_ref()?.priority.header.as_deref()
    }
}

/// Why a request was not admitted to a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The identity already holds `limit` places (running or queued): 429,
    /// reason `concurrency_limit`.
    #[error("too many concurrent requests for this caller on this route (at most {limit})")]
    PerIdentity { limit: u32, retry_after: Duration },
    /// The route is full and the request could not wait: 503, reason
    /// `overloaded`.
    #[error("the service is overloaded ({})", cause.describe())]
    Shed {
        cause: ShedCause,
        retry_after: Duration,
        /// How long the request waited in the queue before it was shed.
        queued_for: Duration,
    },
}

impl Rejected {
    pub fn retry_after(&self) -> Duration {
        match self {
            Rejected::PerIdentity { retry_after, .. } | Rejected::Shed { retry_after, .. } => {
                *retry_after
            }
        }
    }
}

/// Why a request was shed, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShedCause {
    /// The route is full and has no queue.
    NoQueue,
    /// The queue is full of waiters of this class or higher.
    QueueFull,
    /// A higher-priority request took this waiter's place in a full queue.
    Displaced,
    /// The request waited `max_wait` (in the queue, or for a lease).
    Timeout,
    /// A shared route is full across replicas and has no queue.
    SharedFull,
}

impl ShedCause {
    pub const ALL: [ShedCause; 5] = [
        ShedCause::NoQueue,
        ShedCause::QueueFull,
        ShedCause::Displaced,
        ShedCause::Timeout,
        ShedCause::SharedFull,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ShedCause::NoQueue => "no_queue",
            ShedCause::QueueFull => "queue_full",
            ShedCause::Displaced => "displaced",
            ShedCause::Timeout => "timeout",
            ShedCause::SharedFull => "shared_full",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            ShedCause::NoQueue => "the route is at its concurrency limit",
            ShedCause::QueueFull => "the route's queue is full",
            ShedCause::Displaced => "a higher-priority request took this one's place in the queue",
            ShedCause::Timeout => "waited too long in the route's queue",
            ShedCause::SharedFull => "the route is at its concurrency limit across replicas",
        }
    }
}
