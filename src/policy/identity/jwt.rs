//! JSON Web Token verification: HS256 (HMAC-SHA256, written here on top of
//! `sha2`) and RS256 (RSA PKCS#1 v1.5 with SHA-256, through `ring`).
//!
//! A token is believed only once its signature verifies with the key the
//! policy configured *for the algorithm the token names*, and only if that
//! algorithm is in the source's `algorithms` list. So `alg: none` and the
//! classic HS256-signed-with-the-RSA-public-key confusion are both refused:
//! the public key is never used as an HMAC secret. `exp` and `nbf` are
//! checked against the caller's `now` (with the configured leeway); `iss` and
//! `aud` when configured. A token without `exp` does not expire.
//!
//! Errors name the reason and never the token: they reach logs and the
//! client's 401 body.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::limits::{JwtAlg, JwtSource};

/// Longer tokens are refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a token was not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    #[error("the token's algorithm `{0}` is not accepted here")]
    WrongAlgorithm(String),
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token expired {0}s ago")]
    Expired(u64),
    #[error("the token is not valid yet (nbf is {0}s in the future)")]
    NotYetValid(u64),
    #[error("the token has no `{0}` claim (or it is not a string or number)")]
    MissingClaim(String),
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    #[error("the token's audience is not accepted")]
    WrongAudience,
}

impl JwtError {
    /// A short stable code for metrics and the audit log.
    pub fn code(&self) -> &'static str {
        match self {
            JwtError::Malformed(_) => "malformed",
            JwtError::WrongAlgorithm(_) => "wrong_alg",
            JwtError::BadSignature => "bad_signature",
            JwtError::Expired(_) => "expired",
            JwtError::NotYetValid(_) => "not_yet_valid",
            JwtError::MissingClaim(_) => "missing_claim",
            JwtError::WrongIssuer => "wrong_issuer",
            JwtError::WrongAudience => "wrong_audience",
        }
    }
}

/// Whether `token` has the shape of a compact JWS: three non-empty
/// base64url segments separated by dots. A value that does not (an opaque
/// API key in the same header) is left to the next identity source.
fn looks_like_jwt(token: &str) -> bool {
    /// The base64url alphabet and `=`: one table lookup a byte.
    const B64URL: [bool; 256] = {
        let mut t = [false; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            t[b] = c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'=';
            b += 1;
        }
        t
    };
    let mut dots = 0;
    let mut segment_len = 0;
    for &b in token.as_bytes() {
        if b == b'.' {
            if segment_len == 0 {
                return false;
            }
            dots += 1;
            segment_len = 0;
        } else if B64URL[usize::from(b)] {
            segment_len += 1;
        } else {
            return false;
        }
    }
    dots == 2 && segment_len > 0
}

/// Verifies `token` for `source` at `now` (Unix seconds) and returns its
/// claims.
pub fn verify(
    source: &JwtSource,
    token: &str,
    now_unix_secs: u64,
) -> Result<Map<String, Value>, JwtError> {
    verify_with_times(source, token, now_unix_secs).map(|(claims, _)| claims)
}

