//! Prometheus metrics: one registry per [`Metrics`], rendered by the admin
//! listener's `/metrics` in the text exposition format (version 0.0.4).
//!
//! The family names below are a compatibility contract: dashboards and alerts
//! depend on them, so a unit test pins every one. Rename only with a
//! changelog entry.
//!
//! | family | type | labels |
//! |---|---|---|
//! | `floodwall_request_duration_seconds` | histogram | route, method, status |
//! | `floodwall_requests_active` | gauge | route |
//! | `floodwall_upstream_duration_seconds` | histogram (to response headers) | backend |
//! | `floodwall_upstream_attempts_total` | counter | backend, outcome |
//! | `floodwall_request_bytes_total` | counter | route |
//! | `floodwall_response_bytes_total` | counter | route |
//! | `floodwall_local_responses_total` | counter | reason |
//! | `floodwall_config_reloads_total` | counter | result |
//! | `floodwall_config_last_reload_timestamp_seconds` | gauge | |
//! | `floodwall_config_info` | gauge (= 1) | hash |
//! | `floodwall_build_info` | gauge (= 1) | version |
//!
//! On Linux the registry also holds the standard `process_*` families
//! (resident memory, CPU seconds, open file descriptors, threads).
//!
//! # Label cardinality
//!
//! Every label value must come from a small set fixed by the configuration or
//! by the code, never from the request. A label value that a client controls
//! lets that client create unbounded time series and exhaust the process's
//! memory and the Prometheus server's.
//!
//! - `route`: the configured route name, or [`UNMATCHED_ROUTE`] when no route
//!   matched. Never the raw path, a user id, a model name or a header value.
//! - `backend`: the configured backend name. Never an endpoint URL.
//! - `method`: normalised here to one of nine values (see [`method_label`]).
//! - `status`: the numeric code, 100..=999, or `0` when no response was sent.
//! - `outcome`: normalised here to one of [`UpstreamOutcome`]'s labels.
//! - `reason`: a constant from floodwall's local-response reasons
//!   (the same string as the `x-floodwall-reason` header). Callers must pass a
//!   `&'static`-like constant, not text built from the request.
//! - `result`: `ok` or `error`.
//! - `hash`: the SHA-256 of the current policy file; only the current one is
//!   kept.
//!
//! # Cost on the hot path
//!
//! Resolving a labelled child by its label values hashes them, takes the
//! family's read lock and clones the child: four atomic operations on memory
//! that every worker thread writes. The request path does it once per route
//! and per backend instead: [`RouteMetrics`] and [`BackendMetrics`] keep the
//! children a route's (a backend's) requests update, resolved on first use,
//! in the runtime built for each loaded configuration. The helpers that take
//! a route or backend name (the unmatched route, local responses, tests)
//! still resolve each time. Nothing allocates once a label combination has
//! been seen. `active_request` returns a guard holding the resolved gauge,
//! so its `Drop` is a single atomic decrement.
//!
//! # Approximations
//!
//! Histogram buckets are fixed (5ms to 300s, sized for LLM calls that can
//! stream for minutes); quantiles computed from them are only as precise as
//! the bucket edges.

use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::core::Collector;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The `route` label when no configured route matched the request.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The content type of [`Metrics::render`]'s output.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Bucket upper bounds (seconds) shared by both duration histograms.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// The pinned family names, in one place for the test and for docs.
pub mod names {
    pub const REQUEST_DURATION: &str = "floodwall_request_duration_seconds";
    pub const REQUESTS_ACTIVE: &str = "floodwall_requests_active";
    pub const UPSTREAM_DURATION: &str = "floodwall_upstream_duration_seconds";
    pub const UPSTREAM_ATTEMPTS: &str = "floodwall_upstream_attempts_total";
    pub const REQUEST_BYTES: &str = "floodwall_request_bytes_total";
    pub const RESPONSE_BYTES: &str = "floodwall_response_bytes_total";
    pub const LOCAL_RESPONSES: &str = "floodwall_local_responses_total";
    pub const CONFIG_RELOADS: &str = "floodwall_config_reloads_total";
    pub const CONFIG_LAST_RELOAD: &str = "floodwall_config_last_reload_timestamp_seconds";
    pub const CONFIG_INFO: &str = "floodwall_config_info";
    pub const BUILD_INFO: &str = "floodwall_build_info";
}

/// How one attempt to reach a backend ended; the `outcome` label of
/// `floodwall_upstream_attempts_total`. Declared in [`UpstreamOutcome::ALL`]'s
/// order, so that `outcome as usize` indexes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UpstreamOutcome {
    /// Response headers arrived (whatever their status).
    Ok,
    /// The TCP or TLS connection could not be established.
    ConnectError,
    /// A connect or response-headers timeout fired.
    Timeout,
    /// The connection was reset or closed before response headers.
    Reset,
    /// Anything else.
    #[default]
    Error,
}

// `outcome as usize` indexes `UpstreamOutcome::ALL` (checked when compiling).
const _: () = {
    let mut i = 0;
    while i < UpstreamOutcome::ALL.len() {
        assert!(UpstreamOutcome::ALL[i] as usize == i);
        i += 1;
    }
};

