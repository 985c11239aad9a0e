//! Decoding of the admission sections: `routes[].concurrency`,
//! `routes[].streams`, `backends.*.limits` and `server.streams`.
//!
//! Each function reads one section through the collecting reader in
//! `decode.rs`, reports every problem it finds (with the allowed range and
//! the value given), and returns the section with defaults standing in for
//! invalid values, so the compiler can go on. The compiled types and their
//! defaults live in `crate::policy::{concurrency, streams}`;
//! `docs/policy.md` documents them.
//!
//! `concurrency.shared: true` (a cap across replicas, places leased in
//! Redis) needs `max_in_flight` (the cap it shares) and a `store.redis`
//! section; `lease` is read only with it.

use std::time::Duration;

use super::compile::{header_name, is_name};
use super::decode::{hint, list_names, Value};
use crate::policy::concurrency::adaptive::AdaptiveConfig;
use crate::policy::concurrency::{
    self, shared, CallLimits, ConcurrencyConfig, PriorityConfig, QueueConfig, SharedConfig,
};
use crate::policy::streams::{ServerStreamsConfig, StreamsConfig};

const CONCURRENCY_FIELDS: &[&str] = &["max_in_flight", "per_identity", "shared", "lease", "queue"];
const QUEUE_FIELDS: &[&str] = &["max_depth", "max_wait", "priority"];
const PRIORITY_FIELDS: &[&str] = &["header", "classes", "default", "streaming"];
const STREAMS_FIELDS: &[&str] = &["max_concurrent", "per_identity", "max_duration"];
const LIMITS_FIELDS: &[&str] = &[
    "max_in_flight",
    "per_minute",
    "min_spacing",
    "max_wait",
    "max_queue",
    "adaptive",
];
const ADAPTIVE_FIELDS: &[&str] = &["min", "max", "window", "tolerance"];
const SERVER_STREAMS_FIELDS: &[&str] = &["max_concurrent"];

// Ranges, shared with docs/policy.md.
/// `max_in_flight` and `per_identity` (routes and backends), and a route's
/// stream caps.
pub const MAX_COUNT: u64 = 1_000_000;
/// `server.streams.max_concurrent`.
pub const MAX_INSTANCE_STREAMS: u64 = 10_000_000;
/// `queue.max_depth` and `limits.max_queue`.
pub const MAX_QUEUE: u64 = 100_000;
/// `limits.per_minute` (the start log keeps this many instants).
pub const MAX_PER_MINUTE: u64 = 100_000;

const MS: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

fn to_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------- concurrency

/// `routes[].concurrency`. `has_redis`: the file has a `store.redis`
/// section (valid or not, so that a broken one is not reported twice).
pub fn concurrency(v: &Value<'_>, has_redis: bool) -> ConcurrencyConfig {
    let mut c = ConcurrencyConfig {
        max_in_flight: None,
        per_identity: None,
        queue: None,
        shared: None,
    };
    let Some(mut m) = v.map(CONCURRENCY_FIELDS) else {
        return c;
    };
    c.max_in_flight = m.u64_in("max_in_flight", 1..=MAX_COUNT).map(to_u32);
    let per_identity = m.get("per_identity");
    c.per_identity = per_identity
        .as_ref()
        .and_then(|x| x.u64_in(1..=MAX_COUNT))
        .map(to_u32);
    if let (Some(max), Some(per), Some(at)) = (c.max_in_flight, c.per_identity, &per_identity) {
        if per > max {
            at.error(format!(
                "must be at most max_in_flight ({max}), or it could never apply (was {per})"
            ));
        }
    }
    let shared_value = m.get("shared");
    let is_shared = shared_value.as_ref().and_then(Value::bool) == Some(true);
    let lease = m.get("lease");
    if let (true, Some(at)) = (is_shared, &shared_value) {
        if !m.has("max_in_flight") {
            at.error("needs `max_in_flight`: the cap that holds across replicas");
        }
        if !has_redis {
            at.error(
                "needs a `store.redis` section: the places are leased in Redis, where every replica sees them",
            );
        }
        c.shared = Some(SharedConfig {
            lease: lease
                .as_ref()
                .and_then(|l| l.duration_in(shared::MIN_LEASE..=shared::MAX_LEASE))
                .unwrap_or(shared::DEFAULT_LEASE),
        });
    } else if let Some(l) = &lease {
        l.error("applies only with `shared: true` (it is how long a replica's place outlives the replica)");
    }
    if let Some(q) = m.get("queue") {
        c.queue = Some(queue(&q));
        if !m.has("max_in_flight") {
            q.error("needs `max_in_flight`: requests queue only when the route's in-flight cap is reached");
        }
    }
    let limits = ["max_in_flight", "per_identity"];
    if !m.has("max_in_flight") && !m.has("per_identity") && !m.misspelled(&limits) {
        v.error(format!(
            "sets no limit; set at least one of {}",
            list_names(&limits)
        ));
    }
    c
}