/// [`verify`], also returning the token's `exp` and `nbf` (for the cache).
fn verify_with_times(
    source: &JwtSource,
    token: &str,
    now_unix_secs: u64,
) -> Result<(Map<String, Value>, Times), JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed("longer than 16 KiB"));
    }
    let mut parts = token.splitn(3, '.');
    let (Some(header_b64), Some(payload_b64), Some(sig_b64)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("not three dot-separated parts"));
    };
    if sig_b64.contains('.') {
        return Err(JwtError::Malformed("not three dot-separated parts"));
    }
    let header =
        b64_decode(header_b64, true).ok_or(JwtError::Malformed("the header is not base64url"))?;
    let header: Value = serde_json::from_slice(&header)
        .map_err(|_| JwtError::Malformed("the header is not JSON"))?;
    let alg_name = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(JwtError::Malformed("the header has no `alg`"))?;
    let alg = match alg_name {
        "HS256" => JwtAlg::Hs256,
        "RS256" => JwtAlg::Rs256,
        other => return Err(JwtError::WrongAlgorithm(truncate(other))),
    };
    if !source.algorithms.contains(&alg) {
        return Err(JwtError::WrongAlgorithm(alg_name.to_string()));
    }
    let signature =
        b64_decode(sig_b64, true).ok_or(JwtError::Malformed("the signature is not base64url"))?;
    let signed = &token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()];
    let verified = match alg {
        JwtAlg::Hs256 => source
            .hs256_secret
            .as_ref()
            .is_some_and(|k| constant_time_eq(&k.mac(signed), &signature)),
        JwtAlg::Rs256 => source.rs256_key.as_ref().is_some_and(|k| {
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                &k.0[..],
            )
            .verify(signed, &signature)
            .is_ok()
        }),
    };
    if !verified {
        return Err(JwtError::BadSignature);
    }
    let payload =
        b64_decode(payload_b64, true).ok_or(JwtError::Malformed("the payload is not base64url"))?;
    let claims: Map<String, Value> = serde_json::from_slice(&payload)
        .map_err(|_| JwtError::Malformed("the payload is not a JSON object"))?;
    let times = times(&claims)?;
    times.check(source, now_unix_secs)?;
    if let Some(issuer) = &source.issuer {
        if claims.get("iss").and_then(Value::as_str) != Some(issuer.as_str()) {
            return Err(JwtError::WrongIssuer);
        }
    }
    if let Some(audience) = &source.audience {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => a == audience,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(audience.as_str())),
            _ => false,
        };
        if !ok {
            return Err(JwtError::WrongAudience);
        }
    }
    Ok((claims, times))
}

/// A token's `exp` and `nbf` claims, as numbers.
#[derive(Debug, Clone, Copy)]
struct Times {
    exp: Option<f64>,
    nbf: Option<f64>,
}

fn times(claims: &Map<String, Value>) -> Result<Times, JwtError> {
    let number = |name: &str, err: &'static str| match claims.get(name) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or(JwtError::Malformed(err)),
    };
    Ok(Times {
        exp: number("exp", "`exp` is not a number")?,
        nbf: number("nbf", "`nbf` is not a number")?,
    })
}

impl Times {
    /// Whether the token is valid at `now_unix_secs`, with the leeway.
    fn check(self, source: &JwtSource, now_unix_secs: u64) -> Result<(), JwtError> {
        let leeway = source.leeway.as_secs_f64();
        let now = now_unix_secs as f64;
        if let Some(exp) = self.exp {
            if now >= exp + leeway {
                return Err(JwtError::Expired((now - exp).max(0.0) as u64));
            }
        }
        if let Some(nbf) = self.nbf {
            if now + leeway < nbf {
                return Err(JwtError::NotYetValid((nbf - now).ceil() as u64));
            }
        }
        Ok(())
    }
}

/// Tokens that verified for one source, with their claims: a client sends
/// the same token on every request until it expires, and its signature
/// and JSON are checked once, not every time. Only a token whose
/// signature verified gets in, so junk cannot fill it; a hit is a lookup
/// of the whole token (keyed hash, then a full comparison) and a check of
/// its `exp` and `nbf` against the request's clock. At most
/// [`VERIFIED_MAX`] tokens; when full it starts over. A reload compiles a
/// new source, and so a new, empty cache (the key may have changed).
#[derive(Clone, Default)]
pub struct Verified(Arc<Mutex<VerifiedMap>>);

/// Token -> its claims and their times.
type VerifiedMap = HashMap<Box<str>, (Arc<Map<String, Value>>, Times)>;

/// Tokens kept per source (a few hundred bytes each).
pub const VERIFIED_MAX: usize = 4096;

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verified(..)")
    }
}

