//! `POST /admin/cache/purge`: remove cached answers.
//!
//! The criteria come as query parameters (`?route=chat`) or a JSON body
//! (whose fields win):
//! - `route`: every entry of one route;
//! - `identity`: every entry of one caller, as `identity.user` resolves it
//!   (e.g. the `x-user-id` value; an API key's user is its hash);
//! - `prefix`: entries whose `route:scope:digest` key starts with it;
//! - `all: true`: everything.
//!
//! `route`, `identity` and `prefix` combine (all must match). The purge
//! clears this instance's memory tier and Redis, and is relayed to every
//! replica's memory tier over Redis pub/sub. The answer says how many
//! entries went from each tier.

use http::StatusCode;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use super::AdminResponse;
use crate::state::Shared;
use crate::store::cache::Purge;

/// The largest purge request body read.
const MAX_BODY: usize = 64 * 1024;

pub async fn purge(shared: &Shared, session: &mut ServerSession) -> AdminResponse {
    let query = session.req_header().uri.query().map(str::to_string);
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return bad(&format!(
                        "the purge request body is larger than {MAX_BODY} bytes"
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                return bad(&format!(
                    "could not read the request body: {}",
                    e.etype().as_str()
                ))
            }
        }
    }
    // Query parameters, overridden field by field by a JSON body.
    let mut purge = from_query(query.as_deref());
    if !body.iter().all(u8::is_ascii_whitespace) {
        match serde_json::from_slice::<Purge>(&body) {
            Ok(p) => {
                purge.route = p.route.or(purge.route);
                purge.identity = p.identity.or(purge.identity);
                purge.prefix = p.prefix.or(purge.prefix);
                purge.all |= p.all;
            }
            Err(e) => {
                return bad(&format!(
                "the body must be a JSON object with `route`, `identity`, `prefix` or `all`: {e}"
            ))
            }
        }
    }
    if let Some(problem) = purge.problem() {
        return bad(problem);
    }
    let purged = shared.cache.purge(&purge).await;
    tracing::info!(target: "audit", purge = ?purge, memory = purged.memory, redis = ?purged.redis, "cache purged");
    AdminResponse::json(StatusCode::OK, &json!({ "purge": purge, "purged": purged }))
}

fn from_query(q: Option<&str>) -> Purge {
    let mut p = Purge::default();
    for pair in q.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "route" => p.route = Some(v),
            "identity" => p.identity = Some(v),
            "prefix" => p.prefix = Some(v),
            "all" => p.all = v.is_empty() || v == "true" || v == "1",
            _ => {}
        }
    }
    p
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(())
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn bad(message: &str) -> AdminResponse {
    AdminResponse::error(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        "invalid_purge",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters() {
        let p = from_query(Some("route=chat&identity=alice%40example.com"));
        assert_eq!(p.route.as_deref(), Some("chat"));
        assert_eq!(p.identity.as_deref(), Some("alice@example.com"));
        assert!(from_query(Some("all=true")).all);
        assert!(from_query(Some("all")).all);
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("a+b%3A"), "a b:");
    }
}