fn queue(v: &Value<'_>) -> QueueConfig {
    let mut q = QueueConfig {
        max_depth: concurrency::DEFAULT_QUEUE_MAX_DEPTH,
        max_wait: concurrency::DEFAULT_QUEUE_MAX_WAIT,
        priority: PriorityConfig::default(),
    };
    let Some(mut m) = v.map(QUEUE_FIELDS) else {
        return q;
    };
    q.max_depth = m
        .u64_in("max_depth", 1..=MAX_QUEUE)
        .map_or(concurrency::DEFAULT_QUEUE_MAX_DEPTH, to_u32);
    q.max_wait = m
        .duration_in("max_wait", MS..=HOUR)
        .unwrap_or(concurrency::DEFAULT_QUEUE_MAX_WAIT);
    if let Some(p) = m.get("priority") {
        q.priority = priority(&p);
    }
    q
}

fn priority(v: &Value<'_>) -> PriorityConfig {
    let mut p = PriorityConfig::default();
    let Some(mut m) = v.map(PRIORITY_FIELDS) else {
        return p;
    };
    p.header = m.get("header").and_then(|h| header_name(&h));

    // `None` when the list itself is unusable, so references to it are not
    // reported a second time.
    let classes: Option<Vec<String>> = m.require("classes").and_then(|list| {
        let items = list.list()?;
        if items.is_empty() {
            list.error("must list at least one class, highest priority first");
            return None;
        }
        if items.len() > concurrency::MAX_CLASSES {
            list.error(format!(
                "must list at most {} classes (was {})",
                concurrency::MAX_CLASSES,
                items.len()
            ));
        }
        let mut names: Vec<String> = Vec::new();
        let mut valid = true;
        for item in items {
            let Some(name) = item.str() else {
                valid = false;
                continue;
            };
            if !is_name(name) {
                item.error(format!(
                    "class name `{name}` must use only a-z, 0-9, `_` and `-`"
                ));
                valid = false;
            } else if names.iter().any(|n| n == name) {
                item.error(format!("`{name}` is listed twice"));
            } else {
                names.push(name.to_string());
            }
        }
        valid.then_some(names)
    });
    let several = classes.as_ref().is_some_and(|c| c.len() > 1);
    let default = if several {
        m.require("default")
    } else {
        m.get("default")
    };
    let streaming = m.get("streaming");
    let Some(classes) = classes else {
        return p;
    };
    p.default = default
        .as_ref()
        .and_then(|d| class_ref(d, &classes))
        .unwrap_or(0);
    p.streaming = streaming.as_ref().and_then(|s| class_ref(s, &classes));
    if several && p.header.is_none() && streaming.is_none() && !m.has("header") {
        v.error(
            "with neither `header` nor `streaming`, every request is in the `default` class; \
             set one of them, or list a single class",
        );
    }
    p.classes = classes;
    p
}

