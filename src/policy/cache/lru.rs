//! The memory tier: least-recently-used entries go first once the bytes
//! held pass `max_bytes`; an entry is dropped when its keep time (`ttl`
//! plus `stale_if_error`) has passed, found on lookup or by
//! [`MemoryTier::sweep`].
//!
//! Keys are `route:scope:digest` strings ([`super::CacheKey::as_string`]);
//! the route part is used for per-route statistics and purges. Time is the
//! caller's `now_ms` (wall clock, as entries may come from another replica
//! through Redis).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use super::Entry;

/// What a lookup found.
#[derive(Debug, Clone)]
pub enum Lookup {
    Fresh(Arc<Entry>),
    /// Past its `ttl` but within `stale_if_error`: only for a failed upstream.
    Stale(Arc<Entry>),
    Miss,
}

impl Lookup {
    /// Classify an entry (from either tier) at `now_ms`.
    pub fn of(entry: Arc<Entry>, now_ms: u64) -> Lookup {
        if entry.is_fresh(now_ms) {
            Lookup::Fresh(entry)
        } else if entry.is_kept(now_ms) {
            Lookup::Stale(entry)
        } else {
            Lookup::Miss
        }
    }
}

/// Entries and bytes held for one route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteUsage {
    pub entries: u64,
    pub bytes: u64,
}

struct Slot {
    entry: Arc<Entry>,
    tick: u64,
    size: usize,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Slot>,
    /// Recency: tick -> key; the smallest tick is the least recently used.
    order: BTreeMap<u64, String>,
    tick: u64,
    bytes: usize,
    routes: HashMap<String, RouteUsage>,
}

