//! The admin listener: health probes, Prometheus metrics and a status dump,
//! on its own address (default `127.0.0.1:9090`), separate from proxy
//! traffic so probes and scrapes never queue behind client requests.
//!
//! | path | auth | answer |
//! |---|---|---|
//! | `GET /metrics` | open | Prometheus text format |
//! | `GET /health/live` | open | 200 while the process serves HTTP |
//! | `GET /health/ready` | open | 200 once the config is loaded and every proxy listener is bound, else 503 |
//! | `GET /health/startup` | open | 200 once start-up finished, else 503 |
//! | `GET /admin/status` | bearer token | version, uptime, config, routes, backends, plus registered [`StatusSection`]s |
//!
//! `HEAD` is accepted wherever `GET` is. Readiness deliberately ignores
//! Redis and backend health: they are reported in the body, but a replica
//! that takes itself out of the load balancer because a shared dependency is
//! down only moves the outage around. The policies' fallbacks handle those.
//!
//! `/admin/*` requires `Authorization: Bearer <token>` when the policy file
//! sets an admin token. The token is read from the current snapshot on every
//! request, so a reload rotates it, and compared in constant time (both
//! sides are hashed first, so the length does not leak either). Without a
//! configured token `/admin/*` is open, which is only sensible on loopback.
//!
//! The routing and auth logic is the pure [`AdminApp::handle`]; the Pingora
//! [`ServeHttp`] impl only extracts the request's method, path, query and
//! `Authorization` header and turns the answer into a response.

pub mod cache;
mod limits;
pub mod sections;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use http::header::{
    HeaderName, HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE,
    WWW_AUTHENTICATE,
};
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::{HttpServer, ServeHttp};
use pingora::protocols::http::ServerSession;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::config::{PathMatch, Route, Snapshot};
use crate::state::Shared;
use crate::telemetry::metrics::TEXT_CONTENT_TYPE;

/// The header naming why floodwall answered a request itself.
pub const REASON_HEADER: &str = "x-floodwall-reason";

const JSON_CONTENT_TYPE: &str = "application/json";

/// One extra top-level section of `/admin/status`, e.g. circuit-breaker or
/// rate-limit state added by a later policy.
///
/// `render` runs on the admin listener's thread for every status request, so
/// it should read shared state, not wait on I/O. `query` is the request's
/// raw query string, for sections that accept filters.
pub trait StatusSection: Send + Sync {
    /// The key in the status object. Built-in keys (`version`, `config`, ...)
    /// take precedence; a section with a clashing name is left out.
    fn name(&self) -> &'static str;
    fn render(&self, query: Option<&str>) -> Value;
}

/// What [`AdminApp::handle`] answers: independent of Pingora, for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminResponse {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Vec<u8>,
}

impl AdminResponse {
    fn new(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> AdminResponse {
        AdminResponse {
            status,
            headers: vec![
                (CONTENT_TYPE, HeaderValue::from_static(content_type)),
                (CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
            body,
        }
    }

    fn json(status: StatusCode, body: &Value) -> AdminResponse {
        AdminResponse::new(status, JSON_CONTENT_TYPE, body.to_string().into_bytes())
    }

    /// An OpenAI-style error with its `x-floodwall-reason` header.
    fn error(status: StatusCode, message: &str, kind: &str, code: &'static str) -> AdminResponse {
        let mut resp =
            AdminResponse::new(status, JSON_CONTENT_TYPE, error_body(message, kind, code));
        resp.headers.push((
            HeaderName::from_static(REASON_HEADER),
            HeaderValue::from_static(code),
        ));
        resp
    }

    fn with_header(mut self, name: HeaderName, value: &'static str) -> AdminResponse {
        self.headers.push((name, HeaderValue::from_static(value)));
        self
    }

    /// The first value of header `name`, if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.as_str().eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.to_str().ok())
    }

    /// The HTTP response; `head_only` drops the body but keeps its
    /// `Content-Length`, as `HEAD` requires.
    pub fn into_http(self, head_only: bool) -> Response<Vec<u8>> {
        let len = HeaderValue::from(self.body.len());
        let body = if head_only { Vec::new() } else { self.body };
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        let headers = resp.headers_mut();
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        headers.insert(CONTENT_LENGTH, len);
        resp
    }
}

/// The client-facing error envelope, `{"error":{"message","type","code"}}`,
/// so OpenAI SDKs surface it cleanly.
fn error_body(message: &str, kind: &str, code: &str) -> Vec<u8> {
    json!({ "error": { "message": message, "type": kind, "code": code } })
        .to_string()
        .into_bytes()
}

/// The endpoints the admin listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Metrics,
    Live,
    Ready,
    Startup,
    Status,
}

impl Endpoint {
    fn from_path(path: &str) -> Option<Endpoint> {
        match path {
            "/metrics" => Some(Endpoint::Metrics),
            "/health/live" => Some(Endpoint::Live),
            "/health/ready" => Some(Endpoint::Ready),
            "/health/startup" => Some(Endpoint::Startup),
            "/admin/status" => Some(Endpoint::Status),
            _ => None,
        }
    }
}

fn is_admin_path(path: &str) -> bool {
    path == "/admin" || path.starts_with("/admin/")
}

/// The admin listener's application.
pub struct AdminApp {
    shared: Arc<Shared>,
    sections: Vec<Arc<dyn StatusSection>>,
}

impl AdminApp {
    pub fn new(shared: Arc<Shared>) -> AdminApp {
        AdminApp {
            shared,
            sections: Vec::new(),
        }
    }

