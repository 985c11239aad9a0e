//! Turns the positioned YAML tree into a validated [`Snapshot`].
//!
//! One function per section of the file, each reading its mapping through
//! `decode.rs` and checking every value against the contract in
//! `docs/policy.md`. The functions never stop at the first problem: an
//! invalid value is reported and replaced by its default so the walk can go
//! on and find the next one, and the snapshot is built only if no error was
//! recorded at all. Cross-references (a route's `backend`) are checked
//! against every backend *name* in the file, valid or not, so one broken
//! backend does not also break every route that uses it.
//!
//! Fields that the schema defines but floodwall does not implement yet are
//! listed once, in [`NOT_SUPPORTED_YET`]; the decoder rejects them with
//! "not supported yet (planned)" instead of ignoring them, so an operator
//! is never led to believe a limit is enforced when it is not. Delete an
//! entry from the table when its feature lands.
//!
//! Environment variables named by `*_env` fields are read here, at compile
//! time, through an injected lookup so tests need not touch the process
//! environment. A reload therefore re-reads them.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::decode::{hint, list_names, Ctx, Map, PlannedTable, Value};
use super::model::*;
use super::net;
use super::yaml::Node;

/// Looks up an environment variable; `None` when unset.
pub type Env<'e> = &'e dyn Fn(&str) -> Option<String>;

/// Schema fields that are planned but not implemented, as (schema path of
/// the enclosing mapping, field). `backends.*` is any backend, `routes[]`
/// any route.
pub const NOT_SUPPORTED_YET: PlannedTable = &[
    ("routes[].cache", "stale_while_revalidate"),
    ("routes[].cache", "convert"),
];

const ROOT_FIELDS: &[&str] = &[
    "version",
    "server",
    "store",
    "identity",
    "prices",
    "rate_limits",
    "backends",
    "routes",
];
const SERVER_FIELDS: &[&str] = &[
    "listen",
    "admin",
    "threads",
    "grace_period",
    "max_connections",
    "max_request_header_size",
    "request_header_timeout",
    "trusted_proxies",
    "cors",
    "streams",
];
const ADMIN_FIELDS: &[&str] = &["listen", "token_env"];
const CORS_FIELDS: &[&str] = &[
    "allow_origins",
    "allow_methods",
    "allow_headers",
    "expose_headers",
    "allow_credentials",
    "max_age",
];
const STORE_FIELDS: &[&str] = &["redis", "cache"];
const REDIS_FIELDS: &[&str] = &[
    "url",
    "url_env",
    "key_prefix",
    "timeout",
    "expected_replicas",
];
const BACKEND_FIELDS: &[&str] = &[
    "endpoints",
    "host",
    "tls",
    "timeouts",
    "circuit_breaker",
    "limits",
];
const TLS_FIELDS: &[&str] = &["ca_file", "verify"];
const TIMEOUT_FIELDS: &[&str] = &["connect", "response_headers"];
const ROUTE_FIELDS: &[&str] = &[
    "name",
    "match",
    "rewrite",
    "websocket",
    "backend",
    "request",
    "timeouts",
    "retry",
    "fallback",
    "fallback_on",
    "rate_limits",
    "concurrency",
    "streams",
    "cache",
];
const MATCH_FIELDS: &[&str] = &["path", "path_prefix", "methods", "host", "header"];
const REWRITE_FIELDS: &[&str] = &["strip_prefix"];
const REQUEST_FIELDS: &[&str] = &[
    "max_body",
    "json",
    "max_messages",
    "max_prompt_chars",
    "fields",
];
const FIELD_CHECK_FIELDS: &[&str] = &[
    "path",
    "required",
    "min_chars",
    "max_chars",
    "max_bytes",
    "format",
];

// Defaults and ranges, shared with docs/policy.md.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);
/// `server.max_request_header_size`: Envoy's default is 60 KiB, nginx's
/// 32 KiB; room for large JWTs and cookies, far below Pingora's 1 MiB.
pub const DEFAULT_MAX_REQUEST_HEADER_SIZE: usize = 64 * 1024;
/// `server.request_header_timeout`, as Go servers commonly set it.
pub const DEFAULT_REQUEST_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CORS_METHODS: &[&str] = &["GET", "POST", "OPTIONS"];
pub const DEFAULT_CORS_ALLOW_HEADERS: &[&str] = &["authorization", "content-type", "x-request-id"];
pub const DEFAULT_CORS_EXPOSE_HEADERS: &[&str] = &[
    "retry-after",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "x-floodwall-reason",
    "x-request-id",
];
pub const DEFAULT_CORS_MAX_AGE: Duration = Duration::from_secs(600);
pub const DEFAULT_KEY_PREFIX: &str = "floodwall";
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_RESPONSE_HEADERS_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