impl UpstreamOutcome {
    pub const ALL: [UpstreamOutcome; 5] = [
        UpstreamOutcome::Ok,
        UpstreamOutcome::ConnectError,
        UpstreamOutcome::Timeout,
        UpstreamOutcome::Reset,
        UpstreamOutcome::Error,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            UpstreamOutcome::Ok => "ok",
            UpstreamOutcome::ConnectError => "connect_error",
            UpstreamOutcome::Timeout => "timeout",
            UpstreamOutcome::Reset => "reset",
            UpstreamOutcome::Error => "error",
        }
    }

    /// Normalises a label string; anything unknown counts as `error`.
    pub fn from_label(s: &str) -> UpstreamOutcome {
        match s {
            "ok" => UpstreamOutcome::Ok,
            "connect_error" => UpstreamOutcome::ConnectError,
            "timeout" => UpstreamOutcome::Timeout,
            "reset" => UpstreamOutcome::Reset,
            _ => UpstreamOutcome::Error,
        }
    }
}

/// The bounded `method` label: the seven common methods, else `OTHER`.
pub fn method_label(method: &http::Method) -> &'static str {
    method_label_str(method.as_str())
}

/// Every value of the `method` label; `OTHER` last.
const METHOD_LABELS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "OTHER",
];

/// The index of `method`'s label in [`METHOD_LABELS`].
fn method_index(method: &str) -> usize {
    METHOD_LABELS
        .iter()
        .position(|m| *m == method)
        .unwrap_or(METHOD_LABELS.len() - 1)
}

fn method_label_str(method: &str) -> &'static str {
    METHOD_LABELS[method_index(method)]
}

const fn status_table() -> [[u8; 3]; 1000] {
    let mut table = [[b'0'; 3]; 1000];
    let mut i = 0;
    while i < 1000 {
        table[i] = [
            b'0' + (i / 100) as u8,
            b'0' + (i / 10 % 10) as u8,
            b'0' + (i % 10) as u8,
        ];
        i += 1;
    }
    table
}

static STATUS_DIGITS: [[u8; 3]; 1000] = status_table();

/// The `status` label for a code without allocating: the three digits for
/// 100..=999, else `0` (no response was sent).
pub fn status_label(code: u16) -> &'static str {
    if !(100..=999).contains(&code) {
        return "0";
    }
    STATUS_DIGITS
        .get(usize::from(code))
        .and_then(|digits| std::str::from_utf8(digits).ok())
        .unwrap_or("0")
}

/// The metric families, built together so that one failure disables them
/// all rather than leaving a half-registered set.
struct Families {
    request_duration: HistogramVec,
    requests_active: IntGaugeVec,
    upstream_duration: HistogramVec,
    upstream_attempts: IntCounterVec,
    request_bytes: IntCounterVec,
    response_bytes: IntCounterVec,
    local_responses: IntCounterVec,
    config_reloads: IntCounterVec,
    config_last_reload: Gauge,
    config_info: IntGaugeVec,
    build_info: IntGaugeVec,
}

impl Families {
    fn new() -> prometheus::Result<Families> {
        let buckets = DURATION_BUCKETS.to_vec();
        Ok(Families {
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    names::REQUEST_DURATION,
                    "Time from request start to the end of the response, by route, method and status.",
                )
                .buckets(buckets.clone()),
                &["route", "method", "status"],
            )?,
            requests_active: IntGaugeVec::new(
                Opts::new(names::REQUESTS_ACTIVE, "Requests currently in flight, by route."),
                &["route"],
            )?,
            upstream_duration: HistogramVec::new(
                HistogramOpts::new(
                    names::UPSTREAM_DURATION,
                    "Time from sending a request to a backend to receiving its response headers.",
                )
                .buckets(buckets),
                &["backend"],
            )?,
            upstream_attempts: IntCounterVec::new(
                Opts::new(
                    names::UPSTREAM_ATTEMPTS,
                    "Attempts to reach a backend, by how they ended (ok, connect_error, timeout, reset, error).",
                ),
                &["backend", "outcome"],
            )?,
            request_bytes: IntCounterVec::new(
                Opts::new(names::REQUEST_BYTES, "Request body bytes received from clients, by route."),
                &["route"],
            )?,
            response_bytes: IntCounterVec::new(
                Opts::new(names::RESPONSE_BYTES, "Response body bytes sent to clients, by route."),
                &["route"],
            )?,
            local_responses: IntCounterVec::new(
                Opts::new(
                    names::LOCAL_RESPONSES,
                    "Responses floodwall generated itself instead of proxying, by reason.",
                ),
                &["reason"],
            )?,
            config_reloads: IntCounterVec::new(
                Opts::new(names::CONFIG_RELOADS, "Policy file reloads, by result (ok, error)."),
                &["result"],
            )?,
            config_last_reload: Gauge::with_opts(Opts::new(
                names::CONFIG_LAST_RELOAD,
                "Unix time at which the current policy file was loaded.",
            ))?,
            config_info: IntGaugeVec::new(
                Opts::new(names::CONFIG_INFO, "Always 1; the hash label is the SHA-256 of the current policy file."),
                &["hash"],
            )?,
            build_info: IntGaugeVec::new(
                Opts::new(names::BUILD_INFO, "Always 1; the version label is floodwall's version."),
                &["version"],
            )?,
        })
    }

    fn collectors(&self) -> Vec<(&'static str, Box<dyn Collector>)> {
        vec![
            (
                names::REQUEST_DURATION,
                Box::new(self.request_duration.clone()),
            ),
            (
                names::REQUESTS_ACTIVE,
                Box::new(self.requests_active.clone()),
            ),
            (
                names::UPSTREAM_DURATION,
                Box::new(self.upstream_duration.clone()),
            ),
            (
                names::UPSTREAM_ATTEMPTS,
                Box::new(self.upstream_attempts.clone()),
            ),
            (names::REQUEST_BYTES, Box::new(self.request_bytes.clone())),
            (names::RESPONSE_BYTES, Box::new(self.response_bytes.clone())),
            (
                names::LOCAL_RESPONSES,
                Box::new(self.local_responses.clone()),
            ),
            (names::CONFIG_RELOADS, Box::new(self.config_reloads.clone())),
            (
                names::CONFIG_LAST_RELOAD,
                Box::new(self.config_last_reload.clone()),
            ),
            (names::CONFIG_INFO, Box::new(self.config_info.clone())),
            (names::BUILD_INFO, Box::new(self.build_info.clone())),
        ]
    }
}

