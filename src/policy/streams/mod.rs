//! Stream slots: how many long-lived streaming responses run at once, in
//! the whole instance, per route and per identity.
//!
//! A *stream* is a request that asks for `stream: true`, or whose response
//! turns out to be SSE (`text/event-stream`). The proxy takes a
//! [`StreamSlot`] from the route's [`StreamLimiter`] as soon as it knows
//! the request is one, and holds it until the response ends; dropping the
//! slot gives it back on every path (end of stream, upstream error, client
//! disconnect, `max_duration`, reload, shutdown), so the active-stream
//! gauges always return to exactly zero.
//!
//! **Checks, in order** (there is no queue: a stream is refused at once):
//! 1. `routes[].streams.per_identity`: the identity already has that many
//!    streams on the route → [`StreamScope::Identity`], 429;
//! 2. `routes[].streams.max_concurrent` → [`StreamScope::Route`], 503;
//! 3. `server.streams.max_concurrent`, shared by every route
//!    ([`StreamCap`]) → [`StreamScope::Instance`], 503.
//!
//! All three answer with reason `stream_limit` and `Retry-After: 1` (when a
//! running stream ends cannot be known). A refused stream takes nothing.
//! A request without an identity is not limited per identity.
//!
//! `max_duration` is only carried here ([`StreamLimiter::max_duration`]):
//! the proxy ends a stream open that long with a final SSE error event
//! (`stream_timeout`).
//!
//! **Exactness.** The instance count is one atomic (compare-and-swap, never
//! above the cap); a route's counts sit under one mutex, with identity keys
//! removed as soon as their count returns to zero. Caps are per instance.
//!
//! **Reloads.** [`StreamLimiter::reconfigure`] and [`StreamCap::set_max`]
//! keep the counts: a lowered cap lets running streams finish and refuses
//! new ones until the count is below it. A `per_identity` set by a reload
//! counts only streams that start after it.

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::policy::concurrency::identity::IdentityCounts;
use crate::policy::concurrency::MIN_RETRY_AFTER;

/// `routes[].streams`, compiled. The default limits nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamsConfig {
    /// Streams at once on the route.
    pub max_concurrent: Option<u32>,
    /// Streams at once per identity on the route.
    pub per_identity: Option<u32>,
    /// A stream open this long is ended with an SSE `stream_timeout` event.
    pub max_duration: Option<Duration>,
}

/// `server.streams`, compiled: the instance-wide cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStreamsConfig {
    /// Streams at once across all routes; `None` = no cap.
    pub max_concurrent: Option<u32>,
}

/// Which limit refused a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamScope {
    /// `routes[].streams.per_identity`: 429.
    Identity,
    /// `routes[].streams.max_concurrent`: 503.
    Route,
    /// `server.streams.max_concurrent`: 503.
    Instance,
}

impl StreamScope {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamScope::Identity => "identity",
            StreamScope::Route => "route",
            StreamScope::Instance => "instance",
        }
    }
}

/// A refused stream: reason `stream_limit`, 429 for [`StreamScope::Identity`]
/// and 503 otherwise, with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many concurrent streams ({} limit of {limit})", scope.as_str())]
pub struct StreamLimited {
    pub scope: StreamScope,
    pub limit: u32,
    pub retry_after: Duration,
}

// ---------------------------------------------------------------- instance

/// The instance-wide stream count and cap (`server.streams`). Cheap to
/// clone: clones share the count.
#[derive(Clone, Debug, Default)]
pub struct StreamCap {
    inner: Arc<CapInner>,
}

#[derive(Debug)]
struct CapInner {
    active: AtomicU32,
    /// `u32::MAX` = no cap.
    max: AtomicU32,
}

impl Default for CapInner {
    fn default() -> Self {
        CapInner {
            active: AtomicU32::new(0),
            max: AtomicU32::new(u32::MAX),
        }
    }
}

impl StreamCap {
    pub fn new(config: ServerStreamsConfig) -> Self {
        let cap = StreamCap::default();
        cap.set_max(config.max_concurrent);
        cap
    }

    /// Applies `server.streams.max_concurrent` (on load and reload).
    pub fn set_max(&self, max: Option<u32>) {
        self.inner
            .max
            .store(max.unwrap_or(u32::MAX), Ordering::Relaxed);
    }

    pub fn max(&self) -> Option<u32> {
        match self.inner.max.load(Ordering::Relaxed) {
            u32::MAX => None,
            max => Some(max),
        }
    }

    /// Streams running in the instance.
    pub fn active(&self) -> u32 {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Takes one place if below the cap.
    fn try_take(&self) -> Result<(), u32> {
        let max = self.inner.max.load(Ordering::Relaxed);
        self.inner
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| ())
            .map_err(|_| max)
    }

