//! State shared across replicas, in Redis.
//!
//! - [`redis`]: the client ([`RedisStore`]): automatic reconnection, a
//!   timeout around every call, and the rate-limit Lua script.
//! - [`cache`]: the response cache's tiers (memory in front of Redis) and
//!   its purges, relayed to every replica over pub/sub.
//! - [`leases`]: the concurrency leases of shared routes
//!   (`concurrency.shared: true`): a Lua script over one sorted set per
//!   route.
//! - [`key`]: the one function that builds Redis keys. Keys are a
//!   compatibility contract between replicas (and between versions during a
//!   rolling deploy), so their format is versioned (`v1`) and pinned by a
//!   test.
//!
//! In-memory state for a single instance lives with its policy (for rate
//! limits, `crate::policy::ratelimit::MemoryStore`).

pub mod cache;
pub mod leases;
pub mod redis;
#[cfg(test)]
pub(crate) mod testutil;

use std::time::Duration;

pub use self::redis::RedisStore;

/// Why a call to the shared store failed. The caller applies the rule's
/// `on_store_error`; no variant carries the Redis URL (it may hold a
/// password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("redis did not answer within {}ms", .0.as_millis())]
    Timeout(Duration),
    #[error("redis is unavailable: {0}")]
    Unavailable(String),
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
}

impl StoreError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout(_) => "timeout",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Protocol(_) => "protocol",
        }
    }
}

/// What a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySpace {
    /// A rule's window states for one key: a hash.
    RateLimit,
    /// A budget's spend per key for one period: a sorted set.
    Spend,
    /// A cached response (`crate::policy::cache::Entry` encoded): a string.
    /// The "rule" is the route, the tail `scope:digest`.
    Cache,
    /// A shared route's concurrency leases (lease id -> expiry): a sorted
    /// set. The "rule" is the route name.
    Concurrency,
}

impl KeySpace {
    fn as_str(self) -> &'static str {
        match self {
            KeySpace::RateLimit => "rl",
            KeySpace::Spend => "spend",
            KeySpace::Cache => "cache",
            KeySpace::Concurrency => "conc",
        }
    }
}

/// Builds every Redis key floodwall uses:
/// `{prefix}:v1:{space}:{{rule}}:{tail}`, e.g.
/// `floodwall:v1:rl:{per-user-chat}:alice`.
///
/// The rule name is a Redis Cluster hash tag, so all keys of one rule (its
/// counters and its spend index, which one script updates together) live
/// in one slot. `v1` changes whenever the layout of the values changes.
pub fn key(prefix: &str, space: KeySpace, rule: &str, tail: &str) -> String {
    let space = space.as_str();
    let mut k = String::with_capacity(prefix.len() + space.len() + rule.len() + tail.len() + 10);
    k.push_str(prefix);
    k.push_str(":v1:");
    k.push_str(space);
    k.push_str(":{");
    k.push_str(rule);
    k.push_str("}:");
    k.push_str(tail);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_format_is_pinned() {
        assert_eq!(
            key("floodwall", KeySpace::RateLimit, "per-user-chat", "alice"),
            "floodwall:v1:rl:{per-user-chat}:alice"
        );
        assert_eq!(
            key(
                "team-a",
                KeySpace::RateLimit,
                "per-user-route",
                "alice|chat"
            ),
            "team-a:v1:rl:{per-user-route}:alice|chat"
        );
        assert_eq!(
            key(
                "floodwall",
                KeySpace::Spend,
                "chat-spend",
                "c:d:1700006400000"
            ),
            "floodwall:v1:spend:{chat-spend}:c:d:1700006400000"
        );
        assert_eq!(
            key("floodwall", KeySpace::Cache, "chat", "shared:9e99"),
            "floodwall:v1:cache:{chat}:shared:9e99"
        );
        assert_eq!(
            key("floodwall", KeySpace::Concurrency, "agent", "leases"),
            "floodwall:v1:conc:{agent}:leases"
        );
        // A `{` in the tail does not move the hash tag: Redis uses the first
        // `{...}`, which is always the rule.
        assert_eq!(
            key("fw", KeySpace::RateLimit, "r", "{x}"),
            "fw:v1:rl:{r}:{x}"
        );
    }
}
