//! Header handling on the way up and down: hop-by-hop removal,
//! `X-Forwarded-*`, request ids and CORS.

use std::cell::Cell;
use std::net::IpAddr;

use http::response::Parts as RespParts;
use http::HeaderValue;
use pingora::http::ResponseHeader;

use crate::config::{Cidr, CorsConfig};

/// Header names floodwall reads or writes on every request, built once:
/// a lookup by `&str` parses and hashes the name each time.
pub mod names {
    use http::HeaderName;

    pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    pub const X_FLOODWALL_BACKEND: HeaderName = HeaderName::from_static("x-floodwall-backend");
    pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
}

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// `n` (lower case, as `http` keeps names) is in [`HOP_BY_HOP`]; most
/// names are rejected by their length alone.
fn is_hop_by_hop(n: &str) -> bool {
    match n.len() {
        2 | 7 | 10 | 16 | 17 | 18 | 19 => HOP_BY_HOP.contains(&n),
        _ => false,
    }
}

fn connection_tokens(h: &http::HeaderMap) -> Vec<String> {
    h.get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The hop-by-hop headers present in `h`: the fixed list plus those the
/// `Connection` header names. One pass over the header names; nothing is
/// allocated when there are none (the common case for requests).
fn hop_by_hop_present(h: &http::HeaderMap) -> Vec<http::HeaderName> {
    let tokens = if h.contains_key(http::header::CONNECTION) {
        connection_tokens(h)
    } else {
        Vec::new()
    };
    h.keys()
        .filter(|name| {
            let n = name.as_str();
            is_hop_by_hop(n) || tokens.iter().any(|t| t == n)
        })
        .cloned()
        .collect()
}

/// Remove the hop-by-hop headers from a request's or a response's headers.
pub fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    for name in hop_by_hop_present(h) {
        h.remove(&name);
    }
}

pub fn is_trusted(trusted: &[Cidr], ip: Option<IpAddr>) -> bool {
    ip.is_some_and(|ip| trusted.iter().any(|c| c.contains(ip)))
}

/// The `X-Forwarded-For` value to send upstream: the existing chain is kept
/// only when the peer is a trusted proxy; otherwise it is replaced, so a
/// client cannot forge its address.
pub fn forwarded_for(
    existing: Option<&str>,
    peer: Option<IpAddr>,
    peer_trusted: bool,
) -> Option<String> {
    let peer = peer?;
    let mut out = String::with_capacity(48);
    if let Some(chain) = existing
        .map(str::trim)
        .filter(|c| peer_trusted && !c.is_empty())
    {
        out.push_str(chain);
        out.push_str(", ");
    }
    crate::text::push_ip(&mut out, peer);
    Some(out)
}

/// A request's id: 1..=128 visible ASCII characters, so it is a header
/// value and a `str` at once. Made once per request; the upstream request,
/// the response and floodwall's own answers share its bytes.
#[derive(Clone)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// `id` from [`accept_request_id`] or [`new_request_id`].
    pub fn new(id: String) -> Self {
        RequestId(
            HeaderValue::from_maybe_shared(bytes::Bytes::from(id))
                .unwrap_or(HeaderValue::from_static("")),
        )
    }

    /// The id as a header value (shares its bytes).
    pub fn header(&self) -> HeaderValue {
        self.0.clone()
    }

    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

