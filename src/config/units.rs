//! The unit syntax of the policy file: durations, sizes and ratios.
//!
//! Operators write `250ms`, `10s`, `5m`, `1h`, `1d` for durations, `512B`,
//! `64KiB`, `1MiB`, `10MB` for sizes and `50%` for ratios. These parsers are
//! strict on purpose: a unit is required (except for a bare `0` duration or a
//! plain byte count), so that `timeout: 30` can never silently mean 30 ns or
//! 30 hours. Their error text lists the accepted forms, because it is shown to
//! operators as is.
//!
//! The `format_*` functions print values back in the same syntax, for error
//! messages such as `must be 1B..=1GiB (was 2GiB)`.

use std::time::Duration;

/// What a duration looks like, for error messages.
pub const DURATION_FORMS: &str =
    "a duration such as 250ms, 10s, 5m, 1h or 1d (a number followed by ms, s, m, h or d)";
/// What a size looks like, for error messages.
pub const SIZE_FORMS: &str = "a size such as 512B, 64KiB, 1MiB, 2GiB or 10MB \
     (KiB/MiB/GiB are powers of 1024, KB/MB/GB powers of 1000; a plain number is bytes)";
/// What a ratio looks like, for error messages.
pub const RATIO_FORMS: &str = "a percentage such as 50% or 12.5% (0% to 100%)";

const NANOS_PER_MS: u128 = 1_000_000;
const DURATION_UNITS: &[(&str, u128)] = &[
    ("ms", NANOS_PER_MS),
    ("s", 1_000 * NANOS_PER_MS),
    ("m", 60 * 1_000 * NANOS_PER_MS),
    ("h", 3_600 * 1_000 * NANOS_PER_MS),
    ("d", 86_400 * 1_000 * NANOS_PER_MS),
];

const KIB: u128 = 1024;
const SIZE_UNITS: &[(&str, u128)] = &[
    ("B", 1),
    ("KiB", KIB),
    ("MiB", KIB * KIB),
    ("GiB", KIB * KIB * KIB),
    ("TiB", KIB * KIB * KIB * KIB),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
];

/// Parses `250ms`, `10s`, `5m`, `1h`, `1d`, decimals such as `1.5s`, and a
/// bare `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let bad = || format!("expected {DURATION_FORMS}, got `{text}`");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let (number, unit) = split_number(text).ok_or_else(bad)?;
    let Some(&(_, scale)) = DURATION_UNITS.iter().find(|(name, _)| *name == unit) else {
        if unit.is_empty() {
            return Err(format!("`{text}` has no unit; expected {DURATION_FORMS}"));
        }
        return Err(bad());
    };
    let nanos = scale_decimal(number, scale).ok_or_else(bad)?;
    // Capped at u64 nanoseconds (~584 years) so every consumer can convert.
    if nanos > u128::from(u64::MAX) {
        return Err(format!("`{text}` is too long"));
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| format!("`{text}` is too long"))?;
    // The remainder of a division by 1e9 always fits in u32.
    let sub = u32::try_from(nanos % 1_000_000_000).map_err(|_| bad())?;
    Ok(Duration::new(secs, sub))
}

/// Parses `512B`, `64KiB`, `1MiB`, `2GiB`, `10MB`, decimals such as
/// `1.5MiB` (rounded down to a whole byte), or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let bad = || format!("expected {SIZE_FORMS}, got `{text}`");
    let (number, unit) = split_number(text).ok_or_else(bad)?;
    let scale = if unit.is_empty() {
        if number.contains('.') {
            return Err(bad());
        }
        1
    } else {
        match SIZE_UNITS.iter().find(|(name, _)| *name == unit) {
            Some(&(_, scale)) => scale,
            None => {
                let hint = SIZE_UNITS
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(unit))
                    .map(|(name, _)| {
                        format!(" (units are case-sensitive: did you mean `{number}{name}`?)")
                    })
                    .unwrap_or_default();
                return Err(format!("{}{hint}", bad()));
            }
        }
    };
    let bytes = scale_decimal(number, scale).ok_or_else(bad)?;
    u64::try_from(bytes).map_err(|_| format!("`{text}` is too large"))
}