impl Verified {
    fn lock(&self) -> std::sync::MutexGuard<'_, VerifiedMap> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// [`verify`], through the source's cache of tokens that verified, for a
/// header value that may not be a JWT at all: `None` when it does not have
/// the shape of one ([`looks_like_jwt`]). The shape is only checked on a
/// cache miss: a cached token had it.
pub fn verify_if_jwt(
    source: &JwtSource,
    token: &str,
    now_unix_secs: u64,
) -> Option<Result<Arc<Map<String, Value>>, JwtError>> {
    if let Some(hit) = cached(source, token, now_unix_secs) {
        return Some(hit);
    }
    looks_like_jwt(token).then(|| verify_and_cache(source, token, now_unix_secs))
}

/// The cached claims of `token`, if it verified before (its times are
/// checked again at `now`).
fn cached(
    source: &JwtSource,
    token: &str,
    now_unix_secs: u64,
) -> Option<Result<Arc<Map<String, Value>>, JwtError>> {
    let (claims, times) = source.verified.lock().get(token).cloned()?;
    Some(times.check(source, now_unix_secs).map(|()| claims))
}

fn verify_and_cache(
    source: &JwtSource,
    token: &str,
    now_unix_secs: u64,
) -> Result<Arc<Map<String, Value>>, JwtError> {
    let (claims, times) = verify_with_times(source, token, now_unix_secs)?;
    let claims = Arc::new(claims);
    let mut cache = source.verified.lock();
    if cache.len() >= VERIFIED_MAX {
        cache.clear();
    }
    cache.insert(token.into(), (claims.clone(), times));
    Ok(claims)
}

/// A claim as a string: strings as they are, numbers in decimal.
pub fn claim_string(claims: &Map<String, Value>, name: &str) -> Option<String> {
    match claims.get(name)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(16).collect()
}

/// An HMAC-SHA256 key (RFC 2104) with its two padded key blocks already
/// hashed: each token then costs the hash of its own bytes and one more
/// block, instead of re-hashing the key's blocks every time. Never printed.
#[derive(Clone)]
pub struct HmacKey {
    inner: Sha256,
    outer: Sha256,
}

impl HmacKey {
    pub fn new(key: &[u8]) -> Self {
        const BLOCK: usize = 64;
        let mut block = [0u8; BLOCK];
        if key.len() > BLOCK {
            block[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let mut inner = Sha256::new();
        inner.update(block.map(|b| b ^ 0x36));
        let mut outer = Sha256::new();
        outer.update(block.map(|b| b ^ 0x5c));
        HmacKey { inner, outer }
    }

    /// The MAC of `message`.
    pub fn mac(&self, message: &[u8]) -> [u8; 32] {
        let mut inner = self.inner.clone();
        inner.update(message);
        let mut outer = self.outer.clone();
        outer.update(inner.finalize());
        outer.finalize().into()
    }
}

impl std::fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HmacKey(<secret>)")
    }
}

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    HmacKey::new(key).mac(message)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decodes base64 (standard alphabet, or URL-safe when `url`), with or
/// without `=` padding. ASCII whitespace is skipped in the standard
/// alphabet (PEM bodies span lines). `None` on any other character.
pub fn b64_decode(text: &str, url: bool) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    let mut padding = false;
    for &c in text.as_bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' if !url => 62,
            b'/' if !url => 63,
            b'-' if url => 62,
            b'_' if url => 63,
            b'=' => {
                padding = true;
                continue;
            }
            b' ' | b'\t' | b'\r' | b'\n' if !url => continue,
            _ => return None,
        };
        if padding {
            return None;
        }
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // Leftover bits must be fewer than a byte's worth and all zero.
    (bits < 6 && acc == 0).then_some(out)
}

/// The DER `RSAPublicKey` (PKCS#1) inside a PEM `PUBLIC KEY`
/// (SubjectPublicKeyInfo, as `openssl rsa -pubout` writes it) or
/// `RSA PUBLIC KEY` block. The modulus must be 2048 to 8192 bits.
pub fn rsa_public_key_from_pem(text: &str) -> Result<Vec<u8>, String> {
    let block = |label: &str| -> Option<&str> {
        let begin = format!("-----BEGIN {label}-----");
        let end = format!("-----END {label}-----");
        let start = text.find(&begin)? + begin.len();
        let stop = text[start..].find(&end)? + start;
        Some(&text[start..stop])
    };
    let (der, spki) = if let Some(body) = block("PUBLIC KEY") {
        (
            b64_decode(body, false).ok_or("the PEM body is not base64")?,
            true,
        )
    } else if let Some(body) = block("RSA PUBLIC KEY") {
        (
            b64_decode(body, false).ok_or("the PEM body is not base64")?,
            false,
        )
    } else if text.contains("PRIVATE KEY-----") {
        return Err(
            "holds a private key; give the public key instead (`openssl rsa -in key.pem -pubout`)"
                .into(),
        );
    } else if text.contains("-----BEGIN CERTIFICATE-----") {
        return Err("holds a certificate; extract its public key (`openssl x509 -in cert.pem -pubkey -noout`)".into());
    } else {
        return Err("has no `-----BEGIN PUBLIC KEY-----` block".into());
    };
    let rsa = if spki { spki_rsa_key(&der)? } else { der };
    check_rsa_public_key(&rsa)?;
    Ok(rsa)
}

