//! The response cache: what is cached, under which key, for how long, and
//! who waits for whom.
//!
//! Pure parts (no network, no system clock; time is a `now_ms` argument):
//! - [`key`]: the cache key. The request body is canonicalised (JSON keys
//!   sorted, insignificant whitespace removed, `ignore_fields` dropped) and
//!   hashed with SHA-256 together with the method, the path, the selected
//!   headers and a hash of `Authorization`; the caller's identity is a
//!   separate part of the key so that it can be purged.
//! - [`rules`]: whether a request may be looked up or stored
//!   (`Cache-Control`, streams), whether a response may be stored (200,
//!   `no-store`, complete), and which headers an entry keeps.
//! - [`entry`]: a stored response (status, headers, body chunks with their
//!   arrival offsets, when it was stored, how long it is fresh) and its
//!   versioned binary encoding for Redis, optionally deflate-compressed.
//! - [`lru`]: the memory tier, an LRU bounded by bytes with per-entry
//!   expiry (fresh until `ttl`, then kept for `stale_if_error`).
//!
//! [`flight`] is the one piece with async machinery: concurrent identical
//! misses join one upstream call (the leader) and tail its response as it
//! arrives, so a follower of a stream gets its first event long before the
//! leader's stream ends.
//!
//! The tiers themselves (memory in front of Redis, pub/sub purge) are in
//! `crate::store::cache`; the proxy wiring is `crate::proxy::cache`.

pub mod entry;
pub mod flight;
pub mod key;
pub mod lru;
pub mod rules;

use std::time::Duration;

pub use entry::{Chunk, Entry};
pub use flight::{Flights, Join};
pub use key::{CacheKey, KeyParts};
pub use lru::MemoryTier;

/// Default `routes[].cache.ttl`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Default `routes[].cache.max_entry`.
pub const DEFAULT_MAX_ENTRY: usize = 1 << 20;
/// Default `routes[].cache.lock_timeout`: how long a follower waits for the
/// leader's response header before going upstream itself.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `store.cache.max_memory`: the memory tier, all routes together.
pub const DEFAULT_MAX_MEMORY: u64 = 64 << 20;

/// Where a route's entries live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// This instance's memory only.
    Memory,
    /// Redis only (every replica shares the entries).
    Redis,
    /// Memory in front of Redis: a Redis hit is copied into memory.
    Tiered,
}

impl StoreKind {
    pub fn uses_memory(self) -> bool {
        matches!(self, StoreKind::Memory | StoreKind::Tiered)
    }
    pub fn uses_redis(self) -> bool {
        matches!(self, StoreKind::Redis | StoreKind::Tiered)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Memory => "memory",
            StoreKind::Redis => "redis",
            StoreKind::Tiered => "tiered",
        }
    }
}

/// Whose answers a request may be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Per caller: entries are keyed by `identity.user` (or `anonymous`).
    User,
    /// One entry for everyone (still keyed by `Authorization`, when sent).
    Shared,
}

/// What followers do when the leader of a collapsed miss fails before it
/// produced a cacheable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLeaderFailure {
    /// One follower becomes the new leader; the others follow it.
    Takeover,
    /// Every follower goes upstream on its own.
    Each,
}

/// How a cached stream is replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// All events at once (default).
    Immediate,
    /// With the gaps the upstream had when it was recorded.
    Paced,
}

/// `routes[].cache`, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct CachePolicy {
    pub ttl: Duration,
    pub store: StoreKind,
    pub scope: Scope,
    /// Dotted JSON paths left out of the key (e.g. `user`, `stream_options`).
    pub ignore_fields: Vec<Vec<String>>,
    /// Request headers (lower-case) whose values are part of the key.
    pub key_headers: Vec<String>,
    /// `streams: record`: SSE responses are recorded and replayed.
    pub streams: bool,
    /// How long past `ttl` an entry may still be served when the upstream
    /// fails (`x-cache: STALE`).
    pub stale_if_error: Option<Duration>,
    /// Larger responses are passed through but not stored.
    pub max_entry: usize,
    /// Concurrent identical misses: followers wait at most this long for
    /// the leader's header.
    pub lock_timeout: Duration,
    pub on_leader_failure: OnLeaderFailure,
    pub replay: Replay,
    /// A hit is charged its recorded tokens and cost (default: free).
    pub charge_hits: bool,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            ttl: DEFAULT_TTL,
            store: StoreKind::Memory,
            scope: Scope::User,
            ignore_fields: Vec::new(),
            key_headers: Vec::new(),
            streams: true,
            stale_if_error: None,
            max_entry: DEFAULT_MAX_ENTRY,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            on_leader_failure: OnLeaderFailure::Takeover,
            replay: Replay::Immediate,
            charge_hits: false,
        }
    }
}

impl CachePolicy {
    /// How long an entry is kept in all: fresh, then stale.
    pub fn keep_for(&self) -> Duration {
        self.ttl + self.stale_if_error.unwrap_or_default()
    }
}

/// `store.cache`: the tiers' own settings, shared by every route.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheStoreConfig {
    /// The memory tier's bound, in bytes (keys, headers and bodies).
    pub max_memory: u64,
    /// Entries larger than this are deflate-compressed in Redis; `None`: never.
    pub compress_over: Option<usize>,
}

impl Default for CacheStoreConfig {
    fn default() -> Self {
        CacheStoreConfig {
            max_memory: DEFAULT_MAX_MEMORY,
            compress_over: None,
        }
    }
}

/// The `x-cache` value of a response on a cached route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Served from the cache, fresh.
    Hit,
    /// Fetched from the upstream (and stored if it could be), or received
    /// from the leader of a collapsed miss.
    Miss,
    /// The cache was not consulted (`Cache-Control: no-store` or `no-cache`
    /// on the request, a stream on a route that does not record streams).
    Bypass,
    /// Served from an expired entry because the upstream failed.
    Stale,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Hit => "HIT",
            Status::Miss => "MISS",
            Status::Bypass => "BYPASS",
            Status::Stale => "STALE",
        }
    }
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Status::Hit => "hit",
            Status::Miss => "miss",
            Status::Bypass => "bypass",
            Status::Stale => "stale",
        }
    }
}