const MS: Duration = Duration::from_millis(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);
const GIB: u64 = 1 << 30;

const HTTP_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

/// Compiles a parsed document. Returns `None` when any error was recorded
/// in `ctx` (including errors recorded before the call).
pub fn compile(root: &Node, ctx: &Ctx, env: Env<'_>, source: SourceInfo) -> Option<Snapshot> {
    if root.is_null() {
        ctx.error(
            1,
            1,
            "",
            "the file is empty; a policy starts with `version: 1`",
        );
        return None;
    }
    let root = ctx.root(root);
    let mut top = root.map(ROOT_FIELDS)?;

    let version = match top.require("version") {
        Some(v) => match v.int() {
            Some(1) => 1,
            Some(n) => {
                v.error(format!(
                    "unsupported policy version {n}; this floodwall reads version 1"
                ));
                1
            }
            None => 1,
        },
        None => 1,
    };
    let server = match top.get("server") {
        Some(v) => server(&v, env),
        None => default_server(),
    };
    // Whether a `store.redis` section is written (valid or not, so that a
    // broken one is not reported a second time by the features needing it).
    let mut has_redis = false;
    let (store, cache_store) = match top.get("store") {
        Some(v) => {
            has_redis = matches!(&v.node().kind, super::yaml::NodeKind::Map(entries)
                if entries.iter().any(|(k, _)| k.name == "redis"));
            store(&v, env)
        }
        None => (None, Default::default()),
    };

    let backend_entries = top
        .require("backends")
        .map(|v| backends(&v))
        .unwrap_or_default();
    let backend_names: Vec<String> = backend_entries
        .iter()
        .map(|(name, _)| name.clone())
        .collect();
    let routes = top
        .require("routes")
        .map(|v| routes(&v, &backend_names, has_redis))
        .unwrap_or_default();
    let limits = super::limits::compile(&mut top, env, &routes);
    drop(top);

    if ctx.has_errors() {
        return None;
    }
    let mut backends = Vec::with_capacity(backend_entries.len());
    let mut backend_index = HashMap::new();
    for (i, (name, backend)) in backend_entries.into_iter().enumerate() {
        backend_index.insert(name, i);
        backends.push(Arc::new(backend));
    }
    let routes = routes.into_iter().map(Arc::new).collect();
    Some(Snapshot {
        version,
        source,
        server,
        store,
        cache_store,
        backends,
        backend_index,
        routes,
        limits,
    })
}

// ---------------------------------------------------------------- server

fn default_trusted_proxies() -> Vec<Cidr> {
    vec![
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
            prefix: 8,
        },
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
            prefix: 128,
        },
    ]
}

fn default_admin() -> AdminConfig {
    AdminConfig {
        listen: DEFAULT_ADMIN_LISTEN.to_string(),
        token_env: None,
        token: None,
    }
}

fn default_server() -> ServerConfig {
    ServerConfig {
        listen: vec![DEFAULT_LISTEN.to_string()],
        admin: default_admin(),
        threads: None,
        grace_period: DEFAULT_GRACE_PERIOD,
        max_connections: None,
        max_request_header_size: DEFAULT_MAX_REQUEST_HEADER_SIZE,
        request_header_timeout: DEFAULT_REQUEST_HEADER_TIMEOUT,
        trusted_proxies: default_trusted_proxies(),
        cors: None,
        streams: Default::default(),
    }
}

