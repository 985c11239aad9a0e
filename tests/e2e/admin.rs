//! The admin listener: Prometheus metrics, health probes, status, and the
//! bearer token on /admin/*.

use std::collections::{BTreeMap, HashMap};

use crate::common::*;

// ------------------------------------------------------------ a strict exposition parser

#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: bool,
    samples: Vec<Sample>,
}

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn valid_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    let first_ok = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
    chars.next().is_some_and(first_ok) && chars.all(|c| first_ok(c) || c.is_ascii_digit())
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("bad value `{s}`")),
    }
}

fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without `=`")?;
        let name = &rest[..eq];
        if !valid_name(name, false) {
            return Err(format!("bad label name `{name}`"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    'n' => value.push('\n'),
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    c => return Err(format!("bad escape `\\{c}`")),
                },
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label `{name}` repeated"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("expected `,` or `}` after a label".into());
        }
    }
}

/// Parse the text format strictly: every sample belongs to a family with a
/// TYPE and HELP seen before it; histograms are checked for cumulative
/// buckets ending in `+Inf` that agree with `_count`.
fn parse_exposition(text: &str) -> Result<HashMap<String, Family>, String> {
    let mut fams: HashMap<String, Family> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            if !valid_name(name, true) {
                return Err(at("bad HELP name".into()));
            }
            let fam = fams.entry(name.to_string()).or_default();
            if fam.help {
                return Err(at("second HELP".into()));
            }
            fam.help = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| at("TYPE without a type".into()))?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at(format!("unknown type `{kind}`")));
            }
            let fam = fams.entry(name.to_string()).or_default();
            if !fam.kind.is_empty() || !fam.samples.is_empty() {
                return Err(at("TYPE repeated or after samples".into()));
            }
            fam.kind = kind.to_string();
            continue;
        }
        if line.starts_with('#') {
            return Err(at("unexpected comment".into()));
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name, true) {
            return Err(at("bad metric name".into()));
        }
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(r) => parse_labels(r).map_err(at)?,
            None => (BTreeMap::new(), &line[name_end..]),
        };
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("no space before the value".into()))?;
        let mut parts = rest.split(' ');
        let value = parse_value(parts.next().unwrap_or("")).map_err(at)?;
        if let Some(ts) = parts.next() {
            ts.parse::<i64>().map_err(|_| at("bad timestamp".into()))?;
        }
        if parts.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        let family = [
            name,
            name.strip_suffix("_bucket").unwrap_or(name),
            name.strip_suffix("_sum").unwrap_or(name),
            name.strip_suffix("_count").unwrap_or(name),
        ]
        .into_iter()
        .find(|f| {
            fams.get(*f).is_some_and(|fam| {
                let suffixed = *f != name;
                !fam.kind.is_empty()
                    && (!suffixed || fam.kind == "histogram" || fam.kind == "summary")
            })
        })
        .ok_or_else(|| at("sample without a TYPE".into()))?
        .to_string();
        let fam = fams.get_mut(&family).unwrap();
        if !fam.help {
            return Err(at("sample without a HELP".into()));
        }
        fam.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    for (name, fam) in &fams {
        if fam.kind.is_empty() {
            return Err(format!("{name}: HELP without TYPE"));
        }
        if fam.kind == "histogram" {
            check_histogram(name, fam)?;
        }
    }
    Ok(fams)
}

fn check_histogram(name: &str, fam: &Family) -> Result<(), String> {
    let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts: BTreeMap<BTreeMap<String, String>, f64> = BTreeMap::new();
    for s in &fam.samples {
        if s.name == format!("{name}_bucket") {
            let mut key = s.labels.clone();
            let le = key
                .remove("le")
                .ok_or_else(|| format!("{name}: bucket without `le`"))?;
            series
                .entry(key)
                .or_default()
                .push((parse_value(&le)?, s.value));
        } else if s.name == format!("{name}_count") {
            counts.insert(s.labels.clone(), s.value);
        } else if s.name != format!("{name}_sum") {
            return Err(format!("{name}: unexpected sample {}", s.name));
        }
    }
    for (labels, buckets) in &series {
        let les: Vec<f64> = buckets.iter().map(|b| b.0).collect();
        if les.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("{name}{labels:?}: `le` not increasing: {les:?}"));
        }
        if buckets.windows(2).any(|w| w[0].1 > w[1].1) {
            return Err(format!(
                "{name}{labels:?}: buckets not cumulative: {buckets:?}"
            ));
        }
        let last = buckets.last().unwrap();
        if last.0 != f64::INFINITY {
            return Err(format!("{name}{labels:?}: last bucket is not +Inf"));
        }
        if counts.get(labels) != Some(&last.1) {
            return Err(format!(
                "{name}{labels:?}: _count differs from the +Inf bucket"
            ));
        }
    }
    Ok(())
}

