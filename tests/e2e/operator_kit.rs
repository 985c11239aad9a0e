//! The operator kit stays in step with the binary: the Prometheus alerts and
//! the Grafana dashboard name only metrics a real floodwall exports, the
//! Kubernetes policy passes `floodwall check` and is the one the ConfigMap
//! holds, and the Dockerfile's and the Deployment's flags are the binary's.
//!
//! When `promtool` is installed (Debian package `prometheus`), the rules are
//! also checked and unit-tested with it, and every dashboard query is parsed
//! as PromQL. CI (`.ci/run`) installs it and sets
//! `FLOODWALL_REQUIRE_PROMTOOL=1`, so that there the check fails instead of
//! skipping when promtool is missing.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_yaml::Value as Yaml;

use crate::common::*;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Yaml {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every YAML document of a multi-document file.
fn yaml_docs(rel: &str) -> Vec<Yaml> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(&read(rel))
        .map(|d| Yaml::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .collect()
}

fn s<'a>(v: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(v, |v, k| &v[*k])
}

fn str_at<'a>(v: &'a Yaml, path: &[&str]) -> &'a str {
    s(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{} is not a string in {v:?}", path.join(".")))
}

// ------------------------------------------------------------ PromQL names

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Keywords followed by a parenthesised label list.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const OTHER_KEYWORDS: &[&str] = &["bool", "and", "or", "unless", "offset", "inf", "nan"];

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn ident_char(c: u8) -> bool {
    ident_start(c) || c.is_ascii_digit()
}