/// A class name that must be one of `classes`; its index.
fn class_ref(v: &Value<'_>, classes: &[String]) -> Option<usize> {
    let name = v.str()?;
    if let Some(i) = classes.iter().position(|c| c == name) {
        return Some(i);
    }
    let names: Vec<&str> = classes.iter().map(String::as_str).collect();
    v.error(format!(
        "`{name}` is not one of the classes {}{}",
        list_names(&names),
        hint(name, &names)
    ));
    None
}

// ---------------------------------------------------------------- streams

/// `routes[].streams`.
pub fn streams(v: &Value<'_>) -> StreamsConfig {
    let mut s = StreamsConfig::default();
    let Some(mut m) = v.map(STREAMS_FIELDS) else {
        return s;
    };
    s.max_concurrent = m.u64_in("max_concurrent", 1..=MAX_COUNT).map(to_u32);
    let per_identity = m.get("per_identity");
    s.per_identity = per_identity
        .as_ref()
        .and_then(|x| x.u64_in(1..=MAX_COUNT))
        .map(to_u32);
    if let (Some(max), Some(per), Some(at)) = (s.max_concurrent, s.per_identity, &per_identity) {
        if per > max {
            at.error(format!(
                "must be at most max_concurrent ({max}), or it could never apply (was {per})"
            ));
        }
    }
    s.max_duration = m.duration_in("max_duration", SECOND..=DAY);
    if STREAMS_FIELDS.iter().all(|f| !m.has(f)) && !m.misspelled(STREAMS_FIELDS) {
        v.error(format!(
            "sets no limit; set at least one of {}",
            list_names(STREAMS_FIELDS)
        ));
    }
    s
}

/// `server.streams`.
pub fn server_streams(v: &Value<'_>) -> ServerStreamsConfig {
    let mut s = ServerStreamsConfig::default();
    let Some(mut m) = v.map(SERVER_STREAMS_FIELDS) else {
        return s;
    };
    s.max_concurrent = m
        .require("max_concurrent")
        .and_then(|x| x.u64_in(1..=MAX_INSTANCE_STREAMS))
        .map(to_u32);
    s
}

// ---------------------------------------------------------------- backend limits

/// `backends.<name>.limits`.
pub fn backend_limits(v: &Value<'_>) -> CallLimits {
    let mut l = CallLimits::default();
    let Some(mut m) = v.map(LIMITS_FIELDS) else {
        return l;
    };
    l.max_in_flight = m.u64_in("max_in_flight", 1..=MAX_COUNT).map(to_u32);
    l.per_minute = m.u64_in("per_minute", 1..=MAX_PER_MINUTE).map(to_u32);
    l.min_spacing = m
        .duration_in("min_spacing", MS..=MINUTE)
        .unwrap_or(Duration::ZERO);
    l.max_wait = m
        .duration_in("max_wait", Duration::ZERO..=10 * MINUTE)
        .unwrap_or(concurrency::DEFAULT_CALL_MAX_WAIT);
    l.max_queue = m
        .u64_in("max_queue", 1..=MAX_QUEUE)
        .map_or(concurrency::DEFAULT_CALL_MAX_QUEUE, to_u32);
    l.adaptive = m.get("adaptive").and_then(|a| adaptive(&a));
    let limits = ["max_in_flight", "per_minute", "min_spacing", "adaptive"];
    if limits.iter().all(|f| !m.has(f)) && !m.misspelled(&limits) {
        v.error(format!(
            "sets no limit; set at least one of {}",
            list_names(&limits)
        ));
    }
    l
}

