//! The response cache's tiers and purges.
//!
//! - **memory**: this instance's [`MemoryTier`], bounded by
//!   `store.cache.max_memory`.
//! - **redis**: entries encoded ([`Entry::encode`], deflated over
//!   `store.cache.compress_over`) under
//!   `{prefix}:v1:cache:{route}:scope:digest`, with `PX` = the entry's keep
//!   time (`ttl` + `stale_if_error`), so Redis expires them by itself.
//! - **tiered**: memory first; a Redis hit is copied into memory for the
//!   rest of its keep time.
//!
//! Every Redis call is bounded by `store.redis.timeout`; a failure is
//! reported to the caller (which counts it and treats it as a miss, or a
//! skipped write) and never fails a request. The connection comes back by
//! itself (see [`RedisStore`]).
//!
//! **Purges** remove matching entries from this instance's memory, from
//! Redis (`SCAN` + `UNLINK`), and are published on
//! `{prefix}:v1:cache-purge`, which every replica subscribes to (from its
//! first cache lookup on), so that no replica's memory tier keeps serving
//! what was purged. A replica whose subscription broke clears its whole
//! memory tier when it resubscribes, since it may have missed a purge.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{key, KeySpace, RedisStore, StoreError};
use crate::policy::cache::key::identity_tag;
use crate::policy::cache::lru::Lookup;
use crate::policy::cache::{CacheKey, CacheStoreConfig, Entry, MemoryTier, StoreKind};

/// How long a purge may spend scanning Redis.
const PURGE_BUDGET: Duration = Duration::from_secs(10);
/// Pause between reconnection attempts of the purge subscriber.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// What a purge removes: every given criterion must match (`all` alone
/// matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purge {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The caller's identity as `identity.user` resolves it (hashed here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// A prefix of the `route:scope:digest` key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

impl Purge {
    /// Why the purge is not valid, if it is not.
    pub fn problem(&self) -> Option<&'static str> {
        let any = self.route.is_some() || self.identity.is_some() || self.prefix.is_some();
        match (self.all, any) {
            (true, true) => Some("`all` cannot be combined with `route`, `identity` or `prefix`"),
            (false, false) => Some(
                "say what to purge: `route`, `identity`, `prefix` (any combination) or `all: true`",
            ),
            _ => None,
        }
    }

    /// Whether a `route:scope:digest` key is purged.
    pub fn matches(&self, k: &str) -> bool {
        if self.all {
            return true;
        }
        let mut parts = k.splitn(3, ':');
        let (route, scope) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        self.route.as_deref().is_none_or(|r| r == route)
            && self
                .identity
                .as_deref()
                .is_none_or(|id| identity_tag(id) == scope)
            && self.prefix.as_deref().is_none_or(|p| k.starts_with(p))
    }
}

/// What a purge removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Purged {
    pub memory: usize,
    /// `None` without Redis.
    pub redis: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_error: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct PurgeMessage {
    from: String,
    purge: Purge,
}

pub struct CacheStore {
    pub memory: MemoryTier,
    redis: Option<RedisStore>,
    compress_over: Option<usize>,
    subscribed: AtomicBool,
    /// The purge subscription is established (for `/admin/status`).
    pub subscription_live: AtomicBool,
    /// This replica, so it can skip its own purge messages.
    instance: String,
}

impl CacheStore {
    pub fn new(config: &CacheStoreConfig, redis: Option<RedisStore>) -> Arc<CacheStore> {
        Arc::new(CacheStore {
            memory: MemoryTier::new(config.max_memory),
            redis,
            compress_over: config.compress_over,
            subscribed: AtomicBool::new(false),
            subscription_live: AtomicBool::new(false),
            instance: crate::proxy::headers::new_request_id(),
        })
    }

    pub fn has_redis(&self) -> bool {
        self.redis.is_some()
    }

    fn redis_key(redis: &RedisStore, k: &CacheKey) -> String {
        let tail = format!("{}:{}", k.scope, k.digest);
        key(redis.key_prefix(), KeySpace::Cache, &k.route, &tail)
    }

