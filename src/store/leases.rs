//! Concurrency leases of shared routes (`concurrency.shared: true`) in
//! Redis: the [`LeaseStore`] of [`RedisStore`].
//!
//! One sorted set per route, `{prefix}:v1:conc:{route}:leases`, member =
//! lease id (`<host>/<pid>.<start>:<n>`, so `ZRANGE ... WITHSCORES` shows
//! which replica holds what), score = expiry in Redis' own milliseconds.
//!
//! - **hold** is the Lua script [`SCRIPT`], a transcription of
//!   `crate::policy::concurrency::shared::LeaseTable::hold`: one atomic call
//!   drops the expired leases, renews the ids already present and adds the
//!   others while fewer than `max` are live. The clock is Redis `TIME`, so
//!   replica clocks never matter. The set itself expires one second after
//!   the longest lease written to it, so an idle route leaves nothing behind.
//! - **release** is a plain `ZREM`.
//!
//! Both go through the store's timeout; a failed call is reported to the
//! caller, which applies the fallback described in
//! `crate::policy::concurrency::lease`.

use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use super::redis::{Call, Lua};
use super::{key, KeySpace, RedisStore, StoreError};
use crate::policy::concurrency::{HoldReply, LeaseStore};

/// `KEYS[1]`: the route's lease set. `ARGV`: now in ms (`0` = the server's
/// `TIME`), max live leases, lease in ms, then the lease ids.
///
/// The answer: live leases after the call, then one 0/1 per id (held now).
pub const SCRIPT: &str = r#"
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local max = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local key = KEYS[1]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local count = redis.call('ZCARD', key)
local out = {0}
for i = 4, #ARGV do
  local id = ARGV[i]
  local ok = 0
  if redis.call('ZSCORE', key, id) then
    redis.call('ZADD', key, now + ttl, id)
    ok = 1
  elseif count < max then
    redis.call('ZADD', key, now + ttl, id)
    count = count + 1
    ok = 1
  end
  out[#out + 1] = ok
end
out[1] = count
if count > 0 then
  local cur = redis.call('PTTL', key)
  if cur < ttl + 1000 then
    redis.call('PEXPIRE', key, ttl + 1000)
  end
end
return out
"#;

/// The name of `route`'s lease set.
pub fn lease_key(prefix: &str, route: &str) -> String {
    key(prefix, KeySpace::Concurrency, route, "leases")
}

impl RedisStore {
    /// One `hold` call (see [`SCRIPT`]); `now_ms` is used only by a store
    /// made with [`RedisStore::with_client_clock`].
    pub(crate) async fn hold_leases_at(
        &self,
        route: &str,
        ids: &[String],
        max: u32,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<HoldReply, StoreError> {
        let ttl_ms = ttl.as_millis().max(1).to_string();
        let mut args = Vec::with_capacity(3 + ids.len());
        args.extend([self.now_arg(now_ms), max.to_string(), ttl_ms]);
        args.extend(ids.iter().cloned());
        let calls = [Call {
            keys: vec![lease_key(self.key_prefix(), route)],
            args,
        }];
        let reply = self
            .run_script(Lua::Leases, &calls)
            .await?
            .pop()
            .ok_or_else(|| StoreError::Protocol("no reply".into()))??;
        if reply.len() != 1 + ids.len() {
            return Err(StoreError::Protocol(format!(
                "the lease script answered {} values for {} ids",
                reply.len(),
                ids.len()
            )));
        }
        Ok(HoldReply {
            in_use: u32::try_from(reply[0].max(0)).unwrap_or(u32::MAX),
            held: reply[1..].iter().map(|v| *v == 1).collect(),
        })
    }
}

#[async_trait]
impl LeaseStore for RedisStore {
    async fn hold_leases(
        &self,
        route: &str,
        ids: &[String],
        max: u32,
        ttl: Duration,
    ) -> Result<HoldReply, StoreError> {
        self.hold_leases_at(route, ids, max, ttl, 0).await
    }

    async fn release_leases(&self, route: &str, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(lease_key(self.key_prefix(), route)).arg(ids);
        match self.command(&cmd).await? {
            Value::Int(_) => Ok(()),
            _ => Err(StoreError::Protocol("ZREM answered a non-integer".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::concurrency::LeaseTable;
    use crate::store::testutil::RedisServer;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn lease_key_is_pinned() {
        assert_eq!(
            lease_key("floodwall", "agent"),
            "floodwall:v1:conc:{agent}:leases"
        );
    }

    /// The script and the model answer the same scenario identically,
    /// with the caller's clock.
    #[tokio::test]
    async fn the_script_matches_the_model() {
        let server = RedisServer::start();
        let store = RedisStore::with_client_clock(&server.config(Duration::from_secs(2))).unwrap();
        let mut model = LeaseTable::new();
        let t0 = 1_700_000_000_000u64;
        let ttl = Duration::from_millis(3000);
        // (ms after t0, ids, max; or a release when max is 0)
        let steps: &[(u64, &[&str], u32)] = &[
            (0, &["a:1", "a:2"], 2),
            (10, &["b:1"], 2),
            (20, &["a:1"], 0),
            (30, &["b:1", "b:2"], 2),
            (1000, &["a:2", "b:1"], 2),
            (2000, &["a:2"], 2),
            (3030, &["c:1", "b:2"], 2),
            (3035, &["b:1"], 2),
            (3500, &["c:1", "c:2", "c:3"], 3),
            (4000, &["c:1", "c:2", "c:3", "c:4"], 1),
            (4001, &["c:1", "c:2"], 0),
            (4002, &["c:4"], 1),
            (20000, &["d:1"], 1),
        ];
        for &(at, names, max) in steps {
            let now = t0 + at;
            if max == 0 {
                store.release_leases("agent", &ids(names)).await.unwrap();
                model.release(&ids(names));
                continue;
            }
            let got = store
                .hold_leases_at("agent", &ids(names), max, ttl, now)
                .await
                .unwrap();
            let want = model.hold(&ids(names), max, ttl.as_millis() as u64, now);
            assert_eq!(got, want, "at +{at}ms holding {names:?} (max {max})");
        }
    }

    #[tokio::test]
    async fn with_the_server_clock_the_cap_holds_and_the_set_expires_after_its_longest_lease() {
        let server = RedisServer::start();
        let store = RedisStore::new(&server.config(Duration::from_secs(2))).unwrap();
        let ttl = Duration::from_millis(300);
        let r = store
            .hold_leases("r", &ids(&["x:1", "x:2"]), 2, ttl)
            .await
            .unwrap();
        assert_eq!((r.held, r.in_use), (vec![true, true], 2));
        let held = |names: &'static [&'static str]| {
            let store = store.clone();
            async move {
                store
                    .hold_leases("r", &ids(names), 2, ttl)
                    .await
                    .unwrap()
                    .held
            }
        };
        assert_eq!(held(&["y:1"]).await, [false]);
        store.release_leases("r", &ids(&["x:1"])).await.unwrap();
        assert_eq!(held(&["y:1"]).await, [true]);
        // The set expires by itself one second after its longest lease, so
        // a route whose replicas all died leaves nothing behind.
        let mut cmd = redis::cmd("PTTL");
        cmd.arg(lease_key("fwtest", "r"));
        let Value::Int(pttl) = store.command(&cmd).await.unwrap() else {
            panic!("PTTL is an integer");
        };
        assert!((1..=1300).contains(&pttl), "PTTL {pttl}");
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_an_error_within_the_timeout() {
        let mut server = RedisServer::start();
        let store = RedisStore::new(&server.config(Duration::from_millis(100))).unwrap();
        server.kill();
        let started = std::time::Instant::now();
        let r = store
            .hold_leases("r", &ids(&["x:1"]), 1, Duration::from_secs(1))
            .await;
        assert!(r.is_err(), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(store.release_leases("r", &ids(&["x:1"])).await.is_err());
    }
}