    fn give_back(&self) {
        // Never below zero: every give-back follows a successful take.
        let _ = self
            .inner
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

// ---------------------------------------------------------------- route

/// A route's stream limits, checked together with the instance cap. Cheap
/// to clone: clones share the counts.
#[derive(Clone)]
pub struct StreamLimiter {
    inner: Arc<RouteInner>,
    cap: StreamCap,
}

struct RouteInner {
    state: Mutex<RouteState>,
    admitted: AtomicU64,
    rejected: [AtomicU64; 3],
}

struct RouteState {
    config: StreamsConfig,
    active: u32,
    identities: IdentityCounts,
}

/// A running stream. Dropping it gives its place back to the route, the
/// identity and the instance.
#[must_use = "the stream's place is released as soon as the slot is dropped"]
pub struct StreamSlot {
    inner: Arc<RouteInner>,
    cap: StreamCap,
    identity: Option<Arc<str>>,
}

impl std::fmt::Debug for StreamSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSlot")
            .field("identity", &self.identity)
            .finish()
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        {
            let mut state = self.inner.lock();
            state.active = state.active.saturating_sub(1);
            if let Some(id) = self.identity.take() {
                state.identities.release(&id);
            }
        }
        self.cap.give_back();
    }
}

/// A snapshot of a route's streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStats {
    /// Streams running on the route now (the active-streams gauge).
    pub active: u32,
    pub max_concurrent: Option<u32>,
    pub per_identity: Option<u32>,
    /// Identities with at least one stream on the route.
    pub identities: usize,
    /// Streams admitted (counter).
    pub admitted: u64,
    /// Streams refused, by scope (counters).
    pub rejected_identity: u64,
    pub rejected_route: u64,
    pub rejected_instance: u64,
}

impl StreamLimiter {
    /// A route's limiter; `cap` is the instance's, shared by every route.
    pub fn new(config: StreamsConfig, cap: StreamCap) -> Self {
        StreamLimiter {
            inner: Arc::new(RouteInner {
                state: Mutex::new(RouteState {
                    config,
                    active: 0,
                    identities: IdentityCounts::default(),
                }),
                admitted: AtomicU64::new(0),
                rejected: Default::default(),
            }),
            cap,
        }
    }

    /// Takes a stream slot for `identity`, or says which limit is reached.
    /// Never waits; one uncontended lock and one atomic.
    pub fn try_acquire(&self, identity: Option<&str>) -> Result<StreamSlot, StreamLimited> {
        let mut guard = self.inner.lock();
        let state = &mut *guard;
        let tracked = match (state.config.per_identity, identity) {
            (Some(limit), Some(id)) => {
                if state.identities.get(id) >= limit {
                    return Err(self.refuse(StreamScope::Identity, limit));
                }
                Some(id)
            }
            _ => None,
        };
        if let Some(limit) = state.config.max_concurrent {
            if state.active >= limit {
                return Err(self.refuse(StreamScope::Route, limit));
            }
        }
        if let Err(limit) = self.cap.try_take() {
            return Err(self.refuse(StreamScope::Instance, limit));
        }
        state.active += 1;
        let identity = tracked.map(|id| state.identities.acquire(id));
        self.inner.admitted.fetch_add(1, Ordering::Relaxed);
        Ok(StreamSlot {
            inner: Arc::clone(&self.inner),
            cap: self.cap.clone(),
            identity,
        })
    }

    /// Applies a reloaded `routes[].streams`, keeping the counts.
    pub fn reconfigure(&self, config: StreamsConfig) {
        self.inner.lock().config = config;
    }

    /// `routes[].streams.max_duration`.
    pub fn max_duration(&self) -> Option<Duration> {
        self.inner.lock().config.max_duration
    }

    pub fn config(&self) -> StreamsConfig {
        self.inner.lock().config.clone()
    }

    /// Streams running on the route.
    pub fn active(&self) -> u32 {
        self.inner.lock().active
    }

    /// The instance cap this route counts against.
    pub fn cap(&self) -> &StreamCap {
        &self.cap
    }

    pub fn stats(&self) -> StreamStats {
        let state = self.inner.lock();
        let rejected =
            |scope: StreamScope| self.inner.rejected[scope as usize].load(Ordering::Relaxed);
        StreamStats {
            active: state.active,
            max_concurrent: state.config.max_concurrent,
            per_identity: state.config.per_identity,
            identities: state.identities.len(),
            admitted: self.inner.admitted.load(Ordering::Relaxed),
            rejected_identity: rejected(StreamScope::Identity),
            rejected_route: rejected(StreamScope::Route),
            rejected_instance: rejected(StreamScope::Instance),
        }
    }

    fn refuse(&self, scope: StreamScope, limit: u32) -> StreamLimited {
        self.inner.rejected[scope as usize].fetch_add(1, Ordering::Relaxed);
        StreamLimited {
            scope,
            limit,
            retry_after: MIN_RETRY_AFTER,
        }
    }
}

impl std::fmt::Debug for StreamLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.lock();
        f.debug_struct("StreamLimiter")
            .field("config", &state.config)
            .field("active", &state.active)
            .finish()
    }
}

impl RouteInner {
    fn lock(&self) -> MutexGuard<'_, RouteState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