    /// Look `k` up in the tiers `kind` uses. A Redis failure is returned
    /// beside whatever memory had.
    pub async fn get(
        self: &Arc<Self>,
        kind: StoreKind,
        k: &CacheKey,
        now_ms: u64,
    ) -> (Lookup, Option<StoreError>) {
        let ks = k.as_str();
        let mut found = Lookup::Miss;
        if kind.uses_memory() {
            found = self.memory.get(ks, now_ms);
            if matches!(found, Lookup::Fresh(_)) {
                return (found, None);
            }
        }
        let Some(redis) = self.redis.as_ref().filter(|_| kind.uses_redis()) else {
            return (found, None);
        };
        self.ensure_subscribed();
        let cmd = redis::cmd("GET").arg(Self::redis_key(redis, k)).clone();
        match redis.query::<Option<Vec<u8>>>(&cmd, redis.timeout()).await {
            Ok(Some(raw)) => match Entry::decode(&raw) {
                Ok(entry) => {
                    let entry = Arc::new(entry);
                    let from_redis = Lookup::of(entry.clone(), now_ms);
                    match from_redis {
                        Lookup::Fresh(_) => {
                            if kind.uses_memory() {
                                self.memory.insert(ks.to_string(), entry);
                            }
                            (from_redis, None)
                        }
                        Lookup::Stale(_) if matches!(found, Lookup::Miss) => (from_redis, None),
                        _ => (found, None),
                    }
                }
                Err(e) => (found, Some(StoreError::Protocol(e.to_string()))),
            },
            Ok(None) => (found, None),
            Err(e) => (found, Some(e)),
        }
    }

    /// Store `entry` in the tiers `kind` uses. Returns the keys the memory
    /// tier evicted, and a Redis failure if there was one.
    pub async fn put(
        self: &Arc<Self>,
        kind: StoreKind,
        k: &CacheKey,
        entry: Arc<Entry>,
        now_ms: u64,
    ) -> (Vec<String>, Option<StoreError>) {
        let mut evicted = Vec::new();
        let keep_left = entry
            .stored_at_ms
            .saturating_add(entry.keep_ms)
            .saturating_sub(now_ms);
        if keep_left == 0 {
            return (evicted, None);
        }
        let redis = self.redis.as_ref().filter(|_| kind.uses_redis());
        let encoded = redis.map(|_| entry.encode(self.compress_over));
        if kind.uses_memory() {
            evicted = self.memory.insert(k.as_str().to_string(), entry);
            self.ensure_subscribed();
        }
        let (Some(redis), Some(bytes)) = (redis, encoded) else {
            return (evicted, None);
        };
        let cmd = redis::cmd("SET")
            .arg(Self::redis_key(redis, k))
            .arg(bytes)
            .arg("PX")
            .arg(keep_left)
            .clone();
        match redis.query::<()>(&cmd, redis.timeout()).await {
            Ok(()) => (evicted, None),
            Err(e) => (evicted, Some(e)),
        }
    }

    /// Remove what `p` matches here and in Redis, and tell the other
    /// replicas to drop it from their memory.
    pub async fn purge(self: &Arc<Self>, p: &Purge) -> Purged {
        let mut out = Purged {
            memory: self.memory.remove_where(|k| p.matches(k)),
            ..Purged::default()
        };
        let Some(redis) = &self.redis else {
            return out;
        };
        match tokio::time::timeout(PURGE_BUDGET, purge_redis(redis, p)).await {
            Ok(Ok(n)) => out.redis = Some(n),
            Ok(Err(e)) => out.redis_error = Some(e.to_string()),
            Err(_) => {
                out.redis_error = Some(format!(
                    "the Redis purge did not finish within {}s",
                    PURGE_BUDGET.as_secs()
                ))
            }
        }
        let msg = PurgeMessage {
            from: self.instance.clone(),
            purge: p.clone(),
        };
        let payload = serde_json::to_string(&msg).unwrap_or_default();
        let cmd = redis::cmd("PUBLISH")
            .arg(channel(redis))
            .arg(payload)
            .clone();
        if let Err(e) = redis.query::<i64>(&cmd, redis.timeout()).await {
            out.redis_error
                .get_or_insert_with(|| format!("the purge was not relayed to other replicas: {e}"));
        }
        out
    }

    /// Start the purge subscriber (once; only with Redis).
    pub fn ensure_subscribed(self: &Arc<Self>) {
        let Some(redis) = &self.redis else {
            return;
        };
        if self.subscribed.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.subscribed.store(false, Ordering::Release);
            return;
        };
        rt.spawn(subscribe(
            Arc::downgrade(self),
            redis.client().clone(),
            channel(redis),
        ));
    }
}

fn channel(redis: &RedisStore) -> String {
    format!("{}:v1:cache-purge", redis.key_prefix())
}

