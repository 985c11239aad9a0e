//! Route matching: which configured route serves a request.
//!
//! Routes are tried in file order and the first match wins. A route matches
//! when its path rule (exact or prefix), its method list (empty = any), its
//! host (compared without port, case-insensitively) and every header rule
//! (exact value) all match. This is pure: it reads the request's parts and the
//! compiled routes, nothing else.

use crate::config::{PathMatch, Route, RouteMatch};

/// The parts of a request that routing looks at.
pub struct RequestParts<'a> {
    pub method: &'a http::Method,
    pub path: &'a str,
    /// The Host header or URI authority, possibly with a port.
    pub host: Option<&'a str>,
    pub header: &'a dyn Fn(&str) -> Option<&'a str>,
}

/// The index of the first route that matches, if any.
pub fn find(routes: &[std::sync::Arc<Route>], req: &RequestParts<'_>) -> Option<usize> {
    routes.iter().position(|r| matches(&r.matcher, req))
}

pub fn matches(m: &RouteMatch, req: &RequestParts<'_>) -> bool {
    let path_ok = match &m.path {
        PathMatch::Exact(p) => req.path == p,
        PathMatch::Prefix(p) => req.path.starts_with(p.as_str()),
    };
    if !path_ok {
        return false;
    }
    if !m.methods.is_empty() && !m.methods.iter().any(|x| x == req.method) {
        return false;
    }
    if let Some(want) = &m.host {
        let Some(host) = req.host else { return false };
        if !strip_port(host).eq_ignore_ascii_case(want) {
            return false;
        }
    }
    m.headers
        .iter()
        .all(|(name, value)| (req.header)(name) == Some(value.as_str()))
}

/// `example.com:8080` -> `example.com`; `[::1]:80` -> `[::1]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

/// Apply `rewrite.strip_prefix` to a path-and-query. The result always starts
/// with `/`: stripping `/openai` from `/openai` gives `/`.
pub fn rewrite_path(strip_prefix: Option<&str>, path_and_query: &str) -> String {
    if let Some(prefix) = strip_prefix {
        if let Some(rest) = path_and_query.strip_prefix(prefix) {
            if rest.is_empty() || rest.starts_with('?') {
                return format!("/{rest}");
            }
            if rest.starts_with('/') {
                return rest.to_string();
            }
        }
    }
    path_and_query.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rm(path: PathMatch, methods: &[&str], host: Option<&str>) -> RouteMatch {
        RouteMatch {
            path,
            methods: methods.iter().map(|m| m.parse().unwrap()).collect(),
            host: host.map(str::to_string),
            headers: vec![],
        }
    }

    fn parts<'a>(
        method: &'a http::Method,
        path: &'a str,
        host: Option<&'a str>,
        header: &'a dyn Fn(&str) -> Option<&'a str>,
    ) -> RequestParts<'a> {
        RequestParts {
            method,
            path,
            host,
            header,
        }
    }

    #[test]
    fn prefix_exact_method_and_host() {
        let none = |_: &str| None;
        let post = http::Method::POST;
        let get = http::Method::GET;
        let m = rm(PathMatch::Prefix("/v1/".into()), &["POST"], None);
        assert!(matches(&m, &parts(&post, "/v1/chat", None, &none)));
        assert!(!matches(&m, &parts(&get, "/v1/chat", None, &none)));
        assert!(!matches(&m, &parts(&post, "/v2/chat", None, &none)));
        let e = rm(
            PathMatch::Exact("/health".into()),
            &[],
            Some("api.example.com"),
        );
        assert!(matches(
            &e,
            &parts(&get, "/health", Some("API.example.com:8443"), &none)
        ));
        assert!(!matches(
            &e,
            &parts(&get, "/health/x", Some("api.example.com"), &none)
        ));
        assert!(!matches(&e, &parts(&get, "/health", Some("other"), &none)));
        assert!(!matches(&e, &parts(&get, "/health", None, &none)));
    }

    #[test]
    fn header_rules_must_all_match() {
        let mut m = rm(PathMatch::Prefix("/".into()), &[], None);
        m.headers = vec![("x-route".into(), "beta".into())];
        let get = http::Method::GET;
        let beta = |n: &str| if n == "x-route" { Some("beta") } else { None };
        let alpha = |n: &str| if n == "x-route" { Some("alpha") } else { None };
        assert!(matches(&m, &parts(&get, "/a", None, &beta)));
        assert!(!matches(&m, &parts(&get, "/a", None, &alpha)));
    }

    #[test]
    fn strip_prefix_rewrites() {
        assert_eq!(
            rewrite_path(Some("/openai"), "/openai/v1/chat/completions?x=1"),
            "/v1/chat/completions?x=1"
        );
        assert_eq!(rewrite_path(Some("/openai"), "/openai"), "/");
        assert_eq!(rewrite_path(Some("/openai"), "/openai?a"), "/?a");
        // a prefix that ends mid-segment does not rewrite
        assert_eq!(rewrite_path(Some("/openai"), "/openaix/v1"), "/openaix/v1");
        assert_eq!(rewrite_path(None, "/a"), "/a");
    }

    #[test]
    fn strip_port_handles_ipv6() {
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("example.com:80"), "example.com");
    }
}
