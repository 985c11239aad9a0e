//! State shared by every request and by the admin listener, behind one `Arc`.
//!
//! Three homes for state (see docs/architecture.md): per request in the proxy
//! `Ctx`, across requests here, across replicas in Redis. The compiled policy
//! is one `ArcSwap<Snapshot>`: a request loads it once and keeps that `Arc`
//! until it ends, so a reload never changes the rules under a running request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::config::Snapshot;
use crate::proxy::upstream::BackendRuntime;
use crate::telemetry::Metrics;

/// A compiled snapshot plus what the proxy derives from it once per load
/// (upstream peers with their TLS settings, round-robin cursors). Swapped as
/// one unit, so routes and peers can never disagree.
pub struct Active {
    pub snapshot: Arc<Snapshot>,
    /// Parallel to `snapshot.backends`.
    pub backends: Vec<BackendRuntime>,
}

impl Active {
    /// Build the runtime for a snapshot; fails when a backend's TLS material
    /// cannot be loaded (the reload is then refused).
    pub fn try_build(snapshot: Snapshot) -> Result<Active, String> {
        let backends = snapshot
            .backends
            .iter()
            .map(|b| BackendRuntime::build(b))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Active {
            snapshot: Arc::new(snapshot),
            backends,
        })
    }

    /// Like [`Active::try_build`], but a backend whose TLS material cannot be
    /// loaded fails closed: its connections are refused with a clear error.
    pub fn build(snapshot: Snapshot) -> Active {
        let backends = snapshot
            .backends
            .iter()
            .map(|b| BackendRuntime::build(b).unwrap_or_else(|e| BackendRuntime::broken(b, e)))
            .collect();
        Active {
            snapshot: Arc::new(snapshot),
            backends,
        }
    }
}

pub struct Shared {
    pub config: ArcSwap<Active>,
    pub metrics: Metrics,
    pub health: Health,
    pub started_at: Instant,
}

impl Shared {
    pub fn new(snapshot: Snapshot, metrics: Metrics) -> Arc<Self> {
        let shared = Arc::new(Shared {
            config: ArcSwap::from_pointee(Active::build(snapshot)),
            metrics,
            health: Health::default(),
            started_at: Instant::now(),
        });
        shared.health.config_loaded.store(true, Ordering::Release);
        shared
    }

    /// The snapshot a new request should use.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.config.load().snapshot.clone()
    }

    /// The snapshot and its runtime, for the proxy.
    pub fn active(&self) -> Arc<Active> {
        self.config.load_full()
    }
}

/// Start-up and readiness flags, as served by `/health/*`.
#[derive(Default)]
pub struct Health {
    pub config_loaded: AtomicBool,
    /// Every proxy listener accepted a test connection.
    pub listeners_bound: AtomicBool,
    /// Start-up finished (listeners bound, admin up, watcher running).
    pub started: AtomicBool,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.config_loaded.load(Ordering::Acquire) && self.listeners_bound.load(Ordering::Acquire)
    }
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }
}
