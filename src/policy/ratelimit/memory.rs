//! The in-memory store: exact counters for one instance.
//!
//! State is a map from (rule, key) to the rule's window states, split over
//! 64 shards behind plain mutexes (critical sections are a few integer
//! operations, never an await). A decision over several rules locks every
//! shard it touches, in shard order, so it is all-or-nothing: nothing is
//! charged unless every enforcing rule admits the request.
//!
//! Memory is bounded by activity: an entry is dropped once every window in
//! it is back to its fresh state (the bucket drained, the budget period
//! over), which [`math::expires_at`] computes on each write. Each shard is
//! swept for such entries at most every [`SWEEP_EVERY_MS`]: when a decision
//! touches it, and in turn (one shard per decision) so that idle shards are
//! swept too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::math::{self, Eval, Params, State};
use super::{Adjustment, PerRule, PerWindow, Plan, RuleEval};
use crate::config::limits::Field;

const SHARDS: usize = 64;
/// How often each shard drops expired entries.
pub const SWEEP_EVERY_MS: u64 = 5_000;

#[derive(Default)]
struct Shard {
    /// Rule name -> key -> state. The rules are a short list (a policy
    /// has a few): found by comparing names, without hashing them.
    rules: Vec<(String, HashMap<String, Entry>)>,
    next_sweep_ms: u64,
}

impl Shard {
    fn keys(&self, rule: &str) -> Option<&HashMap<String, Entry>> {
        self.rules.iter().find(|(r, _)| r == rule).map(|(_, k)| k)
    }

    fn get(&self, rule: &str, key: &str) -> Option<&Entry> {
        self.keys(rule)?.get(key)
    }

    /// Applies `f` to the entry of (rule, key), created if needed. Looked up
    /// by `&str`, so an existing entry costs one hash and no allocation.
    fn update(&mut self, rule: &str, key: &str, f: impl FnOnce(&mut Entry)) {
        let i = match self.rules.iter().position(|(r, _)| r == rule) {
            Some(i) => i,
            None => {
                self.rules.push((rule.to_string(), HashMap::new()));
                self.rules.len() - 1
            }
        };
        let keys = &mut self.rules[i].1;
        match keys.get_mut(key) {
            Some(entry) => f(entry),
            None => {
                let mut entry = Entry {
                    windows: Vec::with_capacity(2),
                    expires_ms: 0,
                };
                f(&mut entry);
                keys.insert(key.to_string(), entry);
            }
        }
    }
}

struct Entry {
    windows: Vec<(Field, State)>,
    expires_ms: u64,
}

impl Entry {
    fn get(&self, field: Field) -> Option<State> {
        self.windows
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, s)| *s)
    }

    fn set(&mut self, field: Field, state: State) {
        match self.windows.iter_mut().find(|(f, _)| *f == field) {
            Some((_, s)) => *s = state,
            None => self.windows.push((field, state)),
        }
    }
}

/// Exact, per-instance counters.
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    /// The shard the next operation also sweeps, so that every shard is
    /// swept even when no traffic lands on it.
    cursor: AtomicUsize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