pub struct MemoryTier {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

/// What an entry costs the process beyond its own bytes: the key held twice
/// (map and recency order), the map and tree nodes, the `Arc` and the
/// allocations' headers. Measured: RSS grew ~1.8 KB per small entry while
/// `Entry::size` counted ~0.7 KB (benches/cache.sh, BENCHMARKS.md).
const ENTRY_OVERHEAD: usize = 1024;

/// The bytes an entry under `key` is accounted for.
pub fn accounted(key: &str, entry: &Entry) -> usize {
    entry.size() + 2 * key.len() + ENTRY_OVERHEAD
}

fn route_of(key: &str) -> &str {
    key.split(':').next().unwrap_or(key)
}

impl MemoryTier {
    pub fn new(max_bytes: u64) -> MemoryTier {
        MemoryTier {
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent-enough state (every
        // mutation below is completed before anything can panic).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &str, now_ms: u64) -> Lookup {
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(slot) = inner.map.get_mut(key) else {
            return Lookup::Miss;
        };
        let found = Lookup::of(slot.entry.clone(), now_ms);
        if matches!(found, Lookup::Miss) {
            inner.remove(key);
            return Lookup::Miss;
        }
        inner.tick += 1;
        inner.order.remove(&slot.tick);
        slot.tick = inner.tick;
        inner.order.insert(slot.tick, key.to_string());
        found
    }

    /// Store `entry` under `key` (replacing any entry there). Returns the
    /// keys evicted to make room; an entry larger than the whole tier is
    /// not stored (and evicts nothing).
    pub fn insert(&self, key: String, entry: Arc<Entry>) -> Vec<String> {
        let size = accounted(&key, &entry);
        if size > self.max_bytes {
            return Vec::new();
        }
        let mut g = self.lock();
        let inner = &mut *g;
        inner.remove(&key);
        let mut evicted = Vec::new();
        while inner.bytes + size > self.max_bytes {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            inner.remove(&oldest);
            evicted.push(oldest);
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.order.insert(tick, key.clone());
        inner.bytes += size;
        let u = inner.routes.entry(route_of(&key).to_string()).or_default();
        u.entries += 1;
        u.bytes += size as u64;
        inner.map.insert(key, Slot { entry, tick, size });
        evicted
    }

    /// Remove every entry whose key matches; returns how many.
    pub fn remove_where(&self, mut matches: impl FnMut(&str) -> bool) -> usize {
        let mut g = self.lock();
        let doomed: Vec<String> = g.map.keys().filter(|k| matches(k)).cloned().collect();
        for k in &doomed {
            g.remove(k);
        }
        doomed.len()
    }

    /// Drop entries past their keep time; returns how many.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let mut g = self.lock();
        let doomed: Vec<String> = g
            .map
            .iter()
            .filter(|(_, s)| !s.entry.is_kept(now_ms))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &doomed {
            g.remove(k);
        }
        doomed.len()
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries and bytes per route (routes that held entries once and are
    /// now empty are reported with zeros, so gauges go back to 0).
    pub fn usage(&self) -> Vec<(String, RouteUsage)> {
        let g = self.lock();
        let mut v: Vec<_> = g.routes.iter().map(|(k, u)| (k.clone(), *u)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

impl Inner {
    fn remove(&mut self, key: &str) {
        if let Some(slot) = self.map.remove(key) {
            self.order.remove(&slot.tick);
            self.bytes -= slot.size;
            if let Some(u) = self.routes.get_mut(route_of(key)) {
                u.entries = u.entries.saturating_sub(1);
                u.bytes = u.bytes.saturating_sub(slot.size as u64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::entry::Chunk;
    use super::*;
    use bytes::Bytes;

    fn entry(body_len: usize, stored_at_ms: u64, ttl_ms: u64, keep_ms: u64) -> Arc<Entry> {
        Arc::new(Entry {
            status: 200,
            headers: vec![],
            chunks: vec![Chunk {
                at_ms: 0,
                data: Bytes::from(vec![b'x'; body_len]),
            }],
            sse: false,
            stored_at_ms,
            ttl_ms,
            keep_ms,
        })
    }

    fn size_of(key: &str, e: &Entry) -> usize {
        accounted(key, e)
    }

    #[test]
    fn fresh_then_stale_then_gone() {
        let m = MemoryTier::new(1 << 20);
        m.insert("r:shared:a".into(), entry(10, 1000, 100, 300));
        assert!(matches!(m.get("r:shared:a", 1050), Lookup::Fresh(_)));
        assert!(matches!(m.get("r:shared:a", 1100), Lookup::Stale(_)));
        assert!(matches!(m.get("r:shared:a", 1299), Lookup::Stale(_)));
        assert!(matches!(m.get("r:shared:a", 1300), Lookup::Miss));
        // Removed on that lookup.
        assert_eq!(m.len(), 0);
        assert_eq!(m.bytes(), 0);
    }

    #[test]
    fn evicts_least_recently_used_within_the_byte_bound() {
        let e = entry(1000, 0, u64::MAX / 4, u64::MAX / 4);
        let one = size_of("r:s:a", &e);
        let m = MemoryTier::new((one * 3) as u64);
        assert!(m.insert("r:s:a".into(), e.clone()).is_empty());
        assert!(m.insert("r:s:b".into(), e.clone()).is_empty());
        assert!(m.insert("r:s:c".into(), e.clone()).is_empty());
        // Touch a: b is now the least recently used.
        assert!(matches!(m.get("r:s:a", 1), Lookup::Fresh(_)));
        assert_eq!(
            m.insert("r:s:d".into(), e.clone()),
            vec!["r:s:b".to_string()]
        );
        assert!(matches!(m.get("r:s:b", 1), Lookup::Miss));
        assert_eq!(m.len(), 3);
        assert!(m.bytes() <= one * 3);
        // Replacing a key does not double count it.
        m.insert("r:s:a".into(), e.clone());
        assert_eq!(m.len(), 3);
        assert_eq!(m.bytes(), one * 3);
    }

    #[test]
    fn an_entry_larger_than_the_tier_is_not_stored() {
        let m = MemoryTier::new(2000);
        m.insert("r:s:small".into(), entry(10, 0, 1000, 1000));
        assert!(m
            .insert("r:s:big".into(), entry(1000, 0, 1000, 1000))
            .is_empty());
        assert!(matches!(m.get("r:s:big", 1), Lookup::Miss));
        assert!(matches!(m.get("r:s:small", 1), Lookup::Fresh(_)));
    }

    #[test]
    fn purge_by_predicate_and_usage_per_route() {
        let m = MemoryTier::new(1 << 20);
        m.insert("chat:alice:1".into(), entry(10, 0, 1000, 1000));
        m.insert("chat:bob:2".into(), entry(10, 0, 1000, 1000));
        m.insert("rag:alice:3".into(), entry(20, 0, 1000, 1000));
        let usage = m.usage();
        assert_eq!(usage.len(), 2);
        assert_eq!(usage[0].0, "chat");
        assert_eq!(usage[0].1.entries, 2);
        assert_eq!(m.remove_where(|k| k.split(':').nth(1) == Some("alice")), 2);
        assert_eq!(m.len(), 1);
        assert!(matches!(m.get("chat:bob:2", 1), Lookup::Fresh(_)));
        let usage = m.usage();
        assert_eq!(usage[1].0, "rag");
        assert_eq!(usage[1].1, RouteUsage::default());
        assert_eq!(m.remove_where(|_| true), 1);
        assert_eq!(m.bytes(), 0);
    }

    #[test]
    fn sweep_drops_only_expired_entries() {
        let m = MemoryTier::new(1 << 20);
        m.insert("r:s:old".into(), entry(10, 0, 10, 20));
        m.insert("r:s:new".into(), entry(10, 100, 10, 20));
        assert_eq!(m.sweep(50), 1);
        assert_eq!(m.len(), 1);
        assert!(matches!(m.get("r:s:new", 105), Lookup::Fresh(_)));
    }
}