#[test]
fn the_exposition_parser_rejects_what_it_should() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 2\n";
    assert!(parse_exposition(ok).is_ok());
    for bad in [
        "a_total 1\n",
        "# TYPE a_total counter\na_total 1\n",
        "# HELP a_total A.\n# TYPE a_total counter\na_total{x=1} 1\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"2\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 2\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }
}

// ------------------------------------------------------------ the endpoints

const ROUTE_ALL: &str = "  - name: all\n    match: { path_prefix: /v1/ }\n    backend: main\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_prometheus_text_with_request_series() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(&mock_url(&mock), ROUTE_ALL)).await;
    let client = Client::new();
    assert_eq!(client.get(fw.addr, "/v1/models").await.status, 200);
    assert_eq!(client.get(fw.addr, "/nowhere").await.status, 404);

    let text = fw
        .wait_metrics("the request histogram", |m| {
            m.contains("floodwall_request_duration_seconds_count{method=\"GET\",route=\"all\",status=\"200\"}")
        })
        .await;
    let fams = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));

    let hist = &fams["floodwall_request_duration_seconds"];
    assert_eq!(hist.kind, "histogram");
    let want = |route: &str, status: &str| {
        hist.samples.iter().any(|s| {
            s.name == "floodwall_request_duration_seconds_count"
                && s.labels.get("route").map(String::as_str) == Some(route)
                && s.labels.get("method").map(String::as_str) == Some("GET")
                && s.labels.get("status").map(String::as_str) == Some(status)
                && s.value >= 1.0
        })
    };
    assert!(want("all", "200"), "{text}");
    assert!(want("unmatched", "404"), "{text}");

    let local = &fams["floodwall_local_responses_total"];
    assert_eq!(local.kind, "counter");
    assert!(local
        .samples
        .iter()
        .any(|s| s.labels.get("reason").map(String::as_str) == Some("no_route") && s.value == 1.0));

    let rss = &fams["process_resident_memory_bytes"];
    assert_eq!(rss.kind, "gauge");
    assert!(rss.samples[0].value > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_answer_200_once_started() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(&mock_url(&mock), ROUTE_ALL)).await;
    let client = Client::new();
    assert_eq!(client.get(fw.admin, "/health/live").await.status, 200);
    let ready = client.get(fw.admin, "/health/ready").await;
    assert_eq!(ready.status, 200);
    assert_eq!(
        ready
            .header("content-type")
            .map(|c| c.starts_with("application/json")),
        Some(true)
    );
    let v = ready.json();
    assert_eq!(v["status"], "ready");
    assert_eq!(v["config_loaded"], true);
    assert_eq!(v["listeners_bound"], true);
    assert_eq!(client.get(fw.admin, "/health/startup").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_status_lists_routes_and_backends() {
    let mock = start_mock().await;
    let fw = Floodwall::start(&policy(&mock_url(&mock), ROUTE_ALL)).await;
    let r = Client::new().get(fw.admin, "/admin/status").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let routes: Vec<&str> = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(routes, ["all"], "{v}");
    let backends = v["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 1, "{v}");
    assert_eq!(backends[0]["name"], "main");
    assert_eq!(backends[0]["endpoints"][0], mock_url(&mock));
    assert_eq!(v["config"]["path"], fw.config.display().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_admin_paths_but_not_metrics() {
    let mock = start_mock().await;
    let p = format!(
        r#"version: 1
server:
  listen: ["127.0.0.1:0"]
  admin: {{ listen: "127.0.0.1:0", token_env: FW_E2E_ADMIN_TOKEN }}
  threads: 2
backends:
  main:
    endpoints: ["{}"]
routes:
{ROUTE_ALL}"#,
        mock_url(&mock)
    );
    let fw = Floodwall::start_with_env(&p, &[("FW_E2E_ADMIN_TOKEN", "s3cret-token")]).await;
    let client = Client::new();

    let missing = client.get(fw.admin, "/admin/status").await;
    missing.assert_floodwall_error(401, "admin_unauthorized");
    let wrong = client
        .send(
            fw.admin,
            "GET",
            "/admin/status",
            &[("authorization", "Bearer nope")],
            b"",
        )
        .await;
    wrong.assert_floodwall_error(401, "admin_unauthorized");
    let good = client
        .send(
            fw.admin,
            "GET",
            "/admin/status",
            &[("authorization", "Bearer s3cret-token")],
            b"",
        )
        .await;
    assert_eq!(good.status, 200);
    assert_eq!(good.json()["admin"]["auth_required"], true);
    assert!(
        !good.text().contains("s3cret-token"),
        "the token is never shown"
    );

    assert_eq!(client.get(fw.admin, "/metrics").await.status, 200);
    assert_eq!(client.get(fw.admin, "/health/ready").await.status, 200);
}