/// The shard of (rule, key): FNV-1a over both, mixed. It only spreads the keys
/// over the shards; each shard's map hashes its keys with SipHash.
fn shard_of(rule: &str, key: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(rule.as_bytes());
    eat(&[0xff]); // not UTF-8: ("ab", "c") and ("a", "bc") differ
    eat(key.as_bytes());
    // A final mix (MurmurHash3's), so that the low bits used here depend
    // on every byte.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h % SHARDS as u64) as usize
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding the lock cannot leave a half-written entry
    // (every write is one assignment), so the data is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            cursor: AtomicUsize::new(0),
        }
    }

    /// Number of (rule, key) entries held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| lock(s).rules.iter().map(|(_, k)| k.len()).sum::<usize>())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Evaluates every plan with `params_of` (the window parameters, given
    /// the divisor the caller wants) and charges the admitted ones only if
    /// every enforcing plan is admitted.
    pub(crate) fn check(&self, plans: &[Plan], divisor: u64, now_ms: u64) -> PerRule<RuleEval> {
        let plan_shards: PerRule<usize> = plans
            .iter()
            .map(|p| shard_of(&p.rule.name, &p.key))
            .collect();
        let mut shard_ids = plan_shards.clone();
        shard_ids.sort_unstable();
        shard_ids.dedup();
        let mut guards: PerRule<(usize, MutexGuard<'_, Shard>)> = shard_ids
            .iter()
            .map(|&i| (i, lock(&self.shards[i])))
            .collect();
        let guard_of = |shard: usize| shard_ids.binary_search(&shard).unwrap_or(0);

        let mut evals: PerRule<RuleEval> = plans
            .iter()
            .zip(&plan_shards)
            .map(|(plan, &shard)| {
                let entry = guards[guard_of(shard)].1.get(&plan.rule.name, &plan.key);
                let windows: PerWindow<Eval> = plan
                    .windows
                    .iter()
                    .map(|w| {
                        let params = Params::of(&w.window, divisor);
                        let state = entry.and_then(|e| e.get(w.field));
                        math::evaluate(&params, state, w.amount, now_ms)
                    })
                    .collect();
                RuleEval {
                    allowed: windows.iter().all(|e| e.allowed),
                    charged: false,
                    windows,
                }
            })
            .collect();

        let all_enforcing_allow = plans
            .iter()
            .zip(&evals)
            .all(|(p, e)| !p.enforce || e.allowed);
        if all_enforcing_allow {
            for ((plan, &shard), eval) in plans.iter().zip(&plan_shards).zip(evals.iter_mut()) {
                if !eval.allowed {
                    continue;
                }
                let shard = &mut guards[guard_of(shard)].1;
                shard.update(&plan.rule.name, &plan.key, |entry| {
                    let mut expires = entry.expires_ms;
                    for (w, e) in plan.windows.iter().zip(&eval.windows) {
                        entry.set(w.field, e.next);
                        let params = Params::of(&w.window, divisor);
                        expires = expires.max(math::expires_at(&params, e.next, now_ms));
                    }
                    entry.expires_ms = expires;
                });
                eval.charged = true;
            }
        }
        for (_, guard) in guards.iter_mut() {
            sweep(guard, now_ms);
        }
        drop(guards);
        self.sweep_next(now_ms);
        evals
    }

    /// Sweeps the next shard in turn, if it is due and not busy.
    fn sweep_next(&self, now_ms: u64) {
        let i = self.cursor.fetch_add(1, Ordering::Relaxed) % SHARDS;
        if let Ok(mut shard) = self.shards[i].try_lock() {
            sweep(&mut shard, now_ms);
        }
    }

    /// Applies corrections (reconciliations and refunds).
    pub(crate) fn adjust(&self, adjustments: &[Adjustment], divisor: u64, now_ms: u64) {
        for a in adjustments {
            let mut shard = lock(&self.shards[shard_of(&a.rule, &a.key)]);
            shard.update(&a.rule, &a.key, |entry| {
                let mut expires = entry.expires_ms;
                for w in &a.windows {
                    let params = Params::of(&w.window, divisor);
                    let next =
                        math::adjust(&params, entry.get(w.field), w.delta, w.period_start, now_ms);
                    entry.set(w.field, next);
                    expires = expires.max(math::expires_at(&params, next, now_ms));
                }
                entry.expires_ms = expires;
            });
        }
    }

    /// The current state of one (rule, key): each window evaluated for a
    /// zero-sized request (nothing is charged).
    pub(crate) fn peek(&self, plan: &Plan, divisor: u64, now_ms: u64) -> Vec<Eval> {
        let shard = lock(&self.shards[shard_of(&plan.rule.name, &plan.key)]);
        let entry = shard.get(&plan.rule.name, &plan.key);
        plan.windows
            .iter()
            .map(|w| {
                let params = Params::of(&w.window, divisor);
                math::evaluate(&params, entry.and_then(|e| e.get(w.field)), 0, now_ms)
            })
            .collect()
    }

    /// The keys of `rule` with the largest level in window `field` (spend,
    /// for a budget) in the current period, largest first.
    pub(crate) fn top(
        &self,
        rule: &str,
        field: Field,
        params: &Params,
        n: usize,
        now_ms: u64,
    ) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = Vec::new();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            let Some(keys) = shard.keys(rule) else {
                continue;
            };
            for (key, entry) in keys {
                let Some(state) = entry.get(field) else {
                    continue;
                };
                let used = match params {
                    Params::Calendar { period, .. } => {
                        if state.at == math::period_bounds(*period, now_ms).0 {
                            state.level
                        } else {
                            0
                        }
                    }
                    Params::Gcra { .. } => {
                        math::evaluate(params, Some(state), 0, now_ms).next.level
                    }
                };
                if used > 0 {
                    all.push((key.to_string(), used));
                }
            }
        }
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

fn sweep(shard: &mut Shard, now_ms: u64) {
    if now_ms < shard.next_sweep_ms {
        return;
    }
    for (_, keys) in shard.rules.iter_mut() {
        keys.retain(|_, e| e.expires_ms > now_ms);
    }
    shard.rules.retain(|(_, keys)| !keys.is_empty());
    shard.next_sweep_ms = now_ms + SWEEP_EVERY_MS;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys that differ only a little (user ids, addresses) still spread
    /// over every shard, and the rule name takes part.
    #[test]
    fn keys_spread_over_the_shards() {
        for keys in [
            (0..6400).map(|i| format!("user-{i}")).collect::<Vec<_>>(),
            (0..6400)
                .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
                .collect(),
        ] {
            let mut count = [0usize; SHARDS];
            for k in &keys {
                count[shard_of("per-user", k)] += 1;
            }
            let (min, max) = (count.iter().min().unwrap(), count.iter().max().unwrap());
            assert!(*min > 50 && *max < 200, "{min}..{max} of 100 a shard");
        }
        let moved = (0..640)
            .filter(|i| shard_of("a", &i.to_string()) != shard_of("b", &i.to_string()))
            .count();
        assert!(moved > 600, "{moved}");
        assert_ne!(shard_of("ab", "c"), shard_of("a", "bc"));
    }
}
