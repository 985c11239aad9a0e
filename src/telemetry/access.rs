//! The access log: one line per finished request, on the `access` target.
//!
//! It is formatted by hand (JSON or text, following `--log-format`) and
//! queued on the non-blocking writer, because it is the one log line every
//! request pays for: through `tracing`'s generic formatter it cost about a
//! third of floodwall's overhead over a bare Pingora proxy (BENCHMARKS.md).
//! It still honours `RUST_LOG` (`access=off` silences it).
//!
//! Never logged: `Authorization`, API keys, bodies.

use std::fmt::Write as _;
use std::sync::OnceLock;

use super::logging::LogFormat;
use crate::text::push_u64;

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

pub(crate) fn set_format(f: LogFormat) {
    let _ = FORMAT.set(f);
}

/// One request's access-log fields.
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    pub trace_id: &'a str,
    pub method: &'a str,
    pub route: &'a str,
    pub backend: &'a str,
    pub status: u16,
    pub latency_ms: f64,
    pub attempts: u32,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub reason: &'a str,
    pub stream_end: &'a str,
    pub user: &'a str,
    pub tokens: u64,
    pub usage: &'a str,
    pub error: &'a str,
}

/// Whether the access log is on (`RUST_LOG` may turn the target off).
pub fn enabled() -> bool {
    tracing::enabled!(target: "access", tracing::Level::INFO)
}

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    // Most values need no escaping: copy them whole.
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Append milliseconds with three decimals, as `{:.3}` writes them (to the
/// microsecond, rounded half away from zero).
fn push_ms(out: &mut String, ms: f64) {
    if !(0.0..1e12).contains(&ms) {
        let _ = write!(out, "{ms:.3}");
        return;
    }
    let micros = (ms * 1000.0).round() as u64;
    push_u64(out, micros / 1000);
    out.push('.');
    let frac = micros % 1000;
    for d in [frac / 100, frac / 10 % 10, frac % 10] {
        out.push(char::from(b'0' + d as u8));
    }
}

/// `,"name":`
fn json_key(out: &mut String, name: &str) {
    out.push_str(",\"");
    out.push_str(name);
    out.push_str("\":");
}

/// ` name=`
fn text_key(out: &mut String, name: &str) {
    out.push(' ');
    out.push_str(name);
    out.push('=');
}

/// The numeric fields both formats write in the same order; `key` writes
/// a field's name the format's way.
fn push_numbers(out: &mut String, line: &AccessLine<'_>, key: fn(&mut String, &str)) {
    key(out, "status");
    push_u64(out, u64::from(line.status));
    key(out, "latency_ms");
    push_ms(out, line.latency_ms);
    key(out, "attempts");
    push_u64(out, u64::from(line.attempts));
    key(out, "bytes_in");
    push_u64(out, line.bytes_in);
    key(out, "bytes_out");
    push_u64(out, line.bytes_out);
}

/// Format the line (without the trailing newline).
pub fn format(line: &AccessLine<'_>, format: LogFormat, timestamp: &str) -> String {
    let mut o = String::with_capacity(384);
    match format {
        LogFormat::Json => {
            o.push_str("{\"timestamp\":");
            json_str(&mut o, timestamp);
            o.push_str(",\"level\":\"INFO\",\"target\":\"access\"");
            let strs: [(&str, &str); 10] = [
                ("request_id", line.request_id),
                ("trace_id", line.trace_id),
                ("method", line.method),
                ("route", line.route),
                ("backend", line.backend),
                ("reason", line.reason),
                ("stream_end", line.stream_end),
                ("user", line.user),
                ("usage", line.usage),
                ("error", line.error),
            ];
            for (k, v) in strs {
                if !v.is_empty() || matches!(k, "request_id" | "route") {
                    json_key(&mut o, k);
                    json_str(&mut o, v);
                }
            }
            push_numbers(&mut o, line, json_key);
            json_key(&mut o, "tokens");
            push_u64(&mut o, line.tokens);
            o.push('}');
        }
        LogFormat::Text => {
            o.push_str(timestamp);
            for (k, v) in [
                ("  INFO access: request_id=", line.request_id),
                (" method=", line.method),
                (" route=", line.route),
                (" backend=", line.backend),
            ] {
                o.push_str(k);
                o.push_str(v);
            }
            push_numbers(&mut o, line, text_key);
            for (k, v) in [
                (" trace_id=", line.trace_id),
                (" reason=", line.reason),
                (" stream_end=", line.stream_end),
                (" user=", line.user),
                (" usage=", line.usage),
            ] {
                if !v.is_empty() {
                    o.push_str(k);
                    o.push_str(v);
                }
            }
            if line.tokens > 0 {
                o.push_str(" tokens=");
                push_u64(&mut o, line.tokens);
            }
            if !line.error.is_empty() {
                let _ = write!(o, " error={:?}", line.error);
            }
        }
    }
    o
}

/// RFC 3339 UTC timestamp with microseconds, without a date crate.
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    // The date and time to the second change once a second: format them
    // once per second and thread, then add the microseconds.
    thread_local! {
        static PREFIX: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    PREFIX.with(|cell| {
        let mut c = cell.borrow_mut();
        if c.0 != secs {
            *c = (secs, date_time(secs));
        }
        let mut out = String::with_capacity(c.1.len() + 8);
        out.push_str(&c.1);
        let micros = now.subsec_micros();
        out.push('.');
        let digits = [
            micros / 100_000,
            micros / 10_000 % 10,
            micros / 1_000 % 10,
            micros / 100 % 10,
            micros / 10 % 10,
            micros % 10,
        ];
        for d in digits {
            out.push(char::from(b'0' + d as u8));
        }
        out.push('Z');
        out
    })
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) for Unix seconds.
fn date_time(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
    )
}