fn server(v: &Value<'_>, env: Env<'_>) -> ServerConfig {
    let mut config = default_server();
    let Some(mut m) = v.map(SERVER_FIELDS) else {
        return config;
    };

    if let Some(list) = m.get("listen") {
        if let Some(items) = list.list_or_one() {
            if items.is_empty() {
                list.error("must list at least one `host:port` address");
            }
            let mut listen: Vec<String> = Vec::new();
            for item in items {
                let Some(addr) = item.parse_with("`host:port`", |s| {
                    net::check_listen(s).map(|()| s.to_string())
                }) else {
                    continue;
                };
                if listen.contains(&addr) {
                    item.error(format!("`{addr}` is listed twice"));
                    continue;
                }
                listen.push(addr);
            }
            if !listen.is_empty() {
                config.listen = listen;
            }
        }
    }
    if let Some(admin_value) = m.get("admin") {
        config.admin = admin(&admin_value, &config.listen, env);
    }
    config.threads = m.usize_in("threads", 1..=1024);
    config.grace_period = m
        .duration_in("grace_period", Duration::ZERO..=HOUR)
        .unwrap_or(DEFAULT_GRACE_PERIOD);
    config.max_connections = m.usize_in("max_connections", 1..=10_000_000);
    if let Some(size) = m.size_in("max_request_header_size", 1024..=1024 * 1024) {
        config.max_request_header_size = size as usize;
    }
    if let Some(t) = m.duration_in(
        "request_header_timeout",
        Duration::from_millis(100)..=Duration::from_secs(300),
    ) {
        config.request_header_timeout = t;
    }
    if let Some(list) = m.get("trusted_proxies") {
        if let Some(items) = list.list_or_one() {
            config.trusted_proxies = items
                .iter()
                .filter_map(|item| item.parse_with("an IP address or CIDR block", net::parse_cidr))
                .collect();
        }
    }
    config.cors = m.get("cors").map(|v| cors(&v));
    config.streams = m
        .get("streams")
        .map(|v| super::admission::server_streams(&v))
        .unwrap_or_default();
    config
}

fn admin(v: &Value<'_>, proxy_listen: &[String], env: Env<'_>) -> AdminConfig {
    let mut config = default_admin();
    let Some(mut m) = v.map(ADMIN_FIELDS) else {
        return config;
    };
    if let Some(listen) = m.get("listen") {
        if let Some(addr) = listen.parse_with("`host:port`", |s| {
            net::check_listen(s).map(|()| s.to_string())
        }) {
            // Port 0 means "pick a free port" for each listener, so it never clashes.
            if !addr.ends_with(":0") && proxy_listen.contains(&addr) {
                listen.error(format!(
                    "`{addr}` is also a proxy listener (server.listen); use another port"
                ));
            }
            config.listen = addr;
        }
    }
    if let Some(name_value) = m.get("token_env") {
        if let Some(name) = env_var_name(&name_value) {
            match env(&name).filter(|t| !t.trim().is_empty()) {
                Some(token) => config.token = Some(token),
                None => name_value.error(format!(
                    "environment variable `{name}` is not set or is empty (set it, or remove `token_env` to leave /admin/* without a token)"
                )),
            }
            config.token_env = Some(name);
        }
    }
    config
}

fn cors(v: &Value<'_>) -> CorsConfig {
    let mut config = CorsConfig {
        allow_origins: Vec::new(),
        allow_methods: DEFAULT_CORS_METHODS.iter().map(|s| s.to_string()).collect(),
        allow_headers: DEFAULT_CORS_ALLOW_HEADERS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        expose_headers: DEFAULT_CORS_EXPOSE_HEADERS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        allow_credentials: false,
        max_age: DEFAULT_CORS_MAX_AGE,
    };
    let Some(mut m) = v.map(CORS_FIELDS) else {
        return config;
    };

    if let Some(list) = m.require("allow_origins") {
        if let Some(items) = list.list_or_one() {
            config.allow_origins = items
                .iter()
                .filter_map(|item| item.parse_with("an origin", net::parse_origin))
                .collect();
            if items.is_empty() {
                list.error("must list at least one origin (or `*`)");
            }
        }
    }
    if let Some(list) = m.get("allow_methods") {
        if let Some(items) = list.list_or_one() {
            config.allow_methods = items
                .iter()
                .filter_map(method)
                .map(|m| m.to_string())
                .collect();
        }
    }
    if let Some(list) = m.get("allow_headers") {
        config.allow_headers = header_list(&list);
    }
    if let Some(list) = m.get("expose_headers") {
        config.expose_headers = header_list(&list);
    }
    if let Some(flag) = m.get("allow_credentials") {
        config.allow_credentials = flag.bool().unwrap_or(false);
        if config.allow_credentials && config.allow_origins.iter().any(|o| o == "*") {
            flag.error(
                "cannot be true while allow_origins contains `*` (browsers reject credentialed responses \
                 to a wildcard origin); list the origins instead",
            );
        }
    }
    config.max_age = m
        .duration_in("max_age", Duration::ZERO..=DAY)
        .unwrap_or(DEFAULT_CORS_MAX_AGE);
    config
}

