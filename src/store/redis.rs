//! The Redis client: one multiplexed connection with automatic
//! reconnection (`redis::aio::ConnectionManager`), a timeout around every
//! call, and the rate-limit script.
//!
//! **Connecting never blocks start-up.** The first call starts a background
//! task that connects (retrying with back-off until it succeeds); calls wait
//! for it only within their own timeout. Once connected, the connection
//! manager reconnects by itself after Redis restarts; calls made while it
//! does fail fast with [`StoreError::Timeout`] or
//! [`StoreError::Unavailable`], and the caller applies the rule's
//! `on_store_error`. Nothing here panics or waits longer than
//! `store.redis.timeout`.
//!
//! **One round trip per decision.** Each rule's decision is one call of the
//! Lua script [`SCRIPT`] (all of the rule's windows, checked and charged
//! atomically with the server's `TIME`); the rules of one request are sent
//! together as one pipeline. The script is called with `EVALSHA`; a
//! `NOSCRIPT` answer (Redis restarted, or `SCRIPT FLUSH`) is retried with
//! `EVAL` for those commands only, which also reloads it.
//!
//! A call that times out may still have been applied by Redis. A rule that
//! then fails open has charged a request it did not count; the error is on
//! the side of counting too much.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, Value};
use tokio::sync::watch;

use super::{key, KeySpace, StoreError};
use crate::config::limits::Field;
use crate::config::RedisConfig;
use crate::policy::ratelimit::math::{self, Eval, Params, State};
use crate::policy::ratelimit::{Adjustment, PerRule, Plan, RuleEval};

/// How long one connection attempt may take (in the background).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Back-off between background connection attempts.
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// Values per window in the script's answer.
const OUT_STRIDE: usize = 8;

/// The rate-limit script: a transcription of `evaluate`, `adjust` and
/// `expires_at` in `crate::policy::ratelimit::math`, over one rule's hash.
///
/// `KEYS[1]` is the rule's hash for one key; `KEYS[2..]` are spend indexes.
/// `ARGV`: op (`check` | `adjust` | `peek`), now in ms (`0` = the server's
/// `TIME`), the number of windows, the index member (the rule key), then
/// nine values per window: field, kind (`g` rolling | `c` calendar), three
/// parameters (`g`: tick ms, ticks per window, rate; `c`: period code,
/// budget, the reservation's period start for `adjust`), the amount (the
/// signed delta for `adjust`), the capacity (`g`), the KEYS index of the
/// spend index (0 = none) and the period start the caller's index key was
/// built for.
///
/// The answer: all-allowed (0/1), now, then eight values per window:
/// allowed, reserved, remaining, reset ms, wait ms, period start, level,
/// at. Every number is an integer below 2^53, so Lua's doubles are exact.
pub const SCRIPT: &str = r#"
local op = ARGV[1]
local now = tonumber(ARGV[2])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local n = tonumber(ARGV[3])
local member = ARGV[4]
local key = KEYS[1]
local S = 9
local DAY = 86400000

local function idiv(a, b)
  local q = math.floor(a / b)
  while q * b > a do q = q - 1 end
  while (q + 1) * b <= a do q = q + 1 end
  return q
end
local function cdiv(a, b)
  local q = idiv(a, b)
  if q * b < a then q = q + 1 end
  return q
end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = idiv(y, 400)
  local yoe = y - era * 400
  local mp = m + 9
  if m > 2 then mp = m - 3 end
  local doy = idiv(153 * mp + 2, 5) + d - 1
  local doe = yoe * 365 + idiv(yoe, 4) - idiv(yoe, 100) + doy
  return era * 146097 + doe - 719468
end
local function civil_from_days(days)
  local z = days + 719468
  local era = idiv(z, 146097)
  local doe = z - era * 146097
  local yoe = idiv(doe - idiv(doe, 1460) + idiv(doe, 36524) - idiv(doe, 146096), 365)
  local doy = doe - (365 * yoe + idiv(yoe, 4) - idiv(yoe, 100))
  local mp = idiv(5 * doy + 2, 153)
  local m = mp - 9
  if mp < 10 then m = mp + 3 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