impl Default for RequestId {
    fn default() -> Self {
        RequestId(HeaderValue::from_static(""))
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An incoming `X-Request-ID` is accepted when it is 1..=128 visible ASCII
/// characters; otherwise a new one is generated.
pub fn accept_request_id(v: Option<&[u8]>) -> Option<String> {
    let v = v?;
    if v.is_empty() || v.len() > 128 || !v.iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    String::from_utf8(v.to_vec()).ok()
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9E37_79B9_7F4A_7C15);
    let local = 0u8;
    let addr = &local as *const u8 as u64;
    (t ^ addr.rotate_left(32) ^ u64::from(std::process::id())) | 1
}

/// A fast, non-cryptographic 64-bit random number (xorshift64*), per thread.
pub fn random_u64() -> u64 {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// A new 32-hex-digit request id.
pub fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    for (half, n) in id.chunks_exact_mut(16).zip([random_u64(), random_u64()]) {
        for (i, d) in half.iter_mut().enumerate() {
            *d = HEX[(n >> (60 - 4 * i) & 0xf) as usize];
        }
    }
    // Only ASCII hex digits were written.
    String::from_utf8(id.to_vec()).unwrap_or_default()
}

/// CORS headers for a response to `origin`, if that origin is allowed.
pub fn cors_headers(cors: &CorsConfig, origin: Option<&str>) -> Vec<(&'static str, String)> {
    let Some(origin) = origin else { return vec![] };
    let any = cors.allow_origins.iter().any(|o| o == "*");
    let allowed = any
        || cors
            .allow_origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin));
    if !allowed {
        return vec![];
    }
    let mut out = Vec::with_capacity(4);
    if any && !cors.allow_credentials {
        out.push(("access-control-allow-origin", "*".to_string()));
    } else {
        out.push(("access-control-allow-origin", origin.to_string()));
        out.push(("vary", "Origin".to_string()));
    }
    if cors.allow_credentials {
        out.push(("access-control-allow-credentials", "true".to_string()));
    }
    if !cors.expose_headers.is_empty() {
        out.push((
            "access-control-expose-headers",
            cors.expose_headers.join(", "),
        ));
    }
    out
}