/// A list of header names (lower-cased), or `*`.
fn header_list(list: &Value<'_>) -> Vec<String> {
    let Some(items) = list.list_or_one() else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let name = item.str()?;
            if name == "*" {
                return Some(name.to_string());
            }
            header_name(item)
        })
        .collect()
}

// ---------------------------------------------------------------- store

/// `store`: Redis (optional) and the cache tiers' settings.
fn store(
    v: &Value<'_>,
    env: Env<'_>,
) -> (Option<StoreConfig>, crate::policy::cache::CacheStoreConfig) {
    let Some(mut m) = v.map(STORE_FIELDS) else {
        return (None, Default::default());
    };
    let cache = match m.get("cache") {
        Some(c) => c
            .map(super::cache::STORE_CACHE_FIELDS)
            .map(|mut cm| super::cache::store_cache(&mut cm))
            .unwrap_or_default(),
        None => Default::default(),
    };
    if !m.has("cache") && !m.has("redis") && !m.misspelled(&["redis", "cache"]) {
        v.error(
            "set `redis` (shared state) or `cache` (cache sizes); omit `store` for in-memory state",
        );
    }
    let redis = m.get("redis").and_then(|r| redis(&r, env));
    (redis, cache)
}

fn redis(redis_value: &Value<'_>, env: Env<'_>) -> Option<StoreConfig> {
    let mut r = redis_value.map(REDIS_FIELDS)?;

    let url = redis_url(redis_value, r.get("url"), r.get("url_env"), env);
    let key_prefix = match r.get("key_prefix") {
        Some(p) => p
            .parse_with("a key prefix", |s| {
                let ok = !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
                if ok {
                    Ok(s.to_string())
                } else {
                    Err(format!(
                        "`{s}` is not a valid key prefix (use letters, digits, `_`, `-`, `.`, `:`)"
                    ))
                }
            })
            .unwrap_or_default(),
        None => DEFAULT_KEY_PREFIX.to_string(),
    };
    let timeout = r
        .duration_in("timeout", MS..=Duration::from_secs(10))
        .unwrap_or(DEFAULT_REDIS_TIMEOUT);
    let expected_replicas = r
        .u64_in("expected_replicas", 1..=1000)
        .map_or(1, |n| n as u32);
    Some(StoreConfig {
        redis: RedisConfig {
            url: url?,
            key_prefix,
            timeout,
            expected_replicas,
        },
    })
}

/// The Redis URL from exactly one of `url` and `url_env`. Its text may hold
/// a password, so no message ever echoes it.
fn redis_url(
    redis: &Value<'_>,
    url: Option<Value<'_>>,
    url_env: Option<Value<'_>>,
    env: Env<'_>,
) -> Option<String> {
    match (url, url_env) {
        (Some(_), Some(url_env)) => {
            url_env.error("set either `url` or `url_env`, not both");
            None
        }
        (None, None) => {
            redis.error("set `url` (e.g. redis://127.0.0.1:6379/0) or `url_env` (the name of a variable holding it)");
            None
        }
        (Some(url), None) => {
            let text = url.str()?;
            if is_redis_url(text) {
                Some(text.to_string())
            } else {
                url.error("must start with redis:// or rediss:// and name a host");
                None
            }
        }
        (None, Some(url_env)) => {
            let name = env_var_name(&url_env)?;
            match env(&name).filter(|u| !u.trim().is_empty()) {
                None => {
                    url_env.error(format!(
                        "environment variable `{name}` is not set or is empty"
                    ));
                    None
                }
                Some(value) if !is_redis_url(&value) => {
                    url_env.error(format!("the value of `{name}` must start with redis:// or rediss:// and name a host"));
                    None
                }
                Some(value) => Some(value),
            }
        }
    }
}

fn is_redis_url(text: &str) -> bool {
    ["redis://", "rediss://"].iter().any(|scheme| {
        text.strip_prefix(scheme)
            .is_some_and(|rest| !rest.trim().is_empty())
    })
}

/// Reads a `*_env` field: the name of an environment variable.
pub(super) fn env_var_name(v: &Value<'_>) -> Option<String> {
    v.parse_with("an environment variable name", |s| {
        let ok = s
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if ok {
            Ok(s.to_string())
        } else {
            Err(format!(
                "`{s}` is not a valid environment variable name (letters, digits and `_`)"
            ))
        }
    })
}