    /// Adds a section to `/admin/status`.
    pub fn with_section(mut self, section: Arc<dyn StatusSection>) -> AdminApp {
        self.sections.push(section);
        self
    }

    /// Answers one request. `authorization` is the raw `Authorization`
    /// header, if any.
    pub fn handle(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        authorization: Option<&[u8]>,
    ) -> AdminResponse {
        let snapshot = self.shared.snapshot();

        // Authenticate before routing so that an unauthenticated caller
        // learns nothing about which admin paths exist.
        if is_admin_path(path) {
            if let Some(expected) = snapshot.server.admin.token.as_deref() {
                if let Err(resp) = check_bearer(expected, authorization) {
                    return resp;
                }
            }
        }

        let Some(endpoint) = Endpoint::from_path(path) else {
            return AdminResponse::error(
                StatusCode::NOT_FOUND,
                "no admin endpoint at this path",
                "not_found_error",
                "no_route",
            );
        };
        if method != Method::GET && method != Method::HEAD {
            return AdminResponse::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "admin endpoints accept only GET and HEAD",
                "invalid_request_error",
                "method_not_allowed",
            )
            .with_header(ALLOW, "GET, HEAD");
        }

        match endpoint {
            Endpoint::Metrics => {
                self.shared.refresh_gauges();
                AdminResponse::new(
                    StatusCode::OK,
                    TEXT_CONTENT_TYPE,
                    self.shared.metrics.render().into_bytes(),
                )
            }
            Endpoint::Live => AdminResponse::json(StatusCode::OK, &json!({ "status": "alive" })),
            Endpoint::Ready => self.ready(&snapshot),
            Endpoint::Startup => {
                let started = self.shared.health.started();
                let (status, word) = if started {
                    (StatusCode::OK, "started")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                };
                AdminResponse::json(status, &json!({ "status": word }))
            }
            Endpoint::Status => AdminResponse::json(StatusCode::OK, &self.status(&snapshot, query)),
        }
    }

    fn ready(&self, snapshot: &Snapshot) -> AdminResponse {
        let health = &self.shared.health;
        let ready = health.ready();
        let body = json!({
            "status": if ready { "ready" } else { "not_ready" },
            "config_loaded": health.config_loaded.load(Ordering::Acquire),
            "listeners_bound": health.listeners_bound.load(Ordering::Acquire),
            "store": {
                "configured": snapshot.store.is_some(),
                "kind": snapshot.store.as_ref().map(|_| "redis"),
            },
            "backends": snapshot.backends.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
        });
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        AdminResponse::json(status, &body)
    }