/// Add CORS headers to a proxied response. `Vary` is merged with the
/// upstream's own (`Vary: Accept-Encoding` must survive); the rest replace
/// whatever the upstream said.
pub fn add_cors(h: &mut http::HeaderMap, cors: &[(&'static str, String)]) -> pingora::Result<()> {
    for (k, v) in cors {
        let name = http::HeaderName::from_static(k);
        let value = if name == http::header::VARY {
            let existing: Vec<String> = h
                .get_all(http::header::VARY)
                .iter()
                .filter_map(|h| h.to_str().ok())
                .flat_map(|h| h.split(','))
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect();
            if existing
                .iter()
                .any(|t| t == "*" || t.eq_ignore_ascii_case(v))
            {
                continue;
            }
            existing
                .into_iter()
                .chain(std::iter::once(v.clone()))
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            v.clone()
        };
        h.insert(name, value_of(value)?);
    }
    Ok(())
}

/// A header value from a string floodwall built or checked; an error (not
/// a panic) if it somehow holds a byte a header cannot carry.
pub fn value_of(v: impl Into<bytes::Bytes>) -> pingora::Result<HeaderValue> {
    HeaderValue::from_maybe_shared(v.into()).map_err(|_| {
        pingora::Error::explain(
            pingora::ErrorType::InvalidHTTPHeader,
            "header value holds a byte a header cannot carry",
        )
    })
}

/// Edit a Pingora response header as plain `http` parts. Pingora keeps the
/// names' original case in a second map that must stay in step with the
/// values, so its headers cannot be changed in place except through its
/// own per-header methods, which parse and copy each name again. The parts
/// are moved out, edited, and moved back without that second map: the
/// names go out as `http` spells them (HTTP names are case-insensitive).
pub fn edit_response<R>(resp: &mut ResponseHeader, f: impl FnOnce(&mut RespParts) -> R) -> R {
    let empty = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts = RespParts::from(std::mem::replace(resp, empty));
    let r = f(&mut parts);
    *resp = ResponseHeader::from(parts);
    r
}

/// Extra headers for a preflight answer (on top of [`cors_headers`]).
pub fn preflight_headers(cors: &CorsConfig) -> Vec<(&'static str, String)> {
    vec![
        (
            "access-control-allow-methods",
            cors.allow_methods.join(", "),
        ),
        (
            "access-control-allow-headers",
            cors.allow_headers.join(", "),
        ),
        ("access-control-max-age", cors.max_age.as_secs().to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn hop_by_hop_lengths_cover_the_list() {
        for n in HOP_BY_HOP {
            assert!(is_hop_by_hop(n), "{n}");
        }
        for n in ["content-length", "host", "x-request-id", "tea", "upgrades"] {
            assert!(!is_hop_by_hop(n), "{n}");
        }
    }

    #[test]
    fn hop_by_hop_and_connection_tokens_are_removed() {
        let mut h = http::HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("connection").is_none());
        assert!(h.get("te").is_none());
        assert!(h.get("x-keep").is_some());
    }

    #[test]
    fn xff_kept_only_from_trusted_peers() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            forwarded_for(Some("1.1.1.1"), Some(ip), true).unwrap(),
            "1.1.1.1, 10.1.2.3"
        );
        assert_eq!(
            forwarded_for(Some("1.1.1.1"), Some(ip), false).unwrap(),
            "10.1.2.3"
        );
        assert_eq!(forwarded_for(None, Some(ip), true).unwrap(), "10.1.2.3");
    }

    #[test]
    fn xff_ip_written_as_display_writes_it() {
        for ip in [
            "0.0.0.0",
            "10.1.2.3",
            "100.20.9.255",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(
                forwarded_for(None, Some(ip), false).unwrap(),
                ip.to_string()
            );
        }
    }

    #[test]
    fn request_ids_are_two_u64_in_hex() {
        for _ in 0..100 {
            let id = new_request_id();
            assert_eq!(id.len(), 32);
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            let (hi, lo) = id.split_at(16);
            let (hi, lo) = (
                u64::from_str_radix(hi, 16).unwrap(),
                u64::from_str_radix(lo, 16).unwrap(),
            );
            assert_eq!(id, format!("{hi:016x}{lo:016x}"));
        }
    }

    #[test]
    fn request_ids() {
        assert_eq!(
            accept_request_id(Some(b"abc-123")).as_deref(),
            Some("abc-123")
        );
        assert!(accept_request_id(Some(b"has space")).is_none());
        assert!(accept_request_id(Some(&[b'a'; 129])).is_none());
        let a = new_request_id();
        let b = new_request_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn cors_vary_is_merged_with_the_upstreams() {
        let cors = vec![
            ("vary", "Origin".to_string()),
            ("access-control-allow-origin", "https://a".to_string()),
        ];
        let mut resp = http::HeaderMap::new();
        resp.insert("vary", "Accept-Encoding".parse().unwrap());
        add_cors(&mut resp, &cors).unwrap();
        assert_eq!(resp.get("vary").unwrap(), "Accept-Encoding, Origin");
        add_cors(&mut resp, &cors).unwrap();
        assert_eq!(
            resp.get("vary").unwrap(),
            "Accept-Encoding, Origin",
            "not added twice"
        );
        let mut bare = http::HeaderMap::new();
        add_cors(&mut bare, &cors).unwrap();
        assert_eq!(bare.get("vary").unwrap(), "Origin");
        assert_eq!(
            bare.get("access-control-allow-origin").unwrap(),
            "https://a"
        );
    }

    #[test]
    fn edited_response_keeps_status_and_headers_and_goes_out_in_step() {
        let mut resp = ResponseHeader::build(201, None).unwrap();
        resp.insert_header("X-Upstream", "1").unwrap();
        edit_response(&mut resp, |p| {
            p.headers
                .insert(names::X_CACHE, HeaderValue::from_static("HIT"));
        });
        assert_eq!(resp.status, 201);
        assert_eq!(resp.headers.get("x-upstream").unwrap(), "1");
        assert_eq!(resp.headers.get("x-cache").unwrap(), "HIT");
        // Pingora's own inserts still work on the result (no second map to
        // fall out of step with), and it serializes.
        resp.insert_header("x-more", "2").unwrap();
        let mut wire = Vec::new();
        resp.header_to_h1_wire(&mut wire);
        let wire = String::from_utf8(wire).unwrap();
        assert!(wire.contains("x-upstream: 1\r\n"), "{wire}");
        assert!(wire.contains("x-more: 2\r\n"), "{wire}");
    }

    #[test]
    fn cors_allows_listed_origins_only() {
        let cors = CorsConfig {
            allow_origins: vec!["https://app.example.com".into()],
            allow_methods: vec!["GET".into(), "POST".into()],
            allow_headers: vec!["content-type".into()],
            expose_headers: vec!["retry-after".into(), "x-floodwall-reason".into()],
            allow_credentials: false,
            max_age: Duration::from_secs(600),
        };
        let h = cors_headers(&cors, Some("https://app.example.com"));
        assert!(h.contains(&(
            "access-control-allow-origin",
            "https://app.example.com".into()
        )));
        assert!(h.contains(&(
            "access-control-expose-headers",
            "retry-after, x-floodwall-reason".into()
        )));
        assert!(cors_headers(&cors, Some("https://evil.example")).is_empty());
        assert!(cors_headers(&cors, None).is_empty());
    }
}