// ---------------------------------------------------------------- backends

pub(super) fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Every backend in file order, with its name, whether or not its body was
/// valid (errors are in the context).
fn backends(v: &Value<'_>) -> Vec<(String, Backend)> {
    let Some(entries) = v.entries() else {
        return Vec::new();
    };
    if entries.is_empty() {
        v.error("define at least one backend");
    }
    entries
        .into_iter()
        .map(|(key, value)| {
            if !is_name(&key.name) {
                value.ctx().error(
                    key.line,
                    key.col,
                    value.path(),
                    format!(
                        "backend name `{}` must use only a-z, 0-9, `_` and `-`",
                        key.name
                    ),
                );
            }
            (key.name.clone(), backend(&key.name, &value))
        })
        .collect()
}

fn backend(name: &str, v: &Value<'_>) -> Backend {
    let mut backend = Backend {
        name: name.to_string(),
        endpoints: Vec::new(),
        host: None,
        tls: TlsConfig {
            ca_file: None,
            verify: true,
        },
        timeouts: BackendTimeouts {
            connect: DEFAULT_CONNECT_TIMEOUT,
            response_headers: DEFAULT_RESPONSE_HEADERS_TIMEOUT,
        },
        circuit_breaker: None,
        limits: None,
    };
    let Some(mut m) = v.map(BACKEND_FIELDS) else {
        return backend;
    };

    if let Some(list) = m.require("endpoints") {
        if let Some(items) = list.list_or_one() {
            if items.is_empty() {
                list.error("must list at least one endpoint URL");
            }
            backend.endpoints = items
                .iter()
                .filter_map(|item| item.parse_with("an endpoint URL", net::parse_endpoint))
                .collect();
        }
    }
    backend.host = m.get("host").and_then(|h| {
        h.parse_with("a host name", |s| {
            net::check_hostname(s).map(|()| s.to_string()).map_err(|why| {
                format!("{why}; `host` is a bare host name for the Host header and SNI (no scheme or port)")
            })
        })
    });
    if let Some(tls) = m.get("tls") {
        if let Some(mut t) = tls.map(TLS_FIELDS) {
            backend.tls.ca_file = t
                .get("ca_file")
                .and_then(|f| f.parse_with("a file path", check_readable_file));
            backend.tls.verify = t.bool("verify").unwrap_or(true);
        }
    }
    if let Some(timeouts) = m.get("timeouts") {
        if let Some(mut t) = timeouts.map(TIMEOUT_FIELDS) {
            backend.timeouts.connect = t
                .duration_in("connect", MS..=10 * MINUTE)
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
            backend.timeouts.response_headers = t
                .duration_in("response_headers", MS..=DAY)
                .unwrap_or(DEFAULT_RESPONSE_HEADERS_TIMEOUT);
        }
    }
    backend.circuit_breaker = m
        .get("circuit_breaker")
        .map(|v| Arc::new(super::resilience::circuit_breaker(&v)));
    backend.limits = m
        .get("limits")
        .map(|v| Arc::new(super::admission::backend_limits(&v)));
    backend
}

/// A file that exists and can be opened for reading (relative paths are
/// relative to floodwall's working directory).
pub(super) fn check_readable_file(path: &str) -> Result<PathBuf, String> {
    if path.trim().is_empty() {
        return Err("must not be empty".to_string());
    }
    let p = PathBuf::from(path);
    match std::fs::metadata(&p) {
        Ok(meta) if meta.is_dir() => {
            return Err(format!("`{path}` is a directory, not a PEM file"))
        }
        Ok(_) => {}
        Err(e) => return Err(format!("cannot read `{path}`: {e}")),
    }
    std::fs::File::open(&p).map_err(|e| format!("cannot read `{path}`: {e}"))?;
    Ok(p)
}

// ---------------------------------------------------------------- routes

fn routes(v: &Value<'_>, backend_names: &[String], has_redis: bool) -> Vec<Route> {
    let Some(items) = v.list() else {
        return Vec::new();
    };
    if items.is_empty() {
        v.error("define at least one route");
    }
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Some(mut m) = item.map(ROUTE_FIELDS) else {
            continue;
        };
        let name = m.require("name").and_then(|n| {
            let name = n.str()?;
            if !is_name(name) {
                n.error(format!(
                    "route name `{name}` must use only a-z, 0-9, `_` and `-`"
                ));
            } else if let Some((_, other)) = seen.iter().find(|(s, _)| s == name) {
                n.error(format!("duplicate route name `{name}` (also {other})"));
            } else {
                seen.push((name.to_string(), item.path().to_string()));
            }
            Some(name.to_string())
        });
        out.push(route(
            &mut m,
            name.unwrap_or_default(),
            backend_names,
            has_redis,
        ));
    }
    out
}