/// Emit the line, if the access log is on.
pub fn emit(line: &AccessLine<'_>) {
    if !enabled() {
        return;
    }
    let f = FORMAT.get().copied().unwrap_or_default();
    let mut s = format(line, f, &now_rfc3339());
    s.push('\n');
    super::writer::send(s.into_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> AccessLine<'static> {
        AccessLine {
            request_id: "abc",
            trace_id: "",
            method: "POST",
            route: "chat",
            backend: "mock",
            status: 200,
            latency_ms: 1.5,
            attempts: 1,
            bytes_in: 10,
            bytes_out: 20,
            reason: "",
            stream_end: "complete",
            user: "u\"1",
            tokens: 0,
            usage: "",
            error: "",
        }
    }

    #[test]
    fn json_line_parses_and_escapes() {
        let s = format(&line(), LogFormat::Json, "2026-01-01T00:00:00.000000Z");
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["target"], "access");
        assert_eq!(v["request_id"], "abc");
        assert_eq!(v["user"], "u\"1");
        assert_eq!(v["status"], 200);
        assert!(v.get("trace_id").is_none());
    }

    #[test]
    fn numbers_are_written_as_the_formatter_writes_them() {
        for n in [0, 7, 10, 99, 100, 65_535, u64::MAX] {
            let mut o = String::new();
            push_u64(&mut o, n);
            assert_eq!(o, n.to_string());
        }
        for ms in [
            0.0,
            0.0004,
            0.0006,
            1.5,
            12.3456,
            999.9996,
            1234.5678,
            86_400_000.25,
        ] {
            let mut o = String::new();
            push_ms(&mut o, ms);
            assert_eq!(o, format!("{ms:.3}"), "{ms}");
        }
        let mut l = line();
        l.latency_ms = 12.3456;
        l.bytes_out = 1 << 40;
        let v: serde_json::Value = serde_json::from_str(&format(&l, LogFormat::Json, "T")).unwrap();
        assert_eq!(v["latency_ms"], 12.346);
        assert_eq!(v["bytes_out"], 1u64 << 40);
        assert_eq!(v["attempts"], 1);
        assert_eq!(v["tokens"], 0);
    }

    #[test]
    fn text_line_is_exact() {
        let mut l = line();
        l.tokens = 42;
        l.error = "boom \"x\"";
        l.trace_id = "t1";
        assert_eq!(
            format(&l, LogFormat::Text, "T"),
            "T  INFO access: request_id=abc method=POST route=chat backend=mock status=200 \
             latency_ms=1.500 attempts=1 bytes_in=10 bytes_out=20 trace_id=t1 \
             stream_end=complete user=u\"1 tokens=42 error=\"boom \\\"x\\\"\""
        );
    }

    #[test]
    fn text_line_has_the_fields() {
        let s = format(&line(), LogFormat::Text, "T");
        assert!(
            s.contains("route=chat")
                && s.contains("status=200")
                && s.contains("stream_end=complete"),
            "{s}"
        );
    }

    #[test]
    fn timestamp_is_rfc3339() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 27, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T');
        assert_eq!(date_time(1_700_000_000), "2023-11-14T22:13:20");
        assert_eq!(date_time(951_782_400), "2000-02-29T00:00:00");
        // The cached prefix follows the clock: two calls agree to the second.
        let (a, b) = (now_rfc3339(), now_rfc3339());
        assert!(a[..19] <= b[..19]);
    }
}
