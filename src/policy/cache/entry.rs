//! A stored response and its binary encoding.
//!
//! Layout (version `FWE1`), all integers little-endian:
//! `"FWE1"`, a flags byte (bit 0: the rest is deflate-compressed), then
//! status `u16`, sse `u8`, stored_at_ms `u64`, ttl_ms `u64`, keep_ms `u64`,
//! the header count `u32` and each header as `u32` length + name, `u32`
//! length + value, then the chunk count `u32` and each chunk as its arrival
//! offset in ms `u32`, `u32` length + bytes. A new layout gets a new magic
//! (and a new key version); an entry that does not decode is a miss.

use std::io::{Read, Write};

use bytes::Bytes;

const MAGIC: &[u8; 4] = b"FWE1";
const COMPRESSED: u8 = 1;
/// An encoded entry larger than this is refused when decoding (a corrupt
/// length must not allocate gigabytes).
const MAX_DECODED: usize = 256 << 20;

/// One piece of the body as it arrived, `at_ms` after the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub at_ms: u32,
    pub data: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub status: u16,
    /// End-to-end headers kept from the upstream (see `rules::keep_header`).
    pub headers: Vec<(String, Vec<u8>)>,
    pub chunks: Vec<Chunk>,
    /// `text/event-stream`: replayed chunk by chunk.
    pub sse: bool,
    /// Wall-clock time it was stored (for `Age` and freshness across replicas).
    pub stored_at_ms: u64,
    /// Fresh for this long after `stored_at_ms`.
    pub ttl_ms: u64,
    /// Kept (fresh, then stale) for this long after `stored_at_ms`.
    pub keep_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a floodwall cache entry (unknown version)")]
    Version,
    #[error("truncated or corrupt cache entry")]
    Corrupt,
}

impl Entry {
    pub fn body_len(&self) -> usize {
        self.chunks.iter().map(|c| c.data.len()).sum()
    }

    /// The whole body in one piece.
    pub fn body(&self) -> Bytes {
        match self.chunks.as_slice() {
            [] => Bytes::new(),
            [one] => one.data.clone(),
            many => {
                let mut v = Vec::with_capacity(self.body_len());
                for c in many {
                    v.extend_from_slice(&c.data);
                }
                Bytes::from(v)
            }
        }
    }