local function bounds(code, t)
  if code == 'h' then
    local s = idiv(t, 3600000) * 3600000
    return s, s + 3600000
  end
  local day = idiv(t, DAY)
  if code == 'd' then return day * DAY, (day + 1) * DAY end
  if code == 'w' then
    local s = day - (day + 3) % 7
    return s * DAY, (s + 7) * DAY
  end
  local y, m = civil_from_days(day)
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return days_from_civil(y, m, 1) * DAY, days_from_civil(ny, nm, 1) * DAY
end
local function drained(level, at, now_t, rate)
  local el = now_t - at
  if el <= 0 then return level end
  local d = el * rate
  if d >= level then return 0 end
  return level - d
end

local fields = {}
for i = 0, n - 1 do
  local f = ARGV[5 + i * S]
  fields[2 * i + 1] = f
  fields[2 * i + 2] = f .. ':t'
end
local stored = redis.call('HMGET', key, unpack(fields))
local out = {1, now}
local all_ok = 1
local writes = {}
local index = {}
local ttl = 1000

for i = 0, n - 1 do
  local b = 5 + i * S
  local kind = ARGV[b + 1]
  local amount = tonumber(ARGV[b + 5])
  local lv = stored[2 * i + 1]
  local st = stored[2 * i + 2]
  local has = lv and st
  local ok, reserved, remaining, reset, wait, pstart, level, at = 1, 0, 0, 0, 0, 0, 0, 0
  if kind == 'g' then
    local tick = tonumber(ARGV[b + 2])
    local per = tonumber(ARGV[b + 3])
    local rate = tonumber(ARGV[b + 4])
    local cap = tonumber(ARGV[b + 6])
    local now_t = idiv(now, tick)
    level, at = 0, now_t
    if has then level, at = tonumber(lv), tonumber(st) end
    level = drained(level, at, now_t, rate)
    if now_t > at then at = now_t end
    local function until_(l)
      local t = cdiv(l, rate)
      if t == 0 then return 0 end
      return (now_t + t) * tick - now
    end
    if op == 'adjust' then
      local units = math.abs(amount) * per
      if amount >= 0 then
        level = math.min(level + units, cap * 2)
      else
        level = math.max(level - units, 0)
      end
      remaining = idiv(math.max(cap - level, 0), per)
      reset = until_(level)
    else
      reserved = math.min(amount, idiv(cap, per))
      local units = reserved * per
      if level + units <= cap then
        level = level + units
        remaining = idiv(cap - level, per)
        reset = until_(level)
      else
        ok = 0
        reserved = 0
        remaining = idiv(math.max(cap - level, 0), per)
        reset = until_(level)
        wait = until_(level + units - cap)
      end
    end
    ttl = math.max(ttl, (at + cdiv(level, rate)) * tick - now)
  else
    local code = ARGV[b + 2]
    local budget = tonumber(ARGV[b + 3])
    local pres = tonumber(ARGV[b + 4])
    local s, e = bounds(code, now)
    local spent = 0
    if has and tonumber(st) == s then spent = tonumber(lv) end
    pstart = s
    reset = e - now
    if op == 'adjust' then
      if pres == s then
        spent = math.max(spent + amount, 0)
      elseif amount > 0 then
        spent = spent + amount
      end
      remaining = math.max(budget - spent, 0)
    else
      reserved = math.min(amount, budget)
      if spent + reserved <= budget then
        spent = spent + reserved
        remaining = budget - spent
      else
        ok = 0
        reserved = 0
        remaining = math.max(budget - spent, 0)
        wait = reset
      end
    end
    level, at = spent, s
    ttl = math.max(ttl, e - now)
    local ix = tonumber(ARGV[b + 7])
    if ix > 0 and tonumber(ARGV[b + 8]) == s then
      index[#index + 1] = {KEYS[ix], spent, e - now}
    end
  end
  if ok == 0 then all_ok = 0 end
  writes[#writes + 1] = fields[2 * i + 1]
  writes[#writes + 1] = level
  writes[#writes + 1] = fields[2 * i + 2]
  writes[#writes + 1] = at
  local o = #out
  out[o + 1] = ok
  out[o + 2] = reserved
  out[o + 3] = remaining
  out[o + 4] = reset
  out[o + 5] = wait
  out[o + 6] = pstart
  out[o + 7] = level
  out[o + 8] = at
end
out[1] = all_ok

if op == 'adjust' or (op == 'check' and all_ok == 1) then
  redis.call('HSET', key, unpack(writes))
  local cur = redis.call('PTTL', key)
  if cur > ttl then ttl = cur end
  redis.call('PEXPIRE', key, ttl + 1000)
  for _, x in ipairs(index) do
    redis.call('ZADD', x[1], x[2], member)
    redis.call('PEXPIRE', x[1], x[3] + 86400000)
  end
end
return out
"#;

/// A Redis connection for shared state.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    /// SHA1 of [`SCRIPT`] and of the lease script, for `EVALSHA`.
    sha: String,
    lease_sha: String,
    /// The script uses the caller's `now` instead of Redis `TIME` (tests).
    client_clock: bool,
    conn: ArcSwapOption<ConnectionManager>,
    connecting: AtomicBool,
    connected: watch::Sender<bool>,
}

/// One script call: keys and arguments.
pub(super) struct Call {
    pub(super) keys: Vec<String>,
    pub(super) args: Vec<String>,
}

/// Which of floodwall's Lua scripts a call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lua {
    /// [`SCRIPT`]: rate limits, token and cost budgets.
    RateLimit,
    /// `store::leases::SCRIPT`: concurrency leases of shared routes.
    Leases,
}

impl RedisStore {
    /// A store for `config`. Parses the URL only; the connection is made
    /// in the background on first use.
    pub fn new(config: &RedisConfig) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(config.url.as_str()).map_err(|e| {
            StoreError::Unavailable(format!("invalid redis URL ({})", e.kind_name()))
        })?;
        let (connected, _) = watch::channel(false);
        Ok(RedisStore {
            inner: Arc::new(Inner {
                client,
                prefix: config.key_prefix.clone(),
                timeout: config.timeout,
                sha: redis::Script::new(SCRIPT).get_hash().to_string(),
                lease_sha: redis::Script::new(super::leases::SCRIPT)
                    .get_hash()
                    .to_string(),
                client_clock: false,
                conn: ArcSwapOption::empty(),
                connecting: AtomicBool::new(false),
                connected,
            }),
        })
    }

    /// For tests: the script takes the caller's `now` instead of Redis
    /// `TIME`, so scenarios can move the clock.
    pub fn with_client_clock(config: &RedisConfig) -> Result<RedisStore, StoreError> {
        let mut store = RedisStore::new(config)?;
        if let Some(inner) = Arc::get_mut(&mut store.inner) {
            inner.client_clock = true;
        }
        Ok(store)
    }

    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    pub fn key_prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Whether a connection has been established (it may be reconnecting).
    pub fn connected(&self) -> bool {
        self.inner.conn.load().is_some()
    }

    /// A `PING` round trip, for readiness reports.
    pub async fn ping(&self) -> Result<Duration, StoreError> {
        let started = Instant::now();
        self.with_timeout(async {
            let mut conn = self.conn().await?;
            conn.send_packed_command(&redis::cmd("PING"))
                .await
                .map_err(redis_error)?;
            Ok(started.elapsed())
        })
        .await
    }

    /// One command, bounded by `limit` (the cache's reads and writes, its
    /// purges' `SCAN` and `UNLINK`, and `PUBLISH`).
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        limit: Duration,
    ) -> Result<T, StoreError> {
        let call = async {
            let mut conn = self.conn().await?;
            let v = conn.send_packed_command(cmd).await.map_err(redis_error)?;
            redis::from_redis_value(&v).map_err(|e| StoreError::Protocol(e.kind_name().into()))
        };
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(limit)),
        }
    }

    /// The client, for connections of their own (pub/sub).
    pub fn client(&self) -> &redis::Client {
        &self.inner.client
    }

    async fn with_timeout<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.inner.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(self.inner.timeout)),
        }
    }

    /// One plain command, within the timeout.
    pub(super) async fn command(&self, cmd: &redis::Cmd) -> Result<Value, StoreError> {
        self.with_timeout(async {
            let mut conn = self.conn().await?;
            match conn.send_packed_command(cmd).await.map_err(redis_error)? {
                Value::ServerError(e) => Err(StoreError::Protocol(format!(
                    "{} {}",
                    e.code(),
                    e.details().unwrap_or_default()
                ))),
                other => Ok(other),
            }
        })
        .await
    }

    /// The connection, waiting for the background connect if there is none
    /// yet (callers bound the wait with their timeout).
    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        if let Some(c) = self.inner.conn.load_full() {
            return Ok((*c).clone());
        }
        let mut ready = self.inner.connected.subscribe();
        self.start_connecting();
        ready
            .wait_for(|c| *c)
            .await
            .map_err(|_| StoreError::Unavailable("not connected".into()))?;
        self.inner
            .conn
            .load_full()
            .map(|c| (*c).clone())
            .ok_or_else(|| StoreError::Unavailable("not connected".into()))
    }

    fn start_connecting(&self) {
        if self.inner.connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut delay = RECONNECT_MIN;
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_number_of_retries(2)
                    .set_factor(50)
                    .set_max_delay(RECONNECT_MAX.as_millis() as u64);
                let attempt = tokio::time::timeout(
                    CONNECT_TIMEOUT * 3,
                    ConnectionManager::new_with_config(inner.client.clone(), config),
                )
                .await;
                if let Ok(Ok(manager)) = attempt {
                    inner.conn.store(Some(Arc::new(manager)));
                    inner.connected.send_replace(true);
                    inner.connecting.store(false, Ordering::Release);
                    return;
                }
                drop(inner);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RECONNECT_MAX);
            }
        });
    }

    /// Runs one script call per element of `calls` in one pipeline, and
    /// returns each call's answer (or its own error). `EVALSHA` first;
    /// commands answered `NOSCRIPT` are sent again with `EVAL`.
    async fn run(&self, calls: &[Call]) -> Result<Vec<Result<Vec<i64>, StoreError>>, StoreError> {
        self.run_script(Lua::RateLimit, calls).await
    }

    /// [`RedisStore::run`] for any of floodwall's scripts.
    pub(super) async fn run_script(
        &self,
        lua: Lua,
        calls: &[Call],
    ) -> Result<Vec<Result<Vec<i64>, StoreError>>, StoreError> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        self.with_timeout(async {
            let mut conn = self.conn().await?;
            let pipe = self.pipeline(lua, calls.iter().map(|c| (c, true)));
            let replies = conn
                .send_packed_commands(&pipe, 0, calls.len())
                .await
                .map_err(redis_error)?;
            let mut results: Vec<Result<Vec<i64>, StoreError>> = Vec::with_capacity(calls.len());
            let mut missing: Vec<usize> = Vec::new();
            for (i, reply) in replies.into_iter().enumerate() {
                match reply {
                    Value::ServerError(e) if e.code() == "NOSCRIPT" => {
                        missing.push(i);
                        results.push(Err(StoreError::Protocol("NOSCRIPT".into())));
                    }
                    other => results.push(ints(other)),
                }
            }
            if !missing.is_empty() {
                let pipe = self.pipeline(lua, missing.iter().map(|&i| (&calls[i], false)));
                let replies = conn
                    .send_packed_commands(&pipe, 0, missing.len())
                    .await
                    .map_err(redis_error)?;
                for (&i, reply) in missing.iter().zip(replies) {
                    results[i] = ints(reply);
                }
            }
            Ok(results)
        })
        .await
    }

    fn pipeline<'c>(
        &self,
        lua: Lua,
        calls: impl Iterator<Item = (&'c Call, bool)>,
    ) -> redis::Pipeline {
        let (text, sha) = match lua {
            Lua::RateLimit => (SCRIPT, &self.inner.sha),
            Lua::Leases => (super::leases::SCRIPT, &self.inner.lease_sha),
        };
        let mut pipe = redis::pipe();
        for (call, by_sha) in calls {
            let mut cmd = if by_sha {
                let mut c = redis::cmd("EVALSHA");
                c.arg(sha);
                c
            } else {
                let mut c = redis::cmd("EVAL");
                c.arg(text);
                c
            };
            cmd.arg(call.keys.len()).arg(&call.keys).arg(&call.args);
            pipe.add_command(cmd);
        }
        pipe
    }

    pub(super) fn now_arg(&self, now_ms: u64) -> String {
        if self.inner.client_clock {
            now_ms.to_string()
        } else {
            "0".to_string()
        }
    }

    /// Builds the call for one plan.
    fn plan_call(&self, op: &str, plan: &Plan, divisor: u64, now_ms: u64) -> Call {
        let mut keys = vec![key(
            &self.inner.prefix,
            KeySpace::RateLimit,
            &plan.rule.name,
            &plan.key,
        )];
        let mut args = vec![
            op.to_string(),
            self.now_arg(now_ms),
            plan.windows.len().to_string(),
            plan.key.clone(),
        ];
        for w in &plan.windows {
            let params = Params::of(&w.window, divisor);
            window_args(
                &mut args,
                &mut keys,
                &self.inner.prefix,
                &plan.rule.name,
                w.field,
                &params,
                w.amount as i64,
                0,
                now_ms,
                op != "peek",
            );
        }
        Call { keys, args }
    }

    /// Checks every plan (one script call each, one pipeline). Each plan is
    /// charged iff all its windows admit it; the caller refunds plans whose
    /// request another rule refused.
    pub(crate) async fn check(
        &self,
        plans: &[Plan],
        now_ms: u64,
    ) -> Result<PerRule<Result<RuleEval, StoreError>>, StoreError> {
        let calls: Vec<Call> = plans
            .iter()
            .map(|p| self.plan_call("check", p, 1, now_ms))
            .collect();
        let replies = self.run(&calls).await?;
        Ok(plans
            .iter()
            .zip(replies)
            .map(|(plan, reply)| reply.and_then(|r| rule_eval(&r, plan.windows.len(), true)))
            .collect())
    }

    /// The current state of one plan's windows (nothing is charged).
    pub(crate) async fn peek(&self, plan: &Plan, now_ms: u64) -> Result<Vec<Eval>, StoreError> {
        let calls = [self.plan_call("peek", plan, 1, now_ms)];
        let mut replies = self.run(&calls).await?;
        let reply = replies
            .pop()
            .ok_or_else(|| StoreError::Protocol("no reply".into()))??;
        rule_eval(&reply, plan.windows.len(), false).map(|e| e.windows.into_vec())
    }

    /// Applies corrections, one pipeline.
    pub(crate) async fn adjust(
        &self,
        adjustments: &[Adjustment],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let calls: Vec<Call> = adjustments
            .iter()
            .map(|a| {
                let mut keys = vec![key(
                    &self.inner.prefix,
                    KeySpace::RateLimit,
                    &a.rule,
                    &a.key,
                )];
                let mut args = vec![
                    "adjust".to_string(),
                    self.now_arg(now_ms),
                    a.windows.len().to_string(),
                    a.key.clone(),
                ];
                for w in &a.windows {
                    let params = Params::of(&w.window, 1);
                    window_args(
                        &mut args,
                        &mut keys,
                        &self.inner.prefix,
                        &a.rule,
                        w.field,
                        &params,
                        w.delta,
                        w.period_start,
                        now_ms,
                        true,
                    );
                }
                Call { keys, args }
            })
            .collect();
        for reply in self.run(&calls).await? {
            reply?;
        }
        Ok(())
    }

    /// The keys with the largest spend in budget window `field` of `rule`
    /// in the current period (by the caller's clock), largest first.
    pub(crate) async fn top(
        &self,
        rule: &str,
        field: Field,
        params: &Params,
        n: usize,
        now_ms: u64,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let Params::Calendar { period, .. } = params else {
            return Ok(Vec::new());
        };
        let (start, _) = math::period_bounds(*period, now_ms);
        let index = key(
            &self.inner.prefix,
            KeySpace::Spend,
            rule,
            &format!("{field}:{start}"),
        );
        let stop = n.max(1) as i64 - 1;
        let reply = self
            .with_timeout(async {
                let mut conn = self.conn().await?;
                conn.send_packed_command(
                    redis::cmd("ZREVRANGE")
                        .arg(&index)
                        .arg(0)
                        .arg(stop)
                        .arg("WITHSCORES"),
                )
                .await
                .map_err(redis_error)
            })
            .await?;
        let items = match reply {
            Value::Array(items) => items,
            Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
            other => {
                return Err(StoreError::Protocol(format!(
                    "ZREVRANGE answered {}",
                    describe(&other)
                )))
            }
        };
        let mut out = Vec::new();
        let mut it = items.into_iter();
        while let (Some(member), Some(score)) = (it.next(), it.next()) {
            let member: String = redis::from_redis_value(&member)
                .map_err(|e| StoreError::Protocol(e.to_string()))?;
            let score: f64 =
                redis::from_redis_value(&score).map_err(|e| StoreError::Protocol(e.to_string()))?;
            if score >= 1.0 {
                out.push((member, score as u64));
            }
        }
        // Ties in key order, as the in-memory store ranks them.
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Ok(out)
    }
}