/// floodwall's metrics: a private registry and typed helpers to update it.
///
/// Lives in [`crate::state::Shared`]; the proxy and the reloader update it,
/// the admin listener renders it.
pub struct Metrics {
    registry: Registry,
    /// `None` only if the families could not be built, which fixed names make
    /// impossible in practice (a unit test checks it); then every helper is a
    /// no-op and `/metrics` shows only the process families.
    families: Option<Families>,
    /// The hash currently exported by `floodwall_config_info`.
    config_hash: Mutex<Option<String>>,
}

/// Keeps `floodwall_requests_active{route}` incremented while alive.
///
/// Hold it in the request context; dropping it (request end, cancellation
/// or client disconnect) decrements the gauge.
#[must_use = "the active-request gauge is decremented as soon as the guard is dropped"]
pub struct ActiveGuard {
    gauge: Option<IntGauge>,
}

impl ActiveGuard {
    /// Increments `gauge` now; the guard decrements it when dropped.
    fn hold(gauge: Option<IntGauge>) -> ActiveGuard {
        if let Some(g) = &gauge {
            g.inc();
        }
        ActiveGuard { gauge }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(gauge) = &self.gauge {
            gauge.dec();
        }
    }
}

/// The labelled children that every request on one route updates, resolved
/// on the route's first request (see the module's "Cost on the hot path").
/// One per route in each loaded configuration's runtime
/// ([`crate::state::Active`]); pass it with the route's name to
/// [`Metrics::active_request_on`] and [`Metrics::finish_request_on`].
#[derive(Default)]
pub struct RouteMetrics(OnceLock<Option<RouteChildren>>);

struct RouteChildren {
    route: Box<str>,
    requests_active: IntGauge,
    request_bytes: IntCounter,
    response_bytes: IntCounter,
    /// `request_duration_seconds{route, method, status="200"}` by
    /// [`method_index`], resolved when first observed (so that the series
    /// appear as they did before); other statuses are looked up.
    duration_200: [OnceLock<Histogram>; METHOD_LABELS.len()],
}

/// [`RouteMetrics`] for a backend: its attempts by outcome and its time to
/// response headers, each resolved when first used. One per backend in each
/// configuration's runtime; see [`Metrics::observe_upstream_on`].
#[derive(Default)]
pub struct BackendMetrics(OnceLock<BackendChildren>);

struct BackendChildren {
    backend: Box<str>,
    /// By `UpstreamOutcome as usize`.
    attempts: [OnceLock<IntCounter>; UpstreamOutcome::ALL.len()],
    duration: OnceLock<Histogram>,
}

/// `cell`'s value, resolved by `resolve` on first use; `None` (and another
/// try next time) when it fails.
fn cached<T>(cell: &OnceLock<T>, resolve: impl FnOnce() -> Option<T>) -> Option<&T> {
    match cell.get() {
        Some(v) => Some(v),
        None => {
            let v = resolve()?;
            Some(cell.get_or_init(|| v))
        }
    }
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteMetrics")
    }
}

