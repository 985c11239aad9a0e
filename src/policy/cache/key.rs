//! Cache keys.
//!
//! A key has three parts, written `route:scope:digest`:
//! - the route name, so that a route can be purged;
//! - the scope: `shared`, or a 16-hex-digit hash of the caller's identity
//!   (`anonymous` when a `scope: user` route has no identity for the
//!   caller), so that one user's entries can be purged;
//! - a SHA-256 digest over, in order and each length-prefixed: the key
//!   version, the method, the path and query, each selected header's value,
//!   a hash of `Authorization` (when sent: in both scopes, a credential is
//!   never served another credential's answer), and the body.
//!
//! A JSON body is canonicalised first: object keys sorted, no insignificant
//! whitespace, and the route's `ignore_fields` removed. Anything else is
//! hashed as sent. Numbers are kept as written by the JSON parser (`1` and
//! `1.0` are different keys).

use sha2::{Digest, Sha256};

/// Changes whenever the digest's input changes, so that old entries are
/// never read with a new meaning.
pub const KEY_VERSION: &str = "fwc1";
/// The scope part of a shared entry.
pub const SHARED: &str = "shared";
/// The scope part of a `scope: user` entry without an identity.
pub const ANONYMOUS: &str = "anonymous";

/// The request body, as the key sees it.
pub enum Body<'a> {
    Json(&'a serde_json::Value),
    Raw(&'a [u8]),
}

/// What a key is computed from.
pub struct KeyParts<'a> {
    pub route: &'a str,
    pub method: &'a str,
    pub path_and_query: &'a str,
    /// The route's `key_headers`, in policy order, with the value sent (if any).
    pub headers: Vec<Option<&'a [u8]>>,
    pub authorization: Option<&'a [u8]>,
    /// `None`: the route's entries are shared.
    pub identity: Option<Option<&'a str>>,
    pub body: Body<'a>,
    pub ignore_fields: &'a [Vec<String>],
}

/// A computed key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub route: String,
    pub scope: String,
    pub digest: String,
    /// `route:scope:digest`, built once.
    text: String,
}

impl CacheKey {
    pub fn compute(p: &KeyParts<'_>) -> CacheKey {
        let mut h = Sha256::new();
        let mut part = |b: &[u8]| {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        };
        part(KEY_VERSION.as_bytes());
        part(p.method.as_bytes());
        part(p.path_and_query.as_bytes());
        for v in &p.headers {
            match v {
                Some(v) => {
                    part(b"1");
                    part(v);
                }
                None => part(b"0"),
            }
        }
        match p.authorization {
            Some(a) => {
                part(b"1");
                part(&Sha256::digest(a));
            }
            None => part(b"0"),
        }
        match &p.body {
            Body::Json(v) => {
                part(b"json");
                part(&canonical_json(v, p.ignore_fields));
            }
            Body::Raw(b) => {
                part(b"raw");
                part(b);
            }
        }
        let digest = hex(&h.finalize());
        let scope = match p.identity {
            None => SHARED.to_string(),
            Some(None) => ANONYMOUS.to_string(),
            Some(Some(id)) => identity_tag(id),
        };
        CacheKey::new(p.route, &scope, &digest)
    }

    pub fn new(route: &str, scope: &str, digest: &str) -> CacheKey {
        CacheKey {
            route: route.to_string(),
            scope: scope.to_string(),
            digest: digest.to_string(),
            text: format!("{route}:{scope}:{digest}"),
        }
    }

    /// `route:scope:digest`, the form the memory tier and purges use.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Split `route:scope:digest` back into its parts.
    pub fn parse(s: &str) -> Option<CacheKey> {
        let (rest, digest) = s.rsplit_once(':')?;
        let (route, scope) = rest.rsplit_once(':')?;
        Some(CacheKey::new(route, scope, digest))
    }
}

/// The scope part for an identity: 16 hex digits of its SHA-256, so keys
/// (and Redis) never hold a user id or API key in the clear.
pub fn identity_tag(identity: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"floodwall-cache-identity\0");
    h.update(identity.as_bytes());
    hex(&h.finalize()[..8])
}