/// Appends one window's nine script arguments (and its spend index key).
#[allow(clippy::too_many_arguments)]
fn window_args(
    args: &mut Vec<String>,
    keys: &mut Vec<String>,
    prefix: &str,
    rule: &str,
    field: Field,
    params: &Params,
    amount: i64,
    period_start: u64,
    now_ms: u64,
    with_index: bool,
) {
    args.push(field.to_string());
    match *params {
        Params::Gcra {
            tick_ms,
            per_ticks,
            rate,
            capacity,
        } => {
            args.extend([
                "g".to_string(),
                tick_ms.to_string(),
                per_ticks.to_string(),
                rate.to_string(),
                amount.to_string(),
                capacity.to_string(),
                "0".to_string(),
                "0".to_string(),
            ]);
        }
        Params::Calendar { period, budget } => {
            let (index_pos, index_period) = if with_index {
                let (start, _) = math::period_bounds(period, now_ms);
                keys.push(key(
                    prefix,
                    KeySpace::Spend,
                    rule,
                    &format!("{field}:{start}"),
                ));
                (keys.len(), start)
            } else {
                (0, 0)
            };
            args.extend([
                "c".to_string(),
                period.code().to_string(),
                budget.to_string(),
                period_start.to_string(),
                amount.to_string(),
                "0".to_string(),
                index_pos.to_string(),
                index_period.to_string(),
            ]);
        }
    }
}

