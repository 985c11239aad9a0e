//! `/admin/status` sections contributed by the policies.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use super::StatusSection;
use crate::state::Shared;

/// `circuit_breakers`: every breaker's state and the time left while open.
pub struct Breakers(pub Arc<Shared>);

impl StatusSection for Breakers {
    fn name(&self) -> &'static str {
        "circuit_breakers"
    }

    fn render(&self, _query: Option<&str>) -> Value {
        let now = Instant::now();
        let list: Vec<Value> = self
            .0
            .resilience
            .breakers
            .snapshot(now)
            .into_iter()
            .map(|b| {
                json!({
                    "key": b.key,
                    "state": b.state.as_str(),
                    "gauge": b.state.as_gauge(),
                    "open_remaining_ms": b.remaining.map(|d| d.as_millis() as u64),
                    "trips": b.trips,
                })
            })
            .collect();
        Value::Array(list)
    }
}

/// `admission`: per route, requests in flight, queue depth by class and
/// active streams; the instance stream count.
pub struct Admission(pub Arc<Shared>);

impl StatusSection for Admission {
    fn name(&self) -> &'static str {
        "admission"
    }

    fn render(&self, _query: Option<&str>) -> Value {
        let active = self.0.active();
        let routes: Vec<Value> = active
            .snapshot
            .routes
            .iter()
            .zip(&active.admission.routes)
            .map(|(route, adm)| {
                let conc = adm.concurrency.as_ref().map(|c| {
                    let st = c.stats();
                    json!({
                        "in_flight": st.in_flight,
                        "max_in_flight": st.max_in_flight,
                        "per_identity": st.per_identity,
                        "queued": st.queued.iter().map(|d| json!({"class": d.class, "depth": d.depth})).collect::<Vec<_>>(),
                        "oldest_wait_ms": st.oldest_wait.as_millis() as u64,
                        "shared": st.shared.as_ref().map(|sh| json!({
                            "lease_ms": sh.lease.as_millis() as u64,
                            "leased": sh.leased,
                            "local": sh.local,
                            "waiting": sh.waiting,
                            "fleet_in_use": sh.in_use,
                            "fallback_cap": sh.fallback_cap,
                            "leased_total": sh.leased_total,
                            "local_total": sh.local_total,
                            "refused_total": sh.refused_total,
                            "lost_total": sh.lost_total,
                            "store_errors_total": sh.store_errors_total,
                        })),
                    })
                });
                json!({
                    "route": route.name,
                    "active_streams": adm.streams.active(),
                    "concurrency": conc,
                })
            })
            .collect();
        // Backends with outgoing-call limits (`backends.*.limits`).
        let backends: Vec<Value> = active
            .snapshot
            .backends
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let st = active.admission.pacer(i)?.stats();
                Some(json!({
                    "backend": b.name,
                    "in_flight": st.in_flight,
                    "max_in_flight": st.max_in_flight,
                    "adaptive_limit": st.adaptive_limit,
                    "queued": st.queued,
                    "started_last_minute": st.started_last_minute,
                    "per_minute": st.per_minute,
                }))
            })
            .collect();
        json!({
            "streams_active": active.admission.stream_cap.active(),
            "streams_max": active.admission.stream_cap.max(),
            "routes": routes,
            "backends": backends,
        })
    }
}

/// `cache`: per cached route, the results since start-up (hits, misses,
/// stale serves, bypasses), the hit ratio, collapsed misses, stores,
/// evictions, and the memory tier's entries and bytes.
pub struct Cache(pub Arc<Shared>);

impl StatusSection for Cache {
    fn name(&self) -> &'static str {
        "cache"
    }

    fn render(&self, _query: Option<&str>) -> Value {
        let active = self.0.active();
        let m = &self.0.cache_metrics;
        let usage = self.0.cache.memory.usage();
        let count = |vec: &prometheus::IntCounterVec, labels: &[&str]| {
            vec.get_metric_with_label_values(labels)
                .map(|c| c.get())
                .unwrap_or(0)
        };
        let routes: Vec<Value> = active
            .snapshot
            .routes
            .iter()
            .filter_map(|route| {
                let policy = route.cache.as_ref()?;
                let r = route.name.as_str();
                let hits = count(&m.requests, &[r, "hit"]);
                let misses = count(&m.requests, &[r, "miss"]);
                let stale = count(&m.requests, &[r, "stale"]);
                let looked_up = hits + misses + stale;
                let mem = usage.iter().find(|(name, _)| name == r).map(|(_, u)| *u);
                Some(json!({
                    "route": r,
                    "store": policy.store.as_str(),
                    "ttl_s": policy.ttl.as_secs(),
                    "hits": hits,
                    "misses": misses,
                    "stale": stale,
                    "bypass": count(&m.requests, &[r, "bypass"]),
                    "hit_ratio": if looked_up == 0 { Value::Null } else { json!(hits as f64 / looked_up as f64) },
                    "collapsed": count(&m.collapsed, &[r]),
                    "stores": count(&m.stores, &[r]),
                    "evictions": count(&m.evictions, &[r]),
                    "memory_entries": mem.map_or(0, |u| u.entries),
                    "memory_bytes": mem.map_or(0, |u| u.bytes),
                }))
            })
            .collect();
        json!({
            "memory_bytes": self.0.cache.memory.bytes(),
            "memory_max_bytes": active.snapshot.cache_store.max_memory,
            "redis": self.0.cache.has_redis(),
            "purge_subscription": self.0.cache.subscription_live.load(std::sync::atomic::Ordering::Acquire),
            "in_flight_misses": self.0.flights.len(),
            "routes": routes,
        })
    }
}

/// `connections`: client connections open, the cap, and those refused.
pub struct Connections(pub Arc<Shared>);

impl StatusSection for Connections {
    fn name(&self) -> &'static str {
        "connections"
    }

    fn render(&self, _query: Option<&str>) -> Value {
        let c = &self.0.connections;
        let configured = self.0.active().snapshot.server.max_connections;
        let refused = &c.metrics().refused;
        let count = |reason: &str| {
            refused
                .get_metric_with_label_values(&[reason])
                .map(|m| m.get())
                .unwrap_or(0)
        };
        json!({
            "open": c.open(),
            "limit": c.limit(configured),
            "limit_source": if configured.is_some() { "server.max_connections" } else { "open-files limit" },
            "refused": {
                "connection_limit": count("connection_limit"),
                "header_too_large": count("header_too_large"),
                "header_timeout": count("header_timeout"),
            },
        })
    }
}

/// All built-in policy sections, for the admin service.
pub fn all(shared: &Arc<Shared>) -> Vec<Arc<dyn StatusSection>> {
    vec![
        Arc::new(Connections(shared.clone())),
        Arc::new(Breakers(shared.clone())),
        Arc::new(Admission(shared.clone())),
        Arc::new(Cache(shared.clone())),
    ]
}
