//! `routes[].cache` and `store.cache`.
//!
//! Defaults, shared with docs/policy.md: `ttl: 5m`, `store: memory`,
//! `scope: user`, `streams: record`, `max_entry: 1MiB`, `lock_timeout:
//! 30s`, `on_leader_failure: takeover`, `replay: immediate`, `charge_hits:
//! false`; `store.cache.max_memory: 64MiB`, no compression.

use std::time::Duration;

use super::decode::{Map, Value};
use crate::policy::cache::{
    CachePolicy, CacheStoreConfig, OnLeaderFailure, Replay, Scope, StoreKind,
};

const CACHE_FIELDS: &[&str] = &[
    "ttl",
    "store",
    "scope",
    "ignore_fields",
    "key_headers",
    "streams",
    "stale_if_error",
    "max_entry",
    "lock_timeout",
    "on_leader_failure",
    "replay",
    "charge_hits",
];
pub(super) const STORE_CACHE_FIELDS: &[&str] = &["max_memory", "compress_over"];

const SECOND: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);
const MONTH: Duration = Duration::from_secs(31 * 86_400);
const KIB: u64 = 1024;
const GIB: u64 = 1 << 30;

/// `routes[].cache`. `has_redis`: the file has a `store.redis` section.
pub fn route_cache(v: &Value<'_>, has_redis: bool) -> CachePolicy {
    let mut c = CachePolicy::default();
    let Some(mut m) = v.map(CACHE_FIELDS) else {
        return c;
    };
    c.ttl = m.duration_in("ttl", SECOND..=MONTH).unwrap_or(c.ttl);
    if let Some(s) = m.get("store") {
        if let Some(kind) = s.one_of(&[
            ("memory", StoreKind::Memory),
            ("redis", StoreKind::Redis),
            ("tiered", StoreKind::Tiered),
        ]) {
            if kind.uses_redis() && !has_redis {
                s.error(format!(
                    "`{}` needs a `store.redis` section; add one, or use `store: memory`",
                    kind.as_str()
                ));
            }
            c.store = kind;
        }
    }
    c.scope = m
        .one_of("scope", &[("user", Scope::User), ("shared", Scope::Shared)])
        .unwrap_or(c.scope);
    if let Some(list) = m.get("ignore_fields") {
        c.ignore_fields = field_paths(&list);
    }
    if let Some(list) = m.get("key_headers") {
        if let Some(items) = list.list() {
            for item in items {
                if let Some(name) = super::compile::header_name(&item) {
                    if name == "authorization" {
                        item.error("`authorization` is always part of the key (hashed); remove it");
                    } else {
                        c.key_headers.push(name);
                    }
                }
            }
        }
    }
    c.streams = m
        .one_of("streams", &[("record", true), ("off", false)])
        .unwrap_or(c.streams);
    c.stale_if_error = m.duration_in("stale_if_error", SECOND..=MONTH);
    c.max_entry = m
        .size_in("max_entry", 1..=GIB)
        .map_or(c.max_entry, |n| n as usize);
    c.lock_timeout = m
        .duration_in("lock_timeout", MS..=Duration::from_secs(600))
        .unwrap_or(c.lock_timeout);
    c.on_leader_failure = m
        .one_of(
            "on_leader_failure",
            &[
                ("takeover", OnLeaderFailure::Takeover),
                ("each", OnLeaderFailure::Each),
            ],
        )
        .unwrap_or(c.on_leader_failure);
    c.replay = m
        .one_of(
            "replay",
            &[("immediate", Replay::Immediate), ("paced", Replay::Paced)],
        )
        .unwrap_or(c.replay);
    c.charge_hits = m.bool("charge_hits").unwrap_or(false);
    c
}

fn field_paths(v: &Value<'_>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let Some(items) = v.list() else {
        return out;
    };
    for item in items {
        let Some(path) = item.str() else {
            item.type_error("a field path such as `user` or `metadata.trace_id`");
            continue;
        };
        let segments: Vec<String> = path.split('.').map(str::to_string).collect();
        if segments.iter().any(String::is_empty) {
            item.error(format!(
                "`{path}` is not a field path (use dotted names, e.g. `metadata.trace_id`)"
            ));
            continue;
        }
        out.push(segments);
    }
    out
}

