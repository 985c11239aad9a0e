//! The admission state of a running floodwall, kept across reloads.
//!
//! Route limiters and stream limiters are keyed by route name, pacers by
//! backend name, and the instance stream cap is one for the process. A
//! reload ([`AdmissionRegistry::load`]) reuses the existing limiter of each
//! name and reconfigures it in place, so the requests that hold slots stay
//! counted and a reload can never let a route overshoot its cap. A name
//! that disappears (or a section that is removed) is forgotten; slots still
//! held against it are released into the old limiter, harmlessly. A renamed
//! route starts from zero.
//!
//! Call [`AdmissionRegistry::load`] once per snapshot that is about to be
//! swapped in (not per request, and not for a snapshot that may still be
//! refused), and keep the [`Admission`] next to the snapshot.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{ConcurrencyLimiter, LeaseBackend, Pacer};
use crate::config::Snapshot;
use crate::policy::streams::{StreamCap, StreamLimiter, StreamsConfig};

/// Limiters and pacers by name; lives in the service for the whole run.
#[derive(Debug, Default)]
pub struct AdmissionRegistry {
    /// Where shared routes lease their places (fixed for the process, like
    /// `store`).
    leases: LeaseBackend,
    concurrency: Mutex<HashMap<String, ConcurrencyLimiter>>,
    streams: Mutex<HashMap<String, StreamLimiter>>,
    pacers: Mutex<HashMap<String, Pacer>>,
    cap: StreamCap,
}

/// The admission runtime of one snapshot; vectors parallel to
/// `Snapshot::routes` and `Snapshot::backends`.
#[derive(Debug, Clone)]
pub struct Admission {
    pub routes: Vec<RouteAdmission>,
    /// `Some` for a backend with `limits`.
    pub backends: Vec<Option<Pacer>>,
    /// The instance stream cap (`server.streams`).
    pub stream_cap: StreamCap,
}

/// One route's limiters.
#[derive(Debug, Clone)]
pub struct RouteAdmission {
    /// `Some` for a route with `concurrency`.
    pub concurrency: Option<ConcurrencyLimiter>,
    /// Every route has one, limits or not, so active streams are counted
    /// (and the instance cap applies) everywhere.
    pub streams: StreamLimiter,
}

impl Admission {
    /// The limiters of route `index` (into `Snapshot::routes`).
    pub fn route(&self, index: usize) -> Option<&RouteAdmission> {
        self.routes.get(index)
    }

    /// The pacer of backend `index` (into `Snapshot::backends`), if it has
    /// `limits`.
    pub fn pacer(&self, index: usize) -> Option<&Pacer> {
        self.backends.get(index)?.as_ref()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AdmissionRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry whose shared routes lease their places from `leases`.
    pub fn with_leases(leases: LeaseBackend) -> Self {
        AdmissionRegistry {
            leases,
            ..Self::default()
        }
    }

    /// The instance stream cap.
    pub fn stream_cap(&self) -> &StreamCap {
        &self.cap
    }

    /// Builds (or updates in place) the limiters `snapshot` needs and
    /// forgets the ones it no longer names.
    pub fn load(&self, snapshot: &Snapshot) -> Admission {
        self.cap.set_max(snapshot.server.streams.max_concurrent);

        let mut concurrency = lock(&self.concurrency);
        let mut streams = lock(&self.streams);
        let mut routes = Vec::with_capacity(snapshot.routes.len());
        for route in &snapshot.routes {
            let limiter =
                route
                    .concurrency
                    .as_ref()
                    .map(|config| match concurrency.get(&route.name) {
                        Some(existing) => {
                            if existing.config() != **config {
                                existing.reconfigure((**config).clone());
                            }
                            existing.clone()
                        }
                        None => {
                            let limiter = ConcurrencyLimiter::for_route(
                                &route.name,
                                (**config).clone(),
                                self.leases.clone(),
                            );
                            concurrency.insert(route.name.clone(), limiter.clone());
                            limiter
                        }
                    });
            let stream_config: StreamsConfig =
                route.streams.as_deref().cloned().unwrap_or_default();
            let stream_limiter = match streams.get(&route.name) {
                Some(existing) => {
                    if existing.config() != stream_config {
                        existing.reconfigure(stream_config);
                    }
                    existing.clone()
                }
                None => {
                    let limiter = StreamLimiter::new(stream_config, self.cap.clone());
                    streams.insert(route.name.clone(), limiter.clone());
                    limiter
                }
            };
            routes.push(RouteAdmission {
                concurrency: limiter,
                streams: stream_limiter,
            });
        }
        let limited: HashSet<&str> = snapshot
            .routes
            .iter()
            .filter(|r| r.concurrency.is_some())
            .map(|r| r.name.as_str())
            .collect();
        concurrency.retain(|name, _| limited.contains(name.as_str()));
        let names: HashSet<&str> = snapshot.routes.iter().map(|r| r.name.as_str()).collect();
        streams.retain(|name, _| names.contains(name.as_str()));

        let mut pacers = lock(&self.pacers);
        let backends = snapshot
            .backends
            .iter()
            .map(|backend| {
                let limits = backend.limits.as_ref()?;
                Some(match pacers.get(&backend.name) {
                    Some(existing) => {
                        if existing.limits() != **limits {
                            existing.reconfigure(**limits);
                        }
                        existing.clone()
                    }
                    None => {
                        let pacer = Pacer::new(**limits);
                        pacers.insert(backend.name.clone(), pacer.clone());
                        pacer
                    }
                })
            })
            .collect();
        let paced: HashSet<&str> = snapshot
            .backends
            .iter()
            .filter(|b| b.limits.is_some())
            .map(|b| b.name.as_str())
            .collect();
        pacers.retain(|name, _| paced.contains(name.as_str()));

        Admission {
            routes,
            backends,
            stream_cap: self.cap.clone(),
        }
    }
}
