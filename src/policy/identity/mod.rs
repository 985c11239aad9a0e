//! Who is calling: the user id, the tier and the client IP of a request,
//! as the policy's `identity` section says to find them.
//!
//! `identity.user` lists sources tried in order; the first that yields a
//! value wins:
//! - `header: NAME`: believed only when the peer is one of
//!   `server.trusted_proxies` (a public client must not name itself);
//! - `jwt: {...}`: the configured claim of a token whose signature, `exp`
//!   and `nbf` verify (see [`jwt`]);
//! - `api_key: { header }`: the SHA-256 of the key (`key:` + 32 hex
//!   digits, 128 bits), never the key itself; `Bearer ` is stripped;
//! - `body: FIELD`: a JSON body field such as the OpenAI `user` field (an
//!   egress app already sends it; it is client-chosen, so use it only
//!   where the client is your own app);
//! - `ip`: the client IP.
//!
//! **A bad token stops the search.** When a `jwt` source finds a value that
//! has the shape of a JWT (three base64url segments) but does not verify,
//! [`Identity::jwt_error`] says why and no later source is consulted: the
//! caller answers 401 rather than falling back to a weaker identity. A value
//! that is not JWT-shaped (an opaque API key in the same `Authorization`
//! header) is left to the later sources; if none of them yields a user
//! either, it is reported as a malformed token.
//!
//! **Client IP.** From a trusted peer, `X-Forwarded-For` is walked from the
//! right, skipping addresses that are themselves trusted proxies; the first
//! untrusted address is the client (the leftmost if all are trusted). From
//! any other peer the header is ignored and the peer address is the client.
//! IPv4-mapped IPv6 addresses are reported as IPv4.
//!
//! The tier comes from a header (trusted peers only) or from a claim of the
//! verified JWT, else `identity.tier.default`.
//!
//! Identity values are used as limiter keys: values longer than 128 bytes or
//! with control characters are replaced by `h:` and a SHA-256 prefix so that
//! keys stay bounded.

pub mod jwt;

use std::net::IpAddr;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::limits::{IdentityConfig, TierFrom, UserSource};
use crate::config::Cidr;
use crate::request::LlmFields;

pub use jwt::JwtError;

/// Identity values longer than this are hashed.
pub const MAX_IDENTITY_LEN: usize = 128;

/// The parts of a request that identity extraction reads.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    pub headers: &'a http::HeaderMap,
    /// The TCP peer's address.
    pub peer: Option<IpAddr>,
    /// Whether `peer` is in `server.trusted_proxies` (see [`peer_trusted`]).
    pub peer_trusted: bool,
    pub trusted_proxies: &'a [Cidr],
    /// The parsed body fields, when the body was JSON.
    pub llm: Option<&'a LlmFields>,
    /// The whole JSON document, needed only by `body:` sources other than
    /// `user` (see `IdentityConfig::needs_body_doc`).
    pub doc: Option<&'a Value>,
    /// For `exp`/`nbf`.
    pub now_unix_secs: u64,
}

impl<'a> RequestParts<'a> {
    /// Parts with `peer_trusted` computed from `trusted_proxies`, and no body.
    pub fn new(
        headers: &'a http::HeaderMap,
        peer: Option<IpAddr>,
        trusted_proxies: &'a [Cidr],
        now_unix_secs: u64,
    ) -> RequestParts<'a> {
        RequestParts {
            headers,
            peer,
            peer_trusted: peer_trusted(peer, trusted_proxies),
            trusted_proxies,
            llm: None,
            doc: None,
            now_unix_secs,
        }
    }

    pub fn with_body(
        mut self,
        llm: Option<&'a LlmFields>,
        doc: Option<&'a Value>,
    ) -> RequestParts<'a> {
        self.llm = llm;
        self.doc = doc;
        self
    }
}

/// Which kind of source produced the user id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserFrom {
    Header,
    Jwt,
    ApiKey,
    Body,
    Ip,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id, as the limiter keys it (API keys hashed).
    pub user: Option<String>,
    pub user_from: Option<UserFrom>,
    pub tier: String,
    /// The client IP (see the module docs).
    pub ip: Option<IpAddr>,
    /// A presented token that was not believed; answer 401 with its text.
    pub jwt_error: Option<JwtError>,
}