fn route(m: &mut Map<'_>, name: String, backend_names: &[String], has_redis: bool) -> Route {
    let (matcher, path_valid) = match m.require("match") {
        Some(v) => route_match(&v),
        None => (match_everything(), false),
    };
    let rewrite = m
        .get("rewrite")
        .and_then(|v| rewrite(&v, path_valid.then_some(&matcher.path)));
    let websocket = m.bool("websocket").unwrap_or(false);
    let (backend, backend_name) = match m.require("backend") {
        Some(v) => backend_ref(&v, backend_names),
        None => (0, String::new()),
    };
    let request = match m.get("request") {
        Some(v) => request(&v),
        None => default_request(),
    };
    let timeouts = m
        .get("timeouts")
        .map(|v| super::resilience::route_timeouts(&v))
        .unwrap_or_default();
    let retry = m
        .get("retry")
        .map_or_else(RetryPolicy::single_attempt, |v| {
            super::resilience::retry(&v)
        });
    let cache_value = m.get("cache");
    let cache = cache_value
        .as_ref()
        .map(|v| super::cache::route_cache(v, has_redis));
    if let (Some(v), true) = (&cache_value, websocket) {
        v.error("a `websocket: true` route cannot be cached; remove `cache` or `websocket`");
    }
    let stale_ok = cache.as_ref().is_some_and(|c| c.stale_if_error.is_some());
    let fallback_value = m.get("fallback");
    let fallback = fallback_value
        .as_ref()
        .map(|v| super::resilience::fallback(v, &backend_name, backend_names, stale_ok))
        .unwrap_or_default();
    let fallback_on = super::resilience::fallback_on(m.get("fallback_on"), fallback_value.as_ref());
    Route {
        name,
        matcher,
        rewrite,
        websocket,
        backend,
        backend_name,
        request,
        timeouts,
        retry: Arc::new(retry),
        fallback,
        fallback_on,
        rate_limits: m
            .get("rate_limits")
            .map(|v| super::limits::route_rules(&v))
            .unwrap_or_default(),
        concurrency: m
            .get("concurrency")
            .map(|v| Arc::new(super::admission::concurrency(&v, has_redis))),
        streams: m
            .get("streams")
            .map(|v| Arc::new(super::admission::streams(&v))),
        cache: cache.map(Arc::new),
    }
}

pub(super) fn backend_ref(v: &Value<'_>, backend_names: &[String]) -> (usize, String) {
    let Some(name) = v.str() else {
        return (0, String::new());
    };
    if let Some(i) = backend_names.iter().position(|b| b == name) {
        return (i, name.to_string());
    }
    let names: Vec<&str> = backend_names.iter().map(String::as_str).collect();
    if names.is_empty() {
        v.error(format!("unknown backend `{name}`; no backends are defined"));
    } else {
        v.error(format!(
            "unknown backend `{name}`; defined backends: {}{}",
            list_names(&names),
            hint(name, &names)
        ));
    }
    (0, name.to_string())
}

/// A path for matching: starts with `/`, no spaces, query or fragment.
fn url_path(v: &Value<'_>, what: &str) -> Option<String> {
    v.parse_with("a path", |s| {
        if !s.starts_with('/') {
            Err(format!("{what} must start with `/` (was `{s}`)"))
        } else if s.contains(|c: char| c.is_whitespace() || c == '?' || c == '#') {
            Err(format!(
                "{what} must not contain spaces, `?` or `#` (was `{s}`)"
            ))
        } else {
            Ok(s.to_string())
        }
    })
}

fn match_everything() -> RouteMatch {
    RouteMatch {
        path: PathMatch::Prefix("/".into()),
        methods: Vec::new(),
        host: None,
        headers: Vec::new(),
    }
}