/// The index just past the quote that closes the string opening at `i`.
fn skip_string(b: &[u8], i: usize) -> usize {
    let q = b[i];
    let mut i = i + 1;
    while i < b.len() && b[i] != q {
        if b[i] == b'\\' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// The index just past the bracket that closes the one opening at `i`.
fn skip_group(b: &[u8], i: usize, close: u8) -> usize {
    let open = b[i];
    let mut depth = 0;
    let mut i = i;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => {
                i = skip_string(b, i);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// The metric names a PromQL expression selects: every identifier that is
/// not a function, an aggregation, a keyword, a label (inside `{...}` or a
/// `by (...)` list), a duration, a string or a Grafana `$variable`.
fn promql_metric_names(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => i = skip_string(b, i),
            b'{' => i = skip_group(b, i, b'}'),
            b'[' => i = skip_group(b, i, b']'),
            b'$' => {
                i += 1;
                while i < b.len() && (ident_char(b[i]) || b[i] == b'{' || b[i] == b'}') {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() || c == b'.' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_')
                {
                    i += 1;
                }
            }
            c if ident_start(c) => {
                let start = i;
                while i < b.len() && ident_char(b[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                let mut j = i;
                while j < b.len() && b[j].is_ascii_whitespace() {
                    j += 1;
                }
                let paren = j < b.len() && b[j] == b'(';
                if LABEL_LISTS.contains(&word) {
                    if paren {
                        i = skip_group(b, j, b')');
                    }
                } else if paren
                    || AGGREGATIONS.contains(&word)
                    || OTHER_KEYWORDS.contains(&word.to_ascii_lowercase().as_str())
                {
                    // a function call or a keyword
                } else {
                    out.push(word.to_string());
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// The selector of a Grafana `label_values(selector, label)` query, if any.
fn label_values_selector(query: &str) -> Option<&str> {
    let inner = query.trim().strip_prefix("label_values(")?;
    let b = inner.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => i = skip_string(b, i),
            b'{' => i = skip_group(b, i, b'}'),
            b',' | b')' => return Some(&inner[..i]),
            _ => i += 1,
        }
    }
    None
}

#[test]
fn the_promql_scanner_finds_metric_names_and_nothing_else() {
    let expr = r#"histogram_quantile(0.95, sum by (route, le) (rate(floodwall_request_duration_seconds_bucket{job=~"$job", route=~"a|b"}[$__rate_interval]))) > 30
        and on (namespace, job) sum without (instance) (foo_total offset 5m) * 3600 > 50e6
        or max(bar) by (x) == bool 2 unless group_left (y) baz:recorded"#;
    assert_eq!(
        promql_metric_names(expr),
        [
            "floodwall_request_duration_seconds_bucket",
            "foo_total",
            "bar",
            "baz:recorded"
        ]
    );
    assert_eq!(
        label_values_selector(r#"label_values(floodwall_build_info{job=~"$job"}, instance)"#),
        Some(r#"floodwall_build_info{job=~"$job"}"#)
    );
}

/// Family name -> type, from the `# TYPE` lines of an exposition.
fn families(exposition: &str) -> HashMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

/// The family a sample name belongs to (`x_bucket` of histogram `x`...).
fn family_of<'a>(name: &'a str, fams: &HashMap<String, String>) -> Option<&'a str> {
    if fams.contains_key(name) {
        return Some(name);
    }
    for (suffix, kinds) in [
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"][..]),
        ("_count", &["histogram", "summary"][..]),
    ] {
        if let Some(base) = name.strip_suffix(suffix) {
            if fams.get(base).is_some_and(|k| kinds.contains(&k.as_str())) {
                return Some(base);
            }
        }
    }
    None
}

/// Every `expr` of the rule file, with its alert name.
fn alert_exprs(rules: &Yaml) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .expect("alert or record")
                .to_string();
            out.push((name, rule["expr"].as_str().expect("expr").to_string()));
        }
    }
    out
}

/// Every PromQL query of the dashboard: each `expr` (panels, annotations),
/// and the selector of each `label_values` variable query.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(v: &serde_json::Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                let title = m
                    .get("title")
                    .or(m.get("name"))
                    .and_then(|t| t.as_str())
                    .unwrap_or(title);
                for (k, v) in m {
                    match (k.as_str(), v.as_str()) {
                        ("expr", Some(e)) => out.push((title.to_string(), e.to_string())),
                        ("definition", Some(q)) => {
                            if let Some(sel) = label_values_selector(q) {
                                out.push((title.to_string(), sel.to_string()));
                            }
                        }
                        _ => walk(v, title, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, title, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dash, "dashboard", &mut out);
    out
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("deploy/grafana/floodwall.json"))
        .unwrap_or_else(|e| panic!("deploy/grafana/floodwall.json: {e}"))
}

// ------------------------------------------- a floodwall that served traffic

const CHAT: &str = "/v1/chat/completions";

fn traffic_policy(mock: &str, redis: &str) -> String {
    format!(
        r#"version: 1
server:
  listen: ["127.0.0.1:0"]
  admin: {{ listen: "127.0.0.1:0" }}
  threads: 2
  grace_period: 1s
store:
  redis: {{ url: "{redis}", key_prefix: fw-e2e-kit, timeout: 200ms, expected_replicas: 2 }}
  cache: {{ max_memory: 4KiB }}
identity:
  user: [{{ header: x-user-id }}]
prices:
  "*": {{ input: 1, output: 2 }}
backends:
  main:
    endpoints: ["{mock}"]
    timeouts: {{ connect: 1s, response_headers: 5s }}
  flaky:
    endpoints: ["{mock}"]
    timeouts: {{ connect: 1s, response_headers: 5s }}
    circuit_breaker: {{ consecutive_failures: 2, open_for: 1m }}
routes:
  - name: flaky
    match: {{ path_prefix: /flaky/ }}
    rewrite: {{ strip_prefix: /flaky }}
    backend: flaky
    retry: {{ attempts: 2, on: [500], backoff: {{ base: 1ms, max: 1ms, jitter: none }} }}
    fallback:
      - respond: {{ status: 503 }}
  - name: queued
    match: {{ path_prefix: /queued/ }}
    rewrite: {{ strip_prefix: /queued }}
    backend: main
    concurrency: {{ max_in_flight: 1, queue: {{ max_depth: 1, max_wait: 10s }} }}
  - name: streams
    match: {{ path_prefix: /streams/ }}
    rewrite: {{ strip_prefix: /streams }}
    backend: main
    streams: {{ max_concurrent: 10, max_duration: 1s }}
  - name: cached
    match: {{ path_prefix: /cached/ }}
    rewrite: {{ strip_prefix: /cached }}
    backend: main
    cache: {{ ttl: 1m, scope: shared, store: tiered }}
  - name: chat
    match: {{ path_prefix: / }}
    backend: main
    rate_limits:
      - {{ name: per-user, key: [user], limits: [{{ requests: 3, per: 1m }}], on_store_error: local }}
      - {{ name: spend, key: [user], limits: [{{ cost_usd: 100, per: 1d }}] }}
"#
    )
}

async fn post(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    stream: bool,
) -> Resp {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    let body = chat_body("hello there", stream).to_string();
    Client::new()
        .send(addr, "POST", path, &h, body.as_bytes())
        .await
}

/// Drive every policy through a floodwall (with Redis, then without) and
/// return the union of the family names of its `/metrics` along the way.
async fn exported_families() -> HashMap<String, String> {
    let redis = RedisServer::start();
    let mock = start_mock().await;
    let fw = Floodwall::start(&traffic_policy(&mock_url(&mock), &redis.url())).await;
    let mut fams = HashMap::new();

    // Rate limit and spend, through Redis: 3 pass, the 4th is refused.
    for i in 0..4 {
        let r = post(fw.addr, CHAT, &[("x-user-id", "alice")], false).await;
        assert_eq!(r.status, if i < 3 { 200 } else { 429 }, "{}", r.text());
    }

    // Retries, give-up, fallback, the breaker opening, then a rejection.
    for _ in 0..2 {
        let path = format!("/flaky{CHAT}");
        let r = post(fw.addr, &path, &[("x-mock-fault", "status=500")], false).await;
        assert_eq!(r.status, 503, "{}", r.text());
    }

    // The queue: one request runs (2 s), one waits, a third finds it full.
    let addr = fw.addr;
    let path = format!("/queued{CHAT}");
    let slow = {
        let path = path.clone();
        tokio::spawn(
            async move { post(addr, &path, &[("x-mock-fault", "latency=2s")], false).await },
        )
    };
    fw.wait_metrics("the slow request to hold the slot", |m| {
        metric(m, "floodwall_route_in_flight{route=\"queued\"}") == Some(1.0)
    })
    .await;
    let waiting = {
        let path = path.clone();
        tokio::spawn(async move { post(addr, &path, &[], false).await })
    };
    let m = fw
        .wait_metrics("a queued request", |m| {
            metric(
                m,
                "floodwall_queue_depth{class=\"default\",route=\"queued\"}",
            ) == Some(1.0)
        })
        .await;
    fams.extend(families(&m));
    post(fw.addr, &path, &[], false)
        .await
        .assert_floodwall_error(503, "overloaded");
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(waiting.await.unwrap().status, 200);

    // Streams: one cut by max_duration (1 s), one whose client leaves.
    let path = format!("/streams{CHAT}");
    let script = [("x-mock-fault", "chunks=40;chunk_delay=100ms")];
    let cut = post(fw.addr, &path, &script, true).await;
    assert_eq!(cut.status, 200);
    assert!(!cut.complete, "max_duration ends the stream abnormally");
    {
        let body = chat_body("hello there", true).to_string();
        let mut h = vec![("content-type", "application/json")];
        h.extend_from_slice(&script);
        let (session, _) = Client::new()
            .open(fw.addr, "POST", &path, &h, body.as_bytes())
            .await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        drop(session);
    }
    fw.wait_metrics("a stream disconnect", |m| {
        m.contains("floodwall_stream_disconnects_total{")
    })
    .await;

    // The cache: a miss then a hit, three identical misses at once (one
    // upstream call, two collapsed), and more answers than the 4 KiB memory
    // tier holds (evictions).
    let path = format!("/cached{CHAT}");
    let cached = |prompt: String, headers: Vec<(&'static str, &'static str)>| {
        let path = path.clone();
        async move {
            let body = chat_body(&prompt, false).to_string();
            let mut h = vec![("content-type", "application/json")];
            h.extend(headers);
            Client::new()
                .send(addr, "POST", &path, &h, body.as_bytes())
                .await
        }
    };
    let first = cached("cache me".into(), vec![]).await;
    assert_eq!(first.header("x-cache"), Some("MISS"), "{}", first.text());
    let again = cached("cache me".into(), vec![]).await;
    assert_eq!(again.header("x-cache"), Some("HIT"), "{}", again.text());
    let slow = vec![("x-mock-fault", "latency=1s")];
    let same: Vec<_> = (0..3)
        .map(|_| tokio::spawn(cached("all at once".into(), slow.clone())))
        .collect();
    for t in same {
        assert_eq!(t.await.unwrap().status, 200);
    }
    for i in 0..12 {
        let r = cached(format!("fill the memory tier {i}"), vec![]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let m = fw
        .wait_metrics("cache hits, collapsed misses and evictions", |m| {
            m.contains("floodwall_cache_collapsed_total{")
                && m.contains("floodwall_cache_evictions_total{")
                && m.contains("floodwall_cache_bytes{")
        })
        .await;
    fams.extend(families(&m));

    // Redis away: store errors and the `local` fallback; the cache's Redis
    // tier fails open (a miss, counted as an error).
    drop(redis);
    let r = post(fw.addr, CHAT, &[("x-user-id", "bob")], false).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = cached("while redis is away".into(), vec![]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = fw
        .wait_metrics("a limiter store error and a cache store error", |m| {
            m.contains("floodwall_limiter_store_errors_total{")
                && m.contains("floodwall_cache_errors_total{")
        })
        .await;
    fams.extend(families(&m));
    fams
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_dashboard_use_only_metrics_floodwall_exports() {
    let fams = exported_families().await;
    let alerts = alert_exprs(&yaml("deploy/prometheus/alerts.yaml"));
    let dash = dashboard_exprs(&dashboard());
    assert!(alerts.len() >= 12, "alerts: {alerts:?}");
    assert!(dash.len() >= 40, "dashboard queries: {dash:?}");

    let mut unknown = Vec::new();
    let mut used = BTreeSet::new();
    for (file, list) in [("alerts.yaml", &alerts), ("floodwall.json", &dash)] {
        for (what, expr) in list {
            let names = promql_metric_names(expr);
            assert!(
                !names.is_empty(),
                "{file} `{what}` selects no metric: {expr}"
            );
            for name in names {
                match family_of(&name, &fams) {
                    Some(f) => {
                        if file == "floodwall.json" {
                            used.insert(f.to_string());
                        }
                    }
                    None => unknown.push(format!("{file} `{what}`: {name}")),
                }
            }
        }
    }
    let mut exported: Vec<&String> = fams.keys().collect();
    exported.sort();
    assert!(
        unknown.is_empty(),
        "metrics not in floodwall's /metrics:\n  {}\nexported families: {exported:?}",
        unknown.join("\n  ")
    );

    // A panel for every floodwall family.
    let missing: Vec<&&String> = exported
        .iter()
        .filter(|f| f.starts_with("floodwall_") && !used.contains(f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "families with no panel in deploy/grafana/floodwall.json: {missing:?}"
    );
}

// ------------------------------------------------------- alert conventions

/// GitHub's heading anchors: lower case, punctuation dropped, spaces to `-`.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut out = BTreeSet::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if in_code || !line.starts_with('#') {
            continue;
        }
        let text = line.trim_start_matches('#').trim();
        let slug: String = text
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        out.insert(slug);
    }
    out
}

#[test]
fn every_alert_has_severity_summary_description_and_a_runbook_entry() {
    let rules = yaml("deploy/prometheus/alerts.yaml");
    let ops = anchors(&read("docs/operations.md"));
    let mut names = BTreeSet::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = str_at(rule, &["alert"]);
            assert!(names.insert(name.to_string()), "alert {name} defined twice");
            let sev = str_at(rule, &["labels", "severity"]);
            assert!(
                ["critical", "warning", "info"].contains(&sev),
                "{name}: severity {sev}"
            );
            for key in ["summary", "description"] {
                assert!(
                    !str_at(rule, &["annotations", key]).is_empty(),
                    "{name}: empty {key}"
                );
            }
            let url = str_at(rule, &["annotations", "runbook_url"]);
            let (page, anchor) = url.split_once('#').expect("runbook_url has an anchor");
            assert!(page.ends_with("docs/operations.md"), "{name}: {url}");
            assert_eq!(
                anchor,
                name.to_lowercase(),
                "{name}: the anchor is the alert's name"
            );
            assert!(
                ops.contains(anchor),
                "{name}: docs/operations.md has no heading for #{anchor}"
            );
        }
    }
    for wanted in [
        "FloodwallHighErrorRate",
        "FloodwallCircuitOpen",
        "FloodwallQueueBacklog",
        "FloodwallLatencyP95High",
        "FloodwallLatencyP99High",
        "FloodwallRateLimitEvents",
        "FloodwallMemoryGrowth",
        "FloodwallConfigReloadFailed",
        "FloodwallRedisFallback",
        "FloodwallSpendNearDailyBudget",
        "FloodwallCacheHitRateLow",
        "FloodwallCacheMemoryHigh",
        "FloodwallCacheRedisErrors",
    ] {
        assert!(names.contains(wanted), "missing alert {wanted}");
    }
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_on_a_prometheus_datasource_variable() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    assert_eq!(d["uid"], "floodwall");
    let vars = d["templating"]["list"].as_array().expect("templating");
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["query"] == "prometheus"
            && v["name"] == "datasource"),
        "a Prometheus datasource variable"
    );
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{} overflows the grid", p["title"]);
    }
}

// ----------------------------------------------------------------- promtool

fn promtool(args: &[&str], dir: &Path) -> Option<Output> {
    match std::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
    {
        Ok(o) => Some(o),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("promtool: {e}"),
    }
}

fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn promtool_checks_and_unit_tests_the_rules_and_parses_the_dashboard_queries() {
    let dir = repo("deploy/prometheus");
    let Some(check) = promtool(&["check", "rules", "alerts.yaml"], &dir) else {
        // CI (.ci/run) installs promtool and sets this: there the check
        // must run, not skip.
        if std::env::var_os("FLOODWALL_REQUIRE_PROMTOOL").is_some_and(|v| v == "1") {
            panic!("promtool is not installed (apt-get install -y prometheus), and FLOODWALL_REQUIRE_PROMTOOL=1");
        }
        eprintln!("promtool is not installed (apt-get install -y prometheus): skipped");
        return;
    };
    assert_ok(&check, "promtool check rules alerts.yaml");
    let test = promtool(&["test", "rules", "alerts_test.yaml"], &dir).expect("promtool");
    assert_ok(&test, "promtool test rules alerts_test.yaml");

    // Each dashboard query, with Grafana's variables filled in, as a
    // recording rule: promtool parses it as PromQL.
    let tmp = TempDir::new("promql");
    let rules: Vec<serde_json::Value> = dashboard_exprs(&dashboard())
        .into_iter()
        .enumerate()
        .map(|(i, (_, e))| {
            serde_json::json!({
                "record": format!("dashboard:query_{i}"),
                "expr": e.replace("$__rate_interval", "5m").replace("$__interval", "1m"),
            })
        })
        .collect();
    let file = serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] });
    // JSON is YAML.
    std::fs::write(tmp.path().join("dashboard.yaml"), file.to_string()).unwrap();
    let parsed = promtool(&["check", "rules", "dashboard.yaml"], tmp.path()).expect("promtool");
    assert_ok(&parsed, "promtool check rules (the dashboard's queries)");
}