/// `backends.<name>.limits.adaptive`.
fn adaptive(v: &Value<'_>) -> Option<AdaptiveConfig> {
    let mut m = v.map(ADAPTIVE_FIELDS)?;
    let min = m.u64_in("min", 1..=MAX_COUNT).map_or(1, to_u32);
    let max = m
        .require("max")
        .and_then(|x| x.u64_in(1..=MAX_COUNT))
        .map(to_u32);
    let window = m
        .duration_in("window", 100 * MS..=MINUTE)
        .unwrap_or(Duration::from_secs(1));
    let tolerance = m
        .get("tolerance")
        .and_then(|x| super::resilience::decimal_in(&x, 1.0..=10.0))
        .unwrap_or(1.5);
    let max = max?;
    if min > max {
        v.error(format!("min ({min}) is above max ({max})"));
        return None;
    }
    Some(AdaptiveConfig {
        min,
        max,
        window,
        tolerance_pct: (tolerance * 100.0).round() as u32,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::{compile_str_with_env, ConfigErrors, Snapshot};
    use crate::policy::concurrency::{
        CallLimits, ConcurrencyConfig, PriorityConfig, QueueConfig, SharedConfig,
    };
    use crate::policy::streams::{ServerStreamsConfig, StreamsConfig};

    const HEAD: &str = "\
version: 1
backends:
  openai:
    endpoints: [\"https://api.openai.com\"]
routes:
  - name: chat
    match: { path_prefix: / }
    backend: openai
";

    fn compile(text: &str) -> Result<Snapshot, ConfigErrors> {
        compile_str_with_env(text, "p.yaml", &|_| None)
    }

    /// `HEAD` plus `extra` (fields of the route, or of the `openai` backend
    /// when it starts with `backend:`, or of `server` with `server:`).
    fn with(extra: &str) -> String {
        if let Some(rest) = extra.strip_prefix("backend:\n") {
            return HEAD.replace(
                "    endpoints: [\"https://api.openai.com\"]\n",
                &format!("    endpoints: [\"https://api.openai.com\"]\n{rest}"),
            );
        }
        if let Some(rest) = extra.strip_prefix("server:\n") {
            return HEAD.replace("version: 1\n", &format!("version: 1\nserver:\n{rest}"));
        }
        format!("{HEAD}{extra}")
    }

    fn errors(text: &str) -> Vec<String> {
        match compile(text) {
            Ok(_) => panic!("expected errors, but the policy compiled:\n{text}"),
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    }

    fn ok(text: &str) -> Snapshot {
        match compile(text) {
            Ok(s) => s,
            Err(e) => panic!("{e}\n{text}"),
        }
    }

    #[test]
    fn every_admission_field_compiles() {
        let text = with(
            "    concurrency:
      max_in_flight: 10
      per_identity: 3
      shared: false
      queue:
        max_depth: 50
        max_wait: 10m
        priority: { header: X-Priority, classes: [interactive, normal, batch], default: normal, streaming: interactive }
    streams: { max_concurrent: 100, per_identity: 5, max_duration: 10m }
",
        );
        let text = text.replace(
            "    endpoints: [\"https://api.openai.com\"]\n",
            "    endpoints: [\"https://api.openai.com\"]\n    limits: { max_in_flight: 20, per_minute: 100, min_spacing: 100ms, max_wait: 10s, max_queue: 500 }\n",
        );
        let text = text.replace(
            "version: 1\n",
            "version: 1\nserver:\n  streams: { max_concurrent: 100 }\n",
        );
        let snap = ok(&text);
        assert_eq!(
            snap.server.streams,
            ServerStreamsConfig {
                max_concurrent: Some(100)
            }
        );
        let route = &snap.routes[0];
        assert_eq!(
            route.concurrency.as_deref(),
            Some(&ConcurrencyConfig {
                max_in_flight: Some(10),
                per_identity: Some(3),
                queue: Some(QueueConfig {
                    max_depth: 50,
                    max_wait: Duration::from_secs(600),
                    priority: PriorityConfig {
                        header: Some("x-priority".into()),
                        classes: vec!["interactive".into(), "normal".into(), "batch".into()],
                        default: 1,
                        streaming: Some(0),
                    },
                }),
                shared: None,
            })
        );
        assert_eq!(
            route.streams.as_deref(),
            Some(&StreamsConfig {
                max_concurrent: Some(100),
                per_identity: Some(5),
                max_duration: Some(Duration::from_secs(600)),
            })
        );
        assert_eq!(
            snap.backends[0].limits.as_deref(),
            Some(&CallLimits {
                max_in_flight: Some(20),
                per_minute: Some(100),
                min_spacing: Duration::from_millis(100),
                max_wait: Duration::from_secs(10),
                max_queue: 500,
                adaptive: None,
            })
        );
    }

    #[test]
    fn adaptive_backend_limits_with_defaults_and_bounds() {
        use crate::policy::concurrency::adaptive::AdaptiveConfig;
        let snap = ok(&with("backend:\n    limits: { adaptive: { max: 32 } }\n"));
        let l = snap.backends[0].limits.as_deref().unwrap();
        assert_eq!(
            l.adaptive,
            Some(AdaptiveConfig {
                min: 1,
                max: 32,
                window: Duration::from_secs(1),
                tolerance_pct: 150,
            })
        );
        assert_eq!(l.max_in_flight, None);
        let snap = ok(&with(
            "backend:\n    limits: { max_in_flight: 10, adaptive: { min: 2, max: 8, window: 250ms, tolerance: 2 } }\n",
        ));
        let l = snap.backends[0].limits.as_deref().unwrap();
        assert_eq!(
            l.adaptive,
            Some(AdaptiveConfig {
                min: 2,
                max: 8,
                window: Duration::from_millis(250),
                tolerance_pct: 200,
            })
        );
        let errs = compile(&with(
            "backend:\n    limits: { adaptive: { min: 9, max: 8, window: 10ms, tolerance: 0.5 } }\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            errs.contains("limits.adaptive.window: must be 100ms..=1m"),
            "{errs}"
        );
        assert!(
            errs.contains("limits.adaptive.tolerance: must be"),
            "{errs}"
        );
        assert!(
            errs.contains("limits.adaptive: min (9) is above max (8)"),
            "{errs}"
        );
        let errs = compile(&with("backend:\n    limits: { adaptive: { min: 2 } }\n"))
            .unwrap_err()
            .to_string();
        assert!(errs.contains("limits.adaptive.max"), "{errs}");
    }

    #[test]
    fn defaults_when_sections_are_absent_or_minimal() {
        let snap = ok(HEAD);
        assert_eq!(snap.server.streams, ServerStreamsConfig::default());
        assert!(snap.routes[0].concurrency.is_none());
        assert!(snap.routes[0].streams.is_none());
        assert!(snap.backends[0].limits.is_none());

        let snap = ok(&with("backend:\n    limits: { per_minute: 60 }\n"));
        assert_eq!(
            snap.backends[0].limits.as_deref(),
            Some(&CallLimits {
                per_minute: Some(60),
                ..CallLimits::default()
            })
        );
        let snap = ok(&with("    concurrency: { max_in_flight: 4, queue: {} }\n"));
        let queue = snap.routes[0]
            .concurrency
            .as_ref()
            .unwrap()
            .queue
            .clone()
            .unwrap();
        assert_eq!(queue.max_depth, 100);
        assert_eq!(queue.max_wait, Duration::from_secs(10));
        assert_eq!(queue.priority, PriorityConfig::default());
        // One class needs no `default`.
        let snap = ok(&with(
            "    concurrency: { max_in_flight: 4, queue: { priority: { classes: [only] } } }\n",
        ));
        let priority = &snap.routes[0]
            .concurrency
            .as_ref()
            .unwrap()
            .queue
            .as_ref()
            .unwrap()
            .priority;
        assert_eq!(priority.classes, ["only"]);
        assert_eq!(priority.default, 0);
    }

    const STORE: &str = "store:\n  redis: { url: \"redis://127.0.0.1:6379/0\" }\n";

    #[test]
    fn shared_true_needs_a_store_and_max_in_flight_and_false_is_accepted() {
        let c = ok(&with(
            "    concurrency: { max_in_flight: 1, shared: false }\n",
        ));
        assert_eq!(c.routes[0].concurrency.as_ref().unwrap().shared, None);

        let text = with("    concurrency: { max_in_flight: 100, shared: true }\n")
            .replace("version: 1\n", &format!("version: 1\n{STORE}"));
        let snap = ok(&text);
        assert_eq!(
            snap.routes[0].concurrency.as_ref().unwrap().shared,
            Some(SharedConfig {
                lease: Duration::from_secs(10)
            })
        );
        let text = with("    concurrency: { max_in_flight: 2, shared: true, lease: 2s }\n")
            .replace("version: 1\n", &format!("version: 1\n{STORE}"));
        let snap = ok(&text);
        assert_eq!(
            snap.routes[0].concurrency.as_ref().unwrap().shared,
            Some(SharedConfig {
                lease: Duration::from_secs(2)
            })
        );

        assert_eq!(
            errors(&with("    concurrency: { max_in_flight: 1, shared: true }\n")),
            ["p.yaml:9:46 routes[0].concurrency.shared: needs a `store.redis` section: the places are leased in Redis, where every replica sees them"]
        );
        let text = with("    concurrency: { per_identity: 1, shared: true, lease: 500ms }\n")
            .replace("version: 1\n", &format!("version: 1\n{STORE}"));
        assert_eq!(
            errors(&text),
            [
                "p.yaml:11:45 routes[0].concurrency.shared: needs `max_in_flight`: the cap that holds across replicas",
                "p.yaml:11:58 routes[0].concurrency.lease: must be 1s..=10m (was 500ms)",
            ]
        );
        assert_eq!(
            errors(&with("    concurrency: { max_in_flight: 1, lease: 5s }\n")),
            ["p.yaml:9:45 routes[0].concurrency.lease: applies only with `shared: true` (it is how long a replica's place outlives the replica)"]
        );
    }

    #[test]
    fn concurrency_errors_name_the_range_and_the_value() {
        let text = with(
            "    concurrency:
      max_in_flight: 0
      per_identity: 2000000
      shared: yes
      queue:
        max_depth: 0
        max_wait: 2h
        priority:
          header: \"x priority\"
          classes: [high, high, Low]
          default: medium
          streaming: high
      queu: {}
",
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:10:22 routes[0].concurrency.max_in_flight: must be 1..=1000000 (was 0)",
                "p.yaml:11:21 routes[0].concurrency.per_identity: must be 1..=1000000 (was 2000000)",
                "p.yaml:12:15 routes[0].concurrency.shared: expected true or false, got `yes`",
                "p.yaml:14:20 routes[0].concurrency.queue.max_depth: must be 1..=100000 (was 0)",
                "p.yaml:15:19 routes[0].concurrency.queue.max_wait: must be 1ms..=1h (was 2h)",
                "p.yaml:17:19 routes[0].concurrency.queue.priority.header: `x priority` is not a valid header name",
                "p.yaml:18:27 routes[0].concurrency.queue.priority.classes[1]: `high` is listed twice",
                "p.yaml:18:33 routes[0].concurrency.queue.priority.classes[2]: class name `Low` must use only a-z, 0-9, `_` and `-`",
                "p.yaml:21:7 routes[0].concurrency.queu: unknown field `queu`; did you mean `queue`?",
            ]
        );
        let text = with(
            "    concurrency:
      max_in_flight: 5
      per_identity: 6
      queue:
        priority: { classes: [interactive, normal, batch], default: norml, streaming: fast }
",
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:11:21 routes[0].concurrency.per_identity: must be at most max_in_flight (5), or it could never apply (was 6)",
                "p.yaml:13:69 routes[0].concurrency.queue.priority.default: `norml` is not one of the classes `interactive`, `normal`, `batch`; did you mean `normal`?",
                "p.yaml:13:87 routes[0].concurrency.queue.priority.streaming: `fast` is not one of the classes `interactive`, `normal`, `batch`",
            ]
        );
        let text = with(
            "    concurrency:
      queue: { priority: { classes: [a, b] } }
",
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:10:7 routes[0].concurrency: sets no limit; set at least one of `max_in_flight`, `per_identity`",
                "p.yaml:10:14 routes[0].concurrency.queue: needs `max_in_flight`: requests queue only when the route's in-flight cap is reached",
                "p.yaml:10:26 routes[0].concurrency.queue.priority.default: missing required field `default`",
                "p.yaml:10:26 routes[0].concurrency.queue.priority: with neither `header` nor `streaming`, every request is in the `default` class; set one of them, or list a single class",
            ]
        );
        let text =
            with("    concurrency: { max_in_flight: 2, queue: { priority: { classes: [] } } }\n");
        assert_eq!(
            errors(&text),
            ["p.yaml:9:68 routes[0].concurrency.queue.priority.classes: must list at least one class, highest priority first"]
        );
    }

    #[test]
    fn stream_and_backend_limit_errors() {
        let text =
            with("    streams: { max_concurrent: 2, per_identity: 3, max_duration: 500ms }\n");
        assert_eq!(
            errors(&text),
            [
                "p.yaml:9:49 routes[0].streams.per_identity: must be at most max_concurrent (2), or it could never apply (was 3)",
                "p.yaml:9:66 routes[0].streams.max_duration: must be 1s..=1d (was 500ms)",
            ]
        );
        assert_eq!(
            errors(&with("    streams: {}\n")),
            ["p.yaml:9:14 routes[0].streams: sets no limit; set at least one of `max_concurrent`, `per_identity`, `max_duration`"]
        );
        let text = with(
            "backend:\n    limits: { max_in_flight: 0, per_minute: 200000, min_spacing: 0s, max_wait: 1h, max_queue: 0 }\n",
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:5:30 backends.openai.limits.max_in_flight: must be 1..=1000000 (was 0)",
                "p.yaml:5:45 backends.openai.limits.per_minute: must be 1..=100000 (was 200000)",
                "p.yaml:5:66 backends.openai.limits.min_spacing: must be 1ms..=1m (was 0s)",
                "p.yaml:5:80 backends.openai.limits.max_wait: must be 0s..=10m (was 1h)",
                "p.yaml:5:95 backends.openai.limits.max_queue: must be 1..=100000 (was 0)",
            ]
        );
        assert_eq!(
            errors(&with("backend:\n    limits: { max_wait: 5s }\n")),
            ["p.yaml:5:13 backends.openai.limits: sets no limit; set at least one of `max_in_flight`, `per_minute`, `min_spacing`, `adaptive`"]
        );
        assert_eq!(
            errors(&with("server:\n  streams: { max_concurrent: 0 }\n")),
            ["p.yaml:3:30 server.streams.max_concurrent: must be 1..=10000000 (was 0)"]
        );
        assert_eq!(
            errors(&with("server:\n  streams: {}\n")),
            ["p.yaml:3:12 server.streams.max_concurrent: missing required field `max_concurrent`"]
        );
    }

    #[test]
    fn the_research_copilot_plan_is_expressible() {
        // "At most 10 concurrent agent runs per instance, and at most 3 per
        // user; LLM calls at most 20 concurrent and 100 per minute, 100 ms
        // apart; streaming high, non-streaming normal, batch low; jobs time
        // out after 10 minutes; 100 concurrent streams per instance, cut
        // after 10 minutes."
        let text = "\
version: 1
server:
  streams: { max_concurrent: 100 }
backends:
  llm:
    endpoints: [\"https://api.openai.com\"]
    limits: { max_in_flight: 20, per_minute: 100, min_spacing: 100ms, max_wait: 10s }
routes:
  - name: copilot-agent
    match: { path_prefix: /copilot-agent }
    backend: llm
    concurrency:
      max_in_flight: 10
      per_identity: 3
      queue:
        max_depth: 100
        max_wait: 10m
        priority: { header: x-priority, classes: [high, normal, low], default: normal, streaming: high }
    streams: { max_duration: 10m }
";
        let snap = ok(text);
        let c = snap.routes[0].concurrency.as_ref().unwrap();
        assert_eq!(c.class_for(None, true), 0);
        assert_eq!(c.class_for(None, false), 1);
        assert_eq!(c.class_for(Some(b" LOW "), true), 2);
        assert_eq!(c.class_for(Some(b"urgent"), false), 1);
        assert_eq!(c.priority_header(), Some("x-priority"));
    }
}