    /// The `/admin/status` document.
    fn status(&self, snapshot: &Snapshot, query: Option<&str>) -> Value {
        let source = &snapshot.source;
        let admin = &snapshot.server.admin;
        let mut doc = Map::new();
        doc.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
        doc.insert(
            "uptime_seconds".into(),
            json!(self.shared.started_at.elapsed().as_secs()),
        );
        doc.insert(
            "config".into(),
            json!({
                "path": source.path.display().to_string(),
                "hash": source.hash,
                "loaded_at": rfc3339(source.loaded_at),
                "loaded_at_unix": unix_secs(source.loaded_at),
                "version": snapshot.version,
            }),
        );
        doc.insert("listen".into(), json!(snapshot.server.listen));
        doc.insert(
            "admin".into(),
            json!({ "listen": admin.listen, "auth_required": admin.token.is_some() }),
        );
        doc.insert(
            "store".into(),
            match &snapshot.store {
                None => json!({ "configured": false }),
                Some(store) => json!({
                    "configured": true,
                    "kind": "redis",
                    "url": redact_url(&store.redis.url),
                    "key_prefix": store.redis.key_prefix,
                    "timeout_ms": millis(store.redis.timeout),
                    "expected_replicas": store.redis.expected_replicas,
                }),
            },
        );
        doc.insert(
            "routes".into(),
            Value::Array(snapshot.routes.iter().map(|r| route_json(r)).collect()),
        );
        doc.insert(
            "backends".into(),
            Value::Array(
                snapshot
                    .backends
                    .iter()
                    .map(|b| {
                        json!({
                            "name": b.name,
                            "endpoints": b.endpoints.iter().map(|e| e.url.as_str()).collect::<Vec<_>>(),
                            "host": b.host,
                            "timeouts": {
                                "connect_ms": millis(b.timeouts.connect),
                                "response_headers_ms": millis(b.timeouts.response_headers),
                            },
                        })
                    })
                    .collect(),
            ),
        );
        for section in &self.sections {
            doc.entry(section.name())
                .or_insert_with(|| section.render(query));
        }
        Value::Object(doc)
    }
}

fn route_json(route: &Route) -> Value {
    let m = &route.matcher;
    let path = match &m.path {
        PathMatch::Exact(p) => json!({ "exact": p }),
        PathMatch::Prefix(p) => json!({ "prefix": p }),
    };
    let headers: Map<String, Value> = m
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), json!(value)))
        .collect();
    json!({
        "name": route.name,
        "match": {
            "path": path,
            "methods": m.methods.iter().map(Method::as_str).collect::<Vec<_>>(),
            "host": m.host,
            "headers": headers,
        },
        "backend": route.backend_name,
        "websocket": route.websocket,
        "strip_prefix": route.rewrite.as_ref().and_then(|r| r.strip_prefix.as_deref()),
        "timeouts": {
            "connect_ms": route.timeouts.connect.map(millis),
            "response_headers_ms": route.timeouts.response_headers.map(millis),
        },
    })
}

/// `Ok` when `authorization` is `Bearer <expected>` (scheme
/// case-insensitive), else the 401 to send.
fn check_bearer(expected: &str, authorization: Option<&[u8]>) -> Result<(), AdminResponse> {
    let unauthorized = |message: &str| {
        AdminResponse::error(
            StatusCode::UNAUTHORIZED,
            message,
            "authentication_error",
            "admin_unauthorized",
        )
        .with_header(WWW_AUTHENTICATE, "Bearer realm=\"floodwall-admin\"")
    };
    let Some(header) = authorization else {
        return Err(unauthorized(
            "the admin API requires an Authorization: Bearer token",
        ));
    };
    let presented = bearer_token(header);
    // An empty token never matches, even if one was configured by mistake.
    match presented {
        Some(token) if !token.is_empty() && constant_time_eq(expected.as_bytes(), token) => Ok(()),
        _ => Err(unauthorized("invalid admin bearer token")),
    }
}