impl Identity {
    /// An identity with only an IP and the default tier (no `identity`
    /// section, or nothing matched).
    pub fn anonymous(ip: Option<IpAddr>, tier: &str) -> Identity {
        Identity {
            user: None,
            user_from: None,
            tier: tier.to_string(),
            ip,
            jwt_error: None,
        }
    }
}

/// Whether `peer` is one of the trusted proxies.
pub fn peer_trusted(peer: Option<IpAddr>, trusted: &[Cidr]) -> bool {
    peer.is_some_and(|ip| trusted.iter().any(|c| c.contains(ip)))
}

/// Extracts the identity of a request (see the module docs).
pub fn extract(config: &IdentityConfig, parts: &RequestParts<'_>) -> Identity {
    let ip = client_ip(
        parts.peer,
        parts.peer_trusted,
        parts.headers,
        parts.trusted_proxies,
    );
    // The tier is set at the end: the default only when no source gave one
    // (an empty String costs no allocation).
    let mut identity = Identity::anonymous(ip, "");
    let mut claims: Option<std::sync::Arc<serde_json::Map<String, Value>>> = None;
    let mut unshaped_token = false;

    for source in &config.user {
        let found: Option<(String, UserFrom)> = match source {
            UserSource::Header(name) if parts.peer_trusted => {
                header_value(parts.headers, name).map(|v| (v.to_string(), UserFrom::Header))
            }
            UserSource::Header(_) => None,
            UserSource::Jwt(src) => {
                let Some(token) = header_value(parts.headers, &src.header).map(strip_bearer) else {
                    continue;
                };
                let Some(verified) = jwt::verify_if_jwt(src, token, parts.now_unix_secs) else {
                    unshaped_token = true;
                    continue;
                };
                match verified {
                    Ok(c) => {
                        let user = jwt::claim_string(&c, &src.claim);
                        claims = Some(c);
                        match user {
                            Some(u) => Some((u, UserFrom::Jwt)),
                            None => {
                                identity.jwt_error =
                                    Some(JwtError::MissingClaim(src.claim.clone()));
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        identity.jwt_error = Some(e);
                        break;
                    }
                }
            }
            UserSource::ApiKey { header } => header_value(parts.headers, header)
                .map(strip_bearer)
                .filter(|k| !k.is_empty())
                .map(|k| (api_key_id(k), UserFrom::ApiKey)),
            UserSource::Body { path, segments } => {
                body_value(parts, path, segments).map(|v| (v, UserFrom::Body))
            }
            UserSource::Ip => ip.map(|ip| (format!("ip:{ip}"), UserFrom::Ip)),
        };
        if let Some((user, from)) = found {
            identity.user = Some(bounded(user));
            identity.user_from = Some(from);
            break;
        }
    }
    if identity.user.is_none() && identity.jwt_error.is_none() && unshaped_token {
        identity.jwt_error = Some(JwtError::Malformed(
            "not three dot-separated base64url parts",
        ));
    }

    match &config.tier.from {
        TierFrom::None => {}
        TierFrom::Header(name) => {
            if parts.peer_trusted {
                if let Some(t) = header_value(parts.headers, name).filter(|t| is_tier_value(t)) {
                    identity.tier = t.to_string();
                }
            }
        }
        TierFrom::JwtClaim(claim) => {
            // The user may have come from an earlier source; the tier still
            // comes only from a verified token.
            if claims.is_none() && identity.jwt_error.is_none() {
                for source in &config.user {
                    let UserSource::Jwt(src) = source else {
                        continue;
                    };
                    let Some(token) = header_value(parts.headers, &src.header).map(strip_bearer)
                    else {
                        continue;
                    };
                    let Some(verified) = jwt::verify_if_jwt(src, token, parts.now_unix_secs) else {
                        continue;
                    };
                    match verified {
                        Ok(c) => {
                            claims = Some(c);
                            break;
                        }
                        Err(e) => {
                            identity.jwt_error = Some(e);
                            break;
                        }
                    }
                }
            }
            if let Some(t) = claims
                .as_ref()
                .and_then(|c| jwt::claim_string(c, claim))
                .filter(|t| is_tier_value(t))
            {
                identity.tier = t;
            }
        }
    }
    if identity.tier.is_empty() {
        identity.tier.push_str(&config.tier.default);
    }
    identity
}

/// The client IP: the peer, or from a trusted peer the first untrusted
/// address of `X-Forwarded-For` walking from the right.
pub fn client_ip(
    peer: Option<IpAddr>,
    peer_trusted: bool,
    headers: &http::HeaderMap,
    trusted: &[Cidr],
) -> Option<IpAddr> {
    let peer = peer.map(canonical);
    if !peer_trusted {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Some(ip) = parse_hop(hop) else { break };
        client = Some(ip);
        if !trusted.iter().any(|c| c.contains(ip)) {
            break;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:5678`, `::1`, `[::1]:80`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(sa) = hop.parse::<std::net::SocketAddr>() {
        return Some(canonical(sa.ip()));
    }
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse().ok())
        .map(canonical)
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn header_value<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// `Bearer xyz` -> `xyz` (scheme case-insensitive); other values unchanged.
pub fn strip_bearer(value: &str) -> &str {
    match value.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => value[7..].trim_start(),
        _ => value,
    }
}

/// The identity of an API key: `key:` and the first 32 hex digits of its
/// SHA-256. The key itself is never kept.
pub fn api_key_id(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(36);
    out.push_str("key:");
    for b in &digest[..16] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn body_value(parts: &RequestParts<'_>, path: &str, segments: &[String]) -> Option<String> {
    if path == "user" {
        if let Some(user) = parts.llm.and_then(|l| l.user.as_deref()) {
            let user = user.trim();
            return (!user.is_empty()).then(|| user.to_string());
        }
    }
    let mut cur = parts.doc?;
    for s in segments {
        cur = match cur {
            Value::Object(m) => m.get(s)?,
            Value::Array(a) => a.get(s.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    match cur {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn is_tier_value(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Keeps limiter keys bounded: long or odd values become `h:` + 32 hex
/// digits of their SHA-256.
fn bounded(value: String) -> String {
    if value.len() <= MAX_IDENTITY_LEN && !value.chars().any(char::is_control) {
        return value;
    }
    let digest = Sha256::digest(value.as_bytes());
    let mut out = String::from("h:");
    for b in &digest[..16] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::jwt::tests::hs256_token;
    use super::*;
    use crate::config::limits::{JwtAlg, JwtSource, TierConfig};
    use crate::config::net::parse_cidr;
    use std::sync::Arc;
    use std::time::Duration;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_700_000_000;

    fn trusted() -> Vec<Cidr> {
        vec![
            parse_cidr("127.0.0.0/8").unwrap(),
            parse_cidr("10.0.0.0/8").unwrap(),
        ]
    }

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn jwt_source() -> Arc<JwtSource> {
        Arc::new(JwtSource {
            header: "authorization".into(),
            claim: "sub".into(),
            algorithms: vec![JwtAlg::Hs256],
            secret_env: None,
            hs256_secret: Some(super::jwt::HmacKey::new(SECRET)),
            public_key_file: None,
            rs256_key: None,
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
            verified: Default::default(),
        })
    }

    fn config(user: Vec<UserSource>, tier: TierFrom) -> IdentityConfig {
        IdentityConfig {
            user,
            tier: TierConfig {
                from: tier,
                default: "free".into(),
            },
        }
    }

    fn extract_from(
        config: &IdentityConfig,
        peer: &str,
        h: &http::HeaderMap,
        llm: Option<&LlmFields>,
    ) -> Identity {
        let trusted = trusted();
        let parts =
            RequestParts::new(h, Some(peer.parse().unwrap()), &trusted, NOW).with_body(llm, None);
        extract(config, &parts)
    }

    #[test]
    fn header_identity_is_believed_only_from_trusted_proxies() {
        let c = config(
            vec![UserSource::Header("x-user-id".into())],
            TierFrom::Header("x-user-tier".into()),
        );
        let h = headers(&[("x-user-id", "alice"), ("x-user-tier", "premium")]);
        let from_proxy = extract_from(&c, "10.1.2.3", &h, None);
        assert_eq!(from_proxy.user.as_deref(), Some("alice"));
        assert_eq!(from_proxy.user_from, Some(UserFrom::Header));
        assert_eq!(from_proxy.tier, "premium");
        let from_public = extract_from(&c, "203.0.113.9", &h, None);
        assert_eq!(from_public.user, None);
        assert_eq!(from_public.tier, "free");
    }

    #[test]
    fn first_source_that_yields_wins() {
        let c = config(
            vec![
                UserSource::Header("x-user-id".into()),
                UserSource::Jwt(jwt_source()),
                UserSource::ApiKey {
                    header: "x-api-key".into(),
                },
                UserSource::Body {
                    path: "user".into(),
                    segments: vec!["user".into()],
                },
                UserSource::Ip,
            ],
            TierFrom::None,
        );
        let token = hs256_token(SECRET, r#"{"alg":"HS256"}"#, r#"{"sub":"jwt-user"}"#);
        let auth = format!("Bearer {token}");
        let llm = LlmFields {
            user: Some("body-user".into()),
            ..Default::default()
        };
        // Public client: the header is ignored, the JWT wins.
        let h = headers(&[
            ("x-user-id", "spoofed"),
            ("authorization", &auth),
            ("x-api-key", "k"),
        ]);
        let id = extract_from(&c, "203.0.113.9", &h, Some(&llm));
        assert_eq!(
            (id.user.as_deref(), id.user_from),
            (Some("jwt-user"), Some(UserFrom::Jwt))
        );
        // No token: the API key, hashed.
        let h = headers(&[("x-api-key", "sk-live-123")]);
        let id = extract_from(&c, "203.0.113.9", &h, Some(&llm));
        assert_eq!(id.user, Some(api_key_id("sk-live-123")));
        // Nothing but the body.
        let id = extract_from(&c, "203.0.113.9", &headers(&[]), Some(&llm));
        assert_eq!(id.user.as_deref(), Some("body-user"));
        // Nothing at all: the IP.
        let id = extract_from(&c, "203.0.113.9", &headers(&[]), None);
        assert_eq!(id.user.as_deref(), Some("ip:203.0.113.9"));
    }

    #[test]
    fn api_keys_are_hashed_and_bearer_is_stripped() {
        let c = config(
            vec![UserSource::ApiKey {
                header: "authorization".into(),
            }],
            TierFrom::None,
        );
        let a = extract_from(
            &c,
            "203.0.113.9",
            &headers(&[("authorization", "Bearer sk-abc")]),
            None,
        );
        let b = extract_from(
            &c,
            "203.0.113.9",
            &headers(&[("authorization", "sk-abc")]),
            None,
        );
        assert_eq!(a.user, b.user);
        let id = a.user.unwrap();
        assert!(id.starts_with("key:") && id.len() == 36, "{id}");
        assert!(!id.contains("sk-abc"));
        // SHA-256("sk-abc"), first 16 bytes.
        let full: String = Sha256::digest(b"sk-abc")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(&id[4..], &full[..32]);
    }

    #[test]
    fn a_bad_token_stops_the_search_with_its_reason() {
        let c = config(
            vec![
                UserSource::Jwt(jwt_source()),
                UserSource::Body {
                    path: "user".into(),
                    segments: vec!["user".into()],
                },
            ],
            TierFrom::None,
        );
        let llm = LlmFields {
            user: Some("body-user".into()),
            ..Default::default()
        };
        let expired = hs256_token(
            SECRET,
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"a","exp":1600000000}"#,
        );
        let id = extract_from(
            &c,
            "203.0.113.9",
            &headers(&[("authorization", &format!("Bearer {expired}"))]),
            Some(&llm),
        );
        assert_eq!(id.user, None);
        assert!(matches!(id.jwt_error, Some(JwtError::Expired(_))));
        let wrong_key = hs256_token(
            b"not-the-configured-secret-at-all",
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"a"}"#,
        );
        let id = extract_from(
            &c,
            "203.0.113.9",
            &headers(&[("authorization", &wrong_key)]),
            Some(&llm),
        );
        assert_eq!(id.jwt_error, Some(JwtError::BadSignature));
        let no_sub = hs256_token(SECRET, r#"{"alg":"HS256"}"#, r#"{"name":"a"}"#);
        let id = extract_from(
            &c,
            "203.0.113.9",
            &headers(&[("authorization", &no_sub)]),
            Some(&llm),
        );
        assert_eq!(id.jwt_error, Some(JwtError::MissingClaim("sub".into())));
    }

    #[test]
    fn an_opaque_key_falls_through_to_later_sources() {
        let c = config(
            vec![
                UserSource::Jwt(jwt_source()),
                UserSource::ApiKey {
                    header: "authorization".into(),
                },
            ],
            TierFrom::None,
        );
        let id = extract_from(
            &c,
            "203.0.113.9",
            &headers(&[("authorization", "Bearer sk-opaque")]),
            None,
        );
        assert_eq!(id.user, Some(api_key_id("sk-opaque")));
        assert_eq!(id.jwt_error, None);
        // With nothing after the JWT source, an opaque value is a malformed token.
        let only_jwt = config(vec![UserSource::Jwt(jwt_source())], TierFrom::None);
        let id = extract_from(
            &only_jwt,
            "203.0.113.9",
            &headers(&[("authorization", "Bearer sk-opaque")]),
            None,
        );
        assert!(matches!(id.jwt_error, Some(JwtError::Malformed(_))));
    }

    #[test]
    fn tier_from_a_verified_claim_only() {
        let c = config(
            vec![
                UserSource::Header("x-user-id".into()),
                UserSource::Jwt(jwt_source()),
            ],
            TierFrom::JwtClaim("tier".into()),
        );
        let token = hs256_token(
            SECRET,
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"bob","tier":"premium"}"#,
        );
        let id = extract_from(
            &c,
            "203.0.113.9",
            &headers(&[("authorization", &token)]),
            None,
        );
        assert_eq!(
            (id.user.as_deref(), id.tier.as_str()),
            (Some("bob"), "premium")
        );
        // User from the trusted header; the tier still from the token.
        let id = extract_from(
            &c,
            "10.0.0.1",
            &headers(&[("x-user-id", "carol"), ("authorization", &token)]),
            None,
        );
        assert_eq!(
            (id.user.as_deref(), id.tier.as_str()),
            (Some("carol"), "premium")
        );
        // No token: the default tier.
        let id = extract_from(&c, "10.0.0.1", &headers(&[("x-user-id", "carol")]), None);
        assert_eq!(id.tier, "free");
    }

    #[test]
    fn forwarded_for_is_walked_from_the_right_past_trusted_hops() {
        let t = trusted();
        let ip = |peer: &str, xff: &[&str]| {
            let pairs: Vec<(&str, &str)> = xff.iter().map(|v| ("x-forwarded-for", *v)).collect();
            let h = headers(&pairs);
            let peer: IpAddr = peer.parse().unwrap();
            client_ip(Some(peer), peer_trusted(Some(peer), &t), &h, &t).map(|i| i.to_string())
        };
        assert_eq!(
            ip("10.0.0.1", &["198.51.100.7, 10.0.0.2"]).as_deref(),
            Some("198.51.100.7")
        );
        // A client-written entry left of the real one is ignored.
        assert_eq!(
            ip("10.0.0.1", &["1.1.1.1, 198.51.100.7"]).as_deref(),
            Some("198.51.100.7")
        );
        // Several header lines are one list.
        assert_eq!(
            ip("10.0.0.1", &["1.1.1.1", "198.51.100.7, 10.9.9.9"]).as_deref(),
            Some("198.51.100.7")
        );
        // Untrusted peer: the header is ignored.
        assert_eq!(
            ip("203.0.113.9", &["1.1.1.1"]).as_deref(),
            Some("203.0.113.9")
        );
        // Every hop trusted: the leftmost.
        assert_eq!(
            ip("127.0.0.1", &["10.0.0.5, 10.0.0.6"]).as_deref(),
            Some("10.0.0.5")
        );
        // Garbage stops the walk at the last good hop.
        assert_eq!(
            ip("10.0.0.1", &["198.51.100.7, junk"]).as_deref(),
            Some("10.0.0.1")
        );
        // Ports, brackets and IPv4-mapped IPv6.
        assert_eq!(
            ip("10.0.0.1", &["198.51.100.7:5555"]).as_deref(),
            Some("198.51.100.7")
        );
        assert_eq!(
            ip("10.0.0.1", &["[2001:db8::1]:443"]).as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(
            ip("::ffff:10.0.0.1", &["::ffff:198.51.100.7"]).as_deref(),
            Some("198.51.100.7")
        );
    }

    #[test]
    fn long_values_are_hashed_and_bearer_scheme_is_case_insensitive() {
        let long = "u".repeat(500);
        let b = bounded(long.clone());
        assert!(b.starts_with("h:") && b.len() == 34);
        assert_eq!(bounded("alice".to_string()), "alice");
        assert_eq!(strip_bearer("bearer abc"), "abc");
        assert_eq!(strip_bearer("BEARER  abc"), "abc");
        assert_eq!(strip_bearer("Basic abc"), "Basic abc");
    }
}
