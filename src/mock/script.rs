//! Fault scripts: the `k=v;k=v` directives that tell the mock how to misbehave.
//!
//! A script comes from the `x-mock-fault` request header, from a model name of
//! the form `mock:k=v;k=v`, or from the server defaults (in that order; the
//! first one present wins, they are not merged).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Largest accepted `chunks=` value.
pub const MAX_CHUNKS: usize = 100_000;
/// Largest accepted duration for any directive (a day).
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Longest accepted spec string.
pub const MAX_SPEC_LEN: usize = 4096;

/// What one request (or the server by default) should do. Every field is
/// optional; an empty script means "behave".
///
/// Directives (`k=v`, separated by `;`; a bare `k` means `k=1`):
///
/// | directive | meaning |
/// |---|---|
/// | `scenario=NAME` | stats bucket and the attempt counter `fail`/`reset` count against |
/// | `fail=N:S` | the first N attempts of the scenario answer status S (default 500) with an OpenAI error body |
/// | `retry_after=SECS` | add `Retry-After: SECS` to `fail`/`status` error answers |
/// | `error_code=CODE` | `error.code` of the error body (e.g. `context_length_exceeded`) |
/// | `status=S` | always answer S (an OpenAI error body when S >= 400) |
/// | `latency=DUR` | wait before the response headers |
/// | `ttft=DUR` | streams: wait after the headers + role chunk, before the first content chunk |
/// | `chunk_delay=DUR` | streams: wait between content chunks |
/// | `chunks=N` | number of content chunks (= words, = completion tokens); default 8 |
/// | `cut_after=K` | close the connection abruptly after K content chunks |
/// | `stall_after=K` | after K content chunks stop sending, keep the connection open |
/// | `malformed_at=K` | the K-th (1-based) content chunk is not valid JSON |
/// | `no_done=1` | end the stream cleanly but without `data: [DONE]` |
/// | `reset=N` | the first N attempts of the scenario: drop the socket (RST) before any byte |
/// | `hang=1` | read the request, never answer |
/// | `heartbeat=DUR` | streams: after the role chunk send `: ping` every DUR ... |
/// | `duration=DUR` | ... for DUR in total (default: until the client leaves), then finish |
/// | `stamp=1` | streams: every `data:` chunk carries `"mock_sent_us"`, the wall-clock time (µs since the Unix epoch) it was written, so a client on the same host can measure each chunk's delivery delay |
///
/// Durations: `250ms`, `2s`, `1.5s`, `100us`, `1m`, `1h`; a bare number is
/// milliseconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultScript {
    /// The spec string this script was parsed from (used as the default
    /// scenario name); `None` when built in code.
    pub spec: Option<String>,
    pub scenario: Option<String>,
    /// `(N, S)`: the first N attempts answer status S.
    pub fail: Option<(u64, u16)>,
    pub retry_after: Option<u64>,
    pub error_code: Option<String>,
    pub status: Option<u16>,
    pub latency: Option<Duration>,
    pub ttft: Option<Duration>,
    pub chunk_delay: Option<Duration>,
    pub chunks: Option<usize>,
    pub cut_after: Option<usize>,
    pub stall_after: Option<usize>,
    pub malformed_at: Option<usize>,
    pub no_done: bool,
    pub reset: Option<u64>,
    pub hang: bool,
    pub heartbeat: Option<Duration>,
    pub duration: Option<Duration>,
    pub stamp: bool,
}