fn rule_eval(reply: &[i64], windows: usize, _charging: bool) -> Result<RuleEval, StoreError> {
    if reply.len() != 2 + windows * OUT_STRIDE {
        return Err(StoreError::Protocol(format!(
            "the script answered {} values for {windows} windows",
            reply.len()
        )));
    }
    let u = |v: i64| v.max(0) as u64;
    let evals = reply[2..]
        .chunks(OUT_STRIDE)
        .map(|c| Eval {
            allowed: c[0] == 1,
            reserved: u(c[1]),
            remaining: u(c[2]),
            reset_ms: u(c[3]),
            wait_ms: u(c[4]),
            period_start: u(c[5]),
            next: State {
                level: u(c[6]),
                at: u(c[7]),
            },
        })
        .collect();
    let allowed = reply[0] == 1;
    Ok(RuleEval {
        allowed,
        charged: allowed,
        windows: evals,
    })
}

fn ints(reply: Value) -> Result<Vec<i64>, StoreError> {
    match reply {
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::Int(n) => Ok(n),
                other => Err(StoreError::Protocol(format!(
                    "expected integers, got {}",
                    describe(&other)
                ))),
            })
            .collect(),
        Value::ServerError(e) => Err(StoreError::Protocol(format!(
            "{} {}",
            e.code(),
            e.details().unwrap_or_default()
        ))),
        other => Err(StoreError::Protocol(format!(
            "expected an array, got {}",
            describe(&other)
        ))),
    }
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Int(_) => "an integer",
        Value::BulkString(_) | Value::SimpleString(_) => "a string",
        Value::Array(_) => "an array",
        Value::ServerError(_) => "an error",
        _ => "another type",
    }
}