/// The token of a `Bearer` credential, without surrounding spaces.
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    let header = header.trim_ascii();
    let (scheme, rest) = header.split_at(header.iter().position(|&c| c == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    Some(rest.trim_ascii())
}

/// Compares SHA-256 digests with a branch-free fold, so neither the position
/// of the first difference nor the token's length shows in the timing.
fn constant_time_eq(expected: &[u8], presented: &[u8]) -> bool {
    let a = Sha256::digest(expected);
    let b = Sha256::digest(presented);
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The URL without its credentials: userinfo becomes `***` and the query
/// (where `redis+unix` URLs may carry `pass=`) is dropped.
fn redact_url(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `t` as RFC 3339 in UTC with second precision, e.g. `2024-05-01T12:00:00Z`.
fn rfc3339(t: SystemTime) -> String {
    let secs = unix_secs(t);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let authorization = req.headers.get(AUTHORIZATION).map(HeaderValue::as_bytes);
        let head_only = req.method == Method::HEAD;
        if req.uri.path() == "/admin/cache/purge" {
            if let Some(expected) = self.shared.snapshot().server.admin.token.as_deref() {
                if let Err(resp) = check_bearer(expected, authorization) {
                    return resp.into_http(head_only);
                }
            }
            if req.method != Method::POST {
                return AdminResponse::error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "purge with POST",
                    "invalid_request_error",
                    "method_not_allowed",
                )
                .with_header(ALLOW, "POST")
                .into_http(head_only);
            }
            return cache::purge(&self.shared, session).await.into_http(false);
        }
        if req.uri.path() == "/admin/limits" && (req.method == Method::GET || head_only) {
            if let Some(expected) = self.shared.snapshot().server.admin.token.as_deref() {
                if let Err(resp) = check_bearer(expected, authorization) {
                    return resp.into_http(head_only);
                }
            }
            let (status, body) = limits::render(&self.shared, req.uri.query()).await;
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            return AdminResponse::json(status, &body).into_http(head_only);
        }
        let resp = self.handle(&req.method, req.uri.path(), req.uri.query(), authorization);
        if req.uri.path() == "/admin/status" && resp.status == StatusCode::OK {
            // The rate-limit section may need Redis, so it is added here, async:
            // each rule with its top keys, or with `?key=` one key's usage.
            if let Ok(mut doc) = serde_json::from_slice::<Value>(&resp.body) {
                let (_, limits) = limits::render(&self.shared, req.uri.query()).await;
                if let Some(obj) = doc.as_object_mut() {
                    obj.insert("rate_limits".into(), limits);
                }
                return AdminResponse::json(StatusCode::OK, &doc).into_http(head_only);
            }
        }
        resp.into_http(head_only)
    }
}

/// The Pingora service type of the admin listener.
pub type AdminService = pingora::services::listening::Service<HttpServer<AdminApp>>;

/// The admin listener on TCP address `listen` (e.g. `127.0.0.1:9090`), with
/// no extra status sections.
pub fn admin_service(shared: Arc<Shared>, listen: &str) -> AdminService {
    let mut app = AdminApp::new(shared.clone());
    for section in sections::all(&shared) {
        app = app.with_section(section);
    }
    admin_service_with(app, listen)
}

/// The admin listener for an [`AdminApp`] that already has its sections.
pub fn admin_service_with(app: AdminApp, listen: &str) -> AdminService {
    let mut service = pingora::services::listening::Service::new(
        "floodwall admin".to_owned(),
        HttpServer::new_app(app),
    );
    service.add_tcp(listen);
    service
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        AdminConfig, Backend, BackendTimeouts, Endpoint as BackendEndpoint, JsonMode, RedisConfig,
        RequestPolicy, Rewrite, RouteMatch, RouteTimeouts, Scheme, ServerConfig, SourceInfo,
        StoreConfig, TlsConfig,
    };
    use crate::state::Active;
    use crate::telemetry::Metrics;
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::time::Duration;

    fn snapshot(token: Option<&str>, store: bool) -> Snapshot {
        let backend = Arc::new(Backend {
            name: "openai".into(),
            endpoints: vec![BackendEndpoint {
                scheme: Scheme::Https,
                host: "api.openai.com".into(),
                port: 443,
                address: "api.openai.com:443".into(),
                url: "https://api.openai.com".into(),
            }],
            host: Some("api.openai.com".into()),
            tls: TlsConfig {
                ca_file: None,
                verify: true,
            },
            timeouts: BackendTimeouts {
                connect: Duration::from_secs(5),
                response_headers: Duration::from_secs(60),
            },
            circuit_breaker: None,
            limits: None,
        });
        let route = Arc::new(Route {
            name: "chat".into(),
            matcher: RouteMatch {
                path: PathMatch::Prefix("/v1/".into()),
                methods: vec![Method::POST],
                host: None,
                headers: vec![("x-tenant".into(), "acme".into())],
            },
            rewrite: Some(Rewrite {
                strip_prefix: Some("/openai".into()),
            }),
            websocket: false,
            backend: 0,
            backend_name: "openai".into(),
            request: RequestPolicy {
                max_body: 1 << 20,
                json: JsonMode::Auto,
                max_messages: None,
                max_prompt_chars: None,
                fields: vec![],
            },
            timeouts: RouteTimeouts {
                connect: None,
                response_headers: Some(Duration::from_secs(120)),
                ..RouteTimeouts::default()
            },
            retry: Arc::new(crate::config::RetryPolicy::single_attempt()),
            fallback: vec![],
            fallback_on: Default::default(),
            rate_limits: vec![],
            concurrency: None,
            streams: None,
            cache: None,
        });
        Snapshot {
            version: 1,
            cache_store: Default::default(),
            source: SourceInfo {
                path: PathBuf::from("policies/test.yaml"),
                hash: "deadbeef".into(),
                loaded_at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            },
            server: ServerConfig {
                listen: vec!["127.0.0.1:8080".into()],
                admin: AdminConfig {
                    listen: "127.0.0.1:9090".into(),
                    token_env: token.map(|_| "FLOODWALL_ADMIN_TOKEN".into()),
                    token: token.map(str::to_owned),
                },
                threads: None,
                grace_period: Duration::from_secs(30),
                max_connections: None,
                max_request_header_size: crate::config::compile::DEFAULT_MAX_REQUEST_HEADER_SIZE,
                request_header_timeout: crate::config::compile::DEFAULT_REQUEST_HEADER_TIMEOUT,
                trusted_proxies: vec![],
                cors: None,
                streams: Default::default(),
            },
            store: store.then(|| StoreConfig {
                redis: RedisConfig {
                    url: "redis://:hunter2@redis:6379/0".into(),
                    key_prefix: "floodwall".into(),
                    timeout: Duration::from_millis(50),
                    expected_replicas: 2,
                },
            }),
            backends: vec![backend],
            backend_index: HashMap::from([("openai".to_owned(), 0)]),
            routes: vec![route],
            limits: Default::default(),
        }
    }

    fn app(token: Option<&str>) -> AdminApp {
        AdminApp::new(Shared::new(snapshot(token, false), Metrics::new()))
    }

    fn get(app: &AdminApp, path: &str, auth: Option<&str>) -> AdminResponse {
        app.handle(&Method::GET, path, None, auth.map(str::as_bytes))
    }

    fn body_json(resp: &AdminResponse) -> Value {
        serde_json::from_slice(&resp.body).unwrap_or(Value::Null)
    }

    fn assert_error(resp: &AdminResponse, status: StatusCode, kind: &str, code: &str) {
        assert_eq!(resp.status, status);
        assert_eq!(resp.header(REASON_HEADER), Some(code));
        assert_eq!(resp.header("content-type"), Some("application/json"));
        let body = body_json(resp);
        assert_eq!(body["error"]["type"], kind, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }

    #[test]
    fn metrics_is_open_and_in_text_format() {
        let app = app(Some("s3cret"));
        app.shared.metrics.local_response("rate_limited");
        let resp = get(&app, "/metrics", None);
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(
            resp.header("content-type"),
            Some("text/plain; version=0.0.4")
        );
        let text = String::from_utf8_lossy(&resp.body);
        assert!(text.contains("floodwall_local_responses_total{reason=\"rate_limited\"} 1"));
        assert!(text.contains("floodwall_build_info"));
    }

    #[test]
    fn live_is_always_ok() {
        let app = app(Some("s3cret"));
        let resp = get(&app, "/health/live", None);
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(body_json(&resp), json!({ "status": "alive" }));
    }

    #[test]
    fn ready_is_503_until_listeners_are_bound() {
        let app = app(None);
        let resp = get(&app, "/health/ready", None);
        assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
        let body = body_json(&resp);
        assert_eq!(body["status"], "not_ready");
        assert_eq!(body["config_loaded"], true);
        assert_eq!(body["listeners_bound"], false);

        app.shared
            .health
            .listeners_bound
            .store(true, Ordering::Release);
        let resp = get(&app, "/health/ready", None);
        assert_eq!(resp.status, StatusCode::OK);
        let body = body_json(&resp);
        assert_eq!(body["status"], "ready");
        assert_eq!(body["listeners_bound"], true);
        assert_eq!(body["store"]["configured"], false);
        assert_eq!(body["backends"], json!(["openai"]));
    }

    #[test]
    fn ready_reports_store_without_failing_on_it() {
        let shared = Shared::new(snapshot(None, true), Metrics::new());
        shared.health.listeners_bound.store(true, Ordering::Release);
        let app = AdminApp::new(shared);
        let resp = get(&app, "/health/ready", None);
        assert_eq!(resp.status, StatusCode::OK);
        let body = body_json(&resp);
        assert_eq!(
            body["store"],
            json!({ "configured": true, "kind": "redis" })
        );
        assert!(!String::from_utf8_lossy(&resp.body).contains("hunter2"));
    }

    #[test]
    fn startup_is_503_until_started() {
        let app = app(None);
        assert_eq!(
            get(&app, "/health/startup", None).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        app.shared.health.started.store(true, Ordering::Release);
        let resp = get(&app, "/health/startup", None);
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(body_json(&resp)["status"], "started");
    }

    #[test]
    fn admin_is_open_without_a_configured_token() {
        let app = app(None);
        assert_eq!(get(&app, "/admin/status", None).status, StatusCode::OK);
    }

    #[test]
    fn admin_requires_the_bearer_token_when_configured() {
        let app = app(Some("s3cret"));

        let missing = get(&app, "/admin/status", None);
        assert_error(
            &missing,
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "admin_unauthorized",
        );
        assert!(missing.header("www-authenticate").is_some());

        for bad in [
            "Bearer wrong",
            "Bearer s3cre",
            "Bearer s3cret2",
            "Basic s3cret",
            "s3cret",
            "Bearer",
            "Bearer ",
        ] {
            let resp = get(&app, "/admin/status", Some(bad));
            assert_error(
                &resp,
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "admin_unauthorized",
            );
        }

        for good in ["Bearer s3cret", "bearer s3cret", "BEARER   s3cret  "] {
            assert_eq!(
                get(&app, "/admin/status", Some(good)).status,
                StatusCode::OK,
                "{good}"
            );
        }
        // Non-UTF-8 header bytes are simply a wrong token.
        let resp = app.handle(
            &Method::GET,
            "/admin/status",
            None,
            Some(b"Bearer \xff\xfe"),
        );
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn health_and_metrics_stay_open_with_a_token() {
        let app = app(Some("s3cret"));
        assert_eq!(get(&app, "/health/live", None).status, StatusCode::OK);
        assert_eq!(
            get(&app, "/metrics", Some("Bearer wrong")).status,
            StatusCode::OK
        );
    }

    #[test]
    fn reload_rotates_the_admin_token() {
        let app = app(Some("old"));
        assert_eq!(
            get(&app, "/admin/status", Some("Bearer old")).status,
            StatusCode::OK
        );
        let next = Active::build(snapshot(Some("new"), false), &app.shared.resilience);
        app.shared.config.store(Arc::new(next));
        assert_eq!(
            get(&app, "/admin/status", Some("Bearer old")).status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            get(&app, "/admin/status", Some("Bearer new")).status,
            StatusCode::OK
        );
    }

    #[test]
    fn unknown_path_is_404_no_route() {
        let app = app(Some("s3cret"));
        for path in ["/", "/metrics/", "/health", "/healthz", "/administrator"] {
            assert_error(
                &get(&app, path, None),
                StatusCode::NOT_FOUND,
                "not_found_error",
                "no_route",
            );
        }
        // Unknown admin paths are hidden behind auth.
        assert_eq!(
            get(&app, "/admin/nope", None).status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(get(&app, "/admin", None).status, StatusCode::UNAUTHORIZED);
        assert_error(
            &get(&app, "/admin/nope", Some("Bearer s3cret")),
            StatusCode::NOT_FOUND,
            "not_found_error",
            "no_route",
        );
    }

    #[test]
    fn wrong_method_is_405() {
        let app = app(Some("s3cret"));
        for (method, path, auth) in [
            (Method::POST, "/metrics", None),
            (Method::DELETE, "/health/ready", None),
            (Method::PUT, "/admin/status", Some("Bearer s3cret")),
        ] {
            let resp = app.handle(&method, path, None, auth.map(str::as_bytes));
            assert_error(
                &resp,
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
            );
            assert_eq!(resp.header("allow"), Some("GET, HEAD"));
        }
        // Auth comes first on admin paths.
        let resp = app.handle(&Method::POST, "/admin/status", None, None);
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn head_keeps_content_length_and_drops_the_body() {
        let app = app(None);
        let resp = app.handle(&Method::HEAD, "/health/live", None, None);
        let len = resp.body.len();
        assert!(len > 0);
        let http = resp.into_http(true);
        assert_eq!(http.status(), StatusCode::OK);
        assert!(http.body().is_empty());
        assert_eq!(
            http.headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()),
            Some(len.to_string().as_str())
        );
        let full = get(&app, "/health/live", None).into_http(false);
        assert_eq!(full.body().len(), len);
    }

    #[test]
    fn status_describes_the_snapshot() {
        let app = AdminApp::new(Shared::new(snapshot(None, true), Metrics::new()));
        let resp = get(&app, "/admin/status", None);
        assert_eq!(resp.status, StatusCode::OK);
        let body = body_json(&resp);
        assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
        assert!(body["uptime_seconds"].is_u64());
        assert_eq!(body["config"]["path"], "policies/test.yaml");
        assert_eq!(body["config"]["hash"], "deadbeef");
        assert_eq!(body["config"]["loaded_at"], "2023-11-14T22:13:20Z");
        assert_eq!(body["config"]["loaded_at_unix"], 1_700_000_000u64);
        assert_eq!(body["listen"], json!(["127.0.0.1:8080"]));
        assert_eq!(body["admin"]["auth_required"], false);

        let route = &body["routes"][0];
        assert_eq!(route["name"], "chat");
        assert_eq!(route["backend"], "openai");
        assert_eq!(route["websocket"], false);
        assert_eq!(route["match"]["path"], json!({ "prefix": "/v1/" }));
        assert_eq!(route["match"]["methods"], json!(["POST"]));
        assert_eq!(route["match"]["headers"], json!({ "x-tenant": "acme" }));
        assert_eq!(route["timeouts"]["response_headers_ms"], 120_000);
        assert_eq!(route["timeouts"]["connect_ms"], Value::Null);

        let backend = &body["backends"][0];
        assert_eq!(backend["name"], "openai");
        assert_eq!(backend["endpoints"], json!(["https://api.openai.com"]));
        assert_eq!(backend["host"], "api.openai.com");
        assert_eq!(backend["timeouts"]["connect_ms"], 5_000);
        assert_eq!(backend["timeouts"]["response_headers_ms"], 60_000);

        assert_eq!(body["store"]["url"], "redis://***@redis:6379/0");
        let text = String::from_utf8_lossy(&resp.body);
        assert!(!text.contains("hunter2"));
    }

    #[test]
    fn status_never_shows_the_admin_token() {
        let app = app(Some("s3cret"));
        let resp = get(&app, "/admin/status", Some("Bearer s3cret"));
        assert_eq!(resp.status, StatusCode::OK);
        assert!(!String::from_utf8_lossy(&resp.body).contains("s3cret"));
        assert_eq!(body_json(&resp)["admin"]["auth_required"], true);
    }

    struct Breakers;
    impl StatusSection for Breakers {
        fn name(&self) -> &'static str {
            "breakers"
        }
        fn render(&self, query: Option<&str>) -> Value {
            json!({ "query": query })
        }
    }
    struct Impostor;
    impl StatusSection for Impostor {
        fn name(&self) -> &'static str {
            "version"
        }
        fn render(&self, _query: Option<&str>) -> Value {
            json!("hijacked")
        }
    }

    #[test]
    fn status_sections_are_added_without_replacing_builtins() {
        let app = app(None)
            .with_section(Arc::new(Breakers))
            .with_section(Arc::new(Impostor));
        let resp = app.handle(&Method::GET, "/admin/status", Some("route=chat"), None);
        let body = body_json(&resp);
        assert_eq!(body["breakers"], json!({ "query": "route=chat" }));
        assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn error_body_is_the_openai_envelope() {
        let body: Value =
            serde_json::from_slice(&error_body("m \"q\"", "t", "c")).unwrap_or(Value::Null);
        assert_eq!(
            body,
            json!({ "error": { "message": "m \"q\"", "type": "t", "code": "c" } })
        );
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"  bearer   abc  "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearer"), None);
        assert_eq!(bearer_token(b"Token abc"), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("redis://redis:6379"), "redis://redis:6379");
        assert_eq!(
            redact_url("redis://:pw@redis:6379/1"),
            "redis://***@redis:6379/1"
        );
        assert_eq!(redact_url("rediss://user:p@ss@h:1"), "rediss://***@h:1");
        assert_eq!(
            redact_url("redis+unix:///tmp/redis.sock?db=1&pass=pw"),
            "redis+unix:///tmp/redis.sock"
        );
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(4_102_444_799)),
            "2099-12-31T23:59:59Z"
        );
    }
}
