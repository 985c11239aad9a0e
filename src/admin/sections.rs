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
        json!({
            "streams_active": active.admission.stream_cap.active(),
            "streams_max": active.admission.stream_cap.max(),
            "routes": routes,
        })
    }
}

/// All built-in policy sections, for the admin service.
pub fn all(shared: &Arc<Shared>) -> Vec<Arc<dyn StatusSection>> {
    vec![
        Arc::new(Breakers(shared.clone())),
        Arc::new(Admission(shared.clone())),
    ]
}