// --------------------------------------------------- Kubernetes and Docker

async fn check(file: &Path) -> Output {
    let mut cmd = tokio::process::Command::new(bin());
    cmd.arg("check")
        .arg(file)
        .env("FLOODWALL_ADMIN_TOKEN", "e2e-token")
        .env("REDIS_URL", "redis://127.0.0.1:6379/0")
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .expect("check finishes within 10s")
        .expect("run floodwall check")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_policy_passes_check_and_is_the_configmaps() {
    let out = check(&repo("deploy/kubernetes/policy.yaml")).await;
    assert_ok(&out, "floodwall check deploy/kubernetes/policy.yaml");

    let cm = yaml("deploy/kubernetes/configmap.yaml");
    assert_eq!(str_at(&cm, &["kind"]), "ConfigMap");
    assert_eq!(
        str_at(&cm, &["data", "policy.yaml"]),
        read("deploy/kubernetes/policy.yaml"),
        "configmap.yaml's policy.yaml differs from deploy/kubernetes/policy.yaml; regenerate it (deploy/kubernetes/README.md)"
    );
}

/// The Dockerfile's exec-form instruction (`CMD [...]`) as a list.
fn dockerfile_exec(dockerfile: &str, instruction: &str) -> Vec<String> {
    let line = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix(instruction).map(str::trim))
        .unwrap_or_else(|| panic!("no {instruction} in the Dockerfile"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{instruction} {line}: {e}"))
}

fn strings(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dockerfile_flags_are_the_binarys() {
    let dockerfile = read("Dockerfile");
    assert_eq!(dockerfile_exec(&dockerfile, "ENTRYPOINT"), ["floodwall"]);
    let cmd = dockerfile_exec(&dockerfile, "CMD");
    assert_eq!(cmd[0], "run");

    let run_help = tokio::process::Command::new(bin())
        .args(["run", "--help"])
        .output()
        .await
        .unwrap();
    assert_ok(&run_help, "floodwall run --help");
    let help = String::from_utf8_lossy(&run_help.stdout);
    for flag in cmd.iter().filter(|a| a.starts_with("--")) {
        assert!(
            help.contains(flag.as_str()),
            "`floodwall run` has no {flag}:\n{help}"
        );
    }
    for flag in ["--config", "--log-format"] {
        assert!(cmd.iter().any(|a| a == flag), "the CMD passes {flag}");
    }
    let log_format = cmd
        .iter()
        .skip_while(|a| *a != "--log-format")
        .nth(1)
        .expect("a --log-format value");
    assert!(help.contains("json"), "json is a log format:\n{help}");
    assert_eq!(log_format, "json");

    let probe = tokio::process::Command::new(bin())
        .args(["probe", "--help"])
        .output()
        .await
        .unwrap();
    assert_ok(&probe, "floodwall probe --help");
    // The HEALTHCHECK runs `floodwall probe <the admin listener's /health/live>`.
    let health = dockerfile
        .lines()
        .find(|l| l.trim_start().starts_with("CMD [\"floodwall\", \"probe\""))
        .expect("HEALTHCHECK CMD floodwall probe");
    assert!(health.contains(":9090/health/live"), "{health}");
}

#[test]
fn the_deployment_runs_the_dockerfile_command_with_probes_secret_and_policy() {
    let docs = yaml_docs("deploy/kubernetes/deployment.yaml");
    let dep = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    let pod = s(dep, &["spec", "template"]);
    let policy = yaml("deploy/kubernetes/policy.yaml");
    let containers = pod["spec"]["containers"].as_sequence().expect("containers");
    let fw = containers
        .iter()
        .find(|c| c["name"] == "floodwall")
        .expect("a floodwall container");
    let app = containers
        .iter()
        .find(|c| c["name"] == "app")
        .expect("an app container");
    assert_eq!(str_at(app, &["image"]), "ghcr.io/example/app:latest");

    // The Dockerfile's CMD, and the policy path it names is the mounted one.
    let cmd = dockerfile_exec(&read("Dockerfile"), "CMD");
    assert_eq!(strings(&fw["args"]), cmd);
    let config = cmd
        .iter()
        .skip_while(|a| *a != "--config")
        .nth(1)
        .expect("--config value");
    let mount = fw["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| config.starts_with(&format!("{}/", str_at(m, &["mountPath"]))))
        .expect("the policy's directory is mounted");
    assert!(
        mount["subPath"].is_null(),
        "a subPath mount never sees ConfigMap updates"
    );
    assert_eq!(str_at(mount, &["mountPath"]), "/etc/floodwall");
    let volume = pod["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(str_at(volume, &["configMap", "name"]), "floodwall-policy");
    let cm = yaml("deploy/kubernetes/configmap.yaml");
    assert_eq!(str_at(&cm, &["metadata", "name"]), "floodwall-policy");

    // Admin listener on 0.0.0.0:9090; probes, scrape annotations and ports agree.
    assert_eq!(
        str_at(&policy, &["server", "admin", "listen"]),
        "0.0.0.0:9090"
    );
    let ports: HashMap<String, u64> = fw["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                str_at(p, &["name"]).to_string(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports.get("admin"), Some(&9090));
    assert_eq!(ports.get("proxy"), Some(&8080));
    for (probe, path) in [
        ("livenessProbe", "/health/live"),
        ("readinessProbe", "/health/ready"),
        ("startupProbe", "/health/startup"),
    ] {
        assert_eq!(str_at(fw, &[probe, "httpGet", "path"]), path, "{probe}");
        assert_eq!(str_at(fw, &[probe, "httpGet", "port"]), "admin", "{probe}");
    }
    let ann = &pod["metadata"]["annotations"];
    assert_eq!(str_at(ann, &["prometheus.io/scrape"]), "true");
    assert_eq!(str_at(ann, &["prometheus.io/port"]), "9090");
    assert_eq!(str_at(ann, &["prometheus.io/path"]), "/metrics");
    for kind in ["requests", "limits"] {
        assert!(
            fw["resources"][kind]["memory"].is_string(),
            "floodwall {kind}.memory"
        );
    }
    assert!(fw["resources"]["requests"]["cpu"].is_string());

    // The environment the policy's *_env fields name.
    let env: HashMap<&str, &Yaml> = fw["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| (str_at(e, &["name"]), e))
        .collect();
    let token_env = str_at(&policy, &["server", "admin", "token_env"]);
    let token = env.get(token_env).expect("the admin token variable");
    assert!(
        token["valueFrom"]["secretKeyRef"]["name"].is_string(),
        "the admin token comes from a Secret"
    );
    let secret = yaml("deploy/kubernetes/secret.example.yaml");
    assert_eq!(
        token["valueFrom"]["secretKeyRef"]["name"],
        secret["metadata"]["name"]
    );
    let key = str_at(token, &["valueFrom", "secretKeyRef", "key"]);
    assert!(
        secret["stringData"][key].is_string(),
        "the Secret has `{key}`"
    );
    let url_env = str_at(&policy, &["store", "redis", "url_env"]);
    let redis_url = str_at(env.get(url_env).expect("REDIS_URL"), &["value"]);
    let redis_svc = yaml_docs("deploy/kubernetes/redis.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Service")
        .expect("a Redis Service");
    let host = format!("redis://{}:", str_at(&redis_svc, &["metadata", "name"]));
    assert!(
        redis_url.starts_with(&host),
        "{redis_url} is not the Service {host}"
    );

    // The pod outlives floodwall's drain: preStop + grace_period + Pingora's 5 s.
    let grace: u64 = str_at(&policy, &["server", "grace_period"])
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .expect("grace_period in whole seconds");
    let pre_stop: u64 = strings(&fw["lifecycle"]["preStop"]["exec"]["command"])
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let termination = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        termination > pre_stop + grace + 5,
        "terminationGracePeriodSeconds {termination} <= preStop {pre_stop} + grace {grace} + 5"
    );

    // The Service sends clients to floodwall, not to the app.
    let svc = yaml("deploy/kubernetes/service.yaml");
    let targets: Vec<&str> = svc["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["targetPort"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(targets, ["proxy"]);

    // The ingress backend is the app container.
    let endpoints = strings(&policy["backends"]["app"]["endpoints"]);
    assert_eq!(endpoints, ["http://127.0.0.1:8000"]);
    assert!(app["ports"][0]["containerPort"].as_u64() == Some(8000));

    let hpa = yaml("deploy/kubernetes/hpa.yaml");
    assert_eq!(hpa["spec"]["minReplicas"].as_u64(), Some(2));
    assert_eq!(hpa["spec"]["maxReplicas"].as_u64(), Some(10));
    assert_eq!(
        str_at(&hpa, &["spec", "scaleTargetRef", "name"]),
        str_at(dep, &["metadata", "name"])
    );
    assert_eq!(
        policy["store"]["redis"]["expected_replicas"].as_u64(),
        hpa["spec"]["minReplicas"].as_u64(),
        "expected_replicas follows the HPA minimum"
    );
}
