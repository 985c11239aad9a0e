//! Logging: a `tracing` subscriber writing to stderr, as JSON (one object per
//! line, for log shippers) or as human-readable text.
//!
//! The level filter comes from `RUST_LOG` (the usual `EnvFilter` syntax,
//! e.g. `info,floodwall=debug,access=off`) and defaults to `info`. Invalid
//! directives in `RUST_LOG` are skipped rather than failing start-up.
//! Pingora logs through the `log` crate; those records are bridged into the
//! same subscriber, so `RUST_LOG=pingora_core=warn` works as expected.
//!
//! Two targets have a fixed meaning, so they can be routed or silenced on
//! their own:
//! - [`ACCESS_TARGET`] (`access`): one event per finished request, emitted by
//!   the proxy (route, status, durations, bytes, trace id).
//! - [`AUDIT_TARGET`] (`audit`): one event per operator-visible change, such
//!   as a config reload or an admin action.
//!
//! [`trace_id_from_traceparent`] pulls the trace id out of a W3C
//! `traceparent` header so that log lines can carry the caller's trace id.
//! floodwall does not create spans or export traces itself.

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

use tracing_subscriber::filter::{EnvFilter, LevelFilter};

/// The `tracing` target of the per-request access log.
pub const ACCESS_TARGET: &str = "access";
/// The `tracing` target of the audit log (reloads, admin actions).
pub const AUDIT_TARGET: &str = "audit";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One JSON object per line, fields flattened into the top level.
    #[default]
    Json,
    /// Human-readable lines; coloured when stderr is a terminal.
    Text,
}

impl LogFormat {
    pub const fn as_str(self) -> &'static str {
        match self {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `--log-format` value that is neither `json` nor `text`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown log format {0:?} (expected \"json\" or \"text\")")]
pub struct ParseLogFormatError(pub String);

impl FromStr for LogFormat {
    type Err = ParseLogFormatError;

    /// Case-insensitive `json` or `text`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("json") {
            Ok(LogFormat::Json)
        } else if s.eq_ignore_ascii_case("text") {
            Ok(LogFormat::Text)
        } else {
            Err(ParseLogFormatError(s.to_owned()))
        }
    }
}

/// Installs the global subscriber. Safe to call more than once: later calls
/// (or a subscriber a test harness installed first) are left in place.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(super::writer::NonBlocking)
        .with_target(true);
    super::access::set_format(format);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "log subscriber already installed");
    }
}

/// The trace id of a W3C `traceparent` header value
/// (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`), or `None`
/// when the value is malformed.
///
/// Follows the spec's rules: lower-case hex only; the all-zero trace id and
/// parent id are invalid; version `ff` is invalid; a higher version is parsed
/// as version 00 and may carry more fields after a `-`.
pub fn trace_id_from_traceparent(v: &str) -> Option<&str> {
    let v = v.trim_matches(|c| c == ' ' || c == '\t');
    let b = v.as_bytes();
    // All-ASCII also makes the byte-offset slicing below panic-free.
    if b.len() < 55 || !v.is_ascii() {
        return None;
    }
    let version = &v[0..2];
    if !is_lower_hex(version) || version == "ff" {
        return None;
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id = &v[3..35];
    let parent_id = &v[36..52];
    let flags = &v[53..55];
    if !is_lower_hex(trace_id) || !is_lower_hex(parent_id) || !is_lower_hex(flags) {
        return None;
    }
    if is_all_zero(trace_id) || is_all_zero(parent_id) {
        return None;
    }
    match (version, b.len()) {
        (_, 55) => Some(trace_id),
        // Version 00 has exactly four fields; later versions may append more.
        ("00", _) => None,
        (_, _) if b[55] == b'-' => Some(trace_id),
        _ => None,
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_all_zero(s: &str) -> bool {
    s.bytes().all(|c| c == b'0')
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_valid() {
        assert_eq!(
            trace_id_from_traceparent(VALID),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            trace_id_from_traceparent(&format!("  {VALID}\t")),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        // Unsampled flags are still a valid trace id.
        assert_eq!(
            trace_id_from_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn traceparent_rejects_all_zero_ids() {
        assert_eq!(
            trace_id_from_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(
            trace_id_from_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            None
        );
    }

    #[test]
    fn traceparent_rejects_malformed() {
        for bad in [
            "",
            "00",
            "garbage",
            // upper-case hex
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // short trace id
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            // non-hex
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            // wrong separators
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            // invalid version
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // version 00 with trailing data
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-011",
            // multi-byte characters must not cause a slicing panic
            "00-4bf92f3577b34da6a3ce929d0e0e473é-00f067aa0ba902b7-01",
            "éé-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0é-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
        ] {
            assert_eq!(trace_id_from_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn traceparent_future_version_may_carry_more_fields() {
        assert_eq!(
            trace_id_from_traceparent(
                "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds"
            ),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            trace_id_from_traceparent("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"),
            None
        );
    }

    #[test]
    fn log_format_parses_case_insensitively() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("TEXT".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("yaml".parse::<LogFormat>().is_err());
        assert_eq!(LogFormat::Text.to_string(), "text");
    }

    #[test]
    fn init_twice_does_not_panic() {
        init(LogFormat::Text);
        init(LogFormat::Json);
    }
}