    /// Bytes this entry accounts for in the memory tier.
    pub fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 16)
            .sum();
        64 + headers + self.body_len() + self.chunks.len() * 24
    }

    pub fn is_fresh(&self, now_ms: u64) -> bool {
        now_ms < self.stored_at_ms.saturating_add(self.ttl_ms)
    }

    /// Still kept (fresh or within `stale_if_error`).
    pub fn is_kept(&self, now_ms: u64) -> bool {
        now_ms < self.stored_at_ms.saturating_add(self.keep_ms)
    }

    /// The `Age` header value, in whole seconds.
    pub fn age_secs(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_at_ms) / 1000
    }

    /// Encode, deflate-compressing when the payload is larger than
    /// `compress_over`.
    pub fn encode(&self, compress_over: Option<usize>) -> Vec<u8> {
        let mut p = Vec::with_capacity(self.size());
        p.extend_from_slice(&self.status.to_le_bytes());
        p.push(u8::from(self.sse));
        p.extend_from_slice(&self.stored_at_ms.to_le_bytes());
        p.extend_from_slice(&self.ttl_ms.to_le_bytes());
        p.extend_from_slice(&self.keep_ms.to_le_bytes());
        p.extend_from_slice(&(self.headers.len() as u32).to_le_bytes());
        for (k, v) in &self.headers {
            put_bytes(&mut p, k.as_bytes());
            put_bytes(&mut p, v);
        }
        p.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            p.extend_from_slice(&c.at_ms.to_le_bytes());
            put_bytes(&mut p, &c.data);
        }
        let mut out = Vec::with_capacity(p.len() + 5);
        out.extend_from_slice(MAGIC);
        if compress_over.is_some_and(|limit| p.len() > limit) {
            let mut z = flate2::write::DeflateEncoder::new(
                Vec::with_capacity(p.len() / 2),
                flate2::Compression::fast(),
            );
            if z.write_all(&p).is_ok() {
                if let Ok(compressed) = z.finish() {
                    out.push(COMPRESSED);
                    out.extend_from_slice(&compressed);
                    return out;
                }
            }
        }
        out.push(0);
        out.extend_from_slice(&p);
        out
    }

    pub fn decode(raw: &[u8]) -> Result<Entry, DecodeError> {
        if raw.len() < 5 || &raw[..4] != MAGIC {
            return Err(DecodeError::Version);
        }
        let inflated;
        let payload: &[u8] = if raw[4] & COMPRESSED != 0 {
            let mut v = Vec::new();
            flate2::read::DeflateDecoder::new(&raw[5..])
                .take(MAX_DECODED as u64 + 1)
                .read_to_end(&mut v)
                .map_err(|_| DecodeError::Corrupt)?;
            if v.len() > MAX_DECODED {
                return Err(DecodeError::Corrupt);
            }
            inflated = v;
            &inflated
        } else {
            &raw[5..]
        };
        let mut r = Reader(payload);
        let status = u16::from_le_bytes(r.array()?);
        let sse = r.array::<1>()?[0] != 0;
        let stored_at_ms = u64::from_le_bytes(r.array()?);
        let ttl_ms = u64::from_le_bytes(r.array()?);
        let keep_ms = u64::from_le_bytes(r.array()?);
        let n = u32::from_le_bytes(r.array()?) as usize;
        let mut headers = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            let k = String::from_utf8(r.bytes()?.to_vec()).map_err(|_| DecodeError::Corrupt)?;
            let v = r.bytes()?.to_vec();
            headers.push((k, v));
        }
        let n = u32::from_le_bytes(r.array()?) as usize;
        let mut chunks = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let at_ms = u32::from_le_bytes(r.array()?);
            let data = Bytes::copy_from_slice(r.bytes()?);
            chunks.push(Chunk { at_ms, data });
        }
        if !r.0.is_empty() {
            return Err(DecodeError::Corrupt);
        }
        Ok(Entry {
            status,
            headers,
            chunks,
            sse,
            stored_at_ms,
            ttl_ms,
            keep_ms,
        })
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self.0.split_at_checked(N).ok_or(DecodeError::Corrupt)?;
        self.0 = rest;
        head.try_into().map_err(|_| DecodeError::Corrupt)
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = u32::from_le_bytes(self.array()?) as usize;
        let (head, rest) = self.0.split_at_checked(n).ok_or(DecodeError::Corrupt)?;
        self.0 = rest;
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(body: &str) -> Entry {
        Entry {
            status: 200,
            headers: vec![("content-type".into(), b"text/event-stream".to_vec())],
            chunks: vec![
                Chunk {
                    at_ms: 0,
                    data: Bytes::from(format!("data: {body}\n\n")),
                },
                Chunk {
                    at_ms: 40,
                    data: Bytes::from_static(b"data: [DONE]\n\n"),
                },
            ],
            sse: true,
            stored_at_ms: 1_700_000_000_000,
            ttl_ms: 60_000,
            keep_ms: 120_000,
        }
    }

    #[test]
    fn round_trips_plain_and_compressed() {
        let e = sample(&"x".repeat(5000));
        let plain = e.encode(None);
        assert_eq!(plain[4], 0);
        assert_eq!(Entry::decode(&plain).unwrap(), e);
        let z = e.encode(Some(1024));
        assert_eq!(z[4], COMPRESSED);
        assert!(z.len() < plain.len() / 4, "{} vs {}", z.len(), plain.len());
        assert_eq!(Entry::decode(&z).unwrap(), e);
        // Under the threshold it stays plain.
        assert_eq!(e.encode(Some(1 << 20))[4], 0);
    }

    #[test]
    fn corrupt_or_foreign_bytes_are_errors_not_panics() {
        let e = sample("hi").encode(None);
        assert_eq!(Entry::decode(b"nope"), Err(DecodeError::Version));
        assert_eq!(Entry::decode(b"FWE0\0xxxx"), Err(DecodeError::Version));
        for cut in 5..e.len() {
            assert!(Entry::decode(&e[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = e.clone();
        extra.push(0);
        assert_eq!(Entry::decode(&extra), Err(DecodeError::Corrupt));
        assert_eq!(Entry::decode(b"FWE1\x01garbage"), Err(DecodeError::Corrupt));
    }

    #[test]
    fn freshness_stale_window_and_age() {
        let e = sample("hi");
        let t0 = e.stored_at_ms;
        assert!(e.is_fresh(t0));
        assert!(e.is_fresh(t0 + 59_999));
        assert!(!e.is_fresh(t0 + 60_000));
        assert!(e.is_kept(t0 + 60_000));
        assert!(!e.is_kept(t0 + 120_000));
        assert_eq!(e.age_secs(t0 + 2_999), 2);
        assert_eq!(e.age_secs(t0 - 5), 0);
        assert_eq!(e.body().len(), "data: hi\n\ndata: [DONE]\n\n".len());
    }
}