/// The route's matcher, and whether its path was valid (so that checks
/// depending on it do not report a second error).
fn route_match(v: &Value<'_>) -> (RouteMatch, bool) {
    let mut matcher = match_everything();
    let mut path_valid = false;
    let Some(mut m) = v.map(MATCH_FIELDS) else {
        return (matcher, false);
    };
    match (m.get("path"), m.get("path_prefix")) {
        (Some(_), Some(prefix)) => prefix.error("set `path` (exact) or `path_prefix`, not both"),
        (None, None) if m.misspelled(&["path", "path_prefix"]) => {}
        (None, None) => v.error(
            "set `path` (exact match) or `path_prefix` (use `path_prefix: /` to match everything)",
        ),
        (Some(path), None) => {
            if let Some(p) = url_path(&path, "a path") {
                matcher.path = PathMatch::Exact(p);
                path_valid = true;
            }
        }
        (None, Some(prefix)) => {
            if let Some(p) = url_path(&prefix, "a path prefix") {
                matcher.path = PathMatch::Prefix(p);
                path_valid = true;
            }
        }
    }
    if let Some(list) = m.get("methods") {
        if let Some(items) = list.list_or_one() {
            if items.is_empty() {
                list.error("must not be empty (leave `methods` out to match any method)");
            }
            for method in items.iter().filter_map(method) {
                if !matcher.methods.contains(&method) {
                    matcher.methods.push(method);
                }
            }
        }
    }
    matcher.host = m.get("host").and_then(|h| {
        h.parse_with("a host name", |s| {
            let host = s.to_ascii_lowercase();
            net::check_hostname(&host).map(|()| host).map_err(|why| {
                format!("{why}; write the bare host, without scheme or port (e.g. api.example.com)")
            })
        })
    });
    if let Some(headers) = m.get("header") {
        for (key, value) in headers.entries().unwrap_or_default() {
            let name = key.name.to_ascii_lowercase();
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                let message = format!("`{}` is not a valid header name", key.name);
                value.ctx().error(key.line, key.col, value.path(), message);
                continue;
            }
            let Some(text) = value.str() else { continue };
            if http::HeaderValue::from_str(text).is_err() {
                value.error("is not a valid header value (control characters are not allowed)");
                continue;
            }
            matcher.headers.push((name, text.to_string()));
        }
    }
    (matcher, path_valid)
}

fn method(v: &Value<'_>) -> Option<http::Method> {
    let text = v.str()?;
    let upper = text.to_ascii_uppercase();
    if !HTTP_METHODS.contains(&upper.as_str()) {
        v.error(format!(
            "`{text}` is not an HTTP method; expected one of {}{}",
            list_names(HTTP_METHODS),
            hint(&upper, HTTP_METHODS)
        ));
        return None;
    }
    match http::Method::from_bytes(upper.as_bytes()) {
        Ok(m) => Some(m),
        Err(_) => {
            v.error(format!("`{text}` is not an HTTP method"));
            None
        }
    }
}

pub(super) fn header_name(v: &Value<'_>) -> Option<String> {
    let text = v.str()?;
    let name = text.to_ascii_lowercase();
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        v.error(format!("`{text}` is not a valid header name"));
        return None;
    }
    Some(name)
}

/// `path` is the route's path match, or `None` when it was invalid.
fn rewrite(v: &Value<'_>, path: Option<&PathMatch>) -> Option<Rewrite> {
    let mut m = v.map(REWRITE_FIELDS)?;
    let strip = m.get("strip_prefix")?;
    let prefix = url_path(&strip, "strip_prefix")?;
    if prefix == "/" || prefix.ends_with('/') {
        let trimmed = prefix.trim_end_matches('/');
        strip.error(format!(
            "must not end with `/` (the rest of the path keeps its leading slash){}",
            if trimmed.is_empty() {
                String::new()
            } else {
                format!("; write `{trimmed}`")
            }
        ));
        return None;
    }
    let (kind, route_path) = match path {
        Some(PathMatch::Exact(p)) => ("path", p),
        Some(PathMatch::Prefix(p)) => ("path_prefix", p),
        None => {
            return Some(Rewrite {
                strip_prefix: Some(prefix),
            })
        }
    };
    let aligned = route_path
        .strip_prefix(prefix.as_str())
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    if !aligned {
        strip.error(format!(
            "the route's {kind} `{route_path}` does not start with `{prefix}` followed by `/`, so requests on this route would not be rewritten"
        ));
    }
    Some(Rewrite {
        strip_prefix: Some(prefix),
    })
}

// ---------------------------------------------------------------- request checks

