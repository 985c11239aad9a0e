//! Pure decision logic, one folder per policy kind.
//!
//! Every policy here is a small state machine or calculator that takes the
//! clock (`now`) and any randomness as arguments and answers with a small
//! enum. None of it touches the network, spawns tasks or reads the system
//! clock, so each can be tested with injected time and seeded randomness.
//! The proxy layer (`crate::proxy`) asks these modules and acts on their
//! answers.
//!
//! - [`retry`]: which failures are retried, the back-off between attempts,
//!   server hints (`Retry-After`, `x-ratelimit-reset-*`) and the retry budget;
//! - [`breaker`]: circuit breakers per backend and per endpoint;
//! - [`identity`]: who is calling (user, tier, client IP), from headers,
//!   verified JWTs, API keys or the body;
//! - [`ratelimit`]: request, token and cost limits (GCRA and calendar
//!   budgets), in memory or shared through Redis (`crate::store`);
//! - [`concurrency`]: in-flight caps per route and per identity, the
//!   priority admission queue, and the pace of outgoing calls per backend;
//! - [`streams`]: concurrent-stream caps per instance, route and identity;
//! - [`cache`]: response-cache keys, storability, entries, the memory LRU
//!   and request collapsing.
//!
//! [`rolling`] is the lock-free, time-bucketed counter both of them use.
//!
//! Two runtimes sit beside the pure rules because they must talk to the
//! shared store: `ratelimit::Limiter` (counters in Redis) and
//! `concurrency::SharedLeases` (leases of caps held across replicas, which
//! renews them in a background task); their decisions still come from the
//! pure functions.

pub mod breaker;
pub mod cache;
pub mod concurrency;
pub mod identity;
pub mod ratelimit;
pub mod retry;
pub mod rolling;
pub mod streams;