fn redis_error(e: redis::RedisError) -> StoreError {
    if e.is_timeout() {
        return StoreError::Unavailable("timed out".into());
    }
    match e.kind() {
        ErrorKind::IoError => {
            StoreError::Unavailable(format!("connection error ({})", io_reason(&e)))
        }
        ErrorKind::BusyLoadingError => {
            StoreError::Unavailable("redis is loading its dataset".into())
        }
        ErrorKind::ReadOnly => StoreError::Unavailable("redis is read-only (a replica?)".into()),
        _ => StoreError::Protocol(e.kind_name().to_string()),
    }
}

fn io_reason(e: &redis::RedisError) -> String {
    if e.is_connection_refusal() {
        "connection refused".into()
    } else if e.is_connection_dropped() {
        "connection dropped".into()
    } else {
        "i/o".into()
    }
}

trait KindName {
    fn kind_name(&self) -> &'static str;
}

impl KindName for redis::RedisError {
    fn kind_name(&self) -> &'static str {
        match self.kind() {
            ErrorKind::ResponseError => "response error",
            ErrorKind::AuthenticationFailed => "authentication failed",
            ErrorKind::TypeError => "type error",
            ErrorKind::ExecAbortError => "exec aborted",
            ErrorKind::BusyLoadingError => "loading",
            ErrorKind::NoScriptError => "no script",
            ErrorKind::InvalidClientConfig => "invalid client config",
            ErrorKind::Moved | ErrorKind::Ask | ErrorKind::CrossSlot | ErrorKind::ClusterDown => {
                "cluster redirection (Redis Cluster needs a cluster-aware client; point floodwall at one node or a proxy)"
            }
            ErrorKind::IoError => "i/o error",
            ErrorKind::ClientError => "client error",
            ErrorKind::ExtensionError => "extension error",
            ErrorKind::ReadOnly => "read-only",
            _ => "error",
        }
    }
}