impl FaultScript {
    /// Parse the `k=v;k=v` form. Keys are case-insensitive and `-` may stand
    /// for `_`; unknown keys and bad values are errors.
    pub fn parse(spec: &str) -> Result<FaultScript, String> {
        let spec = spec.trim();
        if spec.len() > MAX_SPEC_LEN {
            return Err(format!("fault spec longer than {MAX_SPEC_LEN} bytes"));
        }
        let mut s = FaultScript {
            spec: if spec.is_empty() {
                None
            } else {
                Some(spec.to_string())
            },
            ..FaultScript::default()
        };
        for part in spec.split(';') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None => (part, "1"),
            };
            let key = key.to_ascii_lowercase().replace('-', "_");
            let bad = |what: &str| format!("fault directive `{part}`: {what}");
            match key.as_str() {
                "scenario" => {
                    if value.is_empty() {
                        return Err(bad("empty scenario name"));
                    }
                    s.scenario = Some(value.to_string());
                }
                "fail" => {
                    let (n, status) = match value.split_once(':') {
                        Some((n, st)) => (n.trim(), parse_status(st.trim()).map_err(|e| bad(&e))?),
                        None => (value, 500),
                    };
                    let n = n
                        .parse::<u64>()
                        .map_err(|_| bad("expected fail=N:STATUS"))?;
                    s.fail = Some((n, status));
                }
                "retry_after" => {
                    s.retry_after = Some(
                        value
                            .parse::<u64>()
                            .map_err(|_| bad("expected whole seconds"))?,
                    )
                }
                "error_code" => {
                    if value.is_empty() {
                        return Err(bad("empty error code"));
                    }
                    s.error_code = Some(value.to_string());
                }
                "status" => s.status = Some(parse_status(value).map_err(|e| bad(&e))?),
                "latency" => s.latency = Some(parse_duration(value).map_err(|e| bad(&e))?),
                "ttft" => s.ttft = Some(parse_duration(value).map_err(|e| bad(&e))?),
                "chunk_delay" => s.chunk_delay = Some(parse_duration(value).map_err(|e| bad(&e))?),
                "chunks" => {
                    let n = parse_count(value).map_err(|e| bad(&e))?;
                    if n > MAX_CHUNKS {
                        return Err(bad(&format!("at most {MAX_CHUNKS} chunks")));
                    }
                    s.chunks = Some(n);
                }
                "cut_after" => s.cut_after = Some(parse_count(value).map_err(|e| bad(&e))?),
                "stall_after" => s.stall_after = Some(parse_count(value).map_err(|e| bad(&e))?),
                "malformed_at" => {
                    let k = parse_count(value).map_err(|e| bad(&e))?;
                    if k == 0 {
                        return Err(bad("chunks are numbered from 1"));
                    }
                    s.malformed_at = Some(k);
                }
                "no_done" => s.no_done = parse_bool(value).map_err(|e| bad(&e))?,
                "reset" => {
                    let n = value.parse::<u64>().map_err(|_| bad("expected reset=N"))?;
                    s.reset = if n == 0 { None } else { Some(n) };
                }
                "hang" => s.hang = parse_bool(value).map_err(|e| bad(&e))?,
                "heartbeat" => {
                    let d = parse_duration(value).map_err(|e| bad(&e))?;
                    if d.is_zero() {
                        return Err(bad("heartbeat must be > 0"));
                    }
                    s.heartbeat = Some(d);
                }
                "duration" => s.duration = Some(parse_duration(value).map_err(|e| bad(&e))?),
                "stamp" => s.stamp = parse_bool(value).map_err(|e| bad(&e))?,
                _ => return Err(format!("unknown fault directive `{key}`")),
            }
        }
        Ok(s)
    }

    /// True when the script asks for nothing at all.
    pub fn is_empty(&self) -> bool {
        FaultScript {
            spec: None,
            ..self.clone()
        } == FaultScript::default()
    }

    /// The stats bucket: `scenario=`, else the spec string, else `"default"`.
    pub fn scenario_name(&self) -> String {
        self.scenario
            .clone()
            .or_else(|| self.spec.clone())
            .unwrap_or_else(|| "default".to_string())
    }
}

impl FromStr for FaultScript {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FaultScript::parse(s)
    }
}

impl fmt::Display for FaultScript {
    /// The spec it came from, or a reconstruction of the directives.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(spec) = &self.spec {
            return f.write_str(spec);
        }
        let mut parts: Vec<String> = Vec::new();
        let ms = |d: &Duration| format!("{}ms", d.as_secs_f64() * 1000.0);
        if let Some(v) = &self.scenario {
            parts.push(format!("scenario={v}"));
        }
        if let Some((n, st)) = self.fail {
            parts.push(format!("fail={n}:{st}"));
        }
        if let Some(v) = self.retry_after {
            parts.push(format!("retry_after={v}"));
        }
        if let Some(v) = &self.error_code {
            parts.push(format!("error_code={v}"));
        }
        if let Some(v) = self.status {
            parts.push(format!("status={v}"));
        }
        for (k, v) in [
            ("latency", &self.latency),
            ("ttft", &self.ttft),
            ("chunk_delay", &self.chunk_delay),
            ("heartbeat", &self.heartbeat),
            ("duration", &self.duration),
        ] {
            if let Some(d) = v {
                parts.push(format!("{k}={}", ms(d)));
            }
        }
        for (k, v) in [
            ("chunks", self.chunks),
            ("cut_after", self.cut_after),
            ("stall_after", self.stall_after),
            ("malformed_at", self.malformed_at),
        ] {
            if let Some(n) = v {
                parts.push(format!("{k}={n}"));
            }
        }
        if self.no_done {
            parts.push("no_done=1".into());
        }
        if let Some(n) = self.reset {
            parts.push(format!("reset={n}"));
        }
        if self.hang {
            parts.push("hang=1".into());
        }
        if self.stamp {
            parts.push("stamp=1".into());
        }
        f.write_str(&parts.join(";"))
    }
}

/// Parse `250ms`, `2s`, `1.5s`, `100us`, `1m`/`1min`, `1h`; a bare number is
/// milliseconds. At most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("bad duration `{s}` (try 250ms or 2s)"))?;
    let secs = match unit.trim() {
        "" | "ms" => value / 1000.0,
        "us" | "µs" => value / 1_000_000.0,
        "ns" => value / 1_000_000_000.0,
        "s" | "sec" | "secs" => value,
        "m" | "min" | "mins" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("bad duration unit `{other}` in `{s}`")),
    };
    if !secs.is_finite() || secs < 0.0 || secs > MAX_DURATION.as_secs_f64() {
        return Err(format!("duration `{s}` out of range (max 24h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_status(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(v) if (200..=599).contains(&v) => Ok(v),
        _ => Err(format!("bad status `{s}` (200..=599)")),
    }
}

fn parse_count(s: &str) -> Result<usize, String> {
    s.parse::<usize>().map_err(|_| format!("bad count `{s}`"))
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("bad flag `{s}` (1 or 0)")),
    }
}