/// rsaEncryption, 1.2.840.113549.1.1.1.
const RSA_ENCRYPTION_OID: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

fn spki_rsa_key(der: &[u8]) -> Result<Vec<u8>, String> {
    let bad = |what: &str| format!("is not an RSA public key ({what})");
    let (tag, spki, _) = der_tlv(der).ok_or_else(|| bad("not DER"))?;
    if tag != 0x30 {
        return Err(bad("not a SubjectPublicKeyInfo"));
    }
    let (tag, alg, rest) = der_tlv(spki).ok_or_else(|| bad("no algorithm"))?;
    if tag != 0x30 {
        return Err(bad("no algorithm"));
    }
    let (tag, oid, _) = der_tlv(alg).ok_or_else(|| bad("no algorithm"))?;
    if tag != 0x06 || oid != RSA_ENCRYPTION_OID {
        return Err(bad(
            "the algorithm is not rsaEncryption; RS256 needs an RSA key",
        ));
    }
    let (tag, bits, _) = der_tlv(rest).ok_or_else(|| bad("no key"))?;
    if tag != 0x03 || bits.first() != Some(&0) {
        return Err(bad("no key"));
    }
    Ok(bits[1..].to_vec())
}

fn check_rsa_public_key(der: &[u8]) -> Result<(), String> {
    let bad = || "is not an RSA public key (bad RSAPublicKey structure)".to_string();
    let (tag, seq, _) = der_tlv(der).ok_or_else(bad)?;
    if tag != 0x30 {
        return Err(bad());
    }
    let (tag, n, rest) = der_tlv(seq).ok_or_else(bad)?;
    let (tag_e, _, _) = der_tlv(rest).ok_or_else(bad)?;
    if tag != 0x02 || tag_e != 0x02 {
        return Err(bad());
    }
    let n = match n.split_first() {
        Some((0, rest)) => rest,
        _ => n,
    };
    let bits = n.len() * 8 - n.first().map_or(8, |b| b.leading_zeros() as usize);
    if !(2048..=8192).contains(&bits) {
        return Err(format!(
            "the RSA key has {bits} bits; RS256 here needs 2048 to 8192"
        ));
    }
    Ok(())
}