fn default_request() -> RequestPolicy {
    RequestPolicy {
        max_body: DEFAULT_MAX_BODY,
        json: JsonMode::Auto,
        max_messages: None,
        max_prompt_chars: None,
        fields: Vec::new(),
    }
}

fn request(v: &Value<'_>) -> RequestPolicy {
    let mut policy = default_request();
    let Some(mut m) = v.map(REQUEST_FIELDS) else {
        return policy;
    };
    policy.max_body = m
        .size_in("max_body", 1..=GIB)
        .and_then(|b| usize::try_from(b).ok())
        .unwrap_or(DEFAULT_MAX_BODY);
    let json = m.get("json");
    policy.json = json
        .as_ref()
        .and_then(|j| {
            j.one_of(&[
                ("auto", JsonMode::Auto),
                ("required", JsonMode::Required),
                ("off", JsonMode::Off),
            ])
        })
        .unwrap_or(JsonMode::Auto);
    policy.max_messages = m.usize_in("max_messages", 1..=100_000);
    policy.max_prompt_chars = m.usize_in("max_prompt_chars", 1..=100_000_000);
    if let Some(list) = m.get("fields") {
        let mut paths: Vec<String> = Vec::new();
        for item in list.list().unwrap_or_default() {
            let Some(check) = field_check(&item, policy.max_body) else {
                continue;
            };
            if paths.contains(&check.path) {
                item.error(format!(
                    "`{}` is checked twice in this route; merge the two entries",
                    check.path
                ));
                continue;
            }
            paths.push(check.path.clone());
            policy.fields.push(check);
        }
    }
    if let (Some(json), JsonMode::Off) = (&json, policy.json) {
        let uses_body = policy.max_messages.is_some()
            || policy.max_prompt_chars.is_some()
            || !policy.fields.is_empty();
        if uses_body {
            json.error("`json: off` turns off body parsing, so max_messages, max_prompt_chars and fields could never apply; remove them or use `auto`");
        }
    }
    policy
}

fn field_check(v: &Value<'_>, max_body: usize) -> Option<FieldCheck> {
    let mut m = v.map(FIELD_CHECK_FIELDS)?;
    let path_value = m.require("path");
    let required = m.bool("required").unwrap_or(false);
    let min_value = m.get("min_chars");
    let min_chars = min_value.as_ref().and_then(|x| x.usize_in(1..=100_000_000));
    let max_value = m.get("max_chars");
    let max_chars = max_value.as_ref().and_then(|x| x.usize_in(1..=100_000_000));
    let bytes_value = m.get("max_bytes");
    let max_bytes = bytes_value
        .as_ref()
        .and_then(|x| x.size_in(1..=GIB))
        .and_then(|b| usize::try_from(b).ok());
    let format_value = m.get("format");
    let format = format_value
        .as_ref()
        .and_then(|f| f.one_of(&[("uuid", FieldFormat::Uuid)]));

    if let (Some(min), Some(max), Some(at)) = (min_chars, max_chars, &min_value) {
        if min > max {
            at.error(format!(
                "min_chars ({min}) is larger than max_chars ({max})"
            ));
        }
    }
    if let (Some(bytes), Some(at)) = (max_bytes, &bytes_value) {
        if bytes > max_body {
            at.error(format!(
                "is larger than the route's request.max_body ({}), which would reject the request first; raise max_body",
                super::units::format_size(max_body as u64)
            ));
        }
    }
    let checks_something = required
        || min_value.is_some()
        || max_value.is_some()
        || bytes_value.is_some()
        || format_value.is_some();
    if !checks_something {
        v.error(format!(
            "checks nothing; set at least one of {}",
            list_names(&["required", "min_chars", "max_chars", "max_bytes", "format"])
        ));
    }

    let path_value = path_value?;
    let path = path_value.parse_with("a dotted field path", |s| {
        let segments: Vec<&str> = s.split('.').collect();
        if segments
            .iter()
            .any(|seg| seg.trim().is_empty() || seg.trim() != *seg)
        {
            Err(format!(
                "`{s}` is not a dotted field path such as `query` or `metadata.sessionId`"
            ))
        } else {
            Ok(s.to_string())
        }
    })?;
    let segments = path.split('.').map(str::to_string).collect();
    Some(FieldCheck {
        path,
        segments,
        required,
        min_chars,
        max_chars,
        max_bytes,
        format,
    })
}