/// `SCAN` for the keys `p` may match and `UNLINK` those it does.
async fn purge_redis(redis: &RedisStore, p: &Purge) -> Result<usize, StoreError> {
    let base = format!("{}:v1:cache:", redis.key_prefix());
    let pattern = match &p.route {
        Some(r) => format!("{base}{{{}}}:*", glob_escape(r)),
        None => format!("{base}*"),
    };
    let mut cursor: u64 = 0;
    let mut removed = 0;
    loop {
        let cmd = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .clone();
        let (next, keys): (u64, Vec<String>) = redis.query(&cmd, redis.timeout() * 4).await?;
        let doomed: Vec<&String> = keys
            .iter()
            .filter(|k| operator_key(&base, k).is_some_and(|ok| p.matches(&ok)))
            .collect();
        if !doomed.is_empty() {
            let mut cmd = redis::cmd("UNLINK");
            for k in &doomed {
                cmd.arg(k.as_str());
            }
            removed += redis.query::<usize>(&cmd, redis.timeout() * 4).await?;
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}

/// `{prefix}:v1:cache:{route}:scope:digest` -> `route:scope:digest`.
fn operator_key(base: &str, redis_key: &str) -> Option<String> {
    let rest = redis_key.strip_prefix(base)?.strip_prefix('{')?;
    let (route, tail) = rest.split_once("}:")?;
    Some(format!("{route}:{tail}"))
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Apply other replicas' purges to this memory tier, for as long as the
/// store lives; reconnect when the subscription breaks.
async fn subscribe(store: Weak<CacheStore>, client: redis::Client, channel: String) {
    let mut broke_before = false;
    loop {
        let connect = async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(mut ps)) => {
                let Some(me) = store.upgrade() else { return };
                if broke_before {
                    // Purges published while we were away are lost: forget
                    // everything rather than serve what may have been purged.
                    let n = me.memory.remove_where(|_| true);
                    tracing::info!(
                        dropped = n,
                        "cache purge subscription restored; memory tier cleared"
                    );
                }
                let me_id = me.instance.clone();
                me.subscription_live.store(true, Ordering::Release);
                drop(me);
                let mut messages = ps.on_message();
                while let Some(msg) = messages.next().await {
                    let Ok(payload) = msg.get_payload::<String>() else {
                        continue;
                    };
                    let Ok(m) = serde_json::from_str::<PurgeMessage>(&payload) else {
                        tracing::warn!("ignoring a malformed cache purge message");
                        continue;
                    };
                    if m.from == me_id {
                        continue;
                    }
                    let Some(me) = store.upgrade() else { return };
                    let n = me.memory.remove_where(|k| m.purge.matches(k));
                    tracing::info!(removed = n, purge = ?m.purge, "applied a cache purge from another replica");
                }
                if let Some(me) = store.upgrade() {
                    me.subscription_live.store(false, Ordering::Release);
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cache purge subscription failed");
            }
            Err(_) => tracing::debug!("cache purge subscription timed out"),
        }
        if store.strong_count() == 0 {
            return;
        }
        broke_before = true;
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_matching() {
        let alice = identity_tag("alice");
        let k1 = format!("chat:{alice}:aaaa");
        let k2 = "chat:shared:bbbb".to_string();
        let k3 = format!("rag:{alice}:cccc");
        let route = Purge {
            route: Some("chat".into()),
            ..Purge::default()
        };
        assert!(route.matches(&k1) && route.matches(&k2) && !route.matches(&k3));
        let user = Purge {
            identity: Some("alice".into()),
            ..Purge::default()
        };
        assert!(user.matches(&k1) && !user.matches(&k2) && user.matches(&k3));
        let both = Purge {
            route: Some("rag".into()),
            identity: Some("alice".into()),
            ..Purge::default()
        };
        assert!(!both.matches(&k1) && both.matches(&k3));
        let prefix = Purge {
            prefix: Some("chat:shared:b".into()),
            ..Purge::default()
        };
        assert!(!prefix.matches(&k1) && prefix.matches(&k2));
        let all = Purge {
            all: true,
            ..Purge::default()
        };
        assert!(all.matches(&k1) && all.matches(&k3));
        assert!(all.problem().is_none());
        assert!(Purge::default().problem().is_some());
        assert!(Purge {
            all: true,
            route: Some("x".into()),
            ..Purge::default()
        }
        .problem()
        .is_some());
    }

    fn entry(body: &str, stored_at_ms: u64) -> Arc<Entry> {
        Arc::new(Entry {
            status: 200,
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            chunks: vec![crate::policy::cache::Chunk {
                at_ms: 0,
                data: bytes::Bytes::from(body.to_string()),
            }],
            sse: false,
            stored_at_ms,
            ttl_ms: 60_000,
            keep_ms: 120_000,
        })
    }

    fn key(route: &str, scope: &str) -> CacheKey {
        CacheKey::new(route, scope, "d1")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_tier_round_trips_compresses_expires_and_fails_open() {
        let mut server = crate::store::testutil::RedisServer::start();
        let redis = RedisStore::new(&server.config(Duration::from_millis(200))).unwrap();
        let cfg = CacheStoreConfig {
            max_memory: 1 << 20,
            compress_over: Some(256),
        };
        let store = CacheStore::new(&cfg, Some(redis.clone()));
        let now = 1_700_000_000_000;
        let big = "x".repeat(4000);
        let k = key("chat", "shared");
        let (_, err) = store.put(StoreKind::Redis, &k, entry(&big, now), now).await;
        assert_eq!(err, None);
        // Stored compressed, with the keep time as its expiry.
        let rk = CacheStore::redis_key(&redis, &k);
        assert_eq!(rk, "fwtest:v1:cache:{chat}:shared:d1");
        let raw: Vec<u8> = redis
            .query(&redis::cmd("GET").arg(&rk).clone(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(&raw[..5], b"FWE1\x01");
        assert!(raw.len() < 500, "compressed: {} bytes", raw.len());
        let pttl: i64 = redis
            .query(&redis::cmd("PTTL").arg(&rk).clone(), Duration::from_secs(1))
            .await
            .unwrap();
        assert!((119_000..=120_000).contains(&pttl), "{pttl}");
        // Read back through the tier, fresh, then stale.
        let (found, err) = store.get(StoreKind::Redis, &k, now + 1).await;
        assert_eq!(err, None);
        assert!(matches!(found, Lookup::Fresh(e) if e.body().len() == 4000));
        let (found, _) = store.get(StoreKind::Redis, &k, now + 90_000).await;
        assert!(matches!(found, Lookup::Stale(_)));
        // Redis-only never fills memory; tiered does.
        assert!(store.memory.is_empty());
        let (found, _) = store.get(StoreKind::Tiered, &k, now + 1).await;
        assert!(matches!(found, Lookup::Fresh(_)));
        assert_eq!(store.memory.len(), 1);
        // Purge by route removes it from both tiers.
        let purged = store
            .purge(&Purge {
                route: Some("chat".into()),
                ..Purge::default()
            })
            .await;
        assert_eq!((purged.memory, purged.redis), (1, Some(1)), "{purged:?}");
        let (found, _) = store.get(StoreKind::Tiered, &k, now + 1).await;
        assert!(matches!(found, Lookup::Miss));

        // Redis down: a bounded error, never a hang; memory still answers.
        store
            .put(StoreKind::Memory, &key("chat", "m"), entry("m", now), now)
            .await;
        server.kill();
        let started = std::time::Instant::now();
        let (found, err) = store.get(StoreKind::Redis, &k, now + 1).await;
        assert!(matches!(found, Lookup::Miss));
        assert!(err.is_some());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let (_, err) = store.put(StoreKind::Redis, &k, entry("y", now), now).await;
        assert!(err.is_some());
        let (found, _) = store
            .get(StoreKind::Tiered, &key("chat", "m"), now + 1)
            .await;
        assert!(matches!(found, Lookup::Fresh(_)));
        // Back again without a new store.
        server.restart();
        let mut ok = false;
        for _ in 0..100 {
            if store
                .put(StoreKind::Redis, &k, entry("z", now), now)
                .await
                .1
                .is_none()
            {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ok, "Redis is used again after a restart");
        let (found, _) = store.get(StoreKind::Redis, &k, now + 1).await;
        assert!(matches!(found, Lookup::Fresh(e) if e.body() == "z"));
    }

    #[test]
    fn redis_keys_map_back_to_operator_keys() {
        let base = "fw:v1:cache:";
        assert_eq!(
            operator_key(base, "fw:v1:cache:{chat}:shared:abcd").as_deref(),
            Some("chat:shared:abcd")
        );
        assert_eq!(operator_key(base, "fw:v1:rl:{x}:y"), None);
        assert_eq!(glob_escape("a*b[c]"), "a\\*b\\[c\\]");
    }
}
