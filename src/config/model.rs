//! The compiled, validated policy snapshot.
//!
//! Nothing past `src/config` sees the YAML tree: the proxy, the policies and
//! the admin endpoints read only these types. A snapshot is immutable; a
//! reload builds a whole new one and swaps it in with one `ArcSwap` store
//! (see `crate::reload`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use crate::policy::breaker::BreakerConfig;
pub use crate::policy::concurrency::{CallLimits, ConcurrencyConfig, PriorityConfig, QueueConfig};
pub use crate::policy::retry::RetryPolicy;
pub use crate::policy::streams::{ServerStreamsConfig, StreamsConfig};

pub use super::limits::{LimitsConfig, RateLimitRule};

/// One compiled policy file.
#[derive(Debug)]
pub struct Snapshot {
    pub version: u32,
    pub source: SourceInfo,
    pub server: ServerConfig,
    pub store: Option<StoreConfig>,
    /// `store.cache`: the cache tiers' sizes (defaults without it).
    pub cache_store: crate::policy::cache::CacheStoreConfig,
    /// Backends in file order; routes refer to them by index.
    pub backends: Vec<Arc<Backend>>,
    /// Backend name -> index into `backends`.
    pub backend_index: HashMap<String, usize>,
    /// Routes in file order: the first match wins.
    pub routes: Vec<Arc<Route>>,
    /// `identity`, `prices` and every rate-limit rule (see `limits.rs`).
    pub limits: LimitsConfig,
}

/// Where a snapshot came from, for `/admin/status` and logs.
#[derive(Debug, Clone)]
pub struct SourceInfo {
    /// The file path as given (or a label such as `<demo>`).
    pub path: PathBuf,
    /// Hex SHA-256 of the file's bytes.
    pub hash: String,
    pub loaded_at: SystemTime,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Proxy listener addresses, e.g. `0.0.0.0:8080`. A port of 0 picks a free port.
    pub listen: Vec<String>,
    pub admin: AdminConfig,
    /// Worker threads; `None` = number of cores.
    pub threads: Option<usize>,
    /// How long in-flight requests may run after SIGTERM (default 30s).
    pub grace_period: Duration,
    /// Maximum downstream connections; `None` = derived from the open-files limit.
    pub max_connections: Option<usize>,
    /// The largest request header accepted, in bytes (default 64 KiB).
    pub max_request_header_size: usize,
    /// How long a client may take to send a request header (default 10s).
    pub request_header_timeout: Duration,
    /// Peers whose `X-Forwarded-For` and identity headers are believed (default: loopback).
    pub trusted_proxies: Vec<Cidr>,
    pub cors: Option<CorsConfig>,
    /// `server.streams`: the instance-wide stream cap (see `admission.rs`).
    pub streams: ServerStreamsConfig,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Default `127.0.0.1:9090`.
    pub listen: String,
    /// Name of the environment variable holding the bearer token, if any.
    pub token_env: Option<String>,
    /// The token itself, read from `token_env` when the file was compiled.
    /// `None`: `/admin/*` is open (only sensible on loopback).
    pub token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CorsConfig {
    /// Exact origins, or `*`.
    pub allow_origins: Vec<String>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub allow_credentials: bool,
    pub max_age: Duration,
}

/// An IPv4 or IPv6 network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` lies inside this network. IPv4-mapped IPv6 addresses
    /// (`::ffff:a.b.c.d`) are compared as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let bits = u32::from(self.prefix.min(32));
                let mask = if bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - bits)
                };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let bits = u32::from(self.prefix.min(128));
                let mask = if bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub redis: RedisConfig,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// Resolved URL (from `url` or `url_env`).
    pub url: String,
    /// Default `floodwall`.
    pub key_prefix: String,
    /// Default 50ms.
    pub timeout: Duration,
    /// Default 1.
    pub expected_replicas: u32,
}

