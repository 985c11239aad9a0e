//! Reading how long an upstream asked us to wait.
//!
//! Providers say it in several ways, all handled by [`server_hint`]:
//! - `Retry-After`, in delta-seconds (`120`) or as an HTTP date
//!   (`Sun, 06 Nov 1994 08:49:37 GMT`, the IMF-fixdate form of RFC 9110;
//!   the obsolete RFC 850 and asctime forms are not read);
//! - `retry-after-ms` (OpenAI and Azure), in milliseconds;
//! - `x-ratelimit-reset-requests` and `x-ratelimit-reset-tokens` (OpenAI,
//!   Groq...), as Go-style durations: `1s`, `6m0s`, `20ms`, `1.5s`, `2h3m`.
//!
//! **Which one wins.** `Retry-After` and `retry-after-ms` are explicit
//! instructions, so when either is present the larger of the two is the
//! hint and the reset headers are ignored. Otherwise the hint is the largest
//! `x-ratelimit-reset-*` whose quota is spent: OpenAI sends both reset
//! headers on every response, and `x-ratelimit-reset-requests: 6m0s` with
//! 59 requests remaining says when the request quota refills *completely*,
//! not when the next request may go. So a reset header whose matching
//! `x-ratelimit-remaining-*` is present and above zero is skipped; one with
//! no `remaining` header is taken at its word.
//!
//! Values that cannot be read are ignored, never an error: a malformed hint
//! just means "no hint".

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

/// The reset headers and the `remaining` header that says whether each
/// quota is spent.
const RESET_HEADERS: [(&str, &str); 2] = [
    (
        "x-ratelimit-reset-requests",
        "x-ratelimit-remaining-requests",
    ),
    ("x-ratelimit-reset-tokens", "x-ratelimit-remaining-tokens"),
];

/// How long the upstream asked us to wait before trying again, if it said
/// so (see the module docs for which header wins). A date in the past is a
/// zero wait. `now` is the wall clock, used only for HTTP dates.
pub fn server_hint(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let retry_after = text("retry-after").and_then(|v| parse_retry_after(v, now));
    let retry_after_ms = text("retry-after-ms").and_then(|v| {
        parse_decimal(v).map(|ms| Duration::from_secs_f64((ms / 1000.0).min(MAX_SECS)))
    });
    if retry_after.is_some() || retry_after_ms.is_some() {
        return retry_after.max(retry_after_ms);
    }
    RESET_HEADERS
        .iter()
        .filter(|(_, remaining)| {
            text(remaining)
                .and_then(parse_decimal)
                .is_none_or(|left| left <= 0.0)
        })
        .filter_map(|(reset, _)| text(reset).and_then(parse_reset_duration))
        .max()
}

/// Longest wait a hint can express (a year): keeps float conversions finite.
const MAX_SECS: f64 = 365.0 * 86_400.0;

/// A `Retry-After` value: delta-seconds (decimals tolerated) or an
/// IMF-fixdate.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Some(secs) = parse_decimal(value) {
        return Some(Duration::from_secs_f64(secs.min(MAX_SECS)));
    }
    let at = parse_http_date(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A non-negative decimal number (`12`, `1.5`); `None` for anything else.
fn parse_decimal(text: &str) -> Option<f64> {
    let text = text.trim();
    let valid = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && text.bytes().filter(|&b| b == b'.').count() <= 1
        && text.bytes().next().is_some_and(|b| b.is_ascii_digit());
    if !valid {
        return None;
    }
    text.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// A Go-style duration as OpenAI sends it: one or more `<number><unit>`
/// with units `h`, `m`, `s`, `ms`, `us`/`µs`, `ns` (`6m0s`, `1.5s`, `20ms`,
/// `2h3m`). A bare number has no unit and is refused.
pub fn parse_reset_duration(value: &str) -> Option<Duration> {
    let mut rest = value.trim();
    if rest.is_empty() {
        return None;
    }
    let mut secs = 0.0f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = parse_decimal(&rest[..number_end])?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_end..];
        secs += number * scale;
    }
    Some(Duration::from_secs_f64(secs.min(MAX_SECS)))
}

