//! State shared by every request and by the admin listener, behind one `Arc`.
//!
//! Three homes for state (see docs/architecture.md): per request in the proxy
//! `Ctx`, across requests here, across replicas in Redis. The compiled policy
//! is one `ArcSwap<Snapshot>`: a request loads it once and keeps that `Arc`
//! until it ends, so a reload never changes the rules under a running request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::config::Snapshot;
use crate::policy::breaker::BreakerRegistry;
use crate::policy::retry::RetryBudget;
use crate::proxy::upstream::BackendRuntime;
use crate::telemetry::resilience::ResilienceMetrics;
use crate::telemetry::Metrics;

/// Policy state that outlives a reload, keyed by policy name: circuit
/// breakers (by backend and endpoint) and retry budgets (by route). An entry
/// whose configuration did not change is reused by the next snapshot.
pub struct Resilience {
    pub breakers: BreakerRegistry,
    budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
    pub metrics: Arc<ResilienceMetrics>,
}

impl Resilience {
    pub fn new(registry: &prometheus::Registry) -> Resilience {
        // Fixed names and label sets: construction cannot fail (a unit test
        // in telemetry renders them), so this is not reachable from input.
        #[allow(clippy::expect_used)]
        let metrics =
            Arc::new(ResilienceMetrics::new().expect("resilience metric families are valid"));
        if let Err(e) = metrics.register(registry) {
            tracing::error!(error = %e, "cannot register the resilience metrics");
        }
        let hook_metrics = metrics.clone();
        let breakers = BreakerRegistry::with_hook(Arc::new(move |key, _from, to| {
            if let Ok(g) = hook_metrics
                .circuit_state
                .get_metric_with_label_values(&[key])
            {
                g.set(to.as_gauge());
            }
            ResilienceMetrics::inc(&hook_metrics.circuit_transitions, &[key, to.as_str()]);
            tracing::warn!(
                breaker = key,
                state = to.as_str(),
                "circuit breaker transition"
            );
        }));
        Resilience {
            breakers,
            budgets: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The retry budget of `route`, kept across reloads while its settings
    /// are unchanged.
    fn budget(&self, route: &crate::config::Route) -> Option<Arc<RetryBudget>> {
        if !route.retry.enabled() {
            return None;
        }
        let mut map = self.budgets.lock().ok()?;
        if let Some(b) = map.get(&route.name) {
            if b.config() == &route.retry.budget {
                return Some(b.clone());
            }
        }
        let b = Arc::new(RetryBudget::new(route.retry.budget));
        map.insert(route.name.clone(), b.clone());
        Some(b)
    }
}

/// A compiled snapshot plus what the proxy derives from it once per load
/// (upstream peers with their TLS settings, round-robin cursors). Swapped as
/// one unit, so routes and peers can never disagree.
pub struct Active {
    pub snapshot: Arc<Snapshot>,
    /// Parallel to `snapshot.backends`.
    pub backends: Vec<BackendRuntime>,
    /// Parallel to `snapshot.routes`: the route's retry budget, when it retries.
    pub budgets: Vec<Option<Arc<RetryBudget>>>,
    /// Concurrency limiters, queues, stream limits and backend pacers.
    pub admission: crate::policy::concurrency::Admission,
    /// Parallel to `snapshot.routes`: the metric children each route's
    /// requests update, resolved on the route's first request.
    pub route_metrics: Vec<crate::telemetry::metrics::RouteMetrics>,
}

impl Active {
    /// Build the runtime for a snapshot; fails when a backend's TLS material
    /// cannot be loaded (the reload is then refused).
    pub fn try_build(snapshot: Snapshot, resilience: &Resilience) -> Result<Active, String> {
        Self::try_build_with(snapshot, resilience, None)
    }

    /// [`Active::try_build`] with the admission registry (limiters kept by name).
    pub fn try_build_with(
        snapshot: Snapshot,
        resilience: &Resilience,
        admission: Option<&crate::policy::concurrency::AdmissionRegistry>,
    ) -> Result<Active, String> {
        let backends = snapshot
            .backends
            .iter()
            .map(|b| BackendRuntime::build(b).map(|r| r.with_breakers(b, &resilience.breakers)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::finish(snapshot, backends, resilience, admission))
    }

    /// Like [`Active::try_build`], but a backend whose TLS material cannot be
    /// loaded fails closed: its connections are refused with a clear error.
    pub fn build(snapshot: Snapshot, resilience: &Resilience) -> Active {
        Self::build_with(snapshot, resilience, None)
    }

    pub fn build_with(
        snapshot: Snapshot,
        resilience: &Resilience,
        admission: Option<&crate::policy::concurrency::AdmissionRegistry>,
    ) -> Active {
        let backends = snapshot
            .backends
            .iter()
            .map(|b| {
                BackendRuntime::build(b)
                    .unwrap_or_else(|e| BackendRuntime::broken(b, e))
                    .with_breakers(b, &resilience.breakers)
            })
            .collect();
        Self::finish(snapshot, backends, resilience, admission)
    }

    fn finish(
        snapshot: Snapshot,
        backends: Vec<BackendRuntime>,
        resilience: &Resilience,
        admission: Option<&crate::policy::concurrency::AdmissionRegistry>,
    ) -> Active {
        let admission = match admission {
            Some(reg) => reg.load(&snapshot),
            None => crate::policy::concurrency::AdmissionRegistry::new().load(&snapshot),
        };
        let budgets = snapshot
            .routes
            .iter()
            .map(|r| resilience.budget(r))
            .collect();
        // Forget breakers no backend uses any more.
        let keys: std::collections::HashSet<String> = backends
            .iter()
            .flat_map(|b| b.breaker_keys().map(str::to_string))
            .collect();
        resilience.breakers.retain(|k| keys.contains(k));
        let route_metrics = snapshot.routes.iter().map(|_| Default::default()).collect();
        Active {
            snapshot: Arc::new(snapshot),
            backends,
            budgets,
            admission,
            route_metrics,
        }
    }
}

pub struct Shared {
    pub config: ArcSwap<Active>,
    pub metrics: Metrics,
    pub resilience: Resilience,
    /// Rate-limit, token and cost counters (memory or Redis). Built once
    /// from `store` at start-up: counters are keyed by rule name, so they
    /// survive reloads; a change of `store` needs a restart.
    pub limiter: crate::policy::ratelimit::Limiter,
    pub limit_metrics: crate::telemetry::limits::LimitMetrics,
    /// Concurrency limiters, queues, stream limits and pacers, kept by
    /// route and backend name across reloads.
    pub admission: crate::policy::concurrency::AdmissionRegistry,
    pub admission_metrics: crate::telemetry::admission::AdmissionMetrics,
    /// The response cache's tiers (memory, Redis) and purges. Built once
    /// from `store` at start-up, like the limiter.
    pub cache: Arc<crate::store::cache::CacheStore>,
    pub cache_metrics: crate::telemetry::cache::CacheMetrics,
    /// Identical cache misses in progress (request collapsing).
    pub flights: crate::policy::cache::Flights,
    /// SIGTERM handling: requests in flight, and when open streams must end.
    pub shutdown: Arc<crate::shutdown::Shutdown>,
    /// Open client connections and the guards' refusals.
    pub connections: Arc<crate::connection::Connections>,
    pub health: Health,
    pub started_at: Instant,
}

impl Shared {
    pub fn new(snapshot: Snapshot, metrics: Metrics) -> Arc<Self> {
        let resilience = Resilience::new(metrics.registry());
        let limiter = match crate::policy::ratelimit::Limiter::from_config(snapshot.store.as_ref())
        {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the Redis store; limits are kept in memory");
                crate::policy::ratelimit::Limiter::in_memory()
            }
        };
        // Fixed names and label sets: construction cannot fail.
        #[allow(clippy::expect_used)]
        let limit_metrics =
            crate::telemetry::limits::LimitMetrics::new().expect("limit metric families are valid");
        if let Err(e) = limit_metrics.register(metrics.registry()) {
            tracing::error!(error = %e, "cannot register the rate-limit metrics");
        }
        #[allow(clippy::expect_used)]
        let admission_metrics = crate::telemetry::admission::AdmissionMetrics::new()
            .expect("admission metric families are valid");
        if let Err(e) = admission_metrics.register(metrics.registry()) {
            tracing::error!(error = %e, "cannot register the admission metrics");
        }
        #[allow(clippy::expect_used)]
        let cache_metrics =
            crate::telemetry::cache::CacheMetrics::new().expect("cache metric families are valid");
        if let Err(e) = cache_metrics.register(metrics.registry()) {
            tracing::error!(error = %e, "cannot register the cache metrics");
        }
        #[allow(clippy::expect_used)]
        let connection_metrics = crate::telemetry::connections::ConnectionMetrics::new()
            .expect("connection metric families are valid");
        if let Err(e) = connection_metrics.register(metrics.registry()) {
            tracing::error!(error = %e, "cannot register the connection metrics");
        }
        let connections = Arc::new(crate::connection::Connections::new(
            connection_metrics,
            metrics.local_responses(),
        ));
        let cache =
            crate::store::cache::CacheStore::new(&snapshot.cache_store, limiter.redis().cloned());
        let admission = crate::policy::concurrency::AdmissionRegistry::with_leases(lease_backend(
            &limiter,
            snapshot.store.as_ref(),
            &limit_metrics,
        ));
        let active = Active::build_with(snapshot, &resilience, Some(&admission));
        let shared = Arc::new(Shared {
            config: ArcSwap::from_pointee(active),
            metrics,
            resilience,
            limiter,
            limit_metrics,
            admission,
            admission_metrics,
            cache,
            cache_metrics,
            flights: crate::policy::cache::Flights::new(),
            shutdown: Arc::new(crate::shutdown::Shutdown::default()),
            connections,
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

    /// Refresh the gauges that are read from the limiters (queue depth,
    /// in-flight) just before `/metrics` is rendered.
    pub fn refresh_gauges(&self) {
        // Breaker states: an open breaker half-opens by time alone, with no
        // request to notice it, so read every state now.
        let rm = &self.resilience.metrics;
        for b in self.resilience.breakers.snapshot(Instant::now()) {
            if let Ok(g) = rm.circuit_state.get_metric_with_label_values(&[&b.key]) {
                g.set(b.state.as_gauge());
            }
        }
        let cm = &self.cache_metrics;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.cache.memory.sweep(now_ms);
        for (route, u) in self.cache.memory.usage() {
            if let Ok(g) = cm.entries.get_metric_with_label_values(&[&route]) {
                g.set(u.entries as i64);
            }
            if let Ok(g) = cm.bytes.get_metric_with_label_values(&[&route]) {
                g.set(u.bytes as i64);
            }
        }
        let active = self.config.load();
        let m = &self.admission_metrics;
        for (route, adm) in active.snapshot.routes.iter().zip(&active.admission.routes) {
            if let Some(c) = &adm.concurrency {
                let st = c.stats();
                if let Ok(g) = m.in_flight.get_metric_with_label_values(&[&route.name]) {
                    g.set(i64::from(st.in_flight));
                }
                if let Some(sh) = &st.shared {
                    for (state, n) in [
                        ("leased", sh.leased),
                        ("local", sh.local),
                        ("waiting", sh.waiting),
                    ] {
                        if let Ok(g) = m
                            .shared_slots
                            .get_metric_with_label_values(&[&route.name, state])
                        {
                            g.set(i64::from(n));
                        }
                    }
                }
                for d in &st.queued {
                    if let Ok(g) = m
                        .queue_depth
                        .get_metric_with_label_values(&[&route.name, &d.class])
                    {
                        g.set(d.depth as i64);
                    }
                }
            }
        }
    }

    /// The snapshot and its runtime, for the proxy.
    pub fn active(&self) -> Arc<Active> {
        self.config.load_full()
    }
}

/// Where shared routes (`concurrency.shared: true`) lease their places: the
/// rate limiter's Redis connection, with store errors counted in
/// `floodwall_limiter_store_errors_total{op="lease_*"}`.
fn lease_backend(
    limiter: &crate::policy::ratelimit::Limiter,
    store: Option<&crate::config::StoreConfig>,
    metrics: &crate::telemetry::limits::LimitMetrics,
) -> crate::policy::concurrency::LeaseBackend {
    use crate::policy::concurrency::{LeaseBackend, LeaseEvent, LeaseStore};
    let errors = metrics.store_errors.clone();
    LeaseBackend {
        store: limiter
            .redis()
            .map(|r| Arc::new(r.clone()) as Arc<dyn LeaseStore>),
        expected_replicas: store.map_or(1, |s| s.redis.expected_replicas),
        on_event: Some(Arc::new(move |event: LeaseEvent<'_>| match event {
            LeaseEvent::StoreError { route, op, error } => {
                if let Ok(c) = errors.get_metric_with_label_values(&[op.as_str()]) {
                    c.inc();
                }
                tracing::debug!(route, op = op.as_str(), error = %error, "concurrency lease store error");
            }
            LeaseEvent::Lost { route, count } => {
                tracing::warn!(
                    route,
                    count,
                    "concurrency leases expired while Redis was away and the shared cap is full again; \
                     those requests run on without a lease"
                );
            }
        })),
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