/// `store.cache`.
pub(super) fn store_cache(m: &mut Map<'_>) -> CacheStoreConfig {
    let mut c = CacheStoreConfig::default();
    c.max_memory = m
        .size_in("max_memory", KIB..=64 * GIB)
        .unwrap_or(c.max_memory);
    c.compress_over = m.size_in("compress_over", 64..=GIB).map(|n| n as usize);
    c
}

#[cfg(test)]
mod tests {
    use crate::config::{compile_str_with_env, ConfigErrors, Snapshot};

    fn compile_str(text: &str) -> Result<Snapshot, ConfigErrors> {
        compile_str_with_env(text, "p.yaml", &|_| None)
    }

    fn errors(text: &str) -> Vec<String> {
        match compile_str(text) {
            Ok(_) => panic!("expected errors, but the policy compiled:\n{text}"),
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    }

    const BASE: &str = "version: 1
backends:
  b: { endpoints: [\"http://127.0.0.1:1\"] }
routes:
  - name: r
    match: { path_prefix: / }
    backend: b
";

    #[test]
    fn a_full_cache_section_compiles() {
        let text = format!(
            "{BASE}    cache:
      ttl: 1h
      store: memory
      scope: shared
      ignore_fields: [user, stream_options, metadata.trace]
      key_headers: [x-tenant]
      streams: off
      stale_if_error: 1h
      max_entry: 64KiB
      lock_timeout: 2s
      on_leader_failure: each
      replay: paced
      charge_hits: true
"
        );
        let snap = compile_str(&text).expect("compiles");
        let c = snap.routes[0].cache.as_ref().expect("cache");
        assert_eq!(c.ttl.as_secs(), 3600);
        assert_eq!(c.scope, crate::policy::cache::Scope::Shared);
        assert_eq!(c.ignore_fields.len(), 3);
        assert_eq!(c.ignore_fields[2], ["metadata", "trace"]);
        assert_eq!(c.key_headers, ["x-tenant"]);
        assert!(!c.streams);
        assert_eq!(c.stale_if_error.map(|d| d.as_secs()), Some(3600));
        assert_eq!(c.max_entry, 64 * 1024);
        assert_eq!(
            c.on_leader_failure,
            crate::policy::cache::OnLeaderFailure::Each
        );
        assert!(c.charge_hits);
    }

    #[test]
    fn cache_errors_are_reported_with_positions() {
        let text = format!(
            "{BASE}    cache:
      ttl: 0s
      store: redis
      scope: everyone
      key_headers: [authorization]
      ignore_fields: [\"a..b\"]
      stale_while_revalidate: 1m
"
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:9:12 routes[0].cache.ttl: must be 1s..=31d (was 0s)",
                "p.yaml:10:14 routes[0].cache.store: `redis` needs a `store.redis` section; add one, or use `store: memory`",
                "p.yaml:11:14 routes[0].cache.scope: must be one of `user`, `shared` (was `everyone`)",
                "p.yaml:12:21 routes[0].cache.key_headers[0]: `authorization` is always part of the key (hashed); remove it",
                "p.yaml:13:23 routes[0].cache.ignore_fields[0]: `a..b` is not a field path (use dotted names, e.g. `metadata.trace_id`)",
                "p.yaml:14:7 routes[0].cache.stale_while_revalidate: `routes[0].cache.stale_while_revalidate` is not supported yet (planned)",
            ]
        );
    }

    #[test]
    fn stale_cache_fallback_needs_stale_if_error() {
        let text = format!(
            "{BASE}    cache: {{ ttl: 1m }}
    fallback:
      - stale_cache: true
"
        );
        assert_eq!(
            errors(&text),
            ["p.yaml:10:22 routes[0].fallback[0].stale_cache: needs `cache.stale_if_error` on this route (how old a stale answer may be)"]
        );
        let ok = format!(
            "{BASE}    cache: {{ ttl: 1m, stale_if_error: 1h }}
    fallback:
      - stale_cache: true
"
        );
        let snap = compile_str(&ok).expect("compiles");
        assert_eq!(
            snap.routes[0].fallback,
            [crate::config::FallbackTarget::StaleCache]
        );
    }

    #[test]
    fn store_cache_without_redis_is_valid() {
        let text = format!("store:\n  cache: {{ max_memory: 8MiB, compress_over: 4KiB }}\n{BASE}");
        let snap = compile_str(&text).expect("compiles");
        assert_eq!(snap.cache_store.max_memory, 8 << 20);
        assert_eq!(snap.cache_store.compress_over, Some(4096));
        assert!(snap.store.is_none());
    }
}