/// One DER tag-length-value: (tag, contents, the bytes after it).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Base64url without padding, for building test tokens.
#[cfg(test)]
pub(crate) fn b64url_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::limits::KeyBytes;
    use std::time::Duration;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_700_000_000;

    fn fixture(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwt")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn hs_source() -> JwtSource {
        JwtSource {
            header: "authorization".into(),
            claim: "sub".into(),
            algorithms: vec![JwtAlg::Hs256],
            secret_env: Some("JWT_SECRET".into()),
            hs256_secret: Some(HmacKey::new(SECRET)),
            public_key_file: None,
            rs256_key: None,
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
            verified: Default::default(),
        }
    }

    fn rs_source() -> JwtSource {
        let key = rsa_public_key_from_pem(&fixture("rs256-public.pem")).unwrap();
        JwtSource {
            algorithms: vec![JwtAlg::Rs256],
            hs256_secret: None,
            rs256_key: Some(KeyBytes(key.into())),
            ..hs_source()
        }
    }

    pub(crate) fn hs256_token(secret: &[u8], header: &str, payload: &str) -> String {
        let signed = format!(
            "{}.{}",
            b64url_encode(header.as_bytes()),
            b64url_encode(payload.as_bytes())
        );
        let sig = hmac_sha256(secret, signed.as_bytes());
        format!("{signed}.{}", b64url_encode(&sig))
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// [`verify_if_jwt`] for a token of the right shape.
    fn verify_cached(
        source: &JwtSource,
        token: &str,
        now: u64,
    ) -> Result<Arc<Map<String, Value>>, JwtError> {
        verify_if_jwt(source, token, now).expect("a JWT-shaped token")
    }

    #[test]
    fn a_verified_token_is_remembered_and_still_expires() {
        let source = hs_source();
        let t = hs256_token(
            SECRET,
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"alice","exp":1700000100,"nbf":1699999990}"#,
        );
        let first = verify_cached(&source, &t, NOW).unwrap();
        assert_eq!(claim_string(&first, "sub").as_deref(), Some("alice"));
        let again = verify_cached(&source, &t, NOW + 1).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "the second use is a hit");
        // The hit still checks the clock, with the same answers as verify.
        assert_eq!(
            verify_cached(&source, &t, NOW + 105),
            Err(JwtError::Expired(5))
        );
        assert_eq!(verify(&source, &t, NOW + 105), Err(JwtError::Expired(5)));
        assert_eq!(
            verify_cached(&source, &t, NOW - 20),
            Err(JwtError::NotYetValid(10))
        );
        // A token that does not verify is never remembered.
        let forged = hs256_token(
            b"another-secret-0123456789",
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"eve"}"#,
        );
        for _ in 0..2 {
            assert_eq!(
                verify_cached(&source, &forged, NOW),
                Err(JwtError::BadSignature)
            );
        }
        assert_eq!(source.verified.lock().len(), 1);
        // A new source (a reload, maybe with another key) starts empty.
        let mut rotated = hs_source();
        rotated.hs256_secret = Some(HmacKey::new(b"rotated-secret-0123456789"));
        assert_eq!(
            verify_cached(&rotated, &t, NOW),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn the_verified_cache_is_bounded() {
        let source = hs_source();
        for i in 0..VERIFIED_MAX + 10 {
            let t = hs256_token(
                SECRET,
                r#"{"alg":"HS256"}"#,
                &format!(r#"{{"sub":"u{i}"}}"#),
            );
            let c = verify_cached(&source, &t, NOW).unwrap();
            assert_eq!(claim_string(&c, "sub"), Some(format!("u{i}")));
            assert!(source.verified.lock().len() <= VERIFIED_MAX);
        }
    }

    #[test]
    fn jwt_shape() {
        for (t, ok) in [
            ("a.b.c", true),
            ("aB-_=.0.9", true),
            ("a.b", false),
            ("a.b.c.d", false),
            ("a..c", false),
            (".b.c", false),
            ("a.b.", false),
            ("a.b c.d", false),
            ("a.b.c+", false),
            ("", false),
            ("sk-live-123", false),
        ] {
            assert_eq!(looks_like_jwt(t), ok, "{t}");
        }
    }

    #[test]
    fn base64_both_alphabets_with_and_without_padding() {
        assert_eq!(b64_decode("aGVsbG8", true).unwrap(), b"hello");
        assert_eq!(b64_decode("aGVsbG8=", false).unwrap(), b"hello");
        assert_eq!(b64_decode("-_8", true).unwrap(), [0xfb, 0xff]);
        assert_eq!(b64_decode("+/8=", false).unwrap(), [0xfb, 0xff]);
        assert!(b64_decode("+/8", true).is_none());
        assert!(b64_decode("a", true).is_none());
        assert!(b64_decode("aGVsbG8=x", false).is_none());
        assert_eq!(b64url_encode(b"hello"), "aGVsbG8");
    }

    #[test]
    fn hs256_valid_token_yields_its_claims() {
        let t = hs256_token(
            SECRET,
            r#"{"alg":"HS256","typ":"JWT"}"#,
            r#"{"sub":"alice","exp":1700000100,"tier":"premium"}"#,
        );
        let claims = verify(&hs_source(), &t, NOW).unwrap();
        assert_eq!(claim_string(&claims, "sub").as_deref(), Some("alice"));
        assert!(looks_like_jwt(&t));
    }

    #[test]
    fn hs256_expired_not_yet_valid_and_leeway() {
        let t = hs256_token(
            SECRET,
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"a","exp":1699999990}"#,
        );
        assert_eq!(verify(&hs_source(), &t, NOW), Err(JwtError::Expired(10)));
        let mut lenient = hs_source();
        lenient.leeway = Duration::from_secs(30);
        assert!(verify(&lenient, &t, NOW).is_ok());
        // Exactly at `exp` the token is expired (RFC 7519: "on or after").
        let at = hs256_token(
            SECRET,
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"a","exp":1700000000}"#,
        );
        assert_eq!(verify(&hs_source(), &at, NOW), Err(JwtError::Expired(0)));
        let early = hs256_token(
            SECRET,
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"a","nbf":1700000060}"#,
        );
        assert_eq!(
            verify(&hs_source(), &early, NOW),
            Err(JwtError::NotYetValid(60))
        );
    }

    #[test]
    fn hs256_bad_signature_and_tampered_payload() {
        let other = hs256_token(
            b"another-secret-of-32-bytes-long!",
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"a"}"#,
        );
        assert_eq!(
            verify(&hs_source(), &other, NOW),
            Err(JwtError::BadSignature)
        );
        let good = hs256_token(SECRET, r#"{"alg":"HS256"}"#, r#"{"sub":"alice"}"#);
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64url_encode(br#"{"sub":"admin"}"#),
            parts[2]
        );
        assert_eq!(
            verify(&hs_source(), &forged, NOW),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn wrong_and_none_algorithms_are_refused() {
        let none = format!(
            "{}.{}.",
            b64url_encode(br#"{"alg":"none"}"#),
            b64url_encode(br#"{"sub":"a"}"#)
        );
        assert!(matches!(
            verify(&hs_source(), &none, NOW),
            Err(JwtError::WrongAlgorithm(_)) | Err(JwtError::Malformed(_))
        ));
        let none_sig = format!("{none}AAAA");
        assert_eq!(
            verify(&hs_source(), &none_sig, NOW),
            Err(JwtError::WrongAlgorithm("none".into()))
        );
        // An HS256 token where only RS256 is accepted: refused before any
        // key is touched (no HMAC keyed with the public key).
        let hs = hs256_token(SECRET, r#"{"alg":"HS256"}"#, r#"{"sub":"a"}"#);
        assert_eq!(
            verify(&rs_source(), &hs, NOW),
            Err(JwtError::WrongAlgorithm("HS256".into()))
        );
        assert_eq!(JwtError::WrongAlgorithm("HS256".into()).code(), "wrong_alg");
    }

    #[test]
    fn malformed_tokens_say_why() {
        for (token, why) in [
            ("abc", "not three"),
            ("a.b", "not three"),
            ("!!.e30.sig", "header is not base64url"),
            ("e30.e30.c2ln", "no `alg`"),
        ] {
            let err = verify(&hs_source(), token, NOW).unwrap_err();
            assert!(err.to_string().contains(why), "{token}: {err}");
        }
        assert!(!looks_like_jwt("sk-live-abcdef"));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(!looks_like_jwt("a..c"));
    }

    #[test]
    fn issuer_and_audience_when_configured() {
        let mut s = hs_source();
        s.issuer = Some("https://auth.example.com".into());
        s.audience = Some("floodwall".into());
        let ok = hs256_token(
            SECRET,
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"a","iss":"https://auth.example.com","aud":["x","floodwall"]}"#,
        );
        assert!(verify(&s, &ok, NOW).is_ok());
        let bad_iss = hs256_token(
            SECRET,
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"a","iss":"evil","aud":"floodwall"}"#,
        );
        assert_eq!(verify(&s, &bad_iss, NOW), Err(JwtError::WrongIssuer));
        let bad_aud = hs256_token(
            SECRET,
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"a","iss":"https://auth.example.com","aud":"other"}"#,
        );
        assert_eq!(verify(&s, &bad_aud, NOW), Err(JwtError::WrongAudience));
    }

    #[test]
    fn rs256_premade_token_verifies_with_the_fixture_key() {
        let token = fixture("rs256-token.txt");
        let claims = verify(&rs_source(), token.trim(), NOW).unwrap();
        assert_eq!(claim_string(&claims, "sub").as_deref(), Some("rs-user-1"));
        assert_eq!(claim_string(&claims, "tier").as_deref(), Some("premium"));
        // Far in the future the same token has expired.
        assert!(matches!(
            verify(&rs_source(), token.trim(), 4_200_000_000),
            Err(JwtError::Expired(_))
        ));
        // One flipped signature byte.
        let mut bad = token.trim().to_string();
        let last = bad.pop().unwrap();
        bad.push(if last == 'A' { 'B' } else { 'A' });
        assert_eq!(verify(&rs_source(), &bad, NOW), Err(JwtError::BadSignature));
    }

    #[test]
    fn pem_parsing_accepts_spki_and_explains_other_blocks() {
        assert!(rsa_public_key_from_pem(&fixture("rs256-public.pem")).is_ok());
        let private = rsa_public_key_from_pem(
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        assert!(private.unwrap_err().contains("private key"));
        assert!(rsa_public_key_from_pem("hello")
            .unwrap_err()
            .contains("BEGIN PUBLIC KEY"));
        let junk =
            rsa_public_key_from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----");
        assert!(junk.unwrap_err().contains("not an RSA public key"));
    }
}
