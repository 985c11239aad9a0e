//! The breakers of a running floodwall, by key, kept across reloads.
//!
//! A reload compiles a whole new snapshot, but a backend that is down stays
//! down: its breaker must stay open through an unrelated edit of the policy
//! file. So breakers live here, in the service, keyed by name
//! ([`backend_key`], [`endpoint_key`]), and [`BreakerRegistry::get`] returns
//! the existing breaker while its configuration is unchanged. A changed
//! `circuit_breaker` section starts a fresh (closed) breaker.
//!
//! Call `get` when a snapshot is loaded (to build the per-backend runtime),
//! not per request, then [`BreakerRegistry::retain`] the keys the new
//! snapshot still uses.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::{Breaker, BreakerConfig, OnTransition, State};

/// The key of a backend's breaker: `backend/<name>`.
pub fn backend_key(backend: &str) -> String {
    format!("backend/{backend}")
}

/// The key of one endpoint's breaker: `endpoint/<backend>/<url>`.
pub fn endpoint_key(backend: &str, endpoint_url: &str) -> String {
    format!("endpoint/{backend}/{endpoint_url}")
}

/// One line of `/admin/status`.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerStatus {
    pub key: String,
    pub state: State,
    /// Time left until half-open, when open.
    pub remaining: Option<Duration>,
    /// Trips since the breaker was created.
    pub trips: u64,
}

/// Breakers by key.
#[derive(Default)]
pub struct BreakerRegistry {
    breakers: RwLock<HashMap<String, Arc<Breaker>>>,
    on_transition: Option<OnTransition>,
}

impl std::fmt::Debug for BreakerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakerRegistry")
            .field("breakers", &self.read().len())
            .finish()
    }
}

impl BreakerRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry whose breakers call `hook` on every state change.
    pub fn with_hook(hook: OnTransition) -> Self {
        BreakerRegistry {
            breakers: RwLock::default(),
            on_transition: Some(hook),
        }
    }

    /// The breaker for `key`: the existing one if its configuration equals
    /// `config`, else a new closed one (which replaces it).
    pub fn get(&self, key: &str, config: &Arc<BreakerConfig>) -> Arc<Breaker> {
        if let Some(b) = self.read().get(key) {
            if b.config().as_ref() == config.as_ref() {
                return Arc::clone(b);
            }
        }
        let mut map = self.breakers.write().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(key) {
            if b.config().as_ref() == config.as_ref() {
                return Arc::clone(b);
            }
        }
        let mut breaker = Breaker::new(Arc::clone(config)).with_key(key);
        if let Some(hook) = &self.on_transition {
            breaker = breaker.with_hook(Arc::clone(hook));
        }
        let breaker = Arc::new(breaker);
        map.insert(key.to_string(), Arc::clone(&breaker));
        breaker
    }

    /// Drops the breakers whose key `keep` rejects (backends and endpoints
    /// gone from the policy).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.breakers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, _| keep(key));
    }

    /// Every breaker's state at `now`, sorted by key.
    pub fn snapshot(&self, now: Instant) -> Vec<BreakerStatus> {
        let breakers: Vec<Arc<Breaker>> = self.read().values().cloned().collect();
        let mut out: Vec<BreakerStatus> = breakers
            .iter()
            .map(|b| {
                let state = b.state(now);
                BreakerStatus {
                    key: b.key().to_string(),
                    remaining: match state {
                        State::Open { remaining } => Some(remaining),
                        _ => None,
                    },
                    state,
                    trips: b.trips(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Breaker>>> {
        // Nothing panics while holding the lock; a poisoned map is still whole.
        self.breakers.read().unwrap_or_else(|e| e.into_inner())
    }
}