const DAY_NAMES: [&[u8; 3]; 7] = [b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun"];
const MONTH_NAMES: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), exactly as RFC 9110
/// §5.6.7 defines it. The day name must be one of the seven but is not
/// checked against the date.
pub fn parse_http_date(value: &str) -> Option<SystemTime> {
    let b = value.trim().as_bytes();
    if b.len() != 29 {
        return None;
    }
    let day_name: &[u8] = &b[0..3];
    if !DAY_NAMES.iter().any(|d| d.as_slice() == day_name) {
        return None;
    }
    let literal_ok = &b[3..5] == b", "
        && b[7] == b' '
        && b[11] == b' '
        && b[16] == b' '
        && b[19] == b':'
        && b[22] == b':'
        && &b[25..29] == b" GMT";
    if !literal_ok {
        return None;
    }
    let day = digits(&b[5..7])?;
    let month_name: &[u8] = &b[8..11];
    let month = MONTH_NAMES
        .iter()
        .position(|m| m.as_slice() == month_name)? as u64
        + 1;
    let year = digits(&b[12..16])?;
    let (hour, minute, second) = (
        digits(&b[17..19])?,
        digits(&b[20..22])?,
        digits(&b[23..25])?,
    );
    let valid = year >= 1970
        && (1..=days_in_month(year, month)).contains(&day)
        && hour < 24
        && minute < 60
        && second <= 60;
    if !valid {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

fn digits(b: &[u8]) -> Option<u64> {
    b.iter().try_fold(0u64, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + u64::from(c - b'0'))
    })
}

fn is_leap(year: u64) -> bool {
    (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given date (Howard Hinnant's
/// `days_from_civil`), for years from 1970 on.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    fn at(unix: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix)
    }

    #[test]
    fn http_dates_parse_to_the_right_instant() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(at(784_111_777))
        );
        assert_eq!(
            parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"),
            Some(at(0))
        );
        // A leap day and the turn of a century that is a leap year.
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2000 12:00:00 GMT"),
            Some(at(951_825_600))
        );
        assert_eq!(
            parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(at(1_445_412_480))
        );
        for bad in [
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Sun, 31 Apr 2024 08:49:37 GMT",
            "Sun, 29 Feb 2023 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Xyz, 06 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nox 1994 08:49:37 GMT",
            "Sun, 0a Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1969 08:49:37 GMT",
            "Sün, 06 Nov 1994 08:49:37 GMT",
            "",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn retry_after_in_seconds_and_as_a_date() {
        let now = at(1_445_412_480);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // A date in the past: go now.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        // Absurd values saturate at a year rather than overflow.
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(365 * 86_400))
        );
    }

    #[test]
    fn openai_reset_durations() {
        let d = |s| parse_reset_duration(s);
        assert_eq!(d("1s"), Some(Duration::from_secs(1)));
        assert_eq!(d("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(d("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(d("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(d("2h3m"), Some(Duration::from_secs(2 * 3600 + 180)));
        assert_eq!(d("1m30.5s"), Some(Duration::from_millis(90_500)));
        assert_eq!(d("0s"), Some(Duration::ZERO));
        assert_eq!(d("250µs"), Some(Duration::from_micros(250)));
        for bad in ["", "12", "1x", "s", "1.2.3s", "-1s", "1 s"] {
            assert_eq!(d(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_explicit_header_wins_over_the_reset_headers() {
        let now = at(1_445_412_480);
        let h = headers(&[
            ("retry-after", "20"),
            ("x-ratelimit-reset-requests", "6m0s"),
            ("x-ratelimit-remaining-requests", "0"),
        ]);
        assert_eq!(server_hint(&h, now), Some(Duration::from_secs(20)));
        let h = headers(&[("retry-after", "2"), ("retry-after-ms", "2500")]);
        assert_eq!(server_hint(&h, now), Some(Duration::from_millis(2500)));
        let h = headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:05 GMT")]);
        assert_eq!(server_hint(&h, now), Some(Duration::from_secs(5)));
    }

    #[test]
    fn reset_headers_count_only_for_a_spent_quota() {
        let now = at(0);
        // Tokens are spent, requests are not: only the tokens reset counts.
        let h = headers(&[
            ("x-ratelimit-reset-requests", "6m0s"),
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-reset-tokens", "1.5s"),
            ("x-ratelimit-remaining-tokens", "0"),
        ]);
        assert_eq!(server_hint(&h, now), Some(Duration::from_millis(1500)));
        // Without `remaining` headers, the largest reset is taken.
        let h = headers(&[
            ("x-ratelimit-reset-requests", "20ms"),
            ("x-ratelimit-reset-tokens", "2h3m"),
        ]);
        assert_eq!(server_hint(&h, now), Some(Duration::from_secs(7380)));
        // Both quotas left: the reset headers say nothing about this failure.
        let h = headers(&[
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-remaining-requests", "3"),
        ]);
        assert_eq!(server_hint(&h, now), None);
        // Unreadable values are no hint.
        let h = headers(&[
            ("retry-after", "later"),
            ("x-ratelimit-reset-tokens", "soon"),
        ]);
        assert_eq!(server_hint(&h, now), None);
        assert_eq!(server_hint(&HeaderMap::new(), now), None);
    }
}