impl std::fmt::Debug for BackendMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackendMetrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Builds and registers every family. Never panics: a failure is logged
    /// and leaves the affected families unexported.
    pub fn new() -> Metrics {
        let registry = Registry::new();

        #[cfg(target_os = "linux")]
        if let Err(e) = registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )) {
            tracing::warn!(error = %e, "cannot register the process metrics collector");
        }

        let families = match Families::new() {
            Ok(families) => Some(families),
            Err(e) => {
                tracing::error!(error = %e, "cannot build floodwall's metric families; metrics are disabled");
                None
            }
        };
        if let Some(f) = &families {
            for (name, collector) in f.collectors() {
                if let Err(e) = registry.register(collector) {
                    tracing::error!(metric = name, error = %e, "cannot register metric family");
                }
            }
            if let Ok(g) = f
                .build_info
                .get_metric_with_label_values(&[env!("CARGO_PKG_VERSION")])
            {
                g.set(1);
            }
            // Export both results at 0 so `increase()` works from the first scrape.
            for result in ["ok", "error"] {
                let _ = f.config_reloads.get_metric_with_label_values(&[result]);
            }
        }

        Metrics {
            registry,
            families,
            config_hash: Mutex::new(None),
        }
    }

    /// The registry, for policies that export their own families. Follow
    /// the module's cardinality rules.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Everything in the registry, in the text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }

    /// One finished request: `route` is a route name or [`UNMATCHED_ROUTE`],
    /// `method` is normalised (see [`method_label`]), `status` 0 if no
    /// response was sent.
    pub fn observe_request(&self, route: &str, method: &str, status: u16, secs: f64) {
        let Some(f) = &self.families else { return };
        if let Ok(h) = f.request_duration.get_metric_with_label_values(&[
            route,
            method_label_str(method),
            status_label(status),
        ]) {
            h.observe(secs);
        }
    }

    /// Counts a request as in flight on `route` until the guard is dropped.
    pub fn active_request(&self, route: &str) -> ActiveGuard {
        ActiveGuard::hold(self.families.as_ref().and_then(|f| {
            f.requests_active
                .get_metric_with_label_values(&[route])
                .ok()
        }))
    }

    /// One attempt to reach `backend`. `outcome` is one of
    /// [`UpstreamOutcome`]'s labels (anything else counts as `error`);
    /// `secs` is the time to response headers, when they arrived.
    pub fn observe_upstream(&self, backend: &str, outcome: &str, secs: Option<f64>) {
        self.observe_upstream_outcome(backend, UpstreamOutcome::from_label(outcome), secs);
    }

    /// [`Metrics::observe_upstream`] with a typed outcome.
    pub fn observe_upstream_outcome(
        &self,
        backend: &str,
        outcome: UpstreamOutcome,
        secs: Option<f64>,
    ) {
        let Some(f) = &self.families else { return };
        if let Ok(c) = f
            .upstream_attempts
            .get_metric_with_label_values(&[backend, outcome.as_str()])
        {
            c.inc();
        }
        if let Some(secs) = secs {
            if let Ok(h) = f.upstream_duration.get_metric_with_label_values(&[backend]) {
                h.observe(secs);
            }
        }
    }

    fn route_children<'a>(&self, slot: &'a RouteMetrics, route: &str) -> Option<&'a RouteChildren> {
        slot.0
            .get_or_init(|| {
                let f = self.families.as_ref()?;
                Some(RouteChildren {
                    route: route.into(),
                    requests_active: f
                        .requests_active
                        .get_metric_with_label_values(&[route])
                        .ok()?,
                    request_bytes: f
                        .request_bytes
                        .get_metric_with_label_values(&[route])
                        .ok()?,
                    response_bytes: f
                        .response_bytes
                        .get_metric_with_label_values(&[route])
                        .ok()?,
                    duration_200: Default::default(),
                })
            })
            .as_ref()
    }

    /// [`Metrics::active_request`] for the route `slot` belongs to (`route`
    /// is its name, used on the first call only).
    pub fn active_request_on(&self, slot: &RouteMetrics, route: &str) -> ActiveGuard {
        ActiveGuard::hold(
            self.route_children(slot, route)
                .map(|c| c.requests_active.clone()),
        )
    }

    /// [`Metrics::observe_request`] and [`Metrics::add_bytes`] for the route
    /// `slot` belongs to.
    pub fn finish_request_on(
        &self,
        slot: &RouteMetrics,
        route: &str,
        method: &str,
        status: u16,
        secs: f64,
        bytes: (u64, u64),
    ) {
        let (Some(f), Some(c)) = (&self.families, self.route_children(slot, route)) else {
            return;
        };
        let m = method_index(method);
        let labels = [&*c.route, METHOD_LABELS[m], status_label(status)];
        let lookup = || {
            f.request_duration
                .get_metric_with_label_values(&labels)
                .ok()
        };
        let looked_up;
        let h = match status {
            200 => cached(&c.duration_200[m], lookup),
            _ => {
                looked_up = lookup();
                looked_up.as_ref()
            }
        };
        if let Some(h) = h {
            h.observe(secs);
        }
        c.request_bytes.inc_by(bytes.0);
        c.response_bytes.inc_by(bytes.1);
    }

    /// [`Metrics::observe_upstream_outcome`] for the backend `slot` belongs
    /// to (`backend` is its name, used on first use only).
    pub fn observe_upstream_on(
        &self,
        slot: &BackendMetrics,
        backend: &str,
        outcome: UpstreamOutcome,
        secs: Option<f64>,
    ) {
        let Some(f) = &self.families else { return };
        let c = slot.0.get_or_init(|| BackendChildren {
            backend: backend.into(),
            attempts: Default::default(),
            duration: OnceLock::new(),
        });
        if let Some(counter) = cached(&c.attempts[outcome as usize], || {
            f.upstream_attempts
                .get_metric_with_label_values(&[&c.backend, outcome.as_str()])
                .ok()
        }) {
            counter.inc();
        }
        let Some(secs) = secs else { return };
        if let Some(h) = cached(&c.duration, || {
            f.upstream_duration
                .get_metric_with_label_values(&[&c.backend])
                .ok()
        }) {
            h.observe(secs);
        }
    }

    /// Body bytes received from (`req`) and sent to (`resp`) the client.
    pub fn add_bytes(&self, route: &str, req: u64, resp: u64) {
        let Some(f) = &self.families else { return };
        if let Ok(c) = f.request_bytes.get_metric_with_label_values(&[route]) {
            c.inc_by(req);
        }
        if let Ok(c) = f.response_bytes.get_metric_with_label_values(&[route]) {
            c.inc_by(resp);
        }
    }

    /// A response floodwall made itself; `reason` is the constant also sent
    /// as `x-floodwall-reason`.
    pub fn local_response(&self, reason: &str) {
        let Some(f) = &self.families else { return };
        if let Ok(c) = f.local_responses.get_metric_with_label_values(&[reason]) {
            c.inc();
        }
    }

    /// `floodwall_local_responses_total` itself, for code that answers
    /// without a request context (the connection guards).
    pub fn local_responses(&self) -> Option<IntCounterVec> {
        self.families.as_ref().map(|f| f.local_responses.clone())
    }

    /// A reload attempt finished. On success the timestamp is set to now and,
    /// when `hash` is given, `floodwall_config_info` switches to it.
    pub fn config_reloaded(&self, ok: bool, hash: Option<&str>) {
        let Some(f) = &self.families else { return };
        let result = if ok { "ok" } else { "error" };
        if let Ok(c) = f.config_reloads.get_metric_with_label_values(&[result]) {
            c.inc();
        }
        if ok {
            f.config_last_reload.set(unix_now());
            if let Some(hash) = hash {
                self.set_config_hash(f, hash);
            }
        }
    }

    /// The policy file loaded at start-up: sets the info and timestamp
    /// gauges without counting a reload.
    pub fn config_loaded(&self, hash: &str) {
        let Some(f) = &self.families else { return };
        f.config_last_reload.set(unix_now());
        self.set_config_hash(f, hash);
    }

    /// Exports `hash` as the only `floodwall_config_info` series. The new
    /// series is set before the old one is removed, so a scrape in between
    /// sees two hashes rather than none.
    fn set_config_hash(&self, f: &Families, hash: &str) {
        let mut current = self
            .config_hash
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.as_deref() == Some(hash) {
            return;
        }
        if let Ok(g) = f.config_info.get_metric_with_label_values(&[hash]) {
            g.set(1);
        }
        if let Some(old) = current.take() {
            let _ = f.config_info.remove_label_values(&[old.as_str()]);
        }
        *current = Some(hash.to_owned());
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    /// One sample line: `name{labels} value`.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    #[derive(Debug, Default)]
    struct Family {
        help: Option<String>,
        kind: Option<String>,
        samples: Vec<Sample>,
    }

    /// A strict parser for the text exposition format, as much of it as
    /// floodwall emits: every line is a `# HELP`, a `# TYPE` or a sample;
    /// every family has both comments before its samples; every sample
    /// belongs to the family just declared; histograms are cumulative and end
    /// with `+Inf` equal to `_count`.
    fn parse(text: &str) -> Result<HashMap<String, Family>, String> {
        let mut families: HashMap<String, Family> = HashMap::new();
        let mut current: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let lineno = n + 1;
            if line.is_empty() {
                return Err(format!("line {lineno}: empty line"));
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let (keyword, rest) = rest
                    .split_once(' ')
                    .ok_or(format!("line {lineno}: bad comment"))?;
                let (name, arg) = rest
                    .split_once(' ')
                    .ok_or(format!("line {lineno}: comment without argument"))?;
                check_name(name).map_err(|e| format!("line {lineno}: {e}"))?;
                let fam = families.entry(name.to_owned()).or_default();
                if !fam.samples.is_empty() {
                    return Err(format!("line {lineno}: {name} comment after its samples"));
                }
                match keyword {
                    "HELP" => {
                        if fam.help.replace(arg.to_owned()).is_some() {
                            return Err(format!("line {lineno}: second HELP for {name}"));
                        }
                    }
                    "TYPE" => {
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg) {
                            return Err(format!("line {lineno}: bad type {arg}"));
                        }
                        if fam.kind.replace(arg.to_owned()).is_some() {
                            return Err(format!("line {lineno}: second TYPE for {name}"));
                        }
                    }
                    other => return Err(format!("line {lineno}: unknown comment {other}")),
                }
                current = Some(name.to_owned());
                continue;
            }
            if line.starts_with('#') {
                return Err(format!("line {lineno}: bad comment"));
            }
            let sample = parse_sample(line).map_err(|e| format!("line {lineno}: {e}"))?;
            let fam_name = current
                .clone()
                .ok_or(format!("line {lineno}: sample before any TYPE"))?;
            let fam = families
                .get_mut(&fam_name)
                .ok_or(format!("line {lineno}: unknown family"))?;
            let kind = fam.kind.clone().ok_or(format!("line {lineno}: no TYPE"))?;
            let allowed: Vec<String> = if kind == "histogram" {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{fam_name}{s}"))
                    .collect()
            } else {
                vec![fam_name.clone()]
            };
            if !allowed.contains(&sample.name) {
                return Err(format!(
                    "line {lineno}: sample {} outside family {fam_name}",
                    sample.name
                ));
            }
            fam.samples.push(sample);
        }
        for (name, fam) in &families {
            if fam.help.is_none() {
                return Err(format!("{name}: no HELP"));
            }
            if fam.kind.is_none() {
                return Err(format!("{name}: no TYPE"));
            }
            if fam.kind.as_deref() == Some("histogram") {
                check_histogram(name, fam)?;
            }
        }
        Ok(families)
    }

    fn check_name(name: &str) -> Result<(), String> {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
        if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            Ok(())
        } else {
            Err(format!("bad metric name {name:?}"))
        }
    }

    fn parse_sample(line: &str) -> Result<Sample, String> {
        let name_end = line
            .find(['{', ' '])
            .ok_or("sample without value".to_string())?;
        let name = &line[..name_end];
        check_name(name)?;
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(body) = rest.strip_prefix('{') {
            (labels, rest) = parse_labels(body)?;
        }
        let value = rest
            .strip_prefix(' ')
            .ok_or("no space before value".to_string())?;
        if value.contains(' ') {
            return Err("timestamps or trailing fields are not expected".into());
        }
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v
                .parse::<f64>()
                .map_err(|e| format!("bad value {v:?}: {e}"))?,
        };
        Ok(Sample {
            name: name.to_owned(),
            labels,
            value,
        })
    }

    /// Parses `a="x",b="y"}` (the part after `{`); returns the labels and
    /// the text after `}`.
    fn parse_labels(mut rest: &str) -> Result<(BTreeMap<String, String>, &str), String> {
        let mut labels = BTreeMap::new();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        loop {
            let eq = rest.find('=').ok_or("label without =")?;
            let name = &rest[..eq];
            check_name(name)?;
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value not quoted")?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let close = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        _ => return Err("bad escape in label value".into()),
                    },
                    Some((i, '"')) => break i,
                    Some((_, '\n')) => return Err("newline in label value".into()),
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                }
            };
            rest = &rest[close + 1..];
            if labels.insert(name.to_owned(), value).is_some() {
                return Err(format!("duplicate label {name}"));
            }
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if let Some(after) = rest.strip_prefix('}') {
                return Ok((labels, after));
            } else {
                return Err("expected , or } after a label".into());
            }
        }
    }

    fn check_histogram(name: &str, fam: &Family) -> Result<(), String> {
        // Group by label set without `le`.
        // Per series: (le, cumulative count) pairs and the `_count` value.
        type Series = (Vec<(f64, f64)>, Option<f64>);
        let mut series: BTreeMap<Vec<(String, String)>, Series> = BTreeMap::new();
        for s in &fam.samples {
            let mut key: Vec<(String, String)> = s
                .labels
                .iter()
                .filter(|(k, _)| k.as_str() != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            key.sort();
            let entry = series.entry(key).or_default();
            if s.name.ends_with("_bucket") {
                let le = s
                    .labels
                    .get("le")
                    .ok_or(format!("{name}: bucket without le"))?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse::<f64>()
                        .map_err(|e| format!("{name}: bad le {le}: {e}"))?
                };
                entry.0.push((le, s.value));
            } else if s.name.ends_with("_count") {
                entry.1 = Some(s.value);
            } else if s.labels.contains_key("le") {
                return Err(format!("{name}: le on {}", s.name));
            }
        }
        for (labels, (buckets, count)) in series {
            let last = buckets
                .last()
                .ok_or(format!("{name}{labels:?}: no buckets"))?;
            if last.0 != f64::INFINITY {
                return Err(format!("{name}{labels:?}: last bucket is not +Inf"));
            }
            for pair in buckets.windows(2) {
                if pair[1].0 <= pair[0].0 {
                    return Err(format!("{name}{labels:?}: le not increasing"));
                }
                if pair[1].1 < pair[0].1 {
                    return Err(format!("{name}{labels:?}: buckets not cumulative"));
                }
            }
            if Some(last.1) != count {
                return Err(format!("{name}{labels:?}: +Inf bucket != _count"));
            }
        }
        Ok(())
    }

    fn value(fams: &HashMap<String, Family>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let family = name
            .strip_suffix("_count")
            .filter(|f| fams.contains_key(*f))
            .unwrap_or(name);
        fams.get(family)?
            .samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    #[test]
    fn families_build_with_fixed_names() {
        assert!(Families::new().is_ok());
        assert!(Metrics::new().families.is_some());
    }

    #[test]
    fn render_is_valid_exposition_text_with_pinned_names() {
        let m = Metrics::new();
        m.observe_request("chat", "POST", 200, 0.3);
        m.observe_request("chat", "POST", 200, 45.0);
        m.observe_request(UNMATCHED_ROUTE, "BREW", 404, 0.001);
        let _guard = m.active_request("chat");
        m.observe_upstream("openai", "ok", Some(0.2));
        m.observe_upstream("openai", "timeout", None);
        m.add_bytes("chat", 120, 4096);
        m.local_response("rate_limited");
        m.config_reloaded(true, Some("abc123"));
        m.config_reloaded(false, None);

        let text = m.render();
        let fams = parse(&text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"));

        let pinned = [
            ("floodwall_request_duration_seconds", "histogram"),
            ("floodwall_requests_active", "gauge"),
            ("floodwall_upstream_duration_seconds", "histogram"),
            ("floodwall_upstream_attempts_total", "counter"),
            ("floodwall_request_bytes_total", "counter"),
            ("floodwall_response_bytes_total", "counter"),
            ("floodwall_local_responses_total", "counter"),
            ("floodwall_config_reloads_total", "counter"),
            ("floodwall_config_last_reload_timestamp_seconds", "gauge"),
            ("floodwall_config_info", "gauge"),
            ("floodwall_build_info", "gauge"),
        ];
        for (name, kind) in pinned {
            let fam = fams.get(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(fam.kind.as_deref(), Some(kind), "{name}");
            assert!(!fam.samples.is_empty(), "{name} has no samples");
        }
        #[cfg(target_os = "linux")]
        {
            assert!(fams.contains_key("process_resident_memory_bytes"));
            assert!(fams.contains_key("process_cpu_seconds_total"));
        }

        let chat = [("route", "chat"), ("method", "POST"), ("status", "200")];
        assert_eq!(
            value(&fams, "floodwall_request_duration_seconds_count", &chat),
            Some(2.0)
        );
        let other = [
            ("route", "unmatched"),
            ("method", "OTHER"),
            ("status", "404"),
        ];
        assert_eq!(
            value(&fams, "floodwall_request_duration_seconds_count", &other),
            Some(1.0)
        );
        assert_eq!(
            value(&fams, "floodwall_requests_active", &[("route", "chat")]),
            Some(1.0)
        );
        assert_eq!(
            value(
                &fams,
                "floodwall_upstream_attempts_total",
                &[("backend", "openai"), ("outcome", "timeout")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &fams,
                "floodwall_upstream_duration_seconds_count",
                &[("backend", "openai")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &fams,
                "floodwall_response_bytes_total",
                &[("route", "chat")]
            ),
            Some(4096.0)
        );
        assert_eq!(
            value(
                &fams,
                "floodwall_local_responses_total",
                &[("reason", "rate_limited")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &fams,
                "floodwall_config_reloads_total",
                &[("result", "error")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&fams, "floodwall_config_info", &[("hash", "abc123")]),
            Some(1.0)
        );
        assert_eq!(
            value(
                &fams,
                "floodwall_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            Some(1.0)
        );
        let ts = value(&fams, "floodwall_config_last_reload_timestamp_seconds", &[]);
        assert!(ts.is_some_and(|t| t > 1.6e9), "{ts:?}");
    }

    #[test]
    fn histogram_buckets_are_the_documented_ones() {
        let m = Metrics::new();
        m.observe_request("r", "GET", 200, 0.07);
        let fams = parse(&m.render()).unwrap_or_else(|e| panic!("{e}"));
        let les: Vec<String> = fams["floodwall_request_duration_seconds"]
            .samples
            .iter()
            .filter_map(|s| s.labels.get("le").cloned())
            .collect();
        let mut expected: Vec<String> = DURATION_BUCKETS.iter().map(|b| b.to_string()).collect();
        expected.push("+Inf".into());
        assert_eq!(les, expected);
        // 0.07 lands in the 0.1 bucket and every bucket above.
        let labels = [("route", "r"), ("method", "GET"), ("status", "200")];
        let bucket = |le: &str| {
            fams["floodwall_request_duration_seconds"]
                .samples
                .iter()
                .find(|s| {
                    s.name.ends_with("_bucket")
                        && s.labels.get("le").map(String::as_str) == Some(le)
                        && labels
                            .iter()
                            .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
                })
                .map(|s| s.value)
        };
        assert_eq!(bucket("0.05"), Some(0.0));
        assert_eq!(bucket("0.1"), Some(1.0));
        assert_eq!(bucket("+Inf"), Some(1.0));
    }

    #[test]
    fn active_guard_decrements_on_drop() {
        let m = Metrics::new();
        let a = m.active_request("chat");
        let b = m.active_request("chat");
        let gauge = |m: &Metrics| {
            let fams = parse(&m.render()).unwrap_or_else(|e| panic!("{e}"));
            value(&fams, "floodwall_requests_active", &[("route", "chat")])
        };
        assert_eq!(gauge(&m), Some(2.0));
        drop(a);
        assert_eq!(gauge(&m), Some(1.0));
        drop(b);
        assert_eq!(gauge(&m), Some(0.0));
    }

    /// The floodwall families of a render, without the process ones (whose
    /// values move by themselves).
    fn floodwall_text(m: &Metrics) -> String {
        let text = m.render();
        parse(&text).unwrap_or_else(|e| panic!("{e}"));
        text.lines()
            .filter(|l| l.contains("floodwall_") && !l.contains("floodwall_build_info"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn route_and_backend_handles_export_what_the_named_helpers_do() {
        // The same requests, once through the helpers that look the labels up
        // and once through the per-route and per-backend handles; a second
        // handle (a reloaded configuration) continues the same series.
        let named = Metrics::new();
        let handled = Metrics::new();
        let requests: [(&str, u16, f64, u64, u64); 4] = [
            ("POST", 200, 0.3, 120, 4096),
            ("POST", 200, 45.0, 10, 20),
            ("GET", 429, 0.001, 0, 90),
            ("BREW", 200, 0.02, 1, 2),
        ];
        let attempts = [
            (UpstreamOutcome::Ok, Some(0.2)),
            (UpstreamOutcome::Timeout, None),
            (UpstreamOutcome::Ok, Some(3.0)),
            (UpstreamOutcome::ConnectError, None),
        ];
        let (route1, route2) = (RouteMetrics::default(), RouteMetrics::default());
        let (backend1, backend2) = (BackendMetrics::default(), BackendMetrics::default());
        for (i, &(method, status, secs, bytes_in, bytes_out)) in requests.iter().enumerate() {
            let _a = named.active_request("chat");
            named.observe_request("chat", method, status, secs);
            named.add_bytes("chat", bytes_in, bytes_out);
            let slot = if i < 2 { &route1 } else { &route2 };
            let _b = handled.active_request_on(slot, "chat");
            handled.finish_request_on(slot, "chat", method, status, secs, (bytes_in, bytes_out));
        }
        let _held = (
            named.active_request("chat"),
            handled.active_request_on(&route2, "chat"),
        );
        for (i, &(outcome, secs)) in attempts.iter().enumerate() {
            named.observe_upstream_outcome("openai", outcome, secs);
            let slot = if i < 2 { &backend1 } else { &backend2 };
            handled.observe_upstream_on(slot, "openai", outcome, secs);
        }
        let text = floodwall_text(&handled);
        assert_eq!(text, floodwall_text(&named));
        // And the comparison is not vacuous.
        let fams = parse(&handled.render()).unwrap_or_else(|e| panic!("{e}"));
        let v = |name: &str, labels: &[(&str, &str)]| value(&fams, name, labels);
        assert_eq!(
            v("floodwall_requests_active", &[("route", "chat")]),
            Some(1.0)
        );
        assert_eq!(
            v("floodwall_request_bytes_total", &[("route", "chat")]),
            Some(131.0)
        );
        let post_ok = [("route", "chat"), ("method", "POST"), ("status", "200")];
        assert_eq!(
            v("floodwall_request_duration_seconds_count", &post_ok),
            Some(2.0)
        );
        let other_ok = [("route", "chat"), ("method", "OTHER"), ("status", "200")];
        assert_eq!(
            v("floodwall_request_duration_seconds_count", &other_ok),
            Some(1.0)
        );
        let ok = [("backend", "openai"), ("outcome", "ok")];
        assert_eq!(v("floodwall_upstream_attempts_total", &ok), Some(2.0));
        let reset = [("backend", "openai"), ("outcome", "reset")];
        assert_eq!(v("floodwall_upstream_attempts_total", &reset), None);
        assert_eq!(
            v(
                "floodwall_upstream_duration_seconds_count",
                &[("backend", "openai")]
            ),
            Some(2.0)
        );
    }

    #[test]
    fn config_info_keeps_only_the_current_hash() {
        let m = Metrics::new();
        m.config_loaded("first");
        m.config_reloaded(true, Some("second"));
        m.config_reloaded(false, Some("ignored_on_error"));
        let fams = parse(&m.render()).unwrap_or_else(|e| panic!("{e}"));
        let hashes: Vec<&str> = fams["floodwall_config_info"]
            .samples
            .iter()
            .filter_map(|s| s.labels.get("hash").map(String::as_str))
            .collect();
        assert_eq!(hashes, ["second"]);
        assert_eq!(
            value(&fams, "floodwall_config_reloads_total", &[("result", "ok")]),
            Some(1.0)
        );
    }

    #[test]
    fn reload_results_are_exported_at_zero_before_any_reload() {
        let m = Metrics::new();
        let fams = parse(&m.render()).unwrap_or_else(|e| panic!("{e}"));
        for result in ["ok", "error"] {
            assert_eq!(
                value(
                    &fams,
                    "floodwall_config_reloads_total",
                    &[("result", result)]
                ),
                Some(0.0)
            );
        }
    }

    #[test]
    fn method_label_is_bounded() {
        assert_eq!(method_label(&http::Method::GET), "GET");
        assert_eq!(method_label(&http::Method::OPTIONS), "OPTIONS");
        assert_eq!(method_label(&http::Method::CONNECT), "OTHER");
        assert_eq!(method_label(&http::Method::TRACE), "OTHER");
        let custom = http::Method::from_bytes(b"PURGE").unwrap_or(http::Method::GET);
        assert_eq!(method_label(&custom), "OTHER");
        assert_eq!(method_label_str("get"), "OTHER");
    }

    #[test]
    fn status_label_is_the_code_without_allocating() {
        assert_eq!(status_label(200), "200");
        assert_eq!(status_label(404), "404");
        assert_eq!(status_label(100), "100");
        assert_eq!(status_label(999), "999");
        assert_eq!(status_label(0), "0");
        assert_eq!(status_label(99), "0");
        assert_eq!(status_label(1000), "0");
        assert_eq!(status_label(u16::MAX), "0");
    }

    #[test]
    fn upstream_outcome_is_bounded() {
        for o in UpstreamOutcome::ALL {
            assert_eq!(UpstreamOutcome::from_label(o.as_str()), o);
        }
        assert_eq!(UpstreamOutcome::from_label("weird"), UpstreamOutcome::Error);
        let m = Metrics::new();
        m.observe_upstream("b", "something-unexpected", None);
        let fams = parse(&m.render()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            value(
                &fams,
                "floodwall_upstream_attempts_total",
                &[("backend", "b"), ("outcome", "error")]
            ),
            Some(1.0)
        );
    }

    #[test]
    fn parser_rejects_malformed_exposition() {
        assert!(parse("foo 1\n").is_err(), "no TYPE");
        assert!(parse("# TYPE foo counter\nfoo 1\n").is_err(), "no HELP");
        assert!(parse("# HELP foo h\n# TYPE foo counter\nfoo{a=\"b} 1\n").is_err());
        assert!(parse("# HELP foo h\n# TYPE foo counter\nbar 1\n").is_err());
        let not_cumulative = "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n";
        assert!(parse(not_cumulative).is_err());
        let no_inf = "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n";
        assert!(parse(no_inf).is_err());
        let ok = "# HELP h h\n# TYPE h histogram\nh_bucket{a=\"x\\\"y\",le=\"1\"} 1\nh_bucket{a=\"x\\\"y\",le=\"+Inf\"} 1\nh_sum{a=\"x\\\"y\"} 1\nh_count{a=\"x\\\"y\"} 1\n";
        assert!(parse(ok).is_ok(), "{:?}", parse(ok).err());
    }
}