/// Compact JSON with object keys sorted, and the `ignore` paths (dotted,
/// split) removed.
pub fn canonical_json(v: &serde_json::Value, ignore: &[Vec<String>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let paths: Vec<&[String]> = ignore.iter().map(Vec::as_slice).collect();
    write_value(&mut out, v, &paths);
    out
}

fn write_value(out: &mut Vec<u8>, v: &serde_json::Value, ignore: &[&[String]]) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_unstable();
            out.push(b'{');
            let mut first = true;
            for k in keys {
                // Drop `k` when a path ends at it; descend with the paths
                // that continue below it.
                if ignore.iter().any(|p| p.len() == 1 && p[0] == *k) {
                    continue;
                }
                let below: Vec<&[String]> = ignore
                    .iter()
                    .filter(|p| p.len() > 1 && p[0] == *k)
                    .map(|p| &p[1..])
                    .collect();
                if !first {
                    out.push(b',');
                }
                first = false;
                write_string(out, k);
                out.push(b':');
                if let Some(child) = m.get(k) {
                    write_value(out, child, &below);
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item, &[]);
            }
            out.push(b']');
        }
        Value::String(s) => write_string(out, s),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Null => out.extend_from_slice(b"null"),
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping, so equal strings always encode equally; written
    // straight into the output (writing to a Vec cannot fail).
    let _ = serde_json::to_writer(&mut *out, s);
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ignore(paths: &[&str]) -> Vec<Vec<String>> {
        paths
            .iter()
            .map(|p| p.split('.').map(str::to_string).collect())
            .collect()
    }

    fn key_of(body: &serde_json::Value, ignore_fields: &[Vec<String>]) -> CacheKey {
        CacheKey::compute(&KeyParts {
            route: "chat",
            method: "POST",
            path_and_query: "/v1/chat/completions",
            headers: vec![],
            authorization: None,
            identity: None,
            body: Body::Json(body),
            ignore_fields,
        })
    }

    #[test]
    fn canonical_form_sorts_keys_and_drops_whitespace() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{ "b": 1, "a": {"y": [1, 2], "x": "s"} }"#).unwrap();
        assert_eq!(
            String::from_utf8(canonical_json(&a, &[])).unwrap(),
            r#"{"a":{"x":"s","y":[1,2]},"b":1}"#
        );
    }

    #[test]
    fn key_order_and_whitespace_do_not_change_the_key() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
                .unwrap();
        let b: serde_json::Value = serde_json::from_str(
            "{\n  \"messages\" : [ {\"content\":\"hi\", \"role\":\"user\"} ],\n  \"model\":\"m\"\n}",
        )
        .unwrap();
        assert_eq!(key_of(&a, &[]), key_of(&b, &[]));
    }

    #[test]
    fn a_differing_field_changes_the_key_and_an_ignored_one_does_not() {
        let ig = ignore(&["user", "stream_options", "metadata.trace"]);
        let base = json!({"model": "m", "user": "alice", "metadata": {"trace": 1, "k": 2}});
        let other_user = json!({"model": "m", "user": "bob", "metadata": {"trace": 9, "k": 2}});
        let other_model = json!({"model": "n", "user": "alice", "metadata": {"trace": 1, "k": 2}});
        let other_nested = json!({"model": "m", "user": "alice", "metadata": {"trace": 1, "k": 3}});
        assert_eq!(key_of(&base, &ig), key_of(&other_user, &ig));
        assert_ne!(key_of(&base, &ig), key_of(&other_model, &ig));
        assert_ne!(key_of(&base, &ig), key_of(&other_nested, &ig));
        // Without the ignore list the user counts.
        assert_ne!(key_of(&base, &[]), key_of(&other_user, &[]));
    }

    #[test]
    fn stream_and_non_stream_requests_are_distinct() {
        let a = json!({"model": "m", "stream": true});
        let b = json!({"model": "m", "stream": false});
        assert_ne!(key_of(&a, &[]), key_of(&b, &[]));
    }

    #[test]
    fn authorization_identity_headers_and_path_separate_entries() {
        let body = json!({"q": 1});
        let base = KeyParts {
            route: "r",
            method: "POST",
            path_and_query: "/a",
            headers: vec![Some(b"v1")],
            authorization: Some(b"Bearer one"),
            identity: Some(Some("alice")),
            body: Body::Json(&body),
            ignore_fields: &[],
        };
        let k = CacheKey::compute(&base);
        let with = |f: &dyn Fn(&mut KeyParts<'_>)| {
            let mut p = KeyParts {
                route: base.route,
                method: base.method,
                path_and_query: base.path_and_query,
                headers: base.headers.clone(),
                authorization: base.authorization,
                identity: base.identity,
                body: Body::Json(&body),
                ignore_fields: &[],
            };
            f(&mut p);
            CacheKey::compute(&p)
        };
        assert_eq!(with(&|_| {}), k);
        assert_ne!(
            with(&|p| p.authorization = Some(b"Bearer two")).digest,
            k.digest
        );
        assert_ne!(with(&|p| p.authorization = None).digest, k.digest);
        assert_ne!(with(&|p| p.headers = vec![None]).digest, k.digest);
        assert_ne!(with(&|p| p.path_and_query = "/b").digest, k.digest);
        assert_ne!(with(&|p| p.method = "GET").digest, k.digest);
        // The identity is the scope part, not the digest.
        let bob = with(&|p| p.identity = Some(Some("bob")));
        assert_eq!(bob.digest, k.digest);
        assert_ne!(bob.scope, k.scope);
        assert_eq!(with(&|p| p.identity = None).scope, SHARED);
        assert_eq!(with(&|p| p.identity = Some(None)).scope, ANONYMOUS);
        assert_eq!(k.scope, identity_tag("alice"));
        assert_eq!(k.scope.len(), 16);
    }

    #[test]
    fn raw_bodies_are_hashed_as_sent() {
        let parts = |b: &'static [u8]| KeyParts {
            route: "r",
            method: "POST",
            path_and_query: "/",
            headers: vec![],
            authorization: None,
            identity: None,
            body: Body::Raw(b),
            ignore_fields: &[],
        };
        assert_eq!(
            CacheKey::compute(&parts(b"abc")),
            CacheKey::compute(&parts(b"abc"))
        );
        assert_ne!(
            CacheKey::compute(&parts(b"abc")),
            CacheKey::compute(&parts(b"abd"))
        );
    }

    #[test]
    fn key_string_round_trips_and_is_pinned() {
        let k = key_of(&json!({"a": 1}), &[]);
        let s = k.as_str().to_string();
        assert!(s.starts_with("chat:shared:"));
        assert_eq!(CacheKey::parse(&s), Some(k.clone()));
        // Pinned: a change here invalidates every replica's entries, so it
        // must come with a new KEY_VERSION.
        assert_eq!(
            k.digest,
            "9e99ead06450d3973826c312380ee5ea3e41903560fa5c28d10cd32efafbfe0a"
        );
    }
}