/// Parses `50%` into `0.5`. Accepts decimals (`12.5%`) from 0% to 100%.
pub fn parse_ratio(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let bad = || format!("expected {RATIO_FORMS}, got `{text}`");
    let number = text.strip_suffix('%').ok_or_else(bad)?;
    let (digits, rest) = split_number(number).ok_or_else(bad)?;
    if !rest.is_empty() {
        return Err(bad());
    }
    let percent: f64 = digits.parse().map_err(|_| bad())?;
    if !(0.0..=100.0).contains(&percent) {
        return Err(format!("`{text}` is out of range; expected {RATIO_FORMS}"));
    }
    Ok(percent / 100.0)
}

/// Prints a duration in the policy syntax, choosing the largest unit that
/// divides it exactly (`90s` stays `90s`, `3600s` becomes `1h`).
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    for &(name, scale) in DURATION_UNITS.iter().rev() {
        if nanos.is_multiple_of(scale) {
            return format!("{}{name}", nanos / scale);
        }
    }
    format!("{}ns", nanos)
}

/// Prints a byte count in the policy syntax with the largest binary unit
/// that divides it exactly (`1048576` becomes `1MiB`).
pub fn format_size(bytes: u64) -> String {
    let bytes = u128::from(bytes);
    for &(name, scale) in [
        ("TiB", KIB.pow(4)),
        ("GiB", KIB.pow(3)),
        ("MiB", KIB.pow(2)),
        ("KiB", KIB),
    ]
    .iter()
    {
        if bytes >= scale && bytes.is_multiple_of(scale) {
            return format!("{}{name}", bytes / scale);
        }
    }
    format!("{bytes}B")
}

/// Splits `12.5ms` into (`12.5`, `ms`). The number is ASCII digits with at
/// most one inner dot; `None` when there is no leading number.
fn split_number(text: &str) -> Option<(&str, &str)> {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(end);
    let valid = !number.is_empty()
        && !number.starts_with('.')
        && !number.ends_with('.')
        && number.matches('.').count() <= 1;
    valid.then_some((number, unit))
}

/// `number × scale` for a decimal `number`, exactly, rounding down; `None`
/// on u128 overflow or on more than 9 decimal places.
fn scale_decimal(number: &str, scale: u128) -> Option<u128> {
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if frac.len() > 9 {
        return None;
    }
    let whole: u128 = whole.parse().ok()?;
    let mut result = whole.checked_mul(scale)?;
    if !frac.is_empty() {
        let frac_value: u128 = frac.parse().ok()?;
        let denom = 10u128.pow(u32::try_from(frac.len()).ok()?);
        result = result.checked_add(frac_value.checked_mul(scale)? / denom)?;
    }
    Some(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn durations_without_a_known_unit_are_rejected_with_the_forms() {
        for bad in [
            "30", "10 s", "10sec", "s", "-1s", "1.s", ".5s", "1..5s", "", "1h30m",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("250ms, 10s, 5m, 1h or 1d"), "{bad}: {err}");
        }
        assert!(parse_duration("30").unwrap_err().contains("has no unit"));
        assert!(parse_duration("99999999999999999999d")
            .unwrap_err()
            .contains("too long"));
    }

    #[test]
    fn sizes_binary_decimal_and_plain() {
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("1KB"), Ok(1000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
    }

    #[test]
    fn sizes_reject_unknown_units_and_hint_at_case() {
        assert!(parse_size("10 MB").is_err());
        assert!(parse_size("1.5").is_err());
        assert!(parse_size("MiB").is_err());
        let err = parse_size("10mib").unwrap_err();
        assert!(err.contains("did you mean `10MiB`"), "{err}");
        assert!(parse_size("10XB").unwrap_err().contains("64KiB"));
        assert!(parse_size("99999999999TiB")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn ratios_are_percentages() {
        assert_eq!(parse_ratio("50%"), Ok(0.5));
        assert_eq!(parse_ratio("12.5%"), Ok(0.125));
        assert_eq!(parse_ratio("0%"), Ok(0.0));
        assert_eq!(parse_ratio("100%"), Ok(1.0));
        assert!(parse_ratio("0.5").unwrap_err().contains("50%"));
        assert!(parse_ratio("101%").unwrap_err().contains("out of range"));
        assert!(parse_ratio("-5%").is_err());
        assert!(parse_ratio("%").is_err());
    }

    #[test]
    fn formatting_round_trips() {
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_size(1 << 30), "1GiB");
        assert_eq!(format_size(1), "1B");
        assert_eq!(format_size(10_000_000), "10000000B");
        for text in ["250ms", "10s", "5m", "1h", "1d"] {
            let d = parse_duration(text).unwrap();
            assert_eq!(format_duration(d), text);
        }
    }
}
