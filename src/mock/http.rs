//! Just enough HTTP/1.1 for the mock: request heads via `httparse`,
//! Content-Length and chunked request bodies, response heads and chunk framing.

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest accepted request head (request line + headers).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Most header fields in one request.
pub const MAX_HEADERS: usize = 128;
/// Longest chunk-size or trailer line in a chunked body.
const MAX_LINE: usize = 8 * 1024;

#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer closed cleanly between requests.
    Eof,
    /// The peer closed in the middle of a request.
    Truncated,
    Io(io::Error),
    HeaderTooLarge,
    BodyTooLarge,
    Bad(&'static str),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub method: String,
    /// The request target as sent (path with query).
    pub target: String,
    /// The path without the query.
    pub path: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Lower-case names, in order.
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn header_tokens(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// Whether the connection may carry another request afterwards.
    pub fn keep_alive(&self) -> bool {
        let tokens = self.header_tokens("connection");
        if self.version >= 1 {
            !tokens.iter().any(|t| t == "close")
        } else {
            tokens.iter().any(|t| t == "keep-alive")
        }
    }

    pub fn expects_continue(&self) -> bool {
        self.version >= 1
            && self
                .header("expect")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
    }

    pub fn is_websocket_upgrade(&self) -> bool {
        self.header_tokens("upgrade")
            .iter()
            .any(|t| t == "websocket")
    }
}

pub(crate) enum BodyKind {
    Empty,
    Length(usize),
    Chunked,
}

impl BodyKind {
    pub fn is_empty(&self) -> bool {
        matches!(self, BodyKind::Empty | BodyKind::Length(0))
    }
}

/// Read one request head, leaving any bytes after it in `buf`.
pub(crate) async fn read_head<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> Result<Head, ReadError> {
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf[..]) {
                Ok(httparse::Status::Complete(n)) => {
                    if n > MAX_HEADER_BYTES {
                        return Err(ReadError::HeaderTooLarge);
                    }
                    let target = req.path.unwrap_or("/").to_string();
                    let path = target.split('?').next().unwrap_or("/").to_string();
                    let head = Head {
                        method: req.method.unwrap_or("GET").to_string(),
                        path,
                        target,
                        version: req.version.unwrap_or(1),
                        headers: req
                            .headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_ascii_lowercase(),
                                    String::from_utf8_lossy(h.value).into_owned(),
                                )
                            })
                            .collect(),
                    };
                    buf.advance(n);
                    return Ok(head);
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() > MAX_HEADER_BYTES {
                        return Err(ReadError::HeaderTooLarge);
                    }
                }
                Err(httparse::Error::TooManyHeaders) => return Err(ReadError::HeaderTooLarge),
                Err(_) => return Err(ReadError::Bad("malformed request head")),
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(8192);
        }
        let n = rd.read_buf(buf).await?;
        if n == 0 {
            return Err(if buf.is_empty() {
                ReadError::Eof
            } else {
                ReadError::Truncated
            });
        }
    }
}

/// How the request body is framed.
pub(crate) fn body_kind(head: &Head) -> Result<BodyKind, ReadError> {
    let te = head.header_tokens("transfer-encoding");
    if !te.is_empty() {
        // Transfer-Encoding wins over Content-Length; only chunked is understood.
        return if te.last().is_some_and(|t| t == "chunked") {
            Ok(BodyKind::Chunked)
        } else {
            Err(ReadError::Bad("unsupported transfer-encoding"))
        };
    }
    let mut len: Option<u64> = None;
    for v in head.header_tokens("content-length") {
        let n: u64 = if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
            v.parse()
                .map_err(|_| ReadError::Bad("bad content-length"))?
        } else {
            return Err(ReadError::Bad("bad content-length"));
        };
        if len.is_some_and(|l| l != n) {
            return Err(ReadError::Bad("conflicting content-length"));
        }
        len = Some(n);
    }
    match len {
        None => Ok(BodyKind::Empty),
        Some(n) if n > MAX_BODY_BYTES as u64 => Err(ReadError::BodyTooLarge),
        Some(n) => Ok(BodyKind::Length(n as usize)),
    }
}

/// Read the body described by `kind`, leaving any bytes after it in `buf`.
pub(crate) async fn read_body<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    kind: BodyKind,
) -> Result<Vec<u8>, ReadError> {
    match kind {
        BodyKind::Empty => Ok(Vec::new()),
        BodyKind::Length(n) => {
            fill(rd, buf, n).await?;
            Ok(buf.split_to(n).to_vec())
        }
        BodyKind::Chunked => {
            let mut body = Vec::new();
            loop {
                let line = read_line(rd, buf).await?;
                let size = line.split(';').next().unwrap_or("").trim();
                if size.is_empty() || size.len() > 15 {
                    return Err(ReadError::Bad("bad chunk size"));
                }
                let size = usize::from_str_radix(size, 16)
                    .map_err(|_| ReadError::Bad("bad chunk size"))?;
                if size == 0 {
                    let mut trailer_bytes = 0usize;
                    loop {
                        let t = read_line(rd, buf).await?;
                        if t.is_empty() {
                            return Ok(body);
                        }
                        trailer_bytes += t.len();
                        if trailer_bytes > MAX_HEADER_BYTES {
                            return Err(ReadError::HeaderTooLarge);
                        }
                    }
                }
                if body.len().saturating_add(size) > MAX_BODY_BYTES {
                    return Err(ReadError::BodyTooLarge);
                }
                fill(rd, buf, size + 2).await?;
                body.extend_from_slice(&buf[..size]);
                if &buf[size..size + 2] != b"\r\n" {
                    return Err(ReadError::Bad("chunk not followed by CRLF"));
                }
                buf.advance(size + 2);
            }
        }
    }
}

/// Read until `buf` holds at least `n` bytes.
async fn fill<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    n: usize,
) -> Result<(), ReadError> {
    while buf.len() < n {
        let want = (n - buf.len()).clamp(4096, 1024 * 1024);
        if buf.capacity() - buf.len() < want {
            buf.reserve(want);
        }
        if rd.read_buf(buf).await? == 0 {
            return Err(ReadError::Truncated);
        }
    }
    Ok(())
}

/// One CRLF- (or LF-) terminated line, without the terminator.
async fn read_line<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> Result<String, ReadError> {
    loop {
        if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let mut line = buf.split_to(pos + 1);
            line.truncate(pos);
            if line.last() == Some(&b'\r') {
                line.truncate(pos - 1);
            }
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if buf.len() > MAX_LINE {
            return Err(ReadError::Bad("line too long in chunked body"));
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        if rd.read_buf(buf).await? == 0 {
            return Err(ReadError::Truncated);
        }
    }
}

pub(crate) fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown")
}

/// `HTTP/1.1 S Reason\r\n` + headers + blank line.
pub(crate) fn head_bytes(status: u16, headers: &[(String, String)]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in headers {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// Frame `data` as one chunk (or pass it through unframed for HTTP/1.0).
pub(crate) fn frame(chunked: bool, data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    if chunked {
        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(data);
    }
}

pub(crate) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
