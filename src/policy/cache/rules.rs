//! What may be looked up, what may be stored, and what an entry keeps.

use super::Scope;

/// What the request's `Cache-Control` (or `Pragma`) asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestMode {
    /// Look up; store a storable miss.
    Normal,
    /// `no-cache`: skip the lookup, fetch, and store the fresh answer.
    Refresh,
    /// `no-store`: neither look up nor store.
    NoStore,
}

/// `cache_control` and `pragma` are the request's header values, if any.
pub fn request_mode(cache_control: Option<&str>, pragma: Option<&str>) -> RequestMode {
    let mut mode = RequestMode::Normal;
    for d in directives(cache_control) {
        if d.eq_ignore_ascii_case("no-store") {
            return RequestMode::NoStore;
        }
        if d.eq_ignore_ascii_case("no-cache") || d.eq_ignore_ascii_case("max-age=0") {
            mode = RequestMode::Refresh;
        }
    }
    if cache_control.is_none() && pragma.is_some_and(|p| p.trim().eq_ignore_ascii_case("no-cache"))
    {
        mode = RequestMode::Refresh;
    }
    mode
}

/// Whether a response with this status and `Cache-Control` may be stored.
/// Only a 200; never `no-store`; `private` only in a per-user scope.
pub fn storable(status: u16, cache_control: Option<&str>, scope: Scope) -> bool {
    if status != 200 {
        return false;
    }
    !directives(cache_control).any(|d| {
        d.eq_ignore_ascii_case("no-store")
            || (scope == Scope::Shared && d.eq_ignore_ascii_case("private"))
    })
}

fn directives(v: Option<&str>) -> impl Iterator<Item = &str> {
    v.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
}

/// Whether an upstream response header is kept in an entry. Hop-by-hop and
/// framing headers, per-request headers (ids, dates, cookies, rate-limit
/// state, CORS) and floodwall's own are dropped; they are set afresh on
/// every response.
pub fn keep_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    !(matches!(
        n.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
            | "date"
            | "age"
            | "set-cookie"
            | "x-request-id"
            | "retry-after"
            | "x-cache"
            | "ratelimit"
            | "ratelimit-policy"
    ) || n.starts_with("x-floodwall-")
        || n.starts_with("x-ratelimit-")
        || n.starts_with("access-control-"))
}

/// Whether a recorded body may be stored: it ended normally and, for an
/// SSE stream, the model finished it (`data: [DONE]` or a `finish_reason`).
pub fn complete(sse: bool, ended_normally: bool, stream_finished: bool) -> bool {
    ended_normally && (!sse || stream_finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_directives() {
        assert_eq!(request_mode(None, None), RequestMode::Normal);
        assert_eq!(request_mode(Some("max-age=60"), None), RequestMode::Normal);
        assert_eq!(request_mode(Some("no-cache"), None), RequestMode::Refresh);
        assert_eq!(
            request_mode(Some("No-Cache, x=1"), None),
            RequestMode::Refresh
        );
        assert_eq!(request_mode(Some("max-age=0"), None), RequestMode::Refresh);
        assert_eq!(
            request_mode(Some("no-cache, no-store"), None),
            RequestMode::NoStore
        );
        assert_eq!(request_mode(None, Some("no-cache")), RequestMode::Refresh);
        // Cache-Control wins over Pragma (RFC 9111 §5.4).
        assert_eq!(
            request_mode(Some("max-age=5"), Some("no-cache")),
            RequestMode::Normal
        );
    }

    #[test]
    fn only_storable_responses_are_stored() {
        assert!(storable(200, None, Scope::Shared));
        assert!(storable(200, Some("max-age=10"), Scope::Shared));
        assert!(!storable(201, None, Scope::User));
        assert!(!storable(500, None, Scope::User));
        assert!(!storable(200, Some("no-store"), Scope::User));
        assert!(!storable(200, Some("private, max-age=1"), Scope::Shared));
        assert!(storable(200, Some("private"), Scope::User));
    }

    #[test]
    fn entries_keep_end_to_end_headers_only() {
        for keep in [
            "content-type",
            "openai-model",
            "x-custom",
            "content-encoding",
        ] {
            assert!(keep_header(keep), "{keep}");
        }
        for drop in [
            "Connection",
            "transfer-encoding",
            "content-length",
            "Date",
            "set-cookie",
            "x-request-id",
            "x-floodwall-backend",
            "x-ratelimit-remaining-requests",
            "access-control-allow-origin",
            "retry-after",
        ] {
            assert!(!keep_header(drop), "{drop}");
        }
    }

    #[test]
    fn only_finished_streams_are_complete() {
        assert!(complete(false, true, false));
        assert!(!complete(false, false, false));
        assert!(complete(true, true, true));
        assert!(!complete(true, true, false));
        assert!(!complete(true, false, true));
    }
}