#[derive(Debug)]
pub struct Backend {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    /// Host header and SNI override.
    pub host: Option<String>,
    pub tls: TlsConfig,
    pub timeouts: BackendTimeouts,
    /// `circuit_breaker`; `None` = no breaker.
    pub circuit_breaker: Option<Arc<BreakerConfig>>,
    /// `limits`: outgoing-call limits; `None` = unlimited.
    pub limits: Option<Arc<CallLimits>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub scheme: Scheme,
    /// Host name or IP literal, without brackets.
    pub host: String,
    pub port: u16,
    /// `host:port` (IPv6 in brackets), ready for a connector.
    pub address: String,
    /// The endpoint as written, for logs and status.
    pub url: String,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Extra CA bundle (PEM); `None` = system roots.
    pub ca_file: Option<PathBuf>,
    /// Default true.
    pub verify: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct BackendTimeouts {
    /// Default 5s.
    pub connect: Duration,
    /// Default 60s.
    pub response_headers: Duration,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub matcher: RouteMatch,
    pub rewrite: Option<Rewrite>,
    pub websocket: bool,
    /// Index into `Snapshot::backends`.
    pub backend: usize,
    pub backend_name: String,
    pub request: RequestPolicy,
    /// Per-route overrides of the backend's timeouts.
    pub timeouts: RouteTimeouts,
    /// `retry`; a single attempt when the section is absent.
    pub retry: Arc<RetryPolicy>,
    /// `fallback`: tried in order once the primary is given up on.
    pub fallback: Vec<FallbackTarget>,
    /// `fallback_on`: when `fallback` is used.
    pub fallback_on: FallbackOn,
    /// The route's own `rate_limits` (top-level rules that apply are in
    /// `Snapshot::limits.rules_for`).
    pub rate_limits: Vec<Arc<RateLimitRule>>,
    /// `concurrency`: in-flight caps and the admission queue.
    pub concurrency: Option<Arc<ConcurrencyConfig>>,
    /// `streams`: stream caps and `max_duration`.
    pub streams: Option<Arc<StreamsConfig>>,
    /// `cache`: the response cache.
    pub cache: Option<Arc<crate::policy::cache::CachePolicy>>,
}

#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// Empty = any method.
    pub methods: Vec<http::Method>,
    /// Lower-case host without port; `None` = any.
    pub host: Option<String>,
    /// Header name (lower-case) and exact value; all must match.
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

#[derive(Debug, Clone)]
pub struct Rewrite {
    pub strip_prefix: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonMode {
    /// Parse the body as JSON when its Content-Type says JSON (default).
    Auto,
    /// The body must be JSON, whatever the Content-Type says.
    Required,
    /// Never parse the body.
    Off,
}

#[derive(Debug, Clone)]
pub struct RequestPolicy {
    /// Default 1 MiB. Larger bodies get 413.
    pub max_body: usize,
    pub json: JsonMode,
    pub max_messages: Option<usize>,
    pub max_prompt_chars: Option<usize>,
    pub fields: Vec<FieldCheck>,
}

#[derive(Debug, Clone)]
pub struct FieldCheck {
    /// Dotted path as written, e.g. `metadata.sessionId`.
    pub path: String,
    /// The same path split on dots.
    pub segments: Vec<String>,
    pub required: bool,
    pub min_chars: Option<usize>,
    pub max_chars: Option<usize>,
    /// Limit on the field's string length in bytes (e.g. base64 images).
    pub max_bytes: Option<usize>,
    pub format: Option<FieldFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldFormat {
    Uuid,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RouteTimeouts {
    pub connect: Option<Duration>,
    pub response_headers: Option<Duration>,
    /// Deadline for an answer: every attempt, back-off and fallback.
    pub total: Option<Duration>,
    /// Until the first SSE data event, per attempt.
    pub first_token: Option<Duration>,
    /// Longest gap between chunks of a response body.
    pub idle: Option<Duration>,
    /// Hold the response header until the first SSE data event, so a
    /// retry or fallback stays invisible to the client until then. Default:
    /// true when `first_token` is set (it requires `first_token`).
    pub hold_for_first_token: bool,
}

/// One entry of `routes[].fallback`.
#[derive(Debug, Clone, PartialEq)]
pub enum FallbackTarget {
    /// Another backend (index into `Snapshot::backends`), optionally with
    /// the request body's `model` rewritten.
    Backend {
        backend: usize,
        name: String,
        model: Option<String>,
    },
    /// An expired cache entry within the route's `cache.stale_if_error`,
    /// if there is one (`x-cache: STALE`).
    StaleCache,
    /// A static answer.
    Respond {
        status: u16,
        body: serde_json::Value,
    },
}

/// `routes[].fallback_on`: the conditions that send a request to the
/// fallback targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackOn {
    /// The primary backend's breaker (or every endpoint's) is open.
    pub circuit_open: bool,
    /// Retries ended on a retryable failure (attempts, budget, deadline or
    /// a `Retry-After` above `max_retry_after`), never on a non-retryable 4xx.
    pub retries_exhausted: bool,
}

impl Default for FallbackOn {
    fn default() -> Self {
        FallbackOn {
            circuit_open: true,
            retries_exhausted: true,
        }
    }
}

impl Snapshot {
    pub fn backend(&self, route: &Route) -> &Arc<Backend> {
        &self.backends[route.backend]
    }
}
